//! The Raft log on plain files: append-only segments of checksummed records, with fsync
//! batched across concurrent appends by one writer thread.
//!
//! Record: `len: u32 LE | crc32(payload): u32 LE | payload` where the payload is the JSON
//! entry. Segments are named after their first index. A torn record at the tail of the
//! last segment (a crash mid-write: see [`ParsedSegment::torn`] for how one is told from
//! corruption) is cut off on open, its bytes kept in `<segment>.torn` (up to its last
//! non-zero byte; a copy that cannot be written is only a warning); any other bad
//! record is an error, and so is a hole (entries above the purge point that do not follow
//! one another; appends that would leave one are refused). The open segment is
//! zero-filled ahead of its records ([`PREALLOC`] at a time),
//! so an append overwrites blocks that are already allocated and written and its
//! `fdatasync` has no size or extent change to write: one data write and a cache flush
//! instead of also a synchronous inode write. Zeros to the end of a file are that
//! preallocated space, not a record. Entries are also kept in memory, so reads never touch the disk; an append is
//! visible to readers when `append` returns and reported durable (its `IOFlushed`
//! callback) only after the fsync that covers it has returned.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use openraft::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::store::TypeConfig;

type C = TypeConfig;

/// A segment is closed and a new one started past this size.
const SEGMENT_BYTES: u64 = 16 << 20;
const HEADER: usize = 8;
/// The unit a crash tears a write at, for telling a torn record from a corrupt one
/// ([`ParsedSegment::torn`]).
const SECTOR: usize = 512;
/// The open segment is zero-filled this far ahead of its last record.
const PREALLOC: u64 = 1 << 20;
/// The log writer writes a pending commit point after this long without a batch.
const COMMIT_IDLE: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Default)]
struct Mem {
    entries: BTreeMap<u64, EntryOf<C>>,
    purged: Option<LogIdOf<C>>,
    vote: Option<VoteOf<C>>,
    committed: Option<LogIdOf<C>>,
}

impl Mem {
    /// The index the next append must have: right after the last entry, or after the
    /// purge point when every entry is purged; `None` for an empty log with nothing
    /// purged (its first entry may have any index).
    fn next_index(&self) -> Option<u64> {
        match self.entries.keys().next_back() {
            Some(last) => Some(last.saturating_add(1)),
            None => self.purged.as_ref().map(|p| p.index.saturating_add(1)),
        }
    }
}

/// The error of an append that would leave a hole in the log or overwrite entries
/// without a truncation (openraft's contract rules both out; one that happens anyway is
/// a bug, and a log with a hole would be read as if the entries in it never existed).
fn out_of_sequence(index: u64, next: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("append of log index {index} where {next} is next (a hole or an overwrite)"),
    )
}

struct Inner {
    mem: Mutex<Mem>,
    /// `None` once dropping (see `Drop for Inner`).
    writer: Mutex<Option<mpsc::Sender<Op>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The commit point, one record overwritten in place (see [`CommitFile`]).
    committed: Arc<CommitPoint>,
}

/// The commit point's file and the point waiting to be written to it.
/// Two locks: `save_committed` (on openraft's core) only ever takes `pending`, never one
/// held across the file write.
struct CommitPoint {
    file: Mutex<CommitFile>,
    pending: Mutex<Option<Option<LogIdOf<C>>>>,
}

impl CommitPoint {
    /// Writes the pending point, if any. Errors are logged: a commit point that is not
    /// saved is one the cluster tells the node again.
    fn write_pending(&self) {
        let Some(c) = lock(&self.pending).take() else {
            return;
        };
        if let Err(e) = lock(&self.file).save(&c) {
            tracing::warn!(error = %e, "saving the commit point failed");
        }
    }
}

/// The last handle's drop closes the writer's queue, waits for the writer to finish what
/// was queued (appends, a purge) and exit, and writes a pending commit point: a log opened
/// again on the same directory finds everything the dropped one was given.
impl Drop for Inner {
    fn drop(&mut self) {
        lock(&self.writer).take();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
        self.committed.write_pending();
    }
}

/// The commit point as one checksummed record at offset 0 of `committed`, overwritten in
/// place and never fsynced. openraft saves it after every commit; a temp file and a
/// rename each time (a new inode, writeback started by the rename, the old blocks freed
/// and discarded) cost more CPU than the rest of a follower's append and slowed the log's
/// fsyncs sharing the journal. A torn or stale record is harmless: it reads as "unknown"
/// (or an older point) and the cluster tells the node the commit point again. A record
/// *ahead* of the durable log (saved before this node's own fsync of those entries) is
/// clamped to the log's last entry when the log is opened.
///
/// `save_committed` only records the point ([`CommitPoint::pending`]); the log writer
/// writes it after its next batch's fsync and callbacks, or after [`COMMIT_IDLE`] without
/// a batch (the commit of the last write before a quiet spell), and the last handle's
/// drop writes what is still pending. The write used to run in openraft's core between
/// the commit and the answer to the client, one `pwrite` on every write's path on every
/// node. A point written late is at most [`COMMIT_IDLE`] stale; like one lost in a crash
/// before writeback, it only means a restarted node re-applies fewer entries until the
/// cluster tells it the commit point again.
struct CommitFile {
    file: File,
    buf: Vec<u8>,
    /// `committed.json` of earlier versions, removed after the first save of the record.
    legacy: Option<PathBuf>,
}

impl CommitFile {
    const NAME: &'static str = "committed";
    /// The JSON file of earlier versions, read when there is no record yet.
    const LEGACY: &'static str = "committed.json";

    fn open(dir: &Path) -> io::Result<(CommitFile, Option<LogIdOf<C>>)> {
        let path = dir.join(Self::NAME);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let legacy = dir.join(Self::LEGACY);
        let committed = if bytes.is_empty() {
            // Like a torn record: an unreadable point is one the cluster tells the node
            // again, never a reason not to start.
            match read_json::<Option<LogIdOf<C>>>(&legacy) {
                Ok(c) => c.flatten(),
                Err(e) => {
                    tracing::warn!(path = %legacy.display(), error = %e, "unreadable commit point ignored");
                    None
                }
            }
        } else {
            match decode_record::<Option<LogIdOf<C>>>(&bytes) {
                Some(c) => c,
                None => {
                    tracing::warn!(path = %path.display(), "unreadable commit point ignored");
                    None
                }
            }
        };
        let buf = Vec::with_capacity(128);
        let legacy = legacy.exists().then_some(legacy);
        Ok((CommitFile { file, buf, legacy }, committed))
    }

    fn save(&mut self, committed: &Option<LogIdOf<C>>) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.buf.clear();
        self.buf.extend_from_slice(&[0; HEADER]);
        serde_json::to_writer(&mut self.buf, committed).map_err(io::Error::other)?;
        let len = (self.buf.len() - HEADER) as u32;
        let crc = crc32fast::hash(&self.buf[HEADER..]);
        self.buf[..4].copy_from_slice(&len.to_le_bytes());
        self.buf[4..HEADER].copy_from_slice(&crc.to_le_bytes());
        self.file.write_all_at(&self.buf, 0)?;
        if let Some(legacy) = self.legacy.take() {
            match fs::remove_file(&legacy) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    tracing::warn!(path = %legacy.display(), error = %e, "removing the old commit point failed");
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Decodes one `len | crc | payload` record at the start of `bytes` (trailing bytes,
/// left by a longer earlier record, are ignored); `None` when it is torn or corrupt.
fn decode_record<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(bytes.get(4..HEADER)?.try_into().ok()?);
    let payload = bytes.get(HEADER..HEADER.checked_add(len)?)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    serde_json::from_slice(payload).ok()
}

/// Puts the calling thread (the log writer) under `SCHED_BATCH` (when not niced), so waking it
/// does not preempt the thread that woke it. A leader's Raft core wakes the writer with a
/// new entry and then sends that entry to the followers; on a busy CPU the writer took the
/// CPU at once and the sends waited for its `pwrite` and the start of its `fdatasync`,
/// although the commit waits for a follower's answer, which takes longer than the leader's
/// own flush. Once running, the writer is scheduled like any other thread. A failure is
/// ignored: it only orders two runnable threads.
fn batch_scheduling() {
    use thread_priority::unix::{
        set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
        ThreadSchedulePolicy,
    };
    use thread_priority::{ThreadPriority, ThreadPriorityOsValue};
    // The call also sets the thread's nice value (to 0 here): under a niced service
    // manager that would raise the writer above the rest of the node, so a niced process
    // keeps the default policy.
    if thread_nice() != Some(0) {
        return;
    }
    let policy = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);
    let nice_0 = ThreadPriority::Os(ThreadPriorityOsValue::default());
    if let Err(e) = set_thread_priority_and_policy(thread_native_id(), nice_0, policy) {
        tracing::debug!(error = ?e, "the log writer's scheduling policy was not changed");
    }
}

/// The calling thread's nice value (`/proc/thread-self/stat`, field 19).
fn thread_nice() -> Option<i32> {
    let stat = fs::read_to_string("/proc/thread-self/stat").ok()?;
    // Fields after the command's closing parenthesis start at field 3.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19 - 3)?.parse().ok()
}

/// The log store handle; cheap to clone (it is also its own reader).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

enum Op {
    Append {
        records: Vec<(u64, Vec<u8>)>,
        done: IOFlushed<C>,
    },
    /// Keep entries with index <= `keep`; `None` removes all.
    Truncate {
        keep: Option<u64>,
        done: tokio::sync::oneshot::Sender<io::Result<()>>,
    },
    /// Record the purge point durably, then delete whole segments with every index <= it
    /// (on the writer: `purge` is called from openraft's core, whose thread must not wait
    /// for an fsync).
    Purge { log_id: LogIdOf<C> },
    /// Make every append queued before it durable (fsync, callbacks), then write the vote
    /// durably. Votes go through the writer because openraft orders I/O by vote first: a
    /// vote reported saved counts as flushing every earlier append of an older term, so
    /// it must not be saved while such an append still waits for its fsync.
    Vote {
        vote: VoteOf<C>,
        done: tokio::sync::oneshot::Sender<io::Result<()>>,
    },
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes `value` as JSON to `path` atomically and durably (tmp file, fsync, rename,
/// fsync of the directory).
pub(crate) fn write_atomic<T: Serialize>(path: &Path, value: &T, durable: bool) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        if durable {
            f.sync_all()?;
        }
    }
    fs::rename(&tmp, path)?;
    if durable {
        if let Some(parent) = path.parent() {
            File::open(parent)?.sync_all()?;
        }
    }
    Ok(())
}

/// Creates `dir` and its missing parents like `fs::create_dir_all`, durably: the parent of
/// every directory it creates is fsynced (a new directory is an entry in its parent, which
/// a crash could lose along with everything fsynced under it). Returns the directories
/// fsynced, outermost first.
pub(crate) fn create_dir_durable(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(p) = at.filter(|p| !p.as_os_str().is_empty()) {
        if p.try_exists()? {
            break;
        }
        missing.push(p);
        at = p.parent();
    }
    fs::create_dir_all(dir)?;
    let mut synced = Vec::new();
    for created in missing.iter().rev() {
        let parent = created.parent().unwrap_or(Path::new(""));
        sync_dir(parent)?;
        synced.push(parent.to_path_buf());
    }
    Ok(synced)
}

pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// One entry as a log record: `len | crc32 | JSON`.
pub fn encode(entry: &EntryOf<C>) -> io::Result<Vec<u8>> {
    let payload = serde_json::to_vec(entry).map_err(io::Error::other)?;
    let mut rec = Vec::with_capacity(HEADER + payload.len());
    rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    rec.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    rec.extend_from_slice(&payload);
    Ok(rec)
}

struct Segment {
    first: u64,
    path: PathBuf,
    /// File offset of each record; record i holds index `first + i`.
    offsets: Vec<u64>,
    len: u64,
}

impl Segment {
    fn next_index(&self) -> u64 {
        self.first + self.offsets.len() as u64
    }
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

/// What [`parse_segment`] found in a segment's bytes.
#[derive(Debug)]
pub struct ParsedSegment {
    /// The good records' entries, in order; entry `i` has index `first + i`.
    pub entries: Vec<EntryOf<C>>,
    /// Byte offset of each good record.
    pub offsets: Vec<u64>,
    /// Where the good records end.
    pub end: usize,
    /// Why parsing stopped short of the end of the bytes; `None` when it reached the end
    /// or preallocated zeros.
    pub bad: Option<&'static str>,
    /// Whether the bad record looks like a write a crash cut short (etcd's rule for its
    /// WAL): it runs past the end of the bytes, or its header is all zeros, or its bytes
    /// within some [`SECTOR`] (512 bytes at a file offset that is a multiple of 512) are
    /// all zeros, counting only a sector that holds some of its payload. The open segment
    /// is zero-filled ahead of its records, so a sector the crash kept from the disk reads
    /// as zeros (and a size change that did not reach it as the end of the file). Anything
    /// else (a checksum mismatch over written bytes, a record that does not decode or is
    /// out of sequence) is corruption. False when `bad` is `None`.
    ///
    /// The rule cannot tell every case. A bit flip that enlarges the length field of a
    /// record in the last segment makes the record reach the zeros after the last one: it
    /// reads as torn, and the acknowledged entries after it are cut (their bytes stay in
    /// the `.torn` copy). A crash that kept from the disk only the sector holding the first
    /// header bytes of a record that starts in a sector's last 7 bytes reads as corruption
    /// (the open fails): a piece of header alone is not counted, as a length's low bytes
    /// are zeros often enough to pass a corrupt record off as torn.
    pub torn: bool,
}

/// [`ParsedSegment::torn`] for the bad record at `pos` of a segment's bytes `buf`.
fn looks_torn(buf: &[u8], pos: usize) -> bool {
    let rest = &buf[pos..];
    if rest.len() < HEADER || rest[..HEADER].iter().all(|b| *b == 0) {
        return true;
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let Some(rec) = HEADER.checked_add(len).and_then(|end| rest.get(..end)) else {
        return true; // runs past the end
    };
    // The record's bytes split where the file's sectors start. A piece counts only when it
    // holds a payload byte: a record starting in a sector's last bytes (`pos % 512 >= 509`)
    // has a first piece of length bytes alone, and a length's low bytes are zeros often
    // enough (1 record in 256 at `pos % 512 == 511`) that about one corrupt record in 131k
    // was read as torn and cut. The header's all-zero case is taken above.
    let mut at = 0;
    while at < rec.len() {
        let n = (SECTOR - (pos + at) % SECTOR).min(rec.len() - at);
        if at + n > HEADER && rec[at..at + n].iter().all(|b| *b == 0) {
            return true;
        }
        at += n;
    }
    false
}

/// Parses a segment's bytes (records of indexes `first`, `first + 1`, ...). Never fails:
/// it stops at the first record that is short, fails its checksum, does not decode or is
/// out of sequence, and says why. Pure, so the fuzz target drives it directly.
pub fn parse_segment(buf: &[u8], first: u64) -> ParsedSegment {
    let mut pos = 0usize;
    let mut offsets = Vec::new();
    let mut entries = Vec::new();
    let bad = loop {
        if pos == buf.len() {
            break None;
        }
        if buf[pos..].iter().all(|b| *b == 0) {
            // Preallocated space (see the module docs).
            break None;
        }
        if buf.len() - pos < HEADER {
            break Some("short header");
        }
        let len = u32::from_le_bytes(buf[pos..pos + 4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(buf[pos + 4..pos + 8].try_into().unwrap_or_default());
        if buf.len() - pos - HEADER < len {
            break Some("short record");
        }
        let payload = &buf[pos + HEADER..pos + HEADER + len];
        if crc32fast::hash(payload) != crc {
            break Some("checksum mismatch");
        }
        let entry: EntryOf<C> = match serde_json::from_slice(payload) {
            Ok(e) => e,
            Err(_) => break Some("undecodable record"),
        };
        if entry.index() != first.wrapping_add(offsets.len() as u64) {
            break Some("index out of sequence");
        }
        offsets.push(pos as u64);
        entries.push(entry);
        pos += HEADER + len;
    };
    ParsedSegment {
        entries,
        offsets,
        end: pos,
        torn: bad.is_some() && looks_torn(buf, pos),
        bad,
    }
}

/// Reads a segment; returns its entries and segment description. A torn record (see
/// [`ParsedSegment::torn`]) in the last segment is cut off with everything after it (the
/// file is truncated there, the cut bytes kept in `<segment>.torn` first when that copy
/// can be made, see [`keep_torn`]); any other bad
/// record is an `InvalidData` error naming the file and offset: entries past it were
/// fsynced and acknowledged, and cutting them would silently lose committed writes.
fn read_segment(path: &Path, first: u64, last: bool) -> io::Result<(Segment, Vec<EntryOf<C>>)> {
    let mut buf = Vec::new();
    File::open(path)?.read_to_end(&mut buf)?;
    let ParsedSegment {
        entries,
        offsets,
        end: pos,
        bad,
        torn,
    } = parse_segment(&buf, first);
    if let Some(why) = bad {
        if !last || !torn {
            let what = if last {
                "not a torn write: the log is corrupt"
            } else {
                "in a closed segment: the log is corrupt"
            };
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {why} at offset {pos} ({what})", path.display()),
            ));
        }
        // The copy is for a later look only: the torn bytes were never acknowledged, so a
        // copy that cannot be made (no space, an I/O error, a read-only directory, every
        // name taken) is a warning and the cut goes ahead; a node that cannot start over
        // it would be down for a file nothing needs.
        match keep_torn(path, torn_tail(&buf[pos..])) {
            Ok(kept) => tracing::warn!(
                path = %path.display(),
                offset = pos,
                why,
                kept = %kept.display(),
                "cutting torn log tail"
            ),
            Err(e) => tracing::warn!(
                path = %path.display(),
                offset = pos,
                why,
                error = %e,
                "cutting torn log tail; its bytes could not be kept"
            ),
        }
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(pos as u64)?;
        f.sync_all()?;
    }
    let seg = Segment {
        first,
        path: path.to_path_buf(),
        offsets,
        len: pos as u64,
    };
    Ok((seg, entries))
}

/// What of a torn tail (`rest`: the segment from the bad record on) is worth keeping: up to
/// its last non-zero byte. The rest is the preallocated zeros ([`PREALLOC`], 1 MiB), which
/// every copy used to carry. Everything non-zero is kept, the records after the torn one
/// included (a crash mid-batch may have written them; and a record whose length field a
/// bit flip enlarged reads as torn, with acknowledged entries after it): at most the
/// segment's records, which the file holds anyway.
fn torn_tail(rest: &[u8]) -> &[u8] {
    let end = rest.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    &rest[..end]
}

/// Copies kept per segment: `<segment>.torn`, then `.torn.1` up to `.torn.{MAX_TORN - 1}`.
/// A cut past them keeps no copy (a segment torn again and again, say by a disk that
/// keeps failing, would otherwise fill the directory); they go with their segment's purge.
const MAX_TORN: usize = 4;

/// The `n`th name [`keep_torn`] uses for segment `path`'s copies.
fn torn_path(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    match n {
        0 => name.push(".torn"),
        n => name.push(format!(".torn.{n}")),
    }
    PathBuf::from(name)
}

/// Copies the bytes a torn tail cut removes from segment `path` to `<segment>.torn` (or
/// `.torn.1`, ... when an earlier cut left one, at most [`MAX_TORN`] names), durably, for
/// a later look at what was lost. Returns the file's path; an error when every name is
/// taken or the copy fails (a copy that fails part-way is removed).
fn keep_torn(path: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
    let dir = path.parent().unwrap_or(Path::new("."));
    for n in 0..MAX_TORN {
        let kept = torn_path(path, n);
        let mut f = match OpenOptions::new().write(true).create_new(true).open(&kept) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        };
        let written = f.write_all(bytes).and_then(|()| f.sync_all());
        if let Err(e) = written {
            drop(f);
            let _ = fs::remove_file(&kept);
            return Err(e);
        }
        sync_dir(dir)?;
        return Ok(kept);
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{MAX_TORN} copies of torn tails of this segment are kept already"),
    ))
}

/// Removes the copies [`keep_torn`] made of segment `path`'s torn tails (with the segment,
/// at a purge). A failure is only logged: the copies are for a later look, nothing reads
/// them.
fn remove_torn(path: &Path) {
    for n in 0..MAX_TORN {
        let kept = torn_path(path, n);
        match fs::remove_file(&kept) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(path = %kept.display(), error = %e, "removing a torn tail's copy failed");
            }
            _ => {}
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

struct Writer {
    dir: PathBuf,
    committed: Arc<CommitPoint>,
    segments: Vec<Segment>,
    /// The last segment, open for writing.
    file: Option<File>,
    /// Size of `file`: its records, then zeros.
    allocated: u64,
    zeros: Vec<u8>,
    /// The purge point's index, as last saved.
    purged: Option<u64>,
    /// The index the next append must have ([`Mem::next_index`], kept the same way).
    next: Option<u64>,
}

impl Writer {
    fn open_last(&mut self) -> io::Result<()> {
        self.file = match self.segments.last() {
            Some(s) => Some(OpenOptions::new().write(true).open(&s.path)?),
            None => None,
        };
        self.allocated = match &self.file {
            Some(f) => f.metadata()?.len(),
            None => 0,
        };
        Ok(())
    }

    /// Zero-fills the open segment up to `PREALLOC` past `need` when `need` would run
    /// past its end. The zeros reach the disk with the next fsync of the batch.
    fn preallocate(&mut self, need: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if need <= self.allocated {
            return Ok(());
        }
        let Some(f) = &self.file else {
            return Ok(());
        };
        let target = need + PREALLOC;
        if self.zeros.is_empty() {
            self.zeros = vec![0; PREALLOC as usize];
        }
        while self.allocated < target {
            let n = (target - self.allocated).min(PREALLOC) as usize;
            f.write_all_at(&self.zeros[..n], self.allocated)?;
            self.allocated += n as u64;
        }
        Ok(())
    }

    fn new_segment(&mut self, first: u64) -> io::Result<()> {
        if let Some(f) = self.file.take() {
            // A closed segment keeps no preallocated tail.
            if let Some(last) = self.segments.last() {
                f.set_len(last.len)?;
            }
            f.sync_all()?;
        }
        let path = segment_path(&self.dir, first);
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        File::open(&self.dir)?.sync_all()?;
        self.segments.push(Segment {
            first,
            path,
            offsets: Vec::new(),
            len: 0,
        });
        self.file = Some(f);
        self.allocated = 0;
        Ok(())
    }

    fn append(&mut self, index: u64, rec: &[u8]) -> io::Result<()> {
        // `LogStore::append` checked the same: this is the durable log's own guard.
        if let Some(next) = self.next {
            if index != next {
                return Err(out_of_sequence(index, next));
            }
        }
        // A new segment also when the last one does not end right before `index`: it is
        // empty (a crash right after it was created) or every entry is purged.
        let start_new = match self.segments.last() {
            None => true,
            Some(s) => s.len >= SEGMENT_BYTES || s.next_index() != index,
        };
        if start_new {
            self.new_segment(index)?;
        }
        let at = self.segments.last().map_or(0, |s| s.len);
        self.preallocate(at + rec.len() as u64)?;
        let f = self
            .file
            .as_ref()
            .ok_or_else(|| io::Error::other("no open segment"))?;
        std::os::unix::fs::FileExt::write_all_at(f, rec, at)?;
        let seg = self
            .segments
            .last_mut()
            .ok_or_else(|| io::Error::other("no segment"))?;
        seg.offsets.push(seg.len);
        seg.len += rec.len() as u64;
        self.next = Some(index.saturating_add(1));
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        match &self.file {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }

    fn truncate(&mut self, keep: Option<u64>) -> io::Result<()> {
        let mut changed_dir = false;
        while let Some(seg) = self.segments.last_mut() {
            let first_gone = keep.map_or(0, |k| k + 1);
            if seg.first >= first_gone {
                self.file = None;
                fs::remove_file(&seg.path)?;
                self.segments.pop();
                changed_dir = true;
                continue;
            }
            if first_gone < seg.next_index() {
                if changed_dir {
                    // The removals first, durable before the kept segment is cut, so a
                    // crash cannot bring back a later segment behind a shortened one.
                    File::open(&self.dir)?.sync_all()?;
                    changed_dir = false;
                }
                let n = (first_gone - seg.first) as usize;
                let at = seg.offsets[n];
                let f = OpenOptions::new().write(true).open(&seg.path)?;
                f.set_len(at)?;
                f.sync_all()?;
                // Only once the file is cut: a failed cut leaves the records where they are.
                seg.offsets.truncate(n);
                seg.len = at;
            }
            break;
        }
        if changed_dir {
            File::open(&self.dir)?.sync_all()?;
        }
        // As `Mem::next_index` after the same truncation.
        let floor = self.purged.map(|p| p.saturating_add(1));
        self.next = match keep {
            None => floor,
            Some(k) => self
                .next
                .map(|n| n.min(k.saturating_add(1)).max(floor.unwrap_or(0))),
        };
        self.open_last()
    }

    fn purge(&mut self, upto: u64) -> io::Result<()> {
        while let Some(s) = self.segments.first() {
            // An empty segment (a crash right after it was created) goes too unless it is
            // the open one: left in front it would stop every later purge.
            let empty_behind = s.offsets.is_empty() && self.segments.len() > 1;
            if !empty_behind && (s.offsets.is_empty() || s.next_index() - 1 > upto) {
                break;
            }
            fs::remove_file(&s.path)?;
            remove_torn(&s.path);
            self.segments.remove(0);
            if self.segments.is_empty() {
                self.file = None;
            }
        }
        Ok(())
    }

    fn run(mut self, rx: mpsc::Receiver<Op>) {
        let mut pending: Vec<IOFlushed<C>> = Vec::new();
        let mut failed: Option<String> = None;
        loop {
            let op = match rx.recv_timeout(COMMIT_IDLE) {
                Ok(op) => op,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // No batch since: a commit point recorded after the last one (the
                    // write that ended a burst) is written now.
                    self.committed.write_pending();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = vec![op];
            while let Ok(op) = rx.try_recv() {
                batch.push(op);
            }
            for op in batch {
                match op {
                    Op::Append { records, done } => {
                        if failed.is_none() {
                            for (idx, rec) in &records {
                                if let Err(e) = self.append(*idx, rec) {
                                    failed = Some(e.to_string());
                                    break;
                                }
                            }
                        }
                        pending.push(done);
                    }
                    Op::Truncate { keep, done } => {
                        self.flush(&mut pending, &mut failed);
                        let r = match &failed {
                            Some(e) => Err(io::Error::other(e.clone())),
                            None => self.truncate(keep),
                        };
                        // A truncation that failed part-way leaves the files in a state the
                        // writer no longer knows: every later append and vote fails, as
                        // after a failed write.
                        if let (Err(e), None) = (&r, &failed) {
                            tracing::error!(error = %e, "log truncation failed");
                            failed = Some(format!("truncating the log: {e}"));
                        }
                        let _ = done.send(r);
                    }
                    Op::Purge { log_id } => {
                        // Segments go only once the point is durable: a crash in between
                        // leaves entries the point says are purged, never the reverse.
                        match write_atomic(&self.dir.join("purged.json"), &log_id, true) {
                            // openraft was told the purge is done and may append past a
                            // gap (after a snapshot): a log on disk with the old point
                            // would have a hole. Every later append and vote fails, as
                            // after a failed write.
                            Err(e) if failed.is_none() => {
                                tracing::error!(error = %e, "saving the purge point failed");
                                failed = Some(format!("saving the purge point: {e}"));
                            }
                            Err(_) => {}
                            Ok(()) => {
                                // As `Mem::next_index` after the same purge.
                                let after = log_id.index.saturating_add(1);
                                self.next = Some(self.next.map_or(after, |n| n.max(after)));
                                self.purged = Some(log_id.index);
                                if let Err(e) = self.purge(log_id.index) {
                                    tracing::warn!(error = %e, "log purge failed");
                                }
                            }
                        }
                    }
                    Op::Vote { vote, done } => {
                        self.flush(&mut pending, &mut failed);
                        let r = match &failed {
                            Some(e) => Err(io::Error::other(e.clone())),
                            None => write_atomic(&self.dir.join("vote.json"), &vote, true),
                        };
                        let _ = done.send(r);
                    }
                }
            }
            self.flush(&mut pending, &mut failed);
            // After the batch's callbacks: off the path of the appends just made durable.
            self.committed.write_pending();
        }
    }

    /// One fsync for every append since the last; then their callbacks.
    fn flush(&mut self, pending: &mut Vec<IOFlushed<C>>, failed: &mut Option<String>) {
        if pending.is_empty() {
            return;
        }
        if failed.is_none() {
            if let Err(e) = self.sync() {
                *failed = Some(e.to_string());
            }
        }
        for cb in pending.drain(..) {
            match failed {
                None => cb.io_completed(Ok(())),
                Some(e) => cb.io_completed(Err(io::Error::other(e.clone()))),
            }
        }
    }
}

impl LogStore {
    /// Opens (or creates) the log in `dir`, recovering entries, vote and purge point.
    pub fn open(dir: &Path) -> io::Result<LogStore> {
        create_dir_durable(dir)?;
        let (commit_file, committed) = CommitFile::open(dir)?;
        let mut mem = Mem {
            vote: read_json(&dir.join("vote.json"))?,
            purged: read_json(&dir.join("purged.json"))?,
            committed,
            ..Mem::default()
        };
        let mut firsts: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        firsts.sort_unstable();
        let purged_idx = mem.purged.as_ref().map(|l| l.index);
        let mut segments = Vec::new();
        // Every entry past the purge point follows the one before it (and the first one
        // the purge point): a hole would read as entries that never existed.
        let mut next = purged_idx.map(|p| p.saturating_add(1));
        for (i, first) in firsts.iter().enumerate() {
            let last = i + 1 == firsts.len();
            let path = segment_path(dir, *first);
            let (seg, entries) = read_segment(&path, *first, last)?;
            for e in entries {
                if purged_idx.is_some_and(|p| e.index() <= p) {
                    continue;
                }
                if let Some(n) = next.filter(|n| *n != e.index()) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{}: log index {} where {n} was expected (a hole in the log; purged up to {purged_idx:?})",
                            path.display(),
                            e.index()
                        ),
                    ));
                }
                next = Some(e.index().saturating_add(1));
                mem.entries.insert(e.index(), e);
            }
            segments.push(seg);
        }
        // The commit point is saved as soon as the cluster commits, possibly before this
        // node's own fsync of those entries (openraft allows committed > flushed), so after
        // a crash it may name entries that never reached the disk. The durable log is a
        // prefix of the committed chain (truncations are durable before they return), so
        // its last entry is committed: clamp there, or openraft refuses to start.
        let last = mem
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id())
            .or(mem.purged);
        if mem.committed.as_ref().map(|c| c.index) > last.as_ref().map(|l| l.index) {
            tracing::warn!(committed = ?mem.committed, last = ?last, "commit point ahead of the durable log; clamped");
            mem.committed = last;
        }
        let committed = Arc::new(CommitPoint {
            file: Mutex::new(commit_file),
            pending: Mutex::new(None),
        });
        let mut writer = Writer {
            dir: dir.to_path_buf(),
            committed: committed.clone(),
            segments,
            file: None,
            allocated: 0,
            zeros: Vec::new(),
            purged: purged_idx,
            next: mem.next_index(),
        };
        writer.open_last()?;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || {
                batch_scheduling();
                writer.run(rx)
            })?;
        Ok(LogStore {
            inner: Arc::new(Inner {
                mem: Mutex::new(mem),
                writer: Mutex::new(Some(tx)),
                thread: Mutex::new(Some(thread)),
                committed,
            }),
        })
    }

    fn send(&self, op: Op) -> io::Result<()> {
        lock(&self.inner.writer)
            .as_ref()
            .ok_or_else(|| io::Error::other("log writer stopped"))?
            .send(op)
            .map_err(|_| io::Error::other("log writer stopped"))
    }

    /// The index of the last entry in the log (0 when empty).
    pub fn last_index(&self) -> u64 {
        let mem = lock(&self.inner.mem);
        mem.entries
            .keys()
            .next_back()
            .copied()
            .or(mem.purged.as_ref().map(|p| p.index))
            .unwrap_or(0)
    }
}

impl RaftLogReader<C> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<C>>, io::Error> {
        let mem = lock(&self.inner.mem);
        Ok(mem.entries.range(range).map(|(_, e)| e.clone()).collect())
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<C>>, io::Error> {
        Ok(lock(&self.inner.mem).vote)
    }
}

impl RaftLogStorage<C> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let mem = lock(&self.inner.mem);
        let last = mem
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id())
            .or_else(|| mem.purged);
        Ok(LogState {
            last_purged_log_id: mem.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        // Through the writer, after the appends queued before it are durable (see Op::Vote).
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Op::Vote {
            vote: *vote,
            done: tx,
        })?;
        rx.await
            .map_err(|_| io::Error::other("log writer stopped"))??;
        lock(&self.inner.mem).vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        // Written by the log writer after its next batch (see [`CommitFile`]); never
        // fsynced: a lost commit point is recomputed by the cluster.
        *lock(&self.inner.committed.pending) = Some(committed);
        lock(&self.inner.mem).committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        Ok(lock(&self.inner.mem).committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<EntryOf<C>> = entries.into_iter().collect();
        let mut mem = lock(&self.inner.mem);
        // Each entry right after the one before it, the first right after the log's last
        // (or the purge point): checked before anything is kept, so a refused append
        // leaves the log as it was.
        let mut next = mem.next_index();
        for e in &entries {
            if let Some(n) = next.filter(|n| *n != e.index()) {
                return Err(out_of_sequence(e.index(), n));
            }
            next = Some(e.index().saturating_add(1));
        }
        let records = entries
            .iter()
            .map(|e| Ok((e.index(), encode(e)?)))
            .collect::<io::Result<Vec<_>>>()?;
        for e in entries {
            mem.entries.insert(e.index(), e);
        }
        // Queued under the same lock, so the writer gets the log's changes in the order
        // they were checked.
        self.send(Op::Append {
            records,
            done: callback,
        })
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        let keep = last_log_id.as_ref().map(|l| l.index);
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut mem = lock(&self.inner.mem);
            let from = keep.map_or(0, |k| k.saturating_add(1));
            let _ = mem.entries.split_off(&from);
            self.send(Op::Truncate { keep, done: tx })?;
        }
        rx.await
            .map_err(|_| io::Error::other("log writer stopped"))?
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        let mut mem = lock(&self.inner.mem);
        let rest = mem.entries.split_off(&log_id.index.saturating_add(1));
        mem.entries = rest;
        mem.purged = Some(log_id);
        self.send(Op::Purge { log_id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A corrupt record (a checksum mismatch over written bytes) starting in a sector's
    /// last byte, whose length's low byte is zero: its first sector piece is that one zero
    /// length byte, which used to count as a sector the crash kept from the disk (torn,
    /// cut). Only a piece with payload bytes counts.
    #[test]
    fn a_zero_piece_of_header_bytes_alone_is_not_a_torn_sector() {
        let pos = 511;
        let record = |payload_byte: u8| {
            let mut buf = vec![0xaa; pos];
            buf.extend_from_slice(&1024u32.to_le_bytes()); // [0, 4, 0, 0]
            buf.extend_from_slice(&[1, 2, 3, 4]); // not the payload's checksum
            buf.extend_from_slice(&[payload_byte; 1024]);
            buf.extend_from_slice(&[0; 1024]); // the preallocated tail
            buf
        };
        let buf = record(b'x');
        assert_eq!(buf[pos], 0);
        assert!(!looks_torn(&buf, pos), "a corrupt record read as torn");
        // Zeros where the payload is (the sector after the header's kept from the disk):
        // torn.
        assert!(looks_torn(&record(0), pos));
        // A few zero payload bytes in a piece with other bytes: no sector of zeros.
        let mut buf = record(b'x');
        buf[pos + HEADER..pos + HEADER + 10].fill(0);
        assert!(!looks_torn(&buf, pos), "10 zero bytes are no sector");
        // Through the parser: a good record of 511 bytes, then the corrupt one.
        let mut buf = Vec::new();
        let mut k = 0;
        let first = loop {
            use openraft::vote::RaftLeaderId;
            let leader = openraft::impls::leader_id_adv::LeaderId::<u64, u64>::new(1, 1);
            let e = EntryOf::<C>::new(
                LogIdOf::<C>::new(leader.to_committed(), 1),
                openraft::EntryPayload::Normal(crate::store::Command::RemoveService {
                    service: "s".repeat(k),
                }),
            );
            let rec = encode(&e).unwrap();
            if rec.len() >= pos {
                break rec;
            }
            k += pos - rec.len();
        };
        assert_eq!(first.len(), pos);
        buf.extend_from_slice(&first);
        buf.extend_from_slice(&record(b'x')[pos..]);
        let p = parse_segment(&buf, 1);
        assert_eq!(
            (p.entries.len(), p.end, p.bad, p.torn),
            (1, pos, Some("checksum mismatch"), false)
        );
    }

    /// Every directory the log or the state machine creates (and the data directory's
    /// missing parents) is made durable by an fsync of its parent.
    #[test]
    fn creating_directories_fsyncs_the_parent_of_each_one_created() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().to_path_buf();
        let log = base.join("a/b/log");
        let synced = create_dir_durable(&log).unwrap();
        assert!(log.is_dir());
        assert_eq!(synced, vec![base.clone(), base.join("a"), base.join("a/b")]);
        // Only what is created: a sibling under an existing parent syncs that parent.
        let sm = base.join("a/b/sm");
        assert_eq!(create_dir_durable(&sm).unwrap(), vec![base.join("a/b")]);
        assert!(create_dir_durable(&sm).unwrap().is_empty());
    }
}
