//! Network partitions through the test-only `--enable-fault-injection` switch: each side
//! drops the Raft RPCs to and from the other (the HTTP API stays reachable, so the tests
//! can look at both sides).

use std::time::Duration;

use crate::support::*;
use crate::{assert_all_present, create_on_leader, has_service, write_acked, write_all, Cluster};

/// A client that gives up quickly (a write stuck on a minority leader never commits).
fn short_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

#[tokio::test]
async fn isolated_follower_cannot_write_and_catches_up_after_healing() {
    let cl = Cluster::start_with("10s");
    // A fresh cluster on a loaded machine may still change leaders once (a node that was
    // slow to start campaigns), so the first write is retried on whoever leads, and the
    // follower to cut off is picked from the leader after it.
    let first = eventually(Duration::from_secs(15), || async {
        let l = cl.leader().await;
        let r = call(
            &client(),
            "PUT",
            &cl.nodes[l].url("/services/before"),
            Some("{}"),
        )
        .await;
        (r.status == 200).then_some(())
    })
    .await;
    assert!(first.is_some(), "no write succeeded on the new cluster");
    let l = cl.leader().await;
    let f = (l + 1) % 3;
    let majority: Vec<usize> = (0..3).filter(|i| *i != f).collect();
    let raw = raw_client();
    cl.isolate(f).await;

    // The isolated node loses its leader (it times out and keeps campaigning alone)...
    let lost = eventually(Duration::from_secs(10), || async {
        let r = send(&raw, "GET", &cl.nodes[f].url("/raft/leader"), None)
            .await
            .ok()?;
        (r.status == 503).then_some(())
    })
    .await;
    assert!(lost.is_some(), "isolated node still reports a leader");
    // ...so its writes fail with "no known leader", redirected or not.
    let r = call(&raw, "PUT", &cl.nodes[f].url("/services/iso"), Some("{}")).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["message"], "discoverd: no known leader");
    let r = call(
        &client(),
        "PUT",
        &cl.nodes[f].url("/services/before/meta"),
        Some(r#"{"data":1,"index":0}"#),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.body);

    // The majority keeps (or re-establishes) a leader and keeps writing.
    let ml = cl.leader_of(&majority).await;
    assert_ne!(ml, f);
    let urls: Vec<String> = majority.iter().map(|i| cl.nodes[*i].url("")).collect();
    let names = write_all(urls, "maj", 10).await;
    // The isolated node does not see them while cut off.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // (Cut off for long, it would answer SERVFAIL rather than from its frozen state.)
    assert_ne!(has_service(&cl.nodes[f], "maj-0").await, Some(true));
    assert_ne!(has_service(&cl.nodes[f], "iso").await, Some(true));

    // After healing it catches up, and the cluster agrees on one leader again.
    cl.heal().await;
    assert_all_present(&cl.nodes[f], &names).await;
    cl.leader().await;
    let r = call(
        &client(),
        "PUT",
        &cl.nodes[f].url("/services/after"),
        Some("{}"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(has_service(&cl.nodes[f], "iso").await, Some(false));
}

#[tokio::test]
async fn isolated_leader_cannot_commit_and_majority_elects_a_new_one() {
    let cl = Cluster::start_with("10s");
    let old = create_on_leader(&cl, &[0, 1, 2], "hb").await;
    let majority: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    // An instance heartbeating to the leader that is about to be cut off.
    let (id, body) = instance_json("10.0.0.7:80");
    let hb_url = cl.nodes[old].url(&format!("/services/hb/instances/{id}"));
    let r = send(&short_client(), "PUT", &hb_url, Some(&body)).await;
    assert_eq!(r.unwrap().status, 200);
    cl.isolate(old).await;

    // Its heartbeats stop being acknowledged once the old leader's lease runs out
    // (within an election timeout): the majority never sees them and will expire it.
    let refused = eventually(Duration::from_secs(5), || async {
        let r = send(&short_client(), "PUT", &hb_url, Some(&body)).await;
        r.map_or(true, |r| r.status != 200).then_some(())
    })
    .await;
    assert!(
        refused.is_some(),
        "an isolated leader kept acknowledging heartbeats"
    );

    // A write sent to the old leader does not succeed: it cannot reach a quorum.
    let r = send(
        &short_client(),
        "PUT",
        &cl.nodes[old].url("/services/minority"),
        Some("{}"),
    )
    .await;
    assert!(
        r.as_ref().map_or(true, |r| r.status != 200),
        "a minority leader acknowledged a write"
    );
    // Nor does a linearizable read.
    let r = send(
        &short_client(),
        "GET",
        &cl.nodes[old].url("/services/minority/meta?consistent=true"),
        None,
    )
    .await;
    assert!(r
        .as_ref()
        .map_or(true, |r| r.status != 200 && r.status != 404));

    let nl = cl.leader_of(&majority).await;
    assert_ne!(nl, old);
    let urls: Vec<String> = majority.iter().map(|i| cl.nodes[*i].url("")).collect();
    // The majority keeps writing.
    let names = write_all(urls, "new", 10).await;

    cl.heal().await;
    assert_all_present(&cl.nodes[old], &names).await;
    let l = cl.leader().await;
    assert_eq!(has_service(&cl.nodes[l], "minority").await, Some(false));
    assert_eq!(has_service(&cl.nodes[old], "minority").await, Some(false));
}

/// The index in `purged.json` of a node's Raft log (0 when nothing is purged).
fn purged_index(node: &Discoverd) -> u64 {
    let path = node.data_dir.join("log").join("purged.json");
    std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["index"].as_u64())
        .unwrap_or(0)
}

/// A follower cut off for longer than the leader keeps its log (here `--snapshot-count
/// 10`: a snapshot every 10 entries, 10 kept behind it) can only catch up from a full
/// snapshot. It does, with everything acknowledged meanwhile; the snapshot it installed
/// is stored as embedded JSON, not as an array of byte numbers four times its size.
#[tokio::test]
async fn a_follower_behind_the_purged_log_catches_up_from_a_snapshot() {
    let cl = Cluster::start_nodes_with("10s", 3, 0, &["--snapshot-count", "10"]);
    let f = follower_with_service(&cl, "before").await;
    let majority: Vec<usize> = (0..3).filter(|i| *i != f).collect();
    cl.isolate(f).await;
    let r = call(
        &raw_client(),
        "GET",
        &cl.nodes[f].url("/services/before/instances"),
        None,
    )
    .await;
    let behind: u64 = r
        .header("Discoverd-Index")
        .and_then(|v| v.parse().ok())
        .expect("Discoverd-Index");

    let ml = cl.leader_of(&majority).await;
    let urls = vec![cl.nodes[ml].url("")];
    // The majority keeps writing.
    let names = write_all(urls, "snap", 60).await;
    // The leader has dropped log entries the cut-off follower still needs.
    let purged = eventually(Duration::from_secs(10), || async {
        let p = purged_index(&cl.nodes[cl.leader_of(&majority).await]);
        (p > behind + 1).then_some(p)
    })
    .await;
    assert!(
        purged.is_some(),
        "the leader never purged past index {behind}"
    );
    // (Not served from its frozen state: cut off for this long, it answers SERVFAIL.)
    assert_ne!(has_service(&cl.nodes[f], "snap-0").await, Some(true));

    cl.heal().await;
    assert_all_present(&cl.nodes[f], &names).await;
    assert_eq!(has_service(&cl.nodes[f], "before").await, Some(true));
    let snap = std::fs::read_to_string(cl.nodes[f].data_dir.join("sm").join("snapshot.json"))
        .expect("the follower stored the snapshot");
    assert!(
        !snap.contains("\"data\":["),
        "snapshot data stored as numbers"
    );
    assert!(snap.contains("snap-"), "snapshot data is not readable JSON");
    // It serves writes again as a member.
    let r = call(
        &client(),
        "PUT",
        &cl.nodes[f].url("/services/after"),
        Some("{}"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// A node that knows no leader for a while (cut off here; also one removed from the peers
/// while it was down, which nobody tells) gets no more entries: its watches end and its DNS
/// answers SERVFAIL for the zone instead of serving a state that no longer changes. Once
/// it follows a leader again, both work again.
#[tokio::test]
async fn a_node_without_a_leader_for_a_while_stops_serving_its_frozen_state() {
    let cl = Cluster::start_with("10s");
    let f = follower_with_service(&cl, "w").await;
    assert_all_present(&cl.nodes[f], &["w".to_string()]).await;
    // No overall request timeout: the watch must end from the server's side.
    let mut watch =
        watch_empty_service(&reqwest::Client::new(), &cl.nodes[f].url("/services/w")).await;

    cl.isolate(f).await;
    let (rest, ended) = read_to_end(&mut watch, Duration::from_secs(20)).await;
    assert!(ended, "the watch on the cut-off node stayed open: {rest:?}");
    assert!(rest.contains("event: error"), "{rest:?}");
    assert_eq!(
        has_service(&cl.nodes[f], "w").await,
        None,
        "DNS answered from a frozen state"
    );
    // Nor do its plain HTTP reads (a proxy's DNS asks them): 503, retry.
    let raw = raw_client();
    for path in [
        "/services/w/instances",
        "/services/w/leader",
        "/services/w/meta",
    ] {
        let r = call(&raw, "GET", &cl.nodes[f].url(path), None).await;
        assert_eq!(r.status, 503, "{path}: {}", r.body);
        assert_eq!(r.json()["retry"], true, "{path}: {}", r.body);
    }

    cl.heal().await;
    let back = eventually(Duration::from_secs(20), || async {
        has_service(&cl.nodes[f], "w").await.filter(|p| *p)
    })
    .await;
    assert!(back.is_some(), "DNS did not come back after healing");
    let r = call(&raw, "GET", &cl.nodes[f].url("/services/w/instances"), None).await;
    assert_ne!(r.status, 503, "{}", r.body);
}

/// The same for a leader cut off from the others: openraft keeps it leading until it hears
/// a higher vote, so it is the quorum's acknowledgements that tell. Its watches end, its DNS
/// answers SERVFAIL, it names no leader and refuses writes at once (503) instead of holding
/// them; an idle leader that its followers do acknowledge stays leader.
#[tokio::test]
async fn a_leader_cut_off_from_the_others_stops_serving_its_frozen_state() {
    // A 1 s election timeout: openraft's own leader lease (2 s) then leaves a wide window in
    // which a write proposed after the partition is accepted and cannot commit.
    let cl = Cluster::start_nodes_with("10s", 3, 0, &["--election-timeout", "1s"]);
    let l = create_on_leader(&cl, &[0, 1, 2], "w").await;
    assert_all_present(&cl.nodes[l], &["w".to_string()]).await;
    let raw = raw_client();

    // Idle for longer than the limit: the followers' heartbeat answers keep it leading.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let r = call(&raw, "GET", &cl.nodes[l].url("/raft/leader"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["host"], cl.nodes[l].addr.as_str());
    assert_eq!(has_service(&cl.nodes[l], "w").await, Some(true));
    let r = call(&raw, "PUT", &cl.nodes[l].url("/services/idle"), Some("{}")).await;
    assert_eq!(r.status, 200, "{}", r.body);

    let mut watch =
        watch_empty_service(&reqwest::Client::new(), &cl.nodes[l].url("/services/w")).await;
    // Writes one after another, from before the partition: the first one proposed after it
    // cannot commit, and is answered 503 (retry) after the 30 s apply timeout, not held for
    // good. Its answer is the first that is not a 200.
    let early = {
        let base = cl.nodes[l].url("/services/early");
        tokio::spawn(async move {
            let no_timeout = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap();
            for i in 0.. {
                let t0 = std::time::Instant::now();
                let r = call(&no_timeout, "PUT", &format!("{base}-{i}"), Some("{}")).await;
                if r.status != 200 {
                    return (r, t0.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            unreachable!()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    cl.isolate(l).await;
    // Cut off after 5 s without its quorum (9 s allowed on a loaded machine).
    let (rest, ended) = read_to_end(&mut watch, Duration::from_secs(9)).await;
    assert!(
        ended,
        "the watch on the cut-off leader stayed open: {rest:?}"
    );
    assert!(rest.contains("event: error"), "{rest:?}");
    assert_eq!(
        has_service(&cl.nodes[l], "w").await,
        None,
        "DNS answered from a frozen state"
    );
    let r = call(&raw, "GET", &cl.nodes[l].url("/raft/leader"), None).await;
    assert_eq!(r.status, 503, "{}", r.body);
    let t0 = std::time::Instant::now();
    let r = call(&raw, "PUT", &cl.nodes[l].url("/services/cut"), Some("{}")).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["message"], "discoverd: no known leader");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let (r, took) = tokio::time::timeout(Duration::from_secs(45), early)
        .await
        .expect("the early write was answered within 45 s")
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["retry"], true, "{}", r.body);
    assert!(took >= Duration::from_secs(25), "{took:?}");

    cl.heal().await;
    let back = eventually(Duration::from_secs(20), || async {
        has_service(&cl.nodes[l], "w").await.filter(|p| *p)
    })
    .await;
    assert!(back.is_some(), "DNS did not come back after healing");
    let nl = cl.leader().await;
    let r = call(
        &raw,
        "PUT",
        &cl.nodes[nl].url("/services/after"),
        Some("{}"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Creates service `name` (retried while a fresh cluster on a loaded machine may still
/// change leaders once); returns a follower of the leader after it.
async fn follower_with_service(cl: &Cluster, name: &str) -> usize {
    let urls: Vec<String> = cl.nodes.iter().map(|n| n.url("")).collect();
    write_acked(&client(), &urls, &mut 0, name).await;
    (cl.leader().await + 1) % 3
}

/// A follower that misses the leader's heartbeats for longer than the election timeout
/// while the others still hear it (cut off for a moment, or a process stopped: starved of
/// CPU, a stalled VM) does not unseat the working leader when it is back: with Pre-Vote it
/// asks first whether the others would vote for it, they still hear the leader and say no,
/// and its term stays where it was. Without Pre-Vote it raised its term on every timeout and
/// the leader stepped down when it heard that term.
#[tokio::test]
async fn a_follower_back_from_a_stall_does_not_unseat_the_leader() {
    // 300 ms: a loaded test machine alone does not start elections (the stalls are 1.5 s).
    let cl = Cluster::start_nodes_with("10s", 3, 0, &["--election-timeout", "300ms"]);
    let l = create_on_leader(&cl, &[0, 1, 2], "stall").await;
    let raw = raw_client();
    let term = |i: usize| {
        let (raw, url) = (raw.clone(), cl.nodes[i].url("/.well-known/status"));
        async move {
            let r = call(&raw, "GET", &url, None).await;
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()["data"]["detail"]["term"]
                .as_u64()
                .expect("status has the term")
        }
    };
    let before = term(l).await;
    let f = (l + 1) % 3;
    for round in 0..2 {
        cl.isolate(f).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // Cut off, it asked and was refused (or could not ask): its term did not move.
        // (The load on a test machine cannot make this one fail.)
        assert_eq!(
            term(f).await,
            before,
            "round {round}: the cut-off follower campaigned"
        );
        cl.heal().await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        cl.nodes[f].signal("STOP");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cl.nodes[f].signal("CONT");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(cl.leader().await, l, "round {round}: the leader changed");
        assert_eq!(term(l).await, before, "round {round}: an election was held");
    }
    let r = call(
        &raw,
        "PUT",
        &cl.nodes[l].url("/services/after-stall"),
        Some("{}"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}
