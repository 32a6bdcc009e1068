//! DNS (spec §2.8) against a real single-node discoverd started with
//! `--dns-addr 127.0.0.1:0`: queries are built and parsed with hickory-proto and sent
//! over UDP and TCP (2-byte length prefix) from the test.

#[path = "../support/mod.rs"]
mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use hickory_server::proto::op::{Message, Query, ResponseCode};
use hickory_server::proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::*;

fn start() -> (tempfile::TempDir, Discoverd) {
    let dir = tempfile::tempdir().unwrap();
    let d = Discoverd::spawn(
        dir.path(),
        vec![
            "--addr".into(),
            "127.0.0.1:0".into(),
            "--dns-addr".into(),
            "127.0.0.1:0".into(),
        ],
    );
    (dir, d)
}

fn query(name: &str, t: RecordType) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    m
}

async fn udp(server: &str, name: &str, t: RecordType) -> Message {
    let q = query(name, t);
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&q.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("dns answer over udp")
        .unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.metadata.id, q.metadata.id);
    m
}

async fn tcp(server: &str, name: &str, t: RecordType) -> Message {
    let q = query(name, t).to_vec().unwrap();
    let io = async {
        let mut s = tokio::net::TcpStream::connect(server).await.unwrap();
        s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        s.write_all(&q).await.unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.unwrap();
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut buf).await.unwrap();
        Message::from_vec(&buf).unwrap()
    };
    tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .expect("dns answer over tcp")
}

fn ips(m: &Message) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn srv_ports(m: &Message) -> Vec<u16> {
    let mut v: Vec<u16> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some(s.port),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

/// Creates service `web`, trying again while the new node elects itself.
async fn create_web(c: &reqwest::Client, d: &Discoverd) {
    eventually(Duration::from_secs(10), || async {
        let r = send(c, "PUT", &d.url("/services/web"), Some("{}"))
            .await
            .ok()?;
        (r.status == 200).then_some(())
    })
    .await
    .expect("create service");
}

async fn register(c: &reqwest::Client, d: &Discoverd, svc: &str, addr: &str, proto: &str) {
    let id = flynn_discoverd::api::instance_id(proto, addr);
    let body = format!(r#"{{"id":"{id}","addr":"{addr}","proto":"{proto}"}}"#);
    let r = call(
        c,
        "PUT",
        &d.url(&format!("/services/{svc}/instances/{id}")),
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn dns_answers_the_discoverd_zone_over_udp_and_tcp() {
    let (_dir, d) = start();
    let dns = d.dns.clone().expect("dns= in the listening line");
    let c = client();
    create_web(&c, &d).await;
    call(&c, "PUT", &d.url("/services/idle"), Some("{}")).await;
    for (addr, proto) in [
        ("10.0.0.1:80", "tcp"),
        ("10.0.0.1:81", "tcp"),
        ("10.0.0.2:80", "tcp"),
        ("10.0.0.3:80", "tcp"),
        ("10.0.0.4:53", "udp"),
    ] {
        register(&c, &d, "web", addr, proto).await;
    }
    let v4 = |s: &str| IpAddr::V4(s.parse::<Ipv4Addr>().unwrap());

    // <svc>.discoverd: A records, deduplicated by IP, authoritative, TTL 0.
    let m = tcp(&dns, "web.discoverd.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert!(!m.metadata.recursion_available);
    assert_eq!(
        ips(&m),
        vec![
            v4("10.0.0.1"),
            v4("10.0.0.2"),
            v4("10.0.0.3"),
            v4("10.0.0.4")
        ]
    );
    assert!(m.answers.iter().all(|r| r.ttl == 0));
    // Upper case works; UDP carries 3 instances, counted after deduplication (the
    // cut is random, so ask a few times).
    for _ in 0..10 {
        let m = udp(&dns, "WEB.DISCOVERD.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        let mut got = ips(&m);
        got.dedup();
        assert_eq!(got.len(), 3, "{:?}", ips(&m));
    }

    // _<svc>._<proto>.discoverd SRV, filtered by proto; over TCP with A glue.
    let m = tcp(&dns, "_web._tcp.discoverd.", RecordType::SRV).await;
    assert_eq!(srv_ports(&m), vec![80, 80, 80, 81]);
    assert_eq!(m.additionals.len(), 4);
    let m = udp(&dns, "_web._udp.discoverd.", RecordType::SRV).await;
    assert_eq!(srv_ports(&m), vec![53]);
    match &m.answers[0].data {
        RData::SRV(s) => {
            assert_eq!((s.priority, s.weight), (1, 1));
            let id = flynn_discoverd::api::instance_id("udp", "10.0.0.4:53");
            assert_eq!(s.target.to_ascii(), format!("{id}.web._i.discoverd."));
            // The target resolves to that one instance.
            let one = udp(&dns, &s.target.to_ascii(), RecordType::A).await;
            assert_eq!(ips(&one), vec![v4("10.0.0.4")]);
        }
        other => panic!("{other:?}"),
    }

    // leader.<svc>.discoverd: the oldest instance.
    let m = udp(&dns, "leader.web.discoverd.", RecordType::A).await;
    assert_eq!(ips(&m), vec![v4("10.0.0.1")]);
    let m = udp(&dns, "leader.web.discoverd.", RecordType::SRV).await;
    assert_eq!(srv_ports(&m), vec![80]);

    // Unknown names: NXDOMAIN with the zone's SOA; an existing service without
    // instances: an empty answer with the SOA.
    for name in [
        "nope.discoverd.",
        "leader.idle.discoverd.",
        "x.web._i.discoverd.",
        "a.b.c.web.discoverd.",
    ] {
        let m = udp(&dns, name, RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(
            m.authorities
                .iter()
                .any(|r| matches!(r.data, RData::SOA(_))),
            "{name}: SOA in authority"
        );
    }
    // The apex exists (it holds the SOA): NOERROR, no records (NXDOMAIN would tell an
    // RFC 8020 resolver that nothing below it exists); an SOA query gets the SOA.
    for name in ["discoverd.", "DISCOVERD."] {
        let m = udp(&dns, name, RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
        assert!(m.answers.is_empty(), "{name}: {:?}", m.answers);
        assert!(
            m.authorities
                .iter()
                .any(|r| matches!(r.data, RData::SOA(_))),
            "{name}: SOA in authority"
        );
    }
    let m = tcp(&dns, "discoverd.", RecordType::SOA).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(
        m.answers.iter().any(|r| matches!(r.data, RData::SOA(_))),
        "{:?}",
        m.answers
    );
    let m = udp(&dns, "idle.discoverd.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());

    // Recursion is off by default: other zones are refused, not forwarded.
    let m = udp(&dns, "example.com.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);

    // Answers follow the registry live: a removed instance disappears.
    let gone = flynn_discoverd::api::instance_id("tcp", "10.0.0.3:80");
    let r = call(
        &c,
        "DELETE",
        &d.url(&format!("/services/web/instances/{gone}")),
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    let m = tcp(&dns, "web.discoverd.", RecordType::A).await;
    assert_eq!(
        ips(&m),
        vec![v4("10.0.0.1"), v4("10.0.0.2"), v4("10.0.0.4")]
    );
}

/// A stand-in upstream resolver on 127.0.0.1 (UDP and TCP on one port) that answers any
/// A query with `n` records under the queried name, so a large answer relies on name
/// compression; counts the queries it saw per transport.
struct Upstream {
    addr: String,
    udp_seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tcp_seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn upstream_answer(q: &Message, n: u8) -> Vec<u8> {
    use hickory_server::proto::rr::Record;
    let mut m = Message::response(q.metadata.id, q.metadata.op_code);
    m.metadata.recursion_available = true;
    m.metadata.recursion_desired = q.metadata.recursion_desired;
    let query = q.queries[0].clone();
    for i in 0..n {
        m.answers.push(Record::from_rdata(
            query.name().clone(),
            60,
            RData::A(hickory_server::proto::rr::rdata::A(Ipv4Addr::new(
                192, 0, 2, i,
            ))),
        ));
    }
    m.add_query(query);
    m.to_vec().unwrap()
}

async fn upstream(n: u8) -> Upstream {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let udp = tokio::net::UdpSocket::bind(addr).await.unwrap();
    let udp_seen = Arc::new(AtomicUsize::new(0));
    let tcp_seen = Arc::new(AtomicUsize::new(0));
    let (us, ts) = (udp_seen.clone(), tcp_seen.clone());
    let u = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((len, from)) = udp.recv_from(&mut buf).await {
            us.fetch_add(1, Ordering::SeqCst);
            let q = Message::from_vec(&buf[..len]).unwrap();
            let mut a = upstream_answer(&q, n);
            if a.len() > 512 {
                // What a real server does without EDNS: header + question only, TC set.
                let mut t = Message::response(q.metadata.id, q.metadata.op_code);
                t.metadata.truncation = true;
                t.add_query(q.queries[0].clone());
                a = t.to_vec().unwrap();
            }
            let _ = udp.send_to(&a, from).await;
        }
    });
    let t = tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            ts.fetch_add(1, Ordering::SeqCst);
            let mut len = [0u8; 2];
            if s.read_exact(&mut len).await.is_err() {
                continue;
            }
            let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
            if s.read_exact(&mut q).await.is_err() {
                continue;
            }
            let a = upstream_answer(&Message::from_vec(&q).unwrap(), n);
            let _ = s.write_all(&(a.len() as u16).to_be_bytes()).await;
            let _ = s.write_all(&a).await;
        }
    });
    Upstream {
        addr: addr.to_string(),
        udp_seen,
        tcp_seen,
        tasks: vec![u, t],
    }
}

/// A local port with nothing behind it (UDP answers with ICMP port unreachable, TCP with
/// RST), so a recursor there fails fast.
fn dead_addr() -> String {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().to_string()
}

fn start_with_recursors(recursors: &str) -> (tempfile::TempDir, Discoverd) {
    let dir = tempfile::tempdir().unwrap();
    let d = Discoverd::spawn(
        dir.path(),
        vec![
            "--addr".into(),
            "127.0.0.1:0".into(),
            "--dns-addr".into(),
            "127.0.0.1:0".into(),
            "--recursors".into(),
            recursors.into(),
        ],
    );
    (dir, d)
}

#[tokio::test]
async fn names_outside_the_zone_are_forwarded_to_recursors_in_order() {
    use std::sync::atomic::Ordering;
    let v4 = |s: &str| IpAddr::V4(s.parse::<Ipv4Addr>().unwrap());
    let small = upstream(2).await;
    // The first recursor is dead: forwarding moves on to the next one.
    let (_dir, d) = start_with_recursors(&format!("{},{}", dead_addr(), small.addr));
    let dns = d.dns.clone().unwrap();

    let m = udp(&dns, "example.com.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.recursion_available);
    assert!(!m.metadata.authoritative);
    assert_eq!(ips(&m), vec![v4("192.0.2.0"), v4("192.0.2.1")]);
    assert_eq!(m.queries[0].name().to_ascii(), "example.com.");
    // A UDP query went upstream over UDP, a TCP query over TCP.
    assert_eq!(small.udp_seen.load(Ordering::SeqCst), 1);
    assert_eq!(small.tcp_seen.load(Ordering::SeqCst), 0);
    let m = tcp(&dns, "Example.COM.", RecordType::A).await;
    assert_eq!(ips(&m).len(), 2);
    assert_eq!(small.tcp_seen.load(Ordering::SeqCst), 1);

    // Our own zone is still answered locally, not forwarded.
    let m = udp(&dns, "nosuch.discoverd.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(small.udp_seen.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn long_compressed_upstream_answers_come_through_tcp_whole() {
    // 60 A records: ~1 KiB with name compression, far over 512 bytes without it.
    let big = upstream(60).await;
    let (_dir, d) = start_with_recursors(&big.addr);
    let dns = d.dns.clone().unwrap();
    let m = tcp(
        &dns,
        "a-rather-long-label.under.example.org.",
        RecordType::A,
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(ips(&m).len(), 60);
    assert!(m
        .answers
        .iter()
        .all(|r| r.name.to_ascii() == "a-rather-long-label.under.example.org."));
    // Over UDP the upstream truncates; discoverd retries upstream over TCP and hands the
    // client whatever fits, flagged truncated when it does not.
    let m = udp(
        &dns,
        "a-rather-long-label.under.example.org.",
        RecordType::A,
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(
        m.metadata.truncation || ips(&m).len() == 60,
        "a partial UDP answer must be flagged truncated: {m:?}"
    );
}

#[tokio::test]
async fn servfail_when_every_recursor_is_down() {
    let (_dir, d) = start_with_recursors(&format!("{},{}", dead_addr(), dead_addr()));
    let dns = d.dns.clone().unwrap();
    let m = udp(&dns, "example.com.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    let m = tcp(&dns, "example.com.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
}

/// `--notify` + `--wait-net-dns` against a stand-in host daemon: only DNS waits until the
/// host reports its network (the API serves at once: the overlay that brings the network
/// up leases its block through it), then takes the host's resolvers as recursors; the host
/// is told where discoverd listens.
#[tokio::test]
async fn wait_net_dns_uses_the_host_resolvers_and_notify_reaches_the_host() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use std::sync::atomic::AtomicBool;
    let up = upstream(1).await;
    let polls = Arc::new(AtomicUsize::new(0));
    let network_up = Arc::new(AtomicBool::new(false));
    let notified: Arc<Mutex<Option<serde_json::Value>>> = Arc::default();
    let app = {
        let (polls, notified, resolver) = (polls.clone(), notified.clone(), up.addr.clone());
        let network_up = network_up.clone();
        axum::Router::new()
            .route(
                "/host/status",
                axum::routing::get(move || {
                    polls.fetch_add(1, Ordering::SeqCst);
                    let resolver = resolver.clone();
                    let is_up = network_up.load(Ordering::SeqCst);
                    async move {
                        // The network comes up when the test says so.
                        let network = if !is_up {
                            serde_json::Value::Null
                        } else {
                            serde_json::json!({"subnet": "100.100.3.1/24", "mtu": 1450, "resolvers": [resolver]})
                        };
                        axum::Json(serde_json::json!({"id": "host1", "network": network}))
                    }
                }),
            )
            .route(
                "/host/discoverd",
                axum::routing::post(move |axum::Json(v): axum::Json<serde_json::Value>| {
                    *notified.lock().unwrap() = Some(v);
                    async { "{}" }
                }),
            )
    };
    let (host_addr, server) = stand_in_host(app).await;
    let dir = tempfile::tempdir().unwrap();
    let d = spawn_async(
        dir.path(),
        &[
            "--dns-addr",
            "127.0.0.1:0",
            "--notify",
            &format!("http://{host_addr}/host/discoverd"),
            "--wait-net-dns",
        ],
    )
    .await;
    // The API answers while the host has no network yet.
    let ping = raw_client().get(d.url("/ping")).send().await.unwrap();
    assert_eq!(ping.status(), 200);
    assert!(!network_up.load(Ordering::SeqCst));
    // DNS does not answer until the host reports its network.
    let dns = d.dns.clone().unwrap();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let q = query("example.net.", RecordType::A);
    sock.send_to(&q.to_vec().unwrap(), &dns).await.unwrap();
    let mut buf = [0u8; 512];
    let early = tokio::time::timeout(Duration::from_millis(700), sock.recv_from(&mut buf)).await;
    assert!(
        early.is_err(),
        "DNS answered before the host network was up"
    );
    network_up.store(true, Ordering::SeqCst);
    let m = udp(&dns, "example.net.", RecordType::A).await;
    assert!(polls.load(Ordering::SeqCst) >= 1);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(ips(&m).len(), 1, "answered by the host's resolver");

    let body = eventually(Duration::from_secs(10), || async {
        notified.lock().unwrap().clone()
    })
    .await
    .expect("the host was notified");
    assert_eq!(body["dns"], dns.as_str());
    assert_eq!(body["url"], format!("http://{}", d.addr).as_str());
    server.abort();
}

#[test]
fn wait_net_dns_without_notify_is_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flynn-discoverd"))
        .args([
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
        ])
        .args(["--dns-addr", "127.0.0.1:0", "--wait-net-dns"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--wait-net-dns needs --notify"), "{err}");
}

/// `--notify` retries a host that is not ready (5xx) once a second and stops at a refusal
/// (4xx): the host said no, and asking again for a minute would not change it.
#[tokio::test]
async fn notify_retries_until_refused_and_then_stops() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let posts = Arc::new(AtomicUsize::new(0));
    let app = {
        let posts = posts.clone();
        axum::Router::new().route(
            "/host/discoverd",
            axum::routing::post(move || {
                let n = posts.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < 2 {
                        axum::http::StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        axum::http::StatusCode::BAD_REQUEST
                    }
                }
            }),
        )
    };
    let (host_addr, server) = stand_in_host(app).await;
    let dir = tempfile::tempdir().unwrap();
    let _d = spawn_async(
        dir.path(),
        &["--notify", &format!("http://{host_addr}/host/discoverd")],
    )
    .await;
    eventually(Duration::from_secs(10), || async {
        (posts.load(Ordering::SeqCst) >= 3).then_some(())
    })
    .await
    .expect("two failures retried, then the refusal");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        posts.load(Ordering::SeqCst),
        3,
        "asked again after a refusal"
    );
    server.abort();
}

/// Serves `app` on a free loopback port: a stand-in for the host daemon.
async fn stand_in_host(app: axum::Router) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let host = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = host.local_addr().unwrap();
    (
        addr,
        tokio::spawn(async move { axum::serve(host, app).await.unwrap() }),
    )
}

/// A single node on a free loopback port with `extra` flags, started off the runtime (the
/// start waits for the node to listen, which `--wait-net-dns` may hold back).
async fn spawn_async(dir: &std::path::Path, extra: &[&str]) -> Discoverd {
    let mut args: Vec<String> = vec!["--addr".into(), "127.0.0.1:0".into()];
    args.extend(extra.iter().map(|a| a.to_string()));
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || Discoverd::spawn(&dir, args))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_shut_down_node_answers_servfail_instead_of_a_frozen_registry() {
    let (_dir, d) = start();
    let dns = d.dns.clone().unwrap();
    let c = client();
    create_web(&c, &d).await;
    register(&c, &d, "web", "10.0.0.1:80", "tcp").await;
    let m = udp(&dns, "web.discoverd.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(ips(&m).len(), 1);

    let r = call(&c, "POST", &d.url("/shutdown"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    for m in [
        udp(&dns, "web.discoverd.", RecordType::A).await,
        tcp(&dns, "web.discoverd.", RecordType::A).await,
    ] {
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert!(m.answers.is_empty(), "{m:?}");
    }
}
