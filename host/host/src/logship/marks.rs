//! What each aggregator's queue could not keep: lines due again from the disk log, or lost
//! and told of in a notice; and the due and unacked marks kept beside the disk log, so a
//! restarted daemon sends what may not have arrived.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::recent::Recent;
use super::{encode_with, now_rfc3339, Dest, Frame, Header, Stored, Stream};

/// Frames the queue dropped that the disk log has, not sent again yet. Their lines are
/// counted per app here, not in `lost_by_app`: a notice goes out for them only if the
/// disk can no longer give them back.
#[derive(Default)]
pub(super) struct Dropped {
    /// From the first one's position to the end of the last one. Every frame between was
    /// sent, dropped too, or is still queued (a quiet app's frame the queue kept while a
    /// chatty app's around it left, see [`Queue`]): that one goes out twice, and the
    /// aggregator ignores the copy.
    pub(super) range: Option<(crate::logdisk::Pos, crate::logdisk::Pos)>,
    pub(super) by_app: std::collections::BTreeMap<Arc<str>, u64>,
}

/// What is due; where due lines resent lately start (see [`Dest::save_due`]); and the due
/// mark as last saved.
#[derive(Default)]
pub(super) struct Due {
    pub(super) dropped: Dropped,
    pub(super) floor: Option<crate::logdisk::Pos>,
    saved: Option<crate::logdisk::Pos>,
}

pub(super) fn min_pos(
    a: Option<crate::logdisk::Pos>,
    b: Option<crate::logdisk::Pos>,
) -> Option<crate::logdisk::Pos> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `addr` as a file name (anything but ASCII letters, digits, `.` and `-` becomes `_`).
pub(super) fn mark_name(addr: &str) -> String {
    addr.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Dropped {
    fn add_range(&mut self, from: crate::logdisk::Pos, to: crate::logdisk::Pos) {
        self.range = Some(match self.range {
            Some((a, b)) => (a.min(from), b.max(to)),
            None => (from, to),
        });
    }

    /// Puts back what [`std::mem::take`] took (a resend that failed).
    fn merge(&mut self, other: Dropped) {
        if let Some((a, b)) = other.range {
            self.add_range(a, b);
        }
        for (app, n) in other.by_app {
            *self.by_app.entry(app).or_default() += n;
        }
    }
}

impl Dest {
    /// Frames the queue could not keep. Those the disk log has are due: sent from there
    /// once the queue is drained. The others' lines are lost and counted for their apps'
    /// notices; a lost notice puts its count back for the next one. Returns how many lines
    /// were lost.
    pub(super) fn lost(&self, frames: Vec<Frame>) -> u64 {
        let mut lost = 0;
        let mut requeued = 0;
        let mut due = None;
        // Counted here, then added under the lock once.
        let mut lost_by_app: std::collections::HashMap<Arc<str>, u64> = Default::default();
        let mut note = |app: Arc<str>, n: u64| *lost_by_app.entry(app).or_default() += n;
        for f in frames {
            match f.2 {
                Stored::Disk(p) => {
                    let end = crate::logdisk::Pos {
                        seg: p.seg,
                        offset: p.offset + f.1.len() as u64,
                    };
                    let d = due
                        .get_or_insert_with(|| self.due.lock().unwrap_or_else(|e| e.into_inner()));
                    d.dropped.add_range(p, end);
                    *d.dropped.by_app.entry(f.0).or_default() += 1;
                    requeued += 1;
                }
                Stored::Nowhere => {
                    note(f.0, 1);
                    lost += 1;
                }
                Stored::Notice(n) => note(f.0, n),
            }
        }
        if !lost_by_app.is_empty() {
            let mut by_app = self.lost_by_app.lock().unwrap_or_else(|e| e.into_inner());
            for (app, n) in lost_by_app {
                *by_app.entry(app).or_default() += n;
            }
        }
        if let Some(mut d) = due {
            self.save_due(&mut d);
            drop(d);
            self.resync.store(true, Ordering::Relaxed);
            let before = self.requeued.fetch_add(requeued, Ordering::Relaxed);
            let n = before + requeued;
            if before == 0 || before / 10_000 != n / 10_000 {
                tracing::info!(
                    requeued_total = n,
                    "log buffer full: the oldest lines will be sent again from the host's disk log"
                );
            }
        }
        lost
    }

    pub(super) fn due_mark(&self) -> String {
        format!("due-{}", self.mark)
    }

    pub(super) fn unacked_mark(&self) -> String {
        format!("unacked-{}", self.mark)
    }

    /// Keeps `due-<aggregator>.pos` beside the disk log at the lowest position that must be
    /// sent again even to an aggregator whose cursor is known: the start of the due range,
    /// and of due lines resent in the last 45 s (`floor`: sent after newer frames, so the
    /// cursor can be past them while they are still in flight). Removed when there is none.
    /// A daemon restarted before those lines arrived then still sends them. Handed to the
    /// disk log's writer (no file I/O here), only when it changes, under the `due` lock.
    /// Per-app counts are not kept: after a restart, due lines that already left the disk
    /// log get a warning, not a notice.
    fn save_due(&self, due: &mut Due) {
        let want = min_pos(due.dropped.range.map(|r| r.0), due.floor);
        if let Some(disk) = self.disk.as_ref().filter(|_| want != due.saved) {
            disk.set_mark(&self.due_mark(), want);
            due.saved = want;
        }
    }

    /// Takes up the due mark a previous daemon left (see [`Dest::save_due`]): due up to the
    /// log's end, sent on the first connection.
    pub(super) fn load_due(&self) {
        let Some(disk) = &self.disk else { return };
        let Some(mut from) = disk.load_mark(&self.due_mark()) else {
            return;
        };
        let end = disk.end();
        let mut d = self.due.lock().unwrap_or_else(|e| e.into_inner());
        d.saved = Some(from);
        if from < end {
            if !disk.holds(from) {
                tracing::warn!(
                    "some lines dropped from the log buffer before the restart had left the host's log"
                );
                from = disk.start();
            }
            tracing::info!(
                "lines dropped from the log buffer before the restart will be sent again"
            );
            d.dropped.add_range(from, end);
            self.resync.store(true, Ordering::Relaxed);
        }
        self.save_due(&mut d);
    }

    /// Where the previous daemon's unacknowledged frames began (see
    /// [`Dest::tick_marks`]), to be sent again on the first connection when the
    /// aggregator's cursor is not known. With no mark (a first start), or one past the
    /// log's end (its last writes were lost with the daemon: all it holds was sent),
    /// nothing: the mark is set to the log's end now, before any line is pushed.
    pub(super) fn load_unacked(&self) -> Option<crate::logdisk::Pos> {
        let disk = self.disk.as_ref()?;
        let end = disk.end();
        let from = disk.load_mark(&self.unacked_mark()).filter(|p| *p < end);
        let from = from.map(|p| {
            if disk.holds(p) {
                p
            } else {
                tracing::warn!("some lines not known to have reached the log aggregator before the restart had left the host's log");
                disk.start()
            }
        });
        let saved = from.unwrap_or(end);
        disk.set_mark(&self.unacked_mark(), Some(saved));
        *self.unacked.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        from
    }

    /// Brings both marks up to date (at most once a second while connected; rewritten only
    /// when they moved). `restart_from`: the previous daemon's unacknowledged start while it
    /// has not been sent yet.
    ///
    /// The due mark's floor (see [`Dest::save_due`]) becomes where due lines resent in the
    /// last 45 s start. `unacked-<aggregator>.pos` becomes where the frames that may not
    /// have reached the aggregator begin: the oldest frame written to it (or resent) in the
    /// last 45 s, the due range, `restart_from`, else the queue's first frame, else the
    /// log's end. A restarted daemon that cannot get the aggregator's cursor sends the log
    /// again from there: what was in flight, queued in memory or due when the previous one
    /// was killed. While disconnected the marks do not move: what is queued then lies
    /// after them.
    pub(super) fn tick_marks(
        &self,
        recent: &mut Recent,
        restart_from: Option<crate::logdisk::Pos>,
        now: tokio::time::Instant,
    ) {
        let Some(disk) = &self.disk else { return };
        let written = recent.first_pos(now);
        let resent = recent.resent_from();
        // A mark write that failed (a full disk) is sent again until one succeeds.
        let rewrite = disk.mark_failed();
        let due_from = {
            let mut d = self.due.lock().unwrap_or_else(|e| e.into_inner());
            d.floor = resent;
            if rewrite {
                // No real position: the next save writes whatever it is.
                d.saved = Some(crate::logdisk::Pos {
                    seg: u64::MAX,
                    offset: u64::MAX,
                });
            }
            self.save_due(&mut d);
            d.dropped.range.map(|r| r.0)
        };
        // A recent frame that is not on disk: its place is not known, keep the mark.
        let Some(written) = written else {
            return;
        };
        let queued = {
            let _order = self.order.lock().unwrap_or_else(|e| e.into_inner());
            let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.first_pos().unwrap_or_else(|| disk.end())
        };
        let from = [written, resent, due_from, restart_from, Some(queued)]
            .into_iter()
            .flatten()
            .min();
        let mut saved = self.unacked.lock().unwrap_or_else(|e| e.into_inner());
        if from != *saved || rewrite {
            disk.set_mark(&self.unacked_mark(), from);
            *saved = from;
        }
    }

    /// Puts back what a failed resend took.
    pub(super) fn due_again(&self, dropped: Dropped) {
        let mut d = self.due.lock().unwrap_or_else(|e| e.into_inner());
        d.dropped.merge(dropped);
        self.save_due(&mut d);
    }

    /// After a resend of due frames from `from`: they count as resent (the floor) until the
    /// next [`Dest::tick_marks`] takes that over from the recent resends; the mark follows.
    pub(super) fn settle_due(&self, from: Option<crate::logdisk::Pos>) {
        let mut d = self.due.lock().unwrap_or_else(|e| e.into_inner());
        d.floor = min_pos(d.floor, from);
        self.save_due(&mut d);
    }

    pub(super) fn note_lost(&self, app: Arc<str>, n: u64) {
        *self
            .lost_by_app
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(app)
            .or_default() += n;
    }

    /// One message per app that lost lines, telling its readers how many: drops are
    /// never silent in the app's own log.
    pub(super) fn take_notices(&self) -> Vec<Frame> {
        let lost = std::mem::take(&mut *self.lost_by_app.lock().unwrap_or_else(|e| e.into_inner()));
        let ts = now_rfc3339();
        lost.into_iter()
            .map(|(app, n)| {
                let mut frame = Vec::new();
                let h = Header {
                    timestamp: &ts,
                    host: &self.host,
                    app: &app,
                    procid: "flynn-host",
                    stream: Stream::Stderr,
                    seq: 0,
                };
                let msg = format!(
                    "flynn-host: {n} log lines were dropped while the log aggregator was unreachable"
                );
                // No `seq`: a notice is sent ahead of older queued lines and would move the
                // aggregator's cursor past them.
                encode_with(&mut frame, &h, msg.as_bytes(), false);
                (app, Arc::from(frame), Stored::Notice(n))
            })
            .collect()
    }
}
