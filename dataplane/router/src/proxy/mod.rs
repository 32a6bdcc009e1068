//! Hot path: one client connection, its requests proxied to backends (spec §1.6).
//! [`accept`] takes connections in (TLS, PROXY prefix), this module reads requests and
//! relays responses, [`upstream`] dials and picks backends.
//! [`client`] is the client's stream (plain or TLS: idle waits, hot reads), [`head`]
//! reads request heads, [`answer`] writes the router's own answers and lingers.

mod accept;
mod answer;
mod client;
mod head;
mod upstream;

pub use accept::{serve, serve_h2c, serve_tls};
use answer::{after_own_answer, reason_body, respond, unavailable, upstream_failed};
pub(crate) use answer::{linger, LINGER_QUIET};
pub(crate) use client::Client;
use client::{HotRead, Idle};
use head::{read_head, skip_blank_lines, Head};
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
/// How long a backend whose connection failed while the request body was being sent has
/// for its answer to be read: it may have answered early and closed (a 413 or 401 without
/// reading the body), and that answer is usually in the socket already.
pub(crate) const EARLY_ANSWER_WAIT: Duration = Duration::from_millis(200);

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
            // Stream the rest of the request body (yielding every 1 MiB: see
            // `flynn_runtime::fair`).
            let mut budget = flynn_runtime::fair::Budget::default();
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
                    Ok(n) if n > 0 => {
                        if budget.spend(n) {
                            flynn_runtime::fair::yield_now().await;
                        }
                    }
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
    // Yielding every 1 MiB relayed (see `flynn_runtime::fair`).
    let mut budget = flynn_runtime::fair::Budget::default();
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
            Ok(n) if n > 0 => {
                if budget.spend(n) {
                    flynn_runtime::fair::yield_now().await;
                }
            }
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
