//! HTTP/2 over TLS (ALPN h2), driven with curl's HTTP/2 client: requests are proxied to
//! HTTP/1.1 backends with the same routing and header rewriting as HTTP/1.1.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::client::self_signed;
use crate::support::{http_route, Backend, Reply};
use crate::{https, router_with_default, PemFiles};

/// Runs curl over HTTP/2 (`--http2`, certificate checked against the test CA); returns
/// (http version, status, body). Panics with a clear message when curl is missing.
fn curl(
    ca: &PemFiles,
    addr: std::net::SocketAddr,
    host: &str,
    extra: &[&str],
    stdin: Option<&[u8]>,
) -> (String, u16, String) {
    let url = format!("https://{host}:{}/", addr.port());
    let resolve = format!("{host}:{}:127.0.0.1", addr.port());
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--http2", "--max-time", "10", "--cacert"])
        .arg(&ca.cert)
        .args([
            "--resolve",
            &resolve,
            "-w",
            "\n%{http_version} %{http_code}",
        ])
        .args(extra);
    let has_url = extra.iter().any(|a| a.starts_with("https://"));
    if !has_url {
        cmd.arg(&url);
    }
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .expect("curl is needed for the HTTP/2 tests (apt-get install curl)");
    if let Some(data) = stdin {
        child.stdin.take().unwrap().write_all(data).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut it = tail.split_whitespace();
    let version = it.next().unwrap_or("").to_string();
    let code = it.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    (version, code, body.to_string())
}

#[test]
fn get_and_post_over_http2() {
    let pair = self_signed(&["a.example.com"]);
    let ca = PemFiles::write(&pair);
    let router = router_with_default(&pair);
    let b = Backend::start("b1");
    router.add_route(http_route("a.example.com", "web"));
    router.set_backends("web", &[&b]);

    let (v, code, body) = curl(
        &ca,
        https(&router),
        "a.example.com",
        &["-H", "X-Request-Id: abcdefghijklmnopqrstuvwxyz"],
        None,
    );
    assert_eq!((v.as_str(), code), ("2", 200), "{body}");
    let seen: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["version"], "HTTP/1.1", "backends get HTTP/1.1");
    let headers = seen["headers"].to_string().to_lowercase();
    assert!(
        headers.contains("\"x-forwarded-proto\",\"https\""),
        "{headers}"
    );
    assert!(
        headers.contains("abcdefghijklmnopqrstuvwxyz"),
        "valid request id kept: {headers}"
    );
    assert!(headers.contains("\"host\",\"a.example.com"), "{headers}");

    // A body with a length, and one of unknown length (re-chunked for the backend).
    let (v, code, body) = curl(
        &ca,
        https(&router),
        "a.example.com",
        &["--data-binary", "hello=world"],
        None,
    );
    assert_eq!((v.as_str(), code), ("2", 200));
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["body"],
        "hello=world"
    );
    let big = vec![b'z'; 300_000];
    let (v, code, body) = curl(
        &ca,
        https(&router),
        "a.example.com",
        &["-T", "-", "-X", "POST"],
        Some(&big),
    );
    assert_eq!((v.as_str(), code), ("2", 200));
    let seen: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["body"].as_str().map(str::len), Some(300_000));

    // Unknown host: the router's own 404.
    let (v, code, body) = curl(
        &ca,
        https(&router),
        "a.example.com",
        &["-H", "Host: nope.example.com"],
        None,
    );
    assert_eq!((v.as_str(), code), ("2", 404), "{body}");
}

#[test]
fn chunked_backend_response_is_decoded_for_http2() {
    let pair = self_signed(&["a.example.com"]);
    let ca = PemFiles::write(&pair);
    let router = router_with_default(&pair);
    let b = Backend::with_handler("chunky", |_req, conn| {
        let _ =
            conn.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kind: chunky\r\n\r\n");
        let _ = conn.write(b"6\r\nhello \r\n");
        let _ = conn.write(b"5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n");
        Reply::KeepAlive
    });
    router.add_route(http_route("a.example.com", "web"));
    router.set_backends("web", &[&b]);
    let (v, code, body) = curl(&ca, https(&router), "a.example.com", &["-i"], None);
    assert_eq!((v.as_str(), code), ("2", 200));
    assert!(body.ends_with("hello world"), "{body:?}");
    assert!(body.contains("x-kind: chunky"), "{body}");
    assert!(!body.to_lowercase().contains("transfer-encoding"), "{body}");
}

#[test]
fn many_streams_share_one_connection() {
    let pair = self_signed(&["a.example.com"]);
    let ca = PemFiles::write(&pair);
    let router = router_with_default(&pair);
    let b = Backend::start("b1");
    router.add_route(http_route("a.example.com", "web"));
    router.set_backends("web", &[&b]);
    let url = format!("https://a.example.com:{}/n", https(&router).port());
    let urls: Vec<String> = (0..30).map(|i| format!("{url}{i}")).collect();
    let mut args: Vec<&str> = vec!["--parallel", "--parallel-max", "30", "-o", "/dev/null"];
    for u in &urls {
        args.push(u);
        args.push("-o");
        args.push("/dev/null");
    }
    let (v, code, out) = curl(&ca, https(&router), "a.example.com", &args, None);
    assert_eq!((v.as_str(), code), ("2", 200), "{out}");
    assert_eq!(b.request_count(), 30);
}

#[test]
fn h2c_prior_knowledge_listener() {
    let router = crate::support::Router::builder()
        .arg("--h2c-addr")
        .arg("127.0.0.1:0")
        .start();
    let b = Backend::start("b1");
    router.add_route(http_route("a.example.com", "web"));
    router.set_backends("web", &[&b]);
    let addr = router.h2c_addrs[0];
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "--max-time",
            "10",
            "-H",
            "Host: a.example.com",
        ])
        .args(["-w", "\n%{http_version} %{http_code}"])
        .arg(format!("http://{addr}/h2c"))
        .output()
        .expect("curl is needed for the HTTP/2 tests");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, tail) = text.rsplit_once('\n').unwrap();
    assert_eq!(tail, "2 200", "{text}");
    let seen: Value = serde_json::from_str(body).unwrap();
    assert_eq!(seen["uri"], "/h2c");
    assert!(
        seen["headers"]
            .to_string()
            .contains("\"X-Forwarded-Proto\",\"http\""),
        "{body}"
    );
    // HTTP/1.1 on the h2c listener is not served.
    let r = Command::new("curl")
        .args([
            "-sS",
            "--http1.1",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://{addr}/"))
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&r.stdout), "200");
}

/// Spec §1.10: after a backend closes an idle pooled connection, the next request still
/// succeeds, over HTTP/2 as over HTTP/1.1 (a bodiless GET goes again on a fresh one).
#[test]
fn http2_request_on_a_pooled_connection_the_backend_closed_still_succeeds() {
    let router = crate::support::Router::builder()
        .arg("--h2c-addr")
        .arg("127.0.0.1:0")
        .start();
    let b = Backend::start("b1");
    router.add_route(http_route("a.example.com", "web"));
    router.set_backends("web", &[&b]);
    let addr = router.h2c_addrs[0];
    let get = || {
        let (head, _) = crate::support::h2c_curl(addr, "a.example.com", "/", &[]);
        head.first().cloned().unwrap_or_default()
    };
    for round in 1..=3 {
        assert!(get().starts_with("HTTP/2 200"), "round {round}");
        b.close_connections();
        assert!(crate::support::wait_until(
            std::time::Duration::from_secs(5),
            || b.closed() == round
        ));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(get().starts_with("HTTP/2 200"));
}

/// A backend that sends more than its response framed: the connection is not pooled
/// (as on HTTP/1.1), so the surplus is never read as the next request's response.
#[test]
fn http2_does_not_pool_a_backend_connection_with_bytes_past_the_body() {
    let router = crate::support::Router::builder()
        .arg("--h2c-addr")
        .arg("127.0.0.1:0")
        .start();
    let b = Backend::with_handler("b1", |req, conn| {
        if req.uri == "/dirty" {
            let _ = conn.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Le",
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
            let _ = conn.write(b"ngth: 6\r\n\r\nforged");
            return Reply::KeepAlive;
        }
        crate::support::handlers::echo(req, conn)
    });
    router.add_route(http_route("a.example.com", "web"));
    router.set_backends("web", &[&b]);
    let addr = router.h2c_addrs[0];
    let (head, body) = crate::support::h2c_curl(addr, "a.example.com", "/dirty", &[]);
    assert!(head[0].starts_with("HTTP/2 200"), "{head:?}");
    assert_eq!(body, "ok");
    std::thread::sleep(std::time::Duration::from_millis(100));
    for _ in 0..3 {
        let (head, body) = crate::support::h2c_curl(addr, "a.example.com", "/next", &[]);
        assert!(head[0].starts_with("HTTP/2 200"), "{head:?} {body}");
        assert!(body.contains("\"uri\":\"/next\""), "{body}");
    }
}

/// An HTTP/2 upload with `Expect: 100-continue` is answered with a 100 by the router (which
/// drops the field, as on HTTP/1.1), so the client sends its body at once instead of after
/// its own expect timeout.
#[test]
fn http2_expect_100_continue_is_answered() {
    let pair = self_signed(&["a.example.com"]);
    let ca = PemFiles::write(&pair);
    let router = router_with_default(&pair);
    let b = Backend::start("b1");
    router.add_route(http_route("a.example.com", "web"));
    router.set_backends("web", &[&b]);
    let body = vec![b'u'; 100 << 10];
    let started = std::time::Instant::now();
    let (v, code, out) = curl(
        &ca,
        https(&router),
        "a.example.com",
        &[
            "-H",
            "Expect: 100-continue",
            "--expect100-timeout",
            "8",
            "--data-binary",
            "@-",
        ],
        Some(&body),
    );
    let took = started.elapsed();
    assert_eq!((v.as_str(), code), ("2", 200), "{out}");
    let seen: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(seen["body"].as_str().map(str::len), Some(body.len()));
    assert!(
        took < std::time::Duration::from_secs(4),
        "the client waited for its expect timeout: {took:?}"
    );
}

/// A backend's 103 Early Hints reaches HTTP/2 clients (an informational HEADERS frame
/// before the response), as it reaches HTTP/1.1 ones.
#[test]
fn http2_relays_103_early_hints() {
    let router = crate::support::Router::builder()
        .arg("--h2c-addr")
        .arg("127.0.0.1:0")
        .start();
    let b = Backend::with_handler("b1", |_req, conn| {
        let _ = conn.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let _ = conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        Reply::KeepAlive
    });
    router.add_route(http_route("a.example.com", "web"));
    router.set_backends("web", &[&b]);
    let (head, rest) = crate::support::h2c_curl(router.h2c_addrs[0], "a.example.com", "/", &[]);
    assert!(head[0].starts_with("HTTP/2 103"), "{head:?} {rest:?}");
    assert!(
        head.iter().any(|l| l == "link: </style.css>; rel=preload"),
        "{head:?}"
    );
    assert!(rest.starts_with("HTTP/2 200"), "{rest:?}");
    assert!(rest.ends_with("\r\n\r\nok"), "{rest:?}");
}

/// One HTTP/2 response that never lets up (a backend writing flat out, a client reading as
/// fast) does not hold its core off route changes: on the epoll driver the backend read
/// and the hand-over to the h2 connection's task never wait on the driver, so the response
/// body loop yields every 1 MiB behind the core's other ready tasks (as the TCP relay does,
/// `a_saturating_tcp_stream_does_not_hold_off_route_changes`). One core, epoll, h2c; every
/// change must be applied by the core within 1 s.
#[test]
fn a_saturating_h2_stream_does_not_hold_off_route_changes() {
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    // A backend answering with an endless body, written as fast as it is taken.
    let fountain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fountain_addr = fountain.local_addr().unwrap();
    let (sent, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let (sent2, stop2) = (sent.clone(), stop.clone());
    std::thread::spawn(move || {
        for s in fountain.incoming() {
            let Ok(mut s) = s else { continue };
            let (sent, stop) = (sent2.clone(), stop2.clone());
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(n @ 1..) => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1099511627776\r\n\r\n");
                let chunk = vec![7u8; 64 * 1024];
                while !stop.load(Ordering::Relaxed) && s.write_all(&chunk).is_ok() {
                    sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            });
        }
    });
    let router = crate::support::Router::builder()
        .arg("--h2c-addr")
        .arg("127.0.0.1:0")
        .threads(1)
        .io_driver("epoll")
        .start();
    assert_eq!(router.driver(), "epoll");
    router.add_route(http_route("a.example.com", "web"));
    router.set_backend_addrs("web", &[(fountain_addr.to_string(), false)]);
    let addr = router.h2c_addrs[0];
    let mut curl = Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "--max-time",
            "120",
            "-o",
            "/dev/null",
            "-H",
            "Host: a.example.com",
        ])
        .arg(format!("http://{addr}/"))
        .stdout(Stdio::null())
        .spawn()
        .expect("curl is needed for the HTTP/2 tests");
    // Streaming at full speed.
    let start = Instant::now();
    while sent.load(Ordering::Relaxed) < 64 << 20 {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = curl.kill();
            panic!("the stream does not flow\n{}", router.log());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (took, rate) = router.time_route_changes(10, &sent);
    stop.store(true, Ordering::Relaxed);
    let _ = curl.kill();
    let _ = curl.wait();
    let slowest = *took.iter().max().unwrap();
    eprintln!(
        "route changes took {took:?} (slowest {slowest:?}) beside an h2 stream of {:.0} MiB/s",
        rate / (1 << 20) as f64
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a route change waited {slowest:?} for the core: {took:?}\n{}",
        router.log()
    );
}
