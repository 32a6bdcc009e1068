//! One connection of a watch: its event stream read, the replay buffered up to its limit,
//! and how the connection ended.

use std::time::Duration;

use tokio::sync::mpsc;

use super::replay::{reconcile, track, Known, Unreadable};
use super::watch::WatchLog;
use super::{Event, EventKind};

/// Why a watch connection ended, for the pause before the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    /// A live event of a known kind could not be read.
    BadEvent,
    /// The replay was longer than the client holds.
    StateTooLarge,
    Other,
}

/// How one watch connection ended, the consumer still being there.
pub(super) struct Ended {
    /// It got as far as `current`.
    pub(super) synced: bool,
    pub(super) why: String,
    /// Counts as a failure: anything before `current`, and a working stream the client
    /// gave up (not one the server closed, as it does when it stops).
    pub(super) failed: bool,
    pub(super) cause: Cause,
}

impl Ended {
    pub(super) fn failed(synced: bool, why: impl Into<String>) -> Ended {
        Ended {
            synced,
            why: why.into(),
            failed: true,
            cause: Cause::Other,
        }
    }

    /// Closed or broken by the server: a failure only before `current`.
    fn closed(synced: bool, why: &str) -> Ended {
        Ended {
            synced,
            why: if synced {
                why.to_string()
            } else {
                format!("{why} before current")
            },
            failed: !synced,
            cause: Cause::Other,
        }
    }
}

/// How long a watch stream may be silent (no event, no keep-alive) before it is dropped
/// and reconnected: two of the server's 30 s keep-alive intervals and some.
const WATCH_IDLE: Duration = Duration::from_secs(70);

/// One item of a watch stream's data.
enum Decoded {
    Event(Event),
    /// An event of a kind this client does not know (a newer discoverd's): skipped.
    UnknownKind(String),
    /// An event that could not be read, with what could be told of it: its kind (if it
    /// names a known one) and its instance's id.
    Bad {
        kind: Option<EventKind>,
        id: Option<String>,
        error: serde_json::Error,
    },
}

/// Reads one event, telling one of an unknown kind (a newer discoverd's, to be skipped)
/// from one of a known kind this client cannot read.
fn decode(data: &str) -> Decoded {
    let error = match serde_json::from_str::<Event>(data) {
        Ok(ev) => return Decoded::Event(ev),
        Err(e) => e,
    };
    let value = serde_json::from_str::<serde_json::Value>(data).ok();
    let field = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(str::to_string);
    let name = field(value.as_ref().and_then(|v| v.get("kind")));
    let id = field(
        value
            .as_ref()
            .and_then(|v| v.get("instance"))
            .and_then(|i| i.get("id")),
    );
    let kind = match name {
        Some(name) => match serde_json::from_value(serde_json::Value::String(name.clone())) {
            Ok(kind) => Some(kind),
            Err(_) => return Decoded::UnknownKind(name),
        },
        None => None,
    };
    Decoded::Bad { kind, id, error }
}

/// Reads one connection. Before `current` the replay is buffered (up to `limit` bytes);
/// at `current` it is diffed against what the consumer already knows, and the run of
/// failures is over. `Err` when the consumer is gone.
pub(super) async fn read_stream(
    mut r: reqwest::Response,
    service: &str,
    limit: usize,
    known: &mut Known,
    tx: &mpsc::Sender<Vec<Event>>,
    log: &mut WatchLog,
) -> Result<Ended, ()> {
    let mut buf = crate::sse::SseBuf::default();
    let mut replay: Vec<Event> = Vec::new();
    let mut unreadable = Unreadable::default();
    let mut replay_bytes = 0;
    let mut in_replay = true;
    loop {
        // The server writes a keep-alive after 30 s without an event: a stream silent for
        // much longer has a hung server or a peer gone without a FIN behind it.
        let chunk = match tokio::time::timeout(WATCH_IDLE, r.chunk()).await {
            Ok(Ok(Some(c))) => c,
            Ok(Ok(None)) => return Ok(Ended::closed(!in_replay, "stream closed")),
            Ok(Err(e)) => return Ok(Ended::closed(!in_replay, &format!("stream broke: {e}"))),
            Err(_) => {
                let why = format!("stream silent for {WATCH_IDLE:?}");
                return Ok(Ended::failed(!in_replay, why));
            }
        };
        if buf.push(&chunk).is_err() {
            return Ok(Ended::failed(!in_replay, "stream item too long"));
        }
        while let Some(raw) = buf.next_item() {
            let item = String::from_utf8_lossy(raw).into_owned();
            let data: String = item
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect::<Vec<_>>()
                .join("\n");
            if item.lines().any(|l| l.starts_with("event: error")) {
                let why = format!("server error: {}", truncated(&data, 200));
                return Ok(Ended::failed(!in_replay, why));
            }
            if data.is_empty() {
                continue;
            }
            if in_replay {
                replay_bytes += data.len();
                if replay_bytes > limit {
                    return Ok(Ended {
                        cause: Cause::StateTooLarge,
                        ..Ended::failed(false, format!("replay longer than {limit} bytes"))
                    });
                }
            }
            let ev = match decode(&data) {
                Decoded::Event(ev) => ev,
                // Says nothing this client could act on; the rest of the stream is good.
                Decoded::UnknownKind(kind) => {
                    log.unknown_kind(service, &kind);
                    continue;
                }
                // A live event of a known kind (or none that can be read) this client
                // cannot read, skipped, would be missing from what the consumer knows until
                // something else changed it: the stream is given up, and the next one's
                // replay brings what it said (or, if that cannot be read either, keeps what
                // the consumer has).
                Decoded::Bad { kind, error, .. } if !in_replay => {
                    let what = kind.map_or("unknown".to_string(), |k| format!("{k:?}"));
                    let event = truncated(&data, 200);
                    return Ok(Ended {
                        cause: Cause::BadEvent,
                        ..Ended::failed(
                            true,
                            format!("undecodable {what} event ({error}): {event}"),
                        )
                    });
                }
                // In the replay, giving up would not help (the next replay has it too):
                // the rest of the state is delivered without it, and what the consumer has
                // of what it was stays.
                Decoded::Bad { kind, id, error } => {
                    unreadable.note(kind, id);
                    log.skipped(service, &error, truncated(&data, 200));
                    continue;
                }
            };
            if in_replay {
                if ev.kind == EventKind::Current {
                    in_replay = false;
                    log.working(service);
                    let replay = std::mem::take(&mut replay);
                    let missed = reconcile(service, known, replay, &unreadable);
                    if !missed.is_empty() {
                        tx.send(missed).await.map_err(drop)?;
                    }
                } else {
                    replay.push(ev);
                }
                continue;
            }
            track(known, &ev);
            tx.send(vec![ev]).await.map_err(drop)?;
        }
    }
}

/// At most `max` bytes of `s` (cut at a character boundary), for a log line.
fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
