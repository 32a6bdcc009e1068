//! The shim process: one per job, single-threaded.
//!
//! It daemonizes (setsid, fork; the parent exits once the control socket is bound), enters a
//! private mount namespace (so the overlay root disappears with it), mounts the job's overlay
//! root, creates and starts the container with libcontainer (whose init becomes the shim's
//! child), then runs a `poll(2)` loop: the init's pidfd, the stdout/stderr pipes (for a TTY
//! job: the terminal's master, and the stdin FIFO it copies to the master), the control
//! socket. After the init exits and the pipes are drained it deletes the container (cgroups,
//! runtime state), writes the final status, and exits once the daemon acknowledged it.
//!
//! Here: the process's start (a job's shim, or a spare one waiting for its job) and the
//! [`ShimLoop`]'s state; its methods are in `connection` (the daemon's connection: accepting,
//! reading frames, writing events) and `poll_loop` (the loop while the job runs and until the
//! daemon acknowledged its end); `output` cuts the job's pipes into output events.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::container::{create, errno, pipe, private_mount_ns, teardown};
use super::layout::{Layout, SHIM_ARG, SPARE_ARG};
use crate::outbox::{Outbox, DEFAULT_CAPACITY};
use crate::spec::{valid_id, ContainerSpec};
use crate::wire::{self, ShimEvent};

mod connection;
mod output;
mod poll_loop;

use connection::Client;

/// Entry point of the shim process. Reads `--flynn-shim <state_dir> <id>` from the command line
/// (after whatever leading arguments the program itself needs) and never returns.
///
/// Call it first thing in `main`, before anything starts a thread (a tokio runtime, a logger
/// with a worker): the shim forks and libcontainer clones, and it refuses to run when the process
/// has more than one thread.
pub fn shim_main() -> ! {
    // libcontainer reports through `tracing`: its warnings and errors go to the shim's stderr
    // (`shim.log` in the job's state dir). Level from FLYNN_LOG, default warn. No threads.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLYNN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let args: Vec<OsString> = std::env::args_os().collect();
    if let Some(i) = args.iter().position(|a| a == SPARE_ARG) {
        let code = match args.get(i + 1) {
            Some(dir) => match run_spare(Path::new(dir)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("flynn spare shim: {e}");
                    1
                }
            },
            None => {
                eprintln!("usage: <program> {SPARE_ARG} <state_dir>");
                2
            }
        };
        std::process::exit(code)
    }
    let code = match args.iter().position(|a| a == SHIM_ARG) {
        Some(i) if args.len() >= i + 3 => {
            let state_dir = PathBuf::from(&args[i + 1]);
            let id = args[i + 2].to_string_lossy().into_owned();
            match run(&state_dir, &id) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("flynn shim {id}: {e}");
                    1
                }
            }
        }
        _ => {
            eprintln!("usage: <program> {SHIM_ARG} <state_dir> <job id>");
            2
        }
    };
    std::process::exit(code)
}

fn thread_count() -> usize {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn run(state_dir: &Path, id: &str) -> Result<(), String> {
    if !valid_id(id) {
        return Err(format!("bad job id {id:?}"));
    }
    let layout = Layout::new(state_dir, id);
    if thread_count() != 1 {
        return Err("the shim must be started single-threaded".into());
    }
    // SAFETY: setsid takes no pointers; failure (already a group leader) is harmless.
    unsafe { libc::setsid() };
    let (ready_r, ready_w) = pipe()?;
    // SAFETY: the process is single-threaded (checked above), so the child may run Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", errno()));
    }
    if pid > 0 {
        drop(ready_w);
        let mut b = [0u8; 1];
        let mut f = File::from(ready_r);
        return match f.read(&mut b) {
            Ok(1) => Ok(()),
            _ => Err(format!(
                "shim failed before it was ready, see {}",
                layout.log().display()
            )),
        };
    }
    drop(ready_r);
    // Nothing of the daemon's working directory stays busy.
    let _ = std::env::set_current_dir("/");
    serve(&layout, ready_w, false)
}

/// A spare shim: started before any job (so a job's start does not wait for an exec and the
/// shim's own start-up), it daemonizes like a job's shim, sends its pid on the socket it got
/// as stdin, and waits there for a job id. Given one, it sends its stderr to the job's
/// `shim.log` and goes on exactly as the job's own shim would, with that socket as the
/// readiness pipe. End-of-file first (the daemon went away or retired it): it exits.
fn run_spare(state_dir: &Path) -> Result<(), String> {
    if thread_count() != 1 {
        return Err("the shim must be started single-threaded".into());
    }
    // The daemon's socket moves off fd 0 (close-on-exec: the container never sees it) and
    // /dev/null takes its place.
    // SAFETY: fcntl/open/dup2/close on descriptors this process owns; the path is a valid
    // NUL-terminated string.
    let sock = unsafe {
        let sock = libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3);
        if sock < 0 {
            return Err(format!(
                "the spare shim needs its socket as stdin: {}",
                errno()
            ));
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::close(null);
        }
        OwnedFd::from_raw_fd(sock)
    };
    // SAFETY: setsid takes no pointers; failure (already a group leader) is harmless.
    unsafe { libc::setsid() };
    // SAFETY: the process is single-threaded (checked above), so the child may run Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", errno()));
    }
    if pid > 0 {
        return Ok(());
    }
    let _ = std::env::set_current_dir("/");
    // The job-independent part of the job's set-up, done while waiting.
    private_mount_ns()?;
    let mut sock = std::os::unix::net::UnixStream::from(sock);
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    if sock.write_all(&me.to_le_bytes()).is_err() {
        return Ok(());
    }
    // One line: the job id.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match sock.read(&mut b) {
            Ok(0) => return Ok(()),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() < 256 => line.push(b[0]),
            Ok(_) => return Err("job id too long".into()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Ok(()),
        }
    }
    let id = String::from_utf8(line).map_err(|_| "job id is not UTF-8".to_string())?;
    if !valid_id(&id) {
        return Err(format!("bad job id {id:?}"));
    }
    let layout = Layout::new(state_dir, &id);
    // From here on this is the job's shim: its stderr is the job's shim.log (which is also
    // how the daemon tells it is alive: see `Shim::cleanup`).
    let log = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(layout.log())
        .map_err(|e| format!("opening {}: {e}", layout.log().display()))?;
    // SAFETY: dup2 onto stderr of a descriptor this process owns.
    unsafe { libc::dup2(log.as_raw_fd(), 2) };
    drop(log);
    serve(&layout, OwnedFd::from(sock), true)
}

/// `ns_ready`: the private mount namespace is already there (a spare shim).
fn serve(layout: &Layout, ready: OwnedFd, ns_ready: bool) -> Result<(), String> {
    // SAFETY: getpid has no preconditions.
    let my_pid = unsafe { libc::getpid() };
    fs::write(layout.shim_pid(), my_pid.to_string())
        .map_err(|e| format!("writing {}: {e}", layout.shim_pid().display()))?;
    let spec: ContainerSpec = fs::read(layout.spec())
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| format!("reading {}: {e}", layout.spec().display()))?;
    spec.validate().map_err(|e| e.to_string())?;
    let _ = fs::remove_file(layout.socket());
    let listener = layout
        .socket_addr()
        .and_then(|a| UnixListener::bind(&a.path))
        .map_err(|e| format!("binding {}: {e}", layout.socket().display()))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    File::from(ready)
        .write_all(b"1")
        .map_err(|e| format!("signalling readiness: {e}"))?;

    let mut shim = ShimLoop {
        layout: layout.clone(),
        spec,
        listener,
        client: None,
        outbox: Outbox::new(DEFAULT_CAPACITY),
        final_queued: false,
        pid: 0,
        signals: Vec::new(),
        stdin_hold: None,
        window: None,
        features_wait: wire::FEATURES_WAIT,
    };
    match create(&shim.spec, layout, ns_ready) {
        Ok(mut running) => {
            shim.pid = running.pid as u32;
            shim.stdin_hold = running.stdin_hold.take();
            shim.outbox.push(ShimEvent::Started {
                pid: running.pid as u32,
            });
            shim.run_job(running);
        }
        Err(reason) => {
            teardown(&shim.spec, layout, None);
            shim.finish(ShimEvent::Failed { reason });
        }
    }
    shim.until_acked();
    Ok(())
}

struct ShimLoop {
    layout: Layout,
    spec: ContainerSpec,
    listener: UnixListener,
    client: Option<Client>,
    outbox: Outbox,
    final_queued: bool,
    /// The job's pid once started (sent in every `HELLO`).
    pid: u32,
    /// Signals received and not yet delivered, each at most once.
    signals: Vec<i32>,
    /// The shim's write end of the job's stdin FIFO, until the daemon closes stdin.
    stdin_hold: Option<OwnedFd>,
    /// The latest window size asked for (TTY jobs), not yet set.
    window: Option<(u16, u16)>,
    /// How long a new connection's events wait for the daemon's features at most
    /// ([`wire::FEATURES_WAIT`]; a test's own).
    features_wait: Duration,
}

#[cfg(test)]
mod tests;
