//! HTTP/2 streams against HTTP/1.1 backends that misbehave at the TCP level (a reset in the
//! middle of a body, a reset pooled connection), driven with the `h2` crate's client on a
//! current-thread tokio runtime and raw `std::net` backends, so what the HTTP/2 client is
//! told (END_STREAM or RST_STREAM, which status) is seen exactly.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::support::{http_route, Router};

fn h2c_router() -> (Router, tokio::runtime::Runtime) {
    let router = Router::builder()
        .arg("--h2c-addr")
        .arg("127.0.0.1:0")
        .start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (router, rt)
}

/// An HTTP/2 client connected to the router's h2c listener.
async fn h2_client(router: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let sock = tokio::net::TcpStream::connect(router).await.unwrap();
    let (client, conn) = h2::client::handshake(sock).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client.ready().await.unwrap()
}

/// Sends a bodiless request and waits (5 s at most) for its response head.
async fn request(
    client: &mut h2::client::SendRequest<Bytes>,
    method: &str,
    uri: &str,
) -> http::Response<h2::RecvStream> {
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("no response head within 5 s")
        .unwrap()
}

/// Reads `s` until a whole request head has arrived; returns its request line (empty at
/// EOF).
fn read_head(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(n) if n > 0 => got.extend_from_slice(&b[..n]),
            _ => return String::new(),
        }
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    text.lines().next().unwrap_or("").to_string()
}

/// Closes `s` with a TCP RST (SO_LINGER 0) instead of a FIN.
fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

/// A close-delimited response (no Content-Length, not chunked) whose backend resets the
/// connection part-way is a truncated body: the HTTP/2 client gets the stream reset, not
/// END_STREAM, which would pass the cut-off body as complete (as HTTP/1.1 clients get no
/// clean end either).
#[test]
fn a_close_delimited_body_cut_by_a_reset_resets_the_stream() {
    let (router, rt) = h2c_router();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    router.add_route(http_route("cut.example.com", "web"));
    router.set_backend_addrs("web", &[(l.local_addr().unwrap().to_string(), false)]);
    let backend = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        read_head(&mut s);
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
            .unwrap();
        s.write_all(&[b'x'; 1000]).unwrap();
        // The router relays the first part before the connection is reset.
        std::thread::sleep(Duration::from_millis(200));
        reset(s);
    });
    let (got, end) = rt.block_on(async {
        let mut client = h2_client(router.h2c_addrs[0]).await;
        let resp = request(&mut client, "GET", "http://cut.example.com/").await;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut got = 0;
        loop {
            let next = tokio::time::timeout(Duration::from_secs(5), body.data())
                .await
                .expect("the stream neither ended nor was reset within 5 s");
            match next {
                Some(Ok(chunk)) => {
                    got += chunk.len();
                    let _ = body.flow_control().release_capacity(chunk.len());
                }
                Some(Err(e)) => break (got, Err(e.reason())),
                None => break (got, Ok(())),
            }
        }
    });
    backend.join().unwrap();
    assert_eq!(
        end,
        Err(Some(h2::Reason::INTERNAL_ERROR)),
        "a body cut short by a reset ended as complete ({got} bytes)"
    );
    assert!(got <= 1000, "{got}");
}

/// As on HTTP/1.1: a request whose head cannot be written to a reused pooled connection
/// (the backend reset it while it idled) never reached the backend, so it goes again on a
/// fresh connection whatever its method; a bodiless POST is answered by the backend, not
/// with a 503.
///
/// The backend resets its connection right after each `/warm` response and the POST
/// follows within the pool's no-peek window (1 ms): then the router's write fails and the
/// POST goes again (`flynn_router_upstream_retries_total`). A round that takes longer finds
/// the connection closed by its liveness peek instead and dials afresh, without a retry:
/// rounds go on (at most 50, or 30 s) until one retry is counted, and the test fails if
/// none is, as then it did not test the failed head write.
#[test]
fn a_post_whose_head_write_fails_on_a_reused_connection_goes_again() {
    let (router, rt) = h2c_router();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    router.add_route(http_route("stale.example.com", "web"));
    router.set_backend_addrs("web", &[(l.local_addr().unwrap().to_string(), false)]);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let accepted = Arc::new(AtomicUsize::new(0));
    let (closed_tx, closed_rx) = mpsc::channel();
    {
        let (seen, accepted) = (seen.clone(), accepted.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { break };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (seen, closed_tx) = (seen.clone(), closed_tx.clone());
                std::thread::spawn(move || {
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    loop {
                        let line = read_head(&mut s);
                        if line.is_empty() {
                            return;
                        }
                        seen.lock().unwrap().push(line.clone());
                        let body: &[u8] = if line.starts_with("GET") {
                            b"ok"
                        } else {
                            b"posted"
                        };
                        let head =
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                        let _ = s.write_all(&[head.as_bytes(), body].concat());
                        if line.starts_with("GET /warm") {
                            reset(s);
                            let _ = closed_tx.send(());
                            return;
                        }
                    }
                });
            }
        });
    }
    let mut client = rt.block_on(h2_client(router.h2c_addrs[0]));
    let (mut statuses, mut retries) = (Vec::new(), 0);
    let started = Instant::now();
    while statuses.len() < 50 && started.elapsed() < Duration::from_secs(30) {
        let status = rt.block_on(async {
            let resp = request(&mut client, "GET", "http://stale.example.com/warm").await;
            assert_eq!(resp.status(), 200);
            let mut body = resp.into_body();
            while let Some(chunk) = body.data().await {
                chunk.unwrap();
            }
            // The backend has reset that connection (which the router pooled).
            closed_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            let resp = request(&mut client, "POST", "http://stale.example.com/form").await;
            resp.status().as_u16()
        });
        statuses.push(status);
        // Only a POST can fail on a reused connection here: each `/warm` reuses the last
        // POST's connection, which the backend keeps open.
        retries = router.metric("upstream_retries_total");
        if retries > 0 && statuses.len() >= 3 {
            break;
        }
    }
    let rounds = statuses.len();
    let posts = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("POST"))
        .count();
    assert_eq!(
        statuses,
        vec![200; rounds],
        "seen: {:?}",
        seen.lock().unwrap()
    );
    assert_eq!(posts, rounds, "each POST reached the backend once");
    // Each round's POST on a fresh connection (its `/warm` reuses the last one).
    assert!(accepted.load(Ordering::SeqCst) <= rounds + 1);
    assert!(
        retries > 0,
        "no POST went again after a failed head write on a reused connection in {rounds} \
         rounds (each found its connection closed by the liveness peek)"
    );
}
