//! The shim's side of a TTY job's terminal: receiving its master from libcontainer over the
//! console socket, setting its window size, and copying the job's stdin FIFO to it.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::container::errno;
use super::layout::Layout;

/// Where a TTY job's terminal master arrives: a unix socket the shim listens on while
/// libcontainer creates the container. libcontainer connects to it from the shim itself
/// (inside `build`, before forking), and the container's init opens the terminal in the
/// container's `devpts` and sends the master over that connection (`SCM_RIGHTS`) before it
/// reports ready, so it is queued by the time `build` returns: no thread needed.
pub(super) struct Console {
    listener: std::os::unix::net::UnixListener,
    pub(super) path: std::path::PathBuf,
}

impl Console {
    pub(super) fn bind(layout: &Layout) -> Result<Console, String> {
        let path = layout.console();
        let _ = fs::remove_file(&path);
        let listener = layout
            .console_addr()
            .and_then(|a| std::os::unix::net::UnixListener::bind(&a.path))
            .map_err(|e| format!("binding {}: {e}", path.display()))?;
        Ok(Console { listener, path })
    }

    /// The terminal master the container's init sent (waits up to 10 s).
    pub(super) fn master(&self) -> Result<OwnedFd, String> {
        let what = |e: String| format!("receiving the terminal from the container: {e}");
        self.listener
            .set_nonblocking(true)
            .map_err(|e| what(e.to_string()))?;
        let mut pfd = libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 10_000) } <= 0 {
            return Err(what("no connection on the console socket".into()));
        }
        let (conn, _) = self.listener.accept().map_err(|e| what(e.to_string()))?;
        conn.set_nonblocking(false)
            .and_then(|_| conn.set_read_timeout(Some(std::time::Duration::from_secs(10))))
            .map_err(|e| what(e.to_string()))?;
        recv_fd(conn.as_raw_fd()).map_err(what)
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Receives one descriptor (`SCM_RIGHTS`, made close-on-exec) from the unix socket `sock`.
fn recv_fd(sock: RawFd) -> Result<OwnedFd, String> {
    let mut data = [0u8; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // Room for one cmsghdr with one int, aligned for cmsghdr (CMSG_SPACE(4) is 24 here).
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    let n = loop {
        // SAFETY: `msg` points at `iov`/`data` and `cbuf`, which live across the call.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 && errno().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break n;
    };
    if n < 0 {
        return Err(format!("recvmsg: {}", errno()));
    }
    let mut fd = None;
    // SAFETY: CMSG_* walk the control buffer recvmsg filled, within `msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let got: RawFd = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                // A second descriptor (never sent) would be closed, not leaked.
                if fd.is_some() {
                    libc::close(got);
                } else {
                    fd = Some(OwnedFd::from_raw_fd(got));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    fd.ok_or_else(|| "no descriptor came with the message".into())
}

/// Makes `uid` the owner of the terminal whose master is `master` (its slave, the job's
/// stdin, stdout, stderr and controlling terminal). libcontainer opens it as root and leaves
/// it `root:tty 0620`, so a job running as another user could not open its own terminal
/// again (`$(tty)`, `/dev/tty` works through the controlling terminal but a path does not).
/// As runc's `fixStdioPermissions` does: only the owner changes, the group stays the one
/// `devpts` gave it. The slave is reached through the master (`TIOCGPTPEER`, Linux 4.13),
/// not by a path in the container's `devpts`.
pub(super) fn own_terminal(master: RawFd, uid: u32) -> std::io::Result<()> {
    if uid == 0 {
        return Ok(());
    }
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new fd (or -1).
    let fd = unsafe { libc::ioctl(master, libc::TIOCGPTPEER, flags) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: the ioctl returned a new fd that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fchown on an fd we own; gid -1 leaves the group as it is.
    if unsafe { libc::fchown(slave.as_raw_fd(), uid, u32::MAX) } != 0 {
        return Err(errno());
    }
    Ok(())
}

/// Sets the window size of the terminal whose master is `master` (the kernel sends
/// `SIGWINCH` to its foreground process group when the size changes).
pub(super) fn set_window(master: RawFd, rows: u16, cols: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
    if unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(errno());
    }
    Ok(())
}

/// ^D: the end-of-file character written when the terminal's settings cannot be read, or
/// name none (raw mode, where the job makes of it what it wants).
const CTRL_D: u8 = 0x04;

/// What the shim writes to the terminal whose master is `master` when the daemon closed a
/// TTY job's stdin, `last` being the last byte of input written before: the terminal's
/// end-of-file character (`VEOF`, ^D unless the job changed it). In canonical mode after
/// input that did not end a line, twice: the first only hands the pending input over (as ^D
/// after typing does), the second is the end of file. Nothing in canonical mode when the job
/// disabled `VEOF` (nothing can end its input then).
pub(super) fn end_of_input(master: RawFd, last: Option<u8>) -> Vec<u8> {
    // SAFETY: termios is plain data; all-zero is a valid value for tcgetattr to overwrite.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes one termios through a valid pointer (on a pty master it reads
    // the terminal's settings, the slave's).
    if unsafe { libc::tcgetattr(master, &mut t) } != 0 {
        return vec![CTRL_D];
    }
    let veof = t.c_cc[libc::VEOF];
    if t.c_lflag & libc::ICANON == 0 {
        return vec![if veof == 0 { CTRL_D } else { veof }];
    }
    if veof == 0 {
        return Vec::new();
    }
    // Whether `last` ended a line (or was an end of file itself): nothing is pending then.
    let ends_line = |b: u8| {
        let cc = |i: usize| t.c_cc[i] != 0 && t.c_cc[i] == b;
        b == b'\n'
            || cc(libc::VEOL)
            || cc(libc::VEOL2)
            || b == veof
            || (b == b'\r' && t.c_iflag & libc::ICRNL != 0 && t.c_iflag & libc::IGNCR == 0)
    };
    if last.is_none_or(ends_line) {
        vec![veof]
    } else {
        vec![veof, veof]
    }
}

/// Reads what the stdin FIFO `fd` holds into `pending` (at most 4 KiB, so a job that does not
/// read holds its input back in the FIFO). False at end-of-file (every writer, the shim's hold
/// included, closed it) or on an error.
pub(super) fn read_input(fd: RawFd, pending: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: `buf` is a valid writable buffer of its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            pending.extend_from_slice(&buf[..n as usize]);
            return true;
        }
        if n == 0 {
            return false;
        }
        match errno().kind() {
            std::io::ErrorKind::Interrupted => continue,
            std::io::ErrorKind::WouldBlock => return true,
            _ => return false,
        }
    }
}

/// Writes as much of `pending` to the terminal master `fd` as it takes now (non-blocking);
/// input the terminal cannot take any more (an error other than `EAGAIN`) is discarded.
pub(super) fn write_input(fd: RawFd, pending: &mut Vec<u8>) {
    while !pending.is_empty() {
        // SAFETY: the pointer and length describe initialized memory.
        let n = unsafe { libc::write(fd, pending.as_ptr().cast(), pending.len()) };
        if n >= 0 {
            pending.drain(..n as usize);
            continue;
        }
        match errno().kind() {
            std::io::ErrorKind::Interrupted => continue,
            std::io::ErrorKind::WouldBlock => return,
            _ => {
                pending.clear();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{Read, Write};

    use super::*;
    use crate::shim::container::pipe;

    /// The end of input after a partial line is two `VEOF`s in canonical mode, one after a
    /// complete line (or none at all), and one in raw mode; the job's own `VEOF` is used.
    #[test]
    fn end_of_input_depends_on_the_line_and_the_mode() {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty fills two fds; null name, termios and winsize are allowed.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", errno());
        // SAFETY: openpty returned two new fds that nothing else owns.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let m = master.as_raw_fd();
        for (last, want) in [
            (None, vec![4]),
            (Some(b'\n'), vec![4]),
            (Some(b'\r'), vec![4]),
            (Some(4), vec![4]),
            (Some(b'c'), vec![4, 4]),
        ] {
            assert_eq!(end_of_input(m, last), want, "{last:?}");
        }
        // SAFETY: termios is plain data, filled by tcgetattr before use.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and pointer.
        assert_eq!(unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut t) }, 0);
        let set = |t: &libc::termios| {
            // SAFETY: tcsetattr reads one termios from a valid pointer; the fd is ours.
            let rc = unsafe { libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, t) };
            assert_eq!(rc, 0, "tcsetattr: {}", errno());
        };
        t.c_cc[libc::VEOF] = 0x1a;
        set(&t);
        assert_eq!(end_of_input(m, Some(b'c')), vec![0x1a, 0x1a]);
        assert_eq!(end_of_input(m, Some(0x1a)), vec![0x1a]);
        // SAFETY: cfmakeraw edits the termios it is given.
        unsafe { libc::cfmakeraw(&mut t) };
        set(&t);
        assert_eq!(end_of_input(m, Some(b'c')), vec![0x1a]);
        drop(slave);
        drop(master);
        // A terminal that is gone: ^D, for what it is worth.
        assert_eq!(end_of_input(-1, Some(b'c')), vec![CTRL_D]);
    }

    /// Input is read from the FIFO 4 KiB at a time and written to the terminal as it takes it;
    /// end-of-file is told apart from "nothing yet".
    #[test]
    fn input_is_copied_and_its_end_seen() {
        let (r, w) = pipe().unwrap();
        for fd in [&r, &w] {
            // SAFETY: fcntl on fds this test owns.
            unsafe {
                let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
                libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
        }
        let mut pending = Vec::new();
        assert!(
            read_input(r.as_raw_fd(), &mut pending),
            "nothing yet is not the end"
        );
        assert!(pending.is_empty());
        let mut f = File::from(w);
        f.write_all(&[b'x'; 5000]).unwrap();
        assert!(read_input(r.as_raw_fd(), &mut pending));
        assert_eq!(pending.len(), 4096);
        // Written to a pipe standing in for the terminal: all of it fits.
        let (tr, tw) = pipe().unwrap();
        write_input(tw.as_raw_fd(), &mut pending);
        assert!(pending.is_empty());
        let mut got = [0u8; 8192];
        assert_eq!(File::from(tr).read(&mut got).unwrap(), 4096);
        assert!(read_input(r.as_raw_fd(), &mut pending));
        assert_eq!(pending.len(), 904);
        drop(f);
        pending.clear();
        assert!(!read_input(r.as_raw_fd(), &mut pending), "end of file");
        // A terminal that is gone: the input is discarded, not retried forever.
        pending.extend_from_slice(b"late");
        write_input(tw.as_raw_fd(), &mut pending);
        assert!(pending.is_empty());
    }
}
