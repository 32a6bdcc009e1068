//! DNS for the `discoverd.` zone (spec §2.8), served with `hickory-server` over UDP and
//! TCP on `--dns-addr`: `<svc>.discoverd` (instances), `_<svc>._<proto>.discoverd`
//! (SRV), `<id>.<svc>._i.discoverd` (one instance), `leader.<svc>.discoverd`.
//! Answers are authoritative with TTL 0, read from this node's applied state; an empty
//! answer carries the zone's SOA. Names outside the zone are forwarded to `--recursors`
//! ([`forward`]; SERVFAIL when all fail) or, with none configured, REFUSED. A node that was
//! shut down (`POST /shutdown`) answers SERVFAIL to everything. A proxy (a node outside the
//! peers, with no state of its own) answers names of the zone from what a peer's HTTP API
//! says about the service ([`from_peer`]), as Flynn's proxy store does; a peer that does not
//! follow the cluster (no leader for a while) answers SERVFAIL for them.

mod forward;
pub mod zone;

pub use zone::{lookup, soa, Lookup, UDP_INSTANCE_LIMIT};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{Metadata, ResponseCode};
use hickory_server::proto::rr::{Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;

use crate::node::Node;

/// How long a proxy waits for a peer's answer about a service.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// What a peer says about one service: its instances and its leader.
#[derive(Clone)]
struct PeerView {
    insts: Vec<crate::store::types::Instance>,
    leader: Option<crate::store::types::Instance>,
}

/// Asks a random peer's HTTP API about `service` (both requests at once), and a second
/// one when the first does not answer (down, or following no leader: 503). `None` when
/// neither answered.
async fn peer_view(node: &Node, service: &str) -> Option<PeerView> {
    let peers = node.peer_addrs();
    if peers.is_empty() {
        return None;
    }
    let first = fastrand::usize(..peers.len());
    for k in 0..peers.len().min(2) {
        if let Some(v) = ask_peer(node, &peers[(first + k) % peers.len()], service).await {
            return Some(v);
        }
    }
    None
}

/// One peer's view of `service`; `None` unless both requests got an answer that counts.
async fn ask_peer(node: &Node, peer: &str, service: &str) -> Option<PeerView> {
    use crate::store::types::Instance;
    let base = format!("http://{peer}/services/{service}");
    let get = |path: &'static str| {
        node.http
            .get(format!("{base}{path}"))
            .timeout(PEER_TIMEOUT)
            .send()
    };
    let (insts, leader) = tokio::join!(get("/instances"), get("/leader"));
    // 404 from either: no instances (or no service) / no leader.
    let insts: Vec<Instance> = match insts.ok()? {
        r if r.status() == reqwest::StatusCode::NOT_FOUND => Vec::new(),
        r if r.status().is_success() => r.json().await.ok()?,
        _ => return None,
    };
    let leader: Option<Instance> = match leader.ok()? {
        r if r.status() == reqwest::StatusCode::NOT_FOUND => None,
        r if r.status().is_success() => Some(r.json().await.ok()?),
        _ => return None,
    };
    Some(PeerView { insts, leader })
}

/// A registry holding only `service` as `view` has it, for a proxy to answer from.
fn registry_of(service: &str, view: PeerView) -> crate::store::state::Registry {
    use crate::store::types::{LeaderType, ServiceConfig};
    let mut reg = crate::store::state::Registry::default();
    // A service without instances reads as unknown here (the API answers 404 for both).
    if view.insts.is_empty() && view.leader.is_none() {
        return reg;
    }
    reg.data.services.insert(
        service.to_string(),
        ServiceConfig {
            leader_type: LeaderType::Manual,
        },
    );
    if let Some(l) = view.leader {
        reg.data.leaders.insert(service.to_string(), l.id);
    }
    reg.data.instances.insert(
        service.to_string(),
        std::sync::Arc::new(view.insts.into_iter().map(|i| (i.id.clone(), i)).collect()),
    );
    reg
}

/// A proxy's recent peer answers, per service, kept for [`PeerCache::FOR`]: a job resolving
/// the same name again and again (every connection, or every lookup of a resolver without a
/// cache) mostly hits the cache, and a hit answers at once. Misses for one service at the
/// same moment share one peer request. Failures are not kept; an answer never replaces a
/// newer one.
#[derive(Default)]
struct PeerCache {
    views: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, PeerView)>>,
    /// Peer requests under way, per service.
    inflight: std::sync::Mutex<std::collections::HashMap<String, PeerFetch>>,
}

type PeerFetch =
    futures_util::future::Shared<futures_util::future::BoxFuture<'static, Option<PeerView>>>;

/// Removes a service's in-flight entry when the request that made it ends or is dropped
/// (a cancelled lookup must not leave its finished answer there for good).
struct InflightGuard<'a> {
    cache: &'a PeerCache,
    service: &'a str,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.cache
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(self.service);
    }
}

impl PeerCache {
    const FOR: Duration = Duration::from_secs(1);
    /// Services kept at most; past it, stale entries go, then all.
    const MAX: usize = 4096;

    fn get(&self, service: &str, now: std::time::Instant) -> Option<PeerView> {
        let m = self.views.lock().unwrap_or_else(|e| e.into_inner());
        m.get(service)
            .filter(|(at, _)| now.saturating_duration_since(*at) < Self::FOR)
            .map(|(_, v)| v.clone())
    }

    /// The cached view of `service`, or the answer of the peer request for it under way,
    /// or of a new one made with `fetch` (whose answer is then cached).
    async fn get_or_fetch<Fut>(
        &self,
        service: &str,
        fetch: impl FnOnce() -> Fut,
    ) -> Option<PeerView>
    where
        Fut: std::future::Future<Output = Option<PeerView>> + Send + 'static,
    {
        use futures_util::FutureExt;
        let now = std::time::Instant::now();
        if let Some(v) = self.get(service, now) {
            return Some(v);
        }
        let (shared, guard) = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            match inflight.get(service) {
                Some(f) => (f.clone(), None),
                None => {
                    let f = fetch().boxed().shared();
                    inflight.insert(service.to_string(), f.clone());
                    (
                        f,
                        Some(InflightGuard {
                            cache: self,
                            service,
                        }),
                    )
                }
            }
        };
        let v = shared.await;
        if let Some(guard) = guard {
            drop(guard);
            if let Some(v) = &v {
                self.put(service, v.clone(), now);
            }
        }
        v
    }

    fn put(&self, service: &str, view: PeerView, now: std::time::Instant) {
        let mut m = self.views.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= Self::MAX && !m.contains_key(service) {
            m.retain(|_, (at, _)| now.saturating_duration_since(*at) < Self::FOR);
            if m.len() >= Self::MAX {
                m.clear();
            }
        }
        match m.get(service) {
            // A slow answer to an older question does not replace a newer one.
            Some((at, _)) if *at > now => {}
            _ => {
                m.insert(service.to_string(), (now, view));
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.views.lock().unwrap().len()
    }
}

/// The registry a proxy answers `service` from: the cached peer view, or a fresh one.
async fn from_peer(
    node: &Arc<Node>,
    cache: &PeerCache,
    service: &str,
) -> Option<crate::store::state::Registry> {
    let (n, svc) = (node.clone(), service.to_string());
    let view = cache
        .get_or_fetch(service, move || async move { peer_view(&n, &svc).await })
        .await?;
    Some(registry_of(service, view))
}

/// Bounds on the work DNS takes on at once. hickory-server spawns a task per datagram and
/// per TCP query, so without them a burst (or recursors that stopped answering, each
/// forward holding a socket for [`forward::RECURSOR_TIMEOUT`]) grows tasks and sockets
/// without end, until the process runs out of descriptors for its API and Raft.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Queries handled at once; past it a query is answered SERVFAIL at once.
    pub requests: usize,
    /// Queries being forwarded to recursors at once (one socket each); past it SERVFAIL.
    pub forwards: usize,
    /// Deadline of one exchange with one recursor.
    pub recursor_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            requests: 1024,
            forwards: 256,
            recursor_timeout: forward::RECURSOR_TIMEOUT,
        }
    }
}

struct Handler {
    node: Arc<Node>,
    forwarder: forward::Forwarder,
    peer_cache: PeerCache,
    /// Queries being handled ([`Limits::requests`]).
    requests: tokio::sync::Semaphore,
}

/// Binds UDP and TCP on `addr` (the same port for both; port 0 picks one) and serves in
/// the background. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    node: Arc<Node>,
    recursors: Vec<SocketAddr>,
) -> anyhow::Result<SocketAddr> {
    serve_after(addr, node, async move { recursors }).await
}

/// Like [`serve`], but queries are answered only once `recursors` resolves (they wait in
/// the sockets until then): the address is bound, and known, at once.
pub async fn serve_after(
    addr: SocketAddr,
    node: Arc<Node>,
    recursors: impl std::future::Future<Output = Vec<SocketAddr>> + Send + 'static,
) -> anyhow::Result<SocketAddr> {
    serve_with(addr, node, recursors, Limits::default()).await
}

/// [`serve_after`] with the given [`Limits`].
pub async fn serve_with(
    addr: SocketAddr,
    node: Arc<Node>,
    recursors: impl std::future::Future<Output = Vec<SocketAddr>> + Send + 'static,
    limits: Limits,
) -> anyhow::Result<SocketAddr> {
    let (udp, tcp, bound) = bind_pair(addr).await?;
    tokio::spawn(async move {
        let recursors = recursors.await;
        run(udp, tcp, node, recursors, limits).await;
    });
    Ok(bound)
}

async fn run(
    udp: tokio::net::UdpSocket,
    tcp: tokio::net::TcpListener,
    node: Arc<Node>,
    recursors: Vec<SocketAddr>,
    limits: Limits,
) {
    let mut server = Server::new(Handler {
        node,
        forwarder: forward::Forwarder::new(recursors, limits.forwards, limits.recursor_timeout),
        peer_cache: PeerCache::default(),
        requests: tokio::sync::Semaphore::new(limits.requests),
    });
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 64);
    // The server's tasks live as long as it does.
    if let Err(e) = server.block_until_done().await {
        tracing::error!(error = %e, "dns server stopped");
    }
}

/// Binds a TCP listener and a UDP socket on one port. With port 0 the kernel picks the
/// TCP port, and the UDP bind on the same number is retried with a fresh pick when that
/// number is taken (another process may hold it for UDP, or, the other way round, for an
/// outgoing TCP connection), so an ephemeral-port clash never fails startup.
async fn bind_pair(
    addr: SocketAddr,
) -> anyhow::Result<(tokio::net::UdpSocket, tokio::net::TcpListener, SocketAddr)> {
    let attempts = if addr.port() == 0 { 32 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind dns tcp {addr}"))?;
        let bound = tcp.local_addr()?;
        match tokio::net::UdpSocket::bind(bound).await {
            Ok(udp) => return Ok((udp, tcp, bound)),
            Err(e) => last = Some(anyhow::Error::new(e).context(format!("bind dns udp {bound}"))),
        }
    }
    Err(last.expect("at least one attempt"))
}

fn serial() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as u32)
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut meta = Metadata::response_from_request(&request.metadata);
        // Past the bound a query is answered at once (resolvers move on to their next
        // server) rather than queued behind the ones being handled.
        let permit = self.requests.try_acquire();
        let sent = match request.request_info() {
            _ if permit.is_err() => {
                tracing::debug!("too many dns queries under way");
                let msg = builder.error_msg(&request.metadata, ResponseCode::ServFail);
                response.send_response(msg).await
            }
            Err(_) => {
                let msg = builder.error_msg(&request.metadata, ResponseCode::FormErr);
                response.send_response(msg).await
            }
            // After `POST /shutdown` this node's registry no longer follows the cluster:
            // SERVFAIL sends resolvers to their next server instead of a frozen answer.
            Ok(_)
                if self
                    .node
                    .shutting_down
                    .load(std::sync::atomic::Ordering::Relaxed) =>
            {
                let msg = builder.error_msg(&request.metadata, ResponseCode::ServFail);
                response.send_response(msg).await
            }
            Ok(info) => {
                let tcp = request.protocol() == Protocol::Tcp;
                let q = info.query.original();
                let proxied = match zone::service_of(q.name()) {
                    Some(svc) if !self.node.is_peer() => {
                        Some(from_peer(&self.node, &self.peer_cache, &svc).await)
                    }
                    _ => None,
                };
                let (found, following) = match &proxied {
                    // A proxy answers from a peer's view; no peer answering is SERVFAIL.
                    Some(Some(reg)) => (lookup(reg, q.name(), q.query_type(), tcp), true),
                    Some(None) => (zone::servfail(), false),
                    None => {
                        let st = self.node.shared.lock();
                        let found = lookup(&st.registry, q.name(), q.query_type(), tcp);
                        (found, st.registry.following())
                    }
                };
                match found {
                    Lookup::NotOurs if self.forwarder.is_empty() => {
                        let msg = builder.error_msg(&request.metadata, ResponseCode::Refused);
                        response.send_response(msg).await
                    }
                    Lookup::NotOurs => match self.forwarder.forward(q, tcp).await {
                        Some(m) => {
                            meta.response_code = m.metadata.response_code;
                            meta.recursion_available = true;
                            meta.authoritative = false;
                            let msg = builder.build(
                                meta,
                                m.answers.iter(),
                                m.authorities.iter(),
                                std::iter::empty(),
                                m.additionals.iter(),
                            );
                            response.send_response(msg).await
                        }
                        None => {
                            let msg = builder.error_msg(&request.metadata, ResponseCode::ServFail);
                            response.send_response(msg).await
                        }
                    },
                    // Out of the voters, or without a leader for a while, this node's
                    // state no longer follows the cluster: names of its zone get SERVFAIL
                    // (resolvers try their next server), not a frozen answer.
                    Lookup::Answer { .. } if !following => {
                        let msg = builder.error_msg(&request.metadata, ResponseCode::ServFail);
                        response.send_response(msg).await
                    }
                    Lookup::Answer {
                        code,
                        answers,
                        additionals,
                    } => {
                        meta.authoritative = true;
                        meta.response_code = code;
                        let apex = q.name().num_labels() == 1;
                        let (answers, soa): (Vec<Record>, Vec<Record>) = if answers.is_empty() {
                            // An SOA query at the apex is answered with it.
                            if apex && matches!(q.query_type(), RecordType::SOA | RecordType::ANY) {
                                (vec![soa(serial())], Vec::new())
                            } else {
                                (answers, vec![soa(serial())])
                            }
                        } else {
                            (answers, Vec::new())
                        };
                        let msg = builder.build(
                            meta,
                            answers.iter(),
                            std::iter::empty(),
                            soa.iter(),
                            additionals.iter(),
                        );
                        response.send_response(msg).await
                    }
                }
            }
        };
        match sent {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "dns response not sent");
                let mut m = Metadata::response_from_request(&request.metadata);
                m.response_code = ResponseCode::ServFail;
                hickory_server::proto::op::Header {
                    metadata: m,
                    counts: Default::default(),
                }
                .into()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn view(n: usize) -> PeerView {
        let insts = (0..n)
            .map(|i| crate::store::types::Instance {
                id: format!("i{i}"),
                addr: format!("10.0.0.{i}:80"),
                ..Default::default()
            })
            .collect();
        PeerView {
            insts,
            leader: None,
        }
    }

    /// Lookups of one service that miss at the same moment share one peer request, and
    /// the next one after it is answered from the cache.
    #[tokio::test]
    async fn concurrent_misses_share_one_peer_request() {
        let c = Arc::new(PeerCache::default());
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (c, asked) = (c.clone(), asked.clone());
            tasks.push(tokio::spawn(async move {
                c.get_or_fetch("web", move || async move {
                    asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Some(view(3))
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().insts.len(), 3);
        }
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(c.inflight.lock().unwrap().is_empty());
        let again = c.get_or_fetch("web", || async { None }).await;
        assert_eq!(again.unwrap().insts.len(), 3, "not from the cache");

        // A lookup dropped while its request is under way leaves no entry behind: the
        // next miss asks again.
        let c = PeerCache::default();
        let slow = c.get_or_fetch("db", || async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Some(view(1))
        });
        assert!(tokio::time::timeout(Duration::from_millis(20), slow)
            .await
            .is_err());
        assert!(c.inflight.lock().unwrap().is_empty());
        let got = c.get_or_fetch("db", || async { Some(view(2)) }).await;
        assert_eq!(got.unwrap().insts.len(), 2);
    }

    #[test]
    fn peer_answers_are_kept_for_a_second_and_bounded() {
        let c = PeerCache::default();
        let t0 = Instant::now();
        assert!(c.get("a", t0).is_none());
        c.put("a", view(2), t0);
        assert_eq!(
            c.get("a", t0 + Duration::from_millis(900))
                .unwrap()
                .insts
                .len(),
            2
        );
        assert!(
            c.get("a", t0 + PeerCache::FOR).is_none(),
            "kept past its second"
        );
        // A newer answer replaces it.
        c.put("a", view(1), t0 + Duration::from_secs(2));
        assert_eq!(
            c.get("a", t0 + Duration::from_secs(2)).unwrap().insts.len(),
            1
        );

        // Bounded: at the limit, stale entries go first, then all.
        let c = PeerCache::default();
        for i in 0..PeerCache::MAX {
            c.put(&format!("s{i}"), view(0), t0);
        }
        assert_eq!(c.len(), PeerCache::MAX);
        let soon = t0 + Duration::from_millis(500);
        c.put("s0", view(1), soon);
        assert_eq!(
            c.len(),
            PeerCache::MAX,
            "a service already kept is replaced in place"
        );
        c.put("fresh", view(0), soon);
        assert_eq!(c.len(), 1, "all fresh: everything dropped to make room");
        let c = PeerCache::default();
        for i in 0..PeerCache::MAX - 1 {
            c.put(&format!("s{i}"), view(0), t0);
        }
        let later = t0 + Duration::from_secs(5);
        c.put("kept", view(0), later);
        c.put("new", view(0), later);
        assert_eq!(
            c.len(),
            2,
            "every stale entry dropped to make room, fresh ones kept"
        );
        assert!(c.get("kept", later).is_some() && c.get("new", later).is_some());
    }

    /// Recursors that never answer: the forwards under way stay at the bound (one socket
    /// each), and the queries past it are answered SERVFAIL at once instead of each
    /// holding a task and a socket.
    #[tokio::test]
    async fn forwards_to_a_silent_recursor_stay_bounded_and_the_rest_fail_at_once() {
        use clap::Parser;
        use hickory_server::proto::op::{Message, Query};
        use hickory_server::proto::rr::Name;
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().to_str().unwrap();
        let cfg = crate::Config::try_parse_from(["d", "--data-dir", data_dir]).unwrap();
        let node = Node::start(&cfg, "127.0.0.1:1".parse().unwrap())
            .await
            .unwrap();
        // The recursor reads every query and answers none.
        let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sink_addr = sink.local_addr().unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let counter = received.clone();
        let sink_task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while sink.recv_from(&mut buf).await.is_ok() {
                counter.fetch_add(1, SeqCst);
            }
        });
        let limits = Limits {
            requests: 8,
            forwards: 4,
            recursor_timeout: Duration::from_secs(3600),
        };
        let dns = serve_with(
            "127.0.0.1:0".parse().unwrap(),
            node.clone(),
            async move { vec![sink_addr] },
            limits,
        )
        .await
        .unwrap();

        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        const QUERIES: u16 = 40;
        for id in 0..QUERIES {
            let mut m = Message::query();
            m.metadata.id = id;
            m.metadata.recursion_desired = true;
            m.add_query(Query::query(
                Name::from_ascii("example.com.").unwrap(),
                RecordType::A,
            ));
            client.send_to(&m.to_vec().unwrap(), dns).await.unwrap();
        }
        // Every query past the bound gets its SERVFAIL while the others still wait on the
        // recursor (whose deadline is an hour away).
        let excess = usize::from(QUERIES) - limits.forwards;
        let mut answered = std::collections::HashSet::new();
        let mut buf = vec![0u8; 4096];
        while answered.len() < excess {
            let (n, _) = tokio::time::timeout(Duration::from_secs(20), client.recv_from(&mut buf))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{} of {excess} queries past the bound answered; recursor got {}",
                        answered.len(),
                        received.load(SeqCst)
                    )
                })
                .unwrap();
            let m = Message::from_vec(&buf[..n]).unwrap();
            assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
            assert!(answered.insert(m.metadata.id), "answered twice");
        }
        // What was not answered is at the recursor: exactly the bound's worth of queries
        // (sockets), and no more can come (every other query has been answered).
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while received.load(SeqCst) < limits.forwards && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(received.load(SeqCst), limits.forwards);
        sink_task.abort();
        let _ = node.raft.shutdown().await;
    }

    #[test]
    fn a_peer_view_becomes_a_registry_of_that_service() {
        let mut v = view(2);
        v.leader = Some(v.insts[1].clone());
        let reg = registry_of("web", v);
        assert_eq!(reg.data.instances["web"].len(), 2);
        assert_eq!(reg.data.leaders["web"], "i1");
        let empty = registry_of("web", view(0));
        assert!(!empty.data.services.contains_key("web"));
    }
}
