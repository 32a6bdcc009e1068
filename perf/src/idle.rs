//! The idle-10k scenario: how much memory a proxy spends holding idle keep-alive clients.
//!
//! Opens `conns` connections one after another, sends one keep-alive `GET /` on each and reads
//! the response (so the proxy has accepted, parsed and answered, and the connection is now
//! idle), then compares the proxy's RSS with its RSS before. Sequential on purpose: the proxy
//! only ever needs one upstream connection, so the delta is client-side state.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::procfs;
use crate::targets::HOST;

#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub wanted: usize,
    pub opened: usize,
    pub rss_before: u64,
    pub rss_after: u64,
    pub seconds: f64,
    /// Why it stopped early, if it did.
    pub error: Option<String>,
}

impl Outcome {
    /// RSS growth scaled to 10 000 connections, in bytes.
    pub fn delta_per_10k(&self) -> Option<f64> {
        if self.opened == 0 {
            return None;
        }
        let delta = self.rss_after as f64 - self.rss_before as f64;
        Some(delta * 10_000.0 / self.opened as f64)
    }
}

fn one_request(stream: &mut TcpStream, buf: &mut [u8]) -> Result<()> {
    write!(stream, "GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n")?;
    let mut filled = 0;
    loop {
        let n = stream.read(&mut buf[filled..])?;
        if n == 0 {
            bail!("connection closed before the response");
        }
        filled += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = resp.parse(&buf[..filled])? {
            if resp.code != Some(200) {
                bail!("status {:?}", resp.code);
            }
            let len: usize = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .context("no content-length")?;
            if filled >= head + len {
                return Ok(());
            }
        }
        if filled == buf.len() {
            bail!("response larger than {} bytes", buf.len());
        }
    }
}

/// Runs the scenario against `port`, accounting memory to the process tree under `pid`.
/// `settle`: how long the connections sit idle before the RSS is read (a proxy may
/// shed per-connection state of connections that stay idle; nginx and HAProxy do not
/// change with it).
pub fn run(port: u16, pid: u32, conns: usize, budget: Duration, settle: Duration) -> Outcome {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let start = Instant::now();
    let mut out = Outcome {
        wanted: conns,
        rss_before: procfs::rss_bytes(pid),
        ..Outcome::default()
    };
    let mut streams = Vec::with_capacity(conns);
    let mut buf = vec![0u8; 16 * 1024];
    while streams.len() < conns {
        if start.elapsed() > budget {
            out.error = Some(format!("gave up after {budget:?}"));
            break;
        }
        let attempt = (|| -> Result<TcpStream> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.set_nodelay(true)?;
            one_request(&mut s, &mut buf)?;
            Ok(s)
        })();
        match attempt {
            Ok(s) => streams.push(s),
            Err(e) => {
                out.error = Some(format!("connection {}: {e:#}", streams.len() + 1));
                break;
            }
        }
    }
    out.opened = streams.len();
    // Let the connections be idle for a while before measuring.
    std::thread::sleep(settle);
    out.rss_after = procfs::rss_bytes(pid);
    out.seconds = start.elapsed().as_secs_f64();
    drop(streams);
    // Give the proxy a moment to close 10k sockets before the next target is measured.
    std::thread::sleep(Duration::from_secs(1));
    out
}
