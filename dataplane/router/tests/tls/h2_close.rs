//! When the router ends HTTP/2 connections: after the idle timeout with no stream open,
//! and at once (GOAWAY, then close once the streams are done) when a handover drains the
//! old process. Driven by a raw h2c client so every frame the router sends is seen.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::h2_wire::{frame, H2c, DATA, HEADERS, RST_STREAM};
use crate::support::{http_route, Backend, BackendConn, Reply, Router, SeenRequest};

/// A backend that answers after `delay`.
fn slow_backend(delay: Duration) -> Backend {
    Backend::with_handler("slow", move |req: &SeenRequest, conn: &mut BackendConn| {
        std::thread::sleep(delay);
        crate::support::handlers::echo(req, conn);
        Reply::KeepAlive
    })
}

#[test]
fn idle_http2_connection_gets_goaway_and_is_closed_but_not_while_a_stream_is_open() {
    let router = Router::builder()
        .arg("--h2c-addr")
        .arg("127.0.0.1:0")
        .arg("--idle-timeout-secs")
        .arg("1")
        .start();
    // The request takes longer than the idle timeout: an open stream keeps it alive.
    let b = slow_backend(Duration::from_millis(2500));
    router.add_route(http_route("idle.example.com", "web"));
    router.set_backends("web", &[&b]);

    let mut c = H2c::connect(router.h2c_addrs[0]);
    c.get(1, "idle.example.com");
    let seen = c.run(Duration::from_secs(10));
    let (id, answered) = *seen
        .responses
        .first()
        .unwrap_or_else(|| panic!("no response: {seen:?}"));
    assert_eq!(id, 1);
    assert!(answered >= Duration::from_millis(2400), "{seen:?}");
    let goaway = seen.goaway.unwrap_or_else(|| panic!("no GOAWAY: {seen:?}"));
    assert!(
        goaway >= answered + Duration::from_millis(900),
        "GOAWAY before the connection was idle for the timeout: {seen:?}"
    );
    assert!(
        goaway <= answered + Duration::from_secs(4),
        "GOAWAY late: {seen:?}"
    );
    let closed = seen
        .closed
        .unwrap_or_else(|| panic!("not closed: {seen:?}"));
    assert!(closed >= goaway, "{seen:?}");
}

/// An HTTP/2 connection that sends its preface and SETTINGS but no request is closed
/// (GOAWAY, then EOF) at the header timeout, as an HTTP/1.1 one is, not held for the idle
/// timeout; one that has had a stream idles under the idle timeout.
#[test]
fn an_http2_connection_without_a_stream_is_closed_at_the_header_timeout() {
    let router = Router::builder()
        .arg("--h2c-addr")
        .arg("127.0.0.1:0")
        .arg("--header-timeout-secs")
        .arg("2")
        .arg("--idle-timeout-secs")
        .arg("30")
        .start();
    let b = crate::support::Backend::start("b1");
    router.add_route(http_route("h2.example.com", "web"));
    router.set_backends("web", &[&b]);

    let mut served = H2c::connect(router.h2c_addrs[0]);
    served.get(1, "h2.example.com");
    let mut quiet = H2c::connect(router.h2c_addrs[0]);
    let seen = quiet.run(Duration::from_secs(10));
    let goaway = seen.goaway.unwrap_or_else(|| panic!("no GOAWAY: {seen:?}"));
    let closed = seen
        .closed
        .unwrap_or_else(|| panic!("not closed: {seen:?}"));
    assert!(
        goaway >= Duration::from_millis(1900) && closed < Duration::from_secs(6),
        "{seen:?}"
    );
    assert!(seen.responses.is_empty(), "{seen:?}");
    // Past the header timeout, the connection that had a stream is still open.
    let seen = served.run(Duration::from_secs(4));
    assert_eq!(seen.responses.first().map(|r| r.0), Some(1), "{seen:?}");
    assert!(seen.goaway.is_none() && seen.closed.is_none(), "{seen:?}");
}

#[test]
fn handover_sends_goaway_to_http2_clients_and_the_old_process_exits_without_the_drain_timeout() {
    let dir = crate::support::TestDir::new("h2-handover");
    let sock = dir.join("upgrade.sock");
    let b = Backend::start("b1");
    let mut old = Router::builder()
        .arg("--h2c-addr")
        .arg("127.0.0.1:0")
        .arg("--upgrade-socket")
        .arg(sock.display().to_string())
        .arg("--drain-grace-secs")
        .arg("1")
        .arg("--drain-timeout-secs")
        .arg("60")
        .start();
    old.add_route(http_route("h2.example.com", "web"));
    old.set_backends("web", &[&b]);

    // One finished request, then the connection idles (well inside the idle timeout).
    let mut c = H2c::connect(old.h2c_addrs[0]);
    c.get(1, "h2.example.com");
    let client = std::thread::spawn(move || c.run(Duration::from_secs(20)));
    std::thread::sleep(Duration::from_millis(300));

    let taken = Instant::now();
    let new = Router::builder()
        .arg("--takeover")
        .arg(sock.display().to_string())
        .arg("--upgrade-socket")
        .arg(dir.join("next.sock").display().to_string())
        .start();
    let status = old.wait_exit(Duration::from_secs(15));
    let exited = taken.elapsed();
    let seen = client.join().unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "old router did not exit within 15 s (drain timeout 60 s): {seen:?}"
    );
    assert!(exited < Duration::from_secs(15), "{exited:?}");
    assert_eq!(seen.responses.len(), 1, "{seen:?}");
    assert!(
        seen.goaway.is_some(),
        "no GOAWAY from the draining router: {seen:?}"
    );
    assert!(seen.closed.is_some(), "connection left open: {seen:?}");
    // The new process serves HTTP/2 on the same address.
    assert_eq!(new.h2c_addrs, old.h2c_addrs);
    let mut c = H2c::connect(new.h2c_addrs[0]);
    c.get(1, "h2.example.com");
    let seen = c.run(Duration::from_secs(3));
    assert_eq!(seen.responses.first().map(|r| r.0), Some(1), "{seen:?}");
}

/// A raw HTTP/1.1 backend: the one connection the router makes to it.
fn raw_backend() -> (std::net::TcpListener, String) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

/// Reads from `s` until `needle` has arrived (or panics after 10 s).
fn read_until(s: &mut TcpStream, got: &mut Vec<u8>, needle: &[u8]) {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut chunk = [0u8; 4096];
    while !got.windows(needle.len()).any(|w| w == needle) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no {needle:?} in {got:?}"
        );
        match s.read(&mut chunk) {
            Ok(0) => panic!("closed before {needle:?}: {got:?}"),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
    }
}

#[test]
fn a_stream_the_client_resets_drops_its_backend_request() {
    let router = Router::builder()
        .arg("--h2c-addr")
        .arg("127.0.0.1:0")
        .start();
    let (backend, addr) = raw_backend();
    router.add_route(http_route("reset.example.com", "web"));
    router.set_backend_addrs("web", &[(addr, false)]);

    let mut c = H2c::connect(router.h2c_addrs[0]);
    c.get(1, "reset.example.com");
    // The backend has the request and does not answer; the client gives up on it.
    let (mut up, _) = backend.accept().unwrap();
    read_until(&mut up, &mut Vec::new(), b"\r\n\r\n");
    c.s.write_all(&frame(RST_STREAM, 0, 1, &8u32.to_be_bytes()))
        .unwrap();
    // The router closes its backend connection then, not after the response timeout.
    up.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 64];
    match up.read(&mut b) {
        Ok(0) => {}
        other => panic!("backend connection still open 5 s after the reset: {other:?}"),
    }
}

#[test]
fn an_empty_final_data_frame_is_not_sent_as_a_second_last_chunk() {
    let router = Router::builder()
        .arg("--h2c-addr")
        .arg("127.0.0.1:0")
        .start();
    let (backend, addr) = raw_backend();
    router.add_route(http_route("post.example.com", "web"));
    router.set_backend_addrs("web", &[(addr, false)]);

    let mut c = H2c::connect(router.h2c_addrs[0]);
    // POST without a length (HPACK: indexed `:method POST`, `:scheme http`, `:path /`,
    // literal `:authority`), END_HEADERS only; the body "abc", then an empty DATA frame
    // with END_STREAM (as Go's client ends a body of unknown length).
    let host = "post.example.com";
    let mut block = vec![0x83, 0x86, 0x84, 0x41, host.len() as u8];
    block.extend_from_slice(host.as_bytes());
    c.s.write_all(&frame(HEADERS, 0x4, 1, &block)).unwrap();
    c.s.write_all(&frame(DATA, 0, 1, b"abc")).unwrap();
    c.s.write_all(&frame(DATA, 0x1, 1, b"")).unwrap();

    let (mut up, _) = backend.accept().unwrap();
    let mut got = Vec::new();
    read_until(&mut up, &mut got, b"0\r\n\r\n");
    up.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        .unwrap();
    // Nothing follows the body's one terminator.
    std::thread::sleep(Duration::from_millis(300));
    up.set_nonblocking(true).unwrap();
    let mut rest = [0u8; 64];
    if let Ok(n) = up.read(&mut rest) {
        got.extend_from_slice(&rest[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    assert!(text.contains("Transfer-Encoding: chunked"), "{text}");
    assert_eq!(body, "3\r\nabc\r\n0\r\n\r\n", "{text}");
    let seen = c.run(Duration::from_secs(2));
    assert_eq!(seen.responses.first().map(|r| r.0), Some(1), "{seen:?}");
}
