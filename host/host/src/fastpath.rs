//! The overlay's eBPF fast path, as far as jobs are concerned: each job's host-side veth
//! gets the job program and the endpoint map an entry (job IP → veth, job MAC, bridge MAC),
//! so traffic to a job on this host is handed to its namespace directly and traffic to a
//! remote block is encapsulated by the program. The overlay agent loads it and keeps the
//! route maps; this daemon loads the same programs once the agent's maps are pinned (so a
//! daemon started before the agent picks it up with its next job) and only touches the
//! jobs' attachments and endpoints. Any failure leaves the job on the kernel path: a miss
//! in the maps always falls through to it.
//!
//! The pinned maps outlive the daemon, and a daemon that does not attach jobs (`--fast-path
//! off`, or its load failed) may follow one that did. So whatever this daemon's setting, an
//! address never keeps an entry that is not its job's: a job's entry and attachment are
//! removed when its network goes, straight from the pins when nothing is loaded, and a new
//! job that is not given an entry has any entry at its address removed before it runs.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use flynn_ebpf::FastPath;
use flynn_network::job::{self, JobNet, JobNetError};

use crate::net::chain;

/// Where the overlay agent pins its fast path, and whether this daemon uses it.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--bpf-pin-dir`.
    pub pin_dir: PathBuf,
    /// `--fast-path auto`: jobs get the job program and an endpoint entry once the agent
    /// has set the fast path up. `off`: nothing is loaded or attached, but entries and
    /// attachments found in the pins are still removed as described in the module doc.
    pub attach: bool,
}

/// The fast path of one job network (see the module doc).
pub(crate) struct Fast {
    /// `None`: no pin directory at all (nothing is ever looked at).
    config: Option<Config>,
    fp: Option<FastPath>,
    gateway_mac: [u8; 6],
}

impl Fast {
    pub(crate) fn new(config: Option<Config>, gateway_mac: [u8; 6]) -> Fast {
        Fast {
            config,
            fp: None,
            gateway_mac,
        }
    }

    /// Whether there is a pin directory to keep in step with the jobs.
    pub(crate) fn has_pins(&self) -> bool {
        self.config.is_some()
    }

    /// The fast path, loaded on first use once the agent has set it up; `None` when this
    /// daemon does not attach jobs (a failed load is not tried again).
    fn get(&mut self) -> Option<&mut FastPath> {
        if self.fp.is_none() {
            let cfg = self.config.as_mut().filter(|c| c.attach)?;
            if !FastPath::is_set_up(&cfg.pin_dir) {
                return None;
            }
            match FastPath::load(&cfg.pin_dir) {
                Ok(fp) => self.fp = Some(fp),
                Err(e) => {
                    tracing::warn!(dir = %cfg.pin_dir.display(), error = %chain(e), "cannot load the overlay fast path; jobs use the kernel path");
                    cfg.attach = false;
                }
            }
        }
        self.fp.as_mut()
    }

    /// Gives a job network its fast path entry; failures are logged. True when it has it.
    /// A job left without one has any entry at its address removed (one an earlier daemon
    /// left, or one a failed attach did not replace): it would send the job's traffic to
    /// another veth.
    pub(crate) fn attach(&mut self, n: &JobNet) -> bool {
        let gateway_mac = self.gateway_mac;
        if let Some(fp) = self.get() {
            match job::register_job(fp, n, gateway_mac) {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(veth = %n.host_veth, error = %chain(e), "fast path not attached; the job uses the kernel path")
                }
            }
        }
        if let Err(e) = self.forget(Some(n.ip), None) {
            tracing::warn!(ip = %n.ip, error = %chain(e), "removing a stale fast path entry failed");
        }
        false
    }

    /// Removes the endpoint entry of `ip` and detaches `ifindex` (either may be unknown):
    /// through the loaded fast path, or, when none is loaded, straight from the pins
    /// without loading or attaching anything.
    pub(crate) fn forget(
        &mut self,
        ip: Option<Ipv4Addr>,
        ifindex: Option<u32>,
    ) -> Result<(), JobNetError> {
        if let Some(fp) = self.fp.as_mut() {
            return job::unregister_job(fp, ip, ifindex);
        }
        match &self.config {
            Some(cfg) if FastPath::is_set_up(&cfg.pin_dir) => {
                job::unregister_pinned(&cfg.pin_dir, ip, ifindex)
            }
            _ => Ok(()),
        }
    }
}
