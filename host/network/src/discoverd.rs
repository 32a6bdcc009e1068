//! [`DiscoverdStore`]: subnet leases kept in discoverd, in the metadata of the `flannel` service
//! (spec §6), written with the metadata compare-and-swap (spec §2.4).
//!
//! The document is `{"config": {...}, "subnets": {"a.b.c.d-24": LeaseAttrs}}`. `LeaseAttrs` is
//! flannel's (`PublicIP`, `BackendType`, `BackendData.VtepMAC`) plus two fields flannel ignores:
//! `Expiration` (Unix seconds; a lease without one never expires, as in flannel) and `Revision`,
//! the per-lease compare-and-swap token. A write that read the document at index `n` stamps the
//! lease it changes with revision `n + 1`; every successful write consumes a distinct index, so a
//! revision is never reused, even after a delete and re-create.
//!
//! Every write reads the document, checks the lease-level condition and writes the whole document
//! back at the index it read. When another host wrote in between (discoverd answers 409/412) the
//! write is retried from a fresh read, a bounded number of times. Keys and fields this module does
//! not know are carried over untouched.
//!
//! Every write also tidies the document: records whose `Expiration` lies more than
//! [`DiscoverdStore::prune_after`] (at least a day) in the past are dropped, except the one
//! being written. Released leases keep their record (so their block is the last one taken) and
//! crashed hosts leave theirs; without pruning the document grew with every host that came and
//! went until discoverd refused it (its metadata limit is 512 KiB, some 3,000 records), and then
//! every renewal, acquisition and release failed. A document without a `config` (written again
//! by a write after it was deleted) gets the config in effect ([`DiscoverdStore::init`]'s).
//!
//! Writes, the config read and the checks behind "this lease is lost" read the document
//! linearizably (`?consistent=true`, served by the Raft leader); the lease set for routing is
//! read from the local node, which may lag. Once the document is known to exist, a 404 of a
//! plain read is a node that has not caught up: the store is unavailable, never "no leases".
//! A 404 of a linearizable read is the truth: the document is gone (deleted by an operator),
//! and the leases with it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use flynn_api::ErrorCode;
use flynn_client::discoverd::{Client, Error as ClientError, EventKind, ServiceMeta};
use serde_json::{json, Map, Value};
use tokio::sync::watch;

use crate::lease::Lease;
use crate::store::{LeaseStore, LeaseWatch, Snapshot, StoreError};
use crate::subnet::{Layout, Mac, Subnet};

/// The discoverd service whose metadata holds the leases.
pub const SERVICE: &str = "flannel";

/// How often a write is retried after losing the document-level compare-and-swap.
const WRITE_ATTEMPTS: u32 = 20;

/// Expiry reported for a lease that carries none (flannel writes none): never.
const NO_EXPIRY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The least time a lease record stays in the document after its expiry (see
/// [`DiscoverdStore::prune_after`]).
pub const PRUNE_AFTER: Duration = Duration::from_secs(24 * 3600);

/// [`LeaseStore`] backed by discoverd.
#[derive(Clone)]
pub struct DiscoverdStore {
    client: Client,
    service: String,
    /// Whether the document is known to exist (initialised, written or read here; shared by
    /// clones): from then on a 404 is no empty lease set.
    exists: Arc<AtomicBool>,
    /// The config in effect (what [`DiscoverdStore::init`] returned; shared by clones),
    /// written into a document that has none.
    config: Arc<Mutex<Option<Value>>>,
    /// Records expired for longer than this are dropped by every write.
    prune_after: Duration,
}

impl std::fmt::Debug for DiscoverdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscoverdStore")
            .field("service", &self.service)
            .finish()
    }
}

fn unavailable(e: ClientError) -> StoreError {
    StoreError::Unavailable {
        reason: format!("{e}"),
    }
}

/// Whether discoverd refused a metadata write because the document changed since it was read.
fn cas_lost(e: &ClientError) -> bool {
    e.api().is_some_and(|a| {
        matches!(
            a.code,
            ErrorCode::ObjectExists | ErrorCode::PreconditionFailed | ErrorCode::Conflict
        )
    })
}

fn not_found(e: &ClientError) -> bool {
    // A missing service or meta; another 404 (an unknown path) is an error.
    e.api().is_some_and(|a| a.code == ErrorCode::ObjectNotFound)
}

/// The lease in `attrs` stored under `key`, if both parse. The key must be the block's
/// own key (`a.b.c.d-len`, host bits clear): a key like `100.100.3.9-24` would otherwise
/// name, and shadow, the lease stored under `100.100.3.0-24`.
fn parse_lease(key: &str, attrs: &Value) -> Option<Lease> {
    let subnet: Subnet = key.parse().ok()?;
    if subnet.key() != key {
        return None;
    }
    let public_ip = attrs.get("PublicIP")?.as_str()?.parse().ok()?;
    let vtep_mac = attrs
        .get("BackendData")
        .and_then(|b| b.get("VtepMAC"))
        .and_then(Value::as_str)
        .and_then(|m| m.parse::<Mac>().ok())
        // A MAC no FDB entry can name (multicast, all zeros) would fail that peer's entry
        // on every reconcile: the derived one stands in, as for a missing one.
        .filter(Mac::is_unicast)
        .unwrap_or_else(|| Mac::for_subnet(&subnet));
    // An expiry past what `SystemTime` can hold (it came over the network) is "never".
    let expires_at = attrs
        .get("Expiration")
        .and_then(Value::as_u64)
        .and_then(|s| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(s)))
        .unwrap_or(SystemTime::UNIX_EPOCH + NO_EXPIRY);
    let revision = attrs.get("Revision").and_then(Value::as_u64).unwrap_or(0);
    Some(Lease {
        subnet,
        public_ip,
        vtep_mac,
        expires_at,
        revision,
    })
}

/// Every lease in a metadata document at `index`; entries that do not parse are skipped.
pub fn snapshot(data: &Value, index: u64) -> Snapshot {
    let mut leases: Vec<Lease> = data
        .get("subnets")
        .and_then(Value::as_object)
        .map(|subnets| {
            subnets
                .iter()
                .filter_map(|(k, v)| {
                    let l = parse_lease(k, v);
                    if l.is_none() {
                        tracing::warn!(key = %k, "skipping a lease record that does not parse");
                    }
                    l
                })
                .collect()
        })
        .unwrap_or_default();
    leases.sort_by_key(|l| l.subnet);
    Snapshot {
        revision: index,
        leases,
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Drops from `subnets` the records whose `Expiration` is more than `grace` before `now`,
/// except the one under `keep` (being written). A record without an expiry (flannel's:
/// never expires) stays. Returns how many were dropped.
fn prune(subnets: &mut Map<String, Value>, keep: &str, now: SystemTime, grace: Duration) -> usize {
    let Some(cutoff) = now.checked_sub(grace) else {
        return 0;
    };
    let cutoff = unix_secs(cutoff);
    let before = subnets.len();
    subnets.retain(|k, v| {
        k == keep
            || v.get("Expiration")
                .and_then(Value::as_u64)
                .is_none_or(|e| e >= cutoff)
    });
    before - subnets.len()
}

/// `lease` as stored: expiry truncated to whole seconds, revision `revision`.
fn stored(lease: &Lease, revision: u64) -> Lease {
    Lease {
        expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(unix_secs(lease.expires_at)),
        revision,
        ..lease.clone()
    }
}

/// Writes `lease`'s fields into `attrs`, keeping fields it does not own.
fn write_attrs(attrs: &mut Value, lease: &Lease) {
    if !attrs.is_object() {
        *attrs = Value::Object(Map::new());
    }
    let o = attrs.as_object_mut().expect("object");
    o.insert("PublicIP".into(), json!(lease.public_ip.to_string()));
    o.insert("BackendType".into(), json!("vxlan"));
    let data = o
        .entry("BackendData")
        .or_insert_with(|| Value::Object(Map::new()));
    if !data.is_object() {
        *data = Value::Object(Map::new());
    }
    data.as_object_mut()
        .expect("object")
        .insert("VtepMAC".into(), json!(lease.vtep_mac.to_string()));
    o.insert("Expiration".into(), json!(unix_secs(lease.expires_at)));
    o.insert("Revision".into(), json!(lease.revision));
}

/// flannel's `config` object for `layout`.
pub fn config_json(layout: &Layout, vni: u32, port: u16) -> Value {
    json!({
        "Network": layout.network.to_string(),
        "SubnetLen": layout.subnet_len,
        "SubnetMin": layout.subnet_min.to_string(),
        "SubnetMax": layout.subnet_max.to_string(),
        "Backend": {"Type": "vxlan", "VNI": vni, "Port": port},
    })
}

/// The [`Layout`] a stored `config` object describes (flannel's defaults for missing fields).
pub fn layout_from_config(config: &Value) -> Result<Layout, StoreError> {
    let bad = |reason: String| StoreError::Unavailable {
        reason: format!("invalid flannel config: {reason}"),
    };
    let network: Subnet = config
        .get("Network")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no Network".into()))?
        .parse()
        .map_err(|e| bad(format!("{e}")))?;
    let len = config
        .get("SubnetLen")
        .and_then(Value::as_u64)
        .and_then(|l| u8::try_from(l).ok());
    let mut layout = Layout::with_defaults(network, len).map_err(|e| bad(format!("{e}")))?;
    let ip = |k: &str| {
        config
            .get(k)
            .and_then(Value::as_str)
            .map(|s| {
                s.parse()
                    .map_err(|_| bad(format!("{k} {s:?} is not an address")))
            })
            .transpose()
    };
    if let Some(min) = ip("SubnetMin")? {
        layout.subnet_min = min;
    }
    if let Some(max) = ip("SubnetMax")? {
        layout.subnet_max = max;
    }
    layout.validate().map_err(|e| bad(format!("{e}")))?;
    Ok(layout)
}

impl DiscoverdStore {
    /// A store in service [`SERVICE`] of the discoverd at `client`.
    pub fn new(client: Client) -> DiscoverdStore {
        DiscoverdStore::with_service(client, SERVICE)
    }

    /// A store in another service (tests use one per test).
    pub fn with_service(client: Client, service: &str) -> DiscoverdStore {
        DiscoverdStore {
            client,
            service: service.to_string(),
            exists: Arc::new(AtomicBool::new(false)),
            config: Arc::new(Mutex::new(None)),
            prune_after: PRUNE_AFTER,
        }
    }

    /// Every write drops the records whose expiry lies more than `grace` in the past (never
    /// less than a day, the default; the agent passes its lease TTL): a block released or run
    /// out keeps its record that long, and is among the last ones a joining host takes
    /// meanwhile ([`crate::Leaser::acquire`]). Live records, and the one being written, are
    /// never dropped.
    pub fn prune_after(mut self, grace: Duration) -> DiscoverdStore {
        self.prune_after = grace.max(PRUNE_AFTER);
        self
    }

    /// The discoverd service holding the leases.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Registers the service (if needed) and writes `config` as the cluster's network config when
    /// none is stored yet (index 0, "already exists" ignored, as flannel's wrapper does). Returns
    /// the config in effect, which is the stored one when another host was first.
    pub async fn init(&self, config: Value) -> Result<Value, StoreError> {
        match self.client.add_service(&self.service, "oldest").await {
            Ok(()) => {}
            Err(e) if cas_lost(&e) => {}
            Err(e) => return Err(unavailable(e)),
        }
        let meta = ServiceMeta {
            data: json!({ "config": config, "subnets": {} }),
            leader_id: None,
            index: 0,
        };
        match self.client.set_meta(&self.service, &meta).await {
            Ok(_) => {}
            Err(e) if cas_lost(&e) => {}
            Err(e) => return Err(unavailable(e)),
        }
        // Written now, or by another host before: the stored config is read from the leader
        // (the local node may not have it yet), never replaced by this host's flags.
        self.exists.store(true, Ordering::Relaxed);
        let (data, _) = self.read(true).await?;
        let config = match data.get("config") {
            Some(c) if !c.is_null() => c.clone(),
            _ => config,
        };
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = Some(config.clone());
        Ok(config)
    }

    /// The document and its index, from the leader when `consistent`, else from the local
    /// node; an empty document at index 0 when there is none yet. A 404 from the local node
    /// once the document is known to exist is [`StoreError::Unavailable`] (the node may lag);
    /// one from the leader means it is gone, and reads as none.
    async fn read(&self, consistent: bool) -> Result<(Value, u64), StoreError> {
        let meta = if consistent {
            self.client.get_meta_consistent(&self.service).await
        } else {
            self.client.get_meta(&self.service).await
        };
        match meta {
            Ok(m) => {
                self.exists.store(true, Ordering::Relaxed);
                Ok((m.data, m.index))
            }
            Err(e) if not_found(&e) && !self.exists.load(Ordering::Relaxed) => Ok((Value::Null, 0)),
            // The leader's answer, after a ReadIndex round: the document is gone (an operator
            // deleted the service or its metadata). Read as empty from now on: a renewal then
            // finds its record gone, the lease lost (the agent exits, and its next start
            // writes the document again), where it used to fail as "unavailable" until the
            // agent was restarted.
            Err(e) if not_found(&e) && consistent => {
                if self.exists.swap(false, Ordering::Relaxed) {
                    tracing::warn!(service = %self.service, "the lease document is gone");
                }
                Ok((Value::Null, 0))
            }
            Err(e) if not_found(&e) => Err(StoreError::Unavailable {
                reason: format!(
                    "the {:?} lease document is missing on the node read (not caught up?)",
                    self.service
                ),
            }),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Read-modify-write of the document. `change` returns the result to hand back once the write
    /// lands, or the error that ends the attempt without writing.
    async fn modify<T>(
        &self,
        key: &str,
        mut change: impl FnMut(&mut Map<String, Value>, u64) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        for attempt in 1..=WRITE_ATTEMPTS {
            let (mut data, index) = self.read(true).await?;
            if !data.is_object() {
                data = json!({});
            }
            let doc = data.as_object_mut().expect("object");
            let subnets = doc
                .entry("subnets")
                .or_insert_with(|| Value::Object(Map::new()));
            if !subnets.is_object() {
                *subnets = Value::Object(Map::new());
            }
            let subnets = subnets.as_object_mut().expect("object");
            let out = change(subnets, index + 1)?;
            let pruned = prune(subnets, key, SystemTime::now(), self.prune_after);
            if pruned > 0 {
                tracing::info!(pruned, grace = ?self.prune_after, "dropping lease records expired long ago");
            }
            // Written again after it was deleted (a linearizable 404): without this every
            // agent's `init` fell back to its own flags from then on.
            if doc.get("config").is_none_or(Value::is_null) {
                if let Some(c) = self
                    .config
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                {
                    tracing::info!("the lease document has no config; writing the one in effect");
                    doc.insert("config".into(), c);
                }
            }
            let meta = ServiceMeta {
                data,
                leader_id: None,
                index,
            };
            if index == 0 {
                // The service must exist before its metadata can be created.
                match self.client.add_service(&self.service, "oldest").await {
                    Err(e) if !cas_lost(&e) => return Err(unavailable(e)),
                    _ => {}
                }
            }
            match self.client.set_meta(&self.service, &meta).await {
                Ok(_) => {
                    self.exists.store(true, Ordering::Relaxed);
                    return Ok(out);
                }
                Err(e) if cas_lost(&e) => {
                    tracing::debug!(key, attempt, "lease document changed meanwhile; retrying");
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(5..50))).await;
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(StoreError::Unavailable {
            reason: format!("lease document kept changing ({WRITE_ATTEMPTS} attempts)"),
        })
    }

    /// Checks that the stored record for `lease` exists at `lease.revision`.
    fn check(subnets: &Map<String, Value>, lease: &Lease) -> Result<(), StoreError> {
        let key = lease.subnet.key();
        let cur = subnets
            .get(&key)
            .ok_or_else(|| StoreError::NotFound { key: key.clone() })?;
        let rev = cur.get("Revision").and_then(Value::as_u64).unwrap_or(0);
        if rev != lease.revision {
            return Err(StoreError::Conflict { key });
        }
        Ok(())
    }
}

impl LeaseStore for DiscoverdStore {
    async fn leases(&self) -> Result<Snapshot, StoreError> {
        let (data, index) = self.read(false).await?;
        Ok(snapshot(&data, index))
    }

    async fn leases_consistent(&self) -> Result<Snapshot, StoreError> {
        let (data, index) = self.read(true).await?;
        Ok(snapshot(&data, index))
    }

    async fn create(&self, lease: &Lease) -> Result<Lease, StoreError> {
        let key = lease.subnet.key();
        self.modify(&key, |subnets, rev| {
            if subnets.contains_key(&key) {
                return Err(StoreError::Conflict { key: key.clone() });
            }
            let l = stored(lease, rev);
            let mut attrs = Value::Null;
            write_attrs(&mut attrs, &l);
            subnets.insert(key.clone(), attrs);
            Ok(l)
        })
        .await
    }

    async fn update(&self, lease: &Lease) -> Result<Lease, StoreError> {
        let key = lease.subnet.key();
        self.modify(&key, |subnets, rev| {
            DiscoverdStore::check(subnets, lease)?;
            let l = stored(lease, rev);
            write_attrs(subnets.get_mut(&key).expect("checked"), &l);
            Ok(l)
        })
        .await
    }

    async fn delete(&self, lease: &Lease) -> Result<(), StoreError> {
        let key = lease.subnet.key();
        self.modify(&key, |subnets, _| {
            DiscoverdStore::check(subnets, lease)?;
            subnets.remove(&key);
            Ok(())
        })
        .await
    }

    /// Follows the service's `service_meta` events with the client's resuming watch; the task
    /// ends when every [`LeaseWatch`] is dropped.
    async fn watch(&self) -> Result<LeaseWatch, StoreError> {
        let first = self.leases().await?;
        let (tx, rx) = watch::channel(Arc::new(first));
        let mut events = self.client.watch(&self.service);
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = tx.closed() => return,
                    ev = events.next() => ev,
                };
                let Some(ev) = ev else { return };
                if ev.kind != EventKind::ServiceMeta {
                    continue;
                }
                let Some(meta) = ev.service_meta else {
                    continue;
                };
                let snap = snapshot(&meta.data, meta.index);
                // Skip replays of what the receiver already has.
                let known = **tx.borrow() == snap;
                if !known {
                    tx.send_replace(Arc::new(snap));
                }
            }
        });
        Ok(LeaseWatch::new(rx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn attrs_round_trip_and_foreign_fields_survive() {
        let subnet: Subnet = "100.100.3.0/24".parse().unwrap();
        let lease = Lease {
            subnet,
            public_ip: Ipv4Addr::new(10, 0, 0, 3),
            vtep_mac: Mac::for_subnet(&subnet),
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_millis(5_500),
            revision: 7,
        };
        let mut attrs = json!({"HTTPPort": "5001", "BackendData": {"Other": 1}});
        let s = stored(&lease, 7);
        write_attrs(&mut attrs, &s);
        assert_eq!(attrs["HTTPPort"], "5001");
        assert_eq!(attrs["BackendData"]["Other"], 1);
        assert_eq!(attrs["BackendData"]["VtepMAC"], "0e:66:64:64:03:00");
        assert_eq!(attrs["Expiration"], 5);
        assert_eq!(parse_lease(&subnet.key(), &attrs), Some(s));
    }

    #[test]
    fn flannel_written_lease_parses_and_never_expires() {
        let attrs = json!({"PublicIP": "10.0.0.9", "BackendType": "vxlan",
            "BackendData": {"VtepMAC": "aa:bb:cc:dd:ee:ff"}});
        let l = parse_lease("100.100.9.0-24", &attrs).unwrap();
        assert_eq!(l.vtep_mac.to_string(), "aa:bb:cc:dd:ee:ff");
        assert_eq!(l.revision, 0);
        assert!(!l.is_expired(SystemTime::now() + Duration::from_secs(10 * 365 * 24 * 3600)));
        // An expiry too large for the clock is "never", not a panic.
        let huge = json!({"PublicIP": "10.0.0.9", "Expiration": u64::MAX});
        let l = parse_lease("100.100.9.0-24", &huge).unwrap();
        assert!(!l.is_expired(SystemTime::now() + Duration::from_secs(10 * 365 * 24 * 3600)));
        let doc = json!({"subnets": {"100.100.9.0-24": attrs, "junk": {}, "100.100.1.0-24": 3}});
        let snap = snapshot(&doc, 12);
        assert_eq!((snap.revision, snap.leases.len()), (12, 1));
    }

    #[test]
    fn a_vtep_mac_no_fdb_entry_can_name_gives_way_to_the_derived_one() {
        let subnet: Subnet = "100.100.9.0/24".parse().unwrap();
        for bad in [
            "00:00:00:00:00:00",
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
        ] {
            let attrs = json!({"PublicIP": "10.0.0.9", "BackendData": {"VtepMAC": bad}});
            let l = parse_lease("100.100.9.0-24", &attrs).unwrap();
            assert_eq!(l.vtep_mac, Mac::for_subnet(&subnet), "{bad}");
        }
        assert!(Mac::for_subnet(&subnet).is_unicast());
    }

    #[test]
    fn only_a_blocks_own_key_holds_its_lease() {
        // Other spellings of 100.100.9.0/24 would shadow the real lease (the fuzz target
        // found `-024`); they are skipped, so the block has one lease, from its own key.
        let real = json!({"PublicIP": "10.0.0.9"});
        let doc = json!({"subnets": {
            "100.100.9.0-24": real,
            "100.100.9.7-24": {"PublicIP": "10.0.0.66"},
            "100.100.9.0-024": {"PublicIP": "10.0.0.66"},
            "100.100.9.0/24": {"PublicIP": "10.0.0.66"},
        }});
        let snap = snapshot(&doc, 3);
        assert_eq!(snap.leases.len(), 1);
        assert_eq!(snap.leases[0].public_ip, Ipv4Addr::new(10, 0, 0, 9));
    }

    #[test]
    fn config_round_trips_to_a_layout() {
        let layout = Layout::with_defaults("10.50.0.0/16".parse().unwrap(), Some(24)).unwrap();
        let cfg = config_json(&layout, 1, 8472);
        assert_eq!(layout_from_config(&cfg).unwrap(), layout);
        let flannel = json!({"Network": "100.100.0.0/16", "Backend": {"Type": "vxlan"}});
        assert_eq!(layout_from_config(&flannel).unwrap(), Layout::default());
        assert!(layout_from_config(&json!({"Network": "nope"})).is_err());
    }

    /// A discoverd stand-in: one service's metadata with discoverd's compare-and-swap, read
    /// linearizably with `?consistent=true`; while `lagging`, plain reads answer 404 as a
    /// follower would that has not caught up with the service's metadata yet.
    #[derive(Default)]
    struct Fake {
        meta: std::sync::Mutex<Option<ServiceMeta>>,
        lagging: AtomicBool,
    }

    async fn fake() -> (Arc<Fake>, DiscoverdStore) {
        use axum::extract::{Path, State};
        use axum::http::{StatusCode, Uri};
        use axum::response::{IntoResponse, Response};
        use flynn_api::ApiError;

        fn error(e: ApiError) -> Response {
            let status = StatusCode::from_u16(e.status()).expect("status");
            (status, axum::Json(e)).into_response()
        }
        async fn get(State(f): State<Arc<Fake>>, uri: Uri) -> Response {
            let consistent = uri.query() == Some("consistent=true");
            match f.meta.lock().unwrap().clone() {
                Some(m) if consistent || !f.lagging.load(Ordering::SeqCst) => {
                    axum::Json(m).into_response()
                }
                _ => error(ApiError::object_not_found("service meta not found")),
            }
        }
        async fn put(
            State(f): State<Arc<Fake>>,
            axum::Json(new): axum::Json<ServiceMeta>,
        ) -> Response {
            let mut cur = f.meta.lock().unwrap();
            let index = cur.as_ref().map_or(0, |m| m.index);
            if new.index == 0 && cur.is_some() {
                return error(ApiError::new(ErrorCode::ObjectExists, "meta exists"));
            }
            if new.index != index {
                return error(ApiError::new(ErrorCode::PreconditionFailed, "index moved"));
            }
            let stored = ServiceMeta {
                index: index + 1,
                ..new
            };
            *cur = Some(stored.clone());
            axum::Json(stored).into_response()
        }
        let f = Arc::new(Fake::default());
        let app = axum::Router::new()
            .route(
                "/services/{s}",
                axum::routing::put(|_: Path<String>| async {}),
            )
            .route("/services/{s}/meta", axum::routing::get(get).put(put))
            .with_state(f.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (f, DiscoverdStore::new(Client::new(&url)))
    }

    fn lease(subnet: &str, last: u8) -> Lease {
        let subnet: Subnet = subnet.parse().unwrap();
        Lease {
            subnet,
            public_ip: Ipv4Addr::new(10, 0, 0, last),
            vtep_mac: Mac::for_subnet(&subnet),
            expires_at: SystemTime::now() + Duration::from_secs(3600),
            revision: 0,
        }
    }

    /// A 404 from a node that lags, once the network is set up, is no empty lease set:
    /// taken as one, the agent removed every peer's routes and fast-path prefixes.
    #[tokio::test]
    async fn a_404_from_a_lagging_node_is_unavailable_not_an_empty_lease_set() {
        let (f, store) = fake().await;
        store
            .init(config_json(&Layout::default(), 1, 8472))
            .await
            .unwrap();
        store.create(&lease("100.100.1.0/24", 1)).await.unwrap();
        store.create(&lease("100.100.2.0/24", 2)).await.unwrap();
        assert_eq!(store.leases().await.unwrap().leases.len(), 2);
        f.lagging.store(true, Ordering::SeqCst);
        let r = store.leases().await;
        assert!(matches!(r, Err(StoreError::Unavailable { .. })), "{r:?}");
        assert!(store.watch().await.is_err());
        // Writes read from the leader: they go on.
        store.create(&lease("100.100.3.0/24", 3)).await.unwrap();
        assert_eq!(store.leases_consistent().await.unwrap().leases.len(), 3);
    }

    /// The stored config wins over this host's flags even when the local node has not
    /// caught up with it.
    #[tokio::test]
    async fn init_returns_the_stored_config_when_the_local_node_lags() {
        let (f, store) = fake().await;
        let first = Layout::with_defaults("10.60.0.0/16".parse().unwrap(), Some(24)).unwrap();
        let stored = store.init(config_json(&first, 1, 8472)).await.unwrap();
        f.lagging.store(true, Ordering::SeqCst);
        // Another host starting with other flags.
        let other_host = DiscoverdStore::with_service(store.client.clone(), SERVICE);
        let cfg = other_host
            .init(config_json(&Layout::default(), 1, 8472))
            .await
            .unwrap();
        assert_eq!(cfg, stored);
        assert_eq!(layout_from_config(&cfg).unwrap(), first);
    }

    /// The lease document deleted (an operator's reset of the service): the leader's 404 is
    /// the truth, so a renewal finds the lease lost, and the agent exits; its next start
    /// (`init`, then `acquire`) writes the config and its lease again. Every 404 used to read
    /// as "unavailable" once the document had been seen, and renewals failed until a restart.
    #[tokio::test]
    async fn a_deleted_lease_document_loses_the_lease_and_is_written_again() {
        let (f, store) = fake().await;
        let config = config_json(&Layout::default(), 1, 8472);
        store.init(config.clone()).await.unwrap();
        let leaser = crate::Leaser::new(
            store.clone(),
            crate::LeaseConfig::default(),
            Ipv4Addr::new(10, 0, 0, 1),
        );
        let a = leaser.acquire(SystemTime::now(), None).await.unwrap();
        *f.meta.lock().unwrap() = None;
        let later = SystemTime::now() + Duration::from_secs(60);
        let r = leaser.renew(&a, later).await;
        assert!(matches!(r, Err(crate::LeaseError::Lost { .. })), "{r:?}");
        // The restarted agent.
        let store = DiscoverdStore::with_service(store.client.clone(), SERVICE);
        assert_eq!(store.init(config.clone()).await.unwrap(), config);
        let leaser = crate::Leaser::new(
            store.clone(),
            crate::LeaseConfig::default(),
            Ipv4Addr::new(10, 0, 0, 1),
        );
        let b = leaser.acquire(later, Some(a.subnet)).await.unwrap();
        assert_eq!(b.subnet, a.subnet);
        let stored = f.meta.lock().unwrap().clone().unwrap();
        assert_eq!(stored.data["config"], config);
    }

    fn unix_now() -> u64 {
        unix_secs(SystemTime::now())
    }

    /// Records expired for longer than the grace (released long ago, or left by crashed
    /// hosts) are dropped when the document is written; recent ones, live ones, flannel's
    /// (no expiry) and the one being written stay. Nothing was ever dropped, so the document
    /// grew with every host that came and went until discoverd refused it (512 KiB, some
    /// 3,000 records), and every renewal, acquisition and release failed from then on.
    #[tokio::test]
    async fn a_write_drops_records_expired_long_ago() {
        let (f, store) = fake().await;
        store
            .init(config_json(&Layout::default(), 1, 8472))
            .await
            .unwrap();
        let day = 24 * 3600;
        let now = unix_now();
        let record = |ip: &str, exp: Option<u64>| {
            let mut v = json!({"PublicIP": ip, "BackendType": "vxlan", "Revision": 1});
            if let Some(e) = exp {
                v["Expiration"] = json!(e);
            }
            v
        };
        {
            let mut meta = f.meta.lock().unwrap();
            let subnets = meta.as_mut().unwrap().data["subnets"]
                .as_object_mut()
                .unwrap();
            // 3,000 hosts gone two days ago (10.0.x.y, blocks in 10.x.y.0/24 outside the
            // layout: the store keeps whatever records the document has).
            for i in 0..3000u32 {
                let [_, _, a, b] = i.to_be_bytes();
                subnets.insert(
                    format!("10.{a}.{b}.0-24"),
                    record(&format!("10.0.{a}.{b}"), Some(now - 2 * day)),
                );
            }
            // Released an hour ago, just short of a day ago, live, flannel's.
            subnets.insert(
                "100.100.5.0-24".into(),
                record("10.1.0.5", Some(now - 3600)),
            );
            subnets.insert(
                "100.100.6.0-24".into(),
                record("10.1.0.6", Some(now - day + 60)),
            );
            subnets.insert(
                "100.100.7.0-24".into(),
                record("10.1.0.7", Some(now + 3600)),
            );
            subnets.insert("100.100.8.0-24".into(), record("10.1.0.8", None));
            // This host's, expired two days ago: being renewed, it stays.
            subnets.insert(
                "100.100.9.0-24".into(),
                record("10.0.0.9", Some(now - 2 * day)),
            );
        }
        let before = serde_json::to_vec(&f.meta.lock().unwrap().as_ref().unwrap().data)
            .unwrap()
            .len();
        assert!(before > 200_000, "{before} bytes");
        let mine = Lease {
            revision: 1,
            ..lease("100.100.9.0/24", 9)
        };
        store.update(&mine).await.unwrap();
        let doc = f.meta.lock().unwrap().clone().unwrap().data;
        let keys: Vec<&str> = doc["subnets"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "100.100.5.0-24",
                "100.100.6.0-24",
                "100.100.7.0-24",
                "100.100.8.0-24",
                "100.100.9.0-24"
            ]
        );
        assert!(doc["config"].is_object(), "{doc}");
        // A longer grace (the agent's lease TTL) keeps them longer; never less than a day.
        let store = store.prune_after(Duration::from_secs(3 * day));
        assert_eq!(store.prune_after, Duration::from_secs(3 * day));
        assert_eq!(
            store.prune_after(Duration::from_secs(3)).prune_after,
            PRUNE_AFTER
        );
    }

    /// The document deleted, an agent still starting (its start retried) writes its lease
    /// into a new one: with the config in effect, which it used to leave out, so every
    /// agent's `init` fell back to its own flags from then on.
    #[tokio::test]
    async fn a_document_written_again_gets_the_config() {
        let (f, store) = fake().await;
        let first = Layout::with_defaults("10.60.0.0/16".parse().unwrap(), Some(24)).unwrap();
        let config = store.init(config_json(&first, 1, 8472)).await.unwrap();
        *f.meta.lock().unwrap() = None;
        let leaser = crate::Leaser::new(
            store.clone(),
            crate::LeaseConfig {
                layout: first,
                ..crate::LeaseConfig::default()
            },
            Ipv4Addr::new(10, 0, 0, 1),
        );
        leaser.acquire(SystemTime::now(), None).await.unwrap();
        let stored = f.meta.lock().unwrap().clone().unwrap();
        assert_eq!(stored.data["config"], config);
        // Another host starting with other flags gets the cluster's config.
        let other = DiscoverdStore::with_service(store.client.clone(), SERVICE);
        let cfg = other
            .init(config_json(&Layout::default(), 1, 8472))
            .await
            .unwrap();
        assert_eq!(layout_from_config(&cfg).unwrap(), first);
    }

    /// A lease created a moment ago, renewed through a node that has not seen it yet: still
    /// this host's (the agent used to exit with "lost" right after creating its lease).
    #[tokio::test]
    async fn renewal_through_a_lagging_node_is_not_lost() {
        let (f, store) = fake().await;
        store
            .init(config_json(&Layout::default(), 1, 8472))
            .await
            .unwrap();
        let leaser = crate::Leaser::new(
            store.clone(),
            crate::LeaseConfig::default(),
            Ipv4Addr::new(10, 0, 0, 1),
        );
        let a = leaser.acquire(SystemTime::now(), None).await.unwrap();
        f.lagging.store(true, Ordering::SeqCst);
        let later = SystemTime::now() + Duration::from_secs(60);
        let renewed = leaser.renew(&a, later).await.unwrap();
        assert_eq!(renewed.subnet, a.subnet);
        assert!(renewed.revision > a.revision);
    }
}
