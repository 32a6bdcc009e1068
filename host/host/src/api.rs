//! The job API (spec §5.3) on axum.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use flynn_api::host::{Event, ResourceCheck};
use flynn_api::ApiError;
use serde::Deserialize;
use tokio::sync::broadcast;

use crate::host::Host;
use crate::job;

/// An [`ApiError`] as a response.
pub struct Error(pub ApiError);

impl From<ApiError> for Error {
    fn from(e: ApiError) -> Self {
        Error(e)
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

pub(crate) type Result<T> = std::result::Result<T, Error>;

/// The path parameters, or the JSON error envelope when they cannot be decoded (bad
/// percent-encoding, not UTF-8) instead of axum's plain-text rejection.
pub(crate) fn path<T>(p: std::result::Result<Path<T>, PathRejection>) -> Result<T> {
    p.map(|Path(v)| v).map_err(|e| {
        ApiError::validation(Some("id"), &format!("is not a valid path segment: {e}")).into()
    })
}

/// The request body, or the JSON error envelope when it cannot be read (too big).
pub(crate) fn body(b: std::result::Result<Bytes, BytesRejection>) -> Result<Bytes> {
    b.map_err(|e| {
        let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            flynn_api::ErrorCode::RequestBodyTooBig
        } else {
            flynn_api::ErrorCode::ValidationError
        };
        ApiError::new(code, e.body_text()).into()
    })
}

/// `POST /attach` with `Upgrade: flynn-attach/0` (spec §5.5): errors before the upgrade are
/// the JSON envelope; after `101` the connection is `crate::attach::serve`'s.
async fn attach(State(host): State<Arc<Host>>, req: axum::extract::Request) -> Result<Response> {
    use flynn_api::attach::{AttachRequest, PROTOCOL};
    let wants = req
        .headers()
        .get(axum::http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(PROTOCOL));
    if !wants {
        return Err(ApiError::validation(None, "attach: Upgrade: flynn-attach/0 required").into());
    }
    let (parts, b) = req.into_parts();
    let b = axum::body::to_bytes(b, 64 << 10).await.map_err(|_| {
        ApiError::new(
            flynn_api::ErrorCode::RequestBodyTooBig,
            "attach request body over 64 KiB",
        )
    })?;
    let ar: AttachRequest = serde_json::from_slice(&b).map_err(|_| ApiError::syntax())?;
    // The client's address (served with connect info: see `crate::run`).
    let source = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let sub = host.attach(&ar, source)?;
    let mut req = axum::extract::Request::from_parts(parts, axum::body::Body::empty());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let flags = ar.flags;
    tokio::spawn(async move {
        use hyper_util::rt::TokioIo;
        use tokio::io::AsyncReadExt;
        let up = match on_upgrade.await {
            Ok(up) => up,
            Err(e) => return tracing::debug!(error = %e, "attach upgrade failed"),
        };
        // The TCP connection itself (a handle on its socket kept, to give it a longer user
        // timeout should its client hold the job up: see `crate::holds_job_up`), with what
        // was read past the request first.
        type Conn = TokioIo<tokio::net::TcpStream>;
        match hyper_util::server::conn::auto::upgrade::downcast::<Conn>(up) {
            Ok(parts) => {
                let conn = parts.io.into_inner();
                let sock = socket2::SockRef::from(&conn).try_clone().ok();
                let (rd, wr) = conn.into_split();
                let rd = std::io::Cursor::new(parts.read_buf).chain(rd);
                let io = tokio::io::join(rd, wr);
                crate::attach::serve(host, sub, flags, io, sock).await
            }
            Err(up) => crate::attach::serve(host, sub, flags, TokioIo::new(up), None).await,
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(axum::http::header::CONNECTION, "upgrade")
        .header(axum::http::header::UPGRADE, PROTOCOL)
        .body(axum::body::Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

/// A known path with a method it does not serve: 405 (axum still adds `Allow`) with the
/// JSON envelope, as the log aggregator answers. Spec §0.1 has no code for 405, so the body
/// says `validation_error`, the code for a request this server will not take as sent.
async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(ApiError::validation(None, "method not allowed")),
    )
        .into_response()
}

pub fn router(host: Arc<Host>) -> Router {
    Router::new()
        .route("/host/jobs", get(list_jobs))
        .route(
            "/host/jobs/{id}",
            put(add_job).get(get_job).delete(stop_job),
        )
        .route("/host/jobs/{id}/signal/{signal}", put(signal))
        .route(
            "/host/jobs/{id}/discoverd-deregister",
            put(discoverd_deregister),
        )
        .route("/host/status", get(status))
        .route("/host/tags", post(set_tags))
        .route("/host/resource-check", post(resource_check))
        .route("/host/network", post(configure_network))
        .route("/host/discoverd", post(set_discoverd))
        .route("/attach", post(attach))
        .merge(crate::volume_api::router())
        .route("/.well-known/status", get(health))
        .route("/metrics", get(metrics))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(|| async { Error(ApiError::not_found("not found")) })
        .with_state(host)
}

fn wants_sse(h: &HeaderMap) -> bool {
    h.get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

pub(crate) fn json_body<T: for<'de> Deserialize<'de>>(h: &HeaderMap, body: &[u8]) -> Result<T> {
    let ct = h
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.contains("application/json") {
        return Err(ApiError::validation(None, "Content-Type must be application/json").into());
    }
    serde_json::from_slice(body).map_err(|_| ApiError::syntax().into())
}

async fn add_job(
    State(host): State<Arc<Host>>,
    id: std::result::Result<Path<String>, PathRejection>,
    b: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>> {
    let (id, b) = (path(id)?, body(b)?);
    let job = job::parse_job(&id, &b, host.needs_image())?;
    host.add_job(job).await?;
    Ok(Json(serde_json::json!({})))
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    active: Option<String>,
}

async fn list_jobs(
    State(host): State<Arc<Host>>,
    headers: HeaderMap,
    q: std::result::Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response> {
    let Query(q) = q.map_err(|e| ApiError::validation(None, &e.body_text()))?;
    if wants_sse(&headers) {
        return Ok(sse(host.subscribe(), None).into_response());
    }
    let active = q.active.as_deref() == Some("true");
    Ok(Json(host.list(active)).into_response())
}

async fn get_job(
    State(host): State<Arc<Host>>,
    id: std::result::Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response> {
    let id = path(id)?;
    // Subscribe before looking the job up, so no event falls between the two.
    let rx = host.subscribe();
    let job = host
        .get(&id)
        .ok_or_else(|| ApiError::object_not_found("host: unknown job"))?;
    if wants_sse(&headers) {
        return Ok(sse(rx, Some(id)).into_response());
    }
    Ok(Json(job).into_response())
}

/// Job events as SSE (spec §0.3); a subscriber that falls too far behind gets an
/// `error` event and the stream ends.
fn sse(
    rx: broadcast::Receiver<Event>,
    only: Option<String>,
) -> Sse<impl futures_util::Stream<Item = std::result::Result<SseEvent, Infallible>>> {
    let stream = futures_util::stream::unfold(Some(rx), move |rx| {
        let only = only.clone();
        async move {
            let mut rx = rx?;
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        if only.as_ref().is_some_and(|id| *id != ev.job_id) {
                            continue;
                        }
                        let data = serde_json::to_string(&ev).unwrap_or_default();
                        return Some((Ok(SseEvent::default().data(data)), Some(rx)));
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let e = SseEvent::default()
                            .event("error")
                            .data(format!("subscriber lagged; {n} events lost"));
                        return Some((Ok(e), None));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(30)).text(""))
}

async fn stop_job(
    State(host): State<Arc<Host>>,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>> {
    let id = path(id)?;
    host.stop(&id).await?;
    Ok(Json(serde_json::json!({})))
}

async fn signal(
    State(host): State<Arc<Host>>,
    p: std::result::Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<serde_json::Value>> {
    let (id, sig) = path(p)?;
    let sig: i32 = sig
        .parse()
        .ok()
        .filter(|s| (1..=64).contains(s))
        .ok_or_else(|| ApiError::validation(Some("signal"), "must be an integer 1-64"))?;
    host.signal(&id, sig)?;
    Ok(Json(serde_json::json!({})))
}

async fn discoverd_deregister(
    State(host): State<Arc<Host>>,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>> {
    let id = path(id)?;
    if !host.deregister(&id).await {
        return Err(ApiError::object_not_found("host: unknown job").into());
    }
    Ok(Json(serde_json::json!({})))
}

async fn status(State(host): State<Arc<Host>>) -> Json<flynn_api::host::HostStatus> {
    Json(host.status())
}

async fn set_tags(
    State(host): State<Arc<Host>>,
    headers: HeaderMap,
    b: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>> {
    let tags: BTreeMap<String, String> = json_body(&headers, &body(b)?)?;
    if tags.keys().any(|k| k.is_empty()) {
        return Err(ApiError::validation(Some("tags"), "keys must not be empty").into());
    }
    host.set_tags(tags);
    Ok(Json(serde_json::json!({})))
}

async fn configure_network(
    State(host): State<Arc<Host>>,
    headers: HeaderMap,
    b: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<flynn_api::host::NetworkInfo>> {
    let cfg: flynn_api::host::NetworkConfig = json_body(&headers, &body(b)?)?;
    Ok(Json(host.configure_network(&cfg).await?))
}

async fn set_discoverd(
    State(host): State<Arc<Host>>,
    headers: HeaderMap,
    b: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>> {
    let n: flynn_api::host::DiscoverdNotify = json_body(&headers, &body(b)?)?;
    host.set_discoverd(&n)?;
    Ok(Json(serde_json::json!({})))
}

async fn resource_check(
    State(host): State<Arc<Host>>,
    headers: HeaderMap,
    b: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>> {
    let check: ResourceCheck = json_body(&headers, &body(b)?)?;
    let used = host.used_ports();
    let mut conflicts = Vec::new();
    for p in &check.ports {
        let in_job = used
            .iter()
            .any(|(n, pr)| *n == p.port && pr.as_ref().is_none_or(|pr| *pr == p.proto));
        if in_job || !port_free(p.port, &p.proto) {
            conflicts.push(p.clone());
        }
    }
    if !conflicts.is_empty() {
        return Err(ApiError::conflict("Conflicting resources found")
            .with_detail(serde_json::json!({ "ports": conflicts }))
            .into());
    }
    Ok(Json(serde_json::json!({})))
}

/// Whether the port can be bound on all host addresses right now.
fn port_free(port: u16, proto: &str) -> bool {
    if port == 0 {
        return true;
    }
    let addr = std::net::SocketAddr::from(([0, 0, 0, 0], port));
    match proto {
        "udp" => std::net::UdpSocket::bind(addr).is_ok(),
        _ => std::net::TcpListener::bind(addr).is_ok(),
    }
}

async fn health() -> Response {
    let body =
        serde_json::json!({"data": {"status": "healthy", "version": env!("CARGO_PKG_VERSION")}});
    let mut text = serde_json::to_string_pretty(&body).unwrap_or_default();
    text.push('\n');
    ([("content-type", "application/json")], text).into_response()
}

/// Prometheus text metrics.
async fn metrics(State(host): State<Arc<Host>>) -> Response {
    let st = host.status();
    let l = st.log;
    let mut out = String::new();
    for (name, help, v) in [
        (
            "flynn_host_log_lines_total",
            "Job output lines accepted for shipping.",
            l.lines,
        ),
        (
            "flynn_host_log_lines_shipped_total",
            "Lines written to the log aggregator.",
            l.shipped,
        ),
        (
            "flynn_host_log_lines_dropped_total",
            "Lines lost (buffer full while the aggregator was unreachable and not kept in the host's disk log, or lost in the job's pipe).",
            l.dropped,
        ),
        (
            "flynn_host_log_lines_requeued_total",
            "Lines the full buffer dropped that the host's disk log sends again.",
            l.requeued,
        ),
        (
            "flynn_host_log_lines_buffered",
            "Lines waiting for the aggregator.",
            l.buffered,
        ),
    ] {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {}\n{name} {v}\n",
            if name.ends_with("_total") { "counter" } else { "gauge" }));
    }
    out.push_str(
        "# HELP flynn_host_jobs Jobs known to the host by status.\n# TYPE flynn_host_jobs gauge\n",
    );
    for (status, n) in &st.jobs {
        out.push_str(&format!("flynn_host_jobs{{status=\"{status}\"}} {n}\n"));
    }
    out.push_str(&format!(
        "# HELP flynn_host_volumes Volumes on this host.\n# TYPE flynn_host_volumes gauge\nflynn_host_volumes {}\n",
        host.volumes().list().len()
    ));
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}
