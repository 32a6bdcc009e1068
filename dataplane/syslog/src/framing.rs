//! Hot path: RFC 6587 framing of a syslog TCP stream, auto-detected per frame.
//!
//! - Octet counting: `<len> SP <msg>`, `len` decimal, 1 to [`MAX_LEN_DIGITS`] digits, no
//!   leading zero, at most the configured maximum.
//! - Non-transparent framing: a frame starting with `<` runs to the next LF (a CR before
//!   the LF is dropped too).
//!
//! CR/LF bytes between frames are skipped (some senders end octet-counted frames with a
//! newline). Anything else where a frame should start is [`FrameError::Garbage`]. Errors
//! are final for the stream: the caller closes the connection. When the sender closes, a
//! last non-transparent frame without its LF is still a frame ([`Framer::finish`]).

use bytes::{Bytes, BytesMut};

/// Default largest frame accepted (spec §3.2).
pub const DEFAULT_MAX_FRAME: usize = 11_000;
/// Most digits an octet count may have.
pub const MAX_LEN_DIGITS: usize = 5;

/// Why a stream cannot be framed. Small and `Copy`: no formatting on the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The octet count or the LF-terminated line exceeds the maximum frame size.
    TooLong,
    /// The octet count has too many digits, a leading zero, or is not followed by SP.
    BadLength,
    /// An octet count of zero.
    ZeroLength,
    /// A byte that starts neither framing (not a digit, not `<`).
    Garbage,
}

impl FrameError {
    /// Stable label for metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            FrameError::TooLong => "too_long",
            FrameError::BadLength => "bad_length",
            FrameError::ZeroLength => "zero_length",
            FrameError::Garbage => "garbage",
        }
    }
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for FrameError {}

/// Where the next frame is in a buffer: `buf[start..end]` is the message and
/// `consumed` bytes (including prefix and trailer) can be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    pub start: usize,
    pub end: usize,
    pub consumed: usize,
}

/// The framing rules (just the limit: every decision is per frame), shared by connections.
#[derive(Debug, Clone, Copy)]
pub struct Framer {
    max_frame: usize,
}

/// One connection's progress through a partial non-transparent frame: how many of its bytes
/// are known to hold no LF. A frame that arrives a few bytes per read is then searched once
/// in all, not again from its start on every read (up to the limit each time).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    lf_free: usize,
}

impl Default for Framer {
    fn default() -> Self {
        Framer::new(DEFAULT_MAX_FRAME)
    }
}

impl Framer {
    /// A framer accepting frames of up to `max_frame` bytes (at most 99 999, which five
    /// digits can express).
    pub fn new(max_frame: usize) -> Self {
        Framer {
            max_frame: max_frame.clamp(1, 99_999),
        }
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Finds the next complete frame in `buf`. `Ok(None)` means more bytes are needed
    /// (or only inter-frame CR/LF were present; they are reported as consumed via
    /// [`Framer::skip_blank`]).
    pub fn locate(&self, buf: &[u8]) -> Result<Option<Located>, FrameError> {
        self.locate_from(buf, &mut Scan::default())
    }

    /// [`Framer::locate`], resuming the LF search where `scan` says the last call left it.
    /// `scan` counts from the first byte after any leading CR/LF, which
    /// [`Framer::next_frame_scan`] drops whenever it finds no frame.
    fn locate_from(&self, buf: &[u8], scan: &mut Scan) -> Result<Option<Located>, FrameError> {
        let skip = buf
            .iter()
            .take_while(|&&b| b == b'\n' || b == b'\r')
            .count();
        let rest = &buf[skip..];
        let Some(&first) = rest.first() else {
            return Ok(None);
        };
        match first {
            b'<' => {
                // Look for LF no further than the limit (+1 for a CR before it).
                let window = &rest[..rest.len().min(self.max_frame + 2)];
                let from = scan.lf_free.min(window.len());
                match memchr::memchr(b'\n', &window[from..]).map(|at| from + at) {
                    Some(lf) => {
                        *scan = Scan::default();
                        let end = if lf > 0 && rest[lf - 1] == b'\r' {
                            lf - 1
                        } else {
                            lf
                        };
                        if end > self.max_frame {
                            return Err(FrameError::TooLong);
                        }
                        Ok(Some(Located {
                            start: skip,
                            end: skip + end,
                            consumed: skip + lf + 1,
                        }))
                    }
                    None if rest.len() > self.max_frame + 1 => Err(FrameError::TooLong),
                    None => {
                        scan.lf_free = window.len();
                        Ok(None)
                    }
                }
            }
            b'0'..=b'9' => {
                *scan = Scan::default();
                let mut len = 0usize;
                let mut i = 0;
                loop {
                    let Some(&b) = rest.get(i) else {
                        return if i > MAX_LEN_DIGITS {
                            Err(FrameError::BadLength)
                        } else {
                            Ok(None)
                        };
                    };
                    match b {
                        b'0'..=b'9' => {
                            if i == MAX_LEN_DIGITS {
                                return Err(FrameError::BadLength);
                            }
                            len = len * 10 + usize::from(b - b'0');
                            i += 1;
                        }
                        b' ' => break,
                        _ => return Err(FrameError::BadLength),
                    }
                }
                if len == 0 {
                    return Err(FrameError::ZeroLength);
                }
                if rest[0] == b'0' {
                    return Err(FrameError::BadLength);
                }
                if len > self.max_frame {
                    return Err(FrameError::TooLong);
                }
                let start = i + 1;
                if rest.len() < start + len {
                    return Ok(None);
                }
                Ok(Some(Located {
                    start: skip + start,
                    end: skip + start + len,
                    consumed: skip + start + len,
                }))
            }
            _ => Err(FrameError::Garbage),
        }
    }

    /// Number of leading CR/LF bytes (safe to drop between frames).
    pub fn skip_blank(buf: &[u8]) -> usize {
        buf.iter()
            .take_while(|&&b| b == b'\n' || b == b'\r')
            .count()
    }

    /// Splits the next frame off `buf` without copying (the frame shares `buf`'s
    /// allocation). `Ok(None)`: need more bytes; blank bytes were dropped.
    pub fn next_frame(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        self.next_frame_scan(buf, &mut Scan::default())
    }

    /// [`Framer::next_frame`] for a connection that keeps its [`Scan`] between reads (the
    /// same `Scan` for every call on the same buffer, which only ever grows at its end or
    /// loses what these calls split off).
    pub fn next_frame_scan(
        &self,
        buf: &mut BytesMut,
        scan: &mut Scan,
    ) -> Result<Option<Bytes>, FrameError> {
        match self.locate_from(buf, scan)? {
            Some(loc) => {
                let mut taken = buf.split_to(loc.consumed);
                taken.truncate(loc.end);
                let _ = taken.split_to(loc.start);
                Ok(Some(taken.freeze()))
            }
            None => {
                let blank = Self::skip_blank(buf);
                let _ = buf.split_to(blank);
                Ok(None)
            }
        }
    }

    /// At the end of the stream, once [`Framer::next_frame`] has taken every complete
    /// frame: the bytes left as a last frame if they are a non-transparent frame whose LF
    /// never came (starting with `<`, at most the limit once a trailing CR is dropped), as
    /// rsyslog keeps it; `None` for anything else (an incomplete octet-counted frame cannot
    /// be told from a cut one). Empties `buf`.
    pub fn finish(&self, buf: &mut BytesMut) -> Option<Bytes> {
        let mut rest = buf.split();
        let _ = rest.split_to(Self::skip_blank(&rest));
        if rest.first() != Some(&b'<') || rest.contains(&b'\n') {
            return None;
        }
        if rest.last() == Some(&b'\r') {
            rest.truncate(rest.len() - 1);
        }
        (rest.len() <= self.max_frame).then(|| rest.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frames of `input` read as the given chunks, and the error that ended them; the
    /// same whether the connection keeps its [`Scan`] between reads or not.
    fn frames(f: &Framer, input: &[&[u8]]) -> (Vec<Vec<u8>>, Option<FrameError>) {
        let run = |keep: bool| {
            let (mut buf, mut scan) = (BytesMut::new(), Scan::default());
            let mut out = Vec::new();
            for chunk in input {
                buf.extend_from_slice(chunk);
                loop {
                    if !keep {
                        scan = Scan::default();
                    }
                    match f.next_frame_scan(&mut buf, &mut scan) {
                        Ok(Some(fr)) => out.push(fr.to_vec()),
                        Ok(None) => break,
                        Err(e) => return (out, Some(e)),
                    }
                }
            }
            (out, None)
        };
        let kept = run(true);
        assert_eq!(kept, run(false), "{input:?}");
        kept
    }

    /// An LF-framed message trickled in a byte per read is searched from where the last read
    /// left off, never again from its start; frames, CR/LF between them, an octet-counted
    /// frame after one and the limit come out as they do read whole.
    #[test]
    fn a_trickled_lf_frame_is_searched_once() {
        let f = Framer::new(2_000);
        let body = "x".repeat(1_990);
        let input = format!("\r\n<1>{body}\r\n\n5 hello<2>{body}\n<3>{body}xxxxxxxxx");
        let (mut buf, mut scan) = (BytesMut::new(), Scan::default());
        let mut out = Vec::new();
        let mut err = None;
        for b in input.as_bytes() {
            buf.extend_from_slice(&[*b]);
            match f.next_frame_scan(&mut buf, &mut scan) {
                Ok(Some(fr)) => out.push(fr.to_vec()),
                Ok(None) if buf.first() == Some(&b'<') => {
                    assert_eq!(scan.lf_free, buf.len(), "searched up to the end already")
                }
                Ok(None) => {}
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        let want: Vec<Vec<u8>> = vec![
            format!("<1>{body}").into(),
            b"hello".to_vec(),
            format!("<2>{body}").into(),
        ];
        assert_eq!(out, want);
        assert_eq!(err, Some(FrameError::TooLong));
        let whole: Vec<&[u8]> = vec![input.as_bytes()];
        assert_eq!(frames(&f, &whole), (want, err));
    }

    #[test]
    fn framing_table() {
        let f = Framer::default();
        let long = format!("11001 <{}", "x".repeat(11_000));
        let long_lf = format!("<{}\n", "x".repeat(11_001));
        let max_oc = format!("11000 {}", "y".repeat(11_000));
        type Case<'a> = (&'a str, Vec<&'a [u8]>, Vec<&'a [u8]>, Option<FrameError>);
        let cases: Vec<Case> = vec![
            (
                "octet counting",
                vec![b"5 hello3 abc"],
                vec![b"hello", b"abc"],
                None,
            ),
            (
                "lf framing",
                vec![b"<1>a\n<2>b\r\n"],
                vec![b"<1>a", b"<2>b"],
                None,
            ),
            (
                "mixed",
                vec![b"3 <1>\n<2>b\n4 <3>c"],
                vec![b"<1>", b"<2>b", b"<3>c"],
                None,
            ),
            (
                "blank lines between",
                vec![b"\n\r\n3 abc\n\n"],
                vec![b"abc"],
                None,
            ),
            (
                "split everywhere",
                vec![b"1", b"6 <1>1 - - - -", b" - ", b"x", b"<5>y", b"\n"],
                vec![b"<1>1 - - - - - x", b"<5>y"],
                None,
            ),
            ("truncated octet frame", vec![b"10 abc"], vec![], None),
            (
                "truncated lf frame",
                vec![b"<1>no newline yet"],
                vec![],
                None,
            ),
            ("length only", vec![b"123"], vec![], None),
            (
                "zero length",
                vec![b"0 x"],
                vec![],
                Some(FrameError::ZeroLength),
            ),
            (
                "leading zero",
                vec![b"05 hello"],
                vec![],
                Some(FrameError::BadLength),
            ),
            (
                "six digits",
                vec![b"123456 x"],
                vec![],
                Some(FrameError::BadLength),
            ),
            (
                "six digits pending",
                vec![b"123456"],
                vec![],
                Some(FrameError::BadLength),
            ),
            (
                "non-numeric length",
                vec![b"12a hello"],
                vec![],
                Some(FrameError::BadLength),
            ),
            (
                "leading space",
                vec![b" 5 hello"],
                vec![],
                Some(FrameError::Garbage),
            ),
            (
                "garbage",
                vec![b"GET / HTTP/1.1\r\n"],
                vec![],
                Some(FrameError::Garbage),
            ),
            (
                "oversized count",
                vec![long.as_bytes()],
                vec![],
                Some(FrameError::TooLong),
            ),
            (
                "oversized line",
                vec![long_lf.as_bytes()],
                vec![],
                Some(FrameError::TooLong),
            ),
            (
                "max size ok",
                vec![max_oc.as_bytes()],
                vec![&max_oc.as_bytes()[6..]],
                None,
            ),
            (
                "good then bad",
                vec![b"3 abc", b"x"],
                vec![b"abc"],
                Some(FrameError::Garbage),
            ),
        ];
        for (name, input, want, err) in cases {
            let (got, e) = frames(&f, &input);
            let want: Vec<Vec<u8>> = want.into_iter().map(|w| w.to_vec()).collect();
            assert_eq!(got, want, "{name}");
            assert_eq!(e, err, "{name}");
        }
    }

    #[test]
    fn oversized_lf_detected_without_newline() {
        let f = Framer::new(100);
        let mut buf = BytesMut::from(&[b'<'; 150][..]);
        assert_eq!(f.next_frame(&mut buf), Err(FrameError::TooLong));
        let mut ok = BytesMut::from(&b"<\r\n"[..]);
        assert_eq!(
            f.next_frame(&mut ok).unwrap().unwrap(),
            Bytes::from_static(b"<")
        );
    }

    #[test]
    fn configured_limit() {
        let f = Framer::new(10);
        assert_eq!(f.locate(b"11 x"), Err(FrameError::TooLong));
        assert!(f.locate(b"10 0123456789").unwrap().is_some());
    }

    #[test]
    fn last_lf_frame_without_its_lf_is_a_frame_at_the_end() {
        let f = Framer::new(10);
        let end = |input: &[u8]| {
            let mut buf = BytesMut::from(input);
            while let Ok(Some(_)) = f.next_frame(&mut buf) {}
            let last = f.finish(&mut buf).map(|b| b.to_vec());
            assert!(buf.is_empty());
            last
        };
        assert_eq!(end(b"<1>a\n<2>last"), Some(b"<2>last".to_vec()));
        assert_eq!(end(b"<1>a\n\r\n<2>cr\r"), Some(b"<2>cr".to_vec()));
        assert_eq!(end(b"<2>ten byte"), None, "over the limit");
        assert_eq!(end(b"<2>ten byt\r"), Some(b"<2>ten byt".to_vec()));
        assert_eq!(end(b"<1>a\n"), None, "nothing left");
        assert_eq!(end(b"<1>a\n\r\n"), None, "only blank bytes left");
        assert_eq!(end(b"9 <1>cut"), None, "incomplete octet-counted frame");
        assert_eq!(end(b"3 <1>"), None, "complete frames are not left");
    }

    #[test]
    fn frames_share_the_buffer() {
        let f = Framer::default();
        let mut buf = BytesMut::from(&b"5 hello"[..]);
        let base = buf.as_ptr() as usize;
        let fr = f.next_frame(&mut buf).unwrap().unwrap();
        assert_eq!(fr.as_ptr() as usize, base + 2);
    }
}
