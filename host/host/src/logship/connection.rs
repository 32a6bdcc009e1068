//! One aggregator's connection: connecting, what the disk log holds sent first, then the
//! queue's frames in batches.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::marks::{min_pos, Dropped};
use super::recent::Recent;
use super::{Dest, Frame};

/// Sets TCP keepalive and `TCP_USER_TIMEOUT` on the aggregator connection, so one whose
/// peer vanished (a host that lost power) fails within about half a minute instead of
/// taking writes into its buffer for many minutes.
fn set_timeouts(conn: &tokio::net::TcpStream) {
    let sock = socket2::SockRef::from(conn);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    let _ = sock.set_tcp_keepalive(&ka);
    let _ = sock.set_tcp_user_timeout(Some(Duration::from_secs(30)));
}

enum Resend {
    /// What was due was written; where the due frames among it started, if any.
    Done(Option<crate::logdisk::Pos>),
    /// No disk log.
    NotAvailable,
    WriteFailed,
    /// The disk log could not be read (its writer failed or is far behind): due frames
    /// stay due, recent frames go from memory.
    ReadFailed,
}

/// Why [`resend_from_disk`] runs.
enum Start {
    /// A new connection, with the lowest disk position of the recent frames (if they are to
    /// come from the disk; used only without a cursor) and where the last resend of due
    /// frames started (if within [`RECENT_AGE`]).
    Connect {
        recent: Option<crate::logdisk::Pos>,
        resent: Option<crate::logdisk::Pos>,
    },
    /// The queue dropped frames while connected, now drained.
    Resync,
}

/// Writes frames from the disk log: the range the queue dropped (see [`Dropped`]), and on a
/// new connection also what follows the aggregator's cursor for this host (`GET /cursors`,
/// with `--logagg-api`) or else the recent frames, up to where the send queue starts, or
/// to the end of the dropped range if that is further (the queue follows). Dropped lines the disk no longer has get their notice. A failed write
/// leaves the dropped range due for the next attempt.
async fn resend_from_disk(s: &Arc<Dest>, conn: &mut tokio::net::TcpStream, start: Start) -> Resend {
    let Some(disk) = s.disk.clone() else {
        return Resend::NotAvailable;
    };
    let connect = match start {
        Start::Connect { recent, resent } => Some((recent, resent)),
        Start::Resync => None,
    };
    let cursor = match (&connect, s.api.as_deref()) {
        (Some(_), Some(api)) => cursor_of(api, &s.host).await,
        _ => None,
    };
    let disk2 = disk.clone();
    let point = match cursor {
        Some(c) => match tokio::task::spawn_blocking(move || disk2.resume_point(c)).await {
            Ok(Ok((p, reaches))) => {
                if !reaches {
                    // Per app it is not known which lines those were: no notice, a warning.
                    tracing::warn!(api = s.api.as_deref().unwrap_or(""), "lines between the aggregator's cursor and the start of the host's log are gone");
                }
                Some(p)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading the host's log from disk failed");
                None
            }
            Err(_) => None,
        },
        None => None,
    };
    let dropped = {
        let mut d = s.due.lock().unwrap_or_else(|e| e.into_inner());
        let dropped = std::mem::take(&mut d.dropped);
        // Being resent: the due mark keeps them (a drop meanwhile must not move it past).
        d.floor = min_pos(d.floor, dropped.range.map(|r| r.0));
        dropped
    };
    let min = min_pos;
    let due_from = dropped.range.map(|r| r.0);
    let (from, to) = match connect {
        // Up to the queue, or to the end of what it dropped if that is further (it keeps a
        // quiet app's old frames while a chatty app's later ones leave; queued frames in
        // between go out twice). With a cursor, what precedes it arrived (except due frames
        // resent lately, which went out after newer ones); without one, the recent frames
        // may not have.
        Some((recent, resent)) => {
            let from = match point {
                Some(p) => min(min(due_from, Some(p)), resent),
                None => min(min(due_from, recent), resent),
            };
            // The queue's first frame, or with an empty queue the disk's end now: frames
            // pushed after this go out through the queue. Read under the push lock, so
            // the two agree.
            let until = {
                let _order = s.order.lock().unwrap_or_else(|e| e.into_inner());
                let q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
                q.first_pos().unwrap_or_else(|| disk.end())
            };
            let until = match dropped.range {
                Some((_, end)) => until.max(end),
                None => until,
            };
            (from, Some(until))
        }
        None => (due_from, dropped.range.map(|r| r.1)),
    };
    let Some(from) = from else {
        return Resend::Done(None);
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(2);
    let disk2 = disk.clone();
    let reader = tokio::task::spawn_blocking(move || {
        disk2.read_range(from, to, |chunk| tx.blocking_send(chunk.to_vec()).is_ok())
    });
    let mut sent = 0usize;
    while let Some(chunk) = rx.recv().await {
        let res = tokio::time::timeout(Duration::from_secs(30), conn.write_all(&chunk)).await;
        if !matches!(res, Ok(Ok(()))) {
            // Due again on the next connection.
            s.due_again(dropped);
            s.resync.store(true, Ordering::Relaxed);
            return Resend::WriteFailed;
        }
        sent += chunk.len();
    }
    if !matches!(reader.await, Ok(Ok(()))) {
        tracing::warn!("reading the host's log from disk failed; due lines stay due");
        s.due_again(dropped);
        return Resend::ReadFailed;
    }
    // Checked after the read: a segment dropped meanwhile was read as empty.
    let covered = dropped.range.is_none_or(|(a, _)| disk.holds(a));
    if !covered {
        tracing::warn!(
            "some dropped lines had left the host's log before they could be sent again"
        );
        for (app, n) in dropped.by_app {
            s.dropped.fetch_add(n, Ordering::Relaxed);
            s.note_lost(app, n);
        }
    }
    if sent > 0 {
        tracing::info!(bytes = sent, "resent lines from the host's log");
    }
    s.settle_due(due_from);
    Resend::Done(due_from)
}

/// This host's cursor in the aggregator at `api`; `None` when it has none or cannot say.
async fn cursor_of(api: &str, host: &str) -> Option<crate::logdisk::CursorKey> {
    let client = flynn_client::logagg::Client::new(api);
    // Three tries a second apart: an aggregator that just came back may take its syslog
    // connections a moment before its API answers, and without the cursor a restarted
    // daemon has no recent lines to fall back on.
    for attempt in 1..=3 {
        let why = match tokio::time::timeout(Duration::from_secs(3), client.cursors()).await {
            Ok(Ok(c)) => {
                return Some(c.get(host).and_then(|c| {
                    let t = flynn_syslog::Timestamp::parse(c.time.as_bytes())?;
                    Some((t, c.seq))
                }))
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        if attempt == 3 {
            tracing::warn!(api, error = %why, "cannot read the log aggregator's cursors; resending the recent lines only");
        } else {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    None
}

pub(super) async fn run(s: Arc<Dest>, addr: String) {
    let mut backoff = Duration::from_millis(100);
    let mut recent = Recent::default();
    // Sent again on the first connection that has no cursor (see `Dest::load_unacked`).
    let mut restart_from = s
        .restart_from
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    let mut marks_at = tokio::time::Instant::now();
    // A resync whose disk read failed is tried again after a pause, not at once.
    let mut resync_after = tokio::time::Instant::now();
    loop {
        let conn = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(&addr),
        )
        .await;
        let mut conn = match conn {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, addr = %addr, "log aggregator connect failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            Err(_) => continue,
        };
        let _ = conn.set_nodelay(true);
        set_timeouts(&conn);
        // The recent frames come from the disk log when it has them all, else as kept.
        let now = tokio::time::Instant::now();
        let recent_from = if s.disk.is_some() {
            recent.first_pos(now)
        } else {
            None
        };
        let again = match recent_from {
            Some(_) => Vec::new(),
            None => recent.take_bytes(now),
        };
        recent.prune(now);
        let resent = recent.resent_from();
        let start = Start::Connect {
            recent: [recent_from.flatten(), restart_from]
                .into_iter()
                .flatten()
                .min(),
            resent,
        };
        let again = match resend_from_disk(&s, &mut conn, start).await {
            Resend::WriteFailed => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            Resend::Done(due_from) => {
                // What was resent may still be in flight: the marks keep it for 45 s
                // from now.
                let done = tokio::time::Instant::now();
                let resent = [due_from, restart_from.take(), recent_from.flatten()];
                for from in resent.into_iter().flatten() {
                    recent.note_resent(done, from);
                }
                again
            }
            Resend::NotAvailable => again,
            Resend::ReadFailed => {
                // The previous daemon's range becomes due: the resync sends it once the disk
                // reads again (the marks keep it meanwhile).
                if let Some(from) = restart_from.take() {
                    s.due_again(Dropped {
                        range: Some((from, s.disk.as_ref().map_or(from, |d| d.end()))),
                        by_app: Default::default(),
                    });
                    s.resync.store(true, Ordering::Relaxed);
                    resync_after = tokio::time::Instant::now() + Duration::from_secs(5);
                }
                // The disk could not give the recent frames: from memory then.
                if again.is_empty() {
                    recent.take_bytes(now)
                } else {
                    again
                }
            }
        };
        if !again.is_empty() {
            let res = tokio::time::timeout(Duration::from_secs(5), conn.write_all(&again)).await;
            if !matches!(res, Ok(Ok(()))) {
                // An aggregator that takes connections and drops them: not a fast loop.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            tracing::debug!(frames = recent.frames.len(), "wrote the last frames again");
        }
        let connected_at = tokio::time::Instant::now();
        s.connected.store(true, Ordering::Relaxed);
        tracing::info!(addr = %addr, "connected to the log aggregator");
        loop {
            // Notices first (place 0: put back, they stay ahead of their app's lines).
            let mut batch: Vec<(u64, Frame)> =
                s.take_notices().into_iter().map(|f| (0, f)).collect();
            {
                let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
                batch.extend(q.take(256));
            }
            if batch.is_empty()
                && tokio::time::Instant::now() >= resync_after
                && s.resync.swap(false, Ordering::Relaxed)
            {
                // The queue overflowed while connected (an output burst faster than the
                // aggregator takes it): what it dropped is on the disk log.
                match resend_from_disk(&s, &mut conn, Start::Resync).await {
                    Resend::WriteFailed => break,
                    Resend::Done(Some(from)) => {
                        recent.note_resent(tokio::time::Instant::now(), from);
                        continue;
                    }
                    Resend::ReadFailed => {
                        s.resync.store(true, Ordering::Relaxed);
                        resync_after = tokio::time::Instant::now() + Duration::from_secs(5);
                        continue;
                    }
                    Resend::Done(None) | Resend::NotAvailable => continue,
                }
            }
            if batch.is_empty() {
                // Wake on new lines; poll now and then to notice a closed connection.
                tokio::select! {
                    _ = s.notify.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                        let now = tokio::time::Instant::now();
                        if now.duration_since(marks_at) >= Duration::from_secs(1) {
                            marks_at = now;
                            s.tick_marks(&mut recent, restart_from, now);
                        }
                        let mut probe = [0u8; 1];
                        match conn.try_read(&mut probe) {
                            Ok(0) => break,
                            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => break,
                            _ => {}
                        }
                    }
                }
                continue;
            }
            let mut buf = Vec::with_capacity(batch.iter().map(|(_, (_, f, _))| f.len()).sum());
            for (_, (_, f, _)) in &batch {
                buf.extend_from_slice(f);
            }
            let res = tokio::time::timeout(Duration::from_secs(5), conn.write_all(&buf)).await;
            if matches!(res, Ok(Ok(()))) {
                s.shipped.fetch_add(batch.len() as u64, Ordering::Relaxed);
                let now = tokio::time::Instant::now();
                for (_, f) in batch {
                    recent.push(f, now);
                }
                if now.duration_since(marks_at) >= Duration::from_secs(1) {
                    marks_at = now;
                    s.tick_marks(&mut recent, restart_from, now);
                }
                continue;
            }
            // Put the batch back (oldest first), within capacity.
            let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
            for (n, f) in batch.into_iter().rev() {
                q.push_front(n, f);
            }
            let lost_frames = q.evict(s.capacity);
            drop(q);
            let lost = s.lost(lost_frames);
            if lost > 0 {
                s.dropped.fetch_add(lost, Ordering::Relaxed);
            }
            break;
        }
        s.connected.store(false, Ordering::Relaxed);
        tracing::warn!(addr = %addr, "lost the log aggregator connection; buffering");
        // A connection that lasted is followed by a quick reconnect; one the aggregator
        // dropped at once (overloaded, misconfigured) by a growing pause.
        if connected_at.elapsed() >= Duration::from_secs(5) {
            backoff = Duration::from_millis(100);
        } else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}
