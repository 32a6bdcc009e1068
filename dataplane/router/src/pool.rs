//! Hot path: per-core idle upstream connections, keyed by backend address.
//!
//! Bytes a backend sends after a complete response (a body longer than its
//! Content-Length, a body on a HEAD reply) would be read as the next request's response if
//! the connection were reused: a response desync between clients. They are caught three
//! ways, none a syscall per request in steady state:
//! - in the read that completed the response: the proxy does not pool the connection (and
//!   marks its backend, see [`Pool::note_strays`]);
//! - later, while the connection waits in the pool (io_uring only): [`Conn`] arms a
//!   readiness poll (`IORING_OP_POLL_ADD`, on a duplicate of the socket) when it is put
//!   back, and [`Pool::take`] drops a connection whose poll has completed: the backend sent
//!   something or closed. Like nginx's keep-alive close handler, but no task waits on it:
//!   the completion is only looked at on reuse. It costs one more io_uring operation per
//!   reuse (no syscall: it goes in with the ring's next submission) and an extra descriptor
//!   per connection once pooled;
//! - by a non-blocking peek before reuse, for connections idle [`RECENT`] or more, after a
//!   bodiless response, and always for backends seen sending such bytes.
//!
//! What is left: bytes that arrive after the response but before the poll's completion is
//! reaped (the core's next turn of its event loop) when the connection is reused in
//! between; and, with the epoll driver (no poll is armed), bytes arriving after the response
//! of a connection reused within [`RECENT`] of it, the first time its backend sends such
//! bytes.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use flynn_runtime::sock::{peek, Peek};
use monoio::net::TcpStream;

/// Idle connections older than this are closed rather than reused (backends commonly
/// close idle connections after 60–120 s).
const MAX_IDLE: Duration = Duration::from_secs(55);
/// Connections idle for less than this are reused without a liveness peek, unless their
/// last response had no body or their backend has sent bytes after a response before.
const RECENT: Duration = Duration::from_millis(500);

/// Connections are pooled only for the backends the routing table has: there is an entry
/// (possibly empty) for each of them and [`Pool::put`] never makes one, so a connection
/// that was in use while its backend left every route is closed when it comes back
/// instead of waiting out [`MAX_IDLE`], and pooling never allocates a map entry.
pub struct Pool {
    idle: RefCell<HashMap<SocketAddr, Idle>>,
    max_per_backend: usize,
}

/// A backend connection as the pool hands it out and takes it back: the stream, and the
/// watch armed on it while it waits in the pool (made at its first [`Pool::put`]).
pub struct Conn {
    stream: TcpStream,
    watch: Option<Box<dyn Watch>>,
}

impl From<TcpStream> for Conn {
    fn from(stream: TcpStream) -> Conn {
        Conn {
            stream,
            watch: None,
        }
    }
}

impl Deref for Conn {
    type Target = TcpStream;

    fn deref(&self) -> &TcpStream {
        &self.stream
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

impl Conn {
    /// Arms the watch (making it first if need be): from now on, input or a close on the
    /// connection completes it. Nothing under the epoll driver.
    fn arm(&mut self) {
        if self.watch.is_none() {
            self.watch = readiness_watch(&self.stream);
        }
        if let Some(w) = self.watch.as_mut() {
            w.arm();
        }
    }

    /// Whether the backend sent something or closed since the watch was armed (false
    /// when there is no watch, or its completion was not reaped yet).
    fn fired(&mut self) -> bool {
        self.watch.as_mut().is_some_and(|w| w.fired())
    }
}

/// A readiness poll that can be armed again without allocating.
trait Watch {
    fn arm(&mut self);
    fn fired(&mut self) -> bool;
}

/// The [`Watch`] over a duplicate of a connection's socket: `make` gives a future waiting
/// for its readability (monoio's `readable`, an io_uring `POLL_ADD`), kept in one heap slot
/// that every arming reuses. The future is only ever polled with a no-op waker: it submits
/// the poll when first polled, and a completion is seen the next time it is looked at.
struct Readiness<F, M> {
    dup: Rc<TcpStream>,
    make: M,
    armed: Pin<Box<Option<F>>>,
    done: bool,
}

impl<F, M> Watch for Readiness<F, M>
where
    F: Future<Output = std::io::Result<()>>,
    M: Fn(Rc<TcpStream>) -> F,
{
    fn arm(&mut self) {
        // Drops the previous poll, in the usual case completed by the response that came
        // since (a completed operation is freed without allocating).
        self.armed.set(Some((self.make)(self.dup.clone())));
        self.done = false;
        // The first poll submits it.
        self.fired();
    }

    fn fired(&mut self) -> bool {
        if !self.done {
            if let Some(f) = self.armed.as_mut().as_pin_mut() {
                let mut cx = Context::from_waker(Waker::noop());
                if f.poll(&mut cx).is_ready() {
                    self.armed.set(None);
                    self.done = true;
                }
            }
        }
        self.done
    }
}

fn readiness<F, M: Fn(Rc<TcpStream>) -> F>(dup: TcpStream, make: M) -> Readiness<F, M> {
    Readiness {
        dup: Rc::new(dup),
        make,
        armed: Box::pin(None),
        done: false,
    }
}

/// The watch for `s`: io_uring only (under epoll, waiting for readiness takes a `poll`
/// syscall each time), and None if the socket cannot be duplicated. A poll still pending
/// when its connection is closed is cancelled (monoio's `async-cancel`), which closes the
/// duplicate and so the socket.
fn readiness_watch(s: &TcpStream) -> Option<Box<dyn Watch>> {
    if monoio::utils::is_legacy() {
        return None;
    }
    let fd = flynn_runtime::handoff::dup(s.as_raw_fd()).ok()?;
    let dup = TcpStream::from_std(std::net::TcpStream::from(fd)).ok()?;
    Some(Box::new(readiness(dup, |s: Rc<TcpStream>| async move {
        s.readable(false).await
    })))
}

#[derive(Default)]
struct Idle {
    /// Connection, when it was put back, and whether its last response had no body.
    conns: Vec<(Conn, Instant, bool)>,
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
    /// A connection used moments ago is taken without a syscall (a peek per request costs
    /// ~14% of keep-alive throughput), unless its watch saw input or a close: if the backend
    /// closed it unseen, the proxy retries bodyless requests on a fresh one. It is peeked
    /// all the same after a response without a body (a HEAD, 204 or 304 reply: the usual
    /// place a faulty backend sends a body anyway), and always once its backend was seen
    /// sending bytes after a response.
    pub fn take(&self, addr: SocketAddr) -> Option<Conn> {
        let mut idle = self.idle.borrow_mut();
        let backend = idle.get_mut(&addr)?;
        while let Some((mut s, since, bodiless)) = backend.conns.pop() {
            let idle = since.elapsed();
            if idle >= MAX_IDLE {
                continue;
            }
            if s.fired() {
                // Input soon after a response is stray (see below); a close is not.
                if idle < RECENT && matches!(peek(s.as_raw_fd()), Peek::Data) {
                    backend.strays = true;
                }
                continue;
            }
            if idle < RECENT && !bodiless && !backend.strays {
                return Some(s);
            }
            match peek(s.as_raw_fd()) {
                Peek::Idle => return Some(s),
                // Data soon after a response is stray; on a connection idle longer it is
                // more likely the backend's own goodbye (a 408 before it closes).
                Peek::Data if idle < RECENT => backend.strays = true,
                Peek::Data | Peek::Closed => {}
            }
        }
        None
    }

    /// Keeps `s` for reuse (`bodiless`: its last response had no body), its watch armed, or
    /// closes it (drops it) when `addr` is not a backend of the table (see
    /// [`Pool::set_backends`]) or its list is full. `s` must have nothing unread after its
    /// last response.
    pub fn put(&self, addr: SocketAddr, mut s: Conn, bodiless: bool) {
        let mut idle = self.idle.borrow_mut();
        if let Some(backend) = idle.get_mut(&addr) {
            if backend.conns.len() < self.max_per_backend {
                s.arm();
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
