//! Tests of the log shipper against aggregators on local sockets, with and without a disk
//! log.

use std::time::Duration;

use super::*;
use tokio::io::AsyncReadExt;

/// A drop notice carries no `seq`: it goes out ahead of older queued lines and must not
/// move the aggregator's cursor past them.
#[tokio::test]
async fn drop_notices_carry_no_sequence() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let sh = Shipper::start("h", vec![addr.to_string()], 1);
    let src = Source::new(Some("a"), None, "j");
    for i in 0..3 {
        sh.push(&src, Stream::Stdout, format!("line{i}").as_bytes());
    }
    let notices = sh.shared.dests[0].take_notices();
    assert_eq!(notices.len(), 1);
    let framer = flynn_syslog::Framer::new(flynn_syslog::DEFAULT_MAX_FRAME);
    let mut buf = bytes::BytesMut::from(&notices[0].1[..]);
    let frame = framer.next_frame(&mut buf).unwrap().unwrap();
    let (m, err) = flynn_syslog::Message::parse_checked(frame);
    assert!(err.is_none(), "{err:?}");
    assert!(m.msg().starts_with(b"flynn-host: 2 log lines were dropped"));
    assert_eq!(flynn_syslog::flynn::flynn_seq(m.structured_data()), None);
}

#[test]
fn long_header_fields_are_cut() {
    let long = format!("a b\u{e9}{}", "x".repeat(300));
    let h = Header {
        timestamp: "2009-11-10T23:00:00.123456Z",
        host: "h",
        app: &long,
        procid: &long,
        stream: Stream::Stdout,
        seq: 1,
    };
    let mut out = Vec::new();
    encode(&mut out, &h, b"x");
    let framer = flynn_syslog::Framer::new(flynn_syslog::DEFAULT_MAX_FRAME);
    let mut buf = bytes::BytesMut::from(&out[..]);
    let frame = framer.next_frame(&mut buf).unwrap().unwrap();
    let (m, err) = flynn_syslog::Message::parse_checked(frame);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(m.app_name().len(), MAX_APP);
    assert_eq!(m.procid().len(), MAX_PROCID);
    assert!(m.app_name().starts_with(b"a_b_xxx"), "{:?}", m.app_name());
    assert_eq!(m.msg(), b"x");
}

#[test]
fn encodes_what_the_aggregator_parses() {
    let mut out = Vec::new();
    let ts = now_rfc3339();
    assert_eq!(ts.len(), "2009-11-10T23:00:00.123456Z".len(), "{ts}");
    let src = Source::new(Some("app1"), Some("web"), "host-j1");
    let h = Header {
        timestamp: &ts,
        host: "host",
        app: &src.app,
        procid: &src.procid,
        stream: Stream::Stderr,
        seq: 7,
    };
    encode(&mut out, &h, b"hello world");
    let framer = flynn_syslog::Framer::new(flynn_syslog::DEFAULT_MAX_FRAME);
    let mut buf = bytes::BytesMut::from(&out[..]);
    let frame = framer.next_frame(&mut buf).unwrap().unwrap();
    assert!(buf.is_empty());
    let (m, err) = flynn_syslog::Message::parse_checked(frame);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(m.hostname(), b"host");
    assert_eq!(m.app_name(), b"app1");
    assert_eq!(m.procid(), b"web.host-j1");
    assert_eq!(
        flynn_syslog::Stream::from_msgid(m.msgid()),
        flynn_syslog::Stream::Stderr
    );
    assert_eq!(flynn_syslog::flynn::flynn_seq(m.structured_data()), Some(7));
    assert_eq!(m.msg(), b"hello world");
    assert_eq!((m.facility(), m.severity()), (23, 6));
    let t = m.timestamp().unwrap();
    assert_eq!(t.0 % 1000, 0);

    let src = Source::new(None, None, "j2");
    assert_eq!((src.app.as_str(), src.procid.as_str()), ("j2", "j2"));
}

/// Reads framed messages from `c` until `want` is among them (or 10 s): their texts.
async fn read_until(c: &mut tokio::net::TcpStream, want: &[u8]) -> Vec<Vec<u8>> {
    let framer = flynn_syslog::Framer::new(20_000);
    let mut got = Vec::new();
    let mut msgs = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !msgs.iter().any(|m: &Vec<u8>| m == want) && tokio::time::Instant::now() < deadline {
        let mut b = [0u8; 4096];
        let n = match tokio::time::timeout(Duration::from_secs(10), c.read(&mut b)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        got.extend_from_slice(&b[..n]);
        let mut buf = bytes::BytesMut::from(&got[..]);
        msgs.clear();
        while let Ok(Some(f)) = framer.next_frame(&mut buf) {
            msgs.push(flynn_syslog::Message::parse(f).msg().to_vec());
        }
    }
    msgs
}

/// A line written just after the aggregator went away reached only the local socket;
/// it is written again on the next connection (with the lines before it, which the
/// aggregator ignores as duplicates).
#[tokio::test]
async fn lines_in_flight_when_the_aggregator_went_away_are_sent_again() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sh = Shipper::start("h", vec![addr.to_string()], 100);
    let src = Source::new(Some("a"), None, "j");
    let (mut c, _) = listener.accept().await.unwrap();
    sh.push(&src, Stream::Stdout, b"line1");
    let got = read_until(&mut c, b"line1").await;
    assert_eq!(got, [b"line1".to_vec()]);
    // The aggregator goes away; a line is written before the shipper notices.
    drop(c);
    drop(listener);
    sh.push(&src, Stream::Stdout, b"line2");
    let t0 = std::time::Instant::now();
    while sh.stats().shipped < 2 && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        sh.stats().shipped,
        2,
        "line2 was not written to the dead connection"
    );
    // It comes back on the same address.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    sh.push(&src, Stream::Stdout, b"line3");
    let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let got = read_until(&mut c, b"line3").await;
    assert!(got.contains(&b"line2".to_vec()), "line2 lost: {got:?}");
    let pos = |l: &[u8]| got.iter().position(|m| m == l).unwrap();
    assert!(pos(b"line2") < pos(b"line3"), "{got:?}");
}

/// Reads framed messages from `c` until every one of `want` has come (or 10 s): the
/// texts, in arrival order.
async fn read_all_of(c: &mut tokio::net::TcpStream, want: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let framer = flynn_syslog::Framer::new(20_000);
    let mut buf = bytes::BytesMut::new();
    let mut msgs: Vec<Vec<u8>> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !want.iter().all(|w| seen.contains(w)) && tokio::time::Instant::now() < deadline {
        let mut b = vec![0u8; 1 << 20];
        let n = match tokio::time::timeout(Duration::from_secs(10), c.read(&mut b)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        buf.extend_from_slice(&b[..n]);
        while let Ok(Some(f)) = framer.next_frame(&mut buf) {
            let m = flynn_syslog::Message::parse(f).msg().to_vec();
            seen.insert(m.clone());
            msgs.push(m);
        }
    }
    msgs
}

/// A shipper (queue of 5) on `disk`, connected to an aggregator stand-in, its
/// connect-time resend done (so what comes back later comes by resync).
async fn connected_shipper(disk: Arc<crate::logdisk::DiskLog>) -> (Shipper, tokio::net::TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sh = Shipper::start_with("h", vec![addr.to_string()], Vec::new(), 5, Some(disk));
    let (c, _) = listener.accept().await.unwrap();
    let t0 = std::time::Instant::now();
    while !sh.stats().connected && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(sh.stats().connected);
    (sh, c)
}

/// Lines the full queue dropped while the connection is up come again from the disk
/// log once the queue is drained: all arrive, none counts as dropped, no notice.
#[tokio::test]
async fn lines_the_full_queue_drops_come_again_from_the_disk_log() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(crate::logdisk::DiskLog::open(dir.path(), 0).unwrap());
    let (sh, mut c) = connected_shipper(disk).await;
    let src = Source::new(Some("a"), None, "j");
    // Pushed with no await in between: the shipper cannot drain, the queue keeps 5.
    let want: Vec<Vec<u8>> = (0..100).map(|i| format!("line{i}").into_bytes()).collect();
    for w in &want {
        sh.push(&src, Stream::Stdout, w);
    }
    let st = sh.stats();
    assert_eq!((st.lines, st.requeued, st.dropped), (100, 95, 0));
    let got = read_all_of(&mut c, &want).await;
    for w in &want {
        assert!(got.contains(w), "{} missing", String::from_utf8_lossy(w));
    }
    assert!(
        !got.iter().any(|m| m.starts_with(b"flynn-host:")),
        "a drop notice for lines that came back"
    );
    assert_eq!(sh.stats().dropped, 0);
}

/// A resync whose disk read fails is tried again after a pause (5 s), without waiting
/// for another drop: the dropped lines still all arrive, none counts as dropped.
#[tokio::test]
async fn a_resync_whose_disk_read_failed_is_tried_again() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(crate::logdisk::DiskLog::open(dir.path(), 0).unwrap());
    let t0 = std::time::Instant::now();
    let (sh, mut c) = connected_shipper(disk.clone()).await;
    let src = Source::new(Some("a"), None, "j");
    // The first resync's read fails.
    disk.fail_reads(1);
    let want: Vec<Vec<u8>> = (0..100).map(|i| format!("line{i}").into_bytes()).collect();
    for w in &want {
        sh.push(&src, Stream::Stdout, w);
    }
    assert_eq!(sh.stats().requeued, 95);
    let got = read_all_of(&mut c, &want).await;
    let missing = want.iter().filter(|w| !got.contains(w)).count();
    assert_eq!(missing, 0, "{missing} lines never came");
    assert!(
        t0.elapsed() >= Duration::from_secs(4),
        "came before the retry pause: the read did not fail"
    );
    assert_eq!(sh.stats().dropped, 0);
}

/// A connection that breaks while due lines are being resent leaves them due: the next
/// connection sends them.
#[tokio::test]
async fn due_lines_stay_due_when_their_resend_fails() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(crate::logdisk::DiskLog::open(dir.path(), 64 << 20).unwrap());
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let sh = Shipper::start_with("h", vec![addr.to_string()], Vec::new(), 5, Some(disk));
    let src = Source::new(Some("a"), None, "j");
    // ~22 MB of lines, so the due resend is more than the sockets take unread.
    let big = "x".repeat(9_000);
    let want: Vec<Vec<u8>> = (0..2_500)
        .map(|i| format!("{i} {big}").into_bytes())
        .collect();
    for w in &want {
        sh.push(&src, Stream::Stdout, w);
    }
    // The shipper takes the lines on its own task: waited for (at most 10 s).
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while sh.stats().requeued < 2_495 && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sh.stats().requeued, 2_495);
    // First connection: accepted, never read, then reset mid-resend.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    // Second connection: everything arrives.
    let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let got = read_all_of(&mut c, &want).await;
    let missing = want.iter().filter(|w| !got.contains(w)).count();
    assert_eq!(missing, 0, "{missing} lines never came");
    assert_eq!(sh.stats().dropped, 0);
}

/// Runs `body` on a runtime of its own, then drops the runtime: its tasks die as with a
/// killed daemon.
fn in_killed_daemon<F, Fut>(body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(body());
    })
    .join()
    .unwrap();
}

/// An address nothing listens on now (bound, then closed): an aggregator that is down,
/// and that a later step of the test brings up on the same address.
fn down_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Pushes `lines` on a daemon (queue of 5) whose aggregator at `addr` is down, with its
/// disk log at `path`, then kills it.
fn push_in_killed_daemon(path: &std::path::Path, addr: std::net::SocketAddr, lines: Vec<Vec<u8>>) {
    let path = path.to_path_buf();
    in_killed_daemon(move || async move {
        let disk = Arc::new(crate::logdisk::DiskLog::open(&path, 0).unwrap());
        let sh = Shipper::start_with(
            "h",
            vec![addr.to_string()],
            Vec::new(),
            5,
            Some(disk.clone()),
        );
        let src = Source::new(Some("a"), None, "j");
        for line in &lines {
            sh.push(&src, Stream::Stdout, line);
        }
        let st = sh.stats();
        assert_eq!(st.requeued + st.buffered, lines.len() as u64);
        disk.sync().unwrap();
    });
}

/// Starts a shipper on the log at `path` with its aggregator at `addr` (and its API at
/// `api`), the first `fail_reads` disk reads failing, and returns what the aggregator
/// gets until `want` came (or 10 s passed).
async fn restarted_daemon_sends(
    path: &std::path::Path,
    addr: std::net::SocketAddr,
    api: Option<String>,
    want: &[Vec<u8>],
    fail_reads: u32,
) -> Vec<Vec<u8>> {
    let disk = Arc::new(crate::logdisk::DiskLog::open(path, 0).unwrap());
    disk.fail_reads(fail_reads);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _sh = Shipper::start_with(
        "h",
        vec![addr.to_string()],
        api.into_iter().collect(),
        5,
        Some(disk),
    );
    let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    read_all_of(&mut c, want).await
}

fn lines(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{prefix}{i}").into_bytes())
        .collect()
}

/// Lines the full queue dropped are sent after a daemon restart that came before their
/// resend, although the aggregator's cursor is past them: the due range is kept beside
/// the disk log.
#[tokio::test]
async fn due_lines_are_sent_after_a_restart_before_their_resend() {
    let dir = tempfile::tempdir().unwrap();
    let addr = down_addr();
    let want = lines("line", 100);
    // The queue keeps the last 5; the other 95 are due.
    push_in_killed_daemon(dir.path(), addr, want.clone());
    // The aggregator has the last line (the 5 queued ones got there before the
    // restart, say): its cursor is past the 95.
    let mut last = None;
    let log = crate::logdisk::DiskLog::open(dir.path(), 0).unwrap();
    log.read_range(log.start(), None, |chunk| {
        let mut buf = bytes::BytesMut::from(chunk);
        while let Ok(Some(f)) = flynn_syslog::Framer::new(20_000).next_frame(&mut buf) {
            last = Some(f.to_vec());
        }
        true
    })
    .unwrap();
    drop(log);
    let last = last.unwrap();
    let time = String::from_utf8(last.split(|b| *b == b' ').nth(1).unwrap().to_vec()).unwrap();
    let seq = crate::logdisk::key_of(&last).unwrap().1;
    let cursors: flynn_api::logagg::Cursors =
        [("h".to_string(), flynn_api::logagg::Cursor { time, seq })].into();
    let asked = Arc::new(AtomicU64::new(0));
    let asked2 = asked.clone();
    let app = axum::Router::new().route(
        "/cursors",
        axum::routing::get(move || async move {
            asked2.fetch_add(1, Ordering::SeqCst);
            axum::Json(cursors.clone())
        }),
    );
    // Without the unacknowledged mark, a restart without the cursor sends nothing old:
    // only the due mark can bring the 95 back.
    let unacked = format!("unacked-{}.pos", mark_name(&addr.to_string()));
    std::fs::remove_file(dir.path().join(unacked)).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    let got = restarted_daemon_sends(dir.path(), addr, Some(api), &want[..95], 0).await;
    let missing = want[..95].iter().filter(|w| !got.contains(w)).count();
    assert_eq!(missing, 0, "{missing} due lines never came");
    assert_eq!(
        asked.load(Ordering::SeqCst),
        1,
        "the cursor was asked for once"
    );
}

/// A daemon killed with lines queued and restarted, with no cursor from the
/// aggregator, sends the log again from where its unacknowledged frames began, so
/// the queued lines are not lost; and a daemon killed again soon after it sent them
/// (they may still have been in flight) leaves them to be sent once more.
#[tokio::test]
async fn queued_lines_are_sent_after_a_restart_without_a_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let addr = down_addr();
    let queued = lines("q", 3);
    push_in_killed_daemon(dir.path(), addr, queued.clone());
    // Restarted: the queued lines come, a new line goes out after them, a second
    // passes (the marks are saved), and this daemon is killed too.
    let (path, want) = (dir.path().to_path_buf(), queued.clone());
    in_killed_daemon(move || async move {
        let disk = Arc::new(crate::logdisk::DiskLog::open(&path, 0).unwrap());
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let sh = Shipper::start_with(
            "h",
            vec![addr.to_string()],
            Vec::new(),
            5,
            Some(disk.clone()),
        );
        let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        sh.push(&Source::new(Some("a"), None, "j"), Stream::Stdout, b"new");
        let mut all = want.clone();
        all.push(b"new".to_vec());
        let got = read_all_of(&mut c, &all).await;
        for w in &all {
            assert!(
                got.contains(w),
                "{} missing: {got:?}",
                String::from_utf8_lossy(w)
            );
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
        disk.sync().unwrap();
    });
    let got = restarted_daemon_sends(dir.path(), addr, None, &queued, 0).await;
    for w in &queued {
        assert!(
            got.contains(w),
            "{} not sent again: {got:?}",
            String::from_utf8_lossy(w)
        );
    }
}

/// A restarted daemon whose disk cannot be read at its first connection keeps the
/// previous daemon's unacknowledged lines due: they go out once the disk reads again
/// (the resync retry, 5 s later), not never.
#[tokio::test]
async fn a_restart_range_the_disk_could_not_read_is_sent_later() {
    let dir = tempfile::tempdir().unwrap();
    let addr = down_addr();
    let queued = lines("q", 3);
    push_in_killed_daemon(dir.path(), addr, queued.clone());
    let t0 = std::time::Instant::now();
    let got = restarted_daemon_sends(dir.path(), addr, None, &queued, 1).await;
    for w in &queued {
        assert!(
            got.contains(w),
            "{} never sent: {got:?}",
            String::from_utf8_lossy(w)
        );
    }
    assert!(
        t0.elapsed() >= Duration::from_secs(4),
        "sent before the retry pause: the read did not fail"
    );
}

/// A log without the mark (written before marks existed) counts as sent: a restart
/// does not send the host's whole history again.
#[tokio::test]
async fn a_log_without_a_mark_is_not_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let addr = down_addr();
    push_in_killed_daemon(dir.path(), addr, lines("old", 2));
    let mark = format!("unacked-{}.pos", mark_name(&addr.to_string()));
    std::fs::remove_file(dir.path().join(mark)).unwrap();
    let disk = Arc::new(crate::logdisk::DiskLog::open(dir.path(), 0).unwrap());
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let sh = Shipper::start_with("h", vec![addr.to_string()], Vec::new(), 5, Some(disk));
    let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    sh.push(&Source::new(Some("a"), None, "j"), Stream::Stdout, b"new");
    let got = read_all_of(&mut c, &[b"new".to_vec()]).await;
    assert_eq!(got, vec![b"new".to_vec()]);
}

/// Reads framed messages from `c` until every one of `want` (app, text) has come (or
/// 20 s): (app, text) of each, in arrival order.
async fn read_apps_until(
    c: &mut tokio::net::TcpStream,
    want: &[(&str, &[u8])],
) -> Vec<(String, Vec<u8>)> {
    let framer = flynn_syslog::Framer::new(20_000);
    let mut buf = bytes::BytesMut::new();
    let mut msgs: Vec<(String, Vec<u8>)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let has = |msgs: &[(String, Vec<u8>)]| {
        want.iter()
            .all(|(a, w)| msgs.iter().any(|(b, m)| a == b && m == w))
    };
    while !has(&msgs) && tokio::time::Instant::now() < deadline {
        let mut b = vec![0u8; 1 << 20];
        let n = match tokio::time::timeout(Duration::from_secs(10), c.read(&mut b)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        buf.extend_from_slice(&b[..n]);
        while let Ok(Some(f)) = framer.next_frame(&mut buf) {
            let m = flynn_syslog::Message::parse(f);
            msgs.push((
                String::from_utf8_lossy(m.app_name()).to_string(),
                m.msg().to_vec(),
            ));
        }
    }
    msgs
}

/// While the aggregator is away, a chatty app that overflows the buffer pushes out its
/// own oldest lines, not a quiet app's: the buffer used to be one FIFO for the whole
/// host, so app `a`'s output dropped `b`'s line. `a` gets its drop notice, `b` none.
#[tokio::test]
async fn a_chatty_app_overflows_the_buffer_with_its_own_lines_only() {
    let addr = down_addr();
    let sh = Shipper::start("h", vec![addr.to_string()], 5);
    let (a, b) = (
        Source::new(Some("a"), None, "ja"),
        Source::new(Some("b"), None, "jb"),
    );
    sh.push(&b, Stream::Stdout, b"quiet");
    for i in 0..20 {
        sh.push(&a, Stream::Stdout, format!("chatty{i}").as_bytes());
    }
    let st = sh.stats();
    assert_eq!((st.lines, st.dropped, st.buffered), (21, 16, 5));
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let notice: &[u8] =
        b"flynn-host: 16 log lines were dropped while the log aggregator was unreachable";
    let got = read_apps_until(
        &mut c,
        &[("b", b"quiet"), ("a", b"chatty19"), ("a", notice)],
    )
    .await;
    let texts: Vec<(&str, String)> = got
        .iter()
        .map(|(a, m)| (a.as_str(), String::from_utf8_lossy(m).to_string()))
        .collect();
    assert!(
        got.contains(&("b".into(), b"quiet".to_vec())),
        "the quiet app's line was pushed out: {texts:?}"
    );
    assert!(got.contains(&("a".into(), notice.to_vec())), "{texts:?}");
    let kept: Vec<_> = got
        .iter()
        .filter(|(app, m)| app == "a" && m.starts_with(b"chatty"))
        .map(|(_, m)| m.clone())
        .collect();
    assert_eq!(kept, lines("chatty", 20)[16..]);
    assert!(
        !got.iter()
            .any(|(app, m)| app == "b" && m.starts_with(b"flynn-host:")),
        "{texts:?}"
    );
}

/// The buffer is bounded in bytes too (10,000 lines of 10 KB were 100 MB): over the
/// byte budget the app holding the most bytes loses its oldest lines, and a quiet app's
/// short line stays.
#[tokio::test]
async fn the_buffer_is_bounded_in_bytes_per_app() {
    let addr = down_addr();
    let cap = Capacity {
        lines: 10_000,
        bytes: MIN_BUFFER_BYTES,
    };
    let sh = Shipper::start("h", vec![addr.to_string()], cap);
    let (a, b) = (
        Source::new(Some("a"), None, "ja"),
        Source::new(Some("b"), None, "jb"),
    );
    sh.push(&b, Stream::Stdout, b"quiet");
    let big = "x".repeat(9_000);
    for i in 0..40 {
        sh.push(&a, Stream::Stdout, format!("{i} {big}").as_bytes());
    }
    let bytes = sh.shared.dests[0].queue.lock().unwrap().bytes;
    assert!(bytes <= MIN_BUFFER_BYTES, "{bytes} bytes buffered");
    let st = sh.stats();
    assert!(st.dropped >= 30, "{st:?}");
    assert_eq!(st.buffered + st.dropped, 41);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let last = format!("39 {big}");
    let got = read_apps_until(&mut c, &[("b", b"quiet"), ("a", last.as_bytes())]).await;
    assert!(
        got.contains(&("b".into(), b"quiet".to_vec())),
        "the quiet app's line was pushed out"
    );
}

/// With the disk log: a chatty app's output during an outage is more than the disk log
/// keeps, so the quiet app's line is gone from the disk too; the memory buffer kept it
/// (it used to drop it, and it was lost with a notice).
#[tokio::test]
async fn a_quiet_apps_line_outlives_the_disk_log_in_the_buffer() {
    let dir = tempfile::tempdir().unwrap();
    // The least the disk log keeps: 8 MiB.
    let disk = Arc::new(crate::logdisk::DiskLog::open(dir.path(), 0).unwrap());
    let addr = down_addr();
    let sh = Shipper::start_with(
        "h",
        vec![addr.to_string()],
        Vec::new(),
        5,
        Some(disk.clone()),
    );
    let (a, b) = (
        Source::new(Some("a"), None, "ja"),
        Source::new(Some("b"), None, "jb"),
    );
    sh.push(&b, Stream::Stdout, b"quiet");
    let first = disk.start();
    let big = "x".repeat(9_000);
    let n = 1_500;
    for i in 0..n {
        sh.push(&a, Stream::Stdout, format!("{i} {big}").as_bytes());
    }
    disk.sync().unwrap();
    assert!(
        !disk.holds(first),
        "the disk log still holds the quiet line"
    );
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let last = format!("{} {big}", n - 1);
    let got = read_apps_until(&mut c, &[("b", b"quiet"), ("a", last.as_bytes())]).await;
    assert!(
        got.contains(&("b".into(), b"quiet".to_vec())),
        "the quiet app's line was lost"
    );
    assert!(
        !got.iter()
            .any(|(app, m)| app == "b" && m.starts_with(b"flynn-host:")),
        "a drop notice for the quiet app"
    );
}

/// Frames the buffer dropped can now lie after frames it kept (a quiet app's): on
/// reconnect the disk resend goes to the end of what was dropped, not only up to the
/// queue's first frame (which would send none of them), and every line arrives.
#[tokio::test]
async fn lines_dropped_after_a_quiet_apps_queued_line_come_from_the_disk_log() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(crate::logdisk::DiskLog::open(dir.path(), 0).unwrap());
    let addr = down_addr();
    let sh = Shipper::start_with("h", vec![addr.to_string()], Vec::new(), 5, Some(disk));
    let (a, b) = (
        Source::new(Some("a"), None, "ja"),
        Source::new(Some("b"), None, "jb"),
    );
    sh.push(&b, Stream::Stdout, b"quiet");
    let want = lines("chatty", 100);
    for w in &want {
        sh.push(&a, Stream::Stdout, w);
    }
    assert_eq!(sh.stats().requeued, 96);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut all = want.clone();
    all.push(b"quiet".to_vec());
    let got = read_all_of(&mut c, &all).await;
    let missing: Vec<_> = all
        .iter()
        .filter(|w| !got.contains(w))
        .map(|w| String::from_utf8_lossy(w).to_string())
        .collect();
    assert!(missing.is_empty(), "never came: {missing:?}");
    assert!(!got.iter().any(|m| m.starts_with(b"flynn-host:")));
    assert_eq!(sh.stats().dropped, 0);
}

#[tokio::test]
async fn buffers_while_down_then_ships_and_counts_drops() {
    // Reserve a port, then close it: the aggregator is "down".
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let sh = Shipper::start("h", vec![addr.to_string()], 5);
    let src = Source::new(Some("a"), None, "j");
    for i in 0..8 {
        sh.push(&src, Stream::Stdout, format!("line{i}").as_bytes());
    }
    let st = sh.stats();
    assert_eq!((st.lines, st.dropped, st.buffered), (8, 3, 5));
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    // Once the backlog is out, a line longer than MAX_LINE goes as two messages.
    let t0 = std::time::Instant::now();
    while sh.stats().shipped < 6 && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sh.push(&src, Stream::Stdout, &vec![b'x'; MAX_LINE + 50]);
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let framer = flynn_syslog::Framer::new(20_000);
    let mut msgs = Vec::new();
    while msgs.len() < 8 && tokio::time::Instant::now() < deadline {
        let mut b = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "eof after {} bytes", got.len());
        got.extend_from_slice(&b[..n]);
        let mut buf = bytes::BytesMut::from(&got[..]);
        msgs.clear();
        loop {
            match framer.next_frame(&mut buf) {
                Ok(Some(f)) => msgs.push(flynn_syslog::Message::parse(f).msg().to_vec()),
                Ok(None) => break,
                Err(e) => panic!(
                    "framing: {e:?} at {:?}",
                    String::from_utf8_lossy(&buf[..buf.len().min(40)])
                ),
            }
        }
    }
    assert_eq!(msgs.len(), 8);
    // First a notice in the app's log, then what the buffer kept.
    assert_eq!(
        msgs[0],
        b"flynn-host: 3 log lines were dropped while the log aggregator was unreachable"
    );
    assert_eq!(msgs[1], b"line3");
    assert_eq!(msgs[5], b"line7");
    assert_eq!(msgs[6].len(), MAX_LINE);
    assert_eq!(msgs[7].len(), 50);
    let st = sh.stats();
    assert_eq!((st.shipped, st.dropped, st.buffered), (8, 3, 0));
    assert!(st.connected);
}
