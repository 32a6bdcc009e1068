//! The `discoverd` harness: flynn-discoverd and etcd, each as one node and as three nodes
//! (127.0.0.1/.2/.3), all started once with their data in one temp dir under /tmp (the same
//! disk). Round by round, in a balanced target order that changes every scenario and round
//! (`crate::order`), each target runs: metadata compare-and-swap at 1/16/64 clients, registrations then
//! heartbeats, and register → watch event latency. Then leader failover after SIGKILL of
//! the leader of each 3-node cluster, a few times, alternating. CPU is summed over the
//! cluster's processes from /proc, RSS likewise.

pub mod cluster;
pub mod grpc;
pub mod http;
pub mod load;
pub mod report;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::{first_line_of, on_path};
use crate::procs::TempDir;
use cluster::{Cluster, EtcdApi, EtcdTimers, Id, Kind, RaftState};
use http::Http;
use load::{Limits, Phase};

pub struct Options {
    pub rounds: usize,
    /// CAS client counts (one scenario each).
    pub clients: Vec<usize>,
    /// CAS operations per run (all clients together).
    pub cas_ops: u64,
    /// Every timed phase stops after this long.
    pub max_seconds: f64,
    /// Instances registered per `reg` run.
    pub instances: u64,
    /// Heartbeats per `reg` run.
    pub heartbeats: u64,
    /// Concurrent clients of `reg`.
    pub reg_clients: usize,
    /// Registrations timed per `watch` run.
    pub watch_events: u64,
    /// Leader kills per 3-node target.
    pub failovers: usize,
    pub nodes: Vec<usize>,
    pub targets: Vec<Kind>,
    /// Which of cas, reg, watch, failover to run.
    pub scenarios: Vec<String>,
    pub warmup: bool,
    pub discoverd_bin: PathBuf,
    /// How the workloads talk to etcd.
    pub etcd_api: EtcdApi,
    /// etcd's `--election-timeout` and `--heartbeat-interval`.
    pub etcd_timers: EtcdTimers,
    pub out: Option<PathBuf>,
    pub command: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scenario {
    Cas(usize),
    Reg,
    Watch,
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scenario::Cas(c) => write!(f, "cas-c{c}"),
            Scenario::Reg => f.write_str("reg"),
            Scenario::Watch => f.write_str("watch"),
        }
    }
}

/// One run of one scenario against one target.
#[derive(Clone, Debug)]
pub struct Sample {
    pub round: usize,
    /// CAS: the swaps; reg: registrations; watch: write → event.
    pub a: Phase,
    /// reg: heartbeats; watch: write → acknowledgement.
    pub b: Option<Phase>,
    /// RSS of every node after the run, bytes.
    pub rss: u64,
    /// Why the run is kept out of the medians (errors, a node died), if it is.
    pub invalid: Option<String>,
    /// The leader or the Raft term changed during the run (or could not be read after it):
    /// shown in the report, the run still counts.
    pub election: Option<String>,
}

/// Why a run cannot count: any error in either phase (a failed CAS, registration,
/// heartbeat or write, a missed watch event), or a node of the cluster dead after the run.
pub fn invalid_reason(a: &Phase, b: Option<&Phase>, died: Option<&str>) -> Option<String> {
    let mut why = Vec::new();
    let errors = a.errors + b.map_or(0, |b| b.errors);
    if errors > 0 {
        why.push(format!("{errors} errors"));
    }
    crate::report::join_reasons(why, died)
}

/// What changed in the cluster's Raft state between before and after a run: `None` when
/// the leader and the term are the same.
pub fn election_note(before: &Result<RaftState>, after: &Result<RaftState>) -> Option<String> {
    match (before, after) {
        (_, Err(e)) => Some(format!("no leader read after the run: {e:#}")),
        (Err(e), Ok(_)) => Some(format!("no leader read before the run: {e:#}")),
        (Ok(b), Ok(a)) if b.leader != a.leader => Some(format!(
            "leader {} → {}, term {} → {}",
            b.leader, a.leader, b.term, a.term
        )),
        (Ok(b), Ok(a)) if b.term != a.term => Some(format!(
            "term {} → {} (leader {} again)",
            b.term, a.term, a.leader
        )),
        _ => None,
    }
}

/// One leader kill.
#[derive(Clone, Debug)]
pub struct Failover {
    pub rep: usize,
    /// Kill → first acknowledged write, ms; `None`: no write within [`FAILOVER_LIMIT`].
    pub ms: Option<f64>,
    pub attempts: u64,
    pub old_leader: String,
    pub new_leader: Option<String>,
    pub note: Option<String>,
}

#[derive(Default)]
pub struct Session {
    pub header: Vec<String>,
    pub ids: Vec<Id>,
    pub skipped: Vec<(Id, String)>,
    pub scenarios: Vec<Scenario>,
    pub samples: BTreeMap<(Scenario, Id), Vec<Sample>>,
    pub failovers: BTreeMap<Id, Vec<Failover>>,
    pub failures: Vec<String>,
    pub opts_summary: Vec<String>,
    pub etcd_api: EtcdApi,
}

fn fs_of_tmp() -> String {
    std::process::Command::new("df")
        .args(["-T", "/tmp"])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout).lines().nth(1).map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                format!(
                    "{} ({})",
                    f.first().unwrap_or(&"?"),
                    f.get(1).unwrap_or(&"?")
                )
            })
        })
        .unwrap_or_else(|| "unknown".into())
}

fn header(opts: &Options, etcd_version: &str) -> Vec<String> {
    let date = first_line_of("date", &["-u"]);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    vec![
        format!("Date: {date}"),
        format!("Command: `{}`", opts.command),
        format!(
            "Host: {cpus} CPUs, Linux {}; {}; etcd server {etcd_version}",
            first_line_of("uname", &["-r"]),
            first_line_of("etcd", &["--version"]),
        ),
        format!(
            "Disk: every data dir is in one temp dir under /tmp, on {}",
            fs_of_tmp()
        ),
        format!(
            "flynn-discoverd: `{} --data-dir DIR --addr 127.0.0.N:P --host 127.0.0.N:P --peers \
             <all nodes>` (defaults: election timeout 100 ms, heartbeats every 33 ms, Pre-Vote, \
             instance TTL 10 s)",
            opts.discoverd_bin.display()
        ),
        format!(
            "etcd: `etcd --name nN --data-dir DIR --listen-client-urls http://127.0.0.N:C \
             --listen-peer-urls http://127.0.0.N:P --initial-cluster <all members> \
             --heartbeat-interval {hb} --election-timeout {el} --pre-vote --logger zap \
             --log-level warn` ({}; Pre-Vote, as discoverd; default snapshot count), driven {}",
            if opts.etcd_timers == EtcdTimers::default() {
                format!(
                    "election timeout {} ms, discoverd's; heartbeat {} ms, the closest etcd \
                     allows to discoverd's 33 ms (at most a fifth of the election timeout)",
                    opts.etcd_timers.election_ms, opts.etcd_timers.heartbeat_ms
                )
            } else {
                format!(
                    "election timeout {} ms, heartbeat {} ms",
                    opts.etcd_timers.election_ms, opts.etcd_timers.heartbeat_ms
                )
            },
            match opts.etcd_api {
                EtcdApi::Grpc => {
                    "through its native gRPC API (`--etcd-api grpc`: tonic, one HTTP/2 \
                     connection per member and run, one LeaseKeepAlive stream per client)"
                }
                EtcdApi::Gateway => {
                    "through its JSON gRPC gateway (`--etcd-api gateway`: HTTP/1.1 JSON, \
                     base64 keys, the same pooled client as discoverd)"
                }
            },
            hb = opts.etcd_timers.heartbeat_ms,
            el = opts.etcd_timers.election_ms,
        ),
        format!(
            "Load: a 2-thread tokio runtime in the harness; discoverd through one pooled \
             HTTP/1.1 client (reqwest, keep-alive); writes go to the leader, the watcher of a \
             3-node cluster is on a follower; CAS {} ops per run, reg {} instances then {} \
             heartbeats with {} clients, watch {} sequential registrations; every timed phase \
             stops after {} s; {}{} round(s), target order changing every scenario and round \
             (balanced: each target in each position and right after each other equally \
             often over a cycle)",
            opts.cas_ops,
            opts.instances,
            opts.heartbeats,
            opts.reg_clients,
            opts.watch_events,
            opts.max_seconds,
            if opts.warmup {
                "one unrecorded 1 s CAS warm-up (16 clients) per target, then "
            } else {
                ""
            },
            opts.rounds,
        ),
    ]
}

pub fn run(opts: Options) -> Result<String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let h = Http::new()?;
    let dir = TempDir::new("flynn-perf-discoverd")?;
    let bin = crate::procs::resolve_bin(&opts.discoverd_bin, "flynn-discoverd");
    let want = |s: &str| opts.scenarios.iter().any(|x| x == s);

    let mut scenarios = Vec::new();
    if want("cas") {
        scenarios.extend(opts.clients.iter().map(|c| Scenario::Cas(*c)));
    }
    if want("reg") {
        scenarios.push(Scenario::Reg);
    }
    if want("watch") {
        scenarios.push(Scenario::Watch);
    }

    let mut session = Session {
        scenarios: scenarios.clone(),
        etcd_api: opts.etcd_api,
        ..Session::default()
    };
    let mut running: Vec<Cluster> = Vec::new();
    for &n in &opts.nodes {
        for &kind in &opts.targets {
            let id = Id { kind, nodes: n };
            session.ids.push(id);
            let started = match kind {
                Kind::Flynn => Cluster::start_flynn(&bin, dir.path(), n),
                Kind::Etcd if !on_path("etcd") => Err(anyhow::anyhow!(
                    "etcd not on PATH (apt-get install -y etcd-server)"
                )),
                Kind::Etcd => Cluster::start_etcd(dir.path(), n, opts.etcd_timers, opts.etcd_api),
            };
            let ready = started.and_then(|c| {
                rt.block_on(async {
                    let l = c.leader(&h, Duration::from_secs(20)).await?;
                    load::prepare_failover(&h, &c, l).await?;
                    load::writable(&h, &c, l, 0).await?;
                    Ok::<_, anyhow::Error>((c, l))
                })
            });
            match ready {
                Ok((c, l)) => {
                    eprintln!(
                        "{id} up: {} (leader {}, pids {:?})",
                        c.nodes
                            .iter()
                            .map(|x| x.client.as_str())
                            .collect::<Vec<_>>()
                            .join(","),
                        c.nodes[l].client,
                        c.pids()
                    );
                    running.push(c);
                }
                Err(e) => {
                    eprintln!("skipping {id}: {e:#}");
                    session.skipped.push((id, format!("{e:#}")));
                }
            }
        }
    }
    if running.is_empty() {
        bail!("no target could be started");
    }
    if let Some(w) = crate::order::balance_warning(running.len(), opts.rounds, "targets") {
        eprintln!("{w}");
    }
    let etcd_version = match running.iter().find(|c| c.id.kind == Kind::Etcd) {
        Some(c) => rt.block_on(c.version(&h)),
        None => "-".into(),
    };
    session.header = header(&opts, &etcd_version);
    let max = Duration::from_secs_f64(opts.max_seconds.max(0.1));
    let mut run_no = 0usize;

    if opts.warmup {
        for c in running.iter_mut() {
            run_no += 1;
            let r = rt.block_on(async {
                let l = c.leader(&h, Duration::from_secs(10)).await?;
                load::cas(
                    &h,
                    c,
                    l,
                    run_no,
                    16,
                    Limits {
                        ops: u64::MAX,
                        max: Duration::from_secs(1),
                    },
                )
                .await
            });
            match r {
                Ok(p) => eprintln!(
                    "warm-up {:<20} {:>7.0} CAS/s (not counted)",
                    c.id.to_string(),
                    p.rate().unwrap_or(f64::NAN)
                ),
                Err(e) => eprintln!("warm-up {}: {e:#}", c.id),
            }
        }
    }

    let total = opts.rounds * scenarios.len() * running.len();
    let mut done = 0;
    for round in 0..opts.rounds {
        for (si, &sc) in scenarios.iter().enumerate() {
            for i in crate::order::scenario_order(running.len(), round, si) {
                let c = &mut running[i];
                let id = c.id;
                done += 1;
                if session.skipped.iter().any(|(s, _)| *s == id) {
                    continue;
                }
                if let Some(why) = c.dead() {
                    eprintln!("{id} died: {why}");
                    session.skipped.push((id, why));
                    continue;
                }
                run_no += 1;
                let r = rt.block_on(run_one(&h, c, sc, run_no, &opts, max));
                // A node that died during the run: the run does not count, and the cluster
                // runs nothing more.
                let died = c.dead();
                match r {
                    Ok(mut s) => {
                        s.invalid = invalid_reason(&s.a, s.b.as_ref(), died.as_deref());
                        eprintln!(
                            "[{done}/{total}] round {} {sc:<8} {:<20} {}{}{}",
                            round + 1,
                            id.to_string(),
                            report::one_line(sc, &s),
                            s.election
                                .as_deref()
                                .map(|e| format!("  (election: {e})"))
                                .unwrap_or_default(),
                            s.invalid
                                .as_deref()
                                .map(|w| format!("  (invalid, not counted: {w})"))
                                .unwrap_or_default(),
                        );
                        session
                            .samples
                            .entry((sc, id))
                            .or_default()
                            .push(Sample { round, ..s });
                    }
                    Err(e) => {
                        let msg = format!("round {} {sc} {id}: {e:#}", round + 1);
                        eprintln!("[{done}/{total}] {msg}");
                        session.failures.push(msg);
                    }
                }
                if let Some(why) = died {
                    eprintln!("{id} died: {why}");
                    session.skipped.push((id, why));
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }

    if want("failover") && opts.failovers > 0 {
        let clusters: Vec<usize> = (0..running.len())
            .filter(|i| running[*i].nodes.len() >= 3)
            .collect();
        let mut probe = 1_000u64;
        for rep in 0..opts.failovers {
            for k in crate::order::run_order(clusters.len(), rep) {
                let i = clusters[k];
                let c = &mut running[i];
                let id = c.id;
                if session.skipped.iter().any(|(s, _)| *s == id) {
                    continue;
                }
                probe += 100_000;
                let f = failover(&rt, &h, c, rep, probe);
                match f {
                    Ok(f) => {
                        eprintln!(
                            "failover {} {:<20} {} ms (old leader {}, new {}, {} attempts){}",
                            rep + 1,
                            id.to_string(),
                            f.ms.map_or("-".into(), |m| format!("{m:.0}")),
                            f.old_leader,
                            f.new_leader.as_deref().unwrap_or("?"),
                            f.attempts,
                            f.note
                                .as_deref()
                                .map(|n| format!(" ({n})"))
                                .unwrap_or_default()
                        );
                        session.failovers.entry(id).or_default().push(f);
                    }
                    Err(e) => {
                        let msg = format!("failover {} {id}: {e:#}", rep + 1);
                        eprintln!("{msg}");
                        session.failures.push(msg);
                        session.skipped.push((id, format!("after failover: {e:#}")));
                    }
                }
            }
        }
    }

    drop(running);
    let text = report::render(&session);
    if let Some(out) = &opts.out {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("report written to {}", out.display());
    }
    Ok(text)
}

async fn run_one(
    h: &Http,
    c: &Cluster,
    sc: Scenario,
    run: usize,
    opts: &Options,
    max: Duration,
) -> Result<Sample> {
    let leader = c.leader(h, Duration::from_secs(10)).await?;
    let before = c.raft_state(h, Duration::from_secs(10)).await;
    let (a, b) = match sc {
        Scenario::Cas(clients) => {
            let p = load::cas(
                h,
                c,
                leader,
                run,
                clients,
                Limits {
                    ops: opts.cas_ops,
                    max,
                },
            )
            .await?;
            (p, None)
        }
        Scenario::Reg => {
            let (r, hb) = load::reg(
                h,
                c,
                leader,
                run,
                opts.reg_clients.max(1),
                opts.instances.max(1),
                opts.heartbeats,
                max,
            )
            .await?;
            (r, Some(hb))
        }
        Scenario::Watch => {
            let watcher = if c.nodes.len() > 1 {
                (leader + 1) % c.nodes.len()
            } else {
                leader
            };
            let (ev, ack) =
                load::watch(h, c, leader, watcher, run, opts.watch_events.max(1), max).await?;
            (ev, Some(ack))
        }
    };
    let rss = c.rss();
    let after = c.raft_state(h, Duration::from_secs(5)).await;
    Ok(Sample {
        round: 0,
        a,
        b,
        rss,
        invalid: None,
        election: election_note(&before, &after),
    })
}

/// Interval between failover probe writes.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// Timeout of one failover probe write.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A kill with no acknowledged write for this long counts as failed (+∞ in the median).
pub const FAILOVER_LIMIT: Duration = Duration::from_secs(30);

/// SIGKILLs the leader, times kill → first acknowledged write on a survivor, restarts the
/// killed node and waits until all nodes agree on a leader again.
fn failover(
    rt: &tokio::runtime::Runtime,
    h: &Http,
    c: &mut Cluster,
    rep: usize,
    probe: u64,
) -> Result<Failover> {
    let leader = rt.block_on(async {
        let l = c.leader(h, Duration::from_secs(20)).await?;
        load::writable(h, c, l, probe).await?;
        Ok::<_, anyhow::Error>(l)
    })?;
    let old_leader = c.nodes[leader].client.clone();
    let survivors: Vec<usize> = (0..c.nodes.len()).filter(|i| *i != leader).collect();
    // Connections to the survivors exist before the kill (gRPC: connected), as a client's.
    let targets: Vec<(load::Conn, String)> = rt.block_on(async {
        let mut v = Vec::new();
        for s in &survivors {
            v.push((load::Conn::to(h, c, *s).await?, c.nodes[*s].url("")));
        }
        Ok::<_, anyhow::Error>(v)
    })?;
    let t0 = Instant::now();
    c.kill(leader);
    // A new attempt every PROBE_EVERY, alternating survivors, each with its own timeout:
    // a write that hangs during the election (etcd holds proposals until its request
    // timeout) does not delay the next one, so the resolution is PROBE_EVERY.
    let (ms, attempts, note) = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        let mut attempts = 0u64;
        let mut last = String::new();
        let mut tick = tokio::time::interval(PROBE_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if t0.elapsed() > FAILOVER_LIMIT {
                        return (
                            None,
                            attempts,
                            Some(format!("no write within {} s: {last}", FAILOVER_LIMIT.as_secs())),
                        );
                    }
                    let (conn, url) = targets[attempts as usize % targets.len()].clone();
                    attempts += 1;
                    set.spawn(load::probe_write(conn, url, probe + attempts, PROBE_TIMEOUT));
                }
                Some(r) = set.join_next(), if !set.is_empty() => match r {
                    Ok(Ok(())) => return (Some(t0.elapsed().as_secs_f64() * 1e3), attempts, None),
                    Ok(Err(e)) => last = format!("{e:#}"),
                    Err(e) => last = format!("{e}"),
                },
            }
        }
    });
    let new_leader = rt
        .block_on(c.leader(h, Duration::from_secs(5)))
        .ok()
        .map(|l| c.nodes[l].client.clone());
    c.restart(leader)
        .with_context(|| format!("restarting {old_leader}"))?;
    rt.block_on(async {
        c.leader(h, Duration::from_secs(30)).await?;
        // Let the restarted node catch up before the next kill.
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(Failover {
        rep,
        ms,
        attempts,
        old_leader,
        new_leader,
        note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(errors: u64) -> Phase {
        Phase {
            ok: 10,
            errors,
            ..Phase::default()
        }
    }

    #[test]
    fn errors_or_a_dead_node_make_a_run_invalid() {
        assert_eq!(invalid_reason(&phase(0), None, None), None);
        assert_eq!(invalid_reason(&phase(0), Some(&phase(0)), None), None);
        assert_eq!(
            invalid_reason(&phase(2), None, None).as_deref(),
            Some("2 errors")
        );
        // reg: heartbeat errors count too; watch: missed events (a) and failed writes (b).
        assert_eq!(
            invalid_reason(&phase(1), Some(&phase(3)), None).as_deref(),
            Some("4 errors")
        );
        assert_eq!(
            invalid_reason(&phase(0), Some(&phase(0)), Some("etcd-n2 exited\nlog")).as_deref(),
            Some("target died: etcd-n2 exited log")
        );
        assert_eq!(
            invalid_reason(&phase(1), None, Some("x")).as_deref(),
            Some("1 errors; target died: x")
        );
    }

    fn st(leader: &str, term: u64) -> Result<RaftState> {
        Ok(RaftState {
            leader: leader.into(),
            term,
        })
    }

    #[test]
    fn elections_are_noted() {
        assert_eq!(election_note(&st("a", 2), &st("a", 2)), None);
        assert_eq!(
            election_note(&st("a", 2), &st("b", 3)).as_deref(),
            Some("leader a → b, term 2 → 3")
        );
        assert_eq!(
            election_note(&st("a", 2), &st("a", 4)).as_deref(),
            Some("term 2 → 4 (leader a again)")
        );
        assert!(
            election_note(&st("a", 2), &Err(anyhow::anyhow!("no leader")))
                .unwrap()
                .contains("after the run: no leader")
        );
        assert!(election_note(&Err(anyhow::anyhow!("x")), &st("a", 2))
            .unwrap()
            .contains("before the run"));
    }
}
