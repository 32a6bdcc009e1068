//! `flynn-perf overlay --deployed`: the harness's pairs and modes through what a deployed host
//! runs instead of the lab's `ip` commands. Host 1 runs a single-node `flynn-discoverd` on its
//! underlay address; each host runs the `flynn-network` agent (lease from discoverd, VXLAN
//! device, bridge, peers' entries, outbound NAT table, and with `--fast-path on` the programs on
//! the VXLAN and underlay devices and the prefix map); jobs are made with the calls `flynn-host`
//! makes: [`raise_to_local_mtu`] when it opens the bridge, [`create_job_net`] per job and, when
//! the agent's fast path is pinned, [`attach_fast_path`] (program on the job's veth, endpoint
//! entry).
//!
//! Per mode the agents start with that mode's `--fast-path` (the previous ones are SIGKILLed,
//! as in an agent crash: the new agent adopts the lease and the devices) and the jobs are made
//! afresh; `flannel` lowers the jobs' veths and the bridge to the overlay MTU after they are
//! made. Everything lives in namespaces and a BPF filesystem of the harness's own, removed on
//! exit.
//!
//! With `--via-host` ([`super::via_host`]) the jobs come from a `flynn-host` daemon per host
//! instead, through its job API: the agents notify their daemon of the block, and per mode the
//! jobs are stopped, the agents and the daemons restarted (daemons with `--fast-path auto` in
//! the fast mode, `off` otherwise, so the kernel modes' jobs get no program) and new jobs
//! started.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use flynn_ebpf::FastPath;
use flynn_netlab::{in_ns, in_ns_path, run_stdout as run, sysctl, Bpffs};
use flynn_network::job::{
    attach_fast_path, create_job_net, destroy_job_net, detach_fast_path, raise_to_local_mtu,
    JobNet, JobNetConfig,
};
use flynn_network::{KernelNetlink, Subnet};

use super::via_host::{self, HostDaemon};
use super::{DeployedBins, Mode, Pair, Setup, LOCAL_MTU, OVERLAY_MTU};
use crate::host::Image;
use crate::procs::{Proc, TempDir};

const DISCOVERD: &str = "10.231.0.1:1111";
const BRIDGE: &str = "flynnbr0";
const WAIT: Duration = Duration::from_secs(30);

struct Host {
    ns: String,
    ip: &'static str,
    pin_dir: PathBuf,
    state_dir: PathBuf,
    agent: Option<Proc>,
    /// From the agent's ready line.
    subnet: Option<Subnet>,
    cfg: Option<JobNetConfig>,
    /// Job id and network.
    jobs: Vec<(String, JobNet)>,
    /// This host's fast path, loaded while in [`Mode::Fast`] (for the counters).
    fp: Option<FastPath>,
    /// `--via-host`: the host's `flynn-host` daemon, which makes the jobs.
    daemon: Option<HostDaemon>,
}

pub(super) struct Deployed {
    network_bin: PathBuf,
    dir: TempDir,
    discoverd: Option<Proc>,
    hosts: Vec<Host>,
    next_job: u32,
    bpffs: Option<Bpffs>,
    net: Option<flynn_netlab::Lab>,
    /// `--via-host`: the `flynn-host` binary and the jobs' busybox image.
    via_host: Option<(PathBuf, Image)>,
    /// Signal hook removing the jobs' and hosts' namespaces and the BPF filesystem (`Drop`
    /// does it otherwise).
    hook: u64,
    /// Ids of the jobs made with flynn-host's calls (their namespaces are machine-wide
    /// `/run/netns/flynn-…` files), for the signal hook.
    made: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// Runs `f` with a current-thread tokio runtime on a thread inside namespace `ns`.
pub(super) fn in_ns_async<R: Send>(
    ns: &str,
    f: impl AsyncFnOnce() -> Result<R> + Send,
) -> Result<R> {
    in_ns(ns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(f())
    })
}

impl Deployed {
    pub(super) fn new(bins: &DeployedBins) -> Result<Deployed> {
        for (bin, pkg) in [
            (&bins.discoverd, "flynn-discoverd"),
            (&bins.network, "flynn-network"),
        ]
        .into_iter()
        .chain(bins.host.as_ref().map(|b| (b, "flynn-host")))
        {
            ensure!(
                bin.exists(),
                "{} not found: cargo build --release -p {pkg}",
                bin.display()
            );
        }
        let dir = TempDir::new("flynn-perf-overlay-deployed")?;
        let bpffs = Bpffs::mount("flynn-perf-bpffs")?;
        let mut net = flynn_netlab::Lab::new("fpd");
        let mut hosts = Vec::new();
        for (i, ip) in [(1, "10.231.0.1"), (2, "10.231.0.2")] {
            let ns = net.add_ns(&format!("h{i}"))?;
            sysctl(&ns, "net.ipv4.ip_forward=1")?;
            hosts.push(Host {
                ns,
                ip,
                pin_dir: bpffs.pin_dir(&format!("h{i}")),
                state_dir: dir.path().join(format!("h{i}")),
                agent: None,
                subnet: None,
                cfg: None,
                jobs: Vec::new(),
                fp: None,
                daemon: None,
            });
        }
        net.underlay(&hosts[0].ns, hosts[0].ip, &hosts[1].ns, hosts[1].ip)?;
        let names: Vec<String> = hosts.iter().map(|h| h.ns.clone()).collect();
        let bpf_dir = bpffs.path().to_path_buf();
        let made = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let made_jobs = made.clone();
        let hook = crate::procs::add_hook(Box::new(move || {
            for id in made_jobs.lock().map(|m| m.clone()).unwrap_or_default() {
                let path = flynn_network::job::netns_path(&id);
                if let Some(name) = path.file_name().filter(|_| path.exists()) {
                    let _ = Command::new("ip").args(["netns", "del"]).arg(name).status();
                }
            }
            for ns in &names {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
            let _ = Command::new("umount").arg("-l").arg(&bpf_dir).status();
            let _ = std::fs::remove_dir(&bpf_dir);
        }));
        let mut d = Deployed {
            network_bin: bins.network.clone(),
            dir,
            discoverd: None,
            hosts,
            next_job: 0,
            bpffs: Some(bpffs),
            net: Some(net),
            via_host: None,
            hook,
            made,
        };
        if let Some(bin) = &bins.host {
            let img = crate::host::build_image(d.dir.path())?;
            for (i, h) in d.hosts.iter_mut().enumerate() {
                let dir = d.dir.path().join(format!("h{}-host", i + 1));
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                h.daemon = Some(HostDaemon::new(
                    &h.ns,
                    i + 1,
                    dir,
                    h.pin_dir.clone(),
                    BRIDGE,
                ));
            }
            d.via_host = Some((bin.clone(), img));
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &d.hosts[0].ns])
            .arg(&bins.discoverd)
            .arg("--data-dir")
            .arg(d.dir.path().join("discoverd"))
            .args(["--addr", DISCOVERD])
            .env("FLYNN_LOG", "warn");
        let log = d.dir.path().join("discoverd.log");
        d.discoverd = Some(Proc::spawn("flynn-discoverd", cmd, &log)?);
        d.wait_for_discoverd()?;
        Ok(d)
    }

    /// Until discoverd accepts a write (a fresh node elects itself first).
    fn wait_for_discoverd(&self) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let status = in_ns(&self.hosts[0].ns, || {
                put_status(
                    DISCOVERD,
                    "/services/perf-ready-probe",
                    r#"{"leader_type":"oldest"}"#,
                )
            });
            let last = match status {
                Ok(200) | Ok(409) => return Ok(()),
                Ok(s) => format!("status {s}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                let tail = self
                    .discoverd
                    .as_ref()
                    .map(|p| p.log_tail(10))
                    .unwrap_or_default();
                bail!("discoverd never accepted a write ({last}):\n{tail}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts host `i`'s agent with `--fast-path on|off` and waits for its ready line.
    fn start_agent(&mut self, i: usize, fast: bool) -> Result<()> {
        let h = &mut self.hosts[i];
        h.agent = None;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &h.ns])
            .arg(&self.network_bin)
            .args(["--discoverd", &format!("http://{DISCOVERD}")])
            .args(["--public-ip", h.ip])
            .arg("--state-dir")
            .arg(&h.state_dir)
            .arg("--pin-dir")
            .arg(&h.pin_dir)
            .args(["--fast-path", if fast { "on" } else { "off" }])
            .args(["--http-addr", "127.0.0.1:5001"])
            .env("FLYNN_LOG", "warn");
        // Never the machine's own flynn-host's allocator file (the default path): the host's
        // daemon's, or (jobs made by the harness, recorded nowhere) one that does not exist,
        // which keeps the lease at a stop (the next agent reuses it).
        let job_ips = match &h.daemon {
            Some(d) => d.job_ips(),
            None => h.state_dir.join("job-ips.json"),
        };
        cmd.arg("--job-ips").arg(job_ips);
        if self.via_host.is_some() {
            // Hand the host's daemon its block, as flanneld's notify does.
            cmd.args(["--notify", &format!("http://{}", via_host::API_ADDR)])
                .env("FLYNN_JOB_ID", format!("fpd-agent-h{}", i + 1));
        }
        let log = self.dir.path().join(format!(
            "agent-h{}-{}.log",
            i + 1,
            if fast { "on" } else { "off" }
        ));
        let mut proc = Proc::spawn("flynn-network", cmd, &log)?;
        let line = proc.wait_for_line("ready ", WAIT)?;
        let get = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .with_context(|| format!("no {k} in {line:?}"))
        };
        let subnet: Subnet = get("subnet=")?.parse()?;
        let gateway: Ipv4Addr = get("gateway=")?.parse()?;
        let mtu: u32 = get("mtu=")?.parse()?;
        let want = if fast { "on" } else { "off" };
        ensure!(
            get("fast_path=")? == want,
            "agent started with --fast-path {want} reports {line:?}"
        );
        h.subnet = Some(subnet);
        h.cfg = Some(JobNetConfig {
            bridge: BRIDGE.into(),
            block: subnet,
            gateway,
            mtu,
            local_mtu: LOCAL_MTU,
        });
        h.agent = Some(proc);
        Ok(())
    }

    /// Until each host routes the other's block (the agents saw each other's leases).
    fn wait_for_peers(&self) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        for (i, h) in self.hosts.iter().enumerate() {
            let other = self.hosts[1 - i].subnet.context("peer subnet")?.to_string();
            loop {
                let routes = run(&["ip", "-n", &h.ns, "route", "show"])?;
                if routes.lines().any(|l| l.starts_with(&other)) {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "{} has no route to {other} after 30 s:\n{routes}",
                    h.ns
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Makes `n` jobs on host `i` as flynn-host does, with the fast path when `fast`.
    fn add_jobs(&mut self, i: usize, n: u32, fast: bool) -> Result<()> {
        let pid = std::process::id();
        let ids: Vec<String> = (0..n)
            .map(|k| format!("fpd-{pid}-{}", self.next_job + k))
            .collect();
        self.next_job += n;
        if let Ok(mut m) = self.made.lock() {
            m.extend(ids.iter().cloned());
        }
        let h = &mut self.hosts[i];
        let cfg = h.cfg.clone().context("agent not started")?;
        let subnet = h.subnet.context("agent not started")?;
        let pin_dir = h.pin_dir.clone();
        let made = in_ns_async(&h.ns, async || {
            let nl = KernelNetlink::connect()?;
            raise_to_local_mtu(&nl, &cfg).await?;
            let mut fp = if fast {
                ensure!(
                    FastPath::is_set_up(&pin_dir),
                    "the agent pinned no fast path in {}",
                    pin_dir.display()
                );
                Some(FastPath::load(&pin_dir)?)
            } else {
                None
            };
            let mut jobs = Vec::new();
            for (k, id) in ids.iter().enumerate() {
                let ip = subnet.nth(10 + k as u32).context("address in block")?;
                let job = create_job_net(&nl, id, ip, &cfg).await?;
                jobs.push((id.clone(), job.clone()));
                if let Some(fp) = fp.as_mut() {
                    attach_fast_path(&nl, fp, &job, BRIDGE).await?;
                }
            }
            Ok((jobs, fp))
        });
        let (jobs, fp) = match made {
            Ok(m) => m,
            Err(e) => {
                // What was made before the failure is not known here; remove by id.
                h.jobs
                    .extend(ids.iter().map(|id| (id.clone(), placeholder(id))));
                return Err(e);
            }
        };
        h.jobs.extend(jobs);
        h.fp = fp;
        Ok(())
    }

    /// Detaches and removes host `i`'s jobs (best effort on the way out).
    fn remove_jobs(&mut self, i: usize) -> Result<()> {
        let h = &mut self.hosts[i];
        let jobs = std::mem::take(&mut h.jobs);
        let fp = h.fp.take();
        if jobs.is_empty() {
            return Ok(());
        }
        let pin_dir = h.pin_dir.clone();
        in_ns_async(&h.ns, async || {
            let nl = KernelNetlink::connect()?;
            let mut fp = match fp {
                Some(fp) => Some(fp),
                None if FastPath::is_set_up(&pin_dir) => FastPath::load(&pin_dir).ok(),
                None => None,
            };
            for (id, job) in &jobs {
                if let Some(fp) = fp.as_mut() {
                    if job.host_ifindex != 0 {
                        detach_fast_path(fp, job)?;
                    }
                }
                destroy_job_net(&nl, id).await?;
            }
            Ok(())
        })
    }

    /// `--via-host`: starts the daemons (fast path `auto` when `fast`, else `off`) and the
    /// jobs through their API, two on host 1 and one on host 2.
    fn start_via_host(&mut self, fast: bool) -> Result<()> {
        let (bin, img) = self.via_host.as_ref().context("not --via-host")?;
        if fast {
            // The hosts' counters (shared by every loader of the pin directory). Loaded before
            // the daemons, whose own load then swaps their programs into every attachment.
            for h in &mut self.hosts {
                ensure!(
                    FastPath::is_set_up(&h.pin_dir),
                    "the agent pinned no fast path in {}",
                    h.pin_dir.display()
                );
                let pin_dir = h.pin_dir.clone();
                h.fp = Some(in_ns(&h.ns, || Ok(FastPath::load(&pin_dir)?))?);
            }
        }
        for (i, n) in [(0, 2), (1, 1)] {
            let h = &mut self.hosts[i];
            let subnet = h.subnet.context("agent not started")?;
            let daemon = h.daemon.as_mut().context("no flynn-host daemon")?;
            daemon.start(bin, fast, subnet)?;
            let jobs = daemon.start_jobs(img, n, subnet.prefix_len())?;
            h.jobs.extend(jobs);
        }
        Ok(())
    }

    /// `--via-host`: stops the jobs through the API (until their namespaces are gone) and the
    /// daemons.
    fn stop_via_host(&mut self) -> Result<()> {
        for h in &mut self.hosts {
            h.fp = None;
            let jobs = std::mem::take(&mut h.jobs);
            let daemon = h.daemon.as_mut().context("no flynn-host daemon")?;
            daemon.stop_jobs(&jobs)?;
            daemon.stop()?;
        }
        Ok(())
    }
}

/// The name `ip netns exec` takes for a job's namespace (its file under `/run/netns`).
fn ns_name(job: &JobNet) -> String {
    job.netns_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A job whose creation may have failed half way: only its id is known, which is all
/// [`destroy_job_net`] needs (`host_ifindex` 0: nothing to detach).
fn placeholder(id: &str) -> JobNet {
    JobNet {
        netns_path: flynn_network::job::netns_path(id),
        ip: Ipv4Addr::UNSPECIFIED,
        prefix_len: 0,
        host_veth: flynn_network::job::host_veth_name(id),
        host_ifindex: 0,
        mac: [0; 6],
    }
}

/// `PUT path` with a JSON body over plain HTTP/1.1; the response's status code.
fn put_status(addr: &str, path: &str, body: &str) -> Result<u16> {
    let addr: SocketAddr = addr.parse()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "PUT {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    let text = std::str::from_utf8(&head)?;
    text.get(9..12)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line {text:?}"))
}

/// Lowers both ends of every job veth on `h`, and the bridge, to `mtu`.
fn set_job_mtu(h: &Host, mtu: u32) -> Result<()> {
    let mtu = mtu.to_string();
    for (_, j) in &h.jobs {
        run(&["ip", "-n", &h.ns, "link", "set", &j.host_veth, "mtu", &mtu])?;
        let path = j.netns_path.to_string_lossy().into_owned();
        in_ns_path(Path::new(&path), || {
            run(&["ip", "link", "set", "eth0", "mtu", &mtu])?;
            Ok(())
        })?;
    }
    run(&["ip", "-n", &h.ns, "link", "set", BRIDGE, "mtu", &mtu])?;
    Ok(())
}

impl Setup for Deployed {
    fn describe(&self) -> String {
        if self.via_host.is_some() {
            return "deployed, jobs from flynn-host's job API: single-node flynn-discoverd on host 1, a `flynn-network` agent per host (defaults: outbound NAT table on; `--notify` to its host) and a `flynn-host` daemon per host (`--network-from-agent`, container runtime); each job a busybox container started with `PUT /host/jobs/:id` (address from the API's `internal_ip`), stopped with `DELETE`; per mode the jobs are stopped, agents restarted with `--fast-path on|off` and daemons with `--fast-path auto|off`, and new jobs started".into();
        }
        "deployed: single-node flynn-discoverd on host 1, a `flynn-network` agent per host (defaults: outbound NAT table on), jobs made with flynn-host's calls (`raise_to_local_mtu`, `create_job_net`, `attach_fast_path`); agents restarted with `--fast-path on|off` per mode".into()
    }

    fn underlay(&self) -> Pair {
        Pair {
            name: "underlay",
            src: self.hosts[0].ns.clone(),
            dst: self.hosts[1].ns.clone(),
            ip: self.hosts[1].ip.into(),
        }
    }

    fn enter(&mut self, mode: Mode) -> Result<[Pair; 2]> {
        let fast = mode == Mode::Fast;
        for i in 0..self.hosts.len() {
            self.start_agent(i, fast)?;
        }
        self.wait_for_peers()?;
        if self.via_host.is_some() {
            self.start_via_host(fast)?;
        } else {
            self.add_jobs(0, 2, fast)?;
            self.add_jobs(1, 1, fast)?;
        }
        if mode == Mode::Flannel {
            for h in &self.hosts {
                set_job_mtu(h, OVERLAY_MTU)?;
            }
        } else if self.via_host.is_some() {
            // The daemon made the jobs: check they are at the local MTU the mode is named for.
            for h in &self.hosts {
                for (id, j) in &h.jobs {
                    let mtus = (
                        via_host::link_mtu(&h.ns, &j.host_veth)?,
                        via_host::link_mtu(&ns_name(j), "eth0")?,
                    );
                    ensure!(
                        mtus == (u64::from(LOCAL_MTU), u64::from(LOCAL_MTU)),
                        "job {id}: veth and eth0 MTU {mtus:?}, expected {LOCAL_MTU}"
                    );
                }
            }
        }
        let (h1, h2) = (&self.hosts[0], &self.hosts[1]);
        let pair = |name, src: &(String, JobNet), dst: &(String, JobNet)| Pair {
            name,
            src: ns_name(&src.1),
            dst: ns_name(&dst.1),
            ip: dst.1.ip.to_string(),
        };
        Ok([
            pair("same-host", &h1.jobs[0], &h1.jobs[1]),
            pair("cross-host", &h1.jobs[0], &h2.jobs[0]),
        ])
    }

    fn counters(&self) -> Result<(u64, u64, u64)> {
        let c = self.hosts[0]
            .fp
            .as_ref()
            .context("no fast path loaded on host 1")?
            .counters()?;
        Ok((c.redirected_local, c.encapsulated, c.decapsulated))
    }

    fn peer_encapsulated(&self) -> Result<Option<u64>> {
        match &self.hosts[1].fp {
            Some(fp) => Ok(Some(fp.counters()?.encapsulated)),
            None => Ok(None),
        }
    }

    fn leave(&mut self, _mode: Mode) -> Result<()> {
        if self.via_host.is_some() {
            return self.stop_via_host();
        }
        for i in 0..self.hosts.len() {
            self.remove_jobs(i)?;
        }
        Ok(())
    }
}

impl Drop for Deployed {
    fn drop(&mut self) {
        // Daemons first, while the agents and namespaces are still there: their jobs are
        // stopped through the API, then what is left is removed (their networks are the
        // daemons', not for `remove_jobs`).
        for h in &mut self.hosts {
            if let Some(mut daemon) = h.daemon.take() {
                daemon.teardown();
                h.jobs.clear();
            }
        }
        for i in 0..self.hosts.len() {
            if let Err(e) = self.remove_jobs(i) {
                eprintln!("cleanup: removing jobs: {e:#}");
            }
            self.hosts[i].agent = None;
        }
        self.discoverd = None;
        // Namespaces (and with them every device) before the BPF filesystem.
        self.net = None;
        self.bpffs = None;
        crate::procs::remove_hook(self.hook);
    }
}
