//! Hot path: per-core idle upstream connections, keyed by backend address.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use flynn_runtime::sock::{peek, Peek};
use monoio::net::TcpStream;

/// Idle connections older than this are closed rather than reused (backends commonly
/// close idle connections after 60–120 s).
const MAX_IDLE: Duration = Duration::from_secs(55);

/// Connections are pooled only for the backends the routing table has: there is an entry
/// (possibly empty) for each of them and [`Pool::put`] never makes one, so a connection
/// that was in use while its backend left every route is closed when it comes back
/// instead of waiting out [`MAX_IDLE`], and pooling never allocates a map entry.
pub struct Pool {
    idle: RefCell<HashMap<SocketAddr, Vec<(TcpStream, Instant)>>>,
    max_per_backend: usize,
}

impl Pool {
    pub fn new(max_per_backend: usize) -> Self {
        Pool {
            idle: RefCell::new(HashMap::new()),
            max_per_backend,
        }
    }

    /// The most recently used live connection to `addr`, if any. Connections the
    /// backend closed (or that hold stray bytes) are dropped here, so they never fail
    /// a client request.
    pub fn take(&self, addr: SocketAddr) -> Option<TcpStream> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        while let Some((s, since)) = list.pop() {
            // Always peeked (one non-blocking syscall), however recently it was used:
            // bytes that came after its response (a body on a HEAD or 304 reply, more than
            // Content-Length said, a second response) would otherwise be read as the next
            // client's response.
            if since.elapsed() < MAX_IDLE && peek(s.as_raw_fd()) == Peek::Idle {
                return Some(s);
            }
        }
        None
    }

    /// Keeps `s` for reuse, or closes it (drops it) when `addr` is not a backend of the
    /// table (see [`Pool::set_backends`]) or its list is full.
    pub fn put(&self, addr: SocketAddr, s: TcpStream) {
        let mut idle = self.idle.borrow_mut();
        if let Some(list) = idle.get_mut(&addr) {
            if list.len() < self.max_per_backend {
                list.push((s, Instant::now()));
            }
        }
    }

    /// Makes `backends` (the routing table's, on every table change) the addresses
    /// connections are pooled for: idle connections to any other address are closed now,
    /// and ones in use now are closed when they come back. Returns how many closed.
    pub fn set_backends(&self, backends: impl IntoIterator<Item = SocketAddr>) -> usize {
        let live: HashSet<SocketAddr> = backends.into_iter().collect();
        let mut idle = self.idle.borrow_mut();
        let mut closed = 0;
        idle.retain(|addr, list| {
            let keep = live.contains(addr);
            if !keep {
                closed += list.len();
            }
            keep
        });
        for addr in live {
            idle.entry(addr).or_default();
        }
        closed
    }

    /// Closes idle connections too old to reuse. Runs from the core's sweep, never per
    /// request. Returns how many closed.
    pub fn prune(&self) -> usize {
        let mut closed = 0;
        for list in self.idle.borrow_mut().values_mut() {
            let before = list.len();
            list.retain(|(_, since)| since.elapsed() < MAX_IDLE);
            closed += before - list.len();
        }
        closed
    }
}
