//! `/events`: the channel one change's events go out on, and the stream a subscriber gets
//! (the replay of drain-tracked backends first, then the live events).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use flynn_api::{Backend, StreamEvent};
use serde::Deserialize;
use tokio::sync::broadcast;

use super::backends::Drain;
use super::extract::ApiQuery;
use super::{event, Api, Batch};

/// The `/events` channel. A subscriber that is behind keeps what it has not read yet: at
/// most [`EVENT_CHANGES`] changes (the channel's capacity), and of those the events of the
/// latest ones only, up to [`EVENT_BACKLOG`] events (past that the older changes' events
/// are dropped, whoever has read them: one that has not gets an error and the end).
pub(super) struct Events {
    tx: broadcast::Sender<Arc<Slot>>,
    kept: Mutex<Kept>,
    changes: usize,
    backlog: usize,
}

/// What [`Events`] keeps of the changes sent.
#[derive(Default)]
struct Kept {
    /// The offset of the next event sent (the count of all events sent so far).
    next: u64,
    /// The changes in the channel, oldest first, whose events are still there.
    slots: std::collections::VecDeque<Arc<Slot>>,
    /// How many events they hold.
    events: usize,
}

/// One change's events in the `/events` channel, stamped with the offset of its first.
struct Slot {
    first: u64,
    len: usize,
    /// Taken out once the subscribers that are behind have been behind too far.
    events: Mutex<Option<Batch>>,
}

impl Events {
    pub(super) fn new(changes: usize, backlog: usize) -> Events {
        let changes = changes.max(1);
        let (tx, _) = broadcast::channel(changes);
        Events {
            tx,
            kept: Mutex::new(Kept::default()),
            changes,
            backlog: backlog.max(1),
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn send(&self, batch: Vec<StreamEvent>) {
        let len = batch.len();
        let mut k = self.kept();
        let slot = Arc::new(Slot {
            first: k.next,
            len,
            events: Mutex::new(Some(batch.into())),
        });
        k.next += len as u64;
        k.events += len;
        k.slots.push_back(slot.clone());
        // The newest change stays whole, however big.
        while k.slots.len() > 1 && (k.slots.len() > self.changes || k.events > self.backlog) {
            if let Some(old) = k.slots.pop_front() {
                k.events -= old.len;
                *old.events.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
        }
        // Under the lock: the channel's order is the offsets'.
        let _ = self.tx.send(slot);
    }

    /// The offset of the next event to be sent.
    fn next(&self) -> u64 {
        self.kept().next
    }
}

#[derive(Deserialize)]
pub(super) struct EventsQuery {
    types: Option<String>,
}

pub(super) async fn events(
    State(api): State<Arc<Api>>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> impl IntoResponse {
    let types: Option<Vec<String>> = q.types.map(|t| {
        t.split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    });
    let wanted = move |e: &StreamEvent| types.as_ref().is_none_or(|t| t.contains(&e.event));
    // Subscribe, then replay the state of drain-tracked services' backends: a
    // `backend-up` for each current backend (spec §1.3), then (an extension) a
    // `backend-down` for each still draining and a `backend-drained` for each that finished
    // draining within the last minute, so a client that reconnects learns what it missed
    // of the drains it waits for.
    // Subscribed under the drains lock, under which every drain event is sent (and the
    // drains change): each drain is in the replay or in the live events, never both.
    let (rx, replay): (_, Vec<StreamEvent>) = {
        let mut drains = api.drains();
        let rx = api.events.tx.subscribe();
        drains.prune(std::time::Instant::now());
        let s = api.store();
        let mut services = BTreeMap::new();
        for svc in s.drain_tracked() {
            if !services.contains_key(svc) {
                services.insert(svc.to_string(), s.backends(svc));
            }
        }
        let up = services.into_iter().flat_map(|(svc, list)| {
            list.into_iter().map(move |b| {
                let b = Backend {
                    service: svc.clone(),
                    addr: b.addr,
                    app: b.app,
                    job_id: b.job_id,
                };
                event("backend-up", None, Some(b))
            })
        });
        let mut draining: Vec<&Drain> = drains
            .running
            .values()
            .filter(|d| !d.task.is_finished())
            .collect();
        draining.sort_by_key(|d| d.id);
        let down = draining
            .into_iter()
            .map(|d| event("backend-down", None, Some(d.backend.clone())));
        let drained = drains
            .replayed()
            .into_iter()
            .map(|b| event("backend-drained", None, Some(b.clone())));
        (rx, up.chain(down).chain(drained).collect())
    };
    // Items are `Ok(event)`, or `Err(why)`: the stream fell behind (and ends).
    let replay = futures_util::stream::iter(replay.into_iter().map(Ok));
    // A subscriber that fell more changes (or events) behind than the channel holds has
    // missed events
    // (a scheduler waiting for a `backend-drained` would wait out its timeout): it gets an
    // error (spec §0.3) and the stream ends, so it reconnects and starts over from the
    // replay, rather than going on with a gap.
    struct Live {
        api: Arc<Api>,
        rx: Option<broadcast::Receiver<Arc<Slot>>>,
        batch: Batch,
        next: usize,
    }
    let live = Live {
        api: api.clone(),
        rx: Some(rx),
        batch: Arc::new([]),
        next: 0,
    };
    let live = futures_util::stream::unfold(live, |mut l| async move {
        loop {
            if let Some(e) = l.batch.get(l.next) {
                let e = e.clone();
                l.next += 1;
                return Some((Ok(e), l));
            }
            match l.rx.as_mut()?.recv().await {
                Ok(slot) => {
                    let events = slot.events.lock().map(|e| e.clone()).unwrap_or(None);
                    let Some(batch) = events else {
                        let behind = l.api.events.next().saturating_sub(slot.first);
                        l.rx = None;
                        return Some((
                            Err(format!(
                                "{behind} events behind (more than {})",
                                l.api.events.backlog
                            )),
                            l,
                        ));
                    };
                    l.batch = batch;
                    l.next = 0;
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    l.rx = None;
                    return Some((Err(format!("the events of {n} changes missed")), l));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    struct Open(Arc<Api>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0
                .sse_streams
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    api.sse_streams
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let open = Open(api.clone());
    use futures_util::StreamExt;
    let stream = replay
        .chain(live)
        .filter(move |e| {
            std::future::ready(match e {
                Ok(e) => wanted(e),
                Err(_) => true,
            })
        })
        .map(move |e| {
            let _ = &open;
            Ok::<_, std::convert::Infallible>(match e {
                Ok(e) => Event::default().data(serde_json::to_string(&e).unwrap_or_default()),
                Err(why) => {
                    tracing::warn!(
                        behind = %why,
                        "an /events subscriber fell behind; ending its stream"
                    );
                    Event::default().event("error").data(format!(
                        "{why}: the stream fell behind, events missed; reconnect"
                    ))
                }
            })
        });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(30)).text(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stalled subscriber pins at most the backlog's events (and the newest change,
    /// whole): the older changes' events are dropped, and it finds them gone. Changes are
    /// stamped with the offset of their first event.
    #[test]
    fn a_stalled_subscriber_pins_at_most_the_backlog() {
        let ev = Events::new(100, 10);
        let mut rx = ev.tx.subscribe();
        let batch = |n| (0..n).map(|_| event("set", None, None)).collect::<Vec<_>>();
        let held = |s: &Slot| s.events.lock().unwrap().as_ref().map(|b| b.len());
        ev.send(batch(6));
        ev.send(batch(6));
        ev.send(batch(3));
        let (a, b, c) = (
            rx.try_recv().unwrap(),
            rx.try_recv().unwrap(),
            rx.try_recv().unwrap(),
        );
        assert_eq!((a.first, b.first, c.first), (0, 6, 12));
        assert_eq!((held(&a), held(&b), held(&c)), (None, Some(6), Some(3)));
        // The newest change stays whole, however big.
        ev.send(batch(50));
        let d = rx.try_recv().unwrap();
        assert_eq!((held(&b), held(&c), held(&d)), (None, None, Some(50)));
        assert_eq!((d.first, ev.next()), (15, 65));
        // The capacity bounds the changes kept (the channel drops older ones too).
        let ev = Events::new(2, 1000);
        let _rx = ev.tx.subscribe();
        for _ in 0..3 {
            ev.send(batch(1));
        }
        let k = ev.kept();
        assert_eq!((k.slots.len(), k.events), (2, 2));
    }
}
