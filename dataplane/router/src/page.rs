//! Loads the custom 503 page once at start (spec §1.1), capped at 1,000,000 bytes either
//! way: from `--error-503-page FILE`, or fetched from `ERROR_503_PAGE_URL` (plain HTTP/1.1
//! GET, must answer 200).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

const MAX: usize = 1_000_000;

/// Reads the page from `path`; a bigger file than [`MAX`] is refused (it would be held in
/// memory and sent with every router 503).
pub fn read_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    let f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut content = Vec::new();
    f.take(MAX as u64 + 1)
        .read_to_end(&mut content)
        .with_context(|| format!("reading {}", path.display()))?;
    if content.len() > MAX {
        bail!(
            "--error-503-page {}: larger than {MAX} bytes",
            path.display()
        );
    }
    Ok(content)
}

pub fn fetch(url: &str) -> anyhow::Result<Vec<u8>> {
    let rest = url
        .strip_prefix("http://")
        .context("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr_str = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = addr_str.to_socket_addrs()?.next().context("no address")?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.take((MAX + 64 * 1024) as u64).read_to_end(&mut raw)?;
    let info = match flynn_http::parse_response(&raw, flynn_http::Method::Get) {
        Ok(Some(i)) => i,
        _ => bail!("invalid HTTP response"),
    };
    if info.status != 200 {
        bail!("status {} (must be 200)", info.status);
    }
    let mut body = flynn_http::BodyReader::new(info.framing);
    let rest = &raw[info.head_len..];
    let adv = body
        .advance(rest)
        .map_err(|e| anyhow::anyhow!("bad body: {e}"))?;
    let content = &rest[..adv.used];
    let content = if matches!(info.framing, flynn_http::Framing::Chunked) {
        dechunk(content)
    } else {
        content.to_vec()
    };
    if content.len() > MAX {
        bail!("body larger than {MAX} bytes");
    }
    Ok(content)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size_str = std::str::from_utf8(&b[..eol]).unwrap_or("0");
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        if size == 0 || eol + 2 + size > b.len() {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[(eol + 4 + size).min(b.len())..];
    }
    out
}
