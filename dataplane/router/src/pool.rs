//! Hot path: per-core idle upstream connections, keyed by backend address.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use flynn_runtime::sock::{peek, Peek};
use monoio::net::TcpStream;

/// Idle connections older than this are closed rather than reused (backends commonly
/// close idle connections after 60–120 s).
const MAX_IDLE: Duration = Duration::from_secs(55);
/// Connections idle for less than this are reused without a liveness peek.
const RECENT: Duration = Duration::from_millis(500);

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
            let idle = since.elapsed();
            // A connection used moments ago is taken without a syscall; if the backend
            // closed it in between, the proxy retries bodyless requests on a fresh one.
            if idle < RECENT || (idle < MAX_IDLE && peek(s.as_raw_fd()) == Peek::Idle) {
                return Some(s);
            }
        }
        None
    }

    pub fn put(&self, addr: SocketAddr, s: TcpStream) {
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(addr).or_default();
        if list.len() < self.max_per_backend {
            list.push((s, Instant::now()));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.idle.borrow().is_empty()
    }

    /// Closes idle connections that are too old to reuse, and every one to an address
    /// `keep` rejects (a backend that left every route); forgets empty entries. Runs from
    /// the core's sweep and on route changes, never per request. Returns how many closed.
    pub fn prune(&self, keep: impl Fn(&SocketAddr) -> bool) -> usize {
        let mut closed = 0;
        self.idle.borrow_mut().retain(|addr, list| {
            let before = list.len();
            if keep(addr) {
                list.retain(|(_, since)| since.elapsed() < MAX_IDLE);
            } else {
                list.clear();
            }
            closed += before - list.len();
            !list.is_empty()
        });
        closed
    }
}
