//! [`Agent`]: the per-host overlay daemon loop (flanneld's role). It leases this host's block,
//! sets up the VXLAN device and bridge, and then keeps the kernel (and, when enabled, the eBPF fast
//! path's prefix map) in line with every lease: on each store event and on a timer. It renews the
//! lease before it expires and releases it on clean shutdown when the host daemon's allocator file
//! shows no job holding an address in the block (else, or without the file, it stays for the next
//! agent to renew, as after a crash); the next start asks for the same block again (remembered in
//! `subnet.env`, as flannel does).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flynn_ebpf::{FastPath, Hop, Role, Tunnel, Underlay};

use crate::direct::{direct_routes, Segment};
use crate::fastmaps::{ordered_pass, FastPass, MapSync, PassError};
use crate::kernel::KernelNetlink;
use crate::lease::{Config as LeaseConfig, Lease, LeaseError, Leaser};
use crate::reconcile::{setup, DeviceConfig, Devices, NetlinkError};
use crate::stats::Stats;
use crate::store::{LeaseStore, LeaseWatch, Snapshot, StoreError};
use crate::subnet::Subnet;

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

    /// Leases a block (reusing this host's lease if the store has one, else the block named in
    /// `subnet.env` if it is free), sets up the VXLAN device and bridge, attaches the fast path
    /// and reconciles once. A reconcile that fails for some entries (say, the kernel refuses
    /// one peer's entry) does not fail the start: it is logged, the status says unhealthy,
    /// and the next pass tries again. One that fails as a whole (what is there could not be
    /// listed: the kernel's entries, the direct routes or the fast path's maps) does: no
    /// peer would be routed by it, and the agent would report ready all the same.
    pub async fn start(&mut self) -> Result<Started, AgentError> {
        let previous = self.cfg.state_dir.as_deref().and_then(previous_subnet);
        self.acquiring = true;
        let lease = self
            .leaser
            .acquire_noting(
                SystemTime::now(),
                previous,
                |n| fastrand::usize(..n),
                &mut self.created,
            )
            .await?;
        // Known from here on, for a shutdown before the start finishes (`abandon_start`).
        self.acquiring = false;
        self.lease = Some(lease.clone());
        if let Some(p) = previous.filter(|p| *p != lease.subnet) {
            tracing::warn!(previous = %p, subnet = %lease.subnet, "the previous block is taken; this host's block changed");
        }
        let mut nl = self.nl.clone();
        let devices = setup(&mut nl, &self.cfg.devices, &lease).await?;
        // The bridge may be new while jobs run (deleted while no agent ran).
        if let Err(e) = crate::job::adopt_job_veths(&self.nl, devices.bridge).await {
            tracing::warn!(error = %error_chain(&e), "cannot check the jobs' veths");
        }
        crate::masq::enable_forwarding()?;
        let network = self.cfg.lease.layout.network;
        let masq = if self.cfg.ip_masq {
            crate::masq::install(&network, self.cfg.devices.port)
        } else {
            crate::masq::remove()
        };
        // Jobs still reach each other without it: a warning, not a failed start.
        if let Err(e) = &masq {
            tracing::warn!(error = %e, ip_masq = self.cfg.ip_masq, "outbound NAT for jobs not set up");
        }
        self.masq_ok = masq.is_ok();
        let segment = self.nl.segment(self.cfg.public_ip).await?;
        self.segment = Some(segment);
        self.attach_or_fall_back(&lease, devices.vxlan, segment)?;
        self.devices = Some(devices);
        self.set_mtu(devices.mtu);
        self.write_state()?;
        let snap = self.leaser.store().leases().await?;
        self.fresh.read(true, SystemTime::now());
        // As in `run`: a change the kernel refuses (one peer's bad lease) is logged and tried
        // again every pass. It used to fail the start, and after the tries end the agent with
        // the host half set up. A pass that failed as a whole fails the start (tried again).
        self.sync_counted(&snap).await?;
        Ok(Started {
            lease,
            devices,
            fast_path: self.fast.is_some(),
        })
    }

    /// [`Agent::start`], tried up to `tries` times `pause` apart (the underlay device may not
    /// be up yet, discoverd may still be electing a leader). When the last try fails too, a
    /// lease the tries created is released (for at most [`ABANDON_TIMEOUT`]) before the error
    /// is returned: the agent exits then, and the lease used to stay live for its TTL (24 h
    /// by default), keeping the block from every other host. With it, `subnet.env` is put
    /// back as it was before the start (its previous block, or no file), so the next run
    /// does not ask for the released block as its own previous one (and, giving up too,
    /// keep it). What this host held before the start stays: its lease in the store (a
    /// previous run's, reused) or its previous block leased again after a clean shutdown
    /// released it. Its block may still hold this host's jobs, and releasing it took the
    /// peers' routes to them down and let another host lease it. A release that fails is
    /// logged; the start's error is the one returned.
    pub async fn start_retrying(
        &mut self,
        tries: u32,
        pause: Duration,
    ) -> Result<Started, AgentError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.start().await {
                Ok(s) => return Ok(s),
                Err(e) if attempt < tries => {
                    tracing::warn!(error = %error_chain(&e), attempt, "start failed; retrying");
                    tokio::time::sleep(pause).await;
                }
                Err(e) => {
                    tracing::error!(error = %error_chain(&e), attempt, "start failed; giving up");
                    match tokio::time::timeout(ABANDON_TIMEOUT, self.release_start(true)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(r)) => {
                            tracing::error!(error = %error_chain(&r), "releasing the lease after the failed start failed; it stays until it expires")
                        }
                        Err(_) => {
                            tracing::error!(timeout = ?ABANDON_TIMEOUT, "releasing the lease after the failed start got no answer; it may stay until it expires")
                        }
                    }
                    return Err(e);
                }
            }
        }
    }

    /// For a shutdown while [`Agent::start`] has not finished (cut short, or failing and
    /// retried): releases the lease it acquired, or, when it was cut short while acquiring
    /// (the write may have gone through, its answer lost), this host's lease in the store,
    /// as a clean shutdown of a running agent releases its lease. Without this a SIGTERM
    /// during start-up left the lease live for its whole TTL. A released block that the
    /// start created leaves `subnet.env` as it was before the start, as in
    /// [`Agent::start_retrying`]. The lease is forgotten only once released, so a release
    /// cut short (a SIGTERM during the give-up's release in [`Agent::start_retrying`]) is
    /// tried again by the next call.
    pub async fn abandon_start(&mut self) -> Result<(), AgentError> {
        self.release_start(false).await
    }

    /// [`Agent::abandon_start`]; with `only_created` (a start that gave up, not a shutdown)
    /// only a lease this process's starts created (its `created` block) is released, never
    /// what this host held before them. Once a created block is released, `subnet.env` is
    /// put back as it was before this process wrote it: the start never finished, so no job
    /// was given an address in that block, and naming it there made the next run lease it
    /// as this host's previous block, held before (kept when that run gave up too).
    async fn release_start(&mut self, only_created: bool) -> Result<(), AgentError> {
        // Cut short while acquiring, the store knows better than `self.lease`: that is an
        // earlier try's, and the lease it names may have vanished (deleted, taken over)
        // before this try wrote another, whose answer never came.
        let lease = match (&self.lease, self.acquiring) {
            (held, true) => match self.leaser.own().await {
                Ok(l) => l,
                Err(e) => match held {
                    Some(l) => Some(l.clone()),
                    None => return Err(e.into()),
                },
            },
            (held, false) => held.clone(),
        };
        if let Some(l) = &lease {
            if only_created && self.created != Some(l.subnet) {
                tracing::warn!(subnet = %l.subnet, "start-up given up; keeping this host's lease, held before this start (its jobs may still use the block)");
                return Ok(());
            }
            if self.jobs_hold(&l.subnet) {
                tracing::info!(subnet = %l.subnet, "start-up abandoned; keeping the lease: jobs hold addresses in the block");
                self.forget_start();
                return Ok(());
            }
            tracing::info!(subnet = %l.subnet, "start-up abandoned; releasing the lease");
            self.leaser.release(l, SystemTime::now()).await?;
            if self.created == Some(l.subnet) {
                self.restore_state();
            }
        }
        self.forget_start();
        Ok(())
    }

    fn forget_start(&mut self) {
        self.lease = None;
        self.acquiring = false;
        self.created = None;
        self.state_before = None;
    }

    /// Whether a job may hold an address in `subnet`, by the host daemon's allocator file
    /// ([`AgentConfig::job_ips`]; only jobs count, not flynn-host's pooled namespaces no job
    /// took). The host daemon keeps its jobs across restarts, so such a block must stay
    /// leased through an agent restart: released, peers dropped its routes until the next
    /// agent leased it again, and another host could lease it meanwhile. A file that is
    /// missing (a host daemon with another `--state-dir`, which `--job-ips` must follow) or
    /// cannot be read counts as "yes": the lease then stays, as after a crash, renewed by the
    /// next agent or expired after its TTL. A missing file used to read as "no job", which
    /// silently released the lease under any flynn-host whose state directory was not the
    /// default.
    fn jobs_hold(&self, subnet: &Subnet) -> bool {
        let Some(path) = &self.cfg.job_ips else {
            return false;
        };
        let taken = path.with_file_name(crate::job::JOB_NETNS_FILE);
        match crate::job::IpAllocator::job_block(path, &taken) {
            Ok(None) => false,
            Ok(Some(b)) => b.contains_subnet(subnet) || subnet.contains_subnet(&b),
            Err(crate::job::JobNetError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                tracing::warn!(path = %path.display(), "no host daemon allocator file (is --job-ips flynn-host's <state-dir>/job-ips.json?); jobs may hold addresses: keeping the lease");
                true
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %error_chain(&e), "cannot tell whether jobs hold addresses; keeping the lease");
                true
            }
        }
    }

    /// At a clean shutdown: releases `lease` unless jobs hold addresses in its block
    /// ([`Agent::jobs_hold`]); kept, it is renewed by the next agent (or expires after its
    /// TTL, as after a crash).
    async fn release_at_shutdown(&self, lease: &Lease) -> Result<(), AgentError> {
        if self.jobs_hold(&lease.subnet) {
            tracing::info!(subnet = %lease.subnet, "shutting down; keeping the lease: jobs hold addresses in the block");
            return Ok(());
        }
        tracing::info!(subnet = %lease.subnet, "shutting down; releasing the lease");
        self.leaser.release(lease, SystemTime::now()).await?;
        Ok(())
    }

    /// Puts `subnet.env` back as it was before this process wrote it (see
    /// [`Agent::state_before`]); a failure is logged.
    fn restore_state(&mut self) {
        let (Some(dir), Some(before)) = (&self.cfg.state_dir, self.state_before.take()) else {
            return;
        };
        let path = dir.join("subnet.env");
        let put_back = match &before {
            Some(body) => {
                let tmp = dir.join(".subnet.env.tmp");
                std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, &path))
            }
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                r => r,
            },
        };
        match put_back {
            Ok(()) => {
                tracing::info!(path = %path.display(), previous = before.is_some(), "state put back as it was before the start")
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot put the state back as it was before the start; the next start asks for the released block again")
            }
        }
    }

    /// The overlay MTU, to follow: 0 until [`Agent::start`] set the devices up, then their
    /// [`Devices::mtu`], changed when a resync finds the underlay's MTU changed (the VXLAN
    /// device follows it, and so must the MTU the host daemon gives its jobs' routes).
    pub fn mtu(&self) -> tokio::sync::watch::Receiver<u32> {
        self.mtu.subscribe()
    }

    fn set_mtu(&self, mtu: u32) {
        self.mtu
            .send_if_modified(|m| std::mem::replace(m, mtu) != mtu);
    }

    /// Makes the kernel and the fast path match `snap`. Returns the number of changes.
    pub async fn sync(&mut self, snap: &Snapshot) -> Result<usize, AgentError> {
        self.sync_pass(snap).await.map_err(|e| e.error)
    }

    /// [`Agent::sync`], telling a pass that failed as a whole from one that failed for
    /// some entries ([`PassError`]).
    async fn sync_pass(&mut self, snap: &Snapshot) -> Result<usize, PassError> {
        let (Some(lease), Some(devices), Some(segment)) = (&self.lease, self.devices, self.segment)
        else {
            return Ok(0);
        };
        // Judged as of the last read while the store is away (see `Freshness`).
        let now = self.fresh.judge_at(SystemTime::now());
        // Only blocks of the cluster network, of its block size, are routed: a corrupt or
        // foreign record (say `0.0.0.0-0`) must never become a route over the overlay.
        let layout = &self.cfg.lease.layout;
        let remote: Vec<&Lease> = snap
            .live(now)
            .filter(|l| l.subnet != lease.subnet)
            .filter(|l| {
                let ok = l.subnet.prefix_len() == layout.subnet_len
                    && layout.network.contains_subnet(&l.subnet);
                if !ok {
                    tracing::warn!(subnet = %l.subnet, "ignoring a lease outside the cluster network");
                }
                ok
            })
            .collect();
        let direct: BTreeSet<crate::reconcile::Route> = if self.cfg.direct_routing {
            direct_routes(&segment, &remote, lease.subnet.first_host())
        } else {
            BTreeSet::new()
        };
        let is_direct = |l: &Lease| direct.iter().any(|r| r.subnet == l.subnet);
        let tunneled: Vec<Lease> = remote
            .iter()
            .filter(|l| !is_direct(l))
            .map(|l| (*l).clone())
            .collect();
        // Peers encapsulated in BPF leave by the device holding the public IP; a peer the kernel
        // reaches by another device (the address on a dummy or `lo` of a routed host, a second
        // NIC) is encapsulated by the VXLAN device instead, which follows the routing table.
        let mut via_segment: BTreeSet<Ipv4Addr> = BTreeSet::new();
        if self.fast.is_some() {
            for l in &tunneled {
                match self.nl.egress_of(l.public_ip).await {
                    Ok(Some(i)) if i == segment.ifindex => {
                        via_segment.insert(l.public_ip);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(peer = %l.public_ip, error = %e, "no route lookup; encapsulated by the kernel")
                    }
                }
            }
        }
        let mut nl = self.nl.clone();
        let fast = self.fast.as_mut().map(|fp| {
            let (want, tunnels) =
                fast_wants(&tunneled, &via_segment, &direct, devices.vxlan, segment);
            FastPass {
                sync: &mut self.maps,
                maps: fp,
                want,
                tunnels,
            }
        });
        // Stale fast path entries, tunnel entries (whose removal takes the VXLAN route of a
        // block going direct before its direct route is added), direct routes, new fast path
        // entries. Each part runs even when an earlier one failed (a failure is for one peer's
        // entry; the others, and the fast path maps, must still follow the leases); the first
        // failure is returned at the end.
        let direct_routes = self.nl.sync_direct_routes_part(segment.ifindex, &direct);
        let pass = ordered_pass(
            &mut nl,
            devices.vxlan,
            &lease.subnet,
            &tunneled,
            now,
            direct_routes,
            fast,
        )
        .await;
        if self.fast.is_some() {
            if let Ok(out) = &pass.added {
                // A block the maps refuse (full: they hold 1024 entries) stays on the kernel
                // path and is reported in the status; the pass and the agent's health go on.
                self.stats.set_unmapped(out.unmapped.clone());
            }
        }
        let done = pass.changes()?;
        let (direct_changes, fast_changes) = (done.direct, done.fast);
        let changes = done.kernel + direct_changes + fast_changes;
        self.stats
            .peers
            .store(remote.len() as u64, Ordering::Relaxed);
        self.stats
            .changes
            .fetch_add(changes as u64, Ordering::Relaxed);
        if let Some(fp) = &self.fast {
            if let Ok(c) = fp.counters() {
                self.stats
                    .fast_local
                    .store(c.redirected_local, Ordering::Relaxed);
                self.stats
                    .fast_remote
                    .store(c.redirected_remote, Ordering::Relaxed);
                self.stats
                    .fast_decap
                    .store(c.decapsulated, Ordering::Relaxed);
                self.stats
                    .fast_decap_gso
                    .store(c.decapsulated_gso, Ordering::Relaxed);
                self.stats
                    .fast_encap
                    .store(c.encapsulated, Ordering::Relaxed);
                self.stats.fast_passed.store(c.passed, Ordering::Relaxed);
            }
        }
        if direct_changes + fast_changes > 0 {
            tracing::info!(direct_changes, fast_changes, "overlay routes updated");
        }
        Ok(changes)
    }

    /// Runs until `shutdown` completes (then releases the lease, unless jobs hold addresses in
    /// its block: `Agent::jobs_hold`) or the lease is lost (an error: the block may belong to
    /// another host now). Call after [`Agent::start`].
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        let mut watch: Option<LeaseWatch> = None;
        let mut tick = tokio::time::interval(self.cfg.resync);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renew_retry: Option<tokio::time::Instant> = None;
        loop {
            if watch.is_none() {
                match self.leaser.store().watch().await {
                    Ok(mut w) => {
                        let snap = w.current();
                        self.fresh.read(true, SystemTime::now());
                        if self.sync_logged(&snap).await {
                            renew_retry = Some(tokio::time::Instant::now());
                        }
                        watch = Some(w);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch leases; retrying");
                        self.fresh.read(false, SystemTime::now());
                    }
                }
            }
            let lease = self.lease.clone().expect("started");
            let renew_at = renew_retry.unwrap_or_else(|| {
                let wait = self
                    .leaser
                    .renew_at(&lease)
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tokio::time::Instant::now() + wait
            });
            let retry_watch = tokio::time::sleep(Duration::from_secs(1));
            tokio::select! {
                _ = &mut shutdown => {
                    self.release_at_shutdown(&lease).await?;
                    return Ok(());
                }
                snap = async { watch.as_mut().expect("checked").changed().await }, if watch.is_some() => {
                    match snap {
                        Some(s) => {
                            self.fresh.read(true, SystemTime::now());
                            if self.sync_logged(&s).await {
                                renew_retry = Some(tokio::time::Instant::now());
                            }
                        }
                        None => watch = None,
                    }
                }
                _ = retry_watch, if watch.is_none() => {}
                _ = tick.tick() => {
                    self.keep_host_routing();
                    self.keep_devices().await?;
                    match self.leaser.store().leases().await {
                        Ok(s) => {
                            self.fresh.read(true, SystemTime::now());
                            if self.sync_logged(&s).await {
                                renew_retry = Some(tokio::time::Instant::now());
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read leases; reconciling the last known set as it was then");
                            self.fresh.read(false, SystemTime::now());
                            if let Some(w) = &mut watch {
                                let s = w.current();
                                self.sync_logged(&s).await;
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(renew_at) => {
                    match self.leaser.renew(&lease, SystemTime::now()).await {
                        Ok(l) => {
                            tracing::debug!(subnet = %l.subnet, "lease renewed");
                            self.lease = Some(l);
                            renew_retry = None;
                            self.stats.renewals.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e @ LeaseError::Lost { .. }) => return Err(e.into()),
                        Err(e) => {
                            self.stats.renew_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(error = %e, "lease renewal failed; retrying");
                            renew_retry = Some(tokio::time::Instant::now() + Duration::from_secs(2));
                        }
                    }
                }
            }
        }
    }

    /// Attaches the fast path (if any) to `vxlan` and the underlay `segment`. On failure: an
    /// error when the fast path is required, else the kernel path alone (programs detached,
    /// maps emptied).
    fn attach_or_fall_back(
        &mut self,
        lease: &Lease,
        vxlan: u32,
        segment: Segment,
    ) -> Result<(), AgentError> {
        let Some(fp) = &mut self.fast else {
            return Ok(());
        };
        if let Err(e) = attach_fast_path(fp, &self.cfg, lease, vxlan, segment) {
            if self.cfg.fast_path_required {
                return Err(e.into());
            }
            tracing::warn!(error = %error_chain(&e), "cannot attach the eBPF fast path; kernel path only");
            let pin_dir = fp.pin_dir().to_path_buf();
            self.fast = None;
            self.stats.fast_path.store(false, Ordering::Relaxed);
            self.stats.set_unmapped(BTreeSet::new());
            fast_path_off(&pin_dir);
        }
        Ok(())
    }

    /// Puts the VXLAN device and the bridge back if they went, or follows them if they moved:
    /// the kernel deletes a VXLAN device together with its lower device (a bond or VLAN that
    /// network tooling re-creates), and every entry on it with it. On a change the fast path
    /// is attached to the new devices; the reconcile that follows on the same tick puts the
    /// neighbour, FDB and route entries back and rewrites the prefixes (their hops name the
    /// old devices).
    async fn keep_devices(&mut self) -> Result<(), AgentError> {
        let (Some(lease), Some(old), Some(old_segment)) =
            (self.lease.clone(), self.devices, self.segment)
        else {
            return Ok(());
        };
        // Set up again every time (it sets only what differs): a device set down, a lost
        // bridge address or a changed underlay MTU is repaired too.
        let mut nl = self.nl.clone();
        let (devices, segment) = match (
            setup(&mut nl, &self.cfg.devices, &lease).await,
            self.nl.segment(self.cfg.public_ip).await,
        ) {
            (Ok(d), Ok(s)) => (d, s),
            (Err(e), _) => {
                tracing::warn!(error = %error_chain(&e), "cannot check the overlay devices");
                return Ok(());
            }
            (_, Err(e)) => {
                tracing::warn!(error = %error_chain(&e), "cannot find the underlay device");
                return Ok(());
            }
        };
        // A bridge deleted and made again (a new index) has lost its ports: the jobs' veths
        // go back on it. Only then: flynn-host makes veths and attaches them itself.
        if devices.bridge != old.bridge {
            if let Err(e) = crate::job::adopt_job_veths(&self.nl, devices.bridge).await {
                tracing::warn!(error = %error_chain(&e), "cannot check the jobs' veths");
            }
        }
        if devices == old && segment == old_segment {
            return Ok(());
        }
        tracing::warn!(
            before = ?old,
            after = ?devices,
            underlay_before = ?old_segment,
            underlay_after = ?segment,
            "overlay devices changed; following them"
        );
        self.devices = Some(devices);
        self.segment = Some(segment);
        if let Some(fp) = &mut self.fast {
            for (was, now) in [
                (old.vxlan, devices.vxlan),
                (old_segment.ifindex, segment.ifindex),
            ] {
                if was != now {
                    // Gone with its device, or left on a device we no longer use.
                    let _ = fp.detach(was);
                }
            }
        }
        // As at start: the agent exits if the fast path is required (its supervisor starts it
        // again), else the kernel path alone rather than maps naming devices that are gone.
        self.attach_or_fall_back(&lease, devices.vxlan, segment)?;
        if devices.mtu != old.mtu {
            tracing::info!(before = old.mtu, after = devices.mtu, "overlay MTU changed");
            self.set_mtu(devices.mtu);
        }
        if let Err(e) = self.write_state() {
            tracing::warn!(error = %error_chain(&e), "cannot write the state file");
        }
        Ok(())
    }

    /// Puts IP forwarding and the outbound NAT table back if something took them away since
    /// the last check, and tries again to install the table if that failed so far (at start,
    /// for example while the nftables module was not loaded yet).
    fn keep_host_routing(&mut self) {
        if let Err(e) = crate::masq::enable_forwarding() {
            tracing::warn!(error = %e, "IP forwarding is off and cannot be turned on");
        }
        if !self.cfg.ip_masq {
            return;
        }
        if self.masq_ok {
            match crate::masq::present() {
                Ok(true) => return,
                Ok(false) => tracing::warn!(
                    table = crate::masq::TABLE,
                    "outbound NAT rules were removed; putting them back"
                ),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot list nftables tables");
                    return;
                }
            }
        }
        let network = self.cfg.lease.layout.network;
        match crate::masq::install(&network, self.cfg.devices.port) {
            Ok(()) if !self.masq_ok => {
                tracing::info!(table = crate::masq::TABLE, "outbound NAT for jobs set up");
                self.masq_ok = true;
            }
            Ok(()) => {}
            // Warned about once (at start, or when it went); tried again every resync.
            Err(e) if self.masq_ok => {
                tracing::warn!(error = %e, "cannot restore the outbound NAT rules");
                self.masq_ok = false;
            }
            Err(e) => tracing::debug!(error = %e, "outbound NAT for jobs still not set up"),
        }
    }

    /// [`Agent::sync`], logging a failure; true when `snap` no longer shows this host's
    /// lease as its own (deleted, or held by another host): the caller renews at once,
    /// which finds out whether it is lost, instead of at its renewal time, hours away.
    async fn sync_logged(&mut self, snap: &Snapshot) -> bool {
        let gone = self.lease.as_ref().is_some_and(|l| {
            !snap
                .leases
                .iter()
                .any(|s| s.subnet == l.subnet && s.public_ip == l.public_ip)
        });
        if gone {
            tracing::warn!("this host's lease is not in the lease set as its own; checking it now");
        }
        // Logged; the next pass tries again, whatever failed.
        let _ = self.sync_counted(snap).await;
        gone
    }

    /// [`Agent::sync`], counted in the stats; a failure (the status turns unhealthy until a
    /// pass succeeds) is logged, and the next pass tries again. The error of a pass that
    /// failed as a whole is returned ([`PassError::whole`]: [`Agent::start`] fails on it).
    async fn sync_counted(&mut self, snap: &Snapshot) -> Result<(), AgentError> {
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        match self.sync_pass(snap).await {
            Ok(_) => {
                self.stats.synced.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.stats.sync_errors.fetch_add(1, Ordering::Relaxed);
                self.stats.synced.store(false, Ordering::Relaxed);
                if e.whole {
                    tracing::warn!(error = %error_chain(&e.error), "reconcile failed as a whole; will retry");
                    return Err(e.error);
                }
                tracing::warn!(error = %error_chain(&e.error), "reconcile failed for some entries; will retry");
                Ok(())
            }
        }
    }

    /// Counters for metrics and status, updated as the agent works.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The lease held, once started.
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// Writes `subnet.env` (flannel's format: network, this host's first address and prefix, MTU).
    /// The first write notes what it replaces ([`Agent::state_before`]).
    fn write_state(&mut self) -> Result<(), AgentError> {
        let (Some(dir), Some(lease), Some(dev)) = (&self.cfg.state_dir, &self.lease, self.devices)
        else {
            return Ok(());
        };
        let path = dir.join("subnet.env");
        if self.state_before.is_none() {
            // A file that cannot be read names no previous block either (`previous_subnet`).
            self.state_before = Some(std::fs::read(&path).ok());
        }
        let body = format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ=false\n",
            self.cfg.lease.layout.network,
            lease.subnet.first_host(),
            lease.subnet.prefix_len(),
            dev.mtu
        );
        let err = |source| AgentError::State {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let tmp = dir.join(".subnet.env.tmp");
        std::fs::write(&tmp, body).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)?;
        Ok(())
    }
}

/// What the fast path's routing maps should hold: a prefix per remote block (hop: `vxlan`
/// and the block address, or the underlay and the peer for `direct` ones), and a tunnel entry
/// for the tunneled peers reached by the underlay device (`via_segment`: encapsulated in BPF,
/// and the only peers decapsulated in BPF), keyed like the hops.
fn fast_wants(
    tunneled: &[Lease],
    via_segment: &BTreeSet<Ipv4Addr>,
    direct: &BTreeSet<crate::reconcile::Route>,
    vxlan: u32,
    segment: Segment,
) -> (BTreeMap<Subnet, Hop>, BTreeMap<Ipv4Addr, Tunnel>) {
    let mut want: BTreeMap<Subnet, Hop> = tunneled
        .iter()
        .map(|l| {
            (
                l.subnet,
                Hop {
                    ifindex: vxlan,
                    next_hop: l.subnet.addr(),
                },
            )
        })
        .collect();
    want.extend(direct.iter().map(|r| {
        (
            r.subnet,
            Hop {
                ifindex: segment.ifindex,
                next_hop: r.gateway,
            },
        )
    }));
    let tunnels: BTreeMap<Ipv4Addr, Tunnel> = tunneled
        .iter()
        .filter(|l| via_segment.contains(&l.public_ip))
        .map(|l| {
            (
                l.subnet.addr(),
                Tunnel {
                    remote_ip: l.public_ip,
                    vtep_mac: l.vtep_mac.octets(),
                },
            )
        })
        .collect();
    (want, tunnels)
}

/// Attaches the agent's programs to the VXLAN device and the underlay device.
fn attach_fast_path(
    fp: &mut FastPath,
    cfg: &AgentConfig,
    lease: &Lease,
    vxlan: u32,
    segment: Segment,
) -> Result<(), flynn_ebpf::EbpfError> {
    fp.attach(vxlan, Role::Vxlan)?;
    // VXLAN in BPF on the device holding the public IP (the VXLAN device's lower device):
    // packets for our jobs are decapsulated there, and packets to peers with a tunnel entry (see
    // sync_fast_path) are encapsulated and leave by it. The settings go in before the program,
    // which decapsulates nothing without them.
    fp.set_underlay(Underlay {
        local_ip: cfg.public_ip,
        vni: cfg.devices.vni,
        port: cfg.devices.port,
        vtep_mac: lease.vtep_mac.octets(),
        ifindex: segment.ifindex,
    })?;
    fp.attach(segment.ifindex, Role::Underlay)
}

/// Leaves the kernel path alone in charge of the overlay when the fast path is off (by flag, or
/// because it failed to load or attach): detaches the programs a previous agent attached to its
/// devices (they outlive it by design) and empties the pinned prefix and tunnel maps and the
/// underlay settings, which nothing keeps up to date any more. The jobs' veths keep their
/// programs and the endpoint map (both the host daemon's); with those maps empty, every remote
/// destination misses and takes the kernel path. Best effort: failures are logged.
pub fn fast_path_off(pin_dir: &Path) {
    match flynn_ebpf::detach_roles(pin_dir, &[Role::Vxlan, Role::Underlay]) {
        Ok(0) => {}
        Ok(n) => tracing::info!(detached = n, "fast path off: device programs detached"),
        Err(e) => tracing::warn!(
            error = %error_chain(&e),
            "fast path off: could not detach a previous agent's programs"
        ),
    }
    match flynn_ebpf::clear_routes(pin_dir) {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "fast path off: stale map entries removed"),
        Err(e) => tracing::warn!(
            error = %error_chain(&e),
            "fast path off: could not empty the pinned prefix and tunnel maps"
        ),
    }
}

/// The block named in `dir/subnet.env` (`FLANNEL_SUBNET=<first address>/<len>`), if any.
fn previous_subnet(dir: &Path) -> Option<Subnet> {
    let body = std::fs::read_to_string(dir.join("subnet.env")).ok()?;
    let value = body
        .lines()
        .find_map(|l| l.trim().strip_prefix("FLANNEL_SUBNET="))?;
    let (ip, len) = value.trim().split_once('/')?;
    Some(Subnet::new(ip.parse().ok()?, len.parse().ok()?))
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
    use super::*;

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
