//! etcd's native gRPC API, the way etcd's own clients use it: one HTTP/2 connection per
//! member (tonic's `Channel`), unary `KV.Txn` / `KV.Put` / `KV.Range` / `KV.DeleteRange` /
//! `Lease.LeaseGrant` / `Lease.LeaseRevoke`, `Lease.LeaseKeepAlive` as one long-lived bidi
//! stream per client and `Watch.Watch` as a bidi stream.
//!
//! No protoc: the messages below are written by hand with `prost`'s derive, only the fields
//! the harness uses, with the field numbers of etcd 3.4's `etcdserver/etcdserverpb/rpc.proto`
//! and `mvcc/mvccpb/kv.proto`. Fields left out of a response are skipped by prost, fields
//! left out of a request take their proto3 defaults, as in etcd's own clients.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use http::uri::PathAndQuery;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;
use tonic_prost::ProstCodec;

// ---------------------------------------------------------------------------------------
// Messages (etcdserverpb, mvccpb)
// ---------------------------------------------------------------------------------------

#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    #[prost(uint64, tag = "1")]
    pub cluster_id: u64,
    #[prost(uint64, tag = "2")]
    pub member_id: u64,
    #[prost(int64, tag = "3")]
    pub revision: i64,
    #[prost(uint64, tag = "4")]
    pub raft_term: u64,
}

/// mvccpb.KeyValue.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(int64, tag = "2")]
    pub create_revision: i64,
    #[prost(int64, tag = "3")]
    pub mod_revision: i64,
    #[prost(int64, tag = "4")]
    pub version: i64,
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
    #[prost(int64, tag = "6")]
    pub lease: i64,
}

/// mvccpb.Event (type: PUT = 0, DELETE = 1).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(int32, tag = "1")]
    pub r#type: i32,
    #[prost(message, optional, tag = "2")]
    pub kv: Option<KeyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub range_end: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(message, repeated, tag = "2")]
    pub kvs: Vec<KeyValue>,
    #[prost(int64, tag = "4")]
    pub count: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
    #[prost(int64, tag = "3")]
    pub lease: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PutResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DeleteRangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub range_end: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DeleteRangeResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    pub deleted: i64,
}

/// `Compare.CompareResult.EQUAL`.
pub const COMPARE_EQUAL: i32 = 0;
/// `Compare.CompareTarget.MOD`.
pub const COMPARE_MOD: i32 = 2;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Compare {
    #[prost(int32, tag = "1")]
    pub result: i32,
    #[prost(int32, tag = "2")]
    pub target: i32,
    #[prost(bytes = "vec", tag = "3")]
    pub key: Vec<u8>,
    #[prost(oneof = "TargetUnion", tags = "6")]
    pub target_union: Option<TargetUnion>,
}

/// `Compare.target_union`: only `mod_revision` (6) is used here.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum TargetUnion {
    #[prost(int64, tag = "6")]
    ModRevision(i64),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestOp {
    #[prost(oneof = "Request", tags = "2")]
    pub request: Option<Request>,
}

/// `RequestOp.request`: only `request_put` (2) is used here.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Request {
    #[prost(message, tag = "2")]
    RequestPut(PutRequest),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TxnRequest {
    #[prost(message, repeated, tag = "1")]
    pub compare: Vec<Compare>,
    #[prost(message, repeated, tag = "2")]
    pub success: Vec<RequestOp>,
    #[prost(message, repeated, tag = "3")]
    pub failure: Vec<RequestOp>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TxnResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(bool, tag = "2")]
    pub succeeded: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseGrantRequest {
    #[prost(int64, tag = "1")]
    pub ttl: i64,
    #[prost(int64, tag = "2")]
    pub id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseGrantResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    pub id: i64,
    #[prost(int64, tag = "3")]
    pub ttl: i64,
    #[prost(string, tag = "4")]
    pub error: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseRevokeRequest {
    #[prost(int64, tag = "1")]
    pub id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseRevokeResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseKeepAliveRequest {
    #[prost(int64, tag = "1")]
    pub id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseKeepAliveResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    pub id: i64,
    #[prost(int64, tag = "3")]
    pub ttl: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchCreateRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub range_end: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchRequest {
    #[prost(oneof = "WatchRequestUnion", tags = "1")]
    pub request_union: Option<WatchRequestUnion>,
}

/// `WatchRequest.request_union`: only `create_request` (1) is used here.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum WatchRequestUnion {
    #[prost(message, tag = "1")]
    CreateRequest(WatchCreateRequest),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    pub watch_id: i64,
    #[prost(bool, tag = "3")]
    pub created: bool,
    #[prost(bool, tag = "4")]
    pub canceled: bool,
    #[prost(string, tag = "6")]
    pub cancel_reason: String,
    #[prost(message, repeated, tag = "11")]
    pub events: Vec<Event>,
}

// ---------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------

const TXN: &str = "/etcdserverpb.KV/Txn";
const RANGE: &str = "/etcdserverpb.KV/Range";
const PUT: &str = "/etcdserverpb.KV/Put";
const DELETE_RANGE: &str = "/etcdserverpb.KV/DeleteRange";
const LEASE_GRANT: &str = "/etcdserverpb.Lease/LeaseGrant";
const LEASE_REVOKE: &str = "/etcdserverpb.Lease/LeaseRevoke";
const LEASE_KEEPALIVE: &str = "/etcdserverpb.Lease/LeaseKeepAlive";
const WATCH: &str = "/etcdserverpb.Watch/Watch";

/// One HTTP/2 connection to one etcd member; cheap to clone (clones share the connection,
/// as the goroutines of one `clientv3.Client` do).
#[derive(Clone)]
pub struct Etcd {
    ch: Channel,
}

/// A request stream fed from a channel: the sending half stays with the caller.
fn request_stream<M: Send + 'static>(
    rx: mpsc::UnboundedReceiver<M>,
) -> impl futures_util::Stream<Item = M> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

impl Etcd {
    /// Connects to `addr` (`ip:port`, the member's client URL without the scheme).
    pub async fn connect(addr: &str) -> Result<Etcd> {
        let ch = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .with_context(|| format!("gRPC connect to {addr}"))?;
        Ok(Etcd { ch })
    }

    async fn unary<Q, R>(&self, path: &'static str, req: Q, timeout: Duration) -> Result<R>
    where
        Q: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let mut g = tonic::client::Grpc::new(self.ch.clone());
        let call = async move {
            g.ready().await.map_err(|e| anyhow!("gRPC channel: {e}"))?;
            let r = g
                .unary(
                    tonic::Request::new(req),
                    PathAndQuery::from_static(path),
                    ProstCodec::<Q, R>::default(),
                )
                .await
                .map_err(|s| anyhow!("{path}: {} {}", s.code(), s.message()))?;
            Ok(r.into_inner())
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| anyhow!("{path}: no response within {timeout:?}"))?
    }

    /// Txn: `mod_revision(key) == rev` (0: the key does not exist), success: put `value`.
    /// `Some(revision of the txn)` if the compare held, else `None`.
    pub async fn cas(
        &self,
        key: &[u8],
        rev: i64,
        value: Vec<u8>,
        timeout: Duration,
    ) -> Result<Option<i64>> {
        let r: TxnResponse = self
            .unary(TXN, cas_request(key, rev, value), timeout)
            .await?;
        if !r.succeeded {
            return Ok(None);
        }
        Ok(Some(
            r.header.context("no header in the txn response")?.revision,
        ))
    }

    /// The key's mod_revision (0 if it does not exist).
    pub async fn mod_revision(&self, key: &[u8], timeout: Duration) -> Result<i64> {
        let r: RangeResponse = self
            .unary(
                RANGE,
                RangeRequest {
                    key: key.to_vec(),
                    range_end: Vec::new(),
                },
                timeout,
            )
            .await?;
        Ok(r.kvs.first().map_or(0, |kv| kv.mod_revision))
    }

    /// Put (with `lease`, 0 for none); the store's revision after it.
    pub async fn put(
        &self,
        key: &[u8],
        value: &[u8],
        lease: i64,
        timeout: Duration,
    ) -> Result<i64> {
        let r: PutResponse = self
            .unary(
                PUT,
                PutRequest {
                    key: key.to_vec(),
                    value: value.to_vec(),
                    lease,
                },
                timeout,
            )
            .await?;
        Ok(r.header.map_or(0, |h| h.revision))
    }

    /// Deletes `[key, range_end)`; the number of keys deleted.
    pub async fn delete_range(
        &self,
        key: &[u8],
        range_end: &[u8],
        timeout: Duration,
    ) -> Result<i64> {
        let r: DeleteRangeResponse = self
            .unary(
                DELETE_RANGE,
                DeleteRangeRequest {
                    key: key.to_vec(),
                    range_end: range_end.to_vec(),
                },
                timeout,
            )
            .await?;
        Ok(r.deleted)
    }

    /// A new lease of `ttl` seconds; its id.
    pub async fn lease_grant(&self, ttl: i64, timeout: Duration) -> Result<i64> {
        let r: LeaseGrantResponse = self
            .unary(LEASE_GRANT, LeaseGrantRequest { ttl, id: 0 }, timeout)
            .await?;
        if !r.error.is_empty() || r.id == 0 {
            bail!("lease grant: id {} error {:?}", r.id, r.error);
        }
        Ok(r.id)
    }

    pub async fn lease_revoke(&self, id: i64, timeout: Duration) -> Result<()> {
        let _: LeaseRevokeResponse = self
            .unary(LEASE_REVOKE, LeaseRevokeRequest { id }, timeout)
            .await?;
        Ok(())
    }

    /// Opens one `LeaseKeepAlive` stream with a first keepalive of `first` (etcd answers the
    /// stream's headers together with the first response); returns it and that TTL.
    pub async fn keepalive_stream(
        &self,
        first: i64,
        timeout: Duration,
    ) -> Result<(KeepAlive, i64)> {
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(LeaseKeepAliveRequest { id: first })
            .map_err(|_| anyhow!("keepalive stream closed"))?;
        let mut g = tonic::client::Grpc::new(self.ch.clone());
        let open = async move {
            g.ready().await.map_err(|e| anyhow!("gRPC channel: {e}"))?;
            g.streaming(
                tonic::Request::new(request_stream(rx)),
                PathAndQuery::from_static(LEASE_KEEPALIVE),
                ProstCodec::<LeaseKeepAliveRequest, LeaseKeepAliveResponse>::default(),
            )
            .await
            .map_err(|s| anyhow!("LeaseKeepAlive: {} {}", s.code(), s.message()))
        };
        let rx = tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| anyhow!("LeaseKeepAlive: no response within {timeout:?}"))??
            .into_inner();
        let mut ka = KeepAlive { tx, rx };
        let ttl = ka.response(first, timeout).await?;
        Ok((ka, ttl))
    }

    /// A `Watch` stream with one watcher on `[key, range_end)`, once etcd confirmed it.
    pub async fn watch(
        &self,
        key: &[u8],
        range_end: &[u8],
        timeout: Duration,
    ) -> Result<WatchStream> {
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(WatchRequest {
            request_union: Some(WatchRequestUnion::CreateRequest(WatchCreateRequest {
                key: key.to_vec(),
                range_end: range_end.to_vec(),
            })),
        })
        .map_err(|_| anyhow!("watch stream closed"))?;
        let mut g = tonic::client::Grpc::new(self.ch.clone());
        let open = async move {
            g.ready().await.map_err(|e| anyhow!("gRPC channel: {e}"))?;
            let mut rx = g
                .streaming(
                    tonic::Request::new(request_stream(rx)),
                    PathAndQuery::from_static(WATCH),
                    ProstCodec::<WatchRequest, WatchResponse>::default(),
                )
                .await
                .map_err(|s| anyhow!("Watch: {} {}", s.code(), s.message()))?
                .into_inner();
            let first = rx
                .message()
                .await
                .map_err(|s| anyhow!("Watch: {} {}", s.code(), s.message()))?
                .context("the watch stream ended")?;
            if !first.created || first.canceled {
                bail!("watch not created: {first:?}");
            }
            Ok(rx)
        };
        let rx = tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| anyhow!("Watch: not created within {timeout:?}"))??;
        Ok(WatchStream {
            _conn: self.clone(),
            _tx: tx,
            rx,
        })
    }
}

/// The CAS txn: compare `mod_revision(key) == rev`, success: put `value` on `key`.
pub fn cas_request(key: &[u8], rev: i64, value: Vec<u8>) -> TxnRequest {
    TxnRequest {
        compare: vec![Compare {
            result: COMPARE_EQUAL,
            target: COMPARE_MOD,
            key: key.to_vec(),
            target_union: Some(TargetUnion::ModRevision(rev)),
        }],
        success: vec![RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: key.to_vec(),
                value,
                lease: 0,
            })),
        }],
        failure: Vec::new(),
    }
}

/// One client's long-lived `LeaseKeepAlive` stream: one request, then its response.
pub struct KeepAlive {
    tx: mpsc::UnboundedSender<LeaseKeepAliveRequest>,
    rx: Streaming<LeaseKeepAliveResponse>,
}

impl KeepAlive {
    /// Keeps lease `id` alive; its new TTL (an error if it expired).
    pub async fn keepalive(&mut self, id: i64, timeout: Duration) -> Result<i64> {
        self.tx
            .send(LeaseKeepAliveRequest { id })
            .map_err(|_| anyhow!("keepalive stream closed"))?;
        self.response(id, timeout).await
    }

    async fn response(&mut self, id: i64, timeout: Duration) -> Result<i64> {
        let r = tokio::time::timeout(timeout, self.rx.message())
            .await
            .map_err(|_| anyhow!("LeaseKeepAlive: no response within {timeout:?}"))?
            .map_err(|s| anyhow!("LeaseKeepAlive: {} {}", s.code(), s.message()))?
            .context("the keepalive stream ended")?;
        if r.id != id {
            bail!("keepalive response for lease {} (sent {id})", r.id);
        }
        if r.ttl <= 0 {
            bail!("keepalive of an expired lease {id}");
        }
        Ok(r.ttl)
    }
}

/// An open `Watch` stream: the request half and the connection (a handle on its channel)
/// stay open while this lives, so `Etcd::connect(..).await?.watch(..)` is safe.
pub struct WatchStream {
    _conn: Etcd,
    _tx: mpsc::UnboundedSender<WatchRequest>,
    pub rx: Streaming<WatchResponse>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn known_bytes() {
        // PutRequest{key: "a", value: "b"}: field 1 and 2, length-delimited; lease 0 omitted.
        let put = PutRequest {
            key: b"a".to_vec(),
            value: b"b".to_vec(),
            lease: 0,
        };
        assert_eq!(put.encode_to_vec(), [0x0a, 1, b'a', 0x12, 1, b'b']);
        // LeaseGrantRequest{TTL: 10}: field 1 varint.
        let grant = LeaseGrantRequest { ttl: 10, id: 0 };
        assert_eq!(grant.encode_to_vec(), [0x08, 10]);
        // LeaseKeepAliveRequest{ID: 300}: varint 300 = ac 02.
        let ka = LeaseKeepAliveRequest { id: 300 };
        assert_eq!(ka.encode_to_vec(), [0x08, 0xac, 0x02]);
        // Compare{target: MOD, key: "k", mod_revision: 0}: result EQUAL (0) omitted, the
        // oneof's mod_revision (field 6) present even at 0.
        let c = Compare {
            result: COMPARE_EQUAL,
            target: COMPARE_MOD,
            key: b"k".to_vec(),
            target_union: Some(TargetUnion::ModRevision(0)),
        };
        assert_eq!(c.encode_to_vec(), [0x10, 2, 0x1a, 1, b'k', 0x30, 0]);
        // WatchRequest{create_request: {key: "w", range_end: "x"}}.
        let w = WatchRequest {
            request_union: Some(WatchRequestUnion::CreateRequest(WatchCreateRequest {
                key: b"w".to_vec(),
                range_end: b"x".to_vec(),
            })),
        };
        assert_eq!(w.encode_to_vec(), [0x0a, 6, 0x0a, 1, b'w', 0x12, 1, b'x']);
        // The txn: compare (1) { .. }, success (2) { request_put (2) { key, value } }.
        let t = cas_request(b"k", 5, b"v".to_vec());
        assert_eq!(
            t.encode_to_vec(),
            [
                0x0a, 7, 0x10, 2, 0x1a, 1, b'k', 0x30, 5, // compare
                0x12, 8, 0x12, 6, 0x0a, 1, b'k', 0x12, 1, b'v', // success
            ]
        );
    }

    #[test]
    fn round_trips() {
        let t = cas_request(b"cas/r1/c0", 42, br#"{"n":7}"#.to_vec());
        assert_eq!(TxnRequest::decode(&t.encode_to_vec()[..]).unwrap(), t);
        let w = WatchResponse {
            header: Some(ResponseHeader {
                cluster_id: 1,
                member_id: 2,
                revision: 3,
                raft_term: 4,
            }),
            watch_id: 0,
            created: true,
            canceled: false,
            cancel_reason: String::new(),
            events: vec![Event {
                r#type: 0,
                kv: Some(KeyValue {
                    key: b"watch/r1/x".to_vec(),
                    create_revision: 3,
                    mod_revision: 3,
                    version: 1,
                    value: b"{}".to_vec(),
                    lease: 0,
                }),
            }],
        };
        assert_eq!(WatchResponse::decode(&w.encode_to_vec()[..]).unwrap(), w);
        let ka = LeaseKeepAliveResponse {
            header: None,
            id: -7,
            ttl: 10,
        };
        assert_eq!(
            LeaseKeepAliveResponse::decode(&ka.encode_to_vec()[..]).unwrap(),
            ka
        );
        // A response with fields this file leaves out (RangeResponse.more = 3) still decodes.
        let mut b = RangeResponse {
            header: None,
            kvs: Vec::new(),
            count: 1,
        }
        .encode_to_vec();
        b.extend_from_slice(&[0x18, 1]);
        assert_eq!(RangeResponse::decode(&b[..]).unwrap().count, 1);
    }

    /// Every call against a real etcd, checked through its JSON gateway (a wrong field
    /// number shows up as a wrong result). Skipped without `etcd` on PATH.
    #[test]
    fn against_live_etcd() {
        use crate::discoverd::cluster::{Cluster, EtcdApi, EtcdTimers};
        use crate::discoverd::http::{b64, prefix_end, str_field, unb64, Http};
        if !crate::bench::on_path("etcd") {
            eprintln!("etcd not on PATH: skipped");
            return;
        }
        let dir = crate::procs::TempDir::new("flynn-perf-grpc-test").unwrap();
        let c = Cluster::start_etcd(dir.path(), 1, EtcdTimers::default(), EtcdApi::Grpc).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let t = Duration::from_secs(10);
            let h = Http::new().unwrap();
            c.leader(&h, t).await.unwrap();
            let base = c.nodes[0].url("");
            let range = |key: &str| {
                let (h, base, key) = (h.clone(), base.clone(), key.to_string());
                async move {
                    let r = h
                        .post(
                            &format!("{base}/v3/kv/range"),
                            &format!(r#"{{"key":"{}"}}"#, b64(&key)),
                        )
                        .await
                        .unwrap();
                    r.ok().unwrap();
                    r.json().unwrap()["kvs"][0].clone()
                }
            };
            let g = Etcd::connect(&c.nodes[0].client).await.unwrap();
            // The leader and term the harness records around every run.
            let st = c.raft_state(&h, t).await.unwrap();
            assert_eq!(st.leader, c.nodes[0].client);
            assert!(st.term >= 1, "{st:?}");

            // Txn: create (mod_revision 0), a stale compare fails, the right one holds.
            let r1 = g.cas(b"t/k", 0, b"v1".to_vec(), t).await.unwrap().unwrap();
            let kv = range("t/k").await;
            assert_eq!(unb64(kv["value"].as_str().unwrap()), "v1");
            assert_eq!(str_field(&kv["mod_revision"]), r1.to_string());
            assert_eq!(g.cas(b"t/k", 0, b"x".to_vec(), t).await.unwrap(), None);
            assert_eq!(g.cas(b"t/k", r1 - 1, b"x".to_vec(), t).await.unwrap(), None);
            let r2 = g.cas(b"t/k", r1, b"v2".to_vec(), t).await.unwrap().unwrap();
            assert!(r2 > r1);
            // r1 is now stale (the key's create_revision, not its mod_revision).
            assert_eq!(g.cas(b"t/k", r1, b"x".to_vec(), t).await.unwrap(), None);
            assert_eq!(unb64(range("t/k").await["value"].as_str().unwrap()), "v2");
            // Range.
            assert_eq!(g.mod_revision(b"t/k", t).await.unwrap(), r2);
            assert_eq!(g.mod_revision(b"t/missing", t).await.unwrap(), 0);

            // Lease grant + put with the lease; keepalives on one stream.
            let lease = g.lease_grant(10, t).await.unwrap();
            let r3 = g.put(b"t/leased", b"inst", lease, t).await.unwrap();
            assert!(r3 > r2);
            let kv = range("t/leased").await;
            assert_eq!(str_field(&kv["lease"]), lease.to_string());
            assert_eq!(unb64(kv["value"].as_str().unwrap()), "inst");
            let (mut ka, ttl) = g.keepalive_stream(lease, t).await.unwrap();
            assert_eq!(ttl, 10);
            let lease2 = g.lease_grant(10, t).await.unwrap();
            assert_ne!(lease2, lease);
            assert_eq!(ka.keepalive(lease2, t).await.unwrap(), 10);
            assert_eq!(ka.keepalive(lease, t).await.unwrap(), 10);

            // Watch on a prefix: a put shows up as a PUT event with its key and value.
            let mut w = g
                .watch(b"t/w/", prefix_end("t/w/").as_bytes(), t)
                .await
                .unwrap();
            g.put(b"t/w/a", b"1", 0, t).await.unwrap();
            g.put(b"t/other", b"2", 0, t).await.unwrap();
            let m = tokio::time::timeout(t, w.rx.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(m.events.len(), 1, "{m:?}");
            assert_eq!(m.events[0].r#type, 0);
            let kv = m.events[0].kv.as_ref().unwrap();
            assert_eq!((&kv.key[..], &kv.value[..]), (&b"t/w/a"[..], &b"1"[..]));

            // A watch on a connection nobody else holds (`connect(..).watch(..)`) keeps
            // delivering: the stream owns its connection.
            let mut lone = Etcd::connect(&c.nodes[0].client)
                .await
                .unwrap()
                .watch(b"t/w/", prefix_end("t/w/").as_bytes(), t)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            g.put(b"t/w/b", b"3", 0, t).await.unwrap();
            let m = tokio::time::timeout(t, lone.rx.message())
                .await
                .expect("no event on the lone watch")
                .expect("the lone watch failed")
                .expect("the lone watch ended");
            assert_eq!(m.events.len(), 1, "{m:?}");
            assert_eq!(m.events[0].kv.as_ref().unwrap().key, b"t/w/b");
            drop(lone);

            // DeleteRange of the prefix.
            assert_eq!(
                g.delete_range(b"t/w/", prefix_end("t/w/").as_bytes(), t)
                    .await
                    .unwrap(),
                2
            );
            assert_eq!(range("t/w/a").await, serde_json::Value::Null);

            // Revoke: the leased key goes, a keepalive of the lease reports it expired.
            g.lease_revoke(lease, t).await.unwrap();
            assert_eq!(range("t/leased").await, serde_json::Value::Null);
            assert!(ka.keepalive(lease, t).await.is_err());
        });
    }
}
