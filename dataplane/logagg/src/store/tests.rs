use super::*;
use crate::line::Filter;
use flynn_syslog::parse_fields;

fn msg(host: &str, procid: &str, msgid: &str, seq: u64, ts_us: u64, body: &str) -> String {
    let ts = Timestamp(1_257_894_000_000_000_000 + ts_us as i64 * 1000).to_rfc3339();
    format!("<190>1 {ts} {host} app {procid} {msgid} [flynn seq=\"{seq}\"] {body}")
}

fn put(s: &Store, app: &str, frame: &str) -> Outcome {
    let f = parse_fields(frame.as_bytes()).unwrap();
    s.insert(app.as_bytes(), frame.as_bytes(), &f, f.ts.unwrap())
}

fn store(lines: usize, mem: usize) -> Arc<Store> {
    Arc::new(Store::new(Limits {
        lines_per_app: lines,
        max_memory: mem,
    }))
}

fn bodies(v: &[Line]) -> Vec<String> {
    v.iter()
        .map(|l| String::from_utf8_lossy(l.msg.msg()).into_owned())
        .collect()
}

#[test]
fn ring_bound_counts_evictions() {
    let s = store(3, usize::MAX);
    for i in 0..5 {
        assert_eq!(
            put(&s, "a", &msg("h", "web.1", "ID1", i, i, &format!("l{i}"))),
            Outcome::Stored
        );
    }
    let (h, next, _) = s.history(b"a", &Filter::default(), 0, false);
    assert_eq!(bodies(&h), ["l2", "l3", "l4"]);
    assert_eq!(next, 6);
    let st = s.stats();
    assert_eq!((st[0].lines, st[0].evicted_capacity), (3, 2));
    // Older than everything in a full ring: refused and counted.
    assert_eq!(
        put(&s, "a", &msg("h", "web.1", "ID1", 0, 0, "old")),
        Outcome::TooOld
    );
    assert_eq!(s.stats()[0].evicted_capacity, 3);
}

/// A line stamped far in the future at the front of a full ring (a host clock that ran
/// ahead, then was corrected) does not make every later line "too old": only a line older
/// than every buffered line is refused.
#[test]
fn a_future_line_at_the_front_does_not_block_the_app() {
    let s = store(3, usize::MAX);
    put(
        &s,
        "a",
        &msg("h", "web.1", "ID1", 1, 1_000_000_000, "future"),
    );
    put(&s, "a", &msg("h", "web.1", "ID1", 2, 1, "one"));
    put(&s, "a", &msg("h", "web.1", "ID1", 3, 2, "two"));
    assert_eq!(
        put(&s, "a", &msg("h", "web.1", "ID1", 4, 3, "three")),
        Outcome::Stored
    );
    let (h, _, _) = s.history(b"a", &Filter::default(), 0, false);
    assert_eq!(bodies(&h), ["one", "two", "three"]);
    // Older than everything now buffered: refused.
    assert_eq!(
        put(&s, "a", &msg("h", "web.1", "ID1", 5, 0, "old")),
        Outcome::TooOld
    );
    assert_eq!(
        put(&s, "a", &msg("h", "web.1", "ID1", 6, 4, "four")),
        Outcome::Stored
    );
}

#[test]
fn duplicates_ignored_and_out_of_order_sorted() {
    let s = store(10, usize::MAX);
    put(&s, "a", &msg("h", "web.1", "ID1", 1, 10, "b"));
    put(&s, "a", &msg("h", "web.1", "ID1", 2, 20, "c"));
    put(&s, "a", &msg("h", "web.1", "ID1", 0, 5, "a"));
    assert_eq!(
        put(&s, "a", &msg("h", "web.1", "ID1", 1, 10, "b")),
        Outcome::Duplicate
    );
    // Same time, different content: kept.
    assert_eq!(
        put(&s, "a", &msg("h", "web.1", "ID1", 9, 10, "b")),
        Outcome::Stored
    );
    let (h, _, _) = s.history(b"a", &Filter::default(), 0, false);
    assert_eq!(bodies(&h), ["a", "b", "b", "c"]);
    let (h, _, _) = s.history(b"a", &Filter::default(), 1, false);
    assert_eq!(bodies(&h), ["c"]);
    assert_eq!(s.stats()[0].duplicates, 1);
}

#[test]
fn memory_cap_evicts_from_big_apps() {
    let body = "x".repeat(800);
    let one = msg("h", "web.1", "ID1", 0, 0, &body).len() + crate::line::LINE_OVERHEAD;
    let s = store(10_000, one * 20);
    put(&s, "quiet", &msg("h", "web.1", "ID1", 0, 0, &body));
    for i in 1..200 {
        put(&s, "busy", &msg("h", "web.1", "ID1", i, i, &body));
    }
    assert!(s.memory() <= one * 20, "{} > {}", s.memory(), one * 20);
    let st = s.stats();
    let busy = st.iter().find(|a| a.app == "busy").unwrap();
    let quiet = st.iter().find(|a| a.app == "quiet").unwrap();
    assert_eq!(quiet.lines, 1, "the quiet app keeps its line");
    assert_eq!(busy.lines as u64 + busy.evicted_memory, 199);
    assert!(busy.evicted_memory > 0);
}

#[test]
fn history_filters() {
    let s = store(100, usize::MAX);
    put(&s, "a", &msg("h", "web.1", "ID1", 1, 1, "m1"));
    put(&s, "a", &msg("h", "web.2", "ID1", 2, 2, "m2"));
    put(&s, "a", &msg("h", "worker.3", "ID2", 3, 3, "m3"));
    put(&s, "a", &msg("h", "web.1", "ID1", 4, 4, "m4"));
    put(&s, "a", &msg("h", ".5", "ID1", 5, 5, "m5"));
    let h = |f: Filter, n| bodies(&s.history(b"a", &f, n, false).0);
    assert_eq!(h(Filter::default(), 0), ["m1", "m2", "m3", "m4", "m5"]);
    assert_eq!(h(Filter::default(), 1), ["m5"]);
    let job = |j: &str| Filter {
        job_id: Some(j.into()),
        ..Filter::default()
    };
    assert_eq!(h(job("3"), 1), ["m3"]);
    assert_eq!(h(job("1"), 0), ["m1", "m4"]);
    let pt = |p: &str| Filter {
        process_type: Some(p.into()),
        ..Filter::default()
    };
    assert_eq!(h(pt("web"), 0), ["m1", "m2", "m4"]);
    assert_eq!(h(pt(""), 0), ["m5"]);
    let st = Filter {
        streams: Some(crate::line::stream_bit(flynn_syslog::Stream::Stderr)),
        ..Filter::default()
    };
    assert_eq!(h(st, 0), ["m3"]);
    assert!(s
        .history(b"nope", &Filter::default(), 0, false)
        .0
        .is_empty());
}

#[test]
fn follow_stitches_and_skips() {
    let s = store(4, usize::MAX);
    put(&s, "a", &msg("h", "web.1", "ID1", 1, 1, "old"));
    // Following with no lines asked for copies nothing (live lines only).
    let (h, _, f) = s.history(b"a", &Filter::default(), 0, true);
    assert!(h.is_empty() && f.is_some());
    drop(f);
    let (h, next, f) = s.history(b"a", &Filter::default(), 10, true);
    assert!(f.is_some());
    assert_eq!(bodies(&h), ["old"]);
    for i in 2..5 {
        put(&s, "a", &msg("h", "web.1", "ID1", i, i, &format!("n{i}")));
    }
    let b = s.read_from(b"a", next, &Filter::default(), 100);
    assert_eq!(
        (bodies(&b.lines), b.skipped),
        (vec!["n2".to_string(), "n3".into(), "n4".into()], 0)
    );
    let b2 = s.read_from(b"a", b.next, &Filter::default(), 100);
    assert!(b2.lines.is_empty());
    for i in 5..12 {
        put(&s, "a", &msg("h", "web.1", "ID1", i, i, &format!("n{i}")));
    }
    let b3 = s.read_from(b"a", b2.next, &Filter::default(), 100);
    assert_eq!(b3.skipped, 3);
    assert_eq!(bodies(&b3.lines), ["n8", "n9", "n10", "n11"]);
    assert_eq!(s.stats()[0].followers, 1);
    drop(f);
    assert_eq!(s.stats()[0].followers, 0);
}

/// An insert wakes a follower only once it read up to the newest line (and then once):
/// lines while it has not read again take no `Notify` lock and no `Arc` clone.
#[test]
fn an_insert_wakes_a_follower_only_after_it_caught_up() {
    use std::future::Future;
    use std::task::{Context, Waker};
    let ready = |n: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>| {
        n.poll(&mut Context::from_waker(Waker::noop())).is_ready()
    };
    let s = store(10_000, usize::MAX);
    let all = Filter::default();
    let (_, next, f) = s.history(b"a", &all, 0, true);
    let f = f.unwrap();
    let line = |i: u64| msg("h", "web.1", "ID1", i, i, &format!("l{i}"));
    // Registered, not reading yet: its lines wake nobody.
    let n = f.notify.notified();
    let mut n = std::pin::pin!(n);
    n.as_mut().enable();
    put(&s, "a", &line(1));
    assert!(!ready(n.as_mut()), "woken before it read");
    // A read that reaches the newest line: the next line wakes it, the ones after it
    // (before its next read) do not.
    let b = s.read_from(b"a", next, &all, 100);
    assert_eq!((b.lines.len(), b.behind), (1, false));
    put(&s, "a", &line(2));
    assert!(ready(n.as_mut()), "the line after its read did not wake it");
    let m = f.notify.notified();
    let mut m = std::pin::pin!(m);
    m.as_mut().enable();
    put(&s, "a", &line(3));
    assert!(!ready(m.as_mut()), "woken again before it read again");
    // A read that stops short of the newest line does not ask for a wake-up either.
    let b = s.read_from(b"a", b.next, &all, 1);
    assert_eq!((b.lines.len(), b.behind), (1, true));
    put(&s, "a", &line(4));
    assert!(!ready(m.as_mut()), "woken while it was behind");
    let b = s.read_from(b"a", b.next, &all, 100);
    assert_eq!((b.lines.len(), b.behind), (2, false));
    put(&s, "a", &line(5));
    assert!(
        ready(m.as_mut()),
        "the line after its next read did not wake it"
    );
}

/// A follower that enables its wake-up, reads, and waits only when caught up gets every
/// line of two concurrent senders, with no wake-up lost (each wait is bounded).
#[tokio::test]
async fn a_follower_gets_every_line_with_no_lost_wakeup_under_concurrent_inserts() {
    let per_sender = 10_000u64;
    let s = store(100_000, usize::MAX);
    let all = Filter::default();
    let (_, mut next, f) = s.history(b"a", &all, 0, true);
    let f = f.unwrap();
    let senders: Vec<_> = (0..2)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 1..=per_sender {
                    let host = format!("h{t}");
                    put(
                        &s,
                        "a",
                        &msg(&host, "web.1", "ID1", i, i, &format!("{t} {i}")),
                    );
                    if i % 64 == 0 {
                        std::thread::sleep(std::time::Duration::from_micros(50));
                    }
                }
            })
        })
        .collect();
    let total = 2 * per_sender;
    let mut got = 0u64;
    let mut waits = 0;
    while got < total {
        let woken = f.notify.notified();
        let mut woken = std::pin::pin!(woken);
        woken.as_mut().enable();
        let b = s.read_from(b"a", next, &all, 512);
        assert_eq!(b.skipped, 0);
        for (k, l) in b.lines.iter().enumerate() {
            assert_eq!(l.seq, next + k as u64, "a line missed or repeated");
        }
        got += b.lines.len() as u64;
        next = b.next;
        if got >= total || !b.lines.is_empty() || b.behind {
            continue;
        }
        waits += 1;
        tokio::time::timeout(std::time::Duration::from_secs(5), woken)
            .await
            .unwrap_or_else(|_| panic!("no wake-up with {got} of {total} lines read"));
    }
    for t in senders {
        t.join().unwrap();
    }
    assert_eq!((got, next), (total, total + 1));
    assert!(waits > 0, "the follower never waited");
}

#[test]
fn cursors_per_host() {
    let s = store(100, usize::MAX);
    put(&s, "a", &msg("h1", "web.1", "ID1", 5, 10, "x"));
    put(&s, "b", &msg("h1", "web.1", "ID1", 6, 10, "x"));
    put(&s, "a", &msg("h2", "web.1", "ID1", 9, 10, "x"));
    put(&s, "c", &msg("h2", "web.1", "ID1", 1, 11, "x"));
    put(&s, "a", &msg("h2", "web.1", "ID1", 7, 11, "late"));
    let c = s.cursors();
    assert_eq!(c.len(), 2);
    assert_eq!(c[0].1.seq, 6);
    assert_eq!(c[1].1.seq, 7);
}

#[test]
fn read_all_since_walks_every_app() {
    let s = store(100, usize::MAX);
    put(&s, "a", &msg("h", "web.1", "ID1", 1, 1, "a1"));
    put(&s, "b", &msg("h", "web.1", "ID1", 2, 2, "b1"));
    let mut pos = Positions::default();
    assert_eq!(s.read_all_since(&mut pos, 100).len(), 2);
    assert!(s.read_all_since(&mut pos, 100).is_empty());
    put(&s, "a", &msg("h", "web.1", "ID1", 3, 3, "a2"));
    let v = s.read_all_since(&mut pos, 100);
    assert_eq!(
        bodies(&v.into_iter().map(|x| x.1).collect::<Vec<_>>()),
        ["a2"]
    );
}

#[test]
fn per_shard_memory_sums_and_holds_cap_under_concurrent_inserts() {
    let body = "y".repeat(300);
    let cap = 1 << 20;
    let s = store(10_000, cap);
    assert!(s.memory_slack() <= cap / 32 + SHARDS);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let s = s.clone();
            let body = body.clone();
            std::thread::spawn(move || {
                for i in 0..3_000u64 {
                    let app = format!("app{}", (t * 7 + i) % 13);
                    let m = msg("h", "web.1", "ID1", i, t * 1_000_000 + i, &body);
                    put(&s, &app, &m);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let st = s.stats();
    let sum: usize = st.iter().map(|a| a.bytes).sum();
    assert_eq!(s.memory(), sum, "per-shard counts sum to the apps' bytes");
    assert!(s.memory() <= cap, "{} > {cap}", s.memory());
    let est = s.memory_estimate();
    assert!(
        est.abs_diff(s.memory()) <= s.memory_slack(),
        "estimate {est} vs exact {}",
        s.memory()
    );
    let lines: usize = st.iter().map(|a| a.lines).sum();
    let evicted: u64 = st.iter().map(|a| a.evicted_memory).sum();
    assert_eq!(lines as u64 + evicted, 4 * 3_000);
    assert!(evicted > 0);
    assert!(
        st.iter().all(|a| a.lines >= 1),
        "every app keeps its newest line"
    );
}

#[test]
fn estimate_written_once_per_flush_not_per_line() {
    // A large cap: the shared estimate lags by less than the slack, the exact sum is exact.
    let s = store(10_000, 1 << 30);
    put(&s, "a", &msg("h", "web.1", "ID1", 1, 1, "small"));
    assert!(s.memory() > 0);
    assert_eq!(
        s.memory_estimate(),
        0,
        "one line is below the flush threshold"
    );
    assert!(s.memory() <= s.memory_slack());
}

#[test]
fn replays_are_caught_after_a_long_run_of_new_lines() {
    // Long past the point where the replay index is dropped (2 × ring size).
    let s = store(100, usize::MAX);
    for i in 0..500 {
        assert_eq!(
            put(&s, "a", &msg("h", "web.1", "ID1", i, i, &format!("l{i}"))),
            Outcome::Stored
        );
    }
    // The host replays its last 50 lines: every one is recognised.
    for i in 450..500 {
        assert_eq!(
            put(&s, "a", &msg("h", "web.1", "ID1", i, i, &format!("l{i}"))),
            Outcome::Duplicate,
            "replayed line {i}"
        );
    }
    // Same time and seq but other content is not a replay.
    assert_eq!(
        put(&s, "a", &msg("h", "web.1", "ID1", 499, 499, "different")),
        Outcome::Stored
    );
    // New lines go on being stored, and a replay right after them is still caught.
    assert_eq!(
        put(&s, "a", &msg("h", "web.1", "ID1", 500, 500, "l500")),
        Outcome::Stored
    );
    assert_eq!(
        put(&s, "a", &msg("h", "web.1", "ID1", 500, 500, "l500")),
        Outcome::Duplicate
    );
    assert_eq!(s.stats()[0].duplicates, 51);
}

#[test]
fn replays_from_interleaved_hosts_with_equal_times() {
    let s = store(1000, usize::MAX);
    // Two hosts, same timestamps, interleaved: half the lines are not later than the
    // app's latest time, only past their own host's cursor.
    for i in 0..300 {
        for host in ["h1", "h2"] {
            assert_eq!(
                put(
                    &s,
                    "a",
                    &msg(host, "web.1", "ID1", i, i, &format!("{host}-{i}"))
                ),
                Outcome::Stored
            );
        }
    }
    for i in (0..300).step_by(7) {
        assert_eq!(
            put(
                &s,
                "a",
                &msg("h2", "web.1", "ID1", i, i, &format!("h2-{i}"))
            ),
            Outcome::Duplicate
        );
    }
    // A third host sending the same body at the same time is a different line.
    assert_eq!(
        put(&s, "a", &msg("h3", "web.1", "ID1", 5, 5, "h2-5")),
        Outcome::Stored
    );
}

#[test]
fn raw_lines_without_seq_are_deduplicated_by_time_and_content() {
    let s = store(100, usize::MAX);
    let raw = |ts_us: u64, body: &str| {
        let ts = Timestamp(1_257_894_000_000_000_000 + ts_us as i64 * 1000).to_rfc3339();
        format!("<190>1 {ts} h app web.1 ID1 - {body}")
    };
    for i in 0..300 {
        assert_eq!(put(&s, "a", &raw(i, &format!("r{i}"))), Outcome::Stored);
    }
    assert_eq!(put(&s, "a", &raw(299, "r299")), Outcome::Duplicate);
    assert_eq!(put(&s, "a", &raw(250, "r250")), Outcome::Duplicate);
    assert_eq!(put(&s, "a", &raw(250, "other")), Outcome::Stored);
    // The same text at the same time on the other stream (MSGID) is another line.
    let stderr = raw(250, "r250").replace(" ID1 ", " ID2 ");
    assert_eq!(put(&s, "a", &stderr), Outcome::Stored);
    assert_eq!(put(&s, "a", &stderr), Outcome::Duplicate);
}

#[test]
fn seq_spans_cover_every_added_number_and_stay_few() {
    let mut s = SeqSpans::default();
    assert!(!s.covers(5));
    // Two senders of one host, far apart, each moving up.
    for k in 0..100u64 {
        s.add(k * 3);
        s.add(1_000_000 + k * 3);
    }
    assert_eq!(s.spans, vec![(0, 297), (1_000_000, 1_000_297)]);
    assert!(s.covers(150) && s.covers(1_000_001));
    assert!(!s.covers(298) && !s.covers(999_999) && !s.covers(1_000_298));
    // A far number starts a range of its own; a close one grows the range below it; a
    // range grown up to the next one merges with it.
    s.add(500_000);
    assert_eq!(s.spans.len(), 3);
    s.add(500_010);
    assert!(s.covers(500_005) && !s.covers(400_000));
    s.add(999_999);
    assert_eq!(
        s.spans.len(),
        3,
        "999 999 joins the range starting at 1 000 000"
    );
    assert_eq!(s.spans[2], (999_999, 1_000_297));
    // Many scattered numbers: bounded, and every added one stays covered.
    let mut t = SeqSpans::default();
    let nums: Vec<u64> = (0..1000u64).map(|i| (i * 7919) % 100_003 * 10).collect();
    for &n in &nums {
        t.add(n);
    }
    assert!(t.spans.len() <= MAX_SPANS);
    assert!(nums.iter().all(|&n| t.covers(n)));
    assert!(
        t.spans.windows(2).all(|w| w[0].1 < w[1].0),
        "sorted, disjoint"
    );
    // Far-apart numbers: merged down to the bound, and the memory held stays near it (the
    // vector does not keep the doubled capacity it grew to past the bound).
    let mut u = SeqSpans::default();
    for i in 0..200u64 {
        u.add(i * 1_000_000);
    }
    assert_eq!(u.spans.len(), MAX_SPANS);
    assert!(
        u.spans.capacity() <= MAX_SPANS + 1,
        "capacity {}",
        u.spans.capacity()
    );
}

#[test]
fn one_host_split_over_senders_skips_the_replay_index_and_still_catches_replays() {
    let s = store(10_000, usize::MAX);
    // Sender A sends seqs 0.., sender B seqs 500 000.. of the same host, interleaved, with
    // times that also interleave: B's lines are behind the host's cursor once A... and the
    // other way round; none of them can be a replay.
    for i in 0..400u64 {
        for (base, t0) in [(0u64, 0u64), (500_000, 10)] {
            assert_eq!(
                put(
                    &s,
                    "a",
                    &msg(
                        "h",
                        "web.1",
                        "ID1",
                        base + i,
                        t0 + i,
                        &format!("{base}-{i}")
                    )
                ),
                Outcome::Stored
            );
        }
    }
    {
        let shard = s.shard(b"a");
        let app = shard.apps.get(&b"a"[..]).unwrap();
        assert!(
            app.dedupe.is_none(),
            "lines that cannot be replays built the replay index"
        );
    }
    // Replays from both senders are still recognised.
    for i in (0..400u64).step_by(37) {
        assert_eq!(
            put(&s, "a", &msg("h", "web.1", "ID1", i, i, &format!("0-{i}"))),
            Outcome::Duplicate
        );
        assert_eq!(
            put(
                &s,
                "a",
                &msg(
                    "h",
                    "web.1",
                    "ID1",
                    500_000 + i,
                    10 + i,
                    &format!("500000-{i}")
                )
            ),
            Outcome::Duplicate
        );
    }
}

#[test]
fn memory_cap_holds_with_many_one_line_apps() {
    let cap = 1 << 20;
    let s = store(10_000, cap);
    let body = "z".repeat(100);
    for i in 0..20_000u64 {
        put(
            &s,
            &format!("app{i}"),
            &msg("h", "web.1", "ID1", i, i, &body),
        );
        if i % 1000 == 0 {
            assert!(s.memory() <= cap, "{} > {cap}", s.memory());
        }
    }
    assert!(s.memory() <= cap, "{} > {cap}", s.memory());
    let st = s.stats();
    assert!(st.len() < 20_000, "some apps were dropped");
    assert!(st.iter().all(|a| a.lines == 1), "no empty app is kept");
    assert_eq!(s.apps.load(Ordering::Relaxed), st.len());
    // The newest app is still there.
    assert!(st.iter().any(|a| a.app == "app19999"));
}

#[test]
fn follows_of_unknown_channels_leave_nothing_behind() {
    let s = store(100, usize::MAX);
    put(&s, "known", &msg("h", "web.1", "ID1", 1, 1, "x"));
    let before = s.stats().len();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..1_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let app = format!("unknown-{x:016x}");
        let (h, _, f) = s.history(app.as_bytes(), &Filter::default(), 10, true);
        assert!(h.is_empty());
        assert!(f.is_some());
        drop(f);
    }
    assert_eq!(s.stats().len(), before);
    assert_eq!(s.apps.load(Ordering::Relaxed), before);
    // A follower still sees lines that arrive while it waits, and an app with lines
    // stays when its follower goes.
    let (_, next, f) = s.history(b"new", &Filter::default(), 0, true);
    put(&s, "new", &msg("h", "web.1", "ID1", 2, 2, "y"));
    assert_eq!(
        bodies(&s.read_from(b"new", next, &Filter::default(), 10).lines),
        ["y"]
    );
    drop(f);
    assert_eq!(s.stats().len(), before + 1);
}

#[test]
fn an_app_dropped_by_the_cap_and_back_keeps_counting_up() {
    // A peer following the whole store remembers each app's position; an app dropped
    // (its last line reclaimed) and re-created must not restart below it.
    let s = store(10_000, 1 << 16);
    put(&s, "a", &msg("h", "web.1", "ID1", 1, 1, "first"));
    let mut pos = Positions::default();
    assert_eq!(s.read_all_since(&mut pos, 100).len(), 1);
    for i in 0..2_000u64 {
        put(
            &s,
            &format!("app{i}"),
            &msg("h", "web.1", "ID1", i + 2, i + 2, "filler"),
        );
    }
    assert!(s.stats().iter().all(|a| a.app != "a"), "`a` was reclaimed");
    put(&s, "a", &msg("h", "web.1", "ID1", 9_999, 9_999, "again"));
    let mut got = Vec::new();
    loop {
        let v = s.read_all_since(&mut pos, 1_000);
        if v.is_empty() {
            break;
        }
        got.extend(v.into_iter().filter(|(app, _)| &**app == b"a").map(|x| x.1));
    }
    assert_eq!(bodies(&got), ["again"]);
}

/// One line each from hosts `h0`…`h{n-1}`, then the last host's line again; returns the
/// store, how many hosts `/cursors` names and what the replay was taken as.
fn hosts_then_a_replay(n: usize) -> (Arc<Store>, usize, Outcome) {
    let s = store(10_000, usize::MAX);
    for i in 0..n {
        let line = msg(&format!("h{i}"), "web.1", "ID1", 1, i as u64, "x");
        assert_eq!(put(&s, "a", &line), Outcome::Stored);
    }
    let cursors = s.cursors().len();
    let last = n - 1;
    let replay = put(
        &s,
        "a",
        &msg(&format!("h{last}"), "web.1", "ID1", 1, last as u64, "x"),
    );
    let (h, _, _) = s.history(b"a", &Filter::default(), 0, false);
    assert_eq!(h.len(), n, "every host's line stored once");
    (s, cursors, replay)
}

#[test]
fn hosts_tracked_per_shard_are_bounded_and_later_ones_still_deduplicated() {
    // Past the sequence-range bound, within the cursor bound: every host has its cursor,
    // and a host without sequence ranges still has its replay taken as a duplicate.
    let n = MAX_SEEN_HOSTS_PER_SHARD + 20;
    let (_, cursors, replay) = hosts_then_a_replay(n);
    assert_eq!(cursors, n, "a cursor for every host");
    assert_eq!(replay, Outcome::Duplicate);
}

#[test]
fn host_cursors_are_bounded_per_shard_and_later_hosts_still_deduplicated() {
    let (_, cursors, replay) = hosts_then_a_replay(MAX_CURSOR_HOSTS_PER_SHARD + 5);
    assert_eq!(cursors, MAX_CURSOR_HOSTS_PER_SHARD);
    assert_eq!(replay, Outcome::Duplicate);
}

#[test]
fn a_whole_store_reader_forgets_the_apps_the_store_dropped() {
    // A sender inventing an app per line, under the memory cap: the store keeps a bounded
    // number of apps, and a peer following the whole store must not remember them all.
    // (Room for ~200 one-line apps at `APP_OVERHEAD` each.)
    let s = store(10_000, 1 << 18);
    let mut pos = Positions::default();
    let mut read = 0;
    for i in 0..5_000u64 {
        put(&s, &format!("app{i}"), &msg("h", "web.1", "ID1", i, i, "x"));
        // As the `/snapshot?follow=true` stream does after each wake-up.
        read += s.read_all_fair(&mut pos, 1_000, usize::MAX).len();
    }
    // (A few lines go in the reclaim their own insert runs, before any read.)
    assert!((4_900..=5_000).contains(&read), "{read} lines read");
    let apps = s.stats().len();
    assert!(apps < 1_000, "the cap dropped apps ({apps} left)");
    // The last read visited every shard: only apps still stored have a position.
    assert!(
        pos.len() <= apps,
        "{} positions for {apps} stored apps",
        pos.len()
    );
}

#[test]
fn a_peers_copies_of_evicted_lines_do_not_come_back() {
    // The memory cap evicts (the ring is far from full by count); a live follower reads
    // every line. Then the peer stream reconnects and replays the peer's whole buffer,
    // which still holds every line: none of the evicted ones may be stored again.
    let body = "x".repeat(800);
    let one = msg("h", "web.1", "ID1", 0, 0, &body).len() + crate::line::LINE_OVERHEAD;
    let s = store(10_000, one * 20);
    let all = Filter::default();
    let (_, mut next, f) = s.history(b"busy", &all, 0, true);
    let line = |i: u64| msg("h", "web.1", "ID1", i, i, &format!("{i} {body}"));
    for i in 1..200 {
        assert_eq!(put(&s, "busy", &line(i)), Outcome::Stored);
        let b = s.read_from(b"busy", next, &all, 1_000);
        assert_eq!((b.lines.len(), b.skipped), (1, 0));
        next = b.next;
    }
    let evicted = s.stats()[0].evicted_memory;
    assert!(evicted > 0);
    let peer = |i: u64| {
        let frame = line(i);
        let f = parse_fields(frame.as_bytes()).unwrap();
        s.insert_from_peer(b"busy", frame.as_bytes(), &f, f.ts.unwrap())
    };
    for i in 1..200 {
        let want = if i <= evicted {
            Outcome::Evicted
        } else {
            Outcome::Duplicate
        };
        assert_eq!(peer(i), want, "line {i}");
    }
    let again = s.read_from(b"busy", next, &all, 1_000);
    assert!(
        again.lines.is_empty() && again.skipped == 0,
        "{} evicted lines came back",
        again.lines.len()
    );
    // A peer's line later than every evicted one is still taken, and a host's own line as
    // old as an evicted one too (hosts resend from their cursor, spec §3.5).
    assert_eq!(peer(200), Outcome::Stored);
    assert_eq!(
        put(
            &s,
            "busy",
            &msg("h2", "web.1", "ID1", 1, 1, "resent by its host")
        ),
        Outcome::Stored
    );
    drop(f);
}

#[test]
fn a_far_future_line_evicted_once_does_not_refuse_a_peers_later_lines() {
    // One line stamped far ahead (a bad clock) arrives first and is evicted by the memory
    // cap. A peer's replayed lines newer than what is still buffered are not older than
    // the buffer, so they are taken; one older than the whole buffer is refused.
    let body = "y".repeat(800);
    let one = msg("h", "web.1", "ID1", 0, 0, &body).len() + crate::line::LINE_OVERHEAD;
    let s = store(10_000, one * 20);
    assert_eq!(
        put(
            &s,
            "app",
            &msg("h", "web.1", "ID1", 1, 4_000_000_000_000, &body)
        ),
        Outcome::Stored
    );
    for i in 100..200 {
        put(&s, "app", &msg("h", "web.1", "ID1", i, i, &body));
    }
    assert!(s.stats()[0].evicted_memory > 0);
    let peer = |ts: u64, text: &str| {
        let frame = msg("p", "web.1", "ID2", ts, ts, text);
        let f = parse_fields(frame.as_bytes()).unwrap();
        s.insert_from_peer(b"app", frame.as_bytes(), &f, f.ts.unwrap())
    };
    assert_eq!(peer(250, "newer than the buffer"), Outcome::Stored);
    assert_eq!(peer(10, "older than the buffer"), Outcome::Evicted);
}

#[test]
fn a_read_within_a_byte_budget_stops_after_the_line_that_reaches_it() {
    let s = store(10_000, 1 << 30);
    let body = "z".repeat(1_000);
    for i in 1..=50 {
        put(&s, "app", &msg("h", "web.1", "ID1", i, i, &body));
    }
    let all = Filter::default();
    let one = msg("h", "web.1", "ID1", 1, 1, &body).len();
    let b = s.read_from_within(b"app", 0, &all, 512, one * 3);
    assert_eq!(b.lines.len(), 3);
    assert!(b.behind, "more lines are waiting");
    let rest = s.read_from_within(b"app", b.next, &all, 512, usize::MAX);
    assert_eq!(rest.lines.len(), 47);
    assert_eq!(rest.lines[0].seq, b.lines[2].seq + 1);
    // At least one line, however small the budget.
    assert_eq!(s.read_from_within(b"app", 0, &all, 512, 1).lines.len(), 1);
}

/// A whole-store read that ends on its byte budget in the middle of a shard starts the
/// next one with that shard's apps that had no turn: an app with more than a budget's
/// worth of lines always waiting cannot keep the reader from the others of its shard.
#[test]
fn a_whole_store_read_on_a_byte_budget_reaches_every_app_of_a_busy_shard() {
    let s = store(10_000, usize::MAX);
    let quiet: Vec<String> = (0..)
        .map(|i| format!("quiet{i}"))
        .filter(|a| shard_of(a.as_bytes()) == shard_of(b"busy"))
        .take(6)
        .collect();
    for (i, a) in quiet.iter().enumerate() {
        put(&s, a, &msg("h", "web.1", "ID1", i as u64, 1, "quiet"));
    }
    let body = "b".repeat(10_000);
    let mut pos = Positions::default();
    let mut seen = std::collections::HashSet::new();
    let mut seq = 100;
    for _ in 0..4 {
        for _ in 0..20 {
            seq += 1;
            put(&s, "busy", &msg("h", "web.1", "ID1", seq, seq, &body));
        }
        let lines = s.read_all_fair(&mut pos, 1_000, 50_000);
        let bytes: usize = lines
            .iter()
            .map(|(a, l)| a.len() + l.msg.frame().len())
            .sum();
        assert!(bytes < 50_000 + 11_000, "{bytes} bytes read");
        seen.extend(
            lines
                .into_iter()
                .map(|(a, _)| a)
                .filter(|a| &a[..] != b"busy"),
        );
    }
    assert_eq!(
        seen.len(),
        quiet.len(),
        "apps never read: {}",
        quiet.len() - seen.len()
    );
}

/// A read that stopped on its byte budget within a shard starts at the app it left without a
/// turn, and comes back to that shard's earlier apps at its end: a read that does not stop
/// on a bound has given every app a turn, so reading until an empty result (as a snapshot
/// does before its end marker) gets every line. Both orders of a busy and a quiet app in
/// one shard (the map's order is not known), large lines.
#[test]
fn reading_until_empty_on_a_byte_budget_gets_every_line() {
    let body = "x".repeat(2_000);
    let other = (0..)
        .map(|i| format!("quiet{i}"))
        .find(|a| shard_of(a.as_bytes()) == shard_of(b"busy"))
        .unwrap();
    for (busy, quiet) in [("busy", other.as_str()), (other.as_str(), "busy")] {
        let s = store(10_000, usize::MAX);
        for seq in 1..=1_000u64 {
            put(&s, busy, &msg("h", "web.1", "ID1", seq, seq, &body));
        }
        put(&s, quiet, &msg("h", "web.1", "ID1", 1, 1, "quiet"));
        let mut pos = Positions::default();
        let mut got = 0;
        for _ in 0..1_000 {
            let lines = s.read_all_fair(&mut pos, 1_000, 256 << 10);
            if lines.is_empty() {
                break;
            }
            got += lines.len();
        }
        assert_eq!(
            got, 1_001,
            "busy {busy}, quiet {quiet}: lines read before an empty read"
        );
    }
}

/// A read ends at `max` lines also within a shard of many small apps (a snapshot chunk is
/// at most 1000 records), and the reads after it get every line once.
#[test]
fn a_read_ends_at_its_line_bound_within_a_shard() {
    let s = store(10_000, usize::MAX);
    let apps: Vec<String> = (0..)
        .map(|i| format!("small{i}"))
        .filter(|a| shard_of(a.as_bytes()) == shard_of(b"small0"))
        .take(50)
        .collect();
    for a in &apps {
        put(&s, a, &msg("h", "web.1", "ID1", 1, 1, "one"));
    }
    let mut pos = Positions::default();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..100 {
        let lines = s.read_all_fair(&mut pos, 10, usize::MAX);
        if lines.is_empty() {
            break;
        }
        assert!(lines.len() <= 10, "{} lines in one read", lines.len());
        for (a, _) in lines {
            assert!(seen.insert(a), "a line read twice");
        }
    }
    assert_eq!(seen.len(), apps.len());
}

#[test]
fn evictions_of_apps_the_store_removed_still_count() {
    // One-line apps past the memory cap: the cap evicts whole apps' only lines and the
    // apps go with them; the store-wide totals keep what their counts said.
    let cap = 64 << 10;
    let s = store(10_000, cap);
    let body = "z".repeat(100);
    let n = 5_000u64;
    for i in 0..n {
        put(
            &s,
            &format!("app{i}"),
            &msg("h", "web.1", "ID1", i, i, &body),
        );
    }
    let live: usize = s.stats().iter().map(|a| a.lines).sum();
    let t = s.totals();
    assert!(s.stats().len() < n as usize, "apps were removed");
    assert_eq!(
        live as u64 + t.evicted_memory + t.evicted_capacity,
        n,
        "every line is buffered or counted as evicted: {t:?}"
    );
    let text = crate::metrics::render(&[], &s);
    assert!(
        text.contains(&format!(
            "flynn_logagg_evicted_total{{reason=\"max_memory\"}} {}",
            t.evicted_memory
        )),
        "{text}"
    );
}

#[test]
fn apps_are_charged_for_themselves_and_drained_rings_give_memory_back() {
    // Followed channels with no line still cost: each is charged APP_OVERHEAD until its
    // follower leaves.
    let s = store(10_000, usize::MAX);
    let follows: Vec<_> = (0..100)
        .map(|i| {
            s.history(format!("f{i}").as_bytes(), &Filter::default(), 0, true)
                .2
        })
        .collect();
    assert_eq!(s.memory(), 100 * APP_OVERHEAD);
    drop(follows);
    assert_eq!(s.memory(), 0);

    // An app squeezed from thousands of lines to a few by the memory cap gives back its
    // ring's slots.
    let body = "y".repeat(200);
    let one = msg("h", "web.1", "ID1", 0, 0, &body).len() + crate::line::LINE_OVERHEAD;
    let s = store(10_000, 3_000 * one);
    for i in 0..2_000u64 {
        put(&s, "big", &msg("h", "web.1", "ID1", i, i, &body));
    }
    let cap_before = s
        .shard(b"big")
        .apps
        .get(&b"big"[..])
        .unwrap()
        .ring
        .capacity();
    assert!(cap_before >= 2_000);
    // A reader keeps the app even if the cap takes every line.
    let (_, _, _reader) = s.history(b"big", &Filter::default(), 0, true);
    for i in 0..20_000u64 {
        put(
            &s,
            &format!("small{i}"),
            &msg("h2", "web.1", "ID1", i, i, &body),
        );
    }
    let g = s.shard(b"big");
    let a = g.apps.get(&b"big"[..]).expect("followed, so still there");
    assert!(
        a.ring.len() < 500
            && (a.ring.capacity() <= 4 * a.ring.len() + 3 || a.ring.capacity() <= 64),
        "{} lines in a ring of {}",
        a.ring.len(),
        a.ring.capacity()
    );
}

#[test]
fn whole_store_readers_are_woken_once_per_read_not_per_line() {
    use std::future::Future;
    use std::task::{Context, Waker};
    let ready = |n: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>| {
        n.poll(&mut Context::from_waker(Waker::noop())).is_ready()
    };
    let s = store(10_000, usize::MAX);
    let _reader = s.follow_all();
    // A reader about to read: the next insert wakes it.
    let n = s.any_notified();
    let mut n = std::pin::pin!(n);
    n.as_mut().enable();
    s.any_read_begins();
    put(&s, "a", &msg("h", "web.1", "ID1", 1, 1, "one"));
    assert!(
        ready(n.as_mut()),
        "the first line after a read wakes the reader"
    );
    // Lines before its next read do not notify again (that insert already did).
    let m = s.any_notified();
    let mut m = std::pin::pin!(m);
    m.as_mut().enable();
    put(&s, "a", &msg("h", "web.1", "ID1", 2, 2, "two"));
    assert!(!ready(m.as_mut()), "no wake-up per line");
    // Its next read re-arms: the next line wakes it.
    s.any_read_begins();
    put(&s, "b", &msg("h", "web.1", "ID1", 3, 3, "three"));
    assert!(ready(m.as_mut()), "a line after the next read wakes it");
}

#[test]
fn followed_empty_apps_over_the_cap_do_not_make_every_insert_sweep_in_vain() {
    // Readers on channels nobody logs to, their charges alone over the cap: a line that
    // takes the store over it is evicted, and the reclaim stops when a pass frees nothing
    // instead of sweeping every shard 64 times per line.
    let cap = 1 << 20;
    let s = store(10_000, cap);
    let follows: Vec<_> = (0..1_100)
        .map(|i| {
            s.history(format!("f{i}").as_bytes(), &Filter::default(), 0, true)
                .2
        })
        .collect();
    assert!(s.memory() > cap / 16 * 15);
    let inserts = 200;
    for i in 0..inserts {
        put(&s, "logs", &msg("h", "web.1", "ID1", i, i, "line"));
    }
    let passes = s.reclaim_passes();
    assert!(
        passes <= 2 * inserts,
        "{passes} reclaim passes for {inserts} lines"
    );
    drop(follows);
}

#[test]
fn the_estimate_follows_apps_that_come_and_go_with_their_readers() {
    // Readers on channels nobody logs to: each app is charged on the follow and credited
    // when the reader leaves; the shared estimate stays within its slack of the exact
    // total both ways (it would read high after the readers left, and inserts elsewhere
    // would evict for nothing).
    let s = store(10_000, 1 << 20);
    let within = |s: &Store| s.memory_estimate().abs_diff(s.memory()) <= s.memory_slack();
    let follows: Vec<_> = (0..300)
        .map(|i| {
            s.history(format!("f{i}").as_bytes(), &Filter::default(), 0, true)
                .2
        })
        .collect();
    assert!(within(&s), "{} vs {}", s.memory_estimate(), s.memory());
    drop(follows);
    assert_eq!(s.memory(), 0);
    assert!(within(&s), "{} vs {}", s.memory_estimate(), s.memory());
}
