//! Per-job networking: a named network namespace per job with a veth pair into the host's bridge,
//! an address from the host's block ([`IpAllocator`]) and a default route via the bridge;
//! optionally the job's entry in the eBPF fast path ([`attach_fast_path`]). Used by `flynn-host`
//! when it starts and stops jobs.
//!
//! MTU: the veth pair (and the bridge) run at [`LOCAL_MTU`], so traffic inside the host's block
//! (job to job on this host, job to host) never leaves the machine and goes in 64 KiB packets;
//! the default route carries the overlay MTU as a route metric, so everything else (other
//! hosts' blocks over VXLAN, the outside world) is sized for the overlay. TCP takes its MSS and
//! UDP/ICMP their fragmentation from the route, so the path MTU is right for each destination.
//! Sockets that ignore the path MTU (`IP_PMTUDISC_PROBE`/`INTERFACE`/`OMIT`, raw) send up to
//! 65520 bytes; the host fragments those at the VXLAN device, and the fast path leaves them to
//! it.
//!
//! Names are derived from the job id: the namespace is `/run/netns/flynn-<short>` and the host end
//! of the veth `flv<short>`, where `<short>` is 12 hex digits of a hash of the job id (job ids are
//! long and may hold characters interface names cannot).

mod alloc;
mod fast;
mod netns;

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures_util::stream::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute};
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteMetric};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

pub use alloc::{IpAllocator, JOB_IPS_FILE, JOB_NETNS_FILE, POOL_OWNER_PREFIX};
pub use fast::{
    attach_fast_path, detach_fast_path, link_mac, register_job, unregister_job, unregister_pinned,
};
pub use netns::NETNS_RUN_DIR;

use crate::kernel::{link_mtu, link_name, KernelNetlink};
use crate::reconcile::{BridgeSpec, Netlink, NetlinkError};
use crate::subnet::Subnet;

/// Why per-job networking failed.
#[derive(Debug, thiserror::Error)]
pub enum JobNetError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("allocation file {path} is not valid")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("allocation file {path} is for block {stored}, not {block}")]
    BlockChanged {
        path: PathBuf,
        stored: String,
        block: Subnet,
    },
    #[error("no free address left in {block}")]
    Exhausted { block: Subnet },
    #[error("address {ip} is not a usable host address of {block}")]
    BadAddress { ip: Ipv4Addr, block: Subnet },
    #[error("network namespace {path} already exists")]
    NetnsExists { path: PathBuf },
    #[error("interface {name} already exists")]
    VethExists { name: String },
    #[error("bridge {name} does not exist")]
    NoBridge { name: String },
    #[error("netlink")]
    Netlink(#[from] NetlinkError),
    #[error("eBPF fast path")]
    FastPath(#[from] flynn_ebpf::EbpfError),
    /// A step failed and removing what had been made failed too: the namespace or veth may
    /// still hold the address.
    #[error("{error}; and undoing it failed ({undo})")]
    NotUndone {
        #[source]
        error: Box<JobNetError>,
        undo: Box<JobNetError>,
    },
}

/// How jobs attach to this host's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobNetConfig {
    /// The bridge the host ends of the veths join.
    pub bridge: String,
    /// The host's block; jobs get `block.prefix_len()` on their address.
    pub block: Subnet,
    /// The bridge's address, the jobs' default gateway.
    pub gateway: Ipv4Addr,
    /// MTU of every destination outside the block (the overlay MTU): set on the job's default
    /// route.
    pub mtu: u32,
    /// MTU of both veth ends, and so of traffic within the block; [`LOCAL_MTU`] normally. Never
    /// below `mtu`.
    pub local_mtu: u32,
}

impl JobNetConfig {
    /// MTU of both veth ends: `local_mtu`, never below `mtu`.
    pub fn link_mtu(&self) -> u32 {
        self.local_mtu.max(self.mtu)
    }
}

/// MTU of job veths and the bridge: the largest a veth takes, less 15 so an IPv4 packet's
/// total length (16 bits) always fits. Local traffic in 64 KiB packets costs a fraction of
/// the per-packet work at the overlay MTU (same-host TCP 1.3–1.5× faster on the bridge; see
/// perf/RESULTS.md).
pub const LOCAL_MTU: u32 = 65520;

/// A job's network, as created by [`create_job_net`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobNet {
    /// The named namespace to join (`setns`) when starting the job's processes.
    pub netns_path: PathBuf,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    /// Host end of the veth pair, a port of the bridge.
    pub host_veth: String,
    pub host_ifindex: u32,
    /// MAC of the job's `eth0`.
    pub mac: [u8; 6],
}

/// 12 hex digits identifying `job_id` in interface and namespace names (FNV-1a, 48 bits).
pub fn short_id(job_id: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in job_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{:012x}", h >> 16)
}

/// Path of the job's named network namespace: `/run/netns/flynn-<short id>`.
pub fn netns_path(job_id: &str) -> PathBuf {
    netns_path_of_short(&short_id(job_id))
}

fn netns_path_of_short(short: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(format!("flynn-{short}"))
}

/// Name of the host end of the job's veth pair: `flv<short id>` (15 characters, the kernel's limit).
pub fn host_veth_name(job_id: &str) -> String {
    format!("flv{}", short_id(job_id))
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JobNetError {
    let path = path.to_path_buf();
    move |source| JobNetError::Io { op, path, source }
}

fn req(op: &'static str) -> impl FnOnce(rtnetlink::Error) -> JobNetError {
    move |source| JobNetError::Netlink(NetlinkError::Request { op, source })
}

impl KernelNetlink {
    /// Opens an rtnetlink socket inside the network namespace at `path` (e.g. `/run/netns/x`),
    /// driven by the current tokio runtime. Must be called within a runtime.
    pub fn connect_in(path: &Path) -> Result<KernelNetlink, JobNetError> {
        let rt = tokio::runtime::Handle::current();
        netns::run_in(path, move || {
            let _guard = rt.enter();
            KernelNetlink::connect()
        })
        .map_err(io("enter network namespace", path))?
        .map_err(JobNetError::Netlink)
    }
}

/// Creates the job's namespace and veth pair and configures the job side: `eth0` with `ip` (the
/// block's prefix length), MTU `cfg.local_mtu`, `lo` up, default route via `cfg.gateway` with
/// MTU `cfg.mtu`. The host end is enslaved to `cfg.bridge` and up. Anything made is removed
/// again when a step fails; when that removal fails too the error is
/// [`JobNetError::NotUndone`], and `ip` must stay allocated.
pub async fn create_job_net(
    nl: &KernelNetlink,
    job_id: &str,
    ip: Ipv4Addr,
    cfg: &JobNetConfig,
) -> Result<JobNet, JobNetError> {
    let size = cfg.block.size();
    let special = [
        cfg.block.addr(),
        cfg.gateway,
        cfg.block
            .nth(u32::try_from(size - 1).unwrap_or(u32::MAX))
            .unwrap_or(cfg.block.addr()),
    ];
    if !cfg.block.contains(ip) || (size > 2 && special.contains(&ip)) {
        return Err(JobNetError::BadAddress {
            ip,
            block: cfg.block,
        });
    }
    let path = netns_path(job_id);
    let host_veth = host_veth_name(job_id);
    let bridge = nl
        .link_by_name(&cfg.bridge)
        .await?
        .ok_or_else(|| JobNetError::NoBridge {
            name: cfg.bridge.clone(),
        })?
        .header
        .index;
    if path.exists() {
        return Err(JobNetError::NetnsExists { path });
    }
    // Checked up front so the undo below, which deletes by name, never removes a stranger's link.
    if nl.link_by_name(&host_veth).await?.is_some() {
        return Err(JobNetError::VethExists { name: host_veth });
    }
    netns::create(&path).map_err(io("create network namespace", &path))?;
    let made = build(nl, &path, &host_veth, bridge, ip, cfg).await;
    match made {
        Ok((host_ifindex, mac)) => {
            tracing::debug!(job_id, %ip, veth = %host_veth, "job network created");
            Ok(JobNet {
                netns_path: path,
                ip,
                prefix_len: cfg.block.prefix_len(),
                host_veth,
                host_ifindex,
                mac,
            })
        }
        Err(e) => match destroy_job_net(nl, job_id).await {
            Ok(()) => Err(e),
            Err(undo) => {
                tracing::warn!(job_id, error = %undo, "could not undo a failed job network");
                Err(JobNetError::NotUndone {
                    error: Box::new(e),
                    undo: Box::new(undo),
                })
            }
        },
    }
}

async fn build(
    nl: &KernelNetlink,
    path: &Path,
    host_veth: &str,
    bridge: u32,
    ip: Ipv4Addr,
    cfg: &JobNetConfig,
) -> Result<(u32, [u8; 6]), JobNetError> {
    let ns = File::open(path).map_err(io("open network namespace", path))?;
    let link_mtu = cfg.link_mtu();
    // The peer is created directly inside the job's namespace as eth0.
    let peer = LinkUnspec::new_with_name("eth0")
        .mtu(link_mtu)
        .setns_by_fd(ns.as_raw_fd())
        .build();
    let veth = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
        .name(host_veth.to_string())
        .mtu(link_mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    nl.handle()
        .link()
        .add(veth)
        .execute()
        .await
        .map_err(req("add veth"))?;
    drop(ns);
    let host_ifindex = nl
        .link_by_name(host_veth)
        .await?
        .ok_or_else(|| NetlinkError::Missing {
            name: host_veth.into(),
        })?
        .header
        .index;
    nl.handle()
        .link()
        .set(
            LinkUnspec::new_with_index(host_ifindex)
                .controller(bridge)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(req("attach veth to bridge"))?;

    let inner = KernelNetlink::connect_in(path)?;
    let h = inner.handle();
    let lo = inner
        .link_by_name("lo")
        .await?
        .ok_or_else(|| NetlinkError::Missing { name: "lo".into() })?;
    h.link()
        .set(LinkUnspec::new_with_index(lo.header.index).up().build())
        .execute()
        .await
        .map_err(req("set lo up"))?;
    let eth0 = inner
        .link_by_name("eth0")
        .await?
        .ok_or_else(|| NetlinkError::Missing {
            name: "eth0".into(),
        })?;
    let mac = eth0
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(b) => <[u8; 6]>::try_from(b.as_slice()).ok(),
            _ => None,
        })
        .unwrap_or_default();
    let idx = eth0.header.index;
    h.address()
        .add(idx, IpAddr::V4(ip), cfg.block.prefix_len())
        .execute()
        .await
        .map_err(req("add job address"))?;
    h.link()
        .set(LinkUnspec::new_with_index(idx).mtu(link_mtu).up().build())
        .execute()
        .await
        .map_err(req("set eth0 up"))?;
    h.route()
        .add(default_route(cfg, idx))
        .execute()
        .await
        .map_err(req("add default route"))?;
    Ok((host_ifindex, mac))
}

/// The job's default route: via the gateway on `eth0`, with the overlay MTU as its metric.
fn default_route(cfg: &JobNetConfig, eth0: u32) -> RouteMessage {
    let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(cfg.gateway)
        .output_interface(eth0)
        .build();
    route
        .attributes
        .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(cfg.mtu)]));
    route
}

/// Removes the job's veth pair and namespace file. Idempotent: whatever is already gone is
/// skipped.
pub async fn destroy_job_net(nl: &KernelNetlink, job_id: &str) -> Result<(), JobNetError> {
    let host_veth = host_veth_name(job_id);
    if let Some(link) = nl.link_by_name(&host_veth).await? {
        match nl.handle().link().del(link.header.index).execute().await {
            Err(rtnetlink::Error::NetlinkError(m)) if -m.raw_code() == libc::ENODEV => {}
            r => r.map_err(req("delete veth"))?,
        }
    }
    let path = netns_path(job_id);
    netns::remove(&path).map_err(io("remove network namespace", &path))?;
    tracing::debug!(job_id, "job network removed");
    Ok(())
}

/// Creates or adopts a bridge for a single host without an overlay: `block`'s first address on it,
/// MTU `mtu` (normally [`LOCAL_MTU`], like the jobs' veths), up. Returns its index.
pub async fn setup_local_bridge(
    nl: &KernelNetlink,
    name: &str,
    block: Subnet,
    mtu: u32,
) -> Result<u32, JobNetError> {
    let mut nl = nl.clone();
    let index = nl
        .ensure_bridge(&BridgeSpec {
            name: name.to_string(),
            address: block.first_host(),
            prefix_len: block.prefix_len(),
            mtu,
        })
        .await?;
    Ok(index)
}

/// Puts jobs' host-side veths (`flv…`) that are no port of any bridge back on `bridge` (an
/// index), up. The kernel takes every port off a bridge that is deleted; when the overlay agent
/// creates the bridge again, the jobs on this host stay cut off until their veths are ports of
/// the new one. Only veths whose job namespace still exists are taken (one being removed is
/// left alone); a veth that went meanwhile is skipped. Returns the number of veths attached.
pub async fn adopt_job_veths(nl: &KernelNetlink, bridge: u32) -> Result<usize, JobNetError> {
    let mut loose = Vec::new();
    let mut links = nl.handle().link().get().execute();
    while let Some(l) = links.try_next().await.map_err(req("get links"))? {
        let on_bridge = l
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::Controller(_)));
        if let Some(name) = link_name(&l).filter(|n| n.starts_with("flv") && !on_bridge) {
            if netns_path_of_short(&name[3..]).exists() {
                loose.push((name.to_string(), l.header.index));
            }
        }
    }
    let mut adopted = 0;
    for (name, index) in loose {
        let set = LinkUnspec::new_with_index(index).controller(bridge).up();
        match nl.handle().link().set(set.build()).execute().await {
            Ok(()) => {
                tracing::warn!(veth = %name, "a job's veth was on no bridge; attached it again");
                adopted += 1;
            }
            Err(rtnetlink::Error::NetlinkError(m)) if -m.raw_code() == libc::ENODEV => {}
            Err(e) => {
                tracing::warn!(veth = %name, error = %e, "cannot attach a job's veth to the bridge")
            }
        }
    }
    Ok(adopted)
}

/// Brings jobs made before the local MTU (veths at the overlay MTU, a default route without an
/// MTU) up to `cfg`: for every `flv…` port of `cfg.bridge` below `cfg.local_mtu`, the job's
/// default route gets `cfg.mtu` as its metric, then its `eth0` and the host end get the local
/// MTU. Without this, jobs started before an upgrade would keep 1450-byte ports on a bridge where
/// new jobs send 64 KiB packets, and UDP or ICMP above 1450 bytes to them would be dropped. A job
/// whose namespace is gone is skipped; one that fails is logged and left as it is. Returns the
/// number of jobs changed.
pub async fn raise_to_local_mtu(
    nl: &KernelNetlink,
    cfg: &JobNetConfig,
) -> Result<usize, JobNetError> {
    let want = cfg.link_mtu();
    let Some(bridge) = nl.link_by_name(&cfg.bridge).await? else {
        return Ok(0);
    };
    let bridge = bridge.header.index;
    let mut low = Vec::new();
    let mut links = nl.handle().link().get().execute();
    while let Some(l) = links.try_next().await.map_err(req("get links"))? {
        let port = l.attributes.contains(&LinkAttribute::Controller(bridge));
        match link_name(&l) {
            Some(name)
                if port && name.starts_with("flv") && link_mtu(&l).is_some_and(|m| m < want) =>
            {
                low.push((name.to_string(), l.header.index))
            }
            _ => {}
        }
    }
    let mut changed = 0;
    for (name, index) in low {
        // `flv<short>` is the host end of the job whose namespace is `flynn-<short>`.
        let path = netns_path_of_short(&name[3..]);
        if !path.exists() {
            continue;
        }
        match raise_one(nl, cfg, &path, index, want).await {
            Ok(()) => {
                tracing::info!(veth = %name, mtu = want, "job network raised to the local MTU");
                changed += 1;
            }
            // One job's odd namespace must not keep the host from starting; that job keeps
            // its old MTU (TCP still works across the mix).
            Err(e) => tracing::warn!(veth = %name, error = %e, "could not raise a job's MTU"),
        }
    }
    Ok(changed)
}

async fn raise_one(
    nl: &KernelNetlink,
    cfg: &JobNetConfig,
    path: &Path,
    host_index: u32,
    want: u32,
) -> Result<(), JobNetError> {
    let inner = KernelNetlink::connect_in(path)?;
    let eth0 = inner
        .link_by_name("eth0")
        .await?
        .ok_or_else(|| NetlinkError::Missing {
            name: "eth0".into(),
        })?
        .header
        .index;
    inner
        .handle()
        .route()
        .add(default_route(cfg, eth0))
        .replace()
        .execute()
        .await
        .map_err(req("replace default route"))?;
    inner
        .handle()
        .link()
        .set(LinkUnspec::new_with_index(eth0).mtu(want).build())
        .execute()
        .await
        .map_err(req("raise eth0 MTU"))?;
    nl.handle()
        .link()
        .set(LinkUnspec::new_with_index(host_index).mtu(want).build())
        .execute()
        .await
        .map_err(req("raise host veth MTU"))?;
    Ok(())
}

/// The names of links in the current namespace starting with `prefix` (used to check for leaks).
pub async fn links_with_prefix(
    nl: &KernelNetlink,
    prefix: &str,
) -> Result<Vec<String>, JobNetError> {
    let mut out = Vec::new();
    let mut links = nl.handle().link().get().execute();
    while let Some(l) = links.try_next().await.map_err(req("get links"))? {
        if let Some(n) = link_name(&l).filter(|n| n.starts_with(prefix)) {
            out.push(n.to_string());
        }
    }
    Ok(out)
}
