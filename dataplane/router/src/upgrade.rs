//! Hot path: `Connection: upgrade` requests (WebSocket and friends), tunnelled
//! byte-for-byte after a 101 (spec §1.6).

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use flynn_http::{
    parse_response, write_request_head, write_response_head, BodyReader, Framing, RequestInfo,
    ResponseOpts,
};
use flynn_routes::HttpRoute;
use monoio::io::Splitable;

use crate::balance::DialOrder;
use crate::io::{pipe, read_append, write_range};
use std::os::fd::AsRawFd;

use crate::metrics::CoreMetrics;
use crate::proxy::{dial_counted, linger, send_continue, to_client, Fwd};
use crate::worker::{Core, InFlight, ListenerInfo};

/// How the backend side of an upgrade request ended.
enum Outcome {
    /// A 101, relayed: the connection becomes a tunnel to this backend connection (its
    /// request still counted in flight).
    Upgraded(monoio::net::TcpStream, InFlight),
    /// Refused (the backend's other answer, relayed, or the router's 503): what the client
    /// sent behind the request is unread, so the connection closes in stages.
    Refused,
    /// Nothing more to do with the client (gone, too slow): it closes at once.
    Close,
}

/// What an upgrade needs of its route, taken out of the table so that the request does not
/// keep the table alive: a tunnel may last hours, and every change publishes a new table
/// (thousands of WebSockets opened across deploys would each pin a whole snapshot). Two
/// reference counts, once per upgrade; nothing of it is kept once the tunnel is open.
pub struct Target {
    id: Arc<str>,
    sticky: bool,
    backends: Arc<[SocketAddr]>,
}

impl Target {
    pub fn of(route: &HttpRoute) -> Target {
        Target {
            id: route.id.clone(),
            sticky: route.sticky,
            backends: route.backends.clone(),
        }
    }
}

/// Serves an upgrade request to `route` (the request's table already dropped: see
/// [`Target`]).
#[allow(clippy::too_many_arguments)]
pub async fn tunnel<S: crate::proxy::Client>(
    core: &Rc<Core>,
    mut c: S,
    fd: std::os::fd::RawFd,
    mut buf: Vec<u8>,
    info: &RequestInfo,
    route: Target,
    peer: SocketAddr,
    l: ListenerInfo,
    start_ms: u64,
) {
    let outcome = answer(core, &mut c, fd, &mut buf, info, &route, peer, l, start_ms).await;
    // Nothing of the route is needed any more.
    drop(route);
    let (mut up, _inflight) = match outcome {
        Outcome::Upgraded(up, inflight) => (up, inflight),
        // The backend connection is closed and the request no longer counts in flight.
        Outcome::Refused => return linger(core, &mut c, &mut buf).await,
        Outcome::Close => return,
    };
    CoreMetrics::inc(&core.metrics().upgrades_total);
    if !buf.is_empty() {
        // What the client sent ahead of the 101 belongs to the new protocol (a backend
        // that does not take it is given up on after the idle timeout).
        let len = buf.len();
        let write = write_range(&mut up, buf, 0, len);
        let Ok((Ok(()), b)) = monoio::time::timeout(core.settings().idle_timeout, write).await
        else {
            return;
        };
        buf = b;
    }
    // The request buffer relays the client's bytes and the core's free list gives the
    // other direction its buffer: a tunnel holds these two and no other.
    buf.clear();
    // (One grown by a long request head goes back too: a tunnel may last hours.)
    if buf.capacity() != crate::worker::BUF {
        core.give_buf(std::mem::take(&mut buf));
        buf = core.take_buf();
    }
    // Long-lived: a peer on either side that vanishes without a FIN is noticed.
    let _ = flynn_runtime::sock::set_keepalive(fd);
    let _ = flynn_runtime::sock::set_keepalive(up.as_raw_fd());
    let tunnel = core.tunnels.open(fd, up.as_raw_fd());
    let (mut cr, mut cw) = c.into_split();
    let (mut ur, mut uw) = up.into_split();
    // Side 0 is the client, 1 the backend, as opened.
    let a = pipe(&mut cr, &mut uw, buf, &tunnel, 0);
    let b = pipe(&mut ur, &mut cw, core.take_buf(), &tunnel, 1);
    let _ = monoio::join!(a, b);
    // The sockets close as this returns, with no await in between.
    tunnel.finish();
}

/// Dials a backend, sends it the request (head and body as framed) and relays its answer
/// (interim responses, then the 101 or another answer with its body); `buf` keeps what the
/// client sent behind the request.
#[allow(clippy::too_many_arguments)]
async fn answer<S: crate::proxy::Client>(
    core: &Rc<Core>,
    c: &mut S,
    fd: std::os::fd::RawFd,
    buf: &mut Vec<u8>,
    info: &RequestInfo,
    route: &Target,
    peer: SocketAddr,
    l: ListenerInfo,
    start_ms: u64,
) -> Outcome {
    let m = core.metrics();
    // The sticky backend (if its cookie is valid and it is still live) goes first.
    let sealer = core.settings().sticky.as_ref().filter(|_| route.sticky);
    let cookie_addr = sealer
        .and_then(|s| crate::sticky::from_request(s, &buf[..info.head_len]))
        .filter(|a| route.backends.contains(a));
    let mut order = DialOrder::new(&route.backends, cookie_addr);
    let now = || core.table().backends_of(&route.id).cloned();
    let mut up = None;
    while let Some(addr) = order.next(now) {
        match dial_counted(core, addr).await {
            Ok(s) => {
                CoreMetrics::inc(&m.upstream_connects_total);
                up = Some((s, addr));
                break;
            }
            Err(_) => CoreMetrics::inc(&m.upstream_connect_errors_total),
        }
    }
    let Some((mut up, addr)) = up else {
        return refuse(core, c, fd).await;
    };
    let inflight = core.start_request(addr);
    let fwd = Fwd {
        proto: S::PROTO,
        peer,
        l,
        start_ms,
        fd,
    };
    // Before the backend answers, only this request goes to it: its head and its body as
    // framed. Bytes after that (early frames, or a pipelined request) wait in `buf` for
    // the 101; without one they are never forwarded (the connection closes in stages,
    // reading and discarding them), so nothing reaches the backend that did not go through
    // the router's request handling (RFC 9110 §7.8).
    let mut out = Vec::with_capacity(4096);
    write_request_head(buf, info, &fwd.forward(false), &mut out);
    let mut body = BodyReader::new(info.framing);
    let Ok(adv) = body.advance(&buf[info.head_len..]) else {
        return bad_body(core, c, fd).await;
    };
    out.extend_from_slice(&buf[info.head_len..info.head_len + adv.used]);
    buf.drain(..info.head_len + adv.used);
    let len = out.len();
    let (res, out) = write_range(&mut up, out, 0, len).await;
    if res.is_err() {
        return refuse(core, c, fd).await;
    }
    // The expectation was not forwarded (the router answers it, as for other requests):
    // without this the client would wait for it before sending the body the tunnel waits for.
    if info.expect_continue && !body.is_done() && send_continue(core, c, fd, out).await.0.is_err() {
        return Outcome::Close;
    }
    // A body longer than what came with the head: relay the rest as it arrives (a client
    // that stops sending it is given up on after the idle timeout), yielding every 1 MiB
    // (see `flynn_runtime::fair`).
    let mut budget = flynn_runtime::fair::Budget::default();
    while !body.is_done() {
        let taken = std::mem::take(buf);
        let read = monoio::time::timeout(core.settings().idle_timeout, read_append(c, taken));
        let Ok((res, b)) = read.await else {
            return Outcome::Close;
        };
        *buf = b;
        match res {
            Ok(n) if n > 0 => {
                if budget.spend(n) {
                    flynn_runtime::fair::yield_now().await;
                }
            }
            _ => return Outcome::Close,
        }
        let Ok(adv) = body.advance(buf) else {
            return bad_body(core, c, fd).await;
        };
        // A backend that stops reading the body is given up on after the idle timeout.
        let write = write_range(&mut up, std::mem::take(buf), 0, adv.used);
        let Ok((res, b)) = monoio::time::timeout(core.settings().idle_timeout, write).await else {
            return refuse(core, c, fd).await;
        };
        *buf = b;
        if res.is_err() {
            return refuse(core, c, fd).await;
        }
        buf.drain(..adv.used);
    }
    let mut ubuf = Vec::with_capacity(16 * 1024);
    // One deadline for the whole answer, interim heads included.
    let deadline = monoio::time::Instant::now() + core.settings().response_header_timeout;
    let resp = loop {
        match parse_response(&ubuf, info.method) {
            // Interim responses (100, 103) go to the client as they are; the answer to
            // the upgrade comes after them.
            Ok(Some(r)) if (100..200).contains(&r.status) && r.status != 101 => {
                let interim: Vec<u8> = ubuf.drain(..r.head_len).collect();
                let n = interim.len();
                if to_client(core, c, fd, interim, n).await.0.is_err() {
                    return Outcome::Close;
                }
                continue;
            }
            Ok(Some(r)) => break r,
            Ok(None) => {}
            Err(_) => return refuse(core, c, fd).await,
        }
        let read = monoio::time::timeout_at(deadline, read_append(&mut up, ubuf));
        // A client that leaves while the backend has not answered frees the backend
        // connection at once, as on the plain request path (the read is dropped with it).
        let read = monoio::select! {
            r = read => r,
            _ = c.gone(fd) => return Outcome::Close,
        };
        let Ok((res, b)) = read else {
            return refuse(core, c, fd).await;
        };
        ubuf = b;
        match res {
            Ok(n) if n > 0 => {}
            _ => return refuse(core, c, fd).await,
        }
    };
    let upgraded = resp.status == 101;
    // After a 101 everything that came with the head is the new protocol's; after another
    // answer only its body as framed goes on (what follows is no part of the answer).
    let mut body = BodyReader::new(resp.framing);
    let rest = &ubuf[resp.head_len..];
    let take = if upgraded {
        rest.len()
    } else {
        match body.advance(rest) {
            Ok(adv) => adv.used,
            // A body that goes wrong in what came with the head: nothing has reached the
            // client yet, so it gets the router's 503 (not a head with no body).
            Err(_) => return refuse(core, c, fd).await,
        }
    };
    m.status(resp.status);
    let mut out = Vec::with_capacity(1024);
    let cookie = match sealer {
        Some(s) if cookie_addr != Some(addr) => Some(crate::sticky::set_cookie(s, addr)),
        _ => None,
    };
    let cookie_header: Vec<(&[u8], &[u8])> = match &cookie {
        Some(c) => vec![(b"Set-Cookie".as_slice(), c.as_slice())],
        None => Vec::new(),
    };
    write_response_head(
        &ubuf,
        &resp,
        &ResponseOpts {
            close: !upgraded,
            extra: cookie_header.as_slice(),
            http10: false,
        },
        &mut out,
    );
    out.extend_from_slice(&ubuf[resp.head_len..resp.head_len + take]);
    let len = out.len();
    let (res, _) = to_client(core, c, fd, out, len).await;
    if res.is_err() {
        return Outcome::Close;
    }
    if upgraded {
        return Outcome::Upgraded(up, inflight);
    }
    // Not upgraded: relay the rest of the body as framed (yielding every 1 MiB); then the
    // connection closes in stages.
    let mut budget = flynn_runtime::fair::Budget::default();
    while !body.is_done() {
        ubuf.clear();
        let read = monoio::time::timeout(core.settings().idle_timeout, read_append(&mut up, ubuf));
        let Ok((res, b)) = read.await else {
            return Outcome::Close;
        };
        ubuf = b;
        let n = match res {
            Ok(n) if n > 0 => n,
            // A body delimited by the backend's close is complete.
            Ok(_) if resp.framing == Framing::Close => break,
            _ => return Outcome::Close,
        };
        if budget.spend(n) {
            flynn_runtime::fair::yield_now().await;
        }
        let Ok(adv) = body.advance(&ubuf[..n]) else {
            return Outcome::Close;
        };
        let (res, b) = to_client(core, c, fd, ubuf, adv.used).await;
        ubuf = b;
        if res.is_err() {
            return Outcome::Close;
        }
    }
    Outcome::Refused
}

/// The router's 400 to an upgrade request whose body is malformed (a bad chunk), as for
/// other requests; the backend connection, which may hold part of the request, is
/// dropped by the caller.
async fn bad_body<S: crate::proxy::Client>(
    core: &Core,
    c: &mut S,
    fd: std::os::fd::RawFd,
) -> Outcome {
    let mut out = Vec::with_capacity(128);
    flynn_http::simple_response(400, b"Bad Request\n", true, &mut out);
    own_answer(core, c, fd, 400, out).await
}

/// The router's 503 to an upgrade request it could not take to a backend.
async fn refuse<S: crate::proxy::Client>(
    core: &Core,
    c: &mut S,
    fd: std::os::fd::RawFd,
) -> Outcome {
    CoreMetrics::inc(&core.metrics().unavailable_total);
    let mut out = Vec::with_capacity(128);
    match &core.settings().page_503 {
        Some(page) => {
            flynn_http::typed_response(503, b"text/html; charset=utf-8", page, true, &mut out)
        }
        None => flynn_http::simple_response(503, b"Service Unavailable\n", true, &mut out),
    }
    own_answer(core, c, fd, 503, out).await
}

/// Sends the router's own answer `out` (status `status`): then the connection closes in
/// stages, or at once if the client could not take the answer.
async fn own_answer<S: crate::proxy::Client>(
    core: &Core,
    c: &mut S,
    fd: std::os::fd::RawFd,
    status: u16,
    out: Vec<u8>,
) -> Outcome {
    core.metrics().status(status);
    let len = out.len();
    match to_client(core, c, fd, out, len).await.0 {
        Ok(()) => Outcome::Refused,
        Err(_) => Outcome::Close,
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::Arc;
    use std::time::Duration;

    use clap::Parser;

    /// A backend that answers every request head with a 101, then echoes what it gets.
    fn upgrading_backend() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut b = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut b) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&b[..n]),
                        }
                    }
                    let up = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
                    if s.write_all(up).is_err() {
                        return;
                    }
                    while let Ok(n) = s.read(&mut b) {
                        if n == 0 || s.write_all(&b[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn echo(c: &mut TcpStream, msg: &[u8]) {
        c.write_all(msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        c.read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
    }

    /// An open tunnel does not keep the table its request was routed with alive: once a
    /// change is applied, the old table is gone (every backend up or down publishes a new
    /// one; each long-lived WebSocket would otherwise pin its own copy).
    #[test]
    fn a_tunnel_does_not_keep_its_table_alive() {
        let backend = upgrading_backend();
        let cfg = crate::Config::try_parse_from([
            "flynn-router",
            "--http-addr",
            "127.0.0.1:0",
            "--api-addr",
            "127.0.0.1:0",
            "--threads",
            "2",
        ])
        .unwrap();
        let file = crate::RoutesFile::parse(
            &format!(
                r#"{{"routes": [{{"type": "http", "domain": "ws.test", "service": "ws"}}],
                    "services": {{"ws": [{{"addr": "{backend}"}}]}}}}"#
            ),
            false,
        )
        .unwrap();
        let running = crate::start(&cfg, Some(file)).unwrap();
        let old = Arc::downgrade(&running.api.shared.table.load_full());

        let mut c = TcpStream::connect(running.http_addrs[0]).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(c.read(&mut b).unwrap(), 1, "{head:?}");
            head.push(b[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101 "), "{head:?}");
        echo(&mut c, b"ping");

        // A change: a new table, applied by every core.
        let v = {
            let mut s = running.api.store();
            s.add(flynn_api::Route::http("other.test", "ws")).unwrap();
            running.api.publish(&s)
        };
        assert!(running.api.shared.wait_applied(v, Duration::from_secs(5)));
        // The tunnel is still open, and the table it started with is gone.
        echo(&mut c, b"pong");
        assert!(
            old.upgrade().is_none(),
            "an open tunnel keeps the table it was routed with alive"
        );
    }
}
