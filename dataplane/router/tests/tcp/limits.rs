//! Limits on TCP route connections: the per-core connection cap they share with HTTP,
//! and a reset on one side ending both, without losing what was already relayed.

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
/// connection too, at once: the backend reads a FIN, and the router holds neither socket
/// (the backend's next writes fail; the router's kernel resets them). A silent backend
/// used to keep both sockets for the tunnel timeout after a half-close. Both directions,
/// on both I/O drivers.
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
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
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
    // The silent side's socket (the backend's, or the client's when the backend resets),
    // kept open to the end: only the router may close that connection.
    let mut silent = if client_resets {
        std::thread::sleep(Duration::from_millis(100));
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        let reset_at = Instant::now();
        drop(c);
        let (end, at, s) = rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("{label}: the backend's connection is still open"));
        assert_eq!(end, Ok(0), "{label}: the backend's read ended with a FIN");
        // 3 s: at once, with room for a loaded machine (before, never: the tunnel
        // timeout, an hour).
        assert!(at - reset_at < Duration::from_secs(3), "{label}");
        s
    } else {
        let (_, reset_at, s) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        // Reset now (SO_LINGER 0 is set).
        drop(s);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 16];
        let r = c.read(&mut b).map_err(|e| e.kind());
        assert_eq!(r, Ok(0), "{label}: the client's read ended with a FIN");
        assert!(reset_at.elapsed() < Duration::from_secs(3), "{label}");
        c
    };
    // Before, the router held both sockets for the tunnel timeout (an hour); a lingering
    // close that waited for the silent side's FIN would end at its 5 s bound.
    assert!(
        wait_until(Duration::from_secs(3), || router
            .metric("tcp_connections_active")
            == 0),
        "{label}: still open"
    );
    // The router closed its socket: the silent side's writes are answered with a reset.
    assert!(
        writes_fail(&mut silent, Duration::from_secs(2)),
        "{label}: the router still holds the silent side's connection"
    );
}

/// Whether writes to `s` fail (the peer's socket is closed: a reset answered the first)
/// within `limit`.
fn writes_fail(s: &mut std::net::TcpStream, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if s.write_all(b"late").is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// What a TCP route's backend sent before it reset its connection reaches the client in
/// full, then a FIN: the router, reading the reset after the data, ends the client's
/// connection behind what it already relayed. (It used to abort the client's connection
/// too, which dropped what was still queued to it: the end of, say, a database's
/// "FATAL: auth failed" before it reset.) 256 KiB to a client with a small receive
/// buffer that reads slowly, so most of it is still on its way when the reset comes;
/// both I/O drivers.
#[test]
fn data_relayed_before_a_reset_is_not_lost() {
    for driver in ["io_uring", "epoll"] {
        relayed_before_a_reset(driver, false);
    }
}

/// As [`data_relayed_before_a_reset_is_not_lost`], with a client that keeps sending
/// throughout (as a client whose backend reset over its unread input typically is, or a
/// WebSocket pinging): the router keeps reading and dropping what it sends until the
/// client has everything, FIN included. (It used to shut the client's connection down
/// both ways at the reset, and the kernel answers data arriving after that with a reset,
/// dropping what was still queued to the client.)
#[test]
fn data_relayed_before_a_reset_reaches_a_client_that_keeps_sending() {
    for driver in ["io_uring", "epoll"] {
        relayed_before_a_reset(driver, true);
    }
}

fn relayed_before_a_reset(driver: &str, client_sends: bool) {
    const LEN: usize = 256 << 10;
    let router = Router::builder().threads(1).tcp().io_driver(driver).start();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let backend = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        // Takes what the client sends (so the router keeps reading it), until the reset.
        let mut input = s.try_clone().unwrap();
        let drain = std::thread::spawn(move || {
            let mut b = [0u8; 16 << 10];
            while matches!(input.read(&mut b), Ok(n) if n > 0) {}
        });
        let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
        s.write_all(&data).unwrap();
        // Only once the router's kernel has all of it (a reset drops what is unsent),
        // then a reset: SO_LINGER 0, close.
        let start = Instant::now();
        while flynn_runtime::sock::unacked(std::os::fd::AsRawFd::as_raw_fd(&s)).unwrap() > 0 {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the router did not take the data"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        // Ends the drain's read (its descriptor must go before the close resets).
        s.shutdown(std::net::Shutdown::Read).unwrap();
        drain.join().unwrap();
        drop(s);
    });
    let port = port_of(&router.add_route(tcp_route(0, "resets")));
    router.set_backend_addrs("resets", &[(addr.to_string(), false)]);
    // A small receive buffer: most of the data waits in the router's send queue.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let to: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    sock.connect_timeout(&to.into(), Duration::from_secs(5))
        .unwrap();
    let mut c: std::net::TcpStream = sock.into();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // A client that sends: 16 KiB before each read, blocking (a small send buffer), as a
    // one-threaded client does; it stops at its first failed write. It reads nothing
    // while a write waits: the router must go on reading it, or neither gets anywhere.
    if client_sends {
        socket2::SockRef::from(&c)
            .set_send_buffer_size(4096)
            .unwrap();
        c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let mut sending = client_sends;
    let mut sent = 0usize;
    let mut got = Vec::with_capacity(LEN);
    let mut b = [0u8; 4096];
    let end = loop {
        if sending {
            match c.write_all(&[b'c'; 16 << 10]) {
                Ok(()) => sent += 16 << 10,
                Err(_) => sending = false,
            }
        }
        match c.read(&mut b) {
            Ok(0) => break Ok(()),
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) => break Err(e.kind()),
        }
        // Slowly, until the backend has reset.
        if !backend.is_finished() {
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    backend.join().unwrap();
    assert_eq!(
        (got.len(), end),
        (LEN, Ok(())),
        "{driver}: the client got {} bytes of {LEN}, then {end:?}",
        got.len()
    );
    assert!(
        got.iter().enumerate().all(|(i, &v)| v == (i % 251) as u8),
        "{driver}: corrupted"
    );
    assert!(
        !client_sends || sent >= 512 << 10,
        "{driver}: the client sent only {sent} bytes"
    );
    assert!(
        wait_until(Duration::from_secs(2), || router
            .metric("tcp_connections_active")
            == 0),
        "{driver}: still open"
    );
}
