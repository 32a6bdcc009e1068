//! Attaching to a job (spec §5.5, protocol in [`flynn_api::attach`]): its output as it is
//! written, input to its stdin, signals to it, a TTY job's window size, and its exit status at
//! the end.
//!
//! The job's supervisor hands all output to [`Attachments`] besides the log shipper. Clients
//! get the job's bytes unchanged, as the runtime reads them: a line with its `\n` only when
//! the job wrote one, and bytes without a newline (a prompt) as soon as they are read. A TTY
//! job's output is its terminal's raw byte stream, sent as stdout (stream 1).
//!
//! Each attached client has a bounded queue. A client that falls that far behind is
//! detached with an error frame rather than holding the job's output in memory, except the
//! one client of a `disable_log` job (its output goes nowhere else): the job's output waits
//! for room in that client's queue instead, so the runtime stops reading it and the job
//! blocks on its writes, as under Flynn; such a client has no time limit on a frame either
//! (the API connections' TCP keepalive and `TCP_USER_TIMEOUT`, see `api_keepalive`, drop
//! one that went away, or that read nothing for two minutes). Once the job is asked to stop
//! ([`Attachments::unblock`]) its output waits for no client: the job's end must not wait
//! for a client that stopped reading (which is then detached as any other once its queue is
//! full, and its frames get the time limit again).
//!
//! A client may attach before its job is created (Flynn's controller attaches, then adds the
//! job): it gets [`Frame::Waiting`] at once and the job's output from its start. What it
//! asked for is checked when the job is created (an error frame then, for stdin the job has
//! not, or a second client of a `disable_log` job); a job not created within
//! [`PENDING_WAIT`] gets it an error frame. At most [`MAX_PENDING`] clients wait at once,
//! at most [`MAX_PENDING_PER_SOURCE`] of them from one address (one client's retry loop
//! cannot take every place). Its frames are read while it waits (so its leaving is seen),
//! up to 64 KiB: one that sends more before its job exists gets an error frame (Flynn's
//! controller sends nothing before the job runs).
//!
//! Stdin (the `stdin` flag, for jobs created with `config.stdin` or `config.tty`): the
//! client's data frames are written to the job's stdin in order, and an empty one closes it
//! for the job (a TTY job reads its terminal's end-of-file, ^D, as under Flynn and Docker).
//! A job that does not read holds the client's input back (its frames are not read beyond a
//! 64 KiB read-ahead) while its output keeps flowing to the client. A client that leaves is
//! seen when its close comes within that read-ahead; one that left more input in flight is
//! seen once the job has read up to its close (its input is still delivered). Any number of
//! clients may write; a client that leaves without closing stdin leaves it open for the next.
//! Each client's output queue is bounded by pieces of output (4,096) and bytes (4 MiB).
//!
//! Window size (TTY jobs): the request's `height` and `width` set it when the client
//! attaches (before the job runs when it attached while the job was starting), and each
//! resize frame sets it again. Half a size (a dimension 0), in the request or a resize frame,
//! is ignored, as both are for other jobs.
//!
//! Not supported (refused with a 400 before the upgrade, or an error frame once a job the
//! client waited for is created, so the client gets an error, not a silent gap): `stdin` for
//! a job created without it (or a terminal), and `logs` (the host
//! does not keep output; history is the log aggregator's). `init_log` is accepted and has
//! nothing to send.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flynn_api::attach::{self, Frame};
use flynn_api::host::{ActiveJob, JobStatus};
use flynn_api::ApiError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

use crate::host::Host;
use crate::logship::Stream;
use crate::runtime::{Stdin, StdinMsg};

/// Pieces of output queued per attached client before it counts as too slow.
const QUEUE: usize = 4096;
/// Output bytes queued per attached client before it counts as too slow (pieces are up to
/// 64 KiB: the count alone would let one client hold 256 MiB).
const QUEUE_BYTES: usize = 4 << 20;
/// Clients attached to one job at once: each may queue up to [`QUEUE_BYTES`], so this
/// bounds what one job's clients hold (256 MiB); more are refused before the upgrade.
pub const MAX_CLIENTS: usize = 64;
/// Client bytes read ahead of stdin input the job has not taken yet: enough to see the
/// client leave (end of file) behind a little more input, bounded so a job that does not
/// read holds the client back.
const READ_AHEAD: usize = 64 * 1024;
/// A client that takes longer than this to take one frame is dropped (not the only client
/// of a `disable_log` job, see the module doc). [`Limits`] may set another (tests).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client attached to a job not created yet waits for it. [`Limits`] may set
/// another (tests).
pub const PENDING_WAIT: Duration = Duration::from_secs(30);
/// Clients waiting for their jobs to be created, over all jobs; more are refused before the
/// upgrade. Each holds little until its job runs, when [`MAX_CLIENTS`] bounds it.
pub const MAX_PENDING: usize = 256;
/// Clients from one address waiting for their jobs to be created: a share of
/// [`MAX_PENDING`], so one caller's retry loop leaves room for the others (the controller's
/// attach before it creates a job).
pub const MAX_PENDING_PER_SOURCE: usize = 64;

/// The time limits of attach connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long a client waits for its job to be created ([`PENDING_WAIT`]).
    pub wait: Duration,
    /// How long one frame may take to write ([`WRITE_TIMEOUT`]).
    pub write: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            wait: PENDING_WAIT,
            write: WRITE_TIMEOUT,
        }
    }
}

/// What the supervisor tells an attached client.
#[derive(Debug)]
pub enum Msg {
    /// The job a client waited for was created; the client is attached to it.
    Created,
    /// The job a client waited for was created, but the client may not attach to it (why).
    Refused(String),
    Started,
    /// Output bytes, as the job wrote them.
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
    /// The flags it asked for.
    flags: u32,
    /// It waits for its job to be created (its flags are checked then).
    pending: bool,
    /// It is the only client of a job whose output goes nowhere else (`disable_log`), not
    /// being stopped: its job's output waits for room in its queue rather than detaching
    /// it. Shared with its connection (which then has no time limit on a frame).
    blocking: Blocking,
    /// Where it connected from (a waiting client's, counted per address).
    source: Option<IpAddr>,
    /// Woken when the client takes a message off its queue, or leaves.
    room: Arc<Notify>,
}

/// Whether a client holds its job's output up (see [`Sub::blocking`]); its connection can
/// wait for that to end.
#[derive(Clone)]
struct Blocking(Arc<tokio::sync::watch::Sender<bool>>);

impl Blocking {
    fn new(on: bool) -> Blocking {
        Blocking(Arc::new(tokio::sync::watch::Sender::new(on)))
    }

    fn get(&self) -> bool {
        *self.0.borrow()
    }

    fn set(&self, on: bool) {
        self.0.send_replace(on);
    }

    /// Resolves once it no longer blocks.
    async fn ended(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|on| !*on).await;
    }
}

impl Sub {
    /// Whether `len` more output bytes fit in its queue (the last slot kept for `Ended`).
    fn has_room(&self, len: usize) -> bool {
        self.tx.capacity() > 1 && self.bytes.load(Ordering::Relaxed) + len <= QUEUE_BYTES
    }

    /// Queues `msg` (of `len` output bytes) if it fits.
    fn offer(&self, len: usize, msg: &impl Fn() -> Msg) -> bool {
        let sent = self.has_room(len) && self.tx.try_send(msg()).is_ok();
        if sent {
            self.bytes.fetch_add(len, Ordering::Relaxed);
        }
        sent
    }
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

/// The clients of every job, under [`Attachments`]' lock.
#[derive(Default)]
struct Subscribers {
    jobs: HashMap<String, Vec<Sub>>,
    /// Clients waiting for their jobs to be created, per address they came from.
    waiting_from: HashMap<Option<IpAddr>, usize>,
    /// Jobs asked to stop ([`Attachments::unblock`]): their output waits for no client.
    stopping: HashSet<String>,
}

/// The attached clients of every job.
#[derive(Default)]
pub struct Attachments {
    subs: Mutex<Subscribers>,
    /// Clients attached to any job: output skips the lock when there are none.
    count: AtomicUsize,
    /// Clients waiting for their job to be created (changed under the lock).
    pending: AtomicUsize,
    next: AtomicU64,
    limits: Limits,
}

impl Attachments {
    pub fn new(limits: Limits) -> Attachments {
        Attachments {
            limits,
            ..Attachments::default()
        }
    }

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
        self.add(id, exclusive, size, None, None)
    }

    /// Attaches a client to job `id`, not created yet, with `flags` (checked when it is:
    /// [`Attachments::created`]); `source`: the address it connected from.
    pub fn subscribe_pending(
        self: &Arc<Self>,
        id: &str,
        flags: u32,
        size: Option<(u16, u16)>,
        source: Option<IpAddr>,
    ) -> Result<Subscription, ApiError> {
        self.add(id, false, size, Some(flags), source)
    }

    /// `pending`: the flags of a client waiting for its job.
    fn add(
        self: &Arc<Self>,
        id: &str,
        exclusive: bool,
        size: Option<(u16, u16)>,
        pending: Option<u32>,
        source: Option<IpAddr>,
    ) -> Result<Subscription, ApiError> {
        let mut subs = self.lock();
        let subs = &mut *subs;
        if pending.is_some() {
            let busy = |what: String| {
                Err(ApiError::new(flynn_api::ErrorCode::Ratelimited, what).with_retry(true))
            };
            if self.pending.load(Ordering::Relaxed) >= MAX_PENDING {
                return busy(format!(
                    "host: {MAX_PENDING} clients wait for jobs to be created already; try again later"
                ));
            }
            if subs.waiting_from.get(&source).copied().unwrap_or(0) >= MAX_PENDING_PER_SOURCE {
                return busy(format!(
                    "host: {MAX_PENDING_PER_SOURCE} clients from this address wait for jobs to be created already; try again later"
                ));
            }
        }
        // Not for a job being stopped: it must end whatever its client does.
        let exclusive_blocks = exclusive && !subs.stopping.contains(id);
        let list = subs.jobs.entry(id.to_string()).or_default();
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
        let blocking = Blocking::new(exclusive_blocks);
        let room = Arc::new(Notify::new());
        list.push(Sub {
            token,
            tx,
            bytes: bytes.clone(),
            size: size.clone(),
            flags: pending.unwrap_or(0),
            pending: pending.is_some(),
            blocking: blocking.clone(),
            source,
            room: room.clone(),
        });
        self.count.fetch_add(1, Ordering::Relaxed);
        if pending.is_some() {
            self.pending.fetch_add(1, Ordering::Relaxed);
            *subs.waiting_from.entry(source).or_default() += 1;
        }
        Ok(Subscription {
            attachments: self.clone(),
            id: id.to_string(),
            token,
            rx,
            bytes,
            size,
            pending: pending.is_some(),
            blocking,
            room,
        })
    }

    /// Job `job` was just created (shown by the API; called under the host's table lock, as
    /// the check of a new client for a job that exists, so no client falls between the
    /// two): the clients waiting for it are attached to it, or refused (an error frame) what
    /// it cannot give them: stdin it was created without, a second client of a
    /// `disable_log` job.
    pub fn created(&self, job: &ActiveJob) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let config = &job.job.config;
        let exclusive = config.disable_log;
        let mut subs = self.lock();
        let blocks = exclusive && !subs.stopping.contains(&job.job.id);
        let mut taken = subs
            .jobs
            .get(&job.job.id)
            .is_some_and(|l| l.iter().any(|s| !s.pending));
        self.retain(&mut subs, &job.job.id, |s| {
            if !s.pending {
                return true;
            }
            let refusal = match check_flags(s.flags, config.stdin || config.tty) {
                Err(e) => Some(e.message),
                Ok(()) if exclusive && taken => Some("host: job is attached".to_string()),
                Ok(()) => None,
            };
            if let Some(why) = refusal {
                let _ = s.tx.try_send(Msg::Refused(why));
                return false;
            }
            taken = true;
            s.pending = false;
            s.blocking.set(blocks);
            let _ = s.tx.try_send(Msg::Created);
            true
        });
    }

    /// A client that waited too long for its job: detached, unless the job was created
    /// meanwhile (false: it is attached to it, and its `Created` is queued).
    fn expire(&self, id: &str, token: u64) -> bool {
        let mut gone = false;
        self.retain(&mut self.lock(), id, |s| {
            let expired = s.token == token && s.pending;
            gone |= expired;
            !expired
        });
        gone
    }

    /// The window size the latest client attached to job `id` with a size asked for: the
    /// size a TTY job starts with.
    pub fn size(&self, id: &str) -> Option<(u16, u16)> {
        self.lock()
            .jobs
            .get(id)
            .and_then(|l| l.iter().rev().find_map(|s| s.size.get()))
    }

    fn unsubscribe(&self, id: &str, token: u64) {
        self.retain(&mut self.lock(), id, |s| s.token != token);
    }

    /// Queues `msg` (of `len` output bytes) to every client of job `id`. A client whose
    /// queue holds `QUEUE` messages or `QUEUE_BYTES` bytes is detached (its task sees the
    /// channel closed; the last slot is kept for `Ended`), except a blocking one (the only
    /// client of a `disable_log` job): this waits until its queue has room, or it left.
    async fn send(&self, id: &str, len: usize, msg: impl Fn() -> Msg) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut wait = None;
        self.retain(&mut self.lock(), id, |s| {
            if s.pending || s.offer(len, &msg) {
                return true;
            }
            let blocking = s.blocking.get();
            if blocking {
                wait = Some((s.token, s.room.clone()));
            }
            blocking
        });
        let Some((token, room)) = wait else { return };
        // The client takes a message off its queue (or leaves, or the job is asked to stop),
        // then `room` wakes this (a wake-up since the check above counts: `notify_one` keeps
        // it). No longer blocking and still full: detached, as any other client.
        loop {
            room.notified().await;
            let mut waiting = false;
            self.retain(&mut self.lock(), id, |s| {
                if s.token != token || s.offer(len, &msg) {
                    return true;
                }
                waiting = s.blocking.get();
                waiting
            });
            if !waiting {
                return;
            }
        }
    }

    /// Job `id` is asked to stop: its output waits for no client from now on (a client that
    /// stopped reading must not hold up the job's end), and output waiting for one goes on.
    /// Only for a job whose end is still to come ([`Attachments::ended`] forgets the mark):
    /// see `Host::unblock_attach`.
    pub fn unblock(&self, id: &str) {
        let mut subs = self.lock();
        subs.stopping.insert(id.to_string());
        for s in subs.jobs.get(id).into_iter().flatten() {
            if s.blocking.get() {
                s.blocking.set(false);
                s.room.notify_one();
            }
        }
    }

    /// How many jobs are marked as being stopped.
    #[cfg(test)]
    pub(crate) fn stopping(&self) -> usize {
        self.lock().stopping.len()
    }

    /// Keeps the clients of job `id` for which `keep` holds, keeping `count` and `pending`
    /// in step and forgetting the job once it has none.
    fn retain(&self, subs: &mut Subscribers, id: &str, mut keep: impl FnMut(&mut Sub) -> bool) {
        let Some(list) = subs.jobs.get_mut(id) else {
            return;
        };
        let before = list.len();
        let mut no_longer_pending = Vec::new();
        list.retain_mut(|s| {
            let was = s.pending;
            let kept = keep(s);
            if was && !(kept && s.pending) {
                no_longer_pending.push(s.source);
            }
            kept
        });
        self.count.fetch_sub(before - list.len(), Ordering::Relaxed);
        if list.is_empty() {
            subs.jobs.remove(id);
        }
        self.no_longer_waiting(subs, no_longer_pending);
    }

    /// Clients from these addresses no longer wait for their jobs.
    fn no_longer_waiting(
        &self,
        subs: &mut Subscribers,
        sources: impl IntoIterator<Item = Option<IpAddr>>,
    ) {
        for source in sources {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            if let std::collections::hash_map::Entry::Occupied(mut e) =
                subs.waiting_from.entry(source)
            {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }

    pub async fn started(&self, id: &str) {
        self.send(id, 0, || Msg::Started).await;
    }

    /// Output bytes of a pipe (`ProcEvent::Output`): sent as they are, with a `\n` after them
    /// only when the job wrote one (`newline`).
    pub async fn output(&self, id: &str, stream: Stream, line: &[u8], newline: bool) {
        let len = line.len() + usize::from(newline);
        if len == 0 {
            return;
        }
        self.send(id, len, || {
            let mut l = Vec::with_capacity(len);
            l.extend_from_slice(line);
            if newline {
                l.push(b'\n');
            }
            Msg::Output(stream, l)
        })
        .await;
    }

    /// Output of a TTY job's terminal, as read: sent as stdout, as it is (no line structure).
    pub async fn terminal(&self, id: &str, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.send(id, data.len(), || {
            Msg::Output(Stream::Stdout, data.to_vec())
        })
        .await;
    }

    /// Called once the job's end is in the table (`job` is what it says); detaches
    /// every client of the job.
    pub fn ended(&self, job: &ActiveJob) {
        let list = {
            let mut subs = self.lock();
            subs.stopping.remove(&job.job.id);
            let list = subs.jobs.remove(&job.job.id).unwrap_or_default();
            let waiting: Vec<_> = list
                .iter()
                .filter(|s| s.pending)
                .map(|s| s.source)
                .collect();
            self.no_longer_waiting(&mut subs, waiting);
            list
        };
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
    /// It was made for a job not created yet.
    pending: bool,
    /// See [`Sub::blocking`].
    blocking: Blocking,
    /// See [`Sub::room`].
    room: Arc<Notify>,
}

impl Subscription {
    /// Accounts for a message taken off the queue.
    fn took(&self, m: &Option<Msg>) {
        if let Some(Msg::Output(_, line)) = m {
            self.bytes.fetch_sub(line.len(), Ordering::Relaxed);
        }
        if m.is_some() {
            self.room.notify_one();
        }
    }

    /// Whether the job's output waits for this client (see [`Sub::blocking`]).
    fn blocking(&self) -> bool {
        self.blocking.get()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.attachments.unsubscribe(&self.id, self.token);
        // Output waiting for room in this client's queue goes on without it.
        self.room.notify_one();
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
/// behind. `sock` is the connection's socket, when it is a TCP one: given a longer user
/// timeout if the client holds its job's output up (see [`crate::holds_job_up`]).
pub async fn serve<IO>(
    host: Arc<Host>,
    mut sub: Subscription,
    flags: u32,
    io: IO,
    sock: Option<socket2::Socket>,
) where
    IO: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (mut rd, wr) = tokio::io::split(io);
    let limits = sub.attachments.limits;
    let mut w = Writer {
        wr,
        buf: Vec::new(),
        timeout: limits.write,
        blocking: None,
    };
    let wants = |s: Stream| match s {
        Stream::Stdout => flags & attach::STDOUT != 0,
        Stream::Stderr => flags & attach::STDERR != 0,
    };
    let mut inbuf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    // A message taken off the queue while waiting for the job, to act on first.
    let mut early: Option<Msg> = None;
    if sub.pending {
        // The job is not created yet: `Waiting`, then its creation (`Created`) or a refusal.
        // The client's frames are read ahead meanwhile (acted on once it is attached), so
        // a client that leaves is seen.
        if w.send(&Frame::Waiting).await.is_err() {
            return;
        }
        let deadline = tokio::time::Instant::now() + limits.wait;
        let mut expired = false;
        loop {
            tokio::select! {
                msg = sub.rx.recv() => {
                    sub.took(&msg);
                    match msg {
                        Some(Msg::Created) => break,
                        Some(Msg::Refused(why)) => {
                            let _ = w.send(&Frame::Error(why)).await;
                            return;
                        }
                        // Ended before it was shown as created (stopped while its record
                        // was written): what follows shows its end.
                        Some(m) => {
                            early = Some(m);
                            break;
                        }
                        None => {
                            let _ = w.send(&Frame::Error("host: unknown job".into())).await;
                            return;
                        }
                    }
                }
                // Read on (bounded), so a client that leaves is seen.
                n = rd.read(&mut chunk) => {
                    let Ok(n @ 1..) = n else { return };
                    inbuf.extend_from_slice(&chunk[..n]);
                    if inbuf.len() > READ_AHEAD {
                        let e = format!(
                            "host: more than {} KiB sent before the job was created",
                            READ_AHEAD / 1024
                        );
                        if w.send(&Frame::Error(e)).await.is_ok() {
                            // Closed after what the client is still sending (a second of
                            // it, discarded): closing with its bytes unread would reset the
                            // connection, and the client might lose the error.
                            let _ = w.wr.shutdown().await;
                            let drain = async { while let Ok(1..) = rd.read(&mut chunk).await {} };
                            let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
                        }
                        return;
                    }
                }
                _ = tokio::time::sleep_until(deadline), if !expired => {
                    // Unless it was created just now (its `Created` is queued).
                    if sub.attachments.expire(&sub.id, sub.token) {
                        let e = format!(
                            "host: unknown job: not created within {} s",
                            limits.wait.as_secs_f32()
                        );
                        let _ = w.send(&Frame::Error(e)).await;
                        return;
                    }
                    expired = true;
                }
            }
        }
    }
    // The only client of a `disable_log` job holds the job up rather than being dropped:
    // no time limit on a frame while it does (the connection's TCP keepalive and user
    // timeout drop a client that went away), the usual one once the job is being stopped.
    // Nor the kernel's two-minute limit on a closed receive window (a client paging its
    // output, or stopped with Ctrl-Z, is live): see `crate::BLOCKING_USER_TIMEOUT`.
    if sub.blocking() {
        w.blocking = Some(sub.blocking.clone());
        if let Some(s) = &sock {
            crate::holds_job_up(s);
        }
    }
    drop(sock);
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
        // (Said already to a client that waited for the job to be created.)
        JobStatus::Starting if !sub.pending => Some(Frame::Waiting),
        JobStatus::Starting => None,
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
    // Frames read while the client waited for the job.
    if !client_frames(&host, &sub.id, &mut inbuf, &mut input) {
        return;
    }
    loop {
        let msg = if let Some(m) = early.take() {
            Some(m)
        } else if end.is_some() {
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
            // Only ever the first message of a client waiting for its job (above).
            Some(Msg::Created | Msg::Refused(_)) => continue,
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

/// The client's side of the connection, with a bound on how long one frame may take (none
/// while the job's output waits for the client: from the end of that on).
struct Writer<W> {
    wr: W,
    buf: Vec<u8>,
    timeout: Duration,
    /// Set for a client the job's output waits for.
    blocking: Option<Blocking>,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    async fn send(&mut self, f: &Frame) -> std::io::Result<()> {
        let Writer {
            wr,
            buf,
            timeout,
            blocking,
        } = self;
        buf.clear();
        f.encode(buf);
        let write = async {
            wr.write_all(buf).await?;
            wr.flush().await
        };
        let timed_out = || Err(std::io::ErrorKind::TimedOut.into());
        match blocking {
            Some(b) if b.get() => {
                tokio::select! {
                    r = write => r,
                    _ = async {
                        b.ended().await;
                        tokio::time::sleep(*timeout).await;
                    } => timed_out(),
                }
            }
            _ => tokio::time::timeout(*timeout, write)
                .await
                .unwrap_or_else(|_| timed_out()),
        }
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
        a.terminal("j", b"ready> ").await;
        a.output("j", Stream::Stdout, b"line", true).await;
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
        a.output("j", Stream::Stdout, b"still here", true).await;
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
            a.output("j", Stream::Stdout, &line, true).await;
        }
        assert_eq!(a.count.load(Ordering::Relaxed), 1, "{fit} lines fit");
        // Taking one off the queue makes room for one more.
        let m = sub.rx.recv().await;
        sub.took(&m);
        a.output("j", Stream::Stdout, &line, true).await;
        assert_eq!(a.count.load(Ordering::Relaxed), 1);
        a.output("j", Stream::Stdout, &line, true).await;
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
            a.output("j", Stream::Stdout, format!("{i}").as_bytes(), true)
                .await;
            // The fast client keeps up.
            assert!(matches!(fast.rx.recv().await, Some(Msg::Output(..))));
        }
        assert_eq!(a.count.load(Ordering::Relaxed), 2);
        a.output("j", Stream::Stdout, b"one too many", true).await;
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
            a.output("j", Stream::Stderr, format!("{i}").as_bytes(), true)
                .await;
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
        assert!(a.lock().jobs.is_empty());
    }

    /// Pipe output goes to clients as the job wrote it: a `\n` only where the job wrote
    /// one, and bytes without one as they are (finding: `printf abc` arrived as `abc\n`).
    #[tokio::test]
    async fn output_gets_a_newline_only_where_the_job_wrote_one() {
        let a = Arc::new(Attachments::default());
        let mut sub = a.subscribe("j", false, None).unwrap();
        a.output("j", Stream::Stdout, b"Password: ", false).await;
        a.output("j", Stream::Stderr, b"line", true).await;
        a.output("j", Stream::Stdout, b"", true).await;
        // Nothing at all is not sent (an empty data frame would be the stream's EOF).
        a.output("j", Stream::Stdout, b"", false).await;
        a.terminal("j", b"").await;
        a.output("j", Stream::Stdout, b"abc", false).await;
        let mut got = Vec::new();
        for _ in 0..4 {
            match sub.rx.recv().await {
                Some(Msg::Output(s, d)) => got.push((s, d)),
                m => panic!("{m:?}"),
            }
        }
        assert_eq!(
            got,
            vec![
                (Stream::Stdout, b"Password: ".to_vec()),
                (Stream::Stderr, b"line\n".to_vec()),
                (Stream::Stdout, b"\n".to_vec()),
                (Stream::Stdout, b"abc".to_vec()),
            ]
        );
        assert!(sub.rx.try_recv().is_err());
    }

    fn created(a: &Attachments, id: &str, stdin: bool, disable_log: bool) {
        let mut job = ActiveJob::default();
        job.job.id = id.into();
        job.job.config.stdin = stdin;
        job.job.config.disable_log = disable_log;
        a.created(&job);
    }

    /// Clients attached before their job exists are attached when it is created, and get
    /// its output from the start; what the job cannot give them is refused then.
    #[tokio::test]
    async fn clients_waiting_for_a_job_are_attached_or_refused_when_it_is_created() {
        use attach::{STDIN, STDOUT, STREAM};
        let a = Arc::new(Attachments::default());
        let mut plain = a
            .subscribe_pending("j", STDOUT | STREAM, None, None)
            .unwrap();
        let mut stdin = a
            .subscribe_pending("j", STDOUT | STDIN | STREAM, None, None)
            .unwrap();
        assert!(plain.pending && stdin.pending);
        assert_eq!(a.pending.load(Ordering::Relaxed), 2);
        // Nothing for the job reaches them before it is created.
        created(&a, "j", false, false);
        assert!(matches!(plain.rx.recv().await, Some(Msg::Created)));
        match stdin.rx.recv().await {
            Some(Msg::Refused(why)) => assert!(why.contains("stdin"), "{why}"),
            m => panic!("{m:?}"),
        }
        assert!(stdin.rx.recv().await.is_none(), "detached");
        assert_eq!(a.pending.load(Ordering::Relaxed), 0);
        assert_eq!(a.count.load(Ordering::Relaxed), 1);
        a.started("j").await;
        a.output("j", Stream::Stdout, b"hi", true).await;
        assert!(matches!(plain.rx.recv().await, Some(Msg::Started)));
        assert!(matches!(plain.rx.recv().await, Some(Msg::Output(_, d)) if d == b"hi\n"));
        assert!(!plain.blocking());

        // A `disable_log` job: the first client waiting is its one client (whose output
        // waits for it), a second is refused.
        let mut first = a
            .subscribe_pending("q", STDOUT | STREAM, None, None)
            .unwrap();
        let mut second = a
            .subscribe_pending("q", STDOUT | STREAM, None, None)
            .unwrap();
        created(&a, "q", false, true);
        assert!(matches!(first.rx.recv().await, Some(Msg::Created)));
        assert!(first.blocking());
        match second.rx.recv().await {
            Some(Msg::Refused(why)) => assert_eq!(why, "host: job is attached"),
            m => panic!("{m:?}"),
        }
        // It stays the job's one client.
        assert!(a.subscribe("q", true, None).is_err());

        // One whose job is never created expires (once: a later expiry finds nothing).
        let late = a
            .subscribe_pending("never", STDOUT | STREAM, None, None)
            .unwrap();
        assert_eq!(a.pending.load(Ordering::Relaxed), 1);
        assert!(a.expire("never", late.token));
        assert!(!a.expire("never", late.token));
        assert_eq!(a.pending.load(Ordering::Relaxed), 0);
        // One whose job was created just before its expiry stays.
        let just = a
            .subscribe_pending("just", STDOUT | STREAM, None, None)
            .unwrap();
        created(&a, "just", false, false);
        assert!(!a.expire("just", just.token));
        // One that leaves while it waits frees its place.
        let left = a
            .subscribe_pending("left", STDOUT | STREAM, None, None)
            .unwrap();
        assert_eq!(a.pending.load(Ordering::Relaxed), 1);
        drop(left);
        assert_eq!(a.pending.load(Ordering::Relaxed), 0);
        // So does one whose job ended before it was shown as created.
        let mut ends = a
            .subscribe_pending("ends", STDOUT | STREAM, None, None)
            .unwrap();
        let mut job = ActiveJob::default();
        job.job.id = "ends".into();
        a.ended(&job);
        assert!(matches!(ends.rx.recv().await, Some(Msg::Ended(_))));
        assert_eq!(a.pending.load(Ordering::Relaxed), 0);
    }

    /// The clients waiting for jobs not created yet are bounded over all jobs.
    #[test]
    fn waiting_clients_are_bounded() {
        let flags = attach::STDOUT | attach::STREAM;
        let a = Arc::new(Attachments::default());
        // From as many addresses as it takes (each has a share of the places).
        let from = |i: usize| Some(IpAddr::from([10, 0, 0, (i / MAX_PENDING_PER_SOURCE) as u8]));
        let mut subs: Vec<Subscription> = (0..MAX_PENDING)
            .map(|i| {
                a.subscribe_pending(&format!("j{i}"), flags, None, from(i))
                    .unwrap()
            })
            .collect();
        let e = a
            .subscribe_pending("x", flags, None, Some(IpAddr::from([10, 0, 1, 1])))
            .err()
            .expect("one too many");
        assert_eq!(e.status(), 429, "{e:?}");
        assert!(e.retry);
        // Attaching to jobs that exist is not affected.
        let _known = a.subscribe("k", false, None).unwrap();
        subs.pop();
        subs.push(
            a.subscribe_pending("x", flags, None, Some(IpAddr::from([10, 0, 1, 1])))
                .unwrap(),
        );
    }

    /// One address has a share of the waiting places: a client's retry loop filling them
    /// used to refuse every other caller's attach before its job's creation (the
    /// controller's) with a 429. Its places come back as its clients stop waiting (they
    /// leave, their jobs are created, or end).
    #[tokio::test]
    async fn waiting_clients_are_bounded_per_address() {
        let flags = attach::STDOUT | attach::STREAM;
        let a = Arc::new(Attachments::default());
        let busy = Some(IpAddr::from([192, 0, 2, 1]));
        let other = Some(IpAddr::from([192, 0, 2, 2]));
        let mut subs: Vec<Subscription> = (0..MAX_PENDING_PER_SOURCE)
            .map(|i| {
                a.subscribe_pending(&format!("j{i}"), flags, None, busy)
                    .unwrap()
            })
            .collect();
        let e = a
            .subscribe_pending("x", flags, None, busy)
            .err()
            .expect("one too many from that address");
        assert_eq!(e.status(), 429, "{e:?}");
        assert!(e.retry);
        assert!(e.message.contains("from this address"), "{}", e.message);
        // Another address still gets in.
        let _ok = a.subscribe_pending("y", flags, None, other).unwrap();
        // A client that leaves, one whose job is created and one whose job ended each give
        // a place back.
        drop(subs.pop());
        let left = a.subscribe_pending("x", flags, None, busy).unwrap();
        assert!(a.subscribe_pending("x2", flags, None, busy).is_err());
        created(&a, "j0", false, false);
        let mut created_sub = subs.remove(0);
        assert!(matches!(created_sub.rx.recv().await, Some(Msg::Created)));
        let _second = a.subscribe_pending("x2", flags, None, busy).unwrap();
        assert!(a.subscribe_pending("x3", flags, None, busy).is_err());
        let mut job = ActiveJob::default();
        job.job.id = "j1".into();
        a.ended(&job);
        let _third = a.subscribe_pending("x3", flags, None, busy).unwrap();
        assert!(a.subscribe_pending("x4", flags, None, busy).is_err());
        drop((left, subs));
        let st = a.lock();
        assert_eq!(st.waiting_from.get(&busy), Some(&2));
        assert_eq!(st.waiting_from.get(&other), Some(&1));
    }

    /// Once the job is asked to stop, its one client no longer holds its output up: the
    /// output waiting for room goes on (the client, full, is detached as any other), so the
    /// job's end is not held up by a client that stopped reading. A client attaching to it
    /// after that does not hold it up either; a later job of the same id is not affected.
    #[tokio::test]
    async fn a_stop_ends_the_wait_for_the_one_client() {
        let a = Arc::new(Attachments::default());
        let mut sub = a.subscribe("j", true, None).unwrap();
        for i in 0..QUEUE {
            a.output("j", Stream::Stdout, format!("{i}").as_bytes(), true)
                .await;
        }
        let sender = {
            let a = a.clone();
            tokio::spawn(async move { a.output("j", Stream::Stdout, b"more", true).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!sender.is_finished(), "it waits for the client");
        a.unblock("j");
        tokio::time::timeout(Duration::from_secs(5), sender)
            .await
            .expect("no longer held up once the job is being stopped")
            .unwrap();
        assert!(!sub.blocking());
        assert_eq!(a.count.load(Ordering::Relaxed), 0, "full: detached");
        let mut n = 0;
        while let Some(m) = sub.rx.recv().await {
            assert!(matches!(m, Msg::Output(..)));
            n += 1;
        }
        assert_eq!(n, QUEUE, "it keeps what was queued");
        drop(sub);
        // A client attaching while the job is being stopped does not block it.
        let late = a.subscribe("j", true, None).unwrap();
        assert!(!late.blocking());
        drop(late);
        let waiting = a
            .subscribe_pending("j", attach::STDOUT | attach::STREAM, None, None)
            .unwrap();
        created(&a, "j", false, true);
        assert!(!waiting.blocking());
        drop(waiting);
        let mut job = ActiveJob::default();
        job.job.id = "j".into();
        a.ended(&job);
        assert!(a.subscribe("j", true, None).unwrap().blocking());
    }

    /// A client whose job's output no longer waits for it gets the time limit on a frame
    /// again, from then on (a frame already being written included).
    #[tokio::test]
    async fn a_frame_to_a_client_no_longer_holding_the_job_up_is_timed() {
        let (client, server) = tokio::io::duplex(64);
        let blocking = Blocking::new(true);
        let mut w = Writer {
            wr: server,
            buf: Vec::new(),
            timeout: Duration::from_millis(300),
            blocking: Some(blocking.clone()),
        };
        let big = Frame::Data {
            stream: attach::STREAM_STDOUT,
            data: vec![b'x'; 1024],
        };
        // The client reads nothing: no limit while it holds the job up.
        let sent = tokio::spawn(async move { w.send(&big).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!sent.is_finished(), "timed while it held the job up");
        blocking.set(false);
        let r = tokio::time::timeout(Duration::from_secs(5), sent)
            .await
            .expect("timed once it no longer holds the job up")
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
        drop(client);
    }

    /// The one client of a `disable_log` job is never detached for being slow: its job's
    /// output waits for room in its queue (and goes on without it once it leaves).
    #[tokio::test]
    async fn the_one_client_of_a_job_without_log_holds_its_output_up() {
        let a = Arc::new(Attachments::default());
        let mut sub = a.subscribe("j", true, None).unwrap();
        assert!(sub.blocking());
        let piece = vec![b'x'; 64 * 1024 - 1];
        let fit = QUEUE_BYTES / (64 * 1024);
        for _ in 0..fit {
            a.output("j", Stream::Stdout, &piece, true).await;
        }
        // One more waits for room instead of detaching the client.
        let sender = {
            let a = a.clone();
            let piece = piece.clone();
            tokio::spawn(async move { a.output("j", Stream::Stdout, &piece, true).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!sender.is_finished(), "it waits for the client");
        assert_eq!(a.count.load(Ordering::Relaxed), 1, "still attached");
        let m = sub.rx.recv().await;
        sub.took(&m);
        tokio::time::timeout(Duration::from_secs(5), sender)
            .await
            .expect("sent once there was room")
            .unwrap();
        let mut n = 1;
        while let Ok(m) = sub.rx.try_recv() {
            assert!(matches!(&m, Msg::Output(_, d) if d.len() == 64 * 1024));
            sub.took(&Some(m));
            n += 1;
        }
        assert_eq!(n, fit + 1, "nothing lost");
        // Counted in pieces too: a full queue of small pieces waits as well.
        for i in 0..QUEUE {
            a.output("j", Stream::Stdout, format!("{i}").as_bytes(), true)
                .await;
        }
        let sender = {
            let a = a.clone();
            tokio::spawn(async move { a.output("j", Stream::Stdout, b"more", true).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!sender.is_finished());
        // The client leaves: the output goes on without it.
        drop(sub);
        tokio::time::timeout(Duration::from_secs(5), sender)
            .await
            .expect("not held once the client left")
            .unwrap();
        assert_eq!(a.count.load(Ordering::Relaxed), 0);
    }
}
