//! Per-job networking through flynn-network's `job` module: a local bridge holding the
//! first address of the host's block, one network namespace and veth per job, addresses
//! from an allocator persisted in the state directory (so a restarted daemon keeps the
//! addresses of the jobs it re-adopts). Until the overlay agent hands out the block it
//! comes from the `--block` flag.
//!
//! Creating a namespace, a veth pair and the job side's address and routes takes a few
//! milliseconds of netlink round trips and kernel work, all on the job's start path. So a
//! few are made ahead of time (`--netns-pool`, named and allocated under a pool key
//! instead of a job id) and a starting job takes one; the pool is refilled in the
//! background. Which job holds which pooled namespace is kept in `job-netns.json`, so a
//! restarted daemon tears down the right one; pool entries no job took are removed at
//! start-up and on a clean shutdown.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use flynn_api::host::{NetworkConfig, NetworkInfo};
use flynn_api::ApiError;
// `job::POOL_OWNER_PREFIX` is the allocator owner (and namespace/veth name seed) of a pooled
// namespace (job ids cannot start with it: they may not contain `/`); `job::JOB_IPS_FILE` and
// `job::JOB_NETNS_FILE` name the files in the state directory. flynn-network's constants: the
// overlay agent reads these files by them to decide whether a clean stop releases the lease.
use flynn_network::job::{self, IpAllocator, JobNet, JobNetConfig, POOL_OWNER_PREFIX};
use flynn_network::{KernelNetlink, Subnet};

use crate::fastpath::{self, Fast};
use crate::syncer::Syncer;

/// A start that comes after the network was retired (the host is switching blocks).
const RETIRED: &str = "the host's job network is being replaced (the overlay agent handed out another block); start the job again";

#[derive(Clone)]
pub struct Network {
    inner: Arc<Inner>,
}

struct Inner {
    nl: KernelNetlink,
    cfg: JobNetConfig,
    alloc: Mutex<IpAllocator>,
    /// Group commit of the allocation and `job-netns.json` files.
    sync: Syncer,
    pool: Mutex<Pool>,
    pool_size: usize,
    /// `job-netns.json`: job id → pool key of the namespace it took.
    taken_path: PathBuf,
    /// The overlay's eBPF fast path (see [`crate::fastpath`]).
    fast: Mutex<Fast>,
}

#[derive(Default)]
struct Pool {
    ready: VecDeque<Ready>,
    taken: BTreeMap<String, String>,
    refilling: bool,
    /// Set by [`Network::retire`]: no address is handed out any more.
    retired: bool,
}

struct Ready {
    key: String,
    net: JobNet,
    /// It has its fast path entry (the fast path was set up when it was made).
    fast: bool,
}

impl Network {
    /// Creates (or adopts) the bridge and opens the allocator; removes pooled namespaces a
    /// previous daemon left unused. Needs a tokio runtime. With `sync`, allocation changes
    /// are fsynced in its group commits instead of inline. `pool_size` namespaces are kept
    /// ready once [`Network::fill_pool`] has been called.
    pub async fn open(
        state_dir: &Path,
        bridge: &str,
        block: Subnet,
        mtu: u32,
        sync: Syncer,
        pool_size: usize,
        fast_path: Option<fastpath::Config>,
    ) -> anyhow::Result<Network> {
        use anyhow::Context;
        let nl = KernelNetlink::connect().context("opening rtnetlink")?;
        job::setup_local_bridge(&nl, bridge, block, job::LOCAL_MTU)
            .await
            .with_context(|| format!("setting up bridge {bridge} for {block}"))?;
        let gateway_mac = job::link_mac(&nl, bridge)
            .await
            .with_context(|| format!("reading the MAC of {bridge}"))?;
        let path = state_dir.join(job::JOB_IPS_FILE);
        let gateway = block.first_host();
        let mut alloc = IpAllocator::open(&path, block, &[])
            .with_context(|| format!("opening {}", path.display()))?;
        alloc = alloc.deferred_sync();
        let taken_path = state_dir.join(job::JOB_NETNS_FILE);
        let taken: BTreeMap<String, String> = match std::fs::read(&taken_path) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("parsing {}", taken_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", taken_path.display())),
        };
        let leftovers: Vec<String> = alloc
            .allocations()
            .map(|(o, _)| o.to_string())
            .filter(|o| o.starts_with(POOL_OWNER_PREFIX) && !taken.values().any(|k| k == o))
            .collect();
        let cfg = JobNetConfig {
            bridge: bridge.to_string(),
            block,
            gateway,
            mtu,
            local_mtu: job::LOCAL_MTU,
        };
        // Jobs that outlived a daemon from before the local MTU.
        job::raise_to_local_mtu(&nl, &cfg)
            .await
            .context("raising running jobs' veths to the local MTU")?;
        let net = Network {
            inner: Arc::new(Inner {
                nl,
                cfg,
                alloc: Mutex::new(alloc),
                sync,
                pool: Mutex::new(Pool {
                    taken,
                    ..Pool::default()
                }),
                pool_size,
                taken_path,
                fast: Mutex::new(Fast::new(fast_path, gateway_mac)),
            }),
        };
        for key in leftovers {
            net.destroy_pooled(&key).await;
        }
        Ok(net)
    }

    fn alloc(&self) -> MutexGuard<'_, IpAllocator> {
        self.inner.alloc.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pool(&self) -> MutexGuard<'_, Pool> {
        self.inner.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn synced<T>(&self, a: &IpAllocator, r: T) -> T {
        self.inner.sync.file(a.path());
        r
    }

    /// Allocates an address for `owner` and creates the namespace and veth named after it;
    /// true when it got its fast path entry.
    async fn create(&self, owner: &str) -> Result<(JobNet, bool), String> {
        let ip = {
            // The pool's lock first (as `retire` takes them): no address is allocated
            // once the network is retired.
            let pool = self.pool();
            if pool.retired {
                return Err(RETIRED.into());
            }
            let mut a = self.alloc();
            let r = a.allocate(owner).map_err(chain);
            drop(pool);
            self.synced(&a, r)?
        };
        match job::create_job_net(&self.inner.nl, owner, ip, &self.inner.cfg).await {
            Ok(n) => {
                let fast = self.attach_fast_path(&n);
                Ok((n, fast))
            }
            Err(e) => {
                let mut a = self.alloc();
                let r = release_unless_left(&mut a, owner, &e);
                let _ = self.synced(&a, r);
                Err(chain(e))
            }
        }
    }

    /// Removes the namespace and veth named after `owner` and then frees its address.
    /// When the removal fails the address stays allocated (it may still be configured on
    /// the veth): the next start-up's restore or pool clean-up tries again.
    async fn destroy(&self, owner: &str) -> Result<(), String> {
        self.detach_fast_path(owner).await;
        let removed = job::destroy_job_net(&self.inner.nl, owner)
            .await
            .map_err(chain);
        let mut a = self.alloc();
        let r = release_if_removed(&mut a, owner, removed);
        self.synced(&a, r)
    }

    fn fast(&self) -> MutexGuard<'_, Fast> {
        self.inner.fast.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives a job network its fast path entry, or, without one, makes sure no stale entry
    /// holds its address (see [`crate::fastpath`]). True when it has it.
    fn attach_fast_path(&self, n: &JobNet) -> bool {
        self.fast().attach(n)
    }

    /// Takes `owner`'s endpoint out of the fast path and detaches its veth, before the
    /// address can go to another job (a stale entry would send that job's traffic to a
    /// veth that is gone). Done whatever this daemon's fast path setting: an earlier
    /// daemon may have attached the job.
    async fn detach_fast_path(&self, owner: &str) {
        if !self.fast().has_pins() {
            return;
        }
        let ip = self.alloc().get(owner);
        let ifindex = match self
            .inner
            .nl
            .link_by_name(&job::host_veth_name(owner))
            .await
        {
            Ok(link) => link.map(|l| l.header.index),
            Err(_) => None,
        };
        if let Err(e) = self.fast().forget(ip, ifindex) {
            tracing::warn!(owner, error = %chain(e), "removing a job from the fast path failed");
        }
    }

    /// Writes `job-netns.json` (before the change is relied on).
    fn save_taken(&self, taken: &BTreeMap<String, String>) -> Result<(), String> {
        let path = &self.inner.taken_path;
        let bytes = serde_json::to_vec(taken).expect("maps serialize");
        self.inner
            .sync
            .write(path, &bytes)
            .map_err(|e| format!("writing {}: {e}", path.display()))
    }

    /// The job's address and network namespace: a pooled one if there is one ready, else
    /// made now (the caller refills the pool with [`Network::fill_pool`] once the job's
    /// start is over, so the refill does not compete with it). Nothing is left behind on
    /// failure.
    pub async fn setup(&self, id: &str) -> Result<(IpAddr, PathBuf), String> {
        let taken = {
            let mut pool = self.pool();
            if pool.retired {
                return Err(RETIRED.into());
            }
            match pool.ready.pop_front() {
                Some(r) => {
                    let mut map = pool.taken.clone();
                    map.insert(id.to_string(), r.key.clone());
                    match self.save_taken(&map) {
                        Ok(()) => {
                            pool.taken = map;
                            Some(r)
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot record a pooled namespace; making one for the job");
                            pool.ready.push_front(r);
                            None
                        }
                    }
                }
                None => None,
            }
        };
        if let Some(r) = taken {
            // Made before the agent set the fast path up: the job gets it now.
            if !r.fast {
                self.attach_fast_path(&r.net);
            }
            return Ok((IpAddr::V4(r.net.ip), r.net.netns_path));
        }
        let (n, _) = self.create(id).await?;
        Ok((IpAddr::V4(n.ip), n.netns_path))
    }

    /// The allocator owner (and name seed) of job `id`'s network.
    fn owner_of(&self, id: &str) -> String {
        self.pool()
            .taken
            .get(id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }

    /// Removes the job's veth and namespace and frees its address. On failure the address
    /// and the record of which pooled namespace the job took are kept, so a later
    /// teardown (a restarted daemon's restore) finds them.
    pub async fn teardown(&self, id: &str) -> Result<(), String> {
        let owner = self.owner_of(id);
        self.destroy(&owner).await?;
        if owner != id {
            self.forget_taken(id)?;
        }
        Ok(())
    }

    /// The address allocated to job `id`, if any.
    pub fn address_of(&self, id: &str) -> Option<IpAddr> {
        let owner = self.owner_of(id);
        self.alloc().get(&owner).map(IpAddr::V4)
    }

    /// Tops the pool up to its size in the background (one refill at a time). Needs a
    /// tokio runtime.
    pub fn fill_pool(&self) {
        if self.inner.pool_size == 0 {
            return;
        }
        {
            let mut pool = self.pool();
            if pool.retired || pool.refilling || pool.ready.len() >= self.inner.pool_size {
                return;
            }
            pool.refilling = true;
        }
        let net = self.clone();
        tokio::spawn(async move {
            loop {
                if net.pool().ready.len() >= net.inner.pool_size {
                    break;
                }
                let key = format!("{POOL_OWNER_PREFIX}{}", uuid::Uuid::new_v4().simple());
                match net.create(&key).await {
                    Ok((n, fast)) => {
                        let kept = {
                            let mut pool = net.pool();
                            if !pool.retired {
                                pool.ready.push_back(Ready {
                                    key: key.clone(),
                                    net: n,
                                    fast,
                                });
                            }
                            !pool.retired
                        };
                        if !kept {
                            // Retired while it was being made: it goes, not into the pool.
                            net.destroy_pooled(&key).await;
                            break;
                        }
                    }
                    Err(e) => {
                        if e != RETIRED {
                            tracing::warn!(error = %e, "making a pooled network namespace failed");
                        }
                        break;
                    }
                }
            }
            net.pool().refilling = false;
        });
    }

    /// Pooled namespaces ready now.
    pub fn pooled(&self) -> usize {
        self.pool().ready.len()
    }

    /// Gives up this network so that the host can take another block: only when no job
    /// holds an address in it (job ids and pooled namespaces jobs took own addresses; the
    /// pool's own do not). Then no address is handed out any more, the pooled namespaces
    /// are removed and the allocator is left empty, so [`Setup::open`] can start the new
    /// block on the same files. Errors (jobs hold addresses, a namespace not removed)
    /// leave the network in use and say why.
    pub async fn retire(&self) -> Result<(), String> {
        {
            let mut pool = self.pool();
            let a = self.alloc();
            let held = a
                .allocations()
                .filter(|(o, _)| {
                    !o.starts_with(POOL_OWNER_PREFIX) || pool.taken.values().any(|k| k == o)
                })
                .count();
            if held > 0 {
                return Err(format!("{held} job(s) hold addresses in it"));
            }
            // What `job-netns.json` still records has no address behind it (a teardown
            // that freed the address and then could not save the record): stale.
            if !pool.taken.is_empty() {
                self.save_taken(&BTreeMap::new())?;
                pool.taken.clear();
            }
            pool.retired = true;
        }
        // A refill in progress sees `retired` and removes what it made; wait for it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.pool().refilling && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        if self.pool().refilling {
            self.pool().retired = false;
            return Err("a pooled namespace is still being made".into());
        }
        self.drain_pool().await;
        // Pooled namespaces that left the pool without being removed (a failed removal).
        let leftovers: Vec<String> = self
            .alloc()
            .allocations()
            .map(|(o, _)| o.to_string())
            .collect();
        for key in leftovers {
            self.destroy_pooled(&key).await;
        }
        let left = self.alloc().allocations().count();
        if left > 0 {
            self.pool().retired = false;
            return Err(format!("{left} pooled namespace(s) could not be removed"));
        }
        Ok(())
    }

    /// Removes the networks of owners that belong to no job `known` says the host has (an
    /// address allocated for a job whose state was never saved, or whose record is gone
    /// while its teardown had failed): their addresses would otherwise stay taken for good.
    /// Pooled namespaces no job took are [`Network::open`]'s. Returns how many were removed.
    pub async fn release_strays(&self, known: impl Fn(&str) -> bool) -> usize {
        let strays: Vec<(String, Option<String>)> = {
            let pool = self.pool();
            let a = self.alloc();
            let job_of = |key: &str| {
                pool.taken
                    .iter()
                    .find(|(_, k)| k.as_str() == key)
                    .map(|(j, _)| j.clone())
            };
            a.allocations()
                .filter_map(|(o, _)| match o.strip_prefix(POOL_OWNER_PREFIX) {
                    // A pooled namespace a job took: a stray when that job is unknown.
                    Some(_) => job_of(o)
                        .filter(|j| !known(j))
                        .map(|j| (o.to_string(), Some(j))),
                    None => (!known(o)).then(|| (o.to_string(), None)),
                })
                .collect()
        };
        let mut removed = 0;
        for (owner, job) in strays {
            tracing::warn!(
                owner,
                job = job.as_deref().unwrap_or(&owner),
                "removing the network of a job the host has no record of"
            );
            if let Err(e) = self.destroy(&owner).await {
                tracing::warn!(owner, error = %e, "removing a stray job network failed");
                continue;
            }
            if let Some(job) = job {
                let _ = self.forget_taken(&job);
            }
            removed += 1;
        }
        removed
    }

    /// Removes every pooled namespace no job took (clean shutdown).
    pub async fn drain_pool(&self) {
        let ready: Vec<Ready> = self.pool().ready.drain(..).collect();
        for r in ready {
            self.destroy_pooled(&r.key).await;
        }
    }

    /// [`Network::destroy`] for a pooled namespace no job holds; a failure is logged (its
    /// address stays allocated until a later clean-up).
    async fn destroy_pooled(&self, key: &str) {
        if let Err(e) = self.destroy(key).await {
            tracing::warn!(key, error = %e, "removing a pooled namespace failed");
        }
    }

    /// Removes job `id`'s record of the pooled namespace it took, and saves the change.
    fn forget_taken(&self, id: &str) -> Result<(), String> {
        let mut pool = self.pool();
        let mut map = pool.taken.clone();
        map.remove(id);
        self.save_taken(&map)?;
        pool.taken = map;
        Ok(())
    }

    pub fn info(&self) -> NetworkInfo {
        NetworkInfo {
            job_id: String::new(),
            subnet: self.inner.cfg.block.to_string(),
            mtu: self.inner.cfg.mtu,
            bridge: self.inner.cfg.bridge.clone(),
            resolvers: Vec::new(),
        }
    }
}

/// Frees `owner`'s address once its namespace and veth are `removed`; after a failed
/// removal the address stays allocated (and the failure is returned), so no other job is
/// given an address still configured on a veth.
fn release_if_removed(
    a: &mut IpAllocator,
    owner: &str,
    removed: Result<(), String>,
) -> Result<(), String> {
    if let Err(e) = removed {
        tracing::warn!(owner, error = %e, "job network not removed; its address stays allocated");
        return Err(e);
    }
    a.release(owner).map_err(chain)
}

/// After a failed `create_job_net`: frees the address, unless what was made could not be
/// removed (it may still carry the address). Such an address is freed by the job's teardown
/// at the next start-up (an ended job whose address is still allocated).
fn release_unless_left(
    a: &mut IpAllocator,
    owner: &str,
    e: &job::JobNetError,
) -> Result<(), String> {
    if matches!(e, job::JobNetError::NotUndone { .. }) {
        tracing::warn!(owner, error = %chain(e), "failed job network not removed; its address stays allocated");
        return Ok(());
    }
    a.release(owner).map_err(chain)
}

/// An error with its causes, `a: b: c`.
pub(crate) fn chain(e: impl std::error::Error) -> String {
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

/// What the daemon needs to make the job network once the overlay agent hands out the
/// block (`--network-from-agent`, `POST /host/network`).
#[derive(Clone)]
pub struct Setup {
    pub state_dir: PathBuf,
    pub bridge: String,
    /// Used when the agent's notification has no MTU.
    pub mtu: u32,
    pub sync: Syncer,
    pub pool_size: usize,
    /// The overlay agent's fast path (`None`: no pin directory is ever looked at).
    pub fast_path: Option<fastpath::Config>,
    /// This boot's id (`/proc/sys/kernel/random/boot_id`), saved with the agent's block so
    /// a start-up can tell a reboot since; empty when unknown.
    pub boot_id: String,
}

/// [`Setup::load`]'s answer: the block, MTU, resolvers and job id the agent last sent.
pub struct Loaded {
    pub block: Subnet,
    pub mtu: u32,
    pub resolvers: Vec<String>,
    pub job_id: String,
    /// The machine rebooted since (the saved boot id is another one): the agent may hold
    /// another block now (see [`crate::host::Options::net_before_reboot`]).
    pub rebooted: bool,
}

/// The configuration the agent last sent (`network.json`), reapplied at start-up so jobs
/// do not wait for the agent's next notification after a daemon restart.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Saved {
    pub subnet: String,
    pub mtu: u32,
    #[serde(default)]
    pub resolvers: Vec<String>,
    /// The agent's job id (from its notification).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub job_id: String,
    /// The boot it was received in ([`Setup::boot_id`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub boot_id: String,
}

impl Setup {
    fn saved_path(&self) -> PathBuf {
        self.state_dir.join("network.json")
    }

    /// Creates (or adopts) the bridge for `block` and opens the allocator.
    pub async fn open(&self, block: Subnet, mtu: u32) -> anyhow::Result<Network> {
        Network::open(
            &self.state_dir,
            &self.bridge,
            block,
            mtu,
            self.sync.clone(),
            self.pool_size,
            self.fast_path.clone(),
        )
        .await
    }

    /// Start-up: the network of the configuration saved last, if the agent configured this
    /// host before. Its block is `network.json`'s, unless addresses are held in another
    /// block (`job-ips.json`): a move to the agent's new block writes the allocator file
    /// for it before `network.json`, and a crash in between (or a `network.json` that could
    /// not be written) leaves `network.json` naming the old block while jobs or pooled
    /// namespaces hold addresses in the new one. That block is then used (opening the old
    /// one would be refused, [`job::JobNetError::BlockChanged`]); the agent, which was not
    /// answered, offers its block again and `network.json` is written then.
    pub async fn open_saved(&self) -> anyhow::Result<Option<(Network, Loaded)>> {
        let Some(mut saved) = self.load()? else {
            return Ok(None);
        };
        let ips = self.state_dir.join(job::JOB_IPS_FILE);
        // A file that cannot be read is reported by the open below.
        if let Ok(Some(held)) = IpAllocator::held_block(&ips) {
            if held != saved.block {
                tracing::warn!(saved = %saved.block, %held, "network.json names another block than the addresses in use; opening theirs");
                saved.block = held;
            }
        }
        let n = self.open(saved.block, saved.mtu).await?;
        Ok(Some((n, saved)))
    }

    /// The configuration saved last, if the agent configured this host before.
    pub fn load(&self) -> anyhow::Result<Option<Loaded>> {
        use anyhow::Context;
        let path = self.saved_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let saved: Saved = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing {}", path.display()))?;
        let block = saved
            .subnet
            .parse()
            .with_context(|| format!("{}: subnet {:?}", path.display(), saved.subnet))?;
        Ok(Some(Loaded {
            block,
            mtu: saved.mtu,
            resolvers: saved.resolvers,
            job_id: saved.job_id,
            rebooted: !saved.boot_id.is_empty()
                && !self.boot_id.is_empty()
                && saved.boot_id != self.boot_id,
        }))
    }

    /// Writes `network.json` (in place now, fsynced by the syncer).
    pub fn save(
        &self,
        block: Subnet,
        mtu: u32,
        resolvers: &[String],
        job_id: &str,
    ) -> std::io::Result<()> {
        let saved = Saved {
            subnet: block.to_string(),
            mtu,
            resolvers: resolvers.to_vec(),
            job_id: job_id.to_string(),
            boot_id: self.boot_id.clone(),
        };
        let bytes = serde_json::to_vec(&saved).unwrap_or_default();
        self.sync.write(&self.saved_path(), &bytes)
    }
}

/// This boot's id, empty when it cannot be read.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Checks a `POST /host/network` body: the block (given by its first host address or its
/// network address, `/8`–`/30`), the MTU (0 = `default_mtu`) and the resolvers (`ip` or
/// `ip:port`).
pub fn parse_config(
    cfg: &NetworkConfig,
    default_mtu: u32,
) -> Result<(Subnet, u32, Vec<String>), ApiError> {
    let bad_subnet = || {
        ApiError::validation(
            Some("subnet"),
            "must be the block's first address and prefix length, e.g. 100.100.3.1/24",
        )
    };
    let block: Subnet = cfg.subnet.parse().map_err(|_| bad_subnet())?;
    let given: Ipv4Addr = cfg
        .subnet
        .split_once('/')
        .and_then(|(a, _)| a.parse().ok())
        .ok_or_else(bad_subnet)?;
    if !(8..=30).contains(&block.prefix_len())
        || (given != block.first_host() && given != block.addr())
    {
        return Err(bad_subnet());
    }
    let mtu = if cfg.mtu == 0 { default_mtu } else { cfg.mtu };
    if !(576..=65_535).contains(&mtu) {
        return Err(ApiError::validation(
            Some("mtu"),
            "must be between 576 and 65535",
        ));
    }
    for r in &cfg.resolvers {
        let ok = r.parse::<IpAddr>().is_ok() || r.parse::<std::net::SocketAddr>().is_ok();
        if !ok {
            return Err(ApiError::validation(
                Some("resolvers"),
                "each must be an IP address or ip:port",
            ));
        }
    }
    Ok((block, mtu, cfg.resolvers.clone()))
}

#[cfg(test)]
mod config_tests {
    use super::*;

    #[test]
    fn address_is_freed_only_after_the_network_is_removed() {
        let d = tempfile::tempdir().unwrap();
        let block: Subnet = "100.100.0.0/24".parse().unwrap();
        let mut a = IpAllocator::open(&d.path().join("ips.json"), block, &[]).unwrap();
        let ip = a.allocate("job1").unwrap();
        let e = release_if_removed(&mut a, "job1", Err("delete veth: busy".into())).unwrap_err();
        assert_eq!(e, "delete veth: busy");
        assert_eq!(a.get("job1"), Some(ip));
        // The next job is not given the address still on job1's veth.
        assert_ne!(a.allocate("job2").unwrap(), ip);
        release_if_removed(&mut a, "job1", Ok(())).unwrap();
        assert_eq!(a.get("job1"), None);
    }

    #[test]
    fn a_failed_setup_left_in_place_keeps_its_address() {
        use flynn_network::job::JobNetError;
        let d = tempfile::tempdir().unwrap();
        let block: Subnet = "100.100.0.0/24".parse().unwrap();
        let mut a = IpAllocator::open(&d.path().join("ips.json"), block, &[]).unwrap();
        let busy = || JobNetError::VethExists { name: "x".into() };
        // Undone: the address is free again.
        a.allocate("job1").unwrap();
        release_unless_left(&mut a, "job1", &busy()).unwrap();
        assert_eq!(a.get("job1"), None);
        // Not undone: the namespace may still carry it, so no other job gets it.
        let ip2 = a.allocate("job2").unwrap();
        let left = JobNetError::NotUndone {
            error: Box::new(busy()),
            undo: Box::new(busy()),
        };
        release_unless_left(&mut a, "job2", &left).unwrap();
        assert_eq!(a.get("job2"), Some(ip2));
        for i in 3..300 {
            match a.allocate(&format!("job{i}")) {
                Ok(ip) => assert_ne!(ip, ip2),
                Err(_) => break,
            }
        }
    }

    fn cfg(subnet: &str, mtu: u32, resolvers: &[&str]) -> NetworkConfig {
        NetworkConfig {
            job_id: "flannel".into(),
            subnet: subnet.into(),
            mtu,
            resolvers: resolvers.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn accepts_the_first_address_or_the_network_address() {
        let (b, mtu, r) = parse_config(&cfg("100.100.3.1/24", 1450, &["10.0.0.2"]), 1500).unwrap();
        assert_eq!(
            (b.to_string(), mtu, r),
            ("100.100.3.0/24".into(), 1450, vec!["10.0.0.2".into()])
        );
        let (b, mtu, _) = parse_config(&cfg("100.100.3.0/24", 0, &[]), 1500).unwrap();
        assert_eq!((b.to_string(), mtu), ("100.100.3.0/24".into(), 1500));
    }

    #[test]
    fn rejects_bad_subnets_mtus_and_resolvers() {
        for (s, field) in [
            ("nope", "subnet"),
            ("100.100.3.7/24", "subnet"),
            ("100.100.3.1/31", "subnet"),
            ("10.0.0.1/4", "subnet"),
            ("100.100.3.1", "subnet"),
        ] {
            let e = parse_config(&cfg(s, 0, &[]), 1500).unwrap_err();
            assert_eq!(e.code, flynn_api::ErrorCode::ValidationError, "{s}");
            assert!(e.message.starts_with(field), "{s}: {}", e.message);
        }
        let e = parse_config(&cfg("100.100.3.1/24", 100, &[]), 1500).unwrap_err();
        assert!(e.message.starts_with("mtu"), "{}", e.message);
        let e = parse_config(&cfg("100.100.3.1/24", 0, &["dns.example"]), 1500).unwrap_err();
        assert!(e.message.starts_with("resolvers"), "{}", e.message);
    }
}
