//! `flynn-perf`: `proxy` runs the side-by-side proxy harness; `origin` is the origin server
//! it proxies to (started by the harness itself); `logagg` runs the log aggregator harness;
//! `discoverd` runs flynn-discoverd against etcd; `overlay` compares the overlay's kernel path
//! with the eBPF fast path; `host` compares flynn-host's job start/stop with `runc`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use flynn_perf::bench::{self, Scenario};
use flynn_perf::targets::Kind;
use flynn_perf::{discoverd, logagg};

#[derive(Parser)]
#[command(name = "flynn-perf", about = "Flynn dataplane performance harnesses")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Router vs nginx vs HAProxy vs the origin alone, interleaved, on loopback.
    Proxy(ProxyArgs),
    /// The benchmark origin: fixed responses over keep-alive HTTP/1.1.
    Origin(OriginArgs),
    /// flynn-logagg vs rsyslog: syslog ingest over TCP, interleaved, on loopback.
    Logagg(LogaggArgs),
    /// flynn-discoverd vs etcd, 1 and 3 nodes: CAS, registrations, watch latency, failover.
    Discoverd(DiscoverdArgs),
    /// Overlay kernel VXLAN path vs the eBPF fast path vs the underlay, in network namespaces
    /// (root; ping RTT, iperf3 TCP and UDP).
    Overlay(OverlayArgs),
    /// flynn-host vs `runc`: job start and stop latency on the busybox image, and the memory
    /// of the daemon and its shims with many jobs (root).
    Host(HostArgs),
}

#[derive(clap::Args)]
struct HostArgs {
    /// Measured rounds (after one warm-up); each starts and stops one job per variant.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Rounds of the stop without a SIGTERM trap (SIGKILL after a 1 s stop timeout).
    #[arg(long, default_value_t = 1)]
    no_trap_rounds: usize,
    /// Jobs running at once for the memory measurement (0 skips it).
    #[arg(long, default_value_t = 100)]
    jobs: usize,
    #[arg(long, default_value = "target/release/flynn-host")]
    host_bin: PathBuf,
    /// The jobs' address block (default 100.100.<100 + pid % 100>.0/24).
    #[arg(long)]
    block: Option<String>,
    /// Also write the markdown report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct OverlayArgs {
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 3)]
    duration: u64,
    /// Pings per RTT run (10 ms apart).
    #[arg(long, default_value_t = 300)]
    pings: u32,
    /// The fast path control tool (`cargo build --release -p flynn-ebpf --example fastpathctl`).
    #[arg(long, default_value = "target/release/examples/fastpathctl")]
    ctl_bin: PathBuf,
    /// The outbound NAT tool (`cargo build --release -p flynn-network --example masqctl`), run
    /// in both host namespaces so they carry the NAT table a deployed host has.
    #[arg(long, default_value = "target/release/examples/masqctl")]
    masq_bin: PathBuf,
    /// Leave the outbound NAT table out (hosts without conntrack on routed traffic).
    #[arg(long)]
    no_masq: bool,
    /// Measure through what a deployed host runs (discoverd, a `flynn-network` agent per
    /// host, jobs made with flynn-host's calls) instead of the lab's `ip` commands.
    #[arg(long)]
    deployed: bool,
    /// `--deployed`: the discoverd binary (`cargo build --release -p flynn-discoverd`).
    #[arg(long, default_value = "target/release/flynn-discoverd")]
    discoverd_bin: PathBuf,
    /// `--deployed`: the agent binary (`cargo build --release -p flynn-network`).
    #[arg(long, default_value = "target/release/flynn-network")]
    network_bin: PathBuf,
    /// `--deployed`: the jobs are containers started through the job API of a `flynn-host`
    /// daemon per host (which gets its block from the agent) instead of networks the harness
    /// makes with flynn-host's calls.
    #[arg(long, requires = "deployed")]
    via_host: bool,
    /// `--via-host`: the host daemon binary (`cargo build --release -p flynn-host`).
    #[arg(long, default_value = "target/release/flynn-host")]
    host_bin: PathBuf,
    /// Also write the markdown report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct DiscoverdArgs {
    /// Rounds; each runs every scenario against every target once.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Concurrent CAS clients (one scenario per value).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    /// CAS operations per run (all clients together).
    #[arg(long, default_value_t = 4000)]
    cas_ops: u64,
    /// Every timed phase stops after this many seconds.
    #[arg(long, default_value_t = 4.0)]
    max_seconds: f64,
    /// Instances registered per `reg` run.
    #[arg(long, default_value_t = 1000)]
    instances: u64,
    /// Heartbeats per `reg` run (round robin over the registered instances).
    #[arg(long, default_value_t = 10000)]
    heartbeats: u64,
    /// Concurrent clients of the `reg` scenario.
    #[arg(long, default_value_t = 16)]
    reg_clients: usize,
    /// Sequential registrations timed per `watch` run.
    #[arg(long, default_value_t = 200)]
    watch_events: u64,
    /// Leader kills per 3-node target.
    #[arg(long, default_value_t = 5)]
    failovers: usize,
    /// Cluster sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    nodes: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "flynn,etcd")]
    targets: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "cas,reg,watch,failover")]
    scenarios: Vec<String>,
    /// Skip the unrecorded CAS warm-up per target.
    #[arg(long)]
    no_warmup: bool,
    #[arg(long, default_value = "target/release/flynn-discoverd")]
    discoverd_bin: PathBuf,
    /// How to drive etcd: `grpc` (its native gRPC API, as etcd's clients) or `gateway` (its
    /// JSON gRPC gateway over HTTP/1.1, which etcd serves by calling its own gRPC server).
    #[arg(long, default_value = "grpc", value_parser = discoverd::cluster::EtcdApi::parse)]
    etcd_api: discoverd::cluster::EtcdApi,
    /// etcd's `--election-timeout`, ms (default: discoverd's 100 ms; etcd's own is 1000).
    #[arg(long, default_value_t = discoverd::cluster::EtcdTimers::DISCOVERD_ELECTION_MS)]
    etcd_election_ms: u64,
    /// etcd's `--heartbeat-interval`, ms (default: a fifth of the election timeout, 20 ms,
    /// the most etcd allows and so the closest to discoverd's 33 ms heartbeat).
    #[arg(long)]
    etcd_heartbeat_ms: Option<u64>,
    /// Also write the Markdown report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct LogaggArgs {
    /// Rounds; each runs every connection count against every target once.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Messages per run.
    #[arg(long, default_value_t = 2_000_000)]
    messages: usize,
    /// Senders stop after this many seconds even if not everything was written.
    #[arg(long, default_value_t = 10)]
    max_seconds: u64,
    /// Sender connections (one scenario per value).
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    conns: Vec<usize>,
    /// Give every sender connection its own hostname (a host per connection) instead of
    /// splitting one host's sequence over all of them.
    #[arg(long)]
    host_per_conn: bool,
    /// flynn-logagg --threads values.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "flynn,rsyslog")]
    targets: Vec<String>,
    /// Distinct app ids in the load.
    #[arg(long, default_value_t = 100)]
    apps: usize,
    /// Bytes per RFC 5424 message (without the octet count; 160..=8000).
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Milliseconds between follow-latency marker lines.
    #[arg(long, default_value_t = 10)]
    marker_ms: u64,
    /// Skip the unrecorded warm-up run per target.
    #[arg(long)]
    no_warmup: bool,
    #[arg(long, default_value = "target/release/flynn-logagg")]
    logagg_bin: PathBuf,
    /// Also write the Markdown report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ProxyArgs {
    /// Rounds; each runs every scenario against every target once.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,flynn,nginx,haproxy"
    )]
    targets: Vec<String>,
    /// Worker threads/processes for each proxy.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    workers: Vec<usize>,
    /// Scenarios; `tls` = tls-c64,tls-resume-c64,tls-newconn-c64,h2-c64; `tcp` =
    /// tcp-c64,tcp-newconn-c64.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "small-c64,small-c256,64k-c64,newconn-c64,idle-10k"
    )]
    scenarios: Vec<String>,
    #[arg(long, default_value = "target/release/flynn-router")]
    router_bin: PathBuf,
    /// Also write the Markdown report here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Threads of the origin server.
    #[arg(long, default_value_t = 2)]
    origin_threads: usize,
    /// Connections opened by idle-10k.
    #[arg(long, default_value_t = 10_000)]
    idle_conns: usize,
    /// How long idle-10k lets the connections sit idle before reading the proxy's RSS.
    #[arg(long, default_value_t = 3000)]
    idle_settle_ms: u64,
    /// Key type of the self-signed certificate for the TLS scenarios: ec (P-256) or rsa (2048).
    #[arg(long, default_value = "ec")]
    cert: String,
    /// Skip the unrecorded warm-up run per target.
    #[arg(long)]
    no_warmup: bool,
}

#[derive(clap::Args)]
struct OriginArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Exit when this process is no longer our parent.
    #[arg(long)]
    parent_pid: Option<u32>,
}

fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./,=:@".contains(c))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

fn command_line() -> String {
    std::env::args()
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Origin(a) => flynn_perf::origin::run(a.addr, a.threads, a.parent_pid),
        Cmd::Proxy(a) => {
            flynn_perf::procs::install_signal_handler()?;
            let opts = bench::Options {
                rounds: a.rounds.max(1),
                duration_s: a.duration.max(1),
                targets: a
                    .targets
                    .iter()
                    .map(|t| Kind::parse(t))
                    .collect::<Result<_>>()?,
                workers: a.workers.into_iter().filter(|w| *w > 0).collect(),
                scenarios: a
                    .scenarios
                    .iter()
                    .map(|s| Scenario::parse_group(s))
                    .collect::<Result<Vec<_>>>()?
                    .concat(),
                router_bin: a.router_bin,
                out: a.out,
                origin_threads: a.origin_threads.max(1),
                idle_conns: a.idle_conns,
                idle_settle: std::time::Duration::from_millis(a.idle_settle_ms),
                key_type: flynn_perf::tls::KeyType::parse(&a.cert)?,
                warmup: !a.no_warmup,
                command: command_line(),
            };
            let text = bench::run(opts)?;
            println!("{text}");
            Ok(())
        }
        Cmd::Logagg(a) => {
            flynn_perf::procs::install_signal_handler()?;
            let opts = logagg::Options {
                rounds: a.rounds.max(1),
                messages: a.messages.max(1),
                max_seconds: a.max_seconds.max(1),
                conns: a.conns.into_iter().filter(|c| *c > 0).collect(),
                host_per_conn: a.host_per_conn,
                threads: a.threads.into_iter().filter(|t| *t > 0).collect(),
                targets: a
                    .targets
                    .iter()
                    .map(|t| logagg::targets::Kind::parse(t))
                    .collect::<Result<_>>()?,
                apps: a.apps.max(1),
                size: a.size,
                marker_ms: a.marker_ms.max(1),
                warmup: !a.no_warmup,
                logagg_bin: a.logagg_bin,
                out: a.out,
                command: command_line(),
            };
            let text = logagg::run(opts)?;
            println!("{text}");
            Ok(())
        }
        Cmd::Overlay(a) => {
            flynn_perf::procs::install_signal_handler()?;
            let text = flynn_perf::overlay::run_harness(flynn_perf::overlay::Options {
                rounds: a.rounds.max(1),
                duration_s: a.duration.max(1),
                pings: a.pings.max(10),
                ctl_bin: a.ctl_bin,
                out: a.out,
                command: command_line(),
                masq_bin: (!a.no_masq).then_some(a.masq_bin),
                deployed: a.deployed.then(|| flynn_perf::overlay::DeployedBins {
                    discoverd: flynn_perf::procs::resolve_bin(&a.discoverd_bin, "flynn-discoverd"),
                    network: flynn_perf::procs::resolve_bin(&a.network_bin, "flynn-network"),
                    host: a
                        .via_host
                        .then(|| flynn_perf::procs::resolve_bin(&a.host_bin, "flynn-host")),
                }),
            })?;
            println!("{text}");
            Ok(())
        }
        Cmd::Host(a) => {
            flynn_perf::procs::install_signal_handler()?;
            let text = flynn_perf::host::run_harness(flynn_perf::host::Options {
                rounds: a.rounds.max(1),
                no_trap_rounds: a.no_trap_rounds,
                jobs: a.jobs,
                host_bin: a.host_bin,
                block: a.block,
                out: a.out,
                command: command_line(),
            })?;
            println!("{text}");
            Ok(())
        }
        Cmd::Discoverd(a) => {
            flynn_perf::procs::install_signal_handler()?;
            for s in &a.scenarios {
                if !["cas", "reg", "watch", "failover"].contains(&s.as_str()) {
                    anyhow::bail!("unknown scenario {s:?} (expected cas, reg, watch, failover)");
                }
            }
            let opts = discoverd::Options {
                rounds: a.rounds.max(1),
                clients: a.clients.into_iter().filter(|c| *c > 0).collect(),
                cas_ops: a.cas_ops.max(1),
                max_seconds: a.max_seconds,
                instances: a.instances,
                heartbeats: a.heartbeats,
                reg_clients: a.reg_clients,
                watch_events: a.watch_events,
                failovers: a.failovers,
                nodes: a
                    .nodes
                    .into_iter()
                    .filter(|n| (1..=3).contains(n))
                    .collect(),
                targets: a
                    .targets
                    .iter()
                    .map(|t| discoverd::cluster::Kind::parse(t))
                    .collect::<Result<_>>()?,
                scenarios: a.scenarios,
                warmup: !a.no_warmup,
                discoverd_bin: a.discoverd_bin,
                etcd_api: a.etcd_api,
                etcd_timers: discoverd::cluster::EtcdTimers::new(
                    a.etcd_election_ms,
                    a.etcd_heartbeat_ms,
                )?,
                out: a.out,
                command: command_line(),
            };
            let text = discoverd::run(opts)?;
            println!("{text}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use discoverd::cluster::{EtcdApi, EtcdTimers};

    fn discoverd_args(args: &[&str]) -> DiscoverdArgs {
        let cli = Cli::try_parse_from([&["flynn-perf", "discoverd"], args].concat()).unwrap();
        match cli.command {
            Cmd::Discoverd(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn discoverd_etcd_options() {
        let a = discoverd_args(&[]);
        assert_eq!(a.etcd_api, EtcdApi::Grpc);
        assert_eq!(a.etcd_election_ms, 100);
        assert_eq!(a.etcd_heartbeat_ms, None);
        assert_eq!(
            EtcdTimers::new(a.etcd_election_ms, a.etcd_heartbeat_ms).unwrap(),
            EtcdTimers {
                election_ms: 100,
                heartbeat_ms: 20
            }
        );
        let a = discoverd_args(&[
            "--etcd-api",
            "gateway",
            "--etcd-election-ms",
            "1000",
            "--etcd-heartbeat-ms",
            "100",
        ]);
        assert_eq!(a.etcd_api, EtcdApi::Gateway);
        assert_eq!(
            EtcdTimers::new(a.etcd_election_ms, a.etcd_heartbeat_ms).unwrap(),
            EtcdTimers {
                election_ms: 1000,
                heartbeat_ms: 100
            }
        );
        assert!(Cli::try_parse_from(["flynn-perf", "discoverd", "--etcd-api", "http"]).is_err());
    }
}
