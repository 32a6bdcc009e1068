//! The `discoverd` harness: flynn-discoverd and etcd, each as one node and as three nodes
//! (127.0.0.1/.2/.3), all started once with their data in one temp dir under /tmp (the same
//! disk). Round by round, with the target order rotated every scenario and round, each
//! target runs: metadata compare-and-swap at 1/16/64 clients, registrations then
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
use cluster::{Cluster, EtcdApi, EtcdTimers, Id, Kind};
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
             <all nodes>` (defaults: election timeout 100 ms, instance TTL 10 s)",
            opts.discoverd_bin.display()
        ),
        format!(
            "etcd: `etcd --name nN --data-dir DIR --listen-client-urls http://127.0.0.N:C \
             --listen-peer-urls http://127.0.0.N:P --initial-cluster <all members> \
             --heartbeat-interval {hb} --election-timeout {el} --logger zap --log-level warn` \
             (heartbeat {hb} ms, election {el} ms{}; default snapshot count), driven {}",
            if opts.etcd_timers == EtcdTimers::default() {
                " to match discoverd's 100 ms election timeout"
            } else {
                ""
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
             stops after {} s; {}{} round(s), target order rotated every scenario and round",
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
            let n = running.len();
            let mut order: Vec<usize> = (0..n).collect();
            order.rotate_left((round + si) % n.max(1));
            for i in order {
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
                match r {
                    Ok(s) => {
                        eprintln!(
                            "[{done}/{total}] round {} {sc:<8} {:<20} {}",
                            round + 1,
                            id.to_string(),
                            report::one_line(sc, &s)
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
            let mut order = clusters.clone();
            let len = order.len();
            if len > 0 {
                order.rotate_left(rep % len);
            }
            for i in order {
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
    Ok(Sample {
        round: 0,
        a,
        b,
        rss: c.rss(),
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
