//! Raft endpoints: the RPCs peers send each other (`/raft/rpc/*`) and the management
//! API (leader, peers, promote/demote, shutdown).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use flynn_api::ApiError;
use openraft::alias::SnapshotOf;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{BasicNode, ChangeMembers};
use serde_json::json;

use super::{leader_only, no_leader, ApiErr};
use crate::network::{node_id, SnapshotRequest};
use crate::node::Node;
use crate::store::TypeConfig;

type C = TypeConfig;

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/raft/rpc/append", post(append))
        .route("/raft/rpc/vote", post(vote))
        .route("/raft/rpc/snapshot", post(snapshot))
        .route("/raft/leader", get(leader))
        .route("/raft/peers", get(peers))
        .route("/raft/peers/{peer}", put(add_peer).delete(remove_peer))
        .route("/raft/promote", post(promote))
        .route("/raft/demote", post(demote))
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "raft rpc failed");
    StatusCode::INTERNAL_SERVER_ERROR.into_response()
}

async fn append(
    State(node): State<Arc<Node>>,
    Json(req): Json<AppendEntriesRequest<C>>,
) -> Response {
    match node.raft.append_entries(req).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => internal(e),
    }
}

async fn vote(State(node): State<Arc<Node>>, Json(req): Json<VoteRequest<C>>) -> Response {
    match node.raft.vote(req).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => internal(e),
    }
}

async fn snapshot(State(node): State<Arc<Node>>, Json(req): Json<SnapshotRequest>) -> Response {
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

async fn add_peer(State(node): State<Arc<Node>>, Path(peer): Path<String>, uri: Uri) -> Response {
    if let Err(r) = leader_only(&node, &uri) {
        return r;
    }
    let id = node_id(&peer);
    if let Err(e) = node
        .raft
        .add_learner(id, BasicNode { addr: peer.clone() }, true)
        .await
    {
        return failed(e);
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
    Path(peer): Path<String>,
    uri: Uri,
) -> Response {
    if let Err(r) = leader_only(&node, &uri) {
        return r;
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
    match node.http.request(method, url).send().await {
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

/// Stops serving: answers 503 from now on; returns the last index for a successor.
pub async fn shutdown(State(node): State<Arc<Node>>) -> Response {
    node.shutting_down.store(true, Ordering::Relaxed);
    let last = node.log.last_index();
    Json(json!({ "last_index": last })).into_response()
}
