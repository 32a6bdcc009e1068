//! The daemon's connection ([`Client`]): accepting it (a new one replaces the old), reading
//! its frames (acks, signals, stdin's end, window sizes, its features) and writing the
//! outbox's events to it once it said what it reads.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::ShimLoop;
use crate::shim::container::errno;
use crate::wire::{self, Frame};

pub(super) struct Client {
    pub(super) sock: UnixStream,
    rbuf: Vec<u8>,
    pub(super) wbuf: Vec<u8>,
    /// The features the daemon announced on this connection ([`wire::Frame::Features`]).
    features: Option<u32>,
    /// Events wait for its features until then ([`ShimLoop::features_wait`] after it
    /// connected)...
    pub(super) deadline: Instant,
    /// ... and until the shim read what it sent by then (see [`ShimLoop::write_client`]).
    waited: bool,
}

impl Client {
    /// Events may be sent: the daemon announced its features, or had time to (one of the
    /// protocol's first version never does).
    fn settled(&self) -> bool {
        self.features.is_some() || self.waited
    }

    /// How long until [`Client::settled`], if it is not yet.
    pub(super) fn unsettled_for(&self) -> Option<Duration> {
        (!self.settled()).then(|| self.deadline.saturating_duration_since(Instant::now()))
    }

    /// The daemon reads pieces of lines.
    fn partial(&self) -> bool {
        self.features.is_some_and(|f| f & wire::PARTIAL_OUTPUT != 0)
    }
}

/// How much output the shim encodes ahead of the socket.
const WRITE_AHEAD: usize = 256 * 1024;

impl ShimLoop {
    pub(super) fn accept(&mut self) {
        while let Ok((sock, _)) = self.listener.accept() {
            // Acks the old connection sent before this one connected are in its buffer: take
            // them first, or everything they acknowledged would be sent again.
            if self.client.is_some() {
                self.read_client();
            }
            if sock.set_nonblocking(true).is_err() {
                continue;
            }
            let mut wbuf = Vec::new();
            let seq = self.outbox.reconnect();
            wire::encode_hello(seq, self.pid, &mut wbuf);
            // The one daemon: a new connection replaces the old one.
            self.client = Some(Client {
                sock,
                rbuf: Vec::new(),
                wbuf,
                features: None,
                deadline: Instant::now() + self.features_wait,
                waited: false,
            });
            // A new daemon announces its features as it connects, before this accepts:
            // usually here already.
            self.read_client();
        }
    }

    /// Reads frames from the daemon; signals go to `self.signals`. Drops the client on EOF or
    /// error.
    pub(super) fn read_client(&mut self) {
        let Some(c) = self.client.as_mut() else {
            return;
        };
        let mut buf = [0u8; 4096];
        let mut drop_client = false;
        loop {
            match c.sock.read(&mut buf) {
                Ok(0) => {
                    drop_client = true;
                    break;
                }
                Ok(n) => c.rbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    drop_client = true;
                    break;
                }
            }
        }
        loop {
            match wire::decode(&mut c.rbuf) {
                Ok(Some(Frame::Ack(seq))) => self.outbox.ack(seq),
                // A signal already waiting is not queued twice (standard signals do not
                // queue in the kernel either): at most one of each, however many come
                // before the job starts.
                Ok(Some(Frame::Signal(s))) if !self.signals.contains(&s) => self.signals.push(s),
                Ok(Some(Frame::Signal(_))) => {}
                Ok(Some(Frame::CloseStdin)) => self.stdin_hold = None,
                Ok(Some(Frame::Resize { rows, cols })) => self.window = Some((rows, cols)),
                Ok(Some(Frame::Features(f))) => c.features = Some(f),
                Ok(Some(_)) | Err(_) => {
                    drop_client = true;
                    break;
                }
                Ok(None) => break,
            }
        }
        if drop_client {
            self.client = None;
        }
    }

    /// Sends what it can. Returns whether it read from the daemon first (the wait for its
    /// features just ended): what was read (signals, a window size, acks, the announcement)
    /// is to be acted on before the loop sleeps, as the socket has nothing left to wake it.
    pub(super) fn write_client(&mut self) -> bool {
        // The wait for the daemon's features is over: what it sent by now is read first (its
        // announcement, written as it connected, counts however late the shim looks: one
        // descheduled past the wait would otherwise take a new daemon for an old one, and
        // send it whole lines).
        let read = self
            .client
            .as_ref()
            .is_some_and(|c| !c.settled() && Instant::now() >= c.deadline);
        if read {
            self.read_client();
            if let Some(c) = self.client.as_mut() {
                c.waited = true;
            }
        }
        let Some(c) = self.client.as_mut() else {
            return read;
        };
        loop {
            if c.wbuf.is_empty() {
                // Nothing but `HELLO` until the daemon said what it reads.
                if !c.settled() {
                    return read;
                }
                let partial = c.partial();
                self.outbox.encode_unsent(&mut c.wbuf, WRITE_AHEAD, partial);
                if c.wbuf.is_empty() {
                    return read;
                }
            }
            // SAFETY: the buffer pointer and length describe initialized memory.
            let n = unsafe {
                libc::send(
                    c.sock.as_raw_fd(),
                    c.wbuf.as_ptr().cast(),
                    c.wbuf.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = errno();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock => return read,
                    std::io::ErrorKind::Interrupted => continue,
                    _ => {
                        self.client = None;
                        return read;
                    }
                }
            }
            c.wbuf.drain(..n as usize);
        }
    }

    /// The connected daemon reads pieces of lines.
    pub(super) fn partial_ok(&self) -> bool {
        self.client.as_ref().is_some_and(Client::partial)
    }
}
