//! Heartbeat expiry across a leader change (spec §2.6): heartbeat times live only in the
//! leader's memory, so a new leader must wait 2×TTL before expiring anything. An instance
//! that keeps heartbeating through the failover never goes down; one that stopped goes
//! down only once the new leader has led for 2×TTL.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;
use crate::{create_on_leader, Cluster};

const TTL: Duration = Duration::from_secs(2);

/// Heartbeats `body` as instance `id` of service `hb` through any node (following
/// redirects) every 300 ms, retrying faster after a failure, until `stop`.
async fn heartbeat(urls: Vec<String>, id: String, body: String, stop: Arc<AtomicBool>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let url = format!("{}/services/hb/instances/{id}", urls[i % urls.len()]);
        let ok = send(&http, "PUT", &url, Some(&body))
            .await
            .is_ok_and(|r| r.status == 200);
        let wait = if ok { 300 } else { 50 };
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
}

/// Records every instance event seen on `url` with the time it arrived.
async fn watch(url: String, seen: Arc<Mutex<Vec<(Instant, Value)>>>) {
    let resp = reqwest::Client::new()
        .get(url)
        .header("accept", "text/event-stream")
        .send()
        .await;
    let Ok(mut resp) = resp else { return };
    let mut buf = String::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = buf.find("\n\n") {
            let item: String = buf.drain(..i + 2).collect();
            for line in item.lines() {
                if let Some(d) = line.strip_prefix("data: ") {
                    if let Ok(v) = serde_json::from_str(d) {
                        seen.lock().unwrap().push((Instant::now(), v));
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_sigkill_expires_nothing_early() {
    let mut cl = Cluster::start_with("2s");
    let l = create_on_leader(&cl, &[0, 1, 2], "hb").await;
    let f = (l + 1) % 3;
    let c = client();
    let urls: Vec<String> = cl.nodes.iter().map(|n| n.url("")).collect();
    let (alive, alive_body) = instance_json("127.0.0.1:7001");
    let (quiet, quiet_body) = instance_json("127.0.0.1:7002");

    let seen = Arc::new(Mutex::new(Vec::new()));
    let watcher = tokio::spawn(watch(
        cl.nodes[f].url("/services/hb/instances"),
        seen.clone(),
    ));
    let stop_alive = Arc::new(AtomicBool::new(false));
    let stop_quiet = Arc::new(AtomicBool::new(false));
    let hb_alive = tokio::spawn(heartbeat(
        urls.clone(),
        alive.clone(),
        alive_body,
        stop_alive.clone(),
    ));
    let hb_quiet = tokio::spawn(heartbeat(
        urls.clone(),
        quiet.clone(),
        quiet_body.clone(),
        stop_quiet.clone(),
    ));
    let ups = eventually(Duration::from_secs(5), || async {
        let n = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| e["kind"] == "up")
            .count();
        (n == 2).then_some(())
    })
    .await;
    assert!(ups.is_some(), "both instances come up on the watched node");
    tokio::time::sleep(Duration::from_millis(700)).await;

    // The quiet instance's last heartbeat goes to the leader right before it dies.
    stop_quiet.store(true, Ordering::Relaxed);
    hb_quiet.await.unwrap();
    let last = call(
        &c,
        "PUT",
        &cl.nodes[l].url(&format!("/services/hb/instances/{quiet}")),
        Some(&quiet_body),
    )
    .await;
    assert_eq!(last.status, 200);
    let killed_at = Instant::now();
    cl.nodes[l].kill();
    let majority: Vec<usize> = (0..3).filter(|i| *i != l).collect();
    let nl = cl.leader_of(&majority).await;
    let elected_by = Instant::now();
    eprintln!(
        "new leader {nl} seen {:?} after the kill",
        elected_by - killed_at
    );

    // Wait for the quiet instance to go down (2×TTL after the election, plus slack).
    let down_of = |id: &str| {
        seen.lock()
            .unwrap()
            .iter()
            .find(|(_, e)| e["kind"] == "down" && e["instance"]["id"] == id)
            .map(|(t, _)| *t)
    };
    let quiet_down = eventually(TTL * 2 + Duration::from_secs(6), || async {
        down_of(&quiet)
    })
    .await
    .expect("the instance that stopped heartbeating expires");
    // The election happened after the kill and before we saw it.
    assert!(
        quiet_down >= killed_at + TTL * 2,
        "expired {:?} after the kill, before 2×TTL",
        quiet_down - killed_at
    );
    assert!(
        quiet_down <= elected_by + TTL * 2 + Duration::from_millis(1500),
        "expired {:?} after the new leader was seen; expected about 2×TTL",
        quiet_down - elected_by
    );
    eprintln!(
        "quiet instance expired {:?} after the kill",
        quiet_down - killed_at
    );
    // The instance that kept heartbeating never went down, also a while after.
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    assert_eq!(down_of(&alive), None, "a heartbeating instance expired");
    let list = call(
        &raw_client(),
        "GET",
        &cl.nodes[nl].url("/services/hb/instances"),
        None,
    )
    .await;
    let ids: Vec<String> = list
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec![alive.clone()]);
    stop_alive.store(true, Ordering::Relaxed);
    hb_alive.await.unwrap();
    watcher.abort();
}
