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
    let text = std::fs::read_to_string(&req_log)
        .with_context(|| format!("reading h2load's request log {}", req_log.display()));
    let _ = std::fs::remove_file(&req_log);
    let (p50, p99) = percentiles(&text?).context("h2load's request log")?;
    r.p50_us = p50;
    r.p99_us = p99;
    Ok(r)
}

/// p50 and p99 ([`crate::report::percentile`]) of the third column (µs) of h2load's
/// `--log-file` (`start-µs <TAB> status <TAB> duration-µs`); an error when it has no entry.
fn percentiles(log: &str) -> Result<(f64, f64)> {
    let v: Vec<f64> = log
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse::<u64>().ok())
        .map(|us| us as f64)
        .collect();
    let pct = |p| crate::report::percentile(&v, p).context("no request in the log");
    Ok((pct(50.0)?, pct(99.0)?))
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

/// Parses h2load's summary. h2load's counts overlap: `failed` includes `errored` and the
/// responses with a non-2xx status, `errored` (no response: connection error, stream reset)
/// includes `timeout`, and its req/s counts every response, whatever the status. So socket
/// errors = `errored`, non-2xx = `failed` − `errored`, and requests (and req/s) are the
/// `succeeded` ones only.
pub fn parse(out: &str) -> Result<Report> {
    let mut r = Report::default();
    let mut rps = None;
    let mut counts = None;
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // "finished in 3.00s, 45678.33 req/s, 1.23MB/s"
            let mut parts = rest.split(',').map(str::trim);
            r.seconds = parts
                .next()
                .and_then(|s| s.strip_suffix('s')?.parse().ok())
                .context("run seconds")?;
            rps = Some(
                parts
                    .next()
                    .and_then(|s| s.strip_suffix(" req/s")?.parse::<f64>().ok())
                    .context("req/s")?,
            );
        } else if let Some(rest) = line.strip_prefix("requests:") {
            // "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
            let count = |w: &str| count_before(rest, w).with_context(|| format!("{w} count"));
            counts = Some((
                count("done")?,
                count("succeeded")?,
                count("failed")?,
                count("errored")?,
            ));
        }
    }
    let rps = rps.context("no `finished in` line")?;
    let (done, succeeded, failed, errored) = counts.context("no `requests:` line")?;
    anyhow::ensure!(
        errored <= failed,
        "inconsistent request counts: {failed} failed but {errored} errored"
    );
    r.requests = succeeded;
    r.socket_errors = errored;
    r.non_2xx = failed - errored;
    // h2load's rate is every response (done − errored) per second of its precise run time;
    // scale it to the successful share.
    let responses = done.saturating_sub(errored);
    r.rps = if responses > 0 {
        rps * succeeded as f64 / responses as f64
    } else {
        0.0
    };
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real h2load (nghttp2 1.52.0) output, `-t1 -c2 -m2 -D2 -T1` against nginx locations
    /// answering 200, 502, 404 and closing the connection (`return 444`), round robin.
    const SAMPLE: &str = "starting benchmark...
spawning thread #0: 2 total client(s). Timing-based test with 0s of warm-up time and 2s of main duration for measurements.
Warm-up started for thread #0.
progress: 50% of clients started
progress: 100% of clients started
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Application protocol: h2c
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 2.00s, 50052.00 req/s, 3.58MB/s
requests: 125129 total, 125133 started, 125129 done, 50052 succeeded, 75077 failed, 25025 errored, 0 timeout
status codes: 50052 2xx, 0 3xx, 25026 4xx, 25026 5xx
traffic: 7.16MB (7507885) total, 4.68MB (4905096) headers (space savings 50.00%), 464.35KB (475494) data
                     min         max         mean         sd        +/- sd
time for request:       15us      3.14ms        50us        32us    96.10%
time for connect:       56us        79us        68us        16us   100.00%
time to 1st byte:      348us       369us       358us        14us   100.00%
req/s           :   25024.40    25024.87    25024.63        0.34   100.00%
";

    #[test]
    fn parses_report() {
        let r = parse(SAMPLE).unwrap();
        assert_eq!(r.seconds, 2.0);
        assert_eq!(r.requests, 50052);
        // The 25025 connections closed without a response.
        assert_eq!(r.socket_errors, 25025);
        // 25026 4xx + 25026 5xx, each counted once.
        assert_eq!(r.non_2xx, 50052);
        assert_eq!(r.errors(), 75077);
        // h2load's 50052 req/s is (done − errored) / 2 s; the successful share is 2/5 of it.
        assert!(
            (r.rps - 50052.0 * 50052.0 / 100104.0).abs() < 1e-6,
            "{}",
            r.rps
        );
    }

    #[test]
    fn truncated_reports_are_errors() {
        for missing in ["finished in", "requests:"] {
            let cut: String = SAMPLE
                .lines()
                .filter(|l| !l.starts_with(missing))
                .map(|l| format!("{l}\n"))
                .collect();
            assert!(parse(&cut).is_err(), "without {missing:?}");
        }
        let cut = SAMPLE.replace(", 25025 errored, 0 timeout", "");
        assert!(parse(&cut).is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn log_percentiles() {
        let log: String = (1..=100)
            .map(|i| format!("1700000000{i}\t200\t{i}\n"))
            .collect();
        let (p50, p99) = percentiles(&log).unwrap();
        assert_eq!(p50, 50.5);
        assert!((p99 - 99.01).abs() < 1e-9);
        // An empty (or missing) request log is an error, not a 0 or NaN latency.
        assert!(percentiles("").is_err());
    }
}
