//! The agent's loop ([`Agent::run`]): store events, periodic resyncs (which also put the
//! overlay devices, IP forwarding and the outbound NAT rules back), lease renewals, and the
//! release at shutdown.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use super::{error_chain, Agent, AgentError};
use crate::lease::LeaseError;
use crate::reconcile::setup;
use crate::store::{LeaseStore, LeaseWatch};

impl<S: LeaseStore> Agent<S> {
    /// Runs until `shutdown` completes (then releases the lease, unless jobs hold addresses in
    /// its block: `Agent::jobs_hold`) or the lease is lost (an error: the block may belong to
    /// another host now). Call after [`Agent::start`].
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        let mut watch: Option<LeaseWatch> = None;
        let mut tick = tokio::time::interval(self.cfg.resync);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renew_retry: Option<tokio::time::Instant> = None;
        loop {
            if watch.is_none() {
                match self.leaser.store().watch().await {
                    Ok(mut w) => {
                        let snap = w.current();
                        self.fresh.read(true, SystemTime::now());
                        if self.sync_logged(&snap).await {
                            renew_retry = Some(tokio::time::Instant::now());
                        }
                        watch = Some(w);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch leases; retrying");
                        self.fresh.read(false, SystemTime::now());
                    }
                }
            }
            let lease = self.lease.clone().expect("started");
            let renew_at = renew_retry.unwrap_or_else(|| {
                let wait = self
                    .leaser
                    .renew_at(&lease)
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tokio::time::Instant::now() + wait
            });
            let retry_watch = tokio::time::sleep(Duration::from_secs(1));
            tokio::select! {
                _ = &mut shutdown => {
                    self.release_at_shutdown(&lease).await?;
                    return Ok(());
                }
                snap = async { watch.as_mut().expect("checked").changed().await }, if watch.is_some() => {
                    match snap {
                        Some(s) => {
                            self.fresh.read(true, SystemTime::now());
                            if self.sync_logged(&s).await {
                                renew_retry = Some(tokio::time::Instant::now());
                            }
                        }
                        None => watch = None,
                    }
                }
                _ = retry_watch, if watch.is_none() => {}
                _ = tick.tick() => {
                    self.keep_host_routing();
                    self.keep_devices().await?;
                    match self.leaser.store().leases().await {
                        Ok(s) => {
                            self.fresh.read(true, SystemTime::now());
                            if self.sync_logged(&s).await {
                                renew_retry = Some(tokio::time::Instant::now());
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read leases; reconciling the last known set as it was then");
                            self.fresh.read(false, SystemTime::now());
                            if let Some(w) = &mut watch {
                                let s = w.current();
                                self.sync_logged(&s).await;
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(renew_at) => {
                    match self.leaser.renew(&lease, SystemTime::now()).await {
                        Ok(l) => {
                            tracing::debug!(subnet = %l.subnet, "lease renewed");
                            self.lease = Some(l);
                            renew_retry = None;
                            self.stats.renewals.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e @ LeaseError::Lost { .. }) => return Err(e.into()),
                        Err(e) => {
                            self.stats.renew_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(error = %e, "lease renewal failed; retrying");
                            renew_retry = Some(tokio::time::Instant::now() + Duration::from_secs(2));
                        }
                    }
                }
            }
        }
    }

    /// Puts the VXLAN device and the bridge back if they went, or follows them if they moved:
    /// the kernel deletes a VXLAN device together with its lower device (a bond or VLAN that
    /// network tooling re-creates), and every entry on it with it. On a change the fast path
    /// is attached to the new devices; the reconcile that follows on the same tick puts the
    /// neighbour, FDB and route entries back and rewrites the prefixes (their hops name the
    /// old devices).
    async fn keep_devices(&mut self) -> Result<(), AgentError> {
        let (Some(lease), Some(old), Some(old_segment)) =
            (self.lease.clone(), self.devices, self.segment)
        else {
            return Ok(());
        };
        // Set up again every time (it sets only what differs): a device set down, a lost
        // bridge address or a changed underlay MTU is repaired too.
        let mut nl = self.nl.clone();
        let (devices, segment) = match (
            setup(&mut nl, &self.cfg.devices, &lease).await,
            self.nl.segment(self.cfg.public_ip).await,
        ) {
            (Ok(d), Ok(s)) => (d, s),
            (Err(e), _) => {
                tracing::warn!(error = %error_chain(&e), "cannot check the overlay devices");
                return Ok(());
            }
            (_, Err(e)) => {
                tracing::warn!(error = %error_chain(&e), "cannot find the underlay device");
                return Ok(());
            }
        };
        // A bridge deleted and made again (a new index) has lost its ports: the jobs' veths
        // go back on it. Only then: flynn-host makes veths and attaches them itself.
        if devices.bridge != old.bridge {
            if let Err(e) = crate::job::adopt_job_veths(&self.nl, devices.bridge).await {
                tracing::warn!(error = %error_chain(&e), "cannot check the jobs' veths");
            }
        }
        if devices == old && segment == old_segment {
            return Ok(());
        }
        tracing::warn!(
            before = ?old,
            after = ?devices,
            underlay_before = ?old_segment,
            underlay_after = ?segment,
            "overlay devices changed; following them"
        );
        self.devices = Some(devices);
        self.segment = Some(segment);
        if let Some(fp) = &mut self.fast {
            for (was, now) in [
                (old.vxlan, devices.vxlan),
                (old_segment.ifindex, segment.ifindex),
            ] {
                if was != now {
                    // Gone with its device, or left on a device we no longer use.
                    let _ = fp.detach(was);
                }
            }
        }
        // As at start: the agent exits if the fast path is required (its supervisor starts it
        // again), else the kernel path alone rather than maps naming devices that are gone.
        self.attach_or_fall_back(&lease, devices.vxlan, segment)?;
        if devices.mtu != old.mtu {
            tracing::info!(before = old.mtu, after = devices.mtu, "overlay MTU changed");
            self.set_mtu(devices.mtu);
        }
        if let Err(e) = self.write_state() {
            tracing::warn!(error = %error_chain(&e), "cannot write the state file");
        }
        Ok(())
    }

    /// Puts IP forwarding and the outbound NAT table back if something took them away since
    /// the last check, and tries again to install the table if that failed so far (at start,
    /// for example while the nftables module was not loaded yet).
    fn keep_host_routing(&mut self) {
        if let Err(e) = crate::masq::enable_forwarding() {
            tracing::warn!(error = %e, "IP forwarding is off and cannot be turned on");
        }
        if !self.cfg.ip_masq {
            return;
        }
        if self.masq_ok {
            match crate::masq::present() {
                Ok(true) => return,
                Ok(false) => tracing::warn!(
                    table = crate::masq::TABLE,
                    "outbound NAT rules were removed; putting them back"
                ),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot list nftables tables");
                    return;
                }
            }
        }
        let network = self.cfg.lease.layout.network;
        match crate::masq::install(&network, self.cfg.devices.port) {
            Ok(()) if !self.masq_ok => {
                tracing::info!(table = crate::masq::TABLE, "outbound NAT for jobs set up");
                self.masq_ok = true;
            }
            Ok(()) => {}
            // Warned about once (at start, or when it went); tried again every resync.
            Err(e) if self.masq_ok => {
                tracing::warn!(error = %e, "cannot restore the outbound NAT rules");
                self.masq_ok = false;
            }
            Err(e) => tracing::debug!(error = %e, "outbound NAT for jobs still not set up"),
        }
    }
}
