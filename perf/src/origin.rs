//! The origin every target proxies to: a tiny thread-per-core monoio HTTP/1.1 server.
//!
//! One runtime per thread, each with its own SO_REUSEPORT listener (the kernel spreads
//! connections). Every request gets a fixed response: 13 bytes `hello, world\n`, or 64 KiB for
//! path `/64k`. Keep-alive and pipelining are supported; `Connection: close` and HTTP/1.0
//! without keep-alive close after the response. Request bodies (Content-Length) are discarded.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::{ListenerOpts, TcpListener, TcpStream};

pub const SMALL_BODY: &[u8] = b"hello, world\n";
pub const BIG_LEN: usize = 64 * 1024;
const MAX_HEAD: usize = 64 * 1024;

/// Pre-rendered responses, leaked once so they can be written without copying.
struct Responses {
    small: &'static [u8],
    small_close: &'static [u8],
    big: &'static [u8],
    big_close: &'static [u8],
    bad_request: &'static [u8],
}

fn render(body: &[u8], close: bool) -> &'static [u8] {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nServer: flynn-perf-origin\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes();
    out.extend_from_slice(body);
    Box::leak(out.into_boxed_slice())
}

impl Responses {
    fn leak() -> &'static Responses {
        let big = vec![b'x'; BIG_LEN];
        Box::leak(Box::new(Responses {
            small: render(SMALL_BODY, false),
            small_close: render(SMALL_BODY, true),
            big: render(&big, false),
            big_close: render(&big, true),
            bad_request:
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        }))
    }
}

/// Serves on `addr` with `threads` runtimes until killed. If `parent` is given, exits when the
/// parent process goes away (so a SIGKILLed harness does not leave origins behind).
pub fn run(addr: SocketAddr, threads: usize, parent: Option<u32>) -> Result<()> {
    let responses = Responses::leak();
    let mut handles = Vec::new();
    for i in 0..threads.max(1) {
        let handle = std::thread::Builder::new()
            .name(format!("origin-{i}"))
            .spawn(move || serve_thread(addr, responses))
            .context("spawning origin thread")?;
        handles.push(handle);
    }
    println!("flynn-perf origin listening on {addr} with {threads} threads");
    if let Some(parent) = parent {
        std::thread::spawn(move || loop {
            if std::os::unix::process::parent_id() != parent {
                std::process::exit(0);
            }
            std::thread::sleep(Duration::from_millis(500));
        });
    }
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("origin thread panicked"))??;
    }
    Ok(())
}

fn serve_thread(addr: SocketAddr, responses: &'static Responses) -> Result<()> {
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .with_entries(1024)
        .enable_timer()
        .build()
        .context("building monoio runtime")?;
    rt.block_on(async move {
        let opts = ListenerOpts::new()
            .reuse_port(true)
            .reuse_addr(true)
            .backlog(4096);
        let listener = TcpListener::bind_with_config(addr, &opts)
            .with_context(|| format!("binding {addr}"))?;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    monoio::spawn(serve_conn(stream, responses));
                }
                Err(e) => {
                    eprintln!("origin: accept: {e}");
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    })
}

/// What one parsed request asks for.
struct Request {
    head_len: usize,
    body_len: usize,
    big: bool,
    close: bool,
}

/// Parses one request head from `buf`: `Ok(None)` if incomplete.
fn parse_request(buf: &[u8]) -> Result<Option<Request>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let mut close = req.version == Some(0);
    let mut body_len = 0usize;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            let v = std::str::from_utf8(h.value).unwrap_or("");
            for token in v.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            body_len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or(())?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(()); // chunked uploads are out of scope for a benchmark origin
        }
    }
    let big = req
        .path
        .map(|p| p.split('?').next() == Some("/64k"))
        .unwrap_or(false);
    Ok(Some(Request {
        head_len,
        body_len,
        big,
        close,
    }))
}

async fn serve_conn(mut stream: TcpStream, responses: &'static Responses) {
    let _ = stream.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(8 * 1024);
    let mut batch: Vec<u8> = Vec::new();
    // Request-body bytes still to discard from upcoming reads.
    let mut skip = 0usize;
    loop {
        // Read more input, appending after what is buffered.
        if buf.len() == buf.capacity() {
            if buf.capacity() >= MAX_HEAD {
                let _ = stream.write_all(responses.bad_request).await;
                return;
            }
            buf.reserve(buf.capacity());
        }
        let len = buf.len();
        let cap = buf.capacity();
        let (res, slice) = stream.read(buf.slice_mut(len..cap)).await;
        buf = slice.into_inner();
        match res {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if skip > 0 {
            let n = skip.min(buf.len());
            buf.drain(..n);
            skip -= n;
        }

        // Answer every complete request in the buffer.
        let mut consumed = 0;
        let mut single: Option<&'static [u8]> = None;
        let mut count = 0;
        let mut close = false;
        batch.clear();
        while consumed < buf.len() && !close {
            let req = match parse_request(&buf[consumed..]) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(()) => {
                    let _ = stream.write_all(responses.bad_request).await;
                    return;
                }
            };
            close = req.close;
            let resp = match (req.big, req.close) {
                (false, false) => responses.small,
                (false, true) => responses.small_close,
                (true, false) => responses.big,
                (true, true) => responses.big_close,
            };
            if count == 1 {
                batch.extend_from_slice(single.unwrap_or_default());
            }
            if count >= 1 {
                batch.extend_from_slice(resp);
            }
            single = Some(resp);
            count += 1;
            consumed += req.head_len;
            let available = buf.len() - consumed;
            if req.body_len > available {
                skip = req.body_len - available;
                consumed = buf.len();
            } else {
                consumed += req.body_len;
            }
        }
        buf.drain(..consumed);

        let written = match count {
            0 => continue,
            1 => stream.write_all(single.unwrap_or_default()).await.0,
            _ => {
                let (res, b) = stream.write_all(std::mem::take(&mut batch)).await;
                batch = b;
                res
            }
        };
        if written.is_err() || close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keepalive_and_close() {
        let r = parse_request(b"GET /64k HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\n")
            .unwrap()
            .unwrap();
        assert!(r.big && !r.close);
        assert_eq!(r.head_len, 30);
        let r = parse_request(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(r.close && !r.big);
        let r = parse_request(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(r.close);
        let r = parse_request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!r.close);
        let r = parse_request(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(r.body_len, 5);
        assert!(parse_request(b"GET / HTTP/1.1\r\nHost").unwrap().is_none());
        assert!(parse_request(b"\x01\x02 nonsense\r\n\r\n").is_err());
    }
}
