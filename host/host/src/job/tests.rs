//! Tests of job validation, ports and environment, and the job table's state machine.

use super::*;
use flynn_api::ErrorCode;

const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn body(extra: &str) -> String {
    format!(
        r#"{{"mountspecs":[{{"type":"tar","url":"file:///x.tar","hashes":{{"sha256":"{SHA}"}}}}],
               "config":{{"args":["/bin/sh"]{extra}}}}}"#
    )
}

/// `CAP_MKNOD` is refused with a validation error (400) on a host without a device
/// filter (cgroup v2), accepted with one (v1); other capabilities either way.
#[test]
fn mknod_is_refused_without_a_device_filter() {
    let caps = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let e = check_capabilities(&caps(&["CAP_NET_ADMIN", "CAP_MKNOD"]), false).unwrap_err();
    assert_eq!(e.code, ErrorCode::ValidationError);
    assert_eq!(e.code.status(), 400);
    assert_eq!(e.detail.unwrap()["field"], "config.linux_capabilities");
    assert!(e.message.contains("CAP_MKNOD"), "{}", e.message);
    check_capabilities(&caps(&["CAP_NET_ADMIN", "CAP_MKNOD"]), true).unwrap();
    check_capabilities(&caps(&["CAP_NET_ADMIN", "CAP_SYS_PTRACE"]), false).unwrap();
    let e = check_capabilities(&caps(&["NET_ADMIN"]), true).unwrap_err();
    assert!(e.message.contains("unknown"), "{}", e.message);
    // On this host, through parse_job: as its cgroups say.
    let b = body(r#","linux_capabilities":["CAP_MKNOD"]"#);
    assert_eq!(
        parse_job("j", b.as_bytes(), true).is_ok(),
        flynn_container::device_filter()
    );
    // The process runtime grants no capabilities: nothing to refuse.
    parse_job("j", b.as_bytes(), false).unwrap();
}

#[test]
fn parse_fills_id_and_checks_it() {
    let j = parse_job("h-1", body("").as_bytes(), true).unwrap();
    assert_eq!(j.id, "h-1");
    let e = parse_job("h-2", br#"{"id":"h-1","config":{"args":["x"]}}"#, false).unwrap_err();
    assert_eq!(e.code, ErrorCode::ValidationError);
    let e = parse_job("a b", body("").as_bytes(), true).unwrap_err();
    assert_eq!(e.detail.unwrap()["field"], "id");
}

/// An id that names a file beside the jobs' container state (the spare shim's log) is
/// refused: such a job was accepted and then could never start.
#[test]
fn reserved_ids_are_refused() {
    // Named like a cgroup interface file of the parent cgroup the job's cgroup goes in.
    let cgroup_files = ["cgroup.procs", "memory.max", "pids.max", "cpu.weight"];
    for id in flynn_container::RESERVED_IDS
        .into_iter()
        .chain(cgroup_files)
    {
        let e = parse_job(id, body("").as_bytes(), true).unwrap_err();
        assert_eq!(e.status(), 400, "{id}");
        assert!(e.message.contains("is reserved"), "{id}: {}", e.message);
        assert_eq!(e.detail.unwrap()["field"], "id");
    }
    assert!(flynn_container::RESERVED_IDS.contains(&"spare.log"));
    parse_job("spare.log2", body("").as_bytes(), true).unwrap();
    parse_job("web.memory", body("").as_bytes(), true).unwrap();
    parse_job("tasks-1", body("").as_bytes(), true).unwrap();
}

#[test]
fn bad_input_table() {
    let cases: &[(&str, ErrorCode, Option<&str>)] = &[
        ("{", ErrorCode::SyntaxError, None),
        ("[1]", ErrorCode::SyntaxError, None),
        (r#"{"config":{"args":"sh"}}"#, ErrorCode::SyntaxError, None),
        (r#"{"bogus":1}"#, ErrorCode::SyntaxError, None),
        (
            r#"{"config":{"args":["sh"]}}"#,
            ErrorCode::ValidationError,
            Some("mountspecs"),
        ),
        (
            r#"{"mountspecs":[{"type":"squashfs","hashes":{}}],"config":{"args":["sh"]}}"#,
            ErrorCode::ValidationError,
            Some("mountspecs[0].type"),
        ),
        (
            r#"{"mountspecs":[{"type":"tar","hashes":{"sha256":"zz"}}],"config":{"args":["sh"]}}"#,
            ErrorCode::ValidationError,
            Some("mountspecs[0].hashes.sha256"),
        ),
    ];
    for (b, code, field) in cases {
        let e = parse_job("j", b.as_bytes(), true).unwrap_err();
        assert_eq!(e.code, *code, "{b}");
        if let Some(f) = field {
            assert_eq!(e.detail.as_ref().unwrap()["field"], *f, "{b}");
        }
    }
    let more: &[(&str, &str)] = &[
        (r#","args":[]"#, "config.args"),
        (r#","env":{"A=B":"c"}"#, "config.env"),
        (
            r#","mounts":[{"location":"rel","target":"/x"}]"#,
            "config.mounts[0]",
        ),
        (
            r#","ports":[{"port":1,"service":{"name":"a b"}}]"#,
            "config.ports[0].service.name",
        ),
        // discoverd refuses uppercase: the job would run and never be registered.
        (
            r#","ports":[{"port":1,"service":{"name":"Web"}}]"#,
            "config.ports[0].service.name",
        ),
        (r#","stop_timeout":0"#, "config.stop_timeout"),
        (
            r#","stop_timeout":18446744073709551615"#,
            "config.stop_timeout",
        ),
        (
            r#","linux_capabilities":["NET_ADMIN"]"#,
            "config.linux_capabilities",
        ),
        (r#","uid":4294967295"#, "config.uid"),
        (r#","gid":4294967295"#, "config.gid"),
        (
            r#","volumes":[{"target":"/d","volume":"v"}]"#,
            "config.volumes[0].volume",
        ),
    ];
    for (extra, field) in more {
        // `args` given twice is a duplicate-field syntax error; replace it instead.
        let b = if extra.starts_with(r#","args""#) {
            body("").replace(r#""args":["/bin/sh"]"#, &extra[1..])
        } else {
            body(extra)
        };
        let e = parse_job("j", b.as_bytes(), true).unwrap_err();
        assert_eq!(e.code, ErrorCode::ValidationError, "{b}");
        assert_eq!(e.detail.as_ref().unwrap()["field"], *field, "{b}");
    }
    let b = body("").replace(
        r#""config""#,
        r#""resources":{"memory":{"limit":-1}},"config""#,
    );
    let e = parse_job("j", b.as_bytes(), true).unwrap_err();
    assert_eq!(e.detail.unwrap()["field"], "resources.memory.limit");
}

/// The bounds the container runtime would refuse at start are 400s naming the field;
/// the values at the bounds pass.
#[test]
fn runtime_bounds_are_validation_errors() {
    let res = |r: &str| body("").replace(r#""config""#, &format!(r#""resources":{r},"config""#));
    let bad: &[(String, &str)] = &[
        (
            res(r#"{"memory":{"limit":1048575}}"#),
            "resources.memory.limit",
        ),
        (res(r#"{"cpu":{"limit":256001}}"#), "resources.cpu.limit"),
        // One share is below the kernel's least (2): refused by the container spec.
        (res(r#"{"cpu":{"limit":1}}"#), "resources.cpu.limit"),
        (res(r#"{"max_fd":{"limit":2}}"#), "resources.max_fd.limit"),
        (
            res(r#"{"max_fd":{"limit":1073741825}}"#),
            "resources.max_fd.limit",
        ),
        (
            res(&format!(
                r#"{{"max_fd":{{"limit":{}}}}}"#,
                flynn_container::max_fds_allowed() + 1
            )),
            "resources.max_fd.limit",
        ),
        (
            res(r#"{"max_procs":{"limit":0}}"#),
            "resources.max_procs.limit",
        ),
        (
            res(r#"{"max_procs":{"limit":4194305}}"#),
            "resources.max_procs.limit",
        ),
        (
            res(r#"{"temp_disk":{"limit":-5}}"#),
            "resources.temp_disk.limit",
        ),
        (body(r#","working_dir":"app""#), "config.working_dir"),
        (
            body(r#","mounts":[{"location":"/h","target":"/a/../etc"}]"#),
            "config.mounts[0].target",
        ),
        (
            body(
                r#","volumes":[{"target":"/a/..b","volume":"11111111-2222-4333-8444-555555555555"}]"#,
            ),
            "config.volumes[0].target",
        ),
        (
            body("").replace(r#"["/bin/sh"]"#, r#"["/bin/sh","a\u0000b"]"#),
            "config.args",
        ),
    ];
    for (b, field) in bad {
        let e = parse_job("j", b.as_bytes(), true).unwrap_err();
        assert_eq!(e.code, ErrorCode::ValidationError, "{b}");
        assert_eq!(e.status(), 400, "{b}");
        assert_eq!(e.detail.as_ref().unwrap()["field"], *field, "{b}");
        assert!(e.message.starts_with(field), "{b}: {}", e.message);
    }
    assert_eq!(
        parse_job("j", bad[0].0.as_bytes(), true)
            .unwrap_err()
            .message,
        "resources.memory.limit must be at least 1048576"
    );
    let ok = [
        res(
            r#"{"memory":{"limit":1048576},"cpu":{"limit":256000},"max_fd":{"limit":3},"max_procs":{"limit":1},"temp_disk":{"limit":1}}"#,
        ),
        res(&format!(
            r#"{{"cpu":{{"limit":2}},"max_fd":{{"limit":{}}},"max_procs":{{"limit":4194304}}}}"#,
            flynn_container::max_fds_allowed()
        )),
        body(r#","working_dir":"/app","mounts":[{"location":"/h","target":"/a/b..c"}]"#),
    ];
    for b in &ok {
        parse_job("j", b.as_bytes(), true).unwrap_or_else(|e| panic!("{b}: {e:?}"));
    }
}

#[test]
fn spec_fields_are_accepted() {
    let b = body(
        r#","ports":[{"port":80,"service":{"name":"web","check":{"type":"tcp","interval":1000000000}}}]"#,
    )
    .replace(
        r#""config""#,
        r#""profiles":["kvm"],"resources":{"temp_disk":{"limit":1073741824}},"config""#,
    );
    let j = parse_job("j", b.as_bytes(), true).unwrap();
    assert_eq!(j.profiles, ["kvm"]);
    assert_eq!(j.resources.temp_disk.unwrap().limit, Some(1 << 30));
    let check = j.config.ports[0].service.as_ref().unwrap().check.as_ref();
    assert_eq!(check.unwrap().kind, "tcp");
    let j = parse_job(
        "j",
        body(r#","uid":1000,"gid":50,"linux_capabilities":["CAP_NET_ADMIN"]"#).as_bytes(),
        true,
    )
    .unwrap();
    assert_eq!((j.config.uid, j.config.gid), (Some(1000), Some(50)));
    assert_eq!(j.config.linux_capabilities.unwrap(), ["CAP_NET_ADMIN"]);
}

#[test]
fn ports_and_env() {
    let b = body(
        r#","ports":[{"port":0},{"port":8080,"proto":"udp"},{"port":0}],"env":{"A":"1","PORT":"9"}"#,
    )
    .replace(
        r#""config""#,
        r#""metadata":{"flynn-controller.app":"app1","flynn-controller.type":"web"},"config""#,
    );
    let j = parse_job("h-j1", b.as_bytes(), true).unwrap();
    let ports = bind_ports(&j).unwrap();
    assert_eq!(
        ports.iter().map(|p| p.port).collect::<Vec<_>>(),
        [5000, 8080, 5002]
    );
    let env = job_env(
        &j,
        &ports,
        Some("100.100.0.5".parse().unwrap()),
        Some("http://d:1111"),
    );
    for want in [
        "A=1",
        "PORT=5000",
        "PORT_0=5000",
        "PORT_1=8080",
        "PORT_2=5002",
        "EXTERNAL_IP=100.100.0.5",
        "FLYNN_JOB_ID=h-j1",
        "FLYNN_APP_ID=app1",
        "FLYNN_PROCESS_TYPE=web",
        "DISCOVERD=http://d:1111",
    ] {
        assert!(env.iter().any(|e| e == want), "{want} not in {env:?}");
    }
    assert!(env.iter().any(|e| e.starts_with("PATH=/")));
    let meta = instance_meta(&env);
    assert_eq!(meta.len(), 3);
    assert_eq!(meta["FLYNN_APP_ID"], "app1");

    let mut bad = j.clone();
    bad.config.ports[0].proto = "sctp".into();
    assert_eq!(bind_ports(&bad).unwrap_err(), "unknown port proto \"sctp\"");
}

fn job(id: &str, app: &str) -> Job {
    let mut j = Job {
        id: id.into(),
        ..Job::default()
    };
    j.config.env.insert("FLYNN_APP_ID".into(), app.into());
    j
}

#[test]
fn state_machine() {
    let mut t = Table::default();
    t.add(job("a", "x"), "h", "t0".into()).unwrap();
    assert_eq!(
        t.add(job("a", "x"), "h", "t0".into()).unwrap_err().code,
        flynn_api::ErrorCode::Conflict
    );
    let ip = Some("10.0.0.2".parse().unwrap());
    assert_eq!(
        t.started("a", 7, ip, "t1".into()).unwrap().status,
        JobStatus::Running
    );
    assert!(t.started("a", 8, ip, "t1".into()).is_none());
    let crash = Exit {
        code: 1,
        signal: None,
        oom_killed: false,
    };
    let j = t.exited("a", crash, "t2".into()).unwrap();
    assert_eq!((j.status, j.exit_status), (JobStatus::Crashed, Some(1)));
    assert!(t.exited("a", crash, "t3".into()).is_none());
    assert_eq!(
        t.request_stop("a").unwrap_err().message,
        "host: job is already stopped"
    );
    assert_eq!(
        t.request_stop("zz").unwrap_err().code,
        ErrorCode::ObjectNotFound
    );

    // Stopped on request: SIGTERM exit is done, not crashed.
    t.add(job("b", "x"), "h", "t0".into()).unwrap();
    t.started("b", 9, None, "t1".into()).unwrap();
    assert_eq!(t.request_stop("b").unwrap(), StopAction::Signal);
    // Asked again: the first stop goes on, nothing more is sent.
    assert_eq!(t.request_stop("b").unwrap(), StopAction::None);
    let term = Exit {
        code: 143,
        signal: Some(15),
        oom_killed: false,
    };
    assert_eq!(
        t.exited("b", term, "t2".into()).unwrap().status,
        JobStatus::Done
    );

    // OOM is a crash even when stopping.
    t.add(job("c", "x"), "h", "t0".into()).unwrap();
    let oom = Exit {
        code: 137,
        signal: Some(9),
        oom_killed: true,
    };
    let j = t.exited("c", oom, "t2".into()).unwrap();
    assert_eq!((j.status, j.oom_killed), (JobStatus::Crashed, true));

    // Lost by the runtime while running (no exit status): crashed, not failed
    // ("could not start"); while being stopped: done.
    for (id, stop, want) in [
        ("r", false, JobStatus::Crashed),
        ("s", true, JobStatus::Done),
    ] {
        t.add(job(id, "x"), "h", "t0".into()).unwrap();
        t.started(id, 11, None, "t1".into()).unwrap();
        if stop {
            t.request_stop(id).unwrap();
        }
        let j = t
            .failed(id, "lost the job's shim".into(), "t2".into())
            .unwrap();
        assert_eq!(
            (j.status, j.exit_status, j.error.as_deref(), j.pid),
            (want, None, Some("lost the job's shim"), None)
        );
    }

    // Failing to start.
    t.add(job("d", "x"), "h", "t0".into()).unwrap();
    let j = t.failed("d", "no image".into(), "t1".into()).unwrap();
    assert_eq!(
        (j.status, j.error.as_deref()),
        (JobStatus::Failed, Some("no image"))
    );
    // Stopped while starting, then the start fails: done.
    t.add(job("e", "x"), "h", "t0".into()).unwrap();
    assert_eq!(t.request_stop("e").unwrap(), StopAction::Flagged);
    assert_eq!(t.request_stop("e").unwrap(), StopAction::None);
    assert_eq!(
        t.failed("e", "stopped".into(), "t1".into()).unwrap().status,
        JobStatus::Done
    );
}

/// Spec §5.2: done = exit 0, even when a process of the job was OOM-killed; the kill
/// is still reported.
#[test]
fn exit_zero_is_done_even_after_an_oom_kill() {
    let mut t = Table::default();
    t.add(job("z", "x"), "h", "t0".into()).unwrap();
    t.started("z", 10, None, "t1".into()).unwrap();
    let oom_child = Exit {
        code: 0,
        signal: None,
        oom_killed: true,
    };
    let j = t.exited("z", oom_child, "t2".into()).unwrap();
    assert_eq!(
        (j.status, j.exit_status, j.oom_killed),
        (JobStatus::Done, Some(0), true)
    );
}

#[test]
fn gc_keeps_25_per_app() {
    let mut t = Table::default();
    for i in 0..30 {
        let id = format!("j{i:02}");
        t.add(job(&id, "app"), "h", "t".into()).unwrap();
        t.exited(
            &id,
            Exit {
                code: 0,
                signal: None,
                oom_killed: false,
            },
            format!("t{i:02}"),
        );
    }
    t.add(job("other", "app2"), "h", "t".into()).unwrap();
    t.add(job("live", "app"), "h", "t".into()).unwrap();
    let removed = t.gc(Some("app"));
    assert_eq!(removed, ["j00", "j01", "j02", "j03", "j04"]);
    assert_eq!(t.len(), 27);
    assert!(t.get("live").is_some());
    assert!(t.gc(Some("app")).is_empty());
}
