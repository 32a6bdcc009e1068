//! `overlay --deployed --via-host`: the jobs come from a real `flynn-host` daemon per host
//! namespace, through its job API, instead of the harness calling flynn-network's job functions.
//!
//! Each daemon runs in its host's network namespace only (`nsenter --net`, not `ip netns exec`:
//! that also gives the process a mount namespace of its own, with `/sys` remounted, so no
//! cgroup hierarchy to put jobs in, and the job namespaces it bind-mounts under `/run/netns`
//! would not be seen from the harness's mount namespace). It listens on `127.0.0.1:1113` of
//! that namespace, takes its block from the agent (`--network-from-agent`; the agent is started
//! with `--notify http://127.0.0.1:1113`), loads the fast path from the host's pin directory
//! (`--fast-path auto`) or not at all (`off`), and has a state directory and cgroup parent of its
//! own (carrying the harness's pid). Jobs are busybox (`host/images/build-busybox.sh`) shells
//! sleeping until stopped; each job's address is the API's `internal_ip` and its namespace the
//! `flynn-<short>` whose `eth0` holds that address among the host's `flv<short>` veths (a job
//! may take a pooled namespace, named after its pool key rather than its id).
//!
//! Everything a daemon leaves (jobs, shims, namespaces, cgroups) is removed the way the `host`
//! harness does it ([`Leftovers`]), also from the signal hook.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use flynn_network::job::JobNet;
use flynn_network::Subnet;
use serde_json::Value;

use super::deployed::in_ns_async;
use crate::host::{delete_job, job_body, put_job, Image, Leftovers};
use crate::procs::Proc;

/// The daemon's API inside its host namespace (each namespace has its own loopback).
pub(super) const API_ADDR: &str = "127.0.0.1:1113";
const API: &str = "http://127.0.0.1:1113";
/// The job: a shell that exits on SIGTERM (a pid namespace's init ignores it otherwise, and
/// the stop would wait for the SIGKILL after the stop timeout) around a long sleep.
const JOB_SCRIPT: &str = "trap 'exit 0' TERM; sleep 3600 & wait";
const WAIT: Duration = Duration::from_secs(60);

/// One host's `flynn-host` daemon and the jobs it runs for the harness.
pub(super) struct HostDaemon {
    /// The host's network namespace.
    ns: String,
    /// `<dir>/state` is the daemon's state directory.
    dir: PathBuf,
    host_id: String,
    cgroup_parent: String,
    pin_dir: PathBuf,
    bridge: String,
    proc: Option<Proc>,
    starts: u32,
    /// Jobs submitted and not yet seen stopped.
    jobs: Vec<String>,
    next_job: u32,
    left: Arc<Mutex<Leftovers>>,
    hook: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn http() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .build()?)
}

/// `GET path` on the daemon as JSON, with the status code.
async fn get_json(http: &reqwest::Client, path: &str) -> Result<(u16, Value)> {
    let resp = http.get(format!("{API}{path}")).send().await?;
    let status = resp.status().as_u16();
    let body = resp.bytes().await?;
    let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Ok((status, v))
}

/// Job states on the wire (`flynn_api::host::JobStatus`): 0 starting, 1 running, 2 done,
/// 3 crashed, 4 failed.
const RUNNING: u64 = 1;

fn ended(status: u64) -> bool {
    status >= 2
}

impl HostDaemon {
    /// Host `n`'s daemon (not started), its files under `dir`.
    pub(super) fn new(ns: &str, n: usize, dir: PathBuf, pin_dir: PathBuf, bridge: &str) -> Self {
        let pid = std::process::id();
        let cgroup_parent = format!("flynn-perf-overlay-{pid}-h{n}");
        let left = Arc::new(Mutex::new(Leftovers::new(
            dir.clone(),
            None,
            cgroup_parent.clone(),
        )));
        let on_signal = left.clone();
        let hook = crate::procs::add_hook(Box::new(move || lock(&on_signal).remove()));
        HostDaemon {
            ns: ns.to_string(),
            dir,
            host_id: format!("fpo{pid}h{n}"),
            cgroup_parent,
            pin_dir,
            bridge: bridge.to_string(),
            proc: None,
            starts: 0,
            jobs: Vec::new(),
            next_job: 0,
            left,
            hook,
        }
    }

    /// The daemon's address allocator file, which the host's agent reads at a clean stop
    /// (`flynn-network --job-ips`): its state directory is not flynn-host's default.
    pub(super) fn job_ips(&self) -> PathBuf {
        self.dir.join("state").join("job-ips.json")
    }

    /// Starts the daemon (`--fast-path auto` when `fast`, else `off`) and waits until it
    /// serves its API with the agent's block `subnet` as its network.
    pub(super) fn start(&mut self, bin: &Path, fast: bool, subnet: Subnet) -> Result<()> {
        ensure!(
            self.proc.is_none(),
            "flynn-host in {} already running",
            self.ns
        );
        self.starts += 1;
        let log = self.dir.join(format!("flynn-host-{}.log", self.starts));
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns))
            .arg("--")
            .arg(bin)
            .args(["--addr", API_ADDR, "--runtime", "container"])
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(["--id", &self.host_id])
            .args(["--cgroup-parent", &self.cgroup_parent])
            .args(["--bridge-name", &self.bridge])
            .arg("--network-from-agent")
            .arg("--bpf-pin-dir")
            .arg(&self.pin_dir)
            .args(["--fast-path", if fast { "auto" } else { "off" }]);
        crate::host::clean_env(&mut cmd);
        let mut proc = Proc::spawn("flynn-host", cmd, &log)?;
        let listening = proc.wait_for_line("listening api=", WAIT);
        self.proc = Some(proc);
        listening?;
        let want = subnet.to_string();
        let deadline = Instant::now() + WAIT;
        loop {
            let got = in_ns_async(&self.ns, async || {
                let (_, v) = get_json(&http()?, "/host/status").await?;
                Ok(v["network"]["subnet"].as_str().map(str::to_string))
            });
            match got {
                Ok(Some(s)) if s == want => return Ok(()),
                Ok(Some(s)) => bail!(
                    "flynn-host in {} has the block {s}, the agent leased {want}",
                    self.ns
                ),
                _ => {}
            }
            if Instant::now() > deadline {
                bail!(
                    "flynn-host in {} never got its network from the agent ({got:?}):\n{}",
                    self.ns,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        self.proc
            .as_ref()
            .map(|p| p.log_tail(20))
            .unwrap_or_default()
    }

    /// Starts `n` jobs through the API and waits until they run; their networks, each with
    /// the host's block length `prefix_len`.
    pub(super) fn start_jobs(
        &mut self,
        img: &Image,
        n: u32,
        prefix_len: u8,
    ) -> Result<Vec<(String, JobNet)>> {
        ensure!(self.proc.is_some(), "flynn-host in {} not running", self.ns);
        let ids: Vec<String> = (0..n)
            .map(|k| format!("{}-j{}", self.host_id, self.next_job + k))
            .collect();
        self.next_job += n;
        for id in &ids {
            lock(&self.left).add_job(id);
            self.jobs.push(id.clone());
        }
        let bodies: Vec<(String, String)> = ids
            .iter()
            .map(|id| (id.clone(), job_body(id, img, JOB_SCRIPT, None, false)))
            .collect();
        let ips = in_ns_async(&self.ns, async || {
            let http = http()?;
            for (id, body) in bodies {
                put_job(&http, API, &id, body).await?;
            }
            let mut ips = Vec::new();
            for id in &ids {
                let deadline = Instant::now() + WAIT;
                let ip = loop {
                    let (code, j) = get_json(&http, &format!("/host/jobs/{id}")).await?;
                    ensure!(code == 200, "GET /host/jobs/{id}: {code} {j}");
                    let status = j["status"].as_u64().unwrap_or(0);
                    let ip = j["internal_ip"].as_str().unwrap_or_default();
                    if status == RUNNING && !ip.is_empty() {
                        break ip.parse::<Ipv4Addr>().context("internal_ip")?;
                    }
                    ensure!(
                        !ended(status),
                        "job {id} ended (status {status}): {}",
                        j["error"].as_str().unwrap_or("(no error given)")
                    );
                    ensure!(
                        Instant::now() < deadline,
                        "job {id} not running after {WAIT:?}: {j}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                ips.push((id.clone(), ip));
            }
            Ok(ips)
        })
        .with_context(|| format!("flynn-host in {}:\n{}", self.ns, self.log_tail()))?;
        ips.into_iter()
            .map(|(id, ip)| Ok((id, find_job_net(&self.ns, ip, prefix_len)?)))
            .collect()
    }

    /// Stops every job through the API and waits until each has ended and its namespace is
    /// gone (the daemon tears the network down after recording the end).
    pub(super) fn stop_jobs(&mut self, nets: &[(String, JobNet)]) -> Result<()> {
        if self.jobs.is_empty() {
            return Ok(());
        }
        ensure!(self.proc.is_some(), "flynn-host in {} not running", self.ns);
        let ids = self.jobs.clone();
        in_ns_async(&self.ns, async || {
            let http = http()?;
            for id in &ids {
                if let Err(e) = delete_job(&http, API, id).await {
                    // Already ended (409 "not running") is fine; anything else is not.
                    let (_, j) = get_json(&http, &format!("/host/jobs/{id}")).await?;
                    ensure!(
                        j["status"].as_u64().is_some_and(ended),
                        "stopping {id}: {e:#}"
                    );
                }
            }
            let deadline = Instant::now() + WAIT;
            for id in &ids {
                loop {
                    let (code, j) = get_json(&http, &format!("/host/jobs/{id}")).await?;
                    if code == 404 || j["status"].as_u64().is_some_and(ended) {
                        break;
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "job {id} still running {WAIT:?} after its stop"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Ok(())
        })
        .with_context(|| format!("flynn-host in {}:\n{}", self.ns, self.log_tail()))?;
        let deadline = Instant::now() + WAIT;
        for (_, net) in nets {
            while net.netns_path.exists() {
                ensure!(
                    Instant::now() < deadline,
                    "{} still there {WAIT:?} after its job ended",
                    net.netns_path.display()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.jobs.clear();
        Ok(())
    }

    /// SIGTERM (a clean shutdown empties its namespace pool), SIGKILL after 20 s.
    pub(super) fn stop(&mut self) -> Result<()> {
        let Some(mut proc) = self.proc.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(proc.pid() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let status = proc.wait_timeout(Duration::from_secs(20))?;
        ensure!(
            status.success(),
            "flynn-host in {} exited with {status} on SIGTERM:\n{}",
            self.ns,
            proc.log_tail(20)
        );
        Ok(())
    }

    /// Stops the jobs (while the daemon lives) and the daemon, then removes whatever is left;
    /// never fails (problems are printed).
    pub(super) fn teardown(&mut self) {
        if self.proc.is_some() {
            if let Err(e) = self.stop_jobs(&[]) {
                eprintln!("cleanup: stopping jobs in {}: {e:#}", self.ns);
            }
        }
        if let Err(e) = self.stop() {
            eprintln!("cleanup: {e:#}");
        }
        lock(&self.left).remove();
        crate::procs::remove_hook(self.hook);
    }
}

impl Drop for HostDaemon {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// The network of the job with address `ip` on host namespace `host_ns`: among the host's
/// `flv<short>` veths, the one whose namespace `flynn-<short>` has `ip` on its `eth0`.
fn find_job_net(host_ns: &str, ip: Ipv4Addr, prefix_len: u8) -> Result<JobNet> {
    let links: Value = serde_json::from_str(&ip_json(&["-n", host_ns, "link", "show"])?)?;
    let want = ip.to_string();
    for l in links.as_array().into_iter().flatten() {
        let Some(name) = l["ifname"].as_str() else {
            continue;
        };
        let Some(short) = name.strip_prefix("flv") else {
            continue;
        };
        let ns = format!("flynn-{short}");
        let netns_path = Path::new("/run/netns").join(&ns);
        if !netns_path.exists() {
            continue;
        }
        let Ok(addrs) = ip_json(&["-n", &ns, "-4", "addr", "show", "dev", "eth0"]) else {
            continue;
        };
        let addrs: Value = serde_json::from_str(&addrs)?;
        let has = addrs
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|a| a["addr_info"].as_array().into_iter().flatten())
            .any(|a| a["local"].as_str() == Some(want.as_str()));
        if has {
            return Ok(JobNet {
                netns_path,
                ip,
                prefix_len,
                host_veth: name.to_string(),
                host_ifindex: l["ifindex"].as_u64().unwrap_or(0) as u32,
                mac: [0; 6],
            });
        }
    }
    bail!("no job namespace of {host_ns} has {ip} on its eth0")
}

/// `ip -j ARGS`' output.
fn ip_json(args: &[&str]) -> Result<String> {
    let mut all = vec!["ip", "-j"];
    all.extend_from_slice(args);
    flynn_netlab::run_stdout(&all)
}

/// The MTU of `dev` in namespace `ns`.
pub(super) fn link_mtu(ns: &str, dev: &str) -> Result<u64> {
    let v: Value = serde_json::from_str(&ip_json(&["-n", ns, "link", "show", "dev", dev])?)?;
    v[0]["mtu"]
        .as_u64()
        .with_context(|| format!("no mtu for {dev} in {ns}: {v}"))
}
