//! Hot path: one core's open byte tunnels (TCP route connections, upgraded HTTP
//! connections), closed by the once-a-second sweep when no bytes have moved either way
//! for the tunnel timeout, or for the half-close timeout once one side has finished
//! sending (HAProxy's `timeout tunnel` and `timeout client-fin`). A read stores the
//! sweep's coarse clock in its entry: no timer per read. A closed tunnel's sockets are
//! shut down, which ends both directions' waits. A read that fails on one side ends the
//! tunnel too, without losing what was already relayed to the other side
//! ([`Tunnel::read_failed`], [`Tunnel::end_survivor`]).

use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::time::Duration;

/// How often, at most, [`Tunnel::end_survivor`] checks whether the surviving side's peer
/// has everything (it starts at 5 ms and doubles up to this).
const LINGER_CHECK_MAX: Duration = Duration::from_millis(100);

struct Entry {
    fds: [RawFd; 2],
    gen: u32,
    /// Sweep second of the last read either way.
    last: u32,
    /// One side has finished sending.
    half: bool,
    live: bool,
}

#[derive(Default)]
pub struct Tunnels {
    entries: RefCell<Vec<Entry>>,
    free: RefCell<Vec<u32>>,
    /// Coarse clock in seconds, advanced by the sweep.
    now: Cell<u32>,
    /// How long the side left after the other's failure is held, at most, for its peer to
    /// take what was relayed to it ([`Tunnel::end_survivor`]); zero: not at all.
    linger: Duration,
}

/// An open tunnel's registration; dropping it unregisters the tunnel.
pub struct Tunnel<'a> {
    set: &'a Tunnels,
    index: u32,
    gen: u32,
    /// Its two sockets, as given to [`Tunnels::open`].
    fds: [RawFd; 2],
    /// The side left after the other's read failed, whose input [`Tunnel::finish`] drops.
    survivor: Cell<Option<RawFd>>,
    /// A read failed on either side: what the survivor still sends is dropped.
    failed: Cell<bool>,
    /// Directions still being relayed ([`Tunnel::direction_done`]).
    running: Cell<u8>,
}

impl Tunnels {
    /// A set whose tunnels, when one side fails, hold the other for at most `linger`
    /// ([`Tunnel::end_survivor`]).
    pub fn lingering(linger: Duration) -> Tunnels {
        Tunnels {
            linger,
            ..Tunnels::default()
        }
    }

    /// Registers a tunnel between the sockets `a` and `b`.
    pub fn open(&self, a: RawFd, b: RawFd) -> Tunnel<'_> {
        let mut entries = self.entries.borrow_mut();
        let e = Entry {
            fds: [a, b],
            gen: 0,
            last: self.now.get(),
            half: false,
            live: true,
        };
        let (index, gen) = match self.free.borrow_mut().pop() {
            Some(i) => {
                let slot = &mut entries[i as usize];
                let gen = slot.gen.wrapping_add(1);
                *slot = Entry { gen, ..e };
                (i, gen)
            }
            None => {
                entries.push(e);
                ((entries.len() - 1) as u32, 0)
            }
        };
        Tunnel {
            set: self,
            index,
            gen,
            fds: [a, b],
            survivor: Cell::new(None),
            failed: Cell::new(false),
            running: Cell::new(2),
        }
    }

    /// Tunnels open now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.borrow().iter().filter(|e| e.live).count()
    }

    /// Advances the clock one second and closes the tunnels idle for more than `idle_secs`
    /// (or, once half-closed, `fin_secs`); 0 turns a limit off. Returns how many were
    /// closed.
    pub fn sweep(&self, idle_secs: u32, fin_secs: u32) -> usize {
        let now = self.now.get() + 1;
        self.now.set(now);
        let mut closed = 0;
        let mut entries = self.entries.borrow_mut();
        for e in entries.iter_mut().filter(|e| e.live) {
            let idle = now.saturating_sub(e.last);
            let limit = match (e.half, idle_secs, fin_secs) {
                (true, i, f) if f > 0 && (i == 0 || f < i) => f,
                (_, i, _) => i,
            };
            // More than `limit` sweeps: at least `limit` seconds since the last read, which
            // may have come just before a sweep.
            if limit > 0 && idle > limit {
                // Stays registered (its owner still unregisters it); just not twice.
                e.live = false;
                for fd in e.fds {
                    flynn_runtime::sock::shutdown(fd);
                }
                closed += 1;
            }
        }
        closed
    }
}

impl Tunnel<'_> {
    fn with(&self, f: impl FnOnce(&mut Entry)) {
        let mut entries = self.set.entries.borrow_mut();
        let e = &mut entries[self.index as usize];
        if e.gen == self.gen {
            f(e);
        }
    }

    /// Bytes moved: the idle clock starts over.
    #[inline]
    pub fn touch(&self) {
        let now = self.set.now.get();
        self.with(|e| e.last = now);
    }

    /// A read from side `from` (0 or 1, as given to [`Tunnels::open`]) failed (a reset):
    /// the tunnel ends, at once rather than with a half-close that a silent peer would
    /// hold for the tunnel timeout, but without losing what was already relayed to the
    /// other side. The failed side is aborted ([`flynn_runtime::sock::abort`]: a write
    /// waiting on it fails now); the other one, if it has not failed too, is the survivor,
    /// which the failed side's pipe then ends ([`Tunnel::end_survivor`]) while the
    /// survivor's own pipe reads and drops what it still sends.
    pub fn read_failed(&self, from: usize) {
        let (failed, other) = (self.fds[from], self.fds[1 - from]);
        flynn_runtime::sock::abort(failed);
        self.failed.set(true);
        match self.survivor.get() {
            // Both sides failed: nothing is left to deliver.
            Some(s) if s == failed => self.survivor.set(None),
            Some(_) => {}
            None => self.survivor.set(Some(other)),
        }
    }

    /// Whether a read failed on either side: the survivor's input is then dropped.
    #[inline]
    pub fn failed(&self) -> bool {
        self.failed.get()
    }

    /// Whether side `side` is the survivor of the other's failure.
    pub fn survives(&self, side: usize) -> bool {
        self.failed.get() && self.survivor.get() == Some(self.fds[side])
    }

    /// One direction has ended (its pipe returns).
    pub fn direction_done(&self) {
        self.running.set(self.running.get().saturating_sub(1));
    }

    /// Whether the other direction is still being relayed (called from one that is).
    pub fn other_running(&self) -> bool {
        self.running.get() > 1
    }

    /// Ends the survivor `to` of the other side's failure, through `w`, its writing half
    /// (lent by the failed side's pipe, which was relaying to it): a lingering close, as
    /// the HTTP path's. `w` is shut down (TLS: close_notify first, so the client sees a
    /// clean end, not a truncation; then the FIN, after what is already queued), then,
    /// while the survivor's pipe keeps reading and dropping its input (closed or shut down
    /// for reading over unread or arriving input, the kernel would reset the connection
    /// and drop what is still queued to it: a peer that is still sending, as a client
    /// typically is when its backend reset, would lose the end of the answer), this waits
    /// until its peer has acknowledged everything, FIN included, or has finished sending
    /// itself, or at most the set's linger time. Then the survivor is shut down both ways,
    /// which ends its pipe; [`Tunnel::finish`] empties its input before the close. Async,
    /// on the core: the core is never blocked, the survivor held at most the linger time.
    pub async fn end_survivor<W: monoio::io::AsyncWriteRent>(&self, to: usize, w: &mut W) {
        if !self.survives(to) {
            return;
        }
        let fd = self.fds[to];
        let deadline = monoio::time::Instant::now() + self.set.linger;
        let _ = monoio::time::timeout_at(deadline, w.shutdown()).await;
        let mut every = Duration::from_millis(5);
        loop {
            if !self.survives(to) {
                // It failed too meanwhile (and was aborted).
                return;
            }
            let delivered = flynn_runtime::sock::unacked(fd).is_ok_and(|n| n == 0);
            let now = monoio::time::Instant::now();
            if delivered || flynn_runtime::sock::peer_shut(fd) || now >= deadline {
                break;
            }
            monoio::time::sleep(every.min(deadline - now)).await;
            every = (every * 2).min(LINGER_CHECK_MAX);
        }
        flynn_runtime::sock::shutdown(fd);
    }

    /// Call when both directions have ended, right before the sockets close (no await in
    /// between): after a failed read, the survivor's input is taken and dropped, so its
    /// close finds nothing unread and closes gracefully (what may still be queued to it is
    /// delivered, then the FIN) instead of resetting the connection.
    pub fn finish(&self) {
        if let Some(fd) = self.survivor.take() {
            flynn_runtime::sock::discard_input(fd);
        }
    }

    /// One side has finished sending: the half-close limit applies from now on.
    pub fn half_closed(&self) {
        let now = self.set.now.get();
        self.with(|e| {
            e.half = true;
            e.last = now;
        });
    }
}

impl Drop for Tunnel<'_> {
    fn drop(&mut self) {
        let mut entries = self.set.entries.borrow_mut();
        let e = &mut entries[self.index as usize];
        if e.gen == self.gen {
            e.live = false;
            // A new generation makes any copy of this ticket stale.
            e.gen = e.gen.wrapping_add(1);
            self.set.free.borrow_mut().push(self.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    /// Whether `peer` sees the connection shut down (EOF) within 1 s.
    fn shut(peer: &mut std::net::TcpStream) -> bool {
        use std::io::Read;
        peer.set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let mut b = [0u8; 1];
        matches!(peer.read(&mut b), Ok(0))
    }

    #[test]
    fn idle_tunnels_are_shut_down_and_active_ones_kept() {
        let set = Tunnels::default();
        let (a, mut a_peer) = pair();
        let (b, mut b_peer) = pair();
        let t = set.open(a.as_raw_fd(), b.as_raw_fd());
        assert_eq!(set.sweep(3, 0), 0);
        assert_eq!(set.sweep(3, 0), 0);
        t.touch(); // at second 2, maybe just before the next sweep
        assert_eq!(set.sweep(3, 0), 0);
        assert_eq!(set.sweep(3, 0), 0);
        assert_eq!(set.sweep(3, 0), 0);
        assert!(!shut(&mut a_peer), "closed while maybe only idle 2 s of 3");
        assert_eq!(set.sweep(3, 0), 1, "idle at least 3 s");
        assert!(
            shut(&mut a_peer) && shut(&mut b_peer),
            "both sockets shut down"
        );
        assert_eq!(set.sweep(3, 0), 0, "closed once");
        assert_eq!(set.len(), 0);
        drop(t);
        // The slot is reused; the new tunnel starts idle at zero.
        let (c, _c_peer) = pair();
        let t2 = set.open(c.as_raw_fd(), c.as_raw_fd());
        assert_eq!(set.len(), 1);
        assert_eq!(set.sweep(3, 0), 0);
        drop(t2);
        assert_eq!(set.len(), 0);
    }

    #[test]
    fn half_closed_tunnels_get_the_fin_limit_and_zero_turns_limits_off() {
        let set = Tunnels::default();
        let (a, mut a_peer) = pair();
        let t = set.open(a.as_raw_fd(), a.as_raw_fd());
        for _ in 0..10 {
            assert_eq!(set.sweep(0, 2), 0, "no idle limit, not half-closed");
        }
        t.half_closed();
        assert_eq!(set.sweep(0, 2), 0);
        assert_eq!(set.sweep(0, 2), 0);
        assert_eq!(set.sweep(0, 2), 1, "half-closed and idle at least 2 s");
        assert!(shut(&mut a_peer));
        drop(t);

        // A fin limit above the idle limit does not extend it.
        let (b, _b_peer) = pair();
        let t = set.open(b.as_raw_fd(), b.as_raw_fd());
        t.half_closed();
        assert_eq!(set.sweep(1, 5), 0);
        assert_eq!(set.sweep(1, 5), 1);
        drop(t);

        // A stale registration touches nothing.
        let (c, _c_peer) = pair();
        let t = set.open(c.as_raw_fd(), c.as_raw_fd());
        let stale = Tunnel {
            set: &set,
            index: t.index,
            gen: t.gen.wrapping_sub(1),
            fds: t.fds,
            survivor: Cell::new(None),
            failed: Cell::new(false),
            running: Cell::new(2),
        };
        stale.half_closed();
        drop(stale);
        assert_eq!(set.len(), 1, "the stale ticket did not unregister it");
        assert_eq!(set.sweep(0, 1), 0);
        assert_eq!(set.sweep(0, 1), 0, "the stale ticket did not half-close it");
        drop(t);
    }
}
