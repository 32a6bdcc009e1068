//! Test network for the fast path: namespaces made with `ip` (tests only), a private BPF
//! filesystem per test, helpers to run code inside a namespace. Everything is removed on drop.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// Whether the test should run; panics with the reason when it cannot (not root, no `ip`/`ping`),
/// so a broken environment fails instead of passing silently.
pub fn should_run(test: &str) -> bool {
    if std::env::var("FLYNN_SKIP_NETNS_TESTS").as_deref() == Ok("1") {
        println!("{test}: skipped (FLYNN_SKIP_NETNS_TESTS=1)");
        return false;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "{test} needs root for namespaces and BPF (run as root, or set FLYNN_SKIP_NETNS_TESTS=1)"
    );
    for (bin, pkg) in [
        ("ip", "iproute2"),
        ("ping", "iputils-ping"),
        ("bridge", "iproute2"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(found, "{test} needs `{bin}`: apt-get install {pkg}");
    }
    if let Err(e) = flynn_ebpf::FastPath::probe() {
        panic!("{test}: this kernel cannot run the fast path: {e:#}");
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

/// A BPF filesystem mounted on a fresh temporary directory; unmounted on drop.
pub struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    pub fn mount() -> Result<Bpffs> {
        let dir = tempfile::Builder::new().prefix("flynn-bpffs").tempdir()?;
        run(&["mount", "-t", "bpf", "bpf", dir.path().to_str().unwrap()])?;
        Ok(Bpffs { dir })
    }

    /// A pin directory inside this filesystem (not created).
    pub fn pin_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        // Lazy unmount: pinned objects still referenced elsewhere do not block it.
        if let Err(e) = run(&["umount", "-l", self.dir.path().to_str().unwrap()]) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// Namespaces created by one test; all deleted on drop (deleting a namespace removes its links).
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
}

impl Lab {
    pub fn new() -> Lab {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        Lab {
            prefix: format!(
                "fbp{}x{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
            namespaces: Vec::new(),
        }
    }

    pub fn add_ns(&mut self, short: &str) -> Result<String> {
        let name = format!("{}{short}", self.prefix);
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
        run(&["ip", "-n", &ns, "link", "add", "flbr", "type", "bridge"])?;
        run(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{gw}/24"),
            "dev",
            "flbr",
        ])?;
        run(&["ip", "-n", &ns, "link", "set", "flbr", "up"])?;
        Ok(ns)
    }

    /// A job namespace with `eth0` at `ip/24` (default route via `gw`), its peer `port` in `host`
    /// on bridge `flbr`.
    pub fn add_job(
        &mut self,
        short: &str,
        host: &str,
        port: &str,
        ip: &str,
        gw: &str,
        mtu: u32,
    ) -> Result<Job> {
        let ns = self.add_ns(short)?;
        let mtu = mtu.to_string();
        run(&[
            "ip", "-n", host, "link", "add", port, "mtu", &mtu, "type", "veth", "peer", "name",
            "eth0", "netns", &ns,
        ])?;
        run(&[
            "ip", "-n", host, "link", "set", port, "master", "flbr", "up",
        ])?;
        run(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ])?;
        run(&["ip", "-n", &ns, "link", "set", "eth0", "mtu", &mtu, "up"])?;
        run(&["ip", "-n", &ns, "route", "add", "default", "via", gw])?;
        Ok(Job {
            ns,
            ip: ip.parse()?,
            port: port.to_string(),
        })
    }
    /// Joins hosts `a` and `b` with an underlay veth pair `ul0` at `a_ip/24` and `b_ip/24`.
    pub fn underlay(&self, a: &str, a_ip: &str, b: &str, b_ip: &str) -> Result<()> {
        run(&[
            "ip", "-n", a, "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns", b,
        ])?;
        for (ns, ip) in [(a, a_ip), (b, b_ip)] {
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "ul0",
            ])?;
            run(&["ip", "-n", ns, "link", "set", "ul0", "up"])?;
        }
        Ok(())
    }

    /// Flannel's VXLAN device in `host`: `flvx`, VNI 1, port 8472, learning off, MTU 1450,
    /// the block's network address as a /32, a fixed MAC.
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
        run(&[
            "ip",
            "-n",
            host,
            "addr",
            "add",
            &format!("{block_addr}/32"),
            "dev",
            "flvx",
        ])?;
        run(&["ip", "-n", host, "link", "set", "flvx", "up"])?;
        Ok(())
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
        run(&[
            "ip",
            "netns",
            "exec",
            host,
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
        ])?;
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

pub struct Job {
    pub ns: String,
    pub ip: Ipv4Addr,
    /// Name of the host-side veth.
    pub port: String,
}

pub fn sysctl(ns: &str, kv: &str) -> Result<()> {
    run(&["ip", "netns", "exec", ns, "sysctl", "-qw", kv])?;
    Ok(())
}

/// `/sys/class/net/<dev>/<attr>` as seen from `ns`.
fn sys_attr(ns: &str, dev: &str, attr: &str) -> Result<String> {
    let out = run(&[
        "ip",
        "netns",
        "exec",
        ns,
        "cat",
        &format!("/sys/class/net/{dev}/{attr}"),
    ])?;
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

/// Runs `f` on a scoped thread that entered network namespace `ns`.
pub fn in_ns<R: Send>(ns: &str, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| -> Result<R> {
            let file = File::open(&path).with_context(|| format!("open {path}"))?;
            // SAFETY: setns only switches this (scoped, short-lived) thread's network namespace;
            // the fd is a valid namespace file for the duration of the call.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
    })
}

/// Sends `count` pings (interval 50 ms, 1 s deadline each) and returns how many were answered.
pub fn ping_count(from: &str, ip: Ipv4Addr, count: u32) -> u32 {
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

/// The TTL of the reply to one ping (how many routing hops the path took), if answered.
pub fn ping_ttl(from: &str, ip: Ipv4Addr) -> Option<u8> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            from,
            "ping",
            "-n",
            "-c",
            "1",
            "-W",
            "1",
            &ip.to_string(),
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.find("ttl=")? + 4;
    text[at..].split_whitespace().next()?.parse().ok()
}

/// Whether one ping gets an answer within `tries` attempts.
pub fn ping(from: &str, ip: Ipv4Addr, tries: u32) -> bool {
    (0..tries).any(|_| ping_count(from, ip, 1) == 1)
}

/// Sends `len` bytes over TCP from namespace `client` to a listener in `server` at `ip:port`; the
/// server answers with the byte count and a checksum, which must match. Bounded by timeouts.
pub fn tcp_roundtrip(
    client: &str,
    server: &str,
    ip: Ipv4Addr,
    port: u16,
    len: usize,
) -> Result<()> {
    let addr = SocketAddr::from((ip, port));
    let listener = in_ns(server, || Ok(TcpListener::bind(addr)?))?;
    listener.set_nonblocking(true)?;
    let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let want = (len as u64, checksum(&payload));
    std::thread::scope(|s| -> Result<()> {
        let srv = s.spawn(|| -> Result<()> {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut conn = loop {
                match listener.accept() {
                    Ok((c, _)) => break c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        ensure!(Instant::now() < deadline, "no TCP connection within 10 s");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            conn.set_nonblocking(false)?;
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut got = Vec::new();
            conn.read_to_end(&mut got)?;
            let mut reply = (got.len() as u64).to_be_bytes().to_vec();
            reply.extend_from_slice(&checksum(&got).to_be_bytes());
            conn.write_all(&reply)?;
            Ok(())
        });
        let cli = in_ns(client, || -> Result<(u64, u64)> {
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            c.set_write_timeout(Some(Duration::from_secs(10)))?;
            c.write_all(&payload)?;
            c.shutdown(std::net::Shutdown::Write)?;
            let mut reply = [0u8; 16];
            c.read_exact(&mut reply)?;
            Ok((
                u64::from_be_bytes(reply[..8].try_into().unwrap()),
                u64::from_be_bytes(reply[8..].try_into().unwrap()),
            ))
        });
        let srv = srv.join().map_err(|_| anyhow::anyhow!("server panicked"))?;
        let got = cli.context("TCP client")?;
        srv.context("TCP server")?;
        ensure!(
            got == want,
            "TCP transfer mismatch: got {got:?}, want {want:?}"
        );
        Ok(())
    })
}

fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
        (h ^ *x as u64).wrapping_mul(0x100_0000_01b3)
    })
}
