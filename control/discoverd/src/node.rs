//! One discoverd node: Raft, the shared registry, leadership tracking, heartbeat
//! bookkeeping (leader memory only) and the expiry loop.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, ServerState};

use crate::config::Config;
use crate::fault::Faults;
use crate::network::{node_id, Network};
use crate::store::types::Command;
use crate::store::{LogStore, Raft, Shared, StateMachine};

pub struct Node {
    pub raft: Raft,
    pub shared: Arc<Shared>,
    pub log: LogStore,
    pub id: u64,
    /// Advertised `host:port`.
    pub host: String,
    /// The configured peer list (used before the cluster has a membership).
    pub peers: Vec<String>,
    pub ttl: Duration,
    pub shutting_down: AtomicBool,
    /// Test-only Raft RPC partitions (`--enable-fault-injection`).
    pub faults: Arc<Faults>,
    leader: Mutex<Leadership>,
    pub http: reqwest::Client,
}

#[derive(Default)]
struct Leadership {
    /// When this node last became Raft leader; `None` when it is not leader.
    since: Option<Instant>,
    /// Last heartbeat per (service, instance id); only meaningful on the leader.
    heartbeats: HashMap<(String, String), Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Node {
    pub async fn start(cfg: &Config, bound: SocketAddr) -> anyhow::Result<Arc<Node>> {
        let host = cfg.host.clone().unwrap_or_else(|| bound.to_string());
        let peers = if cfg.peers.is_empty() {
            vec![host.clone()]
        } else {
            cfg.peers.clone()
        };
        let id = node_id(&host);
        let log = LogStore::open(&cfg.data_dir.join("log")).context("open raft log")?;
        let sm = StateMachine::open(&cfg.data_dir.join("sm")).context("open state machine")?;
        let shared = sm.shared();
        let et = cfg.election_timeout.as_millis() as u64;
        let raft_cfg = openraft::Config {
            cluster_name: "discoverd".into(),
            heartbeat_interval: (et / 3).max(20),
            election_timeout_min: et,
            election_timeout_max: et * 2,
            ..Default::default()
        };
        let raft_cfg = Arc::new(raft_cfg.validate().context("raft config")?);
        let faults = Arc::new(Faults::new(cfg.enable_fault_injection));
        let network = Network::new(host.clone(), faults.clone());
        let raft = Raft::new(id, raft_cfg, network, log.clone(), sm)
            .await
            .context("start raft")?;
        if peers.contains(&host) && !raft.is_initialized().await.unwrap_or(true) {
            let members: BTreeMap<u64, BasicNode> = peers
                .iter()
                .map(|p| (node_id(p), BasicNode { addr: p.clone() }))
                .collect();
            if let Err(e) = raft.initialize(members).await {
                tracing::debug!(error = %e, "initialize");
            }
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        let node = Arc::new(Node {
            raft,
            shared,
            log,
            id,
            host,
            peers,
            ttl: cfg.instance_ttl,
            shutting_down: AtomicBool::new(false),
            faults,
            leader: Mutex::new(Leadership::default()),
            http,
        });
        tokio::spawn(track_leadership(node.clone()));
        tokio::spawn(expiry_loop(node.clone()));
        Ok(node)
    }

    /// The leader's advertised address, if one is known.
    pub fn leader_addr(&self) -> Option<String> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let id = m.current_leader?;
        m.membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    }

    pub fn is_leader(&self) -> bool {
        self.raft.is_leader()
    }

    /// Voter addresses of the membership this node knows, or the configured peers before
    /// there is one. Of a joint membership only the last (incoming) config counts: a
    /// node being removed never sees the final uniform config (openraft stops
    /// replicating to it as soon as the leader has it), so it would otherwise go on
    /// believing it is a peer.
    pub fn peer_addrs(&self) -> Vec<String> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let mem = m.membership_config.membership();
        let voters: Vec<String> = mem
            .get_joint_config()
            .last()
            .into_iter()
            .flatten()
            .filter_map(|id| mem.get_node(id).map(|n| n.addr.clone()))
            .collect();
        if voters.is_empty() {
            self.peers.clone()
        } else {
            voters
        }
    }

    /// A node is a peer iff its address is in the peer list (spec §2.1).
    pub fn is_peer(&self) -> bool {
        self.peer_addrs().contains(&self.host)
    }

    /// Records a heartbeat (leader only).
    pub fn heartbeat(&self, service: &str, id: &str) {
        lock(&self.leader)
            .heartbeats
            .insert((service.to_string(), id.to_string()), Instant::now());
    }

    pub fn forget(&self, service: &str, id: &str) {
        lock(&self.leader)
            .heartbeats
            .remove(&(service.to_string(), id.to_string()));
    }

    /// Instances whose heartbeats stopped, or `None` while expiry is suppressed (not
    /// leader, or leader for less than 2×TTL).
    fn expired(&self) -> Option<Vec<(String, String, u64)>> {
        let now = Instant::now();
        let lead = lock(&self.leader);
        let since = lead.since?;
        if now.duration_since(since) < self.ttl * 2 {
            return None;
        }
        let st = self.shared.lock();
        let mut out = Vec::new();
        for (svc, insts) in &st.registry.data.instances {
            for (id, inst) in insts {
                let key = (svc.clone(), id.clone());
                let fresh = lead
                    .heartbeats
                    .get(&key)
                    .is_some_and(|t| now.duration_since(*t) <= self.ttl);
                if !fresh {
                    out.push((svc.clone(), id.clone(), inst.index));
                }
            }
        }
        Some(out)
    }
}

/// Tracks when this node leads (for expiry), and keeps a node that is not a voter of
/// the membership it is heading to from campaigning: a removed or demoted node is never
/// told about its removal and would otherwise stand for election forever. Re-adding it
/// (promote) lets it campaign again.
async fn track_leadership(node: Arc<Node>) {
    // The server metrics change with the state, leader and membership only; the full
    // metrics change with every write, which would wake this task once per write.
    let mut rx = node.raft.server_metrics();
    let mut electable = true;
    loop {
        let (leading, voter) = {
            let m = rx.borrow_and_update();
            let mem = m.membership_config.membership();
            let joint = mem.get_joint_config();
            // No membership yet (a fresh proxy) leaves the setting alone.
            let voter = joint
                .last()
                .is_none_or(|c| c.is_empty() || c.contains(&node.id));
            (m.state == ServerState::Leader, voter)
        };
        if voter != electable {
            electable = voter;
            tracing::info!(host = %node.host, voter, "raft membership changed");
            node.raft.runtime_config().elect(voter);
        }
        {
            let mut l = lock(&node.leader);
            match (leading, l.since.is_some()) {
                (true, false) => {
                    l.since = Some(Instant::now());
                    l.heartbeats.clear();
                    tracing::info!(host = %node.host, "became raft leader");
                }
                (false, true) => {
                    l.since = None;
                    l.heartbeats.clear();
                }
                _ => {}
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn expiry_loop(node: Arc<Node>) {
    let every = (node.ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if node.shutting_down.load(Ordering::Relaxed) {
            continue;
        }
        let Some(expired) = node.expired() else {
            continue;
        };
        if expired.is_empty() {
            continue;
        }
        tracing::info!(count = expired.len(), "expiring instances");
        for (s, id, _) in &expired {
            node.forget(s, id);
        }
        if let Err(e) = node
            .raft
            .client_write(Command::ExpireInstances { instances: expired })
            .await
        {
            tracing::warn!(error = %e, "expire instances");
        }
    }
}
