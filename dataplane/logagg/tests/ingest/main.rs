//! Ingest tests: framing over real TCP (octet counting, LF, mixed, split writes), UDP, raw
//! lines, bad framing closing only the bad connection, many connections, ring bounds and
//! their counters.

#[path = "../support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::time::Duration;

use support::{msg, oc, Logagg};

#[test]
fn octet_lf_mixed_and_split_writes() {
    let l = Logagg::start(&[]);
    let mut s = l.connect();
    let a = oc(&msg("f", "h", "web.1", "ID1", 1, 1, "octet"));
    let b = format!("{}\n", msg("f", "h", "web.1", "ID1", 2, 2, "lf"));
    let c = oc(&msg("f", "h", "web.1", "ID1", 3, 3, "split across writes"));
    s.write_all(a.as_bytes()).unwrap();
    s.write_all(b.as_bytes()).unwrap();
    for piece in c.as_bytes().chunks(7) {
        s.write_all(piece).unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    // A truncated frame stays pending, not stored.
    s.write_all(b"500 <190>1 - h f - - - truncated").unwrap();
    let v = l.wait_lines("f", 3);
    let got: Vec<_> = v
        .iter()
        .map(|j| j["msg"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, ["octet", "lf", "split across writes"]);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(l.log("f", "").len(), 3);
}

#[test]
fn udp_and_raw_lines() {
    let l = Logagg::start(&[]);
    let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    u.send_to(
        msg("u", "h", "web.1", "ID2", 1, 1, "via udp").as_bytes(),
        l.syslog,
    )
    .unwrap();
    let v = l.wait_lines("u", 1);
    assert_eq!(v[0]["msg"], "via udp");
    assert_eq!(v[0]["stream"], "stderr");
    l.send(b"<13>Oct 11 22:14:15 mymachine su: not rfc5424\n");
    let v = l.wait_lines("_unrouted", 1);
    assert_eq!(v[0]["msg"], "<13>Oct 11 22:14:15 mymachine su: not rfc5424");
    assert_eq!(v[0]["raw"], true);
    assert_eq!(l.metric("flynn_logagg_raw_total{"), 1);
}

/// Equal lines without a timestamp of their own that arrive in one read are two lines (each
/// is stamped on arrival with its own instant), not a line and its replay.
#[test]
fn equal_lines_without_a_timestamp_are_all_kept() {
    let l = Logagg::start(&[]);
    let mut s = l.connect();
    let line = oc("<14>1 - h nots web.1 - - same");
    s.write_all(format!("{line}{line}{line}").as_bytes())
        .unwrap();
    let v = l.wait_lines("nots", 3);
    assert!(v.iter().all(|j| j["msg"] == "same"), "{v:?}");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(l.log("nots", "").len(), 3);
    assert_eq!(l.metric("flynn_logagg_duplicates_total{"), 0);
}

/// A last LF-framed message without its LF is stored when the sender closes (rsyslog keeps
/// it too); an incomplete octet-counted frame is not.
#[test]
fn last_lf_frame_without_its_newline_is_kept_when_the_sender_closes() {
    let l = Logagg::start(&[]);
    l.send(
        format!(
            "{}\n{}",
            msg("eof", "h", "web.1", "ID1", 1, 1, "first"),
            msg("eof", "h", "web.1", "ID1", 2, 2, "last, no LF")
        )
        .as_bytes(),
    );
    l.send(b"500 <190>1 - h eof - - - cut octet-counted frame");
    let v = l.wait_lines("eof", 2);
    let got: Vec<_> = v
        .iter()
        .map(|j| j["msg"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, ["first", "last, no LF"]);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(l.log("eof", "").len(), 2);
}

/// Returns true when the server closed the connection within the timeout (EOF or a
/// reset; a read that times out means it is still open).
fn closed_by_server(s: &mut std::net::TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn bad_framing_closes_only_that_connection() {
    let l = Logagg::start(&["--max-frame", "1000"]);
    let mut good = l.connect();
    good.write_all(oc(&msg("g", "h", "web.1", "ID1", 1, 1, "before")).as_bytes())
        .unwrap();
    let cases: [(&[u8], &str); 4] = [
        (b"12a <190>1 ...", "flynn_logagg_frame_bad_length_total{"),
        (b"0 ", "flynn_logagg_frame_zero_length_total{"),
        (
            b"GET / HTTP/1.1\r\n\r\n",
            "flynn_logagg_frame_garbage_total{",
        ),
        (b"5000 <190>1", "flynn_logagg_frame_too_long_total{"),
    ];
    for (bytes, counter) in cases {
        let mut bad = l.connect();
        bad.write_all(bytes).unwrap();
        assert!(
            closed_by_server(&mut bad),
            "{}",
            String::from_utf8_lossy(bytes)
        );
        assert_eq!(l.metric(counter), 1, "{counter}");
    }
    // An endless line without LF is cut at the limit.
    let mut bad = l.connect();
    let _ = bad.write_all(&[b'<'; 3000]);
    assert!(closed_by_server(&mut bad));
    assert_eq!(l.metric("flynn_logagg_frame_too_long_total{"), 2);
    good.write_all(oc(&msg("g", "h", "web.1", "ID1", 2, 2, "after")).as_bytes())
        .unwrap();
    let v = l.wait_lines("g", 2);
    assert_eq!(v.len(), 2);
    assert_eq!(v[1]["msg"], "after");
}

#[test]
fn many_connections_at_once() {
    let l = Logagg::start(&[]);
    let conns: Vec<_> = (0..200).map(|_| l.connect()).collect();
    let handles: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            std::thread::spawn(move || {
                let mut out = String::new();
                for j in 0..10u64 {
                    out.push_str(&oc(&msg(
                        "many",
                        &format!("h{i}"),
                        "web.1",
                        "ID1",
                        j + 1,
                        i as u64 * 10 + j,
                        &format!("{i}-{j}"),
                    )));
                }
                s.write_all(out.as_bytes()).unwrap();
                s
            })
        })
        .collect();
    let conns: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(l.wait_lines("many", 2000).len(), 2000);
    assert_eq!(l.metric("flynn_logagg_connections_active{"), 200);
    drop(conns);
    let (_, c) = l.get("/cursors");
    let v: serde_json::Value = serde_json::from_str(&c).unwrap();
    assert_eq!(v.as_object().unwrap().len(), 200);
}

#[test]
fn ring_bound_and_eviction_counters() {
    let l = Logagg::start(&["--lines-per-app", "100"]);
    let mut all = String::new();
    for i in 0..250u64 {
        all.push_str(&oc(&msg(
            "ring",
            "h",
            "web.1",
            "ID1",
            i + 1,
            i,
            &format!("l{i}"),
        )));
    }
    all.push_str(&oc(&msg("other", "h", "web.1", "ID1", 1, 1, "o")));
    l.send(all.as_bytes());
    l.wait_lines("other", 1);
    let v = l.log("ring", "");
    assert_eq!(v.len(), 100);
    assert_eq!(v[0]["msg"], "l150");
    assert_eq!(
        l.metric("flynn_logagg_app_evicted_total{app=\"ring\",reason=\"lines_per_app\"}"),
        150
    );
    assert_eq!(l.metric("flynn_logagg_app_evicted_total{app=\"other\""), 0);
    assert_eq!(l.metric("flynn_logagg_app_lines{app=\"ring\"}"), 100);
}

/// `--max-conns`: a connection beyond the cap is closed at once, unread, and counted; the
/// open ones keep working, and a slot freed by a close is usable again.
#[test]
fn connections_over_the_cap_are_refused_until_one_closes() {
    let l = Logagg::start(&["--max-conns", "2"]);
    let mut a = l.connect();
    let mut b = l.connect();
    a.write_all(oc(&msg("cap", "h", "web.1", "ID1", 1, 1, "a1")).as_bytes())
        .unwrap();
    b.write_all(oc(&msg("cap", "h", "web.1", "ID1", 2, 2, "b1")).as_bytes())
        .unwrap();
    assert_eq!(l.wait_lines("cap", 2).len(), 2);
    assert_eq!(l.metric("flynn_logagg_connections_active{"), 2);

    let mut over = l.connect();
    let _ = over.write_all(oc(&msg("cap", "h", "web.1", "ID1", 3, 3, "over")).as_bytes());
    assert!(closed_by_server(&mut over), "a third connection was kept");
    assert_eq!(l.metric("flynn_logagg_connections_rejected_total{"), 1);

    // The two open connections still deliver.
    a.write_all(oc(&msg("cap", "h", "web.1", "ID1", 4, 4, "a2")).as_bytes())
        .unwrap();
    assert!(l.wait_last("cap", "a2"));

    // One closes: its slot goes to the next connection.
    drop(b);
    assert_eq!(
        l.wait_metric(
            "flynn_logagg_connections_active{",
            Duration::from_secs(5),
            |v| v == 1
        ),
        1
    );
    let mut c = l.connect();
    c.write_all(oc(&msg("cap", "h", "web.1", "ID1", 5, 5, "c1")).as_bytes())
        .unwrap();
    assert!(l.wait_last("cap", "c1"));
    let got: Vec<_> = l
        .log("cap", "")
        .iter()
        .map(|j| j["msg"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        got,
        ["a1", "b1", "a2", "c1"],
        "the refused line was not stored"
    );
    assert_eq!(l.metric("flynn_logagg_connections_rejected_total{"), 1);
}

/// The kernel's view of the TCP socket `local` → `remote` (IPv4, from `/proc/net/tcp`): its
/// timer kind (`0` none, `1` retransmit, `2` keepalive on an established socket) and the
/// time until that timer fires.
fn tcp_timer(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> Option<(u8, Duration)> {
    let hex = |a: std::net::SocketAddr| {
        let std::net::SocketAddr::V4(a) = a else {
            panic!("IPv4 only: {a}")
        };
        // The address as the kernel prints it: the raw in-memory (network order) word.
        let word = u32::from_ne_bytes(a.ip().octets());
        format!("{word:08X}:{:04X}", a.port())
    };
    let (local, remote) = (hex(local), hex(remote));
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table.lines().skip(1).find_map(|row| {
        let f: Vec<&str> = row.split_whitespace().collect();
        if f.get(1) != Some(&local.as_str()) || f.get(2) != Some(&remote.as_str()) {
            return None;
        }
        let (kind, when) = f.get(5)?.split_once(':')?;
        // In clock ticks (USER_HZ, 100 on Linux).
        let ticks = u64::from_str_radix(when, 16).ok()?;
        Some((
            u8::from_str_radix(kind, 16).ok()?,
            Duration::from_millis(ticks * 10),
        ))
    })
}

/// A sender whose host vanished (no FIN, no RST) is noticed: the aggregator's side of an
/// accepted syslog connection has TCP keepalive armed with a 60 s idle time (then probes
/// every 15 s, 4 of them), not the kernel default of none (or 2 h idle once enabled). A
/// quiet but live sender answers the probes and keeps its connection.
#[test]
fn accepted_syslog_connections_have_tcp_keepalive() {
    let l = Logagg::start(&[]);
    let mut s = l.connect();
    s.write_all(oc(&msg("ka", "h", "web.1", "ID1", 1, 1, "hello")).as_bytes())
        .unwrap();
    // Stored: the connection was accepted and is being served.
    assert_eq!(l.wait_lines("ka", 1).len(), 1);
    let client = s.local_addr().unwrap();
    let timer = tcp_timer(l.syslog, client).expect("the aggregator's side of the connection");
    assert_eq!(
        timer.0, 2,
        "no keepalive timer on the accepted connection: {timer:?}"
    );
    assert!(
        timer.1 > Duration::from_secs(30) && timer.1 <= Duration::from_secs(60),
        "keepalive fires in {:?}, want within the 60 s idle time",
        timer.1
    );
    // Our own side (no keepalive set) reads as no timer once its bytes are acknowledged:
    // the check tells the two apart.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while tcp_timer(client, l.syslog).map(|t| t.0) != Some(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "client side: {:?}",
            tcp_timer(client, l.syslog)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs the aggregator with `args` until it exits (killed after 20 s); its exit status
/// and standard error.
fn run_to_exit(args: &[&str]) -> (Option<std::process::ExitStatus>, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flynn-logagg"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FLYNN_") && k != "FLYNN_LOG" {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn flynn-logagg");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    (status, err)
}

/// A syslog port another program's SO_REUSEPORT listeners hold (a second aggregator of the
/// same user, an nginx with `reuseport`) is refused at start, naming the address, instead of
/// joining their group and silently sharing the port's connections with them. Any other
/// failure to bind (an address not on this machine) is not blamed on another program.
#[test]
fn a_syslog_port_another_program_listens_on_is_refused() {
    let foreign = flynn_runtime::reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = foreign.local_addr().unwrap().to_string();
    let (status, err) = run_to_exit(&["--syslog-addr", &addr, "--api-addr", "127.0.0.1:0"]);
    let status = status.expect("the aggregator exits");
    assert!(!status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "syslog listening on {addr}: another program listens there"
        )),
        "{err}"
    );
    // TEST-NET-1: not on this machine (EADDRNOTAVAIL), unless non-local binds are allowed.
    let port = foreign.local_addr().unwrap().port();
    let elsewhere: std::net::SocketAddr = ([192, 0, 2, 1], port).into();
    if let Err(e) = std::net::TcpListener::bind(elsewhere) {
        let elsewhere = elsewhere.to_string();
        let (status, err) =
            run_to_exit(&["--syslog-addr", &elsewhere, "--api-addr", "127.0.0.1:0"]);
        assert!(!status.expect("the aggregator exits").success(), "{err}");
        assert!(
            err.contains(&format!("syslog listening on {elsewhere}: {e}"))
                && !err.contains("another program"),
            "{err}"
        );
    }
    drop(foreign);
}
