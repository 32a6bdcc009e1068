//! Upstream connection reuse, `disable_keep_alives`, backends closing connections (spec §1.6).

use crate::setup;
use crate::support::{handlers, http_route, wait_until, Backend, Conn, Router};
use serde_json::json;
use std::io::{ErrorKind, Read};
use std::time::Duration;

#[test]
fn backend_connection_is_reused_across_client_requests() {
    let (router, b1) = setup("example.com");
    let mut conn = Conn::connect(router.http_addr);
    for i in 0..5 {
        let seen = conn.get("example.com", &format!("/{i}")).seen();
        assert_eq!(
            seen.conn, 1,
            "request {i} on backend connection {}",
            seen.conn
        );
        assert!(!seen.connection_has("close"), "{:?}", seen.headers);
    }
    assert_eq!(b1.accepted(), 1);
}

#[test]
fn disable_keep_alives_uses_a_new_connection_per_request_and_can_be_reenabled() {
    let router = Router::start();
    let b1 = Backend::start("b1");
    let mut route = router.add_route(json!({
        "type": "http", "domain": "example.com", "service": "web", "disable_keep_alives": true
    }));
    assert_eq!(route["disable_keep_alives"], true);
    router.set_backends("web", &[&b1]);

    let mut conn = Conn::connect(router.http_addr);
    for i in 1..=3 {
        let seen = conn.get("example.com", "/").seen();
        assert_eq!(seen.conn, i, "request {i} must use backend connection {i}");
        assert!(
            seen.connection_has("close"),
            "request must carry Connection: close: {:?}",
            seen.headers
        );
    }
    assert_eq!(b1.accepted(), 3);
    // The router closes (or lets the backend close) each one.
    assert!(
        wait_until(Duration::from_secs(5), || b1.closed() == 3),
        "closed {}",
        b1.closed()
    );

    route["disable_keep_alives"] = json!(false);
    let updated = router.update_route(&route);
    assert_eq!(updated["disable_keep_alives"], false);
    let mut conn = Conn::connect(router.http_addr);
    let mut conns = Vec::new();
    for _ in 0..3 {
        let seen = conn.get("example.com", "/").seen();
        assert!(!seen.connection_has("close"), "{:?}", seen.headers);
        conns.push(seen.conn);
    }
    assert_eq!(conns, [4, 4, 4], "keep-alive restored after re-enabling");
}

#[test]
fn backend_closing_idle_keep_alive_connection_does_not_fail_next_request() {
    let (router, b1) = setup("example.com");
    let mut conn = Conn::connect(router.http_addr);
    for round in 1..=3 {
        let resp = conn.get("example.com", "/");
        assert_eq!(resp.status, 200, "round {round}: {resp:?}");
        assert_eq!(resp.seen().conn, round);
        b1.close_connections();
        assert!(wait_until(Duration::from_secs(5), || b1.closed() == round));
        std::thread::sleep(Duration::from_millis(50)); // let the FIN reach the router
    }
    assert_eq!(conn.get("example.com", "/").status, 200);
}

#[test]
fn backend_answering_connection_close_is_not_reused_and_client_stays_open() {
    let router = Router::start();
    let b1 = Backend::with_handler("b1", handlers::echo_close);
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b1]);
    let mut conn = Conn::connect(router.http_addr);
    for i in 1..=4 {
        let resp = conn.get("example.com", "/");
        assert_eq!(resp.status, 200, "request {i}: {resp:?}");
        assert_eq!(resp.seen().conn, i);
    }
    assert_eq!(b1.accepted(), 4);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let (router, _b1) = setup("example.com");
    let mut conn = Conn::connect(router.http_addr);
    conn.send(
        b"GET /one HTTP/1.1\r\nHost: example.com\r\n\r\n\
          POST /two HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\n\r\nabc\
          GET /three HTTP/1.1\r\nHost: example.com\r\n\r\n",
    );
    for (uri, body) in [("/one", ""), ("/two", "abc"), ("/three", "")] {
        let seen = conn.response().seen();
        assert_eq!(seen.uri, uri);
        assert_eq!(String::from_utf8_lossy(&seen.body), body);
    }
}

#[test]
fn idle_connections_to_a_backend_that_left_every_route_are_closed() {
    let (router, b1) = setup("example.com");
    let b2 = Backend::start("b2");
    for i in 0..3 {
        assert_eq!(
            crate::support::get(router.http_addr, "example.com", &format!("/{i}")).status,
            200
        );
    }
    // The router holds its connection to b1 in the pool.
    std::thread::sleep(Duration::from_millis(200));
    let pooled = b1.accepted();
    assert!(pooled >= 1);
    assert_eq!(b1.closed(), 0, "pooled connection closed too early");
    // b1 leaves the route: its idle connections go with it, not at their next use.
    router.set_backends("web", &[&b2]);
    assert!(
        wait_until(Duration::from_secs(3), || b1.closed() == pooled),
        "the pooled connection to the departed backend is still open"
    );
    assert_eq!(
        crate::support::get(router.http_addr, "example.com", "/").backend(),
        "b2"
    );
}

/// A stray CRLF after a request body (some old clients send one; RFC 9112 §2.2 says to
/// ignore empty lines before a request) leaves the connection waiting for its next
/// request as any idle one does: no header timeout, no unsolicited 408, and no read held
/// open with a buffer either: it parks, in reach of the idle sweep and a drain. (A CRLF
/// on its own used to leave the connection in a head read under the idle timeout, where
/// neither the sweep nor a takeover's drain could close it.)
#[test]
fn a_stray_crlf_after_a_body_is_not_a_request_head() {
    let router = Router::builder()
        .arg("--header-timeout-secs")
        .arg("1")
        .start();
    let b1 = Backend::start("b1");
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b1]);
    // The CRLF with the body, and on its own after the response.
    for late in [false, true] {
        let mut conn = Conn::connect(router.http_addr);
        let post = b"POST /a HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\n\r\nhello";
        conn.send(post);
        if !late {
            conn.send(b"\r\n");
        }
        let seen = conn.response().seen();
        assert_eq!(seen.body, b"hello");
        if late {
            conn.send(b"\r\n");
        }
        // Past the header timeout: nothing arrives and the connection stays open.
        conn.expect_quiet(Duration::from_millis(2500));
        assert!(
            wait_until(Duration::from_secs(5), || router
                .metric("connections_parked_active")
                == 1),
            "late {late}: not parked ({})",
            router.metric("connections_parked_active")
        );
        assert_eq!(
            conn.get("example.com", "/b").seen().uri,
            "/b",
            "late {late}"
        );
    }
}

/// One core, a 3 s header timeout and a 30 s idle timeout (so the two cannot be mistaken),
/// and a route to one backend.
fn first_request_router() -> (Router, Backend) {
    let router = Router::builder()
        .threads(1)
        .arg("--header-timeout-secs")
        .arg("3")
        .arg("--idle-timeout-secs")
        .arg("30")
        .start();
    let b1 = Backend::start("b1");
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b1]);
    (router, b1)
}

/// A connection that never sends a request is closed at the header timeout (nginx's
/// `client_header_timeout`, Go's `ReadHeaderTimeout`), not held for the idle timeout
/// meant for keep-alive connections between requests; it parks meanwhile like any idle
/// connection. One that has had a request idles under the idle timeout.
#[test]
fn a_connection_without_a_request_is_closed_at_the_header_timeout() {
    let (router, _b1) = first_request_router();
    let mut served = Conn::connect(router.http_addr);
    assert_eq!(served.get("example.com", "/").status, 200);
    // Half-way between two of the sweep's ticks (they come a second apart from the
    // core's start, just before this test's first request), where a sweep that expired a
    // connection a tick early closed it at 2.5 s.
    std::thread::sleep(Duration::from_millis(500));
    // Before the connect: the router's count starts later, so it has had at least 3 s.
    let start = std::time::Instant::now();
    let mut quiet = Conn::connect(router.http_addr);
    // Past 2 s idle both park (header timeout 3 s > the 2 s before parking).
    assert!(
        wait_until(Duration::from_secs(4), || router
            .metric("connections_parked_active")
            == 2),
        "parked: {}",
        router.metric("connections_parked_active")
    );
    quiet.set_read_timeout(Duration::from_secs(10));
    quiet.expect_closed();
    let took = start.elapsed();
    // The whole 3 s, and at most the sweep's 1 s tick more (plus slack for a loaded
    // machine): it used to be closed anywhere from 2 s on.
    assert!(
        took >= Duration::from_millis(2950) && took < Duration::from_secs(7),
        "closed after {took:?}"
    );
    assert_eq!(served.get("example.com", "/again").status, 200);
}

/// Empty lines are skipped before a request (RFC 9112 §2.2) but do not hold a connection
/// open without one: a client sending a CRLF every second, under a 3 s header timeout, is
/// closed 3 to 4 s after it connected. (Each empty line used to start the header timeout
/// over, so such a client kept its connection for ever.)
#[test]
fn empty_lines_do_not_extend_the_wait_for_the_first_request() {
    let (router, _b1) = first_request_router();
    let start = std::time::Instant::now();
    let mut conn = Conn::connect(router.http_addr);
    conn.set_read_timeout(Duration::from_secs(1));
    let closed = loop {
        assert!(
            start.elapsed() < Duration::from_secs(12),
            "still open after {:?}",
            start.elapsed()
        );
        if conn.try_send(b"\r\n").is_err() {
            break start.elapsed();
        }
        // About a second between lines: this read waits for the close meanwhile.
        let mut b = [0u8; 256];
        match conn.stream.read(&mut b) {
            Ok(0) => break start.elapsed(),
            Ok(n) => panic!("unexpected {:?}", String::from_utf8_lossy(&b[..n])),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break start.elapsed(),
            Err(e) => panic!("{e}"),
        }
    };
    assert!(
        closed >= Duration::from_millis(2950) && closed < Duration::from_secs(7),
        "closed after {closed:?}"
    );
    // The core still serves.
    assert_eq!(
        Conn::connect(router.http_addr)
            .get("example.com", "/")
            .status,
        200
    );
}
