//! Serving the API: its listener (`TCP_NODELAY`, counted connections) and what a handover
//! does to it (no more accepts, `Connection: close`, a bounded wait for open connections).

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::Response;

use super::{router, Api};

/// Serves the API on `listener` until the process exits (call on a dedicated thread).
/// `rt` is [`Api::runtime`]'s.
pub fn serve(
    api: Arc<Api>,
    rt: tokio::runtime::Runtime,
    listener: std::net::TcpListener,
    discoverd: Option<String>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    rt.block_on(async move {
        if let Some(url) = discoverd {
            tokio::spawn(crate::discovery::run(api.clone(), url));
        }
        // Set at a handover: every answer then says `Connection: close`, so keep-alive
        // clients move to the new process.
        let handed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let api2 = api.clone();
        let app = router(api).layer(axum::middleware::from_fn_with_state(
            handed.clone(),
            close_after_handover,
        ));
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let listener = UntilHandover {
            inner: Some(tokio::net::TcpListener::from_std(listener)?),
            stop: Some(stop.clone()),
            open: open.clone(),
        };
        let mut server = Box::pin(axum::serve(listener, app).into_future());
        // Both ends of `stop` are dropped on return: the handover thread takes that as the
        // end of this API.
        tokio::select! {
            r = &mut server => return r,
            stopped = stop.wait_for(|s| *s) => {
                if stopped.is_err() {
                    // No handover configured: serve for good.
                    return server.await;
                }
            }
        }
        // Handed over: this process stops accepting (the listener closes its descriptor; the
        // new process has its own) but answers what its accepted connections send. Closing
        // them at once (a graceful shutdown does) would reset one whose request had arrived
        // unread. First a second for such requests, answered with `Connection: close`; then a
        // graceful shutdown ends the idle connections and lets responses under way finish,
        // for at most `API_FINISH`.
        handed.store(true, std::sync::atomic::Ordering::SeqCst);
        let start = tokio::time::Instant::now();
        tokio::select! {
            r = &mut server => return r,
            _ = tokio::time::sleep(API_SETTLE) => {}
        }
        drop(server);
        // `/events` streams never end by themselves: they are cut when this returns (their
        // clients reconnect, to the new process).
        let busy = || {
            open.load(std::sync::atomic::Ordering::SeqCst)
                > api2.sse_streams.load(std::sync::atomic::Ordering::SeqCst)
        };
        while busy() && start.elapsed() < API_FINISH {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(stop);
        Ok(())
    })
}

/// After a handover: how long requests on already accepted connections may take to arrive,
/// and the most this process waits for its connections to end.
const API_SETTLE: Duration = Duration::from_secs(1);
const API_FINISH: Duration = Duration::from_secs(3);

/// Adds `Connection: close` to every answer once the API was handed over.
async fn close_after_handover(
    State(handed): State<Arc<std::sync::atomic::AtomicBool>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut r = next.run(req).await;
    if handed.load(std::sync::atomic::Ordering::SeqCst) {
        r.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    r
}

/// An accepted API connection, counted in `open` until it is dropped.
struct Counted {
    inner: tokio::net::TcpStream,
    open: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The API's listener: accepts (with `TCP_NODELAY`: SSE events must not wait for Nagle and
/// delayed ACKs) until a handover, then closes its descriptor (the new process has its own)
/// and accepts nothing more.
struct UntilHandover {
    inner: Option<tokio::net::TcpListener>,
    /// `None` once it can no longer fire (no handover configured).
    stop: Option<tokio::sync::watch::Receiver<bool>>,
    /// Accepted connections not closed yet.
    open: Arc<std::sync::atomic::AtomicUsize>,
}

impl axum::serve::Listener for UntilHandover {
    type Io = Counted;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Some(l) = &self.inner else {
                return std::future::pending().await;
            };
            let stopped = async {
                match &mut self.stop {
                    Some(s) => s.wait_for(|v| *v).await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = l.accept() => match r {
                    Ok((s, a)) => {
                        let _ = s.set_nodelay(true);
                        self.open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let s = Counted {
                            inner: s,
                            open: self.open.clone(),
                        };
                        return (s, a);
                    }
                    // As axum's own listener: a connection gone before it was accepted is
                    // nothing; anything else (out of descriptors) is retried after a pause.
                    Err(e) if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused
                            | std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                    ) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "admin API accept failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
                handed = stopped => {
                    if handed {
                        self.inner = None;
                    } else {
                        self.stop = None;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        match &self.inner {
            Some(l) => l.local_addr(),
            None => Err(std::io::Error::other("handed over")),
        }
    }
}
