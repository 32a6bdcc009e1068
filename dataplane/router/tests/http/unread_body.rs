//! Answers given before the client's request body was read (the router's own 404, 503, 400,
//! or a backend answering early): the client still reads them, because the router closes in
//! stages (RFC 9112 §9.6) instead of resetting a connection with unread input, and a client
//! that keeps sending is not held past the lingering bounds.

use crate::support::{http_route, Backend, Conn, Reply, Router};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const BODY: usize = 8 << 20;

/// Sends `POST /upload` with a `BODY`-byte body to `host` as a client that writes its whole
/// request before reading does, then reads the answer.
fn upload(router: &Router, host: &str) -> (Conn, crate::support::Response) {
    let head = format!("POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: {BODY}\r\n\r\n");
    send_then_read(router, head.as_bytes(), &vec![b'x'; BODY])
}

/// Writes `head` and then `body`, then reads one response. Fails on a write error, as curl
/// does ("Send failure: Connection reset by peer"): a connection closed with unread input is
/// reset.
fn send_then_read(router: &Router, head: &[u8], body: &[u8]) -> (Conn, crate::support::Response) {
    let mut conn = Conn::connect(router.http_addr);
    conn.stream
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    conn.send(head);
    conn.stream
        .write_all(body)
        .unwrap_or_else(|e| panic!("{:?}: upload refused: {e}", String::from_utf8_lossy(head)));
    conn.set_read_timeout(Duration::from_secs(10));
    let resp = conn.response();
    (conn, resp)
}

/// A client that writes its whole upload before reading gets the router's 404 (no route) or
/// 503 (no backends, or none that can be dialled), not a reset.
#[test]
fn an_own_answer_to_an_unread_upload_reaches_the_client() {
    let router = Router::start();
    router.add_route(http_route("empty.example.com", "none"));
    router.add_route(http_route("dead.example.com", "dead"));
    router.set_backend_addrs("dead", &[(crate::support::dead_addr().to_string(), false)]);
    for (host, status) in [
        ("nope.example.com", 404),
        ("empty.example.com", 503),
        ("dead.example.com", 503),
    ] {
        let (mut conn, resp) = upload(&router, host);
        assert_eq!(resp.status, status, "{host}: {resp:?}");
        assert!(resp.connection_has("close"), "{resp:?}");
        // The router's side is shut down after the answer.
        conn.expect_closed();
    }
}

/// The same for a 400 to a malformed chunked body, whether the bad chunk came with the head
/// or later, and for a refused head (431) with more behind it.
#[test]
fn a_400_to_a_bad_body_or_head_reaches_a_client_still_sending() {
    let router = Router::start();
    let b = Backend::raw("b", |_req, conn| {
        let _ = conn.wait_closed(Duration::from_secs(20));
        Reply::Close
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let chunked = "POST / HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n";
    // Well past the first read: found while the body streams to the backend.
    let mut late = b"4\r\nabcd\r\n".repeat(100_000);
    late.extend_from_slice(b"zz\r\n");
    late.resize(BODY, b'x');
    for (head, body, status) in [
        (format!("{chunked}zz\r\n"), vec![b'x'; BODY], 400),
        (chunked.to_string(), late, 400),
        (
            "GET / HTTP/1.1\r\nHost: example.com\r\nX-Big: ".to_string(),
            vec![b'a'; BODY],
            431,
        ),
    ] {
        let (mut conn, resp) = send_then_read(&router, head.as_bytes(), &body);
        assert_eq!(resp.status, status, "{head:?}: {resp:?}");
        conn.expect_closed();
    }
}

/// A backend that closes without an answer while the body is sent: the client gets the 503.
#[test]
fn a_503_for_a_backend_failing_mid_upload_reaches_the_client() {
    let router = Router::start();
    let b = Backend::raw("closer", |_req, _conn| Reply::Close);
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let (mut conn, resp) = upload(&router, "example.com");
    assert_eq!(resp.status, 503, "{resp:?}");
    conn.expect_closed();
}

/// A client that sent its body, got its answer and neither closes nor sends is closed after
/// the lingering timeout (5 s without a byte), not held for the lingering time (30 s).
#[test]
fn a_lingering_connection_whose_client_goes_quiet_closes_after_5_s() {
    let router = Router::start();
    let (mut conn, resp) = upload(&router, "nope.example.com");
    assert_eq!(resp.status, 404);
    let answered = Instant::now();
    // The router's FIN comes at once ...
    conn.expect_closed();
    // ... and it goes on reading (a byte sent now would restart its 5 s wait) until the
    // client has been quiet for 5 s: then a byte sent is refused.
    // (8 s: a late timer on a loaded machine must not make the probe restart the wait.)
    std::thread::sleep(Duration::from_secs(8).saturating_sub(answered.elapsed()));
    let refused = [b"x", b"y", b"z"].iter().any(|b| {
        let r = conn.stream.write_all(*b);
        std::thread::sleep(Duration::from_millis(100));
        r.is_err()
    });
    assert!(refused, "the connection is still open 8 s after the answer");
}

/// A client that keeps trickling its body in is cut off after `--lingering-time-secs`.
#[test]
fn a_client_that_keeps_sending_is_cut_off_after_the_lingering_time() {
    let router = Router::builder().arg("--lingering-time-secs=1").start();
    let mut conn = Conn::connect(router.http_addr);
    // Measured from before the request: the lingering time starts at the answer.
    let start = Instant::now();
    conn.send(b"POST / HTTP/1.1\r\nHost: nope.example.com\r\nContent-Length: 100000000\r\n\r\n");
    assert_eq!(conn.response().status, 404);
    let mut cut = None;
    while start.elapsed() < Duration::from_secs(10) {
        if conn.stream.write(&[b'x'; 1024]).is_err() {
            cut = Some(start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let cut = cut.expect("still taking the body 10 s after the answer");
    assert!(
        cut > Duration::from_millis(700) && cut < Duration::from_secs(4),
        "cut off after {cut:?}"
    );
}

/// However fast a client sends, the router discards at most 64 MiB of it.
#[test]
fn a_client_that_keeps_sending_fast_is_cut_off_after_64_mib() {
    let router = Router::start();
    let mut conn = Conn::connect(router.http_addr);
    conn.send(b"POST / HTTP/1.1\r\nHost: nope.example.com\r\nContent-Length: 10000000000\r\n\r\n");
    let (sent, took) = crate::support::write_until_refused(&mut conn.stream, 1 << 30);
    assert!(
        (64 << 20..200 << 20).contains(&sent),
        "{sent} bytes taken in {took:?}"
    );
}

/// A backend that refuses an upload before reading it (Go's `MaxBytesReader` 413, a 401)
/// and closes: its answer reaches the client, not a 503.
#[test]
fn a_backends_early_answer_to_an_upload_is_relayed() {
    let router = Router::start();
    let b = Backend::raw("refuser", |_req, conn| {
        let _ = conn.write(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        Reply::Close
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let (mut conn, resp) = upload(&router, "example.com");
    assert_eq!(resp.status, 413, "{resp:?}");
    assert!(resp.connection_has("close"), "{resp:?}");
    conn.expect_closed();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(b.request_count(), 1, "an early answer is not a retry");
}

/// A backend that answers early and then neither reads nor closes: the body write times out
/// (here after the 1 s idle timeout), the answer is relayed, and the core goes on serving
/// (the timed-out write took the buffer with it; the router used to panic on it).
#[test]
fn an_early_answer_after_a_timed_out_body_write_is_relayed() {
    let router = Router::builder().arg("--idle-timeout-secs=1").start();
    let b = Backend::raw("stalls", |_req, conn| {
        let _ = conn.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n");
        std::thread::sleep(Duration::from_secs(4));
        Reply::Close
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let (mut conn, resp) = upload(&router, "example.com");
    assert_eq!(resp.status, 401, "{resp:?}");
    assert!(resp.connection_has("close"), "{resp:?}");
    conn.expect_closed();
    // Every core still answers.
    for _ in 0..8 {
        let mut c = Conn::connect(router.http_addr);
        c.set_read_timeout(Duration::from_secs(5));
        c.send(b"GET / HTTP/1.1\r\nHost: nope.example.com\r\n\r\n");
        assert_eq!(c.response().status, 404);
    }
}

/// A backend that answers at once and then reads the body is served as before: the answer
/// is relayed once the body is sent, and the connection stays open.
#[test]
fn a_backend_that_answers_early_and_reads_the_body_keeps_the_connection() {
    let router = Router::start();
    let b = Backend::raw("early", |req, conn| {
        let _ = conn.write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok");
        let n: usize = req.header("content-length").unwrap().parse().unwrap();
        // Exactly the body: the router may send its next request while the end of this
        // body is still unread here.
        let mut got = conn.take_buffered().len();
        let mut tmp = vec![0u8; 64 << 10];
        while got < n {
            let want = tmp.len().min(n - got);
            match conn.stream.read(&mut tmp[..want]) {
                Ok(k) if k > 0 => got += k,
                _ => return Reply::Close,
            }
        }
        Reply::KeepAlive
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let (mut conn, resp) = upload(&router, "example.com");
    assert_eq!((resp.status, resp.text().as_str()), (201, "ok"), "{resp:?}");
    assert!(!resp.connection_has("close"), "{resp:?}");
    let resp = conn.request("GET / HTTP/1.1\r\nHost: example.com\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(resp.status, 201);
}

/// A client whose response closes the connection (a body the backend ends by closing), and
/// that has sent more meanwhile (a pipelined request the router will not serve), reads the
/// whole response: the router lingers over the bytes it leaves unread instead of closing
/// over them, which would make the kernel reset the connection and drop the response's
/// unsent tail.
#[test]
fn bytes_sent_during_a_closing_response_do_not_reset_it() {
    const BIG: usize = 32 << 20;
    let router = Router::start();
    // A body ended by the close (no length): the router closes the client's connection too.
    let big = Backend::with_handler("big", |_req, conn| {
        let _ = conn.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
        let _ = conn.write(&vec![b'y'; BIG]);
        Reply::Close
    });
    router.add_route(http_route("big.example.com", "big"));
    router.set_backends("big", &[&big]);
    let mut conn = Conn::connect(router.http_addr);
    conn.send(b"GET /big HTTP/1.1\r\nHost: big.example.com\r\n\r\n");
    // The response fills both socket buffers while the client does not read; what the
    // client sends now waits in the router's socket, unread.
    std::thread::sleep(Duration::from_millis(300));
    conn.send(b"GET /more HTTP/1.1\r\nHost: big.example.com\r\n\r\n");
    std::thread::sleep(Duration::from_millis(200));
    conn.set_read_timeout(Duration::from_secs(10));
    let resp = conn
        .try_response()
        .unwrap_or_else(|e| panic!("response cut short: {e}"));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body.len(), BIG);
    assert!(resp.body.iter().all(|&b| b == b'y'));
    conn.expect_closed();
}
