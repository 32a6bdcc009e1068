//! A network lab for tests and benchmarks: named network namespaces, veth pairs, bridges and
//! flannel-style VXLAN devices made by shelling out to `ip`, pings, code run inside a namespace,
//! and a private BPF filesystem. Everything a [`Lab`] or [`Bpffs`] creates is removed on drop, so a
//! failing or panicking test leaves nothing behind; names carry the pid so parallel tests and
//! leftovers of killed runs never collide.
//!
//! Test support only (errors are `anyhow`, like the test setup that calls it): product crates
//! configure the kernel through netlink and never depend on this crate (`tests/deps`).

use std::fmt::Display;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, ensure, Context, Result};

/// Set to `1` to skip tests that need root and namespaces (they fail loudly otherwise).
pub const SKIP_ENV: &str = "FLYNN_SKIP_NETNS_TESTS";

/// Whether a namespace test should run; panics with the reason when it cannot (not root, or one
/// of `tools` — `(binary, Debian package)` — missing), so a broken environment fails instead of
/// passing silently. Returns false only when [`SKIP_ENV`] is `1`.
pub fn should_run(test: &str, tools: &[(&str, &str)]) -> bool {
    if std::env::var(SKIP_ENV).as_deref() == Ok("1") {
        println!("{test}: skipped ({SKIP_ENV}=1)");
        return false;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "{test} needs root for network namespaces (run as root, or set {SKIP_ENV}=1 to skip)"
    );
    for (bin, pkg) in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(found, "{test} needs `{bin}`: apt-get install {pkg}");
    }
    true
}

/// Runs a command, failing with its stderr.
pub fn run(args: &[&str]) -> Result<Output> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("spawn {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// [`run`], returning stdout as text.
pub fn run_stdout(args: &[&str]) -> Result<String> {
    Ok(String::from_utf8_lossy(&run(args)?.stdout).into_owned())
}

/// Runs `args` inside namespace `ns` (`ip netns exec`), failing with its stderr.
pub fn exec(ns: &str, args: &[&str]) -> Result<Output> {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend_from_slice(args);
    run(&all)
}

/// `sysctl -w kv` inside `ns`.
pub fn sysctl(ns: &str, kv: &str) -> Result<()> {
    exec(ns, &["sysctl", "-qw", kv])?;
    Ok(())
}

/// `/sys/class/net/<dev>/<attr>` as seen from `ns`, trimmed.
pub fn sys_attr(ns: &str, dev: &str, attr: &str) -> Result<String> {
    let out = exec(ns, &["cat", &format!("/sys/class/net/{dev}/{attr}")])?;
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

pub fn ifindex(ns: &str, dev: &str) -> Result<u32> {
    Ok(sys_attr(ns, dev, "ifindex")?.parse()?)
}

pub fn mac(ns: &str, dev: &str) -> Result<[u8; 6]> {
    let s = sys_attr(ns, dev, "address")?;
    let mut out = [0u8; 6];
    let parts: Vec<_> = s.split(':').collect();
    ensure!(parts.len() == 6, "bad MAC {s:?}");
    for (o, p) in out.iter_mut().zip(parts) {
        *o = u8::from_str_radix(p, 16)?;
    }
    Ok(out)
}

/// A bridge `name` in `ns`, with address `cidr` when given, set up.
pub fn bridge(ns: &str, name: &str, cidr: Option<&str>) -> Result<()> {
    run(&["ip", "-n", ns, "link", "add", name, "type", "bridge"])?;
    if let Some(cidr) = cidr {
        addr(ns, name, cidr)?;
    }
    run(&["ip", "-n", ns, "link", "set", name, "up"])?;
    Ok(())
}

/// A veth pair: `name` in `ns` (with `mtu` when given) and its peer `peer` in `peer_ns`.
/// Both ends stay down.
pub fn veth(ns: &str, name: &str, mtu: Option<u32>, peer_ns: &str, peer: &str) -> Result<()> {
    let mtu = mtu.map(|m| m.to_string());
    let mut args = vec!["ip", "-n", ns, "link", "add", name];
    if let Some(mtu) = &mtu {
        args.extend_from_slice(&["mtu", mtu]);
    }
    args.extend_from_slice(&["type", "veth", "peer", "name", peer, "netns", peer_ns]);
    run(&args)?;
    Ok(())
}

/// Puts `dev` in `ns` on `bridge` and sets it up.
pub fn enslave(ns: &str, dev: &str, bridge: &str) -> Result<()> {
    run(&["ip", "-n", ns, "link", "set", dev, "master", bridge, "up"])?;
    Ok(())
}

/// Adds address `cidr` (`a.b.c.d/len`) to `dev` in `ns`.
pub fn addr(ns: &str, dev: &str, cidr: &str) -> Result<()> {
    run(&["ip", "-n", ns, "addr", "add", cidr, "dev", dev])?;
    Ok(())
}

/// Sets `dev` in `ns` up, with `mtu` when given.
pub fn link_up(ns: &str, dev: &str, mtu: Option<u32>) -> Result<()> {
    let mtu = mtu.map(|m| m.to_string());
    let mut args = vec!["ip", "-n", ns, "link", "set", dev];
    if let Some(mtu) = &mtu {
        args.extend_from_slice(&["mtu", mtu]);
    }
    args.push("up");
    run(&args)?;
    Ok(())
}

/// A default route in `ns` via `gw`.
pub fn default_route(ns: &str, gw: &str) -> Result<()> {
    run(&["ip", "-n", ns, "route", "add", "default", "via", gw])?;
    Ok(())
}

/// Namespaces created by one test or run; all deleted on drop, newest first (deleting a namespace
/// removes its links).
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
}

impl Lab {
    /// Namespace names are `<tag><pid>x<n><short>`, `n` counting labs in this process.
    pub fn new(tag: &str) -> Lab {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        Lab {
            prefix: format!(
                "{tag}{}x{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
            namespaces: Vec::new(),
        }
    }

    /// The full name of namespace `short` (created or not).
    pub fn ns(&self, short: &str) -> String {
        format!("{}{short}", self.prefix)
    }

    /// A new namespace with `lo` up; returns its full name.
    pub fn add_ns(&mut self, short: &str) -> Result<String> {
        let name = self.ns(short);
        run(&["ip", "netns", "add", &name])?;
        self.namespaces.push(name.clone());
        run(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// Deletes one namespace early (a job going away).
    pub fn del_ns(&mut self, ns: &str) -> Result<()> {
        run(&["ip", "netns", "del", ns])?;
        self.namespaces.retain(|n| n != ns);
        Ok(())
    }

    /// A host namespace with forwarding on and a bridge `flbr` holding `gw/24`.
    pub fn add_host(&mut self, short: &str, gw: &str) -> Result<String> {
        let ns = self.add_ns(short)?;
        sysctl(&ns, "net.ipv4.ip_forward=1")?;
        bridge(&ns, "flbr", Some(&format!("{gw}/24")))?;
        Ok(ns)
    }

    /// A job namespace whose `eth0` (MTU `mtu`, address `cidr`, default route via `gw`) is peered
    /// with `port` (MTU `mtu`) on `bridge` in `host`. Returns the namespace's name.
    #[allow(clippy::too_many_arguments)]
    pub fn add_job(
        &mut self,
        short: &str,
        host: &str,
        port: &str,
        bridge: &str,
        cidr: &str,
        gw: &str,
        mtu: u32,
    ) -> Result<String> {
        let ns = self.add_ns(short)?;
        veth(host, port, Some(mtu), &ns, "eth0")?;
        enslave(host, port, bridge)?;
        addr(&ns, "eth0", cidr)?;
        link_up(&ns, "eth0", Some(mtu))?;
        default_route(&ns, gw)?;
        Ok(ns)
    }

    /// Joins hosts `a` and `b` with an underlay veth pair `ul0` at `a_ip/24` and `b_ip/24`.
    pub fn underlay(&self, a: &str, a_ip: &str, b: &str, b_ip: &str) -> Result<()> {
        veth(a, "ul0", None, b, "ul0")?;
        for (ns, ip) in [(a, a_ip), (b, b_ip)] {
            addr(ns, "ul0", &format!("{ip}/24"))?;
            link_up(ns, "ul0", None)?;
        }
        Ok(())
    }

    /// Flannel's VXLAN device in `host`: `flvx`, VNI 1, port 8472, learning off, MTU 1450, over
    /// `ul0`, the block's network address as a /32, a fixed MAC.
    pub fn vxlan(&self, host: &str, local: &str, block_addr: &str, mac: &str) -> Result<()> {
        run(&[
            "ip",
            "-n",
            host,
            "link",
            "add",
            "flvx",
            "address",
            mac,
            "mtu",
            "1450",
            "type",
            "vxlan",
            "id",
            "1",
            "dstport",
            "8472",
            "local",
            local,
            "dev",
            "ul0",
            "nolearning",
        ])?;
        addr(host, "flvx", &format!("{block_addr}/32"))?;
        link_up(host, "flvx", None)
    }

    /// A remote block in `host`, flannel-style: permanent neighbour, permanent FDB entry, route.
    pub fn peer(&self, host: &str, block_addr: &str, vtep_mac: &str, underlay: &str) -> Result<()> {
        run(&[
            "ip",
            "-n",
            host,
            "neigh",
            "add",
            block_addr,
            "lladdr",
            vtep_mac,
            "dev",
            "flvx",
            "nud",
            "permanent",
        ])?;
        exec(
            host,
            &[
                "bridge",
                "fdb",
                "add",
                vtep_mac,
                "dev",
                "flvx",
                "dst",
                underlay,
                "self",
                "permanent",
            ],
        )?;
        run(&[
            "ip",
            "-n",
            host,
            "route",
            "add",
            &format!("{block_addr}/24"),
            "via",
            block_addr,
            "dev",
            "flvx",
            "onlink",
        ])?;
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = run(&["ip", "netns", "del", ns]) {
                eprintln!("cleanup: {e:#}");
            }
        }
    }
}

/// Runs `f` on a scoped thread that entered network namespace `ns` (`/run/netns/<ns>`); sockets
/// opened there belong to `ns`.
pub fn in_ns<R: Send>(ns: &str, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    in_ns_path(&Path::new("/run/netns").join(ns), f)
}

/// [`in_ns`] for a namespace file at any path.
pub fn in_ns_path<R: Send>(path: &Path, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<R> {
            let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns {}", path.display()))?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {} panicked", path.display()))?
    })
}

/// Sends `count` pings from `from` (interval 50 ms, 1 s deadline each) and returns how many were
/// answered.
pub fn ping_count(from: &str, ip: impl Display, count: u32) -> u32 {
    let out = Command::new("ip")
        .args([
            "netns", "exec", from, "ping", "-n", "-q", "-i", "0.05", "-W", "1",
        ])
        .args(["-c", &count.to_string(), &ip.to_string()])
        .output();
    let Ok(out) = out else { return 0 };
    let text = String::from_utf8_lossy(&out.stdout);
    // "N packets transmitted, M received, ..."
    text.lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Whether one ping from `from` to `ip` gets an answer, trying up to `tries` times.
pub fn ping(from: &str, ip: impl Display, tries: u32) -> bool {
    let ip = ip.to_string();
    (0..tries).any(|_| ping_count(from, &ip, 1) == 1)
}

/// Whether one ping of `size` payload bytes with DF set gets through from `from` to `ip`.
pub fn ping_df(from: &str, ip: impl Display, size: u32) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", from, "ping", "-n", "-q", "-c", "1", "-W", "1", "-M", "do",
        ])
        .args(["-s", &size.to_string(), &ip.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The TTL of the reply to one ping (how many routing hops the path took), if answered.
pub fn ping_ttl(from: &str, ip: impl Display) -> Option<u8> {
    let out = Command::new("ip")
        .args(["netns", "exec", from, "ping", "-n", "-c", "1", "-W", "1"])
        .arg(ip.to_string())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.find("ttl=")? + 4;
    text[at..].split_whitespace().next()?.parse().ok()
}

/// A BPF filesystem mounted on a fresh temporary directory; lazily unmounted (pinned objects
/// still referenced elsewhere do not block it) and removed on drop.
pub struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    /// Mounts one on a temporary directory named `<prefix>…`.
    pub fn mount(prefix: &str) -> Result<Bpffs> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        run(&[
            "mount",
            "-t",
            "bpf",
            "bpf",
            dir.path().to_str().context("path")?,
        ])?;
        Ok(Bpffs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A pin directory inside this filesystem (not created).
    pub fn pin_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if let Some(p) = self.dir.path().to_str() {
            if let Err(e) = run(&["umount", "-l", p]) {
                eprintln!("cleanup: {e:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names_carry_the_pid_and_differ_per_lab() {
        let (a, b) = (Lab::new("t"), Lab::new("t"));
        let pid = std::process::id().to_string();
        assert!(a.ns("h").starts_with(&format!("t{pid}x")));
        assert!(a.ns("h").ends_with('h'));
        assert_ne!(a.ns("h"), b.ns("h"));
    }

    #[test]
    fn run_reports_stderr_of_a_failing_command() {
        let err = run(&["sh", "-c", "echo boom >&2; exit 3"]).unwrap_err();
        assert!(format!("{err:#}").contains("boom"), "{err:#}");
        assert_eq!(run_stdout(&["echo", "hi"]).unwrap(), "hi\n");
    }

    #[test]
    fn namespace_lifecycle_and_cleanup_on_drop() -> Result<()> {
        if !should_run(
            "namespace_lifecycle_and_cleanup_on_drop",
            &[("ip", "iproute2"), ("ping", "iputils-ping")],
        ) {
            return Ok(());
        }
        let (host, job);
        {
            let mut lab = Lab::new("fnl");
            host = lab.add_host("h", "100.100.1.1")?;
            job = lab.add_job(
                "j",
                &host,
                "vj",
                "flbr",
                "100.100.1.10/24",
                "100.100.1.1",
                1400,
            )?;
            assert_eq!(sys_attr(&job, "eth0", "mtu")?, "1400");
            assert_eq!(sys_attr(&host, "vj", "mtu")?, "1400");
            assert!(ping(&job, "100.100.1.1", 3));
            assert_eq!(mac(&host, "flbr")?.len(), 6);
            ifindex(&job, "eth0")?;
            // The job's address can be bound only inside its namespace.
            let bind = || Ok(std::net::TcpListener::bind("100.100.1.10:0")?);
            assert!(in_ns(&job, bind).is_ok());
            assert!(bind().is_err());
            lab.del_ns(&job)?;
            assert!(!Path::new("/run/netns").join(&job).exists());
        }
        assert!(!Path::new("/run/netns").join(&host).exists());
        Ok(())
    }
}
