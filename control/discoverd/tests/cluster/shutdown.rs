//! `POST /shutdown` (spec §2.3, §2.7 deployment takeover): the node answers with its
//! last Raft log index, then refuses every API call with 503 "discoverd: shutting
//! down"; the other peers keep working when they still have a quorum.

use std::time::Duration;

use crate::support::*;
use crate::{assert_all_present, has_service, write_all, Cluster};

/// Asserts that `node` answers API calls with 503 "discoverd: shutting down".
async fn assert_shut(node: &Discoverd) {
    let raw = raw_client();
    for (method, path, body) in [
        ("GET", "/services/a-0/meta", None),
        ("PUT", "/services/refused", Some("{}")),
        ("GET", "/services/a-0/instances", None),
        ("GET", "/raft/leader", None),
        ("GET", "/raft/peers", None),
        ("PUT", "/raft/peers/127.0.0.9:1111", None),
        ("POST", "/raft/promote", None),
    ] {
        let r = call(&raw, method, &node.url(path), body).await;
        assert_eq!(r.status, 503, "{method} {path}: {}", r.body);
        let j = r.json();
        assert_eq!(j["code"], "service_unavailable", "{method} {path}");
        assert_eq!(j["message"], "discoverd: shutting down", "{method} {path}");
    }
}

/// `POST /shutdown` on `node`: 200 `{"last_index": n}`; returns n.
async fn shutdown(node: &Discoverd) -> u64 {
    let r = call(&raw_client(), "POST", &node.url("/shutdown"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j.as_object().map(|o| o.len()), Some(1), "{j}");
    j["last_index"].as_u64().expect("last_index")
}

#[tokio::test]
async fn shutdown_of_a_follower_returns_last_index_then_refuses_calls() {
    let cl = Cluster::start();
    let l = cl.leader().await;
    let f = (l + 1) % 3;
    let urls: Vec<String> = cl.nodes.iter().map(|n| n.url("")).collect();
    let a = write_all(urls, "a", 10).await;
    assert_all_present(&cl.nodes[f], &a).await;
    let r = call(&raw_client(), "GET", &cl.nodes[f].url("/ping"), None).await;
    let applied: u64 = r.header("discoverd-index").unwrap().parse().unwrap();

    let last = shutdown(&cl.nodes[f]).await;
    assert!(last >= applied, "last_index {last} < applied {applied}");
    assert_shut(&cl.nodes[f]).await;
    // Also a second shutdown.
    let r = call(&raw_client(), "POST", &cl.nodes[f].url("/shutdown"), None).await;
    assert_eq!(r.status, 503, "{}", r.body);

    // Two of three peers: still a quorum, writes go on.
    let rest: Vec<usize> = (0..3).filter(|i| *i != f).collect();
    let nl = cl.leader_of(&rest).await;
    let urls: Vec<String> = rest.iter().map(|i| cl.nodes[*i].url("")).collect();
    let b = write_all(urls, "b", 10).await;
    for i in &rest {
        assert_all_present(&cl.nodes[*i], &b).await;
    }
    assert_eq!(has_service(&cl.nodes[nl], "refused").await, Some(false));
    assert_shut(&cl.nodes[f]).await;
}

#[tokio::test]
async fn shutdown_of_the_leader_lets_the_other_peers_take_over() {
    let cl = Cluster::start();
    let l = cl.leader().await;
    let urls: Vec<String> = cl.nodes.iter().map(|n| n.url("")).collect();
    let a = write_all(urls, "a", 10).await;
    let r = call(&raw_client(), "GET", &cl.nodes[l].url("/ping"), None).await;
    let applied: u64 = r.header("discoverd-index").unwrap().parse().unwrap();

    let last = shutdown(&cl.nodes[l]).await;
    assert!(last >= applied, "last_index {last} < applied {applied}");
    assert_shut(&cl.nodes[l]).await;

    // The other two elect a new leader among themselves and keep writing.
    let rest: Vec<usize> = (0..3).filter(|i| *i != l).collect();
    let nl = tokio::time::timeout(Duration::from_secs(20), cl.leader_of(&rest))
        .await
        .expect("a new leader in time");
    assert_ne!(nl, l);
    let urls: Vec<String> = rest.iter().map(|i| cl.nodes[*i].url("")).collect();
    let b = write_all(urls, "b", 10).await;
    for i in &rest {
        assert_all_present(&cl.nodes[*i], &a).await;
        assert_all_present(&cl.nodes[*i], &b).await;
    }
    assert_shut(&cl.nodes[l]).await;
}
