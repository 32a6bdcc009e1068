//! Test environment: a private state dir and image store per test, the busybox layer built by
//! `host/images/build-busybox.sh`, and guards that clean up on panic.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use flynn_container::{
    cgroup_dirs, ContainerSpec, ImageStore, Resources, Shim, ShimConn, ShimEvent, Stream,
};

static SEQ: AtomicU32 = AtomicU32::new(0);

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Skips the calling test (with a note) unless running as root.
macro_rules! require_root {
    () => {
        if !crate::support::is_root() {
            eprintln!("skipped: needs root");
            return;
        }
    };
}
pub(crate) use require_root;

/// One test's directories; removed (with every job in it) on drop.
pub struct Env {
    pub base: PathBuf,
    pub state: PathBuf,
    pub layer: PathBuf,
    pub tag: String,
}

impl Env {
    pub fn new(name: &str) -> Env {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}-{}-{n}", name, std::process::id());
        let base = PathBuf::from(format!("/tmp/fct-{tag}"));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let tar = base.join("busybox.tar");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/build-busybox.sh");
        let out = Command::new("sh").arg(&script).arg(&tar).output().unwrap();
        assert!(
            out.status.success(),
            "build-busybox.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let store = ImageStore::open(&base.join("images")).unwrap();
        let layer = store.import_tar(&tar, None).unwrap().path;
        Env {
            state: base.join("state"),
            base,
            layer,
            tag,
        }
    }

    /// This test's own cgroup parent, removed on drop.
    pub fn cgroup_parent(&self) -> String {
        format!("fct-{}", self.tag)
    }

    /// A unique job id within this test.
    pub fn id(&self, name: &str) -> String {
        format!("{}-{name}", self.tag)
    }

    pub fn spec(&self, name: &str, args: &[&str]) -> ContainerSpec {
        ContainerSpec {
            id: self.id(name),
            layers: vec![self.layer.clone()],
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            cwd: String::new(),
            hostname: None,
            netns: None,
            host_network: false,
            mounts: vec![],
            resources: Resources::default(),
            cgroup_parent: self.cgroup_parent(),
            uid: 0,
            gid: 0,
            capabilities: None,
            stdin: false,
            tty: false,
            tty_size: None,
        }
    }

    pub async fn spawn(&self, spec: &ContainerSpec) -> ShimConn {
        Shim::spawn(
            Path::new(env!("CARGO_BIN_EXE_flynn-container-shim")),
            &[],
            &self.state,
            spec,
        )
        .await
        .unwrap_or_else(|e| panic!("spawning {}: {e}", spec.id))
    }

    /// Cleans up `spec`'s job and checks nothing of it is left.
    pub fn cleanup_and_check(&self, spec: &ContainerSpec) {
        Shim::cleanup(&self.state, &spec.id).unwrap();
        assert_no_leftovers(self, spec);
        assert!(!self.state.join(&spec.id).exists());
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for id in Shim::list(&self.state) {
            let _ = Shim::cleanup(&self.state, &id);
        }
        let _ = std::fs::remove_dir_all(&self.base);
        let parent = self.cgroup_parent();
        let mut dirs = vec![PathBuf::from("/sys/fs/cgroup").join(&parent)];
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            dirs.extend(rd.flatten().map(|e| e.path().join(&parent)));
        }
        for d in dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// No cgroups, overlay mounts or writable dirs of the job remain.
pub fn assert_no_leftovers(env: &Env, spec: &ContainerSpec) {
    assert_eq!(cgroup_dirs(spec), Vec::<PathBuf>::new(), "leftover cgroups");
    let job_dir = env.state.join(&spec.id);
    for d in ["rootfs", "upper", "work", "bundle", "runtime"] {
        assert!(!job_dir.join(d).exists(), "leftover {d}");
    }
    // No mount under the job dir in any process's view (the shim mounts in its own namespace).
    let needle = format!("{}/", job_dir.display());
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(mi) = std::fs::read_to_string(e.path().join("mountinfo")) {
            assert!(
                !mi.contains(&needle),
                "leftover mount of {needle} seen by {:?}",
                e.file_name()
            );
        }
    }
}

/// Output and final event of a job.
#[derive(Debug, Default)]
pub struct Run {
    pub pid: Option<u32>,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    /// A TTY job's terminal output, as it came.
    pub terminal: Vec<u8>,
    pub dropped: u64,
    pub last: Option<ShimEvent>,
    /// The pieces of a line whose newline has not come yet (stdout, stderr).
    partial: [Vec<u8>; 2],
}

impl Run {
    pub fn exit_code(&self) -> Option<i32> {
        match &self.last {
            Some(ShimEvent::Exited { code, .. }) => *code,
            _ => None,
        }
    }

    fn push_line(&mut self, stream: Stream, line: &[u8]) {
        let line = String::from_utf8_lossy(line).into_owned();
        match stream {
            Stream::Stdout => self.stdout.push(line),
            Stream::Stderr => self.stderr.push(line),
        }
    }

    pub fn add(&mut self, ev: ShimEvent) {
        match ev {
            ShimEvent::Started { pid } => self.pid = Some(pid),
            // Lines put together from their pieces, cut at MAX_LINE as the daemon's log
            // does; a last line without a newline goes at the end.
            ShimEvent::Output {
                stream,
                line,
                newline,
            } => {
                let i = stream as usize;
                self.partial[i].extend_from_slice(&line);
                while self.partial[i].len() > flynn_container::MAX_LINE {
                    let piece: Vec<u8> =
                        self.partial[i].drain(..flynn_container::MAX_LINE).collect();
                    self.push_line(stream, &piece);
                }
                if newline {
                    let l = std::mem::take(&mut self.partial[i]);
                    self.push_line(stream, &l);
                }
            }
            ShimEvent::Terminal { data } => self.terminal.extend_from_slice(&data),
            ShimEvent::Dropped { count, .. } => self.dropped += count,
            ev => {
                for stream in [Stream::Stdout, Stream::Stderr] {
                    let l = std::mem::take(&mut self.partial[stream as usize]);
                    if !l.is_empty() {
                        self.push_line(stream, &l);
                    }
                }
                assert!(
                    self.last.is_none(),
                    "two final events: {:?} {ev:?}",
                    self.last
                );
                self.last = Some(ev)
            }
        }
    }
}

pub async fn next(conn: &mut ShimConn, within: Duration) -> Option<ShimEvent> {
    tokio::time::timeout(within, conn.next_event())
        .await
        .expect("timed out waiting for a shim event")
        .expect("shim event")
}

/// Reads events until the shim is finished (bounded by `within`).
pub async fn collect_into(conn: &mut ShimConn, run: &mut Run, within: Duration) {
    let deadline = Instant::now() + within;
    while let Some(ev) = next(conn, deadline.saturating_duration_since(Instant::now())).await {
        run.add(ev);
    }
    assert!(run.last.is_some(), "finished without a final event");
}

pub async fn collect(conn: &mut ShimConn, within: Duration) -> Run {
    let mut run = Run::default();
    collect_into(conn, &mut run, within).await;
    run
}

/// Reads events until a stdout line equal to `want` arrived.
pub async fn wait_line(conn: &mut ShimConn, run: &mut Run, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let ev = next(conn, deadline.saturating_duration_since(Instant::now()))
            .await
            .unwrap_or_else(|| panic!("finished before printing {want:?}: {run:?}"));
        run.add(ev);
        if run.stdout.last().map(String::as_str) == Some(want) {
            return;
        }
        assert!(run.last.is_none(), "job ended before {want:?}: {run:?}");
    }
}

/// A network namespace created with `ip netns`, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(name: &str) -> NetNs {
        let st = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {name}");
        NetNs { name: name.into() }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    pub fn ip(&self, args: &[&str]) {
        let st = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "ip -n {} {args:?}", self.name);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
