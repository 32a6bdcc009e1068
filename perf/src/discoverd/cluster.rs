//! Starting flynn-discoverd and etcd as one node or three (on 127.0.0.1/.2/.3, one port
//! probed free on every address), finding the Raft leader, SIGKILLing and restarting a node.

use std::fmt;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::http::{self, Http};
use crate::procfs;
use crate::procs::Proc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Flynn,
    Etcd,
}

impl Kind {
    pub fn parse(s: &str) -> Result<Kind> {
        Ok(match s {
            "flynn" | "discoverd" => Kind::Flynn,
            "etcd" => Kind::Etcd,
            _ => bail!("unknown target {s:?} (expected flynn or etcd)"),
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Flynn => "flynn-discoverd",
            Kind::Etcd => "etcd",
        })
    }
}

/// How the harness talks to etcd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EtcdApi {
    /// etcd's native gRPC API over one HTTP/2 connection per member (as etcd's clients).
    #[default]
    Grpc,
    /// The JSON gRPC gateway (`/v3/...` over HTTP/1.1, base64 keys), which etcd 3.4 serves
    /// by calling its own gRPC server over a loopback connection.
    Gateway,
}

impl EtcdApi {
    pub fn parse(s: &str) -> Result<EtcdApi> {
        Ok(match s {
            "grpc" => EtcdApi::Grpc,
            "gateway" | "json" => EtcdApi::Gateway,
            _ => bail!("unknown etcd API {s:?} (expected grpc or gateway)"),
        })
    }
}

impl fmt::Display for EtcdApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EtcdApi::Grpc => "grpc",
            EtcdApi::Gateway => "gateway",
        })
    }
}

/// etcd's Raft timers, ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EtcdTimers {
    pub election_ms: u64,
    pub heartbeat_ms: u64,
}

impl EtcdTimers {
    /// flynn-discoverd's default election timeout (`--election-timeout 100ms`).
    pub const DISCOVERD_ELECTION_MS: u64 = 100;

    /// `--etcd-election-ms E` with `--etcd-heartbeat-ms H`; without H, E / 5: etcd refuses a
    /// heartbeat above a fifth of the election timeout, so that is the closest it allows to
    /// discoverd's ratio (heartbeats every third of the election timeout: 33 ms of 100 ms).
    pub fn new(election_ms: u64, heartbeat_ms: Option<u64>) -> Result<EtcdTimers> {
        let heartbeat_ms = heartbeat_ms.unwrap_or(election_ms / 5).max(1);
        if election_ms < 5 * heartbeat_ms {
            bail!(
                "etcd needs --etcd-election-ms ({election_ms}) at least 5 × the heartbeat \
                 ({heartbeat_ms} ms)"
            );
        }
        if election_ms > 50_000 {
            bail!("etcd refuses an election timeout above 50000 ms");
        }
        Ok(EtcdTimers {
            election_ms,
            heartbeat_ms,
        })
    }
}

impl Default for EtcdTimers {
    fn default() -> EtcdTimers {
        EtcdTimers {
            election_ms: Self::DISCOVERD_ELECTION_MS,
            heartbeat_ms: Self::DISCOVERD_ELECTION_MS / 5,
        }
    }
}

/// One report row: a kind of server with a cluster size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id {
    pub kind: Kind,
    pub nodes: usize,
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}×{}", self.kind, self.nodes)
    }
}

/// A cluster's Raft leader (its client address) and term at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftState {
    pub leader: String,
    pub term: u64,
}

/// One server process of a cluster; restartable with the same flags and data dir.
pub struct Node {
    /// `ip:port` clients talk to.
    pub client: String,
    bin: PathBuf,
    args: Vec<String>,
    dir: PathBuf,
    name: String,
    starts: usize,
    pub proc: Option<Proc>,
}

impl Node {
    fn start(&mut self) -> Result<()> {
        self.starts += 1;
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args);
        // discoverd reads FLYNN_* as flag defaults: keep the caller's environment out.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FLYNN_") || k.to_string_lossy().starts_with("ETCD")
            {
                cmd.env_remove(k);
            }
        }
        let log = self.dir.join(format!("{}.{}.log", self.name, self.starts));
        self.proc = Some(Proc::spawn(&self.name, cmd, &log)?);
        Ok(())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.client)
    }

    pub fn running(&self) -> bool {
        self.proc.is_some()
    }

    fn log_has(&self, needle: &str) -> bool {
        self.proc
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p.log_path()).ok())
            .is_some_and(|t| t.contains(needle))
    }
}

pub struct Cluster {
    pub id: Id,
    pub nodes: Vec<Node>,
    /// etcd: how the workloads talk to it (unused for discoverd).
    pub etcd_api: EtcdApi,
}

/// A port that is free right now on 127.0.0.1..=127.0.0.`n` (and not in `avoid`), below the
/// kernel's ephemeral range (32768+): nodes are killed and restarted on the same port, and an
/// ephemeral port could meanwhile be the local end of some outgoing connection, which makes
/// the restart's bind fail.
fn port_free_on_all(n: usize, avoid: &[u16]) -> Result<u16> {
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(1)
        ^ std::process::id()
        | 1;
    for _ in 0..200 {
        // xorshift32: only needs to spread the picks.
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let port = 20_000 + (x % 12_000) as u16;
        if avoid.contains(&port) {
            continue;
        }
        let all: Vec<_> = (1..=n)
            .map(|i| TcpListener::bind((format!("127.0.0.{i}").as_str(), port)))
            .collect();
        if all.iter().all(|r| r.is_ok()) {
            return Ok(port);
        }
    }
    bail!("no port free on all of 127.0.0.1..{n}")
}

/// The command line of etcd member `n{i}`: its URLs, the whole initial cluster, `timers`,
/// and Pre-Vote on, as in discoverd (etcd 3.4's default is off).
fn etcd_args(
    i: usize,
    client: &str,
    peer: &str,
    data: &Path,
    initial_cluster: &str,
    token: &str,
    timers: EtcdTimers,
) -> Vec<String> {
    [
        "--name",
        &format!("n{i}"),
        "--data-dir",
        &data.display().to_string(),
        "--listen-client-urls",
        &format!("http://{client}"),
        "--advertise-client-urls",
        &format!("http://{client}"),
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
        initial_cluster,
        "--initial-cluster-state",
        "new",
        "--initial-cluster-token",
        token,
        "--heartbeat-interval",
        &timers.heartbeat_ms.to_string(),
        "--election-timeout",
        &timers.election_ms.to_string(),
        "--pre-vote",
        "--logger",
        "zap",
        "--log-outputs",
        "stderr",
        "--log-level",
        "warn",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

impl Cluster {
    /// Starts `nodes` flynn-discoverd processes (`--peers` = all of them, a single node is
    /// its own only peer) and waits for each `listening` line.
    pub fn start_flynn(bin: &Path, dir: &Path, nodes: usize) -> Result<Cluster> {
        if !bin.exists() {
            bail!(
                "{} not found (build it with `cargo build --release -p flynn-discoverd`)",
                bin.display()
            );
        }
        let dir = dir.join(format!("discoverd-{nodes}"));
        std::fs::create_dir_all(&dir)?;
        let port = port_free_on_all(nodes, &[])?;
        let addrs: Vec<String> = (1..=nodes).map(|i| format!("127.0.0.{i}:{port}")).collect();
        let peers = addrs.join(",");
        let mut out = Vec::new();
        for (i, a) in addrs.iter().enumerate() {
            let data = dir.join(format!("n{}", i + 1));
            let args = vec![
                "--data-dir".to_string(),
                data.display().to_string(),
                "--addr".into(),
                a.clone(),
                "--host".into(),
                a.clone(),
                "--peers".into(),
                peers.clone(),
            ];
            out.push(Node {
                client: a.clone(),
                bin: bin.to_path_buf(),
                args,
                dir: dir.clone(),
                name: format!("discoverd-n{}", i + 1),
                starts: 0,
                proc: None,
            });
        }
        let mut c = Cluster {
            id: Id {
                kind: Kind::Flynn,
                nodes,
            },
            nodes: out,
            etcd_api: EtcdApi::default(),
        };
        for i in 0..nodes {
            c.nodes[i].start()?;
        }
        for i in 0..nodes {
            c.wait_started(i)?;
        }
        Ok(c)
    }

    /// Starts `nodes` etcd members (`--initial-cluster` = all of them) with `timers`;
    /// client and peer URLs on 127.0.0.x, data in `dir`. The workloads use `api`.
    pub fn start_etcd(
        dir: &Path,
        nodes: usize,
        timers: EtcdTimers,
        api: EtcdApi,
    ) -> Result<Cluster> {
        let dir = dir.join(format!("etcd-{nodes}"));
        std::fs::create_dir_all(&dir)?;
        let cport = port_free_on_all(nodes, &[])?;
        let pport = port_free_on_all(nodes, &[cport])?;
        let initial: Vec<String> = (1..=nodes)
            .map(|i| format!("n{i}=http://127.0.0.{i}:{pport}"))
            .collect();
        let token = format!("flynn-perf-{}-{nodes}", std::process::id());
        let mut out = Vec::new();
        for i in 1..=nodes {
            let client = format!("127.0.0.{i}:{cport}");
            let peer = format!("http://127.0.0.{i}:{pport}");
            let data = dir.join(format!("n{i}"));
            let args = etcd_args(i, &client, &peer, &data, &initial.join(","), &token, timers);
            out.push(Node {
                client,
                bin: PathBuf::from("etcd"),
                args,
                dir: dir.clone(),
                name: format!("etcd-n{i}"),
                starts: 0,
                proc: None,
            });
        }
        let mut c = Cluster {
            id: Id {
                kind: Kind::Etcd,
                nodes,
            },
            nodes: out,
            etcd_api: api,
        };
        for i in 0..nodes {
            c.nodes[i].start()?;
        }
        for i in 0..nodes {
            c.wait_started(i)?;
        }
        Ok(c)
    }

    /// Waits until node `i` listens (discoverd: its `listening` line; etcd: its client
    /// port accepts connections).
    fn wait_started(&mut self, i: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let node = &self.nodes[i];
            let up = match self.id.kind {
                Kind::Flynn => node.log_has("listening http="),
                Kind::Etcd => std::net::TcpStream::connect_timeout(
                    &node.client.parse().context("client addr")?,
                    Duration::from_millis(200),
                )
                .is_ok(),
            };
            let node = &mut self.nodes[i];
            let Some(proc) = node.proc.as_mut() else {
                bail!("{} is not running", node.name);
            };
            if let Some(status) = proc.exited() {
                bail!(
                    "{} exited during startup ({status}):\n{}",
                    node.name,
                    proc.log_tail(10)
                );
            }
            if up {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not start within 20 s:\n{}",
                    node.name,
                    proc.log_tail(10)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.proc.as_ref().map(Proc::pid))
            .collect()
    }

    /// CPU seconds used so far by every running node.
    pub fn cpu_seconds(&self) -> f64 {
        self.pids().into_iter().map(procfs::cpu_seconds).sum()
    }

    /// VmRSS summed over every running node.
    pub fn rss(&self) -> u64 {
        self.pids().into_iter().map(procfs::rss_bytes).sum()
    }

    /// Why a node that should be running is not.
    pub fn dead(&mut self) -> Option<String> {
        for n in &mut self.nodes {
            if let Some(p) = n.proc.as_mut() {
                if let Some(status) = p.exited() {
                    return Some(format!("{} exited ({status}): {}", n.name, p.log_tail(5)));
                }
            }
        }
        None
    }

    /// SIGKILLs node `i`'s process group and reaps it.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].proc = None;
    }

    /// Starts node `i` again with the same flags and data dir.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.nodes[i].start()?;
        self.wait_started(i)
    }

    /// The node every running node agrees is the Raft leader; waits up to `limit`.
    pub async fn leader(&self, h: &Http, limit: Duration) -> Result<usize> {
        let start = Instant::now();
        loop {
            let last = match self.leader_once(h).await {
                Ok(i) => return Ok(i),
                Err(e) => format!("{e:#}"),
            };
            if start.elapsed() > limit {
                bail!("{}: no agreed leader within {limit:?}: {last}", self.id);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn leader_once(&self, h: &Http) -> Result<usize> {
        match self.id.kind {
            Kind::Flynn => {
                let mut hosts = Vec::new();
                for n in self.nodes.iter().filter(|n| n.running()) {
                    let r = h.get(&n.url("/raft/leader")).await?;
                    r.ok()?;
                    let v: Value = r.json()?;
                    hosts.push(v["host"].as_str().unwrap_or_default().to_string());
                }
                hosts.dedup();
                if hosts.len() != 1 {
                    bail!("nodes disagree on the leader: {hosts:?}");
                }
                self.nodes
                    .iter()
                    .position(|n| n.running() && n.client == hosts[0])
                    .context("the leader is not a running node")
            }
            Kind::Etcd => {
                let mut leaders = Vec::new();
                let mut me = Vec::new();
                for (i, n) in self.nodes.iter().enumerate().filter(|(_, n)| n.running()) {
                    let r = h.post(&n.url("/v3/maintenance/status"), "{}").await?;
                    r.ok()?;
                    let v: Value = r.json()?;
                    leaders.push(http::str_field(&v["leader"]));
                    me.push((i, http::str_field(&v["header"]["member_id"])));
                }
                leaders.dedup();
                if leaders.len() != 1 || leaders[0].is_empty() || leaders[0] == "0" {
                    bail!("members disagree on the leader: {leaders:?}");
                }
                me.iter()
                    .find(|(_, m)| *m == leaders[0])
                    .map(|(i, _)| *i)
                    .context("the leader is not a running member")
            }
        }
    }

    /// The agreed leader (waited for up to `limit`) and the highest Raft term any running
    /// node reports: discoverd's `/.well-known/status` `term`, etcd's `ResponseHeader.raft_term`
    /// of `Maintenance.Status` (through the gateway, as the leader lookup). Compared before and
    /// after a run, it tells whether an election happened during the run.
    pub async fn raft_state(&self, h: &Http, limit: Duration) -> Result<RaftState> {
        let leader = self.leader(h, limit).await?;
        let mut term = 0u64;
        for n in self.nodes.iter().filter(|n| n.running()) {
            let t = match self.id.kind {
                Kind::Flynn => {
                    let r = h.get(&n.url("/.well-known/status")).await?;
                    r.ok()?;
                    r.json()?["data"]["detail"]["term"]
                        .as_u64()
                        .context("no term in the status")?
                }
                Kind::Etcd => {
                    let r = h.post(&n.url("/v3/maintenance/status"), "{}").await?;
                    r.ok()?;
                    http::str_field(&r.json()?["header"]["raft_term"])
                        .parse()
                        .context("no raft_term in the status header")?
                }
            };
            term = term.max(t);
        }
        Ok(RaftState {
            leader: self.nodes[leader].client.clone(),
            term,
        })
    }

    /// Server version for the report header.
    pub async fn version(&self, h: &Http) -> String {
        match self.id.kind {
            Kind::Flynn => String::new(),
            Kind::Etcd => match h.get(&self.nodes[0].url("/version")).await {
                Ok(r) => r.text(),
                Err(e) => format!("version unknown: {e:#}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_api_parses() {
        assert_eq!(EtcdApi::parse("grpc").unwrap(), EtcdApi::Grpc);
        assert_eq!(EtcdApi::parse("gateway").unwrap(), EtcdApi::Gateway);
        assert!(EtcdApi::parse("http").is_err());
        assert_eq!(EtcdApi::default(), EtcdApi::Grpc);
        assert_eq!(EtcdApi::Gateway.to_string(), "gateway");
    }

    #[test]
    fn etcd_runs_pre_vote_with_the_timers() {
        let args = etcd_args(
            2,
            "127.0.0.2:2379",
            "http://127.0.0.2:2380",
            Path::new("/tmp/x/n2"),
            "n1=http://127.0.0.1:2380,n2=http://127.0.0.2:2380",
            "tok",
            EtcdTimers::default(),
        );
        let has = |a: &str, b: &str| args.windows(2).any(|w| w[0] == a && w[1] == b);
        assert!(args.iter().any(|a| a == "--pre-vote"), "{args:?}");
        assert!(has("--heartbeat-interval", "20"), "{args:?}");
        assert!(has("--election-timeout", "100"), "{args:?}");
        assert!(has("--name", "n2") && has("--data-dir", "/tmp/x/n2"));
        assert!(has("--listen-client-urls", "http://127.0.0.2:2379"));
        assert!(has(
            "--initial-advertise-peer-urls",
            "http://127.0.0.2:2380"
        ));
    }

    #[test]
    fn etcd_timers() {
        // Default: discoverd's election timeout, the heartbeat etcd allows closest to
        // discoverd's 33 ms (a fifth of the election timeout).
        assert_eq!(
            EtcdTimers::default(),
            EtcdTimers {
                election_ms: 100,
                heartbeat_ms: 20
            }
        );
        assert_eq!(EtcdTimers::new(100, None).unwrap(), EtcdTimers::default());
        assert_eq!(EtcdTimers::new(1000, None).unwrap().heartbeat_ms, 200);
        assert_eq!(EtcdTimers::new(100, Some(10)).unwrap().heartbeat_ms, 10);
        assert_eq!(EtcdTimers::new(100, Some(20)).unwrap().heartbeat_ms, 20);
        assert!(EtcdTimers::new(100, Some(21)).is_err());
        assert_eq!(EtcdTimers::new(5, None).unwrap().heartbeat_ms, 1);
        // etcd refuses heartbeat > election / 5 (so discoverd's election / 3 is impossible).
        assert!(EtcdTimers::new(100, Some(34)).is_err());
        assert!(EtcdTimers::new(60_000, None).is_err());
    }
}
