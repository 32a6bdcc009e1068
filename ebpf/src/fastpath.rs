//! Loading, attaching and feeding the fast path; everything pinned under one directory.
//!
//! Pin directory layout (names without dots):
//! - `flynn_endpoints`, `flynn_prefixes`, `flynn_tunnels`, `flynn_underlay`, `flynn_counters`:
//!   the maps;
//! - `link_<role>_<ifindex>` (role `job`, `vxlan` or `underlay`): pinned TCX ingress links, or
//!   `tc_<role>_<ifindex>`: records of netlink filters (see `attach.rs`).
//!   Attachments keep their program after the loader exits; a new loader swaps its own program
//!   into each of them atomically (each packet sees the old or the new program).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray};
use aya::programs::SchedClassifier;
use aya::sys::SyscallError;
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfLoader};

use crate::attach::{self, AttachMode, Kind, Record};
use crate::maps::{
    be_word, RawHop, RawTunnel, RawUnderlay, CTR_DECAP, CTR_DECAP_GSO, CTR_ENCAP, CTR_LOCAL,
    CTR_MAX, CTR_PASSED, CTR_REMOTE,
};
use crate::object::{
    FASTPATH, MAP_COUNTERS, MAP_ENDPOINTS, MAP_PREFIXES, MAP_TUNNELS, MAP_UNDERLAY, PROG_FROM_JOB,
    PROG_FROM_UNDERLAY, PROG_FROM_VXLAN,
};
use crate::{bpffs, Counters, EbpfError, Endpoint, Hop, Tunnel, Underlay};

/// Where the agent pins the fast path.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/flynn";

/// Which program an interface gets on its tc ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A job's host-side veth: local and remote destinations.
    JobVeth,
    /// The VXLAN device: decapsulated packets for local jobs.
    Vxlan,
    /// The host's underlay device (the VXLAN device's lower device): VXLAN packets for local
    /// jobs are decapsulated in BPF (see [`FastPath::set_underlay`]), everything else passes.
    Underlay,
}

impl Role {
    pub(crate) fn program(self) -> &'static str {
        match self {
            Role::JobVeth => PROG_FROM_JOB,
            Role::Vxlan => PROG_FROM_VXLAN,
            Role::Underlay => PROG_FROM_UNDERLAY,
        }
    }

    /// The role's word in pin directory names.
    pub(crate) fn tag(self) -> &'static str {
        match self {
            Role::JobVeth => "job",
            Role::Vxlan => "vxlan",
            Role::Underlay => "underlay",
        }
    }

    pub(crate) const ALL: [Role; 3] = [Role::JobVeth, Role::Vxlan, Role::Underlay];
}

/// The loaded fast path: programs of this process plus the (possibly inherited) pinned maps.
/// Dropping it leaves everything pinned and attached; [`FastPath::unpin`] removes it all.
pub struct FastPath {
    pin_dir: PathBuf,
    kind: Kind,
    ebpf: Ebpf,
    endpoints: HashMap<MapData, u32, Endpoint>,
    prefixes: LpmTrie<MapData, u32, RawHop>,
    tunnels: HashMap<MapData, u32, RawTunnel>,
    underlay: Array<MapData, RawUnderlay>,
    counters: PerCpuArray<MapData, u64>,
}

// The agent may own the fast path from any thread (e.g. inside a multi-threaded runtime).
const _: fn() = || {
    fn send<T: Send>() {}
    send::<FastPath>();
};

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath")
            .field("pin_dir", &self.pin_dir)
            .field("attach", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Minimum kernel: `bpf_check_mtu` is in 5.12 (`bpf_redirect_peer` and `bpf_redirect_neigh`
/// with a next hop in 5.10). TCX links need 6.6; older kernels get netlink filters
/// ([`AttachMode::Auto`]).
const MIN_KERNEL: (u8, u8) = (5, 12);

/// Refuses a kernel older than [`MIN_KERNEL`].
fn check_kernel(current: KernelVersion) -> Result<(), EbpfError> {
    let (major, minor) = MIN_KERNEL;
    if current < KernelVersion::new(major, minor, 0) {
        return Err(EbpfError::Unsupported {
            why: format!(
                "kernel {current:?} is older than {major}.{minor} (bpf_redirect_peer/neigh, bpf_check_mtu)"
            ),
        });
    }
    Ok(())
}

impl FastPath {
    /// Whether this kernel and these privileges can run the fast path (for `--fast-path auto`).
    pub fn supported() -> bool {
        match Self::probe() {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(error = %error_chain(&e), "eBPF fast path not supported");
                false
            }
        }
    }

    /// [`FastPath::supported`] with the reason: kernel version, then the verifier accepting both
    /// programs (which fails on kernels without the helpers they call). Loads
    /// nothing persistent: maps are not pinned and vanish with the probe.
    pub fn probe() -> Result<(), EbpfError> {
        let current = KernelVersion::current().map_err(|e| EbpfError::Unsupported {
            why: format!("cannot read the kernel version: {e}"),
        })?;
        check_kernel(current)?;
        let mut ebpf = EbpfLoader::new().load(FASTPATH).map_err(EbpfError::Load)?;
        for role in Role::ALL {
            program(&mut ebpf, role)?
                .load()
                .map_err(|source| EbpfError::Program {
                    name: role.program(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Loads the programs, reusing the maps pinned in `pin_dir` (or creating and pinning them),
    /// and swaps the new programs into every attachment recorded there. New attachments use
    /// TCX links where the kernel has them, netlink filters otherwise.
    pub fn load(pin_dir: &Path) -> Result<FastPath, EbpfError> {
        Self::load_with(pin_dir, AttachMode::Auto)
    }

    /// [`FastPath::load`] with the attach mechanism for new attachments chosen by the caller
    /// (existing ones are swapped whatever their kind).
    pub fn load_with(pin_dir: &Path, mode: AttachMode) -> Result<FastPath, EbpfError> {
        bpffs::prepare(pin_dir)?;
        let endpoints_pin = pin_dir.join(MAP_ENDPOINTS);
        let prefixes_pin = pin_dir.join(MAP_PREFIXES);
        let underlay_pin = pin_dir.join(MAP_UNDERLAY);
        let tunnels_pin = pin_dir.join(MAP_TUNNELS);
        let counters_pin = pin_dir.join(MAP_COUNTERS);
        check_pinned(&endpoints_pin, 4, size_of::<Endpoint>() as u32, None)?;
        check_pinned(
            &prefixes_pin,
            size_of::<Key<u32>>() as u32,
            size_of::<RawHop>() as u32,
            None,
        )?;
        check_pinned(&underlay_pin, 4, size_of::<RawUnderlay>() as u32, Some(1))?;
        check_pinned(&tunnels_pin, 4, size_of::<RawTunnel>() as u32, None)?;
        if let Err(e) = check_pinned(&counters_pin, 4, 8, Some(CTR_MAX)) {
            // Counters are statistics only: a build with more of them (an upgrade) starts a
            // fresh map instead of refusing to load. Programs still attached keep the old map
            // until the new ones are swapped in below.
            tracing::info!(error = %e, "replacing the pinned counters map");
            std::fs::remove_file(&counters_pin).map_err(|source| EbpfError::Io {
                op: "unpin stale counters",
                path: counters_pin.clone(),
                source,
            })?;
        }

        let mut ebpf = EbpfLoader::new()
            .map_pin_path(MAP_ENDPOINTS, endpoints_pin)
            .map_pin_path(MAP_PREFIXES, prefixes_pin)
            .map_pin_path(MAP_UNDERLAY, underlay_pin)
            .map_pin_path(MAP_TUNNELS, tunnels_pin)
            .map_pin_path(MAP_COUNTERS, counters_pin)
            .load(FASTPATH)
            .map_err(EbpfError::Load)?;
        for role in Role::ALL {
            program(&mut ebpf, role)?
                .load()
                .map_err(|source| EbpfError::Program {
                    name: role.program(),
                    source,
                })?;
        }
        let endpoints =
            HashMap::try_from(take_map(&mut ebpf, MAP_ENDPOINTS)?).map_err(|source| {
                EbpfError::Map {
                    name: MAP_ENDPOINTS,
                    source,
                }
            })?;
        let prefixes = LpmTrie::try_from(take_map(&mut ebpf, MAP_PREFIXES)?).map_err(|source| {
            EbpfError::Map {
                name: MAP_PREFIXES,
                source,
            }
        })?;
        let tunnels = HashMap::try_from(take_map(&mut ebpf, MAP_TUNNELS)?).map_err(|source| {
            EbpfError::Map {
                name: MAP_TUNNELS,
                source,
            }
        })?;
        let underlay = Array::try_from(take_map(&mut ebpf, MAP_UNDERLAY)?).map_err(|source| {
            EbpfError::Map {
                name: MAP_UNDERLAY,
                source,
            }
        })?;
        let counters =
            PerCpuArray::try_from(take_map(&mut ebpf, MAP_COUNTERS)?).map_err(|source| {
                EbpfError::Map {
                    name: MAP_COUNTERS,
                    source,
                }
            })?;
        let mut fp = FastPath {
            pin_dir: pin_dir.to_path_buf(),
            kind: mode.resolve(),
            ebpf,
            endpoints,
            prefixes,
            tunnels,
            underlay,
            counters,
        };
        let mut swapped = 0;
        for rec in attach::records(pin_dir)? {
            let name = ifname(rec.ifindex).ok();
            let prog = program(&mut fp.ebpf, rec.role)?;
            if attach::swap(prog, rec, name.as_deref(), pin_dir)? {
                swapped += 1;
            }
        }
        tracing::info!(pin_dir = %pin_dir.display(), swapped, attach = ?fp.kind, "eBPF fast path loaded");
        Ok(fp)
    }

    /// Whether a fast path was loaded with `pin_dir` before (by the overlay agent): its maps
    /// are pinned there. The host daemon, which attaches the jobs' veths, loads it only then.
    pub fn is_set_up(pin_dir: &Path) -> bool {
        pin_dir.join(MAP_ENDPOINTS).exists()
    }

    /// The pin directory this fast path lives in.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Attaches the program for `role` to tc ingress of `ifindex` (TCX link pinned, or netlink
    /// filter recorded). An interface that already has our program gets this process's program
    /// swapped in atomically; one that had the other role is switched over.
    pub fn attach(&mut self, ifindex: u32, role: Role) -> Result<(), EbpfError> {
        let name = ifname(ifindex)?;
        for rec in attach::records(&self.pin_dir)? {
            if rec.ifindex != ifindex {
                continue;
            }
            // Same role: swap in place, whatever the mechanism (no gap in coverage).
            if rec.role == role {
                let prog = program(&mut self.ebpf, role)?;
                if attach::swap(prog, rec, Some(&name), &self.pin_dir)? {
                    return Ok(());
                }
            } else {
                attach::remove(rec, Some(&name), &self.pin_dir)?;
            }
        }
        let rec = Record {
            ifindex,
            role,
            kind: self.kind,
        };
        let prog = program(&mut self.ebpf, role)?;
        attach::attach(prog, rec, &name, &self.pin_dir)?;
        tracing::debug!(ifindex, ifname = %name, ?role, attach = ?self.kind, "fast path attached");
        Ok(())
    }

    /// Detaches whatever this fast path attached to `ifindex` (no-op when nothing is attached,
    /// including when the interface is already gone).
    pub fn detach(&mut self, ifindex: u32) -> Result<(), EbpfError> {
        let name = ifname(ifindex).ok();
        for rec in attach::records(&self.pin_dir)? {
            if rec.ifindex == ifindex {
                attach::remove(rec, name.as_deref(), &self.pin_dir)?;
            }
        }
        Ok(())
    }

    /// Interfaces with an attachment recorded in this pin directory, with their role.
    pub fn attached(&self) -> Result<Vec<(u32, Role)>, EbpfError> {
        Ok(attach::records(&self.pin_dir)?
            .into_iter()
            .map(|r| (r.ifindex, r.role))
            .collect())
    }

    /// Adds or replaces the entry for a job on this host.
    pub fn upsert_endpoint(&mut self, ip: Ipv4Addr, ep: Endpoint) -> Result<(), EbpfError> {
        if ep.ifindex == 0 {
            return Err(EbpfError::ZeroIfindex);
        }
        self.endpoints
            .insert(be_word(ip), ep, 0)
            .map_err(|source| EbpfError::Map {
                name: MAP_ENDPOINTS,
                source,
            })
    }

    /// Removes a job's entry; traffic to it falls back to the kernel path. No-op when absent.
    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), EbpfError> {
        ignore_missing(self.endpoints.remove(&be_word(ip))).map_err(|source| EbpfError::Map {
            name: MAP_ENDPOINTS,
            source,
        })
    }

    /// The entry for `ip`, if any.
    pub fn endpoint(&self, ip: Ipv4Addr) -> Result<Option<Endpoint>, EbpfError> {
        match self.endpoints.get(&be_word(ip), 0) {
            Ok(ep) => Ok(Some(ep)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(EbpfError::Map {
                name: MAP_ENDPOINTS,
                source,
            }),
        }
    }

    /// All job addresses in the endpoint map (for reconciling against the agent's jobs).
    pub fn endpoint_ips(&self) -> Result<Vec<Ipv4Addr>, EbpfError> {
        self.endpoints
            .keys()
            .map(|k| k.map(|w| Ipv4Addr::from(w.to_ne_bytes())))
            .collect::<Result<_, _>>()
            .map_err(|source| EbpfError::Map {
                name: MAP_ENDPOINTS,
                source,
            })
    }

    /// Adds or replaces the route for a remote block. `net` must have no host bits set.
    pub fn upsert_prefix(&mut self, net: Ipv4Addr, len: u8, hop: Hop) -> Result<(), EbpfError> {
        let key = prefix_key(net, len)?;
        if hop.ifindex == 0 {
            return Err(EbpfError::ZeroIfindex);
        }
        self.prefixes
            .insert(&key, RawHop::from(hop), 0)
            .map_err(|source| EbpfError::Map {
                name: MAP_PREFIXES,
                source,
            })
    }

    /// Removes a remote block; its traffic falls back to the kernel path. No-op when absent.
    pub fn remove_prefix(&mut self, net: Ipv4Addr, len: u8) -> Result<(), EbpfError> {
        let key = prefix_key(net, len)?;
        ignore_missing(self.prefixes.remove(&key)).map_err(|source| EbpfError::Map {
            name: MAP_PREFIXES,
            source,
        })
    }

    /// Every remote block in the prefix map, as (network, prefix length, hop).
    pub fn prefixes(&self) -> Result<Vec<(Ipv4Addr, u8, Hop)>, EbpfError> {
        list_prefixes(&self.prefixes)
    }

    /// Adds or replaces the peer of a remote block, keyed by the block's [`Hop::next_hop`]:
    /// traffic to the block is then encapsulated in BPF (when [`FastPath::set_underlay`] gave
    /// an underlay device) instead of going through the VXLAN device.
    pub fn upsert_tunnel(&mut self, next_hop: Ipv4Addr, t: Tunnel) -> Result<(), EbpfError> {
        self.tunnels
            .insert(be_word(next_hop), RawTunnel::from(t), 0)
            .map_err(|source| EbpfError::Map {
                name: MAP_TUNNELS,
                source,
            })
    }

    /// Removes a block's peer; its traffic goes through the VXLAN device again. No-op when
    /// absent.
    pub fn remove_tunnel(&mut self, next_hop: Ipv4Addr) -> Result<(), EbpfError> {
        ignore_missing(self.tunnels.remove(&be_word(next_hop))).map_err(|source| EbpfError::Map {
            name: MAP_TUNNELS,
            source,
        })
    }

    /// Every tunnel entry, by next hop (for reconciling against the leases).
    pub fn tunnels(&self) -> Result<Vec<(Ipv4Addr, Tunnel)>, EbpfError> {
        self.tunnels
            .iter()
            .map(|r| r.map(|(k, v)| (Ipv4Addr::from(k.to_ne_bytes()), Tunnel::from(v))))
            .collect::<Result<_, _>>()
            .map_err(|source| EbpfError::Map {
                name: MAP_TUNNELS,
                source,
            })
    }

    /// Tells the underlay classifier ([`Role::Underlay`]) what this host's VXLAN packets look
    /// like; until this is set (or after [`FastPath::clear_underlay`]) it decapsulates nothing.
    pub fn set_underlay(&mut self, u: Underlay) -> Result<(), EbpfError> {
        if u.port == 0 || u.vni >= 1 << 24 {
            return Err(EbpfError::InvalidUnderlay {
                why: if u.port == 0 {
                    "UDP port 0"
                } else {
                    "VNI over 24 bits"
                },
            });
        }
        self.write_underlay(RawUnderlay::from(u))
    }

    /// Stops decapsulation on the underlay (VXLAN packets go the kernel way again).
    pub fn clear_underlay(&mut self) -> Result<(), EbpfError> {
        self.write_underlay(RawUnderlay::default())
    }

    /// What [`FastPath::set_underlay`] last set, if anything.
    pub fn underlay(&self) -> Result<Option<Underlay>, EbpfError> {
        self.underlay
            .get(&0, 0)
            .map(|raw| raw.get())
            .map_err(|source| EbpfError::Map {
                name: MAP_UNDERLAY,
                source,
            })
    }

    fn write_underlay(&mut self, raw: RawUnderlay) -> Result<(), EbpfError> {
        self.underlay
            .set(0, raw, 0)
            .map_err(|source| EbpfError::Map {
                name: MAP_UNDERLAY,
                source,
            })
    }

    /// Packet counters summed over CPUs (shared by every loader of this pin directory).
    pub fn counters(&self) -> Result<Counters, EbpfError> {
        let sum = |idx: u32| -> Result<u64, EbpfError> {
            let v = self
                .counters
                .get(&idx, 0)
                .map_err(|source| EbpfError::Map {
                    name: MAP_COUNTERS,
                    source,
                })?;
            Ok(v.iter().fold(0u64, |a, b| a.wrapping_add(*b)))
        };
        Ok(Counters {
            redirected_local: sum(CTR_LOCAL)?,
            redirected_remote: sum(CTR_REMOTE)?,
            decapsulated: sum(CTR_DECAP)?,
            decapsulated_gso: sum(CTR_DECAP_GSO)?,
            encapsulated: sum(CTR_ENCAP)?,
            passed: sum(CTR_PASSED)?,
        })
    }

    /// Detaches everything recorded and removes the maps and the pin directory (clean
    /// uninstall). Netlink filters are found by interface index in the calling thread's network
    /// namespace.
    pub fn unpin(self) -> Result<(), EbpfError> {
        for rec in attach::records(&self.pin_dir)? {
            let name = ifname(rec.ifindex).ok();
            attach::remove(rec, name.as_deref(), &self.pin_dir)?;
        }
        for name in [
            MAP_ENDPOINTS,
            MAP_PREFIXES,
            MAP_TUNNELS,
            MAP_UNDERLAY,
            MAP_COUNTERS,
        ] {
            let path = self.pin_dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(EbpfError::Io {
                        op: "unpin map",
                        path,
                        source,
                    })
                }
            }
        }
        let dir = self.pin_dir.clone();
        drop(self);
        std::fs::remove_dir(&dir).map_err(|source| EbpfError::Io {
            op: "remove pin directory",
            path: dir,
            source,
        })
    }
}

/// Detaches every attachment of `roles` recorded in `pin_dir` without loading anything (for an
/// agent started with the fast path off: the programs a previous agent attached to its devices
/// go, the jobs' attachments and the maps stay). A pin directory that does not exist is fine.
pub fn detach_roles(pin_dir: &Path, roles: &[Role]) -> Result<usize, EbpfError> {
    if !pin_dir.exists() {
        return Ok(0);
    }
    let mut n = 0;
    for rec in attach::records(pin_dir)? {
        if roles.contains(&rec.role) {
            let name = ifname(rec.ifindex).ok();
            attach::remove(rec, name.as_deref(), pin_dir)?;
            n += 1;
        }
    }
    Ok(n)
}

/// Removes `ip`'s entry from the endpoint map pinned in `pin_dir` without loading anything: for
/// a host daemon that does not load the fast path itself (off, or its load failed) while entries
/// an earlier run of it made are still there. A missing directory, map or entry is fine.
/// Returns whether an entry was removed.
pub fn remove_pinned_endpoint(pin_dir: &Path, ip: Ipv4Addr) -> Result<bool, EbpfError> {
    let path = pin_dir.join(MAP_ENDPOINTS);
    if !path.exists() {
        return Ok(false);
    }
    let map_err = |source| EbpfError::Map {
        name: MAP_ENDPOINTS,
        source,
    };
    check_pinned(&path, 4, size_of::<Endpoint>() as u32, None)?;
    let data = MapData::from_pin(&path).map_err(map_err)?;
    let map = aya::maps::Map::from_map_data(data).map_err(map_err)?;
    let mut endpoints: HashMap<MapData, u32, Endpoint> = HashMap::try_from(map).map_err(map_err)?;
    let key = be_word(ip);
    match endpoints.get(&key, 0) {
        Ok(_) => {}
        Err(MapError::KeyNotFound) => return Ok(false),
        Err(source) => return Err(map_err(source)),
    }
    ignore_missing(endpoints.remove(&key)).map_err(map_err)?;
    Ok(true)
}

/// Detaches whatever is recorded for `ifindex` in `pin_dir` without loading anything (what
/// [`FastPath::detach`] does, for a caller that has not loaded the fast path). A pin directory
/// that does not exist is fine. Returns how many attachments were removed.
pub fn detach_pinned(pin_dir: &Path, ifindex: u32) -> Result<usize, EbpfError> {
    if !pin_dir.exists() {
        return Ok(0);
    }
    let mut n = 0;
    for rec in attach::records(pin_dir)? {
        if rec.ifindex == ifindex {
            let name = ifname(rec.ifindex).ok();
            attach::remove(rec, name.as_deref(), pin_dir)?;
            n += 1;
        }
    }
    Ok(n)
}

/// Empties the pinned prefix and tunnel maps and clears the underlay settings in `pin_dir`,
/// without loading anything: for an agent started with the fast path off, whose previous run
/// filled them. Programs still attached (the jobs' veths, which belong to the host daemon) then
/// miss for every remote block and leave those packets to the kernel path; entries nobody keeps
/// up to date any more can no longer send them to a departed peer. The endpoint map (the host
/// daemon's) stays. Returns how many entries were removed; a missing directory or map is fine.
pub fn clear_routes(pin_dir: &Path) -> Result<usize, EbpfError> {
    let mut removed = 0;
    let pinned = |name: &'static str| -> Result<Option<aya::maps::Map>, EbpfError> {
        let path = pin_dir.join(name);
        if !path.exists() {
            return Ok(None);
        }
        let data = MapData::from_pin(&path).map_err(|source| EbpfError::Map { name, source })?;
        aya::maps::Map::from_map_data(data)
            .map(Some)
            .map_err(|source| EbpfError::Map { name, source })
    };
    let map_err = |name| move |source| EbpfError::Map { name, source };
    if let Some(map) = pinned(MAP_PREFIXES)? {
        let mut trie: LpmTrie<MapData, u32, RawHop> =
            LpmTrie::try_from(map).map_err(map_err(MAP_PREFIXES))?;
        let keys = trie
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(MAP_PREFIXES))?;
        for k in keys {
            ignore_missing(trie.remove(&k)).map_err(map_err(MAP_PREFIXES))?;
            removed += 1;
        }
    }
    if let Some(map) = pinned(MAP_TUNNELS)? {
        let mut tunnels: HashMap<MapData, u32, RawTunnel> =
            HashMap::try_from(map).map_err(map_err(MAP_TUNNELS))?;
        let keys = tunnels
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(MAP_TUNNELS))?;
        for k in keys {
            ignore_missing(tunnels.remove(&k)).map_err(map_err(MAP_TUNNELS))?;
            removed += 1;
        }
    }
    if let Some(map) = pinned(MAP_UNDERLAY)? {
        let mut underlay: Array<MapData, RawUnderlay> =
            Array::try_from(map).map_err(map_err(MAP_UNDERLAY))?;
        let cur = underlay.get(&0, 0).map_err(map_err(MAP_UNDERLAY))?;
        if cur != RawUnderlay::default() {
            underlay
                .set(0, RawUnderlay::default(), 0)
                .map_err(map_err(MAP_UNDERLAY))?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn list_prefixes(
    trie: &LpmTrie<MapData, u32, RawHop>,
) -> Result<Vec<(Ipv4Addr, u8, Hop)>, EbpfError> {
    trie.iter()
        .map(|r| {
            r.map(|(k, v)| {
                let len = u8::try_from(k.prefix_len()).unwrap_or(u8::MAX);
                (Ipv4Addr::from(k.data().to_ne_bytes()), len, Hop::from(v))
            })
        })
        .collect::<Result<_, _>>()
        .map_err(|source| EbpfError::Map {
            name: MAP_PREFIXES,
            source,
        })
}

fn program(ebpf: &mut Ebpf, role: Role) -> Result<&mut SchedClassifier, EbpfError> {
    let name = role.program();
    ebpf.program_mut(name)
        .ok_or(EbpfError::Missing { name })?
        .try_into()
        .map_err(|source| EbpfError::Program { name, source })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, EbpfError> {
    ebpf.take_map(name).ok_or(EbpfError::Missing { name })
}

/// Refuses to reuse a pinned map whose shape differs from this build's (an upgrade changed the
/// layout): updates would fail or, worse, be misread by the programs.
fn check_pinned(
    path: &Path,
    key_size: u32,
    value_size: u32,
    max_entries: Option<u32>,
) -> Result<(), EbpfError> {
    if !path.exists() {
        return Ok(());
    }
    let info = aya::maps::MapInfo::from_pin(path).map_err(|source| EbpfError::Map {
        name: "pinned",
        source,
    })?;
    let got = (info.key_size(), info.value_size());
    if got != (key_size, value_size) {
        return Err(EbpfError::IncompatiblePin {
            path: path.into(),
            what: format!("key/value size {got:?}, want {:?}", (key_size, value_size)),
        });
    }
    if let Some(max) = max_entries {
        if info.max_entries() != max {
            return Err(EbpfError::IncompatiblePin {
                path: path.into(),
                what: format!("{} entries, want {max}", info.max_entries()),
            });
        }
    }
    Ok(())
}

fn prefix_key(net: Ipv4Addr, len: u8) -> Result<Key<u32>, EbpfError> {
    if len > 32 {
        return Err(EbpfError::InvalidPrefix {
            net,
            len,
            why: "length over 32",
        });
    }
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    if u32::from(net) & !mask != 0 {
        return Err(EbpfError::InvalidPrefix {
            net,
            len,
            why: "host bits set",
        });
    }
    Ok(Key::new(u32::from(len), be_word(net)))
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(SyscallError { ref io_error, .. }))
            if io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        r => r,
    }
}

fn ifname(ifindex: u32) -> Result<String, EbpfError> {
    if ifindex == 0 {
        return Err(EbpfError::ZeroIfindex);
    }
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes as if_indextoname requires; it writes a NUL-terminated
    // name there or returns NULL.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(EbpfError::NoSuchInterface { ifindex });
    }
    // SAFETY: on success `buf` holds a NUL-terminated string.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_validated() {
        let net = Ipv4Addr::new(100, 100, 2, 0);
        assert!(prefix_key(net, 24).is_ok());
        assert!(prefix_key(Ipv4Addr::UNSPECIFIED, 0).is_ok());
        assert!(prefix_key(Ipv4Addr::new(100, 100, 2, 1), 32).is_ok());
        assert!(matches!(
            prefix_key(Ipv4Addr::new(100, 100, 2, 1), 24),
            Err(EbpfError::InvalidPrefix {
                why: "host bits set",
                ..
            })
        ));
        assert!(matches!(
            prefix_key(net, 33),
            Err(EbpfError::InvalidPrefix { .. })
        ));
    }

    #[test]
    fn kernels_before_5_12_are_refused() {
        // bpf_check_mtu came in 5.12.
        for (major, minor, patch) in [(4, 4, 0), (5, 10, 200), (5, 11, 22)] {
            let r = check_kernel(KernelVersion::new(major, minor, patch));
            assert!(
                matches!(r, Err(EbpfError::Unsupported { .. })),
                "{major}.{minor}.{patch}: {r:?}"
            );
        }
        for (major, minor, patch) in [(5, 12, 0), (5, 15, 1), (6, 18, 0)] {
            let r = check_kernel(KernelVersion::new(major, minor, patch));
            assert!(r.is_ok(), "{major}.{minor}.{patch}: {r:?}");
        }
    }

    /// A job's veth deleted between the listing of the attachment records and the swap
    /// (flynn-host tearing a job down while the loader starts) is gone, not a failure of the
    /// load, which would leave the host without the fast path for its lifetime.
    #[test]
    fn an_interface_gone_between_listing_and_swap_is_dropped() {
        let test = "an_interface_gone_between_listing_and_swap_is_dropped";
        if !flynn_netlab::should_run(test, &[("ip", "iproute2")]) {
            return;
        }
        FastPath::probe().expect("this kernel cannot run the fast path");
        for mode in [AttachMode::Netlink, AttachMode::Tcx] {
            let bpffs = flynn_netlab::Bpffs::mount("flynn-gone").unwrap();
            let mut lab = flynn_netlab::Lab::new("fgone");
            let host = lab.add_ns("h").unwrap();
            let job = lab.add_ns("j").unwrap();
            flynn_netlab::veth(&host, "vgone", None, &job, "eth0").unwrap();
            let pin_dir = bpffs.pin_dir("flynn");
            flynn_netlab::in_ns(&host, || {
                let index = flynn_netlab::ifindex(&host, "vgone")?;
                let mut fp = FastPath::load_with(&pin_dir, mode)?;
                fp.attach(index, Role::JobVeth)?;
                // What a load listed and looked up, before the veth went.
                let [rec] = attach::records(&pin_dir)?[..] else {
                    anyhow::bail!("records: {:?}", attach::records(&pin_dir)?);
                };
                let name = ifname(rec.ifindex)?;
                flynn_netlab::run(&["ip", "-n", &host, "link", "del", "vgone"])?;
                let prog = program(&mut fp.ebpf, rec.role)?;
                let swapped = attach::swap(prog, rec, Some(&name), &pin_dir);
                assert!(matches!(swapped, Ok(false)), "{mode:?}: {swapped:?}");
                assert!(
                    attach::records(&pin_dir)?.is_empty(),
                    "{mode:?}: record kept"
                );
                FastPath::load_with(&pin_dir, mode)?;
                Ok(())
            })
            .unwrap();
        }
    }

    #[test]
    fn unknown_interface_is_a_clear_error() {
        assert!(matches!(ifname(0), Err(EbpfError::ZeroIfindex)));
        assert!(matches!(
            ifname(u32::MAX - 7),
            Err(EbpfError::NoSuchInterface { .. })
        ));
        assert_eq!(ifname(1).unwrap(), "lo");
    }
}
