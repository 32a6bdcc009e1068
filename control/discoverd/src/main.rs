//! `flynn-discoverd`: see the crate docs of `flynn_discoverd`.

use clap::Parser;
use flynn_discoverd::Config;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLYNN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = Config::parse();
    if let Err(e) = cfg.validate() {
        eprintln!("flynn-discoverd: {e}");
        std::process::exit(2);
    }
    raise_nofile_limit();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flynn-discoverd: runtime: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(async {
        let running = match flynn_discoverd::start(&cfg).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("flynn-discoverd: {e:#}");
                std::process::exit(1);
            }
        };
        match running.dns {
            Some(dns) => println!(
                "listening http={} host={} dns={dns}",
                running.addr, running.node.host
            ),
            None => println!("listening http={} host={}", running.addr, running.node.host),
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutting down");
        let _ = running.node.raft.shutdown().await;
    });
}

/// Raises the soft open-files limit to the hard one, as Go programs (Flynn's discoverd
/// among them) do at startup: every watch, API and Raft connection and every forwarded DNS
/// query holds a descriptor, and running out breaks the listener and the Raft log writer.
/// The same as `flynn-host`'s.
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
