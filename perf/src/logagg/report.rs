//! Markdown for a `logagg` session: medians per connection count, ratios against rsyslog.

use std::fmt::Write as _;

use super::targets::{Id, Kind};
use super::{Sample, Session, POLL};
use crate::report::{counted, fmt_count, fmt_latency, fmt_mib, fmt_ratio, median, percentile};

struct Cell {
    rate: Option<f64>,
    cpu_us: Option<f64>,
    rss: Option<f64>,
    buffered: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    markers_got: usize,
    markers_sent: u64,
    lost: u64,
    runs: usize,
    /// Runs kept out of the medians (lost messages, a stall, the target died).
    invalid: usize,
}

/// Medians over the valid runs only; `lost`, the marker counts and `runs` cover every run.
fn cell(samples: &[Sample]) -> Cell {
    let valid: Vec<&Sample> = samples.iter().filter(|s| s.invalid.is_none()).collect();
    Cell {
        rate: median(valid.iter().filter_map(|s| s.msgs_per_s()).collect()),
        cpu_us: median(valid.iter().filter_map(|s| s.cpu_us_per_msg()).collect()),
        rss: median(valid.iter().map(|s| s.rss as f64).collect()),
        buffered: median(
            valid
                .iter()
                .filter_map(|s| s.buffered.map(|b| b as f64))
                .collect(),
        ),
        p50: median(
            valid
                .iter()
                .filter_map(|s| percentile(&s.latencies_us, 50.0))
                .collect(),
        ),
        p99: median(
            valid
                .iter()
                .filter_map(|s| percentile(&s.latencies_us, 99.0))
                .collect(),
        ),
        markers_got: samples.iter().map(|s| s.latencies_us.len()).sum(),
        markers_sent: samples.iter().map(|s| s.markers_sent).sum(),
        lost: samples.iter().map(Sample::lost).sum(),
        runs: samples.len(),
        invalid: samples.len() - valid.len(),
    }
}

fn threads(id: &Id) -> String {
    id.threads.map_or("default".into(), |n| n.to_string())
}

fn conns_title(c: usize) -> String {
    if c == 1 {
        "1 connection".into()
    } else {
        format!("{c} connections")
    }
}

pub fn render(s: &Session) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# flynn-perf logagg\n");
    for line in &s.header {
        let _ = writeln!(out, "- {line}");
    }
    for (id, note) in &s.notes {
        let _ = writeln!(out, "- {id}: `{note}`");
    }
    for (id, why) in &s.skipped {
        let _ = writeln!(out, "- **skipped {id}**: {}", why.replace('\n', " "));
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Medians across the valid rounds. `msgs/s` = messages sent ÷ seconds from the first write until \
         the target had processed all of them (flynn-logagg: `flynn_logagg_messages_total` on \
         `/metrics`; rsyslog: bytes in its output file), polled every {} ms. `CPU-µs/msg` = CPU \
         seconds (user+system, all threads) the target used over that interval ÷ messages \
         processed, from `/proc/<pid>/stat`. RSS after the run; `buffered` = \
         `flynn_logagg_memory_bytes` (lines held in the per-app rings). `follow p50/p99`: \
         marker lines sent on their own connection during the blast, time from `write` to \
         arrival on a `follow=true` stream (per-run percentiles, then the median). `lost` = \
         sent − processed when the harness stopped waiting, summed over rounds (should be 0). \
         A run that lost messages, stalled (a write blocked past the senders' deadline plus \
         10 s: the target stopped reading) or after which the target was dead is `invalid`: \
         counted in `runs` and `invalid` and listed under every run, but kept out of the \
         medians. Follow percentiles interpolate linearly between ranks. flynn-logagg's \
         completion polling (`GET /metrics` on one keep-alive connection every {} ms) is \
         charged to it; rsyslog's (the size of its output file) costs rsyslog nothing. \
         Ratios are against rsyslog in the same scenario; `CPU ÷` is rsyslog's CPU-µs/msg ÷ \
         this row's (above 1 = cheaper than rsyslog).\n",
        POLL.as_millis(),
        POLL.as_millis()
    );

    let rsyslog = Id {
        kind: Kind::Rsyslog,
        threads: None,
    };
    for &c in &s.conns {
        let _ = writeln!(out, "## {}\n", conns_title(c));
        let _ = writeln!(
            out,
            "| target | threads | msgs/s | CPU-µs/msg | RSS MiB | buffered MiB | follow p50 | follow p99 | markers | lost | runs | invalid | msgs/s ÷ rsyslog | CPU ÷ (rsyslog/this) |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let base = s.samples.get(&(c, rsyslog)).map(|v| cell(v));
        for id in &s.ids {
            let Some(samples) = s.samples.get(&(c, *id)) else {
                continue;
            };
            let x = cell(samples);
            let markers = if x.markers_sent > 0 {
                format!("{}/{}", x.markers_got, x.markers_sent)
            } else {
                "-".into()
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                id.kind,
                threads(id),
                fmt_count(x.rate),
                x.cpu_us.map_or("-".into(), |v| format!("{v:.2}")),
                fmt_mib(x.rss),
                fmt_mib(x.buffered),
                fmt_latency(x.p50),
                fmt_latency(x.p99),
                markers,
                x.lost,
                x.runs,
                x.invalid,
                fmt_ratio(x.rate, base.as_ref().and_then(|b| b.rate)),
                fmt_ratio(base.as_ref().and_then(|b| b.cpu_us), x.cpu_us),
            );
        }
        let _ = writeln!(out);
    }

    crate::report::failures_section(&mut out, &s.failures);

    let _ = writeln!(
        out,
        "<details><summary>Load and rsyslog configuration</summary>\n\nFirst frame of the \
         load (octet count, then the RFC 5424 message; run N writes N into `host0000`):\n\n\
         ```\n{}\n```\n",
        s.sample_frame
    );
    if let Some(conf) = &s.rsyslog_conf {
        let _ = writeln!(
            out,
            "rsyslog runs as `rsyslogd -n -f TMPDIR/rsyslog.conf -i TMPDIR/rsyslogd.pid` with:\n\n\
             ```\n{}```\n",
            conf
        );
    }
    let _ = writeln!(out, "</details>\n");

    crate::report::every_run_head(
        &mut out,
        "| round | conns | target | threads | sent | processed | send s | elapsed s | msgs/s | CPU s | CPU-µs/msg | RSS MiB | buffered MiB | follow p50 | follow p99 | markers | counted | note |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    );
    let mut all: Vec<(&(usize, Id), &Sample)> = s
        .samples
        .iter()
        .flat_map(|(k, v)| v.iter().map(move |x| (k, x)))
        .collect();
    let conn_pos = |c: usize| s.conns.iter().position(|x| *x == c);
    all.sort_by_key(|((c, id), x)| (x.round, conn_pos(*c), s.ids.iter().position(|i| i == id)));
    for ((c, id), x) in all {
        let _ = writeln!(
            out,
            "| {} | {c} | {} | {} | {} | {} | {:.2} | {:.2} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} |",
            x.round + 1,
            id.kind,
            threads(id),
            x.sent,
            x.processed,
            x.send_s,
            x.elapsed_s,
            fmt_count(x.msgs_per_s()),
            x.cpu_s,
            x.cpu_us_per_msg().map_or("-".into(), |v| format!("{v:.2}")),
            fmt_mib(Some(x.rss as f64)),
            fmt_mib(x.buffered.map(|b| b as f64)),
            fmt_latency(percentile(&x.latencies_us, 50.0)),
            fmt_latency(percentile(&x.latencies_us, 99.0)),
            if x.markers_sent > 0 {
                format!("{}/{}", x.latencies_us.len(), x.markers_sent)
            } else {
                "-".into()
            },
            counted(x.invalid.as_deref()),
            x.note.as_deref().unwrap_or("").replace('|', "/"),
        );
    }
    let _ = writeln!(out, "\n</details>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(elapsed_s: f64, processed: u64, invalid: Option<&str>) -> Sample {
        Sample {
            round: 0,
            sent: 1000,
            markers_sent: 0,
            processed,
            send_s: 0.5,
            elapsed_s,
            cpu_s: 0.001,
            rss: 1 << 20,
            buffered: None,
            latencies_us: vec![10.0, 20.0],
            note: None,
            invalid: invalid.map(str::to_string),
        }
    }

    #[test]
    fn stalled_runs_stay_out_of_the_medians() {
        let samples = vec![
            sample(1.0, 1000, None),
            sample(2.0, 1000, None),
            // Stopped waiting with 400 messages lost: its rate (over the processed ones) and
            // CPU per message would flatter the target.
            sample(0.1, 600, Some("400 lost")),
        ];
        let c = cell(&samples);
        assert_eq!(c.rate, Some(750.0));
        assert_eq!(c.cpu_us, Some(1.0));
        assert_eq!(c.p50, Some(15.0));
        assert_eq!((c.runs, c.invalid, c.lost), (3, 1, 400));
    }
}
