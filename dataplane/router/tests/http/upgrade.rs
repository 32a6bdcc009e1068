//! Upgrades / WebSocket tunnelling (spec §1.6 "Upgrades", §1.10).

use crate::support::backend::respond;
use crate::support::{handlers, http_route, Backend, Conn, Reply, Router};
use std::io::{Read, Write};
use std::time::Duration;

fn upgrade_router() -> (Router, Backend) {
    let router = Router::start();
    let b = Backend::with_handler("ws", handlers::upgrade_echo);
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    (router, b)
}

fn ws_request(connection: &str, upgrade: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: example.com\r\nConnection: {connection}\r\nUpgrade: {upgrade}\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

fn echo_round_trips(conn: &mut Conn) {
    for msg in ["ping-1", "second message", &"x".repeat(10_000)] {
        conn.send(msg.as_bytes());
        let got = conn.read_exact_n(msg.len()).expect("echo");
        assert_eq!(got, msg.as_bytes());
    }
}

#[test]
fn websocket_echo_on_fresh_connection_with_half_close() {
    let (router, b) = upgrade_router();
    let mut conn = Conn::connect(router.http_addr);
    let resp = conn.request(&ws_request("Upgrade", "websocket"));
    assert_eq!(resp.status, 101, "{resp:?}");
    assert_eq!(resp.header("upgrade"), Some("websocket"));
    assert!(resp.connection_has("upgrade"), "{:?}", resp.headers);
    assert_eq!(resp.header("x-backend"), Some("ws"));
    echo_round_trips(&mut conn);
    // Half-close: the backend sees EOF, then closes its side, and the client sees EOF.
    conn.shutdown_write();
    assert_eq!(conn.read_to_end().expect("EOF after half-close"), b"");
    let seen = &b.requests()[0];
    assert_eq!(
        seen.header("sec-websocket-key"),
        Some("dGhlIHNhbXBsZSBub25jZQ==")
    );
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
}

#[test]
fn websocket_echo_after_keep_alive_requests_on_same_connection() {
    let (router, b) = upgrade_router();
    let mut conn = Conn::connect(router.http_addr);
    for i in 0..3 {
        let resp = conn.get("example.com", &format!("/plain{i}"));
        assert_eq!(resp.status, 200);
        assert_eq!(resp.seen().uri, format!("/plain{i}"));
    }
    let resp = conn.request(&ws_request("keep-alive, Upgrade", "websocket"));
    assert_eq!(resp.status, 101, "{resp:?}");
    echo_round_trips(&mut conn);
    conn.shutdown_write();
    assert_eq!(conn.read_to_end().unwrap(), b"");
    assert_eq!(b.request_count(), 4);
}

#[test]
fn upgrade_detection_is_case_insensitive_and_upgrade_value_is_intact() {
    let (router, b) = upgrade_router();
    let cases = [
        ("upgrade", "websocket"),
        ("Upgrade", "WebSocket"),
        ("upGradE", "weBsOckEt"),
        ("keep-alive, UPGRADE", "websocket, h2c"),
    ];
    for (i, (connection, upgrade)) in cases.iter().enumerate() {
        let mut conn = Conn::connect(router.http_addr);
        let resp = conn.request(&ws_request(connection, upgrade));
        assert_eq!(resp.status, 101, "Connection: {connection}: {resp:?}");
        assert_eq!(resp.header("upgrade"), Some(*upgrade));
        conn.send(b"abc");
        assert_eq!(conn.read_exact_n(3).unwrap(), b"abc");
        let seen = &b.requests()[i];
        assert_eq!(
            seen.headers_all("upgrade"),
            [*upgrade],
            "{:?}",
            seen.headers
        );
        assert!(seen.connection_has("upgrade"), "{:?}", seen.headers);
    }
}

#[test]
fn proxy_authorization_passes_through_on_upgrade() {
    let (router, b) = upgrade_router();
    let mut conn = Conn::connect(router.http_addr);
    let resp = conn.request(
        "GET /ws HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\r\n",
    );
    assert_eq!(resp.status, 101);
    assert_eq!(
        b.requests()[0].header("proxy-authorization"),
        Some("Basic Zm9vOmJhcg==")
    );
}

#[test]
fn non_101_answer_to_upgrade_is_relayed_with_connection_close() {
    let router = Router::start();
    let b = Backend::with_handler("refuser", |_req, conn| {
        respond(conn, "403 Forbidden", &[("X-Why", "no")], b"nope");
        Reply::KeepAlive
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let mut conn = Conn::connect(router.http_addr);
    let resp = conn.request(&ws_request("Upgrade", "websocket"));
    assert_eq!(resp.status, 403, "{resp:?}");
    assert_eq!(resp.body, b"nope");
    assert_eq!(resp.header("x-why"), Some("no"));
    assert!(resp.connection_has("close"), "{:?}", resp.headers);
    conn.expect_closed();
}

#[test]
fn custom_upgrade_where_backend_speaks_first() {
    let router = Router::start();
    let b = Backend::with_handler("pinger", |req, conn| {
        if !req.is_upgrade() {
            return handlers::echo(req, conn);
        }
        let _ = conn.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: pinger\r\n\r\n",
        );
        for i in 0..3 {
            if conn.write(format!("ping{i}").as_bytes()).is_err() {
                return Reply::Close;
            }
            match conn.read_until(format!("pong{i}").as_bytes()) {
                Ok(_) => {}
                Err(_) => return Reply::Close,
            }
        }
        let _ = conn.write(b"done");
        Reply::Close
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let mut conn = Conn::connect(router.http_addr);
    let resp = conn.request(
        "GET / HTTP/1.1\r\nHost: example.com\r\nConnection: upgrade\r\nUpgrade: pinger\r\n\r\n",
    );
    assert_eq!(resp.status, 101);
    for i in 0..3 {
        assert_eq!(
            conn.read_exact_n(5).expect("ping"),
            format!("ping{i}").as_bytes()
        );
        conn.send(format!("pong{i}").as_bytes());
    }
    assert_eq!(conn.read_exact_n(4).unwrap(), b"done");
    // The backend closed: the tunnel ends.
    conn.expect_closed();
}

#[test]
fn tunnel_carries_a_large_stream_both_ways() {
    let (router, _b) = upgrade_router();
    let mut conn = Conn::connect(router.http_addr);
    let resp = conn.request(&ws_request("Upgrade", "websocket"));
    assert_eq!(resp.status, 101);
    let payload: Vec<u8> = (0..(4 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    let mut w = conn.stream.try_clone().unwrap();
    let data = payload.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    conn.set_read_timeout(Duration::from_secs(10));
    let mut got = conn.read_some().unwrap(); // buffered bytes, if any
    conn.stream
        .read_to_end(&mut got)
        .expect("read echoed stream");
    writer.join().unwrap();
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "tunnelled bytes corrupted");
}

/// A request pipelined behind an upgrade request must not reach the backend unless the
/// backend switched protocols: it never went through the router's own request handling
/// (X-Forwarded-For, X-Request-Id), so relaying it would smuggle it past the router.
#[test]
fn a_request_pipelined_behind_a_refused_upgrade_never_reaches_the_backend() {
    let router = Router::start();
    let b = Backend::with_handler("refuser", |req, conn| {
        respond(conn, "404 Not Found", &[], req.uri.as_bytes());
        Reply::KeepAlive
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let mut conn = Conn::connect(router.http_addr);
    let smuggled =
        "GET /smuggled HTTP/1.1\r\nHost: example.com\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n";
    let resp = conn.request(&(ws_request("Upgrade", "websocket") + smuggled));
    assert_eq!(resp.status, 404, "{resp:?}");
    assert_eq!(resp.body, b"/ws");
    assert!(resp.connection_has("close"), "{:?}", resp.headers);
    conn.expect_closed();
    std::thread::sleep(Duration::from_millis(100));
    let uris: Vec<String> = b.requests().into_iter().map(|r| r.uri).collect();
    assert_eq!(
        uris,
        ["/ws"],
        "the backend saw a request the router never handled"
    );
}

/// Bytes the client sends right behind the upgrade request (before the 101) belong to
/// the new protocol and reach the backend after it switched.
#[test]
fn bytes_sent_ahead_of_the_101_reach_the_backend_after_it() {
    let (router, b) = upgrade_router();
    let mut conn = Conn::connect(router.http_addr);
    let resp = conn.request(&(ws_request("Upgrade", "websocket") + "early"));
    assert_eq!(resp.status, 101, "{resp:?}");
    let mut got = resp.body.clone();
    while got.len() < 5 {
        got.extend(conn.read_some().expect("echo of the early bytes"));
    }
    assert_eq!(got, b"early");
    echo_round_trips(&mut conn);
    assert_eq!(b.request_count(), 1);
}

/// An upgrade request with a body: the whole body goes to the backend (also when it
/// arrives after the head), and the bytes after it only once the backend switched.
#[test]
fn an_upgrade_request_body_is_forwarded_whole_before_the_answer() {
    let (router, b) = upgrade_router();
    let mut conn = Conn::connect(router.http_addr);
    conn.send(
        b"POST /ws HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Content-Length: 10\r\n\r\nhello",
    );
    std::thread::sleep(Duration::from_millis(50));
    let resp = conn.request("world");
    assert_eq!(resp.status, 101, "{resp:?}");
    assert_eq!(b.requests()[0].body, b"helloworld");
    echo_round_trips(&mut conn);
}

#[test]
fn an_upgrade_whose_body_never_comes_is_given_up_after_the_idle_timeout() {
    let router = Router::builder()
        .arg("--idle-timeout-secs")
        .arg("1")
        .start();
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    router.add_route(http_route("example.com", "web"));
    router.set_backend_addrs("web", &[(backend.local_addr().unwrap().to_string(), false)]);
    let mut conn = Conn::connect(router.http_addr);
    // One body byte is announced and never sent.
    conn.send(
        b"POST /ws HTTP/1.1\r\nHost: example.com\r\nConnection: upgrade\r\nUpgrade: x\r\n\
          Content-Length: 1\r\n\r\n",
    );
    let (mut up, _) = backend.accept().unwrap();
    let start = std::time::Instant::now();
    up.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        match up.read(&mut b) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) => panic!("backend connection still open after 10 s: {e}"),
        }
    }
    assert!(
        got.starts_with(b"POST /ws HTTP/1.1\r\n"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    conn.expect_closed();
}

#[test]
fn interim_responses_before_the_101_are_relayed_and_the_tunnel_opens() {
    let router = Router::start();
    let b = Backend::with_handler("hinter", |req, conn| {
        if !req.is_upgrade() {
            return handlers::echo(req, conn);
        }
        // A 103 and the 101 in one write: the router must not wait for more.
        let _ = conn.write(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
              HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\nhello",
        );
        Reply::Close
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let mut conn = Conn::connect(router.http_addr);
    let hint = conn.request(
        "GET / HTTP/1.1\r\nHost: example.com\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n",
    );
    assert_eq!(hint.status, 103);
    assert_eq!(hint.header("link"), Some("</a.css>"));
    assert_eq!(conn.response().status, 101);
    assert_eq!(conn.read_exact_n(5).unwrap(), b"hello");
    conn.expect_closed();
}

/// An upgraded connection with no bytes either way for `FLYNN_TUNNEL_TIMEOUT` is closed
/// (as HAProxy's `timeout tunnel`); one in use is not.
#[test]
fn idle_upgraded_connections_are_closed_after_the_tunnel_timeout() {
    let router = Router::builder().env("FLYNN_TUNNEL_TIMEOUT", "2").start();
    let b = Backend::with_handler("ws", handlers::upgrade_echo);
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let mut conn = Conn::connect(router.http_addr);
    let resp = conn.request(&ws_request("Upgrade", "websocket"));
    assert_eq!(resp.status, 101, "{resp:?}");
    let start = std::time::Instant::now();
    // The router's last read comes after the last send began, however slow this thread is.
    let idle_from = loop {
        let sent = std::time::Instant::now();
        conn.send(b"ping");
        assert_eq!(conn.read_exact_n(4).expect("echo while active"), b"ping");
        if start.elapsed() >= Duration::from_millis(3500) {
            break sent;
        }
        std::thread::sleep(Duration::from_millis(400));
    };
    conn.set_read_timeout(Duration::from_secs(10));
    assert_eq!(conn.read_to_end().expect("closed by the router"), b"");
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(1900) && idle <= Duration::from_secs(8),
        "closed after {idle:?} idle, timeout 2 s"
    );
}

/// A switched upgrade's 101 counts as a 1xx response, not as a 5xx (every WebSocket
/// connection used to show up as a server error).
#[test]
fn an_upgrade_counts_as_1xx_not_5xx() {
    let (router, _b) = upgrade_router();
    let mut conn = Conn::connect(router.http_addr);
    let resp = conn.request(&ws_request("Upgrade", "websocket"));
    assert_eq!(resp.status, 101, "{resp:?}");
    echo_round_trips(&mut conn);
    let (_, m) = router.api("GET", "/metrics", None);
    let text = m.as_str().unwrap_or_default();
    let sum = |name: &str| -> u64 {
        let prefix = format!("flynn_router_{name}{{");
        text.lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(sum("responses_5xx"), 0, "{text}");
    assert_eq!(sum("responses_1xx"), 1, "{text}");
    assert_eq!(sum("upgrades_total"), 1, "{text}");
}

/// An upgrade request with `Expect: 100-continue` and a body gets the router's
/// `100 Continue` once a backend is dialled (the expectation is not forwarded), then its
/// body goes through and the upgrade proceeds; client and router used to wait for each
/// other until the idle timeout.
#[test]
fn an_upgrade_expecting_100_continue_gets_it_and_proceeds() {
    let (router, b) = upgrade_router();
    let mut conn = Conn::connect(router.http_addr);
    conn.send(
        b"POST /ws HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Expect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    );
    conn.set_read_timeout(Duration::from_secs(2));
    let interim = conn.read_exact_n(25).expect("100 Continue within 2 s");
    assert_eq!(interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    conn.set_read_timeout(Duration::from_secs(10));
    let resp = conn.request("hello");
    assert_eq!(resp.status, 101, "{resp:?}");
    let seen = &b.requests()[0];
    assert_eq!(seen.body, b"hello");
    assert_eq!(seen.header("expect"), None, "{:?}", seen.headers);
    echo_round_trips(&mut conn);
}

/// A refused upgrade closes in stages, as other answers given with input unread do: bytes a
/// client sent behind its upgrade request (the new protocol's, never read without a 101) are
/// read and discarded after the answer, so a client still writing them gets the whole
/// answer, not a reset. Both the backend's non-101 and the router's own 503 (no backend
/// could be dialled).
#[test]
fn a_refused_upgrade_with_bytes_behind_it_reaches_the_client() {
    let router = Router::start();
    let b = Backend::with_handler("refuser", |_req, conn| {
        respond(conn, "403 Forbidden", &[], b"nope");
        Reply::KeepAlive
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    router.add_route(http_route("dead.example.com", "dead"));
    router.set_backend_addrs("dead", &[(crate::support::dead_addr().to_string(), false)]);
    for (host, status) in [("example.com", 403), ("dead.example.com", 503)] {
        let mut conn = Conn::connect(router.http_addr);
        conn.stream
            .set_write_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let head = ws_request("Upgrade", "websocket").replace("example.com", host);
        conn.send(head.as_bytes());
        // More than the socket buffers hold: the write ends only if the router reads it.
        conn.stream
            .write_all(&vec![b'x'; 8 << 20])
            .unwrap_or_else(|e| panic!("{host}: the bytes behind the upgrade refused: {e}"));
        conn.set_read_timeout(Duration::from_secs(10));
        let resp = conn.response();
        assert_eq!(resp.status, status, "{host}: {resp:?}");
        assert!(resp.connection_has("close"), "{host}: {resp:?}");
        conn.expect_closed();
        // The router lingers on the client's connection only: the backend's is closed.
        assert!(
            crate::support::wait_until(Duration::from_secs(3), || b.closed() == 1),
            "{host}: the backend connection is held while the client lingers"
        );
    }
}

/// An upgrade request whose chunked body is malformed gets a 400 (as other requests do),
/// whether the bad chunk came with the head or after it, and the backend connection that
/// got part of the request is closed.
#[test]
fn an_upgrade_with_a_malformed_chunked_body_gets_a_400() {
    let router = Router::start();
    let b = Backend::raw("b", |_req, _conn| Reply::KeepAlive);
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    for (n, late) in [(1, false), (2, true)] {
        let mut conn = Conn::connect(router.http_addr);
        conn.set_read_timeout(Duration::from_secs(10));
        let head = ws_request("Upgrade", "websocket")
            .replace("\r\n\r\n", "\r\nTransfer-Encoding: chunked\r\n\r\n");
        if late {
            conn.send(format!("{head}5\r\nhello\r\n").as_bytes());
            std::thread::sleep(Duration::from_millis(100));
            conn.send(b"zz\r\n");
        } else {
            conn.send(format!("{head}zz\r\n").as_bytes());
        }
        let resp = conn.response();
        assert_eq!(resp.status, 400, "late={late}: {resp:?}");
        assert!(resp.connection_has("close"), "late={late}: {resp:?}");
        assert!(
            crate::support::wait_until(Duration::from_secs(3), || b.closed() == n),
            "late={late}: the backend connection is closed"
        );
    }
}

/// A client that leaves while the backend has not answered its upgrade frees the backend
/// connection at once, as a plain request does, instead of holding it until the response
/// timeout (10 minutes).
#[test]
fn a_client_leaving_before_the_upgrade_answer_frees_the_backend() {
    use crate::support::handlers::{hold, HoldEvent};
    let router = Router::start();
    let (tx, rx) = std::sync::mpsc::channel();
    let b = Backend::with_handler("hold", hold(tx));
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let mut conn = Conn::connect(router.http_addr);
    conn.send(ws_request("Upgrade", "websocket").as_bytes());
    let held = match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(HoldEvent::Request(c, _)) => c,
        other => panic!("backend did not get the upgrade request: {other:?}"),
    };
    let left = std::time::Instant::now();
    drop(conn);
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(HoldEvent::Closed(c, at)) => {
            assert_eq!(c, held);
            let after = at.duration_since(left);
            assert!(after < Duration::from_secs(5), "freed after {after:?}");
        }
        other => panic!("backend connection held after the client left: {other:?}"),
    }
}

/// A backend that never reads an upgrade request's body is given up on after the idle
/// timeout (a 503), instead of holding the client's and its own connection for good.
#[test]
fn a_backend_not_reading_an_upgrade_body_is_given_up_after_the_idle_timeout() {
    let router = Router::builder()
        .arg("--idle-timeout-secs")
        .arg("1")
        .start();
    // A backend that reads nothing until told to, then reads to EOF.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    router.add_route(http_route("example.com", "web"));
    router.set_backend_addrs(
        "web",
        &[(listener.local_addr().unwrap().to_string(), false)],
    );
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let backend = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = wait.recv_timeout(Duration::from_secs(20));
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = vec![0u8; 1 << 20];
        loop {
            match s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    });
    const BODY: usize = 64 << 20;
    let mut conn = Conn::connect(router.http_addr);
    let head = format!(
        "POST /ws HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\nUpgrade: x-stream\r\n\
         Content-Length: {BODY}\r\n\r\n"
    );
    conn.send(head.as_bytes());
    let mut writer = conn.stream.try_clone().unwrap();
    // The client keeps sending for as long as the router reads (after its answer the
    // router lingers, reading and discarding).
    let sender = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..BODY >> 20 {
            if writer.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let started = std::time::Instant::now();
    conn.set_read_timeout(Duration::from_secs(15));
    let resp = conn.response();
    assert_eq!(resp.status, 503, "{resp:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    go.send(()).unwrap();
    assert!(
        backend.join().unwrap(),
        "the backend connection was not closed"
    );
    drop(conn);
    let _ = sender.join();
}

/// The router's data segment (what its allocator has mapped, touched or not), from `/proc`.
fn data_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmData:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmData")
}

/// An open tunnel holds its two relay buffers and nothing else of the router's: the request
/// buffer and the buffers the upgrade's exchange used go back before the bytes are relayed
/// (each upgraded connection used to hold five 16 KiB buffers for its whole life; HAProxy
/// holds two). Measured as the growth of the router's data segment per idle tunnel (what
/// its allocator mapped, touched or not: resident memory counts only the pages written).
#[test]
fn an_idle_tunnel_holds_two_buffers() {
    let (router, _b) = upgrade_router();
    let open = |n: usize| -> Vec<Conn> {
        (0..n)
            .map(|_| {
                let mut conn = Conn::connect(router.http_addr);
                let resp = conn.request(&ws_request("Upgrade", "websocket"));
                assert_eq!(resp.status, 101, "{resp:?}");
                // Bytes both ways, so both relay buffers have been used.
                conn.send(b"hello");
                assert_eq!(conn.read_exact_n(5).expect("echo"), b"hello");
                conn
            })
            .collect()
    };
    let warm = open(20);
    std::thread::sleep(Duration::from_millis(200));
    let before = data_kib(router.pid());
    let more = open(200);
    std::thread::sleep(Duration::from_millis(200));
    let after = data_kib(router.pid());
    let per = (after.saturating_sub(before)) / 200;
    eprintln!("router data {before} -> {after} KiB: {per} KiB per tunnel");
    // Two 16 KiB buffers and the connections' own state: ~39 KiB; five buffers were ~87.
    assert!(per < 50, "{per} KiB of router memory per idle tunnel");
    drop(more);
    drop(warm);
}

/// A backend's non-101 answer to an upgrade is relayed as framed: its body and nothing
/// after it. Bytes a backend sends past the body (here right behind it, in the same
/// segment as the head) are no part of the answer and never reach the client, which gets
/// exactly the head and the body, then the connection closes.
#[test]
fn bytes_after_a_refused_upgrades_body_are_not_relayed() {
    let router = Router::start();
    let b = Backend::with_handler("refuser", |_req, conn| {
        let _ = conn
            .write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 5\r\nX-Why: no\r\n\r\nHELLOjunk");
        Reply::KeepAlive
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let mut conn = Conn::connect(router.http_addr);
    conn.send(ws_request("Upgrade", "websocket").as_bytes());
    let got = conn.read_to_end().expect("the answer, then EOF");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 401 "), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("\r\nx-why: no\r\n"),
        "{text}"
    );
    assert!(
        text.to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{text}"
    );
    assert!(
        text.ends_with("\r\n\r\nHELLO"),
        "exactly the head and its 5-byte body: {text:?}"
    );
}

/// What a client gets for an upgrade the backend answers with `answer` (written whole, in
/// one segment with its head): everything until the router closes.
fn refused_upgrade_answer(request: &str, answer: &'static [u8]) -> String {
    let router = Router::start();
    let b = Backend::with_handler("refuser", move |_req, conn| {
        let _ = conn.write(answer);
        Reply::KeepAlive
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let mut conn = Conn::connect(router.http_addr);
    conn.send(request.as_bytes());
    let got = conn.read_to_end().expect("the answer, then EOF");
    String::from_utf8_lossy(&got).into_owned()
}

/// A refused upgrade's chunked body is relayed as framed: its chunks up to the last one,
/// nothing after.
#[test]
fn a_refused_upgrades_chunked_body_is_relayed_as_framed() {
    let text = refused_upgrade_answer(
        &ws_request("Upgrade", "websocket"),
        b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nHELLO\r\n0\r\n\r\njunk",
    );
    assert!(text.starts_with("HTTP/1.1 403 "), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("\r\ntransfer-encoding: chunked\r\n"),
        "{text}"
    );
    assert!(
        text.ends_with("\r\n\r\n5\r\nHELLO\r\n0\r\n\r\n"),
        "the chunked body and nothing after it: {text:?}"
    );
}

/// A refused upgrade whose body is malformed in the segment that brought its head (a bad
/// chunk size): nothing has reached the client, which gets the router's 503 (it got the
/// backend's head announcing a chunked body, then the end of the connection).
#[test]
fn a_refused_upgrade_with_a_malformed_first_chunk_is_a_503() {
    let text = refused_upgrade_answer(
        &ws_request("Upgrade", "websocket"),
        b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\nX-Why: no\r\n\r\nzz\r\nHELLO\r\n",
    );
    assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
    assert!(text.ends_with("\r\n\r\nService Unavailable\n"), "{text:?}");
    assert!(!text.to_ascii_lowercase().contains("x-why"), "{text}");
}

/// A refused upgrade answered without a body (204): the head only, then the close; bytes
/// behind it are not relayed.
#[test]
fn a_refused_upgrade_without_a_body_is_the_head_only() {
    let text = refused_upgrade_answer(
        &ws_request("Upgrade", "websocket"),
        b"HTTP/1.1 204 No Content\r\nX-Why: no\r\n\r\njunk",
    );
    assert!(text.starts_with("HTTP/1.1 204 "), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "{text:?}");
}
