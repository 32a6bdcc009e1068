//! Hot path: the shared line store. Apps are spread over [`SHARDS`] shards by a hash of
//! the app id; each shard is one short `Mutex` over its apps' rings and its share of the
//! host cursors. Ingest from any core locks one shard for one insert (a copy and a few
//! counter updates), readers lock it to copy out lines. See the crate docs for why.
//!
//! Memory accounting is per shard: each shard keeps its exact byte count under its own
//! lock, and [`Store::memory`] sums the shards on read. The cap check on the insert path
//! must not lock 64 shards, so each shard also folds its changes into one shared
//! estimate, but only once they add up to `flush_every` bytes either way (1/32 of the
//! cap spread over the shards): a core writes the shared line about once per
//! `flush_every` bytes, not once per line. The estimate is then never more than
//! `slack = SHARDS * flush_every` from the exact total, and the cap is enforced on the
//! estimate against `max_memory - slack`, so the exact total stays within `max_memory`.
//!
//! Here: the rings, the shards and the insert path with its memory cap, kept together in
//! this one file. Reading (history, a follower's live reads, whole-store reads) is in
//! `read`, the figures for `/metrics` and `/cursors` in `report`, a full ring's earliest
//! time in `earliest`.

use std::collections::{HashMap, VecDeque};
use std::hash::Hasher;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use flynn_syslog::{flynn, Fields, Timestamp};
use tokio::sync::Notify;

use crate::line::{content_hash, FastBuild, FastHasher, Line};

mod earliest;
mod read;
mod report;
use earliest::Earliest;
pub use read::{Batch, Follow, FollowAll, Positions, READ_ALL_PER_APP};
pub use report::AppStats;

pub const SHARDS: usize = 64;

/// Store limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub lines_per_app: usize,
    pub max_memory: usize,
}

/// One app's buffer. Lines are kept in insertion (`seq`) order so a reader's position is
/// just a sequence number; readers sort by time when they return history. The per-app
/// bound and the memory cap evict the first-arrived line, and a full ring refuses a line
/// older than every line in it (spec §3.3 evicts the oldest by time; the two differ only for late
/// lines, and a time index that made eviction exact cost ~20× per message on the ingest
/// path in `flynn-perf logagg`, so it was taken out). Lines leave only from the front, so
/// the ring holds consecutive sequence numbers and a line is found by its offset from the
/// first one.
pub struct App {
    ring: VecDeque<Line>,
    /// Sequence number the next line gets (the first line of a shard's first app is 1).
    next_seq: u64,
    bytes: usize,
    /// Lines pushed out by the per-app bound / by the global memory cap / refused because
    /// they were older than everything in a full ring.
    pub evicted_capacity: u64,
    pub evicted_memory: u64,
    pub duplicates: u64,
    followers: usize,
    notify: Arc<Notify>,
    /// A follower read up to the newest line and may be waiting on `notify` (set by
    /// [`Store::read_from_within`], taken by the next insert, both under the shard lock):
    /// an insert wakes readers only then, after the lock is released, so the lines of a
    /// followed app do not each take the `Notify`'s lock (and an `Arc` clone) inside the
    /// shard's. A follower enables its wake-up before it reads, so an insert after its read
    /// finds the flag and wakes it, and one before is in what it read.
    waiting: bool,
    /// Replay index (content hash → seq), built only when a line arrives that could be a
    /// replay and dropped again after a long run of lines that cannot be (see
    /// [`Store::insert`]): monotonic traffic pays no random access per line for it.
    dedupe: Option<HashMap<u64, u64, FastBuild>>,
    /// Latest timestamp ever inserted (a duplicate has the same time as its original).
    max_ts: Timestamp,
    /// Consecutive provably-new lines while the index exists.
    fresh_run: usize,
    /// The earliest timestamp in `ring` ([`Earliest`]): made on the first line earlier
    /// than the first-arrived one into a full ring (or a peer's replayed line older than
    /// the first-arrived one), then kept up to date, and dropped after a long run of lines
    /// that did not need it.
    min_ts: Option<Earliest>,
    /// Whether a line was ever evicted from `ring` (by either bound): from then on a peer's
    /// replayed line older than every buffered one is refused ([`Store::insert_from_peer`]).
    evicted_any: bool,
}

/// What an app costs beyond its lines, charged against `--max-memory` from its creation to
/// its removal: its map entry and key, this struct, its `Notify`, and the first
/// allocations of its ring and replay index. Without it a sender inventing an app per line
/// used several times the cap.
pub const APP_OVERHEAD: usize = 1024;

impl App {
    fn new(next_seq: u64) -> App {
        App {
            ring: VecDeque::new(),
            next_seq: next_seq.max(1),
            bytes: APP_OVERHEAD,
            evicted_capacity: 0,
            evicted_memory: 0,
            duplicates: 0,
            followers: 0,
            notify: Arc::new(Notify::new()),
            waiting: false,
            dedupe: None,
            max_ts: Timestamp(i64::MIN),
            fresh_run: 0,
            min_ts: None,
            evicted_any: false,
        }
    }

    /// The earliest timestamp in the ring (exact, O(1) amortized: see [`Earliest`]).
    fn earliest(&mut self) -> Option<Timestamp> {
        self.min_ts
            .get_or_insert_with(Earliest::default)
            .of(&self.ring, self.next_seq)
    }

    /// Index in `ring` of the first line with a sequence number of at least `seq` (the
    /// ring's numbers are consecutive: lines leave only from the front).
    fn index_of(&self, seq: u64) -> usize {
        match self.ring.front() {
            Some(f) => usize::try_from(seq.saturating_sub(f.seq))
                .unwrap_or(usize::MAX)
                .min(self.ring.len()),
            None => 0,
        }
    }

    /// The buffered line numbered `seq`, if it is still there.
    fn get(&self, seq: u64) -> Option<&Line> {
        self.ring.get(self.index_of(seq)).filter(|l| l.seq == seq)
    }

    /// Time of the oldest buffered line.
    fn oldest(&self) -> Option<Timestamp> {
        self.ring.front().map(|l| l.ts)
    }

    /// Appends `line` (the highest `seq` so far).
    fn push(&mut self, line: Line) {
        if let Some(e) = &mut self.min_ts {
            // No late line for twice a ring's worth of lines: its memory goes back.
            if e.pushed(line.ts) > 2 * self.ring.len().max(64) {
                self.min_ts = None;
            }
        }
        self.ring.push_back(line);
    }

    fn counts(&self) -> Totals {
        Totals {
            evicted_capacity: self.evicted_capacity,
            evicted_memory: self.evicted_memory,
            duplicates: self.duplicates,
        }
    }

    /// Bytes of its lines (its own [`APP_OVERHEAD`] left out).
    fn line_bytes(&self) -> usize {
        self.bytes - APP_OVERHEAD
    }

    /// Drops the first-arrived line; its cost.
    fn pop_oldest(&mut self) -> Option<usize> {
        let l = self.ring.pop_front()?;
        self.evicted_any = true;
        if let Some(d) = &mut self.dedupe {
            let h = l.hash();
            if d.get(&h) == Some(&l.seq) {
                d.remove(&h);
            }
        }
        let c = l.cost();
        self.bytes -= c;
        // A ring (and index) the bounds have drained gives its memory back: an app that
        // once held many lines would otherwise keep their slots for good, uncharged.
        if self.ring.capacity() > 64 && self.ring.len() < self.ring.capacity() / 4 {
            self.ring.shrink_to(self.ring.len() * 2);
        }
        if let Some(d) = &mut self.dedupe {
            if d.capacity() > 64 && d.len() < d.capacity() / 4 {
                d.shrink_to(d.len() * 2);
            }
        }
        // The earliest-time index has a slot per line of the ring it last looked at: it
        // goes too (the next lookup builds one of the ring's size).
        if self
            .min_ts
            .as_ref()
            .is_some_and(|e| e.oversized(self.ring.len()))
        {
            self.min_ts = None;
        }
        Some(c)
    }
}

/// A host's latest position (spec §3.2 host cursors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub time: Timestamp,
    pub seq: u64,
}

/// The flynn sequence numbers of one host that a shard has stored, as a few sorted, disjoint
/// closed ranges covering every stored one (a range may also cover numbers never stored,
/// which only sends such a line through the replay check). A number outside every range was
/// never stored in this shard, so a line carrying it cannot be a replay. One range per
/// sender keeps up with a host whose sequence arrives split over several connections.
#[derive(Default)]
struct SeqSpans {
    spans: Vec<(u64, u64)>,
}

/// Ranges kept per host and shard; beyond this the two closest are merged.
const MAX_SPANS: usize = 64;
/// Hosts whose sequence ranges a shard keeps (up to [`MAX_SPANS`] ranges each). Host names
/// come from senders, so without a bound a sender inventing one per line would grow these
/// maps without end (outside the memory cap). Lines of hosts beyond it are still stored:
/// they are checked for duplicates by content, as lines without a sequence are.
const MAX_SEEN_HOSTS_PER_SHARD: usize = 256;
/// Hosts whose cursor a shard keeps: a name (up to 255 bytes) and 16 bytes each, so at
/// most ~20 MiB over all shards when a sender invents names. Every shard sees nearly every
/// host, so this is the cluster size up to which `/cursors` has every host; a host missing
/// from it resends its whole disk log whenever it reconnects.
const MAX_CURSOR_HOSTS_PER_SHARD: usize = 1024;
/// How far above a range a number may land and still grow it.
const SPAN_GAP: u64 = 1 << 16;

impl SeqSpans {
    fn covers(&self, seq: u64) -> bool {
        let i = self.spans.partition_point(|&(a, _)| a <= seq);
        i > 0 && self.spans[i - 1].1 >= seq
    }

    /// Covers `seq` by growing the range just below it or starting one, merging what touches.
    fn add(&mut self, seq: u64) {
        let i = self.spans.partition_point(|&(a, _)| a <= seq);
        if i > 0 && self.spans[i - 1].1 >= seq {
            return;
        }
        // Close above the range below: grow it (the numbers in between belong to other
        // shards' apps or were never sent). Far above: a new sender, a range of its own.
        let at = if i > 0 && seq - self.spans[i - 1].1 <= SPAN_GAP {
            self.spans[i - 1].1 = seq;
            i - 1
        } else {
            self.spans.insert(i, (seq, seq));
            i
        };
        if at + 1 < self.spans.len() && self.spans[at + 1].0 <= seq.saturating_add(1) {
            self.spans[at].1 = self.spans[at + 1].1;
            self.spans.remove(at + 1);
        }
        if self.spans.len() > MAX_SPANS {
            // Merge the closest neighbours: coverage only grows.
            let j = (0..self.spans.len() - 1)
                .min_by_key(|&j| self.spans[j + 1].0 - self.spans[j].1)
                .unwrap_or(0);
            self.spans[j].1 = self.spans[j + 1].1;
            self.spans.remove(j + 1);
            // Growing past 64 doubled the capacity to 128 ranges (2 KiB per host and shard,
            // ~32 MiB over every shard's bounded hosts); one more than the bound is enough.
            self.spans.shrink_to(MAX_SPANS + 1);
        }
    }
}

#[derive(Default)]
struct Shard {
    apps: HashMap<Box<[u8]>, App, FastBuild>,
    cursors: HashMap<Box<[u8]>, Cursor, FastBuild>,
    /// Per host: the sequence numbers stored in this shard ([`SeqSpans`]).
    seen: HashMap<Box<[u8]>, SeqSpans, FastBuild>,
    /// The highest `next_seq` of an app removed from this shard: a re-created app starts
    /// there, so its numbers keep growing for readers that remember a position in it.
    seq_floor: u64,
    /// Exact bytes buffered by this shard's apps (sum of their `App::bytes`).
    bytes: usize,
    /// Change of `bytes` not yet folded into [`Store::estimate`].
    pending: isize,
    /// The counts of apps removed from this shard, so [`Store::totals`] keeps them.
    gone: Totals,
}

/// Store-wide line counts (`/metrics`): those of the apps there are, plus those of every
/// app removed since start (an app goes with its last line and reader, often right after
/// the cap evicted that line).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub evicted_capacity: u64,
    pub evicted_memory: u64,
    pub duplicates: u64,
}

impl std::ops::AddAssign for Totals {
    fn add_assign(&mut self, o: Totals) {
        self.evicted_capacity += o.evicted_capacity;
        self.evicted_memory += o.evicted_memory;
        self.duplicates += o.duplicates;
    }
}

impl Shard {
    /// A new app for this shard, its [`APP_OVERHEAD`] charged and counted in `apps`; the
    /// caller puts it in `self.apps`.
    fn new_app(&mut self, apps: &AtomicUsize) -> App {
        apps.fetch_add(1, Ordering::Relaxed);
        let a = App::new(self.seq_floor);
        self.bytes += a.bytes;
        self.pending += a.bytes as isize;
        a
    }

    /// Removes `app` when it holds no line and no follower (under the shard lock, so no
    /// insert or follower registration can race it): an app's entry, and its `/metrics`
    /// series, live only as long as it has lines or readers.
    fn remove_if_idle(&mut self, app: &[u8], apps: &AtomicUsize) {
        if let Some(a) = self.apps.get(app) {
            if a.ring.is_empty() && a.followers == 0 {
                self.seq_floor = self.seq_floor.max(a.next_seq);
                self.gone += a.counts();
                self.bytes -= a.bytes;
                self.pending -= a.bytes as isize;
                self.apps.remove(app);
                apps.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// What happened to one inserted line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Stored,
    Duplicate,
    /// Older than every line of a full ring: it would be the first evicted (counted).
    TooOld,
    /// A peer's replayed line older than every line of an app that has evicted lines: most
    /// likely one this instance had and dropped ([`Store::insert_from_peer`]; counted with
    /// the capacity refusals).
    Evicted,
}

pub struct Store {
    shards: Box<[Mutex<Shard>]>,
    limits: Limits,
    /// Shared estimate of the buffered bytes: the sum of the shards' folded changes.
    /// Written once per `flush_every` bytes of change by a shard, read on every insert.
    estimate: CachePadded<AtomicIsize>,
    /// A shard folds its `pending` into `estimate` once it reaches this many bytes.
    flush_every: usize,
    /// Inserts evict when `estimate` exceeds this (`max_memory - SHARDS * flush_every`).
    soft_limit: usize,
    apps: AtomicUsize,
    reclaiming: AtomicBool,
    /// Shard the last reclaim sweep stopped at; the next one starts there.
    reclaim_from: AtomicUsize,
    /// Reclaim passes run since start (`/metrics`: how often the cap is being enforced).
    reclaim_passes: AtomicU64,
    /// Whole-store followers (peers reading `/snapshot?follow=true`).
    any_followers: AtomicUsize,
    any_notify: Notify,
    /// Set by the first insert after a whole-store reader's [`Store::any_read_begins`]:
    /// only that insert wakes the readers, so a busy store does not take the `Notify`'s
    /// lock on every line while a peer follows it.
    any_dirty: AtomicBool,
}

/// Keeps a hot atomic on its own cache line.
#[repr(align(128))]
#[derive(Default)]
struct CachePadded<T>(T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

fn shard_of(app: &[u8]) -> usize {
    let mut h = FastHasher::default();
    h.write(app);
    (h.finish() >> 32) as usize % SHARDS
}

impl Store {
    pub fn new(limits: Limits) -> Store {
        // 1/32 of the cap is the most the estimate may lag the exact total by.
        let flush_every = (limits.max_memory / (SHARDS * 32)).max(1);
        let soft_limit = limits.max_memory.saturating_sub(SHARDS * flush_every);
        Store {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            limits,
            estimate: CachePadded::default(),
            flush_every,
            soft_limit,
            apps: AtomicUsize::new(0),
            reclaiming: AtomicBool::new(false),
            reclaim_from: AtomicUsize::new(0),
            reclaim_passes: AtomicU64::new(0),
            any_followers: AtomicUsize::new(0),
            any_notify: Notify::new(),
            any_dirty: AtomicBool::new(false),
        }
    }

    fn shard(&self, app: &[u8]) -> MutexGuard<'_, Shard> {
        self.shards[shard_of(app)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn shard_at(&self, i: usize) -> MutexGuard<'_, Shard> {
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Exact bytes buffered: the per-shard counts summed (locks each shard in turn).
    pub fn memory(&self) -> usize {
        (0..SHARDS).map(|i| self.shard_at(i).bytes).sum()
    }

    /// The shared estimate the insert path checks the cap against (within `slack` of
    /// [`Store::memory`]).
    pub fn memory_estimate(&self) -> usize {
        self.estimate.load(Ordering::Relaxed).max(0) as usize
    }

    /// How far [`Store::memory_estimate`] may be from [`Store::memory`].
    pub fn memory_slack(&self) -> usize {
        SHARDS * self.flush_every
    }

    /// Folds all of a shard's pending change into the shared estimate (off the hot path).
    fn fold(&self, pending: &mut isize) {
        let d = std::mem::take(pending);
        if d != 0 {
            self.estimate.fetch_add(d, Ordering::Relaxed);
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Copies one message into `app`'s ring. `ts` is the message time (or receive time).
    ///
    /// Replays are ignored (spec §3.3): a line identical to one in the ring (same time,
    /// host, procid, structured data and body) is a duplicate. A line is *provably new*,
    /// and skips the check, when its time is later than any the app has had, or when it
    /// carries a flynn `seq` and its (time, seq) is past its host's cursor (an identical
    /// line would have the same host, time and seq, which the cursor has already
    /// covered). Only other lines need the content index, which is built from the ring on
    /// first need and dropped after `2 × lines_per_app` provably-new lines in a row.
    pub fn insert(&self, app: &[u8], frame: &[u8], fields: &Fields, ts: Timestamp) -> Outcome {
        self.insert_line(app, frame, fields, ts, false)
    }

    /// [`Store::insert`] for a line of a peer's `/snapshot` replay (the peer's buffer, sent
    /// again on every (re)connect; not its live lines after the end marker). Dedupe finds
    /// only lines still buffered, so the lines this instance evicted would come back with
    /// new sequence numbers (to its live followers a second time). Once `app` has evicted
    /// a line, a replayed line older than every line it still buffers is refused
    /// ([`Outcome::Evicted`]), as a line older than a full ring is ([`Outcome::TooOld`]): it
    /// lies before what this instance keeps. A line a host sends itself is never refused
    /// this way (a host resends from its cursor, spec §3.5), and neither is a peer's live
    /// line; an app removed whole (no line, no follower) takes a replay again, as at start.
    pub fn insert_from_peer(
        &self,
        app: &[u8],
        frame: &[u8],
        fields: &Fields,
        ts: Timestamp,
    ) -> Outcome {
        self.insert_line(app, frame, fields, ts, true)
    }

    #[inline]
    fn insert_line(
        &self,
        app: &[u8],
        frame: &[u8],
        fields: &Fields,
        ts: Timestamp,
        from_peer: bool,
    ) -> Outcome {
        let mut over_cap = false;
        let seq_cursor = (!fields.raw)
            .then(|| flynn::flynn_seq(fields.sd.get(frame)))
            .flatten()
            .map(|seq| Cursor { time: ts, seq });
        let (outcome, wake) = {
            let mut guard = self.shard(app);
            let shard = &mut *guard;
            let a = match shard.apps.get_mut(app) {
                Some(a) => a,
                None => {
                    let a = shard.new_app(&self.apps);
                    shard.apps.entry(app.into()).or_insert(a)
                }
            };
            // (A new app has evicted nothing: no empty app is left behind by this return.)
            if from_peer
                && a.evicted_any
                && a.oldest().is_some_and(|o| ts < o)
                && a.earliest().is_some_and(|m| ts < m)
            {
                a.evicted_capacity += 1;
                return Outcome::Evicted;
            }
            let host = fields.hostname.get(frame);
            // A host missing from a full map may have been seen untracked: its lines are
            // not provably new by their sequence.
            let fresh = ts > a.max_ts
                || seq_cursor.is_some_and(|c| {
                    let cursor_new = match shard.cursors.get(host) {
                        Some(cur) => (c.time, c.seq) > (cur.time, cur.seq),
                        None => shard.cursors.len() < MAX_CURSOR_HOSTS_PER_SHARD,
                    };
                    let seen_new = match shard.seen.get(host) {
                        Some(s) => !s.covers(c.seq),
                        None => shard.seen.len() < MAX_SEEN_HOSTS_PER_SHARD,
                    };
                    cursor_new || seen_new
                });
            let mut hash = None;
            if fresh {
                a.fresh_run += 1;
                if a.fresh_run > 2 * self.limits.lines_per_app {
                    a.dedupe = None;
                }
            } else {
                a.fresh_run = 0;
                let index = a
                    .dedupe
                    .get_or_insert_with(|| a.ring.iter().map(|l| (l.hash(), l.seq)).collect());
                let h = content_hash(ts, frame, fields);
                hash = Some(h);
                if let Some(&seq) = index.get(&h) {
                    if a.get(seq).is_some_and(|l| l.same_as(ts, frame, fields)) {
                        a.duplicates += 1;
                        return Outcome::Duplicate;
                    }
                }
            }
            // Earlier than the first-arrived line, and then than every line (not only
            // that one: a single line stamped in the future at the front would refuse
            // every later line until the clock caught up with it).
            if a.ring.len() >= self.limits.lines_per_app
                && a.oldest().is_some_and(|o| ts < o)
                && a.earliest().is_some_and(|m| ts < m)
            {
                a.evicted_capacity += 1;
                return Outcome::TooOld;
            }
            let line = Line::new(a.next_seq, ts, frame, fields);
            let cost = line.cost();
            if let Some(d) = &mut a.dedupe {
                d.insert(hash.unwrap_or_else(|| line.hash()), a.next_seq);
            }
            if ts > a.max_ts {
                a.max_ts = ts;
            }
            a.next_seq += 1;
            a.bytes += cost;
            a.push(line);
            let mut freed = 0usize;
            while a.ring.len() > self.limits.lines_per_app {
                freed += a.pop_oldest().unwrap_or(0);
                a.evicted_capacity += 1;
            }
            // Accounted in this shard (under its lock); the shared estimate is written
            // only once the shard's change reaches `flush_every` bytes.
            shard.bytes = shard.bytes + cost - freed;
            shard.pending += cost as isize - freed as isize;
            let mut mem = {
                let p = &mut shard.pending;
                if p.unsigned_abs() >= self.flush_every {
                    let d = std::mem::take(p);
                    self.estimate.fetch_add(d, Ordering::Relaxed) + d
                } else {
                    self.estimate.load(Ordering::Relaxed) + *p
                }
            }
            .max(0) as usize;
            if mem > self.soft_limit {
                // At or above the average share: pay from this app's own oldest lines.
                let apps = self.apps.load(Ordering::Relaxed).max(1);
                let mut paid = 0usize;
                while mem > self.soft_limit && a.ring.len() > 1 && a.bytes * apps >= mem {
                    let c = a.pop_oldest().unwrap_or(0);
                    a.evicted_memory += 1;
                    paid += c;
                    mem -= c;
                }
                shard.bytes -= paid;
                shard.pending -= paid as isize;
                // Keep |pending| under `flush_every` (the slack bound) after paying.
                if shard.pending.unsigned_abs() >= self.flush_every {
                    self.fold(&mut shard.pending);
                }
                over_cap = mem > self.soft_limit;
            }
            // Only a follower that caught up is woken, once per read it made (an `Arc`
            // clone here, the notify once the lock is released).
            let wake = std::mem::take(&mut a.waiting).then(|| a.notify.clone());
            {
                if let Some(c) = seq_cursor {
                    let (seen_room, cursor_room) = (
                        shard.seen.len() < MAX_SEEN_HOSTS_PER_SHARD,
                        shard.cursors.len() < MAX_CURSOR_HOSTS_PER_SHARD,
                    );
                    match shard.seen.get_mut(host) {
                        Some(spans) => spans.add(c.seq),
                        None if seen_room => {
                            let mut spans = SeqSpans::default();
                            spans.add(c.seq);
                            shard.seen.insert(host.into(), spans);
                        }
                        None => {}
                    }
                    match shard.cursors.get_mut(host) {
                        Some(cur) if (c.time, c.seq) > (cur.time, cur.seq) => *cur = c,
                        Some(_) => {}
                        None if cursor_room => {
                            shard.cursors.insert(host.into(), c);
                        }
                        None => {}
                    }
                }
            }
            (Outcome::Stored, wake)
        };
        if let Some(n) = wake {
            n.notify_waiters();
        }
        if self.any_followers.load(Ordering::Relaxed) > 0
            && !self.any_dirty.load(Ordering::Acquire)
            && !self.any_dirty.swap(true, Ordering::AcqRel)
        {
            self.any_notify.notify_waiters();
        }
        if over_cap {
            self.reclaim();
        }
        outcome
    }

    /// Brings memory back under the cap by evicting from the largest apps (one reclaimer
    /// at a time; down to 15/16 of the soft limit so it runs rarely). Each pass sums the
    /// exact per-shard counts and folds every shard's pending change, so the estimate is
    /// exact again afterwards and inserts do not keep calling in.
    ///
    /// A pass then sweeps the shards, from where the last sweep stopped, and makes every
    /// app holding at least half as much as the largest one pay, oldest lines first, down
    /// to below that level, until enough is freed; the next pass halves the level again.
    /// This may take an app's last line: with many apps of a line or two each (which the
    /// insert path leaves alone), whole apps go, round robin over the shards, and are
    /// removed when no one follows them.
    fn reclaim(&self) {
        if self.reclaiming.swap(true, Ordering::Acquire) {
            return;
        }
        let target = self.soft_limit / 16 * 15;
        for _ in 0..64 {
            let mut total = 0usize;
            let mut big = 0usize;
            for i in 0..SHARDS {
                let mut s = self.shard_at(i);
                self.fold(&mut s.pending);
                total += s.bytes;
                // Line bytes: an app's own charge is freed only with the app.
                big = big.max(s.apps.values().map(|a| a.line_bytes()).max().unwrap_or(0));
            }
            if total <= target || big == 0 {
                break;
            }
            self.reclaim_passes.fetch_add(1, Ordering::Relaxed);
            let mut freed_in_pass = 0usize;
            let level = big / 2 + 1;
            let mut want = total - target;
            let from = self.reclaim_from.load(Ordering::Relaxed);
            for k in 0..SHARDS {
                let i = (from + k) % SHARDS;
                let mut guard = self.shard_at(i);
                let s = &mut *guard;
                let mut freed = 0;
                let mut removed = 0;
                s.apps.retain(|_, a| {
                    while freed < want && a.line_bytes() >= level {
                        let Some(c) = a.pop_oldest() else { break };
                        a.evicted_memory += 1;
                        freed += c;
                    }
                    let idle = a.ring.is_empty() && a.followers == 0;
                    if idle {
                        s.seq_floor = s.seq_floor.max(a.next_seq);
                        s.gone += a.counts();
                        freed += a.bytes;
                        removed += 1;
                    }
                    !idle
                });
                self.apps.fetch_sub(removed, Ordering::Relaxed);
                s.bytes -= freed;
                s.pending -= freed as isize;
                self.fold(&mut s.pending);
                freed_in_pass += freed;
                want -= freed.min(want);
                if want == 0 {
                    self.reclaim_from.store(i, Ordering::Relaxed);
                    break;
                }
            }
            // Nothing left to take (apps a reader keeps, each down to its own charge):
            // another pass would only walk every shard again.
            if freed_in_pass == 0 {
                break;
            }
        }
        self.reclaiming.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests;
