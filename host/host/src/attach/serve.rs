//! One attached client's connection: its frames read and acted on, the job's output and
//! end written to it.

use std::sync::Arc;
use std::time::Duration;

use flynn_api::attach::{self, Frame};
use flynn_api::host::{ActiveJob, JobStatus};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::host::Host;
use crate::logship::Stream;
use crate::runtime::{Stdin, StdinMsg};

use super::{Blocking, Msg, Size, Subscription, READ_AHEAD};

/// The exit status sent at the end: the exit code, or 128 + the signal that ended it.
fn exit_status(j: &ActiveJob) -> u32 {
    match (j.exit_status, j.signal) {
        (Some(code), _) => code as u32,
        (None, Some(sig)) => 128 + sig as u32,
        (None, None) => 0,
    }
}

/// Serves one attached client over `io` until the job ends, the client leaves, or it falls
/// behind. `sock` is the connection's socket, when it is a TCP one: given a longer user
/// timeout if the client holds its job's output up (see [`crate::holds_job_up`]).
pub async fn serve<IO>(
    host: Arc<Host>,
    mut sub: Subscription,
    flags: u32,
    io: IO,
    sock: Option<socket2::Socket>,
) where
    IO: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (mut rd, wr) = tokio::io::split(io);
    let limits = sub.attachments.limits;
    let mut w = Writer {
        wr,
        buf: Vec::new(),
        timeout: limits.write,
        blocking: None,
    };
    let wants = |s: Stream| match s {
        Stream::Stdout => flags & attach::STDOUT != 0,
        Stream::Stderr => flags & attach::STDERR != 0,
    };
    let mut inbuf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    // A message taken off the queue while waiting for the job, to act on first.
    let mut early: Option<Msg> = None;
    if sub.pending {
        // The job is not created yet: `Waiting`, then its creation (`Created`) or a refusal.
        // The client's frames are read ahead meanwhile (acted on once it is attached), so
        // a client that leaves is seen.
        if w.send(&Frame::Waiting).await.is_err() {
            return;
        }
        let deadline = tokio::time::Instant::now() + limits.wait;
        let mut expired = false;
        loop {
            tokio::select! {
                msg = sub.rx.recv() => {
                    sub.took(&msg);
                    match msg {
                        Some(Msg::Created) => break,
                        Some(Msg::Refused(why)) => {
                            let _ = w.send(&Frame::Error(why)).await;
                            return;
                        }
                        // Ended before it was shown as created (stopped while its record
                        // was written): what follows shows its end.
                        Some(m) => {
                            early = Some(m);
                            break;
                        }
                        None => {
                            let _ = w.send(&Frame::Error("host: unknown job".into())).await;
                            return;
                        }
                    }
                }
                // Read on (bounded), so a client that leaves is seen.
                n = rd.read(&mut chunk) => {
                    let Ok(n @ 1..) = n else { return };
                    inbuf.extend_from_slice(&chunk[..n]);
                    if inbuf.len() > READ_AHEAD {
                        let e = format!(
                            "host: more than {} KiB sent before the job was created",
                            READ_AHEAD / 1024
                        );
                        if w.send(&Frame::Error(e)).await.is_ok() {
                            // Closed after what the client is still sending (a second of
                            // it, discarded): closing with its bytes unread would reset the
                            // connection, and the client might lose the error.
                            let _ = w.wr.shutdown().await;
                            let drain = async { while let Ok(1..) = rd.read(&mut chunk).await {} };
                            let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
                        }
                        return;
                    }
                }
                _ = tokio::time::sleep_until(deadline), if !expired => {
                    // Unless it was created just now (its `Created` is queued).
                    if sub.attachments.expire(&sub.id, sub.token) {
                        let e = format!(
                            "host: unknown job: not created within {} s",
                            limits.wait.as_secs_f32()
                        );
                        let _ = w.send(&Frame::Error(e)).await;
                        return;
                    }
                    expired = true;
                }
            }
        }
    }
    // The only client of a `disable_log` job holds the job up rather than being dropped:
    // no time limit on a frame while it does (the connection's TCP keepalive and user
    // timeout drop a client that went away), the usual one once the job is being stopped.
    // Nor the kernel's two-minute limit on a closed receive window (a client paging its
    // output, or stopped with Ctrl-Z, is live): see `crate::BLOCKING_USER_TIMEOUT`.
    if sub.blocking() {
        w.blocking = Some(sub.blocking.clone());
        if let Some(s) = &sock {
            crate::holds_job_up(s);
        }
    }
    drop(sock);
    // Subscribed before this read: whatever happens after it arrives as a message. A job
    // that ended before it has all its output (and maybe its `Ended`) queued already: the
    // end is published under the lock this read takes.
    let Some(job) = host.get(&sub.id) else {
        let _ = w.send(&Frame::Error("host: unknown job".into())).await;
        return;
    };
    // A job that already ended gets its opening with its end (below): `Success`, or only
    // an error for one that could not start.
    let mut announced = false;
    let first = match job.status {
        // (Said already to a client that waited for the job to be created.)
        JobStatus::Starting if !sub.pending => Some(Frame::Waiting),
        JobStatus::Starting => None,
        s if s.is_terminal() => None,
        _ => {
            announced = true;
            Some(Frame::Success)
        }
    };
    if let Some(f) = first {
        if w.send(&f).await.is_err() {
            return;
        }
    }
    let running = job.status == JobStatus::Running;
    let tty = job.job.config.tty;
    let mut end = job.status.is_terminal().then(|| Box::new(job));
    let mut input = Input {
        wants: flags & attach::STDIN != 0,
        stdin: None,
        pending: None,
        tty,
        size: sub.size.clone(),
    };
    // A job's stdin is there once its process is (input before that waits for it); so is
    // its terminal, which gets the client's size then.
    if running {
        input.started(&host, &sub.id, true);
    }
    // Frames read while the client waited for the job.
    if !client_frames(&host, &sub.id, &mut inbuf, &mut input) {
        return;
    }
    loop {
        let msg = if let Some(m) = early.take() {
            Some(m)
        } else if end.is_some() {
            // Ended before the read above: take what is queued, without waiting.
            match sub.rx.try_recv() {
                Ok(m) => Some(m),
                Err(_) => break,
            }
        } else {
            tokio::select! {
                msg = sub.rx.recv() => {
                    sub.took(&msg);
                    msg
                }
                permit = input.reserve(), if input.pending.is_some() => {
                    // A closed stdin discards the input.
                    if let (Some(p), Some(m)) = (permit, input.pending.take()) {
                        p.send(m);
                    }
                    if !client_frames(&host, &sub.id, &mut inbuf, &mut input) {
                        return;
                    }
                    continue;
                }
                // While input waits for the job, the client's next frames wait too (up to
                // a read-ahead, which still shows a client that left).
                n = rd.read(&mut chunk), if input.pending.is_none() || inbuf.len() < READ_AHEAD => {
                    // EOF or an error: the client left. (The protocol closes stdin with
                    // an empty data frame, not a half-close, and a client that went
                    // away must not hold a `disable_log` job's one attachment until the
                    // job next writes.)
                    let Ok(n @ 1..) = n else { return };
                    inbuf.extend_from_slice(&chunk[..n]);
                    if input.pending.is_none() && !client_frames(&host, &sub.id, &mut inbuf, &mut input) {
                        return;
                    }
                    continue;
                }
            }
        };
        let frame = match msg {
            Some(Msg::Ended(job)) => {
                end.get_or_insert(job);
                continue;
            }
            None => {
                let e = "host: attach client too slow, output dropped".to_string();
                let _ = w.send(&Frame::Error(e)).await;
                return;
            }
            Some(Msg::Started) => {
                input.started(&host, &sub.id, false);
                None
            }
            // Only ever the first message of a client waiting for its job (above).
            Some(Msg::Created | Msg::Refused(_)) => continue,
            Some(Msg::Output(stream, line)) => wants(stream).then(|| Frame::Data {
                stream: stream_id(stream),
                data: line,
            }),
        };
        if !announced {
            announced = true;
            if w.send(&Frame::Success).await.is_err() {
                return;
            }
        }
        if let Some(f) = frame {
            if w.send(&f).await.is_err() {
                return;
            }
        }
    }
    let Some(job) = end else { return };
    if let Some(e) = failure_of(&job) {
        let _ = w.send(&Frame::Error(e)).await;
        return;
    }
    if !announced && w.send(&Frame::Success).await.is_err() {
        return;
    }
    for s in [Stream::Stdout, Stream::Stderr] {
        if wants(s) {
            let eof = Frame::Data {
                stream: stream_id(s),
                data: Vec::new(),
            };
            if w.send(&eof).await.is_err() {
                return;
            }
        }
    }
    let _ = w.send(&Frame::Exit(exit_status(&job))).await;
    let _ = w.wr.shutdown().await;
}

fn failure(job: &ActiveJob) -> String {
    job.error.clone().unwrap_or_else(|| "job failed".into())
}

/// What an attached client is told instead of an exit status: why the job failed to start,
/// or why it crashed with no exit status known (its runtime lost it while it ran, e.g. its
/// shim); `None` when it exited, or was stopped (even before it started, or lost while
/// being stopped: exit 0, as for any stopped job).
fn failure_of(job: &ActiveJob) -> Option<String> {
    let lost =
        job.status == JobStatus::Crashed && job.exit_status.is_none() && job.signal.is_none();
    (job.status == JobStatus::Failed || lost).then(|| failure(job))
}

/// A client's way to the job's stdin.
struct Input {
    /// The client asked for stdin (allowed only for jobs created with it).
    wants: bool,
    /// The job's stdin, once its process runs (`None` before: input waits for it, or for
    /// the job's end, which discards it).
    stdin: Option<Stdin>,
    /// Input read from the client and not yet queued to the job.
    pending: Option<StdinMsg>,
    /// The job runs on a terminal.
    tty: bool,
    /// The window size the client asked for last (TTY jobs; shared with its entry in the
    /// job's list of clients, so a job starting later starts with it).
    size: Size,
}

impl Input {
    /// The job's process runs: its stdin is there. A client attaching to a running TTY job
    /// (`resize`) gives its terminal its size; when the job starts, the supervisor gives it
    /// the latest client's size once (each client applying its own then, in no fixed
    /// order, could leave an older client's size and a `SIGWINCH`).
    fn started(&mut self, host: &Host, id: &str, resize: bool) {
        if self.wants {
            self.stdin = host.stdin(id);
        }
        if let (true, true, Some((rows, cols))) = (resize, self.tty, self.size.get()) {
            host.resize(id, rows, cols);
        }
    }

    /// Room for the pending input in the job's queue (`None`: stdin was closed); never
    /// ready while the job has no stdin yet. The sender is cloned only while input is
    /// pending.
    fn reserve(&self) -> impl std::future::Future<Output = Option<mpsc::OwnedPermit<StdinMsg>>> {
        let tx = match (&self.pending, &self.stdin) {
            (Some(_), Some(s)) => Some(s.clone()),
            _ => None,
        };
        async move {
            match tx {
                Some(tx) => tx.reserve_owned().await.ok(),
                None => std::future::pending().await,
            }
        }
    }
}

/// Acts on the complete frames at the front of `inbuf` (the client's), up to the first
/// stdin data, which it leaves in `input.pending`; false when the client sent something it
/// may not (stdin data without the stdin flag; a server's frame; garbage), which closes the
/// connection.
fn client_frames(host: &Host, id: &str, inbuf: &mut Vec<u8>, input: &mut Input) -> bool {
    while input.pending.is_none() {
        // Data (stdin) without the flag is refused from its first byte, not buffered up to
        // a payload.
        if !input.wants && inbuf.first() == Some(&attach::DATA) {
            return false;
        }
        match Frame::decode(inbuf) {
            Ok(None) => return true,
            Ok(Some((frame, used))) => {
                inbuf.drain(..used);
                match frame {
                    Frame::Data {
                        stream: attach::STREAM_STDIN,
                        data,
                    } => {
                        input.pending = Some(if data.is_empty() {
                            StdinMsg::Close
                        } else {
                            StdinMsg::Data(data)
                        });
                    }
                    Frame::Signal(sig) => {
                        if let Err(e) = host.signal(id, sig as i32) {
                            tracing::debug!(job = %id, sig, error = %e.message, "attach: signal not sent");
                        }
                    }
                    // Ignored for a job without a terminal, and when a dimension is 0.
                    Frame::Resize { height, width } => {
                        if input.tty && height > 0 && width > 0 {
                            input.size.set(height, width);
                            host.resize(id, height, width);
                        }
                    }
                    _ => return false,
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// The client's side of the connection, with a bound on how long one frame may take (none
/// while the job's output waits for the client: from the end of that on).
struct Writer<W> {
    wr: W,
    buf: Vec<u8>,
    timeout: Duration,
    /// Set for a client the job's output waits for.
    blocking: Option<Blocking>,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    async fn send(&mut self, f: &Frame) -> std::io::Result<()> {
        let Writer {
            wr,
            buf,
            timeout,
            blocking,
        } = self;
        buf.clear();
        f.encode(buf);
        let write = async {
            wr.write_all(buf).await?;
            wr.flush().await
        };
        let timed_out = || Err(std::io::ErrorKind::TimedOut.into());
        match blocking {
            Some(b) if b.get() => {
                tokio::select! {
                    r = write => r,
                    _ = async {
                        b.ended().await;
                        tokio::time::sleep(*timeout).await;
                    } => timed_out(),
                }
            }
            _ => tokio::time::timeout(*timeout, write)
                .await
                .unwrap_or_else(|_| timed_out()),
        }
    }
}

fn stream_id(s: Stream) -> u8 {
    match s {
        Stream::Stdout => attach::STREAM_STDOUT,
        Stream::Stderr => attach::STREAM_STDERR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_that_ended_without_an_exit_status_is_an_error_not_exit_0() {
        let end = |status, exit_status, signal, error: Option<&str>| ActiveJob {
            status,
            exit_status,
            signal,
            error: error.map(str::to_string),
            ..ActiveJob::default()
        };
        let lost = Some("lost the job's shim");
        for (job, want) in [
            (
                end(JobStatus::Failed, None, None, Some("no image")),
                Some("no image"),
            ),
            (end(JobStatus::Failed, None, None, None), Some("job failed")),
            (end(JobStatus::Crashed, None, None, lost), lost),
            (end(JobStatus::Done, None, None, lost), None),
            (
                end(
                    JobStatus::Done,
                    None,
                    None,
                    Some("stopped before it started"),
                ),
                None,
            ),
            (end(JobStatus::Done, Some(0), None, None), None),
            (end(JobStatus::Crashed, Some(3), None, None), None),
            (end(JobStatus::Crashed, None, Some(9), None), None),
        ] {
            assert_eq!(failure_of(&job).as_deref(), want, "{job:?}");
        }
    }

    /// A client whose job's output no longer waits for it gets the time limit on a frame
    /// again, from then on (a frame already being written included).
    #[tokio::test]
    async fn a_frame_to_a_client_no_longer_holding_the_job_up_is_timed() {
        let (client, server) = tokio::io::duplex(64);
        let blocking = Blocking::new(true);
        let mut w = Writer {
            wr: server,
            buf: Vec::new(),
            timeout: Duration::from_millis(300),
            blocking: Some(blocking.clone()),
        };
        let big = Frame::Data {
            stream: attach::STREAM_STDOUT,
            data: vec![b'x'; 1024],
        };
        // The client reads nothing: no limit while it holds the job up.
        let sent = tokio::spawn(async move { w.send(&big).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!sent.is_finished(), "timed while it held the job up");
        blocking.set(false);
        let r = tokio::time::timeout(Duration::from_secs(5), sent)
            .await
            .expect("timed once it no longer holds the job up")
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
        drop(client);
    }
}
