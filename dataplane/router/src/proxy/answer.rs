//! Hot path: the router's own answers to a request (400, 404, 405, 408, 503...) and the
//! lingering close after an answer given before the client finished sending. Error paths,
//! but per request.

use super::*;

/// A lingering close ([`linger`]) ends when the client sends nothing for this long
/// (nginx's `lingering_timeout`) ...
pub(crate) const LINGER_QUIET: Duration = Duration::from_secs(5);
/// ... or once it has discarded this much of what the client sent.
const LINGER_MAX_BYTES: usize = 64 << 20;

pub(super) fn reason_body(status: u16) -> &'static [u8] {
    match status {
        431 => b"Request Header Fields Too Large\n",
        408 => b"Request Timeout\n",
        505 => b"HTTP Version Not Supported\n",
        _ => b"Bad Request\n",
    }
}

/// The router's own response to a request (`method`: a `HEAD` gets the head only, with the
/// length a `GET` would have had); `then`: what follows once it is written (any but
/// `KeepAlive` says `Connection: close`).
#[allow(clippy::too_many_arguments)]
pub(super) async fn respond<S: Client>(
    core: &Core,
    c: &mut S,
    fd: RawFd,
    out: &mut Vec<u8>,
    method: Method,
    status: u16,
    body: &[u8],
    then: Next,
) -> Next {
    core.metrics().status(status);
    // A draining process closes every connection after its current response.
    let then = match then {
        Next::KeepAlive if core.draining() => Next::Close,
        then => then,
    };
    let close = !matches!(then, Next::KeepAlive);
    out.clear();
    let body_len = match (status, &core.settings().page_503) {
        (503, Some(page)) => {
            flynn_http::typed_response(503, b"text/html; charset=utf-8", page, close, out);
            page.len()
        }
        _ => {
            simple_response(status, body, close, out);
            body.len()
        }
    };
    if method == Method::Head {
        out.truncate(out.len() - body_len);
    }
    let o = std::mem::take(out);
    let len = o.len();
    let (res, o) = to_client(core, c, fd, o, len).await;
    *out = o;
    if res.is_err() {
        Next::Abort
    } else {
        then
    }
}

/// What follows the router's own answer to a request (404, 503) in `buf`: a body not all
/// received yet is left unread, so the connection closes in stages ([`linger`]); one that
/// is all in `buf`, a client that asked to close, or an HTTP/1.0 one, which keeps only a
/// connection whose response says `Connection: keep-alive` (these answers do not, so a
/// client reading to the end would wait for the idle timeout), is closed.
pub(super) fn after_own_answer(info: &RequestInfo, buf: &[u8]) -> Next {
    if info.framing != Framing::Empty {
        let mut body = BodyReader::new(info.framing);
        let whole = body.advance(&buf[info.head_len..]).is_ok() && body.is_done();
        if whole {
            Next::Close
        } else {
            Next::Linger
        }
    } else if !info.keep_alive || info.version_minor == 0 {
        Next::Close
    } else {
        Next::KeepAlive
    }
}

pub(super) async fn unavailable<S: Client>(
    core: &Core,
    c: &mut S,
    fd: RawFd,
    out: &mut Vec<u8>,
    info: &RequestInfo,
    buf: &[u8],
) -> Next {
    CoreMetrics::inc(&core.metrics().unavailable_total);
    let then = after_own_answer(info, buf);
    respond(
        core,
        c,
        fd,
        out,
        info.method,
        503,
        b"Service Unavailable\n",
        then,
    )
    .await
}

/// Closes a connection in stages after an answer given before the client finished sending
/// its request body (RFC 9112 §9.6), or a refused upgrade (`upgrade.rs`: the bytes behind
/// the request are never read): shuts the sending side down once the answer is out,
/// then reads and discards what the client still sends until it closes, sends nothing for
/// [`LINGER_QUIET`], has sent [`LINGER_MAX_BYTES`] or the lingering time is up. Closing at
/// once with unread input makes the kernel reset the connection, and a client still
/// writing its body gets the reset instead of the answer (nginx's `lingering_close`, Go's
/// `closeWriteAndWait`). Error paths only; reads into the connection's own buffer.
pub(crate) async fn linger<S: Client>(core: &Core, c: &mut S, buf: &mut Vec<u8>) {
    let time = core.settings().lingering_time;
    if time.is_zero() {
        return;
    }
    let discard = async {
        if c.shutdown().await.is_err() {
            return;
        }
        let mut left = LINGER_MAX_BYTES;
        loop {
            buf.clear();
            let taken = std::mem::take(buf);
            let Ok((res, b)) = monoio::time::timeout(LINGER_QUIET, read_append(c, taken)).await
            else {
                return;
            };
            *buf = b;
            match res {
                Ok(n) if n > 0 && n < left => left -= n,
                _ => return,
            }
        }
    };
    // A draining router (handover, shutdown) does not wait for lingering clients.
    monoio::select! {
        _ = monoio::time::timeout(time, discard) => {}
        _ = core.stop.wait() => {}
    }
    buf.clear();
}

/// The 503 for a backend that failed; `then`: `Linger` when the request body was not all
/// read.
pub(super) async fn upstream_failed<S: Client>(
    core: &Core,
    c: &mut S,
    fd: RawFd,
    out: &mut Vec<u8>,
    method: Method,
    then: Next,
) -> Next {
    CoreMetrics::inc(&core.metrics().upstream_errors_total);
    CoreMetrics::inc(&core.metrics().unavailable_total);
    respond(
        core,
        c,
        fd,
        out,
        method,
        503,
        b"Service Unavailable\n",
        then,
    )
    .await
}
