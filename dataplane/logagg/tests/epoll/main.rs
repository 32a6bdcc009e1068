//! The epoll fallback (`--io-driver epoll`, what runs where seccomp blocks io_uring):
//! ingest over TCP (octet counting, LF, split writes, many connections) and UDP, a bad
//! connection closed alone, history with filters, and follow (backlog then live).

#[path = "../support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::time::Duration;

use support::{msg, oc, Follower, Logagg};

const T: Duration = Duration::from_secs(10);

fn bodies(v: &[serde_json::Value]) -> Vec<String> {
    v.iter()
        .map(|j| j["msg"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn epoll_driver_ingest_history_and_follow() {
    let l = Logagg::start(&["--io-driver", "epoll"]);
    let st = l.status();
    assert_eq!(
        st["data"]["detail"]["workers"],
        serde_json::json!(["epoll", "epoll"]),
        "{st}"
    );

    // Ingest: octet counting, LF-terminated and a frame split over several writes.
    let mut s = l.connect();
    s.write_all(oc(&msg("ep", "h", "web.1", "ID1", 1, 1, "octet")).as_bytes())
        .unwrap();
    s.write_all(format!("{}\n", msg("ep", "h", "worker.2", "ID2", 2, 2, "lf")).as_bytes())
        .unwrap();
    let split = oc(&msg("ep", "h", "web.1", "ID1", 3, 3, "split"));
    for piece in split.as_bytes().chunks(9) {
        s.write_all(piece).unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    // UDP is served off the workers but must work alongside them.
    let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    u.send_to(
        msg("ep", "h", "web.1", "ID1", 4, 4, "udp").as_bytes(),
        l.syslog,
    )
    .unwrap();
    assert_eq!(
        bodies(&l.wait_lines("ep", 4)),
        ["octet", "lf", "split", "udp"]
    );

    // History with filters.
    assert_eq!(bodies(&l.log("ep", "lines=1")), ["udp"]);
    assert_eq!(bodies(&l.log("ep", "stream_types=stderr")), ["lf"]);
    assert_eq!(
        bodies(&l.log("ep", "process_type=web&lines=2")),
        ["split", "udp"]
    );

    // A garbage connection is closed (counted) while the good one keeps working.
    let mut bad = l.connect();
    bad.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 8];
    assert!(matches!(bad.read(&mut b), Ok(0) | Err(_)), "bad conn open");
    assert_eq!(l.metric("flynn_logagg_frame_garbage_total{"), 1);

    // Follow: the last 2 lines, then live lines from the still-open and a new connection.
    let f = Follower::open(l.api, "/log/ep?follow=true&lines=2", &[]);
    assert!(f.head.contains(" 200 "), "{}", f.head);
    assert_eq!(f.next_json(T).unwrap()["msg"], "split");
    assert_eq!(f.next_json(T).unwrap()["msg"], "udp");
    let sse = Follower::open(
        l.api,
        "/log/ep?follow=true",
        &[("Accept", "text/event-stream")],
    );
    assert_eq!(
        l.wait_metric("flynn_logagg_app_followers{app=\"ep\"}", T, |v| v == 2),
        2
    );
    s.write_all(oc(&msg("ep", "h", "web.1", "ID1", 5, 5, "live1")).as_bytes())
        .unwrap();
    assert_eq!(f.next_json(T).unwrap()["msg"], "live1");
    l.send(oc(&msg("ep", "h", "web.1", "ID1", 6, 6, "live2")).as_bytes());
    assert_eq!(f.next_json(T).unwrap()["msg"], "live2");
    assert_eq!(sse.next_json(T).unwrap()["msg"], "live1");
    assert_eq!(sse.next_json(T).unwrap()["msg"], "live2");
}

#[test]
fn epoll_driver_many_connections_and_a_live_stream() {
    let l = Logagg::start(&["--io-driver", "epoll"]);
    const CONNS: usize = 40;
    const PER: u64 = 50;
    let f = Follower::open(l.api, "/log/many?follow=true", &[]);
    assert_eq!(
        l.wait_metric("flynn_logagg_app_followers{app=\"many\"}", T, |v| v == 1),
        1
    );
    let writers: Vec<_> = (0..CONNS)
        .map(|i| {
            let mut s = l.connect();
            std::thread::spawn(move || {
                for j in 0..PER {
                    let m = msg(
                        "many",
                        &format!("h{i}"),
                        "web.1",
                        "ID1",
                        j + 1,
                        i as u64 * 1000 + j,
                        &format!("{i}-{j}"),
                    );
                    s.write_all(oc(&m).as_bytes()).unwrap();
                }
                s
            })
        })
        .collect();
    let conns: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let total = CONNS * PER as usize;
    assert_eq!(l.wait_lines("many", total).len(), total);
    let mut live = 0;
    while live < total {
        if f.next_json(T).is_none() {
            break;
        }
        live += 1;
    }
    assert_eq!(live, total, "follower got every line over epoll");
    assert_eq!(
        l.metric("flynn_logagg_connections_active{"),
        CONNS as u64,
        "connections still open"
    );
    drop(conns);
    assert_eq!(
        l.wait_metric("flynn_logagg_connections_active{", T, |v| v == 0),
        0,
        "closed connections noticed"
    );
}
