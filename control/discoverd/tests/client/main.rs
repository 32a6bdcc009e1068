//! `flynn-client` against a real node: heartbeater keeps an instance alive and removes
//! it on close; a watch survives a server restart and reports what changed meanwhile.

#[path = "../support/mod.rs"]
mod support;

use std::time::Duration;

use flynn_client::discoverd::{Client, EventKind, Instance};
use support::*;

async fn next_kind(w: &mut flynn_client::discoverd::Watch) -> (EventKind, Option<String>) {
    let ev = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("event in time")
        .expect("watch open");
    (ev.kind, ev.instance.map(|i| i.addr))
}

#[tokio::test]
async fn heartbeater_and_resuming_watch() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Discoverd::single_fixed(dir.path(), "10s");
    let c = Client::new(&d.url(""));
    eventually(Duration::from_secs(10), || async {
        c.add_service("app", "oldest").await.ok()
    })
    .await
    .expect("service created");
    let mut w = c.watch("app");
    assert_eq!(next_kind(&mut w).await.0, EventKind::Current);
    let hb = c
        .heartbeat(
            "app",
            Instance {
                addr: "127.0.0.1:4000".into(),
                ..Instance::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        next_kind(&mut w).await,
        (EventKind::Up, Some("127.0.0.1:4000".into()))
    );
    assert_eq!(next_kind(&mut w).await.0, EventKind::Leader);
    assert_eq!(c.instances("app").await.unwrap().len(), 1);

    // Restart the server; meanwhile nothing is lost: a registration made while the watch
    // is reconnecting is reported as `up` after it resumes.
    d.kill();
    d.start();
    let other = Instance {
        addr: "127.0.0.1:4001".into(),
        ..Instance::default()
    };
    eventually(Duration::from_secs(10), || async {
        c.register("app", &other).await.ok()
    })
    .await
    .expect("register after restart");
    let (kind, addr) = next_kind(&mut w).await;
    assert_eq!(
        (kind, addr.as_deref()),
        (EventKind::Up, Some("127.0.0.1:4001"))
    );

    hb.close().await;
    let (kind, addr) = next_kind(&mut w).await;
    assert_eq!(
        (kind, addr.as_deref()),
        (EventKind::Down, Some("127.0.0.1:4000"))
    );
}

/// `keep_registered` returns at once and keeps trying while discoverd is away (here it
/// is not even started yet), creating the service and registering once it is up; dropping
/// the heartbeater then deletes the instance.
#[tokio::test]
async fn keep_registered_waits_out_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let c = Client::new(&format!("http://{addr}"));
    let inst = Instance {
        addr: "127.0.0.1:4200".into(),
        ..Instance::default()
    };
    let started = std::time::Instant::now();
    let hb = c.keep_registered("late", inst, Some("oldest"));
    assert!(started.elapsed() < Duration::from_millis(100), "it waited");
    // Several attempts fail meanwhile (200, 400, 800 ms apart...).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let _d = Discoverd::spawn(
        dir.path(),
        vec![
            "--addr".into(),
            addr.clone(),
            "--host".into(),
            addr.clone(),
            "--instance-ttl".into(),
            "10s".into(),
        ],
    );
    let up = eventually(Duration::from_secs(15), || async {
        c.instances("late").await.ok().filter(|l| l.len() == 1)
    })
    .await;
    assert!(up.is_some(), "not registered after discoverd came up");
    drop(hb);
    let gone = eventually(Duration::from_secs(5), || async {
        c.instances("late").await.ok().filter(|l| l.is_empty())
    })
    .await;
    assert!(gone.is_some(), "dropping the heartbeater left the instance");
}

/// A kept registration whose service is deleted later comes back by itself: the heartbeat
/// that finds the service gone (404) creates it again and registers.
#[tokio::test]
async fn keep_registered_recreates_a_deleted_service() {
    let dir = tempfile::tempdir().unwrap();
    let d = Discoverd::single_fixed(dir.path(), "10s");
    let c = Client::new(&d.url(""));
    let inst = Instance {
        addr: "127.0.0.1:4300".into(),
        ..Instance::default()
    };
    let hb = c.keep_registered("phoenix", inst, Some("oldest"));
    let up = eventually(Duration::from_secs(15), || async {
        c.instances("phoenix").await.ok().filter(|l| l.len() == 1)
    })
    .await;
    assert!(up.is_some(), "not registered");
    c.remove_service("phoenix").await.expect("service deleted");
    // The next heartbeat (3 to 5 s) finds it gone.
    let back = eventually(Duration::from_secs(12), || async {
        c.instances("phoenix").await.ok().filter(|l| l.len() == 1)
    })
    .await;
    assert!(back.is_some(), "the instance did not come back");
    drop(hb);
}

/// `Heartbeater::abandon` hands an instance over: the heartbeats stop but the instance
/// stays (a second heartbeater of the same instance keeps it alive), where dropping would
/// delete it.
#[tokio::test]
async fn abandoned_heartbeater_leaves_the_instance_to_its_successor() {
    let dir = tempfile::tempdir().unwrap();
    let d = Discoverd::single_fixed(dir.path(), "10s");
    let c = Client::new(&d.url(""));
    eventually(Duration::from_secs(10), || async {
        c.add_service("handover", "oldest").await.ok()
    })
    .await
    .expect("service created");
    let inst = Instance {
        addr: "127.0.0.1:4100".into(),
        ..Instance::default()
    };
    let old = c.heartbeat("handover", inst.clone()).await.unwrap();
    let new = c.heartbeat("handover", inst).await.unwrap();
    assert_eq!(old.id, new.id);
    old.abandon().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        c.instances("handover").await.unwrap().len(),
        1,
        "abandoning deleted the instance"
    );
    // Dropping, by contrast, deletes it (in the background).
    drop(new);
    let gone = eventually(Duration::from_secs(5), || async {
        c.instances("handover")
            .await
            .ok()
            .filter(|l| l.is_empty())
            .map(drop)
    })
    .await;
    assert!(gone.is_some(), "dropping did not delete the instance");
}
