//! Hot path: syslog ingest. TCP connections live on the `flynn-runtime` workers (one
//! SO_REUSEPORT listener per core); each reads into one `BytesMut`, splits frames off it
//! without copying, parses them in place and copies each line once into the store. The
//! read buffer is reused as soon as its frames are copied, so a quiet app never pins it.
//! UDP (one datagram = one message) is served by one plain thread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use flynn_runtime::WorkerCtx;
use flynn_syslog::{parse_fields, Fields, Framer, Message, Scan, Timestamp};
use monoio::buf::IoBufMut;
use monoio::io::AsyncReadRent;
use monoio::net::{TcpListener, TcpStream};

use crate::line::UNROUTED_APP;
use crate::metrics::Counters;
use crate::store::{Outcome, Store};

/// Read buffer size per connection (grown only for a frame that cannot be moved to the
/// front of it: see [`make_room`]).
const READ_BUF: usize = 64 * 1024;

/// What the ingest paths share.
pub struct Shared {
    pub store: Arc<Store>,
    pub framer: Framer,
    /// One slot per worker, then UDP, then peer loading.
    pub counters: Vec<Counters>,
    pub drivers: Vec<OnceLock<&'static str>>,
    /// Quiet time after which a follow stream gets a keep-alive (API only).
    pub stream_keepalive: std::time::Duration,
    /// Most TCP connections open at once, all cores together.
    pub max_conns: usize,
    /// TCP connections open now, all cores together (changed per connection, not per read).
    pub open_conns: AtomicUsize,
}

impl Shared {
    pub fn new(store: Arc<Store>, framer: Framer, threads: usize) -> Shared {
        Shared {
            store,
            framer,
            counters: (0..threads + 2).map(|_| Counters::default()).collect(),
            drivers: (0..threads).map(|_| OnceLock::new()).collect(),
            stream_keepalive: std::time::Duration::from_secs(30),
            max_conns: usize::MAX,
            open_conns: AtomicUsize::new(0),
        }
    }
    pub fn udp_counters(&self) -> &Counters {
        &self.counters[self.drivers.len()]
    }
    pub fn peer_counters(&self) -> &Counters {
        &self.counters[self.drivers.len() + 1]
    }
    pub fn source_names(&self) -> Vec<String> {
        let n = self.drivers.len();
        (0..n)
            .map(|i| format!("core{i}"))
            .chain(["udp".to_string(), "peer".to_string()])
            .collect()
    }
}

/// Stores one parsed frame (the message time, or `now` when it has none).
#[inline]
pub fn ingest(
    store: &Store,
    c: &Counters,
    frame: &[u8],
    fields: &Fields,
    now: Timestamp,
) -> Outcome {
    let app = if fields.raw || fields.app_name.is_empty() {
        UNROUTED_APP.as_bytes()
    } else {
        fields.app_name.get(frame)
    };
    Counters::inc(&c.messages_total);
    Counters::add(&c.bytes_total, frame.len() as u64);
    if fields.raw {
        Counters::inc(&c.raw_total);
    }
    let out = store.insert(app, frame, fields, fields.ts.unwrap_or(now));
    if out == Outcome::Duplicate {
        Counters::inc(&c.duplicates_total);
    }
    out
}

/// A worker's main future: accept on its listener and serve each connection.
pub async fn run(ctx: WorkerCtx, shared: Arc<Shared>, listener: Option<std::net::TcpListener>) {
    let _ = shared.drivers[ctx.index].set(ctx.driver);
    let Some(l) = listener else { return };
    let listener = match TcpListener::from_std(l) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register syslog listener");
            return;
        }
    };
    let c = &shared.counters[ctx.index];
    // When this core last logged a refused connection (at most one line per 10 s).
    let mut warned: Option<std::time::Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                Counters::inc(&c.connections_total);
                let Some(slot) = ConnSlot::take(&shared) else {
                    // Over the cap: closed unread (dropping it), counted.
                    Counters::inc(&c.connections_rejected_total);
                    if warned.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(10)) {
                        warned = Some(std::time::Instant::now());
                        tracing::warn!(%peer, max = shared.max_conns, "syslog connection refused: too many open (--max-conns)");
                    }
                    continue;
                };
                monoio::spawn(serve(shared.clone(), ctx.index, stream, slot));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                monoio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

/// One of the `max_conns` connection slots, given back on drop.
struct ConnSlot(Arc<Shared>);

impl ConnSlot {
    fn take(shared: &Arc<Shared>) -> Option<ConnSlot> {
        let open = shared.open_conns.fetch_add(1, Ordering::Relaxed);
        if open >= shared.max_conns {
            shared.open_conns.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ConnSlot(shared.clone()))
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open_conns.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve(shared: Arc<Shared>, core: usize, mut stream: TcpStream, slot: ConnSlot) {
    // A sender that vanished without a FIN (a host that lost power) is noticed: its
    // connection and buffer are not kept for good.
    let _ = flynn_runtime::sock::set_keepalive(std::os::fd::AsRawFd::as_raw_fd(&stream));
    let c = &shared.counters[core];
    Counters::inc(&c.connections_active);
    let mut buf = BytesMut::with_capacity(READ_BUF);
    // How far a partial LF-framed message in `buf` is known to hold no LF.
    let mut scan = Scan::default();
    // The next receive stamp for a line without a timestamp of its own: each such line gets
    // its own instant, so two equal ones are two lines, not one line and its replay.
    let mut next_stamp = Timestamp(i64::MIN);
    // Bytes taken since this task last let the core's other tasks run.
    let mut budget = flynn_runtime::fair::Budget::default();
    let mut yield_due = false;
    'conn: loop {
        make_room(&mut buf);
        // Append after any partial frame already buffered.
        let (len, cap) = (buf.len(), buf.capacity());
        let (res, slice) = stream.read(buf.slice_mut(len..cap)).await;
        buf = slice.into_inner();
        match res {
            Ok(0) => {
                // The sender closed: a last LF-framed message without its LF is kept, as
                // rsyslog keeps it (an incomplete octet-counted frame is dropped).
                if let Some(frame) = shared.framer.finish(&mut buf) {
                    let m = Message::parse(frame);
                    let now = Timestamp::now().max(next_stamp);
                    ingest(&shared.store, c, m.frame(), m.fields(), now);
                }
                break;
            }
            Err(_) => break,
            Ok(n) => yield_due |= budget.spend(n),
        }
        let mut now = Timestamp::now().max(next_stamp);
        loop {
            match shared.framer.next_frame_scan(&mut buf, &mut scan) {
                Ok(Some(frame)) => {
                    let m = Message::parse(frame);
                    ingest(&shared.store, c, m.frame(), m.fields(), now);
                    if m.fields().ts.is_none() {
                        now.0 = now.0.saturating_add(1);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    Counters::inc(c.frame_error(e));
                    tracing::debug!(error = %e, "closing syslog connection on a framing error");
                    break 'conn;
                }
            }
        }
        next_stamp = now;
        // On the epoll driver a read of a socket that still has data returns at once, so a
        // sender that never lets its socket empty would keep the core from its other
        // connections and its listener: every 1 MiB this task goes to the back of the queue.
        if std::mem::take(&mut yield_due) {
            // A self-wake would be requeued first by monoio (0.2.4) and yield to no
            // one; this one goes behind the core's ready tasks.
            flynn_runtime::fair::yield_now().await;
        }
    }
    // The slot first: once the gauge shows the connection gone, its slot is free.
    drop(slot);
    Counters::dec(&c.connections_active);
}

/// Makes room for the next read once less than a quarter of [`READ_BUF`] is left after the
/// buffered bytes (a partial frame): asks for `READ_BUF` in all, or the partial frame plus
/// a quarter if that is more, so `bytes` moves the partial frame to the front of the same
/// allocation (every frame split off it has been copied out and dropped by then). Asking
/// for `READ_BUF` more than the partial frame, as this once did, could not fit in the
/// allocation whenever a partial frame was buffered, and grew every busy connection's
/// buffer to 128 KiB. `bytes` moves a partial frame only when at least as many bytes lie
/// before it, which holds for every frame under 24 KiB (all of them with the default
/// `--max-frame` of 11,000); a longer partial frame that started early in the buffer grows
/// it instead, to 128 KiB and then at most 256 KiB (a partial frame is at most
/// `--max-frame`, 65,535 bytes, plus its length prefix).
fn make_room(buf: &mut BytesMut) {
    let len = buf.len();
    if buf.capacity() - len < READ_BUF / 4 {
        buf.reserve(READ_BUF.max(len + READ_BUF / 4) - len);
    }
}

/// Serves UDP syslog on `sock` forever (run on its own thread).
pub fn serve_udp(shared: Arc<Shared>, sock: std::net::UdpSocket) {
    let mut buf = vec![0u8; 65_536];
    let c = shared.udp_counters();
    loop {
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "udp receive failed");
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        let mut d = &buf[..n];
        while let [rest @ .., b'\n' | b'\r' | 0] = d {
            d = rest;
        }
        if d.is_empty() {
            continue;
        }
        if d.len() > shared.framer.max_frame() {
            Counters::inc(&c.frame_too_long_total);
            continue;
        }
        let fields = parse_fields(d).unwrap_or_else(|_| Fields::raw(d.len()));
        ingest(&shared.store, c, d, &fields, Timestamp::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` through a connection's buffer as reads of `read` bytes (each ending
    /// in the middle of a frame, mostly), the frames copied out and dropped as `serve`
    /// does; returns the frames and the largest capacity the buffer had.
    fn feed(framer: &Framer, input: &[u8], read: usize) -> (Vec<Vec<u8>>, usize) {
        let (mut buf, mut scan) = (BytesMut::with_capacity(READ_BUF), Scan::default());
        let (mut frames, mut most, mut at) = (Vec::new(), 0, 0);
        while at < input.len() {
            make_room(&mut buf);
            most = most.max(buf.capacity());
            let n = read.min(buf.capacity() - buf.len()).min(input.len() - at);
            buf.extend_from_slice(&input[at..at + n]);
            at += n;
            while let Some(frame) = framer.next_frame_scan(&mut buf, &mut scan).unwrap() {
                frames.push(frame.to_vec());
            }
        }
        (frames, most)
    }

    /// A buffer that always holds a partial frame when it runs short of room stays in its
    /// first 64 KiB allocation, for LF and octet-counted frames alike.
    #[test]
    fn read_buffer_stays_at_its_size_across_reads_ending_mid_frame() {
        let framer = Framer::default();
        for len in [100, 1_000, 5_000, 11_000] {
            let mut input = Vec::new();
            let mut want = Vec::new();
            for i in 0..400 {
                let body = "x".repeat(len - 60);
                let frame = format!("<190>1 2009-11-10T23:00:00Z h app web.1 ID{i:05} - {body}");
                if i % 2 == 0 {
                    input.extend_from_slice(frame.as_bytes());
                    input.push(b'\n');
                } else {
                    input.extend_from_slice(format!("{} {frame}", frame.len()).as_bytes());
                }
                want.push(frame.into_bytes());
            }
            for read in [4_093, 16_381, READ_BUF] {
                let (frames, most) = feed(&framer, &input, read);
                assert!(frames == want, "frames of {len} bytes, reads of {read}");
                assert!(
                    most <= READ_BUF,
                    "frames of {len} bytes, reads of {read}: the buffer grew to {most}"
                );
            }
        }
    }
}
