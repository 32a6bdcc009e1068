//! `flynn-network`: the per-host overlay agent. Leases this host's block from discoverd, sets up
//! the VXLAN device and job bridge, keeps every peer's entries in the kernel (and the eBPF fast
//! path's prefix map) and releases the lease on SIGTERM/SIGINT (kept while jobs may hold
//! addresses in the block, by `--job-ips`: also when that file is missing).
//!
//! Prints `ready subnet=<block> gateway=<addr> mtu=<mtu> mac=<vtep mac> fast_path=<on|off>` on
//! stdout once set up. Serves `GET /ping` (flannel's), `/.well-known/status` and `/metrics`
//! (Prometheus text, including the fast path's packet counters) on `--http-addr`.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use flynn_client::discoverd::Client;
use flynn_ebpf::FastPath;
use flynn_network::{
    config_json, error_chain, fast_path_off, layout_from_config, Agent, AgentConfig, DeviceConfig,
    DiscoverdStore, KernelNetlink, Layout, LeaseConfig, Stats, Subnet, ABANDON_TIMEOUT,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FastPathMode {
    /// On when the kernel supports it and it loads and attaches; otherwise a warning and the
    /// kernel path only.
    Auto,
    /// Required: fail when unsupported.
    On,
    Off,
}

/// The Flynn overlay network agent.
#[derive(Debug, Parser)]
#[command(name = "flynn-network", version)]
struct Config {
    /// discoverd URL.
    #[arg(long, env = "DISCOVERD", default_value = "http://127.0.0.1:1111")]
    discoverd: String,
    /// This host's underlay address (must be on a local interface).
    #[arg(long, env = "FLYNN_PUBLIC_IP")]
    public_ip: Ipv4Addr,
    /// Cluster network, used when discoverd holds no config yet (the stored one wins).
    #[arg(long, env = "FLYNN_NETWORK", default_value = "100.100.0.0/16")]
    network: Subnet,
    /// Block size per host (default: /24, or network prefix + 1 for small networks).
    #[arg(long, env = "FLYNN_SUBNET_LEN")]
    subnet_len: Option<u8>,
    /// Plain routes to peers on this host's L2 segment instead of VXLAN.
    #[arg(long, env = "FLYNN_DIRECT_ROUTING")]
    direct_routing: bool,
    /// Where subnet.env is written.
    #[arg(long, env = "FLYNN_STATE_DIR", default_value = "/run/flynn-network")]
    state_dir: PathBuf,
    #[arg(long, env = "FLYNN_FAST_PATH", value_enum, default_value = "auto")]
    fast_path: FastPathMode,
    /// bpffs directory for the fast path's pinned maps and links.
    #[arg(long, env = "FLYNN_PIN_DIR", default_value = flynn_ebpf::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    #[arg(long, env = "FLYNN_VXLAN_NAME", default_value = "flynn.1")]
    vxlan_name: String,
    #[arg(long, env = "FLYNN_BRIDGE", default_value = "flynnbr0")]
    bridge: String,
    #[arg(long, env = "FLYNN_VNI", default_value_t = 1)]
    vni: u32,
    #[arg(long, env = "FLYNN_VXLAN_PORT", default_value_t = 8472)]
    vxlan_port: u16,
    /// Full reconcile interval.
    #[arg(long, env = "FLYNN_RESYNC_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    resync_interval: Duration,
    /// HTTP endpoint: `/ping`, `/.well-known/status`, `/metrics`.
    #[arg(long, env = "FLYNN_HTTP_ADDR", default_value = "0.0.0.0:5001")]
    http_addr: SocketAddr,
    /// The host daemon to tell its block once the overlay is up (`POST /host/network`,
    /// flannel's notify), e.g. `http://10.0.0.1:1113`.
    #[arg(long, env = "FLYNN_NOTIFY")]
    notify: Option<String>,
    /// Where the host's upstream nameservers are read from for the notification.
    #[arg(long, env = "FLYNN_RESOLV_CONF", default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// Lease lifetime; renewed an hour (or a tenth of it, if shorter) before expiry.
    #[arg(long, env = "FLYNN_LEASE_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// Masquerade jobs' traffic to addresses outside the cluster network (so jobs reach the
    /// internet); `false` removes the rules. Traffic between jobs is never translated.
    #[arg(long, env = "FLYNN_IP_MASQ", default_value_t = true, action = clap::ArgAction::Set)]
    ip_masq: bool,
    /// The host daemon's job address allocator file, `<flynn-host --state-dir>/job-ips.json`
    /// (set it when flynn-host's state directory is not the default): a clean shutdown
    /// releases the lease only when this file exists and no job holds an address of the block
    /// in it (flynn-host's pooled namespaces no job took do not count). A missing or
    /// unreadable file keeps the lease, as after a crash: the next agent renews it, or it
    /// expires after its TTL.
    #[arg(
        long,
        env = "FLYNN_JOB_IPS",
        default_value = "/var/lib/flynn-host/job-ips.json"
    )]
    job_ips: PathBuf,
}

impl Config {
    fn validate(&self) -> Result<()> {
        if self.vni == 0 || self.vni >= 1 << 24 {
            bail!("--vni must be between 1 and 16777215");
        }
        if self.resync_interval < Duration::from_millis(100) {
            bail!("--resync-interval must be at least 100ms");
        }
        if self.lease_ttl < Duration::from_secs(2) {
            bail!("--lease-ttl must be at least 2s");
        }
        for name in [&self.vxlan_name, &self.bridge] {
            if name.is_empty() || name.len() > 15 {
                bail!("interface name {name:?} must be 1 to 15 characters");
            }
        }
        Layout::with_defaults(self.network, self.subnet_len).context("--network/--subnet-len")?;
        if let Some(n) = &self.notify {
            if flynn_client::http_base(n).is_none() {
                bail!("--notify {n:?}: expected an http:// URL");
            }
        }
        Ok(())
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLYNN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = Config::parse();
    if let Err(e) = cfg.validate() {
        eprintln!("flynn-network: invalid configuration: {e:#}");
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(cfg)) {
        eprintln!("flynn-network: {e:#}");
        std::process::exit(1);
    }
}

/// What the HTTP endpoint reports.
#[derive(Clone, Default)]
struct Status {
    stats: Arc<Mutex<Option<Arc<Stats>>>>,
    subnet: Arc<Mutex<Option<String>>>,
}

async fn serve(listener: tokio::net::TcpListener, status: Status) {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;
    let st = status.clone();
    let health = move || {
        let st = st.clone();
        async move {
            let stats = st.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let subnet = st.subnet.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let healthy = stats
                .as_ref()
                .is_some_and(|s| s.synced.load(Ordering::Relaxed));
            let peers = stats.as_ref().map(|s| s.peers.load(Ordering::Relaxed));
            let mut detail = serde_json::json!({"subnet": subnet, "peers": peers});
            // Blocks the fast path's maps refused: the kernel path carries them, so they
            // are reported without making the host unhealthy.
            if let Some((n, first)) = stats.as_ref().map(|s| s.unmapped(16)) {
                if n > 0 {
                    let first: Vec<String> = first.iter().map(ToString::to_string).collect();
                    detail["fast_path_unmapped"] = serde_json::json!({"count": n, "first": first});
                }
            }
            let body = serde_json::json!({"data": {
                "status": if healthy { "healthy" } else { "unhealthy" },
                "version": env!("CARGO_PKG_VERSION"),
                "detail": detail,
            }});
            let code = if healthy {
                StatusCode::OK
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            let text = serde_json::to_string_pretty(&body).unwrap_or_default() + "\n";
            (code, [(header::CONTENT_TYPE, "application/json")], text).into_response()
        }
    };
    let st = status.clone();
    let metrics = move || {
        let st = st.clone();
        async move {
            let stats = st.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let text = stats.map(|s| s.prometheus()).unwrap_or_default();
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
        }
    };
    let app = axum::Router::new()
        .route("/ping", get(|| async { "OK\n" }))
        .route("/.well-known/status", get(health))
        .route("/metrics", get(metrics));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "HTTP endpoint stopped");
    }
}

/// Completes on SIGTERM or SIGINT. The handlers are installed by this call, not when the
/// future is first polled: a signal from then on is kept until it is awaited.
fn shutdown_signal() -> Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// `work`, or `None` when `shutdown` completes first.
async fn unless<T>(
    shutdown: &mut (impl Future<Output = ()> + Unpin),
    work: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        _ = shutdown => None,
        r = work => Some(r),
    }
}

/// Reads (or first writes) the cluster's network config; discoverd may still be electing a
/// leader, so this retries for a while.
async fn init_config(
    store: &DiscoverdStore,
    wanted: &Layout,
    cfg: &Config,
) -> Result<serde_json::Value> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match store
            .init(config_json(wanted, cfg.vni, cfg.vxlan_port))
            .await
        {
            Ok(c) => return Ok(c),
            Err(e) if attempt < 60 => {
                tracing::warn!(error = %e, attempt, "discoverd not ready");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).context("writing the network config to discoverd"),
        }
    }
}

/// Tries of [`Agent::start`] before the agent gives up (and releases a lease it created), a
/// second apart: the underlay device may not be up yet.
const START_TRIES: u32 = 30;

/// [`Agent::start_retrying`]: [`START_TRIES`] tries, a lease they created released when all fail.
async fn start(agent: &mut Agent<DiscoverdStore>) -> Result<flynn_network::Started> {
    agent
        .start_retrying(START_TRIES, Duration::from_secs(1))
        .await
        .map_err(|e| anyhow::Error::new(e).context("starting the agent"))
}

async fn run(mut cfg: Config) -> Result<()> {
    // First: start-up can take half a minute of retries, and a SIGTERM meanwhile must still
    // release what was leased (without a handler it killed the agent, and the lease stayed
    // live for its TTL).
    let mut shutdown = Box::pin(shutdown_signal()?);
    let listener = tokio::net::TcpListener::bind(cfg.http_addr)
        .await
        .with_context(|| format!("binding the HTTP endpoint {}", cfg.http_addr))?;
    let status = Status::default();
    tokio::spawn(serve(listener, status.clone()));
    // Records expired for longer than a lease TTL (at least a day) are dropped on write.
    let store = DiscoverdStore::new(Client::new(&cfg.discoverd)).prune_after(cfg.lease_ttl);
    let wanted = Layout::with_defaults(cfg.network, cfg.subnet_len)?;
    let Some(stored) = unless(&mut shutdown, init_config(&store, &wanted, &cfg)).await else {
        tracing::info!("shutting down before the network config was read; nothing leased");
        return Ok(());
    };
    let stored = stored?;
    let layout = layout_from_config(&stored)?;
    if layout != wanted {
        tracing::info!(network = %layout.network, "using the cluster's stored network config");
    }
    // The VXLAN parameters must match across the cluster: the stored config wins over flags.
    let backend = &stored["Backend"];
    if let Some(t) = backend["Type"].as_str() {
        if t != "vxlan" {
            tracing::warn!(
                backend = t,
                "stored backend type is not vxlan; using vxlan anyway"
            );
        }
    }
    if let Some(vni) = backend["VNI"].as_u64().and_then(|v| u32::try_from(v).ok()) {
        if vni != 0 && vni != cfg.vni {
            tracing::info!(vni, "using the cluster's VNI");
            cfg.vni = vni;
        }
    }
    if let Some(port) = backend["Port"].as_u64().and_then(|p| u16::try_from(p).ok()) {
        // 0 means the kernel's default, 8472.
        let port = if port == 0 { 8472 } else { port };
        if port != cfg.vxlan_port {
            tracing::info!(port, "using the cluster's VXLAN port");
            cfg.vxlan_port = port;
        }
    }

    let fast = match cfg.fast_path {
        FastPathMode::Off => {
            // A previous agent may have left its device programs attached and its entries in
            // the pinned maps (they outlive it by design): take them off so the kernel path
            // carries the overlay alone.
            fast_path_off(&cfg.pin_dir);
            None
        }
        FastPathMode::Auto if !FastPath::supported() => {
            tracing::info!("eBPF fast path not supported here; kernel path only");
            fast_path_off(&cfg.pin_dir);
            None
        }
        FastPathMode::Auto => match FastPath::load(&cfg.pin_dir) {
            Ok(fp) => Some(fp),
            Err(e) => {
                tracing::warn!(
                    error = %error_chain(&e),
                    pin_dir = %cfg.pin_dir.display(),
                    "cannot load the eBPF fast path; kernel path only"
                );
                fast_path_off(&cfg.pin_dir);
                None
            }
        },
        FastPathMode::On => {
            Some(FastPath::load(&cfg.pin_dir).context("loading the eBPF fast path")?)
        }
    };
    let nl = KernelNetlink::connect()?;
    let ttl = cfg.lease_ttl;
    let agent_cfg = AgentConfig {
        public_ip: cfg.public_ip,
        devices: DeviceConfig {
            vxlan_name: cfg.vxlan_name.clone(),
            bridge_name: cfg.bridge.clone(),
            vni: cfg.vni,
            port: cfg.vxlan_port,
        },
        lease: LeaseConfig {
            layout,
            ttl,
            renew_margin: Duration::from_secs(3600).min(ttl / 10),
            ..LeaseConfig::default()
        },
        direct_routing: cfg.direct_routing,
        resync: cfg.resync_interval,
        state_dir: Some(cfg.state_dir.clone()),
        fast_path_required: cfg.fast_path == FastPathMode::On,
        ip_masq: cfg.ip_masq,
        job_ips: Some(cfg.job_ips.clone()),
    };
    let mut agent = Agent::new(store, nl, agent_cfg, fast);
    *status.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(agent.stats());
    let Some(started) = unless(&mut shutdown, start(&mut agent)).await else {
        return match tokio::time::timeout(ABANDON_TIMEOUT, agent.abandon_start()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!(error_chain(&e)))
                .context("releasing the lease at a shutdown during start-up"),
            Err(_) => bail!(
                "releasing the lease at a shutdown during start-up: no answer in {ABANDON_TIMEOUT:?}"
            ),
        };
    };
    let started = started?;
    println!(
        "ready subnet={} gateway={} mtu={} mac={} fast_path={}",
        started.lease.subnet,
        started.lease.subnet.first_host(),
        started.devices.mtu,
        started.lease.vtep_mac,
        if started.fast_path { "on" } else { "off" }
    );
    *status.subnet.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(started.lease.subnet.to_string());
    tracing::info!(subnet = %started.lease.subnet, mtu = started.devices.mtu, "overlay up");
    if let Some(url) = &cfg.notify {
        // Sent now and again whenever the overlay MTU changes.
        let base = flynn_client::http_base(url).context("--notify")?;
        tokio::spawn(flynn_network::notify::follow_mtu(
            base,
            std::env::var("FLYNN_JOB_ID").unwrap_or_default(),
            started.lease.subnet,
            cfg.resolv_conf.clone(),
            agent.mtu(),
        ));
    }

    agent
        .run(shutdown)
        .await
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))
}
