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
use hickory_server::proto::rr::Record;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;

use crate::node::Node;

/// How long a proxy waits for a peer's answer about a service.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// A registry holding only `service`, as a peer reports it (instances and leader), for a
/// proxy to answer from. `None` when no peer answered.
async fn from_peer(node: &Node, service: &str) -> Option<crate::store::state::Registry> {
    use crate::store::types::{Instance, LeaderType, ServiceConfig};
    let peers = node.peer_addrs();
    if peers.is_empty() {
        return None;
    }
    let peer = &peers[fastrand::usize(..peers.len())];
    let base = format!("http://{peer}/services/{service}");
    let get = |path: &'static str| {
        node.http
            .get(format!("{base}{path}"))
            .timeout(PEER_TIMEOUT)
            .send()
    };
    // 404 from either: no instances (or no service) / no leader.
    let insts: Vec<Instance> = match get("/instances").await.ok()? {
        r if r.status() == reqwest::StatusCode::NOT_FOUND => Vec::new(),
        r if r.status().is_success() => r.json().await.ok()?,
        _ => return None,
    };
    let leader: Option<Instance> = match get("/leader").await.ok()? {
        r if r.status() == reqwest::StatusCode::NOT_FOUND => None,
        r if r.status().is_success() => Some(r.json().await.ok()?),
        _ => return None,
    };
    let mut reg = crate::store::state::Registry::default();
    // A service without instances reads as unknown here (the API answers 404 for both).
    if insts.is_empty() && leader.is_none() {
        return Some(reg);
    }
    reg.data.services.insert(
        service.to_string(),
        ServiceConfig {
            leader_type: LeaderType::Manual,
        },
    );
    if let Some(l) = leader {
        reg.data.leaders.insert(service.to_string(), l.id);
    }
    reg.data.instances.insert(
        service.to_string(),
        insts.into_iter().map(|i| (i.id.clone(), i)).collect(),
    );
    Some(reg)
}

struct Handler {
    node: Arc<Node>,
    recursors: Vec<SocketAddr>,
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
    let (udp, tcp, bound) = bind_pair(addr).await?;
    tokio::spawn(async move {
        let recursors = recursors.await;
        run(udp, tcp, node, recursors).await;
    });
    Ok(bound)
}

async fn run(
    udp: tokio::net::UdpSocket,
    tcp: tokio::net::TcpListener,
    node: Arc<Node>,
    recursors: Vec<SocketAddr>,
) {
    let mut server = Server::new(Handler { node, recursors });
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
        let sent = match request.request_info() {
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
                    Some(svc) if !self.node.is_peer() => Some(from_peer(&self.node, &svc).await),
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
                    Lookup::NotOurs if self.recursors.is_empty() => {
                        let msg = builder.error_msg(&request.metadata, ResponseCode::Refused);
                        response.send_response(msg).await
                    }
                    Lookup::NotOurs => match forward::forward(&self.recursors, q, tcp).await {
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
                        let soa: Vec<Record> = if answers.is_empty() {
                            vec![soa(serial())]
                        } else {
                            Vec::new()
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
