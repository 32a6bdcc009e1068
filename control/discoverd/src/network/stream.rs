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
//! openraft starts another: a result not read within the timeout, and a frame whose write
//! makes no progress for several times the timeout ([`write_stall`]; a follower that stops
//! reading leaves the leader's write blocked once the socket buffers are full).
//!
//! Connections outlive sessions. openraft sends every heartbeat as a session of its own
//! (one request), so opening a connection per session meant a TCP handshake, an HTTP
//! upgrade and a close (and a `TIME_WAIT` socket) per heartbeat per follower, dozens a
//! second on an idle cluster. A session now ends with an empty frame (`len` 0) from the
//! leader once its requests are done; the follower answers what it owes, sends an empty
//! frame back and waits for the next session on the same connection, and the leader
//! keeps the connection in a [`Pool`] for the next session to the same peer. Only a
//! session that ended that way is pooled: an error, a timeout or a rejected request
//! (the follower's Raft ends its results at the first error) drops the connection. A
//! leader that just closes its half at the end (as before) still works: the follower
//! answers and closes.
//!
//! Not every request is answered. After each commit openraft sends every follower a
//! request with no entries that only carries the new commit index; its result can only
//! repeat the match the previous request of the session already reported, and
//! openraft's replication takes the greatest match of whatever results arrive (a
//! request left unanswered is acknowledged by the next result that covers it). Both
//! sides apply one rule, [`Owed`]: a request with no entries whose `prev_log_id` is
//! where the session's previous request ended is not answered when the follower's Raft
//! accepts it. The first request of a session (a heartbeat, a probe) is always
//! answered, and so is the last: when a session ends on an unanswered request, the
//! leader asks for one more result and the follower writes the one it held back, so
//! openraft never sees a session end with requests it cannot account for (it would
//! back off before the next one). A rejection (a higher vote) is always written; the
//! leader reads it as the next result it waits for, at the latest at the session's end.
//! This saves each follower a write and the leader a read, a wake-up and a pass through
//! its Raft core per write. The held-back result is written only when the leader ends the
//! session; a session that ends otherwise (idle, EOF) gets nothing more. The leader checks
//! that every acceptance names where the owed request ended, so a session out of step is
//! an error at once (openraft opens a new one) rather than a write waiting for a result
//! that never comes.
//!
//! Such a commit-only request is written after one `yield_now`: openraft sends it while the
//! write it commits is being applied, and the yield lets that write's answer to its client
//! go out first (the answer is on the client's path, the follower's copy of the commit
//! point is not). It is a turn of the runtime, not a timer: followers still learn the
//! commit point microseconds later, so their watchers' events are not held back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, Stream, StreamExt};
use openraft::alias::LogIdOf;
use openraft::base::{BoxFuture, BoxStream};
use openraft::entry::RaftEntry;
use openraft::error::{NetworkError, RPCError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{AppendEntriesRequest, StreamAppendResult};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use crate::fault::{Faults, FROM_HEADER};
use crate::node::Node;
use crate::store::TypeConfig;

type C = TypeConfig;

/// The `Upgrade` protocol token of the stream.
pub const PROTOCOL: &str = "flynn-raft-append";
/// The path the stream is opened on.
pub const PATH: &str = "/raft/rpc/stream";
/// Frames larger than this end the stream (a bad peer, not a batch of entries). The same
/// bound as a unary AppendEntries body ([`super::MAX_RPC_BODY`]): a batch of large entries
/// the leader sends one way must not be refused the other way.
pub const MAX_FRAME: usize = super::MAX_RPC_BODY;
/// A pooled connection idle longer than this is closed rather than reused, well before
/// the follower closes it as idle (`Node::stream_idle`, 60 s by default: a leader whose
/// host vanished without closing its connections leaves nothing behind).
const POOL_IDLE: Duration = Duration::from_secs(20);
/// Idle connections kept per peer (a heartbeat session and a replication session can
/// overlap, so one is not always enough).
const POOL_PER_PEER: usize = 4;
/// A read buffer grown past this by a large frame is shrunk back to [`SMALL_FRAME`] at the
/// next frame that fits in that (a connection lives for many sessions, and a frame may be
/// up to [`MAX_FRAME`]).
const SHRINK_ABOVE: usize = 1 << 20;
const SMALL_FRAME: usize = 64 << 10;

/// How long the write of a frame to a follower may go without the connection taking a
/// byte: 5 times the request `timeout` (5 s). Past it the follower is taken to have
/// stopped reading and the session ends with an error; without a limit the write, and the
/// session's results waiting for it, hung until TCP gave up (~15 min). Any progress starts
/// the wait again, so a slow but working link gets a frame of any size through: a limit on
/// the whole frame's time (it was the timeout plus 1 s per 4 MiB, 4 MiB/s on average)
/// failed the largest frames on every attempt on a slower link, and openraft retried the
/// same batch for ever (that follower never caught up). Several times the timeout because
/// the kernel takes more bytes only once a third of the socket's send buffer (up to 4 MiB
/// by default) has drained: progress comes in steps of up to ~1.3 MiB.
pub fn write_stall(timeout: Duration) -> Duration {
    timeout * 5
}

/// Idle upgraded connections to followers, by peer address, each left by a session that
/// ended cleanly (see the module docs).
#[derive(Clone, Default)]
pub struct Pool(Arc<Mutex<HashMap<String, Vec<Idle>>>>);

/// A pooled connection and since when it is idle.
type Idle = (reqwest::Upgraded, Instant);

impl Pool {
    /// A live idle connection to `addr`, if there is one. Stale ones are dropped, and so
    /// is any the follower closed (or wrote to) while it sat here.
    fn take(&self, addr: &str) -> Option<reqwest::Upgraded> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let idle = map.get_mut(addr)?;
        while let Some((mut io, since)) = idle.pop() {
            if since.elapsed() > POOL_IDLE {
                continue;
            }
            let mut probe = [0u8; 1];
            // Pending = nothing to read and not closed: the connection is usable.
            if io.read(&mut probe).now_or_never().is_none() {
                return Some(io);
            }
        }
        None
    }

    fn put(&self, addr: &str, io: reqwest::Upgraded) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Stale connections go for every peer, so none lingers for a peer no longer used
        // (a removed member, or after this node stepped down).
        map.retain(|_, idle| {
            idle.retain(|(_, since)| since.elapsed() <= POOL_IDLE);
            !idle.is_empty()
        });
        let idle = map.entry(addr.to_string()).or_default();
        if idle.len() < POOL_PER_PEER {
            idle.push((io, Instant::now()));
        }
    }
}

/// Which requests of a session are answered (see the module docs); one per session on
/// each side, fed every request in order.
#[derive(Default)]
pub struct Owed {
    /// The log id the session's previous request ended at, once there was one.
    last: Option<Option<LogIdOf<C>>>,
}

impl Owed {
    /// Whether `req` is owed a result when the follower accepts it.
    pub fn next(&mut self, req: &AppendEntriesRequest<C>) -> bool {
        let end = req.entries.last().map(|e| e.log_id()).or(req.prev_log_id);
        let owed = !req.entries.is_empty() || self.last.as_ref() != Some(&req.prev_log_id);
        self.last = Some(end);
        owed
    }

    /// Where the last request passed to [`Owed::next`] ends: what a follower that accepts
    /// it answers (`Ok(end)`).
    pub fn end(&self) -> Option<LogIdOf<C>> {
        self.last.flatten()
    }
}

/// From the leader's request writer to its result reader, one per result to read.
enum Sent {
    /// A result is owed; a follower that accepted the request answers `Ok` with this.
    Owed(Option<LogIdOf<C>>),
    /// The write failed: the results end with an error.
    Failed,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct StreamFailure(String);

fn failure(msg: impl Into<String>) -> StreamFailure {
    StreamFailure(msg.into())
}

/// Encodes `value` as one frame into `buf` (replacing what it held).
fn encode_frame<T: Serialize>(buf: &mut Vec<u8>, value: &T) -> std::io::Result<()> {
    buf.clear();
    buf.extend_from_slice(&[0; 4]);
    serde_json::to_writer(&mut *buf, value).map_err(std::io::Error::other)?;
    let len = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// Writes `value` as one frame (`buf` is scratch space, reused across frames).
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    buf: &mut Vec<u8>,
    value: &T,
) -> std::io::Result<()> {
    encode_frame(buf, value)?;
    w.write_all(buf).await?;
    w.flush().await
}

/// [`write_frame`] with a limit on how long the connection may take no byte of the frame
/// ([`write_stall`] of `timeout`; a `TimedOut` error past it), not on the whole frame.
async fn write_frame_within<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    buf: &mut Vec<u8>,
    value: &T,
    timeout: Duration,
) -> std::io::Result<()> {
    encode_frame(buf, value)?;
    let stall = write_stall(timeout);
    let stalled = |written: usize| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no byte of a frame of {} bytes taken for {stall:?} ({written} written)",
                buf.len()
            ),
        )
    };
    let mut written = 0;
    while written < buf.len() {
        match tokio::time::timeout(stall, w.write(&buf[written..])).await {
            Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => written += n,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(stalled(written)),
        }
    }
    match tokio::time::timeout(stall, w.flush()).await {
        Ok(r) => r,
        Err(_) => Err(stalled(written)),
    }
}

/// Ends a session: an empty frame.
async fn write_end<W: AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<()> {
    w.write_all(&0u32.to_le_bytes()).await?;
    w.flush().await
}

/// One read from the connection.
#[derive(Debug)]
pub enum Frame<T> {
    Item(T),
    /// The empty frame that ends a session.
    End,
    /// EOF before a frame started.
    Closed,
}

/// Reads one frame (`buf` is scratch space, reused across frames). A frame over
/// [`MAX_FRAME`] or one that does not decode as `T` is an `InvalidData` error.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<Frame<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Frame::Closed),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 {
        return Ok(Frame::End);
    }
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    // Grow with the bytes that arrive rather than to the declared length up front, so a
    // peer that announces a large frame and sends little costs little memory; and give
    // back what a large frame grew once small ones follow.
    buf.clear();
    if buf.capacity() > SHRINK_ABOVE && len <= SMALL_FRAME {
        buf.shrink_to(SMALL_FRAME);
    }
    let got = (&mut *r).take(len as u64).read_to_end(buf).await?;
    if got < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    serde_json::from_slice(buf)
        .map(Frame::Item)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Aborts the request writer when the response stream is dropped.
struct AbortOnDrop(Option<tokio::task::JoinHandle<Option<WriteHalf<reqwest::Upgraded>>>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

/// What `RaftNetworkV2::stream_append` returns: the stream of results, once open.
pub type Opened<'s> =
    BoxFuture<'s, Result<BoxStream<'s, Result<StreamAppendResult<C>, RPCError<C>>>, RPCError<C>>>;

/// Where a session goes and how long it may wait.
#[derive(Clone)]
pub struct Target {
    pub http: reqwest::Client,
    pub pool: Pool,
    pub addr: String,
    /// This node's advertised address (`FROM_HEADER`).
    pub host: String,
    pub faults: Arc<Faults>,
    /// Bounds the upgrade and each wait for a result that is owed.
    pub timeout: Duration,
}

/// Opens a fresh upgraded connection to `t.addr`.
async fn connect(t: &Target, option: &RPCOption) -> Result<reqwest::Upgraded, RPCError<C>> {
    let addr = &t.addr;
    let setup = option.hard_ttl().max(t.timeout);
    let send = t
        .http
        .post(format!("http://{addr}{PATH}"))
        .header(FROM_HEADER, &t.host)
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
    resp.upgrade()
        .await
        .map_err(|e| RPCError::Network(NetworkError::new(&e)))
}

/// The leader's side of one session: sends `input` to `t.addr` over a pooled or new
/// connection and returns the results in order.
pub fn open<'s, S>(t: Target, input: S, option: RPCOption) -> Opened<'s>
where
    S: Stream<Item = AppendEntriesRequest<C>> + Send + Unpin + 'static,
{
    Box::pin(async move {
        if t.faults.is_cut(&t.addr) {
            let msg = format!("{} is partitioned away (fault injection)", t.addr);
            return Err(RPCError::Unreachable(Unreachable::new(&failure(msg))));
        }
        let io = match t.pool.take(&t.addr) {
            Some(io) => io,
            None => connect(&t, &option).await?,
        };
        let (rd, mut wr) = tokio::io::split(io);

        // One token per result owed (the reader reads one per token), or the writer's
        // failure, which ends the results with an error.
        let (sent_tx, sent_rx) = tokio::sync::mpsc::unbounded_channel::<Sent>();
        let mut input = input;
        let (addr, faults, timeout) = (t.addr.clone(), t.faults.clone(), t.timeout);
        let writer = tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut owed = Owed::default();
            let mut last_answered = true;
            while let Some(req) = input.next().await {
                if faults.is_cut(&addr) {
                    let _ = sent_tx.send(Sent::Failed);
                    return None;
                }
                last_answered = owed.next(&req);
                if !last_answered {
                    // Only a new commit point, sent as the write it commits is applied
                    // and answered: that answer goes out first (see the module docs).
                    tokio::task::yield_now().await;
                }
                // Ends when the connection takes no byte for a while: a follower that stopped
                // reading would otherwise hold the write, and the results waiting for its
                // token, for good.
                if let Err(e) = write_frame_within(&mut wr, &mut buf, &req, timeout).await {
                    tracing::debug!(peer = %addr, error = %e, "raft stream write failed");
                    let _ = sent_tx.send(Sent::Failed);
                    return None;
                }
                if last_answered && sent_tx.send(Sent::Owed(owed.end())).is_err() {
                    return None;
                }
            }
            // No more requests: the follower answers what it owes (and the result it
            // held back for an unanswered last request), then ends too.
            if !last_answered && sent_tx.send(Sent::Owed(owed.end())).is_err() {
                return None;
            }
            match tokio::time::timeout(timeout, write_end(&mut wr)).await {
                Ok(Ok(())) => Some(wr),
                _ => None,
            }
        });

        struct Reader {
            rd: ReadHalf<reqwest::Upgraded>,
            sent: tokio::sync::mpsc::UnboundedReceiver<Sent>,
            buf: Vec<u8>,
            writer: AbortOnDrop,
            target: Target,
        }
        let state = Reader {
            rd,
            sent: sent_rx,
            buf: Vec::new(),
            writer: AbortOnDrop(Some(writer)),
            target: t,
        };
        let timeout = state.target.timeout;
        let results = futures_util::stream::unfold(Some(state), move |state| async move {
            let mut st = state?;
            let expected = match st.sent.recv().await {
                Some(Sent::Owed(end)) => end,
                Some(Sent::Failed) => {
                    let e = failure("stream write failed");
                    return Some((Err(RPCError::Network(NetworkError::new(&e))), None));
                }
                None => {
                    // The writer ended and every result owed has been read: the session
                    // is over. Its end is reported now (openraft times a heartbeat's whole
                    // session: 33 ms); the connection is pooled in the background once the
                    // follower's end frame shows both sides ended it cleanly.
                    if let Some(handle) = st.writer.0.take() {
                        tokio::spawn(finish(st.rd, handle, st.target.clone()));
                    }
                    return None;
                }
            };
            let read = read_frame::<_, StreamAppendResult<C>>(&mut st.rd, &mut st.buf);
            let item = match tokio::time::timeout(timeout, read).await {
                // An acceptance must name where the owed request ended: anything else is a
                // result of some other request (the session is out of step, and openraft
                // would wait for ever for the result it was really owed).
                Ok(Ok(Frame::Item(Ok(m)))) if m != expected => failure(format!(
                    "the follower answered {} where {} was owed",
                    m.map_or("-".into(), |l| l.to_string()),
                    expected.map_or("-".into(), |l| l.to_string()),
                )),
                Ok(Ok(Frame::Item(r))) => {
                    let go_on = r.is_ok();
                    return Some((Ok(r), go_on.then_some(st)));
                }
                Ok(Ok(_)) => failure("stream closed by the follower"),
                Ok(Err(e)) => failure(format!("stream read: {e}")),
                Err(_) => failure("no AppendEntries result within the timeout"),
            };
            Some((Err(RPCError::Network(NetworkError::new(&item))), None))
        });
        let results: BoxStream<'s, _> = Box::pin(results);
        Ok(results)
    })
}

/// After a session: takes the write half back from the writer and, when the follower
/// answers the leader's end frame with its own, pools the whole connection.
async fn finish(
    mut rd: ReadHalf<reqwest::Upgraded>,
    writer: tokio::task::JoinHandle<Option<WriteHalf<reqwest::Upgraded>>>,
    t: Target,
) {
    let Ok(Some(wr)) = writer.await else {
        return;
    };
    let mut buf = Vec::new();
    let end = read_frame::<_, StreamAppendResult<C>>(&mut rd, &mut buf);
    if let Ok(Ok(Frame::End)) = tokio::time::timeout(t.timeout, end).await {
        if !t.faults.is_cut(&t.addr) {
            t.pool.put(&t.addr, rd.unsplit(wr));
        }
    }
}

/// The follower's side of an upgraded connection from `from`: sessions one after another,
/// each with requests in and results out in order, until either side closes, a session
/// ends other than cleanly, Raft stops or `from` is partitioned away.
pub async fn serve<IO>(node: Arc<Node>, from: String, io: IO)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut rbuf = Vec::new();
    let mut wbuf = Vec::new();
    loop {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<AppendEntriesRequest<C>>(64);
        // Whether each request, in order, is owed its result (one per request: Raft
        // answers every request in order until its first rejection).
        let (owed_tx, owed_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
        let requests = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let results = node.raft.stream_append(requests);
        let (clean, held) = {
            let reader = read_session(&node, &from, &mut rd, &mut rbuf, tx, owed_tx);
            let writer = write_results(&node, &from, &mut wr, &mut wbuf, results, owed_rx);
            futures_util::pin_mut!(reader, writer);
            tokio::select! {
                biased;
                ended = &mut reader => {
                    // Raft's results end once the requests do (a dropped sender).
                    let (answered, held) = writer.await;
                    (ended && answered, held)
                }
                // Raft ended the results while the leader still had requests to send:
                // it rejected one (the leader stops at that result) or stopped.
                _ = &mut writer => (false, None),
            }
        };
        // The result held back for an unanswered last request is asked for only by a
        // leader that ends the session. A session that ended otherwise (idle, EOF) must
        // not get it: a leader still in that session would read it as the result of its
        // next request.
        let clean = match (clean, held) {
            (true, Some(r)) => match write_frame(&mut wr, &mut wbuf, &r).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(peer = %from, error = %e, "raft stream write failed");
                    false
                }
            },
            (clean, _) => clean,
        };
        if !clean || write_end(&mut wr).await.is_err() {
            break;
        }
    }
    let _ = wr.shutdown().await;
}

/// Feeds one session's requests to `tx`; true when the leader ended the session with an
/// empty frame, false on EOF, an error, idleness or a partition.
async fn read_session<R: AsyncRead + Unpin>(
    node: &Node,
    from: &str,
    rd: &mut R,
    buf: &mut Vec<u8>,
    tx: tokio::sync::mpsc::Sender<AppendEntriesRequest<C>>,
    owed_tx: tokio::sync::mpsc::UnboundedSender<bool>,
) -> bool {
    let mut owed = Owed::default();
    loop {
        let read = read_frame::<_, AppendEntriesRequest<C>>(rd, buf);
        match tokio::time::timeout(node.stream_idle, read).await {
            Ok(Ok(Frame::Item(req))) if !node.faults.is_cut(from) => {
                node.heard_from_leader();
                if owed_tx.send(owed.next(&req)).is_err() || tx.send(req).await.is_err() {
                    return false;
                }
            }
            Ok(Ok(Frame::End)) => return true,
            Ok(Ok(_)) => return false,
            // A frame over the limit, or one that does not decode, is a bug or a version
            // mismatch that retries cannot fix: the leader's next session fails the same.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                tracing::warn!(peer = %from, error = %e, "raft stream frame refused");
                return false;
            }
            Ok(Err(e)) => {
                tracing::debug!(peer = %from, error = %e, "raft stream read failed");
                return false;
            }
            Err(_) => {
                tracing::debug!(peer = %from, "raft stream idle, closing");
                return false;
            }
        }
    }
}

/// Writes the results of one session that are owed (see [`Owed`]); true when all were
/// written and Raft did not stop. Also returns the result of the last request when it was
/// not answered (the caller writes it if the leader ended the session).
async fn write_results<W, S>(
    node: &Node,
    from: &str,
    wr: &mut W,
    buf: &mut Vec<u8>,
    results: S,
    mut owed: tokio::sync::mpsc::UnboundedReceiver<bool>,
) -> (bool, Option<StreamAppendResult<C>>)
where
    W: AsyncWrite + Unpin,
    S: Stream<Item = Result<StreamAppendResult<C>, openraft::errors::Fatal<C>>>,
{
    futures_util::pin_mut!(results);
    // The result of the last request when it was not answered: the leader asks for it
    // at the session's end.
    let mut held = None;
    while let Some(r) = results.next().await {
        let Ok(r) = r else {
            return (false, None); // Raft stopped: closing tells the leader.
        };
        if node.faults.is_cut(from) {
            return (false, None);
        }
        // The flag was sent before its request, so it is there.
        let answered = owed.try_recv().unwrap_or(true);
        if !answered && r.is_ok() {
            held = Some(r);
            continue;
        }
        held = None;
        if let Err(e) = write_frame(wr, buf, &r).await {
            tracing::debug!(peer = %from, error = %e, "raft stream write failed");
            return (false, None);
        }
    }
    (true, held)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    type Req = AppendEntriesRequest<C>;

    fn read(mut bytes: &[u8], buf: &mut Vec<u8>) -> std::io::Result<Frame<Req>> {
        read_frame::<_, Req>(&mut bytes, buf)
            .now_or_never()
            .expect("reading a slice never waits")
    }

    #[test]
    fn a_frame_announced_large_but_cut_short_costs_what_arrived() {
        let mut input = ((MAX_FRAME - 1) as u32).to_le_bytes().to_vec();
        input.extend_from_slice(&[b'x'; 1000]);
        let mut buf = Vec::new();
        let err = read(&input, &mut buf).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(
            buf.capacity() < 64 << 10,
            "buffer grew to {}",
            buf.capacity()
        );
        // Over the limit: refused before reading anything.
        let over = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert_eq!(
            read(&over, &mut buf).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
    }

    /// A request at `prev` (a log index, `None` for the empty log) carrying entries up to
    /// `last` (none when `last == prev`).
    fn req(prev: Option<u64>, last: Option<u64>) -> Req {
        let id = |i: u64| format!(r#"{{"leader_id":{{"term":1,"node_id":7}},"index":{i}}}"#);
        let from = prev.map_or(0, |p| p + 1);
        let entries: Vec<String> = match last {
            Some(l) if Some(l) != prev => (from..=l)
                .map(|i| format!(r#"{{"log_id":{},"payload":"Blank"}}"#, id(i)))
                .collect(),
            _ => vec![],
        };
        let prev = prev.map_or("null".to_string(), id);
        serde_json::from_str(&format!(
            r#"{{"vote":{{"leader_id":{{"term":1,"node_id":7}},"committed":true}},"prev_log_id":{prev},"entries":[{}],"leader_commit":null}}"#,
            entries.join(",")
        ))
        .unwrap()
    }

    #[test]
    fn only_requests_that_can_report_something_new_are_owed_a_result() {
        let mut owed = Owed::default();
        // The first request of a session is answered, entries or not (a heartbeat).
        assert!(owed.next(&req(Some(3), Some(3))));
        // The same point again: nothing new to report.
        assert!(!owed.next(&req(Some(3), Some(3))));
        // Entries are always answered.
        assert!(owed.next(&req(Some(3), Some(5))));
        // The commit-only request that follows them is not.
        assert!(!owed.next(&req(Some(5), Some(5))));
        assert!(!owed.next(&req(Some(5), Some(5))));
        // An entry-less request somewhere else (a probe after a conflict) is.
        assert!(owed.next(&req(Some(2), Some(2))));
        // A new session starts over.
        let mut owed = Owed::default();
        assert!(owed.next(&req(None, None)));
        assert!(!owed.next(&req(None, None)));
        assert!(owed.next(&req(None, Some(1))));
        assert!(!owed.next(&req(Some(1), Some(1))));
    }

    #[test]
    fn frames_read_back_what_was_written() {
        let req: Req = serde_json::from_str(
            r#"{"vote":{"leader_id":{"term":1,"node_id":7},"committed":true},"prev_log_id":null,"entries":[],"leader_commit":null}"#,
        )
        .unwrap();
        let (mut wire, mut scratch) = (Vec::new(), Vec::new());
        for _ in 0..2 {
            write_frame(&mut wire, &mut scratch, &req)
                .now_or_never()
                .unwrap()
                .unwrap();
        }
        wire.extend_from_slice(&0u32.to_le_bytes());
        let mut rest = &wire[..];
        let mut buf = Vec::new();
        for _ in 0..2 {
            match read_frame::<_, Req>(&mut rest, &mut buf)
                .now_or_never()
                .unwrap()
            {
                Ok(Frame::Item(r)) => assert_eq!(r.to_string(), req.to_string()),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            read_frame::<_, Req>(&mut rest, &mut buf)
                .now_or_never()
                .unwrap(),
            Ok(Frame::End)
        ));
        assert!(matches!(
            read_frame::<_, Req>(&mut rest, &mut buf)
                .now_or_never()
                .unwrap(),
            Ok(Frame::Closed)
        ));
    }

    #[test]
    fn frames_up_to_the_unary_body_limit_are_read_and_larger_ones_refused() {
        // A frame as large as a unary AppendEntries may be (65 MiB here, over the old
        // 64 MiB bound) is read, not refused; this one is cut short, so it ends in EOF.
        let mut wire = ((65usize << 20) as u32).to_le_bytes().to_vec();
        wire.extend_from_slice(b"{}");
        let mut buf = Vec::new();
        let r = read_frame::<_, Req>(&mut &wire[..], &mut buf)
            .now_or_never()
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
        // Past the limit: refused at the header.
        let wire = ((MAX_FRAME + 1) as u32).to_le_bytes();
        let r = read_frame::<_, Req>(&mut &wire[..], &mut buf)
            .now_or_never()
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    }

    /// A read buffer grown by a large frame goes back to a small one at the next small
    /// frame (the follower keeps one per connection, for many sessions).
    #[test]
    fn a_large_frame_does_not_keep_its_buffer() {
        let big = req(Some(0), Some(20_000));
        let small = req(Some(3), Some(3));
        let (mut wire, mut scratch) = (Vec::new(), Vec::new());
        for r in [&big, &small, &big] {
            write_frame(&mut wire, &mut scratch, r)
                .now_or_never()
                .unwrap()
                .unwrap();
        }
        let mut rest = &wire[..];
        let mut buf = Vec::new();
        let mut next = |buf: &mut Vec<u8>| match read_frame::<_, Req>(&mut rest, buf)
            .now_or_never()
            .unwrap()
        {
            Ok(Frame::Item(r)) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(next(&mut buf).entries.len(), 20_000);
        assert!(buf.capacity() > SHRINK_ABOVE, "{}", buf.capacity());
        assert_eq!(next(&mut buf).entries.len(), 0);
        assert!(buf.capacity() <= SMALL_FRAME, "kept {}", buf.capacity());
        assert_eq!(next(&mut buf).entries.len(), 20_000);
    }

    /// A follower on a slow link reads slowly but steadily (64 KiB every 200 ms, ~320
    /// KiB/s, through small socket buffers): a frame that takes it seconds still gets
    /// through, as the connection keeps taking bytes. The old limit on the whole frame
    /// (the timeout plus 1 s per 4 MiB: 300 ms here) failed it on every attempt.
    #[tokio::test]
    async fn a_frame_to_a_slow_but_steady_reader_is_written() {
        use crate::store::Command;
        use openraft::alias::{EntryOf, LogIdOf, VoteOf};
        use openraft::vote::RaftLeaderId;
        use openraft::EntryPayload;
        let listener = tokio::net::TcpSocket::new_v4().unwrap();
        listener.set_recv_buffer_size(32 << 10).unwrap();
        listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let l = listener.listen(1).unwrap();
        let addr = l.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            const CHUNK: usize = 64 << 10;
            let mut chunk = vec![0u8; CHUNK];
            loop {
                let mut window = 0;
                while window < CHUNK {
                    let n = s.read(&mut chunk[..CHUNK - window]).await.unwrap();
                    if n == 0 {
                        return got;
                    }
                    got.extend_from_slice(&chunk[..n]);
                    window += n;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(32 << 10).unwrap();
        let mut conn = socket.connect(addr).await.unwrap();
        let leader = openraft::impls::leader_id_adv::LeaderId::<u64, u64>::new(1, 7).to_committed();
        let cmd = Command::RemoveService {
            service: "x".repeat(768 << 10),
        };
        let req = AppendEntriesRequest::<C> {
            vote: VoteOf::<C>::new_committed(1, 7),
            prev_log_id: None,
            entries: vec![EntryOf::<C>::new(
                LogIdOf::<C>::new(leader, 1),
                EntryPayload::Normal(cmd),
            )],
            leader_commit: None,
        };
        let timeout = Duration::from_millis(300);
        let started = Instant::now();
        let mut buf = Vec::new();
        write_frame_within(&mut conn, &mut buf, &req, timeout)
            .await
            .expect("the frame is written");
        let took = started.elapsed();
        drop(conn);
        let got = reader.await.unwrap();
        assert_eq!(got.len(), buf.len());
        // More than the whole-frame limit allowed, and far more than one stall.
        assert!(
            took > Duration::from_secs(1),
            "the reader was not slow: {took:?}"
        );
        let mut scratch = Vec::new();
        match read_frame::<_, Req>(&mut &got[..], &mut scratch)
            .now_or_never()
            .unwrap()
        {
            Ok(Frame::Item(r)) => assert_eq!(r.entries.len(), 1),
            other => panic!("{other:?}"),
        }
    }

    /// A follower that accepts the upgrade and then stops reading: once the socket buffers
    /// are full the leader's write of a large request blocks. The session ends with an
    /// error within the write's time limit instead of hanging until TCP gives up.
    #[tokio::test]
    async fn a_follower_that_stops_reading_ends_the_session_with_an_error() {
        use crate::store::Command;
        use openraft::alias::{EntryOf, LogIdOf, VoteOf};
        use openraft::vote::RaftLeaderId;
        use openraft::EntryPayload;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            let up = format!(
                "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {PROTOCOL}\r\n\r\n"
            );
            s.write_all(up.as_bytes()).await.unwrap();
            // Never reads again, never closes.
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(s);
        });
        let leader = openraft::impls::leader_id_adv::LeaderId::<u64, u64>::new(1, 7).to_committed();
        let entries = (1..=16u64)
            .map(|i| {
                let cmd = Command::RemoveService {
                    service: format!("s{i}-{}", "x".repeat(1 << 20)),
                };
                EntryOf::<C>::new(LogIdOf::<C>::new(leader, i), EntryPayload::Normal(cmd))
            })
            .collect();
        let big = AppendEntriesRequest::<C> {
            vote: VoteOf::<C>::new_committed(1, 7),
            prev_log_id: None,
            entries,
            leader_commit: None,
        };
        let target = Target {
            http: reqwest::Client::new(),
            pool: Pool::default(),
            addr: addr.clone(),
            host: "127.0.0.1:1".into(),
            faults: Arc::new(Faults::new(false)),
            timeout: Duration::from_millis(300),
        };
        let started = Instant::now();
        let option = RPCOption::new(Duration::from_millis(300));
        let mut results = open(target, futures_util::stream::iter(vec![big]), option)
            .await
            .expect("the stream opens");
        let first = tokio::time::timeout(Duration::from_secs(10), results.next())
            .await
            .expect("no result within 10 s: the session hangs on its write");
        assert!(matches!(first, Some(Err(_))), "{first:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        server.abort();
    }
}
