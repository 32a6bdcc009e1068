//! The daemon's side of a shim: spawning it, (re)connecting, reading events, sending signals,
//! cleaning up after it.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

use super::cgroups;
use super::layout::{Layout, SHIM_ARG, SPARE_ARG};
use crate::spec::{valid_id, ContainerSpec};
use crate::wire::{self, Frame, ShimEvent};
use crate::ContainerError;

/// Spawns, finds and cleans up per-job shims.
pub struct Shim;

/// Creates (or empties) `path`, readable by its owner only: a job's spec holds its
/// environment (secrets among it), its log what the shim says about it.
fn create_private(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // The mode applies to a file it creates; one an older version left 0644 is narrowed.
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// `bytes` in a new file at `path`, as [`create_private`] makes it.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    create_private(path)?.write_all(bytes)
}

/// A connection to one job's shim.
pub struct ShimConn {
    id: String,
    layout: Layout,
    /// `None` once the shim is gone; the final event then comes from the status file.
    sock: Option<UnixStream>,
    rbuf: Vec<u8>,
    /// Frames to the shim not yet written (acks, signals).
    wbuf: std::sync::Mutex<Vec<u8>>,
    /// Sequence number of the next event frame.
    next_seq: u64,
    acked: u64,
    /// Acknowledge no further than this (see [`ShimConn::limit_acks`]); `None`: everything
    /// returned is acknowledged.
    ack_limit: Option<u64>,
    hello: bool,
    finished: bool,
    /// Whether the job has a stdin FIFO and whether it runs on a terminal (from its spec;
    /// read from the state dir when unknown, after a reconnect).
    io: std::sync::OnceLock<(bool, bool)>,
}

/// A shim started ahead of any job ([`Shim::spawn_spare`]), waiting for one
/// ([`Shim::spawn_using`]). Dropping it retires the spare: it sees end-of-file and exits.
pub struct SpareShim {
    sock: UnixStream,
    pid: i32,
    state_dir: std::path::PathBuf,
}

impl SpareShim {
    /// The spare's process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

fn check_id(id: &str) -> Result<(), ContainerError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(ContainerError::invalid(format!("bad job id {id:?}")))
    }
}

fn read_status(layout: &Layout) -> Option<ShimEvent> {
    let bytes = fs::read(layout.status()).ok()?;
    serde_json::from_slice(&bytes)
        .ok()
        .filter(ShimEvent::is_final)
}

fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Is `pid` alive and the shim of `id`? A shim started for the job names it on its command
/// line; a spare that was given the job has the job's `shim.log` as its stderr. That link is
/// the log's resolved path, and `layout` may be under a state dir given through a symlink or
/// relative: both sides are compared resolved (else a live spare looked dead and cleanup
/// deleted its directory under it, leaving it running).
fn shim_alive(pid: i32, id: &str, layout: &Layout) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    if args
        .windows(3)
        .any(|w| w[0] == SHIM_ARG.as_bytes() && w[2] == id.as_bytes())
    {
        return true;
    }
    if !args.contains(&SPARE_ARG.as_bytes()) {
        return false;
    }
    let Ok(stderr) = fs::read_link(format!("/proc/{pid}/fd/2")) else {
        return false;
    };
    let log = layout.log();
    stderr == log || fs::canonicalize(&log).is_ok_and(|l| l == stderr)
}

impl Shim {
    /// Spawns the shim for `spec` as `<program> <leading_args...> --flynn-shim <state_dir> <id>`
    /// and connects to it. The shim detaches (own session, reparented away from the caller) and
    /// outlives the caller.
    pub async fn spawn(
        program: &Path,
        leading_args: &[String],
        state_dir: &Path,
        spec: &ContainerSpec,
    ) -> Result<ShimConn, ContainerError> {
        Self::spawn_using(None, program, leading_args, state_dir, spec).await
    }

    /// Starts a spare shim for jobs under `state_dir`: `<program> <leading_args...>
    /// --flynn-shim-spare <state_dir>`, detached like a job's shim, waiting for
    /// [`Shim::spawn_using`] to give it a job. Returns once it is waiting.
    pub async fn spawn_spare(
        program: &Path,
        leading_args: &[String],
        state_dir: &Path,
    ) -> Result<SpareShim, ContainerError> {
        fs::create_dir_all(state_dir).map_err(|e| ContainerError::io("creating", state_dir, e))?;
        let state_dir = fs::canonicalize(state_dir)
            .map_err(|e| ContainerError::io("resolving", state_dir, e))?;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| ContainerError::io("creating a socket pair for", program, e))?;
        let log_path = state_dir.join(super::SPARE_LOG);
        let log =
            create_private(&log_path).map_err(|e| ContainerError::io("creating", &log_path, e))?;
        // The first process forks the spare and exits at once.
        let status = tokio::process::Command::new(program)
            .args(leading_args)
            .arg(SPARE_ARG)
            .arg(&state_dir)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(log)
            .status()
            .await
            .map_err(|e| ContainerError::io("running", program, e))?;
        let spare_failed = |what: String| {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            ContainerError::ShimStart {
                id: "(spare)".into(),
                log: format!("{what} {}", log.trim()),
            }
        };
        if !status.success() {
            return Err(spare_failed(format!("exited with {status}")));
        }
        ours.set_nonblocking(true)
            .map_err(|e| ContainerError::io("configuring the socket of", program, e))?;
        let mut sock = UnixStream::from_std(ours)
            .map_err(|e| ContainerError::io("registering the socket of", program, e))?;
        let mut pid = [0u8; 4];
        match tokio::time::timeout(Duration::from_secs(10), sock.read_exact(&mut pid)).await {
            Ok(Ok(_)) => {}
            _ => return Err(spare_failed("sent no pid:".into())),
        }
        Ok(SpareShim {
            sock,
            pid: i32::from_le_bytes(pid),
            state_dir,
        })
    }

    /// [`Shim::spawn`], handing the job to `spare` (from [`Shim::spawn_spare`] with the same
    /// `state_dir`) instead of starting a new shim process when there is one. A spare that
    /// died before it took the job is replaced by a new shim, so the job does not fail for it.
    pub async fn spawn_using(
        spare: Option<SpareShim>,
        program: &Path,
        leading_args: &[String],
        state_dir: &Path,
        spec: &ContainerSpec,
    ) -> Result<ShimConn, ContainerError> {
        spec.validate()?;
        fs::create_dir_all(state_dir).map_err(|e| ContainerError::io("creating", state_dir, e))?;
        let state_dir = fs::canonicalize(state_dir)
            .map_err(|e| ContainerError::io("resolving", state_dir, e))?;
        let layout = Layout::new(&state_dir, &spec.id);
        match fs::create_dir(&layout.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ContainerError::Exists {
                    id: spec.id.clone(),
                })
            }
            Err(e) => return Err(ContainerError::io("creating", &layout.dir, e)),
        }
        let spare = spare.filter(|s| s.state_dir == state_dir);
        let result = match spare {
            Some(spare) => match Self::start_spare(spare, &layout, spec).await {
                Err(e) if !layout.shim_pid().exists() => {
                    tracing::debug!(job = %spec.id, error = %e, "spare shim unusable; starting a new one");
                    Self::start_shim(program, leading_args, &state_dir, &layout, spec).await
                }
                r => r,
            },
            None => Self::start_shim(program, leading_args, &state_dir, &layout, spec).await,
        };
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&layout.dir);
            return Err(e);
        }
        let conn = Self::connect(&state_dir, &spec.id).await?;
        let _ = conn.io.set((spec.has_input(), spec.tty));
        Ok(conn)
    }

    /// Writes the spec, names the job to the spare and waits for it to be ready (its control
    /// socket bound), as [`Shim::start_shim`] does for a new process.
    async fn start_spare(
        mut spare: SpareShim,
        layout: &Layout,
        spec: &ContainerSpec,
    ) -> Result<(), ContainerError> {
        use tokio::io::AsyncWriteExt;
        let json = serde_json::to_vec_pretty(spec).expect("specs serialize");
        write_private(&layout.spec(), &json)
            .map_err(|e| ContainerError::io("writing", layout.spec(), e))?;
        create_private(&layout.log())
            .map_err(|e| ContainerError::io("creating", layout.log(), e))?;
        let mut msg = spec.id.clone().into_bytes();
        msg.push(b'\n');
        spare.sock.write_all(&msg).await.map_err(|e| {
            ContainerError::io("handing the job to the spare shim", layout.log(), e)
        })?;
        let mut b = [0u8; 1];
        match spare.sock.read(&mut b).await {
            Ok(1) if b[0] == b'1' => Ok(()),
            _ => {
                let log = fs::read_to_string(layout.log()).unwrap_or_default();
                let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                Err(ContainerError::ShimStart {
                    id: spec.id.clone(),
                    log: if tail.is_empty() {
                        "the spare shim went away".into()
                    } else {
                        tail
                    },
                })
            }
        }
    }

    async fn start_shim(
        program: &Path,
        leading_args: &[String],
        state_dir: &Path,
        layout: &Layout,
        spec: &ContainerSpec,
    ) -> Result<(), ContainerError> {
        let json = serde_json::to_vec_pretty(spec).expect("specs serialize");
        write_private(&layout.spec(), &json)
            .map_err(|e| ContainerError::io("writing", layout.spec(), e))?;
        let log = create_private(&layout.log())
            .map_err(|e| ContainerError::io("creating", layout.log(), e))?;
        // The shim forks; this process exits as soon as the control socket is bound.
        let status = tokio::process::Command::new(program)
            .args(leading_args)
            .arg(SHIM_ARG)
            .arg(state_dir)
            .arg(&spec.id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .status()
            .await
            .map_err(|e| ContainerError::io("running", program, e))?;
        if !status.success() {
            let log = fs::read_to_string(layout.log()).unwrap_or_default();
            let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
            return Err(ContainerError::ShimStart {
                id: spec.id.clone(),
                log: if tail.is_empty() {
                    format!("exited with {status}")
                } else {
                    tail
                },
            });
        }
        Ok(())
    }

    /// Connects to the shim of job `id`: a running one, or the final status of one that exited.
    pub async fn connect(state_dir: &Path, id: &str) -> Result<ShimConn, ContainerError> {
        check_id(id)?;
        let layout = Layout::new(state_dir, id);
        if !layout.dir.is_dir() {
            return Err(ContainerError::NotFound { id: id.into() });
        }
        let addr = layout
            .socket_addr()
            .map_err(|e| ContainerError::io("opening", &layout.dir, e))?;
        let sock = match UnixStream::connect(&addr.path).await {
            Ok(s) => Some(s),
            Err(e) => {
                if read_status(&layout).is_none() {
                    return Err(ContainerError::io("connecting to", layout.socket(), e));
                }
                None
            }
        };
        // First thing on the connection: what this daemon reads (pieces of lines), which the
        // shim waits for before it sends events (see `wire`). Whatever does not go at once
        // goes with the next write.
        let mut wbuf = Vec::new();
        if let Some(s) = &sock {
            wire::encode_features(wire::PARTIAL_OUTPUT, &mut wbuf);
            if let Ok(n) = s.try_write(&wbuf) {
                wbuf.drain(..n);
            }
        }
        Ok(ShimConn {
            id: id.into(),
            layout,
            sock,
            rbuf: Vec::new(),
            wbuf: std::sync::Mutex::new(wbuf),
            next_seq: 0,
            acked: 0,
            ack_limit: None,
            hello: false,
            finished: false,
            io: std::sync::OnceLock::new(),
        })
    }

    /// Job ids with shim state in `state_dir`, sorted.
    pub fn list(state_dir: &Path) -> Vec<String> {
        let Ok(rd) = fs::read_dir(state_dir) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|id| valid_id(id) && Layout::new(state_dir, id).spec().is_file())
            .collect();
        ids.sort();
        ids
    }

    /// Removes job `id`'s state, overlay dirs, mounts and cgroups; kills what still runs (the
    /// job first, giving its shim up to 5 s to tear the container down, then the shim).
    /// Idempotent: a job without state is fine. Blocking (sleeps while waiting): call it from
    /// `spawn_blocking` in async code.
    pub fn cleanup(state_dir: &Path, id: &str) -> Result<(), ContainerError> {
        check_id(id)?;
        let layout = Layout::new(state_dir, id);
        if !layout.dir.exists() {
            return Ok(());
        }
        let spec: Option<ContainerSpec> = fs::read(layout.spec())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let shim = read_pid(&layout.shim_pid()).filter(|&pid| shim_alive(pid, id, &layout));
        if let Some(pid) = shim {
            // Kill the job and let its shim reap it and tear the container down (it owns the
            // mounts and libcontainer state), then stop the shim, which waits for an ack.
            if let Some(spec) = &spec {
                cgroups::kill(spec);
                wait_until(Duration::from_secs(5), || {
                    layout.status().exists() || !shim_alive(pid, id, &layout)
                });
            }
            // SAFETY: kill takes no pointers; the pid was checked to be this job's shim.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            wait_until(Duration::from_secs(2), || !shim_alive(pid, id, &layout));
        }
        if let Some(spec) = &spec {
            if !cgroups::remove(spec, false) {
                return Err(ContainerError::io(
                    "removing cgroups of",
                    &layout.dir,
                    std::io::Error::other("processes did not go away"),
                ));
            }
        }
        let rootfs = layout.rootfs();
        if let Ok(c) = std::ffi::CString::new(rootfs.as_os_str().as_bytes()) {
            // SAFETY: valid NUL-terminated path. Not mounted here (the shim mounts it in its own
            // namespace) is the normal case and harmless.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        if is_mount_point(&rootfs) {
            return Err(ContainerError::io(
                "unmounting",
                rootfs,
                std::io::Error::other("still a mount point"),
            ));
        }
        fs::remove_dir_all(&layout.dir).or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(ContainerError::io("removing", &layout.dir, e))
            }
        })
    }
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() && start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn is_mount_point(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(p), p.parent().map(fs::metadata)) {
        (Ok(a), Some(Ok(b))) => a.dev() != b.dev(),
        _ => false,
    }
}

impl ShimConn {
    /// The job id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Queues `frame` and writes what is queued. Cancel-safe: whole frames are queued under
    /// the lock before any await, and bytes leave the queue only once written, so a cancelled
    /// call leaves nothing half-sent; the next write carries on.
    async fn send(&self, frame: Option<&[u8]>) -> Result<(), ContainerError> {
        let Some(sock) = &self.sock else {
            return Err(ContainerError::Protocol {
                reason: format!("shim of {} is gone", self.id),
            });
        };
        if let Some(f) = frame {
            self.wbuf.lock().unwrap().extend_from_slice(f);
        }
        loop {
            {
                let mut buf = self.wbuf.lock().unwrap();
                if buf.is_empty() {
                    return Ok(());
                }
                match sock.try_write(&buf) {
                    Ok(n) => {
                        buf.drain(..n);
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        return Err(ContainerError::io("writing to", self.layout.socket(), e))
                    }
                }
            }
            sock.writable()
                .await
                .map_err(|e| ContainerError::io("writing to", self.layout.socket(), e))?;
        }
    }

    /// Queues an ack for everything returned so far, up to the limit (no await).
    fn queue_ack(&mut self) {
        let upto = self.next_seq.min(self.ack_limit.unwrap_or(u64::MAX));
        if self.hello && upto > self.acked && self.sock.is_some() {
            let mut b = Vec::new();
            wire::encode_u64(wire::ACK, upto, &mut b);
            self.wbuf.lock().unwrap().extend_from_slice(&b);
            self.acked = upto;
        }
    }

    /// What to pass to [`ShimConn::limit_acks`] once every event returned so far has been
    /// dealt with.
    pub fn ack_point(&self) -> u64 {
        self.next_seq
    }

    /// From now on acknowledge only events below `upto` (an [`ShimConn::ack_point`]), also
    /// when dropped: the caller raises it as it deals with the events, so one still queued
    /// when the daemon dies is sent to the next daemon. Never lowers what was acknowledged.
    pub fn limit_acks(&mut self, upto: u64) {
        self.ack_limit = Some(upto);
    }

    /// Sends the acks the limit now allows.
    pub async fn flush_acks(&mut self) -> Result<(), ContainerError> {
        self.queue_ack();
        if self.sock.is_some() {
            self.send(None).await?;
        }
        Ok(())
    }

    /// The next event; `None` once the shim finished (after `Exited` or `Failed`).
    /// Each call acknowledges the events returned before it. Cancel-safe (usable in
    /// `tokio::select!`): an event is only taken off the connection when it is returned.
    pub async fn next_event(&mut self) -> Result<Option<ShimEvent>, ContainerError> {
        self.queue_ack();
        // A shim that already went away cannot take the ack; that is fine.
        if self.sock.is_some() && self.send(None).await.is_err() {
            self.sock = None;
        }
        if self.finished {
            return Ok(None);
        }
        loop {
            let frame = wire::decode(&mut self.rbuf)
                .map_err(|reason| ContainerError::Protocol { reason })?;
            match frame {
                Some(Frame::Hello { seq, pid }) if !self.hello => {
                    self.hello = true;
                    self.next_seq = seq;
                    self.acked = seq;
                    // `Started` is always the shim's first event; when an earlier connection
                    // acknowledged it, this one learns the pid from the greeting.
                    if seq > 0 && pid > 0 {
                        return Ok(Some(ShimEvent::Started { pid }));
                    }
                    continue;
                }
                Some(Frame::Event(ev)) if self.hello => {
                    self.next_seq += 1;
                    if ev.is_final() {
                        self.finished = true;
                        // Tell the shim right away so it can exit (best effort, no await: the
                        // next call or the drop retries).
                        self.queue_ack();
                        if let Some(sock) = &self.sock {
                            let mut buf = self.wbuf.lock().unwrap();
                            if let Ok(n) = sock.try_write(&buf) {
                                buf.drain(..n);
                            }
                        }
                    }
                    return Ok(Some(ev));
                }
                Some(f) => {
                    return Err(ContainerError::Protocol {
                        reason: format!("unexpected frame {f:?}"),
                    })
                }
                None => {}
            }
            let n = match self.sock.as_mut() {
                // `read_buf` is cancel-safe: bytes land in `rbuf` only when the read completes.
                Some(s) => match s.read_buf(&mut self.rbuf).await {
                    Ok(n) => n,
                    // A shim exiting while this connection was queued or had unread acks: the
                    // same as it closing the connection.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
                    Err(e) => return Err(ContainerError::io("reading", self.layout.socket(), e)),
                },
                None => 0,
            };
            if n == 0 {
                self.sock = None;
                self.finished = true;
                return match read_status(&self.layout) {
                    Some(ev) => Ok(Some(ev)),
                    None => Err(ContainerError::Protocol {
                        reason: format!("shim of {} went away without a final status", self.id),
                    }),
                };
            }
        }
    }

    /// Sends `sig` to the job's init process.
    pub async fn signal(&self, sig: i32) -> Result<(), ContainerError> {
        if !(1..=64).contains(&sig) {
            return Err(ContainerError::invalid(format!("bad signal {sig}")));
        }
        let mut b = Vec::new();
        wire::encode_signal(sig, &mut b);
        self.send(Some(&b)).await
    }

    /// (has a stdin FIFO, runs on a terminal), from the spec in the state dir once.
    fn io(&self) -> (bool, bool) {
        *self.io.get_or_init(|| {
            fs::read(self.layout.spec())
                .ok()
                .and_then(|b| serde_json::from_slice::<ContainerSpec>(&b).ok())
                .map_or((false, false), |s| (s.has_input(), s.tty))
        })
    }

    /// The job's stdin FIFO, for a job started with [`ContainerSpec::stdin`] or
    /// [`ContainerSpec::tty`] (`None` otherwise). The shim makes it before the job starts
    /// (before its `Started` event). Open it to write with a non-blocking open: that fails
    /// (`ENXIO`) once nothing reads it any more.
    pub fn stdin_path(&self) -> Option<std::path::PathBuf> {
        self.io().0.then(|| self.layout.stdin())
    }

    /// Whether the job runs on a terminal ([`ContainerSpec::tty`]).
    pub fn is_tty(&self) -> bool {
        self.io().1
    }

    /// Sets the window size of a TTY job's terminal (`rows`, `cols`; the job gets
    /// `SIGWINCH` when it changes). The shim ignores it for other jobs.
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), ContainerError> {
        let mut b = Vec::new();
        wire::encode_resize(rows, cols, &mut b);
        self.send(Some(&b)).await
    }

    /// Tells the shim to let go of its end of the job's stdin: the job reads end-of-file
    /// once every writer the daemon opened is closed too (a TTY job: the shim writes the
    /// terminal's end-of-file character, ^D, after the input before it).
    pub async fn close_stdin(&self) -> Result<(), ContainerError> {
        let mut b = Vec::new();
        wire::encode_close_stdin(&mut b);
        self.send(Some(&b)).await
    }
}

impl Drop for ShimConn {
    fn drop(&mut self) {
        // Best effort: acknowledge what the caller already has, so a reconnect does not repeat it.
        self.queue_ack();
        if let Some(sock) = &self.sock {
            let buf = self.wbuf.lock().unwrap();
            if !buf.is_empty() {
                let _ = sock.try_write(&buf);
            }
        }
    }
}
