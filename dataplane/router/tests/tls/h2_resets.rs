//! Which client resets count towards the rapid-reset GOAWAY (CVE-2023-44487), counted as
//! Envoy counts them: only *premature* resets (of a stream not answered yet, within 1 s of
//! its start) count, and the connection is cut off only when they number more than 512 in
//! 10 s and more than half of the streams started then. A busy client whose deadlines
//! cancel late calls, or a few calls among many, keeps its connection; every premature
//! reset is counted, an upload's too, on HTTP/1.1 and gRPC routes (the rapid-reset test
//! itself is in `h2_limits`). Driven with raw frames (`h2_wire`), every loop bounded in
//! count and time.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::h2_limits::{h2c_router, Sink};
use crate::h2_wire::{rst_stream, H2c, CANCEL, ENHANCE_YOUR_CALM, GOAWAY, RST_STREAM};
use crate::support::{http_route, wait_until};

/// Streams per round: under the router's 256 stream tasks per connection.
const ROUND: u32 = 200;

/// A router with `late.example.com` routed to a backend that never answers (`Sink`);
/// other hosts get the router's own 404 at once.
fn setup() -> (crate::support::Router, Sink) {
    let router = h2c_router(&[]);
    let sink = Sink::start();
    router.add_route(http_route("late.example.com", "web"));
    router.set_backend_addrs("web", &[(sink.addr.to_string(), false)]);
    (router, sink)
}

/// A backend that never answers, reached through the route for `host()`.
trait Holding {
    fn host(&self) -> &'static str;
    /// Requests it got so far.
    fn got(&self) -> usize;
    /// Requests the router has not given up on yet.
    fn open(&self) -> usize;
}

impl Holding for Sink {
    fn host(&self) -> &'static str {
        "late.example.com"
    }
    fn got(&self) -> usize {
        self.accepted()
    }
    fn open(&self) -> usize {
        Sink::open(self)
    }
}

/// Opens [`ROUND`] streams from `*next_id` on (GETs, or uploads left open when `upload`)
/// to the never-answering backend `b`, waits until it got each one (`total` so far) and
/// for `wait`, then resets them all in one write.
fn open_and_reset(
    c: &mut H2c,
    b: &dyn Holding,
    next_id: &mut u32,
    total: &mut usize,
    wait: Duration,
    upload: bool,
) {
    let ids: Vec<u32> = (0..ROUND).map(|i| *next_id + 2 * i).collect();
    *next_id += 2 * ROUND;
    let opens: Vec<u8> = ids
        .iter()
        .flat_map(|&id| {
            if upload {
                c.post_frame(id, b.host())
            } else {
                c.get_frame(id, b.host())
            }
        })
        .collect();
    c.s.write_all(&opens).unwrap();
    *total += ids.len();
    assert!(
        wait_until(Duration::from_secs(10), || b.got() == *total),
        "the backend got {} of {total} requests",
        b.got()
    );
    std::thread::sleep(wait);
    let resets: Vec<u8> = ids.iter().flat_map(|&id| rst_stream(id, CANCEL)).collect();
    c.s.write_all(&resets).unwrap();
    // Every reset stream's task has ended (its backend connection or stream closed)
    // before the next round, which would otherwise find some of the 256 task slots taken.
    assert!(
        wait_until(Duration::from_secs(5), || b.open() == 0),
        "{} backend requests of reset streams still open",
        b.open()
    );
}

/// `n` GETs for a host without a route (the router's 404), from `*next_id` on, in one
/// write; reads until all have ended. Returns the GOAWAY error code if one came instead.
fn completed(c: &mut H2c, next_id: &mut u32, n: u32) -> Option<u32> {
    let ids: Vec<u32> = (0..n).map(|i| *next_id + 2 * i).collect();
    *next_id += 2 * n;
    let opens: Vec<u8> = ids
        .iter()
        .flat_map(|&id| c.get_frame(id, "nowhere.example.com"))
        .collect();
    c.s.write_all(&opens).unwrap();
    let (mut ended, mut goaway) = (0, None);
    let end = c.read_frames(Duration::from_secs(10), |f| {
        if f.ty == GOAWAY {
            goaway = f.error_code();
            return true;
        }
        // END_STREAM, or a reset (refused) stream.
        if ids.contains(&f.id) && (f.flags & 0x1 != 0 || f.ty == RST_STREAM) {
            ended += 1;
        }
        ended == ids.len()
    });
    if goaway.is_none() {
        assert_eq!(ended, ids.len(), "{ended} of {n} streams ended ({end:?})");
    }
    goaway
}

/// All since `started` happened within one 10 s reset window, or the test proves nothing.
fn within_one_window(started: Instant) {
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(9),
        "took {took:?}, not within one reset window"
    );
}

/// On a fresh connection to `router`: three rounds of [`open_and_reset`] against `b`
/// (reset after `wait`; uploads when `upload`), then `n` completed streams, all within
/// one reset window. The GOAWAY error code if one came, and the streams reset.
fn three_rounds_then(
    router: &crate::support::Router,
    b: &dyn Holding,
    wait: Duration,
    upload: bool,
    n: u32,
) -> (Option<u32>, usize) {
    let mut c = H2c::connect(router.h2c_addrs[0]);
    let started = Instant::now();
    let (mut next_id, mut total) = (1, 0);
    for _ in 0..3 {
        open_and_reset(&mut c, b, &mut next_id, &mut total, wait, upload);
    }
    let goaway = completed(&mut c, &mut next_id, n);
    within_one_window(started);
    (goaway, total)
}

/// A busy client whose calls time out after more than 1 s: 600 streams reset unanswered
/// within a few seconds, each over 1 s after it started, are not rapid reset, and the
/// connection goes on serving.
#[test]
fn resets_later_than_a_second_do_not_get_goaway() {
    let (router, sink) = setup();
    let (goaway, total) = three_rounds_then(&router, &sink, Duration::from_millis(1200), false, 10);
    assert_eq!(goaway, None, "GOAWAY after {total} late resets");
}

/// 600 streams reset at once among 1,800 started within a few seconds (a third: under
/// half) are not rapid reset, though over the 512 floor: the connection goes on serving.
#[test]
fn premature_resets_under_half_of_the_streams_do_not_get_goaway() {
    let (router, sink) = setup();
    let mut c = H2c::connect(router.h2c_addrs[0]);
    let started = Instant::now();
    let (mut next_id, mut total) = (1, 0);
    for round in 0..3 {
        open_and_reset(
            &mut c,
            &sink,
            &mut next_id,
            &mut total,
            Duration::from_millis(30),
            false,
        );
        for _ in 0..2 {
            let goaway = completed(&mut c, &mut next_id, ROUND);
            assert_eq!(
                goaway,
                None,
                "GOAWAY in round {round}: {total} resets among {} streams",
                next_id / 2
            );
        }
    }
    within_one_window(started);
}

/// Streams left open for an upload (the router waiting for their body) and reset count as
/// bodiless ones do, every one of them: 600 in three rounds, all premature and all the
/// connection's streams, get GOAWAY ENHANCE_YOUR_CALM at the next stream.
#[test]
fn resets_during_uploads_are_all_counted() {
    let (router, sink) = setup();
    let (goaway, total) = three_rounds_then(&router, &sink, Duration::from_millis(50), true, 1);
    assert_eq!(
        goaway,
        Some(ENHANCE_YOUR_CALM),
        "no GOAWAY ENHANCE_YOUR_CALM after {total} uploads reset"
    );
}

/// A gRPC (HTTP/2) backend that takes streams and never answers, on a thread of its own:
/// counts the streams it got and those the router has not reset yet.
struct HoldingGrpc {
    addr: SocketAddr,
    got: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl HoldingGrpc {
    fn start() -> HoldingGrpc {
        // A backlog for the first round's 200 dials at once (std's 128 would drop SYNs).
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        sock.listen(1024).unwrap();
        let l: std::net::TcpListener = sock.into();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let (got, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (g, o) = (got.clone(), open.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                while let Ok((sock, _)) = l.accept().await {
                    let (g, o) = (g.clone(), o.clone());
                    tokio::spawn(async move {
                        let Ok(mut conn) = h2::server::handshake(sock).await else {
                            return;
                        };
                        while let Some(Ok((req, mut respond))) = conn.accept().await {
                            g.fetch_add(1, Ordering::SeqCst);
                            o.fetch_add(1, Ordering::SeqCst);
                            let o = o.clone();
                            tokio::spawn(async move {
                                let _req = req;
                                let _ = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
                                o.fetch_sub(1, Ordering::SeqCst);
                            });
                        }
                    });
                }
            });
        });
        HoldingGrpc { addr, got, open }
    }
}

impl Holding for HoldingGrpc {
    fn host(&self) -> &'static str {
        "grpc.example.com"
    }
    fn got(&self) -> usize {
        self.got.load(Ordering::SeqCst)
    }
    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

/// The same on a gRPC route: a client's reset of a call whose upload is still open is
/// seen both by the upload pump (which resets the backend's stream, failing the wait for
/// its answer) and by the reset watch, and counted whichever comes first.
#[test]
fn resets_during_grpc_uploads_are_all_counted() {
    let router = h2c_router(&[]);
    let b = HoldingGrpc::start();
    let route = serde_json::json!({
        "type": "http", "domain": b.host(), "service": "g", "grpc": true,
    });
    assert_eq!(
        router.api("POST", "/routes", Some(&route.to_string())).0,
        200
    );
    router.set_backend_addrs("g", &[(b.addr.to_string(), false)]);
    let (goaway, total) = three_rounds_then(&router, &b, Duration::from_millis(50), true, 1);
    assert_eq!(
        goaway,
        Some(ENHANCE_YOUR_CALM),
        "no GOAWAY ENHANCE_YOUR_CALM after {total} gRPC uploads reset"
    );
}
