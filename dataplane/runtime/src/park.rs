//! A small epoll set for parking idle connections without a task: the fds wait in the
//! kernel (EPOLLONESHOT), and one task per core waits for the set itself to become
//! readable. Tokens are the caller's (a slab index and generation).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub struct Epoll(OwnedFd);

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall; a negative result is an error.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor owned by no one else.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Watches `fd` for input (or the peer closing) once; `token` comes back from
    /// [`Epoll::ready`].
    pub fn add_oneshot(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: token,
        };
        // SAFETY: `ev` lives across the call; the kernel copies it.
        let r = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching `fd` (closing the fd does it too).
    pub fn delete(&self, fd: RawFd) {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: as above; failure (fd not in the set) is harmless.
        unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut ev) };
    }

    /// Tokens of ready fds, without blocking; fills at most `out.len()`.
    pub fn ready(&self, out: &mut [u64]) -> usize {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 64];
        let max = out.len().min(evs.len()) as i32;
        // SAFETY: `evs` has room for `max` events.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), evs.as_mut_ptr(), max, 0) };
        if n <= 0 {
            return 0;
        }
        for (o, e) in out.iter_mut().zip(&evs[..n as usize]) {
            *o = e.u64;
        }
        n as usize
    }

    /// A duplicate of the set's fd dressed as a `TcpStream`, only so that a runtime
    /// can wait for its readability (an epoll fd is readable while any watched fd is
    /// ready). Never read from or write to it.
    pub fn pollable(&self) -> io::Result<std::net::TcpStream> {
        let dup = crate::handoff::dup(self.0.as_raw_fd())?;
        Ok(std::net::TcpStream::from(dup))
    }
}

/// Gives free heap memory back to the kernel (glibc `malloc_trim`): after many idle
/// connections parked at once, their freed tasks would otherwise stay resident.
pub fn trim_heap() {
    // SAFETY: malloc_trim only walks and releases the allocator's own free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Takes ownership of a connected TCP socket's fd.
///
/// # Safety
/// `fd` must be an open TCP socket that nothing else owns or will close.
pub unsafe fn tcp_from_raw(fd: RawFd) -> std::net::TcpStream {
    // SAFETY: the caller's contract.
    unsafe { std::net::TcpStream::from_raw_fd(fd) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::IntoRawFd;

    #[test]
    fn parked_fd_reports_its_token_once_when_readable() {
        let ep = Epoll::new().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let fd = s.into_raw_fd();
        ep.add_oneshot(fd, 42).unwrap();
        let mut out = [0u64; 8];
        assert_eq!(ep.ready(&mut out), 0, "nothing to read yet");
        c.write_all(b"x").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut n = 0;
        while n == 0 && std::time::Instant::now() < deadline {
            n = ep.ready(&mut out);
        }
        assert_eq!((n, out[0]), (1, 42));
        assert_eq!(ep.ready(&mut out), 0, "one-shot: reported once");
        ep.delete(fd);
        // SAFETY: `fd` came from `into_raw_fd` above and is owned here.
        drop(unsafe { tcp_from_raw(fd) });
    }
}
