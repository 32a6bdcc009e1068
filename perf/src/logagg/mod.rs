//! The `logagg` harness: flynn-logagg (per thread count) and rsyslog (imtcp → omfile) each
//! started once, then the same pre-built syslog load blasted at each over 1 and over N TCP
//! connections, round by round in a balanced target order ([`crate::order`]). For each run:
//! messages/s until
//! the aggregator has processed everything sent, its CPU per message from /proc, its RSS, and
//! for flynn-logagg the follow latency of marker lines under that load.

pub mod load;
pub mod report;
pub mod targets;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::{first_line_of, on_path};
use crate::procfs;
use crate::procs::TempDir;
use crate::report::percentile;
use load::Load;
use targets::{Id, Kind, Target};

/// How often the harness checks whether the target has processed everything.
pub const POLL: Duration = Duration::from_millis(5);
/// Give up waiting when the processed count has not moved for this long; also how long past
/// the senders' deadline a write may block before the sender gives up (a stall).
pub const STALL: Duration = Duration::from_secs(10);

pub struct Options {
    pub rounds: usize,
    /// Messages per run.
    pub messages: usize,
    /// Senders stop early after this many seconds.
    pub max_seconds: u64,
    /// Connection counts (one scenario each).
    pub conns: Vec<usize>,
    /// Each connection is its own host (own hostname, own sequence) instead of one host's
    /// sequence split over all connections.
    pub host_per_conn: bool,
    /// flynn-logagg thread counts.
    pub threads: Vec<usize>,
    pub targets: Vec<Kind>,
    pub apps: usize,
    /// RFC 5424 message bytes (without the octet count).
    pub size: usize,
    /// Interval between follow-latency markers.
    pub marker_ms: u64,
    /// One unrecorded run per target before round 1.
    pub warmup: bool,
    pub logagg_bin: PathBuf,
    pub out: Option<PathBuf>,
    pub command: String,
}

/// One run of one scenario against one target.
#[derive(Clone, Debug)]
pub struct Sample {
    pub round: usize,
    /// Load messages written to the sockets.
    pub sent: u64,
    /// Markers sent alongside (flynn-logagg only).
    pub markers_sent: u64,
    /// Messages the target had processed when the harness stopped waiting.
    pub processed: u64,
    /// Seconds to write everything into the sockets.
    pub send_s: f64,
    /// Seconds from the first write until the target had processed everything.
    pub elapsed_s: f64,
    /// Target CPU seconds (user + system, whole process tree) over `elapsed_s`.
    pub cpu_s: f64,
    /// Target RSS right after the run, bytes.
    pub rss: u64,
    /// flynn-logagg's `flynn_logagg_memory_bytes` after the run.
    pub buffered: Option<u64>,
    /// Marker latencies (send → received by the follower), µs.
    pub latencies_us: Vec<f64>,
    /// Something worth flagging (stall, follower error).
    pub note: Option<String>,
    /// Why the run is kept out of the medians (lost messages, a stall, the target died), if
    /// it is.
    pub invalid: Option<String>,
}

impl Sample {
    pub fn complete(&self) -> bool {
        self.processed >= self.sent + self.markers_sent
    }
    pub fn lost(&self) -> u64 {
        (self.sent + self.markers_sent).saturating_sub(self.processed)
    }
    pub fn msgs_per_s(&self) -> Option<f64> {
        (self.elapsed_s > 0.0).then(|| self.sent as f64 / self.elapsed_s)
    }
    pub fn cpu_us_per_msg(&self) -> Option<f64> {
        let n = self.processed.min(self.sent + self.markers_sent);
        (n > 0 && self.cpu_s > 0.0).then(|| self.cpu_s * 1e6 / n as f64)
    }
}

/// Why a run cannot count: a sender or the marker connection stalled (the target stopped
/// reading), messages were lost (the harness stopped waiting), or the target died.
pub fn invalid_reason(stalls: &[String], lost: u64, died: Option<&str>) -> Option<String> {
    let mut why: Vec<String> = stalls.to_vec();
    why.dedup();
    if lost > 0 {
        why.push(format!("{lost} lost"));
    }
    crate::report::join_reasons(why, died)
}

/// Everything a session measured.
#[derive(Default)]
pub struct Session {
    pub header: Vec<String>,
    pub ids: Vec<Id>,
    pub notes: Vec<(Id, String)>,
    pub skipped: Vec<(Id, String)>,
    pub conns: Vec<usize>,
    pub samples: std::collections::BTreeMap<(usize, Id), Vec<Sample>>,
    pub failures: Vec<String>,
    pub rsyslog_conf: Option<String>,
    pub sample_frame: String,
}

fn header(opts: &Options, load: &Load) -> Vec<String> {
    let date = first_line_of("date", &["-u"]);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    vec![
        format!("Date: {date}"),
        format!("Command: `{}`", opts.command),
        format!(
            "Host: {cpus} CPUs, Linux {}; {}",
            first_line_of("uname", &["-r"]),
            first_line_of("rsyslogd", &["-v"])
                .trim_end_matches("compiled with:")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        ),
        format!(
            "Load: {} messages per run ({} B RFC 5424 each, octet-counted: {} B frames), app \
             `i % {}`, written by one std thread per connection in {} KiB writes ({}), senders \
             stop after {} s; {}{} round(s), target order changing every scenario and round \
             (balanced: each target in each position and right after each other equally \
             often over a cycle); everything on 127.0.0.1",
            load.count,
            load.payload,
            load.frame_len,
            load.apps,
            load::WRITE_BYTES / 1024,
            if opts.host_per_conn {
                "each connection its own host and sequence"
            } else {
                "one host, its sequence split into one contiguous slice per connection"
            },
            opts.max_seconds,
            if opts.warmup {
                "one unrecorded warm-up run per target, then "
            } else {
                ""
            },
            opts.rounds,
        ),
        format!(
            "flynn-logagg: `{} --syslog-addr 127.0.0.1:0 --api-addr 127.0.0.1:0 --threads N \
             --no-udp` (defaults: 10 000 lines per app, 1 GiB memory cap); a follower on \
             `/log/{}?follow=true&lines=0` and a marker line every {} ms on its own connection \
             during the blast",
            opts.logagg_bin.display(),
            load::MARKER_APP,
            opts.marker_ms,
        ),
    ]
}

/// Row order: flynn-logagg per thread count, then rsyslog.
fn row_ids(opts: &Options) -> Vec<Id> {
    let mut ids = Vec::new();
    if opts.targets.contains(&Kind::Flynn) {
        for &t in &opts.threads {
            ids.push(Id {
                kind: Kind::Flynn,
                threads: Some(t),
            });
        }
    }
    if opts.targets.contains(&Kind::Rsyslog) {
        ids.push(Id {
            kind: Kind::Rsyslog,
            threads: None,
        });
    }
    ids
}

pub fn run(opts: Options) -> Result<String> {
    let dir = TempDir::new("flynn-perf-logagg")?;
    eprintln!(
        "building {} messages of {} bytes ...",
        opts.messages, opts.size
    );
    let mut load = Load::build(opts.messages.max(1), opts.size, opts.apps);
    let mut session = Session {
        header: header(&opts, &load),
        ids: row_ids(&opts),
        conns: opts.conns.clone(),
        sample_frame: load.sample(),
        ..Session::default()
    };
    let logagg_bin = crate::procs::resolve_bin(&opts.logagg_bin, "flynn-logagg");

    let mut running: Vec<Target> = Vec::new();
    for id in session.ids.clone() {
        let started = match id.kind {
            Kind::Flynn => targets::start_flynn(&logagg_bin, dir.path(), id.threads.unwrap_or(1)),
            Kind::Rsyslog if !on_path("rsyslogd") => Err(anyhow::anyhow!(
                "rsyslogd not on PATH (apt-get install -y rsyslog)"
            )),
            Kind::Rsyslog => {
                session.rsyslog_conf = Some(targets::rsyslog_conf("TMPDIR", "PORT"));
                targets::start_rsyslog(dir.path(), load.payload)
            }
        };
        match started {
            Ok(t) => {
                eprintln!("{id} up: syslog {} (pid {}) {}", t.syslog, t.pid(), t.note);
                if !t.note.is_empty() {
                    session.notes.push((id, t.note.clone()));
                }
                running.push(t);
            }
            Err(e) => {
                eprintln!("skipping {id}: {e:#}");
                session.skipped.push((id, format!("{e:#}")));
            }
        }
    }
    if running.is_empty() {
        bail!("no target could be started");
    }
    if let Some(w) = crate::order::balance_warning(running.len(), opts.rounds, "targets") {
        eprintln!("{w}");
    }
    let mut run_no = 0;

    if opts.warmup {
        // The first blast at a fresh flynn-logagg fills its empty rings (page faults, first
        // allocations); later runs replace lines in full rings, which is the steady state.
        let conns = opts.conns.iter().copied().max().unwrap_or(1);
        for target in running.iter_mut() {
            run_no += 1;
            load.set_tags(run_no, conns, opts.host_per_conn);
            match run_one(target, &load, conns, &opts) {
                Ok(s) => eprintln!(
                    "warm-up c{conns} {:<16} {:>9.0} msg/s  {:>5.2} CPU-µs/msg (not counted)",
                    target.id.to_string(),
                    s.msgs_per_s().unwrap_or(f64::NAN),
                    s.cpu_us_per_msg().unwrap_or(f64::NAN),
                ),
                Err(e) => eprintln!("warm-up {}: {e:#}", target.id),
            }
            target.reset_output();
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    let total = opts.rounds * opts.conns.len() * running.len();
    let mut done = 0;
    for round in 0..opts.rounds {
        for (si, &conns) in opts.conns.iter().enumerate() {
            for i in crate::order::scenario_order(running.len(), round, si) {
                let target = &mut running[i];
                let id = target.id;
                done += 1;
                if session.skipped.iter().any(|(s, _)| *s == id) {
                    continue;
                }
                if let Some(why) = target.dead() {
                    eprintln!("{id} died: {why}");
                    session.skipped.push((id, why));
                    continue;
                }
                run_no += 1;
                load.set_tags(run_no, conns, opts.host_per_conn);
                let result = run_one(target, &load, conns, &opts);
                // A target that died during the run: the run does not count, and the target
                // runs nothing more.
                let died = target.dead();
                match result {
                    Ok(mut s) => {
                        if let Some(d) = &died {
                            let why = format!("target died: {}", d.replace('\n', " "));
                            s.invalid = Some(match s.invalid.take() {
                                Some(w) => format!("{w}; {why}"),
                                None => why,
                            });
                        }
                        eprintln!(
                            "[{done}/{total}] round {} c{conns:<3} {:<16} {:>9.0} msg/s  {:>5.2} CPU-µs/msg  RSS {:>6.1} MiB  follow p50/p99 {}/{}  lost {}{}{}",
                            round + 1,
                            id.to_string(),
                            s.msgs_per_s().unwrap_or(f64::NAN),
                            s.cpu_us_per_msg().unwrap_or(f64::NAN),
                            s.rss as f64 / 1048576.0,
                            crate::report::fmt_latency(percentile(&s.latencies_us, 50.0)),
                            crate::report::fmt_latency(percentile(&s.latencies_us, 99.0)),
                            s.lost(),
                            s.note.as_deref().map(|n| format!("  ({n})")).unwrap_or_default(),
                            s.invalid
                                .as_deref()
                                .map(|w| format!("  (invalid, not counted: {w})"))
                                .unwrap_or_default(),
                        );
                        session
                            .samples
                            .entry((conns, id))
                            .or_default()
                            .push(Sample { round, ..s });
                    }
                    Err(e) => {
                        let msg = format!("round {} c{conns} {id}: {e:#}", round + 1);
                        eprintln!("[{done}/{total}] {msg}");
                        session.failures.push(msg);
                    }
                }
                if let Some(why) = died {
                    eprintln!("{id} died: {why}");
                    session.skipped.push((id, why));
                }
                target.reset_output();
                // Let the target settle (and the kernel free socket buffers) before the next.
                std::thread::sleep(Duration::from_millis(500));
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

/// One blast of `load` over `conns` connections at `target`, waiting until it has processed
/// everything (or stalls).
///
/// Accounting: the senders connect and wait; the target's CPU counter is read, the clock
/// started and the senders' deadline set, and only then are the senders released, so the
/// figures cover every write and nothing before the first one. Every sender write is bounded
/// (the time left plus [`STALL`]), so a target that stops reading costs the run (a stall,
/// invalid), not the session.
fn run_one(target: &mut Target, load: &Load, conns: usize, opts: &Options) -> Result<Sample> {
    let conns = conns.max(1);
    let base_processed = target.processed().context("reading the processed count")?;
    let base = Instant::now();
    let follow_ready = AtomicBool::new(false);
    let stop_follow = AtomicBool::new(false);
    let stop_markers = AtomicBool::new(false);
    let markers_sent = AtomicU64::new(0);
    let deadline: OnceLock<Instant> = OnceLock::new();
    // `ready`: every sender has connected; `go`: the clock runs, write.
    let ready = Barrier::new(conns + 1);
    let go = Barrier::new(conns + 1);
    let addr = target.syslog;
    let api = target.api;
    let pid = target.pid();

    std::thread::scope(|s| -> Result<Sample> {
        let follower = api.map(|api| {
            let (ready, stop) = (&follow_ready, &stop_follow);
            s.spawn(move || load::follow(api, base, ready, stop))
        });
        if follower.is_some() {
            let wait = Instant::now();
            while !follow_ready.load(Ordering::Relaxed) && wait.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let per = load.count.div_ceil(conns);
        let senders: Vec<_> = (0..conns)
            .map(|c| {
                let (a, b) = ((c * per).min(load.count), ((c + 1) * per).min(load.count));
                let (barriers, deadline) = ((&ready, &go), &deadline);
                s.spawn(move || load::send(load, addr, (a, b), barriers, deadline, STALL))
            })
            .collect();
        ready.wait();
        let cpu0 = procfs::cpu_seconds(pid);
        let t0 = Instant::now();
        let _ = deadline.set(t0 + Duration::from_secs(opts.max_seconds.max(1)));
        go.wait();
        let markers = api.map(|_| {
            let (stop, sent) = (&stop_markers, &markers_sent);
            let interval = Duration::from_millis(opts.marker_ms.max(1));
            let limit = load::write_limit(deadline.get().copied(), STALL);
            s.spawn(move || load::send_markers(addr, interval, base, limit, stop, sent))
        });

        let mut sent = 0u64;
        let mut errors = Vec::new();
        let mut stalls = Vec::new();
        for h in senders {
            match h.join() {
                Ok(Ok(out)) => {
                    sent += out.frames as u64;
                    stalls.extend(out.stalled);
                }
                Ok(Err(e)) => errors.push(format!("{e:#}")),
                Err(_) => errors.push("sender thread panicked".into()),
            }
        }
        let send_s = t0.elapsed().as_secs_f64();
        stop_markers.store(true, Ordering::Relaxed);
        let mut note = None;
        match markers.map(|h| h.join()) {
            Some(Ok(Err(e))) => note = Some(format!("markers: {e:#}")),
            Some(Ok(Ok(Some(stalled)))) => stalls.push(stalled),
            Some(Err(_)) => note = Some("marker thread panicked".into()),
            _ => {}
        }
        let markers_sent = markers_sent.load(Ordering::Relaxed);
        let expected = sent + markers_sent;

        let mut processed = 0;
        let mut last_change = Instant::now();
        loop {
            let now = target
                .processed()
                .map(|p| p.saturating_sub(base_processed))
                .unwrap_or(processed);
            if now != processed {
                processed = now;
                last_change = Instant::now();
            }
            if processed >= expected {
                break;
            }
            if last_change.elapsed() > STALL || target.proc.exited().is_some() {
                note = Some(format!(
                    "stopped waiting: {processed} of {expected} processed, no progress for {} s",
                    STALL.as_secs()
                ));
                break;
            }
            std::thread::sleep(POLL);
        }
        let elapsed_s = t0.elapsed().as_secs_f64();
        let cpu_s = procfs::cpu_seconds(pid) - cpu0;
        let rss = procfs::rss_bytes(pid);
        let buffered = api.and_then(|a| targets::metrics(a).ok()).map(|m| m.memory);

        // Markers were all ingested; give the follower a moment to receive the last ones.
        std::thread::sleep(Duration::from_millis(200));
        stop_follow.store(true, Ordering::Relaxed);
        let mut latencies_us = Vec::new();
        if let Some(f) = follower.and_then(|h| h.join().ok()) {
            latencies_us = f.latencies_us;
            if let Some(e) = f.error {
                note = Some(format!("follower: {e}"));
            } else if (latencies_us.len() as u64) < markers_sent {
                note = Some(format!(
                    "follower got {} of {markers_sent} markers",
                    latencies_us.len()
                ));
            }
        }
        if !errors.is_empty() {
            bail!("senders failed: {}", errors.join("; "));
        }
        let lost = expected.saturating_sub(processed);
        Ok(Sample {
            round: 0,
            sent,
            markers_sent,
            processed,
            send_s,
            elapsed_s,
            cpu_s,
            rss,
            buffered,
            latencies_us,
            note,
            invalid: invalid_reason(&stalls, lost, None),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_reasons() {
        assert_eq!(invalid_reason(&[], 0, None), None);
        assert_eq!(invalid_reason(&[], 3, None).as_deref(), Some("3 lost"));
        let stall = "a sender's write blocked".to_string();
        assert_eq!(
            invalid_reason(
                &[stall.clone(), stall.clone()],
                0,
                Some("rsyslogd exited\nx")
            )
            .as_deref(),
            Some("a sender's write blocked; target died: rsyslogd exited x")
        );
    }
}
