//! End to end: the router takes route backends from a real discoverd (`--discoverd`).
//! Instances registering, deregistering and expiring move live traffic; a
//! `leader: true` route follows the manual leader of its service.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills and reaps the process on drop (also when a test panics).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bin(name: &str) -> PathBuf {
    // target/<profile>/deps/<this test> → target/<profile>/<name>
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let path = dir.join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let release = dir.ends_with("release");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "flynn-router", "-p", "flynn-discoverd"]);
        if release {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().unwrap().success(),
            "building the binaries failed"
        );
    }
    assert!(path.exists(), "{} not found", path.display());
    path
}

/// Starts a binary and returns it with the `key=ADDR` values of its `listening` line.
fn start(name: &str, args: &[&str]) -> (Proc, Vec<(String, String)>) {
    let mut child = Command::new(bin(name))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let p = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.starts_with("listening") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("no listening line");
    let kv = line
        .split_whitespace()
        .skip(1)
        .filter_map(|w| {
            w.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    (p, kv)
}

fn get(kv: &[(String, String)], k: &str) -> String {
    kv.iter()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v.clone())
        .unwrap()
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
fn http(addr: &str, method: &str, host: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A backend answering every request with its name.
fn backend(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut r = BufReader::new(s.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    let mut empty = false;
                    while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                        if line == "\r\n" {
                            empty = true;
                            break;
                        }
                        line.clear();
                    }
                    if !empty {
                        return;
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{name}",
                        name.len()
                    );
                    if s.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn instance_id(addr: impl std::fmt::Display) -> String {
    use md5::{Digest, Md5};
    let d = Md5::digest(format!("tcp-{addr}").as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn register(d: &str, svc: &str, addr: SocketAddr) -> String {
    let id = instance_id(addr);
    let body = format!(r#"{{"id":"{id}","addr":"{addr}","proto":"tcp"}}"#);
    let (st, b) = http(
        d,
        "PUT",
        d,
        &format!("/services/{svc}/instances/{id}"),
        Some(&body),
    );
    assert_eq!(st, 200, "register: {b}");
    id
}

/// Adds an HTTP route for `domain` to `service` through the router's API at `api`; its id.
fn add_route(api: &str, domain: &str, service: &str) -> String {
    let route = format!(r#"{{"type":"http","domain":"{domain}","service":"{service}"}}"#);
    let (st, body) = http(api, "POST", api, "/routes", Some(&route));
    assert_eq!(st, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Polls until `f` holds, for at most `limit`.
fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for: {what}");
}

/// A single-node discoverd with data in `dir` and instance TTL `ttl`, once it has a
/// leader: the process and its HTTP address.
fn discoverd(dir: &std::path::Path, ttl: &str) -> (Proc, String) {
    let (p, kv) = start(
        "flynn-discoverd",
        &[
            "--data-dir",
            dir.to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
            "--instance-ttl",
            ttl,
        ],
    );
    let d = get(&kv, "http");
    eventually(Duration::from_secs(10), "discoverd leader", || {
        http(&d, "GET", &d, "/raft/leader", None).0 == 200
    });
    (p, d)
}

/// A router on `threads` cores following discoverd at `d`: the process, its HTTP and API
/// addresses.
fn router(d: &str, threads: &str) -> (Proc, String, String) {
    let url = format!("http://{d}");
    let (p, rkv) = start(
        "flynn-router",
        &[
            "--http-addr",
            "127.0.0.1:0",
            "--api-addr",
            "127.0.0.1:0",
            "--threads",
            threads,
            "--discoverd",
            &url,
        ],
    );
    (p, get(&rkv, "http"), get(&rkv, "api"))
}

#[test]
fn router_follows_discoverd_instances_and_leaders() {
    // Removed on drop, after the processes (declared later) are gone.
    let tmp = tempfile::Builder::new()
        .prefix("flynn-e2e-disc-")
        .tempdir()
        .unwrap();
    let (_disc, d) = discoverd(tmp.path(), "1s");
    assert_eq!(http(&d, "PUT", &d, "/services/web", Some("{}")).0, 200);
    assert_eq!(
        http(
            &d,
            "PUT",
            &d,
            "/services/lead",
            Some(r#"{"leader_type":"manual"}"#)
        )
        .0,
        200
    );

    let (_router, r, api) = router(&d, "2");
    let route = r#"{"type":"http","domain":"web.example.com","service":"web"}"#;
    assert_eq!(http(&api, "POST", &api, "/routes", Some(route)).0, 200);
    let route = r#"{"type":"http","domain":"lead.example.com","service":"lead","leader":true}"#;
    assert_eq!(http(&api, "POST", &api, "/routes", Some(route)).0, 200);

    // No instances yet: 503.
    assert_eq!(http(&r, "GET", "web.example.com", "/", None).0, 503);

    let (b1, b2) = (backend("b1"), backend("b2"));
    let id1 = register(&d, "web", b1);
    eventually(Duration::from_secs(5), "b1 serves web", || {
        http(&r, "GET", "web.example.com", "/", None) == (200, "b1".into())
    });

    // Swap: b2 registers, b1 deregisters → only b2.
    register(&d, "web", b2);
    assert_eq!(
        http(
            &d,
            "DELETE",
            &d,
            &format!("/services/web/instances/{id1}"),
            None
        )
        .0,
        200
    );
    eventually(Duration::from_secs(5), "only b2 serves web", || {
        (0..6).all(|_| http(&r, "GET", "web.example.com", "/", None) == (200, "b2".into()))
    });

    // Leader route follows the manual leader; with instances but no leader set it has no
    // backend (spec §1.6), not an arbitrary instance.
    let l1 = register(&d, "lead", b1);
    let l2 = register(&d, "lead", b2);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(http(&r, "GET", "lead.example.com", "/", None).0, 503);
    for (id, want) in [(&l1, "b1"), (&l2, "b2"), (&l1, "b1")] {
        let body = format!(r#"{{"id":"{id}"}}"#);
        assert_eq!(
            http(&d, "PUT", &d, "/services/lead/leader", Some(&body)).0,
            200
        );
        eventually(
            Duration::from_secs(5),
            &format!("leader route goes to {want}"),
            || (0..4).all(|_| http(&r, "GET", "lead.example.com", "/", None) == (200, want.into())),
        );
    }

    // Nobody heartbeats: instances expire (TTL 1 s, no expiry until 2×TTL after the
    // leader was elected) and the route answers 503 again.
    eventually(Duration::from_secs(15), "web backends expire", || {
        http(&r, "GET", "web.example.com", "/", None).0 == 503
    });
}

/// An instance whose address the router cannot route (a host name, as discoverd accepts
/// any `host:port`) is left out; it used to make the router refuse the service's whole
/// list, so that service's backends froze until the instance went away.
#[test]
fn an_unroutable_instance_does_not_freeze_the_others() {
    let tmp = tempfile::Builder::new()
        .prefix("flynn-e2e-disc-")
        .tempdir()
        .unwrap();
    let (_disc, d) = discoverd(tmp.path(), "60s");
    assert_eq!(http(&d, "PUT", &d, "/services/web", Some("{}")).0, 200);
    let (_router, r, api) = router(&d, "1");
    let route = r#"{"type":"http","domain":"web.example.com","service":"web"}"#;
    assert_eq!(http(&api, "POST", &api, "/routes", Some(route)).0, 200);

    let (b1, b2) = (backend("b1"), backend("b2"));
    let id1 = register(&d, "web", b1);
    eventually(Duration::from_secs(5), "b1 serves web", || {
        http(&r, "GET", "web.example.com", "/", None) == (200, "b1".into())
    });
    let named = instance_id("localhost:1");
    let body = format!(r#"{{"id":"{named}","addr":"localhost:1","proto":"tcp"}}"#);
    let path = format!("/services/web/instances/{named}");
    let (st, b) = http(&d, "PUT", &d, &path, Some(&body));
    assert_eq!(st, 200, "{b}");
    // Changes after it still reach the router: b2 in, b1 out.
    register(&d, "web", b2);
    let path = format!("/services/web/instances/{id1}");
    assert_eq!(http(&d, "DELETE", &d, &path, None).0, 200);
    eventually(Duration::from_secs(5), "only b2 serves web", || {
        (0..6).all(|_| http(&r, "GET", "web.example.com", "/", None) == (200, "b2".into()))
    });
}

/// Deleting the last route that names a service drops the backends discoverd gave it (each
/// reported `backend-down`, spec §1.4): kept, a route added for the service later routed to
/// the old instances until its new watch caught up, and for good while discoverd was
/// unreachable.
#[test]
fn a_service_no_route_names_loses_its_backends() {
    let tmp = tempfile::Builder::new()
        .prefix("flynn-e2e-disc-")
        .tempdir()
        .unwrap();
    let (disc, d) = discoverd(tmp.path(), "60s");
    assert_eq!(http(&d, "PUT", &d, "/services/web", Some("{}")).0, 200);
    let (_router, r, api) = router(&d, "1");
    let route = r#"{"type":"http","domain":"web.example.com","service":"web"}"#;
    let id = add_route(&api, "web.example.com", "web");
    let b1 = backend("b1");
    register(&d, "web", b1);
    eventually(Duration::from_secs(5), "b1 serves web", || {
        http(&r, "GET", "web.example.com", "/", None) == (200, "b1".into())
    });

    assert_eq!(
        http(&api, "DELETE", &api, &format!("/routes/http/{id}"), None).0,
        200
    );
    eventually(Duration::from_secs(5), "web's backends cleared", || {
        http(&api, "GET", &api, "/services/web/backends", None) == (200, "[]".into())
    });

    // discoverd goes away; a new route for the service has no backend to send to.
    drop(disc);
    let (st, body) = http(&api, "POST", &api, "/routes", Some(route));
    assert_eq!(st, 200, "{body}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(http(&r, "GET", "web.example.com", "/", None).0, 503);
}

/// Which services' backends came from discoverd is handed over at a takeover, so a clear is
/// never lost between processes: here the route goes while a router without `--discoverd`
/// runs (nothing clears its service's backends then), and the next router that follows
/// discoverd clears them, with discoverd unreachable. Backends set through the API are not
/// touched: those of a service no route names yet, and those an operator set for a service
/// whose backends had come from discoverd.
#[test]
fn discovered_backends_are_cleared_after_takeovers() {
    let tmp = tempfile::Builder::new()
        .prefix("flynn-e2e-disc-")
        .tempdir()
        .unwrap();
    let sock = tmp.path().join("upgrade.sock").display().to_string();
    let (disc, d) = discoverd(&tmp.path().join("d"), "60s");
    for svc in ["web", "ops"] {
        assert_eq!(
            http(&d, "PUT", &d, &format!("/services/{svc}"), Some("{}")).0,
            200
        );
    }
    let url = format!("http://{d}");
    let common = ["--http-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0"];
    let mut args = common.to_vec();
    args.extend([
        "--threads",
        "1",
        "--discoverd",
        &url,
        "--upgrade-socket",
        &sock,
    ]);
    let (_gen1, kv) = start("flynn-router", &args);
    let (r, api) = (get(&kv, "http"), get(&kv, "api"));
    let id = add_route(&api, "web.example.com", "web");
    let ops_id = add_route(&api, "ops.example.com", "ops");
    let b1 = backend("b1");
    register(&d, "web", b1);
    register(&d, "ops", b1);
    eventually(Duration::from_secs(5), "b1 serves web and ops", || {
        http(&r, "GET", "web.example.com", "/", None) == (200, "b1".into())
            && http(&r, "GET", "ops.example.com", "/", None) == (200, "b1".into())
    });
    let staged = format!(r#"[{{"addr":"{b1}"}}]"#);
    let path = "/services/staged/backends";
    assert_eq!(http(&api, "PUT", &api, path, Some(&staged)).0, 200);

    // Generation 2 follows no discoverd: deleting the route leaves web's backends.
    let mut args = common.to_vec();
    args.extend([
        "--threads",
        "1",
        "--takeover",
        &sock,
        "--upgrade-socket",
        &sock,
    ]);
    let (_gen2, _) = start("flynn-router", &args);
    // Until the old process stops answering the API socket, it refuses changes (503).
    eventually(Duration::from_secs(5), "the route deleted", || {
        http(&api, "DELETE", &api, &format!("/routes/http/{id}"), None).0 == 200
    });
    // ops loses its route too, and an operator sets its backends through the API.
    assert_eq!(
        http(
            &api,
            "DELETE",
            &api,
            &format!("/routes/http/{ops_id}"),
            None
        )
        .0,
        200
    );
    let ops = "/services/ops/backends";
    assert_eq!(http(&api, "PUT", &api, ops, Some(&staged)).0, 200);
    std::thread::sleep(Duration::from_millis(300));
    let web = "/services/web/backends";
    let (st, body) = http(&api, "GET", &api, web, None);
    assert!(st == 200 && body.contains(&b1.to_string()), "{st} {body}");

    // Generation 3 follows discoverd, which is gone: web is cleared from what was handed
    // over, the staged service is not.
    drop(disc);
    let mut args = common.to_vec();
    args.extend(["--threads", "1", "--takeover", &sock, "--discoverd", &url]);
    let (_gen3, _) = start("flynn-router", &args);
    eventually(Duration::from_secs(5), "web's backends cleared", || {
        http(&api, "GET", &api, web, None) == (200, "[]".into())
    });
    for kept in [path, ops] {
        let (st, body) = http(&api, "GET", &api, kept, None);
        assert!(
            st == 200 && body.contains(&b1.to_string()),
            "{kept}: {st} {body}"
        );
    }
}
