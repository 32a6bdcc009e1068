//! Table-style tests of the pure registry (spec §2.10 store_test).

use super::*;
use crate::store::types::{
    Command, EventKind, Instance, Kinds, LeaderType, Rejection, ServiceConfig, ServiceMeta,
};

fn inst(port: u16) -> Instance {
    Instance {
        id: format!("i{port}"),
        addr: format!("127.0.0.1:{port}"),
        proto: "tcp".into(),
        ..Instance::default()
    }
}

fn add_service(r: &mut Registry, idx: u64, name: &str, lt: LeaderType) {
    let res = r.apply(
        idx,
        Command::AddService {
            service: name.into(),
            config: ServiceConfig { leader_type: lt },
        },
    );
    assert_eq!(res.rejected, None);
}

#[tokio::test]
async fn meta_cas_table() {
    let mut r = Registry::default();
    let meta = |index| Command::SetMeta {
        service: "s".into(),
        meta: ServiceMeta {
            data: serde_json::json!(1),
            leader_id: None,
            index,
        },
    };
    assert_eq!(
        r.apply(1, meta(0)).rejected,
        Some(Rejection::ServiceNotFound("s".into()))
    );
    add_service(&mut r, 2, "s", LeaderType::Oldest);
    assert_eq!(r.apply(3, meta(5)).rejected, Some(Rejection::MetaIndex));
    assert_eq!(r.apply(4, meta(0)).index, 4);
    assert_eq!(r.apply(5, meta(0)).rejected, Some(Rejection::MetaExists));
    assert_eq!(r.apply(6, meta(3)).rejected, Some(Rejection::MetaIndex));
    assert_eq!(r.apply(7, meta(4)).index, 7);
    assert_eq!(r.data.metas["s"].index, 7);
}

#[tokio::test]
async fn events_up_update_leader_down() {
    let mut r = Registry::default();
    add_service(&mut r, 1, "s", LeaderType::Oldest);
    let mut rx = r.subscribe("s", Kinds::ALL, true);
    assert_eq!(rx.recv().await.unwrap().unwrap().kind, EventKind::Current);
    let add = |i: Instance| Command::AddInstance {
        service: "s".into(),
        instance: i,
    };
    assert_eq!(r.apply(2, add(inst(1))).index, 2);
    // Same instance again: no event, index kept.
    assert_eq!(r.apply(3, add(inst(1))).index, 2);
    let mut changed = inst(1);
    changed.meta.insert("k".into(), "v".into());
    assert_eq!(r.apply(4, add(changed)).index, 2);
    r.apply(5, add(inst(2)));
    r.apply(
        6,
        Command::RemoveInstance {
            service: "s".into(),
            id: "i1".into(),
        },
    );
    let mut kinds = Vec::new();
    while let Ok(Ok(e)) = rx.try_recv() {
        kinds.push(e.kind);
    }
    use EventKind::*;
    assert_eq!(kinds, vec![Up, Leader, Update, Up, Down, Leader]);
    assert_eq!(r.leader("s").unwrap().id, "i2");
}

/// Two instances expiring in one batch, the leader and the next oldest: watchers see both go
/// down and then one leader, the instance that stays, whatever order the batch lists them in.
#[tokio::test]
async fn an_expiry_batch_announces_one_leader_that_survives_it() {
    for order in [[1u16, 2], [2, 1]] {
        let mut r = Registry::default();
        add_service(&mut r, 1, "s", LeaderType::Oldest);
        for (k, port) in [1u16, 2, 3].into_iter().enumerate() {
            r.apply(
                2 + k as u64,
                Command::AddInstance {
                    service: "s".into(),
                    instance: inst(port),
                },
            );
        }
        let mut rx = r.subscribe("s", Kinds::ALL, false);
        let expire = order
            .iter()
            .map(|&p| ("s".to_string(), format!("i{p}"), 1 + u64::from(p)))
            .collect();
        r.apply(5, Command::ExpireInstances { instances: expire });
        let mut seen = Vec::new();
        while let Ok(Ok(e)) = rx.try_recv() {
            seen.push((e.kind, e.instance.map(|i| i.id)));
        }
        use EventKind::*;
        let down = |p: u16| (Down, Some(format!("i{p}")));
        assert_eq!(
            seen,
            vec![down(order[0]), down(order[1]), (Leader, Some("i3".into()))],
            "batch order {order:?}"
        );
        assert_eq!(r.leader("s").unwrap().id, "i3");
    }
}

#[tokio::test]
async fn blocked_subscriber_is_dropped_with_an_error() {
    let mut r = Registry::default();
    add_service(&mut r, 1, "s", LeaderType::Manual);
    let mut rx = r.subscribe("s", Kinds::ALL, false);
    for i in 0..(SUBSCRIBER_BUFFER as u16 + 5) {
        r.apply(
            2 + u64::from(i),
            Command::AddInstance {
                service: "s".into(),
                instance: inst(1000 + i),
            },
        );
    }
    let mut n = 0;
    let mut last = None;
    while let Some(item) = rx.recv().await {
        n += 1;
        last = Some(item);
    }
    assert_eq!(n, SUBSCRIBER_BUFFER + 1);
    assert_eq!(last, Some(Err(BLOCKED_RECEIVER.to_string())));
}

/// A watcher that keeps up takes one command's events whole, however many: removing a
/// service of 100 instances sends 100 `down` events at once, more than the buffer, to a
/// watcher that subscribed when the service was empty.
#[tokio::test]
async fn a_burst_from_one_command_does_not_drop_a_watcher_that_keeps_up() {
    let mut r = Registry::default();
    add_service(&mut r, 1, "s", LeaderType::Oldest);
    let mut rx = r.subscribe("s", Kinds::ALL, true);
    assert_eq!(rx.recv().await.unwrap().unwrap().kind, EventKind::Current);
    let mut ups = 0;
    for i in 0..100u16 {
        r.apply(
            2 + u64::from(i),
            Command::AddInstance {
                service: "s".into(),
                instance: inst(1000 + i),
            },
        );
        // Read as they come (the first also makes a leader event).
        while let Ok(item) = rx.try_recv() {
            if item.unwrap().kind == EventKind::Up {
                ups += 1;
            }
        }
    }
    assert_eq!(ups, 100);
    r.apply(
        200,
        Command::RemoveService {
            service: "s".into(),
        },
    );
    let mut downs = 0;
    while let Ok(item) = rx.try_recv() {
        match item {
            Ok(ev) if ev.kind == EventKind::Down => downs += 1,
            Ok(_) => {}
            Err(e) => panic!("the watcher was dropped: {e}"),
        }
    }
    assert_eq!(downs, 100);
}

/// A manual service `s` whose instance `i1` (index 2) was made its leader (index 3).
fn manual_led_by_i1() -> Registry {
    let mut r = Registry::default();
    add_service(&mut r, 1, "s", LeaderType::Manual);
    r.apply(
        2,
        Command::AddInstance {
            service: "s".into(),
            instance: inst(1),
        },
    );
    r.apply(
        3,
        Command::SetLeader {
            service: "s".into(),
            id: "i1".into(),
        },
    );
    r
}

#[tokio::test]
async fn snapshot_restore_preserves_data() {
    let r = manual_led_by_i1();
    let json = serde_json::to_vec(&r.data).unwrap();
    let mut r2 = Registry::default();
    let _old = r2.restore(serde_json::from_slice(&json).unwrap());
    assert_eq!(r2.data, r.data);
    assert_eq!(r2.leader("s").unwrap().id, "i1");
}

/// A snapshot serializes a shallow copy of the data after releasing the state's lock:
/// applies that follow change the state, never that copy (each service's instances are
/// copied on write), and the JSON is the same as the data's.
#[tokio::test]
async fn a_copy_of_the_data_is_not_changed_by_later_applies() {
    let mut r = manual_led_by_i1();
    let copy = r.data.clone();
    let json = serde_json::to_string(&copy).unwrap();
    r.apply(
        4,
        Command::AddInstance {
            service: "s".into(),
            instance: inst(9),
        },
    );
    r.apply(
        5,
        Command::RemoveInstance {
            service: "s".into(),
            id: "i1".into(),
        },
    );
    r.apply(
        6,
        Command::SetMeta {
            service: "s".into(),
            meta: ServiceMeta {
                data: serde_json::json!({"x": 1}),
                leader_id: None,
                index: 0,
            },
        },
    );
    assert_eq!(serde_json::to_string(&copy).unwrap(), json);
    assert!(copy.instances["s"].contains_key("i1") && copy.instances["s"].len() == 1);
    assert!(copy.metas.is_empty());
    assert_eq!(r.data.instances["s"].len(), 1);
    assert!(r.instance("s", "i9").is_some() && r.instance("s", "i1").is_none());
    assert_eq!(r.data.metas["s"].index, 6);
}

/// Removing an instance that is not there changes nothing: a map a snapshot shares is not
/// copied for it, and a service with no instances gets no empty map.
#[tokio::test]
async fn removing_a_missing_instance_neither_copies_nor_creates_a_map() {
    let mut r = manual_led_by_i1();
    let copy = r.data.clone();
    for (idx, service) in [(4, "s"), (5, "nope")] {
        r.apply(
            idx,
            Command::RemoveInstance {
                service: service.into(),
                id: "i9".into(),
            },
        );
    }
    assert!(std::sync::Arc::ptr_eq(
        &copy.instances["s"],
        &r.data.instances["s"]
    ));
    assert!(!r.data.instances.contains_key("nope"));
}

/// Applies `cmd` at `idx` and returns the kinds of the events a fresh watcher of `s`
/// receives for it.
fn kinds_of(r: &mut Registry, idx: u64, cmd: Command) -> Vec<EventKind> {
    let mut rx = r.subscribe("s", Kinds::ALL, false);
    assert_eq!(r.apply(idx, cmd).rejected, None);
    let mut kinds = Vec::new();
    while let Ok(Ok(e)) = rx.try_recv() {
        kinds.push(e.kind);
    }
    kinds
}

#[tokio::test]
async fn removing_a_service_emits_leader_only_if_it_had_one() {
    use EventKind::*;
    let remove = || Command::RemoveService {
        service: "s".into(),
    };
    for (lt, want) in [
        // Manual without a leader set: none → none is no change.
        (LeaderType::Manual, vec![Down, Down]),
        (LeaderType::Oldest, vec![Down, Down, Leader]),
    ] {
        let mut r = Registry::default();
        add_service(&mut r, 1, "s", lt);
        for (idx, port) in [(2, 1), (3, 2)] {
            r.apply(
                idx,
                Command::AddInstance {
                    service: "s".into(),
                    instance: inst(port),
                },
            );
        }
        assert_eq!(kinds_of(&mut r, 4, remove()), want, "{lt:?}");
    }
}

#[tokio::test]
async fn meta_leader_id_naming_the_current_leader_emits_leader() {
    use EventKind::{Leader, ServiceMeta as Meta};
    let mut r = Registry::default();
    add_service(&mut r, 1, "s", LeaderType::Manual);
    r.apply(
        2,
        Command::AddInstance {
            service: "s".into(),
            instance: inst(1),
        },
    );
    let meta = |index, leader: &str| Command::SetMeta {
        service: "s".into(),
        meta: ServiceMeta {
            data: serde_json::json!(1),
            leader_id: Some(leader.into()),
            index,
        },
    };
    // The meta comes first (as in Flynn): a watcher reacting to `leader` has it already.
    assert_eq!(kinds_of(&mut r, 3, meta(0, "i1")), vec![Meta, Leader]);
    // Same leader again: still announced (spec §2.4).
    assert_eq!(kinds_of(&mut r, 4, meta(3, "i1")), vec![Meta, Leader]);
    // An id that names no instance: the leader is gone.
    assert_eq!(kinds_of(&mut r, 5, meta(4, "nope")), vec![Meta, Leader]);
    assert_eq!(kinds_of(&mut r, 6, meta(5, "nope")), vec![Meta]);
}

#[tokio::test]
async fn restore_ends_every_watch() {
    let mut r = Registry::default();
    add_service(&mut r, 1, "s", LeaderType::Oldest);
    let mut rx = r.subscribe("s", Kinds::ALL, false);
    let mut other = r.subscribe("t", Kinds::LEADER, false);
    let _old = r.restore(Data::default());
    for rx in [&mut rx, &mut other] {
        assert_eq!(rx.try_recv(), Ok(Err(RESTORED.to_string())));
        assert_eq!(rx.try_recv(), Err(mpsc::error::TryRecvError::Disconnected));
    }
}

#[tokio::test]
async fn a_manual_set_of_the_current_leader_emits_leader() {
    // spec §2.10: `leader` "on manual set", also when that instance already leads.
    use EventKind::Leader;
    let mut r = Registry::default();
    add_service(&mut r, 1, "s", LeaderType::Manual);
    r.apply(
        2,
        Command::AddInstance {
            service: "s".into(),
            instance: inst(1),
        },
    );
    let set = |id: &str| Command::SetLeader {
        service: "s".into(),
        id: id.into(),
    };
    assert_eq!(kinds_of(&mut r, 3, set("i1")), vec![Leader]);
    assert_eq!(kinds_of(&mut r, 4, set("i1")), vec![Leader]);
    // A missing instance: the leader is gone once, then nothing changes.
    assert_eq!(kinds_of(&mut r, 5, set("nope")), vec![Leader]);
    assert_eq!(kinds_of(&mut r, 6, set("nope")), Vec::<EventKind>::new());
}

#[tokio::test]
async fn meta_with_an_empty_leader_id_leaves_the_leader_alone() {
    // Flynn sets the leader only for a non-empty `leader_id` (spec §2.4).
    let mut r = manual_led_by_i1();
    let meta = Command::SetMeta {
        service: "s".into(),
        meta: ServiceMeta {
            data: serde_json::json!(1),
            leader_id: Some(String::new()),
            index: 0,
        },
    };
    assert_eq!(kinds_of(&mut r, 4, meta), vec![EventKind::ServiceMeta]);
    assert_eq!(r.leader("s").map(|l| l.id), Some("i1".to_string()));
    assert_eq!(r.data.leaders["s"], "i1");
    assert_eq!(r.data.metas["s"].leader_id, None);
}
