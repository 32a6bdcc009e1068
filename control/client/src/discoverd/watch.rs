//! [`Client::watch`]: a service's events, kept whole across reconnects ([`Watch`]), and how
//! a watch paces and logs its reconnects.

use std::time::Duration;

use tokio::sync::mpsc;

use super::replay::Known;
use super::stream::{read_stream, Cause, Ended};
use super::{check_service, Client, Event};

/// A watch on one service. Delivers the server's replay (up…, leader, service_meta,
/// current) and then live events; when the stream breaks it reconnects and turns the
/// new replay into the events missed meanwhile (down for instances that vanished, up for
/// new ones, update for changed ones, down and up for ones that came back with a new
/// index, leader/meta when they changed), so a consumer
/// that applies events in order always ends up with the server's state.
///
/// Events of a kind this client does not know (a newer discoverd's) are skipped. A live
/// event of a known kind it cannot read ends the stream (the next replay says what it
/// was), with pauses that grow to 30 s while that goes on; an event in a replay that
/// cannot be read is left out, and what the consumer has of it (an instance, the leader)
/// stays as it is rather than being reported gone. A replay longer than [`MAX_STATE`] is
/// given up and tried again after 30–60 s.
///
/// [`MAX_STATE`]: super::MAX_STATE
pub struct Watch {
    /// Events come in batches: one live event, or all the events of one reconnect, so a
    /// reconnect's events are all there as soon as the first is (see [`Watch::try_next`]).
    pub(super) rx: mpsc::Receiver<Vec<Event>>,
    pub(super) pending: std::collections::VecDeque<Event>,
    pub(super) task: tokio::task::JoinHandle<()>,
}

impl Watch {
    pub async fn next(&mut self) -> Option<Event> {
        while self.pending.is_empty() {
            self.pending.extend(self.rx.recv().await?);
        }
        self.pending.pop_front()
    }

    /// The next event if one is already waiting. The events of one reconnect are
    /// delivered together, so a consumer that takes what is waiting after each event and
    /// then applies it all sees the reconnect as one change (a re-registered instance's
    /// `down` and `up` included).
    pub fn try_next(&mut self) -> Option<Event> {
        while self.pending.is_empty() {
            self.pending.extend(self.rx.try_recv().ok()?);
        }
        self.pending.pop_front()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Watches a service's events (`GET /services/:s`, all kinds). See [`Watch`].
    pub fn watch(&self, service: &str) -> Watch {
        let (tx, rx) = mpsc::channel(256);
        // A name a path would not carry as it is (`web?x` would watch `web`), or one the
        // server refuses, which would be retried for ever: the watch ends at once.
        let task = match check_service(service) {
            Ok(()) => tokio::spawn(watch_loop(self.clone(), service.to_string(), tx)),
            Err(e) => {
                tracing::warn!(service, error = %e, "not watching an invalid service name");
                drop(tx);
                tokio::spawn(async {})
            }
        };
        Watch {
            rx,
            pending: std::collections::VecDeque::new(),
            task,
        }
    }
}

/// How long a watch waits for the head of its answer: discoverd sends it at once, before
/// any event, so a node that accepted the connection and says nothing is hung (a stopped
/// process, a blocked runtime) and is tried again like one that refused the connection.
pub(super) const WATCH_ANSWER: Duration = Duration::from_secs(10);

/// How often a watch logs a warning: its first, then at most one in this time (the others
/// at debug level), for the whole life of the watch, so neither an outage nor a stream that
/// keeps breaking right after it synced (a lagging receiver's `event: error`, a silent
/// peer) is a log flood.
const WATCH_WARN_EVERY: Duration = Duration::from_secs(60);

/// A watch's pauses before it connects again: from the shortest, doubled after each try
/// up to the longest; a stream that got as far as `current` starts again from the
/// shortest.
const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(100);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The longest pause after streams given up for an event this client could not read: such
/// a stream synced, but so will the next one and then break on the same event, each time
/// with a full replay, so the pauses keep growing past [`WATCH_BACKOFF_MAX`] instead of
/// starting again from the shortest.
const BAD_EVENT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The pause after a replay longer than [`MAX_STATE`]: the next one is not likely to be
/// shorter soon, and each one costs the server (and this client) all of it.
fn state_too_large_pause() -> Duration {
    Duration::from_secs(30 + fastrand::u64(0..=30))
}

async fn watch_loop(c: Client, service: String, tx: mpsc::Sender<Vec<Event>>) {
    let mut known = Known::default();
    let mut backoff = WATCH_BACKOFF_MIN;
    let mut log = WatchLog::default();
    loop {
        let request = c
            .http
            .request(reqwest::Method::GET, &format!("/services/{service}"))
            .header("accept", "text/event-stream")
            .send();
        let ended = match tokio::time::timeout(WATCH_ANSWER, request).await {
            Ok(Ok(r)) if r.status().is_success() => {
                let stream = read_stream(r, &service, c.state_limit, &mut known, &tx, &mut log);
                match stream.await {
                    Err(()) => return, // receiver gone
                    Ok(ended) => ended,
                }
            }
            Ok(Ok(r)) => Ended::failed(false, format!("refused: {}", r.status())),
            Ok(Err(e)) => Ended::failed(false, format!("request failed: {e}")),
            Err(_) => Ended::failed(false, format!("no answer in {WATCH_ANSWER:?}")),
        };
        if ended.failed {
            log.failed(&service, &ended.why);
        } else {
            tracing::debug!(service, why = %ended.why, "watch stream ended; reconnecting");
        }
        if tx.is_closed() {
            return;
        }
        let pause = match ended.cause {
            Cause::StateTooLarge => state_too_large_pause(),
            Cause::BadEvent => {
                let pause = backoff;
                backoff = (backoff * 2).min(BAD_EVENT_BACKOFF_MAX);
                pause
            }
            Cause::Other => {
                // Only a stream that got as far as `current` was a working one: a server
                // that answers 200 and ends at once is retried with backoff.
                if ended.synced {
                    backoff = WATCH_BACKOFF_MIN;
                }
                let pause = backoff.min(WATCH_BACKOFF_MAX);
                backoff = (pause * 2).min(WATCH_BACKOFF_MAX);
                pause
            }
        };
        tokio::time::sleep(pause).await;
    }
}

/// At most one warning each [`WATCH_WARN_EVERY`]: the first one, then one when that long
/// has passed since the last.
#[derive(Default)]
struct RateLimit {
    last: Option<tokio::time::Instant>,
}

impl RateLimit {
    /// Whether a warning may be logged now (it is then counted as logged).
    fn allow(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let ok = self
            .last
            .is_none_or(|t| now.duration_since(t) >= WATCH_WARN_EVERY);
        if ok {
            self.last = Some(now);
        }
        ok
    }
}

/// What a watch logs: its failures (connections that ended before `current`, working
/// streams given up) and the events in a replay it could not read, as warnings at most
/// one each [`WATCH_WARN_EVERY`] over the life of the watch; and events of kinds this
/// client does not know (a newer discoverd's), skipped, with their own such limit.
#[derive(Default)]
pub(super) struct WatchLog {
    /// Failures since a stream last got to `current`.
    count: u32,
    /// One of them was logged as a warning (so its end is worth an info).
    warned_run: bool,
    warnings: RateLimit,
    unknown: RateLimit,
    /// Events of unknown kinds skipped since the last one logged.
    unknown_skipped: u64,
}

impl WatchLog {
    fn failed(&mut self, service: &str, why: &str) {
        self.count += 1;
        if self.warnings.allow() {
            self.warned_run = true;
            tracing::warn!(service, error = %why, failures = self.count, "watch failed; reconnecting");
        } else {
            tracing::debug!(service, error = %why, failures = self.count, "watch failed; reconnecting");
        }
    }

    /// A stream got as far as `current`: the run of failures is over (the warnings' limit
    /// goes on).
    pub(super) fn working(&mut self, service: &str) {
        if self.count > 0 && self.warned_run {
            tracing::info!(service, failures = self.count, "watch working again");
        }
        self.count = 0;
        self.warned_run = false;
    }

    /// An event of a replay that could not be read, left out of it.
    pub(super) fn skipped(&mut self, service: &str, error: &serde_json::Error, event: &str) {
        if self.warnings.allow() {
            tracing::warn!(service, error = %error, event, "undecodable event in a watch's replay; skipped");
        } else {
            tracing::debug!(service, error = %error, event, "undecodable event in a watch's replay; skipped");
        }
    }

    /// An event of a kind this client does not know, skipped.
    pub(super) fn unknown_kind(&mut self, service: &str, kind: &str) {
        self.unknown_skipped += 1;
        if self.unknown.allow() {
            let skipped = std::mem::take(&mut self.unknown_skipped);
            tracing::warn!(
                service,
                kind,
                skipped,
                "watch event of a kind this client does not know; skipped"
            );
        } else {
            tracing::debug!(
                service,
                kind,
                "watch event of a kind this client does not know; skipped"
            );
        }
    }
}
