//! Hot path (only for connections idle a second or more): parked keep-alive
//! connections. A parked connection has no task, no buffer and no runtime registration:
//! its socket (a duplicate fd) waits in the core's epoll set, and a slot here keeps
//! what serving it needs again (peer, listener, when it went idle), ~60 bytes in all
//! against a few hundred for an idle task. When the client sends (or closes), the
//! core's unpark loop takes the slot and spawns the connection loop again.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use flynn_runtime::park::Epoll;

use crate::worker::ListenerInfo;

pub struct Conn {
    pub fd: OwnedFd,
    pub peer: SocketAddr,
    pub info: ListenerInfo,
    /// Sweep second at which it went idle (the idle timeout counts from there), or
    /// (`first`) at which it started.
    pub since: u32,
    /// No request yet: it expires at the header timeout from its start, not the idle
    /// timeout.
    pub first: bool,
}

struct Slot {
    gen: u32,
    conn: Option<Conn>,
}

pub struct Parked {
    pub epoll: Epoll,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    count: std::cell::Cell<usize>,
}

impl Parked {
    pub fn new() -> std::io::Result<Parked> {
        Ok(Parked {
            epoll: Epoll::new()?,
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            count: std::cell::Cell::new(0),
        })
    }

    /// Parks `c`; gives it back if the kernel refuses to watch it.
    pub fn park(&self, c: Conn) -> Result<(), Conn> {
        let mut slots = self.slots.borrow_mut();
        let index = match self.free.borrow_mut().pop() {
            Some(i) => i,
            None => {
                slots.push(Slot { gen: 0, conn: None });
                (slots.len() - 1) as u32
            }
        };
        let slot = &mut slots[index as usize];
        slot.gen = slot.gen.wrapping_add(1);
        let token = (u64::from(slot.gen) << 32) | u64::from(index);
        if self.epoll.add_oneshot(c.fd.as_raw_fd(), token).is_err() {
            self.free.borrow_mut().push(index);
            return Err(c);
        }
        slot.conn = Some(c);
        self.count.set(self.count.get() + 1);
        Ok(())
    }

    /// The connection behind a ready token (None if it expired meanwhile).
    pub fn take(&self, token: u64) -> Option<Conn> {
        let (gen, index) = ((token >> 32) as u32, token as u32);
        let mut slots = self.slots.borrow_mut();
        let slot = slots.get_mut(index as usize)?;
        if slot.gen != gen {
            return None;
        }
        let c = slot.conn.take()?;
        self.epoll.delete(c.fd.as_raw_fd());
        self.free.borrow_mut().push(index);
        self.count.set(self.count.get() - 1);
        Some(c)
    }

    /// Closes parked connections idle for more than `limit_secs` ticks at `now`
    /// (`first_limit_secs` for those with no request yet): at least the whole limit, as
    /// in [`crate::idle::IdleSet::sweep`]. Returns how many.
    pub fn expire(&self, now: u32, limit_secs: u32, first_limit_secs: u32) -> usize {
        self.expire_if(|c| {
            let limit = if c.first {
                first_limit_secs
            } else {
                limit_secs
            };
            now.saturating_sub(c.since) > limit
        })
    }

    /// Closes every parked connection (a drain); returns how many.
    pub fn expire_all(&self) -> usize {
        self.expire_if(|_| true)
    }

    fn expire_if(&self, expired: impl Fn(&Conn) -> bool) -> usize {
        let mut n = 0;
        let mut slots = self.slots.borrow_mut();
        let mut free = self.free.borrow_mut();
        for (i, slot) in slots.iter_mut().enumerate() {
            if slot.conn.as_ref().is_some_and(&expired) {
                // Dropping the fd closes the socket and takes it out of the epoll set.
                slot.conn = None;
                free.push(i as u32);
                n += 1;
            }
        }
        self.count.set(self.count.get() - n);
        n
    }

    pub fn len(&self) -> usize {
        self.count.get()
    }
}
