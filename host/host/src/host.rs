//! The job lifecycle: accepts jobs, starts them through the [`Runtime`], follows their
//! events, ships their output, registers their services in discoverd, stops them, and
//! keeps the job table persisted and published as events.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flynn_api::host::{
    ActiveJob, DiscoverdNotify, Event, EventKind, HostStatus, Job, JobStatus, LogStats,
    NetworkConfig, NetworkInfo,
};
use flynn_api::ApiError;
use flynn_client::discoverd::{self, Heartbeater, Instance};
use tokio::sync::broadcast;

use crate::job::{self, BoundPort, Exit, StopAction, Table};
use crate::logship::{now_rfc3339, Shipper, Source};
use crate::net::Network;
use crate::runtime::{
    BindMount, Handle, Launch, Limits, ProcEvent, Resizer, Runtime, RuntimeError, Signaller, Stdin,
};
use crate::store::Store;
use crate::volumes::{self, Volumes};
use crate::writeback::Ticket;

const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;

/// How long a stop (or a job's end) waits for discoverd to confirm that the job's instances
/// are gone before it goes on.
const DEREGISTER_WAIT: Duration = Duration::from_secs(2);

/// The `error` of a job stopped before its process existed (it ends as done).
const STOPPED_BEFORE_START: &str = "stopped before it started";

/// Runs `f` as a task of its own and waits for it: what follows a change of the job table
/// runs to its end even when the caller is dropped (an API handler whose client went away).
async fn to_completion<T: Send + 'static>(
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    match tokio::spawn(f).await {
        Ok(t) => t,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: the runtime is shutting down.
        Err(_) => std::future::pending().await,
    }
}

/// The event announcing a job's end with `status`: `error` for a job that could not start
/// (failed, spec §5.3), `stop` for one that ran and ended (done or crashed), whether its
/// end came with an exit status or not.
fn end_event(status: JobStatus) -> EventKind {
    if status == JobStatus::Failed {
        EventKind::Error
    } else {
        EventKind::Stop
    }
}

/// What the daemon was configured with.
pub struct Options {
    pub id: String,
    pub runtime: Arc<dyn Runtime>,
    pub store: Store,
    pub logs: Shipper,
    /// `--discoverd`, or what discoverd announced to a previous daemon.
    pub discoverd: Option<DiscoverdNotify>,
    /// The job network when it is configured at start-up (`--block`).
    pub network: Option<Network>,
    /// How to make the job network when `POST /host/network` brings the block
    /// (`--network-from-agent`).
    pub net_setup: Option<crate::net::Setup>,
    /// The address used for jobs without their own network namespace.
    pub external_ip: IpAddr,
    pub tags: BTreeMap<String, String>,
    /// Nameservers written to the `/etc/resolv.conf` of jobs with their own network.
    pub resolvers: Vec<IpAddr>,
    /// Where per-job files (resolv.conf) are kept.
    pub state_dir: PathBuf,
    /// Jobs allowed in `starting` at once; more are refused with 429 (0 = no limit).
    pub max_starting: usize,
    pub volumes: Volumes,
    /// Upstream nameservers the overlay agent reported before (from `network.json`).
    pub net_resolvers: Vec<String>,
    /// The overlay agent's job id from that notification.
    pub net_job_id: String,
    /// `network` is the block `network.json` saved before the machine's last reboot. The
    /// agent releases its lease at a clean shutdown and, with its state on tmpfs, has no
    /// record of the block after the reboot, so it may lease another one. No job survives a
    /// reboot: once [`Host::restore`] has removed what the lost jobs had, the network is set
    /// aside (retired, as for a move) and starting jobs wait for the block the agent
    /// reports, instead of taking addresses in a block it may no longer hold (which would
    /// then keep the host from moving to the agent's block while those jobs run).
    pub net_before_reboot: bool,
    /// TEST ONLY: exit the process right after a job's end is recorded and announced,
    /// before its network teardown (the window `restore` repairs).
    pub fault_exit_before_teardown: bool,
    /// TEST ONLY: time taken over each output line, so lines queue up between the runtime
    /// and the daemon (what a restart must not lose).
    pub fault_slow_output: std::time::Duration,
    /// The time limits of attach connections (shorter in tests).
    pub attach_limits: crate::attach::Limits,
}

/// Per-job control state of a job with a live process.
#[derive(Default)]
struct Ctl {
    signal: Option<Signaller>,
    /// The job's stdin (jobs created with `config.stdin` or `config.tty`), while its
    /// process lives.
    stdin: Option<Stdin>,
    /// Sets a TTY job's window size, while its process lives.
    resize: Option<Resizer>,
    /// What the job announces in discoverd, once it has started (or was adopted) and
    /// was not asked to stop meanwhile; kept so a discoverd that announces itself later
    /// (or moves) gets the job's instances too.
    announce: Option<Arc<Announce>>,
    /// Bumped when the job is registered anew with another discoverd, so a registration
    /// still in flight for the old one is not kept (it stops without deleting the instance,
    /// which the newer registration owns).
    generation: u64,
    heartbeaters: Vec<Heartbeater>,
    deregistered: bool,
    stop_timeout: Duration,
}

#[derive(Default)]
struct Inner {
    /// Every job's latest state, which the daemon acts on.
    table: Table,
    /// Every job's state as last recorded (written to its record, or its write tried and
    /// failed), with the number of its change: what the API shows ([`Host::get`],
    /// [`Host::list`], attach). A change is in `table` first and here once written, so
    /// nothing is shown before it is on disk.
    recorded: HashMap<String, (u64, ActiveJob)>,
    /// Changes queued for the records so far (their numbers).
    changes: u64,
    ctl: HashMap<String, Ctl>,
    /// Jobs left running at start-up because their records cannot be read.
    kept: job::Kept,
}

/// A job's new state, queued for its record under the table lock ([`Host::record`]) and
/// shown and announced once written ([`Host::settle`]).
struct Change {
    seq: u64,
    job: ActiveJob,
    ticket: Ticket,
}

pub struct Host {
    pub id: String,
    url: Mutex<String>,
    runtime: Arc<dyn Runtime>,
    store: Store,
    logs: Shipper,
    /// Where discoverd is: `--discoverd`, or what discoverd's own `POST /host/discoverd`
    /// said (kept in `discoverd.json`).
    discoverd: Mutex<Option<DiscoverdConn>>,
    /// Set at start-up from `--block` or `network.json`, or by `POST /host/network`;
    /// replaced when the agent hands out another block while no job holds an address.
    network: std::sync::RwLock<Option<Network>>,
    net_setup: Option<crate::net::Setup>,
    /// `true` once `network` is set (starting jobs wait on it).
    net_ready: tokio::sync::watch::Sender<bool>,
    /// Serializes `POST /host/network`.
    pub(crate) net_config: tokio::sync::Mutex<()>,
    /// Upstream nameservers reported by the overlay agent.
    net_resolvers: Mutex<Vec<String>>,
    /// The job that configured the network (`POST /host/network`'s `job_id`).
    net_job_id: Mutex<String>,
    /// [`Options::net_before_reboot`], until `restore` has acted on it.
    net_before_reboot: AtomicBool,
    external_ip: IpAddr,
    resolvers: Vec<IpAddr>,
    state_dir: PathBuf,
    max_starting: usize,
    volumes: Volumes,
    fault_exit_before_teardown: bool,
    fault_slow_output: std::time::Duration,
    tags: Mutex<BTreeMap<String, String>>,
    inner: Mutex<Inner>,
    events: broadcast::Sender<Event>,
    shutting_down: AtomicBool,
    /// Bumped by every stop request, so a start waiting (for the network) sees it.
    stops: tokio::sync::watch::Sender<u64>,
    /// This host's own registration in discoverd (service `flynn-host`).
    self_registration: tokio::sync::Mutex<Option<Heartbeater>>,
    /// Clients attached to jobs (`POST /attach`).
    attach: Arc<crate::attach::Attachments>,
}

/// discoverd's address and a client for it.
struct DiscoverdConn {
    /// The job running it, as it said.
    job_id: String,
    url: String,
    /// Its DNS address (`ip:port`), when it announced one.
    dns: String,
    client: discoverd::Client,
}

impl DiscoverdConn {
    fn new(n: &DiscoverdNotify) -> DiscoverdConn {
        DiscoverdConn {
            job_id: n.job_id.clone(),
            url: n.url.clone(),
            dns: n.dns.clone(),
            client: discoverd::Client::new(&n.url),
        }
    }
}

/// How long a starting job waits for `POST /host/network` under `--network-from-agent`.
pub const NETWORK_WAIT: Duration = Duration::from_secs(60);

/// The discoverd service hosts register in.
pub const HOST_SERVICE: &str = "flynn-host";

impl Host {
    pub fn new(o: Options) -> Arc<Host> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Host {
            id: o.id,
            url: Mutex::new(String::new()),
            runtime: o.runtime,
            store: o.store,
            logs: o.logs,
            discoverd: Mutex::new(o.discoverd.as_ref().map(DiscoverdConn::new)),
            net_ready: tokio::sync::watch::Sender::new(o.network.is_some()),
            network: std::sync::RwLock::new(o.network),
            net_setup: o.net_setup,
            net_config: tokio::sync::Mutex::new(()),
            net_resolvers: Mutex::new(o.net_resolvers),
            net_job_id: Mutex::new(o.net_job_id),
            net_before_reboot: AtomicBool::new(o.net_before_reboot),
            external_ip: o.external_ip,
            resolvers: o.resolvers,
            max_starting: o.max_starting,
            state_dir: o.state_dir,
            volumes: o.volumes,
            fault_exit_before_teardown: o.fault_exit_before_teardown,
            fault_slow_output: o.fault_slow_output,
            tags: Mutex::new(o.tags),
            inner: Mutex::new(Inner::default()),
            events,
            shutting_down: AtomicBool::new(false),
            stops: tokio::sync::watch::Sender::new(0),
            self_registration: tokio::sync::Mutex::new(None),
            attach: Arc::new(crate::attach::Attachments::new(o.attach_limits)),
        })
    }

    /// Waits until every job record change so far is on disk, trying the failed ones once
    /// more (shutdown); false when some could not be written.
    pub async fn flush_records(&self) -> bool {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.flush())
            .await
            .unwrap_or(false)
    }

    /// Attaches a client to a job (`POST /attach`); the connection is then served by
    /// [`crate::attach::serve`]. A job not created yet (Flynn's controller attaches before
    /// it adds the job) is waited for: the client gets its output from the start, and what
    /// it asked for is checked once the job is created ([`crate::attach::Attachments::created`]).
    /// `source`: the address the client connected from (waiting clients are bounded per
    /// address).
    pub fn attach(
        &self,
        req: &flynn_api::attach::AttachRequest,
        source: Option<std::net::IpAddr>,
    ) -> Result<crate::attach::Subscription, ApiError> {
        let size = crate::attach::window_size(req.height, req.width);
        let job = {
            // Under the table lock, as `added` shows a new job and calls `created`: a job
            // not shown yet finds this client among those waiting for it.
            let inner = self.lock();
            match inner.recorded.get(&req.job_id) {
                Some((_, j)) => j.clone(),
                // An id no job can have is not waited for.
                None if !job::valid_id(&req.job_id)
                    || flynn_container::reserved_id(&req.job_id) =>
                {
                    return Err(ApiError::object_not_found("host: unknown job"));
                }
                None => {
                    crate::attach::check_flags(req.flags, true)?;
                    return self
                        .attach
                        .subscribe_pending(&req.job_id, req.flags, size, source);
                }
            }
        };
        let config = &job.job.config;
        crate::attach::check_flags(req.flags, config.stdin || config.tty)?;
        let size = size.filter(|_| config.tty);
        self.attach.subscribe(&req.job_id, config.disable_log, size)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_url(&self, url: String) {
        *self.url.lock().unwrap_or_else(|e| e.into_inner()) = url;
    }

    pub fn needs_image(&self) -> bool {
        self.runtime.needs_image()
    }

    pub fn volumes(&self) -> &Volumes {
        &self.volumes
    }

    /// `DELETE /storage/volumes/:id`: 409 while a starting or running job binds it. The
    /// volume is taken out of service under the job table's lock (in memory: no job can
    /// take it after the check), its directory renamed and removed without any lock.
    pub async fn delete_volume(&self, id: &str) -> Result<(), ApiError> {
        let detached = {
            let inner = self.lock();
            if let Some(job) = volumes::holder(&inner.table, &inner.kept, id, "") {
                return Err(ApiError::conflict(format!(
                    "volume {id} is in use by job {job}"
                )));
            }
            self.volumes.detach(id)
        };
        let detached = detached.ok_or_else(|| ApiError::object_not_found("volume not found"))?;
        let vols = self.volumes.clone();
        // Finished even if the request is dropped meanwhile.
        match tokio::task::spawn_blocking(move || vols.delete(detached)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::error!(volume = %id, error = ?e, "deleting volume failed");
                Err(ApiError::unknown())
            }
            Err(_) => Err(ApiError::unknown()),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Lets the runtime prepare for the next job start.
    pub fn warm(&self) {
        self.runtime.warm();
    }

    /// A start is over (running or failed): replace the spare shim and pooled namespace it
    /// may have used, in the background.
    fn prepare_next(&self) {
        self.runtime.prepare();
        if let Some(n) = self.network() {
            n.fill_pool();
        }
    }

    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// The job network, once configured.
    pub fn network(&self) -> Option<Network> {
        self.network
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_network(&self, n: Option<Network>) {
        *self.network.write().unwrap_or_else(|e| e.into_inner()) = n;
    }

    /// Whether job `id` was asked to stop.
    fn stop_requested(&self, id: &str) -> bool {
        self.lock().table.get(id).is_some_and(|j| j.force_stop)
    }

    /// The job network, if this host has one. Under `--network-from-agent` a start of job
    /// `id` waits up to [`NETWORK_WAIT`] for `POST /host/network`, or until the job is
    /// asked to stop.
    async fn wait_network(&self, id: &str) -> Result<Option<Network>, String> {
        if let Some(n) = self.network() {
            return Ok(Some(n));
        }
        if self.net_setup.is_none() {
            return Ok(None);
        }
        let mut ready = self.net_ready.subscribe();
        // Subscribed before the job's flag is read: a stop after the read wakes the wait.
        let mut stops = self.stops.subscribe();
        let came = tokio::time::timeout(NETWORK_WAIT, async {
            loop {
                if self.stop_requested(id) {
                    return false;
                }
                tokio::select! {
                    r = ready.wait_for(|r| *r) => return r.is_ok(),
                    r = stops.changed() => if r.is_err() { return false },
                }
            }
        })
        .await
        .unwrap_or(false);
        match self.network() {
            Some(n) if came => Ok(Some(n)),
            _ if self.stop_requested(id) => Err(STOPPED_BEFORE_START.into()),
            _ => Err(format!(
                "host: no network after {} s (waiting for POST /host/network from the overlay agent)",
                NETWORK_WAIT.as_secs()
            )),
        }
    }

    /// `POST /host/network`: the overlay agent hands this host its block. The first one
    /// makes the bridge and the allocator; the same block again only updates the
    /// resolvers. Another block (or MTU) replaces the network when no job holds an address
    /// in it: the agent lost this host's lease (down past its TTL, the block taken) and
    /// leased another, and keeping the old block would give jobs addresses another host
    /// now routes. While jobs hold addresses it is refused (409, `retry: true`: the agent
    /// offers it again until the jobs are gone).
    pub async fn configure_network(&self, cfg: &NetworkConfig) -> Result<NetworkInfo, ApiError> {
        let default_mtu = match (&self.net_setup, self.network()) {
            (Some(s), _) => s.mtu,
            (None, Some(n)) => n.info().mtu,
            (None, None) => 1500,
        };
        let (block, mtu, resolvers) = crate::net::parse_config(cfg, default_mtu)?;
        let _one_at_a_time = self.net_config.lock().await;
        match (self.network(), &self.net_setup) {
            (Some(n), setup) => {
                let info = n.info();
                if info.subnet != block.to_string() || info.mtu != mtu {
                    let refuse = |why: String| {
                        ApiError::conflict(format!(
                            "host: network already configured for {} (mtu {}): {why}",
                            info.subnet, info.mtu
                        ))
                    };
                    let Some(setup) = setup else {
                        return Err(refuse("set by --block".into()));
                    };
                    if let Err(e) = self.set_aside(&n).await {
                        // Retryable: the agent keeps offering the block, and the host
                        // moves once its jobs are gone.
                        return Err(refuse(e).with_retry(true));
                    }
                    // The old one is out of service from here on, whatever happens next:
                    // when the new one cannot be made, the agent's retry (it gets a 500)
                    // finds no network and makes it.
                    self.open_network(setup, block, mtu).await?;
                    tracing::warn!(old = %info.subnet, %block, mtu, "job network moved to another block");
                }
            }
            (None, None) => {
                return Err(ApiError::conflict(
                    "host: jobs on this host have no network of their own (--no-network or the process runtime)",
                ));
            }
            (None, Some(setup)) => {
                self.open_network(setup, block, mtu).await?;
                tracing::info!(%block, mtu, job = %cfg.job_id, "job network configured by the overlay agent");
            }
        }
        // Jobs waiting for the network go on as soon as it exists, even if it cannot be
        // saved below (that failure is answered, so the agent sends it again).
        *self.net_resolvers.lock().unwrap_or_else(|e| e.into_inner()) = resolvers.clone();
        *self.net_job_id.lock().unwrap_or_else(|e| e.into_inner()) = cfg.job_id.clone();
        self.net_ready.send_replace(true);
        if let Some(setup) = &self.net_setup {
            setup
                .save(block, mtu, &resolvers, &cfg.job_id)
                .map_err(|e| {
                    tracing::warn!(error = %e, "saving network.json failed");
                    ApiError::unknown()
                })?;
        }
        Ok(self.status().network.unwrap_or_default())
    }

    /// Takes network `n` out of service and retires it ([`Network::retire`]), under
    /// `net_config`. Jobs starting meanwhile wait for the next network instead of taking
    /// this one. When it cannot be retired (jobs hold addresses in it) it is put back.
    async fn set_aside(&self, n: &Network) -> Result<(), String> {
        self.net_ready.send_replace(false);
        self.set_network(None);
        if let Err(e) = n.retire().await {
            self.set_network(Some(n.clone()));
            self.net_ready.send_replace(true);
            return Err(e);
        }
        Ok(())
    }

    /// [`Options::net_before_reboot`]: sets the saved network aside until the agent
    /// reports its block (`POST /host/network` then makes the network for it, the same
    /// block or another).
    async fn await_agent_block(&self) {
        if !self.net_before_reboot.swap(false, Ordering::SeqCst) {
            return;
        }
        let _one_at_a_time = self.net_config.lock().await;
        let Some(n) = self.network() else { return };
        match self.set_aside(&n).await {
            Ok(()) => {
                tracing::info!(block = %n.info().subnet, "rebooted since the overlay agent reported this block; jobs wait for the block it reports now")
            }
            Err(e) => {
                tracing::warn!(block = %n.info().subnet, error = %e, "rebooted since the overlay agent reported this block, but it cannot be set aside; keeping it")
            }
        }
    }

    /// Makes the job network for `block` (bridge, allocator), puts it in service and starts
    /// filling its namespace pool.
    async fn open_network(
        &self,
        setup: &crate::net::Setup,
        block: flynn_network::Subnet,
        mtu: u32,
    ) -> Result<(), ApiError> {
        let n = setup.open(block, mtu).await.map_err(|e| {
            tracing::warn!(%block, error = %format!("{e:#}"), "configuring the job network failed");
            ApiError::unknown()
        })?;
        self.set_network(Some(n.clone()));
        n.fill_pool();
        Ok(())
    }

    /// Queues a job's new state for its record (under the table lock, `inner`, so records
    /// are written in the order of the table's changes and a newer state is never written
    /// over by an older). Nothing is written here: the store's writer thread does it, off
    /// the lock and the runtime, and [`Host::settle`] waits for it.
    fn record(&self, inner: &mut Inner, job: &ActiveJob) -> Change {
        inner.changes += 1;
        Change {
            seq: inner.changes,
            job: job.clone(),
            ticket: self.store.save(job),
        }
    }

    /// Waits (without the table lock) until a change is written, then shows it and
    /// publishes `kind`: a restarted daemon finds every state the API or an event reported.
    /// A write that fails is logged and announced anyway, as before, and the store tries
    /// it again (1–10 s apart) until it works or the job's next change replaces it, so the
    /// record catches up.
    async fn settle(&self, c: Change, kind: Option<EventKind>) {
        if let Err(e) = c.ticket.wait().await {
            tracing::error!(job = %c.job.job.id, error = ?e, "persisting job state failed; trying again");
        }
        let mut inner = self.lock();
        Self::show(&mut inner, c.seq, &c.job);
        if let Some(kind) = kind {
            self.broadcast(kind, &c.job);
        }
    }

    /// Makes change `seq` (`job`) what the API shows, unless a newer change is shown
    /// already (changes of one job settle in different tasks: a stop and the job's end) or
    /// the job left the table.
    fn show(inner: &mut Inner, seq: u64, job: &ActiveJob) {
        let id = &job.job.id;
        if inner.table.get(id).is_none() {
            return;
        }
        if inner.recorded.get(id).is_none_or(|(s, _)| *s < seq) {
            inner.recorded.insert(id.clone(), (seq, job.clone()));
        }
    }

    /// Publishes a transition already recorded (under the table lock, so a reader of the
    /// shown state that subscribed first misses nothing).
    fn broadcast(&self, kind: EventKind, job: &ActiveJob) {
        let _ = self.events.send(Event {
            event: kind,
            job_id: job.job.id.clone(),
            job: job.clone(),
        });
        // However the job ended (exited, failed to start, stopped before it started), its
        // attached clients learn it here, after the table has it.
        if job.status.is_terminal() {
            self.attach.ended(job);
        }
    }

    /// Job `id` as last recorded (what the API reports).
    pub fn get(&self, id: &str) -> Option<ActiveJob> {
        self.lock().recorded.get(id).map(|(_, j)| j.clone())
    }

    /// Job `id`'s latest state, which may still be being written.
    fn current(&self, id: &str) -> Option<ActiveJob> {
        self.lock().table.get(id).cloned()
    }

    /// Every job as last recorded (`active`: those not ended).
    pub fn list(&self, active: bool) -> BTreeMap<String, ActiveJob> {
        self.lock()
            .recorded
            .values()
            .map(|(_, j)| j)
            .filter(|j| !active || !j.status.is_terminal())
            .map(|j| (j.job.id.clone(), j.clone()))
            .collect()
    }

    pub fn log_stats(&self) -> LogStats {
        self.logs.stats()
    }

    pub fn status(&self) -> HostStatus {
        let mut jobs: BTreeMap<String, u64> = BTreeMap::new();
        for (_, j) in self.lock().recorded.values() {
            *jobs.entry(j.status.as_str().to_string()).or_default() += 1;
        }
        HostStatus {
            id: self.id.clone(),
            tags: self.tags.lock().map(|t| t.clone()).unwrap_or_default(),
            pid: std::process::id(),
            url: self.url.lock().map(|u| u.clone()).unwrap_or_default(),
            discoverd: self
                .discoverd()
                .as_ref()
                .map(|d| flynn_api::host::DiscoverdInfo {
                    job_id: d.job_id.clone(),
                    url: d.url.clone(),
                    dns: d.dns.clone(),
                }),
            network: self.network().map(|n| {
                let mut info = n.info();
                info.resolvers = self
                    .net_resolvers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                info.job_id = self
                    .net_job_id
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                info
            }),
            version: env!("CARGO_PKG_VERSION").to_string(),
            log: self.logs.stats(),
            jobs,
        }
    }

    fn discoverd(&self) -> std::sync::MutexGuard<'_, Option<DiscoverdConn>> {
        self.discoverd.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn discoverd_client(&self) -> Option<discoverd::Client> {
        self.discoverd().as_ref().map(|d| d.client.clone())
    }

    fn discoverd_url(&self) -> Option<String> {
        self.discoverd().as_ref().map(|d| d.url.clone())
    }

    /// `POST /host/discoverd`: discoverd tells the host where it listens (its `--notify`).
    /// Jobs started from now on get `DISCOVERD` and register there, and the host
    /// (re-)registers itself. Kept in `discoverd.json` for a restarted daemon.
    pub fn set_discoverd(self: &Arc<Self>, n: &DiscoverdNotify) -> Result<(), ApiError> {
        let url = n.url.trim_end_matches('/').to_string();
        if flynn_client::http_base(&url).as_ref() != Some(&url) {
            return Err(ApiError::validation(
                Some("url"),
                "must be discoverd's http:// URL, e.g. http://10.0.0.1:1111",
            ));
        }
        if !n.dns.is_empty() && n.dns.parse::<std::net::SocketAddr>().is_err() {
            return Err(ApiError::validation(Some("dns"), "must be ip:port"));
        }
        let n = DiscoverdNotify {
            url: url.clone(),
            ..n.clone()
        };
        let bytes = serde_json::to_vec(&n).unwrap_or_default();
        let path = self.state_dir.join("discoverd.json");
        self.store.syncer().write(&path, &bytes).map_err(|e| {
            tracing::warn!(error = %e, "saving discoverd.json failed");
            ApiError::unknown()
        })?;
        let changed = {
            let mut d = self.discoverd();
            let changed = d.as_ref().is_none_or(|d| d.url != url);
            match d.as_mut() {
                Some(d) if !changed => {
                    d.dns = n.dns.clone();
                    d.job_id = n.job_id.clone();
                }
                _ => *d = Some(DiscoverdConn::new(&n)),
            }
            changed
        };
        if changed {
            tracing::info!(%url, job = %n.job_id, "discoverd announced itself");
            self.reannounce_jobs();
            let host = self.clone();
            tokio::spawn(async move { host.register_host().await });
        }
        Ok(())
    }

    /// The discoverd a previous daemon was told about (`discoverd.json`), if any.
    pub fn load_discoverd(state_dir: &std::path::Path) -> Option<DiscoverdNotify> {
        let bytes = std::fs::read(state_dir.join("discoverd.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Replaces the tags and re-registers the host with them.
    pub fn set_tags(self: &Arc<Self>, tags: BTreeMap<String, String>) {
        *self.tags.lock().unwrap_or_else(|e| e.into_inner()) = tags;
        let host = self.clone();
        tokio::spawn(async move { host.register_host().await });
    }

    /// Registers (or re-registers) this host in discoverd's `flynn-host` service with
    /// meta `id` and `tag:<key>` per tag, heartbeating until replaced. The address is the
    /// API's port on the external IP. No-op without `--discoverd`.
    pub async fn register_host(&self) {
        let Some(client) = self.discoverd_client() else {
            return;
        };
        // One registration at a time; the new one replaces the old (same instance id).
        // The tags are read under it, so the registration made last carries the newest
        // tags (read before it, a slower update's older tags could be registered last).
        let mut slot = self.self_registration.lock().await;
        let port = self
            .url
            .lock()
            .map(|u| u.rsplit(':').next().unwrap_or("").to_string())
            .unwrap_or_default();
        let mut meta: BTreeMap<String, String> = self
            .tags
            .lock()
            .map(|t| {
                t.iter()
                    .map(|(k, v)| (format!("tag:{k}"), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        meta.insert("id".into(), self.id.clone());
        let inst = Instance {
            // `SocketAddr` brackets an IPv6 address (`[fd00::1]:1113`), as discoverd
            // requires (Go's `net.SplitHostPort`).
            addr: format_host_port(self.external_ip, &port),
            proto: "http".into(),
            meta,
            ..Instance::default()
        };
        if let Some(old) = slot.take() {
            // Same instance id: the new registration replaces the entry (discoverd sends
            // watchers an `update`). The old heartbeater stops without deleting it: a
            // delete first (`close`) took the host out of the service until the new one
            // came, so watchers saw it go down and up, and it lost its place in the
            // service's "oldest" leader election. Stopped (aborted and awaited) before the
            // new one starts; a heartbeat of the old tags already on the wire may still
            // land after the new registration, and the next beat (within 5 s) corrects it.
            old.abandon().await;
        }
        // Kept registered however long discoverd is away (it used to give up after 60 s).
        *slot = Some(client.keep_registered(HOST_SERVICE, inst, Some("oldest")));
    }

    /// Ports that starting or running jobs use in the host's network namespace, by proto
    /// (`None`: any, for a job kept running with an unreadable record, whose container's
    /// spec does not keep it), for the resource check. A job in a network namespace of its
    /// own binds its ports there, where they take nothing from the host: only jobs without
    /// one count (`host_network`, a host without job networking (`--no-network`), the
    /// process runtime).
    pub fn used_ports(&self) -> Vec<(u16, Option<String>)> {
        let own_namespaces = self.runtime.isolates_network()
            && (self.network().is_some() || self.net_setup.is_some());
        let inner = self.lock();
        let jobs = inner
            .table
            .iter()
            .filter(|j| !j.status.is_terminal())
            .filter(|j| !own_namespaces || j.job.config.host_network)
            .flat_map(|j| job::bind_ports(&j.job).unwrap_or_default())
            .map(|p| (p.port, Some(p.proto)));
        let kept = inner.kept.host_ports().map(|p| (p, None));
        jobs.chain(kept).collect()
    }

    /// `PUT /host/jobs/:id`: records the job and starts it in the background.
    pub async fn add_job(self: &Arc<Self>, job: Job) -> Result<(), ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::new(
                flynn_api::ErrorCode::ServiceUnavailable,
                "host is shutting down",
            ));
        }
        if job.config.tty && !self.runtime.supports_tty() {
            return Err(ApiError::validation(
                Some("config.tty"),
                "is not supported by this host's runtime (no terminals without containers); use stdin",
            ));
        }
        let id = job.id.clone();
        let change = {
            let mut inner = self.lock();
            if inner.kept.contains(&job.id) {
                return Err(job::kept_conflict(&job.id));
            }
            if self.max_starting > 0 {
                let starting = inner
                    .table
                    .iter()
                    .filter(|j| j.status == JobStatus::Starting)
                    .count();
                if starting >= self.max_starting && inner.table.get(&job.id).is_none() {
                    return Err(ApiError::new(
                        flynn_api::ErrorCode::Ratelimited,
                        "host: too many jobs starting",
                    )
                    .with_retry(true));
                }
            }
            if inner.table.get(&job.id).is_none() {
                volumes::check_free(&inner.table, &inner.kept, &job)?;
            }
            let aj = inner.table.add(job, &self.id, now_rfc3339())?.clone();
            self.record(&mut inner, &aj)
        };
        // The job is in the table: the rest runs to its end whatever becomes of the request
        // (a handler dropped when its client gives up). Cut short while the record was
        // written, the job stayed starting for good, shown nowhere, counting against
        // `max_starting`, and a retried `PUT` was refused.
        let host = self.clone();
        to_completion(async move { host.added(id, change).await }).await
    }

    /// What follows `add_job`'s table change: once the job is recorded, it is shown,
    /// announced and started; a job whose record could not be written leaves the table.
    async fn added(self: Arc<Self>, id: String, change: Change) -> Result<(), ApiError> {
        // Recorded before anything runs: a job whose state cannot be saved would be
        // unknown to the next daemon, which kills what it finds of it.
        let Change {
            seq,
            job: aj,
            ticket,
        } = change;
        if let Err(e) = ticket.wait().await {
            let mut inner = self.lock();
            inner.table.unadd(&id);
            if inner.table.get(&id).is_none() {
                // After the failed write, which is then not tried again. A stop of the job
                // whose record replaced this one's in the queue may have shown it already.
                inner.recorded.remove(&id);
                self.store.remove(&id);
            }
            tracing::error!(job = %id, error = ?e, "persisting a new job failed; not starting it");
            return Err(ApiError::new(
                flynn_api::ErrorCode::UnknownError,
                format!("host: cannot record the job: {e}"),
            )
            .with_retry(true));
        }
        {
            let mut inner = self.lock();
            Self::show(&mut inner, seq, &aj);
            self.broadcast(EventKind::Create, &aj);
            // Clients that attached before the job was created: attached to it now, before
            // it starts, so they get all its output.
            self.attach.created(&aj);
        }
        // A shutdown that began while the record was written: this daemon starts nothing
        // more (the job ends as failed, not started by a daemon on its way out).
        if self.shutting_down.load(Ordering::SeqCst) {
            self.fail(&id, "host: shutting down".into()).await;
            return Ok(());
        }
        let host = self.clone();
        tokio::spawn(async move { host.start(id).await });
        Ok(())
    }

    async fn fail(&self, id: &str, reason: String) {
        tracing::warn!(job = %id, reason = %reason, "job failed, or was lost by its runtime");
        self.prepare_next();
        self.release_volumes(id).await;
        let change = {
            let mut inner = self.lock();
            // A deregistration that came while it was starting left an entry: nothing runs.
            inner.ctl.remove(id);
            self.forget_deregistration(id);
            let Some(j) = inner.table.failed(id, reason, now_rfc3339()).cloned() else {
                return;
            };
            let change = self.record(&mut inner, &j);
            self.gc(&mut inner, &j);
            change
        };
        let kind = end_event(change.job.status);
        self.settle(change, Some(kind)).await;
    }

    /// Deletes the `delete_on_stop` volumes of job `id`, which is ending (its process is
    /// gone, or it failed to start), before its end is in the table: from then on they are
    /// in no job's hands and no other job can take them (a detached volume is `Deleting`),
    /// and their directories are renamed away (gone for a restarted daemon, see
    /// [`Volumes::release`]) before the end is queued to be recorded, so a daemon that dies
    /// once the end is on disk does not find them again. The rename runs on the blocking
    /// pool, without the table lock: a stalled disk holds up this job's end only, not the
    /// API and every other job (it ran under the table lock, on a runtime thread).
    ///
    /// [`Volumes::release`]: crate::volumes::Volumes::release
    async fn release_volumes(&self, id: &str) {
        let Some(job) = self
            .current(id)
            .filter(|j| !j.status.is_terminal())
            .map(|j| j.job)
        else {
            return;
        };
        if !job.config.volumes.iter().any(|b| b.delete_on_stop) {
            return;
        }
        let vols = self.volumes.clone();
        let _ = tokio::task::spawn_blocking(move || vols.release(&job)).await;
    }

    fn gc(&self, inner: &mut Inner, j: &ActiveJob) {
        for gone in inner.table.gc(j.job.app_id()) {
            inner.recorded.remove(&gone);
            self.store.remove(&gone);
        }
    }

    async fn start(self: Arc<Self>, id: String) {
        let Some(job) = self.current(&id).map(|j| j.job) else {
            return;
        };
        let t0 = std::time::Instant::now();
        self.runtime.starting();
        if let Err(reason) = job::check_partition(&job) {
            return self.fail(&id, reason).await;
        }
        let ports = match job::bind_ports(&job) {
            Ok(p) => p,
            Err(reason) => return self.fail(&id, reason).await,
        };
        let volume_mounts = match self.volumes.mounts(&job) {
            Ok(m) => m,
            Err(reason) => return self.fail(&id, reason).await,
        };
        let mut layers = Vec::new();
        if self.runtime.needs_image() {
            for m in &job.mountspecs {
                let sha = m.hashes.get("sha256").cloned().unwrap_or_default();
                let path = m.url.strip_prefix("file://").map(PathBuf::from);
                let rt = self.runtime.clone();
                // A stop while a layer imports gives the import up (at its next read of
                // the tarball) instead of waiting for it.
                let host = self.clone();
                let jid = id.clone();
                let res = tokio::task::spawn_blocking(move || {
                    rt.layer(path.as_deref(), &sha, &|| host.stop_requested(&jid))
                })
                .await;
                match res {
                    Ok(Ok(p)) => layers.push(p),
                    Ok(Err(RuntimeError::Cancelled)) => {
                        return self.fail(&id, STOPPED_BEFORE_START.into()).await
                    }
                    Ok(Err(e)) => return self.fail(&id, e.to_string()).await,
                    Err(e) => return self.fail(&id, format!("image: {e}")).await,
                }
            }
        }
        // A job stopped before its process exists ends as done (spec §5.3): checked after
        // the image, after the network wait and right before the spawn. A stop after that
        // is seen when the process reports it started.
        if self.stop_requested(&id) {
            return self.fail(&id, STOPPED_BEFORE_START.into()).await;
        }
        let t_image = t0.elapsed();
        let own_net = self.runtime.isolates_network() && !job.config.host_network;
        let net = if own_net {
            match self.wait_network(&id).await {
                Ok(n) => n,
                Err(e) => return self.fail(&id, e).await,
            }
        } else {
            None
        };
        let (ip, netns) = match (net, own_net) {
            (Some(net), true) => match net.setup(&id).await {
                Ok((ip, ns)) => (Some(ip), Some(ns)),
                Err(e) => return self.fail(&id, format!("network: {e}")).await,
            },
            _ => (None, None),
        };
        let t_net = t0.elapsed();
        let env_ip = ip.unwrap_or(self.external_ip);
        let durl = self.discoverd_url();
        let env = job::job_env(&job, &ports, Some(env_ip), durl.as_deref());
        let mut mounts = BindMount::of(&job.config);
        mounts.extend(volume_mounts);
        if netns.is_some() && !self.resolvers.is_empty() {
            match self.write_resolv_conf(&id) {
                Ok(path) => mounts.push(BindMount {
                    source: path,
                    target: "/etc/resolv.conf".into(),
                    readonly: true,
                }),
                Err(e) => {
                    self.teardown(&id, true).await;
                    return self.fail(&id, format!("resolv.conf: {e}")).await;
                }
            }
        }
        let launch = Launch {
            id: id.clone(),
            layers,
            args: job.config.args.clone(),
            env: env.clone(),
            cwd: job.config.working_dir.clone(),
            hostname: Some(id.chars().take(63).collect()),
            netns,
            mounts,
            limits: Limits::of(&job.resources),
            uid: job.config.uid.unwrap_or(0),
            gid: job.config.gid.unwrap_or(0),
            capabilities: job.config.linux_capabilities.clone(),
            stdin: job.config.stdin,
            tty: job.config.tty,
            // The size of a client that attached while the job was starting (`flynn run`
            // attaches right after adding the job): set before the job runs. One attaching
            // later resizes the running job.
            tty_size: if job.config.tty {
                self.attach.size(&id)
            } else {
                None
            },
            output_waits: job.config.disable_log,
        };
        if self.stop_requested(&id) {
            self.teardown(&id, ip.is_some()).await;
            return self.fail(&id, STOPPED_BEFORE_START.into()).await;
        }
        let rt = self.runtime.clone();
        let handle = match tokio::task::spawn_blocking(move || {
            // The runtime may need a tokio context for its readers.
            rt.spawn(launch)
        })
        .await
        {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                self.cleanup_failed_start(&id, ip.is_some()).await;
                return self.fail(&id, e.to_string()).await;
            }
            Err(e) => {
                self.cleanup_failed_start(&id, ip.is_some()).await;
                return self.fail(&id, format!("start: {e}")).await;
            }
        };
        tracing::debug!(job = %id, image = ?t_image, network = ?(t_net - t_image), shim = ?(t0.elapsed() - t_net), "job start phases");
        let stop_timeout = Duration::from_secs(
            job.config
                .stop_timeout
                .unwrap_or(job::DEFAULT_STOP_TIMEOUT_SECS),
        );
        self.supervise(
            job,
            handle,
            Running {
                ports,
                ip,
                env_ip,
                env,
                stop_timeout,
                adopted: false,
            },
        )
        .await;
    }

    fn resolv_conf_path(&self, id: &str) -> PathBuf {
        self.state_dir.join("resolv").join(format!("{id}.conf"))
    }

    /// `<state-dir>/resolv/<id>.conf` with one `nameserver` line per `--resolver`.
    fn write_resolv_conf(&self, id: &str) -> std::io::Result<PathBuf> {
        let path = self.resolv_conf_path(id);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let text: String = self
            .resolvers
            .iter()
            .map(|r| format!("nameserver {r}\n"))
            .collect();
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// After a failed start: whatever the runtime got to (a shim that started but could not
    /// be reached, its state and cgroups) goes first, then the network the job would have used.
    async fn cleanup_failed_start(&self, id: &str, had_net: bool) {
        let rt = self.runtime.clone();
        let cid = id.to_string();
        let _ = tokio::task::spawn_blocking(move || rt.cleanup(&cid)).await;
        self.teardown(id, had_net).await;
    }

    async fn teardown(&self, id: &str, had_net: bool) {
        let _ = std::fs::remove_file(self.resolv_conf_path(id));
        if had_net {
            // A network move (`configure_network`) takes the network out of service while
            // it checks that no job holds an address, under `net_config`; this job still
            // holds one, so the move puts the old network back. Waiting for it keeps the
            // job's namespace and address from being left behind.
            let net = match self.network() {
                Some(n) => Some(n),
                None => {
                    let _move_done = self.net_config.lock().await;
                    self.network()
                }
            };
            if let Some(net) = net {
                if let Err(e) = net.teardown(id).await {
                    tracing::warn!(job = %id, error = %e, "removing job network failed");
                }
            }
        }
    }

    /// Follows a job's process until it ends.
    async fn supervise(self: Arc<Self>, job: Job, mut handle: Handle, r: Running) {
        let id = job.id.clone();
        {
            let mut inner = self.lock();
            // `discoverd-deregister` may have come while the job was starting.
            let deregistered = inner.ctl.get(&id).is_some_and(|c| c.deregistered);
            inner.ctl.insert(
                id.clone(),
                Ctl {
                    signal: Some(handle.signal.clone()),
                    stdin: handle.stdin.take(),
                    resize: handle.resize.take(),
                    stop_timeout: r.stop_timeout,
                    deregistered,
                    ..Ctl::default()
                },
            );
        }
        // A job being stopped before the restart is stopped again at once (its stop
        // deregistered it, or was about to, so it is not put back into discoverd below).
        let stopped_at_adoption = r.adopted && self.current(&id).is_some_and(|j| j.force_stop);
        if stopped_at_adoption {
            let host = self.clone();
            let id = id.clone();
            tokio::spawn(async move { host.stop_process(&id).await });
        }
        let src = Source::new(job.app_id(), job.process_type(), &id);
        let log = !job.config.disable_log;
        // The job's output, put together into lines for its log (clients get it as it
        // came). The events holding an incomplete line (a prompt) are not marked dealt with
        // until the line is complete (or cut, past `terminal::MAX_PARTIAL`), so the runtime
        // does not acknowledge them: a daemon that dies meanwhile leaves them to the next
        // one, and the log still gets the whole line.
        let mut log_lines = crate::terminal::LogLines::default();
        let mut end: Option<Result<Exit, String>> = None;
        let mut started = false;
        while let Some(ev) = handle.events.recv().await {
            // The job's last lines, if they had no newline, before its end; and partial
            // lines before output the runtime dropped (their newline may have been in it):
            // what comes after the gap starts a line of its own.
            let last = matches!(ev, ProcEvent::Exited { .. } | ProcEvent::Failed { .. });
            if (last || matches!(ev, ProcEvent::Dropped { .. })) && log {
                log_lines.finish(|s, l| self.logs.push(&src, s, l));
            }
            match ev {
                ProcEvent::Started { pid } => {
                    // An adopted job gets this too: its shim's first event, sent again to
                    // the new daemon (or made from its greeting once an earlier daemon
                    // acknowledged it). A job adopted as running stays as it is (no second
                    // `start` event); one adopted while starting runs from here.
                    // `stop_now`: asked to stop while starting, a stop that waited for the
                    // process; `stopping`: asked to stop at all (then never registered).
                    let (change, stop_now, stopping) = {
                        let mut inner = self.lock();
                        match inner.table.started(&id, pid, r.ip, now_rfc3339()).cloned() {
                            Some(j) => {
                                let change = self.record(&mut inner, &j);
                                (Some(change), j.force_stop, j.force_stop)
                            }
                            None => {
                                let stopping = inner.table.get(&id).is_some_and(|j| j.force_stop);
                                (None, false, stopping)
                            }
                        }
                    };
                    if let Some(c) = change {
                        self.settle(c, Some(EventKind::Start)).await;
                    }
                    self.attach.started(&id).await;
                    // A TTY job's terminal: the latest attached client's size, once (it
                    // started with it, unless a client attached since: the same size
                    // changes nothing).
                    if let Some((rows, cols)) = self.attach.size(&id) {
                        self.resize(&id, rows, cols);
                    }
                    let first = !started;
                    started = true;
                    if !r.adopted && first {
                        self.prepare_next();
                    }
                    // Registered once the job is recorded and announced as running, adopted
                    // or not (an adopted job used to be registered before its shim had said
                    // anything: one that had ended meanwhile, or never started, was put in
                    // discoverd). A job asked to stop is not announced at all.
                    if first && !stopping {
                        self.register_services(&id, &r);
                    }
                    // Not twice for a job adopted while being stopped (stopped above).
                    if stop_now && !stopped_at_adoption {
                        let host = self.clone();
                        let id = id.clone();
                        tokio::spawn(async move { host.stop_process(&id).await });
                    }
                }
                // Attached clients get the output as it came. The only client of a
                // `disable_log` job holds the output up until it has room for it, so the
                // event is not dealt with before: the runtime stops reading the job's output
                // and the job blocks on its writes.
                ProcEvent::Output {
                    stream,
                    line,
                    newline,
                } => {
                    if !self.fault_slow_output.is_zero() {
                        tokio::time::sleep(self.fault_slow_output).await;
                    }
                    if log {
                        log_lines.output(stream, &line, newline, |s, l| self.logs.push(&src, s, l));
                    }
                    self.attach.output(&id, stream, &line, newline).await;
                }
                ProcEvent::Terminal { data } => {
                    if log {
                        log_lines.terminal(&data, |s, l| self.logs.push(&src, s, l));
                    }
                    self.attach.terminal(&id, &data).await;
                }
                ProcEvent::Dropped { count } => self.logs.count_dropped(count),
                ProcEvent::Exited {
                    code,
                    signal,
                    oom_killed,
                } => {
                    end = Some(Ok(Exit {
                        code,
                        signal,
                        oom_killed,
                    }));
                }
                ProcEvent::Failed { reason } => end = Some(Err(reason)),
            }
            // Dealt with (its output handed to the host's log): the runtime may acknowledge it,
            // and the events held back for a line that is now complete (or cut).
            let done = if log { log_lines.release() } else { 1 };
            for _ in 0..done {
                handle.handled.mark();
            }
            if last {
                break;
            }
        }
        if !r.adopted && !started {
            self.prepare_next();
        }
        if log {
            log_lines.finish(|s, l| self.logs.push(&src, s, l));
        }
        let end = end.unwrap_or_else(|| Err("lost contact with the job".into()));
        self.release_volumes(&id).await;
        // The end is recorded (persisted, then announced) before anything else: a daemon
        // that dies during the cleanup below restores the job as ended (not as lost), and a
        // slow discoverd or runtime cleanup does not hold back the stop event.
        let change = {
            let mut inner = self.lock();
            if let Some(c) = inner.ctl.get_mut(&id) {
                // Nothing left to signal, and nothing to announce to a discoverd that
                // turns up before the deregistration below.
                c.signal = None;
                c.stdin = None;
                c.resize = None;
                c.announce = None;
            }
            // Without an exit (the runtime lost the job): failed if it never ran, crashed
            // if it did, done if it was being stopped.
            let j = match end {
                Ok(exit) => inner.table.exited(&id, exit, now_rfc3339()).cloned(),
                Err(reason) => inner.table.failed(&id, reason, now_rfc3339()).cloned(),
            };
            j.map(|j| {
                tracing::info!(job = %id, status = j.status.as_str(), exit = ?j.exit_status, error = ?j.error, "job ended");
                let change = self.record(&mut inner, &j);
                self.gc(&mut inner, &j);
                change
            })
        };
        if let Some(c) = change {
            let kind = end_event(c.job.status);
            self.settle(c, Some(kind)).await;
        }
        // Then its instances leave discoverd and the runtime removes what is left of the
        // container (state, rootfs, cgroup), then its namespace and veth go (the kernel's
        // teardown of those takes ~10–20 ms). Its address stays allocated until then; a
        // daemon that dies in between finishes the cleanup when it restores the job (see
        // `restore`).
        let t0 = std::time::Instant::now();
        self.deregister(&id).await;
        self.lock().ctl.remove(&id);
        // After the deregistration above, so nothing it does is left behind.
        self.forget_deregistration(&id);
        let t_dereg = t0.elapsed();
        let rt = self.runtime.clone();
        let cid = id.clone();
        let _ = tokio::task::spawn_blocking(move || rt.cleanup(&cid)).await;
        let t_cleanup = t0.elapsed();
        if self.fault_exit_before_teardown {
            tracing::warn!(job = %id, "fault injection: exiting before the network teardown");
            std::process::exit(3);
        }
        self.teardown(&id, r.ip.is_some()).await;
        tracing::debug!(job = %id, deregister = ?t_dereg, cleanup = ?(t_cleanup - t_dereg), network = ?(t0.elapsed() - t_cleanup), "job end phases");
    }

    /// Notes what the job announces and registers it in discoverd, if there is one yet.
    fn register_services(self: &Arc<Self>, id: &str, r: &Running) {
        let a = Arc::new(Announce {
            ip: r.ip.unwrap_or(r.env_ip),
            ports: r.ports.clone(),
            meta: job::instance_meta(&r.env),
        });
        // The generation and the discoverd are read under the job lock, like
        // `reannounce_jobs` bumps and reads them, so whichever registers last for a move is
        // the one kept.
        let (generation, client) = {
            let mut inner = self.lock();
            let Some(c) = inner.ctl.get_mut(id) else {
                return;
            };
            // Asked not to be in discoverd (possibly while it was starting).
            if c.deregistered {
                return;
            }
            c.announce = Some(a.clone());
            (c.generation, self.discoverd_client())
        };
        if let Some(client) = client {
            self.announce(id, &a, &client, generation);
        }
    }

    /// Registers every running job that has something to announce with the discoverd
    /// just announced. After a move the old heartbeats stop without deleting the instances:
    /// the new registration has the same instance ids, and where the old address is another
    /// node of the same cluster a delete would remove the new entry; where it is not, the old
    /// entries expire after the TTL.
    fn reannounce_jobs(self: &Arc<Self>) {
        let (client, jobs, old) = {
            let mut inner = self.lock();
            let Some(client) = self.discoverd_client() else {
                return;
            };
            let mut old = Vec::new();
            let jobs: Vec<(String, Arc<Announce>, u64)> = inner
                .ctl
                .iter_mut()
                .filter(|(_, c)| !c.deregistered)
                .filter_map(|(id, c)| {
                    let a = c.announce.clone()?;
                    c.generation += 1;
                    old.append(&mut c.heartbeaters);
                    Some((id.clone(), a, c.generation))
                })
                .collect();
            (client, jobs, old)
        };
        tokio::spawn(async move {
            for hb in old {
                hb.abandon().await;
            }
        });
        for (id, a, generation) in jobs {
            tracing::info!(job = %id, "registering a running job with the new discoverd");
            self.announce(&id, &a, &client, generation);
        }
    }

    /// Registers `a`'s instances with `client` for registration `generation` of job `id`.
    fn announce(
        self: &Arc<Self>,
        id: &str,
        a: &Announce,
        client: &discoverd::Client,
        generation: u64,
    ) {
        for p in &a.ports {
            let Some(svc) = p.service.clone() else {
                continue;
            };
            let inst = Instance {
                addr: std::net::SocketAddr::new(a.ip, p.port).to_string(),
                proto: p.proto.clone(),
                meta: a.meta.clone(),
                ..Instance::default()
            };
            // Kept registered however long discoverd is away (a job started during an
            // outage used to be left out of its service for good after 60 s).
            let hb = client.keep_registered(&svc.name, inst, svc.create.then_some("oldest"));
            let mut inner = self.lock();
            match inner.ctl.get_mut(id) {
                Some(c) if !c.deregistered && c.generation == generation => c.heartbeaters.push(hb),
                // Registered anew meanwhile: the newer registration owns the instance
                // (same id), so this one stops without deleting it.
                Some(c) if !c.deregistered => {
                    drop(inner);
                    tokio::spawn(hb.abandon());
                }
                // Deregistered or ended meanwhile: dropping it deletes what it registered.
                _ => drop(hb),
            }
        }
    }

    /// Stops the job's discoverd heartbeats and removes its instances. `false` for an
    /// unknown job.
    pub async fn deregister(&self, id: &str) -> bool {
        let hbs = {
            let mut inner = self.lock();
            let Some(ended) = inner.table.get(id).map(|j| j.status.is_terminal()) else {
                return false;
            };
            let c = if ended {
                // Nothing will register it again, and nothing would remove a new entry:
                // only what its supervisor still holds (its end's cleanup) is closed.
                match inner.ctl.get_mut(id) {
                    Some(c) => c,
                    None => return true,
                }
            } else {
                // A job still starting has no control entry yet: this one, kept by the
                // supervisor, makes its start skip the registration.
                inner.ctl.entry(id.to_string()).or_default()
            };
            let first = !c.deregistered;
            c.deregistered = true;
            let hbs = std::mem::take(&mut c.heartbeaters);
            if first && !ended {
                // Kept across a daemon restart, which would otherwise register the job
                // again (an empty file per job, removed when the job ends; an ended job
                // is never re-adopted, so its own end's deregistration needs none).
                let marker = self.deregistered_marker(id);
                let saved = marker
                    .parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|()| std::fs::write(&marker, b""));
                if let Err(e) = saved {
                    tracing::warn!(job = %id, error = %e, "recording the deregistration failed; a daemon restart registers the job again");
                }
            }
            hbs
        };
        // All at once, and for a bounded time: a discoverd that stopped answering must not
        // hold back the job's SIGTERM (or its cleanup) for a request timeout per port. The
        // heartbeaters left behind still delete their instances when it answers; an
        // instance nobody deletes expires after the TTL.
        let closing: Vec<_> = hbs.into_iter().map(|hb| tokio::spawn(hb.close())).collect();
        let all = async {
            for c in closing {
                let _ = c.await;
            }
        };
        if tokio::time::timeout(DEREGISTER_WAIT, all).await.is_err() {
            tracing::warn!(job = %id, "discoverd did not confirm the deregistration in time; going on");
        }
        true
    }

    /// `DELETE /host/jobs/:id`.
    pub async fn stop(self: &Arc<Self>, id: &str) -> Result<(), ApiError> {
        let (action, change) = {
            let mut inner = self.lock();
            let a = inner.table.request_stop(id)?;
            // Also when asked before (that stop is under way): the state is queued again
            // only to answer once that stop is recorded too.
            let change = inner
                .table
                .get(id)
                .cloned()
                .map(|j| self.record(&mut inner, &j));
            (a, change)
        };
        // The stop is in the table: the rest runs to its end whatever becomes of the request
        // (a handler dropped when its client gives up). Cut short while the record was
        // written, the job was never signalled, and every later `DELETE` found the stop
        // under way and answered 200 doing nothing.
        let host = self.clone();
        let id = id.to_string();
        to_completion(async move { host.stopped(id, action, change).await }).await;
        Ok(())
    }

    /// What follows `stop`'s table change: once the stop is recorded, the job is signalled
    /// (or a start waiting for the network is woken).
    async fn stopped(self: Arc<Self>, id: String, action: StopAction, change: Option<Change>) {
        // Answered, and the job signalled, once the stop is on disk: a daemon restarted
        // after the job's end then finds it asked to stop (done, not crashed).
        if let Some(c) = change {
            self.settle(c, None).await;
        }
        if action == StopAction::None {
            return;
        }
        // Wakes a start waiting for the network.
        self.stops.send_modify(|n| *n = n.wrapping_add(1));
        if action == StopAction::Signal {
            tokio::spawn(async move { self.stop_process(&id).await });
        }
    }

    /// Deregisters, SIGTERMs, and SIGKILLs after the job's stop timeout. From the start of
    /// it the job's output waits for no attached client: its end (the supervisor taking the
    /// last output and the exit) must not wait for the one client of a `disable_log` job
    /// that stopped reading.
    async fn stop_process(self: Arc<Self>, id: &str) {
        self.unblock_attach(id);
        self.deregister(id).await;
        let (signal, timeout) = {
            let inner = self.lock();
            match inner.ctl.get(id) {
                Some(c) => (c.signal.clone(), c.stop_timeout),
                None => return,
            }
        };
        let Some(signal) = signal else { return };
        if let Err(e) = signal(SIGTERM) {
            tracing::debug!(job = %id, error = %e, "SIGTERM failed");
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.events.subscribe();
        loop {
            if self.current(id).is_none_or(|j| j.status.is_terminal()) {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                r = rx.recv() => if matches!(r, Err(broadcast::error::RecvError::Closed)) { return },
            }
        }
        if self.current(id).is_some_and(|j| !j.status.is_terminal()) {
            tracing::info!(job = %id, "stop timeout passed; sending SIGKILL");
            if let Err(e) = signal(SIGKILL) {
                tracing::debug!(job = %id, error = %e, "SIGKILL failed");
            }
        }
    }

    /// Job `id`'s output waits for no attached client from now on ([`Attachments::unblock`]),
    /// if it has not ended: checked under the table lock, under which its end is shown and
    /// forgotten by the attach clients (`broadcast`), so the mark is never left behind for
    /// a job whose end came first (it was, for ever, and the job's id's next use started
    /// with its one client not holding its output up).
    ///
    /// [`Attachments::unblock`]: crate::attach::Attachments::unblock
    pub(crate) fn unblock_attach(&self, id: &str) {
        let inner = self.lock();
        if inner
            .recorded
            .get(id)
            .is_some_and(|(_, j)| !j.status.is_terminal())
        {
            self.attach.unblock(id);
        }
    }

    /// Jobs whose attach clients hold up no output, marked so while they run.
    #[cfg(test)]
    pub(crate) fn attach_stopping(&self) -> usize {
        self.attach.stopping()
    }

    /// The file whose presence says job `id` was taken out of discoverd.
    fn deregistered_marker(&self, id: &str) -> PathBuf {
        self.state_dir.join("deregistered").join(id)
    }

    /// The job ended: its deregistration need not be remembered.
    fn forget_deregistration(&self, id: &str) {
        match std::fs::remove_file(self.deregistered_marker(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(job = %id, error = %e, "removing a deregistration record failed")
            }
            _ => {}
        }
    }

    /// TEST ONLY: whether job `id` has instances to announce in discoverd.
    #[cfg(test)]
    pub(crate) fn announced(&self, id: &str) -> bool {
        self.lock()
            .ctl
            .get(id)
            .is_some_and(|c| c.announce.is_some())
    }

    /// TEST ONLY: whether job `id` has a control entry.
    #[cfg(test)]
    pub(crate) fn has_control(&self, id: &str) -> bool {
        self.lock().ctl.contains_key(id)
    }

    /// The stdin of job `id`, while its process lives and if it was created with one.
    pub fn stdin(&self, id: &str) -> Option<Stdin> {
        self.lock().ctl.get(id).and_then(|c| c.stdin.clone())
    }

    /// Sets the window size of TTY job `id`'s terminal, while its process lives; nothing
    /// for other jobs (a resize is no error: attach clients send them whatever the job).
    pub fn resize(&self, id: &str, rows: u16, cols: u16) {
        let resize = self.lock().ctl.get(id).and_then(|c| c.resize.clone());
        if let Some(r) = resize {
            r(rows, cols);
        }
    }

    /// `PUT /host/jobs/:id/signal/:sig`.
    pub fn signal(&self, id: &str, sig: i32) -> Result<(), ApiError> {
        // Checked here for every caller (attach frames carry any u32): only 1-64 are ever
        // queued, so the queue of 64 different signals can never be full, and the stop
        // path's SIGTERM and SIGKILL always find room.
        if !(1..=64).contains(&sig) {
            return Err(ApiError::validation(
                Some("signal"),
                "must be an integer 1-64",
            ));
        }
        let inner = self.lock();
        if inner.table.get(id).is_none() {
            return Err(ApiError::object_not_found("host: unknown job"));
        }
        let signal = inner
            .ctl
            .get(id)
            .and_then(|c| c.signal.clone())
            .ok_or_else(|| ApiError::conflict("host: job is not running"))?;
        drop(inner);
        signal(sig).map_err(|e| {
            // The job ended between the check above and the signal (its shim is gone, or
            // its process group): the same answer as a moment later.
            if e.raw_os_error() == Some(nix::libc::ESRCH)
                || self.current(id).is_none_or(|j| j.status.is_terminal())
            {
                return ApiError::conflict("host: job is not running");
            }
            // The job's queue of signals waiting for its runtime is full: cannot happen
            // with signals 1-64 (one place each), kept as an answer rather than a panic.
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return ApiError::new(
                    flynn_api::ErrorCode::Ratelimited,
                    "host: too many signals waiting for the job; try again",
                )
                .with_retry(true);
            }
            tracing::warn!(job = %id, sig, error = %e, "signal failed");
            ApiError::validation(Some("signal"), &format!("could not be sent: {e}"))
        })
    }

    /// Loads persisted jobs and re-attaches to the ones still running.
    pub async fn restore(self: &Arc<Self>) {
        let stored = self.store.load();
        // A job whose record is on disk but could not be read (logged by `load`): nothing of
        // it is touched, so a record fixed by hand brings it back with the next daemon.
        let loaded: Vec<String> = stored.iter().map(|j| j.job.id.clone()).collect();
        let unreadable = |id: &str| !loaded.iter().any(|l| l == id) && self.store.exists(id);
        // Deregistrations of jobs that ended (or vanished) while no daemon ran.
        if let Ok(dir) = std::fs::read_dir(self.state_dir.join("deregistered")) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let live = stored
                    .iter()
                    .any(|j| j.job.id == name && !j.status.is_terminal());
                if !live && !unreadable(&name) {
                    self.forget_deregistration(&name);
                }
            }
        }
        let rt = self.runtime.clone();
        let mut adopted: HashMap<String, Handle> =
            tokio::task::spawn_blocking(move || rt.adopt().into_iter().collect())
                .await
                .unwrap_or_default();
        for j in stored {
            let id = j.job.id.clone();
            let live = !j.status.is_terminal();
            let handle = adopted.remove(&id);
            {
                // On disk: shown as it is.
                let mut inner = self.lock();
                inner.table.restore(j.clone());
                inner.changes += 1;
                let seq = inner.changes;
                inner.recorded.insert(id.clone(), (seq, j.clone()));
            }
            match handle {
                Some(h) if live => {
                    tracing::info!(job = %id, "re-adopted running job");
                    if self.deregistered_marker(&id).exists() {
                        // Taken out of discoverd before the restart: kept out.
                        self.lock().ctl.entry(id.clone()).or_default().deregistered = true;
                    }
                    let ports = job::bind_ports(&j.job).unwrap_or_default();
                    // A job that had not reported running yet has its address only in
                    // the allocator.
                    let ip: Option<IpAddr> = j
                        .internal_ip
                        .parse()
                        .ok()
                        .or_else(|| self.network().and_then(|n| n.address_of(&id)));
                    let env_ip = ip.unwrap_or(self.external_ip);
                    let durl = self.discoverd_url();
                    let env = job::job_env(&j.job, &ports, Some(env_ip), durl.as_deref());
                    let stop_timeout = Duration::from_secs(
                        j.job
                            .config
                            .stop_timeout
                            .unwrap_or(job::DEFAULT_STOP_TIMEOUT_SECS),
                    );
                    let host = self.clone();
                    let run = Running {
                        ports,
                        ip,
                        env_ip,
                        env,
                        stop_timeout,
                        adopted: true,
                    };
                    tokio::spawn(host.supervise(j.job, h, run));
                }
                None if live => {
                    tracing::warn!(job = %id, "job was not found after a restart");
                    self.fail(&id, "host: job lost across a daemon restart".into())
                        .await;
                    let had_net = self.network().is_some_and(|n| n.address_of(&id).is_some());
                    self.teardown(&id, had_net).await;
                }
                ended => {
                    // Ended, but the cleanup that follows the recorded end may not have
                    // run: the container's remains (in the background) and the network.
                    if let Some(h) = ended {
                        tracing::info!(job = %id, "removing what is left of an ended job's container");
                        self.reap(id.clone(), h);
                    }
                    if self.network().is_some_and(|n| n.address_of(&id).is_some()) {
                        self.teardown(&id, true).await;
                    }
                }
            }
        }
        for (id, h) in adopted {
            if unreadable(&id) {
                tracing::error!(job = %id, "leaving a running container alone: its stored record cannot be read");
                self.keep(id, h);
                continue;
            }
            tracing::warn!(job = %id, "killing a running container the host has no state for");
            self.reap(id, h);
        }
        if let Some(n) = self.network() {
            n.release_strays(|id| {
                let inner = self.lock();
                inner.table.get(id).is_some() || inner.kept.contains(id)
            })
            .await;
        }
        self.await_agent_block().await;
    }

    /// Leaves job `id`, running with a record that cannot be read, as it is: its id stays
    /// taken (a `PUT` of it is a 409), its address held, and the volumes and host ports its
    /// container was started with (from the runtime's copy of its spec) count as in use
    /// while it runs. Its events are taken and acknowledged, so the runtime keeps reading
    /// its output (a shim whose unacknowledged events fill its buffer stops reading the
    /// job's pipes and the job blocks): output lines go to the host's log under the app and
    /// process type of its environment when the record still reads as JSON and does not say
    /// `disable_log`, else they are dropped once acknowledged.
    fn keep(self: &Arc<Self>, id: String, mut h: Handle) {
        let described = self.runtime.describe(&id).unwrap_or_default();
        let volumes = described
            .mount_sources
            .iter()
            .filter_map(|s| self.volumes.volume_of(s))
            .collect();
        let host_ports = if described.host_network {
            described.ports()
        } else {
            Vec::new()
        };
        self.lock().kept.insert(&id, volumes, host_ports);
        let log = self.store.raw(&id).is_some_and(|r| {
            r.pointer("/job/config/disable_log")
                .and_then(serde_json::Value::as_bool)
                != Some(true)
        });
        let src = Source::new(
            described.env("FLYNN_APP_ID"),
            described.env("FLYNN_PROCESS_TYPE"),
            &id,
        );
        let host = self.clone();
        tokio::spawn(async move {
            let mut log_lines = crate::terminal::LogLines::default();
            while let Some(ev) = h.events.recv().await {
                let last = matches!(ev, ProcEvent::Exited { .. } | ProcEvent::Failed { .. });
                match ev {
                    ProcEvent::Output {
                        stream,
                        line,
                        newline,
                    } if log => {
                        log_lines.output(stream, &line, newline, |s, l| host.logs.push(&src, s, l))
                    }
                    ProcEvent::Terminal { data } if log => {
                        log_lines.terminal(&data, |s, l| host.logs.push(&src, s, l))
                    }
                    ProcEvent::Dropped { count } => {
                        if log {
                            log_lines.finish(|s, l| host.logs.push(&src, s, l));
                        }
                        host.logs.count_dropped(count)
                    }
                    _ => {}
                }
                if last && log {
                    log_lines.finish(|s, l| host.logs.push(&src, s, l));
                }
                h.handled.mark();
                if last {
                    // Acknowledged too: the shim exits, and its status file keeps the end
                    // for a start that finds the record fixed (the real exit status).
                    tracing::info!(job = %id, "a job left running with an unreadable record ended");
                    host.lock().kept.ended(&id);
                    break;
                }
            }
            // Held, not dropped, until the daemon exits: dropping it closes the job's stdin.
            let _untouched = h;
            std::future::pending::<()>().await
        });
    }

    /// Kills what may still run of a container the host will not supervise, waits for its
    /// end and has the runtime remove it, in the background.
    fn reap(&self, id: String, mut h: Handle) {
        let _ = (h.signal)(SIGKILL);
        let rt = self.runtime.clone();
        tokio::spawn(async move {
            while h.events.recv().await.is_some() {
                h.handled.mark();
            }
            let _ = tokio::task::spawn_blocking(move || rt.cleanup(&id)).await;
        });
    }
}

/// What a job registers in discoverd: an instance per port that names a service, at the
/// job's address, with the job's app metadata.
struct Announce {
    ip: IpAddr,
    ports: Vec<BoundPort>,
    meta: BTreeMap<String, String>,
}

/// What the supervisor knows about a started job.
struct Running {
    ports: Vec<BoundPort>,
    ip: Option<IpAddr>,
    env_ip: IpAddr,
    env: Vec<String>,
    stop_timeout: Duration,
    adopted: bool,
}

/// `ip:port` with an IPv6 address in brackets (`[fd00::1]:1113`), the form discoverd takes
/// (Go's `net.SplitHostPort`); an unbracketed `fd00::1:1113` is refused.
pub(crate) fn format_host_port(ip: std::net::IpAddr, port: &str) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => format!("{v4}:{port}"),
        std::net::IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}
