//! Snapshots and peer replication (spec §3.4 `/snapshot`, §3.5).
//!
//! Format (`application/vnd.flynn.logaggregator-snapshot`): RFC 6587 octet-counted
//! records, so the same [`Framer`] reads it. A record is `M <unix-nanos> <r|m> <app> <frame>`
//! for a buffered line (`r` = kept raw; `frame` is the original syslog frame, byte for
//! byte), `E` when the snapshot is complete (live lines follow with `?follow=true`) and
//! `K` as a keep-alive.
//!
//! A starting aggregator loads every peer's snapshot before it serves, then keeps
//! following; replays are ignored by the store's dedupe (same time and content), so two
//! aggregators following each other converge without loops. Every (re)connect starts with
//! the peer's whole buffer: once an app has evicted lines here, a replayed line older than
//! every line it still buffers is refused ([`crate::store::Store::insert_from_peer`]), so
//! lines this instance dropped do not come back; live lines after the end marker are not.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::BytesMut;
use flynn_syslog::{parse_fields, Fields, Framer, Timestamp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::ingest::Shared;
use crate::line::Line;
use crate::metrics::Counters;

pub const CONTENT_TYPE: &str = "application/vnd.flynn.logaggregator-snapshot";

/// Appends one line as a snapshot record (written straight into `out`: no string per
/// record).
pub fn encode_line(out: &mut Vec<u8>, app: &[u8], line: &Line) {
    use std::io::Write;
    let frame = line.msg.frame();
    let kind = if line.msg.is_raw() { 'r' } else { 'm' };
    // `M <nanos> <r|m> <app> <frame>`.
    let len = 2 + decimal_len(line.ts.0) + 3 + app.len() + 1 + frame.len();
    // Writing to a `Vec` cannot fail.
    let _ = write!(out, "{len} M {} {kind} ", line.ts.0);
    out.extend_from_slice(app);
    out.push(b' ');
    out.extend_from_slice(frame);
}

/// Characters of `v` in decimal.
fn decimal_len(v: i64) -> usize {
    let digits = v
        .unsigned_abs()
        .checked_ilog10()
        .map_or(1, |d| d as usize + 1);
    digits + usize::from(v < 0)
}

pub const END: &[u8] = b"1 E";
pub const KEEPALIVE: &[u8] = b"1 K";

/// One decoded record.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    Line {
        ts: Timestamp,
        app: &'a [u8],
        frame: &'a [u8],
        fields: Fields,
    },
    End,
    KeepAlive,
}

pub fn decode(rec: &[u8]) -> Option<Record<'_>> {
    match rec {
        b"E" => return Some(Record::End),
        b"K" => return Some(Record::KeepAlive),
        _ => {}
    }
    let rest = rec.strip_prefix(b"M ")?;
    let mut parts = rest.splitn(4, |&b| b == b' ');
    let ts: i64 = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let raw = match parts.next()? {
        b"r" => true,
        b"m" => false,
        _ => return None,
    };
    let app = parts.next()?;
    let frame = parts.next()?;
    let fields = if raw {
        Fields::raw(frame.len())
    } else {
        parse_fields(frame).unwrap_or_else(|_| Fields::raw(frame.len()))
    };
    Some(Record::Line {
        ts: Timestamp(ts),
        app,
        frame,
        fields,
    })
}

/// `http://host:port[/]` → (`host:port`, base path without trailing slash).
pub fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// peers are supported")?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if host.is_empty() {
        return Err("missing host".into());
    }
    let host = if host.contains(':') && !host.ends_with(']') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    Ok((host, path.to_string()))
}

/// One pass: connect, stream `/snapshot?follow=true` into the store. Calls `on_end` when
/// the snapshot part is loaded. Returns when the peer closes the stream.
async fn pass(shared: &Shared, url: &str, on_end: &mut (dyn FnMut() + Send)) -> anyhow::Result<()> {
    let (host, base) = parse_url(url).map_err(anyhow::Error::msg)?;
    let mut s = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(&host),
    )
    .await
    .context("connect timed out")?
    .with_context(|| format!("connecting to {host}"))?;
    // HTTP/1.0: the body is delimited by the connection closing, no chunked decoding.
    let req = format!("GET {base}/snapshot?follow=true HTTP/1.0\r\nHost: {host}\r\nAccept: {CONTENT_TYPE}\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 16 * 1024 {
            bail!("response head too large");
        }
        if tokio::time::timeout(Duration::from_secs(10), s.read_buf(&mut buf))
            .await
            .context("response timed out")??
            == 0
        {
            bail!("peer closed before responding");
        }
    };
    let status_ok = buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200");
    if !status_ok {
        bail!(
            "peer answered {:?}",
            String::from_utf8_lossy(&buf[..buf.len().min(40)])
        );
    }
    let _ = buf.split_to(head_end);
    let framer = Framer::new(65_535 + 256);
    // The peer's buffer, up to its end marker; live lines after it.
    let mut replaying = true;
    let c: &Counters = shared.peer_counters();
    loop {
        while let Some(rec) = framer
            .next_frame(&mut buf)
            .map_err(|e| anyhow::anyhow!("bad snapshot framing: {e}"))?
        {
            match decode(&rec) {
                Some(Record::Line {
                    ts,
                    app,
                    frame,
                    fields,
                }) => {
                    Counters::inc(&c.messages_total);
                    Counters::add(&c.bytes_total, frame.len() as u64);
                    let outcome = if replaying {
                        shared.store.insert_from_peer(app, frame, &fields, ts)
                    } else {
                        shared.store.insert(app, frame, &fields, ts)
                    };
                    if outcome == crate::store::Outcome::Duplicate {
                        Counters::inc(&c.duplicates_total);
                    }
                }
                Some(Record::End) => {
                    replaying = false;
                    on_end();
                }
                Some(Record::KeepAlive) => {}
                None => bail!("bad snapshot record"),
            }
        }
        buf.reserve(64 * 1024);
        // Peers send a keep-alive every 10 s; silence for longer means it is gone.
        match tokio::time::timeout(Duration::from_secs(30), s.read_buf(&mut buf)).await {
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => bail!("peer silent for 30 s"),
        }
    }
}

/// Follows `url` forever, reconnecting with backoff. `ready` fires once: after the first
/// snapshot is loaded, or after the first failed attempt (a dead peer does not block
/// start-up).
pub async fn follow(shared: Arc<Shared>, url: String, ready: tokio::sync::oneshot::Sender<()>) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut on_end = || {
            if let Some(r) = ready.take() {
                let _ = r.send(());
            }
        };
        match pass(&shared, &url, &mut on_end).await {
            Ok(()) => {
                tracing::info!(peer = %url, "peer stream ended; reconnecting");
                backoff = Duration::from_millis(100);
            }
            Err(e) => tracing::warn!(peer = %url, error = %format!("{e:#}"), "peer sync failed"),
        }
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip() {
        for frame in [
            "<190>1 2009-11-10T23:00:00Z h app web.1 ID1 [flynn seq=\"1\"] hi there",
            "raw junk line",
        ] {
            let f = parse_fields(frame.as_bytes()).unwrap_or_else(|_| Fields::raw(frame.len()));
            let line = Line::new(3, Timestamp(42), frame.as_bytes(), &f);
            let mut out = Vec::new();
            encode_line(&mut out, b"app", &line);
            out.extend_from_slice(END);
            let mut buf = BytesMut::from(&out[..]);
            let fr = Framer::new(70_000);
            let rec = fr.next_frame(&mut buf).unwrap().unwrap();
            match decode(&rec).unwrap() {
                Record::Line {
                    ts,
                    app,
                    frame: got,
                    fields,
                } => {
                    assert_eq!(
                        (ts, app, got),
                        (Timestamp(42), &b"app"[..], frame.as_bytes())
                    );
                    assert_eq!(fields, f);
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(
                decode(&fr.next_frame(&mut buf).unwrap().unwrap()),
                Some(Record::End)
            );
        }
    }

    /// Records are what `format!` made of them, at every number of digits and sign.
    #[test]
    fn records_are_written_in_place_as_before() {
        let frame = "<190>1 2009-11-10T23:00:00Z h app web.1 ID1 - x";
        let f = parse_fields(frame.as_bytes()).unwrap();
        let mut times = vec![0, -1, i64::MIN, i64::MAX, 1_257_894_000_123_456_789];
        for d in 0..19 {
            let p = 10i64.pow(d);
            times.extend([p - 1, p, -p, 1 - p]);
        }
        for ts in times {
            let line = Line::new(1, Timestamp(ts), frame.as_bytes(), &f);
            let mut out = Vec::new();
            encode_line(&mut out, b"app", &line);
            let body = format!("M {ts} m app {frame}");
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("{} {body}", body.len())
            );
        }
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:5141").unwrap(),
            ("127.0.0.1:5141".into(), "".into())
        );
        assert_eq!(
            parse_url("http://logagg/").unwrap(),
            ("logagg:80".into(), "".into())
        );
        assert_eq!(
            parse_url("http://h:1/base/").unwrap(),
            ("h:1".into(), "/base".into())
        );
        assert!(parse_url("https://h").is_err());
    }
}
