//! `flynn-router`: see the crate docs of `flynn_router` and README.md.

use clap::Parser;
use flynn_router::Config;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLYNN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = Config::parse();
    let extra = if cfg.demo {
        match flynn_router::demo::setup() {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("flynn-router: demo setup failed: {e:#}");
                std::process::exit(1);
            }
        }
    } else {
        None
    };
    let running = match flynn_router::start(&cfg, extra) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("flynn-router: {e:#}");
            std::process::exit(1);
        }
    };
    let http: Vec<String> = running.http_addrs.iter().map(|a| a.to_string()).collect();
    let https: Vec<String> = running.https_addrs.iter().map(|a| a.to_string()).collect();
    let h2c: Vec<String> = running.h2c_addrs.iter().map(|a| a.to_string()).collect();
    let h2c = if h2c.is_empty() {
        String::new()
    } else {
        format!(" h2c={}", h2c.join(","))
    };
    let https = if https.is_empty() {
        String::new()
    } else {
        format!(" https={}", https.join(","))
    };
    println!(
        "listening http={}{https}{h2c} api={}",
        http.join(","),
        running.api_addr
    );
    tracing::info!(http = %http.join(","), api = %running.api_addr, drivers = ?running.drivers, "router ready");
    if cfg.demo {
        let port = running.http_addrs[0].port();
        println!();
        println!("Demo routes are live. Try:");
        println!("  curl -H 'Host: demo.localhost' http://127.0.0.1:{port}/");
        println!("  curl -H 'Host: demo.localhost' http://127.0.0.1:{port}/api/");
        println!("  curl http://127.0.0.1:{port}/          (catch-all route)");
        println!(
            "  curl http://{}/routes                  (admin API)",
            running.api_addr
        );
        println!("  or open http://demo.localhost:{port}/ in a browser. Ctrl-C stops.");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    wait_for_signal(&running);
}

/// Runs until SIGINT or SIGTERM; SIGHUP reloads the routes file.
fn wait_for_signal(running: &flynn_router::Running) {
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
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).ok();
        let mut hup = signal(SignalKind::hangup()).ok();
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => break,
                _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {
                    match running.reload().await {
                        Ok((set, removed)) => tracing::info!(set, removed, "routes file reloaded"),
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "routes file reload failed"),
                    }
                }
            }
        }
    });
    tracing::info!("shutting down");
}
