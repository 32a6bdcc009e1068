//! Runs nghttp2's `h2load` (HTTP/2 over TLS, ALPN h2) and parses its report; latency
//! percentiles come from its per-request `--log-file`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::procs::Proc;
use crate::wrk::Report;

#[derive(Clone, Debug)]
pub struct Load {
    pub url: String,
    pub threads: usize,
    pub connections: usize,
    /// Concurrent streams per connection (`-m`).
    pub streams: usize,
    pub duration_s: u64,
}

/// Runs h2load (bounded to the duration plus 30 s) and parses its output.
pub fn run(load: &Load, log: &Path) -> Result<Report> {
    let req_log = log.with_extension("requests");
    let mut cmd = Command::new("h2load");
    cmd.arg(format!("-t{}", load.threads))
        .arg(format!("-c{}", load.connections))
        .arg(format!("-m{}", load.streams))
        .arg(format!("-D{}", load.duration_s))
        .arg("-T5")
        .arg("--log-file")
        .arg(&req_log)
        .arg(&load.url);
    let mut proc = Proc::spawn("h2load", cmd, log)?;
    let status = proc.wait_timeout(Duration::from_secs(load.duration_s + 30))?;
    let out = std::fs::read_to_string(log).context("reading h2load output")?;
    if !status.success() {
        bail!("h2load exited with {status}: {}", proc.log_tail(5));
    }
    let mut r = parse(&out).with_context(|| format!("parsing h2load output:\n{out}"))?;
    if let Ok(text) = std::fs::read_to_string(&req_log) {
        let (p50, p99) = percentiles(&text);
        r.p50_us = p50;
        r.p99_us = p99;
    }
    let _ = std::fs::remove_file(&req_log);
    Ok(r)
}

/// p50 and p99 of the third column (µs) of h2load's `--log-file`
/// (`start-µs <TAB> status <TAB> duration-µs`).
fn percentiles(log: &str) -> (f64, f64) {
    let mut v: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.sort_unstable();
    let pct = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1] as f64;
    (pct(0.5), pct(0.99))
}

fn count_before(text: &str, word: &str) -> Option<u64> {
    let words: Vec<&str> = text
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .find(|w| w[1] == word)
        .and_then(|w| w[0].parse().ok())
}

pub fn parse(out: &str) -> Result<Report> {
    let mut r = Report::default();
    let mut have = false;
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // "finished in 3.00s, 45678.33 req/s, 1.23MB/s"
            let mut parts = rest.split(',').map(str::trim);
            r.seconds = parts
                .next()
                .and_then(|s| s.trim_end_matches('s').parse().ok())
                .unwrap_or(0.0);
            r.rps = parts
                .next()
                .and_then(|s| s.strip_suffix(" req/s")?.parse().ok())
                .context("req/s")?;
            have = true;
        } else if let Some(rest) = line.strip_prefix("requests:") {
            r.requests = count_before(rest, "succeeded").context("succeeded count")?;
            r.socket_errors = ["failed", "errored", "timeout"]
                .iter()
                .filter_map(|w| count_before(rest, w))
                .sum();
        } else if let Some(rest) = line.strip_prefix("status codes:") {
            r.non_2xx = ["4xx", "5xx"]
                .iter()
                .filter_map(|w| count_before(rest, w))
                .sum();
        }
    }
    if !have {
        bail!("no `finished in` line");
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "starting benchmark...
spawning thread #0: 32 total client(s). Timing-based test with 0s of warm-up time and 3s of main duration for measurements.
Warm-up phase is over for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.

finished in 3.00s, 45678.33 req/s, 1.23MB/s
requests: 137035 total, 137099 started, 137035 done, 137030 succeeded, 5 failed, 1 errored, 2 timeout
status codes: 137030 2xx, 0 3xx, 3 4xx, 2 5xx
traffic: 3.70MB (3876543) total, 1.02MB (1068000) headers (space savings 90.12%), 1.74MB (1822000) data
";

    #[test]
    fn parses_report() {
        let r = parse(SAMPLE).unwrap();
        assert_eq!(r.seconds, 3.0);
        assert_eq!(r.rps, 45678.33);
        assert_eq!(r.requests, 137030);
        assert_eq!(r.socket_errors, 8);
        assert_eq!(r.non_2xx, 5);
    }

    #[test]
    fn log_percentiles() {
        let log: String = (1..=100)
            .map(|i| format!("1700000000{i}\t200\t{i}\n"))
            .collect();
        assert_eq!(percentiles(&log), (50.0, 99.0));
        assert!(percentiles("").0.is_nan());
    }
}
