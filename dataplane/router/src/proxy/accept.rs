//! Hot path: where client connections enter: plain or TLS, with an optional PROXY
//! protocol prefix (spec §1.7), then handed to [`serve_conn`].

use super::*;

/// Counts a connection still in its PROXY prefix or TLS handshake as open (for the
/// per-core limit and a handover's drain) until dropped, right before the connection is
/// served (which counts it from then on).
struct Entering(Rc<Core>);

impl Entering {
    fn new(core: &Rc<Core>) -> Entering {
        core.conn_opened();
        Entering(core.clone())
    }
}

impl Drop for Entering {
    fn drop(&mut self) {
        self.0.conn_closed();
    }
}

/// Serves one plain-HTTP client connection (reading a PROXY prefix first if enabled).
pub async fn serve(core: Rc<Core>, conn: TcpStream, peer: SocketAddr, l: ListenerInfo) {
    let entering = Entering::new(&core);
    let _ = conn.set_nodelay(true);
    let fd = conn.as_raw_fd();
    let mut conn = conn;
    let mut bufs: Option<Box<Bufs>> = None;
    let mut peer = peer;
    if core.settings().proxy_protocol_for(peer.ip()) {
        let b = bufs.get_or_insert_with(|| core.take_bufs());
        match Recycled::new(read_proxy_prefix(&core, &mut conn, &mut b.buf)).await {
            Ok(Some(src)) => peer = src,
            Ok(None) => {}
            Err(()) => {
                if let Some(mut b) = bufs.take() {
                    b.release(&core, true);
                    core.give_bufs(b);
                }
                return;
            }
        }
    }
    // `serve_conn` counts it again before its first await: no gap.
    drop(entering);
    serve_conn(core, conn, fd, bufs, peer, l, Start::New).await
}

/// Serves one HTTPS client connection: PROXY prefix (peeked, so the TLS bytes stay in
/// the socket), TLS handshake within the header timeout, then HTTP/1.1 as usual.
pub async fn serve_tls(core: Rc<Core>, conn: TcpStream, peer: SocketAddr, l: ListenerInfo) {
    let entering = Entering::new(&core);
    let _ = conn.set_nodelay(true);
    let fd = conn.as_raw_fd();
    let mut peer = peer;
    if core.settings().proxy_protocol_for(peer.ip()) {
        match Recycled::new(peek_proxy_prefix(&core, &conn)).await {
            Ok((Some(src), _)) => peer = src,
            Ok((None, _)) => {}
            Err(()) => return,
        }
    }
    // The listener's own acceptor: its certificates are those of its port's routes.
    let Some(acceptor) = core
        .settings()
        .tls
        .as_ref()
        .and_then(|t| t.get(l.route_port))
    else {
        return;
    };
    let acceptor = acceptor.clone();
    let limit = core.settings().header_timeout;
    let tls = match monoio::time::timeout(limit, Recycled::new(acceptor.accept(conn))).await {
        Ok(Ok(s)) => s,
        _ => {
            CoreMetrics::inc(&core.metrics().tls_handshake_errors_total);
            return;
        }
    };
    // Both count it again before their first await: no gap.
    drop(entering);
    if tls.alpn_protocol().as_deref() == Some(b"h2") {
        return crate::h2::serve(core, tls, peer, l).await;
    }
    serve_conn(core, tls, fd, None, peer, l, Start::New).await
}

/// An `--h2c-addr` connection: its PROXY prefix first (when `--proxy-protocol` takes one
/// from this peer; a connection without one is served as it is), then HTTP/2.
pub async fn serve_h2c(core: Rc<Core>, conn: TcpStream, peer: SocketAddr, l: ListenerInfo) {
    let entering = Entering::new(&core);
    let _ = conn.set_nodelay(true);
    let mut peer = peer;
    match Recycled::new(peek_proxy_prefix(&core, &conn)).await {
        Ok((Some(src), _)) => peer = src,
        Ok((None, _)) => {}
        Err(()) => return,
    }
    drop(entering);
    crate::h2::serve(core, conn, peer, l).await
}

/// Looks at a PROXY prefix without consuming the bytes after it (the TLS ClientHello, or
/// the HTTP/2 preface), then consumes exactly the prefix.
async fn peek_proxy_prefix(core: &Core, c: &TcpStream) -> Result<(Option<SocketAddr>, usize), ()> {
    let fd = c.as_raw_fd();
    let r = peek_prefix(core, c).await;
    // Waiting for the rest of a split prefix raised the low-water mark.
    if flynn_runtime::sock::set_rcvlowat(fd, 1).is_err() {
        return Err(());
    }
    r
}

async fn peek_prefix(core: &Core, c: &TcpStream) -> Result<(Option<SocketAddr>, usize), ()> {
    let fd = c.as_raw_fd();
    let deadline = std::time::Instant::now() + core.settings().header_timeout;
    let mut head = [0u8; 600];
    // Bytes seen so far, and the pause before peeking again when a wake-up brought none.
    let mut seen = 0;
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        if monoio::time::timeout(
            deadline.saturating_duration_since(std::time::Instant::now()),
            c.readable(false),
        )
        .await
        .map_err(|_| ())?
        .is_err()
        {
            return Err(());
        }
        let n = match flynn_runtime::sock::peek_into(fd, &mut head) {
            Ok(0) => return Err(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(_) => return Err(()),
        };
        match flynn_http::parse_proxy(&head[..n]) {
            Ok(Some((header, len))) => {
                if len > 0 {
                    flynn_runtime::sock::discard(fd, len).ok_or(())?;
                }
                let src = match header {
                    flynn_http::ProxyHeader::Proxied { src, .. } => Some(src),
                    _ => None,
                };
                return Ok((src, len));
            }
            Ok(None) => {
                if std::time::Instant::now() >= deadline || n == head.len() {
                    return Err(());
                }
                if n > seen {
                    // A prefix split across packets: readiness now waits for a byte more
                    // than is waiting, so a client that stalls mid-prefix costs no polling.
                    seen = n;
                    pause = std::time::Duration::from_millis(1);
                    flynn_runtime::sock::set_rcvlowat(fd, n + 1).map_err(|_| ())?;
                } else {
                    // Woken without new bytes: the client closed (it will send no more), or
                    // a spurious wake-up; back off rather than spin.
                    if flynn_runtime::sock::peer_closed(fd) {
                        return Err(());
                    }
                    monoio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_millis(100));
                }
            }
            Err(_) => {
                CoreMetrics::inc(&core.metrics().bad_requests_total);
                return Err(());
            }
        }
    }
}

/// Reads a PROXY protocol prefix if the connection starts with one (spec §1.7): the
/// source address becomes the client address. `Err`: malformed or the client left.
async fn read_proxy_prefix(
    core: &Core,
    c: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Option<SocketAddr>, ()> {
    core.ensure_buf(buf);
    let deadline = std::time::Instant::now() + core.settings().header_timeout;
    loop {
        match flynn_http::parse_proxy(buf) {
            Ok(Some((header, len))) => {
                buf.drain(..len);
                return Ok(match header {
                    flynn_http::ProxyHeader::Proxied { src, .. } => Some(src),
                    _ => None,
                });
            }
            Ok(None) => {}
            Err(_) => {
                CoreMetrics::inc(&core.metrics().bad_requests_total);
                return Err(());
            }
        }
        let limit = deadline.saturating_duration_since(std::time::Instant::now());
        let taken = std::mem::take(buf);
        match monoio::time::timeout(limit, read_append(c, taken)).await {
            Ok((Ok(n), b)) if n > 0 => *buf = b,
            Ok((_, b)) => {
                *buf = b;
                return Err(());
            }
            Err(_) => return Err(()),
        }
    }
}
