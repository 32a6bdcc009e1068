//! `flynn-logagg`: see the crate docs of `flynn_logagg` and README.md.

use clap::Parser;
use flynn_logagg::Config;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLYNN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = Config::parse();
    let running = match flynn_logagg::start(&cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("flynn-logagg: {e:#}");
            std::process::exit(1);
        }
    };
    println!(
        "listening syslog={} api={}",
        running.syslog_addr, running.api_addr
    );
    tracing::info!(syslog = %running.syslog_addr, api = %running.api_addr, drivers = ?running.drivers, "log aggregator ready");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    wait_for_signal();
}

fn wait_for_signal() {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => loop {
            std::thread::park();
        },
    };
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    });
    tracing::info!("shutting down");
}
