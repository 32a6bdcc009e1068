//! The response header timeout is one deadline for the backend's whole response head,
//! interim (1xx) heads included, as Go's `ResponseHeaderTimeout`: a backend that sends
//! 103 Early Hints without end, or trickles its head, cannot hold a request for ever.
//! With a 2 s timeout the 503 must come within 6 s (room for a loaded machine): a timer
//! started again at each interim head or byte held the request until the backend gave up,
//! 20 s.

use std::time::{Duration, Instant};

use crate::support::{http_route, Backend, BackendConn, Conn, Reply, Router, SeenRequest};

/// Sends `first`, then `chunk` every `every` until the router closes the connection (or
/// 20 s pass).
fn drip(
    first: &'static [u8],
    chunk: &'static [u8],
    every: Duration,
) -> impl Fn(&SeenRequest, &mut BackendConn) -> Reply + Send + Sync + 'static {
    move |_req, conn| {
        if conn.write(first).is_err() {
            return Reply::Close;
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if conn.write(chunk).is_err() {
                break;
            }
            std::thread::sleep(every);
        }
        Reply::Close
    }
}

const HINT: &[u8] = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n";

fn router_with(backend: &Backend) -> Router {
    let router = Router::builder()
        .arg("--response-header-timeout-secs")
        .arg("2")
        .start();
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[backend]);
    router
}

/// Reads responses until a final one; returns it, how many interim ones came, and when.
fn final_after_interims(conn: &mut Conn) -> (u16, usize, Duration) {
    let start = Instant::now();
    conn.set_read_timeout(Duration::from_secs(10));
    let mut interims = 0;
    loop {
        let resp = conn.response();
        if resp.status / 100 != 1 || resp.status == 101 {
            return (resp.status, interims, start.elapsed());
        }
        interims += 1;
    }
}

/// The router's 503, at the 2 s response header timeout (not before it, and well before the
/// 20 s the test backends give up after).
fn assert_503_at_the_timeout(status: u16, took: Duration) {
    assert_eq!(status, 503);
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "503 after {took:?}, timeout 2 s"
    );
}

#[test]
fn endless_early_hints_end_in_a_503_at_the_response_header_timeout() {
    let b = Backend::with_handler("hints", drip(b"", HINT, Duration::from_millis(500)));
    let router = router_with(&b);
    let mut conn = Conn::connect(router.http_addr);
    conn.send(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n");
    let (status, interims, took) = final_after_interims(&mut conn);
    assert!(interims >= 2, "{interims} interim responses relayed");
    assert_503_at_the_timeout(status, took);
}

#[test]
fn a_trickled_response_head_ends_in_a_503_at_the_response_header_timeout() {
    let b = Backend::with_handler(
        "trickle",
        drip(
            b"HTTP/1.1 200 OK\r\nX-Slow: ",
            b"a",
            Duration::from_millis(300),
        ),
    );
    let router = router_with(&b);
    let mut conn = Conn::connect(router.http_addr);
    // A head that grows a byte at a time and never ends.
    conn.send(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n");
    let (status, _, took) = final_after_interims(&mut conn);
    assert_503_at_the_timeout(status, took);
}

/// The same deadline holds for the answer to an upgrade request.
#[test]
fn endless_early_hints_to_an_upgrade_end_in_a_503_at_the_response_header_timeout() {
    let b = Backend::with_handler("hints", drip(b"", HINT, Duration::from_millis(500)));
    let router = router_with(&b);
    let mut conn = Conn::connect(router.http_addr);
    conn.send(
        b"GET /ws HTTP/1.1\r\nHost: example.com\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    let (status, interims, took) = final_after_interims(&mut conn);
    assert!(interims >= 2, "{interims} interim responses relayed");
    assert_503_at_the_timeout(status, took);
}
