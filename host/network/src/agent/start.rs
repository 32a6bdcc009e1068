//! Start-up ([`Agent::start`], retried), undoing a start that gave up or was cut short (the
//! lease it acquired released, `subnet.env` put back), and releasing the lease at a clean
//! shutdown unless jobs hold addresses in its block.

use std::time::{Duration, SystemTime};

use super::state::previous_subnet;
use super::{error_chain, Agent, AgentError, Started, ABANDON_TIMEOUT};
use crate::lease::Lease;
use crate::reconcile::setup;
use crate::store::LeaseStore;
use crate::subnet::Subnet;

impl<S: LeaseStore> Agent<S> {
    /// Leases a block (reusing this host's lease if the store has one, else the block named in
    /// `subnet.env` if it is free), sets up the VXLAN device and bridge, attaches the fast path
    /// and reconciles once. A reconcile that fails for some entries (say, the kernel refuses
    /// one peer's entry) does not fail the start: it is logged, the status says unhealthy,
    /// and the next pass tries again. One that fails as a whole (what is there could not be
    /// listed: the kernel's entries, the direct routes or the fast path's maps) does: no
    /// peer would be routed by it, and the agent would report ready all the same.
    pub async fn start(&mut self) -> Result<Started, AgentError> {
        let previous = self.cfg.state_dir.as_deref().and_then(previous_subnet);
        self.acquiring = true;
        let lease = self
            .leaser
            .acquire_noting(
                SystemTime::now(),
                previous,
                |n| fastrand::usize(..n),
                &mut self.created,
            )
            .await?;
        // Known from here on, for a shutdown before the start finishes (`abandon_start`).
        self.acquiring = false;
        self.lease = Some(lease.clone());
        if let Some(p) = previous.filter(|p| *p != lease.subnet) {
            tracing::warn!(previous = %p, subnet = %lease.subnet, "the previous block is taken; this host's block changed");
        }
        let mut nl = self.nl.clone();
        let devices = setup(&mut nl, &self.cfg.devices, &lease).await?;
        // The bridge may be new while jobs run (deleted while no agent ran).
        if let Err(e) = crate::job::adopt_job_veths(&self.nl, devices.bridge).await {
            tracing::warn!(error = %error_chain(&e), "cannot check the jobs' veths");
        }
        crate::masq::enable_forwarding()?;
        let network = self.cfg.lease.layout.network;
        let masq = if self.cfg.ip_masq {
            crate::masq::install(&network, self.cfg.devices.port)
        } else {
            crate::masq::remove()
        };
        // Jobs still reach each other without it: a warning, not a failed start.
        if let Err(e) = &masq {
            tracing::warn!(error = %e, ip_masq = self.cfg.ip_masq, "outbound NAT for jobs not set up");
        }
        self.masq_ok = masq.is_ok();
        let segment = self.nl.segment(self.cfg.public_ip).await?;
        self.segment = Some(segment);
        self.attach_or_fall_back(&lease, devices.vxlan, segment)?;
        self.devices = Some(devices);
        self.set_mtu(devices.mtu);
        self.write_state()?;
        let snap = self.leaser.store().leases().await?;
        self.fresh.read(true, SystemTime::now());
        // As in `run`: a change the kernel refuses (one peer's bad lease) is logged and tried
        // again every pass. It used to fail the start, and after the tries end the agent with
        // the host half set up. A pass that failed as a whole fails the start (tried again).
        self.sync_counted(&snap).await?;
        Ok(Started {
            lease,
            devices,
            fast_path: self.fast.is_some(),
        })
    }

    /// [`Agent::start`], tried up to `tries` times `pause` apart (the underlay device may not
    /// be up yet, discoverd may still be electing a leader). When the last try fails too, a
    /// lease the tries created is released (for at most [`ABANDON_TIMEOUT`]) before the error
    /// is returned: the agent exits then, and the lease used to stay live for its TTL (24 h
    /// by default), keeping the block from every other host. With it, `subnet.env` is put
    /// back as it was before the start (its previous block, or no file), so the next run
    /// does not ask for the released block as its own previous one (and, giving up too,
    /// keep it). What this host held before the start stays: its lease in the store (a
    /// previous run's, reused) or its previous block leased again after a clean shutdown
    /// released it. Its block may still hold this host's jobs, and releasing it took the
    /// peers' routes to them down and let another host lease it. A release that fails is
    /// logged; the start's error is the one returned.
    pub async fn start_retrying(
        &mut self,
        tries: u32,
        pause: Duration,
    ) -> Result<Started, AgentError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.start().await {
                Ok(s) => return Ok(s),
                Err(e) if attempt < tries => {
                    tracing::warn!(error = %error_chain(&e), attempt, "start failed; retrying");
                    tokio::time::sleep(pause).await;
                }
                Err(e) => {
                    tracing::error!(error = %error_chain(&e), attempt, "start failed; giving up");
                    match tokio::time::timeout(ABANDON_TIMEOUT, self.release_start(true)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(r)) => {
                            tracing::error!(error = %error_chain(&r), "releasing the lease after the failed start failed; it stays until it expires")
                        }
                        Err(_) => {
                            tracing::error!(timeout = ?ABANDON_TIMEOUT, "releasing the lease after the failed start got no answer; it may stay until it expires")
                        }
                    }
                    return Err(e);
                }
            }
        }
    }

    /// For a shutdown while [`Agent::start`] has not finished (cut short, or failing and
    /// retried): releases the lease it acquired, or, when it was cut short while acquiring
    /// (the write may have gone through, its answer lost), this host's lease in the store,
    /// as a clean shutdown of a running agent releases its lease. Without this a SIGTERM
    /// during start-up left the lease live for its whole TTL. A released block that the
    /// start created leaves `subnet.env` as it was before the start, as in
    /// [`Agent::start_retrying`]. The lease is forgotten only once released, so a release
    /// cut short (a SIGTERM during the give-up's release in [`Agent::start_retrying`]) is
    /// tried again by the next call.
    pub async fn abandon_start(&mut self) -> Result<(), AgentError> {
        self.release_start(false).await
    }

    /// [`Agent::abandon_start`]; with `only_created` (a start that gave up, not a shutdown)
    /// only a lease this process's starts created (its `created` block) is released, never
    /// what this host held before them. Once a created block is released, `subnet.env` is
    /// put back as it was before this process wrote it: the start never finished, so no job
    /// was given an address in that block, and naming it there made the next run lease it
    /// as this host's previous block, held before (kept when that run gave up too).
    async fn release_start(&mut self, only_created: bool) -> Result<(), AgentError> {
        // Cut short while acquiring, the store knows better than `self.lease`: that is an
        // earlier try's, and the lease it names may have vanished (deleted, taken over)
        // before this try wrote another, whose answer never came.
        let lease = match (&self.lease, self.acquiring) {
            (held, true) => match self.leaser.own().await {
                Ok(l) => l,
                Err(e) => match held {
                    Some(l) => Some(l.clone()),
                    None => return Err(e.into()),
                },
            },
            (held, false) => held.clone(),
        };
        if let Some(l) = &lease {
            if only_created && self.created != Some(l.subnet) {
                tracing::warn!(subnet = %l.subnet, "start-up given up; keeping this host's lease, held before this start (its jobs may still use the block)");
                return Ok(());
            }
            if self.jobs_hold(&l.subnet) {
                tracing::info!(subnet = %l.subnet, "start-up abandoned; keeping the lease: jobs hold addresses in the block");
                self.forget_start();
                return Ok(());
            }
            tracing::info!(subnet = %l.subnet, "start-up abandoned; releasing the lease");
            self.leaser.release(l, SystemTime::now()).await?;
            if self.created == Some(l.subnet) {
                self.restore_state();
            }
        }
        self.forget_start();
        Ok(())
    }

    fn forget_start(&mut self) {
        self.lease = None;
        self.acquiring = false;
        self.created = None;
        self.state_before = None;
    }

    /// Whether a job may hold an address in `subnet`, by the host daemon's allocator file
    /// ([`AgentConfig::job_ips`]; only jobs count, not flynn-host's pooled namespaces no job
    /// took). The host daemon keeps its jobs across restarts, so such a block must stay
    /// leased through an agent restart: released, peers dropped its routes until the next
    /// agent leased it again, and another host could lease it meanwhile. A file that is
    /// missing (a host daemon with another `--state-dir`, which `--job-ips` must follow) or
    /// cannot be read counts as "yes": the lease then stays, as after a crash, renewed by the
    /// next agent or expired after its TTL. A missing file used to read as "no job", which
    /// silently released the lease under any flynn-host whose state directory was not the
    /// default.
    fn jobs_hold(&self, subnet: &Subnet) -> bool {
        let Some(path) = &self.cfg.job_ips else {
            return false;
        };
        let taken = path.with_file_name(crate::job::JOB_NETNS_FILE);
        match crate::job::IpAllocator::job_block(path, &taken) {
            Ok(None) => false,
            Ok(Some(b)) => b.contains_subnet(subnet) || subnet.contains_subnet(&b),
            Err(crate::job::JobNetError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                tracing::warn!(path = %path.display(), "no host daemon allocator file (is --job-ips flynn-host's <state-dir>/job-ips.json?); jobs may hold addresses: keeping the lease");
                true
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %error_chain(&e), "cannot tell whether jobs hold addresses; keeping the lease");
                true
            }
        }
    }

    /// At a clean shutdown: releases `lease` unless jobs hold addresses in its block
    /// ([`Agent::jobs_hold`]); kept, it is renewed by the next agent (or expires after its
    /// TTL, as after a crash).
    pub(super) async fn release_at_shutdown(&self, lease: &Lease) -> Result<(), AgentError> {
        if self.jobs_hold(&lease.subnet) {
            tracing::info!(subnet = %lease.subnet, "shutting down; keeping the lease: jobs hold addresses in the block");
            return Ok(());
        }
        tracing::info!(subnet = %lease.subnet, "shutting down; releasing the lease");
        self.leaser.release(lease, SystemTime::now()).await?;
        Ok(())
    }
}
