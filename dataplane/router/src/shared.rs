//! State shared between the control thread (admin API) and the cores. The cores only
//! ever read it: routes arrive as whole [`Table`] snapshots, announced per core.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use flynn_routes::Table;
use flynn_runtime::Published;

use crate::metrics::CoreMetrics;

/// The TCP route listening sockets of every core, by port ([`Shared::tcp_fds`]).
pub type TcpFds = std::sync::Arc<Mutex<BTreeMap<u16, Vec<RawFd>>>>;

/// Settings every core reads (fixed at start).
pub struct Settings {
    pub tcp_ip: IpAddr,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// A backend's whole response head (1xx included) must arrive within this.
    pub response_header_timeout: Duration,
    /// TCP route and upgraded connections are closed after this long without a byte either
    /// way (zero: never).
    pub tunnel_timeout: Duration,
    /// ... or this long once one side has finished sending (zero: only `tunnel_timeout`).
    pub tunnel_fin_timeout: Duration,
    /// How long a connection closed after an answer given before its request body was
    /// read may go on discarding that body (zero: closed at once).
    pub lingering_time: Duration,
    /// How long a dial to a backend may take.
    pub connect_timeout: Duration,
    /// Hot wait for the next request on a keep-alive connection (zero: off).
    pub hot_idle: Duration,
    pub pool_idle_per_backend: usize,
    pub max_conns_per_core: usize,
    pub proxy_protocol: bool,
    /// Where PROXY prefixes are taken from (empty: anyone).
    pub proxy_protocol_from: Vec<crate::config::Cidr>,
    /// Seals and opens `_backend` cookies (None: no COOKIE_KEY, sticky routes refused).
    pub sticky: Option<crate::sticky::Sealer>,
    /// Body of the router's own 503 responses (HTML), if configured: one copy, shared by
    /// every HTTP/2 stream that sends it.
    pub page_503: Option<bytes::Bytes>,
    /// TLS session-ticket keys (exported in a takeover).
    pub tickets: std::sync::Arc<crate::tickets::TicketKeys>,
    /// TLS acceptors shared by all cores, one per TLS route port (None: no HTTPS listeners).
    pub tls: Option<crate::tls::Acceptors>,
}

impl Settings {
    /// Whether a connection from `peer` is read for a PROXY prefix.
    pub fn proxy_protocol_for(&self, peer: IpAddr) -> bool {
        self.proxy_protocol
            && (self.proxy_protocol_from.is_empty()
                || self.proxy_protocol_from.iter().any(|n| n.contains(peer)))
    }
}

/// What the control thread asks of a core.
pub enum CoreMsg {
    /// A new table was published.
    Table,
    /// Report how many requests are in flight to this backend on this core.
    Inflight(std::net::SocketAddr, flume::Sender<u32>),
    /// Stop accepting and drain: idle connections are closed after the grace period.
    Drain(std::time::Duration),
    /// Start accepting (a process taking over, once the takeover is done): on the
    /// listeners the core was started with, on sockets of its own it opens now at these
    /// addresses (SO_REUSEPORT, beside the handed-over ones), and on the TCP route
    /// listeners. The core replies with the sockets it opened (descriptor, listener,
    /// bound address), for the next takeover.
    Serve(
        Vec<(std::net::SocketAddr, crate::worker::ListenerInfo)>,
        flume::Sender<
            Vec<(
                std::os::fd::RawFd,
                crate::worker::ListenerInfo,
                std::net::SocketAddr,
            )>,
        >,
    ),
}

/// One core's mailbox and counters.
pub struct CoreSlot {
    pub metrics: CoreMetrics,
    /// Version of the last table this core applied (routes and TCP listeners).
    pub applied: AtomicU64,
    pub notify: flume::Sender<CoreMsg>,
    pub inbox: Mutex<Option<flume::Receiver<CoreMsg>>>,
    pub driver: OnceLock<&'static str>,
}

pub struct Shared {
    pub table: Published<Table>,
    /// SNI certificates, published before the table they belong to.
    pub certs: std::sync::Arc<Published<crate::tls::CertStore>>,
    /// The default keypair, if any.
    pub default_cert: Option<std::sync::Arc<rustls::sign::CertifiedKey>>,
    pub cores: Vec<CoreSlot>,
    pub settings: Settings,
    /// Every core's TCP route listening sockets by port, for a handover (and for the
    /// store: a port held by these is this router's own, see [`crate::store::Store`]).
    /// Touched only when a listener opens or closes (and by the handover and route
    /// changes), never per connection.
    pub tcp_fds: TcpFds,
    /// TCP route listeners taken over from the previous process, per core: each core
    /// adopts its share on its first table and binds its own only for ports it lacks.
    pub inherited_tcp: Mutex<Vec<Vec<(u16, std::net::TcpListener)>>>,
}

impl Shared {
    pub fn new(
        cores: usize,
        settings: Settings,
        certs: std::sync::Arc<Published<crate::tls::CertStore>>,
        default_cert: Option<std::sync::Arc<rustls::sign::CertifiedKey>>,
    ) -> Self {
        let cores: Vec<CoreSlot> = (0..cores)
            .map(|_| {
                let (tx, rx) = flume::unbounded();
                CoreSlot {
                    metrics: CoreMetrics::default(),
                    applied: AtomicU64::new(0),
                    notify: tx,
                    inbox: Mutex::new(Some(rx)),
                    driver: OnceLock::new(),
                }
            })
            .collect();
        Shared {
            table: Published::new(Table::default()),
            certs,
            default_cert,
            inherited_tcp: Mutex::new((0..cores.len()).map(|_| Vec::new()).collect()),
            cores,
            settings,
            tcp_fds: Default::default(),
        }
    }

    /// Publishes a table and tells every core to pick it up.
    pub fn publish(&self, table: Table) -> u64 {
        let v = table.version();
        self.table.publish(table);
        for c in &self.cores {
            let _ = c.notify.send(CoreMsg::Table);
        }
        v
    }

    /// True once every core has applied version `v` (or a later one).
    pub fn applied(&self, v: u64) -> bool {
        self.cores
            .iter()
            .all(|c| c.applied.load(Ordering::Acquire) >= v)
    }

    /// Client connections (HTTP and TCP routes) open on all cores.
    pub fn open_connections(&self) -> u64 {
        self.cores
            .iter()
            .map(|c| {
                c.metrics.connections_active.load(Ordering::Relaxed)
                    + c.metrics.tcp_connections_active.load(Ordering::Relaxed)
            })
            .sum()
    }

    /// Hands the taken-over TCP route listeners to the cores, spread evenly.
    pub fn inherit_tcp(&self, listeners: Vec<(u16, std::net::TcpListener)>) {
        let mut per_core = self.inherited_tcp.lock().unwrap_or_else(|p| p.into_inner());
        let n = per_core.len().max(1);
        let mut seen: BTreeMap<u16, usize> = BTreeMap::new();
        for (port, l) in listeners {
            let i = seen.entry(port).or_default();
            per_core[*i % n].push((port, l));
            *i += 1;
        }
    }

    /// Duplicates of every TCP route listening socket, with their ports, taken under
    /// the registry lock so none can close meanwhile.
    pub fn dup_tcp_listeners(&self) -> std::io::Result<Vec<(u16, std::os::fd::OwnedFd)>> {
        let fds = self.tcp_fds.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (port, list) in fds.iter() {
            for fd in list {
                // Registered fds stay open while they are in the registry (cores
                // unregister before closing), and the registry lock is held.
                out.push((*port, flynn_runtime::handoff::dup(*fd)?));
            }
        }
        Ok(out)
    }

    /// Requests in flight to `addr`, summed over all cores (asks each core).
    pub async fn inflight(&self, addr: std::net::SocketAddr) -> u32 {
        let (tx, rx) = flume::bounded(self.cores.len());
        let mut asked = 0;
        for c in &self.cores {
            if c.notify.send(CoreMsg::Inflight(addr, tx.clone())).is_ok() {
                asked += 1;
            }
        }
        drop(tx);
        let mut total = 0;
        for _ in 0..asked {
            match rx.recv_async().await {
                Ok(n) => total += n,
                Err(_) => break,
            }
        }
        total
    }

    /// Blocks (control threads only) until every core applied `v`, up to `limit`.
    pub fn wait_applied(&self, v: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.applied(v) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }
}
