//! Test network on top of `flynn-netlab`: namespaces joined by an underlay bridge, removed on drop.

use std::ops::Deref;

use anyhow::Result;
pub use flynn_netlab::{ping, run};

/// Whether the test should run; panics with the reason when it cannot (not root, no `ip`, no
/// `ping`, no `curl`), so a broken environment fails instead of passing silently.
pub fn should_run(test: &str) -> bool {
    flynn_netlab::should_run(
        test,
        &[
            ("ip", "iproute2"),
            ("bridge", "iproute2"),
            ("ping", "iputils-ping"),
            ("curl", "curl"),
        ],
    )
}

/// Namespaces created by one test; all deleted on drop (deleting a namespace removes its links).
pub struct Lab(flynn_netlab::Lab);

impl Lab {
    /// A lab with an underlay namespace holding bridge `br0`. Names carry the pid and a counter so
    /// parallel tests and leftovers of killed runs never collide.
    pub fn new() -> Result<Lab> {
        let mut lab = Lab(flynn_netlab::Lab::new("flt"));
        let ul = lab.0.add_ns("ul")?;
        flynn_netlab::bridge(&ul, "br0", None)?;
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

    /// A host namespace with `eth0` at `underlay_ip/24` on the underlay bridge and IP forwarding on.
    pub fn add_host(&mut self, short: &str, port: &str, underlay_ip: &str) -> Result<String> {
        let ns = self.0.add_ns(short)?;
        let ul = self.ns("ul");
        flynn_netlab::veth(&ul, port, None, &ns, "eth0")?;
        flynn_netlab::enslave(&ul, port, "br0")?;
        flynn_netlab::addr(&ns, "eth0", &format!("{underlay_ip}/24"))?;
        flynn_netlab::link_up(&ns, "eth0", None)?;
        flynn_netlab::sysctl(&ns, "net.ipv4.ip_forward=1")?;
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
        let port = format!("v{short}");
        self.0.add_job(
            short,
            host,
            &port,
            bridge,
            &format!("{ip}/{len}"),
            gateway,
            mtu,
        )
    }
}

impl Deref for Lab {
    type Target = flynn_netlab::Lab;
    fn deref(&self) -> &flynn_netlab::Lab {
        &self.0
    }
}

/// Runs `f` on a thread that entered network namespace `ns`, with a current-thread tokio runtime;
/// sockets opened there (netlink included) belong to `ns`.
pub fn in_netns<R: Send>(ns: &str, f: impl AsyncFnOnce() -> Result<R> + Send) -> Result<R> {
    flynn_netlab::in_ns(ns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(f())
    })
}
