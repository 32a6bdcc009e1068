//! The job lifecycle: accepts jobs, starts them through the [`Runtime`], follows their
//! events, ships their output, registers their services in discoverd, stops them, and
//! keeps the job table persisted and published as events.
//!
//! The [`Host`]'s state is here, with the job table's changes (recorded, then shown and
//! announced) and what the API reads; each concern's methods are in a file of their own:
//! `start` (accepting and starting jobs), `supervise` (a job's process until it ends),
//! `control` (stops, signals, stdin and terminal size), `registration` (discoverd),
//! `network` (the job network) and `restore` (a restarted daemon's jobs).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flynn_api::host::{
    ActiveJob, DiscoverdNotify, Event, EventKind, HostStatus, JobStatus, LogStats,
};
use flynn_api::ApiError;
use flynn_client::discoverd::{self, Heartbeater};
use tokio::sync::broadcast;

use crate::job::{self, BoundPort, Table};
use crate::logship::Shipper;
use crate::net::Network;
use crate::runtime::{Resizer, Runtime, Signaller, Stdin};
use crate::store::Store;
use crate::volumes::{self, Volumes};
use crate::writeback::Ticket;

mod control;
mod network;
mod registration;
mod restore;
mod start;
mod supervise;

const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;

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
