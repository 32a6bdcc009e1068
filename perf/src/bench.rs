//! The `proxy` harness: start every target once, then run each scenario round by round with
//! the targets in a rotating order, so slow drifts of a shared machine hit all of them alike.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::resource::{getrlimit, setrlimit, Resource};

use crate::idle;
use crate::procfs;
use crate::procs::TempDir;
use crate::report::{self, Sample, Session};
use crate::targets::{self, Env, Id, Kind, Running, HOST};
use crate::wrk::{self, Load};

/// The nofile limit the harness asks for (capped by the hard limit).
const WANTED_NOFILE: u64 = 65_536;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    SmallC64,
    SmallC256,
    Big64kC64,
    NewconnC64,
    Idle10k,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [
        Scenario::SmallC64,
        Scenario::SmallC256,
        Scenario::Big64kC64,
        Scenario::NewconnC64,
        Scenario::Idle10k,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::SmallC64 => "small-c64",
            Scenario::SmallC256 => "small-c256",
            Scenario::Big64kC64 => "64k-c64",
            Scenario::NewconnC64 => "newconn-c64",
            Scenario::Idle10k => "idle-10k",
        }
    }

    pub fn parse(s: &str) -> Result<Scenario> {
        Scenario::ALL
            .into_iter()
            .find(|sc| sc.name() == s)
            .with_context(|| format!("unknown scenario {s:?}"))
    }

    pub fn description(self) -> &'static str {
        match self {
            Scenario::SmallC64 => "Keep-alive `GET /` (13-byte body), 64 connections.",
            Scenario::SmallC256 => "Keep-alive `GET /` (13-byte body), 256 connections.",
            Scenario::Big64kC64 => "Keep-alive `GET /64k` (64 KiB body), 64 connections.",
            Scenario::NewconnC64 => {
                "`GET /` with `Connection: close`: a new client connection per request, \
                 64 at a time (upstream connections stay pooled)."
            }
            Scenario::Idle10k => {
                "10 000 client connections, one keep-alive request each, then idle: proxy RSS \
                 growth (1 worker each; bounded to 60 s)."
            }
        }
    }

    /// The wrk load for this scenario, or `None` for scenarios wrk does not drive.
    fn load(self, port: u16, duration_s: u64) -> Option<Load> {
        let (path, connections, close) = match self {
            Scenario::SmallC64 => ("/", 64, false),
            Scenario::SmallC256 => ("/", 256, false),
            Scenario::Big64kC64 => ("/64k", 64, false),
            Scenario::NewconnC64 => ("/", 64, true),
            Scenario::Idle10k => return None,
        };
        Some(Load {
            url: format!("http://127.0.0.1:{port}{path}"),
            host: HOST.to_string(),
            threads: 2,
            connections,
            duration_s,
            close,
        })
    }
}

pub struct Options {
    pub rounds: usize,
    pub duration_s: u64,
    pub targets: Vec<Kind>,
    pub workers: Vec<usize>,
    pub scenarios: Vec<Scenario>,
    pub router_bin: PathBuf,
    pub out: Option<PathBuf>,
    pub origin_threads: usize,
    pub idle_conns: usize,
    /// The command line, for the report header.
    pub command: String,
}

/// Raises the soft RLIMIT_NOFILE as far as allowed (children inherit it); returns the result.
fn raise_nofile() -> u64 {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            let want = WANTED_NOFILE.min(hard);
            if want > soft && setrlimit(Resource::RLIMIT_NOFILE, want, hard).is_ok() {
                want
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

pub(crate) fn first_line_of(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{cmd}: not found"))
}

pub(crate) fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

fn header(opts: &Options, nofile: u64) -> Vec<String> {
    let date = Command::new("date")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = first_line_of("uname", &["-r"]);
    vec![
        format!("Date: {date}"),
        format!("Command: `{}`", opts.command),
        format!(
            "Host: {cpus} CPUs, Linux {kernel}, RLIMIT_NOFILE {nofile}; {}; {}; {}",
            first_line_of("nginx", &["-v"]),
            first_line_of("haproxy", &["-v"]),
            first_line_of("wrk", &["-v"]),
        ),
        format!(
            "Load: wrk -t2, {} s per run, {} round(s), target order rotated every scenario and \
             round; origin: flynn-perf origin, {} monoio threads; everything on 127.0.0.1",
            opts.duration_s, opts.rounds, opts.origin_threads
        ),
    ]
}

/// Row order: direct, then for each worker count the proxies in `--targets` order.
fn row_ids(opts: &Options) -> Vec<Id> {
    let mut ids = Vec::new();
    if opts.targets.contains(&Kind::Direct) {
        ids.push(Id {
            kind: Kind::Direct,
            workers: None,
        });
    }
    for &w in &opts.workers {
        for &kind in opts.targets.iter().filter(|k| **k != Kind::Direct) {
            ids.push(Id {
                kind,
                workers: Some(w),
            });
        }
    }
    ids
}

pub fn run(opts: Options) -> Result<String> {
    if !on_path("wrk") {
        bail!("wrk not found on PATH (apt-get install -y wrk)");
    }
    let nofile = raise_nofile();
    let dir = TempDir::new("flynn-perf")?;
    let mut session = Session {
        header: header(&opts, nofile),
        ids: row_ids(&opts),
        ..Session::default()
    };

    let (origin, origin_port) = targets::start_origin(dir.path(), opts.origin_threads)?;
    eprintln!(
        "origin up on 127.0.0.1:{origin_port} (pid {})",
        origin.pid()
    );
    let router_bin = targets::resolve_router_bin(&opts.router_bin);
    let env = Env {
        dir: dir.path(),
        origin_port,
        nofile,
        router_bin: &router_bin,
    };

    let mut running: Vec<Running> = Vec::new();
    for &id in &session.ids {
        let tool = match id.kind {
            Kind::Nginx => Some("nginx"),
            Kind::Haproxy => Some("haproxy"),
            _ => None,
        };
        if let Some(tool) = tool.filter(|t| !on_path(t)) {
            let why = format!("{tool} not on PATH (apt-get install -y nginx-light haproxy)");
            eprintln!("skipping {id}: {why}");
            session.skipped.insert(id, why);
            continue;
        }
        match targets::start(id, &env) {
            Ok(mut r) => {
                if id.kind == Kind::Direct {
                    r.pid = origin.pid();
                }
                eprintln!("{id} up on 127.0.0.1:{} (pid {})", r.port, r.pid);
                running.push(r);
            }
            Err(e) => {
                eprintln!("skipping {id}: {e:#}");
                session.skipped.insert(id, format!("{e:#}"));
            }
        }
    }
    if running.is_empty() {
        bail!("no target could be started");
    }

    let wrk_scenarios: Vec<Scenario> = opts
        .scenarios
        .iter()
        .copied()
        .filter(|s| *s != Scenario::Idle10k)
        .collect();
    session.scenarios = wrk_scenarios
        .iter()
        .map(|s| (s.name().to_string(), s.description().to_string()))
        .collect();
    let total = opts.rounds * wrk_scenarios.len() * running.len();
    let mut done = 0;
    for round in 0..opts.rounds {
        for (si, &scenario) in wrk_scenarios.iter().enumerate() {
            let n = running.len();
            let mut order: Vec<usize> = (0..n).collect();
            order.rotate_left((round + si) % n.max(1));
            for i in order {
                let target = &mut running[i];
                let id = target.id;
                done += 1;
                if session.skipped.contains_key(&id) {
                    continue;
                }
                if let Some(why) = target.dead() {
                    eprintln!("{id} died: {why}");
                    session.skipped.insert(id, why);
                    continue;
                }
                let Some(load) = scenario.load(target.port, opts.duration_s) else {
                    continue;
                };
                let log = dir
                    .path()
                    .join(format!("wrk-{}-{}-{round}.log", scenario.name(), id));
                let cpu0 = procfs::cpu_seconds(target.pid);
                let result = wrk::run(&load, &log);
                let cpu_s = procfs::cpu_seconds(target.pid) - cpu0;
                let rss = procfs::rss_bytes(target.pid);
                match result {
                    Ok(w) => {
                        eprintln!(
                            "[{done}/{total}] round {} {:<12} {:<10} {:>9.0} req/s  p99 {:>9.0} µs  {:>7.0} req/CPU-s  errors {}",
                            round + 1,
                            scenario.name(),
                            id.to_string(),
                            w.rps,
                            w.p99_us,
                            if cpu_s > 0.0 { w.requests as f64 / cpu_s } else { f64::NAN },
                            w.errors(),
                        );
                        session
                            .samples
                            .entry((scenario.name().to_string(), id))
                            .or_default()
                            .push(Sample {
                                round,
                                wrk: w,
                                cpu_s,
                                rss,
                            });
                    }
                    Err(e) => {
                        let msg = format!("round {} {} {id}: {e:#}", round + 1, scenario.name());
                        eprintln!("[{done}/{total}] {msg}");
                        session.failures.push(msg);
                    }
                }
                // Let sockets drain and the proxy settle before the next target.
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }

    if opts.scenarios.contains(&Scenario::Idle10k) {
        session.idle_description = Some(format!(
            "{} client connections, one keep-alive request each, then idle: proxy RSS growth \
             (fewest workers; bounded to 60 s).",
            opts.idle_conns
        ));
        let idle_workers = opts.workers.iter().copied().min();
        for target in running.iter_mut() {
            if target.id.kind == Kind::Direct || target.id.workers != idle_workers {
                continue;
            }
            if let Some(why) = target.dead() {
                session.skipped.insert(target.id, why);
                continue;
            }
            eprintln!("idle-10k: {} ...", target.id);
            let outcome = idle::run(
                target.port,
                target.pid,
                opts.idle_conns,
                Duration::from_secs(60),
            );
            eprintln!(
                "idle-10k: {} opened {} in {:.1} s, RSS {:.1} -> {:.1} MiB{}",
                target.id,
                outcome.opened,
                outcome.seconds,
                outcome.rss_before as f64 / 1048576.0,
                outcome.rss_after as f64 / 1048576.0,
                outcome
                    .error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
            session.idle.push((target.id, outcome));
        }
    }

    drop(running);
    drop(origin);
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
