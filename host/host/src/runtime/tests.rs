//! Unit tests of the process runtime's output readers and their drain after a job's exit, and of
//! [`Described`](super::Described).

use super::*;

/// A pipe's bytes come out as written: lines with `newline`, and what follows the last
/// newline of a read at once, as a piece without one (no newline is added, none lost).
#[tokio::test]
async fn pipe_output_keeps_the_bytes_and_says_where_newlines_were() {
    let (mut w, r) = tokio::io::duplex(1 << 20);
    let (tx, mut rx) = mpsc::channel(1024);
    let reader = tokio::spawn(read_output(r, Stream::Stderr, tx, Arc::default()));
    w.write_all(b"Password: ").await.unwrap();
    // The prompt arrives without its newline, before any more is written.
    let ev = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
        .await
        .expect("the prompt at once");
    assert_eq!(
        ev,
        Some(ProcEvent::Output {
            stream: Stream::Stderr,
            line: b"Password: ".to_vec(),
            newline: false,
        })
    );
    let mut written = b"Password: ".to_vec();
    for chunk in [&b"secret\nnext\n\n"[..], &[b'x'; 200_000], b"\ntail"] {
        w.write_all(chunk).await.unwrap();
        written.extend_from_slice(chunk);
    }
    drop(w);
    reader.await.unwrap();
    let mut got = b"Password: ".to_vec();
    while let Some(ev) = rx.recv().await {
        let ProcEvent::Output {
            stream: Stream::Stderr,
            line,
            newline,
        } = ev
        else {
            panic!("{ev:?}")
        };
        assert!(line.len() <= flynn_container::MAX_LINE);
        got.extend_from_slice(&line);
        if newline {
            got.push(b'\n');
        }
    }
    assert_eq!(got, written);
}

/// A job that ends while the daemon is behind (its events fill the queue: the one
/// client of a `disable_log` job pausing) loses none of its output: the readers waiting
/// for room are not taken for ones kept waiting by a leftover child (they were aborted
/// a second after the job's exit, and the rest of the output was lost).
#[tokio::test]
async fn output_queued_behind_a_slow_daemon_outlives_the_jobs_exit() {
    let launch = Launch {
        id: "j".into(),
        args: vec![
            "/bin/sh".into(),
            "-c".into(),
            "i=0; while [ $i -lt 500 ]; do echo line$i; i=$((i+1)); done".into(),
        ],
        ..Launch::default()
    };
    let mut h = ProcessRuntime.spawn(launch).unwrap();
    // The job writes it all into the pipe and exits; the daemon takes nothing for 3 s.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mut lines = Vec::new();
    let end = loop {
        let ev = tokio::time::timeout(std::time::Duration::from_secs(10), h.events.recv())
            .await
            .expect("an event within 10 s");
        match ev {
            Some(ProcEvent::Started { .. }) => {}
            Some(ProcEvent::Output { line, newline, .. }) => {
                assert!(newline);
                lines.push(String::from_utf8(line).unwrap());
            }
            other => break other,
        }
    };
    assert!(
        matches!(end, Some(ProcEvent::Exited { code: 0, .. })),
        "{end:?}"
    );
    let want: Vec<String> = (0..500).map(|i| format!("line{i}")).collect();
    assert_eq!(lines.len(), 500, "lines lost");
    assert_eq!(lines, want);
}

/// A job that exits leaving a child writing on into its output pipe gets its `Exited`
/// shortly after [`DRAIN`] (the readers are let go while the daemon keeps up): it used to
/// wait for as long as the child wrote, for ever for one a stop does not reach. The child
/// writes slowly: the queue always has room, and its readers are let go after the drain
/// whatever the machine's load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_left_writing_does_not_hold_up_the_jobs_exit() {
    /// Kills what the job left (its process group) however the test ends.
    struct KillGroup(u32);
    impl Drop for KillGroup {
        fn drop(&mut self) {
            if self.0 != 0 {
                let _ = send_signal_group(self.0, 9);
            }
        }
    }
    let launch = Launch {
        id: "j".into(),
        args: vec![
            "/bin/sh".into(),
            "-c".into(),
            "(while :; do echo y; sleep 0.05; done) & exit 0".into(),
        ],
        ..Launch::default()
    };
    let limit = DRAIN + std::time::Duration::from_secs(6);
    let t0 = std::time::Instant::now();
    let mut h = ProcessRuntime.spawn(launch).unwrap();
    let mut guard = KillGroup(0);
    let end = loop {
        let ev = tokio::time::timeout(std::time::Duration::from_secs(20), h.events.recv())
            .await
            .expect("an event within 20 s");
        match ev {
            Some(ProcEvent::Started { pid }) => guard.0 = pid,
            Some(ProcEvent::Output { .. }) => {
                assert!(
                    t0.elapsed() < limit,
                    "still output, no exit, after {:?}",
                    t0.elapsed()
                );
            }
            other => break other,
        }
    };
    assert!(
        matches!(end, Some(ProcEvent::Exited { code: 0, .. })),
        "{end:?}"
    );
    assert!(t0.elapsed() < limit, "exit after {:?}", t0.elapsed());
}

/// A reader of `n` events, one every `every`, counted as [`read_output`] counts them; it
/// holds its sender (as a reader holds a pipe a child of the job keeps open) until
/// aborted once they are sent, or once `stop` is set.
fn fake_reader(
    tx: &mpsc::Sender<ProcEvent>,
    n: usize,
    every: std::time::Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Reader {
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (tx, counter) = (tx.clone(), sent.clone());
    let task = tokio::spawn(async move {
        for i in 0..n {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            tokio::time::sleep(every).await;
            let ev = ProcEvent::Output {
                stream: Stream::Stdout,
                line: i.to_string().into_bytes(),
                newline: true,
            };
            if tx.send(ev).await.is_err() {
                return;
            }
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        std::future::pending::<()>().await;
    });
    Reader { task, sent }
}

/// A reader kept behind a slow daemon (the one client of a `disable_log` job resuming
/// slowly as the job ends, taking two events every 250 ms) is not let go after the
/// drain: the queue, full at the drain's end, has room for a moment (80 ms) each time
/// the daemon takes events, until the reader fills it again, and a reader aborted at a
/// check that saw room lost the rest of the output. It is let go once it sent
/// everything and idles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_behind_a_slow_daemon_is_not_let_go() {
    for output_waits in [true, false] {
        let (tx, mut rx) = mpsc::channel(4);
        let start = tokio::time::Instant::now();
        // The queue is full by then (four events in 320 ms).
        let drain = Drain {
            until: start + std::time::Duration::from_millis(600),
            output_waits,
        };
        let reader = fake_reader(
            &tx,
            16,
            std::time::Duration::from_millis(80),
            Arc::default(),
        );
        let daemon = tokio::spawn(async move {
            let mut got = 0;
            // Past the drain, with the queue full and the reader waiting for room.
            tokio::time::sleep_until(start + std::time::Duration::from_millis(900)).await;
            loop {
                for _ in 0..2 {
                    match rx.recv().await {
                        Some(_) => got += 1,
                        None => return got,
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        });
        drain.run(reader, &tx).await;
        drop(tx);
        let got = daemon.await.unwrap();
        assert_eq!(got, 16, "output_waits: {output_waits}: events lost");
    }
}

/// After the drain, a reader that sends nothing with room in the queue is let go soon
/// (a child of the job holds the pipe open), and so is one sending on with room in the
/// queue (a child of the job writing on), unless the job's output waits for its client:
/// then it is let go once it stops sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_held_by_a_child_are_let_go_after_the_drain() {
    let ms = std::time::Duration::from_millis;
    for output_waits in [true, false] {
        // Idle from the start.
        let (tx, _rx) = mpsc::channel(4);
        let start = tokio::time::Instant::now();
        let drain = Drain {
            until: start + ms(200),
            output_waits,
        };
        drain
            .run(fake_reader(&tx, 0, ms(0), Arc::default()), &tx)
            .await;
        let took = start.elapsed();
        assert!(
            took < ms(200) + ms(2500),
            "output_waits: {output_waits}: {took:?}"
        );

        // Sending on, every 50 ms, with room: the daemon takes everything at once.
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let stop = Arc::<std::sync::atomic::AtomicBool>::default();
        let reader = fake_reader(&tx, usize::MAX, ms(50), stop.clone());
        let start = tokio::time::Instant::now();
        let drain = Drain {
            until: start + ms(200),
            output_waits,
        };
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(ms(2500)).await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        drain.run(reader, &tx).await;
        let took = start.elapsed();
        if output_waits {
            // Kept while it sends, let go a second or so after it stopped.
            assert!(took >= ms(2500), "{took:?}");
            assert!(took < ms(2500) + ms(2500), "{took:?}");
        } else {
            assert!(took < ms(2000), "{took:?}");
        }
        stopper.abort();
    }
}

/// A kept job's host ports are its `PORT` and `PORT_n` (digits after the underscore),
/// and `env` finds a variable by its whole name.
#[test]
fn described_ports_and_env() {
    let d = Described {
        env: [
            "PORT=5000",
            "PORT_1=5001",
            "PORT_0=5000",
            "PORT_X=6000",
            "PORTS=7000",
            "MY_PORT=8000",
            "PORT_2=notaport",
            "PORT_3=70000",
            "FLYNN_APP_ID=app",
            "FLYNN_APP_ID_2=other",
            "EMPTY=",
        ]
        .map(String::from)
        .to_vec(),
        mount_sources: Vec::new(),
        host_network: true,
    };
    assert_eq!(d.ports(), [5000, 5001]);
    assert_eq!(d.env("FLYNN_APP_ID"), Some("app"));
    assert_eq!(d.env("FLYNN_APP"), None);
    assert_eq!(d.env("EMPTY"), None);
}
