//! Streaming responses and client cancellation (spec §1.6, §1.10).

use crate::support::handlers::{hold, HoldEvent};
use crate::support::{http_route, Backend, Conn, Reply, Router};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

/// A backend that writes `first` right away, then waits for a release (max 5 s) before
/// writing `rest`.
fn streaming_backend(first: &'static [u8], rest: &'static [u8]) -> (Backend, mpsc::Sender<()>) {
    let (tx, rx) = mpsc::channel::<()>();
    let rx = Mutex::new(rx);
    let b = Backend::with_handler("stream", move |_req, conn| {
        if conn.write(first).is_err() {
            return Reply::Close;
        }
        let _ = rx.lock().unwrap().recv_timeout(Duration::from_secs(5));
        let _ = conn.write(rest);
        Reply::KeepAlive
    });
    (b, tx)
}

#[test]
fn chunked_response_headers_and_first_byte_arrive_within_1s() {
    let router = Router::start();
    let (b, release) = streaming_backend(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Stream: yes\r\n\r\n1\r\na\r\n",
        b"3\r\nbcd\r\n0\r\n\r\n",
    );
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let mut conn = Conn::connect(router.http_addr);
    let t0 = Instant::now();
    conn.send(b"GET /stream HTTP/1.1\r\nHost: example.com\r\n\r\n");
    conn.set_read_timeout(Duration::from_secs(2));
    let head = conn
        .read_head()
        .expect("headers must be flushed while the body is open");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("x-stream"), Some("yes"));
    let mut trailers = Vec::new();
    let first = conn
        .read_chunk(&mut trailers)
        .expect("first chunk")
        .expect("not the last chunk");
    let elapsed = t0.elapsed();
    assert_eq!(first, b"a");
    assert!(
        elapsed < Duration::from_secs(1),
        "first byte after {elapsed:?}"
    );

    release.send(()).unwrap();
    let mut rest = Vec::new();
    while let Some(c) = conn.read_chunk(&mut trailers).expect("rest of body") {
        rest.extend(c);
    }
    assert_eq!(rest, b"bcd");
}

#[test]
fn content_length_response_first_byte_arrives_within_1s() {
    let router = Router::start();
    let (b, release) = streaming_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nw", b"xyz");
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let mut conn = Conn::connect(router.http_addr);
    let t0 = Instant::now();
    conn.send(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n");
    conn.set_read_timeout(Duration::from_secs(2));
    let head = conn.read_head().expect("headers flushed");
    assert_eq!(head.status, 200);
    let mut got = Vec::new();
    if head.header("transfer-encoding").is_some() {
        let mut t = Vec::new();
        got = conn.read_chunk(&mut t).expect("chunk").expect("data");
    } else {
        got.extend(conn.read_exact_n(1).expect("first body byte"));
    }
    let elapsed = t0.elapsed();
    assert_eq!(&got[..1], b"w");
    assert!(
        elapsed < Duration::from_secs(1),
        "first byte after {elapsed:?}"
    );
    release.send(()).unwrap();
}

#[test]
fn client_disconnect_mid_request_closes_backend_connection_within_10s() {
    let router = Router::start();
    let (tx, rx) = mpsc::channel();
    let b = Backend::with_handler("hold", hold(tx));
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);

    let mut conn = Conn::connect(router.http_addr);
    conn.send(b"GET /wait HTTP/1.1\r\nHost: example.com\r\n\r\n");
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(HoldEvent::Request(_, uri)) => assert_eq!(uri, "/wait"),
        other => panic!("backend did not get the request: {other:?}"),
    }
    let closed_at = Instant::now();
    drop(conn);
    match rx.recv_timeout(Duration::from_secs(12)) {
        Ok(HoldEvent::Closed(_, at)) => {
            let after = at.duration_since(closed_at);
            assert!(
                after < Duration::from_secs(10),
                "backend saw close after {after:?}"
            );
        }
        other => panic!("backend connection not closed after client disconnect: {other:?}"),
    }

    // The router still serves.
    let b2 = Backend::start("b2");
    router.set_backends("web", &[&b2]);
    assert_eq!(
        crate::support::get(router.http_addr, "example.com", "/").backend(),
        "b2"
    );
}
