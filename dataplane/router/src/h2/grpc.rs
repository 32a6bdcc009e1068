//! gRPC routes over HTTP/2: each stream goes to the backend as it is, over one
//! multiplexed HTTP/2 connection per backend per core, with DATA pumped both ways within
//! each side's flow-control window. Used by [`super::serve`]'s streams on `grpc: true`
//! routes.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;

use super::{client_reset, simple, StreamGuard};
use crate::metrics::CoreMetrics;
use crate::worker::{Core, ListenerInfo};

/// gRPC routes: the stream goes to the backend over HTTP/2 as it is (headers, DATA in
/// both directions at once, trailers), with the forwarding headers added. Streams share
/// one HTTP/2 connection per backend per core ([`grpc_backend`]).
#[allow(clippy::too_many_arguments)]
pub(super) async fn passthrough(
    core: Rc<Core>,
    parts: http::request::Parts,
    body: h2::RecvStream,
    mut respond: h2::server::SendResponse<Bytes>,
    backends: &[SocketAddr],
    route_id: &str,
    peer: SocketAddr,
    l: ListenerInfo,
    proto: &'static str,
    start_ms: u64,
    guard: &StreamGuard,
) {
    let is_head = parts.method == http::Method::HEAD;
    // A client that resets the stream meanwhile ends the dial and the wait below.
    let picked = monoio::select! {
        b = grpc_backend(&core, backends, route_id) => b,
        _ = client_reset(&mut respond) => return guard.note_reset(),
    };
    let Some((mut client, addr)) = picked else {
        CoreMetrics::inc(&core.metrics().unavailable_total);
        return simple(&mut respond, &core, is_head, 503, b"Service Unavailable\n").await;
    };
    let _inflight = core.start_request(addr);
    // Waits for a free stream slot under the backend's SETTINGS_MAX_CONCURRENT_STREAMS.
    let ready = monoio::select! {
        r = client.ready() => r,
        _ = client_reset(&mut respond) => return guard.note_reset(),
    };
    client = match ready {
        Ok(c) => c,
        Err(_) => {
            core.grpc.borrow_mut().remove(&addr);
            return simple(&mut respond, &core, is_head, 503, b"Service Unavailable\n").await;
        }
    };

    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut req = http::Request::builder()
        .method(parts.method.clone())
        .uri(format!("http://{authority}{pq}"));
    let mut xff = String::new();
    let mut request_id = None;
    for (name, value) in &parts.headers {
        // The router's own fields spelt with `_` for `-` count as those fields, as on the
        // HTTP/1.1 path (CGI-style backends read both spellings as one variable).
        let spelt = name.as_str();
        let key = if spelt.starts_with("x_") || (spelt.starts_with("x-") && spelt.contains('_')) {
            std::borrow::Cow::Owned(spelt.replace('_', "-"))
        } else {
            std::borrow::Cow::Borrowed(spelt)
        };
        match &*key {
            "x-forwarded-for" => {
                xff.push_str(value.to_str().unwrap_or(""));
                xff.push_str(", ");
                continue;
            }
            "x-forwarded-proto" | "x-forwarded-port" | "x-request-start" => continue,
            "x-request-id" => {
                if request_id.is_none() && flynn_http::valid_request_id(value.as_bytes()) {
                    request_id = Some(value.clone());
                }
                continue;
            }
            _ => {}
        }
        req = req.header(name, value);
    }
    xff.push_str(&crate::proxy::client_ip(peer).to_string());
    let request_id = request_id.unwrap_or_else(|| {
        let mut id = [0u8; 36];
        flynn_http::format_uuid_v4(
            ((fastrand::u64(..) as u128) << 64) | fastrand::u64(..) as u128,
            &mut id,
        );
        http::HeaderValue::from_bytes(&id).unwrap_or(http::HeaderValue::from_static("0"))
    });
    let req = req
        .header("x-forwarded-for", xff)
        .header("x-forwarded-proto", proto)
        .header("x-forwarded-port", l.port)
        .header("x-request-start", start_ms)
        .header("x-request-id", request_id)
        .body(());
    let Ok(req) = req else {
        return simple(&mut respond, &core, is_head, 400, b"Bad Request\n").await;
    };
    let end = body.is_end_stream();
    let Ok((resp, upload)) = client.send_request(req, end) else {
        return simple(&mut respond, &core, is_head, 503, b"Service Unavailable\n").await;
    };
    let idle = core.settings().idle_timeout;
    let head_timeout = core.settings().response_header_timeout;
    // When the whole request has gone to the backend (END_STREAM sent): the response
    // header timeout counts from then, as Go's `ResponseHeaderTimeout` and the HTTP/1.1
    // paths do. A call still uploading (client streaming, a bidi stream whose server
    // speaks after the client, a watch that keeps its side open) has no deadline for the
    // response head: its backend may well answer only after the client's end.
    let sent = Sent::default();
    if end {
        sent.set();
    }
    let sent = &sent;
    let up_pump = async move {
        if !end && pump(body, upload, idle).await {
            sent.set();
        }
    };
    // False when the backend gave no response head in time.
    let down = async move {
        // A client that resets the stream drops the backend's too. The reset watch comes
        // first: the upload pump, seeing the same reset, resets the backend's stream, which
        // fails `resp` at once, and the reset must be counted whichever is seen first.
        // The response head (HEADERS, not the stream: calls are long-lived) is due within
        // the response header timeout of the request's end, as on HTTP/1.1.
        let resp = monoio::select! {
            biased;
            _ = client_reset(&mut respond) => {
                guard.note_reset();
                return true;
            }
            r = resp => r,
            _ = sent.deadline(head_timeout) => {
                simple(&mut respond, &core, is_head, 503, b"Service Unavailable\n").await;
                return false;
            }
        };
        let Ok(resp) = resp else {
            simple(&mut respond, &core, is_head, 503, b"Service Unavailable\n").await;
            return true;
        };
        core.metrics().status(resp.status().as_u16());
        let (rparts, rbody) = resp.into_parts();
        let end = rbody.is_end_stream();
        let Ok(send) = respond.send_response(http::Response::from_parts(rparts, ()), end) else {
            return true;
        };
        if !end {
            pump(rbody, send, idle).await;
        }
        true
    };
    let (down, up_pump) = (std::pin::pin!(down), std::pin::pin!(up_pump));
    match futures_util::future::select(down, up_pump).await {
        // The backend's stream is given up on: dropping the upload with the response
        // future leaves h2 no handle on it, and it resets it (CANCEL).
        futures_util::future::Either::Left((false, _)) => {}
        futures_util::future::Either::Left((true, up)) => up.await,
        futures_util::future::Either::Right(((), down)) => {
            down.await;
        }
    }
}

/// An HTTP/2 connection to one of `backends`: this core's open connection to a backend
/// (tried in shuffled order) if it is still up, else a new one dialled and kept for the
/// next streams. Connections to backends no route lists any more are dropped at the table
/// change that removed them.
async fn grpc_backend(
    core: &Rc<Core>,
    backends: &[SocketAddr],
    route_id: &str,
) -> Option<(h2::client::SendRequest<Bytes>, SocketAddr)> {
    let mut order = [SocketAddr::from(([0, 0, 0, 0], 0)); 16];
    let n = crate::balance::shuffled(backends, &mut order);
    for addr in &order[..n] {
        let pooled = core.grpc.borrow().get(addr).map(|(_, c)| c.clone());
        if let Some(mut c) = pooled {
            // A connection whose task ended (GOAWAY, reset, backend gone) says so here.
            if std::future::poll_fn(|cx| c.poll_ready(cx)).await.is_ok() {
                CoreMetrics::inc(&core.metrics().upstream_reuses_total);
                return Some((c, *addr));
            }
            core.grpc.borrow_mut().remove(addr);
        }
    }
    let mut dials = crate::balance::DialOrder::new(backends, None);
    let now = || core.table().backends_of(route_id).cloned();
    while let Some(a) = dials.next(now) {
        let addr = &a;
        // Counted in flight through the dial and the handshake (the caller counts its
        // request from when this returns, with no await in between).
        let _dialing = core.start_request(*addr);
        let Ok(s) = crate::proxy::dial(core, *addr).await else {
            CoreMetrics::inc(&core.metrics().upstream_connect_errors_total);
            continue;
        };
        // Windows far above h2's 64 KiB default: a stream whose client reads slowly keeps
        // its unread data (up to the stream window) charged to the connection, which every
        // other gRPC stream to this backend on this core shares; at the default, one such
        // stream stalled them all.
        let handshake = h2::client::Builder::new()
            .initial_window_size(GRPC_STREAM_WINDOW)
            .initial_connection_window_size(GRPC_CONNECTION_WINDOW)
            .handshake::<_, Bytes>(monoio_compat::StreamWrapper::new(s));
        let Ok((client, conn)) = handshake.await else {
            CoreMetrics::inc(&core.metrics().upstream_errors_total);
            continue;
        };
        CoreMetrics::inc(&core.metrics().upstream_connects_total);
        let (core2, a, id) = (core.clone(), *addr, fastrand::u64(..));
        monoio::spawn(async move {
            let _ = conn.await;
            // Forget the connection once it is gone (unless replaced meanwhile).
            let mut pool = core2.grpc.borrow_mut();
            if pool.get(&a).is_some_and(|(i, _)| *i == id) {
                pool.remove(&a);
            }
        });
        // Connections to backends no route has any more are dropped at the table change
        // that removed them (`worker::forget_gone_backends`); one dialled across such a
        // change serves this call and is not pooled.
        if core
            .table()
            .http_routes()
            .any(|r| r.backends.contains(addr))
        {
            core.grpc.borrow_mut().insert(*addr, (id, client.clone()));
        }
        return Some((client, *addr));
    }
    None
}

/// A gRPC backend connection's receive window per stream, and for the connection: 4,096
/// streams whose clients stopped reading (16 client connections' worth) can hold it before
/// the others wait, and a stalled one is reset after the idle timeout (see [`pump`]).
const GRPC_STREAM_WINDOW: u32 = 256 << 10;
const GRPC_CONNECTION_WINDOW: u32 = 1 << 30;

/// When a call's request stream ended on its way to the backend (END_STREAM sent), and
/// the response head's deadline, which counts from then.
#[derive(Default)]
struct Sent {
    at: std::cell::Cell<Option<monoio::time::Instant>>,
    /// The deadline's waiter, woken when the end is sent.
    waiter: std::cell::Cell<Option<std::task::Waker>>,
}

impl Sent {
    fn set(&self) {
        self.at.set(Some(monoio::time::Instant::now()));
        if let Some(w) = self.waiter.take() {
            w.wake();
        }
    }

    /// Resolves `timeout` after the request's end was sent; never before it is.
    async fn deadline(&self, timeout: Duration) {
        let at = std::future::poll_fn(|cx| match self.at.get() {
            Some(at) => std::task::Poll::Ready(at),
            None => {
                self.waiter.set(Some(cx.waker().clone()));
                std::task::Poll::Pending
            }
        })
        .await;
        monoio::time::sleep_until(at + timeout).await;
    }
}

/// Copies DATA frames (as the receiver's window allows) and then trailers. True when
/// the stream was ended (trailers, or END_STREAM on an empty DATA frame) rather than
/// reset or given up on.
///
/// A receiver that grants no window for `idle` (a client that stopped reading) has its
/// stream reset: what the pump holds for it is freed, and it stops holding its share of the
/// backend connection's window, which the core's other calls to that backend need.
async fn pump(mut from: h2::RecvStream, mut to: h2::SendStream<Bytes>, idle: Duration) -> bool {
    // A stream flowing flat out both ends never makes this loop wait on the epoll driver
    // (each connection's task hands DATA over and flushes at once): every 1 MiB the core's
    // other tasks get their turn (see `flynn_runtime::fair`).
    let mut budget = flynn_runtime::fair::Budget::default();
    loop {
        // Waiting for the sender, the receiver may go away: then so does this pump.
        let next = monoio::select! {
            d = from.data() => d,
            _ = std::future::poll_fn(|cx| to.poll_reset(cx)) => return false,
        };
        let Some(chunk) = next else { break };
        let Ok(chunk) = chunk else {
            to.send_reset(h2::Reason::CANCEL);
            return false;
        };
        let _ = from.flow_control().release_capacity(chunk.len());
        if budget.spend(chunk.len()) {
            flynn_runtime::fair::yield_now().await;
        }
        if !super::send_flow_controlled(&mut to, chunk, false, idle).await {
            return false;
        }
    }
    match from.trailers().await {
        Ok(Some(t)) => to.send_trailers(t).is_ok(),
        Ok(None) => to.send_data(Bytes::new(), true).is_ok(),
        Err(_) => {
            to.send_reset(h2::Reason::CANCEL);
            false
        }
    }
}
