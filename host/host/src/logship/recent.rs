//! The frames last written to an aggregator, written again first on its next connection.

use std::collections::VecDeque;
use std::time::Duration;

use super::{Frame, Stored};

/// The last frames written to an aggregator are kept and written again first on the
/// next connection: a write only reached the local socket, and an aggregator that went
/// away meanwhile (a restart, a lost host) never read the lines still in flight. The
/// aggregator ignores a message it already has (same timestamp and structured data, and
/// `seq` is in it), so what did arrive is not doubled.
pub(super) const RECENT_FRAMES: usize = 4096;
/// ...and at most this many bytes of them...
const RECENT_BYTES: usize = 4 << 20;
/// ...written at most this long ago: a connection that took writes for longer than this
/// was alive (a dead peer fails it within its keepalive and `TCP_USER_TIMEOUT`), so its
/// older frames arrived and are not sent again.
const RECENT_AGE: Duration = Duration::from_secs(45);

/// Frames written on the current connection (or the last one), oldest first.
#[derive(Default)]
pub(super) struct Recent {
    pub(super) frames: VecDeque<(tokio::time::Instant, Frame)>,
    bytes: usize,
    /// Where recent resends of due frames started, and when: they were sent after newer
    /// frames, so an aggregator's cursor can be past them while they were still in flight.
    /// Each is forgotten [`RECENT_AGE`] after it was sent.
    resent: VecDeque<(tokio::time::Instant, crate::logdisk::Pos)>,
}

impl Recent {
    pub(super) fn push(&mut self, f: Frame, now: tokio::time::Instant) {
        self.bytes += f.1.len();
        self.frames.push_back((now, f));
        while self.frames.len() > RECENT_FRAMES || self.bytes > RECENT_BYTES {
            self.pop();
        }
    }

    fn pop(&mut self) {
        if let Some((_, old)) = self.frames.pop_front() {
            self.bytes -= old.1.len();
        }
    }

    /// Forgets frames and resends older than [`RECENT_AGE`].
    pub(super) fn prune(&mut self, now: tokio::time::Instant) {
        while self
            .frames
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RECENT_AGE)
        {
            self.pop();
        }
        self.resent
            .retain(|(at, _)| now.duration_since(*at) <= RECENT_AGE);
    }

    /// Where the earliest resend of due frames still remembered started.
    pub(super) fn resent_from(&self) -> Option<crate::logdisk::Pos> {
        self.resent.iter().map(|(_, p)| *p).min()
    }

    /// The frames not older than [`RECENT_AGE`], as one buffer.
    pub(super) fn take_bytes(&mut self, now: tokio::time::Instant) -> Vec<u8> {
        self.prune(now);
        let mut buf = Vec::with_capacity(self.bytes);
        for (_, (_, f, _)) in &self.frames {
            buf.extend_from_slice(f);
        }
        buf
    }

    /// Remembers a resend of due frames from `from`, sent at `now`.
    pub(super) fn note_resent(&mut self, now: tokio::time::Instant, from: crate::logdisk::Pos) {
        self.prune(now);
        if self.resent.len() >= 1024 {
            self.resent.pop_front();
        }
        self.resent.push_back((now, from));
    }

    /// Drops what is older than [`RECENT_AGE`]; then the lowest disk position of the frames
    /// left (`Some(None)`: there are none), or `None` when a line among them is not on disk
    /// (its write failed). Drop notices are never on disk and do not count.
    pub(super) fn first_pos(
        &mut self,
        now: tokio::time::Instant,
    ) -> Option<Option<crate::logdisk::Pos>> {
        self.prune(now);
        let mut first = None;
        for (_, (_, _, stored)) in &self.frames {
            match stored {
                Stored::Disk(p) => {
                    first = Some(first.map_or(*p, |f: crate::logdisk::Pos| f.min(*p)))
                }
                Stored::Notice(_) => {}
                Stored::Nowhere => return None,
            }
        }
        Some(first)
    }
}
