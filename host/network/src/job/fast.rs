//! Registering jobs with the eBPF fast path (`flynn-ebpf`): the job's host-side veth gets the
//! job classifier and the endpoint map an entry, so traffic to the job is handed to its namespace
//! directly. Called by `flynn-host` after [`super::create_job_net`] and before
//! [`super::destroy_job_net`]; the calling thread must be in the host's network namespace.

use flynn_ebpf::{Endpoint, FastPath, Role};
use rtnetlink::packet_route::link::LinkAttribute;

use super::{JobNet, JobNetError};
use crate::kernel::KernelNetlink;
use crate::reconcile::NetlinkError;

/// MAC address of interface `name`.
pub async fn link_mac(nl: &KernelNetlink, name: &str) -> Result<[u8; 6], JobNetError> {
    let link = nl
        .link_by_name(name)
        .await?
        .ok_or_else(|| JobNetError::NoBridge { name: name.into() })?;
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(b) => <[u8; 6]>::try_from(b.as_slice()).ok(),
            _ => None,
        })
        .ok_or_else(|| {
            JobNetError::Netlink(NetlinkError::Missing {
                name: format!("{name} (MAC address)"),
            })
        })
}

/// Attaches the job classifier to the job's host veth and adds its endpoint (job MAC, bridge MAC
/// as the source after the rewrite).
pub async fn attach_fast_path(
    nl: &KernelNetlink,
    fp: &mut FastPath,
    job: &JobNet,
    bridge: &str,
) -> Result<(), JobNetError> {
    let gateway_mac = link_mac(nl, bridge).await?;
    register_job(fp, job, gateway_mac)
}

/// [`attach_fast_path`] with the bridge's MAC already known (no netlink; for callers that
/// hold the fast path under a lock).
pub fn register_job(
    fp: &mut FastPath,
    job: &JobNet,
    gateway_mac: [u8; 6],
) -> Result<(), JobNetError> {
    fp.attach(job.host_ifindex, Role::JobVeth)?;
    fp.upsert_endpoint(
        job.ip,
        Endpoint {
            ifindex: job.host_ifindex,
            mac: job.mac,
            gateway_mac,
        },
    )?;
    Ok(())
}

/// Removes the job's endpoint and detaches its veth; a no-op for what is already gone.
pub fn detach_fast_path(fp: &mut FastPath, job: &JobNet) -> Result<(), JobNetError> {
    unregister_job(fp, Some(job.ip), Some(job.host_ifindex))
}

/// [`detach_fast_path`] for what is known of the job: its address and its host veth's index
/// (either may be gone already).
pub fn unregister_job(
    fp: &mut FastPath,
    ip: Option<std::net::Ipv4Addr>,
    ifindex: Option<u32>,
) -> Result<(), JobNetError> {
    if let Some(ip) = ip {
        fp.remove_endpoint(ip)?;
    }
    if let Some(ifindex) = ifindex {
        fp.detach(ifindex)?;
    }
    Ok(())
}

/// [`unregister_job`] without a loaded fast path: the entry and the attachment are removed
/// straight from what is pinned in `pin_dir`, and nothing is loaded or attached. For a caller
/// that does not run the fast path itself (off, or its load failed) while entries and
/// attachments made by an earlier run of it may still be there. A pin directory without the
/// fast path's maps is fine.
pub fn unregister_pinned(
    pin_dir: &std::path::Path,
    ip: Option<std::net::Ipv4Addr>,
    ifindex: Option<u32>,
) -> Result<(), JobNetError> {
    if let Some(ip) = ip {
        flynn_ebpf::remove_pinned_endpoint(pin_dir, ip)?;
    }
    if let Some(ifindex) = ifindex {
        flynn_ebpf::detach_pinned(pin_dir, ifindex)?;
    }
    Ok(())
}
