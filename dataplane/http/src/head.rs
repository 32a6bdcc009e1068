//! Hot path: vocabulary shared by request and response heads (limits, errors, spans, framing).

use std::fmt;

/// Largest request or response head accepted, blank line included.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields accepted in one head (the size of the stack array given to `httparse`).
pub const MAX_HEADERS: usize = 128;

/// Why a head was rejected. Small and `Copy`: the router maps it to a status and a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// The head did not end within [`MAX_HEAD`] bytes.
    HeadTooLarge,
    /// Bad syntax: request line, header names or values, Host, Content-Length.
    Malformed,
    /// Framing headers that two parsers could read differently (CL and TE, conflicting CLs,
    /// a transfer coding other than a single `chunked`).
    Smuggling,
    /// More than [`MAX_HEADERS`] header fields.
    TooManyHeaders,
    /// A version other than HTTP/1.0 or HTTP/1.1.
    BadVersion,
}

impl ParseError {
    /// The status to answer a client with when its request head fails with this error.
    pub fn status(self) -> u16 {
        match self {
            ParseError::HeadTooLarge | ParseError::TooManyHeaders => 431,
            ParseError::Malformed | ParseError::Smuggling => 400,
            ParseError::BadVersion => 505,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            ParseError::HeadTooLarge => "message head too large",
            ParseError::Malformed => "malformed message head",
            ParseError::Smuggling => "ambiguous message framing",
            ParseError::TooManyHeaders => "too many header fields",
            ParseError::BadVersion => "unsupported HTTP version",
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for ParseError {}

impl From<httparse::Error> for ParseError {
    fn from(e: httparse::Error) -> Self {
        match e {
            httparse::Error::TooManyHeaders => ParseError::TooManyHeaders,
            httparse::Error::Version => ParseError::BadVersion,
            _ => ParseError::Malformed,
        }
    }
}

/// Request method. The bytes are forwarded verbatim; this only steers framing decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Patch,
    Connect,
    Trace,
    /// Any other token (methods are case-sensitive: `get` is `Other`).
    Other,
}

impl Method {
    /// Classifies a method token.
    pub fn from_bytes(m: &[u8]) -> Method {
        match m {
            b"GET" => Method::Get,
            b"HEAD" => Method::Head,
            b"POST" => Method::Post,
            b"PUT" => Method::Put,
            b"DELETE" => Method::Delete,
            b"OPTIONS" => Method::Options,
            b"PATCH" => Method::Patch,
            b"CONNECT" => Method::Connect,
            b"TRACE" => Method::Trace,
            _ => Method::Other,
        }
    }

    /// Safe methods (RFC 9110 §9.2.1): GET, HEAD, OPTIONS, TRACE. A proxy may send such a
    /// request again when a reused connection died before answering; anything else may
    /// already have acted on the backend (RFC 9112 §9.3.1.1).
    pub fn is_safe(self) -> bool {
        matches!(
            self,
            Method::Get | Method::Head | Method::Options | Method::Trace
        )
    }
}

/// How the body after a head is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    /// Exactly this many bytes (`Content-Length`; may be 0).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Responses only: the body runs until the backend closes the connection.
    Close,
}

/// Byte offsets into the buffer a head was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    /// The bytes of this span in `buf` (empty if `buf` is not the buffer it came from and the
    /// span falls outside it).
    pub fn get<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        buf.get(self.start as usize..self.end as usize)
            .unwrap_or(&[])
    }

    pub fn len(&self) -> usize {
        self.end.saturating_sub(self.start) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The span of `part`, which must be a sub-slice of `buf` lying within its first 4 GiB
    /// (heads are limited to [`MAX_HEAD`], so every parsed part is).
    pub(crate) fn of(buf: &[u8], part: &[u8]) -> Span {
        let start = (part.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
        debug_assert!(start + part.len() <= buf.len());
        Span {
            start: start as u32,
            end: (start + part.len()) as u32,
        }
    }
}
