//! Snapshot publication from a control thread to the cores.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

/// The current snapshot of some state, replaced whole by the control thread.
pub struct Published<T> {
    current: ArcSwap<T>,
    version: AtomicU64,
}

impl<T> Published<T> {
    pub fn new(initial: T) -> Self {
        Published {
            current: ArcSwap::from_pointee(initial),
            version: AtomicU64::new(0),
        }
    }

    /// Replaces the snapshot; cores see it at their next [`Local::refresh`].
    pub fn publish(&self, next: T) {
        self.current.store(Arc::new(next));
        self.version.fetch_add(1, Ordering::Release);
    }

    /// The current snapshot (takes a reference count; not for per-request use).
    pub fn load_full(&self) -> Arc<T> {
        self.current.load_full()
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }
}

/// A core's cached copy of a [`Published`] snapshot. Refreshing costs one atomic load
/// when nothing changed; requests in flight keep the snapshot they started with.
pub struct Local<T> {
    cached: Arc<T>,
    version: u64,
}

impl<T> Local<T> {
    pub fn new(p: &Published<T>) -> Self {
        let version = p.version();
        Local {
            cached: p.load_full(),
            version,
        }
    }

    /// Picks up a newer snapshot if one was published; returns true when it changed.
    pub fn refresh(&mut self, p: &Published<T>) -> bool {
        let v = p.version();
        if v == self.version {
            return false;
        }
        self.cached = p.load_full();
        self.version = v;
        true
    }

    pub fn get(&self) -> &Arc<T> {
        &self.cached
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_sees_publications() {
        let p = Published::new(1u32);
        let mut l = Local::new(&p);
        assert_eq!(**l.get(), 1);
        assert!(!l.refresh(&p));
        let held = l.get().clone();
        p.publish(2);
        assert!(l.refresh(&p));
        assert_eq!(**l.get(), 2);
        // A request that started on the old snapshot still has it.
        assert_eq!(*held, 1);
    }
}
