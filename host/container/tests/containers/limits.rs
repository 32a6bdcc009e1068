//! Resource limits: memory (OOM kill reported), CPU quota, pids.

use std::time::{Duration, Instant};

use flynn_container::ShimEvent;

use crate::support::{collect, require_root, wait_line, Env, Run};

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn memory_limit_oom_kill_is_reported() {
    require_root!();
    let env = Env::new("oom");
    let mut spec = env.spec(
        "oom",
        &[
            "sh",
            "-c",
            "echo filling; a=xxxxxxxxxxxxxxxx; while :; do a=\"$a$a\"; done",
        ],
    );
    spec.resources.memory_bytes = Some(32 << 20);
    let mut conn = env.spawn(&spec).await;
    let run = collect(&mut conn, T).await;
    assert_eq!(run.stdout, vec!["filling"]);
    assert_eq!(
        run.last,
        Some(ShimEvent::Exited {
            code: None,
            signal: Some(9),
            oom_killed: true
        }),
        "{run:?}"
    );
    env.cleanup_and_check(&spec);

    // Where swap can be limited, memory + swap is the limit (no swapping instead of the kill).
    let mut spec = env.spec("memsw", &["sh", "-c", "echo up; sleep 30"]);
    spec.resources.memory_bytes = Some(48 << 20);
    let mut conn = env.spawn(&spec).await;
    let mut run = Run::default();
    wait_line(&mut conn, &mut run, "up", T).await;
    for d in flynn_container::cgroup_dirs(&spec) {
        for (file, want) in [
            ("memory.limit_in_bytes", 48u64 << 20),
            ("memory.memsw.limit_in_bytes", 48 << 20),
            ("memory.max", 48 << 20),
        ] {
            if let Ok(v) = std::fs::read_to_string(d.join(file)) {
                assert_eq!(v.trim().parse::<u64>().unwrap(), want, "{file}");
            }
        }
    }
    conn.signal(9).await.unwrap();
    crate::support::collect_into(&mut conn, &mut run, T).await;
    env.cleanup_and_check(&spec);
}

fn cpu_usage_ns(spec: &flynn_container::ContainerSpec) -> u64 {
    for d in flynn_container::cgroup_dirs(spec) {
        if let Ok(s) = std::fs::read_to_string(d.join("cpuacct.usage")) {
            return s.trim().parse().unwrap();
        }
        if let Ok(s) = std::fs::read_to_string(d.join("cpu.stat")) {
            if let Some(us) = s.lines().find_map(|l| l.strip_prefix("usage_usec ")) {
                return us.trim().parse::<u64>().unwrap() * 1000;
            }
        }
    }
    panic!("no cpu accounting for {}", spec.id);
}

#[tokio::test]
async fn cpu_quota_holds() {
    require_root!();
    let env = Env::new("cpu");
    // Two busy loops against a quota of a fifth of one core.
    let mut spec = env.spec(
        "cpu",
        &[
            "sh",
            "-c",
            "(while :; do :; done) & echo busy; while :; do :; done",
        ],
    );
    spec.resources.cpu_millis = Some(200);
    let mut conn = env.spawn(&spec).await;
    let mut run = Run::default();
    wait_line(&mut conn, &mut run, "busy", T).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (t0, u0) = (Instant::now(), cpu_usage_ns(&spec));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (wall, used) = (t0.elapsed(), cpu_usage_ns(&spec) - u0);
    conn.signal(9).await.unwrap();
    crate::support::collect_into(&mut conn, &mut run, T).await;
    let allowed = wall.as_nanos() as f64 * 0.2;
    let used = used as f64;
    // Quota plus one period of slack; and the loops did run.
    assert!(used <= allowed + 100e6, "used {used} ns of CPU in {wall:?}");
    assert!(
        used >= allowed * 0.3,
        "used only {used} ns of CPU in {wall:?}"
    );
    env.cleanup_and_check(&spec);
}

/// A weight alone (what flynn-host gives a job's `cpu` limit) sets `cpu.shares` and leaves the
/// CFS quota off, so the job may use idle cores.
#[tokio::test]
async fn cpu_shares_set_the_weight_and_no_quota() {
    require_root!();
    let env = Env::new("shares");
    let mut spec = env.spec("shares", &["sh", "-c", "echo up; sleep 30"]);
    spec.resources.cpu_shares = Some(512);
    let mut conn = env.spawn(&spec).await;
    let mut run = Run::default();
    wait_line(&mut conn, &mut run, "up", T).await;
    let read = |file: &str| -> Option<String> {
        flynn_container::cgroup_dirs(&spec)
            .iter()
            .find_map(|d| std::fs::read_to_string(d.join(file)).ok())
            .map(|s| s.trim().to_string())
    };
    let (shares, quota, max, weight) = (
        read("cpu.shares"),
        read("cpu.cfs_quota_us"),
        read("cpu.max"),
        read("cpu.weight"),
    );
    conn.signal(9).await.unwrap();
    crate::support::collect_into(&mut conn, &mut run, T).await;
    if let Some(shares) = shares {
        // cgroup v1
        assert_eq!(shares, "512");
        assert_eq!(quota.as_deref(), Some("-1"), "a quota was set");
    } else {
        // cgroup v2: shares are converted to a weight; `max` means no quota.
        assert!(weight.is_some_and(|w| w != "100"), "no weight set");
        assert!(
            max.is_some_and(|m| m.starts_with("max ")),
            "a quota was set"
        );
    }
    env.cleanup_and_check(&spec);
}

#[tokio::test]
async fn pids_limit_holds() {
    require_root!();
    let env = Env::new("pids");
    let mut spec = env.spec(
        "pids",
        &[
            "sh",
            "-c",
            "n=0; for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 5 & n=$((n+1)); done; \
             echo spawned; cat /sys/fs/cgroup/pids/pids.current 2>/dev/null; kill $(jobs -p) 2>/dev/null; exit 0",
        ],
    );
    spec.resources.pids = Some(5);
    let mut conn = env.spawn(&spec).await;
    let run = collect(&mut conn, T).await;
    // Forks beyond the limit fail: the shell says so on stderr.
    assert!(
        run.stderr.iter().any(|l| l.contains("fork")),
        "no fork failure: {run:?}"
    );
    env.cleanup_and_check(&spec);
}
