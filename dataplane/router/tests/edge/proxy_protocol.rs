//! PROXY protocol on HTTP listeners (spec §1.7, §1.10): the proxied source address
//! becomes the client IP (→ `X-Forwarded-For`); connections without a prefix are served
//! normally; a malformed prefix closes the connection.

use crate::support::{handlers, http_route, Backend, Conn, Router};
use std::time::Duration;

const DOMAIN: &str = "pp.example.com";

fn pp_router() -> (Router, Backend) {
    pp_router_with(Router::builder().arg("--proxy-protocol"))
}

fn pp_router_with(b: crate::support::RouterBuilder) -> (Router, Backend) {
    let router = b.start();
    let backend = Backend::with_handler("b1", handlers::upgrade_echo);
    router.add_route(http_route(DOMAIN, "web"));
    router.set_backends("web", &[&backend]);
    (router, backend)
}

fn get_req(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n")
}

/// v2 header: PROXY command, TCP over IPv4, 1.1.1.123:1234 → 2.2.2.2:80.
fn v2_tcp4() -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
    h.extend_from_slice(&[1, 1, 1, 123, 2, 2, 2, 2]);
    h.extend_from_slice(&1234u16.to_be_bytes());
    h.extend_from_slice(&80u16.to_be_bytes());
    h
}

/// Sends `prefix` then a GET on a fresh connection; the XFF the backend saw.
fn xff_after(router: &Router, prefix: &[u8]) -> String {
    let mut conn = Conn::connect(router.http_addr);
    conn.send(prefix);
    let resp = conn.request(&get_req("/"));
    assert_eq!(resp.status, 200, "{resp:?}");
    let seen = resp.seen();
    assert_eq!(
        seen.headers_all("x-forwarded-for").len(),
        1,
        "{:?}",
        seen.headers
    );
    seen.header("x-forwarded-for").unwrap().to_string()
}

#[test]
fn v1_tcp4_source_becomes_x_forwarded_for() {
    let (router, _b) = pp_router();
    let xff = xff_after(&router, b"PROXY TCP4 1.1.1.123 2.2.2.2 1234 80\r\n");
    assert_eq!(xff, "1.1.1.123");
}

#[test]
fn v1_tcp6_source_becomes_x_forwarded_for() {
    let (router, _b) = pp_router();
    let xff = xff_after(&router, b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 80\r\n");
    assert_eq!(xff, "2001:db8::1");
}

#[test]
fn v2_binary_header_source_becomes_x_forwarded_for() {
    let (router, _b) = pp_router();
    assert_eq!(xff_after(&router, &v2_tcp4()), "1.1.1.123");
}

#[test]
fn v2_local_command_keeps_socket_peer() {
    let (router, _b) = pp_router();
    // LOCAL (0x20), AF_UNSPEC, no address block.
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    assert_eq!(xff_after(&router, &h), "127.0.0.1");
}

#[test]
fn prefix_arriving_byte_by_byte_is_assembled() {
    let (router, _b) = pp_router();
    let mut conn = Conn::connect(router.http_addr);
    for b in b"PROXY TCP4 1.1.1.123 2.2.2.2 1234 80\r\n" {
        conn.send(&[*b]);
        std::thread::sleep(Duration::from_millis(2));
    }
    let resp = conn.request(&get_req("/slow-prefix"));
    assert_eq!(resp.seen().header("x-forwarded-for"), Some("1.1.1.123"));
    // Same for v2, split across the signature and the address block.
    let mut conn = Conn::connect(router.http_addr);
    let v2 = v2_tcp4();
    for part in [&v2[..5], &v2[5..13], &v2[13..17], &v2[17..]] {
        conn.send(part);
        std::thread::sleep(Duration::from_millis(5));
    }
    let resp = conn.request(&get_req("/slow-v2"));
    assert_eq!(resp.seen().header("x-forwarded-for"), Some("1.1.1.123"));
}

#[test]
fn prefix_and_request_in_one_write() {
    let (router, _b) = pp_router();
    let mut conn = Conn::connect(router.http_addr);
    let mut bytes = b"PROXY TCP4 1.1.1.123 2.2.2.2 1234 80\r\n".to_vec();
    bytes.extend_from_slice(get_req("/together").as_bytes());
    let resp = conn.request(std::str::from_utf8(&bytes).unwrap());
    let seen = resp.seen();
    assert_eq!(seen.uri, "/together");
    assert_eq!(seen.header("x-forwarded-for"), Some("1.1.1.123"));
}

#[test]
fn connection_without_prefix_is_served_normally() {
    let (router, _b) = pp_router();
    assert_eq!(xff_after(&router, b""), "127.0.0.1");
}

#[test]
fn unknown_protocol_uses_socket_peer() {
    let (router, _b) = pp_router();
    assert_eq!(xff_after(&router, b"PROXY UNKNOWN\r\n"), "127.0.0.1");
    // v1 also allows addresses after UNKNOWN; they are ignored.
    assert_eq!(
        xff_after(
            &router,
            b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
        ),
        "127.0.0.1"
    );
}

#[test]
fn malformed_prefix_closes_without_response() {
    let (router, b) = pp_router();
    let cases: [&[u8]; 6] = [
        b"PROXY TCP4 garbage\r\n",
        b"PROXY TCP4 1.1.1.123 2.2.2.2 1234\r\n",
        b"PROXY TCP4 2001:db8::1 2.2.2.2 1234 80\r\n",
        b"PROXY TCP4 1.1.1.123 2.2.2.2 99999 80\r\n",
        b"PROXY UDP4 1.1.1.123 2.2.2.2 1234 80\r\n",
        b"PROXY TCP4 1.1.1.123 2.2.2.2 1234 80\rX",
    ];
    for prefix in cases {
        let what = String::from_utf8_lossy(prefix).into_owned();
        let mut conn = Conn::connect(router.http_addr);
        conn.send(prefix);
        // The request may or may not be written before the router closes.
        let _ = conn.try_send(get_req("/never").as_bytes());
        if let Err(e) = conn.closed_state() {
            panic!("{what:?}: expected a close without a response: {e}");
        }
    }
    // A v2 header with a bad version nibble.
    let mut bad = v2_tcp4();
    bad[12] = 0x31;
    let mut conn = Conn::connect(router.http_addr);
    conn.send(&bad);
    let _ = conn.try_send(get_req("/never").as_bytes());
    if let Err(e) = conn.closed_state() {
        panic!("bad v2 version: expected a close without a response: {e}");
    }
    assert_eq!(b.request_count(), 0, "no request may reach the backend");
    // The listener still serves well-formed connections afterwards.
    assert_eq!(
        xff_after(&router, b"PROXY TCP4 1.1.1.123 2.2.2.2 1234 80\r\n"),
        "1.1.1.123"
    );
}

#[test]
fn keep_alive_requests_keep_the_proxied_address() {
    let (router, _b) = pp_router();
    let mut conn = Conn::connect(router.http_addr);
    conn.send(b"PROXY TCP4 1.1.1.123 2.2.2.2 1234 80\r\n");
    for i in 0..5 {
        let resp = conn.request(&get_req(&format!("/ka{i}")));
        let seen = resp.seen();
        assert_eq!(seen.uri, format!("/ka{i}"));
        assert_eq!(
            seen.header("x-forwarded-for"),
            Some("1.1.1.123"),
            "request {i}"
        );
        // Idle between requests must not lose the address.
        if i == 2 {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // A second PROXY line mid-connection is not a prefix any more: a bad request (the
    // exact status is checked by `proxy_line_without_the_flag_is_exactly_400`).
    let resp = conn.request("PROXY TCP4 9.9.9.9 2.2.2.2 1234 80\r\n\r\n");
    assert!(resp.status == 400 || resp.status == 505, "{resp:?}");
    assert!(resp.connection_has("close"), "{resp:?}");
    conn.expect_closed();
    // Other connections are unaffected.
    assert_eq!(xff_after(&router, b""), "127.0.0.1");
}

#[test]
fn client_x_forwarded_for_is_joined_with_proxied_address() {
    let (router, _b) = pp_router();
    let mut conn = Conn::connect(router.http_addr);
    conn.send(b"PROXY TCP4 1.1.1.123 2.2.2.2 1234 80\r\n");
    let resp = conn.request(&format!(
        "GET / HTTP/1.1\r\nHost: {DOMAIN}\r\nX-Forwarded-For: 192.168.1.1\r\n\r\n"
    ));
    assert_eq!(
        resp.seen().header("x-forwarded-for"),
        Some("192.168.1.1, 1.1.1.123")
    );
}

#[test]
fn upgrade_after_prefix_carries_the_proxied_address() {
    let (router, b) = pp_router();
    let mut conn = Conn::connect(router.http_addr);
    conn.send(b"PROXY TCP4 1.1.1.123 2.2.2.2 1234 80\r\n");
    let resp = conn.request(&format!(
        "GET /ws HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    ));
    assert_eq!(resp.status, 101, "{resp:?}");
    conn.send(b"hi");
    assert_eq!(conn.read_exact_n(2).unwrap(), b"hi");
    let seen = b.requests().pop().unwrap();
    assert_eq!(seen.header("x-forwarded-for"), Some("1.1.1.123"));
}

#[test]
fn enabled_through_environment() {
    let (router, _b) = pp_router_with(Router::builder().env("PROXY_PROTOCOL", "true"));
    assert_eq!(
        xff_after(&router, b"PROXY TCP4 1.1.1.123 2.2.2.2 1234 80\r\n"),
        "1.1.1.123"
    );
    assert_eq!(xff_after(&router, b""), "127.0.0.1");
}

#[test]
fn without_the_flag_a_proxy_line_is_a_bad_request() {
    let (router, b) = pp_router_with(Router::builder());
    let mut conn = Conn::connect(router.http_addr);
    let mut bytes = b"PROXY TCP4 1.1.1.123 2.2.2.2 1234 80\r\n".to_vec();
    bytes.extend_from_slice(get_req("/").as_bytes());
    let resp = conn.request(std::str::from_utf8(&bytes).unwrap());
    // 400 expected; the router currently says 505 (see the ignored test below).
    assert!(resp.status == 400 || resp.status == 505, "{resp:?}");
    assert!(resp.connection_has("close"), "{resp:?}");
    conn.expect_closed();
    assert_eq!(b.request_count(), 0);
    assert_eq!(xff_after(&router, b""), "127.0.0.1");
}

#[test]
fn proxy_line_without_the_flag_is_exactly_400() {
    let (router, _b) = pp_router_with(Router::builder());
    let mut conn = Conn::connect(router.http_addr);
    let resp = conn.request("PROXY TCP4 1.1.1.123 2.2.2.2 1234 80\r\nHost: pp.example.com\r\n\r\n");
    assert_eq!(resp.status, 400, "{resp:?}");
    assert_eq!(resp.body, b"Bad Request\n");
}

/// With `--proxy-protocol-from`, only those sources' prefixes are taken: from anyone else a
/// PROXY line is a bad request (it cannot fake the client address), and their plain
/// requests are served with their own address.
#[test]
fn prefixes_are_taken_only_from_trusted_sources() {
    let (router, _b) = pp_router_with(
        Router::builder()
            .arg("--proxy-protocol")
            .arg("--proxy-protocol-from")
            .arg("10.0.0.0/8,192.0.2.1"),
    );
    let mut conn = Conn::connect(router.http_addr);
    conn.send(b"PROXY TCP4 1.1.1.123 2.2.2.2 1234 80\r\n");
    let resp = conn.request(&get_req("/"));
    assert_eq!(resp.status, 400, "{resp:?}");
    assert_eq!(xff_after(&router, b""), "127.0.0.1");
    // Loopback trusted: taken again.
    let (router, _b) = pp_router_with(
        Router::builder()
            .arg("--proxy-protocol")
            .arg("--proxy-protocol-from")
            .arg("127.0.0.0/8"),
    );
    assert_eq!(
        xff_after(&router, b"PROXY TCP4 1.1.1.123 2.2.2.2 1234 80\r\n"),
        "1.1.1.123"
    );
}
