//! Hot path: header field knowledge shared by both directions: which names matter, token
//! lists, the framing headers' validation and the hop-by-hop filter.

use crate::head::{ParseError, MAX_HEADERS};
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::net::IpAddr;

use httparse::Header;

/// The header names the codec acts on; everything else is `Other` and copied verbatim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    Upgrade,
    Te,
    Trailers,
    Expect,
    XForwardedFor,
    XForwardedProto,
    XForwardedPort,
    XRequestStart,
    XRequestId,
    /// Content-Length or Transfer-Encoding spelt with `_` for a `-`: not framing here, but
    /// CGI-style backends (the Mongrel parser family: Unicorn, Puma, Thin) read it as the
    /// real field, so passing it on would let a client frame the body one way for the router
    /// and another for the backend (request smuggling). Always dropped, as nginx drops every
    /// field with an underscore by default.
    UnderscoredFraming,
    Other,
}

/// Classifies a header name case-insensitively (dispatching on length first).
///
/// The router's own `X-` fields also match with `_` for `-`: CGI-style backends (PHP, WSGI,
/// Rack) read `X_Forwarded_For` and `X-Forwarded-For` as one variable, so a field spelt with
/// underscores must be rewritten with the real one, not passed by it (nginx drops every
/// field with an underscore for the same reason).
pub(crate) fn classify(name: &[u8]) -> Field {
    let is = |lit: &[u8]| name.eq_ignore_ascii_case(lit);
    let xs = |lit: &[u8]| {
        name.iter()
            .zip(lit)
            .all(|(&a, &b)| a.eq_ignore_ascii_case(&b) || (a == b'_' && b == b'-'))
    };
    match name.len() {
        2 if is(b"te") => Field::Te,
        4 if is(b"host") => Field::Host,
        6 if is(b"expect") => Field::Expect,
        7 if is(b"upgrade") => Field::Upgrade,
        8 if is(b"trailers") => Field::Trailers,
        10 if is(b"connection") => Field::Connection,
        12 if xs(b"x-request-id") => Field::XRequestId,
        14 if is(b"content-length") => Field::ContentLength,
        14 if xs(b"content-length") => Field::UnderscoredFraming,
        15 if xs(b"x-forwarded-for") => Field::XForwardedFor,
        15 if xs(b"x-request-start") => Field::XRequestStart,
        16 if xs(b"x-forwarded-port") => Field::XForwardedPort,
        17 if is(b"transfer-encoding") => Field::TransferEncoding,
        17 if xs(b"transfer-encoding") => Field::UnderscoredFraming,
        17 if xs(b"x-forwarded-proto") => Field::XForwardedProto,
        _ => Field::Other,
    }
}

/// Strips optional whitespace (SP / HTAB) from both ends.
pub(crate) fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// The non-empty elements of a comma-separated list, trimmed.
pub(crate) fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',')
        .map(trim_ows)
        .filter(|t| !t.is_empty())
}

/// What one pass over the header fields learned about framing and connection management.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Scan<'b> {
    pub content_length: Option<u64>,
    /// Number of Transfer-Encoding fields seen.
    pub te_fields: u32,
    /// True when every Transfer-Encoding field so far is exactly one `chunked` element.
    pub te_chunked_only: bool,
    pub conn_close: bool,
    pub conn_keep_alive: bool,
    pub conn_upgrade: bool,
    pub host: Option<&'b [u8]>,
    pub host_fields: u32,
    pub expect_continue: bool,
}

impl<'b> Scan<'b> {
    /// Reads every header once. Errors only for syntax the caller can never accept
    /// (bad or conflicting Content-Length values); the TE/CL combination rules are applied
    /// by the caller, which knows the message's version and kind.
    pub(crate) fn of(headers: &[Header<'b>]) -> Result<Scan<'b>, ParseError> {
        let mut s = Scan {
            te_chunked_only: true,
            ..Scan::default()
        };
        for h in headers {
            let v = h.value;
            match classify(h.name.as_bytes()) {
                Field::Host => {
                    s.host_fields += 1;
                    s.host = Some(trim_ows(v));
                }
                Field::ContentLength => content_length(v, &mut s.content_length)?,
                Field::TransferEncoding => {
                    s.te_fields += 1;
                    // Exactly one element, `chunked` (as Go's net/http requires): anything
                    // else could be framed differently by the next hop.
                    let mut elems = v.split(|&b| b == b',');
                    let first = elems.next().map(trim_ows).unwrap_or(b"");
                    if !first.eq_ignore_ascii_case(b"chunked") || elems.next().is_some() {
                        s.te_chunked_only = false;
                    }
                }
                Field::Connection => {
                    for t in tokens(v) {
                        if t.eq_ignore_ascii_case(b"close") {
                            s.conn_close = true;
                        } else if t.eq_ignore_ascii_case(b"keep-alive") {
                            s.conn_keep_alive = true;
                        } else if t.eq_ignore_ascii_case(b"upgrade") {
                            s.conn_upgrade = true;
                        }
                    }
                }
                Field::Expect if trim_ows(v).eq_ignore_ascii_case(b"100-continue") => {
                    s.expect_continue = true;
                }
                _ => {}
            }
        }
        Ok(s)
    }

    /// Validates Content-Length / Transfer-Encoding together. Returns `Some(true)` for a
    /// chunked body, `Some(false)` for none of the two, errors for ambiguity.
    pub(crate) fn chunked(&self, version_minor: u8) -> Result<bool, ParseError> {
        if self.te_fields == 0 {
            return Ok(false);
        }
        if self.content_length.is_some() {
            return Err(ParseError::Smuggling);
        }
        if version_minor == 0 {
            return Err(ParseError::Malformed);
        }
        if self.te_fields != 1 || !self.te_chunked_only {
            return Err(ParseError::Smuggling);
        }
        Ok(true)
    }
}

/// Parses one Content-Length field value (possibly a comma list of equal values) and
/// merges it with the value from earlier fields.
fn content_length(v: &[u8], cur: &mut Option<u64>) -> Result<(), ParseError> {
    for elem in v.split(|&b| b == b',') {
        let elem = trim_ows(elem);
        if elem.is_empty() {
            return Err(ParseError::Malformed);
        }
        let mut n: u64 = 0;
        for &b in elem {
            if !b.is_ascii_digit() {
                return Err(ParseError::Malformed);
            }
            n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(b - b'0')))
                .ok_or(ParseError::Malformed)?;
        }
        match *cur {
            Some(prev) if prev != n => return Err(ParseError::Smuggling),
            _ => *cur = Some(n),
        }
    }
    Ok(())
}

/// Host characters accepted (Go's `httpguts.ValidHostHeader` set).
pub(crate) fn valid_host(v: &[u8]) -> bool {
    v.iter().all(|&b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b'-'
                    | b'.'
                    | b':'
                    | b';'
                    | b'='
                    | b'['
                    | b']'
                    | b'_'
                    | b'~'
            )
    })
}

/// Uninitialised header storage for `httparse` (no 4 KiB memset per parse).
pub(crate) type HeaderStore<'b> = [MaybeUninit<Header<'b>>; MAX_HEADERS];

pub(crate) fn header_store<'b>() -> HeaderStore<'b> {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

/// The header fields of a parsed head, classified once, with the hop-by-hop decisions made.
pub(crate) struct Fields<'h, 'b> {
    headers: &'h [Header<'b>],
    kinds: [Field; MAX_HEADERS],
    /// Named by a Connection token (only computed when Connection fields are not kept).
    listed: [bool; MAX_HEADERS],
    keep_conn: bool,
}

impl<'h, 'b> Fields<'h, 'b> {
    /// `keep_conn`: the message is an upgrade, so Connection, Upgrade and the fields they
    /// name are end-to-end for it.
    pub(crate) fn new(headers: &'h [Header<'b>], keep_conn: impl FnOnce(&Self) -> bool) -> Self {
        let headers = &headers[..headers.len().min(MAX_HEADERS)];
        let mut f = Fields {
            headers,
            kinds: [Field::Other; MAX_HEADERS],
            listed: [false; MAX_HEADERS],
            keep_conn: false,
        };
        for (k, h) in f.kinds.iter_mut().zip(headers) {
            *k = classify(h.name.as_bytes());
        }
        f.keep_conn = keep_conn(&f);
        if !f.keep_conn {
            f.mark_connection_listed();
        }
        f
    }

    /// Marks every field whose name is a token of a Connection field, except Host and
    /// Content-Length, which carry routing and framing and are never hop-by-hop (a client's
    /// `Connection: host` must not hide its Host from the absolute-form rewrite). Cost is
    /// bounded by tokens × fields, with a length check first.
    fn mark_connection_listed(&mut self) {
        let headers = self.headers;
        let kinds = self.kinds;
        for (h, &k) in headers.iter().zip(kinds.iter()) {
            if k != Field::Connection {
                continue;
            }
            for t in tokens(h.value) {
                for (i, other) in headers.iter().enumerate() {
                    if matches!(kinds[i], Field::Host | Field::ContentLength) {
                        continue;
                    }
                    let n = other.name.as_bytes();
                    if n.len() == t.len() && n.eq_ignore_ascii_case(t) {
                        self.listed[i] = true;
                    }
                }
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&'h Header<'b>, Field)> + '_ {
        self.headers.iter().zip(self.kinds.iter().copied())
    }

    pub(crate) fn has(&self, kind: Field) -> bool {
        self.kinds[..self.headers.len()].contains(&kind)
    }

    /// Values of the `kind` fields that survive hop-by-hop removal, in order.
    pub(crate) fn values(&self, kind: Field) -> impl Iterator<Item = &'b [u8]> + '_ {
        self.iter()
            .zip(self.listed.iter())
            .filter(move |((_, k), &listed)| *k == kind && !listed)
            .map(|((h, _), _)| h.value)
    }

    /// Whether some Connection field has the token `upgrade`.
    pub(crate) fn connection_upgrade(&self) -> bool {
        self.iter()
            .filter(|(_, k)| *k == Field::Connection)
            .any(|(h, _)| tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"upgrade")))
    }

    /// Copies the end-to-end fields in order, verbatim.
    ///
    /// Always dropped: TE, Trailers, Transfer-Encoding (the caller re-adds `chunked`) and the
    /// kinds for which `replaced` is true. Unless Connection fields are kept: Connection,
    /// Upgrade and every field named by a Connection token, except Host and Content-Length,
    /// which carry routing and framing and are never dropped.
    ///
    /// Content-Length goes out once, as a single value: a list of equal values (`5, 5`) or a
    /// repeated field (the parser refused unequal ones) is valid but some next hops reject
    /// it (RFC 9110 §8.6 lets a recipient replace it with the single value).
    pub(crate) fn copy_end_to_end(&self, replaced: impl Fn(Field) -> bool, out: &mut Vec<u8>) {
        let mut length_done = false;
        for (i, (h, kind)) in self.iter().enumerate() {
            let keep = match kind {
                Field::Te
                | Field::Trailers
                | Field::TransferEncoding
                | Field::UnderscoredFraming => false,
                _ if replaced(kind) => false,
                Field::ContentLength => {
                    if !length_done {
                        length_done = true;
                        let first = h.value.split(|&b| b == b',').next().unwrap_or(b"");
                        put_header(out, h.name.as_bytes(), trim_ows(first));
                    }
                    false
                }
                Field::Host => true,
                Field::Connection | Field::Upgrade => self.keep_conn,
                _ => !self.listed[i],
            };
            if keep {
                put_header(out, h.name.as_bytes(), h.value);
            }
        }
    }
}

/// Appends `name: value\r\n`.
pub(crate) fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends an IP address the way Go prints it (`1.2.3.4`, `::1`).
pub(crate) fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                put_u64(out, u64::from(octet));
            }
        }
        // Writing to a Vec cannot fail; std formats without allocating.
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// Appends `n` in decimal.
pub(crate) fn put_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_is_case_insensitive() {
        let table: &[(&[u8], Field)] = &[
            (b"TE", Field::Te),
            (b"hOsT", Field::Host),
            (b"Content-Length", Field::ContentLength),
            (b"TRANSFER-ENCODING", Field::TransferEncoding),
            (b"x-forwarded-proto", Field::XForwardedProto),
            (b"X-Request-Start", Field::XRequestStart),
            (b"X-Forwarded-For", Field::XForwardedFor),
            (b"Content-Type", Field::Other),
            (b"Content_Length", Field::UnderscoredFraming),
            (b"transfer_ENCODING", Field::UnderscoredFraming),
            (b"Transfer-Encodinh", Field::Other),
            (b"", Field::Other),
        ];
        for &(name, want) in table {
            assert_eq!(classify(name), want, "{:?}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn content_length_values() {
        let table: &[(&[u8], Result<u64, ParseError>)] = &[
            (b"0", Ok(0)),
            (b"42", Ok(42)),
            (b"5, 5", Ok(5)),
            (b"5,6", Err(ParseError::Smuggling)),
            (b"", Err(ParseError::Malformed)),
            (b"5,", Err(ParseError::Malformed)),
            (b"+5", Err(ParseError::Malformed)),
            (b"-1", Err(ParseError::Malformed)),
            (b"0x10", Err(ParseError::Malformed)),
            (b"18446744073709551615", Ok(u64::MAX)),
            (b"18446744073709551616", Err(ParseError::Malformed)),
        ];
        for &(v, want) in table {
            let mut cur = None;
            let got = content_length(v, &mut cur).map(|()| cur.unwrap_or(0));
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(v));
        }
    }

    #[test]
    fn decimal() {
        for n in [0, 7, 10, 1_700_000_000_000, u64::MAX] {
            let mut out = Vec::new();
            put_u64(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }
}
