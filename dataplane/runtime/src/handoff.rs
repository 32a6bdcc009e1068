//! Passing listening sockets between processes (zero-downtime upgrades): a message and
//! file descriptors over a Unix stream socket (SCM_RIGHTS), and a non-blocking accept
//! for accept loops that must be able to stop without losing a connection.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Most descriptors one message carries.
pub const MAX_FDS: usize = 250;

/// Most data one message carries. A router's handed-over state holds every route (with
/// certificate chains and keys) and every backend: a few hundred bytes each, so a 64 KiB cap
/// ended zero-downtime upgrades at about 85 apps.
pub const MAX_DATA: usize = 64 << 20;

/// Sends `data` (at most [`MAX_DATA`]) with `fds` attached, as one length-prefixed message
/// (the descriptors go with its first bytes).
pub fn send_with_fds(sock: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS || data.len() > MAX_DATA {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors or too much data",
        ));
    }
    let mut payload = (data.len() as u32).to_le_bytes().to_vec();
    payload.extend_from_slice(data);
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
        let n = n as usize;
        if n < payload.len() {
            // The descriptors went with the first bytes; send the rest plainly.
            use std::io::Write;
            let mut s = sock;
            s.write_all(&payload[n..])?;
        }
    }
    Ok(())
}

fn cmsg_space(n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    // SAFETY: CMSG_SPACE is a pure size computation.
    unsafe { libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Receives one message sent by [`send_with_fds`]: its data and the descriptors.
pub fn recv_with_fds(sock: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut first = vec![0u8; 64 * 1024 + 4];
    let space = cmsg_space(MAX_FDS);
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: first.as_mut_ptr().cast(),
        iov_len: first.len(),
    };
    let mut fds = Vec::new();
    // SAFETY: as in `send_with_fds`; received descriptors are taken into `OwnedFd`s
    // exactly once, straight from the kernel's SCM_RIGHTS payload.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
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
        n as usize
    };
    if n < 4 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "short handoff message",
        ));
    }
    let len = u32::from_le_bytes([first[0], first[1], first[2], first[3]]) as usize;
    if len > MAX_DATA {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "handoff message too large",
        ));
    }
    let mut data = first[4..n].to_vec();
    if data.len() < len {
        use std::io::Read;
        let mut rest = vec![0u8; len - data.len()];
        let mut s = sock;
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
    let peer = stream.peer_addr()?;
    Ok((stream, peer))
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
}
