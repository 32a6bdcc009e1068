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
    /// Why the run is kept out of the medians (errors, the target died), if it is.
    pub invalid: Option<String>,
}

impl Sample {
    pub fn req_per_cpu_s(&self) -> Option<f64> {
        (self.cpu_s > 0.0).then(|| self.wrk.requests as f64 / self.cpu_s)
    }

    /// Why a run with this load report and this target state cannot count: any error
    /// (non-2xx response or socket error), or the target dead after the run.
    pub fn invalid_reason(wrk: &wrk::Report, died: Option<&str>) -> Option<String> {
        let mut why = Vec::new();
        if wrk.errors() > 0 {
            why.push(format!(
                "{} errors ({} non-2xx, {} socket)",
                wrk.errors(),
                wrk.non_2xx,
                wrk.socket_errors
            ));
        }
        join_reasons(why, died)
    }
}

/// A run's `invalid` reason, as every harness writes it: the harness's own reasons (errors,
/// lost messages, stalls) and then the target's death (`target died: …`, on one line),
/// joined with `; `; `None` (the run counts) when there is none.
pub fn join_reasons(mut why: Vec<String>, died: Option<&str>) -> Option<String> {
    if let Some(d) = died {
        why.push(format!("target died: {}", d.replace('\n', " ")));
    }
    (!why.is_empty()).then(|| why.join("; "))
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

/// The median of the finite values of `xs` (the mean of the two middle values for an even
/// count); `None` when there are none. Equal to [`percentile`]`(xs, 50.0)`.
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

/// The `p`-th percentile (`p` in 0..=100) of the finite values of `xs`, by linear
/// interpolation between the two closest ranks: with the values sorted, `x[h]` for the
/// fractional index `h = (n − 1) · p / 100` (NumPy's and R's default). The one percentile
/// definition of the `proxy` (h2load, handshake client), `logagg`, `discoverd`, `overlay`
/// and `host` harnesses; its 50th percentile is [`median`]. `None` when there is no finite value.
pub fn percentile(xs: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let h = (v.len() - 1) as f64 * (p / 100.0).clamp(0.0, 1.0);
    let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
    Some(v[lo] + (v[hi] - v[lo]) * (h - lo as f64))
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
    /// Runs kept out of the medians (errors, the target died).
    invalid: usize,
}

/// Medians over the valid runs only; `errors` and `runs` count every run.
fn cell(samples: &[Sample]) -> Cell {
    let valid: Vec<&Sample> = samples.iter().filter(|s| s.invalid.is_none()).collect();
    Cell {
        rps: median(valid.iter().map(|s| s.wrk.rps).collect()),
        p50: median(valid.iter().map(|s| s.wrk.p50_us).collect()),
        p99: median(valid.iter().map(|s| s.wrk.p99_us).collect()),
        per_cpu: median(valid.iter().filter_map(|s| s.req_per_cpu_s()).collect()),
        rss: median(valid.iter().map(|s| s.rss as f64).collect()),
        errors: samples.iter().map(|s| s.wrk.errors()).sum(),
        runs: samples.len(),
        invalid: samples.len() - valid.len(),
    }
}

/// The `counted` column of an "Every run" table: `yes`, or `no: <why>`.
pub fn counted(invalid: Option<&str>) -> String {
    match invalid {
        None => "yes".into(),
        Some(why) => format!("no: {}", why.replace('|', "/").replace('\n', " ")),
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
        "Medians across the valid rounds. `req/CPU-s` = requests ÷ CPU seconds (user+system) of the \
         target's processes during the run (for `direct`: the origin's); only 2xx responses \
         count as requests. RSS after the run. `errors` = non-2xx responses + socket errors, \
         summed over rounds. A run with any error, or after which the target was dead, is \
         `invalid`: it is counted in `runs` and `invalid` and listed under every run, but kept \
         out of the medians. Ratios are against nginx with the same worker count.\n"
    );

    for (name, description) in &s.scenarios {
        let _ = writeln!(out, "## {name}\n\n{description}\n");
        let unit = s.units.get(name).map_or("req", String::as_str);
        let _ = writeln!(
            out,
            "| target | workers | {unit}/s | p50 | p99 | {unit}/CPU-s | RSS MiB | errors | runs | invalid | {unit}/s ÷ nginx | {unit}/CPU-s ÷ nginx |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let mut kinds = Vec::new();
        for id in &s.ids {
            if let Some(note) = s.notes.get(&(name.clone(), *id)) {
                let _ = writeln!(
                    out,
                    "| {} | {} | {note} | | | | | | | | | |",
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
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                id.kind,
                workers(id),
                fmt_count(c.rps),
                fmt_latency(c.p50),
                fmt_latency(c.p99),
                fmt_count(c.per_cpu),
                fmt_mib(c.rss),
                c.errors,
                c.runs,
                c.invalid,
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
        "| round | scenario | target | workers | req/s | p50 | p99 | requests | CPU s | req/CPU-s | RSS MiB | errors | counted |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
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
            "| {} | {name} | {} | {} | {:.0} | {} | {} | {} | {:.2} | {} | {} | {} | {} |",
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
            counted(x.invalid.as_deref()),
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
    fn percentiles_interpolate_linearly() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[f64::NAN], 50.0), None);
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        // Even count: the 50th percentile is the median (mean of the two middles), not the
        // upper middle.
        assert_eq!(percentile(&[4.0, 1.0, 2.0, 3.0], 50.0), Some(2.5));
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 0.0), Some(1.0));
        assert_eq!(percentile(&xs, 100.0), Some(100.0));
        assert_eq!(percentile(&xs, 50.0), Some(50.5));
        assert!((percentile(&xs, 99.0).unwrap() - 99.01).abs() < 1e-9);
        assert!((percentile(&xs, 90.0).unwrap() - 90.1).abs() < 1e-9);
        // Its 50th percentile is the median, whatever the count.
        for n in 1..12 {
            let v: Vec<f64> = (0..n).map(|i| f64::from(i * i)).collect();
            assert_eq!(percentile(&v, 50.0), median(v.clone()), "n = {n}");
        }
    }

    fn sample(round: usize, rps: f64, non_2xx: u64, invalid: Option<&str>) -> Sample {
        Sample {
            round,
            wrk: wrk::Report {
                requests: (rps * 2.0) as u64,
                seconds: 2.0,
                rps,
                p50_us: 100.0,
                p99_us: 200.0,
                non_2xx,
                socket_errors: 0,
            },
            cpu_s: 1.0,
            rss: 1 << 20,
            handshakes: None,
            invalid: invalid.map(str::to_string),
        }
    }

    #[test]
    fn invalid_runs_stay_out_of_the_medians() {
        let samples = vec![
            sample(0, 1000.0, 0, None),
            sample(1, 1100.0, 0, None),
            // A proxy answering 502 fast: high req/s, errors, invalid.
            sample(2, 90_000.0, 5000, Some("5000 errors")),
        ];
        let c = cell(&samples);
        assert_eq!(c.rps, Some(1050.0));
        assert_eq!(c.per_cpu, Some(2100.0));
        assert_eq!(c.runs, 3);
        assert_eq!(c.invalid, 1);
        assert_eq!(c.errors, 5000);
        let none_valid = cell(&samples[2..]);
        assert_eq!(none_valid.rps, None);
        assert_eq!(none_valid.invalid, 1);
    }

    #[test]
    fn invalid_reasons() {
        let ok = sample(0, 1.0, 0, None).wrk;
        assert_eq!(Sample::invalid_reason(&ok, None), None);
        let bad = sample(0, 1.0, 3, None).wrk;
        assert_eq!(
            Sample::invalid_reason(&bad, None).as_deref(),
            Some("3 errors (3 non-2xx, 0 socket)")
        );
        assert_eq!(
            Sample::invalid_reason(&ok, Some("nginx exited (signal 9)\nlog")).as_deref(),
            Some("target died: nginx exited (signal 9) log")
        );
        assert_eq!(counted(None), "yes");
        assert_eq!(counted(Some("a|b")), "no: a/b");
    }

    #[test]
    fn latency_format() {
        assert_eq!(fmt_latency(Some(812.0)), "812 µs");
        assert_eq!(fmt_latency(Some(1500.0)), "1.50 ms");
        assert_eq!(fmt_latency(None), "-");
    }
}
