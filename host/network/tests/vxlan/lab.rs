//! Test network: namespaces joined by an underlay bridge, created with `ip` and removed on drop.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

/// Whether the test should run; panics with the reason when it cannot (not root, no `ip`, no
/// `ping`, no VXLAN support), so a broken environment fails instead of passing silently.
pub fn should_run(test: &str) -> bool {
    if std::env::var("FLYNN_SKIP_NETNS_TESTS").as_deref() == Ok("1") {
        println!("{test}: skipped (FLYNN_SKIP_NETNS_TESTS=1)");
        return false;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "{test} needs root to create network namespaces (run as root, or set FLYNN_SKIP_NETNS_TESTS=1 to skip)"
    );
    for (bin, pkg) in [
        ("ip", "iproute2"),
        ("bridge", "iproute2"),
        ("ping", "iputils-ping"),
        ("curl", "curl"),
    ] {
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

/// Namespaces created by one test; all deleted on drop (deleting a namespace removes its links).
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
}

impl Lab {
    /// A lab with an underlay namespace holding bridge `br0`. Names carry the pid and a counter so
    /// parallel tests and leftovers of killed runs never collide.
    pub fn new() -> Result<Lab> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "flt{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = Lab {
            prefix,
            namespaces: Vec::new(),
        };
        let ul = lab.add_ns("ul")?;
        run(&["ip", "-n", &ul, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &ul, "link", "set", "br0", "up"])?;
        // Fail early and clearly when the kernel has no VXLAN support.
        if let Err(e) = run(&[
            "ip", "-n", &ul, "link", "add", "vxprobe", "type", "vxlan", "id", "1", "dstport",
            "8472",
        ]) {
            panic!("the kernel cannot create VXLAN devices (vxlan module missing?): {e:#}");
        }
        run(&["ip", "-n", &ul, "link", "del", "vxprobe"])?;
        Ok(lab)
    }

    pub fn ns(&self, short: &str) -> String {
        format!("{}{short}", self.prefix)
    }

    fn add_ns(&mut self, short: &str) -> Result<String> {
        let name = self.ns(short);
        run(&["ip", "netns", "add", &name])?;
        self.namespaces.push(name.clone());
        run(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// A host namespace with `eth0` at `underlay_ip/24` on the underlay bridge and IP forwarding on.
    pub fn add_host(&mut self, short: &str, port: &str, underlay_ip: &str) -> Result<String> {
        let ns = self.add_ns(short)?;
        let ul = self.ns("ul");
        run(&[
            "ip", "-n", &ul, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ])?;
        run(&["ip", "-n", &ul, "link", "set", port, "master", "br0", "up"])?;
        run(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{underlay_ip}/24"),
            "dev",
            "eth0",
        ])?;
        run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        run(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        Ok(ns)
    }

    /// A job namespace attached to `bridge` in `host` with `ip/len`, default route via `gateway`.
    #[allow(clippy::too_many_arguments)]
    pub fn add_job(
        &mut self,
        short: &str,
        host: &str,
        bridge: &str,
        ip: &str,
        len: u8,
        gateway: &str,
        mtu: u32,
    ) -> Result<String> {
        let ns = self.add_ns(short)?;
        let mtu = mtu.to_string();
        let port = format!("v{short}");
        run(&[
            "ip", "-n", host, "link", "add", &port, "mtu", &mtu, "type", "veth", "peer", "name",
            "eth0", "netns", &ns,
        ])?;
        run(&[
            "ip", "-n", host, "link", "set", &port, "master", bridge, "up",
        ])?;
        run(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/{len}"),
            "dev",
            "eth0",
        ])?;
        run(&["ip", "-n", &ns, "link", "set", "eth0", "mtu", &mtu, "up"])?;
        run(&["ip", "-n", &ns, "route", "add", "default", "via", gateway])?;
        Ok(ns)
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

/// Runs `f` on a fresh thread that entered network namespace `ns`, with a current-thread tokio
/// runtime; sockets opened there (netlink included) belong to `ns`.
pub fn in_netns<R: Send + 'static>(
    ns: &str,
    f: impl AsyncFnOnce() -> Result<R> + Send + 'static,
) -> Result<R> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> Result<R> {
        let file = File::open(&path).with_context(|| format!("open {path}"))?;
        // SAFETY: setns only switches this thread's network namespace; the fd is a valid open
        // namespace file for the duration of the call. The thread is ours and ends after `f`.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
}

/// Whether one ping from `from` namespace to `ip` gets an answer, trying up to `tries` times.
pub fn ping(from: &str, ip: &str, tries: u32) -> bool {
    (0..tries).any(|_| {
        Command::new("ip")
            .args(["netns", "exec", from, "ping", "-c1", "-W1", "-n", "-q", ip])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}
