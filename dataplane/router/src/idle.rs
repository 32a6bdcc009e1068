//! Hot path: idle keep-alive connections of one core, expired by a once-a-second sweep
//! instead of a timer per connection (a monoio timer entry is ~640 bytes; an entry here
//! is 32). An expired connection's socket is shut down, which wakes its readiness wait.
//! A connection idle for [`PARK_AFTER_SECS`] is asked to park (its waker is woken): it
//! moves to the core's [`crate::park::Parked`] set and its task ends. A connection still
//! waiting for its first request expires at the header timeout, counted from its start,
//! instead of the idle one. The clock is coarse (one tick a second), so an entry expires
//! only after *more* than its limit in ticks: at least the whole limit, at most a second
//! more (an entry made just before a tick must not lose that second).

use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::task::{Poll, Waker};

/// Sweeps (seconds) of idleness after which a connection is asked to park: idle for
/// at least one full second, so busy keep-alive connections never pay for parking.
pub const PARK_AFTER_SECS: u32 = 2;

struct Entry {
    fd: RawFd,
    gen: u32,
    /// Sweep second it went idle, or (`first`) at which the connection started.
    since: u32,
    live: bool,
    park: bool,
    /// No request yet: the header timeout applies, not the idle timeout.
    first: bool,
    waker: Option<Waker>,
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
    /// Registers an idle connection; `first`: it has had no request yet, and started at
    /// that second of [`IdleSet::now`] (its header timeout counts from there, however
    /// often it comes back idle meanwhile, e.g. after empty lines).
    pub fn enter(&self, fd: RawFd, first: Option<u32>) -> Ticket {
        let mut entries = self.entries.borrow_mut();
        let since = first.unwrap_or(self.now.get());
        let first = first.is_some();
        match self.free.borrow_mut().pop() {
            Some(i) => {
                let e = &mut entries[i as usize];
                e.gen = e.gen.wrapping_add(1);
                e.fd = fd;
                e.since = since;
                e.live = true;
                e.park = false;
                e.first = first;
                e.waker = None;
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
                    park: false,
                    first,
                    waker: None,
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
        e.waker = None;
        self.free.borrow_mut().push(t.index);
        true
    }

    /// The sweep second at which the entry went idle (or, before its first request, at
    /// which its connection started).
    pub fn since(&self, t: Ticket) -> u32 {
        self.entries.borrow()[t.index as usize].since
    }

    /// The core's coarse clock (seconds since the core started, advanced by the sweep).
    pub fn now(&self) -> u32 {
        self.now.get()
    }

    /// Resolves when the sweep asks this idle connection to park.
    pub async fn park_requested(&self, t: Ticket) {
        std::future::poll_fn(|cx| {
            let mut entries = self.entries.borrow_mut();
            let e = &mut entries[t.index as usize];
            if e.gen == t.gen && e.live && e.park {
                return Poll::Ready(());
            }
            if !e.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                e.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// Expires every idle connection now (draining after a handover).
    pub fn expire_all(&self) -> usize {
        let mut n = 0;
        let mut entries = self.entries.borrow_mut();
        let mut free = self.free.borrow_mut();
        for (i, e) in entries.iter_mut().enumerate() {
            if e.live {
                e.live = false;
                e.waker = None;
                free.push(i as u32);
                flynn_runtime::sock::shutdown(e.fd);
                n += 1;
            }
        }
        n
    }

    /// Advances the clock one second, expires entries idle for more than `limit_secs`
    /// ticks (`first_limit_secs` for those with no request yet, since their start): at
    /// least that many seconds, whenever between two ticks they came, and at most one
    /// more. With `park`, asks those idle for [`PARK_AFTER_SECS`] to park. Returns how
    /// many were expired.
    pub fn sweep(&self, limit_secs: u32, first_limit_secs: u32, park: bool) -> usize {
        let now = self.now.get() + 1;
        self.now.set(now);
        let mut n = 0;
        let mut entries = self.entries.borrow_mut();
        let mut free = self.free.borrow_mut();
        for (i, e) in entries.iter_mut().enumerate() {
            if !e.live {
                continue;
            }
            let idle = now.saturating_sub(e.since);
            let limit = if e.first {
                first_limit_secs
            } else {
                limit_secs
            };
            if idle > limit {
                e.live = false;
                e.waker = None;
                free.push(i as u32);
                flynn_runtime::sock::shutdown(e.fd);
                n += 1;
            } else if park && idle >= PARK_AFTER_SECS && !e.park {
                e.park = true;
                if let Some(w) = e.waker.take() {
                    w.wake();
                }
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_idle_entries_are_asked_to_park_once() {
        use std::future::Future;
        let set = IdleSet::default();
        let a = set.enter(-1, None);
        let requested = |t| {
            let mut f = std::pin::pin!(set.park_requested(t));
            let mut cx = std::task::Context::from_waker(Waker::noop());
            f.as_mut().poll(&mut cx).is_ready()
        };
        assert!(!requested(a));
        assert_eq!(set.sweep(100, 100, true), 0);
        assert!(!requested(a), "idle under {PARK_AFTER_SECS} sweeps");
        assert_eq!(set.sweep(100, 100, true), 0);
        assert!(requested(a));
        // A new connection in the same slot starts over.
        assert!(set.leave(a));
        let b = set.enter(-1, None);
        assert!(!requested(b));
        assert!(!requested(a), "stale ticket");
        // Without parking (TLS-only cores, draining) nothing is asked.
        let set2 = IdleSet::default();
        let c = set2.enter(-1, None);
        for _ in 0..5 {
            set2.sweep(100, 100, false);
        }
        let mut f = std::pin::pin!(set2.park_requested(c));
        let mut cx = std::task::Context::from_waker(Waker::noop());
        assert!(f.as_mut().poll(&mut cx).is_pending());
    }

    #[test]
    fn expiry_and_reuse() {
        let set = IdleSet::default();
        let a = set.enter(-1, None);
        let b = set.enter(-1, None);
        assert!(set.leave(a));
        let c = set.enter(-1, None); // reuses a's slot with a new generation
        assert!(
            !set.leave(a),
            "a stale ticket must not remove the new entry"
        );
        assert_eq!(set.sweep(2, 2, false), 0);
        // Entered maybe just before this tick: not yet 2 s for sure.
        assert_eq!(set.sweep(2, 2, false), 0);
        assert_eq!(set.sweep(2, 2, false), 2); // b and c idle for at least 2 s
        assert!(!set.leave(b));
        assert!(!set.leave(c));
        let d = set.enter(-1, None);
        assert_eq!(set.sweep(2, 2, false), 0);
        assert_eq!(set.sweep(2, 2, false), 0);
        assert!(set.leave(d));
    }

    #[test]
    fn connections_without_a_request_expire_at_their_own_limit() {
        let set = IdleSet::default();
        let fresh = set.enter(-1, Some(set.now()));
        let kept = set.enter(-1, None);
        assert_eq!(set.sweep(5, 2, false), 0);
        assert_eq!(set.sweep(5, 2, false), 0, "maybe only 1 s and a bit");
        assert_eq!(set.sweep(5, 2, false), 1, "no request within 2 s");
        assert!(!set.leave(fresh));
        assert!(set.leave(kept));
    }

    /// A limit of 1 s does not expire a connection at the tick right after it came
    /// (maybe a few milliseconds later), and a connection's first-request limit counts
    /// from its start however often it comes back idle (empty lines).
    #[test]
    fn expiry_waits_for_the_whole_limit_and_the_first_one_counts_from_the_start() {
        let set = IdleSet::default();
        let start = set.now();
        let a = set.enter(-1, Some(start));
        assert_eq!(set.sweep(5, 1, false), 0, "expired at the first tick");
        // Back from a read of empty lines: the same start.
        assert!(set.leave(a));
        let a = set.enter(-1, Some(start));
        assert_eq!(set.sweep(5, 1, false), 1);
        assert!(!set.leave(a));
    }
}
