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

/// Attaches with `flags` to job `job`, not created yet (the host waits for it, as for
/// Flynn's controller), then adds it: the client gets all its output.
async fn attach_then_add(c: &Client, job: &flynn_client::host::Job, flags: u32) -> Attached {
    let a = c.attach(&req(&job.id, flags)).await.unwrap();
    c.add_job(job).await.unwrap();
    a
}

/// Attaches with `flags` to a process job running `script`, then adds it.
async fn run_attached(c: &Client, id: &str, script: &str, flags: u32) -> Attached {
    attach_then_add(c, &sh_job(id, script), flags).await
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

    // Attached before the job was added, so it sees all of it; bytes as written (no
    // newline added to the last).
    let id = h.job_id("att");
    let script = "echo out1; echo err1 >&2; printf 'no newline'; exit 3";
    let mut a = run_attached(c, &id, script, STDOUT | STDERR | STREAM).await;
    let seen = read_all(&mut a).await;
    assert!(seen.attached(), "{seen:?}");
    assert_eq!(seen.status[0], Frame::Waiting, "{seen:?}");
    assert_eq!(String::from_utf8_lossy(&seen.stdout), "out1\nno newline");
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
    let script = "echo out; echo err >&2";
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
    let mut job = sh_job(&id, "echo ready; sleep 1; wc -c | tr -d ' '");
    job.config.stdin = true;
    let mut a = attach_then_add(c, &job, STDOUT | STDIN | STREAM).await;
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
    let script = "trap 'echo got; exit 7' USR1; echo ready; while true; do sleep 0.05; done";
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

    // An id no job can have is not waited for (one that can is: see
    // `attach_waits_for_a_job_not_created_yet`).
    for bad in ["no such job", "../x", ""] {
        let e = c
            .attach(&req(bad, STDOUT | STREAM))
            .await
            .err()
            .expect("unknown job refused");
        let e = e.api().expect("the JSON envelope");
        assert_eq!(
            (e.status(), e.message.as_str()),
            (404, "host: unknown job"),
            "{bad:?}"
        );
    }

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

/// A process-runtime host with more `args` (the attach time limits, `--attach-wait-ms` and
/// `--attach-write-timeout-ms`, set for the tests of what happens past them).
fn proc_host(args: &[&str]) -> Host {
    let mut all = PROC.to_vec();
    all.extend_from_slice(args);
    Host::start(&all)
}

/// Attach clients get a job's bytes unchanged: no newline added where the job wrote none,
/// none inserted into a long run without newlines (`flynn run ... > file`), and a prompt
/// without a newline as soon as it is written, before the job reads its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_gets_the_bytes_the_job_wrote() {
    let h = Host::start(PROC);
    let c = &h.client;

    let id = h.job_id("abc");
    let mut a = run_attached(c, &id, "printf abc", STDOUT | STREAM).await;
    let seen = read_all(&mut a).await;
    assert!(seen.attached(), "{seen:?}");
    assert_eq!(seen.stdout, b"abc");
    assert_eq!(seen.exit, Some(0));

    let id = h.job_id("long");
    let script = "head -c 200000 /dev/zero | tr '\\0' x; printf y >&2; echo z >&2";
    let mut a = run_attached(c, &id, script, STDOUT | STDERR | STREAM).await;
    let seen = read_all(&mut a).await;
    assert_eq!(seen.stdout.len(), 200_000);
    assert!(
        seen.stdout.iter().all(|&b| b == b'x'),
        "only the job's bytes"
    );
    assert_eq!(seen.stderr, b"yz\n");
    assert_eq!(seen.exit, Some(0));

    // The prompt arrives while the job waits for its answer (no input is sent before).
    let id = h.job_id("prompt");
    let mut job = sh_job(&id, "printf 'Password: '; read x; echo \"got $x\"");
    job.config.stdin = true;
    let mut a = attach_then_add(c, &job, STDOUT | STDIN | STREAM).await;
    let mut seen = Seen::default();
    while seen.stdout != b"Password: " {
        assert!(
            seen.stdout.len() < 10 && seen.take(next(&mut a).await),
            "no prompt: {seen:?}"
        );
    }
    let mut input = a.take_input().unwrap();
    input.stdin(b"s3cret\n").await.unwrap();
    input.close_stdin().await.unwrap();
    while seen.take(next(&mut a).await) {}
    assert_eq!(
        String::from_utf8_lossy(&seen.stdout),
        "Password: got s3cret\n"
    );
    assert_eq!(seen.exit, Some(0));
}

/// A client may attach before its job exists (Flynn's controller attaches, then adds the
/// job): it is told to wait, and gets the job's output from its start. One whose job never
/// comes gets an error frame once it waited long enough; one that asked for what the job
/// cannot give gets an error frame when it is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_waits_for_a_job_not_created_yet() {
    // A wait far longer than any case below takes to create its job (a record's fsync on a
    // loaded machine included); the expiry has a host of its own, below.
    let h = proc_host(&["--attach-wait-ms", "10000"]);
    let c = &h.client;

    // Added a moment after the attach: nothing of its output is missed.
    let id = h.job_id("hi");
    let mut a = c.attach(&req(&id, STDOUT | STREAM)).await.unwrap();
    assert_eq!(next(&mut a).await, Some(Frame::Waiting));
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.add_job(&sh_job(&id, "echo hi")).await.unwrap();
    let seen = read_all(&mut a).await;
    assert_eq!(seen.status, [Frame::Success], "{seen:?}");
    assert_eq!(seen.stdout, b"hi\n");
    assert_eq!(seen.exit, Some(0));

    // A client that sends more than 64 KiB before its job exists is refused at once (its
    // frames are read while it waits, so its leaving is seen; it used to stop being read
    // there, and one that left held its place until the wait was over).
    let id = h.job_id("eager");
    let t0 = std::time::Instant::now();
    let mut a = c.attach(&req(&id, STDOUT | STDIN | STREAM)).await.unwrap();
    assert_eq!(next(&mut a).await, Some(Frame::Waiting));
    let mut input = a.take_input().unwrap();
    let _ = input.stdin(&vec![b'x'; 100 << 10]).await;
    let seen = read_all(&mut a).await;
    match &seen.status[..] {
        [Frame::Error(e)] => assert!(e.contains("before the job was created"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    // Stdin for a job created without it: refused once the job is created; the job runs.
    let id = h.job_id("nostdin");
    let mut a = c.attach(&req(&id, STDOUT | STDIN | STREAM)).await.unwrap();
    c.add_job(&sh_job(&id, "echo ran")).await.unwrap();
    let seen = read_all(&mut a).await;
    match &seen.status[..] {
        [Frame::Waiting, Frame::Error(e)] => assert!(e.contains("stdin"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        wait_ended(c, &id, Duration::from_secs(10))
            .await
            .exit_status,
        Some(0)
    );

    // A `disable_log` job takes one client: a second one waiting is refused.
    let id = h.job_id("one");
    let mut job = sh_job(&id, "echo only");
    job.config.disable_log = true;
    let mut first = c.attach(&req(&id, STDOUT | STREAM)).await.unwrap();
    let mut second = c.attach(&req(&id, STDOUT | STREAM)).await.unwrap();
    c.add_job(&job).await.unwrap();
    let seen = read_all(&mut first).await;
    assert!(seen.attached(), "{seen:?}");
    assert_eq!((seen.stdout, seen.exit), (b"only\n".to_vec(), Some(0)));
    let seen = read_all(&mut second).await;
    assert_eq!(
        seen.status,
        [Frame::Waiting, Frame::Error("host: job is attached".into())]
    );
}

/// A job not created within the wait (here 1 s) gets its waiting client an error frame;
/// the job is still unknown, and may be added and attached to later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_for_a_job_never_created_gets_an_error() {
    let h = proc_host(&["--attach-wait-ms", "1000"]);
    let c = &h.client;
    let id = h.job_id("never");
    let t0 = std::time::Instant::now();
    let mut a = c.attach(&req(&id, STDOUT | STREAM)).await.unwrap();
    let seen = read_all(&mut a).await;
    assert!(t0.elapsed() >= Duration::from_millis(900), "{seen:?}");
    match &seen.status[..] {
        [Frame::Waiting, Frame::Error(e)] => assert!(e.contains("unknown job"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(seen.exit, None);
    assert!(c.get_job(&id).await.is_err(), "the job exists");
    let mut a = attach_then_add(c, &sh_job(&id, "echo late"), STDOUT | STREAM).await;
    let seen = read_all(&mut a).await;
    assert!(seen.attached(), "{seen:?}");
    assert_eq!(seen.stdout, b"late\n");
}

/// A `disable_log` job whose one client stops reading (and stays connected) blocks on its
/// output, but is still stopped by a `DELETE` within its stop timeout, and its end is
/// recorded: the client no longer holds the output up once the job is asked to stop. It
/// used to: the supervisor waited for room in the client's queue, the exit waited behind
/// the output, and the job stayed running (with what it held) for as long as the client
/// did.
async fn a_stalled_client_does_not_hold_up_a_stop(c: &Client, job: flynn_client::host::Job) {
    let id = job.id.clone();
    let timeout = job.config.stop_timeout.expect("a stop timeout");
    let mut a = attach_then_add(c, &job, STDOUT | STREAM).await;
    let mut seen = Seen::default();
    while seen.stdout.len() < 1 << 20 {
        assert!(seen.take(next(&mut a).await), "ended early: {seen:?}");
    }
    // The client stops reading; the job fills what is between and blocks.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let j = c.get_job(&id).await.unwrap();
    assert_eq!(j.status, flynn_client::host::JobStatus::Running, "{j:?}");
    let t0 = std::time::Instant::now();
    c.stop_job(&id).await.unwrap();
    let limit = Duration::from_secs(timeout + 10);
    let j = wait_ended(c, &id, limit).await;
    assert!(j.status.is_terminal(), "{j:?}");
    assert!(
        t0.elapsed() < limit,
        "stopped after {:?} (stop timeout {timeout} s)",
        t0.elapsed()
    );
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_of_a_job_without_log_does_not_hold_up_its_stop() {
    let h = Host::start(PROC);
    let id = h.job_id("stalled");
    // Finite (512 MiB, far more than the test reads): a job left behind by a failed test
    // (its daemon killed) ends, by SIGPIPE or its end, instead of forking for ever.
    let mut job = sh_job(&id, "head -c 536870912 /dev/zero | tr '\\0' x");
    job.config.disable_log = true;
    job.config.stop_timeout = Some(2);
    a_stalled_client_does_not_hold_up_a_stop(&h.client, job).await;
}

/// The one client of a `disable_log` job (its output goes nowhere else) is never dropped
/// for being slow: the job waits for it (as under Flynn), however long it pauses, past the
/// host's queue bounds and its time limit on a frame (here 1 s), and gets every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_of_a_job_without_log_holds_the_job_up() {
    let h = proc_host(&["--attach-write-timeout-ms", "1000"]);
    let c = &h.client;
    const LEN: usize = 24 << 20;
    let id = h.job_id("flood");
    let mut job = sh_job(
        &id,
        &format!("head -c {LEN} /dev/zero | tr '\\0' x; echo done >&2"),
    );
    job.config.disable_log = true;
    let mut a = attach_then_add(c, &job, STDOUT | STDERR | STREAM).await;
    let mut seen = Seen::default();
    while seen.stdout.len() < 1 << 20 {
        assert!(seen.take(next(&mut a).await), "ended early: {seen:?}");
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    // The job waited for the client (what it wrote does not fit in the buffers between).
    let j = c.get_job(&id).await.unwrap();
    assert_eq!(j.status, flynn_client::host::JobStatus::Running, "{j:?}");
    while seen.take(next(&mut a).await) {}
    assert!(seen.attached(), "{:?}", seen.status);
    assert_eq!(seen.stdout.len(), LEN);
    assert!(seen.stdout.iter().all(|&b| b == b'x'));
    assert_eq!(seen.stderr, b"done\n");
    assert_eq!(seen.exit, Some(0));
}

/// The same through the container runtime, whose shim reads the job's pipes (root only,
/// skipped otherwise; in a network namespace of its own, with busybox jobs on the host's
/// network of that namespace).
#[test]
fn a_container_jobs_bytes_reach_the_client_unchanged() {
    use std::process::Command;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    // The busybox layer (as `containers` builds it: under a private name, renamed).
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&dir).unwrap();
    let tar = dir.join("flynn-host-busybox.tar");
    let tmp = dir.join(format!("flynn-host-busybox.{}.a.tar", std::process::id()));
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/build-busybox.sh");
    let out = Command::new("sh").arg(&script).arg(&tmp).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&tmp, &tar).unwrap();
    let sum = Command::new("sha256sum").arg(&tar).output().unwrap();
    let sha = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let bb_job = move |id: &str, script: &str| {
        let mut j = sh_job(id, script);
        j.mountspecs = vec![flynn_client::host::MountSpec {
            kind: "tar".into(),
            url: format!("file://{}", tar.display()),
            hashes: [("sha256".to_string(), sha.clone())].into(),
            ..Default::default()
        }];
        j.config.host_network = true;
        j
    };

    let ns = unique("fha");
    let ip = |args: &[&str]| assert!(Command::new("ip").args(args).status().unwrap().success());
    ip(&["netns", "add", &ns]);
    ip(&["-n", &ns, "link", "set", "lo", "up"]);
    let name = ns.clone();
    let res = std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let cgroup_parent = unique("flynn-host-test");
        let mut h = Host::start(&[
            "--runtime",
            "container",
            "--bridge-name",
            "flynntest0",
            "--block",
            "100.100.7.0/24",
            "--netns-pool",
            "0",
            "--cgroup-parent",
            &cgroup_parent,
        ]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.block_on(async {
                let c = &h.client;
                let id = h.job_id("abc");
                let mut a = attach_then_add(c, &bb_job(&id, "printf abc"), STDOUT | STREAM).await;
                let seen = read_all(&mut a).await;
                assert!(seen.attached(), "{seen:?}");
                assert_eq!((seen.stdout, seen.exit), (b"abc".to_vec(), Some(0)));

                let id = h.job_id("long");
                let job = bb_job(&id, "head -c 200000 /dev/zero | tr '\\0' x");
                let mut a = attach_then_add(c, &job, STDOUT | STREAM).await;
                let seen = read_all(&mut a).await;
                assert_eq!(seen.stdout.len(), 200_000);
                assert!(seen.stdout.iter().all(|&b| b == b'x'));
                assert_eq!(seen.exit, Some(0));

                let id = h.job_id("prompt");
                let mut job = bb_job(&id, "printf 'Password: ' >&2; read x; echo \"got $x\"");
                job.config.stdin = true;
                let mut a = attach_then_add(c, &job, STDOUT | STDERR | STDIN | STREAM).await;
                let mut seen = Seen::default();
                while seen.stderr != b"Password: " {
                    assert!(
                        seen.stderr.len() < 10 && seen.take(next(&mut a).await),
                        "no prompt: {seen:?}"
                    );
                }
                let mut input = a.take_input().unwrap();
                input.stdin(b"s3cret\n").await.unwrap();
                input.close_stdin().await.unwrap();
                while seen.take(next(&mut a).await) {}
                assert_eq!(seen.stdout, b"got s3cret\n");
                assert_eq!(seen.exit, Some(0));

                // A stop is not held up by the one client of a `disable_log` job that
                // stopped reading: its signals reach the shim while the job's output
                // waits, and the job's end is recorded.
                let id = h.job_id("stalled");
                let mut job = bb_job(&id, "head -c 536870912 /dev/zero | tr '\\0' x");
                job.config.disable_log = true;
                job.config.stop_timeout = Some(2);
                a_stalled_client_does_not_hold_up_a_stop(c, job).await;
            })
        }));
        drop(h.proc.take());
        let containers = h.dir.path().join("containers");
        for id in flynn_container::Shim::list(&containers) {
            let _ = flynn_container::Shim::cleanup(&containers, &id);
        }
        for e in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::remove_dir(e.path().join(&cgroup_parent));
        }
        let _ = std::fs::remove_dir(std::path::Path::new("/sys/fs/cgroup").join(&cgroup_parent));
        if let Err(p) = res {
            std::panic::resume_unwind(p);
        }
    })
    .join();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    if let Err(p) = res {
        std::panic::resume_unwind(p);
    }
}
