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
    pub requests: u64,
    pub seconds: f64,
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

/// Parses a wrk latency value such as `812.00us`, `1.25ms` or `2.01s` into microseconds.
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

pub fn parse(out: &str) -> Result<Report> {
    let mut r = Report::default();
    let mut have_rps = false;
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().context("Requests/sec")?;
            have_rps = true;
        } else if words.len() >= 4 && words[1] == "requests" && words[2] == "in" {
            r.requests = words[0].parse().context("request count")?;
            r.seconds = words[3]
                .trim_end_matches(',')
                .trim_end_matches('s')
                .parse()
                .unwrap_or(0.0);
        } else if words.len() == 2 && words[0] == "50%" {
            r.p50_us = parse_latency(words[1]).context("50% latency")?;
        } else if words.len() == 2 && words[0] == "99%" {
            r.p99_us = parse_latency(words[1]).context("99% latency")?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse().context("non-2xx count")?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            r.socket_errors = v
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        }
    }
    if !have_rps {
        bail!("no Requests/sec line");
    }
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
        assert_eq!(r.requests, 125432);
        assert_eq!(r.seconds, 2.0);
        assert_eq!(r.rps, 62716.0);
        assert_eq!(r.p50_us, 812.0);
        assert_eq!(r.p99_us, 2.5e6);
        assert_eq!(r.non_2xx, 7);
        assert_eq!(r.socket_errors, 6);
        assert_eq!(r.errors(), 13);
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

    #[test]
    fn rejects_garbage() {
        assert!(parse("unable to connect to 127.0.0.1:1 Connection refused").is_err());
    }
}
