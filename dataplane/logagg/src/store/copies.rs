//! Hot path: one line, several stamps. A line without a timestamp of its own (RFC 5424
//! NILVALUE, or not RFC 5424 at all) is stamped on arrival; a sender gives it to every
//! instance (spec §3.1), each stamps it at its own instant, and each streams its copy to
//! the instances that follow it. Exact dedupe (same time) cannot see those copies as one
//! line, and nothing in the line itself tells two copies of one line from two equal lines,
//! so copies are paired by order: each buffered line records which sources (the senders,
//! each peer) have given it, and a line from a source is a copy of the earliest buffered
//! line with its content, stamped within [`COPY_WINDOW`] of it, that this source has not
//! given yet. A peer's earlier stamp replaces the buffered one: every instance of a mesh
//! sees the same stamps (its own first-stored one and each peer's), so all keep the
//! earliest, and a later replay of the line is an exact duplicate.
//!
//! Kept per app only once a peer has sent it such a line ([`App::merge_copy`] builds it
//! from the ring), and dropped after `2 × lines_per_app` sender lines stored in a row
//! without one (the ring has turned over: no peer's line is left in it). An instance
//! without peers, or with peers but only timestamped lines, pays one branch per line; while
//! it exists a sender's stamped line costs a hash, a lookup or two and two map inserts
//! (amortized: entries leave with their lines).

use std::collections::{HashMap, VecDeque};

use flynn_syslog::{Fields, Timestamp};

use super::{App, Source};
use crate::line::{content_key, FastBuild, Line};

/// How far apart two instances' arrival stamps of one line may be (nanoseconds): the
/// sender's writes to both, the peer stream's delay and the clock difference between the
/// instances' hosts. Equal lines that only one instance got, this close together, are
/// still kept apart by the pairing (each source's copy pairs with one line).
pub const COPY_WINDOW: i64 = 10_000_000_000;

/// Lines with one content that a search looks at, newest first.
const MAX_WALK: usize = 64;

/// The buffered lines without a timestamp of their own, chained by content.
#[derive(Default)]
pub(super) struct Copies {
    /// Content key ([`content_key`]) → the newest such line's sequence number.
    newest: HashMap<u64, u64, FastBuild>,
    /// Per such line (by sequence number).
    links: HashMap<u64, Link, FastBuild>,
    /// Sender lines stored in a row since a peer last sent a line without a timestamp.
    sender_run: usize,
}

#[derive(Debug, Clone, Copy)]
struct Link {
    key: u64,
    /// One bit per source that gave this line ([`Source::bit`]).
    seen: u64,
    /// The previous line with the same content (0: none; sequence numbers start at 1).
    prev: u64,
}

impl Source {
    /// Bit 0 for the senders, bit `1 + index` for a peer (peers past the 63rd share the
    /// last bit).
    fn bit(self) -> u64 {
        match self {
            Source::Sender => 1,
            Source::Peer { index, .. } => 1 << (1 + index.min(62)),
        }
    }
}

impl Copies {
    /// Records the newly stored line `seq` from `src`.
    pub(super) fn link(&mut self, key: u64, seq: u64, src: Source) {
        if src == Source::Sender {
            self.sender_run += 1;
        }
        let prev = self.newest.insert(key, seq).unwrap_or(0);
        self.links.insert(
            seq,
            Link {
                key,
                seen: src.bit(),
                prev,
            },
        );
    }

    /// `src` has given line `seq` too (no-op for a line with a timestamp of its own).
    pub(super) fn mark(&mut self, seq: u64, src: Source) {
        if let Some(l) = self.links.get_mut(&seq) {
            l.seen |= src.bit();
        }
    }

    /// Line `seq` left the ring (the oldest: every older line of its chain is gone too).
    pub(super) fn unlink(&mut self, seq: u64) {
        if let Some(l) = self.links.remove(&seq) {
            if self.newest.get(&l.key) == Some(&seq) {
                self.newest.remove(&l.key);
            }
            shrink_if_sparse(&mut self.newest);
            shrink_if_sparse(&mut self.links);
        }
    }

    fn from_ring(ring: &VecDeque<Line>) -> Copies {
        let mut c = Copies::default();
        // Before this, no peer sent the app such a line (or none while more sender lines
        // were stored than the ring holds): every one in the ring came from a sender.
        for l in ring.iter().filter(|l| l.msg.fields().ts.is_none()) {
            c.link(
                content_key(l.msg.frame(), l.msg.fields()),
                l.seq,
                Source::Sender,
            );
        }
        c.sender_run = 0;
        c
    }
}

/// Gives back the memory of a map the ring's evictions have drained (as the ring does).
fn shrink_if_sparse<V>(m: &mut HashMap<u64, V, FastBuild>) {
    if m.capacity() > 64 && m.len() < m.capacity() / 4 {
        m.shrink_to(m.len() * 2);
    }
}

impl App {
    /// For a line without a timestamp of its own from `src`, stamped `ts`: whether it is a
    /// copy of a buffered line (then recorded on that line, whose stamp becomes the
    /// earlier of the two when `src` is a peer). Otherwise the caller stores it and links
    /// it with [`Copies::link`].
    pub(super) fn merge_copy(
        &mut self,
        src: Source,
        key: u64,
        ts: Timestamp,
        frame: &[u8],
        fields: &Fields,
        lines_per_app: usize,
    ) -> bool {
        let copies = match src {
            Source::Sender => {
                let Some(c) = &mut self.copies else {
                    return false;
                };
                if c.sender_run > 2 * lines_per_app {
                    self.copies = None;
                    return false;
                }
                c
            }
            Source::Peer { .. } => {
                let c = self
                    .copies
                    .get_or_insert_with(|| Copies::from_ring(&self.ring));
                c.sender_run = 0;
                c
            }
        };
        let bit = src.bit();
        // The earliest line this source has not given, and whether it gave one already.
        let (mut unpaired, mut given) = (None, false);
        let mut at = copies.newest.get(&key).copied();
        for _ in 0..MAX_WALK {
            let Some(seq) = at else { break };
            let Some(link) = copies.links.get(&seq) else {
                break;
            };
            let first = self.ring.front().map_or(0, |f| f.seq);
            let Some(line) = usize::try_from(seq.wrapping_sub(first))
                .ok()
                .and_then(|i| self.ring.get(i))
            else {
                break;
            };
            if line.ts.0.abs_diff(ts.0) <= COPY_WINDOW.unsigned_abs()
                && line.same_content(frame, fields)
            {
                if link.seen & bit == 0 {
                    unpaired = Some(seq);
                } else {
                    given = true;
                }
            }
            at = (link.prev != 0).then_some(link.prev);
        }
        match unpaired {
            Some(seq) => {
                copies.mark(seq, src);
                if src != Source::Sender {
                    self.restamp_earlier(seq, ts);
                }
                true
            }
            // A peer's buffer sent again (a reconnect) before its stamp was lowered.
            None => given && matches!(src, Source::Peer { replay: true, .. }),
        }
    }

    /// Line `seq` takes the stamp `ts` if that is earlier (the replay index follows).
    fn restamp_earlier(&mut self, seq: u64, ts: Timestamp) {
        let i = self.index_of(seq);
        let Some(line) = self.ring.get_mut(i).filter(|l| l.seq == seq && ts < l.ts) else {
            return;
        };
        if let Some(d) = &mut self.dedupe {
            let h = line.hash();
            if d.get(&h) == Some(&seq) {
                d.remove(&h);
            }
        }
        line.ts = ts;
        if let Some(d) = &mut self.dedupe {
            d.insert(line.hash(), seq);
        }
        if self.min_ts.is_some_and(|m| ts < m) {
            self.min_ts = Some(ts);
        }
    }
}
