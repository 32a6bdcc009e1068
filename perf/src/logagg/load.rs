//! The syslog load: pre-built octet-counted RFC 5424 frames in Flynn's format, blasted over
//! plain TCP connections from std threads; timestamped marker lines and a follower that
//! measures how long they take to come back out of `GET /log/:app?follow=true`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Bytes per `write` call of a sender (rounded down to whole frames).
pub const WRITE_BYTES: usize = 256 * 1024;
/// The app the marker lines go to (and the follower reads).
pub const MARKER_APP: &str = "perf-follow";
/// Smallest payload that still holds the header and some text.
pub const MIN_SIZE: usize = 160;
const PREFIX: &str = "<190>1 ";
/// Offset of the 4-digit run tag in each payload: `<190>1 ` + 27-byte timestamp + ` host`.
const TAG_AT: usize = PREFIX.len() + 27 + 1 + 4;
const FILLER: &[u8] = b"user=alice path=/api/v1/widgets/list status=200 bytes=5120 duration_ms=12 \
    ua=Mozilla/5.0 ref=https://dashboard.example.com/apps region=us-east-1 cache=miss ";

/// `count` frames of exactly `frame_len` bytes each, back to back.
pub struct Load {
    buf: Vec<u8>,
    pub count: usize,
    /// RFC 5424 message bytes per frame (what rsyslog's `%rawmsg%` writes).
    pub payload: usize,
    pub frame_len: usize,
    pub apps: usize,
}

/// An app id shaped like Flynn's (a UUID), stable for index `i`.
fn app_id(i: usize) -> String {
    let h = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xfff,
        (h >> 20) & 0xfff,
        i
    )
}

/// `2026-11-26T10:00:00.000000Z` plus `us` microseconds (27 bytes).
fn timestamp(us: u64) -> String {
    let secs = 10 * 3600 + us / 1_000_000;
    format!(
        "2026-11-26T{:02}:{:02}:{:02}.{:06}Z",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        us % 1_000_000
    )
}

impl Load {
    /// Builds `count` messages of `payload` bytes each (clamped to 160..=8000), message `i`
    /// going to app `i % apps`, sequence number `i`, timestamp base + `i` µs.
    pub fn build(count: usize, payload: usize, apps: usize) -> Load {
        let payload = payload.clamp(MIN_SIZE, 8000);
        let apps = apps.max(1);
        let prefix = format!("{payload} ");
        let frame_len = prefix.len() + payload;
        let ids: Vec<String> = (0..apps).map(app_id).collect();
        let mut buf = Vec::with_capacity(count * frame_len);
        for i in 0..count {
            let start = buf.len();
            buf.extend_from_slice(prefix.as_bytes());
            let head = format!(
                "{PREFIX}{} host0000 {} web.job-{} ID{} [flynn seq=\"{i}\"] GET /v1/items/{i} ",
                timestamp(i as u64),
                ids[i % apps],
                i % 7 + 1,
                if i % 10 == 9 { 2 } else { 1 },
            );
            buf.extend_from_slice(head.as_bytes());
            let mut k = 0;
            while buf.len() < start + frame_len {
                buf.push(FILLER[k % FILLER.len()]);
                k += 1;
            }
            debug_assert_eq!(buf.len(), start + frame_len);
        }
        Load {
            buf,
            count,
            payload,
            frame_len,
            apps,
        }
    }

    /// Writes `run` (mod 10 000) into every message's hostname (`host0000`), so no run
    /// repeats an earlier run's lines (the aggregator ignores replays of buffered lines).
    pub fn set_run_tag(&mut self, run: usize) {
        self.set_tags(run, 1, false);
    }

    /// Like [`Load::set_run_tag`] for a run over `conns` senders (each sends one contiguous
    /// slice, as `run_one` splits the load). With `host_per_conn` each slice gets its own
    /// hostname (`run * 32 + conn`), as when every connection is a different host shipping
    /// its own sequence; otherwise all slices are one host whose sequence arrives split
    /// over the connections.
    pub fn set_tags(&mut self, run: usize, conns: usize, host_per_conn: bool) {
        let off = self.frame_len - self.payload + TAG_AT;
        let per = self.count.div_ceil(conns.max(1));
        for i in 0..self.count {
            let tag = if host_per_conn {
                (run * 32 + i / per.max(1)) % 10_000
            } else {
                run % 10_000
            };
            let tag = format!("{tag:04}");
            let at = i * self.frame_len + off;
            self.buf[at..at + 4].copy_from_slice(tag.as_bytes());
        }
    }

    /// Frames `[a, b)` as one byte slice.
    fn frames(&self, a: usize, b: usize) -> &[u8] {
        &self.buf[a * self.frame_len..b * self.frame_len]
    }

    /// The first frame, for documentation.
    pub fn sample(&self) -> String {
        String::from_utf8_lossy(self.frames(0, 1.min(self.count))).into_owned()
    }
}

/// What one sender did.
#[derive(Debug)]
pub struct Sent {
    /// Whole frames written.
    pub frames: usize,
    /// Why it stopped before its slice was written and before the deadline (the target
    /// stopped reading), if it did.
    pub stalled: Option<String>,
}

/// How long a blocked write may wait: the time left until `deadline` (none: 0) plus `stall`.
/// Also the bound on a sender's whole run from the moment it starts.
pub fn write_limit(deadline: Option<Instant>, stall: Duration) -> Duration {
    deadline.map_or(Duration::ZERO, |d| {
        d.saturating_duration_since(Instant::now())
    }) + stall
}

/// One sender: connect, wait at `ready` until every sender has connected, at `go` for the
/// start, then write frames `[a, b)` in `WRITE_BYTES` writes, stopping early (on a frame
/// boundary) at `deadline` (set before `go`). A write that blocks, or a run that goes on,
/// past the deadline plus `stall` means the target has stopped reading: the sender gives up
/// and says so in [`Sent::stalled`] instead of blocking the harness.
pub fn send(
    load: &Load,
    addr: SocketAddr,
    (a, b): (usize, usize),
    (ready, go): (&Barrier, &Barrier),
    deadline: &std::sync::OnceLock<Instant>,
    stall: Duration,
) -> Result<Sent> {
    let conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5));
    ready.wait();
    go.wait();
    let mut conn = conn.with_context(|| format!("connecting to {addr}"))?;
    let deadline = deadline.get().copied();
    let limit = write_limit(deadline, stall);
    let give_up = Instant::now() + limit;
    conn.set_write_timeout(Some(limit))
        .context("setting the write timeout")?;
    let bytes = load.frames(a, b);
    let per_write = (WRITE_BYTES / load.frame_len).max(1) * load.frame_len;
    let (mut off, mut end) = (0, 0);
    let mut stalled = None;
    loop {
        if off == end {
            // On a frame boundary: the next write, unless done or out of time.
            if off == bytes.len() || deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            end = (off + per_write).min(bytes.len());
        }
        match conn.write(&bytes[off..end]) {
            Ok(0) => anyhow::bail!("writing to {addr}: connection closed"),
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                stalled = Some(format!(
                    "a sender's write blocked for {:.1} s (the target stopped reading)",
                    limit.as_secs_f64()
                ));
                break;
            }
            Err(e) => return Err(e).with_context(|| format!("writing to {addr}")),
        }
        if off < bytes.len() && Instant::now() >= give_up {
            stalled = Some(format!(
                "a sender was still writing {:.1} s after the start (deadline + stall bound)",
                limit.as_secs_f64()
            ));
            break;
        }
    }
    let _ = conn.flush();
    Ok(Sent {
        frames: off / load.frame_len,
        stalled,
    })
}

/// The RFC 5424 payload of marker `k`, carrying its send time in ns since `base`.
fn marker(k: u64, ns: u128) -> Vec<u8> {
    let msg = format!(
        "{PREFIX}{} host0000 {MARKER_APP} web.marker ID1 [flynn seq=\"{k}\"] mark {k} {ns}",
        timestamp(k)
    );
    let mut out = format!("{} ", msg.len()).into_bytes();
    out.extend_from_slice(msg.as_bytes());
    out
}

/// Sends a marker line every `interval` on its own connection until `stop`; counts them.
/// Writes are bounded by `limit` ([`write_limit`]): a blocked one means the target stopped
/// reading, returned as `Ok(Some(why))` (a stall) instead of blocking the harness.
pub fn send_markers(
    addr: SocketAddr,
    interval: Duration,
    base: Instant,
    limit: Duration,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> Result<Option<String>> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("marker connection to {addr}"))?;
    conn.set_nodelay(true)?;
    conn.set_write_timeout(Some(limit))?;
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        let frame = marker(k, base.elapsed().as_nanos());
        match conn.write_all(&frame) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Some(format!(
                    "a marker write blocked for {:.1} s (the target stopped reading)",
                    limit.as_secs_f64()
                )));
            }
            Err(e) => return Err(e).context("writing a marker"),
        }
        sent.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(interval);
    }
    Ok(None)
}

/// What a follower saw.
#[derive(Default)]
pub struct Followed {
    /// Send-to-receive latency of every marker received, µs.
    pub latencies_us: Vec<f64>,
    pub error: Option<String>,
}

/// Follows `GET /log/perf-follow?follow=true&lines=0` on `api`, sets `ready` once the
/// response head has arrived, and records each marker's latency until `stop`.
pub fn follow(api: SocketAddr, base: Instant, ready: &AtomicBool, stop: &AtomicBool) -> Followed {
    let mut out = Followed::default();
    if let Err(e) = follow_inner(api, base, ready, stop, &mut out) {
        out.error = Some(format!("{e:#}"));
    }
    ready.store(true, Ordering::Relaxed);
    out
}

fn follow_inner(
    api: SocketAddr,
    base: Instant,
    ready: &AtomicBool,
    stop: &AtomicBool,
    out: &mut Followed,
) -> Result<()> {
    let mut conn = TcpStream::connect_timeout(&api, Duration::from_secs(5))
        .with_context(|| format!("follower connection to {api}"))?;
    conn.set_read_timeout(Some(Duration::from_millis(50)))?;
    write!(
        conn,
        "GET /log/{MARKER_APP}?follow=true&lines=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    )?;
    let mut pending: Vec<u8> = Vec::new();
    let mut head_seen = false;
    let mut chunk = vec![0u8; 64 * 1024];
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let n = match conn.read(&mut chunk) {
            Ok(0) => anyhow::bail!("the aggregator closed the follow stream"),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if !head_seen && started.elapsed() > Duration::from_secs(5) {
                    anyhow::bail!("no response head within 5 s");
                }
                continue;
            }
            Err(e) => return Err(e).context("reading the follow stream"),
        };
        let now_ns = base.elapsed().as_nanos();
        pending.extend_from_slice(&chunk[..n]);
        if !head_seen {
            let Some(end) = find(&pending, b"\r\n\r\n") else {
                continue;
            };
            if !pending.starts_with(b"HTTP/1.1 200") {
                anyhow::bail!(
                    "follow request refused: {:?}",
                    String::from_utf8_lossy(&pending[..end.min(200)])
                );
            }
            pending.drain(..end + 4);
            head_seen = true;
            ready.store(true, Ordering::Relaxed);
        }
        // Chunked transfer encoding puts its size lines between NDJSON lines (each body chunk
        // is whole lines), so splitting on '\n' yields every JSON line intact.
        let mut consumed = 0;
        while let Some(nl) = pending[consumed..].iter().position(|b| *b == b'\n') {
            let line = &pending[consumed..consumed + nl];
            if let Some(ns) = marker_ns(line) {
                out.latencies_us
                    .push(now_ns.saturating_sub(ns) as f64 / 1000.0);
            }
            consumed += nl + 1;
        }
        pending.drain(..consumed);
    }
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The send time in a JSON line whose `msg` is `mark K NS`.
fn marker_ns(line: &[u8]) -> Option<u128> {
    const KEY: &[u8] = b"\"msg\":\"mark ";
    let at = find(line, KEY)? + KEY.len();
    let text = std::str::from_utf8(&line[at..]).ok()?;
    let text = &text[..text.find('"')?];
    text.split(' ').nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_fixed_size_and_tagged() {
        let mut l = Load::build(1000, 200, 100);
        assert_eq!(l.frame_len, 204);
        l.set_run_tag(42);
        for i in [0, 1, 999] {
            let f = std::str::from_utf8(l.frames(i, i + 1)).unwrap();
            assert!(f.starts_with("200 <190>1 2026-11-26T10:00:00."), "{f}");
            assert!(f.contains(" host0042 "), "{f}");
            assert!(f.contains(&format!("[flynn seq=\"{i}\"]")), "{f}");
            assert_eq!(f.len(), 204);
        }
        assert_eq!(timestamp(3_600_000_001), "2026-11-26T11:00:00.000001Z");
        // One host per connection: each sender's slice has its own hostname.
        l.set_tags(3, 4, true);
        let host = |i: usize| {
            let f = std::str::from_utf8(l.frames(i, i + 1)).unwrap().to_string();
            f.split(' ').nth(3).unwrap().to_string()
        };
        assert_eq!(host(0), "host0096");
        assert_eq!(host(249), "host0096");
        assert_eq!(host(250), "host0097");
        assert_eq!(host(999), "host0099");
    }

    #[test]
    fn parses_markers() {
        let line = br#"{"host_id":"host0000","job_id":"marker","msg":"mark 7 123456789","process_type":"web","source":"app"}"#;
        assert_eq!(marker_ns(line), Some(123456789));
        assert_eq!(marker_ns(b"{\"msg\":\"other\"}"), None);
        let m = marker(3, 99);
        let s = String::from_utf8(m).unwrap();
        let (len, rest) = s.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), rest.len());
    }

    /// Runs `f` on a thread; its result, or `None` if it has not returned within `secs`.
    fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(secs)).ok()
    }

    /// A target that accepts the connection and never reads: the sender must give up (a
    /// stall) instead of blocking in `write` for ever.
    #[test]
    fn sender_gives_up_on_a_target_that_stops_reading() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let held = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_secs(20));
            drop(s);
        });
        // 64 MiB: more than loopback's socket buffers hold.
        let load = Load::build(8000, 8000, 1);
        let sent = within(15, move || {
            let (ready, go) = (Barrier::new(2), Barrier::new(2));
            let deadline = std::sync::OnceLock::new();
            std::thread::scope(|s| {
                let h = s.spawn(|| {
                    send(
                        &load,
                        addr,
                        (0, load.count),
                        (&ready, &go),
                        &deadline,
                        Duration::from_millis(300),
                    )
                });
                ready.wait();
                let _ = deadline.set(Instant::now() + Duration::from_millis(200));
                go.wait();
                h.join().unwrap()
            })
        })
        .expect("the sender blocked on a target that stopped reading");
        let sent = sent.unwrap();
        assert!(sent.stalled.is_some(), "{sent:?}");
        assert!(sent.frames < 8000, "{sent:?}");
        drop(held);
    }

    #[test]
    fn sender_writes_everything_to_a_reading_target() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut all = Vec::new();
            s.read_to_end(&mut all).unwrap();
            all.len()
        });
        let load = Load::build(5000, 200, 10);
        let (ready, go) = (Barrier::new(2), Barrier::new(2));
        let deadline = std::sync::OnceLock::new();
        let sent = std::thread::scope(|s| {
            let h = s.spawn(|| {
                send(
                    &load,
                    addr,
                    (0, load.count),
                    (&ready, &go),
                    &deadline,
                    Duration::from_secs(10),
                )
            });
            ready.wait();
            let _ = deadline.set(Instant::now() + Duration::from_secs(30));
            go.wait();
            h.join().unwrap().unwrap()
        });
        assert_eq!(sent.frames, 5000);
        assert!(sent.stalled.is_none());
        assert_eq!(reader.join().unwrap(), 5000 * load.frame_len);
    }

    #[test]
    fn write_limits() {
        let stall = Duration::from_secs(10);
        assert_eq!(write_limit(None, stall), stall);
        let past = Instant::now() - Duration::from_secs(1);
        assert_eq!(write_limit(Some(past), stall), stall);
        let l = write_limit(Some(Instant::now() + Duration::from_secs(5)), stall);
        assert!(
            l > Duration::from_secs(14) && l <= Duration::from_secs(15),
            "{l:?}"
        );
    }
}
