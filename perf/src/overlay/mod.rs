//! The `overlay` harness: the kernel VXLAN path against the eBPF fast path (`flynn-ebpf`), and
//! against the underlay without encapsulation, in network namespaces it creates.
//!
//! Topology (all namespaces carry the harness's pid and are deleted on exit): two hosts joined by
//! an underlay veth pair (`10.231.0.1`/`.2`), each with a VXLAN device (VNI 1, port 8472, MTU
//! 1450, learning off) and a bridge; jobs `a` and `b` on host 1, job `c` on host 2. Pairs:
//! same-host (a → b), cross-host (a → c) and underlay (host 1 → host 2 on the underlay
//! addresses). Jobs' veths and bridge are at the local MTU (65520), the overlay MTU (1450) on
//! each job's default route, as `flynn-network` and `flynn-host` set them up.
//!
//! Two ways to build it ([`Setup`]):
//! - the lab ([`lab`], the default): hosts, VXLAN entries (flannel-style: permanent neighbour +
//!   FDB entry + route per remote block) and jobs made with `ip`; the fast path switched on and
//!   off with the `fastpathctl` example of `flynn-ebpf`;
//! - `--deployed` ([`deployed`]): discoverd, a `flynn-network` agent per host and jobs made with
//!   the calls `flynn-host` makes, so the numbers are those of the shipped configuration;
//!   with `--via-host` ([`via_host`]) the jobs are containers of a `flynn-host` daemon per host,
//!   started through its job API, so the overlay is measured end to end through flynn-host.
//!
//! Three modes: `flannel` (the kernel path with the job side at the overlay MTU too, as flannel
//! and the issue's "bridge path" configure it), `kernel` (the kernel path as flynn-network
//! configures it) and `fast` (the eBPF fast path on top of that: job veths, VXLAN device, and
//! VXLAN encapsulation and decapsulation in BPF on the underlay veth `ul0`). Per round, for the
//! underlay and each mode in a balanced order ([`crate::order`]): ping RTT (per-packet median
//! and p99), iperf3 TCP and UDP throughput per pair. The fast path's counters are checked (same-host: local redirects; cross-host:
//! encapsulations and decapsulations in BPF) so a "fast" number is never silently a kernel-path
//! number. Medians across rounds; nothing passes or fails.

mod deployed;
mod lab;
mod via_host;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use flynn_netlab::run_stdout as run;

use crate::procs::{Proc, TempDir};
use crate::report::{median, percentile};

pub struct Options {
    pub rounds: usize,
    /// Seconds per iperf3 run.
    pub duration_s: u64,
    /// Pings per RTT run (10 ms apart).
    pub pings: u32,
    /// `fastpathctl` (`cargo build --release -p flynn-ebpf --example fastpathctl`).
    pub ctl_bin: PathBuf,
    pub out: Option<PathBuf>,
    pub command: String,
    /// `masqctl` (`cargo build --release -p flynn-network --example masqctl`): when given, both
    /// host namespaces get the outbound NAT table `flynn-network` installs by default (so their
    /// routed traffic goes through conntrack, as on a deployed host).
    pub masq_bin: Option<PathBuf>,
    /// Instead of the lab: what a deployed host runs (see [`deployed`]).
    pub deployed: Option<DeployedBins>,
}

/// The binaries of `--deployed`.
pub struct DeployedBins {
    pub discoverd: PathBuf,
    pub network: PathBuf,
    /// `--via-host`: the `flynn-host` daemon (`cargo build --release -p flynn-host`) that
    /// makes the jobs, one per host; without it the harness makes the jobs' networks itself.
    pub host: Option<PathBuf>,
}

/// The overlay MTU (underlay 1500 − VXLAN's 50) and the local MTU of job veths and bridges
/// (`flynn_network::job::LOCAL_MTU`).
const OVERLAY_MTU: u32 = 1450;
const LOCAL_MTU: u32 = flynn_network::job::LOCAL_MTU;

/// Who talks to whom: `src` and `dst` are network namespaces, `ip` is `dst`'s address.
struct Pair {
    name: &'static str,
    src: String,
    dst: String,
    ip: String,
}

/// How the hosts and jobs are made and the modes switched.
trait Setup {
    /// One line for the report.
    fn describe(&self) -> String;
    /// Host 1 to host 2 on the underlay addresses.
    fn underlay(&self) -> Pair;
    /// Puts the hosts in `mode`; returns the same-host and cross-host pairs.
    fn enter(&mut self, mode: Mode) -> Result<[Pair; 2]>;
    /// Host 1's fast path counters: (redirected locally, encapsulated in BPF, decapsulated in
    /// BPF). Only asked for in [`Mode::Fast`].
    fn counters(&self) -> Result<(u64, u64, u64)>;
    /// Host 2's packets encapsulated in BPF, where the setup can read them (its job's replies
    /// cross in BPF too, not only host 1's requests). Only asked for in [`Mode::Fast`].
    fn peer_encapsulated(&self) -> Result<Option<u64>> {
        Ok(None)
    }
    /// Undoes what `enter` did for `mode`.
    fn leave(&mut self, mode: Mode) -> Result<()>;
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Kernel path, job side at the overlay MTU.
    Flannel,
    /// Kernel path, job side at the local MTU.
    Kernel,
    /// eBPF fast path, job side at the local MTU.
    Fast,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Flannel, Mode::Kernel, Mode::Fast];

    fn label(self) -> &'static str {
        match self {
            Mode::Flannel => "bridge, overlay MTU (flannel)",
            Mode::Kernel => "bridge, local MTU",
            Mode::Fast => "fast path, local MTU",
        }
    }
}

#[derive(Default)]
struct Samples {
    rtt_p50_us: Vec<f64>,
    rtt_p99_us: Vec<f64>,
    tcp_gbps: Vec<f64>,
    udp_gbps: Vec<f64>,
    udp_loss_pct: Vec<f64>,
}

/// Per-packet RTTs in µs from `ping` output.
fn ping_rtts(ns: &str, dst: &str, count: u32) -> Result<Vec<f64>> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-n", "-i", "0.01", "-W", "1"])
        .args(["-c", &count.to_string(), dst])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect();
    ensure!(
        rtts.len() as u32 >= count * 9 / 10,
        "ping {ns} -> {dst}: {} of {count} answered",
        rtts.len()
    );
    Ok(rtts)
}

/// The `error` of an iperf3 JSON report, if it has one.
fn json_error(json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["error"].as_str().map(str::to_string)
}

/// One iperf3 run from `src` to `dst_ip` (server in `dst`); returns (Gbit/s, UDP loss %).
fn iperf(
    tmp: &TempDir,
    src: &str,
    dst: &str,
    dst_ip: &str,
    udp: bool,
    secs: u64,
) -> Result<(f64, f64)> {
    let port = "5201";
    let mut server = Command::new("ip");
    server.args(["netns", "exec", dst, "iperf3", "-s", "-1", "-p", port]);
    let mut server = Proc::spawn(
        "iperf3-server",
        server,
        &tmp.path().join("iperf3-server.log"),
    )?;
    let secs_s = secs.to_string();
    // Client on CPU 0, server on CPU 1 (`-A`): unpinned, where the scheduler puts the two
    // processes and the softirq work moves single-stream results by ±30% run to run.
    let mut client = vec![
        "ip", "netns", "exec", src, "iperf3", "-c", dst_ip, "-p", port, "-t", &secs_s, "-J",
    ];
    if std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2) {
        client.extend_from_slice(&["-A", "0,1"]);
    }
    if udp {
        client.extend_from_slice(&["-u", "-b", "0", "-l", "1400"]);
    }
    // The server needs a moment to listen; retry the connect a few times (bounded).
    let mut last = None;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        match run(&client) {
            // iperf3 -J reports a refused connect (server not listening yet) as JSON with
            // an `error`: that is a failed attempt too.
            Ok(json) if json_error(&json).is_some() => {
                last = Some(Err(anyhow::anyhow!(
                    "iperf3 ({src} -> {dst_ip}): {}",
                    json_error(&json).unwrap_or_default()
                )))
            }
            Ok(json) => {
                last = Some(Ok(json));
                break;
            }
            Err(e) => last = Some(Err(e)),
        }
    }
    let json = last.context("no iperf3 attempt")??;
    let _ = server.wait_timeout(Duration::from_secs(5));
    let v: serde_json::Value = serde_json::from_str(&json).context("iperf3 JSON")?;
    if udp {
        let sum = &v["end"]["sum"];
        let bps = sum["bits_per_second"]
            .as_f64()
            .with_context(|| format!("udp bits_per_second ({src} -> {dst_ip}): {}", v["error"]))?;
        let loss = sum["lost_percent"].as_f64().unwrap_or(0.0);
        // Received rate: sent rate × (1 − loss).
        Ok((bps * (1.0 - loss / 100.0) / 1e9, loss))
    } else {
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .with_context(|| format!("tcp bits_per_second ({src} -> {dst_ip}): {}", v["error"]))?;
        Ok((bps / 1e9, 0.0))
    }
}

fn measure(
    opts: &Options,
    tmp: &TempDir,
    src: &str,
    dst: &str,
    ip: &str,
    s: &mut Samples,
) -> Result<()> {
    let rtts = ping_rtts(src, ip, opts.pings)?;
    s.rtt_p50_us
        .push(percentile(&rtts, 50.0).context("no ping RTT")?);
    s.rtt_p99_us
        .push(percentile(&rtts, 99.0).context("no ping RTT")?);
    let (tcp, _) = iperf(tmp, src, dst, ip, false, opts.duration_s)?;
    s.tcp_gbps.push(tcp);
    let (udp, loss) = iperf(tmp, src, dst, ip, true, opts.duration_s)?;
    s.udp_gbps.push(udp);
    s.udp_loss_pct.push(loss);
    Ok(())
}

/// What the report header says about the machine, read before anything runs.
struct Env {
    started: String,
    kernel: String,
    iperf: String,
}

/// Checks everything the harness needs before it builds anything (root, `ip`, `iperf3`,
/// `ping`) and reads the versions for the report.
fn preflight() -> Result<Env> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the overlay harness needs root (network namespaces, veths, VXLAN, a BPF filesystem): \
         run it as root"
    );
    for (tool, pkg) in [
        ("ip", "iproute2"),
        ("iperf3", "iperf3"),
        ("ping", "iputils-ping"),
    ] {
        ensure!(
            crate::bench::on_path(tool),
            "{tool} not found on PATH (apt-get install -y {pkg})"
        );
    }
    let iperf = run(&["iperf3", "--version"])
        .context("iperf3 --version")?
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    Ok(Env {
        started: run(&["date", "-u"])?.trim().to_string(),
        kernel: run(&["uname", "-r"])?.trim().to_string(),
        iperf,
    })
}

pub fn run_harness(opts: Options) -> Result<String> {
    let env = preflight()?;
    let mut setup: Box<dyn Setup> = match &opts.deployed {
        Some(bins) => Box::new(deployed::Deployed::new(bins)?),
        None => Box::new(lab::LabSetup::new(&opts.ctl_bin, opts.masq_bin.as_deref())?),
    };
    let res = bench(&opts, setup.as_mut());
    if res.is_err() {
        crate::procs::wait_if_stopping();
    }
    let (underlay, samples) = res?;
    let md = report(&opts, &env, &setup.describe(), &underlay, &samples);
    drop(setup);
    if let Some(out) = &opts.out {
        std::fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(md)
}

type Sampled = Vec<(&'static str, Mode, Samples)>;

fn bench(opts: &Options, setup: &mut dyn Setup) -> Result<(Samples, Sampled)> {
    let tmp = TempDir::new("flynn-perf-overlay")?;
    let mut samples: Sampled = Vec::new();
    for name in ["same-host", "cross-host"] {
        for mode in Mode::ALL {
            samples.push((name, mode, Samples::default()));
        }
    }
    let mut underlay = Samples::default();
    let ul = setup.underlay();
    // The underlay takes its turn among the modes, so it is not always measured first.
    let steps: Vec<Option<Mode>> = std::iter::once(None).chain(Mode::ALL.map(Some)).collect();
    if let Some(w) = crate::order::balance_warning(steps.len(), opts.rounds, "steps") {
        eprintln!("{w}");
    }
    for round in 0..opts.rounds {
        eprintln!("round {}/{}", round + 1, opts.rounds);
        for k in crate::order::run_order(steps.len(), round) {
            let Some(mode) = steps[k] else {
                measure(opts, &tmp, &ul.src, &ul.dst, &ul.ip, &mut underlay)?;
                continue;
            };
            let pairs = setup.enter(mode)?;
            for p in &pairs {
                let before = if mode == Mode::Fast {
                    Some((setup.counters()?, setup.peer_encapsulated()?))
                } else {
                    None
                };
                let s = &mut samples
                    .iter_mut()
                    .find(|(n, m, _)| *n == p.name && *m == mode)
                    .context("samples")?
                    .2;
                measure(opts, &tmp, &p.src, &p.dst, &p.ip, s)?;
                if let Some(((l0, r0, d0), p0)) = before {
                    let (l1, r1, d1) = setup.counters()?;
                    let p1 = setup.peer_encapsulated()?;
                    // Cross-host: requests encapsulated in BPF, replies decapsulated in BPF
                    // (and encapsulated in BPF on host 2, where that can be read).
                    let moved = if p.name == "same-host" {
                        l1 > l0
                    } else {
                        let peer = match (p0, p1) {
                            (Some(a), Some(b)) => b > a,
                            _ => true,
                        };
                        r1 > r0 && d1 > d0 && peer
                    };
                    ensure!(moved, "{}: fast path counters did not move", p.name);
                }
            }
            setup.leave(mode)?;
        }
    }
    Ok((underlay, samples))
}

fn report(opts: &Options, env: &Env, setup: &str, underlay: &Samples, samples: &Sampled) -> String {
    let Env {
        started,
        kernel,
        iperf: iperf_v,
    } = env;
    let mut md = String::new();
    md.push_str(&format!(
        "- Date: {started}\n- Command: `{}`\n",
        opts.command
    ));
    md.push_str(&format!(
        "- Host: {} CPUs, Linux {kernel}; {iperf_v}; {} round(s), iperf3 {} s per run, {} pings at 10 ms per RTT run; the underlay and the three modes in a balanced order changing every round (each in each position and right after each other equally often over 4 rounds)\n- Hosts: {setup}\n\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        opts.rounds,
        opts.duration_s,
        opts.pings,
    ));
    md.push_str("Medians across rounds. RTT from per-packet ping times (p50 and p99 within a run, interpolating linearly between ranks). iperf3 client pinned to CPU 0, server to CPU 1 (`-A 0,1`). UDP: iperf3 `-u -b 0 -l 1400`, received rate.\n\n");
    md.push_str("| pair | path | RTT p50 | RTT p99 | TCP Gbit/s | UDP Gbit/s | UDP loss % |\n|---|---|---:|---:|---:|---:|---:|\n");
    let row = |pair: &str, path: &str, s: &Samples| -> String {
        let f = |v: &Vec<f64>| median(v.clone()).unwrap_or(f64::NAN);
        format!(
            "| {pair} | {path} | {:.0} µs | {:.0} µs | {:.2} | {:.2} | {:.1} |\n",
            f(&s.rtt_p50_us),
            f(&s.rtt_p99_us),
            f(&s.tcp_gbps),
            f(&s.udp_gbps),
            f(&s.udp_loss_pct)
        )
    };
    md.push_str(&row("underlay", "no encapsulation", underlay));
    for (name, mode, s) in samples {
        md.push_str(&row(name, mode.label(), s));
    }
    md.push_str("\nTCP Gbit/s per round:\n\n");
    let rounds = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    md.push_str(&format!("- underlay: {}\n", rounds(&underlay.tcp_gbps)));
    for (name, mode, s) in samples {
        md.push_str(&format!(
            "- {name}, {}: {}\n",
            mode.label(),
            rounds(&s.tcp_gbps)
        ));
    }
    let get = |name: &str, mode: Mode| -> &Samples {
        &samples
            .iter()
            .find(|(n, m, _)| *n == name && *m == mode)
            .expect("sampled")
            .2
    };
    let m = |v: &Vec<f64>| median(v.clone()).unwrap_or(f64::NAN);
    let (sb, sk, sf) = (
        get("same-host", Mode::Flannel),
        get("same-host", Mode::Kernel),
        get("same-host", Mode::Fast),
    );
    let (ck, cf) = (
        get("cross-host", Mode::Kernel),
        get("cross-host", Mode::Fast),
    );
    let ratios = [
        (
            "cross-host RTT p50, fast ÷ kernel",
            m(&cf.rtt_p50_us) / m(&ck.rtt_p50_us),
            "≤ 0.75",
        ),
        (
            "same-host RTT p50, fast ÷ kernel",
            m(&sf.rtt_p50_us) / m(&sk.rtt_p50_us),
            "—",
        ),
        (
            "same-host TCP, fast path (local MTU) ÷ bridge (overlay MTU)",
            m(&sf.tcp_gbps) / m(&sb.tcp_gbps),
            "≥ 1.2",
        ),
        (
            "same-host TCP, bridge (local MTU) ÷ bridge (overlay MTU): the MTU's share",
            m(&sk.tcp_gbps) / m(&sb.tcp_gbps),
            "—",
        ),
        (
            "same-host TCP, fast ÷ bridge, both at the local MTU: the program's share",
            m(&sf.tcp_gbps) / m(&sk.tcp_gbps),
            "—",
        ),
        (
            "cross-host TCP, fast ÷ kernel",
            m(&cf.tcp_gbps) / m(&ck.tcp_gbps),
            "—",
        ),
        (
            "cross-host TCP, fast ÷ underlay",
            m(&cf.tcp_gbps) / m(&underlay.tcp_gbps),
            "≥ 0.8",
        ),
        (
            "cross-host UDP, fast ÷ kernel",
            m(&cf.udp_gbps) / m(&ck.udp_gbps),
            "—",
        ),
    ];
    md.push_str("\n| ratio | measured | target |\n|---|---:|---|\n");
    for (what, value, target) in ratios {
        md.push_str(&format!("| {what} | {value:.2} | {target} |\n"));
    }
    md
}
