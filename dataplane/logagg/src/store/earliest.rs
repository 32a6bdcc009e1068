//! Hot path: the earliest time in an app's ring, kept exact for a full ring's late lines
//! without a scan of the ring per line (under the shard lock).

use std::collections::VecDeque;

use flynn_syslog::Timestamp;

use crate::line::Line;

/// The earliest time in an app's ring, exact at O(1) amortized cost per line (a queue with
/// minima, as two stacks). Lines join at the back and leave from the front, so the ring
/// is split at `split`: for the lines before it (the front part) one pass worked out the
/// earliest time from each line up to the split (`suffix`), and for the lines pushed since
/// (the back part) the earliest is kept as they come (`back`). The ring's earliest time is
/// the front part's from its first remaining line, one lookup, against `back`. Once every
/// line of the front part has left, the next lookup makes the whole ring the front part
/// again: each line takes part in at most one pass, so the late lines into a full ring of
/// an in-order app cost one pass per ring's worth of evictions, where a cached minimum
/// cost a scan per late line (each eviction took the earliest line and the cache with it).
/// `suffix` keeps its allocation between passes: no allocation per line in steady state.
/// Its owner drops it after a long run of lines with no lookup (see [`Earliest::pushed`]),
/// so only apps that keep getting late lines hold one (8 bytes a buffered line).
pub(super) struct Earliest {
    /// `suffix[i]`: the earliest time of the lines numbered `base + i` up to `split`.
    suffix: Vec<Timestamp>,
    base: u64,
    /// First sequence number of the back part.
    split: u64,
    /// Earliest time of the back part (`i64::MAX` while it has no line).
    back: Timestamp,
    /// Lines pushed since the last lookup.
    unused: usize,
    /// Passes over the ring made (tests count them).
    #[cfg(test)]
    pub(super) passes: u64,
}

impl Default for Earliest {
    /// No pass yet (`split` 0: the first lookup makes one).
    fn default() -> Earliest {
        Earliest {
            suffix: Vec::new(),
            base: 0,
            split: 0,
            back: Timestamp(i64::MAX),
            unused: 0,
            #[cfg(test)]
            passes: 0,
        }
    }
}

impl Earliest {
    /// The earliest time in `ring`, whose next line will be numbered `next_seq` (the ring
    /// holds consecutive numbers, and has had every push reported to [`Earliest::pushed`]
    /// since this was made).
    pub(super) fn of(&mut self, ring: &VecDeque<Line>, next_seq: u64) -> Option<Timestamp> {
        self.unused = 0;
        let first = ring.front()?.seq;
        if first < self.base || first >= self.split {
            // Every line of the last pass has left (or there was none): one pass, paid
            // for by the lines that left since.
            self.rebuild(ring, next_seq);
        }
        let front = usize::try_from(first - self.base)
            .ok()
            .and_then(|i| self.suffix.get(i))
            .copied()
            .unwrap_or(Timestamp(i64::MAX));
        Some(front.min(self.back))
    }

    /// A line stamped `ts` joined the ring at the back; returns the lines pushed since the
    /// last lookup (the owner drops this once they are many: a new one costs one pass).
    pub(super) fn pushed(&mut self, ts: Timestamp) -> usize {
        self.back = self.back.min(ts);
        self.unused += 1;
        self.unused
    }

    /// Whether this holds far more slots than a ring of `len` lines needs (its owner then
    /// drops it, as it shrinks the ring: memory the cap does not count).
    pub(super) fn oversized(&self, len: usize) -> bool {
        self.suffix.capacity() > 64 && len < self.suffix.capacity() / 4
    }

    /// Makes the whole of `ring` the front part.
    fn rebuild(&mut self, ring: &VecDeque<Line>, next_seq: u64) {
        self.suffix.clear();
        // A ring the bounds drained gives this index's memory back too.
        if self.suffix.capacity() > 64 && ring.len() < self.suffix.capacity() / 4 {
            self.suffix.shrink_to(ring.len() * 2);
        }
        self.suffix.resize(ring.len(), Timestamp(i64::MAX));
        let mut min = Timestamp(i64::MAX);
        for (slot, l) in self.suffix.iter_mut().rev().zip(ring.iter().rev()) {
            min = min.min(l.ts);
            *slot = min;
        }
        self.base = ring.front().map_or(next_seq, |l| l.seq);
        self.split = next_seq;
        self.back = Timestamp(i64::MAX);
        #[cfg(test)]
        {
            self.passes += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use flynn_syslog::parse_fields;

    use crate::store::{Limits, Outcome, Store};

    use super::*;

    fn store(lines: usize, mem: usize) -> Arc<Store> {
        Arc::new(Store::new(Limits {
            lines_per_app: lines,
            max_memory: mem,
        }))
    }

    /// Stores a line stamped `ts_us` microseconds after a fixed time, from its host or
    /// as a peer's replay.
    fn put(s: &Store, app: &str, ts_us: i64, body: &str, from_peer: bool) -> Outcome {
        let ts = Timestamp(1_257_894_000_000_000_000 + ts_us * 1000).to_rfc3339();
        let frame = format!("<190>1 {ts} h {app} web.1 ID1 - {body}");
        let f = parse_fields(frame.as_bytes()).unwrap();
        let ts = f.ts.unwrap();
        if from_peer {
            s.insert_from_peer(app.as_bytes(), frame.as_bytes(), &f, ts)
        } else {
            s.insert(app.as_bytes(), frame.as_bytes(), &f, ts)
        }
    }

    /// Passes over `app`'s ring made to find its earliest time.
    fn passes(s: &Store, app: &str) -> u64 {
        let sh = s.shard(app.as_bytes());
        let a = &sh.apps[app.as_bytes()];
        a.min_ts.as_ref().map_or(0, |e| e.passes)
    }

    /// An app whose ring the memory cap drains does not keep an index sized for the ring it
    /// had (memory the cap does not count): it goes with the ring's slots.
    #[test]
    fn a_drained_ring_does_not_keep_its_index() {
        let s = store(1_000, 400 << 10);
        for i in 0..1_001 {
            assert_eq!(put(&s, "a", 10_000 + i, "fill", false), Outcome::Stored);
        }
        // A peer's replay of an evicted line looks the earliest time up: an index of 1,000.
        assert_eq!(put(&s, "a", 0, "replayed", true), Outcome::Evicted);
        assert!(passes(&s, "a") > 0);
        // Other apps fill the store: the cap takes the largest app's oldest lines.
        for i in 0..40 {
            for j in 0..100 {
                put(&s, &format!("b{i}"), 20_000 + j, "other", false);
            }
        }
        let sh = s.shard(b"a");
        let a = &sh.apps[&b"a"[..]];
        assert!(a.ring.len() < 250, "the cap left {} lines", a.ring.len());
        let slots = a.min_ts.as_ref().map_or(0, |e| e.suffix.capacity());
        assert!(
            slots <= 4 * a.ring.len().max(64),
            "{slots} index slots kept for {} lines",
            a.ring.len()
        );
    }

    /// Small xorshift generator: the same sequences on every run.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// An in-order app with a full ring, late lines interleaved with new ones: every new
    /// line evicts the earliest one, and the late lines (a host's and a peer's replay)
    /// still cost one pass per ring's worth of evictions, not a scan of the ring each.
    #[test]
    fn late_lines_into_a_full_in_order_ring_do_not_rescan_it() {
        let n = 1_000;
        let s = store(n, usize::MAX);
        for i in 0..n as i64 {
            assert_eq!(put(&s, "a", 10_000 + i, "fill", false), Outcome::Stored);
        }
        let rounds = 2_000;
        for i in 0..rounds {
            let new = 10_000 + n as i64 + i;
            assert_eq!(put(&s, "a", new, "new", false), Outcome::Stored);
            assert_eq!(put(&s, "a", i, "late", false), Outcome::TooOld, "{i}");
            assert_eq!(put(&s, "a", i, "replayed", true), Outcome::Evicted, "{i}");
        }
        let p = passes(&s, "a");
        assert!(
            p <= 1 + rounds as u64 / n as u64,
            "{p} passes over the ring for {rounds} late lines"
        );
    }

    /// Which lines are refused as too old (a full ring's, a peer's replay after an
    /// eviction) is what a brute-force model decides: a line earlier than every
    /// buffered line, out-of-order times, ties and far-future lines included.
    #[test]
    fn refusals_match_a_brute_force_model() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut seen = [0usize; 3];
        for cap in [1, 2, 3, 5, 8, 13] {
            for _ in 0..8 {
                let s = store(cap, usize::MAX);
                let mut ring: VecDeque<i64> = VecDeque::new();
                let mut evicted_any = false;
                for i in 0..600 {
                    let ts = match rng.below(20) {
                        0 => 1_000_000 + rng.below(10) as i64,
                        _ => rng.below(40) as i64,
                    };
                    let from_peer = rng.below(3) == 0;
                    let earliest = ring.iter().min().copied();
                    let want = if from_peer && evicted_any && earliest.is_some_and(|m| ts < m) {
                        Outcome::Evicted
                    } else if ring.len() >= cap && earliest.is_some_and(|m| ts < m) {
                        Outcome::TooOld
                    } else {
                        ring.push_back(ts);
                        while ring.len() > cap {
                            ring.pop_front();
                            evicted_any = true;
                        }
                        Outcome::Stored
                    };
                    let got = put(&s, "a", ts, &format!("line {i}"), from_peer);
                    assert_eq!(
                        got, want,
                        "line {i} at {ts} (peer {from_peer}) into {ring:?}"
                    );
                    seen[match want {
                        Outcome::Stored => 0,
                        Outcome::TooOld => 1,
                        _ => 2,
                    }] += 1;
                }
            }
        }
        // Every kind of decision was made often.
        assert!(seen.iter().all(|&n| n > 1_000), "{seen:?}");
    }

    /// The earliest time stays exact while the memory cap and the ring bound evict from
    /// several apps (and remove some whole) between lookups, and an app's index goes after
    /// a long run of in-order lines (then comes back on the next late line).
    #[test]
    fn earliest_time_stays_exact_under_both_bounds() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let s = store(40, 60 << 10);
        let apps = ["a", "b", "c", "d"];
        let (mut lookups, mut dropped) = (0, 0);
        for phase in 0..10i64 {
            let base = phase * 10_000_000;
            let in_order = phase % 2 == 1;
            for i in 0..1_000 {
                let app = apps[rng.below(4) as usize];
                let ts = if in_order {
                    base + i
                } else {
                    base + rng.below(200) as i64 + i / 4
                };
                let body = "x".repeat(rng.below(400) as usize);
                put(&s, app, ts, &body, rng.below(4) == 0);
                if !in_order && rng.below(3) == 0 {
                    let mut sh = s.shard(app.as_bytes());
                    if let Some(a) = sh.apps.get_mut(app.as_bytes()) {
                        let brute = a.ring.iter().map(|l| l.ts).min();
                        assert_eq!(a.earliest(), brute, "phase {phase}, line {i}");
                        lookups += 1;
                    }
                }
            }
            if in_order {
                for app in apps {
                    let sh = s.shard(app.as_bytes());
                    dropped +=
                        sh.apps
                            .get(app.as_bytes())
                            .is_some_and(|a| a.min_ts.is_none()) as usize;
                }
            }
        }
        assert!(lookups > 1_000, "{lookups} lookups");
        assert!(dropped > 0, "no index was dropped after in-order lines");
        assert!(
            s.totals().evicted_memory > 0,
            "the memory cap evicted nothing"
        );
        assert!(
            s.totals().evicted_capacity > 0,
            "the ring bound evicted nothing"
        );
    }
}
