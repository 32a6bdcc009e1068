//! The registry state machine: services, instances, metadata and leaders, plus the
//! watchers it notifies. Pure: commands in, state and events out; no I/O, no clock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::types::{
    Command, Event, EventKind, Instance, Kinds, LeaderType, Rejection, Response, ServiceConfig,
    ServiceMeta,
};

/// Unread events per subscriber (besides its replay) before it is dropped (spec §2.5). A
/// subscriber under the bound takes a command's events whole, however many: one removal or
/// expiry of many instances is not a reason to drop a watcher that keeps up.
pub const SUBSCRIBER_BUFFER: usize = 64;
/// The error a lagging subscriber's stream ends with.
pub const BLOCKED_RECEIVER: &str = "discoverd: channel send failed due to blocked receiver";

/// The error a watch ends with when a snapshot replaces the state.
pub const RESTORED: &str = "discoverd: state replaced by a snapshot, resubscribe";
/// Ends the watches of a node that stops following the cluster: removed from the peers,
/// or shut down. Its state no longer changes, so a watch on it would go quiet for good.
pub const LEFT: &str = "discoverd: this node no longer follows the cluster, resubscribe";

/// What a watcher receives: an event, or the error that ends its stream.
pub type Item = Result<Event, String>;

/// The replicated data; this is also the snapshot format
/// (`{services, metas, leaders, instances}`, spec §2.7).
///
/// Each service's instances and each meta sit behind an `Arc` (copy-on-write, see
/// [`Registry::instances_mut`]), so a clone costs one small allocation per service and no
/// instance: a snapshot clones the data under the state's lock and serializes the clone
/// after releasing it (200k instances: serializing took the lock for ~100 ms in a release
/// build, cloning them whole ~400 ms). An apply while that clone is alive copies only the
/// one service it changes. The JSON is the same as without the `Arc`s.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Data {
    pub services: BTreeMap<String, ServiceConfig>,
    pub metas: BTreeMap<String, Arc<ServiceMeta>>,
    /// Manually set leader ids.
    pub leaders: BTreeMap<String, String>,
    /// Per service, by id. A service that ever had an instance keeps an (empty) entry.
    pub instances: BTreeMap<String, Arc<BTreeMap<String, Instance>>>,
}

struct Subscriber {
    service: String,
    kinds: Kinds,
    tx: mpsc::UnboundedSender<Item>,
    /// Sent and not yet received (shared with the [`Watch`]).
    unread: Arc<AtomicUsize>,
    /// Unread events it may have before a command's events: [`SUBSCRIBER_BUFFER`] plus
    /// its replay.
    allowance: usize,
}

impl Subscriber {
    fn send(&self, item: Item) -> bool {
        self.unread.fetch_add(1, Ordering::Relaxed);
        self.tx.send(item).is_ok()
    }
}

/// A watcher's end: the events of one subscription, then possibly the error that ends it.
pub struct Watch {
    rx: mpsc::UnboundedReceiver<Item>,
    unread: Arc<AtomicUsize>,
}

impl Watch {
    pub async fn recv(&mut self) -> Option<Item> {
        let item = self.rx.recv().await;
        if item.is_some() {
            self.unread.fetch_sub(1, Ordering::Relaxed);
        }
        item
    }

    /// An event already there, without waiting.
    pub fn try_recv(&mut self) -> Result<Item, mpsc::error::TryRecvError> {
        let item = self.rx.try_recv()?;
        self.unread.fetch_sub(1, Ordering::Relaxed);
        Ok(item)
    }
}

/// State plus subscribers; one lock guards both so a subscription's replay and the live
/// events after it never overlap or leave a gap.
#[derive(Default)]
pub struct Registry {
    pub data: Data,
    subscribers: Vec<Subscriber>,
    /// Set while this node does not follow the cluster (shut down, out of the voters, or
    /// without a leader for a while): a new watch ends at once with [`LEFT`], like the
    /// ones open when it stopped, and DNS answers SERVFAIL.
    left: bool,
}

impl Registry {
    pub fn instances(&self, service: &str) -> Vec<Instance> {
        let mut v: Vec<Instance> = self
            .data
            .instances
            .get(service)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by_key(|i| i.index);
        v
    }

    pub fn instance(&self, service: &str, id: &str) -> Option<&Instance> {
        self.data.instances.get(service)?.get(id)
    }

    /// The current leader: the oldest instance, or the manually set one if it exists.
    pub fn leader(&self, service: &str) -> Option<Instance> {
        let cfg = self.data.services.get(service)?;
        let insts = self.data.instances.get(service)?;
        match cfg.leader_type {
            LeaderType::Oldest => insts.values().min_by_key(|i| i.index).cloned(),
            LeaderType::Manual => insts.get(self.data.leaders.get(service)?).cloned(),
        }
    }

    /// Registers a watcher. Replays current state (spec §2.5 order) when `current` is set.
    pub fn subscribe(&mut self, service: &str, kinds: Kinds, send_current: bool) -> Watch {
        // Room for the replay plus the live buffer.
        let replay_len = if send_current {
            self.data.instances.get(service).map_or(0, |m| m.len()) + 3
        } else {
            0
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let unread = Arc::new(AtomicUsize::new(0));
        let sub = Subscriber {
            service: service.to_string(),
            kinds,
            tx,
            unread: unread.clone(),
            allowance: SUBSCRIBER_BUFFER + replay_len,
        };
        let watch = Watch { rx, unread };
        if self.left {
            // A watch that raced the node's leaving would stay open on a frozen state.
            sub.send(Err(LEFT.to_string()));
            return watch;
        }
        if send_current {
            let ev = |kind, instance, service_meta| Event {
                service: service.to_string(),
                kind,
                instance,
                service_meta,
            };
            if kinds.has(EventKind::Up) {
                for i in self.instances(service) {
                    sub.send(Ok(ev(EventKind::Up, Some(i), None)));
                }
            }
            if kinds.has(EventKind::Leader) {
                if let Some(l) = self.leader(service) {
                    sub.send(Ok(ev(EventKind::Leader, Some(l), None)));
                }
            }
            if kinds.has(EventKind::ServiceMeta) {
                if let Some(m) = self.data.metas.get(service) {
                    let m = ServiceMeta::clone(m);
                    sub.send(Ok(ev(EventKind::ServiceMeta, None, Some(m))));
                }
            }
            if kinds.has(EventKind::Current) {
                sub.send(Ok(ev(EventKind::Current, None, None)));
            }
        }
        self.subscribers.retain(|s| !s.tx.is_closed());
        self.subscribers.push(sub);
        watch
    }

    fn broadcast(&mut self, events: Vec<Event>) {
        if events.is_empty() || self.subscribers.is_empty() {
            return;
        }
        self.subscribers.retain(|s| {
            let mut checked = false;
            for e in &events {
                if e.service != s.service || !s.kinds.has(e.kind) {
                    continue;
                }
                // Judged once per command, on what it left unread before it.
                if !checked {
                    checked = true;
                    if s.unread.load(Ordering::Relaxed) >= s.allowance {
                        // The stream ends with an error; the receiver drains what it has.
                        s.send(Err(BLOCKED_RECEIVER.to_string()));
                        return false;
                    }
                }
                if !s.send(Ok(e.clone())) {
                    return false;
                }
            }
            true
        });
    }

    /// Applies one committed command at log `index` and notifies watchers.
    pub fn apply(&mut self, index: u64, cmd: Command) -> Response {
        let mut events = Vec::new();
        let res = self.apply_inner(index, cmd, &mut events);
        self.broadcast(events);
        match res {
            Ok(index) => Response {
                index,
                rejected: None,
            },
            Err(r) => Response {
                index: 0,
                rejected: Some(r),
            },
        }
    }

    fn apply_inner(
        &mut self,
        index: u64,
        cmd: Command,
        events: &mut Vec<Event>,
    ) -> Result<u64, Rejection> {
        let ev = |service: &str, kind, instance| Event {
            service: service.to_string(),
            kind,
            instance,
            service_meta: None,
        };
        match cmd {
            Command::AddService { service, config } => {
                if self.data.services.contains_key(&service) {
                    return Err(Rejection::ServiceExists(service));
                }
                self.data.services.insert(service, config);
                Ok(index)
            }
            Command::RemoveService { service } => {
                if !self.data.services.contains_key(&service) {
                    return Err(Rejection::ServiceNotFound(service));
                }
                let before = self.leader(&service);
                for i in self.instances(&service) {
                    events.push(ev(&service, EventKind::Down, Some(i)));
                }
                self.data.services.remove(&service);
                self.data.instances.remove(&service);
                self.data.metas.remove(&service);
                self.data.leaders.remove(&service);
                // Only a service that had a leader tells its watchers it has none now.
                self.leader_changed(&service, before, events);
                Ok(index)
            }
            Command::SetMeta { service, mut meta } => {
                if !self.data.services.contains_key(&service) {
                    return Err(Rejection::ServiceNotFound(service));
                }
                let stored = self.data.metas.get(&service);
                match (meta.index, stored) {
                    (0, Some(_)) => return Err(Rejection::MetaExists),
                    (0, None) => {}
                    (_, None) => return Err(Rejection::MetaIndex),
                    (n, Some(s)) if s.index != n => return Err(Rejection::MetaIndex),
                    _ => {}
                }
                let before = self.leader(&service);
                // An empty `leader_id` names no leader (Flynn sets it only when non-empty).
                let named = meta.leader_id.take().filter(|id| !id.is_empty());
                if let Some(id) = &named {
                    self.data.leaders.insert(service.clone(), id.clone());
                }
                meta.index = index;
                self.data
                    .metas
                    .insert(service.clone(), Arc::new(meta.clone()));
                let after = self.leader(&service);
                // The new meta is announced first (as Flynn does), so a watcher acting on
                // the `leader` event that follows already has the meta that named it.
                events.push(Event {
                    service: service.clone(),
                    kind: EventKind::ServiceMeta,
                    instance: None,
                    service_meta: Some(meta),
                });
                // Naming an existing instance emits `leader` even when it already led
                // (spec §2.4); otherwise only a change does.
                if named.is_some() && after.as_ref().map(|l| &l.id) == named.as_ref() {
                    events.push(ev(&service, EventKind::Leader, after));
                } else {
                    self.leader_changed(&service, before, events);
                }
                Ok(index)
            }
            Command::SetLeader { service, id } => {
                let before = self.leader(&service);
                if self.data.services.get(&service).map(|c| c.leader_type)
                    == Some(LeaderType::Manual)
                {
                    self.data.leaders.insert(service.clone(), id.clone());
                    let after = self.leader(&service);
                    // A manual set naming an existing instance emits `leader` even when
                    // it already led, as meta's `leader_id` does (spec §2.10 "on manual
                    // set"); otherwise only a change does.
                    if after.as_ref().is_some_and(|l| l.id == id) {
                        events.push(ev(&service, EventKind::Leader, after));
                    } else {
                        self.leader_changed(&service, before, events);
                    }
                }
                Ok(index)
            }
            Command::AddInstance {
                service,
                mut instance,
            } => {
                if !self.data.services.contains_key(&service) {
                    return Err(Rejection::ServiceNotFound(service));
                }
                let before = self.leader(&service);
                let kind = match self.instance(&service, &instance.id) {
                    Some(old) if old.same_as(&instance) => return Ok(old.index),
                    Some(old) => {
                        instance.index = old.index;
                        EventKind::Update
                    }
                    None => {
                        instance.index = index;
                        EventKind::Up
                    }
                };
                let idx = instance.index;
                self.instances_mut(&service)
                    .insert(instance.id.clone(), instance.clone());
                events.push(ev(&service, kind, Some(instance)));
                self.leader_changed(&service, before, events);
                Ok(idx)
            }
            Command::RemoveInstance { service, id } => {
                let Some(insts) = self.data.instances.get(&service) else {
                    return Err(Rejection::InstanceNotFound(service));
                };
                if !insts.contains_key(&id) {
                    return Ok(index);
                }
                self.remove_instance(&service, &id, events);
                Ok(index)
            }
            Command::ExpireInstances { instances } => {
                // All of a service's expired instances go first, then its leader is
                // recomputed once (one expiry command, one recompute, as in Flynn): removing
                // them one by one could announce as leader an instance that expires in the
                // same batch.
                let mut leaders: Vec<(String, Option<Instance>)> = Vec::new();
                for (service, id, idx) in instances {
                    if self.instance(&service, &id).map(|i| i.index) == Some(idx) {
                        if !leaders.iter().any(|(s, _)| *s == service) {
                            let before = self.leader(&service);
                            leaders.push((service.clone(), before));
                        }
                        self.take_instance(&service, &id, events);
                    }
                }
                for (service, before) in leaders {
                    self.leader_changed(&service, before, events);
                }
                Ok(index)
            }
        }
    }

    fn remove_instance(&mut self, service: &str, id: &str, events: &mut Vec<Event>) {
        let before = self.leader(service);
        if self.take_instance(service, id, events) {
            self.leader_changed(service, before, events);
        }
    }

    /// Removes one instance with its `down` event, leaving the leader to the caller.
    fn take_instance(&mut self, service: &str, id: &str, events: &mut Vec<Event>) -> bool {
        // The service's existing map only (no name allocated for a lookup), copied only when
        // a snapshot shares it and it holds `id` (see [`Data`]).
        let Some(insts) = self.data.instances.get_mut(service) else {
            return false;
        };
        if !insts.contains_key(id) {
            return false;
        }
        let Some(i) = Arc::make_mut(insts).remove(id) else {
            return false;
        };
        events.push(Event {
            service: service.to_string(),
            kind: EventKind::Down,
            instance: Some(i),
            service_meta: None,
        });
        true
    }

    fn leader_changed(&self, service: &str, before: Option<Instance>, events: &mut Vec<Event>) {
        let after = self.leader(service);
        let changed = match (&before, &after) {
            (None, None) => false,
            (Some(a), Some(b)) => a.id != b.id || a.index != b.index,
            _ => true,
        };
        if changed {
            events.push(Event {
                service: service.to_string(),
                kind: EventKind::Leader,
                instance: after,
                service_meta: None,
            });
        }
    }

    /// A service's instances to add to, copied first if a snapshot still shares them (see
    /// [`Data`]); created empty if the service has none yet. (A removal takes the existing
    /// map by [`BTreeMap::get_mut`] instead: it never creates one.)
    fn instances_mut(&mut self, service: &str) -> &mut BTreeMap<String, Instance> {
        let insts = self.data.instances.entry(service.to_string()).or_default();
        Arc::make_mut(insts)
    }

    /// Replaces the state from a snapshot and ends every watch with [`RESTORED`]: the
    /// jump has no events of its own, so watchers must resubscribe, and the replay of
    /// their new subscription brings them up to date. Returns the old state, for the
    /// caller to drop once it has released the lock (freeing a large state takes a while).
    #[must_use = "the old state is returned to be dropped outside the lock"]
    pub fn restore(&mut self, data: Data) -> Data {
        let old = std::mem::replace(&mut self.data, data);
        self.end_watches(RESTORED);
        old
    }

    /// This node stops following the cluster: every watch, open or new, ends with [`LEFT`]
    /// until [`Registry::follow_again`].
    pub fn stop_following(&mut self) {
        self.left = true;
        self.end_watches(LEFT);
    }

    /// Back among the voters with a leader: watches are served again.
    pub fn follow_again(&mut self) {
        self.left = false;
    }

    /// Whether this node's state follows the cluster (see [`Registry::stop_following`]).
    pub fn following(&self) -> bool {
        !self.left
    }

    /// Ends every watch with an `error` event carrying `msg` (its subscriber reconnects,
    /// to where the state is current).
    fn end_watches(&mut self, msg: &str) {
        for s in self.subscribers.drain(..) {
            s.send(Err(msg.to_string()));
        }
    }
}

#[cfg(test)]
mod tests;
