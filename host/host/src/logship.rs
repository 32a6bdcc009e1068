//! Ships job output to the log aggregator: RFC 5424 messages over TCP with RFC 6587 octet
//! counting (spec §3.2), buffered while the aggregator is unreachable.
//!
//! Each line becomes `<190>1 TIMESTAMP HOST-ID APP-ID TYPE.JOB-ID MSGID [flynn seq="N"]
//! LINE` (facility local7, severity info, microsecond UTC timestamps, `ID1` stdout, `ID2`
//! stderr). Lines longer than [`MAX_LINE`] are split. Each aggregator's buffer holds at
//! most [`Capacity`] frames and bytes, kept per app; when it is full the oldest frame of the
//! app holding the most is dropped (see [`Queue`]) and counted, the count is logged and
//! exported in `/host/status` and `/metrics`. A batch whose write fails is
//! put back at the front and sent again after reconnecting. With the host's disk log
//! ([`crate::logdisk`]) and the aggregator's API address, a new connection first sends what
//! the disk holds after the aggregator's cursor for this host (spec §3.5); without them,
//! the last frames written before a connection was lost are written again on the next
//! one (see [`RECENT_FRAMES`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flynn_api::host::LogStats;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

/// Output lines are cut into messages of at most this many bytes (spec §3.2).
pub const MAX_LINE: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub const fn msgid(self) -> &'static str {
        match self {
            Stream::Stdout => "ID1",
            Stream::Stderr => "ID2",
        }
    }
}

/// The current time as RFC 3339 UTC with exactly six fraction digits (sortable as text).
pub fn now_rfc3339() -> String {
    let now = flynn_syslog::Timestamp::now().0;
    let secs = now.div_euclid(1_000_000_000);
    let micros = now.rem_euclid(1_000_000_000) / 1000;
    let whole = flynn_syslog::Timestamp(secs * 1_000_000_000).to_rfc3339();
    format!("{}.{micros:06}Z", whole.trim_end_matches('Z'))
}

/// The fields of one message besides its text.
pub struct Header<'a> {
    pub timestamp: &'a str,
    pub host: &'a str,
    pub app: &'a str,
    pub procid: &'a str,
    pub stream: Stream,
    pub seq: u64,
}

/// RFC 5424's longest HOSTNAME, APP-NAME and PROCID, which the aggregator enforces (with
/// printable ASCII only): header fields are made to fit, so every line parses there,
/// whatever app id, job id or process type a job brings.
const MAX_HOST: usize = 255;
const MAX_APP: usize = 48;
const MAX_PROCID: usize = 128;

/// Encodes one framed syslog message (`<len> <msg>`). Empty header fields become `-`;
/// characters other than printable ASCII become `_`, and long fields are cut to RFC 5424's
/// limits.
pub fn encode(out: &mut Vec<u8>, h: &Header<'_>, line: &[u8]) {
    encode_with(out, h, line, true)
}

/// [`encode`], with the `[flynn seq]` structured data or without it (`-`).
fn encode_with(out: &mut Vec<u8>, h: &Header<'_>, line: &[u8], with_seq: bool) {
    let nil = |s: &str, max: usize| {
        if s.is_empty() {
            return "-".to_string();
        }
        s.chars()
            .take(max)
            .map(|c| if ('!'..='~').contains(&c) { c } else { '_' })
            .collect::<String>()
    };
    let sd = if with_seq {
        format!("[flynn seq=\"{}\"]", h.seq)
    } else {
        "-".to_string()
    };
    let head = format!(
        "<190>1 {} {} {} {} {} {sd} ",
        h.timestamp,
        nil(h.host, MAX_HOST),
        nil(h.app, MAX_APP),
        nil(h.procid, MAX_PROCID),
        h.stream.msgid(),
    );
    let len = head.len() + line.len();
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(line);
}

/// Who a line belongs to.
#[derive(Debug, Clone)]
pub struct Source {
    /// APP-NAME: the app id (the job id when the job has no app).
    pub app: String,
    /// PROCID: `<type>.<job id>` or the job id.
    pub procid: String,
    /// `app`, shared by the queued frames (made once, not per line).
    key: Arc<str>,
}

impl Source {
    pub fn new(app: Option<&str>, process_type: Option<&str>, job_id: &str) -> Source {
        let app = app.unwrap_or(job_id);
        Source {
            key: Arc::from(app),
            app: app.to_string(),
            procid: match process_type {
                Some(t) => format!("{t}.{job_id}"),
                None => job_id.to_string(),
            },
        }
    }
}

/// A framed message, the app it belongs to, and where the disk log has it.
type Frame = (Arc<str>, Arc<[u8]>, Stored);

/// Where a queued frame is kept besides the queue.
#[derive(Debug, Clone, Copy)]
enum Stored {
    /// In the disk log, there.
    Disk(crate::logdisk::Pos),
    /// Nowhere else (the disk log is off, or its write failed).
    Nowhere,
    /// A drop notice for this many lines, made when sent: never on disk.
    Notice(u64),
}

impl Stored {
    fn pos(self) -> Option<crate::logdisk::Pos> {
        match self {
            Stored::Disk(p) => Some(p),
            _ => None,
        }
    }
}

/// How much one aggregator's send queue holds while the aggregator is away (or slow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Frames (`--log-buffer`).
    pub lines: usize,
    /// Bytes of frames (`--log-buffer-bytes`; at least [`MIN_BUFFER_BYTES`]).
    pub bytes: usize,
}

/// A send queue's byte budget unless one is given: 10,000 lines of the longest kind would
/// be about 100 MB per aggregator.
pub const DEFAULT_BUFFER_BYTES: usize = 16 << 20;
/// The least byte budget: a few of the longest frames.
pub const MIN_BUFFER_BYTES: usize = 64 << 10;

/// `lines` frames, and the default byte budget.
impl From<usize> for Capacity {
    fn from(lines: usize) -> Capacity {
        Capacity {
            lines,
            bytes: DEFAULT_BUFFER_BYTES,
        }
    }
}

/// One aggregator's send queue, per app: each app's frames oldest first, every frame with
/// its place in push order, in which they are taken (across apps). Over budget, the oldest
/// frames of the app holding the most lines (over the byte budget: the most bytes) leave
/// it, so during an outage one chatty app pushes out its own lines, not every app's; a
/// quiet app keeps what it wrote. (Flynn's logmux keeps a buffer per app for that.) Frames
/// leave in batches, down to 99 % of the budget ([`Queue::evict`]), so a queue kept full
/// does not look for the app holding the most on every push (a batch loses only 1 % of the
/// budget that would otherwise have survived: 100 lines by default).
#[derive(Default)]
struct Queue {
    apps: std::collections::BTreeMap<Arc<str>, AppQueue>,
    lines: usize,
    bytes: usize,
    /// The next frame's place in push order.
    next: u64,
    /// TEST ONLY: how many times [`Queue::evict`] looked over all apps.
    #[cfg(test)]
    scans: usize,
}

#[derive(Default)]
struct AppQueue {
    frames: VecDeque<(u64, Frame)>,
    bytes: usize,
}

impl Queue {
    fn len(&self) -> usize {
        self.lines
    }

    fn push_back(&mut self, f: Frame) {
        let n = self.next;
        self.next += 1;
        self.insert(n, f, false);
    }

    /// Puts back a frame [`Queue::take`] took (the newest of them first): ahead of the
    /// frames of its app, all pushed after it.
    fn push_front(&mut self, n: u64, f: Frame) {
        self.insert(n, f, true);
    }

    fn insert(&mut self, n: u64, f: Frame, front: bool) {
        let len = f.1.len();
        // Found by name first: the key is cloned only for an app new to the queue.
        let a = match self.apps.get_mut(&*f.0) {
            Some(a) => a,
            None => self.apps.entry(f.0.clone()).or_default(),
        };
        a.bytes += len;
        if front {
            a.frames.push_front((n, f));
        } else {
            a.frames.push_back((n, f));
        }
        self.lines += 1;
        self.bytes += len;
    }

    /// The oldest frame of `app`.
    fn pop(&mut self, app: &Arc<str>) -> Option<(u64, Frame)> {
        let a = self.apps.get_mut(app)?;
        let f = a.frames.pop_front()?;
        a.bytes -= f.1 .1.len();
        if a.frames.is_empty() {
            self.apps.remove(app);
        }
        self.lines -= 1;
        self.bytes -= f.1 .1.len();
        Some(f)
    }

    /// Takes up to `max` frames in push order (with their places, for
    /// [`Queue::push_front`]).
    fn take(&mut self, max: usize) -> Vec<(u64, Frame)> {
        use std::cmp::Reverse;
        let mut heads: std::collections::BinaryHeap<Reverse<(u64, Arc<str>)>> = self
            .apps
            .iter()
            .filter_map(|(app, a)| Some(Reverse((a.frames.front()?.0, app.clone()))))
            .collect();
        let mut out = Vec::with_capacity(max.min(self.lines));
        while out.len() < max {
            let Some(Reverse((_, app))) = heads.pop() else {
                break;
            };
            let Some(f) = self.pop(&app) else { continue };
            out.push(f);
            if let Some(next) = self.apps.get(&app).and_then(|a| a.frames.front()) {
                heads.push(Reverse((next.0, app)));
            }
        }
        out
    }

    /// The frames that leave when over `cap`, down to 99 % of it (of a budget of at least
    /// 100; a batch, so a full queue picks its victims once per 1 % of its budget, not on
    /// every push): one by one the oldest of the app holding the most (lines while over the
    /// line budget, then bytes while over the byte budget; of equals, the one with the
    /// oldest frame). Empty when within `cap`.
    fn evict(&mut self, cap: Capacity) -> Vec<Frame> {
        use std::cmp::Reverse;
        let mut out = Vec::new();
        for by_lines in [true, false] {
            let (size, budget) = if by_lines {
                (self.lines, cap.lines)
            } else {
                (self.bytes, cap.bytes)
            };
            if size <= budget {
                continue;
            }
            let target = budget - budget / 100;
            let key = |a: &AppQueue| {
                let size = if by_lines { a.frames.len() } else { a.bytes };
                (size, Reverse(a.frames.front().map_or(u64::MAX, |f| f.0)))
            };
            #[cfg(test)]
            {
                self.scans += 1;
            }
            let mut heap: std::collections::BinaryHeap<(_, Arc<str>)> = self
                .apps
                .iter()
                .map(|(app, a)| (key(a), app.clone()))
                .collect();
            while (if by_lines { self.lines } else { self.bytes }) > target {
                let Some((_, app)) = heap.pop() else { break };
                let Some((_, f)) = self.pop(&app) else {
                    continue;
                };
                out.push(f);
                if let Some(a) = self.apps.get(&app) {
                    heap.push((key(a), app));
                }
            }
        }
        out
    }

    /// The disk position of the first queued frame (in push order, which is disk order)
    /// that has one.
    fn first_pos(&self) -> Option<crate::logdisk::Pos> {
        self.apps
            .values()
            .filter_map(|a| a.frames.iter().find_map(|(_, f)| f.2.pos()))
            .min()
    }
}

/// One aggregator: its queue and counters.
struct Dest {
    host: String,
    /// The aggregator's HTTP API (for `/cursors`), if known.
    api: Option<String>,
    disk: Option<Arc<crate::logdisk::DiskLog>>,
    capacity: Capacity,
    queue: Mutex<Queue>,
    /// Lines dropped per app since the last notice was queued.
    lost_by_app: Mutex<std::collections::BTreeMap<Arc<str>, u64>>,
    notify: Notify,
    shipped: AtomicU64,
    dropped: AtomicU64,
    requeued: AtomicU64,
    connected: AtomicBool,
    /// The queue dropped frames that the disk log has: once the queue is drained, they
    /// are sent from the disk (see [`Dropped`]).
    resync: AtomicBool,
    due: Mutex<Due>,
    /// This aggregator's address as a file name: the name of its marks.
    mark: String,
    /// The unacknowledged mark as last saved (see [`Dest::tick_marks`]).
    unacked: Mutex<Option<crate::logdisk::Pos>>,
    /// The previous daemon's mark, taken by the first connection (see
    /// [`Dest::load_unacked`]).
    restart_from: Mutex<Option<crate::logdisk::Pos>>,
    /// The shipper's push lock (see `Shared::order`).
    order: Arc<Mutex<()>>,
}

/// Frames the queue dropped that the disk log has, not sent again yet. Their lines are
/// counted per app here, not in `lost_by_app`: a notice goes out for them only if the
/// disk can no longer give them back.
#[derive(Default)]
struct Dropped {
    /// From the first one's position to the end of the last one. Every frame between was
    /// sent, dropped too, or is still queued (a quiet app's frame the queue kept while a
    /// chatty app's around it left, see [`Queue`]): that one goes out twice, and the
    /// aggregator ignores the copy.
    range: Option<(crate::logdisk::Pos, crate::logdisk::Pos)>,
    by_app: std::collections::BTreeMap<Arc<str>, u64>,
}

/// What is due; where due lines resent lately start (see [`Dest::save_due`]); and the due
/// mark as last saved.
#[derive(Default)]
struct Due {
    dropped: Dropped,
    floor: Option<crate::logdisk::Pos>,
    saved: Option<crate::logdisk::Pos>,
}

fn min_pos(
    a: Option<crate::logdisk::Pos>,
    b: Option<crate::logdisk::Pos>,
) -> Option<crate::logdisk::Pos> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `addr` as a file name (anything but ASCII letters, digits, `.` and `-` becomes `_`).
fn mark_name(addr: &str) -> String {
    addr.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Dropped {
    fn add_range(&mut self, from: crate::logdisk::Pos, to: crate::logdisk::Pos) {
        self.range = Some(match self.range {
            Some((a, b)) => (a.min(from), b.max(to)),
            None => (from, to),
        });
    }

    /// Puts back what [`std::mem::take`] took (a resend that failed).
    fn merge(&mut self, other: Dropped) {
        if let Some((a, b)) = other.range {
            self.add_range(a, b);
        }
        for (app, n) in other.by_app {
            *self.by_app.entry(app).or_default() += n;
        }
    }
}

struct Shared {
    host: String,
    seq: Arc<AtomicU64>,
    lines: AtomicU64,
    /// Lines lost before they reached the daemon.
    lost_upstream: AtomicU64,
    dests: Vec<Arc<Dest>>,
    disk: Option<Arc<crate::logdisk::DiskLog>>,
    disk_errors: AtomicU64,
    /// Held across a push's disk write and its queue inserts, so every queue's push order
    /// is disk order (a resend relies on it).
    order: Arc<Mutex<()>>,
}

/// Cheap to clone; lines pushed are shipped to every configured aggregator (spec §3.1)
/// by one background task each. Without an aggregator lines are discarded (a warning is
/// logged at startup).
#[derive(Clone)]
pub struct Shipper {
    shared: Arc<Shared>,
}

impl Shipper {
    /// Starts one shipping task per address (needs a tokio runtime), without a disk log.
    pub fn start(host: &str, addrs: Vec<String>, capacity: impl Into<Capacity>) -> Shipper {
        Self::start_with(host, addrs, Vec::new(), capacity, None)
    }

    /// Starts one shipping task per syslog address; `apis[i]`, when given, is the HTTP API
    /// of aggregator `i`, asked for its cursor on every new connection so that `disk`'s
    /// frames after it are sent again.
    pub fn start_with(
        host: &str,
        addrs: Vec<String>,
        apis: Vec<String>,
        capacity: impl Into<Capacity>,
        disk: Option<Arc<crate::logdisk::DiskLog>>,
    ) -> Shipper {
        let capacity = capacity.into();
        let capacity = Capacity {
            lines: capacity.lines.max(1),
            bytes: capacity.bytes.max(MIN_BUFFER_BYTES),
        };
        let seq = Arc::new(AtomicU64::new(0));
        let order = Arc::new(Mutex::new(()));
        let dests: Vec<Arc<Dest>> = addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                Arc::new(Dest {
                    host: host.to_string(),
                    api: apis.get(i).cloned(),
                    disk: disk.clone(),
                    capacity,
                    queue: Mutex::new(Queue::default()),
                    lost_by_app: Mutex::new(Default::default()),
                    notify: Notify::new(),
                    shipped: AtomicU64::new(0),
                    dropped: AtomicU64::new(0),
                    requeued: AtomicU64::new(0),
                    connected: AtomicBool::new(false),
                    resync: AtomicBool::new(false),
                    due: Mutex::new(Due::default()),
                    mark: mark_name(addr),
                    unacked: Mutex::new(None),
                    restart_from: Mutex::new(None),
                    order: order.clone(),
                })
            })
            .collect();
        // Before any line is pushed: the marks' "log's end now" must not include one.
        if let Some(disk) = &disk {
            let keep: Vec<String> = dests
                .iter()
                .flat_map(|d| [d.due_mark(), d.unacked_mark()])
                .collect();
            disk.remove_marks_except(&["due-", "unacked-"], &keep);
        }
        for d in &dests {
            d.load_due();
            let from = d.load_unacked();
            *d.restart_from.lock().unwrap_or_else(|e| e.into_inner()) = from;
        }
        for (d, a) in dests.iter().zip(addrs) {
            tokio::spawn(run(d.clone(), a));
        }
        Shipper {
            shared: Arc::new(Shared {
                host: host.to_string(),
                seq,
                lines: AtomicU64::new(0),
                lost_upstream: AtomicU64::new(0),
                dests,
                disk,
                disk_errors: AtomicU64::new(0),
                order,
            }),
        }
    }

    /// Queues one output line (without its newline); long lines are split.
    pub fn push(&self, src: &Source, stream: Stream, line: &[u8]) {
        if self.shared.dests.is_empty() {
            return;
        }
        // Time and sequence are taken under the push lock, so disk order is key order.
        let _order = self.shared.order.lock().unwrap_or_else(|e| e.into_inner());
        let ts = now_rfc3339();
        let chunks: Vec<&[u8]> = if line.is_empty() {
            vec![line]
        } else {
            line.chunks(MAX_LINE).collect()
        };
        let app = &src.key;
        let frames: Vec<Arc<[u8]>> = chunks
            .into_iter()
            .map(|c| {
                let seq = self.shared.seq.fetch_add(1, Ordering::Relaxed) + 1;
                let mut frame = Vec::with_capacity(c.len() + 128);
                let h = Header {
                    timestamp: &ts,
                    host: &self.shared.host,
                    app: &src.app,
                    procid: &src.procid,
                    stream,
                    seq,
                };
                encode(&mut frame, &h, c);
                self.shared.lines.fetch_add(1, Ordering::Relaxed);
                Arc::from(frame)
            })
            .collect();
        let mut at = Vec::with_capacity(frames.len());
        if let Some(disk) = &self.shared.disk {
            if let Err(e) = disk.append(frames.iter().map(|f| &f[..]), &mut at) {
                let n = self.shared.disk_errors.fetch_add(1, Ordering::Relaxed);
                // The first failure, then one in 10,000 (a full disk fails every line).
                if n.is_multiple_of(10_000) {
                    tracing::warn!(error = %e, failures = n + 1, "writing the host's log to disk failed");
                }
            }
        }
        for d in &self.shared.dests {
            let dropped = {
                let mut q = d.queue.lock().unwrap_or_else(|e| e.into_inner());
                for (i, f) in frames.iter().enumerate() {
                    let stored = at.get(i).map_or(Stored::Nowhere, |&p| Stored::Disk(p));
                    q.push_back((app.clone(), f.clone(), stored));
                }
                let evicted = q.evict(d.capacity);
                d.lost(evicted)
            };
            if dropped > 0 {
                let total = d.dropped.fetch_add(dropped, Ordering::Relaxed) + dropped;
                // One warning per 1000 dropped lines, and for the first.
                if total == dropped || total / 1000 != (total - dropped) / 1000 {
                    tracing::warn!(
                        dropped_total = total,
                        "log aggregator unreachable and the log buffer is full: dropping the oldest lines of the apps holding the most"
                    );
                }
            }
            d.notify.notify_one();
        }
    }

    /// Counts `count` lines lost before they reached the host (the job's own pipe overflowed).
    pub fn count_dropped(&self, count: u64) {
        let total = self
            .shared
            .lost_upstream
            .fetch_add(count, Ordering::Relaxed)
            + count;
        tracing::warn!(
            count,
            dropped_total = total,
            "job output lines were dropped"
        );
    }

    /// With several aggregators: `shipped` is what every one of them got, `dropped` and
    /// `buffered` the most any of them lost or waits for, `connected` all of them.
    pub fn stats(&self) -> LogStats {
        let s = &self.shared;
        let d = &s.dests;
        LogStats {
            lines: s.lines.load(Ordering::Relaxed),
            shipped: d
                .iter()
                .map(|d| d.shipped.load(Ordering::Relaxed))
                .min()
                .unwrap_or(0),
            dropped: s.lost_upstream.load(Ordering::Relaxed)
                + d.iter()
                    .map(|d| d.dropped.load(Ordering::Relaxed))
                    .max()
                    .unwrap_or(0),
            buffered: d
                .iter()
                .map(|d| d.queue.lock().map(|q| q.len() as u64).unwrap_or(0))
                .max()
                .unwrap_or(0),
            connected: !d.is_empty() && d.iter().all(|d| d.connected.load(Ordering::Relaxed)),
            requeued: d
                .iter()
                .map(|d| d.requeued.load(Ordering::Relaxed))
                .max()
                .unwrap_or(0),
        }
    }
}

impl Dest {
    /// Frames the queue could not keep. Those the disk log has are due: sent from there
    /// once the queue is drained. The others' lines are lost and counted for their apps'
    /// notices; a lost notice puts its count back for the next one. Returns how many lines
    /// were lost.
    fn lost(&self, frames: Vec<Frame>) -> u64 {
        let mut lost = 0;
        let mut requeued = 0;
        let mut due = None;
        // Counted here, then added under the lock once.
        let mut lost_by_app: std::collections::HashMap<Arc<str>, u64> = Default::default();
        let mut note = |app: Arc<str>, n: u64| *lost_by_app.entry(app).or_default() += n;
        for f in frames {
            match f.2 {
                Stored::Disk(p) => {
                    let end = crate::logdisk::Pos {
                        seg: p.seg,
                        offset: p.offset + f.1.len() as u64,
                    };
                    let d = due
                        .get_or_insert_with(|| self.due.lock().unwrap_or_else(|e| e.into_inner()));
                    d.dropped.add_range(p, end);
                    *d.dropped.by_app.entry(f.0).or_default() += 1;
                    requeued += 1;
                }
                Stored::Nowhere => {
                    note(f.0, 1);
                    lost += 1;
                }
                Stored::Notice(n) => note(f.0, n),
            }
        }
        if !lost_by_app.is_empty() {
            let mut by_app = self.lost_by_app.lock().unwrap_or_else(|e| e.into_inner());
            for (app, n) in lost_by_app {
                *by_app.entry(app).or_default() += n;
            }
        }
        if let Some(mut d) = due {
            self.save_due(&mut d);
            drop(d);
            self.resync.store(true, Ordering::Relaxed);
            let before = self.requeued.fetch_add(requeued, Ordering::Relaxed);
            let n = before + requeued;
            if before == 0 || before / 10_000 != n / 10_000 {
                tracing::info!(
                    requeued_total = n,
                    "log buffer full: the oldest lines will be sent again from the host's disk log"
                );
            }
        }
        lost
    }

    fn due_mark(&self) -> String {
        format!("due-{}", self.mark)
    }

    fn unacked_mark(&self) -> String {
        format!("unacked-{}", self.mark)
    }

    /// Keeps `due-<aggregator>.pos` beside the disk log at the lowest position that must be
    /// sent again even to an aggregator whose cursor is known: the start of the due range,
    /// and of due lines resent in the last 45 s (`floor`: sent after newer frames, so the
    /// cursor can be past them while they are still in flight). Removed when there is none.
    /// A daemon restarted before those lines arrived then still sends them. Handed to the
    /// disk log's writer (no file I/O here), only when it changes, under the `due` lock.
    /// Per-app counts are not kept: after a restart, due lines that already left the disk
    /// log get a warning, not a notice.
    fn save_due(&self, due: &mut Due) {
        let want = min_pos(due.dropped.range.map(|r| r.0), due.floor);
        if let Some(disk) = self.disk.as_ref().filter(|_| want != due.saved) {
            disk.set_mark(&self.due_mark(), want);
            due.saved = want;
        }
    }

    /// Takes up the due mark a previous daemon left (see [`Dest::save_due`]): due up to the
    /// log's end, sent on the first connection.
    fn load_due(&self) {
        let Some(disk) = &self.disk else { return };
        let Some(mut from) = disk.load_mark(&self.due_mark()) else {
            return;
        };
        let end = disk.end();
        let mut d = self.due.lock().unwrap_or_else(|e| e.into_inner());
        d.saved = Some(from);
        if from < end {
            if !disk.holds(from) {
                tracing::warn!(
                    "some lines dropped from the log buffer before the restart had left the host's log"
                );
                from = disk.start();
            }
            tracing::info!(
                "lines dropped from the log buffer before the restart will be sent again"
            );
            d.dropped.add_range(from, end);
            self.resync.store(true, Ordering::Relaxed);
        }
        self.save_due(&mut d);
    }

    /// Where the previous daemon's unacknowledged frames began (see
    /// [`Dest::tick_marks`]), to be sent again on the first connection when the
    /// aggregator's cursor is not known. With no mark (a first start), or one past the
    /// log's end (its last writes were lost with the daemon: all it holds was sent),
    /// nothing: the mark is set to the log's end now, before any line is pushed.
    fn load_unacked(&self) -> Option<crate::logdisk::Pos> {
        let disk = self.disk.as_ref()?;
        let end = disk.end();
        let from = disk.load_mark(&self.unacked_mark()).filter(|p| *p < end);
        let from = from.map(|p| {
            if disk.holds(p) {
                p
            } else {
                tracing::warn!("some lines not known to have reached the log aggregator before the restart had left the host's log");
                disk.start()
            }
        });
        let saved = from.unwrap_or(end);
        disk.set_mark(&self.unacked_mark(), Some(saved));
        *self.unacked.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        from
    }

    /// Brings both marks up to date (at most once a second while connected; rewritten only
    /// when they moved). `restart_from`: the previous daemon's unacknowledged start while it
    /// has not been sent yet.
    ///
    /// The due mark's floor (see [`Dest::save_due`]) becomes where due lines resent in the
    /// last 45 s start. `unacked-<aggregator>.pos` becomes where the frames that may not
    /// have reached the aggregator begin: the oldest frame written to it (or resent) in the
    /// last 45 s, the due range, `restart_from`, else the queue's first frame, else the
    /// log's end. A restarted daemon that cannot get the aggregator's cursor sends the log
    /// again from there: what was in flight, queued in memory or due when the previous one
    /// was killed. While disconnected the marks do not move: what is queued then lies
    /// after them.
    fn tick_marks(
        &self,
        recent: &mut Recent,
        restart_from: Option<crate::logdisk::Pos>,
        now: tokio::time::Instant,
    ) {
        let Some(disk) = &self.disk else { return };
        let written = recent.first_pos(now);
        let resent = recent.resent_from();
        // A mark write that failed (a full disk) is sent again until one succeeds.
        let rewrite = disk.mark_failed();
        let due_from = {
            let mut d = self.due.lock().unwrap_or_else(|e| e.into_inner());
            d.floor = resent;
            if rewrite {
                // No real position: the next save writes whatever it is.
                d.saved = Some(crate::logdisk::Pos {
                    seg: u64::MAX,
                    offset: u64::MAX,
                });
            }
            self.save_due(&mut d);
            d.dropped.range.map(|r| r.0)
        };
        // A recent frame that is not on disk: its place is not known, keep the mark.
        let Some(written) = written else {
            return;
        };
        let queued = {
            let _order = self.order.lock().unwrap_or_else(|e| e.into_inner());
            let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.first_pos().unwrap_or_else(|| disk.end())
        };
        let from = [written, resent, due_from, restart_from, Some(queued)]
            .into_iter()
            .flatten()
            .min();
        let mut saved = self.unacked.lock().unwrap_or_else(|e| e.into_inner());
        if from != *saved || rewrite {
            disk.set_mark(&self.unacked_mark(), from);
            *saved = from;
        }
    }

    /// Puts back what a failed resend took.
    fn due_again(&self, dropped: Dropped) {
        let mut d = self.due.lock().unwrap_or_else(|e| e.into_inner());
        d.dropped.merge(dropped);
        self.save_due(&mut d);
    }

    /// After a resend of due frames from `from`: they count as resent (the floor) until the
    /// next [`Dest::tick_marks`] takes that over from the recent resends; the mark follows.
    fn settle_due(&self, from: Option<crate::logdisk::Pos>) {
        let mut d = self.due.lock().unwrap_or_else(|e| e.into_inner());
        d.floor = min_pos(d.floor, from);
        self.save_due(&mut d);
    }

    fn note_lost(&self, app: Arc<str>, n: u64) {
        *self
            .lost_by_app
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(app)
            .or_default() += n;
    }

    /// One message per app that lost lines, telling its readers how many: drops are
    /// never silent in the app's own log.
    fn take_notices(&self) -> Vec<Frame> {
        let lost = std::mem::take(&mut *self.lost_by_app.lock().unwrap_or_else(|e| e.into_inner()));
        let ts = now_rfc3339();
        lost.into_iter()
            .map(|(app, n)| {
                let mut frame = Vec::new();
                let h = Header {
                    timestamp: &ts,
                    host: &self.host,
                    app: &app,
                    procid: "flynn-host",
                    stream: Stream::Stderr,
                    seq: 0,
                };
                let msg = format!(
                    "flynn-host: {n} log lines were dropped while the log aggregator was unreachable"
                );
                // No `seq`: a notice is sent ahead of older queued lines and would move the
                // aggregator's cursor past them.
                encode_with(&mut frame, &h, msg.as_bytes(), false);
                (app, Arc::from(frame), Stored::Notice(n))
            })
            .collect()
    }
}

/// The last frames written to an aggregator are kept and written again first on the
/// next connection: a write only reached the local socket, and an aggregator that went
/// away meanwhile (a restart, a lost host) never read the lines still in flight. The
/// aggregator ignores a message it already has (same timestamp and structured data, and
/// `seq` is in it), so what did arrive is not doubled.
const RECENT_FRAMES: usize = 4096;
/// ...and at most this many bytes of them...
const RECENT_BYTES: usize = 4 << 20;
/// ...written at most this long ago: a connection that took writes for longer than this
/// was alive (a dead peer fails it within its keepalive and `TCP_USER_TIMEOUT`), so its
/// older frames arrived and are not sent again.
const RECENT_AGE: Duration = Duration::from_secs(45);

/// Frames written on the current connection (or the last one), oldest first.
#[derive(Default)]
struct Recent {
    frames: VecDeque<(tokio::time::Instant, Frame)>,
    bytes: usize,
    /// Where recent resends of due frames started, and when: they were sent after newer
    /// frames, so an aggregator's cursor can be past them while they were still in flight.
    /// Each is forgotten [`RECENT_AGE`] after it was sent.
    resent: VecDeque<(tokio::time::Instant, crate::logdisk::Pos)>,
}

impl Recent {
    fn push(&mut self, f: Frame, now: tokio::time::Instant) {
        self.bytes += f.1.len();
        self.frames.push_back((now, f));
        while self.frames.len() > RECENT_FRAMES || self.bytes > RECENT_BYTES {
            self.pop();
        }
    }

    fn pop(&mut self) {
        if let Some((_, old)) = self.frames.pop_front() {
            self.bytes -= old.1.len();
        }
    }

    /// Forgets frames and resends older than [`RECENT_AGE`].
    fn prune(&mut self, now: tokio::time::Instant) {
        while self
            .frames
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RECENT_AGE)
        {
            self.pop();
        }
        self.resent
            .retain(|(at, _)| now.duration_since(*at) <= RECENT_AGE);
    }

    /// Where the earliest resend of due frames still remembered started.
    fn resent_from(&self) -> Option<crate::logdisk::Pos> {
        self.resent.iter().map(|(_, p)| *p).min()
    }

    /// The frames not older than [`RECENT_AGE`], as one buffer.
    fn take_bytes(&mut self, now: tokio::time::Instant) -> Vec<u8> {
        self.prune(now);
        let mut buf = Vec::with_capacity(self.bytes);
        for (_, (_, f, _)) in &self.frames {
            buf.extend_from_slice(f);
        }
        buf
    }

    /// Remembers a resend of due frames from `from`, sent at `now`.
    fn note_resent(&mut self, now: tokio::time::Instant, from: crate::logdisk::Pos) {
        self.prune(now);
        if self.resent.len() >= 1024 {
            self.resent.pop_front();
        }
        self.resent.push_back((now, from));
    }

    /// Drops what is older than [`RECENT_AGE`]; then the lowest disk position of the frames
    /// left (`Some(None)`: there are none), or `None` when a line among them is not on disk
    /// (its write failed). Drop notices are never on disk and do not count.
    fn first_pos(&mut self, now: tokio::time::Instant) -> Option<Option<crate::logdisk::Pos>> {
        self.prune(now);
        let mut first = None;
        for (_, (_, _, stored)) in &self.frames {
            match stored {
                Stored::Disk(p) => {
                    first = Some(first.map_or(*p, |f: crate::logdisk::Pos| f.min(*p)))
                }
                Stored::Notice(_) => {}
                Stored::Nowhere => return None,
            }
        }
        Some(first)
    }
}

/// Sets TCP keepalive and `TCP_USER_TIMEOUT` on the aggregator connection, so one whose
/// peer vanished (a host that lost power) fails within about half a minute instead of
/// taking writes into its buffer for many minutes.
fn set_timeouts(conn: &tokio::net::TcpStream) {
    let sock = socket2::SockRef::from(conn);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    let _ = sock.set_tcp_keepalive(&ka);
    let _ = sock.set_tcp_user_timeout(Some(Duration::from_secs(30)));
}

enum Resend {
    /// What was due was written; where the due frames among it started, if any.
    Done(Option<crate::logdisk::Pos>),
    /// No disk log.
    NotAvailable,
    WriteFailed,
    /// The disk log could not be read (its writer failed or is far behind): due frames
    /// stay due, recent frames go from memory.
    ReadFailed,
}

/// Why [`resend_from_disk`] runs.
enum Start {
    /// A new connection, with the lowest disk position of the recent frames (if they are to
    /// come from the disk; used only without a cursor) and where the last resend of due
    /// frames started (if within [`RECENT_AGE`]).
    Connect {
        recent: Option<crate::logdisk::Pos>,
        resent: Option<crate::logdisk::Pos>,
    },
    /// The queue dropped frames while connected, now drained.
    Resync,
}

/// Writes frames from the disk log: the range the queue dropped (see [`Dropped`]), and on a
/// new connection also what follows the aggregator's cursor for this host (`GET /cursors`,
/// with `--logagg-api`) or else the recent frames, up to where the send queue starts, or
/// to the end of the dropped range if that is further (the queue follows). Dropped lines the disk no longer has get their notice. A failed write
/// leaves the dropped range due for the next attempt.
async fn resend_from_disk(s: &Arc<Dest>, conn: &mut tokio::net::TcpStream, start: Start) -> Resend {
    let Some(disk) = s.disk.clone() else {
        return Resend::NotAvailable;
    };
    let connect = match start {
        Start::Connect { recent, resent } => Some((recent, resent)),
        Start::Resync => None,
    };
    let cursor = match (&connect, s.api.as_deref()) {
        (Some(_), Some(api)) => cursor_of(api, &s.host).await,
        _ => None,
    };
    let disk2 = disk.clone();
    let point = match cursor {
        Some(c) => match tokio::task::spawn_blocking(move || disk2.resume_point(c)).await {
            Ok(Ok((p, reaches))) => {
                if !reaches {
                    // Per app it is not known which lines those were: no notice, a warning.
                    tracing::warn!(api = s.api.as_deref().unwrap_or(""), "lines between the aggregator's cursor and the start of the host's log are gone");
                }
                Some(p)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading the host's log from disk failed");
                None
            }
            Err(_) => None,
        },
        None => None,
    };
    let dropped = {
        let mut d = s.due.lock().unwrap_or_else(|e| e.into_inner());
        let dropped = std::mem::take(&mut d.dropped);
        // Being resent: the due mark keeps them (a drop meanwhile must not move it past).
        d.floor = min_pos(d.floor, dropped.range.map(|r| r.0));
        dropped
    };
    let min = min_pos;
    let due_from = dropped.range.map(|r| r.0);
    let (from, to) = match connect {
        // Up to the queue, or to the end of what it dropped if that is further (it keeps a
        // quiet app's old frames while a chatty app's later ones leave; queued frames in
        // between go out twice). With a cursor, what precedes it arrived (except due frames
        // resent lately, which went out after newer ones); without one, the recent frames
        // may not have.
        Some((recent, resent)) => {
            let from = match point {
                Some(p) => min(min(due_from, Some(p)), resent),
                None => min(min(due_from, recent), resent),
            };
            // The queue's first frame, or with an empty queue the disk's end now: frames
            // pushed after this go out through the queue. Read under the push lock, so
            // the two agree.
            let until = {
                let _order = s.order.lock().unwrap_or_else(|e| e.into_inner());
                let q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
                q.first_pos().unwrap_or_else(|| disk.end())
            };
            let until = match dropped.range {
                Some((_, end)) => until.max(end),
                None => until,
            };
            (from, Some(until))
        }
        None => (due_from, dropped.range.map(|r| r.1)),
    };
    let Some(from) = from else {
        return Resend::Done(None);
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(2);
    let disk2 = disk.clone();
    let reader = tokio::task::spawn_blocking(move || {
        disk2.read_range(from, to, |chunk| tx.blocking_send(chunk.to_vec()).is_ok())
    });
    let mut sent = 0usize;
    while let Some(chunk) = rx.recv().await {
        let res = tokio::time::timeout(Duration::from_secs(30), conn.write_all(&chunk)).await;
        if !matches!(res, Ok(Ok(()))) {
            // Due again on the next connection.
            s.due_again(dropped);
            s.resync.store(true, Ordering::Relaxed);
            return Resend::WriteFailed;
        }
        sent += chunk.len();
    }
    if !matches!(reader.await, Ok(Ok(()))) {
        tracing::warn!("reading the host's log from disk failed; due lines stay due");
        s.due_again(dropped);
        return Resend::ReadFailed;
    }
    // Checked after the read: a segment dropped meanwhile was read as empty.
    let covered = dropped.range.is_none_or(|(a, _)| disk.holds(a));
    if !covered {
        tracing::warn!(
            "some dropped lines had left the host's log before they could be sent again"
        );
        for (app, n) in dropped.by_app {
            s.dropped.fetch_add(n, Ordering::Relaxed);
            s.note_lost(app, n);
        }
    }
    if sent > 0 {
        tracing::info!(bytes = sent, "resent lines from the host's log");
    }
    s.settle_due(due_from);
    Resend::Done(due_from)
}

/// This host's cursor in the aggregator at `api`; `None` when it has none or cannot say.
async fn cursor_of(api: &str, host: &str) -> Option<crate::logdisk::CursorKey> {
    let client = flynn_client::logagg::Client::new(api);
    // Three tries a second apart: an aggregator that just came back may take its syslog
    // connections a moment before its API answers, and without the cursor a restarted
    // daemon has no recent lines to fall back on.
    for attempt in 1..=3 {
        let why = match tokio::time::timeout(Duration::from_secs(3), client.cursors()).await {
            Ok(Ok(c)) => {
                return Some(c.get(host).and_then(|c| {
                    let t = flynn_syslog::Timestamp::parse(c.time.as_bytes())?;
                    Some((t, c.seq))
                }))
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        if attempt == 3 {
            tracing::warn!(api, error = %why, "cannot read the log aggregator's cursors; resending the recent lines only");
        } else {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    None
}

async fn run(s: Arc<Dest>, addr: String) {
    let mut backoff = Duration::from_millis(100);
    let mut recent = Recent::default();
    // Sent again on the first connection that has no cursor (see `Dest::load_unacked`).
    let mut restart_from = s
        .restart_from
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    let mut marks_at = tokio::time::Instant::now();
    // A resync whose disk read failed is tried again after a pause, not at once.
    let mut resync_after = tokio::time::Instant::now();
    loop {
        let conn = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(&addr),
        )
        .await;
        let mut conn = match conn {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, addr = %addr, "log aggregator connect failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            Err(_) => continue,
        };
        let _ = conn.set_nodelay(true);
        set_timeouts(&conn);
        // The recent frames come from the disk log when it has them all, else as kept.
        let now = tokio::time::Instant::now();
        let recent_from = if s.disk.is_some() {
            recent.first_pos(now)
        } else {
            None
        };
        let again = match recent_from {
            Some(_) => Vec::new(),
            None => recent.take_bytes(now),
        };
        recent.prune(now);
        let resent = recent.resent_from();
        let start = Start::Connect {
            recent: [recent_from.flatten(), restart_from]
                .into_iter()
                .flatten()
                .min(),
            resent,
        };
        let again = match resend_from_disk(&s, &mut conn, start).await {
            Resend::WriteFailed => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            Resend::Done(due_from) => {
                // What was resent may still be in flight: the marks keep it for 45 s
                // from now.
                let done = tokio::time::Instant::now();
                let resent = [due_from, restart_from.take(), recent_from.flatten()];
                for from in resent.into_iter().flatten() {
                    recent.note_resent(done, from);
                }
                again
            }
            Resend::NotAvailable => again,
            Resend::ReadFailed => {
                // The previous daemon's range becomes due: the resync sends it once the disk
                // reads again (the marks keep it meanwhile).
                if let Some(from) = restart_from.take() {
                    s.due_again(Dropped {
                        range: Some((from, s.disk.as_ref().map_or(from, |d| d.end()))),
                        by_app: Default::default(),
                    });
                    s.resync.store(true, Ordering::Relaxed);
                    resync_after = tokio::time::Instant::now() + Duration::from_secs(5);
                }
                // The disk could not give the recent frames: from memory then.
                if again.is_empty() {
                    recent.take_bytes(now)
                } else {
                    again
                }
            }
        };
        if !again.is_empty() {
            let res = tokio::time::timeout(Duration::from_secs(5), conn.write_all(&again)).await;
            if !matches!(res, Ok(Ok(()))) {
                // An aggregator that takes connections and drops them: not a fast loop.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            tracing::debug!(frames = recent.frames.len(), "wrote the last frames again");
        }
        let connected_at = tokio::time::Instant::now();
        s.connected.store(true, Ordering::Relaxed);
        tracing::info!(addr = %addr, "connected to the log aggregator");
        loop {
            // Notices first (place 0: put back, they stay ahead of their app's lines).
            let mut batch: Vec<(u64, Frame)> =
                s.take_notices().into_iter().map(|f| (0, f)).collect();
            {
                let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
                batch.extend(q.take(256));
            }
            if batch.is_empty()
                && tokio::time::Instant::now() >= resync_after
                && s.resync.swap(false, Ordering::Relaxed)
            {
                // The queue overflowed while connected (an output burst faster than the
                // aggregator takes it): what it dropped is on the disk log.
                match resend_from_disk(&s, &mut conn, Start::Resync).await {
                    Resend::WriteFailed => break,
                    Resend::Done(Some(from)) => {
                        recent.note_resent(tokio::time::Instant::now(), from);
                        continue;
                    }
                    Resend::ReadFailed => {
                        s.resync.store(true, Ordering::Relaxed);
                        resync_after = tokio::time::Instant::now() + Duration::from_secs(5);
                        continue;
                    }
                    Resend::Done(None) | Resend::NotAvailable => continue,
                }
            }
            if batch.is_empty() {
                // Wake on new lines; poll now and then to notice a closed connection.
                tokio::select! {
                    _ = s.notify.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                        let now = tokio::time::Instant::now();
                        if now.duration_since(marks_at) >= Duration::from_secs(1) {
                            marks_at = now;
                            s.tick_marks(&mut recent, restart_from, now);
                        }
                        let mut probe = [0u8; 1];
                        match conn.try_read(&mut probe) {
                            Ok(0) => break,
                            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => break,
                            _ => {}
                        }
                    }
                }
                continue;
            }
            let mut buf = Vec::with_capacity(batch.iter().map(|(_, (_, f, _))| f.len()).sum());
            for (_, (_, f, _)) in &batch {
                buf.extend_from_slice(f);
            }
            let res = tokio::time::timeout(Duration::from_secs(5), conn.write_all(&buf)).await;
            if matches!(res, Ok(Ok(()))) {
                s.shipped.fetch_add(batch.len() as u64, Ordering::Relaxed);
                let now = tokio::time::Instant::now();
                for (_, f) in batch {
                    recent.push(f, now);
                }
                if now.duration_since(marks_at) >= Duration::from_secs(1) {
                    marks_at = now;
                    s.tick_marks(&mut recent, restart_from, now);
                }
                continue;
            }
            // Put the batch back (oldest first), within capacity.
            let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
            for (n, f) in batch.into_iter().rev() {
                q.push_front(n, f);
            }
            let lost_frames = q.evict(s.capacity);
            drop(q);
            let lost = s.lost(lost_frames);
            if lost > 0 {
                s.dropped.fetch_add(lost, Ordering::Relaxed);
            }
            break;
        }
        s.connected.store(false, Ordering::Relaxed);
        tracing::warn!(addr = %addr, "lost the log aggregator connection; buffering");
        // A connection that lasted is followed by a quick reconnect; one the aggregator
        // dropped at once (overloaded, misconfigured) by a growing pause.
        if connected_at.elapsed() >= Duration::from_secs(5) {
            backoff = Duration::from_millis(100);
        } else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A drop notice carries no `seq`: it goes out ahead of older queued lines and must not
    /// move the aggregator's cursor past them.
    #[tokio::test]
    async fn drop_notices_carry_no_sequence() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let sh = Shipper::start("h", vec![addr.to_string()], 1);
        let src = Source::new(Some("a"), None, "j");
        for i in 0..3 {
            sh.push(&src, Stream::Stdout, format!("line{i}").as_bytes());
        }
        let notices = sh.shared.dests[0].take_notices();
        assert_eq!(notices.len(), 1);
        let framer = flynn_syslog::Framer::new(flynn_syslog::DEFAULT_MAX_FRAME);
        let mut buf = bytes::BytesMut::from(&notices[0].1[..]);
        let frame = framer.next_frame(&mut buf).unwrap().unwrap();
        let (m, err) = flynn_syslog::Message::parse_checked(frame);
        assert!(err.is_none(), "{err:?}");
        assert!(m.msg().starts_with(b"flynn-host: 2 log lines were dropped"));
        assert_eq!(flynn_syslog::flynn::flynn_seq(m.structured_data()), None);
    }

    #[test]
    fn long_header_fields_are_cut() {
        let long = format!("a b\u{e9}{}", "x".repeat(300));
        let h = Header {
            timestamp: "2009-11-10T23:00:00.123456Z",
            host: "h",
            app: &long,
            procid: &long,
            stream: Stream::Stdout,
            seq: 1,
        };
        let mut out = Vec::new();
        encode(&mut out, &h, b"x");
        let framer = flynn_syslog::Framer::new(flynn_syslog::DEFAULT_MAX_FRAME);
        let mut buf = bytes::BytesMut::from(&out[..]);
        let frame = framer.next_frame(&mut buf).unwrap().unwrap();
        let (m, err) = flynn_syslog::Message::parse_checked(frame);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(m.app_name().len(), MAX_APP);
        assert_eq!(m.procid().len(), MAX_PROCID);
        assert!(m.app_name().starts_with(b"a_b_xxx"), "{:?}", m.app_name());
        assert_eq!(m.msg(), b"x");
    }

    #[test]
    fn encodes_what_the_aggregator_parses() {
        let mut out = Vec::new();
        let ts = now_rfc3339();
        assert_eq!(ts.len(), "2009-11-10T23:00:00.123456Z".len(), "{ts}");
        let src = Source::new(Some("app1"), Some("web"), "host-j1");
        let h = Header {
            timestamp: &ts,
            host: "host",
            app: &src.app,
            procid: &src.procid,
            stream: Stream::Stderr,
            seq: 7,
        };
        encode(&mut out, &h, b"hello world");
        let framer = flynn_syslog::Framer::new(flynn_syslog::DEFAULT_MAX_FRAME);
        let mut buf = bytes::BytesMut::from(&out[..]);
        let frame = framer.next_frame(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        let (m, err) = flynn_syslog::Message::parse_checked(frame);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(m.hostname(), b"host");
        assert_eq!(m.app_name(), b"app1");
        assert_eq!(m.procid(), b"web.host-j1");
        assert_eq!(
            flynn_syslog::Stream::from_msgid(m.msgid()),
            flynn_syslog::Stream::Stderr
        );
        assert_eq!(flynn_syslog::flynn::flynn_seq(m.structured_data()), Some(7));
        assert_eq!(m.msg(), b"hello world");
        assert_eq!((m.facility(), m.severity()), (23, 6));
        let t = m.timestamp().unwrap();
        assert_eq!(t.0 % 1000, 0);

        let src = Source::new(None, None, "j2");
        assert_eq!((src.app.as_str(), src.procid.as_str()), ("j2", "j2"));
    }

    /// Reads framed messages from `c` until `want` is among them (or 10 s): their texts.
    async fn read_until(c: &mut tokio::net::TcpStream, want: &[u8]) -> Vec<Vec<u8>> {
        let framer = flynn_syslog::Framer::new(20_000);
        let mut got = Vec::new();
        let mut msgs = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !msgs.iter().any(|m: &Vec<u8>| m == want) && tokio::time::Instant::now() < deadline {
            let mut b = [0u8; 4096];
            let n = match tokio::time::timeout(Duration::from_secs(10), c.read(&mut b)).await {
                Ok(Ok(n)) if n > 0 => n,
                _ => break,
            };
            got.extend_from_slice(&b[..n]);
            let mut buf = bytes::BytesMut::from(&got[..]);
            msgs.clear();
            while let Ok(Some(f)) = framer.next_frame(&mut buf) {
                msgs.push(flynn_syslog::Message::parse(f).msg().to_vec());
            }
        }
        msgs
    }

    /// A line written just after the aggregator went away reached only the local socket;
    /// it is written again on the next connection (with the lines before it, which the
    /// aggregator ignores as duplicates).
    #[tokio::test]
    async fn lines_in_flight_when_the_aggregator_went_away_are_sent_again() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sh = Shipper::start("h", vec![addr.to_string()], 100);
        let src = Source::new(Some("a"), None, "j");
        let (mut c, _) = listener.accept().await.unwrap();
        sh.push(&src, Stream::Stdout, b"line1");
        let got = read_until(&mut c, b"line1").await;
        assert_eq!(got, [b"line1".to_vec()]);
        // The aggregator goes away; a line is written before the shipper notices.
        drop(c);
        drop(listener);
        sh.push(&src, Stream::Stdout, b"line2");
        let t0 = std::time::Instant::now();
        while sh.stats().shipped < 2 && t0.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            sh.stats().shipped,
            2,
            "line2 was not written to the dead connection"
        );
        // It comes back on the same address.
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        sh.push(&src, Stream::Stdout, b"line3");
        let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let got = read_until(&mut c, b"line3").await;
        assert!(got.contains(&b"line2".to_vec()), "line2 lost: {got:?}");
        let pos = |l: &[u8]| got.iter().position(|m| m == l).unwrap();
        assert!(pos(b"line2") < pos(b"line3"), "{got:?}");
    }

    /// Reads framed messages from `c` until every one of `want` has come (or 10 s): the
    /// texts, in arrival order.
    async fn read_all_of(c: &mut tokio::net::TcpStream, want: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let framer = flynn_syslog::Framer::new(20_000);
        let mut buf = bytes::BytesMut::new();
        let mut msgs: Vec<Vec<u8>> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !want.iter().all(|w| seen.contains(w)) && tokio::time::Instant::now() < deadline {
            let mut b = vec![0u8; 1 << 20];
            let n = match tokio::time::timeout(Duration::from_secs(10), c.read(&mut b)).await {
                Ok(Ok(n)) if n > 0 => n,
                _ => break,
            };
            buf.extend_from_slice(&b[..n]);
            while let Ok(Some(f)) = framer.next_frame(&mut buf) {
                let m = flynn_syslog::Message::parse(f).msg().to_vec();
                seen.insert(m.clone());
                msgs.push(m);
            }
        }
        msgs
    }

    /// A shipper (queue of 5) on `disk`, connected to an aggregator stand-in, its
    /// connect-time resend done (so what comes back later comes by resync).
    async fn connected_shipper(
        disk: Arc<crate::logdisk::DiskLog>,
    ) -> (Shipper, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sh = Shipper::start_with("h", vec![addr.to_string()], Vec::new(), 5, Some(disk));
        let (c, _) = listener.accept().await.unwrap();
        let t0 = std::time::Instant::now();
        while !sh.stats().connected && t0.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(sh.stats().connected);
        (sh, c)
    }

    /// Lines the full queue dropped while the connection is up come again from the disk
    /// log once the queue is drained: all arrive, none counts as dropped, no notice.
    #[tokio::test]
    async fn lines_the_full_queue_drops_come_again_from_the_disk_log() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(crate::logdisk::DiskLog::open(dir.path(), 0).unwrap());
        let (sh, mut c) = connected_shipper(disk).await;
        let src = Source::new(Some("a"), None, "j");
        // Pushed with no await in between: the shipper cannot drain, the queue keeps 5.
        let want: Vec<Vec<u8>> = (0..100).map(|i| format!("line{i}").into_bytes()).collect();
        for w in &want {
            sh.push(&src, Stream::Stdout, w);
        }
        let st = sh.stats();
        assert_eq!((st.lines, st.requeued, st.dropped), (100, 95, 0));
        let got = read_all_of(&mut c, &want).await;
        for w in &want {
            assert!(got.contains(w), "{} missing", String::from_utf8_lossy(w));
        }
        assert!(
            !got.iter().any(|m| m.starts_with(b"flynn-host:")),
            "a drop notice for lines that came back"
        );
        assert_eq!(sh.stats().dropped, 0);
    }

    /// A resync whose disk read fails is tried again after a pause (5 s), without waiting
    /// for another drop: the dropped lines still all arrive, none counts as dropped.
    #[tokio::test]
    async fn a_resync_whose_disk_read_failed_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(crate::logdisk::DiskLog::open(dir.path(), 0).unwrap());
        let t0 = std::time::Instant::now();
        let (sh, mut c) = connected_shipper(disk.clone()).await;
        let src = Source::new(Some("a"), None, "j");
        // The first resync's read fails.
        disk.fail_reads(1);
        let want: Vec<Vec<u8>> = (0..100).map(|i| format!("line{i}").into_bytes()).collect();
        for w in &want {
            sh.push(&src, Stream::Stdout, w);
        }
        assert_eq!(sh.stats().requeued, 95);
        let got = read_all_of(&mut c, &want).await;
        let missing = want.iter().filter(|w| !got.contains(w)).count();
        assert_eq!(missing, 0, "{missing} lines never came");
        assert!(
            t0.elapsed() >= Duration::from_secs(4),
            "came before the retry pause: the read did not fail"
        );
        assert_eq!(sh.stats().dropped, 0);
    }

    /// A connection that breaks while due lines are being resent leaves them due: the next
    /// connection sends them.
    #[tokio::test]
    async fn due_lines_stay_due_when_their_resend_fails() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(crate::logdisk::DiskLog::open(dir.path(), 64 << 20).unwrap());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let sh = Shipper::start_with("h", vec![addr.to_string()], Vec::new(), 5, Some(disk));
        let src = Source::new(Some("a"), None, "j");
        // ~22 MB of lines, so the due resend is more than the sockets take unread.
        let big = "x".repeat(9_000);
        let want: Vec<Vec<u8>> = (0..2_500)
            .map(|i| format!("{i} {big}").into_bytes())
            .collect();
        for w in &want {
            sh.push(&src, Stream::Stdout, w);
        }
        // The shipper takes the lines on its own task: waited for (at most 10 s).
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while sh.stats().requeued < 2_495 && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(sh.stats().requeued, 2_495);
        // First connection: accepted, never read, then reset mid-resend.
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let (c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(c);
        // Second connection: everything arrives.
        let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let got = read_all_of(&mut c, &want).await;
        let missing = want.iter().filter(|w| !got.contains(w)).count();
        assert_eq!(missing, 0, "{missing} lines never came");
        assert_eq!(sh.stats().dropped, 0);
    }

    /// Runs `body` on a runtime of its own, then drops the runtime: its tasks die as with a
    /// killed daemon.
    fn in_killed_daemon<F, Fut>(body: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(body());
        })
        .join()
        .unwrap();
    }

    /// An address nothing listens on now (bound, then closed): an aggregator that is down,
    /// and that a later step of the test brings up on the same address.
    fn down_addr() -> std::net::SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    /// Pushes `lines` on a daemon (queue of 5) whose aggregator at `addr` is down, with its
    /// disk log at `path`, then kills it.
    fn push_in_killed_daemon(
        path: &std::path::Path,
        addr: std::net::SocketAddr,
        lines: Vec<Vec<u8>>,
    ) {
        let path = path.to_path_buf();
        in_killed_daemon(move || async move {
            let disk = Arc::new(crate::logdisk::DiskLog::open(&path, 0).unwrap());
            let sh = Shipper::start_with(
                "h",
                vec![addr.to_string()],
                Vec::new(),
                5,
                Some(disk.clone()),
            );
            let src = Source::new(Some("a"), None, "j");
            for line in &lines {
                sh.push(&src, Stream::Stdout, line);
            }
            let st = sh.stats();
            assert_eq!(st.requeued + st.buffered, lines.len() as u64);
            disk.sync().unwrap();
        });
    }

    /// Starts a shipper on the log at `path` with its aggregator at `addr` (and its API at
    /// `api`), the first `fail_reads` disk reads failing, and returns what the aggregator
    /// gets until `want` came (or 10 s passed).
    async fn restarted_daemon_sends(
        path: &std::path::Path,
        addr: std::net::SocketAddr,
        api: Option<String>,
        want: &[Vec<u8>],
        fail_reads: u32,
    ) -> Vec<Vec<u8>> {
        let disk = Arc::new(crate::logdisk::DiskLog::open(path, 0).unwrap());
        disk.fail_reads(fail_reads);
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let _sh = Shipper::start_with(
            "h",
            vec![addr.to_string()],
            api.into_iter().collect(),
            5,
            Some(disk),
        );
        let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        read_all_of(&mut c, want).await
    }

    fn lines(prefix: &str, n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("{prefix}{i}").into_bytes())
            .collect()
    }

    /// Lines the full queue dropped are sent after a daemon restart that came before their
    /// resend, although the aggregator's cursor is past them: the due range is kept beside
    /// the disk log.
    #[tokio::test]
    async fn due_lines_are_sent_after_a_restart_before_their_resend() {
        let dir = tempfile::tempdir().unwrap();
        let addr = down_addr();
        let want = lines("line", 100);
        // The queue keeps the last 5; the other 95 are due.
        push_in_killed_daemon(dir.path(), addr, want.clone());
        // The aggregator has the last line (the 5 queued ones got there before the
        // restart, say): its cursor is past the 95.
        let mut last = None;
        let log = crate::logdisk::DiskLog::open(dir.path(), 0).unwrap();
        log.read_range(log.start(), None, |chunk| {
            let mut buf = bytes::BytesMut::from(chunk);
            while let Ok(Some(f)) = flynn_syslog::Framer::new(20_000).next_frame(&mut buf) {
                last = Some(f.to_vec());
            }
            true
        })
        .unwrap();
        drop(log);
        let last = last.unwrap();
        let time = String::from_utf8(last.split(|b| *b == b' ').nth(1).unwrap().to_vec()).unwrap();
        let seq = crate::logdisk::key_of(&last).unwrap().1;
        let cursors: flynn_api::logagg::Cursors =
            [("h".to_string(), flynn_api::logagg::Cursor { time, seq })].into();
        let asked = Arc::new(AtomicU64::new(0));
        let asked2 = asked.clone();
        let app = axum::Router::new().route(
            "/cursors",
            axum::routing::get(move || async move {
                asked2.fetch_add(1, Ordering::SeqCst);
                axum::Json(cursors.clone())
            }),
        );
        // Without the unacknowledged mark, a restart without the cursor sends nothing old:
        // only the due mark can bring the 95 back.
        let unacked = format!("unacked-{}.pos", mark_name(&addr.to_string()));
        std::fs::remove_file(dir.path().join(unacked)).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        let got = restarted_daemon_sends(dir.path(), addr, Some(api), &want[..95], 0).await;
        let missing = want[..95].iter().filter(|w| !got.contains(w)).count();
        assert_eq!(missing, 0, "{missing} due lines never came");
        assert_eq!(
            asked.load(Ordering::SeqCst),
            1,
            "the cursor was asked for once"
        );
    }

    /// A daemon killed with lines queued and restarted, with no cursor from the
    /// aggregator, sends the log again from where its unacknowledged frames began, so
    /// the queued lines are not lost; and a daemon killed again soon after it sent them
    /// (they may still have been in flight) leaves them to be sent once more.
    #[tokio::test]
    async fn queued_lines_are_sent_after_a_restart_without_a_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let addr = down_addr();
        let queued = lines("q", 3);
        push_in_killed_daemon(dir.path(), addr, queued.clone());
        // Restarted: the queued lines come, a new line goes out after them, a second
        // passes (the marks are saved), and this daemon is killed too.
        let (path, want) = (dir.path().to_path_buf(), queued.clone());
        in_killed_daemon(move || async move {
            let disk = Arc::new(crate::logdisk::DiskLog::open(&path, 0).unwrap());
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            let sh = Shipper::start_with(
                "h",
                vec![addr.to_string()],
                Vec::new(),
                5,
                Some(disk.clone()),
            );
            let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
                .await
                .unwrap()
                .unwrap();
            sh.push(&Source::new(Some("a"), None, "j"), Stream::Stdout, b"new");
            let mut all = want.clone();
            all.push(b"new".to_vec());
            let got = read_all_of(&mut c, &all).await;
            for w in &all {
                assert!(
                    got.contains(w),
                    "{} missing: {got:?}",
                    String::from_utf8_lossy(w)
                );
            }
            tokio::time::sleep(Duration::from_millis(2500)).await;
            disk.sync().unwrap();
        });
        let got = restarted_daemon_sends(dir.path(), addr, None, &queued, 0).await;
        for w in &queued {
            assert!(
                got.contains(w),
                "{} not sent again: {got:?}",
                String::from_utf8_lossy(w)
            );
        }
    }

    /// A restarted daemon whose disk cannot be read at its first connection keeps the
    /// previous daemon's unacknowledged lines due: they go out once the disk reads again
    /// (the resync retry, 5 s later), not never.
    #[tokio::test]
    async fn a_restart_range_the_disk_could_not_read_is_sent_later() {
        let dir = tempfile::tempdir().unwrap();
        let addr = down_addr();
        let queued = lines("q", 3);
        push_in_killed_daemon(dir.path(), addr, queued.clone());
        let t0 = std::time::Instant::now();
        let got = restarted_daemon_sends(dir.path(), addr, None, &queued, 1).await;
        for w in &queued {
            assert!(
                got.contains(w),
                "{} never sent: {got:?}",
                String::from_utf8_lossy(w)
            );
        }
        assert!(
            t0.elapsed() >= Duration::from_secs(4),
            "sent before the retry pause: the read did not fail"
        );
    }

    /// A log without the mark (written before marks existed) counts as sent: a restart
    /// does not send the host's whole history again.
    #[tokio::test]
    async fn a_log_without_a_mark_is_not_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let addr = down_addr();
        push_in_killed_daemon(dir.path(), addr, lines("old", 2));
        let mark = format!("unacked-{}.pos", mark_name(&addr.to_string()));
        std::fs::remove_file(dir.path().join(mark)).unwrap();
        let disk = Arc::new(crate::logdisk::DiskLog::open(dir.path(), 0).unwrap());
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let sh = Shipper::start_with("h", vec![addr.to_string()], Vec::new(), 5, Some(disk));
        let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        sh.push(&Source::new(Some("a"), None, "j"), Stream::Stdout, b"new");
        let got = read_all_of(&mut c, &[b"new".to_vec()]).await;
        assert_eq!(got, vec![b"new".to_vec()]);
    }

    /// Reads framed messages from `c` until every one of `want` (app, text) has come (or
    /// 20 s): (app, text) of each, in arrival order.
    async fn read_apps_until(
        c: &mut tokio::net::TcpStream,
        want: &[(&str, &[u8])],
    ) -> Vec<(String, Vec<u8>)> {
        let framer = flynn_syslog::Framer::new(20_000);
        let mut buf = bytes::BytesMut::new();
        let mut msgs: Vec<(String, Vec<u8>)> = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let has = |msgs: &[(String, Vec<u8>)]| {
            want.iter()
                .all(|(a, w)| msgs.iter().any(|(b, m)| a == b && m == w))
        };
        while !has(&msgs) && tokio::time::Instant::now() < deadline {
            let mut b = vec![0u8; 1 << 20];
            let n = match tokio::time::timeout(Duration::from_secs(10), c.read(&mut b)).await {
                Ok(Ok(n)) if n > 0 => n,
                _ => break,
            };
            buf.extend_from_slice(&b[..n]);
            while let Ok(Some(f)) = framer.next_frame(&mut buf) {
                let m = flynn_syslog::Message::parse(f);
                msgs.push((
                    String::from_utf8_lossy(m.app_name()).to_string(),
                    m.msg().to_vec(),
                ));
            }
        }
        msgs
    }

    /// While the aggregator is away, a chatty app that overflows the buffer pushes out its
    /// own oldest lines, not a quiet app's: the buffer used to be one FIFO for the whole
    /// host, so app `a`'s output dropped `b`'s line. `a` gets its drop notice, `b` none.
    #[tokio::test]
    async fn a_chatty_app_overflows_the_buffer_with_its_own_lines_only() {
        let addr = down_addr();
        let sh = Shipper::start("h", vec![addr.to_string()], 5);
        let (a, b) = (
            Source::new(Some("a"), None, "ja"),
            Source::new(Some("b"), None, "jb"),
        );
        sh.push(&b, Stream::Stdout, b"quiet");
        for i in 0..20 {
            sh.push(&a, Stream::Stdout, format!("chatty{i}").as_bytes());
        }
        let st = sh.stats();
        assert_eq!((st.lines, st.dropped, st.buffered), (21, 16, 5));
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let notice: &[u8] =
            b"flynn-host: 16 log lines were dropped while the log aggregator was unreachable";
        let got = read_apps_until(
            &mut c,
            &[("b", b"quiet"), ("a", b"chatty19"), ("a", notice)],
        )
        .await;
        let texts: Vec<(&str, String)> = got
            .iter()
            .map(|(a, m)| (a.as_str(), String::from_utf8_lossy(m).to_string()))
            .collect();
        assert!(
            got.contains(&("b".into(), b"quiet".to_vec())),
            "the quiet app's line was pushed out: {texts:?}"
        );
        assert!(got.contains(&("a".into(), notice.to_vec())), "{texts:?}");
        let kept: Vec<_> = got
            .iter()
            .filter(|(app, m)| app == "a" && m.starts_with(b"chatty"))
            .map(|(_, m)| m.clone())
            .collect();
        assert_eq!(kept, lines("chatty", 20)[16..]);
        assert!(
            !got.iter()
                .any(|(app, m)| app == "b" && m.starts_with(b"flynn-host:")),
            "{texts:?}"
        );
    }

    /// The buffer is bounded in bytes too (10,000 lines of 10 KB were 100 MB): over the
    /// byte budget the app holding the most bytes loses its oldest lines, and a quiet app's
    /// short line stays.
    #[tokio::test]
    async fn the_buffer_is_bounded_in_bytes_per_app() {
        let addr = down_addr();
        let cap = Capacity {
            lines: 10_000,
            bytes: MIN_BUFFER_BYTES,
        };
        let sh = Shipper::start("h", vec![addr.to_string()], cap);
        let (a, b) = (
            Source::new(Some("a"), None, "ja"),
            Source::new(Some("b"), None, "jb"),
        );
        sh.push(&b, Stream::Stdout, b"quiet");
        let big = "x".repeat(9_000);
        for i in 0..40 {
            sh.push(&a, Stream::Stdout, format!("{i} {big}").as_bytes());
        }
        let bytes = sh.shared.dests[0].queue.lock().unwrap().bytes;
        assert!(bytes <= MIN_BUFFER_BYTES, "{bytes} bytes buffered");
        let st = sh.stats();
        assert!(st.dropped >= 30, "{st:?}");
        assert_eq!(st.buffered + st.dropped, 41);
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let last = format!("39 {big}");
        let got = read_apps_until(&mut c, &[("b", b"quiet"), ("a", last.as_bytes())]).await;
        assert!(
            got.contains(&("b".into(), b"quiet".to_vec())),
            "the quiet app's line was pushed out"
        );
    }

    /// With the disk log: a chatty app's output during an outage is more than the disk log
    /// keeps, so the quiet app's line is gone from the disk too; the memory buffer kept it
    /// (it used to drop it, and it was lost with a notice).
    #[tokio::test]
    async fn a_quiet_apps_line_outlives_the_disk_log_in_the_buffer() {
        let dir = tempfile::tempdir().unwrap();
        // The least the disk log keeps: 8 MiB.
        let disk = Arc::new(crate::logdisk::DiskLog::open(dir.path(), 0).unwrap());
        let addr = down_addr();
        let sh = Shipper::start_with(
            "h",
            vec![addr.to_string()],
            Vec::new(),
            5,
            Some(disk.clone()),
        );
        let (a, b) = (
            Source::new(Some("a"), None, "ja"),
            Source::new(Some("b"), None, "jb"),
        );
        sh.push(&b, Stream::Stdout, b"quiet");
        let first = disk.start();
        let big = "x".repeat(9_000);
        let n = 1_500;
        for i in 0..n {
            sh.push(&a, Stream::Stdout, format!("{i} {big}").as_bytes());
        }
        disk.sync().unwrap();
        assert!(
            !disk.holds(first),
            "the disk log still holds the quiet line"
        );
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let last = format!("{} {big}", n - 1);
        let got = read_apps_until(&mut c, &[("b", b"quiet"), ("a", last.as_bytes())]).await;
        assert!(
            got.contains(&("b".into(), b"quiet".to_vec())),
            "the quiet app's line was lost"
        );
        assert!(
            !got.iter()
                .any(|(app, m)| app == "b" && m.starts_with(b"flynn-host:")),
            "a drop notice for the quiet app"
        );
    }

    /// Frames the buffer dropped can now lie after frames it kept (a quiet app's): on
    /// reconnect the disk resend goes to the end of what was dropped, not only up to the
    /// queue's first frame (which would send none of them), and every line arrives.
    #[tokio::test]
    async fn lines_dropped_after_a_quiet_apps_queued_line_come_from_the_disk_log() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(crate::logdisk::DiskLog::open(dir.path(), 0).unwrap());
        let addr = down_addr();
        let sh = Shipper::start_with("h", vec![addr.to_string()], Vec::new(), 5, Some(disk));
        let (a, b) = (
            Source::new(Some("a"), None, "ja"),
            Source::new(Some("b"), None, "jb"),
        );
        sh.push(&b, Stream::Stdout, b"quiet");
        let want = lines("chatty", 100);
        for w in &want {
            sh.push(&a, Stream::Stdout, w);
        }
        assert_eq!(sh.stats().requeued, 96);
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let mut all = want.clone();
        all.push(b"quiet".to_vec());
        let got = read_all_of(&mut c, &all).await;
        let missing: Vec<_> = all
            .iter()
            .filter(|w| !got.contains(w))
            .map(|w| String::from_utf8_lossy(w).to_string())
            .collect();
        assert!(missing.is_empty(), "never came: {missing:?}");
        assert!(!got.iter().any(|m| m.starts_with(b"flynn-host:")));
        assert_eq!(sh.stats().dropped, 0);
    }

    /// The queue takes frames in push order across apps, puts a batch back ahead of its
    /// apps' later frames, and finds its first disk position in push order.
    #[test]
    fn the_queue_keeps_push_order_across_apps() {
        let frame = |app: &str, text: &str, pos: Option<u64>| -> Frame {
            (
                Arc::from(app),
                Arc::from(text.as_bytes()),
                pos.map_or(Stored::Nowhere, |offset| {
                    Stored::Disk(crate::logdisk::Pos { seg: 0, offset })
                }),
            )
        };
        let text = |v: &[(u64, Frame)]| -> Vec<String> {
            v.iter()
                .map(|(_, f)| String::from_utf8_lossy(&f.1).to_string())
                .collect()
        };
        let mut q = Queue::default();
        q.push_back(frame("a", "a1", None));
        q.push_back(frame("b", "b1", Some(10)));
        q.push_back(frame("a", "a2", Some(20)));
        q.push_back(frame("c", "c1", Some(30)));
        assert_eq!(q.first_pos().map(|p| p.offset), Some(10));
        let batch = q.take(3);
        assert_eq!(text(&batch), ["a1", "b1", "a2"]);
        q.push_back(frame("a", "a3", Some(40)));
        for (n, f) in batch.into_iter().rev() {
            q.push_front(n, f);
        }
        assert_eq!((q.len(), q.bytes), (5, 10));
        // Over a budget of 2 lines: `a` holds the most, twice; then `a`, `b` and `c` tie at one
        // and the oldest goes.
        let cap = Capacity {
            lines: 2,
            bytes: 1 << 20,
        };
        let evicted: Vec<String> = q
            .evict(cap)
            .iter()
            .map(|f| String::from_utf8_lossy(&f.1).to_string())
            .collect();
        assert_eq!(evicted, ["a1", "a2", "b1"]);
        assert!(q.evict(cap).is_empty(), "within the budget");
        assert_eq!(text(&q.take(10)), ["c1", "a3"]);
        assert_eq!((q.len(), q.bytes, q.apps.len()), (0, 0, 0));
    }

    /// Many apps over the budget: the queue stays within it (each app's frames in order,
    /// its counts in step), the apps holding the most lose their oldest lines and quiet
    /// ones keep theirs, and the apps are looked over once per batch (down to 99 % of the
    /// budget), not on every push past it.
    #[test]
    fn many_apps_over_the_budget_stay_correct() {
        let cap = Capacity {
            lines: 1000,
            bytes: 200_000,
        };
        let mut q = Queue::default();
        let mut evicted = 0;
        let (mut pushes, mut pushed_bytes) = (0, 0);
        // xorshift: a fixed sequence.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let names: Vec<Arc<str>> = (0..500).map(|i| Arc::from(format!("app{i}"))).collect();
        // Quiet apps: one line each, pushed first (the oldest lines of all).
        for name in &names[..10] {
            q.push_back((name.clone(), Arc::from(&b"quiet"[..]), Stored::Nowhere));
        }
        for n in 0..50_000u32 {
            // A few chatty apps and many middling ones, lines of varying size.
            let app = if rand(2) == 0 {
                &names[10 + rand(5)]
            } else {
                &names[15 + rand(485)]
            };
            let len = 1 + rand(600);
            let text = format!("{n:08} {}", "x".repeat(len));
            pushed_bytes += text.len();
            q.push_back((app.clone(), Arc::from(text.as_bytes()), Stored::Nowhere));
            pushes += 1;
            evicted += q.evict(cap).len();
            assert!(q.lines <= cap.lines && q.bytes <= cap.bytes);
        }
        assert_eq!(q.lines + evicted, 10 + pushes);
        let (mut lines, mut bytes) = (0, 0);
        for (app, a) in &q.apps {
            assert!(!a.frames.is_empty(), "{app}: an empty entry");
            assert_eq!(
                a.bytes,
                a.frames.iter().map(|(_, f)| f.1.len()).sum::<usize>()
            );
            assert!(a.frames.iter().all(|(_, f)| f.0 == *app));
            // Each app's frames stay oldest first.
            assert!(a
                .frames
                .iter()
                .zip(a.frames.iter().skip(1))
                .all(|(x, y)| x.0 < y.0));
            lines += a.frames.len();
            bytes += a.bytes;
        }
        assert_eq!((lines, bytes), (q.lines, q.bytes));
        for name in &names[..10] {
            assert_eq!(q.apps[name].frames.len(), 1, "{name} lost its line");
        }
        // Everything comes out, in push order.
        let all = q.take(usize::MAX);
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!((q.lines, q.bytes, q.apps.len()), (0, 0, 0));
        // Batches: at most one look over the apps per 1 % of each budget pushed.
        let batches = pushes / (cap.lines / 100) + pushed_bytes / (cap.bytes / 100) + 2;
        assert!(q.scans <= batches, "{} scans for {pushes} pushes", q.scans);
    }

    #[tokio::test]
    async fn buffers_while_down_then_ships_and_counts_drops() {
        // Reserve a port, then close it: the aggregator is "down".
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let sh = Shipper::start("h", vec![addr.to_string()], 5);
        let src = Source::new(Some("a"), None, "j");
        for i in 0..8 {
            sh.push(&src, Stream::Stdout, format!("line{i}").as_bytes());
        }
        let st = sh.stats();
        assert_eq!((st.lines, st.dropped, st.buffered), (8, 3, 5));
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        // Once the backlog is out, a line longer than MAX_LINE goes as two messages.
        let t0 = std::time::Instant::now();
        while sh.stats().shipped < 6 && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sh.push(&src, Stream::Stdout, &vec![b'x'; MAX_LINE + 50]);
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let framer = flynn_syslog::Framer::new(20_000);
        let mut msgs = Vec::new();
        while msgs.len() < 8 && tokio::time::Instant::now() < deadline {
            let mut b = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "eof after {} bytes", got.len());
            got.extend_from_slice(&b[..n]);
            let mut buf = bytes::BytesMut::from(&got[..]);
            msgs.clear();
            loop {
                match framer.next_frame(&mut buf) {
                    Ok(Some(f)) => msgs.push(flynn_syslog::Message::parse(f).msg().to_vec()),
                    Ok(None) => break,
                    Err(e) => panic!(
                        "framing: {e:?} at {:?}",
                        String::from_utf8_lossy(&buf[..buf.len().min(40)])
                    ),
                }
            }
        }
        assert_eq!(msgs.len(), 8);
        // First a notice in the app's log, then what the buffer kept.
        assert_eq!(
            msgs[0],
            b"flynn-host: 3 log lines were dropped while the log aggregator was unreachable"
        );
        assert_eq!(msgs[1], b"line3");
        assert_eq!(msgs[5], b"line7");
        assert_eq!(msgs[6].len(), MAX_LINE);
        assert_eq!(msgs[7].len(), 50);
        let st = sh.stats();
        assert_eq!((st.shipped, st.dropped, st.buffered), (8, 3, 0));
        assert!(st.connected);
    }
}
