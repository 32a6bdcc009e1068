//! Test network for the fast path on top of `flynn-netlab`: host namespaces with a bridge `flbr`,
//! jobs on it, a TCP check. Everything is removed on drop.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
pub use flynn_netlab::{ifindex, in_ns, mac, ping, ping_count, ping_df, ping_ttl, run, Bpffs};

/// Whether the test should run; panics with the reason when it cannot (not root, no `ip`/`ping`,
/// no fast path on this kernel), so a broken environment fails instead of passing silently.
pub fn should_run(test: &str) -> bool {
    if !flynn_netlab::should_run(
        test,
        &[
            ("ip", "iproute2"),
            ("ping", "iputils-ping"),
            ("bridge", "iproute2"),
        ],
    ) {
        return false;
    }
    if let Err(e) = flynn_ebpf::FastPath::probe() {
        panic!("{test}: this kernel cannot run the fast path: {e:#}");
    }
    true
}

/// Namespaces created by one test; all deleted on drop.
pub struct Lab(flynn_netlab::Lab);

impl Lab {
    pub fn new() -> Lab {
        Lab(flynn_netlab::Lab::new("fbp"))
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
        let ns = self
            .0
            .add_job(short, host, port, "flbr", &format!("{ip}/24"), gw, mtu)?;
        Ok(Job {
            ns,
            ip: ip.parse()?,
            port: port.to_string(),
        })
    }
}

impl Deref for Lab {
    type Target = flynn_netlab::Lab;
    fn deref(&self) -> &flynn_netlab::Lab {
        &self.0
    }
}

impl DerefMut for Lab {
    fn deref_mut(&mut self) -> &mut flynn_netlab::Lab {
        &mut self.0
    }
}

pub struct Job {
    pub ns: String,
    pub ip: Ipv4Addr,
    /// Name of the host-side veth.
    pub port: String,
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
