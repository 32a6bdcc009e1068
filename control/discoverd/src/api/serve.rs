//! The HTTP/1.1 server of the API and Raft RPC port: hyper's connection builder with a
//! timer, so a client that does not finish its request head within
//! `--header-read-timeout` is disconnected (`axum::serve` gives hyper no timer, which
//! leaves that timeout off: a connection that never sends its head was kept for good), and
//! with upgrades, for the Raft replication stream.

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;

use super::MAX_REQUEST_HEAD;

/// Serves `app` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, app: Router, header_read_timeout: Duration) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(MAX_REQUEST_HEAD);
    // Go's net/http: after a failed accept, wait 5 ms, doubling to at most 1 s while
    // accepts keep failing.
    let mut backoff = Duration::ZERO;
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => {
                backoff = Duration::ZERO;
                tcp
            }
            // One connection's failure (reset or aborted before it was accepted): the
            // next one is fine.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of descriptors (or another failure of the listener): back off rather
                // than spin, warning once per run of failures.
                if backoff.is_zero() {
                    tracing::warn!(error = %e, "accept failed; backing off");
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        // Events must not wait for Nagle/delayed-ACK (~40 ms stalls on SSE streams).
        let _ = tcp.set_nodelay(true);
        let conn = http
            .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()))
            .with_upgrades();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "http connection ended");
            }
        });
    }
}

/// An accept error that concerns one connection, not the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionRefused
    )
}
