//! Reconciling: making the kernel's entries, the direct routes and the fast path's maps match
//! a lease snapshot ([`Agent::sync`]), logged and counted in the stats.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use super::fast_path::fast_wants;
use super::{error_chain, Agent, AgentError};
use crate::direct::direct_routes;
use crate::fastmaps::{ordered_pass, FastPass, PassError};
use crate::lease::Lease;
use crate::store::{LeaseStore, Snapshot};

impl<S: LeaseStore> Agent<S> {
    /// Makes the kernel and the fast path match `snap`. Returns the number of changes.
    pub async fn sync(&mut self, snap: &Snapshot) -> Result<usize, AgentError> {
        self.sync_pass(snap).await.map_err(|e| e.error)
    }

    /// [`Agent::sync`], telling a pass that failed as a whole from one that failed for
    /// some entries ([`PassError`]).
    async fn sync_pass(&mut self, snap: &Snapshot) -> Result<usize, PassError> {
        let (Some(lease), Some(devices), Some(segment)) = (&self.lease, self.devices, self.segment)
        else {
            return Ok(0);
        };
        // Judged as of the last read while the store is away (see `Freshness`).
        let now = self.fresh.judge_at(SystemTime::now());
        // Only blocks of the cluster network, of its block size, are routed: a corrupt or
        // foreign record (say `0.0.0.0-0`) must never become a route over the overlay.
        let layout = &self.cfg.lease.layout;
        let remote: Vec<&Lease> = snap
            .live(now)
            .filter(|l| l.subnet != lease.subnet)
            .filter(|l| {
                let ok = l.subnet.prefix_len() == layout.subnet_len
                    && layout.network.contains_subnet(&l.subnet);
                if !ok {
                    tracing::warn!(subnet = %l.subnet, "ignoring a lease outside the cluster network");
                }
                ok
            })
            .collect();
        let direct: BTreeSet<crate::reconcile::Route> = if self.cfg.direct_routing {
            direct_routes(&segment, &remote, lease.subnet.first_host())
        } else {
            BTreeSet::new()
        };
        let is_direct = |l: &Lease| direct.iter().any(|r| r.subnet == l.subnet);
        let tunneled: Vec<Lease> = remote
            .iter()
            .filter(|l| !is_direct(l))
            .map(|l| (*l).clone())
            .collect();
        // Peers encapsulated in BPF leave by the device holding the public IP; a peer the kernel
        // reaches by another device (the address on a dummy or `lo` of a routed host, a second
        // NIC) is encapsulated by the VXLAN device instead, which follows the routing table.
        let mut via_segment: BTreeSet<Ipv4Addr> = BTreeSet::new();
        if self.fast.is_some() {
            for l in &tunneled {
                match self.nl.egress_of(l.public_ip).await {
                    Ok(Some(i)) if i == segment.ifindex => {
                        via_segment.insert(l.public_ip);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(peer = %l.public_ip, error = %e, "no route lookup; encapsulated by the kernel")
                    }
                }
            }
        }
        let mut nl = self.nl.clone();
        let fast = self.fast.as_mut().map(|fp| {
            let (want, tunnels) =
                fast_wants(&tunneled, &via_segment, &direct, devices.vxlan, segment);
            FastPass {
                sync: &mut self.maps,
                maps: fp,
                want,
                tunnels,
            }
        });
        // Stale fast path entries, tunnel entries (whose removal takes the VXLAN route of a
        // block going direct before its direct route is added), direct routes, new fast path
        // entries. Each part runs even when an earlier one failed (a failure is for one peer's
        // entry; the others, and the fast path maps, must still follow the leases); the first
        // failure is returned at the end.
        let direct_routes = self.nl.sync_direct_routes_part(segment.ifindex, &direct);
        let pass = ordered_pass(
            &mut nl,
            devices.vxlan,
            &lease.subnet,
            &tunneled,
            now,
            direct_routes,
            fast,
        )
        .await;
        if self.fast.is_some() {
            if let Ok(out) = &pass.added {
                // A block the maps refuse (full: they hold 1024 entries) stays on the kernel
                // path and is reported in the status; the pass and the agent's health go on.
                self.stats.set_unmapped(out.unmapped.clone());
            }
        }
        let done = pass.changes()?;
        let (direct_changes, fast_changes) = (done.direct, done.fast);
        let changes = done.kernel + direct_changes + fast_changes;
        self.stats
            .peers
            .store(remote.len() as u64, Ordering::Relaxed);
        self.stats
            .changes
            .fetch_add(changes as u64, Ordering::Relaxed);
        if let Some(fp) = &self.fast {
            if let Ok(c) = fp.counters() {
                self.stats
                    .fast_local
                    .store(c.redirected_local, Ordering::Relaxed);
                self.stats
                    .fast_remote
                    .store(c.redirected_remote, Ordering::Relaxed);
                self.stats
                    .fast_decap
                    .store(c.decapsulated, Ordering::Relaxed);
                self.stats
                    .fast_decap_gso
                    .store(c.decapsulated_gso, Ordering::Relaxed);
                self.stats
                    .fast_encap
                    .store(c.encapsulated, Ordering::Relaxed);
                self.stats.fast_passed.store(c.passed, Ordering::Relaxed);
            }
        }
        if direct_changes + fast_changes > 0 {
            tracing::info!(direct_changes, fast_changes, "overlay routes updated");
        }
        Ok(changes)
    }

    /// [`Agent::sync`], logging a failure; true when `snap` no longer shows this host's
    /// lease as its own (deleted, or held by another host): the caller renews at once,
    /// which finds out whether it is lost, instead of at its renewal time, hours away.
    pub(super) async fn sync_logged(&mut self, snap: &Snapshot) -> bool {
        let gone = self.lease.as_ref().is_some_and(|l| {
            !snap
                .leases
                .iter()
                .any(|s| s.subnet == l.subnet && s.public_ip == l.public_ip)
        });
        if gone {
            tracing::warn!("this host's lease is not in the lease set as its own; checking it now");
        }
        // Logged; the next pass tries again, whatever failed.
        let _ = self.sync_counted(snap).await;
        gone
    }

    /// [`Agent::sync`], counted in the stats; a failure (the status turns unhealthy until a
    /// pass succeeds) is logged, and the next pass tries again. The error of a pass that
    /// failed as a whole is returned ([`PassError::whole`]: [`Agent::start`] fails on it).
    pub(super) async fn sync_counted(&mut self, snap: &Snapshot) -> Result<(), AgentError> {
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        match self.sync_pass(snap).await {
            Ok(_) => {
                self.stats.synced.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.stats.sync_errors.fetch_add(1, Ordering::Relaxed);
                self.stats.synced.store(false, Ordering::Relaxed);
                if e.whole {
                    tracing::warn!(error = %error_chain(&e.error), "reconcile failed as a whole; will retry");
                    return Err(e.error);
                }
                tracing::warn!(error = %error_chain(&e.error), "reconcile failed for some entries; will retry");
                Ok(())
            }
        }
    }
}
