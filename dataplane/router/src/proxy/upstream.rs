//! Hot path: the upstream side: dialling with the connect timeout, picking a backend
//! (pooled connection first, dial failures retried on another backend) and reading the
//! response head while watching for the client leaving.

use super::*;

/// Dials `addr` with the connect timeout.
pub async fn dial(core: &Core, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let limit = core.settings().connect_timeout;
    match monoio::time::timeout(limit, TcpStream::connect_addr(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut)),
    }
}

/// Dials `addr` counting a request in flight to it meanwhile, so a drain that polls while
/// the dial is pending does not report the backend drained. The caller counts its own
/// request from when this returns, with no await in between.
pub async fn dial_counted(core: &Rc<Core>, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let _dialing = core.start_request(addr);
    dial(core, addr).await
}

/// Picks a backend and gets a connection to it: pooled first, else dialled; dial
/// failures move on to another backend, up to four dials. After a failure the backends
/// are the route's in the current table (a deploy may have replaced them all since the
/// request started, and a drain may have reported the old ones drained).
pub async fn connect(
    core: &Rc<Core>,
    route: &HttpRoute,
    sticky: Option<SocketAddr>,
    failed: Option<SocketAddr>,
) -> Option<(TcpStream, SocketAddr, bool)> {
    // Every backend dialled so far, never picked again; a backend that just failed (e.g. a
    // dead pooled connection and a refused redial) counts as the first dial.
    let mut tried = [None; MAX_ATTEMPTS];
    let mut dials = 0;
    if let Some(a) = failed {
        tried[0] = Some(a);
        dials = 1;
    }
    // A valid sticky cookie whose backend is still live is tried first.
    let sticky = sticky.filter(|a| route.backends.contains(a));
    let mut current: Option<std::sync::Arc<[SocketAddr]>> = None;
    while dials < MAX_ATTEMPTS {
        let retry = dials > 0;
        if retry {
            // The route gone from the table: nothing more is dialled for it.
            current = Some(core.table().backends_of(&route.id)?.clone());
        }
        let backends = current.as_deref().unwrap_or(&route.backends);
        let addr = match sticky {
            Some(a) if !retry => a,
            _ => pick(core, backends, &tried[..dials])?,
        };
        if !route.disable_keep_alives {
            if let Some(s) = core.pool.take(addr) {
                CoreMetrics::inc(&core.metrics().upstream_reuses_total);
                return Some((s, addr, true));
            }
        }
        match dial_counted(core, addr).await {
            Ok(s) => {
                CoreMetrics::inc(&core.metrics().upstream_connects_total);
                return Some((s, addr, false));
            }
            Err(_) => {
                CoreMetrics::inc(&core.metrics().upstream_connect_errors_total);
                tried[dials] = Some(addr);
                dials += 1;
            }
        }
    }
    None
}

/// A pooled connection to `addr` turned out dead before any response byte: dial `addr`
/// afresh, and if that fails too, move on to another backend (a dial failure).
pub(crate) async fn redial(
    core: &Rc<Core>,
    route: &HttpRoute,
    addr: SocketAddr,
) -> Option<(TcpStream, SocketAddr, bool)> {
    CoreMetrics::inc(&core.metrics().upstream_retries_total);
    match dial_counted(core, addr).await {
        Ok(s) => {
            CoreMetrics::inc(&core.metrics().upstream_connects_total);
            Some((s, addr, false))
        }
        Err(_) => {
            CoreMetrics::inc(&core.metrics().upstream_connect_errors_total);
            connect(core, route, None, Some(addr)).await
        }
    }
}

#[derive(Clone, Copy)]
pub struct Fwd {
    pub proto: &'static str,
    pub peer: SocketAddr,
    pub l: ListenerInfo,
    pub start_ms: u64,
    /// The client socket (watched for the client leaving).
    pub fd: std::os::fd::RawFd,
}

impl Fwd {
    pub fn forward<'a>(&self, upstream_close: bool) -> Forward<'a> {
        Forward {
            client_ip: client_ip(self.peer),
            proto: self.proto,
            listener_port: self.l.port,
            request_start_ms: self.start_ms,
            random_id: ((fastrand::u64(..) as u128) << 64) | fastrand::u64(..) as u128,
            upstream_close,
            extra: &[],
        }
    }
}

/// Result of sending the head and reading the response head on one connection.
pub(super) enum Exchange {
    Ok(flynn_http::ResponseInfo),
    /// The connection failed before any response byte: safe to retry if nothing of the
    /// request body was streamed from the client.
    Stale,
    Failed,
    ClientGone,
}

/// Reads the response head from `up` (forwarding any 1xx other than 101 to the
/// client), watching for the client going away meanwhile. The whole head, interim ones
/// included, must come within the response header timeout (one deadline, not one per
/// read: a backend trickling its head or sending 103s without end is given up on).
pub(super) async fn exchange<S: Client>(
    core: &Core,
    c: &mut S,
    fd: std::os::fd::RawFd,
    up: &mut TcpStream,
    ubuf: &mut Vec<u8>,
    info: &RequestInfo,
    sent_continue: bool,
) -> Exchange {
    let mut got_any = false;
    let deadline = monoio::time::Instant::now() + core.settings().response_header_timeout;
    loop {
        if !ubuf.is_empty() {
            match parse_response(ubuf, info.method) {
                Ok(Some(r)) if r.status == 100 && sent_continue => {
                    // The router already told the client to continue.
                    ubuf.drain(..r.head_len);
                    continue;
                }
                // No 1xx to an HTTP/1.0 client (RFC 9110 §15.2).
                Ok(Some(r))
                    if (100..200).contains(&r.status)
                        && r.status != 101
                        && info.version_minor == 0 =>
                {
                    ubuf.drain(..r.head_len);
                    continue;
                }
                Ok(Some(r)) if (100..200).contains(&r.status) && r.status != 101 => {
                    let mut interim = Vec::new();
                    write_response_head(
                        ubuf,
                        &r,
                        &ResponseOpts {
                            close: false,
                            extra: &[],
                            http10: false,
                        },
                        &mut interim,
                    );
                    let len = interim.len();
                    let (res, _) = to_client(core, c, fd, interim, len).await;
                    if res.is_err() {
                        return Exchange::ClientGone;
                    }
                    ubuf.drain(..r.head_len);
                    continue;
                }
                Ok(Some(r)) => return Exchange::Ok(r),
                Ok(None) => {}
                Err(_) => return Exchange::Failed,
            }
        }
        let taken = std::mem::take(ubuf);
        let read = monoio::time::timeout_at(deadline, read_append(up, taken));
        monoio::select! {
            r = read => {
                let (res, b) = match r {
                    Ok(x) => x,
                    Err(_) => {
                        *ubuf = Vec::with_capacity(BUF);
                        return Exchange::Failed;
                    }
                };
                *ubuf = b;
                match res {
                    Ok(n) if n > 0 => got_any = true,
                    _ => {
                        return if got_any { Exchange::Failed } else { Exchange::Stale };
                    }
                }
            }
            _ = c.gone(fd) => {
                *ubuf = Vec::with_capacity(BUF);
                return Exchange::ClientGone;
            }
        }
    }
}
