//! Hot path: decoding a chunked body into its payload (for HTTP/2 clients, which get
//! DATA frames, not HTTP/1.1 chunk framing).

use crate::body::BodyError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size {
        value: u64,
        digits: u8,
        in_ext: bool,
        cr: bool,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// In the trailer section: `total` bytes into it (capped at [`crate::MAX_TRAILERS`]),
    /// `line_len` into the current line.
    Trailer {
        total: usize,
        line_len: usize,
        cr: bool,
    },
    Done,
}

/// Incremental chunked decoder: feed it bytes as they arrive; payload bytes are appended
/// to `out`, trailers are skipped (the section capped at [`crate::MAX_TRAILERS`]).
#[derive(Debug, Clone)]
pub struct Dechunker {
    state: State,
}

impl Default for Dechunker {
    fn default() -> Self {
        Dechunker {
            state: State::Size {
                value: 0,
                digits: 0,
                in_ext: false,
                cr: false,
            },
        }
    }
}

impl Dechunker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes bytes of `input` (all of them unless the body ends first); returns how
    /// many were consumed.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, BodyError> {
        let mut i = 0;
        while i < input.len() {
            match &mut self.state {
                State::Done => break,
                State::Size {
                    value,
                    digits,
                    in_ext,
                    cr,
                } => {
                    let b = input[i];
                    i += 1;
                    if *cr {
                        if b != b'\n' || *digits == 0 {
                            return Err(BodyError::BadChunk);
                        }
                        self.state = if *value == 0 {
                            State::Trailer {
                                total: 0,
                                line_len: 0,
                                cr: false,
                            }
                        } else {
                            State::Data(*value)
                        };
                    } else if b == b'\r' {
                        *cr = true;
                    } else if *in_ext {
                        // chunk extensions are ignored
                    } else if let Some(d) = (b as char).to_digit(16) {
                        *value = value.checked_mul(16).ok_or(BodyError::ChunkTooLarge)? + d as u64;
                        // Leading zeros are allowed without bound (the head's length is what
                        // limits them): count up to "some", never wrap.
                        *digits = digits.saturating_add(1);
                        if *value > crate::MAX_CHUNK_SIZE {
                            return Err(BodyError::ChunkTooLarge);
                        }
                    } else if b == b';' || b == b' ' || b == b'\t' {
                        *in_ext = true;
                    } else {
                        return Err(BodyError::BadChunk);
                    }
                }
                State::Data(left) => {
                    let n = (*left).min((input.len() - i) as u64) as usize;
                    out.extend_from_slice(&input[i..i + n]);
                    i += n;
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = State::DataCr;
                    }
                }
                State::DataCr => {
                    if input[i] != b'\r' {
                        return Err(BodyError::BadChunk);
                    }
                    i += 1;
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if input[i] != b'\n' {
                        return Err(BodyError::BadChunk);
                    }
                    i += 1;
                    self.state = State::Size {
                        value: 0,
                        digits: 0,
                        in_ext: false,
                        cr: false,
                    };
                }
                State::Trailer {
                    total,
                    line_len,
                    cr,
                } => {
                    // The whole section (lines, their CRLFs, the final CRLF) is capped as
                    // `BodyReader` caps it.
                    if *total >= crate::MAX_TRAILERS {
                        return Err(BodyError::TrailersTooLarge);
                    }
                    *total += 1;
                    let b = input[i];
                    i += 1;
                    if *cr {
                        if b != b'\n' {
                            return Err(BodyError::BadChunk);
                        }
                        if *line_len == 0 {
                            self.state = State::Done;
                        } else {
                            *line_len = 0;
                            *cr = false;
                        }
                    } else if b == b'\r' {
                        *cr = true;
                    } else {
                        *line_len += 1;
                        if *line_len > crate::MAX_CHUNK_LINE {
                            return Err(BodyError::LineTooLong);
                        }
                    }
                }
            }
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_split(input: &[u8], step: usize) -> Result<(Vec<u8>, usize, bool), BodyError> {
        let mut d = Dechunker::new();
        let mut out = Vec::new();
        let mut used = 0;
        while used < input.len() && !d.is_done() {
            let end = (used + step).min(input.len());
            used += d.feed(&input[used..end], &mut out)?;
        }
        Ok((out, used, d.is_done()))
    }

    #[test]
    fn decodes_at_every_split() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for step in 1..body.len() {
            let (out, used, done) = decode_split(body, step).unwrap();
            assert_eq!(out, b"hello, world", "step {step}");
            assert!(done);
            assert_eq!(&body[used..], b"NEXT");
        }
    }

    #[test]
    fn any_number_of_leading_zeros() {
        for zeros in [255, 256, 300, 1000] {
            let mut body = vec![b'0'; zeros];
            body.extend_from_slice(b"5\r\nhello\r\n");
            body.extend(std::iter::repeat_n(b'0', zeros));
            body.extend_from_slice(b"\r\n\r\n");
            let (out, used, done) = decode_split(&body, 7).unwrap();
            assert_eq!(
                (out.as_slice(), used, done),
                (&b"hello"[..], body.len(), true)
            );
        }
    }

    #[test]
    fn rejects_bad_framing() {
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXX",
            b"\r\n",
            b"5\rX",
            b"fffffffffffffffff\r\n",
        ] {
            assert!(
                decode_split(bad, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = [b"0\r\n".as_slice(), &[b'a'; 5000]].concat();
        assert_eq!(decode_split(&long, 64).unwrap_err(), BodyError::LineTooLong);
    }

    /// A trailer section of `n` 100-byte lines, a last line with a `last`-byte value, and
    /// the final CRLF.
    fn section(n: usize, last: usize) -> Vec<u8> {
        let mut s = Vec::new();
        for i in 0..n {
            let line = format!("X-T{i:05}: ");
            s.extend_from_slice(line.as_bytes());
            s.extend(std::iter::repeat_n(b'v', 100 - line.len() - 2));
            s.extend_from_slice(b"\r\n");
        }
        s.extend_from_slice(b"X-Last: ");
        s.extend(std::iter::repeat_n(b'v', last));
        s.extend_from_slice(b"\r\n\r\n");
        s
    }

    #[test]
    fn trailer_section_capped() {
        let max = crate::MAX_TRAILERS;
        let n = max / 100 - 1;
        let last = max - n * 100 - "X-Last: \r\n\r\n".len();
        let at_cap = section(n, last);
        assert_eq!(at_cap.len(), max);
        let over = section(n, last + 1);
        for step in [1, 7, 4096, max + 10] {
            let input = [&b"3\r\nabc\r\n0\r\n"[..], &at_cap, b"NEXT"].concat();
            let (out, used, done) = decode_split(&input, step).unwrap();
            assert_eq!((out.as_slice(), done), (&b"abc"[..], true), "step {step}");
            assert_eq!(&input[used..], b"NEXT", "step {step}");
            let input = [&b"0\r\n"[..], &over].concat();
            assert_eq!(
                decode_split(&input, step).unwrap_err(),
                BodyError::TrailersTooLarge,
                "step {step}"
            );
        }
    }
}
