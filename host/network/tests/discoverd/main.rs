//! [`DiscoverdStore`] against a real `flynn-discoverd`: the shared store conformance suite, leasing
//! by several hosts at once (document-level CAS conflicts retried), watches and release.

#[path = "../support/discoverd.rs"]
mod support;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use flynn_client::discoverd::Client;
use flynn_network::{
    config_json, layout_from_config, DiscoverdStore, Layout, LeaseConfig, LeaseStore, Leaser,
};
use support::Discoverd;

/// A store in a service of its own, so tests sharing a discoverd never see each other's leases.
fn store(d: &Discoverd) -> DiscoverdStore {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let service = format!(
        "flannel-test{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    DiscoverdStore::with_service(Client::new(&d.url()), &service)
}

fn leaser(s: &DiscoverdStore, last: u8) -> Leaser<DiscoverdStore> {
    Leaser::new(
        s.clone(),
        LeaseConfig::default(),
        Ipv4Addr::new(192, 0, 2, last),
    )
}

#[tokio::test]
async fn discoverd_store_behaves_like_every_lease_store() -> Result<()> {
    let d = Discoverd::start("127.0.0.1:0", None)?;
    flynn_network::conformance::suite(store(&d)).await;
    Ok(())
}

#[tokio::test]
async fn hosts_get_distinct_subnets_and_see_each_other() -> Result<()> {
    let d = Discoverd::start("127.0.0.1:0", None)?;
    let s = store(&d);
    // The first host's config wins; a later one with another network adopts it.
    let first = Layout::with_defaults("10.60.0.0/16".parse()?, Some(24))?;
    let cfg = s.init(config_json(&first, 1, 8472)).await?;
    let other = Layout::default();
    let cfg2 = s.init(config_json(&other, 1, 8472)).await?;
    ensure!(cfg == cfg2, "second init replaced the config: {cfg2}");
    ensure!(layout_from_config(&cfg2)? == first);

    let mut watch = s.watch().await?;
    ensure!(watch.current().leases.is_empty());
    let a = leaser(&s, 1).acquire(SystemTime::now(), None).await?;
    let b = leaser(&s, 2).acquire(SystemTime::now(), None).await?;
    ensure!(a.subnet != b.subnet, "both hosts got {}", a.subnet);

    // B's watch sees A's lease (and its own), with A's MAC and underlay address.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let snap = watch.current();
        if snap.leases.len() == 2 {
            let seen = snap.get(&a.subnet).expect("a's lease");
            ensure!(seen == &a, "watch shows {seen:?}, stored {a:?}");
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "watch never showed both leases"
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), watch.changed()).await;
    }

    // The document has flannel's layout.
    let meta = Client::new(&d.url()).get_meta(s.service()).await?;
    let attrs = &meta.data["subnets"][a.subnet.key()];
    ensure!(attrs["PublicIP"] == "192.0.2.1", "{attrs}");
    ensure!(attrs["BackendType"] == "vxlan", "{attrs}");
    ensure!(
        attrs["BackendData"]["VtepMAC"] == a.vtep_mac.to_string().as_str(),
        "{attrs}"
    );
    ensure!(meta.data["config"]["Network"] == "10.60.0.0/16");

    // A restarted host gets its lease back.
    let again = leaser(&s, 1).acquire(SystemTime::now(), None).await?;
    ensure!(again.subnet == a.subnet && again.vtep_mac == a.vtep_mac);

    // Release leaves the record, expired; the watch sees the lease go.
    leaser(&s, 1).release(&again, SystemTime::now()).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let snap = watch.current();
        let live: Vec<_> = snap.live(SystemTime::now()).collect();
        if live.len() == 1 {
            ensure!(live[0].subnet == b.subnet);
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "watch never showed the release"
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), watch.changed()).await;
    }
    let released = s.leases().await?;
    let released = released.get(&a.subnet).context("released record gone")?;
    ensure!(released.is_expired(SystemTime::now()), "{released:?}");
    Ok(())
}

#[tokio::test]
async fn concurrent_hosts_retry_conflicts_and_never_share_a_block() -> Result<()> {
    let d = Discoverd::start("127.0.0.1:0", None)?;
    let s = store(&d);
    // Few candidates: hosts starting together collide on the same block and on the document.
    let cfg = LeaseConfig {
        candidates: 2,
        ..LeaseConfig::default()
    };
    let mut tasks = Vec::new();
    for i in 1..=8u8 {
        let l = Leaser::new(s.clone(), cfg.clone(), Ipv4Addr::new(192, 0, 2, i));
        tasks.push(tokio::spawn(async move {
            l.acquire(SystemTime::now(), None).await
        }));
    }
    let mut subnets = std::collections::BTreeSet::new();
    for t in tasks {
        let lease = t.await??;
        ensure!(
            subnets.insert(lease.subnet),
            "{} handed out twice",
            lease.subnet
        );
    }
    let snap = s.leases().await?;
    ensure!(
        snap.leases.len() == 8,
        "{} leases stored",
        snap.leases.len()
    );
    // Renewals from all hosts at once also land (each retried past the others' writes).
    let mut tasks = Vec::new();
    for l in snap.leases.clone() {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let leaser = Leaser::new(s, LeaseConfig::default(), l.public_ip);
            leaser
                .renew(&l, SystemTime::now() + Duration::from_secs(5))
                .await
        }));
    }
    for t in tasks {
        let renewed = t.await??;
        ensure!(
            renewed.revision > snap.revision,
            "renewal kept an old revision"
        );
    }
    Ok(())
}
