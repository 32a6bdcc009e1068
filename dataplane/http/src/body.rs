//! Hot path: body framing. Finds where a message body ends while its bytes (chunk framing
//! and trailers included) are forwarded verbatim. Trailer lines are checked as field lines
//! on the way: the next hop may not parse them, so one that is not a field line (a request
//! line, an obs-fold continuation) would reach it as whatever it reads it as. The check
//! applies to both directions: a backend's response with a malformed trailer (or a trailer
//! section over [`MAX_TRAILERS`]) is cut off after what was already relayed, as any other
//! framing error of a backend is (HAProxy refuses such responses too).

use std::fmt;

use crate::head::{Framing, MAX_HEAD};

/// Longest chunk-size line or trailer line accepted, CRLF excluded.
pub const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section accepted (every trailer line with its CRLF and the final CRLF):
/// the head limit, [`MAX_HEAD`].
pub const MAX_TRAILERS: usize = MAX_HEAD;
/// Largest chunk size accepted (2^48).
pub const MAX_CHUNK_SIZE: u64 = 1 << 48;

/// Why a chunked body was rejected. The connection cannot be reused after one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Bad syntax: not a hex size, missing CRLF after data, bare LF, control bytes, a
    /// trailer line that is not a field line (`name: value`, the name a token right before
    /// the colon, the value visible characters, obs-text, SP and HTAB; no obs-fold).
    BadChunk,
    /// A chunk size above [`MAX_CHUNK_SIZE`].
    ChunkTooLarge,
    /// A size or trailer line longer than [`MAX_CHUNK_LINE`].
    LineTooLong,
    /// A trailer section longer than [`MAX_TRAILERS`].
    TrailersTooLarge,
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BodyError::BadChunk => "malformed chunked body",
            BodyError::ChunkTooLarge => "chunk size too large",
            BodyError::LineTooLong => "chunk line too long",
            BodyError::TrailersTooLarge => "trailer section too large",
        })
    }
}

impl std::error::Error for BodyError {}

/// Progress reported by [`BodyReader::advance`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advance {
    /// Bytes at the start of the input that belong to the body (to be forwarded).
    pub used: usize,
    /// The body is complete; bytes after `used` belong to the next message.
    pub done: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Done,
    Failed(BodyError),
    /// Close-delimited: everything is body until EOF.
    UntilClose,
    Length(u64),
    /// Hex digits of a chunk size; `digits` seen so far.
    Size {
        size: u64,
        digits: usize,
    },
    /// Whitespace after the size digits (BWS before `;` or CRLF).
    SizeWs {
        size: u64,
        line: usize,
    },
    /// Inside a chunk extension, skipped until CR.
    Ext {
        size: u64,
        line: usize,
    },
    /// CR of the size line seen, LF expected.
    SizeLf {
        size: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// Inside the trailer section, `total` bytes into it and `line` bytes into the current
    /// line (0: at its start); `value`: the line's colon has been seen.
    Trailer {
        total: usize,
        line: usize,
        value: bool,
    },
    /// CR of a trailer line seen, LF expected; `empty` when the line was empty (the end).
    TrailerLf {
        total: usize,
        empty: bool,
    },
}

/// Tracks the end of one message body. Create one per message with the head's framing.
#[derive(Debug, Clone)]
pub struct BodyReader {
    state: State,
}

impl BodyReader {
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Size { size: 0, digits: 0 },
            Framing::Close => State::UntilClose,
        };
        BodyReader { state }
    }

    /// Whether the whole body has been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes the prefix of `input` that belongs to the body. Call again with the bytes
    /// after `used` once more arrive; after an error every call returns the same error.
    pub fn advance(&mut self, input: &[u8]) -> Result<Advance, BodyError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                State::Done => break,
                State::Failed(e) => return Err(e),
                State::UntilClose => {
                    i = input.len();
                    break;
                }
                State::Length(n) => {
                    let take = (input.len() - i).min(usize::try_from(n).unwrap_or(usize::MAX));
                    i += take;
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::Done
                    } else {
                        State::Length(left)
                    };
                    continue;
                }
                State::Data(n) => {
                    let take = (input.len() - i).min(usize::try_from(n).unwrap_or(usize::MAX));
                    i += take;
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data(left)
                    };
                    continue;
                }
                state => match step(state, b) {
                    Ok(next) => next,
                    Err(e) => {
                        self.state = State::Failed(e);
                        return Err(e);
                    }
                },
            };
            i += 1;
        }
        if let State::Failed(e) = self.state {
            return Err(e);
        }
        Ok(Advance {
            used: i,
            done: self.state == State::Done,
        })
    }
}

/// One byte of chunk framing (everything but data runs).
fn step(state: State, b: u8) -> Result<State, BodyError> {
    Ok(match state {
        State::Size { size, digits } => match (hex(b), b) {
            (Some(d), _) => {
                if digits >= MAX_CHUNK_LINE {
                    return Err(BodyError::LineTooLong);
                }
                let size = (size << 4) | u64::from(d);
                if size > MAX_CHUNK_SIZE {
                    return Err(BodyError::ChunkTooLarge);
                }
                State::Size {
                    size,
                    digits: digits + 1,
                }
            }
            _ if digits == 0 => return Err(BodyError::BadChunk),
            (None, b' ' | b'\t') => State::SizeWs {
                size,
                line: digits + 1,
            },
            (None, b';') => State::Ext {
                size,
                line: digits + 1,
            },
            (None, b'\r') => State::SizeLf { size },
            _ => return Err(BodyError::BadChunk),
        },
        State::SizeWs { size, line } => match b {
            _ if line >= MAX_CHUNK_LINE => return Err(BodyError::LineTooLong),
            b' ' | b'\t' => State::SizeWs {
                size,
                line: line + 1,
            },
            b';' => State::Ext {
                size,
                line: line + 1,
            },
            b'\r' => State::SizeLf { size },
            _ => return Err(BodyError::BadChunk),
        },
        State::Ext { size, line } => match b {
            b'\r' => State::SizeLf { size },
            b'\n' | 0 => return Err(BodyError::BadChunk),
            _ if line >= MAX_CHUNK_LINE => return Err(BodyError::LineTooLong),
            _ => State::Ext {
                size,
                line: line + 1,
            },
        },
        State::SizeLf { size } => match b {
            b'\n' if size == 0 => State::Trailer {
                total: 0,
                line: 0,
                value: false,
            },
            b'\n' => State::Data(size),
            _ => return Err(BodyError::BadChunk),
        },
        State::DataCr => match b {
            b'\r' => State::DataLf,
            _ => return Err(BodyError::BadChunk),
        },
        State::DataLf => match b {
            b'\n' => State::Size { size: 0, digits: 0 },
            _ => return Err(BodyError::BadChunk),
        },
        // A field line (RFC 9112 §5, RFC 9110 §5.5): a token, `:` right after it, then
        // field-value characters. No leading whitespace (obs-fold), none before the colon.
        State::Trailer { total, line, value } => match b {
            _ if total >= MAX_TRAILERS => return Err(BodyError::TrailersTooLarge),
            b'\r' if line == 0 || value => State::TrailerLf {
                total: total + 1,
                empty: line == 0,
            },
            _ if line >= MAX_CHUNK_LINE => return Err(BodyError::LineTooLong),
            b':' if !value && line > 0 => State::Trailer {
                total: total + 1,
                line: line + 1,
                value: true,
            },
            _ if (value && field_vchar(b)) || (!value && tchar(b)) => State::Trailer {
                total: total + 1,
                line: line + 1,
                value,
            },
            _ => return Err(BodyError::BadChunk),
        },
        State::TrailerLf { total, empty } => match b {
            _ if total >= MAX_TRAILERS => return Err(BodyError::TrailersTooLarge),
            b'\n' if empty => State::Done,
            b'\n' => State::Trailer {
                total: total + 1,
                line: 0,
                value: false,
            },
            _ => return Err(BodyError::BadChunk),
        },
        // Handled by the caller; unreachable here but harmless.
        other => other,
    })
}

/// A token character (RFC 9110 §5.6.2).
fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// A byte of a field value (RFC 9110 §5.5: VCHAR, obs-text, SP, HTAB), as `httparse`
/// accepts in a head's field values.
fn field_vchar(b: u8) -> bool {
    b == b'\t' || (b >= b' ' && b != 0x7f)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}
