//! The router's one typed configuration: flags > `FLYNN_*` environment > defaults,
//! validated before any socket is bound.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use flynn_runtime::Driver;

#[derive(Debug, Clone, Parser)]
#[command(name = "flynn-router", version, about = "Flynn's HTTP/TCP router")]
pub struct Config {
    /// HTTP listen address; repeatable. The first is the default port (routes with
    /// port 0), the others are additional ports that routes name explicitly.
    #[arg(
        long = "http-addr",
        env = "FLYNN_HTTP_ADDR",
        value_delimiter = ',',
        default_value = "0.0.0.0:8080"
    )]
    pub http_addrs: Vec<SocketAddr>,

    /// HTTPS listen address; repeatable like --http-addr (the first is the default
    /// HTTPS port). Needs certificates: the default keypair or per-route ones.
    #[arg(long = "https-addr", env = "FLYNN_HTTPS_ADDR", value_delimiter = ',')]
    pub https_addrs: Vec<SocketAddr>,

    /// Plain-text HTTP/2 listener (h2c with prior knowledge, no HTTP/1.1); opt-in,
    /// repeatable. Serves the default routes (port 0).
    #[arg(long = "h2c-addr", env = "FLYNN_H2C_ADDR", value_delimiter = ',')]
    pub h2c_addrs: Vec<SocketAddr>,

    /// Default certificate chain (PEM file) for HTTPS routes without their own.
    #[arg(long, env = "FLYNN_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM file) of --tls-cert.
    #[arg(long, env = "FLYNN_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Admin API address (routes, backends, events, status, metrics).
    #[arg(long, env = "FLYNN_API_ADDR", default_value = "127.0.0.1:5000")]
    pub api_addr: SocketAddr,

    /// Address TCP routes listen on.
    #[arg(long, env = "FLYNN_TCP_IP", default_value = "0.0.0.0")]
    pub tcp_ip: IpAddr,

    /// Port range for TCP routes, `START-END` inclusive.
    #[arg(long, env = "FLYNN_TCP_PORTS", default_value = "3000-3500", value_parser = parse_range)]
    pub tcp_ports: (u16, u16),

    /// Routes file (JSON or TOML) loaded at start: `{"routes": [...], "services": {...}}`.
    #[arg(long, env = "FLYNN_ROUTES")]
    pub routes: Option<PathBuf>,

    /// Worker threads, one pinned per core (default: number of cores).
    #[arg(long, env = "FLYNN_THREADS")]
    pub threads: Option<usize>,

    /// I/O driver: auto (io_uring, epoll where unavailable), io_uring or epoll.
    #[arg(long, env = "FLYNN_IO_DRIVER", default_value = "auto")]
    pub io_driver: Driver,

    /// Maximum open client connections per core; further connections are closed.
    #[arg(long, env = "FLYNN_MAX_CONNS_PER_CORE", default_value_t = 50_000)]
    pub max_conns_per_core: usize,

    /// Idle upstream connections kept per backend per core.
    #[arg(long, env = "FLYNN_POOL_IDLE_PER_BACKEND", default_value_t = 256)]
    pub pool_idle_per_backend: usize,

    /// Seconds to wait for a complete request head.
    #[arg(long, env = "FLYNN_HEADER_TIMEOUT", default_value_t = 60)]
    pub header_timeout_secs: u64,

    /// Seconds a backend has for its whole response head (interim 1xx heads included)
    /// once the request is all sent (gRPC: once the client's stream has ended), as Go's
    /// `ResponseHeaderTimeout`; then the client gets a 503. Hidden: the spec fixes it at
    /// 10 minutes; tests lower it.
    #[arg(long, env = "FLYNN_RESPONSE_HEADER_TIMEOUT", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..), hide = true)]
    pub response_header_timeout_secs: u64,

    /// How many changes the `/events` channel holds for a subscriber that is behind (a
    /// subscriber more changes behind gets an error and the end of its stream). Hidden:
    /// tests lower it.
    #[arg(long, env = "FLYNN_EVENTS_CAPACITY", default_value_t = crate::api::EVENT_CHANGES,
          value_parser = parse_events_capacity, hide = true)]
    pub events_capacity: usize,

    /// How many events an `/events` subscriber may be behind (what one stalled subscriber
    /// can pin) before it gets an error and the end of its stream. Hidden: tests lower it.
    #[arg(long, env = "FLYNN_EVENTS_BACKLOG", default_value_t = crate::api::EVENT_BACKLOG,
          value_parser = parse_events_backlog, hide = true)]
    pub events_backlog: usize,

    /// Seconds a client keep-alive connection may sit idle between requests.
    #[arg(long, env = "FLYNN_IDLE_TIMEOUT", default_value_t = 300)]
    pub idle_timeout_secs: u64,

    /// Seconds the router keeps reading (and discarding) a request body it did not read
    /// after answering it itself (404, 503, 400) or relaying a backend's early answer, or
    /// the bytes sent behind a refused upgrade request, before closing: the client can finish sending and read the answer instead of
    /// getting a reset (nginx's `lingering_time`). It stops sooner when the client closes,
    /// sends nothing for 5 s or has sent 64 MiB. 0: close at once. The side of a tunnel
    /// left after the other's reset lingers likewise until its peer has taken what was
    /// relayed to it, at most 5 s (or this, if lower).
    #[arg(long, env = "FLYNN_LINGERING_TIME", default_value_t = 30)]
    pub lingering_time_secs: u64,

    /// TLS session-ticket key file (48 or 80 random bytes, e.g. `openssl rand 80 > FILE`);
    /// repeatable, the first encrypts and all decrypt (rotate by putting a new file first).
    /// Routers given the same files resume each other's TLS sessions. Without any, the keys
    /// are random, rotate every 6 h, and are handed to the new process in a takeover.
    #[arg(
        long = "tls-ticket-key",
        env = "FLYNN_TLS_TICKET_KEYS",
        value_delimiter = ','
    )]
    pub tls_ticket_keys: Vec<PathBuf>,

    /// Seconds a TCP route connection or an upgraded (WebSocket) connection may go without
    /// a byte read from either side before the router closes it (as HAProxy's `timeout tunnel`,
    /// nginx's stream `proxy_timeout`). 0: never.
    #[arg(long, env = "FLYNN_TUNNEL_TIMEOUT", default_value_t = 3600)]
    pub tunnel_timeout_secs: u64,

    /// Seconds such a connection may go without a byte read from either side once one side
    /// has finished sending (half-closed; like HAProxy's `timeout client-fin` and
    /// `server-fin` together). 0 (the default): only the tunnel timeout applies, since a
    /// client may half-close and then wait long for a silent backend.
    #[arg(long, env = "FLYNN_TUNNEL_FIN_TIMEOUT", default_value_t = 0)]
    pub tunnel_fin_timeout_secs: u64,

    /// Milliseconds a dial to a backend may take before it counts as failed and the next
    /// backend is tried (nginx's `proxy_connect_timeout`, HAProxy's `timeout connect`).
    #[arg(long, env = "FLYNN_CONNECT_TIMEOUT_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub connect_timeout_ms: u64,

    /// Milliseconds a plain-HTTP keep-alive connection that just got its response waits
    /// for the next request with a receive already posted and its buffer held (one
    /// operation per request instead of a readiness poll plus a receive); after that it
    /// idles without a buffer. 0 turns this off.
    #[arg(long, env = "FLYNN_HOT_IDLE_MS", default_value_t = 10)]
    pub hot_idle_ms: u64,

    /// Accept PROXY protocol v1/v2 prefixes on HTTP listeners (connections without one
    /// are served normally; a malformed one closes the connection).
    #[arg(long, env = "PROXY_PROTOCOL", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub proxy_protocol: bool,

    /// With `--proxy-protocol`: take PROXY prefixes only from these networks (comma-separated
    /// CIDRs or addresses, e.g. the load balancers'); anyone else's connection is served as
    /// if the option were off, so a prefix it sends is a bad request and cannot fake its
    /// address. Empty (the default): from anyone, as Flynn's router.
    #[arg(long, env = "PROXY_PROTOCOL_FROM", value_delimiter = ',', value_parser = parse_cidr)]
    pub proxy_protocol_from: Vec<Cidr>,

    /// Key for sticky-session cookies: base64 of exactly 32 bytes. Required when any
    /// route is sticky.
    #[arg(long, env = "COOKIE_KEY", hide_env_values = true)]
    pub cookie_key: Option<String>,

    /// HTML file served as the body of the router's own 503 responses.
    #[arg(long, env = "FLYNN_ERROR_503_PAGE")]
    pub error_503_page: Option<PathBuf>,

    /// URL (http://) fetched once at start whose body becomes the 503 page; must answer
    /// 200 with at most 1,000,000 bytes.
    #[arg(long, env = "ERROR_503_PAGE_URL")]
    pub error_503_page_url: Option<String>,

    /// discoverd URL (e.g. http://127.0.0.1:1111): route backends come from the
    /// instances of each route's service, live; `leader: true` routes follow the
    /// service leader. Without it, backends come from the API and the routes file.
    #[arg(long, env = "FLYNN_DISCOVERD")]
    pub discoverd: Option<String>,

    /// Unix socket on which this router hands its listening sockets to a new router
    /// process (zero-downtime upgrade), then drains and exits.
    #[arg(long, env = "FLYNN_UPGRADE_SOCKET")]
    pub upgrade_socket: Option<PathBuf>,

    /// Take over the listening sockets and routes of the router serving on this Unix
    /// socket (its `--upgrade-socket`) instead of binding new ones.
    #[arg(long, env = "FLYNN_TAKEOVER")]
    pub takeover: Option<PathBuf>,

    /// When handing over: seconds idle keep-alive connections get before being closed.
    #[arg(long, env = "FLYNN_DRAIN_GRACE", default_value_t = 2)]
    pub drain_grace_secs: u64,

    /// When handing over: seconds to wait for busy connections before exiting anyway.
    #[arg(long, env = "FLYNN_DRAIN_TIMEOUT", default_value_t = 60)]
    pub drain_timeout_secs: u64,

    /// Run with two demo backends and a sample route set (the quick start).
    #[arg(long)]
    pub demo: bool,
}

/// An address block: `10.0.0.0/8`, `2001:db8::/32`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        // An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let s = s.trim();
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let net: std::net::IpAddr = addr
        .parse()
        .map_err(|_| format!("bad address {addr:?} in {s:?}"))?;
    let max = if net.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("bad prefix length in {s:?}"))?,
        None => max,
    };
    // An IPv4-mapped block (`::ffff:10.0.0.0/104`) is the IPv4 block: clients are compared
    // as IPv4 (see [`Cidr::contains`]).
    if let std::net::IpAddr::V6(v6) = net {
        if let Some(v4) = v6.to_ipv4_mapped().filter(|_| prefix >= 96) {
            return Ok(Cidr {
                net: std::net::IpAddr::V4(v4),
                prefix: prefix - 96,
            });
        }
    }
    Ok(Cidr { net, prefix })
}

/// Whether listeners on `a` and `b` are on one address, or one's address includes the
/// other's (a wildcard), on the same port (see [`Config::check_addresses_differ`]).
fn addrs_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    // An IPv4-mapped IPv6 address is that IPv4 address on a dual-stack socket.
    let ip = |a: SocketAddr| match a.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a.ip(), IpAddr::V4),
        v4 => v4,
    };
    // A link-local address is one per interface: `[fe80::1%2]` and `[fe80::1%3]` differ.
    let scope = |a: SocketAddr| match a {
        SocketAddr::V6(v6) => v6.scope_id(),
        SocketAddr::V4(_) => 0,
    };
    let covers = |wild: IpAddr, other: IpAddr| match wild {
        IpAddr::V4(w) => w.is_unspecified() && other.is_ipv4(),
        IpAddr::V6(w) => w.is_unspecified(),
    };
    let (x, y) = (ip(a), ip(b));
    let same = x == y && scope(a) == scope(b);
    a.port() == b.port() && a.port() != 0 && (same || covers(x, y) || covers(y, x))
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("expected START-END, got {s:?}"))?;
    let a: u16 = a.trim().parse().map_err(|_| format!("bad port {a:?}"))?;
    let b: u16 = b.trim().parse().map_err(|_| format!("bad port {b:?}"))?;
    if a == 0 || b < a {
        return Err(format!("bad port range {s:?}"));
    }
    Ok((a, b))
}

impl Config {
    pub fn validate(&self) -> Result<(), String> {
        if self.http_addrs.is_empty() {
            return Err("at least one --http-addr is required".into());
        }
        if self.threads == Some(0) {
            return Err("--threads must be at least 1".into());
        }
        if self.max_conns_per_core == 0 {
            return Err("--max-conns-per-core must be at least 1".into());
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("--tls-cert and --tls-key go together".into());
        }
        if let Some(k) = &self.cookie_key {
            crate::sticky::parse_key(k)?;
        }
        if self.error_503_page.is_some() && self.error_503_page_url.is_some() {
            return Err("give either --error-503-page or ERROR_503_PAGE_URL, not both".into());
        }
        if !self.proxy_protocol_from.is_empty() && !self.proxy_protocol {
            return Err("--proxy-protocol-from needs --proxy-protocol".into());
        }
        if self.header_timeout_secs == 0 || self.idle_timeout_secs == 0 {
            return Err("timeouts must be at least 1 second".into());
        }
        self.check_addresses_differ()
    }

    /// Every listener needs an address of its own. The HTTP, HTTPS and h2c listeners bind
    /// with SO_REUSEPORT: two on one address would both bind and the kernel would spread
    /// connections across them, so a client would get HTTP or TLS at random. A wildcard
    /// address and a specific one on the same port (`0.0.0.0:80` and `127.0.0.1:80`; `[::]`
    /// covers IPv4 too, the sockets being dual-stack) would both bind too, and the kernel
    /// would send the specific address's connections to its listener only: refused as
    /// well, as almost surely a mistake (the wildcard listener would not serve that
    /// address). The API listener binds without SO_REUSEPORT: on an address another
    /// listener covers its bind would fail; refused here with both flags named instead.
    /// Port 0 (any free port) never conflicts, nor do link-local addresses of different
    /// interfaces (`[fe80::1%2]`, `[fe80::1%3]`).
    fn check_addresses_differ(&self) -> Result<(), String> {
        let all: Vec<(&str, SocketAddr)> = self
            .http_addrs
            .iter()
            .map(|a| ("--http-addr", *a))
            .chain(self.https_addrs.iter().map(|a| ("--https-addr", *a)))
            .chain(self.h2c_addrs.iter().map(|a| ("--h2c-addr", *a)))
            .chain(std::iter::once(("--api-addr", self.api_addr)))
            .collect();
        for (i, (flag_a, a)) in all.iter().enumerate() {
            for (flag_b, b) in &all[..i] {
                if addrs_overlap(*a, *b) {
                    return Err(if a == b {
                        format!("{flag_b} {b} and {flag_a} {a} are the same address: each listener needs its own")
                    } else {
                        format!("{flag_b} {b} and {flag_a} {a} overlap (same port, and one address includes the other): each listener needs its own")
                    });
                }
            }
        }
        Ok(())
    }

    /// The default keypair as PEM: `--tls-cert/--tls-key` files, else the `TLSCERT` and
    /// `TLSKEY` environment variables (PEM text, as Flynn's router takes them).
    pub fn default_keypair_pem(&self) -> Result<Option<(String, String)>, String> {
        if let (Some(c), Some(k)) = (&self.tls_cert, &self.tls_key) {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).map_err(|e| format!("reading {}: {e}", p.display()))
            };
            return Ok(Some((read(c)?, read(k)?)));
        }
        match (std::env::var("TLSCERT"), std::env::var("TLSKEY")) {
            (Ok(c), Ok(k)) if !c.trim().is_empty() && !k.trim().is_empty() => Ok(Some((c, k))),
            _ => Ok(None),
        }
    }

    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(flynn_runtime::core_count)
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
}

/// `--events-capacity`: 1 to 65536 changes.
fn parse_events_capacity(s: &str) -> Result<usize, String> {
    parse_bounded(s, 1, 1 << 16)
}

/// `--events-backlog`: 1 to 16 Mi events.
fn parse_events_backlog(s: &str) -> Result<usize, String> {
    parse_bounded(s, 1, 1 << 24)
}

fn parse_bounded(s: &str, min: usize, max: usize) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if n < min || n > max {
        return Err(format!("{n} is not within {min}..={max}"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `/events` limits: hidden, defaulted, bounded.
    #[test]
    fn events_limits() {
        let c = Config::try_parse_from(["flynn-router"]).unwrap();
        assert_eq!(c.events_capacity, crate::api::EVENT_CHANGES);
        assert_eq!(c.events_backlog, crate::api::EVENT_BACKLOG);
        let c = Config::try_parse_from([
            "flynn-router",
            "--events-capacity",
            "4",
            "--events-backlog",
            "100",
        ])
        .unwrap();
        assert_eq!((c.events_capacity, c.events_backlog), (4, 100));
        for bad in [
            ["--events-capacity", "0"],
            ["--events-capacity", "65537"],
            ["--events-backlog", "0"],
            ["--events-backlog", "x"],
        ] {
            let args = std::iter::once("flynn-router").chain(bad);
            assert!(Config::try_parse_from(args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_interface_flags() {
        let c = Config::try_parse_from([
            "flynn-router",
            "--http-addr",
            "127.0.0.1:8080",
            "--api-addr",
            "127.0.0.1:5000",
            "--tcp-ip",
            "127.0.0.1",
            "--tcp-ports",
            "3000-3500",
            "--threads",
            "2",
            "--io-driver",
            "epoll",
        ])
        .unwrap();
        assert_eq!(c.tcp_ports, (3000, 3500));
        assert_eq!(c.threads(), 2);
        assert_eq!(c.io_driver, Driver::Epoll);
        c.validate().unwrap();
    }

    #[test]
    fn proxy_protocol_sources() {
        let c = Config::try_parse_from([
            "r",
            "--proxy-protocol",
            "--proxy-protocol-from",
            "10.0.0.0/8, 192.168.1.7,2001:db8::/32",
        ])
        .unwrap();
        c.validate().unwrap();
        let from = &c.proxy_protocol_from;
        let trusted = |ip: &str| from.iter().any(|n| n.contains(ip.parse().unwrap()));
        assert!(trusted("10.1.2.3"));
        assert!(trusted("::ffff:10.1.2.3"));
        assert!(trusted("192.168.1.7"));
        assert!(!trusted("192.168.1.8"));
        assert!(trusted("2001:db8::9"));
        assert!(!trusted("11.0.0.1"));
        assert!(!trusted("2001:db9::1"));
        let mapped = Config::try_parse_from([
            "r",
            "--proxy-protocol",
            "--proxy-protocol-from",
            "::ffff:10.0.0.0/104",
        ])
        .unwrap();
        assert!(mapped.proxy_protocol_from[0].contains("10.9.9.9".parse().unwrap()));
        assert!(mapped.proxy_protocol_from[0].contains("::ffff:10.9.9.9".parse().unwrap()));
        assert!(!mapped.proxy_protocol_from[0].contains("11.0.0.1".parse().unwrap()));
        let all = Config::try_parse_from([
            "r",
            "--proxy-protocol",
            "--proxy-protocol-from",
            "0.0.0.0/0",
        ])
        .unwrap();
        assert!(all.proxy_protocol_from[0].contains("8.8.8.8".parse().unwrap()));
        for bad in ["10.0.0.0/33", "10.0.0/8", "x", "::/129", "10.0.0.0/"] {
            assert!(
                Config::try_parse_from(["r", "--proxy-protocol", "--proxy-protocol-from", bad])
                    .is_err(),
                "{bad}"
            );
        }
        let c = Config::try_parse_from(["r", "--proxy-protocol-from", "10.0.0.0/8"]).unwrap();
        assert!(c.validate().is_err(), "without --proxy-protocol");
    }

    /// Two listeners on one address would both bind (SO_REUSEPORT) and share its
    /// connections: refused, naming both flags, whichever flags they are and also when a
    /// wildcard address covers a specific one. Distinct ports, distinct specific addresses
    /// and port 0 are fine.
    #[test]
    fn listeners_need_distinct_addresses() {
        let check = |args: &[&str]| {
            let mut v = vec!["r", "--api-addr", "127.0.0.1:5999"];
            v.extend_from_slice(args);
            Config::try_parse_from(v).unwrap().validate()
        };
        let refused = |args: &[&str], flags: (&str, &str)| {
            let e = check(args).expect_err(&format!("{args:?} accepted"));
            assert!(e.contains(flags.0) && e.contains(flags.1), "{args:?}: {e}");
        };
        let h = ("--http-addr", "--https-addr");
        refused(
            &[
                "--http-addr",
                "127.0.0.1:8080",
                "--https-addr",
                "127.0.0.1:8080",
            ],
            h,
        );
        refused(
            &[
                "--http-addr",
                "0.0.0.0:8080",
                "--https-addr",
                "0.0.0.0:8080",
            ],
            h,
        );
        refused(
            &[
                "--http-addr",
                "0.0.0.0:8080",
                "--https-addr",
                "127.0.0.1:8080",
            ],
            h,
        );
        refused(
            &["--https-addr", "0.0.0.0:8443,127.0.0.1:8443"],
            ("--https-addr", "--https-addr"),
        );
        refused(
            &["--https-addr", "127.0.0.1:8443,127.0.0.1:8443"],
            ("--https-addr", "--https-addr"),
        );
        refused(
            &[
                "--http-addr",
                "127.0.0.1:8080",
                "--h2c-addr",
                "0.0.0.0:8080",
            ],
            ("--http-addr", "--h2c-addr"),
        );
        refused(
            &["--http-addr", "127.0.0.1:8080,[::]:8080"],
            ("--http-addr", "--http-addr"),
        );
        refused(
            &[
                "--http-addr",
                "[::ffff:127.0.0.1]:8080",
                "--h2c-addr",
                "127.0.0.1:8080",
            ],
            ("--http-addr", "--h2c-addr"),
        );
        refused(
            &["--http-addr", "0.0.0.0:5999"],
            ("--api-addr", "--http-addr"),
        );

        check(&[
            "--http-addr",
            "127.0.0.1:8080",
            "--https-addr",
            "127.0.0.1:8443",
        ])
        .unwrap();
        check(&["--http-addr", "127.0.0.1:8080,127.0.0.2:8080"]).unwrap();
        check(&[
            "--http-addr",
            "127.0.0.1:8080",
            "--https-addr",
            "[::1]:8080",
        ])
        .unwrap();
        check(&["--http-addr", "0.0.0.0:8080", "--https-addr", "[::1]:8080"]).unwrap();
        // Link-local addresses are per interface: the scope id tells them apart.
        check(&[
            "--http-addr",
            "[fe80::1%2]:8080",
            "--https-addr",
            "[fe80::1%3]:8080",
        ])
        .unwrap();
        refused(
            &[
                "--http-addr",
                "[fe80::1%2]:8080",
                "--https-addr",
                "[fe80::1%2]:8080",
            ],
            h,
        );
        refused(
            &[
                "--http-addr",
                "[::]:8080",
                "--https-addr",
                "[fe80::1%3]:8080",
            ],
            h,
        );
        check(&[
            "--http-addr",
            "127.0.0.1:0,127.0.0.1:0",
            "--https-addr",
            "127.0.0.1:0,127.0.0.1:0",
            "--h2c-addr",
            "127.0.0.1:0",
        ])
        .unwrap();
    }

    #[test]
    fn rejects_bad_values() {
        assert!(Config::try_parse_from(["r", "--tcp-ports", "5-1"]).is_err());
        assert!(Config::try_parse_from(["r", "--io-driver", "kqueue"]).is_err());
        let c = Config::try_parse_from(["r", "--threads", "0"]).unwrap();
        assert!(c.validate().is_err());
    }
}
