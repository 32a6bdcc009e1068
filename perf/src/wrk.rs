//! Runs Debian's `wrk` and parses its `--latency` report.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::procs::Proc;

/// What one `wrk` run is asked to do.
#[derive(Clone, Debug)]
pub struct Load {
    pub url: String,
    pub host: String,
    pub threads: usize,
    pub connections: usize,
    pub duration_s: u64,
    /// Send `Connection: close` so every request opens a new connection.
    pub close: bool,
}

/// The figures the harness keeps from one `wrk` report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// Successful requests only: responses wrk counts as neither an error status (its
    /// "Non-2xx or 3xx responses") nor a socket error.
    pub requests: u64,
    pub seconds: f64,
    /// `requests` per second.
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub non_2xx: u64,
    pub socket_errors: u64,
}

impl Report {
    pub fn errors(&self) -> u64 {
        self.non_2xx + self.socket_errors
    }
}

/// Runs wrk (bounded to the duration plus 30 s) and parses its output.
pub fn run(load: &Load, log: &Path) -> Result<Report> {
    let mut cmd = Command::new("wrk");
    cmd.arg(format!("-t{}", load.threads))
        .arg(format!("-c{}", load.connections))
        .arg(format!("-d{}s", load.duration_s))
        .arg("--latency")
        .arg("--timeout")
        .arg("5s")
        .arg("-H")
        .arg(format!("Host: {}", load.host));
    if load.close {
        cmd.arg("-H").arg("Connection: close");
    }
    cmd.arg(&load.url);
    let mut proc = Proc::spawn("wrk", cmd, log)?;
    let status = proc.wait_timeout(Duration::from_secs(load.duration_s + 30))?;
    let out = std::fs::read_to_string(log).context("reading wrk output")?;
    if !status.success() {
        bail!("wrk exited with {status}: {}", proc.log_tail(5));
    }
    parse(&out).with_context(|| format!("parsing wrk output:\n{out}"))
}

/// Parses a wrk time (a latency such as `812.00us`, `1.25ms` or `2.01s`; a run time such as
/// `2.00s` or `1.00m`) into microseconds: wrk's units.c prints us/ms/s, and m/h past 0.85 of
/// the next unit.
fn parse_latency(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(v * scale)
}

/// Parses wrk's `--latency` report. Every figure the harness uses is required (a truncated
/// report is an error, never a 0). `requests` and `rps` count successful responses only: wrk's
/// own count and rate include the responses with an error status, which would let a target
/// answering errors fast look fast.
pub fn parse(out: &str) -> Result<Report> {
    let mut r = Report::default();
    let (mut rps, mut total) = (None, None);
    let (mut p50, mut p99) = (None, None);
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = Some(v.trim().parse::<f64>().context("Requests/sec")?);
        } else if words.len() >= 4 && words[1] == "requests" && words[2] == "in" {
            total = Some(words[0].parse::<u64>().context("request count")?);
            // wrk formats the run time with units: `812.00ms`, `2.00s`, and from 51 s on
            // (0.85 × 60 s) `1.00m`.
            r.seconds = parse_latency(words[3].trim_end_matches(','))
                .with_context(|| format!("run time {:?}", words[3]))?
                / 1e6;
        } else if words.len() == 2 && words[0] == "50%" {
            p50 = Some(parse_latency(words[1]).context("50% latency")?);
        } else if words.len() == 2 && words[0] == "99%" {
            p99 = Some(parse_latency(words[1]).context("99% latency")?);
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse().context("non-2xx count")?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            r.socket_errors = v
                .split(',')
                .map(|part| {
                    part.split_whitespace()
                        .nth(1)
                        .and_then(|n| n.parse::<u64>().ok())
                        .with_context(|| format!("socket error count in {part:?}"))
                })
                .sum::<Result<u64>>()?;
        }
    }
    let rps = rps.context("no Requests/sec line")?;
    let total = total.context("no `N requests in T` line")?;
    r.p50_us = p50.context("no 50% latency line (was wrk run with --latency?)")?;
    r.p99_us = p99.context("no 99% latency line (was wrk run with --latency?)")?;
    r.requests = total.saturating_sub(r.non_2xx);
    // wrk's rate is over its own precise run time; scale it to the successful share.
    r.rps = if total > 0 {
        rps * r.requests as f64 / total as f64
    } else {
        0.0
    };
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Running 2s test @ http://127.0.0.1:8080/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.02ms  412.00us   9.87ms   80.00%
    Req/Sec    31.50k     1.20k   33.00k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.20ms
     90%    1.50ms
     99%    2.50s
  125432 requests in 2.00s, 10.40MB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  62716.00
Transfer/sec:      5.20MB
";

    #[test]
    fn parses_full_report() {
        let r = parse(SAMPLE).unwrap();
        // 125432 responses, 7 of them errors.
        assert_eq!(r.requests, 125425);
        assert_eq!(r.seconds, 2.0);
        assert!(
            (r.rps - 62716.0 * 125425.0 / 125432.0).abs() < 1e-6,
            "{}",
            r.rps
        );
        assert_eq!(r.p50_us, 812.0);
        assert_eq!(r.p99_us, 2.5e6);
        assert_eq!(r.non_2xx, 7);
        assert_eq!(r.socket_errors, 6);
        assert_eq!(r.errors(), 13);
    }

    #[test]
    fn run_time_units() {
        let with = |t: &str| SAMPLE.replace("requests in 2.00s,", &format!("requests in {t},"));
        // wrk prints minutes from 51 s on, hours likewise, and milliseconds below 1 s.
        for (t, s) in [
            ("1.00m", 60.0),
            ("1.50m", 90.0),
            ("2.00h", 7200.0),
            ("900.00ms", 0.9),
            ("2.00s", 2.0),
        ] {
            let r = parse(&with(t)).unwrap_or_else(|e| panic!("{t}: {e:#}"));
            assert!((r.seconds - s).abs() < 1e-9, "{t}: {}", r.seconds);
        }
        assert!(parse(&with("2.00x")).is_err());
        assert!(parse(&with("m")).is_err());
    }

    #[test]
    fn latency_units() {
        for (s, us) in [
            ("5.00us", 5.0),
            ("1.5ms", 1500.0),
            ("2s", 2e6),
            ("1.00m", 60e6),
        ] {
            assert_eq!(parse_latency(s), Some(us), "{s}");
        }
        assert_eq!(parse_latency("12"), None);
    }

    /// Real wrk 4 output against a location answering 502: every response is an error.
    const ALL_502: &str = "Running 1s test @ http://127.0.0.1:18556/bad
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    41.96us   90.50us   2.58ms   98.96%
    Req/Sec    94.83k    19.85k  123.68k    72.73%
  Latency Distribution
     50%   33.00us
     75%   41.00us
     90%   56.00us
     99%  138.00us
  103329 requests in 1.10s, 15.77MB read
  Non-2xx or 3xx responses: 103329
Requests/sec:  93959.46
Transfer/sec:     14.34MB
";

    #[test]
    fn error_responses_are_not_requests() {
        let r = parse(ALL_502).unwrap();
        assert_eq!(r.requests, 0);
        assert_eq!(r.rps, 0.0);
        assert_eq!(r.non_2xx, 103329);
        assert_eq!(r.errors(), 103329);
    }

    #[test]
    fn truncated_reports_are_errors() {
        for missing in ["requests in", "50%", "99%", "Requests/sec:"] {
            let cut: String = SAMPLE
                .lines()
                .filter(|l| !l.contains(missing))
                .map(|l| format!("{l}\n"))
                .collect();
            assert!(
                parse(&cut).is_err(),
                "without {missing:?}: {:?}",
                parse(&cut)
            );
        }
        // Cut off after the latency distribution.
        let head: String = SAMPLE.lines().take(10).map(|l| format!("{l}\n")).collect();
        assert!(parse(&head).is_err());
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse("unable to connect to 127.0.0.1:1 Connection refused").is_err());
    }
}
