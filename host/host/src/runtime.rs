//! How jobs are run: the [`Runtime`] trait and the plain-process runtime.
//!
//! The daemon's job lifecycle only sees [`Launch`] specs going in and [`ProcEvent`]s
//! coming out. `container` (the default, in `container.rs`) runs each job in its own
//! container through a flynn-container shim; `process` runs the job's args as a plain
//! child process on the host, without isolation, image or network: for development on
//! machines where containers cannot run, and for tests of the lifecycle itself.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::logship::Stream;

/// Resource limits of a job (`None` = unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    /// The job's `cpu` limit in milli-CPUs: a weight (`cpu.shares` = millis × 1.024), not a cap.
    pub cpu_millis: Option<u64>,
    pub pids: Option<u64>,
    pub max_fds: Option<u64>,
}

impl Limits {
    /// The limits a job asks for (`temp_disk` is not enforced, see `Resources`).
    pub fn of(r: &flynn_api::host::Resources) -> Limits {
        let lim = |s: Option<flynn_api::host::Spec>| {
            s.and_then(|s| s.limit).and_then(|l| u64::try_from(l).ok())
        };
        Limits {
            memory_bytes: lim(r.memory),
            cpu_millis: lim(r.cpu),
            pids: lim(r.max_procs),
            max_fds: lim(r.max_fd),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub readonly: bool,
}

impl BindMount {
    /// The bind mounts a job's `config.mounts` asks for (`location` on the host at `target`
    /// in the job).
    pub fn of(config: &flynn_api::host::ContainerConfig) -> Vec<BindMount> {
        config
            .mounts
            .iter()
            .map(|m| BindMount {
                source: m.location.clone().into(),
                target: m.target.clone().into(),
                readonly: !m.writeable,
            })
            .collect()
    }
}

/// Everything needed to start one job.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    pub id: String,
    /// Image layers, bottom first.
    pub layers: Vec<PathBuf>,
    pub args: Vec<String>,
    /// `K=V`.
    pub env: Vec<String>,
    pub cwd: String,
    pub hostname: Option<String>,
    /// The job's network namespace; `None` = the host's.
    pub netns: Option<PathBuf>,
    pub mounts: Vec<BindMount>,
    pub limits: Limits,
    /// User and group to run as (root by default).
    pub uid: u32,
    pub gid: u32,
    /// Capabilities instead of the runtime's default set.
    pub capabilities: Option<Vec<String>>,
    /// The job gets a stdin to write to ([`Handle::stdin`]) instead of `/dev/null`.
    pub stdin: bool,
    /// The job runs on a terminal (its stdin, stdout and stderr): its output comes as
    /// [`ProcEvent::Terminal`], its input goes to [`Handle::stdin`] (a TTY job always has
    /// one) and [`Handle::resize`] sets the window size. Only for runtimes that
    /// [`Runtime::supports_tty`].
    pub tty: bool,
    /// The terminal's window size (rows, columns) at the start, if known then.
    pub tty_size: Option<(u16, u16)>,
    /// The job's output may wait for a client (`disable_log`: its only client holds it up),
    /// for as long as the client likes, even after the job's exit.
    pub output_waits: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcEvent {
    Started {
        pid: u32,
    },
    /// Output bytes of the job as it wrote them, without the newline that ends them
    /// (`newline`: it wrote one). Bytes of one line each: all of it, or a piece whose rest
    /// follows in the stream's next events (`!newline`: a line longer than 64 KiB, or bytes
    /// the job wrote without a newline yet, sent as they are read, so a prompt is not held
    /// back).
    Output {
        stream: Stream,
        line: Vec<u8>,
        newline: bool,
    },
    /// Bytes a TTY job wrote to its terminal, raw (no line structure).
    Terminal {
        data: Vec<u8>,
    },
    /// Lines lost before they reached the daemon.
    Dropped {
        count: u64,
    },
    Exited {
        code: i32,
        signal: Option<i32>,
        oom_killed: bool,
    },
    Failed {
        reason: String,
    },
}

/// Sends a signal to the job's process.
pub type Signaller = Arc<dyn Fn(i32) -> std::io::Result<()> + Send + Sync>;

/// Sets the window size (rows, columns) of a TTY job's terminal.
pub type Resizer = Arc<dyn Fn(u16, u16) + Send + Sync>;

/// A started (or re-adopted) job: its events, ending after `Exited` or `Failed`, a
/// way to signal it, its stdin if it has one and a way to resize its terminal if it is a TTY
/// job. The receiver marks each event in `handled` once it has dealt with it (output handed
/// to the host's log), in order.
pub struct Handle {
    pub events: mpsc::Receiver<ProcEvent>,
    pub signal: Signaller,
    pub stdin: Option<Stdin>,
    pub resize: Option<Resizer>,
    pub handled: Handled,
}

/// How many of a job's events the daemon has dealt with (output handed to the host's log:
/// the disk log's writer thread and the ship queues). A runtime that acknowledges events to
/// a process outside the daemon (the container shim, which keeps unacknowledged events for
/// the next daemon) acknowledges only these: an event still queued when the daemon dies is
/// sent again, not lost. At least once: one handled just before the daemon died, its
/// acknowledgement not yet out, comes again. What the disk log's writer had not written when
/// the daemon died is not covered (see `logdisk`).
#[derive(Clone, Default)]
pub struct Handled(Arc<HandledInner>);

#[derive(Default)]
struct HandledInner {
    count: std::sync::atomic::AtomicU64,
    changed: tokio::sync::Notify,
}

impl Handled {
    /// One more event dealt with.
    pub fn mark(&self) {
        self.0
            .count
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        self.0.changed.notify_one();
    }

    pub fn count(&self) -> u64 {
        self.0.count.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves after a [`Handled::mark`] (one since the last wait counts too).
    pub async fn changed(&self) {
        self.0.changed.notified().await
    }
}

/// What is sent to a job's stdin.
#[derive(Debug, PartialEq, Eq)]
pub enum StdinMsg {
    Data(Vec<u8>),
    /// End of input: the job reads end-of-file after what was sent before.
    Close,
}

/// A job's stdin: messages are written in the order they are sent, and a job that does not
/// read holds its senders back (the queue is short), so input is never dropped for being
/// fast. Dropping every sender closes stdin as [`StdinMsg::Close`] does. Data sent after the
/// close, or once the job stopped reading for good, is discarded.
pub type Stdin = mpsc::Sender<StdinMsg>;

/// Messages (each up to an attach frame, 1 MiB) queued per job beyond what its pipe holds.
const STDIN_QUEUE: usize = 4;

/// Starts the task that owns a job's stdin. `open` gives the writer, on the first data (a
/// FIFO opens only while the job holds its read end); `closed` runs once stdin is closed.
pub fn stdin_writer<W, O, C>(open: O, closed: C) -> Stdin
where
    W: AsyncWrite + Unpin + Send + 'static,
    O: FnOnce() -> std::io::Result<W> + Send + 'static,
    C: FnOnce() + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel(STDIN_QUEUE);
    tokio::spawn(async move {
        let mut open = Some(open);
        let mut w: Option<W> = None;
        while let Some(msg) = rx.recv().await {
            let StdinMsg::Data(data) = msg else { break };
            if w.is_none() {
                match open.take().map(|o| o()) {
                    Some(Ok(opened)) => w = Some(opened),
                    Some(Err(e)) => tracing::debug!(error = %e, "job stdin: cannot open"),
                    // It could not be opened or broke: the job reads no more.
                    None => {}
                }
            }
            if let Some(writer) = w.as_mut() {
                if let Err(e) = writer.write_all(&data).await {
                    tracing::debug!(error = %e, "job stdin: write failed");
                    w = None;
                }
            }
        }
        drop(w);
        closed();
    });
    tx
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}")]
    Start(String),
    #[error("image: {0}")]
    Image(String),
    /// A layer import given up because the job was asked to stop.
    #[error("image: layer import cancelled")]
    Cancelled,
}

pub trait Runtime: Send + Sync + 'static {
    /// Whether jobs must name image layers (`mountspecs`).
    fn needs_image(&self) -> bool;
    /// Whether jobs get their own network namespace.
    fn isolates_network(&self) -> bool;
    /// Whether jobs may run on a terminal ([`Launch::tty`]).
    fn supports_tty(&self) -> bool {
        false
    }
    /// Imports a layer tarball (verifying its sha256) or finds it already imported;
    /// returns its unpacked path. Blocking. Gives up with [`RuntimeError::Cancelled`] once
    /// `cancelled` returns true (the job was asked to stop).
    fn layer(
        &self,
        url_path: Option<&std::path::Path>,
        sha256: &str,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<PathBuf, RuntimeError>;
    /// Starts a job. Must be called within a tokio runtime; may block briefly.
    fn spawn(&self, launch: Launch) -> Result<Handle, RuntimeError>;
    /// Jobs still running from a previous daemon, re-attached.
    fn adopt(&self) -> Vec<(String, Handle)>;
    /// Turns on and prepares what makes the next start faster (a spare shim). Needs a
    /// tokio runtime.
    fn warm(&self) {}
    /// A job's start begins (before its image and network): for work that should run in
    /// parallel with them. Needs a tokio runtime.
    fn starting(&self) {}
    /// Replaces what the last start used up (if [`Runtime::warm`] turned it on). Called
    /// once a start is over, so the refill does not compete with it for the CPU.
    fn prepare(&self) {}
    /// Removes what is left of a finished job (state, rootfs, cgroup).
    fn cleanup(&self, id: &str);
    /// What job `id`'s running container was started with, read from the runtime's own
    /// state (for a job whose record cannot be read, whose resources still count); `None`
    /// when the runtime keeps nothing of the kind.
    fn describe(&self, _id: &str) -> Option<Described> {
        None
    }
}

/// What a container was started with, as far as the host's accounting goes
/// ([`Runtime::describe`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Described {
    /// `K=V` (`FLYNN_APP_ID`, `PORT`, `PORT_n`, ...).
    pub env: Vec<String>,
    /// The host paths bind-mounted into it (volumes among them).
    pub mount_sources: Vec<PathBuf>,
    /// It runs in the host's network namespace: its ports are host ports.
    pub host_network: bool,
}

impl Described {
    /// The ports it was given (`PORT`, `PORT_n`; the protocol is not kept).
    pub fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| {
                *k == "PORT"
                    || k.strip_prefix("PORT_")
                        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
            .filter_map(|(_, v)| v.parse().ok())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// The value of environment variable `key`.
    pub fn env(&self, key: &str) -> Option<&str> {
        self.env.iter().find_map(|kv| {
            kv.split_once('=')
                .filter(|(k, v)| *k == key && !v.is_empty())
                .map(|(_, v)| v)
        })
    }
}

/// Runs jobs as plain host processes (no isolation), for development. A clean daemon exit
/// kills each job's leader process (`kill_on_drop`; the rest of its process group is left);
/// jobs are not re-adopted after a restart. No terminals (TTY jobs are refused): the
/// terminal's master would live in the daemon and die with it.
#[derive(Debug, Default)]
pub struct ProcessRuntime;

impl Runtime for ProcessRuntime {
    fn needs_image(&self) -> bool {
        false
    }

    fn isolates_network(&self) -> bool {
        false
    }

    fn layer(
        &self,
        _url_path: Option<&std::path::Path>,
        _sha256: &str,
        _cancelled: &dyn Fn() -> bool,
    ) -> Result<PathBuf, RuntimeError> {
        Err(RuntimeError::Image(
            "the process runtime does not run images".into(),
        ))
    }

    fn spawn(&self, launch: Launch) -> Result<Handle, RuntimeError> {
        let mut cmd = tokio::process::Command::new(&launch.args[0]);
        cmd.args(&launch.args[1..])
            .env_clear()
            .envs(launch.env.iter().filter_map(|kv| kv.split_once('=')))
            .stdin(if launch.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        if !launch.cwd.is_empty() {
            cmd.current_dir(&launch.cwd);
        }
        // No signal ignored or blocked in the job (the daemon ignores SIGPIPE; posix_spawn
        // would hand it glibc's two internal signals ignored).
        flynn_container::signals::default_on_exec(cmd.as_std_mut());
        // No isolation here: the user is switched; capabilities are the container
        // runtime's to confine.
        if launch.uid != 0 || launch.gid != 0 {
            cmd.uid(launch.uid).gid(launch.gid);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| RuntimeError::Start(format!("exec {:?}: {e}", launch.args[0])))?;
        let pid = child.id().unwrap_or(0);
        // Taken before `wait`, which would close it.
        let stdin = child
            .stdin
            .take()
            .map(|s| stdin_writer(move || Ok(s), || {}));
        // Up to 64 events of up to 64 KiB (4 MiB, as the container shim's buffer) wait for
        // the daemon; beyond that the readers wait, and the job blocks on its writes.
        let (tx, rx) = mpsc::channel(64);
        let output_waits = launch.output_waits;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        tokio::spawn(async move {
            let _ = tx.send(ProcEvent::Started { pid }).await;
            let out = stdout.map(|s| {
                let sent = Arc::default();
                Reader {
                    task: tokio::spawn(read_output(
                        s,
                        Stream::Stdout,
                        tx.clone(),
                        Arc::clone(&sent),
                    )),
                    sent,
                }
            });
            let err = stderr.map(|s| {
                let sent = Arc::default();
                Reader {
                    task: tokio::spawn(read_output(
                        s,
                        Stream::Stderr,
                        tx.clone(),
                        Arc::clone(&sent),
                    )),
                    sent,
                }
            });
            let status = child.wait().await;
            // Children of the job that still hold its pipes must not keep it alive (nor
            // one still writing, `sh -c 'yes & exit'`): see `Drain::run`. Both readers at
            // once: one does not wait for the other's drain to begin.
            let drain = Drain {
                until: tokio::time::Instant::now() + DRAIN,
                output_waits,
            };
            tokio::join!(
                async {
                    if let Some(r) = out {
                        drain.run(r, &tx).await;
                    }
                },
                async {
                    if let Some(r) = err {
                        drain.run(r, &tx).await;
                    }
                },
            );
            let ev = match status {
                Ok(st) => {
                    use std::os::unix::process::ExitStatusExt;
                    let signal = st.signal();
                    ProcEvent::Exited {
                        code: st.code().unwrap_or_else(|| 128 + signal.unwrap_or(0)),
                        signal,
                        oom_killed: false,
                    }
                }
                Err(e) => ProcEvent::Failed {
                    reason: format!("wait: {e}"),
                },
            };
            let _ = tx.send(ev).await;
        });
        // The job is its own process group: signals reach everything it started.
        let signal: Signaller = Arc::new(move |sig| send_signal_group(pid, sig));
        Ok(Handle {
            events: rx,
            signal,
            stdin,
            resize: None,
            handled: Handled::default(),
        })
    }

    fn adopt(&self) -> Vec<(String, Handle)> {
        Vec::new()
    }

    fn cleanup(&self, _id: &str) {}
}

/// How long the output readers may go on after the job's exit while the daemon's queue has
/// room (as the container shim's `DRAIN`).
const DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// How long past [`DRAIN`] readers may go on at most, for a job whose output does not wait
/// for a client, while the daemon's queue stays full (it is behind): the daemon takes its
/// output as fast as it can, so a queue full for longer is a child of the job flooding it.
const DRAIN_BEHIND: std::time::Duration = std::time::Duration::from_secs(10);

/// How often readers still going after [`DRAIN`] are looked at.
const DRAIN_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// A reader of a job whose output waits for its client is let go after [`DRAIN`] once it
/// sent nothing for this long while the daemon's queue had room.
const DRAIN_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// A reader of any other job is let go after [`DRAIN`] once the daemon's queue had room at
/// this many checks in a row ([`DRAIN_CHECK`] apart): the queue has room for a moment each
/// time the daemon takes an event, until a reader still sending fills it again.
const DRAIN_ROOM_CHECKS: u32 = 5;

/// An output reader's task, and how many events it sent.
struct Reader {
    task: tokio::task::JoinHandle<()>,
    sent: Arc<std::sync::atomic::AtomicU64>,
}

/// How long output readers may go on after the job's exit.
struct Drain {
    /// Until then, whatever they do.
    until: tokio::time::Instant,
    /// The job's output may wait for its client ([`Launch::output_waits`]).
    output_waits: bool,
}

impl Drain {
    /// Waits for an output reader to finish, until [`DRAIN`] after the job's exit; then
    /// aborts it once it is no longer held up by the daemon's queue (`tx`'s): a job whose
    /// output waits for its client (the one client of a `disable_log` job, pausing or
    /// resuming as the job ends) keeps a reader for as long as it sends, or waits for room
    /// in the queue, and lets it go once it sent nothing for [`DRAIN_IDLE`] while the queue
    /// had room; any other job lets it go once the queue had room at [`DRAIN_ROOM_CHECKS`]
    /// checks in a row, and [`DRAIN_BEHIND`] after [`DRAIN`] at the latest. A room seen at
    /// a single check is not enough: each time the daemon takes an event the queue has a
    /// free slot until the reader fills it again, and a reader aborted then loses the rest
    /// of the output. Readers left are a process the job left behind holding the pipe
    /// open, or writing on into it, and would keep the job's end from being seen for as long
    /// as it runs (for ever, for one that left its process group and a stop does not reach).
    async fn run(&self, reader: Reader, tx: &mpsc::Sender<ProcEvent>) {
        use std::sync::atomic::Ordering;
        let Reader { mut task, sent } = reader;
        let behind_until = self.until + DRAIN_BEHIND;
        let mut at = self.until;
        // When the reader last sent an event, or found the queue full (`output_waits`).
        let mut busy_at = self.until.max(tokio::time::Instant::now());
        let mut seen = sent.load(Ordering::Relaxed);
        // Checks in a row that found room in the queue (other jobs).
        let mut room = 0;
        loop {
            tokio::select! {
                _ = &mut task => return,
                _ = tokio::time::sleep_until(at) => {}
            }
            let now = tokio::time::Instant::now();
            let full = tx.capacity() == 0;
            let let_go = if self.output_waits {
                let n = sent.load(Ordering::Relaxed);
                if full || n != seen {
                    seen = n;
                    busy_at = now;
                }
                now.duration_since(busy_at) >= DRAIN_IDLE
            } else {
                room = if full { 0 } else { room + 1 };
                room >= DRAIN_ROOM_CHECKS || now >= behind_until
            };
            if let_go {
                task.abort();
                return;
            }
            at = now + DRAIN_CHECK;
        }
    }
}

/// `kill(pid, sig)`.
pub fn send_signal(pid: u32, sig: i32) -> std::io::Result<()> {
    let sig = nix::sys::signal::Signal::try_from(sig)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let pid = i32::try_from(pid).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).map_err(std::io::Error::from)
}

/// `kill(-pgid, sig)`.
pub fn send_signal_group(pgid: u32, sig: i32) -> std::io::Result<()> {
    let sig = nix::sys::signal::Signal::try_from(sig)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let pgid = i32::try_from(pgid).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), sig).map_err(std::io::Error::from)
}

/// Reads a pipe into [`ProcEvent::Output`]s as the container shim does: each read is cut
/// at its newlines, and the bytes after the last one go at once as a piece without a newline
/// (pieces of at most 64 KiB). Counts the events sent in `sent`.
async fn read_output<R: AsyncRead + Unpin>(
    mut r: R,
    stream: Stream,
    tx: mpsc::Sender<ProcEvent>,
    sent: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut buf = vec![0u8; flynn_container::MAX_LINE];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut events = Vec::new();
        flynn_container::split_output(&buf[..n], false, |piece, newline| {
            events.push(ProcEvent::Output {
                stream,
                line: piece.to_vec(),
                newline,
            })
        });
        for ev in events {
            if tx.send(ev).await.is_err() {
                return;
            }
            sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests;
