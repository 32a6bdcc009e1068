//! I/O driver fallback and multiple listeners.

use crate::support::{handlers, http_route, Backend, Conn, Router};

#[test]
fn epoll_driver_proxies_requests_and_upgrades() {
    let router = Router::builder().io_driver("epoll").start();
    let b = Backend::with_handler("b1", handlers::upgrade_echo);
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let mut conn = Conn::connect(router.http_addr);
    for i in 0..3 {
        let resp = conn.get("example.com", &format!("/e{i}"));
        assert_eq!(resp.status, 200);
        assert_eq!(resp.seen().uri, format!("/e{i}"));
    }
    assert_eq!(b.accepted(), 1, "keep-alive reuse under epoll");
    let resp = conn.request("GET /ws HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
    assert_eq!(resp.status, 101);
    conn.send(b"over epoll");
    assert_eq!(conn.read_exact_n(10).unwrap(), b"over epoll");
}

#[test]
fn auto_driver_proxies_requests() {
    let router = Router::builder().io_driver("auto").start();
    let b = Backend::start("b1");
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    assert_eq!(
        crate::support::get(router.http_addr, "example.com", "/").backend(),
        "b1"
    );
}

#[test]
fn additional_http_listener_serves_routes_naming_its_port() {
    let router = Router::builder().http_addrs(2).start();
    assert_eq!(
        router.http_addrs.len(),
        2,
        "listening line must list both HTTP addresses"
    );
    let (default, extra) = (router.http_addrs[0], router.http_addrs[1]);
    assert_ne!(default, extra);
    let (b1, b2) = (Backend::start("b1"), Backend::start("b2"));
    router.add_route(http_route("example.com", "web"));
    router.add_route(serde_json::json!({
        "type": "http", "domain": "example.com", "service": "extra", "port": extra.port()
    }));
    router.set_backends("web", &[&b1]);
    router.set_backends("extra", &[&b2]);

    let seen = crate::support::get(default, "example.com", "/").seen();
    assert_eq!(seen.backend, "b1", "port-0 route on the default listener");
    assert_eq!(
        seen.header("x-forwarded-port"),
        Some(default.port().to_string().as_str())
    );
    let seen = crate::support::get(extra, "example.com", "/").seen();
    assert_eq!(
        seen.backend, "b2",
        "explicit-port route on the additional listener"
    );
    assert_eq!(
        seen.header("x-forwarded-port"),
        Some(extra.port().to_string().as_str())
    );
    assert_eq!(
        crate::support::get(extra, "other.example.com", "/").status,
        404
    );
}
