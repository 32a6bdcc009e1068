//! Per-job networking through flynn-network's `job` module: a local bridge holding the
//! first address of the host's block, one network namespace and veth per job, addresses
//! from an allocator persisted in the state directory (so a restarted daemon keeps the
//! addresses of the jobs it re-adopts). Until the overlay agent hands out the block it
//! comes from the `--block` flag.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use flynn_api::host::NetworkInfo;
use flynn_network::job::{self, IpAllocator, JobNetConfig};
use flynn_network::{KernelNetlink, Subnet};

use crate::syncer::Syncer;

pub struct Network {
    nl: KernelNetlink,
    cfg: JobNetConfig,
    alloc: Mutex<IpAllocator>,
    /// Group commit of the allocation file; `None` = fsynced on every change.
    sync: Option<Syncer>,
}

impl Network {
    /// Creates (or adopts) the bridge and opens the allocator. Needs a tokio runtime. With
    /// `sync`, allocation changes are fsynced in its group commits instead of inline.
    pub async fn open(
        state_dir: &Path,
        bridge: &str,
        block: Subnet,
        mtu: u32,
        sync: Option<Syncer>,
    ) -> anyhow::Result<Network> {
        use anyhow::Context;
        let nl = KernelNetlink::connect().context("opening rtnetlink")?;
        job::setup_local_bridge(&nl, bridge, block, mtu)
            .await
            .with_context(|| format!("setting up bridge {bridge} for {block}"))?;
        let path = state_dir.join("job-ips.json");
        let gateway = block.first_host();
        let mut alloc = IpAllocator::open(&path, block, &[])
            .with_context(|| format!("opening {}", path.display()))?;
        if sync.is_some() {
            alloc = alloc.deferred_sync();
        }
        Ok(Network {
            nl,
            cfg: JobNetConfig {
                bridge: bridge.to_string(),
                block,
                gateway,
                mtu,
            },
            alloc: Mutex::new(alloc),
            sync,
        })
    }

    fn synced<T>(&self, a: &IpAllocator, r: T) -> T {
        if let Some(s) = &self.sync {
            s.file(a.path());
        }
        r
    }

    fn alloc(&self) -> std::sync::MutexGuard<'_, IpAllocator> {
        self.alloc.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocates the job's address and creates its namespace and veth; returns the
    /// address and the namespace path. Nothing is left behind on failure.
    pub async fn setup(&self, id: &str) -> Result<(IpAddr, PathBuf), String> {
        let ip = {
            let mut a = self.alloc();
            let r = a.allocate(id).map_err(chain);
            self.synced(&a, r)?
        };
        match job::create_job_net(&self.nl, id, ip, &self.cfg).await {
            Ok(n) => Ok((IpAddr::V4(n.ip), n.netns_path)),
            Err(e) => {
                let mut a = self.alloc();
                let r = a.release(id);
                let _ = self.synced(&a, r);
                Err(chain(e))
            }
        }
    }

    /// Removes the job's veth and namespace and frees its address.
    pub async fn teardown(&self, id: &str) -> Result<(), String> {
        let res = job::destroy_job_net(&self.nl, id).await.map_err(chain);
        {
            let mut a = self.alloc();
            let r = a.release(id).map_err(chain);
            self.synced(&a, r)?;
        }
        res
    }

    /// The address allocated to job `id`, if any.
    pub fn address_of(&self, id: &str) -> Option<IpAddr> {
        self.alloc().get(id).map(IpAddr::V4)
    }

    pub fn info(&self) -> NetworkInfo {
        NetworkInfo {
            subnet: self.cfg.block.to_string(),
            mtu: self.cfg.mtu,
            bridge: self.cfg.bridge.clone(),
        }
    }
}

/// An error with its causes, `a: b: c`.
fn chain(e: impl std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        // Some errors already print their source; do not repeat it.
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}
