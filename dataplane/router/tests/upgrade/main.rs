//! Zero-downtime upgrade: a new router process takes over the listening sockets of the
//! running one while clients keep sending requests; not one request fails and no
//! connection is refused.

#[path = "../support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

/// One client thread: keep-alive requests in a loop, reconnecting whenever the router
/// answers with `Connection: close`. Returns (ok, failures).
fn client(addr: std::net::SocketAddr, stop: Arc<AtomicBool>, failures: Arc<AtomicUsize>) -> usize {
    let mut ok = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut conn: Option<Conn> = None;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && ok < 20_000 {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::try_connect(addr) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    eprintln!("connect failed: {e}");
                    failures.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            },
        };
        let sent = c.try_send(b"GET /up HTTP/1.1\r\nHost: up.example.com\r\n\r\n");
        let resp = sent.and_then(|_| c.try_response());
        match resp {
            Ok(r) if r.status == 200 => {
                ok += 1;
                if r.connection_has("close") {
                    conn = None;
                }
            }
            Ok(r) => {
                eprintln!("status {}", r.status);
                failures.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
            Err(e) => {
                eprintln!("request failed: {e}");
                failures.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
        }
    }
    ok
}

#[test]
fn takeover_under_load_loses_nothing() {
    let dir = crate::support::TestDir::new("upgrade");
    let sock = dir.join("upgrade.sock");
    let b = Backend::start("b1");
    let mut old = Router::builder()
        .threads(2)
        .arg("--upgrade-socket")
        .arg(sock.display().to_string())
        .start();
    old.add_route(http_route("up.example.com", "web"));
    old.set_backends("web", &[&b]);

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, failures, addr) = (stop.clone(), failures.clone(), old.http_addr);
            std::thread::spawn(move || client(addr, stop, failures))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    // The new process takes over; the old one drains and exits by itself.
    let new = Router::builder()
        .threads(2)
        .arg("--takeover")
        .arg(sock.display().to_string())
        .arg("--upgrade-socket")
        .arg(dir.join("next.sock").display().to_string())
        .start();
    assert_eq!(new.http_addr, old.http_addr, "same listening address");
    assert_eq!(new.api_addr, old.api_addr, "same API address");
    let status = old
        .wait_exit(Duration::from_secs(15))
        .expect("old router exits after draining");
    assert!(status.success(), "old router: {status}");
    let before = b.accepted();
    std::thread::sleep(Duration::from_millis(400));
    stop.store(true, Ordering::Relaxed);
    let ok: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();

    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "failed requests or refused connections"
    );
    assert!(ok > 200, "only {ok} requests went through");
    // The new process serves (its own upstream connections) and kept the routes.
    let (st, routes) = new.api("GET", "/routes", None);
    assert_eq!(st, 200);
    assert_eq!(routes.as_array().map(|a| a.len()), Some(1));
    let r = get(new.http_addr, "up.example.com", "/");
    assert_eq!(r.status, 200);
    assert!(b.accepted() > before || b.accepted() > 0);
}

#[test]
fn takeover_refused_without_a_running_router() {
    let dir = crate::support::TestDir::new("upgrade-none");
    let (status, out) = Router::builder()
        .arg("--takeover")
        .arg(dir.join("nobody.sock").display().to_string())
        .run_to_exit(Duration::from_secs(10));
    let status = status.expect("router exits");
    assert!(!status.success());
    assert!(out.contains("nobody.sock"), "{out}");
}

#[test]
fn sighup_reload_under_load_loses_nothing() {
    let dir = crate::support::TestDir::new("reload");
    let file = dir.join("routes.json");
    let (b1, b2) = (Backend::start("b1"), Backend::start("b2"));
    let write = |svc_addr: std::net::SocketAddr, extra: bool| {
        let more = if extra {
            r#",{"type":"http","domain":"new.example.com","service":"web"}"#
        } else {
            ""
        };
        let json = format!(
            r#"{{"routes":[{{"type":"http","domain":"up.example.com","service":"web"}}{more}],
                "services":{{"web":[{{"addr":"{svc_addr}"}}]}}}}"#
        );
        std::fs::write(&file, json).unwrap();
    };
    write(b1.addr, false);
    let router = Router::builder()
        .threads(2)
        .routes_file(file.clone())
        .start();
    assert_eq!(get(router.http_addr, "up.example.com", "/").backend(), "b1");
    assert_eq!(get(router.http_addr, "new.example.com", "/").status, 404);

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, failures, addr) = (stop.clone(), failures.clone(), router.http_addr);
            std::thread::spawn(move || client(addr, stop, failures))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    write(b2.addr, true);
    router.hup();
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(router.http_addr, "new.example.com", "/").status != 200 {
        assert!(
            Instant::now() < deadline,
            "reload not applied: {}",
            router.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let ok: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "failed requests during the reload"
    );
    assert!(ok > 100, "only {ok} requests");
    assert_eq!(get(router.http_addr, "up.example.com", "/").backend(), "b2");
    // A broken file is refused and changes nothing.
    std::fs::write(&file, "{not json").unwrap();
    router.hup();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get(router.http_addr, "up.example.com", "/").backend(), "b2");
    assert!(router.log().contains("reload failed"), "{}", router.log());
}

/// One TCP route client thread: connect, send, half-close, expect the backend's echo;
/// counts refused/reset connections and wrong answers as failures.
/// Sends `ping` to the TCP route on `port`, half-closes, and returns the whole answer.
fn tcp_ping(port: u16) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"ping")?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

fn tcp_client(port: u16, stop: Arc<AtomicBool>, failures: Arc<AtomicUsize>) -> usize {
    let mut ok = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && ok < 5_000 {
        let res = tcp_ping(port);
        match res {
            Ok(out) if out == b"t1 ping" => ok += 1,
            Ok(out) => {
                eprintln!("tcp answer {:?}", String::from_utf8_lossy(&out));
                failures.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                eprintln!("tcp exchange failed: {e}");
                failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    ok
}

#[test]
fn takeover_passes_tcp_route_listeners_and_drains_open_streams() {
    use std::io::{Read, Write};
    let dir = crate::support::TestDir::new("upgrade-tcp");
    let sock = dir.join("upgrade.sock");
    let b = TcpBackend::start("t1");
    let range = tcp_range(20);
    let mut old = Router::builder()
        .threads(2)
        .tcp_ports(range)
        .arg("--upgrade-socket")
        .arg(sock.display().to_string())
        .start();
    let route = old.add_route(tcp_route(0, "tcpsvc"));
    let port = route["port"].as_u64().expect("tcp route port") as u16;
    old.set_backend_addrs("tcpsvc", &[(b.addr.to_string(), false)]);

    // A stream opened through the old process stays up across the takeover.
    let mut held = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    held.write_all(b"held").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (stop, failures) = (stop.clone(), failures.clone());
            std::thread::spawn(move || tcp_client(port, stop, failures))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    let new = Router::builder()
        .threads(1)
        .tcp_ports(range)
        .arg("--takeover")
        .arg(sock.display().to_string())
        .start();
    // The old process is draining but waits for the held stream.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        old.wait_exit(Duration::from_millis(10)).is_none(),
        "the old router exited with a TCP stream still open"
    );
    stop.store(true, Ordering::Relaxed);
    let ok: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    held.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    held.read_to_end(&mut out).unwrap();
    assert_eq!(out, b"t1 held", "the held stream was cut");
    drop(held);
    let status = old
        .wait_exit(Duration::from_secs(15))
        .expect("old router exits once its streams are done");
    assert!(status.success(), "old router: {status}");

    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "TCP connections refused, reset or answered wrongly during the takeover"
    );
    assert!(ok > 50, "only {ok} TCP exchanges went through");
    // The new process (one core, two handed-over sockets) serves the port alone now.
    for _ in 0..20 {
        assert_eq!(tcp_ping(port).unwrap(), b"t1 ping");
    }
    let (st, routes) = new.api("GET", "/routes", None);
    assert_eq!(st, 200);
    assert_eq!(routes.as_array().map(|a| a.len()), Some(1));
}

/// A TCP route listener shut down by the process it was handed to (the successor removed
/// the route before this process's core stopped accepting; here the test plays the
/// successor and shuts the handed-over socket down before saying anything) ends this
/// core's accept loop quietly: its accept fails with EINVAL (not listening), which is
/// not a failure to warn about and back off from.
#[test]
fn a_tcp_listener_shut_down_by_the_successor_ends_its_accept_loop_quietly() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let dir = crate::support::TestDir::new("upgrade-tcp-shut");
    let sock = dir.join("upgrade.sock");
    let b = TcpBackend::start("t1");
    let mut old = Router::builder()
        .threads(1)
        .tcp()
        .arg("--upgrade-socket")
        .arg(sock.display().to_string())
        .start();
    let route = old.add_route(tcp_route(0, "tcpsvc"));
    let port = route["port"].as_u64().expect("tcp route port") as u16;
    old.set_backend_addrs("tcpsvc", &[(b.addr.to_string(), false)]);
    assert_eq!(tcp_ping(port).unwrap(), b"t1 ping");
    let conn = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    (&conn).write_all(b"takeover\n").unwrap();
    let (data, fds) = flynn_runtime::handoff::recv_with_fds(&conn).unwrap();
    let state: serde_json::Value = serde_json::from_slice(&data).unwrap();
    let listeners = state["listeners"].as_array().unwrap().len();
    assert_eq!(state["tcp"], serde_json::json!([port]), "{state}");
    // The successor's removal: out of LISTEN, which wakes the old core's readiness wait.
    flynn_runtime::sock::shutdown(fds[listeners].as_raw_fd());
    std::thread::sleep(Duration::from_millis(500));
    drop(conn);
    assert!(
        wait_until(Duration::from_secs(5), || old
            .log()
            .contains("takeover attempt failed")),
        "{}",
        old.log()
    );
    assert!(
        !old.log().contains("TCP route accept failed"),
        "a warning for a socket no longer listening:\n{}",
        old.log()
    );
    // The takeover failed and this process goes on: the dead port is said (it reopens
    // later, see `tcp::REOPEN_AFTER`), not left silent.
    assert!(
        old.log()
            .contains("TCP route listener shut down by another process while this one serves"),
        "{}",
        old.log()
    );
    old.assert_running();
}

/// One `--upgrade-socket` path for every generation (as with FLYNN_UPGRADE_SOCKET set
/// once): the exiting router must not remove the socket its successor bound there, so a
/// third generation can take over from the second. With 401 routes the handed-over state
/// is past the handoff's former 64 KiB cap.
#[test]
fn three_generations_share_one_upgrade_socket_path() {
    let dir = crate::support::TestDir::new("upgrade3");
    let sock = dir.join("upgrade.sock").display().to_string();
    let b = Backend::start("b1");
    let mut gen = Router::builder()
        .arg("--upgrade-socket")
        .arg(sock.clone())
        .start();
    gen.add_route(http_route("up.example.com", "web"));
    gen.set_backends("web", &[&b]);
    // Enough routes that the handed-over state is well past 64 KiB (the old cap).
    for i in 0..400 {
        gen.add_route(http_route(&format!("app-{i}.example.com"), "web"));
    }
    for n in 2..=3 {
        let mut next = Router::builder()
            .arg("--takeover")
            .arg(sock.clone())
            .arg("--upgrade-socket")
            .arg(sock.clone())
            .start();
        let status = gen
            .wait_exit(Duration::from_secs(15))
            .expect("the previous router exits after draining");
        assert!(status.success(), "generation {}: {status}", n - 1);
        assert_eq!(
            get(next.http_addr, "up.example.com", "/").status,
            200,
            "generation {n}"
        );
        let (st, routes) = next.api("GET", "/routes", None);
        assert_eq!(st, 200);
        assert_eq!(
            routes.as_array().map(|a| a.len()),
            Some(401),
            "generation {n}"
        );
        std::mem::swap(&mut gen, &mut next);
        drop(next);
    }
}

/// 130 TCP routes on two cores are 260 listening sockets, past what one `sendmsg` can
/// carry: they are handed over in continuation messages, and every port keeps working.
#[test]
fn takeover_with_more_listeners_than_one_message_carries() {
    let dir = crate::support::TestDir::new("upgrade-many");
    let sock = dir.join("upgrade.sock");
    let b = TcpBackend::start("t1");
    let range = tcp_range(140);
    let mut old = Router::builder()
        .threads(2)
        .tcp_ports(range)
        .arg("--upgrade-socket")
        .arg(sock.display().to_string())
        .start();
    let ports: Vec<u16> = (0..130)
        .map(|_| {
            let route = old.add_route(tcp_route(0, "tcpsvc"));
            route["port"].as_u64().expect("tcp route port") as u16
        })
        .collect();
    old.set_backend_addrs("tcpsvc", &[(b.addr.to_string(), false)]);

    let new = Router::builder()
        .threads(2)
        .tcp_ports(range)
        .arg("--takeover")
        .arg(sock.display().to_string())
        .start();
    let status = old
        .wait_exit(Duration::from_secs(15))
        .expect("old router exits after the takeover");
    assert!(status.success(), "old router: {status}");
    for port in [ports[0], ports[64], ports[129]] {
        assert_eq!(tcp_ping(port).unwrap(), b"t1 ping", "port {port}");
    }
    let (st, routes) = new.api("GET", "/routes", None);
    assert_eq!(st, 200);
    assert_eq!(routes.as_array().map(|a| a.len()), Some(130));
}

#[test]
fn a_routes_file_still_reloads_after_a_takeover() {
    let dir = crate::support::TestDir::new("reload-takeover");
    let file = dir.join("routes.json");
    let sock = dir.join("upgrade.sock");
    let b = Backend::start("b1");
    let write = |domains: &[&str]| {
        let routes: Vec<String> = domains
            .iter()
            .map(|d| format!(r#"{{"type":"http","domain":"{d}","service":"web"}}"#))
            .collect();
        let json = format!(
            r#"{{"routes":[{}],"services":{{"web":[{{"addr":"{}"}}]}}}}"#,
            routes.join(","),
            b.addr
        );
        std::fs::write(&file, json).unwrap();
    };
    write(&["up.example.com"]);
    let mut old = Router::builder()
        .routes_file(file.clone())
        .arg("--upgrade-socket")
        .arg(sock.display().to_string())
        .start();
    assert_eq!(get(old.http_addr, "up.example.com", "/").status, 200);
    let new = Router::builder()
        .routes_file(file.clone())
        .arg("--takeover")
        .arg(sock.display().to_string())
        .start();
    old.wait_exit(Duration::from_secs(15))
        .expect("old router exits after the takeover");
    let wait_status = |host: &str, want: u16| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while get(new.http_addr, host, "/").status != want {
            assert!(
                Instant::now() < deadline,
                "{host} never {want}: {}",
                new.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // The new process knows the file's routes as the file's: a route added to the file is
    // added, one taken out is removed.
    write(&["up.example.com", "more.example.com"]);
    new.hup();
    wait_status("more.example.com", 200);
    assert_eq!(get(new.http_addr, "up.example.com", "/").status, 200);
    write(&["more.example.com"]);
    new.hup();
    wait_status("up.example.com", 404);
    assert!(!new.log().contains("reload failed"), "{}", new.log());
}

#[test]
fn route_changes_during_a_takeover_are_kept_or_refused_never_lost() {
    let dir = crate::support::TestDir::new("takeover-writes");
    let sock = dir.join("upgrade.sock");
    let mut old = Router::builder()
        .arg("--upgrade-socket")
        .arg(sock.display().to_string())
        .start();
    // Routes are added without pause through the shared API address while the new process
    // takes over; every one answered 200 must be in the new process.
    let api = old.api_addr;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut ok = Vec::new();
            let mut refused = 0;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let domain = format!("w{i}.example.com");
                i += 1;
                let body = format!(r#"{{"type":"http","domain":"{domain}","service":"web"}}"#);
                match crate::support::api_call(api, "POST", "/routes", Some(&body)) {
                    Some((200, _)) => ok.push(domain),
                    Some((503, v)) => {
                        assert_eq!(v["retry"], true, "{v}");
                        refused += 1;
                    }
                    other => panic!("POST /routes: {other:?}"),
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (ok, refused)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let new = Router::builder()
        .arg("--takeover")
        .arg(sock.display().to_string())
        .start();
    old.wait_exit(Duration::from_secs(15))
        .expect("old router exits after the takeover");
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (ok, refused) = writer.join().unwrap();
    let (st, routes) = new.api("GET", "/routes", None);
    assert_eq!(st, 200);
    let have: std::collections::BTreeSet<String> = routes
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["domain"].as_str().unwrap().to_string())
        .collect();
    let lost: Vec<&String> = ok.iter().filter(|d| !have.contains(*d)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged routes lost ({refused} refused): {lost:?}",
        lost.len()
    );
    assert!(ok.len() > 10, "only {} routes added", ok.len());
}

/// After a takeover the old process answers what its accepted API connections send, with
/// `Connection: close`, and then exits: a request on a kept-alive connection sent just after
/// the switch gets an answer, and an open `/events` stream (which never ends by itself) does
/// not hold the old process for the whole shutdown wait.
#[test]
fn the_old_api_answers_its_connections_then_exits() {
    let dir = crate::support::TestDir::new("takeover-api");
    let sock = dir.join("upgrade.sock");
    let mut old = Router::builder()
        .arg("--upgrade-socket")
        .arg(sock.display().to_string())
        .start();
    let get_routes = b"GET /routes HTTP/1.1\r\nHost: router-api\r\n\r\n";
    let mut kept = Conn::connect(old.api_addr);
    kept.send(get_routes);
    let first = kept.try_response().expect("an answer before the takeover");
    assert_eq!(first.status, 200);
    let mut sse = Conn::connect(old.api_addr);
    sse.send(b"GET /events HTTP/1.1\r\nHost: router-api\r\nAccept: text/event-stream\r\n\r\n");
    assert_eq!(sse.read_head().expect("events head").status, 200);

    let _new = Router::builder()
        .arg("--takeover")
        .arg(sock.display().to_string())
        .start();
    let switched = Instant::now();
    // The old process still owns this connection: it answers every request on it, and once
    // it has heard that the new one is ready, says it closes.
    let mut closing = None;
    for _ in 0..100 {
        kept.send(get_routes);
        let resp = kept
            .try_response()
            .expect("the old process answers its kept-alive connection");
        assert_eq!(resp.status, 200, "{resp:?}");
        if resp.header("connection") == Some("close") {
            closing = Some(resp);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(closing.is_some(), "no answer said Connection: close");
    old.wait_exit(Duration::from_secs(15))
        .expect("the old router exits");
    assert!(
        switched.elapsed() < Duration::from_millis(2500),
        "the old router took {:?} to exit with an events stream open",
        switched.elapsed()
    );
}

/// A process that hands over backends it took from discoverd for a service no route names
/// any more (a route deleted just before the copy) has the new process clear them, and so
/// are those of a clear it owed (refused while the handover froze its API) although a route
/// names that service again; backends set through the API for a service no route names yet
/// are kept. The old process is played by the test: it hands over a state and two listening
/// sockets as a router would.
#[test]
fn takeover_clears_discovered_backends_no_route_names() {
    use std::io::{BufRead, BufReader};
    use std::os::fd::AsRawFd;
    let dir = crate::support::TestDir::new("upgrade-owed");
    let sock = dir.join("old.sock");
    // As a router's: SO_REUSEPORT, so the new process adds a socket per core beside it.
    let http = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    http.set_reuse_port(true).unwrap();
    http.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    http.listen(128).unwrap();
    let http: std::net::TcpListener = http.into();
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b1 = Backend::start("b1");
    let state = serde_json::json!({
        "listeners": [{"addr": http.local_addr().unwrap(), "tls": false, "route_port": 0}],
        "api": api.local_addr().unwrap(),
        "routes": [{"id": "again", "type": "http", "domain": "again.example.com",
                    "service": "again", "created_at": "2026-11-28T00:00:00Z"}],
        "services": {
            "web": [{"addr": b1.addr.to_string()}],
            "again": [{"addr": b1.addr.to_string()}],
            "staged": [{"addr": b1.addr.to_string()}],
        },
        "discovered": ["web", "again"],
        "owed": ["again"],
    });
    let unix = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let old = std::thread::spawn(move || {
        let conn = accept_within(&unix, Duration::from_secs(20));
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut r = BufReader::new(conn.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "takeover");
        let data = serde_json::to_vec(&state).unwrap();
        flynn_runtime::handoff::send_with_fds(&conn, &data, &[http.as_raw_fd(), api.as_raw_fd()])
            .unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        line
    });
    // discoverd is unreachable: what is cleared comes from the handed-over state alone.
    let router = Router::builder()
        .arg("--takeover")
        .arg(sock.display().to_string())
        .arg("--discoverd")
        .arg(format!("http://{}", dead_addr()))
        .start();
    assert_eq!(old.join().unwrap().trim(), "ready");
    let backends = |svc: &str| router.api("GET", &format!("/services/{svc}/backends"), None);
    let deadline = Instant::now() + Duration::from_secs(5);
    for svc in ["web", "again"] {
        while backends(svc).1 != serde_json::json!([]) {
            assert!(
                Instant::now() < deadline,
                "{svc}'s discovered backends kept: {:?}",
                backends(svc)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let routes = router.api("GET", "/routes", None).1;
    assert_eq!(routes[0]["id"], "again", "the handed-over route: {routes}");
    let (st, staged) = backends("staged");
    assert_eq!(st, 200);
    assert_eq!(staged[0]["addr"], b1.addr.to_string(), "{staged}");
}

/// A draining process does not wait for connections it is closing in stages: a client
/// answered (404) before its body was read that keeps trickling the body would hold one
/// for the lingering time (here 120 s, past the drain timeout too). The drain ends the
/// lingering at once and the old process exits.
#[test]
fn a_draining_router_stops_lingering_connections() {
    use std::io::Write;
    let dir = crate::support::TestDir::new("upgrade-linger");
    let sock = dir.join("upgrade.sock").display().to_string();
    let mut old = Router::builder()
        .arg("--upgrade-socket")
        .arg(sock.clone())
        .arg("--lingering-time-secs=120")
        .arg("--drain-timeout-secs=60")
        .start();
    let mut conn = Conn::connect(old.http_addr);
    conn.send(b"POST / HTTP/1.1\r\nHost: nope.example.com\r\nContent-Length: 100000000\r\n\r\n");
    assert_eq!(conn.response().status, 404);
    // A byte every 200 ms: the lingering read never goes 5 s without one.
    let mut w = conn.stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if w.write_all(b"x").is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    });
    std::thread::sleep(Duration::from_millis(500));
    let _new = Router::builder()
        .arg("--takeover")
        .arg(sock)
        .arg("--upgrade-socket")
        .arg(dir.join("next.sock").display().to_string())
        .start();
    let status = old
        .wait_exit(Duration::from_secs(10))
        .expect("the old router exits while a client still lingers");
    assert!(status.success(), "old router: {status}");
    assert!(
        writer.join().unwrap(),
        "the lingering connection stayed open"
    );
}

/// A takeover that fails after the successor took the upgrade socket's path (as a build
/// that binds the path before it says `ready` does) and then died: the old router goes on
/// serving, accepts changes again, binds the path again, and a second takeover succeeds.
#[test]
fn a_failed_takeover_leaves_the_old_router_to_be_taken_over_again() {
    use std::io::Write;
    let dir = crate::support::TestDir::new("upgrade-failed");
    let sock = dir.join("upgrade.sock");
    let b = Backend::start("b1");
    let mut old = Router::builder()
        .arg("--upgrade-socket")
        .arg(sock.display().to_string())
        .start();
    old.add_route(http_route("up.example.com", "web"));
    old.set_backends("web", &[&b]);
    let post = |domain: &str| {
        old.api(
            "POST",
            "/routes",
            Some(&http_route(domain, "web").to_string()),
        )
        .0
    };
    {
        let conn = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        (&conn).write_all(b"takeover\n").unwrap();
        let (data, fds) = flynn_runtime::handoff::recv_with_fds(&conn).unwrap();
        let state: serde_json::Value = serde_json::from_slice(&data).unwrap();
        assert_eq!(state["routes"].as_array().map(Vec::len), Some(1), "{state}");
        assert!(!fds.is_empty());
        assert_eq!(post("frozen.example.com"), 503, "changes refused meanwhile");
        // The successor takes the path, then dies without saying `ready`: its socket file
        // is left to no one.
        std::fs::remove_file(&sock).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        assert!(sock.exists());
    }
    assert!(
        wait_until(Duration::from_secs(5), || post("after.example.com") == 200),
        "the old router does not take changes again: {}",
        old.log()
    );
    assert_eq!(get(old.http_addr, "up.example.com", "/").status, 200);
    let new = Router::builder()
        .arg("--takeover")
        .arg(sock.display().to_string())
        .arg("--upgrade-socket")
        .arg(sock.display().to_string())
        .start();
    let status = old
        .wait_exit(Duration::from_secs(15))
        .expect("the old router exits after the second takeover");
    assert!(status.success(), "old router: {status}");
    let (st, routes) = new.api("GET", "/routes", None);
    assert_eq!(st, 200);
    let mut domains: Vec<&str> = routes
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["domain"].as_str().unwrap())
        .collect();
    domains.sort();
    assert_eq!(domains, ["after.example.com", "up.example.com"]);
    assert_eq!(get(new.http_addr, "up.example.com", "/").status, 200);
    // The path is the new router's now: it can be taken over in turn.
    assert!(sock.exists());
}

/// A panic in the old router while it prepares the state to hand over (before anything is
/// sent: here under the store's lock, with the store frozen) is a failed attempt, not the
/// end of the process: the successor gets no state and exits, the old router serves on,
/// takes changes again, and a second takeover succeeds. (The fault is injected through a
/// test-only environment variable, at the first attempt only.)
#[test]
fn a_panic_before_the_state_is_sent_leaves_the_old_router_serving() {
    let dir = crate::support::TestDir::new("upgrade-panic");
    let sock = dir.join("upgrade.sock");
    let b = Backend::start("b1");
    let mut old = Router::builder()
        .arg("--upgrade-socket")
        .arg(sock.display().to_string())
        .env("FLYNN_ROUTER_TEST_FAULT", "handover-prepare")
        .start();
    old.add_route(http_route("up.example.com", "web"));
    old.set_backends("web", &[&b]);
    let (status, out) = Router::builder()
        .arg("--takeover")
        .arg(sock.display().to_string())
        .arg("--upgrade-socket")
        .arg(sock.display().to_string())
        .run_to_exit(Duration::from_secs(20));
    let status = status.expect("the successor gives up");
    assert!(!status.success(), "{out}");
    assert!(out.contains("receiving the handed-over state"), "{out}");
    // Before the fix the old router aborted at the panic: nothing served any more.
    assert!(
        wait_until(Duration::from_secs(5), || old
            .log()
            .contains("takeover attempt failed")),
        "{}",
        old.log()
    );
    old.assert_running();
    assert!(
        old.log().contains("fault injected at handover-prepare"),
        "{}",
        old.log()
    );
    assert_eq!(get(old.http_addr, "up.example.com", "/").status, 200);
    // Changes are taken again (the store thawed and not left poisoned).
    let (st, _) = old.api(
        "POST",
        "/routes",
        Some(&http_route("after.example.com", "web").to_string()),
    );
    assert_eq!(st, 200, "{}", old.log());
    let new = Router::builder()
        .arg("--takeover")
        .arg(sock.display().to_string())
        .arg("--upgrade-socket")
        .arg(sock.display().to_string())
        .start();
    let status = old
        .wait_exit(Duration::from_secs(15))
        .expect("the old router exits after the second takeover");
    assert!(status.success(), "old router: {status}");
    let (st, routes) = new.api("GET", "/routes", None);
    assert_eq!(st, 200);
    let mut domains: Vec<&str> = routes
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["domain"].as_str().unwrap())
        .collect();
    domains.sort();
    assert_eq!(domains, ["after.example.com", "up.example.com"]);
    assert_eq!(get(new.http_addr, "up.example.com", "/").status, 200);
}

/// Until the old process confirms `ready`, the new one accepts no connection (the old one
/// does: a connection queued on the shared socket meanwhile is still there, unanswered and
/// not reset, when the new one gives up), and serves neither the admin API (a change it
/// accepted would be lost if the takeover failed) nor the upgrade socket's path; when the
/// old one refuses it gives up and leaves nothing behind. The old process is played by the
/// test.
#[test]
fn a_new_router_takes_nothing_over_until_the_takeover_is_confirmed() {
    unconfirmed_takeover("upgrade-unconfirmed", Some(b"no\n"), "refused");
}

/// As above, with an old process (a build before the explicit `no`) that only closes the
/// connection and goes on running: a refusal too.
#[test]
fn a_takeover_closed_by_a_running_old_router_is_refused() {
    unconfirmed_takeover("upgrade-closed", None, "closed the connection");
}

fn unconfirmed_takeover(tag: &str, answer: Option<&'static [u8]>, why: &str) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::fd::AsRawFd;
    let dir = crate::support::TestDir::new(tag);
    let sock = dir.join("old.sock");
    let next = dir.join("next.sock");
    let http = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    http.set_reuse_port(true).unwrap();
    http.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    http.listen(128).unwrap();
    let http: std::net::TcpListener = http.into();
    let http_addr = http.local_addr().unwrap();
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let api_addr = api.local_addr().unwrap();
    let state = serde_json::json!({
        "listeners": [{"addr": http_addr, "tls": false, "route_port": 0}],
        "api": api_addr,
        "routes": [],
        "services": {},
        "ready_ack": true,
    });
    let unix = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let (next2, dir2) = (next.clone(), dir.to_path_buf());
    let old = std::thread::spawn(move || {
        let conn = accept_within(&unix, Duration::from_secs(20));
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut r = BufReader::new(conn.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "takeover");
        let data = serde_json::to_vec(&state).unwrap();
        flynn_runtime::handoff::send_with_fds(&conn, &data, &[http.as_raw_fd(), api.as_raw_fd()])
            .unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        // Not confirmed yet: the upgrade path is not the new process's, and an API request
        // or an HTTP one (queued on the shared sockets, which this process does not accept
        // from) gets no answer.
        assert!(
            !next2.exists(),
            "the upgrade socket was bound before the takeover"
        );
        let mut c = std::net::TcpStream::connect(api_addr).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        c.write_all(b"GET /routes HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut queued = std::net::TcpStream::connect(http_addr).unwrap();
        queued
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        queued
            .write_all(b"GET /queued HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 64];
        let answered = c.read(&mut buf);
        assert!(
            answered.is_err(),
            "the API answered before the takeover was confirmed: {answered:?}"
        );
        let answered = queued.read(&mut buf);
        assert!(
            answered.is_err(),
            "an HTTP request was answered before the takeover was confirmed: {answered:?}"
        );
        let files: Vec<_> = std::fs::read_dir(&dir2)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        // The takeover fails: no `ok`.
        if let Some(answer) = answer {
            (&conn).write_all(answer).unwrap();
        }
        drop(r);
        drop(conn);
        // The old process goes on: its upgrade socket still listens (the new one checks).
        (line, files, http, queued, unix)
    });
    let (status, out) = Router::builder()
        .arg("--takeover")
        .arg(sock.display().to_string())
        .arg("--upgrade-socket")
        .arg(next.display().to_string())
        .run_to_exit(Duration::from_secs(20));
    let (line, files, http, _queued, _unix) = old.join().unwrap();
    assert_eq!(line.trim(), "ready ack");
    // Staged at a temporary name meanwhile.
    assert_eq!(files.len(), 2, "{files:?}");
    let status = status.expect("the new router gives up");
    assert!(!status.success(), "{out}");
    assert!(out.contains(why), "{out}");
    let left: Vec<_> = std::fs::read_dir(&*dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, [std::ffi::OsString::from("old.sock")], "left behind");
    // The connection made meanwhile waits in the old process's socket, its request unread.
    http.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut conn = loop {
        match http.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "the connection made during the takeover is gone"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut req = [0u8; 15];
    conn.read_exact(&mut req).expect("the queued request");
    assert_eq!(&req, b"GET /queued HTT");
}

/// The next connection on `unix`, accepted within `wait` (a test whose router never came
/// fails rather than hangs).
fn accept_within(
    unix: &std::os::unix::net::UnixListener,
    wait: Duration,
) -> std::os::unix::net::UnixStream {
    unix.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + wait;
    loop {
        match unix.accept() {
            Ok((c, _)) => {
                c.set_nonblocking(false).unwrap();
                return c;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "no takeover connection within {wait:?}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Env var under which [`fake_old_router_process`] plays a running router that dies after
/// `ready ack`, before it confirms the takeover.
const FAKE_OLD_DIR: &str = "ROUTER_UPGRADE_TEST_FAKE_OLD_DIR";

/// Not a test by itself: run as a separate process by
/// [`a_new_router_serves_alone_when_the_old_one_dies_before_confirming`] (this test binary
/// again, with [`FAKE_OLD_DIR`] set), it hands over its sockets, reads `ready ack` and
/// exits without an answer. Ignored (run only with `--ignored`); without the variable it
/// does nothing.
#[test]
#[ignore = "a helper process for a_new_router_serves_alone_when_the_old_one_dies_before_confirming"]
fn fake_old_router_process() {
    use std::io::{BufRead, BufReader};
    use std::os::fd::AsRawFd;
    let Some(dir) = std::env::var_os(FAKE_OLD_DIR) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    // Never outlives a test that failed before it was taken over.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(30));
        std::process::exit(2);
    });
    let http = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    http.set_reuse_port(true).unwrap();
    http.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    http.listen(128).unwrap();
    let http: std::net::TcpListener = http.into();
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let unix = std::os::unix::net::UnixListener::bind(dir.join("old.sock")).unwrap();
    let addrs =
        serde_json::json!({"http": http.local_addr().unwrap(), "api": api.local_addr().unwrap()});
    std::fs::write(dir.join("addrs.tmp"), addrs.to_string()).unwrap();
    std::fs::rename(dir.join("addrs.tmp"), dir.join("addrs.json")).unwrap();
    let state = serde_json::json!({
        "listeners": [{"addr": http.local_addr().unwrap(), "tls": false, "route_port": 0}],
        "api": api.local_addr().unwrap(),
        "routes": [],
        "services": {},
        "ready_ack": true,
    });
    let (conn, _) = unix.accept().unwrap();
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "takeover");
    let data = serde_json::to_vec(&state).unwrap();
    flynn_runtime::handoff::send_with_fds(&conn, &data, &[http.as_raw_fd(), api.as_raw_fd()])
        .unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    std::fs::write(dir.join("line.txt"), &line).unwrap();
    // Dies here: the connection closes with the process, no `ok`, no `no`.
    std::process::exit(0);
}

/// The old process dies between the new one's `ready ack` and its answer: the new one is
/// the only router left, so it goes on: it serves the handed-over HTTP and API sockets and
/// binds its upgrade socket (before, it exited too, and neither served).
#[test]
fn a_new_router_serves_alone_when_the_old_one_dies_before_confirming() {
    let dir = crate::support::TestDir::new("upgrade-old-gone");
    let next = dir.join("next.sock");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "fake_old_router_process",
            "--ignored",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(FAKE_OLD_DIR, &*dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addrs = dir.join("addrs.json");
    if !wait_until(Duration::from_secs(10), || addrs.exists()) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the fake old router did not start");
    }
    let addrs: serde_json::Value = serde_json::from_slice(&std::fs::read(&addrs).unwrap()).unwrap();
    // Reaped as soon as it exits.
    let waiter = std::thread::spawn(move || child.wait().unwrap());
    let b = Backend::start("b1");
    let new = Router::builder()
        .arg("--takeover")
        .arg(dir.join("old.sock").display().to_string())
        .arg("--upgrade-socket")
        .arg(next.display().to_string())
        .start();
    let status = waiter.join().unwrap();
    assert!(status.success(), "the fake old router: {status}");
    assert_eq!(
        std::fs::read_to_string(dir.join("line.txt"))
            .unwrap()
            .trim(),
        "ready ack"
    );
    assert_eq!(new.http_addr.to_string(), addrs["http"].as_str().unwrap());
    assert_eq!(new.api_addr.to_string(), addrs["api"].as_str().unwrap());
    assert!(new.log().contains("went away"), "{}", new.log());
    // Its API takes changes and its HTTP listener serves them.
    new.add_route(http_route("up.example.com", "web"));
    new.set_backends("web", &[&b]);
    assert_eq!(get(new.http_addr, "up.example.com", "/").status, 200);
    // Its upgrade socket is in place (renamed from its temporary name).
    assert!(next.exists(), "no upgrade socket");
    let staged: Vec<_> = std::fs::read_dir(&*dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with(".next.sock."))
        .collect();
    assert!(staged.is_empty(), "{staged:?}");
}

/// Temporary names (`.<name>.<pid>`) that successors killed before their takeover was done
/// left beside the upgrade socket's path are removed when a router binds it; a live
/// process's (one that listens on it) is kept, whatever its pid (from another pid
/// namespace, it may name no process here).
#[test]
fn stale_staged_upgrade_sockets_are_swept() {
    let dir = crate::support::TestDir::new("upgrade-stale");
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let stale = dir.join(format!(".up.sock.{pid}"));
    let live = dir.join(format!(".up.sock.{}", std::process::id()));
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let _live = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let mut other = std::process::Command::new("true").spawn().unwrap();
    let other_pid = other.id();
    other.wait().unwrap();
    let elsewhere = dir.join(format!(".up.sock.{other_pid}"));
    let _elsewhere = std::os::unix::net::UnixListener::bind(&elsewhere).unwrap();
    let _router = Router::builder()
        .arg("--upgrade-socket")
        .arg(dir.join("up.sock").display().to_string())
        .start();
    assert!(!stale.exists(), "a dead successor's staged socket was kept");
    assert!(live.exists(), "a live process's staged socket was removed");
    assert!(
        elsewhere.exists(),
        "a staged socket still listened on was removed (its pid named no process)"
    );
}
