//! `POST /attach` (spec §5.5) against the daemon with `--runtime process`.

use std::time::Duration;

use flynn_client::host::attach::{STDERR, STDIN, STDOUT, STREAM};
use flynn_client::host::{AttachRequest, Attached, Client, Frame};

use crate::support::*;

const PROC: &[&str] = &["--runtime", "process"];

fn req(id: &str, flags: u32) -> AttachRequest {
    AttachRequest {
        job_id: id.to_string(),
        flags,
        ..AttachRequest::default()
    }
}

/// What an attached client saw, frame by frame, until the host closed the connection.
#[derive(Debug, Default)]
struct Seen {
    /// `Waiting` / `Success` / `Error` frames, in order.
    status: Vec<Frame>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// Streams whose EOF frame arrived.
    eof: Vec<u8>,
    exit: Option<u32>,
}

impl Seen {
    /// Takes one frame into account; false once the connection ended.
    fn take(&mut self, f: Option<Frame>) -> bool {
        let Some(f) = f else { return false };
        assert!(self.exit.is_none(), "{f:?} after the exit frame");
        match f {
            Frame::Data { stream, data } if data.is_empty() => self.eof.push(stream),
            Frame::Data { stream, data } => {
                assert!(!self.eof.contains(&stream), "data after EOF on {stream}");
                match stream {
                    1 => self.stdout.extend_from_slice(&data),
                    2 => self.stderr.extend_from_slice(&data),
                    s => panic!("stream {s}"),
                }
            }
            Frame::Exit(s) => self.exit = Some(s),
            other => self.status.push(other),
        }
        true
    }

    /// The opening is `Success`, or `Waiting` then `Success`.
    fn attached(&self) -> bool {
        matches!(
            &self.status[..],
            [Frame::Success] | [Frame::Waiting, Frame::Success]
        )
    }
}

async fn next(a: &mut Attached) -> Option<Frame> {
    tokio::time::timeout(Duration::from_secs(10), a.next())
        .await
        .expect("a frame within 10 s")
        .expect("a well-formed frame")
}

/// Adds a process job running `script` and attaches to it at once with `flags`.
async fn run_attached(c: &Client, id: &str, script: &str, flags: u32) -> Attached {
    c.add_job(&sh_job(id, script)).await.unwrap();
    c.attach(&req(id, flags)).await.unwrap()
}

/// Attaches to `disable_log` job `id` (stdout), trying again for up to 5 s while it is
/// still held by a client the host has not yet seen leave (409).
async fn attach_once_free(c: &Client, id: &str) -> Option<Attached> {
    for _ in 0..50 {
        match c.attach(&req(id, STDOUT | STREAM)).await {
            Ok(a) => return Some(a),
            Err(e) if e.api().is_some_and(|e| e.status() == 409) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    None
}

async fn read_all(a: &mut Attached) -> Seen {
    let mut seen = Seen::default();
    while seen.take(next(a).await) {}
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_streams_output_and_the_exit_status() {
    let h = Host::start(PROC);
    let c = &h.client;

    // The job waits before writing, so the attach (right after the PUT) sees all of it.
    let id = h.job_id("att");
    let script = "sleep 0.5; echo out1; echo err1 >&2; printf 'no newline'; exit 3";
    let mut a = run_attached(c, &id, script, STDOUT | STDERR | STREAM).await;
    let seen = read_all(&mut a).await;
    assert!(seen.attached(), "{seen:?}");
    assert_eq!(String::from_utf8_lossy(&seen.stdout), "out1\nno newline\n");
    assert_eq!(String::from_utf8_lossy(&seen.stderr), "err1\n");
    assert_eq!(seen.eof, [1, 2]);
    assert_eq!(seen.exit, Some(3));

    // Attaching to a job that already ended: attached, no output, the exit status.
    let mut a = c.attach(&req(&id, STDOUT | STREAM)).await.unwrap();
    let seen = read_all(&mut a).await;
    assert_eq!(seen.status, [Frame::Success]);
    assert!(seen.stdout.is_empty() && seen.stderr.is_empty(), "{seen:?}");
    assert_eq!((seen.eof, seen.exit), (vec![1], Some(3)));

    // Only the streams asked for.
    let id = h.job_id("erronly");
    let script = "sleep 0.5; echo out; echo err >&2";
    let mut a = run_attached(c, &id, script, STDERR | STREAM).await;
    let seen = read_all(&mut a).await;
    assert!(seen.attached(), "{seen:?}");
    assert!(seen.stdout.is_empty(), "{seen:?}");
    assert_eq!(String::from_utf8_lossy(&seen.stderr), "err\n");
    assert_eq!((seen.eof, seen.exit), (vec![2], Some(0)));

    // A job that cannot start: the reason as an error frame.
    let id = h.job_id("noexec");
    let mut job = sh_job(&id, "");
    job.config.args = vec!["/nonexistent/binary".into()];
    c.add_job(&job).await.unwrap();
    let mut a = c.attach(&req(&id, STDOUT | STREAM)).await.unwrap();
    let seen = read_all(&mut a).await;
    match seen.status.last() {
        Some(Frame::Error(msg)) => assert!(msg.contains("/nonexistent/binary"), "{msg}"),
        other => panic!("{other:?} in {seen:?}"),
    }
    // The opening is `0` (success) or `2` (error), never both.
    assert!(!seen.status.contains(&Frame::Success), "{seen:?}");
    assert_eq!(seen.exit, None);
}

/// Adds a process job with stdin running `script`.
async fn add_stdin_job(c: &Client, id: &str, script: &str) {
    let mut job = sh_job(id, script);
    job.config.stdin = true;
    c.add_job(&job).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_writes_stdin_and_closes_it() {
    let h = Host::start(PROC);
    let c = &h.client;

    // Input from two clients in turn: the first leaves without closing stdin, so the job
    // still reads the second's; the second's empty frame ends it.
    let id = h.job_id("cat");
    add_stdin_job(c, &id, "cat; echo done").await;
    let mut first = c.attach(&req(&id, STDOUT | STDIN | STREAM)).await.unwrap();
    let mut seen = Seen::default();
    let mut input = first.take_input().unwrap();
    input.stdin(b"one\n").await.unwrap();
    while !seen.stdout.ends_with(b"one\n") {
        assert!(seen.take(next(&mut first).await), "ended early: {seen:?}");
    }
    assert!(seen.attached(), "{seen:?}");
    assert!(
        first.send(&Frame::Signal(1)).await.is_err(),
        "the input side was taken"
    );
    drop((first, input));
    let mut second = c.attach(&req(&id, STDOUT | STDIN | STREAM)).await.unwrap();
    second
        .send(&Frame::Data {
            stream: 0,
            data: b"two\nthree".to_vec(),
        })
        .await
        .unwrap();
    second
        .send(&Frame::Data {
            stream: 0,
            data: Vec::new(),
        })
        .await
        .unwrap();
    let seen = read_all(&mut second).await;
    assert_eq!(seen.status, [Frame::Success], "{seen:?}");
    // `three` had no newline: `cat` ended with it, then `echo` wrote on the same line.
    assert_eq!(String::from_utf8_lossy(&seen.stdout), "two\nthreedone\n");
    assert_eq!(seen.exit, Some(0));

    // A job that does not read yet holds the client's input back, and its output still
    // reaches the client meanwhile; nothing is lost once it reads.
    let id = h.job_id("slow");
    // (It waits before writing, so the attach right after the PUT sees all of it.)
    add_stdin_job(c, &id, "sleep 0.5; echo ready; sleep 1; wc -c | tr -d ' '").await;
    let mut a = c.attach(&req(&id, STDOUT | STDIN | STREAM)).await.unwrap();
    let mut input = a.take_input().unwrap();
    const LEN: usize = 32 << 20;
    let writer = tokio::spawn(async move {
        let data = vec![b'x'; LEN];
        input.stdin(&data).await.unwrap();
        input.stdin(b"tail").await.unwrap();
        input.close_stdin().await.unwrap();
        std::time::Instant::now()
    });
    let mut seen = Seen::default();
    while !seen.stdout.ends_with(b"ready\n") {
        assert!(seen.take(next(&mut a).await), "ended early: {seen:?}");
    }
    let ready = std::time::Instant::now();
    while seen.take(next(&mut a).await) {}
    let sent = writer.await.unwrap();
    assert!(
        ready < sent,
        "the job's output came while its input was held back"
    );
    assert_eq!(
        String::from_utf8_lossy(&seen.stdout),
        format!("ready\n{}\n", LEN + 4)
    );
    assert_eq!(seen.exit, Some(0));

    // Input after the close, and input to a job that has ended, are discarded.
    let id = h.job_id("closed");
    add_stdin_job(c, &id, "cat; sleep 0.3; echo done").await;
    let mut a = c.attach(&req(&id, STDOUT | STDIN | STREAM)).await.unwrap();
    let mut input = a.take_input().unwrap();
    input.stdin(b"a\n").await.unwrap();
    input.close_stdin().await.unwrap();
    input.stdin(b"late\n").await.unwrap();
    let seen = read_all(&mut a).await;
    assert_eq!(String::from_utf8_lossy(&seen.stdout), "a\ndone\n");
    assert_eq!(seen.exit, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_its_input_waits_is_detached() {
    let h = Host::start(PROC);
    let c = &h.client;
    // A job whose output goes nowhere else (one client at a time) and that never reads.
    let id = h.job_id("deaf");
    let mut job = sh_job(&id, "exec sleep 30");
    job.config.stdin = true;
    job.config.disable_log = true;
    c.add_job(&job).await.unwrap();
    wait_running(c, &id).await;
    let mut a = c.attach(&req(&id, STDOUT | STDIN | STREAM)).await.unwrap();
    assert_eq!(next(&mut a).await, Some(Frame::Success));
    let mut input = a.take_input().unwrap();
    // Six 1 MiB frames: the pipe takes 64 KiB of the first, the job's queue the next four,
    // the sixth waits in the host for room. (Input beyond what the host reads ahead would
    // sit in TCP buffers in front of the client's close, which the host sees once the job
    // reads that input.)
    input.stdin(&vec![b'x'; 6 << 20]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The client goes away with its input still waiting.
    drop((a, input));
    // The host notices, so the job takes another client.
    let mut again = attach_once_free(c, &id)
        .await
        .expect("the job is still held by the client that left");
    assert_eq!(next(&mut again).await, Some(Frame::Success));
    c.stop_job(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_forwards_signals_and_reports_a_stop() {
    let h = Host::start(PROC);
    let c = &h.client;

    let id = h.job_id("trap");
    let script =
        "trap 'echo got; exit 7' USR1; sleep 0.5; echo ready; while true; do sleep 0.05; done";
    let mut a = run_attached(c, &id, script, STDOUT | STREAM).await;
    let mut seen = Seen::default();
    while !seen.stdout.ends_with(b"ready\n") {
        assert!(seen.take(next(&mut a).await), "ended early: {seen:?}");
    }
    // A resize is ignored (no TTY); the signal reaches the job's trap.
    a.send(&Frame::Resize {
        height: 20,
        width: 10,
    })
    .await
    .unwrap();
    a.send(&Frame::Signal(10)).await.unwrap();
    while seen.take(next(&mut a).await) {}
    assert!(seen.attached(), "{seen:?}");
    assert_eq!(String::from_utf8_lossy(&seen.stdout), "ready\ngot\n");
    assert_eq!(seen.exit, Some(7));

    // Stopped through the API while attached: 128 + SIGTERM.
    let id = h.job_id("stopped");
    c.add_job(&sh_job(&id, "exec sleep 30")).await.unwrap();
    wait_running(c, &id).await;
    let mut a = c.attach(&req(&id, STDOUT | STREAM)).await.unwrap();
    assert_eq!(next(&mut a).await, Some(Frame::Success));
    c.stop_job(&id).await.unwrap();
    let seen = read_all(&mut a).await;
    assert_eq!(seen.exit, Some(128 + 15), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_refusals_are_json_errors() {
    let h = Host::start(PROC);
    let c = &h.client;

    let e = c
        .attach(&req(&h.job_id("nope"), STDOUT | STREAM))
        .await
        .err()
        .expect("unknown job refused");
    let e = e.api().expect("the JSON envelope");
    assert_eq!((e.status(), e.message.as_str()), (404, "host: unknown job"));

    // A job whose output goes nowhere else takes one client at a time.
    let id = h.job_id("quiet");
    let mut job = sh_job(&id, "exec sleep 30");
    job.config.disable_log = true;
    c.add_job(&job).await.unwrap();
    wait_running(c, &id).await;
    let mut first = c.attach(&req(&id, STDOUT | STREAM)).await.unwrap();
    assert_eq!(next(&mut first).await, Some(Frame::Success));
    let e = c.attach(&req(&id, STDOUT | STREAM)).await.err().unwrap();
    let e = e.api().expect("the JSON envelope");
    assert_eq!(
        (e.status(), e.message.as_str()),
        (409, "host: job is attached")
    );
    // Once the first leaves (the host notices its connection close), another may attach.
    drop(first);
    let mut second = attach_once_free(c, &id)
        .await
        .expect("a second client after the first left");
    assert_eq!(next(&mut second).await, Some(Frame::Success));

    // Flags this host cannot serve (stdin: the job was created without it).
    for (flags, says) in [
        (STDOUT | STREAM | STDIN, "stdin"),
        (STDOUT | STREAM | 8, "logs"),
        (STDOUT, "stream"),
    ] {
        let e = c.attach(&req(&id, flags)).await.err().unwrap();
        let e = e.api().expect("the JSON envelope");
        assert_eq!(e.status(), 400, "{flags}");
        assert!(e.message.contains(says), "{flags}: {}", e.message);
    }

    // Stdin data from a client is not accepted (it was not asked for, and cannot be):
    // the host closes the connection, which the client reports as an error, not an end.
    let talk = h.job_id("talk");
    c.add_job(&sh_job(&talk, "exec sleep 30")).await.unwrap();
    wait_running(c, &talk).await;
    let mut a = c.attach(&req(&talk, STDOUT | STREAM)).await.unwrap();
    assert_eq!(next(&mut a).await, Some(Frame::Success));
    a.send(&Frame::Data {
        stream: 0,
        data: b"input".to_vec(),
    })
    .await
    .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), a.next())
        .await
        .expect("closed within 10 s");
    assert!(
        matches!(&end, Err(e) if e.to_string().contains("before the exit status")),
        "{end:?}"
    );

    // Half a window size is no size (as a resize frame with a 0 in it; spec §5.5 asks for
    // neither): not refused, for any job (a TTY job's terminal keeps the size it has).
    for (height, width) in [(20, 0), (0, 10)] {
        let mut a = c
            .attach(&AttachRequest {
                job_id: talk.clone(),
                flags: STDOUT | STREAM,
                height,
                width,
            })
            .await
            .unwrap_or_else(|e| panic!("{height}x{width}: {e}"));
        assert_eq!(next(&mut a).await, Some(Frame::Success), "{height}x{width}");
    }
    c.stop_job(&talk).await.unwrap();

    // A terminal is refused when the job is added: the process runtime has none (the
    // container runtime's are in `containers::tty`).
    let mut job = sh_job(&h.job_id("tty"), "true");
    job.config.tty = true;
    let e = c.add_job(&job).await.expect_err("tty refused");
    let e = e.api().expect("the JSON envelope");
    assert_eq!(e.status(), 400);
    assert!(e.message.contains("not supported"), "{}", e.message);
    assert_eq!(
        e.detail,
        Some(serde_json::json!({"field": "config.tty"})),
        "{e:?}"
    );

    // Without the upgrade.
    let a = h.addr.as_str();
    let (st, body) = http(
        a,
        "POST",
        "/attach",
        "application/json",
        r#"{"job_id":"x"}"#,
    );
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("flynn-attach/0"), "{body}");
    c.stop_job(&id).await.unwrap();
}

/// API connections (attach's among them) have TCP keepalive, so a client whose machine went
/// away without closing its connection does not keep its place among a job's attach
/// clients (64 of them would shut the job's attach out) for ever. The kernel's view of the
/// daemon's end of a connection (`ss`) shows the keepalive timer, which only a socket with
/// `SO_KEEPALIVE` has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_connections_have_tcp_keepalive() {
    let h = Host::start(PROC);
    let id = h.job_id("ka");
    let mut a = run_attached(&h.client, &id, "sleep 30", STDOUT | STREAM).await;
    let port = h.addr.rsplit(':').next().unwrap().to_string();
    let filter = format!("( sport = :{port} )");
    // A connection with data in flight shows its retransmission timer instead: looked at
    // again until none has.
    let mut conns = Vec::new();
    let mut quiet = false;
    for _ in 0..100 {
        let out = std::process::Command::new("ss")
            .args(["-tnoH", "state", "established", &filter])
            .output()
            .expect("ss (iproute2)");
        conns = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        if !conns.iter().any(|c| c.contains("timer:(on")) {
            quiet = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!conns.is_empty(), "no API connection seen by ss");
    assert!(
        quiet,
        "the API connections never went quiet: a retransmission timer in each of 100 looks \
         over 5 s, so their keepalive timers could not be seen:\n{}",
        conns.join("\n")
    );
    for c in &conns {
        assert!(c.contains("timer:(keepalive"), "no keepalive: {c}");
    }
    h.client.stop_job(&id).await.unwrap();
    while next(&mut a).await.is_some() {}
}
