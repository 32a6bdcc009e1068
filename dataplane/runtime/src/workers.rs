//! Pinned worker threads, one monoio runtime each.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::thread::JoinHandle;

use socket2::{Domain, Protocol, Socket, Type};

/// Which I/O driver the workers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// io_uring when the kernel and seccomp allow it, epoll otherwise.
    Auto,
    /// io_uring or fail.
    IoUring,
    /// epoll only.
    Epoll,
}

impl std::str::FromStr for Driver {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Driver::Auto),
            "io_uring" | "uring" => Ok(Driver::IoUring),
            "epoll" | "legacy" => Ok(Driver::Epoll),
            _ => Err(format!(
                "unknown I/O driver {s:?} (expected auto, io_uring or epoll)"
            )),
        }
    }
}

/// What a worker learns about itself.
#[derive(Debug, Clone, Copy)]
pub struct WorkerCtx {
    pub index: usize,
    /// `"io_uring"` or `"epoll"`.
    pub driver: &'static str,
}

/// Number of CPUs this process may run on.
pub fn core_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

type Fusion = monoio::FusionRuntime<
    monoio::time::TimeDriver<monoio::IoUringDriver>,
    monoio::time::TimeDriver<monoio::LegacyDriver>,
>;

const RING_ENTRIES: u32 = 4096;

fn build_runtime(driver: Driver) -> io::Result<(Fusion, &'static str)> {
    let uring = || {
        // Completions are run when the worker next enters the kernel instead of interrupting
        // it (no IPI / signal-style task work per completion): one ring per pinned thread
        // enters the kernel on every loop turn anyway. Kernels before 5.19 reject the flag;
        // then the ring is made without it.
        let mut coop = io_uring::IoUring::builder();
        coop.setup_coop_taskrun();
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(RING_ENTRIES)
            .uring_builder(coop)
            .enable_timer()
            .build()
            .map(|rt| (Fusion::from(rt), "io_uring"))
            .or_else(|_| {
                monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                    .with_entries(RING_ENTRIES)
                    .enable_timer()
                    .build()
                    .map(|rt| (Fusion::from(rt), "io_uring"))
            })
    };
    let epoll = || {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .with_entries(RING_ENTRIES)
            .enable_timer()
            .build()
            .map(|rt| (Fusion::from(rt), "epoll"))
    };
    match driver {
        Driver::IoUring => uring(),
        Driver::Epoll => epoll(),
        Driver::Auto => {
            if monoio::utils::detect_uring() {
                uring().or_else(|e| {
                    tracing::warn!(error = %e, "io_uring setup failed, falling back to epoll");
                    epoll()
                })
            } else {
                epoll()
            }
        }
    }
}

/// The CPUs the calling thread may run on (its affinity mask: `taskset`, a cpuset), in
/// increasing order.
fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data (all zeroes is an empty set); sched_getaffinity
    // writes at most `size_of::<cpu_set_t>()` bytes into it, and CPU_ISSET reads a bit
    // of it below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect())
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write within it (`cpu` is below
    // CPU_SETSIZE: it comes from `allowed_cpus`) and sched_setaffinity only reads it.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The text of a panic's payload (`panic!` with a message gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// What a thread whose panic aborts the process is (see [`abort_on_panic`]).
#[derive(Debug, Clone, Copy)]
enum Critical {
    /// Worker `i` of [`spawn_workers`].
    Worker(usize),
    /// A thread marked with [`abort_on_panic`].
    Thread,
}

thread_local! {
    /// Set on a thread whose panic aborts the process.
    static CRITICAL: std::cell::Cell<Option<Critical>> = const { std::cell::Cell::new(None) };
}

/// Installs (once per process) the panic hook that aborts on a marked thread: it logs the
/// thread (a worker's index, the thread's name, the panic and where), runs the hook that
/// was there before (the default one prints the message and, with `RUST_BACKTRACE`, the
/// backtrace) and aborts, before anything unwinds: a core dump shows the panicking frame,
/// no destructor runs on half-updated state, and a destructor that panics again cannot
/// abort before the log line. A panic on any other thread goes to the previous hook alone.
fn install_abort_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // `try_with`: a panic in a thread-local's destructor finds this one gone.
            let Some(critical) = CRITICAL.try_with(|c| c.get()).ok().flatten() else {
                return previous(info);
            };
            let thread = std::thread::current();
            let thread = thread.name().unwrap_or("(unnamed)");
            let panic = panic_message(info.payload());
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            match critical {
                Critical::Worker(index) => tracing::error!(
                    worker = index,
                    thread,
                    panic,
                    at,
                    "a worker panicked: aborting the process (its connections and listeners are lost)"
                ),
                Critical::Thread => tracing::error!(
                    thread,
                    panic,
                    at,
                    "a thread the process cannot go on without panicked: aborting the process"
                ),
            }
            previous(info);
            std::process::abort();
        }));
    });
}

/// Makes a panic on the calling thread abort the whole process, logged with the thread's
/// name (as for the workers of [`spawn_workers`]), instead of ending that thread alone
/// while the process looks healthy. For plain threads a process cannot go on without (a
/// loop that serves a socket); not for one running a tokio runtime, whose tasks' panics
/// tokio catches (a request handler's panic ends only its task: marked, it would abort).
pub fn abort_on_panic() {
    install_abort_hook();
    CRITICAL.with(|c| c.set(Some(Critical::Thread)));
}

/// Runs `f` on the calling thread with its [`abort_on_panic`] mark lifted, catching a panic
/// in it: for a step of a marked thread that can fail as a whole, leaving nothing the
/// thread goes on with half-updated (the router's takeover before it sends its state: a
/// panic there is a failed attempt, the old process serving on). The panic is reported by
/// the hook that was there before (the default one prints it); the mark is back as it was
/// when this returns, whether `f` returned or panicked. `f` is taken as unwind safe: the
/// caller vouches that what it touches is left consistent by a panic (or is restored).
pub fn recoverable<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    /// Puts the mark back when dropped (after an unwind too).
    struct Restore(Option<Critical>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = CRITICAL.try_with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CRITICAL.with(|c| c.replace(None)));
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
}

/// Starts `n` pinned workers named `<name>-<i>`. Each builds its runtime (reporting
/// which driver it got) and runs `make(ctx)` to completion. Returns once every worker
/// has its runtime, or the first error building one.
///
/// Worker `i` is pinned to the `i`-th CPU the calling thread may run on (its affinity
/// mask, read once here: under `taskset -c 4-7` worker 0 runs on CPU 4), when there are no
/// more workers than such CPUs; otherwise the workers are left to the scheduler.
///
/// A panic in a worker (in any task of its runtime: monoio does not catch them) aborts
/// the process: the worker would otherwise end alone, silently dropping its connections
/// and its share of every SO_REUSEPORT listener while the process looks healthy. A clean,
/// visible failure lets the supervisor restart the whole process. The abort comes from a
/// panic hook (installed here once, see [`install_abort_hook`]), at the panic, before
/// anything unwinds; a catch around the worker aborts too, should another hook have
/// replaced it.
pub fn spawn_workers<F, Fut>(
    n: usize,
    driver: Driver,
    name: &str,
    make: F,
) -> io::Result<Vec<JoinHandle<()>>>
where
    F: Fn(WorkerCtx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + 'static,
{
    install_abort_hook();
    let make = std::sync::Arc::new(make);
    let cpus = match allowed_cpus() {
        Ok(cpus) => cpus,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the CPU affinity: workers are not pinned");
            Vec::new()
        }
    };
    let cpus = std::sync::Arc::new(if n <= cpus.len() { cpus } else { Vec::new() });
    // A failure to pin (a cpuset that changed meanwhile, say) is logged once, not per worker.
    let pin_failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut handles = Vec::with_capacity(n);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
    for index in 0..n {
        let make = make.clone();
        let ready = ready_tx.clone();
        let (cpus, pin_failed) = (cpus.clone(), pin_failed.clone());
        let thread = format!("{name}-{index}");
        let h = std::thread::Builder::new()
            .name(thread.clone())
            .spawn(move || {
                CRITICAL.with(|c| c.set(Some(Critical::Worker(index))));
                let run = std::panic::AssertUnwindSafe(move || {
                    if let Some(&cpu) = cpus.get(index % cpus.len().max(1)) {
                        if let Err(e) = pin_to_cpu(cpu) {
                            if !pin_failed.swap(true, std::sync::atomic::Ordering::Relaxed) {
                                tracing::warn!(worker = index, cpu, error = %e, "cannot pin a worker to its CPU: it runs unpinned");
                            }
                        }
                    }
                    let (mut rt, drv) = match build_runtime(driver) {
                        Ok(x) => x,
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    tracing::info!(worker = index, driver = drv, "worker started");
                    let _ = ready.send(Ok(()));
                    drop(ready);
                    rt.block_on(make(WorkerCtx { index, driver: drv }));
                });
                // The backstop: the hook aborts before this unwinds, unless another
                // hook replaced it.
                if let Err(panic) = std::panic::catch_unwind(run) {
                    tracing::error!(
                        worker = index,
                        thread = %thread,
                        panic = panic_message(panic.as_ref()),
                        "a worker panicked: aborting the process (its connections and listeners are lost)"
                    );
                    std::process::abort();
                }
            })?;
        handles.push(h);
    }
    drop(ready_tx);
    for _ in 0..n {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::Error::other("worker thread died during start")),
        }
    }
    Ok(handles)
}

/// A non-blocking listening socket with SO_REUSEPORT, so every core can bind the same
/// address and the kernel spreads connections across them.
pub fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// Whether no other socket holds `addr` now, so that a [`reuseport_listener`] opened
/// there is the first of its SO_REUSEPORT group: binds a socket *without* SO_REUSEPORT
/// (SO_REUSEADDR only, so connections left in TIME_WAIT do not count) and never listens.
/// A port held by any listening socket fails (`AddrInUse`), also one whose listeners have
/// SO_REUSEPORT: a [`reuseport_listener`] bound beside those of another process of the
/// same user (an nginx with `reuseport`, another router) would join their group and
/// silently split the connections with it. A caller that holds listeners there itself
/// (to add more to its own group) must tell those apart.
pub fn check_exclusive_bind(addr: SocketAddr) -> io::Result<()> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_check_sees_a_port_another_socket_listens_on() {
        // The port is held by a socket bound with SO_REUSEADDR that never listens, for the
        // whole test: the check passes beside it (as beside connections left in TIME_WAIT),
        // and no other socket can take the port meanwhile (an ephemeral port picked by a
        // test running in parallel, after the listener below is gone).
        let holder = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        holder.set_reuse_address(true).unwrap();
        holder
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let taken = holder.local_addr().unwrap().as_socket().unwrap();
        check_exclusive_bind(taken).unwrap();
        // std's listeners have SO_REUSEADDR too.
        let other = std::net::TcpListener::bind(taken).unwrap();
        assert_eq!(
            check_exclusive_bind(taken).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        // Listeners with SO_REUSEPORT (another program's group a reuseport_listener would
        // join) hold the port as well.
        let group = reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let group_addr = group.local_addr().unwrap();
        assert_eq!(
            check_exclusive_bind(group_addr).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        // A listener shut down (as the router does to a removed TCP route's) no longer
        // listens: the port is free for the check at once, while the socket is still open.
        crate::sock::shutdown(std::os::fd::AsRawFd::as_raw_fd(&group));
        check_exclusive_bind(group_addr).unwrap();
        // A port whose listener is gone is free again.
        drop(other);
        check_exclusive_bind(taken).unwrap();
    }

    #[test]
    fn both_drivers_run_and_report() {
        for d in [Driver::Epoll, Driver::Auto] {
            let (tx, rx) = std::sync::mpsc::channel();
            let hs = spawn_workers(2, d, "t", move |ctx| {
                let tx = tx.clone();
                async move {
                    monoio::time::sleep(std::time::Duration::from_millis(1)).await;
                    tx.send(ctx.driver).unwrap();
                }
            })
            .unwrap();
            for h in hs {
                h.join().unwrap();
            }
            let got: Vec<_> = rx.try_iter().collect();
            assert_eq!(got.len(), 2);
            if d == Driver::Epoll {
                assert!(got.iter().all(|g| *g == "epoll"));
            }
        }
    }

    /// Worker `i` runs on the `i`-th CPU the starting thread may use, not on CPU `i`: here
    /// the starting thread may only use the last CPU (as under `taskset -c <last>`).
    #[test]
    fn workers_are_pinned_within_the_allowed_cpus() {
        let all = allowed_cpus().unwrap();
        let last = *all.last().unwrap();
        // Only this test's thread is restricted (the workers inherit its mask).
        pin_to_cpu(last).unwrap();
        assert_eq!(allowed_cpus().unwrap(), vec![last]);
        let (tx, rx) = std::sync::mpsc::channel();
        let hs = spawn_workers(1, Driver::Epoll, "pin", move |_| {
            let tx = tx.clone();
            async move {
                tx.send(allowed_cpus().unwrap()).unwrap();
            }
        })
        .unwrap();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(rx.recv().unwrap(), vec![last], "all CPUs: {all:?}");
    }

    /// Set in the child process of [`a_panicking_task_aborts_the_process`].
    const PANIC_CHILD: &str = "FLYNN_RUNTIME_TEST_PANIC_CHILD";

    /// Written by a destructor on the panicking task's stack, should it unwind.
    const UNWOUND: &str = "the panicking task's stack unwound";

    /// Prints every event's fields to stderr (the child's log).
    struct StderrLog;

    impl tracing::Subscriber for StderrLog {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            struct Line(String);
            impl tracing::field::Visit for Line {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    self.0.push_str(&format!(" {}={v:?}", f.name()));
                }
            }
            let mut line = Line(event.metadata().level().to_string());
            event.record(&mut line);
            eprintln!("{}", line.0);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// Runs the test whose local `here` function `here` names (`type_name_of_val`) as a
    /// child process of this test executable, with [`PANIC_CHILD`] set; its exit status
    /// and standard error. The harness's name for the test is its path without the crate's
    /// name, taken from the function's so that a rename cannot make the child run no test
    /// and exit 0.
    fn run_child(here: &str) -> (std::process::ExitStatus, String) {
        use std::time::{Duration, Instant};
        let name = here
            .strip_suffix("::here")
            .and_then(|n| n.split_once("::"))
            .map(|(_, n)| n)
            .unwrap_or(here);
        assert!(name.starts_with(module_path!().split_once("::").unwrap().1));
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(PANIC_CHILD, "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                break child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
        (status, err)
    }

    /// The child's setup: no core file for the expected abort, events logged to stderr.
    fn as_child() {
        // SAFETY: prctl(PR_SET_DUMPABLE) takes plain integers.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
        tracing::subscriber::set_global_default(StderrLog).unwrap();
    }

    /// A task that panics on one worker takes the whole process down (SIGABRT) instead of
    /// ending that worker alone, logged with the worker's index and thread, at the panic:
    /// nothing unwinds first. Runs this test's own executable as the child that panics.
    #[test]
    fn a_panicking_task_aborts_the_process() {
        use std::os::unix::process::ExitStatusExt;
        use std::time::Duration;
        if std::env::var_os(PANIC_CHILD).is_some() {
            as_child();
            let _hs = spawn_workers(2, Driver::Auto, "panicky", |ctx| async move {
                if ctx.index == 1 {
                    monoio::spawn(async {
                        struct Unwind;
                        impl Drop for Unwind {
                            fn drop(&mut self) {
                                eprintln!("{UNWOUND}");
                            }
                        }
                        let _on_the_stack = Unwind;
                        panic!("a connection task panicked")
                    });
                }
                std::future::pending::<()>().await
            })
            .unwrap();
            // Still here: the worker ended alone and the process went on (exit 0).
            std::thread::sleep(Duration::from_secs(20));
            return;
        }
        fn here() {}
        let (status, err) = run_child(std::any::type_name_of_val(&here));
        assert_eq!(
            status.signal(),
            Some(libc::SIGABRT),
            "the process went on after a worker panicked ({status:?}):\n{err}"
        );
        assert!(
            !err.contains(UNWOUND),
            "aborted only after unwinding:\n{err}"
        );
        // The default hook's message, and the log line naming the worker and its thread.
        assert!(err.contains("a connection task panicked"), "{err}");
        assert!(
            err.lines().any(|l| l.starts_with("ERROR")
                && l.contains("a worker panicked")
                && l.contains(" worker=1 ")
                && l.contains("panicky-1")
                && l.contains("panic=\"a connection task panicked\"")),
            "{err}"
        );
    }

    /// A thread marked with [`abort_on_panic`] takes the process down at its panic, logged
    /// with its name; an unmarked thread's panic still ends that thread alone, and so does a
    /// panic in a [`recoverable`] step of a marked one (caught, the mark back after it).
    #[test]
    fn a_marked_threads_panic_aborts_the_process() {
        use std::os::unix::process::ExitStatusExt;
        if std::env::var_os(PANIC_CHILD).is_some() {
            as_child();
            let unmarked = std::thread::Builder::new()
                .name("unmarked".into())
                .spawn(|| panic!("an unmarked thread panicked"))
                .unwrap();
            assert!(unmarked.join().is_err());
            eprintln!("went on after the unmarked thread");
            let marked = std::thread::Builder::new()
                .name("marked".into())
                .spawn(|| {
                    abort_on_panic();
                    // A recoverable step's panic is caught, and the mark is back after it.
                    let step = recoverable(|| -> () { panic!("a recoverable step panicked") });
                    assert!(step.is_err());
                    assert_eq!(recoverable(|| 7).ok(), Some(7));
                    eprintln!("went on after the recoverable step");
                    panic!("a marked thread panicked")
                })
                .unwrap();
            // Joined: the marked thread ended alone (exit 0).
            let _ = marked.join();
            return;
        }
        fn here() {}
        let (status, err) = run_child(std::any::type_name_of_val(&here));
        assert_eq!(
            status.signal(),
            Some(libc::SIGABRT),
            "the process went on after a marked thread panicked ({status:?}):\n{err}"
        );
        assert!(err.contains("went on after the unmarked thread"), "{err}");
        assert!(err.contains("a recoverable step panicked"), "{err}");
        assert!(err.contains("went on after the recoverable step"), "{err}");
        assert!(err.contains("a marked thread panicked"), "{err}");
        assert!(
            err.lines().any(|l| l.starts_with("ERROR")
                && l.contains("cannot go on without panicked")
                && l.contains("thread=\"marked\"")
                && l.contains("panic=\"a marked thread panicked\"")),
            "{err}"
        );
        assert!(
            !err.lines()
                .any(|l| l.starts_with("ERROR")
                    && (l.contains("unmarked") || l.contains("recoverable"))),
            "{err}"
        );
    }

    #[test]
    fn reuseport_binds_twice() {
        let a = reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = a.local_addr().unwrap();
        let b = reuseport_listener(addr).unwrap();
        assert_eq!(b.local_addr().unwrap(), addr);
    }
}
