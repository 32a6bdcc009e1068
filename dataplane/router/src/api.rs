//! The admin API (spec §1.2 legacy standalone shape, §1.3): routes, service backends,
//! events, status and metrics. Runs on its own thread with a small tokio runtime; it
//! reaches the cores only by publishing table snapshots.

use std::collections::{BTreeMap, HashMap};
use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use flynn_api::{
    ApiError, Backend, BackendAddr, Certificate, Route, RouteType, Status, StreamEvent,
};
use serde::Deserialize;
use tokio::sync::broadcast;

use crate::metrics;
use crate::shared::Shared;
use crate::store::Store;

pub struct Api {
    pub store: Mutex<Store>,
    /// What the routes file put in the store (for reloads).
    file: Mutex<crate::reload::FileRoutes>,
    pub shared: Arc<Shared>,
    /// `/events`: one message per change, with all its events (a reload of thousands of
    /// routes takes one place in the channel, not thousands); see [`Events`].
    events: Events,
    /// The version of the last published table; discovery wakes on it to follow the set
    /// of routed services.
    pub published: tokio::sync::watch::Sender<u64>,
    /// Set while this process hands its state over to a new one: a change made here after
    /// the copy would be lost (the new one serves the API socket once the takeover is
    /// done), so changes are refused (503, retry) meanwhile.
    pub frozen: std::sync::atomic::AtomicBool,
    /// Drains in progress and lately done (see [`Drains`]).
    drains: Mutex<Drains>,
    /// Open `/events` streams (each holds its connection open for good: not waited for
    /// after a handover).
    sse_streams: std::sync::atomic::AtomicUsize,
    /// Services whose backends discovery manages (watched, or dropped with backends still
    /// to clear): handed over, so the new process clears those no route names any more
    /// (a drop this process had not seen yet at the copy). Setting a service's backends
    /// through the API takes it out (they are the operator's then).
    pub discovered: Mutex<std::collections::BTreeSet<String>>,
    /// Of those, the ones dropped whose clear has not been made yet (refused while the API
    /// was frozen): handed over, and cleared by the new process before it watches them
    /// again, even if a route names them again by then.
    pub owed: Mutex<std::collections::BTreeSet<String>>,
    /// Orders what follows a change (events, drains): see [`Api::after_change`].
    turns: Turns,
    /// The API thread's runtime, where what follows a change runs (also for a reload,
    /// which comes from the signal thread).
    runtime: std::sync::OnceLock<tokio::runtime::Handle>,
}

/// The events of one change, in order.
pub type Batch = Arc<[StreamEvent]>;

/// How many changes' events the `/events` channel holds for a subscriber that is behind
/// (by default; `--events-capacity`).
pub const EVENT_CHANGES: usize = 4096;

/// How many events a subscriber may be behind before its stream ends (by default;
/// `--events-backlog`): what one stalled subscriber can pin.
pub const EVENT_BACKLOG: usize = 65536;

/// The `/events` channel. A subscriber that is behind keeps what it has not read yet: at
/// most [`EVENT_CHANGES`] changes (the channel's capacity), and of those the events of the
/// latest ones only, up to [`EVENT_BACKLOG`] events (past that the older changes' events
/// are dropped, whoever has read them: one that has not gets an error and the end).
struct Events {
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
    fn new(changes: usize, backlog: usize) -> Events {
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

    fn send(&self, batch: Vec<StreamEvent>) {
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
struct Drains {
    running: HashMap<(String, String), Drain>,
    /// Finished (`backend-drained` sent) within [`DRAINED_REPLAYED`]: when, and the backend.
    done: HashMap<(String, String), (std::time::Instant, Backend)>,
    /// `done`'s entries by age, oldest first (with entries forgotten since: those whose
    /// time no longer matches `done`'s).
    done_order: std::collections::VecDeque<(std::time::Instant, (String, String))>,
    next_id: u64,
}

struct Drain {
    /// Tells this drain's task from a later one of the same backend.
    id: u64,
    task: tokio::task::AbortHandle,
    backend: Backend,
}

impl Drains {
    /// Drops finished drains older than [`DRAINED_REPLAYED`] (and the oldest past
    /// [`DRAINED_REPLAYED_MAX`]).
    fn prune(&mut self, now: std::time::Instant) {
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
    fn replayed(&self) -> Vec<&Backend> {
        let mut done: Vec<&(std::time::Instant, Backend)> = self.done.values().collect();
        done.sort_by_key(|(at, _)| *at);
        done.into_iter().map(|(_, b)| b).collect()
    }
}

/// Turns for the part of a change that follows its commit: taken under the store's lock
/// (so in the order of the changes), each turn waits for the one before it to finish.
struct Turns {
    taken: std::sync::atomic::AtomicU64,
    done: tokio::sync::watch::Sender<u64>,
}

/// Ends a turn when dropped, however its task ends.
struct Turn<'a>(&'a Turns, u64);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let n = self.1;
        self.0.done.send_modify(|d| *d = (*d).max(n));
    }
}

/// An [`ApiError`] as an HTTP response: status from the code table, JSON envelope.
pub struct ApiErr(pub ApiError);

impl From<ApiError> for ApiErr {
    fn from(e: ApiError) -> Self {
        ApiErr(e)
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

type Res<T> = Result<T, ApiErr>;

impl Api {
    #[cfg(test)]
    pub fn new(store: Store, shared: Arc<Shared>, file: crate::reload::FileRoutes) -> Self {
        Self::with_event_limits(store, shared, file, EVENT_CHANGES, EVENT_BACKLOG)
    }

    /// A new API, the `/events` channel holding at most `changes` changes and
    /// `backlog` events for a subscriber that is behind (see [`Events`]).
    pub fn with_event_limits(
        store: Store,
        shared: Arc<Shared>,
        file: crate::reload::FileRoutes,
        changes: usize,
        backlog: usize,
    ) -> Self {
        let events = Events::new(changes, backlog);
        Api {
            store: Mutex::new(store),
            file: Mutex::new(file),
            shared,
            events,
            published: tokio::sync::watch::Sender::new(0),
            frozen: std::sync::atomic::AtomicBool::new(false),
            drains: Mutex::new(Drains::default()),
            sse_streams: std::sync::atomic::AtomicUsize::new(0),
            discovered: Mutex::new(std::collections::BTreeSet::new()),
            owed: Mutex::new(std::collections::BTreeSet::new()),
            turns: Turns {
                taken: std::sync::atomic::AtomicU64::new(0),
                done: tokio::sync::watch::Sender::new(0),
            },
            runtime: std::sync::OnceLock::new(),
        }
    }

    /// Builds the runtime [`serve`] runs on and keeps its handle (before the API thread
    /// starts, so a reload never finds it missing).
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let _ = self.runtime.set(rt.handle().clone());
        Ok(rt)
    }

    /// A turn for what follows a change; take it under the store's lock, right after the
    /// change.
    fn take_turn(&self) -> u64 {
        self.turns
            .taken
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1
    }

    /// Runs `then` once every core uses table version `v` and every earlier change's
    /// `then` has run, on a task of its own: a handler dropped meanwhile (its client went
    /// away) loses neither the events nor the drains of a change that was made, and two
    /// changes' events go out in the order of the changes (a backend removed and put back
    /// is reported down, then up). Resolves with `then`'s result.
    async fn after_change<T: Send + 'static>(
        self: &Arc<Self>,
        turn: u64,
        v: u64,
        then: impl FnOnce(&Arc<Api>) -> T + Send + 'static,
    ) -> T {
        let api = self.clone();
        let task = tokio::spawn(async move {
            let mut done = api.turns.done.subscribe();
            let _turn = Turn(&api.turns, turn);
            api.applied(v).await;
            let _ = done.wait_for(|d| *d + 1 >= turn).await;
            then(&api)
        });
        match task.await {
            Ok(t) => t,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: the runtime is shutting down.
            Err(_) => std::future::pending().await,
        }
    }

    /// What the routes file put in the store (for a handover).
    pub fn file_record(&self) -> crate::reload::FileRecord {
        self.file.lock().unwrap_or_else(|p| p.into_inner()).record()
    }

    fn frozen(&self) -> bool {
        self.frozen.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The store, to change it: refused while the state is handed over. Checked under the
    /// store's lock, which the handover holds while it sets `frozen` and copies, so a change
    /// is either in the copy or refused.
    fn store_for_change(&self) -> Result<std::sync::MutexGuard<'_, Store>, ApiError> {
        let s = self.store();
        if self.frozen() {
            return Err(ApiError::new(
                flynn_api::ErrorCode::ServiceUnavailable,
                "the router is handing over to a new process; retry",
            )
            .with_retry(true));
        }
        Ok(s)
    }

    pub(crate) fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes the store's current table to the cores; returns its version.
    pub fn publish(&self, store: &Store) -> u64 {
        self.shared
            .certs
            .publish(store.cert_store(self.shared.default_cert.clone()));
        let v = self.shared.publish(store.table());
        self.published.send_replace(v);
        v
    }

    /// Applies a new version of the routes file (`SIGHUP`). What follows is what follows
    /// an API change, through the same [`Api::after_change`] on the API's runtime and in
    /// turn with the API's changes: `set`/`remove` for its routes, and for each service
    /// whose backends it changed `backend-up`/`backend-down` and drains, as a
    /// `PUT /services/:service/backends` would ([`Api::backends_changed`]).
    pub async fn reload_file(
        self: &Arc<Self>,
        file: crate::RoutesFile,
    ) -> Result<(usize, usize), String> {
        let rt = self
            .runtime
            .get()
            .cloned()
            .ok_or("the admin API is not running")?;
        let (applied, v, turn) = {
            let mut s = self.store();
            if self.frozen() {
                return Err("the router is handing over to a new process".into());
            }
            let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
            // All or nothing: on error neither the store nor the file state changed.
            let applied = f.apply(&mut s, file)?;
            (applied, self.publish(&s), self.take_turn())
        };
        let counts = (applied.set.len(), applied.removed.len());
        let api = self.clone();
        let then = async move {
            api.after_change(turn, v, move |api| api.file_applied(applied))
                .await
        };
        if rt.spawn(then).await.is_err() {
            // The API's runtime stopped (a handover): the turn ends here, if it had not.
            drop(Turn(&self.turns, turn));
            return Err("the admin API stopped".into());
        }
        Ok(counts)
    }

    /// Announces a reload's changes, as one batch: backends first (the file sets its
    /// services before its routes), then removed and set routes.
    fn file_applied(self: &Arc<Self>, applied: crate::reload::Applied) {
        let mut drains = self.drains();
        let mut batch = Vec::new();
        for c in applied.backends {
            self.note_backends(&mut drains, &mut batch, &c.service, c.added, c.removed);
        }
        for r in applied.removed {
            batch.push(event("remove", Some(r), None));
        }
        for r in applied.set {
            batch.push(event("set", Some(r), None));
        }
        self.send(batch);
    }

    /// Waits until every core applied `v`, so a route is live when the API answers.
    async fn applied(&self, v: u64) {
        for _ in 0..5000 {
            if self.shared.applied(v) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tracing::warn!(version = v, "cores slow to apply a route update");
    }

    fn emit(&self, name: &str, route: Option<Route>, backend: Option<Backend>) {
        self.send(vec![event(name, route, backend)]);
    }

    /// Sends one change's events to the `/events` subscribers.
    fn send(&self, batch: Vec<StreamEvent>) {
        if !batch.is_empty() {
            self.events.send(batch);
        }
    }

    fn drains(&self) -> std::sync::MutexGuard<'_, Drains> {
        self.drains.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn event(name: &str, route: Option<Route>, backend: Option<Backend>) -> StreamEvent {
    StreamEvent {
        event: name.into(),
        route,
        backend,
        error: None,
    }
}

fn parse_kind(s: &str) -> Res<RouteType> {
    RouteType::parse(s)
        .ok_or_else(|| ApiErr(ApiError::validation(Some("type"), "Invalid route type")))
}

async fn add_route(State(api): State<Arc<Api>>, ApiBody(body): ApiBody) -> Res<Json<Route>> {
    let r = Store::parse_route(&body)?;
    let (r, v, turn) = {
        let mut s = api.store_for_change()?;
        let r = s.add(r)?;
        (r, api.publish(&s), api.take_turn())
    };
    let set = r.clone();
    api.after_change(turn, v, move |api| api.emit("set", Some(set), None))
        .await;
    Ok(Json(r))
}

#[derive(Deserialize)]
struct ListQuery {
    parent_ref: Option<String>,
}

async fn list_routes(
    State(api): State<Arc<Api>>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Json<Vec<Route>> {
    Json(api.store().list(q.parent_ref.as_deref()))
}

async fn get_route(
    State(api): State<Arc<Api>>,
    ApiPath((kind, id)): ApiPath<(String, String)>,
) -> Res<Json<Route>> {
    let kind = parse_kind(&kind)?;
    let s = api.store();
    s.get(kind, &id)
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiErr(ApiError::not_found("route not found")))
}

async fn update_route(
    State(api): State<Arc<Api>>,
    ApiPath((kind, id)): ApiPath<(String, String)>,
    ApiBody(body): ApiBody,
) -> Res<Json<Route>> {
    let kind = parse_kind(&kind)?;
    let u = Store::parse_update(&body)?;
    let (r, v, turn) = {
        let mut s = api.store_for_change()?;
        let r = s.update(kind, &id, u)?;
        (r, api.publish(&s), api.take_turn())
    };
    let set = r.clone();
    api.after_change(turn, v, move |api| api.emit("set", Some(set), None))
        .await;
    Ok(Json(r))
}

async fn delete_route(
    State(api): State<Arc<Api>>,
    ApiPath((kind, id)): ApiPath<(String, String)>,
) -> Res<StatusCode> {
    let kind = parse_kind(&kind)?;
    let (r, v, turn) = {
        let mut s = api.store_for_change()?;
        let r = s.remove(kind, &id)?;
        (r, api.publish(&s), api.take_turn())
    };
    api.after_change(turn, v, move |api| api.emit("remove", Some(r), None))
        .await;
    Ok(StatusCode::OK)
}

async fn put_backends(
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
    fn note_backends(
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

#[derive(Deserialize)]
struct CertBody {
    #[serde(default)]
    cert: String,
    #[serde(default)]
    key: String,
}

async fn add_certificate(
    State(api): State<Arc<Api>>,
    ApiBody(body): ApiBody,
) -> Res<Json<Certificate>> {
    let b: CertBody = serde_json::from_slice(&body).map_err(|_| ApiError::syntax())?;
    let mut s = api.store_for_change()?;
    let c = s.certs.add(&b.cert, &b.key)?;
    Ok(Json(s.certificate(&c.id).unwrap_or(c)))
}

async fn list_certificates(State(api): State<Arc<Api>>) -> Json<Vec<Certificate>> {
    let s = api.store();
    let ids: Vec<String> = s.certs.list().into_iter().map(|c| c.id).collect();
    Json(ids.iter().filter_map(|id| s.certificate(id)).collect())
}

fn cert_not_found() -> ApiErr {
    ApiErr(ApiError::object_not_found("certificate not found"))
}

async fn get_certificate(
    State(api): State<Arc<Api>>,
    ApiPath(id): ApiPath<String>,
) -> Res<Json<Certificate>> {
    api.store()
        .certificate(&id)
        .map(Json)
        .ok_or_else(cert_not_found)
}

async fn certificate_routes(
    State(api): State<Arc<Api>>,
    ApiPath(id): ApiPath<String>,
) -> Res<Json<Vec<Route>>> {
    let s = api.store();
    s.certs.get(&id).ok_or_else(cert_not_found)?;
    Ok(Json(s.certificate_routes(&id)))
}

async fn delete_certificate(
    State(api): State<Arc<Api>>,
    ApiPath(id): ApiPath<String>,
) -> Res<StatusCode> {
    let mut s = api.store_for_change()?;
    s.certs.get(&id).ok_or_else(cert_not_found)?;
    if !s.certificate_routes(&id).is_empty() {
        return Err(ApiErr(ApiError::conflict(
            "certificate is in use by routes",
        )));
    }
    s.certs.remove(&id);
    Ok(StatusCode::OK)
}

async fn get_backends(
    State(api): State<Arc<Api>>,
    ApiPath(service): ApiPath<String>,
) -> Json<Vec<BackendAddr>> {
    Json(api.store().backends(&service))
}

#[derive(Deserialize)]
struct EventsQuery {
    types: Option<String>,
}

async fn events(
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

async fn status(State(api): State<Arc<Api>>) -> Response {
    let drivers: Vec<&str> = api
        .shared
        .cores
        .iter()
        .map(|c| c.driver.get().copied().unwrap_or("starting"))
        .collect();
    let routes = api.store().route_count();
    let body = Status::healthy(
        env!("CARGO_PKG_VERSION"),
        Some(serde_json::json!({ "routes": routes, "workers": drivers })),
    );
    let mut text = serde_json::to_string_pretty(&body).unwrap_or_default();
    text.push('\n');
    ([(header::CONTENT_TYPE, "application/json")], text).into_response()
}

async fn metrics_text(State(api): State<Arc<Api>>) -> Response {
    let cores: Vec<_> = api.shared.cores.iter().map(|c| &c.metrics).collect();
    let routes = api.store().route_count();
    let text = metrics::render(&cores, routes);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn not_found() -> ApiErr {
    ApiErr(ApiError::not_found("not found"))
}

/// A known path with a method it does not serve: 405 (axum adds `Allow`) with the JSON
/// envelope, as discoverd, the host and the log aggregator answer. Spec §0.1 has no code
/// for 405, so the body says `validation_error`, the code for a request this server will
/// not take as sent.
async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(ApiError::validation(None, "method not allowed")),
    )
        .into_response()
}

/// The most a request body may be (a routes list or a certificate is far less).
pub const BODY_LIMIT: usize = 2 << 20;

/// [`Path`] whose rejection is the JSON envelope (spec §0.1) rather than axum's plain
/// text: a segment that does not decode to UTF-8 is a 400 `validation_error`.
struct ApiPath<T>(T);

/// [`Query`] whose rejection is the JSON envelope: a 400 `validation_error`.
struct ApiQuery<T>(T);

/// The raw body, at most [`BODY_LIMIT`]; over it, a 400 `request_body_too_big`.
struct ApiBody(Bytes);

impl From<PathRejection> for ApiErr {
    fn from(r: PathRejection) -> Self {
        if r.status().is_client_error() {
            ApiErr(ApiError::validation(None, &r.body_text()))
        } else {
            // A route and its extractor disagree: a bug here, not in the request.
            tracing::error!(error = %r.body_text(), "path extraction failed");
            ApiErr(ApiError::unknown())
        }
    }
}

impl From<QueryRejection> for ApiErr {
    fn from(r: QueryRejection) -> Self {
        ApiErr(ApiError::validation(None, &r.body_text()))
    }
}

impl From<BytesRejection> for ApiErr {
    fn from(r: BytesRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiErr(ApiError::new(
                flynn_api::ErrorCode::RequestBodyTooBig,
                format!("request body over {BODY_LIMIT} bytes"),
            ))
        } else {
            // The body could not be read (the client went away): unclassified.
            tracing::debug!(error = %r.body_text(), "reading a request body failed");
            ApiErr(ApiError::unknown())
        }
    }
}

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiErr;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiErr> {
        let Path(v) = Path::from_request_parts(parts, state).await?;
        Ok(ApiPath(v))
    }
}

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiErr;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiErr> {
        let Query(v) = Query::from_request_parts(parts, state).await?;
        Ok(ApiQuery(v))
    }
}

impl<S: Send + Sync> FromRequest<S> for ApiBody {
    type Rejection = ApiErr;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiErr> {
        Ok(ApiBody(Bytes::from_request(req, state).await?))
    }
}

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/routes", get(list_routes).post(add_route))
        .route(
            "/routes/{kind}/{id}",
            get(get_route).put(update_route).delete(delete_route),
        )
        .route(
            "/services/{service}/backends",
            put(put_backends).get(get_backends),
        )
        .route(
            "/certificates",
            get(list_certificates).post(add_certificate),
        )
        .route(
            "/certificates/{id}",
            get(get_certificate).delete(delete_certificate),
        )
        .route("/certificates/{id}/routes", get(certificate_routes))
        .route("/events", get(events))
        .route("/.well-known/status", get(status))
        .route("/metrics", get(metrics_text))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(api)
}

/// Serves the API on `listener` until the process exits (call on a dedicated thread).
/// `rt` is [`Api::runtime`]'s.
pub fn serve(
    api: Arc<Api>,
    rt: tokio::runtime::Runtime,
    listener: std::net::TcpListener,
    discoverd: Option<String>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    rt.block_on(async move {
        if let Some(url) = discoverd {
            tokio::spawn(crate::discovery::run(api.clone(), url));
        }
        // Set at a handover: every answer then says `Connection: close`, so keep-alive
        // clients move to the new process.
        let handed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let api2 = api.clone();
        let app = router(api).layer(axum::middleware::from_fn_with_state(
            handed.clone(),
            close_after_handover,
        ));
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let listener = UntilHandover {
            inner: Some(tokio::net::TcpListener::from_std(listener)?),
            stop: Some(stop.clone()),
            open: open.clone(),
        };
        let mut server = Box::pin(axum::serve(listener, app).into_future());
        // Both ends of `stop` are dropped on return: the handover thread takes that as the
        // end of this API.
        tokio::select! {
            r = &mut server => return r,
            stopped = stop.wait_for(|s| *s) => {
                if stopped.is_err() {
                    // No handover configured: serve for good.
                    return server.await;
                }
            }
        }
        // Handed over: this process stops accepting (the listener closes its descriptor; the
        // new process has its own) but answers what its accepted connections send. Closing
        // them at once (a graceful shutdown does) would reset one whose request had arrived
        // unread. First a second for such requests, answered with `Connection: close`; then a
        // graceful shutdown ends the idle connections and lets responses under way finish,
        // for at most `API_FINISH`.
        handed.store(true, std::sync::atomic::Ordering::SeqCst);
        let start = tokio::time::Instant::now();
        tokio::select! {
            r = &mut server => return r,
            _ = tokio::time::sleep(API_SETTLE) => {}
        }
        drop(server);
        // `/events` streams never end by themselves: they are cut when this returns (their
        // clients reconnect, to the new process).
        let busy = || {
            open.load(std::sync::atomic::Ordering::SeqCst)
                > api2.sse_streams.load(std::sync::atomic::Ordering::SeqCst)
        };
        while busy() && start.elapsed() < API_FINISH {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(stop);
        Ok(())
    })
}

/// After a handover: how long requests on already accepted connections may take to arrive,
/// and the most this process waits for its connections to end.
const API_SETTLE: Duration = Duration::from_secs(1);
const API_FINISH: Duration = Duration::from_secs(3);

/// Adds `Connection: close` to every answer once the API was handed over.
async fn close_after_handover(
    State(handed): State<Arc<std::sync::atomic::AtomicBool>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut r = next.run(req).await;
    if handed.load(std::sync::atomic::Ordering::SeqCst) {
        r.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    r
}

/// An accepted API connection, counted in `open` until it is dropped.
struct Counted {
    inner: tokio::net::TcpStream,
    open: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The API's listener: accepts (with `TCP_NODELAY`: SSE events must not wait for Nagle and
/// delayed ACKs) until a handover, then closes its descriptor (the new process has its own)
/// and accepts nothing more.
struct UntilHandover {
    inner: Option<tokio::net::TcpListener>,
    /// `None` once it can no longer fire (no handover configured).
    stop: Option<tokio::sync::watch::Receiver<bool>>,
    /// Accepted connections not closed yet.
    open: Arc<std::sync::atomic::AtomicUsize>,
}

impl axum::serve::Listener for UntilHandover {
    type Io = Counted;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Some(l) = &self.inner else {
                return std::future::pending().await;
            };
            let stopped = async {
                match &mut self.stop {
                    Some(s) => s.wait_for(|v| *v).await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = l.accept() => match r {
                    Ok((s, a)) => {
                        let _ = s.set_nodelay(true);
                        self.open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let s = Counted {
                            inner: s,
                            open: self.open.clone(),
                        };
                        return (s, a);
                    }
                    // As axum's own listener: a connection gone before it was accepted is
                    // nothing; anything else (out of descriptors) is retried after a pause.
                    Err(e) if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused
                            | std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                    ) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "admin API accept failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
                handed = stopped => {
                    if handed {
                        self.inner = None;
                    } else {
                        self.stop = None;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        match &self.inner {
            Some(l) => l.local_addr(),
            None => Err(std::io::Error::other("handed over")),
        }
    }
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
