//! HTTP/2 to clients (TLS with ALPN `h2`, or h2c with prior knowledge), proxied to
//! HTTP/1.1 backends with the same routing, balancing, pools and header rewriting as
//! HTTP/1.1: each HTTP/2 request is turned into an HTTP/1.1 request head that goes through
//! `flynn-http` like any other (`grpc: true` routes go to their backends over HTTP/2:
//! [`grpc`]).
//!
//! Limits that protect the router, per connection: 256 concurrent streams, and as many
//! stream tasks (a stream opened while 256 still run, streams the client reset still
//! winding down, is refused with REFUSED_STREAM and never dials); header list size; h2's
//! caps on resets before acceptance and on locally-errored streams; and a client whose
//! premature resets (of unanswered streams, within 1 s of their start) within 10 s number
//! more than 512 and more than half of the streams it opened then gets GOAWAY
//! ENHANCE_YOUR_CALM (rapid reset, CVE-2023-44487, counted as Envoy does: busy clients
//! whose deadlines cancel some calls are not cut off). A backend's interim responses are
//! relayed up to 5 per request (HEADERS are not flow-controlled). A stream the client
//! resets ends whatever it waits on at once (a dial, a redial, the backend exchange: the
//! backend connection is closed, not pooled), so resetting accepted streams cannot pile
//! up backend work; waits on a backend are bounded as on HTTP/1.1 (response head, then
//! idle time between reads). Every body the router sends, its own answers' included, goes
//! out within the client's flow-control window, and a client that grants none for the
//! idle timeout has the stream reset.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flynn_http::{
    parse_request, parse_response, write_request_head, BodyReader, Dechunker, Framing,
};

use crate::io::{read_append, write_range};
use crate::metrics::CoreMetrics;
use crate::proxy::{connect, redial, Fwd, MAX_ATTEMPTS};
use crate::worker::{Core, ListenerInfo};

mod grpc;
mod heads;

use heads::{h1_head, h2_response};

/// Serves HTTP/2 on `io`: a TLS stream that negotiated `h2`, or plain TCP on an h2c
/// (prior knowledge) listener.
pub async fn serve<S>(core: Rc<Core>, tls: S, peer: SocketAddr, l: ListenerInfo)
where
    S: monoio::io::AsyncReadRent + monoio::io::AsyncWriteRent + Unpin + 'static,
{
    core.conn_opened();
    let io = monoio_compat::StreamWrapper::new(tls);
    let mut b = h2::server::Builder::new();
    b.max_concurrent_streams(MAX_STREAMS as u32)
        .max_header_list_size(64 * 1024)
        .max_pending_accept_reset_streams(64)
        .max_local_error_reset_streams(Some(1024))
        .initial_window_size(256 * 1024)
        .initial_connection_window_size(1024 * 1024);
    let limit = core.settings().header_timeout;
    // The first request (the preface, then the first stream's HEADERS) is due within the
    // header timeout, as on HTTP/1.1; the idle timeout applies between streams after it.
    let first_by = Instant::now() + limit.min(core.settings().idle_timeout);
    if let Ok(Ok(mut conn)) = monoio::time::timeout(limit, b.handshake::<_, Bytes>(io)).await {
        CoreMetrics::inc(&core.metrics().h2_connections_total);
        let streams = Rc::new(Streams::default());
        // When GOAWAY went out (idle, or this process is draining after a handover): the
        // streams in flight finish, then the connection closes.
        let mut closing: Option<Instant> = None;
        // Set once the connection is being ended for rapid resets, or for sending no
        // request.
        let mut calmed = false;
        // No stream yet: the first one's HEADERS are due by `first_by`.
        let mut first = true;
        loop {
            let wait = match closing {
                // A client that never answers the GOAWAY's PING must not hold the connection
                // longer than the header timeout once GOAWAY is out and its streams are done.
                Some(at) => streams.closing_left(at, core.settings().header_timeout),
                None if first => first_by.saturating_duration_since(Instant::now()),
                None => streams.idle_left(core.settings().idle_timeout),
            };
            let next = monoio::select! {
                r = conn.accept() => Some(r),
                _ = core.stop.wait(), if closing.is_none() => None,
                _ = monoio::time::sleep(wait) => None,
            };
            let (req, mut respond) = match next {
                Some(Some(Ok(x))) => x,
                Some(Some(Err(e))) => {
                    tracing::debug!(error = %e, io = e.is_io(), reason = ?e.reason(), "h2 connection error");
                    // Floods (rapid resets, CONTINUATION, too many errors) end here with a
                    // GOAWAY: a bounded cost per connection.
                    if !e.is_io() {
                        CoreMetrics::inc(&core.metrics().h2_connection_errors_total);
                    }
                    break;
                }
                Some(None) => break,
                None if closing.is_some() => {
                    let at = closing.unwrap_or_else(Instant::now);
                    if streams.active.get() == 0
                        && streams
                            .closing_left(at, core.settings().header_timeout)
                            .is_zero()
                    {
                        break;
                    }
                    continue;
                }
                None if first && Instant::now() >= first_by => {
                    // No request within the header timeout: GOAWAY (no stream was
                    // processed) and close, without waiting for a PING the client may
                    // never answer.
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                    calmed = true;
                    closing = Some(Instant::now());
                    continue;
                }
                None => {
                    let idle = streams.active.get() == 0
                        && streams.idle_left(core.settings().idle_timeout).is_zero();
                    if core.draining() || idle {
                        conn.graceful_shutdown();
                        closing = Some(Instant::now());
                    }
                    continue;
                }
            };
            CoreMetrics::inc(&core.metrics().h2_streams_total);
            first = false;
            if calmed {
                // Going away: what the client still sends is not served.
                continue;
            }
            if streams.resets_over_limit() {
                // Rapid reset (CVE-2023-44487): streams opened and reset before their answer,
                // over and over. Each costs a task and maybe a dial; the client is told to
                // stop and the connection ends (its streams are ended with it).
                CoreMetrics::inc(&core.metrics().h2_connection_errors_total);
                conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                calmed = true;
                closing = Some(Instant::now());
                continue;
            }
            if streams.active.get() >= MAX_STREAMS {
                // h2 frees a stream's slot as soon as the client resets it, while its task
                // may still be winding down: tasks, and so dials, are capped here instead.
                CoreMetrics::inc(&core.metrics().h2_streams_refused_total);
                respond.send_reset(h2::Reason::REFUSED_STREAM);
                continue;
            }
            let proto = if l.tls { "https" } else { "http" };
            let guard = StreamGuard::new(streams.clone());
            let core = core.clone();
            monoio::spawn(async move {
                stream(core, req, respond, peer, l, proto, &guard).await;
                drop(guard);
            });
        }
    }
    core.conn_closed();
}

/// Streams in flight per connection: what the connection advertises (SETTINGS), and the
/// most stream tasks it runs at once (see [`serve`]).
const MAX_STREAMS: usize = 256;
/// Rapid reset (CVE-2023-44487), counted as Envoy counts it: a *premature* reset is a
/// client's reset of a stream not answered yet, within [`PREMATURE`] of the stream's
/// start. A connection whose premature resets within one [`RESET_WINDOW`] number more than
/// [`RESET_LIMIT`] and more than half of the streams it started in that window is sent
/// GOAWAY (ENHANCE_YOUR_CALM) and closed. A browser cancels a few requests when the user
/// moves on, and a busy gRPC channel whose deadlines cancel some calls resets many, late or
/// few among many; rapid reset does thousands a second, almost all of its streams.
const RESET_LIMIT: u32 = 2 * MAX_STREAMS as u32;
const RESET_WINDOW: Duration = Duration::from_secs(10);
const PREMATURE: Duration = Duration::from_secs(1);

/// The streams in flight on one client connection, since when it has none, and how many
/// it started and reset prematurely lately: a few integers, touched once per stream.
struct Streams {
    active: Cell<usize>,
    quiet_since: Cell<Instant>,
    /// Start of the current window (a fixed [`RESET_WINDOW`], restarted by the first
    /// stream started or reset after it ends).
    window_since: Cell<Instant>,
    /// Streams started (given a task) in the window.
    started: Cell<u32>,
    /// Premature resets in the window.
    resets: Cell<u32>,
}

impl Default for Streams {
    fn default() -> Self {
        let now = Instant::now();
        Streams {
            active: Cell::new(0),
            quiet_since: Cell::new(now),
            window_since: Cell::new(now),
            started: Cell::new(0),
            resets: Cell::new(0),
        }
    }
}

impl Streams {
    /// Starts a new window if the current one has ended at `now`.
    fn roll_window(&self, now: Instant) {
        if now.saturating_duration_since(self.window_since.get()) >= RESET_WINDOW {
            self.window_since.set(now);
            self.started.set(0);
            self.resets.set(0);
        }
    }

    /// Whether the client's premature resets in the current window are over both
    /// [`RESET_LIMIT`] and half of the streams started in it.
    fn resets_over_limit(&self) -> bool {
        let resets = self.resets.get();
        resets > RESET_LIMIT
            && u64::from(resets) * 2 > u64::from(self.started.get())
            && self.window_since.get().elapsed() < RESET_WINDOW
    }

    /// How long until the connection has been without streams for `limit` (the full
    /// `limit` while streams are open: the check comes round again then).
    fn idle_left(&self, limit: Duration) -> Duration {
        if self.active.get() > 0 {
            return limit;
        }
        limit.saturating_sub(self.quiet_since.get().elapsed())
    }

    /// How long a connection that sent GOAWAY at `at` may still wait for its client: `limit`
    /// after the later of that and its last stream's end (the full `limit` while streams are
    /// open).
    fn closing_left(&self, at: Instant, limit: Duration) -> Duration {
        if self.active.get() > 0 {
            return limit;
        }
        limit.saturating_sub(at.max(self.quiet_since.get()).elapsed())
    }
}

/// One stream of a connection's [`Streams`]: counted as started (in the reset window) when
/// made, in flight until dropped, and knowing its start for [`StreamGuard::note_reset`].
struct StreamGuard {
    streams: Rc<Streams>,
    started: Instant,
}

impl StreamGuard {
    fn new(s: Rc<Streams>) -> Self {
        let now = Instant::now();
        s.roll_window(now);
        s.started.set(s.started.get().saturating_add(1));
        s.active.set(s.active.get() + 1);
        StreamGuard {
            streams: s,
            started: now,
        }
    }

    /// The client reset this stream before its answer: counted if that is premature
    /// (within [`PREMATURE`] of the stream's start).
    fn note_reset(&self) {
        let now = Instant::now();
        if now.saturating_duration_since(self.started) >= PREMATURE {
            return;
        }
        let s = &self.streams;
        s.roll_window(now);
        s.resets.set(s.resets.get().saturating_add(1));
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let s = &self.streams;
        let n = s.active.get() - 1;
        s.active.set(n);
        if n == 0 {
            s.quiet_since.set(Instant::now());
        }
    }
}

/// The router's own answer; to a HEAD request (`head`) without its body. The body goes
/// out within the client's flow-control window like a backend's (a client that grants
/// none for the idle timeout has the stream reset), and the configured 503 page is the
/// one shared copy in [`crate::shared::Settings`], never copied per stream: handed to h2
/// whole, it would be buffered in full for a client that never grants window.
async fn simple(
    respond: &mut h2::server::SendResponse<Bytes>,
    core: &Core,
    head: bool,
    status: u16,
    body: &'static [u8],
) {
    core.metrics().status(status);
    // The configured 503 page, as HTTP/1.1 clients get it.
    let (ctype, body) = match (&core.settings().page_503, status) {
        (Some(page), 503) => ("text/html; charset=utf-8", page.clone()),
        _ => ("text/plain; charset=utf-8", Bytes::from_static(body)),
    };
    let resp = http::Response::builder()
        .status(status)
        .header("content-type", ctype)
        .header("content-length", body.len())
        .body(())
        .unwrap_or_default();
    // A HEAD response has the length a GET would get and no body (RFC 9110 §9.3.2): a DATA
    // frame on it is a protocol error to the client, which resets the stream.
    if let Ok(mut s) = respond.send_response(resp, head) {
        if !head {
            send_flow_controlled(&mut s, body, true, core.settings().idle_timeout).await;
        }
    }
}

/// Why sending a request and reading its response head failed.
enum Failure {
    /// The request head could not be written in full: the backend cannot have acted on it
    /// and no body was taken from the client yet, so a reused connection's request goes
    /// again whatever its method (as on HTTP/1.1).
    Unsent,
    /// The connection failed before any response byte (the request may be replayed if
    /// it is safe and bodiless and the connection was a reused one).
    Stale,
    /// A retry found no backend to dial.
    NoBackend,
    /// The backend answered garbage or failed mid-response.
    Failed,
    /// The client's request body stream failed.
    ClientGone,
}

/// The client's side of a stream while its backend exchange runs: watched for a reset,
/// and handed the interim responses (1xx) the backend sends. Each use borrows it only
/// within one poll, and the two never run at once (one task).
type Respond<'a> = RefCell<&'a mut h2::server::SendResponse<Bytes>>;

/// Sends the request head `out` and the body (DATA frames, re-chunked when the length
/// is unknown) on `up`, then reads the response head into `ubuf`, relaying 1xx (see
/// [`read_head`]) to `respond`.
///
/// Limits are per step, as on HTTP/1.1, so a long upload is not cut off: each wait for
/// the client's next DATA frame and each write to the backend at most `idle`, then the
/// response head within `head_timeout` (the response header timeout, for the whole head).
///
/// A backend may answer before taking the whole body (a 413, a 401) and close or stop
/// reading: when a body write fails or times out, its answer is read for
/// [`crate::proxy::EARLY_ANSWER_WAIT`] and relayed, as on HTTP/1.1, instead of a 503. The
/// request body then did not all reach the backend (even when the client has sent all of
/// it): the second value is `false`, and the connection must not be pooled.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    up: &mut monoio::net::TcpStream,
    out: &mut Vec<u8>,
    body: &mut h2::RecvStream,
    chunked: bool,
    ubuf: &mut Vec<u8>,
    method: flynn_http::Method,
    idle: std::time::Duration,
    head_timeout: std::time::Duration,
    respond: &Respond<'_>,
) -> Result<(flynn_http::ResponseInfo, bool), Failure> {
    // `out` is lent to the write and handed back, kept for a retry.
    let o = std::mem::take(out);
    let len = o.len();
    let (res, o) = match monoio::time::timeout(idle, write_range(up, o, 0, len)).await {
        Ok(x) => x,
        Err(_) => return Err(Failure::Failed),
    };
    *out = o;
    res.map_err(|_| Failure::Unsent)?;
    // On the epoll driver a client sending flat out to a backend reading as fast never
    // makes this loop wait on the driver (DATA is handed over by the connection's task,
    // the backend write completes at once): every 1 MiB the core's other tasks (its
    // table updates among them) get their turn (see `flynn_runtime::fair`).
    let mut budget = flynn_runtime::fair::Budget::default();
    loop {
        let Ok(next) = monoio::time::timeout(idle, body.data()).await else {
            return Err(Failure::ClientGone);
        };
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|_| Failure::ClientGone)?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if budget.spend(chunk.len()) {
            flynn_runtime::fair::yield_now().await;
        }
        // An empty DATA frame (often the one that carries END_STREAM) is no chunk: written
        // as one, its `0` would end the body before the terminator below.
        if chunk.is_empty() {
            continue;
        }
        let mut frame = Vec::with_capacity(chunk.len() + 16);
        if chunked {
            frame.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        }
        frame.extend_from_slice(&chunk);
        if chunked {
            frame.extend_from_slice(b"\r\n");
        }
        let n = frame.len();
        match monoio::time::timeout(idle, write_range(up, frame, 0, n)).await {
            Ok((Ok(()), _)) => {}
            _ => {
                let early = read_head(up, ubuf, method, respond);
                return match monoio::time::timeout(crate::proxy::EARLY_ANSWER_WAIT, early).await {
                    Ok(Ok(r)) => Ok((r, false)),
                    _ => Err(Failure::Failed),
                };
            }
        }
    }
    if chunked {
        let end = b"0\r\n\r\n".to_vec();
        match monoio::time::timeout(idle, write_range(up, end, 0, 5)).await {
            Ok((Ok(()), _)) => {}
            _ => return Err(Failure::Failed),
        }
    }
    monoio::time::timeout(head_timeout, read_head(up, ubuf, method, respond))
        .await
        .unwrap_or(Err(Failure::Failed))
        .map(|r| (r, true))
}

/// Interim responses relayed per request: at most [`MAX_INTERIM`] heads and
/// [`MAX_INTERIM_BYTES`] of them (as the backend sent them). HEADERS frames are not
/// flow-controlled and h2 queues each one for a client that does not read, so a backend
/// sending 1xx heads without end would otherwise have the router buffer them all until
/// the response timeout. Heads past the cap are read and dropped, not relayed, and the
/// final response still goes out: a backend that sends many only costs the reads, within
/// the response timeout like any slow head (Go's client allows 5 and fails the request
/// past that; dropping keeps the answer, which HTTP/1.1 clients get too).
const MAX_INTERIM: u32 = 5;
const MAX_INTERIM_BYTES: usize = 64 * 1024;

/// Reads the response head into `ubuf`, relaying interim 1xx heads to the client as
/// HTTP/2 informational responses (103 Early Hints, as HTTP/1.1 clients get them, up to
/// [`MAX_INTERIM`]) but for a 100 (the router answers `Expect` itself). What a read
/// brought is parsed to the end before the next read: a final head often arrives in the
/// same read as a 100 or 103 before it. A 101 is a failure (an HTTP/2 stream cannot
/// switch protocols; the HTTP/1 path answers 503 too), and so is a close after an interim
/// head (the request was answered in part, so it is not replayed).
async fn read_head(
    up: &mut monoio::net::TcpStream,
    ubuf: &mut Vec<u8>,
    method: flynn_http::Method,
    respond: &Respond<'_>,
) -> Result<flynn_http::ResponseInfo, Failure> {
    let mut interim = false;
    // Interim heads relayed so far, and their bytes.
    let (mut relayed, mut relayed_bytes) = (0, 0);
    loop {
        if !ubuf.is_empty() {
            match parse_response(ubuf, method) {
                Ok(Some(r)) if r.status == 101 => return Err(Failure::Failed),
                Ok(Some(r)) if r.status < 200 => {
                    let fits =
                        relayed < MAX_INTERIM && relayed_bytes + r.head_len <= MAX_INTERIM_BYTES;
                    if r.status != 100 && fits {
                        relayed += 1;
                        relayed_bytes += r.head_len;
                        let head = h2_response(&ubuf[..r.head_len], r.status);
                        // A client gone meanwhile is seen by the reset watch.
                        let _ = respond.borrow_mut().send_informational(head);
                    }
                    ubuf.drain(..r.head_len);
                    interim = true;
                    continue;
                }
                Ok(Some(r)) => return Ok(r),
                Ok(None) => {}
                Err(_) => return Err(Failure::Failed),
            }
        }
        let (res, b) = read_append(up, std::mem::take(ubuf)).await;
        *ubuf = b;
        match res {
            Ok(n) if n > 0 => {}
            _ if ubuf.is_empty() && !interim => return Err(Failure::Stale),
            _ => return Err(Failure::Failed),
        }
    }
}

/// Serves one stream. A client that resets it before its answer is counted by `guard`
/// (rapid-reset defence) and ends whatever is pending for it at once: a dial, a redial, a
/// backend exchange.
async fn stream(
    core: Rc<Core>,
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: SocketAddr,
    l: ListenerInfo,
    proto: &'static str,
    guard: &StreamGuard,
) {
    let start_ms = crate::proxy::now_ms();
    CoreMetrics::inc(&core.metrics().requests_total);
    let (parts, mut body) = req.into_parts();
    let is_head = parts.method == http::Method::HEAD;
    // Not tunnelled, as on HTTP/1.1: the client would wait for a 2xx before sending data
    // while the backend exchange waited for the end of the stream.
    if parts.method == http::Method::CONNECT {
        CoreMetrics::inc(&core.metrics().bad_requests_total);
        return simple(&mut respond, &core, is_head, 405, b"Method Not Allowed\n").await;
    }
    let (head, chunked) = h1_head(&parts, body.is_end_stream());
    let Ok(Some(info)) = parse_request(&head) else {
        CoreMetrics::inc(&core.metrics().bad_requests_total);
        return simple(&mut respond, &core, is_head, 400, b"Bad Request\n").await;
    };
    let table = core.table();
    let host = info.host.map(|s| s.get(&head)).unwrap_or(b"");
    let Some(route) = table.lookup_http(host, l.route_port, info.path.get(&head)) else {
        CoreMetrics::inc(&core.metrics().not_found_total);
        return simple(&mut respond, &core, is_head, 404, b"Not Found\n").await;
    };
    if route.grpc {
        let (backends, id) = (route.backends.clone(), route.id.clone());
        drop(table);
        return grpc::passthrough(
            core, parts, body, respond, &backends, &id, peer, l, proto, start_ms, guard,
        )
        .await;
    }
    // Sticky sessions as on HTTP/1.1: the `_backend` cookie picks the backend first, and
    // a new one is set when the request went elsewhere.
    let sealer = core.settings().sticky.as_ref().filter(|_| route.sticky);
    let cookie_addr = sealer.and_then(|s| crate::sticky::from_request(s, &head[..info.head_len]));
    let dialled = monoio::select! {
        c = connect(&core, route, cookie_addr, None) => c,
        _ = client_reset(&mut respond) => return guard.note_reset(),
    };
    let Some((mut up, mut addr, mut reused)) = dialled else {
        CoreMetrics::inc(&core.metrics().unavailable_total);
        return simple(&mut respond, &core, is_head, 503, b"Service Unavailable\n").await;
    };
    let mut _inflight = core.start_request(addr);
    // `Expect: 100-continue` is the router's to answer, as on HTTP/1.1 (the field is not
    // forwarded): a client waiting for the 100 would otherwise stall until its own timeout.
    if info.expect_continue && !body.is_end_stream() {
        let go_on = http::Response::builder()
            .status(100)
            .body(())
            .unwrap_or_default();
        if respond.send_informational(go_on).is_err() {
            return;
        }
    }
    let fwd = Fwd {
        proto,
        peer,
        l,
        start_ms,
        // Streams learn of a client leaving from their reset, not from the socket.
        fd: -1,
    };
    let mut out = Vec::with_capacity(head.len() + 256);
    write_request_head(
        &head,
        &info,
        &fwd.forward(route.disable_keep_alives),
        &mut out,
    );
    // As on HTTP/1.1, a reused pooled connection that fails goes again on a fresh one when
    // the request head could not be written (nothing reached the backend, and no body was
    // read from the client yet), or when a bodiless safe request got no response byte
    // (spec §1.10).
    let replayable = body.is_end_stream() && info.method.is_safe();
    let mut ubuf = Vec::with_capacity(16 * 1024);
    let idle = core.settings().idle_timeout;
    let watched: Respond<'_> = RefCell::new(&mut respond);
    let attempts = async {
        let mut retries = 0;
        loop {
            let ex = exchange(
                &mut up,
                &mut out,
                &mut body,
                chunked,
                &mut ubuf,
                info.method,
                idle,
                core.settings().response_header_timeout,
                &watched,
            );
            let again = match ex.await {
                Ok(r) => return Ok(r),
                Err(Failure::Unsent) => reused,
                Err(Failure::Stale) => reused && replayable,
                Err(f) => return Err(f),
            };
            if !again || retries >= MAX_ATTEMPTS {
                return Err(Failure::Failed);
            }
            retries += 1;
            ubuf.clear();
            let Some((s, a, r)) = redial(&core, route, addr).await else {
                return Err(Failure::NoBackend);
            };
            (up, reused) = (s, r);
            if a != addr {
                addr = a;
                _inflight = core.start_request(a);
            }
        }
    };
    let resp = monoio::select! {
        // The reset watch first: a reset during an upload also fails the exchange's wait
        // for the body (`ClientGone`), and must be counted whichever is seen first.
        biased;
        // The client gave up on the stream: so does the backend exchange or dial (its
        // connection is dropped with it).
        _ = std::future::poll_fn(|cx| watched.borrow_mut().poll_reset(cx)) => {
            return guard.note_reset()
        }
        r = attempts => r,
    };
    let resp = match resp {
        Ok(r) => r,
        Err(Failure::ClientGone) => return,
        // Counted as HTTP/1.1 counts them (`proxy::answer::upstream_failed`).
        Err(Failure::NoBackend) => {
            CoreMetrics::inc(&core.metrics().unavailable_total);
            return simple(&mut respond, &core, is_head, 503, b"Service Unavailable\n").await;
        }
        Err(_) => {
            CoreMetrics::inc(&core.metrics().upstream_errors_total);
            CoreMetrics::inc(&core.metrics().unavailable_total);
            return simple(&mut respond, &core, is_head, 503, b"Service Unavailable\n").await;
        }
    };
    // A backend that answered before taking the whole body (see `exchange`) is not
    // reused: the rest of the body never reached it.
    let (resp, whole) = resp;
    core.metrics().status(resp.status);
    let end = resp.framing == Framing::Empty || matches!(resp.framing, Framing::Length(0));
    let mut response = h2_response(&ubuf[..resp.head_len], resp.status);
    if let Some(s) = sealer.filter(|_| cookie_addr != Some(addr)) {
        if let Ok(v) = http::HeaderValue::from_bytes(&crate::sticky::set_cookie(s, addr)) {
            response.headers_mut().append(http::header::SET_COOKIE, v);
        }
    }
    let Ok(mut send) = respond.send_response(response, end) else {
        return;
    };

    if end {
        if ubuf.len() != resp.head_len {
            core.pool.note_strays(addr);
        } else if resp.keep_alive && !route.disable_keep_alives && whole {
            core.pool.put(addr, up, resp.framing == Framing::Empty);
        }
        return;
    }
    // Response body: payload only (chunk framing decoded), within the client's window.
    let mut framing = BodyReader::new(resp.framing);
    let mut dechunk = (resp.framing == Framing::Chunked).then(Dechunker::new);
    let mut pending: Vec<u8> = ubuf[resp.head_len..].to_vec();
    let mut payload = Vec::with_capacity(16 * 1024);
    // Bytes after the body's end (a backend sending more than it framed): the connection
    // is then not reused, as on the HTTP/1.1 path, or they would be read as the next
    // request's response.
    let mut clean = true;
    // Yields every 1 MiB read from the backend: a backend sending flat out to a client
    // granting window as fast never makes this loop wait on the epoll driver.
    let mut budget = flynn_runtime::fair::Budget::default();
    loop {
        if !pending.is_empty() {
            let used = match framing.advance(&pending) {
                Ok(a) => a.used,
                Err(_) => return send.send_reset(h2::Reason::INTERNAL_ERROR),
            };
            clean = used == pending.len();
            payload.clear();
            match dechunk.as_mut() {
                Some(d) => {
                    if d.feed(&pending[..used], &mut payload).is_err() {
                        return send.send_reset(h2::Reason::INTERNAL_ERROR);
                    }
                }
                None => payload.extend_from_slice(&pending[..used]),
            }
            if !payload.is_empty() {
                let data = Bytes::copy_from_slice(&payload);
                if !send_flow_controlled(&mut send, data, false, core.settings().idle_timeout).await
                {
                    return;
                }
            }
            pending.clear();
        }
        if framing.is_done() {
            let _ = send.send_data(Bytes::new(), true);
            if !clean {
                core.pool.note_strays(addr);
            } else if resp.keep_alive && !route.disable_keep_alives && whole {
                core.pool.put(addr, up, false);
            }
            return;
        }
        let read = monoio::time::timeout(
            core.settings().idle_timeout,
            read_append(&mut up, std::mem::take(&mut pending)),
        );
        let (res, b) = monoio::select! {
            r = read => match r {
                Ok(r) => r,
                Err(_) => return send.send_reset(h2::Reason::INTERNAL_ERROR),
            },
            _ = std::future::poll_fn(|cx| send.poll_reset(cx)) => return,
        };
        pending = b;
        match res {
            Ok(n) if n > 0 => {
                if budget.spend(n) {
                    flynn_runtime::fair::yield_now().await;
                }
            }
            // The backend's close ends a close-delimited body, and that alone: a read error
            // (a reset) cut it short, and the client must not take it as complete.
            Ok(_) if resp.framing == Framing::Close => {
                let _ = send.send_data(Bytes::new(), true);
                return;
            }
            _ => return send.send_reset(h2::Reason::INTERNAL_ERROR),
        }
    }
}

/// Sends `data` as DATA frames as the client's flow-control window allows (slices of it:
/// no copy), the last one with END_STREAM if `end`. A client that grants no window for
/// `idle` (it stopped reading) has the stream reset, which frees its backend connection and
/// the connection-level window it held. [`grpc`]'s pump sends each chunk through this too.
/// False when the stream ended before all was sent.
async fn send_flow_controlled(
    send: &mut h2::SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
    idle: Duration,
) -> bool {
    if data.is_empty() {
        return !end || send.send_data(data, true).is_ok();
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let wait = std::future::poll_fn(|cx| send.poll_capacity(cx));
        let cap = match monoio::time::timeout(idle, wait).await {
            Ok(Some(Ok(c))) if c > 0 => c,
            Ok(Some(Ok(_))) => continue,
            Ok(_) => return false,
            Err(_) => {
                send.send_reset(h2::Reason::CANCEL);
                return false;
            }
        };
        let part = data.split_to(cap.min(data.len()));
        if send.send_data(part, end && data.is_empty()).is_err() {
            return false;
        }
    }
    true
}

/// Resolves when the client resets the stream `respond` answers.
async fn client_reset(respond: &mut h2::server::SendResponse<Bytes>) {
    let _ = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
}
