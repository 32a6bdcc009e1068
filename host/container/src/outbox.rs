//! The shim's bounded buffer of events the daemon has not acknowledged yet.
//!
//! Events get consecutive sequence numbers. Those sent on the current connection stay until
//! acknowledged, so a daemon that reconnects is sent them again. The buffer is bounded by bytes:
//! while a daemon is connected a full buffer stops the shim reading the job's pipes (the job
//! blocks on write); while none is, lines that do not fit are dropped and counted, and the count
//! is reported as a `Dropped` event when a daemon connects or the job ends.

use std::collections::VecDeque;

use crate::wire::{self, ShimEvent, Stream};

/// Default bound of the buffer in bytes.
pub const DEFAULT_CAPACITY: usize = 4 << 20;

#[derive(Debug)]
pub struct Outbox {
    events: VecDeque<ShimEvent>,
    /// Sequence number of `events[0]`.
    front_seq: u64,
    /// Next sequence number to write on the current connection.
    send_seq: u64,
    bytes: usize,
    capacity: usize,
    dropped: [u64; 2],
}

fn idx(s: Stream) -> usize {
    match s {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Outbox {
            events: VecDeque::new(),
            front_seq: 0,
            send_seq: 0,
            bytes: 0,
            capacity,
            dropped: [0; 2],
        }
    }

    /// Is there no room for more output?
    pub fn full(&self) -> bool {
        self.bytes >= self.capacity
    }

    fn next_seq(&self) -> u64 {
        self.front_seq + self.events.len() as u64
    }

    /// Queues an event that must not be lost (status events are never dropped).
    pub fn push(&mut self, ev: ShimEvent) {
        self.bytes += ev.weight();
        self.events.push_back(ev);
    }

    /// Queues an output line, or a piece of one (`!newline`, see [`ShimEvent::Output`]). When
    /// the buffer is full and `may_drop` (no daemon connected) it is counted as a dropped line
    /// instead; a connected daemon gets back-pressure, not drops.
    pub fn push_output(&mut self, stream: Stream, line: Vec<u8>, newline: bool, may_drop: bool) {
        if may_drop && self.full() {
            self.dropped[idx(stream)] += 1;
        } else {
            self.push(ShimEvent::Output {
                stream,
                line,
                newline,
            });
        }
    }

    /// Queues a chunk of a TTY job's terminal output, as [`Outbox::push_output`] queues a
    /// line (a dropped chunk counts as a dropped stdout line).
    pub fn push_terminal(&mut self, data: Vec<u8>, may_drop: bool) {
        if may_drop && self.full() {
            self.dropped[idx(Stream::Stdout)] += 1;
        } else {
            self.push(ShimEvent::Terminal { data });
        }
    }

    /// Turns pending drop counts into `Dropped` events.
    pub fn flush_dropped(&mut self) {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let count = std::mem::take(&mut self.dropped[idx(stream)]);
            if count > 0 {
                self.push(ShimEvent::Dropped { stream, count });
            }
        }
    }

    /// A daemon connected: report drops, then send everything unacknowledged again. Returns the
    /// sequence number for the `HELLO` frame.
    pub fn reconnect(&mut self) -> u64 {
        self.flush_dropped();
        self.send_seq = self.front_seq;
        self.front_seq
    }

    /// The daemon has every event below `seq`.
    pub fn ack(&mut self, seq: u64) {
        let seq = seq.min(self.next_seq());
        while self.front_seq < seq {
            let ev = self.events.pop_front().expect("seq within the buffer");
            self.bytes -= ev.weight();
            self.front_seq += 1;
        }
        self.send_seq = self.send_seq.max(self.front_seq);
    }

    /// Encodes not-yet-sent events into `out` until it holds about `limit` bytes;
    /// `partial`: the connection reads pieces of lines as such ([`wire::encode_event`]).
    pub fn encode_unsent(&mut self, out: &mut Vec<u8>, limit: usize, partial: bool) {
        while out.len() < limit && self.send_seq < self.next_seq() {
            let ev = &self.events[(self.send_seq - self.front_seq) as usize];
            wire::encode_event(ev, out, partial);
            self.send_seq += 1;
        }
    }

    /// Has the daemon acknowledged everything including a final event?
    pub fn final_acked(&self, final_queued: bool) -> bool {
        final_queued && self.events.is_empty()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode, Frame};

    fn line(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    fn decode_all(mut bytes: Vec<u8>) -> Vec<ShimEvent> {
        let mut out = Vec::new();
        while let Some(f) = decode(&mut bytes).unwrap() {
            match f {
                Frame::Event(e) => out.push(e),
                f => panic!("unexpected {f:?}"),
            }
        }
        out
    }

    #[test]
    fn resends_unacked_after_reconnect() {
        let mut o = Outbox::new(1 << 20);
        assert_eq!(o.reconnect(), 0);
        o.push(ShimEvent::Started { pid: 1 });
        o.push_output(Stream::Stdout, line("a"), true, true);
        o.push_output(Stream::Stdout, line("b"), false, true);
        let mut buf = Vec::new();
        o.encode_unsent(&mut buf, 1 << 20, true);
        assert_eq!(decode_all(buf).len(), 3);
        o.ack(2); // the daemon saw Started and "a", then went away
        assert_eq!(o.reconnect(), 2);
        let mut buf = Vec::new();
        o.encode_unsent(&mut buf, 1 << 20, true);
        assert_eq!(
            decode_all(buf),
            vec![ShimEvent::Output {
                stream: Stream::Stdout,
                line: line("b"),
                newline: false,
            }]
        );
        o.ack(3);
        assert!(o.is_empty());
        assert_eq!(o.bytes, 0);
        // Acks beyond what exists are clamped.
        o.ack(100);
        assert_eq!(o.reconnect(), 3);
    }

    #[test]
    fn drops_are_counted_when_full() {
        let mut o = Outbox::new(64);
        for i in 0..10 {
            o.push_output(
                Stream::Stderr,
                format!("line {i} with some bytes").into_bytes(),
                true,
                true,
            );
        }
        assert!(o.full());
        let kept = o.events.len() as u64;
        assert!(kept < 10);
        o.reconnect();
        let mut buf = Vec::new();
        o.encode_unsent(&mut buf, usize::MAX, true);
        let evs = decode_all(buf);
        assert_eq!(
            evs.last().unwrap(),
            &ShimEvent::Dropped {
                stream: Stream::Stderr,
                count: 10 - kept
            }
        );
        // Drop counts are reported once.
        o.flush_dropped();
        assert_eq!(o.events.len() as u64, kept + 1);
    }

    #[test]
    fn final_event_is_kept_even_when_full() {
        let mut o = Outbox::new(10);
        o.push_output(Stream::Stdout, line("xxxxxxxxxxxxxxxxxxxx"), true, true);
        // With a daemon connected nothing is dropped, the buffer may run over.
        o.push_output(Stream::Stdout, line("yyyyyyyyyyyyyyyyyyyy"), true, false);
        assert_eq!(o.events.len(), 2);
        o.push(ShimEvent::Exited {
            code: Some(0),
            signal: None,
            oom_killed: false,
        });
        assert!(!o.final_acked(true));
        o.ack(3);
        assert!(o.final_acked(true));
    }
}
