//! The admin API (spec §1.2 legacy standalone shape, §1.3): routes, service backends,
//! events, status and metrics. Runs on its own thread with a small tokio runtime; it
//! reaches the cores only by publishing table snapshots.

mod backends;
mod certificates;
mod events;
mod extract;
mod routes;
mod server;

pub(crate) use server::serve;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use flynn_api::{ApiError, Backend, Route, Status, StreamEvent};

use crate::metrics;
use crate::shared::Shared;
use crate::store::Store;
use backends::{get_backends, put_backends, Drains};
use certificates::{
    add_certificate, certificate_routes, delete_certificate, get_certificate, list_certificates,
};
use events::{events, Events};
use extract::{ApiErr, BODY_LIMIT};
use routes::{add_route, delete_route, get_route, list_routes, update_route};

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
