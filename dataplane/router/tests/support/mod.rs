//! Shared helpers for the router integration tests: a guard around a real `flynn-router`
//! process, a raw HTTP/1.1 client and scriptable backend servers, all on `std::net` and
//! threads so every test sees the exact bytes on the wire.
//!
//! Everything is bounded in time: sockets carry 5 s timeouts and waits carry deadlines, so
//! a hung router fails a test instead of hanging CI. Everything listens on 127.0.0.1 port 0
//! (TCP route ranges come from [`tcp_range`]).

#![allow(dead_code, unused_imports)]

pub mod backend;
pub mod client;
pub mod router;

pub use backend::{
    black_hole, connecting_to, dead_addr, handlers, wait_connecting_to, Backend, BackendConn,
    Reply, SeenRequest, TcpBackend,
};
pub use client::{connect_and_reset, get, Conn, Response};
pub use router::{api_call, tcp_range, Router, RouterBuilder};

use std::time::{Duration, Instant};

/// Read/write timeout of every test socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// `{"type":"http","domain":..,"service":..}`.
pub fn http_route(domain: &str, service: &str) -> serde_json::Value {
    serde_json::json!({"type": "http", "domain": domain, "service": service})
}

/// `{"type":"http","domain":..,"service":..,"path":..}`.
pub fn http_path_route(domain: &str, path: &str, service: &str) -> serde_json::Value {
    serde_json::json!({"type": "http", "domain": domain, "service": service, "path": path})
}

/// `{"type":"tcp","port":..,"service":..}`.
pub fn tcp_route(port: u16, service: &str) -> serde_json::Value {
    serde_json::json!({"type": "tcp", "port": port, "service": service})
}

/// A fresh directory under the system temp dir, unique per process, thread and call, removed
/// (with its contents) when dropped, so a failing test leaves nothing behind either.
pub struct TestDir(std::path::PathBuf);

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "flynn-{tag}-{}-{:?}-{n}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        TestDir(dir)
    }
}

impl std::ops::Deref for TestDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// True when `s` looks like a lowercase or uppercase hyphenated UUID (8-4-4-4-12 hex).
pub fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// One request with curl over HTTP/2 with prior knowledge (an h2c listener) to
/// `http://<addr><path>` with `Host: <host>` and the extra `headers`: (status line and
/// header lines, body). Panics with a clear message when curl is missing.
pub fn h2c_curl(
    addr: std::net::SocketAddr,
    host: &str,
    path: &str,
    headers: &[&str],
) -> (Vec<String>, String) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--http2-prior-knowledge",
        "--max-time",
        "10",
        "-D",
        "-",
    ])
    .args(["-H", &format!("Host: {host}")]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .arg(format!("http://{addr}{path}"))
        .output()
        .expect("curl is needed for the HTTP/2 tests (apt-get install curl)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.lines().map(str::to_string).collect(), body.to_string())
}

/// Writes up to `total` bytes to `s` in 1 MiB writes (each may block up to 20 s) until a
/// write fails: what a peer that stops reading lets through, and how long that took.
pub fn write_until_refused(
    s: &mut std::net::TcpStream,
    total: usize,
) -> (usize, std::time::Duration) {
    use std::io::Write;
    s.set_write_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let start = std::time::Instant::now();
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0;
    while sent < total {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    (sent, start.elapsed())
}
