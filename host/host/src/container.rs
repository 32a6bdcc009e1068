//! The container runtime: each job runs in a flynn-container shim spawned from this very
//! executable (`flynn-host shim --flynn-shim <state> <id>`), with its image layers from
//! the daemon's [`ImageStore`]. Shims outlive the daemon; [`Runtime::adopt`] reconnects to
//! the ones still there after a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use flynn_container::{
    BindMount, ContainerSpec, ImageStore, Resources, Shim, ShimConn, ShimEvent, SpareShim,
};
use tokio::sync::mpsc;

use crate::logship::Stream;
use crate::runtime::{
    Described, Handle, Handled, Launch, ProcEvent, Resizer, Runtime, RuntimeError, Signaller,
};

/// The first argument that makes `flynn-host` act as a shim.
pub const SHIM_COMMAND: &str = "shim";

pub struct ContainerRuntime {
    state_dir: PathBuf,
    images: ImageStore,
    exe: PathBuf,
    cgroup_parent: String,
    /// A shim started ahead of the next job, so that job's start skips the exec and the
    /// shim's own start-up; replaced in the background after each use.
    spare: Arc<Spare>,
}

#[derive(Default)]
struct Spare {
    shim: std::sync::Mutex<Option<SpareShim>>,
    refilling: std::sync::atomic::AtomicBool,
    /// Set by the first [`Runtime::warm`]: spares are kept from then on.
    enabled: std::sync::atomic::AtomicBool,
}

impl Spare {
    fn take(&self) -> Option<SpareShim> {
        self.shim.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl ContainerRuntime {
    /// Shim state under `state_dir`, layers under `image_dir`, job cgroups under
    /// `<cgroup_parent>/<job id>`.
    pub fn open(
        state_dir: &Path,
        image_dir: &Path,
        cgroup_parent: &str,
    ) -> anyhow::Result<ContainerRuntime> {
        use anyhow::Context;
        // Refused here, once, rather than every job failing at its first mount.
        flynn_container::check_kernel().map_err(anyhow::Error::msg)?;
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        // Resolved once: shims are started and found under the resolved path, whatever
        // symlink or relative path `--state-dir` was.
        let state_dir = &std::fs::canonicalize(state_dir)
            .with_context(|| format!("resolving {}", state_dir.display()))?;
        let images = ImageStore::open(image_dir)
            .with_context(|| format!("opening the image store {}", image_dir.display()))?;
        let exe = std::env::current_exe().context("locating the flynn-host executable")?;
        Ok(ContainerRuntime {
            state_dir: state_dir.to_path_buf(),
            images,
            exe,
            cgroup_parent: cgroup_parent.to_string(),
            spare: Arc::default(),
        })
    }

    /// Starts a spare shim in the background unless there is one (or one is on its way).
    /// Needs a tokio runtime.
    fn refill(&self) {
        use std::sync::atomic::Ordering;
        if self.spare.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let spare = self.spare.clone();
        let (exe, dir) = (self.exe.clone(), self.state_dir.clone());
        tokio::runtime::Handle::current().spawn(async move {
            let has = spare.shim.lock().unwrap_or_else(|e| e.into_inner()).is_some();
            if !has {
                match Shim::spawn_spare(&exe, &[SHIM_COMMAND.to_string()], &dir).await {
                    Ok(s) => *spare.shim.lock().unwrap_or_else(|e| e.into_inner()) = Some(s),
                    Err(e) => {
                        tracing::warn!(error = %chain(&e), "starting a spare shim failed; jobs start without one")
                    }
                }
            }
            spare.refilling.store(false, Ordering::Release);
        });
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Handle::current().block_on(f)
    }
}

impl Runtime for ContainerRuntime {
    fn needs_image(&self) -> bool {
        true
    }

    fn isolates_network(&self) -> bool {
        true
    }

    fn supports_tty(&self) -> bool {
        true
    }

    fn layer(
        &self,
        url_path: Option<&Path>,
        sha256: &str,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<PathBuf, RuntimeError> {
        // Content-addressed: a layer already unpacked (and verified when it was imported)
        // is used as it is, without reading or re-hashing the tarball (as Flynn skips the
        // pull of a layer the host already has).
        if let Some(l) = self.images.layer(sha256) {
            return Ok(l.path);
        }
        let layer = match url_path {
            Some(p) => self
                .images
                .import_tar_until(p, Some(sha256), cancelled)
                .map_err(|e| match e {
                    flynn_container::ContainerError::Cancelled => RuntimeError::Cancelled,
                    e => RuntimeError::Image(chain(&e)),
                })?,
            None => self.images.layer(sha256).ok_or_else(|| {
                RuntimeError::Image(format!("layer {sha256} is not on this host"))
            })?,
        };
        Ok(layer.path)
    }

    fn spawn(&self, l: Launch) -> Result<Handle, RuntimeError> {
        let spec = container_spec(l, &self.cgroup_parent);
        let spare = self.spare.take();
        let conn = Self::block_on(Shim::spawn_using(
            spare,
            &self.exe,
            &[SHIM_COMMAND.to_string()],
            &self.state_dir,
            &spec,
        ));
        let conn = conn.map_err(|e| RuntimeError::Start(chain(&e)))?;
        Ok(follow(conn))
    }

    fn warm(&self) {
        self.spare
            .enabled
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.refill();
    }

    fn starting(&self) {
        tokio::task::spawn_blocking(prime_cgroup_migration);
    }

    fn prepare(&self) {
        if self
            .spare
            .enabled
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            self.refill();
        }
    }

    fn adopt(&self) -> Vec<(String, Handle)> {
        let mut out = Vec::new();
        for id in Shim::list(&self.state_dir) {
            match Self::block_on(Shim::connect(&self.state_dir, &id)) {
                Ok(conn) => out.push((id, follow(conn))),
                Err(e) => {
                    tracing::warn!(job = %id, error = %chain(&e), "cannot reconnect to the job's shim; cleaning up");
                    self.cleanup(&id);
                }
            }
        }
        out
    }

    fn cleanup(&self, id: &str) {
        if let Err(e) = Shim::cleanup(&self.state_dir, id) {
            tracing::warn!(job = %id, error = %chain(&e), "container cleanup failed");
        }
    }

    /// From the `spec.json` the daemon wrote for the job's shim.
    fn describe(&self, id: &str) -> Option<Described> {
        let path = flynn_container::Layout::new(&self.state_dir, id).spec();
        let spec: ContainerSpec = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())?;
        Some(Described {
            env: spec.env,
            mount_sources: spec.mounts.into_iter().map(|m| m.source).collect(),
            host_network: spec.host_network,
        })
    }
}

/// The container of a job's [`Launch`], its cgroup under `cgroup_parent`.
fn container_spec(l: Launch, cgroup_parent: &str) -> ContainerSpec {
    ContainerSpec {
        id: l.id.clone(),
        layers: l.layers,
        args: l.args,
        env: l.env,
        cwd: l.cwd,
        hostname: l.hostname,
        // No namespace of its own: the host's (a `host_network` job, or no job networking).
        host_network: l.netns.is_none(),
        netns: l.netns,
        mounts: l
            .mounts
            .into_iter()
            .map(|m| BindMount {
                source: m.source,
                target: m.target.to_string_lossy().into_owned(),
                readonly: m.readonly,
            })
            .collect(),
        resources: Resources {
            memory_bytes: l.limits.memory_bytes,
            // Flynn's CPU limit is a weight: shares only, no CFS quota.
            cpu_millis: None,
            cpu_shares: l.limits.cpu_millis.map(|m| m.saturating_mul(1024) / 1000),
            pids: l.limits.pids,
            max_fds: l.limits.max_fds,
        },
        cgroup_parent: cgroup_parent.to_string(),
        uid: l.uid,
        gid: l.gid,
        capabilities: l.capabilities,
        stdin: l.stdin,
        tty: l.tty,
        tty_size: l.tty_size.filter(|_| l.tty),
    }
}

/// Signals waiting for a job's shim connection, at most [`SIGNAL_QUEUE`] different ones.
const SIGNAL_QUEUE: usize = 64;

/// The signals asked for a job and not yet sent to its shim: a bounded queue in which a
/// signal already waiting is not queued again (it is delivered once, as the kernel merges a
/// standard signal pending twice). A client sending signals faster than the shim takes
/// them (attach frames, `PUT .../signal`) fills it to its bound and is then refused
/// ([`std::io::ErrorKind::WouldBlock`]) instead of growing the daemon's memory.
#[derive(Clone)]
struct SignalQueue {
    tx: mpsc::Sender<i32>,
    pending: Arc<std::sync::Mutex<std::collections::HashSet<i32>>>,
}

impl SignalQueue {
    fn new(capacity: usize) -> (SignalQueue, mpsc::Receiver<i32>) {
        let (tx, rx) = mpsc::channel(capacity);
        let q = SignalQueue {
            tx,
            pending: Arc::default(),
        };
        (q, rx)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<i32>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `sig` unless it is waiting already. `ESRCH` once the job's connection has
    /// ended, `WouldBlock` while the queue is full.
    fn send(&self, sig: i32) -> std::io::Result<()> {
        let mut pending = self.pending();
        if pending.contains(&sig) {
            return Ok(());
        }
        match self.tx.try_send(sig) {
            Ok(()) => {
                pending.insert(sig);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "too many signals waiting for the job",
            )),
            // The shim's connection ended with the job: no such process.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH))
            }
        }
    }

    /// `sig` was taken off the queue: asking for it again queues it again.
    fn taken(&self, sig: i32) {
        self.pending().remove(&sig);
    }
}

/// One task owns the shim connection: it forwards events, and sends the signals asked for,
/// the close of stdin and a TTY job's window sizes. The job's stdin (a FIFO the shim made; a
/// TTY job's shim copies it to the terminal) is written directly. An event waits in a slot
/// of its own for room in the daemon's queue (no more is read from the shim meanwhile), so
/// the rest goes on while the daemon is slow to take events.
///
/// The shim keeps every event until it is acknowledged and sends the unacknowledged ones
/// again to the next daemon. So an event is acknowledged only once the daemon has dealt with
/// it ([`Handled`]: output handed to the host's log), not when it enters the queue: a daemon
/// that dies (or restarts) with output queued would otherwise lose those lines.
fn follow(mut conn: ShimConn) -> Handle {
    let (tx, rx) = mpsc::channel(1024);
    let (signals, mut sig_rx) = SignalQueue::new(SIGNAL_QUEUE);
    // Set once, when stdin is closed (a flag, not a queued message: nothing to bound).
    let (close_tx, mut close_rx) = tokio::sync::watch::channel(false);
    let mut closing = true;
    let handled = Handled::default();
    let stdin = conn.stdin_path().map(|path| {
        crate::runtime::stdin_writer(
            move || tokio::net::unix::pipe::OpenOptions::new().open_sender(path),
            move || {
                close_tx.send_replace(true);
            },
        )
    });
    // Window sizes go through a slot holding the latest (a client sending resizes faster
    // than the shim takes them queues nothing: the shim gets the size that is current).
    let (size_tx, mut size_rx) = tokio::sync::watch::channel(None::<(u16, u16)>);
    let mut sizes = conn.is_tty();
    let resize: Option<Resizer> = sizes.then(|| {
        Arc::new(move |rows, cols| {
            size_tx.send_replace(Some((rows, cols)));
        }) as Resizer
    });
    let done = handled.clone();
    let queue = signals.clone();
    tokio::spawn(async move {
        // The ack point after each event forwarded and not yet dealt with, oldest first.
        let mut marks: std::collections::VecDeque<u64> = std::collections::VecDeque::new();
        let mut counted = 0u64;
        conn.limit_acks(conn.ack_point());
        // An event read from the shim and waiting for room in the daemon's queue (whether
        // it is the last). Parked here, not awaited in a `send`: the daemon may take its
        // events slowly (the one client of a `disable_log` job holds them up), and signals,
        // the close of stdin and resizes must reach the shim meanwhile (a stop's SIGTERM and
        // SIGKILL waited behind the job's output).
        let mut parked: Option<(ProcEvent, bool)> = None;
        loop {
            // Room in the daemon's queue (the usual case): an event just read goes at once,
            // without a turn through the `select!`; parked only while the queue is full.
            let ready = match parked.is_some().then(|| tx.try_reserve()) {
                Some(Ok(p)) => Some(p),
                Some(Err(mpsc::error::TrySendError::Closed(()))) => break,
                _ => None,
            };
            let permit = match ready {
                Some(p) => p,
                None => tokio::select! {
                ev = conn.next_event(), if parked.is_none() => {
                    let ev = match ev {
                        Ok(Some(ev)) => ev,
                        Ok(None) => break,
                        Err(e) => {
                            let _ = tx.send(ProcEvent::Failed { reason: format!("lost the job's shim: {}", chain(&e)) }).await;
                            break;
                        }
                    };
                    let last = ev.is_final();
                    marks.push_back(conn.ack_point());
                    parked = Some((convert(ev), last));
                    continue;
                }
                permit = tx.reserve(), if parked.is_some() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = done.changed() => {
                    ack_handled(&mut conn, &done, &mut marks, &mut counted).await;
                    continue;
                }
                Some(sig) = sig_rx.recv() => {
                    queue.taken(sig);
                    if let Err(e) = conn.signal(sig).await {
                        tracing::debug!(job = %conn.id(), sig, error = %chain(&e), "signal failed");
                    }
                    continue;
                }
                r = close_rx.changed(), if closing => {
                    // Once: closed, or the writer is gone without closing (the job ended).
                    closing = false;
                    if r.is_ok() && *close_rx.borrow_and_update() {
                        if let Err(e) = conn.close_stdin().await {
                            tracing::debug!(job = %conn.id(), error = %chain(&e), "closing stdin failed");
                        }
                    }
                    continue;
                }
                r = size_rx.changed(), if sizes => {
                    match r {
                        Ok(()) => {
                            let size = *size_rx.borrow_and_update();
                            if let Some((rows, cols)) = size {
                                if let Err(e) = conn.resize(rows, cols).await {
                                    tracing::debug!(job = %conn.id(), error = %chain(&e), "resizing the terminal failed");
                                }
                            }
                        }
                        // The resizer is gone (the job ended): nothing more to wait for.
                        Err(_) => sizes = false,
                    }
                    continue;
                }
                },
            };
            let Some((ev, last)) = parked.take() else {
                continue;
            };
            permit.send(ev);
            if last {
                // The shim exits once its final event is acknowledged: wait until the
                // daemon has dealt with everything (or stopped listening).
                while !marks.is_empty() {
                    tokio::select! {
                        _ = done.changed() => {}
                        _ = tx.closed() => break,
                    }
                    ack_handled(&mut conn, &done, &mut marks, &mut counted).await;
                }
                break;
            }
        }
    });
    let signal: Signaller = Arc::new(move |sig| signals.send(sig));
    Handle {
        events: rx,
        signal,
        stdin,
        resize,
        handled,
    }
}

/// Raises the shim connection's ack limit past the events the daemon has dealt with since
/// the last call, and sends the acks that allows.
async fn ack_handled(
    conn: &mut ShimConn,
    handled: &Handled,
    marks: &mut std::collections::VecDeque<u64>,
    counted: &mut u64,
) {
    let now = handled.count();
    let mut upto = None;
    while *counted < now {
        match marks.pop_front() {
            Some(m) => upto = Some(m),
            None => break,
        }
        *counted += 1;
    }
    if let Some(m) = upto {
        conn.limit_acks(m);
        if let Err(e) = conn.flush_acks().await {
            tracing::debug!(job = %conn.id(), error = %chain(&e), "acknowledging events failed");
        }
    }
}

fn convert(ev: ShimEvent) -> ProcEvent {
    let stream = |s| match s {
        flynn_container::Stream::Stdout => Stream::Stdout,
        flynn_container::Stream::Stderr => Stream::Stderr,
    };
    match ev {
        ShimEvent::Started { pid } => ProcEvent::Started { pid },
        ShimEvent::Output {
            stream: s,
            line,
            newline,
        } => ProcEvent::Output {
            stream: stream(s),
            line,
            newline,
        },
        ShimEvent::Terminal { data } => ProcEvent::Terminal { data },
        ShimEvent::Dropped { count, .. } => ProcEvent::Dropped { count },
        ShimEvent::Exited {
            code,
            signal,
            oom_killed,
        } => ProcEvent::Exited {
            code: code.unwrap_or(128 + signal.unwrap_or(0)),
            signal,
            oom_killed,
        },
        ShimEvent::Failed { reason } => ProcEvent::Failed { reason },
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        // Some errors already print their source; do not repeat it.
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

/// Starts the kernel's grace period for cgroup migrations ahead of the job's own attach.
///
/// Moving a process between cgroups takes a global lock whose writer side first waits for
/// an RCU grace period unless another migration happened within the last one — here ~20 ms,
/// more than everything else in a job's start. libcontainer's intermediate process attaches
/// itself only after the daemon, the shim and libcontainer have done their part, waiting
/// out the whole period. A no-op migration of the daemon into its own cgroup, issued from a
/// blocking thread when a start begins, sets that period running in parallel: the job's
/// attach then waits only for what is left of it. Errors are ignored (it is only a head
/// start). Blocking.
pub fn prime_cgroup_migration() {
    use std::io::Write;
    let Ok(cg) = std::fs::read_to_string("/proc/self/cgroup") else {
        return;
    };
    // `id:controllers:path`, a v1 hierarchy with a controller (the lock is global: any
    // hierarchy does), else the unified one.
    let pick = cg
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
            Some((ctrl, path))
        })
        .filter(|(ctrl, _)| !ctrl.is_empty() && !ctrl.contains('='))
        .map(|(ctrl, path)| {
            format!(
                "/sys/fs/cgroup/{}{path}",
                ctrl.split(',').next().unwrap_or(ctrl)
            )
        })
        .find(|d| std::path::Path::new(d).join("cgroup.procs").exists());
    let Some(dir) = pick else {
        return;
    };
    let procs = std::path::Path::new(&dir).join("cgroup.procs");
    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&procs) {
        let _ = f.write_all(std::process::id().to_string().as_bytes());
    }
}

#[cfg(test)]
mod tests {
    /// The job API refuses exactly what the container runtime would refuse at start: for
    /// values at and just past each bound, `parse_job` and `ContainerSpec::validate` agree.
    #[test]
    fn api_validation_matches_the_container_spec() {
        use crate::job;
        use crate::runtime::{BindMount, Launch, Limits};

        let (mem, cpu, fd, procs) = (
            job::MEMORY_LIMIT,
            job::CPU_LIMIT,
            job::max_fd_limit(),
            job::MAX_PROCS_LIMIT,
        );
        let mut cases: Vec<String> = Vec::new();
        for (name, range) in [
            ("memory", &mem),
            ("cpu", &cpu),
            ("max_fd", &fd),
            ("max_procs", &procs),
        ] {
            let (lo, hi) = (*range.start(), *range.end());
            for l in [lo - 1, lo, hi, hi.saturating_add(1)] {
                cases.push(format!(r#""resources":{{"{name}":{{"limit":{l}}}}}"#));
            }
        }
        cases.push(r#""resources":{"max_procs":{"limit":9223372036854775807}}"#.to_string());
        for wd in ["", "/", "/app", "app", "./app"] {
            cases.push(format!(
                r#""config":{{"args":["sh"],"working_dir":"{wd}"}}"#
            ));
        }
        for t in ["/a", "/a/../b", "/..", "/a/..b", "/a/b..", "/a/./b", "a"] {
            cases.push(format!(
                r#""config":{{"args":["sh"],"mounts":[{{"location":"/h","target":"{t}"}}]}}"#
            ));
        }
        for case in &cases {
            let mut text = format!(
                r#"{{"mountspecs":[{{"type":"tar","hashes":{{"sha256":"{}"}}}}],{case}"#,
                "a".repeat(64)
            );
            if !case.contains(r#""config""#) {
                text.push_str(r#","config":{"args":["sh"]}"#);
            }
            text.push('}');
            let api = job::parse_job("j", text.as_bytes(), true);
            let j: flynn_api::host::Job = serde_json::from_str(&text).unwrap();
            let launch = Launch {
                id: "j".into(),
                layers: vec!["/layer".into()],
                args: j.config.args.clone(),
                cwd: j.config.working_dir.clone(),
                mounts: BindMount::of(&j.config),
                limits: Limits::of(&j.resources),
                capabilities: j.config.linux_capabilities.clone(),
                ..Launch::default()
            };
            let runtime = super::container_spec(launch, "flynn").validate();
            assert_eq!(
                api.is_ok(),
                runtime.is_ok(),
                "{text}: api {api:?}, runtime {runtime:?}"
            );
        }
    }

    /// What a kept job's accounting reads back from the `spec.json` written for its shim:
    /// its environment, mount sources and whether it runs in the host's network.
    #[test]
    fn describe_reads_the_spec_written_for_the_shim() {
        use crate::runtime::{BindMount, Launch, Runtime};
        let state = tempfile::tempdir().unwrap();
        let images = tempfile::tempdir().unwrap();
        let rt = super::ContainerRuntime::open(state.path(), images.path(), "flynn").unwrap();
        assert!(rt.describe("j").is_none(), "no spec yet");
        let mount = BindMount {
            source: "/var/lib/flynn/volumes/v1/data".into(),
            target: "/data".into(),
            readonly: false,
        };
        for netns in [None, Some(std::path::PathBuf::from("/run/netns/j"))] {
            let launch = Launch {
                id: "j".into(),
                layers: vec!["/layer".into()],
                args: vec!["sh".into()],
                env: vec!["PORT=5000".into(), "FLYNN_APP_ID=app".into()],
                mounts: vec![mount.clone()],
                netns: netns.clone(),
                ..Launch::default()
            };
            let spec = super::container_spec(launch, "flynn");
            let path = flynn_container::Layout::new(state.path(), "j").spec();
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
            let d = rt.describe("j").expect("described");
            assert_eq!(d.env("FLYNN_APP_ID"), Some("app"));
            assert_eq!(d.ports(), [5000]);
            assert_eq!(d.mount_sources, std::slice::from_ref(&mount.source));
            assert_eq!(d.host_network, netns.is_none());
        }
        std::fs::write(flynn_container::Layout::new(state.path(), "j").spec(), b"{").unwrap();
        assert!(rt.describe("j").is_none(), "an unreadable spec");
    }

    /// A job's `cpu` limit is a weight, as in Flynn: `cpu.shares` = limit × 1.024, no quota.
    #[test]
    fn cpu_limit_is_shares_only() {
        use crate::runtime::{Launch, Limits};
        let launch = Launch {
            id: "j".into(),
            layers: vec!["/layer".into()],
            args: vec!["sh".into()],
            limits: Limits {
                cpu_millis: Some(500),
                ..Limits::default()
            },
            ..Launch::default()
        };
        let spec = super::container_spec(launch, "flynn");
        assert_eq!(spec.resources.cpu_millis, None);
        assert_eq!(spec.resources.cpu_shares, Some(512));
        let c = spec.oci_config(std::path::Path::new("/r"));
        assert_eq!(
            c["linux"]["resources"]["cpu"],
            serde_json::json!({"shares": 512})
        );
    }

    /// Resizes of a TTY job's terminal are coalesced to the latest size: a client flooding
    /// them while the shim is not reading queues nothing in the daemon, and the shim gets
    /// the size asked for last. (A fake shim: the control socket of a state dir holding a
    /// TTY job's spec, never read until the flood is over.)
    #[tokio::test]
    async fn resizes_are_coalesced_to_the_latest() {
        use tokio::io::AsyncReadExt;

        let dir = tempfile::tempdir().unwrap();
        let layout = flynn_container::Layout::new(dir.path(), "j");
        std::fs::create_dir_all(&layout.dir).unwrap();
        let launch = crate::runtime::Launch {
            id: "j".into(),
            layers: vec!["/layer".into()],
            args: vec!["sh".into()],
            tty: true,
            ..crate::runtime::Launch::default()
        };
        let spec = super::container_spec(launch, "flynn");
        std::fs::write(layout.spec(), serde_json::to_vec(&spec).unwrap()).unwrap();
        let listener = tokio::net::UnixListener::bind(layout.socket()).unwrap();
        let conn = flynn_container::Shim::connect(dir.path(), "j")
            .await
            .unwrap();
        let (mut shim, _) = listener.accept().await.unwrap();
        let handle = super::follow(conn);
        let resize = handle.resize.clone().expect("a TTY job can be resized");
        for i in 0..100_000u32 {
            resize((i % 1000) as u16 + 1, 80);
        }
        resize(42, 43);
        // Frames (kind, u32 length, payload) until the last size: RESIZE is kind 13.
        let mut buf = Vec::new();
        let mut sizes = Vec::new();
        while sizes.last() != Some(&(42u16, 43u16)) {
            let mut chunk = [0u8; 65536];
            let n = tokio::time::timeout(std::time::Duration::from_secs(10), shim.read(&mut chunk))
                .await
                .expect("the last size within 10 s")
                .unwrap();
            assert!(n > 0, "the connection ended; sizes {sizes:?}");
            buf.extend_from_slice(&chunk[..n]);
            while buf.len() >= 5 {
                let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                if buf.len() < 5 + len {
                    break;
                }
                let f: Vec<u8> = buf.drain(..5 + len).collect();
                if f[0] == 13 {
                    let p = &f[5..];
                    sizes.push((
                        u16::from_be_bytes([p[0], p[1]]),
                        u16::from_be_bytes([p[2], p[3]]),
                    ));
                }
            }
        }
        assert!(sizes.len() <= 2, "{} sizes sent", sizes.len());
        drop(handle);
    }

    /// Signals reach the shim while the daemon does not take the job's events (the one
    /// client of a `disable_log` job holds its output up): the task owning the connection
    /// used to wait in a `send` of the next event, and a stop's SIGTERM and SIGKILL never
    /// went out. (A fake shim: it floods output events the handle never takes.)
    #[tokio::test]
    async fn signals_go_out_while_events_wait() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let dir = tempfile::tempdir().unwrap();
        let layout = flynn_container::Layout::new(dir.path(), "j");
        std::fs::create_dir_all(&layout.dir).unwrap();
        let listener = tokio::net::UnixListener::bind(layout.socket()).unwrap();
        let conn = flynn_container::Shim::connect(dir.path(), "j")
            .await
            .unwrap();
        let (mut shim, _) = listener.accept().await.unwrap();
        let handle = super::follow(conn);
        // HELLO (kind 0: next seq 0, pid 0), then output lines (kind 2) beyond the queue.
        let mut out = vec![0u8, 0, 0, 0, 12];
        out.extend_from_slice(&[0; 12]);
        for _ in 0..3000 {
            out.extend_from_slice(&[2, 0, 0, 0, 1, b'x']);
        }
        shim.write_all(&out).await.unwrap();
        // Until the daemon's queue is full and an event waits for room.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        (handle.signal)(nix::libc::SIGTERM).unwrap();
        // Frames (kind, u32 length, payload) until the signal: SIGNAL is kind 11.
        let mut buf = Vec::new();
        let found = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                let mut chunk = [0u8; 4096];
                let n = shim.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the connection ended");
                buf.extend_from_slice(&chunk[..n]);
                while buf.len() >= 5 {
                    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                    if buf.len() < 5 + len {
                        break;
                    }
                    let f: Vec<u8> = buf.drain(..5 + len).collect();
                    if f[0] == 11 && f[5..] == nix::libc::SIGTERM.to_be_bytes() {
                        return;
                    }
                }
            }
        })
        .await;
        assert!(found.is_ok(), "the signal never reached the shim");
        drop(handle);
    }

    /// Signals for a job's shim wait in a bounded queue: one already waiting is not queued
    /// again, and a new one is refused (`WouldBlock`) while the queue is full, so a client
    /// flooding signals grows nothing in the daemon. (It was an unbounded channel.)
    /// With every signal 1-64 waiting at once (`Host::signal` refuses any other number),
    /// the queue still takes any of them again: the stop path's SIGTERM and SIGKILL are
    /// never refused for a full queue.
    #[tokio::test]
    async fn the_queue_has_room_for_every_valid_signal() {
        let (q, _rx) = super::SignalQueue::new(super::SIGNAL_QUEUE);
        for sig in 1..=64 {
            q.send(sig).unwrap();
        }
        q.send(nix::libc::SIGTERM).unwrap();
        q.send(nix::libc::SIGKILL).unwrap();
    }

    #[tokio::test]
    async fn signals_are_coalesced_and_bounded() {
        let (q, mut rx) = super::SignalQueue::new(4);
        for _ in 0..10_000 {
            q.send(15).unwrap();
        }
        for sig in [1, 2, 10] {
            q.send(sig).unwrap();
        }
        let e = q.send(12).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        // A signal already waiting is still fine while the queue is full.
        q.send(2).unwrap();
        let mut got = Vec::new();
        while let Ok(sig) = rx.try_recv() {
            q.taken(sig);
            got.push(sig);
        }
        assert_eq!(got, [15, 1, 2, 10]);
        // Taken off the queue: it may be asked for again.
        q.send(15).unwrap();
        assert_eq!(rx.try_recv().ok(), Some(15));
        drop(rx);
        let e = q.send(9).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(nix::libc::ESRCH));
    }

    /// The head start is a no-op migration: the process stays in the cgroups it was in.
    #[test]
    fn priming_the_migration_lock_moves_nothing() {
        let before = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let t0 = std::time::Instant::now();
        super::prime_cgroup_migration();
        super::prime_cgroup_migration();
        assert!(t0.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(
            std::fs::read_to_string("/proc/self/cgroup").unwrap(),
            before
        );
    }
}
