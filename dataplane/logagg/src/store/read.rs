//! Hot path: reading the store. History ([`Store::history`], registering a follower under
//! the same lock), a follower's live reads ([`Store::read_from`]) and whole-store reads for
//! peers ([`Store::read_all_fair`], with the [`Positions`] they advance). Each locks one shard
//! at a time to copy lines out.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::Notify;

use super::{shard_of, Store, SHARDS};
use crate::line::{Filter, Line};

/// Lines read for a follower plus how far it got.
#[derive(Debug, Default)]
pub struct Batch {
    pub lines: Vec<Line>,
    /// Lines that were evicted before this reader got to them.
    pub skipped: u64,
    pub next: u64,
    /// The scan stopped before the newest line: read again without waiting for a wake-up.
    pub behind: bool,
}

/// A follower's registration on one app; unregisters on drop.
pub struct Follow {
    store: Arc<Store>,
    app: Box<[u8]>,
    pub notify: Arc<Notify>,
}

impl Drop for Follow {
    fn drop(&mut self) {
        let mut s = self.store.shard(&self.app);
        if let Some(a) = s.apps.get_mut(&self.app) {
            a.followers = a.followers.saturating_sub(1);
            a.waiting &= a.followers > 0;
        }
        // A follow of a channel nobody logs to leaves nothing behind.
        s.remove_if_idle(&self.app, &self.store.apps);
        // Keep the estimate within its slack of the exact total (the app's charge left).
        if s.pending.unsigned_abs() >= self.store.flush_every {
            self.store.fold(&mut s.pending);
        }
    }
}

/// A whole-store follower registration; unregisters on drop.
pub struct FollowAll {
    store: Arc<Store>,
}

impl Drop for FollowAll {
    fn drop(&mut self) {
        self.store.any_followers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Lines of one app that one [`Store::read_all_fair`] call takes at most.
pub const READ_ALL_PER_APP: usize = 256;

/// A whole-store reader's next sequence number in each app it has read (absent = from the
/// start), kept per shard: a visit of a shard that leaves it more positions than the shard
/// has apps drops the positions of the apps the store no longer has, so a reader that stays
/// connected (a peer's `/snapshot?follow=true`) holds at most as many positions as the
/// store has apps, not one for every app it ever saw (and no extra work while no app goes).
/// A position left for a gone app is harmless: an app created again starts at its shard's
/// `seq_floor`, above any position in the app it replaces, so it is read from its start.
/// It also keeps where the reader's next [`Store::read_all_fair`] starts.
#[derive(Debug)]
pub struct Positions {
    shards: Box<[HashMap<Box<[u8]>, u64>]>,
    /// The shard the next read starts at, and how many of its apps (in the order its map
    /// yields them) the last read took its turn from already.
    next_shard: usize,
    next_app: usize,
}

impl Default for Positions {
    fn default() -> Positions {
        Positions {
            shards: (0..SHARDS).map(|_| HashMap::new()).collect(),
            next_shard: 0,
            next_app: 0,
        }
    }
}

impl Positions {
    /// The next sequence number to read in `app`, if it was read.
    pub fn get(&self, app: &[u8]) -> Option<u64> {
        self.shards[shard_of(app)].get(app).copied()
    }

    /// Apps with a position.
    pub fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Store {
    /// History: the last `n` matching lines (all when `n == 0`) in time order, plus the
    /// sequence number live reading continues from. With `follow`, the reader is
    /// registered under the same lock, so nothing falls between history and live.
    pub fn history(
        self: &Arc<Self>,
        app: &[u8],
        filter: &Filter,
        n: usize,
        follow: bool,
    ) -> (Vec<Line>, u64, Option<Follow>) {
        let mut s = self.shard(app);
        if follow && !s.apps.contains_key(app) {
            // Removed again when its last follower leaves with no line buffered.
            let a = s.new_app(&self.apps);
            s.apps.insert(app.into(), a);
            if s.pending.unsigned_abs() >= self.flush_every {
                self.fold(&mut s.pending);
            }
        }
        let Some(a) = s.apps.get_mut(app) else {
            return (Vec::new(), 1, None);
        };
        let next = a.next_seq;
        let follow = follow.then(|| {
            a.followers += 1;
            Follow {
                store: self.clone(),
                app: app.into(),
                notify: a.notify.clone(),
            }
        });
        // Following with no history asked for: nothing to copy (spec §3.4: live lines only).
        if follow.is_some() && n == 0 {
            return (Vec::new(), next, follow);
        }
        let sorted = a
            .ring
            .iter()
            .zip(a.ring.iter().skip(1))
            .all(|(x, y)| x.ts <= y.ts);
        let mut out = Vec::new();
        if sorted && n > 0 {
            for l in a.ring.iter().rev() {
                if out.len() == n {
                    break;
                }
                if filter.matches(&l.msg) {
                    out.push(l.clone());
                }
            }
            drop(s);
            out.reverse();
        } else {
            out.extend(a.ring.iter().filter(|l| filter.matches(&l.msg)).cloned());
            drop(s);
            out.sort_by_key(|l| (l.ts, l.seq));
            if n > 0 && out.len() > n {
                out.drain(..out.len() - n);
            }
        }
        (out, next, follow)
    }

    /// Live reading: up to `max` lines with `seq >= from`, filtered, scanning at most
    /// `4 × max` lines under the lock. Numbers from `from` up to `next` that are no longer
    /// buffered were evicted and are counted in `skipped`. With `behind` set the scan
    /// stopped short of the newest line and the caller should read again right away: the
    /// wake-up for the lines after it has already fired. Without it the reader caught up,
    /// and the app's next line wakes its `notify` (enabled before this read, it is not
    /// missed).
    pub fn read_from(&self, app: &[u8], from: u64, filter: &Filter, max: usize) -> Batch {
        self.read_from_within(app, from, filter, max, usize::MAX)
    }

    /// [`Store::read_from`] that also stops once the lines taken hold `max_bytes` of frames
    /// (at least one line is taken): a chunk ends at a byte size, and lines copied out past
    /// it under the shard's lock would only be dropped and read again.
    pub fn read_from_within(
        &self,
        app: &[u8],
        from: u64,
        filter: &Filter,
        max: usize,
        max_bytes: usize,
    ) -> Batch {
        let mut s = self.shard(app);
        let Some(a) = s.apps.get_mut(app) else {
            return Batch {
                next: from,
                ..Batch::default()
            };
        };
        let mut lines = Vec::new();
        let mut next = from;
        let mut skipped = 0;
        let mut bytes = 0usize;
        let mut rest = a.ring.range(a.index_of(from)..);
        for l in rest.by_ref().take(max * 4) {
            skipped += l.seq - next;
            next = l.seq + 1;
            if filter.matches(&l.msg) {
                lines.push(l.clone());
                bytes += l.msg.frame().len();
                if lines.len() >= max || bytes >= max_bytes {
                    break;
                }
            }
        }
        let behind = rest.len() > 0;
        if !behind {
            if a.next_seq > next {
                // The newest lines themselves were evicted.
                skipped += a.next_seq - next;
                next = a.next_seq;
            }
            a.waiting = true;
        }
        Batch {
            lines,
            skipped,
            next,
            behind,
        }
    }

    /// Registers a whole-store follower (see [`Store::read_all_since`]).
    pub fn follow_all(self: &Arc<Self>) -> FollowAll {
        self.any_followers.fetch_add(1, Ordering::Relaxed);
        FollowAll {
            store: self.clone(),
        }
    }

    /// Future that resolves at the next insert anywhere (after [`Store::follow_all`]) once
    /// enabled and followed by [`Store::any_read_begins`].
    pub fn any_notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.any_notify.notified()
    }

    /// A whole-store reader is about to read, its [`Store::any_notified`] enabled: the next
    /// insert wakes the readers again. Every insert after this either wakes them or finds
    /// that an insert since did, after this point, so no line goes unannounced.
    pub fn any_read_begins(&self) {
        self.any_dirty.store(false, Ordering::Release);
    }

    /// Every app's lines after its position in `pos` (absent = from the start), at most
    /// `max` lines per call; advances `pos`.
    pub fn read_all_since(&self, pos: &mut Positions, max: usize) -> Vec<(Box<[u8]>, Line)> {
        self.read_all_fair(pos, max, usize::MAX)
    }

    /// [`Store::read_all_since`] that takes at most [`READ_ALL_PER_APP`] lines of an app
    /// per call and ends once it has `max` lines or the lines taken hold `max_bytes` of app
    /// names and frames (at least one line is taken; a snapshot chunk ends at a byte size,
    /// as a follower's does). Each call starts where the last one stopped (kept in
    /// `positions`): at the next shard, or within a shard at the first app a bound left
    /// without a turn. A
    /// busy app (or shard) cannot keep a reader from ever reaching the others. (The apps of
    /// a shard are counted in its map's order, which an app created or removed between two
    /// calls may change: then an app may get a turn late or twice, and lose no line.)
    pub fn read_all_fair(
        &self,
        positions: &mut Positions,
        max: usize,
        max_bytes: usize,
    ) -> Vec<(Box<[u8]>, Line)> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let first = positions.next_shard % SHARDS;
        let skip = std::mem::take(&mut positions.next_app);
        // A call that starts within a shard comes back to that shard's first apps last: a
        // call that does not stop on a bound gives every app a turn, so an empty result
        // means every app was read to its end (a snapshot takes it for "caught up").
        let turns = SHARDS + usize::from(skip > 0);
        for k in 0..turns {
            let i = (first + k) % SHARDS;
            if out.len() >= max || bytes >= max_bytes {
                positions.next_shard = i;
                return out;
            }
            let (from_app, apps) = match k {
                0 => (skip, usize::MAX),
                k if k == SHARDS => (0, skip),
                _ => (0, usize::MAX),
            };
            let s = self.shard_at(i);
            let pos = &mut positions.shards[i];
            for (n, (app, a)) in s.apps.iter().enumerate().skip(from_app).take(apps) {
                if bytes >= max_bytes || out.len() >= max {
                    // This shard's other apps come first next time.
                    positions.next_shard = i;
                    positions.next_app = n;
                    return out;
                }
                let from = pos.get(app).copied().unwrap_or(1);
                if a.next_seq <= from || a.ring.is_empty() {
                    continue;
                }
                let take = max.saturating_sub(out.len()).clamp(1, READ_ALL_PER_APP);
                let mut next = from;
                let mut rest = a.ring.range(a.index_of(from)..);
                for l in rest.by_ref().take(take) {
                    out.push((app.clone(), l.clone()));
                    next = l.seq + 1;
                    bytes += app.len() + l.msg.frame().len();
                    if bytes >= max_bytes {
                        break;
                    }
                }
                if rest.len() == 0 {
                    next = a.next_seq;
                }
                pos.insert(app.clone(), next);
            }
            if pos.len() > s.apps.len() {
                // Some of these apps are gone from the store: forget them (see [`Positions`]).
                pos.retain(|app, _| s.apps.contains_key(app));
            }
        }
        positions.next_shard = (first + 1) % SHARDS;
        out
    }

    /// Every app's next sequence number now: what a reader that started now has to reach
    /// to have read everything stored before it started.
    pub fn heads(&self) -> HashMap<Box<[u8]>, u64> {
        let mut out = HashMap::new();
        for i in 0..SHARDS {
            let s = self.shard_at(i);
            for (app, a) in &s.apps {
                out.insert(app.clone(), a.next_seq);
            }
        }
        out
    }

    /// Whether `pos` (as [`Store::read_all_since`] advances it) has reached `heads` (as
    /// [`Store::heads`] returned them) for every app still stored.
    pub fn reached(&self, pos: &Positions, heads: &HashMap<Box<[u8]>, u64>) -> bool {
        heads.iter().all(|(app, &head)| {
            if pos.get(app).unwrap_or(1) >= head {
                return true;
            }
            // An app gone from the store (evicted whole) has nothing left to read; one
            // whose ring holds nothing before `head` neither.
            let s = self.shard_at(shard_of(app));
            s.apps
                .get(app)
                .is_none_or(|a| a.ring.is_empty() || a.ring.front().is_none_or(|l| l.seq >= head))
        })
    }
}
