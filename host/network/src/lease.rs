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
mod tests;
