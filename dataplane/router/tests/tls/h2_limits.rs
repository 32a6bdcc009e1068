//! What one HTTP/2 client connection can make the router hold: streams reset while their
//! backend is dialled or waited on end at once; at most 256 stream tasks run per connection
//! however fast the client resets; a client that keeps resetting unanswered streams (rapid
//! reset, CVE-2023-44487) is sent GOAWAY ENHANCE_YOUR_CALM; a client that grants no window
//! does not get the 503 page buffered for it. Driven with raw frames (`h2_wire`), every loop
//! bounded in count and time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::h2_wire::{
    rst_stream, End, H2c, CANCEL, DATA, ENHANCE_YOUR_CALM, GOAWAY, HEADERS, REFUSED_STREAM,
    RST_STREAM,
};
use crate::support::{black_hole, http_route, wait_connecting_to, wait_until, Router, TestDir};

/// A backend that takes connections and requests and never answers: counts the
/// connections it accepted and those still open (until the router closes them).
struct Sink {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Sink {
    fn start() -> Sink {
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

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn h2c_router(args: &[&str]) -> Router {
    let mut b = Router::builder().arg("--h2c-addr").arg("127.0.0.1:0");
    for a in args {
        b = b.arg(*a);
    }
    b.start()
}

/// Whether a socket on this machine is connecting to `addr` (`SYN-SENT`).
fn connecting_to(addr: SocketAddr) -> bool {
    let out = std::process::Command::new("ss")
        .args(["-Htn", "state", "syn-sent", "dst", &addr.to_string()])
        .output()
        .expect("ss (iproute2)");
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
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

    // All 256 reset, and 256 new streams, in one write (6.5 KB: one read for the router),
    // so the new streams arrive before the reset streams' tasks have ended.
    let mut batch: Vec<u8> = first
        .iter()
        .flat_map(|&id| rst_stream(id, CANCEL))
        .collect();
    let second: Vec<u32> = (256..512).map(|i| 1 + 2 * i).collect();
    for &id in &second {
        batch.extend(c.get_frame(id, "cap.example.com"));
    }
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
