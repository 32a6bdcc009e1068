//! Hot path: one client connection, its requests proxied to backends (spec §1.6).
//! [`accept`] takes connections in (TLS, PROXY prefix), this module reads requests and
//! relays responses, [`upstream`] dials and picks backends.

mod accept;
mod upstream;

pub use accept::{serve, serve_h2c, serve_tls};
pub(crate) use upstream::redial;
pub use upstream::{connect, dial, dial_counted, Fwd};
use upstream::{exchange, Exchange};

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flynn_http::{
    parse_request, parse_response, simple_response, write_request_head, write_response_head,
    BodyReader, Dechunker, Forward, Framing, Method, RequestInfo, ResponseOpts,
};
use flynn_routes::HttpRoute;
use monoio::io::{AsyncReadRent, AsyncWriteRent, Canceller, Split};
use monoio::net::TcpStream;

use crate::balance::pick;
use crate::io::{client_gone_after, compact, read_append, write_range};
use crate::metrics::CoreMetrics;
use crate::worker::{Core, ListenerInfo, BUF};
use flynn_runtime::Recycled;
/// How many times a request goes again after its pooled connection failed (HTTP/1.1 and
/// HTTP/2 alike), and how many dials a request may make.
pub(crate) const MAX_ATTEMPTS: usize = 4;
/// How long a response may take before the proxy starts watching for the client
/// leaving (499); keeps the common fast response free of an extra poll.
const CLIENT_WATCH_GRACE: Duration = Duration::from_millis(20);
/// Linux `ECANCELED` (what a cancelled io_uring operation completes with).
const ECANCELED: i32 = 125;
/// A lingering close ([`linger`]) ends when the client sends nothing for this long
/// (nginx's `lingering_timeout`) ...
pub(crate) const LINGER_QUIET: Duration = Duration::from_secs(5);
/// ... or once it has discarded this much of what the client sent.
const LINGER_MAX_BYTES: usize = 64 << 20;
/// How long a backend whose connection failed while the request body was being sent has
/// for its answer to be read: it may have answered early and closed (a 413 or 401 without
/// reading the body), and that answer is usually in the socket already.
pub(crate) const EARLY_ANSWER_WAIT: Duration = Duration::from_millis(200);
/// How long a clean TLS close waits to hand its close_notify to a client that is not
/// reading.
const CLOSE_NOTIFY_WAIT: Duration = Duration::from_secs(1);

/// What a [`Client::hot_read`] got.
pub enum HotRead {
    /// Bytes of the next request are in the buffer.
    Data,
    /// The client closed the connection (or it failed).
    Closed,
    /// Nothing within the window (or the stream does not do hot reads): idle as usual.
    Cold,
}

/// How a request ended for the client connection.
#[derive(Clone, Copy)]
enum Next {
    KeepAlive,
    /// The response is complete: close cleanly (TLS: with a close_notify, so a body ended
    /// by the close is not taken for a truncated one).
    Close,
    /// The exchange failed (client gone, response cut short): close without a
    /// close_notify, so a TLS client can tell a truncated body from a whole one.
    Abort,
    /// Close in stages ([`linger`]): the client was answered while it may still be sending
    /// a request body that was not read.
    Linger,
}

/// Counts the connection as open until dropped, unless it was parked (a parked
/// connection still counts: it is open, only without a task).
struct ConnGuard(Rc<Core>, bool);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.1 {
            self.0.conn_closed();
        }
    }
}

/// What an idle wait ended with.
pub enum Idle {
    /// A request may have arrived.
    Ready,
    /// The connection is over (expired, closed, error).
    Closed,
    /// Idle long enough to park; carries the sweep second it went idle.
    Park(u32),
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn client_ip(peer: SocketAddr) -> IpAddr {
    match peer.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        ip => ip,
    }
}

/// The connection's buffers: borrowed from the core's free list while a request is in
/// progress; an idle keep-alive connection holds none.
#[derive(Default)]
pub struct Bufs {
    /// Client bytes (request head, body, pipelined requests).
    buf: Vec<u8>,
    /// Upstream bytes.
    ubuf: Vec<u8>,
    /// Heads being written.
    out: Vec<u8>,
}

impl Bufs {
    pub fn release(&mut self, core: &Core, all: bool) {
        if all {
            core.release_buf(&mut self.buf);
        }
        core.release_buf(&mut self.ubuf);
        core.release_buf(&mut self.out);
    }
}

/// A client-side stream: plain TCP or TLS.
pub trait Client: AsyncReadRent + AsyncWriteRent + Split + 'static {
    /// `X-Forwarded-Proto`.
    const PROTO: &'static str;
    /// Whether a keep-alive connection waits for its next request inside the read (TLS:
    /// see [`Client::idle`]) rather than in the core's idle sweep, which a drain closes.
    const IDLES_IN_READ: bool = false;
    /// Waits, while idle between requests, until a request may have arrived. Plain TCP
    /// waits for readability without holding any buffer (registered with the core's idle
    /// sweep; `first`: no request yet, so the header timeout applies, from the second of
    /// the sweep's clock the connection started at); TLS may already hold decrypted bytes,
    /// so it returns at once and the next read waits instead.
    async fn idle(&self, core: &Core, fd: RawFd, first: Option<u32>) -> Idle;
    /// Ends a connection whose last response is complete: TLS sends its close_notify
    /// (bounded by [`CLOSE_NOTIFY_WAIT`]); plain TCP has nothing to send before the close.
    async fn close(&mut self) {}
    /// A duplicate of the socket to park the connection with (plain TCP only).
    fn park_fd(&self, fd: RawFd) -> Option<std::os::fd::OwnedFd>;
    /// Resolves when the client has closed its side (`fd` is the client socket): plain TCP
    /// peeks for EOF; TLS, whose close_notify is data, watches for the peer's FIN.
    async fn gone(&self, fd: RawFd);
    /// Right after a keep-alive response: reads the next request's first bytes into `buf`
    /// (empty, with capacity) if they arrive within `window`. Never loses bytes: a read
    /// cut short by the window is cancelled and then awaited, so data that raced the
    /// cancel is kept. `canceller` is the connection's own, reused from request to request
    /// (a new one costs an allocation; only a cancel replaces it).
    async fn hot_read(
        &mut self,
        buf: Vec<u8>,
        window: Duration,
        canceller: &mut Canceller,
    ) -> (HotRead, Vec<u8>);
}

impl Client for TcpStream {
    const PROTO: &'static str = "http";

    async fn idle(&self, core: &Core, fd: RawFd, first: Option<u32>) -> Idle {
        let ticket = core.idle.enter(fd, first);
        monoio::select! {
            ready = self.readable(false) => {
                if core.idle.leave(ticket) && ready.is_ok() {
                    Idle::Ready
                } else {
                    Idle::Closed
                }
            }
            _ = core.idle.park_requested(ticket) => {
                let since = core.idle.since(ticket);
                if core.idle.leave(ticket) {
                    Idle::Park(since)
                } else {
                    Idle::Closed
                }
            }
        }
    }

    fn park_fd(&self, fd: RawFd) -> Option<std::os::fd::OwnedFd> {
        flynn_runtime::handoff::dup(fd).ok()
    }

    async fn gone(&self, _fd: RawFd) {
        client_gone_after(self, CLIENT_WATCH_GRACE).await
    }

    async fn hot_read(
        &mut self,
        buf: Vec<u8>,
        window: Duration,
        canceller: &mut Canceller,
    ) -> (HotRead, Vec<u8>) {
        use monoio::io::CancelableAsyncReadRent;
        let read = self.cancelable_read(buf, canceller.handle());
        let mut read = std::pin::pin!(read);
        let (res, buf) = monoio::select! {
            r = &mut read => r,
            _ = monoio::time::sleep(window) => {
                // `cancel` consumes it and hands back a fresh one for the next request.
                *canceller = std::mem::take(canceller).cancel();
                read.await
            }
        };
        let r = match res {
            Ok(0) => HotRead::Closed,
            Ok(_) => HotRead::Data,
            // ECANCELED: the window closed first.
            Err(e) if e.raw_os_error() == Some(ECANCELED) => HotRead::Cold,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => HotRead::Cold,
            Err(_) => HotRead::Closed,
        };
        (r, buf)
    }
}

impl Client for monoio_rustls::ServerTlsStream<TcpStream> {
    const PROTO: &'static str = "https";
    const IDLES_IN_READ: bool = true;

    async fn idle(&self, _core: &Core, _fd: RawFd, _first: Option<u32>) -> Idle {
        Idle::Ready
    }

    async fn close(&mut self) {
        let _ = monoio::time::timeout(CLOSE_NOTIFY_WAIT, self.shutdown()).await;
    }

    fn park_fd(&self, _fd: RawFd) -> Option<std::os::fd::OwnedFd> {
        None
    }

    async fn gone(&self, fd: RawFd) {
        crate::io::peer_shut_after(fd, CLIENT_WATCH_GRACE).await
    }

    async fn hot_read(
        &mut self,
        buf: Vec<u8>,
        _window: Duration,
        _canceller: &mut Canceller,
    ) -> (HotRead, Vec<u8>) {
        // rustls may already hold decrypted bytes; the head read waits instead.
        (HotRead::Cold, buf)
    }
}

/// How a connection comes to [`serve_conn`].
#[derive(Clone, Copy)]
pub enum Start {
    /// Just accepted (through its PROXY prefix or TLS handshake): not counted yet.
    New,
    /// A parked connection coming back (already counted); `first`: it has had no request
    /// yet, and started at that second of the idle sweep's clock.
    Unparked { first: Option<u32> },
}

/// Serves one client connection. This outer future is what an idle keep-alive
/// connection costs (a few hundred bytes) until it parks; each request runs in a
/// [`Recycled`] slot.
pub async fn serve_conn<S: Client>(
    core: Rc<Core>,
    mut conn: S,
    fd: RawFd,
    mut bufs: Option<Box<Bufs>>,
    peer: SocketAddr,
    l: ListenerInfo,
    start: Start,
) {
    // Until its first request head arrives a connection is held for the header timeout
    // from its start, not the idle timeout: `first` is that start on the idle sweep's
    // clock (plain connections idle in the sweep, which expires them), and, as TLS waits
    // for its first request inside the head read, `first_by` the instant it is due.
    // Empty lines meanwhile do not move either (RFC 9112 §2.2 lets them be skipped, not
    // keep a connection without a request open).
    let mut first = match start {
        Start::New => {
            core.conn_opened();
            Some(core.idle.now())
        }
        Start::Unparked { first } => first,
    };
    let first_by = (S::IDLES_IN_READ && first.is_some()).then(|| {
        let s = core.settings();
        std::time::Instant::now() + s.header_timeout.min(s.idle_timeout)
    });
    let mut guard = ConnGuard(core.clone(), true);
    // Set after a keep-alive response with nothing pipelined: try a hot read first.
    let mut hot = false;
    // Made at the first hot read, then reused by every later one.
    let mut canceller: Option<Canceller> = None;
    loop {
        if std::mem::take(&mut hot) {
            if let Some(b) = bufs.as_mut() {
                core.ensure_buf(&mut b.buf);
                let taken = std::mem::take(&mut b.buf);
                let c = canceller.get_or_insert_with(Canceller::new);
                let (r, buf) = conn.hot_read(taken, core.settings().hot_idle, c).await;
                b.buf = buf;
                match r {
                    HotRead::Data => {}
                    HotRead::Closed => break,
                    // Back to the top: the empty buffer is released and the
                    // connection idles without one.
                    HotRead::Cold => continue,
                }
            }
        } else if bufs.as_ref().is_none_or(|b| b.buf.is_empty()) {
            // Idle between requests: hold no buffer (boxed so an idle connection holds
            // one pointer, not three empty Vecs).
            if let Some(mut b) = bufs.take() {
                b.release(&core, true);
                core.give_bufs(b);
            }
            match conn.idle(&core, fd, first).await {
                Idle::Ready => {}
                Idle::Closed => break,
                Idle::Park(since) => {
                    let Some(dup) = conn.park_fd(fd) else {
                        continue;
                    };
                    let parked = crate::park::Conn {
                        fd: dup,
                        peer,
                        info: l,
                        // Before the first request, the connection's start.
                        since,
                        first: first.is_some(),
                    };
                    // On success the task ends here: dropping `conn` closes our fd, the
                    // duplicate waits in the epoll set. Otherwise keep waiting as before.
                    if core.park(parked) {
                        guard.1 = false;
                        return;
                    }
                    continue;
                }
            }
        }
        let b = bufs.get_or_insert_with(|| core.take_bufs());
        let request = one_request(&core, conn, fd, b, peer, l, &mut first, first_by);
        match Recycled::new(request).await {
            // Only empty lines, past the header timeout with no request yet (a client
            // sending them for ever, maybe in the hot read, never idles in the sweep long
            // enough to be expired there).
            Some(_) if first.is_some_and(|start| core.first_request_overdue(start)) => break,
            Some(c) => {
                conn = c;
                // Empty lines before a request are skipped (RFC 9112 §2.2): a stray CRLF
                // some clients send after a body must not make the wait for the next
                // request a head read under the header timeout (and its 408), nor keep
                // the connection in a read (see `read_head`).
                skip_blank_lines(&mut b.buf);
                hot = b.buf.is_empty() && !core.settings().hot_idle.is_zero() && !core.draining();
            }
            None => break,
        }
    }
    if let Some(mut b) = bufs.take() {
        b.release(&core, true);
        core.give_bufs(b);
    }
}

/// Reads and serves one request; gives the connection back if it stays open (also when
/// only empty lines came: it is idle again). `first`: no request yet on this connection
/// (see [`serve_conn`]); cleared once a head arrives. `first_by`: when its first byte is
/// due, for a connection that waits in the head read (TLS).
#[allow(clippy::too_many_arguments)]
async fn one_request<S: Client>(
    core: &Rc<Core>,
    mut c: S,
    fd: RawFd,
    bufs: &mut Bufs,
    peer: SocketAddr,
    l: ListenerInfo,
    first: &mut Option<u32>,
    first_by: Option<std::time::Instant>,
) -> Option<S> {
    core.ensure_buf(&mut bufs.buf);
    let due = first_by.filter(|_| first.is_some());
    let info = match read_head(core, &mut c, &mut bufs.buf, due).await {
        Ok(Head::Request(i)) => {
            *first = None;
            i
        }
        // A draining process keeps no connection that is between requests.
        Ok(Head::Idle) => return (!core.draining()).then_some(c),
        Ok(Head::Gone) => return None,
        Err(status) => {
            core.ensure_buf(&mut bufs.out);
            CoreMetrics::inc(&core.metrics().bad_requests_total);
            // What follows the bad head is unknown and unread (but a client too slow to
            // send a head in time gets no more time).
            let then = if status == 408 {
                Next::Close
            } else {
                Next::Linger
            };
            let next = respond(
                core,
                &mut c,
                fd,
                &mut bufs.out,
                // The head could not be read: its method is unknown.
                Method::Get,
                status,
                reason_body(status),
                then,
            )
            .await;
            match next {
                Next::Linger => linger(core, &mut c, &mut bufs.buf).await,
                Next::Close => c.close().await,
                Next::KeepAlive | Next::Abort => {}
            }
            return None;
        }
    };
    let start_ms = now_ms();
    core.ensure_buf(&mut bufs.ubuf);
    core.ensure_buf(&mut bufs.out);
    CoreMetrics::inc(&core.metrics().requests_total);
    let table = core.table();
    let Bufs { buf, ubuf, out } = bufs;
    let host = info.host.map(|s| s.get(buf)).unwrap_or(b"");
    let route = table.lookup_http(host, l.route_port, info.path.get(buf));
    let next = match route {
        // A reverse proxy does not tunnel CONNECT (nginx answers 405 as well): a backend's
        // 2xx would make its connection a tunnel, then pooled for the next client.
        _ if info.method == Method::Connect => {
            CoreMetrics::inc(&core.metrics().bad_requests_total);
            let then = match after_own_answer(&info, buf) {
                Next::KeepAlive => Next::Close,
                then => then,
            };
            respond(
                core,
                &mut c,
                fd,
                out,
                info.method,
                405,
                b"Method Not Allowed\n",
                then,
            )
            .await
        }
        None => {
            CoreMetrics::inc(&core.metrics().not_found_total);
            let then = after_own_answer(&info, buf);
            if matches!(then, Next::KeepAlive) {
                buf.drain(..info.head_len);
            }
            respond(
                core,
                &mut c,
                fd,
                out,
                info.method,
                404,
                b"Not Found\n",
                then,
            )
            .await
        }
        Some(r) if r.backends.is_empty() => {
            let n = unavailable(core, &mut c, fd, out, &info, buf).await;
            if matches!(n, Next::KeepAlive) {
                buf.drain(..info.head_len);
            }
            n
        }
        Some(r) if info.upgrade => {
            // A tunnel may last hours: the exchange's buffers go back to the core now (the
            // upgrade's own exchange does not use them), the request buffer goes with it,
            // and so does the table (every change publishes a new one: a tunnel must not
            // keep its old one alive), the route's few fields taken out of it first.
            core.release_buf(ubuf);
            core.release_buf(out);
            let b = std::mem::take(buf);
            let target = crate::upgrade::Target::of(r);
            drop(table);
            crate::upgrade::tunnel(core, c, fd, b, &info, target, peer, l, start_ms).await;
            return None;
        }
        Some(r) => {
            let fwd = Fwd {
                proto: S::PROTO,
                peer,
                l,
                start_ms,
                fd,
            };
            forward(core, &mut c, buf, ubuf, out, &info, r, fwd).await
        }
    };
    match next {
        Next::KeepAlive => Some(c),
        Next::Close => {
            // Client bytes still unread in the socket would turn the close into a reset,
            // which can discard the response's tail before the client reads it: linger
            // over them instead (nginx checks the same). Only when the close is the
            // router's or the backend's decision: a client that asked to close sends
            // nothing more (RFC 9112 §9.6), and what it sent with the request is in `buf`
            // (see `close_after_response`), so a connection-per-request client pays no
            // extra system call (the peek cost ~5% of `newconn-c64`'s req/CPU-s).
            if info.keep_alive
                && matches!(
                    flynn_runtime::sock::peek(fd),
                    flynn_runtime::sock::Peek::Data
                )
            {
                linger(core, &mut c, buf).await;
            } else {
                c.close().await;
            }
            None
        }
        Next::Abort => None,
        Next::Linger => {
            linger(core, &mut c, buf).await;
            None
        }
    }
}

/// Drops the empty lines (CR and LF bytes) that may precede a request (RFC 9112 §2.2);
/// true if there were any. One compare when there are none.
fn skip_blank_lines(buf: &mut Vec<u8>) -> bool {
    if !matches!(buf.first(), Some(b'\r' | b'\n')) {
        return false;
    }
    let blank = buf
        .iter()
        .take_while(|&&x| x == b'\r' || x == b'\n')
        .count();
    buf.drain(..blank);
    true
}

fn reason_body(status: u16) -> &'static [u8] {
    match status {
        431 => b"Request Header Fields Too Large\n",
        408 => b"Request Timeout\n",
        505 => b"HTTP Version Not Supported\n",
        _ => b"Bad Request\n",
    }
}

/// What [`read_head`] got.
enum Head {
    Request(RequestInfo),
    /// The client went away or idled out.
    Gone,
    /// Only empty lines came, and the buffer is empty: the connection is idle again.
    Idle,
}

/// Reads until a complete request head is buffered. `Err(status)`: answer with that
/// status and close. `first_by`: the connection's first request (TLS), whose first byte
/// is due then, the header timeout after the connection's start, whatever empty lines
/// came meanwhile (later ones have the idle timeout).
async fn read_head<S: Client>(
    core: &Core,
    c: &mut S,
    buf: &mut Vec<u8>,
    first_by: Option<std::time::Instant>,
) -> Result<Head, u16> {
    // The whole head must arrive within the header timeout of its first byte, however
    // slowly it trickles in (slowloris costs a connection, never a core).
    let mut deadline: Option<std::time::Instant> = None;
    // Bytes already parsed as an incomplete head: after the first attempt (which parses a
    // head that came whole in one read, the usual case), the head is parsed again only once
    // its end may be in, so a head trickling in costs one pass over its bytes, not one per
    // read.
    let mut scanned: Option<usize> = None;
    loop {
        let parse = match scanned {
            None => !buf.is_empty(),
            Some(from) => buf.len() >= flynn_http::MAX_HEAD || may_end_head(buf, from),
        };
        if parse {
            scanned = Some(buf.len());
            match parse_request(buf) {
                Ok(Some(info)) => return Ok(Head::Request(info)),
                Ok(None) => {}
                Err(e) => return Err(e.status()),
            }
        }
        // Empty lines before a request are skipped (RFC 9112 §2.2), also when they arrive
        // on their own after a response (a client's stray CRLF after a body): waiting for
        // the next request they leave the connection idle, not under the header timeout.
        if deadline.is_none() && skip_blank_lines(buf) {
            scanned = None;
            // Plain TCP idles without a buffer, in the idle sweep's reach (expiry,
            // parking, a drain), not in this read.
            if buf.is_empty() && !S::IDLES_IN_READ {
                return Ok(Head::Idle);
            }
        }
        let now = std::time::Instant::now();
        // Nothing received yet (a TLS connection idling in this read): the idle timeout,
        // or before the first request what is left of the header timeout.
        let idle = buf.is_empty() && deadline.is_none();
        let limit = match (idle, first_by) {
            (true, Some(by)) => by.saturating_duration_since(now),
            (true, None) => core.settings().idle_timeout,
            (false, _) => {
                let d = *deadline.get_or_insert(now + core.settings().header_timeout);
                d.saturating_duration_since(now)
            }
        };
        let taken = std::mem::take(buf);
        let read = monoio::time::timeout(limit, read_append(c, taken));
        let res = if idle && S::IDLES_IN_READ {
            // A draining router (handover, shutdown) closes its idle keep-alive connections:
            // this one idles here, out of the idle sweep's reach, and would otherwise hold
            // the drain to its timeout. Nothing of a request is buffered yet.
            monoio::select! {
                r = read => r,
                _ = core.stop.wait() => return Ok(Head::Gone),
            }
        } else {
            read.await
        };
        let (res, b) = match res {
            Ok(x) => x,
            Err(_) if idle => return Ok(Head::Gone),
            Err(_) => return Err(408),
        };
        *buf = b;
        match res {
            Ok(0) | Err(_) => return Ok(Head::Gone),
            Ok(_) => {}
        }
    }
}

/// Whether a head's end (an empty line, `\n\n` or `\n\r\n`) may be in `buf` after the
/// first `from` bytes.
fn may_end_head(buf: &[u8], from: usize) -> bool {
    let tail = &buf[from.saturating_sub(2)..];
    tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n")
}

/// The router's own response to a request (`method`: a `HEAD` gets the head only, with the
/// length a `GET` would have had); `then`: what follows once it is written (any but
/// `KeepAlive` says `Connection: close`).
#[allow(clippy::too_many_arguments)]
async fn respond<S: Client>(
    core: &Core,
    c: &mut S,
    fd: RawFd,
    out: &mut Vec<u8>,
    method: Method,
    status: u16,
    body: &[u8],
    then: Next,
) -> Next {
    core.metrics().status(status);
    // A draining process closes every connection after its current response.
    let then = match then {
        Next::KeepAlive if core.draining() => Next::Close,
        then => then,
    };
    let close = !matches!(then, Next::KeepAlive);
    out.clear();
    let body_len = match (status, &core.settings().page_503) {
        (503, Some(page)) => {
            flynn_http::typed_response(503, b"text/html; charset=utf-8", page, close, out);
            page.len()
        }
        _ => {
            simple_response(status, body, close, out);
            body.len()
        }
    };
    if method == Method::Head {
        out.truncate(out.len() - body_len);
    }
    let o = std::mem::take(out);
    let len = o.len();
    let (res, o) = to_client(core, c, fd, o, len).await;
    *out = o;
    if res.is_err() {
        Next::Abort
    } else {
        then
    }
}

/// What follows the router's own answer to a request (404, 503) in `buf`: a body not all
/// received yet is left unread, so the connection closes in stages ([`linger`]); one that
/// is all in `buf`, a client that asked to close, or an HTTP/1.0 one, which keeps only a
/// connection whose response says `Connection: keep-alive` (these answers do not, so a
/// client reading to the end would wait for the idle timeout), is closed.
fn after_own_answer(info: &RequestInfo, buf: &[u8]) -> Next {
    if info.framing != Framing::Empty {
        let mut body = BodyReader::new(info.framing);
        let whole = body.advance(&buf[info.head_len..]).is_ok() && body.is_done();
        if whole {
            Next::Close
        } else {
            Next::Linger
        }
    } else if !info.keep_alive || info.version_minor == 0 {
        Next::Close
    } else {
        Next::KeepAlive
    }
}

async fn unavailable<S: Client>(
    core: &Core,
    c: &mut S,
    fd: RawFd,
    out: &mut Vec<u8>,
    info: &RequestInfo,
    buf: &[u8],
) -> Next {
    CoreMetrics::inc(&core.metrics().unavailable_total);
    let then = after_own_answer(info, buf);
    respond(
        core,
        c,
        fd,
        out,
        info.method,
        503,
        b"Service Unavailable\n",
        then,
    )
    .await
}

/// Closes a connection in stages after an answer given before the client finished sending
/// its request body (RFC 9112 §9.6), or a refused upgrade (`upgrade.rs`: the bytes behind
/// the request are never read): shuts the sending side down once the answer is out,
/// then reads and discards what the client still sends until it closes, sends nothing for
/// [`LINGER_QUIET`], has sent [`LINGER_MAX_BYTES`] or the lingering time is up. Closing at
/// once with unread input makes the kernel reset the connection, and a client still
/// writing its body gets the reset instead of the answer (nginx's `lingering_close`, Go's
/// `closeWriteAndWait`). Error paths only; reads into the connection's own buffer.
pub(crate) async fn linger<S: Client>(core: &Core, c: &mut S, buf: &mut Vec<u8>) {
    let time = core.settings().lingering_time;
    if time.is_zero() {
        return;
    }
    let discard = async {
        if c.shutdown().await.is_err() {
            return;
        }
        let mut left = LINGER_MAX_BYTES;
        loop {
            buf.clear();
            let taken = std::mem::take(buf);
            let Ok((res, b)) = monoio::time::timeout(LINGER_QUIET, read_append(c, taken)).await
            else {
                return;
            };
            *buf = b;
            match res {
                Ok(n) if n > 0 && n < left => left -= n,
                _ => return,
            }
        }
    };
    // A draining router (handover, shutdown) does not wait for lingering clients.
    monoio::select! {
        _ = monoio::time::timeout(time, discard) => {}
        _ = core.stop.wait() => {}
    }
    buf.clear();
}

#[allow(clippy::too_many_arguments)]
async fn forward<S: Client>(
    core: &Rc<Core>,
    c: &mut S,
    buf: &mut Vec<u8>,
    ubuf: &mut Vec<u8>,
    out: &mut Vec<u8>,
    info: &RequestInfo,
    route: &HttpRoute,
    fwd: Fwd,
) -> Next {
    let m = core.metrics();
    let fd = fwd.fd;
    let sealer = core.settings().sticky.as_ref().filter(|_| route.sticky);
    let cookie_addr = sealer.and_then(|s| crate::sticky::from_request(s, &buf[..info.head_len]));
    let Some((mut up, addr, mut reused)) = connect(core, route, cookie_addr, None).await else {
        let next = unavailable(core, c, fd, out, info, buf).await;
        if matches!(next, Next::KeepAlive) {
            buf.drain(..info.head_len);
        }
        return next;
    };
    let mut addr = addr;
    let mut _inflight = core.start_request(addr);
    let mut retries = 0;

    // Request head plus whatever body bytes are already buffered.
    out.clear();
    write_request_head(buf, info, &fwd.forward(route.disable_keep_alives), out);
    let mut body = BodyReader::new(info.framing);
    let adv = match body.advance(&buf[info.head_len..]) {
        Ok(a) => a,
        Err(_) => {
            let bad = b"Bad Request\n";
            return respond(core, c, fd, out, info.method, 400, bad, Next::Linger).await;
        }
    };
    out.extend_from_slice(&buf[info.head_len..info.head_len + adv.used]);
    let mut consumed = info.head_len + adv.used;

    let sent_continue = info.expect_continue && !body.is_done();
    if sent_continue {
        // Through the response buffer, empty until the backend answers.
        let (res, b) = send_continue(core, c, fd, std::mem::take(ubuf)).await;
        *ubuf = b;
        if res.is_err() {
            CoreMetrics::inc(&m.client_aborts_total);
            return Next::Abort;
        }
    }

    // Set when the backend answered before taking the whole body: the answer is relayed,
    // and the client's connection then closes with the rest of its body unread.
    let mut early = false;
    // `out` keeps the request head, so a stale pooled connection can be retried.
    let resp = 'send: loop {
        let can_retry = 'attempt: {
            let o = std::mem::take(out);
            let len = o.len();
            let (res, o) = write_range(&mut up, o, 0, len).await;
            *out = o;
            if res.is_err() {
                break 'attempt reused && body.is_done();
            }
            // Stream the rest of the request body.
            while !body.is_done() {
                if consumed == buf.len() {
                    buf.clear();
                    consumed = 0;
                }
                let taken = std::mem::take(buf);
                let limit = core.settings().idle_timeout;
                let (res, b) = match monoio::time::timeout(limit, read_append(c, taken)).await {
                    Ok(x) => x,
                    Err(_) => (
                        Err(std::io::ErrorKind::TimedOut.into()),
                        Vec::with_capacity(BUF),
                    ),
                };
                *buf = b;
                match res {
                    Ok(n) if n > 0 => {}
                    _ => {
                        CoreMetrics::inc(&m.client_aborts_total);
                        return Next::Abort;
                    }
                }
                let adv = match body.advance(&buf[consumed..]) {
                    Ok(a) => a,
                    Err(_) => {
                        let bad = b"Bad Request\n";
                        return respond(core, c, fd, out, info.method, 400, bad, Next::Linger)
                            .await;
                    }
                };
                // A backend that stops reading the body (without closing) is given up
                // after the idle timeout, as a client that stops sending it is.
                let taken = std::mem::take(buf);
                let write = write_range(&mut up, taken, consumed, consumed + adv.used);
                let (res, b, lost) = match monoio::time::timeout(limit, write).await {
                    Ok((res, b)) => (res, b, false),
                    Err(_) => (
                        Err(std::io::ErrorKind::TimedOut.into()),
                        Vec::with_capacity(BUF),
                        true,
                    ),
                };
                *buf = b;
                // A timed-out write took the buffer with it: nothing of it is left to skip
                // (the body is not read any further after a failed write).
                consumed = if lost { 0 } else { consumed + adv.used };
                if res.is_err() {
                    // The backend may have answered without reading the body and closed
                    // (a 413, a 401): that answer is relayed, not a 503. Never retried.
                    let answer = exchange(core, c, fwd.fd, &mut up, ubuf, info, sent_continue);
                    match monoio::time::timeout(EARLY_ANSWER_WAIT, answer).await {
                        Ok(Exchange::Ok(r)) => {
                            early = true;
                            break 'send r;
                        }
                        Ok(Exchange::ClientGone) => {
                            CoreMetrics::inc(&m.client_aborts_total);
                            return Next::Abort;
                        }
                        _ => {
                            return upstream_failed(core, c, fd, out, info.method, Next::Linger)
                                .await
                        }
                    }
                }
            }
            match exchange(core, c, fwd.fd, &mut up, ubuf, info, sent_continue).await {
                Exchange::Ok(r) => break 'send r,
                // The request reached a reused connection that then died: the backend
                // may have acted on it, so only a bodiless safe request goes again (as
                // Go's transport does).
                Exchange::Stale => {
                    break 'attempt reused
                        && info.framing == Framing::Empty
                        && info.method.is_safe()
                }
                Exchange::Failed => {
                    // A reused connection that answered garbage may have held bytes from
                    // after its last response: peek this backend's connections from now on.
                    if reused {
                        core.pool.note_strays(addr);
                    }
                    break 'attempt false;
                }
                Exchange::ClientGone => {
                    CoreMetrics::inc(&m.client_aborts_total);
                    return Next::Abort;
                }
            }
        };
        // Only a reused connection that failed the write, or died before any response
        // byte to a safe request, is retried: on a fresh dial to the same backend, or
        // another backend if that dial fails.
        if !can_retry || retries >= MAX_ATTEMPTS {
            let then = if body.is_done() {
                Next::Close
            } else {
                Next::Linger
            };
            return upstream_failed(core, c, fd, out, info.method, then).await;
        }
        retries += 1;
        ubuf.clear();
        match redial(core, route, addr).await {
            Some((s, a, r)) => {
                (up, reused) = (s, r);
                if a != addr {
                    addr = a;
                    _inflight = core.start_request(a);
                }
            }
            None => return upstream_failed(core, c, fd, out, info.method, Next::Close).await,
        }
    };
    // How the client's connection ends when the response fails.
    let failed = if early { Next::Linger } else { Next::Close };

    // A switch of protocols nobody asked for: the client's connection would go on as
    // HTTP while the backend's does not (Go's proxy refuses it too).
    if resp.status == 101 {
        return upstream_failed(core, c, fd, out, info.method, failed).await;
    }
    // Response head and body. An HTTP/1.0 client cannot take chunk framing: it gets the
    // body decoded, ended by the close of the connection (RFC 9112 §6.1, as Go does).
    let http10 = info.version_minor == 0;
    let mut unchunk = (http10 && resp.framing == Framing::Chunked).then(Dechunker::new);
    let close_client = !info.keep_alive
        || resp.framing == Framing::Close
        || unchunk.is_some()
        || early
        || core.draining();
    // A new cookie only when the chosen backend differs from the cookie's.
    let cookie = match sealer {
        Some(s) if cookie_addr != Some(addr) => Some(crate::sticky::set_cookie(s, addr)),
        _ => None,
    };
    let cookie_header: Vec<(&[u8], &[u8])> = match &cookie {
        Some(c) => vec![(b"Set-Cookie".as_slice(), c.as_slice())],
        None => Vec::new(),
    };
    m.status(resp.status);
    let head_len = resp.head_len;
    let mut rbody = BodyReader::new(resp.framing);
    let adv = match rbody.advance(&ubuf[head_len..]) {
        Ok(a) => a,
        Err(_) => return upstream_failed(core, c, fd, out, info.method, failed).await,
    };
    out.clear();
    write_response_head(
        ubuf,
        &resp,
        &ResponseOpts {
            close: close_client,
            extra: cookie_header.as_slice(),
            http10,
        },
        out,
    );
    let first = &ubuf[head_len..head_len + adv.used];
    match &mut unchunk {
        Some(d) => {
            if d.feed(first, out).is_err() {
                CoreMetrics::inc(&m.upstream_errors_total);
                return Next::Abort;
            }
        }
        None => out.extend_from_slice(first),
    }
    let mut clean = head_len + adv.used == ubuf.len();
    let o = std::mem::take(out);
    let len = o.len();
    let (res, o) = to_client(core, c, fd, o, len).await;
    *out = o;
    if res.is_err() {
        CoreMetrics::inc(&m.client_aborts_total);
        return Next::Abort;
    }
    while !rbody.is_done() {
        ubuf.clear();
        let taken = std::mem::take(ubuf);
        let limit = core.settings().idle_timeout;
        let (res, b) = match monoio::time::timeout(limit, read_append(&mut up, taken)).await {
            Ok(x) => x,
            Err(_) => (
                Err(std::io::ErrorKind::TimedOut.into()),
                Vec::with_capacity(BUF),
            ),
        };
        *ubuf = b;
        match res {
            Ok(n) if n > 0 => {}
            // The backend's close ends a close-delimited body (and that alone).
            Ok(_) if resp.framing == Framing::Close => {
                compact(buf, consumed, BUF);
                // An early answer leaves the upload unread: linger over it.
                return if early {
                    Next::Linger
                } else {
                    close_after_response(buf)
                };
            }
            // Truncated response (EOF, reset, idle timeout): the client cannot be told
            // any more, and gets no clean close either.
            _ => {
                CoreMetrics::inc(&m.upstream_errors_total);
                return Next::Abort;
            }
        }
        let adv = match rbody.advance(ubuf) {
            Ok(a) => a,
            Err(_) => {
                CoreMetrics::inc(&m.upstream_errors_total);
                return Next::Abort;
            }
        };
        clean = adv.used == ubuf.len();
        let res = match &mut unchunk {
            Some(d) => {
                // Decoded into `out` (free once the head went out): no allocation.
                out.clear();
                if d.feed(&ubuf[..adv.used], out).is_err() {
                    CoreMetrics::inc(&m.upstream_errors_total);
                    return Next::Abort;
                }
                let o = std::mem::take(out);
                let len = o.len();
                let (res, o) = to_client(core, c, fd, o, len).await;
                *out = o;
                res
            }
            None => {
                let taken = std::mem::take(ubuf);
                let (res, b) = to_client(core, c, fd, taken, adv.used).await;
                *ubuf = b;
                res
            }
        };
        if res.is_err() {
            CoreMetrics::inc(&m.client_aborts_total);
            return Next::Abort;
        }
    }
    ubuf.clear();
    if !clean {
        core.pool.note_strays(addr);
    } else if resp.keep_alive && !route.disable_keep_alives && !early {
        core.pool.put(addr, up, resp.framing == Framing::Empty);
    }
    compact(buf, consumed, BUF);
    if early {
        Next::Linger
    } else if close_client {
        close_after_response(buf)
    } else {
        Next::KeepAlive
    }
}

/// How a client connection closes after a complete response. `buf` holds what the
/// client sent after the request: a client that pipelined may still be sending, and a
/// close over its unread bytes would reset the connection, which can discard the
/// response's tail before the client reads it, so it is lingered on (nginx does the same).
fn close_after_response(buf: &[u8]) -> Next {
    if buf.is_empty() {
        Next::Close
    } else {
        Next::Linger
    }
}

/// Writes `o[..len]` to the client. If the client takes no byte of it for the idle timeout
/// (it stopped reading), the core's sweep shuts the connection down, so a client that never
/// reads cannot hold the request's backend connection and buffers for good (nginx's
/// `send_timeout`). No timer: the write holds a slot in the core's `sends` set, touched at
/// each partial write.
/// Answers a client's `Expect: 100-continue` with `100 Continue`, written through `buf`
/// (cleared before and after: no allocation once it has room).
pub(crate) async fn send_continue<S: Client>(
    core: &Core,
    c: &mut S,
    fd: RawFd,
    mut buf: Vec<u8>,
) -> (std::io::Result<()>, Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
    let len = buf.len();
    let (res, mut buf) = to_client(core, c, fd, buf, len).await;
    buf.clear();
    (res, buf)
}

pub(crate) async fn to_client<S: Client>(
    core: &Core,
    c: &mut S,
    fd: RawFd,
    o: Vec<u8>,
    len: usize,
) -> (std::io::Result<()>, Vec<u8>) {
    use monoio::buf::IoBuf;
    let stall = core.sends.open(fd, -1);
    let mut o = o;
    let mut at = 0;
    while at < len {
        let (res, slice) = c.write(o.slice(at..len)).await;
        o = slice.into_inner();
        match res {
            Ok(0) => return (Err(std::io::ErrorKind::WriteZero.into()), o),
            Ok(n) => at += n,
            Err(e) => return (Err(e), o),
        }
        stall.touch();
    }
    (Ok(()), o)
}

/// The 503 for a backend that failed; `then`: `Linger` when the request body was not all
/// read.
async fn upstream_failed<S: Client>(
    core: &Core,
    c: &mut S,
    fd: RawFd,
    out: &mut Vec<u8>,
    method: Method,
    then: Next,
) -> Next {
    CoreMetrics::inc(&core.metrics().upstream_errors_total);
    CoreMetrics::inc(&core.metrics().unavailable_total);
    respond(
        core,
        c,
        fd,
        out,
        method,
        503,
        b"Service Unavailable\n",
        then,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::may_end_head;

    #[test]
    fn a_head_end_is_found_across_the_boundary_of_what_was_scanned() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        // Wherever the earlier reads stopped, the end is seen once all of it is in.
        for from in 0..head.len() {
            assert!(may_end_head(head, from), "from {from}");
        }
        assert!(may_end_head(b"GET / HTTP/1.1\nHost: a\n\n", 23));
        assert!(!may_end_head(b"GET / HTTP/1.1\r\nHost: a\r\n", 0));
        // A line end already scanned is not taken for the end again.
        assert!(!may_end_head(b"GET / HTTP/1.1\r\nHost: a\r\nX", 26));
    }
}
