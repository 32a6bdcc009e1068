//! What a watch's consumer knows, and the events that take it to the state of a new
//! replay after a reconnect.

use std::collections::BTreeMap;

use super::{Event, EventKind, Instance};

#[derive(Default)]
pub(super) struct Known {
    pub(super) instances: BTreeMap<String, Instance>,
    /// The leader's id and index: an instance that went and came back under the same
    /// id is a new leader.
    pub(super) leader: Option<(String, u64)>,
    meta_index: Option<u64>,
    synced: bool,
}

/// What a replay held that could not be read: what the consumer has of it stays as it is
/// (an instance whose `up` was unreadable is there; a `down` for it would drop a live
/// instance because this client could not read it).
#[derive(Debug, Default)]
pub(super) struct Unreadable {
    /// Instances whose `up` could not be read.
    ids: std::collections::BTreeSet<String>,
    /// An event that could not be told apart (no kind, or an `up` without a readable id):
    /// every instance the consumer has stays.
    any: bool,
    /// The leader could not be read.
    leader: bool,
}

impl Unreadable {
    pub(super) fn note(&mut self, kind: Option<EventKind>, id: Option<String>) {
        match (kind, id) {
            (Some(EventKind::Up), Some(id)) => {
                self.ids.insert(id);
            }
            (Some(EventKind::Up) | None, _) => self.any = true,
            (Some(EventKind::Leader), _) => self.leader = true,
            // Metadata that cannot be read changes nothing (only metadata read is sent);
            // a replay holds no others.
            (Some(_), _) => {}
        }
    }
}

pub(super) fn track(known: &mut Known, ev: &Event) {
    match (ev.kind, &ev.instance) {
        (EventKind::Up | EventKind::Update, Some(i)) => {
            known.instances.insert(i.id.clone(), i.clone());
        }
        (EventKind::Down, Some(i)) => {
            known.instances.remove(&i.id);
        }
        (EventKind::Leader, l) => known.leader = l.as_ref().map(|i| (i.id.clone(), i.index)),
        (EventKind::ServiceMeta, _) => {
            known.meta_index = ev.service_meta.as_ref().map(|m| m.index);
        }
        _ => {}
    }
}

/// The events that take a consumer from `known` to the state in `replay`, ending with
/// `current` (only on the first sync, as the server would send it). What `unreadable`
/// says the replay held but could not be read stays as the consumer has it.
pub(super) fn reconcile(
    service: &str,
    known: &mut Known,
    replay: Vec<Event>,
    unreadable: &Unreadable,
) -> Vec<Event> {
    let mut out = Vec::new();
    let ev = |kind, instance, service_meta| Event {
        service: service.to_string(),
        kind,
        instance,
        service_meta,
    };
    let mut now: BTreeMap<String, Instance> = replay
        .iter()
        .filter(|e| e.kind == EventKind::Up)
        .filter_map(|e| e.instance.clone())
        .map(|i| (i.id.clone(), i))
        .collect();
    for (id, old) in &known.instances {
        if !now.contains_key(id) && (unreadable.any || unreadable.ids.contains(id)) {
            now.insert(id.clone(), old.clone());
        }
    }
    // New and changed instances first, vanished ones after: a consumer that applies each
    // event at once passes through an empty set only for a re-registered instance (its
    // `down` then `up`). The router applies a reconnect's events as one change.
    for e in replay.iter().filter(|e| e.kind == EventKind::Up) {
        let Some(i) = &e.instance else { continue };
        match known.instances.get(&i.id) {
            None => out.push(ev(EventKind::Up, Some(i.clone()), None)),
            // Re-registered meanwhile: `update` would keep the old index (spec §2.3).
            Some(old) if old.index != i.index => {
                out.push(ev(EventKind::Down, Some(old.clone()), None));
                out.push(ev(EventKind::Up, Some(i.clone()), None));
            }
            Some(old) if old != i => out.push(ev(EventKind::Update, Some(i.clone()), None)),
            Some(_) => {}
        }
    }
    for (id, old) in &known.instances {
        if !now.contains_key(id) {
            out.push(ev(EventKind::Down, Some(old.clone()), None));
        }
    }
    let leader = replay
        .iter()
        .find(|e| e.kind == EventKind::Leader)
        .and_then(|e| e.instance.clone());
    let now_leader = leader.as_ref().map(|i| (i.id.clone(), i.index));
    // A leader that could not be read is not a leader gone.
    let keep_leader = unreadable.leader && leader.is_none();
    if !keep_leader
        && (now_leader != known.leader || !known.synced)
        && (leader.is_some() || known.leader.is_some())
    {
        out.push(ev(EventKind::Leader, leader, None));
    }
    let meta = replay
        .iter()
        .find(|e| e.kind == EventKind::ServiceMeta)
        .and_then(|e| e.service_meta.clone());
    // Any other version, older ones too: a peer that lags behind sends the newer one live
    // once it has it, while a cluster rebuilt from scratch starts its indexes again (ignoring
    // lower ones would drop its metadata until they caught up).
    if let Some(m) = meta.filter(|m| Some(m.index) != known.meta_index) {
        out.push(ev(EventKind::ServiceMeta, None, Some(m)));
    }
    let first = !known.synced;
    for e in &out {
        track(known, e);
    }
    known.instances = now;
    known.synced = true;
    if first {
        out.push(ev(EventKind::Current, None, None));
    }
    out
}
