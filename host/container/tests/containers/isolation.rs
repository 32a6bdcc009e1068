//! What a job can learn of, or do to, the host through what it is given: its pid namespace's
//! pid 1 (the shim's holder), read-only bind mounts, device nodes, signal dispositions.

use std::time::Duration;

use crate::support::{collect, require_root, wait_line, Env, Run};

const T: Duration = Duration::from_secs(20);

/// pid 1 of the job's namespace is the shim's holder: even a job allowed to look into other
/// processes (`CAP_SYS_PTRACE`, for strace or gdb) finds an empty, read-only root there, a
/// mount table with nothing of the host's, no command line or environment of the shim's,
/// no descriptors, no capabilities and the job's network, not the host's (`/proc/1/net`: here
/// a TCP listener and a unix socket the test opens on the host). Such a job can open the
/// holder's memory for writing (`/proc/1/mem`), so the holder runs under a seccomp filter
/// (mode 2) that leaves code put there nothing but its wait loop.
#[tokio::test]
async fn pid_1_shows_nothing_of_the_host() {
    require_root!();
    let env = Env::new("pid1");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // /proc/net/tcp: local address and port in hex, 127.0.0.1 as 0100007F.
    let host_port = format!("0100007F:{:04X}", listener.local_addr().unwrap().port());
    let _unix = std::os::unix::net::UnixListener::bind(env.base.join("host.sock")).unwrap();
    let script = "echo root:; ls -a /proc/1/root/; \
                  echo mountinfo:; cat /proc/1/mountinfo; \
                  echo cmdline:; tr '\\0' '\\n' < /proc/1/cmdline | grep .; \
                  echo environ:; tr '\\0' '\\n' < /proc/1/environ | grep .; \
                  echo fds:; ls /proc/1/fd/; \
                  echo caps:; grep -E '^Cap(Eff|Prm|Bnd|Amb)' /proc/1/status; \
                  grep -E '^NoNewPrivs' /proc/1/status; \
                  echo write:; touch /proc/1/root/x 2>/dev/null && echo wrote || echo refused; \
                  echo seccomp:; grep -E '^Seccomp:' /proc/1/status; \
                  echo net:; tail -n +2 /proc/1/net/tcp; tail -n +2 /proc/1/net/unix; \
                  tail -n +3 /proc/1/net/dev | cut -d: -f1; \
                  echo end";
    for caps in [Some(vec!["CAP_SYS_PTRACE".to_string()]), None] {
        let mut spec = env.spec("pid1", &["sh", "-c", script]);
        spec.capabilities = caps.clone();
        let mut conn = env.spawn(&spec).await;
        let run = collect(&mut conn, T).await;
        assert_eq!(run.exit_code(), Some(0), "{run:?}");
        let out = run.stdout.join("\n");
        // Nothing names the state dir (the job's own paths, the shim's arguments) or any
        // other host path.
        let base = env.base.display().to_string();
        assert!(!out.contains(&base), "{caps:?}: {out}");
        let section = |name: &str| -> Vec<&str> {
            let start = run.stdout.iter().position(|l| l == name).unwrap() + 1;
            run.stdout[start..]
                .iter()
                .take_while(|l| !l.ends_with(':') && *l != "end")
                .map(String::as_str)
                .collect()
        };
        if caps.is_some() {
            // An empty root, not the host's.
            assert_eq!(section("root:"), [".", ".."], "{out}");
            // One mount: the holder's empty root.
            let mounts = section("mountinfo:");
            assert_eq!(mounts.len(), 1, "{out}");
            assert!(mounts[0].contains(" / / ro,"), "{out}");
            assert_eq!(section("cmdline:"), ["flynn-init"], "{out}");
            assert!(section("environ:").is_empty(), "{out}");
            assert!(section("fds:").is_empty(), "{out}");
            assert_eq!(section("write:"), ["refused"], "{out}");
        } else {
            // Without CAP_SYS_PTRACE the root, environment and descriptors stay closed, the
            // mount table and command line are world-readable: still nothing of the host's.
            assert!(section("root:").is_empty(), "{out}");
            assert_eq!(section("mountinfo:").len(), 1, "{out}");
            assert_eq!(section("cmdline:"), ["flynn-init"], "{out}");
        }
        for cap in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
            assert!(
                run.stdout
                    .iter()
                    .any(|l| l.starts_with(cap) && l.ends_with("0000000000000000")),
                "{cap}: {out}"
            );
        }
        assert!(run.stdout.iter().any(|l| l == "NoNewPrivs:\t1"), "{out}");
        assert_eq!(section("seccomp:"), ["Seccomp:\t2"], "{out}");
        // The job's own network namespace: only lo, none of the host's sockets (the unix
        // socket's path is under the state dir's base, checked above).
        let net = section("net:");
        assert!(
            !net.iter().any(|l| l.contains(&host_port)),
            "{caps:?}: {out}"
        );
        let ifaces: Vec<&str> = net
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.contains(' '))
            .collect();
        assert_eq!(ifaces, ["lo"], "{caps:?}: {out}");
        env.cleanup_and_check(&spec);
    }
}

/// A host whose capability bounding set lacks `CAP_SYS_PTRACE` still runs jobs: the holder
/// is not dumpable, so the shim could not open `/proc/<holder>/ns/pid` (every start failed
/// with `EACCES`); the holder hands its namespaces over itself. The shim runs under
/// `setpriv --bounding-set -sys_ptrace`.
#[tokio::test]
async fn jobs_start_where_the_bounding_set_lacks_cap_sys_ptrace() {
    require_root!();
    let setpriv = std::path::Path::new("/usr/bin/setpriv");
    if !setpriv.exists() {
        eprintln!("skipped: no {}", setpriv.display());
        return;
    }
    let env = Env::new("noptrace");
    let spec = env.spec("noptrace", &["sh", "-c", "echo up; sleep 30"]);
    let args = [
        "--bounding-set".to_string(),
        "-sys_ptrace".to_string(),
        env!("CARGO_BIN_EXE_flynn-container-shim").to_string(),
    ];
    let mut conn = flynn_container::Shim::spawn(setpriv, &args, &env.state, &spec)
        .await
        .unwrap();
    let mut run = Run::default();
    wait_line(&mut conn, &mut run, "up", T).await;
    // The shim indeed lacks it (CAP_SYS_PTRACE is bit 19).
    let pid = std::fs::read_to_string(env.state.join(&spec.id).join("shim.pid")).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap();
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:\t"))
        .unwrap();
    let bnd = u64::from_str_radix(bnd, 16).unwrap();
    assert_eq!(bnd & (1 << 19), 0, "CapBnd {bnd:x}");
    assert_ne!(bnd, 0);
    drop(conn);
    env.cleanup_and_check(&spec);
}

/// A job starts with no signal ignored or blocked, whatever the shim ignores (the Rust runtime
/// ignores `SIGPIPE`): a writer into a closed pipe dies of `SIGPIPE` quietly, and a shell loop
/// writing into one ends.
#[tokio::test]
async fn a_job_starts_with_default_signal_dispositions() {
    require_root!();
    let env = Env::new("sigs");
    let spec = env.spec(
        "sigs",
        &[
            "sh",
            "-c",
            "grep -E '^Sig(Blk|Ign)' /proc/self/status; yes | head -1; \
             while :; do echo x; done | head -1; echo done",
        ],
    );
    let mut conn = env.spawn(&spec).await;
    let run = collect(&mut conn, T).await;
    assert_eq!(run.exit_code(), Some(0), "{run:?}");
    assert_eq!(
        run.stdout,
        [
            "SigBlk:\t0000000000000000",
            "SigIgn:\t0000000000000000",
            "y",
            "x",
            "done"
        ],
        "{run:?}"
    );
    assert!(run.stderr.is_empty(), "{run:?}");
    env.cleanup_and_check(&spec);
}

/// A tmpfs mounted by the test, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path) -> Tmpfs {
        let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid NUL-terminated strings; a null data pointer is allowed.
        let rc = unsafe {
            libc::mount(
                c"none".as_ptr(),
                c.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "mounting a tmpfs on {}", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// A read-only bind mount is read-only all the way down: a file system mounted below its
/// source on the host (here a tmpfs) is not writable through it either.
#[tokio::test]
async fn read_only_bind_mounts_are_read_only_below_too() {
    require_root!();
    let env = Env::new("rro");
    let ro = env.base.join("ro");
    let sub = ro.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    let _tmpfs = Tmpfs::mount(&sub);
    std::fs::write(sub.join("f"), "from-host\n").unwrap();
    let mut spec = env.spec(
        "rro",
        &[
            "sh",
            "-c",
            "cat /data/sub/f; \
             touch /data/sub/x 2>/dev/null && echo sub-written || echo sub-refused; \
             touch /data/x 2>/dev/null && echo top-written || echo top-refused",
        ],
    );
    spec.mounts = vec![flynn_container::BindMount {
        source: ro.clone(),
        target: "/data".into(),
        readonly: true,
    }];
    let mut conn = env.spawn(&spec).await;
    let run = collect(&mut conn, T).await;
    assert_eq!(
        run.stdout,
        ["from-host", "sub-refused", "top-refused"],
        "{run:?}"
    );
    assert!(!sub.join("x").exists());
    env.cleanup_and_check(&spec);
}

/// A block device of the host that this (root) process can open, as `(major, minor)`: what a
/// job must not open. (Some hosts forbid opening their main disk even to root.)
fn a_host_block_device() -> Option<(u32, u32)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    std::fs::read_dir("/dev").ok()?.flatten().find_map(|e| {
        if !e.file_type().ok()?.is_block_device() {
            return None;
        }
        std::fs::File::open(e.path()).ok()?;
        let rdev = e.metadata().ok()?.rdev();
        Some((libc::major(rdev), libc::minor(rdev)))
    })
}

/// A job granted `CAP_MKNOD` (accepted only on a cgroup v1 or hybrid host, where the devices
/// controller filters; skipped on a cgroup v2 host, which refuses it) can make a node for a host
/// block device but not open it: the container's device rule denies every device but the
/// standard `/dev` nodes.
#[tokio::test]
async fn a_job_that_can_mknod_cannot_open_a_host_block_device() {
    require_root!();
    if !flynn_container::device_filter() {
        eprintln!("skipped: cgroup v2 host (CAP_MKNOD is refused there)");
        return;
    }
    let Some((major, minor)) = a_host_block_device() else {
        eprintln!("skipped: no block device this host lets root open");
        return;
    };
    let env = Env::new("mknod");
    let script = format!(
        "mknod /tmp/disk b {major} {minor} && echo made; \
         head -c 1 /tmp/disk >/dev/null 2>/tmp/err && echo opened || cat /tmp/err; \
         echo x > /dev/null && echo devnull-ok"
    );
    let mut spec = env.spec("mknod", &["sh", "-c", &script]);
    spec.capabilities = Some(vec!["CAP_MKNOD".into()]);
    let mut conn = env.spawn(&spec).await;
    let run = collect(&mut conn, T).await;
    assert_eq!(
        run.stdout.first().map(String::as_str),
        Some("made"),
        "{run:?}"
    );
    assert!(run.stdout[1].contains("Operation not permitted"), "{run:?}");
    assert_eq!(run.stdout[2], "devnull-ok", "{run:?}");
    env.cleanup_and_check(&spec);
}
