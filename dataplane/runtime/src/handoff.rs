//! Passing listening sockets between processes (zero-downtime upgrades): a message and
//! file descriptors over a Unix stream socket (SCM_RIGHTS), and a non-blocking accept
//! for accept loops that must be able to stop without losing a connection.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Most descriptors one `sendmsg` carries (the kernel's `SCM_MAX_FD` is 253). More go in
/// continuation messages (see [`send_with_fds`]).
pub const MAX_FDS: usize = 250;

/// Most descriptors one handoff carries in all: a router with thousands of TCP routes on
/// several cores hands over one listener per route per core.
pub const MAX_TOTAL_FDS: usize = 1 << 16;

/// Most data one message carries. A router's handed-over state holds every route (with
/// certificate chains and keys) and every backend: a few hundred bytes each, so a 64 KiB cap
/// ended zero-downtime upgrades at about 85 apps.
pub const MAX_DATA: usize = 64 << 20;

/// Set in the length word when more than [`MAX_FDS`] descriptors follow in continuation
/// messages. Lengths never reach this bit (`MAX_DATA` is far below it), and up to
/// `MAX_FDS` descriptors go exactly as they always did, so a router hands over to, and
/// takes over from, a build that predates continuations.
const MORE_FDS: u32 = 1 << 31;

/// Sends `data` (at most [`MAX_DATA`]) with `fds` attached, as one length-prefixed message
/// (the descriptors go with its first bytes). Past [`MAX_FDS`] descriptors the message
/// starts `len | MORE_FDS`, then the count of further descriptors (u32 LE), both with the
/// first `MAX_FDS`; one-byte messages carry the rest, `MAX_FDS` at a time; the data
/// follows.
pub fn send_with_fds(sock: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_TOTAL_FDS || data.len() > MAX_DATA {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors or too much data",
        ));
    }
    use std::io::Write;
    let mut s = sock;
    if fds.len() <= MAX_FDS {
        let mut payload = (data.len() as u32).to_le_bytes().to_vec();
        payload.extend_from_slice(data);
        let n = sendmsg_fds(sock, &payload, fds)?;
        // The descriptors went with the first bytes; send the rest plainly.
        return s.write_all(&payload[n..]);
    }
    let (first, rest) = fds.split_at(MAX_FDS);
    let mut head = (data.len() as u32 | MORE_FDS).to_le_bytes().to_vec();
    head.extend_from_slice(&(rest.len() as u32).to_le_bytes());
    let n = sendmsg_fds(sock, &head, first)?;
    s.write_all(&head[n..])?;
    for chunk in rest.chunks(MAX_FDS) {
        if sendmsg_fds(sock, &[0], chunk)? != 1 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "handoff: short send",
            ));
        }
    }
    s.write_all(data)
}

/// One `sendmsg` of (a prefix of) `payload` with `fds` attached; returns the bytes sent.
fn sendmsg_fds(sock: &UnixStream, payload: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let space = cmsg_space(fds.len());
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut _,
        iov_len: payload.len(),
    };
    // SAFETY: msghdr is plain data; every pointer in it refers to live buffers
    // (`iov`, `payload`, `control`) that outlive the sendmsg call, and the CMSG_* macros
    // stay within `control`, which is CMSG_SPACE-sized for `fds.len()` descriptors.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                fds.len(),
            );
        }
        let n = libc::sendmsg(sock.as_raw_fd(), &msg, 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

fn cmsg_space(n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    // SAFETY: CMSG_SPACE is a pure size computation.
    unsafe { libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// One `recvmsg` into `buf`; the descriptors that came with it are appended to `fds`.
/// Returns the bytes read (0 at end of stream).
fn recvmsg_fds(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let space = cmsg_space(MAX_FDS);
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as in `sendmsg_fds`; received descriptors are taken into `OwnedFd`s
    // exactly once, straight from the kernel's SCM_RIGHTS payload.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // Descriptors the kernel could not install (our open-file limit) are dropped.
        let truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = bytes / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if truncated {
            return Err(io::Error::other(
                "handoff: descriptors were dropped (open-file limit reached?)",
            ));
        }
        Ok(n as usize)
    }
}

fn eof(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, format!("handoff: {what}"))
}

/// Receives one message sent by [`send_with_fds`]: its data and the descriptors.
pub fn recv_with_fds(sock: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    use std::io::Read;
    let mut s = sock;
    let mut first = vec![0u8; 64 * 1024 + 4];
    let mut fds = Vec::new();
    let mut n = recvmsg_fds(sock, &mut first, &mut fds)?;
    // The length word can arrive split; its bytes carry no further descriptors.
    while n < 4 {
        let m = s.read(&mut first[n..4])?;
        if m == 0 {
            return Err(eof("short message"));
        }
        n += m;
    }
    let word = u32::from_le_bytes([first[0], first[1], first[2], first[3]]);
    let len = (word & !MORE_FDS) as usize;
    if len > MAX_DATA {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "handoff message too large",
        ));
    }
    let mut at = 4;
    if word & MORE_FDS != 0 {
        // The count of further descriptors; then their one-byte messages.
        while n < 8 {
            let m = s.read(&mut first[n..8])?;
            if m == 0 {
                return Err(eof("short message"));
            }
            n += m;
        }
        let more = u32::from_le_bytes([first[4], first[5], first[6], first[7]]) as usize;
        if more > MAX_TOTAL_FDS || n > 8 || fds.len() != MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "handoff: bad descriptor continuation",
            ));
        }
        let want = fds.len() + more;
        while fds.len() < want {
            let before = fds.len();
            let mut one = [0u8; 1];
            if recvmsg_fds(sock, &mut one, &mut fds)? == 0 {
                return Err(eof("descriptors missing"));
            }
            if fds.len() == before {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "handoff: continuation without descriptors",
                ));
            }
        }
        at = 8;
    }
    let mut data = first[at..n].to_vec();
    if data.len() < len {
        let mut rest = vec![0u8; len - data.len()];
        s.read_exact(&mut rest)?;
        data.extend_from_slice(&rest);
    }
    data.truncate(len);
    Ok((data, fds))
}

/// Accepts one pending connection without blocking (`WouldBlock` when none is queued).
/// Used after a readiness wait, so stopping the wait can never lose an accepted socket.
pub fn accept_nonblocking(listener: RawFd) -> io::Result<(TcpStream, SocketAddr)> {
    let mut storage: libc::sockaddr_storage = unsafe_zeroed();
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage`/`len` describe a writable sockaddr buffer of the given size.
    let fd = unsafe {
        libc::accept4(
            listener,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new, owned, connected socket descriptor.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    // The address accept4 wrote, not a `getpeername`: that fails (ENOTCONN) for a
    // connection the client reset while it waited in the queue, and the loops that call
    // this would take one client's reset for a failing listener.
    let peer = sockaddr_to_std(&storage, len).ok_or_else(|| {
        // Not an IP peer (a TCP listener never yields one): drop this connection only.
        io::Error::from_raw_os_error(libc::EAFNOSUPPORT)
    })?;
    Ok((stream, peer))
}

/// Whether an error from [`accept_nonblocking`] used up one queued connection (or came
/// from no fault at all), so the next accept may follow at once: ECONNABORTED (Linux
/// took the connection off the queue, then could not complete it: its peer address was
/// gone, and it released the socket), EAFNOSUPPORT (ours: an accepted socket with no IP
/// peer, dropped), EINTR (a signal; nothing was taken). Every other error takes nothing
/// off the queue, so accepting again at once would fail the same way for ever, 100% CPU:
/// EPERM (a security module refusing the accept, checked before any connection is
/// taken), EOPNOTSUPP and EINVAL (not a listening stream socket), EMFILE, ENFILE,
/// ENOBUFS, ENOMEM; and the network errors accept(2) says to treat "like EAGAIN and
/// retry" (ENETDOWN, EPROTO, ENOPROTOOPT, EHOSTDOWN, ENONET, EHOSTUNREACH, EOPNOTSUPP,
/// ENETUNREACH), which Linux's TCP accept does not return (it passes no pending error of
/// the new socket on) and which, whatever returned them, may well leave the queue as it
/// was: those pause ([`AcceptBackoff`]).
pub fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EAFNOSUPPORT | libc::EINTR)
    )
}

/// First pause of an accept loop after a failure, doubled at each further one up to
/// [`ACCEPT_BACKOFF_MAX`] (Go's `net/http` `Server.Serve` and discoverd's accept loops).
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Failures in a row that [`is_connection_error`] calls one connection's, without an
/// accept succeeding, after which the loop pauses anyway: should an error that takes
/// nothing off the queue be among them, the loop pauses instead of spinning.
pub const ACCEPT_SKIPS_MAX: u32 = 64;

/// How an accept loop goes on after failures: one connection's failure is skipped (the
/// next accept follows at once: pausing would let any client stall the loop), any other
/// pauses it, 5 ms doubling to 1 s, until an accept succeeds (Go's `net/http` and
/// discoverd do the same). After [`ACCEPT_SKIPS_MAX`] skipped failures in a row it pauses
/// too.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    /// The last pause (zero: none since the last success).
    delay: Duration,
    /// Failures skipped since the last success or pause.
    skipped: u32,
}

impl AcceptBackoff {
    /// An accept succeeded: the next failure starts over.
    #[inline]
    pub fn ok(&mut self) {
        self.delay = Duration::ZERO;
        self.skipped = 0;
    }

    /// An accept failed with `e`: `None` to accept again at once, else how long to pause
    /// first.
    pub fn failed(&mut self, e: &io::Error) -> Option<Duration> {
        if is_connection_error(e) && self.skipped < ACCEPT_SKIPS_MAX {
            self.skipped += 1;
            return None;
        }
        self.skipped = 0;
        self.delay = if self.delay.is_zero() {
            ACCEPT_BACKOFF_MIN
        } else {
            (self.delay * 2).min(ACCEPT_BACKOFF_MAX)
        };
        Some(self.delay)
    }

    /// Whether the loop has paused since the last success (to warn once per run).
    pub fn pausing(&self) -> bool {
        !self.delay.is_zero()
    }
}

/// The IPv4 or IPv6 address in the first `len` bytes of `s` (None for other families).
fn sockaddr_to_std(s: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    let len = len as usize;
    match s.ss_family as libc::c_int {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is
            // large and aligned enough for.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn unsafe_zeroed() -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain data for which all-zero bytes are valid.
    unsafe { std::mem::zeroed() }
}

/// A listening socket from a received descriptor.
/// A close-on-exec duplicate of `fd`, which must be open.
pub fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) only reads `fd`; a bad one fails with EBADF.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just returned by fcntl and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

pub fn listener_from_fd(fd: OwnedFd) -> io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true)?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_and_data_cross_a_unix_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let data = vec![7u8; 100_000 - 100];
        let data = &data[..60_000];
        send_with_fds(&a, data, &[l1.as_raw_fd(), l2.as_raw_fd()]).unwrap();
        let (got, fds) = recv_with_fds(&b).unwrap();
        assert_eq!(got, data);
        assert_eq!(fds.len(), 2);
        let r1 = listener_from_fd(fds.into_iter().next().unwrap()).unwrap();
        assert_eq!(r1.local_addr().unwrap(), l1.local_addr().unwrap());
        // The received socket is the same listening socket: it accepts connections.
        let c = std::net::TcpStream::connect(l1.local_addr().unwrap()).unwrap();
        let mut accepted = None;
        for _ in 0..100 {
            match accept_nonblocking(r1.as_raw_fd()) {
                Ok(x) => {
                    accepted = Some(x);
                    break;
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
        let (_s, peer) = accepted.expect("accepted through the passed descriptor");
        assert_eq!(peer, c.local_addr().unwrap());
        assert_eq!(
            accept_nonblocking(r1.as_raw_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    /// A client that connects and resets (SO_LINGER 0, close) before the listener gets to
    /// it leaves a dead socket in the accept queue. Accepting it is no error (getpeername
    /// on it would be: ENOTCONN), and the next, live connection comes right after it.
    #[test]
    fn a_connection_reset_in_the_accept_queue_is_no_accept_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let reset =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        reset.connect(&addr.into()).unwrap();
        let reset_addr = reset.local_addr().unwrap().as_socket().unwrap();
        reset.set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(reset);
        let live = std::net::TcpStream::connect(addr).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (_s, first) = accept_nonblocking(l.as_raw_fd()).expect("the reset connection");
        assert_eq!(first, reset_addr);
        let (_s, second) = accept_nonblocking(l.as_raw_fd()).expect("the live connection");
        assert_eq!(second, live.local_addr().unwrap());
        assert_eq!(
            accept_nonblocking(l.as_raw_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn accept_errors_are_sorted_into_one_connection_or_the_listener() {
        for e in [libc::ECONNABORTED, libc::EAFNOSUPPORT, libc::EINTR] {
            assert!(is_connection_error(&io::Error::from_raw_os_error(e)), "{e}");
        }
        // Nothing taken off the queue (or not known to be): skipping would spin.
        for e in [
            libc::EPERM,
            libc::EOPNOTSUPP,
            libc::ENOPROTOOPT,
            libc::EPROTO,
            libc::ENETDOWN,
            libc::ENETUNREACH,
            libc::EHOSTDOWN,
            libc::EHOSTUNREACH,
            libc::ENONET,
            libc::ENOTCONN,
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EBADF,
            libc::EINVAL,
        ] {
            assert!(
                !is_connection_error(&io::Error::from_raw_os_error(e)),
                "{e}"
            );
        }
        assert!(!is_connection_error(&io::ErrorKind::WouldBlock.into()));
    }

    /// Listener failures pause 5 ms, doubling to 1 s, until an accept succeeds; one
    /// connection's failures are skipped, but not more than 64 in a row.
    #[test]
    fn accept_failures_back_off_as_go_does() {
        let err = io::Error::from_raw_os_error;
        let mut b = AcceptBackoff::default();
        assert!(!b.pausing());
        let pauses: Vec<u64> = (0..10)
            .map(|_| b.failed(&err(libc::EMFILE)).unwrap().as_millis() as u64)
            .collect();
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert!(b.pausing());
        b.ok();
        assert!(!b.pausing());
        assert_eq!(b.failed(&err(libc::EPERM)), Some(Duration::from_millis(5)));
        b.ok();
        for i in 0..ACCEPT_SKIPS_MAX {
            assert_eq!(b.failed(&err(libc::ECONNABORTED)), None, "{i}");
        }
        assert_eq!(
            b.failed(&err(libc::ECONNABORTED)),
            Some(Duration::from_millis(5)),
            "a long run without a success pauses"
        );
        assert_eq!(b.failed(&err(libc::ECONNABORTED)), None);
        b.ok();
        for _ in 0..10 {
            b.failed(&err(libc::ECONNABORTED));
            b.ok();
        }
        assert!(!b.pausing(), "runs broken by successes never pause");
    }

    /// A large state (thousands of routes with certificates) crosses in one message with
    /// its descriptors; the writer runs in a thread since the socket buffer is smaller.
    #[test]
    fn a_multi_megabyte_message_crosses_with_its_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let fd = l1.as_raw_fd();
        let w = std::thread::spawn(move || send_with_fds(&a, &sent, &[fd]));
        let (got, fds) = recv_with_fds(&b).unwrap();
        w.join().unwrap().unwrap();
        assert!(got == data, "data corrupted ({} bytes)", got.len());
        assert_eq!(fds.len(), 1);
        let r = listener_from_fd(fds.into_iter().next().unwrap()).unwrap();
        assert_eq!(r.local_addr().unwrap(), l1.local_addr().unwrap());
        let (c, _d) = UnixStream::pair().unwrap();
        let err = send_with_fds(&c, &vec![0u8; MAX_DATA + 1], &[]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    /// More descriptors than one `sendmsg` can carry (a router with hundreds of TCP
    /// routes): all arrive, in order, with the data intact.
    #[test]
    fn more_descriptors_than_one_message_carries_all_arrive_in_order() {
        // Three listeners sent round-robin keep the test within a default fd limit.
        let listeners: Vec<_> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        for count in [MAX_FDS, MAX_FDS + 1, 2 * MAX_FDS + 7] {
            let (a, b) = UnixStream::pair().unwrap();
            let raw: Vec<RawFd> = (0..count).map(|i| listeners[i % 3].as_raw_fd()).collect();
            let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
            let sent = data.clone();
            let w = std::thread::spawn(move || send_with_fds(&a, &sent, &raw));
            let (got, fds) = recv_with_fds(&b).unwrap();
            w.join().unwrap().unwrap();
            assert!(got == data, "data corrupted with {count} descriptors");
            assert_eq!(fds.len(), count);
            for (i, fd) in fds.into_iter().enumerate() {
                let r = listener_from_fd(fd).unwrap();
                assert_eq!(
                    r.local_addr().unwrap(),
                    listeners[i % 3].local_addr().unwrap()
                );
            }
        }
    }

    /// A message with at most `MAX_FDS` descriptors is framed exactly as before
    /// continuations existed (`len | data`), so builds on either side of the change
    /// still hand over to each other.
    #[test]
    fn up_to_max_fds_the_framing_is_unchanged() {
        let (a, b) = UnixStream::pair().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        send_with_fds(&a, b"state", &[l.as_raw_fd()]).unwrap();
        drop(a);
        let mut fds = Vec::new();
        let mut buf = [0u8; 64];
        let n = recvmsg_fds(&b, &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..n], b"\x05\0\0\0state");
        assert_eq!(fds.len(), 1);
    }
}
