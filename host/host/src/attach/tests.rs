//! Tests of attached clients: their queues, waiting for a job, holding a job's output up.

use super::*;

#[test]
fn flags_this_host_cannot_serve_are_refused_by_name() {
    use attach::*;
    assert!(check_flags(STDOUT | STDERR | STREAM, false).is_ok());
    assert!(check_flags(STDOUT | STREAM | INIT_LOG, false).is_ok());
    // `has_stdin`: created with `stdin`, or a TTY job (whose input is its terminal).
    assert!(check_flags(STDOUT | STDIN | STREAM, true).is_ok());
    for (flags, says) in [
        (STDOUT | STDIN | STREAM, "stdin"),
        (STDOUT | LOGS | STREAM, "logs"),
        (STDOUT, "must include stream"),
        (STDOUT | STREAM | 64, "unknown bits 0x40"),
    ] {
        let e = check_flags(flags, false).unwrap_err();
        assert_eq!(e.status(), 400, "{flags}");
        assert!(e.message.contains(says), "{flags}: {}", e.message);
    }
}

#[test]
fn a_window_size_is_both_dimensions_or_none() {
    assert_eq!(window_size(0, 0), None);
    assert_eq!(window_size(20, 10), Some((20, 10)));
    assert_eq!(window_size(0, 10), None);
    assert_eq!(window_size(20, 0), None);
}

/// A TTY job's output goes to clients as it came (no newline added), and the job starts
/// with the size of the latest client that asked for one (when attaching or since).
#[tokio::test]
async fn terminal_output_is_raw_and_the_size_is_the_latest_clients() {
    let a = Arc::new(Attachments::default());
    assert_eq!(a.size("j"), None);
    let _first = a.subscribe("j", false, Some((20, 10))).unwrap();
    let mut plain = a.subscribe("j", false, None).unwrap();
    assert_eq!(a.size("j"), Some((20, 10)));
    let last = a.subscribe("j", false, Some((30, 40))).unwrap();
    assert_eq!(a.size("j"), Some((30, 40)));
    drop(last);
    assert_eq!(a.size("j"), Some((20, 10)));
    // A client's resize frames change the size it stands for (the connection's copy
    // is the list's): a job starting now takes the size asked for last.
    let conn_side = plain.size.clone();
    conn_side.set(25, 50);
    assert_eq!(a.size("j"), Some((25, 50)));
    a.terminal("j", b"ready> ").await;
    a.output("j", Stream::Stdout, b"line", true).await;
    match plain.rx.recv().await {
        Some(Msg::Output(Stream::Stdout, d)) => assert_eq!(d, b"ready> "),
        m => panic!("{m:?}"),
    }
    match plain.rx.recv().await {
        Some(Msg::Output(Stream::Stdout, d)) => assert_eq!(d, b"line\n"),
        m => panic!("{m:?}"),
    }
}

/// The number of clients per job is bounded (each may queue 4 MiB): one over the bound
/// is refused with a 429 before the upgrade, the attached ones carry on, and a place
/// that frees up can be taken.
#[tokio::test]
async fn clients_per_job_are_bounded() {
    let a = Arc::new(Attachments::default());
    let mut subs: Vec<Subscription> = (0..MAX_CLIENTS)
        .map(|_| a.subscribe("j", false, None).unwrap())
        .collect();
    let e = a.subscribe("j", false, None).err().expect("one too many");
    assert_eq!(e.status(), 429, "{e:?}");
    assert!(e.message.contains("clients are attached"), "{}", e.message);
    assert!(e.retry);
    // Other jobs are not affected.
    let _other = a.subscribe("k", false, None).unwrap();
    a.output("j", Stream::Stdout, b"still here", true).await;
    for s in &mut subs {
        match s.rx.recv().await {
            Some(Msg::Output(Stream::Stdout, d)) => assert_eq!(d, b"still here\n"),
            m => panic!("{m:?}"),
        }
    }
    subs.pop();
    subs.push(a.subscribe("j", false, None).unwrap());
}

#[tokio::test]
async fn queued_bytes_are_bounded_as_well_as_lines() {
    let a = Arc::new(Attachments::default());
    let mut sub = a.subscribe("j", false, None).unwrap();
    let line = vec![b'x'; 64 * 1024 - 1];
    let fit = QUEUE_BYTES / (64 * 1024);
    for _ in 0..fit {
        a.output("j", Stream::Stdout, &line, true).await;
    }
    assert_eq!(a.count.load(Ordering::Relaxed), 1, "{fit} lines fit");
    // Taking one off the queue makes room for one more.
    let m = sub.rx.recv().await;
    sub.took(&m);
    a.output("j", Stream::Stdout, &line, true).await;
    assert_eq!(a.count.load(Ordering::Relaxed), 1);
    a.output("j", Stream::Stdout, &line, true).await;
    assert_eq!(a.count.load(Ordering::Relaxed), 0, "over the byte bound");
}

#[tokio::test]
async fn a_client_that_falls_behind_is_detached_and_others_are_not() {
    let a = Arc::new(Attachments::default());
    let mut slow = a.subscribe("j", false, None).unwrap();
    let mut fast = a.subscribe("j", false, None).unwrap();
    assert!(
        a.subscribe("j", true, None).is_err(),
        "exclusive refuses a second"
    );
    for i in 0..QUEUE {
        a.output("j", Stream::Stdout, format!("{i}").as_bytes(), true)
            .await;
        // The fast client keeps up.
        assert!(matches!(fast.rx.recv().await, Some(Msg::Output(..))));
    }
    assert_eq!(a.count.load(Ordering::Relaxed), 2);
    a.output("j", Stream::Stdout, b"one too many", true).await;
    assert_eq!(a.count.load(Ordering::Relaxed), 1, "the slow one is gone");
    let mut n = 0;
    while let Some(m) = slow.rx.recv().await {
        assert!(matches!(m, Msg::Output(..)));
        n += 1;
    }
    assert_eq!(
        n, QUEUE,
        "it keeps what was queued, then sees the channel closed"
    );
    assert!(matches!(fast.rx.recv().await, Some(Msg::Output(..))));
    // The end always fits: a client with a full queue (one line short of being
    // detached) still gets it.
    let mut full = a.subscribe("j", false, None).unwrap();
    for i in 0..QUEUE {
        a.output("j", Stream::Stderr, format!("{i}").as_bytes(), true)
            .await;
        assert!(matches!(fast.rx.recv().await, Some(Msg::Output(..))));
    }
    assert_eq!(a.count.load(Ordering::Relaxed), 2, "full, not detached");
    let mut job = ActiveJob::default();
    job.job.id = "j".into();
    a.ended(&job);
    assert!(matches!(fast.rx.recv().await, Some(Msg::Ended(_))));
    for _ in 0..QUEUE {
        assert!(matches!(full.rx.recv().await, Some(Msg::Output(_, l)) if l.ends_with(b"\n")));
    }
    assert!(matches!(full.rx.recv().await, Some(Msg::Ended(_))));
    drop(full);
    assert_eq!(a.count.load(Ordering::Relaxed), 0);
    drop(fast);
    drop(slow);
    assert_eq!(a.count.load(Ordering::Relaxed), 0);
    assert!(a.lock().jobs.is_empty());
}

/// Pipe output goes to clients as the job wrote it: a `\n` only where the job wrote
/// one, and bytes without one as they are (finding: `printf abc` arrived as `abc\n`).
#[tokio::test]
async fn output_gets_a_newline_only_where_the_job_wrote_one() {
    let a = Arc::new(Attachments::default());
    let mut sub = a.subscribe("j", false, None).unwrap();
    a.output("j", Stream::Stdout, b"Password: ", false).await;
    a.output("j", Stream::Stderr, b"line", true).await;
    a.output("j", Stream::Stdout, b"", true).await;
    // Nothing at all is not sent (an empty data frame would be the stream's EOF).
    a.output("j", Stream::Stdout, b"", false).await;
    a.terminal("j", b"").await;
    a.output("j", Stream::Stdout, b"abc", false).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        match sub.rx.recv().await {
            Some(Msg::Output(s, d)) => got.push((s, d)),
            m => panic!("{m:?}"),
        }
    }
    assert_eq!(
        got,
        vec![
            (Stream::Stdout, b"Password: ".to_vec()),
            (Stream::Stderr, b"line\n".to_vec()),
            (Stream::Stdout, b"\n".to_vec()),
            (Stream::Stdout, b"abc".to_vec()),
        ]
    );
    assert!(sub.rx.try_recv().is_err());
}

fn created(a: &Attachments, id: &str, stdin: bool, disable_log: bool) {
    let mut job = ActiveJob::default();
    job.job.id = id.into();
    job.job.config.stdin = stdin;
    job.job.config.disable_log = disable_log;
    a.created(&job);
}

/// Clients attached before their job exists are attached when it is created, and get
/// its output from the start; what the job cannot give them is refused then.
#[tokio::test]
async fn clients_waiting_for_a_job_are_attached_or_refused_when_it_is_created() {
    use attach::{STDIN, STDOUT, STREAM};
    let a = Arc::new(Attachments::default());
    let mut plain = a
        .subscribe_pending("j", STDOUT | STREAM, None, None)
        .unwrap();
    let mut stdin = a
        .subscribe_pending("j", STDOUT | STDIN | STREAM, None, None)
        .unwrap();
    assert!(plain.pending && stdin.pending);
    assert_eq!(a.pending.load(Ordering::Relaxed), 2);
    // Nothing for the job reaches them before it is created.
    created(&a, "j", false, false);
    assert!(matches!(plain.rx.recv().await, Some(Msg::Created)));
    match stdin.rx.recv().await {
        Some(Msg::Refused(why)) => assert!(why.contains("stdin"), "{why}"),
        m => panic!("{m:?}"),
    }
    assert!(stdin.rx.recv().await.is_none(), "detached");
    assert_eq!(a.pending.load(Ordering::Relaxed), 0);
    assert_eq!(a.count.load(Ordering::Relaxed), 1);
    a.started("j").await;
    a.output("j", Stream::Stdout, b"hi", true).await;
    assert!(matches!(plain.rx.recv().await, Some(Msg::Started)));
    assert!(matches!(plain.rx.recv().await, Some(Msg::Output(_, d)) if d == b"hi\n"));
    assert!(!plain.blocking());

    // A `disable_log` job: the first client waiting is its one client (whose output
    // waits for it), a second is refused.
    let mut first = a
        .subscribe_pending("q", STDOUT | STREAM, None, None)
        .unwrap();
    let mut second = a
        .subscribe_pending("q", STDOUT | STREAM, None, None)
        .unwrap();
    created(&a, "q", false, true);
    assert!(matches!(first.rx.recv().await, Some(Msg::Created)));
    assert!(first.blocking());
    match second.rx.recv().await {
        Some(Msg::Refused(why)) => assert_eq!(why, "host: job is attached"),
        m => panic!("{m:?}"),
    }
    // It stays the job's one client.
    assert!(a.subscribe("q", true, None).is_err());

    // One whose job is never created expires (once: a later expiry finds nothing).
    let late = a
        .subscribe_pending("never", STDOUT | STREAM, None, None)
        .unwrap();
    assert_eq!(a.pending.load(Ordering::Relaxed), 1);
    assert!(a.expire("never", late.token));
    assert!(!a.expire("never", late.token));
    assert_eq!(a.pending.load(Ordering::Relaxed), 0);
    // One whose job was created just before its expiry stays.
    let just = a
        .subscribe_pending("just", STDOUT | STREAM, None, None)
        .unwrap();
    created(&a, "just", false, false);
    assert!(!a.expire("just", just.token));
    // One that leaves while it waits frees its place.
    let left = a
        .subscribe_pending("left", STDOUT | STREAM, None, None)
        .unwrap();
    assert_eq!(a.pending.load(Ordering::Relaxed), 1);
    drop(left);
    assert_eq!(a.pending.load(Ordering::Relaxed), 0);
    // So does one whose job ended before it was shown as created.
    let mut ends = a
        .subscribe_pending("ends", STDOUT | STREAM, None, None)
        .unwrap();
    let mut job = ActiveJob::default();
    job.job.id = "ends".into();
    a.ended(&job);
    assert!(matches!(ends.rx.recv().await, Some(Msg::Ended(_))));
    assert_eq!(a.pending.load(Ordering::Relaxed), 0);
}

/// The clients waiting for jobs not created yet are bounded over all jobs.
#[test]
fn waiting_clients_are_bounded() {
    let flags = attach::STDOUT | attach::STREAM;
    let a = Arc::new(Attachments::default());
    // From as many addresses as it takes (each has a share of the places).
    let from = |i: usize| Some(IpAddr::from([10, 0, 0, (i / MAX_PENDING_PER_SOURCE) as u8]));
    let mut subs: Vec<Subscription> = (0..MAX_PENDING)
        .map(|i| {
            a.subscribe_pending(&format!("j{i}"), flags, None, from(i))
                .unwrap()
        })
        .collect();
    let e = a
        .subscribe_pending("x", flags, None, Some(IpAddr::from([10, 0, 1, 1])))
        .err()
        .expect("one too many");
    assert_eq!(e.status(), 429, "{e:?}");
    assert!(e.retry);
    // Attaching to jobs that exist is not affected.
    let _known = a.subscribe("k", false, None).unwrap();
    subs.pop();
    subs.push(
        a.subscribe_pending("x", flags, None, Some(IpAddr::from([10, 0, 1, 1])))
            .unwrap(),
    );
}

/// One address has a share of the waiting places: a client's retry loop filling them
/// used to refuse every other caller's attach before its job's creation (the
/// controller's) with a 429. Its places come back as its clients stop waiting (they
/// leave, their jobs are created, or end).
#[tokio::test]
async fn waiting_clients_are_bounded_per_address() {
    let flags = attach::STDOUT | attach::STREAM;
    let a = Arc::new(Attachments::default());
    let busy = Some(IpAddr::from([192, 0, 2, 1]));
    let other = Some(IpAddr::from([192, 0, 2, 2]));
    let mut subs: Vec<Subscription> = (0..MAX_PENDING_PER_SOURCE)
        .map(|i| {
            a.subscribe_pending(&format!("j{i}"), flags, None, busy)
                .unwrap()
        })
        .collect();
    let e = a
        .subscribe_pending("x", flags, None, busy)
        .err()
        .expect("one too many from that address");
    assert_eq!(e.status(), 429, "{e:?}");
    assert!(e.retry);
    assert!(e.message.contains("from this address"), "{}", e.message);
    // Another address still gets in.
    let _ok = a.subscribe_pending("y", flags, None, other).unwrap();
    // A client that leaves, one whose job is created and one whose job ended each give
    // a place back.
    drop(subs.pop());
    let left = a.subscribe_pending("x", flags, None, busy).unwrap();
    assert!(a.subscribe_pending("x2", flags, None, busy).is_err());
    created(&a, "j0", false, false);
    let mut created_sub = subs.remove(0);
    assert!(matches!(created_sub.rx.recv().await, Some(Msg::Created)));
    let _second = a.subscribe_pending("x2", flags, None, busy).unwrap();
    assert!(a.subscribe_pending("x3", flags, None, busy).is_err());
    let mut job = ActiveJob::default();
    job.job.id = "j1".into();
    a.ended(&job);
    let _third = a.subscribe_pending("x3", flags, None, busy).unwrap();
    assert!(a.subscribe_pending("x4", flags, None, busy).is_err());
    drop((left, subs));
    let st = a.lock();
    assert_eq!(st.waiting_from.get(&busy), Some(&2));
    assert_eq!(st.waiting_from.get(&other), Some(&1));
}

/// Once the job is asked to stop, its one client no longer holds its output up: the
/// output waiting for room goes on (the client, full, is detached as any other), so the
/// job's end is not held up by a client that stopped reading. A client attaching to it
/// after that does not hold it up either; a later job of the same id is not affected.
#[tokio::test]
async fn a_stop_ends_the_wait_for_the_one_client() {
    let a = Arc::new(Attachments::default());
    let mut sub = a.subscribe("j", true, None).unwrap();
    for i in 0..QUEUE {
        a.output("j", Stream::Stdout, format!("{i}").as_bytes(), true)
            .await;
    }
    let sender = {
        let a = a.clone();
        tokio::spawn(async move { a.output("j", Stream::Stdout, b"more", true).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!sender.is_finished(), "it waits for the client");
    a.unblock("j");
    tokio::time::timeout(Duration::from_secs(5), sender)
        .await
        .expect("no longer held up once the job is being stopped")
        .unwrap();
    assert!(!sub.blocking());
    assert_eq!(a.count.load(Ordering::Relaxed), 0, "full: detached");
    let mut n = 0;
    while let Some(m) = sub.rx.recv().await {
        assert!(matches!(m, Msg::Output(..)));
        n += 1;
    }
    assert_eq!(n, QUEUE, "it keeps what was queued");
    drop(sub);
    // A client attaching while the job is being stopped does not block it.
    let late = a.subscribe("j", true, None).unwrap();
    assert!(!late.blocking());
    drop(late);
    let waiting = a
        .subscribe_pending("j", attach::STDOUT | attach::STREAM, None, None)
        .unwrap();
    created(&a, "j", false, true);
    assert!(!waiting.blocking());
    drop(waiting);
    let mut job = ActiveJob::default();
    job.job.id = "j".into();
    a.ended(&job);
    assert!(a.subscribe("j", true, None).unwrap().blocking());
}

/// The one client of a `disable_log` job is never detached for being slow: its job's
/// output waits for room in its queue (and goes on without it once it leaves).
#[tokio::test]
async fn the_one_client_of_a_job_without_log_holds_its_output_up() {
    let a = Arc::new(Attachments::default());
    let mut sub = a.subscribe("j", true, None).unwrap();
    assert!(sub.blocking());
    let piece = vec![b'x'; 64 * 1024 - 1];
    let fit = QUEUE_BYTES / (64 * 1024);
    for _ in 0..fit {
        a.output("j", Stream::Stdout, &piece, true).await;
    }
    // One more waits for room instead of detaching the client.
    let sender = {
        let a = a.clone();
        let piece = piece.clone();
        tokio::spawn(async move { a.output("j", Stream::Stdout, &piece, true).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!sender.is_finished(), "it waits for the client");
    assert_eq!(a.count.load(Ordering::Relaxed), 1, "still attached");
    let m = sub.rx.recv().await;
    sub.took(&m);
    tokio::time::timeout(Duration::from_secs(5), sender)
        .await
        .expect("sent once there was room")
        .unwrap();
    let mut n = 1;
    while let Ok(m) = sub.rx.try_recv() {
        assert!(matches!(&m, Msg::Output(_, d) if d.len() == 64 * 1024));
        sub.took(&Some(m));
        n += 1;
    }
    assert_eq!(n, fit + 1, "nothing lost");
    // Counted in pieces too: a full queue of small pieces waits as well.
    for i in 0..QUEUE {
        a.output("j", Stream::Stdout, format!("{i}").as_bytes(), true)
            .await;
    }
    let sender = {
        let a = a.clone();
        tokio::spawn(async move { a.output("j", Stream::Stdout, b"more", true).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!sender.is_finished());
    // The client leaves: the output goes on without it.
    drop(sub);
    tokio::time::timeout(Duration::from_secs(5), sender)
        .await
        .expect("not held once the client left")
        .unwrap();
    assert_eq!(a.count.load(Ordering::Relaxed), 0);
}
