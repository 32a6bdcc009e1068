//! The lifecycle against a fake runtime whose starts can be held open.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use flynn_api::host::{Job, JobStatus};
use flynn_api::ErrorCode;
use tokio::sync::mpsc;

use crate::host::{Host, Options};
use crate::logship::{Shipper, Stream};
use crate::runtime::{Handle, Launch, ProcEvent, Runtime, RuntimeError};
use crate::store::Store;

mod network;

/// Starts block until the gate opens; each started job gets an event channel the test
/// drives.
#[derive(Default)]
struct Fake {
    open: Mutex<bool>,
    cv: Condvar,
    /// Starts that reached the runtime.
    entered: std::sync::atomic::AtomicUsize,
    jobs: Mutex<BTreeMap<String, mpsc::Sender<ProcEvent>>>,
    signals: Arc<Mutex<Vec<(String, i32)>>>,
    /// While set, signals fail as for a process that is gone (`ESRCH`).
    gone: Arc<std::sync::atomic::AtomicBool>,
    /// Jobs [`Runtime::cleanup`] was called for.
    cleaned: Mutex<Vec<String>>,
    /// The bind mounts each started job was given.
    mounts: Mutex<BTreeMap<String, Vec<crate::runtime::BindMount>>>,
    /// Jobs get a network namespace of their own (they wait for the job network).
    isolate: std::sync::atomic::AtomicBool,
    /// While set, [`Runtime::cleanup`] hangs (after noting the job in `cleaned`).
    hold_cleanup: Mutex<bool>,
    cleanup_cv: Condvar,
    /// Jobs [`Runtime::adopt`] finds still running (a daemon restart). Their events are the
    /// test's to send, `Started` first as a shim does for every new daemon.
    survivors: Mutex<Vec<String>>,
    /// The previous daemon's ends of adopted jobs, kept open so its supervisors never see
    /// their jobs end (and record or clean up anything).
    retired: Mutex<Vec<mpsc::Sender<ProcEvent>>>,
    /// Jobs need image layers, and each layer import runs until it is cancelled (at most
    /// 20 s), as a large import would.
    images: std::sync::atomic::AtomicBool,
    /// Layer imports begun, and those given up because they were cancelled.
    imports: std::sync::atomic::AtomicUsize,
    imports_cancelled: std::sync::atomic::AtomicUsize,
}

impl Fake {
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }

    fn events(&self, id: &str) -> mpsc::Sender<ProcEvent> {
        self.jobs.lock().unwrap()[id].clone()
    }

    fn hold_cleanup(&self, hold: bool) {
        *self.hold_cleanup.lock().unwrap() = hold;
        self.cleanup_cv.notify_all();
    }
}

impl Runtime for Fake {
    fn needs_image(&self) -> bool {
        self.images.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn isolates_network(&self) -> bool {
        self.isolate.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn layer(
        &self,
        _: Option<&Path>,
        _: &str,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<PathBuf, RuntimeError> {
        use std::sync::atomic::Ordering::SeqCst;
        self.imports.fetch_add(1, SeqCst);
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < until {
            if cancelled() {
                self.imports_cancelled.fetch_add(1, SeqCst);
                return Err(RuntimeError::Cancelled);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(RuntimeError::Image("import took 20 s".into()))
    }

    fn spawn(&self, l: Launch) -> Result<Handle, RuntimeError> {
        self.entered
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
        drop(open);
        if l.args[0] == "fail" {
            return Err(RuntimeError::Start("no such binary".into()));
        }
        self.mounts
            .lock()
            .unwrap()
            .insert(l.id.clone(), l.mounts.clone());
        let (tx, rx) = mpsc::channel(16);
        let _ = tx.try_send(ProcEvent::Started { pid: 42 });
        self.jobs.lock().unwrap().insert(l.id.clone(), tx);
        let signals = self.signals.clone();
        let gone = self.gone.clone();
        let id = l.id;
        Ok(Handle {
            events: rx,
            signal: Arc::new(move |sig| {
                if gone.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
                }
                signals.lock().unwrap().push((id.clone(), sig));
                Ok(())
            }),
            stdin: None,
            resize: None,
            handled: Default::default(),
        })
    }

    fn adopt(&self) -> Vec<(String, Handle)> {
        let survivors = std::mem::take(&mut *self.survivors.lock().unwrap());
        survivors
            .into_iter()
            .map(|id| {
                let (tx, rx) = mpsc::channel(16);
                if let Some(old) = self.jobs.lock().unwrap().insert(id.clone(), tx) {
                    self.retired.lock().unwrap().push(old);
                }
                let signals = self.signals.clone();
                let jid = id.clone();
                let h = Handle {
                    events: rx,
                    signal: Arc::new(move |sig| {
                        signals.lock().unwrap().push((jid.clone(), sig));
                        Ok(())
                    }),
                    stdin: None,
                    resize: None,
                    handled: Default::default(),
                };
                (id, h)
            })
            .collect()
    }

    fn cleanup(&self, id: &str) {
        self.cleaned.lock().unwrap().push(id.to_string());
        let mut hold = self.hold_cleanup.lock().unwrap();
        while *hold {
            hold = self.cleanup_cv.wait(hold).unwrap();
        }
    }
}

fn host(rt: Arc<Fake>, dir: &Path, max_starting: usize) -> Arc<Host> {
    host_with(rt, dir, max_starting, None)
}

/// A host on a fresh state dir whose fake runtime starts jobs at once.
fn open_host() -> (tempfile::TempDir, Arc<Fake>, Arc<Host>) {
    let d = tempfile::tempdir().unwrap();
    let rt = Arc::new(Fake::default());
    rt.open();
    let h = host(rt.clone(), d.path(), 0);
    (d, rt, h)
}

/// With `net_setup`, jobs of an isolating runtime wait for `POST /host/network`.
fn host_with(
    rt: Arc<Fake>,
    dir: &Path,
    max_starting: usize,
    net_setup: Option<crate::net::Setup>,
) -> Arc<Host> {
    let store = Store::open(dir, crate::syncer::Syncer::start()).unwrap();
    host_on(rt, dir, max_starting, net_setup, store)
}

/// As [`host_with`], on a given store.
fn host_on(
    rt: Arc<Fake>,
    dir: &Path,
    max_starting: usize,
    net_setup: Option<crate::net::Setup>,
    store: Store,
) -> Arc<Host> {
    Host::new(options(rt, dir, max_starting, net_setup, store))
}

/// The options [`host_on`] starts a host with.
fn options(
    rt: Arc<Fake>,
    dir: &Path,
    max_starting: usize,
    net_setup: Option<crate::net::Setup>,
    store: Store,
) -> Options {
    Options {
        id: "h".into(),
        runtime: rt,
        store,
        logs: Shipper::start("h", Vec::new(), 10),
        discoverd: None,
        network: None,
        net_setup,
        net_resolvers: Vec::new(),
        net_job_id: String::new(),
        net_before_reboot: false,
        external_ip: "127.0.0.1".parse().unwrap(),
        tags: BTreeMap::new(),
        resolvers: Vec::new(),
        state_dir: dir.to_path_buf(),
        max_starting,
        volumes: crate::volumes::Volumes::open(
            &dir.join("volumes"),
            "h",
            crate::syncer::Syncer::start(),
        )
        .unwrap(),
        fault_exit_before_teardown: false,
        fault_slow_output: std::time::Duration::ZERO,
        attach_limits: crate::attach::Limits::default(),
    }
}

fn job(id: &str, arg: &str) -> Job {
    let mut j = Job {
        id: id.into(),
        ..Job::default()
    };
    j.config.args = vec![arg.into()];
    j.config.stop_timeout = Some(1);
    j
}

/// The job's process exits with status 0.
async fn exit_cleanly(rt: &Fake, id: &str) {
    rt.events(id)
        .send(ProcEvent::Exited {
            code: 0,
            signal: None,
            oom_killed: false,
        })
        .await
        .unwrap();
}

/// The next event of `kind` within 3 s, with the kinds seen up to it (`None` on timeout).
async fn next_event(
    events: &mut tokio::sync::broadcast::Receiver<flynn_api::host::Event>,
    kind: flynn_api::host::EventKind,
) -> Option<(flynn_api::host::Event, Vec<flynn_api::host::EventKind>)> {
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            let ev = events.recv().await.unwrap();
            seen.push(ev.event);
            if ev.event == kind {
                return ev;
            }
        }
    })
    .await
    .ok()
    .map(|ev| (ev, seen))
}

async fn wait_status(h: &Host, id: &str, want: JobStatus) {
    for _ in 0..500 {
        if h.get(id).map(|j| j.status) == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{id}: not {want:?}: {:?}", h.get(id));
}

/// A stop while a job's image layer imports gives the import up: the job ends at once as
/// stopped (done), without waiting for the import, and nothing is started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_the_layer_import_cancels_it() {
    use std::sync::atomic::Ordering::SeqCst;
    let d = tempfile::tempdir().unwrap();
    let rt = Arc::new(Fake::default());
    rt.images.store(true, SeqCst);
    rt.open();
    let h = host(rt.clone(), d.path(), 0);
    let mut j = job("img", "x");
    j.mountspecs = vec![flynn_api::host::MountSpec {
        kind: "tar".into(),
        url: "file:///layers/big.tar".into(),
        hashes: [("sha256".to_string(), "ab".repeat(32))].into(),
        ..Default::default()
    }];
    h.add_job(j).await.unwrap();
    for _ in 0..500 {
        if rt.imports.load(SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(rt.imports.load(SeqCst), 1, "the import began");
    let t0 = std::time::Instant::now();
    h.stop("img").await.unwrap();
    // wait_status gives up after 5 s; the import alone would take 20 s.
    wait_status(&h, "img", JobStatus::Done).await;
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(rt.imports_cancelled.load(SeqCst), 1);
    let ended = h.get("img").unwrap();
    assert_eq!(ended.error.as_deref(), Some("stopped before it started"));
    assert_eq!(rt.entered.load(SeqCst), 0, "nothing was started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_start_limit_is_429_with_retry() {
    let d = tempfile::tempdir().unwrap();
    let rt = Arc::new(Fake::default());
    let h = host(rt.clone(), d.path(), 2);
    h.add_job(job("a", "x")).await.unwrap();
    h.add_job(job("b", "x")).await.unwrap();
    let e = h.add_job(job("c", "x")).await.unwrap_err();
    assert_eq!((e.code, e.retry), (ErrorCode::Ratelimited, true));
    assert_eq!(e.status(), 429);
    // A duplicate is still a conflict, not a rate limit.
    assert_eq!(
        h.add_job(job("a", "x")).await.unwrap_err().code,
        ErrorCode::Conflict
    );
    rt.open();
    wait_status(&h, "a", JobStatus::Running).await;
    wait_status(&h, "b", JobStatus::Running).await;
    h.add_job(job("c", "x")).await.unwrap();
    wait_status(&h, "c", JobStatus::Running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_while_starting_then_lifecycle() {
    let d = tempfile::tempdir().unwrap();
    let rt = Arc::new(Fake::default());
    let h = host(rt.clone(), d.path(), 0);

    // Stopped while the runtime is still starting it: SIGTERM as soon as it runs.
    h.add_job(job("s", "x")).await.unwrap();
    for _ in 0..500 {
        if rt.entered.load(std::sync::atomic::Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.stop("s").await.unwrap();
    assert!(h.get("s").unwrap().force_stop);
    rt.open();
    wait_status(&h, "s", JobStatus::Running).await;
    for _ in 0..200 {
        if !rt.signals.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(rt.signals.lock().unwrap()[0], ("s".to_string(), 15));
    // Ignored: SIGKILL after the 1 s timeout.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(rt.signals.lock().unwrap()[1], ("s".to_string(), 9));
    rt.events("s")
        .send(ProcEvent::Exited {
            code: 137,
            signal: Some(9),
            oom_killed: false,
        })
        .await
        .unwrap();
    wait_status(&h, "s", JobStatus::Done).await;

    // A start error fails the job with the reason.
    h.add_job(job("f", "fail")).await.unwrap();
    wait_status(&h, "f", JobStatus::Failed).await;
    assert_eq!(h.get("f").unwrap().error.as_deref(), Some("no such binary"));
    // What the runtime may have left of the failed start is cleaned up.
    assert!(rt.cleaned.lock().unwrap().contains(&"f".to_string()));

    // Output is accepted (no aggregator: nothing shipped, nothing counted as dropped).
    h.add_job(job("o", "x")).await.unwrap();
    wait_status(&h, "o", JobStatus::Running).await;
    let tx = rt.events("o");
    tx.send(ProcEvent::Output {
        stream: Stream::Stdout,
        line: b"hi".to_vec(),
        newline: true,
    })
    .await
    .unwrap();
    tx.send(ProcEvent::Dropped { count: 3 }).await.unwrap();
    // The runtime going away without an exit: the job ran, so it crashed (it did not fail
    // to start), with the reason.
    drop(tx);
    rt.jobs.lock().unwrap().remove("o");
    wait_status(&h, "o", JobStatus::Crashed).await;
    assert_eq!(
        h.get("o").unwrap().error.as_deref(),
        Some("lost contact with the job")
    );
    assert_eq!(h.log_stats().dropped, 3);

    // Everything was persisted.
    let stored = Store::open(d.path(), crate::syncer::Syncer::start())
        .unwrap()
        .load();
    assert_eq!(stored.len(), 3);
    assert!(stored.iter().all(|j| j.status.is_terminal()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_are_exclusive_mounted_and_deleted_on_stop() {
    use crate::runtime::BindMount;
    use flynn_api::host::{VolumeBinding, VolumeCreate};

    let (d, rt, h) = open_host();
    let vols = h.volumes().clone();
    let keep = vols.create(VolumeCreate::default(), "t".into()).unwrap();
    let temp = vols.create(VolumeCreate::default(), "t".into()).unwrap();
    let bind = |vol: &str, target: &str, writeable: bool, delete_on_stop: bool| VolumeBinding {
        target: target.into(),
        volume: vol.into(),
        writeable,
        delete_on_stop,
    };
    let mut a = job("a", "x");
    a.config.volumes = vec![
        bind(&keep.id, "/data", true, false),
        bind(&temp.id, "/scratch", false, true),
    ];
    h.add_job(a).await.unwrap();
    wait_status(&h, "a", JobStatus::Running).await;
    assert_eq!(
        rt.mounts.lock().unwrap()["a"],
        [
            BindMount {
                source: vols.data_path(&keep.id).unwrap(),
                target: "/data".into(),
                readonly: false,
            },
            BindMount {
                source: vols.data_path(&temp.id).unwrap(),
                target: "/scratch".into(),
                readonly: true,
            },
        ]
    );

    // Held by a running job: another job and a deletion are refused.
    let mut b = job("b", "x");
    b.config.volumes = vec![bind(&keep.id, "/data", false, false)];
    let e = h.add_job(b.clone()).await.unwrap_err();
    assert_eq!(
        (e.code, e.message.clone()),
        (
            ErrorCode::Conflict,
            format!("volume {} is in use by job a", keep.id)
        )
    );
    assert!(h.get("b").is_none());
    let e = h.delete_volume(&keep.id).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);
    let e = h
        .delete_volume("11111111-2222-4333-8444-555555555555")
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ObjectNotFound);

    // The job ends: its delete_on_stop volume goes, the other stays and is free again.
    exit_cleanly(&rt, "a").await;
    wait_status(&h, "a", JobStatus::Done).await;
    assert!(vols.get(&temp.id).is_none());
    assert_eq!(vols.list(), vec![keep.clone()]);
    h.add_job(b).await.unwrap();
    wait_status(&h, "b", JobStatus::Running).await;

    // A job naming a volume that does not exist fails before the runtime is asked.
    let mut c = job("c", "x");
    c.config.volumes = vec![bind(&temp.id, "/data", true, false)];
    h.add_job(c).await.unwrap();
    wait_status(&h, "c", JobStatus::Failed).await;
    assert_eq!(
        h.get("c").unwrap().error,
        Some(format!("volume: unknown volume {}", temp.id))
    );
    assert!(!rt.mounts.lock().unwrap().contains_key("c"));

    // Deleting a free volume.
    exit_cleanly(&rt, "b").await;
    wait_status(&h, "b", JobStatus::Done).await;
    h.delete_volume(&keep.id).await.unwrap();
    assert!(vols.list().is_empty());
    assert!(!d.path().join("volumes").join(&keep.id).exists());
}

/// A volume create stalled on the disk (a slow fsync of its record) holds up no job or
/// volume request. The create used to hold the volume table's lock across its I/O, while a
/// deletion (or a job's end) waits for that lock holding the job table's: every job request
/// then waited for the disk too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_volume_create_holds_up_no_other_request() {
    use flynn_api::host::VolumeCreate;

    let (_d, _rt, h) = open_host();
    h.add_job(job("a", "x")).await.unwrap();
    wait_status(&h, "a", JobStatus::Running).await;
    let vols = h.volumes().clone();
    let other = vols.create(VolumeCreate::default(), "t".into()).unwrap();
    struct Release(crate::volumes::Volumes);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.faults().write.hold(false);
        }
    }
    let _release = Release(vols.clone());
    vols.faults().write.hold(true);
    let creating = tokio::task::spawn_blocking({
        let vols = vols.clone();
        move || vols.create(VolumeCreate::default(), "t".into())
    });
    tokio::task::spawn_blocking({
        let vols = vols.clone();
        move || vols.faults().write.wait_stalled(1)
    })
    .await
    .unwrap();
    // From another thread: a held lock blocks it, however the runtime fares.
    let (tx, rx) = std::sync::mpsc::channel();
    let (h2, rt) = (h.clone(), tokio::runtime::Handle::current());
    let oid = other.id.clone();
    std::thread::spawn(move || {
        let deleted = rt.block_on(h2.delete_volume(&oid)).is_ok();
        let status = h2.get("a").map(|j| j.status);
        let listed = h2.volumes().list().len();
        let _ = tx.send((deleted, status, listed));
    });
    let answered = rx
        .recv_timeout(Duration::from_secs(2))
        .expect("requests held up by a stalled volume create");
    assert_eq!(answered, (true, Some(JobStatus::Running), 0));
    vols.faults().write.hold(false);
    let made = creating.await.unwrap().unwrap();
    assert_eq!(vols.list(), [made]);
    exit_cleanly(&_rt, "a").await;
    wait_status(&h, "a", JobStatus::Done).await;
}

/// A job with one TCP port registered as service `web`.
fn web_job(id: &str) -> Job {
    let mut j = job(id, "x");
    j.config.ports = vec![flynn_api::host::Port {
        port: 0,
        proto: "tcp".into(),
        service: Some(flynn_api::host::Service {
            name: "web".into(),
            create: true,
            check: None,
        }),
    }];
    j
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deregistration_while_starting_keeps_the_job_out_of_discoverd() {
    let d = tempfile::tempdir().unwrap();
    let rt = Arc::new(Fake::default());
    let h = host(rt.clone(), d.path(), 0);
    h.add_job(web_job("a")).await.unwrap();
    // Held in the runtime's start.
    while rt.entered.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(h.deregister("a").await);
    rt.open();
    wait_status(&h, "a", JobStatus::Running).await;
    // A job that starts without it has its instances to announce.
    h.add_job(web_job("b")).await.unwrap();
    wait_status(&h, "b", JobStatus::Running).await;
    assert!(announced_soon(&h, "b").await, "b never announced");
    // By now a's registration would have happened too.
    assert!(!h.announced("a"), "registered after being deregistered");
}

/// Signals outside 1-64 (attach frames carry any number) are refused before they reach the
/// job's runtime: queued, 64 distinct ones filled the job's signal queue, and the stop
/// path's SIGTERM and SIGKILL found it full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_outside_1_to_64_never_reach_the_runtime() {
    let (_d, rt, h) = open_host();
    h.add_job(job("a", "x")).await.unwrap();
    wait_status(&h, "a", JobStatus::Running).await;
    for sig in [0, 65, 1000, -1, i32::MIN] {
        let e = h.signal("a", sig).unwrap_err();
        assert_eq!(e.code, ErrorCode::ValidationError, "{sig}");
    }
    assert!(
        rt.signals.lock().unwrap().is_empty(),
        "a bad signal was sent"
    );
    h.signal("a", 64).unwrap();
    assert_eq!(rt.signals.lock().unwrap().clone(), [("a".to_string(), 64)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_that_finds_the_process_gone_is_a_conflict() {
    let (_d, rt, h) = open_host();
    h.add_job(job("a", "x")).await.unwrap();
    wait_status(&h, "a", JobStatus::Running).await;
    h.signal("a", 10).unwrap();
    // The process ended, and its end is not recorded yet: as a moment later, 409.
    rt.gone.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = h.signal("a", 10).unwrap_err();
    assert_eq!(
        (e.code, e.message.as_str()),
        (ErrorCode::Conflict, "host: job is not running")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_is_recorded_before_deregistration_and_cleanup() {
    use flynn_api::host::EventKind;

    let (d, rt, h) = open_host();
    let mut events = h.subscribe();
    h.add_job(job("a", "x")).await.unwrap();
    wait_status(&h, "a", JobStatus::Running).await;

    // The runtime's cleanup hangs: the end is persisted and announced all the same.
    rt.hold_cleanup(true);
    // Released however the test ends (a hung blocking task would keep the runtime alive).
    struct Release(Arc<Fake>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.hold_cleanup(false);
        }
    }
    let _release = Release(rt.clone());
    exit_cleanly(&rt, "a").await;
    let (stop, _) = next_event(&mut events, EventKind::Stop)
        .await
        .expect("no stop event while the runtime cleanup hangs");
    assert_eq!(
        (stop.job_id.as_str(), stop.job.status),
        ("a", JobStatus::Done)
    );
    let stored = Store::open(d.path(), crate::syncer::Syncer::start())
        .unwrap()
        .load();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].status, JobStatus::Done);
    // An ended job cannot be signalled any more.
    assert_eq!(h.signal("a", 1).unwrap_err().code, ErrorCode::Conflict);

    // A daemon that dies now restores the job as done, not as lost.
    let h2 = host(Arc::new(Fake::default()), d.path(), 0);
    h2.restore().await;
    let j = h2.get("a").unwrap();
    assert_eq!((j.status, j.error), (JobStatus::Done, None));

    // The cleanup still runs (it was entered, and finishes once released).
    for _ in 0..200 {
        if rt.cleaned.lock().unwrap().contains(&"a".to_string()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(rt.cleaned.lock().unwrap().contains(&"a".to_string()));
}

/// An open fake runtime whose jobs get a network of their own, and the job network setup
/// (bridge `bridge`, state under `dir`) a host waits for `POST /host/network` with.
fn isolating(dir: &Path, bridge: &str) -> (Arc<Fake>, crate::net::Setup) {
    let rt = Arc::new(Fake::default());
    rt.open();
    rt.isolate.store(true, std::sync::atomic::Ordering::SeqCst);
    let setup = crate::net::Setup {
        state_dir: dir.to_path_buf(),
        bridge: bridge.into(),
        mtu: 1500,
        sync: crate::syncer::Syncer::start(),
        pool_size: 0,
        fast_path: None,
        boot_id: "boot-1".into(),
    };
    (rt, setup)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_while_waiting_for_the_network_ends_done() {
    let d = tempfile::tempdir().unwrap();
    let (rt, setup) = isolating(d.path(), "flynnbr-test");
    let h = host_with(rt.clone(), d.path(), 0, Some(setup));
    h.add_job(job("n", "x")).await.unwrap();
    // No `POST /host/network` comes: the start waits (up to a minute).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.get("n").unwrap().status, JobStatus::Starting);

    h.stop("n").await.unwrap();
    // Done at once (spec §5.3: marked done when the container does not exist yet), and
    // the runtime was never asked to start it.
    wait_status(&h, "n", JobStatus::Done).await;
    let j = h.get("n").unwrap();
    assert_eq!(j.error.as_deref(), Some("stopped before it started"));
    assert!(j.force_stop);
    assert_eq!(rt.entered.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(
        h.stop("n").await.unwrap_err().message,
        "host: job is already stopped"
    );
}

/// A job that ends while a network move (`POST /host/network` with another block) has the
/// network out of service still gets its namespace removed: the teardown waits for the move,
/// which puts the old network back since the job still held an address. Root: the job
/// network is real, made inside a namespace of the test's own.
#[test]
fn a_job_ending_during_a_network_move_is_still_torn_down() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    network::in_netns("move", network_move_window);
}

async fn network_move_window() {
    let d = tempfile::tempdir().unwrap();
    let (rt, setup) = isolating(d.path(), "flynnbr-mv");
    let h = host_with(rt.clone(), d.path(), 0, Some(setup));
    h.configure_network(&flynn_api::host::NetworkConfig {
        subnet: "100.100.9.0/24".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let id = format!("mv{}", std::process::id());
    h.add_job(job(&id, "x")).await.unwrap();
    wait_status(&h, &id, JobStatus::Running).await;
    let netns = flynn_network::job::netns_path(&id);
    // Whatever happens below, the job's namespace goes with the test.
    struct Gone(PathBuf);
    impl Drop for Gone {
        fn drop(&mut self) {
            if let Some(n) = self.0.file_name().and_then(|n| n.to_str()) {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", n])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
    let _gone = Gone(netns.clone());
    assert!(netns.exists(), "{netns:?}");

    // The move's window, held open: out of service under `net_config`.
    let old = h.network().unwrap();
    let guard = h.net_config.lock().await;
    h.set_network(None);
    exit_cleanly(&rt, &id).await;
    wait_status(&h, &id, JobStatus::Done).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(netns.exists(), "torn down while the move was under way");
    // The move finds the job's address and puts the old network back.
    h.set_network(Some(old.clone()));
    drop(guard);
    for _ in 0..300 {
        if !netns.exists() && old.address_of(&id).is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!netns.exists(), "the job's namespace was left behind");
    assert_eq!(old.address_of(&id), None, "its address was left allocated");
}

/// A job state that cannot be saved (a full or failing disk) is saved again later: the file
/// a restarted daemon reads catches up with the job instead of staying at the state before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_state_that_could_not_be_saved_is_saved_again() {
    let d = tempfile::tempdir().unwrap();
    let rt = Arc::new(Fake::default());
    let store = Store::open(d.path(), crate::syncer::Syncer::start()).unwrap();
    let h = host_on(rt.clone(), d.path(), 0, None, store.clone());
    let on_disk = || -> JobStatus {
        let bytes = std::fs::read(d.path().join("jobs").join("j.json")).unwrap();
        serde_json::from_slice::<flynn_api::host::ActiveJob>(&bytes)
            .unwrap()
            .status
    };
    h.add_job(job("j", "x")).await.unwrap();
    assert_eq!(on_disk(), JobStatus::Starting);
    // The save of `running` fails, and so does the first retry.
    store
        .faults()
        .fail
        .store(2, std::sync::atomic::Ordering::Relaxed);
    rt.open();
    wait_status(&h, "j", JobStatus::Running).await;
    assert_eq!(
        on_disk(),
        JobStatus::Starting,
        "the failed save wrote nothing"
    );
    let t0 = std::time::Instant::now();
    while on_disk() != JobStatus::Running && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(on_disk(), JobStatus::Running, "not saved again within 10 s");
    assert_eq!(
        store
            .faults()
            .fail
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "both failures were used"
    );
    // Later transitions save as usual.
    exit_cleanly(&rt, "j").await;
    wait_status(&h, "j", JobStatus::Done).await;
    assert_eq!(on_disk(), JobStatus::Done);
}

/// The status of job `id` in its record on disk.
fn status_on_disk(dir: &Path, id: &str) -> flynn_api::host::ActiveJob {
    let bytes = std::fs::read(dir.join("jobs").join(format!("{id}.json"))).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// Lets the record disk go again however a test ends (a failed assertion included).
struct Unstall(Store);

impl Drop for Unstall {
    fn drop(&mut self) {
        self.0.faults().hold(false);
    }
}

/// A record write that stalls (a slow or hung disk) holds up only what waits for that
/// record: requests about another job are answered meanwhile, while the stalled change is
/// neither shown nor announced, and a stop is neither answered nor sent before its record is
/// written. Records used to be written and fsynced on a runtime thread under the job table's
/// lock, so one slow fsync held up every request that looked at any job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_record_write_holds_up_no_other_job() {
    use flynn_api::host::EventKind;
    use std::sync::atomic::Ordering::SeqCst;

    let d = tempfile::tempdir().unwrap();
    let rt = Arc::new(Fake::default());
    rt.open();
    let store = Store::open(d.path(), crate::syncer::Syncer::start()).unwrap();
    let h = host_on(rt.clone(), d.path(), 0, None, store.clone());
    for id in ["a", "b"] {
        h.add_job(job(id, "x")).await.unwrap();
        wait_status(&h, id, JobStatus::Running).await;
    }
    let mut events = h.subscribe();
    let unstall = Unstall(store.clone());
    store.faults().hold(true);
    // a ends; the write of its end stalls on the disk.
    exit_cleanly(&rt, "a").await;
    for _ in 0..500 {
        if store.faults().stalled.load(SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        store.faults().stalled.load(SeqCst),
        1,
        "a's end never written"
    );
    // Requests about b (and listings) from another thread: a held table lock would block
    // it, however the runtime fares.
    let (tx, rx) = std::sync::mpsc::channel();
    let other = h.clone();
    std::thread::spawn(move || {
        let b = other.get("b").map(|j| j.status);
        let all = other.list(false).len();
        let running = other.status().jobs.get("running").copied();
        let signalled = other.signal("b", 1).is_ok();
        let _ = tx.send((b, all, running, signalled));
    });
    let answered = rx
        .recv_timeout(Duration::from_secs(2))
        .expect("requests about another job held up by a stalled record write");
    assert_eq!(
        answered,
        (Some(JobStatus::Running), 2, Some(2), true),
        "a's end shown before it was written"
    );
    assert!(
        events.try_recv().is_err(),
        "a's end announced before it was written"
    );
    assert_eq!(status_on_disk(d.path(), "a").status, JobStatus::Running);
    // A stop of b waits for its own record (queued behind a's), and so does its SIGTERM.
    let stop = tokio::spawn({
        let h = h.clone();
        async move { h.stop("b").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!stop.is_finished(), "stop answered before it was recorded");
    assert_eq!(rt.signals.lock().unwrap().clone(), [("b".to_string(), 1)]);
    drop(unstall);
    stop.await.unwrap().unwrap();
    assert!(status_on_disk(d.path(), "b").force_stop);
    let (ev, _) = next_event(&mut events, EventKind::Stop)
        .await
        .expect("a's stop event");
    assert_eq!((ev.job_id.as_str(), ev.job.status), ("a", JobStatus::Done));
    assert_eq!(status_on_disk(d.path(), "a").status, JobStatus::Done);
    assert_eq!(h.get("a").unwrap().status, JobStatus::Done);
    exit_cleanly(&rt, "b").await;
    wait_status(&h, "b", JobStatus::Done).await;
    assert_eq!(status_on_disk(d.path(), "b").status, JobStatus::Done);
}

/// Stalls the record disk and waits until `n` operations wait on it.
async fn stall_records(store: &Store, n: usize) {
    use std::sync::atomic::Ordering::SeqCst;
    for _ in 0..500 {
        if store.faults().stalled.load(SeqCst) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{n} record writes never reached the disk");
}

/// A `DELETE` whose request is dropped while its record is written (the client gave up on
/// a slow disk) still stops the job once the record is written: its SIGTERM used to come
/// after that wait in the request's own future, so it was never sent, and every retried
/// `DELETE` found the stop under way and answered 200 doing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_whose_request_is_dropped_still_stops_the_job() {
    let d = tempfile::tempdir().unwrap();
    let rt = Arc::new(Fake::default());
    rt.open();
    let store = Store::open(d.path(), crate::syncer::Syncer::start()).unwrap();
    let h = host_on(rt.clone(), d.path(), 0, None, store.clone());
    h.add_job(job("a", "x")).await.unwrap();
    wait_status(&h, "a", JobStatus::Running).await;
    let unstall = Unstall(store.clone());
    store.faults().hold(true);
    let cut = tokio::time::timeout(Duration::from_millis(200), h.stop("a")).await;
    assert!(
        cut.is_err(),
        "the stop was answered before its record was written"
    );
    stall_records(&store, 1).await;
    assert!(
        rt.signals.lock().unwrap().is_empty(),
        "signalled before recorded"
    );
    drop(unstall);
    for _ in 0..300 {
        if !rt.signals.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        rt.signals.lock().unwrap().first().cloned(),
        Some(("a".to_string(), 15)),
        "the dropped stop never sent its SIGTERM"
    );
    assert!(status_on_disk(d.path(), "a").force_stop);
    exit_cleanly(&rt, "a").await;
    wait_status(&h, "a", JobStatus::Done).await;
}

/// A `PUT` whose request is dropped while the new job's record is written still shows,
/// announces and starts the job once it is written, or, when the write failed, takes it out
/// of the table again, so a retried `PUT` works. It used to stay starting for good, shown
/// nowhere and counted against `max_starting`, and a retried `PUT` got a 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_whose_request_is_dropped_still_starts_the_job() {
    use flynn_api::host::EventKind;

    let d = tempfile::tempdir().unwrap();
    let rt = Arc::new(Fake::default());
    rt.open();
    let store = Store::open(d.path(), crate::syncer::Syncer::start()).unwrap();
    let h = host_on(rt.clone(), d.path(), 1, None, store.clone());
    let mut events = h.subscribe();
    let unstall = Unstall(store.clone());
    store.faults().hold(true);
    let cut = tokio::time::timeout(Duration::from_millis(200), h.add_job(job("a", "x"))).await;
    assert!(cut.is_err(), "the job was accepted before it was recorded");
    stall_records(&store, 1).await;
    assert!(h.get("a").is_none(), "shown before it was recorded");
    drop(unstall);
    let (ev, _) = next_event(&mut events, EventKind::Start)
        .await
        .expect("the dropped PUT's job never started");
    assert_eq!(ev.job_id, "a");
    wait_status(&h, "a", JobStatus::Running).await;
    // Its write fails: the job leaves the table, and the retried PUT (max_starting 1) works.
    let unstall = Unstall(store.clone());
    store.faults().hold(true);
    store
        .faults()
        .fail
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let cut = tokio::time::timeout(Duration::from_millis(200), h.add_job(job("b", "x"))).await;
    assert!(cut.is_err(), "the job was accepted before it was recorded");
    stall_records(&store, 1).await;
    drop(unstall);
    let mut again = Err(flynn_api::ApiError::conflict("not tried"));
    for _ in 0..300 {
        again = h.add_job(job("b", "x")).await;
        if again.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    again.expect("the retried PUT after a dropped one whose record failed");
    wait_status(&h, "b", JobStatus::Running).await;
}

/// Polls `f` once, so what it does before its first wait is done (a request's change of the
/// job table, its record queued); true when it is not finished.
async fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> bool {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::pin::Pin::new(&mut *f).poll(cx).is_pending())
    })
    .await
}

/// A `DELETE` of a new job whose record is still queued replaces that record in the write
/// queue, so the `PUT` and the `DELETE` share the write's outcome. When it fails, the job
/// leaves the table and is shown nowhere, whichever of the two settles first: the stop used
/// to show the job (still in the table) before the failed `PUT` took it out, and it stayed
/// listed as starting for good. Done several times, as the order varies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_job_whose_record_failed_with_its_stop_is_shown_nowhere() {
    use std::sync::atomic::Ordering::SeqCst;

    let d = tempfile::tempdir().unwrap();
    let rt = Arc::new(Fake::default());
    rt.open();
    let store = Store::open(d.path(), crate::syncer::Syncer::start()).unwrap();
    let h = host_on(rt.clone(), d.path(), 0, None, store.clone());
    for i in 0..20 {
        let (z, a) = (format!("z{i}"), format!("a{i}"));
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.flush())
            .await
            .unwrap();
        let unstall = Unstall(store.clone());
        store.faults().hold(true);
        // z's record stalls on the disk: a's records wait in the queue behind it.
        let mut put_z = std::pin::pin!(h.add_job(job(&z, "x")));
        assert!(poll_once(&mut put_z).await, "{z} recorded on a held disk");
        stall_records(&store, 1).await;
        let mut put = std::pin::pin!(h.add_job(job(&a, "x")));
        assert!(poll_once(&mut put).await, "{a} recorded on a held disk");
        let mut del = std::pin::pin!(h.stop(&a));
        assert!(
            poll_once(&mut del).await,
            "{a}'s stop recorded on a held disk"
        );
        // z's write fails, then a's (its PUT's and its DELETE's state, one write).
        store.faults().fail.store(2, SeqCst);
        drop(unstall);
        let (put_z, put, del) = tokio::join!(put_z, put, del);
        assert!(put_z.is_err(), "{z}: {put_z:?}");
        assert!(put.is_err(), "{a}'s PUT succeeded: {put:?}");
        del.unwrap_or_else(|e| panic!("{a}'s DELETE: {e:?}"));
        assert_eq!(store.faults().fail.load(SeqCst), 0, "a write did not fail");
        assert!(h.get(&a).is_none(), "{a} shown: {:?}", h.get(&a));
        assert!(!h.list(false).contains_key(&a), "{a} listed");
        assert!(!h.status().jobs.contains_key("starting"), "{a} counted");
    }
    assert_eq!(
        rt.entered.load(SeqCst),
        0,
        "a job whose record failed started"
    );
}

/// A `PUT` already accepted when the daemon's shutdown begins (its record being written)
/// is answered 200, and the job then fails with "host: shutting down" (an `error` event)
/// instead of being started by a daemon on its way out; a later `PUT` is a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_accepted_before_the_shutdown_fails_the_job_unstarted() {
    use flynn_api::host::EventKind;
    use std::sync::atomic::Ordering::SeqCst;

    let d = tempfile::tempdir().unwrap();
    let rt = Arc::new(Fake::default());
    rt.open();
    let store = Store::open(d.path(), crate::syncer::Syncer::start()).unwrap();
    let h = host_on(rt.clone(), d.path(), 0, None, store.clone());
    let mut events = h.subscribe();
    let unstall = Unstall(store.clone());
    store.faults().hold(true);
    let mut put = std::pin::pin!(h.add_job(job("a", "x")));
    assert!(poll_once(&mut put).await, "recorded on a held disk");
    stall_records(&store, 1).await;
    // What the daemon does on SIGTERM, before it stops serving.
    h.shutdown();
    drop(unstall);
    put.await
        .expect("a PUT accepted before the shutdown is answered 200");
    let (ev, seen) = next_event(&mut events, EventKind::Error)
        .await
        .expect("no error event for the job");
    assert_eq!(seen.first(), Some(&EventKind::Create), "{seen:?}");
    assert_eq!(ev.job_id, "a");
    assert_eq!(ev.job.status, JobStatus::Failed);
    assert_eq!(ev.job.error.as_deref(), Some("host: shutting down"));
    wait_status(&h, "a", JobStatus::Failed).await;
    assert_eq!(status_on_disk(d.path(), "a").status, JobStatus::Failed);
    assert_eq!(
        rt.entered.load(SeqCst),
        0,
        "started by a daemon shutting down"
    );
    let later = h.add_job(job("b", "x")).await.unwrap_err();
    assert_eq!(later.code, ErrorCode::ServiceUnavailable);
}

/// A job in a partition that does not exist is created, then fails with Flynn's message in
/// an `error` event (spec §5.3, §5.6); the known partitions start.
#[tokio::test]
async fn a_job_in_an_unknown_partition_fails_with_an_error_event() {
    use flynn_api::host::EventKind;

    let (_d, _rt, h) = open_host();
    let mut events = h.subscribe();
    let mut bad = job("p", "x");
    bad.partition = Some("x".into());
    h.add_job(bad).await.unwrap();
    let (err, seen) = next_event(&mut events, EventKind::Error)
        .await
        .expect("an error event");
    assert_eq!(seen.first(), Some(&EventKind::Create), "{seen:?}");
    assert_eq!(err.job.status, JobStatus::Failed);
    assert_eq!(
        err.job.error.as_deref(),
        Some(r#"host: invalid job partition "x""#)
    );
    wait_status(&h, "p", JobStatus::Failed).await;
    for (id, p) in [
        ("s", "system"),
        ("b", "background"),
        ("u", "user"),
        ("e", ""),
    ] {
        let mut ok = job(id, "x");
        ok.partition = Some(p.into());
        h.add_job(ok).await.unwrap();
        wait_status(&h, id, JobStatus::Running).await;
    }
}

/// Whether job `id` is announced to discoverd within 5 s.
async fn announced_soon(h: &Host, id: &str) -> bool {
    for _ in 0..500 {
        if h.announced(id) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// A job taken out of discoverd (`discoverd-deregister`, e.g. to drain it before a stop)
/// stays out when a new daemon re-adopts it; a job that was not is registered again. The
/// deregistration used to live in memory only, so a restart put the job back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deregistered_job_stays_out_of_discoverd_across_a_restart() {
    let (d, rt, h) = open_host();
    for id in ["a", "b"] {
        h.add_job(web_job(id)).await.unwrap();
        wait_status(&h, id, JobStatus::Running).await;
        // Registered a moment after it is marked running (outside the job lock).
        assert!(announced_soon(&h, id).await, "{id} never announced");
    }
    assert!(h.deregister("a").await);
    // A new daemon on the same state finds both jobs still running.
    *rt.survivors.lock().unwrap() = vec!["a".into(), "b".into()];
    let h2 = host(rt.clone(), d.path(), 0);
    h2.restore().await;
    for id in ["a", "b"] {
        rt.events(id)
            .send(ProcEvent::Started { pid: 42 })
            .await
            .unwrap();
        wait_status(&h2, id, JobStatus::Running).await;
    }
    assert!(
        announced_soon(&h2, "b").await,
        "a job not deregistered is announced again"
    );
    assert!(
        !h2.announced("a"),
        "the deregistered job was registered again"
    );
    // Once a job ends, deregistered or not, nothing of a deregistration is left for a
    // later job of that id (the end's own deregistration records none).
    for id in ["a", "b"] {
        exit_cleanly(&rt, id).await;
        wait_status(&h2, id, JobStatus::Done).await;
    }
    let left = || -> Vec<_> {
        std::fs::read_dir(d.path().join("deregistered"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect()
    };
    // The end's cleanup runs after the end is recorded.
    for _ in 0..200 {
        if left().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(left().is_empty(), "{:?}", left());
}

/// A job a restarted daemon adopts is registered in discoverd only once its shim has said
/// it runs (`Started`, the first event a shim sends every new daemon) and that is recorded
/// and announced, as for a fresh job. It used to be registered as soon as its supervisor
/// began, before the daemon had heard from it: a job that had never started (recorded as
/// starting) was put in its service while starting, and one that had ended meanwhile was
/// put in on its way out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_job_is_registered_after_its_first_event() {
    use flynn_api::host::{ActiveJob, EventKind};

    let (d, rt, h) = open_host();
    h.add_job(web_job("r")).await.unwrap();
    wait_status(&h, "r", JobStatus::Running).await;
    assert!(announced_soon(&h, "r").await, "r never announced");
    // "s" was spawned when the daemon died, and had not said it runs.
    let s = ActiveJob {
        job: web_job("s"),
        host_id: "h".into(),
        status: JobStatus::Starting,
        ..ActiveJob::default()
    };
    std::fs::write(
        d.path().join("jobs").join("s.json"),
        serde_json::to_vec(&s).unwrap(),
    )
    .unwrap();
    *rt.survivors.lock().unwrap() = vec!["r".into(), "s".into()];
    let h2 = host(rt.clone(), d.path(), 0);
    let mut events = h2.subscribe();
    h2.restore().await;
    // Both supervisors are under way (a control entry each, made before the registration
    // used to be), and their shims have not said anything yet.
    for _ in 0..500 {
        if h2.has_control("r") && h2.has_control("s") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(h2.has_control("r") && h2.has_control("s"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    for id in ["r", "s"] {
        assert!(!h2.announced(id), "{id} registered before its first event");
    }
    // "s" starts: its `start` is recorded and announced, then it is registered.
    rt.events("s")
        .send(ProcEvent::Started { pid: 7 })
        .await
        .unwrap();
    let (ev, _) = next_event(&mut events, EventKind::Start)
        .await
        .expect("a start event for s");
    assert_eq!(
        (ev.job_id.as_str(), ev.job.status),
        ("s", JobStatus::Running)
    );
    assert!(announced_soon(&h2, "s").await, "s never announced");
    // "r" was running: its shim's `Started` (from its greeting) registers it again, with no
    // second `start` event.
    rt.events("r")
        .send(ProcEvent::Started { pid: 42 })
        .await
        .unwrap();
    assert!(announced_soon(&h2, "r").await, "r never announced again");
    assert!(
        events.try_recv().is_err(),
        "an event for a job adopted as running"
    );
    for id in ["r", "s"] {
        exit_cleanly(&rt, id).await;
        wait_status(&h2, id, JobStatus::Done).await;
    }
}

/// Jobs a restarted daemon adopts while they are still starting are stopped once each:
/// one being stopped before the restart gets its SIGTERM at adoption and no second one when
/// its shim says it runs (it used to get two, as from two stops); one asked to stop after
/// the adoption gets it when it runs. Neither is registered in discoverd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopted_starting_jobs_asked_to_stop_get_one_sigterm() {
    use flynn_api::host::ActiveJob;

    let (d, rt, _h) = open_host();
    for (id, force_stop) in [("u", true), ("t", false)] {
        let j = ActiveJob {
            job: web_job(id),
            host_id: "h".into(),
            status: JobStatus::Starting,
            force_stop,
            ..ActiveJob::default()
        };
        std::fs::write(
            d.path().join("jobs").join(format!("{id}.json")),
            serde_json::to_vec(&j).unwrap(),
        )
        .unwrap();
    }
    *rt.survivors.lock().unwrap() = vec!["u".into(), "t".into()];
    let h2 = host(rt.clone(), d.path(), 0);
    h2.restore().await;
    h2.stop("t").await.unwrap();
    for id in ["u", "t"] {
        rt.events(id)
            .send(ProcEvent::Started { pid: 7 })
            .await
            .unwrap();
        wait_status(&h2, id, JobStatus::Running).await;
    }
    let sigterms = |id: &str| {
        rt.signals
            .lock()
            .unwrap()
            .iter()
            .filter(|(j, s)| j == id && *s == 15)
            .count()
    };
    for _ in 0..200 {
        if sigterms("u") > 0 && sigterms("t") > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Time for a second one to come (the stop timeout, 1 s, brings the SIGKILL).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!((sigterms("u"), sigterms("t")), (1, 1));
    for id in ["u", "t"] {
        assert!(!h2.announced(id), "{id} registered while being stopped");
        exit_cleanly(&rt, id).await;
        wait_status(&h2, id, JobStatus::Done).await;
    }
}

/// A running job the runtime loses (its shim's connection breaks: an end without an exit
/// status) ran: it ends crashed with the reason and a `stop` event, not failed ("could not
/// start", spec §5.2) with an `error` event. One being stopped ends done, also with `stop`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_the_runtime_loses_ends_crashed_with_a_stop_event() {
    use flynn_api::host::EventKind;

    let (_d, rt, h) = open_host();
    let lost = "lost the job's shim: connection reset by peer";
    for (id, stop, want) in [
        ("a", false, JobStatus::Crashed),
        ("b", true, JobStatus::Done),
    ] {
        let mut events = h.subscribe();
        h.add_job(job(id, "x")).await.unwrap();
        wait_status(&h, id, JobStatus::Running).await;
        if stop {
            h.stop(id).await.unwrap();
        }
        rt.events(id)
            .send(ProcEvent::Failed {
                reason: lost.into(),
            })
            .await
            .unwrap();
        let (ev, seen) = next_event(&mut events, EventKind::Stop)
            .await
            .unwrap_or_else(|| panic!("{id}: no stop event"));
        assert!(!seen.contains(&EventKind::Error), "{id}: {seen:?}");
        assert_eq!(
            (
                ev.job_id.as_str(),
                ev.job.status,
                ev.job.exit_status,
                ev.job.error.as_deref()
            ),
            (id, want, None, Some(lost))
        );
        assert_eq!(h.get(id).unwrap().status, want);
    }
}

/// A second stop of a job being stopped answers like the first and sends nothing more: no
/// second SIGTERM, no second SIGKILL after the stop timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_sends_no_more_signals() {
    let (_d, rt, h) = open_host();
    h.add_job(job("a", "x")).await.unwrap();
    wait_status(&h, "a", JobStatus::Running).await;
    let signals = || rt.signals.lock().unwrap().clone();
    h.stop("a").await.unwrap();
    for _ in 0..200 {
        if !signals().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.stop("a").await.unwrap();
    // The job's 1 s stop timeout: the first two signals (a second stop would make them two
    // SIGTERMs), then a while for anything more.
    for _ in 0..1000 {
        if signals().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a = |sig| ("a".to_string(), sig);
    assert_eq!(signals(), [a(15), a(9)]);
    exit_cleanly(&rt, "a").await;
    wait_status(&h, "a", JobStatus::Done).await;
    assert_eq!(
        h.stop("a").await.unwrap_err().message,
        "host: job is already stopped"
    );
}

/// `discoverd-deregister` of a job that ended (or failed to start) leaves nothing behind:
/// it used to make a control entry for the job that nothing removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistering_an_ended_job_leaves_no_control_entry() {
    let (d, rt, h) = open_host();
    h.add_job(web_job("a")).await.unwrap();
    wait_status(&h, "a", JobStatus::Running).await;
    assert!(h.has_control("a"));
    exit_cleanly(&rt, "a").await;
    wait_status(&h, "a", JobStatus::Done).await;
    h.add_job(job("f", "fail")).await.unwrap();
    wait_status(&h, "f", JobStatus::Failed).await;
    for id in ["a", "f"] {
        // The end's cleanup removes the job's entry (after the end is recorded).
        for _ in 0..200 {
            if !h.has_control(id) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!h.has_control(id), "{id}: kept after its end");
        assert!(h.deregister(id).await, "{id} is known");
        assert!(
            !h.has_control(id),
            "{id}: an entry left by the deregistration"
        );
        assert!(!d.path().join("deregistered").join(id).exists());
    }
    assert!(!h.deregister("zz").await);
}

/// The host's own registration brackets an IPv6 address: discoverd refuses `fd00::1:1113`.
#[test]
fn the_registered_address_brackets_ipv6() {
    let f = |ip: &str| crate::host::format_host_port(ip.parse().unwrap(), "1113");
    assert_eq!(f("10.0.0.1"), "10.0.0.1:1113");
    assert_eq!(f("fd00::1"), "[fd00::1]:1113");
}

/// The one client of a `disable_log` job (which may stop reading for as long as it likes,
/// as under Flynn: `flynn run ... | less`) gets a long `TCP_USER_TIMEOUT` on its connection,
/// which the kernel also fires when the peer's receive window stays closed: with the API's
/// two minutes, a live client paging its output was cut off. Any other client keeps the
/// two minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_client_of_a_job_without_log_gets_a_long_user_timeout() {
    use tokio::io::AsyncReadExt;
    let (_d, _rt, h) = open_host();
    let mut quiet = job("q", "x");
    quiet.config.disable_log = true;
    h.add_job(quiet).await.unwrap();
    h.add_job(job("l", "x")).await.unwrap();
    wait_status(&h, "q", JobStatus::Running).await;
    wait_status(&h, "l", JobStatus::Running).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    for (id, want) in [
        ("q", crate::BLOCKING_USER_TIMEOUT),
        ("l", crate::API_USER_TIMEOUT),
    ] {
        let mut client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (mut conn, _) = l.accept().await.unwrap();
        crate::api_keepalive(&mut conn);
        let sock = socket2::SockRef::from(&conn).try_clone().unwrap();
        let probe = sock.try_clone().unwrap();
        let flags = flynn_api::attach::STDOUT | flynn_api::attach::STREAM;
        let req = flynn_api::attach::AttachRequest {
            job_id: id.to_string(),
            flags,
            ..Default::default()
        };
        let sub = h.attach(&req, None).unwrap();
        let served = tokio::spawn(crate::attach::serve(
            h.clone(),
            sub,
            flags,
            conn,
            Some(sock),
        ));
        // Its opening frame: past the point where the timeout is chosen.
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut b))
            .await
            .expect("no opening frame")
            .unwrap();
        assert_eq!(probe.tcp_user_timeout().unwrap(), Some(want), "{id}");
        drop(client);
        let _ = tokio::time::timeout(Duration::from_secs(5), served).await;
    }
}

/// A job whose end came before its stop reached the attach clients leaves no mark behind
/// (it was left for ever, one per such job, and the id's next job started with its one
/// client not holding its output up); a running one is marked until its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_after_the_jobs_end_leaves_no_attach_mark() {
    let (_d, rt, h) = open_host();
    h.add_job(job("a", "x")).await.unwrap();
    h.add_job(job("b", "x")).await.unwrap();
    wait_status(&h, "a", JobStatus::Running).await;
    wait_status(&h, "b", JobStatus::Running).await;
    exit_cleanly(&rt, "a").await;
    wait_status(&h, "a", JobStatus::Done).await;
    h.unblock_attach("a");
    h.unblock_attach("nope");
    assert_eq!(h.attach_stopping(), 0, "marked after its end");
    h.unblock_attach("b");
    assert_eq!(h.attach_stopping(), 1);
    exit_cleanly(&rt, "b").await;
    wait_status(&h, "b", JobStatus::Done).await;
    assert_eq!(h.attach_stopping(), 0);
}

/// The rename of a job's `delete_on_stop` volume as it ends, stalled on the disk, holds up
/// no other request: it ran under the job table's lock (on a runtime thread), and every job
/// request waited for the disk. The job's end waits for it: the volume is gone before the
/// end is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_volume_rename_at_a_jobs_end_holds_up_no_other_request() {
    use flynn_api::host::{VolumeBinding, VolumeCreate};

    struct Release<'a>(&'a crate::volumes::Gate);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.hold(false);
        }
    }
    let (_d, rt, h) = open_host();
    let vols = h.volumes().clone();
    let temp = vols.create(VolumeCreate::default(), "t".into()).unwrap();
    let mut a = job("a", "x");
    a.config.volumes = vec![VolumeBinding {
        target: "/scratch".into(),
        volume: temp.id.clone(),
        writeable: true,
        delete_on_stop: true,
    }];
    h.add_job(a).await.unwrap();
    wait_status(&h, "a", JobStatus::Running).await;
    let _release = Release(&vols.faults().rename);
    vols.faults().rename.hold(true);
    exit_cleanly(&rt, "a").await;
    {
        let vols = vols.clone();
        tokio::task::spawn_blocking(move || vols.faults().rename.wait_stalled(1))
            .await
            .unwrap();
    }
    // Other requests go on meanwhile (asked from a thread of its own: one waiting for the
    // table's lock held a runtime thread), and the job's end is not shown before its volume
    // went.
    let (tx, rx) = std::sync::mpsc::channel();
    let h2 = h.clone();
    std::thread::spawn(move || tx.send(h2.get("a").map(|j| j.status)));
    let seen = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("a job request waited for the stalled rename");
    assert_eq!(seen, Some(JobStatus::Running));
    h.add_job(job("b", "x")).await.unwrap();
    vols.faults().rename.hold(false);
    wait_status(&h, "a", JobStatus::Done).await;
    assert!(vols.get(&temp.id).is_none());
}
