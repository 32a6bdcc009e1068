//! One discoverd node: Raft, the shared registry, leadership tracking, heartbeat
//! bookkeeping (leader memory only, `leadership`) and the expiry loop.

mod leadership;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, ServerState};
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use crate::config::Config;
use crate::fault::Faults;
use crate::network::{node_id, Network};
use crate::store::types::Command;
use crate::store::{LogStore, Raft, Shared, StateMachine};
use leadership::{Expired, Leadership};

/// Most entries in one AppendEntries request (openraft's default is 300). With API writes
/// of up to `api::WRITE_BODY_LIMIT` bytes each, a batch stays well under the replication
/// frame limit; a frame over it could never be delivered, and the follower behind would
/// never catch up.
pub const MAX_PAYLOAD_ENTRIES: u64 = 100;

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
    /// How long a replication stream from a leader may bring nothing (`--raft-stream-idle`).
    pub stream_idle: Duration,
    leader: Mutex<Leadership>,
    /// Woken when an expiry write returns (heartbeats held back by it look again).
    expiry_done: Notify,
    /// This node leads, but no quorum has acknowledged it for [`LEADERLESS_LIMIT`]: it is
    /// cut off from the others (openraft keeps such a leader until it hears a higher vote).
    /// It answers as a node without a leader until a quorum acknowledges it again.
    cut_off: AtomicBool,
    /// When this node last received an append (or heartbeat) from a leader: milliseconds
    /// since `epoch`, plus one (0: never). See [`Node::hears_leader`].
    leader_heard: AtomicU64,
    /// When this node last received a vote or pre-vote request, in the same clock as
    /// `leader_heard` (0: never). See [`campaign_at_lease_end`].
    ballot_heard: AtomicU64,
    epoch: std::time::Instant,
    /// openraft's leader lease plus the longest election timeout (4× the election timeout):
    /// a follower that has not heard its leader for this long would have stood for election
    /// itself (openraft's timer campaigns once the lease and then an election timeout have
    /// passed; `campaign_at_lease_end` sooner, after the lease).
    leader_silence: Duration,
    pub http: reqwest::Client,
    /// SSE watches open on this node (`--max-watches` permits).
    pub watches: Arc<tokio::sync::Semaphore>,
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
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(cfg.snapshot_count),
            max_in_snapshot_log_to_keep: cfg.snapshot_count.min(1000),
            // A follower whose timer fired asks first whether the others would vote for it:
            // one that was starved of CPU or cut off for a moment, while the others still
            // hear the leader, neither raises its term nor unseats a working leader.
            enable_pre_vote: Some(true),
            max_payload_entries: MAX_PAYLOAD_ENTRIES,
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
            // Under the peers' 30 s idle close (the API server's header read timeout).
            .pool_idle_timeout(Duration::from_secs(20))
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
            stream_idle: cfg.raft_stream_idle,
            leader: Mutex::new(Leadership::default()),
            expiry_done: Notify::new(),
            cut_off: AtomicBool::new(false),
            leader_heard: AtomicU64::new(0),
            ballot_heard: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            // openraft's lease is `election_timeout_max` (2× `et`).
            leader_silence: Duration::from_millis(et * 4),
            http,
            watches: Arc::new(tokio::sync::Semaphore::new(cfg.max_watches)),
        });
        tokio::spawn(track_leadership(node.clone()));
        tokio::spawn(campaign_at_lease_end(
            node.clone(),
            Duration::from_millis(et * 2),
            Duration::from_millis(et),
        ));
        tokio::spawn(expiry_loop(node.clone()));
        Ok(node)
    }

    /// The Raft term this node is in (an election raises it).
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow_watched().current_term
    }

    /// An append, heartbeat or snapshot from a leader came in (see [`Node::hears_leader`];
    /// recorded as it arrives: a deposed leader's, refused, steps it down at once).
    pub fn heard_from_leader(&self) {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        self.leader_heard.store(now, Ordering::Release);
    }

    /// A peer's vote or pre-vote request came in (a peer is campaigning).
    pub fn heard_ballot(&self) {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        self.ballot_heard.store(now, Ordering::Release);
    }

    /// Whether an append, heartbeat or snapshot from a leader came in within
    /// `leader_silence` (lease and election timeout). With Pre-Vote a follower cut off from
    /// its leader stays a follower of that leader (its pre-votes fail, so it never becomes a
    /// candidate and openraft keeps naming the leader): past this silence it counts as
    /// knowing no leader, as it did when it campaigned.
    fn hears_leader(&self) -> bool {
        let at = self.leader_heard.load(Ordering::Acquire);
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        at != 0 && now.saturating_sub(at) <= self.leader_silence.as_millis() as u64
    }

    /// The leader's advertised address, if one is known (a leader cut off from the
    /// others knows none, nor does a follower that no longer hears it).
    pub fn leader_addr(&self) -> Option<String> {
        if self.cut_off.load(Ordering::Acquire) {
            return None;
        }
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let id = m.current_leader?;
        if id != self.id && !self.hears_leader() {
            return None;
        }
        m.membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    }

    /// Whether this node leads and a quorum acknowledged it within [`LEADERLESS_LIMIT`].
    pub fn is_leader(&self) -> bool {
        self.raft.is_leader() && !self.cut_off.load(Ordering::Acquire)
    }

    /// Addresses of the nodes the membership has as learners: replicated to, not voting (a
    /// peer being added).
    pub fn learner_addrs(&self) -> Vec<String> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let mem = m.membership_config.membership();
        let addrs = mem
            .learner_ids()
            .filter_map(|id| mem.get_node(&id).map(|n| n.addr.clone()))
            .collect();
        addrs
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

    /// Records a heartbeat (leader only). While an expiry naming the instance is in
    /// flight nothing is recorded: the error resolves once that expiry's write has
    /// returned, and the caller tries again and then reads the state (the instance may be
    /// gone).
    pub fn heartbeat(&self, service: &str, id: &str) -> Result<(), Notified<'_>> {
        let mut l = lock(&self.leader);
        if l.heartbeat(service, id, Instant::now()) {
            Ok(())
        } else {
            // Made under the lock `end_expiry` takes before it notifies: no wake-up lost.
            Err(self.expiry_done.notified())
        }
    }

    pub fn forget(&self, service: &str, id: &str) {
        lock(&self.leader).forget(service, id);
    }

    /// Marks a registration write of the instance in flight until the guard drops (the
    /// write returned, or the request was dropped): the instance is not expired meanwhile,
    /// and counts as heartbeating when it ends.
    pub fn registering(&self, service: &str, id: &str) -> Registering<'_> {
        lock(&self.leader).begin_register(service, id);
        Registering {
            node: self,
            service: service.to_string(),
            id: id.to_string(),
        }
    }

    /// Instances whose heartbeats stopped, held in flight until [`Node::end_expiry`];
    /// `None` while expiry is suppressed (not leader, or leader for less than 2×TTL) or
    /// nothing is due.
    fn begin_expiry(&self) -> Option<Vec<Expired>> {
        let mut lead = lock(&self.leader);
        let st = self.shared.lock();
        let batch = lead.begin_expiry(Instant::now(), self.ttl, &st.registry.data)?;
        (!batch.is_empty()).then_some(batch)
    }

    fn end_expiry(&self, batch: &[Expired]) {
        lock(&self.leader).end_expiry(batch);
        self.expiry_done.notify_waiters();
    }
}

/// A registration write in flight ([`Node::registering`]).
pub struct Registering<'a> {
    node: &'a Node,
    service: String,
    id: String,
}

impl Drop for Registering<'_> {
    fn drop(&mut self) {
        lock(&self.node.leader).end_register(&self.service, &self.id, Instant::now());
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
    let mut following = true;
    // Since when no leader is known (None while one is).
    let mut leaderless: Option<tokio::time::Instant> = None;
    // Since when this node leads (None while it does not).
    let mut leading_since: Option<tokio::time::Instant> = None;
    loop {
        let (raft_leading, voter, names_leader, has_leader, sole_voter) = {
            let m = rx.borrow_and_update();
            let mem = m.membership_config.membership();
            let joint = mem.get_joint_config();
            // No membership yet (a fresh proxy) leaves the setting alone.
            let voter = joint
                .last()
                .is_none_or(|c| c.is_empty() || c.contains(&node.id));
            let sole_voter = joint.len() == 1 && joint[0].len() == 1 && joint[0].contains(&node.id);
            let leading = m.state == ServerState::Leader;
            let names_leader = m.current_leader.is_some();
            (
                leading,
                voter,
                names_leader,
                names_leader && (leading || node.hears_leader()),
                sole_voter,
            )
        };
        leading_since = match (raft_leading, leading_since) {
            (false, _) => None,
            (true, None) => Some(tokio::time::Instant::now()),
            (true, since) => since,
        };
        // A leader counts its quorum's acknowledgements (heartbeat answers): a leader cut
        // off from the others keeps its role in openraft until it hears a higher vote,
        // and would serve a frozen state as the cluster's (watches, DNS, its own
        // address as the leader's) while the majority has elected another.
        let cut_off = match leading_since {
            Some(since) if !sole_voter => {
                let acked = node.raft.metrics().borrow_watched().last_quorum_acked;
                // Counted from the later of the last acknowledgement and the election.
                let age = acked.map_or(since.elapsed(), |t| {
                    openraft::Instant::elapsed(&t.into_inner()).min(since.elapsed())
                });
                age >= LEADERLESS_LIMIT
            }
            _ => false,
        };
        if node.cut_off.swap(cut_off, Ordering::AcqRel) != cut_off {
            tracing::warn!(host = %node.host, cut_off, "raft leader without a quorum's acknowledgement");
        }
        let leading = raft_leading && !cut_off;
        let has_leader = has_leader && !cut_off;
        if voter != electable {
            electable = voter;
            tracing::info!(host = %node.host, voter, "raft membership changed");
            node.raft.runtime_config().elect(voter);
        }
        leaderless = match (has_leader, leaderless) {
            (true, _) => None,
            (false, None) => Some(tokio::time::Instant::now()),
            (false, since) => since,
        };
        // A node out of the voters gets no more entries, and one without a leader for a
        // while (cut off, or removed while it was down and never told) gets none either:
        // its watches would freeze (keep-alives still flowing) and its DNS answer from a
        // state that no longer changes. They end, and DNS answers SERVFAIL, until it
        // follows a leader again.
        // A cut-off leader has already gone LEADERLESS_LIMIT without its quorum.
        let lost = cut_off || leaderless.is_some_and(|t| t.elapsed() >= LEADERLESS_LIMIT);
        let now_following = voter && !lost;
        if now_following != following {
            following = now_following;
            tracing::info!(host = %node.host, following, "following the cluster");
            let mut st = node.shared.lock();
            if following {
                st.registry.follow_again();
            } else {
                st.registry.stop_following();
            }
        }
        {
            let mut l = lock(&node.leader);
            match (leading, l.is_leading()) {
                (true, false) => {
                    l.set_leading(Some(Instant::now()));
                    tracing::info!(host = %node.host, "became raft leader");
                }
                (false, true) => l.set_leading(None),
                _ => {}
            }
        }
        // Woken by a change, when a leaderless spell reaches the limit, or (leading with
        // other voters) to look at the quorum's acknowledgements again.
        let limit = match leaderless {
            Some(t) if following => t + LEADERLESS_LIMIT,
            _ => tokio::time::Instant::now() + Duration::from_secs(3600),
        };
        let limit = match leading_since {
            Some(_) if !sole_voter => limit.min(tokio::time::Instant::now() + QUORUM_CHECK),
            // A follower: to see it stop hearing its leader, or hear it again (nothing in
            // openraft's metrics changes then).
            None if names_leader => limit.min(tokio::time::Instant::now() + node.leader_silence),
            _ => limit,
        };
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep_until(limit) => {}
        }
    }
}

/// Starts a follower's Pre-Vote as soon as its leader's lease has run out (plus a random
/// delay), where openraft's own timer waits for the lease *and then* a full randomized
/// election timeout: a dead leader is replaced ~`spread` sooner (2–2.75× the election
/// timeout of silence instead of 3–4×). `lease` is openraft's leader lease
/// (`election_timeout_max`, 2× `spread`), `spread` the election timeout.
///
/// Nothing is given up. The round is openraft's own `pre_elect` (`trigger().elect(true)`),
/// which its timer runs too: it is refused here, sending nothing, while this node's lease
/// from its leader's last append is valid (openraft's clock, not ours: a trigger that comes
/// too early changes nothing), and the peers refuse it while they still hear the leader, as
/// does a leader a quorum still acknowledges. So a follower that was stalled or cut off still
/// neither raises its term nor unseats a working leader.
///
/// openraft runs an external trigger without its timer's other guards (a round in flight,
/// a vote just granted), and its metrics lag its state (a vote being saved), so this fires
/// at most once per last-heard append, only for a follower of another node whose vote is
/// committed, that is a voter with other voters, and not once a peer has asked for a vote
/// or pre-vote since that append (a campaign is under way: openraft's timer takes over).
/// The delay is drawn below 3/4 of `spread`, so it comes before openraft's timer would
/// fire (lease + `spread` at the earliest, from a later stamp than ours), which still
/// handles everything else: a failed round, a split vote, a node that never heard a leader.
async fn campaign_at_lease_end(node: Arc<Node>, lease: Duration, spread: Duration) {
    let rx = node.raft.server_metrics();
    let lease_ms = lease.as_millis() as u64;
    let spread_ms = (spread.as_millis() as u64 * 3 / 4).max(1);
    // The last-heard stamp the delay was drawn for (and whether it was used), and the delay.
    let mut planned = 0u64;
    let mut done = false;
    let mut delay = 0u64;
    loop {
        let heard = node.leader_heard.load(Ordering::Acquire);
        let now = node.epoch.elapsed().as_millis() as u64 + 1;
        if heard != planned {
            planned = heard;
            delay = fastrand::u64(..spread_ms);
            // Never heard a leader (a fresh or restarted node): openraft's timer.
            done = heard == 0;
        }
        if done {
            // Looked at again within a lease, before a new stamp's due time.
            tokio::time::sleep(lease).await;
            continue;
        }
        let due = heard + lease_ms + LEASE_END_MARGIN_MS + delay;
        if now < due {
            tokio::time::sleep(Duration::from_millis(due - now)).await;
            continue;
        }
        done = true;
        let campaign = node.ballot_heard.load(Ordering::Acquire) >= heard;
        let eligible = !campaign && {
            let m = rx.borrow_watched();
            let mem = m.membership_config.membership();
            let joint = mem.get_joint_config();
            let voter = joint.last().is_some_and(|c| c.contains(&node.id));
            let others = joint.iter().any(|c| c.iter().any(|id| *id != node.id));
            m.state == ServerState::Follower
                && m.vote.is_committed()
                && m.current_leader.is_some_and(|l| l != node.id)
                && voter
                && others
        };
        if !eligible {
            continue;
        }
        tracing::debug!(host = %node.host, silent_ms = now - heard, "leader lease over: pre-vote");
        if node.raft.trigger().elect(true).await.is_err() {
            return;
        }
    }
}

/// Past the lease, on top of the random delay: openraft stamps its lease when it handles
/// the append, a little after this node's stamp (a trigger before its lease ends is a no-op).
const LEASE_END_MARGIN_MS: u64 = 5;

/// How long a node may know no leader before it counts as not following the cluster
/// (elections take well under a second).
pub const LEADERLESS_LIMIT: Duration = Duration::from_secs(5);

/// How often a leader with other voters looks at its quorum's acknowledgements.
const QUORUM_CHECK: Duration = Duration::from_millis(500);

/// How long a write may wait to be applied (spec §2.7) before it is answered 503: a
/// leader that cannot reach a quorum never commits it.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(30);

async fn expiry_loop(node: Arc<Node>) {
    let every = (node.ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if node.shutting_down.load(Ordering::Relaxed) {
            continue;
        }
        let Some(batch) = node.begin_expiry() else {
            continue;
        };
        tracing::info!(count = batch.len(), "expiring instances");
        let res = tokio::time::timeout(
            APPLY_TIMEOUT,
            node.raft.client_write(Command::ExpireInstances {
                instances: batch.clone(),
            }),
        )
        .await;
        // Applied once the write returns (or it failed, or timed out): heartbeats of these
        // instances that waited find the state as it now is.
        node.end_expiry(&batch);
        match res {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "expire instances"),
            Err(_) => tracing::warn!("expire instances: not applied within {APPLY_TIMEOUT:?}"),
        }
    }
}
