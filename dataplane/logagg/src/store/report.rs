//! What the store reports, off the hot path (each call locks every shard in turn): the host
//! cursors (`/cursors`), per-app figures and store-wide totals (`/metrics`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::{Cursor, Store, Totals, SHARDS};

/// Per-app figures for metrics.
#[derive(Debug, Clone)]
pub struct AppStats {
    pub app: String,
    pub lines: usize,
    pub bytes: usize,
    pub evicted_capacity: u64,
    pub evicted_memory: u64,
    pub duplicates: u64,
    pub followers: usize,
}

impl Store {
    /// Host cursors merged across shards.
    pub fn cursors(&self) -> Vec<(String, Cursor)> {
        let mut all: HashMap<Box<[u8]>, Cursor> = HashMap::new();
        for i in 0..SHARDS {
            let s = self.shard_at(i);
            for (h, c) in &s.cursors {
                let e = all.entry(h.clone()).or_insert(*c);
                if (c.time, c.seq) > (e.time, e.seq) {
                    *e = *c;
                }
            }
        }
        let mut v: Vec<_> = all
            .into_iter()
            .map(|(h, c)| (String::from_utf8_lossy(&h).into_owned(), c))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Reclaim passes run since start.
    pub fn reclaim_passes(&self) -> u64 {
        self.reclaim_passes.load(Ordering::Relaxed)
    }

    /// Eviction and duplicate counts over the whole store, removed apps included.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for i in 0..SHARDS {
            let s = self.shard_at(i);
            t += s.gone;
            for a in s.apps.values() {
                t += a.counts();
            }
        }
        t
    }

    pub fn stats(&self) -> Vec<AppStats> {
        let mut v = Vec::new();
        for i in 0..SHARDS {
            let s = self.shard_at(i);
            for (app, a) in &s.apps {
                v.push(AppStats {
                    app: String::from_utf8_lossy(app).into_owned(),
                    lines: a.ring.len(),
                    bytes: a.bytes,
                    evicted_capacity: a.evicted_capacity,
                    evicted_memory: a.evicted_memory,
                    duplicates: a.duplicates,
                    followers: a.followers,
                });
            }
        }
        v.sort_by(|a, b| a.app.cmp(&b.app));
        v
    }
}
