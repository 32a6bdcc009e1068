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
//!
//! The clients attached to each job ([`Attachments`]) and the checks of a request are here;
//! one client's connection is served in `serve`.
//!
//! [`Frame::Waiting`]: attach::Frame::Waiting
//! nothing to send.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flynn_api::attach;
use flynn_api::host::ActiveJob;
use flynn_api::ApiError;
use tokio::sync::{mpsc, Notify};

use crate::logship::Stream;

mod serve;
#[cfg(test)]
mod tests;

pub use serve::serve;

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
