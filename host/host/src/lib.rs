//! flynn-host: the per-machine daemon that runs Flynn jobs (spec §5).
//!
//! It serves the job API (port 1113), starts each job through a [`runtime::Runtime`]
//! (containers via flynn-container shims, or plain processes), gives it a network
//! namespace and address from flynn-network, the spec's environment (`PORT`, `PORT_n`,
//! `EXTERNAL_IP`, `FLYNN_*`), ships its output to the log aggregator as RFC 5424 over
//! TCP, registers its services in discoverd while it runs, and persists its jobs so a
//! restarted daemon re-adopts the ones still running. Host volumes (directories kept
//! across jobs, bind-mounted at a job's `config.volumes`) are served on the same port. Used by the scheduler and the
//! controller through flynn-client's `host` module.

pub mod api;
pub mod attach;
pub mod config;
pub mod container;
pub mod fastpath;
pub mod host;
pub mod job;
pub mod logdisk;
pub mod logship;
pub mod net;
pub mod runtime;
pub mod store;
pub mod syncer;
pub mod terminal;
pub mod volume_api;
pub mod volumes;
mod worker;
pub mod writeback;

#[cfg(test)]
mod host_tests;

use std::sync::Arc;

use anyhow::Context;

pub use config::Config;

/// The stored host id, or a new random one written to `<state-dir>/host-id` (atomically
/// and durably, before it is used). An empty file, which a crash of a version that wrote it
/// in place could leave, counts as none.
fn host_id(cfg: &Config, sync: &syncer::Syncer) -> anyhow::Result<String> {
    if let Some(id) = &cfg.id {
        return Ok(id.clone());
    }
    let path = cfg.state_dir.join("host-id");
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim().to_string();
        if config::valid_host_id(&s) {
            return Ok(s);
        }
        if !s.is_empty() {
            anyhow::bail!("{} holds an invalid host id {s:?}", path.display());
        }
        tracing::warn!(path = %path.display(), "empty host id file; choosing a new id");
    }
    let id = format!("host{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    sync.write(&path, id.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    sync.flush();
    Ok(id)
}

/// Creates `dir` (and its parents) readable by its owner only, or makes an existing one so
/// (a state directory of an older version): job records and output are not for every local
/// user.
pub(crate) fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Holds `<state-dir>/lock` (`flock`, released when the process ends) for the daemon's
/// life: a second daemon on the same state directory stops here, before it touches
/// anything (it would remove the first one's image unpacks and pooled namespaces as
/// leftovers of a crash). The file is opened close-on-exec, so jobs and shims never hold it.
fn lock_state_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another flynn-host uses --state-dir {} (it holds {})",
            dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// Raises the soft open-files limit to the hard one: every running job holds descriptors
/// here (its shim socket, stdin, attach clients), and a restart that adopts many jobs must
/// not run out (an adoption that fails is taken for a dead shim, and its job is cleaned up).
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-files limit");
            }
        }
    }
}

/// Runs the daemon until SIGINT or SIGTERM. Running jobs are left running: the next
/// daemon re-adopts them.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    private_dir(&cfg.state_dir).with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let _lock = lock_state_dir(&cfg.state_dir)?;
    raise_nofile_limit();
    let sync = syncer::Syncer::start();
    let id = host_id(&cfg, &sync)?;
    let tags = cfg.tag_map().map_err(anyhow::Error::msg)?;
    let store = store::Store::open(&cfg.state_dir, sync.clone())?;
    let volume_dir = cfg
        .volume_dir
        .clone()
        .unwrap_or_else(|| cfg.state_dir.join("volumes"));
    let vols = volumes::Volumes::open(&volume_dir, &id, sync.clone())?;
    let rt: Arc<dyn runtime::Runtime> = match cfg.runtime {
        config::RuntimeKind::Process => Arc::new(runtime::ProcessRuntime),
        config::RuntimeKind::Container => {
            let images = cfg
                .image_dir
                .clone()
                .unwrap_or_else(|| cfg.state_dir.join("images"));
            Arc::new(container::ContainerRuntime::open(
                &cfg.state_dir.join("containers"),
                &images,
                &cfg.cgroup_parent,
            )?)
        }
    };
    let own_networks = rt.isolates_network() && !cfg.no_network;
    let setup = own_networks.then(|| net::Setup {
        state_dir: cfg.state_dir.clone(),
        bridge: cfg.bridge_name.clone(),
        mtu: cfg.mtu,
        sync: sync.clone(),
        pool_size: cfg.netns_pool,
        fast_path: Some(fastpath::Config {
            pin_dir: cfg.bpf_pin_dir.clone(),
            attach: cfg.fast_path == "auto",
        }),
        boot_id: net::boot_id(),
    });
    let mut net_resolvers = Vec::new();
    let mut net_job_id = String::new();
    let mut net_before_reboot = false;
    let network = match &setup {
        None => None,
        // What the agent sent before: applied now, so restored and new jobs need not wait
        // for its next notification.
        Some(setup) if cfg.network_from_agent => match setup.open_saved().await? {
            Some((n, saved)) => {
                net_resolvers = saved.resolvers;
                net_job_id = saved.job_id;
                net_before_reboot = saved.rebooted;
                Some(n)
            }
            None => None,
        },
        Some(setup) => {
            let block = cfg
                .block
                .parse()
                .map_err(|e| anyhow::anyhow!("--block {:?}: {e}", cfg.block))?;
            Some(setup.open(block, cfg.mtu).await?)
        }
    };
    let net_setup = setup.filter(|_| cfg.network_from_agent);
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .with_context(|| format!("listening on {}", cfg.addr))?;
    let addr = listener.local_addr()?;
    if cfg.logagg.is_empty() {
        tracing::warn!("no --logagg: job output is not shipped anywhere");
    } else if cfg.logagg_api.is_empty() {
        // Spec §3.5's resume needs the aggregator's `/cursors`, on its API port, which
        // cannot be told from the syslog address.
        tracing::warn!(
            logagg = ?cfg.logagg,
            "no --logagg-api: resuming from the log aggregators' cursors (spec §3.5) is off; \
             an aggregator restarted empty does not get this host's earlier lines again, \
             only those in flight or dropped from the buffer are resent"
        );
    }
    let disk = if cfg.log_disk_bytes > 0 && !cfg.logagg.is_empty() {
        let dir = cfg.state_dir.join("logs");
        match logdisk::DiskLog::open(&dir, cfg.log_disk_bytes) {
            Ok(log) => Some(std::sync::Arc::new(log)),
            // Best effort: without it, shipping works as before (recent lines resent).
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot open the host's log on disk; lines are not kept there");
                None
            }
        }
    } else {
        None
    };
    let apis = cfg
        .logagg_api
        .iter()
        .map(|a| {
            if a.contains("://") {
                a.clone()
            } else {
                format!("http://{a}")
            }
        })
        .collect();
    let log_disk = disk.clone();
    let capacity = logship::Capacity {
        lines: cfg.log_buffer,
        bytes: cfg.log_buffer_bytes,
    };
    let logs = logship::Shipper::start_with(&id, cfg.logagg.clone(), apis, capacity, disk);
    // `--discoverd`, else what discoverd announced to a previous daemon.
    let discoverd = match &cfg.discoverd {
        Some(url) => Some(flynn_api::host::DiscoverdNotify {
            url: url.clone(),
            ..Default::default()
        }),
        None => host::Host::load_discoverd(&cfg.state_dir),
    };
    let host = host::Host::new(host::Options {
        id: id.clone(),
        runtime: rt,
        store,
        logs,
        discoverd,
        network,
        net_setup,
        net_resolvers,
        net_job_id,
        net_before_reboot,
        external_ip: cfg.external_ip,
        tags,
        resolvers: cfg.resolvers.clone(),
        state_dir: cfg.state_dir.clone(),
        max_starting: cfg.max_job_concurrency,
        volumes: vols,
        fault_exit_before_teardown: cfg.fault_exit_before_teardown,
        fault_slow_output: std::time::Duration::from_millis(cfg.fault_slow_output_ms),
        attach_limits: cfg.attach_limits(),
    });
    host.set_url(format!("http://{addr}"));
    host.restore().await;
    if !cfg.no_spare_shim {
        host.warm();
    }
    if let Some(n) = host.network() {
        n.fill_pool();
    }
    let h = host.clone();
    tokio::spawn(async move { h.register_host().await });
    let app = api::router(host.clone());
    println!("listening api={addr}");
    tracing::info!(%addr, host_id = %id, "flynn-host started");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listener = axum::serve::ListenerExt::tap_io(listener, api_keepalive);
    // With each connection's peer address (attach bounds waiting clients per address).
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = stop_rx.await;
    });
    tokio::select! {
        r = server => r.context("serving the job API")?,
        _ = async {
            shutdown_signal().await;
            tracing::info!("shutting down; jobs keep running");
            host.shutdown();
            let _ = stop_tx.send(());
            // Event streams never end on their own: give requests a moment, then go.
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        } => {}
    }
    if let Some(n) = host.network() {
        n.drain_pool().await;
    }
    if !host.flush_records().await {
        tracing::error!(
            "some job states could not be saved; the next daemon finds them as last saved"
        );
    }
    // Whatever the last changes were, on disk before the daemon goes: the state files, and
    // the job output the log's writer thread has not written yet (the next daemon resends
    // it from there).
    if let Some(d) = log_disk {
        tokio::task::spawn_blocking(move || d.sync()).await.ok();
    }
    tokio::task::spawn_blocking(move || sync.flush()).await.ok();
    Ok(())
}

/// How long an API connection may leave data unacknowledged (or its receive window
/// closed) before the kernel drops it: as long as the keepalive below takes to drop a quiet
/// one (60 s + 6 × 10 s), so both ways of going away are seen within about two minutes.
pub const API_USER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The user timeout of an attach connection whose client holds its job's output up (the
/// only client of a `disable_log` job): the kernel also fires `TCP_USER_TIMEOUT` (Linux 5.12
/// on) when the peer's receive window stays closed that long, so [`API_USER_TIMEOUT`] would
/// cut a live client that merely stopped reading for two minutes (`flynn run ... | less`
/// left on a page, a terminal paused with Ctrl-S, a client stopped with Ctrl-Z), where Flynn
/// waits for it. The trade-off: a client that vanished (no FIN) while output to it was
/// unacknowledged holds its job up for this long rather than two minutes (a quiet one is
/// still dropped by keepalive within about two minutes, as keepalive probes are answered
/// by a live peer whatever its window), and a stop no longer waits for it at all.
pub const BLOCKING_USER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Gives an attach connection whose client holds its job's output up
/// [`BLOCKING_USER_TIMEOUT`] instead of [`API_USER_TIMEOUT`].
pub(crate) fn holds_job_up(sock: &socket2::Socket) {
    if let Err(e) = sock.set_tcp_user_timeout(Some(BLOCKING_USER_TIMEOUT)) {
        tracing::debug!(error = %e, "setting TCP_USER_TIMEOUT on an attach connection");
    }
}

/// TCP keepalive and `TCP_USER_TIMEOUT` on every API connection, so one whose client's
/// machine went away without a FIN (powered off, cut off) fails within about two minutes,
/// and what it held is freed (an attach client's place among a job's
/// [`attach::MAX_CLIENTS`], the one client of a `disable_log` job whose output waits for it,
/// an event stream) instead of being held until the job next writes, or for ever.
/// Keepalive alone covers a quiet connection only: while data is outstanding (output sent
/// to a client that vanished) the kernel retransmits instead, for about 15 minutes, unless
/// the user timeout cuts that short. The user timeout also drops a client that stays
/// connected but reads nothing for that long (its receive window closed), as a vanished
/// one; so the one client of a `disable_log` job, which may pause for as long as it likes
/// (as under Flynn), gets [`BLOCKING_USER_TIMEOUT`] instead once attached (see
/// [`holds_job_up`]).
fn api_keepalive(conn: &mut tokio::net::TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(60))
        .with_interval(std::time::Duration::from_secs(10))
        .with_retries(6);
    let sock = socket2::SockRef::from(&*conn);
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "setting TCP keepalive on an API connection");
    }
    if let Err(e) = sock.set_tcp_user_timeout(Some(API_USER_TIMEOUT)) {
        tracing::debug!(error = %e, "setting TCP_USER_TIMEOUT on an API connection");
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &std::path::Path) -> Config {
        use clap::Parser;
        Config::try_parse_from(["flynn-host", "--state-dir", dir.to_str().unwrap()]).unwrap()
    }

    /// API connections get TCP keepalive and a user timeout: keepalive alone does not drop
    /// a connection to a client that vanished while output to it was unacknowledged (the
    /// kernel retransmits for about 15 minutes), which held the one client of a
    /// `disable_log` job, and so the job, that long.
    #[tokio::test]
    async fn api_connections_get_keepalive_and_a_user_timeout() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        api_keepalive(&mut s);
        let sock = socket2::SockRef::from(&s);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(API_USER_TIMEOUT));
    }

    #[test]
    fn host_id_is_written_once_through_the_syncer_and_an_empty_file_is_replaced() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("host-id");
        let sync = syncer::Syncer::start();
        let id = host_id(&cfg(d.path()), &sync).unwrap();
        assert!(config::valid_host_id(&id), "{id:?}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), id);
        // Temp file, fsync, rename: the write that a crash cannot leave empty.
        assert_eq!(sync.written(), vec![path.clone()]);
        assert_eq!(host_id(&cfg(d.path()), &sync).unwrap(), id);

        // What a crash of an older version could leave: a new id instead of a daemon that
        // refuses to start.
        for empty in ["", "\n"] {
            std::fs::write(&path, empty).unwrap();
            let again = host_id(&cfg(d.path()), &sync).unwrap();
            assert!(config::valid_host_id(&again), "{again:?}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), again);
        }
        // Anything else that is not an id is still refused.
        std::fs::write(&path, "not/an id").unwrap();
        assert!(host_id(&cfg(d.path()), &sync).is_err());
    }
}
