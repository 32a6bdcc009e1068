//! Sans-IO syslog for the Flynn log aggregator: RFC 6587 framing and RFC 5424 parsing.
//!
//! - [`Framer`] splits a TCP byte stream into frames, auto-detecting octet counting
//!   (`<len> SP <msg>`) or LF-terminated framing per frame, with a size limit. Frames are
//!   `bytes::Bytes` slices of the read buffer: nothing is copied.
//! - [`Message::parse`] finds the RFC 5424 fields of a frame as spans ([`Fields`]); field
//!   accessors return slices of the frame. A frame that is not RFC 5424 is kept as a raw
//!   message (flagged), never dropped.
//! - [`sd`] validates and iterates structured data (escapes `\"`, `\\`, `\]`, NILVALUE).
//! - [`flynn`] adds Flynn's conventions: PROCID `<type>.<job>`, MSGID → [`Stream`],
//!   `[flynn seq="N"]`.
//! - [`Timestamp`] parses RFC 3339 into UTC nanoseconds (clamping times outside
//!   1677–2262 to the representable range, so such a message keeps its app) and formats
//!   it like Go's `RFC3339Nano`.
//!
//! No I/O, no clock reads on the parse path, no allocation per message; errors are small
//! `Copy` enums. Used by `flynn-logagg` (ingest and snapshots); fuzzed in `fuzz/`.

pub mod flynn;
mod framing;
mod message;
pub mod sd;
mod timestamp;

pub use flynn::{split_procid, Stream};
pub use framing::{FrameError, Framer, Located, Scan, DEFAULT_MAX_FRAME, MAX_LEN_DIGITS};
pub use message::{parse_fields, Fields, Message, ParseError, Span};
pub use timestamp::Timestamp;
