//! Spare shims: started before the job, handed it, then indistinguishable from a job's own
//! shim (events, reconnect, cleanup); a dead or retired spare never fails a job.

use std::path::Path;
use std::time::Duration;

use flynn_container::{Shim, ShimEvent};

use crate::support::{collect, require_root, wait_line, Env, Run};

const T: Duration = Duration::from_secs(20);

fn shim_exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_flynn-container-shim"))
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
}

async fn wait_dead(pid: i32) {
    let t0 = std::time::Instant::now();
    while alive(pid) {
        assert!(t0.elapsed() < T, "process {pid} did not exit");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_spare_runs_the_job_and_is_then_its_shim() {
    require_root!();
    let env = Env::new("spare");
    let spare = Shim::spawn_spare(shim_exe(), &[], &env.state)
        .await
        .unwrap();
    let spare_pid = spare.pid();
    assert!(alive(spare_pid));
    // Waiting for a job, it is not a job: nothing to list or adopt.
    assert!(Shim::list(&env.state).is_empty());
    let spec = env.spec("job", &["sh", "-c", "echo up; echo err >&2; sleep 60"]);
    let mut conn = Shim::spawn_using(Some(spare), shim_exe(), &[], &env.state, &spec)
        .await
        .unwrap();
    // The spare itself took the job.
    let shim_pid: i32 = std::fs::read_to_string(env.state.join(&spec.id).join("shim.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(shim_pid, spare_pid);
    let mut run = Run::default();
    wait_line(&mut conn, &mut run, "up", T).await;
    assert!(run.pid.is_some_and(|p| p > 1));
    // Its stderr is now the job's shim log.
    assert_eq!(
        std::fs::read_link(format!("/proc/{shim_pid}/fd/2")).unwrap(),
        env.state.join(&spec.id).join("shim.log")
    );
    // A reconnect (as after a daemon restart) finds it like any shim.
    drop(conn);
    assert_eq!(Shim::list(&env.state), vec![spec.id.clone()]);
    let mut conn = Shim::connect(&env.state, &spec.id).await.unwrap();
    conn.signal(libc::SIGKILL).await.unwrap();
    let run = collect(&mut conn, T).await;
    assert!(
        matches!(
            run.last,
            Some(ShimEvent::Exited {
                signal: Some(9),
                ..
            })
        ),
        "{:?}",
        run.last
    );
    env.cleanup_and_check(&spec);
    wait_dead(shim_pid).await;
}

#[tokio::test]
async fn cleanup_kills_a_spare_that_holds_a_running_job() {
    require_root!();
    let env = Env::new("sparekill");
    let spare = Shim::spawn_spare(shim_exe(), &[], &env.state)
        .await
        .unwrap();
    let pid = spare.pid();
    let spec = env.spec("job", &["sh", "-c", "echo up; sleep 60"]);
    let mut conn = Shim::spawn_using(Some(spare), shim_exe(), &[], &env.state, &spec)
        .await
        .unwrap();
    let mut run = Run::default();
    wait_line(&mut conn, &mut run, "up", T).await;
    drop(conn);
    // Cleanup must recognise the spare as the job's shim (it is not named on its command
    // line) and stop it with the job.
    env.cleanup_and_check(&spec);
    wait_dead(pid).await;
}

#[tokio::test]
async fn a_dead_or_retired_spare_does_not_fail_the_job() {
    require_root!();
    let env = Env::new("sparedead");
    // Killed before it was used: the job gets a new shim.
    let spare = Shim::spawn_spare(shim_exe(), &[], &env.state)
        .await
        .unwrap();
    let dead = spare.pid();
    // SAFETY: kill takes no pointers; the pid is the spare this test started.
    unsafe { libc::kill(dead, libc::SIGKILL) };
    wait_dead(dead).await;
    let spec = env.spec("job", &["echo", "hello"]);
    let mut conn = Shim::spawn_using(Some(spare), shim_exe(), &[], &env.state, &spec)
        .await
        .unwrap();
    let run = collect(&mut conn, T).await;
    assert_eq!(run.stdout, vec!["hello"]);
    assert_eq!(run.exit_code(), Some(0));
    let shim_pid: i32 = std::fs::read_to_string(env.state.join(&spec.id).join("shim.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_ne!(shim_pid, dead);
    env.cleanup_and_check(&spec);
    // Dropped unused: it sees end-of-file and exits.
    let spare = Shim::spawn_spare(shim_exe(), &[], &env.state)
        .await
        .unwrap();
    let pid = spare.pid();
    assert!(alive(pid));
    drop(spare);
    wait_dead(pid).await;
}

/// A state dir reached through a symlink (flynn-host's `--state-dir` may be one, or relative):
/// cleanup under that path still recognises the spare that took the job as its shim (the
/// spare's stderr is the job's log under the resolved path) and stops it, rather than
/// deleting its directory under it and leaving it running.
#[tokio::test]
async fn cleanup_through_a_symlinked_state_dir_kills_the_spare() {
    require_root!();
    let env = Env::new("sparelink");
    std::fs::create_dir_all(&env.state).unwrap();
    let link = env.base.join("state-link");
    std::os::unix::fs::symlink(&env.state, &link).unwrap();
    let spare = Shim::spawn_spare(shim_exe(), &[], &link).await.unwrap();
    let pid = spare.pid();
    let spec = env.spec("job", &["sh", "-c", "echo up; sleep 60"]);
    let mut conn = Shim::spawn_using(Some(spare), shim_exe(), &[], &link, &spec)
        .await
        .unwrap();
    let mut run = Run::default();
    wait_line(&mut conn, &mut run, "up", T).await;
    drop(conn);
    Shim::cleanup(&link, &spec.id).unwrap();
    // Cleanup stops waiting once the shim's command line reads empty, a moment before it is
    // a zombie and its mount namespace (which the leftover check below looks through) is
    // gone: a spare cleanup missed would still be running its `sleep 60` at the deadline.
    wait_dead(pid).await;
    assert!(!env.state.join(&spec.id).exists());
    crate::support::assert_no_leftovers(&env, &spec);
}
