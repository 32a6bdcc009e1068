//! A Wing–Gong linearizability checker (with Lowe's memoisation of visited
//! (linearized-set, state) pairs) for one register with compare-and-swap: the model of a
//! service's metadata, where every write stores a distinct value.
//!
//! The register holds `Option<u64>` (`None` = no metadata yet). Operations:
//! - `Read` returned `value`;
//! - `Cas { expect, new }`: succeeded (`Ok`), definitely did nothing (`Fail`: the stored
//!   value was not `expect`; 409/412), or has an unknown outcome (`Unknown`: timeout, 5xx,
//!   connection error) — then it may take effect at any point after its call, or never.
//!
//! Expected values are compared by value: discoverd compares the stored *index*, but
//! every write has a distinct value and a distinct index, so the two are equivalent when
//! the clients pass the index that came with the value they read.

use std::collections::HashSet;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Fail,
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpKind {
    Read {
        value: Option<u64>,
    },
    Cas {
        expect: Option<u64>,
        new: u64,
        outcome: Outcome,
    },
}

/// One operation: `call` and `ret` in any monotonic unit; `ret: None` means the call
/// never returned a definite answer.
#[derive(Clone, Debug)]
pub struct Op {
    pub call: u64,
    pub ret: Option<u64>,
    pub kind: OpKind,
}

impl Op {
    pub fn read(call: u64, ret: u64, value: Option<u64>) -> Op {
        Op {
            call,
            ret: Some(ret),
            kind: OpKind::Read { value },
        }
    }

    pub fn cas(call: u64, ret: Option<u64>, expect: Option<u64>, new: u64, o: Outcome) -> Op {
        let ret = if o == Outcome::Unknown { None } else { ret };
        Op {
            call,
            ret,
            kind: OpKind::Cas {
                expect,
                new,
                outcome: o,
            },
        }
    }

    /// Whether the history is complete without this op (unknown outcomes are optional).
    fn optional(&self) -> bool {
        self.ret.is_none()
    }

    /// The model's step: the new state if this op may be linearized in `state`.
    fn step(&self, state: Option<u64>) -> Option<Option<u64>> {
        match &self.kind {
            OpKind::Read { value } => (*value == state).then_some(state),
            OpKind::Cas {
                expect,
                new,
                outcome,
            } => match outcome {
                Outcome::Ok | Outcome::Unknown => (*expect == state).then_some(Some(*new)),
                Outcome::Fail => (*expect != state).then_some(state),
            },
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    NotLinearizable,
    /// The search exceeded its step budget.
    GaveUp,
}

/// Searches for a linearization of `history` starting from an empty register, visiting
/// at most `budget` (linearized-set, state) configurations.
pub fn check(history: &[Op], budget: usize) -> Verdict {
    let mut ops: Vec<Op> = history.to_vec();
    ops.sort_by_key(|o| o.call);
    let mut search = Search {
        ops: &ops,
        seen: HashSet::new(),
        budget,
    };
    let done = vec![0u64; ops.len().div_ceil(64)];
    match search.dfs(&done, None) {
        Some(true) => Verdict::Linearizable,
        Some(false) => Verdict::NotLinearizable,
        None => Verdict::GaveUp,
    }
}

struct Search<'a> {
    ops: &'a [Op],
    seen: HashSet<(Vec<u64>, Option<u64>)>,
    budget: usize,
}

fn is_set(bits: &[u64], i: usize) -> bool {
    bits[i / 64] & (1 << (i % 64)) != 0
}

impl Search<'_> {
    /// `Some(found)`, or `None` when out of budget.
    fn dfs(&mut self, done: &[u64], state: Option<u64>) -> Option<bool> {
        // The earliest return among the ops still to linearize: nothing called after it
        // may be linearized before it.
        let mut min_ret = u64::MAX;
        let mut complete = true;
        for (i, op) in self.ops.iter().enumerate() {
            if is_set(done, i) || op.optional() {
                continue;
            }
            complete = false;
            min_ret = min_ret.min(op.ret.unwrap_or(u64::MAX));
        }
        if complete {
            return Some(true);
        }
        for (i, op) in self.ops.iter().enumerate() {
            if op.call >= min_ret {
                break;
            }
            if is_set(done, i) {
                continue;
            }
            let Some(next) = op.step(state) else {
                continue;
            };
            let mut bits = done.to_vec();
            bits[i / 64] |= 1 << (i % 64);
            if self.seen.contains(&(bits.clone(), next)) {
                continue;
            }
            if self.seen.len() >= self.budget {
                return None;
            }
            self.seen.insert((bits.clone(), next));
            if self.dfs(&bits, next)? {
                return Some(true);
            }
        }
        Some(false)
    }
}

#[cfg(test)]
mod tests {
    use super::Outcome::{Fail, Ok, Unknown};
    use super::*;

    const B: usize = 100_000;

    fn w(call: u64, ret: u64, expect: Option<u64>, new: u64) -> Op {
        Op::cas(call, Some(ret), expect, new, Ok)
    }

    #[test]
    fn not_linearizable_histories_are_rejected() {
        let cases: Vec<(&str, Vec<Op>)> = vec![
            (
                "stale read after an acknowledged write",
                vec![w(0, 10, None, 1), Op::read(20, 30, None)],
            ),
            (
                "two creates both succeed",
                vec![w(0, 10, None, 1), w(5, 15, None, 2)],
            ),
            (
                "read of a value never written",
                vec![Op::read(0, 5, Some(7))],
            ),
            (
                "reads go back in time",
                vec![
                    w(0, 100, None, 1),
                    Op::read(10, 20, Some(1)),
                    Op::read(30, 40, None),
                ],
            ),
            (
                "a failed CAS whose condition held",
                vec![w(0, 10, None, 1), Op::cas(20, Some(30), Some(1), 2, Fail)],
            ),
            (
                "lost update: two CAS from the same value both succeed",
                vec![
                    w(0, 5, None, 1),
                    w(10, 20, Some(1), 2),
                    w(10, 20, Some(1), 3),
                ],
            ),
            (
                "read sees a write that was overwritten before the read began",
                vec![
                    w(0, 5, None, 1),
                    w(6, 10, Some(1), 2),
                    Op::read(20, 30, Some(1)),
                ],
            ),
            (
                "an unknown write cannot justify a value it did not write",
                vec![
                    Op::cas(0, None, None, 1, Unknown),
                    Op::read(10, 20, Some(2)),
                ],
            ),
            (
                "an unknown write cannot be undone",
                vec![
                    Op::cas(0, None, None, 1, Unknown),
                    Op::read(10, 20, Some(1)),
                    Op::read(30, 40, None),
                ],
            ),
        ];
        for (name, h) in cases {
            assert_eq!(check(&h, B), Verdict::NotLinearizable, "{name}");
        }
    }

    #[test]
    fn linearizable_histories_are_accepted() {
        let cases: Vec<(&str, Vec<Op>)> = vec![
            ("empty", vec![]),
            (
                "read overlapping a write sees it",
                vec![w(0, 10, None, 1), Op::read(5, 6, Some(1))],
            ),
            (
                "read overlapping a write misses it",
                vec![w(0, 10, None, 1), Op::read(5, 6, None)],
            ),
            (
                "concurrent creates: one wins",
                vec![
                    w(0, 10, None, 1),
                    Op::cas(0, Some(10), None, 2, Fail),
                    Op::read(20, 30, Some(1)),
                ],
            ),
            (
                "unknown write observed later",
                vec![
                    Op::cas(0, None, None, 1, Unknown),
                    Op::read(50, 60, None),
                    Op::read(70, 80, Some(1)),
                ],
            ),
            (
                "unknown write never took effect",
                vec![
                    Op::cas(0, None, None, 1, Unknown),
                    Op::read(100, 110, None),
                    w(120, 130, None, 2),
                ],
            ),
            (
                "chain of CAS with interleaved reads",
                vec![
                    w(0, 10, None, 1),
                    w(11, 20, Some(1), 2),
                    Op::read(15, 25, Some(2)),
                    Op::cas(15, Some(25), Some(1), 3, Fail),
                    w(26, 30, Some(2), 3),
                    Op::read(31, 32, Some(3)),
                ],
            ),
        ];
        for (name, h) in cases {
            assert_eq!(check(&h, B), Verdict::Linearizable, "{name}");
        }
    }

    /// Histories made by running the register for real (random overlapping clients on a
    /// shared sequential register) are linearizable; the same with one read corrupted
    /// to a value that was already overwritten is not. Also a rough speed check.
    #[test]
    fn randomized_histories() {
        let mut rng = fastrand::Rng::with_seed(7);
        for round in 0..50 {
            let mut reg: Option<u64> = None;
            let mut known: Vec<Option<u64>> = vec![None; 4];
            let mut h = Vec::new();
            let mut t = 0u64;
            let mut next = 1u64;
            for _ in 0..60 {
                let c = rng.usize(..4);
                // Each op takes effect at `t`; its call and return straddle it.
                let call = t.saturating_sub(rng.u64(0..30));
                let ret = t + rng.u64(1..30);
                if rng.bool() {
                    h.push(Op::read(call, ret, reg));
                    known[c] = reg;
                } else {
                    let expect = known[c];
                    let new = next;
                    next += 1;
                    let outcome = if reg == expect {
                        reg = Some(new);
                        known[c] = reg;
                        if rng.u8(..10) == 0 {
                            Unknown
                        } else {
                            Ok
                        }
                    } else {
                        Fail
                    };
                    h.push(Op::cas(call, Some(ret), expect, new, outcome));
                }
                t += 40;
            }
            let started = std::time::Instant::now();
            assert_eq!(check(&h, 1_000_000), Verdict::Linearizable, "round {round}");
            assert!(started.elapsed() < std::time::Duration::from_secs(2));
            // Corrupt: a read well after two later writes returns an older value.
            let writes: Vec<u64> = h
                .iter()
                .filter_map(|o| match o.kind {
                    OpKind::Cas {
                        new, outcome: Ok, ..
                    } => Some(new),
                    _ => None,
                })
                .collect();
            if writes.len() >= 2 {
                let mut bad = h.clone();
                bad.push(Op::read(t + 100, t + 110, Some(writes[0])));
                assert_eq!(check(&bad, 1_000_000), Verdict::NotLinearizable);
            }
        }
    }
}
