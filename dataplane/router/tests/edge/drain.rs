//! Drain tracking (spec §1.9): for services of `drain_backends` routes the router reports
//! `backend-up`, `backend-down` and — once no request to it is in flight —
//! `backend-drained` on its `/events` stream.

use crate::support::backend::respond;
use crate::support::{
    black_hole, http_route, wait_connecting_to, Backend, Conn, Reply, Response, Router,
};
use serde_json::Value;
use std::collections::BTreeSet;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const DOMAIN: &str = "drain.example.com";
const TYPES: &str = "backend-up,backend-down,backend-drained";

/// One decoded SSE item with its arrival time.
#[derive(Debug, Clone)]
struct Ev {
    at: Instant,
    event: String,
    addr: String,
    service: String,
}

/// A subscription to the router's `/events` SSE stream, decoded on a thread.
struct Events {
    rx: Receiver<Ev>,
    stream: TcpStream,
}

impl Events {
    fn subscribe(router: &Router, types: &str) -> Events {
        let mut conn = Conn::connect(router.api_addr);
        conn.send(
            format!(
                "GET /events?types={types} HTTP/1.1\r\nHost: router-api\r\nAccept: text/event-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        let head = conn.read_head().expect("events response head");
        assert_eq!(head.status, 200, "{head:?}");
        let ct = head.header("content-type").unwrap_or("");
        assert!(ct.starts_with("text/event-stream"), "{head:?}");
        let chunked = head
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        conn.set_read_timeout(Duration::from_secs(60));
        let stream = conn.stream.try_clone().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || read_events(conn, chunked, tx));
        Events { rx, stream }
    }

    /// The next event within `timeout`.
    fn next(&self, timeout: Duration) -> Option<Ev> {
        match self.rx.recv_timeout(timeout) {
            Ok(e) => Some(e),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => panic!("event stream ended"),
        }
    }

    fn expect(&self, timeout: Duration, what: &str) -> Ev {
        self.next(timeout)
            .unwrap_or_else(|| panic!("no event within {timeout:?} (waiting for {what})"))
    }

    /// Asserts no event arrives for `dur`.
    fn expect_none(&self, dur: Duration, why: &str) {
        if let Some(e) = self.next(dur) {
            panic!("unexpected event {e:?}: {why}");
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

fn read_events(mut conn: Conn, chunked: bool, tx: Sender<Ev>) {
    let mut text = String::new();
    loop {
        let data = if chunked {
            let mut trailers = Vec::new();
            match conn.read_chunk(&mut trailers) {
                Ok(Some(d)) => d,
                _ => return,
            }
        } else {
            match conn.read_some() {
                Ok(d) if !d.is_empty() => d,
                _ => return,
            }
        };
        text.push_str(&String::from_utf8_lossy(&data));
        while let Some(i) = text.find("\n\n") {
            let item: String = text.drain(..i + 2).collect();
            let payload: Vec<&str> = item
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|l| l.strip_prefix(' ').unwrap_or(l))
                .collect();
            if payload.is_empty() {
                continue; // keep-alive comment
            }
            let v: Value = serde_json::from_str(&payload.join("\n"))
                .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {item:?}"));
            let ev = Ev {
                at: Instant::now(),
                event: v["event"].as_str().unwrap_or("").to_string(),
                addr: v["backend"]["addr"].as_str().unwrap_or("").to_string(),
                service: v["backend"]["service"].as_str().unwrap_or("").to_string(),
            };
            if tx.send(ev).is_err() {
                return;
            }
        }
    }
}

fn drain_route(domain: &str, service: &str) -> Value {
    let mut r = http_route(domain, service);
    r["drain_backends"] = true.into();
    r
}

/// A backend whose every response waits until the test releases it; reports arrivals.
fn slow_backend(name: &str) -> (Backend, Receiver<String>, Sender<()>) {
    let (arrived_tx, arrived_rx) = mpsc::channel::<String>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let arrived = Mutex::new(arrived_tx);
    let release = Mutex::new(release_rx);
    let b = Backend::with_handler(name, move |req, conn| {
        let _ = arrived.lock().unwrap().send(req.uri.clone());
        // Bounded: a forgotten release still ends the test.
        let _ = release
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(20));
        let body = req.to_json().to_string();
        respond(
            conn,
            "200 OK",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        Reply::KeepAlive
    });
    (b, arrived_rx, release_tx)
}

/// Starts `GET path` on its own thread; the response (or error) comes back on the channel.
fn start_request(router: &Router, path: &str) -> Receiver<io::Result<Response>> {
    let addr = router.http_addr;
    let raw = format!("GET {path} HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut conn = Conn::connect(addr);
        conn.set_read_timeout(Duration::from_secs(30));
        conn.send(raw.as_bytes());
        let _ = tx.send(conn.try_response());
    });
    rx
}

fn set_of(evs: &[Ev]) -> BTreeSet<(String, String)> {
    evs.iter()
        .map(|e| (e.event.clone(), e.addr.clone()))
        .collect()
}

fn pair(event: &str, addr: impl ToString) -> (String, String) {
    (event.to_string(), addr.to_string())
}

#[test]
fn subscribe_replays_backend_up_for_drain_tracked_services_only() {
    let router = Router::start();
    let a = Backend::start("a");
    let b = Backend::start("b");
    let other = Backend::start("other");
    router.add_route(drain_route(DOMAIN, "web"));
    // Routes track drains unless they say otherwise (spec §1.2).
    let mut plain = http_route("plain.example.com", "plain");
    plain["drain_backends"] = false.into();
    router.add_route(plain);
    router.set_backends("web", &[&a, &b]);
    router.set_backends("plain", &[&other]);

    let events = Events::subscribe(&router, TYPES);
    let replay: Vec<Ev> = (0..2)
        .map(|_| events.expect(Duration::from_secs(5), "replayed backend-up"))
        .collect();
    assert_eq!(
        set_of(&replay),
        [pair("backend-up", a.addr), pair("backend-up", b.addr)].into(),
        "{replay:?}"
    );
    assert!(replay.iter().all(|e| e.service == "web"), "{replay:?}");
    events.expect_none(
        Duration::from_millis(300),
        "only tracked services are replayed",
    );

    // Live: a new backend is announced as up.
    let c = Backend::start("c");
    router.set_backends("web", &[&a, &b, &c]);
    let e = events.expect(Duration::from_secs(2), "backend-up for c");
    assert_eq!(pair(&e.event, &e.addr), pair("backend-up", c.addr));
}

#[test]
fn removed_backend_drains_after_its_in_flight_request_completes() {
    let router = Router::start();
    let (slow, arrived, release) = slow_backend("slow");
    let fast = Backend::start("fast");
    router.add_route(drain_route(DOMAIN, "web"));
    router.set_backends("web", &[&slow]);

    let events = Events::subscribe(&router, TYPES);
    let up = events.expect(Duration::from_secs(5), "replayed backend-up");
    assert_eq!(pair(&up.event, &up.addr), pair("backend-up", slow.addr));

    // A request to the slow backend is in flight...
    let in_flight = start_request(&router, "/slow");
    let uri = arrived
        .recv_timeout(Duration::from_secs(5))
        .expect("the slow request reaches the backend");
    assert_eq!(uri, "/slow");

    // ... when the backend is replaced: down at once.
    let removed_at = Instant::now();
    router.set_backends("web", &[&fast]);
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(events.expect(Duration::from_secs(2), "backend-down and backend-up"));
    }
    assert_eq!(
        set_of(&got),
        [
            pair("backend-down", slow.addr),
            pair("backend-up", fast.addr)
        ]
        .into(),
        "{got:?}"
    );
    let down = got.iter().find(|e| e.event == "backend-down").unwrap();
    assert!(
        down.at.duration_since(removed_at) < Duration::from_secs(1),
        "backend-down took {:?}",
        down.at.duration_since(removed_at)
    );

    // New requests avoid the removed backend.
    for i in 0..10 {
        let resp = crate::support::get(router.http_addr, DOMAIN, &format!("/new{i}"));
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.backend(), "fast", "request {i}");
    }
    assert!(
        arrived.try_recv().is_err(),
        "no new request may reach the slow backend"
    );

    // Not drained while the request is in flight.
    events.expect_none(
        Duration::from_millis(700),
        "backend-drained must wait for the in-flight request",
    );
    assert!(
        in_flight.try_recv().is_err(),
        "the in-flight request finished early"
    );

    // Release it: the request completes normally, then drained follows.
    let released_at = Instant::now();
    let resp = release_and_answer(&release, &in_flight);
    assert_eq!(resp.backend(), "slow");
    let drained = events.expect(Duration::from_secs(2), "backend-drained");
    assert_eq!(
        pair(&drained.event, &drained.addr),
        pair("backend-drained", slow.addr)
    );
    assert_eq!(drained.service, "web");
    assert!(
        drained.at >= released_at,
        "drained reported before the response was released"
    );
    // The connection that carried it is closed, not pooled for a backend no route has.
    assert!(
        crate::support::wait_until(Duration::from_secs(2), || slow.closed() == slow.accepted()),
        "the removed backend's connection stayed open after its response: {} accepted, {} closed",
        slow.accepted(),
        slow.closed()
    );
    events.expect_none(Duration::from_millis(200), "nothing else");
}

/// Lets the slow backend answer the request in flight; the response, a 200.
fn release_and_answer(
    release: &Sender<()>,
    in_flight: &Receiver<io::Result<Response>>,
) -> Response {
    release.send(()).unwrap();
    let resp = in_flight
        .recv_timeout(Duration::from_secs(10))
        .expect("in-flight request finishes")
        .expect("in-flight response");
    assert_eq!(resp.status, 200, "{resp:?}");
    resp
}

/// A drain-tracked service whose only backend (`slow_backend`) is removed while a request
/// to it is in flight: the backend, its release, the subscription (replay and
/// `backend-down` taken) and the pending request.
fn removed_while_in_flight(
    router: &Router,
) -> (Backend, Sender<()>, Events, Receiver<io::Result<Response>>) {
    let (slow, arrived, release) = slow_backend("slow");
    router.add_route(drain_route(DOMAIN, "web"));
    router.set_backends("web", &[&slow]);
    let events = Events::subscribe(router, TYPES);
    assert_eq!(
        events.expect(Duration::from_secs(5), "replay").event,
        "backend-up"
    );
    let in_flight = start_request(router, "/slow");
    arrived
        .recv_timeout(Duration::from_secs(5))
        .expect("slow request arrives");
    router.set_backends("web", &[]);
    let down = events.expect(Duration::from_secs(2), "backend-down");
    assert_eq!(
        pair(&down.event, &down.addr),
        pair("backend-down", slow.addr)
    );
    (slow, release, events, in_flight)
}

#[test]
fn removing_the_last_backend_gives_503_while_in_flight_request_completes() {
    let router = Router::start();
    let (slow, release, events, in_flight) = removed_while_in_flight(&router);

    let resp = crate::support::get(router.http_addr, DOMAIN, "/after");
    assert_eq!(resp.status, 503, "{resp:?}");
    assert_eq!(resp.body, b"Service Unavailable\n");

    events.expect_none(Duration::from_millis(500), "still in flight");
    let released_at = Instant::now();
    release_and_answer(&release, &in_flight);
    let drained = events.expect(Duration::from_secs(2), "backend-drained");
    assert_eq!(
        pair(&drained.event, &drained.addr),
        pair("backend-drained", slow.addr)
    );
    assert!(drained.at >= released_at);
}

/// A subscriber that connects while a backend drains (a scheduler whose stream broke
/// between `backend-down` and `backend-drained`) learns it from the replay: a
/// `backend-down` for it, then the live `backend-drained`; one that connects after the
/// drain finished gets the `backend-drained` in its replay; once the backend is back it is
/// replayed as up only.
#[test]
fn a_reconnecting_subscriber_learns_what_it_missed_of_a_drain() {
    let router = Router::start();
    let (slow, release, first, in_flight) = removed_while_in_flight(&router);
    drop(first);

    let during = Events::subscribe(&router, TYPES);
    let e = during.expect(Duration::from_secs(2), "the draining backend replayed");
    assert_eq!(pair(&e.event, &e.addr), pair("backend-down", slow.addr));
    assert_eq!(e.service, "web");
    during.expect_none(Duration::from_millis(300), "still draining");
    release_and_answer(&release, &in_flight);
    let e = during.expect(Duration::from_secs(2), "backend-drained");
    assert_eq!(pair(&e.event, &e.addr), pair("backend-drained", slow.addr));

    let after = Events::subscribe(&router, TYPES);
    let e = after.expect(Duration::from_secs(2), "the finished drain replayed");
    assert_eq!(pair(&e.event, &e.addr), pair("backend-drained", slow.addr));
    after.expect_none(Duration::from_millis(300), "nothing else");
    // Only the subscribed types are replayed.
    let ups = Events::subscribe(&router, "backend-up");
    ups.expect_none(Duration::from_millis(300), "no backend is up");

    router.set_backends("web", &[&slow]);
    let back = Events::subscribe(&router, TYPES);
    let e = back.expect(Duration::from_secs(2), "replayed backend-up");
    assert_eq!(pair(&e.event, &e.addr), pair("backend-up", slow.addr));
    back.expect_none(
        Duration::from_millis(300),
        "a backend back up is not replayed as drained",
    );
}

#[test]
fn idle_backend_drains_immediately_and_filter_applies() {
    let router = Router::start();
    let a = Backend::start("a");
    let b = Backend::start("b");
    router.add_route(drain_route(DOMAIN, "web"));
    router.set_backends("web", &[&a, &b]);
    // Some finished traffic to both first: completed requests must not count.
    for _ in 0..6 {
        assert_eq!(
            crate::support::get(router.http_addr, DOMAIN, "/").status,
            200
        );
    }
    let all = Events::subscribe(&router, TYPES);
    let only_drained = Events::subscribe(&router, "backend-drained");
    for _ in 0..2 {
        all.expect(Duration::from_secs(5), "replay");
    }
    router.set_backends("web", &[&b]);
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(all.expect(Duration::from_secs(2), "down + drained"));
    }
    assert_eq!(got[0].event, "backend-down", "{got:?}");
    assert_eq!(
        set_of(&got),
        [
            pair("backend-down", a.addr),
            pair("backend-drained", a.addr)
        ]
        .into()
    );
    let d = only_drained.expect(Duration::from_secs(2), "filtered drained");
    assert_eq!(pair(&d.event, &d.addr), pair("backend-drained", a.addr));
    only_drained.expect_none(Duration::from_millis(200), "the filter drops other types");
}

/// A request still dialling a backend counts as in flight: the backend is not reported
/// drained until the dial has ended, so a scheduler does not stop a job a request is about to
/// reach.
#[test]
fn a_backend_being_dialled_is_not_drained_until_the_dial_ends() {
    let router = Router::start();
    let (_hole, _filler, hole) = black_hole();
    router.add_route(drain_route(DOMAIN, "web"));
    router.set_backend_addrs("web", &[(hole.to_string(), false)]);
    let events = Events::subscribe(&router, TYPES);
    let up = events.expect(Duration::from_secs(5), "replayed backend-up");
    assert_eq!(pair(&up.event, &up.addr), pair("backend-up", hole));

    // The router's dial hangs (its connect timeout is 1 s).
    let started = Instant::now();
    let pending = start_request(&router, "/dialling");
    // Well within the dial's second: the request is dialling when the backend goes.
    std::thread::sleep(Duration::from_millis(400));
    router.set_backends("web", &[]);
    let down = events.expect(Duration::from_secs(2), "backend-down");
    assert_eq!(pair(&down.event, &down.addr), pair("backend-down", hole));
    let drained = events.expect(Duration::from_secs(5), "backend-drained");
    assert_eq!(
        pair(&drained.event, &drained.addr),
        pair("backend-drained", hole)
    );
    assert!(
        drained.at.duration_since(started) >= Duration::from_millis(900),
        "drained {:?} after the request started, while its dial was pending",
        drained.at.duration_since(started)
    );
    // The dial timed out and no other backend is left: 503, after the dial's second (sooner
    // would mean the request came after the removal and never dialled).
    let resp = pending
        .recv_timeout(Duration::from_secs(10))
        .expect("the request ends")
        .expect("a response");
    assert_eq!(resp.status, 503, "{resp:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "answered in {:?}: the request never dialled",
        started.elapsed()
    );
}

/// A deploy that replaces every backend while a request dials an old one: the dial fails
/// and the retry goes to the new backend, taken from the route as it is now, not from the
/// table the request started with (which has nothing left to try: 503).
#[test]
fn a_retry_after_a_failed_dial_takes_the_backends_of_now() {
    // A dial that outlasts a loaded machine's API call and table change.
    let router = Router::builder()
        .arg("--connect-timeout-ms")
        .arg("3000")
        .start();
    let (_hole, _filler, hole) = black_hole();
    let fresh = Backend::start("fresh");
    router.add_route(drain_route(DOMAIN, "web"));
    router.set_backend_addrs("web", &[(hole.to_string(), false)]);
    let events = Events::subscribe(&router, TYPES);
    let up = events.expect(Duration::from_secs(5), "replayed backend-up");
    assert_eq!(pair(&up.event, &up.addr), pair("backend-up", hole));

    let pending = start_request(&router, "/deploying");
    wait_connecting_to(hole);
    router.set_backends("web", &[&fresh]);
    let resp = pending
        .recv_timeout(Duration::from_secs(10))
        .expect("the request ends")
        .expect("a response");
    assert_eq!(resp.backend(), "fresh", "{resp:?}");
}

/// A backend that comes back before it drained is live: the drain that was waiting for it
/// ends without reporting it drained (a scheduler would stop a job that serves again).
#[test]
fn a_backend_back_before_it_drained_is_not_reported_drained() {
    let router = Router::start();
    let (slow, release, events, in_flight) = removed_while_in_flight(&router);
    router.set_backends("web", &[&slow]);
    let up = events.expect(Duration::from_secs(2), "backend-up");
    assert_eq!(pair(&up.event, &up.addr), pair("backend-up", slow.addr));

    release_and_answer(&release, &in_flight);
    events.expect_none(
        Duration::from_millis(700),
        "the backend is live again: no backend-drained",
    );
}

/// A routes-file reload (`SIGHUP`) that replaces a drain-tracked service's backend reports
/// it as the equivalent `PUT /services/:service/backends` does: `backend-down` for the old
/// backend and `backend-up` for the new one, then `backend-drained` once the request in
/// flight to the old one is done.
#[test]
fn a_routes_file_reload_reports_backend_changes_and_drains() {
    let dir = crate::support::TestDir::new("drain-reload");
    let file = dir.join("routes.json");
    let write = |b: &Backend| {
        let doc = serde_json::json!({
            "routes": [{"type": "http", "domain": DOMAIN, "service": "web",
                        "drain_backends": true}],
            "services": {"web": [{"addr": b.addr.to_string()}]},
        });
        std::fs::write(&file, doc.to_string()).unwrap();
    };
    let (slow, arrived, release) = slow_backend("slow");
    let fast = Backend::start("fast");
    write(&slow);
    let router = Router::builder().routes_file(file.clone()).start();
    let events = Events::subscribe(&router, TYPES);
    let up = events.expect(Duration::from_secs(5), "replayed backend-up");
    assert_eq!(pair(&up.event, &up.addr), pair("backend-up", slow.addr));
    let in_flight = start_request(&router, "/slow");
    arrived
        .recv_timeout(Duration::from_secs(5))
        .expect("slow request arrives");

    write(&fast);
    router.hup();
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(events.expect(Duration::from_secs(5), "backend-down and backend-up"));
    }
    assert_eq!(
        set_of(&got),
        [
            pair("backend-down", slow.addr),
            pair("backend-up", fast.addr)
        ]
        .into(),
        "{got:?}\n{}",
        router.log()
    );
    assert!(got.iter().all(|e| e.service == "web"), "{got:?}");
    assert_eq!(
        crate::support::get(router.http_addr, DOMAIN, "/new").backend(),
        "fast"
    );

    events.expect_none(
        Duration::from_millis(500),
        "backend-drained must wait for the in-flight request",
    );
    let released_at = Instant::now();
    release_and_answer(&release, &in_flight);
    let drained = events.expect(Duration::from_secs(2), "backend-drained");
    assert_eq!(
        pair(&drained.event, &drained.addr),
        pair("backend-drained", slow.addr)
    );
    assert!(drained.at >= released_at);
    events.expect_none(Duration::from_millis(200), "nothing else");
}
