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
//!
//! [`RECENT_FRAMES`]: recent::RECENT_FRAMES
//!
//! The [`Shipper`] and the message format are here; each aggregator's queue is in `queue`,
//! its connection in `connection`, the frames kept for its next connection in `recent`,
//! and what it dropped and the marks kept beside the disk log in `marks`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use flynn_api::host::LogStats;
use tokio::sync::Notify;

mod connection;
mod marks;
mod queue;
mod recent;
#[cfg(test)]
mod tests;

use connection::run;
use marks::{mark_name, Due};
use queue::Queue;

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
