//! TCP route integration tests (spec §1.8, §1.10): byte forwarding with half-close, backend
//! swaps, route deletion, unreachable backends, leader routing, routes file.

#[path = "../support/mod.rs"]
mod support;

use serde_json::json;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;
use support::{dead_addr, tcp_range, tcp_route, Router, TcpBackend, IO_TIMEOUT};

fn tcp_router() -> Router {
    Router::builder().tcp().start()
}

fn set_tcp_backends(router: &Router, service: &str, backends: &[&TcpBackend]) {
    let addrs: Vec<(String, bool)> = backends
        .iter()
        .map(|b| (b.addr.to_string(), false))
        .collect();
    router.set_backend_addrs(service, &addrs);
}

fn port_of(route: &serde_json::Value) -> u16 {
    route["port"]
        .as_u64()
        .unwrap_or_else(|| panic!("route without port: {route}")) as u16
}

fn connect(port: u16) -> TcpStream {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Sends `msg`, half-closes, and returns everything the other side sent until EOF.
fn exchange(port: u16, msg: &[u8]) -> Vec<u8> {
    let mut s = connect(port);
    s.write_all(msg).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("read from port {port}: {e}"));
    out
}

#[test]
fn tcp_route_forwards_both_ways_with_half_close() {
    let router = tcp_router();
    let (lo, hi) = router.tcp_ports.unwrap();
    let b1 = TcpBackend::start("b1");
    let route = router.add_route(tcp_route(0, "tcpsvc"));
    let port = port_of(&route);
    assert!(
        (lo..=hi).contains(&port),
        "allocated port {port} outside {lo}-{hi}"
    );
    set_tcp_backends(&router, "tcpsvc", &[&b1]);
    assert_eq!(exchange(port, b"hello"), b"b1 hello");
    assert_eq!(exchange(port, b""), b"b1 ");
    assert_eq!(b1.accepted(), 2);
}

#[test]
fn tcp_route_carries_large_payload() {
    let router = tcp_router();
    let b1 = TcpBackend::start("b1");
    let port = port_of(&router.add_route(tcp_route(0, "tcpsvc")));
    set_tcp_backends(&router, "tcpsvc", &[&b1]);
    let payload: Vec<u8> = (0..(3 << 20)).map(|i| (i % 253) as u8).collect();
    let mut s = connect(port);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let data = payload.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    writer.join().unwrap();
    assert_eq!(&out[..3], b"b1 ");
    assert!(
        out[3..] == payload[..],
        "payload corrupted ({} bytes back)",
        out.len()
    );
}

#[test]
fn explicit_port_route_and_swapped_backends() {
    let router = tcp_router();
    let (lo, hi) = router.tcp_ports.unwrap();
    let want = lo + (hi - lo) / 2;
    let (b1, b2) = (TcpBackend::start("b1"), TcpBackend::start("b2"));
    let route = router.add_route(tcp_route(want, "tcpsvc"));
    assert_eq!(port_of(&route), want);
    set_tcp_backends(&router, "tcpsvc", &[&b1]);
    assert_eq!(exchange(want, b"x"), b"b1 x");
    set_tcp_backends(&router, "tcpsvc", &[&b2]);
    for _ in 0..3 {
        assert_eq!(exchange(want, b"y"), b"b2 y");
    }
    assert_eq!(b1.accepted(), 1);
}

#[test]
fn deleted_route_port_refuses_connections_and_can_be_reused() {
    let router = tcp_router();
    let b1 = TcpBackend::start("b1");
    let route = router.add_route(tcp_route(0, "tcpsvc"));
    let port = port_of(&route);
    set_tcp_backends(&router, "tcpsvc", &[&b1]);
    assert_eq!(exchange(port, b"a"), b"b1 a");
    router.delete_route(&route);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}"),
        Ok(mut s) => {
            // Accepted by a stale listener: it must not reach a backend.
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let _ = s.write_all(b"z");
            let _ = s.shutdown(Shutdown::Write);
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            panic!("port {port} still accepts after route deletion (got {out:?})");
        }
    }
    // The port goes back to the pool.
    let again = router.add_route(tcp_route(port, "tcpsvc"));
    assert_eq!(port_of(&again), port);
    assert_eq!(exchange(port, b"b"), b"b1 b");
}

#[test]
fn unreachable_backends_close_the_client_connection() {
    let router = tcp_router();
    let port = port_of(&router.add_route(tcp_route(0, "tcpsvc")));
    for addrs in [
        vec![],
        vec![
            (dead_addr().to_string(), false),
            (dead_addr().to_string(), false),
        ],
    ] {
        router.set_backend_addrs("tcpsvc", &addrs);
        let mut s = connect(port);
        let _ = s.write_all(b"hello");
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("backends {addrs:?}: expected the connection closed, got {other:?}"),
        }
    }
}

#[test]
fn dead_backend_is_skipped_for_a_live_one() {
    let router = tcp_router();
    let b1 = TcpBackend::start("live");
    let port = port_of(&router.add_route(tcp_route(0, "tcpsvc")));
    router.set_backend_addrs(
        "tcpsvc",
        &[
            (dead_addr().to_string(), false),
            (b1.addr.to_string(), false),
            (dead_addr().to_string(), false),
        ],
    );
    for i in 0..8 {
        assert_eq!(
            exchange(port, format!("{i}").as_bytes()),
            format!("live {i}").as_bytes()
        );
    }
}

#[test]
fn leader_tcp_route_goes_to_leader() {
    let router = tcp_router();
    let (b1, b2) = (TcpBackend::start("b1"), TcpBackend::start("b2"));
    let port = port_of(
        &router.add_route(json!({"type": "tcp", "port": 0, "service": "db", "leader": true})),
    );
    router.set_backend_addrs(
        "db",
        &[(b1.addr.to_string(), false), (b2.addr.to_string(), true)],
    );
    for _ in 0..5 {
        assert_eq!(exchange(port, b"q"), b"b2 q");
    }
    router.set_backend_addrs(
        "db",
        &[(b1.addr.to_string(), true), (b2.addr.to_string(), false)],
    );
    for _ in 0..5 {
        assert_eq!(exchange(port, b"q"), b"b1 q");
    }
}

#[test]
fn routes_file_tcp_route_is_served_at_start() {
    let b1 = TcpBackend::start("b1");
    let range = tcp_range(10);
    let port = range.0 + 3;
    let file = std::env::temp_dir().join(format!(
        "flynn-router-tcp-routes-{}.json",
        std::process::id()
    ));
    let doc = json!({
        "routes": [{"type": "tcp", "port": port, "service": "tcpsvc"}],
        "services": {"tcpsvc": [{"addr": b1.addr.to_string()}]}
    });
    std::fs::write(&file, doc.to_string()).unwrap();
    let router = Router::builder()
        .tcp_ports(range)
        .routes_file(file.clone())
        .start();
    let _ = std::fs::remove_file(&file);
    assert_eq!(exchange(port, b"boot"), b"b1 boot");
    let (status, routes) = router.api("GET", "/routes", None);
    assert_eq!(status, 200);
    assert_eq!(routes[0]["port"], port);
}

#[test]
fn tcp_routes_are_independent_per_port() {
    let router = tcp_router();
    let (b1, b2) = (TcpBackend::start("b1"), TcpBackend::start("b2"));
    let p1 = port_of(&router.add_route(tcp_route(0, "s1")));
    let p2 = port_of(&router.add_route(tcp_route(0, "s2")));
    assert_ne!(p1, p2);
    set_tcp_backends(&router, "s1", &[&b1]);
    set_tcp_backends(&router, "s2", &[&b2]);
    assert_eq!(exchange(p1, b"1"), b"b1 1");
    assert_eq!(exchange(p2, b"2"), b"b2 2");
    // Duplicate port is a conflict.
    let (status, body) = router.api("POST", "/routes", Some(&tcp_route(p1, "s3").to_string()));
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "conflict");
}

/// A port another program listens on is refused with a clear 409 when named, and skipped
/// when the router picks one; the routes that were stored are served.
#[test]
fn ports_held_by_another_program_are_refused_or_skipped() {
    let router = tcp_router();
    let (lo, _) = router.tcp_ports.unwrap();
    let squatter = std::net::TcpListener::bind(("127.0.0.1", lo)).expect("bind the first port");

    let (status, body) = router.api(
        "POST",
        "/routes",
        Some(&tcp_route(lo, "tcpsvc").to_string()),
    );
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("Port {lo} cannot be listened on"))),
        "{body}"
    );
    let (_, routes) = router.api("GET", "/routes", None);
    assert_eq!(routes.as_array().map(|a| a.len()), Some(0), "{routes}");

    // A route without a port gets the next free one, not the held one.
    let b = TcpBackend::start("b1");
    let route = router.add_route(tcp_route(0, "tcpsvc"));
    assert_eq!(port_of(&route), lo + 1);
    set_tcp_backends(&router, "tcpsvc", &[&b]);
    assert_eq!(exchange(lo + 1, b"x"), b"b1 x");

    // Once the other program lets go, the port can be routed. Where the machine's
    // ephemeral port range reaches this low, another program's connection may hold the
    // port for a moment, so a refusal is tried again for a while.
    drop(squatter);
    let mut last = serde_json::Value::Null;
    let routed = wait_for(|| {
        let (status, body) = router.api(
            "POST",
            "/routes",
            Some(&tcp_route(lo, "tcpsvc").to_string()),
        );
        last = body;
        status == 200
    });
    assert!(
        routed,
        "port {lo} not routable: {last}\n{}",
        port_holders(lo)
    );
    assert_eq!(port_of(&last), lo);
    assert!(
        wait_for(|| std::net::TcpStream::connect(("127.0.0.1", lo)).is_ok()),
        "port {lo} not served"
    );
    assert_eq!(exchange(lo, b"y"), b"b1 y");
}

/// What `ss` says holds TCP `port` (for failure messages).
fn port_holders(port: u16) -> String {
    std::process::Command::new("ss")
        .args(["-tanp", &format!("( sport = :{port} )")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("ss: {e}"))
}

fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A TCP route connection is long-lived: the router turns TCP keepalive on for it (its side
/// of the client connection here), so a client that vanishes without a FIN is noticed
/// instead of holding the connection and its backend's for good.
#[test]
fn tcp_route_connections_have_keepalive() {
    let router = tcp_router();
    let b1 = TcpBackend::start("b1");
    let route = router.add_route(tcp_route(0, "kasvc"));
    let port = port_of(&route);
    set_tcp_backends(&router, "kasvc", &[&b1]);
    let mut s = connect(port);
    s.write_all(b"x").unwrap();
    let filter = format!("( sport = :{port} )");
    let mut last = String::new();
    for _ in 0..40 {
        let out = std::process::Command::new("ss")
            .args(["-tnoH", "state", "established", &filter])
            .output()
            .expect("ss (iproute2)");
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        if last.contains("keepalive") {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no keepalive timer on the router's side of the connection: {last:?}");
}
