//! Hot path: reading a request head: the header timeout, the empty lines that may come
//! before a request, one pass over a head that trickles in.

use super::*;

/// Drops the empty lines (CR and LF bytes) that may precede a request (RFC 9112 §2.2);
/// true if there were any. One compare when there are none.
pub(super) fn skip_blank_lines(buf: &mut Vec<u8>) -> bool {
    if !matches!(buf.first(), Some(b'\r' | b'\n')) {
        return false;
    }
    let blank = buf
        .iter()
        .take_while(|&&x| x == b'\r' || x == b'\n')
        .count();
    buf.drain(..blank);
    true
}

/// What [`read_head`] got.
pub(super) enum Head {
    Request(RequestInfo),
    /// The client went away or idled out.
    Gone,
    /// Only empty lines came, and the buffer is empty: the connection is idle again.
    Idle,
}

/// Reads until a complete request head is buffered. `Err(status)`: answer with that
/// status and close. `first_by`: the connection's first request (TLS), whose first byte
/// is due then, the header timeout after the connection's start, whatever empty lines
/// came meanwhile (later ones have the idle timeout).
pub(super) async fn read_head<S: Client>(
    core: &Core,
    c: &mut S,
    buf: &mut Vec<u8>,
    first_by: Option<std::time::Instant>,
) -> Result<Head, u16> {
    // The whole head must arrive within the header timeout of its first byte, however
    // slowly it trickles in (slowloris costs a connection, never a core).
    let mut deadline: Option<std::time::Instant> = None;
    // Bytes already parsed as an incomplete head: after the first attempt (which parses a
    // head that came whole in one read, the usual case), the head is parsed again only once
    // its end may be in, so a head trickling in costs one pass over its bytes, not one per
    // read.
    let mut scanned: Option<usize> = None;
    loop {
        let parse = match scanned {
            None => !buf.is_empty(),
            Some(from) => buf.len() >= flynn_http::MAX_HEAD || may_end_head(buf, from),
        };
        if parse {
            scanned = Some(buf.len());
            match parse_request(buf) {
                Ok(Some(info)) => return Ok(Head::Request(info)),
                Ok(None) => {}
                Err(e) => return Err(e.status()),
            }
        }
        // Empty lines before a request are skipped (RFC 9112 §2.2), also when they arrive
        // on their own after a response (a client's stray CRLF after a body): waiting for
        // the next request they leave the connection idle, not under the header timeout.
        if deadline.is_none() && skip_blank_lines(buf) {
            scanned = None;
            // Plain TCP idles without a buffer, in the idle sweep's reach (expiry,
            // parking, a drain), not in this read.
            if buf.is_empty() && !S::IDLES_IN_READ {
                return Ok(Head::Idle);
            }
        }
        let now = std::time::Instant::now();
        // Nothing received yet (a TLS connection idling in this read): the idle timeout,
        // or before the first request what is left of the header timeout.
        let idle = buf.is_empty() && deadline.is_none();
        let limit = match (idle, first_by) {
            (true, Some(by)) => by.saturating_duration_since(now),
            (true, None) => core.settings().idle_timeout,
            (false, _) => {
                let d = *deadline.get_or_insert(now + core.settings().header_timeout);
                d.saturating_duration_since(now)
            }
        };
        let taken = std::mem::take(buf);
        let read = monoio::time::timeout(limit, read_append(c, taken));
        let res = if idle && S::IDLES_IN_READ {
            // A draining router (handover, shutdown) closes its idle keep-alive connections:
            // this one idles here, out of the idle sweep's reach, and would otherwise hold
            // the drain to its timeout. Nothing of a request is buffered yet.
            monoio::select! {
                r = read => r,
                _ = core.stop.wait() => return Ok(Head::Gone),
            }
        } else {
            read.await
        };
        let (res, b) = match res {
            Ok(x) => x,
            Err(_) if idle => return Ok(Head::Gone),
            Err(_) => return Err(408),
        };
        *buf = b;
        match res {
            Ok(0) | Err(_) => return Ok(Head::Gone),
            Ok(_) => {}
        }
    }
}

/// Whether a head's end (an empty line, `\n\n` or `\n\r\n`) may be in `buf` after the
/// first `from` bytes.
fn may_end_head(buf: &[u8], from: usize) -> bool {
    let tail = &buf[from.saturating_sub(2)..];
    tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n")
}

#[cfg(test)]
mod tests {
    use super::may_end_head;

    #[test]
    fn a_head_end_is_found_across_the_boundary_of_what_was_scanned() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        // Wherever the earlier reads stopped, the end is seen once all of it is in.
        for from in 0..head.len() {
            assert!(may_end_head(head, from), "from {from}");
        }
        assert!(may_end_head(b"GET / HTTP/1.1\nHost: a\n\n", 23));
        assert!(!may_end_head(b"GET / HTTP/1.1\r\nHost: a\r\n", 0));
        // A line end already scanned is not taken for the end again.
        assert!(!may_end_head(b"GET / HTTP/1.1\r\nHost: a\r\nX", 26));
    }
}
