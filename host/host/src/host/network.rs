//! The job network: a start waiting for it, `POST /host/network` making or moving it.

use std::sync::atomic::Ordering;

use flynn_api::host::{NetworkConfig, NetworkInfo};
use flynn_api::ApiError;

use crate::net::Network;

use super::{Host, NETWORK_WAIT, STOPPED_BEFORE_START};

impl Host {
    /// The job network, if this host has one. Under `--network-from-agent` a start of job
    /// `id` waits up to [`NETWORK_WAIT`] for `POST /host/network`, or until the job is
    /// asked to stop.
    pub(super) async fn wait_network(&self, id: &str) -> Result<Option<Network>, String> {
        if let Some(n) = self.network() {
            return Ok(Some(n));
        }
        if self.net_setup.is_none() {
            return Ok(None);
        }
        let mut ready = self.net_ready.subscribe();
        // Subscribed before the job's flag is read: a stop after the read wakes the wait.
        let mut stops = self.stops.subscribe();
        let came = tokio::time::timeout(NETWORK_WAIT, async {
            loop {
                if self.stop_requested(id) {
                    return false;
                }
                tokio::select! {
                    r = ready.wait_for(|r| *r) => return r.is_ok(),
                    r = stops.changed() => if r.is_err() { return false },
                }
            }
        })
        .await
        .unwrap_or(false);
        match self.network() {
            Some(n) if came => Ok(Some(n)),
            _ if self.stop_requested(id) => Err(STOPPED_BEFORE_START.into()),
            _ => Err(format!(
                "host: no network after {} s (waiting for POST /host/network from the overlay agent)",
                NETWORK_WAIT.as_secs()
            )),
        }
    }

    /// `POST /host/network`: the overlay agent hands this host its block. The first one
    /// makes the bridge and the allocator; the same block again only updates the
    /// resolvers. Another block (or MTU) replaces the network when no job holds an address
    /// in it: the agent lost this host's lease (down past its TTL, the block taken) and
    /// leased another, and keeping the old block would give jobs addresses another host
    /// now routes. While jobs hold addresses it is refused (409, `retry: true`: the agent
    /// offers it again until the jobs are gone).
    pub async fn configure_network(&self, cfg: &NetworkConfig) -> Result<NetworkInfo, ApiError> {
        let default_mtu = match (&self.net_setup, self.network()) {
            (Some(s), _) => s.mtu,
            (None, Some(n)) => n.info().mtu,
            (None, None) => 1500,
        };
        let (block, mtu, resolvers) = crate::net::parse_config(cfg, default_mtu)?;
        let _one_at_a_time = self.net_config.lock().await;
        match (self.network(), &self.net_setup) {
            (Some(n), setup) => {
                let info = n.info();
                if info.subnet != block.to_string() || info.mtu != mtu {
                    let refuse = |why: String| {
                        ApiError::conflict(format!(
                            "host: network already configured for {} (mtu {}): {why}",
                            info.subnet, info.mtu
                        ))
                    };
                    let Some(setup) = setup else {
                        return Err(refuse("set by --block".into()));
                    };
                    if let Err(e) = self.set_aside(&n).await {
                        // Retryable: the agent keeps offering the block, and the host
                        // moves once its jobs are gone.
                        return Err(refuse(e).with_retry(true));
                    }
                    // The old one is out of service from here on, whatever happens next:
                    // when the new one cannot be made, the agent's retry (it gets a 500)
                    // finds no network and makes it.
                    self.open_network(setup, block, mtu).await?;
                    tracing::warn!(old = %info.subnet, %block, mtu, "job network moved to another block");
                }
            }
            (None, None) => {
                return Err(ApiError::conflict(
                    "host: jobs on this host have no network of their own (--no-network or the process runtime)",
                ));
            }
            (None, Some(setup)) => {
                self.open_network(setup, block, mtu).await?;
                tracing::info!(%block, mtu, job = %cfg.job_id, "job network configured by the overlay agent");
            }
        }
        // Jobs waiting for the network go on as soon as it exists, even if it cannot be
        // saved below (that failure is answered, so the agent sends it again).
        *self.net_resolvers.lock().unwrap_or_else(|e| e.into_inner()) = resolvers.clone();
        *self.net_job_id.lock().unwrap_or_else(|e| e.into_inner()) = cfg.job_id.clone();
        self.net_ready.send_replace(true);
        if let Some(setup) = &self.net_setup {
            setup
                .save(block, mtu, &resolvers, &cfg.job_id)
                .map_err(|e| {
                    tracing::warn!(error = %e, "saving network.json failed");
                    ApiError::unknown()
                })?;
        }
        Ok(self.status().network.unwrap_or_default())
    }

    /// Takes network `n` out of service and retires it ([`Network::retire`]), under
    /// `net_config`. Jobs starting meanwhile wait for the next network instead of taking
    /// this one. When it cannot be retired (jobs hold addresses in it) it is put back.
    async fn set_aside(&self, n: &Network) -> Result<(), String> {
        self.net_ready.send_replace(false);
        self.set_network(None);
        if let Err(e) = n.retire().await {
            self.set_network(Some(n.clone()));
            self.net_ready.send_replace(true);
            return Err(e);
        }
        Ok(())
    }

    /// [`Options::net_before_reboot`]: sets the saved network aside until the agent
    /// reports its block (`POST /host/network` then makes the network for it, the same
    /// block or another).
    pub(super) async fn await_agent_block(&self) {
        if !self.net_before_reboot.swap(false, Ordering::SeqCst) {
            return;
        }
        let _one_at_a_time = self.net_config.lock().await;
        let Some(n) = self.network() else { return };
        match self.set_aside(&n).await {
            Ok(()) => {
                tracing::info!(block = %n.info().subnet, "rebooted since the overlay agent reported this block; jobs wait for the block it reports now")
            }
            Err(e) => {
                tracing::warn!(block = %n.info().subnet, error = %e, "rebooted since the overlay agent reported this block, but it cannot be set aside; keeping it")
            }
        }
    }

    /// Makes the job network for `block` (bridge, allocator), puts it in service and starts
    /// filling its namespace pool.
    async fn open_network(
        &self,
        setup: &crate::net::Setup,
        block: flynn_network::Subnet,
        mtu: u32,
    ) -> Result<(), ApiError> {
        let n = setup.open(block, mtu).await.map_err(|e| {
            tracing::warn!(%block, error = %format!("{e:#}"), "configuring the job network failed");
            ApiError::unknown()
        })?;
        self.set_network(Some(n.clone()));
        n.fill_pool();
        Ok(())
    }
}
