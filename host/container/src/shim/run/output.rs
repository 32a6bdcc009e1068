//! The job's output: [`Lines`] cuts the bytes read from a pipe (or a terminal) into output
//! events.

use crate::outbox::Outbox;
use crate::wire::{self, Stream};

/// Cuts a pipe's bytes into output events ([`wire::split_output`]): lines, and the bytes
/// after the last newline as a piece of a line at once while a daemon that reads pieces
/// ([`wire::PARTIAL_OUTPUT`]) is connected (a prompt reaches an attached client before its
/// newline); while none is, those wait here for their newline (so output that does not fit in
/// the buffer is dropped and counted as whole lines, and a daemon of the protocol's first
/// version gets lines). A terminal's bytes (`raw`) go as they were read.
pub(super) struct Lines {
    pub(super) stream: Stream,
    pub(super) buf: Vec<u8>,
    pub(super) open: bool,
    pub(super) raw: bool,
}

impl Lines {
    /// `hold`: a partial line waits for its newline (no daemon that reads pieces is
    /// connected).
    pub(super) fn feed(&mut self, data: &[u8], out: &mut Outbox, may_drop: bool, hold: bool) {
        if self.raw {
            // Reads are at most MAX_LINE bytes: one event each, cut after its last newline
            // (so a partial line, which the daemon holds unacknowledged until its newline,
            // starts at an event: a daemon sent the held events again rebuilds it without
            // logging the complete lines before it twice).
            let cut = match data.iter().rposition(|&b| b == b'\n') {
                Some(nl) if nl + 1 < data.len() => nl + 1,
                _ => data.len(),
            };
            let (lines, partial) = data.split_at(cut);
            for chunk in [lines, partial] {
                if !chunk.is_empty() {
                    out.push_terminal(chunk.to_vec(), may_drop);
                }
            }
            return;
        }
        let stream = self.stream;
        let push = |piece: &[u8], newline| {
            out.push_output(stream, piece.to_vec(), newline, may_drop);
        };
        if self.buf.is_empty() {
            let used = wire::split_output(data, hold, push);
            self.buf.extend_from_slice(&data[used..]);
        } else {
            self.buf.extend_from_slice(data);
            let used = wire::split_output(&self.buf, hold, push);
            self.buf.drain(..used);
        }
    }

    /// Sends a partial line held back (at the pipe's end, or once a daemon that reads pieces
    /// is connected).
    pub(super) fn flush(&mut self, out: &mut Outbox, may_drop: bool) {
        if !self.buf.is_empty() {
            out.push_output(self.stream, std::mem::take(&mut self.buf), false, may_drop);
        }
    }
}
