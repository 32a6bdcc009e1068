//! Raw socket helpers that std and monoio do not offer.

use std::os::fd::RawFd;

/// What a non-blocking peek at an idle connection found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek {
    /// Nothing to read and still open: safe to reuse.
    Idle,
    /// The peer closed (EOF) or the socket has an error.
    Closed,
    /// Unexpected bytes are waiting (e.g. a stray response): not safe to reuse.
    Data,
}

/// Checks an idle pooled connection without consuming anything.
pub fn peek(fd: RawFd) -> Peek {
    let mut b = [0u8; 1];
    // SAFETY: `b` is a valid writable buffer of length 1 for the duration of the call;
    // recv with MSG_PEEK|MSG_DONTWAIT never blocks and never consumes data.
    let n = unsafe {
        libc::recv(
            fd,
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Peek::Closed,
        n if n > 0 => Peek::Data,
        _ => {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => Peek::Idle,
                _ => Peek::Closed,
            }
        }
    }
}

/// Whether the peer of connected socket `fd` has shut its sending side (FIN), reset it, or
/// the socket has an error, even with unread bytes still queued before that: a
/// non-blocking `poll` for `POLLRDHUP`.
pub fn peer_shut(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call; a zero timeout never
    // blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// Shuts a socket down in both directions. On a listening socket (Linux) this takes it
/// out of LISTEN at once, while it stays open: any pending accept or poll wakes, queued
/// connections not yet accepted are reset and new ones refused, and the port no longer
/// counts for [`crate::check_exclusive_bind`].
pub fn shutdown(fd: RawFd) {
    // SAFETY: shutdown on a file descriptor has no memory-safety preconditions; an
    // invalid fd just returns EBADF, which we ignore.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

/// Aborts a connection that failed (a tunnel side whose read failed): resets it now
/// (data still queued is dropped). `connect(AF_UNSPEC)` is TCP's ABORT (RFC 793):
/// it sends the reset, fails pending reads and writes with ECONNRESET (waking them) and
/// leaves nothing for a later shutdown or close to send (no FIN after the reset). Should
/// the kernel refuse it, SO_LINGER {on, 0} makes the close reset the connection, and the
/// receive side is shut down to wake a pending read.
pub fn abort(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` and `unspec` are valid values of the sizes passed; setsockopt,
    // connect and shutdown have no other memory-safety preconditions (a bad fd returns
    // EBADF, ignored).
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
        let mut unspec: libc::sockaddr = std::mem::zeroed();
        unspec.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        let r = libc::connect(
            fd,
            &unspec,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        );
        if r != 0 {
            libc::shutdown(fd, libc::SHUT_RD);
        }
    }
}

/// Shuts down the write side only (propagates a half-close to the peer).
pub fn shutdown_write(fd: RawFd) {
    // SAFETY: as in `shutdown`.
    unsafe {
        libc::shutdown(fd, libc::SHUT_WR);
    }
}

/// Raises RLIMIT_NOFILE to its hard limit (proxies hold two fds per connection).
pub fn raise_nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit struct for getrlimit/setrlimit to read and write.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
    r.rlim_cur
}

/// Copies up to `buf.len()` waiting bytes without consuming them (non-blocking):
/// `Ok(0)` at EOF, `WouldBlock` when nothing is waiting yet.
pub fn peek_into(fd: RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n >= 0 {
        Ok(n as usize)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether the peer has shut down its sending side (`POLLRDHUP`), even with bytes still
/// waiting to be read.
pub fn peer_closed(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Sets `SO_RCVLOWAT`: readiness (poll, epoll, io_uring poll) is reported only once at
/// least `n` bytes are waiting, so a peeker can wait for more than it has already seen.
pub fn set_rcvlowat(fd: RawFd, n: usize) -> std::io::Result<()> {
    let v = n.clamp(1, i32::MAX as usize) as libc::c_int;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `&v`, a live local.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Turns on TCP keepalive for a long-lived connection (a TCP route, an upgraded tunnel, a
/// syslog sender): idle 60 s, then a probe every 15 s, given up after 4 unanswered (about
/// two minutes). A peer that vanished without a FIN (a NAT that forgot the flow, a host that
/// lost power) is then noticed instead of holding the connection, and its backend's, for
/// good. One call per connection, never per request.
pub fn set_keepalive(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: the caller's `fd` is an open socket for the duration of this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let ka = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(60))
        .with_interval(std::time::Duration::from_secs(15))
        .with_retries(4);
    socket2::SockRef::from(&fd).set_tcp_keepalive(&ka)
}

/// Takes what is waiting to be read on `fd` and drops it, without waiting: one
/// non-blocking read after another until none is waiting, the peer's FIN (or an error)
/// is reached, or 16 MiB were taken from a peer that keeps sending. Returns how many
/// bytes. A socket closed with nothing left unread closes gracefully: the kernel still
/// delivers what was queued to send, then a FIN (closed over unread bytes, it resets the
/// connection and drops that).
pub fn discard_input(fd: RawFd) -> usize {
    const MAX: usize = 16 << 20;
    let mut scratch = [0u8; 16 * 1024];
    let mut taken = 0;
    while taken < MAX {
        // SAFETY: `scratch` is valid for writes of its length for the duration of the call.
        let got = unsafe {
            libc::recv(
                fd,
                scratch.as_mut_ptr().cast(),
                scratch.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if got <= 0 {
            break;
        }
        taken += got as usize;
    }
    taken
}

/// Bytes written to connected socket `fd` that its peer has not acknowledged yet
/// (`SIOCOUTQ`: unsent ones and those in flight).
pub fn unacked(fd: RawFd) -> std::io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one c_int to the pointer, a live local.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    if r == 0 {
        Ok(n.max(0) as usize)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reads and drops exactly `n` bytes that are known to be waiting (after a peek).
pub fn discard(fd: RawFd, n: usize) -> Option<()> {
    let mut left = n;
    let mut scratch = [0u8; 256];
    while left > 0 {
        let want = left.min(scratch.len());
        // SAFETY: `scratch` is valid for writes of `want` bytes.
        let got = unsafe { libc::recv(fd, scratch.as_mut_ptr().cast(), want, libc::MSG_DONTWAIT) };
        if got <= 0 {
            return None;
        }
        left -= got as usize;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    /// An aborted connection's peer reads a reset, not a FIN, also once the aborting side
    /// shuts its sending side down and closes (as a dropped write half does); a read
    /// waiting on the aborted side fails.
    #[test]
    fn abort_resets_without_a_fin() {
        use std::io::Read;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut waiting = c.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut b = [0u8; 8];
            waiting.read(&mut b).map_err(|e| e.kind())
        });
        std::thread::sleep(Duration::from_millis(50));
        super::abort(c.as_raw_fd());
        // A blocking reader (this one) gets EPIPE, a non-blocking one ECONNRESET.
        assert!(reader.join().unwrap().is_err());
        super::shutdown_write(c.as_raw_fd());
        drop(c);
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 8];
        assert_eq!(
            s.read(&mut b).map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset)
        );
    }

    /// A socket whose unread input was discarded closes with a FIN: what it had queued to
    /// send arrives in full, then EOF, though it was closed before its peer read any of it.
    /// (Closed over unread bytes, the peer would get a reset instead, and maybe not all of
    /// the data.)
    #[test]
    fn discarding_unread_input_lets_a_close_deliver_what_was_queued() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(&[7u8; 3000]).unwrap();
        s.write_all(&[1u8; 30_000]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(super::discard_input(s.as_raw_fd()), 3000);
        assert_eq!(super::discard_input(s.as_raw_fd()), 0, "nothing waiting");
        super::shutdown(s.as_raw_fd());
        drop(s);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 30_000);
    }

    #[test]
    fn unacked_bytes_are_counted_until_the_peer_acknowledges_them() {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, _) = l.accept().unwrap();
        assert_eq!(super::unacked(c.as_raw_fd()).unwrap(), 0);
        c.write_all(b"hello").unwrap();
        let start = std::time::Instant::now();
        while super::unacked(c.as_raw_fd()).unwrap() > 0 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "never acknowledged"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn keepalive_is_on_with_our_timers() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let s = socket2::SockRef::from(&c);
        assert!(!s.keepalive().unwrap());
        super::set_keepalive(c.as_raw_fd()).unwrap();
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(60));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(15));
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 4);
    }
}
