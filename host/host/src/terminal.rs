//! A job's output cut into lines for its log.
//!
//! Attached clients get a job's output as the job wrote it (a prompt without a newline must
//! show at once, and `flynn run ... > file` must get the bytes unchanged). The log aggregator
//! takes lines: a TTY job's terminal output is cut at each `\n`, without the `\r` the
//! terminal puts before it (`ONLCR`); a pipe's output comes from the runtime as lines and
//! pieces of lines (`ProcEvent::Output`'s `newline`), whose pieces are put together here. A
//! last line without a newline goes when the job ends, or where the runtime dropped output
//! (its newline may have been in the gap) ([`LogLines::finish`]). Used by the job's
//! supervisor in `host/supervise.rs`.
//!
//! The events holding a partial line are held back (not marked dealt with, so the shim keeps
//! them for a daemon that replaces this one): [`LogLines::release`] says which may go, those
//! whose bytes all lie before the partial line of their stream. At most [`MAX_PARTIAL`]
//! bytes a stream (plus the event reaching back before the partial line, up to the shim's
//! 64 KiB read) are held that way, far below the shim's 4 MiB buffer, which stops the job
//! once full: output without newlines (a progress bar redrawn with `\r`) never holds the job
//! up. The shim cuts its terminal events after the last newline of a read, and its pipe
//! events at every newline, so a partial line starts at an event: a new daemon is sent the
//! held events again and rebuilds the partial line from them, without logging a line twice
//! (except a piece of a partial line longer than [`MAX_PARTIAL`], already logged, that shares
//! an event with the part still held).

use std::collections::VecDeque;

use crate::logship::Stream;

/// The longest partial line held back waiting for its newline; a longer one goes out in
/// pieces of this size (the shipper splits them further, see `logship::MAX_LINE`).
pub const MAX_PARTIAL: usize = 64 * 1024;

/// Puts a job's output together into lines, and tells which events may be marked dealt
/// with.
#[derive(Debug, Default)]
pub struct LogLines {
    /// The line each stream is in the middle of (stdout, a terminal's output among it;
    /// stderr).
    partial: [Vec<u8>; 2],
    /// Bytes fed so far per stream (a pipe line's newline counting as one).
    fed: [u64; 2],
    /// The stream the event fed last wrote to (until it is released).
    last: Option<usize>,
    /// Where each event not yet released ends in its stream's bytes, oldest first (`None`:
    /// an event without output).
    held: VecDeque<Option<(usize, u64)>>,
    /// Stdout is a terminal's (its lines end in `\r\n`).
    tty: bool,
}

fn idx(s: Stream) -> usize {
    match s {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

const STREAMS: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

impl LogLines {
    /// Takes a TTY job's terminal output (as read) and calls `line` with every line it
    /// completes, without its `\r\n` (or `\n`), as stdout.
    pub fn terminal(&mut self, data: &[u8], mut line: impl FnMut(Stream, &[u8])) {
        let partial = &mut self.partial[0];
        self.fed[0] += data.len() as u64;
        self.last = Some(0);
        self.tty = true;
        let mut rest = data;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = rest.split_at(nl);
            if partial.is_empty() {
                line(Stream::Stdout, strip_cr(head));
            } else {
                partial.extend_from_slice(head);
                line(Stream::Stdout, strip_cr(partial));
                partial.clear();
            }
            rest = &tail[1..];
        }
        partial.extend_from_slice(rest);
        cut(partial, |p| line(Stream::Stdout, p));
    }

    /// Takes a pipe's output event: bytes of a line, and whether the job wrote a newline
    /// after them; calls `line` with the line once it is complete (as written, `\r` and all).
    pub fn output(
        &mut self,
        stream: Stream,
        data: &[u8],
        newline: bool,
        mut line: impl FnMut(Stream, &[u8]),
    ) {
        let i = idx(stream);
        let partial = &mut self.partial[i];
        self.fed[i] += data.len() as u64 + u64::from(newline);
        self.last = Some(i);
        if newline && partial.is_empty() {
            line(stream, data);
            return;
        }
        partial.extend_from_slice(data);
        if newline {
            line(stream, partial);
            partial.clear();
        } else {
            cut(partial, |p| line(stream, p));
        }
    }

    /// Whether a line is incomplete (waiting for its newline).
    #[cfg(test)]
    pub fn pending(&self) -> bool {
        self.partial.iter().any(|p| !p.is_empty())
    }

    /// One more event dealt with (its output, if any, fed before): how many events, oldest
    /// first, may now be marked dealt with. Those holding no byte of a partial line; all of
    /// them once the lines are complete (or [`LogLines::finish`]ed).
    pub fn release(&mut self) -> usize {
        let ev = self.last.take().map(|i| (i, self.fed[i]));
        self.held.push_back(ev);
        let mut n = 0;
        while let Some(&front) = self.held.front() {
            let free =
                front.is_none_or(|(i, end)| end <= self.fed[i] - self.partial[i].len() as u64);
            if !free {
                break;
            }
            self.held.pop_front();
            n += 1;
        }
        n
    }

    /// The job ended, or the runtime dropped output: the partial lines, if any, go as lines.
    pub fn finish(&mut self, mut line: impl FnMut(Stream, &[u8])) {
        for s in STREAMS {
            let partial = &mut self.partial[idx(s)];
            if !partial.is_empty() {
                let l = if s == Stream::Stdout && self.tty {
                    strip_cr(partial)
                } else {
                    &partial[..]
                };
                line(s, l);
                partial.clear();
            }
        }
    }
}

/// Sends the front of a partial line longer than [`MAX_PARTIAL`] as lines of that size.
fn cut(partial: &mut Vec<u8>, mut line: impl FnMut(&[u8])) {
    while partial.len() > MAX_PARTIAL {
        let piece: Vec<u8> = partial.drain(..MAX_PARTIAL).collect();
        line(&piece);
    }
}

fn strip_cr(l: &[u8]) -> &[u8] {
    l.strip_suffix(b"\r").unwrap_or(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> Vec<String> {
        let mut t = LogLines::default();
        let mut got = Vec::new();
        for c in chunks {
            t.terminal(c, |_, l| got.push(String::from_utf8_lossy(l).into_owned()));
        }
        t.finish(|_, l| got.push(String::from_utf8_lossy(l).into_owned()));
        assert!(!t.pending());
        got
    }

    #[test]
    fn lines_are_cut_at_newlines_whatever_the_chunks() {
        for (chunks, want) in [
            (vec![&b"a\r\nb\r\n"[..]], vec!["a", "b"]),
            // A prompt, then the echoed input and the answer.
            (
                vec![&b"ready> "[..], b"abc\r\n", b"got:abc\r\n"],
                vec!["ready> abc", "got:abc"],
            ),
            // `\r\n` split between reads; a bare `\n` (raw mode) too.
            (vec![&b"x\r"[..], b"\ny\n"], vec!["x", "y"]),
            // A last line without a newline goes at the end.
            (vec![&b"done\r\ntail"[..]], vec!["done", "tail"]),
            (vec![&b"\r\n\r\n"[..]], vec!["", ""]),
            (vec![&b""[..]], vec![]),
            // Only the `\r` before the newline goes (a progress bar keeps its own).
            (vec![&b"10%\r20%\r\n"[..]], vec!["10%\r20%"]),
        ] {
            assert_eq!(run(&chunks), want, "{chunks:?}");
        }
    }

    #[test]
    fn pending_while_a_line_waits_for_its_newline() {
        let mut t = LogLines::default();
        let mut n = 0;
        t.terminal(b"ready> ", |_, _| n += 1);
        assert!(t.pending());
        t.terminal(b"abc\r\n", |_, _| n += 1);
        assert!(!t.pending());
        assert_eq!(n, 1);
    }

    /// Events are released once none of their bytes is in the partial line: all of them at
    /// a newline, and past the partial line's cut, so no more than about [`MAX_PARTIAL`]
    /// bytes of events are ever held, whatever the job writes.
    #[test]
    fn events_are_held_only_for_the_partial_line() {
        let mut t = LogLines::default();
        let step = |t: &mut LogLines, data: &[u8]| {
            t.terminal(data, |_, _| {});
            t.release()
        };
        assert_eq!(step(&mut t, b"a\r\n"), 1);
        // A prompt: held, and so is an event without output after it (order is kept).
        assert_eq!(step(&mut t, b"ready> "), 0);
        assert_eq!(step(&mut t, b""), 0);
        assert_eq!(step(&mut t, b"abc\r\n"), 3);
        // A line that never ends: beyond a cut, the events wholly before it are released.
        let mut held = 0usize;
        let mut held_bytes = 0usize;
        let chunk = vec![b'\r'; 4095];
        for _ in 0..2048 {
            held += 1;
            held_bytes += chunk.len();
            let n = step(&mut t, &chunk);
            held -= n;
            held_bytes -= n * chunk.len();
            assert!(held_bytes <= MAX_PARTIAL + chunk.len(), "{held_bytes}");
        }
        assert!(held > 0 && t.pending());
        t.finish(|_, _| {});
        assert_eq!(t.release(), held + 1);
    }

    #[test]
    fn a_partial_line_is_bounded() {
        let big = vec![b'x'; MAX_PARTIAL * 2 + 3];
        let got = run(&[&big, b"\r\n"]);
        let lens: Vec<usize> = got.iter().map(String::len).collect();
        assert_eq!(lens, vec![MAX_PARTIAL, MAX_PARTIAL, 3]);
    }

    /// A pipe's output: pieces of a line are put together per stream (as written, `\r`
    /// kept), a line longer than [`MAX_PARTIAL`] is cut without an empty line after it, and
    /// an event holding a partial line of either stream holds back those after it.
    #[test]
    fn pipe_pieces_make_lines_per_stream() {
        let mut t = LogLines::default();
        let mut got: Vec<(Stream, String)> = Vec::new();
        let mut step = |t: &mut LogLines, s: Stream, data: &[u8], nl: bool| {
            t.output(s, data, nl, |s, l| {
                got.push((s, String::from_utf8_lossy(l).into_owned()))
            });
            t.release()
        };
        assert_eq!(step(&mut t, Stream::Stdout, b"one", true), 1);
        assert_eq!(step(&mut t, Stream::Stderr, b"Pass", false), 0);
        assert_eq!(step(&mut t, Stream::Stdout, b"two\r", true), 0);
        assert_eq!(step(&mut t, Stream::Stderr, b"word: ", false), 0);
        assert_eq!(step(&mut t, Stream::Stderr, b"", true), 4);
        assert_eq!(step(&mut t, Stream::Stdout, b"tail\r", false), 0);
        let mut rest = Vec::new();
        t.finish(|s, l| rest.push((s, String::from_utf8_lossy(l).into_owned())));
        assert_eq!(t.release(), 2);
        let want = [
            (Stream::Stdout, "one"),
            (Stream::Stdout, "two\r"),
            (Stream::Stderr, "Password: "),
        ];
        let want: Vec<(Stream, String)> = want.iter().map(|(s, l)| (*s, l.to_string())).collect();
        assert_eq!(got, want);
        assert_eq!(rest, vec![(Stream::Stdout, "tail\r".to_string())]);

        for (pieces, lens) in [
            (
                vec![MAX_PARTIAL, MAX_PARTIAL],
                vec![MAX_PARTIAL, MAX_PARTIAL],
            ),
            (
                vec![MAX_PARTIAL, 70_000 - MAX_PARTIAL],
                vec![MAX_PARTIAL, 70_000 - MAX_PARTIAL],
            ),
            (
                vec![10, MAX_PARTIAL, MAX_PARTIAL, 5],
                vec![MAX_PARTIAL, MAX_PARTIAL, 15],
            ),
        ] {
            let mut t = LogLines::default();
            let mut got = Vec::new();
            for p in &pieces {
                t.output(Stream::Stdout, &vec![b'x'; *p], false, |_, l| {
                    got.push(l.len())
                });
            }
            t.output(Stream::Stdout, b"", true, |_, l| got.push(l.len()));
            assert!(!t.pending());
            assert_eq!(got, lens, "{pieces:?}");
        }
    }
}
