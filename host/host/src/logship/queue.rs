//! One aggregator's send queue, kept per app.

use std::collections::VecDeque;
use std::sync::Arc;

use super::{Capacity, Frame};

/// One aggregator's send queue, per app: each app's frames oldest first, every frame with
/// its place in push order, in which they are taken (across apps). Over budget, the oldest
/// frames of the app holding the most lines (over the byte budget: the most bytes) leave
/// it, so during an outage one chatty app pushes out its own lines, not every app's; a
/// quiet app keeps what it wrote. (Flynn's logmux keeps a buffer per app for that.) Frames
/// leave in batches, down to 99 % of the budget ([`Queue::evict`]), so a queue kept full
/// does not look for the app holding the most on every push (a batch loses only 1 % of the
/// budget that would otherwise have survived: 100 lines by default).
#[derive(Default)]
pub(super) struct Queue {
    apps: std::collections::BTreeMap<Arc<str>, AppQueue>,
    lines: usize,
    pub(super) bytes: usize,
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
    pub(super) fn len(&self) -> usize {
        self.lines
    }

    pub(super) fn push_back(&mut self, f: Frame) {
        let n = self.next;
        self.next += 1;
        self.insert(n, f, false);
    }

    /// Puts back a frame [`Queue::take`] took (the newest of them first): ahead of the
    /// frames of its app, all pushed after it.
    pub(super) fn push_front(&mut self, n: u64, f: Frame) {
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
    pub(super) fn take(&mut self, max: usize) -> Vec<(u64, Frame)> {
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
    pub(super) fn evict(&mut self, cap: Capacity) -> Vec<Frame> {
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
    pub(super) fn first_pos(&self) -> Option<crate::logdisk::Pos> {
        self.apps
            .values()
            .filter_map(|a| a.frames.iter().find_map(|(_, f)| f.2.pos()))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logship::Stored;

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
}
