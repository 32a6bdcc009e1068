//! Hot path: request head parsing and validation (limits, framing, smuggling rules).

use httparse::{Header, Status};

use crate::fields::{header_store, valid_host, HeaderStore, Scan};
use crate::head::{Framing, Method, ParseError, Span, MAX_HEAD, MAX_HEADERS};

/// Facts about a complete, validated request head. Spans point into the parsed buffer.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo {
    /// Bytes up to and including the blank line ending the head.
    pub head_len: usize,
    pub method: Method,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version_minor: u8,
    /// The Request-URI verbatim (origin-form, absolute-form, `*` or authority-form).
    pub uri: Span,
    /// The path of the URI without the query; empty means `/` (absolute-form without a path,
    /// `*`, authority-form).
    pub path: Span,
    /// The authority of an absolute-form URI, else the Host header value.
    pub host: Option<Span>,
    /// `Empty`, `Length(n)` or `Chunked`; never `Close`.
    pub framing: Framing,
    /// Whether the client connection may stay open after this exchange.
    pub keep_alive: bool,
    /// HTTP/1.1 with a Connection token `upgrade`: the router switches to its tunnel path.
    pub upgrade: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
}

/// Parses a request head at the start of `buf`.
///
/// `Ok(None)`: incomplete and shorter than [`MAX_HEAD`], read more. `Err(HeadTooLarge)`:
/// no complete head within the first [`MAX_HEAD`] bytes. Only that prefix is ever scanned.
pub fn parse_request(buf: &[u8]) -> Result<Option<RequestInfo>, ParseError> {
    let limited = &buf[..buf.len().min(MAX_HEAD)];
    let mut store = header_store();
    let mut newer = None;
    let parts = match parse_parts(limited, &mut store, &mut newer) {
        Ok(Status::Complete(parts)) => parts,
        Ok(Status::Partial) if buf.len() >= MAX_HEAD => return Err(ParseError::HeadTooLarge),
        Ok(Status::Partial) => return Ok(None),
        Err(e) => return Err(version_or_malformed(e, limited)),
    };
    let head_len = parts.len;
    let version_minor = parts.version_minor;
    let method = Method::from_bytes(parts.method);
    let uri = parts.uri;
    let scan = Scan::of(parts.headers)?;

    let (path, authority) = split_uri(uri);
    if scan.host_fields > 1 {
        return Err(ParseError::Malformed);
    }
    // Go answers 400 to an HTTP/1.1 request without Host.
    if version_minor >= 1 && scan.host_fields == 0 {
        return Err(ParseError::Malformed);
    }
    // Absolute-form names its host in the target, which wins over the Host header
    // (RFC 9112 §3.2.2; Go sets `req.Host` the same way, and Flynn routes on it).
    let host = match (scan.host, authority) {
        (_, Some(a)) if !a.is_empty() => Some(a),
        (h, _) => h,
    };
    if let Some(h) = host {
        if !valid_host(h) {
            return Err(ParseError::Malformed);
        }
    }

    let framing = if scan.chunked(version_minor)? {
        Framing::Chunked
    } else if let Some(n) = scan.content_length {
        Framing::Length(n)
    } else {
        Framing::Empty
    };

    let keep_alive = if version_minor >= 1 {
        !scan.conn_close
    } else {
        scan.conn_keep_alive && !scan.conn_close
    };

    Ok(Some(RequestInfo {
        head_len,
        method,
        version_minor,
        uri: Span::of(buf, uri),
        path: Span::of(buf, path),
        host: host.map(|h| Span::of(buf, h)),
        framing,
        keep_alive,
        upgrade: version_minor >= 1 && scan.conn_upgrade,
        // An HTTP/1.0 client's expectation is ignored (RFC 9110 §10.1.1).
        expect_continue: version_minor >= 1 && scan.expect_continue,
    }))
}

/// A request head as `httparse` splits it. The slices borrow the parsed buffer.
pub(crate) struct Parts<'b, 'h> {
    pub method: &'b [u8],
    pub uri: &'b [u8],
    /// 0 or 1 (HTTP/1.2 to 1.9 are read as 1.1).
    pub version_minor: u8,
    pub headers: &'h [Header<'b>],
    /// Bytes up to and including the blank line ending the head.
    pub len: usize,
}

/// Header storage for a head saying HTTP/1.2 to 1.9, filled only for one (`httparse` reads
/// the fields after such a request line into initialised storage).
pub(crate) type NewerStore<'b> = Option<[Header<'b>; MAX_HEADERS]>;

/// Splits the request head at the start of `buf` with `httparse`, header fields into
/// `store`.
///
/// HTTP/1.2 to HTTP/1.9 is read as HTTP/1.1, the highest minor version we speak (RFC 9112
/// §2.3; Go and nginx do so; forwarded requests always say HTTP/1.1). `httparse` takes 1.0
/// and 1.1 only, so for those the request line is checked by `httparse` up to the minor
/// digit and the fields after it are parsed on their own (into `newer`), in place: no copy
/// of the head, and the slices are the same as for the head with the digit lowered.
#[inline]
pub(crate) fn parse_parts<'b, 'h>(
    buf: &'b [u8],
    store: &'h mut HeaderStore<'b>,
    newer: &'h mut NewerStore<'b>,
) -> httparse::Result<Parts<'b, 'h>> {
    let mut req = httparse::Request::new(&mut []);
    let config = httparse::ParserConfig::default();
    match config.parse_request_with_uninit_headers(&mut req, buf, store) {
        Ok(Status::Complete(len)) => {
            let (Some(method), Some(uri), Some(version_minor)) =
                (req.method, req.path, req.version)
            else {
                return Err(httparse::Error::Token);
            };
            Ok(Status::Complete(Parts {
                method: method.as_bytes(),
                uri: uri.as_bytes(),
                version_minor,
                headers: req.headers,
                len,
            }))
        }
        Ok(Status::Partial) => Ok(Status::Partial),
        Err(httparse::Error::Version) => match newer_minor(buf) {
            Some(line) => parse_newer(buf, line, newer),
            None => Err(httparse::Error::Version),
        },
        Err(e) => Err(e),
    }
}

/// [`parse_parts`] for a request line in HTTP/1.2 to 1.9, at `line` in `buf`.
#[cold]
#[inline(never)]
fn parse_newer<'b, 'h>(
    buf: &'b [u8],
    line: NewerLine,
    newer: &'h mut NewerStore<'b>,
) -> httparse::Result<Parts<'b, 'h>> {
    // `httparse` accepts the line up to its minor digit (and stops there, wanting more).
    let digit = line.version.end - 1;
    let mut prefix = httparse::Request::new(&mut []);
    match prefix.parse(&buf[..digit]) {
        Ok(Status::Partial) => {}
        Ok(Status::Complete(_)) => return Err(httparse::Error::Version),
        Err(e) => return Err(e),
    }
    let line_end = match &buf[line.version.end..] {
        [] | [b'\r'] => return Ok(Status::Partial),
        [b'\r', b'\n', ..] => line.version.end + 2,
        [b'\n', ..] => line.version.end + 1,
        _ => return Err(httparse::Error::NewLine),
    };
    let store = newer.insert([httparse::EMPTY_HEADER; MAX_HEADERS]);
    match httparse::parse_headers(&buf[line_end..], store)? {
        Status::Complete((n, headers)) => Ok(Status::Complete(Parts {
            method: &buf[line.method],
            uri: &buf[line.uri],
            version_minor: 1,
            headers,
            len: line_end + n,
        })),
        Status::Partial => Ok(Status::Partial),
    }
}

/// Splits a Request-URI into its path (without query; empty when there is none) and, for
/// absolute-form, its authority (without userinfo). Both are sub-slices of `uri`.
fn split_uri(uri: &[u8]) -> (&[u8], Option<&[u8]>) {
    let until_query = |s: &[u8]| -> usize { s.iter().position(|&b| b == b'?').unwrap_or(s.len()) };
    if uri.first() == Some(&b'/') {
        return (&uri[..until_query(uri)], None);
    }
    let Some(rest) = strip_scheme(uri) else {
        // `*` or authority-form: no path.
        return (&uri[..0], None);
    };
    let auth_end = rest
        .iter()
        .position(|&b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let mut authority = &rest[..auth_end];
    if let Some(at) = authority.iter().rposition(|&b| b == b'@') {
        authority = &authority[at + 1..];
    }
    let after = &rest[auth_end..];
    let path = if after.first() == Some(&b'/') {
        &after[..until_query(after)]
    } else {
        &after[..0]
    };
    (path, Some(authority))
}

/// For absolute-form `scheme://rest`, returns `rest`.
fn strip_scheme(uri: &[u8]) -> Option<&[u8]> {
    let colon = uri.iter().position(|&b| b == b':')?;
    let (scheme, rest) = uri.split_at(colon);
    let first_alpha = scheme.first().is_some_and(u8::is_ascii_alphabetic);
    let scheme_ok = first_alpha
        && scheme
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if scheme_ok {
        rest.strip_prefix(b"://")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::split_uri;

    #[test]
    fn uri_split_table() {
        type Row<'a> = (&'a str, &'a str, Option<&'a str>);
        let table: &[Row] = &[
            ("/", "/", None),
            ("/p?q=1", "/p", None),
            ("//foo/bar", "//foo/bar", None),
            ("/a:b@c?x", "/a:b@c", None),
            ("http://h/p?q", "/p", Some("h")),
            ("http://h", "", Some("h")),
            ("http://h?q", "", Some("h")),
            ("https://user:pw@h:8080/x", "/x", Some("h:8080")),
            ("HTTP://Example.COM/", "/", Some("Example.COM")),
            ("*", "", None),
            ("example.com:443", "", None),
            ("1http://h/p", "", None),
        ];
        for &(uri, path, auth) in table {
            let (p, a) = split_uri(uri.as_bytes());
            assert_eq!(p, path.as_bytes(), "path of {uri}");
            assert_eq!(a, auth.map(str::as_bytes), "authority of {uri}");
        }
    }
}

/// Where the parts of a request line in `HTTP/1.<2..=9>` are.
struct NewerLine {
    method: std::ops::Range<usize>,
    uri: std::ops::Range<usize>,
    /// The 8 bytes `HTTP/1.<digit>`.
    version: std::ops::Range<usize>,
}

/// The request line at the start of `buf` when it is `method SP uri SP HTTP/1.<2..=9>`
/// (httparse takes 1.0 and 1.1 only).
fn newer_minor(buf: &[u8]) -> Option<NewerLine> {
    // httparse skips empty lines before the request line, and reports the version as soon
    // as its 8 bytes are in (the line's end may not be yet).
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n')?;
    let rest = &buf[start..];
    let len = rest
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(rest.len());
    let line = &rest[..len];
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    match version {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', minor] if (b'2'..=b'9').contains(minor) => {
            let uri_start = start + method.len() + 1;
            let version_start = uri_start + uri.len() + 1;
            Some(NewerLine {
                method: start..start + method.len(),
                uri: uri_start..uri_start + uri.len(),
                version: version_start..version_start + 8,
            })
        }
        _ => None,
    }
}

/// httparse reports any bad version token as a version error; like Go, only a well-formed
/// `HTTP/<digit>.<digit>` that we do not speak is 505, anything else is a malformed 400.
fn version_or_malformed(e: httparse::Error, buf: &[u8]) -> ParseError {
    if e != httparse::Error::Version {
        return ParseError::from(e);
    }
    let line_end = buf
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(buf.len());
    let line = &buf[..line_end];
    let version = line.rsplit(|&b| b == b' ').next().unwrap_or(b"");
    match version {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit()
                && minor.is_ascii_digit()
                && line.split(|&b| b == b' ').count() == 3 =>
        {
            ParseError::BadVersion
        }
        _ => ParseError::Malformed,
    }
}

#[cfg(test)]
mod version_tests {
    use super::*;

    #[test]
    fn bad_versions() {
        let cases: &[(&[u8], ParseError)] = &[
            (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", ParseError::BadVersion),
            (b"GET / HTTP/3.1\r\nHost: a\r\n\r\n", ParseError::BadVersion),
            (
                b"PROXY TCP4 1.1.1.123 2.2.2.2 1234 80\r\nHost: a\r\n\r\n",
                ParseError::Malformed,
            ),
            (b"GET / HTTP/1.x\r\nHost: a\r\n\r\n", ParseError::Malformed),
            (b"GET / HTTP/1.10\r\nHost: a\r\n\r\n", ParseError::Malformed),
            (b"GET / FTP/1.1\r\nHost: a\r\n\r\n", ParseError::Malformed),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse_request(input).unwrap_err(),
                *want,
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(ParseError::Malformed.status(), 400);
        assert_eq!(ParseError::BadVersion.status(), 505);
    }

    /// A newer HTTP/1 minor version is read as HTTP/1.1 (RFC 9112 §2.3), spans and all; a
    /// head cut short is still incomplete.
    #[test]
    fn newer_http1_minor_versions_are_read_as_1_1() {
        let head = b"POST /x?y HTTP/1.2\r\nHost: a.example\r\nContent-Length: 3\r\n\r\nabc";
        let info = parse_request(head).unwrap().unwrap();
        assert_eq!(info.version_minor, 1);
        assert_eq!(info.head_len, head.len() - 3);
        assert_eq!(info.path.get(head), b"/x");
        assert_eq!(info.host.map(|h| h.get(head)), Some(&b"a.example"[..]));
        assert_eq!(info.framing, Framing::Length(3));
        assert!(parse_request(b"GET / HTTP/1.9\r\nHost: a\r\n")
            .unwrap()
            .is_none());
        // Cut right after the version, and after empty lines before the request line.
        assert!(parse_request(b"GET / HTTP/1.2").unwrap().is_none());
        let lead = b"\r\nGET / HTTP/1.3\r\nHost: a\r\n\r\n";
        assert_eq!(parse_request(lead).unwrap().unwrap().version_minor, 1);
    }
}
