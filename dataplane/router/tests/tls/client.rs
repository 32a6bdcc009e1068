//! TLS test plumbing: rcgen keypairs, a rustls client (trusting only the test's own
//! self-signed certificates) and a minimal HTTP/1.1 reader over the TLS stream.

use crate::support::IO_TIMEOUT;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, StreamOwned, SupportedProtocolVersion,
};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

/// A self-signed certificate and its private key.
#[derive(Clone)]
pub struct Pair {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl Pair {
    /// `{"cert": .., "key": ..}` as routes and `POST /certificates` take it.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"cert": self.cert_pem, "key": self.key_pem})
    }
}

/// A fresh self-signed keypair for `names` (DNS SANs; `*.x` wildcards allowed).
pub fn self_signed(names: &[&str]) -> Pair {
    let c =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("rcgen");
    Pair {
        cert_pem: c.cert.pem(),
        key_pem: c.key_pair.serialize_pem(),
        der: c.cert.der().to_vec(),
    }
}

/// A client config trusting exactly `roots`, offering ALPN http/1.1; `versions` limits the
/// protocol versions (None: rustls' safe defaults, TLS 1.2 and 1.3).
pub fn client_config(
    roots: &[&Pair],
    versions: Option<&[&'static SupportedProtocolVersion]>,
) -> Arc<ClientConfig> {
    let mut store = RootCertStore::empty();
    for p in roots {
        store
            .add(CertificateDer::from(p.der.clone()))
            .expect("add root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider);
    let builder = match versions {
        Some(v) => builder.with_protocol_versions(v),
        None => builder.with_safe_default_protocol_versions(),
    }
    .expect("protocol versions");
    let mut cfg = builder.with_root_certificates(store).with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// One TLS client connection with a read buffer.
pub struct TlsConn {
    pub tls: StreamOwned<ClientConnection, TcpStream>,
    buf: Vec<u8>,
}

/// A parsed response (bodies framed by Content-Length, chunked, or EOF).
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The request as the echo backend saw it.
    pub fn seen(&self) -> crate::support::SeenRequest {
        assert_eq!(self.status, 200, "expected a backend echo, got {self:?}");
        let v: serde_json::Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("echo body is not JSON ({e}): {}", self.text()));
        crate::support::SeenRequest::from_json(&v)
    }
}

impl TlsConn {
    /// Connects and completes the handshake with SNI `sni` (an IP address sends no SNI).
    pub fn connect(addr: SocketAddr, sni: &str, cfg: Arc<ClientConfig>) -> io::Result<TlsConn> {
        Self::connect_with_prefix(addr, sni, cfg, b"")
    }

    /// Like [`TlsConn::connect`] but writes `prefix` (e.g. a PROXY header) in the clear
    /// before the ClientHello.
    pub fn connect_with_prefix(
        addr: SocketAddr,
        sni: &str,
        cfg: Arc<ClientConfig>,
        prefix: &[u8],
    ) -> io::Result<TlsConn> {
        Self::connect_with_prefix_parts(addr, sni, cfg, &[prefix])
    }

    /// Writes each of `parts` in the clear (50 ms apart), then handshakes.
    pub fn connect_with_prefix_parts(
        addr: SocketAddr,
        sni: &str,
        cfg: Arc<ClientConfig>,
        parts: &[&[u8]],
    ) -> io::Result<TlsConn> {
        Self::connect_with_prefix_parts_between(addr, sni, cfg, parts, &mut || {
            std::thread::sleep(std::time::Duration::from_millis(50))
        })
    }

    /// Like [`TlsConn::connect_with_prefix_parts`], running `between` (instead of a
    /// 50 ms pause) after each part but the last.
    pub fn connect_with_prefix_parts_between(
        addr: SocketAddr,
        sni: &str,
        cfg: Arc<ClientConfig>,
        parts: &[&[u8]],
        between: &mut dyn FnMut(),
    ) -> io::Result<TlsConn> {
        let mut sock = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        sock.set_read_timeout(Some(IO_TIMEOUT))?;
        sock.set_write_timeout(Some(IO_TIMEOUT))?;
        sock.set_nodelay(true)?;
        for (i, part) in parts.iter().filter(|p| !p.is_empty()).enumerate() {
            if i > 0 {
                between();
            }
            sock.write_all(part)?;
        }
        let name = ServerName::try_from(sni.to_string())
            .map_err(|e| io::Error::other(format!("server name {sni:?}: {e}")))?;
        let mut conn = ClientConnection::new(cfg, name).map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        Ok(TlsConn {
            tls: StreamOwned::new(conn, sock),
            buf: Vec::new(),
        })
    }

    /// DER of the leaf certificate the server presented.
    pub fn peer_cert(&self) -> Vec<u8> {
        self.tls
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec())
            .expect("server presented no certificate")
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.tls
            .write_all(bytes)
            .and_then(|_| self.tls.flush())
            .unwrap_or_else(|e| panic!("TLS write: {e}"));
    }

    pub fn get(&mut self, host: &str, path: &str) -> Resp {
        self.request(&format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"))
    }

    pub fn request(&mut self, raw: &str) -> Resp {
        self.send(raw.as_bytes());
        self.response()
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 16384];
        let n = self.tls.read(&mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    fn fill_or_eof(&mut self, what: &str) -> io::Result<()> {
        match self.fill()? {
            0 => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("EOF while reading {what}"),
            )),
            _ => Ok(()),
        }
    }

    pub fn read_exact_n(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            self.fill_or_eof("body")?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn read_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                return Ok(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            self.fill_or_eof("line")?;
        }
    }

    /// Reads until EOF (a TLS close_notify or a plain TCP close both count).
    pub fn read_to_end(&mut self) -> io::Result<Vec<u8>> {
        loop {
            match self.fill() {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
        }
        Ok(std::mem::take(&mut self.buf))
    }

    /// Reads until the server's close_notify. A TCP close without one (what a strict
    /// client reports as a truncation) is an `UnexpectedEof` error.
    pub fn read_to_close_notify(&mut self) -> io::Result<Vec<u8>> {
        while self.fill()? > 0 {}
        Ok(std::mem::take(&mut self.buf))
    }

    pub fn response(&mut self) -> Resp {
        self.try_response()
            .unwrap_or_else(|e| panic!("reading response over TLS: {e}"))
    }

    pub fn try_response(&mut self) -> io::Result<Resp> {
        let end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            self.fill_or_eof("response head")?;
        };
        let head: Vec<u8> = self.buf.drain(..end + 4).collect();
        let text = String::from_utf8_lossy(&head[..end]).into_owned();
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        for l in lines {
            let (n, v) = l
                .split_once(':')
                .ok_or_else(|| io::Error::other(format!("bad header {l:?}")))?;
            headers.push((n.to_string(), v.trim().to_string()));
        }
        let mut resp = Resp {
            status,
            headers,
            body: Vec::new(),
        };
        if status / 100 == 1 || status == 204 || status == 304 {
            return Ok(resp);
        }
        let chunked = resp
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            loop {
                let line = self.read_line()?;
                let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| io::Error::other(format!("bad chunk line {line:?}")))?;
                if size == 0 {
                    while !self.read_line()?.is_empty() {}
                    break;
                }
                let data = self.read_exact_n(size)?;
                resp.body.extend_from_slice(&data);
                self.read_exact_n(2)?;
            }
        } else if let Some(n) = resp.header("content-length") {
            let n: usize = n
                .trim()
                .parse()
                .map_err(|_| io::Error::other("content-length"))?;
            resp.body = self.read_exact_n(n)?;
        } else {
            resp.body = self.read_to_end()?;
        }
        Ok(resp)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
