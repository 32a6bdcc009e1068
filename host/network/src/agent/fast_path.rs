//! The eBPF fast path: attaching it to the VXLAN and underlay devices (or falling back to the
//! kernel path), what its routing maps should hold, and turning it off.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::Ordering;

use flynn_ebpf::{FastPath, Hop, Role, Tunnel, Underlay};

use super::{error_chain, Agent, AgentConfig, AgentError};
use crate::direct::Segment;
use crate::lease::Lease;
use crate::store::LeaseStore;
use crate::subnet::Subnet;

impl<S: LeaseStore> Agent<S> {
    /// Attaches the fast path (if any) to `vxlan` and the underlay `segment`. On failure: an
    /// error when the fast path is required, else the kernel path alone (programs detached,
    /// maps emptied).
    pub(super) fn attach_or_fall_back(
        &mut self,
        lease: &Lease,
        vxlan: u32,
        segment: Segment,
    ) -> Result<(), AgentError> {
        let Some(fp) = &mut self.fast else {
            return Ok(());
        };
        if let Err(e) = attach_fast_path(fp, &self.cfg, lease, vxlan, segment) {
            if self.cfg.fast_path_required {
                return Err(e.into());
            }
            tracing::warn!(error = %error_chain(&e), "cannot attach the eBPF fast path; kernel path only");
            let pin_dir = fp.pin_dir().to_path_buf();
            self.fast = None;
            self.stats.fast_path.store(false, Ordering::Relaxed);
            self.stats.set_unmapped(BTreeSet::new());
            fast_path_off(&pin_dir);
        }
        Ok(())
    }
}

/// What the fast path's routing maps should hold: a prefix per remote block (hop: `vxlan`
/// and the block address, or the underlay and the peer for `direct` ones), and a tunnel entry
/// for the tunneled peers reached by the underlay device (`via_segment`: encapsulated in BPF,
/// and the only peers decapsulated in BPF), keyed like the hops.
pub(super) fn fast_wants(
    tunneled: &[Lease],
    via_segment: &BTreeSet<Ipv4Addr>,
    direct: &BTreeSet<crate::reconcile::Route>,
    vxlan: u32,
    segment: Segment,
) -> (BTreeMap<Subnet, Hop>, BTreeMap<Ipv4Addr, Tunnel>) {
    let mut want: BTreeMap<Subnet, Hop> = tunneled
        .iter()
        .map(|l| {
            (
                l.subnet,
                Hop {
                    ifindex: vxlan,
                    next_hop: l.subnet.addr(),
                },
            )
        })
        .collect();
    want.extend(direct.iter().map(|r| {
        (
            r.subnet,
            Hop {
                ifindex: segment.ifindex,
                next_hop: r.gateway,
            },
        )
    }));
    let tunnels: BTreeMap<Ipv4Addr, Tunnel> = tunneled
        .iter()
        .filter(|l| via_segment.contains(&l.public_ip))
        .map(|l| {
            (
                l.subnet.addr(),
                Tunnel {
                    remote_ip: l.public_ip,
                    vtep_mac: l.vtep_mac.octets(),
                },
            )
        })
        .collect();
    (want, tunnels)
}

/// Attaches the agent's programs to the VXLAN device and the underlay device.
fn attach_fast_path(
    fp: &mut FastPath,
    cfg: &AgentConfig,
    lease: &Lease,
    vxlan: u32,
    segment: Segment,
) -> Result<(), flynn_ebpf::EbpfError> {
    fp.attach(vxlan, Role::Vxlan)?;
    // VXLAN in BPF on the device holding the public IP (the VXLAN device's lower device):
    // packets for our jobs are decapsulated there, and packets to peers with a tunnel entry (see
    // sync_fast_path) are encapsulated and leave by it. The settings go in before the program,
    // which decapsulates nothing without them.
    fp.set_underlay(Underlay {
        local_ip: cfg.public_ip,
        vni: cfg.devices.vni,
        port: cfg.devices.port,
        vtep_mac: lease.vtep_mac.octets(),
        ifindex: segment.ifindex,
    })?;
    fp.attach(segment.ifindex, Role::Underlay)
}

/// Leaves the kernel path alone in charge of the overlay when the fast path is off (by flag, or
/// because it failed to load or attach): detaches the programs a previous agent attached to its
/// devices (they outlive it by design) and empties the pinned prefix and tunnel maps and the
/// underlay settings, which nothing keeps up to date any more. The jobs' veths keep their
/// programs and the endpoint map (both the host daemon's); with those maps empty, every remote
/// destination misses and takes the kernel path. Best effort: failures are logged.
pub fn fast_path_off(pin_dir: &Path) {
    match flynn_ebpf::detach_roles(pin_dir, &[Role::Vxlan, Role::Underlay]) {
        Ok(0) => {}
        Ok(n) => tracing::info!(detached = n, "fast path off: device programs detached"),
        Err(e) => tracing::warn!(
            error = %error_chain(&e),
            "fast path off: could not detach a previous agent's programs"
        ),
    }
    match flynn_ebpf::clear_routes(pin_dir) {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "fast path off: stale map entries removed"),
        Err(e) => tracing::warn!(
            error = %error_chain(&e),
            "fast path off: could not empty the pinned prefix and tunnel maps"
        ),
    }
}
