//! Attaching to a job (spec §5.5, protocol in [`flynn_api::attach`]): its output as it is
//! written, input to its stdin, signals to it, a TTY job's window size, and its exit status at
//! the end.
//!
//! The job's supervisor hands every output line to [`Attachments`] besides the log shipper;
//! each attached client has a bounded queue, and a client that falls that far behind is
//! detached with an error frame rather than holding the job's output in memory. Output is
//! line-based, as the shim reads it: each line is sent with its `\n`. A TTY job's output
//! is a raw byte stream instead (its terminal's, as read: a prompt without a newline is sent
//! at once), sent as stdout (stream 1).
//!
//! Stdin (the `stdin` flag, for jobs created with `config.stdin` or `config.tty`): the
//! client's data frames are written to the job's stdin in order, and an empty one closes it
//! for the job (a TTY job reads its terminal's end-of-file, ^D, as under Flynn and Docker).
//! A job that does not read holds the client's input back (its frames are not read beyond a
//! 64 KiB read-ahead) while its output keeps flowing to the client. A client that leaves is
//! seen when its close comes within that read-ahead; one that left more input in flight is
//! seen once the job has read up to its close (its input is still delivered). Any number of
//! clients may write; a client that leaves without closing stdin leaves it open for the next.
//! Each client's output queue is bounded by lines (4,096) and bytes (4 MiB).
//!
//! Window size (TTY jobs): the request's `height` and `width` set it when the client
//! attaches (before the job runs when it attached while the job was starting), and each
//! resize frame sets it again. Half a size (a dimension 0), in the request or a resize frame,
//! is ignored, as both are for other jobs.
//!
//! Not supported (refused with a 400 before the upgrade, so the client gets an error, not a
//! silent gap): `stdin` for a job created without it (or a terminal), and `logs` (the host
//! does not keep output; history is the log aggregator's). `init_log` is accepted and has
//! nothing to send.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use flynn_api::attach::{self, Frame};
use flynn_api::host::{ActiveJob, JobStatus};
use flynn_api::ApiError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::host::Host;
use crate::logship::Stream;
use crate::runtime::{Stdin, StdinMsg};

/// Output lines queued per attached client before it counts as too slow.
const QUEUE: usize = 4096;
/// Output bytes queued per attached client before it counts as too slow (lines are up to
/// 64 KiB: the line count alone would let one client hold 256 MiB).
const QUEUE_BYTES: usize = 4 << 20;
/// Clients attached to one job at once: each may queue up to [`QUEUE_BYTES`], so this
/// bounds what one job's clients hold (256 MiB); more are refused before the upgrade.
pub const MAX_CLIENTS: usize = 64;
/// Client bytes read ahead of stdin input the job has not taken yet: enough to see the
/// client leave (end of file) behind a little more input, bounded so a job that does not
/// read holds the client back.
const READ_AHEAD: usize = 64 * 1024;
/// A client that takes longer than this to take one frame is dropped.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What the supervisor tells an attached client.
#[derive(Debug)]
pub enum Msg {
    Started,
    /// One line with its `\n`.
    Output(Stream, Vec<u8>),
    /// The job ended (as recorded in the table).
    Ended(Box<ActiveJob>),
}

/// One attached client as the sending side sees it: its token, queue and queued bytes.
struct Sub {
    token: u64,
    tx: mpsc::Sender<Msg>,
    bytes: Arc<AtomicUsize>,
    /// The window size the client asked for last (TTY jobs).
    size: Size,
}

/// A client's window size, shared by its connection (which sets it from resize frames) and
/// the job's list of clients (where a starting job takes it): the latest the client asked
/// for. `rows << 16 | cols`; 0 is none.
#[derive(Clone, Default)]
struct Size(Arc<AtomicU32>);

impl Size {
    fn new(size: Option<(u16, u16)>) -> Size {
        let s = Size::default();
        if let Some((rows, cols)) = size {
            s.set(rows, cols);
        }
        s
    }

    fn set(&self, rows: u16, cols: u16) {
        self.0
            .store(u32::from(rows) << 16 | u32::from(cols), Ordering::Relaxed);
    }

    fn get(&self) -> Option<(u16, u16)> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            v => Some(((v >> 16) as u16, v as u16)),
        }
    }
}

type Subscribers = HashMap<String, Vec<Sub>>;

/// The attached clients of every job.
#[derive(Default)]
pub struct Attachments {
    subs: Mutex<Subscribers>,
    /// Clients attached to any job: output skips the lock when there are none.
    count: AtomicUsize,
    next: AtomicU64,
}

impl Attachments {
    fn lock(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        self.subs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches a client to job `id`; `exclusive` refuses a second client (jobs with
    /// `disable_log`, whose output goes nowhere else); `size`: the window size it asked for
    /// (a TTY job's).
    pub fn subscribe(
        self: &Arc<Self>,
        id: &str,
        exclusive: bool,
        size: Option<(u16, u16)>,
    ) -> Result<Subscription, ApiError> {
        let mut subs = self.lock();
        let list = subs.entry(id.to_string()).or_default();
        if exclusive && !list.is_empty() {
            return Err(ApiError::conflict("host: job is attached"));
        }
        if list.len() >= MAX_CLIENTS {
            return Err(ApiError::new(
                flynn_api::ErrorCode::Ratelimited,
                format!(
                    "host: {MAX_CLIENTS} clients are attached to the job already; try again later"
                ),
            )
            .with_retry(true));
        }
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        // One slot more than the output may take, so the end always fits.
        let (tx, rx) = mpsc::channel(QUEUE + 1);
        let bytes = Arc::new(AtomicUsize::new(0));
        let size = Size::new(size);
        list.push(Sub {
            token,
            tx,
            bytes: bytes.clone(),
            size: size.clone(),
        });
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(Subscription {
            attachments: self.clone(),
            id: id.to_string(),
            token,
            rx,
            bytes,
            size,
        })
    }

    /// The window size the latest client attached to job `id` with a size asked for: the
    /// size a TTY job starts with.
    pub fn size(&self, id: &str) -> Option<(u16, u16)> {
        self.lock()
            .get(id)
            .and_then(|l| l.iter().rev().find_map(|s| s.size.get()))
    }

    fn unsubscribe(&self, id: &str, token: u64) {
        self.retain(&mut self.lock(), id, |s| s.token != token);
    }

    /// Queues `msg` (of `len` output bytes) to every client of job `id`.
    fn send(&self, id: &str, len: usize, msg: impl Fn() -> Msg) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        // A client whose queue holds `QUEUE` messages or `QUEUE_BYTES` bytes is detached
        // (its task sees the channel closed); the last slot is kept for `Ended`.
        self.retain(&mut self.lock(), id, |s| {
            let room = s.tx.capacity() > 1
                && s.bytes.load(Ordering::Relaxed) + len <= QUEUE_BYTES
                && s.tx.try_send(msg()).is_ok();
            if room {
                s.bytes.fetch_add(len, Ordering::Relaxed);
            }
            room
        });
    }

    /// Keeps the clients of job `id` for which `keep` holds, keeping `count` in step and
    /// forgetting the job once it has none.
    fn retain(&self, subs: &mut Subscribers, id: &str, keep: impl FnMut(&Sub) -> bool) {
        let Some(list) = subs.get_mut(id) else {
            return;
        };
        let before = list.len();
        list.retain(keep);
        self.count.fetch_sub(before - list.len(), Ordering::Relaxed);
        if list.is_empty() {
            subs.remove(id);
        }
    }

    pub fn started(&self, id: &str) {
        self.send(id, 0, || Msg::Started);
    }

    pub fn output(&self, id: &str, stream: Stream, line: &[u8]) {
        self.send(id, line.len() + 1, || {
            let mut l = Vec::with_capacity(line.len() + 1);
            l.extend_from_slice(line);
            l.push(b'\n');
            Msg::Output(stream, l)
        });
    }

    /// Output of a TTY job's terminal, as read: sent as stdout, as it is (no line structure).
    pub fn terminal(&self, id: &str, data: &[u8]) {
        self.send(id, data.len(), || {
            Msg::Output(Stream::Stdout, data.to_vec())
        });
    }

    /// Called once the job's end is in the table (`job` is what it says); detaches
    /// every client of the job.
    pub fn ended(&self, job: &ActiveJob) {
        let list = self.lock().remove(&job.job.id).unwrap_or_default();
        self.count.fetch_sub(list.len(), Ordering::Relaxed);
        for s in list {
            let _ = s.tx.try_send(Msg::Ended(Box::new(job.clone())));
        }
    }
}

/// One attached client; detaches when dropped.
pub struct Subscription {
    attachments: Arc<Attachments>,
    id: String,
    token: u64,
    rx: mpsc::Receiver<Msg>,
    /// Output bytes queued in `rx`.
    bytes: Arc<AtomicUsize>,
    /// The window size asked for (only for a TTY job).
    size: Size,
}

impl Subscription {
    /// Accounts for a message taken off the queue.
    fn took(&self, m: &Option<Msg>) {
        if let Some(Msg::Output(_, line)) = m {
            self.bytes.fetch_sub(line.len(), Ordering::Relaxed);
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.attachments.unsubscribe(&self.id, self.token);
    }
}

/// Checks `flags` for what this host can do for a job (`has_stdin`: created with one).
pub fn check_flags(flags: u32, has_stdin: bool) -> Result<(), ApiError> {
    if flags & !attach::ALL_FLAGS != 0 {
        return Err(ApiError::validation(
            Some("flags"),
            &format!("has unknown bits {:#x}", flags & !attach::ALL_FLAGS),
        ));
    }
    if flags & attach::STDIN != 0 && !has_stdin {
        return Err(ApiError::validation(
            Some("flags"),
            "stdin: the job was not created with stdin",
        ));
    }
    if flags & attach::LOGS != 0 {
        return Err(ApiError::validation(
            Some("flags"),
            "logs: this host does not keep job output; read it from the log aggregator",
        ));
    }
    if flags & attach::STREAM == 0 {
        return Err(ApiError::validation(
            Some("flags"),
            "must include stream (16): without logs there is nothing else to send",
        ));
    }
    Ok(())
}

/// The window size of an attach request: `None` unless both dimensions are given (0 = not
/// given). Half a size is no size, as a resize frame with a 0 in it is: spec §5.5 does not ask
/// for both, and Flynn sized a terminal only with both.
pub fn window_size(height: u16, width: u16) -> Option<(u16, u16)> {
    (height > 0 && width > 0).then_some((height, width))
}

/// The exit status sent at the end: the exit code, or 128 + the signal that ended it.
fn exit_status(j: &ActiveJob) -> u32 {
    match (j.exit_status, j.signal) {
        (Some(code), _) => code as u32,
        (None, Some(sig)) => 128 + sig as u32,
        (None, None) => 0,
    }
}

/// Serves one attached client over `io` until the job ends, the client leaves, or it falls
/// behind.
pub async fn serve<IO>(host: Arc<Host>, mut sub: Subscription, flags: u32, io: IO)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (mut rd, wr) = tokio::io::split(io);
    let mut w = Writer {
        wr,
        buf: Vec::new(),
    };
    let wants = |s: Stream| match s {
        Stream::Stdout => flags & attach::STDOUT != 0,
        Stream::Stderr => flags & attach::STDERR != 0,
    };
    // Subscribed before this read: whatever happens after it arrives as a message. A job
    // that ended before it has all its output (and maybe its `Ended`) queued already: the
    // end is published under the lock this read takes.
    let Some(job) = host.get(&sub.id) else {
        let _ = w.send(&Frame::Error("host: unknown job".into())).await;
        return;
    };
    // A job that already ended gets its opening with its end (below): `Success`, or only
    // an error for one that could not start.
    let mut announced = false;
    let first = match job.status {
        JobStatus::Starting => Some(Frame::Waiting),
        s if s.is_terminal() => None,
        _ => {
            announced = true;
            Some(Frame::Success)
        }
    };
    if let Some(f) = first {
        if w.send(&f).await.is_err() {
            return;
        }
    }
    let running = job.status == JobStatus::Running;
    let tty = job.job.config.tty;
    let mut end = job.status.is_terminal().then(|| Box::new(job));
    let mut input = Input {
        wants: flags & attach::STDIN != 0,
        stdin: None,
        pending: None,
        tty,
        size: sub.size.clone(),
    };
    // A job's stdin is there once its process is (input before that waits for it); so is
    // its terminal, which gets the client's size then.
    if running {
        input.started(&host, &sub.id, true);
    }
    let mut inbuf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let msg = if end.is_some() {
            // Ended before the read above: take what is queued, without waiting.
            match sub.rx.try_recv() {
                Ok(m) => Some(m),
                Err(_) => break,
            }
        } else {
            tokio::select! {
                msg = sub.rx.recv() => {
                    sub.took(&msg);
                    msg
                }
                permit = input.reserve(), if input.pending.is_some() => {
                    // A closed stdin discards the input.
                    if let (Some(p), Some(m)) = (permit, input.pending.take()) {
                        p.send(m);
                    }
                    if !client_frames(&host, &sub.id, &mut inbuf, &mut input) {
                        return;
                    }
                    continue;
                }
                // While input waits for the job, the client's next frames wait too (up to
                // a read-ahead, which still shows a client that left).
                n = rd.read(&mut chunk), if input.pending.is_none() || inbuf.len() < READ_AHEAD => {
                    // EOF or an error: the client left. (The protocol closes stdin with
                    // an empty data frame, not a half-close, and a client that went
                    // away must not hold a `disable_log` job's one attachment until the
                    // job next writes.)
                    let Ok(n @ 1..) = n else { return };
                    inbuf.extend_from_slice(&chunk[..n]);
                    if input.pending.is_none() && !client_frames(&host, &sub.id, &mut inbuf, &mut input) {
                        return;
                    }
                    continue;
                }
            }
        };
        let frame = match msg {
            Some(Msg::Ended(job)) => {
                end.get_or_insert(job);
                continue;
            }
            None => {
                let e = "host: attach client too slow, output dropped".to_string();
                let _ = w.send(&Frame::Error(e)).await;
                return;
            }
            Some(Msg::Started) => {
                input.started(&host, &sub.id, false);
                None
            }
            Some(Msg::Output(stream, line)) => wants(stream).then(|| Frame::Data {
                stream: stream_id(stream),
                data: line,
            }),
        };
        if !announced {
            announced = true;
            if w.send(&Frame::Success).await.is_err() {
                return;
            }
        }
        if let Some(f) = frame {
            if w.send(&f).await.is_err() {
                return;
            }
        }
    }
    let Some(job) = end else { return };
    if let Some(e) = failure_of(&job) {
        let _ = w.send(&Frame::Error(e)).await;
        return;
    }
    if !announced && w.send(&Frame::Success).await.is_err() {
        return;
    }
    for s in [Stream::Stdout, Stream::Stderr] {
        if wants(s) {
            let eof = Frame::Data {
                stream: stream_id(s),
                data: Vec::new(),
            };
            if w.send(&eof).await.is_err() {
                return;
            }
        }
    }
    let _ = w.send(&Frame::Exit(exit_status(&job))).await;
    let _ = w.wr.shutdown().await;
}

fn failure(job: &ActiveJob) -> String {
    job.error.clone().unwrap_or_else(|| "job failed".into())
}

/// What an attached client is told instead of an exit status: why the job failed to start,
/// or why it crashed with no exit status known (its runtime lost it while it ran, e.g. its
/// shim); `None` when it exited, or was stopped (even before it started, or lost while
/// being stopped: exit 0, as for any stopped job).
fn failure_of(job: &ActiveJob) -> Option<String> {
    let lost =
        job.status == JobStatus::Crashed && job.exit_status.is_none() && job.signal.is_none();
    (job.status == JobStatus::Failed || lost).then(|| failure(job))
}

/// A client's way to the job's stdin.
struct Input {
    /// The client asked for stdin (allowed only for jobs created with it).
    wants: bool,
    /// The job's stdin, once its process runs (`None` before: input waits for it, or for
    /// the job's end, which discards it).
    stdin: Option<Stdin>,
    /// Input read from the client and not yet queued to the job.
    pending: Option<StdinMsg>,
    /// The job runs on a terminal.
    tty: bool,
    /// The window size the client asked for last (TTY jobs; shared with its entry in the
    /// job's list of clients, so a job starting later starts with it).
    size: Size,
}

impl Input {
    /// The job's process runs: its stdin is there. A client attaching to a running TTY job
    /// (`resize`) gives its terminal its size; when the job starts, the supervisor gives it
    /// the latest client's size once (each client applying its own then, in no fixed
    /// order, could leave an older client's size and a `SIGWINCH`).
    fn started(&mut self, host: &Host, id: &str, resize: bool) {
        if self.wants {
            self.stdin = host.stdin(id);
        }
        if let (true, true, Some((rows, cols))) = (resize, self.tty, self.size.get()) {
            host.resize(id, rows, cols);
        }
    }

    /// Room for the pending input in the job's queue (`None`: stdin was closed); never
    /// ready while the job has no stdin yet. The sender is cloned only while input is
    /// pending.
    fn reserve(&self) -> impl std::future::Future<Output = Option<mpsc::OwnedPermit<StdinMsg>>> {
        let tx = match (&self.pending, &self.stdin) {
            (Some(_), Some(s)) => Some(s.clone()),
            _ => None,
        };
        async move {
            match tx {
                Some(tx) => tx.reserve_owned().await.ok(),
                None => std::future::pending().await,
            }
        }
    }
}

/// Acts on the complete frames at the front of `inbuf` (the client's), up to the first
/// stdin data, which it leaves in `input.pending`; false when the client sent something it
/// may not (stdin data without the stdin flag; a server's frame; garbage), which closes the
/// connection.
fn client_frames(host: &Host, id: &str, inbuf: &mut Vec<u8>, input: &mut Input) -> bool {
    while input.pending.is_none() {
        // Data (stdin) without the flag is refused from its first byte, not buffered up to
        // a payload.
        if !input.wants && inbuf.first() == Some(&attach::DATA) {
            return false;
        }
        match Frame::decode(inbuf) {
            Ok(None) => return true,
            Ok(Some((frame, used))) => {
                inbuf.drain(..used);
                match frame {
                    Frame::Data {
                        stream: attach::STREAM_STDIN,
                        data,
                    } => {
                        input.pending = Some(if data.is_empty() {
                            StdinMsg::Close
                        } else {
                            StdinMsg::Data(data)
                        });
                    }
                    Frame::Signal(sig) => {
                        if let Err(e) = host.signal(id, sig as i32) {
                            tracing::debug!(job = %id, sig, error = %e.message, "attach: signal not sent");
                        }
                    }
                    // Ignored for a job without a terminal, and when a dimension is 0.
                    Frame::Resize { height, width } => {
                        if input.tty && height > 0 && width > 0 {
                            input.size.set(height, width);
                            host.resize(id, height, width);
                        }
                    }
                    _ => return false,
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// The client's side of the connection, with a bound on how long one frame may take.
struct Writer<W> {
    wr: W,
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    async fn send(&mut self, f: &Frame) -> std::io::Result<()> {
        self.buf.clear();
        f.encode(&mut self.buf);
        let write = async {
            self.wr.write_all(&self.buf).await?;
            self.wr.flush().await
        };
        tokio::time::timeout(WRITE_TIMEOUT, write)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    }
}

fn stream_id(s: Stream) -> u8 {
    match s {
        Stream::Stdout => attach::STREAM_STDOUT,
        Stream::Stderr => attach::STREAM_STDERR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_that_ended_without_an_exit_status_is_an_error_not_exit_0() {
        let end = |status, exit_status, signal, error: Option<&str>| ActiveJob {
            status,
            exit_status,
            signal,
            error: error.map(str::to_string),
            ..ActiveJob::default()
        };
        let lost = Some("lost the job's shim");
        for (job, want) in [
            (
                end(JobStatus::Failed, None, None, Some("no image")),
                Some("no image"),
            ),
            (end(JobStatus::Failed, None, None, None), Some("job failed")),
            (end(JobStatus::Crashed, None, None, lost), lost),
            (end(JobStatus::Done, None, None, lost), None),
            (
                end(
                    JobStatus::Done,
                    None,
                    None,
                    Some("stopped before it started"),
                ),
                None,
            ),
            (end(JobStatus::Done, Some(0), None, None), None),
            (end(JobStatus::Crashed, Some(3), None, None), None),
            (end(JobStatus::Crashed, None, Some(9), None), None),
        ] {
            assert_eq!(failure_of(&job).as_deref(), want, "{job:?}");
        }
    }

    #[test]
    fn flags_this_host_cannot_serve_are_refused_by_name() {
        use attach::*;
        assert!(check_flags(STDOUT | STDERR | STREAM, false).is_ok());
        assert!(check_flags(STDOUT | STREAM | INIT_LOG, false).is_ok());
        // `has_stdin`: created with `stdin`, or a TTY job (whose input is its terminal).
        assert!(check_flags(STDOUT | STDIN | STREAM, true).is_ok());
        for (flags, says) in [
            (STDOUT | STDIN | STREAM, "stdin"),
            (STDOUT | LOGS | STREAM, "logs"),
            (STDOUT, "must include stream"),
            (STDOUT | STREAM | 64, "unknown bits 0x40"),
        ] {
            let e = check_flags(flags, false).unwrap_err();
            assert_eq!(e.status(), 400, "{flags}");
            assert!(e.message.contains(says), "{flags}: {}", e.message);
        }
    }

    #[test]
    fn a_window_size_is_both_dimensions_or_none() {
        assert_eq!(window_size(0, 0), None);
        assert_eq!(window_size(20, 10), Some((20, 10)));
        assert_eq!(window_size(0, 10), None);
        assert_eq!(window_size(20, 0), None);
    }

    /// A TTY job's output goes to clients as it came (no newline added), and the job starts
    /// with the size of the latest client that asked for one (when attaching or since).
    #[tokio::test]
    async fn terminal_output_is_raw_and_the_size_is_the_latest_clients() {
        let a = Arc::new(Attachments::default());
        assert_eq!(a.size("j"), None);
        let _first = a.subscribe("j", false, Some((20, 10))).unwrap();
        let mut plain = a.subscribe("j", false, None).unwrap();
        assert_eq!(a.size("j"), Some((20, 10)));
        let last = a.subscribe("j", false, Some((30, 40))).unwrap();
        assert_eq!(a.size("j"), Some((30, 40)));
        drop(last);
        assert_eq!(a.size("j"), Some((20, 10)));
        // A client's resize frames change the size it stands for (the connection's copy
        // is the list's): a job starting now takes the size asked for last.
        let conn_side = plain.size.clone();
        conn_side.set(25, 50);
        assert_eq!(a.size("j"), Some((25, 50)));
        a.terminal("j", b"ready> ");
        a.output("j", Stream::Stdout, b"line");
        match plain.rx.recv().await {
            Some(Msg::Output(Stream::Stdout, d)) => assert_eq!(d, b"ready> "),
            m => panic!("{m:?}"),
        }
        match plain.rx.recv().await {
            Some(Msg::Output(Stream::Stdout, d)) => assert_eq!(d, b"line\n"),
            m => panic!("{m:?}"),
        }
    }

    /// The number of clients per job is bounded (each may queue 4 MiB): one over the bound
    /// is refused with a 429 before the upgrade, the attached ones carry on, and a place
    /// that frees up can be taken.
    #[tokio::test]
    async fn clients_per_job_are_bounded() {
        let a = Arc::new(Attachments::default());
        let mut subs: Vec<Subscription> = (0..MAX_CLIENTS)
            .map(|_| a.subscribe("j", false, None).unwrap())
            .collect();
        let e = a.subscribe("j", false, None).err().expect("one too many");
        assert_eq!(e.status(), 429, "{e:?}");
        assert!(e.message.contains("clients are attached"), "{}", e.message);
        assert!(e.retry);
        // Other jobs are not affected.
        let _other = a.subscribe("k", false, None).unwrap();
        a.output("j", Stream::Stdout, b"still here");
        for s in &mut subs {
            match s.rx.recv().await {
                Some(Msg::Output(Stream::Stdout, d)) => assert_eq!(d, b"still here\n"),
                m => panic!("{m:?}"),
            }
        }
        subs.pop();
        subs.push(a.subscribe("j", false, None).unwrap());
    }

    #[tokio::test]
    async fn queued_bytes_are_bounded_as_well_as_lines() {
        let a = Arc::new(Attachments::default());
        let mut sub = a.subscribe("j", false, None).unwrap();
        let line = vec![b'x'; 64 * 1024 - 1];
        let fit = QUEUE_BYTES / (64 * 1024);
        for _ in 0..fit {
            a.output("j", Stream::Stdout, &line);
        }
        assert_eq!(a.count.load(Ordering::Relaxed), 1, "{fit} lines fit");
        // Taking one off the queue makes room for one more.
        let m = sub.rx.recv().await;
        sub.took(&m);
        a.output("j", Stream::Stdout, &line);
        assert_eq!(a.count.load(Ordering::Relaxed), 1);
        a.output("j", Stream::Stdout, &line);
        assert_eq!(a.count.load(Ordering::Relaxed), 0, "over the byte bound");
    }

    #[tokio::test]
    async fn a_client_that_falls_behind_is_detached_and_others_are_not() {
        let a = Arc::new(Attachments::default());
        let mut slow = a.subscribe("j", false, None).unwrap();
        let mut fast = a.subscribe("j", false, None).unwrap();
        assert!(
            a.subscribe("j", true, None).is_err(),
            "exclusive refuses a second"
        );
        for i in 0..QUEUE {
            a.output("j", Stream::Stdout, format!("{i}").as_bytes());
            // The fast client keeps up.
            assert!(matches!(fast.rx.recv().await, Some(Msg::Output(..))));
        }
        assert_eq!(a.count.load(Ordering::Relaxed), 2);
        a.output("j", Stream::Stdout, b"one too many");
        assert_eq!(a.count.load(Ordering::Relaxed), 1, "the slow one is gone");
        let mut n = 0;
        while let Some(m) = slow.rx.recv().await {
            assert!(matches!(m, Msg::Output(..)));
            n += 1;
        }
        assert_eq!(
            n, QUEUE,
            "it keeps what was queued, then sees the channel closed"
        );
        assert!(matches!(fast.rx.recv().await, Some(Msg::Output(..))));
        // The end always fits: a client with a full queue (one line short of being
        // detached) still gets it.
        let mut full = a.subscribe("j", false, None).unwrap();
        for i in 0..QUEUE {
            a.output("j", Stream::Stderr, format!("{i}").as_bytes());
            assert!(matches!(fast.rx.recv().await, Some(Msg::Output(..))));
        }
        assert_eq!(a.count.load(Ordering::Relaxed), 2, "full, not detached");
        let mut job = ActiveJob::default();
        job.job.id = "j".into();
        a.ended(&job);
        assert!(matches!(fast.rx.recv().await, Some(Msg::Ended(_))));
        for _ in 0..QUEUE {
            assert!(matches!(full.rx.recv().await, Some(Msg::Output(_, l)) if l.ends_with(b"\n")));
        }
        assert!(matches!(full.rx.recv().await, Some(Msg::Ended(_))));
        drop(full);
        assert_eq!(a.count.load(Ordering::Relaxed), 0);
        drop(fast);
        drop(slow);
        assert_eq!(a.count.load(Ordering::Relaxed), 0);
        assert!(a.lock().is_empty());
    }
}
