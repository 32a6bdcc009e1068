//! The host's attach protocol, `flynn-attach/0` (spec §5.5): the request and a sans-IO frame
//! codec for both directions.
//!
//! `POST /attach` with a JSON [`AttachRequest`] and `Upgrade: flynn-attach/0`; after `101` the
//! connection carries frames. Server → client: [`Frame::Waiting`] (the job has not started
//! yet), then [`Frame::Success`] or [`Frame::Error`]; then [`Frame::Data`] for output (stream 1
//! stdout, 2 stderr, 3 init log; an empty payload is that stream's EOF) and at the end
//! [`Frame::Exit`] or a [`Frame::Error`]. Client → server: [`Frame::Data`] on stream 0 (stdin;
//! empty closes it), [`Frame::Signal`] and [`Frame::Resize`]. Integers are big-endian.

use serde::{Deserialize, Serialize};

/// The `Upgrade` token.
pub const PROTOCOL: &str = "flynn-attach/0";

/// [`AttachRequest::flags`] bits.
pub const STDOUT: u32 = 1;
pub const STDERR: u32 = 2;
pub const STDIN: u32 = 4;
pub const LOGS: u32 = 8;
pub const STREAM: u32 = 16;
pub const INIT_LOG: u32 = 32;
/// Every flag the protocol defines.
pub const ALL_FLAGS: u32 = STDOUT | STDERR | STDIN | LOGS | STREAM | INIT_LOG;

/// [`Frame::Data`] stream ids.
pub const STREAM_STDIN: u8 = 0;
pub const STREAM_STDOUT: u8 = 1;
pub const STREAM_STDERR: u8 = 2;
pub const STREAM_INIT_LOG: u8 = 3;

/// The largest payload a frame may carry (data or an error message); a longer one is a
/// protocol error, not a reason to buffer without bound.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// The body of `POST /attach`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    pub job_id: String,
    #[serde(default)]
    pub flags: u32,
    /// Terminal size (TTY jobs only).
    #[serde(default)]
    pub height: u16,
    #[serde(default)]
    pub width: u16,
}

/// One frame of the attach protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `0`: attached.
    Success,
    /// `1`: the job has not started yet; `Success` follows when it does.
    Waiting,
    /// `2`, `u32` length, message (decoded lossily when it is not UTF-8).
    Error(String),
    /// `3`, stream id, `u32` length, bytes.
    Data { stream: u8, data: Vec<u8> },
    /// `4`, `u32` signal number.
    Signal(u32),
    /// `5`, `u32` exit status.
    Exit(u32),
    /// `6`, `u16` height, `u16` width.
    Resize { height: u16, width: u16 },
}

const SUCCESS: u8 = 0;
const WAITING: u8 = 1;
const ERROR: u8 = 2;
/// The first byte of a [`Frame::Data`] (a receiver that refuses data can tell from it).
pub const DATA: u8 = 3;
const SIGNAL: u8 = 4;
const EXIT: u8 = 5;
const RESIZE: u8 = 6;

/// A byte sequence that is not a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    UnknownKind(u8),
    TooLong(usize),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::UnknownKind(k) => write!(f, "unknown attach frame type {k}"),
            DecodeError::TooLong(n) => {
                write!(f, "attach frame of {n} bytes (at most {MAX_PAYLOAD})")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

impl Frame {
    /// Appends the frame's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Success => out.push(SUCCESS),
            Frame::Waiting => out.push(WAITING),
            Frame::Error(msg) => {
                out.push(ERROR);
                out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                out.extend_from_slice(msg.as_bytes());
            }
            Frame::Data { stream, data } => {
                out.push(DATA);
                out.push(*stream);
                out.extend_from_slice(&(data.len() as u32).to_be_bytes());
                out.extend_from_slice(data);
            }
            Frame::Signal(sig) => {
                out.push(SIGNAL);
                out.extend_from_slice(&sig.to_be_bytes());
            }
            Frame::Exit(status) => {
                out.push(EXIT);
                out.extend_from_slice(&status.to_be_bytes());
            }
            Frame::Resize { height, width } => {
                out.push(RESIZE);
                out.extend_from_slice(&height.to_be_bytes());
                out.extend_from_slice(&width.to_be_bytes());
            }
        }
    }

    /// Decodes the frame at the front of `buf`: `Ok(None)` when more bytes are needed,
    /// otherwise the frame and how many bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, DecodeError> {
        let Some(&kind) = buf.first() else {
            return Ok(None);
        };
        let u32_at = |i: usize| -> Option<u32> {
            buf.get(i..i + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        // A length-prefixed payload starting at `at`.
        let payload = |at: usize| -> Result<Option<(&[u8], usize)>, DecodeError> {
            let Some(len) = u32_at(at) else {
                return Ok(None);
            };
            let len = len as usize;
            if len > MAX_PAYLOAD {
                return Err(DecodeError::TooLong(len));
            }
            Ok(buf.get(at + 4..at + 4 + len).map(|p| (p, at + 4 + len)))
        };
        Ok(match kind {
            SUCCESS => Some((Frame::Success, 1)),
            WAITING => Some((Frame::Waiting, 1)),
            ERROR => payload(1)?.map(|(p, n)| (Frame::Error(String::from_utf8_lossy(p).into()), n)),
            DATA => {
                let Some(&stream) = buf.get(1) else {
                    return Ok(None);
                };
                payload(2)?.map(|(p, n)| {
                    let data = p.to_vec();
                    (Frame::Data { stream, data }, n)
                })
            }
            SIGNAL => u32_at(1).map(|s| (Frame::Signal(s), 5)),
            EXIT => u32_at(1).map(|s| (Frame::Exit(s), 5)),
            RESIZE => buf.get(1..5).map(|b| {
                let height = u16::from_be_bytes([b[0], b[1]]);
                let width = u16::from_be_bytes([b[2], b[3]]);
                (Frame::Resize { height, width }, 5)
            }),
            k => return Err(DecodeError::UnknownKind(k)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Frame> {
        vec![
            Frame::Success,
            Frame::Waiting,
            Frame::Error("host: job is attached".into()),
            Frame::Data {
                stream: STREAM_STDOUT,
                data: b"hello\n".to_vec(),
            },
            Frame::Data {
                stream: STREAM_STDERR,
                data: vec![],
            },
            Frame::Signal(15),
            Frame::Exit(3),
            Frame::Resize {
                height: 20,
                width: 10,
            },
        ]
    }

    #[test]
    fn frames_have_the_spec_layout() {
        let mut out = Vec::new();
        Frame::Data {
            stream: 2,
            data: b"ab".to_vec(),
        }
        .encode(&mut out);
        assert_eq!(out, [3, 2, 0, 0, 0, 2, b'a', b'b']);
        out.clear();
        Frame::Exit(256 + 7).encode(&mut out);
        assert_eq!(out, [5, 0, 0, 1, 7]);
        out.clear();
        Frame::Resize {
            height: 20,
            width: 10,
        }
        .encode(&mut out);
        assert_eq!(out, [6, 0, 20, 0, 10]);
        out.clear();
        Frame::Error("no".into()).encode(&mut out);
        assert_eq!(out, [2, 0, 0, 0, 2, b'n', b'o']);
    }

    #[test]
    fn every_frame_decodes_back_and_needs_all_its_bytes() {
        let mut wire = Vec::new();
        for f in all() {
            f.encode(&mut wire);
        }
        let mut rest = &wire[..];
        let mut got = Vec::new();
        while !rest.is_empty() {
            let (f, n) = Frame::decode(rest).unwrap().expect("a whole frame");
            // Every proper prefix of a frame asks for more bytes.
            for cut in 0..n {
                assert_eq!(Frame::decode(&rest[..cut]), Ok(None), "{f:?} cut at {cut}");
            }
            got.push(f);
            rest = &rest[n..];
        }
        assert_eq!(got, all());
    }

    #[test]
    fn unknown_kinds_and_oversized_payloads_are_errors() {
        assert_eq!(Frame::decode(&[7]), Err(DecodeError::UnknownKind(7)));
        assert_eq!(Frame::decode(&[255, 0]), Err(DecodeError::UnknownKind(255)));
        let mut big = vec![3, 1];
        big.extend_from_slice(&((MAX_PAYLOAD + 1) as u32).to_be_bytes());
        assert_eq!(
            Frame::decode(&big),
            Err(DecodeError::TooLong(MAX_PAYLOAD + 1))
        );
        // Refused from the header alone: nothing of the payload needs to arrive.
        let mut err = vec![2];
        err.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(Frame::decode(&err), Err(DecodeError::TooLong(_))));
    }

    #[test]
    fn the_request_is_the_spec_json() {
        let r: AttachRequest =
            serde_json::from_str(r#"{"job_id":"j1","flags":19,"height":20,"width":10}"#).unwrap();
        assert_eq!(r.flags, STDOUT | STDERR | STREAM);
        assert_eq!((r.height, r.width), (20, 10));
        let r: AttachRequest = serde_json::from_str(r#"{"job_id":"j1"}"#).unwrap();
        assert_eq!(r.flags, 0);
        assert!(serde_json::from_str::<AttachRequest>(r#"{"job_id":"j","tty":true}"#).is_err());
    }
}
