//! Idle keep-alive connections park (no task, only a slot and a kernel epoll entry) after
//! a second or two, and come back when their client sends; they stay counted as open,
//! expire at the idle timeout and close when their client does.

use std::time::Duration;

use crate::support::{handlers, http_route, wait_until, Backend, Conn, Router};

fn router_with_backend(extra: &[&str]) -> (Router, Backend) {
    let mut b = Router::builder().threads(1);
    for a in extra {
        b = b.arg(*a);
    }
    let router = b.start();
    let backend = Backend::with_handler("b1", handlers::echo);
    router.add_route(http_route("park.example.com", "web"));
    router.set_backends("web", &[&backend]);
    (router, backend)
}

#[test]
fn an_idle_connection_parks_and_is_served_again() {
    let (router, _b) = router_with_backend(&[]);
    let mut conns: Vec<Conn> = (0..20).map(|_| Conn::connect(router.http_addr)).collect();
    for c in conns.iter_mut() {
        assert_eq!(c.get("park.example.com", "/first").status, 200);
    }
    assert!(
        wait_until(Duration::from_secs(8), || router
            .metric("connections_parked_active")
            == 20),
        "parked: {}",
        router.metric("connections_parked_active")
    );
    // Parked connections are still open connections.
    assert_eq!(router.metric("connections_active"), 20);
    for (i, c) in conns.iter_mut().enumerate() {
        let r = c.get("park.example.com", &format!("/again/{i}"));
        assert_eq!(r.status, 200, "request {i} on a parked connection");
        assert!(!r.connection_has("close"));
        assert_eq!(r.seen().uri, format!("/again/{i}"));
    }
    assert_eq!(router.metric("connections_parked_active"), 0);
    // They park again, and a request split across the wake-up still works.
    assert!(wait_until(Duration::from_secs(8), || {
        router.metric("connections_parked_active") == 20
    }));
    conns[0].send(b"GET /split HTTP/1.1\r\nHost: park.exa");
    std::thread::sleep(Duration::from_millis(100));
    conns[0].send(b"mple.com\r\n\r\n");
    assert_eq!(conns[0].response().seen().uri, "/split");

    // A client that goes away while parked is noticed and no longer counted.
    conns.truncate(5);
    assert!(
        wait_until(Duration::from_secs(5), || router
            .metric("connections_active")
            == 5),
        "active: {}",
        router.metric("connections_active")
    );
}

#[test]
fn a_parked_connection_expires_at_the_idle_timeout() {
    let (router, _b) = router_with_backend(&["--idle-timeout-secs", "4"]);
    let mut c = Conn::connect(router.http_addr);
    assert_eq!(c.get("park.example.com", "/").status, 200);
    assert!(wait_until(Duration::from_secs(6), || {
        router.metric("connections_parked_active") == 1
    }));
    c.set_read_timeout(Duration::from_secs(10));
    c.expect_closed();
    assert!(wait_until(Duration::from_secs(2), || {
        router.metric("connections_active") == 0 && router.metric("connections_parked_active") == 0
    }));
}

#[test]
fn parking_works_on_the_epoll_driver_too() {
    let (router, _b) = router_with_backend(&["--io-driver", "epoll"]);
    let mut c = Conn::connect(router.http_addr);
    assert_eq!(c.get("park.example.com", "/").status, 200);
    assert!(wait_until(Duration::from_secs(8), || {
        router.metric("connections_parked_active") == 1
    }));
    for i in 0..3 {
        assert_eq!(c.get("park.example.com", &format!("/{i}")).status, 200);
    }
    assert_eq!(router.metric("connections_active"), 1);
}

/// Requests that arrive inside, at the edge of and after the hot-read window after a
/// response: the posted receive is cancelled when the window closes, and bytes that
/// raced that cancel must still be served (a lost request would hang the client).
fn requests_around_the_hot_window(hot_ms: &str) {
    let (router, _b) = router_with_backend(&["--hot-idle-ms", hot_ms]);
    let mut c = Conn::connect(router.http_addr);
    c.set_read_timeout(Duration::from_secs(5));
    let gaps_us = [0u64, 1_000, 3_500, 4_500, 5_000, 5_500, 6_500, 12_000];
    for i in 0..120usize {
        std::thread::sleep(Duration::from_micros(gaps_us[i % gaps_us.len()]));
        if i % 10 == 9 {
            // A head split across the window: the first half wakes the hot read.
            c.send(b"GET /split HTTP/1.1\r\nHost: park.exa");
            std::thread::sleep(Duration::from_millis(8));
            c.send(b"mple.com\r\n\r\n");
            assert_eq!(c.response().seen().uri, "/split", "request {i}");
            continue;
        }
        let r = c.get("park.example.com", &format!("/r{i}"));
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(r.seen().uri, format!("/r{i}"));
    }
    // Still one client connection the whole time.
    assert_eq!(router.metric("connections_active"), 1);
}

#[test]
fn requests_around_the_hot_read_window_are_all_served() {
    requests_around_the_hot_window("5");
}

#[test]
fn requests_are_served_with_hot_reads_off() {
    requests_around_the_hot_window("0");
}
