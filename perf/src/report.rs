//! Markdown rendering of a harness session: medians per scenario, ratios against nginx.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::idle;
use crate::targets::{Id, Kind};
use crate::wrk;

/// One wrk run against one target, with the target's resource use during it.
#[derive(Clone, Debug)]
pub struct Sample {
    pub round: usize,
    pub wrk: wrk::Report,
    /// CPU seconds the target's process tree used during the run.
    pub cpu_s: f64,
    /// Resident memory of the target's process tree right after the run, bytes.
    pub rss: u64,
    /// (full, resumed) TLS handshakes, when the load generator can tell them apart.
    pub handshakes: Option<(u64, u64)>,
}

impl Sample {
    pub fn req_per_cpu_s(&self) -> Option<f64> {
        (self.cpu_s > 0.0).then(|| self.wrk.requests as f64 / self.cpu_s)
    }
}

/// Everything a session measured.
#[derive(Default)]
pub struct Session {
    /// Header lines (date, command, host), already formatted.
    pub header: Vec<String>,
    /// Row order.
    pub ids: Vec<Id>,
    /// Targets that were skipped or died, with why.
    pub skipped: BTreeMap<Id, String>,
    /// (scenario name, description) in run order.
    pub scenarios: Vec<(String, String)>,
    pub samples: BTreeMap<(String, Id), Vec<Sample>>,
    /// Runs that failed (wrk error and the like).
    pub failures: Vec<String>,
    pub idle: Vec<(Id, idle::Outcome)>,
    pub idle_description: Option<String>,
    /// Scenario name → what one "request" is when it is not a request (e.g. `handshakes`).
    pub units: BTreeMap<String, String>,
    /// (scenario, target) → why the target did not run the scenario (e.g. no HTTP/2).
    pub notes: BTreeMap<(String, Id), String>,
}

pub fn median(mut xs: Vec<f64>) -> Option<f64> {
    xs.retain(|x| x.is_finite());
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    Some(if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    })
}

pub(crate) fn fmt_latency(us: Option<f64>) -> String {
    match us {
        None => "-".into(),
        Some(us) if us < 1000.0 => format!("{us:.0} µs"),
        Some(us) if us < 1e6 => format!("{:.2} ms", us / 1e3),
        Some(us) => format!("{:.2} s", us / 1e6),
    }
}

pub(crate) fn fmt_count(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{x:.0}"))
}

pub(crate) fn fmt_mib(bytes: Option<f64>) -> String {
    bytes.map_or("-".into(), |b| format!("{:.1}", b / (1024.0 * 1024.0)))
}

pub(crate) fn fmt_ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

fn workers(id: &Id) -> String {
    id.workers.map_or("-".into(), |n| n.to_string())
}

/// Medians of one (scenario, target) cell.
struct Cell {
    rps: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    per_cpu: Option<f64>,
    rss: Option<f64>,
    errors: u64,
    runs: usize,
}

fn cell(samples: &[Sample]) -> Cell {
    Cell {
        rps: median(samples.iter().map(|s| s.wrk.rps).collect()),
        p50: median(samples.iter().map(|s| s.wrk.p50_us).collect()),
        p99: median(samples.iter().map(|s| s.wrk.p99_us).collect()),
        per_cpu: median(samples.iter().filter_map(Sample::req_per_cpu_s).collect()),
        rss: median(samples.iter().map(|s| s.rss as f64).collect()),
        errors: samples.iter().map(|s| s.wrk.errors()).sum(),
        runs: samples.len(),
    }
}

/// The "Failed runs" list of a report (nothing when every run succeeded).
pub fn failures_section(out: &mut String, failures: &[String]) {
    if failures.is_empty() {
        return;
    }
    let _ = writeln!(out, "## Failed runs\n");
    for f in failures {
        let _ = writeln!(out, "- {}", f.replace('\n', " "));
    }
    let _ = writeln!(out);
}

/// Opens the collapsed "Every run" table: the header row and its alignment row.
pub fn every_run_head(out: &mut String, header: &str, align: &str) {
    let _ = writeln!(out, "<details><summary>Every run</summary>\n");
    let _ = writeln!(out, "{header}");
    let _ = writeln!(out, "{align}");
}

pub fn render(s: &Session) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# flynn-perf proxy\n");
    for line in &s.header {
        let _ = writeln!(out, "- {line}");
    }
    for (id, why) in &s.skipped {
        let _ = writeln!(out, "- **skipped {id}**: {}", why.replace('\n', " "));
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Medians across rounds. `req/CPU-s` = requests ÷ CPU seconds (user+system) of the \
         target's processes during the run (for `direct`: the origin's). RSS after the run. \
         `errors` = non-2xx responses + socket errors, summed over rounds. Ratios are against \
         nginx with the same worker count.\n"
    );

    for (name, description) in &s.scenarios {
        let _ = writeln!(out, "## {name}\n\n{description}\n");
        let unit = s.units.get(name).map_or("req", String::as_str);
        let _ = writeln!(
            out,
            "| target | workers | {unit}/s | p50 | p99 | {unit}/CPU-s | RSS MiB | errors | runs | {unit}/s ÷ nginx | {unit}/CPU-s ÷ nginx |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let mut kinds = Vec::new();
        for id in &s.ids {
            if let Some(note) = s.notes.get(&(name.clone(), *id)) {
                let _ = writeln!(
                    out,
                    "| {} | {} | {note} | | | | | | | | |",
                    id.kind,
                    workers(id)
                );
                continue;
            }
            let Some(samples) = s.samples.get(&(name.clone(), *id)) else {
                continue;
            };
            let counted: Vec<(u64, u64)> = samples.iter().filter_map(|x| x.handshakes).collect();
            if !counted.is_empty() {
                let full: u64 = counted.iter().map(|k| k.0).sum();
                let resumed: u64 = counted.iter().map(|k| k.1).sum();
                kinds.push(format!("{id}: {full} full, {resumed} resumed"));
            }
            let c = cell(samples);
            let nginx = s
                .samples
                .get(&(
                    name.clone(),
                    Id {
                        kind: Kind::Nginx,
                        workers: id.workers,
                    },
                ))
                .filter(|_| id.workers.is_some())
                .map(|v| cell(v));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                id.kind,
                workers(id),
                fmt_count(c.rps),
                fmt_latency(c.p50),
                fmt_latency(c.p99),
                fmt_count(c.per_cpu),
                fmt_mib(c.rss),
                c.errors,
                c.runs,
                fmt_ratio(c.rps, nginx.as_ref().and_then(|n| n.rps)),
                fmt_ratio(c.per_cpu, nginx.as_ref().and_then(|n| n.per_cpu)),
            );
        }
        let _ = writeln!(out);
        if !kinds.is_empty() {
            let _ = writeln!(
                out,
                "Handshakes counted by the client, summed over rounds: {}.\n",
                kinds.join("; ")
            );
        }
    }

    if let Some(description) = &s.idle_description {
        let _ = writeln!(out, "## idle-10k\n\n{description}\n");
        let _ = writeln!(
            out,
            "| target | workers | connections | RSS before MiB | RSS after MiB | Δ per 10k conns MiB | KiB/conn | ÷ nginx | seconds | note |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        let nginx_delta = s
            .idle
            .iter()
            .find(|(id, _)| id.kind == Kind::Nginx)
            .and_then(|(_, o)| o.delta_per_10k());
        for (id, o) in &s.idle {
            let delta = o.delta_per_10k();
            let _ = writeln!(
                out,
                "| {} | {} | {}/{} | {} | {} | {} | {} | {} | {:.1} | {} |",
                id.kind,
                workers(id),
                o.opened,
                o.wanted,
                fmt_mib(Some(o.rss_before as f64)),
                fmt_mib(Some(o.rss_after as f64)),
                fmt_mib(delta),
                delta.map_or("-".into(), |d| format!("{:.1}", d / 10_000.0 / 1024.0)),
                fmt_ratio(delta, nginx_delta),
                o.seconds,
                o.error.as_deref().unwrap_or(""),
            );
        }
        let _ = writeln!(out);
    }

    failures_section(&mut out, &s.failures);

    every_run_head(
        &mut out,
        "| round | scenario | target | workers | req/s | p50 | p99 | requests | CPU s | req/CPU-s | RSS MiB | errors |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    );
    let mut all: Vec<(&(String, Id), &Sample)> = s
        .samples
        .iter()
        .flat_map(|(k, v)| v.iter().map(move |x| (k, x)))
        .collect();
    let order = |name: &str| s.scenarios.iter().position(|(n, _)| n == name);
    all.sort_by_key(|((name, id), x)| (x.round, order(name), s.ids.iter().position(|i| i == id)));
    for ((name, id), x) in all {
        let _ = writeln!(
            out,
            "| {} | {name} | {} | {} | {:.0} | {} | {} | {} | {:.2} | {} | {} | {} |",
            x.round + 1,
            id.kind,
            workers(id),
            x.wrk.rps,
            fmt_latency(Some(x.wrk.p50_us)),
            fmt_latency(Some(x.wrk.p99_us)),
            x.wrk.requests,
            x.cpu_s,
            fmt_count(x.req_per_cpu_s()),
            fmt_mib(Some(x.rss as f64)),
            x.wrk.errors(),
        );
    }
    let _ = writeln!(out, "\n</details>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![f64::INFINITY, 1.0]), Some(1.0));
    }

    #[test]
    fn latency_format() {
        assert_eq!(fmt_latency(Some(812.0)), "812 µs");
        assert_eq!(fmt_latency(Some(1500.0)), "1.50 ms");
        assert_eq!(fmt_latency(None), "-");
    }
}
