//! The one typed configuration of `flynn-discoverd`: flags > `FLYNN_*` environment >
//! defaults, validated before any socket is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(name = "flynn-discoverd", version, about = "Flynn's service discovery")]
pub struct Config {
    /// Directory for the Raft log, vote and snapshots.
    #[arg(long, env = "FLYNN_DATA_DIR")]
    pub data_dir: PathBuf,

    /// HTTP listen address (API and Raft RPC share it).
    #[arg(long, env = "FLYNN_ADDR", default_value = "0.0.0.0:1111")]
    pub addr: SocketAddr,

    /// Advertised `host:port` of this node (default: the bound address).
    #[arg(long, env = "FLYNN_HOST")]
    pub host: Option<String>,

    /// Comma-separated Raft peers (default: this node alone). A node is a peer iff its
    /// advertised address is in this list; otherwise it proxies to the peers.
    #[arg(long, env = "FLYNN_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,

    /// DNS listen address (UDP and TCP); not served when unset.
    #[arg(long, env = "FLYNN_DNS_ADDR")]
    pub dns_addr: Option<SocketAddr>,

    /// Comma-separated upstream DNS servers (`ip` or `ip:port`, port 53 by default) that
    /// names outside `discoverd.` are forwarded to, in order; none → such names are
    /// REFUSED.
    #[arg(long, env = "FLYNN_RECURSORS", value_delimiter = ',', value_parser = parse_recursor)]
    pub recursors: Vec<SocketAddr>,

    /// URL that is sent `POST {"job_id","url","dns"}` once this node listens (the host
    /// daemon's `/host/discoverd`); retried every second for a minute.
    #[arg(long, env = "FLYNN_NOTIFY")]
    pub notify: Option<String>,

    /// Start DNS only after the host's network is configured: polls `GET /host/status`
    /// on the `--notify` host until it reports `network`, and uses its `resolvers` as
    /// recursors when `--recursors` is not set. Needs `--notify` and `--dns-addr`.
    #[arg(long, env = "FLYNN_WAIT_NET_DNS")]
    pub wait_net_dns: bool,

    /// Instance TTL without heartbeats (spec: 10s). Expiry waits 2×TTL after a leader
    /// change.
    #[arg(long, env = "FLYNN_INSTANCE_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub instance_ttl: Duration,

    /// Raft election timeout (minimum; the maximum is twice this). Heartbeats go out every
    /// third of it. A follower asks for votes (Pre-Vote first) once the leader's lease (the
    /// maximum) has passed without a heartbeat, plus a random delay under 3/4 of this
    /// (`node::campaign_at_lease_end`; openraft's own timer, lease and then its timeout, is
    /// the fallback), so a dead leader is replaced after about 2–3× this (~250 ms to the
    /// first acknowledged write at the default; the spec's hashicorp/raft setup took 1–2 s).
    /// The trade-off: a follower campaigns after ~205–280 ms of silence at the default
    /// (about 6 missed heartbeats) instead of 300–400 ms (about 9), so a leader stalled for
    /// 205–300 ms (e.g. CPU starvation) that used to be tolerated may now be replaced;
    /// voting and LeaseRead safety are unchanged (Pre-Vote and each voter's lease apply).
    #[arg(long, env = "FLYNN_ELECTION_TIMEOUT", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub election_timeout: Duration,

    /// TEST ONLY: serve `POST /debug/partition`, which makes this node drop Raft RPCs to
    /// and from the listed peers (see `fault`). Never set in production.
    #[arg(long, env = "FLYNN_ENABLE_FAULT_INJECTION")]
    pub enable_fault_injection: bool,

    /// Raft log entries applied between state-machine snapshots (like etcd's
    /// `--snapshot-count`). After a snapshot the log keeps at most this many (up to 1000)
    /// of the entries it covers; a follower that lags further gets the snapshot.
    #[arg(long, env = "FLYNN_SNAPSHOT_COUNT", default_value_t = 5000)]
    pub snapshot_count: u64,

    /// How long a follower keeps a Raft replication stream that brings no request (a
    /// leader whose host vanished leaves nothing behind). Shorter only for tests.
    #[arg(long, env = "FLYNN_RAFT_STREAM_IDLE", default_value = "60s", value_parser = humantime::parse_duration, hide = true)]
    pub raft_stream_idle: Duration,

    /// How long a client may take to send a request's head (request line and headers);
    /// the connection is closed past it. Also how long an idle keep-alive connection is
    /// kept. Shorter only for tests.
    #[arg(long, env = "FLYNN_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration, hide = true)]
    pub header_read_timeout: Duration,

    /// Most SSE watches (service, instance and leader streams) open at once on this node;
    /// past it a watch is answered 503 (each holds a connection and a subscriber).
    #[arg(long, env = "FLYNN_MAX_WATCHES", default_value_t = 10_000)]
    pub max_watches: usize,

    /// Runtime worker threads (1–64). The Raft log's fsyncs run on a thread of their own
    /// and snapshots on tokio's blocking pool either way. One worker wakes fewer threads
    /// per write (tokio wakes an idle second worker on every hand-off): it measured faster
    /// at one client and the same at 16 and 64 on two cores (perf/RESULTS.md). More may
    /// pay on many-core hosts under heavy write load.
    #[arg(long, env = "FLYNN_THREADS", default_value_t = 1)]
    pub threads: usize,
}

fn parse_recursor(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("bad recursor {s:?}: expected ip or ip:port"))
}

impl Config {
    pub fn validate(&self) -> Result<(), String> {
        if self.instance_ttl < Duration::from_millis(100) {
            return Err("--instance-ttl must be at least 100ms".into());
        }
        if self.election_timeout < Duration::from_millis(50) {
            return Err("--election-timeout must be at least 50ms".into());
        }
        if self.snapshot_count < 10 {
            return Err(format!(
                "--snapshot-count must be at least 10, not {}",
                self.snapshot_count
            ));
        }
        if self.raft_stream_idle < Duration::from_secs(1) {
            return Err("--raft-stream-idle must be at least 1s".into());
        }
        if self.header_read_timeout < Duration::from_millis(100) {
            return Err("--header-read-timeout must be at least 100ms".into());
        }
        if self.max_watches == 0 {
            return Err("--max-watches must be at least 1".into());
        }
        if !(1..=64).contains(&self.threads) {
            return Err(format!("--threads must be 1–64, not {}", self.threads));
        }
        if let Some(n) = &self.notify {
            if flynn_client::http_base(n).is_none() {
                return Err(format!("bad --notify {n:?}: expected an http:// URL"));
            }
        }
        if self.wait_net_dns && (self.notify.is_none() || self.dns_addr.is_none()) {
            return Err("--wait-net-dns needs --notify and --dns-addr".into());
        }
        if self.host.is_none() && !self.peers.is_empty() && self.addr.ip().is_unspecified() {
            // The advertised address would be the wildcard, which is in no peer list: the
            // node would run as a proxy without saying so.
            return Err(format!(
                "--host is required with --peers when --addr is a wildcard address ({}): give the address peers reach this node at",
                self.addr
            ));
        }
        for p in &self.peers {
            if p.rsplit_once(':')
                .and_then(|(_, port)| port.parse::<u16>().ok())
                .is_none()
            {
                return Err(format!("bad peer {p:?}: expected host:port"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_interface_flags() {
        let c = Config::try_parse_from([
            "flynn-discoverd",
            "--data-dir",
            "/tmp/d",
            "--addr",
            "127.0.0.1:1111",
            "--host",
            "127.0.0.1:1111",
            "--peers",
            "127.0.0.1:1111,127.0.0.2:1111,127.0.0.3:1111",
            "--dns-addr",
            "127.0.0.1:5353",
        ])
        .unwrap();
        assert_eq!(c.peers.len(), 3);
        assert_eq!(c.instance_ttl, Duration::from_secs(10));
        c.validate().unwrap();
        let bad = Config::try_parse_from(["d", "--data-dir", "x", "--peers", "nope"]).unwrap();
        assert!(bad.validate().is_err());
        // Peers but no --host, listening on the wildcard: refused, not a silent proxy.
        let peers = ["d", "--data-dir", "x", "--peers", "10.0.0.1:1111"];
        let no_host = Config::try_parse_from(peers).unwrap();
        assert!(
            no_host
                .validate()
                .unwrap_err()
                .contains("--host is required"),
            "{:?}",
            no_host.validate()
        );
        let with_host =
            Config::try_parse_from(peers.iter().chain(&["--host", "10.0.0.1:1111"])).unwrap();
        with_host.validate().unwrap();
        let bound =
            Config::try_parse_from(peers.iter().chain(&["--addr", "10.0.0.1:1111"])).unwrap();
        bound.validate().unwrap();
        // A single node may listen on the wildcard without --host, as before.
        Config::try_parse_from(["d", "--data-dir", "x"])
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.threads, 1);
        let zero = Config::try_parse_from(["d", "--data-dir", "x", "--threads", "0"]).unwrap();
        assert_eq!(
            zero.validate().unwrap_err(),
            "--threads must be 1–64, not 0"
        );
    }

    #[test]
    fn recursors_default_to_port_53() {
        let c = Config::try_parse_from([
            "d",
            "--data-dir",
            "x",
            "--recursors",
            "8.8.8.8,127.0.0.1:5300,[::1]:54",
        ])
        .unwrap();
        let got: Vec<String> = c.recursors.iter().map(|a| a.to_string()).collect();
        assert_eq!(got, ["8.8.8.8:53", "127.0.0.1:5300", "[::1]:54"]);
        assert!(Config::try_parse_from(["d", "--data-dir", "x", "--recursors", "nope"]).is_err());
    }
}
