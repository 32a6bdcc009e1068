//! Load balancing: power of two choices on in-flight requests (spec §1.6).

use crate::support::handlers::hold;
use crate::support::{http_route, wait_until, Backend, Conn, Router};
use std::sync::mpsc;
use std::time::Duration;

#[test]
fn backend_with_in_flight_requests_is_avoided() {
    // One core, so every request sees the same in-flight counters.
    let router = Router::builder().threads(1).start();
    let (tx, _rx) = mpsc::channel();
    let busy = Backend::with_handler("busy", hold(tx));
    let idle = Backend::start("idle");
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&busy, &idle]);

    // Send requests until one is stuck on `busy` (each has a 1/2 chance while both are idle).
    let mut held = Vec::new();
    for _ in 0..30 {
        let before = busy.request_count() + idle.request_count();
        let mut conn = Conn::connect(router.http_addr);
        conn.send(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n");
        assert!(wait_until(Duration::from_secs(3), || {
            busy.request_count() + idle.request_count() > before
        }));
        if busy.request_count() > 0 {
            held.push(conn);
            break;
        }
        assert_eq!(conn.response().backend(), "idle");
    }
    assert_eq!(
        busy.request_count(),
        1,
        "no request ever landed on `busy` in 30 tries"
    );

    // With one request in flight on `busy`, every new request must pick `idle`.
    for i in 0..10 {
        let resp = Conn::connect(router.http_addr).get("example.com", &format!("/{i}"));
        assert_eq!(resp.backend(), "idle", "request {i}");
    }
    assert_eq!(busy.request_count(), 1);
    drop(held);
}
