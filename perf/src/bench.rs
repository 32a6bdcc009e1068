//! The `proxy` harness: start every target once, warm each up with one unrecorded run, then
//! run each scenario round by round with the targets in a balanced order ([`crate::order`]),
//! so slow drifts of a shared machine, and whatever one run leaves behind for the next, hit
//! all of them alike.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::resource::{getrlimit, setrlimit, Resource};

use crate::idle;
use crate::procfs;
use crate::procs::TempDir;
use crate::report::{self, Sample, Session};
use crate::targets::{self, Env, Id, Kind, NginxStream, Running, HOST};
use crate::wrk::{self, Load};
use crate::{h2load, handshake, tls};

/// The nofile limit the harness asks for (capped by the hard limit).
const WANTED_NOFILE: u64 = 65_536;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    SmallC64,
    SmallC256,
    Big64kC64,
    NewconnC64,
    Idle10k,
    TlsC64,
    TlsResumeC64,
    TlsNewconnC64,
    H2C64,
    TcpC64,
    TcpNewconnC64,
}

/// How one run of a scenario is driven.
enum Driver {
    Wrk(Load),
    /// The rustls client that never resumes (full handshakes).
    Handshake(handshake::Load),
    H2(h2load::Load),
}

impl Scenario {
    pub const ALL: [Scenario; 11] = [
        Scenario::SmallC64,
        Scenario::SmallC256,
        Scenario::Big64kC64,
        Scenario::NewconnC64,
        Scenario::Idle10k,
        Scenario::TlsC64,
        Scenario::TlsResumeC64,
        Scenario::TlsNewconnC64,
        Scenario::H2C64,
        Scenario::TcpC64,
        Scenario::TcpNewconnC64,
    ];

    /// The TLS scenarios (`--scenarios tls` expands to these).
    pub const TLS: [Scenario; 4] = [
        Scenario::TlsC64,
        Scenario::TlsResumeC64,
        Scenario::TlsNewconnC64,
        Scenario::H2C64,
    ];

    /// The plain TCP proxy scenarios (`--scenarios tcp` expands to these).
    pub const TCP: [Scenario; 2] = [Scenario::TcpC64, Scenario::TcpNewconnC64];

    pub fn is_tls(self) -> bool {
        Scenario::TLS.contains(&self)
    }

    pub fn is_tcp(self) -> bool {
        Scenario::TCP.contains(&self)
    }

    /// Parses a `--scenarios` entry: a scenario name, `tls` for every TLS scenario or `tcp`
    /// for every TCP proxy scenario.
    pub fn parse_group(s: &str) -> Result<Vec<Scenario>> {
        match s {
            "tls" => return Ok(Scenario::TLS.to_vec()),
            "tcp" => return Ok(Scenario::TCP.to_vec()),
            _ => {}
        }
        Scenario::parse(s).map(|sc| vec![sc])
    }

    /// What one request is in this scenario's report (`req` unless it is a handshake).
    pub fn unit(self) -> &'static str {
        match self {
            Scenario::TlsResumeC64 | Scenario::TlsNewconnC64 => "handshakes",
            _ => "req",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scenario::SmallC64 => "small-c64",
            Scenario::SmallC256 => "small-c256",
            Scenario::Big64kC64 => "64k-c64",
            Scenario::NewconnC64 => "newconn-c64",
            Scenario::Idle10k => "idle-10k",
            Scenario::TlsC64 => "tls-c64",
            Scenario::TlsResumeC64 => "tls-resume-c64",
            Scenario::TlsNewconnC64 => "tls-newconn-c64",
            Scenario::H2C64 => "h2-c64",
            Scenario::TcpC64 => "tcp-c64",
            Scenario::TcpNewconnC64 => "tcp-newconn-c64",
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
            Scenario::TlsC64 => {
                "HTTPS keep-alive `GET /` (13-byte body), 64 connections, `wrk` over TLS \
                 (OpenSSL client, no ALPN). The handshakes happen once per connection at the \
                 start, so this is TLS record cost per request."
            }
            Scenario::TlsResumeC64 => {
                "HTTPS `GET /` with `Connection: close`, 64 at a time, `wrk` over TLS: a new \
                 TCP connection per request, but **resumed** TLS handshakes. wrk reconnects \
                 with `SSL_shutdown` + `SSL_clear`, which keeps the session, so every reconnect \
                 offers its TLS 1.3 ticket and every server here accepts it (tickets are on by \
                 default in all three). One handshake = one request."
            }
            Scenario::TlsNewconnC64 => {
                "**Full** TLS handshakes: a new TCP connection and handshake per `GET /` with \
                 `Connection: close`, 64 at a time, from the harness's own rustls client with \
                 resumption disabled (it offers no ticket or session id; every handshake it \
                 counted was full). SNI `bench.local`, no ALPN, X25519 key exchange first, \
                 handshake signature verified. One handshake = one request."
            }
            Scenario::H2C64 => {
                "HTTP/2 over TLS (ALPN h2): `h2load -t2 -c64 -m10` `GET /`, 10 concurrent \
                 streams per connection; the proxy speaks HTTP/1.1 to the origin. p50/p99 are \
                 per request, from h2load's request log."
            }
            Scenario::TcpC64 => {
                "Keep-alive `GET /` (13-byte body), 64 connections, through a plain TCP proxy \
                 to the origin (flynn: a TCP route; nginx: `stream`; HAProxy: `mode tcp`): \
                 bytes relayed both ways, no HTTP parsing. One upstream connection per client \
                 connection. direct is the origin itself, as in small-c64."
            }
            Scenario::TcpNewconnC64 => {
                "`GET /` with `Connection: close` through the plain TCP proxy, 64 at a time: \
                 a new client connection per request and so a new upstream connection too (a \
                 TCP proxy cannot pool); the origin closes, the proxy relays the FIN. direct \
                 is the origin itself, as in newconn-c64."
            }
        }
    }

    /// How to drive this scenario against `target`: `Err(None)` when the scenario does not
    /// apply (TLS against the plain origin, idle-10k), `Err(Some(why))` when the target
    /// cannot serve it (reported as such).
    fn driver(self, target: &Running, duration_s: u64) -> Result<Driver, Option<String>> {
        if self.is_tls() && target.id.kind == Kind::Direct {
            return Err(None);
        }
        let tls_port = || target.tls_port.ok_or(None);
        let tcp_port = || match &target.tcp {
            Some(Ok(port)) => Ok(*port),
            Some(Err(why)) => Err(Some(why.clone())),
            None => Err(None),
        };
        let (scheme, port, path, connections, close) = match self {
            Scenario::SmallC64 => ("http", target.port, "/", 64, false),
            Scenario::SmallC256 => ("http", target.port, "/", 256, false),
            Scenario::Big64kC64 => ("http", target.port, "/64k", 64, false),
            Scenario::NewconnC64 => ("http", target.port, "/", 64, true),
            Scenario::Idle10k => return Err(None),
            Scenario::TlsC64 => ("https", tls_port()?, "/", 64, false),
            Scenario::TlsResumeC64 => ("https", tls_port()?, "/", 64, true),
            Scenario::TcpC64 => ("http", tcp_port()?, "/", 64, false),
            Scenario::TcpNewconnC64 => ("http", tcp_port()?, "/", 64, true),
            Scenario::TlsNewconnC64 => {
                return Ok(Driver::Handshake(handshake::Load {
                    port: tls_port()?,
                    sni: HOST.to_string(),
                    host: HOST.to_string(),
                    path: "/".into(),
                    connections: 64,
                    duration: Duration::from_secs(duration_s),
                }));
            }
            Scenario::H2C64 => {
                let Some(port) = target.h2_port else {
                    return Err(Some(match target.id.kind {
                        Kind::Flynn => "not supported: the router's HTTPS listener does not \
                                        select ALPN h2 (no HTTP/2 yet)"
                            .to_string(),
                        _ => "no HTTP/2 listener".to_string(),
                    }));
                };
                return Ok(Driver::H2(h2load::Load {
                    url: format!("https://127.0.0.1:{port}/"),
                    threads: 2,
                    connections: 64,
                    streams: 10,
                    duration_s,
                }));
            }
        };
        Ok(Driver::Wrk(Load {
            url: format!("{scheme}://127.0.0.1:{port}{path}"),
            host: HOST.to_string(),
            threads: 2,
            connections,
            duration_s,
            close,
        }))
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
    /// How long the idle connections sit before the RSS is read.
    pub idle_settle: Duration,
    /// Key type of the generated certificate (TLS scenarios).
    pub key_type: tls::KeyType,
    /// One unrecorded run per target before round 1.
    pub warmup: bool,
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
            "TLS: {}; {}",
            first_line_of("openssl", &["version"]),
            if on_path("h2load") {
                first_line_of("h2load", &["--version"])
            } else {
                "h2load: not found".into()
            },
        ),
        format!(
            "Load: wrk -t2, {} s per run, {}{} round(s), target order changing every scenario \
             and round (a balanced design: every target in every position and right after \
             every other target equally often over a cycle); origin: flynn-perf origin, {} \
             monoio threads; everything on 127.0.0.1",
            opts.duration_s,
            if opts.warmup {
                "one unrecorded warm-up run per target (its first scenario), then "
            } else {
                ""
            },
            opts.rounds,
            opts.origin_threads
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

/// One load run against a target: the load generator's report, the target's CPU seconds
/// during the run, its RSS right after it and the handshake kinds (`tls-newconn-c64`).
struct Measured {
    result: Result<wrk::Report>,
    cpu_s: f64,
    rss: u64,
    kinds: Option<(u64, u64)>,
}

fn measure(target: &Running, driver: &Driver, log: &Path) -> Measured {
    let cpu0 = procfs::cpu_seconds(target.pid);
    let mut kinds = None;
    let result = match driver {
        Driver::Wrk(load) => wrk::run(load, log),
        Driver::H2(load) => h2load::run(load, log),
        Driver::Handshake(load) => handshake::run(load).map(|o| {
            kinds = Some((o.full, o.resumed));
            o.report
        }),
    };
    let cpu_s = procfs::cpu_seconds(target.pid) - cpu0;
    let rss = procfs::rss_bytes(target.pid);
    Measured {
        result,
        cpu_s,
        rss,
        kinds,
    }
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
    let router_bin = crate::procs::resolve_bin(&opts.router_bin, "flynn-router");
    let want_tls = opts.scenarios.iter().any(|s| s.is_tls());
    let want_h2 = opts.scenarios.contains(&Scenario::H2C64);
    let nginx_stream = opts.scenarios.iter().any(|s| s.is_tcp()).then(|| {
        let stream = if opts.targets.contains(&Kind::Nginx) && on_path("nginx") {
            NginxStream::detect()
        } else {
            NginxStream::Missing("nginx not used".into())
        };
        let mut line = "TCP proxy: flynn: a `tcp` route on a fixed port (routes file, \
                        `--tcp-ip 127.0.0.1`); haproxy: `mode tcp` frontend/backend in the same \
                        process"
            .to_string();
        if opts.targets.contains(&Kind::Nginx) {
            line.push_str(&format!("; nginx: `stream` server, {}", stream.describe()));
        }
        session.header.push(line);
        stream
    });
    let tls_files = if want_tls {
        let files = tls::generate(dir.path(), opts.key_type)?;
        session.header.push(format!(
            "Certificate: self-signed {} (`openssl req`), the same keypair for every target; \
             TLS 1.2 and 1.3 enabled everywhere, each server's default session cache and \
             tickets",
            opts.key_type.describe()
        ));
        Some(files)
    } else {
        None
    };
    if want_h2 && !on_path("h2load") {
        session
            .header
            .push("h2-c64 skipped: h2load not on PATH (apt-get install -y nghttp2-client)".into());
    }
    let env = Env {
        dir: dir.path(),
        origin_port,
        nofile,
        router_bin: &router_bin,
        tls: tls_files.as_ref(),
        h2: want_h2 && on_path("h2load"),
        tcp: nginx_stream.as_ref(),
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
    if let Some(w) = crate::order::balance_warning(running.len(), opts.rounds, "targets") {
        eprintln!("{w}");
    }
    if want_tls {
        let mut seen = Vec::new();
        for r in &running {
            let Some(p) = r.tls_port else { continue };
            if seen.contains(&r.id.kind) {
                continue;
            }
            seen.push(r.id.kind);
            let mut line = format!(
                "{} negotiates (openssl s_client): {}",
                r.id.kind,
                tls::probe(dir.path(), p, None)
            );
            if let Some(h2) = r.h2_port {
                line.push_str(&format!(
                    "; h2 listener: {}",
                    tls::probe(dir.path(), h2, Some("h2"))
                ));
            }
            eprintln!("{line}");
            session.header.push(line);
        }
    }

    let wrk_scenarios: Vec<Scenario> = opts
        .scenarios
        .iter()
        .copied()
        .filter(|s| *s != Scenario::Idle10k)
        .filter(|s| *s != Scenario::H2C64 || env.h2)
        .collect();
    session.scenarios = wrk_scenarios
        .iter()
        .map(|s| (s.name().to_string(), s.description().to_string()))
        .collect();
    for s in &wrk_scenarios {
        if s.unit() != "req" {
            session
                .units
                .insert(s.name().to_string(), s.unit().to_string());
        }
    }
    if opts.warmup {
        // The first load at a fresh target pays for its lazy start (page faults, allocator
        // growth, connection pools, TLS session caches): one unrecorded run of the first
        // scenario it serves.
        for target in running.iter_mut() {
            let id = target.id;
            let Some((scenario, driver)) = wrk_scenarios
                .iter()
                .find_map(|&sc| sc.driver(target, opts.duration_s).ok().map(|d| (sc, d)))
            else {
                continue;
            };
            let log = dir
                .path()
                .join(format!("load-warmup-{}-{id}.log", scenario.name()));
            let m = measure(target, &driver, &log);
            match &m.result {
                Ok(w) => eprintln!(
                    "warm-up {:<15} {:<10} {:>9.0} {unit}/s  errors {} (not counted)",
                    scenario.name(),
                    id.to_string(),
                    w.rps,
                    w.errors(),
                    unit = scenario.unit(),
                ),
                Err(e) => eprintln!("warm-up {} {id}: {e:#}", scenario.name()),
            }
            if let Some(why) = target.dead() {
                eprintln!("{id} died during its warm-up: {why}");
                session.skipped.insert(id, why);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    let total = opts.rounds * wrk_scenarios.len() * running.len();
    let mut done = 0;
    for round in 0..opts.rounds {
        for (si, &scenario) in wrk_scenarios.iter().enumerate() {
            for i in crate::order::scenario_order(running.len(), round, si) {
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
                let driver = match scenario.driver(target, opts.duration_s) {
                    Ok(d) => d,
                    Err(None) => continue,
                    Err(Some(why)) => {
                        session.notes.insert((scenario.name().to_string(), id), why);
                        continue;
                    }
                };
                let log = dir
                    .path()
                    .join(format!("load-{}-{}-{round}.log", scenario.name(), id));
                let Measured {
                    result,
                    cpu_s,
                    rss,
                    kinds,
                } = measure(target, &driver, &log);
                // A target that died during the run may still have answered most of it: the
                // run does not count, and the target runs nothing more.
                let died = target.dead();
                match result {
                    Ok(w) => {
                        let invalid = Sample::invalid_reason(&w, died.as_deref());
                        eprintln!(
                            "[{done}/{total}] round {} {:<15} {:<10} {:>9.0} {unit}/s  p99 {:>9.0} µs  {:>7.0} {unit}/CPU-s  errors {}{}{}",
                            round + 1,
                            scenario.name(),
                            id.to_string(),
                            w.rps,
                            w.p99_us,
                            if cpu_s > 0.0 { w.requests as f64 / cpu_s } else { f64::NAN },
                            w.errors(),
                            kinds
                                .map(|(f, r)| format!("  ({f} full, {r} resumed)"))
                                .unwrap_or_default(),
                            if invalid.is_some() { "  (invalid: not counted)" } else { "" },
                            unit = scenario.unit(),
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
                                handshakes: kinds,
                                invalid,
                            });
                    }
                    Err(e) => {
                        let msg = format!("round {} {} {id}: {e:#}", round + 1, scenario.name());
                        eprintln!("[{done}/{total}] {msg}");
                        session.failures.push(msg);
                    }
                }
                if let Some(why) = died {
                    eprintln!("{id} died: {why}");
                    session.skipped.insert(id, why);
                }
                // Let sockets drain and the proxy settle before the next target.
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }

    if opts.scenarios.contains(&Scenario::Idle10k) {
        session.idle_description = Some(format!(
            "{} client connections, one keep-alive request each, then idle for {} ms: proxy RSS \
             growth (fewest workers; bounded to 60 s).",
            opts.idle_conns,
            opts.idle_settle.as_millis()
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
                opts.idle_settle,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_names_parse_back() {
        for sc in Scenario::ALL {
            assert_eq!(Scenario::parse(sc.name()).unwrap(), sc);
        }
        assert_eq!(
            Scenario::parse_group("tcp-c64").unwrap(),
            vec![Scenario::TcpC64]
        );
        assert_eq!(
            Scenario::parse_group("tcp").unwrap(),
            Scenario::TCP.to_vec()
        );
        assert!(Scenario::TCP
            .iter()
            .all(|s| !s.is_tls() && s.unit() == "req"));
        assert!(Scenario::parse("tcp-c65").is_err());
    }
}
