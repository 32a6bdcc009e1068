//! Hot path: idle keep-alive connections of one core, expired by a once-a-second sweep
//! instead of a timer per connection (a monoio timer entry is ~640 bytes; an entry here
//! is 16). An expired connection's socket is shut down, which wakes its readiness wait.

use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;

#[derive(Clone, Copy)]
struct Entry {
    fd: RawFd,
    gen: u32,
    since: u32,
    live: bool,
}

/// A registration, returned by [`IdleSet::enter`].
#[derive(Clone, Copy)]
pub struct Ticket {
    index: u32,
    gen: u32,
}

#[derive(Default)]
pub struct IdleSet {
    entries: RefCell<Vec<Entry>>,
    free: RefCell<Vec<u32>>,
    /// Coarse clock in seconds, advanced by the sweep.
    now: Cell<u32>,
}

impl IdleSet {
    pub fn enter(&self, fd: RawFd) -> Ticket {
        let mut entries = self.entries.borrow_mut();
        let since = self.now.get();
        match self.free.borrow_mut().pop() {
            Some(i) => {
                let e = &mut entries[i as usize];
                e.gen = e.gen.wrapping_add(1);
                *e = Entry {
                    fd,
                    gen: e.gen,
                    since,
                    live: true,
                };
                Ticket {
                    index: i,
                    gen: e.gen,
                }
            }
            None => {
                entries.push(Entry {
                    fd,
                    gen: 0,
                    since,
                    live: true,
                });
                Ticket {
                    index: (entries.len() - 1) as u32,
                    gen: 0,
                }
            }
        }
    }

    /// Unregisters; returns false if the sweep expired the connection meanwhile.
    pub fn leave(&self, t: Ticket) -> bool {
        let mut entries = self.entries.borrow_mut();
        let e = &mut entries[t.index as usize];
        if e.gen != t.gen || !e.live {
            return false;
        }
        e.live = false;
        self.free.borrow_mut().push(t.index);
        true
    }

    /// Expires every idle connection now (draining after a handover).
    pub fn expire_all(&self) -> usize {
        let mut n = 0;
        let mut entries = self.entries.borrow_mut();
        let mut free = self.free.borrow_mut();
        for (i, e) in entries.iter_mut().enumerate() {
            if e.live {
                e.live = false;
                free.push(i as u32);
                flynn_runtime::sock::shutdown(e.fd);
                n += 1;
            }
        }
        n
    }

    /// Advances the clock one second and expires entries idle for `limit_secs` or more;
    /// returns how many were expired.
    pub fn sweep(&self, limit_secs: u32) -> usize {
        let now = self.now.get() + 1;
        self.now.set(now);
        let mut n = 0;
        let mut entries = self.entries.borrow_mut();
        let mut free = self.free.borrow_mut();
        for (i, e) in entries.iter_mut().enumerate() {
            if e.live && now.saturating_sub(e.since) >= limit_secs {
                e.live = false;
                free.push(i as u32);
                flynn_runtime::sock::shutdown(e.fd);
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_and_reuse() {
        let set = IdleSet::default();
        let a = set.enter(-1);
        let b = set.enter(-1);
        assert!(set.leave(a));
        let c = set.enter(-1); // reuses a's slot with a new generation
        assert!(
            !set.leave(a),
            "a stale ticket must not remove the new entry"
        );
        assert_eq!(set.sweep(2), 0);
        assert_eq!(set.sweep(2), 2); // b and c idle for 2 s
        assert!(!set.leave(b));
        assert!(!set.leave(c));
        let d = set.enter(-1);
        assert_eq!(set.sweep(2), 0);
        assert!(set.leave(d));
    }
}
