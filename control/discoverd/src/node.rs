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
/// The trade-off: a follower now campaigns after ~205–280 ms of silence from its leader at
/// the default 100 ms timeout (about 6 missed heartbeats) instead of 300–400 ms (about 9),
/// so a leader stalled for 205–300 ms (CPU starvation, a long pause) that used to be
/// tolerated may now be replaced. Voting and LeaseRead safety are unchanged: the round is
/// openraft's own `pre_elect` (`trigger().elect(true)`), which its timer runs too: it is
/// refused here, sending nothing, while this node's lease from its leader's last append is
/// valid (openraft's clock, not ours), and the peers refuse it while their own lease from
/// the leader is valid, as does a leader a quorum still acknowledges. So a follower that was
/// stalled or cut off still neither raises its term nor unseats a leader the others hear.
///
/// openraft runs an external trigger without its timer's other guards (a round in flight,
/// a vote just granted), and its metrics lag its state (a vote being saved), so this fires
/// once per last-heard append (and once more [`LEASE_END_RETRY_MS`] later if the first came
/// too early for openraft's own lease stamp: still a follower under the same committed
/// vote), only for a follower of another node whose vote is committed, that is a voter
/// with other voters, and not once a peer has asked for a vote or pre-vote since that
/// append (a campaign is under way: openraft's timer takes over). The delay is drawn below
/// 3/4 of `spread`, so it comes before openraft's timer would fire (lease + `spread` at
/// the earliest, from a later stamp than ours), which still handles everything else: a
/// failed round, a split vote, a node that never heard a leader. See [`LeaseEnd`].
async fn campaign_at_lease_end(node: Arc<Node>, lease: Duration, spread: Duration) {
    let mut rx = node.raft.server_metrics();
    let spread_ms = (spread.as_millis() as u64 * 3 / 4).max(1);
    let mut plan = LeaseEnd::new(
        lease.as_millis() as u64,
        LEASE_END_RETRY_MS.min(spread.as_millis() as u64 / 4).max(1),
    );
    loop {
        if node.shutting_down.load(Ordering::Relaxed) {
            return;
        }
        let heard = node.leader_heard.load(Ordering::Acquire);
        let ballot = node.ballot_heard.load(Ordering::Acquire);
        let now = node.epoch.elapsed().as_millis() as u64 + 1;
        let snap = {
            let m = rx.borrow_watched();
            FollowerView::of(
                node.id,
                m.state,
                m.vote.is_committed(),
                openraft::vote::RaftLeaderId::term(m.vote.leader_id()),
                m.current_leader,
                m.membership_config.membership().get_joint_config(),
            )
        };
        let wait = match plan.decide(heard, ballot, now, || fastrand::u64(..spread_ms), snap) {
            Decision::Wait(due) => Duration::from_millis(due - now),
            // Looked at again within a lease, before a new stamp's due time.
            Decision::Idle => lease,
            Decision::BallotHeard => {
                tracing::debug!(host = %node.host, silent_ms = now - heard, "leader lease over: a ballot came in since, no pre-vote");
                continue;
            }
            Decision::Fire { retry } => {
                tracing::debug!(host = %node.host, silent_ms = now - heard, retry, "leader lease over: pre-vote");
                if node.raft.trigger().elect(true).await.is_err() {
                    return;
                }
                continue;
            }
        };
        if !sleep_unless_closed(&mut rx, wait).await {
            return;
        }
    }
}

/// Sleeps for `d`; false (at once) if the metrics channel closes first: Raft has shut down.
async fn sleep_unless_closed<W, T>(rx: &mut impl WatchReceiver<W, T>, d: Duration) -> bool
where
    W: openraft::async_runtime::Watch,
    T: Send + Sync,
{
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = async { while rx.changed().await.is_ok() {} } => false,
    }
}

/// Past the lease, on top of the random delay: openraft stamps its lease when it handles
/// the append, a little after this node's stamp (a trigger before its lease ends is a no-op).
const LEASE_END_MARGIN_MS: u64 = 5;

/// After a pre-vote trigger that changed nothing (still a follower under the same committed
/// vote: it came before openraft's lease ended), the one retry comes this much later
/// (capped at a quarter of the election timeout); after that openraft's timer decides.
const LEASE_END_RETRY_MS: u64 = 20;

/// What `campaign_at_lease_end` reads of openraft's server metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FollowerView {
    state: ServerState,
    vote_committed: bool,
    /// The vote's term (with `vote_committed`: the same leader's term).
    term: u64,
    /// A leader is known and is not this node.
    leader_is_other: bool,
    /// A voter of the membership this node is heading to (the last of a joint config).
    voter: bool,
    /// Some other node is a voter (of either config of a joint one).
    other_voters: bool,
}

impl FollowerView {
    /// `joint`: the membership's configs (two while it changes, the last the one it is
    /// heading to).
    fn of(
        id: u64,
        state: ServerState,
        vote_committed: bool,
        term: u64,
        leader: Option<u64>,
        joint: &[std::collections::BTreeSet<u64>],
    ) -> Self {
        Self {
            state,
            vote_committed,
            term,
            leader_is_other: leader.is_some_and(|l| l != id),
            voter: joint.last().is_some_and(|c| c.contains(&id)),
            other_voters: joint.iter().any(|c| c.iter().any(|v| *v != id)),
        }
    }

    fn eligible(&self) -> bool {
        self.state == ServerState::Follower
            && self.vote_committed
            && self.leader_is_other
            && self.voter
            && self.other_voters
    }
}

/// What `campaign_at_lease_end` does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// Nothing before this time (`Node::epoch` milliseconds, plus one).
    Wait(u64),
    /// Nothing for this stamp: look again within a lease.
    Idle,
    /// Due, but a vote or pre-vote request came in since the stamp: openraft's timer.
    /// Returned once per stamp (then `Idle`).
    BallotHeard,
    /// Trigger openraft's Pre-Vote (`retry`: the second and last time for this stamp).
    Fire { retry: bool },
}

/// The decision state of `campaign_at_lease_end`, free of clocks and randomness (tested).
#[derive(Debug)]
struct LeaseEnd {
    lease_ms: u64,
    retry_ms: u64,
    /// The last-heard stamp the delay was drawn for.
    planned: u64,
    delay: u64,
    /// Nothing more to do for `planned`.
    done: bool,
    /// The term of the vote the first trigger for `planned` was sent under.
    fired: Option<u64>,
}

impl LeaseEnd {
    fn new(lease_ms: u64, retry_ms: u64) -> Self {
        Self {
            lease_ms,
            retry_ms,
            planned: 0,
            delay: 0,
            done: true,
            fired: None,
        }
    }

    /// `heard`: the leader's last-heard stamp (0: never); `ballot`: the last vote or
    /// pre-vote request's (same clock); `draw`: the random delay, drawn once per new stamp.
    fn decide(
        &mut self,
        heard: u64,
        ballot: u64,
        now: u64,
        draw: impl FnOnce() -> u64,
        view: FollowerView,
    ) -> Decision {
        if heard != self.planned {
            self.planned = heard;
            self.delay = draw();
            self.fired = None;
            // Never heard a leader (a fresh or restarted node): openraft's timer.
            self.done = heard == 0;
        }
        if self.done {
            return Decision::Idle;
        }
        let retry = self.fired.is_some();
        let due = heard
            + self.lease_ms
            + LEASE_END_MARGIN_MS
            + self.delay
            + if retry { self.retry_ms } else { 0 };
        if now < due {
            return Decision::Wait(due);
        }
        self.done = true;
        if ballot >= heard {
            return Decision::BallotHeard;
        }
        match self.fired {
            // The first trigger changed nothing visible: still following the same leader.
            Some(term) if !(view.eligible() && view.term == term) => Decision::Idle,
            Some(_) => Decision::Fire { retry: true },
            None if !view.eligible() => Decision::Idle,
            None => {
                self.fired = Some(view.term);
                self.done = false;
                Decision::Fire { retry: false }
            }
        }
    }
}

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
    // Closes when Raft shuts down (SIGTERM, `POST /shutdown`): the loop ends then.
    let mut rx = node.raft.server_metrics();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = async { while rx.changed().await.is_ok() {} } => return,
        }
        if node.shutting_down.load(Ordering::Relaxed) {
            return;
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

#[cfg(test)]
mod lease_end_tests {
    use super::*;

    const LEASE: u64 = 200;
    const RETRY: u64 = 20;
    const DELAY: u64 = 30;

    fn follower() -> FollowerView {
        FollowerView {
            state: ServerState::Follower,
            vote_committed: true,
            term: 3,
            leader_is_other: true,
            voter: true,
            other_voters: true,
        }
    }

    fn due(heard: u64) -> u64 {
        heard + LEASE + LEASE_END_MARGIN_MS + DELAY
    }

    /// A plan that has drawn `DELAY` for `heard` and is asked at `now`.
    fn at(plan: &mut LeaseEnd, heard: u64, ballot: u64, now: u64, view: FollowerView) -> Decision {
        plan.decide(heard, ballot, now, || DELAY, view)
    }

    fn plan() -> LeaseEnd {
        LeaseEnd::new(LEASE, RETRY)
    }

    #[test]
    fn never_fires_without_a_heard_leader() {
        let mut p = plan();
        for now in [1, 1_000, 100_000] {
            assert_eq!(at(&mut p, 0, 0, now, follower()), Decision::Idle);
        }
    }

    #[test]
    fn waits_for_lease_margin_and_delay() {
        let mut p = plan();
        let heard = 1_000;
        assert_eq!(
            at(&mut p, heard, 0, heard, follower()),
            Decision::Wait(due(heard))
        );
        assert_eq!(
            at(&mut p, heard, 0, due(heard) - 1, follower()),
            Decision::Wait(due(heard))
        );
        assert_eq!(
            at(&mut p, heard, 0, due(heard), follower()),
            Decision::Fire { retry: false }
        );
    }

    #[test]
    fn the_delay_is_drawn_once_per_stamp() {
        let mut p = plan();
        let mut draws = 0;
        for now in [1_000, 1_100, 1_200] {
            p.decide(
                1_000,
                0,
                now,
                || {
                    draws += 1;
                    DELAY
                },
                follower(),
            );
        }
        assert_eq!(draws, 1);
    }

    #[test]
    fn fires_once_per_stamp_then_again_after_a_new_stamp() {
        let mut p = plan();
        let heard = 1_000;
        let d = due(heard);
        assert_eq!(
            at(&mut p, heard, 0, d, follower()),
            Decision::Fire { retry: false }
        );
        // The trigger took (a new term, a candidate): no retry, nothing more for this stamp.
        let candidate = FollowerView {
            state: ServerState::Candidate,
            vote_committed: false,
            term: 4,
            ..follower()
        };
        assert_eq!(
            at(&mut p, heard, 0, d + 1, candidate),
            Decision::Wait(d + RETRY)
        );
        assert_eq!(at(&mut p, heard, 0, d + RETRY, candidate), Decision::Idle);
        for now in [d + RETRY + 1, d + 10_000] {
            assert_eq!(at(&mut p, heard, 0, now, follower()), Decision::Idle);
        }
        // A new leader message: a new round.
        let heard2 = d + 10_000;
        assert_eq!(
            at(&mut p, heard2, 0, heard2, follower()),
            Decision::Wait(due(heard2))
        );
        assert_eq!(
            at(&mut p, heard2, 0, due(heard2), follower()),
            Decision::Fire { retry: false }
        );
    }

    #[test]
    fn retries_once_when_the_trigger_changed_nothing() {
        let mut p = plan();
        let heard = 1_000;
        let d = due(heard);
        assert_eq!(
            at(&mut p, heard, 0, d, follower()),
            Decision::Fire { retry: false }
        );
        assert_eq!(
            at(&mut p, heard, 0, d, follower()),
            Decision::Wait(d + RETRY)
        );
        assert_eq!(
            at(&mut p, heard, 0, d + RETRY, follower()),
            Decision::Fire { retry: true }
        );
        for now in [d + RETRY, d + RETRY + 1, d + 10_000] {
            assert_eq!(at(&mut p, heard, 0, now, follower()), Decision::Idle);
        }
    }

    #[test]
    fn no_retry_under_another_vote_or_after_a_ballot() {
        let heard = 1_000;
        let d = due(heard);
        // A new committed vote (another leader was elected meanwhile).
        let mut p = plan();
        assert_eq!(
            at(&mut p, heard, 0, d, follower()),
            Decision::Fire { retry: false }
        );
        let next_term = FollowerView {
            term: 4,
            ..follower()
        };
        assert_eq!(at(&mut p, heard, 0, d + RETRY, next_term), Decision::Idle);
        // A ballot came in between the trigger and the retry.
        let mut p = plan();
        assert_eq!(
            at(&mut p, heard, 0, d, follower()),
            Decision::Fire { retry: false }
        );
        assert_eq!(
            at(&mut p, heard, d + 1, d + RETRY, follower()),
            Decision::BallotHeard
        );
        assert_eq!(
            at(&mut p, heard, d + 1, d + RETRY + 1, follower()),
            Decision::Idle
        );
    }

    #[test]
    fn skips_once_per_stamp_when_a_ballot_came_in_since() {
        let heard = 1_000;
        let d = due(heard);
        for ballot in [heard, heard + 1, d] {
            let mut p = plan();
            assert_eq!(
                at(&mut p, heard, ballot, d, follower()),
                Decision::BallotHeard
            );
            assert_eq!(at(&mut p, heard, ballot, d + 1, follower()), Decision::Idle);
        }
        // A ballot before the stamp does not hold it back.
        let mut p = plan();
        assert_eq!(
            at(&mut p, heard, heard - 1, d, follower()),
            Decision::Fire { retry: false }
        );
    }

    #[test]
    fn only_a_voting_follower_of_another_committed_leader_fires() {
        let heard = 1_000;
        let d = due(heard);
        let not = [
            FollowerView {
                state: ServerState::Leader,
                leader_is_other: false,
                ..follower()
            },
            FollowerView {
                state: ServerState::Candidate,
                vote_committed: false,
                ..follower()
            },
            FollowerView {
                state: ServerState::Learner,
                voter: false,
                ..follower()
            },
            // A learner that metrics still show as a follower.
            FollowerView {
                voter: false,
                ..follower()
            },
            // A single voter.
            FollowerView {
                other_voters: false,
                ..follower()
            },
            FollowerView {
                vote_committed: false,
                ..follower()
            },
            // No leader known, or this node.
            FollowerView {
                leader_is_other: false,
                ..follower()
            },
        ];
        for view in not {
            let mut p = plan();
            assert_eq!(at(&mut p, heard, 0, d, view), Decision::Idle, "{view:?}");
            assert_eq!(at(&mut p, heard, 0, d + 1_000, follower()), Decision::Idle);
        }
    }

    #[test]
    fn the_view_names_voters_joint_configs_and_the_leader() {
        use std::collections::BTreeSet;
        let set = |ids: &[u64]| ids.iter().copied().collect::<BTreeSet<u64>>();
        let f = ServerState::Follower;
        let of = |leader, joint: &[BTreeSet<u64>]| FollowerView::of(1, f, true, 3, leader, joint);
        // A voter of three following node 2: eligible.
        assert!(of(Some(2), &[set(&[1, 2, 3])]).eligible());
        // Leaving in a joint config (a voter of the old config only).
        let v = of(Some(2), &[set(&[1, 2, 3]), set(&[2, 3])]);
        assert!(!v.voter && !v.eligible());
        // Joining in a joint config: a voter of the config it heads to.
        assert!(of(Some(2), &[set(&[2, 3]), set(&[1, 2, 3])]).eligible());
        // A single voter, a learner, no membership.
        assert!(!of(Some(2), &[set(&[1])]).eligible());
        assert!(!of(Some(2), &[set(&[2, 3])]).eligible());
        assert!(!of(Some(2), &[]).eligible());
        // The leader named is this node, or none.
        assert!(!of(Some(1), &[set(&[1, 2, 3])]).eligible());
        assert!(!of(None, &[set(&[1, 2, 3])]).eligible());
        // Not a follower, or an uncommitted vote.
        for state in [
            ServerState::Leader,
            ServerState::Candidate,
            ServerState::Learner,
        ] {
            let v = FollowerView::of(1, state, true, 3, Some(2), &[set(&[1, 2, 3])]);
            assert!(!v.eligible(), "{state:?}");
        }
        assert!(!FollowerView::of(1, f, false, 3, Some(2), &[set(&[1, 2, 3])]).eligible());
    }
}
