//! The shim's control-socket protocol: events from the shim, acks and signals from the daemon.
//!
//! Every frame is `kind: u8, len: u32 BE, payload`. Shim → daemon: `HELLO` (u64 BE: sequence
//! number of the next event frame; u32 BE: the job's pid, 0 before it started), `EVENT` (JSON
//! of a non-output [`ShimEvent`]), `STDOUT` and `STDERR` (the raw bytes of an output line, the
//! job wrote a newline after them), `STDOUT_PART` and `STDERR_PART` (raw output bytes without a
//! newline after them: a piece of a line whose rest follows, see [`ShimEvent::Output`]; only
//! to a daemon that announced [`PARTIAL_OUTPUT`], below), `TERMINAL` (raw bytes a TTY job
//! wrote to its terminal, as read: no line structure). Each frame after `HELLO` carries the
//! next sequence number implicitly. Daemon → shim: `ACK` (u64 BE: every event below this
//! sequence number was received, the shim may forget it), `SIGNAL` (i32 BE), `CLOSE_STDIN`
//! (empty: the shim lets go of its end of the job's stdin FIFO, so the job reads end-of-file
//! once the daemon closed its own; a TTY job gets its terminal's end-of-file character, ^D)
//! and `RESIZE` (u16 BE rows, u16 BE columns: the window size of a TTY job's terminal;
//! ignored for other jobs). A reconnecting daemon is sent every event it has not acknowledged
//! again, so nothing is lost between connections.
//!
//! Features: a daemon that reads more than the first version's frames says so first thing on
//! each connection, with a `SIGNAL` frame carrying a negative number, the negated set of
//! feature bits ([`encode_features`], decoded as [`Frame::Features`]). Not a frame kind of
//! its own: a shim of the first version drops a connection that sends it an unknown kind,
//! and takes this one for a signal it cannot send (`kill` with a negative number fails,
//! nothing happens). A daemon of the first version never sends it, and is sent only the
//! first version's frames: a shim waits [`FEATURES_WAIT`] after a connection for the
//! announcement before it sends events, then sends output as whole lines (a piece of a line
//! as a line; it holds a partial line back for its newline) until the connection announces
//! [`PARTIAL_OUTPUT`]. (A daemon of the first version fails a connection, and the job, on
//! the kinds it does not know.)

use serde::{Deserialize, Serialize};

/// An output stream of the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// What the shim reports about its job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShimEvent {
    /// The job's process runs (pid in the host's pid namespace).
    Started { pid: u32 },
    /// Output bytes of the job, as it wrote them, without the newline that ends them
    /// (`newline`: there was one). Each event holds bytes of one line: all of it, or a piece
    /// (`!newline`) whose rest follows in the stream's next events: a line longer than
    /// [`MAX_LINE`], or bytes the job wrote without a newline (yet), sent as they are read
    /// while a daemon is connected (a prompt is not held back for its newline).
    Output {
        stream: Stream,
        line: Vec<u8>,
        newline: bool,
    },
    /// Bytes a TTY job wrote to its terminal, as read (up to [`MAX_LINE`] at a time): raw,
    /// not split into lines, so a prompt without a newline is not held back.
    Terminal { data: Vec<u8> },
    /// Lines (for a TTY job: `Terminal` chunks, counted as stdout) dropped while no daemon was
    /// connected and the buffer was full.
    Dropped { stream: Stream, count: u64 },
    /// The job ended. A memory-limit kill is `signal: Some(9), oom_killed: true`.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        oom_killed: bool,
    },
    /// The container could not be created or started; nothing was left behind.
    Failed { reason: String },
}

impl ShimEvent {
    /// `Exited` or `Failed`: nothing follows.
    pub fn is_final(&self) -> bool {
        matches!(self, ShimEvent::Exited { .. } | ShimEvent::Failed { .. })
    }

    /// Bytes this event holds in the shim's buffer (for its bound).
    pub fn weight(&self) -> usize {
        match self {
            ShimEvent::Output { line, .. } => line.len() + 16,
            ShimEvent::Terminal { data } => data.len() + 16,
            ShimEvent::Failed { reason } => reason.len() + 16,
            _ => 16,
        }
    }
}

/// Longest output line; longer lines are split.
pub const MAX_LINE: usize = 64 * 1024;
/// Largest frame payload either side accepts.
pub const MAX_FRAME: usize = MAX_LINE + 4096;

/// Cuts output bytes into [`ShimEvent::Output`] pieces: `piece(bytes, newline)` for each
/// line (without its newline) and, unless `hold_partial`, for the bytes after the last
/// newline; pieces are at most [`MAX_LINE`] bytes (a longer line goes in several, only the
/// last with `newline`). Returns how many bytes of `data` were taken: all of them, or those
/// before a held partial line of at most [`MAX_LINE`] bytes.
pub fn split_output(data: &[u8], hold_partial: bool, mut piece: impl FnMut(&[u8], bool)) -> usize {
    let mut start = 0;
    while let Some(nl) = data[start..].iter().position(|&b| b == b'\n') {
        let end = start + nl;
        let mut s = start;
        while end - s > MAX_LINE {
            piece(&data[s..s + MAX_LINE], false);
            s += MAX_LINE;
        }
        piece(&data[s..end], true);
        start = end + 1;
    }
    while data.len() - start > MAX_LINE {
        piece(&data[start..start + MAX_LINE], false);
        start += MAX_LINE;
    }
    if !hold_partial && start < data.len() {
        piece(&data[start..], false);
        start = data.len();
    }
    start
}

pub const HELLO: u8 = 0;
pub const EVENT: u8 = 1;
pub const STDOUT: u8 = 2;
pub const STDERR: u8 = 3;
pub const TERMINAL: u8 = 4;
pub const STDOUT_PART: u8 = 5;
pub const STDERR_PART: u8 = 6;
pub const ACK: u8 = 10;
pub const SIGNAL: u8 = 11;
pub const CLOSE_STDIN: u8 = 12;
pub const RESIZE: u8 = 13;

/// Feature bit: the daemon reads `STDOUT_PART` and `STDERR_PART` frames.
pub const PARTIAL_OUTPUT: u32 = 1;
/// How long a shim waits for a new connection's feature announcement before it sends
/// events to it (a daemon that has features sends them right after connecting).
pub const FEATURES_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

pub const HEADER: usize = 5;

fn header(out: &mut Vec<u8>, kind: u8, len: usize) {
    out.push(kind);
    out.extend_from_slice(&(len as u32).to_be_bytes());
}

/// Appends the frame of `ev` to `out`. `partial`: the daemon reads [`PARTIAL_OUTPUT`]
/// frames; without it a piece of a line goes as a line (what the first version of the
/// protocol has).
pub fn encode_event(ev: &ShimEvent, out: &mut Vec<u8>, partial: bool) {
    match ev {
        ShimEvent::Output {
            stream,
            line,
            newline,
        } => {
            let kind = match (stream, *newline || !partial) {
                (Stream::Stdout, true) => STDOUT,
                (Stream::Stderr, true) => STDERR,
                (Stream::Stdout, false) => STDOUT_PART,
                (Stream::Stderr, false) => STDERR_PART,
            };
            header(out, kind, line.len());
            out.extend_from_slice(line);
        }
        ShimEvent::Terminal { data } => {
            header(out, TERMINAL, data.len());
            out.extend_from_slice(data);
        }
        other => {
            let json = serde_json::to_vec(other).expect("events serialize");
            header(out, EVENT, json.len());
            out.extend_from_slice(&json);
        }
    }
}

/// Appends a `HELLO` frame.
pub fn encode_hello(seq: u64, pid: u32, out: &mut Vec<u8>) {
    header(out, HELLO, 12);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
}

/// Appends a frame with a u64 payload (`ACK`).
pub fn encode_u64(kind: u8, v: u64, out: &mut Vec<u8>) {
    header(out, kind, 8);
    out.extend_from_slice(&v.to_be_bytes());
}

/// Appends a `SIGNAL` frame.
pub fn encode_signal(sig: i32, out: &mut Vec<u8>) {
    header(out, SIGNAL, 4);
    out.extend_from_slice(&sig.to_be_bytes());
}

/// Appends the daemon's feature announcement: a `SIGNAL` frame with the negated bits
/// (see the module doc). `features` must be 1 to `i32::MAX`.
pub fn encode_features(features: u32, out: &mut Vec<u8>) {
    let bits = i32::try_from(features).unwrap_or(i32::MAX).max(1);
    encode_signal(-bits, out);
}

/// Appends a `CLOSE_STDIN` frame.
pub fn encode_close_stdin(out: &mut Vec<u8>) {
    header(out, CLOSE_STDIN, 0);
}

/// Appends a `RESIZE` frame.
pub fn encode_resize(rows: u16, cols: u16, out: &mut Vec<u8>) {
    header(out, RESIZE, 4);
    out.extend_from_slice(&rows.to_be_bytes());
    out.extend_from_slice(&cols.to_be_bytes());
}

/// A decoded frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Hello {
        seq: u64,
        pid: u32,
    },
    Event(ShimEvent),
    Ack(u64),
    /// A signal for the job (a positive number).
    Signal(i32),
    /// The daemon's features (`SIGNAL` with a negative number, see the module doc).
    Features(u32),
    CloseStdin,
    Resize {
        rows: u16,
        cols: u16,
    },
}

/// Takes one complete frame off the front of `buf`; `Ok(None)` when more bytes are needed.
pub fn decode(buf: &mut Vec<u8>) -> Result<Option<Frame>, String> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    let kind = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_FRAME {
        return Err(format!("frame of {len} bytes is too large"));
    }
    if buf.len() < HEADER + len {
        return Ok(None);
    }
    let payload = &buf[HEADER..HEADER + len];
    let fixed = |n: usize| -> Result<&[u8], String> {
        if payload.len() == n {
            Ok(payload)
        } else {
            Err(format!("frame kind {kind} must carry {n} bytes, not {len}"))
        }
    };
    let frame = match kind {
        HELLO => {
            let p = fixed(12)?;
            Frame::Hello {
                seq: u64::from_be_bytes(p[..8].try_into().unwrap()),
                pid: u32::from_be_bytes(p[8..].try_into().unwrap()),
            }
        }
        ACK => Frame::Ack(u64::from_be_bytes(fixed(8)?.try_into().unwrap())),
        SIGNAL => match i32::from_be_bytes(fixed(4)?.try_into().unwrap()) {
            n if n < 0 => Frame::Features(n.unsigned_abs()),
            n => Frame::Signal(n),
        },
        CLOSE_STDIN => {
            fixed(0)?;
            Frame::CloseStdin
        }
        RESIZE => {
            let p = fixed(4)?;
            Frame::Resize {
                rows: u16::from_be_bytes([p[0], p[1]]),
                cols: u16::from_be_bytes([p[2], p[3]]),
            }
        }
        TERMINAL => Frame::Event(ShimEvent::Terminal {
            data: payload.to_vec(),
        }),
        STDOUT | STDERR | STDOUT_PART | STDERR_PART => Frame::Event(ShimEvent::Output {
            stream: if kind == STDOUT || kind == STDOUT_PART {
                Stream::Stdout
            } else {
                Stream::Stderr
            },
            line: payload.to_vec(),
            newline: kind == STDOUT || kind == STDERR,
        }),
        EVENT => {
            let ev: ShimEvent =
                serde_json::from_slice(payload).map_err(|e| format!("bad event: {e}"))?;
            if matches!(ev, ShimEvent::Output { .. } | ShimEvent::Terminal { .. }) {
                return Err("output sent as a JSON event".into());
            }
            Frame::Event(ev)
        }
        k => return Err(format!("unknown frame kind {k}")),
    };
    buf.drain(..HEADER + len);
    Ok(Some(frame))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_in_pieces() {
        let events = vec![
            ShimEvent::Started { pid: 42 },
            ShimEvent::Output {
                stream: Stream::Stdout,
                line: b"hello".to_vec(),
                newline: true,
            },
            ShimEvent::Output {
                stream: Stream::Stderr,
                line: vec![0xff, 0, b'\n'],
                newline: true,
            },
            ShimEvent::Output {
                stream: Stream::Stdout,
                line: b"Password: ".to_vec(),
                newline: false,
            },
            ShimEvent::Output {
                stream: Stream::Stderr,
                line: Vec::new(),
                newline: false,
            },
            ShimEvent::Terminal {
                data: b"ready> ".to_vec(),
            },
            ShimEvent::Terminal {
                data: b"a\r\nb".to_vec(),
            },
            ShimEvent::Dropped {
                stream: Stream::Stdout,
                count: 7,
            },
            ShimEvent::Exited {
                code: None,
                signal: Some(9),
                oom_killed: true,
            },
            ShimEvent::Failed {
                reason: "nope".into(),
            },
        ];
        let mut bytes = Vec::new();
        encode_hello(5, 77, &mut bytes);
        for e in &events {
            encode_event(e, &mut bytes, true);
        }
        encode_u64(ACK, 9, &mut bytes);
        encode_signal(15, &mut bytes);
        encode_features(PARTIAL_OUTPUT, &mut bytes);
        encode_close_stdin(&mut bytes);
        encode_resize(20, 10, &mut bytes);
        encode_resize(u16::MAX, 0, &mut bytes);
        // Feed one byte at a time: frames only come out once complete.
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for b in bytes {
            buf.push(b);
            while let Some(f) = decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert!(buf.is_empty());
        let mut want = vec![Frame::Hello { seq: 5, pid: 77 }];
        want.extend(events.into_iter().map(Frame::Event));
        want.push(Frame::Ack(9));
        want.push(Frame::Signal(15));
        want.push(Frame::Features(PARTIAL_OUTPUT));
        want.push(Frame::CloseStdin);
        want.push(Frame::Resize { rows: 20, cols: 10 });
        want.push(Frame::Resize {
            rows: u16::MAX,
            cols: 0,
        });
        assert_eq!(got, want);
    }

    /// For a daemon that did not announce [`PARTIAL_OUTPUT`] (one of the first version, which
    /// fails on kinds it does not know), output goes in the first version's frames only: a
    /// piece of a line as a line.
    #[test]
    fn without_the_feature_pieces_go_as_lines() {
        let events = [
            (Stream::Stdout, b"Password: ".to_vec(), false),
            (Stream::Stderr, b"half".to_vec(), false),
            (Stream::Stdout, b"line".to_vec(), true),
        ];
        for partial in [false, true] {
            let mut bytes = Vec::new();
            for (stream, line, newline) in &events {
                let ev = ShimEvent::Output {
                    stream: *stream,
                    line: line.clone(),
                    newline: *newline,
                };
                encode_event(&ev, &mut bytes, partial);
            }
            let mut kinds = Vec::new();
            let mut at = 0;
            while at < bytes.len() {
                kinds.push(bytes[at]);
                let len = u32::from_be_bytes(bytes[at + 1..at + 5].try_into().unwrap());
                at += HEADER + len as usize;
            }
            if partial {
                assert_eq!(kinds, [STDOUT_PART, STDERR_PART, STDOUT]);
            } else {
                assert_eq!(kinds, [STDOUT, STDERR, STDOUT]);
            }
        }
        // The announcement is a signal no shim can send: a negative number.
        let mut b = Vec::new();
        encode_features(PARTIAL_OUTPUT, &mut b);
        assert_eq!(b, [SIGNAL, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            decode(&mut b).unwrap(),
            Some(Frame::Features(PARTIAL_OUTPUT))
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..64);
            let mut buf: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            // Plausible headers more often than chance would give.
            if len >= HEADER && rng.bool() {
                buf[0] = [
                    HELLO,
                    EVENT,
                    STDOUT,
                    STDERR,
                    TERMINAL,
                    STDOUT_PART,
                    STDERR_PART,
                    ACK,
                    SIGNAL,
                    CLOSE_STDIN,
                    RESIZE,
                ][rng.usize(0..11)];
                let plen = rng.usize(0..len.saturating_sub(HEADER) + 2) as u32;
                buf[1..5].copy_from_slice(&plen.to_be_bytes());
            }
            let before = buf.len();
            while let Ok(Some(_)) = decode(&mut buf) {}
            assert!(buf.len() <= before);
        }
    }

    /// Output is cut at newlines (each line says it had one) and at [`MAX_LINE`]; the bytes
    /// after the last newline are a piece without one, or held back.
    #[test]
    fn output_is_split_into_lines_and_pieces() {
        let run = |data: &[u8], hold: bool| {
            let mut got = Vec::new();
            let used = split_output(data, hold, |p, nl| got.push((p.len(), nl)));
            (got, used)
        };
        assert_eq!(run(b"", false), (vec![], 0));
        assert_eq!(run(b"abc", false), (vec![(3, false)], 3));
        assert_eq!(run(b"abc", true), (vec![], 0));
        assert_eq!(
            run(b"a\n\nbc\nde", false),
            (vec![(1, true), (0, true), (2, true), (2, false)], 8)
        );
        assert_eq!(run(b"a\nde", true), (vec![(1, true)], 2));
        let mut long = vec![b'x'; MAX_LINE * 2 + 5];
        long.push(b'\n');
        long.extend_from_slice(&[b'y'; MAX_LINE + 1]);
        let want_lines = [(MAX_LINE, false), (MAX_LINE, false), (5, true)];
        let (got, used) = run(&long, false);
        assert_eq!(got[..3], want_lines[..]);
        assert_eq!(got[3..], [(MAX_LINE, false), (1, false)]);
        assert_eq!(used, long.len());
        // Held: no more than MAX_LINE bytes of a partial line.
        let (got, used) = run(&long, true);
        assert_eq!(got[..3], want_lines[..]);
        assert_eq!(got[3..], [(MAX_LINE, false)]);
        assert_eq!(long.len() - used, 1);
        // A line of exactly MAX_LINE is one piece.
        let mut exact = vec![b'z'; MAX_LINE];
        exact.push(b'\n');
        assert_eq!(run(&exact, false), (vec![(MAX_LINE, true)], MAX_LINE + 1));
    }

    #[test]
    fn bad_frames() {
        for bytes in [
            vec![99, 0, 0, 0, 0],
            vec![ACK, 0, 0, 0, 1, 0],
            vec![CLOSE_STDIN, 0, 0, 0, 1, 0],
            vec![EVENT, 0, 0, 0, 2, b'{', b'}'],
            vec![STDOUT, 0xff, 0xff, 0xff, 0xff],
            vec![RESIZE, 0, 0, 0, 2, 0, 20],
            vec![RESIZE, 0, 0, 0, 5, 0, 20, 0, 10, 0],
            // Terminal output is its own frame kind, never JSON.
            {
                let json = br#"{"Terminal":{"data":[104]}}"#;
                let mut f = vec![EVENT, 0, 0, 0, json.len() as u8];
                f.extend_from_slice(json);
                f
            },
        ] {
            let mut b = bytes.clone();
            assert!(decode(&mut b).is_err(), "{bytes:?}");
        }
    }
}
