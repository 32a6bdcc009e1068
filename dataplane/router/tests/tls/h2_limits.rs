//! What one HTTP/2 client connection can make the router hold: streams reset while their
//! backend is dialled or waited on end at once; at most 256 stream tasks run per connection
//! however fast the client resets; a client that keeps resetting unanswered streams (rapid
//! reset, CVE-2023-44487) is sent GOAWAY ENHANCE_YOUR_CALM (more in `h2_resets`); a client
//! that grants no window does not get the 503 page buffered for it, nor a backend's endless
//! 103s. Driven with raw frames (`h2_wire`), every loop bounded in count and time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::h2_wire::{
    rst_stream, End, H2c, CANCEL, DATA, ENHANCE_YOUR_CALM, GOAWAY, HEADERS, REFUSED_STREAM,
    RST_STREAM,
};
use crate::support::{
    black_hole, connecting_to, http_route, wait_connecting_to, wait_until, Router, TestDir,
};

/// A backend that takes connections and requests and never answers: counts the
/// connections it accepted and those still open (until the router closes them).
pub(crate) struct Sink {
    pub(crate) addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Sink {
    pub(crate) fn start() -> Sink {
        // A backlog for 256 connections at once (std's 128 would drop SYNs, and the
        // router's dials would time out).
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        sock.listen(1024).unwrap();
        let l: TcpListener = sock.into();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, o, st) = (accepted.clone(), open.clone(), stop.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut s) = s else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let o = o.clone();
                std::thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                    let mut b = [0u8; 4096];
                    while matches!(s.read(&mut b), Ok(n) if n > 0) {}
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Sink {
            addr,
            accepted,
            open,
            stop,
        }
    }

    pub(crate) fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

pub(crate) fn h2c_router(args: &[&str]) -> Router {
    let mut b = Router::builder().arg("--h2c-addr").arg("127.0.0.1:0");
    for a in args {
        b = b.arg(*a);
    }
    b.start()
}

/// A stream reset while its backend is still being dialled ends the dial at once, not
/// after the connect timeout: resetting streams cannot pile up pending dials (and their
/// sockets) on the router.
#[test]
fn a_reset_during_a_slow_dial_ends_the_dial() {
    let router = h2c_router(&["--connect-timeout-ms", "20000"]);
    let (_l, _filler, hole) = black_hole();
    router.add_route(http_route("dial.example.com", "web"));
    router.set_backend_addrs("web", &[(hole.to_string(), false)]);

    let mut c = H2c::connect(router.h2c_addrs[0]);
    c.get(1, "dial.example.com");
    wait_connecting_to(hole);
    c.s.write_all(&rst_stream(1, CANCEL)).unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || !connecting_to(hole)),
        "the dial went on after the stream was reset"
    );
}

/// h2 frees a stream's slot the moment the client resets it; the router's task for it may
/// not have run yet. Streams opened while 256 tasks still run are refused (RST_STREAM
/// REFUSED_STREAM) without a dial, so one connection never has more than 256 backend
/// connections however it interleaves resets and new streams; and the reset streams'
/// backend connections are closed.
#[test]
fn stream_tasks_are_capped_at_the_advertised_concurrency() {
    let router = h2c_router(&[]);
    let sink = Sink::start();
    router.add_route(http_route("cap.example.com", "web"));
    router.set_backend_addrs("web", &[(sink.addr.to_string(), false)]);

    let mut c = H2c::connect(router.h2c_addrs[0]);
    let first: Vec<u32> = (0..256).map(|i| 1 + 2 * i).collect();
    let batch: Vec<u8> = first
        .iter()
        .flat_map(|&id| c.get_frame(id, "cap.example.com"))
        .collect();
    c.s.write_all(&batch).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || sink.accepted() == 256),
        "the backend got {} of 256 connections",
        sink.accepted()
    );

    // All 256 reset, and 256 new streams, in one write, so the new streams arrive before the
    // reset streams' tasks have ended. Why that holds: the batch is 6,656 bytes (512 frames
    // of 13 bytes, the host indexed by HPACK since the first batch); one write of it on
    // loopback is one segment (MSS ~64 KiB), nothing else is unread, and the router reads an
    // h2c connection 8 KiB at a time (monoio-compat's `StreamWrapper` buffer), so h2 gets
    // every frame in one read. The reset streams' tasks run only when the connection's task
    // yields, and it does not between one read's streams: all 256 new ones find 256 tasks
    // still running. Split over two reads (a batch over 8 KiB), the tasks could end in
    // between and the second read's streams would rightly dial, failing the count below.
    let mut batch: Vec<u8> = first
        .iter()
        .flat_map(|&id| rst_stream(id, CANCEL))
        .collect();
    let second: Vec<u32> = (256..512).map(|i| 1 + 2 * i).collect();
    for &id in &second {
        batch.extend(c.get_frame(id, "cap.example.com"));
    }
    assert_eq!(batch.len(), 6656, "the batch must fit one 8 KiB read");
    c.s.write_all(&batch).unwrap();
    let mut refused = 0;
    c.read_frames(Duration::from_secs(3), |f| {
        if f.ty == RST_STREAM && f.error_code() == Some(REFUSED_STREAM) {
            refused += 1;
        }
        refused == second.len()
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        sink.accepted() <= 256,
        "{} backend connections for one client connection ({refused} streams refused)",
        sink.accepted()
    );
    assert!(refused > 0, "no stream refused");
    assert!(
        wait_until(Duration::from_secs(3), || sink.open() == 0),
        "{} backend connections of reset streams still open",
        sink.open()
    );
}

/// Rapid reset: rounds of 200 streams opened and reset before their answer. The router
/// counts those resets and, past its limit, sends GOAWAY ENHANCE_YOUR_CALM and closes the
/// connection, having dialled a bounded number of backend connections.
#[test]
fn rapid_reset_gets_goaway_enhance_your_calm() {
    let router = h2c_router(&[]);
    let sink = Sink::start();
    router.add_route(http_route("flood.example.com", "web"));
    router.set_backend_addrs("web", &[(sink.addr.to_string(), false)]);

    let mut c = H2c::connect(router.h2c_addrs[0]);
    let mut calm = None;
    let mut closed = false;
    let mut next_id = 1;
    let started = Instant::now();
    for _round in 0..10 {
        let ids: Vec<u32> = (0..200).map(|i| next_id + 2 * i).collect();
        next_id += 400;
        let opens: Vec<u8> = ids
            .iter()
            .flat_map(|&id| c.get_frame(id, "flood.example.com"))
            .collect();
        let resets: Vec<u8> = ids.iter().flat_map(|&id| rst_stream(id, CANCEL)).collect();
        if c.s.write_all(&opens).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(30));
        if c.s.write_all(&resets).is_err() {
            break;
        }
        let end = c.read_frames(Duration::from_millis(50), |f| {
            if f.ty == GOAWAY {
                calm = f.error_code();
            }
            f.ty == GOAWAY
        });
        closed = end == End::Closed;
        if calm.is_some() || closed {
            break;
        }
    }
    if calm.is_none() && !closed {
        c.read_frames(Duration::from_secs(3), |f| {
            if f.ty == GOAWAY {
                calm = f.error_code();
            }
            f.ty == GOAWAY
        });
    }
    assert_eq!(
        calm,
        Some(ENHANCE_YOUR_CALM),
        "no GOAWAY ENHANCE_YOUR_CALM after {} streams reset in {:?}",
        next_id / 2,
        started.elapsed()
    );
    // The connection is closed after the GOAWAY.
    assert_eq!(
        c.read_frames(Duration::from_secs(5), |_| false),
        End::Closed
    );
    assert!(sink.accepted() <= 2000, "{}", sink.accepted());
    assert!(
        wait_until(Duration::from_secs(3), || sink.open() == 0),
        "{} backend connections still open",
        sink.open()
    );
}

/// The router's resident set size in KiB.
fn rss_kib(router: &Router) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", router.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

/// The 503 page goes out within the client's flow-control window like any body: a client
/// whose streams grant no window (SETTINGS_INITIAL_WINDOW_SIZE 0) does not get a copy of
/// the page buffered per stream (64 streams of a 1 MB page), and its streams are reset
/// (CANCEL) after the idle timeout without a byte of the page.
#[test]
fn the_503_page_waits_for_window_and_a_client_granting_none_is_reset() {
    let dir = TestDir::new("h2-page");
    let page = dir.join("page.html");
    std::fs::write(&page, vec![b'p'; 1_000_000]).unwrap();
    let router = h2c_router(&[
        "--error-503-page",
        &page.display().to_string(),
        "--idle-timeout-secs",
        "1",
    ]);
    router.add_route(http_route("page.example.com", "empty"));
    let before = rss_kib(&router);

    // SETTINGS_INITIAL_WINDOW_SIZE (0x4) = 0.
    let mut c = H2c::connect_with(router.h2c_addrs[0], &[(0x4, 0)]);
    let streams = 64;
    let batch: Vec<u8> = (0..streams)
        .flat_map(|i| c.get_frame(1 + 2 * i, "page.example.com"))
        .collect();
    c.s.write_all(&batch).unwrap();
    let (mut heads, mut data, mut cancelled) = (0, 0, 0);
    let mut grown = None;
    let end = c.read_frames(Duration::from_secs(10), |f| {
        match (f.ty, f.error_code()) {
            (HEADERS, _) => heads += 1,
            (DATA, _) => data += f.payload.len(),
            (RST_STREAM, Some(CANCEL)) => cancelled += 1,
            _ => {}
        }
        if heads == streams && grown.is_none() {
            // Every 503 head is out: each stream's page is being sent now.
            std::thread::sleep(Duration::from_millis(200));
            grown = Some(rss_kib(&router).saturating_sub(before));
        }
        cancelled == streams
    });
    let grown = grown.unwrap_or_else(|| panic!("{heads} of {streams} 503 heads ({end:?})"));
    assert!(
        grown < 32 << 10,
        "RSS grew {grown} KiB for {streams} streams that grant no window"
    );
    assert_eq!(data, 0, "page bytes sent without window");
    assert_eq!(
        cancelled, streams,
        "streams granting no window not reset after the idle timeout ({end:?})"
    );
}

/// A backend that answers one GET with 60,000 103 Early Hints heads of 1 KB (at most 5 s of them)
/// and then a 200: HEADERS frames are not flow-controlled, and h2 queues every head the
/// router hands it for a client that does not read. The router relays at most 5 and drops
/// the rest, so a client that reads nothing until the backend is done then gets at most 5
/// interim heads and the 200, and the router's memory has not grown with the heads.
#[test]
fn a_backend_sending_endless_103s_has_at_most_five_relayed() {
    let router = h2c_router(&[]);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    router.add_route(http_route("hints.example.com", "web"));
    router.set_backend_addrs("web", &[(l.local_addr().unwrap().to_string(), false)]);
    let (sent_tx, sent_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = l.accept() else { return };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut b) {
                Ok(n) if n > 0 => got.extend_from_slice(&b[..n]),
                _ => return,
            }
        }
        // Each head's Link differs (HPACK cannot index it away), about 1 KB on the wire:
        // more than the sockets' buffers can take.
        let pad = "p".repeat(1000);
        let started = Instant::now();
        let (mut sent, mut batch) = (0, Vec::new());
        while sent < 60_000 && started.elapsed() < Duration::from_secs(5) {
            batch.clear();
            for i in sent..sent + 100 {
                let hint = format!(
                    "HTTP/1.1 103 Early Hints\r\nLink: </{i}.css?{pad}>; rel=preload\r\n\r\n"
                );
                batch.extend_from_slice(hint.as_bytes());
            }
            if s.write_all(&batch).is_err() {
                return;
            }
            sent += 100;
        }
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        let _ = sent_tx.send(sent);
        // Held until the router closes it (or the timeout).
        while matches!(s.read(&mut b), Ok(n) if n > 0) {}
    });

    let before = rss_kib(&router);
    let mut c = H2c::connect(router.h2c_addrs[0]);
    c.get(1, "hints.example.com");
    // Nothing is read until the backend has sent all its heads and the 200.
    let sent = sent_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the backend did not get to send its 103s");
    std::thread::sleep(Duration::from_millis(300));
    let grown = rss_kib(&router).saturating_sub(before);
    let (mut heads, mut body) = (0, Vec::new());
    let end = c.read_frames(Duration::from_secs(10), |f| {
        if f.id != 1 {
            return false;
        }
        match f.ty {
            HEADERS => heads += 1,
            DATA => body.extend_from_slice(&f.payload),
            _ => {}
        }
        // END_STREAM
        f.flags & 0x1 != 0
    });
    assert_eq!(end, End::Done, "the stream did not end ({heads} HEADERS)");
    assert_eq!(body, b"ok", "{heads} HEADERS");
    // The 200's HEADERS and the interim ones before it.
    let interim = heads - 1;
    assert!(
        grown < 16 << 10,
        "RSS grew {grown} KiB for {sent} 103s to a client that did not read"
    );
    assert!(
        (1..=5).contains(&interim),
        "{interim} of {sent} 103s relayed"
    );
}
