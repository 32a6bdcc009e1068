//! Subnet leases and the allocation logic: lease a free block for this host (preferring the block
//! it had before a restart), renew it before it expires, release it on clean shutdown (flannel's
//! `subnet.LocalManager`). A released lease keeps its record, marked expired, so the block is
//! among the last ones other hosts pick (see [`Leaser::release`]), until the store drops the
//! record (a day after its expiry: [`crate::DiscoverdStore::prune_after`]).

use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use crate::store::{LeaseStore, StoreError};
use crate::subnet::{Layout, Mac, Subnet};

/// One host's block of the cluster network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub subnet: Subnet,
    /// The host's underlay address: where VXLAN packets for this block are sent.
    pub public_ip: Ipv4Addr,
    /// The host's VXLAN device MAC, [`Mac::for_subnet`] of `subnet`.
    pub vtep_mac: Mac,
    pub expires_at: SystemTime,
    /// Store revision this copy was read or written at: the compare-and-swap token.
    pub revision: u64,
}

impl Lease {
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at <= now
    }
}

/// Why a lease could not be acquired, renewed or released.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease store")]
    Store(#[from] StoreError),
    #[error("no free subnet left in {network}")]
    Exhausted { network: Subnet },
    #[error("gave up after {attempts} conflicting attempts to lease a subnet")]
    Contention { attempts: u32 },
    /// The lease was changed or removed by someone else; acquire a new one.
    #[error("lease {subnet} is no longer ours")]
    Lost { subnet: Subnet },
}

/// Lease timing and allocation knobs.
#[derive(Debug, Clone)]
pub struct Config {
    pub layout: Layout,
    /// How long a lease is valid after being written.
    pub ttl: Duration,
    /// Renew this long before expiry.
    pub renew_margin: Duration,
    /// Compare-and-swap attempts before giving up.
    pub attempts: u32,
    /// Pick randomly among this many free blocks, so hosts starting together rarely collide.
    pub candidates: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            layout: Layout::default(),
            ttl: Duration::from_secs(24 * 3600),
            renew_margin: Duration::from_secs(3600),
            attempts: 10,
            candidates: 100,
        }
    }
}

/// Acquires and maintains this host's lease in a [`LeaseStore`].
#[derive(Debug)]
pub struct Leaser<S> {
    store: S,
    config: Config,
    public_ip: Ipv4Addr,
}

impl<S: LeaseStore> Leaser<S> {
    pub fn new(store: S, config: Config, public_ip: Ipv4Addr) -> Leaser<S> {
        Leaser {
            store,
            config,
            public_ip,
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Leases a block for this host: its own lease if the store still has one, else `previous`
    /// (the block it held before, e.g. from `subnet.env`) when that is free, else one picked
    /// randomly among the first free ones.
    pub async fn acquire(
        &self,
        now: SystemTime,
        previous: Option<Subnet>,
    ) -> Result<Lease, LeaseError> {
        self.acquire_with(now, previous, |n| fastrand::usize(..n))
            .await
    }

    /// [`Leaser::acquire`] with the choice among `n` free blocks made by `pick` (returns `< n`).
    ///
    /// A lease already recorded for this host's underlay IP is reused (renewed), so a restarted
    /// host keeps its block and MAC. Otherwise `previous` is taken when it is a block of the
    /// layout that no live lease overlaps: a host that released its lease on a clean shutdown
    /// gets the same block back on restart (flannel re-reads it from `subnet.env`), so its jobs
    /// and the host daemon's address allocator stay valid. Blocks never leased are preferred; a
    /// lease of another host counts as free only once it has been expired for longer than the
    /// renew margin (after a store outage every lease looks expired until its owner's next
    /// renewal, retried every 2 s), and is then taken over with a compare-and-swap on its
    /// revision; when only such blocks are free, one is picked among the older half of them
    /// (longest expired first, at most `candidates`).
    pub async fn acquire_with(
        &self,
        now: SystemTime,
        previous: Option<Subnet>,
        pick: impl FnMut(usize) -> usize,
    ) -> Result<Lease, LeaseError> {
        self.acquire_noting(now, previous, pick, &mut None).await
    }

    /// [`Leaser::acquire_with`], noting in `created` every block it writes a new lease of
    /// this host for (a record created, or an expired one of another host taken over), set
    /// before the write is sent: so a caller whose acquisition fails or is cut short (the
    /// write may have gone through, its answer lost) knows whether a lease it finds was made
    /// by this call or held before it. Reusing this host's lease (a renewal) notes nothing,
    /// and neither does leasing `previous` again when no other host's record is on it
    /// (released by this host's clean shutdown: the block its jobs may still use). This
    /// host's record that no longer holds its block (released, or expired for longer than
    /// the renew margin) counts as leased anew unless it is `previous`.
    pub async fn acquire_noting(
        &self,
        now: SystemTime,
        previous: Option<Subnet>,
        mut pick: impl FnMut(usize) -> usize,
        created: &mut Option<Subnet>,
    ) -> Result<Lease, LeaseError> {
        let layout = &self.config.layout;
        // Blocks whose create was refused although no lease we could read holds them (a
        // record that does not parse): not tried again.
        let mut refused: Vec<Subnet> = Vec::new();
        // A lease holds its block until it has been expired for longer than the renew margin.
        let holds = |l: &Lease| {
            l.expires_at
                .checked_add(self.config.renew_margin)
                .is_none_or(|t| t >= now)
        };
        for attempt in 1..=self.config.attempts {
            // Linearizable: taking a block over must not rest on a copy that lags.
            let snap = self.store.leases_consistent().await?;
            // The newest if there are several (one live, one released long ago).
            let mine = snap
                .leases
                .iter()
                .filter(|l| self.is_own(l))
                .max_by_key(|l| l.expires_at);
            // Only blocks of the layout hold blocks: a foreign or corrupt record (say
            // `0.0.0.0-0`) would otherwise overlap, and block, every one.
            let is_free = |b: &Subnet| {
                !refused.contains(b)
                    && !snap.leases.iter().any(|l| {
                        holds(l)
                            && l.subnet.prefix_len() == layout.subnet_len
                            && layout.network.contains_subnet(&l.subnet)
                            && overlaps(&l.subnet, b)
                    })
            };
            let again = previous.filter(|p| is_free(p) && layout.blocks().any(|b| b == *p));
            // A record of ours that no longer holds its block (released, or expired long ago)
            // gives way to the free block this host's state names.
            let mine = mine.filter(|m| holds(m) || again.is_none_or(|p| p == m.subnet));
            let result = if let Some(mine) = mine {
                // Such a record is leased anew, unless it is the block this host's state
                // names: then its jobs may use it, as for a live one.
                if !holds(mine) && previous != Some(mine.subnet) {
                    *created = Some(mine.subnet);
                }
                self.store.update(&self.refreshed(mine, now)).await
            } else {
                let subnet = match again {
                    Some(p) => p,
                    None => {
                        let n = self.config.candidates.max(1);
                        let mut free: Vec<Subnet> = layout
                            .blocks()
                            .filter(|b| is_free(b) && snap.get(b).is_none())
                            .take(n)
                            .collect();
                        if free.is_empty() {
                            free = longest_expired(
                                layout
                                    .blocks()
                                    .filter(is_free)
                                    .filter_map(|b| snap.get(&b).map(|l| (l.expires_at, b))),
                                n,
                            );
                        }
                        if free.is_empty() {
                            return Err(LeaseError::Exhausted {
                                network: layout.network,
                            });
                        }
                        free[pick(free.len()).min(free.len() - 1)]
                    }
                };
                let lease = Lease {
                    subnet,
                    public_ip: self.public_ip,
                    vtep_mac: Mac::for_subnet(&subnet),
                    expires_at: now + self.config.ttl,
                    revision: 0,
                };
                // This host's previous block (named in its state), free of any record of
                // another host, counts as held before, like a lease found in the store: the
                // host's jobs may still hold addresses in it, and a start that gives up keeps
                // it rather than hand it to others.
                let own_again = again.is_some()
                    && snap
                        .get(&subnet)
                        .is_none_or(|l| l.public_ip == self.public_ip);
                *created = (!own_again).then_some(subnet);
                match snap.get(&subnet) {
                    // An expired record: take it over at its revision.
                    Some(old) => {
                        self.store
                            .update(&Lease {
                                revision: old.revision,
                                ..lease
                            })
                            .await
                    }
                    None => {
                        let r = self.store.create(&lease).await;
                        if matches!(r, Err(StoreError::Conflict { .. })) {
                            refused.push(subnet);
                        }
                        r
                    }
                }
            };
            match result {
                Ok(lease) => {
                    tracing::info!(subnet = %lease.subnet, mac = %lease.vtep_mac, attempt, "subnet leased");
                    return Ok(lease);
                }
                Err(StoreError::Conflict { key } | StoreError::NotFound { key }) => {
                    tracing::debug!(%key, attempt, "lease collision, retrying");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(LeaseError::Contention {
            attempts: self.config.attempts,
        })
    }

    /// Whether `l` is this host's lease: its public IP, on a block of the layout.
    fn is_own(&self, l: &Lease) -> bool {
        let layout = &self.config.layout;
        l.public_ip == self.public_ip
            && l.subnet.prefix_len() == layout.subnet_len
            && layout.blocks().any(|b| b == l.subnet)
    }

    /// This host's lease as the store holds it now (linearizable read), the one
    /// [`Leaser::acquire`] would reuse: for a shutdown that cut an acquisition short, whose
    /// write may have gone through with its answer lost.
    ///
    /// A host can have several records (a block it released, kept with its expiry in the
    /// past, and the one it holds now): the live one is taken, else the newest, as
    /// [`Leaser::acquire`] does.
    pub async fn own(&self) -> Result<Option<Lease>, LeaseError> {
        let snap = self.store.leases_consistent().await?;
        Ok(snap
            .leases
            .into_iter()
            .filter(|l| self.is_own(l))
            .max_by_key(|l| l.expires_at))
    }

    /// When `lease` should be renewed.
    pub fn renew_at(&self, lease: &Lease) -> SystemTime {
        lease
            .expires_at
            .checked_sub(self.config.renew_margin)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// Extends `lease` to `now + ttl`. Fails with [`LeaseError::Lost`] when the record was changed
    /// or removed by someone else (its block may now belong to another host).
    ///
    /// A revision conflict alone does not mean the lease is lost: an earlier renewal may have been
    /// committed although its answer never arrived (the caller then retries with the old
    /// revision). Nor does a "not found" from a store node that lags. So on either the record is
    /// read again, linearizably, and while it still names this host's public IP for the same
    /// block its revision is adopted and the renewal repeated.
    pub async fn renew(&self, lease: &Lease, now: SystemTime) -> Result<Lease, LeaseError> {
        let lost = || LeaseError::Lost {
            subnet: lease.subnet,
        };
        let mut current = lease.clone();
        for attempt in 1..=self.config.attempts.max(1) {
            match self.store.update(&self.refreshed(&current, now)).await {
                Ok(l) => return Ok(l),
                // Lost only if a linearizable read agrees: the answer may come from a copy
                // that has not caught up with this host's own write.
                Err(StoreError::Conflict { key } | StoreError::NotFound { key }) => {
                    let snap = self.store.leases_consistent().await?;
                    match snap.get(&lease.subnet) {
                        Some(l) if l.public_ip == self.public_ip => {
                            tracing::debug!(%key, attempt, revision = l.revision, "lease record moved on but is still ours; renewing at its revision");
                            current.revision = l.revision;
                        }
                        _ => return Err(lost()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(LeaseError::Contention {
            attempts: self.config.attempts,
        })
    }

    /// Gives `lease` up at `now` (clean shutdown). A lease already gone or taken over is left
    /// alone.
    ///
    /// The record stays, marked released: its expiry is set to before `now` by more than the
    /// renew margin, so peers drop the block at once and it holds the block no longer, but
    /// other hosts take it only after every block never leased and every block that expired
    /// earlier ([`Leaser::acquire`]). Deleting it made the block look never leased, the first
    /// choice of the next host to join, while the releasing host's jobs might still use it.
    ///
    /// As in [`Leaser::renew`], a revision conflict may be this host's own renewal that was
    /// committed although its answer was lost: while the record still names this host's public
    /// IP for the block it is released at its current revision.
    pub async fn release(&self, lease: &Lease, now: SystemTime) -> Result<(), LeaseError> {
        let expired = now
            .checked_sub(self.config.renew_margin + Duration::from_secs(1))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut current = Lease {
            expires_at: expired,
            ..self.refreshed(lease, now)
        };
        for _ in 1..=self.config.attempts.max(1) {
            match self.store.update(&current).await {
                Ok(_) => return Ok(()),
                Err(StoreError::NotFound { .. }) => return Ok(()),
                Err(StoreError::Conflict { .. }) => {
                    match self.store.leases_consistent().await?.get(&lease.subnet) {
                        Some(l) if l.public_ip == self.public_ip => current.revision = l.revision,
                        Some(_) => {
                            tracing::warn!(subnet = %lease.subnet, "lease taken over by another host; not released");
                            return Ok(());
                        }
                        None => return Ok(()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(LeaseError::Contention {
            attempts: self.config.attempts,
        })
    }

    fn refreshed(&self, lease: &Lease, now: SystemTime) -> Lease {
        Lease {
            public_ip: self.public_ip,
            vtep_mac: Mac::for_subnet(&lease.subnet),
            expires_at: now + self.config.ttl,
            ..lease.clone()
        }
    }
}

/// The blocks to pick from when only expired ones (run out or released) are free, given as
/// (expiry, block): the older half of them, longest expired first, at most `n`. Picking at
/// random among several spreads hosts joining together over different blocks (one block
/// each made them all compare-and-swap on the same record); leaving out the newer half
/// keeps a block just released (its host may come back for it: `subnet.env`) or just run
/// out the last taken.
fn longest_expired(expired: impl Iterator<Item = (SystemTime, Subnet)>, n: usize) -> Vec<Subnet> {
    let mut expired: Vec<(SystemTime, Subnet)> = expired.collect();
    expired.sort();
    let older_half = expired.len().div_ceil(2);
    expired
        .into_iter()
        .take(older_half.min(n.max(1)))
        .map(|e| e.1)
        .collect()
}

fn overlaps(a: &Subnet, b: &Subnet) -> bool {
    a.contains_subnet(b) || b.contains_subnet(a)
}

#[cfg(test)]
mod tests {
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
}
