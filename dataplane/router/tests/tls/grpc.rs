//! gRPC-style streams through a `grpc: true` route: HTTP/2 end to end, DATA in both
//! directions interleaved, trailers passed through. Client and backend are the `h2`
//! crate on tokio, over the router's h2c listener.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

use crate::support::Router;

/// A router with `threads` cores (one: every stream on the same core's pool) and an h2c
/// listener, and a current-thread runtime for the test's client and backends.
fn h2c_router(threads: u32) -> (Router, tokio::runtime::Runtime) {
    h2c_router_with(threads, &[])
}

/// [`h2c_router`] with further router arguments.
fn h2c_router_with(threads: u32, args: &[&str]) -> (Router, tokio::runtime::Runtime) {
    let mut b = Router::builder()
        .threads(threads)
        .arg("--h2c-addr")
        .arg("127.0.0.1:0");
    for a in args {
        b = b.arg(*a);
    }
    let router = b.start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (router, rt)
}

/// Adds a `grpc: true` route `domain` → `service` with `backend` as its one backend.
fn grpc_route(router: &Router, domain: &str, service: &str, backend: std::net::SocketAddr) {
    let route = json!({"type":"http","domain":domain,"service":service,"grpc":true});
    assert_eq!(
        router.api("POST", "/routes", Some(&route.to_string())).0,
        200
    );
    router.set_backend_addrs(service, &[(backend.to_string(), false)]);
}

async fn backend() -> std::net::SocketAddr {
    counting_backend().await.0
}

/// The echo backend, with a count of the TCP connections it accepted.
async fn counting_backend() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let (addr, accepted, _) = tracking_backend().await;
    (addr, accepted)
}

/// The echo backend, with counts of the TCP connections it accepted and of those still
/// open.
async fn tracking_backend() -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let (counter, open2) = (accepted.clone(), open.clone());
    tokio::spawn(async move {
        while let Ok((sock, _)) = l.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            open2.fetch_add(1, Ordering::SeqCst);
            let open = open2.clone();
            tokio::spawn(async move {
                struct Closed(Arc<AtomicUsize>);
                impl Drop for Closed {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let _closed = Closed(open);
                let mut conn = h2::server::handshake(sock).await.unwrap();
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    tokio::spawn(async move {
                        let xff = req.headers().get("x-forwarded-for").cloned();
                        let underscore = req.headers().contains_key("x_forwarded_for");
                        let path = req.uri().path().to_string();
                        let mut body = req.into_body();
                        let resp = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .header("x-path", path)
                            .body(())
                            .unwrap();
                        let mut send = respond.send_response(resp, false).unwrap();
                        // Echo every frame as soon as it arrives (bidirectional).
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            send.send_data(chunk, false).unwrap();
                        }
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        if let Some(x) = xff {
                            trailers.insert("x-seen-xff", x);
                        }
                        if underscore {
                            trailers.insert("x-seen-underscore", "1".parse().unwrap());
                        }
                        send.send_trailers(trailers).unwrap();
                    });
                }
            });
        }
    });
    (addr, accepted, open)
}

#[test]
fn grpc_bidirectional_stream_with_trailers() {
    let (router, rt) = h2c_router(2);
    rt.block_on(async {
        let b = backend().await;
        let (st, _) = router.api(
            "POST",
            "/routes",
            Some(
                &json!({"type":"http","domain":"grpc.example.com","service":"g","grpc":true})
                    .to_string(),
            ),
        );
        assert_eq!(st, 200);
        router.set_backend_addrs("g", &[(b.to_string(), false)]);

        let mut client = h2_client(router.h2c_addrs[0]).await;
        let req = http::Request::builder()
            .method("POST")
            .uri("http://grpc.example.com/echo.Echo/Chat")
            .header("content-type", "application/grpc")
            // Taken as X-Forwarded-For (one variable with it on CGI-style backends).
            .header("x_forwarded_for", "6.6.6.6")
            .body(())
            .unwrap();
        let (resp, mut send) = client.send_request(req, false).unwrap();
        send.send_data(Bytes::from_static(b"ping-1"), false)
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("response headers")
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-path"], "/echo.Echo/Chat");
        let mut body = resp.into_body();
        for i in 1..=3 {
            let got = tokio::time::timeout(Duration::from_secs(5), body.data())
                .await
                .expect("echo")
                .unwrap()
                .unwrap();
            let _ = body.flow_control().release_capacity(got.len());
            assert_eq!(
                got,
                format!("ping-{i}").as_bytes(),
                "frame {i} echoed before the request ends"
            );
            if i < 3 {
                send.send_data(Bytes::from(format!("ping-{}", i + 1)), false)
                    .unwrap();
            }
        }
        send.send_data(Bytes::new(), true).unwrap();
        assert!(tokio::time::timeout(Duration::from_secs(5), body.data())
            .await
            .unwrap()
            .is_none());
        let trailers = tokio::time::timeout(Duration::from_secs(5), body.trailers())
            .await
            .unwrap()
            .unwrap()
            .expect("trailers");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-seen-xff"], "6.6.6.6, 127.0.0.1");
        assert!(!trailers.contains_key("x-seen-underscore"));
    });
}

#[test]
fn rapid_reset_flood_ends_the_connection_and_is_counted() {
    let (router, rt) = h2c_router(2);
    let closed = rt.block_on(async {
        let b = backend().await;
        grpc_route(&router, "grpc.example.com", "g", b);
        let sock = tokio::net::TcpStream::connect(router.h2c_addrs[0])
            .await
            .unwrap();
        let (client, conn) = h2::client::Builder::new()
            .max_concurrent_reset_streams(100_000)
            .handshake::<_, Bytes>(sock)
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let mut client = client;
        // Open and immediately cancel streams, as fast as the client allows (bounded).
        for _ in 0..5000 {
            let Ok(ready) = client.clone().ready().await else {
                break;
            };
            client = ready;
            let req = http::Request::builder()
                .method("POST")
                .uri("http://grpc.example.com/flood")
                .body(())
                .unwrap();
            match client.send_request(req, false) {
                Ok((_resp, mut send)) => send.send_reset(h2::Reason::CANCEL),
                Err(_) => break,
            }
        }
        // The router must end the connection (GOAWAY) rather than keep paying per stream.
        matches!(
            tokio::time::timeout(Duration::from_secs(10), conn).await,
            Ok(Ok(Err(_))) | Ok(Ok(Ok(())))
        )
    });
    assert!(closed, "connection still open after the flood");
    wait_for_h2_connection_error(&router, Duration::from_secs(15));
}

/// Polls the router's metrics until an HTTP/2 connection error is counted (the router
/// counts one once its accept loop sees the error); panics after `within`.
fn wait_for_h2_connection_error(router: &Router, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let (_, metrics) = router.api("GET", "/metrics", None);
        let text = metrics.as_str().unwrap_or_default().to_string();
        let errors: u64 = text
            .lines()
            .filter(|l| l.starts_with("flynn_router_h2_connection_errors_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        if errors >= 1 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "connection error not counted:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One unary-style call on a fresh client connection: returns the echoed body.
async fn call_once(router: std::net::SocketAddr, msg: &'static [u8]) -> Bytes {
    call_domain(router, "grpc.example.com", msg).await
}

/// [`call_once`] for the route of `domain`.
async fn call_domain(router: std::net::SocketAddr, domain: &str, msg: &'static [u8]) -> Bytes {
    let mut client = h2_client(router).await;
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{domain}/echo.Echo/Say"))
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    send.send_data(Bytes::from_static(msg), true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("response headers")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    Bytes::from(read_body(&mut body).await)
}

#[test]
fn grpc_streams_share_one_backend_connection_per_core() {
    // One core, so every stream is on the same core's pool.
    let (router, rt) = h2c_router(1);
    rt.block_on(async {
        let (b, accepted) = counting_backend().await;
        grpc_route(&router, "grpc.example.com", "g", b);
        for i in 0..5 {
            assert_eq!(
                &call_once(router.h2c_addrs[0], b"hi").await[..],
                b"hi",
                "call {i}"
            );
        }
        // Five client connections, five streams, one backend connection.
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // Concurrent streams multiplex on it too.
        let calls: Vec<_> = (0..8)
            .map(|_| tokio::spawn(call_once(router.h2c_addrs[0], b"many")))
            .collect();
        for c in calls {
            assert_eq!(&c.await.unwrap()[..], b"many");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    });
}

/// Starts an echo call that sends `len` bytes and leaves the stream open: its response
/// (head received, body not read) and the request stream to drop when done.
async fn unread_call(
    router: std::net::SocketAddr,
    len: usize,
) -> (http::Response<h2::RecvStream>, h2::SendStream<Bytes>) {
    let mut client = h2_client(router).await;
    let req = http::Request::builder()
        .method("POST")
        .uri("http://grpc.example.com/echo.Echo/Say")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    send.send_data(Bytes::from(vec![b'x'; len]), false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("response headers")
        .unwrap();
    (resp, send)
}

/// A gRPC client that stops reading its responses does not stall other calls to the same
/// backend, although they share the core's one backend connection.
#[test]
fn a_client_that_stops_reading_does_not_stall_other_grpc_calls() {
    let (router, rt) = h2c_router(1);
    rt.block_on(async {
        let b = backend().await;
        grpc_route(&router, "grpc.example.com", "g", b);
        // A call whose 2 MB come back echoed and are never read (more than the router
        // buffers toward one client stream).
        let (_slow, send) = unread_call(router.h2c_addrs[0], 2_000_000).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Another client's calls (with more than a sliver of data each) still go through.
        static MSG: [u8; 40_000] = [b'y'; 40_000];
        for i in 0..3 {
            assert_eq!(
                call_once(router.h2c_addrs[0], &MSG).await.len(),
                MSG.len(),
                "call {i}"
            );
        }
        drop(send);
    });
}

/// Two gRPC services on one core keep one backend connection each: a call to one does
/// not drop the other's pooled connection.
#[test]
fn grpc_routes_keep_their_own_backend_connections() {
    let (router, rt) = h2c_router(1);
    rt.block_on(async {
        let mut accepted = Vec::new();
        for svc in ["a", "b"] {
            let (b, n) = counting_backend().await;
            grpc_route(&router, &format!("{svc}.example.com"), svc, b);
            accepted.push(n);
        }
        let h2c = router.h2c_addrs[0];
        for i in 0..4 {
            for svc in ["a", "b"] {
                let got = call_domain(h2c, &format!("{svc}.example.com"), b"x").await;
                assert_eq!(&got[..], b"x", "call {i} to {svc}");
            }
        }
        let n: Vec<_> = accepted.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        assert_eq!(n, [1, 1], "backend connections dialled per service");
    });
}

/// A backend taken out of its route loses its pooled connection at that table change,
/// without waiting for another call.
#[test]
fn grpc_connection_to_a_removed_backend_is_closed() {
    let (router, rt) = h2c_router(1);
    rt.block_on(async {
        let (old, _, open) = tracking_backend().await;
        let new = backend().await;
        grpc_route(&router, "grpc.example.com", "g", old);
        assert_eq!(&call_once(router.h2c_addrs[0], b"one").await[..], b"one");
        assert_eq!(open.load(Ordering::SeqCst), 1);
        router.set_backend_addrs("g", &[(new.to_string(), false)]);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while open.load(Ordering::SeqCst) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the removed backend's connection is still open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(&call_once(router.h2c_addrs[0], b"two").await[..], b"two");
    });
}

#[test]
fn a_dead_grpc_backend_connection_is_replaced() {
    let (router, rt) = h2c_router(1);
    rt.block_on(async {
        // A backend that serves one stream per connection, then closes it.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = l.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut conn = h2::server::handshake(sock).await.unwrap();
                    if let Some(Ok((req, mut respond))) = conn.accept().await {
                        let mut body = req.into_body();
                        let mut send = respond
                            .send_response(http::Response::new(()), false)
                            .unwrap();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            send.send_data(chunk, false).unwrap();
                        }
                        send.send_data(Bytes::new(), true).unwrap();
                    }
                    // Let the response flush, then drop the connection.
                    let _ = tokio::time::timeout(Duration::from_millis(100), conn.accept()).await;
                });
            }
        });
        grpc_route(&router, "grpc.example.com", "g", b);
        assert_eq!(&call_once(router.h2c_addrs[0], b"one").await[..], b"one");
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The pooled connection is gone: the router notices and dials again.
        assert_eq!(&call_once(router.h2c_addrs[0], b"two").await[..], b"two");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    });
}

/// One HTTP/2 frame: 9-byte header (length, type, flags, stream id) and payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn continuation_flood_is_cut_off_with_bounded_cost() {
    use std::io::{Read, Write};
    let router = Router::builder()
        .arg("--h2c-addr")
        .arg("127.0.0.1:0")
        .start();
    let mut s = std::net::TcpStream::connect(router.h2c_addrs[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    s.write_all(&frame(4, 0, 0, &[])).unwrap(); // SETTINGS
                                                // HEADERS without END_HEADERS (:method GET, :path /), then CONTINUATION frames full
                                                // of 1000-byte literal headers, never ending the header block.
    s.write_all(&frame(1, 0, 1, &[0x82, 0x84, 0x86])).unwrap();
    let mut entry = vec![0x00, 0x04, b'a', b'b', b'c', b'd', 0x7f, 0xe9, 0x06];
    entry.extend(std::iter::repeat_n(b'v', 1000));
    let payload: Vec<u8> = entry.repeat(16);
    let chunk = frame(9, 0, 1, &payload);
    // Up to 64 MiB (bounded); the router must give up long before.
    let mut sent = 0usize;
    let mut cut = false;
    while sent < 64 << 20 {
        if s.write_all(&chunk).is_err() {
            cut = true;
            break;
        }
        sent += chunk.len();
    }
    eprintln!("continuation flood: wrote {sent} bytes, cut={cut}");
    // Whatever was written, the server ends the connection: a GOAWAY and/or EOF/reset.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let goaway = {
        // Walk the server's frames looking for GOAWAY (type 7).
        let mut i = 0;
        let mut found = false;
        while i + 9 <= got.len() {
            let len =
                ((got[i] as usize) << 16) | ((got[i + 1] as usize) << 8) | got[i + 2] as usize;
            if got[i + 3] == 7 {
                found = true;
            }
            i += 9 + len;
        }
        found
    };
    assert!(
        cut || goaway,
        "the router accepted {sent} bytes of CONTINUATION frames without ending the connection"
    );
    assert!(
        sent < 16 << 20,
        "the router kept reading a header block of {sent} bytes"
    );
    // The router itself is fine and counted the abuse.
    wait_for_h2_connection_error(&router, Duration::from_secs(10));
}

/// An HTTP/2 client connected to the router's h2c listener.
async fn h2_client(router: std::net::SocketAddr) -> h2::client::SendRequest<Bytes> {
    let sock = tokio::net::TcpStream::connect(router).await.unwrap();
    let (client, conn) = h2::client::handshake(sock).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client.ready().await.unwrap()
}

/// A raw HTTP/1 backend for route `example.com` → `web`: a thread that accepts one
/// connection, reads the request head and hands the connection to `answer`.
fn raw_backend<T: Send + 'static>(
    router: &Router,
    answer: impl FnOnce(std::net::TcpStream) -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    use std::io::Read;
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    router.add_route(crate::support::http_route("example.com", "web"));
    router.set_backend_addrs("web", &[(backend.local_addr().unwrap().to_string(), false)]);
    std::thread::spawn(move || {
        let (mut up, _) = backend.accept().unwrap();
        let mut head = [0u8; 2048];
        let _ = up.read(&mut head).unwrap();
        answer(up)
    })
}

/// `GET http://example.com{path}` over HTTP/2 through the router's h2c listener; the
/// response head, expected within 5 s (`what` names it in the failure).
async fn get_head(router: &Router, path: &str, what: &str) -> http::Response<h2::RecvStream> {
    let mut client = h2_client(router.h2c_addrs[0]).await;
    let req = http::Request::builder()
        .uri(format!("http://example.com{path}"))
        .body(())
        .unwrap();
    let (resp, _send) = client.send_request(req, true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect(what)
        .unwrap()
}

/// CONNECT over HTTP/2 is refused with 405, as on HTTP/1.1 (it used to go to the backend as
/// `CONNECT /`, and client and router then waited on each other).
#[test]
fn connect_over_http2_is_refused() {
    let (router, rt) = h2c_router(1);
    let b = crate::support::Backend::start("b1");
    router.add_route(crate::support::http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    rt.block_on(async {
        let mut client = h2_client(router.h2c_addrs[0]).await;
        let req = http::Request::builder()
            .method("CONNECT")
            .uri("example.com:443")
            .body(())
            .unwrap();
        let (resp, _send) = client.send_request(req, false).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("an answer")
            .unwrap();
        assert_eq!(resp.status(), 405);
    });
    assert!(b.requests().is_empty());
}

/// The router's own answers to HEAD over HTTP/2 (404 for an unknown host, 503 for a route
/// without backends) end the stream with their headers: the length a GET would get and no
/// DATA frame (RFC 9110 §9.3.2; h2 clients reset a stream whose HEAD response has data).
#[test]
fn local_answers_to_head_over_http2_have_no_body() {
    let (router, rt) = h2c_router(1);
    router.add_route(crate::support::http_route("empty.example.com", "none"));
    rt.block_on(async {
        let mut client = h2_client(router.h2c_addrs[0]).await;
        for (host, status) in [("nope.example.com", 404), ("empty.example.com", 503)] {
            let req = http::Request::builder()
                .method("HEAD")
                .uri(format!("http://{host}/"))
                .body(())
                .unwrap();
            let (resp, _send) = client.send_request(req, true).unwrap();
            let resp = tokio::time::timeout(Duration::from_secs(5), resp)
                .await
                .expect(host)
                .unwrap();
            assert_eq!(resp.status(), status, "{host}");
            let len = resp
                .headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            assert!(len.is_some_and(|n| n > 0), "{host}: {resp:?}");
            let mut body = resp.into_body();
            assert!(body.is_end_stream(), "{host}: the headers end the stream");
            let data = tokio::time::timeout(Duration::from_secs(5), body.data())
                .await
                .expect(host);
            assert!(data.is_none(), "{host}: {data:?}");
        }
    });
}

/// An HTTP/2 upload that stalls is given up after the idle timeout (the stream is reset),
/// not held until the response-head limit (600 s) as before; the limits are per step, so
/// a long upload that keeps moving is not cut off.
#[test]
fn a_stalled_http2_upload_is_given_up_after_the_idle_timeout() {
    let (router, rt) = h2c_router_with(1, &["--idle-timeout-secs", "1"]);
    let b = crate::support::Backend::start("b1");
    router.add_route(crate::support::http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    rt.block_on(async {
        let mut client = h2_client(router.h2c_addrs[0]).await;
        // A body that keeps moving for 2.5 s (longer than the idle timeout) goes through.
        let req = http::Request::builder()
            .method("POST")
            .uri("http://example.com/up")
            .body(())
            .unwrap();
        let (resp, mut send) = client.send_request(req, false).unwrap();
        for _ in 0..5 {
            send.send_data(Bytes::from_static(b"part "), false).unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        send.send_data(Bytes::from_static(b"end"), true).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("an answer")
            .unwrap();
        assert_eq!(resp.status(), 200);
        // One that stops is reset.
        let req = http::Request::builder()
            .method("POST")
            .uri("http://example.com/up")
            .body(())
            .unwrap();
        let (resp, mut send) = client.send_request(req, false).unwrap();
        send.send_data(Bytes::from_static(b"start"), false).unwrap();
        let t0 = std::time::Instant::now();
        let got = tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .expect("the stalled stream was not given up within 10 s");
        assert!(got.is_err(), "{got:?}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        drop(send);
    });
    assert_eq!(b.requests()[0].body, b"part part part part part end");
}

/// Reads `body` to its end (each piece within 5 s, granting window as it goes); what it
/// held.
async fn read_body(body: &mut h2::RecvStream) -> Vec<u8> {
    let mut got = Vec::new();
    while let Some(d) = tokio::time::timeout(Duration::from_secs(5), body.data())
        .await
        .expect("the body within 5 s")
    {
        let d = d.expect("body data");
        let _ = body.flow_control().release_capacity(d.len());
        got.extend_from_slice(&d);
    }
    got
}

/// Reads `body` (granting window as it goes) until the stream is reset; returns how many
/// bytes came first. Panics if it ends normally or stalls for 5 s.
async fn read_until_reset(mut body: h2::RecvStream) -> usize {
    let mut got = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), body.data()).await {
            Ok(Some(Ok(chunk))) => {
                got += chunk.len();
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            Ok(Some(Err(e))) => {
                assert!(e.is_reset(), "{e:?}");
                return got;
            }
            Ok(None) => panic!("the stream ended normally after {got} bytes"),
            Err(_) => panic!("neither data nor a reset after {got} bytes"),
        }
    }
}

/// A gRPC client that grants no window for the idle timeout has its stream reset, which
/// frees what the router held for it (and its share of the backend connection's window).
#[test]
fn a_grpc_client_that_stops_reading_is_reset_after_the_idle_timeout() {
    let (router, rt) = h2c_router_with(1, &["--idle-timeout-secs", "1"]);
    rt.block_on(async {
        let b = backend().await;
        grpc_route(&router, "grpc.example.com", "g", b);
        let (resp, send) = unread_call(router.h2c_addrs[0], 1_000_000).await;
        // Not reading for longer than the idle timeout.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let got = read_until_reset(resp.into_body()).await;
        assert!(got < 1_000_000, "{got}");
        drop(send);
    });
}

/// The same for a plain HTTP/2 route (HTTP/1.1 backend): a client that grants no window
/// for the idle timeout has its stream reset, and the backend connection streaming to it
/// is closed instead of being held for good.
#[test]
fn an_http2_client_that_stops_reading_is_reset_after_the_idle_timeout() {
    use std::io::Write;
    let (router, rt) = h2c_router_with(1, &["--idle-timeout-secs", "1"]);
    let total: usize = 256 << 20;
    let streamer = raw_backend(&router, move |mut up| {
        up.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n").as_bytes())
            .unwrap();
        crate::support::write_until_refused(&mut up, total)
    });
    rt.block_on(async {
        let resp = get_head(&router, "/big", "a response head").await;
        assert_eq!(resp.status(), 200);
        // Not reading (no window granted) for well over the idle timeout.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let got = read_until_reset(resp.into_body()).await;
        assert!(got < total, "{got}");
    });
    let (sent, took) = streamer.join().unwrap();
    assert!(
        sent < total,
        "the whole body went out to a client that reads nothing"
    );
    assert!(
        took < Duration::from_secs(10),
        "the backend was held {took:?}"
    );
}

/// An HTTP/1 backend that sends an interim `103` and its final response in one write, the
/// final one with a Content-Length list and a hop-by-hop field named in an upper-case
/// Connection field: the HTTP/2 client gets the final response at once (it used to wait
/// for a read that never came, up to the 600 s response-head limit), with one
/// `content-length` value and without the hop-by-hop field.
#[test]
fn an_interim_and_a_final_response_in_one_read_reach_an_http2_client() {
    use std::io::Write;
    let (router, rt) = h2c_router(1);
    let answer = raw_backend(&router, |mut up| {
        up.write_all(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
              HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nCONNECTION: x-internal\r\n\
              X-Internal: secret\r\nX-Kept: yes\r\n\r\nhello",
        )
        .unwrap();
        // Held open: the response must not depend on the backend closing.
        std::thread::sleep(Duration::from_secs(6));
    });
    rt.block_on(async {
        let resp = get_head(&router, "/hints", "the final response at once").await;
        assert_eq!(resp.status(), 200);
        let h = resp.headers();
        assert_eq!(h.get("content-length").unwrap(), "5");
        assert_eq!(h.get("x-kept").unwrap(), "yes");
        assert!(h.get("x-internal").is_none(), "{h:?}");
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), body.data())
            .await
            .expect("the body")
        {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(got, b"hello");
    });
    answer.join().unwrap();
}

/// `--proxy-protocol` on an `--h2c-addr` listener: a PROXY prefix before the HTTP/2
/// preface gives the client address the backend sees; a connection without one is served
/// as it is.
#[test]
fn h2c_listeners_take_proxy_prefixes() {
    use tokio::io::AsyncWriteExt;
    let (router, rt) = h2c_router_with(1, &["--proxy-protocol"]);
    let b = crate::support::Backend::start("b1");
    router.add_route(crate::support::http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    rt.block_on(async {
        for prefix in [
            &b"PROXY TCP4 203.0.113.7 127.0.0.1 4444 80\r\n"[..],
            &b""[..],
        ] {
            let mut sock = tokio::net::TcpStream::connect(router.h2c_addrs[0])
                .await
                .unwrap();
            sock.write_all(prefix).await.unwrap();
            let (client, conn) = h2::client::handshake(sock).await.unwrap();
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut client = client.ready().await.unwrap();
            let req = http::Request::builder()
                .uri("http://example.com/pp")
                .body(())
                .unwrap();
            let (resp, _send) = client.send_request(req, true).unwrap();
            let resp = tokio::time::timeout(Duration::from_secs(5), resp)
                .await
                .expect("an answer")
                .unwrap();
            assert_eq!(resp.status(), 200);
        }
    });
    let seen = b.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].header("x-forwarded-for"), Some("203.0.113.7"));
    assert_eq!(seen[1].header("x-forwarded-for"), Some("127.0.0.1"));
}

/// A backend answering an HTTP/2 upload before reading it (a 413) and closing has its
/// answer relayed, as on HTTP/1.1, not replaced by a 503; the client's upload is then
/// stopped without an error (RST_STREAM NO_ERROR).
#[test]
fn an_http2_upload_gets_the_backends_early_answer() {
    let (router, rt) = h2c_router(1);
    let backend = raw_backend(&router, |mut up| {
        use std::io::Write;
        up.write_all(
            b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 9\r\n\r\ntoo large",
        )
        .unwrap();
        // Dropped with the upload unread: the backend's kernel resets the connection.
    });
    rt.block_on(async {
        let mut client = h2_client(router.h2c_addrs[0]).await;
        let req = http::Request::builder()
            .method("POST")
            .uri("http://example.com/upload")
            .header("content-length", (16 << 20).to_string())
            .body(())
            .unwrap();
        let (resp, mut send) = client.send_request(req, false).unwrap();
        // The upload goes as the window allows; the answer comes before it is done.
        let upload = tokio::spawn(async move {
            let chunk = Bytes::from(vec![b'u'; 64 << 10]);
            for _ in 0..256 {
                send.reserve_capacity(chunk.len());
                match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(Ok(_)) => {}
                    _ => return,
                }
                if send.send_data(chunk.clone(), false).is_err() {
                    return;
                }
            }
        });
        let resp = tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .expect("an answer within 10 s")
            .expect("a response, not a reset");
        assert_eq!(resp.status(), 413);
        let mut body = resp.into_body();
        let got = read_body(&mut body).await;
        assert_eq!(got, b"too large");
        upload.abort();
    });
    backend.join().unwrap();
}

/// A gRPC backend that takes a call and never answers it: the client gets a 503 at the
/// response header timeout (1 s here) after its request ended, as on HTTP/1.1, and the
/// backend's stream is reset (it used to wait for the response HEADERS for ever). Only the
/// head is bounded: a call answered in time may then stream for longer (here, 2.5 s).
#[test]
fn a_grpc_backend_that_never_answers_gets_a_503_at_the_response_header_timeout() {
    let (router, rt) = h2c_router_with(1, &["--response-header-timeout-secs", "1"]);
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (reset_tx, mut reset_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (sock, _) = l.accept().await.unwrap();
            let mut conn = h2::server::handshake(sock).await.unwrap();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let tx = reset_tx.clone();
                tokio::spawn(async move {
                    if req.uri().path() == "/never" {
                        // No answer: reports the stream's reset.
                        let r = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
                        let _ = tx.send(r.ok());
                        return;
                    }
                    // Answers at once, then streams for 2.5 s before its trailers.
                    let resp = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(())
                        .unwrap();
                    let mut send = respond.send_response(resp, false).unwrap();
                    for _ in 0..5 {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        send.send_data(Bytes::from_static(b"tick"), false).unwrap();
                    }
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    send.send_trailers(trailers).unwrap();
                });
            }
        });
        grpc_route(&router, "grpc.example.com", "g", addr);
        let mut client = h2_client(router.h2c_addrs[0]).await;
        let call = |path: &str| {
            http::Request::builder()
                .method("POST")
                .uri(format!("http://grpc.example.com{path}"))
                .header("content-type", "application/grpc")
                .body(())
                .unwrap()
        };
        let start = std::time::Instant::now();
        // A whole request (the deadline counts from its end).
        let (resp, mut send) = client.send_request(call("/never"), false).unwrap();
        send.send_data(Bytes::from_static(b"req"), true).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .expect("no answer within 10 s")
            .unwrap();
        let took = start.elapsed();
        assert_eq!(resp.status(), 503);
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(6),
            "answered after {took:?}"
        );
        let reset = tokio::time::timeout(Duration::from_secs(5), reset_rx.recv())
            .await
            .expect("the backend's stream was not reset");
        assert_eq!(reset, Some(Some(h2::Reason::CANCEL)));

        let (resp, _send) = client.send_request(call("/slow"), false).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("no answer")
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut got = 0;
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), body.data())
            .await
            .expect("stalled")
        {
            let chunk = chunk.expect("the call was cut off");
            let _ = body.flow_control().release_capacity(chunk.len());
            got += chunk.len();
        }
        assert_eq!(got, 20);
        let trailers = body.trailers().await.unwrap().unwrap();
        assert_eq!(trailers["grpc-status"], "0");
    });
}

/// The response header timeout counts from the end of the call's request, as Go's
/// `ResponseHeaderTimeout`: a client-streaming call that uploads for longer than it (2.5 s
/// against 1 s here) to a backend that answers only once the upload has ended gets that
/// answer, not a 503 and a reset (the deadline used to start when the request was sent).
#[test]
fn a_grpc_call_still_uploading_has_no_response_header_deadline() {
    let (router, rt) = h2c_router_with(1, &["--response-header-timeout-secs", "1"]);
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (sock, _) = l.accept().await.unwrap();
            let mut conn = h2::server::handshake(sock).await.unwrap();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                tokio::spawn(async move {
                    // Reads the whole upload, then answers with how much it got.
                    let mut body = req.into_body();
                    let mut got = 0usize;
                    while let Some(Ok(chunk)) = body.data().await {
                        let _ = body.flow_control().release_capacity(chunk.len());
                        got += chunk.len();
                    }
                    let resp = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(())
                        .unwrap();
                    let Ok(mut send) = respond.send_response(resp, false) else {
                        return;
                    };
                    let _ = send.send_data(Bytes::from(got.to_string()), false);
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    let _ = send.send_trailers(trailers);
                });
            }
        });
        grpc_route(&router, "grpc.example.com", "g", addr);
        let mut client = h2_client(router.h2c_addrs[0]).await;
        let req = http::Request::builder()
            .method("POST")
            .uri("http://grpc.example.com/upload")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let (resp, mut send) = client.send_request(req, false).unwrap();
        let mut resp = std::pin::pin!(resp);
        // One message every 250 ms for 2.5 s; an early answer (the 503) ends the upload.
        for _ in 0..10 {
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(250), &mut resp).await {
                let status = r.map(|r| r.status());
                panic!("answered while still uploading: {status:?}");
            }
            send.send_data(Bytes::from_static(b"0123456789"), false)
                .unwrap();
        }
        send.send_data(Bytes::new(), true).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .expect("no answer within 10 s")
            .expect("a response, not a reset");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let got = read_body(&mut body).await;
        assert_eq!(got, b"100");
        let trailers = body.trailers().await.unwrap().unwrap();
        assert_eq!(trailers["grpc-status"], "0");
    });
}
