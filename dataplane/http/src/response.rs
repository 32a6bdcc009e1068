//! Hot path: backend response head parsing and the head written back to the client.

use crate::fields::{header_store, put_header, Field, Fields, Scan};
use crate::head::{Framing, Method, ParseError, MAX_HEAD};
use crate::respond::{put_status_line, reason};

/// Facts about a complete, validated response head.
#[derive(Debug, Clone, Copy)]
pub struct ResponseInfo {
    /// Bytes up to and including the blank line ending the head.
    pub head_len: usize,
    pub status: u16,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version_minor: u8,
    /// `Empty` for HEAD requests, 1xx, 204 and 304; `Length`, `Chunked`, or `Close` (read
    /// until the backend closes).
    pub framing: Framing,
    /// Whether the backend connection can be reused once the body is read.
    pub keep_alive: bool,
    /// Status 101: the connection now carries another protocol.
    pub upgrade: bool,
}

/// Parses a response head at the start of `buf`; `request_method` is the method of the
/// request it answers. Same incomplete / too-large rules as [`crate::parse_request`].
pub fn parse_response(
    buf: &[u8],
    request_method: Method,
) -> Result<Option<ResponseInfo>, ParseError> {
    let limited = &buf[..buf.len().min(MAX_HEAD)];
    let mut store = header_store();
    let mut resp = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let head_len = match config
        .parse_response_with_uninit_headers(&mut resp, limited, &mut store)?
    {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial if buf.len() >= MAX_HEAD => return Err(ParseError::HeadTooLarge),
        httparse::Status::Partial => return Ok(None),
    };
    let (Some(status), Some(version_minor)) = (resp.code, resp.version) else {
        return Err(ParseError::Malformed);
    };
    if status < 100 {
        return Err(ParseError::Malformed);
    }
    let scan = Scan::of(resp.headers)?;
    // Validate framing headers even when the body is known to be empty: a backend sending
    // conflicting ones is broken and the connection must not be reused.
    let chunked = scan.chunked(version_minor)?;

    let bodiless = request_method == Method::Head
        || (100..200).contains(&status)
        || status == 204
        || status == 304;
    let framing = if bodiless {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = scan.content_length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    let upgrade = status == 101;
    let persistent = if version_minor >= 1 {
        !scan.conn_close
    } else {
        scan.conn_keep_alive && !scan.conn_close
    };
    Ok(Some(ResponseInfo {
        head_len,
        status,
        version_minor,
        framing,
        keep_alive: persistent && framing != Framing::Close && !upgrade,
        upgrade,
    }))
}

/// Options for the head written to the client.
#[derive(Debug, Clone, Copy)]
pub struct ResponseOpts<'a> {
    /// The router closes the client connection after this response: add `Connection: close`.
    pub close: bool,
    /// Appended verbatim (e.g. the sticky `Set-Cookie`).
    pub extra: &'a [(&'a [u8], &'a [u8])],
    /// The client spoke HTTP/1.0: never `Transfer-Encoding` (RFC 9112 §6.1; a chunked body
    /// goes out decoded and the connection's close ends it, so the caller sets `close`),
    /// and `Connection: keep-alive` when the connection stays open.
    pub http10: bool,
}

/// Appends to `out` the head to send to the client for the response whose head is at the
/// start of `buf`. Writes nothing if `buf` does not hold that head.
///
/// The status line is always `HTTP/1.1 <code> <reason>` (the backend's reason, or the
/// standard one when it sent none). TE, Trailers and Transfer-Encoding are dropped and
/// `Transfer-Encoding: chunked` re-added when the backend sent it (the body is forwarded
/// still chunked; for HEAD and 304 it only describes the resource). Connection, Upgrade and
/// the fields listed in Connection are dropped unless the status is 101 or the response is
/// HTTP/1.1 with a Connection token `upgrade` (as Flynn's `prepareResponseHeaders`).
/// `Connection: close` is added when `opts.close` or when the body is close-delimited,
/// never on a 101. For an HTTP/1.0 client (`opts.http10`) see [`ResponseOpts::http10`].
pub fn write_response_head(
    buf: &[u8],
    resp: &ResponseInfo,
    opts: &ResponseOpts,
    out: &mut Vec<u8>,
) {
    let Some(head) = buf.get(..resp.head_len) else {
        return;
    };
    let mut store = header_store();
    let mut parsed = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    if !matches!(
        config.parse_response_with_uninit_headers(&mut parsed, head, &mut store),
        Ok(httparse::Status::Complete(_))
    ) {
        return;
    }
    let text = parsed.reason.unwrap_or("").as_bytes();
    let text = if text.is_empty() {
        reason(resp.status).as_bytes()
    } else {
        text
    };
    put_status_line(out, resp.status, text);

    let fields = Fields::new(parsed.headers, |f| {
        resp.upgrade || (resp.version_minor >= 1 && f.connection_upgrade())
    });
    fields.copy_end_to_end(|_| false, out);

    let describes_resource =
        resp.framing == Framing::Empty && !(100..200).contains(&resp.status) && resp.status != 204;
    if !opts.http10
        && (resp.framing == Framing::Chunked
            || (describes_resource && fields.has(Field::TransferEncoding)))
    {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    if (opts.close || resp.framing == Framing::Close) && !resp.upgrade {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if opts.http10 && !resp.upgrade {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    for (name, value) in opts.extra {
        put_header(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
}
