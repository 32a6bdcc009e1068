//! Hot path: the client's stream, plain TCP or TLS ([`Client`]): how a connection idles
//! between requests, the hot read of its next request, the watch for the client leaving
//! and the close.

use super::*;

/// How long a response may take before the proxy starts watching for the client
/// leaving (499); keeps the common fast response free of an extra poll.
const CLIENT_WATCH_GRACE: Duration = Duration::from_millis(20);
/// Linux `ECANCELED` (what a cancelled io_uring operation completes with).
const ECANCELED: i32 = 125;
/// How long a clean TLS close waits to hand its close_notify to a client that is not
/// reading.
const CLOSE_NOTIFY_WAIT: Duration = Duration::from_secs(1);

/// What a [`Client::hot_read`] got.
pub enum HotRead {
    /// Bytes of the next request are in the buffer.
    Data,
    /// The client closed the connection (or it failed).
    Closed,
    /// Nothing within the window (or the stream does not do hot reads): idle as usual.
    Cold,
}

/// What an idle wait ended with.
pub enum Idle {
    /// A request may have arrived.
    Ready,
    /// The connection is over (expired, closed, error).
    Closed,
    /// Idle long enough to park; carries the sweep second it went idle.
    Park(u32),
}

/// A client-side stream: plain TCP or TLS.
pub trait Client: AsyncReadRent + AsyncWriteRent + Split + 'static {
    /// `X-Forwarded-Proto`.
    const PROTO: &'static str;
    /// Whether a keep-alive connection waits for its next request inside the read (TLS:
    /// see [`Client::idle`]) rather than in the core's idle sweep, which a drain closes.
    const IDLES_IN_READ: bool = false;
    /// Waits, while idle between requests, until a request may have arrived. Plain TCP
    /// waits for readability without holding any buffer (registered with the core's idle
    /// sweep; `first`: no request yet, so the header timeout applies, from the second of
    /// the sweep's clock the connection started at); TLS may already hold decrypted bytes,
    /// so it returns at once and the next read waits instead.
    async fn idle(&self, core: &Core, fd: RawFd, first: Option<u32>) -> Idle;
    /// Ends a connection whose last response is complete: TLS sends its close_notify
    /// (bounded by [`CLOSE_NOTIFY_WAIT`]); plain TCP has nothing to send before the close.
    async fn close(&mut self) {}
    /// A duplicate of the socket to park the connection with (plain TCP only).
    fn park_fd(&self, fd: RawFd) -> Option<std::os::fd::OwnedFd>;
    /// Resolves when the client has closed its side (`fd` is the client socket): plain TCP
    /// peeks for EOF; TLS, whose close_notify is data, watches for the peer's FIN.
    async fn gone(&self, fd: RawFd);
    /// Right after a keep-alive response: reads the next request's first bytes into `buf`
    /// (empty, with capacity) if they arrive within `window`. Never loses bytes: a read
    /// cut short by the window is cancelled and then awaited, so data that raced the
    /// cancel is kept. `canceller` is the connection's own, reused from request to request
    /// (a new one costs an allocation; only a cancel replaces it).
    async fn hot_read(
        &mut self,
        buf: Vec<u8>,
        window: Duration,
        canceller: &mut Canceller,
    ) -> (HotRead, Vec<u8>);
}

impl Client for TcpStream {
    const PROTO: &'static str = "http";

    async fn idle(&self, core: &Core, fd: RawFd, first: Option<u32>) -> Idle {
        let ticket = core.idle.enter(fd, first);
        monoio::select! {
            ready = self.readable(false) => {
                if core.idle.leave(ticket) && ready.is_ok() {
                    Idle::Ready
                } else {
                    Idle::Closed
                }
            }
            _ = core.idle.park_requested(ticket) => {
                let since = core.idle.since(ticket);
                if core.idle.leave(ticket) {
                    Idle::Park(since)
                } else {
                    Idle::Closed
                }
            }
        }
    }

    fn park_fd(&self, fd: RawFd) -> Option<std::os::fd::OwnedFd> {
        flynn_runtime::handoff::dup(fd).ok()
    }

    async fn gone(&self, _fd: RawFd) {
        client_gone_after(self, CLIENT_WATCH_GRACE).await
    }

    async fn hot_read(
        &mut self,
        buf: Vec<u8>,
        window: Duration,
        canceller: &mut Canceller,
    ) -> (HotRead, Vec<u8>) {
        use monoio::io::CancelableAsyncReadRent;
        let read = self.cancelable_read(buf, canceller.handle());
        let mut read = std::pin::pin!(read);
        let (res, buf) = monoio::select! {
            r = &mut read => r,
            _ = monoio::time::sleep(window) => {
                // `cancel` consumes it and hands back a fresh one for the next request.
                *canceller = std::mem::take(canceller).cancel();
                read.await
            }
        };
        let r = match res {
            Ok(0) => HotRead::Closed,
            Ok(_) => HotRead::Data,
            // ECANCELED: the window closed first.
            Err(e) if e.raw_os_error() == Some(ECANCELED) => HotRead::Cold,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => HotRead::Cold,
            Err(_) => HotRead::Closed,
        };
        (r, buf)
    }
}

impl Client for monoio_rustls::ServerTlsStream<TcpStream> {
    const PROTO: &'static str = "https";
    const IDLES_IN_READ: bool = true;

    async fn idle(&self, _core: &Core, _fd: RawFd, _first: Option<u32>) -> Idle {
        Idle::Ready
    }

    async fn close(&mut self) {
        let _ = monoio::time::timeout(CLOSE_NOTIFY_WAIT, self.shutdown()).await;
    }

    fn park_fd(&self, _fd: RawFd) -> Option<std::os::fd::OwnedFd> {
        None
    }

    async fn gone(&self, fd: RawFd) {
        crate::io::peer_shut_after(fd, CLIENT_WATCH_GRACE).await
    }

    async fn hot_read(
        &mut self,
        buf: Vec<u8>,
        _window: Duration,
        _canceller: &mut Canceller,
    ) -> (HotRead, Vec<u8>) {
        // rustls may already hold decrypted bytes; the head read waits instead.
        (HotRead::Cold, buf)
    }
}
