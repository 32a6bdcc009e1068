//! discoverd: the cluster's service registry (spec §2).
//!
//! Services, heartbeated instances, per-service metadata with compare-and-swap, and a
//! leader per service, replicated with openraft among the peer nodes; SSE watches; a
//! follower or proxy node redirects writes to the Raft leader. Laid out like openraft's
//! `raft-kv-memstore` example: `store` (state machine, file-backed log), `network`
//! (Raft RPC client), `api` (HTTP API and Raft RPC server), `dns` (the `discoverd.`
//! zone), `fault` (test-only partitions). Clients use
//! `flynn-client`'s discoverd client; the router and schedulers depend on it.

pub mod api;
pub mod config;
pub mod dns;
pub mod fault;
pub mod network;
pub mod node;
pub mod notify;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

pub use config::Config;
pub use node::Node;

/// A started node: its bound address and handle.
pub struct Running {
    pub addr: SocketAddr,
    /// The bound DNS address (UDP and TCP), when `--dns-addr` is set.
    pub dns: Option<SocketAddr>,
    pub node: Arc<Node>,
}

/// Binds the listener, starts Raft and serves the API in the background.
pub async fn start(cfg: &Config) -> anyhow::Result<Running> {
    cfg.validate().map_err(|e| anyhow::anyhow!(e))?;
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .with_context(|| format!("bind {}", cfg.addr))?;
    let addr = listener.local_addr()?;
    let node = Node::start(cfg, addr).await?;
    let dns = match cfg.dns_addr {
        Some(a) if cfg.wait_net_dns => {
            // Only DNS waits for the host's network (and its resolvers): the API and Raft
            // serve at once, since the overlay that brings the network up leases its block
            // through this very API.
            let recursors = cfg.recursors.clone();
            let notify = cfg.notify.clone().expect("validated");
            let after = async move {
                let resolvers = notify::wait_for_host_network(&notify).await;
                if recursors.is_empty() {
                    resolvers
                } else {
                    recursors
                }
            };
            Some(dns::serve_after(a, node.clone(), after).await?)
        }
        Some(a) => Some(dns::serve(a, node.clone(), cfg.recursors.clone()).await?),
        None => None,
    };
    let app = api::router(node.clone());
    tokio::spawn(api::serve(listener, app, cfg.header_read_timeout));
    if let Some(url) = cfg.notify.clone() {
        let body = notify::Notification {
            job_id: std::env::var("FLYNN_JOB_ID").unwrap_or_default(),
            url: format!("http://{}", node.host),
            dns: dns.map(|d| d.to_string()).unwrap_or_default(),
        };
        tokio::spawn(notify::notify(url, body));
    }
    Ok(Running { addr, dns, node })
}
