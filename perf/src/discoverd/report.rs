//! Markdown for a `discoverd` session: medians per scenario and cluster size, ratios
//! against etcd with the same number of nodes.

use std::fmt::Write as _;

use super::cluster::{EtcdApi, Id, Kind};
use super::load::Phase;
use super::{Failover, Sample, Scenario, Session};
use crate::report::{counted, fmt_count, fmt_latency, fmt_mib, fmt_ratio, median, percentile};

/// Percentile `q` of a phase's latencies: `report::percentile`, the one definition in
/// flynn-perf (linear interpolation; its 50th percentile is `report::median`).
fn p(ph: &Phase, q: f64) -> Option<f64> {
    percentile(&ph.lat_us, q)
}

/// The runs of a cell that count (no errors, every node alive after the run).
fn valid(xs: &[Sample]) -> Vec<Sample> {
    xs.iter().filter(|x| x.invalid.is_none()).cloned().collect()
}

/// Runs kept out of the medians.
fn invalid(xs: &[Sample]) -> usize {
    xs.iter().filter(|x| x.invalid.is_some()).count()
}

/// The median of the failover times, `report::median`'s definition, with every failed kill
/// (no write within the limit) counted as +∞: a median over the kills that recovered only
/// would hide the ones that did not. +∞ when half or more failed (even count: when a middle
/// value is a failure).
pub fn failover_median(fs: &[Failover]) -> Option<f64> {
    let mut xs: Vec<f64> = fs.iter().map(|f| f.ms.unwrap_or(f64::INFINITY)).collect();
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

/// A failover time: `> 30 s` for +∞ (a failed kill).
pub fn fmt_failover(ms: Option<f64>) -> String {
    match ms {
        None => "-".into(),
        Some(x) if x.is_infinite() => format!("> {} s", super::FAILOVER_LIMIT.as_secs()),
        Some(x) => format!("{x:.0} ms"),
    }
}

/// etcd ÷ this for failover medians; `-` when either is a failure (+∞).
fn failover_ratio(etcd: Option<f64>, this: Option<f64>) -> String {
    match (etcd, this) {
        (Some(a), Some(b)) if a.is_finite() && b.is_finite() => fmt_ratio(Some(a), Some(b)),
        _ => "-".into(),
    }
}

fn fmt_cpu(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.0}"))
}

/// The progress line of one run.
pub fn one_line(sc: Scenario, s: &Sample) -> String {
    let a = &s.a;
    let err = |ph: &Phase| {
        ph.first_error
            .as_deref()
            .map(|e| format!("  first error: {}", e.chars().take(160).collect::<String>()))
            .unwrap_or_default()
    };
    match (sc, &s.b) {
        (Scenario::Cas(_), _) => format!(
            "{:>7.0} CAS/s  p50 {} p99 {}  {} CPU-µs/op  RSS {:.1} MiB  errors {}{}",
            a.rate().unwrap_or(f64::NAN),
            fmt_latency(p(a, 50.0)),
            fmt_latency(p(a, 99.0)),
            fmt_cpu(a.cpu_us_per_op()),
            s.rss as f64 / 1048576.0,
            a.errors,
            err(a)
        ),
        (Scenario::Reg, Some(b)) => format!(
            "{:>7.0} reg/s ({} CPU-µs)  {:>7.0} hb/s ({} CPU-µs)  RSS {:.1} MiB  errors {}+{}{}{}",
            a.rate().unwrap_or(f64::NAN),
            fmt_cpu(a.cpu_us_per_op()),
            b.rate().unwrap_or(f64::NAN),
            fmt_cpu(b.cpu_us_per_op()),
            s.rss as f64 / 1048576.0,
            a.errors,
            b.errors,
            err(a),
            err(b)
        ),
        (Scenario::Watch, Some(b)) => format!(
            "event p50 {} p99 {}  ack p50 {} p99 {}  events {}/{}{}{}",
            fmt_latency(p(a, 50.0)),
            fmt_latency(p(a, 99.0)),
            fmt_latency(p(b, 50.0)),
            fmt_latency(p(b, 99.0)),
            a.ok,
            b.ok,
            err(a),
            err(b)
        ),
        _ => String::new(),
    }
}

fn med<F: Fn(&Sample) -> Option<f64>>(xs: &[Sample], f: F) -> Option<f64> {
    median(xs.iter().filter_map(f).collect())
}

fn etcd_of(id: &Id) -> Id {
    Id {
        kind: Kind::Etcd,
        nodes: id.nodes,
    }
}

/// What each operation is, for etcd through `api`.
fn operations_table(api: EtcdApi) -> String {
    let etcd = match api {
        EtcdApi::Grpc => [
            "etcd, native gRPC (`--etcd-api grpc`)",
            "`KV.Txn`: compare `mod_revision == r` (0 = absent), success: put; r = the txn's \
             header revision; one key per client, all clients on one HTTP/2 connection to the \
             leader",
            "`Lease.LeaseGrant` (TTL 10 s) + `KV.Put` with that lease: the two writes any etcd \
             registration with a TTL needs",
            "one request and its response on the client's long-lived `Lease.LeaseKeepAlive` \
             stream (opened before the phase; leader only, not persisted)",
            "a `Watch.Watch` stream on a prefix (its own connection to the watcher's member), \
             time from sending the `KV.Put` to its event",
            "`KV.Put` to a survivor (connected before the kill; forwarded to the leader by etcd)",
        ],
        EtcdApi::Gateway => [
            "etcd, JSON gRPC gateway (`--etcd-api gateway`)",
            "`POST /v3/kv/txn`: compare `mod_revision == r` (0 = absent), success: put; r = the \
             txn's revision; one key per client",
            "`POST /v3/lease/grant` (TTL 10 s) + `POST /v3/kv/put` with that lease: the two \
             writes any etcd registration with a TTL needs",
            "`POST /v3/lease/keepalive` of the instance's lease (a new keepalive stream inside \
             etcd per request; leader only, not persisted)",
            "`POST /v3/watch` on a prefix, time from sending the put to its event",
            "`POST /v3/kv/put` to a survivor (forwarded to the leader by etcd)",
        ],
    };
    format!(
        "What each operation is:\n\n\
         | workload | flynn-discoverd | {} |\n\
         |---|---|---|\n\
         | CAS | `PUT /services/:s/meta` `{{\"data\":…,\"index\":i}}`; each client owns one \
         service and sends the index its last success returned (0 creates) | {} |\n\
         | registration | `PUT /services/:s/instances/:id` of a new instance (one Raft write) \
         | {} |\n\
         | heartbeat | the same PUT again, unchanged (leader memory only) | {} |\n\
         | watch | SSE `GET /services/:s`, time from sending the registration to its `up` \
         event | {} |\n\
         | failover probe | a new instance PUT to a survivor (its 307 to the leader followed) \
         | {} |\n",
        etcd[0], etcd[1], etcd[2], etcd[3], etcd[4], etcd[5]
    )
}

pub fn render(s: &Session) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# flynn-perf discoverd\n");
    for line in &s.header {
        let _ = writeln!(out, "- {line}");
    }
    for (id, why) in &s.skipped {
        let _ = writeln!(out, "- **skipped {id}**: {}", why.replace('\n', " "));
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Medians across rounds. Rates = acknowledged operations ÷ seconds from the first \
         request to the last response. `CPU-µs/op` = CPU seconds (user+system, every thread of \
         every node of the cluster, from `/proc/<pid>/stat`) over the same interval ÷ \
         operations; RSS = VmRSS summed over the nodes after the run. Ratios are against etcd \
         with the same number of nodes: `÷ etcd` = this ÷ etcd (above 1 = faster), `CPU ÷` and \
         latency/failover ratios = etcd ÷ this (above 1 = cheaper/faster than etcd). `errors` \
         (summed over rounds) should be 0. A run with any error, or after which a node of the \
         cluster was dead, is `invalid`: it is counted in `runs` and `invalid` and listed \
         under every run, but kept out of the medians (and out of etcd's side of the ratios). \
         A run during which the leader or the Raft term changed still counts; it is listed \
         under every run (`election`).\n"
    );
    let _ = writeln!(out, "{}", operations_table(s.etcd_api));

    // CAS.
    for sc in s.scenarios.iter().filter(|x| matches!(x, Scenario::Cas(_))) {
        let Scenario::Cas(c) = sc else { continue };
        let _ = writeln!(
            out,
            "## Metadata CAS, {c} client{}\n",
            if *c == 1 { "" } else { "s" }
        );
        let _ = writeln!(
            out,
            "| target | nodes | CAS/s | p50 | p99 | CPU-µs/op | RSS MiB | errors | runs | invalid | CAS/s ÷ etcd | CPU ÷ (etcd/this) |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for id in &s.ids {
            let Some(all) = s.samples.get(&(*sc, *id)) else {
                continue;
            };
            let xs = &valid(all);
            let base = s.samples.get(&(*sc, etcd_of(id))).map(|b| valid(b));
            let rate = med(xs, |x| x.a.rate());
            let cpu = med(xs, |x| x.a.cpu_us_per_op());
            let brate = base.as_ref().and_then(|b| med(b, |x| x.a.rate()));
            let bcpu = base.as_ref().and_then(|b| med(b, |x| x.a.cpu_us_per_op()));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                id.kind,
                id.nodes,
                fmt_count(rate),
                fmt_latency(med(xs, |x| p(&x.a, 50.0))),
                fmt_latency(med(xs, |x| p(&x.a, 99.0))),
                fmt_cpu(cpu),
                fmt_mib(med(xs, |x| Some(x.rss as f64))),
                all.iter().map(|x| x.a.errors).sum::<u64>(),
                all.len(),
                invalid(all),
                fmt_ratio(rate, brate),
                fmt_ratio(bcpu, cpu),
            );
        }
        let _ = writeln!(out);
    }

    // Registrations and heartbeats.
    if s.scenarios.contains(&Scenario::Reg) {
        let _ = writeln!(out, "## Registrations and heartbeats\n");
        let _ = writeln!(
            out,
            "| target | nodes | reg/s | reg CPU-µs | hb/s | hb CPU-µs | RSS MiB | errors | runs | invalid | reg/s ÷ etcd | hb/s ÷ etcd |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for id in &s.ids {
            let Some(all) = s.samples.get(&(Scenario::Reg, *id)) else {
                continue;
            };
            let xs = &valid(all);
            let base = s
                .samples
                .get(&(Scenario::Reg, etcd_of(id)))
                .map(|b| valid(b));
            let hb = |x: &Sample| x.b.as_ref().and_then(Phase::rate);
            let rate = med(xs, |x| x.a.rate());
            let hbr = med(xs, hb);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                id.kind,
                id.nodes,
                fmt_count(rate),
                fmt_cpu(med(xs, |x| x.a.cpu_us_per_op())),
                fmt_count(hbr),
                fmt_cpu(med(xs, |x| x.b.as_ref().and_then(Phase::cpu_us_per_op))),
                fmt_mib(med(xs, |x| Some(x.rss as f64))),
                all.iter()
                    .map(|x| x.a.errors + x.b.as_ref().map_or(0, |b| b.errors))
                    .sum::<u64>(),
                all.len(),
                invalid(all),
                fmt_ratio(rate, base.as_ref().and_then(|b| med(b, |x| x.a.rate()))),
                fmt_ratio(hbr, base.as_ref().and_then(|b| med(b, hb))),
            );
        }
        let _ = writeln!(out);
    }

    // Watch latency.
    if s.scenarios.contains(&Scenario::Watch) {
        let _ = writeln!(out, "## Register → watch event\n");
        let _ = writeln!(
            out,
            "One registration at a time on the leader; the watcher is on the leader of a \
             single node and on a follower of a 3-node cluster. `event` = sending the write → \
             its event arriving on the stream (`event max` and `events > 5 ms`: the median of the \
             per-run maxima and the count over all runs, invalid ones included, like `events` \
             and `missed`); `ack` = sending the write → its response.\n"
        );
        let _ = writeln!(
            out,
            "| target | nodes | event p50 | event p99 | event max | events > 5 ms | ack p50 | ack p99 | events | missed | runs | invalid | event p99: etcd ÷ this |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for id in &s.ids {
            let Some(all) = s.samples.get(&(Scenario::Watch, *id)) else {
                continue;
            };
            let xs = &valid(all);
            let base = s
                .samples
                .get(&(Scenario::Watch, etcd_of(id)))
                .map(|b| valid(b));
            let p99 = med(xs, |x| p(&x.a, 99.0));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                id.kind,
                id.nodes,
                fmt_latency(med(xs, |x| p(&x.a, 50.0))),
                fmt_latency(p99),
                fmt_latency(med(xs, |x| p(&x.a, 100.0))),
                all.iter()
                    .map(|x| x.a.lat_us.iter().filter(|l| **l > 5000.0).count())
                    .sum::<usize>(),
                fmt_latency(med(xs, |x| x.b.as_ref().and_then(|b| p(b, 50.0)))),
                fmt_latency(med(xs, |x| x.b.as_ref().and_then(|b| p(b, 99.0)))),
                all.iter().map(|x| x.a.ok).sum::<u64>(),
                all.iter().map(|x| x.a.errors).sum::<u64>(),
                all.len(),
                invalid(all),
                fmt_ratio(base.as_ref().and_then(|b| med(b, |x| p(&x.a, 99.0))), p99),
            );
        }
        let _ = writeln!(out);
    }

    // Elections during the timed runs.
    let mut elections: Vec<(usize, Option<usize>, Option<usize>, String)> = s
        .samples
        .iter()
        .flat_map(|((sc, id), v)| {
            v.iter().filter_map(move |x| {
                x.election.as_ref().map(|e| {
                    (
                        x.round,
                        s.scenarios.iter().position(|y| y == sc),
                        s.ids.iter().position(|i| i == id),
                        format!("round {} {sc} {id}: {e}", x.round + 1),
                    )
                })
            })
        })
        .collect();
    if !elections.is_empty() {
        elections.sort();
        let _ = writeln!(
            out,
            "**Elections during runs** (the leader or the Raft term changed between just \
             before and just after the run; the runs still count):\n"
        );
        for (_, _, _, e) in &elections {
            let _ = writeln!(out, "- {}", e.replace('\n', " "));
        }
        let _ = writeln!(out);
    }

    // Failover.
    if !s.failovers.is_empty() {
        let _ = writeln!(out, "## Leader failover\n");
        let _ = writeln!(
            out,
            "SIGKILL of the leader's process; time until a write sent to a surviving node is \
             acknowledged. A new write starts every {} ms, alternating survivors, each with a \
             {} s timeout, so a write that hangs during the election does not hold up the \
             next. The killed node is then restarted on its data and the \
             cluster has to agree on a leader before the next kill.\n",
            super::PROBE_EVERY.as_millis(),
            super::PROBE_TIMEOUT.as_secs()
        );
        let _ = writeln!(
            out,
            "A kill after which no write succeeded within {} s is a failure: it counts as +∞ \
             (`> {} s`) in the median, so a median of `> {} s` means half or more of the kills \
             failed; `failed` counts them, and min/max are over the kills that recovered.\n",
            super::FAILOVER_LIMIT.as_secs(),
            super::FAILOVER_LIMIT.as_secs(),
            super::FAILOVER_LIMIT.as_secs(),
        );
        let _ = writeln!(
            out,
            "| target | nodes | median | min | max | failed | every kill (ms) | etcd ÷ this |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---|---:|");
        for (id, fs) in &s.failovers {
            let v: Vec<f64> = fs.iter().filter_map(|f| f.ms).collect();
            let m = failover_median(fs);
            let base = s
                .failovers
                .get(&etcd_of(id))
                .and_then(|b| failover_median(b));
            let min = v.iter().copied().reduce(f64::min);
            let max = v.iter().copied().reduce(f64::max);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} of {} | {} | {} |",
                id.kind,
                id.nodes,
                fmt_failover(m),
                fmt_failover(min),
                fmt_failover(max),
                fs.len() - v.len(),
                fs.len(),
                fs.iter()
                    .map(|f| f.ms.map_or("fail".into(), |x| format!("{x:.0}")))
                    .collect::<Vec<_>>()
                    .join(", "),
                failover_ratio(base, m),
            );
        }
        let _ = writeln!(out);
    }

    crate::report::failures_section(&mut out, &s.failures);

    crate::report::every_run_head(
        &mut out,
        "| round | scenario | target | nodes | ops | errors | s | ops/s | p50 | p99 | CPU s | CPU-µs/op | 2nd phase ops | errors | ops/s | p50 | p99 | CPU-µs/op | RSS MiB | first error | counted | election |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    );
    let mut all: Vec<(&(Scenario, Id), &Sample)> = s
        .samples
        .iter()
        .flat_map(|(k, v)| v.iter().map(move |x| (k, x)))
        .collect();
    let sc_pos = |sc: &Scenario| s.scenarios.iter().position(|x| x == sc);
    all.sort_by_key(|((sc, id), x)| (x.round, sc_pos(sc), s.ids.iter().position(|i| i == id)));
    for ((sc, id), x) in all {
        let a = &x.a;
        let (b_ok, b_err, b_rate, b_p50, b_p99, b_cpu) = match &x.b {
            Some(b) => (
                b.ok.to_string(),
                b.errors.to_string(),
                fmt_count(b.rate()),
                fmt_latency(p(b, 50.0)),
                fmt_latency(p(b, 99.0)),
                fmt_cpu(b.cpu_us_per_op()),
            ),
            None => Default::default(),
        };
        let first = a
            .first_error
            .as_deref()
            .or(x.b.as_ref().and_then(|b| b.first_error.as_deref()))
            .unwrap_or("")
            .chars()
            .take(120)
            .collect::<String>()
            .replace('|', "/")
            .replace('\n', " ");
        let _ = writeln!(
            out,
            "| {} | {sc} | {} | {} | {} | {} | {:.2} | {} | {} | {} | {:.2} | {} | {b_ok} | {b_err} | {b_rate} | {b_p50} | {b_p99} | {b_cpu} | {} | {first} | {} | {} |",
            x.round + 1,
            id.kind,
            id.nodes,
            a.ok,
            a.errors,
            a.elapsed_s,
            fmt_count(a.rate()),
            fmt_latency(p(a, 50.0)),
            fmt_latency(p(a, 99.0)),
            a.cpu_s,
            fmt_cpu(a.cpu_us_per_op()),
            fmt_mib(Some(x.rss as f64)),
            counted(x.invalid.as_deref()),
            x.election
                .as_deref()
                .unwrap_or("")
                .replace('|', "/")
                .replace('\n', " "),
        );
    }
    for (id, fs) in &s.failovers {
        for f in fs {
            let _ = writeln!(
                out,
                "\nfailover {} {id}: {} (killed {}, new leader {}, {} attempts){}",
                f.rep + 1,
                f.ms.map_or("no write".into(), |m| format!("{m:.0} ms")),
                f.old_leader,
                f.new_leader.as_deref().unwrap_or("?"),
                f.attempts,
                f.note
                    .as_deref()
                    .map(|n| format!("; {n}"))
                    .unwrap_or_default(),
            );
        }
    }
    let _ = writeln!(out, "\n</details>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kill(ms: Option<f64>) -> Failover {
        Failover {
            rep: 0,
            ms,
            attempts: 1,
            old_leader: "127.0.0.1:1".into(),
            new_leader: None,
            note: None,
        }
    }

    fn kills(xs: &[Option<f64>]) -> Vec<Failover> {
        xs.iter().map(|x| kill(*x)).collect()
    }

    #[test]
    fn failed_kills_count_as_infinity() {
        assert_eq!(failover_median(&[]), None);
        // All recovered: report::median's definition (mean of the two middle values).
        assert_eq!(
            failover_median(&kills(&[
                Some(300.0),
                Some(100.0),
                Some(200.0),
                Some(400.0)
            ])),
            Some(250.0)
        );
        assert_eq!(
            failover_median(&kills(&[Some(300.0), Some(100.0), Some(200.0)])),
            Some(200.0)
        );
        // One failure of three: it is the largest value, the median is the middle one.
        assert_eq!(
            failover_median(&kills(&[Some(300.0), None, Some(100.0)])),
            Some(300.0)
        );
        // Dropping the failure would give 200 (the mean of 100 and 300).
        assert_ne!(
            failover_median(&kills(&[Some(300.0), None, Some(100.0)])),
            Some(200.0)
        );
        // Half failed (even count): a middle value is +∞.
        let m = failover_median(&kills(&[Some(100.0), None, Some(200.0), None]));
        assert_eq!(m, Some(f64::INFINITY));
        assert_eq!(fmt_failover(m), "> 30 s");
        assert_eq!(fmt_failover(Some(123.4)), "123 ms");
        assert_eq!(fmt_failover(None), "-");
        assert_eq!(failover_ratio(Some(f64::INFINITY), Some(100.0)), "-");
        assert_eq!(failover_ratio(Some(300.0), Some(100.0)), "3.00");
    }

    #[test]
    fn failover_table_shows_failures() {
        let id = Id {
            kind: Kind::Etcd,
            nodes: 3,
        };
        let mut s = Session::default();
        s.ids.push(id);
        s.failovers
            .insert(id, kills(&[Some(400.0), None, None, Some(500.0), None]));
        let text = render(&s);
        assert!(
            text.contains(
                "| etcd | 3 | > 30 s | 400 ms | 500 ms | 3 of 5 | 400, fail, fail, 500, fail | - |"
            ),
            "{text}"
        );
    }

    #[test]
    fn p50_is_the_report_median() {
        let ph = Phase {
            lat_us: vec![4.0, 1.0, 3.0, 2.0],
            ..Phase::default()
        };
        assert_eq!(p(&ph, 50.0), Some(2.5));
        // report::percentile's linear interpolation (nearest rank would give 4).
        assert!(
            (p(&ph, 99.0).unwrap() - 3.97).abs() < 1e-9,
            "{:?}",
            p(&ph, 99.0)
        );
        assert_eq!(p(&ph, 100.0), Some(4.0));
    }

    fn cas_run(round: usize, ok: u64, errors: u64, invalid: Option<&str>) -> Sample {
        Sample {
            round,
            a: Phase {
                ok,
                errors,
                elapsed_s: 1.0,
                cpu_s: 0.5,
                lat_us: vec![100.0; 4],
                first_error: (errors > 0).then(|| "HTTP 500".to_string()),
            },
            b: None,
            rss: 1 << 20,
            invalid: invalid.map(str::to_string),
            election: None,
        }
    }

    #[test]
    fn invalid_runs_stay_out_of_the_medians() {
        let flynn = Id {
            kind: Kind::Flynn,
            nodes: 3,
        };
        let etcd = etcd_of(&flynn);
        let sc = Scenario::Cas(16);
        let mut s = Session {
            ids: vec![flynn, etcd],
            scenarios: vec![sc],
            ..Session::default()
        };
        let mut elected = cas_run(1, 1100, 0, None);
        elected.election = Some("leader 127.0.0.1:1 → 127.0.0.2:1, term 2 → 3".into());
        s.samples.insert(
            (sc, flynn),
            vec![
                cas_run(0, 1000, 0, None),
                elected,
                // Fast because it failed: out of the medians.
                cas_run(2, 90_000, 7, Some("7 errors")),
            ],
        );
        s.samples.insert(
            (sc, etcd),
            vec![
                cas_run(0, 500, 0, None),
                cas_run(1, 9_000, 3, Some("3 errors")),
            ],
        );
        let text = render(&s);
        // Median of 1000 and 1100; 7 errors and 3 runs, 1 invalid; ratio 1050 / 500.
        assert!(
            text.contains("| flynn-discoverd | 3 | 1050 | 100 µs | 100 µs | 477 | 1.0 | 7 | 3 | 1 | 2.10 | 2.10 |"),
            "{text}"
        );
        assert!(
            text.contains(
                "| etcd | 3 | 500 | 100 µs | 100 µs | 1000 | 1.0 | 3 | 2 | 1 | 1.00 | 1.00 |"
            ),
            "{text}"
        );
        assert!(text.contains("| no: 7 errors |  |"), "{text}");
        assert!(
            text.contains("| yes | leader 127.0.0.1:1 → 127.0.0.2:1, term 2 → 3 |"),
            "{text}"
        );
        assert!(
            text.contains("- round 2 cas-c16 flynn-discoverd×3: leader 127.0.0.1:1 → 127.0.0.2:1"),
            "{text}"
        );
    }
}
