//! Putting the classifiers on tc ingress, and the records in the pin directory that say where
//! they are, so a restarted loader can find and replace them.
//!
//! Two mechanisms, chosen per [`AttachMode`]:
//! - TCX links (kernel ≥ 6.6): the link is pinned as `link_<role>_<ifindex>`; it keeps the
//!   program attached while no loader runs, and a new loader swaps its program in with
//!   `BPF_LINK_UPDATE`.
//! - Legacy cls_bpf filters on a clsact qdisc via netlink (kernels 5.12–6.5, no TCX): filters
//!   outlive the loader by themselves; ours sit at a fixed priority and handle, a new loader
//!   replaces the program in place (one netlink change, atomic per packet), and an empty
//!   directory `tc_<role>_<ifindex>` records the attachment (bpffs holds only BPF objects and
//!   directories).

use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{
    qdisc_add_clsact, qdisc_detach_program, NlOptions, SchedClassifierLink, TcAttachOptions,
    TcError, TcHandle,
};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use aya::sys::SyscallError;
use aya::util::KernelVersion;

use crate::{EbpfError, Role};

/// How the classifiers are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttachMode {
    /// TCX links when the kernel has them (6.6+), netlink filters otherwise.
    #[default]
    Auto,
    /// TCX links only.
    Tcx,
    /// Legacy cls_bpf filters on a clsact qdisc, even where TCX exists.
    Netlink,
}

/// A resolved mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Tcx,
    Netlink,
}

impl AttachMode {
    pub(crate) fn resolve(self) -> Kind {
        match self {
            AttachMode::Tcx => Kind::Tcx,
            AttachMode::Netlink => Kind::Netlink,
            AttachMode::Auto => match KernelVersion::current() {
                Ok(v) if v >= KernelVersion::new(6, 6, 0) => Kind::Tcx,
                _ => Kind::Netlink,
            },
        }
    }
}

/// Priority and handle of our netlink filters: fixed, so a restarted loader replaces its own
/// filter instead of stacking a second one. Lower priorities run first.
const NL_PRIORITY: u16 = 0x4646;
const NL_HANDLE: u32 = 1;

/// One attachment recorded in the pin directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    pub ifindex: u32,
    pub role: Role,
    pub kind: Kind,
}

impl Record {
    fn name(&self) -> String {
        let kind = match self.kind {
            Kind::Tcx => "link",
            Kind::Netlink => "tc",
        };
        format!("{kind}_{}_{}", self.role.tag(), self.ifindex)
    }

    pub(crate) fn path(&self, pin_dir: &Path) -> PathBuf {
        pin_dir.join(self.name())
    }

    fn parse(name: &str) -> Option<Record> {
        let (kind, rest) = if let Some(r) = name.strip_prefix("link_") {
            (Kind::Tcx, r)
        } else {
            (Kind::Netlink, name.strip_prefix("tc_")?)
        };
        let (tag, idx) = rest.rsplit_once('_')?;
        let role = Role::ALL.into_iter().find(|r| r.tag() == tag)?;
        Some(Record {
            ifindex: idx.parse().ok()?,
            role,
            kind,
        })
    }
}

/// Every attachment recorded in `pin_dir`, by interface index.
pub(crate) fn records(pin_dir: &Path) -> Result<Vec<Record>, EbpfError> {
    let io = |source| EbpfError::Io {
        op: "list pin directory",
        path: pin_dir.into(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(pin_dir).map_err(io)? {
        if let Some(r) = entry
            .map_err(io)?
            .file_name()
            .to_str()
            .and_then(Record::parse)
        {
            out.push(r);
        }
    }
    out.sort_unstable_by_key(|r| (r.ifindex, r.kind == Kind::Netlink));
    Ok(out)
}

/// Attaches `prog` for `rec.role` to `ifname` and records it (replacing a netlink filter of ours
/// that is already there).
pub(crate) fn attach(
    prog: &mut SchedClassifier,
    rec: Record,
    ifname: &str,
    pin_dir: &Path,
) -> Result<(), EbpfError> {
    let path = rec.path(pin_dir);
    let prog_err = |source| EbpfError::Program {
        name: rec.role.program(),
        source,
    };
    match rec.kind {
        Kind::Tcx => {
            let id = prog
                .attach_with_options(
                    ifname,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(prog_err)?;
            let link = prog.take_link(id).map_err(prog_err)?;
            let link = FdLink::try_from(link).map_err(|source| EbpfError::Link {
                path: path.clone(),
                source,
            })?;
            link.pin(&path)
                .map_err(|source| EbpfError::Pin { path, source })?;
        }
        Kind::Netlink => {
            // Fails when the qdisc exists already, which is fine; a real problem shows up as
            // the filter attach failing below.
            // Fails when the qdisc exists already, which is fine; a real problem shows up as
            // the filter attach failing below.
            let _ = qdisc_add_clsact(ifname);
            if !replace_filter(prog, rec, ifname)? {
                let id = prog
                    .attach_with_options(
                        ifname,
                        TcAttachType::Ingress,
                        TcAttachOptions::Netlink(NlOptions {
                            priority: NL_PRIORITY,
                            handle: TcHandle::from(NL_HANDLE),
                            classid: None,
                        }),
                    )
                    .map_err(prog_err)?;
                keep_filter(prog, rec.role, id)?;
            }
            match std::fs::create_dir(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(EbpfError::Io {
                        op: "record filter",
                        path,
                        source,
                    })
                }
            }
        }
    }
    Ok(())
}

/// Puts `prog` into the recorded attachment. `ifname` is `None` when the interface is gone.
/// Returns false (and drops the record) when there is nothing left to swap into.
pub(crate) fn swap(
    prog: &mut SchedClassifier,
    rec: Record,
    ifname: Option<&str>,
    pin_dir: &Path,
) -> Result<bool, EbpfError> {
    let path = rec.path(pin_dir);
    let swapped = match rec.kind {
        Kind::Tcx => {
            let link_err = |source| EbpfError::Link {
                path: path.clone(),
                source,
            };
            // Gone since the listing (flynn-host unpinned a job's link meanwhile): nothing
            // to swap into, which is no failure of the load.
            let Some(pinned) = open_pin(&path)? else {
                return Ok(false);
            };
            let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(link_err)?;
            match prog.attach_to_link(link) {
                Ok(id) => {
                    // Dropping our handle closes an fd; the pin keeps the link attached.
                    drop(prog.take_link(id).map_err(|source| EbpfError::Program {
                        name: rec.role.program(),
                        source,
                    })?);
                    true
                }
                // The link's interface is gone.
                Err(e) if os_error(&e) == Some(libc::ENOLINK) => false,
                Err(source) => {
                    return Err(EbpfError::Program {
                        name: rec.role.program(),
                        source,
                    })
                }
            }
        }
        Kind::Netlink => match ifname {
            // The interface went since its name was looked up (a job's veth deleted while
            // the loader starts): like ENOLINK above.
            Some(ifname) => match replace_filter(prog, rec, ifname) {
                Err(EbpfError::NoSuchInterface { .. }) => false,
                r => r?,
            },
            None => false,
        },
    };
    if !swapped {
        tracing::info!(path = %path.display(), "dropping the record of an attachment that is gone");
        remove_record(&path)?;
    }
    Ok(swapped)
}

/// Detaches the recorded attachment (if its interface still exists) and drops the record.
pub(crate) fn remove(rec: Record, ifname: Option<&str>, pin_dir: &Path) -> Result<(), EbpfError> {
    let path = rec.path(pin_dir);
    match rec.kind {
        Kind::Tcx => {
            // Already unpinned by someone else: detached, nothing to do.
            let Some(pinned) = open_pin(&path)? else {
                return Ok(());
            };
            // Removing the pin drops the last reference once our fd closes: the link detaches.
            let fd = pinned.unpin().map_err(|source| EbpfError::Io {
                op: "unpin link",
                path: path.clone(),
                source,
            })?;
            drop(fd);
            Ok(())
        }
        Kind::Netlink => {
            if let Some(ifname) = ifname {
                // By program name, so a filter that is not ours is never touched (e.g. when
                // the index resolves to another interface in the wrong namespace).
                match qdisc_detach_program(ifname, TcAttachType::Ingress, rec.role.program()) {
                    Ok(()) => {}
                    // Nothing of ours there (already gone, or no clsact qdisc at all).
                    Err(TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(TcError::NetlinkError(n))
                        if matches!(n.raw_os_error(), Some(libc::ENOENT) | Some(libc::EINVAL)) => {}
                    Err(source) => {
                        return Err(EbpfError::Program {
                            name: rec.role.program(),
                            source: source.into(),
                        })
                    }
                }
            }
            remove_record(&path)
        }
    }
}

/// Replaces the program of our netlink filter on `ifname`; false when there is no such filter,
/// [`EbpfError::NoSuchInterface`] when there is no such interface (any more).
fn replace_filter(
    prog: &mut SchedClassifier,
    rec: Record,
    ifname: &str,
) -> Result<bool, EbpfError> {
    let role = rec.role;
    let link = SchedClassifierLink::attached(
        ifname,
        TcAttachType::Ingress,
        NL_PRIORITY,
        TcHandle::from(NL_HANDLE),
        None,
    )
    .map_err(|_| EbpfError::NoSuchInterface {
        ifindex: rec.ifindex,
    })?;
    match prog.attach_to_link(link) {
        Ok(id) => {
            keep_filter(prog, role, id)?;
            Ok(true)
        }
        Err(e) if matches!(os_error(&e), Some(libc::ENOENT) | Some(libc::EINVAL)) => Ok(false),
        Err(e) if os_error(&e) == Some(libc::ENODEV) => Err(EbpfError::NoSuchInterface {
            ifindex: rec.ifindex,
        }),
        Err(source) => Err(EbpfError::Program {
            name: role.program(),
            source,
        }),
    }
}

/// Takes the filter's handle out of aya's bookkeeping without detaching it: aya detaches
/// netlink filters when their handle is dropped, and ours must outlive this process.
fn keep_filter(
    prog: &mut SchedClassifier,
    role: Role,
    id: aya::programs::tc::SchedClassifierLinkId,
) -> Result<(), EbpfError> {
    let link = prog.take_link(id).map_err(|source| EbpfError::Program {
        name: role.program(),
        source,
    })?;
    // The handle is plain data (interface, priority, handle): forgetting it leaks nothing.
    std::mem::forget(link);
    Ok(())
}

/// The link pinned at `path`; `None` when the pin is gone.
fn open_pin(path: &Path) -> Result<Option<PinnedLink>, EbpfError> {
    match PinnedLink::from_pin(path) {
        Ok(p) => Ok(Some(p)),
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(None)
        }
        Err(source) => Err(EbpfError::Link {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn remove_record(path: &Path) -> Result<(), EbpfError> {
    let r = if path.is_dir() {
        std::fs::remove_dir(path)
    } else {
        std::fs::remove_file(path)
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(EbpfError::Io {
            op: "remove record",
            path: path.into(),
            source,
        }),
    }
}

/// The errno behind a program error, where there is one.
fn os_error(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::SyscallError(SyscallError { io_error, .. }) => io_error.raw_os_error(),
        ProgramError::NetlinkError(n) => n.raw_os_error(),
        ProgramError::TcError(TcError::NetlinkError(n)) => n.raw_os_error(),
        ProgramError::TcError(TcError::IoError(io)) => io.raw_os_error(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record listed by a load whose pin another process removed before it was opened
    /// (flynn-host tearing a job down while the agent starts) is gone, not a failure.
    #[test]
    fn a_record_whose_pin_went_meanwhile_is_no_failure() {
        let dir = std::env::temp_dir().join(format!("flynn-ebpf-gone-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rec = Record {
            ifindex: 7,
            role: Role::JobVeth,
            kind: Kind::Tcx,
        };
        assert!(matches!(open_pin(&rec.path(&dir)), Ok(None)));
        let r = remove(rec, None, &dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn record_names_round_trip() {
        for kind in [Kind::Tcx, Kind::Netlink] {
            for role in Role::ALL {
                let r = Record {
                    ifindex: 42,
                    role,
                    kind,
                };
                assert_eq!(Record::parse(&r.name()), Some(r), "{}", r.name());
                assert!(!r.name().contains('.'));
            }
        }
        assert_eq!(
            Record::parse("link_vxlan_7").map(|r| (r.ifindex, r.role, r.kind)),
            Some((7, Role::Vxlan, Kind::Tcx))
        );
        for junk in [
            "flynn_endpoints",
            "link_job_",
            "tc_bogus_3",
            "link_job_x",
            "tc_job",
        ] {
            assert_eq!(Record::parse(junk), None, "{junk}");
        }
    }
}
