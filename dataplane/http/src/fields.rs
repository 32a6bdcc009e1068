//! Hot path: header field knowledge shared by both directions: which names matter, token
//! lists, the framing headers' validation and the hop-by-hop filter.

use crate::head::{ParseError, MAX_HEADERS};
use std::cmp::Ordering;
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
        let n = decimal(elem).ok_or(ParseError::Malformed)?;
        match *cur {
            Some(prev) if prev != n => return Err(ParseError::Smuggling),
            _ => *cur = Some(n),
        }
    }
    Ok(())
}

/// A non-empty run of ASCII digits as a `u64` (`None` for anything else or an overflow).
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
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
        let mut lists = false;
        for (k, h) in f.kinds.iter_mut().zip(headers) {
            *k = classify(h.name.as_bytes());
            lists |= *k == Field::Connection;
        }
        f.keep_conn = keep_conn(&f);
        if lists && !f.keep_conn {
            f.mark_connection_listed();
        }
        f
    }

    /// Marks every field whose name is a token of a Connection field, except Host and
    /// Content-Length, which carry routing and framing and are never hop-by-hop (a client's
    /// `Connection: host` must not hide its Host from the absolute-form rewrite).
    ///
    /// Linear-ish in the Connection values' length, without allocation (tokens × fields would
    /// cost ~4M comparisons for a 64 KiB head of 127 fields and `Connection: a,a,…`). A token
    /// equal to the one before is skipped. While the comparisons stay under [`SORT_AFTER`]
    /// (every ordinary head) each token is compared with each field; past that,
    /// [`Self::mark_sorted`] takes the rest of the tokens.
    #[inline(never)]
    fn mark_connection_listed(&mut self) {
        let headers = self.headers;
        let kinds = self.kinds;
        let mut compares = 0;
        let mut prev: &[u8] = b"";
        for (c, conn) in headers.iter().enumerate() {
            if kinds[c] != Field::Connection {
                continue;
            }
            let mut toks = tokens(conn.value);
            while let Some(t) = toks.next() {
                if names_eq(t, prev) {
                    continue;
                }
                prev = t;
                if compares > SORT_AFTER {
                    let later = headers[c + 1..]
                        .iter()
                        .zip(&kinds[c + 1..])
                        .filter(|(_, &k)| k == Field::Connection)
                        .flat_map(|(h, _)| tokens(h.value));
                    return self.mark_sorted(std::iter::once(t).chain(toks).chain(later));
                }
                compares += headers.len();
                for (i, h) in headers.iter().enumerate() {
                    if names_eq(h.name.as_bytes(), t)
                        && !matches!(kinds[i], Field::Host | Field::ContentLength)
                    {
                        self.listed[i] = true;
                    }
                }
            }
        }
    }

    /// The rest of [`Self::mark_connection_listed`] for many tokens (`toks`). The fields
    /// still unmarked that a token may name are sorted (on the stack) by the first 16 bytes
    /// of their lowercased names as a number, then by the whole names, and each token costs
    /// a binary search over those numbers (≤ 8 steps), plus one by name among the fields
    /// whose first 16 bytes are the token's (only for names longer than that). Fields of one name are marked
    /// together (here and before), so a name's first field marked means all of them are;
    /// marking stops once every field is.
    #[cold]
    #[inline(never)]
    fn mark_sorted<'v>(&mut self, toks: impl Iterator<Item = &'v [u8]>) {
        let headers = self.headers;
        let name = |i: u8| headers[usize::from(i)].name.as_bytes();
        let mut sorted = [(0u128, 0u8); MAX_HEADERS];
        let mut n = 0;
        for (i, h) in headers.iter().enumerate() {
            if !self.listed[i] && !matches!(self.kinds[i], Field::Host | Field::ContentLength) {
                sorted[n] = (name_key(h.name.as_bytes()), i as u8);
                n += 1;
            }
        }
        let sorted = &mut sorted[..n];
        sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| cmp_names(name(a.1), name(b.1))));
        let mut left = n;
        let mut prev: &[u8] = b"";
        for t in toks {
            if left == 0 {
                return;
            }
            if names_eq(t, prev) {
                continue;
            }
            prev = t;
            let k = name_key(t);
            let lo = sorted.partition_point(|e| e.0 < k);
            if sorted.get(lo).is_none_or(|e| e.0 != k) {
                continue;
            }
            let same_key = &sorted[lo..];
            let same_key = &same_key[..same_key.partition_point(|e| e.0 == k)];
            let at = same_key.partition_point(|e| cmp_names(name(e.1), t) == Ordering::Less);
            let Some(&(_, first)) = same_key.get(at) else {
                continue;
            };
            if !names_eq(name(first), t) || self.listed[usize::from(first)] {
                continue;
            }
            for &(_, i) in same_key[at..].iter().take_while(|e| names_eq(name(e.1), t)) {
                self.listed[usize::from(i)] = true;
                left -= 1;
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
    /// Content-Length goes out once, as a single value in plain decimal: a list of equal
    /// values (`5, 5`) or a repeated field (the parser refused unequal ones) is valid but some
    /// next hops reject it (RFC 9110 §8.6 lets a recipient replace it with the single
    /// value), and leading zeros (`0012`) are valid but a next hop that detects the base
    /// reads them as octal (10).
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
                        let first = trim_ows(first);
                        match decimal(first) {
                            Some(n) => {
                                out.extend_from_slice(h.name.as_bytes());
                                out.extend_from_slice(b": ");
                                put_u64(out, n);
                                out.extend_from_slice(b"\r\n");
                            }
                            // Not from a head the parser accepted: as it came.
                            None => put_header(out, h.name.as_bytes(), first),
                        }
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

/// Token-by-field comparisons after which [`Fields::mark_connection_listed`] sorts the
/// fields by name (≈ the cost of sorting 128 of them) instead of comparing each token with
/// each field ([`Fields::mark_sorted`]).
const SORT_AFTER: usize = 1024;

/// The first 16 bytes of a name, lowercased, as a big-endian number (zero-padded): a quick
/// first comparison for [`Fields::mark_sorted`], which decides alone between names of up to
/// 16 bytes (they hold no NUL).
fn name_key(name: &[u8]) -> u128 {
    let mut k = [0u8; 16];
    for (d, s) in k.iter_mut().zip(name) {
        *d = s.to_ascii_lowercase();
    }
    u128::from_be_bytes(k)
}

/// Case-insensitive name equality (length first).
#[inline]
fn names_eq(a: &[u8], b: &[u8]) -> bool {
    count_compare();
    a.len() == b.len() && a.eq_ignore_ascii_case(b)
}

/// Orders names by their ASCII-lowercased bytes (consistent with [`names_eq`]).
fn cmp_names(a: &[u8], b: &[u8]) -> Ordering {
    count_compare();
    for (x, y) in a.iter().zip(b) {
        match x.to_ascii_lowercase().cmp(&y.to_ascii_lowercase()) {
            Ordering::Equal => {}
            other => return other,
        }
    }
    a.len().cmp(&b.len())
}

#[cfg(test)]
thread_local! {
    /// Name comparisons made on this thread (tests measure the marking's cost with it).
    static NAME_COMPARES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

#[inline(always)]
fn count_compare() {
    #[cfg(test)]
    NAME_COMPARES.with(|c| c.set(c.get() + 1));
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
            (b"5, 05", Ok(5)),
            (b"0012", Ok(12)),
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

    /// The fields named by Connection tokens, the obvious way (tokens × fields).
    fn listed_naive(headers: &[Header]) -> Vec<bool> {
        let mut listed = vec![false; headers.len()];
        let kinds: Vec<Field> = headers
            .iter()
            .map(|h| classify(h.name.as_bytes()))
            .collect();
        for (h, _) in headers
            .iter()
            .zip(&kinds)
            .filter(|(_, &k)| k == Field::Connection)
        {
            for t in tokens(h.value) {
                for (i, other) in headers.iter().enumerate() {
                    if !matches!(kinds[i], Field::Host | Field::ContentLength)
                        && other.name.as_bytes().eq_ignore_ascii_case(t)
                    {
                        listed[i] = true;
                    }
                }
            }
        }
        listed
    }

    fn listed(headers: &[Header]) -> Vec<bool> {
        let f = Fields::new(headers, |_| false);
        f.listed[..headers.len()].to_vec()
    }

    /// Random heads (names from a small pool in random case, Connection fields with
    /// repeated, padded and empty elements, sometimes thousands of tokens so the sorted
    /// lookup takes over) mark the same fields as the obvious way.
    #[test]
    fn connection_marking_matches_the_obvious_way() {
        let pool = [
            "a",
            "b",
            "ab",
            "ba",
            "x-a",
            "keep-alive",
            "upgrade",
            "host",
            "content-length",
            "te",
            "close",
            "foo",
            "foo-bar",
            "z",
            // Names that share their first 16 bytes, or end at or near the 16th.
            "x-common-prefix",
            "x-common-prefix-",
            "x-common-prefix-a",
            "x-common-prefix-b",
            "x-common-prefix-ab",
            "x-common-prefix-ba",
        ];
        let mut rng = fastrand::Rng::with_seed(0xc0ffee);
        let random_case = |s: &str, rng: &mut fastrand::Rng| -> String {
            s.chars()
                .map(|c| {
                    if rng.bool() {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect()
        };
        for round in 0..1500 {
            let mut owned: Vec<(String, String)> = Vec::new();
            let fields = rng.usize(0..MAX_HEADERS);
            for _ in 0..fields {
                let name = random_case(pool[rng.usize(..pool.len())], &mut rng);
                owned.push((name, "v".into()));
            }
            for _ in 0..rng.usize(1..4) {
                let many = if round % 3 == 0 { 2000 } else { 6 };
                let mut v = String::new();
                for _ in 0..rng.usize(0..many) {
                    match rng.u8(..6) {
                        0 => v.push_str(" ,"),
                        1 => v.push_str(",,"),
                        _ => {
                            let t = random_case(pool[rng.usize(..pool.len())], &mut rng);
                            v.push_str(&format!(" {t}\t,"));
                        }
                    }
                }
                let at = rng.usize(..=owned.len());
                owned.insert(at, ("Connection".into(), v));
            }
            owned.truncate(MAX_HEADERS);
            let headers: Vec<Header> = owned
                .iter()
                .map(|(n, v)| Header {
                    name: n,
                    value: v.as_bytes(),
                })
                .collect();
            assert_eq!(listed(&headers), listed_naive(&headers), "{owned:?}");
        }
    }

    /// 125 fields and a Connection value filling the rest of a 64 KiB head with `tokens`.
    fn flood(tokens: &str) -> (Vec<String>, String) {
        let names: Vec<String> = (0..125).map(|i| format!("X-Field-{i}")).collect();
        let v = tokens.repeat((crate::MAX_HEAD - 125 * 16) / tokens.len());
        (names, v)
    }

    /// A head at the limits costs name comparisons in proportion to its length, not
    /// tokens × fields (~4M comparisons for 32K tokens and 125 fields).
    #[test]
    fn connection_marking_is_linear_ish() {
        for pattern in [
            "a,",
            "a,b,",
            "a,b,c,d,e,f,g,h,",
            "X-Field-1,x-field-77,",
            "x-field-124,",
            "x-field-999,x-field-998,",
        ] {
            let (names, v) = flood(pattern);
            let mut headers: Vec<Header> = names
                .iter()
                .map(|n| Header {
                    name: n,
                    value: b"v",
                })
                .collect();
            headers.push(Header {
                name: "Connection",
                value: v.as_bytes(),
            });
            let tokens = tokens(v.as_bytes()).count();
            assert!(tokens > 5000, "{tokens}");
            NAME_COMPARES.with(|c| c.set(0));
            let want = listed_naive(&headers);
            let naive = NAME_COMPARES.with(|c| c.replace(0));
            assert_eq!(naive, 0, "the reference does not count");
            let got = listed(&headers);
            let compares = NAME_COMPARES.with(|c| c.get());
            assert_eq!(got, want, "{pattern}");
            // A token: one comparison with the one before, a binary search over ≤ 128
            // names (≤ 8), one equality check; plus the comparisons before and for sorting.
            let bound = tokens * 10 + SORT_AFTER + 2 * 128 * 8;
            assert!(
                compares <= bound,
                "{pattern}: {compares} comparisons for {tokens} tokens"
            );
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
