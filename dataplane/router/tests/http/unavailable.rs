//! 503 handling: no backends, dead backends, backends failing after connect; dial retries.

use crate::support::{dead_addr, get, handlers, http_route, Backend, Conn, Reply, Router};
use std::time::Duration;

fn assert_503(resp: &crate::support::Response) {
    assert_eq!(resp.status, 503, "{resp:?}");
    assert_eq!(resp.text(), "Service Unavailable\n");
}

const UPGRADE: &str =
    "GET /ws HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";

#[test]
fn no_backends_is_503() {
    let router = Router::start();
    router.add_route(http_route("example.com", "web"));
    assert_503(&get(router.http_addr, "example.com", "/"));
    router.set_backend_addrs("web", &[]);
    assert_503(&get(router.http_addr, "example.com", "/"));
    assert_503(&Conn::connect(router.http_addr).request(UPGRADE));
}

#[test]
fn all_backends_dead_is_503_for_normal_and_upgrade_requests() {
    let router = Router::start();
    router.add_route(http_route("example.com", "web"));
    router.set_backend_addrs(
        "web",
        &[
            (dead_addr().to_string(), false),
            (dead_addr().to_string(), false),
        ],
    );
    assert_503(&get(router.http_addr, "example.com", "/"));
    assert_503(
        &Conn::connect(router.http_addr)
            .request("POST / HTTP/1.1\r\nHost: example.com\r\nContent-Length: 4\r\n\r\nbody"),
    );
    let mut conn = Conn::connect(router.http_addr);
    let resp = conn.request(UPGRADE);
    assert_503(&resp);
}

#[test]
fn backend_accepting_then_closing_gets_exactly_one_attempt() {
    let router = Router::start();
    let b = Backend::close_on_accept("closer");
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    assert_503(&get(router.http_addr, "example.com", "/"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        b.accepted(),
        1,
        "an error after connect must not be retried"
    );
}

#[test]
fn backend_closing_after_reading_request_is_503_without_retry() {
    let router = Router::start();
    let b = Backend::with_handler("mute", |_req, _conn| Reply::Close);
    let b2 = Backend::with_handler("mute2", |_req, _conn| Reply::Close);
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b, &b2]);
    assert_503(
        &Conn::connect(router.http_addr)
            .request("POST /charge HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\n\r\n$10"),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        b.request_count() + b2.request_count(),
        1,
        "a request that reached a backend must not be replayed"
    );
}

#[test]
fn a_101_to_a_request_that_did_not_ask_to_upgrade_is_503() {
    let router = Router::start();
    let b = Backend::with_handler("switcher", |_req, conn| {
        let _ = conn.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\nraw bytes");
        Reply::Close
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let resp = Conn::connect(router.http_addr).get("example.com", "/");
    assert_503(&resp);
    assert!(!resp.text().contains("raw bytes"), "{resp:?}");
}

#[test]
fn dead_backend_is_skipped_for_a_live_one() {
    let router = Router::start();
    let live = Backend::with_handler("live", handlers::upgrade_echo);
    router.add_route(http_route("example.com", "web"));
    router.set_backend_addrs(
        "web",
        &[
            (dead_addr().to_string(), false),
            (live.addr.to_string(), false),
            (dead_addr().to_string(), false),
        ],
    );
    for i in 0..10 {
        let resp = get(router.http_addr, "example.com", &format!("/get{i}"));
        assert_eq!(resp.backend(), "live", "GET {i}");
        let resp = Conn::connect(router.http_addr)
            .request("POST /p HTTP/1.1\r\nHost: example.com\r\nContent-Length: 7\r\n\r\npayload");
        let seen = resp.seen();
        assert_eq!(
            (seen.backend.as_str(), seen.body.as_slice()),
            ("live", &b"payload"[..]),
            "POST {i}"
        );
    }
    for i in 0..5 {
        let mut conn = Conn::connect(router.http_addr);
        let resp = conn.request(UPGRADE);
        assert_eq!(resp.status, 101, "upgrade {i}: {resp:?}");
        conn.send(b"hi");
        assert_eq!(conn.read_exact_n(2).unwrap(), b"hi");
    }
}

#[test]
fn local_404_and_503_answer_once_on_a_keep_alive_connection() {
    let router = Router::start();
    let b1 = Backend::start("b1");
    router.add_route(http_route("example.com", "web"));
    router.add_route(http_route("empty.example.com", "none"));
    router.add_route(http_route("dead.example.com", "dead"));
    router.set_backends("web", &[&b1]);
    router.set_backend_addrs("dead", &[(dead_addr().to_string(), false)]);
    let mut conn = Conn::connect(router.http_addr);
    for (host, status) in [
        ("nope.example.com", 404),
        ("empty.example.com", 503),
        ("dead.example.com", 503),
    ] {
        eprintln!("request to {host}, expecting one {status}");
        let resp = conn.get(host, "/");
        assert_eq!(resp.status, status, "Host {host}: {resp:?}");
        if resp.connection_has("close") {
            conn.expect_closed();
            conn = Conn::connect(router.http_addr);
        } else {
            // Exactly one response per request: the request must be consumed.
            conn.expect_quiet(Duration::from_millis(300));
        }
        let resp = conn.get("example.com", "/");
        assert_eq!(
            resp.status, 200,
            "request after the {status} for {host}: {resp:?}"
        );
        assert_eq!(resp.backend(), "b1");
    }
}

#[test]
fn local_404_and_503_to_head_have_no_body() {
    let router = Router::start();
    let b1 = Backend::start("b1");
    router.add_route(http_route("example.com", "web"));
    router.add_route(http_route("empty.example.com", "none"));
    router.set_backends("web", &[&b1]);
    let mut conn = Conn::connect(router.http_addr);
    for (host, status) in [("nope.example.com", 404), ("empty.example.com", 503)] {
        conn.send(format!("HEAD / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
        let head = conn.read_head().unwrap();
        assert_eq!(head.status, status, "{host}");
        // The length a GET would get, and no body: the next response comes next.
        let len = head
            .header("content-length")
            .and_then(|v| v.parse::<u64>().ok());
        assert!(len.is_some_and(|n| n > 0), "{host}: {head:?}");
        if head
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            conn.expect_closed();
            conn = Conn::connect(router.http_addr);
            continue;
        }
        let resp = conn.get("example.com", "/");
        assert_eq!(resp.status, 200, "after the HEAD {status}: {resp:?}");
        assert_eq!(resp.backend(), "b1");
    }
}

/// A backend that answers keep-alive, except that it closes without answering the first
/// time it sees `/flaky` (any method): the reused pooled connection "dies" after the
/// request reached the backend.
fn flaky_backend() -> (Backend, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let b = Backend::with_handler("flaky", move |req, conn| {
        let mut log = log.lock().unwrap();
        log.push(format!("{} {}", req.method, req.uri));
        if req.uri == "/flaky" && log.iter().filter(|l| l.ends_with(" /flaky")).count() == 1 {
            return Reply::Close;
        }
        drop(log);
        handlers::echo(req, conn)
    });
    (b, seen)
}

#[test]
fn a_safe_request_on_a_pooled_connection_that_died_is_sent_again() {
    let router = Router::start();
    let (b, seen) = flaky_backend();
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let mut conn = Conn::connect(router.http_addr);
    assert_eq!(conn.get("example.com", "/warm").status, 200);
    let resp = conn.get("example.com", "/flaky");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        *seen.lock().unwrap(),
        ["GET /warm", "GET /flaky", "GET /flaky"]
    );
}

/// RFC 9112 §9.3.1.1: a proxy must not replay a non-idempotent request on its own; Go's
/// transport replays only bodiless GET/HEAD/OPTIONS/TRACE. A DELETE that reached the
/// backend on a reused connection that then died is a 503, not a second DELETE.
#[test]
fn an_unsafe_request_on_a_pooled_connection_that_died_is_not_replayed() {
    let router = Router::start();
    let (b, seen) = flaky_backend();
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let mut conn = Conn::connect(router.http_addr);
    assert_eq!(conn.get("example.com", "/warm").status, 200);
    let resp = conn.request("DELETE /flaky HTTP/1.1\r\nHost: example.com\r\n\r\n");
    assert_503(&resp);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(*seen.lock().unwrap(), ["GET /warm", "DELETE /flaky"]);
}
