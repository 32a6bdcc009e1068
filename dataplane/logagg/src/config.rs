//! The aggregator's one typed configuration: flags > `FLYNN_*` environment > defaults,
//! validated before any socket is bound.

use std::net::SocketAddr;

use clap::Parser;
use flynn_runtime::Driver;

#[derive(Debug, Clone, Parser)]
#[command(name = "flynn-logagg", version, about = "Flynn's log aggregator")]
pub struct Config {
    /// Syslog listen address: TCP (RFC 6587 framing) and UDP (one datagram per message).
    #[arg(long, env = "FLYNN_SYSLOG_ADDR", default_value = "127.0.0.1:5140")]
    pub syslog_addr: SocketAddr,

    /// HTTP API address (log reads, cursors, snapshot, status, metrics).
    #[arg(long, env = "FLYNN_API_ADDR", default_value = "127.0.0.1:5141")]
    pub api_addr: SocketAddr,

    /// Another aggregator's API URL (`http://host:port`); repeatable. Its snapshot is
    /// loaded before serving and its new lines are followed.
    #[arg(long = "peer", env = "FLYNN_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,

    /// Lines kept per app; older lines are evicted (and counted).
    #[arg(long, env = "FLYNN_LINES_PER_APP", default_value_t = 10_000)]
    pub lines_per_app: usize,

    /// Cap on buffered bytes across all apps (frames plus per-line overhead).
    #[arg(long, env = "FLYNN_MAX_MEMORY", default_value_t = 1 << 30)]
    pub max_memory: usize,

    /// Largest syslog frame accepted; a larger one closes the connection.
    #[arg(long, env = "FLYNN_MAX_FRAME", default_value_t = flynn_syslog::DEFAULT_MAX_FRAME)]
    pub max_frame: usize,

    /// Worker threads, one pinned per core (default: number of cores).
    #[arg(long, env = "FLYNN_THREADS")]
    pub threads: Option<usize>,

    /// I/O driver: auto (io_uring, epoll where unavailable), io_uring or epoll.
    #[arg(long, env = "FLYNN_IO_DRIVER", default_value = "auto")]
    pub io_driver: Driver,

    /// Most syslog TCP connections open at once (all cores together); a connection beyond
    /// it is closed at once and counted (`connections_rejected_total`), as rsyslog's
    /// `MaxSessions`. Each open connection can hold a 64 KiB read buffer.
    #[arg(long, env = "FLYNN_MAX_CONNS", default_value_t = 4096)]
    pub max_conns: usize,

    /// Do not listen for syslog over UDP.
    #[arg(long, env = "FLYNN_NO_UDP")]
    pub no_udp: bool,

    /// Seconds a follow stream may go without a line before a keep-alive is written (a
    /// blank line in NDJSON, a `:` comment in SSE), so proxies with a read timeout do not
    /// cut a quiet `log -f`. Hidden: tests shorten it.
    #[arg(long, hide = true, default_value_t = 30)]
    pub stream_keepalive: u64,
}

impl Config {
    pub fn validate(&self) -> Result<(), String> {
        if self.threads == Some(0) {
            return Err("--threads must be at least 1".into());
        }
        if self.max_conns == 0 {
            return Err("--max-conns must be at least 1".into());
        }
        if self.lines_per_app == 0 {
            return Err("--lines-per-app must be at least 1".into());
        }
        if !(64..=65_535).contains(&self.max_frame) {
            return Err("--max-frame must be between 64 and 65535".into());
        }
        if self.stream_keepalive == 0 {
            return Err("--stream-keepalive must be at least 1".into());
        }
        if self.max_memory < 1 << 20 {
            return Err("--max-memory must be at least 1048576".into());
        }
        for p in &self.peers {
            crate::peer::parse_url(p).map_err(|e| format!("--peer {p:?}: {e}"))?;
        }
        Ok(())
    }

    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(flynn_runtime::core_count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_interface_flags() {
        let c = Config::try_parse_from([
            "flynn-logagg",
            "--syslog-addr",
            "127.0.0.1:0",
            "--api-addr",
            "127.0.0.1:0",
            "--peer",
            "http://127.0.0.1:1",
            "--peer",
            "http://127.0.0.1:2/",
            "--lines-per-app",
            "5",
            "--max-memory",
            "2000000",
            "--max-frame",
            "2000",
            "--threads",
            "2",
            "--io-driver",
            "epoll",
        ])
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.peers.len(), 2);
        assert_eq!((c.lines_per_app, c.max_frame, c.threads()), (5, 2000, 2));
    }

    #[test]
    fn rejects_bad_values() {
        for args in [
            &["l", "--threads", "0"][..],
            &["l", "--lines-per-app", "0"],
            &["l", "--max-conns", "0"],
            &["l", "--max-frame", "70000"],
            &["l", "--max-memory", "10"],
            &["l", "--peer", "ftp://x"],
        ] {
            let c = Config::try_parse_from(args).unwrap();
            assert!(c.validate().is_err(), "{args:?}");
        }
        assert!(Config::try_parse_from(["l", "--io-driver", "kqueue"]).is_err());
    }
}
