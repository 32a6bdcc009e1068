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
/// Connections idle for less than this are reused without a liveness peek, unless their
/// last response had no body or their backend has sent bytes after a response before.
/// Under load a connection goes back out microseconds after it came in, so the peek (a
/// syscall: one per request cost ~14% of keep-alive throughput) is skipped where it
/// would cost; a connection idle longer is peeked, which costs nothing that matters at
/// the rate it happens. Bytes a backend sends after a complete response (a body longer
/// than its Content-Length) would otherwise be read as the next request's response, a
/// desync between clients: only bytes that arrive within this time of the response's end
/// and behind a reuse inside it are not caught (what arrives after the next request is
/// sent cannot be told from its response by any proxy).
const UNCHECKED: Duration = Duration::from_millis(1);
/// Bytes found this soon after a response are stray (the backend is then always peeked);
/// later they are more likely the backend's own goodbye (a 408 before it closes).
const RECENT: Duration = Duration::from_millis(500);

/// Connections are pooled only for the backends the routing table has: there is an entry
/// (possibly empty) for each of them and [`Pool::put`] never makes one, so a connection
/// that was in use while its backend left every route is closed when it comes back
/// instead of waiting out [`MAX_IDLE`], and pooling never allocates a map entry.
pub struct Pool {
    idle: RefCell<HashMap<SocketAddr, Idle>>,
    max_per_backend: usize,
}

#[derive(Default)]
struct Idle {
    /// Connection, when it was put back, and whether its last response had no body.
    conns: Vec<(TcpStream, Instant, bool)>,
    /// This backend has sent bytes after a complete response: its connections are always
    /// peeked before reuse, or those bytes would be read as the next client's response.
    strays: bool,
}

impl Pool {
    pub fn new(max_per_backend: usize) -> Self {
        Pool {
            idle: RefCell::new(HashMap::new()),
            max_per_backend,
        }
    }

    /// The most recently used live connection to `addr`, if any. Connections the backend
    /// closed (or that hold stray bytes) are dropped here, so they never fail a client
    /// request.
    ///
    /// A connection used moments ago ([`UNCHECKED`]) is taken without a syscall: if the
    /// backend closed it in between, the proxy retries bodyless requests on a fresh one.
    /// It is peeked all the same after a response
    /// without a body (a HEAD, 204 or 304 reply: the usual place a faulty backend sends a
    /// body anyway), and always once its backend was seen sending bytes after a response.
    pub fn take(&self, addr: SocketAddr) -> Option<TcpStream> {
        let mut idle = self.idle.borrow_mut();
        let backend = idle.get_mut(&addr)?;
        while let Some((s, since, bodiless)) = backend.conns.pop() {
            let idle = since.elapsed();
            if idle >= MAX_IDLE {
                continue;
            }
            if idle < UNCHECKED && !bodiless && !backend.strays {
                return Some(s);
            }
            match peek(s.as_raw_fd()) {
                Peek::Idle => return Some(s),
                Peek::Data if idle < RECENT => backend.strays = true,
                Peek::Data | Peek::Closed => {}
            }
        }
        None
    }

    /// Keeps `s` for reuse (`bodiless`: its last response had no body), or closes it (drops
    /// it) when `addr` is not a backend of the table (see [`Pool::set_backends`]) or its
    /// list is full.
    pub fn put(&self, addr: SocketAddr, s: TcpStream, bodiless: bool) {
        let mut idle = self.idle.borrow_mut();
        if let Some(backend) = idle.get_mut(&addr) {
            if backend.conns.len() < self.max_per_backend {
                backend.conns.push((s, Instant::now(), bodiless));
            }
        }
    }

    /// `addr` sent bytes after a complete response (seen in the same read): from now on its
    /// pooled connections are always peeked before reuse.
    pub fn note_strays(&self, addr: SocketAddr) {
        if let Some(backend) = self.idle.borrow_mut().get_mut(&addr) {
            backend.strays = true;
        }
    }

    /// Makes `backends` (the routing table's, on every table change) the addresses
    /// connections are pooled for: idle connections to any other address are closed now,
    /// and ones in use now are closed when they come back. Returns how many closed.
    pub fn set_backends(&self, backends: impl IntoIterator<Item = SocketAddr>) -> usize {
        let live: HashSet<SocketAddr> = backends.into_iter().collect();
        let mut idle = self.idle.borrow_mut();
        let mut closed = 0;
        idle.retain(|addr, backend| {
            let keep = live.contains(addr);
            if !keep {
                closed += backend.conns.len();
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
        for backend in self.idle.borrow_mut().values_mut() {
            let before = backend.conns.len();
            backend
                .conns
                .retain(|(_, since, _)| since.elapsed() < MAX_IDLE);
            closed += before - backend.conns.len();
        }
        closed
    }
}
