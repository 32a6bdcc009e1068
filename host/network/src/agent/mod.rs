//! [`Agent`]: the per-host overlay daemon loop (flanneld's role). It leases this host's block,
//! sets up the VXLAN device and bridge, and then keeps the kernel (and, when enabled, the eBPF fast
//! path's prefix map) in line with every lease: on each store event and on a timer. It renews the
//! lease before it expires and releases it on clean shutdown when the host daemon's allocator file
//! shows no job holding an address in the block (else, or without the file, it stays for the next
//! agent to renew, as after a crash); the next start asks for the same block again (remembered in
//! `subnet.env`, as flannel does).
//!
//! Here: the agent's configuration, errors and state; its methods are in `start` (start-up,
//! undoing a start, releasing the lease at shutdown), `run` (the loop: store events, resyncs,
//! renewals; keeping the devices and host routing in place), `sync` (reconciling the kernel
//! and the fast path with the leases), `fast_path` (attaching the eBPF fast path or falling
//! back to the kernel path) and `state` (`subnet.env`).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flynn_ebpf::FastPath;

use crate::direct::Segment;
use crate::fastmaps::MapSync;
use crate::kernel::KernelNetlink;
use crate::lease::{Config as LeaseConfig, Lease, LeaseError, Leaser};
use crate::reconcile::{DeviceConfig, Devices, NetlinkError};
use crate::stats::Stats;
use crate::store::{LeaseStore, StoreError};
use crate::subnet::Subnet;

mod fast_path;
mod run;
mod start;
mod state;
mod sync;

pub use fast_path::fast_path_off;

/// What the agent does and how often.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This host's underlay address: VXLAN packets are sent from and to it.
    pub public_ip: Ipv4Addr,
    pub devices: DeviceConfig,
    pub lease: LeaseConfig,
    /// Plain routes (no encapsulation) to peers on this host's own L2 segment.
    pub direct_routing: bool,
    /// Full reconcile interval, in addition to reconciling on every store event.
    pub resync: Duration,
    /// Where `subnet.env` (flannel's format) is written for the host daemon; none when `None`.
    /// The block it names is asked for again on the next start.
    pub state_dir: Option<PathBuf>,
    /// Whether a fast path that fails to attach stops [`Agent::start`] (`--fast-path on`). When
    /// `false` (`auto`) the agent logs a warning, turns the fast path off and runs the kernel
    /// path only.
    pub fast_path_required: bool,
    /// Masquerade traffic from the cluster network to the outside world (see [`crate::masq`]);
    /// `false` takes such rules out.
    pub ip_masq: bool,
    /// The host daemon's address allocator file ([`crate::job::IpAllocator`], flynn-host's
    /// `<state-dir>/job-ips.json`). A shutdown releases the lease only when the file exists
    /// and no job holds an address of the block in it (flynn-host's pooled namespaces do not
    /// count until a job takes one: [`crate::job::IpAllocator::job_block`]); a missing or
    /// unreadable file keeps the lease. `None` (no host daemon): always released.
    pub job_ips: Option<PathBuf>,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("lease")]
    Lease(#[from] LeaseError),
    #[error("lease store")]
    Store(#[from] StoreError),
    #[error("netlink")]
    Netlink(#[from] NetlinkError),
    #[error("eBPF fast path")]
    FastPath(#[from] flynn_ebpf::EbpfError),
    #[error("host networking")]
    Masq(#[from] crate::masq::MasqError),
    #[error("writing {path}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What [`Agent::start`] set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub lease: Lease,
    pub devices: Devices,
    /// Whether the eBPF fast path is in use.
    pub fast_path: bool,
}

/// The overlay agent of one host.
pub struct Agent<S> {
    leaser: Leaser<S>,
    nl: KernelNetlink,
    cfg: AgentConfig,
    fast: Option<FastPath>,
    lease: Option<Lease>,
    devices: Option<Devices>,
    segment: Option<Segment>,
    /// Keeps the fast path's routing maps in step with the leases.
    maps: MapSync,
    stats: Arc<Stats>,
    /// Whether the outbound NAT rules are in place as far as the agent knows (installed, and
    /// present at the last check); while false they are installed again every resync.
    masq_ok: bool,
    /// How current the lease set is: see [`Freshness`].
    fresh: Freshness,
    /// Set while [`Agent::start`] acquires: a start cut short there may have leased a block
    /// without learning it (see [`Agent::abandon_start`]).
    acquiring: bool,
    /// The block a start of this process leased anew (created, or took over), set before
    /// the write is sent ([`Leaser::acquire_noting`]); `None` when its starts only leased
    /// what this host held before: its lease found in the store (a previous run's, reused),
    /// or its previous block (named in `subnet.env`) leased again after a clean shutdown
    /// released it; the host's jobs may still hold addresses in either. What a start that
    /// gives up may release.
    created: Option<Subnet>,
    /// `subnet.env` as it was before this process first wrote it (`Some(None)`: there was
    /// none, or none that could be read); `None` until then. Put back when the block a
    /// start created is released before the start finished ([`Agent::release_start`]), so
    /// the next run does not take that block for the one its jobs may use.
    state_before: Option<Option<Vec<u8>>>,
    /// The overlay MTU ([`Devices::mtu`]): set by [`Agent::start`], changed when a resync
    /// follows a changed underlay MTU (see [`Agent::mtu`]).
    mtu: tokio::sync::watch::Sender<u32>,
}

/// How long releasing the lease of an abandoned start ([`Agent::abandon_start`]) may take.
pub const ABANDON_TIMEOUT: Duration = Duration::from_secs(5);

/// After the store comes back from an outage, leases are still judged as of its start for
/// this long: they all ran out on paper meanwhile, and their owners need a renewal round
/// (retried every 2 s) before they are current again.
const RECOVERY_GRACE: Duration = Duration::from_secs(10);

/// When the lease set was last read from the store, and whether reads fail now. Leases are
/// judged live or expired at [`Freshness::judge_at`], not simply now: while the store cannot
/// be reached, the peers' leases cannot be renewed either, and expiring them from a copy
/// that cannot be refreshed took every route to every peer down in an outage.
#[derive(Default)]
struct Freshness {
    /// The last successful read.
    last_ok: Option<SystemTime>,
    /// While reads fail: the last successful read before the first failure.
    stale_since: Option<SystemTime>,
    /// After an outage: its start, and until when it is still the time leases are judged at.
    recovering: Option<(SystemTime, SystemTime)>,
}

impl Freshness {
    fn read(&mut self, ok: bool, now: SystemTime) {
        if ok {
            if let Some(t) = self.stale_since.take() {
                self.recovering = Some((t, now + RECOVERY_GRACE));
            }
            self.last_ok = Some(now);
        } else if self.stale_since.is_none() {
            self.stale_since = Some(self.last_ok.unwrap_or(now));
        }
    }

    fn judge_at(&self, now: SystemTime) -> SystemTime {
        if let Some(t) = self.stale_since {
            return t;
        }
        match self.recovering {
            Some((t, until)) if now < until => t,
            _ => now,
        }
    }
}

impl<S: LeaseStore> Agent<S> {
    /// An agent using `store`, the kernel through `nl`, and the fast path when `fast` is given
    /// (already loaded; [`Agent::start`] attaches it to the VXLAN device).
    pub fn new(store: S, nl: KernelNetlink, cfg: AgentConfig, fast: Option<FastPath>) -> Agent<S> {
        let fast_on = fast.is_some();
        Agent {
            leaser: Leaser::new(store, cfg.lease.clone(), cfg.public_ip),
            nl,
            cfg,
            fast,
            lease: None,
            devices: None,
            segment: None,
            maps: MapSync::default(),
            masq_ok: false,
            fresh: Freshness::default(),
            acquiring: false,
            created: None,
            state_before: None,
            mtu: tokio::sync::watch::Sender::new(0),
            stats: Arc::new(Stats {
                fast_path: fast_on.into(),
                ..Stats::default()
            }),
        }
    }

    /// The overlay MTU, to follow: 0 until [`Agent::start`] set the devices up, then their
    /// [`Devices::mtu`], changed when a resync finds the underlay's MTU changed (the VXLAN
    /// device follows it, and so must the MTU the host daemon gives its jobs' routes).
    pub fn mtu(&self) -> tokio::sync::watch::Receiver<u32> {
        self.mtu.subscribe()
    }

    pub(super) fn set_mtu(&self, mtu: u32) {
        self.mtu
            .send_if_modified(|m| std::mem::replace(m, mtu) != mtu);
    }

    /// Counters for metrics and status, updated as the agent works.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The lease held, once started.
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }
}

/// `e` and its sources, joined with ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
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
    use super::state::previous_subnet;

    #[test]
    fn previous_subnet_is_read_from_subnet_env() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(previous_subnet(dir.path()), None);
        let env = dir.path().join("subnet.env");
        std::fs::write(
            &env,
            "FLANNEL_NETWORK=100.100.0.0/16\nFLANNEL_SUBNET=100.100.7.1/24\nFLANNEL_MTU=1450\n",
        )
        .unwrap();
        assert_eq!(
            previous_subnet(dir.path()),
            Some("100.100.7.0/24".parse().unwrap())
        );
        std::fs::write(&env, "FLANNEL_SUBNET=garbage\n").unwrap();
        assert_eq!(previous_subnet(dir.path()), None);
    }

    #[test]
    fn leases_are_judged_as_of_the_outage_until_a_renewal_round_after_it() {
        use super::{Freshness, RECOVERY_GRACE};
        use std::time::{Duration, UNIX_EPOCH};
        let t = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let mut f = Freshness::default();
        f.read(true, t(100));
        assert_eq!(f.judge_at(t(101)), t(101), "current while reads work");
        f.read(false, t(130));
        f.read(false, t(160));
        assert_eq!(f.judge_at(t(5000)), t(100), "as of the last good read");
        // Back: still the outage's start for a renewal round, then current again.
        f.read(true, t(6000));
        assert_eq!(f.judge_at(t(6001)), t(100));
        let after = t(6000) + RECOVERY_GRACE;
        assert_eq!(f.judge_at(after), after);
        f.read(true, t(7000));
        assert_eq!(f.judge_at(t(7000)), t(7000));
    }
}
