//! Scriptable backends: a threaded raw HTTP/1.1 server that records every request exactly as
//! received and answers through a handler (by default a JSON echo of what it saw), and a
//! raw TCP backend for TCP routes.

use super::client::find;
use serde_json::{json, Value};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A request as a backend received it: names, order and case of headers kept.
#[derive(Debug, Clone, PartialEq)]
pub struct SeenRequest {
    pub backend: String,
    /// 1-based sequence number of the connection on this backend.
    pub conn: usize,
    pub method: String,
    /// The raw Request-URI.
    pub uri: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn headers_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
    pub fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }
    /// True when a `Connection` header lists `token` (case-insensitive).
    pub fn connection_has(&self, token: &str) -> bool {
        self.headers_all("connection")
            .iter()
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
    /// The request asks for an upgrade (HTTP/1.1, `Connection: upgrade`).
    pub fn is_upgrade(&self) -> bool {
        self.version == "HTTP/1.1" && self.connection_has("upgrade") && self.has_header("upgrade")
    }
    /// The client asked to close after this request.
    pub fn wants_close(&self) -> bool {
        self.connection_has("close")
            || (self.version == "HTTP/1.0" && !self.connection_has("keep-alive"))
    }

    pub fn to_json(&self) -> Value {
        let pairs = |h: &[(String, String)]| -> Vec<Value> {
            h.iter().map(|(n, v)| json!([n, v])).collect()
        };
        json!({
            "backend": self.backend,
            "conn": self.conn,
            "method": self.method,
            "uri": self.uri,
            "version": self.version,
            "headers": pairs(&self.headers),
            "body": String::from_utf8_lossy(&self.body),
            "trailers": pairs(&self.trailers),
        })
    }

    pub fn from_json(v: &Value) -> SeenRequest {
        let pairs = |v: &Value| -> Vec<(String, String)> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .map(|p| {
                            (
                                p[0].as_str().unwrap().to_string(),
                                p[1].as_str().unwrap().to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        SeenRequest {
            backend: v["backend"]
                .as_str()
                .unwrap_or_else(|| panic!("not an echo: {v}"))
                .into(),
            conn: v["conn"].as_u64().unwrap() as usize,
            method: v["method"].as_str().unwrap().into(),
            uri: v["uri"].as_str().unwrap().into(),
            version: v["version"].as_str().unwrap().into(),
            headers: pairs(&v["headers"]),
            body: v["body"].as_str().unwrap().as_bytes().to_vec(),
            trailers: pairs(&v["trailers"]),
        }
    }
}

/// What a handler wants done with the connection after it returns.
pub enum Reply {
    KeepAlive,
    Close,
}

/// Answers one request. With `raw_body` backends the request body is left unread on `conn`.
pub type Handler = Arc<dyn Fn(&SeenRequest, &mut BackendConn) -> Reply + Send + Sync>;

/// One accepted backend connection with its read buffer.
pub struct BackendConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pub name: String,
    pub conn: usize,
}

impl BackendConn {
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Bytes read past the current request (e.g. tunnel bytes after an upgrade).
    pub fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Buffered bytes, or one read (empty at EOF).
    pub fn read_some(&mut self) -> io::Result<Vec<u8>> {
        if !self.buf.is_empty() {
            return Ok(self.take_buffered());
        }
        let mut tmp = [0u8; 16384];
        let n = self.stream.read(&mut tmp)?;
        Ok(tmp[..n].to_vec())
    }

    /// Reads until `needle` has been seen (it and everything before it are consumed).
    pub fn read_until(&mut self, needle: &[u8]) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = find(&self.buf, needle) {
                return Ok(self.buf.drain(..i + needle.len()).collect());
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF"));
            }
        }
    }

    /// Echoes everything back until EOF, then shuts down the write side.
    pub fn echo_until_eof(&mut self) {
        loop {
            match self.read_some() {
                Ok(b) if b.is_empty() => break,
                Ok(b) => {
                    if self.write(&b).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Blocks until the peer closes (EOF/reset) or `timeout`; returns true on close.
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        let _ = self.stream.set_read_timeout(Some(timeout));
        let mut tmp = [0u8; 4096];
        loop {
            match self.stream.read(&mut tmp) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 16384];
        let n = self.stream.read(&mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    fn read_line(&mut self) -> io::Result<Vec<u8>> {
        let mut line = self.read_until(b"\r\n")?;
        line.truncate(line.len() - 2);
        Ok(line)
    }

    fn read_exact_n(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF in body"));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads one request; `Ok(None)` on a clean EOF before any byte.
    fn read_request(&mut self, read_body: bool) -> io::Result<Option<SeenRequest>> {
        let end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if self.buf.len() > 1 << 20 {
                return Err(io::Error::other("request head too big"));
            }
            if self.fill()? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF in head"))
                };
            }
        };
        let head: Vec<u8> = self.buf.drain(..end + 4).collect();
        let text = String::from_utf8_lossy(&head[..end]).into_owned();
        let mut lines = text.split("\r\n");
        let line = lines.next().unwrap_or("");
        let (method, rest) = line
            .split_once(' ')
            .ok_or_else(|| io::Error::other("request line"))?;
        let (uri, version) = rest
            .rsplit_once(' ')
            .ok_or_else(|| io::Error::other("request line"))?;
        let mut headers = Vec::new();
        for l in lines {
            let (n, v) = l
                .split_once(':')
                .ok_or_else(|| io::Error::other("header line"))?;
            headers.push((n.to_string(), v.trim().to_string()));
        }
        let mut req = SeenRequest {
            backend: self.name.clone(),
            conn: self.conn,
            method: method.into(),
            uri: uri.into(),
            version: version.into(),
            headers,
            body: Vec::new(),
            trailers: Vec::new(),
        };
        if read_body {
            let chunked = req.headers_all("transfer-encoding").iter().any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("chunked"))
            });
            if chunked {
                loop {
                    let line = self.read_line()?;
                    let line = String::from_utf8_lossy(&line).into_owned();
                    let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16)
                        .map_err(|_| io::Error::other(format!("chunk size {line:?}")))?;
                    if size == 0 {
                        loop {
                            let t = self.read_line()?;
                            if t.is_empty() {
                                break;
                            }
                            let t = String::from_utf8_lossy(&t).into_owned();
                            if let Some((n, v)) = t.split_once(':') {
                                req.trailers.push((n.to_string(), v.trim().to_string()));
                            }
                        }
                        break;
                    }
                    let data = self.read_exact_n(size)?;
                    req.body.extend_from_slice(&data);
                    self.read_exact_n(2)?;
                }
            } else if let Some(cl) = req.header("content-length") {
                let n: usize = cl
                    .trim()
                    .parse()
                    .map_err(|_| io::Error::other("content-length"))?;
                req.body = self.read_exact_n(n)?;
            }
        }
        Ok(Some(req))
    }
}

struct Shared {
    name: String,
    handler: Handler,
    read_body: bool,
    close_on_accept: bool,
    stop: AtomicBool,
    accepted: AtomicUsize,
    closed: AtomicUsize,
    requests: Mutex<Vec<SeenRequest>>,
    live: Mutex<Vec<TcpStream>>,
}

/// A test HTTP backend on 127.0.0.1:0; stops (and closes its connections) on drop.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Backend {
    /// A backend answering every request with its JSON echo (keep-alive).
    pub fn start(name: &str) -> Backend {
        Self::spawn(name, handlers::json(), true, false)
    }

    /// A backend answering through `handler` (request bodies read first).
    pub fn with_handler(
        name: &str,
        handler: impl Fn(&SeenRequest, &mut BackendConn) -> Reply + Send + Sync + 'static,
    ) -> Backend {
        Self::spawn(name, Arc::new(handler), true, false)
    }

    /// Like [`Backend::with_handler`] but the request body is left on the connection.
    pub fn raw(
        name: &str,
        handler: impl Fn(&SeenRequest, &mut BackendConn) -> Reply + Send + Sync + 'static,
    ) -> Backend {
        Self::spawn(name, Arc::new(handler), false, false)
    }

    /// Accepts connections and closes them at once without reading or writing.
    pub fn close_on_accept(name: &str) -> Backend {
        Self::spawn(name, handlers::json(), true, true)
    }

    fn spawn(name: &str, handler: Handler, read_body: bool, close_on_accept: bool) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            name: name.into(),
            handler,
            read_body,
            close_on_accept,
            stop: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            closed: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            live: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let n = s.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                if s.close_on_accept {
                    drop(stream);
                    s.closed.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
                let _ = stream.set_nodelay(true);
                if let Ok(c) = stream.try_clone() {
                    s.live.lock().unwrap().push(c);
                }
                let s2 = s.clone();
                std::thread::spawn(move || serve(s2, stream, n));
            }
        });
        Backend {
            name: name.into(),
            addr,
            shared,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections that have ended (peer closed, handler closed, or error).
    pub fn closed(&self) -> usize {
        self.shared.closed.load(Ordering::SeqCst)
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }

    /// Shuts down every open connection (as a backend closing idle keep-alives does).
    pub fn close_connections(&self) {
        for c in self.shared.live.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn serve(s: Arc<Shared>, stream: TcpStream, n: usize) {
    let mut conn = BackendConn {
        stream,
        buf: Vec::new(),
        name: s.name.clone(),
        conn: n,
    };
    while let Ok(Some(req)) = conn.read_request(s.read_body) {
        s.requests.lock().unwrap().push(req.clone());
        match (s.handler)(&req, &mut conn) {
            Reply::KeepAlive => continue,
            Reply::Close => break,
        }
    }
    let _ = conn.stream.shutdown(Shutdown::Both);
    s.closed.fetch_add(1, Ordering::SeqCst);
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        self.close_connections();
    }
}

/// An address nothing listens on (connections are refused).
pub fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A loopback address whose connects hang: a listener with a backlog of 0 whose queue is
/// already full (the returned stream), so the kernel drops further SYNs.
pub fn black_hole() -> (socket2::Socket, TcpStream, std::net::SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let l = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    l.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    l.listen(0).expect("listen");
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let filler = TcpStream::connect(addr).expect("the one queued connection");
    (l, filler, addr)
}

/// Whether a socket on this machine is connecting to `addr` (`SYN-SENT`).
pub fn connecting_to(addr: SocketAddr) -> bool {
    let out = std::process::Command::new("ss")
        .args(["-Htn", "state", "syn-sent", "dst", &addr.to_string()])
        .output()
        .expect("ss (iproute2)");
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

/// Waits (up to 5 s) until a socket on this machine is connecting to `addr` (`SYN-SENT`), such
/// as the router dialling a [`black_hole`].
pub fn wait_connecting_to(addr: SocketAddr) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if connecting_to(addr) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing dialled {addr} within 5 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes a complete response with `Content-Length`.
pub fn respond(conn: &mut BackendConn, status: &str, headers: &[(&str, &str)], body: &[u8]) {
    let mut out = format!("HTTP/1.1 {status}\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    let _ = conn.write(&bytes);
}

pub mod handlers {
    //! Ready-made backend behaviours.
    use super::*;
    use std::sync::mpsc::Sender;
    use std::time::Instant;

    /// The JSON echo of the request; closes when the request asked to.
    pub fn echo(req: &SeenRequest, conn: &mut BackendConn) -> Reply {
        let body = req.to_json().to_string();
        if req.wants_close() {
            respond(
                conn,
                "200 OK",
                &[
                    ("Content-Type", "application/json"),
                    ("Connection", "close"),
                ],
                body.as_bytes(),
            );
            Reply::Close
        } else {
            respond(
                conn,
                "200 OK",
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            );
            Reply::KeepAlive
        }
    }

    pub fn json() -> Handler {
        Arc::new(echo)
    }

    /// The JSON echo, then `Connection: close` and close, every time.
    pub fn echo_close(req: &SeenRequest, conn: &mut BackendConn) -> Reply {
        let body = req.to_json().to_string();
        respond(
            conn,
            "200 OK",
            &[
                ("Content-Type", "application/json"),
                ("Connection", "close"),
            ],
            body.as_bytes(),
        );
        Reply::Close
    }

    /// Upgrade requests get `101` (echoing the `Upgrade` value) and then an echo tunnel
    /// until EOF; other requests get the JSON echo.
    pub fn upgrade_echo(req: &SeenRequest, conn: &mut BackendConn) -> Reply {
        if !req.is_upgrade() {
            return echo(req, conn);
        }
        let upgrade = req.header("upgrade").unwrap_or("");
        let head = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: {upgrade}\r\nConnection: Upgrade\r\nX-Backend: {}\r\n\r\n",
            conn.name
        );
        if conn.write(head.as_bytes()).is_err() {
            return Reply::Close;
        }
        conn.echo_until_eof();
        Reply::Close
    }

    /// Events from [`hold`] handlers.
    #[derive(Debug)]
    pub enum HoldEvent {
        /// A request arrived (connection number, URI).
        Request(usize, String),
        /// The client side of the connection closed, at that instant.
        Closed(usize, Instant),
        /// Nothing happened within the hold time.
        TimedOut(usize),
    }

    /// Never answers: reports the request, then waits up to 20 s for the router to close
    /// the connection and reports that.
    pub fn hold(
        tx: Sender<HoldEvent>,
    ) -> impl Fn(&SeenRequest, &mut BackendConn) -> Reply + Send + Sync + 'static {
        let tx = Mutex::new(tx);
        move |req, conn| {
            let _ = tx
                .lock()
                .unwrap()
                .send(HoldEvent::Request(conn.conn, req.uri.clone()));
            let ev = if conn.wait_closed(Duration::from_secs(20)) {
                HoldEvent::Closed(conn.conn, Instant::now())
            } else {
                HoldEvent::TimedOut(conn.conn)
            };
            let _ = tx.lock().unwrap().send(ev);
            Reply::Close
        }
    }
}

/// A raw TCP backend: reads until EOF, then answers `"<name> "` followed by everything it
/// read, then closes. Proves both directions and half-close.
pub struct TcpBackend {
    pub name: String,
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl TcpBackend {
    pub fn start(name: &str) -> TcpBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind tcp backend");
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, st, nm) = (accepted.clone(), stop.clone(), name.to_string());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                let nm = nm.clone();
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut data = Vec::new();
                    if stream.read_to_end(&mut data).is_err() {
                        return;
                    }
                    let mut out = format!("{nm} ").into_bytes();
                    out.extend_from_slice(&data);
                    let _ = stream.write_all(&out);
                    let _ = stream.shutdown(Shutdown::Write);
                    // Linger until the peer closes so no RST races the data.
                    let mut tmp = [0u8; 64];
                    let _ = stream.read(&mut tmp);
                });
            }
        });
        TcpBackend {
            name: name.into(),
            addr,
            accepted,
            stop,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}
