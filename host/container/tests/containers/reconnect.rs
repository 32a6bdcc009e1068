//! The daemon side going away and coming back: events continue, lines are delivered or counted.

use std::time::Duration;

use flynn_container::{Shim, ShimEvent};

use crate::support::{collect, collect_into, require_root, wait_line, Env, Run};

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn reconnect_delivers_lines_emitted_meanwhile() {
    require_root!();
    let env = Env::new("reconn");
    let spec = env.spec(
        "seq",
        &[
            "sh",
            "-c",
            "echo first; sleep 0.5; seq 1 500; sleep 0.3; echo last",
        ],
    );
    let mut conn = env.spawn(&spec).await;
    let mut run = Run::default();
    wait_line(&mut conn, &mut run, "first", T).await;
    let pid = run.pid.expect("started");
    drop(conn);
    // The job carries on without a daemon; wait until it finished.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(Shim::list(&env.state), vec![spec.id.clone()]);
    let mut conn = Shim::connect(&env.state, &spec.id).await.unwrap();
    let mut rest = Run::default();
    collect_into(&mut conn, &mut rest, T).await;
    // The shim says Started again on every connection; nothing is repeated or lost.
    assert_eq!(rest.pid, Some(pid));
    let mut want: Vec<String> = (1..=500).map(|i| i.to_string()).collect();
    want.push("last".into());
    assert_eq!(rest.stdout, want);
    assert_eq!(rest.dropped, 0);
    assert_eq!(rest.exit_code(), Some(0));

    // Once the shim exited, connecting again yields the final status from the state dir.
    let mut again = Shim::connect(&env.state, &spec.id).await.unwrap();
    let last = collect(&mut again, T).await;
    assert_eq!(last.last, rest.last);
    assert!(last.stdout.is_empty());
    assert_eq!(again.next_event().await.unwrap(), None);
    env.cleanup_and_check(&spec);
    assert!(Shim::connect(&env.state, &spec.id).await.is_err());
}

#[tokio::test]
async fn overflow_while_disconnected_is_counted() {
    require_root!();
    let env = Env::new("drops");
    // 80000 lines of 100 bytes (~9 MiB with overhead) while no daemon listens: more than the
    // shim's 4 MiB buffer holds.
    let spec = env.spec(
        "flood",
        &[
            "sh",
            "-c",
            "echo first; sleep 0.5; head -c 8000000 /dev/zero | tr '\\0' x | fold -w 100; echo",
        ],
    );
    let mut conn = env.spawn(&spec).await;
    let mut run = Run::default();
    wait_line(&mut conn, &mut run, "first", T).await;
    drop(conn);
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let mut conn = Shim::connect(&env.state, &spec.id).await.unwrap();
    let rest = collect(&mut conn, T).await;
    let xs = rest.stdout.iter().filter(|l| l.len() == 100).count() as u64;
    assert!(rest.dropped > 0, "nothing dropped");
    assert!(xs > 0, "nothing delivered");
    assert_eq!(
        xs + rest.dropped,
        80_000,
        "delivered {xs}, dropped {}",
        rest.dropped
    );
    assert!(matches!(
        rest.last,
        Some(ShimEvent::Exited { code: Some(0), .. })
    ));
    env.cleanup_and_check(&spec);
}

#[tokio::test]
async fn connected_daemon_gets_everything_without_drops() {
    require_root!();
    let env = Env::new("nodrop");
    let spec = env.spec(
        "flood",
        &[
            "sh",
            "-c",
            "head -c 8000000 /dev/zero | tr '\\0' x | fold -w 100",
        ],
    );
    let mut conn = env.spawn(&spec).await;
    let run = collect(&mut conn, T).await;
    assert_eq!(run.dropped, 0);
    assert_eq!(run.stdout.len(), 80_000);
    env.cleanup_and_check(&spec);
}

#[tokio::test]
async fn next_event_is_cancel_safe() {
    require_root!();
    let env = Env::new("cancel");
    let spec = env.spec(
        "cancel",
        &[
            "sh",
            "-c",
            "for i in $(seq 1 20); do seq $(( (i-1)*100+1 )) $((i*100)); sleep 0.02; done",
        ],
    );
    let mut conn = env.spawn(&spec).await;
    let mut run = Run::default();
    let mut cancelled = 0u32;
    let deadline = tokio::time::Instant::now() + T;
    // Cancel the pending next_event every millisecond, as a select! with a signal channel does,
    // and send a harmless signal (SIGWINCH, ignored) each time.
    loop {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {run:?}");
        tokio::select! {
            ev = conn.next_event() => match ev.unwrap() {
                Some(ev) => run.add(ev),
                None => break,
            },
            _ = tokio::time::sleep(Duration::from_millis(1)) => {
                cancelled += 1;
                conn.signal(libc::SIGWINCH).await.unwrap();
            }
        }
    }
    assert!(cancelled > 10, "only {cancelled} cancellations");
    let want: Vec<String> = (1..=2000).map(|i| i.to_string()).collect();
    assert_eq!(run.stdout, want);
    assert_eq!(run.exit_code(), Some(0));
    env.cleanup_and_check(&spec);
}

#[tokio::test]
async fn cleanup_after_the_shim_was_killed() {
    require_root!();
    let env = Env::new("shimkill");
    let spec = env.spec("orphan", &["sh", "-c", "echo up; sleep 60"]);
    let mut conn = env.spawn(&spec).await;
    let mut run = Run::default();
    wait_line(&mut conn, &mut run, "up", T).await;
    let job_pid = run.pid.unwrap() as i32;
    drop(conn);
    let shim_pid: i32 = std::fs::read_to_string(env.state.join(&spec.id).join("shim.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill takes no pointers; the pid is the shim this test spawned.
    unsafe { libc::kill(shim_pid, libc::SIGKILL) };
    let t0 = std::time::Instant::now();
    // Gone, or a zombie (all its files closed) waiting for its reaper.
    while std::fs::read_to_string(format!("/proc/{shim_pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
    {
        assert!(t0.elapsed() < T, "shim did not die");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Without its shim the job has no status: the daemon cannot reconnect and cleans up.
    assert!(Shim::connect(&env.state, &spec.id).await.is_err());
    env.cleanup_and_check(&spec);
    let stat = std::fs::read_to_string(format!("/proc/{job_pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z"),
        "job process still running: {stat}"
    );
}
