//! The Flynn router: a thread-per-core HTTP/1.1 and TCP reverse proxy.
//!
//! Wiring: [`start`] binds one SO_REUSEPORT listener per core per HTTP address,
//! starts the pinned workers (`flynn-runtime`), loads the routes file into the
//! [`store`], publishes the first [`flynn_routes::Table`], and serves the admin API on
//! its own thread. Hot files: `proxy/`, `upgrade.rs`, `balance.rs`, `pool.rs`,
//! `io.rs` (see docs/HOT_PATH.md). The codec lives in `flynn-http`.

mod api;
mod balance;
mod certs;
pub mod config;
pub mod demo;
mod discovery;
mod h2;
mod handover;
mod idle;
mod io;
mod metrics;
mod page;
mod park;
mod pool;
mod proxy;
#[doc(hidden)]
pub mod reload;
mod shared;
mod sticky;
/// Route and backend state behind the admin API (public for the fuzz target).
#[doc(hidden)]
pub mod store;
mod tcp;
pub mod tickets;
mod tls;
mod tunnels;
mod upgrade;
mod worker;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use flynn_api::{BackendAddr, Route};
use serde::Deserialize;

pub use config::Config;

use crate::shared::{Settings, Shared};
use crate::store::{Ports, Store};
use crate::worker::ListenerInfo;

/// The contents of a routes file (JSON, or TOML by extension).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesFile {
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub services: std::collections::BTreeMap<String, Vec<BackendAddr>>,
}

impl RoutesFile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text, path.extension().is_some_and(|e| e == "toml"))
            .with_context(|| format!("parsing {}", path.display()))
    }

    pub fn parse(text: &str, toml: bool) -> anyhow::Result<Self> {
        Ok(if toml {
            toml::from_str(text)?
        } else {
            serde_json::from_str(text)?
        })
    }
}

/// A started router.
pub struct Running {
    pub http_addrs: Vec<SocketAddr>,
    pub https_addrs: Vec<SocketAddr>,
    pub h2c_addrs: Vec<SocketAddr>,
    pub api_addr: SocketAddr,
    pub drivers: Vec<&'static str>,
    api: Arc<api::Api>,
    routes_file: Option<std::path::PathBuf>,
}

impl Running {
    /// Re-reads the routes file (`SIGHUP`) and applies the difference; a bad file
    /// changes nothing and is reported.
    pub async fn reload(&self) -> anyhow::Result<(usize, usize)> {
        let path = self
            .routes_file
            .as_ref()
            .context("no --routes file to reload")?;
        let file = RoutesFile::load(path)?;
        self.api.reload_file(file).await.map_err(anyhow::Error::msg)
    }
}

fn apply_file(store: &mut Store, file: RoutesFile) -> anyhow::Result<()> {
    for (svc, list) in file.services {
        store
            .set_backends(&svc, list)
            .map_err(|e| anyhow::anyhow!("service {svc}: {e}"))?;
    }
    // Root routes before sub-paths (spec §1.4).
    let mut routes = file.routes;
    routes.sort_by(|a, b| {
        (a.domain.to_lowercase(), a.path.len()).cmp(&(b.domain.to_lowercase(), b.path.len()))
    });
    for r in routes {
        let what = if r.domain.is_empty() {
            format!("tcp port {}", r.port)
        } else {
            format!("{}{}", r.domain, r.path)
        };
        store
            .add(r)
            .map_err(|e| anyhow::anyhow!("route {what}: {e}"))?;
    }
    Ok(())
}

/// Starts the router: workers, listeners and the admin API. `extra` is applied after
/// the routes file (used by the demo).
pub fn start(cfg: &Config, extra: Option<RoutesFile>) -> anyhow::Result<Running> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    flynn_runtime::sock::raise_nofile_limit();
    let threads = cfg.threads();

    // HTTP(S) listeners: one per core per address, all on the same port; either bound
    // here or taken over from a running router.
    let mut per_core: Vec<Vec<(std::net::TcpListener, ListenerInfo)>> =
        (0..threads).map(|_| Vec::new()).collect();
    let mut http_addrs = Vec::new();
    let mut https_addrs = Vec::new();
    let mut h2c_addrs = Vec::new();
    let mut handed = None;
    // Listeners a process taking over opens once the takeover is done: (core, address).
    let mut deferred: Vec<(usize, SocketAddr, ListenerInfo)> = Vec::new();
    let mut inherited_tcp = Vec::new();
    let mut handed_tickets: (Vec<String>, Duration) = (Vec::new(), Duration::ZERO);
    let api_listener = if let Some(path) = &cfg.takeover {
        let (state, fds, peer) = handover::take(path)?;
        handed_tickets = (
            state.ticket_keys.clone(),
            Duration::from_secs(state.ticket_key_age_secs),
        );
        let mut fds = fds.into_iter();
        let mut groups: Vec<(handover::ListenerMeta, Vec<std::net::TcpListener>)> = Vec::new();
        for meta in &state.listeners {
            let fd = fds.next().context("missing listener socket")?;
            let l = flynn_runtime::handoff::listener_from_fd(fd)?;
            match groups
                .iter_mut()
                .find(|(m, _)| m.addr == meta.addr && m.tls == meta.tls && m.h2c == meta.h2c)
            {
                Some(g) => g.1.push(l),
                None => groups.push((*meta, vec![l])),
            }
        }
        for (meta, ls) in groups {
            let info = ListenerInfo {
                port: meta.addr.port(),
                route_port: meta.route_port,
                tls: meta.tls,
                h2c: meta.h2c,
            };
            let n = ls.len();
            for (i, l) in ls.into_iter().enumerate() {
                per_core[i % threads].push((l, info));
            }
            // Cores without a handed-over socket get one of their own, but only once the
            // takeover is done: connections the kernel queued on it would be reset if this
            // process gave up.
            for core in n..threads {
                deferred.push((core, meta.addr, info));
            }
            if meta.h2c {
                h2c_addrs.push(meta.addr);
            } else if meta.tls {
                https_addrs.push(meta.addr);
            } else {
                http_addrs.push(meta.addr);
            }
        }
        for port in &state.tcp {
            let fd = fds.next().context("missing TCP route socket")?;
            inherited_tcp.push((*port, flynn_runtime::handoff::listener_from_fd(fd)?));
        }
        let api = std::net::TcpListener::from(fds.next().context("missing API socket")?);
        handed = Some((state, peer));
        api
    } else {
        let all = cfg
            .http_addrs
            .iter()
            .map(|a| (a, false, false))
            .chain(cfg.https_addrs.iter().map(|a| (a, true, false)))
            .chain(cfg.h2c_addrs.iter().map(|a| (a, false, true)));
        for (addr, tls, h2c) in all {
            // The first socket must be the first of its SO_REUSEPORT group: bound beside
            // another program's listeners of the same user (an nginx with `reuseport`, a
            // router started without --takeover) it would join their group, and the two
            // would silently share the port's connections. A takeover gets the running
            // router's sockets instead (handover.rs), never through here. Only a port in
            // use is blamed on another program; any other failure (an address not on this
            // machine, a port below 1024 without the capability) is told as it is.
            if addr.port() != 0 {
                if let Err(e) = flynn_runtime::check_exclusive_bind(*addr) {
                    let what = if e.kind() == std::io::ErrorKind::AddrInUse {
                        format!("listening on {addr}: another program listens there (to replace a running router, start with --takeover)")
                    } else {
                        format!("listening on {addr}")
                    };
                    return Err(anyhow::Error::new(e).context(what));
                }
            }
            let first = flynn_runtime::reuseport_listener(*addr)
                .with_context(|| format!("listening on {addr}"))?;
            let bound = first.local_addr()?;
            let default = if tls {
                https_addrs.is_empty()
            } else {
                http_addrs.is_empty()
            };
            let info = ListenerInfo {
                port: bound.port(),
                route_port: if default || h2c { 0 } else { bound.port() },
                tls,
                h2c,
            };
            per_core[0].push((first, info));
            for core in per_core.iter_mut().skip(1) {
                let l = flynn_runtime::reuseport_listener(bound)
                    .with_context(|| format!("listening on {bound}"))?;
                core.push((l, info));
            }
            if h2c {
                h2c_addrs.push(bound);
            } else if tls {
                https_addrs.push(bound);
            } else {
                http_addrs.push(bound);
            }
        }
        std::net::TcpListener::bind(cfg.api_addr)
            .with_context(|| format!("API listening on {}", cfg.api_addr))?
    };
    if http_addrs.is_empty() {
        bail!("no HTTP listener");
    }
    let mut listener_fds: Vec<_> = per_core
        .iter()
        .flatten()
        .filter_map(|(l, info)| Some((l.as_raw_fd(), *info, l.local_addr().ok()?)))
        .collect();
    api_listener.set_nonblocking(true)?;
    let api_addr = api_listener.local_addr()?;

    let mut default_http = vec![http_addrs[0].port()];
    let mut additional_http: Vec<u16> = http_addrs[1..].iter().map(|a| a.port()).collect();
    let mut additional_tls = Vec::new();
    if let Some((first, rest)) = https_addrs.split_first() {
        default_http.push(first.port());
        additional_tls.extend(rest.iter().map(|a| a.port()));
        additional_http.extend(&additional_tls);
    }
    // h2c listeners serve the default routes too; a TCP route must not share their port.
    default_http.extend(h2c_addrs.iter().map(|a| a.port()));
    let ports = Ports {
        default_http,
        additional_http,
        additional_tls,
        tcp_range: cfg.tcp_ports,
        tcp_ip: Some(cfg.tcp_ip),
    };
    if ports.additional_http.contains(&ports.default_http[0]) {
        bail!("--http-addr ports must differ");
    }
    let cookie_key = match &cfg.cookie_key {
        Some(k) => Some(sticky::parse_key(k).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let page_503 = match (&cfg.error_503_page, &cfg.error_503_page_url) {
        (Some(path), _) => Some(page::read_file(path)?),
        (None, Some(url)) => {
            Some(page::fetch(url).with_context(|| format!("fetching ERROR_503_PAGE_URL {url}"))?)
        }
        (None, None) => None,
    }
    .map(bytes::Bytes::from);
    let mut store = Store::new(ports, cookie_key.is_some());
    let mut file_routes = reload::FileRoutes::default();
    match &handed {
        Some((state, _)) => {
            file_routes = reload::FileRoutes::from_record(state.file.clone());
            for c in &state.certificates {
                store
                    .certs
                    .restore(c.clone())
                    .map_err(|e| anyhow::anyhow!("handed-over certificate {}: {e}", c.id))?;
            }
            for (svc, list) in &state.services {
                store
                    .set_backends(svc, list.clone())
                    .map_err(|e| anyhow::anyhow!("service {svc}: {e}"))?;
            }
            let mut routes = state.routes.clone();
            routes.sort_by_key(|r| (r.domain.to_lowercase(), r.path.len()));
            for r in routes {
                store
                    .restore(r)
                    .map_err(|e| anyhow::anyhow!("handed-over route: {e}"))?;
            }
        }
        None => {
            if let Some(path) = &cfg.routes {
                file_routes
                    .apply(&mut store, RoutesFile::load(path)?)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            }
        }
    }
    if let Some(extra) = extra {
        apply_file(&mut store, extra)?;
    }

    let default_cert = match cfg.default_keypair_pem().map_err(anyhow::Error::msg)? {
        Some((c, k)) => Some(
            tls::parse_keypair(&c, &k)
                .map_err(|e| anyhow::anyhow!("default TLS keypair: {e}"))?
                .key,
        ),
        None => None,
    };
    let certs = Arc::new(flynn_runtime::Published::new(tls::CertStore::new(
        default_cert.clone(),
    )));
    // Ticket keys: from files, else the previous process's (a takeover), else random.
    let tickets = if cfg.tls_ticket_keys.is_empty() {
        let (keys, age) = &handed_tickets;
        tickets::TicketKeys::handed_over(keys, *age).or_else(|e| {
            // Not worth failing the takeover: clients then make full handshakes once.
            tracing::warn!(error = %e, "handed-over TLS ticket keys unusable; new ones");
            tickets::TicketKeys::random()
        })
    } else {
        tickets::TicketKeys::from_files(&cfg.tls_ticket_keys)
    };
    let tickets = Arc::new(tickets.map_err(anyhow::Error::msg)?);
    // One TLS config per route port of the HTTPS listeners (bound here or taken over).
    let tls_ports: Vec<u16> = per_core
        .iter()
        .flatten()
        .filter(|(_, info)| info.tls)
        .map(|(_, info)| info.route_port)
        .collect();
    let tls_config = if tls_ports.is_empty() {
        None
    } else {
        Some(
            tls::acceptors(certs.clone(), tickets.clone(), &tls_ports)
                .map_err(anyhow::Error::msg)?,
        )
    };
    let shared = Arc::new(Shared::new(
        threads,
        Settings {
            tcp_ip: cfg.tcp_ip,
            header_timeout: cfg.header_timeout(),
            idle_timeout: cfg.idle_timeout(),
            response_header_timeout: Duration::from_secs(cfg.response_header_timeout_secs),
            tunnel_timeout: Duration::from_secs(cfg.tunnel_timeout_secs),
            tunnel_fin_timeout: Duration::from_secs(cfg.tunnel_fin_timeout_secs),
            lingering_time: Duration::from_secs(cfg.lingering_time_secs),
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            tickets,
            hot_idle: Duration::from_millis(cfg.hot_idle_ms),
            pool_idle_per_backend: cfg.pool_idle_per_backend,
            max_conns_per_core: cfg.max_conns_per_core,
            proxy_protocol: cfg.proxy_protocol,
            proxy_protocol_from: cfg.proxy_protocol_from.clone(),
            sticky: cookie_key.as_ref().map(sticky::Sealer::new),
            page_503,
            tls: tls_config,
        },
        certs,
        default_cert,
    ));
    shared.inherit_tcp(inherited_tcp);
    store.own_tcp_listeners(shared.tcp_fds.clone());
    let api = Arc::new(api::Api::with_event_limits(
        store,
        shared.clone(),
        file_routes,
        cfg.events_capacity,
        cfg.events_backlog,
    ));
    if let Some((state, _)) = &handed {
        if let Ok(mut d) = api.discovered.lock() {
            d.extend(state.discovered.iter().cloned());
        }
        if let Ok(mut o) = api.owed.lock() {
            o.extend(state.owed.iter().cloned());
        }
    }
    let v = {
        let s = api
            .store
            .lock()
            .map_err(|_| anyhow::anyhow!("store poisoned"))?;
        api.publish(&s)
    };

    let listeners = std::sync::Mutex::new(per_core);
    let sh = shared.clone();
    // A process taking over accepts nothing until the takeover is done (handover.rs).
    let serve = handed.is_none();
    flynn_runtime::spawn_workers(threads, cfg.io_driver, "router", move |ctx| {
        let mine = listeners
            .lock()
            .map(|mut l| std::mem::take(&mut l[ctx.index]))
            .unwrap_or_default();
        worker::run(ctx, sh.clone(), mine, serve)
    })
    .context("starting workers")?;
    if !shared.wait_applied(v, Duration::from_secs(10)) {
        bail!("workers did not apply the initial routes");
    }

    // A takeover is done only once the old process confirmed `ready` (handover.rs): until
    // then this process accepts no connection (the old one does), and serves neither the
    // admin API (a change accepted here would be lost if the takeover failed, the old
    // process going on) nor the upgrade socket's path (the old one's: its socket waits at a
    // temporary name). If the old process refuses, or gives no answer, this one exits
    // having taken nothing; if it went away, this one goes on alone.
    let upgrade = match &cfg.upgrade_socket {
        Some(path) => Some(handover::Upgrade::bind(path, handed.is_some())?),
        None => None,
    };
    // Everything that can fail is made before the takeover is confirmed (a failure after
    // it would leave no router serving: the old one drains): the API's runtime and the
    // threads of the API and the upgrade socket, which wait for the word to start.
    let api2 = api.clone();
    let api_rt = api.runtime()?;
    let discoverd = cfg.discoverd.clone();
    let api_fd = api_listener.as_raw_fd();
    let (api_stop, api_stop_rx) = tokio::sync::watch::channel(false);
    let (api_go, api_gate) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("router-api".into())
        .spawn(move || {
            // No word: the takeover failed and this process exits.
            if api_gate.recv().is_err() {
                return;
            }
            if let Err(e) = api::serve(api2, api_rt, api_listener, discoverd, api_stop_rx) {
                tracing::error!(error = %e, "admin API stopped");
            }
        })
        .context("starting the admin API thread")?;
    let (upgrade_go, upgrade_gate) = std::sync::mpsc::channel();
    if upgrade.is_some() {
        handover::serve(upgrade_gate)?;
    }

    // A takeover is done only once the old process confirmed `ready` (handover.rs): until
    // then this process accepts no connection (the old one does), and serves neither the
    // admin API (a change accepted here would be lost if the takeover failed, the old
    // process going on) nor the upgrade socket's path (the old one's: its socket waits at a
    // temporary name). If the old process refuses, or gives no answer, this one exits
    // having taken nothing; if it went away, this one goes on alone. From here on an error
    // is only logged: this process serves whatever it can.
    if let Some((state, peer)) = handed {
        if handover::ready(peer, state.ready_ack)? == handover::Taken::OldGone {
            tracing::warn!(
                "the running router went away before it confirmed the takeover: serving alone"
            );
        }
        // Each core opens its own sockets (where none was handed over) and starts
        // accepting; the sockets it opened are handed over at the next takeover.
        let mut more: Vec<Vec<(SocketAddr, ListenerInfo)>> =
            (0..threads).map(|_| Vec::new()).collect();
        for (core, addr, info) in deferred {
            more[core].push((addr, info));
        }
        let (opened_tx, opened) = flume::unbounded();
        let mut asked = 0;
        for (slot, more) in shared.cores.iter().zip(more) {
            if slot
                .notify
                .send(shared::CoreMsg::Serve(more, opened_tx.clone()))
                .is_ok()
            {
                asked += 1;
            }
        }
        drop(opened_tx);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for _ in 0..asked {
            match opened.recv_deadline(deadline) {
                Ok(fds) => listener_fds.extend(fds),
                Err(e) => {
                    tracing::error!(error = %e, "a core did not report the sockets it opened: the next takeover may not get them");
                    break;
                }
            }
        }
    }
    let upgrade = upgrade.and_then(|u| match u.install() {
        Ok(bound) => Some(bound),
        // Taken over already: serving matters more than the next upgrade.
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "no upgrade socket: this router cannot be taken over");
            None
        }
    });
    if api_go.send(()).is_err() {
        tracing::error!("the admin API thread is gone: no admin API");
    }
    if let Some((path, listener)) = upgrade {
        let old = handover::Old {
            path,
            api: api.clone(),
            sockets: handover::Sockets {
                listeners: listener_fds,
                api: (api_fd, api_addr),
            },
            api_stop,
            grace: Duration::from_secs(cfg.drain_grace_secs),
            drain_timeout: Duration::from_secs(cfg.drain_timeout_secs),
        };
        if upgrade_go.send((old, listener)).is_err() {
            tracing::error!(
                "the upgrade socket's thread is gone: this router cannot be taken over"
            );
        }
    }
    let drivers = shared
        .cores
        .iter()
        .map(|c| c.driver.get().copied().unwrap_or("unknown"))
        .collect();
    Ok(Running {
        http_addrs,
        https_addrs,
        h2c_addrs,
        api_addr,
        drivers,
        api,
        routes_file: cfg.routes.clone(),
    })
}
