//! Limits on TCP route connections: the per-core connection cap they share with HTTP,
//! and a reset on one side ending both.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::support::{tcp_route, wait_until, Router, TcpBackend};
use crate::{connect, exchange, port_of, set_tcp_backends};

/// `--max-conns-per-core` counts TCP route connections as it counts HTTP ones: with one
/// core and a cap of 10, 50 connections to a TCP route leave 10 open and the other 40
/// closed unserved, and an HTTP connection is refused too while the cap is reached.
/// (Before, TCP route connections were not counted at all: a flood of them could use up
/// the process's descriptors, HTTP listeners included.)
#[test]
fn tcp_route_connections_count_against_the_per_core_cap() {
    let router = Router::builder()
        .threads(1)
        .tcp()
        .arg("--max-conns-per-core")
        .arg("10")
        .start();
    // Reads until EOF: holds every connection the router opens to it.
    let b1 = TcpBackend::start("b1");
    let port = port_of(&router.add_route(tcp_route(0, "capped")));
    set_tcp_backends(&router, "capped", &[&b1]);
    let mut conns: Vec<_> = (0..50).map(|_| connect(port)).collect();
    assert!(
        wait_until(Duration::from_secs(5), || router
            .metric("connections_rejected_total")
            == 40),
        "rejected: {}",
        router.metric("connections_rejected_total")
    );
    assert_eq!(router.metric("tcp_connections_active"), 10);
    assert_eq!(router.metric("tcp_connections_total"), 10);
    assert!(wait_until(Duration::from_secs(5), || b1.accepted() == 10));
    // The 40 past the cap are closed; the 10 within it stay open.
    let mut closed = 0;
    for c in conns.iter_mut() {
        c.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut b = [0u8; 16];
        match c.read(&mut b) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            Ok(n) => panic!("unexpected {n} bytes"),
            Err(_) => {}
        }
    }
    assert_eq!(closed, 40);
    // HTTP shares the cap.
    let mut http = crate::support::Conn::connect(router.http_addr);
    http.set_read_timeout(Duration::from_secs(2));
    http.expect_closed();
    assert_eq!(router.metric("connections_rejected_total"), 41);
    // Closing connections makes room again.
    conns.clear();
    assert!(wait_until(Duration::from_secs(5), || router
        .metric("tcp_connections_active")
        == 0));
    assert_eq!(exchange(port, b"again"), b"b1 again");
}

/// A client that resets its TCP route connection (SO_LINGER 0, close) ends the backend's
/// connection too, with a reset, at once: a silent backend no longer keeps both sockets
/// for the tunnel timeout after a half-close. Both directions, on both I/O drivers.
#[test]
fn a_reset_on_one_side_of_a_tcp_route_connection_closes_both() {
    for driver in ["io_uring", "epoll"] {
        for client_resets in [true, false] {
            reset_closes_both(driver, client_resets);
        }
    }
}

fn reset_closes_both(driver: &str, client_resets: bool) {
    let router = Router::builder().threads(1).tcp().io_driver(driver).start();
    // Never writes or closes on its own: reports what its read ended with, and when, and
    // hands its socket over (kept open).
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = l.accept() else { return };
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        if !client_resets {
            // Wait for the client's byte, then reset this side.
            let _ = s.read(&mut buf);
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            let _ = tx.send((Ok(0), Instant::now(), s));
            return;
        }
        let end = loop {
            match s.read(&mut buf) {
                Ok(0) => break Ok(0),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break Err(e.kind()),
            }
        };
        let _ = tx.send((end, Instant::now(), s));
    });
    let port = port_of(&router.add_route(tcp_route(0, "silent")));
    router.set_backend_addrs("silent", &[(addr.to_string(), false)]);
    let mut c = connect(port);
    c.write_all(b"x").unwrap();
    assert!(wait_until(Duration::from_secs(5), || router
        .metric("tcp_connections_active")
        == 1));
    let label = format!("{driver}, client resets: {client_resets}");
    // The backend's socket, kept open to the end: only the router may close it (the
    // client's is, when the backend resets).
    let mut held = None;
    if client_resets {
        std::thread::sleep(Duration::from_millis(100));
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        let reset_at = Instant::now();
        drop(c);
        let (end, at, s) = rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("{label}: the backend's connection is still open"));
        held = Some(s);
        assert_eq!(
            end,
            Err(std::io::ErrorKind::ConnectionReset),
            "{label}: the reset is passed on"
        );
        assert!(at - reset_at < Duration::from_secs(1), "{label}");
    } else {
        let (_, reset_at, s) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        // Reset now (SO_LINGER 0 is set).
        drop(s);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 16];
        let r = c.read(&mut b);
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{label}: the client's read got {r:?}, not the backend's reset"
        );
        assert!(reset_at.elapsed() < Duration::from_secs(1), "{label}");
    }
    assert!(
        wait_until(Duration::from_secs(1), || router
            .metric("tcp_connections_active")
            == 0),
        "{label}: still open"
    );
    drop(held);
}
