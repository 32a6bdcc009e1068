//! Raft RPC over HTTP on the API port: JSON bodies POSTed to `/raft/rpc/{append,vote,
//! snapshot}` (the server side is in `api::raft`); replication sessions pipeline their
//! AppendEntries over one upgraded connection each (`stream`).

pub mod stream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use openraft::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend, RaftNetworkFactory, RaftNetworkV2};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::fault::{Faults, FROM_HEADER};
use crate::store::TypeConfig;

type C = TypeConfig;

/// A node's Raft id, derived from its advertised `host:port` so every node computes the
/// same id for a peer without coordination.
pub fn node_id(addr: &str) -> u64 {
    match addr.parse::<SocketAddr>() {
        Ok(SocketAddr::V4(a)) => (u64::from(u32::from(*a.ip())) << 16) | u64::from(a.port()),
        _ => {
            // FNV-1a for names and IPv6, with the top bit set to stay clear of IPv4 ids.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in addr.as_bytes() {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            h | (1 << 63)
        }
    }
}

/// The least time an AppendEntries RPC is given. openraft offers the heartbeat interval
/// (33 ms by default) as the RPC's TTL, but a follower answers only after its fsync, and
/// on a busy machine one fsync or one scheduling delay can take longer than that: the
/// request then timed out although the follower went on to store the entries, the
/// leader sent them again, and a write waiting for that follower's ack waited for the
/// retry (both followers of a 3-node cluster timing out together stalled the write).
/// A follower that is really gone is found by its refused connection, its partition or
/// the missing heartbeat answers, not by this timeout.
const APPEND_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest Raft RPC body or stream frame accepted from a peer (256 MiB: a discoverd state of
/// tens of MiB as JSON, with room; the port is open to anyone, so not unbounded).
pub const MAX_RPC_BODY: usize = 256 << 20;

/// How long a full-snapshot RPC of `len` bytes may take: at least 10 s, and 1 s more per
/// 4 MiB, since the follower parses, installs and fsyncs the whole state before it answers
/// (a fixed limit would time a large state out on every attempt, and that follower would
/// never catch up).
fn snapshot_timeout(ttl: Duration, len: usize) -> Duration {
    let per_size = Duration::from_secs((len >> 22) as u64);
    ttl.max(Duration::from_secs(10)) + per_size
}

/// The transport's limit for a vote RPC given openraft's `ttl` (the shortest election
/// timeout, 100 ms by default): at least [`APPEND_TIMEOUT`], as the voter fsyncs before it
/// answers. It has no effect end to end today: openraft wraps each vote call in
/// `C::timeout(ttl, ..)` on its side (`spawn_parallel_vote_requests`), so the call is
/// dropped at `ttl` before this longer limit is reached, and a voter slower than the
/// election timeout does not count whatever this says. Kept because it is harmless (the
/// dropped call cancels the request) and right should openraft stop cutting votes there.
fn vote_timeout(ttl: Duration) -> Duration {
    ttl.max(APPEND_TIMEOUT)
}

/// The body of a full-snapshot RPC.
#[derive(Serialize, Deserialize)]
pub struct SnapshotRequest {
    pub vote: VoteOf<C>,
    pub meta: SnapshotMetaOf<C>,
    /// The registry as JSON, embedded as a JSON value (see `store::json_bytes`).
    #[serde(with = "crate::store::json_bytes")]
    pub data: Vec<u8>,
}

#[derive(Clone)]
pub struct Network {
    http: reqwest::Client,
    /// Idle replication-stream connections, shared by every session to a peer.
    pool: stream::Pool,
    /// This node's advertised address, sent with every RPC (see `fault::FROM_HEADER`).
    host: String,
    faults: Arc<Faults>,
}

impl Network {
    pub fn new(host: String, faults: Arc<Faults>) -> Network {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            // Under the peers' 30 s idle close (the API server's header read timeout), so
            // the pool lets a connection go before a peer does.
            .pool_idle_timeout(Duration::from_secs(20))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Network {
            http,
            pool: stream::Pool::default(),
            host,
            faults,
        }
    }
}

impl RaftNetworkFactory<C> for Network {
    type Network = Conn;

    async fn new_client(&mut self, _target: u64, node: &BasicNode) -> Conn {
        Conn {
            http: self.http.clone(),
            pool: self.pool.clone(),
            addr: node.addr.clone(),
            host: self.host.clone(),
            faults: self.faults.clone(),
        }
    }
}

pub struct Conn {
    http: reqwest::Client,
    pool: stream::Pool,
    addr: String,
    host: String,
    faults: Arc<Faults>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct RpcFailure(String);

impl Conn {
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<C>> {
        self.try_call(path, req, timeout)
            .await?
            .map_err(|status| self.refused(status))
    }

    /// A peer's answer other than 2xx, as an error.
    fn refused(&self, status: reqwest::StatusCode) -> RPCError<C> {
        let msg = format!("{} answered {status}", self.addr);
        RPCError::Unreachable(Unreachable::new(&RpcFailure(msg)))
    }

    /// [`Conn::call`], with a status other than 2xx returned as it is.
    async fn try_call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Result<Resp, reqwest::StatusCode>, RPCError<C>> {
        if self.faults.is_cut(&self.addr) {
            let msg = format!("{} is partitioned away (fault injection)", self.addr);
            return Err(RPCError::Unreachable(Unreachable::new(&RpcFailure(msg))));
        }
        let url = format!("http://{}/raft/rpc/{path}", self.addr);
        let resp = self
            .http
            .post(url)
            .timeout(timeout)
            .header(FROM_HEADER, &self.host)
            .json(req)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    RPCError::Network(NetworkError::new(&e))
                }
            })?;
        if !resp.status().is_success() {
            return Ok(Err(resp.status()));
        }
        resp.json()
            .await
            .map(Ok)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

impl RaftNetworkV2<C> for Conn {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        let timeout = option.hard_ttl().max(APPEND_TIMEOUT);
        self.call("append", &rpc, timeout).await
    }

    fn stream_append<'s, S>(&'s mut self, input: S, option: RPCOption) -> stream::Opened<'s>
    where
        S: Stream<Item = AppendEntriesRequest<C>> + OptionalSend + Unpin + 'static,
    {
        let target = stream::Target {
            http: self.http.clone(),
            pool: self.pool.clone(),
            addr: self.addr.clone(),
            host: self.host.clone(),
            faults: self.faults.clone(),
            timeout: APPEND_TIMEOUT,
        };
        stream::open(target, input, option)
    }

    /// A (real) vote: the voter answers only once it has saved its vote, behind the appends
    /// queued before it (`store::log`, `Op::Vote`: up to three fsyncs, after the batch
    /// running when it came), so it gets [`vote_timeout`], which openraft's own cut at the
    /// TTL makes moot for now (see there). Pre-Vote saves nothing and keeps openraft's TTL.
    async fn vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        self.call("vote", &rpc, vote_timeout(option.hard_ttl()))
            .await
    }

    /// Raft's Pre-Vote: would the peer grant a vote at the next term? A peer that does not
    /// know the RPC (404: an older build, during a rolling upgrade) counts as granting, as
    /// openraft does for a network without Pre-Vote, so such a cluster still elects.
    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        match self.try_call("pre-vote", &rpc, option.hard_ttl()).await? {
            Ok(r) => Ok(r),
            Err(reqwest::StatusCode::NOT_FOUND) => Ok(VoteResponse::new(rpc.vote, None, true)),
            Err(status) => Err(self.refused(status)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, Vec<u8>>,
        _cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let timeout = snapshot_timeout(option.hard_ttl(), snapshot.snapshot.len());
        let req = SnapshotRequest {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot,
        };
        Ok(self.call("snapshot", &req, timeout).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::node_id;

    #[test]
    fn a_large_snapshot_is_given_time_for_its_size() {
        use std::time::Duration;
        let ttl = Duration::from_millis(50);
        assert_eq!(super::snapshot_timeout(ttl, 1000), Duration::from_secs(10));
        assert_eq!(
            super::snapshot_timeout(ttl, 200 << 20),
            Duration::from_secs(60)
        );
        let long = Duration::from_secs(30);
        assert_eq!(
            super::snapshot_timeout(long, 8 << 20),
            Duration::from_secs(32)
        );
    }

    /// A peer that does not know the Pre-Vote RPC (an older build during a rolling upgrade:
    /// 404) counts as granting; any other refusal is an error, never a grant.
    #[tokio::test]
    async fn a_peer_without_pre_vote_counts_as_granting() {
        use openraft::{BasicNode, RaftNetworkFactory, RaftNetworkV2};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            for status in ["404 Not Found", "500 Internal Server Error"] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = vec![0u8; 1 << 16];
                let _ = s.read(&mut buf).await;
                let head =
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = s.write_all(head.as_bytes()).await;
            }
        });
        let faults = std::sync::Arc::new(crate::fault::Faults::new(false));
        let mut net = super::Network::new("127.0.0.1:1".into(), faults);
        let mut conn = net.new_client(2, &BasicNode { addr }).await;
        let vote = openraft::alias::VoteOf::<super::C>::new(3, 1);
        let req = openraft::raft::VoteRequest::new(vote, None);
        let opt = || openraft::network::RPCOption::new(std::time::Duration::from_secs(5));
        let granted = conn
            .pre_vote(req.clone(), opt())
            .await
            .expect("404 is a grant");
        assert!(granted.vote_granted);
        assert!(conn.pre_vote(req, opt()).await.is_err(), "500 is no grant");
    }

    /// A voter answers a vote only after saving it (fsyncs queued behind the writer's
    /// running batch), which can take longer than openraft's TTL (the shortest election
    /// timeout); a Pre-Vote saves nothing and keeps the TTL.
    #[tokio::test]
    async fn a_vote_is_given_time_for_the_voters_fsync_and_a_pre_vote_is_not() {
        use openraft::{BasicNode, RaftNetworkFactory, RaftNetworkV2};
        use std::time::Duration;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        assert_eq!(
            super::vote_timeout(Duration::from_millis(100)),
            super::APPEND_TIMEOUT
        );
        assert_eq!(
            super::vote_timeout(Duration::from_secs(3)),
            Duration::from_secs(3)
        );
        let vote = openraft::alias::VoteOf::<super::C>::new(3, 1);
        let answer = serde_json::to_string(&openraft::raft::VoteResponse::<super::C>::new(
            vote, None, true,
        ))
        .unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 1 << 16];
                    let _ = s.read(&mut buf).await;
                    // The voter's fsyncs.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                        answer.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                });
            }
        });
        let faults = std::sync::Arc::new(crate::fault::Faults::new(false));
        let mut net = super::Network::new("127.0.0.1:1".into(), faults);
        let mut conn = net.new_client(2, &BasicNode { addr }).await;
        let req = openraft::raft::VoteRequest::new(vote, None);
        let opt = || openraft::network::RPCOption::new(Duration::from_millis(100));
        let r = conn
            .vote(req.clone(), opt())
            .await
            .expect("the vote's answer");
        assert!(r.vote_granted);
        assert!(conn.pre_vote(req, opt()).await.is_err(), "pre-vote waited");
    }

    #[test]
    fn node_ids_are_distinct_per_address() {
        let a = node_id("127.0.0.1:1111");
        let b = node_id("127.0.0.2:1111");
        let c = node_id("127.0.0.1:1112");
        assert!(a != b && b != c && a != c);
        assert_eq!(a, node_id("127.0.0.1:1111"));
        assert_ne!(node_id("host1:1111"), node_id("host2:1111"));
    }
}
