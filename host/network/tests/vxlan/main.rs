//! Kernel VXLAN overlay in network namespaces: three "hosts" on an underlay bridge, each leasing a
//! block from a shared [`MemoryStore`] and reconciling with [`KernelNetlink`], a job namespace per
//! host on its bridge. Needs root and the vxlan module; fails loudly without them unless
//! `FLYNN_SKIP_NETNS_TESTS=1`.

mod lab;

use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use flynn_network::{
    reconcile, setup, Agent, AgentConfig, AgentError, DeviceConfig, KernelNetlink, Lease,
    LeaseConfig, LeaseError, LeaseStore, Leaser, Mac, MemoryStore, Netlink, NetlinkError, Op,
    StoreError, Subnet,
};
use lab::{in_netns, ping, run, Lab};

const HOSTS: u8 = 3;

/// Leases a block for the host in `ns` and sets up its VXLAN device and bridge.
fn start_host(ns: &str, store: &MemoryStore, underlay: &str) -> Result<(Lease, u32)> {
    let store = store.clone();
    let ip = underlay.parse()?;
    in_netns(ns, async move || {
        let leaser = Leaser::new(store, LeaseConfig::default(), ip);
        let lease = leaser.acquire(SystemTime::now(), None).await?;
        let mut nl = KernelNetlink::connect()?;
        let dev = setup(&mut nl, &DeviceConfig::default(), &lease).await?;
        Ok((lease, dev.mtu))
    })
}

/// Reconciles the host in `ns` (holding `own`) against the store; returns how many changes it made.
fn reconcile_host(ns: &str, store: &MemoryStore, own: Subnet) -> Result<usize> {
    Ok(reconcile_ops(ns, store, own)?.len())
}

/// [`reconcile_host`] returning the changes made.
fn reconcile_ops(ns: &str, store: &MemoryStore, own: Subnet) -> Result<Vec<Op>> {
    let store = store.clone();
    in_netns(ns, async move || {
        let mut nl = KernelNetlink::connect()?;
        let vxlan = nl
            .link_by_name(&DeviceConfig::default().vxlan_name)
            .await?
            .context("vxlan device missing")?
            .header
            .index;
        let snap = store.leases().await?;
        let ops = reconcile(&mut nl, vxlan, &own, &snap.leases, SystemTime::now()).await?;
        Ok(ops)
    })
}

/// What the kernel in `ns` holds for `subnet` on the VXLAN device: (neigh, fdb, route) present.
fn entries_for(ns: &str, lease: &Lease) -> Result<(bool, bool, bool)> {
    let lease = lease.clone();
    in_netns(ns, async move || {
        let mut nl = KernelNetlink::connect()?;
        let vxlan = nl
            .link_by_name(&DeviceConfig::default().vxlan_name)
            .await?
            .context("vxlan device missing")?
            .header
            .index;
        let s = nl.dump(vxlan).await?;
        Ok((
            s.neighs.iter().any(|n| n.ip == lease.subnet.addr()),
            s.fdbs.iter().any(|f| f.mac == lease.vtep_mac),
            s.routes.iter().any(|r| r.subnet == lease.subnet),
        ))
    })
}

fn job_ip(lease: &Lease) -> String {
    lease
        .subnet
        .nth(10)
        .expect("block has 10 addresses")
        .to_string()
}

#[test]
fn cross_host_ping_then_lease_removal_tears_down() -> Result<()> {
    if !lab::should_run("cross_host_ping_then_lease_removal_tears_down") {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    let store = MemoryStore::new();
    let cfg = DeviceConfig::default();

    let mut hosts = Vec::new();
    for i in 1..=HOSTS {
        let underlay = format!("10.231.0.{i}");
        let ns = lab.add_host(&format!("h{i}"), &format!("u{i}"), &underlay)?;
        let (lease, mtu) = start_host(&ns, &store, &underlay)?;
        ensure!(mtu == 1450, "overlay MTU {mtu}, want 1500 - 50");
        hosts.push((ns, lease));
    }

    // Every host programs every other host's lease; a second pass changes nothing.
    for (ns, lease) in &hosts {
        let n = reconcile_host(ns, &store, lease.subnet)?;
        ensure!(
            n == 3 * (HOSTS as usize - 1),
            "{ns}: {n} changes on first reconcile"
        );
        let again = reconcile_ops(ns, &store, lease.subnet)?;
        ensure!(
            again.is_empty(),
            "{ns}: second reconcile made changes (dump/apply mismatch): {again:?}"
        );
    }

    // The VXLAN device carries the lease-derived MAC and the configured VNI/port, learning off.
    let details = run(&[
        "ip",
        "-n",
        &hosts[0].0,
        "-d",
        "link",
        "show",
        &cfg.vxlan_name,
    ])?;
    let details = String::from_utf8_lossy(&details.stdout);
    let mac = Mac::for_subnet(&hosts[0].1.subnet).to_string();
    for want in [
        mac.as_str(),
        "vxlan id 1",
        "dstport 8472",
        "nolearning",
        "mtu 1450",
        "local 10.231.0.1",
    ] {
        ensure!(
            details.contains(want),
            "vxlan device lacks {want:?}:\n{details}"
        );
    }

    let mut jobs = Vec::new();
    for (i, (ns, lease)) in hosts.iter().enumerate() {
        let gw = lease.subnet.first_host().to_string();
        let job = lab.add_job(
            &format!("j{}", i + 1),
            ns,
            &cfg.bridge_name,
            &job_ip(lease),
            lease.subnet.prefix_len(),
            &gw,
            1450,
        )?;
        jobs.push(job);
    }

    // Cross-host job-to-job traffic over the overlay, both directions.
    for (a, job_a) in jobs.iter().enumerate() {
        for (b, (_, lease_b)) in hosts.iter().enumerate() {
            if a != b {
                let ip = job_ip(lease_b);
                ensure!(
                    ping(job_a, &ip, 3),
                    "job on host {} cannot ping {ip} on host {}",
                    a + 1,
                    b + 1
                );
            }
        }
    }

    // Host 3 leaves: its lease is released and the others reconcile.
    let lease3 = hosts[2].1.clone();
    let ip3: std::net::Ipv4Addr = "10.231.0.3".parse()?;
    let leaser3 = Leaser::new(store.clone(), LeaseConfig::default(), ip3);
    tokio::runtime::Builder::new_current_thread()
        .build()?
        .block_on(leaser3.release(&lease3, SystemTime::now()))?;
    for (ns, lease) in &hosts[..2] {
        let n = reconcile_host(ns, &store, lease.subnet)?;
        ensure!(n == 3, "{ns}: {n} changes removing one peer, want 3");
        let (neigh, fdb, route) = entries_for(ns, &lease3)?;
        ensure!(
            !neigh && !fdb && !route,
            "{ns} still has entries for {}: neigh={neigh} fdb={fdb} route={route}",
            lease3.subnet
        );
        let routes = run(&["ip", "-n", ns, "route", "show"])?;
        let routes = String::from_utf8_lossy(&routes.stdout);
        ensure!(
            !routes.contains(&lease3.subnet.to_string()),
            "{ns} route table still has {}:\n{routes}",
            lease3.subnet
        );
    }
    ensure!(
        !ping(&jobs[0], job_ip(&lease3), 1),
        "host 1 still reaches the departed host's job"
    );
    // The remaining pair still talks.
    ensure!(
        ping(&jobs[0], job_ip(&hosts[1].1), 3),
        "host 1 lost host 2 after host 3 left"
    );
    Ok(())
}

#[test]
fn restarted_host_keeps_lease_and_mac() -> Result<()> {
    if !lab::should_run("restarted_host_keeps_lease_and_mac") {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    let store = MemoryStore::new();
    let ns1 = lab.add_host("h1", "u1", "10.231.1.1")?;
    let ns2 = lab.add_host("h2", "u2", "10.231.1.2")?;
    let (l1, _) = start_host(&ns1, &store, "10.231.1.1")?;
    let (l2, _) = start_host(&ns2, &store, "10.231.1.2")?;
    reconcile_host(&ns1, &store, l1.subnet)?;
    reconcile_host(&ns2, &store, l2.subnet)?;

    // Host 2 "restarts": its VXLAN device is gone, it re-acquires and sets up again.
    run(&[
        "ip",
        "-n",
        &ns2,
        "link",
        "del",
        &DeviceConfig::default().vxlan_name,
    ])?;
    let (again, _) = start_host(&ns2, &store, "10.231.1.2")?;
    ensure!(
        again.subnet == l2.subnet && again.vtep_mac == l2.vtep_mac,
        "lease or MAC changed on restart: {again:?} vs {l2:?}"
    );
    ensure!(
        reconcile_host(&ns2, &store, l2.subnet)? == 3,
        "restarted host must re-add its peer"
    );
    // The peer needs no repair: its entries for host 2 are still right.
    ensure!(
        reconcile_host(&ns1, &store, l1.subnet)? == 0,
        "peer had to change entries after a restart"
    );

    let j1 = lab.add_job(
        "j1",
        &ns1,
        "flynnbr0",
        &job_ip(&l1),
        24,
        &l1.subnet.first_host().to_string(),
        1450,
    )?;
    lab.add_job(
        "j2",
        &ns2,
        "flynnbr0",
        &job_ip(&l2),
        24,
        &l2.subnet.first_host().to_string(),
        1450,
    )?;
    ensure!(ping(&j1, job_ip(&l2), 3), "no connectivity after restart");
    Ok(())
}

/// A route on the VXLAN device that no lease calls for is removed whatever protocol it was
/// added with: `ip route` adds protocol boot (an operator, an older agent), and a delete
/// naming the agent's own protocol (static) missed it (ESRCH, taken as already gone), so it
/// stayed and was "removed" again on every pass.
#[test]
fn stale_route_of_another_protocol_is_removed() -> Result<()> {
    if !lab::should_run("stale_route_of_another_protocol_is_removed") {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    let store = MemoryStore::new();
    let ns = lab.add_host("h1", "u1", "10.231.2.1")?;
    let (lease, _) = start_host(&ns, &store, "10.231.2.1")?;
    let vxlan = DeviceConfig::default().vxlan_name;
    let src = lease.subnet.first_host().to_string();
    // Blocks no lease holds (leases are among the first 100 of 100.100.0.0/16): one with
    // protocol boot, one with another protocol, a metric and a preferred source.
    let stale = [
        (
            "100.100.250.0/24",
            vec!["via", "100.100.250.0", "onlink", "proto", "boot"],
        ),
        (
            "100.100.251.0/24",
            vec![
                "via",
                "100.100.251.0",
                "onlink",
                "proto",
                "42",
                "metric",
                "7",
                "src",
                &src,
            ],
        ),
    ];
    for (dst, extra) in &stale {
        let mut cmd = vec!["ip", "-n", &ns, "route", "add", dst, "dev", &vxlan];
        cmd.extend(extra.iter().copied());
        run(&cmd)?;
    }
    let ops = reconcile_ops(&ns, &store, lease.subnet)?;
    ensure!(
        ops.iter().filter(|o| matches!(o, Op::DelRoute(_))).count() == 2,
        "{ops:?}"
    );
    let routes = run(&["ip", "-n", &ns, "route", "show", "dev", &vxlan])?;
    let routes = String::from_utf8_lossy(&routes.stdout);
    for (dst, _) in &stale {
        let net = dst.trim_end_matches("/24");
        ensure!(!routes.contains(net), "{dst} is still there:\n{routes}");
    }
    let again = reconcile_ops(&ns, &store, lease.subnet)?;
    ensure!(again.is_empty(), "second pass still changes: {again:?}");
    Ok(())
}

/// The leases in `store` that are live now: a released lease keeps its record, expired.
async fn live<S: LeaseStore>(store: &S) -> Result<Vec<Lease>> {
    Ok(store
        .leases()
        .await?
        .live(SystemTime::now())
        .cloned()
        .collect())
}

/// The public IP of [`unreachable_agent`]: on no interface of its host (10.231.3.1).
const UNREACHABLE_IP: &str = "10.231.3.9";

/// An agent whose starts fail once their block is leased: its public IP is on no interface,
/// so there is no underlay device.
fn unreachable_agent<S: LeaseStore>(store: S) -> Result<Agent<S>> {
    unreachable_agent_with(store, None)
}

/// [`unreachable_agent`] reading the host daemon's allocator file at `job_ips`.
fn unreachable_agent_with<S: LeaseStore>(
    store: S,
    job_ips: Option<std::path::PathBuf>,
) -> Result<Agent<S>> {
    let cfg = AgentConfig {
        public_ip: UNREACHABLE_IP.parse()?,
        devices: DeviceConfig::default(),
        lease: LeaseConfig::default(),
        direct_routing: false,
        resync: Duration::from_secs(30),
        state_dir: None,
        fast_path_required: false,
        ip_masq: false,
        job_ips,
    };
    Ok(Agent::new(store, KernelNetlink::connect()?, cfg, None))
}

/// Runs `f` in the one host namespace of a lab of its own, unless `test` is filtered out
/// ([`lab::should_run`]): what the start-up tests need for the agent's netlink calls.
fn in_lone_host(test: &str, f: impl AsyncFnOnce() -> Result<()> + Send) -> Result<()> {
    if !lab::should_run(test) {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    let ns = lab.add_host("h1", "u1", "10.231.3.1")?;
    in_netns(&ns, f)
}

/// An agent whose start fails on every try (here: its public IP is on no interface, so there
/// is no underlay device, after the block was leased) gives up after its tries and releases
/// the lease a try took: it used to exit with the lease live for its TTL (24 h by default),
/// keeping the block from every other host.
#[test]
fn a_start_that_gives_up_releases_its_lease() -> Result<()> {
    let store = MemoryStore::new();
    let s = store.clone();
    in_lone_host(
        "a_start_that_gives_up_releases_its_lease",
        async move || {
            let mut agent = unreachable_agent(s.clone())?;
            // A first try leases the block, then finds no underlay.
            let first = agent.start().await;
            ensure!(no_underlay(&first), "{first:?}");
            let held = s.leases().await?.leases;
            ensure!(held.len() == 1, "the first try leased nothing: {held:?}");
            // The retries fail the same way; the last gives up.
            let last = give_up(&mut agent).await;
            ensure!(no_underlay(&last), "{last:?}");
            let left = live(&s).await?;
            ensure!(
                left.is_empty(),
                "the lease outlived the start that gave up: {left:?}"
            );
            Ok(())
        },
    )
}

/// Whether a start failed for want of an underlay device (see [`unreachable_agent`]).
fn no_underlay(r: &Result<flynn_network::Started, AgentError>) -> bool {
    matches!(r, Err(AgentError::Netlink(NetlinkError::NoUnderlay { .. })))
}

/// Starts `agent` with two tries 20 ms apart: the start gives up.
async fn give_up<S: LeaseStore>(
    agent: &mut Agent<S>,
) -> std::result::Result<flynn_network::Started, AgentError> {
    agent.start_retrying(2, Duration::from_millis(20)).await
}

/// This host's lease in `store`, made as a previous run of its agent would have.
async fn previous_run_lease<S: LeaseStore>(store: S) -> Result<Lease> {
    Ok(
        Leaser::new(store, LeaseConfig::default(), UNREACHABLE_IP.parse()?)
            .acquire(SystemTime::now(), None)
            .await?,
    )
}

/// A start that gives up keeps this host's lease that it found in the store (a previous
/// run's, whose block may still hold the host's jobs): it used to release it, so peers
/// dropped their routes to the block and another host could lease it. A shutdown during
/// start-up (`abandon_start`) still releases it, as a clean shutdown does.
#[test]
fn a_start_that_gives_up_keeps_the_lease_it_found() -> Result<()> {
    let store = MemoryStore::new();
    let s = store.clone();
    in_lone_host(
        "a_start_that_gives_up_keeps_the_lease_it_found",
        async move || {
            let before = previous_run_lease(s.clone()).await?;
            let mut agent = unreachable_agent(s.clone())?;
            let last = give_up(&mut agent).await;
            ensure!(no_underlay(&last), "{last:?}");
            let left = live(&s).await?;
            ensure!(
                left.len() == 1 && left[0].subnet == before.subnet,
                "the start that gave up released the lease it found: {left:?}"
            );
            agent.abandon_start().await?;
            let left = live(&s).await?;
            ensure!(left.is_empty(), "not released at a shutdown: {left:?}");

            // Unless a job holds an address in the block (the host daemon's allocator file
            // says so): then a shutdown keeps it too, for the next agent to renew.
            let dir = tempfile::tempdir()?;
            let job_ips = dir.path().join("job-ips.json");
            let before = previous_run_lease(s.clone()).await?;
            flynn_network::job::IpAllocator::open(&job_ips, before.subnet, &[])?
                .allocate("job-1")?;
            let mut agent = unreachable_agent_with(s.clone(), Some(job_ips))?;
            ensure!(no_underlay(&agent.start().await), "the start did not fail");
            agent.abandon_start().await?;
            let left = live(&s).await?;
            ensure!(
                left.len() == 1 && left[0].subnet == before.subnet,
                "released at a shutdown while a job holds an address: {left:?}"
            );
            Ok(())
        },
    )
}

/// Whether a shutdown of an agent whose start failed (`abandon_start`, which decides as a
/// clean stop does) released this host's lease, the host daemon's allocator file at
/// `job_ips` made by `files` for the lease's block.
async fn released_at_shutdown(
    job_ips: &std::path::Path,
    files: impl FnOnce(Subnet) -> Result<()>,
) -> Result<bool> {
    let s = MemoryStore::new();
    let before = previous_run_lease(s.clone()).await?;
    files(before.subnet)?;
    let mut agent = unreachable_agent_with(s.clone(), Some(job_ips.to_path_buf()))?;
    ensure!(no_underlay(&agent.start().await), "the start did not fail");
    agent.abandon_start().await?;
    Ok(live(&s).await?.iter().all(|l| l.subnet != before.subnet))
}

/// A shutdown releases the lease only when the host daemon's allocator file exists and no
/// job holds an address in it. flynn-host's pooled namespaces (`--netns-pool`, owners
/// `pool/…`) do not count until a job takes one (`job-netns.json`): they used to, so a
/// clean stop almost never released. A missing file (a flynn-host whose `--state-dir` the
/// agent's `--job-ips` does not follow) keeps the lease: it used to read as "no job".
#[test]
fn a_shutdown_releases_only_when_the_allocator_file_shows_no_job() -> Result<()> {
    in_lone_host(
        "a_shutdown_releases_only_when_the_allocator_file_shows_no_job",
        async move || {
            use flynn_network::job::IpAllocator;
            let dir = tempfile::tempdir()?;
            let job_ips = dir.path().join("job-ips.json");
            let taken = dir.path().join("job-netns.json");
            let pooled = |block: Subnet| -> Result<IpAllocator> {
                let _ = std::fs::remove_file(&taken);
                let _ = std::fs::remove_file(&job_ips);
                let mut a = IpAllocator::open(&job_ips, block, &[])?;
                a.allocate("pool/0a1b2c")?;
                a.allocate("pool/3d4e5f")?;
                Ok(a)
            };
            ensure!(
                !released_at_shutdown(&job_ips, |_| Ok(())).await?,
                "released with no allocator file"
            );
            ensure!(
                released_at_shutdown(&job_ips, |b| pooled(b).map(|_| ())).await?,
                "kept while only pooled namespaces hold addresses"
            );
            ensure!(
                !released_at_shutdown(&job_ips, |b| {
                    pooled(b)?;
                    std::fs::write(&taken, br#"{"job-1":"pool/3d4e5f"}"#)?;
                    Ok(())
                })
                .await?,
                "released while a job holds a pooled namespace's address"
            );
            ensure!(
                !released_at_shutdown(&job_ips, |b| {
                    pooled(b)?.allocate("job-2")?;
                    Ok(())
                })
                .await?,
                "released while a job holds an address"
            );
            ensure!(
                released_at_shutdown(&job_ips, |b| {
                    let _ = std::fs::remove_file(&taken);
                    let _ = std::fs::remove_file(&job_ips);
                    IpAllocator::open(&job_ips, b, &[])?;
                    Ok(())
                })
                .await?,
                "kept with no address held"
            );
            Ok(())
        },
    )
}

/// A [`MemoryStore`] whose writes go through but, while `lose` is set, answer as if the
/// store could not be reached (their answers lost).
#[derive(Clone)]
struct LostAnswers {
    inner: MemoryStore,
    lose: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl LostAnswers {
    fn answer<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        match r {
            Ok(_) if self.lose.load(std::sync::atomic::Ordering::SeqCst) => {
                Err(StoreError::Unavailable {
                    reason: "answer lost".into(),
                })
            }
            r => r,
        }
    }
}

impl LeaseStore for LostAnswers {
    async fn leases(&self) -> Result<flynn_network::Snapshot, StoreError> {
        self.inner.leases().await
    }

    async fn create(&self, lease: &Lease) -> Result<Lease, StoreError> {
        self.answer(self.inner.create(lease).await)
    }

    async fn update(&self, lease: &Lease) -> Result<Lease, StoreError> {
        self.answer(self.inner.update(lease).await)
    }

    async fn delete(&self, lease: &Lease) -> Result<(), StoreError> {
        self.inner.delete(lease).await
    }

    async fn watch(&self) -> Result<flynn_network::LeaseWatch, StoreError> {
        self.inner.watch().await
    }
}

/// A start that gives up while acquiring (every write's answer lost, so it never learns
/// which lease it holds) releases the lease found in the store only when one of its tries
/// created it, not when it was this host's lease before the start.
#[test]
fn a_start_that_gives_up_while_acquiring_releases_only_what_it_created() -> Result<()> {
    in_lone_host(
        "a_start_that_gives_up_while_acquiring_releases_only_what_it_created",
        async move || {
            let lost = |inner: &MemoryStore| LostAnswers {
                inner: inner.clone(),
                lose: std::sync::Arc::new(true.into()),
            };
            let gave_up = |r: &Result<flynn_network::Started, AgentError>| {
                matches!(
                    r,
                    Err(AgentError::Lease(LeaseError::Store(
                        StoreError::Unavailable { .. }
                    )))
                )
            };
            // Created by the first try (its answer lost), renewed by the second: released.
            let store = MemoryStore::new();
            let mut agent = unreachable_agent(lost(&store))?;
            let last = give_up(&mut agent).await;
            ensure!(gave_up(&last), "{last:?}");
            let left = live(&store).await?;
            ensure!(
                left.is_empty(),
                "the lease the start created outlived it: {left:?}"
            );
            // This host's lease before the start, renewed by both tries: kept.
            let store = MemoryStore::new();
            let before = previous_run_lease(store.clone()).await?;
            let mut agent = unreachable_agent(lost(&store))?;
            let last = give_up(&mut agent).await;
            ensure!(gave_up(&last), "{last:?}");
            let left = live(&store).await?;
            ensure!(
                left.len() == 1 && left[0].subnet == before.subnet,
                "the start that gave up released the lease it found: {left:?}"
            );
            Ok(())
        },
    )
}

/// A start whose earlier try held a lease that then vanished (deleted, or taken over),
/// and whose last try created another one without learning it (the answer lost), gives
/// up releasing that new lease: it went by the vanished one it still held in memory, kept
/// "this host's lease" and left the new one leased for its TTL.
#[test]
fn a_start_that_gives_up_releases_the_lease_a_later_try_created() -> Result<()> {
    in_lone_host(
        "a_start_that_gives_up_releases_the_lease_a_later_try_created",
        async move || {
            let store = MemoryStore::new();
            let lose = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let mut agent = unreachable_agent(LostAnswers {
                inner: store.clone(),
                lose: lose.clone(),
            })?;
            // The first try leases a block, then finds no underlay.
            ensure!(agent.start().await.is_err(), "the first try started");
            let first = store.leases().await?.leases;
            ensure!(first.len() == 1, "{first:?}");
            // That lease vanishes; the next try writes a new one and loses the answer.
            store.delete(&first[0]).await?;
            lose.store(true, std::sync::atomic::Ordering::SeqCst);
            let last = agent.start_retrying(1, Duration::from_millis(20)).await;
            ensure!(last.is_err(), "{last:?}");
            let left = live(&store).await?;
            ensure!(
                left.is_empty(),
                "the lease the last try created outlived the start: {left:?}"
            );
            Ok(())
        },
    )
}

/// A [`MemoryStore`] whose plain reads (the lease set a start reconciles) fail: a start
/// gets as far as its lease, devices and `subnet.env`, then fails.
#[derive(Clone)]
struct PlainReadsFail(MemoryStore);

impl LeaseStore for PlainReadsFail {
    async fn leases(&self) -> Result<flynn_network::Snapshot, StoreError> {
        Err(StoreError::Unavailable {
            reason: "plain reads fail".into(),
        })
    }

    async fn leases_consistent(&self) -> Result<flynn_network::Snapshot, StoreError> {
        self.0.leases_consistent().await
    }

    async fn create(&self, lease: &Lease) -> Result<Lease, StoreError> {
        self.0.create(lease).await
    }

    async fn update(&self, lease: &Lease) -> Result<Lease, StoreError> {
        self.0.update(lease).await
    }

    async fn delete(&self, lease: &Lease) -> Result<(), StoreError> {
        self.0.delete(lease).await
    }

    async fn watch(&self) -> Result<flynn_network::LeaseWatch, StoreError> {
        self.0.watch().await
    }
}

/// The underlay address of the host in [`a_start_that_gives_up_puts_the_state_back`].
const STATE_HOST_IP: &str = "10.231.4.1";

/// The `FLANNEL_SUBNET` line of `dir/subnet.env`, `None` without the file.
fn state_subnet(dir: &std::path::Path) -> Result<Option<String>> {
    match std::fs::read_to_string(dir.join("subnet.env")) {
        Ok(body) => Ok(body
            .lines()
            .find(|l| l.starts_with("FLANNEL_SUBNET="))
            .map(str::to_string)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A start that gives up after its tries wrote `subnet.env` (it fails reading the lease set,
/// after the state is written) and releases the block they created puts the file back as it
/// was before: naming the released block, it made the next run lease that block again as
/// this host's previous one, held before, and keep it when that run gave up too, so an agent
/// failing in a loop left the block leased for its TTL. What the host held before (its
/// previous block, leased again after a clean shutdown released it) is kept, file and lease.
/// A shutdown during start-up that releases a block the start created puts it back too.
#[test]
fn a_start_that_gives_up_puts_the_state_back() -> Result<()> {
    if !lab::should_run("a_start_that_gives_up_puts_the_state_back") {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    let ns = lab.add_host("h1", "u1", STATE_HOST_IP)?;
    in_netns(&ns, async move || {
        let agent = |store: &MemoryStore, dir: &std::path::Path| -> Result<_> {
            let cfg = AgentConfig {
                public_ip: STATE_HOST_IP.parse()?,
                devices: DeviceConfig::default(),
                lease: LeaseConfig::default(),
                direct_routing: false,
                resync: Duration::from_secs(30),
                state_dir: Some(dir.to_path_buf()),
                fast_path_required: false,
                ip_masq: false,
                job_ips: None,
            };
            Ok(Agent::new(
                PlainReadsFail(store.clone()),
                KernelNetlink::connect()?,
                cfg,
                None,
            ))
        };
        let gave_up = |r: &Result<flynn_network::Started, AgentError>| {
            matches!(r, Err(AgentError::Store(StoreError::Unavailable { .. })))
        };

        // No state before: two runs in a row give up, and nothing stays leased.
        let store = MemoryStore::new();
        let dir = tempfile::tempdir()?;
        for run in 1..=2 {
            let last = give_up(&mut agent(&store, dir.path())?).await;
            ensure!(gave_up(&last), "run {run}: {last:?}");
            let left = live(&store).await?;
            ensure!(
                left.is_empty(),
                "run {run}: a lease outlived the start that gave up: {left:?}"
            );
        }
        let state = state_subnet(dir.path())?;
        ensure!(state.is_none(), "subnet.env left behind: {state:?}");

        // The previous block is another host's now: a new one is created, released, and the
        // file names the previous block again, byte for byte.
        let store = MemoryStore::new();
        let dir = tempfile::tempdir()?;
        let other = Leaser::new(store.clone(), LeaseConfig::default(), "10.231.4.2".parse()?)
            .acquire(SystemTime::now(), None)
            .await?;
        let before = format!(
            "FLANNEL_NETWORK=100.100.0.0/16\nFLANNEL_SUBNET={}/24\nFLANNEL_MTU=1450\n",
            other.subnet.first_host()
        );
        std::fs::write(dir.path().join("subnet.env"), &before)?;
        let last = give_up(&mut agent(&store, dir.path())?).await;
        ensure!(gave_up(&last), "{last:?}");
        let left = live(&store).await?;
        ensure!(
            left.len() == 1 && left[0].subnet == other.subnet,
            "the start's own lease outlived it, or the other host's went: {left:?}"
        );
        let after = std::fs::read_to_string(dir.path().join("subnet.env"))?;
        ensure!(after == before, "subnet.env not put back: {after:?}");

        // The previous block, free after this host's clean shutdown: leased again, held
        // before, so a start that gives up keeps both the lease and the file.
        let store = MemoryStore::new();
        let dir = tempfile::tempdir()?;
        let previous: Subnet = "100.100.9.0/24".parse()?;
        std::fs::write(
            dir.path().join("subnet.env"),
            format!("FLANNEL_SUBNET={}/24\n", previous.first_host()),
        )?;
        let last = give_up(&mut agent(&store, dir.path())?).await;
        ensure!(gave_up(&last), "{last:?}");
        let left = live(&store).await?;
        ensure!(
            left.len() == 1 && left[0].subnet == previous,
            "the previous block's lease was not kept: {left:?}"
        );
        let state = state_subnet(dir.path())?;
        let want = format!("FLANNEL_SUBNET={}/24", previous.first_host());
        ensure!(state.as_deref() == Some(&*want), "{state:?}");

        // A shutdown during start-up (`abandon_start`) that releases a block the start
        // created puts the file back the same way.
        let store = MemoryStore::new();
        let dir = tempfile::tempdir()?;
        let mut a = agent(&store, dir.path())?;
        let first = a.start().await;
        ensure!(gave_up(&first), "{first:?}");
        ensure!(
            state_subnet(dir.path())?.is_some(),
            "the start wrote no state"
        );
        a.abandon_start().await?;
        let left = live(&store).await?;
        ensure!(left.is_empty(), "not released at a shutdown: {left:?}");
        let state = state_subnet(dir.path())?;
        ensure!(
            state.is_none(),
            "subnet.env left behind at a shutdown: {state:?}"
        );
        Ok(())
    })
}

/// The underlay address of the host in
/// [`a_refused_direct_route_holds_back_neither_the_start_nor_the_other_peers`].
const DIRECT_HOST_IP: &str = "10.231.5.1";

/// A peer lease of `block` at underlay address `ip`, live for an hour.
fn peer_lease(block: &str, ip: &str) -> Result<Lease> {
    let subnet: Subnet = block.parse()?;
    Ok(Lease {
        subnet,
        public_ip: ip.parse()?,
        vtep_mac: Mac::for_subnet(&subnet),
        expires_at: SystemTime::now() + Duration::from_secs(3600),
        revision: 0,
    })
}

/// One peer whose direct route the kernel refuses (its record names the segment's broadcast
/// address: "Nexthop has invalid gateway") holds back neither the peers after it nor the
/// agent's start. The routes used to be added with `?`, so the refusal skipped every later
/// peer; and the start failed on it, so after its tries the agent gave up with the host half
/// set up.
#[test]
fn a_refused_direct_route_holds_back_neither_the_start_nor_the_other_peers() -> Result<()> {
    if !lab::should_run("a_refused_direct_route_holds_back_neither_the_start_nor_the_other_peers") {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    let ns = lab.add_host("h1", "u1", DIRECT_HOST_IP)?;
    let proto_routes = |ns: &str| -> Result<String> {
        let out = run(&["ip", "-n", ns, "route", "show", "proto", "102"])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // The bad peer's block sorts first.
    let bad = peer_lease("100.100.1.0/24", "10.231.5.255")?;
    let good = peer_lease("100.100.2.0/24", "10.231.5.7")?;

    // Straight to the kernel: the good route goes in, the first failure is reported.
    let (b, g) = (bad.clone(), good.clone());
    let synced = in_netns(&ns, async move || {
        let nl = KernelNetlink::connect()?;
        let seg = nl.segment(DIRECT_HOST_IP.parse()?).await?;
        let want = flynn_network::direct_routes(&seg, &[&b, &g], DIRECT_HOST_IP.parse()?);
        Ok(nl.sync_direct_routes(seg.ifindex, &want).await.is_ok())
    })?;
    ensure!(!synced, "the refused route was not reported");
    let routes = proto_routes(&ns)?;
    ensure!(
        routes.contains("100.100.2.0/24 via 10.231.5.7"),
        "the route after the refused one is missing:\n{routes}"
    );
    run(&["ip", "-n", &ns, "route", "flush", "proto", "102"])?;

    // An agent starting with both leases in the store: started, the good route in, and
    // unhealthy until the bad peer's route goes in.
    let store = MemoryStore::new();
    let s = store.clone();
    in_netns(&ns, async move || {
        s.create(&bad).await?;
        s.create(&good).await?;
        let cfg = AgentConfig {
            public_ip: DIRECT_HOST_IP.parse()?,
            devices: DeviceConfig::default(),
            lease: LeaseConfig::default(),
            direct_routing: true,
            resync: Duration::from_secs(30),
            state_dir: None,
            fast_path_required: false,
            ip_masq: false,
            job_ips: None,
        };
        let mut agent = Agent::new(s, KernelNetlink::connect()?, cfg, None);
        let started = agent.start().await;
        ensure!(started.is_ok(), "the start failed: {started:?}");
        let stats = agent.stats();
        ensure!(
            !stats.synced.load(std::sync::atomic::Ordering::Relaxed),
            "healthy with a peer's route refused"
        );
        Ok(())
    })?;
    let routes = proto_routes(&ns)?;
    ensure!(
        routes.contains("100.100.2.0/24 via 10.231.5.7"),
        "the agent did not route the good peer:\n{routes}"
    );
    Ok(())
}
