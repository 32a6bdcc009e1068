//! The `host` harness: flynn-host's job start and stop latency against Debian's `runc` on the
//! same image, and the memory of the daemon and its per-job shims with many jobs (root only).
//!
//! The harness starts a release `flynn-host` with its own state directory, host id, bridge,
//! address block and cgroup parent (all carrying the harness's pid), and builds the busybox
//! image with `host/images/build-busybox.sh`.
//!
//! Latency, per round, the three variants in a balanced order that changes every round
//! ([`crate::order`]):
//! - `flynn-host`: `PUT /host/jobs/:id` (busybox `sh` that traps SIGTERM) → the job's `start`
//!   event on the SSE stream of `GET /host/jobs` (the shim reported the process started); then
//!   until a process of the job's cgroup has a SIGTERM handler (the trap is installed: the
//!   shell is really running); `DELETE` → the job's `stop` event (done).
//! - `runc`: `runc run -d` on a bundle whose `config.json` is the one flynn-host's shim wrote
//!   for its own job (same namespaces, seccomp profile, capabilities, masked paths) with the root
//!   on an overlay of the same image mounted once up front and new namespaces of each type
//!   instead of the job's (the shim's paths name the job's own); until `runc run -d` returns, then until the trap is installed; `runc kill TERM`,
//!   the process gone, `runc delete`.
//! - `flynn-host`, `host_network` job: the same without the job's own network namespace, veth
//!   and address, which shows the network's share.
//!
//! So flynn-host's numbers include what `runc` is spared: the HTTP API, the layer lookup, the
//! overlay mount, the job's netns + veth + address on the bridge, and the state file writes.
//! A round without a trap (`exec sleep`, `stop_timeout` 1 s) shows the SIGTERM → SIGKILL path.
//!
//! Memory: `--jobs` long-running jobs started through the API at once; then the daemon's VmRSS
//! (that one process) and every shim's VmRSS and PSS; then all are stopped.
//!
//! Cleanup, also on error and panic: jobs stopped through the API while the daemon lives; then
//! the daemon killed, leftover shims and job processes killed (by shim pid file and cgroup),
//! runc containers deleted, mounts under the harness's directory unmounted, the jobs' netns and
//! veths, the cgroups and the bridge removed, the directory deleted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::procs::{Proc, TempDir};

pub struct Options {
    /// Measured rounds (one unrecorded warm-up round runs first).
    pub rounds: usize,
    /// Rounds of the no-trap stop case (0 skips it).
    pub no_trap_rounds: usize,
    /// Jobs running at once for the memory measurement (0 skips it).
    pub jobs: usize,
    /// The `flynn-host` binary (`cargo build --release -p flynn-host`).
    pub host_bin: PathBuf,
    /// The jobs' address block; default `100.100.<100 + pid % 100>.0/24`.
    pub block: Option<String>,
    pub out: Option<PathBuf>,
    pub command: String,
}

/// busybox `sh` as the job's init: traps SIGTERM, prints a line, waits on a background sleep
/// (a trapped signal interrupts `wait`, not a foreground command).
const TRAP_SCRIPT: &str = "trap 'exit 0' TERM; echo ready; sleep 600 & wait";
/// The init ignores SIGTERM (a pid namespace's init has no default action): stop needs SIGKILL.
const NO_TRAP_SCRIPT: &str = "echo ready; exec sleep 600";
/// `stop_timeout` of the no-trap case, seconds.
const NO_TRAP_TIMEOUT_S: u64 = 1;
/// Bound on any single wait for an event or a process.
const WAIT: Duration = Duration::from_secs(60);

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Bound on one HTTP request to the daemon (`PUT`, `DELETE`; the first `PUT` imports the
/// image layer).
const REQUEST_TIMEOUT: Duration = WAIT;
/// Bound on building the busybox image.
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);

/// Waits for `child` (its output, when piped) up to `timeout`; SIGKILLs it after that. The
/// wait is a blocking `waitpid` on a helper thread, so the caller sees the exit at once (no
/// polling interval added to a timed command).
fn wait_bounded(child: std::process::Child, what: &str, timeout: Duration) -> Result<Output> {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("wait".into())
        .spawn(move || {
            let _ = tx.send(child.wait_with_output());
        })
        .context("spawning a wait thread")?;
    match rx.recv_timeout(timeout) {
        Ok(out) => out.with_context(|| format!("waiting for {what}")),
        Err(_) => {
            // Not reaped yet (the thread would have sent), so the pid is still the child's.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = rx.recv_timeout(Duration::from_secs(5));
            bail!("{what} did not finish within {timeout:?}; killed")
        }
    }
}

/// Runs a command to completion, bounded by [`WAIT`]; its stdout, or an error with its stderr.
fn run(args: &[&str]) -> Result<String> {
    run_for(args, WAIT)
}

/// [`run`] with its own bound.
fn run_for(args: &[&str], timeout: Duration) -> Result<String> {
    let child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {args:?}"))?;
    let out = wait_bounded(child, &format!("{args:?}"), timeout)?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// flynn-network's `job::short_id` (FNV-1a 64 of the job id, top 48 bits in hex): the job's
/// netns is `/run/netns/flynn-<short>` and its host veth `flv<short>`.
fn short_id(job_id: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in job_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{:012x}", h >> 16)
}

/// `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Proportional set size in KiB (shared pages divided among the processes mapping them).
fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Has `pid` a SIGTERM handler installed?
fn catches_term(pid: u32) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (15 - 1)) != 0)
}

/// Gone, or a zombie.
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(text) => text
            .rfind(')')
            .and_then(|i| text[i + 1..].split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
    }
}

/// The cgroup roots to look for a job's cgroup in: unified first, then v1 controllers that
/// every runtime populates.
const CGROUP_ROOTS: [&str; 5] = ["", "pids", "memory", "freezer", "devices"];

/// Pids in the cgroup `rel` (e.g. `flynn-perf-1/job`), from the first hierarchy that has it.
fn cgroup_procs(rel: &str) -> Vec<u32> {
    for root in CGROUP_ROOTS {
        let path = Path::new("/sys/fs/cgroup").join(root).join(rel);
        if let Ok(text) = std::fs::read_to_string(path.join("cgroup.procs")) {
            let pids: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
            if !pids.is_empty() {
                return pids;
            }
        }
    }
    Vec::new()
}

/// Waits (busy, 200 µs steps) until a process of cgroup `rel` has a SIGTERM handler.
fn wait_trap(rel: &str) -> Result<Instant> {
    let deadline = Instant::now() + WAIT;
    loop {
        if cgroup_procs(rel).into_iter().any(catches_term) {
            return Ok(Instant::now());
        }
        ensure!(
            Instant::now() < deadline,
            "no process of cgroup {rel} installed its SIGTERM trap within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// What has to go when the harness ends: [`Leftovers::remove`] runs from [`Lab::teardown`]
/// (also on drop) and from the signal hook. Also used by `overlay --deployed --via-host` for
/// its daemons (one per host namespace, no bridge of their own to remove).
pub(crate) struct Leftovers {
    /// The daemon's state directory is `<dir>/state`.
    dir: PathBuf,
    /// The bridge to delete in the harness's network namespace, if it made one there.
    bridge: Option<String>,
    cgroup_parent: String,
    /// Every job id submitted to the daemon.
    jobs: Vec<String>,
    /// runc containers that may exist.
    runc_ids: Vec<String>,
    /// The `runc run -d` in progress, if any (killed first on a signal, so it creates no
    /// container after the cleanup).
    runc_running: Option<u32>,
    removed: bool,
}

impl Leftovers {
    /// Nothing to remove yet: a daemon with state directory `<dir>/state` and cgroup parent
    /// `cgroup_parent`.
    pub(crate) fn new(dir: PathBuf, bridge: Option<String>, cgroup_parent: String) -> Leftovers {
        Leftovers {
            dir,
            bridge,
            cgroup_parent,
            jobs: Vec::new(),
            runc_ids: Vec::new(),
            runc_running: None,
            removed: false,
        }
    }

    /// Job `id` was (or is about to be) submitted to the daemon.
    pub(crate) fn add_job(&mut self, id: &str) {
        self.jobs.push(id.to_string());
    }

    /// Removes everything the harness made (the daemon is already dead); never fails.
    pub(crate) fn remove(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        if let Some(pid) = self.runc_running.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Shims are session leaders of their own: kill what is left by pid file and cgroup.
        let containers = self.dir.join("state/containers");
        for entry in std::fs::read_dir(&containers)
            .into_iter()
            .flatten()
            .flatten()
        {
            // Only a shim (its command line says so): a stale pid file may name a pid reused
            // by something else since.
            let shim = |pid: &i32| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a.starts_with(b"--flynn-shim")))
            };
            if let Some(pid) = std::fs::read_to_string(entry.path().join("shim.pid"))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
                .filter(shim)
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let runc_root = self.dir.join("runc-root");
        for id in &self.runc_ids {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(&runc_root)
                .args(["delete", "--force", id])
                .stderr(Stdio::null())
                .status();
        }
        for id in self.jobs.iter().chain(&self.runc_ids) {
            for pid in cgroup_procs(&format!("{}/{id}", self.cgroup_parent)) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        // Mounts under our directory (job roots, the runc bundle root), deepest first.
        let prefix = self.dir.to_string_lossy().into_owned();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&prefix))
            .map(str::to_string)
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
        // Everything the daemon's allocator names: jobs and its pool of ready namespaces
        // (`pool/...`), which a killed daemon leaves behind.
        let owners: Vec<String> = std::fs::read(self.dir.join("state/job-ips.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["owners"].as_object().map(|o| o.keys().cloned().collect()))
            .unwrap_or_default();
        for id in self.jobs.iter().chain(&owners) {
            let short = short_id(id);
            if Path::new(&format!("/run/netns/flynn-{short}")).exists() {
                let _ = Command::new("ip")
                    .args(["netns", "del", &format!("flynn-{short}")])
                    .status();
            }
            let veth = format!("flv{short}");
            if Path::new("/sys/class/net").join(&veth).exists() {
                let _ = Command::new("ip")
                    .args(["link", "del", &veth])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        if let Some(bridge) = &self.bridge {
            if Path::new("/sys/class/net").join(bridge).exists() {
                let _ = Command::new("ip").args(["link", "del", bridge]).status();
            }
        }
        // Cgroups: the jobs' (normally already gone), then the parent, in every hierarchy.
        for ctrl in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .chain([PathBuf::from("/sys/fs/cgroup")])
        {
            let parent = ctrl.join(&self.cgroup_parent);
            if !parent.is_dir() {
                continue;
            }
            for child in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                if child.path().is_dir() {
                    let _ = std::fs::remove_dir(child.path());
                }
            }
            let _ = std::fs::remove_dir(&parent);
        }
    }
}

/// Everything the harness creates; [`Lab::teardown`] (also run on drop) removes it.
struct Lab {
    tmp: TempDir,
    host_id: String,
    bridge: String,
    block: String,
    cgroup_parent: String,
    daemon: Option<Proc>,
    /// `http://127.0.0.1:port`, once the daemon listens.
    api: String,
    left: Arc<Mutex<Leftovers>>,
    hook: u64,
}

impl Lab {
    fn new(block: Option<String>) -> Result<Lab> {
        let pid = std::process::id();
        let tmp = TempDir::new("flynn-perf-host")?;
        let bridge = format!("fpb{pid}");
        let cgroup_parent = format!("flynn-perf-{pid}");
        let left = Arc::new(Mutex::new(Leftovers::new(
            tmp.path().to_path_buf(),
            Some(bridge.clone()),
            cgroup_parent.clone(),
        )));
        let on_signal = left.clone();
        let hook = crate::procs::add_hook(Box::new(move || lock(&on_signal).remove()));
        Ok(Lab {
            tmp,
            host_id: format!("fp{pid}"),
            bridge,
            block: block.unwrap_or_else(|| format!("100.100.{}.0/24", 100 + pid % 100)),
            cgroup_parent,
            daemon: None,
            api: String::new(),
            left,
            hook,
        })
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn state(&self) -> PathBuf {
        self.dir().join("state")
    }

    fn runc_root(&self) -> PathBuf {
        self.dir().join("runc-root")
    }

    fn bundle(&self) -> PathBuf {
        self.dir().join("runc-bundle")
    }

    fn job_id(&self, name: &str) -> String {
        let id = format!("{}-{name}", self.host_id);
        lock(&self.left).add_job(&id);
        id
    }

    fn runc_deleted(&self, id: &str) {
        lock(&self.left).runc_ids.retain(|i| i != id);
    }

    fn cgroup(&self, id: &str) -> String {
        format!("{}/{id}", self.cgroup_parent)
    }

    /// Starts the daemon and waits for its `listening api=ADDR` line.
    fn start_daemon(&mut self, bin: &Path) -> Result<()> {
        let log = self.dir().join("flynn-host.log");
        let mut cmd = Command::new(bin);
        cmd.args(["--addr", "127.0.0.1:0", "--runtime", "container"])
            .arg("--state-dir")
            .arg(self.state())
            .args(["--id", &self.host_id, "--bridge-name", &self.bridge])
            .args([
                "--block",
                &self.block,
                "--cgroup-parent",
                &self.cgroup_parent,
            ]);
        clean_env(&mut cmd);
        let mut proc = Proc::spawn("flynn-host", cmd, &log)?;
        let line = proc.wait_for_line("listening api=", Duration::from_secs(30))?;
        let addr = line["listening api=".len()..]
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        self.api = format!("http://{addr}");
        self.daemon = Some(proc);
        Ok(())
    }

    fn daemon_pid(&self) -> Result<u32> {
        Ok(self.daemon.as_ref().context("no daemon")?.pid())
    }

    /// Stops every active job through the API and waits (bounded) until none is active.
    async fn stop_all_jobs(&self, http: &reqwest::Client) -> Result<()> {
        if self.api.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            let body = http
                .get(format!("{}/host/jobs?active=true", self.api))
                .send()
                .await?
                .bytes()
                .await?;
            let active: HashMap<String, Value> =
                serde_json::from_slice(&body).context("GET /host/jobs?active=true")?;
            if active.is_empty() {
                return Ok(());
            }
            for (id, job) in &active {
                if !job["force_stop"].as_bool().unwrap_or(false) {
                    let _ = http
                        .delete(format!("{}/host/jobs/{id}", self.api))
                        .send()
                        .await;
                }
            }
            ensure!(
                Instant::now() < deadline,
                "{} jobs still active after 45 s",
                active.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Kills the daemon and removes everything; safe to call more than once, never fails.
    fn teardown(&mut self) {
        drop(self.daemon.take());
        lock(&self.left).remove();
        crate::procs::remove_hook(self.hook);
    }
}

/// A daemon the harness starts takes nothing from the caller's environment that would send
/// its jobs elsewhere (a real discoverd, log aggregator, image or volume directory, when
/// run on a Flynn host): every `FLYNN_*` variable and `DISCOVERD` go; logging is `warn`.
pub(crate) fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_str()
            .is_some_and(|k| k.starts_with("FLYNN_") || k == "DISCOVERD")
        {
            cmd.env_remove(&k);
        }
    }
    cmd.env("FLYNN_LOG", "warn");
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// The job events of `GET /host/jobs` (SSE), each stamped when its chunk was read.
struct Events {
    resp: reqwest::Response,
    buf: Vec<u8>,
    ready: std::collections::VecDeque<(Instant, Value)>,
}

impl Events {
    async fn open(http: &reqwest::Client, api: &str) -> Result<Events> {
        let resp = http
            .get(format!("{api}/host/jobs"))
            .header("accept", "text/event-stream")
            .send()
            .await
            .context("GET /host/jobs (SSE)")?;
        ensure!(
            resp.status().is_success(),
            "GET /host/jobs: {}",
            resp.status()
        );
        Ok(Events {
            resp,
            buf: Vec::new(),
            ready: Default::default(),
        })
    }

    async fn next(&mut self, deadline: Instant) -> Result<(Instant, Value)> {
        loop {
            if let Some(ev) = self.ready.pop_front() {
                return Ok(ev);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(left, self.resp.chunk())
                .await
                .context("timed out waiting for a job event")??
                .context("the event stream ended")?;
            let at = Instant::now();
            self.buf.extend_from_slice(&chunk);
            while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&block);
                if text.lines().any(|l| l == "event: error") {
                    bail!("event stream: {}", text.trim());
                }
                let data: String = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if !data.is_empty() {
                    self.ready
                        .push_back((at, serde_json::from_str(&data).context("event JSON")?));
                }
            }
        }
    }

    /// The time of job `id`'s next `kind` event; an `error` event (or a `stop` when waiting
    /// for `start`) of that job is an error with the job's reason.
    async fn wait_for(&mut self, id: &str, kind: &str) -> Result<(Instant, Value)> {
        let deadline = Instant::now() + WAIT;
        loop {
            let (at, ev) = self.next(deadline).await?;
            if ev["job_id"] != id {
                continue;
            }
            let k = ev["event"].as_str().unwrap_or_default();
            if k == kind {
                return Ok((at, ev));
            }
            if k == "error" || (k == "stop" && kind == "start") {
                bail!(
                    "job {id}: {k} while waiting for {kind}: {}",
                    ev["job"]["error"].as_str().unwrap_or("(no error given)")
                );
            }
        }
    }
}

/// One start and stop.
#[derive(Clone, Copy, Default)]
struct Sample {
    /// Request sent → process running (`start` event / `runc run -d` returned).
    running: Duration,
    /// Request sent → the shell's SIGTERM trap installed.
    trap: Option<Duration>,
    /// Stop requested → stopped and cleaned up (`stop` event / `runc delete` returned).
    stop: Duration,
}

/// The busybox layer tarball and its checksum.
pub(crate) struct Image {
    tar: PathBuf,
    sha256: String,
}

/// Builds the busybox image into `dir` with `host/images/build-busybox.sh`.
pub(crate) fn build_image(dir: &Path) -> Result<Image> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../host/images/build-busybox.sh");
    ensure!(
        script.exists(),
        "{} not found (run from the repository)",
        script.display()
    );
    let tar = dir.join("busybox.tar");
    run_for(
        &["sh", &script.to_string_lossy(), &tar.to_string_lossy()],
        BUILD_TIMEOUT,
    )?;
    let sum = run(&["sha256sum", &tar.to_string_lossy()])?;
    let sha256 = sum
        .split_whitespace()
        .next()
        .context("sha256sum output")?
        .to_string();
    Ok(Image { tar, sha256 })
}

/// The `PUT /host/jobs/:id` body of a busybox job running `sh -c script`.
pub(crate) fn job_body(
    id: &str,
    img: &Image,
    script: &str,
    stop_timeout: Option<u64>,
    host_network: bool,
) -> String {
    let mut config = json!({ "args": ["/bin/sh", "-c", script], "host_network": host_network });
    if let Some(t) = stop_timeout {
        config["stop_timeout"] = json!(t);
    }
    json!({
        "id": id,
        "mountspecs": [{
            "type": "tar",
            "url": format!("file://{}", img.tar.display()),
            "hashes": {"sha256": img.sha256},
        }],
        "config": config,
    })
    .to_string()
}

struct Ctx<'a> {
    http: reqwest::Client,
    events: Events,
    img: &'a Image,
}

/// `PUT /host/jobs/:id` to the daemon at `api` (`http://host:port`).
pub(crate) async fn put_job(
    http: &reqwest::Client,
    api: &str,
    id: &str,
    body: String,
) -> Result<()> {
    let resp = http
        .put(format!("{api}/host/jobs/{id}"))
        .header("content-type", "application/json")
        .body(body)
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .with_context(|| format!("PUT job {id}"))?;
    let status = resp.status();
    ensure!(
        status.is_success(),
        "PUT job {id}: {status} {}",
        resp.text().await.unwrap_or_default()
    );
    Ok(())
}

/// `DELETE /host/jobs/:id` (stop) to the daemon at `api`.
pub(crate) async fn delete_job(http: &reqwest::Client, api: &str, id: &str) -> Result<()> {
    let resp = http
        .delete(format!("{api}/host/jobs/{id}"))
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .with_context(|| format!("DELETE job {id}"))?;
    let status = resp.status();
    ensure!(
        status.is_success(),
        "DELETE job {id}: {status} {}",
        resp.text().await.unwrap_or_default()
    );
    Ok(())
}

/// One flynn-host job: PUT → start event (→ trap installed) ; DELETE → stop event.
/// `host_network`: the job stays in the host's network namespace (no netns, veth, address).
async fn flynn_once(
    ctx: &mut Ctx<'_>,
    lab: &Lab,
    name: &str,
    trap: bool,
    host_network: bool,
) -> Result<Sample> {
    let id = lab.job_id(name);
    let (script, timeout) = if trap {
        (TRAP_SCRIPT, None)
    } else {
        (NO_TRAP_SCRIPT, Some(NO_TRAP_TIMEOUT_S))
    };
    let body = job_body(&id, ctx.img, script, timeout, host_network);
    let t0 = Instant::now();
    put_job(&ctx.http, &lab.api, &id, body).await?;
    let (at, _) = ctx.events.wait_for(&id, "start").await?;
    let running = at - t0;
    let trap_at = if trap {
        Some(wait_trap(&lab.cgroup(&id))? - t0)
    } else {
        // Let `exec sleep` happen before the stop.
        tokio::time::sleep(Duration::from_millis(100)).await;
        None
    };
    let t1 = Instant::now();
    delete_job(&ctx.http, &lab.api, &id).await?;
    let (at, ev) = ctx.events.wait_for(&id, "stop").await?;
    ensure!(
        ev["job"]["status"] == json!(2),
        "job {id} ended with status {} (expected 2, done)",
        ev["job"]["status"]
    );
    Ok(Sample {
        running,
        trap: trap_at,
        stop: at - t1,
    })
}

/// `runc` with the harness's state root.
fn runc(lab: &Lab, args: &[&str]) -> Result<String> {
    let root = lab.runc_root();
    let mut all = vec!["runc", "--root", root.to_str().context("runc root")?];
    all.extend_from_slice(args);
    run(&all)
}

/// The bundle's `config.json` for container `id`, from the shim's template.
fn write_runc_config(lab: &Lab, template: &Value, id: &str, script: &str) -> Result<()> {
    let mut config = template.clone();
    config["process"]["args"] = json!(["/bin/sh", "-c", script]);
    config["linux"]["cgroupsPath"] = json!(format!("/{}", lab.cgroup(id)));
    std::fs::write(
        lab.bundle().join("config.json"),
        serde_json::to_vec_pretty(&config)?,
    )?;
    Ok(())
}

/// One runc container: `runc run -d` (→ trap installed); `runc kill TERM` → exited →
/// `runc delete`. Without the trap, SIGKILL follows after the same stop timeout.
fn runc_once(lab: &Lab, template: &Value, name: &str, trap: bool) -> Result<Sample> {
    let id = format!("{}-runc-{name}", lab.host_id);
    let script = if trap { TRAP_SCRIPT } else { NO_TRAP_SCRIPT };
    write_runc_config(lab, template, &id, script)?;
    let bundle = lab.bundle();
    // The container inherits runc's stdio: no pipes (they would stay open), errors to a file.
    let err_path = lab.dir().join("runc-run.err");
    let err = std::fs::File::create(&err_path)?;
    let mut cmd = Command::new("runc");
    cmd.arg("--root")
        .arg(lab.runc_root())
        .args(["run", "-d", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err);
    // Registered before it is created, so the cleanup deletes it (and kills its cgroup);
    // the lock is not held across `runc run`, which would block a signal's cleanup for as
    // long as runc takes. The process is registered once started: a cleanup that ran in
    // between is seen here, and a later one kills it first.
    {
        let mut left = lock(&lab.left);
        ensure!(!left.removed, "stopping");
        left.runc_ids.push(id.clone());
    }
    let t0 = Instant::now();
    let child = cmd.spawn().context("running runc")?;
    {
        let mut left = lock(&lab.left);
        if left.removed {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            bail!("stopping");
        }
        left.runc_running = Some(child.id());
    }
    let status = wait_bounded(child, &format!("runc run -d {id}"), WAIT);
    let running = t0.elapsed();
    lock(&lab.left).runc_running = None;
    let status = status?.status;
    ensure!(
        status.success(),
        "runc run -d {id}: {status}: {}",
        std::fs::read_to_string(&err_path)
            .unwrap_or_default()
            .trim()
    );
    let trap_at = if trap {
        Some(wait_trap(&lab.cgroup(&id))? - t0)
    } else {
        std::thread::sleep(Duration::from_millis(100));
        None
    };
    let state: Value = serde_json::from_str(&runc(lab, &["state", &id])?)?;
    let pid = state["pid"].as_u64().context("runc state: no pid")? as u32;
    ensure!(
        !exited(pid),
        "runc container {id}: init {pid} is not running"
    );
    let t1 = Instant::now();
    runc(lab, &["kill", &id, "TERM"])?;
    let mut killed = false;
    while !exited(pid) {
        if !trap && !killed && t1.elapsed() >= Duration::from_secs(NO_TRAP_TIMEOUT_S) {
            runc(lab, &["kill", &id, "KILL"])?;
            killed = true;
        }
        ensure!(t1.elapsed() < WAIT, "runc container {id} did not exit");
        std::thread::sleep(Duration::from_micros(200));
    }
    runc(lab, &["delete", &id])?;
    let stop = t1.elapsed();
    lab.runc_deleted(&id);
    Ok(Sample {
        running,
        trap: trap_at,
        stop,
    })
}

/// runc's bundle: the image unpacked, an overlay on it as the root, and the shim's own
/// `config.json` for job `id` (running now) with that root and new namespaces of each type.
fn prepare_runc(lab: &Lab, img: &Image, id: &str) -> Result<Value> {
    let bundle = lab.bundle();
    let layer = lab.dir().join("runc-layer");
    for d in [
        layer.clone(),
        bundle.join("rootfs"),
        bundle.join("upper"),
        bundle.join("work"),
    ] {
        std::fs::create_dir_all(&d)?;
    }
    run(&[
        "tar",
        "-xf",
        &img.tar.to_string_lossy(),
        "-C",
        &layer.to_string_lossy(),
    ])?;
    run(&[
        "mount",
        "-t",
        "overlay",
        "overlay",
        "-o",
        &format!(
            "lowerdir={},upperdir={},workdir={}",
            layer.display(),
            bundle.join("upper").display(),
            bundle.join("work").display()
        ),
        &bundle.join("rootfs").to_string_lossy(),
    ])?;
    let shim_config = lab
        .state()
        .join("containers")
        .join(id)
        .join("bundle/config.json");
    let text = std::fs::read_to_string(&shim_config)
        .with_context(|| format!("reading the shim's {}", shim_config.display()))?;
    let mut config: Value = serde_json::from_str(&text)?;
    config["root"]["path"] = json!(bundle.join("rootfs"));
    let namespaces = config["linux"]["namespaces"]
        .as_array_mut()
        .context("config.json: no linux.namespaces")?;
    // New namespaces of each type for runc: the shim's paths name the namespaces of flynn-host's
    // job (its holder's pid and IPC namespaces, handed over as `/proc/self/fd/N` of the shim,
    // and the job's network namespace), which are not runc's to join.
    for ns in namespaces.iter_mut() {
        *ns = json!({"type": ns["type"].clone()});
    }
    Ok(config)
}

/// The `p`-th percentile (0..=100) of `xs`: [`crate::report::percentile`] (linear
/// interpolation; the 50th is the median, the mean of the two middles for an even count).
fn pct(xs: &[Duration], p: f64) -> Option<Duration> {
    crate::report::percentile(&nanos(xs), p).map(from_nanos)
}

/// The median of `xs` ([`crate::report::median`]).
fn median_of(xs: &[Duration]) -> Option<Duration> {
    crate::report::median(nanos(xs)).map(from_nanos)
}

fn nanos(xs: &[Duration]) -> Vec<f64> {
    xs.iter().map(|d| d.as_nanos() as f64).collect()
}

fn from_nanos(ns: f64) -> Duration {
    Duration::from_nanos(ns.round() as u64)
}

/// The median of KiB figures ([`crate::report::median`]), 0 for none.
fn median_kib(xs: &[u64]) -> u64 {
    crate::report::median(xs.iter().map(|&k| k as f64).collect()).map_or(0, |m| m.round() as u64)
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
}

fn ratio(a: Option<Duration>, b: Option<Duration>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if !b.is_zero() => format!("{:.2}", a.as_secs_f64() / b.as_secs_f64()),
        _ => "-".into(),
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

struct Memory {
    jobs: usize,
    start_all: Duration,
    stop_all: Duration,
    daemon_idle_kib: u64,
    daemon_kib: u64,
    daemon_after_kib: u64,
    daemon_hwm_kib: u64,
    shim_rss_kib: Vec<u64>,
    shim_pss_kib: Vec<u64>,
}

/// Starts `n` jobs at once, reads the daemon's and the shims' memory, stops them all.
async fn memory(ctx: &mut Ctx<'_>, lab: &Lab, n: usize) -> Result<Memory> {
    let daemon = lab.daemon_pid()?;
    let daemon_idle_kib = status_kib(daemon, "VmRSS").context("daemon VmRSS")?;
    let ids: Vec<String> = (0..n).map(|i| lab.job_id(&format!("m{i}"))).collect();
    let t0 = Instant::now();
    for id in &ids {
        put_job(
            &ctx.http,
            &lab.api,
            id,
            job_body(id, ctx.img, TRAP_SCRIPT, None, false),
        )
        .await?;
    }
    let mut pending: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !pending.is_empty() {
        let (_, ev) =
            ctx.events.next(deadline).await.with_context(|| {
                format!("{} of {n} jobs not running after 180 s", pending.len())
            })?;
        let id = ev["job_id"].as_str().unwrap_or_default();
        match ev["event"].as_str().unwrap_or_default() {
            "start" => {
                pending.remove(id);
            }
            "stop" | "error" if pending.contains(id) => bail!(
                "job {id} did not start: {}",
                ev["job"]["error"].as_str().unwrap_or("(no error given)")
            ),
            _ => {}
        }
    }
    let start_all = t0.elapsed();
    // Let the daemon and the shims settle after the burst.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let daemon_kib = status_kib(daemon, "VmRSS").context("daemon VmRSS")?;
    let mut shim_rss_kib = Vec::new();
    let mut shim_pss_kib = Vec::new();
    for id in &ids {
        let file = lab.state().join("containers").join(id).join("shim.pid");
        let pid: u32 = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?
            .trim()
            .parse()
            .context("shim.pid")?;
        shim_rss_kib.push(status_kib(pid, "VmRSS").context("shim VmRSS")?);
        shim_pss_kib.push(pss_kib(pid).context("shim Pss")?);
    }
    let t1 = Instant::now();
    for id in &ids {
        delete_job(&ctx.http, &lab.api, id).await?;
    }
    let mut pending: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !pending.is_empty() {
        let (_, ev) =
            ctx.events.next(deadline).await.with_context(|| {
                format!("{} of {n} jobs not stopped after 180 s", pending.len())
            })?;
        if ev["event"] == "stop" {
            pending.remove(ev["job_id"].as_str().unwrap_or_default());
        }
    }
    let stop_all = t1.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(Memory {
        jobs: n,
        start_all,
        stop_all,
        daemon_idle_kib,
        daemon_kib,
        daemon_after_kib: status_kib(daemon, "VmRSS").unwrap_or(0),
        daemon_hwm_kib: status_kib(daemon, "VmHWM").unwrap_or(0),
        shim_rss_kib,
        shim_pss_kib,
    })
}

struct Results {
    flynn: Vec<Sample>,
    /// flynn-host jobs with `host_network: true`: the share of the job's own network.
    flynn_host_net: Vec<Sample>,
    runc: Vec<Sample>,
    flynn_no_trap: Vec<Sample>,
    runc_no_trap: Vec<Sample>,
    memory: Option<Memory>,
}

async fn bench(opts: &Options, lab: &mut Lab, img: &Image) -> Result<Results> {
    lab.start_daemon(&opts.host_bin)?;
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()?;
    let events = Events::open(&http, &lab.api).await?;
    let mut ctx = Ctx { http, events, img };

    // Warm-up (unrecorded): the first job imports the layer; its bundle is runc's template.
    let id = lab.job_id("warm");
    put_job(
        &ctx.http,
        &lab.api,
        &id,
        job_body(&id, img, TRAP_SCRIPT, None, false),
    )
    .await?;
    ctx.events.wait_for(&id, "start").await?;
    let template = prepare_runc(lab, img, &id)?;
    delete_job(&ctx.http, &lab.api, &id).await?;
    ctx.events.wait_for(&id, "stop").await?;
    runc_once(lab, &template, "warm", true)?;

    let mut res = Results {
        flynn: Vec::new(),
        flynn_host_net: Vec::new(),
        runc: Vec::new(),
        flynn_no_trap: Vec::new(),
        runc_no_trap: Vec::new(),
        memory: None,
    };
    if let Some(w) = crate::order::balance_warning(3, opts.rounds, "variants") {
        eprintln!("{w}");
    }
    for round in 0..opts.rounds {
        eprintln!("round {}/{}", round + 1, opts.rounds);
        let name = format!("r{round}");
        // The order changes every round, each variant right after each other equally
        // often over a cycle of 6 rounds.
        for k in crate::order::run_order(3, round) {
            match k {
                0 => res
                    .flynn
                    .push(flynn_once(&mut ctx, lab, &name, true, false).await?),
                1 => res
                    .flynn_host_net
                    .push(flynn_once(&mut ctx, lab, &format!("{name}h"), true, true).await?),
                _ => res.runc.push(runc_once(lab, &template, &name, true)?),
            }
        }
    }
    for round in 0..opts.no_trap_rounds {
        let name = format!("n{round}");
        // flynn-host first on even rounds, runc first on odd ones.
        for k in crate::order::run_order(2, round) {
            if k == 0 {
                res.flynn_no_trap
                    .push(flynn_once(&mut ctx, lab, &name, false, false).await?);
            } else {
                res.runc_no_trap
                    .push(runc_once(lab, &template, &name, false)?);
            }
        }
    }
    if opts.jobs > 0 {
        eprintln!("memory: {} jobs", opts.jobs);
        res.memory = Some(memory(&mut ctx, lab, opts.jobs).await?);
    }
    Ok(res)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

fn report(opts: &Options, started: &str, load_before: &str, res: &Results) -> Result<String> {
    let kernel = run(&["uname", "-r"])?.trim().to_string();
    let runc_v = run(&["runc", "--version"])?
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let cgroups = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "cgroup v2"
    } else {
        "cgroup v1"
    };
    let mut md = String::new();
    md.push_str(&format!(
        "- Date: {started}\n- Command: `{}`\n",
        opts.command
    ));
    md.push_str(&format!(
        "- Host: {} CPUs, Linux {kernel}, {cgroups}; {runc_v}; load average {load_before} at the start, {} at the end\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        load_average(),
    ));
    md.push_str(&format!(
        "- {} round(s) after one warm-up, the order of the three variants changing every round (a balanced design: each variant in each position and right after each other variant equally often over 6 rounds); no-trap rounds alternate which goes first; percentiles interpolate linearly between ranks (p50 = median); busybox `sh -c \"{TRAP_SCRIPT}\"`\n\n",
        opts.rounds
    ));
    md.push_str("Running: flynn-host `PUT /host/jobs/:id` sent → the job's `start` event (SSE); runc `run -d` started → returned. Trap: the same start → a process of the job's cgroup has its SIGTERM handler (the shell runs). Stop: `DELETE` sent → `stop` event (done); `runc kill TERM` → exited → `runc delete` returned. runc uses the shim's own `config.json` on a pre-mounted overlay of the same image, with new namespaces of each type (no veth, no address); flynn-host's numbers include the API, the overlay mount and the job's netns + veth + address (a `host_network` job skips the network part).\n\n");
    md.push_str("| variant | running p50 | p90 | trap installed p50 | p90 | stop p50 | p90 |\n|---|---:|---:|---:|---:|---:|---:|\n");
    let row = |name: &str, s: &[Sample]| -> String {
        let running: Vec<Duration> = s.iter().map(|x| x.running).collect();
        let trap: Vec<Duration> = s.iter().filter_map(|x| x.trap).collect();
        let stop: Vec<Duration> = s.iter().map(|x| x.stop).collect();
        format!(
            "| {name} | {} | {} | {} | {} | {} | {} |\n",
            ms(median_of(&running)),
            ms(pct(&running, 90.0)),
            ms(median_of(&trap)),
            ms(pct(&trap, 90.0)),
            ms(median_of(&stop)),
            ms(pct(&stop, 90.0)),
        )
    };
    md.push_str(&row("flynn-host", &res.flynn));
    md.push_str(&row("flynn-host, `host_network` job", &res.flynn_host_net));
    md.push_str(&row("runc", &res.runc));
    let med = |s: &[Sample], f: fn(&Sample) -> Option<Duration>| -> Option<Duration> {
        median_of(&s.iter().filter_map(f).collect::<Vec<_>>())
    };
    md.push_str("\n| ratio (medians) | flynn-host ÷ runc | target |\n|---|---:|---|\n");
    md.push_str(&format!(
        "| start: running | {} | ≤ 0.7 |\n| start: running, `host_network` job | {} | — |\n| start: trap installed | {} | — |\n| stop (SIGTERM trapped) | {} | — |\n| stop, `host_network` job | {} | — |\n",
        ratio(med(&res.flynn, |x| Some(x.running)), med(&res.runc, |x| Some(x.running))),
        ratio(med(&res.flynn_host_net, |x| Some(x.running)), med(&res.runc, |x| Some(x.running))),
        ratio(med(&res.flynn, |x| x.trap), med(&res.runc, |x| x.trap)),
        ratio(med(&res.flynn, |x| Some(x.stop)), med(&res.runc, |x| Some(x.stop))),
        ratio(med(&res.flynn_host_net, |x| Some(x.stop)), med(&res.runc, |x| Some(x.stop))),
    ));
    if !res.flynn_no_trap.is_empty() {
        md.push_str(&format!(
            "\nStop without a trap (`{NO_TRAP_SCRIPT}`: the init ignores SIGTERM; flynn-host `stop_timeout` {NO_TRAP_TIMEOUT_S} s, runc `kill KILL` after the same {NO_TRAP_TIMEOUT_S} s), median of {}: flynn-host {}, runc {}.\n",
            res.flynn_no_trap.len(),
            ms(med(&res.flynn_no_trap, |x| Some(x.stop))),
            ms(med(&res.runc_no_trap, |x| Some(x.stop))),
        ));
    }
    if let Some(m) = &res.memory {
        md.push_str(&format!(
            "\nMemory with {} jobs running (`{TRAP_SCRIPT}`, all `PUT` back to back): all running after {:.2} s, all stopped {:.2} s after the `DELETE`s began.\n\n",
            m.jobs,
            m.start_all.as_secs_f64(),
            m.stop_all.as_secs_f64()
        ));
        md.push_str("| process | measured | target |\n|---|---:|---|\n");
        md.push_str(&format!(
            "| flynn-host daemon VmRSS, {} jobs | {} | ≤ 20 MiB |\n| daemon VmRSS idle before / after | {} / {} | |\n| daemon VmHWM (peak) | {} | |\n| shim VmRSS, median (max) | {} ({}) | |\n| shim PSS, median | {} | |\n| all shims, sum of VmRSS / of PSS | {} / {} | |\n",
            m.jobs,
            mib(m.daemon_kib),
            mib(m.daemon_idle_kib),
            mib(m.daemon_after_kib),
            mib(m.daemon_hwm_kib),
            mib(median_kib(&m.shim_rss_kib)),
            mib(m.shim_rss_kib.iter().copied().max().unwrap_or(0)),
            mib(median_kib(&m.shim_pss_kib)),
            mib(m.shim_rss_kib.iter().sum()),
            mib(m.shim_pss_kib.iter().sum()),
        ));
        md.push_str("\n`runc run -d` leaves no per-job process behind (the container's init is reparented), so it has no helper to compare with.\n");
    }
    Ok(md)
}

pub fn run_harness(opts: Options) -> Result<String> {
    ensure!(
        is_root(),
        "the host harness needs root (containers, cgroups, network namespaces, a bridge): run it as root"
    );
    ensure!(
        opts.host_bin.exists(),
        "{} not found: cargo build --release -p flynn-host (or pass --host-bin)",
        opts.host_bin.display()
    );
    run(&["runc", "--version"]).context("runc is needed (apt-get install runc)")?;
    let started = run(&["date", "-u"])?.trim().to_string();
    let load_before = load_average();
    let mut lab = Lab::new(opts.block.clone())?;
    let img = build_image(lab.dir())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let res = rt.block_on(bench(&opts, &mut lab, &img));
    // Stop the jobs through the daemon while it lives; teardown mops up the rest.
    let stopped = rt.block_on(async {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        lab.stop_all_jobs(&http).await
    });
    if let Err(e) = &stopped {
        eprintln!("flynn-perf host: stopping jobs through the API: {e:#}");
    }
    if res.is_err() {
        if let Some(d) = &lab.daemon {
            eprintln!("flynn-host log tail:\n{}", d.log_tail(20));
        }
    }
    lab.teardown();
    if res.is_err() {
        crate::procs::wait_if_stopping();
    }
    let res = res?;
    let md = report(&opts, &started, &load_before, &res)?;
    if let Some(out) = &opts.out {
        std::fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_id_matches_flynn_network() {
        // Values of flynn_network::job::short_id.
        assert_eq!(short_id("").len(), 12);
        assert_eq!(
            short_id("a"),
            format!("{:012x}", 0xaf63dc4c8601ec8cu64 >> 16)
        );
    }

    #[test]
    fn proc_readers() {
        let me = std::process::id();
        assert!(status_kib(me, "VmRSS").unwrap() > 0);
        assert!(!exited(me));
        assert!(exited(u32::MAX));
        assert!(pct(&[], 50.0).is_none());
        let d = |ms| Duration::from_millis(ms);
        assert_eq!(pct(&[d(3), d(1), d(2)], 50.0), Some(d(2)));
        assert_eq!(ratio(Some(d(1)), Some(d(2))), "0.50");
    }

    #[test]
    fn medians_and_percentiles_of_even_counts() {
        let d = |ms| Duration::from_millis(ms);
        // Even count: the mean of the two middles, not the upper middle.
        assert_eq!(
            median_of(&[d(4), d(1), d(2), d(3)]),
            Some(Duration::from_micros(2500))
        );
        assert_eq!(median_of(&[]), None);
        let ten: Vec<Duration> = (1..=10).map(d).collect();
        assert_eq!(pct(&ten, 90.0), Some(Duration::from_micros(9100)));
        assert_eq!(median_kib(&[10, 40, 20, 30]), 25);
        assert_eq!(median_kib(&[]), 0);
    }
}
