//! The host's log on disk: every framed message the shipper sends, in the order it was
//! queued, in segment files under `<state-dir>/logs`, up to a byte budget (the oldest
//! segments go first). When a connection to an aggregator opens, the shipper asks the
//! aggregator's `/cursors` for this host's position and sends again what the disk holds
//! after it (spec §3.5): lines in flight when an aggregator went away, lines the send
//! queue dropped while it was away, and everything before the daemon restarted.
//!
//! Files are `seg-<n>.log` with `n` increasing, each a run of RFC 6587 octet-counted
//! frames exactly as sent. Each append is one `write` (a crash of the daemon loses nothing
//! it returned from), not fsynced (a power cut loses what the page cache held). A torn
//! frame at the end of the last segment (a crash mid-write) is cut off when the log is
//! opened.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use flynn_syslog::{Framer, Timestamp};

/// A segment is closed and the next one started past this size.
const SEGMENT_BYTES: u64 = 4 << 20;

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

struct Inner {
    segs: VecDeque<Seg>,
    out: Option<BufWriter<File>>,
    total: u64,
}

pub struct DiskLog {
    dir: PathBuf,
    max_bytes: u64,
    inner: Mutex<Inner>,
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

impl DiskLog {
    /// Opens (or creates) the log in `dir`, keeping at most about `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<DiskLog> {
        fs::create_dir_all(dir)?;
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
        let log = DiskLog {
            dir: dir.to_path_buf(),
            max_bytes: max_bytes.max(SEGMENT_BYTES),
            inner: Mutex::new(Inner {
                segs,
                out: None,
                total,
            }),
        };
        Ok(log)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends framed messages (in queue order) with one `write`; each one's position is
    /// pushed onto `at`. Errors are logged by the caller.
    pub fn append<'a>(
        &self,
        frames: impl IntoIterator<Item = &'a [u8]>,
        at: &mut Vec<Pos>,
    ) -> io::Result<()> {
        let mut g = self.lock();
        for f in frames {
            let need_new = match g.segs.back() {
                None => true,
                Some(s) => s.len >= SEGMENT_BYTES || g.out.is_none(),
            };
            if need_new {
                self.rotate(&mut g)?;
            }
            g.out.as_mut().expect("open segment").write_all(f)?;
            let last = g.segs.back_mut().expect("a segment");
            at.push(Pos {
                seg: last.n,
                offset: last.len,
            });
            last.len += f.len() as u64;
            g.total += f.len() as u64;
        }
        Self::flush_locked(&mut g)
    }

    /// Whether the frame at `p` is still in the log (its segment was not dropped).
    pub fn holds(&self, p: Pos) -> bool {
        self.lock().segs.front().is_some_and(|s| s.n <= p.seg)
    }

    /// Continues the last segment if it has room (after a restart), else starts the next
    /// one; then drops the oldest segments beyond the budget.
    fn rotate(&self, g: &mut Inner) -> io::Result<()> {
        Self::flush_locked(g)?;
        let n = match g.segs.back() {
            Some(s) if g.out.is_none() && s.len < SEGMENT_BYTES => s.n,
            Some(s) => s.n + 1,
            None => 0,
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(seg_path(&self.dir, n))?;
        if g.segs.back().is_none_or(|s| s.n != n) {
            g.segs.push_back(Seg { n, len: 0 });
        }
        g.out = Some(BufWriter::with_capacity(64 << 10, file));
        while g.total > self.max_bytes && g.segs.len() > 1 {
            let old = g.segs.pop_front().expect("more than one");
            g.total -= old.len;
            if let Err(e) = fs::remove_file(seg_path(&self.dir, old.n)) {
                tracing::warn!(error = %e, "removing an old segment of the host's log failed");
            }
        }
        Ok(())
    }

    fn flush_locked(g: &mut Inner) -> io::Result<()> {
        match g.out.as_mut() {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }

    /// The segments now, oldest first (flushed first, so they can be read).
    fn segments(&self) -> io::Result<Vec<u64>> {
        let mut g = self.lock();
        Self::flush_locked(&mut g)?;
        Ok(g.segs.iter().map(|s| s.n).collect())
    }

    /// Reads segment `n` (empty if it was removed meanwhile).
    fn read_seg(&self, n: u64) -> io::Result<Vec<u8>> {
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

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
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

        // Past the budget (one segment's worth, the least it keeps) the oldest segments go.
        let big = "x".repeat(9_000);
        let f = frame(10, 10, &big);
        for _ in 0..((2 * SEGMENT_BYTES) / f.len() as u64 + 2) {
            log.append([f.as_slice()], &mut at).unwrap();
        }
        assert!(log.bytes() <= 2 * SEGMENT_BYTES, "{}", log.bytes());
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
