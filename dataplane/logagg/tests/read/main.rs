//! Read API tests (spec §3.4, §3.6): history with filters, validation, exact JSON, follow
//! (NDJSON and SSE), no gap/no duplicate under concurrent ingest, latency, cursors, status.

#[path = "../support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::io::Write;
use std::time::{Duration, Instant};

use support::{get, msg, oc, Follower, Logagg};

const T: Duration = Duration::from_secs(10);

fn seed(l: &Logagg) {
    let lines = [
        msg("app1", "h", "web.1", "ID1", 1, 1, "m1"),
        msg("app1", "h", "web.2", "ID1", 2, 2, "m2"),
        msg("app1", "h", "worker.3", "ID2", 3, 3, "m3"),
        msg("app1", "h", "web.1", "ID1", 4, 4, "m4"),
        msg("app1", "h", ".5", "ID1", 5, 5, "m5"),
    ];
    l.send(lines.iter().map(|m| oc(m)).collect::<String>().as_bytes());
    assert_eq!(l.wait_lines("app1", 5).len(), 5);
}

fn bodies(v: &[serde_json::Value]) -> Vec<String> {
    v.iter()
        .map(|j| j["msg"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn history_with_filters() {
    let l = Logagg::start(&[]);
    assert_eq!(l.get("/log/nothing"), (200, String::new()));
    seed(&l);
    let b = |q: &str| bodies(&l.log("app1", q));
    assert_eq!(b(""), ["m1", "m2", "m3", "m4", "m5"]);
    assert_eq!(b("lines=1"), ["m5"]);
    assert_eq!(b("lines=1&job_id=3"), ["m3"]);
    assert_eq!(b("job_id=1"), ["m1", "m4"]);
    assert_eq!(b("process_type=web"), ["m1", "m2", "m4"]);
    assert_eq!(b("process_type="), ["m5"]);
    assert_eq!(b("stream_types=stderr"), ["m3"]);
    assert_eq!(b("stream_types=stdout,stderr&lines=2"), ["m4", "m5"]);
}

#[test]
fn exact_json_and_validation() {
    let l = Logagg::start(&[]);
    l.send(oc("<190>1 2009-11-10T23:00:00.123456Z host-1 app2 web.flynn-abcd1234 ID1 [flynn seq=\"1\"] hello").as_bytes());
    l.wait_lines("app2", 1);
    let (s, body) = l.get("/log/app2");
    assert_eq!(s, 200);
    assert_eq!(
        body,
        "{\"host_id\":\"host-1\",\"job_id\":\"flynn-abcd1234\",\"msg\":\"hello\",\"process_type\":\"web\",\"source\":\"app\",\"stream\":\"stdout\",\"timestamp\":\"2009-11-10T23:00:00.123456Z\"}\n"
    );
    for bad in ["lines=10001", "lines=abc", "lines=-1"] {
        let (s, body) = l.get(&format!("/log/app2?{bad}"));
        assert_eq!(s, 400, "{bad}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["code"], "validation_error");
        assert_eq!(v["detail"]["field"], "lines");
        assert_eq!(v["retry"], false);
    }
    let (s, body) = l.get("/nope");
    assert_eq!(s, 404);
    assert!(body.contains("not_found"));
    let (s, body) = l.get("/.well-known/status");
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"]["status"], "healthy");
    let (s, body) = l.get("/cursors");
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["host-1"]["seq"], 1);
    assert_eq!(v["host-1"]["time"], "2009-11-10T23:00:00.123456Z");
}

#[test]
fn follow_backlog_then_live_with_filters() {
    let l = Logagg::start(&[]);
    seed(&l);
    let f = Follower::open(l.api, "/log/app1?follow=true&lines=1", &[]);
    assert!(
        f.head.starts_with("HTTP/1.0 200") || f.head.starts_with("HTTP/1.1 200"),
        "{}",
        f.head
    );
    assert_eq!(f.next_json(T).unwrap()["msg"], "m5");
    let live_only = Follower::open(l.api, "/log/app1?follow=true&job_id=1", &[]);
    let stderr_only = Follower::open(
        l.api,
        "/log/app1?follow=true&lines=5&stream_types=stderr",
        &[],
    );
    assert_eq!(stderr_only.next_json(T).unwrap()["msg"], "m3");
    std::thread::sleep(Duration::from_millis(50));
    // One connection: lines of one connection are stored in order.
    let both = oc(&msg("app1", "h", "web.1", "ID1", 6, 6, "m6"))
        + &oc(&msg("app1", "h", "web.2", "ID2", 7, 7, "m7"));
    l.send(both.as_bytes());
    assert_eq!(f.next_json(T).unwrap()["msg"], "m6");
    assert_eq!(f.next_json(T).unwrap()["msg"], "m7");
    assert_eq!(live_only.next_json(T).unwrap()["msg"], "m6");
    assert_eq!(stderr_only.next_json(T).unwrap()["msg"], "m7");
    assert!(live_only.next_json(Duration::from_millis(200)).is_none());
}

#[test]
fn sse_format() {
    let l = Logagg::start(&[]);
    seed(&l);
    let (s, body) = get(
        l.api,
        "/log/app1?lines=1",
        &[("Accept", "text/event-stream")],
    );
    assert_eq!(s, 200);
    assert!(
        body.starts_with("data: {\"host_id\":\"h\",\"job_id\":\".5\"")
            || body.starts_with("data: {\"host_id\":\"h\",\"job_id\":\"5\""),
        "{body}"
    );
    assert!(body.ends_with("}\n\n"));
    let f = Follower::open(
        l.api,
        "/log/app1?follow=true",
        &[("Accept", "text/event-stream")],
    );
    assert!(
        f.head
            .to_lowercase()
            .contains("content-type: text/event-stream"),
        "{}",
        f.head
    );
    std::thread::sleep(Duration::from_millis(50));
    l.send(oc(&msg("app1", "h", "web.1", "ID1", 6, 6, "live")).as_bytes());
    assert_eq!(f.next_json(T).unwrap()["msg"], "live");
}

#[test]
fn follow_no_gap_no_duplicate_under_concurrent_ingest() {
    let l = Logagg::start(&[]);
    const PER_WRITER: u64 = 1500;
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let mut s = l.connect();
            std::thread::spawn(move || {
                for i in 0..PER_WRITER {
                    let m = msg(
                        "busy",
                        &format!("host{w}"),
                        "web.1",
                        "ID1",
                        i + 1,
                        w * 1_000_000_000 + i,
                        &format!("w{w}-{i}"),
                    );
                    s.write_all(oc(&m).as_bytes()).unwrap();
                    if i % 100 == 0 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            })
        })
        .collect();
    // Join mid-stream: history (lines=0 means all with follow? no: all via lines=10000) then live.
    std::thread::sleep(Duration::from_millis(20));
    let f = Follower::open(l.api, "/log/busy?follow=true&lines=10000", &[]);
    for w in writers {
        w.join().unwrap();
    }
    let mut seen = HashSet::new();
    let mut per_writer_last = [None::<u64>, None];
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < 2 * PER_WRITER as usize && Instant::now() < deadline {
        let Some(v) = f.next_json(Duration::from_secs(5)) else {
            break;
        };
        let m = v["msg"].as_str().unwrap().to_string();
        assert!(seen.insert(m.clone()), "duplicate {m}");
        let (w, i) = m[1..].split_once('-').unwrap();
        let (w, i): (usize, u64) = (w.parse().unwrap(), i.parse().unwrap());
        if let Some(prev) = per_writer_last[w] {
            assert!(i > prev, "out of order within writer {w}: {i} after {prev}");
        }
        per_writer_last[w] = Some(i);
    }
    assert_eq!(
        seen.len(),
        2 * PER_WRITER as usize,
        "gap: got {} lines",
        seen.len()
    );
}

#[test]
fn live_latency_under_50ms() {
    let l = Logagg::start(&[]);
    let f = Follower::open(l.api, "/log/lat?follow=true", &[]);
    std::thread::sleep(Duration::from_millis(50));
    let mut s = l.connect();
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let t = Instant::now();
        s.write_all(oc(&msg("lat", "h", "web.1", "ID1", i + 1, i, &format!("x{i}"))).as_bytes())
            .unwrap();
        let v = f.next_json(T).expect("line");
        worst = worst.max(t.elapsed());
        assert_eq!(v["msg"], format!("x{i}"));
    }
    eprintln!("worst follow latency {worst:?}");
    assert!(
        worst < Duration::from_millis(50),
        "worst follow latency {worst:?}"
    );
}

#[test]
fn method_and_path_errors_use_the_json_envelope() {
    let l = Logagg::start(&[]);
    let send = |req: &str| {
        let mut s = std::net::TcpStream::connect(l.api).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut s, &mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_string(), body.to_string())
    };
    for path in ["/log/app1", "/cursors", "/.well-known/status"] {
        let (head, body) = send(&format!(
            "POST {path} HTTP/1.0\r\nHost: t\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(head.starts_with("HTTP/1.0 405"), "{path}: {head}");
        assert!(head.to_ascii_lowercase().contains("allow: get"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(&body).expect(&body);
        assert_eq!(v["code"], "validation_error", "{body}");
        assert_eq!(v["retry"], false, "{body}");
    }
    // A channel id that is not UTF-8 once percent-decoded.
    let (s, body) = l.get("/log/%ff%fe");
    assert_eq!(s, 400, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect(&body);
    assert_eq!(v["code"], "validation_error");
    assert_eq!(v["detail"]["field"], "channel_id");
}

/// History longer than one chunk (512 lines) goes out a chunk at a time, whole and in order,
/// with and without follow; follow then goes on with live lines.
#[test]
fn history_of_many_chunks_is_whole_and_in_order() {
    let l = Logagg::start(&["--lines-per-app", "2000"]);
    let all: String = (1..=1300)
        .map(|i| oc(&msg("big", "h", "web.1", "ID1", i, i, &format!("m{i}"))))
        .collect();
    l.send(all.as_bytes());
    assert_eq!(l.wait_lines("big", 1300).len(), 1300);
    let want: Vec<String> = (1..=1300).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies(&l.log("big", "")), want);
    assert_eq!(bodies(&l.log("big", "lines=1100")), want[200..]);
    let f = Follower::open(l.api, "/log/big?follow=true&lines=1200", &[]);
    for w in &want[100..] {
        assert_eq!(f.next_json(T).unwrap()["msg"], w.as_str());
    }
    l.send(oc(&msg("big", "h", "web.1", "ID1", 1301, 1301, "live")).as_bytes());
    assert_eq!(f.next_json(T).unwrap()["msg"], "live");
}
