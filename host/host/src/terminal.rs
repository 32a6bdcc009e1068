//! A TTY job's terminal output, cut into lines for its log.
//!
//! Attached clients get a terminal's output raw, as the job wrote it (a prompt without a
//! newline must show at once). The log aggregator takes lines, so the output shipped for a
//! TTY job is cut at each `\n`, without the `\r` the terminal puts before it (`ONLCR`); a
//! last line without a newline goes when the job ends, or where the shim dropped output
//! (its newline may have been in the gap) ([`TermLines::finish`]). Used by the job's
//! supervisor in `host.rs`.
//!
//! The events holding a partial line are held back (not marked dealt with, so the shim keeps
//! them for a daemon that replaces this one): [`TermLines::release`] says which may go, those
//! whose bytes all lie before the partial line. At most [`MAX_PARTIAL`] bytes (plus the
//! event reaching back before the partial line, up to the shim's 64 KiB read) are held that
//! way, far below the shim's 4 MiB buffer, which stops the job once full: output without
//! newlines (a progress bar redrawn with `\r`) never holds the job up. The shim cuts its
//! terminal events after the last newline of a read, so a partial line starts at an event:
//! a new daemon is sent the held events again and rebuilds the partial line from them,
//! without logging a line twice (except a piece of a partial line longer than
//! [`MAX_PARTIAL`], already logged, that shares an event with the part still held).

use std::collections::VecDeque;

/// The longest partial line held back waiting for its newline; a longer one goes out in
/// pieces of this size (the shipper splits them further, see `logship::MAX_LINE`).
pub const MAX_PARTIAL: usize = 64 * 1024;

/// Splits a terminal's raw output into lines, and tells which events may be marked dealt
/// with.
#[derive(Debug, Default)]
pub struct TermLines {
    partial: Vec<u8>,
    /// Bytes fed so far.
    fed: u64,
    /// Where each event not yet released ends in the bytes fed, oldest first (an event
    /// without output ends where the one before it does).
    held: VecDeque<u64>,
}

impl TermLines {
    /// Takes `data` (as read from the terminal) and calls `line` with every line it completes,
    /// without its `\r\n` (or `\n`).
    pub fn feed(&mut self, data: &[u8], mut line: impl FnMut(&[u8])) {
        self.fed += data.len() as u64;
        let mut rest = data;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = rest.split_at(nl);
            if self.partial.is_empty() {
                line(strip_cr(head));
            } else {
                self.partial.extend_from_slice(head);
                line(strip_cr(&self.partial));
                self.partial.clear();
            }
            rest = &tail[1..];
        }
        self.partial.extend_from_slice(rest);
        while self.partial.len() >= MAX_PARTIAL {
            let piece: Vec<u8> = self.partial.drain(..MAX_PARTIAL).collect();
            line(&piece);
        }
    }

    /// Whether a line is incomplete (waiting for its newline).
    #[cfg(test)]
    pub fn pending(&self) -> bool {
        !self.partial.is_empty()
    }

    /// One more event dealt with (its output, if any, fed before): how many events, oldest
    /// first, may now be marked dealt with. Those holding no byte of the partial line; all
    /// of them once the line is complete (or [`TermLines::finish`]ed).
    pub fn release(&mut self) -> usize {
        self.held.push_back(self.fed);
        let start = self.fed - self.partial.len() as u64;
        let mut n = 0;
        while self.held.front().is_some_and(|&end| end <= start) {
            self.held.pop_front();
            n += 1;
        }
        n
    }

    /// The job ended, or the shim dropped output: the partial line, if any, goes as a line.
    pub fn finish(&mut self, mut line: impl FnMut(&[u8])) {
        if !self.partial.is_empty() {
            line(strip_cr(&self.partial));
            self.partial.clear();
        }
    }
}

fn strip_cr(l: &[u8]) -> &[u8] {
    l.strip_suffix(b"\r").unwrap_or(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> Vec<String> {
        let mut t = TermLines::default();
        let mut got = Vec::new();
        for c in chunks {
            t.feed(c, |l| got.push(String::from_utf8_lossy(l).into_owned()));
        }
        t.finish(|l| got.push(String::from_utf8_lossy(l).into_owned()));
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
        let mut t = TermLines::default();
        let mut n = 0;
        t.feed(b"ready> ", |_| n += 1);
        assert!(t.pending());
        t.feed(b"abc\r\n", |_| n += 1);
        assert!(!t.pending());
        assert_eq!(n, 1);
    }

    /// Events are released once none of their bytes is in the partial line: all of them at
    /// a newline, and past the partial line's cut, so no more than about [`MAX_PARTIAL`]
    /// bytes of events are ever held, whatever the job writes.
    #[test]
    fn events_are_held_only_for_the_partial_line() {
        let mut t = TermLines::default();
        let step = |t: &mut TermLines, data: &[u8]| {
            t.feed(data, |_| {});
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
        t.finish(|_| {});
        assert_eq!(t.release(), held + 1);
    }

    #[test]
    fn a_partial_line_is_bounded() {
        let big = vec![b'x'; MAX_PARTIAL * 2 + 3];
        let got = run(&[&big, b"\r\n"]);
        let lens: Vec<usize> = got.iter().map(String::len).collect();
        assert_eq!(lens, vec![MAX_PARTIAL, MAX_PARTIAL, 3]);
    }
}
