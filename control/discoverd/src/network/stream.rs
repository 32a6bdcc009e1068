//! Pipelined AppendEntries over one upgraded HTTP connection per replication session.
//!
//! A request-response AppendEntries costs a whole HTTP exchange, and openraft's default
//! `stream_append` waits for each answer before sending the next request, so an entry
//! proposed while the previous request (often one that only carries the new commit
//! index) is in flight waits a full round trip before it is even sent. Here the leader
//! opens `POST /raft/rpc/stream` with `Upgrade: flynn-raft-append` (on the API port,
//! like every Raft RPC) and, after `101 Switching Protocols`, writes every request the
//! replication session produces as soon as it is produced; the follower feeds them in
//! order to `Raft::stream_append` (which submits each to its log without waiting for the
//! previous fsync) and writes each result back in the same order. TCP keeps both
//! directions ordered, so no sequence numbers are needed.
//!
//! Frames in both directions: `len: u32 LE | JSON`, a request
//! (`AppendEntriesRequest`) one way and a `StreamAppendResult` the other. Nothing here
//! acknowledges anything on its own: a result is whatever the follower's Raft answered,
//! after its fsync. A closed or stalled connection ends the session with an error and
//! openraft starts another.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{NetworkError, RPCError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{AppendEntriesRequest, StreamAppendResult};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::fault::{Faults, FROM_HEADER};
use crate::node::Node;
use crate::store::TypeConfig;

type C = TypeConfig;

/// The `Upgrade` protocol token of the stream.
pub const PROTOCOL: &str = "flynn-raft-append";
/// The path the stream is opened on.
pub const PATH: &str = "/raft/rpc/stream";
/// Frames larger than this end the stream (a bad peer, not a batch of entries).
const MAX_FRAME: usize = 64 << 20;
/// The follower closes a stream that brought no request for this long, so a leader whose
/// host vanished without closing its connections does not keep a task and a socket here
/// forever. A live leader whose stream was only idle reopens it on its next write.
const IDLE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct StreamFailure(String);

fn failure(msg: impl Into<String>) -> StreamFailure {
    StreamFailure(msg.into())
}

async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    buf: &mut Vec<u8>,
    value: &T,
) -> std::io::Result<()> {
    buf.clear();
    buf.extend_from_slice(&[0; 4]);
    serde_json::to_writer(&mut *buf, value).map_err(std::io::Error::other)?;
    let len = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&len.to_le_bytes());
    w.write_all(buf).await?;
    w.flush().await
}

/// Reads one frame; `Ok(None)` at a clean end of stream (EOF before a frame starts).
async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    buf.resize(len, 0);
    r.read_exact(buf).await?;
    serde_json::from_slice(buf)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Aborts the request writer when the response stream is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What `RaftNetworkV2::stream_append` returns: the stream of results, once open.
pub type Opened<'s> =
    BoxFuture<'s, Result<BoxStream<'s, Result<StreamAppendResult<C>, RPCError<C>>>, RPCError<C>>>;

/// The leader's side: opens the stream to `addr` and returns the results in order.
/// `timeout` bounds the upgrade and each wait for a result that is owed.
pub fn open<'s, S>(
    http: reqwest::Client,
    addr: String,
    host: String,
    faults: Arc<Faults>,
    input: S,
    option: RPCOption,
    timeout: Duration,
) -> Opened<'s>
where
    S: Stream<Item = AppendEntriesRequest<C>> + Send + Unpin + 'static,
{
    Box::pin(async move {
        if faults.is_cut(&addr) {
            let msg = format!("{addr} is partitioned away (fault injection)");
            return Err(RPCError::Unreachable(Unreachable::new(&failure(msg))));
        }
        let setup = option.hard_ttl().max(timeout);
        let send = http
            .post(format!("http://{addr}{PATH}"))
            .header(FROM_HEADER, &host)
            .header(reqwest::header::CONNECTION, "upgrade")
            .header(reqwest::header::UPGRADE, PROTOCOL)
            .send();
        let resp = match tokio::time::timeout(setup, send).await {
            Err(_) => {
                let msg = format!("{addr}: stream upgrade timed out");
                return Err(RPCError::Network(NetworkError::new(&failure(msg))));
            }
            Ok(Err(e)) if e.is_connect() => {
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            }
            Ok(Err(e)) => return Err(RPCError::Network(NetworkError::new(&e))),
            Ok(Ok(r)) => r,
        };
        if resp.status() != reqwest::StatusCode::SWITCHING_PROTOCOLS {
            let msg = format!("{addr} answered {} to the stream upgrade", resp.status());
            return Err(RPCError::Unreachable(Unreachable::new(&failure(msg))));
        }
        let io = resp
            .upgrade()
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let (rd, mut wr) = tokio::io::split(io);

        // One token per request written; the reader owes one result per token.
        let (sent_tx, sent_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut input = input;
        let writer = tokio::spawn(async move {
            let mut buf = Vec::new();
            while let Some(req) = input.next().await {
                if faults.is_cut(&addr) {
                    break;
                }
                if let Err(e) = write_frame(&mut wr, &mut buf, &req).await {
                    tracing::debug!(peer = %addr, error = %e, "raft stream write failed");
                    break;
                }
                if sent_tx.send(()).is_err() {
                    break;
                }
            }
            // No more requests: the follower answers what it has and closes.
            let _ = wr.shutdown().await;
        });
        let guard = AbortOnDrop(writer);

        struct Reader<R> {
            rd: R,
            sent: tokio::sync::mpsc::UnboundedReceiver<()>,
            buf: Vec<u8>,
            _writer: AbortOnDrop,
        }
        let state = Reader {
            rd,
            sent: sent_rx,
            buf: Vec::new(),
            _writer: guard,
        };
        let results = futures_util::stream::unfold(Some(state), move |state| async move {
            let mut st = state?;
            // The writer ended (input exhausted or a write failed) and every result
            // owed has been read: the session is over.
            st.sent.recv().await?;
            let read = read_frame::<_, StreamAppendResult<C>>(&mut st.rd, &mut st.buf);
            let item = match tokio::time::timeout(timeout, read).await {
                Ok(Ok(Some(r))) => {
                    let go_on = r.is_ok();
                    return Some((Ok(r), go_on.then_some(st)));
                }
                Ok(Ok(None)) => failure("stream closed by the follower"),
                Ok(Err(e)) => failure(format!("stream read: {e}")),
                Err(_) => failure("no AppendEntries result within the timeout"),
            };
            Some((Err(RPCError::Network(NetworkError::new(&item))), None))
        });
        let results: BoxStream<'s, _> = Box::pin(results);
        Ok(results)
    })
}

/// The follower's side of an upgraded connection from `from`: requests in, results out,
/// both in order, until either side closes, Raft stops or `from` is partitioned away.
pub async fn serve<IO>(node: Arc<Node>, from: String, io: IO)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, mut wr) = tokio::io::split(io);
    let faults = node.faults.clone();
    let from_in = from.clone();
    let requests = futures_util::stream::unfold((rd, Vec::new()), move |(mut rd, mut buf)| {
        let faults = faults.clone();
        let from = from_in.clone();
        async move {
            let read = read_frame::<_, AppendEntriesRequest<C>>(&mut rd, &mut buf);
            match tokio::time::timeout(IDLE, read).await {
                Ok(Ok(Some(req))) if !faults.is_cut(&from) => Some((req, (rd, buf))),
                Ok(Ok(_)) => None,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %from, error = %e, "raft stream read failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(peer = %from, "raft stream idle, closing");
                    None
                }
            }
        }
    });
    let results = node.raft.stream_append(requests);
    futures_util::pin_mut!(results);
    let mut buf = Vec::new();
    while let Some(r) = results.next().await {
        let Ok(r) = r else {
            break; // Raft stopped: closing tells the leader.
        };
        if node.faults.is_cut(&from) {
            break;
        }
        if let Err(e) = write_frame(&mut wr, &mut buf, &r).await {
            tracing::debug!(peer = %from, error = %e, "raft stream write failed");
            break;
        }
    }
    let _ = wr.shutdown().await;
}
