//! Hot path: small owned-buffer I/O helpers over monoio's rent-style API.

use std::io;
use std::os::fd::AsRawFd;

use flynn_runtime::sock::{peek, Peek};
use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

/// Spare room kept at the end of a read buffer before each read.
const READ_CHUNK: usize = 16 * 1024;

/// Reads once, appending to `buf` (growing it by at most `READ_CHUNK` when full).
pub async fn read_append<R: AsyncReadRent>(
    r: &mut R,
    mut buf: Vec<u8>,
) -> (io::Result<usize>, Vec<u8>) {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_CHUNK);
    }
    let len = buf.len();
    let cap = buf.capacity();
    let (res, slice) = r.read(buf.slice_mut(len..cap)).await;
    (res, slice.into_inner())
}

/// Writes `buf[range]` completely.
pub async fn write_range<W: AsyncWriteRentExt>(
    w: &mut W,
    buf: Vec<u8>,
    start: usize,
    end: usize,
) -> (io::Result<()>, Vec<u8>) {
    if start == end {
        return (Ok(()), buf);
    }
    let (res, slice) = w.write_all(buf.slice(start..end)).await;
    (res.map(|_| ()), slice.into_inner())
}

/// Like [`client_gone`], but only starts watching after `grace`: fast responses never
/// pay for the extra poll.
pub async fn client_gone_after(c: &TcpStream, grace: std::time::Duration) {
    monoio::time::sleep(grace).await;
    client_gone(c).await
}

/// Resolves when the client has closed its side (EOF or error). Pipelined bytes do not
/// count: if data is waiting, this never resolves.
pub async fn client_gone(c: &TcpStream) {
    loop {
        if c.readable(false).await.is_err() {
            return;
        }
        match peek(c.as_raw_fd()) {
            Peek::Closed => return,
            Peek::Data => std::future::pending::<()>().await,
            Peek::Idle => {}
        }
    }
}

/// Resolves once the peer of `fd` has shut its sending side (FIN, reset or error),
/// whatever unread bytes precede that: a TLS client's close_notify is an encrypted record
/// no peek can tell from a pipelined request, but the FIN after it is plain. Starts after
/// `grace` (fast responses pay nothing), then checks with one non-blocking `poll` at
/// intervals growing from 50 ms to 1 s while the wait lasts.
pub async fn peer_shut_after(fd: std::os::fd::RawFd, grace: std::time::Duration) {
    monoio::time::sleep(grace).await;
    let mut every = std::time::Duration::from_millis(50);
    loop {
        if flynn_runtime::sock::peer_shut(fd) {
            return;
        }
        monoio::time::sleep(every).await;
        every = (every * 2).min(std::time::Duration::from_secs(1));
    }
}

/// Copies bytes from `r` (side `from` of `tunnel`) to `w` until EOF, then half-closes
/// `w`; reads count as the tunnel's activity. A read error (a reset; a TLS end without
/// close_notify is an EOF here) ends the whole tunnel instead, keeping what was already
/// relayed the other way: the failed side is aborted, and this pipe ends the other one,
/// the survivor, through `w` with a lingering close ([`crate::tunnels::Tunnel::read_failed`],
/// [`crate::tunnels::Tunnel::end_survivor`]), while the survivor's pipe reads and drops
/// what it still sends (as it does after a write to the failed side failed, while the
/// other direction still relays that side's last bytes). The halves are lent, so the
/// caller closes the sockets itself, after [`crate::tunnels::Tunnel::finish`].
pub async fn pipe<R: AsyncReadRent, W: AsyncWriteRentExt + monoio::io::AsyncWriteRent>(
    mut r: R,
    mut w: W,
    mut buf: Vec<u8>,
    tunnel: &crate::tunnels::Tunnel<'_>,
    from: usize,
) -> io::Result<u64> {
    let to = 1 - from;
    let res = relay(&mut r, &mut w, &mut buf, tunnel, from).await;
    match &res {
        Err(e) if e.kind() != io::ErrorKind::UnexpectedEof && tunnel.failed() => {
            tunnel.end_survivor(to, &mut w).await;
        }
        _ if tunnel.survives(to) => tunnel.end_survivor(to, &mut w).await,
        _ => {
            tunnel.half_closed();
            let _ = w.shutdown().await;
        }
    }
    tunnel.direction_done();
    res
}

/// [`pipe`]'s loop: `Ok` at EOF (or when the relay is over), `Err` after a read error
/// (reported to the tunnel) or a write error with nothing left to drop input for.
async fn relay<R: AsyncReadRent, W: AsyncWriteRentExt + monoio::io::AsyncWriteRent>(
    r: &mut R,
    w: &mut W,
    buf: &mut Vec<u8>,
    tunnel: &crate::tunnels::Tunnel<'_>,
    from: usize,
) -> io::Result<u64> {
    let mut total = 0u64;
    // Set once `w`'s side is gone: what `r` still sends is read and dropped.
    let mut dropping = false;
    let mut budget = flynn_runtime::fair::Budget::default();
    loop {
        buf.clear();
        let (res, b) = read_append(r, std::mem::take(buf)).await;
        *buf = b;
        let n = match res {
            Ok(n) if n > 0 => n,
            Err(e) if e.kind() != io::ErrorKind::UnexpectedEof => {
                tunnel.read_failed(from);
                return Err(e);
            }
            _ => return Ok(total),
        };
        tunnel.touch();
        total += n as u64;
        // On the epoll driver a stream that never lets up never makes this loop wait: every
        // 1 MiB the core's other tasks (its table updates among them) get their turn.
        if budget.spend(n) {
            flynn_runtime::fair::yield_now().await;
        }
        if dropping || tunnel.failed() {
            // Only the other direction can end this one now: once it is over (the
            // survivor was shut down, or it ended without a failure), so is this.
            if !tunnel.other_running() {
                return Ok(total);
            }
            continue;
        }
        let (res, b) = write_range(w, std::mem::take(buf), 0, n).await;
        *buf = b;
        if let Err(e) = res {
            // The other side reset. Its own pipe may still be relaying what it sent
            // before that (aborting it now would drop that) and then ends this side: keep
            // reading and dropping meanwhile, so a peer still sending is never reset
            // over unread input. With that pipe done there is nothing to wait for.
            if !tunnel.other_running() {
                return Err(e);
            }
            dropping = true;
        }
    }
}

/// Keeps unused buffers' growth in check: a buffer that grew for one large head goes
/// back to its normal size.
pub fn compact(buf: &mut Vec<u8>, consumed: usize, normal: usize) {
    if consumed > 0 {
        buf.drain(..consumed);
    }
    if buf.capacity() > 4 * normal && buf.len() <= normal {
        buf.shrink_to(normal);
    }
}

#[allow(dead_code)]
fn _assert_bounds<T: IoBufMut>() {}
