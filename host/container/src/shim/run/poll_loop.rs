//! The [`ShimLoop`]'s `poll(2)` loop: while the job runs ([`ShimLoop::run_job`]: its pidfd,
//! its output, a TTY job's input, the daemon's socket) and after it, until the daemon
//! acknowledged the final event ([`ShimLoop::until_acked`]); the final status it writes.

use std::fs;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use super::connection::Client;
use super::output::Lines;
use super::ShimLoop;
use crate::shim::cgroups;
use crate::shim::container::{errno, reap, teardown, JobIo, Running};
use crate::shim::terminal::{end_of_input, read_input, set_window, write_input};
use crate::wire::{ShimEvent, Stream};

/// How long after the init exited the shim waits for the pipes to reach end-of-file.
const DRAIN: Duration = Duration::from_secs(2);
impl ShimLoop {
    pub(super) fn finish(&mut self, ev: ShimEvent) {
        self.outbox.flush_dropped();
        let json = serde_json::to_vec(&ev).unwrap();
        let tmp = self.layout.status().with_extension("tmp");
        if fs::write(&tmp, json)
            .and_then(|_| fs::rename(&tmp, self.layout.status()))
            .is_err()
        {
            eprintln!("could not write {}", self.layout.status().display());
        }
        self.outbox.push(ev);
        self.final_queued = true;
    }

    fn read_pipe(&mut self, fd: RawFd, lines: &mut Lines) {
        let mut buf = vec![0u8; 64 * 1024];
        // Bounded per turn so one chatty stream cannot starve the socket.
        for _ in 0..16 {
            // SAFETY: `buf` is a valid writable buffer of its length.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n == 0 {
                lines.open = false;
                lines.flush(&mut self.outbox, self.client.is_none());
                return;
            }
            if n < 0 {
                let e = errno();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    lines.open = false;
                    lines.flush(&mut self.outbox, self.client.is_none());
                }
                return;
            }
            let hold = !self.partial_ok();
            lines.feed(
                &buf[..n as usize],
                &mut self.outbox,
                self.client.is_none(),
                hold,
            );
            if self.client.is_some() && self.outbox.full() {
                return;
            }
        }
    }

    /// How long [`ShimLoop::run_job`]'s loop may sleep in `poll`: not at all when the
    /// daemon's frames were read outside the poll step (`read`: by `write_client`, past the
    /// wait for the daemon's features) or a signal or window size read is not yet acted on
    /// (they are taken after the poll step; the socket is drained, and nothing might wake
    /// the loop for long: a quiet job's SIGTERM waited for the stop's SIGKILL); else until
    /// the drain after the job's exit (`exited_at`) is over, if it exited.
    pub(super) fn poll_timeout(&self, read: bool, exited_at: Option<Instant>) -> Option<Duration> {
        if read || !self.signals.is_empty() || self.window.is_some() {
            return Some(Duration::ZERO);
        }
        exited_at.map(|at| DRAIN.saturating_sub(at.elapsed()))
    }

    /// Waits for `fds`, at most `timeout` (`None`: no limit), and no longer than until a
    /// new connection's wait for its features is over.
    pub(super) fn poll(&mut self, fds: &mut [libc::pollfd], timeout: Option<Duration>) {
        let timeout = match (
            timeout,
            self.client.as_ref().and_then(Client::unsettled_for),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Rounded up: a wait cut short of its end would only come back to wait again.
        let ms = timeout.map_or(-1, |t| t.as_micros().div_ceil(1000).min(60_000) as i32);
        // SAFETY: `fds` is a valid slice of pollfd.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    }

    pub(super) fn run_job(&mut self, mut r: Running) {
        // The job's output fds (a TTY job: its terminal's master, no stderr) and, for a TTY
        // job, the read end of its stdin FIFO, whose bytes the shim writes to the master.
        let (out_fd, err_fd, mut input) = match r.io {
            JobIo::Pipes { stdout, stderr } => (stdout, Some(stderr), None),
            JobIo::Terminal { master, input } => (master, None, Some(input)),
        };
        let tty = input.is_some();
        let mut out = Lines {
            stream: Stream::Stdout,
            buf: Vec::new(),
            open: true,
            raw: tty,
        };
        let mut err = Lines {
            stream: Stream::Stderr,
            buf: Vec::new(),
            open: err_fd.is_some(),
            raw: false,
        };
        let err_raw = err_fd.as_ref().map_or(-1, |f| f.as_raw_fd());
        // Input read from the FIFO and not yet taken by the terminal; the last byte read.
        let mut pending: Vec<u8> = Vec::new();
        let mut last_input: Option<u8> = None;
        let mut status: Option<Option<i32>> = None;
        let mut exited_at: Option<Instant> = None;
        // `write_client` read from the daemon since the last poll step.
        let mut read = false;
        loop {
            if let Some(at) = exited_at {
                if (!out.open && !err.open) || at.elapsed() >= DRAIN {
                    break;
                }
            }
            let read_pipes = self.client.is_none() || !self.outbox.full();
            let mut out_events = 0;
            if out.open && read_pipes {
                out_events |= libc::POLLIN;
            }
            if out.open && !pending.is_empty() {
                out_events |= libc::POLLOUT;
            }
            let mut fds = vec![
                pollfd(self.listener.as_raw_fd(), libc::POLLIN),
                pollfd(
                    if status.is_none() {
                        r.pidfd.as_raw_fd()
                    } else {
                        -1
                    },
                    libc::POLLIN,
                ),
                pollfd(
                    if out_events != 0 {
                        out_fd.as_raw_fd()
                    } else {
                        -1
                    },
                    out_events,
                ),
                pollfd(
                    if err.open && read_pipes { err_raw } else { -1 },
                    libc::POLLIN,
                ),
                pollfd(
                    match &input {
                        Some(f) if pending.is_empty() && out.open => f.as_raw_fd(),
                        _ => -1,
                    },
                    libc::POLLIN,
                ),
            ];
            if let Some(c) = &self.client {
                let mut ev = libc::POLLIN;
                if !c.wbuf.is_empty() {
                    ev |= libc::POLLOUT;
                }
                fds.push(pollfd(c.sock.as_raw_fd(), ev));
            }
            // Anything new to write goes out before sleeping.
            read |= self.write_client();
            let timeout = self.poll_timeout(std::mem::take(&mut read), exited_at);
            self.poll(&mut fds, timeout);
            if fds[0].revents != 0 {
                self.accept();
            }
            if fds.len() > 5 && fds[5].revents != 0 {
                self.read_client();
            }
            // A partial line that waited for a daemon that reads pieces goes once one is
            // connected.
            if self.partial_ok() {
                out.flush(&mut self.outbox, false);
                err.flush(&mut self.outbox, false);
            }
            for sig in std::mem::take(&mut self.signals) {
                if status.is_none() {
                    // SAFETY: `r.pid` is our unreaped child, so the pid cannot be reused.
                    unsafe { libc::kill(r.pid, sig) };
                }
            }
            if let Some((rows, cols)) = self.window.take() {
                if tty && out.open {
                    if let Err(e) = set_window(out_fd.as_raw_fd(), rows, cols) {
                        eprintln!("setting the terminal size: {e}");
                    }
                }
            }
            if let Some(f) = &input {
                if fds[4].revents != 0 {
                    // (Read only while nothing is pending: all before went to the terminal.)
                    if read_input(f.as_raw_fd(), &mut pending) {
                        last_input = pending.last().copied().or(last_input);
                    } else {
                        // End of input (the daemon closed stdin): the terminal's end-of-file
                        // character, as Flynn and Docker send it (twice after a partial
                        // line in canonical mode); the FIFO is done with.
                        pending = end_of_input(out_fd.as_raw_fd(), last_input);
                        input = None;
                    }
                }
            }
            if tty && out.open && !pending.is_empty() {
                write_input(out_fd.as_raw_fd(), &mut pending);
            }
            if fds[2].revents & !libc::POLLOUT != 0 {
                self.read_pipe(out_fd.as_raw_fd(), &mut out);
                if !out.open {
                    // The terminal is gone: nothing takes input any more.
                    pending.clear();
                    input = None;
                }
            }
            if fds[3].revents != 0 {
                self.read_pipe(err_raw, &mut err);
            }
            if fds[1].revents != 0 && status.is_none() {
                // `None` inside: the init could not be waited for (never expected).
                status = Some(reap(r.pid));
                // What the job left running in its namespace goes with it, as it did when
                // the job was the namespace's init.
                r.pid_ns.end();
                exited_at = Some(Instant::now());
            }
            read = self.write_client();
        }
        drop(input);
        // Whatever is still in the pipes is read now (and counted as dropped if it cannot fit).
        for (fd, lines) in [(out_fd.as_raw_fd(), &mut out), (err_raw, &mut err)] {
            if lines.open {
                let saved_client = self.client.take();
                self.read_pipe(fd, lines);
                self.client = saved_client;
                lines.flush(&mut self.outbox, true);
            }
        }
        r.pid_ns.end();
        let oom_killed = cgroups::oom_killed(&self.spec);
        teardown(&self.spec, &self.layout, Some(&mut r.container));
        let (code, signal) = match status.flatten() {
            Some(st) if libc::WIFSIGNALED(st) => (None, Some(libc::WTERMSIG(st))),
            Some(st) => (Some(libc::WEXITSTATUS(st)), None),
            None => (None, None),
        };
        let ev = ShimEvent::Exited {
            code,
            signal,
            oom_killed,
        };
        self.finish(ev);
    }

    /// Serves the daemon until it acknowledged the final event.
    pub(super) fn until_acked(&mut self) {
        while !self.outbox.final_acked(self.final_queued) {
            self.write_client();
            // It may have read the final event's ack (past the wait for the daemon's
            // features): the socket is drained, nothing would wake the poll.
            if self.outbox.final_acked(self.final_queued) {
                break;
            }
            let mut fds = vec![pollfd(self.listener.as_raw_fd(), libc::POLLIN)];
            if let Some(c) = &self.client {
                let mut ev = libc::POLLIN;
                if !c.wbuf.is_empty() {
                    ev |= libc::POLLOUT;
                }
                fds.push(pollfd(c.sock.as_raw_fd(), ev));
            }
            self.poll(&mut fds, None);
            if fds[0].revents != 0 {
                self.accept();
            }
            if fds.len() > 1 && fds[1].revents != 0 {
                self.read_client();
            }
            // The job is gone: nothing to signal or resize.
            self.signals.clear();
            self.window = None;
        }
        let _ = fs::remove_file(self.layout.socket());
    }
}

pub(super) fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}
