//! Proxying over TLS: forwarded headers, keep-alive, upgrades, PROXY protocol.

use crate::client::{client_config, self_signed, TlsConn};
use crate::support::{handlers, http_route, Backend};
use crate::{https, https_builder, setup, tls_connect};

#[test]
fn forwarded_headers_say_https_and_the_https_port() {
    let (router, _b1, default) = setup();
    let mut conn = tls_connect(&router, "a.example.com", &[&default]);
    let seen = conn.get("a.example.com", "/h").seen();
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"), "{seen:?}");
    let port = https(&router).port().to_string();
    assert_eq!(
        seen.header("x-forwarded-port"),
        Some(port.as_str()),
        "{seen:?}"
    );
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("127.0.0.1"),
        "{seen:?}"
    );
    assert_eq!(seen.headers_all("x-forwarded-proto").len(), 1);

    // Client-supplied values are kept and the router appends its own (as on plain HTTP),
    // so the last element is always the truth: https and the HTTPS port.
    let seen = conn
        .request(
            "GET /spoof HTTP/1.1\r\nHost: a.example.com\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Port: 1\r\n\r\n",
        )
        .seen();
    assert_eq!(
        seen.headers_all("x-forwarded-proto"),
        vec!["http, https"],
        "{seen:?}"
    );
    let want_port = format!("1, {port}");
    assert_eq!(
        seen.headers_all("x-forwarded-port"),
        vec![want_port.as_str()],
        "{seen:?}"
    );

    // The plain listener says http and its own port.
    let plain = crate::support::get(router.http_addr, "a.example.com", "/p").seen();
    assert_eq!(plain.header("x-forwarded-proto"), Some("http"));
    let hport = router.http_addr.port().to_string();
    assert_eq!(plain.header("x-forwarded-port"), Some(hport.as_str()));
}

#[test]
fn keep_alive_over_tls_uses_one_upstream_connection() {
    let (router, b1, default) = setup();
    let mut conn = tls_connect(&router, "a.example.com", &[&default]);
    for i in 0..5 {
        let seen = conn.get("a.example.com", &format!("/k{i}")).seen();
        assert_eq!(seen.uri, format!("/k{i}"));
        assert_eq!(
            seen.conn, 1,
            "request {i} on upstream connection {}",
            seen.conn
        );
    }
    // A POST with a body on the same connection.
    let body = "x".repeat(20_000);
    let seen = conn
        .request(&format!(
            "POST /post HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ))
        .seen();
    assert_eq!(seen.body.len(), body.len());
    assert_eq!(b1.accepted(), 1, "one upstream connection for six requests");
    assert_eq!(b1.request_count(), 6);

    // Connection: close ends the TLS connection after the response.
    let resp =
        conn.request("GET /last HTTP/1.1\r\nHost: a.example.com\r\nConnection: close\r\n\r\n");
    assert_eq!(resp.status, 200);
    let rest = conn.read_to_end().expect("EOF after Connection: close");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}

#[test]
fn upgrade_echoes_over_tls() {
    let default = self_signed(&["ws.example.com"]);
    let router = crate::router_with_default(&default);
    let b = Backend::with_handler("ws", handlers::upgrade_echo);
    router.add_route(http_route("ws.example.com", "ws"));
    router.set_backends("ws", &[&b]);
    let mut conn = tls_connect(&router, "ws.example.com", &[&default]);
    // A plain request first, then the upgrade on the same TLS connection.
    assert_eq!(conn.get("ws.example.com", "/plain").status, 200);
    let resp = conn.request(
        "GET /ws HTTP/1.1\r\nHost: ws.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(resp.status, 101, "{resp:?}");
    assert_eq!(resp.header("upgrade"), Some("websocket"));
    assert_eq!(resp.header("x-backend"), Some("ws"));
    for msg in ["ping-1", "second message", &"y".repeat(40_000)] {
        conn.send(msg.as_bytes());
        let got = conn
            .read_exact_n(msg.len())
            .expect("echo through the tunnel");
        assert_eq!(got, msg.as_bytes());
    }
    let seen = b
        .requests()
        .into_iter()
        .find(|r| r.uri == "/ws")
        .expect("upgrade seen");
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(
        seen.header("sec-websocket-key"),
        Some("dGhlIHNhbXBsZSBub25jZQ==")
    );
}

/// A router from `b` with `--proxy-protocol` (see [`crate::setup_with`]).
fn pp_router(
    b: crate::support::RouterBuilder,
) -> (crate::support::Router, Backend, crate::client::Pair) {
    crate::setup_with(b.arg("--proxy-protocol"))
}

#[test]
fn proxy_v1_prefix_before_the_client_hello_sets_x_forwarded_for() {
    let (router, _b1, default) = pp_router(https_builder());
    let cfg = || client_config(&[&default], None);

    let prefix = format!(
        "PROXY TCP4 203.0.113.7 127.0.0.1 40000 {}\r\n",
        https(&router).port()
    );
    let mut conn =
        TlsConn::connect_with_prefix(https(&router), "a.example.com", cfg(), prefix.as_bytes())
            .unwrap_or_else(|e| panic!("TLS after PROXY prefix: {e}\n{}", router.log()));
    assert_eq!(conn.peer_cert(), default.der);
    let seen = conn.get("a.example.com", "/pp").seen();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.7"),
        "{seen:?}"
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    // The source address sticks for the whole connection.
    let seen = conn.get("a.example.com", "/pp2").seen();
    assert_eq!(seen.header("x-forwarded-for"), Some("203.0.113.7"));

    // A prefix split across two TCP segments.
    let (p1, p2) = prefix.as_bytes().split_at(12);
    let mut conn =
        TlsConn::connect_with_prefix_parts(https(&router), "a.example.com", cfg(), &[p1, p2])
            .expect("TLS after a split PROXY prefix");
    let seen = conn.get("a.example.com", "/split").seen();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.7"),
        "{seen:?}"
    );

    // IPv6 source.
    let prefix6 = "PROXY TCP6 2001:db8::1 ::1 40000 443\r\n";
    let mut conn =
        TlsConn::connect_with_prefix(https(&router), "a.example.com", cfg(), prefix6.as_bytes())
            .expect("TLS after PROXY TCP6 prefix");
    let seen = conn.get("a.example.com", "/pp6").seen();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("2001:db8::1"),
        "{seen:?}"
    );

    // PROXY v2 (binary) prefix, TCP over IPv4.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend_from_slice(&[0x21, 0x11, 0, 12]);
    v2.extend_from_slice(&[198, 51, 100, 9, 127, 0, 0, 1]);
    v2.extend_from_slice(&40001u16.to_be_bytes());
    v2.extend_from_slice(&443u16.to_be_bytes());
    let mut conn = TlsConn::connect_with_prefix(https(&router), "a.example.com", cfg(), &v2)
        .expect("TLS after PROXY v2 prefix");
    let seen = conn.get("a.example.com", "/v2").seen();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("198.51.100.9"),
        "{seen:?}"
    );

    // Without a prefix TLS is still served, with the real peer address.
    let mut conn = tls_connect(&router, "a.example.com", &[&default]);
    let seen = conn.get("a.example.com", "/direct").seen();
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));

    // A malformed prefix closes the connection (no handshake) and harms nothing else.
    let res = TlsConn::connect_with_prefix(
        https(&router),
        "a.example.com",
        cfg(),
        b"PROXY BOGUS nonsense\r\n",
    );
    assert!(res.is_err(), "malformed PROXY prefix must not handshake");
    let mut conn = tls_connect(&router, "a.example.com", &[&default]);
    assert_eq!(conn.get("a.example.com", "/ok").status, 200);
}

#[test]
fn additional_https_listener_serves_routes_naming_its_port() {
    let default = self_signed(&["a.example.com", "p.example.com"]);
    let router = https_builder()
        .arg("--https-addr")
        .arg("127.0.0.1:0")
        .env("TLSCERT", default.cert_pem.clone())
        .env("TLSKEY", default.key_pem.clone())
        .start();
    assert_eq!(router.https_addrs.len(), 2, "two https= addresses");
    let (first, second) = (router.https_addrs[0], router.https_addrs[1]);
    let b1 = Backend::start("b1");
    let b2 = Backend::start("b2");
    router.add_route(http_route("a.example.com", "web"));
    let mut r = http_route("p.example.com", "extra");
    r["port"] = second.port().into();
    router.add_route(r);
    router.set_backends("web", &[&b1]);
    router.set_backends("extra", &[&b2]);
    let cfg = || client_config(&[&default], None);

    let mut c = TlsConn::connect(second, "p.example.com", cfg()).expect("handshake on 2nd");
    let seen = c.get("p.example.com", "/").seen();
    assert_eq!(seen.backend, "b2");
    let port = second.port().to_string();
    assert_eq!(seen.header("x-forwarded-port"), Some(port.as_str()));
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));

    // The default route lives on the first HTTPS port.
    let mut c = TlsConn::connect(first, "a.example.com", cfg()).expect("handshake on 1st");
    let seen = c.get("a.example.com", "/").seen();
    assert_eq!(seen.backend, "b1");
    let port = first.port().to_string();
    assert_eq!(seen.header("x-forwarded-port"), Some(port.as_str()));
}

/// Voluntary context switches of every thread of process `pid` so far.
fn context_switches(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// A client that stalls in the middle of its PROXY prefix costs the router no polling
/// while it waits (the prefix is peeked, so the wait is for more bytes than are there),
/// and the connection completes normally once the rest arrives.
#[test]
fn a_stalled_proxy_prefix_is_waited_for_without_polling() {
    for driver in ["auto", "epoll"] {
        stalled_prefix(driver);
    }
}

fn stalled_prefix(driver: &str) {
    let (router, _b1, default) = pp_router(https_builder().threads(1).io_driver(driver));
    let prefix = format!(
        "PROXY TCP4 203.0.113.9 127.0.0.1 40000 {}\r\n",
        https(&router).port()
    );
    let (p1, p2) = prefix.as_bytes().split_at(15);
    let mut switches = None;
    let mut conn = TlsConn::connect_with_prefix_parts_between(
        https(&router),
        "a.example.com",
        client_config(&[&default], None),
        &[p1, p2],
        &mut || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let before = context_switches(router.pid());
            std::thread::sleep(std::time::Duration::from_secs(1));
            switches = Some(context_switches(router.pid()) - before);
        },
    )
    .expect("TLS after a stalled PROXY prefix");
    let seen = conn.get("a.example.com", "/stalled").seen();
    assert_eq!(seen.header("x-forwarded-for"), Some("203.0.113.9"));
    // An idle router wakes a couple of times a second (its timers); polling the stalled
    // prefix every millisecond was ~500-1000, and backing off to 100 ms alone ~15.
    let switches = switches.unwrap();
    assert!(
        switches < 8,
        "{switches} context switches in 1 s while waiting ({driver})"
    );
}

/// A handover drains the old process: an HTTPS keep-alive connection idle between requests
/// is closed like a plain one (it waits inside its TLS read, out of the idle sweep's reach,
/// and used to hold the old process to the whole drain timeout).
#[test]
fn handover_closes_idle_https_keep_alive_connections_without_the_drain_timeout() {
    let dir = crate::support::TestDir::new("tls-handover");
    let sock = dir.join("upgrade.sock");
    let (mut old, _b1, default) = crate::setup_with(
        https_builder()
            .arg("--upgrade-socket")
            .arg(sock.display().to_string())
            .arg("--drain-grace-secs")
            .arg("1")
            .arg("--drain-timeout-secs")
            .arg("60"),
    );
    let mut conn = tls_connect(&old, "a.example.com", &[&default]);
    assert_eq!(conn.get("a.example.com", "/").status, 200);
    let taken = std::time::Instant::now();
    let _new = crate::support::Router::builder()
        .arg("--takeover")
        .arg(sock.display().to_string())
        .arg("--upgrade-socket")
        .arg(dir.join("next.sock").display().to_string())
        .start();
    let status = old.wait_exit(std::time::Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "old router did not exit within 15 s (drain timeout 60 s) after {:?}",
        taken.elapsed()
    );
    drop(conn);
}

/// A TLS client that leaves while the backend has not answered yet is noticed: the
/// backend connection is closed (and the request counted as abandoned) instead of being
/// held until the backend answers. Both ways of leaving: close_notify then FIN, and a bare
/// FIN.
#[test]
fn a_tls_client_leaving_during_a_slow_backend_wait_frees_the_backend() {
    use crate::support::handlers::{hold, HoldEvent};
    use std::io::Write;
    use std::time::{Duration, Instant};
    let default = self_signed(&["a.example.com"]);
    let router = crate::router_with_default(&default);
    let (tx, rx) = std::sync::mpsc::channel();
    let slow = Backend::with_handler("slow", hold(tx));
    router.add_route(http_route("a.example.com", "slow"));
    router.set_backends("slow", &[&slow]);
    for notify in [true, false] {
        let mut conn = crate::tls_connect(&router, "a.example.com", &[&default]);
        conn.send(b"GET /wait HTTP/1.1\r\nHost: a.example.com\r\n\r\n");
        let held = match rx
            .recv_timeout(Duration::from_secs(5))
            .expect("request held")
        {
            HoldEvent::Request(c, _) => c,
            other => panic!("{other:?}"),
        };
        // Well past the router's grace before it starts watching.
        std::thread::sleep(Duration::from_millis(200));
        if notify {
            conn.tls.conn.send_close_notify();
            conn.tls.flush().unwrap();
        }
        conn.tls.sock.shutdown(std::net::Shutdown::Write).unwrap();
        let left = Instant::now();
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(HoldEvent::Closed(c, _)) => assert_eq!(c, held),
            other => panic!("close_notify {notify}: backend connection not closed: {other:?}"),
        }
        eprintln!(
            "close_notify {notify}: backend freed after {:?}",
            left.elapsed()
        );
    }
}

/// The router's own answer to an upload it does not read (a 404) reaches a TLS client that
/// writes its whole body first: the router sends close_notify and reads on (a lingering
/// close) instead of resetting the connection under the client's writes.
#[test]
fn an_own_answer_to_an_unread_upload_reaches_a_tls_client() {
    use std::io::Write;
    let (router, _b1, default) = setup();
    let mut conn = tls_connect(&router, "a.example.com", &[&default]);
    conn.tls
        .sock
        .set_write_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let body = vec![b'x'; 8 << 20];
    conn.send(
        format!(
            "POST /upload HTTP/1.1\r\nHost: nope.example.com\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    conn.tls
        .write_all(&body)
        .and_then(|_| conn.tls.flush())
        .unwrap_or_else(|e| panic!("upload refused: {e}"));
    let resp = conn.response();
    assert_eq!(resp.status, 404, "{resp:?}");
    assert!(conn.read_to_end().unwrap().is_empty());
}

/// Reads the TLS stream to its end: `Ok` only for a clean end (close_notify, then EOF);
/// a bare EOF is rustls' `UnexpectedEof`.
fn read_tls_to_end(conn: &mut TlsConn) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut all = Vec::new();
    let mut b = [0u8; 16 << 10];
    loop {
        match conn.tls.read(&mut b)? {
            0 => return Ok(all),
            n => all.extend_from_slice(&b[..n]),
        }
    }
}

/// A backend's response whose body ends with its connection (no length, no chunks) reaches
/// a TLS client as a whole: the router ends the connection with a close_notify, without
/// which the client cannot tell the body's end from a truncation (RFC 9112 §9.8; OpenSSL 3
/// clients report "unexpected eof"). The router's own answers that close do the same.
#[test]
fn a_body_ended_by_the_close_ends_with_a_close_notify() {
    let default = self_signed(&["a.example.com"]);
    let router = crate::router_with_default(&default);
    let eof = Backend::with_handler("eof", |_req, conn| {
        let _ = conn.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nended by the close\n");
        crate::support::Reply::Close
    });
    router.add_route(http_route("a.example.com", "eof"));
    router.set_backends("eof", &[&eof]);
    let mut conn = tls_connect(&router, "a.example.com", &[&default]);
    conn.send(b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n");
    let all = read_tls_to_end(&mut conn).unwrap_or_else(|e| panic!("no clean end: {e}"));
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nended by the close\n"), "{text}");

    // The router's own 404 to a client that asked to close.
    let mut conn = tls_connect(&router, "a.example.com", &[&default]);
    conn.send(b"GET / HTTP/1.1\r\nHost: nope.example.com\r\nConnection: close\r\n\r\n");
    let all = read_tls_to_end(&mut conn).unwrap_or_else(|e| panic!("404: no clean end: {e}"));
    assert!(
        all.starts_with(b"HTTP/1.1 404 "),
        "{}",
        String::from_utf8_lossy(&all)
    );
}

/// A close-delimited body cut short by the backend's reset is not ended with a
/// close_notify: the client must be able to tell it was truncated.
#[test]
fn a_body_cut_short_by_a_backend_reset_gets_no_close_notify() {
    let default = self_signed(&["a.example.com"]);
    let router = crate::router_with_default(&default);
    // A backend of its own: the test backends end connections with a FIN.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut b) {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&b[..n]),
            }
        }
        s.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart of it")
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        // SO_LINGER 0: the close sends a reset, not a FIN.
        socket2::SockRef::from(&s)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
    });
    router.add_route(http_route("a.example.com", "reset"));
    router.set_backend_addrs("reset", &[(addr.to_string(), false)]);
    let mut conn = tls_connect(&router, "a.example.com", &[&default]);
    conn.send(b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n");
    match read_tls_to_end(&mut conn) {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        other => panic!("a truncated body ended cleanly: {other:?}"),
    }
    backend.join().unwrap();
}

/// After its handshake, an HTTPS connection that sends no request is closed at the header
/// timeout, not held for the idle timeout; one that has had a request idles under the
/// idle timeout as before.
#[test]
fn a_tls_connection_without_a_request_is_closed_at_the_header_timeout() {
    let b = https_builder()
        .arg("--header-timeout-secs")
        .arg("1")
        .arg("--idle-timeout-secs")
        .arg("30");
    let (router, _b1, default) = crate::setup_with(b);
    let mut served = tls_connect(&router, "a.example.com", &[&default]);
    assert_eq!(served.get("a.example.com", "/").status, 200);
    let mut quiet = tls_connect(&router, "a.example.com", &[&default]);
    let start = std::time::Instant::now();
    let got = quiet
        .read_to_end()
        .unwrap_or_else(|e| panic!("not closed after {:?}: {e}", start.elapsed()));
    assert!(got.is_empty(), "{got:?}");
    let took = start.elapsed();
    // A 1 s header timeout; before, the connection was held for the idle timeout (30 s;
    // over 5 s as measured). 4 s leaves room for a loaded machine.
    assert!(
        took < std::time::Duration::from_secs(4),
        "closed after {took:?}"
    );
    // Between requests the idle timeout applies.
    assert_eq!(served.get("a.example.com", "/again").status, 200);
}

/// Empty lines before the first request do not start the header timeout over on TLS
/// either (the connection waits for its first request in the head read, which took each
/// line for a fresh wait): a CRLF every half second, under a 2 s header timeout, ends
/// 2 s after the handshake.
#[test]
fn empty_lines_do_not_extend_a_tls_connections_wait_for_its_first_request() {
    use std::io::{ErrorKind, Read, Write};
    let b = https_builder()
        .arg("--header-timeout-secs")
        .arg("2")
        .arg("--idle-timeout-secs")
        .arg("30");
    let (router, _b1, default) = crate::setup_with(b);
    let start = std::time::Instant::now();
    let mut conn = tls_connect(&router, "a.example.com", &[&default]);
    conn.tls
        .sock
        .set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    let closed = loop {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "still open after {:?}",
            start.elapsed()
        );
        if conn
            .tls
            .write_all(b"\r\n")
            .and_then(|_| conn.tls.flush())
            .is_err()
        {
            break start.elapsed();
        }
        let mut b = [0u8; 256];
        match conn.tls.read(&mut b) {
            Ok(0) => break start.elapsed(),
            Ok(n) => panic!("unexpected {:?}", String::from_utf8_lossy(&b[..n])),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break start.elapsed(),
        }
    };
    assert!(
        closed >= std::time::Duration::from_millis(1900)
            && closed < std::time::Duration::from_secs(6),
        "closed after {closed:?}"
    );
}

/// A backend that resets an upgraded TLS connection's tunnel after sending its last
/// bytes: the client gets them all, then a TLS close_notify before the TCP close (it used
/// to get the TCP close alone, which a strict client reports as a truncation).
#[test]
fn a_backend_reset_ends_an_upgraded_tls_tunnel_with_a_close_notify() {
    use std::io::{Read, Write};
    const LEN: usize = 64 << 10;
    let default = self_signed(&["ws.example.com"]);
    let router = crate::router_with_default(&default);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let backend = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut b).unwrap();
            assert!(n > 0, "no request");
            head.extend_from_slice(&b[..n]);
        }
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        )
        .unwrap();
        let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
        s.write_all(&data).unwrap();
        // Once the router's kernel has all of it, a reset: SO_LINGER 0, close.
        let start = std::time::Instant::now();
        while flynn_runtime::sock::unacked(std::os::fd::AsRawFd::as_raw_fd(&s)).unwrap() > 0 {
            assert!(start.elapsed() < std::time::Duration::from_secs(20));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        socket2::SockRef::from(&s)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(s);
    });
    router.add_route(http_route("ws.example.com", "ws"));
    router.set_backend_addrs("ws", &[(addr.to_string(), false)]);
    let mut conn = tls_connect(&router, "ws.example.com", &[&default]);
    let resp = conn.request(
        "GET /ws HTTP/1.1\r\nHost: ws.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    );
    assert_eq!(resp.status, 101, "{resp:?}");
    let got = conn.read_to_close_notify();
    backend.join().unwrap();
    let got = got.expect("the tunnel's end without a close_notify");
    assert_eq!(got.len(), LEN);
    assert!(got.iter().enumerate().all(|(i, &v)| v == (i % 251) as u8));
}
