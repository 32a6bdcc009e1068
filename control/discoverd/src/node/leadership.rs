//! The Raft leader's memory of heartbeats, and the expiry decisions made from it (spec
//! §2.6). Heartbeats are never replicated nor written to disk: a new leader starts with
//! none and waits 2×TTL before it expires anything. Pure: the caller passes the clock.
//!
//! An expiry is decided here but applied later, through Raft; a heartbeat of an
//! unchanged instance is acknowledged from this memory alone. Between the decision and
//! the apply the two would cross: the heartbeat acknowledged, then the instance removed
//! (its registration index, all the expiry entry can check, is the same). So the
//! instances of an expiry in flight are held in `expiring` until its write has returned,
//! and a heartbeat of one of them is not taken meanwhile: its caller waits for the
//! apply and then reads the state, which says whether the instance must be registered
//! again.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::store::state::Data;

/// (service, instance id).
type Key = (String, String);

/// An instance to expire: service, id, and the registration index it was seen with (so
/// that a re-registration in between is not removed).
pub type Expired = (String, String, u64);

#[derive(Default)]
pub struct Leadership {
    /// When this node last became Raft leader; `None` while it is not leader.
    since: Option<Instant>,
    /// Last heartbeat per instance, from this term of leadership.
    heartbeats: HashMap<Key, Instant>,
    /// The instances of the expiry entry being written.
    expiring: HashSet<Key>,
    /// Registration writes in flight per instance. Such an instance is alive whatever its
    /// last heartbeat says: the write may take longer than the TTL (a slow disk, a quorum
    /// lost for a while) and land with the stamp taken before it, and would be expired
    /// as it lands. Kept across terms: each count belongs to a request still running.
    registering: HashMap<Key, usize>,
}

impl Leadership {
    pub fn is_leading(&self) -> bool {
        self.since.is_some()
    }

    /// Leadership gained at `Some(now)`, or lost (`None`). Heartbeats seen in another
    /// term say nothing about this one.
    pub fn set_leading(&mut self, since: Option<Instant>) {
        self.since = since;
        self.heartbeats.clear();
    }

    /// Records a heartbeat at `now`; false, recording nothing, while an expiry naming the
    /// instance is in flight.
    pub fn heartbeat(&mut self, service: &str, id: &str, now: Instant) -> bool {
        let key = (service.to_string(), id.to_string());
        if self.expiring.contains(&key) {
            return false;
        }
        self.heartbeats.insert(key, now);
        true
    }

    /// A registration write of the instance begins.
    pub fn begin_register(&mut self, service: &str, id: &str) {
        *self
            .registering
            .entry((service.to_string(), id.to_string()))
            .or_default() += 1;
    }

    /// A registration write of the instance has returned (applied, failed or given up) at
    /// `now`: it counts as a heartbeat then, while this node leads.
    pub fn end_register(&mut self, service: &str, id: &str, now: Instant) {
        let key = (service.to_string(), id.to_string());
        if let Some(n) = self.registering.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.registering.remove(&key);
            }
        }
        if self.since.is_some() && !self.expiring.contains(&key) {
            self.heartbeats.insert(key, now);
        }
    }

    pub fn forget(&mut self, service: &str, id: &str) {
        self.heartbeats
            .remove(&(service.to_string(), id.to_string()));
    }

    /// The instances of `data` without a heartbeat in the `ttl` before `now`, or `None`
    /// while expiry is suppressed (not leader, or leader for less than 2×TTL). They are
    /// in flight from here until [`Leadership::end_expiry`].
    pub fn begin_expiry(
        &mut self,
        now: Instant,
        ttl: Duration,
        data: &Data,
    ) -> Option<Vec<Expired>> {
        let since = self.since?;
        if now.saturating_duration_since(since) < ttl * 2 {
            return None;
        }
        // Heartbeats of instances that are gone (a removed service, a registration whose
        // write failed) would otherwise stay for as long as this node leads: a fresh one
        // may belong to a write still in flight and stays.
        self.heartbeats.retain(|(svc, id), t| {
            now.saturating_duration_since(*t) <= ttl
                || data.instances.get(svc).is_some_and(|m| m.contains_key(id))
        });
        let mut out = Vec::new();
        for (svc, insts) in &data.instances {
            for (id, inst) in insts.iter() {
                let key = (svc.clone(), id.clone());
                let fresh = self.registering.contains_key(&key)
                    || self
                        .heartbeats
                        .get(&key)
                        .is_some_and(|t| now.saturating_duration_since(*t) <= ttl);
                if !fresh {
                    self.heartbeats.remove(&key);
                    self.expiring.insert(key);
                    out.push((svc.clone(), id.clone(), inst.index));
                }
            }
        }
        Some(out)
    }

    /// The write of `batch` has returned: applied (or failed).
    pub fn end_expiry(&mut self, batch: &[Expired]) {
        for (svc, id, _) in batch {
            self.expiring.remove(&(svc.clone(), id.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heartbeats of instances that are gone are dropped once stale (they used to stay for
    /// as long as the node led).
    #[test]
    fn heartbeats_of_gone_instances_are_dropped() {
        let mut l = Leadership::default();
        let t0 = Instant::now();
        l.set_leading(Some(t0));
        assert!(l.heartbeat("gone", "i1", t0));
        let data = Data::default();
        let later = t0 + TTL * 3;
        assert!(l.heartbeat("gone", "fresh", later));
        assert_eq!(l.begin_expiry(later, TTL, &data), Some(vec![]));
        assert!(!l
            .heartbeats
            .contains_key(&("gone".to_string(), "i1".to_string())));
        assert!(l
            .heartbeats
            .contains_key(&("gone".to_string(), "fresh".to_string())));
    }
    use crate::store::types::{Command, Instance, LeaderType, ServiceConfig};
    use crate::store::Registry;

    const TTL: Duration = Duration::from_secs(10);

    fn add(r: &mut Registry, index: u64) {
        let instance = Instance {
            id: "i1".into(),
            addr: "127.0.0.1:1".into(),
            proto: "tcp".into(),
            ..Instance::default()
        };
        let res = r.apply(
            index,
            Command::AddInstance {
                service: "s".into(),
                instance,
            },
        );
        assert_eq!(res.rejected, None);
    }

    /// A registry with service `s` and its instance `i1` (index 2), and a leader that has
    /// led since `t0` and last heard from `i1` then.
    fn setup(t0: Instant) -> (Registry, Leadership) {
        let mut r = Registry::default();
        r.apply(
            1,
            Command::AddService {
                service: "s".into(),
                config: ServiceConfig {
                    leader_type: LeaderType::Oldest,
                },
            },
        );
        add(&mut r, 2);
        let mut l = Leadership::default();
        l.set_leading(Some(t0));
        assert!(l.heartbeat("s", "i1", t0));
        (r, l)
    }

    #[test]
    fn expiry_waits_two_ttls_of_leadership_then_takes_the_silent() {
        let t0 = Instant::now();
        let (r, mut l) = setup(t0);
        let mut l2 = Leadership::default();
        assert_eq!(l2.begin_expiry(t0, TTL, &r.data), None, "not leader");
        assert_eq!(
            l.begin_expiry(t0 + TTL, TTL, &r.data),
            None,
            "leader < 2×TTL"
        );
        // A heartbeat just before the decision keeps the instance.
        let t1 = t0 + TTL * 3;
        assert!(l.heartbeat("s", "i1", t1));
        assert_eq!(l.begin_expiry(t1, TTL, &r.data), Some(vec![]));
        let t2 = t1 + TTL + Duration::from_millis(1);
        assert_eq!(
            l.begin_expiry(t2, TTL, &r.data),
            Some(vec![("s".into(), "i1".into(), 2)])
        );
    }

    /// A registration whose write takes longer than the TTL is not expired as it lands
    /// (its heartbeat was stamped before the write): alive while the write is in flight,
    /// and from its return on as if it had heartbeated then.
    #[test]
    fn a_registration_slower_than_the_ttl_is_not_expired_as_it_lands() {
        let t0 = Instant::now();
        let (r, mut l) = setup(t0);
        l.begin_register("s", "i1");
        // Applied (the instance is in the state), the write not returned yet.
        let t1 = t0 + TTL * 3;
        assert_eq!(l.begin_expiry(t1, TTL, &r.data), Some(vec![]));
        l.end_register("s", "i1", t1);
        assert_eq!(l.begin_expiry(t1 + TTL / 2, TTL, &r.data), Some(vec![]));
        // Silent for a TTL after that: expired as usual.
        let t2 = t1 + TTL + Duration::from_millis(1);
        assert_eq!(
            l.begin_expiry(t2, TTL, &r.data),
            Some(vec![("s".into(), "i1".into(), 2)])
        );
    }

    /// The race of a heartbeat with the expiry of its instance, step by step: decided,
    /// heartbeat, applied. The heartbeat must not be taken (and acknowledged from
    /// memory) between the decision and the apply, since the apply removes the instance
    /// all the same; once applied, it is taken and the state shows the instance gone, so
    /// the API registers it again.
    #[test]
    fn a_heartbeat_during_its_expiry_is_held_until_the_expiry_is_applied() {
        let t0 = Instant::now();
        let (mut r, mut l) = setup(t0);
        let t1 = t0 + TTL * 3;
        let batch = l.begin_expiry(t1, TTL, &r.data).expect("expiry runs");
        assert_eq!(batch, vec![("s".to_string(), "i1".to_string(), 2)]);
        // The instance heartbeats now, before the entry is applied; the state still
        // shows it, unchanged.
        assert!(r.instance("s", "i1").is_some());
        assert!(
            !l.heartbeat("s", "i1", t1),
            "heartbeat taken while its expiry is in flight: it would be acknowledged, \
             then the instance removed"
        );
        r.apply(
            3,
            Command::ExpireInstances {
                instances: batch.clone(),
            },
        );
        l.end_expiry(&batch);
        assert!(l.heartbeat("s", "i1", t1));
        assert!(r.instance("s", "i1").is_none(), "so it is registered again");
        add(&mut r, 4);
        // Registered again, with the heartbeat that waited, it stays.
        assert_eq!(l.begin_expiry(t1 + TTL / 2, TTL, &r.data), Some(vec![]));
        assert_eq!(r.instance("s", "i1").map(|i| i.index), Some(4));
    }
}
