//! Sticky sessions (spec §1.6 "Sticky", §1.10 sticky rows): the `_backend` cookie is
//! base64(std) of a NaCl secretbox (24-byte nonce prefix) of the backend address, keyed by
//! `COOKIE_KEY`, set with `Path=/`, and only when the chosen backend differs from the
//! cookie's.

use crate::support::{dead_addr, handlers, http_route, Backend, Conn, Response, Router};
use crate::EXIT_TIMEOUT;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use crypto_secretbox::aead::{Aead, KeyInit};
use crypto_secretbox::{Key, Nonce, XSalsa20Poly1305};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const KEY: [u8; 32] = [7; 32];
const DOMAIN: &str = "sticky.example.com";

fn key_b64() -> String {
    STANDARD.encode(KEY)
}

/// A router started with `COOKIE_KEY` (through the environment).
fn sticky_router(threads: u32) -> Router {
    Router::builder()
        .threads(threads)
        .env("COOKIE_KEY", key_b64())
        .start()
}

fn sticky_route(domain: &str, service: &str) -> serde_json::Value {
    let mut r = http_route(domain, service);
    r["sticky"] = true.into();
    r
}

/// Seals `plain` as the router does (any 24-byte nonce will do).
fn seal_with(key: &[u8; 32], plain: &str) -> String {
    let cipher = XSalsa20Poly1305::new(Key::from_slice(key));
    let nonce = [42u8; 24];
    let mut out = nonce.to_vec();
    out.extend(
        cipher
            .encrypt(Nonce::from_slice(&nonce), plain.as_bytes())
            .unwrap(),
    );
    STANDARD.encode(out)
}

fn seal(addr: SocketAddr) -> String {
    seal_with(&KEY, &addr.to_string())
}

/// The backend address inside a cookie value sealed with [`KEY`].
fn open(value: &str) -> SocketAddr {
    let raw = STANDARD
        .decode(value)
        .unwrap_or_else(|e| panic!("cookie {value:?} is not standard base64: {e}"));
    assert!(raw.len() > 24, "cookie {value:?} too short for a nonce");
    let (nonce, sealed) = raw.split_at(24);
    let cipher = XSalsa20Poly1305::new(Key::from_slice(&KEY));
    let plain = cipher
        .decrypt(Nonce::from_slice(nonce), sealed)
        .unwrap_or_else(|_| panic!("cookie {value:?} does not open with COOKIE_KEY"));
    String::from_utf8(plain).unwrap().parse().unwrap()
}

/// The `_backend` cookie value the response sets, checking the header's exact shape;
/// `None` when it sets no cookie at all.
fn set_cookie(resp: &Response) -> Option<String> {
    let all = resp.headers_all("set-cookie");
    assert!(all.len() <= 1, "more than one Set-Cookie: {all:?}");
    let v = all.first()?;
    let rest = v
        .strip_prefix("_backend=")
        .unwrap_or_else(|| panic!("Set-Cookie is not _backend: {v:?}"));
    let (value, attrs) = rest
        .split_once(';')
        .unwrap_or_else(|| panic!("Set-Cookie without attributes: {v:?}"));
    assert_eq!(attrs.trim(), "Path=/", "Set-Cookie attributes: {v:?}");
    assert!(!value.is_empty(), "empty cookie: {v:?}");
    Some(value.to_string())
}

fn request(router: &Router, method: &str, cookie: Option<&str>, body: &str) -> Response {
    let mut conn = Conn::connect(router.http_addr);
    let mut raw = format!("{method} /sticky HTTP/1.1\r\nHost: {DOMAIN}\r\n");
    if let Some(c) = cookie {
        raw.push_str(&format!("Cookie: other=1; _backend={c}\r\n"));
    }
    if method == "POST" {
        raw.push_str(&format!(
            "Content-Type: text/plain\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    raw.push_str("\r\n");
    raw.push_str(body);
    conn.request(&raw)
}

fn get(router: &Router, cookie: Option<&str>) -> Response {
    request(router, "GET", cookie, "")
}

fn ws_handshake(router: &Router, cookie: Option<&str>) -> (Conn, Response) {
    let mut conn = Conn::connect(router.http_addr);
    let mut raw = format!(
        "GET /ws HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(c) = cookie {
        raw.push_str(&format!("Cookie: _backend={c}\r\n"));
    }
    raw.push_str("\r\n");
    let resp = conn.request(&raw);
    (conn, resp)
}

/// The tunnel after a 101 really reaches the backend.
fn assert_tunnel(conn: &mut Conn) {
    conn.send(b"sticky-ping");
    assert_eq!(conn.read_exact_n(11).expect("tunnel echo"), b"sticky-ping");
    conn.shutdown_write();
    assert_eq!(conn.read_to_end().expect("EOF after half-close"), b"");
}

fn refused(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err()
}

#[test]
fn cookie_pins_backend_until_it_is_removed() {
    let router = sticky_router(2);
    let b1 = Backend::start("b1");
    let b2 = Backend::start("b2");
    router.add_route(sticky_route(DOMAIN, "web"));
    router.set_backends("web", &[&b1, &b2]);

    // 1. First response sets the cookie; it names the backend that answered.
    let first = get(&router, None);
    assert_eq!(first.status, 200, "{first:?}");
    let cookie = set_cookie(&first).expect("first response of a sticky route sets _backend");
    let pinned = first.backend();
    let (pinned_b, other_b) = if pinned == "b1" {
        (&b1, &b2)
    } else {
        (&b2, &b1)
    };
    assert_eq!(open(&cookie), pinned_b.addr, "cookie seals the chosen addr");

    // 2. With the cookie: 10 requests, all to the same backend, no new cookie.
    for i in 0..10 {
        let r = get(&router, Some(&cookie));
        assert_eq!(r.backend(), pinned, "request {i} with the cookie");
        assert_eq!(
            set_cookie(&r),
            None,
            "request {i} must not set a new cookie"
        );
    }

    // 3. The pinned backend leaves the service: the other one answers, new cookie.
    router.set_backends("web", &[other_b]);
    let moved = get(&router, Some(&cookie));
    assert_eq!(moved.backend(), other_b.name, "after removal");
    let new_cookie = set_cookie(&moved).expect("a new cookie after the backend left");
    assert_eq!(open(&new_cookie), other_b.addr);

    // 4. ... and that new cookie is then honoured without being reissued.
    for i in 0..3 {
        let r = get(&router, Some(&new_cookie));
        assert_eq!(r.backend(), other_b.name, "request {i} with the new cookie");
        assert_eq!(set_cookie(&r), None);
    }
}

#[test]
fn cookie_reused_on_keep_alive_connection_and_non_sticky_route_sets_none() {
    let router = sticky_router(2);
    let b1 = Backend::start("b1");
    let b2 = Backend::start("b2");
    router.add_route(sticky_route(DOMAIN, "web"));
    router.add_route(http_route("plain.example.com", "web"));
    router.set_backends("web", &[&b1, &b2]);

    let mut conn = Conn::connect(router.http_addr);
    let first = conn.get(DOMAIN, "/");
    let cookie = set_cookie(&first).expect("cookie on first response");
    let pinned = first.backend();
    for i in 0..5 {
        let r = conn.request(&format!(
            "GET /{i} HTTP/1.1\r\nHost: {DOMAIN}\r\nCookie: _backend={cookie}\r\n\r\n"
        ));
        assert_eq!(r.backend(), pinned);
        assert_eq!(set_cookie(&r), None);
    }
    // A non-sticky route on the same router never sets the cookie.
    for _ in 0..5 {
        let r = conn.get("plain.example.com", "/");
        assert_eq!(r.status, 200);
        assert!(r.headers_all("set-cookie").is_empty(), "{r:?}");
    }
}

#[test]
fn cookie_sealed_elsewhere_with_the_same_key_is_honoured() {
    // Cookies are portable between routers sharing COOKIE_KEY: one sealed by the test
    // (fixed nonce) pins the backend just like one the router issued.
    let router = sticky_router(2);
    let b1 = Backend::start("b1");
    let b2 = Backend::start("b2");
    router.add_route(sticky_route(DOMAIN, "web"));
    router.set_backends("web", &[&b1, &b2]);
    for b in [&b1, &b2] {
        let cookie = seal(b.addr);
        for _ in 0..5 {
            let r = get(&router, Some(&cookie));
            assert_eq!(r.backend(), b.name);
            assert_eq!(set_cookie(&r), None, "{r:?}");
        }
    }
}

#[test]
fn cookie_for_dead_backend_falls_over_to_live_one_for_get_and_post() {
    let router = sticky_router(2);
    let live = Backend::start("live");
    let dead = dead_addr();
    router.add_route(sticky_route(DOMAIN, "web"));
    router.set_backend_addrs(
        "web",
        &[(dead.to_string(), false), (live.addr.to_string(), false)],
    );
    let cookie = seal(dead);
    for i in 0..4 {
        let r = get(&router, Some(&cookie));
        assert_eq!(r.status, 200, "GET {i}: {r:?}");
        assert_eq!(r.backend(), "live");
        let c = set_cookie(&r).expect("a new cookie for the live backend (GET)");
        assert_eq!(open(&c), live.addr);

        let body = format!("payload-{i}");
        let r = request(&router, "POST", Some(&cookie), &body);
        assert_eq!(r.status, 200, "POST {i}: {r:?}");
        let seen = r.seen();
        assert_eq!(seen.backend, "live");
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.body, body.as_bytes());
        let c = set_cookie(&r).expect("a new cookie for the live backend (POST)");
        assert_eq!(open(&c), live.addr);
    }
}

/// Pins a cookie to `b1` over a keep-alive (pooled) backend connection, then kills `b1`
/// (connections and port) while `b2` is live. Returns the stale cookie.
fn pin_then_kill(router: &Router, b1: Backend, b2: &Backend) -> String {
    router.add_route(sticky_route(DOMAIN, "web"));
    router.set_backends("web", &[&b1]);
    let first = get(router, None);
    assert_eq!(first.backend(), "b1");
    let cookie = set_cookie(&first).expect("cookie");
    router.set_backends("web", &[&b1, b2]);
    let b1_addr = b1.addr;
    drop(b1);
    assert!(
        crate::support::wait_until(Duration::from_secs(5), || refused(b1_addr)),
        "b1 still accepting"
    );
    cookie
}

#[test]
fn pinned_backend_dead_for_a_while_falls_over() {
    // The router held a pooled keep-alive connection to the pinned backend when it died;
    // the pool's liveness check before reuse finds it closed and drops it, and the dial
    // failure moves on to the live backend.
    let router = sticky_router(1);
    let b2 = Backend::start("b2");
    let cookie = pin_then_kill(&router, Backend::start("b1"), &b2);
    std::thread::sleep(Duration::from_millis(700));
    let r = get(&router, Some(&cookie));
    assert_eq!(r.status, 200, "GET after the pinned backend died: {r:?}");
    assert_eq!(r.backend(), "b2");
    let c = set_cookie(&r).expect("new cookie");
    assert_eq!(open(&c), b2.addr);
    let r = request(&router, "POST", Some(&cookie), "after-death");
    assert_eq!(r.status, 200, "POST after the pinned backend died: {r:?}");
    assert_eq!(r.seen().body, b"after-death");
    assert!(set_cookie(&r).is_some());
}

#[test]
fn pinned_backend_that_just_died_falls_over() {
    // Same as above but at once. The pooled connection has been idle longer than the
    // pool's reuse-without-a-peek window (1 ms) by the time `pin_then_kill` has seen the
    // port refuse, so the peek drops it; were it reused it would fail as Stale and the
    // redial would fail the same way (the Stale retry itself is tested in
    // `http::framing`). Either way the dial failure must move on to b2 (spec §1.6: dial
    // failures are retried with another backend).
    let router = sticky_router(1);
    let b2 = Backend::start("b2");
    let cookie = pin_then_kill(&router, Backend::start("b1"), &b2);
    let r = get(&router, Some(&cookie));
    assert_eq!(
        r.status, 200,
        "GET right after the pinned backend died: {r:?}"
    );
    assert_eq!(r.backend(), "b2");
    assert_eq!(open(&set_cookie(&r).expect("new cookie")), b2.addr);
}

#[test]
fn tampered_or_foreign_cookie_is_treated_as_absent() {
    let router = sticky_router(2);
    let b1 = Backend::start("b1");
    let b2 = Backend::start("b2");
    router.add_route(sticky_route(DOMAIN, "web"));
    router.set_backends("web", &[&b1, &b2]);
    let good = set_cookie(&get(&router, None)).expect("cookie");

    let mut raw = STANDARD.decode(&good).unwrap();
    let last = raw.len() - 1;
    raw[last] ^= 0x01;
    let flipped_tag = STANDARD.encode(&raw);
    let mut raw = STANDARD.decode(&good).unwrap();
    raw[30] ^= 0x80;
    let flipped_body = STANDARD.encode(&raw);
    let foreign = seal_with(&[9; 32], &b1.addr.to_string());
    let not_addr = seal_with(&KEY, "not-an-address");
    let cases = [
        ("flipped tag", flipped_tag.as_str()),
        ("flipped ciphertext", flipped_body.as_str()),
        ("other key", foreign.as_str()),
        ("sealed non-address", not_addr.as_str()),
        ("not base64", "%%%not-base64%%%"),
        ("too short", "AAAA"),
        ("empty", ""),
    ];
    for (what, value) in cases {
        for _ in 0..3 {
            let r = get(&router, Some(value));
            assert_eq!(r.status, 200, "{what}: {r:?}");
            let c = set_cookie(&r)
                .unwrap_or_else(|| panic!("{what}: cookie ignored, so a new one is set"));
            let name = r.backend();
            let expect = if name == "b1" { b1.addr } else { b2.addr };
            assert_eq!(open(&c), expect, "{what}");
        }
    }
}

#[test]
fn sticky_websocket_handshake_follows_the_cookie_rules() {
    let router = sticky_router(2);
    let u1 = Backend::with_handler("u1", handlers::upgrade_echo);
    let u2 = Backend::with_handler("u2", handlers::upgrade_echo);
    router.add_route(sticky_route(DOMAIN, "ws"));
    router.set_backends("ws", &[&u1, &u2]);

    // Step 1: no cookie → 101 with a cookie naming the backend.
    let (mut conn, resp) = ws_handshake(&router, None);
    assert_eq!(resp.status, 101, "{resp:?}");
    let cookie = set_cookie(&resp).expect("cookie on the first handshake");
    let pinned = resp.header("x-backend").unwrap().to_string();
    let (pinned_b, other_b) = if pinned == "u1" {
        (&u1, &u2)
    } else {
        (&u2, &u1)
    };
    assert_eq!(open(&cookie), pinned_b.addr);
    assert_tunnel(&mut conn);

    // Step 2: with the cookie → same backend, no cookie.
    for i in 0..5 {
        let (mut conn, resp) = ws_handshake(&router, Some(&cookie));
        assert_eq!(resp.status, 101, "{i}: {resp:?}");
        assert_eq!(resp.header("x-backend"), Some(pinned.as_str()), "{i}");
        assert_eq!(set_cookie(&resp), None, "handshake {i} with the cookie");
        assert_tunnel(&mut conn);
    }

    // Step 3: pinned backend removed → the other one, new cookie.
    router.set_backends("ws", &[other_b]);
    let (mut conn, resp) = ws_handshake(&router, Some(&cookie));
    assert_eq!(resp.status, 101, "{resp:?}");
    assert_eq!(resp.header("x-backend"), Some(other_b.name.as_str()));
    let c = set_cookie(&resp).expect("new cookie after the backend left");
    assert_eq!(open(&c), other_b.addr);
    assert_tunnel(&mut conn);
}

#[test]
fn sticky_websocket_to_dead_backend_uses_live_one() {
    let router = sticky_router(2);
    let live = Backend::with_handler("live", handlers::upgrade_echo);
    let dead = dead_addr();
    router.add_route(sticky_route(DOMAIN, "ws"));
    router.set_backend_addrs(
        "ws",
        &[(dead.to_string(), false), (live.addr.to_string(), false)],
    );
    let cookie = seal(dead);
    for i in 0..3 {
        let (mut conn, resp) = ws_handshake(&router, Some(&cookie));
        assert_eq!(resp.status, 101, "{i}: {resp:?}");
        assert_eq!(resp.header("x-backend"), Some("live"));
        let c = set_cookie(&resp).expect("new cookie for the live backend");
        assert_eq!(open(&c), live.addr);
        assert_tunnel(&mut conn);
    }
}

#[test]
fn sticky_route_needs_cookie_key() {
    let router = Router::start();
    let (status, body) = router.api(
        "POST",
        "/routes",
        Some(&sticky_route(DOMAIN, "web").to_string()),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "validation_error", "{body}");
    assert!(
        body["message"].as_str().unwrap_or("").contains("sticky"),
        "{body}"
    );
    // Turning an existing route sticky is refused the same way.
    let stored = router.add_route(http_route(DOMAIN, "web"));
    let mut r = stored.clone();
    r["sticky"] = true.into();
    let path = crate::support::router::route_path(&stored);
    let (status, body) = router.api("PUT", &path, Some(&r.to_string()));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "validation_error", "{body}");
    // Nothing was stored sticky.
    let (status, list) = router.api("GET", "/routes", None);
    assert_eq!(status, 200);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["sticky"], false);
}

#[test]
fn sticky_route_accepted_with_cookie_key_flag() {
    let router = Router::builder().arg("--cookie-key").arg(key_b64()).start();
    let stored = router.add_route(sticky_route(DOMAIN, "web"));
    assert_eq!(stored["sticky"], true);
    let b = Backend::start("b1");
    router.set_backends("web", &[&b]);
    let r = get(&router, None);
    let c = set_cookie(&r).expect("cookie");
    assert_eq!(open(&c), b.addr);
}

#[test]
#[allow(clippy::type_complexity)]
fn invalid_cookie_key_stops_the_router() {
    let cases: Vec<(&str, Vec<(&str, String)>, Vec<String>)> = vec![
        (
            "env, 31 bytes",
            vec![("COOKIE_KEY", STANDARD.encode([1u8; 31]))],
            vec![],
        ),
        (
            "env, 33 bytes",
            vec![("COOKIE_KEY", STANDARD.encode([1u8; 33]))],
            vec![],
        ),
        (
            "env, not base64",
            vec![("COOKIE_KEY", "%%%".into())],
            vec![],
        ),
        (
            "flag, 31 bytes",
            vec![],
            vec!["--cookie-key".into(), STANDARD.encode([1u8; 31])],
        ),
    ];
    for (what, envs, args) in cases {
        let mut b = Router::builder();
        for (k, v) in envs {
            b = b.env(k, v);
        }
        for a in args {
            b = b.arg(a);
        }
        let (status, out) = b.run_to_exit(EXIT_TIMEOUT);
        let status = status.unwrap_or_else(|| panic!("{what}: router kept running\n{out}"));
        assert!(!status.success(), "{what}: exit {status}\n{out}");
        assert!(
            out.contains("COOKIE_KEY"),
            "{what}: message should name COOKIE_KEY:\n{out}"
        );
        assert!(
            !out.contains("listening"),
            "{what}: it must not start listening\n{out}"
        );
    }
}

fn h2c_curl(addr: SocketAddr, headers: &[&str]) -> (Vec<String>, String) {
    let (head, body) = crate::support::h2c_curl(addr, DOMAIN, "/", headers);
    assert!(head[0].starts_with("HTTP/2 200"), "{head:?} {body}");
    (head, body)
}

/// HTTP/2 requests stick like HTTP/1.1 ones (spec §1.7: HTTP/2 uses the same handler):
/// the first answer sets the cookie, and requests carrying it, with the cookie split
/// into several HTTP/2 fields as browsers send it, go to that backend.
#[test]
fn http2_requests_stick_and_split_cookies_are_joined() {
    let router = Router::builder()
        .env("COOKIE_KEY", key_b64())
        .arg("--h2c-addr")
        .arg("127.0.0.1:0")
        .start();
    let (b1, b2) = (Backend::start("b1"), Backend::start("b2"));
    router.add_route(sticky_route(DOMAIN, "web"));
    router.set_backends("web", &[&b1, &b2]);
    let addr = router.h2c_addrs[0];
    let (head, body) = h2c_curl(addr, &[]);
    let cookie = head
        .iter()
        .find_map(|l| l.strip_prefix("set-cookie: _backend="))
        .unwrap_or_else(|| panic!("no sticky cookie over HTTP/2: {head:?}"));
    let value = cookie.strip_suffix("; Path=/").expect("Path=/");
    let first: serde_json::Value = serde_json::from_str(&body).unwrap();
    let chosen = open(value);
    let name = if chosen == b1.addr { "b1" } else { "b2" };
    assert_eq!(first["backend"], name, "{body}");
    for _ in 0..6 {
        let (head, body) = h2c_curl(
            addr,
            &[
                "cookie: a=1",
                &format!("cookie: _backend={value}"),
                "cookie: z=2",
            ],
        );
        assert!(
            !head.iter().any(|l| l.starts_with("set-cookie")),
            "the cookie was honoured, no new one: {head:?}"
        );
        let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(seen["backend"], name, "{body}");
        let cookies: Vec<String> = seen["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h[0].as_str().unwrap().eq_ignore_ascii_case("cookie"))
            .map(|h| h[1].as_str().unwrap().to_string())
            .collect();
        assert_eq!(cookies, [format!("a=1; _backend={value}; z=2")]);
    }
}
