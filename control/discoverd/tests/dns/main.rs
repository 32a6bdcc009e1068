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
    eventually(Duration::from_secs(10), || async {
        let r = send(&c, "PUT", &d.url("/services/web"), Some("{}"))
            .await
            .ok()?;
        (r.status == 200).then_some(())
    })
    .await
    .expect("create service");
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
    // Upper case works; UDP carries at most 3 instances.
    let m = udp(&dns, "WEB.DISCOVERD.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(!ips(&m).is_empty() && ips(&m).len() <= 3);

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
