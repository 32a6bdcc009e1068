//! The daemon with `--runtime process`.

use std::time::{Duration, Instant};

use flynn_client::host::{EventKind, Job, JobStatus, Port, ResourceCheck, Service};

use crate::support::*;

const PROC: &[&str] = &["--runtime", "process"];

/// A path the API serves, asked with a method it does not serve: 405 with the JSON error
/// envelope (was axum's empty plain response), on the job routes and the volume routes
/// merged in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_method_gets_405_with_the_json_envelope() {
    let h = Host::start(PROC);
    for (method, p) in [
        ("POST", "/host/jobs"),
        ("POST", "/host/jobs/x"),
        ("GET", "/host/tags"),
        ("DELETE", "/storage/volumes"),
    ] {
        let (st, body) = http(&h.addr, method, p, "", "");
        assert_eq!(st, 405, "{method} {p}: {body}");
        let e: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|err| panic!("{method} {p}: {err}: {body:?}"));
        assert_eq!(
            (e["code"].as_str(), e["retry"].as_bool()),
            (Some("validation_error"), Some(false)),
            "{method} {p}: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_and_validation() {
    let h = Host::start(PROC);
    let a = h.addr.as_str();
    let id = h.job_id("bad");

    let (st, body) = http(
        a,
        "PUT",
        &format!("/host/jobs/{id}"),
        "application/json",
        "{",
    );
    assert_eq!(st, 400, "{body}");
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["code"], "syntax_error");
    assert_eq!(e["message"], "The provided JSON input is invalid");
    assert_eq!(e["retry"], false);

    let (st, body) = http(
        a,
        "PUT",
        &format!("/host/jobs/{id}"),
        "application/json",
        r#"{"config":{"args":[]}}"#,
    );
    assert_eq!(st, 400);
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["code"], "validation_error");
    assert_eq!(e["detail"]["field"], "config.args");

    let (st, body) = http(a, "GET", "/host/jobs/nope", "", "");
    assert_eq!(st, 404);
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (e["code"].as_str(), e["message"].as_str()),
        (Some("object_not_found"), Some("host: unknown job"))
    );
    assert_eq!(http(a, "DELETE", "/host/jobs/nope", "", "").0, 404);
    // Ids that do not decode, or that try to leave the state directory, are JSON errors.
    for (method, p) in [
        ("PUT", "/host/jobs/%FF"),
        ("GET", "/host/jobs/%FF"),
        ("DELETE", "/host/jobs/%FF"),
        ("PUT", "/host/jobs/%FF/signal/15"),
        ("PUT", "/host/jobs/..%2F..%2Fescape"),
    ] {
        let (st, body) = http(
            a,
            method,
            p,
            "application/json",
            r#"{"config":{"args":["x"]}}"#,
        );
        assert_eq!(st, 400, "{method} {p}: {body}");
        let e: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(e["code"], "validation_error", "{method} {p}: {body}");
        assert_eq!(e["detail"]["field"], "id", "{method} {p}: {body}");
    }
    assert_eq!(http(a, "GET", "/no/such/route", "", "").0, 404);
    let (st, body) = http(a, "GET", "/host/jobs?active=true&active=false", "", "");
    assert_eq!(st, 400, "{body}");
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["code"], "validation_error", "{body}");

    // Duplicate ids conflict.
    let mut job = sh_job(&h.job_id("dup"), "exec sleep 30");
    job.config.ports = vec![Port {
        port: 0,
        proto: "tcp".into(),
        service: None,
    }];
    h.client.add_job(&job).await.unwrap();
    let e = h.client.add_job(&job).await.unwrap_err();
    assert_eq!(e.api().unwrap().status(), 409);
    wait_running(&h.client, &job.id).await;

    // Signals must be integers.
    let (st, _) = http(
        a,
        "PUT",
        &format!("/host/jobs/{}/signal/TERM", job.id),
        "",
        "",
    );
    assert_eq!(st, 400);

    // The running job holds port 5000.
    let check = |port| ResourceCheck {
        ports: vec![flynn_client::host::CheckPort {
            port,
            proto: "tcp".into(),
        }],
    };
    let e = h.client.resource_check(&check(5000)).await.unwrap_err();
    let e = e.api().unwrap();
    assert_eq!(e.status(), 409);
    assert_eq!(e.message, "Conflicting resources found");
    assert_eq!(e.detail.as_ref().unwrap()["ports"][0]["port"], 5000);
    let free = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let free_port = free.local_addr().unwrap().port();
    drop(free);
    h.client.resource_check(&check(free_port)).await.unwrap();

    // Tags.
    let tags = [("zone".to_string(), "a".to_string())].into();
    h.client.set_tags(&tags).await.unwrap();
    let st = h.client.status().await.unwrap();
    assert_eq!(st.tags, tags);
    assert_eq!(st.id, h.id);
    assert_eq!(st.jobs.get("running"), Some(&1));

    h.client.stop_job(&job.id).await.unwrap();
    let j = wait_ended(&h.client, &job.id, Duration::from_secs(10)).await;
    assert_eq!(j.status, JobStatus::Done);
    let e = h.client.stop_job(&job.id).await.unwrap_err();
    assert_eq!(e.api().unwrap().message, "host: job is already stopped");
    let e = h.client.signal(&job.id, 15).await.unwrap_err();
    assert_eq!(e.api().unwrap().status(), 409);
}

/// Waits (15 s at most) until the aggregator at `api` has as many lines of `app` as `want`,
/// then checks they are `want`, each once, in any order (lines sent again later are placed
/// by the aggregator by timestamp, equal ones by arrival), and nothing else (no notice).
async fn assert_same_lines(api: &str, app: &str, mut want: Vec<String>) {
    let mut got = Vec::new();
    eventually(
        Duration::from_secs(15),
        "all lines in the aggregator",
        || {
            got = log_lines(api, app)
                .iter()
                .map(|l| l["msg"].as_str().unwrap_or_default().to_string())
                .collect();
            got.len() >= want.len()
        },
    )
    .await;
    let mut sorted = got.clone();
    sorted.sort();
    want.sort();
    assert_eq!(sorted, want, "as received: {got:?}");
}

/// Spec §3.5: job output is kept on the host's disk, and a new connection to an aggregator
/// first sends what the disk holds after the aggregator's cursor. An aggregator restarted
/// empty gets back the lines it had; lines written while it was down, beyond the send
/// queue (`--log-buffer 30`) and across a host daemon restart, arrive too, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_aggregator_gets_the_host_log_after_its_cursor() {
    let free = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let (syslog, api) = (free(), free());
    let agg = logagg_on(&syslog, &api);
    let args = [
        "--runtime",
        "process",
        "--logagg",
        syslog.as_str(),
        "--logagg-api",
        api.as_str(),
        "--log-buffer",
        "30",
    ];
    let mut h = Host::start(&args);
    let app = unique("app");
    let run = |name: &str, n: usize| {
        let mut job = sh_job(
            &h.job_id(name),
            &format!("for i in $(seq 1 {n}); do echo {name}-$i; done"),
        );
        job.config.env.insert("FLYNN_APP_ID".into(), app.clone());
        job
    };
    let first = run("first", 20);
    h.client.add_job(&first).await.unwrap();
    wait_ended(&h.client, &first.id, Duration::from_secs(20)).await;
    eventually(
        Duration::from_secs(10),
        "20 lines in the aggregator",
        || log_lines(&api, &app).len() >= 20,
    )
    .await;

    drop(agg);
    let second = run("second", 60);
    h.client.add_job(&second).await.unwrap();
    wait_ended(&h.client, &second.id, Duration::from_secs(20)).await;
    // The daemon goes too (its send queue with it), and comes back on the same state.
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.restart(&args);
    let _agg = logagg_on(&syslog, &api);

    let want: Vec<String> = (1..=20)
        .map(|i| format!("first-{i}"))
        .chain((1..=60).map(|i| format!("second-{i}")))
        .collect();
    // Every line once and no drop notice.
    assert_same_lines(&api, &app, want).await;
}

/// A TCP relay to `to` that can be cut and restored: the aggregator stays up (and keeps
/// its lines and cursors) while the host cannot reach its syslog port.
struct Relay {
    addr: String,
    task: Option<tokio::task::JoinHandle<()>>,
    to: String,
}

impl Relay {
    async fn start(to: &str) -> Relay {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let mut r = Relay {
            addr,
            task: None,
            to: to.to_string(),
        };
        r.task = Some(Self::serve(l, r.to.clone()));
        r
    }

    fn serve(l: tokio::net::TcpListener, to: String) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut a, _)) = l.accept().await {
                let to = to.clone();
                conns.spawn(async move {
                    if let Ok(mut b) = tokio::net::TcpStream::connect(&to).await {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                });
            }
        })
    }

    /// Closes the listener and every relayed connection.
    fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    async fn restore(&mut self) {
        let l = tokio::net::TcpListener::bind(&self.addr).await.unwrap();
        self.task = Some(Self::serve(l, self.to.clone()));
    }
}

/// The sum of the aggregator's `messages_total` over its sources: every message it
/// received, replays included.
fn received(api: &str) -> u64 {
    let (_, m) = http(api, "GET", "/metrics", "", "");
    m.lines()
        .filter(|l| l.starts_with("flynn_logagg_messages_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Spec §3.5 with a real cursor: the aggregator stays up while the host cannot reach it,
/// the host daemon is killed with lines queued and restarted; the new daemon asks the
/// aggregator's cursor and sends from the disk only what follows it: every line arrives,
/// and the lines the aggregator already had are not sent again. The aggregator's API
/// answers only 1.5 s after its syslog port is back: the cursor is asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_resends_only_what_follows_the_cursor() {
    let (_agg, syslog, api) = logagg();
    let mut relay = Relay::start(&syslog).await;
    let mut api_relay = Relay::start(&api).await;
    let relay_addr = relay.addr.clone();
    let api_addr = api_relay.addr.clone();
    let args = [
        "--runtime",
        "process",
        "--logagg",
        relay_addr.as_str(),
        "--logagg-api",
        api_addr.as_str(),
    ];
    let mut h = Host::start(&args);
    let app = unique("app");
    let run = |h: &Host, name: &str, n: usize| {
        let mut job = sh_job(
            &h.job_id(name),
            &format!("for i in $(seq 1 {n}); do echo {name}-$i; done"),
        );
        job.config.env.insert("FLYNN_APP_ID".into(), app.clone());
        job
    };
    let first = run(&h, "first", 40);
    h.client.add_job(&first).await.unwrap();
    wait_ended(&h.client, &first.id, Duration::from_secs(20)).await;
    eventually(
        Duration::from_secs(10),
        "40 lines in the aggregator",
        || log_lines(&api, &app).len() >= 40,
    )
    .await;
    let before = received(&api);

    relay.cut();
    api_relay.cut();
    let t0 = std::time::Instant::now();
    while h.client.status().await.unwrap().log.connected && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = run(&h, "second", 30);
    h.client.add_job(&second).await.unwrap();
    wait_ended(&h.client, &second.id, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.restart(&args);
    relay.restore().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    api_relay.restore().await;

    let want: Vec<String> = (1..=40)
        .map(|i| format!("first-{i}"))
        .chain((1..=30).map(|i| format!("second-{i}")))
        .collect();
    assert_same_lines(&api, &app, want).await;
    // The 30 queued lines came (and at most a handful around the cut again); the 40 the
    // aggregator had did not.
    let more = received(&api) - before;
    assert!(
        (30..40).contains(&more),
        "{more} messages received after the cut"
    );
}

/// A job whose state cannot be recorded is refused (500, retry) and never started: the
/// next daemon would not know it and would kill what it found of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_cannot_be_recorded_is_not_started() {
    let h = Host::start(&["--runtime", "process"]);
    let id = h.job_id("unrecorded");
    let marker = h.dir.path().join("ran");
    // A directory where the job's state file goes: its write fails.
    std::fs::create_dir_all(h.dir.path().join("jobs").join(format!("{id}.json"))).unwrap();
    let job = sh_job(&id, &format!("touch {}", marker.display()));
    let e = h.client.add_job(&job).await.unwrap_err();
    let api = e.api().unwrap_or_else(|| panic!("{e}"));
    assert_eq!(api.status(), 500, "{e}");
    assert!(
        api.message.contains("cannot record the job"),
        "{}",
        api.message
    );
    assert!(api.retry);
    let e = h.client.get_job(&id).await.unwrap_err();
    assert_eq!(e.api().map(|a| a.status()), Some(404), "{e}");
    let tmp: Vec<_> = std::fs::read_dir(h.dir.path().join("jobs"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "temporary files left: {tmp:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!marker.exists(), "the job ran");
    // Once the state can be written, the same id starts.
    std::fs::remove_dir(h.dir.path().join("jobs").join(format!("{id}.json"))).unwrap();
    h.client.add_job(&job).await.unwrap();
    wait_ended(&h.client, &id, Duration::from_secs(10)).await;
    assert!(marker.exists());
}

/// An output burst larger than the send queue while the aggregator is up: the lines the
/// queue dropped are on disk and are sent again once the queue is drained, so all arrive
/// and no drop notice is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_the_send_queue_is_resent_from_disk() {
    let (_agg, syslog, api) = logagg();
    let h = Host::start(&[
        "--runtime",
        "process",
        "--logagg",
        &syslog,
        "--logagg-api",
        &api,
        "--log-buffer",
        "5",
    ]);
    let app = unique("app");
    let mut job = sh_job(
        &h.job_id("burst"),
        "i=0; while [ $i -lt 300 ]; do i=$((i+1)); echo burst-$i; done",
    );
    job.config.env.insert("FLYNN_APP_ID".into(), app.clone());
    h.client.add_job(&job).await.unwrap();
    wait_ended(&h.client, &job.id, Duration::from_secs(20)).await;
    let want: Vec<String> = (1..=300).map(|i| format!("burst-{i}")).collect();
    // Every line once and no drop notice.
    assert_same_lines(&api, &app, want).await;
    // The queue did overflow (so the disk is what brought the lines), and nothing counts
    // as lost.
    let log = h.client.status().await.unwrap().log;
    assert!(log.requeued > 0, "{log:?}");
    assert_eq!(log.dropped, 0, "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_env_and_ports_reach_the_aggregator() {
    let (_agg, syslog, api) = logagg();
    let (_agg2, syslog2, api2) = logagg();
    let h = Host::start(&[
        "--runtime",
        "process",
        "--logagg",
        &syslog,
        "--logagg",
        &syslog2,
    ]);
    let app = unique("app");
    let id = h.job_id("env");
    let mut job = sh_job(
        &id,
        "echo \"PORT=$PORT P0=$PORT_0 P1=$PORT_1 IP=$EXTERNAL_IP APP=$FLYNN_APP_ID JOB=$FLYNN_JOB_ID TYPE=$FLYNN_PROCESS_TYPE\"; echo oops >&2; head -c 10050 /dev/zero | tr '\\0' x; echo",
    );
    job.config.env.insert("FLYNN_APP_ID".into(), app.clone());
    job.metadata
        .insert("flynn-controller.type".into(), "web".into());
    job.config.ports = vec![
        Port {
            port: 0,
            proto: "tcp".into(),
            service: None,
        },
        Port {
            port: 8080,
            proto: "udp".into(),
            service: None,
        },
    ];
    h.client.add_job(&job).await.unwrap();
    let j = wait_ended(&h.client, &id, Duration::from_secs(20)).await;
    assert_eq!((j.status, j.exit_status), (JobStatus::Done, Some(0)));

    let mut lines = Vec::new();
    eventually(Duration::from_secs(10), "4 lines in the aggregator", || {
        lines = log_lines(&api, &app);
        lines.len() >= 4
    })
    .await;
    let stdout: Vec<_> = lines.iter().filter(|l| l["stream"] == "stdout").collect();
    assert_eq!(
        stdout[0]["msg"],
        format!("PORT=5000 P0=5000 P1=8080 IP=127.0.0.1 APP={app} JOB={id} TYPE=web")
    );
    assert_eq!(stdout[0]["job_id"], id.as_str());
    assert_eq!(stdout[0]["process_type"], "web");
    assert_eq!(stdout[0]["host_id"], h.id.as_str());
    // The 10050-byte line arrives as 10000 + 50.
    assert_eq!(stdout[1]["msg"].as_str().unwrap().len(), 10_000);
    assert_eq!(stdout[2]["msg"].as_str().unwrap().len(), 50);
    let stderr: Vec<_> = lines.iter().filter(|l| l["stream"] == "stderr").collect();
    assert_eq!(stderr.len(), 1);
    assert_eq!(stderr[0]["msg"], "oops");
    // Every aggregator gets every line (spec §3.1).
    let mut second = Vec::new();
    eventually(
        Duration::from_secs(10),
        "4 lines in the second aggregator",
        || {
            second = log_lines(&api2, &app);
            second.len() >= 4
        },
    )
    .await;
    let msgs = |v: &[serde_json::Value]| v.iter().map(|l| l["msg"].clone()).collect::<Vec<_>>();
    assert_eq!(msgs(&second), msgs(&lines));
    let st = h.client.status().await.unwrap();
    assert_eq!((st.log.lines, st.log.shipped, st.log.dropped), (4, 4, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_status_signals_and_stop_timing() {
    let h = Host::start(PROC);
    let c = &h.client;

    let crash = h.job_id("crash");
    c.add_job(&sh_job(&crash, "exit 3")).await.unwrap();
    let j = wait_ended(c, &crash, Duration::from_secs(10)).await;
    assert_eq!((j.status, j.exit_status), (JobStatus::Crashed, Some(3)));
    assert!(!j.started_at.is_empty() && !j.ended_at.is_empty());

    // A forwarded signal the job handles.
    let sig = h.job_id("sig");
    c.add_job(&sh_job(
        &sig,
        "trap 'exit 42' USR1; while true; do sleep 0.05; done",
    ))
    .await
    .unwrap();
    wait_running(c, &sig).await;
    tokio::time::sleep(Duration::from_millis(200)).await; // let the trap be installed
    c.signal(&sig, 10).await.unwrap();
    let j = wait_ended(c, &sig, Duration::from_secs(10)).await;
    assert_eq!((j.status, j.exit_status), (JobStatus::Crashed, Some(42)));

    // SIGTERM honoured: stops at once, done.
    let term = h.job_id("term");
    c.add_job(&sh_job(&term, "exec sleep 30")).await.unwrap();
    wait_running(c, &term).await;
    let t0 = Instant::now();
    c.stop_job(&term).await.unwrap();
    let j = wait_ended(c, &term, Duration::from_secs(10)).await;
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!((j.status, j.signal), (JobStatus::Done, Some(15)));

    // SIGTERM ignored: SIGKILL after the job's timeout (1 s).
    let stubborn = h.job_id("stubborn");
    let mut job = sh_job(&stubborn, "trap '' TERM; while true; do sleep 0.05; done");
    job.config.stop_timeout = Some(1);
    c.add_job(&job).await.unwrap();
    wait_running(c, &stubborn).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    c.stop_job(&stubborn).await.unwrap();
    let j = wait_ended(c, &stubborn, Duration::from_secs(10)).await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!((j.status, j.signal), (JobStatus::Done, Some(9)));

    // A job that cannot start fails with the reason.
    let bad = h.job_id("noexec");
    let mut job = sh_job(&bad, "");
    job.config.args = vec!["/nonexistent/binary".into()];
    c.add_job(&job).await.unwrap();
    let j = wait_ended(c, &bad, Duration::from_secs(10)).await;
    assert_eq!(j.status, JobStatus::Failed);
    assert!(
        j.error.as_deref().unwrap().contains("/nonexistent/binary"),
        "{j:?}"
    );

    // So does one with an unknown port protocol (spec §5.2).
    let proto = h.job_id("proto");
    let mut job = sh_job(&proto, "true");
    job.config.ports = vec![Port {
        port: 1,
        proto: "sctp".into(),
        service: None,
    }];
    c.add_job(&job).await.unwrap();
    let j = wait_ended(c, &proto, Duration::from_secs(10)).await;
    assert_eq!(j.status, JobStatus::Failed);
    assert_eq!(j.error.as_deref(), Some("unknown port proto \"sctp\""));
}

/// A second `DELETE` of a job being stopped answers 200 and sends nothing more: the job's
/// SIGTERM handler runs once, and the SIGKILL comes after the stop timeout of the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_of_a_stopping_job_sends_no_second_sigterm() {
    let h = Host::start(PROC);
    let c = &h.client;
    let dir = tempfile::tempdir().unwrap();
    let terms = dir.path().join("terms");
    let ready = dir.path().join("ready");
    let id = h.job_id("twice");
    let mut job = sh_job(
        &id,
        &format!(
            "trap 'echo term >> {}' TERM; touch {}; while true; do sleep 0.05; done",
            terms.display(),
            ready.display()
        ),
    );
    job.config.stop_timeout = Some(2);
    c.add_job(&job).await.unwrap();
    wait_running(c, &id).await;
    eventually(Duration::from_secs(10), "the trap installed", || {
        ready.exists()
    })
    .await;
    let handled = || {
        std::fs::read_to_string(&terms)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let t0 = Instant::now();
    c.stop_job(&id).await.unwrap();
    eventually(Duration::from_secs(5), "the SIGTERM handled", || {
        handled() == 1
    })
    .await;
    c.stop_job(&id).await.unwrap();
    // Time for a second SIGTERM to be handled (the job ignores them).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(handled(), 1, "a second SIGTERM was sent");
    let j = wait_ended(c, &id, Duration::from_secs(10)).await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!((j.status, j.signal), (JobStatus::Done, Some(9)));
    assert_eq!(handled(), 1);
    let e = c.stop_job(&id).await.unwrap_err();
    assert_eq!(e.api().unwrap().message, "host: job is already stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_retention_of_stopped_jobs() {
    let h = Host::start(PROC);
    let c = &h.client;
    let mut events = c.events(None).await.unwrap();
    let id = h.job_id("ev");
    c.add_job(&sh_job(&id, "true")).await.unwrap();
    let mut kinds = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while kinds.len() < 3 && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(ev)) if ev.job_id == id => kinds.push((ev.event, ev.job.status)),
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    assert_eq!(
        kinds,
        [
            (EventKind::Create, JobStatus::Starting),
            (EventKind::Start, JobStatus::Running),
            (EventKind::Stop, JobStatus::Done),
        ]
    );

    // At most 25 stopped jobs per app are kept.
    let app = unique("gc");
    let mut ids = Vec::new();
    for i in 0..28 {
        let id = h.job_id(&format!("gc{i}"));
        let mut j = sh_job(&id, "true");
        j.config.env.insert("FLYNN_APP_ID".into(), app.clone());
        c.add_job(&j).await.unwrap();
        wait_ended(c, &id, Duration::from_secs(10)).await;
        ids.push(id);
    }
    let all = c.list_jobs(false).await.unwrap();
    let kept: Vec<_> = all
        .values()
        .filter(|j| j.job.app_id() == Some(app.as_str()))
        .collect();
    assert_eq!(kept.len(), 25);
    for old in &ids[..3] {
        assert!(!all.contains_key(old), "{old} should have been dropped");
    }
    assert!(all.contains_key(&ids[27]));
    assert!(c.list_jobs(true).await.unwrap().is_empty());
}

/// An unreachable aggregator: the buffer keeps the newest `--log-buffer` lines. Without
/// the disk log the older ones are lost and counted as dropped; with it (the default) they
/// count as requeued, to be sent again from the disk, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_aggregator_buffers_and_counts_drops() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = l.local_addr().unwrap().to_string();
    drop(l);
    for (disk, dropped, requeued) in [("0", 15, 0), ("1048576", 0, 15)] {
        let h = Host::start(&[
            "--runtime",
            "process",
            "--logagg",
            &closed,
            "--log-buffer",
            "5",
            "--log-disk-bytes",
            disk,
        ]);
        let id = h.job_id("chatty");
        h.client
            .add_job(&sh_job(
                &id,
                "i=0; while [ $i -lt 20 ]; do echo line$i; i=$((i+1)); done",
            ))
            .await
            .unwrap();
        wait_ended(&h.client, &id, Duration::from_secs(10)).await;
        let mut st = h.client.status().await.unwrap();
        let t0 = Instant::now();
        while st.log.lines < 20 && t0.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            st = h.client.status().await.unwrap();
        }
        assert_eq!(
            (
                st.log.lines,
                st.log.dropped,
                st.log.requeued,
                st.log.buffered,
                st.log.connected
            ),
            (20, dropped, requeued, 5, false),
            "--log-disk-bytes {disk}"
        );
        let (code, metrics) = http(&h.addr, "GET", "/metrics", "", "");
        assert_eq!(code, 200);
        for line in [
            format!("flynn_host_log_lines_dropped_total {dropped}"),
            format!("flynn_host_log_lines_requeued_total {requeued}"),
        ] {
            assert!(metrics.contains(&line), "{line}: {metrics}");
        }
    }
}

/// A single-node flynn-discoverd on a loopback port with its data dir, and the words of
/// its `listening` line.
fn discoverd(extra: &[&str]) -> (tempfile::TempDir, Proc, Vec<(String, String)>) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let mut args = vec!["--data-dir", data.as_str(), "--addr", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let (p, kv) = start(&bin("flynn-discoverd", "flynn-discoverd"), &args);
    (dir, p, kv)
}

/// A shell job with one TCP port (5000) registered as `svc`, created if missing.
fn service_job(id: &str, svc: &str, script: &str) -> Job {
    let mut job = sh_job(id, script);
    job.config.ports = vec![Port {
        port: 0,
        proto: "tcp".into(),
        service: Some(Service {
            name: svc.to_string(),
            create: true,
            check: None,
        }),
    }];
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_registration_in_discoverd() {
    let (_ddir, _disc, kv) = discoverd(&[]);
    let durl = format!("http://{}", get(&kv, "http"));
    let d = flynn_client::discoverd::Client::new(&durl);
    let h = Host::start(&["--runtime", "process", "--discoverd", &durl]);
    let svc = unique("svc");
    let id = h.job_id("web");
    let mut job = service_job(&id, &svc, "exec sleep 30");
    job.config.env.insert("FLYNN_APP_ID".into(), "app1".into());
    h.client.add_job(&job).await.unwrap();
    wait_running(&h.client, &id).await;

    let t0 = Instant::now();
    let inst = loop {
        if let Ok(list) = d.instances(&svc).await {
            if let Some(i) = list.into_iter().next() {
                break i;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no instance of {svc}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(inst.addr, "127.0.0.1:5000");
    assert_eq!(inst.meta["FLYNN_JOB_ID"], id);
    assert_eq!(inst.meta["FLYNN_APP_ID"], "app1");

    h.client.discoverd_deregister(&id).await.unwrap();
    assert!(d.instances(&svc).await.unwrap_or_default().is_empty());
    assert_eq!(
        h.client.get_job(&id).await.unwrap().status,
        JobStatus::Running
    );
    h.client.stop_job(&id).await.unwrap();
    wait_ended(&h.client, &id, Duration::from_secs(10)).await;

    // The host itself is registered in `flynn-host`, with its tags after an update.
    let mine = |list: Vec<flynn_client::discoverd::Instance>| {
        list.into_iter().find(|i| i.meta.get("id") == Some(&h.id))
    };
    let t0 = Instant::now();
    loop {
        if let Some(i) = mine(d.instances("flynn-host").await.unwrap_or_default()) {
            assert_eq!(
                i.addr,
                format!("127.0.0.1:{}", h.addr.rsplit(':').next().unwrap())
            );
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "host not registered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tags = [("zone".to_string(), "b".to_string())].into();
    h.client.set_tags(&tags).await.unwrap();
    let t0 = Instant::now();
    loop {
        let i = mine(d.instances("flynn-host").await.unwrap_or_default());
        if i.is_some_and(|i| i.meta.get("tag:zone").map(String::as_str) == Some("b")) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "tags not in discoverd"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_does_not_wait_for_a_discoverd_that_stopped_answering() {
    let (_ddir, disc, kv) = discoverd(&[]);
    let durl = format!("http://{}", get(&kv, "http"));
    let d = flynn_client::discoverd::Client::new(&durl);
    let h = Host::start(&["--runtime", "process", "--discoverd", &durl]);
    let svc = unique("svc");
    let id = h.job_id("frozen");
    let job = service_job(
        &id,
        &svc,
        "trap 'exit 0' TERM; while true; do sleep 0.05; done",
    );
    h.client.add_job(&job).await.unwrap();
    wait_running(&h.client, &id).await;
    let t0 = Instant::now();
    while d.instances(&svc).await.unwrap_or_default().is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no instance of {svc}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // discoverd still accepts connections (the kernel does) but answers nothing.
    let pid = nix::unistd::Pid::from_raw(disc.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let t0 = Instant::now();
    h.client.stop_job(&id).await.unwrap();
    let j = wait_ended(&h.client, &id, Duration::from_secs(20)).await;
    let took = t0.elapsed();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(j.status, JobStatus::Done, "{j:?}");
    // The SIGTERM went after the bounded wait for discoverd, not after its request timeout.
    assert!(took < Duration::from_secs(8), "stopped after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discoverd_announces_itself_to_the_host() {
    let mut h = Host::start(PROC);
    assert_eq!(h.client.status().await.unwrap().discoverd, None);
    let json = "application/json";
    // Bad announcements are refused, naming the field.
    for (body, field) in [
        (r#"{"url":"ftp://x:1"}"#, "url"),
        (r#"{"url":"http://"}"#, "url"),
        (r#"{"url":"http://127.0.0.1:1111","dns":"nope"}"#, "dns"),
    ] {
        let (code, text) = http(&h.addr, "POST", "/host/discoverd", json, body);
        assert_eq!(code, 400, "{body}: {text}");
        assert!(text.contains(&format!(r#""field":"{field}""#)), "{text}");
    }
    // A real discoverd started with --notify tells the host where it is.
    let notify = format!("http://{}/host/discoverd", h.addr);
    let (_ddir, _disc, kv) = discoverd(&["--dns-addr", "127.0.0.1:0", "--notify", &notify]);
    let durl = format!("http://{}", get(&kv, "http"));
    let dns = get(&kv, "dns");
    let t0 = Instant::now();
    loop {
        let st = h.client.status().await.unwrap();
        if let Some(d) = st.discoverd {
            assert_eq!(
                (d.url.as_str(), d.dns.as_str()),
                (durl.as_str(), dns.as_str())
            );
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "no announcement");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The job running it is reported as it names itself (spec §5.2 HostStatus).
    let body = format!(r#"{{"job_id":"disc-job","url":"{durl}","dns":"{dns}"}}"#);
    let (code, text) = http(&h.addr, "POST", "/host/discoverd", json, &body);
    assert_eq!(code, 200, "{text}");
    let d = h.client.status().await.unwrap().discoverd.unwrap();
    assert_eq!(
        (d.job_id.as_str(), d.url.as_str()),
        ("disc-job", durl.as_str())
    );
    // The host registers itself there, and new jobs are told where discoverd is.
    let d = flynn_client::discoverd::Client::new(&durl);
    let t0 = Instant::now();
    while !d
        .instances("flynn-host")
        .await
        .unwrap_or_default()
        .iter()
        .any(|i| i.meta.get("id") == Some(&h.id))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "host not registered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = h.dir.path().join("discoverd-env");
    let id = h.job_id("env");
    let job = sh_job(&id, &format!("echo \"$DISCOVERD\" > {}", out.display()));
    h.client.add_job(&job).await.unwrap();
    wait_ended(&h.client, &id, Duration::from_secs(10)).await;
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), durl);

    // A restarted daemon remembers it.
    h.restart(PROC);
    let d = h.client.status().await.unwrap().discoverd;
    assert_eq!(d.map(|d| (d.url, d.dns)), Some((durl, dns)));
}

/// Polls `svc` in the discoverd at `d` until `want` holds for its instance addresses.
async fn wait_instances(
    d: &flynn_client::discoverd::Client,
    svc: &str,
    what: &str,
    want: impl Fn(&[String]) -> bool,
) {
    let t0 = Instant::now();
    loop {
        let addrs: Vec<String> = d
            .instances(svc)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|i| i.addr)
            .collect();
        if want(&addrs) {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(8), "{what}: {addrs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A job that was already running when discoverd announced itself is registered there
/// too, and moves to a discoverd that announces itself later at another address. The old
/// heartbeats stop without a delete (the new registration has the same instance id, and
/// the old address may be another node of the same cluster), so in the first discoverd the
/// instance expires (its TTL is 2 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_jobs_register_with_a_discoverd_that_announces_itself_later() {
    let h = Host::start(PROC);
    let svc = unique("late");
    let id = h.job_id("web");
    let job = service_job(&id, &svc, "exec sleep 60");
    h.client.add_job(&job).await.unwrap();
    wait_running(&h.client, &id).await;

    let notify = format!("http://{}/host/discoverd", h.addr);
    let (_adir, _a, kv) = discoverd(&["--notify", &notify, "--instance-ttl", "2s"]);
    let a = flynn_client::discoverd::Client::new(&format!("http://{}", get(&kv, "http")));
    wait_instances(&a, &svc, "registered with the first discoverd", |l| {
        l == ["127.0.0.1:5000"]
    })
    .await;

    let (_bdir, _b, kv) = discoverd(&["--notify", &notify]);
    let b = flynn_client::discoverd::Client::new(&format!("http://{}", get(&kv, "http")));
    wait_instances(&b, &svc, "registered with the second discoverd", |l| {
        l == ["127.0.0.1:5000"]
    })
    .await;
    wait_instances(&a, &svc, "expired in the first", |l| l.is_empty()).await;

    h.client.stop_job(&id).await.unwrap();
    wait_ended(&h.client, &id, Duration::from_secs(10)).await;
    wait_instances(&b, &svc, "unregistered when the job ended", |l| {
        l.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_persists_across_restarts() {
    let mut h = Host::start(PROC);
    let done = h.job_id("done");
    h.client.add_job(&sh_job(&done, "exit 0")).await.unwrap();
    wait_ended(&h.client, &done, Duration::from_secs(10)).await;
    let live = h.job_id("live");
    h.client
        .add_job(&sh_job(&live, "exec sleep 30"))
        .await
        .unwrap();
    let pid = wait_running(&h.client, &live).await.pid.unwrap();

    // Kill the daemon outright; the process runtime cannot re-adopt its job.
    drop(h.proc.take());
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    let id = h.id.clone();
    let h2 = Host::start_in(h.dir, &id, PROC);
    let j = h2.client.get_job(&done).await.unwrap();
    assert_eq!((j.status, j.exit_status), (JobStatus::Done, Some(0)));
    // It ran, and its end is not known: crashed (not failed, "could not start"), without an
    // exit status, with the reason.
    let j = h2.client.get_job(&live).await.unwrap();
    assert_eq!((j.status, j.exit_status), (JobStatus::Crashed, None));
    assert!(j.error.unwrap().contains("restart"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_daemon_despite_open_event_streams() {
    let mut h = Host::start(PROC);
    let _events = h.client.events(None).await.unwrap();
    let one = h.job_id("one");
    // Unknown job: no stream.
    let e = h.client.events(Some(&one)).await.unwrap_err();
    assert_eq!(e.api().unwrap().status(), 404);
    h.client
        .add_job(&sh_job(&one, "exec sleep 30"))
        .await
        .unwrap();
    let other = h.job_id("other");
    h.client.add_job(&sh_job(&other, "true")).await.unwrap();
    let mut rx = h.client.events(Some(&one)).await.unwrap();
    wait_running(&h.client, &one).await;
    h.client.stop_job(&one).await.unwrap();
    let mut seen = Vec::new();
    while !seen.contains(&EventKind::Stop) {
        let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("stop event")
            .expect("stream open");
        assert_eq!(ev.job_id, one, "only this job's events");
        seen.push(ev.event);
    }

    let mut proc = h.proc.take().unwrap();
    let pid = nix::unistd::Pid::from_raw(proc.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut proc, Duration::from_secs(6)).await;
    assert!(status.success(), "{status:?}");
}

/// A stand-in discoverd on a loopback port: answers every request `200 {}` and records
/// each as (request line, body).
async fn discoverd_stand_in() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    while buf.len() < end + 4 + len {
                        match s.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    }
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                    buf.drain(..end + 4 + len);
                    let line = head.lines().next().unwrap_or("").to_string();
                    log.lock().unwrap().push((line, body));
                    let resp = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

/// New tags replace the host's registration in place: the new one is registered over the
/// old (same instance id: discoverd sends watchers an `update`), and the old one is never
/// deleted. The old one used to be deleted first, so watchers saw the host go down and come
/// back, and it lost its place in the `flynn-host` leader election ("oldest").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_tags_replace_the_hosts_registration_without_removing_it() {
    let (url, seen) = discoverd_stand_in().await;
    let h = Host::start(&["--runtime", "process", "--discoverd", &url]);
    let registrations = || -> Vec<String> {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(l, _)| l.starts_with("PUT /services/flynn-host/instances/"))
            .map(|(_, b)| b.clone())
            .collect()
    };
    eventually(Duration::from_secs(30), "the host registered", || {
        !registrations().is_empty()
    })
    .await;
    let tags = [("zone".to_string(), "b".to_string())].into();
    h.client.set_tags(&tags).await.unwrap();
    eventually(
        Duration::from_secs(30),
        "registered with the new tags",
        || registrations().iter().any(|b| b.contains("tag:zone")),
    )
    .await;
    let deletes: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(l, _)| l.clone())
        .filter(|l| l.starts_with("DELETE"))
        .collect();
    assert!(
        deletes.is_empty(),
        "the host was taken out of discoverd: {deletes:?}"
    );
}

/// A process-runtime job starts with no signal ignored or blocked, though the daemon ignores
/// `SIGPIPE` (the Rust runtime does). std's spawn resets `SIGPIPE` and the mask, but that is
/// not enough: glibc's `posix_spawn`, which std uses when it can, leaves signals 32 and 33
/// (glibc's internal ones) ignored in the child. The runtime's pre-exec hook
/// (`flynn_container::signals::default_on_exec`) is needed: it sets every disposition back to
/// the default.
/// A writer into a closed pipe dies of `SIGPIPE`, and a shell loop writing into one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_job_starts_with_default_signal_dispositions() {
    let h = Host::start(PROC);
    let id = h.job_id("sigs");
    let script = "s=$(grep -E '^Sig(Blk|Ign)' /proc/self/status | tr -d '\\t'); \
                  [ \"$s\" = \"$(printf 'SigBlk:0000000000000000\\nSigIgn:0000000000000000')\" ] || exit 3; \
                  [ \"$(yes 2>&1 | head -1)\" = y ] || exit 4; \
                  while :; do echo x; done | head -1 >/dev/null; exit 0";
    h.client.add_job(&sh_job(&id, script)).await.unwrap();
    let j = wait_ended(&h.client, &id, Duration::from_secs(20)).await;
    assert_eq!((j.status, j.exit_status), (JobStatus::Done, Some(0)));
}
