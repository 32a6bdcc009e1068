//! Unit tests of [`Leaser`](super::Leaser): block choice, reuse, renewal and release against the
//! in-memory store (and stores that lose answers or fail reads).

use super::*;
use crate::store::MemoryStore;

const T0: Duration = Duration::from_secs(1_000_000);

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + T0
}

fn small() -> Config {
    Config {
        layout: Layout::with_defaults("10.9.0.0/22".parse().unwrap(), Some(24)).unwrap(),
        ttl: Duration::from_secs(100),
        renew_margin: Duration::from_secs(10),
        ..Config::default()
    }
}

fn host(store: &MemoryStore, last: u8) -> Leaser<MemoryStore> {
    Leaser::new(store.clone(), small(), Ipv4Addr::new(192, 0, 2, last))
}

#[tokio::test]
async fn allocates_distinct_free_blocks_until_exhausted() {
    let store = MemoryStore::new();
    let mut got = Vec::new();
    // 10.9.0.0/22 in /24s, first skipped: three blocks.
    for i in 1..=3 {
        let l = host(&store, i)
            .acquire_with(now(), None, |_| 0)
            .await
            .unwrap();
        assert_eq!(l.vtep_mac, Mac::for_subnet(&l.subnet));
        assert_eq!(l.expires_at, now() + Duration::from_secs(100));
        got.push(l.subnet.to_string());
    }
    assert_eq!(got, ["10.9.1.0/24", "10.9.2.0/24", "10.9.3.0/24"]);
    let err = host(&store, 4)
        .acquire_with(now(), None, |_| 0)
        .await
        .unwrap_err();
    assert!(matches!(err, LeaseError::Exhausted { .. }), "{err:?}");
}

#[tokio::test]
async fn same_host_reuses_its_lease_and_mac() {
    let store = MemoryStore::new();
    let a = host(&store, 1)
        .acquire_with(now(), None, |n| n - 1)
        .await
        .unwrap();
    let later = now() + Duration::from_secs(50);
    let again = host(&store, 1)
        .acquire_with(later, None, |_| 0)
        .await
        .unwrap();
    assert_eq!(again.subnet, a.subnet);
    assert_eq!(again.vtep_mac, a.vtep_mac);
    assert!(again.expires_at > a.expires_at);
    assert_eq!(store.leases().await.unwrap().leases.len(), 1);
}

#[tokio::test]
async fn restart_after_release_gets_the_previous_block_back() {
    let store = MemoryStore::new();
    let leaser = host(&store, 1);
    // The last block: a pick of 0 would choose the first one.
    let a = leaser.acquire_with(now(), None, |n| n - 1).await.unwrap();
    assert_eq!(a.subnet.to_string(), "10.9.3.0/24");
    // Clean shutdown: the record no longer holds the block.
    leaser.release(&a, now()).await.unwrap();
    assert_eq!(store.leases().await.unwrap().live(now()).count(), 0);
    // The next start remembers the block (subnet.env) and gets it again, same MAC.
    let b = host(&store, 1)
        .acquire_with(now(), Some(a.subnet), |_| 0)
        .await
        .unwrap();
    assert_eq!(b.subnet, a.subnet);
    assert_eq!(b.vtep_mac, a.vtep_mac);
}

/// `acquire_noting` notes the blocks it leases anew (created or taken over), never one
/// it reuses: what a start that gives up may release.
#[tokio::test]
async fn acquire_notes_what_it_created_not_what_it_reused() {
    let store = MemoryStore::new();
    let mut created = None;
    let a = host(&store, 1)
        .acquire_noting(now(), None, |_| 0, &mut created)
        .await
        .unwrap();
    assert_eq!(created, Some(a.subnet));
    // Host 1 again (a restart): its lease is reused.
    let mut created = None;
    let again = host(&store, 1)
        .acquire_noting(now(), None, |_| 0, &mut created)
        .await
        .unwrap();
    assert_eq!((again.subnet, created), (a.subnet, None));
    // Expired for longer than the renew margin: taken over by host 2, noted.
    let later = now() + Duration::from_secs(111);
    let b = host(&store, 2)
        .acquire_noting(later, Some(a.subnet), |_| 0, &mut created)
        .await
        .unwrap();
    assert_eq!((b.subnet, created), (a.subnet, Some(a.subnet)));
    // Host 2's clean shutdown releases it; its next start leases its previous block
    // again: held before (its jobs may use it), not noted.
    host(&store, 2).release(&b, later).await.unwrap();
    let mut created = None;
    let c = host(&store, 2)
        .acquire_noting(later, Some(b.subnet), |_| 0, &mut created)
        .await
        .unwrap();
    assert_eq!((c.subnet, created), (b.subnet, None));
    // Released again, and a start that knows no previous block (its state was put back,
    // or lost): leasing its released record again is leasing anew, noted.
    host(&store, 2).release(&c, later).await.unwrap();
    let mut created = None;
    let d = host(&store, 2)
        .acquire_noting(later, None, |_| 0, &mut created)
        .await
        .unwrap();
    assert_eq!((d.subnet, created), (c.subnet, Some(c.subnet)));
}

/// A released block is the last choice of a joining host: its record stays, marked
/// expired, where deleting it made the block look never leased, the first choice, while
/// the host that released it might still run jobs in it.
#[tokio::test]
async fn a_released_block_is_taken_last_not_first() {
    let store = MemoryStore::new();
    // 10.9.0.0/22 in /24s: blocks 1, 2 and 3. Host 1 has block 1, and releases it.
    let a = host(&store, 1)
        .acquire_with(now(), None, |_| 0)
        .await
        .unwrap();
    assert_eq!(a.subnet.to_string(), "10.9.1.0/24");
    host(&store, 1).release(&a, now()).await.unwrap();
    let snap = store.leases().await.unwrap();
    assert_eq!(snap.live(now()).count(), 0, "still live: {snap:?}");
    // Whatever the pick, a joining host takes a block never leased (hosts 2 and 6, each
    // then gone long ago).
    for (pick, h) in [(0, 2), (1, 6)] {
        let s = store.clone();
        let b = host(&s, h)
            .acquire_with(now(), None, |n| pick.min(n - 1))
            .await
            .unwrap();
        assert_ne!(b.subnet, a.subnet, "pick {pick}");
        host(&s, h).release(&b, now()).await.unwrap();
        // Expired before host 1's release: the older one goes first.
        let old = Lease {
            expires_at: now() - Duration::from_secs(3600),
            ..b
        };
        let rev = s.leases().await.unwrap().get(&old.subnet).unwrap().revision;
        s.update(&Lease {
            revision: rev,
            ..old.clone()
        })
        .await
        .unwrap();
    }
    // Blocks 2 and 3 released long ago, 1 just now: 2 and 3 go first.
    let c = host(&store, 3)
        .acquire_with(now(), None, |_| 0)
        .await
        .unwrap();
    let d = host(&store, 4)
        .acquire_with(now(), None, |_| 0)
        .await
        .unwrap();
    assert!(c.subnet != a.subnet && d.subnet != a.subnet, "{c:?} {d:?}");
    // Only then is it taken (free at once: no renew margin to wait out).
    let e = host(&store, 5)
        .acquire_with(now(), None, |_| 0)
        .await
        .unwrap();
    assert_eq!(e.subnet, a.subnet);
}

/// A host with two records (a block it released, and the one it leased after) is
/// found by its live one: `own` took the first in block order, the released one, so a
/// SIGTERM during acquisition released a block already released and kept the live one.
#[tokio::test]
async fn own_prefers_the_live_record_of_a_host_with_two() {
    let store = MemoryStore::new();
    let leaser = host(&store, 1);
    // Block 1 released long ago, then block 3 leased (previous: block 3).
    let released = leaser.acquire_with(now(), None, |_| 0).await.unwrap();
    leaser.release(&released, now()).await.unwrap();
    let live = leaser
        .acquire_with(now(), Some("10.9.3.0/24".parse().unwrap()), |_| 0)
        .await
        .unwrap();
    assert_eq!(live.subnet.to_string(), "10.9.3.0/24");
    assert_eq!(store.leases().await.unwrap().leases.len(), 2);
    assert_eq!(leaser.own().await.unwrap(), Some(live.clone()));
    // Both expired (the live one ran out too): the one that expired last, whichever
    // block comes first.
    let expired = |l: &Lease, ago: u64| Lease {
        expires_at: now() - Duration::from_secs(ago),
        ..l.clone()
    };
    // Block 1 expired 11 s ago (released), block 3 5 s ago.
    store.update(&expired(&live, 5)).await.unwrap();
    let own = leaser.own().await.unwrap().unwrap();
    assert!(own.is_expired(now()), "{own:?}");
    assert_eq!(own.subnet, live.subnet);
    // Block 1 now 1 s ago: it is the newer.
    let first = store.leases().await.unwrap().get(&released.subnet).cloned();
    store.update(&expired(&first.unwrap(), 1)).await.unwrap();
    let own = leaser.own().await.unwrap().unwrap();
    assert!(own.is_expired(now()), "{own:?}");
    assert_eq!(own.subnet, released.subnet);
}

/// Hosts joining together when only expired blocks are free spread over several of
/// them: only the single longest-expired block used to be a candidate (expiries are
/// whole seconds), so every joining host raced for the same record. The newer half
/// (a block just released is the newest) is still never picked.
#[tokio::test]
async fn joins_spread_over_the_longest_expired_blocks() {
    let store = MemoryStore::new();
    // 10.9.0.0/21 in /24s: blocks 1 to 7, each leased by its own host, then expired
    // `k` minutes after one another (block 7 just released).
    let cfg = Config {
        layout: Layout::with_defaults("10.9.0.0/21".parse().unwrap(), Some(24)).unwrap(),
        ..small()
    };
    for i in 1..=7u8 {
        let l = Leaser::new(store.clone(), cfg.clone(), Ipv4Addr::new(192, 0, 2, i))
            .acquire_with(now(), None, |_| 0)
            .await
            .unwrap();
        assert_eq!(l.subnet.addr().octets()[2], i);
        store
            .update(&Lease {
                expires_at: now() - Duration::from_secs(60 * (8 - u64::from(i))),
                ..l
            })
            .await
            .unwrap();
    }
    let mut got = std::collections::BTreeMap::<u8, u32>::new();
    for pick in 0..7 {
        let l = Leaser::new(store.clone(), cfg.clone(), Ipv4Addr::new(192, 0, 2, 99));
        let mut offered = 0;
        let subnet = l
            .acquire_with(now(), None, |n| {
                offered = n;
                pick % n
            })
            .await
            .unwrap()
            .subnet;
        // Given back for the next try (not a lease of its own: deleted).
        let rec = store.leases().await.unwrap().get(&subnet).cloned().unwrap();
        store.delete(&rec).await.unwrap();
        let old = (1..=7u8).find(|i| subnet.addr().octets()[2] == *i).unwrap();
        store
            .create(&Lease {
                public_ip: Ipv4Addr::new(192, 0, 2, old),
                expires_at: now() - Duration::from_secs(60 * (8 - u64::from(old))),
                ..rec
            })
            .await
            .unwrap();
        assert_eq!(offered, 4, "the older half of 7 expired blocks");
        *got.entry(old).or_default() += 1;
    }
    // Blocks 1 to 4 (expired longest ago), each picked; 5 to 7 never.
    assert_eq!(
        got.keys().copied().collect::<Vec<_>>(),
        [1, 2, 3, 4],
        "{got:?}"
    );
    // At most `candidates` of them.
    let l = Leaser::new(
        store.clone(),
        Config {
            candidates: 2,
            ..cfg.clone()
        },
        Ipv4Addr::new(192, 0, 2, 99),
    );
    let mut offered = 0;
    l.acquire_with(now(), None, |n| {
        offered = n;
        n - 1
    })
    .await
    .unwrap();
    assert_eq!(offered, 2);
}

#[tokio::test]
async fn previous_block_is_not_taken_from_another_host_or_outside_the_layout() {
    let store = MemoryStore::new();
    let a = host(&store, 1)
        .acquire_with(now(), None, |_| 0)
        .await
        .unwrap();
    // Host 2 used to have A's block: it now gets another one.
    let b = host(&store, 2)
        .acquire_with(now(), Some(a.subnet), |_| 0)
        .await
        .unwrap();
    assert_ne!(b.subnet, a.subnet);
    // A block outside the cluster network, of another size, or the skipped first block is
    // ignored.
    for prev in ["10.10.1.0/24", "10.9.3.0/25", "10.9.0.0/24"] {
        let c = host(&store, 3)
            .acquire_with(now(), Some(prev.parse().unwrap()), |_| 0)
            .await
            .unwrap();
        assert_eq!(c.subnet.to_string(), "10.9.3.0/24", "previous {prev}");
        host(&store, 3).release(&c, now()).await.unwrap();
    }
    // A lease of another host on the previous block, expired for longer than the renew
    // margin, is taken over.
    let later = now() + Duration::from_secs(111);
    let a2 = host(&store, 3)
        .acquire_with(later, Some(a.subnet), |_| 0)
        .await
        .unwrap();
    assert_eq!(a2.subnet, a.subnet);
    assert_eq!(a2.public_ip, Ipv4Addr::new(192, 0, 2, 3));
}

#[tokio::test]
async fn a_foreign_record_overlapping_everything_blocks_nothing() {
    let store = MemoryStore::new();
    store
        .create(&Lease {
            subnet: "0.0.0.0/0".parse().unwrap(),
            public_ip: Ipv4Addr::new(1, 2, 3, 4),
            vtep_mac: Mac([2, 0, 0, 0, 0, 1]),
            expires_at: now() + Duration::from_secs(1 << 30),
            revision: 0,
        })
        .await
        .unwrap();
    let l = host(&store, 1)
        .acquire_with(now(), None, |_| 0)
        .await
        .unwrap();
    assert_eq!(l.subnet.to_string(), "10.9.1.0/24");
}

/// A store that does not show the lease of `hidden` (as a record that does not parse is
/// skipped), though it is there.
struct Hiding {
    inner: MemoryStore,
    hidden: Subnet,
}

impl LeaseStore for Hiding {
    async fn leases(&self) -> Result<crate::store::Snapshot, StoreError> {
        let mut snap = self.inner.leases().await?;
        snap.leases.retain(|l| l.subnet != self.hidden);
        Ok(snap)
    }
    async fn create(&self, lease: &Lease) -> Result<Lease, StoreError> {
        self.inner.create(lease).await
    }
    async fn update(&self, lease: &Lease) -> Result<Lease, StoreError> {
        self.inner.update(lease).await
    }
    async fn delete(&self, lease: &Lease) -> Result<(), StoreError> {
        self.inner.delete(lease).await
    }
    async fn watch(&self) -> Result<crate::store::LeaseWatch, StoreError> {
        self.inner.watch().await
    }
}

#[tokio::test]
async fn a_block_whose_record_cannot_be_read_is_given_up_for_another() {
    let inner = MemoryStore::new();
    // Someone holds 10.9.1.0/24, in a record this host cannot read; it was this host's
    // block before a clean shutdown.
    let held = host(&inner, 9)
        .acquire_with(now(), None, |_| 0)
        .await
        .unwrap();
    let store = Hiding {
        inner,
        hidden: held.subnet,
    };
    let l = Leaser::new(store, small(), Ipv4Addr::new(192, 0, 2, 1))
        .acquire_with(now(), Some(held.subnet), |_| 0)
        .await
        .unwrap();
    assert_eq!(l.subnet.to_string(), "10.9.2.0/24");
}

/// A store whose first update is committed but answered with an error (the answer was lost).
struct LostAnswer {
    inner: MemoryStore,
    failed: std::sync::atomic::AtomicBool,
}

impl LeaseStore for LostAnswer {
    async fn leases(&self) -> Result<crate::store::Snapshot, StoreError> {
        self.inner.leases().await
    }
    async fn create(&self, lease: &Lease) -> Result<Lease, StoreError> {
        self.inner.create(lease).await
    }
    async fn update(&self, lease: &Lease) -> Result<Lease, StoreError> {
        let stored = self.inner.update(lease).await?;
        if !self.failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Unavailable {
                reason: "connection reset".into(),
            });
        }
        Ok(stored)
    }
    async fn delete(&self, lease: &Lease) -> Result<(), StoreError> {
        self.inner.delete(lease).await
    }
    async fn watch(&self) -> Result<crate::store::LeaseWatch, StoreError> {
        self.inner.watch().await
    }
}

/// A store, host 1's lease in it, and a leaser for host 1 whose first update's answer
/// is lost (the write goes through).
async fn leased_then_answers_lost() -> (MemoryStore, Lease, Leaser<LostAnswer>) {
    let inner = MemoryStore::new();
    let a = host(&inner, 1)
        .acquire_with(now(), None, |_| 0)
        .await
        .unwrap();
    let leaser = Leaser::new(
        LostAnswer {
            inner: inner.clone(),
            failed: Default::default(),
        },
        small(),
        Ipv4Addr::new(192, 0, 2, 1),
    );
    (inner, a, leaser)
}

#[tokio::test]
async fn renewal_whose_answer_was_lost_is_retried_not_lost() {
    let (inner, a, leaser) = leased_then_answers_lost().await;
    let t1 = now() + Duration::from_secs(90);
    let err = leaser.renew(&a, t1).await.unwrap_err();
    assert!(matches!(err, LeaseError::Store(_)), "{err:?}");
    // The write went through: the stored revision moved past the one the agent holds.
    assert!(inner.leases().await.unwrap().leases[0].revision > a.revision);
    // The agent retries with what it has: the record is still ours, so it is renewed.
    let t2 = t1 + Duration::from_secs(2);
    let renewed = leaser.renew(&a, t2).await.unwrap();
    assert_eq!(renewed.subnet, a.subnet);
    assert_eq!(renewed.expires_at, t2 + Duration::from_secs(100));
    assert_eq!(inner.leases().await.unwrap().leases, vec![renewed.clone()]);
    // Once another host holds the record, a renewal is still refused.
    inner
        .update(&Lease {
            public_ip: Ipv4Addr::new(192, 0, 2, 9),
            ..renewed.clone()
        })
        .await
        .unwrap();
    let err = leaser.renew(&renewed, t2).await.unwrap_err();
    assert!(matches!(err, LeaseError::Lost { .. }), "{err:?}");
}

/// A clean shutdown right after a renewal whose answer was lost still releases the
/// lease (the record moved on but is still this host's); one another host took is left.
#[tokio::test]
async fn release_after_a_lost_renewal_answer_releases_the_record() {
    let (inner, a, leaser) = leased_then_answers_lost().await;
    leaser
        .renew(&a, now() + Duration::from_secs(90))
        .await
        .unwrap_err();
    leaser.release(&a, now()).await.unwrap();
    assert_eq!(
        inner.leases().await.unwrap().live(now()).count(),
        0,
        "not released"
    );

    let b = host(&inner, 1)
        .acquire_with(now(), None, |_| 0)
        .await
        .unwrap();
    let taken = inner
        .update(&Lease {
            public_ip: Ipv4Addr::new(192, 0, 2, 9),
            ..b.clone()
        })
        .await
        .unwrap();
    leaser.release(&b, now()).await.unwrap();
    assert_eq!(inner.leases().await.unwrap().leases, vec![taken]);
}

/// A store whose first create loses a race to another host.
struct Racy {
    inner: MemoryStore,
    raced: std::sync::atomic::AtomicBool,
}

impl LeaseStore for Racy {
    async fn leases(&self) -> Result<crate::store::Snapshot, StoreError> {
        self.inner.leases().await
    }
    async fn create(&self, lease: &Lease) -> Result<Lease, StoreError> {
        if !self.raced.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let rival = Lease {
                public_ip: Ipv4Addr::new(192, 0, 2, 99),
                ..lease.clone()
            };
            self.inner.create(&rival).await?;
        }
        self.inner.create(lease).await
    }
    async fn update(&self, lease: &Lease) -> Result<Lease, StoreError> {
        self.inner.update(lease).await
    }
    async fn delete(&self, lease: &Lease) -> Result<(), StoreError> {
        self.inner.delete(lease).await
    }
    async fn watch(&self) -> Result<crate::store::LeaseWatch, StoreError> {
        self.inner.watch().await
    }
}

#[tokio::test]
async fn collision_on_create_retries_with_another_block() {
    let inner = MemoryStore::new();
    let racy = Racy {
        inner: inner.clone(),
        raced: Default::default(),
    };
    let leaser = Leaser::new(racy, small(), Ipv4Addr::new(192, 0, 2, 1));
    let l = leaser.acquire_with(now(), None, |_| 0).await.unwrap();
    assert_eq!(l.subnet.to_string(), "10.9.2.0/24");
    let snap = inner.leases().await.unwrap();
    let rival = snap.get(&"10.9.1.0/24".parse().unwrap()).unwrap();
    assert_eq!(rival.public_ip, Ipv4Addr::new(192, 0, 2, 99));
}

#[tokio::test]
async fn concurrent_hosts_never_share_a_block() {
    let store = MemoryStore::new();
    let layout = Layout::with_defaults("10.9.0.0/20".parse().unwrap(), Some(24)).unwrap();
    let mut tasks = Vec::new();
    for i in 1..=15u8 {
        let leaser = Leaser::new(
            store.clone(),
            Config {
                layout,
                candidates: 3,
                ..small()
            },
            Ipv4Addr::new(192, 0, 2, i),
        );
        tasks.push(tokio::spawn(async move {
            leaser
                .acquire_with(now(), None, |n| usize::from(i) % n)
                .await
        }));
    }
    let mut subnets = std::collections::BTreeSet::new();
    for t in tasks {
        assert!(subnets.insert(t.await.unwrap().unwrap().subnet));
    }
    assert_eq!(subnets.len(), 15);
}

#[tokio::test]
async fn expired_lease_is_taken_over_and_renewal_then_fails() {
    let store = MemoryStore::new();
    let cfg = Config {
        layout: Layout::with_defaults("10.9.0.0/23".parse().unwrap(), Some(24)).unwrap(),
        ..small()
    };
    let a_leaser = Leaser::new(store.clone(), cfg.clone(), Ipv4Addr::new(192, 0, 2, 1));
    let b_leaser = Leaser::new(store.clone(), cfg, Ipv4Addr::new(192, 0, 2, 2));
    let a = a_leaser.acquire_with(now(), None, |_| 0).await.unwrap();
    // Only one block: B cannot get it while A's lease lives.
    let err = b_leaser.acquire_with(now(), None, |_| 0).await.unwrap_err();
    assert!(matches!(err, LeaseError::Exhausted { .. }));
    // Renewal before expiry keeps it.
    assert_eq!(a_leaser.renew_at(&a), now() + Duration::from_secs(90));
    let a = a_leaser
        .renew(&a, now() + Duration::from_secs(90))
        .await
        .unwrap();
    assert_eq!(a.expires_at, now() + Duration::from_secs(190));
    // Once expired for longer than the renew margin, B takes it over.
    let after = now() + Duration::from_secs(201);
    assert!(a.is_expired(after));
    let b = b_leaser.acquire_with(after, None, |_| 0).await.unwrap();
    assert_eq!(b.subnet, a.subnet);
    assert_eq!(b.public_ip, Ipv4Addr::new(192, 0, 2, 2));
    // A's late renewal fails: it must not steal the block back.
    let err = a_leaser.renew(&a, after).await.unwrap_err();
    assert!(matches!(err, LeaseError::Lost { .. }), "{err:?}");
    // A's release leaves B's lease alone.
    a_leaser.release(&a, after).await.unwrap();
    assert_eq!(store.leases().await.unwrap().leases, vec![b.clone()]);
    b_leaser.release(&b, after).await.unwrap();
    assert_eq!(store.leases().await.unwrap().live(after).count(), 0);
}

/// After a store outage every live lease looks expired; its owner renews within ~2 s
/// of the store coming back. A new host must not take such a block meanwhile: only a
/// lease expired for longer than the renew margin is free.
#[tokio::test]
async fn a_lease_just_past_its_expiry_is_not_taken_over() {
    let store = MemoryStore::new();
    let cfg = Config {
        layout: Layout::with_defaults("10.9.0.0/23".parse().unwrap(), Some(24)).unwrap(),
        ..small()
    };
    let a = Leaser::new(store.clone(), cfg.clone(), Ipv4Addr::new(192, 0, 2, 1))
        .acquire_with(now(), None, |_| 0)
        .await
        .unwrap();
    let b = Leaser::new(store.clone(), cfg, Ipv4Addr::new(192, 0, 2, 2));
    // Expired 2 s and 10 s ago (the margin is 10 s): still A's.
    for past in [2, 10] {
        let t = a.expires_at + Duration::from_secs(past);
        let err = b.acquire_with(t, None, |_| 0).await.unwrap_err();
        assert!(
            matches!(err, LeaseError::Exhausted { .. }),
            "{past}: {err:?}"
        );
    }
    let t = a.expires_at + Duration::from_secs(11);
    assert_eq!(
        b.acquire_with(t, None, |_| 0).await.unwrap().subnet,
        a.subnet
    );
}

/// A block never leased is taken before one whose lease ran out, whatever the pick.
#[tokio::test]
async fn never_leased_blocks_are_preferred_over_expired_ones() {
    let store = MemoryStore::new();
    // 10.9.1.0/24 and 10.9.2.0/24 leased, 10.9.3.0/24 never.
    for i in 1..=2 {
        host(&store, i)
            .acquire_with(now(), None, |_| 0)
            .await
            .unwrap();
    }
    // Both leases long expired: a pick of the first free block still gets 10.9.3.0/24.
    let later = now() + Duration::from_secs(1000);
    let c = host(&store, 3)
        .acquire_with(later, None, |_| 0)
        .await
        .unwrap();
    assert_eq!(c.subnet.to_string(), "10.9.3.0/24");
    // With no block left that was never leased, an expired one is taken.
    let d = host(&store, 4)
        .acquire_with(later, None, |_| 0)
        .await
        .unwrap();
    assert_eq!(d.subnet.to_string(), "10.9.1.0/24");
}

/// A store node that has not caught up: its reads miss the lease and its first write
/// answers "not found"; a linearizable read has the truth.
struct Lagging {
    inner: MemoryStore,
    answered: std::sync::atomic::AtomicBool,
}

impl LeaseStore for Lagging {
    async fn leases(&self) -> Result<crate::store::Snapshot, StoreError> {
        Ok(crate::store::Snapshot::default())
    }
    async fn leases_consistent(&self) -> Result<crate::store::Snapshot, StoreError> {
        self.inner.leases().await
    }
    async fn create(&self, lease: &Lease) -> Result<Lease, StoreError> {
        self.inner.create(lease).await
    }
    async fn update(&self, lease: &Lease) -> Result<Lease, StoreError> {
        if !self
            .answered
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(StoreError::NotFound {
                key: lease.subnet.key(),
            });
        }
        self.inner.update(lease).await
    }
    async fn delete(&self, lease: &Lease) -> Result<(), StoreError> {
        self.inner.delete(lease).await
    }
    async fn watch(&self) -> Result<crate::store::LeaseWatch, StoreError> {
        self.inner.watch().await
    }
}

#[tokio::test]
async fn a_single_not_found_on_renewal_is_checked_before_the_lease_is_lost() {
    let inner = MemoryStore::new();
    let a = host(&inner, 1)
        .acquire_with(now(), None, |_| 0)
        .await
        .unwrap();
    let leaser = Leaser::new(
        Lagging {
            inner: inner.clone(),
            answered: Default::default(),
        },
        small(),
        Ipv4Addr::new(192, 0, 2, 1),
    );
    let t = now() + Duration::from_secs(90);
    let renewed = leaser.renew(&a, t).await.unwrap();
    assert_eq!(renewed.expires_at, t + Duration::from_secs(100));
    assert_eq!(inner.leases().await.unwrap().leases, vec![renewed.clone()]);
    // Really gone: lost.
    inner.delete(&renewed).await.unwrap();
    let err = leaser.renew(&renewed, t).await.unwrap_err();
    assert!(matches!(err, LeaseError::Lost { .. }), "{err:?}");
}
