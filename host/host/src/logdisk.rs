//! The host's log on disk: every framed message the shipper sends, in the order it was
//! queued, in segment files under `<state-dir>/logs`, up to a byte budget (the oldest
//! segments go first). When a connection to an aggregator opens, the shipper asks the
//! aggregator's `/cursors` for this host's position and sends again what the disk holds
//! after it (spec §3.5): lines in flight when an aggregator went away, lines the send
//! queue dropped while it was away, and everything before the daemon restarted.
//!
//! Files are `seg-<n>.log` with `n` increasing, each a run of RFC 6587 octet-counted
//! frames exactly as sent. An append only reserves positions (in memory) and hands the
//! bytes to the log's writer thread, so a slow disk never holds up a job's output or the
//! daemon's runtime; readers first wait until the writer has caught up with what was
//! reserved. Not fsynced: a crash loses what the writer had not written yet, a power cut
//! what the page cache held. A torn frame at the end of the last segment (a crash
//! mid-write) is cut off when the log is opened. While the writer is more than
//! [`MAX_PENDING`] bytes behind (a stalled disk), appends are refused rather than queued.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use flynn_syslog::{Framer, Timestamp};

/// A segment is closed and the next one started past this size.
const SEGMENT_BYTES: u64 = 4 << 20;
/// Bytes handed to the writer thread and not written yet beyond which appends are refused.
pub const MAX_PENDING: u64 = 16 << 20;

/// A frame's identity as aggregators see it: its timestamp and the host's sequence number.
pub type Key = (Timestamp, u64);
/// An aggregator's cursor for this host (`None`: it has none).
pub type CursorKey = Option<Key>;

/// Where resending starts: segment number and byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    pub seg: u64,
    pub offset: u64,
}

struct Seg {
    n: u64,
    len: u64,
}

/// What is reserved: the segments as they will be once the writer has caught up.
struct Inner {
    segs: VecDeque<Seg>,
    total: u64,
    tx: mpsc::Sender<Op>,
}

enum Op {
    /// Append `bytes` to segment `seg`; it then ends at `end`.
    Write {
        seg: u64,
        bytes: Vec<u8>,
        end: Pos,
    },
    Remove(u64),
    /// Write (or remove) a mark file (see [`DiskLog::set_mark`]).
    Mark {
        name: String,
        pos: Option<Pos>,
    },
}

/// How far the writer has got.
struct Progress {
    written: Mutex<Pos>,
    /// A write failed and is being tried again (see [`writer`]).
    failed: AtomicBool,
    moved: Condvar,
    pending: AtomicU64,
    /// The log was dropped: a writer stuck retrying gives up.
    closed: AtomicBool,
    /// The last mark write failed (see [`DiskLog::mark_failed`]).
    mark_failed: AtomicBool,
    /// Writes still to fail (tests).
    #[cfg(test)]
    fail_writes: std::sync::atomic::AtomicU32,
    /// Segment reads still to fail (tests).
    #[cfg(test)]
    fail_reads: std::sync::atomic::AtomicU32,
}

pub struct DiskLog {
    dir: PathBuf,
    max_bytes: u64,
    inner: Mutex<Inner>,
    progress: Arc<Progress>,
}

impl Drop for DiskLog {
    fn drop(&mut self) {
        self.progress.closed.store(true, Ordering::Relaxed);
    }
}

fn seg_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("seg-{n:012}.log"))
}

/// The `(message start, message end, frame end)` of each complete frame in `buf`,
/// stopping at the first incomplete or unreadable one.
fn frames(buf: &[u8]) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    // Any length the octet count can state: frames here are ours, not a peer's.
    let framer = Framer::new(99_999);
    let mut at = 0;
    std::iter::from_fn(move || {
        let l = framer.locate(&buf[at..]).ok()??;
        let item = (at + l.start, at + l.end, at + l.consumed);
        at += l.consumed;
        Some(item)
    })
}

/// The (timestamp, seq) of one message, if it has both.
pub fn key_of(msg: &[u8]) -> Option<Key> {
    let m = flynn_syslog::Message::parse(bytes::Bytes::copy_from_slice(msg));
    let seq = flynn_syslog::flynn::flynn_seq(m.structured_data())?;
    Some((m.timestamp()?, seq))
}

/// The writer thread: performs the reserved writes and removals in order, until the log is
/// dropped. A failed write (a full disk, say) is taken back (the segment cut to where it
/// started, so no torn fragment stays) and tried again, at growing intervals up to 5 s, until
/// it succeeds: every reserved position stays valid and the log has no holes. Meanwhile
/// appends are refused (their lines are kept in memory only) and reads fail at once.
fn writer(dir: PathBuf, rx: mpsc::Receiver<Op>, progress: Arc<Progress>) {
    let mut file: Option<(u64, File)> = None;
    for op in rx {
        match op {
            Op::Write { seg, bytes, end } => {
                let start = end.offset - bytes.len() as u64;
                let mut pause = Duration::from_millis(100);
                let mut failures = 0u64;
                // Whether the segment may hold part of a failed attempt: cut before retrying
                // (a write after a fragment would shift every later frame's position).
                let mut cut = false;
                loop {
                    let res = if cut {
                        cut_to(&dir, seg, start)
                    } else {
                        write_seg(&dir, &mut file, seg, &bytes, &progress)
                    };
                    let e = match res {
                        Ok(()) if cut => {
                            cut = false;
                            continue;
                        }
                        Ok(()) => break,
                        Err(e) => e,
                    };
                    if !cut {
                        cut = true;
                        file = None;
                    }
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(100) {
                        tracing::warn!(error = %e, failures, "writing the host's log failed; trying again (lines are kept in memory only meanwhile)");
                    }
                    {
                        // Under the lock readers wait with, so none misses the wake-up.
                        let _w = progress.written.lock().unwrap_or_else(|e| e.into_inner());
                        if !progress.failed.swap(true, Ordering::Relaxed) {
                            progress.moved.notify_all();
                        }
                    }
                    if progress.closed.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                if failures > 0 {
                    tracing::info!(failures, "writing the host's log works again");
                }
                progress
                    .pending
                    .fetch_sub(bytes.len() as u64, Ordering::Relaxed);
                let mut w = progress.written.lock().unwrap_or_else(|e| e.into_inner());
                *w = (*w).max(end);
                progress.failed.store(false, Ordering::Relaxed);
                progress.moved.notify_all();
            }
            Op::Remove(n) => {
                if file.as_ref().is_some_and(|(m, _)| *m == n) {
                    file = None;
                }
                if let Err(e) = fs::remove_file(seg_path(&dir, n)) {
                    tracing::warn!(error = %e, "removing an old segment of the host's log failed");
                }
            }
            Op::Mark { name, pos } => match write_mark(&dir, &name, pos) {
                Ok(()) => progress.mark_failed.store(false, Ordering::Relaxed),
                Err(e) => {
                    if !progress.mark_failed.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %e, mark = %name, "saving a mark of the host's log failed");
                    }
                }
            },
        }
    }
}

/// Cuts segment `seg` to `len` bytes (a missing file is fine: nothing to take back).
fn cut_to(dir: &Path, seg: u64, len: u64) -> io::Result<()> {
    match OpenOptions::new().write(true).open(seg_path(dir, seg)) {
        Ok(f) => f.set_len(len),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes mark `name` (`<dir>/<name>.pos`, replaced whole by a rename), or removes it.
/// Not fsynced, like the log's own writes: it outlives the process, which is what it is
/// for.
fn write_mark(dir: &Path, name: &str, pos: Option<Pos>) -> io::Result<()> {
    let path = dir.join(format!("{name}.pos"));
    match pos {
        None => match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        Some(p) => {
            let tmp = dir.join(format!("{name}.pos.tmp"));
            fs::write(&tmp, format!("{} {}\n", p.seg, p.offset))?;
            fs::rename(&tmp, &path)
        }
    }
}

/// The mark `name` in `dir`, if there is one and it reads.
pub fn read_mark(dir: &Path, name: &str) -> Option<Pos> {
    let text = fs::read_to_string(dir.join(format!("{name}.pos"))).ok()?;
    let mut it = text.split_whitespace();
    let seg = it.next()?.parse().ok()?;
    let offset = it.next()?.parse().ok()?;
    Some(Pos { seg, offset })
}

/// Appends `bytes` to segment `seg`, opening it (kept in `file`) if needed.
fn write_seg(
    dir: &Path,
    file: &mut Option<(u64, File)>,
    seg: u64,
    bytes: &[u8],
    progress: &Progress,
) -> io::Result<()> {
    if file.as_ref().is_none_or(|(n, _)| *n != seg) {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(seg_path(dir, seg))?;
        // The mode applies to a segment it creates; one an older version left 0644 (the
        // segment being appended to across an upgrade) is narrowed.
        {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        *file = Some((seg, f));
    }
    let f = &mut file.as_mut().expect("opened").1;
    #[cfg(test)]
    if progress
        .fail_writes
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
    {
        // Half of it reaches the file, as with a disk that filled up mid-write.
        f.write_all(&bytes[..bytes.len() / 2])?;
        return Err(io::Error::other("injected write failure"));
    }
    #[cfg(not(test))]
    let _ = progress;
    f.write_all(bytes)
}

impl DiskLog {
    /// Opens (or creates) the log in `dir`, keeping at most about `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<DiskLog> {
        crate::private_dir(dir)?;
        let mut ns: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("seg-")?
                    .strip_suffix(".log")?
                    .parse()
                    .ok()
            })
            .collect();
        ns.sort_unstable();
        let mut segs = VecDeque::new();
        let mut total = 0;
        for &n in &ns {
            let len = fs::metadata(seg_path(dir, n))?.len();
            total += len;
            segs.push_back(Seg { n, len });
        }
        // Cut a torn frame off the end of the last segment.
        if let Some(last) = segs.back_mut() {
            let path = seg_path(dir, last.n);
            let buf = fs::read(&path)?;
            let good = frames(&buf).last().map_or(0, |(_, _, end)| end) as u64;
            if good < last.len {
                tracing::warn!(path = %path.display(), cut = last.len - good, "cutting a torn frame off the host's log");
                OpenOptions::new().write(true).open(&path)?.set_len(good)?;
                total -= last.len - good;
                last.len = good;
            }
        }
        let end = segs.back().map_or(Pos { seg: 0, offset: 0 }, |s| Pos {
            seg: s.n,
            offset: s.len,
        });
        let progress = Arc::new(Progress {
            written: Mutex::new(end),
            failed: AtomicBool::new(false),
            moved: Condvar::new(),
            pending: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            mark_failed: AtomicBool::new(false),
            #[cfg(test)]
            fail_writes: Default::default(),
            #[cfg(test)]
            fail_reads: Default::default(),
        });
        let (tx, rx) = mpsc::channel();
        let (d, p) = (dir.to_path_buf(), progress.clone());
        std::thread::Builder::new()
            .name("host-log-writer".into())
            .spawn(move || writer(d, rx, p))?;
        let log = DiskLog {
            dir: dir.to_path_buf(),
            // At least two segments: at a rotation the one just closed stays.
            max_bytes: max_bytes.max(2 * SEGMENT_BYTES),
            inner: Mutex::new(Inner { segs, total, tx }),
            progress,
        };
        Ok(log)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends framed messages (in queue order): reserves their positions, pushed onto `at`,
    /// and hands the bytes to the writer thread. Refused (nothing reserved) while the writer
    /// is more than [`MAX_PENDING`] bytes behind, or while a failed write is being retried.
    pub fn append<'a>(
        &self,
        frames: impl IntoIterator<Item = &'a [u8]>,
        at: &mut Vec<Pos>,
    ) -> io::Result<()> {
        if self.progress.pending.load(Ordering::Relaxed) > MAX_PENDING {
            return Err(io::Error::other(
                "the host's log writer is behind (a slow disk)",
            ));
        }
        if self.progress.failed.load(Ordering::Relaxed) {
            return Err(io::Error::other(
                "the host's log writer is retrying a failed write",
            ));
        }
        let first = at.len();
        let mut g = self.lock();
        let mut ops = Vec::new();
        let mut cur: Option<(u64, Vec<u8>)> = None;
        for f in frames {
            let rotate = match g.segs.back() {
                None => true,
                Some(s) => s.len >= SEGMENT_BYTES,
            };
            if rotate {
                let n = g.segs.back().map_or(0, |s| s.n + 1);
                g.segs.push_back(Seg { n, len: 0 });
                while g.total > self.max_bytes && g.segs.len() > 1 {
                    let old = g.segs.pop_front().expect("more than one");
                    g.total -= old.len;
                    ops.push(Op::Remove(old.n));
                }
            }
            let last = g.segs.back_mut().expect("a segment");
            let p = Pos {
                seg: last.n,
                offset: last.len,
            };
            at.push(p);
            last.len += f.len() as u64;
            g.total += f.len() as u64;
            match &mut cur {
                Some((seg, bytes)) if *seg == p.seg => bytes.extend_from_slice(f),
                _ => {
                    if let Some((seg, bytes)) = cur.take() {
                        ops.push(Self::write_op(seg, bytes, &g));
                    }
                    cur = Some((p.seg, f.to_vec()));
                }
            }
        }
        if let Some((seg, bytes)) = cur.take() {
            ops.push(Self::write_op(seg, bytes, &g));
        }
        for op in ops {
            if let Op::Write { bytes, .. } = &op {
                self.progress
                    .pending
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
            if g.tx.send(op).is_err() {
                // Nothing of this append will be written: its positions are not handed out.
                at.truncate(first);
                return Err(io::Error::other("the host's log writer is gone"));
            }
        }
        Ok(())
    }

    /// A write of `bytes` to segment `seg`, ending where that segment's reservation ends.
    fn write_op(seg: u64, bytes: Vec<u8>, g: &Inner) -> Op {
        let len = g.segs.iter().find(|s| s.n == seg).map_or(0, |s| s.len);
        Op::Write {
            seg,
            bytes,
            end: Pos { seg, offset: len },
        }
    }

    /// Where the next frame will go (or the end of the last segment).
    pub fn end(&self) -> Pos {
        let g = self.lock();
        match g.segs.back() {
            Some(s) => Pos {
                seg: s.n,
                offset: s.len,
            },
            None => Pos { seg: 0, offset: 0 },
        }
    }

    /// Whether the frame at `p` is still in the log (its segment was not dropped).
    pub fn holds(&self, p: Pos) -> bool {
        self.lock().segs.front().is_some_and(|s| s.n <= p.seg)
    }

    /// The segments now, oldest first, once the writer has written all that was reserved
    /// (at most 10 s; a writer that stopped or is stuck leaves reads short).
    fn segments(&self) -> io::Result<Vec<u64>> {
        let (segs, target) = {
            let g = self.lock();
            let target = g.segs.back().map(|s| Pos {
                seg: s.n,
                offset: s.len,
            });
            (g.segs.iter().map(|s| s.n).collect::<Vec<_>>(), target)
        };
        if let Some(target) = target {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let mut w = self
                .progress
                .written
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let failed = || self.progress.failed.load(Ordering::Relaxed);
            while *w < target {
                if failed() {
                    return Err(io::Error::other(
                        "the host's log writer is retrying a failed write",
                    ));
                }
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(io::Error::other("the host's log writer is behind"));
                }
                w = self
                    .progress
                    .moved
                    .wait_timeout(w, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        Ok(segs)
    }

    /// Makes the next `n` segment reads fail, as a disk that returns I/O errors (tests).
    #[cfg(test)]
    pub(crate) fn fail_reads(&self, n: u32) {
        self.progress.fail_reads.store(n, Ordering::Relaxed);
    }

    /// Reads segment `n` (empty if it was removed meanwhile).
    fn read_seg(&self, n: u64) -> io::Result<Vec<u8>> {
        #[cfg(test)]
        if self
            .progress
            .fail_reads
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(io::Error::other("injected read failure"));
        }
        match fs::read(seg_path(&self.dir, n)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            r => r,
        }
    }

    /// Where to resend from for an aggregator whose cursor for this host is `cursor`, and
    /// whether the log still reaches back to it (false: lines between the cursor and the
    /// log's start are gone; never when no segment was ever removed). After the last frame whose key is the cursor; without one
    /// (the cursor's frame left the log, or there is no cursor) at the first frame later
    /// than the cursor, or at the start.
    pub fn resume_point(&self, cursor: Option<Key>) -> io::Result<(Pos, bool)> {
        let segs = self.segments()?;
        let start = Pos {
            seg: segs.first().copied().unwrap_or(0),
            offset: 0,
        };
        let Some(cursor) = cursor else {
            return Ok((start, segs.first().is_none_or(|&n| n == 0)));
        };
        let mut exact = None;
        let mut first_later = None;
        let mut earliest: Option<Key> = None;
        for &n in &segs {
            let buf = self.read_seg(n)?;
            let mut prev_end = 0;
            for (ms, me, end) in frames(&buf) {
                if let Some(k) = key_of(&buf[ms..me]) {
                    earliest.get_or_insert(k);
                    if k == cursor {
                        exact = Some(Pos {
                            seg: n,
                            offset: end as u64,
                        });
                    } else if k > cursor && first_later.is_none() {
                        first_later = Some(Pos {
                            seg: n,
                            offset: prev_end as u64,
                        });
                    }
                }
                prev_end = end;
            }
        }
        // Segment 0 still here: nothing this log ever held has left it.
        let complete = segs.first().is_none_or(|&n| n == 0);
        let reaches = complete || exact.is_some() || earliest.is_some_and(|e| e <= cursor);
        let pos = exact.or(first_later).unwrap_or_else(|| {
            // Nothing later than the cursor: resend nothing (the end).
            let seg = segs.last().copied().unwrap_or(0);
            Pos {
                seg,
                offset: u64::MAX,
            }
        });
        Ok((pos, reaches))
    }

    /// The frames from `from` up to `to` (the position of the first frame not to send: where
    /// the send queue starts; `None`: to the end), segment by segment. Calls `each` with the
    /// bytes of each segment's part; stops early when it returns false.
    pub fn read_range(
        &self,
        from: Pos,
        to: Option<Pos>,
        mut each: impl FnMut(&[u8]) -> bool,
    ) -> io::Result<()> {
        if to.is_some_and(|t| t <= from) {
            return Ok(());
        }
        for n in self.segments()? {
            if n < from.seg {
                continue;
            }
            if to.is_some_and(|t| n > t.seg) {
                break;
            }
            let buf = self.read_seg(n)?;
            let lo = if n == from.seg { from.offset } else { 0 };
            let hi = match to {
                Some(t) if t.seg == n => t.offset,
                _ => u64::MAX,
            };
            let (lo, hi) = (
                lo.min(buf.len() as u64) as usize,
                hi.min(buf.len() as u64) as usize,
            );
            // Whole frames only (a segment being written may end mid-frame for a reader).
            let end = frames(&buf[lo..hi]).last().map_or(lo, |(_, _, e)| lo + e);
            if end > lo && !each(&buf[lo..end]) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Waits until the writer has written everything appended so far (at most 10 s).
    pub fn sync(&self) -> io::Result<()> {
        self.segments().map(drop)
    }

    /// Saves mark `name` (a position, or none) beside the log: handed to the writer thread,
    /// written after everything appended before it. Mark names are the shipper's.
    pub fn set_mark(&self, name: &str, pos: Option<Pos>) {
        let g = self.lock();
        let _ = g.tx.send(Op::Mark {
            name: name.to_string(),
            pos,
        });
    }

    /// Whether the last mark write failed: the caller sends its marks again.
    pub fn mark_failed(&self) -> bool {
        self.progress.mark_failed.load(Ordering::Relaxed)
    }

    /// The mark `name` as written so far (see [`DiskLog::set_mark`]).
    pub fn load_mark(&self, name: &str) -> Option<Pos> {
        read_mark(&self.dir, name)
    }

    /// Removes every mark whose name starts with one of `prefixes` and is not in `keep`
    /// (marks of aggregators no longer configured).
    pub fn remove_marks_except(&self, prefixes: &[&str], keep: &[String]) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(file) = e.file_name().into_string() else {
                continue;
            };
            let Some(name) = file.strip_suffix(".pos") else {
                continue;
            };
            if prefixes.iter().any(|p| name.starts_with(p)) && !keep.iter().any(|k| k == name) {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Where the oldest frame still held starts.
    pub fn start(&self) -> Pos {
        let g = self.lock();
        Pos {
            seg: g.segs.front().map_or(0, |s| s.n),
            offset: 0,
        }
    }

    /// Bytes held now.
    #[cfg(test)]
    fn bytes(&self) -> u64 {
        self.lock().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logship::{encode, Header, Stream};

    fn frame(seq: u64, secs: u64, text: &str) -> Vec<u8> {
        let ts = format!("2026-01-01T00:00:{secs:02}.000000Z");
        let mut out = Vec::new();
        let h = Header {
            timestamp: &ts,
            host: "h1",
            app: "app",
            procid: "web.j1",
            stream: Stream::Stdout,
            seq,
        };
        encode(&mut out, &h, text.as_bytes());
        out
    }

    fn key(seq: u64, secs: u64) -> Key {
        let f = frame(seq, secs, "");
        let (ms, me, _) = frames(&f).next().unwrap();
        key_of(&f[ms..me]).unwrap()
    }

    fn texts(log: &DiskLog, from: Pos, to: Option<Pos>) -> Vec<String> {
        let mut out = Vec::new();
        log.read_range(from, to, |b| {
            for (ms, me, _) in frames(b) {
                let m = flynn_syslog::Message::parse(bytes::Bytes::copy_from_slice(&b[ms..me]));
                out.push(String::from_utf8_lossy(m.msg()).into_owned());
            }
            true
        })
        .unwrap();
        out
    }

    /// A failed write (half of it on disk, as when the disk fills up mid-write) is taken
    /// back and tried again: while it fails, appends are refused and reads fail; once it
    /// succeeds, the log holds every reserved frame once, in order, and takes appends again.
    #[test]
    fn a_failed_write_is_taken_back_and_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let log = DiskLog::open(dir.path(), 0).unwrap();
        let start = log.end();
        let mut at = Vec::new();
        log.append([&frame(1, 1, "one")[..]], &mut at).unwrap();
        log.sync().unwrap();
        log.progress.fail_writes.store(5, Ordering::Relaxed);
        // Reserved before the writer noticed: written once it works again.
        log.append(
            [&frame(2, 2, "two")[..], &frame(3, 3, "three")[..]],
            &mut at,
        )
        .unwrap();
        let t0 = std::time::Instant::now();
        while !log.progress.failed.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(log.append([&frame(4, 4, "refused")[..]], &mut at).is_err());
        assert!(log.sync().is_err(), "a read while the write fails");
        assert_eq!(at.len(), 3);
        // Five failures: 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s of pauses.
        while log.progress.failed.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        log.sync().unwrap();
        log.append([&frame(5, 5, "five")[..]], &mut at).unwrap();
        assert_eq!(texts(&log, start, None), ["one", "two", "three", "five"]);
        assert_eq!(texts(&log, at[1], Some(at[2])), ["two"]);
        drop(log);
        // And the file itself has no fragment: a reopen keeps it whole.
        let log = DiskLog::open(dir.path(), 0).unwrap();
        assert_eq!(texts(&log, start, None), ["one", "two", "three", "five"]);
    }

    #[test]
    fn resumes_after_the_cursor_and_stops_at_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let log = DiskLog::open(dir.path(), 64 << 20).unwrap();
        let fs: Vec<Vec<u8>> = (1..=5).map(|i| frame(i, i, &format!("l{i}"))).collect();
        let mut at = Vec::new();
        log.append(fs.iter().map(|f| f.as_slice()), &mut at)
            .unwrap();
        assert_eq!(at.len(), 5);
        assert!(at.windows(2).all(|w| w[0] < w[1]));
        assert!(at.iter().all(|&p| log.holds(p)));

        // No cursor: everything (nothing was ever removed, so nothing is missing).
        let (p, reaches) = log.resume_point(None).unwrap();
        assert!(reaches);
        assert_eq!(texts(&log, p, None), ["l1", "l2", "l3", "l4", "l5"]);
        // After line 2, up to the queue's first frame (line 5).
        let (p, reaches) = log.resume_point(Some(key(2, 2))).unwrap();
        assert!(reaches);
        assert_eq!(texts(&log, p, Some(at[4])), ["l3", "l4"]);
        // The queue starts before the resume point: nothing.
        assert!(texts(&log, p, Some(at[1])).is_empty());
        // From a position (a dropped frame) on.
        assert_eq!(texts(&log, at[1], Some(at[3])), ["l2", "l3"]);
        // A cursor the log has not got but is within it: the first later frame.
        let (p, reaches) = log.resume_point(Some(key(9, 3))).unwrap();
        assert!(reaches);
        assert_eq!(texts(&log, p, None), ["l4", "l5"]);
        // Older than the log: everything (no gap: the log has all it ever held).
        let (p, reaches) = log.resume_point(Some(key(1, 0))).unwrap();
        assert!(reaches);
        assert_eq!(texts(&log, p, None).len(), 5);
        // At or past the end: nothing.
        let (p, _) = log.resume_point(Some(key(5, 5))).unwrap();
        assert!(texts(&log, p, None).is_empty());
        let (p, _) = log.resume_point(Some(key(1, 59))).unwrap();
        assert!(texts(&log, p, None).is_empty());
    }

    #[test]
    fn survives_reopening_cuts_torn_tails_and_keeps_to_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut at = Vec::new();
        {
            let log = DiskLog::open(dir.path(), 0).unwrap();
            log.append(
                [frame(1, 1, "a").as_slice(), frame(2, 2, "b").as_slice()],
                &mut at,
            )
            .unwrap();
            log.sync().unwrap();
        }
        // A crash mid-write left half a frame.
        let seg = seg_path(dir.path(), 0);
        let half = frame(3, 3, "torn");
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&half[..half.len() / 2]).unwrap();
        drop(f);
        let log = DiskLog::open(dir.path(), 0).unwrap();
        log.append([frame(4, 4, "c").as_slice()], &mut at).unwrap();
        let (p, _) = log.resume_point(None).unwrap();
        assert_eq!(texts(&log, p, None), ["a", "b", "c"]);

        // Past the budget (two segments' worth, the least it keeps) the oldest segments go.
        let big = "x".repeat(9_000);
        let f = frame(10, 10, &big);
        for _ in 0..((3 * SEGMENT_BYTES) / f.len() as u64 + 2) {
            log.append([f.as_slice()], &mut at).unwrap();
        }
        log.sync().unwrap();
        // Two segments' worth (the least it keeps), each closed one frame past its size.
        let most = 2 * SEGMENT_BYTES + 2 * f.len() as u64;
        assert!(log.bytes() <= most, "{} > {most}", log.bytes());
        assert!(!seg.exists(), "the oldest segment was removed");
        assert!(!log.holds(at[0]), "a position in a removed segment");
        assert!(log.holds(*at.last().unwrap()));
        let (p, reaches) = log.resume_point(None).unwrap();
        assert!(texts(&log, p, None).iter().all(|t| t == &big));
        assert!(
            !reaches,
            "lines left the log: an aggregator without a cursor misses them"
        );
        let (_, reaches) = log.resume_point(Some(key(1, 1))).unwrap();
        assert!(!reaches);
    }
}
