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
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of descriptors (or another transient failure): back off a little
                // rather than spin, as Go's net/http does.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
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
