//! Service backends: setting them (API or discovery), their `backend-up`/`backend-down`
//! events, and the drains that report `backend-drained`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::Json;
use flynn_api::{ApiError, Backend, BackendAddr, StreamEvent};

use super::extract::{ApiBody, ApiPath, Res};
use super::{event, Api};

/// How long a finished drain is replayed (`backend-drained`) to a subscriber that connects
/// after it: a scheduler that lost its stream while waiting (spec §1.9: it waits 10 s)
/// learns the drain it waits for happened.
const DRAINED_REPLAYED: Duration = Duration::from_secs(60);

/// At most this many finished drains are kept for the replay.
const DRAINED_REPLAYED_MAX: usize = 4096;

/// Drains in progress by (service, address): one at a time per backend, cancelled when
/// the backend comes back before it drained; and those finished lately, for the
/// `/events` replay. Changed, and their events sent, under its lock, which the replay
/// takes too: a subscriber's replay and live events never disagree.
#[derive(Default)]
pub(super) struct Drains {
    pub(super) running: HashMap<(String, String), Drain>,
    /// Finished (`backend-drained` sent) within [`DRAINED_REPLAYED`]: when, and the backend.
    done: HashMap<(String, String), (std::time::Instant, Backend)>,
    /// `done`'s entries by age, oldest first (with entries forgotten since: those whose
    /// time no longer matches `done`'s).
    done_order: std::collections::VecDeque<(std::time::Instant, (String, String))>,
    next_id: u64,
}

pub(super) struct Drain {
    /// Tells this drain's task from a later one of the same backend.
    pub(super) id: u64,
    pub(super) task: tokio::task::AbortHandle,
    pub(super) backend: Backend,
}

impl Drains {
    /// Drops finished drains older than [`DRAINED_REPLAYED`] (and the oldest past
    /// [`DRAINED_REPLAYED_MAX`]).
    pub(super) fn prune(&mut self, now: std::time::Instant) {
        while let Some((at, key)) = self.done_order.front() {
            if now.saturating_duration_since(*at) <= DRAINED_REPLAYED
                && self.done_order.len() <= DRAINED_REPLAYED_MAX
            {
                break;
            }
            if self.done.get(key).is_some_and(|(t, _)| t == at) {
                self.done.remove(key);
            }
            self.done_order.pop_front();
        }
    }

    /// Records a finished drain of `b` at `now`.
    fn finished(&mut self, now: std::time::Instant, b: Backend) {
        let key = (b.service.clone(), b.addr.clone());
        self.done_order.push_back((now, key.clone()));
        self.done.insert(key, (now, b));
        self.prune(now);
    }

    /// Forgets a finished drain of `key`'s backend (it is back, or draining again).
    fn forget_done(&mut self, key: &(String, String)) {
        self.done.remove(key);
    }

    /// The finished drains to replay, oldest first.
    pub(super) fn replayed(&self) -> Vec<&Backend> {
        let mut done: Vec<&(std::time::Instant, Backend)> = self.done.values().collect();
        done.sort_by_key(|(at, _)| *at);
        done.into_iter().map(|(_, b)| b).collect()
    }
}

pub(super) async fn put_backends(
    State(api): State<Arc<Api>>,
    ApiPath(service): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Res<Json<Vec<BackendAddr>>> {
    let list: Vec<BackendAddr> = serde_json::from_slice(&body).map_err(|_| ApiError::syntax())?;
    let set = api.set_backends(&service, list).await?;
    // Unrouted, the operator's now: not cleared as discoverd's later. A routed service
    // stays discoverd's (its watch keeps setting its backends).
    if !api.routed_services().contains(&service) {
        if let Ok(mut d) = api.discovered.lock() {
            d.remove(&service);
        }
        if let Ok(mut o) = api.owed.lock() {
            o.remove(&service);
        }
    }
    Ok(Json(set))
}

pub(super) async fn get_backends(
    State(api): State<Arc<Api>>,
    ApiPath(service): ApiPath<String>,
) -> Json<Vec<BackendAddr>> {
    Json(api.store().backends(&service))
}

impl Api {
    /// Replaces a service's backends (from the API or from discoverd), waits until every
    /// core uses the new set, and emits `backend-up`/`backend-down` (and, for
    /// drain-tracked services, `backend-drained` once in-flight requests finish).
    pub async fn set_backends(
        self: &Arc<Self>,
        service: &str,
        list: Vec<BackendAddr>,
    ) -> Result<Vec<BackendAddr>, ApiError> {
        let (added, removed, v, turn) = {
            let mut s = self.store_for_change()?;
            let (a, r) = s.set_backends(service, list)?;
            (a, r, self.publish(&s), self.take_turn())
        };
        let service = service.to_string();
        let set = self
            .after_change(turn, v, move |api| {
                api.backends_changed(&service, added, removed);
                api.store().backends(&service)
            })
            .await;
        Ok(set)
    }

    /// Emits `backend-up`/`backend-down` for a change of `service`'s backends (one batch),
    /// and starts (or cancels) drains.
    fn backends_changed(
        self: &Arc<Self>,
        service: &str,
        added: Vec<BackendAddr>,
        removed: Vec<BackendAddr>,
    ) {
        let mut drains = self.drains();
        let mut batch = Vec::new();
        self.note_backends(&mut drains, &mut batch, service, added, removed);
        // Under the drains lock: a drain started here reports `backend-drained` after this.
        self.send(batch);
    }

    /// [`Api::backends_changed`]'s events, added to `batch`, and its drains.
    pub(super) fn note_backends(
        self: &Arc<Self>,
        drains: &mut Drains,
        batch: &mut Vec<StreamEvent>,
        service: &str,
        added: Vec<BackendAddr>,
        removed: Vec<BackendAddr>,
    ) {
        let backend = |b: BackendAddr| Backend {
            service: service.to_string(),
            addr: b.addr,
            app: b.app,
            job_id: b.job_id,
        };
        let tracked = self.store().tracks_drains(service);
        for b in removed {
            let b = backend(b);
            batch.push(event("backend-down", None, Some(b.clone())));
            if tracked {
                drains.running.retain(|_, d| !d.task.is_finished());
                let key = (b.service.clone(), b.addr.clone());
                // Checked under the drains lock: a concurrent change that put it back either
                // did so before this (no drain) or cancels this drain after.
                let back = self
                    .store()
                    .backends(service)
                    .iter()
                    .any(|x| x.addr == b.addr);
                if !back && !drains.running.contains_key(&key) {
                    drains.forget_done(&key);
                    drains.next_id += 1;
                    let id = drains.next_id;
                    let task = tokio::spawn(drain(self.clone(), b.clone(), id));
                    drains.running.insert(
                        key,
                        Drain {
                            id,
                            task: task.abort_handle(),
                            backend: b,
                        },
                    );
                }
            }
        }
        for b in added {
            let b = backend(b);
            // Back before it drained: that drain would report a live backend.
            let key = (b.service.clone(), b.addr.clone());
            if let Some(d) = drains.running.remove(&key) {
                d.task.abort();
            }
            drains.forget_done(&key);
            batch.push(event("backend-up", None, Some(b)));
        }
    }

    /// Services that routes refer to.
    pub fn routed_services(&self) -> std::collections::BTreeSet<String> {
        self.store().routed_services()
    }
}

/// Emits `backend-drained` once no core has a request in flight to the backend
/// (spec §1.9). New requests already avoid it: it left the table before this starts.
/// `id`: this drain's in [`Drains`].
async fn drain(api: Arc<Api>, b: Backend, id: u64) {
    let key = (b.service.clone(), b.addr.clone());
    let Ok(addr) = b.addr.parse() else {
        api.drains().running.remove(&key);
        return;
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    // Polled every 10 ms at first (short requests drain at once), backing off to every
    // 200 ms (long ones: streams and tunnels hold a backend for minutes).
    let mut every = Duration::from_millis(10);
    while api.shared.inflight(addr).await > 0 {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(addr = %b.addr, "backend still busy after 10 minutes; not reporting drained");
            let mut drains = api.drains();
            if drains.running.get(&key).is_some_and(|d| d.id == id) {
                drains.running.remove(&key);
            }
            return;
        }
        tokio::time::sleep(every).await;
        every = (every * 2).min(Duration::from_millis(200));
    }
    let mut drains = api.drains();
    // Cancelled meanwhile (the backend came back): nothing to report.
    if drains.running.get(&key).is_none_or(|d| d.id != id) {
        return;
    }
    drains.running.remove(&key);
    drains.finished(std::time::Instant::now(), b.clone());
    // Under the lock, as the replay reads it: a subscriber sees this drain either as
    // running in its replay and then this event, or as done in its replay.
    api.emit("backend-drained", None, Some(b));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(addr: &str) -> Backend {
        Backend {
            service: "web".into(),
            addr: addr.into(),
            app: String::new(),
            job_id: String::new(),
        }
    }

    /// Finished drains are replayed oldest first, for a minute, at most
    /// [`DRAINED_REPLAYED_MAX`] of them; one forgotten (its backend back) is not, and a
    /// later drain of the same backend is.
    #[test]
    fn finished_drains_are_kept_for_the_replay_a_while() {
        let t = std::time::Instant::now();
        let mut d = Drains::default();
        let addrs =
            |d: &Drains| -> Vec<String> { d.replayed().iter().map(|b| b.addr.clone()).collect() };
        d.finished(t, backend("a:1"));
        d.finished(t + Duration::from_secs(1), backend("b:1"));
        assert_eq!(addrs(&d), ["a:1", "b:1"]);
        d.forget_done(&("web".into(), "a:1".into()));
        assert_eq!(addrs(&d), ["b:1"]);
        d.finished(t + Duration::from_secs(2), backend("a:1"));
        assert_eq!(addrs(&d), ["b:1", "a:1"]);
        // The forgotten first entry of a:1 ages out without taking the later one along.
        d.prune(t + DRAINED_REPLAYED + Duration::from_millis(500));
        assert_eq!(addrs(&d), ["b:1", "a:1"]);
        d.prune(t + DRAINED_REPLAYED + Duration::from_millis(1500));
        assert_eq!(addrs(&d), ["a:1"]);
        d.prune(t + DRAINED_REPLAYED + Duration::from_secs(3));
        assert!(addrs(&d).is_empty());
        for i in 0..DRAINED_REPLAYED_MAX + 10 {
            d.finished(t, backend(&format!("c:{i}")));
        }
        let kept = addrs(&d);
        assert_eq!(kept.len(), DRAINED_REPLAYED_MAX);
        assert!(!kept.contains(&"c:9".to_string()) && kept.contains(&"c:10".to_string()));
    }
}
