//! A raw HTTP/1.1 client: write exact bytes, parse exactly one response at a time.

use super::backend::SeenRequest;
use super::IO_TIMEOUT;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

/// Header or trailer fields in wire order.
pub type Fields = Vec<(String, String)>;

/// One client connection with a read buffer (bytes past a response stay buffered).
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// A parsed response. Header names keep their case and order.
#[derive(Debug, Clone)]
pub struct Response {
    pub version: String,
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
    pub chunked: bool,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// Every value of header `name`.
    pub fn headers_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
    /// True when a `Connection` header lists `token`.
    pub fn connection_has(&self, token: &str) -> bool {
        self.headers_all("connection")
            .iter()
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {self:?}"))
    }
    /// The request as the test backend saw it (the backend's JSON echo body).
    pub fn seen(&self) -> SeenRequest {
        assert_eq!(self.status, 200, "expected a backend echo, got {self:?}");
        SeenRequest::from_json(&self.json())
    }
    /// The name of the backend that answered (from its JSON echo body).
    pub fn backend(&self) -> String {
        self.seen().backend
    }
}

/// Response head parsed by [`Conn::read_head`].
#[derive(Debug, Clone)]
pub struct Head {
    pub version: String,
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn is_chunked(&self) -> bool {
        self.headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("transfer-encoding")
                && v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("chunked"))
        })
    }
    fn content_length(&self) -> Option<usize> {
        self.header("content-length")
            .map(|v| v.trim().parse().expect("Content-Length"))
    }
}

/// Connects to `addr` and resets the connection at once (SO_LINGER 0, close): what a
/// client that gives up mid-connect leaves in the server's accept queue.
pub fn connect_and_reset(addr: SocketAddr) {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

/// `GET path` with `Host: host` on a fresh connection; one response.
pub fn get(addr: SocketAddr, host: &str, path: &str) -> Response {
    let mut c = Conn::connect(addr);
    c.get(host, path)
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> Conn {
        Self::try_connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
    }

    /// A connection whose receive buffer is `rcvbuf` bytes (set before it connects, so
    /// the window it offers stays small): a peer that writes more than it reads soon
    /// blocks.
    pub fn connect_small_buffer(addr: SocketAddr, rcvbuf: usize) -> Conn {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )
        .unwrap();
        s.set_recv_buffer_size(rcvbuf).unwrap();
        s.connect_timeout(&addr.into(), IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        let stream: TcpStream = s.into();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn try_connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
        })
    }

    pub fn set_read_timeout(&self, t: Duration) {
        self.stream.set_read_timeout(Some(t)).unwrap();
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("client write: {e}"));
    }

    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// `GET path HTTP/1.1` with `Host: host`, then one response.
    pub fn get(&mut self, host: &str, path: &str) -> Response {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
        self.response()
    }

    /// Sends `raw` and reads one response.
    pub fn request(&mut self, raw: &str) -> Response {
        self.send(raw.as_bytes());
        self.response()
    }

    /// Reads more bytes into the buffer; Ok(0) at EOF.
    fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 16384];
        let n = self.stream.read(&mut tmp)?;
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

    /// One response; panics (with the reason) on timeout, EOF or a parse error.
    pub fn response(&mut self) -> Response {
        self.try_response()
            .unwrap_or_else(|e| panic!("reading response: {e}"))
    }

    /// The final response, skipping interim 1xx responses other than 101 (RFC 9110 §15.2:
    /// a client must accept any number of them).
    pub fn final_response(&mut self) -> Response {
        loop {
            let resp = self.response();
            if resp.status / 100 != 1 || resp.status == 101 {
                return resp;
            }
        }
    }

    /// One response (1xx/204/304 carry no body).
    pub fn try_response(&mut self) -> io::Result<Response> {
        let head = self.read_head()?;
        let bodyless = head.status / 100 == 1 || head.status == 204 || head.status == 304;
        self.finish(head, bodyless)
    }

    /// Reads the body of `head`; for HEAD requests pass `bodyless = true`.
    pub fn finish(&mut self, head: Head, bodyless: bool) -> io::Result<Response> {
        let chunked = head.is_chunked();
        let (body, trailers) = if bodyless {
            (Vec::new(), Vec::new())
        } else if chunked {
            self.read_chunked()?
        } else if let Some(n) = head.content_length() {
            (self.read_exact_n(n)?, Vec::new())
        } else {
            (self.read_to_end()?, Vec::new())
        };
        Ok(Response {
            version: head.version,
            status: head.status,
            reason: head.reason,
            headers: head.headers,
            body,
            trailers,
            chunked,
        })
    }

    /// Reads a response head (status line and headers).
    pub fn read_head(&mut self) -> io::Result<Head> {
        let end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if self.buf.len() > 1 << 20 {
                return Err(io::Error::other("response head over 1 MiB"));
            }
            self.fill_or_eof("response head")?;
        };
        let head: Vec<u8> = self.buf.drain(..end + 4).collect();
        let text = String::from_utf8_lossy(&head[..end]).into_owned();
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("").to_string();
        let status = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
        let reason = parts.next().unwrap_or("").to_string();
        let headers = parse_fields(lines)?;
        Ok(Head {
            version,
            status,
            reason,
            headers,
        })
    }

    /// Exactly `n` bytes (buffered first).
    pub fn read_exact_n(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            self.fill_or_eof("body")?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Everything until EOF.
    pub fn read_to_end(&mut self) -> io::Result<Vec<u8>> {
        while self.fill()? > 0 {}
        Ok(std::mem::take(&mut self.buf))
    }

    /// Whatever is available: the buffer if non-empty, else one read (empty at EOF).
    pub fn read_some(&mut self) -> io::Result<Vec<u8>> {
        if self.buf.is_empty() {
            self.fill()?;
        }
        Ok(std::mem::take(&mut self.buf))
    }

    fn read_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                return Ok(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            self.fill_or_eof("chunked framing")?;
        }
    }

    /// The next chunk's data of a chunked body; `None` after the last chunk (its trailers
    /// are then consumed and returned through `trailers`).
    pub fn read_chunk(
        &mut self,
        trailers: &mut Vec<(String, String)>,
    ) -> io::Result<Option<Vec<u8>>> {
        let line = self.read_line()?;
        let size_str = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_str, 16)
            .map_err(|_| io::Error::other(format!("bad chunk size line {line:?}")))?;
        if size == 0 {
            loop {
                let l = self.read_line()?;
                if l.is_empty() {
                    break;
                }
                trailers.extend(parse_fields(std::iter::once(l.as_str()))?);
            }
            return Ok(None);
        }
        let data = self.read_exact_n(size)?;
        let crlf = self.read_exact_n(2)?;
        if crlf != b"\r\n" {
            return Err(io::Error::other("chunk data not followed by CRLF"));
        }
        Ok(Some(data))
    }

    fn read_chunked(&mut self) -> io::Result<(Vec<u8>, Fields)> {
        let mut body = Vec::new();
        let mut trailers = Vec::new();
        while let Some(chunk) = self.read_chunk(&mut trailers)? {
            body.extend_from_slice(&chunk);
        }
        Ok((body, trailers))
    }

    /// Asserts the peer closes the connection (EOF or reset) within the read timeout and
    /// sends nothing more before that.
    pub fn expect_closed(&mut self) {
        match self.closed_state() {
            Ok(()) => {}
            Err(e) => panic!("expected the connection to be closed: {e}"),
        }
    }

    /// Ok when the connection reads EOF/reset with no further data pending.
    pub fn closed_state(&mut self) -> Result<(), String> {
        if !self.buf.is_empty() {
            return Err(format!(
                "unexpected bytes {:?}",
                String::from_utf8_lossy(&self.buf)
            ));
        }
        let mut tmp = [0u8; 1024];
        match self.stream.read(&mut tmp) {
            Ok(0) => Ok(()),
            Ok(n) => Err(format!(
                "unexpected bytes {:?}",
                String::from_utf8_lossy(&tmp[..n])
            )),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(format!("still open after timeout ({e})")),
        }
    }

    /// Asserts nothing arrives for `dur` (the connection stays open and silent).
    pub fn expect_quiet(&mut self, dur: Duration) {
        assert!(
            self.buf.is_empty(),
            "unexpected bytes {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        self.stream.set_read_timeout(Some(dur)).unwrap();
        let mut tmp = [0u8; 4096];
        let res = self.stream.read(&mut tmp);
        self.stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        match res {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Ok(0) => panic!("connection closed, expected it to stay open"),
            Ok(n) => panic!(
                "unexpected {n} bytes after the response: {:?}",
                String::from_utf8_lossy(&tmp[..n.min(300)])
            ),
            Err(e) => panic!("connection failed: {e}"),
        }
    }

    pub fn shutdown_write(&self) {
        self.stream.shutdown(Shutdown::Write).unwrap();
    }
}

fn parse_fields<'a>(lines: impl Iterator<Item = &'a str>) -> io::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| io::Error::other(format!("bad header line {line:?}")))?;
        out.push((name.to_string(), value.trim().to_string()));
    }
    Ok(out)
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
