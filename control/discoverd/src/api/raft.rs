//! Raft endpoints: the RPCs peers send each other (`/raft/rpc/*`) and the management
//! API (leader, peers, promote/demote, shutdown).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use flynn_api::ApiError;
use openraft::alias::SnapshotOf;
use openraft::raft::{AppendEntriesRequest, VoteRequest, VoteResponse};
use openraft::{BasicNode, ChangeMembers};
use serde_json::json;

use super::extract::{ApiJson, ApiPath};
use super::{leader_only, no_leader, ApiErr};
use crate::fault::FROM_HEADER;
use crate::network::{node_id, stream, SnapshotRequest};
use crate::node::Node;
use crate::store::state::Data;
use crate::store::TypeConfig;

type C = TypeConfig;

/// Largest full-snapshot or AppendEntries body accepted from a peer.
pub const SNAPSHOT_BODY_LIMIT: usize = crate::network::MAX_RPC_BODY;

pub fn routes(node: &Node) -> Router<Arc<Node>> {
    let r = Router::new()
        .route(stream::PATH, post(open_stream))
        .route("/raft/rpc/vote", post(vote))
        .route("/raft/rpc/pre-vote", post(pre_vote))
        // A full snapshot is the whole state as JSON: past axum's default 2 MB body limit
        // for any real cluster.
        .route(
            "/raft/rpc/snapshot",
            post(snapshot).layer(DefaultBodyLimit::max(SNAPSHOT_BODY_LIMIT)),
        )
        .route(
            "/raft/rpc/append",
            post(append).layer(DefaultBodyLimit::max(SNAPSHOT_BODY_LIMIT)),
        )
        .route("/raft/leader", get(leader))
        .route("/raft/peers", get(peers))
        .route("/raft/peers/{peer}", put(add_peer).delete(remove_peer))
        .route("/raft/promote", post(promote))
        .route("/raft/demote", post(demote));
    if node.faults.enabled() {
        r.route("/debug/partition", post(partition).get(partitioned))
    } else {
        r
    }
}

/// True when the RPC comes from a peer this node is (test-only) partitioned from.
fn dropped(node: &Node, headers: &HeaderMap) -> bool {
    headers
        .get(FROM_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|from| node.faults.is_cut(from))
}

#[derive(serde::Deserialize)]
struct Partition {
    #[serde(default)]
    peers: Vec<String>,
}

/// `POST /debug/partition` (only with `--enable-fault-injection`): cut Raft RPCs to and
/// from `peers`; an empty list heals.
async fn partition(State(node): State<Arc<Node>>, ApiJson(p): ApiJson<Partition>) -> Response {
    tracing::warn!(peers = ?p.peers, "fault injection: raft partition set");
    node.faults.partition(p.peers);
    Json(json!({ "peers": node.faults.cut_peers() })).into_response()
}

async fn partitioned(State(node): State<Arc<Node>>) -> Response {
    Json(json!({ "peers": node.faults.cut_peers() })).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "raft rpc failed");
    StatusCode::INTERNAL_SERVER_ERROR.into_response()
}

async fn append(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<AppendEntriesRequest<C>>,
) -> Response {
    if dropped(&node, &headers) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    node.heard_from_leader();
    match node.raft.append_entries(req).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => internal(e),
    }
}

/// `POST /raft/rpc/stream` with `Upgrade: flynn-raft-append`: a leader's pipelined
/// AppendEntries stream (`network::stream`).
async fn open_stream(State(node): State<Arc<Node>>, mut req: axum::extract::Request) -> Response {
    let headers = req.headers();
    if dropped(&node, headers) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let wants = headers
        .get(axum::http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(stream::PROTOCOL));
    if !wants {
        return ApiErr(ApiError::validation(
            None,
            "raft stream: Upgrade: flynn-raft-append required",
        ))
        .into_response();
    }
    let from = headers
        .get(FROM_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(up) => stream::serve(node, from, hyper_util::rt::TokioIo::new(up)).await,
            Err(e) => tracing::debug!(error = %e, "raft stream upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(axum::http::header::CONNECTION, "upgrade")
        .header(axum::http::header::UPGRADE, stream::PROTOCOL)
        .body(axum::body::Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn vote(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<VoteRequest<C>>,
) -> Response {
    ballot(&node, &headers, node.raft.vote(req)).await
}

/// Whether this node would grant a vote (Raft's Pre-Vote): nothing is changed here.
async fn pre_vote(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<VoteRequest<C>>,
) -> Response {
    ballot(&node, &headers, node.raft.pre_vote(req)).await
}

/// A peer's vote or pre-vote request, answered by `answer` unless the peer is partitioned
/// away (fault injection).
async fn ballot(
    node: &Node,
    headers: &HeaderMap,
    answer: impl std::future::Future<Output = Result<VoteResponse<C>, impl std::fmt::Display>>,
) -> Response {
    if dropped(node, headers) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    // Before openraft sees it: a campaign under way holds back `campaign_at_lease_end`.
    node.heard_ballot();
    match answer.await {
        Ok(r) => Json(r).into_response(),
        Err(e) => internal(e),
    }
}

async fn snapshot(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<SnapshotRequest>,
) -> Response {
    if dropped(&node, &headers) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    // A snapshot never holds an entry of a later leader than the one sending it: openraft
    // asserts that (and its Raft stops for good on the panic), so such a request (a bug,
    // or a stray request from another cluster) is refused here.
    if let Some(last) = &req.meta.last_log_id {
        let sender = openraft::vote::RaftLeaderId::to_committed(req.vote.leader_id());
        if last.leader_id > sender {
            tracing::warn!(last = %last, vote = %req.vote, "snapshot rpc refused: its last entry is of a later leader than its sender");
            return ApiErr(ApiError::validation(
                None,
                "raft snapshot: the last log id's leader is above the request's vote",
            ))
            .into_response();
        }
        // openraft also asserts (`FollowingHandler::install_full_snapshot`) that a snapshot
        // newer than this node's commit point ends at a higher index: an equal or lower one
        // contradicts entries committed here. A snapshot at or below the commit point is
        // ignored there, not asserted on. The commit point is read from openraft's own
        // state, as its check does; it may move on before the request reaches the core, but
        // in a working cluster only along the snapshot's own chain (like the check above,
        // this one is for a request no correct leader sends).
        let committed = node
            .raft
            .with_raft_state(|st| st.local_committed().cloned())
            .await;
        let committed = match committed {
            Ok(c) => c,
            Err(e) => return internal(e),
        };
        if let Some(committed) = committed {
            if *last > committed && last.index <= committed.index {
                tracing::warn!(last = %last, committed = %committed, "snapshot rpc refused: newer than the commit point but not past its index");
                return ApiErr(ApiError::validation(
                    None,
                    "raft snapshot: the last log id is newer than this node's commit point but not at a higher index",
                ))
                .into_response();
            }
        }
    }
    // openraft takes a state machine's failure to install a snapshot as a storage error
    // and stops this node's Raft for good: data that does not decode is refused here.
    let decoded = tokio::task::spawn_blocking(move || {
        let ok = serde_json::from_slice::<Data>(&req.data).is_ok();
        (req, ok)
    })
    .await;
    let req = match decoded {
        Ok((req, true)) => req,
        Ok((_, false)) => {
            tracing::warn!("snapshot rpc refused: its data does not decode");
            return ApiErr(ApiError::validation(
                None,
                "raft snapshot: data does not decode as the registry",
            ))
            .into_response();
        }
        Err(e) => return internal(e),
    };
    node.heard_from_leader();
    let snap = SnapshotOf::<C, Vec<u8>> {
        meta: req.meta,
        snapshot: req.data,
    };
    match node.raft.install_full_snapshot(req.vote, snap).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => internal(e),
    }
}

async fn leader(State(node): State<Arc<Node>>) -> Response {
    match node.leader_addr() {
        Some(host) => Json(json!({ "host": host })).into_response(),
        None => no_leader().into_response(),
    }
}

async fn peers(State(node): State<Arc<Node>>) -> Response {
    Json(node.peer_addrs()).into_response()
}

fn failed(e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "membership change failed");
    ApiErr(ApiError::unknown().with_retry(true)).into_response()
}

async fn add_peer(
    State(node): State<Arc<Node>>,
    ApiPath(peer): ApiPath<String>,
    uri: Uri,
) -> Response {
    if let Err(e) = check_peer(&peer) {
        return ApiErr(e).into_response();
    }
    if let Err(r) = leader_only(&node, &uri) {
        return r;
    }
    // Run to its end even if the client goes away meanwhile (hyper drops a handler whose
    // client closed): otherwise a peer added as a learner would neither be promoted nor
    // taken out again.
    match tokio::spawn(add_voter(node, peer)).await {
        Ok(r) => r,
        Err(e) => failed(e),
    }
}

async fn add_voter(node: Arc<Node>, peer: String) -> Response {
    let id = node_id(&peer);
    // A voter already: adding it again changes nothing. A learner left from an attempt
    // that did not finish counts as new (it is taken out again if it does not catch up).
    let voter = node.peer_addrs().contains(&peer);
    let added = match node
        .raft
        .add_learner(id, BasicNode { addr: peer.clone() }, false)
        .await
    {
        Ok(r) => r.log_id.index,
        Err(e) => return failed(e),
    };
    // Caught up to the membership that adds it before it may vote. A peer that never
    // answers (a mistyped address) would be waited for forever and stay a learner that
    // the leader keeps replicating to: it is taken out again, unless it was there before.
    let answered = wait_for_learner(&node, id, PEER_ANSWER, |_| true).await;
    let caught_up =
        answered && wait_for_learner(&node, id, PEER_CATCH_UP, |matched| matched >= added).await;
    if !caught_up {
        if !voter {
            let gone = node
                .raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await;
            if let Err(e) = gone {
                tracing::warn!(%peer, error = %e, "removing a learner that did not catch up");
            }
        }
        let why = if answered {
            format!("did not catch up within {} s", PEER_CATCH_UP.as_secs())
        } else {
            format!("did not answer within {} s", PEER_ANSWER.as_secs())
        };
        return ApiErr(
            ApiError::new(
                flynn_api::ErrorCode::ServiceUnavailable,
                format!("discoverd: peer {peer} {why}; not added"),
            )
            .with_retry(true),
        )
        .into_response();
    }
    match node
        .raft
        .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
        .await
    {
        Ok(r) => Json(json!({ "last_index": r.log_id.index })).into_response(),
        Err(e) => failed(e),
    }
}

async fn remove_peer(
    State(node): State<Arc<Node>>,
    ApiPath(peer): ApiPath<String>,
    uri: Uri,
) -> Response {
    if let Err(e) = check_peer(&peer) {
        return ApiErr(e).into_response();
    }
    if let Err(r) = leader_only(&node, &uri) {
        return r;
    }
    // Not a member: a 404, not openraft's membership error as a 500 to retry.
    if !node.peer_addrs().contains(&peer) {
        return ApiErr(ApiError::object_not_found(format!(
            "discoverd: {peer} is not a peer"
        )))
        .into_response();
    }
    let id = node_id(&peer);
    match node
        .raft
        .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
        .await
    {
        Ok(r) => Json(json!({ "last_index": r.log_id.index })).into_response(),
        Err(e) => failed(e),
    }
}

/// How long a peer being added has to answer the leader's replication at all.
const PEER_ANSWER: std::time::Duration = std::time::Duration::from_secs(10);
/// And then to catch up to the membership entry that adds it.
const PEER_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether the leader's replication to learner `id` reaches a matched index for which
/// `enough` holds within `limit`.
async fn wait_for_learner(
    node: &Node,
    id: u64,
    limit: std::time::Duration,
    enough: impl Fn(u64) -> bool + Send + Sync,
) -> bool {
    node.raft
        .wait(Some(limit))
        .metrics(
            |m| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(&id))
                    .and_then(|matched| matched.as_ref())
                    .is_some_and(|l| enough(l.index))
            },
            "learner replication",
        )
        .await
        .is_ok()
}

/// A peer is `host:port`, as `--peers` names them.
fn check_peer(peer: &str) -> Result<(), ApiError> {
    let ok = peer.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && port.parse::<u16>().is_ok_and(|p| p != 0)
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':'))
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::validation(Some("peer"), "must be host:port"))
    }
}

/// Asks the cluster's leader (through any peer, following redirects) to change this
/// node's membership.
async fn ask_leader(node: &Node, method: reqwest::Method) -> Response {
    let peers: Vec<String> = node
        .peer_addrs()
        .into_iter()
        .filter(|p| *p != node.host)
        .collect();
    let target = node.leader_addr().filter(|l| *l != node.host);
    let Some(via) = target.or_else(|| peers.first().cloned()) else {
        return no_leader().into_response();
    };
    let url = format!("http://{via}/raft/peers/{}", node.host);
    // Longer than the leader's own wait for a new peer (10 s to answer, 60 s to catch up).
    let wait = PEER_ANSWER + PEER_CATCH_UP + std::time::Duration::from_secs(10);
    match node.http.request(method, url).timeout(wait).send().await {
        Ok(r) => {
            let status = StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::OK);
            let body = r.bytes().await.unwrap_or_default();
            (status, [("content-type", "application/json")], body).into_response()
        }
        Err(e) => failed(e),
    }
}

async fn promote(State(node): State<Arc<Node>>) -> Response {
    if node.is_peer() {
        return StatusCode::OK.into_response();
    }
    ask_leader(&node, reqwest::Method::PUT).await
}

async fn demote(State(node): State<Arc<Node>>) -> Response {
    if !node.is_peer() {
        return StatusCode::OK.into_response();
    }
    if node.is_leader() {
        let id = node.id;
        return match node
            .raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
            .await
        {
            Ok(r) => Json(json!({ "last_index": r.log_id.index })).into_response(),
            Err(e) => failed(e),
        };
    }
    ask_leader(&node, reqwest::Method::DELETE).await
}

/// Stops serving: answers 503 from now on and closes the store (Raft stops, so a
/// leader hands over to the remaining peers); returns the last log index for a
/// successor to catch up to.
pub async fn shutdown(State(node): State<Arc<Node>>) -> Response {
    node.shutting_down.store(true, Ordering::Relaxed);
    if let Err(e) = node.raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    // The state stops here: open watches (and new ones) end rather than go quiet for good.
    node.shared.lock().registry.stop_following();
    let last = node.log.last_index();
    Json(json!({ "last_index": last })).into_response()
}
