//! The `overlay` harness's lab: hosts and jobs made with `ip` commands, flannel-style VXLAN
//! (permanent neighbour + FDB entry + route per remote block), the fast path switched on and off
//! with the `fastpathctl` example of `flynn-ebpf` (run inside the host namespaces).

use std::path::Path;

use anyhow::{Context, Result};
use flynn_netlab::{run_stdout as run, sys_attr, Bpffs};

use super::{Mode, Pair, Setup, LOCAL_MTU, OVERLAY_MTU};

/// The namespaces and the BPF filesystem; removed on drop (namespaces first), and by a
/// signal hook on Ctrl-C (the signal thread exits the process, so no drop runs then).
struct Lab {
    net: flynn_netlab::Lab,
    bpffs: Bpffs,
    hook: u64,
}

/// The short names of every namespace [`build`] makes.
const NAMESPACES: [&str; 5] = ["h1", "h2", "a", "b", "c"];

impl Lab {
    fn new() -> Result<Lab> {
        let net = flynn_netlab::Lab::new("fpo");
        let bpffs = Bpffs::mount("flynn-perf-bpffs")?;
        let names: Vec<String> = NAMESPACES.iter().map(|n| net.ns(n)).collect();
        let bpf_dir = bpffs.path().to_path_buf();
        let hook = crate::procs::add_hook(Box::new(move || cleanup(&names, &bpf_dir)));
        Ok(Lab { net, bpffs, hook })
    }
}

/// What the signal hook removes: the namespaces that exist among `names` (jobs first, as
/// `Drop` does), then the BPF filesystem, lazily unmounted, and its directory.
fn cleanup(names: &[String], bpf_dir: &Path) {
    for ns in names.iter().rev() {
        if Path::new("/run/netns").join(ns).exists() {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(bpf_dir)
        .status();
    let _ = std::fs::remove_dir(bpf_dir);
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The fields (namespaces, then the BPF filesystem) go right after this.
        crate::procs::remove_hook(self.hook);
    }
}

struct Job {
    ns: String,
    port: &'static str,
    ip: &'static str,
}

const VTEP1: &str = "0e:46:4c:01:00:00";
const VTEP2: &str = "0e:46:4c:02:00:00";

/// A job namespace whose `eth0` is peered with `port` on `flbr` in `host`; the default route
/// carries the overlay MTU.
fn job(
    lab: &mut flynn_netlab::Lab,
    short: &str,
    host: &str,
    port: &'static str,
    ip: &'static str,
    gw: &str,
) -> Result<Job> {
    let ns = lab.add_ns(short)?;
    flynn_netlab::veth(host, port, Some(LOCAL_MTU), &ns, "eth0")?;
    flynn_netlab::enslave(host, port, "flbr")?;
    flynn_netlab::addr(&ns, "eth0", &format!("{ip}/24"))?;
    flynn_netlab::link_up(&ns, "eth0", Some(LOCAL_MTU))?;
    flynn_netlab::default_route(&ns, gw)?;
    let mtu = OVERLAY_MTU.to_string();
    run(&[
        "ip", "-n", &ns, "route", "change", "default", "via", gw, "mtu", &mtu,
    ])?;
    Ok(Job { ns, port, ip })
}

/// Sets the MTU of every job's `eth0`, its host end and both bridges.
fn set_job_mtu(t: &Topology, mtu: u32) -> Result<()> {
    let mtu = mtu.to_string();
    for (host, jobs) in [(&t.h1, vec![&t.a, &t.b]), (&t.h2, vec![&t.c])] {
        for j in jobs {
            run(&["ip", "-n", host, "link", "set", j.port, "mtu", &mtu])?;
            run(&["ip", "-n", &j.ns, "link", "set", "eth0", "mtu", &mtu])?;
        }
        run(&["ip", "-n", host, "link", "set", "flbr", "mtu", &mtu])?;
    }
    Ok(())
}

struct Topology {
    lab: Lab,
    h1: String,
    h2: String,
    a: Job,
    b: Job,
    c: Job,
}

fn build() -> Result<Topology> {
    let mut lab = Lab::new()?;
    let net = &mut lab.net;
    let h1 = net.add_host("h1", "100.100.1.1")?;
    let h2 = net.add_host("h2", "100.100.2.1")?;
    net.underlay(&h1, "10.231.0.1", &h2, "10.231.0.2")?;
    net.vxlan(&h1, "10.231.0.1", "100.100.1.0", VTEP1)?;
    net.vxlan(&h2, "10.231.0.2", "100.100.2.0", VTEP2)?;
    net.peer(&h1, "100.100.2.0", VTEP2, "10.231.0.2")?;
    net.peer(&h2, "100.100.1.0", VTEP1, "10.231.0.1")?;
    let a = job(net, "a", &h1, "vja", "100.100.1.10", "100.100.1.1")?;
    let b = job(net, "b", &h1, "vjb", "100.100.1.11", "100.100.1.1")?;
    let c = job(net, "c", &h2, "vjc", "100.100.2.10", "100.100.2.1")?;
    Ok(Topology {
        lab,
        h1,
        h2,
        a,
        b,
        c,
    })
}

struct FastPath {
    ctl: String,
    pin: String,
    host: String,
    /// This host's underlay address and VTEP MAC, for VXLAN in BPF on `ul0`.
    underlay_ip: &'static str,
    vtep: &'static str,
    /// The peer's underlay address and VTEP MAC (encapsulation towards the remote block).
    peer_ip: &'static str,
    peer_vtep: &'static str,
}

impl FastPath {
    fn ctl(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["ip", "netns", "exec", &self.host, &self.ctl, &self.pin];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Attaches the programs and fills the maps: local jobs, the remote block and its peer, the
    /// VXLAN settings for encapsulation and decapsulation on the underlay device.
    fn on(&self, jobs: &[&Job], remote_block: &str) -> Result<()> {
        self.ctl(&["attach", "flvx", "vxlan"])?;
        self.ctl(&["underlay", self.underlay_ip, "1", "8472", self.vtep, "ul0"])?;
        self.ctl(&["attach", "ul0", "underlay"])?;
        self.ctl(&["tunnel", remote_block, self.peer_ip, self.peer_vtep])?;
        let gw = sys_attr(&self.host, "flbr", "address")?;
        for j in jobs {
            self.ctl(&["attach", j.port, "job"])?;
            let mac = sys_attr(&j.ns, "eth0", "address")?;
            self.ctl(&["endpoint", j.ip, j.port, &mac, &gw])?;
        }
        self.ctl(&[
            "prefix",
            &format!("{remote_block}/24"),
            "flvx",
            remote_block,
        ])?;
        Ok(())
    }

    fn off(&self) -> Result<()> {
        self.ctl(&["unpin"]).map(|_| ())
    }

    /// (redirected local, encapsulated in BPF, decapsulated in BPF).
    fn counters(&self) -> Result<(u64, u64, u64)> {
        let text = self.ctl(&["counters"])?;
        let get = |k: &str| -> Result<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .context("counter missing")?
                .trim()
                .parse()
                .context("counter value")
        };
        Ok((
            get("redirected_local ")?,
            get("encapsulated ")?,
            get("decapsulated ")?,
        ))
    }
}

/// The lab as a [`Setup`]: one topology for the whole run; modes change MTUs and switch the
/// fast path with `fastpathctl`.
pub(super) struct LabSetup {
    t: Topology,
    fp1: FastPath,
    fp2: FastPath,
    masq: &'static str,
}

impl LabSetup {
    /// Builds the topology; with `masq_bin`, both hosts get the outbound NAT table.
    pub(super) fn new(ctl_bin: &Path, masq_bin: Option<&Path>) -> Result<LabSetup> {
        let ctl = ctl_bin.to_str().context("ctl path")?.to_string();
        anyhow::ensure!(
            ctl_bin.exists(),
            "{ctl} not found: cargo build --release -p flynn-ebpf --example fastpathctl"
        );
        let t = build()?;
        let masq = match masq_bin {
            Some(bin) => {
                let bin = bin.to_str().context("masqctl path")?;
                anyhow::ensure!(
                    Path::new(bin).exists(),
                    "{bin} not found: cargo build --release -p flynn-network --example masqctl"
                );
                for h in [&t.h1, &t.h2] {
                    run(&["ip", "netns", "exec", h, bin, "install", "100.100.0.0/16"])?;
                }
                "outbound NAT table installed in both hosts (as `flynn-network --ip-masq true`, the default)"
            }
            None => "no outbound NAT table (`--no-masq`)",
        };
        let bpffs = t.lab.bpffs.path().to_path_buf();
        let fp1 = FastPath {
            ctl: ctl.clone(),
            pin: bpffs.join("h1").to_string_lossy().into_owned(),
            host: t.h1.clone(),
            underlay_ip: "10.231.0.1",
            vtep: VTEP1,
            peer_ip: "10.231.0.2",
            peer_vtep: VTEP2,
        };
        let fp2 = FastPath {
            ctl,
            pin: bpffs.join("h2").to_string_lossy().into_owned(),
            host: t.h2.clone(),
            underlay_ip: "10.231.0.2",
            vtep: VTEP2,
            peer_ip: "10.231.0.1",
            peer_vtep: VTEP1,
        };
        Ok(LabSetup { t, fp1, fp2, masq })
    }
}

impl Setup for LabSetup {
    fn describe(&self) -> String {
        format!(
            "lab (hosts, VXLAN and jobs made with `ip`, the fast path switched with `fastpathctl`); {}",
            self.masq
        )
    }

    fn underlay(&self) -> Pair {
        Pair {
            name: "underlay",
            src: self.t.h1.clone(),
            dst: self.t.h2.clone(),
            ip: "10.231.0.2".into(),
        }
    }

    fn enter(&mut self, mode: Mode) -> Result<[Pair; 2]> {
        set_job_mtu(
            &self.t,
            if mode == Mode::Flannel {
                OVERLAY_MTU
            } else {
                LOCAL_MTU
            },
        )?;
        if mode == Mode::Fast {
            self.fp1.on(&[&self.t.a, &self.t.b], "100.100.2.0")?;
            self.fp2.on(&[&self.t.c], "100.100.1.0")?;
        }
        let pair = |name, src: &Job, dst: &Job| Pair {
            name,
            src: src.ns.clone(),
            dst: dst.ns.clone(),
            ip: dst.ip.to_string(),
        };
        Ok([
            pair("same-host", &self.t.a, &self.t.b),
            pair("cross-host", &self.t.a, &self.t.c),
        ])
    }

    fn counters(&self) -> Result<(u64, u64, u64)> {
        self.fp1.counters()
    }

    fn leave(&mut self, mode: Mode) -> Result<()> {
        if mode == Mode::Fast {
            self.fp1.off()?;
            self.fp2.off()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lab's signal hook removes its namespaces and unmounts its BPF filesystem (Ctrl-C
    /// exits the process without running `Drop`).
    #[test]
    fn signal_hook_removes_namespaces_and_bpffs() {
        if !flynn_netlab::should_run(
            "signal_hook_removes_namespaces_and_bpffs",
            &[("ip", "iproute2")],
        ) {
            return;
        }
        let mut lab = Lab::new().unwrap();
        let h1 = lab.net.add_host("h1", "100.100.1.1").unwrap();
        let a = lab.net.add_ns("a").unwrap();
        let bpf = lab.bpffs.path().to_string_lossy().into_owned();
        let mounted = || {
            std::fs::read_to_string("/proc/self/mounts")
                .unwrap()
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(bpf.as_str()))
        };
        assert!(mounted());
        let hook = crate::procs::take_hook(lab.hook).expect("the lab registered a hook");
        hook();
        for ns in [&h1, &a] {
            assert!(!Path::new("/run/netns").join(ns).exists(), "{ns} left");
        }
        assert!(!mounted(), "{bpf} still mounted");
        // Drop finds nothing left (and says so on stderr).
        drop(lab);
    }
}
