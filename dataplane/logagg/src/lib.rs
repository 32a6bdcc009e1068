//! The Flynn log aggregator: syslog ingest, per-app ring buffers, history and follow API
//! (spec §3). Every job's stdout/stderr ends up here; `flynn log -f` reads from here.
//!
//! - Ingest ([`ingest`]): TCP syslog (RFC 6587 framing, RFC 5424 messages, parsed by
//!   `flynn-syslog` without copying) on the `flynn-runtime` thread-per-core workers, one
//!   SO_REUSEPORT listener per core, io_uring or epoll; UDP on one thread. Each line is
//!   copied exactly once, into its app's ring: keeping slices of read buffers would pin a
//!   whole buffer per line of a quiet app.
//! - Store ([`store`]): apps hashed over 64 shards, each shard one `std::sync::Mutex`
//!   held for a single insert or a copy-out. A core never awaits anything while holding
//!   it, shards make two cores rarely meet, and a per-app lock object per message would
//!   cost an `Arc` and a lookup more for no gain at our line rates; a lock-free ring was
//!   rejected because readers need time-sorted history, dedupe and eviction accounting,
//!   all of which are simple under a short lock. Each app keeps its last `N` lines in
//!   insertion order, numbered by a per-app sequence, and the bound drops the
//!   first-arrived line (spec §3.3 says the oldest by time; see [`store::App`]); a global
//!   memory cap evicts from
//!   the largest apps and, when many small apps fill it, takes their last lines too. An
//!   app with no line and no follower is removed (a follow of an unknown channel leaves
//!   nothing behind). Every eviction is counted per app and reason. Memory is counted per
//!   shard and summed on read; inserts check the cap against a shared estimate each
//!   shard updates only in steps of `cap / 2048` bytes (see [`store`]).
//! - Followers are not fed through per-reader queues: a reader remembers the next
//!   sequence number and pulls from the ring when the app's `Notify` fires (an insert
//!   fires it only when a reader caught up since the last time, after the shard lock is
//!   released); a filtered reader that has not reached the newest line keeps pulling (a
//!   bounded scan per shard lock) without waiting, since the wake-up for those lines has
//!   already fired. History and live are stitched at the sequence number read under the
//!   same lock as the registration, so there is no gap and no duplicate, and a reader
//!   that falls more than the ring behind gets a `skipped` marker instead of holding
//!   memory (a reader that stops reading holds the rendered chunks the HTTP server has
//!   queued, two at most, each ≤ 512 lines and ending once past 256 KiB, plus the
//!   socket's send buffer).
//! - API ([`api`]) on its own thread (axum on a current-thread tokio runtime).
//! - Peers ([`peer`]): `/snapshot?follow=true` streams every buffered line then live
//!   lines; a starting aggregator loads each `--peer` before it serves, then follows.
//!
//! Hot files: `ingest.rs`, `store.rs`, `store/earliest.rs`, `store/read.rs`, `line.rs` (and
//! `flynn-syslog`).

pub mod api;
pub mod config;
pub mod ingest;
pub mod line;
mod metrics;
pub mod peer;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use flynn_syslog::Framer;

pub use config::Config;

use crate::ingest::Shared;
use crate::store::{Limits, Store};

/// A started aggregator.
pub struct Running {
    pub syslog_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub drivers: Vec<&'static str>,
}

/// Fails unless no other socket listens on `addr` (a fixed port): the first syslog
/// listener must be the first of its SO_REUSEPORT group, as one bound beside another
/// program's listeners of the same user (a second aggregator on the port) would join their
/// group, and the two would silently share the port's connections (each app's lines split
/// between them). Only a port in use is blamed on another program; any other failure (an
/// address not on this machine, say) is told as it is.
fn syslog_port_free(addr: SocketAddr) -> anyhow::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    flynn_runtime::check_exclusive_bind(addr).map_err(|e| {
        let what = if e.kind() == std::io::ErrorKind::AddrInUse {
            format!("syslog listening on {addr}: another program listens there")
        } else {
            format!("syslog listening on {addr}")
        };
        anyhow::Error::new(e).context(what)
    })
}

/// Loads peers, binds the listeners, starts workers, UDP and the API.
pub fn start(cfg: &Config) -> anyhow::Result<Running> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    syslog_port_free(cfg.syslog_addr)?;
    flynn_runtime::sock::raise_nofile_limit();
    let threads = cfg.threads();
    let store = Arc::new(Store::new(Limits {
        lines_per_app: cfg.lines_per_app,
        max_memory: cfg.max_memory,
    }));
    let mut shared = Shared::new(store, Framer::new(cfg.max_frame), threads);
    shared.stream_keepalive = std::time::Duration::from_secs(cfg.stream_keepalive);
    shared.max_conns = cfg.max_conns;
    let shared = Arc::new(shared);

    // API thread: restore from peers first, then serve once main hands over the listener.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (listener_tx, listener_rx) = tokio::sync::oneshot::channel::<std::net::TcpListener>();
    let sh = shared.clone();
    let peers = cfg.peers.clone();
    std::thread::Builder::new()
        .name("logagg-api".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot build the API runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let mut waits = Vec::new();
                for p in peers {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    tokio::spawn(peer::follow(sh.clone(), p, tx));
                    waits.push(rx);
                }
                let _ = tokio::time::timeout(
                    Duration::from_secs(30),
                    futures_util::future::join_all(waits),
                )
                .await;
                let _ = ready_tx.send(());
                let Ok(l) = listener_rx.await else { return };
                let served = async {
                    use axum::serve::ListenerExt;
                    // Follow streams must not wait for Nagle/delayed-ACK.
                    let l = tokio::net::TcpListener::from_std(l)?.tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    axum::serve(l, api::router(sh)).await
                };
                if let Err(e) = served.await {
                    tracing::error!(error = %e, "API stopped");
                }
            });
        })?;
    ready_rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| anyhow!("API thread failed while loading peers"))?;

    // Syslog listeners: one per core on the same port (checked again, as peers may have
    // taken a while).
    syslog_port_free(cfg.syslog_addr)?;
    let first = flynn_runtime::reuseport_listener(cfg.syslog_addr)
        .with_context(|| format!("syslog listening on {}", cfg.syslog_addr))?;
    let syslog_addr = first.local_addr()?;
    let mut per_core = vec![Some(first)];
    for _ in 1..threads {
        let l = flynn_runtime::reuseport_listener(syslog_addr)
            .with_context(|| format!("listening on {syslog_addr}"))?;
        per_core.push(Some(l));
    }
    if !cfg.no_udp {
        let udp = std::net::UdpSocket::bind(syslog_addr)
            .with_context(|| format!("UDP syslog on {syslog_addr}"))?;
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("logagg-udp".into())
            .spawn(move || {
                // As a worker's: ended alone, UDP lines would be dropped unseen while the
                // aggregator looks healthy.
                flynn_runtime::abort_on_panic();
                ingest::serve_udp(sh, udp)
            })?;
    }
    let api_listener = std::net::TcpListener::bind(cfg.api_addr)
        .with_context(|| format!("API listening on {}", cfg.api_addr))?;
    api_listener.set_nonblocking(true)?;
    let api_addr = api_listener.local_addr()?;

    let listeners = std::sync::Mutex::new(per_core);
    let sh = shared.clone();
    flynn_runtime::spawn_workers(threads, cfg.io_driver, "logagg", move |ctx| {
        let mine = listeners
            .lock()
            .ok()
            .and_then(|mut l| l.get_mut(ctx.index).and_then(Option::take));
        ingest::run(ctx, sh.clone(), mine)
    })
    .context("starting workers")?;
    listener_tx
        .send(api_listener)
        .map_err(|_| anyhow!("API thread stopped"))?;
    for _ in 0..1000 {
        if shared.drivers.iter().all(|d| d.get().is_some()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let drivers = shared
        .drivers
        .iter()
        .map(|d| d.get().copied().unwrap_or("unknown"))
        .collect();
    Ok(Running {
        syslog_addr,
        api_addr,
        drivers,
    })
}
