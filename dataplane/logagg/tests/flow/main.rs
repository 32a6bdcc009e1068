//! Flow control end to end: a follower that never reads while a writer floods (memory
//! bounded, other readers unaffected, the slow one skips ahead with a marker), the global
//! `--max-memory` cap across several apps, and followers that go away being noticed
//! without any new line for their app.

#[path = "../support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{msg, oc, Follower, Logagg};

const T: Duration = Duration::from_secs(10);

/// The flood test is heavy; the others time things. Run them one at a time (2 shared cores).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Body of flood line `i`: its index then padding to `FLOOD_BODY` bytes.
const FLOOD_BODY: usize = 1000;
fn flood_body(i: u64) -> String {
    let mut b = format!("f{i:07}-");
    b.extend(std::iter::repeat_n('x', FLOOD_BODY - b.len()));
    b
}

/// Index of a flood body (`f0000123-xxx…` → 123).
fn flood_index(body: &str) -> Option<u64> {
    body.strip_prefix('f')?.split('-').next()?.parse().ok()
}

/// A follower that does not read: an HTTP/1.0 GET on a plain socket, nothing read (the
/// kernel's receive buffer and the server's send buffer fill, then the server must stop
/// writing to it). Closed on drop.
struct Stalled(TcpStream);

impl Stalled {
    fn open(l: &Logagg, path: &str) -> Stalled {
        let mut s = TcpStream::connect(l.api).expect("connect api");
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
            .unwrap();
        Stalled(s)
    }
}

impl Drop for Stalled {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// Stops and joins a helper thread on drop (so a failing assert never leaves it running).
struct Joined(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);

impl Drop for Joined {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        if let Some(h) = self.1.take() {
            let _ = h.join();
        }
    }
}

/// Slow follower (spec: "slow readers are disconnected or skip ahead with a marker rather
/// than holding memory without bound"). Followers pull from the app's ring by sequence
/// number (`api.rs`), so a stalled reader costs at most the chunk hyper could not write
/// plus the kernel's socket buffers; when it reads again it gets `skipped` markers (one
/// per pull that found it behind) and continues from the oldest buffered line.
///
/// RSS bound: the store holds at most `LINES` lines of ~1.2 kB (about 2.5 MB, also under
/// the 16 MB `--max-memory`); the stalled follower pins one rendered chunk (512 lines,
/// ~0.6 MB) and hyper's write buffer (< 1 MB); the fast follower the same. The kernel's
/// socket buffers are not in the process RSS. With allocator slack per thread that is well
/// under `RSS_GROWTH` = 40 MB, while the flood is `FLOOD` × ~1.1 kB ≈ 130 MB: a server
/// that queued lines for the stalled reader would exceed the bound about three times over.
#[test]
fn stalled_follower_is_bounded_and_skips_ahead() {
    let _g = serial();
    const LINES: usize = 2_000;
    const FLOOD: u64 = 120_000;
    const RSS_GROWTH: u64 = 40 << 20;
    let l = Logagg::start(&[
        "--lines-per-app",
        &LINES.to_string(),
        "--max-memory",
        "16000000",
    ]);
    // Warm the store and allocator up to its steady state before taking the baseline.
    let mut warm = String::new();
    for i in 0..LINES as u64 {
        warm.push_str(&oc(&msg(
            "warm",
            "h",
            "web.1",
            "ID1",
            i + 1,
            i,
            &flood_body(i),
        )));
    }
    l.send(warm.as_bytes());
    assert!(l.wait_last("warm", &flood_body(LINES as u64 - 1)));

    let stalled = Stalled::open(&l, "/log/flood?follow=true");
    let fast = Follower::open(l.api, "/log/flood?follow=true", &[]);
    let other = Follower::open(l.api, "/log/other?follow=true", &[]);
    assert_eq!(
        l.wait_metric("flynn_logagg_app_followers{app=\"flood\"}", T, |v| v == 2),
        2
    );
    assert_eq!(
        l.wait_metric("flynn_logagg_app_followers{app=\"other\"}", T, |v| v == 1),
        1
    );
    let base = l.rss();

    // The flood, from its own thread.
    let done = Arc::new(AtomicBool::new(false));
    let mut w = l.connect();
    let d = done.clone();
    let writer = Joined(
        done.clone(),
        Some(std::thread::spawn(move || {
            let mut batch = String::with_capacity(256 * 1100);
            for i in 0..FLOOD {
                if d.load(Ordering::Relaxed) {
                    return;
                }
                let ts = 2_000_000 + i;
                batch.push_str(&oc(&msg(
                    "flood",
                    "h",
                    "web.1",
                    "ID1",
                    i + 1,
                    ts,
                    &flood_body(i),
                )));
                if batch.len() > 256 * 1000 {
                    w.write_all(batch.as_bytes()).unwrap();
                    batch.clear();
                }
            }
            let end = msg(
                "flood",
                "h",
                "web.1",
                "ID1",
                FLOOD + 1,
                2_000_000 + FLOOD,
                "end",
            );
            batch.push_str(&oc(&end));
            w.write_all(batch.as_bytes()).unwrap();
            d.store(true, Ordering::Relaxed);
        })),
    );

    // While it runs: RSS sampled, the fast follower drained, and a probe on another app
    // timed end to end every 100 ms.
    let started = Instant::now();
    let mut peak = base;
    let mut fast_lines = 0u64;
    let mut fast_skips = 0u64;
    let mut fast_skipped = 0u64;
    let mut fast_gap = Duration::ZERO;
    let mut last_fast = Instant::now();
    let mut fast_end = false;
    let mut probe_worst = Duration::ZERO;
    let mut probes = 0u64;
    let mut next_probe = Instant::now();
    let mut probe_conn = l.connect();
    let deadline = started + Duration::from_secs(60);
    while !fast_end && Instant::now() < deadline {
        peak = peak.max(l.rss());
        if Instant::now() >= next_probe && !done.load(Ordering::Relaxed) {
            let body = format!("probe{probes}");
            let t = Instant::now();
            probe_conn
                .write_all(
                    oc(&msg(
                        "other",
                        "h",
                        "web.1",
                        "ID1",
                        probes + 1,
                        probes,
                        &body,
                    ))
                    .as_bytes(),
                )
                .unwrap();
            let got = other.next_json(T).expect("probe line");
            assert_eq!(got["msg"], body);
            probe_worst = probe_worst.max(t.elapsed());
            probes += 1;
            next_probe = Instant::now() + Duration::from_millis(100);
        }
        // Drain what the fast follower has for up to 20 ms.
        let until = Instant::now() + Duration::from_millis(20);
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            let Some(line) = fast.next(left) else { break };
            let now = Instant::now();
            fast_gap = fast_gap.max(now - last_fast);
            last_fast = now;
            if let Some((_, n)) = line.split_once("\"skipped\":") {
                fast_skips += 1;
                fast_skipped += n
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|d| d.parse::<u64>().ok())
                    .expect("skipped count");
            } else if line.contains("\"msg\":\"end\"") {
                fast_end = true;
                break;
            } else {
                fast_lines += 1;
            }
        }
    }
    let flood_time = started.elapsed();
    drop(writer);
    eprintln!(
        "flood {FLOOD} lines in {flood_time:?}; rss base {} MB peak {} MB; fast follower {fast_lines} lines, \
         {fast_skips} skip markers, worst gap {fast_gap:?}; {probes} probes, worst {probe_worst:?}",
        base >> 20,
        peak >> 20
    );
    assert!(fast_end, "the fast follower got the last line");
    assert!(fast_lines > 0);
    assert_eq!(
        fast_lines + fast_skipped,
        FLOOD,
        "fast follower: lines + skipped"
    );
    assert!(probes > 0);
    assert!(
        probe_worst < Duration::from_secs(1),
        "another app's follower waited {probe_worst:?}"
    );
    assert!(
        fast_gap < Duration::from_secs(2),
        "the fast follower stalled for {fast_gap:?}"
    );
    assert!(
        peak < base + RSS_GROWTH,
        "RSS grew from {base} to {peak} bytes"
    );
    assert_eq!(
        l.metric("flynn_logagg_app_lines{app=\"flood\"}"),
        LINES as u64
    );
    assert!(l.metric("flynn_logagg_memory_bytes ") <= 16_000_000);

    // Now the stalled follower reads: old lines the sockets held, then a skip marker,
    // then lines from the ring through to "end".
    let mut s = stalled.0.try_clone().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut text = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let read_deadline = Instant::now() + Duration::from_secs(30);
    let end_marker = b"\"msg\":\"end\"";
    let mut saw_end = false;
    while Instant::now() < read_deadline {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let from = text.len().saturating_sub(end_marker.len());
        text.extend_from_slice(&buf[..n]);
        saw_end = saw_end
            || text[from..]
                .windows(end_marker.len())
                .any(|w| w == end_marker);
        if saw_end && text.ends_with(b"\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&text);
    let (head, body) = text.split_once("\r\n\r\n").expect("response head");
    assert!(head.contains(" 200 "), "{head}");
    // Lines are contiguous except where a marker says how many were skipped; lines plus
    // skipped account for the whole flood exactly (no silent gap, no duplicate). Hyper
    // may pull more than once while the socket is stuck, so there can be several markers.
    let mut expect_next = 0u64;
    let mut skipped_total = 0u64;
    let mut markers = 0;
    let mut lines_total = 0u64;
    let mut before_first_marker = 0u64;
    let mut pending_skip = 0u64;
    let mut end = false;
    for line in body.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if let Some(n) = v.get("skipped") {
            assert_eq!(v["source"], "logagg");
            let n = n.as_u64().unwrap();
            assert!(n > 0);
            markers += 1;
            skipped_total += n;
            pending_skip += n;
            continue;
        }
        let m = v["msg"].as_str().unwrap();
        if m == "end" {
            assert_eq!(expect_next + pending_skip, FLOOD, "lines up to the end");
            end = true;
            break;
        }
        let i = flood_index(m).unwrap_or_else(|| panic!("unexpected line {m}"));
        assert_eq!(
            i,
            expect_next + pending_skip,
            "gap or duplicate not covered by a marker"
        );
        expect_next = i + 1;
        pending_skip = 0;
        lines_total += 1;
        if markers == 0 {
            before_first_marker += 1;
        }
    }
    eprintln!(
        "stalled follower: {before_first_marker} lines before the first marker, {markers} markers \
         skipping {skipped_total}, {lines_total} lines in all"
    );
    assert!(
        markers > 0,
        "a `skipped` marker when the stalled reader resumed"
    );
    assert!(
        end,
        "the stalled follower continues through to the last line"
    );
    assert_eq!(lines_total + skipped_total, FLOOD);
    assert!(
        before_first_marker < FLOOD / 4,
        "the stalled reader was not fed the whole flood"
    );

    // Its disconnect is noticed too.
    drop(s);
    drop(stalled);
    assert_eq!(
        l.wait_metric("flynn_logagg_app_followers{app=\"flood\"}", T, |v| v == 1),
        1
    );
}

/// `--max-memory` across several apps: lines beyond the cap are evicted from the biggest
/// apps and counted with reason `max_memory`, buffered bytes stay under the cap, and each
/// app's newest lines are still there.
#[test]
fn global_memory_cap_end_to_end() {
    let _g = serial();
    const CAP: u64 = 2_000_000;
    const APPS: usize = 5;
    const PER_PHASE: u64 = 800;
    let l = Logagg::start(&["--max-memory", &CAP.to_string()]);
    let body = |app: usize, i: u64| format!("a{app}-{i:06}-{}", "m".repeat(480));
    let mut sent = [0u64; APPS];
    let mut evicted_after = Vec::new();
    for phase in 0..2u64 {
        // Each phase: 5 apps × 800 lines × ~740 B ≈ 3 MB, over the 2 MB cap by itself.
        let mut conns: Vec<_> = (0..APPS).map(|_| l.connect()).collect();
        for (a, c) in conns.iter_mut().enumerate() {
            let mut out = String::new();
            for k in 0..PER_PHASE {
                let i = phase * PER_PHASE + k;
                out.push_str(&oc(&msg(
                    &format!("cap{a}"),
                    "h",
                    "web.1",
                    "ID1",
                    i + 1,
                    i,
                    &body(a, i),
                )));
            }
            c.write_all(out.as_bytes()).unwrap();
            sent[a] += PER_PHASE;
        }
        for (a, &n) in sent.iter().enumerate() {
            assert!(
                l.wait_last(&format!("cap{a}"), &body(a, n - 1)),
                "newest line of cap{a} readable"
            );
        }
        let (_, m) = l.get("/metrics");
        let mem = support::metric_sum(&m, "flynn_logagg_memory_bytes ");
        assert_eq!(
            support::metric_sum(&m, "flynn_logagg_memory_limit_bytes "),
            CAP
        );
        assert!(
            mem <= CAP,
            "phase {phase}: {mem} buffered bytes > cap {CAP}"
        );
        assert!(
            mem > CAP / 2,
            "phase {phase}: the cap is used, not emptied ({mem})"
        );
        let by_memory: u64 = (0..APPS)
            .map(|a| {
                support::metric_sum(
                    &m,
                    &format!(
                        "flynn_logagg_app_evicted_total{{app=\"cap{a}\",reason=\"max_memory\"}}"
                    ),
                )
            })
            .sum();
        let by_lines: u64 = (0..APPS)
            .map(|a| {
                support::metric_sum(
                    &m,
                    &format!(
                        "flynn_logagg_app_evicted_total{{app=\"cap{a}\",reason=\"lines_per_app\"}}"
                    ),
                )
            })
            .sum();
        assert_eq!(by_lines, 0, "no lines_per_app evictions here");
        evicted_after.push(by_memory);
        // Nothing silently lost: per app, buffered + evicted = sent.
        for (a, &n) in sent.iter().enumerate() {
            let lines =
                support::metric_sum(&m, &format!("flynn_logagg_app_lines{{app=\"cap{a}\"}}"));
            let ev = support::metric_sum(
                &m,
                &format!("flynn_logagg_app_evicted_total{{app=\"cap{a}\",reason=\"max_memory\"}}"),
            );
            assert_eq!(lines + ev, n, "cap{a}");
        }
        let st = l.status();
        let sm = st["data"]["detail"]["memory_bytes"].as_u64().unwrap();
        assert!(sm <= CAP, "status memory {sm}");
        assert_eq!(st["data"]["detail"]["memory_limit_bytes"], CAP);
    }
    eprintln!("max_memory evictions after each phase: {evicted_after:?}");
    assert!(evicted_after[0] > 0, "evictions by max_memory in phase 1");
    assert!(
        evicted_after[1] > evicted_after[0],
        "evictions by max_memory grow: {evicted_after:?}"
    );
    // The newest lines of every app are readable, in order and complete.
    for (a, &n) in sent.iter().enumerate() {
        let v = l.log(&format!("cap{a}"), "lines=20");
        let got: Vec<_> = v
            .iter()
            .map(|j| j["msg"].as_str().unwrap().to_string())
            .collect();
        let want: Vec<_> = (n - 20..n).map(|i| body(a, i)).collect();
        assert_eq!(got, want, "cap{a}");
    }
}

/// A follower that goes away is noticed (the followers gauge drops) within a bounded
/// time although its app never gets another line: hyper polls an idle HTTP/1 connection
/// for EOF while the response body waits, so no write (keep-alive) is needed for this.
#[test]
fn follower_disconnect_noticed_without_new_lines() {
    let _g = serial();
    let l = Logagg::start(&[]);
    let gauge = "flynn_logagg_app_followers{app=\"idle\"}";
    let ndjson = Follower::open(l.api, "/log/idle?follow=true", &[]);
    let sse = Follower::open(
        l.api,
        "/log/idle?follow=true",
        &[("Accept", "text/event-stream")],
    );
    // HTTP/1.1 (chunked, keep-alive), closed abruptly without a shutdown.
    let mut raw = TcpStream::connect(l.api).unwrap();
    raw.write_all(b"GET /log/idle?follow=true&lines=5 HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    // One that never reads, on the same app.
    let stalled = Stalled::open(&l, "/log/idle?follow=true");
    assert_eq!(l.wait_metric(gauge, T, |v| v == 4), 4);
    // Another app stays busy meanwhile: its lines must not be what wakes "idle" readers.
    l.send(oc(&msg("busy", "h", "web.1", "ID1", 1, 1, "noise")).as_bytes());

    const BOUND: Duration = Duration::from_secs(2);
    let mut expect = 4;
    let closes: [Box<dyn FnOnce()>; 4] = [
        Box::new(move || drop(ndjson)),
        Box::new(move || drop(sse)),
        Box::new(move || drop(raw)),
        Box::new(move || drop(stalled)),
    ];
    for (k, close) in closes.into_iter().enumerate() {
        let t = Instant::now();
        close();
        expect -= 1;
        let v = l.wait_metric(gauge, BOUND, |v| v == expect);
        assert_eq!(v, expect, "close #{k} not noticed within {BOUND:?}");
        eprintln!("close #{k} noticed after {:?}", t.elapsed());
    }
    // No line was ever written to the app.
    assert_eq!(l.metric("flynn_logagg_app_lines{app=\"idle\"}"), 0);
}

/// A quiet follow stream gets a keep-alive (a blank line in NDJSON, a `:` comment in SSE)
/// once nothing was written for `--stream-keepalive`, also while its app's lines keep
/// arriving but its filter rejects them all; lines written after keep-alives still come.
#[test]
fn quiet_follow_streams_get_keepalives() {
    let _g = serial();
    let l = Logagg::start(&["--stream-keepalive", "1"]);
    let ndjson = Follower::open(l.api, "/log/ka?follow=true&job_id=wanted", &[]);
    let sse = Follower::open(
        l.api,
        "/log/ka?follow=true&job_id=wanted",
        &[("Accept", "text/event-stream")],
    );
    let gauge = "flynn_logagg_app_followers{app=\"ka\"}";
    assert_eq!(l.wait_metric(gauge, T, |v| v == 2), 2);
    // Lines for another job of the same app, for 2.5 s: they wake both followers and
    // must not put the keep-alive off.
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < Duration::from_millis(2500) && i < 1000 {
        i += 1;
        l.send(oc(&msg("ka", "h", "web.other", "ID1", i, i, "noise")).as_bytes());
        std::thread::sleep(Duration::from_millis(20));
    }
    for (name, f, want) in [("ndjson", &ndjson, ""), ("sse", &sse, ":")] {
        let first = f.next(Duration::from_millis(500));
        assert_eq!(first.as_deref(), Some(want), "{name}: keep-alive");
    }
    i += 1;
    l.send(oc(&msg("ka", "h", "web.wanted", "ID1", i, i, "hello")).as_bytes());
    for (name, f) in [("ndjson", &ndjson), ("sse", &sse)] {
        let v = f.next_json(T).unwrap_or_else(|| panic!("{name}: no line"));
        assert_eq!(v["msg"], "hello", "{name}");
        assert_eq!(v["job_id"], "wanted", "{name}");
    }
}
