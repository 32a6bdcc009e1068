//! The shim process: one per job, single-threaded.
//!
//! It daemonizes (setsid, fork; the parent exits once the control socket is bound), enters a
//! private mount namespace (so the overlay root disappears with it), mounts the job's overlay
//! root, creates and starts the container with libcontainer (whose init becomes the shim's
//! child), then runs a `poll(2)` loop: the init's pidfd, the stdout/stderr pipes (for a TTY
//! job: the terminal's master, and the stdin FIFO it copies to the master), the control
//! socket. After the init exits and the pipes are drained it deletes the container (cgroups,
//! runtime state), writes the final status, and exits once the daemon acknowledged it.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::cgroups;
use super::container::{create, errno, pipe, private_mount_ns, reap, teardown, JobIo, Running};
use super::layout::{Layout, SHIM_ARG, SPARE_ARG};
use super::terminal::{end_of_input, read_input, set_window, write_input};
use crate::outbox::{Outbox, DEFAULT_CAPACITY};
use crate::spec::{valid_id, ContainerSpec};
use crate::wire::{self, Frame, ShimEvent, Stream};

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

/// Cuts a pipe's bytes into output events ([`wire::split_output`]): lines, and the bytes
/// after the last newline as a piece of a line at once while a daemon that reads pieces
/// ([`wire::PARTIAL_OUTPUT`]) is connected (a prompt reaches an attached client before its
/// newline); while none is, those wait here for their newline (so output that does not fit in
/// the buffer is dropped and counted as whole lines, and a daemon of the protocol's first
/// version gets lines). A terminal's bytes (`raw`) go as they were read.
struct Lines {
    stream: Stream,
    buf: Vec<u8>,
    open: bool,
    raw: bool,
}

impl Lines {
    /// `hold`: a partial line waits for its newline (no daemon that reads pieces is
    /// connected).
    fn feed(&mut self, data: &[u8], out: &mut Outbox, may_drop: bool, hold: bool) {
        if self.raw {
            // Reads are at most MAX_LINE bytes: one event each, cut after its last newline
            // (so a partial line, which the daemon holds unacknowledged until its newline,
            // starts at an event: a daemon sent the held events again rebuilds it without
            // logging the complete lines before it twice).
            let cut = match data.iter().rposition(|&b| b == b'\n') {
                Some(nl) if nl + 1 < data.len() => nl + 1,
                _ => data.len(),
            };
            let (lines, partial) = data.split_at(cut);
            for chunk in [lines, partial] {
                if !chunk.is_empty() {
                    out.push_terminal(chunk.to_vec(), may_drop);
                }
            }
            return;
        }
        let stream = self.stream;
        let push = |piece: &[u8], newline| {
            out.push_output(stream, piece.to_vec(), newline, may_drop);
        };
        if self.buf.is_empty() {
            let used = wire::split_output(data, hold, push);
            self.buf.extend_from_slice(&data[used..]);
        } else {
            self.buf.extend_from_slice(data);
            let used = wire::split_output(&self.buf, hold, push);
            self.buf.drain(..used);
        }
    }

    /// Sends a partial line held back (at the pipe's end, or once a daemon that reads pieces
    /// is connected).
    fn flush(&mut self, out: &mut Outbox, may_drop: bool) {
        if !self.buf.is_empty() {
            out.push_output(self.stream, std::mem::take(&mut self.buf), false, may_drop);
        }
    }
}

struct Client {
    sock: UnixStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// The features the daemon announced on this connection ([`wire::Frame::Features`]).
    features: Option<u32>,
    /// Events wait for its features until then ([`ShimLoop::features_wait`] after it
    /// connected)...
    deadline: Instant,
    /// ... and until the shim read what it sent by then (see [`ShimLoop::write_client`]).
    waited: bool,
}

impl Client {
    /// Events may be sent: the daemon announced its features, or had time to (one of the
    /// protocol's first version never does).
    fn settled(&self) -> bool {
        self.features.is_some() || self.waited
    }

    /// How long until [`Client::settled`], if it is not yet.
    fn unsettled_for(&self) -> Option<Duration> {
        (!self.settled()).then(|| self.deadline.saturating_duration_since(Instant::now()))
    }

    /// The daemon reads pieces of lines.
    fn partial(&self) -> bool {
        self.features.is_some_and(|f| f & wire::PARTIAL_OUTPUT != 0)
    }
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

/// How long after the init exited the shim waits for the pipes to reach end-of-file.
const DRAIN: Duration = Duration::from_secs(2);
/// How much output the shim encodes ahead of the socket.
const WRITE_AHEAD: usize = 256 * 1024;

impl ShimLoop {
    fn finish(&mut self, ev: ShimEvent) {
        self.outbox.flush_dropped();
        let json = serde_json::to_vec(&ev).unwrap();
        let tmp = self.layout.status().with_extension("tmp");
        if fs::write(&tmp, json)
            .and_then(|_| fs::rename(&tmp, self.layout.status()))
            .is_err()
        {
            eprintln!("could not write {}", self.layout.status().display());
        }
        self.outbox.push(ev);
        self.final_queued = true;
    }

    fn accept(&mut self) {
        while let Ok((sock, _)) = self.listener.accept() {
            // Acks the old connection sent before this one connected are in its buffer: take
            // them first, or everything they acknowledged would be sent again.
            if self.client.is_some() {
                self.read_client();
            }
            if sock.set_nonblocking(true).is_err() {
                continue;
            }
            let mut wbuf = Vec::new();
            let seq = self.outbox.reconnect();
            wire::encode_hello(seq, self.pid, &mut wbuf);
            // The one daemon: a new connection replaces the old one.
            self.client = Some(Client {
                sock,
                rbuf: Vec::new(),
                wbuf,
                features: None,
                deadline: Instant::now() + self.features_wait,
                waited: false,
            });
            // A new daemon announces its features as it connects, before this accepts:
            // usually here already.
            self.read_client();
        }
    }

    /// Reads frames from the daemon; signals go to `self.signals`. Drops the client on EOF or
    /// error.
    fn read_client(&mut self) {
        let Some(c) = self.client.as_mut() else {
            return;
        };
        let mut buf = [0u8; 4096];
        let mut drop_client = false;
        loop {
            match c.sock.read(&mut buf) {
                Ok(0) => {
                    drop_client = true;
                    break;
                }
                Ok(n) => c.rbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    drop_client = true;
                    break;
                }
            }
        }
        loop {
            match wire::decode(&mut c.rbuf) {
                Ok(Some(Frame::Ack(seq))) => self.outbox.ack(seq),
                // A signal already waiting is not queued twice (standard signals do not
                // queue in the kernel either): at most one of each, however many come
                // before the job starts.
                Ok(Some(Frame::Signal(s))) if !self.signals.contains(&s) => self.signals.push(s),
                Ok(Some(Frame::Signal(_))) => {}
                Ok(Some(Frame::CloseStdin)) => self.stdin_hold = None,
                Ok(Some(Frame::Resize { rows, cols })) => self.window = Some((rows, cols)),
                Ok(Some(Frame::Features(f))) => c.features = Some(f),
                Ok(Some(_)) | Err(_) => {
                    drop_client = true;
                    break;
                }
                Ok(None) => break,
            }
        }
        if drop_client {
            self.client = None;
        }
    }

    /// Sends what it can. Returns whether it read from the daemon first (the wait for its
    /// features just ended): what was read (signals, a window size, acks, the announcement)
    /// is to be acted on before the loop sleeps, as the socket has nothing left to wake it.
    fn write_client(&mut self) -> bool {
        // The wait for the daemon's features is over: what it sent by now is read first (its
        // announcement, written as it connected, counts however late the shim looks: one
        // descheduled past the wait would otherwise take a new daemon for an old one, and
        // send it whole lines).
        let read = self
            .client
            .as_ref()
            .is_some_and(|c| !c.settled() && Instant::now() >= c.deadline);
        if read {
            self.read_client();
            if let Some(c) = self.client.as_mut() {
                c.waited = true;
            }
        }
        let Some(c) = self.client.as_mut() else {
            return read;
        };
        loop {
            if c.wbuf.is_empty() {
                // Nothing but `HELLO` until the daemon said what it reads.
                if !c.settled() {
                    return read;
                }
                let partial = c.partial();
                self.outbox.encode_unsent(&mut c.wbuf, WRITE_AHEAD, partial);
                if c.wbuf.is_empty() {
                    return read;
                }
            }
            // SAFETY: the buffer pointer and length describe initialized memory.
            let n = unsafe {
                libc::send(
                    c.sock.as_raw_fd(),
                    c.wbuf.as_ptr().cast(),
                    c.wbuf.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = errno();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock => return read,
                    std::io::ErrorKind::Interrupted => continue,
                    _ => {
                        self.client = None;
                        return read;
                    }
                }
            }
            c.wbuf.drain(..n as usize);
        }
    }

    fn read_pipe(&mut self, fd: RawFd, lines: &mut Lines) {
        let mut buf = vec![0u8; 64 * 1024];
        // Bounded per turn so one chatty stream cannot starve the socket.
        for _ in 0..16 {
            // SAFETY: `buf` is a valid writable buffer of its length.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n == 0 {
                lines.open = false;
                lines.flush(&mut self.outbox, self.client.is_none());
                return;
            }
            if n < 0 {
                let e = errno();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    lines.open = false;
                    lines.flush(&mut self.outbox, self.client.is_none());
                }
                return;
            }
            let hold = !self.partial_ok();
            lines.feed(
                &buf[..n as usize],
                &mut self.outbox,
                self.client.is_none(),
                hold,
            );
            if self.client.is_some() && self.outbox.full() {
                return;
            }
        }
    }

    /// The connected daemon reads pieces of lines.
    fn partial_ok(&self) -> bool {
        self.client.as_ref().is_some_and(Client::partial)
    }

    /// How long [`ShimLoop::run_job`]'s loop may sleep in `poll`: not at all when the
    /// daemon's frames were read outside the poll step (`read`: by `write_client`, past the
    /// wait for the daemon's features) or a signal or window size read is not yet acted on
    /// (they are taken after the poll step; the socket is drained, and nothing might wake
    /// the loop for long: a quiet job's SIGTERM waited for the stop's SIGKILL); else until
    /// the drain after the job's exit (`exited_at`) is over, if it exited.
    fn poll_timeout(&self, read: bool, exited_at: Option<Instant>) -> Option<Duration> {
        if read || !self.signals.is_empty() || self.window.is_some() {
            return Some(Duration::ZERO);
        }
        exited_at.map(|at| DRAIN.saturating_sub(at.elapsed()))
    }

    /// Waits for `fds`, at most `timeout` (`None`: no limit), and no longer than until a
    /// new connection's wait for its features is over.
    fn poll(&mut self, fds: &mut [libc::pollfd], timeout: Option<Duration>) {
        let timeout = match (
            timeout,
            self.client.as_ref().and_then(Client::unsettled_for),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Rounded up: a wait cut short of its end would only come back to wait again.
        let ms = timeout.map_or(-1, |t| t.as_micros().div_ceil(1000).min(60_000) as i32);
        // SAFETY: `fds` is a valid slice of pollfd.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    }

    fn run_job(&mut self, mut r: Running) {
        // The job's output fds (a TTY job: its terminal's master, no stderr) and, for a TTY
        // job, the read end of its stdin FIFO, whose bytes the shim writes to the master.
        let (out_fd, err_fd, mut input) = match r.io {
            JobIo::Pipes { stdout, stderr } => (stdout, Some(stderr), None),
            JobIo::Terminal { master, input } => (master, None, Some(input)),
        };
        let tty = input.is_some();
        let mut out = Lines {
            stream: Stream::Stdout,
            buf: Vec::new(),
            open: true,
            raw: tty,
        };
        let mut err = Lines {
            stream: Stream::Stderr,
            buf: Vec::new(),
            open: err_fd.is_some(),
            raw: false,
        };
        let err_raw = err_fd.as_ref().map_or(-1, |f| f.as_raw_fd());
        // Input read from the FIFO and not yet taken by the terminal; the last byte read.
        let mut pending: Vec<u8> = Vec::new();
        let mut last_input: Option<u8> = None;
        let mut status: Option<Option<i32>> = None;
        let mut exited_at: Option<Instant> = None;
        // `write_client` read from the daemon since the last poll step.
        let mut read = false;
        loop {
            if let Some(at) = exited_at {
                if (!out.open && !err.open) || at.elapsed() >= DRAIN {
                    break;
                }
            }
            let read_pipes = self.client.is_none() || !self.outbox.full();
            let mut out_events = 0;
            if out.open && read_pipes {
                out_events |= libc::POLLIN;
            }
            if out.open && !pending.is_empty() {
                out_events |= libc::POLLOUT;
            }
            let mut fds = vec![
                pollfd(self.listener.as_raw_fd(), libc::POLLIN),
                pollfd(
                    if status.is_none() {
                        r.pidfd.as_raw_fd()
                    } else {
                        -1
                    },
                    libc::POLLIN,
                ),
                pollfd(
                    if out_events != 0 {
                        out_fd.as_raw_fd()
                    } else {
                        -1
                    },
                    out_events,
                ),
                pollfd(
                    if err.open && read_pipes { err_raw } else { -1 },
                    libc::POLLIN,
                ),
                pollfd(
                    match &input {
                        Some(f) if pending.is_empty() && out.open => f.as_raw_fd(),
                        _ => -1,
                    },
                    libc::POLLIN,
                ),
            ];
            if let Some(c) = &self.client {
                let mut ev = libc::POLLIN;
                if !c.wbuf.is_empty() {
                    ev |= libc::POLLOUT;
                }
                fds.push(pollfd(c.sock.as_raw_fd(), ev));
            }
            // Anything new to write goes out before sleeping.
            read |= self.write_client();
            let timeout = self.poll_timeout(std::mem::take(&mut read), exited_at);
            self.poll(&mut fds, timeout);
            if fds[0].revents != 0 {
                self.accept();
            }
            if fds.len() > 5 && fds[5].revents != 0 {
                self.read_client();
            }
            // A partial line that waited for a daemon that reads pieces goes once one is
            // connected.
            if self.partial_ok() {
                out.flush(&mut self.outbox, false);
                err.flush(&mut self.outbox, false);
            }
            for sig in std::mem::take(&mut self.signals) {
                if status.is_none() {
                    // SAFETY: `r.pid` is our unreaped child, so the pid cannot be reused.
                    unsafe { libc::kill(r.pid, sig) };
                }
            }
            if let Some((rows, cols)) = self.window.take() {
                if tty && out.open {
                    if let Err(e) = set_window(out_fd.as_raw_fd(), rows, cols) {
                        eprintln!("setting the terminal size: {e}");
                    }
                }
            }
            if let Some(f) = &input {
                if fds[4].revents != 0 {
                    // (Read only while nothing is pending: all before went to the terminal.)
                    if read_input(f.as_raw_fd(), &mut pending) {
                        last_input = pending.last().copied().or(last_input);
                    } else {
                        // End of input (the daemon closed stdin): the terminal's end-of-file
                        // character, as Flynn and Docker send it (twice after a partial
                        // line in canonical mode); the FIFO is done with.
                        pending = end_of_input(out_fd.as_raw_fd(), last_input);
                        input = None;
                    }
                }
            }
            if tty && out.open && !pending.is_empty() {
                write_input(out_fd.as_raw_fd(), &mut pending);
            }
            if fds[2].revents & !libc::POLLOUT != 0 {
                self.read_pipe(out_fd.as_raw_fd(), &mut out);
                if !out.open {
                    // The terminal is gone: nothing takes input any more.
                    pending.clear();
                    input = None;
                }
            }
            if fds[3].revents != 0 {
                self.read_pipe(err_raw, &mut err);
            }
            if fds[1].revents != 0 && status.is_none() {
                // `None` inside: the init could not be waited for (never expected).
                status = Some(reap(r.pid));
                // What the job left running in its namespace goes with it, as it did when
                // the job was the namespace's init.
                r.pid_ns.end();
                exited_at = Some(Instant::now());
            }
            read = self.write_client();
        }
        drop(input);
        // Whatever is still in the pipes is read now (and counted as dropped if it cannot fit).
        for (fd, lines) in [(out_fd.as_raw_fd(), &mut out), (err_raw, &mut err)] {
            if lines.open {
                let saved_client = self.client.take();
                self.read_pipe(fd, lines);
                self.client = saved_client;
                lines.flush(&mut self.outbox, true);
            }
        }
        r.pid_ns.end();
        let oom_killed = cgroups::oom_killed(&self.spec);
        teardown(&self.spec, &self.layout, Some(&mut r.container));
        let (code, signal) = match status.flatten() {
            Some(st) if libc::WIFSIGNALED(st) => (None, Some(libc::WTERMSIG(st))),
            Some(st) => (Some(libc::WEXITSTATUS(st)), None),
            None => (None, None),
        };
        let ev = ShimEvent::Exited {
            code,
            signal,
            oom_killed,
        };
        self.finish(ev);
    }

    /// Serves the daemon until it acknowledged the final event.
    fn until_acked(&mut self) {
        while !self.outbox.final_acked(self.final_queued) {
            self.write_client();
            // It may have read the final event's ack (past the wait for the daemon's
            // features): the socket is drained, nothing would wake the poll.
            if self.outbox.final_acked(self.final_queued) {
                break;
            }
            let mut fds = vec![pollfd(self.listener.as_raw_fd(), libc::POLLIN)];
            if let Some(c) = &self.client {
                let mut ev = libc::POLLIN;
                if !c.wbuf.is_empty() {
                    ev |= libc::POLLOUT;
                }
                fds.push(pollfd(c.sock.as_raw_fd(), ev));
            }
            self.poll(&mut fds, None);
            if fds[0].revents != 0 {
                self.accept();
            }
            if fds.len() > 1 && fds[1].revents != 0 {
                self.read_client();
            }
            // The job is gone: nothing to signal or resize.
            self.signals.clear();
            self.window = None;
        }
        let _ = fs::remove_file(self.layout.socket());
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MAX_LINE;

    /// The output events in `out`: (bytes, newline).
    fn lines(out: &mut Outbox) -> Vec<(Vec<u8>, bool)> {
        out.reconnect();
        let mut buf = Vec::new();
        out.encode_unsent(&mut buf, usize::MAX, true);
        let mut got = Vec::new();
        while let Some(Frame::Event(ShimEvent::Output { line, newline, .. })) =
            wire::decode(&mut buf).unwrap()
        {
            got.push((line, newline));
        }
        got
    }

    fn pipe() -> Lines {
        Lines {
            stream: Stream::Stdout,
            buf: Vec::new(),
            open: true,
            raw: false,
        }
    }

    /// With no daemon connected, a partial line waits for its newline (what is dropped for
    /// want of room is whole lines); lines longer than MAX_LINE go in pieces.
    #[test]
    fn lines_split_across_reads_and_at_max_line() {
        let mut out = Outbox::new(1 << 30);
        let mut l = pipe();
        l.feed(b"he", &mut out, true, true);
        l.feed(b"llo\nwor", &mut out, true, true);
        l.feed(b"ld\n\n", &mut out, true, true);
        let long = vec![b'a'; MAX_LINE * 2 + 5];
        l.feed(&long, &mut out, true, true);
        l.feed(b"\ntail", &mut out, true, true);
        l.flush(&mut out, true);
        let got = lines(&mut out);
        let shape: Vec<(usize, bool)> = got.iter().map(|(l, nl)| (l.len(), *nl)).collect();
        assert_eq!(
            shape,
            vec![
                (5, true),
                (5, true),
                (0, true),
                (MAX_LINE, false),
                (MAX_LINE, false),
                (5, true),
                (4, false)
            ]
        );
        assert_eq!(got[0].0, b"hello");
        assert_eq!(got[1].0, b"world");
        assert_eq!(got[6].0, b"tail");
    }

    /// With a daemon connected the bytes after a read's last newline go at once, marked as
    /// having no newline: the job's bytes come out exactly as written, a prompt included.
    #[test]
    fn a_connected_daemon_gets_partial_lines_at_once() {
        let mut out = Outbox::new(1 << 30);
        let mut l = pipe();
        l.feed(b"Password: ", &mut out, false, false);
        assert_eq!(lines(&mut out), vec![(b"Password: ".to_vec(), false)]);
        let mut out = Outbox::new(1 << 30);
        let mut rng = fastrand::Rng::with_seed(3);
        let mut written = Vec::new();
        for _ in 0..200 {
            let len = rng.usize(0..3 * MAX_LINE / 2);
            let chunk: Vec<u8> = (0..len)
                .map(|_| if rng.u8(..40) == 0 { b'\n' } else { b'x' })
                .collect();
            written.extend_from_slice(&chunk);
            l.feed(&chunk, &mut out, false, false);
            assert!(l.buf.is_empty());
        }
        let mut got = Vec::new();
        for (piece, newline) in lines(&mut out) {
            assert!(piece.len() <= MAX_LINE);
            got.extend_from_slice(&piece);
            if newline {
                got.push(b'\n');
            }
        }
        assert_eq!(got, written);
        // A partial line held while no daemon was connected goes once one is.
        let mut out = Outbox::new(1 << 30);
        l.feed(b"a\nb", &mut out, true, true);
        l.flush(&mut out, false);
        assert_eq!(
            lines(&mut out),
            vec![(b"a".to_vec(), true), (b"b".to_vec(), false)]
        );
    }

    /// A terminal's output goes as read: a prompt without a newline is not held back, and
    /// `\r\n` and partial lines stay as they are; a read is cut after its last newline.
    #[test]
    fn terminal_output_is_raw() {
        let mut out = Outbox::new(1 << 30);
        let mut t = Lines {
            stream: Stream::Stdout,
            buf: Vec::new(),
            open: true,
            raw: true,
        };
        t.feed(b"ready> ", &mut out, false, false);
        t.feed(b"abc\r\ngot:abc\r\n", &mut out, false, false);
        // Cut after the last newline: the next partial line starts an event.
        t.feed(b"a\r\nb\r\nnext> ", &mut out, false, false);
        t.feed(b"1%\r2%\r", &mut out, false, false);
        t.flush(&mut out, false);
        out.reconnect();
        let mut buf = Vec::new();
        out.encode_unsent(&mut buf, usize::MAX, true);
        let mut got = Vec::new();
        while let Some(Frame::Event(ev)) = wire::decode(&mut buf).unwrap() {
            got.push(ev);
        }
        assert_eq!(
            got,
            vec![
                ShimEvent::Terminal {
                    data: b"ready> ".to_vec()
                },
                ShimEvent::Terminal {
                    data: b"abc\r\ngot:abc\r\n".to_vec()
                },
                ShimEvent::Terminal {
                    data: b"a\r\nb\r\n".to_vec()
                },
                ShimEvent::Terminal {
                    data: b"next> ".to_vec()
                },
                ShimEvent::Terminal {
                    data: b"1%\r2%\r".to_vec()
                },
            ]
        );
    }

    /// The connection's wait for the daemon's features is over.
    fn expire(shim: &mut ShimLoop) {
        shim.client.as_mut().unwrap().deadline = Instant::now();
    }

    /// The frames (kind, payload) a daemon's end of a connection has to read now.
    fn frames_read(d: &mut UnixStream) -> Vec<(u8, Vec<u8>)> {
        d.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 65536];
        while let Ok(n @ 1..) = d.read(&mut chunk) {
            bytes.extend_from_slice(&chunk[..n]);
        }
        let mut frames = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = u32::from_be_bytes(bytes[at + 1..at + 5].try_into().unwrap()) as usize;
            frames.push((bytes[at], bytes[at + 5..at + 5 + len].to_vec()));
            at += 5 + len;
        }
        assert_eq!(at, bytes.len(), "whole frames");
        frames
    }

    /// A daemon of the protocol's first version (it announces no features, and fails a
    /// connection on frame kinds it does not know) gets only whole-line frames: a partial
    /// line is held for its newline, and what must go without one (at the pipe's end)
    /// goes as a line. A daemon that announces `PARTIAL_OUTPUT` gets pieces, the held
    /// partial line first. Events wait for the announcement (up to `FEATURES_WAIT`).
    #[test]
    fn a_daemon_without_the_feature_gets_only_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path(), "j");
        // Past only when the test says (`expire`): a stall of the test's own changes
        // nothing.
        let mut shim = test_shim(&layout, Duration::from_secs(3600));
        let mut l = pipe();
        let feed = |shim: &mut ShimLoop, l: &mut Lines, data: &[u8]| {
            let hold = !shim.partial_ok();
            l.feed(data, &mut shim.outbox, shim.client.is_none(), hold);
        };

        let mut old = UnixStream::connect(layout.socket()).unwrap();
        shim.accept();
        assert!(!shim.partial_ok());
        feed(&mut shim, &mut l, b"a\nPassword: ");
        let long = vec![b'x'; MAX_LINE + 3];
        feed(&mut shim, &mut l, b"b\n");
        feed(&mut shim, &mut l, &long);
        // Nothing but HELLO until the daemon had time to announce its features.
        shim.write_client();
        let got = frames_read(&mut old);
        assert_eq!(got.iter().map(|f| f.0).collect::<Vec<_>>(), [wire::HELLO]);
        expire(&mut shim);
        // The pipe ends with a partial line: it goes, as a line.
        l.flush(&mut shim.outbox, false);
        shim.write_client();
        let got = frames_read(&mut old);
        let want: Vec<(u8, Vec<u8>)> = vec![
            (wire::STDOUT, b"a".to_vec()),
            (wire::STDOUT, b"Password: b".to_vec()),
            (wire::STDOUT, long[..MAX_LINE].to_vec()),
            (wire::STDOUT, long[MAX_LINE..].to_vec()),
        ];
        assert_eq!(got, want);

        // A daemon that reads pieces: the same events, pieces as pieces, and a partial
        // line at once.
        let mut new = UnixStream::connect(layout.socket()).unwrap();
        let mut announce = Vec::new();
        wire::encode_features(wire::PARTIAL_OUTPUT, &mut announce);
        new.write_all(&announce).unwrap();
        shim.accept();
        shim.read_client();
        assert!(shim.partial_ok());
        feed(&mut shim, &mut l, b"c\nready> ");
        shim.write_client();
        let got = frames_read(&mut new);
        let kinds: Vec<u8> = got.iter().map(|f| f.0).collect();
        assert_eq!(
            kinds,
            [
                wire::HELLO,
                wire::STDOUT,
                wire::STDOUT,
                wire::STDOUT_PART,
                wire::STDOUT_PART,
                wire::STDOUT,
                wire::STDOUT_PART,
            ]
        );
        assert_eq!(got[6].1, b"ready> ");
    }

    /// A daemon that announced its features as it connected gets pieces even when the shim
    /// gets to the connection after its wait for them is over (descheduled on a loaded
    /// machine): the announcement is read before the shim settles for whole lines, at
    /// `accept` or at the first write past the wait. It used to settle by the clock, and a
    /// new daemon then got whole lines (newlines added to a job's output).
    #[test]
    fn a_late_shim_still_reads_the_daemons_announcement() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path(), "j");
        // Over as soon as it starts: the shim is as late as can be.
        let mut shim = test_shim(&layout, Duration::ZERO);
        let mut announce = Vec::new();
        wire::encode_features(wire::PARTIAL_OUTPUT, &mut announce);
        let mut l = pipe();
        for announced_before_accept in [true, false] {
            let mut d = UnixStream::connect(layout.socket()).unwrap();
            if announced_before_accept {
                d.write_all(&announce).unwrap();
            }
            shim.accept();
            if !announced_before_accept {
                d.write_all(&announce).unwrap();
            }
            // Past the wait: settled, one way or the other.
            shim.write_client();
            let hold = !shim.partial_ok();
            l.feed(b"a\nready> ", &mut shim.outbox, false, hold);
            shim.write_client();
            assert!(
                shim.partial_ok(),
                "before accept: {announced_before_accept}"
            );
            let got = frames_read(&mut d);
            let kinds: Vec<u8> = got.iter().map(|f| f.0).collect();
            assert!(
                kinds.contains(&wire::STDOUT_PART),
                "before accept: {announced_before_accept}: {got:?}"
            );
            assert_eq!(got.last().unwrap().1, b"ready> ");
            // Acknowledged: the next connection gets only what follows.
            let seq = shim.outbox.reconnect();
            shim.outbox.ack(seq);
        }
    }

    /// A shim serving `layout`'s socket, with no job, waiting `features_wait` for a new
    /// connection's features.
    fn test_shim(layout: &Layout, features_wait: Duration) -> ShimLoop {
        fs::create_dir_all(&layout.dir).unwrap();
        let listener = UnixListener::bind(layout.socket()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let spec: ContainerSpec = serde_json::from_value(serde_json::json!({
            "id": "j", "layers": [], "args": ["sh"], "env": [], "cwd": "",
            "hostname": null, "netns": null, "mounts": [], "resources": {},
            "cgroup_parent": "flynn",
        }))
        .unwrap();
        ShimLoop {
            layout: layout.clone(),
            spec,
            listener,
            client: None,
            outbox: Outbox::new(1 << 30),
            final_queued: false,
            pid: 0,
            signals: Vec::new(),
            stdin_hold: None,
            window: None,
            features_wait,
        }
    }

    /// Writes `frame` to `d` after `after` (in a thread): wakes a shim's poll that waits for
    /// the daemon, as it would have waited for whatever the daemon sent next.
    fn later(d: &UnixStream, after: Duration, frame: Vec<u8>) -> std::thread::JoinHandle<()> {
        let mut d = d.try_clone().unwrap();
        std::thread::spawn(move || {
            std::thread::sleep(after);
            let _ = d.write_all(&frame);
        })
    }

    /// A signal (or a window size) the daemon sent after the shim accepted it, read only at
    /// the end of the wait for its features (`write_client`: a daemon of the protocol's
    /// first version announces none), is acted on without waiting for more from the
    /// daemon: the loop does not sleep in `poll` with it pending. It used to wait (the
    /// socket was drained): a quiet job's SIGTERM until the stop's SIGKILL.
    #[test]
    fn a_signal_read_at_the_end_of_the_features_wait_does_not_wait() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path(), "j");
        let mut shim = test_shim(&layout, Duration::from_secs(3600));
        let mut d = UnixStream::connect(layout.socket()).unwrap();
        shim.accept();
        let mut frames = Vec::new();
        wire::encode_signal(libc::SIGTERM, &mut frames);
        wire::encode_resize(40, 100, &mut frames);
        d.write_all(&frames).unwrap();
        expire(&mut shim);
        let read = shim.write_client();
        assert!(read);
        assert_eq!(shim.signals, [libc::SIGTERM]);
        assert_eq!(shim.window, Some((40, 100)));
        // The poll step as `run_job` takes it: the listener and the connection.
        let mut ack = Vec::new();
        wire::encode_u64(wire::ACK, 0, &mut ack);
        let waker = later(&d, Duration::from_secs(3), ack);
        let sock = shim.client.as_ref().unwrap().sock.as_raw_fd();
        let mut fds = [
            pollfd(shim.listener.as_raw_fd(), libc::POLLIN),
            pollfd(sock, libc::POLLIN),
        ];
        let t = Instant::now();
        let timeout = shim.poll_timeout(read, None);
        shim.poll(&mut fds, timeout);
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "slept {:?} with a signal pending",
            t.elapsed()
        );
        // Pending work alone keeps the loop awake; none, and it sleeps.
        assert_eq!(shim.poll_timeout(false, None), Some(Duration::ZERO));
        shim.signals.clear();
        assert_eq!(shim.poll_timeout(false, None), Some(Duration::ZERO));
        shim.window = None;
        assert_eq!(shim.poll_timeout(false, None), None);
        waker.join().unwrap();
        drop(d);
    }

    /// The final event's ack, sent by a daemon (of the protocol's first version) that
    /// reconnected, and read only at the end of the wait for its features (in
    /// `write_client`), ends the shim's wait for it at once: it used to sleep in `poll`
    /// (the socket drained) until the daemon sent something else.
    #[test]
    fn the_final_ack_read_at_the_end_of_the_features_wait_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path(), "j");
        let mut shim = test_shim(&layout, Duration::from_secs(3600));
        shim.finish(ShimEvent::Exited {
            code: Some(0),
            signal: None,
            oom_killed: false,
        });
        // The daemon had it on a connection that broke before its ack got through.
        let d = UnixStream::connect(layout.socket()).unwrap();
        shim.accept();
        let mut ack = Vec::new();
        wire::encode_u64(wire::ACK, 1, &mut ack);
        (&d).write_all(&ack).unwrap();
        expire(&mut shim);
        let waker = later(&d, Duration::from_secs(3), ack);
        let t = Instant::now();
        shim.until_acked();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "waited {:?} with the final event acked",
            t.elapsed()
        );
        waker.join().unwrap();
    }
}
