//! The daemon with the container runtime (root only; skipped otherwise). Each test runs
//! in a network namespace of its own: the daemon, its bridge and the aggregator live
//! there, and the test's HTTP clients run on a thread that joined it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use flynn_client::host::{Job, JobStatus, MountSpec, NetworkConfig, Port};

use crate::support::*;

/// Volumes in containers (a child module: it shares the helpers below).
/// Skips the calling test (with a note) unless running as root.
macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
    };
}

mod tty;
mod volumes;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The busybox layer tarball and its sha256, built once per test binary.
fn busybox() -> &'static (PathBuf, String) {
    static IMG: OnceLock<(PathBuf, String)> = OnceLock::new();
    IMG.get_or_init(|| {
        // Under target/ (not /tmp); the build is deterministic, so concurrent test
        // processes may each write it: build under a private name, rename into place.
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&dir).unwrap();
        let tar = dir.join("flynn-host-busybox.tar");
        let tmp = dir.join(format!("flynn-host-busybox.{}.tar", std::process::id()));
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/build-busybox.sh");
        let out = Command::new("sh").arg(&script).arg(&tmp).output().unwrap();
        assert!(
            out.status.success(),
            "build-busybox.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::rename(&tmp, &tar).unwrap();
        let sum = Command::new("sha256sum").arg(&tar).output().unwrap();
        let sha = String::from_utf8_lossy(&sum.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        (tar, sha)
    })
}

/// A busybox job running `sh -c script`.
fn bb_job(id: &str, script: &str) -> Job {
    let (tar, sha) = busybox();
    let mut j = sh_job(id, script);
    j.mountspecs = vec![MountSpec {
        kind: "tar".into(),
        url: format!("file://{}", tar.display()),
        hashes: [("sha256".to_string(), sha.clone())].into(),
        ..MountSpec::default()
    }];
    j
}

/// A network namespace made with `ip netns`; on drop, the jobs of `state` are cleaned up
/// and the namespace deleted.
struct TestNs {
    name: String,
    states: Vec<PathBuf>,
}

impl TestNs {
    fn new() -> TestNs {
        let name = unique("fht");
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {name}");
        let st = Command::new("ip")
            .args(["-n", &name, "link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(st.success());
        TestNs {
            name,
            states: Vec::new(),
        }
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        for state in &self.states {
            let containers = state.join("containers");
            for id in flynn_container::Shim::list(&containers) {
                let _ = flynn_container::Shim::cleanup(&containers, &id);
                let ns = flynn_network::job::netns_path(&id);
                if let Some(n) = ns.file_name().and_then(|n| n.to_str()) {
                    let _ = Command::new("ip").args(["netns", "del", n]).status();
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs `body` on a thread inside a fresh network namespace, with its own runtime.
fn in_netns<F, Fut>(body: F)
where
    F: FnOnce(String) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let ns = TestNs::new();
    let name = ns.name.clone();
    let res = std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(body(name));
    })
    .join();
    drop(ns);
    if let Err(p) = res {
        std::panic::resume_unwind(p);
    }
}

/// A container host in the current namespace, with a cgroup parent of its own; its jobs
/// and the parent are cleaned up on drop.
struct CHost {
    host: Host,
    cgroup_parent: String,
}

impl CHost {
    fn args<'a>(parent: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "--runtime",
            "container",
            "--bridge-name",
            "flynntest0",
            "--block",
            "100.100.7.0/24",
            "--cgroup-parent",
            parent,
        ];
        args.extend_from_slice(extra);
        args
    }

    /// [`Host::restart`] with this host's container flags.
    fn restart(&mut self, extra: &[&str]) {
        let parent = self.cgroup_parent.clone();
        self.host.restart(&CHost::args(&parent, extra));
    }

    fn start(extra: &[&str]) -> CHost {
        let cgroup_parent = unique("flynn-host-test");
        let host = Host::start(&Self::args(&cgroup_parent, extra));
        CHost {
            host,
            cgroup_parent,
        }
    }

    /// Cgroup directories of job `id` still present under any controller.
    fn cgroups_left(&self, id: &str) -> Vec<PathBuf> {
        cgroup_dirs(&format!("{}/{id}", self.cgroup_parent))
    }
}

/// `rel` under the unified root and under every v1 controller, where it exists.
fn cgroup_dirs(rel: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let root = PathBuf::from("/sys/fs/cgroup");
    if root.join(rel).is_dir() {
        out.push(root.join(rel));
    }
    for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let p = e.path().join(rel);
        if p.is_dir() && !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

impl Drop for CHost {
    fn drop(&mut self) {
        drop(self.host.proc.take());
        // Pooled namespaces (and any a job held) of the killed daemon.
        if self.host.dir.path().join("job-ips.json").exists() {
            for o in ip_owners(self.host.dir.path()) {
                let ns = flynn_network::job::netns_path(&o);
                if let Some(n) = ns.file_name().and_then(|n| n.to_str()) {
                    let _ = Command::new("ip").args(["netns", "del", n]).status();
                }
            }
        }
        let containers = self.host.dir.path().join("containers");
        for id in flynn_container::Shim::list(&containers) {
            let _ = flynn_container::Shim::cleanup(&containers, &id);
            let ns = flynn_network::job::netns_path(&id);
            if let Some(n) = ns.file_name().and_then(|n| n.to_str()) {
                let _ = Command::new("ip").args(["netns", "del", n]).status();
            }
        }
        for d in cgroup_dirs(&self.cgroup_parent) {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Pids of spare shims (`--flynn-shim-spare <state>/...`) of the daemon with state `state`
/// still waiting for a job (one that took a job has the job's `shim.log` as its stderr).
fn spares(state: &std::path::Path) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z'))
        });
        let waiting =
            std::fs::read_link(format!("/proc/{pid}/fd/2")).is_ok_and(|p| p.ends_with("spare.log"));
        if !zombie
            && waiting
            && args.windows(2).any(|w| {
                w[0] == b"--flynn-shim-spare"
                    && w[1].starts_with(state.as_os_str().as_encoded_bytes())
            })
        {
            out.push(pid);
        }
    }
    out
}

fn netns_exists(id: &str) -> bool {
    flynn_network::job::netns_path(id).exists()
}

/// Owners in the daemon's address allocator (job ids and `pool/...` keys).
fn ip_owners(state: &std::path::Path) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("job-ips.json")).unwrap()).unwrap();
    v["owners"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// Job id → pool key of the pooled namespace it took (`job-netns.json`).
fn taken_netns(state: &std::path::Path) -> std::collections::BTreeMap<String, String> {
    std::fs::read(state.join("job-netns.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Whether the network namespace job `id` uses exists: the pooled one it took, or its own.
fn job_netns_exists(state: &std::path::Path, id: &str) -> bool {
    match taken_netns(state).get(id) {
        Some(key) => netns_exists(key),
        None => netns_exists(id),
    }
}

#[test]
fn busybox_job_output_env_and_failures() {
    require_root!();
    busybox();
    in_netns(|_| async {
        let (_agg, syslog, api) = logagg();
        let ch = CHost::start(&["--logagg", &syslog, "--resolver", "100.100.7.1"]);
        let h = &ch.host;
        let c = &h.client;
        let app = unique("app");
        let id = h.job_id("hello");
        let mut job = bb_job(
            &id,
            "echo hello from $FLYNN_JOB_ID; echo \"PORT=$PORT P1=$PORT_1 IP=$EXTERNAL_IP\"; ip -4 -o addr show eth0 | awk '{print $4}'; cat /etc/resolv.conf",
        );
        job.config.env.insert("FLYNN_APP_ID".into(), app.clone());
        job.config.ports = vec![
            Port {
                port: 0,
                proto: "tcp".into(),
                service: None,
            },
            Port {
                port: 0,
                proto: "tcp".into(),
                service: None,
            },
        ];
        c.add_job(&job).await.unwrap();
        let j = wait_ended(c, &id, Duration::from_secs(30)).await;
        assert_eq!(
            (j.status, j.exit_status),
            (JobStatus::Done, Some(0)),
            "{j:?}"
        );
        let ip = j.internal_ip.clone();
        assert!(ip.starts_with("100.100.7."), "{ip}");
        let mut lines = Vec::new();
        eventually(Duration::from_secs(10), "4 lines", || {
            lines = log_lines(&api, &app);
            lines.len() >= 4
        })
        .await;
        let msgs: Vec<&str> = lines.iter().map(|l| l["msg"].as_str().unwrap()).collect();
        assert_eq!(
            msgs,
            [
                format!("hello from {id}"),
                format!("PORT=5000 P1=5001 IP={ip}"),
                format!("{ip}/24"),
                "nameserver 100.100.7.1".to_string(),
            ]
        );
        assert!(!netns_exists(&id), "job netns left behind");

        // A `host_network` job shares the host's network namespace: it sees the host's
        // bridge and gets no address of its own.
        let hn = h.job_id("hostnet");
        let hn_app = unique("app");
        let mut job = bb_job(&hn, "grep -c flynntest0 /proc/net/dev");
        job.config.host_network = true;
        job.config.env.insert("FLYNN_APP_ID".into(), hn_app.clone());
        c.add_job(&job).await.unwrap();
        let j = wait_ended(c, &hn, Duration::from_secs(30)).await;
        assert_eq!(
            (j.status, j.exit_status),
            (JobStatus::Done, Some(0)),
            "{j:?}"
        );
        assert!(j.internal_ip.is_empty(), "{j:?}");
        let mut lines = Vec::new();
        eventually(
            Duration::from_secs(10),
            "the host_network job's line",
            || {
                lines = log_lines(&api, &hn_app);
                !lines.is_empty()
            },
        )
        .await;
        assert_eq!(lines[0]["msg"], "1");

        // `uid`, `gid` and `linux_capabilities` from the job's config reach the container.
        let user = h.job_id("user");
        let user_app = unique("app");
        let mut job = bb_job(
            &user,
            "echo $(id -u):$(id -g) $(grep CapBnd /proc/self/status)",
        );
        job.config.uid = Some(1000);
        job.config.gid = Some(1000);
        job.config.linux_capabilities = Some(vec!["CAP_KILL".into()]);
        job.config
            .env
            .insert("FLYNN_APP_ID".into(), user_app.clone());
        c.add_job(&job).await.unwrap();
        let j = wait_ended(c, &user, Duration::from_secs(30)).await;
        assert_eq!(
            (j.status, j.exit_status),
            (JobStatus::Done, Some(0)),
            "{j:?}"
        );
        let mut lines = Vec::new();
        eventually(Duration::from_secs(10), "the user job's line", || {
            lines = log_lines(&api, &user_app);
            !lines.is_empty()
        })
        .await;
        // CAP_KILL is bit 5.
        assert_eq!(lines[0]["msg"], "1000:1000 CapBnd: 0000000000000020");

        // An image that does not exist fails the job (a layer this host does not have, at a
        // URL with nothing behind it; a layer the host has is used without its URL).
        let missing = h.job_id("noimage");
        let mut job = bb_job(&missing, "true");
        job.mountspecs[0].url = "file:///nonexistent/layer.tar".into();
        job.mountspecs[0]
            .hashes
            .insert("sha256".into(), "1".repeat(64));
        c.add_job(&job).await.unwrap();
        let j = wait_ended(c, &missing, Duration::from_secs(10)).await;
        assert_eq!(j.status, JobStatus::Failed);
        assert!(j.error.as_deref().unwrap().starts_with("image: "), "{j:?}");

        // So does a layer whose content does not match its sha256.
        let bad = h.job_id("badsha");
        let mut job = bb_job(&bad, "true");
        job.mountspecs[0]
            .hashes
            .insert("sha256".into(), "0".repeat(64));
        c.add_job(&job).await.unwrap();
        let j = wait_ended(c, &bad, Duration::from_secs(10)).await;
        assert_eq!(j.status, JobStatus::Failed);

        // And a binary that is not in the image.
        let noexec = h.job_id("noexec");
        let mut job = bb_job(&noexec, "");
        job.config.args = vec!["/no/such/binary".into()];
        c.add_job(&job).await.unwrap();
        let j = wait_ended(c, &noexec, Duration::from_secs(20)).await;
        assert_ne!(j.status, JobStatus::Done, "{j:?}");
        assert!(!netns_exists(&noexec));

        // Stop: SIGTERM ignored, SIGKILL after the 1 s timeout.
        let stubborn = h.job_id("stubborn");
        let mut job = bb_job(
            &stubborn,
            "trap '' TERM; echo ready; while true; do sleep 1; done",
        );
        job.config.stop_timeout = Some(1);
        c.add_job(&job).await.unwrap();
        wait_running(c, &stubborn).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = Instant::now();
        c.stop_job(&stubborn).await.unwrap();
        let j = wait_ended(c, &stubborn, Duration::from_secs(15)).await;
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "{took:?}"
        );
        assert_eq!((j.status, j.signal), (JobStatus::Done, Some(9)));
    });
}

#[test]
fn twenty_jobs_at_once_and_jobs_reach_each_other() {
    require_root!();
    busybox();
    in_netns(|_| async {
        let ch = CHost::start(&[]);
        let h = &ch.host;
        let c = &h.client;

        // A web server job; the host (this namespace holds the bridge) and another job
        // reach it by its IP.
        let web = h.job_id("web");
        c.add_job(&bb_job(
            &web,
            "mkdir -p /tmp/www && echo pong > /tmp/www/index.html && exec httpd -f -p $PORT -h /tmp/www",
        ).tap_ports())
        .await
        .unwrap();
        let ip = wait_running(c, &web).await.internal_ip;
        let addr = format!("{ip}:5000");
        let mut body = String::new();
        eventually(Duration::from_secs(10), "host reaches the job", || {
            if std::net::TcpStream::connect_timeout(
                &addr.parse().unwrap(),
                Duration::from_millis(200),
            )
            .is_err()
            {
                return false;
            }
            body = http(&addr, "GET", "/index.html", "", "").1;
            body == "pong\n"
        })
        .await;
        let client = h.job_id("client");
        c.add_job(&bb_job(
            &client,
            // (busybox-static's wget crashes in its resolver; nc takes the address as is.)
            &format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} 5000 | tail -n 1 | grep -qx pong"),
        ))
        .await
        .unwrap();
        let j = wait_ended(c, &client, Duration::from_secs(30)).await;
        assert_eq!(
            (j.status, j.exit_status),
            (JobStatus::Done, Some(0)),
            "job could not reach {addr}"
        );

        // Twenty at once, all running with distinct addresses.
        let ids: Vec<String> = (0..20).map(|i| h.job_id(&format!("many{i}"))).collect();
        let adds = ids.iter().map(|id| {
            let job = bb_job(id, "exec sleep 60");
            async move { c.add_job(&job).await }
        });
        for r in futures_util::future::join_all(adds).await {
            r.unwrap();
        }
        let mut ips = std::collections::BTreeSet::new();
        for id in &ids {
            let j = wait_running(c, id).await;
            ips.insert(j.internal_ip);
        }
        assert_eq!(ips.len(), 20);
        let st = c.status().await.unwrap();
        assert_eq!(st.jobs.get("running"), Some(&21));
        // Some took a namespace from the pool (made before they were asked for), the rest
        // got one made on the spot; each exists while its job runs.
        let taken = taken_netns(h.dir.path());
        assert!(!taken.is_empty(), "no job used a pooled namespace");
        for id in &ids {
            assert!(job_netns_exists(h.dir.path(), id), "no netns for {id}");
        }
        for id in ids.iter().chain([&web]) {
            c.stop_job(id).await.unwrap();
        }
        for id in ids.iter().chain([&web]) {
            let j = wait_ended(c, id, Duration::from_secs(30)).await;
            assert_eq!(j.status, JobStatus::Done);
        }
        // Nothing left: shim state, namespaces, host veths.
        let containers = h.dir.path().join("containers");
        eventually(Duration::from_secs(10), "no shim state left", || {
            flynn_container::Shim::list(&containers).is_empty()
        })
        .await;
        // A job is announced as ended before its namespace and veth are removed: they go
        // right after.
        eventually(Duration::from_secs(10), "job namespaces removed", || {
            taken.values().all(|key| !netns_exists(key)) && taken_netns(h.dir.path()).is_empty()
        })
        .await;
        // What is left in the allocator is the refilled pool, nothing of a job.
        let mut owners = Vec::new();
        eventually(
            Duration::from_secs(10),
            "only the pool in the allocator",
            || {
                owners = ip_owners(h.dir.path());
                owners.len() <= 2 && owners.iter().all(|o| o.starts_with("pool/"))
            },
        )
        .await;
        for id in &ids {
            assert!(!netns_exists(id), "netns of {id} left");
            assert_eq!(
                ch.cgroups_left(id),
                Vec::<PathBuf>::new(),
                "cgroups of {id} left"
            );
        }
        // No mount under the containers dir in any process's view.
        let needle = format!("{}/", containers.display());
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(mi) = std::fs::read_to_string(e.path().join("mountinfo")) {
                assert!(
                    !mi.contains(&needle),
                    "leftover mount under {needle} seen by {:?}",
                    e.file_name()
                );
            }
        }
        let pool_veths: Vec<String> = ip_owners(h.dir.path())
            .iter()
            .map(|o| flynn_network::job::host_veth_name(o))
            .collect();
        let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
        let links = String::from_utf8_lossy(&links.stdout);
        for l in links.lines() {
            if let Some(name) = l.split(": ").nth(1).filter(|n| n.starts_with("flv")) {
                let name = name.split('@').next().unwrap_or(name);
                assert!(
                    pool_veths.iter().any(|p| p == name),
                    "veth {name} left (pool: {pool_veths:?})"
                );
            }
        }
    });
}

#[test]
fn restarted_daemon_readopts_running_jobs() {
    require_root!();
    busybox();
    in_netns(|_| async {
        let (_agg, syslog, api) = logagg();
        let mut ch = CHost::start(&["--logagg", &syslog]);
        let app = unique("app");
        let id = ch.host.job_id("ticker");
        let mut job = bb_job(
            &id,
            "i=0; while true; do echo tick$i; i=$((i+1)); sleep 0.2; done",
        );
        job.config.env.insert("FLYNN_APP_ID".into(), app.clone());
        // The daemon keeps one spare shim ready; the job's shim is that process.
        let state = ch.host.dir.path().to_path_buf();
        let mut spare = Vec::new();
        eventually(Duration::from_secs(10), "a spare shim", || {
            spare = spares(&state);
            spare.len() == 1
        })
        .await;
        // (The first process of a spare forks it and exits: let that pass.)
        tokio::time::sleep(Duration::from_millis(300)).await;
        spare = spares(&state);
        assert_eq!(spare.len(), 1, "{spare:?}");
        ch.host.client.add_job(&job).await.unwrap();
        let before = wait_running(&ch.host.client, &id).await;
        let shim_pid: i32 =
            std::fs::read_to_string(state.join("containers").join(&id).join("shim.pid"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
        assert_eq!(shim_pid, spare[0], "the job did not use the spare shim");
        // And a new spare replaces it.
        eventually(Duration::from_secs(10), "a new spare shim", || {
            let now = spares(&state);
            now.len() == 1 && now[0] != shim_pid
        })
        .await;
        let old_spare = spares(&state);
        // The job took a pooled namespace; the pool was refilled behind it.
        let key = taken_netns(&state)
            .get(&id)
            .cloned()
            .expect("job used the pool");
        assert!(netns_exists(&key));
        let mut old_pool = Vec::new();
        eventually(Duration::from_secs(10), "the pool refilled", || {
            old_pool = ip_owners(&state)
                .into_iter()
                .filter(|o| o.starts_with("pool/") && *o != key)
                .collect();
            old_pool.len() == 2
        })
        .await;

        // Kill the daemon outright and start a new one on the same state.
        drop(ch.host.proc.take());
        tokio::time::sleep(Duration::from_millis(600)).await;
        // Its spare went with it (end-of-file on its socket); the job's shim did not.
        eventually(Duration::from_secs(5), "the old spare to exit", || {
            spares(&state).iter().all(|p| !old_spare.contains(p))
        })
        .await;
        assert!(std::path::Path::new(&format!("/proc/{shim_pid}")).exists());
        ch.restart(&["--logagg", syslog.as_str()]);
        let c = &ch.host.client;
        let after = c.get_job(&id).await.unwrap();
        assert_eq!(after.status, JobStatus::Running, "{after:?}");
        // The killed daemon's unused pool is gone; the job's pooled namespace is not.
        let owners = ip_owners(&state);
        for o in &old_pool {
            assert!(
                !owners.contains(o) && !netns_exists(o),
                "old pool entry {o} left"
            );
        }
        assert!(netns_exists(&key) && owners.contains(&key));
        assert_eq!(
            (after.pid, after.internal_ip.clone()),
            (before.pid, before.internal_ip.clone())
        );

        // Output keeps flowing through the new daemon (including lines from the gap).
        let n0 = log_lines(&api, &app).len();
        eventually(
            Duration::from_secs(10),
            "more lines after the restart",
            || log_lines(&api, &app).len() >= n0 + 5,
        )
        .await;
        let lines = log_lines(&api, &app);
        let seqs: Vec<u64> = lines
            .iter()
            .filter_map(|l| l["msg"].as_str()?.strip_prefix("tick")?.parse().ok())
            .collect();
        for w in seqs.windows(2) {
            assert_eq!(w[1], w[0] + 1, "gap or repeat in {seqs:?}");
        }

        c.stop_job(&id).await.unwrap();
        let j = wait_ended(c, &id, Duration::from_secs(15)).await;
        assert_eq!(j.status, JobStatus::Done);
        assert!(!netns_exists(&id));
        // The new daemon knew which pooled namespace was the job's (removed right after the
        // end is announced).
        eventually(
            Duration::from_secs(10),
            "the job's pooled netns removed",
            || !netns_exists(&key) && !taken_netns(&state).contains_key(&id),
        )
        .await;
    });
}

/// Output the daemon had taken from the job's shim but not yet written to its log is not
/// lost when the daemon is killed: the shim keeps every event the daemon has not dealt with
/// and sends it again to the next daemon. (Events used to be acknowledged as they entered
/// the daemon's queue, so up to a queue's worth of lines went with the daemon.)
#[test]
fn output_queued_in_a_killed_daemon_reaches_the_log_after_the_restart() {
    require_root!();
    busybox();
    in_netns(|_| async {
        let (_agg, syslog, api) = logagg();
        // Every line takes the daemon 10 ms: the job's burst queues up inside it.
        let mut ch = CHost::start(&["--logagg", &syslog, "--fault-slow-output-ms", "10"]);
        let app = unique("app");
        let id = ch.host.job_id("burst");
        let mut job = bb_job(
            &id,
            "i=0; while [ $i -lt 300 ]; do echo line$i; i=$((i+1)); done; exec sleep 600",
        );
        job.config.env.insert("FLYNN_APP_ID".into(), app.clone());
        ch.host.client.add_job(&job).await.unwrap();
        wait_running(&ch.host.client, &id).await;
        let numbers = |api: &str| -> Vec<u64> {
            log_lines(api, &app)
                .iter()
                .filter_map(|l| l["msg"].as_str()?.strip_prefix("line")?.parse().ok())
                .collect()
        };
        eventually(Duration::from_secs(10), "the first lines", || {
            numbers(&api).len() >= 10
        })
        .await;
        let before = numbers(&api).len();
        assert!(
            before < 250,
            "the burst was through before the kill: {before}"
        );
        // Kill the daemon outright while most of the burst is queued in it.
        drop(ch.host.proc.take());
        tokio::time::sleep(Duration::from_millis(300)).await;
        ch.restart(&["--logagg", syslog.as_str()]);
        let mut got = Vec::new();
        eventually(Duration::from_secs(20), "every line of the burst", || {
            got = numbers(&api);
            let distinct: std::collections::BTreeSet<u64> = got.iter().copied().collect();
            distinct.len() == 300
        })
        .await;
        // At least once: a line dealt with just before the kill, its acknowledgement not
        // yet sent, may come twice; nothing else does.
        assert!(got.len() <= 301, "{} lines for 300: {got:?}", got.len());
        ch.host.client.stop_job(&id).await.unwrap();
        wait_ended(&ch.host.client, &id, Duration::from_secs(15)).await;
    });
}

#[test]
fn a_daemon_dead_before_the_network_teardown_does_it_on_restart() {
    require_root!();
    busybox();
    in_netns(|_| async {
        // This daemon exits right after it records and announces a job's end, before the
        // job's namespace, veth and address are released: a crash in that window.
        let mut ch = CHost::start(&["--fault-exit-before-teardown"]);
        let state = ch.host.dir.path().to_path_buf();
        let id = ch.host.job_id("short");
        ch.host
            .client
            .add_job(&bb_job(&id, "exec sleep 60"))
            .await
            .unwrap();
        wait_running(&ch.host.client, &id).await;
        let key = taken_netns(&state).get(&id).cloned().unwrap_or(id.clone());
        assert!(netns_exists(&key));
        ch.host.client.stop_job(&id).await.unwrap();
        let mut proc = ch.host.proc.take().unwrap();
        let status = wait_exit(&mut proc, Duration::from_secs(30)).await;
        assert_eq!(status.code(), Some(3), "daemon exit");
        // The window is real: the job's network is still there.
        assert!(netns_exists(&key), "namespace already gone");
        assert!(ip_owners(&state).contains(&key), "address already released");
        let veth = flynn_network::job::host_veth_name(&key);
        assert!(link_exists(&veth), "veth {veth} already gone");

        // A new daemon on the same state finds the job ended and removes what is left.
        ch.restart(&[]);
        let j = ch.host.client.get_job(&id).await.unwrap();
        assert_eq!(j.status, JobStatus::Done, "{j:?}");
        eventually(Duration::from_secs(10), "leftover network removed", || {
            !netns_exists(&key)
                && !ip_owners(&state).contains(&key)
                && !taken_netns(&state).contains_key(&id)
                && !link_exists(&veth)
        })
        .await;
    });
}

/// Makes job `id`'s record one this daemon cannot read (a field from a newer version):
/// (its path, the readable bytes, the unreadable bytes).
fn spoil_record(state: &Path, id: &str) -> (PathBuf, Vec<u8>, Vec<u8>) {
    let record = state.join("jobs").join(format!("{id}.json"));
    let readable = std::fs::read(&record).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&readable).unwrap();
    v["job"]["from_a_newer_version"] = true.into();
    let unreadable = serde_json::to_vec(&v).unwrap();
    std::fs::write(&record, &unreadable).unwrap();
    (record, readable, unreadable)
}

/// Whether `pid` runs (exists and is not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, r)| !r.starts_with('Z'))
    })
}

/// The pid of job `id`'s shim.
fn shim_pid_of(state: &Path, id: &str) -> u32 {
    std::fs::read_to_string(state.join("containers").join(id).join("shim.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Addresses held for jobs the host has no record of (a job whose state was never saved,
/// or whose record went while its teardown had failed) are released at start-up; those of
/// jobs it re-adopts are kept.
#[test]
fn restart_releases_addresses_of_unknown_jobs() {
    require_root!();
    busybox();
    in_netns(|_| async {
        let mut ch = CHost::start(&["--netns-pool", "0"]);
        let state = ch.host.dir.path().to_path_buf();
        let id = ch.host.job_id("kept");
        ch.host
            .client
            .add_job(&bb_job(&id, "exec sleep 60"))
            .await
            .unwrap();
        let j = wait_running(&ch.host.client, &id).await;
        drop(ch.host.proc.take());

        // Strays, written while the daemon is down: a job id and a pooled namespace
        // recorded as taken by a job, neither of which the job table knows.
        let path = state.join("job-ips.json");
        let mut ips: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        ips["owners"]["ghost"] = "100.100.7.200".into();
        ips["owners"]["pool/0123"] = "100.100.7.201".into();
        std::fs::write(&path, serde_json::to_vec(&ips).unwrap()).unwrap();
        let taken = state.join("job-netns.json");
        let mut t: serde_json::Value = std::fs::read(&taken)
            .ok()
            .map(|b| serde_json::from_slice(&b).unwrap())
            .unwrap_or_else(|| serde_json::json!({}));
        t["ghost-job"] = "pool/0123".into();
        std::fs::write(&taken, serde_json::to_vec(&t).unwrap()).unwrap();

        ch.restart(&["--netns-pool", "0"]);
        let c = &ch.host.client;
        eventually(Duration::from_secs(10), "stray addresses released", || {
            let owners = ip_owners(&state);
            !owners.iter().any(|o| o == "ghost" || o == "pool/0123")
                && !taken_netns(&state).contains_key("ghost-job")
        })
        .await;
        assert!(
            ip_owners(&state).contains(&id),
            "the re-adopted job keeps its address"
        );
        let again = c.get_job(&id).await.unwrap();
        assert_eq!(
            (again.status, again.internal_ip.as_str()),
            (JobStatus::Running, j.internal_ip.as_str())
        );
        c.stop_job(&id).await.unwrap();
        wait_ended(c, &id, Duration::from_secs(15)).await;
    });
}

/// A job whose stored record cannot be read (here: a field this version does not know, as a
/// newer daemon might write) is left alone by a restarted daemon: its container keeps
/// running, with its address, and the record stays. It used to be killed as a container the
/// host had no state for.
#[test]
fn restart_leaves_a_job_with_an_unreadable_record_running() {
    require_root!();
    busybox();
    in_netns(|_| async {
        let mut ch = CHost::start(&["--netns-pool", "0"]);
        let state = ch.host.dir.path().to_path_buf();
        let id = ch.host.job_id("unreadable");
        ch.host
            .client
            .add_job(&bb_job(&id, "exec sleep 60"))
            .await
            .unwrap();
        let j = wait_running(&ch.host.client, &id).await;
        let pid = j.pid.expect("a running job's pid");
        drop(ch.host.proc.take());

        let (record, _, unreadable) = spoil_record(&state, &id);

        ch.restart(&["--netns-pool", "0"]);
        // (A kill would be on its way as the daemon starts serving.)
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(alive(pid), "the job's process was killed");
        let shim_pid = shim_pid_of(&state, &id);
        assert!(alive(shim_pid), "the job's shim was killed");
        assert_eq!(std::fs::read(&record).unwrap(), unreadable);
        assert!(
            ip_owners(&state).contains(&id),
            "the job's address was released"
        );
        // Not the daemon's to supervise, until its record is fixed.
        assert!(ch.host.client.get_job(&id).await.is_err());

        // Its id is taken: a new job with it is refused (it used to be accepted, its record
        // overwritten and, with its start failing on the namespace the kept job holds, the
        // kept container killed by the failed start's cleanup).
        let e = ch
            .host
            .client
            .add_job(&bb_job(&id, "exec sleep 60"))
            .await
            .expect_err("a PUT of a kept job's id");
        let e = e.api().expect("the JSON error envelope");
        assert_eq!(e.status(), 409, "{e:?}");
        assert!(
            e.message
                .contains("still running from before the daemon restarted"),
            "{}",
            e.message
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(alive(pid), "the job's process was killed after the PUT");
        assert!(alive(shim_pid), "the job's shim was killed after the PUT");
        assert_eq!(std::fs::read(&record).unwrap(), unreadable);
        assert!(
            ip_owners(&state).contains(&id),
            "the job's address was released"
        );
    });
}

/// A job left running with an unreadable record keeps running normally: its output is
/// taken and acknowledged, so it can write far more than the shim buffers (4 MiB) for an
/// absent reader. It used to stop there: nothing took its events, the shim's buffer filled,
/// the shim stopped reading the job's pipes and the job blocked on its next write. When it
/// ends while kept and the record is fixed, the next start records its real exit status
/// (from the shim's status file: the shim is gone once its end is acknowledged).
#[test]
fn a_job_kept_with_an_unreadable_record_keeps_writing() {
    require_root!();
    busybox();
    in_netns(|_| async {
        let mut ch = CHost::start(&["--netns-pool", "0"]);
        let state = ch.host.dir.path().to_path_buf();
        let id = ch.host.job_id("chatty");
        // Waits for /go, then writes 20 MB (lines of 1,000 bytes), then marks /done; exits
        // with status 7 once /end appears.
        let script = "l=xxxxxxxxxx; l=$l$l$l$l$l$l$l$l$l$l; l=$l$l$l$l$l$l$l$l$l$l; \
            while [ ! -e /go ]; do sleep 0.1; done; \
            i=0; while [ $i -lt 20000 ]; do echo $l; i=$((i+1)); done; \
            touch /done; while [ ! -e /end ]; do sleep 0.1; done; exit 7";
        ch.host.client.add_job(&bb_job(&id, script)).await.unwrap();
        let j = wait_running(&ch.host.client, &id).await;
        let pid = j.pid.expect("a running job's pid");
        drop(ch.host.proc.take());

        let (record, readable, _) = spoil_record(&state, &id);

        ch.restart(&["--netns-pool", "0"]);
        // The job's root as the host sees it.
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        std::fs::write(root.join("go"), b"").unwrap();
        eventually(Duration::from_secs(120), "the kept job wrote 20 MB", || {
            root.join("done").exists()
        })
        .await;

        // It ends while kept; the record is fixed and the daemon restarted.
        let shim_pid = shim_pid_of(&state, &id);
        std::fs::write(root.join("end"), b"").unwrap();
        eventually(Duration::from_secs(30), "the kept job ended", || {
            !alive(pid)
        })
        .await;
        // The daemon took and acknowledged the end: the shim exits, leaving its status file.
        eventually(
            Duration::from_secs(30),
            "the kept job's shim exited",
            || !alive(shim_pid),
        )
        .await;
        drop(ch.host.proc.take());
        std::fs::write(&record, &readable).unwrap();
        ch.restart(&["--netns-pool", "0"]);
        let mut last = None;
        for _ in 0..300 {
            let j = ch.host.client.get_job(&id).await.unwrap();
            if j.status.is_terminal() {
                last = Some(j);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let j = last.expect("the job's end recorded after the fixed record was read");
        assert_eq!(j.exit_status, Some(7), "{j:?}");
        assert_eq!(j.error, None, "{j:?}");
    });
}

/// Job state and output are for root only: the state directory is 0700 (one an older
/// version left 0755 too, from the next start on) and a job's record, spec, shim log and
/// the host's log segments are 0600.
#[test]
fn job_state_and_output_are_private() {
    require_root!();
    busybox();
    in_netns(|_| async {
        use std::os::unix::fs::PermissionsExt;
        // Nothing needs to listen: the host keeps job output on disk for its aggregators.
        let args = ["--netns-pool", "0", "--logagg", "127.0.0.1:9"];
        let mut ch = CHost::start(&args);
        let state = ch.host.dir.path().to_path_buf();
        let mode = |p: &std::path::Path| {
            std::fs::metadata(p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                .permissions()
                .mode()
                & 0o777
        };
        // As an older version left them.
        for d in [state.clone(), state.join("jobs"), state.join("logs")] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        ch.restart(&args);
        let id = ch.host.job_id("private");
        ch.host
            .client
            .add_job(&bb_job(&id, "echo secret-output; exec sleep 60"))
            .await
            .unwrap();
        wait_running(&ch.host.client, &id).await;
        let logs = state.join("logs");
        let mut segs = Vec::new();
        eventually(Duration::from_secs(10), "a log segment", || {
            segs = std::fs::read_dir(&logs)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect();
            !segs.is_empty()
        })
        .await;
        for d in [state.clone(), state.join("jobs"), logs] {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        let job_dir = state.join("containers").join(&id);
        let mut files = vec![
            state.join("jobs").join(format!("{id}.json")),
            job_dir.join("spec.json"),
            job_dir.join("shim.log"),
        ];
        files.extend(segs);
        for f in files {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
        ch.host.client.stop_job(&id).await.unwrap();
        wait_ended(&ch.host.client, &id, Duration::from_secs(15)).await;
    });
}

#[test]
fn the_overlay_agent_hands_the_host_its_block() {
    require_root!();
    busybox();
    in_netns(|_| async {
        // (CHost's `--block` is ignored: the block comes from `POST /host/network`.)
        let mut ch = CHost::start(&["--network-from-agent", "--netns-pool", "1"]);
        let state = ch.host.dir.path().to_path_buf();
        let c = &ch.host.client;
        assert_eq!(c.status().await.unwrap().network, None);
        // A job with a network of its own waits for the block.
        let id = ch.host.job_id("waits");
        c.add_job(&bb_job(&id, "exec sleep 60")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(c.get_job(&id).await.unwrap().status, JobStatus::Starting);

        let notify = |subnet: &str, mtu: u32, resolvers: &[&str]| NetworkConfig {
            job_id: "flannel".into(),
            subnet: subnet.into(),
            mtu,
            resolvers: resolvers.iter().map(|r| r.to_string()).collect(),
        };
        // Bad notifications are refused with the field named and change nothing.
        for (cfg, field) in [
            (notify("100.100.9.7/24", 0, &[]), "subnet"),
            (notify("bogus", 0, &[]), "subnet"),
            (notify("100.100.9.1/24", 99, &[]), "mtu"),
            (notify("100.100.9.1/24", 0, &["dns.example"]), "resolvers"),
        ] {
            let e = c.configure_network(&cfg).await.unwrap_err();
            let api = e.api().unwrap_or_else(|| panic!("{cfg:?}: {e}"));
            assert_eq!(api.code, flynn_api::ErrorCode::ValidationError, "{cfg:?}");
            assert!(api.message.starts_with(field), "{cfg:?}: {}", api.message);
        }
        assert_eq!(c.status().await.unwrap().network, None);
        assert!(!state.join("network.json").exists());

        // The network cannot be saved (a directory is in the way): the call fails, so the
        // agent tries again, but the network exists and the waiting job starts on it.
        std::fs::create_dir(state.join("network.json")).unwrap();
        let e = c
            .configure_network(&notify("100.100.9.1/24", 1450, &["10.0.0.2"]))
            .await
            .unwrap_err();
        assert_eq!(e.api().map(|a| a.status()), Some(500), "{e}");
        let j = wait_running(c, &id).await;
        assert!(j.internal_ip.starts_with("100.100.9."), "{}", j.internal_ip);
        std::fs::remove_dir(state.join("network.json")).unwrap();

        c.configure_network(&notify("100.100.9.1/24", 1450, &["10.0.0.2"]))
            .await
            .unwrap();
        let net = c
            .status()
            .await
            .unwrap()
            .network
            .expect("network in status");
        assert_eq!(
            (net.subnet.as_str(), net.mtu, net.resolvers.clone()),
            ("100.100.9.0/24", 1450, vec!["10.0.0.2".to_string()])
        );
        assert_eq!(
            net.job_id, "flannel",
            "the agent's job (spec §5.2 HostStatus)"
        );
        let j = wait_running(c, &id).await;
        assert!(j.internal_ip.starts_with("100.100.9."), "{}", j.internal_ip);
        // The same block again is fine (new resolvers); another one is refused.
        c.configure_network(&notify("100.100.9.0/24", 1450, &["10.0.0.3"]))
            .await
            .unwrap();
        let e = c
            .configure_network(&notify("100.100.10.1/24", 1450, &[]))
            .await
            .unwrap_err();
        assert_eq!(e.api().map(|a| a.status()), Some(409), "{e}");
        let e = c
            .configure_network(&notify("100.100.9.1/24", 1400, &[]))
            .await
            .unwrap_err();
        assert_eq!(e.api().map(|a| a.status()), Some(409), "{e}");

        // A restarted daemon applies the saved block at once: the job is re-adopted with
        // its address and new jobs start without a new notification.
        ch.restart(&["--network-from-agent"]);
        let c = &ch.host.client;
        let net = c
            .status()
            .await
            .unwrap()
            .network
            .expect("network after restart");
        assert_eq!(
            (
                net.subnet.as_str(),
                net.resolvers.clone(),
                net.job_id.as_str()
            ),
            ("100.100.9.0/24", vec!["10.0.0.3".to_string()], "flannel")
        );
        let again = c.get_job(&id).await.unwrap();
        assert_eq!(
            (again.status, again.internal_ip.as_str()),
            (JobStatus::Running, j.internal_ip.as_str())
        );
        let id2 = ch.host.job_id("after");
        c.add_job(&bb_job(&id2, "exec sleep 60")).await.unwrap();
        let j2 = wait_running(c, &id2).await;
        assert!(
            j2.internal_ip.starts_with("100.100.9."),
            "{}",
            j2.internal_ip
        );
        assert_ne!(j2.internal_ip, j.internal_ip);
        // Another block while jobs hold addresses: refused, and it says why.
        let e = c
            .configure_network(&notify("100.100.10.1/24", 1450, &[]))
            .await
            .unwrap_err();
        let api = e.api().unwrap_or_else(|| panic!("{e}"));
        assert_eq!(api.status(), 409, "{e}");
        assert!(api.message.contains("hold addresses"), "{}", api.message);
        assert!(api.retry, "the agent is to offer it again");
        for id in [&id, &id2] {
            c.stop_job(id).await.unwrap();
            wait_ended(c, id, Duration::from_secs(15)).await;
        }

        // No job holds an address any more (once their teardown, which follows their end,
        // is done): the agent lost this host's lease and leased another block; the host
        // moves to it (bridge, allocator, pool, saved file).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while let Err(e) = c
            .configure_network(&notify("100.100.10.1/24", 1450, &["10.0.0.3"]))
            .await
        {
            let api = e.api().unwrap_or_else(|| panic!("{e}"));
            assert!(api.status() == 409 && api.retry, "{e}");
            assert!(std::time::Instant::now() < deadline, "still refused: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let net = c.status().await.unwrap().network.expect("network");
        assert_eq!(net.subnet, "100.100.10.0/24");
        let addrs = Command::new("ip")
            .args(["-4", "-o", "addr", "show", "dev", "flynntest0"])
            .output()
            .unwrap();
        let addrs = String::from_utf8_lossy(&addrs.stdout).to_string();
        assert!(addrs.contains("100.100.10.1/24"), "{addrs}");
        assert!(!addrs.contains("100.100.9."), "{addrs}");
        let saved = std::fs::read_to_string(state.join("network.json")).unwrap();
        assert!(saved.contains("100.100.10.0/24"), "{saved}");
        let id3 = ch.host.job_id("moved");
        c.add_job(&bb_job(&id3, "exec sleep 60")).await.unwrap();
        let j3 = wait_running(c, &id3).await;
        assert!(
            j3.internal_ip.starts_with("100.100.10."),
            "{}",
            j3.internal_ip
        );
        // The allocator is the new block's, and the pool refilled in it (the job took one
        // pooled namespace, or made its own when none was ready).
        let ips: serde_json::Value =
            serde_json::from_slice(&std::fs::read(state.join("job-ips.json")).unwrap()).unwrap();
        assert_eq!(ips["block"], "100.100.10.0/24");
        eventually(
            Duration::from_secs(10),
            "the pool refilled in the new block",
            || {
                let taken = taken_netns(&state);
                ip_owners(&state)
                    .iter()
                    .any(|o| o.starts_with("pool/") && !taken.values().any(|k| k == o))
            },
        )
        .await;
        c.stop_job(&id3).await.unwrap();
        wait_ended(c, &id3, Duration::from_secs(15)).await;
    });
}

#[test]
fn the_real_overlay_agent_configures_the_host() {
    require_root!();
    busybox();
    in_netns(|_| async {
        // An underlay address for the agent, a single-node discoverd for its lease.
        for args in [
            // (A veth pair: this kernel has no dummy driver.)
            &["link", "add", "ul0", "type", "veth", "peer", "name", "ul1"][..],
            &["addr", "add", "10.99.0.1/24", "dev", "ul0"],
            &["link", "set", "ul0", "up"],
            &["link", "set", "ul1", "up"],
        ] {
            assert!(Command::new("ip").args(args).status().unwrap().success());
        }
        let ddir = tempfile::tempdir().unwrap();
        let (_disc, kv) = start(
            &bin("flynn-discoverd", "flynn-discoverd"),
            &[
                "--data-dir",
                ddir.path().to_str().unwrap(),
                "--addr",
                "127.0.0.1:0",
            ],
        );
        let durl = format!("http://{}", get(&kv, "http"));
        let ch = CHost::start(&["--network-from-agent"]);
        let c = &ch.host.client;
        let state = ddir.path().join("agent");
        let mut agent = Command::new(bin("flynn-network", "flynn-network"));
        agent
            .args(["--discoverd", &durl, "--public-ip", "10.99.0.1"])
            .args(["--fast-path", "off", "--http-addr", "127.0.0.1:0"])
            .args(["--bridge", "flynntest0", "--vxlan-name", "flynnvx0"])
            .args(["--notify", &format!("http://{}", ch.host.addr)])
            .arg("--state-dir")
            .arg(&state)
            .arg("--pin-dir")
            .arg(ddir.path().join("no-bpf"))
            .env("FLYNN_JOB_ID", "flannel-e2e")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let mut child = agent.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let _agent = Proc(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("ready ") {
                    let _ = tx.send(rest.to_string());
                }
            }
        });
        let ready = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("agent never ready");
        let field = |k: &str| {
            ready
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")).map(str::to_string))
                .unwrap_or_else(|| panic!("no {k} in {ready:?}"))
        };
        let (subnet, mtu) = (field("subnet"), field("mtu"));
        // The agent's notification configures the host: the same block and MTU.
        let t0 = Instant::now();
        let net = loop {
            if let Some(n) = c.status().await.ok().and_then(|s| s.network) {
                break n;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the agent never configured the host"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            (net.subnet.as_str(), net.mtu.to_string()),
            (subnet.as_str(), mtu)
        );
        // A job gets an address in the agent's block.
        let id = ch.host.job_id("overlaid");
        c.add_job(&bb_job(&id, "exec sleep 60")).await.unwrap();
        let j = wait_running(c, &id).await;
        let block: flynn_network::Subnet = subnet.parse().unwrap();
        assert!(
            block.contains(j.internal_ip.parse().unwrap()),
            "{} not in {subnet}",
            j.internal_ip
        );
        c.stop_job(&id).await.unwrap();
        wait_ended(c, &id, Duration::from_secs(15)).await;
    });
}

/// Whether link `name` exists in this thread's network namespace (`/sys/class/net` shows
/// the namespace sysfs was mounted in, not this one).
fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

trait TapPorts {
    fn tap_ports(self) -> Self;
}

impl TapPorts for Job {
    /// One TCP port (5000).
    fn tap_ports(mut self) -> Job {
        self.config.ports = vec![Port {
            port: 0,
            proto: "tcp".into(),
            service: None,
        }];
        self
    }
}

#[test]
fn memory_limit_kills_with_137_and_the_job_reports_it() {
    require_root!();
    busybox();
    in_netns(|_| async {
        let ch = CHost::start(&[]);
        let h = &ch.host;
        let id = h.job_id("oom");
        // dd allocates its 256 MiB block at once; the limit is 32 MiB.
        let mut job = bb_job(&id, "dd if=/dev/zero of=/dev/null bs=256M count=1");
        job.resources.memory = Some(flynn_client::host::Spec {
            limit: Some(32 << 20),
            request: None,
        });
        h.client.add_job(&job).await.unwrap();
        let j = wait_ended(&h.client, &id, Duration::from_secs(30)).await;
        assert_eq!(
            (j.status, j.exit_status, j.oom_killed),
            (JobStatus::Crashed, Some(137), true),
            "{j:?}"
        );
        let ok = h.job_id("fits");
        let mut job = bb_job(&ok, "dd if=/dev/zero of=/dev/null bs=4M count=1");
        job.resources.memory = Some(flynn_client::host::Spec {
            limit: Some(32 << 20),
            request: None,
        });
        h.client.add_job(&job).await.unwrap();
        let j = wait_ended(&h.client, &ok, Duration::from_secs(30)).await;
        assert_eq!(
            (j.status, j.exit_status),
            (JobStatus::Done, Some(0)),
            "{j:?}"
        );
    });
}

#[test]
fn attach_to_a_container_job() {
    use flynn_client::host::attach::{STDERR, STDOUT, STREAM};
    use flynn_client::host::{AttachRequest, Frame};
    require_root!();
    busybox();
    in_netns(|_| async {
        let ch = CHost::start(&[]);
        let h = &ch.host;
        let id = h.job_id("attached");
        h.client
            .add_job(&bb_job(&id, "sleep 0.5; echo hi; echo oops >&2; exit 5"))
            .await
            .unwrap();
        let mut a = h
            .client
            .attach(&AttachRequest {
                job_id: id.clone(),
                flags: STDOUT | STDERR | STREAM,
                ..AttachRequest::default()
            })
            .await
            .unwrap();
        let mut frames = Vec::new();
        while let Some(f) = tokio::time::timeout(Duration::from_secs(30), a.next())
            .await
            .expect("a frame within 30 s")
            .unwrap()
        {
            frames.push(f);
        }
        // `Waiting` first when the attach beat the container's start.
        if frames.first() == Some(&Frame::Waiting) {
            frames.remove(0);
        }
        let data = |stream: u8, s: &str| Frame::Data {
            stream,
            data: s.as_bytes().to_vec(),
        };
        // Output order between the two streams is the shim's; each stream's own is kept.
        assert_eq!(frames.first(), Some(&Frame::Success), "{frames:?}");
        assert_eq!(frames.last(), Some(&Frame::Exit(5)), "{frames:?}");
        let mut middle = frames[1..frames.len() - 1].to_vec();
        middle.sort_by_key(|f| format!("{f:?}"));
        let mut want = vec![data(1, "hi\n"), data(2, "oops\n"), data(1, ""), data(2, "")];
        want.sort_by_key(|f| format!("{f:?}"));
        assert_eq!(middle, want, "{frames:?}");
    });
}

#[test]
fn a_container_jobs_stdin_survives_a_daemon_restart() {
    use flynn_client::host::attach::{STDIN, STDOUT, STREAM};
    use flynn_client::host::{AttachRequest, Attached, Frame};
    require_root!();
    busybox();
    async fn attach(c: &flynn_client::host::Client, id: &str) -> Attached {
        c.attach(&AttachRequest {
            job_id: id.to_string(),
            flags: STDOUT | STDIN | STREAM,
            ..AttachRequest::default()
        })
        .await
        .unwrap()
    }
    /// Output of `a` up to and including a line ending in `until` (or the end).
    async fn read_until(a: &mut Attached, out: &mut String, until: &str) -> Option<u32> {
        while !out.ends_with(until) {
            let f = tokio::time::timeout(Duration::from_secs(30), a.next())
                .await
                .unwrap_or_else(|_| panic!("no frame within 30 s, output so far {out:?}"))
                .unwrap();
            match f {
                Some(Frame::Data { stream: 1, data }) => {
                    out.push_str(&String::from_utf8_lossy(&data))
                }
                Some(Frame::Exit(s)) => return Some(s),
                Some(_) => {}
                None => panic!("ended without an exit status: {out:?}"),
            }
        }
        None
    }
    in_netns(|_| async {
        let mut ch = CHost::start(&[]);
        let id = ch.host.job_id("stdin");
        // Not root in the container: the job reads a FIFO the shim opened for it.
        let mut job = bb_job(&id, "while read l; do echo \"got $l\"; done; echo eof");
        job.config.stdin = true;
        job.config.uid = Some(1000);
        ch.host.client.add_job(&job).await.unwrap();
        // Attached (and input sent) while the container is still starting: the input waits
        // for the job's stdin.
        let mut a = attach(&ch.host.client, &id).await;
        a.take_input().unwrap().stdin(b"one\n").await.unwrap();
        let mut out = String::new();
        assert_eq!(read_until(&mut a, &mut out, "got one\n").await, None);
        drop(a);

        // A new daemon on the same state finds the job's stdin again.
        drop(ch.host.proc.take());
        ch.restart(&[]);
        let mut a = attach(&ch.host.client, &id).await;
        let mut input = a.take_input().unwrap();
        input.stdin(b"two\n").await.unwrap();
        input.close_stdin().await.unwrap();
        let mut out = String::new();
        let exit = read_until(&mut a, &mut out, "eof\n").await;
        assert_eq!(out, "got two\neof\n");
        let exit = match exit {
            Some(s) => s,
            None => loop {
                match a.next().await.unwrap() {
                    Some(Frame::Exit(s)) => break s,
                    Some(_) => {}
                    None => panic!("no exit status"),
                }
            },
        };
        assert_eq!(exit, 0);
    });
}

/// The index of interface `name` in this thread's network namespace (`/sys/class/net`
/// shows the namespace sysfs was mounted in).
fn ifindex(name: &str) -> u32 {
    let out = Command::new("ip")
        .args(["-o", "link", "show", "dev", name])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no index for {name}: {text:?}"))
}

#[test]
fn jobs_get_the_overlay_fast_path_once_the_agent_has_set_it_up() {
    use flynn_ebpf::{FastPath, Role};
    require_root!();
    busybox();
    if let Err(e) = FastPath::probe() {
        panic!("this kernel cannot run the eBPF fast path: {e}");
    }
    in_netns(|_| async {
        let bpf = flynn_netlab::Bpffs::mount("flynn-hosttest-bpf").expect("mounting a bpffs");
        let pin = bpf.pin_dir("fp");
        let pin_arg = pin.to_str().unwrap().to_string();
        // One pooled namespace is made at start, before any agent.
        let ch = CHost::start(&["--bpf-pin-dir", &pin_arg, "--netns-pool", "1"]);
        let c = &ch.host.client;
        let state = ch.host.dir.path().to_path_buf();
        eventually(Duration::from_secs(10), "a pooled namespace", || {
            ip_owners(&state).iter().any(|o| o.starts_with("pool/"))
        })
        .await;
        // (Its address is recorded before its namespace is made: give that a moment.)
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The agent sets the fast path up (its maps are pinned from now on).
        let fp = FastPath::load(&pin).unwrap();
        assert!(fp.endpoint_ips().unwrap().is_empty());

        // A server and a client: the first takes the pooled namespace (made before the
        // fast path) and gets its entry as it starts, the second a new one.
        let srv = ch.host.job_id("srv");
        c.add_job(&bb_job(&srv, "exec sleep 60")).await.unwrap();
        let s = wait_running(c, &srv).await;
        let srv_ip: std::net::Ipv4Addr = s.internal_ip.parse().unwrap();
        let cli = ch.host.job_id("cli");
        c.add_job(&bb_job(&cli, &format!("ping -c 3 -W 2 {srv_ip}")))
            .await
            .unwrap();
        let before = fp.counters().unwrap();
        let j = wait_ended(c, &cli, Duration::from_secs(30)).await;
        assert_eq!(
            (j.status, j.exit_status),
            (JobStatus::Done, Some(0)),
            "{j:?}"
        );
        let after = fp.counters().unwrap();
        assert!(
            after.redirected_local > before.redirected_local,
            "nothing went the fast way: {before:?} -> {after:?}"
        );

        // The server's endpoint names its host veth; its veth carries the job program.
        let ep = fp.endpoint(srv_ip).unwrap().expect("the server's endpoint");
        // (It took the pooled namespace: its veth is named after the pool key.)
        let owner = taken_netns(ch.host.dir.path())
            .get(&srv)
            .cloned()
            .expect("the server took the pooled namespace");
        let veth = flynn_network::job::host_veth_name(&owner);
        assert_eq!(ep.ifindex, ifindex(&veth));
        assert!(
            fp.attached()
                .unwrap()
                .contains(&(ep.ifindex, Role::JobVeth)),
            "{:?}",
            fp.attached()
        );

        // Stopped: its endpoint and attachment go before its address can be reused.
        c.stop_job(&srv).await.unwrap();
        wait_ended(c, &srv, Duration::from_secs(30)).await;
        let mut left = Vec::new();
        eventually(
            Duration::from_secs(10),
            "the server's entry removed",
            || {
                left = fp.endpoint_ips().unwrap();
                !left.contains(&srv_ip)
            },
        )
        .await;
        assert!(
            fp.attached().unwrap().iter().all(|(i, _)| *i != ep.ifindex),
            "{:?}",
            fp.attached()
        );
        drop(ch);
        drop(bpf);
    });
}

/// A second daemon on the same state directory stops before it touches anything (it would
/// clear the first one's pooled namespaces and image unpacks as crash leftovers), with a
/// message naming the directory; the first one keeps serving and keeps its pool.
#[test]
fn a_second_daemon_on_the_same_state_dir_is_refused() {
    require_root!();
    in_netns(|_| async {
        let ch = CHost::start(&["--netns-pool", "1"]);
        let state_dir = ch.host.dir.path().to_path_buf();
        eventually(Duration::from_secs(10), "a pooled namespace", || {
            ip_owners(&state_dir).iter().any(|o| o.starts_with("pool/"))
        })
        .await;
        let pooled: Vec<String> = ip_owners(&state_dir)
            .into_iter()
            .filter(|o| o.starts_with("pool/"))
            .collect();
        let state = state_dir.to_str().unwrap().to_string();
        let mut args = vec![
            "--addr",
            "127.0.0.1:0",
            "--state-dir",
            &state,
            "--id",
            &ch.host.id,
        ];
        args.extend(CHost::args(&ch.cgroup_parent, &[]));
        let mut second = Command::new(env!("CARGO_BIN_EXE_flynn-host"))
            .args(&args)
            .env("FLYNN_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(s) = second.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = second.kill();
                let _ = second.wait();
                panic!("the second daemon kept running");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "{err}");
        assert!(err.contains("another flynn-host uses --state-dir"), "{err}");
        // The first one still answers, and its pooled namespace is still there.
        ch.host
            .client
            .status()
            .await
            .expect("first daemon still serving");
        for o in &pooled {
            assert!(
                netns_exists(o),
                "pooled namespace {o} removed by the second daemon"
            );
        }
    });
}

/// `POST /host/resource-check` counts only ports jobs use in the host's network namespace: a
/// job in a namespace of its own binds its port there, taking nothing from the host (it used
/// to be a conflict all the same), while a `host_network` job's port is one.
#[test]
fn resource_check_counts_only_host_ports() {
    require_root!();
    busybox();
    in_netns(|_| async {
        let ch = CHost::start(&["--netns-pool", "0"]);
        let c = &ch.host.client;
        let check = |port| flynn_client::host::ResourceCheck {
            ports: vec![flynn_client::host::CheckPort {
                port,
                proto: "tcp".into(),
            }],
        };
        let port = |port| Port {
            port,
            proto: "tcp".into(),
            service: None,
        };
        let own = ch.host.job_id("own-netns");
        let mut j = bb_job(&own, "exec nc -l -p 5000");
        j.config.ports = vec![port(5000)];
        c.add_job(&j).await.unwrap();
        wait_running(c, &own).await;
        c.resource_check(&check(5000))
            .await
            .expect("a port in a job's own namespace is free on the host");

        let shared = ch.host.job_id("host-netns");
        let mut j = bb_job(&shared, "exec sleep 60");
        j.config.host_network = true;
        j.config.ports = vec![port(5001)];
        c.add_job(&j).await.unwrap();
        wait_running(c, &shared).await;
        let e = c.resource_check(&check(5001)).await.unwrap_err();
        let e = e.api().expect("the JSON error envelope");
        assert_eq!(e.status(), 409, "{e:?}");
        assert_eq!(e.detail.as_ref().unwrap()["ports"][0]["port"], 5001);

        for id in [&own, &shared] {
            c.stop_job(id).await.unwrap();
            wait_ended(c, id, Duration::from_secs(15)).await;
        }
    });
}
