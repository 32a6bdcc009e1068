//! Where subnet leases live: the [`LeaseStore`] trait and an in-memory implementation.
//!
//! Every write is a compare-and-swap on the lease's `revision`, the way discoverd's service metadata
//! is written (spec §2.4, §6). [`crate::DiscoverdStore`] keeps them in discoverd; [`MemoryStore`] is
//! used by tests and single-host setups.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::watch;

use crate::lease::Lease;
use crate::subnet::Subnet;

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A compare-and-swap lost: the record exists (create) or its revision moved on (update/delete).
    #[error("lease {key} was changed concurrently")]
    Conflict { key: String },
    /// The record to update or delete does not exist.
    #[error("lease {key} does not exist")]
    NotFound { key: String },
    /// The backing service could not be reached or answered badly; retryable.
    #[error("lease store unavailable: {reason}")]
    Unavailable { reason: String },
}

/// All leases at one store revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Store-wide revision: bumped by every write.
    pub revision: u64,
    pub leases: Vec<Lease>,
}

impl Snapshot {
    /// Leases that have not expired at `now`.
    pub fn live(&self, now: SystemTime) -> impl Iterator<Item = &Lease> {
        self.leases.iter().filter(move |l| !l.is_expired(now))
    }

    /// The record for `subnet`, expired or not.
    pub fn get(&self, subnet: &Subnet) -> Option<&Lease> {
        self.leases.iter().find(|l| l.subnet == *subnet)
    }
}

/// A stream of whole snapshots; a slow reader skips intermediate ones (it only needs the latest to
/// reconcile).
#[derive(Debug, Clone)]
pub struct LeaseWatch {
    rx: watch::Receiver<Arc<Snapshot>>,
}

impl LeaseWatch {
    pub fn new(rx: watch::Receiver<Arc<Snapshot>>) -> LeaseWatch {
        LeaseWatch { rx }
    }

    /// The latest snapshot, marking it seen.
    pub fn current(&mut self) -> Arc<Snapshot> {
        self.rx.borrow_and_update().clone()
    }

    /// Waits for a snapshot newer than the last one seen; `None` once the store is gone.
    pub async fn changed(&mut self) -> Option<Arc<Snapshot>> {
        self.rx.changed().await.ok()?;
        Some(self.current())
    }
}

/// Storage of subnet leases with compare-and-swap writes.
///
/// `revision` on a [`Lease`] is the CAS token: `create` requires that no record exists for the
/// subnet, `update` and `delete` require the stored revision to equal the given one. Successful
/// writes return the lease with its new revision.
pub trait LeaseStore: Send + Sync {
    fn leases(&self) -> impl Future<Output = Result<Snapshot, StoreError>> + Send;
    /// [`LeaseStore::leases`] as a linearizable read: it reflects every write acknowledged
    /// before the call. What decisions about ownership rest on (`leases` may be served from a
    /// lagging copy); a store whose reads are always current keeps this default.
    fn leases_consistent(&self) -> impl Future<Output = Result<Snapshot, StoreError>> + Send {
        self.leases()
    }
    fn create(&self, lease: &Lease) -> impl Future<Output = Result<Lease, StoreError>> + Send;
    fn update(&self, lease: &Lease) -> impl Future<Output = Result<Lease, StoreError>> + Send;
    fn delete(&self, lease: &Lease) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn watch(&self) -> impl Future<Output = Result<LeaseWatch, StoreError>> + Send;
}

#[derive(Debug, Default)]
struct State {
    revision: u64,
    leases: BTreeMap<Subnet, Lease>,
}

impl State {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            revision: self.revision,
            leases: self.leases.values().cloned().collect(),
        }
    }
}

/// In-memory [`LeaseStore`]; clones share the same data (like several hosts talking to one
/// discoverd).
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    tx: watch::Sender<Arc<Snapshot>>,
}

impl Default for MemoryStore {
    fn default() -> MemoryStore {
        MemoryStore::new()
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        MemoryStore {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                tx,
            }),
        }
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&mut State, u64) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let next = state.revision + 1;
        let out = f(&mut state, next)?;
        state.revision = next;
        self.inner.tx.send_replace(Arc::new(state.snapshot()));
        Ok(out)
    }

    fn check(state: &State, lease: &Lease) -> Result<(), StoreError> {
        match state.leases.get(&lease.subnet) {
            None => Err(StoreError::NotFound {
                key: lease.subnet.key(),
            }),
            Some(cur) if cur.revision != lease.revision => Err(StoreError::Conflict {
                key: lease.subnet.key(),
            }),
            Some(_) => Ok(()),
        }
    }
}

impl LeaseStore for MemoryStore {
    async fn leases(&self) -> Result<Snapshot, StoreError> {
        let state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        Ok(state.snapshot())
    }

    async fn create(&self, lease: &Lease) -> Result<Lease, StoreError> {
        self.write(|state, rev| {
            if state.leases.contains_key(&lease.subnet) {
                return Err(StoreError::Conflict {
                    key: lease.subnet.key(),
                });
            }
            let stored = Lease {
                revision: rev,
                ..lease.clone()
            };
            state.leases.insert(lease.subnet, stored.clone());
            Ok(stored)
        })
    }

    async fn update(&self, lease: &Lease) -> Result<Lease, StoreError> {
        self.write(|state, rev| {
            MemoryStore::check(state, lease)?;
            let stored = Lease {
                revision: rev,
                ..lease.clone()
            };
            state.leases.insert(lease.subnet, stored.clone());
            Ok(stored)
        })
    }

    async fn delete(&self, lease: &Lease) -> Result<(), StoreError> {
        self.write(|state, _| {
            MemoryStore::check(state, lease)?;
            state.leases.remove(&lease.subnet);
            Ok(())
        })
    }

    async fn watch(&self) -> Result<LeaseWatch, StoreError> {
        Ok(LeaseWatch::new(self.inner.tx.subscribe()))
    }
}

/// Behaviour every [`LeaseStore`] must have; run it against each implementation (the discoverd
/// store's integration test runs it too, hence public).
#[doc(hidden)]
pub mod conformance {
    use super::*;
    use crate::subnet::Mac;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn lease(subnet: &str, ip: [u8; 4]) -> Lease {
        let subnet: Subnet = subnet.parse().unwrap();
        Lease {
            subnet,
            public_ip: Ipv4Addr::from(ip),
            vtep_mac: Mac::for_subnet(&subnet),
            // Live (a store may drop records expired long ago: `DiscoverdStore::prune_after`).
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000),
            revision: 0,
        }
    }

    pub async fn suite<S: LeaseStore>(store: S) {
        let mut watch = store.watch().await.unwrap();
        let a = store
            .create(&lease("100.100.1.0/24", [10, 0, 0, 1]))
            .await
            .unwrap();
        assert!(a.revision > 0);
        // Create is exclusive.
        let dup = store.create(&lease("100.100.1.0/24", [10, 0, 0, 2])).await;
        assert!(matches!(dup, Err(StoreError::Conflict { .. })), "{dup:?}");
        // The watcher sees the new lease.
        let snap = watch.changed().await.unwrap();
        assert_eq!(snap.leases, vec![a.clone()]);

        // Update is CAS on revision.
        let mut renewed = a.clone();
        renewed.expires_at += Duration::from_secs(60);
        let renewed = store.update(&renewed).await.unwrap();
        assert!(renewed.revision > a.revision);
        let stale = store.update(&a).await;
        assert!(
            matches!(stale, Err(StoreError::Conflict { .. })),
            "{stale:?}"
        );
        assert!(matches!(
            store.delete(&a).await,
            Err(StoreError::Conflict { .. })
        ));

        let b = store
            .create(&lease("100.100.2.0/24", [10, 0, 0, 2]))
            .await
            .unwrap();
        let snap = store.leases().await.unwrap();
        assert_eq!(snap.leases.len(), 2);
        assert_eq!(snap.get(&b.subnet), Some(&b));

        store.delete(&renewed).await.unwrap();
        let gone = store.update(&renewed).await;
        assert!(matches!(gone, Err(StoreError::NotFound { .. })), "{gone:?}");
        assert_eq!(store.leases().await.unwrap().leases, vec![b]);
        let snap = watch.changed().await.unwrap();
        assert_eq!(snap.leases.len(), 1);
    }

    #[cfg(test)]
    #[tokio::test]
    async fn memory_store_conforms() {
        suite(MemoryStore::new()).await;
    }
}
