//! Message framing: limits, malformed input, chunked bodies and trailers, large bodies.

use crate::setup;
use crate::support::backend::respond;
use crate::support::{http_route, Backend, Conn, Reply, Router};
use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::Duration;

#[test]
fn request_head_over_64k_is_431() {
    let (router, b1) = setup("example.com");
    let mut conn = Conn::connect(router.http_addr);
    let big = "a".repeat(70 * 1024);
    // The router may answer before reading everything; ignore write errors.
    let _ = conn.try_send(
        format!("GET / HTTP/1.1\r\nHost: example.com\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    );
    let resp = conn.try_response().expect("a 431 response");
    assert_eq!(resp.status, 431, "{resp:?}");
    assert_eq!(b1.request_count(), 0);
}

#[test]
fn a_head_in_pieces_is_parsed_at_its_end_and_limits_still_hold() {
    let (router, b1) = setup("example.com");
    // Split everywhere, including inside the final empty line; a pipelined request follows.
    let head = "GET /one HTTP/1.1\r\nHost: example.com\r\nX-A: 1\r\n\r\n";
    let mut conn = Conn::connect(router.http_addr);
    for piece in head.as_bytes().chunks(3) {
        conn.send(piece);
        std::thread::sleep(Duration::from_millis(2));
    }
    let resp = conn.response();
    assert_eq!((resp.status, resp.seen().uri.as_str()), (200, "/one"));
    for piece in [&b"GET /two HTTP/1.1\r\nHost: example.com\n"[..], b"\n"] {
        conn.send(piece);
        std::thread::sleep(Duration::from_millis(20));
    }
    let resp = conn.response();
    assert_eq!((resp.status, resp.seen().uri.as_str()), (200, "/two"));
    assert_eq!(b1.request_count(), 2);

    // Malformed after the first read: answered once the head is complete.
    let mut conn = Conn::connect(router.http_addr);
    conn.send(b"GET / HTTP/1.1\r\nHost: example.com\r\n");
    std::thread::sleep(Duration::from_millis(20));
    conn.send(b"Bad Header\r\n");
    std::thread::sleep(Duration::from_millis(20));
    conn.send(b"\r\n");
    assert_eq!(conn.response().status, 400);

    // A head that trickles past the limit without ending is still 431.
    let mut conn = Conn::connect(router.http_addr);
    conn.send(b"GET / HTTP/1.1\r\nHost: example.com\r\n");
    let line = format!("X-Big: {}\r\n", "a".repeat(1000));
    for _ in 0..70 {
        if conn.try_send(line.as_bytes()).is_err() {
            break;
        }
    }
    assert_eq!(conn.try_response().expect("a 431").status, 431);
    assert_eq!(b1.request_count(), 2);
}

#[test]
fn request_head_just_under_limit_is_proxied() {
    let (router, b1) = setup("example.com");
    let big = "a".repeat(60 * 1024);
    let resp = Conn::connect(router.http_addr).request(&format!(
        "GET / HTTP/1.1\r\nHost: example.com\r\nX-Big: {big}\r\n\r\n"
    ));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.seen().header("x-big").map(str::len), Some(big.len()));
    assert_eq!(b1.request_count(), 1);
}

#[test]
fn malformed_requests_are_400() {
    let (router, b1) = setup("example.com");
    let cases = [
        "GARBAGE\r\n\r\n",
        "GET / HTTP/1.1\r\nHost example.com\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: example.com\r\nContent-Length: abc\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: example.com\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        "GET / HTTP/9.9\r\nHost: example.com\r\n\r\n",
    ];
    for raw in cases {
        let mut conn = Conn::connect(router.http_addr);
        let _ = conn.try_send(raw.as_bytes());
        let resp = conn
            .try_response()
            .unwrap_or_else(|e| panic!("{raw:?}: no response ({e})"));
        assert!(
            resp.status == 400 || (raw.contains("HTTP/9.9") && resp.status == 505),
            "{raw:?} -> {resp:?}"
        );
    }
    assert_eq!(
        b1.request_count(),
        0,
        "nothing malformed may reach the backend"
    );
}

#[test]
fn content_length_with_transfer_encoding_is_400() {
    let (router, b1) = setup("example.com");
    let mut conn = Conn::connect(router.http_addr);
    let _ = conn.try_send(
        b"POST / HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\n\
          Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    let resp = conn.try_response().expect("a 400 response");
    assert_eq!(resp.status, 400, "{resp:?}");
    assert_eq!(b1.request_count(), 0);
}

#[test]
fn chunked_request_body_is_forwarded() {
    let (router, b1) = setup("example.com");
    let resp = Conn::connect(router.http_addr).request(
        "POST /upload HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n\
         5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
    );
    let seen = resp.seen();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.body, b"hello world");
    assert_eq!(b1.request_count(), 1);
}

#[test]
fn chunked_request_trailers_are_forwarded() {
    let (router, _b1) = setup("example.com");
    let resp = Conn::connect(router.http_addr).request(
        "POST / HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n\
         3\r\nabc\r\n0\r\nX-Sum: 42\r\n\r\n",
    );
    let seen = resp.seen();
    assert_eq!(seen.body, b"abc");
    assert_eq!(
        seen.trailers,
        [("X-Sum".to_string(), "42".to_string())],
        "{seen:?}"
    );
}

#[test]
fn chunked_request_body_is_streamed_to_backend() {
    let router = Router::start();
    let (tx, rx) = mpsc::channel::<()>();
    let tx = std::sync::Mutex::new(tx);
    let b1 = Backend::raw("b1", move |_req, conn| {
        // Body not read yet: wait for the first chunk to arrive before the client sends more.
        if conn.read_until(b"first").is_err() {
            return Reply::Close;
        }
        let _ = tx.lock().unwrap().send(());
        if conn.read_until(b"0\r\n\r\n").is_err() {
            return Reply::Close;
        }
        respond(conn, "200 OK", &[], b"streamed");
        Reply::KeepAlive
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b1]);
    let mut conn = Conn::connect(router.http_addr);
    conn.send(
        b"POST / HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n",
    );
    rx.recv_timeout(Duration::from_secs(3))
        .expect("backend must receive the first chunk while the client still sends the body");
    conn.send(b"6\r\nsecond\r\n0\r\n\r\n");
    let resp = conn.response();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, b"streamed");
}

#[test]
fn chunked_response_with_trailers_is_relayed() {
    let router = Router::start();
    let b1 = Backend::with_handler("b1", |_req, conn| {
        let _ = conn.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n\
              5\r\nhello\r\n7\r\n, world\r\n0\r\nX-Checksum: abc123\r\n\r\n",
        );
        Reply::KeepAlive
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b1]);
    let mut conn = Conn::connect(router.http_addr);
    let resp = conn.request("GET / HTTP/1.1\r\nHost: example.com\r\nTE: trailers\r\n\r\n");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, b"hello, world");
    assert!(
        resp.chunked,
        "response with trailers must stay chunked: {resp:?}"
    );
    assert_eq!(
        resp.trailers,
        [("X-Checksum".to_string(), "abc123".to_string())],
        "{resp:?}"
    );
    // Framing stayed in sync.
    let resp = conn.request("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n");
    assert_eq!(resp.body, b"hello, world");
}

#[test]
fn large_bodies_both_ways() {
    let router = Router::start();
    let b1 = Backend::with_handler("b1", |req, conn| {
        let mut body = req.body.clone();
        body.reverse();
        respond(conn, "200 OK", &[], &body);
        Reply::KeepAlive
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b1]);
    let payload: Vec<u8> = (0..(2 << 20)).map(|i| b'a' + (i % 26) as u8).collect();
    let mut conn = Conn::connect(router.http_addr);
    let head = format!(
        "POST / HTTP/1.1\r\nHost: example.com\r\nContent-Length: {}\r\n\r\n",
        payload.len()
    );
    // Write from a thread so a router that answers early cannot deadlock the test.
    let mut w = conn.stream.try_clone().unwrap();
    let body = payload.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(head.as_bytes())
            .and_then(|_| w.write_all(&body))
    });
    conn.set_read_timeout(Duration::from_secs(10));
    let resp = conn.response();
    writer.join().unwrap().expect("client write");
    assert_eq!(resp.status, 200);
    let mut want = payload;
    want.reverse();
    assert!(
        resp.body == want,
        "2 MiB body corrupted (got {} bytes)",
        resp.body.len()
    );
    assert_eq!(b1.requests()[0].body.len(), want.len());
}

#[test]
fn head_and_bodyless_responses_keep_framing() {
    let router = Router::start();
    let b1 = Backend::with_handler("b1", |req, conn| {
        match req.uri.as_str() {
            "/204" => {
                let _ = conn.write(b"HTTP/1.1 204 No Content\r\nX-Kind: 204\r\n\r\n");
            }
            "/304" => {
                let _ = conn.write(b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n");
            }
            _ if req.method == "HEAD" => {
                let _ = conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n");
            }
            _ => respond(conn, "200 OK", &[], b"full"),
        }
        Reply::KeepAlive
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b1]);
    let mut conn = Conn::connect(router.http_addr);
    conn.send(b"HEAD / HTTP/1.1\r\nHost: example.com\r\n\r\n");
    let head = conn.read_head().expect("HEAD response");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("1234"));
    let resp = conn.request("GET /204 HTTP/1.1\r\nHost: example.com\r\n\r\n");
    assert_eq!((resp.status, resp.header("x-kind")), (204, Some("204")));
    let resp = conn.request("GET /304 HTTP/1.1\r\nHost: example.com\r\n\r\n");
    assert_eq!(resp.status, 304);
    let resp = conn.request("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n");
    assert_eq!(resp.body, b"full", "framing out of sync after HEAD/204/304");
}

#[test]
fn expect_100_continue_is_relayed_before_the_body() {
    let router = Router::start();
    let b1 = Backend::raw("b1", |req, conn| {
        if req
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        {
            let _ = conn.write(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let n: usize = req
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = Vec::new();
        while body.len() < n {
            match conn.read_some() {
                Ok(b) if !b.is_empty() => body.extend(b),
                _ => return Reply::Close,
            }
        }
        respond(conn, "200 OK", &[], &body);
        Reply::KeepAlive
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b1]);
    let mut conn = Conn::connect(router.http_addr);
    conn.send(b"PUT /up HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    conn.set_read_timeout(Duration::from_secs(3));
    let interim = conn
        .read_head()
        .expect("100 Continue must reach the client before the body is sent");
    assert_eq!(interim.status, 100, "{interim:?}");
    conn.send(b"hello");
    // The backend's own 100 is not relayed again: the client sees one 100, then the 200.
    let resp = conn.response();
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body, b"hello");
    // The router fulfils the expectation itself: the backend does not see it.
    assert_eq!(b1.requests()[0].header("expect"), None);
}

/// Bytes a backend sends after a complete response (a body on a HEAD reply, in a later write,
/// shaped like a response) keep that connection out of the pool, however soon the next
/// request comes: it would read them as its own response. Once a backend has done so, the
/// same holds after its responses with a body too.
#[test]
fn stray_bytes_after_a_response_keep_the_connection_out_of_the_pool() {
    let router = Router::start();
    let b1 = Backend::raw("b1", |req, conn| {
        if req.method == "HEAD" {
            let _ = conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 44\r\n\r\n");
            std::thread::sleep(Duration::from_millis(30));
            let _ = conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray");
            return Reply::KeepAlive;
        }
        if req.uri == "/extra" {
            respond(conn, "200 OK", &[], b"extra");
            std::thread::sleep(Duration::from_millis(30));
            let _ = conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray");
            return Reply::KeepAlive;
        }
        respond(conn, "200 OK", &[], b"right");
        Reply::KeepAlive
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b1]);
    let mut conn = Conn::connect(router.http_addr);
    conn.set_read_timeout(Duration::from_secs(3));
    conn.send(b"HEAD / HTTP/1.1\r\nHost: example.com\r\n\r\n");
    let head = conn.read_head().expect("HEAD response");
    assert_eq!(head.status, 200);
    // The stray bytes reach the router's idle backend connection meanwhile.
    std::thread::sleep(Duration::from_millis(100));
    let resp = conn.request("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n");
    assert_eq!(
        (resp.status, &resp.body[..]),
        (200, &b"right"[..]),
        "{resp:?}"
    );
    // Now known for it: a response with a body, stray bytes after it, a quick next request.
    let resp = conn.request("GET /extra HTTP/1.1\r\nHost: example.com\r\n\r\n");
    assert_eq!(resp.body, b"extra");
    std::thread::sleep(Duration::from_millis(100));
    let resp = conn.request("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n");
    assert_eq!(
        (resp.status, &resp.body[..]),
        (200, &b"right"[..]),
        "{resp:?}"
    );
}

/// A body longer than its Content-Length, the first time a backend sends one (nothing is
/// known about it yet, and the next request comes well within the time a pooled connection
/// is reused without a peek): the extra bytes never become the next request's response,
/// whether they came in the read that ended the response (the connection is not pooled)
/// or after it (the pooled connection, idle for more than a millisecond, is peeked before
/// reuse).
#[test]
fn a_body_longer_than_its_length_is_not_the_next_requests_response() {
    for uri in ["/same", "/later"] {
        // A router of its own for each: nothing known about the backend.
        let router = Router::start();
        let written = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let w = written.clone();
        let b1 = Backend::raw("b1", move |req, conn| {
            let stray = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray";
            match req.uri.as_str() {
                "/same" => {
                    let mut both = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra".to_vec();
                    both.extend_from_slice(stray);
                    let _ = conn.write(&both);
                }
                "/later" => {
                    respond(conn, "200 OK", &[], b"extra");
                    std::thread::sleep(Duration::from_millis(30));
                    let _ = conn.write(stray);
                    w.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                _ => respond(conn, "200 OK", &[], b"right"),
            }
            Reply::KeepAlive
        });
        router.add_route(http_route("example.com", "web"));
        router.set_backends("web", &[&b1]);
        let mut conn = Conn::connect(router.http_addr);
        conn.set_read_timeout(Duration::from_secs(3));
        let resp = conn.request(&format!("GET {uri} HTTP/1.1\r\nHost: example.com\r\n\r\n"));
        assert_eq!(resp.body, b"extra", "{uri}: {resp:?}");
        // The extra bytes reach the router's idle backend connection meanwhile.
        if uri == "/later" {
            assert!(
                crate::support::wait_until(Duration::from_secs(5), || written
                    .load(std::sync::atomic::Ordering::SeqCst)),
                "the backend never wrote the stray bytes"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
        let resp = conn.request("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n");
        assert_eq!(
            (resp.status, &resp.body[..]),
            (200, &b"right"[..]),
            "after {uri}: {resp:?}"
        );
        assert_eq!(b1.accepted(), 2, "{uri}: the connection was reused");
    }
}

/// A pooled connection that passes the check before reuse but dies on the request (the
/// backend closes it unanswered, as one whose keep-alive timeout fires just then): a
/// bodiless GET goes again on a fresh connection.
#[test]
fn a_get_on_a_reused_connection_that_dies_unanswered_goes_again_on_a_fresh_one() {
    let router = Router::start();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = seen.clone();
    let b1 = Backend::raw("b1", move |_, conn| {
        // The second request overall is the first on the reused connection.
        if n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            return Reply::Close;
        }
        respond(conn, "200 OK", &[], b"right");
        Reply::KeepAlive
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b1]);
    let mut conn = Conn::connect(router.http_addr);
    conn.set_read_timeout(Duration::from_secs(3));
    let resp = conn.request("GET /a HTTP/1.1\r\nHost: example.com\r\n\r\n");
    assert_eq!((resp.status, &resp.body[..]), (200, &b"right"[..]));
    // Idle past the reuse-without-a-peek window: the peek finds it open.
    std::thread::sleep(Duration::from_millis(20));
    let resp = conn.request("GET /b HTTP/1.1\r\nHost: example.com\r\n\r\n");
    assert_eq!(
        (resp.status, &resp.body[..]),
        (200, &b"right"[..]),
        "{resp:?}"
    );
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(b1.accepted(), 2, "the retry dialled a fresh connection");
}

#[test]
fn close_delimited_and_http10_backend_responses_are_relayed() {
    let router = Router::start();
    let b1 = Backend::with_handler("b1", |req, conn| {
        let head: &[u8] = if req.uri == "/10" {
            b"HTTP/1.0 200 OK\r\nX-Old: 1\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\nX-Old: 0\r\n\r\n"
        };
        let _ = conn.write(head);
        let _ = conn.write(b"body until close");
        Reply::Close
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b1]);
    for uri in ["/", "/10"] {
        let mut conn = Conn::connect(router.http_addr);
        let resp = conn.request(&format!("GET {uri} HTTP/1.1\r\nHost: example.com\r\n\r\n"));
        assert_eq!(resp.status, 200, "{uri}: {resp:?}");
        assert_eq!(resp.text(), "body until close", "{uri}: {resp:?}");
        assert!(resp.header("x-old").is_some());
    }
}

/// RFC 9112 §6.1: no Transfer-Encoding to an HTTP/1.0 client. A chunked backend body is
/// sent decoded, delimited by the close of the connection (as Go's server does).
#[test]
fn chunked_response_to_an_http10_client_is_decoded_and_closes() {
    let router = Router::start();
    let b1 = Backend::with_handler("b1", |_req, conn| {
        let _ = conn.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel");
        std::thread::sleep(Duration::from_millis(30));
        let _ = conn.write(b"lo\r\n7\r\n, world\r\n0\r\nX-Sum: 1\r\n\r\n");
        Reply::KeepAlive
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b1]);
    let mut conn = Conn::connect(router.http_addr);
    conn.send(b"GET / HTTP/1.0\r\nHost: example.com\r\nConnection: keep-alive\r\n\r\n");
    let raw = String::from_utf8(conn.read_to_end().expect("the router closes")).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{raw:?}");
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{raw:?}"
    );
    assert!(head.contains("\r\nConnection: close"), "{raw:?}");
    assert_eq!(body, "hello, world");
}

/// An HTTP/1.0 client asking for keep-alive is told the connection stays open, and it
/// does; an HTTP/1.1 client over the same router gets the body still chunked.
#[test]
fn http10_keep_alive_is_announced_and_http11_stays_chunked() {
    let router = Router::start();
    let b1 = Backend::with_handler("b1", |req, conn| {
        if req.uri == "/chunked" {
            let _ = conn.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            );
        } else {
            respond(conn, "200 OK", &[], b"fixed");
        }
        Reply::KeepAlive
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b1]);
    let mut conn = Conn::connect(router.http_addr);
    for _ in 0..2 {
        let resp =
            conn.request("GET / HTTP/1.0\r\nHost: example.com\r\nConnection: keep-alive\r\n\r\n");
        assert_eq!(resp.body, b"fixed");
        assert_eq!(resp.header("connection"), Some("keep-alive"), "{resp:?}");
    }
    let resp = conn.request("GET /chunked HTTP/1.1\r\nHost: example.com\r\n\r\n");
    assert!(resp.chunked, "{resp:?}");
    assert_eq!(resp.body, b"ok");
}

/// The router's own answers (no route: 404; no backend: 503) to an HTTP/1.0 client that
/// asked for keep-alive say `Connection: close` and close: without `Connection:
/// keep-alive` in them, such a client reads to the end of the connection, which the router
/// used to keep open until the idle timeout.
#[test]
fn own_answers_to_http10_keep_alive_clients_close() {
    let router = Router::start();
    router.add_route(http_route("nobackend.example.com", "empty"));
    for host in ["unknown.example.com", "nobackend.example.com"] {
        let mut conn = Conn::connect(router.http_addr);
        conn.set_read_timeout(Duration::from_secs(3));
        conn.send(
            format!("GET / HTTP/1.0\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n").as_bytes(),
        );
        let all = String::from_utf8(conn.read_to_end().expect("EOF, not a timeout")).unwrap();
        let status = if host.starts_with("unknown") {
            "404"
        } else {
            "503"
        };
        assert!(all.starts_with(&format!("HTTP/1.1 {status} ")), "{all}");
        assert!(
            all.to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{all}"
        );
    }
}

/// CONNECT is refused with 405 and the connection closed (a reverse proxy does not tunnel
/// it, as nginx does not); the backend never sees it.
#[test]
fn connect_is_refused() {
    let router = Router::start();
    let b1 = Backend::start("b1");
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b1]);
    let mut conn = Conn::connect(router.http_addr);
    conn.set_read_timeout(Duration::from_secs(3));
    let resp = conn.request("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n");
    assert_eq!(resp.status, 405, "{resp:?}");
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(b1.requests().is_empty());
}

/// A router with a 1 s idle timeout routing `example.com` to a listener the test drives by
/// hand.
fn one_second_idle_router_with_raw_backend() -> (Router, std::net::TcpListener) {
    let router = Router::builder()
        .arg("--idle-timeout-secs")
        .arg("1")
        .start();
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    router.add_route(http_route("example.com", "web"));
    router.set_backend_addrs("web", &[(backend.local_addr().unwrap().to_string(), false)]);
    (router, backend)
}

/// A backend that accepts a request and never reads its body (nor closes) is given up
/// after the idle timeout: the client is not held for good.
#[test]
fn a_backend_that_stops_reading_the_body_is_given_up_after_the_idle_timeout() {
    let (router, backend) = one_second_idle_router_with_raw_backend();
    let total: usize = 512 << 20;
    let mut conn = std::net::TcpStream::connect(router.http_addr).unwrap();
    conn.write_all(
        format!("POST /up HTTP/1.1\r\nHost: example.com\r\nContent-Length: {total}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    // Accepted, never read.
    let (_up, _) = backend.accept().unwrap();
    let (sent, took) = crate::support::write_until_refused(&mut conn, total);
    assert!(
        sent < total,
        "the whole body went through a backend that reads nothing"
    );
    assert!(
        took < Duration::from_secs(10),
        "the client was held {took:?}"
    );
}

/// A client that stops reading a response is given up after the idle timeout (nginx's
/// `send_timeout`): its connection is closed and the backend's with it, instead of both
/// being held for good by a write that never completes.
#[test]
fn a_client_that_stops_reading_the_response_is_given_up_after_the_idle_timeout() {
    let (router, backend) = one_second_idle_router_with_raw_backend();
    let total: usize = 512 << 20;
    let mut conn = std::net::TcpStream::connect(router.http_addr).unwrap();
    conn.write_all(b"GET /big HTTP/1.1\r\nHost: example.com\r\n\r\n")
        .unwrap();
    let (mut up, _) = backend.accept().unwrap();
    let mut head = [0u8; 1024];
    let _ = up.read(&mut head).unwrap();
    // The client reads nothing from here on; the backend streams as fast as it is taken.
    up.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n").as_bytes())
        .unwrap();
    let (sent, took) = crate::support::write_until_refused(&mut up, total);
    assert!(
        sent < total,
        "the whole body went out to a client that reads nothing"
    );
    assert!(
        took < Duration::from_secs(10),
        "the backend was held {took:?}"
    );
    // The client's connection was closed too: what was buffered for it, then EOF.
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("client connection still open after {got} bytes: {e}"),
        }
    }
    assert!(got < total, "{got}");
    let (_, m) = router.api("GET", "/metrics", None);
    let text = m.as_str().unwrap_or_default();
    assert!(
        text.lines().any(
            |l| l.starts_with("flynn_router_client_send_timeouts_total{") && !l.ends_with(" 0")
        ),
        "{text}"
    );
}

/// A newer HTTP/1 minor version is served as HTTP/1.1 (RFC 9112 §2.3, as Go and nginx do),
/// and goes to the backend as HTTP/1.1.
#[test]
fn an_http12_request_is_served_as_http11() {
    let router = Router::start();
    let b1 = Backend::start("b1");
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b1]);
    let mut conn = Conn::connect(router.http_addr);
    let resp = conn.request("GET /new HTTP/1.2\r\nHost: example.com\r\n\r\n");
    let seen = resp.seen();
    assert_eq!(
        (seen.uri.as_str(), seen.version.as_str()),
        ("/new", "HTTP/1.1")
    );
    // Kept alive, as HTTP/1.1.
    let again = conn.request("GET /again HTTP/1.2\r\nHost: example.com\r\n\r\n");
    assert_eq!(again.seen().conn, seen.conn);
}
