//! A raw HTTP/2 client for the router's h2c listener: frames are written by hand (in one
//! write when a test needs them to arrive together) and every frame the router sends is
//! seen, with PINGs answered.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;

/// Error codes (RFC 9113 §7).
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame from the router.
#[derive(Debug, Clone)]
pub struct Frame {
    pub ty: u8,
    pub flags: u8,
    pub id: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY frame.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.ty {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// How [`H2c::read_frames`] ended.
#[derive(Debug, PartialEq)]
pub enum End {
    /// The callback said done.
    Done,
    /// The router closed the connection.
    Closed,
    /// The time given passed.
    TimedOut,
}

/// What a raw HTTP/2 client saw, with times from its connect.
#[derive(Debug, Default)]
pub struct Seen {
    /// (stream id, when) of each response HEADERS frame.
    pub responses: Vec<(u32, Duration)>,
    /// When the first GOAWAY arrived.
    pub goaway: Option<Duration>,
    /// When the router closed the connection (EOF).
    pub closed: Option<Duration>,
}

pub struct H2c {
    pub s: TcpStream,
    pub start: Instant,
    buf: Vec<u8>,
    /// The `:authority` the last request added to the HPACK dynamic table (index 62).
    indexed: Option<String>,
}

impl H2c {
    pub fn connect(addr: SocketAddr) -> H2c {
        Self::connect_with(addr, &[])
    }

    /// Connects and sends a SETTINGS frame with `settings` (identifier, value).
    pub fn connect_with(addr: SocketAddr, settings: &[(u16, u32)]) -> H2c {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        let mut payload = Vec::new();
        for (id, value) in settings {
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&value.to_be_bytes());
        }
        s.write_all(&frame(SETTINGS, 0, 0, &payload)).unwrap();
        H2c {
            s,
            start: Instant::now(),
            buf: Vec::new(),
            indexed: None,
        }
    }

    /// A GET of `/` for `host` on stream `id`.
    pub fn get(&mut self, id: u32, host: &str) {
        let f = self.get_frame(id, host);
        self.s.write_all(&f).unwrap();
    }

    /// The HEADERS frame (END_STREAM | END_HEADERS) of a GET of `/` for `host` on stream
    /// `id`, to send later (HPACK: indexed `:method GET`, `:scheme http`, `:path /`, and
    /// `:authority` literal with incremental indexing the first time, then indexed: 13
    /// bytes a request from then on).
    pub fn get_frame(&mut self, id: u32, host: &str) -> Vec<u8> {
        let mut block = vec![0x82, 0x86, 0x84];
        if self.indexed.as_deref() == Some(host) {
            block.push(0x80 | 62);
        } else {
            block.extend_from_slice(&[0x41, host.len() as u8]);
            block.extend_from_slice(host.as_bytes());
            self.indexed = Some(host.to_string());
        }
        frame(HEADERS, 0x5, id, &block)
    }

    /// The HEADERS frame (END_HEADERS, no END_STREAM: a body follows) of a POST to `/` for
    /// `host` on stream `id`, encoded as [`H2c::get_frame`]'s (`:method POST` indexed).
    pub fn post_frame(&mut self, id: u32, host: &str) -> Vec<u8> {
        let mut f = self.get_frame(id, host);
        // Frame header (9 bytes), then `:method GET` (0x82) becomes `:method POST` (0x83);
        // flags lose END_STREAM.
        f[9] = 0x83;
        f[4] = 0x4;
        f
    }

    /// Reads frames until `f` returns true for one, the router closes the connection or
    /// `limit` passes (from now), answering PINGs.
    pub fn read_frames(&mut self, limit: Duration, mut f: impl FnMut(&Frame) -> bool) -> End {
        let deadline = Instant::now() + limit;
        let mut chunk = [0u8; 16384];
        loop {
            while self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() < 9 + len {
                    break;
                }
                let fr = Frame {
                    ty: self.buf[3],
                    flags: self.buf[4],
                    id: u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]])
                        & 0x7fff_ffff,
                    payload: self.buf[9..9 + len].to_vec(),
                };
                self.buf.drain(..9 + len);
                if fr.ty == PING && fr.flags & 0x1 == 0 {
                    let _ = self.s.write_all(&frame(PING, 0x1, 0, &fr.payload));
                }
                if f(&fr) {
                    return End::Done;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return End::TimedOut;
            }
            self.s
                .set_read_timeout(Some(left.min(Duration::from_millis(100))))
                .unwrap();
            match self.s.read(&mut chunk) {
                Ok(0) => return End::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return End::Closed,
            }
        }
    }

    /// Reads frames until the router closes the connection or `limit` (from the connect)
    /// passes, answering PINGs (the router's GOAWAY sequence waits for one).
    pub fn run(&mut self, limit: Duration) -> Seen {
        let mut seen = Seen::default();
        let start = self.start;
        let left = limit.saturating_sub(start.elapsed());
        let end = self.read_frames(left, |fr| {
            match fr.ty {
                HEADERS => seen.responses.push((fr.id, start.elapsed())),
                GOAWAY if seen.goaway.is_none() => seen.goaway = Some(start.elapsed()),
                _ => {}
            }
            false
        });
        if end == End::Closed {
            seen.closed = Some(start.elapsed());
        }
        seen
    }
}

pub fn frame(ty: u8, flags: u8, id: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.push(ty);
    f.push(flags);
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A RST_STREAM frame for stream `id` with error `code`.
pub fn rst_stream(id: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, id, &code.to_be_bytes())
}
