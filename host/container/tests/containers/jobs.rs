//! Running jobs: output, exit status, signals, environment, namespaces, failures, concurrency.

use std::time::Duration;

use flynn_container::{Shim, ShimEvent};

use crate::support::{collect, require_root, wait_line, Env, NetNs, Run};

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn echo_hello_output_and_exit_zero() {
    require_root!();
    let env = Env::new("echo");
    let spec = env.spec("hello", &["echo", "hello"]);
    let mut conn = env.spawn(&spec).await;
    // The shim is detached: not our child, in a session of its own.
    let shim_pid: i32 = std::fs::read_to_string(env.state.join(&spec.id).join("shim.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{shim_pid}/stat")).unwrap_or_default();
    if let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) {
        let f: Vec<&str> = rest.split(' ').collect();
        assert_ne!(f[1], std::process::id().to_string(), "shim is our child");
        // SAFETY: getsid(0) has no preconditions.
        let our_sid = unsafe { libc::getsid(0) };
        assert_ne!(f[3], our_sid.to_string(), "shim is in our session");
    }
    let first = conn.next_event().await.unwrap();
    assert!(
        matches!(first, Some(ShimEvent::Started { pid }) if pid > 1),
        "{first:?}"
    );
    let run = collect(&mut conn, T).await;
    assert_eq!(run.stdout, vec!["hello"]);
    assert!(run.stderr.is_empty());
    assert_eq!(
        run.last,
        Some(ShimEvent::Exited {
            code: Some(0),
            signal: None,
            oom_killed: false
        })
    );
    assert_eq!(conn.next_event().await.unwrap(), None);
    // Gone once finished: container, cgroups, mounts, writable dirs; the status stays.
    assert_eq!(Shim::list(&env.state), vec![spec.id.clone()]);
    env.cleanup_and_check(&spec);
    assert!(Shim::list(&env.state).is_empty());
    // Idempotent.
    Shim::cleanup(&env.state, &spec.id).unwrap();
}

#[tokio::test]
async fn exit_codes_streams_and_signals() {
    require_root!();
    let env = Env::new("codes");
    let spec = env.spec("three", &["sh", "-c", "echo out; echo err >&2; exit 3"]);
    let mut conn = env.spawn(&spec).await;
    let run = collect(&mut conn, T).await;
    assert_eq!(run.stdout, vec!["out"]);
    assert_eq!(run.stderr, vec!["err"]);
    assert_eq!(run.exit_code(), Some(3));
    env.cleanup_and_check(&spec);

    // A long line is split at 64 KiB, a last line without newline still arrives.
    let spec = env.spec(
        "long",
        &[
            "sh",
            "-c",
            "head -c 70000 /dev/zero | tr '\\0' a; echo; printf tail",
        ],
    );
    let mut conn = env.spawn(&spec).await;
    let run = collect(&mut conn, T).await;
    let lens: Vec<usize> = run.stdout.iter().map(String::len).collect();
    assert_eq!(lens, vec![65536, 70000 - 65536, 4], "{lens:?}");
    assert_eq!(run.stdout[2], "tail");
    env.cleanup_and_check(&spec);

    // SIGKILL from the daemon is reported as a signal, not an OOM kill.
    let spec = env.spec("killed", &["sleep", "60"]);
    let mut conn = env.spawn(&spec).await;
    assert!(matches!(
        conn.next_event().await.unwrap(),
        Some(ShimEvent::Started { .. })
    ));
    conn.signal(9).await.unwrap();
    let run = collect(&mut conn, T).await;
    assert_eq!(
        run.last,
        Some(ShimEvent::Exited {
            code: None,
            signal: Some(9),
            oom_killed: false
        })
    );
    assert!(conn.signal(0).await.is_err(), "signal 0 is refused");
    env.cleanup_and_check(&spec);
}

#[tokio::test]
async fn sigterm_reaches_a_trap() {
    require_root!();
    let env = Env::new("trap");
    let spec = env.spec(
        "term",
        &[
            "sh",
            "-c",
            "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.05; done",
        ],
    );
    let mut conn = env.spawn(&spec).await;
    let mut run = Run::default();
    wait_line(&mut conn, &mut run, "ready", T).await;
    conn.signal(libc::SIGTERM).await.unwrap();
    crate::support::collect_into(&mut conn, &mut run, T).await;
    assert_eq!(run.stdout, vec!["ready", "got-term"]);
    assert_eq!(run.exit_code(), Some(7));
    env.cleanup_and_check(&spec);
}

/// A job that installs no handler still dies of SIGTERM at once (the daemon's stop): it is
/// not its pid namespace's init, which the kernel shields from unhandled signals. What it
/// left running in the background goes with it.
#[tokio::test]
async fn sigterm_kills_a_job_without_a_handler_and_its_leftovers() {
    require_root!();
    let env = Env::new("noh");
    let spec = env.spec("sleeper", &["sleep", "600"]);
    let mut conn = env.spawn(&spec).await;
    assert!(matches!(
        conn.next_event().await.unwrap(),
        Some(ShimEvent::Started { .. })
    ));
    let t = std::time::Instant::now();
    conn.signal(libc::SIGTERM).await.unwrap();
    let run = collect(&mut conn, T).await;
    assert_eq!(
        run.last,
        Some(ShimEvent::Exited {
            code: None,
            signal: Some(libc::SIGTERM),
            oom_killed: false
        })
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    env.cleanup_and_check(&spec);

    // A background process holding the job's stdout does not outlive the job.
    let spec = env.spec("bg", &["sh", "-c", "sleep 600 & echo started"]);
    let mut conn = env.spawn(&spec).await;
    let t = std::time::Instant::now();
    let run = collect(&mut conn, T).await;
    assert_eq!(run.stdout, vec!["started"]);
    assert_eq!(run.exit_code(), Some(0));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    env.cleanup_and_check(&spec);
}

#[tokio::test]
async fn env_cwd_hostname_and_fd_limit() {
    require_root!();
    let env = Env::new("env");
    let mut spec = env.spec(
        "env",
        &[
            "sh",
            "-c",
            "echo $FOO; echo $PATH; pwd; hostname; ulimit -n; id -u; echo $$; cat /proc/1/comm",
        ],
    );
    spec.env = vec!["FOO=bar baz".into()];
    spec.cwd = "/tmp".into();
    spec.hostname = Some("web-1".into());
    spec.resources.max_fds = Some(321);
    let mut conn = env.spawn(&spec).await;
    let run = collect(&mut conn, T).await;
    assert_eq!(run.exit_code(), Some(0), "{run:?}");
    assert_eq!(
        run.stdout[..6],
        [
            "bar baz",
            flynn_container::DEFAULT_PATH,
            "/tmp",
            "web-1",
            "321",
            "0"
        ]
    );
    // Its own pid namespace, whose init is the shim's minimal one: the job is pid 2, so
    // signals from the host reach it by their default action.
    assert_eq!(run.stdout[6..8], ["2", "flynn-init"], "{:?}", run.stdout);
    env.cleanup_and_check(&spec);
}

/// `uid`/`gid`: the job runs as that user with no supplementary groups, and holds no
/// capability (the set stays its bound); named capabilities replace the default set.
#[tokio::test]
async fn user_group_and_capabilities() {
    require_root!();
    let env = Env::new("user");
    let script = "id -u; id -g; id -G; grep -E '^Cap(Eff|Bnd)' /proc/self/status; \
                  touch /etc/x 2>/dev/null && echo wrote || echo denied";
    let mut spec = env.spec("user", &["sh", "-c", script]);
    spec.uid = 1000;
    spec.gid = 1001;
    let mut conn = env.spawn(&spec).await;
    let run = collect(&mut conn, T).await;
    assert_eq!(run.exit_code(), Some(0), "{run:?}");
    assert_eq!(run.stdout[..3], ["1000", "1001", "1001"], "{run:?}");
    assert_eq!(run.stdout[3], "CapEff:\t0000000000000000", "{run:?}");
    // The default set is still the bound.
    assert_eq!(run.stdout[4], "CapBnd:\t00000000a00425fb", "{run:?}");
    assert_eq!(run.stdout[5], "denied", "{run:?}");
    env.cleanup_and_check(&spec);

    // Root with only CAP_NET_ADMIN (bit 12): exactly that, effective and bounding.
    let mut spec = env.spec("caps", &["sh", "-c", script]);
    spec.capabilities = Some(vec!["CAP_NET_ADMIN".into()]);
    let mut conn = env.spawn(&spec).await;
    let run = collect(&mut conn, T).await;
    assert_eq!(run.exit_code(), Some(0), "{run:?}");
    assert_eq!(run.stdout[..2], ["0", "0"], "{run:?}");
    assert_eq!(run.stdout[3], "CapEff:\t0000000000001000", "{run:?}");
    assert_eq!(run.stdout[4], "CapBnd:\t0000000000001000", "{run:?}");
    // Without CAP_DAC_OVERRIDE root still owns /etc, so this is allowed.
    assert_eq!(run.stdout[5], "wrote", "{run:?}");
    env.cleanup_and_check(&spec);

    // A user with named capabilities holds them across the exec (ambient): CAP_NET_BIND_SERVICE
    // (bit 10) lets uid 1000 listen on port 80.
    let mut spec = env.spec(
        "usercaps",
        &[
            "sh",
            "-c",
            "grep -E '^Cap(Eff|Amb)' /proc/self/status; \
             nc -l -p 80 </dev/null 2>/dev/null & sleep 0.3; \
             cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | grep -q ':0050 ' && echo bound || echo not-bound",
        ],
    );
    spec.uid = 1000;
    spec.gid = 1000;
    spec.capabilities = Some(vec!["CAP_NET_BIND_SERVICE".into()]);
    let mut conn = env.spawn(&spec).await;
    let run = collect(&mut conn, T).await;
    assert_eq!(run.exit_code(), Some(0), "{run:?}");
    assert_eq!(
        run.stdout,
        [
            "CapEff:\t0000000000000400",
            "CapAmb:\t0000000000000400",
            "bound"
        ],
        "{run:?}"
    );
    env.cleanup_and_check(&spec);
}

#[tokio::test]
async fn seccomp_and_capabilities_confine_the_job() {
    require_root!();
    let env = Env::new("confine");
    let spec = env.spec(
        "confine",
        &[
            "sh",
            "-c",
            "mount -t tmpfs none /mnt 2>/dev/null && echo mounted || echo no-mount; \
             grep NoNewPrivs /proc/self/status; grep Seccomp: /proc/self/status; \
             touch /bin/written && echo writable-root; \
             mknod /tmp/disk b 8 0 2>/dev/null && echo mknod || echo no-mknod; \
             echo x > /dev/null && echo devnull-ok",
        ],
    );
    let mut conn = env.spawn(&spec).await;
    let run = collect(&mut conn, T).await;
    assert!(run.stdout.contains(&"no-mount".to_string()), "{run:?}");
    assert!(
        run.stdout.iter().any(|l| l.contains("NoNewPrivs:\t1")),
        "{run:?}"
    );
    assert!(
        run.stdout.iter().any(|l| l.contains("Seccomp:\t2")),
        "{run:?}"
    );
    // The root is writable (per-job upper dir) but the image layer is not touched.
    assert!(run.stdout.contains(&"writable-root".to_string()), "{run:?}");
    assert!(!env.layer.join("bin/written").exists());
    assert!(run.stdout.contains(&"no-mknod".to_string()), "{run:?}");
    assert!(run.stdout.contains(&"devnull-ok".to_string()), "{run:?}");
    env.cleanup_and_check(&spec);
}

#[tokio::test]
async fn bind_mounts_read_only_and_writable() {
    require_root!();
    let env = Env::new("binds");
    let ro = env.base.join("ro");
    let rw = env.base.join("rw");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::write(ro.join("config"), "from-host\n").unwrap();
    let resolv = env.base.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 10.9.8.7\n").unwrap();
    let mut spec = env.spec(
        "binds",
        &[
            "sh",
            "-c",
            "cat /data/config; touch /data/x 2>/dev/null && echo ro-written || echo ro-refused; \
             echo from-job > /out/result; cat /etc/resolv.conf",
        ],
    );
    spec.mounts = vec![
        flynn_container::BindMount {
            source: ro.clone(),
            target: "/data".into(),
            readonly: true,
        },
        flynn_container::BindMount {
            source: rw.clone(),
            target: "/out".into(),
            readonly: false,
        },
        // A single file, onto a path the image does not have.
        flynn_container::BindMount {
            source: resolv,
            target: "/etc/resolv.conf".into(),
            readonly: true,
        },
    ];
    let mut conn = env.spawn(&spec).await;
    let run = collect(&mut conn, T).await;
    assert_eq!(
        run.stdout,
        vec!["from-host", "ro-refused", "nameserver 10.9.8.7"],
        "{run:?}"
    );
    assert_eq!(
        std::fs::read_to_string(rw.join("result")).unwrap(),
        "from-job\n"
    );
    assert!(!ro.join("x").exists());
    env.cleanup_and_check(&spec);
    // The host directories are untouched by the cleanup.
    assert!(ro.join("config").exists());
}

#[tokio::test]
async fn nonexistent_binary_fails_and_leaves_nothing() {
    require_root!();
    let env = Env::new("nobin");
    let spec = env.spec("nobin", &["/no/such/program", "x"]);
    let mut conn = env.spawn(&spec).await;
    let ev = conn.next_event().await.unwrap();
    let Some(ShimEvent::Failed { reason }) = ev else {
        panic!("expected Failed, got {ev:?}");
    };
    assert!(reason.contains("/no/such/program"), "{reason}");
    assert_eq!(conn.next_event().await.unwrap(), None);
    crate::support::assert_no_leftovers(&env, &spec);
    env.cleanup_and_check(&spec);

    // A missing image layer fails the same way.
    let mut spec = env.spec("nolayer", &["true"]);
    spec.layers = vec![env.base.join("no-such-layer")];
    let mut conn = env.spawn(&spec).await;
    let ev = conn.next_event().await.unwrap();
    assert!(
        matches!(&ev, Some(ShimEvent::Failed { reason }) if reason.contains("no-such-layer")),
        "{ev:?}"
    );
    env.cleanup_and_check(&spec);

    // Invalid specs are refused before anything is created.
    let mut spec = env.spec("bad", &["true"]);
    spec.id = "bad/id".into();
    let err = Shim::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_flynn-container-shim")),
        &[],
        &env.state,
        &spec,
    )
    .await
    .err()
    .expect("bad id refused");
    assert!(err.to_string().contains("bad/id"), "{err}");
    // A duplicate id is refused.
    let spec = env.spec("dup", &["sleep", "30"]);
    let _conn = env.spawn(&spec).await;
    let err = Shim::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_flynn-container-shim")),
        &[],
        &env.state,
        &spec,
    )
    .await
    .err()
    .expect("duplicate refused");
    assert!(
        matches!(err, flynn_container::ContainerError::Exists { .. }),
        "{err}"
    );
    env.cleanup_and_check(&spec);
}

#[tokio::test]
async fn network_namespaces() {
    require_root!();
    let env = Env::new("netns");
    // No netns given: a new one with only lo, which pid 1 (the shim's holder) is in too.
    let spec = env.spec(
        "own",
        &[
            "sh",
            "-c",
            "for n in self 1; do tail -n +3 /proc/$n/net/dev | cut -d: -f1; done",
        ],
    );
    let mut conn = env.spawn(&spec).await;
    let run = collect(&mut conn, T).await;
    let ifaces: Vec<&str> = run.stdout.iter().map(|l| l.trim()).collect();
    assert_eq!(ifaces, vec!["lo", "lo"]);
    env.cleanup_and_check(&spec);

    // A pre-created netns is joined.
    let ns = NetNs::new(&format!("fct-{}", std::process::id()));
    ns.ip(&[
        "link", "add", "fctv0", "type", "veth", "peer", "name", "fctv1",
    ]);
    ns.ip(&["addr", "add", "10.250.3.7/24", "dev", "fctv0"]);
    let mut spec = env.spec(
        "joined",
        &[
            "sh",
            "-c",
            "ip -o -4 addr show dev fctv0; grep -o fctv0 /proc/1/net/dev",
        ],
    );
    spec.netns = Some(ns.path());
    let mut conn = env.spawn(&spec).await;
    let run = collect(&mut conn, T).await;
    assert_eq!(run.exit_code(), Some(0), "{run:?}");
    assert!(
        run.stdout.iter().any(|l| l.contains("10.250.3.7/24")),
        "{run:?}"
    );
    // pid 1 (the shim's holder) is in the joined namespace too.
    assert!(run.stdout.iter().any(|l| l == "fctv0"), "{run:?}");
    env.cleanup_and_check(&spec);
}

#[tokio::test]
async fn twenty_jobs_at_once() {
    require_root!();
    let env = std::sync::Arc::new(Env::new("twenty"));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let env = env.clone();
        set.spawn(async move {
            let spec = env.spec(
                &format!("j{i}"),
                &["sh", "-c", &format!("sleep 0.2; echo job-{i}")],
            );
            let mut conn = env.spawn(&spec).await;
            let run = collect(&mut conn, Duration::from_secs(60)).await;
            (i, spec, run)
        });
    }
    let mut done = 0;
    while let Some(r) = set.join_next().await {
        let (i, spec, run) = r.unwrap();
        assert_eq!(run.stdout, vec![format!("job-{i}")], "{run:?}");
        assert_eq!(run.exit_code(), Some(0));
        env.cleanup_and_check(&spec);
        done += 1;
    }
    assert_eq!(done, 20);
}

/// A job id of the longest valid length (64, e.g. `<host id>-<uuid>`) under a state dir that
/// makes the control socket's path longer than a unix socket address can hold: the shim
/// binds and the daemon connects through `/proc/self/fd`.
#[tokio::test]
async fn a_job_whose_socket_path_is_too_long_for_sun_path_runs() {
    require_root!();
    let env = Env::new("longid");
    let mut spec = env.spec("x", &["sh", "-c", "sleep 0.3; echo hi"]);
    spec.id = format!("{}-{}", env.tag, "x".repeat(64 - env.tag.len() - 1));
    assert_eq!(spec.id.len(), 64);
    let state = env.base.join("a-state-dir-of-an-ordinary-length");
    let sock = state.join(&spec.id).join("control.sock");
    assert!(sock.as_os_str().len() > 107, "{}", sock.display());
    let conn = Shim::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_flynn-container-shim")),
        &[],
        &state,
        &spec,
    )
    .await
    .unwrap_or_else(|e| panic!("spawning {}: {e}", spec.id));
    // The daemon's reconnect path too, while the job runs.
    drop(conn);
    let mut conn = Shim::connect(&state, &spec.id).await.expect("reconnecting");
    let run = collect(&mut conn, T).await;
    assert_eq!(run.stdout, vec!["hi"]);
    assert_eq!(run.exit_code(), Some(0));
    Shim::cleanup(&state, &spec.id).unwrap();
    assert!(!state.join(&spec.id).exists());
}
