//! The HTTP API (spec §2.3–§2.6): services, instances, metadata, leaders, SSE watches,
//! Raft management; plus the Raft RPC endpoints (`raft`).

// Handlers return `Result<Response, Response>` (the error is a ready response, as in
// axum's own examples); boxing it would only add an allocation per error.
#![allow(clippy::result_large_err)]

mod error;
mod extract;
mod raft;
mod serve;
mod sse;

pub use serve::serve;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use flynn_api::ApiError;
use md5::{Digest, Md5};
use openraft::error::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::raft::ReadPolicy;

use crate::node::Node;
use crate::store::types::{
    Command, Instance, Kinds, LeaderType, Rejection, ServiceConfig, ServiceMeta,
};
pub use error::ApiErr;
use extract::{decode, ApiBody, ApiPath};

type Res<T> = Result<T, ApiErr>;

/// Largest body of an API write (a registration, service config, metadata, leader): each
/// becomes one Raft entry, and [`crate::node::MAX_PAYLOAD_ENTRIES`] of them must fit in one
/// replication frame ([`crate::network::MAX_RPC_BODY`]) with room to spare, or a follower
/// behind by that many large entries could never be sent them (see `tests` below).
pub const WRITE_BODY_LIMIT: usize = 512 << 10;

/// Largest request head (request line and headers; a service name in the path is part of
/// an entry too). hyper's default, set explicitly for the bound above.
pub const MAX_REQUEST_HEAD: usize = 8192 + 4096 * 100;

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route(
            "/services/{service}",
            put(add_service).delete(remove_service).get(watch_service),
        )
        .route("/services/{service}/meta", put(set_meta).get(get_meta))
        .route("/services/{service}/instances", get(list_instances))
        .route(
            "/services/{service}/instances/{id}",
            put(add_instance).delete(remove_instance),
        )
        .route(
            "/services/{service}/leader",
            put(set_leader).get(get_leader),
        )
        .layer(DefaultBodyLimit::max(WRITE_BODY_LIMIT))
        .route("/ping", get(|| async { StatusCode::OK }))
        .route("/.well-known/status", get(status))
        .route("/shutdown", post(raft::shutdown))
        .merge(raft::routes(&node))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(|| async { ApiErr(ApiError::not_found("discoverd: not found")) })
        .layer(middleware::from_fn_with_state(node.clone(), edge))
        .with_state(node)
}

/// A known path with a method it does not serve: 405 (axum still adds `Allow`) with the
/// JSON envelope, as the host and log aggregator answer. Spec §0.1 has no code for 405, so
/// the body says `validation_error`, the code for a request this server will not take as
/// sent.
async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(ApiError::validation(None, "discoverd: method not allowed")),
    )
        .into_response()
}

/// Proxy redirects, the shutting-down gate and the `Discoverd-*` headers.
async fn edge(State(node): State<Arc<Node>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let internal = path.starts_with("/raft/rpc/")
        || path == "/raft/promote"
        || path == "/raft/demote"
        || path == "/shutdown"
        || path == "/ping"
        || path == "/.well-known/status"
        || path.starts_with("/debug/");
    if node.shutting_down.load(Ordering::Relaxed) && !path.starts_with("/raft/rpc/") {
        return ApiErr(ApiError::new(
            flynn_api::ErrorCode::ServiceUnavailable,
            "discoverd: shutting down",
        ))
        .into_response();
    }
    if !internal && !node.is_peer() {
        let peers = node.peer_addrs();
        if peers.is_empty() {
            return no_leader().into_response();
        }
        let peer = &peers[fastrand::usize(..peers.len())];
        return redirect(peer, req.uri());
    }
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&node.shared.applied_index().to_string()) {
        h.insert("discoverd-index", v);
    }
    if let Ok(v) = HeaderValue::from_str(&node.peer_addrs().join(",")) {
        h.insert("discoverd-peers", v);
    }
    resp
}

fn redirect(host: &str, uri: &Uri) -> Response {
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    let loc = format!("http://{host}{pq}");
    let mut r = StatusCode::TEMPORARY_REDIRECT.into_response();
    if let Ok(v) = HeaderValue::from_str(&loc) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// Plain reads from a node that has stopped following (no leader for a while; see
/// `Registry::stop_following`) are refused as its DNS answers SERVFAIL and its watches end:
/// its state no longer changes, and a stale leader or instance list read from it (by a
/// client, or by a proxy's DNS) would be taken for the cluster's.
fn check_following(node: &Node) -> Result<(), Response> {
    if node.shared.lock().registry.following() {
        Ok(())
    } else {
        Err(ApiErr(
            ApiError::new(
                flynn_api::ErrorCode::ServiceUnavailable,
                flynn_api::discoverd::NOT_FOLLOWING,
            )
            .with_retry(true),
        )
        .into_response())
    }
}

fn no_leader() -> ApiErr {
    ApiErr(
        ApiError::new(
            flynn_api::ErrorCode::ServiceUnavailable,
            flynn_api::discoverd::NO_LEADER,
        )
        .with_retry(true),
    )
}

/// Writes are handled on the Raft leader; elsewhere they are redirected to it.
fn leader_only(node: &Node, uri: &Uri) -> Result<(), Response> {
    if node.is_leader() {
        return Ok(());
    }
    match node.leader_addr() {
        Some(l) if l != node.host => Err(redirect(&l, uri)),
        _ => Err(no_leader().into_response()),
    }
}

/// Proposes a command; maps rejections and leader changes to responses.
async fn write(node: &Node, uri: &Uri, cmd: Command) -> Result<u64, Response> {
    let res = tokio::time::timeout(crate::node::APPLY_TIMEOUT, node.raft.client_write(cmd)).await;
    let Ok(res) = res else {
        // Not committed in time (a leader cut off from the others): it may still commit
        // later, so the client is told to retry, as for any unknown outcome.
        tracing::warn!(
            "raft write not applied within {:?}",
            crate::node::APPLY_TIMEOUT
        );
        return Err(ApiErr(
            ApiError::new(
                flynn_api::ErrorCode::ServiceUnavailable,
                "discoverd: write not applied in time",
            )
            .with_retry(true),
        )
        .into_response());
    };
    match res {
        Ok(r) => match r.data.rejected {
            None => Ok(r.data.index),
            Some(rej) => Err(ApiErr::from(rej).into_response()),
        },
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            match f.leader_node.map(|n| n.addr) {
                Some(addr) => Err(redirect(&addr, uri)),
                None => Err(no_leader().into_response()),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "raft write failed");
            Err(ApiErr(ApiError::unknown().with_retry(true)).into_response())
        }
    }
}

fn check_service(name: &str) -> Res<()> {
    if name.is_empty() {
        return Err(ApiErr(ApiError::validation(
            None,
            "discoverd: service must be set",
        )));
    }
    if !flynn_api::discoverd::valid_service_name(name) {
        return Err(ApiErr(ApiError::validation(
            None,
            "discoverd: service must be lowercase alphanumeric plus dash",
        )));
    }
    Ok(())
}

type Resp = Result<Response, Response>;

fn e(err: ApiErr) -> Response {
    err.into_response()
}

async fn add_service(
    State(node): State<Arc<Node>>,
    ApiPath(service): ApiPath<String>,
    uri: Uri,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Resp {
    check_service(&service).map_err(e)?;
    let config: ServiceConfig = decode(&headers, &body, true).map_err(e)?;
    leader_only(&node, &uri)?;
    write(&node, &uri, Command::AddService { service, config }).await?;
    Ok(StatusCode::OK.into_response())
}

async fn remove_service(
    State(node): State<Arc<Node>>,
    ApiPath(service): ApiPath<String>,
    uri: Uri,
) -> Resp {
    check_service(&service).map_err(e)?;
    leader_only(&node, &uri)?;
    write(&node, &uri, Command::RemoveService { service }).await?;
    Ok(StatusCode::OK.into_response())
}

async fn watch_service(State(node): State<Arc<Node>>, ApiPath(service): ApiPath<String>) -> Resp {
    check_service(&service).map_err(e)?;
    sse::stream(&node, &service, Kinds::ALL)
}

async fn set_meta(
    State(node): State<Arc<Node>>,
    ApiPath(service): ApiPath<String>,
    uri: Uri,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Resp {
    check_service(&service).map_err(e)?;
    let meta: ServiceMeta = decode(&headers, &body, true).map_err(e)?;
    // Numbers may write longer than they were sent (`1e15` is `1000000000000000.0`): the
    // entry, not only the body, stays within the limit.
    if extract::json_len(&meta.data) > WRITE_BODY_LIMIT {
        return Err(e(extract::too_big()));
    }
    leader_only(&node, &uri)?;
    let index = write(
        &node,
        &uri,
        Command::SetMeta {
            service,
            meta: meta.clone(),
        },
    )
    .await?;
    let stored = ServiceMeta {
        data: meta.data,
        leader_id: None,
        index,
    };
    Ok(Json(stored).into_response())
}

/// `?consistent=true` asks for a linearizable read (not in Flynn's API): it is served
/// by the Raft leader after a ReadIndex round (followers redirect), so it sees every
/// write acknowledged before it started. Plain reads are served from the local state.
fn wants_consistent(uri: &Uri) -> bool {
    uri.query().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv == "consistent" || kv == "consistent=true")
    })
}

async fn linearize(node: &Node, uri: &Uri) -> Result<(), Response> {
    linearize_with(node, uri, ReadPolicy::ReadIndex).await
}

/// Like [`linearize`] with `policy` (`LeaseRead`: the leader's lease, no round trip
/// while it holds).
async fn linearize_with(node: &Node, uri: &Uri, policy: ReadPolicy) -> Result<(), Response> {
    leader_only(node, uri)?;
    match node.raft.ensure_linearizable(policy).await {
        Ok(_) => Ok(()),
        Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => {
            match f.leader_node.map(|n| n.addr) {
                Some(addr) if addr != node.host => Err(redirect(&addr, uri)),
                _ => Err(no_leader().into_response()),
            }
        }
        Err(err) => {
            tracing::debug!(error = %err, "linearizable read failed");
            Err(no_leader().into_response())
        }
    }
}

async fn get_meta(
    State(node): State<Arc<Node>>,
    ApiPath(service): ApiPath<String>,
    uri: Uri,
) -> Resp {
    check_service(&service).map_err(e)?;
    if wants_consistent(&uri) {
        linearize(&node, &uri).await?;
    } else {
        check_following(&node)?;
    }
    // An unknown service has no meta either: the same 404 (spec §2.3).
    let st = node.shared.lock();
    match st.registry.data.metas.get(&service) {
        Some(m) => Ok(Json(m.clone()).into_response()),
        None => Err(e(ApiErr(ApiError::object_not_found(
            "service meta not found",
        )))),
    }
}

fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

async fn list_instances(
    State(node): State<Arc<Node>>,
    ApiPath(service): ApiPath<String>,
    headers: HeaderMap,
) -> Resp {
    check_service(&service).map_err(e)?;
    if wants_sse(&headers) {
        return sse::stream(&node, &service, Kinds::INSTANCES);
    }
    check_following(&node)?;
    let list = node.shared.lock().registry.instances(&service);
    if list.is_empty() {
        return Err(e(ApiErr(ApiError::object_not_found(format!(
            "service not found: {service:?}"
        )))));
    }
    Ok(Json(list).into_response())
}

/// `md5hex(proto + "-" + addr)` (spec §0.5).
pub fn instance_id(proto: &str, addr: &str) -> String {
    let d = Md5::digest(format!("{proto}-{addr}").as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// `host:port` as Go's `net.SplitHostPort` splits it (Flynn's check), with a host and a
/// port that is a number up to 65535: a host with colons (IPv6) must be in brackets
/// (`[::1]:80`), so `::1` or `fd00::1:80` are refused rather than taken apart at their
/// last colon.
fn valid_addr(addr: &str) -> bool {
    let bracketed = addr.starts_with('[');
    let split = match addr.strip_prefix('[') {
        Some(rest) => rest
            .split_once(']')
            .and_then(|(host, after)| Some((host, after.strip_prefix(':')?))),
        None => addr.split_once(':'),
    };
    let Some((host, port)) = split else {
        return false;
    };
    !host.is_empty()
        && !host.contains(['[', ']'])
        && (bracketed || !host.contains(':'))
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok()
}

fn check_instance(inst: &Instance, path_id: &str) -> Res<()> {
    let v = |m: &str| Err(ApiErr(ApiError::validation(None, m)));
    if inst.proto.is_empty() {
        return v("discoverd: proto must be set");
    }
    if !inst
        .proto
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return v("discoverd: proto must be lowercase alphanumeric");
    }
    if !valid_addr(&inst.addr) {
        return v("discoverd: addr must be in the form host:port");
    }
    let expected = instance_id(&inst.proto, &inst.addr);
    if inst.id != expected {
        return v(&format!(
            "discoverd: instance id is incorrect, expected {expected}"
        ));
    }
    if path_id != inst.id {
        return v("discoverd: instance id does not match the path");
    }
    Ok(())
}

/// Whether `holds()` about the state, a `false` only once this leader has applied what was
/// committed before it answers: a leader elected a moment ago may not have applied its
/// predecessor's last writes (a service's creation among them). The ReadIndex round is paid
/// by refusals only.
async fn holds_when_applied(
    node: &Node,
    uri: &Uri,
    holds: impl Fn() -> bool,
) -> Result<bool, Response> {
    if holds() {
        return Ok(true);
    }
    linearize(node, uri).await?;
    Ok(holds())
}

async fn add_instance(
    State(node): State<Arc<Node>>,
    ApiPath((service, id)): ApiPath<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Resp {
    check_service(&service).map_err(e)?;
    let mut inst: Instance = decode(&headers, &body, false).map_err(e)?;
    check_instance(&inst, &id).map_err(e)?;
    leader_only(&node, &uri)?;
    inst.index = 0;
    let known = || {
        node.shared
            .lock()
            .registry
            .data
            .services
            .contains_key(&service)
    };
    if !holds_when_applied(&node, &uri, known).await? {
        return Err(e(ApiErr::from(Rejection::ServiceNotFound(service))));
    }
    // Recorded before the state is read: an expiry decided from now on sees the instance
    // alive, and one decided earlier has been applied, so the state read below is the
    // one to answer from (an instance expired meanwhile is registered again). A heartbeat
    // is held while an expiry naming the instance is being written. Recorded before the
    // write, too: a new instance becomes visible (and subject to expiry) when the write
    // applies, before the write returns here; and the write may take longer than the
    // TTL, so the instance counts as alive until it returns (`registering`).
    while let Err(expiry_applied) = node.heartbeat(&service, &id) {
        expiry_applied.await;
    }
    let _registering = node.registering(&service, &id);
    let unchanged = || {
        node.shared
            .lock()
            .registry
            .instance(&service, &inst.id)
            .is_some_and(|old| old.same_as(&inst))
    };
    if unchanged() {
        // A heartbeat with nothing changed touches only the leader's memory, and only
        // while this node's leader lease holds: a leader cut off from the others still
        // thinks it leads until it hears a higher vote, and must not acknowledge
        // heartbeats the majority's new leader never sees (it would expire the instance
        // meanwhile).
        linearize_with(&node, &uri, ReadPolicy::LeaseRead).await?;
        // That read may have waited for this leader's first commit, which also applies
        // what the previous leader left (an expiry of this instance among it): answer
        // only if the instance is still there, else register it again below.
        if unchanged() {
            return Ok(StatusCode::OK.into_response());
        }
    }
    write(
        &node,
        &uri,
        Command::AddInstance {
            service: service.clone(),
            instance: inst,
        },
    )
    .await?;
    Ok(StatusCode::OK.into_response())
}

async fn remove_instance(
    State(node): State<Arc<Node>>,
    ApiPath((service, id)): ApiPath<(String, String)>,
    uri: Uri,
) -> Resp {
    check_service(&service).map_err(e)?;
    leader_only(&node, &uri)?;
    write(
        &node,
        &uri,
        Command::RemoveInstance {
            service: service.clone(),
            id: id.clone(),
        },
    )
    .await?;
    node.forget(&service, &id);
    Ok(StatusCode::OK.into_response())
}

#[derive(serde::Deserialize)]
struct LeaderBody {
    /// `null` as missing: the empty id.
    #[serde(default)]
    id: Option<String>,
}

async fn set_leader(
    State(node): State<Arc<Node>>,
    ApiPath(service): ApiPath<String>,
    uri: Uri,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Resp {
    check_service(&service).map_err(e)?;
    let b: LeaderBody = decode(&headers, &body, true).map_err(e)?;
    leader_only(&node, &uri)?;
    let manual = || {
        node.shared
            .lock()
            .registry
            .data
            .services
            .get(&service)
            .is_some_and(|c| c.leader_type == LeaderType::Manual)
    };
    // A missing service is refused too (Flynn: `config == nil || not manual`).
    if !holds_when_applied(&node, &uri, manual).await? {
        return Err(e(ApiErr(ApiError::validation(
            None,
            "service leader election type is not manual",
        ))));
    }
    let id = b.id.unwrap_or_default();
    write(&node, &uri, Command::SetLeader { service, id }).await?;
    Ok(StatusCode::OK.into_response())
}

async fn get_leader(
    State(node): State<Arc<Node>>,
    ApiPath(service): ApiPath<String>,
    headers: HeaderMap,
) -> Resp {
    check_service(&service).map_err(e)?;
    if wants_sse(&headers) {
        return sse::stream(&node, &service, Kinds::LEADER);
    }
    check_following(&node)?;
    match node.shared.lock().registry.leader(&service) {
        Some(l) => Ok(Json(l).into_response()),
        None => Err(e(ApiErr(ApiError::object_not_found("no leader found")))),
    }
}

async fn status(State(node): State<Arc<Node>>) -> Response {
    let learners = node.learner_addrs();
    let detail = serde_json::json!({
        "host": node.host,
        "leader": node.leader_addr(),
        "index": node.shared.applied_index(),
        "term": node.term(),
        "learners": learners,
    });
    let body = flynn_api::Status::healthy(env!("CARGO_PKG_VERSION"), Some(detail));
    let mut text = serde_json::to_string_pretty(&body).unwrap_or_default();
    text.push('\n');
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(text),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full AppendEntries batch of the largest entries the API can make fits in one
    /// replication frame, twice over: the service name (path) and the instance or meta
    /// body are each within their limit, plus the command's own fields.
    #[test]
    fn a_batch_of_the_largest_entries_fits_in_a_frame() {
        const ENTRY_FIELDS: usize = 1024;
        let entry = WRITE_BODY_LIMIT + MAX_REQUEST_HEAD + ENTRY_FIELDS;
        let batch = crate::node::MAX_PAYLOAD_ENTRIES as usize * entry;
        assert!(
            2 * batch <= crate::network::stream::MAX_FRAME,
            "{batch} bytes per batch"
        );
        assert_eq!(
            crate::network::stream::MAX_FRAME,
            crate::network::MAX_RPC_BODY
        );
    }

    #[test]
    fn instance_addresses_split_as_go_splits_them() {
        for good in [
            "127.0.0.1:80",
            "10.0.0.1:0",
            "web.example:65535",
            "[::1]:80",
            "[fd00::1]:8080",
            "[fe80::1%eth0]:1",
            "localhost:00080",
        ] {
            assert!(valid_addr(good), "{good} refused");
        }
        for bad in [
            "::1",
            "fd00::1:80",
            "::1:80",
            "[::1]",
            "[::1]80",
            "[::1]:",
            "[]:80",
            "[[::1]]:80",
            "a]:80",
            "[a:80",
            ":80",
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:65536",
            "127.0.0.1:+80",
            "127.0.0.1:-1",
            "127.0.0.1:8 0",
            "127.0.0.1:80:90",
            "",
        ] {
            assert!(!valid_addr(bad), "{bad} accepted");
        }
    }
}
