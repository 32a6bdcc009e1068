//! HTTP/2 to clients (TLS with ALPN `h2`), proxied to HTTP/1.1 backends with the same
//! routing, balancing, pools and header rewriting as HTTP/1.1: each HTTP/2 request is
//! turned into an HTTP/1.1 request head that goes through `flynn-http` like any other.
//! Limits that protect the router: concurrent streams, header list size, and caps on
//! reset streams (rapid reset) and pending resets, all from the `h2` crate's builder. A
//! stream the client resets ends its backend exchange at once (the backend connection is
//! closed, not pooled), so resetting accepted streams cannot pile up backend work; waits
//! on a backend are bounded as on HTTP/1.1 (response head, then idle time between reads).

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flynn_http::{
    parse_request, parse_response, write_request_head, BodyReader, Dechunker, Framing,
};

use crate::io::{read_append, write_range};
use crate::metrics::CoreMetrics;
use crate::proxy::{connect, redial, Fwd};
use crate::worker::{Core, ListenerInfo};

/// Serves HTTP/2 on `io`: a TLS stream that negotiated `h2`, or plain TCP on an h2c
/// (prior knowledge) listener.
pub async fn serve<S>(core: Rc<Core>, tls: S, peer: SocketAddr, l: ListenerInfo)
where
    S: monoio::io::AsyncReadRent + monoio::io::AsyncWriteRent + Unpin + 'static,
{
    core.conn_opened();
    let io = monoio_compat::StreamWrapper::new(tls);
    let mut b = h2::server::Builder::new();
    b.max_concurrent_streams(256)
        .max_header_list_size(64 * 1024)
        .max_pending_accept_reset_streams(64)
        .max_local_error_reset_streams(Some(1024))
        .initial_window_size(256 * 1024)
        .initial_connection_window_size(1024 * 1024);
    let limit = core.settings().header_timeout;
    if let Ok(Ok(mut conn)) = monoio::time::timeout(limit, b.handshake::<_, Bytes>(io)).await {
        CoreMetrics::inc(&core.metrics().h2_connections_total);
        let streams = Rc::new(Streams::default());
        // When GOAWAY went out (idle, or this process is draining after a handover): the
        // streams in flight finish, then the connection closes.
        let mut closing: Option<Instant> = None;
        loop {
            let wait = match closing {
                // A client that never answers the GOAWAY's PING must not hold the connection
                // longer than the header timeout once GOAWAY is out and its streams are done.
                Some(at) => streams.closing_left(at, core.settings().header_timeout),
                None => streams.idle_left(core.settings().idle_timeout),
            };
            let next = monoio::select! {
                r = conn.accept() => Some(r),
                _ = core.stop.wait(), if closing.is_none() => None,
                _ = monoio::time::sleep(wait) => None,
            };
            let (req, respond) = match next {
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
            let proto = if l.tls { "https" } else { "http" };
            let guard = StreamGuard::new(streams.clone());
            let core = core.clone();
            monoio::spawn(async move {
                stream(core, req, respond, peer, l, proto).await;
                drop(guard);
            });
        }
    }
    core.conn_closed();
}

/// The streams in flight on one client connection, and since when it has none.
struct Streams {
    active: Cell<usize>,
    quiet_since: Cell<Instant>,
}

impl Default for Streams {
    fn default() -> Self {
        Streams {
            active: Cell::new(0),
            quiet_since: Cell::new(Instant::now()),
        }
    }
}

impl Streams {
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

/// Counts one stream as in flight until dropped.
struct StreamGuard(Rc<Streams>);

impl StreamGuard {
    fn new(s: Rc<Streams>) -> Self {
        s.active.set(s.active.get() + 1);
        StreamGuard(s)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let n = self.0.active.get() - 1;
        self.0.active.set(n);
        if n == 0 {
            self.0.quiet_since.set(Instant::now());
        }
    }
}

/// The router's own answer; to a HEAD request (`head`) without its body.
fn simple(
    respond: &mut h2::server::SendResponse<Bytes>,
    core: &Core,
    head: bool,
    status: u16,
    body: &'static [u8],
) {
    core.metrics().status(status);
    // The configured 503 page, as HTTP/1.1 clients get it.
    let (ctype, body) = match (&core.settings().page_503, status) {
        (Some(page), 503) => ("text/html; charset=utf-8", Bytes::copy_from_slice(page)),
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
            let _ = s.send_data(body, true);
        }
    }
}

/// The HTTP/1.1 head equivalent to an HTTP/2 request (pseudo-headers to request line
/// and Host; connection-specific headers dropped; chunked when the length is unknown).
fn h1_head(parts: &http::request::Parts, end_stream: bool) -> (Vec<u8>, bool) {
    let mut h = Vec::with_capacity(512);
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    h.extend_from_slice(parts.method.as_str().as_bytes());
    h.push(b' ');
    h.extend_from_slice(pq.as_bytes());
    h.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    let authority = parts.uri.authority().map(|a| a.as_str().as_bytes());
    let host = authority
        .or_else(|| parts.headers.get("host").map(|v| v.as_bytes()))
        .unwrap_or(b"");
    h.extend_from_slice(host);
    h.extend_from_slice(b"\r\n");
    let mut has_length = false;
    // HTTP/2 clients may split Cookie into one field per cookie; HTTP/1.1 allows only one
    // field, so they are joined with "; " (RFC 9113 §8.2.3).
    let mut cookies = parts.headers.get_all("cookie").iter();
    if let Some(first) = cookies.next() {
        h.extend_from_slice(b"cookie: ");
        h.extend_from_slice(first.as_bytes());
        for v in cookies {
            h.extend_from_slice(b"; ");
            h.extend_from_slice(v.as_bytes());
        }
        h.extend_from_slice(b"\r\n");
    }
    for (name, value) in &parts.headers {
        match name.as_str() {
            "host" | "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding"
            | "upgrade" | "cookie" => continue,
            "te" => continue,
            "content-length" => has_length = true,
            _ => {}
        }
        h.extend_from_slice(name.as_str().as_bytes());
        h.extend_from_slice(b": ");
        h.extend_from_slice(value.as_bytes());
        h.extend_from_slice(b"\r\n");
    }
    let chunked = !end_stream && !has_length;
    if chunked {
        h.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    h.extend_from_slice(b"\r\n");
    (h, chunked)
}

/// The response headers to pass to an HTTP/2 client (hop-by-hop ones removed, the fields a
/// Connection field names matched case-insensitively). Content-Length goes out once, as a
/// single value: a list of equal values or a repeated field (the parser refused unequal
/// ones) is valid HTTP/1 but not a valid HTTP/2 `content-length`, and clients reset the
/// stream over it.
fn h2_response(head: &[u8], status: u16) -> http::Response<()> {
    let mut b = http::Response::builder().status(status);
    let fields = || {
        head.split(|&c| c == b'\n').skip(1).filter_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let colon = line.iter().position(|&c| c == b':')?;
            Some((&line[..colon], line[colon + 1..].trim_ascii()))
        })
    };
    let mut listed: Vec<Vec<u8>> = Vec::new();
    for (name, value) in fields() {
        if name.eq_ignore_ascii_case(b"connection") {
            listed.extend(
                value
                    .split(|&c| c == b',')
                    .map(|t| t.trim_ascii().to_ascii_lowercase()),
            );
        }
    }
    let mut length_done = false;
    for (name, value) in fields() {
        let name = name.to_ascii_lowercase();
        if name == b"content-length" {
            if !length_done {
                length_done = true;
                let first = value.split(|&c| c == b',').next().unwrap_or(b"");
                b = b.header(name.as_slice(), first.trim_ascii());
            }
            continue;
        }
        let hop = matches!(
            name.as_slice(),
            b"connection"
                | b"keep-alive"
                | b"proxy-connection"
                | b"transfer-encoding"
                | b"upgrade"
                | b"te"
                | b"trailer"
        );
        if hop || listed.contains(&name) {
            continue;
        }
        b = b.header(name.as_slice(), value);
    }
    b.body(()).unwrap_or_default()
}

/// Why sending a request and reading its response head failed.
enum Failure {
    /// The connection failed before any response byte (the request may be replayed if
    /// it is safe and bodiless and the connection was a reused one).
    Stale,
    /// The backend answered garbage or failed mid-response.
    Failed,
    /// The client's request body stream failed.
    ClientGone,
}

/// Sends the request head `out` and the body (DATA frames, re-chunked when the length
/// is unknown) on `up`, then reads the response head into `ubuf`, skipping 1xx.
///
/// Limits are per step, as on HTTP/1.1, so a long upload is not cut off: each wait for
/// the client's next DATA frame and each write to the backend at most `idle`, then the
/// response head within [`crate::proxy::RESPONSE_HEADER_TIMEOUT`].
///
/// A backend may answer before taking the whole body (a 413, a 401) and close or stop
/// reading: when a body write fails or times out, its answer is read for
/// [`crate::proxy::EARLY_ANSWER_WAIT`] and relayed, as on HTTP/1.1, instead of a 503. The
/// request body then did not all reach the backend (even when the client has sent all of
/// it): the second value is `false`, and the connection must not be pooled.
async fn exchange(
    up: &mut monoio::net::TcpStream,
    out: &mut Vec<u8>,
    body: &mut h2::RecvStream,
    chunked: bool,
    ubuf: &mut Vec<u8>,
    method: flynn_http::Method,
    idle: std::time::Duration,
) -> Result<(flynn_http::ResponseInfo, bool), Failure> {
    // `out` is lent to the write and handed back, kept for a retry.
    let o = std::mem::take(out);
    let len = o.len();
    let (res, o) = match monoio::time::timeout(idle, write_range(up, o, 0, len)).await {
        Ok(x) => x,
        Err(_) => return Err(Failure::Failed),
    };
    *out = o;
    res.map_err(|_| Failure::Stale)?;
    loop {
        let Ok(next) = monoio::time::timeout(idle, body.data()).await else {
            return Err(Failure::ClientGone);
        };
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|_| Failure::ClientGone)?;
        let _ = body.flow_control().release_capacity(chunk.len());
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
                let early = read_head(up, ubuf, method);
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
    monoio::time::timeout(
        crate::proxy::RESPONSE_HEADER_TIMEOUT,
        read_head(up, ubuf, method),
    )
    .await
    .unwrap_or(Err(Failure::Failed))
    .map(|r| (r, true))
}

/// Reads the response head into `ubuf`, skipping interim 1xx heads. What a read brought is
/// parsed to the end before the next read: a final head often arrives in the same read as
/// a 100 or 103 before it. A 101 is a failure (an HTTP/2 stream cannot switch protocols;
/// the HTTP/1 path answers 503 too), and so is a close after an interim head (the request
/// was answered in part, so it is not replayed).
async fn read_head(
    up: &mut monoio::net::TcpStream,
    ubuf: &mut Vec<u8>,
    method: flynn_http::Method,
) -> Result<flynn_http::ResponseInfo, Failure> {
    let mut interim = false;
    loop {
        if !ubuf.is_empty() {
            match parse_response(ubuf, method) {
                Ok(Some(r)) if r.status == 101 => return Err(Failure::Failed),
                Ok(Some(r)) if r.status < 200 => {
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

async fn stream(
    core: Rc<Core>,
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: SocketAddr,
    l: ListenerInfo,
    proto: &'static str,
) {
    let start_ms = crate::proxy::now_ms();
    CoreMetrics::inc(&core.metrics().requests_total);
    let (parts, mut body) = req.into_parts();
    let is_head = parts.method == http::Method::HEAD;
    // Not tunnelled, as on HTTP/1.1: the client would wait for a 2xx before sending data
    // while the backend exchange waited for the end of the stream.
    if parts.method == http::Method::CONNECT {
        CoreMetrics::inc(&core.metrics().bad_requests_total);
        return simple(&mut respond, &core, is_head, 405, b"Method Not Allowed\n");
    }
    let (head, chunked) = h1_head(&parts, body.is_end_stream());
    let Ok(Some(info)) = parse_request(&head) else {
        CoreMetrics::inc(&core.metrics().bad_requests_total);
        return simple(&mut respond, &core, is_head, 400, b"Bad Request\n");
    };
    let table = core.table();
    let host = info.host.map(|s| s.get(&head)).unwrap_or(b"");
    let Some(route) = table.lookup_http(host, l.route_port, info.path.get(&head)) else {
        CoreMetrics::inc(&core.metrics().not_found_total);
        return simple(&mut respond, &core, is_head, 404, b"Not Found\n");
    };
    if route.grpc {
        let (backends, id) = (route.backends.clone(), route.id.clone());
        drop(table);
        return passthrough(
            core, parts, body, respond, &backends, &id, peer, l, proto, start_ms,
        )
        .await;
    }
    // Sticky sessions as on HTTP/1.1: the `_backend` cookie picks the backend first, and
    // a new one is set when the request went elsewhere.
    let sealer = core.settings().sticky.as_ref().filter(|_| route.sticky);
    let cookie_addr = sealer.and_then(|s| crate::sticky::from_request(s, &head[..info.head_len]));
    let Some((mut up, mut addr, mut reused)) = connect(&core, route, cookie_addr, None).await
    else {
        CoreMetrics::inc(&core.metrics().unavailable_total);
        return simple(&mut respond, &core, is_head, 503, b"Service Unavailable\n");
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
    // As on HTTP/1.1: a bodiless safe request whose reused pooled connection turns out
    // dead before any response byte goes again on a fresh connection (spec §1.10).
    let replayable = body.is_end_stream() && info.method.is_safe();
    let mut ubuf = Vec::with_capacity(16 * 1024);
    let mut retries = 0;
    let resp = loop {
        let ex = exchange(
            &mut up,
            &mut out,
            &mut body,
            chunked,
            &mut ubuf,
            info.method,
            core.settings().idle_timeout,
        );
        let res = monoio::select! {
            r = ex => r,
            // The client gave up on the stream: so does the backend exchange (its
            // connection is dropped with it).
            _ = client_reset(&mut respond) => return,
        };
        match res {
            Ok(r) => break r,
            Err(Failure::Stale) if reused && replayable && retries < 2 => {
                retries += 1;
                ubuf.clear();
                let Some((s, a, r)) = redial(&core, route, addr).await else {
                    return simple(&mut respond, &core, is_head, 503, b"Service Unavailable\n");
                };
                (up, reused) = (s, r);
                if a != addr {
                    addr = a;
                    _inflight = core.start_request(a);
                }
            }
            Err(Failure::ClientGone) => return,
            Err(_) => {
                CoreMetrics::inc(&core.metrics().upstream_errors_total);
                return simple(&mut respond, &core, is_head, 503, b"Service Unavailable\n");
            }
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
            if !payload.is_empty()
                && !send_flow_controlled(&mut send, &payload, core.settings().idle_timeout).await
            {
                return;
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
            Ok(n) if n > 0 => {}
            _ if resp.framing == Framing::Close => {
                let _ = send.send_data(Bytes::new(), true);
                return;
            }
            _ => return send.send_reset(h2::Reason::INTERNAL_ERROR),
        }
    }
}

/// Sends `data` as DATA frames as the client's flow-control window allows. A client that
/// grants no window for `idle` (it stopped reading) has the stream reset, which frees its
/// backend connection and the connection-level window it held (as gRPC's [`pump`]).
async fn send_flow_controlled(
    send: &mut h2::SendStream<Bytes>,
    data: &[u8],
    idle: Duration,
) -> bool {
    let mut rest = data;
    while !rest.is_empty() {
        send.reserve_capacity(rest.len());
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
        let n = cap.min(rest.len());
        if send
            .send_data(Bytes::copy_from_slice(&rest[..n]), false)
            .is_err()
        {
            return false;
        }
        rest = &rest[n..];
    }
    true
}

/// gRPC routes: the stream goes to the backend over HTTP/2 as it is (headers, DATA in
/// both directions at once, trailers), with the forwarding headers added. Streams share
/// one HTTP/2 connection per backend per core ([`grpc_backend`]).
#[allow(clippy::too_many_arguments)]
async fn passthrough(
    core: Rc<Core>,
    parts: http::request::Parts,
    body: h2::RecvStream,
    mut respond: h2::server::SendResponse<Bytes>,
    backends: &[SocketAddr],
    route_id: &str,
    peer: SocketAddr,
    l: ListenerInfo,
    proto: &'static str,
    start_ms: u64,
) {
    let is_head = parts.method == http::Method::HEAD;
    let Some((mut client, addr)) = grpc_backend(&core, backends, route_id).await else {
        CoreMetrics::inc(&core.metrics().unavailable_total);
        return simple(&mut respond, &core, is_head, 503, b"Service Unavailable\n");
    };
    let _inflight = core.start_request(addr);
    // Waits for a free stream slot under the backend's SETTINGS_MAX_CONCURRENT_STREAMS.
    client = match client.ready().await {
        Ok(c) => c,
        Err(_) => {
            core.grpc.borrow_mut().remove(&addr);
            return simple(&mut respond, &core, is_head, 503, b"Service Unavailable\n");
        }
    };

    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut req = http::Request::builder()
        .method(parts.method.clone())
        .uri(format!("http://{authority}{pq}"));
    let mut xff = String::new();
    let mut request_id = None;
    for (name, value) in &parts.headers {
        // The router's own fields spelt with `_` for `-` count as those fields, as on the
        // HTTP/1.1 path (CGI-style backends read both spellings as one variable).
        let spelt = name.as_str();
        let key = if spelt.starts_with("x_") || (spelt.starts_with("x-") && spelt.contains('_')) {
            std::borrow::Cow::Owned(spelt.replace('_', "-"))
        } else {
            std::borrow::Cow::Borrowed(spelt)
        };
        match &*key {
            "x-forwarded-for" => {
                xff.push_str(value.to_str().unwrap_or(""));
                xff.push_str(", ");
                continue;
            }
            "x-forwarded-proto" | "x-forwarded-port" | "x-request-start" => continue,
            "x-request-id" => {
                if request_id.is_none() && flynn_http::valid_request_id(value.as_bytes()) {
                    request_id = Some(value.clone());
                }
                continue;
            }
            _ => {}
        }
        req = req.header(name, value);
    }
    xff.push_str(&crate::proxy::client_ip(peer).to_string());
    let request_id = request_id.unwrap_or_else(|| {
        let mut id = [0u8; 36];
        flynn_http::format_uuid_v4(
            ((fastrand::u64(..) as u128) << 64) | fastrand::u64(..) as u128,
            &mut id,
        );
        http::HeaderValue::from_bytes(&id).unwrap_or(http::HeaderValue::from_static("0"))
    });
    let req = req
        .header("x-forwarded-for", xff)
        .header("x-forwarded-proto", proto)
        .header("x-forwarded-port", l.port)
        .header("x-request-start", start_ms)
        .header("x-request-id", request_id)
        .body(());
    let Ok(req) = req else {
        return simple(&mut respond, &core, is_head, 400, b"Bad Request\n");
    };
    let end = body.is_end_stream();
    let Ok((resp, upload)) = client.send_request(req, end) else {
        return simple(&mut respond, &core, is_head, 503, b"Service Unavailable\n");
    };
    let idle = core.settings().idle_timeout;
    let up_pump = async move {
        if !end {
            pump(body, upload, idle).await;
        }
    };
    let down = async move {
        // A client that resets the stream drops the backend's too.
        let resp = monoio::select! {
            r = resp => r,
            _ = client_reset(&mut respond) => return,
        };
        let Ok(resp) = resp else {
            return simple(&mut respond, &core, is_head, 503, b"Service Unavailable\n");
        };
        core.metrics().status(resp.status().as_u16());
        let (rparts, rbody) = resp.into_parts();
        let end = rbody.is_end_stream();
        let Ok(send) = respond.send_response(http::Response::from_parts(rparts, ()), end) else {
            return;
        };
        if !end {
            pump(rbody, send, idle).await;
        }
    };
    monoio::join!(up_pump, down);
}

/// An HTTP/2 connection to one of `backends`: this core's open connection to a backend
/// (tried in shuffled order) if it is still up, else a new one dialled and kept for the
/// next streams. Connections to backends no route lists any more are dropped at the table
/// change that removed them.
async fn grpc_backend(
    core: &Rc<Core>,
    backends: &[SocketAddr],
    route_id: &str,
) -> Option<(h2::client::SendRequest<Bytes>, SocketAddr)> {
    let mut order = [SocketAddr::from(([0, 0, 0, 0], 0)); 16];
    let n = crate::balance::shuffled(backends, &mut order);
    for addr in &order[..n] {
        let pooled = core.grpc.borrow().get(addr).map(|(_, c)| c.clone());
        if let Some(mut c) = pooled {
            // A connection whose task ended (GOAWAY, reset, backend gone) says so here.
            if std::future::poll_fn(|cx| c.poll_ready(cx)).await.is_ok() {
                CoreMetrics::inc(&core.metrics().upstream_reuses_total);
                return Some((c, *addr));
            }
            core.grpc.borrow_mut().remove(addr);
        }
    }
    let mut dials = crate::balance::DialOrder::new(backends, None);
    let now = || core.table().backends_of(route_id).cloned();
    while let Some(a) = dials.next(now) {
        let addr = &a;
        // Counted in flight through the dial and the handshake (the caller counts its
        // request from when this returns, with no await in between).
        let _dialing = core.start_request(*addr);
        let Ok(s) = crate::proxy::dial(core, *addr).await else {
            CoreMetrics::inc(&core.metrics().upstream_connect_errors_total);
            continue;
        };
        // Windows far above h2's 64 KiB default: a stream whose client reads slowly keeps
        // its unread data (up to the stream window) charged to the connection, which every
        // other gRPC stream to this backend on this core shares; at the default, one such
        // stream stalled them all.
        let handshake = h2::client::Builder::new()
            .initial_window_size(GRPC_STREAM_WINDOW)
            .initial_connection_window_size(GRPC_CONNECTION_WINDOW)
            .handshake::<_, Bytes>(monoio_compat::StreamWrapper::new(s));
        let Ok((client, conn)) = handshake.await else {
            CoreMetrics::inc(&core.metrics().upstream_errors_total);
            continue;
        };
        CoreMetrics::inc(&core.metrics().upstream_connects_total);
        let (core2, a, id) = (core.clone(), *addr, fastrand::u64(..));
        monoio::spawn(async move {
            let _ = conn.await;
            // Forget the connection once it is gone (unless replaced meanwhile).
            let mut pool = core2.grpc.borrow_mut();
            if pool.get(&a).is_some_and(|(i, _)| *i == id) {
                pool.remove(&a);
            }
        });
        // Connections to backends no route has any more are dropped at the table change
        // that removed them (`worker::forget_gone_backends`); one dialled across such a
        // change serves this call and is not pooled.
        if core
            .table()
            .http_routes()
            .any(|r| r.backends.contains(addr))
        {
            core.grpc.borrow_mut().insert(*addr, (id, client.clone()));
        }
        return Some((client, *addr));
    }
    None
}

/// A gRPC backend connection's receive window per stream, and for the connection: 4,096
/// streams whose clients stopped reading (16 client connections' worth) can hold it before
/// the others wait, and a stalled one is reset after the idle timeout (see [`pump`]).
const GRPC_STREAM_WINDOW: u32 = 256 << 10;
const GRPC_CONNECTION_WINDOW: u32 = 1 << 30;

/// Copies DATA frames (as the receiver's window allows) and then trailers.
/// Resolves when the client resets the stream `respond` answers.
async fn client_reset(respond: &mut h2::server::SendResponse<Bytes>) {
    let _ = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
}

/// A receiver that grants no window for `idle` (a client that stopped reading) has its
/// stream reset: what the pump holds for it is freed, and it stops holding its share of the
/// backend connection's window, which the core's other calls to that backend need.
async fn pump(mut from: h2::RecvStream, mut to: h2::SendStream<Bytes>, idle: Duration) {
    loop {
        // Waiting for the sender, the receiver may go away: then so does this pump.
        let next = monoio::select! {
            d = from.data() => d,
            _ = std::future::poll_fn(|cx| to.poll_reset(cx)) => return,
        };
        let Some(chunk) = next else { break };
        let Ok(mut chunk) = chunk else {
            to.send_reset(h2::Reason::CANCEL);
            return;
        };
        let _ = from.flow_control().release_capacity(chunk.len());
        while !chunk.is_empty() {
            to.reserve_capacity(chunk.len());
            let wait = std::future::poll_fn(|cx| to.poll_capacity(cx));
            let cap = match monoio::time::timeout(idle, wait).await {
                Ok(Some(Ok(c))) if c > 0 => c,
                Ok(Some(Ok(_))) => continue,
                Ok(_) => return,
                Err(_) => {
                    to.send_reset(h2::Reason::CANCEL);
                    return;
                }
            };
            let part = chunk.split_to(cap.min(chunk.len()));
            if to.send_data(part, false).is_err() {
                return;
            }
        }
    }
    match from.trailers().await {
        Ok(Some(t)) => {
            let _ = to.send_trailers(t);
        }
        Ok(None) => {
            let _ = to.send_data(Bytes::new(), true);
        }
        Err(_) => to.send_reset(h2::Reason::CANCEL),
    }
}
