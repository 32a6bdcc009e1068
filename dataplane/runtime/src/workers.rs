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

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write within it and
    // sched_setaffinity only reads it. Failure (e.g. a restricted cpuset) is harmless.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Starts `n` pinned workers named `<name>-<i>`. Each builds its runtime (reporting
/// which driver it got) and runs `make(ctx)` to completion. Returns once every worker
/// has its runtime, or the first error building one.
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
    let make = std::sync::Arc::new(make);
    let cores = core_count();
    let mut handles = Vec::with_capacity(n);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
    for index in 0..n {
        let make = make.clone();
        let ready = ready_tx.clone();
        let h = std::thread::Builder::new()
            .name(format!("{name}-{index}"))
            .spawn(move || {
                if n <= cores {
                    pin_to_cpu(index % cores);
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

/// Whether a [`reuseport_listener`] on `addr` could be opened now: binds a socket with
/// the same options but never listens, so no connection is ever steered to it.
pub fn check_reuseport_bind(addr: SocketAddr) -> io::Result<()> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_check_sees_a_port_another_socket_listens_on() {
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = other.local_addr().unwrap();
        assert_eq!(
            check_reuseport_bind(taken).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        // A port our own listeners hold (SO_REUSEPORT) stays usable.
        let ours = reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        check_reuseport_bind(ours.local_addr().unwrap()).unwrap();
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

    #[test]
    fn reuseport_binds_twice() {
        let a = reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = a.local_addr().unwrap();
        let b = reuseport_listener(addr).unwrap();
        assert_eq!(b.local_addr().unwrap(), addr);
    }
}
