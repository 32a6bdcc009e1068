//! Proxy nodes and membership changes (spec §2.1, §2.3): a node that is not in its own
//! `--peers` list 307-redirects API calls to a random peer; `PUT|DELETE
//! /raft/peers/:peer` add and remove a voter; `POST /raft/promote` and `POST
//! /raft/demote` turn a proxy into a peer and back.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::*;
use crate::{assert_all_present, create_on_leader, has_service, write_all, Cluster};

const PEERS: [usize; 3] = [0, 1, 2];

/// `GET /raft/peers` on `node` without following redirects: the sorted list when the node
/// answers itself (it is a peer), `None` otherwise.
async fn peers_of(node: &Discoverd) -> Option<Vec<String>> {
    let r = send(&raw_client(), "GET", &node.url("/raft/peers"), None)
        .await
        .ok()?;
    if r.status != 200 {
        return None;
    }
    let mut v: Vec<String> = serde_json::from_str(&r.body).ok()?;
    v.sort();
    Some(v)
}

/// Waits until `node` lists exactly `want` (sorted) as the peers.
async fn wait_peers(node: &Discoverd, want: &[String]) {
    let mut want = want.to_vec();
    want.sort();
    let got = eventually(Duration::from_secs(15), || async {
        peers_of(node).await.filter(|p| *p == want)
    })
    .await;
    assert!(got.is_some(), "{} never listed peers {want:?}", node.addr);
}

/// The `Location` of a 307 from `node` for `GET path`, when it redirects.
async fn redirect_of(node: &Discoverd, path: &str) -> Option<String> {
    let r = send(&raw_client(), "GET", &node.url(path), None)
        .await
        .ok()?;
    (r.status == 307).then(|| r.header("location")).flatten()
}

/// Waits until `node` acts as a proxy: `GET path` is redirected to one of `peers`.
async fn wait_proxy(node: &Discoverd, peers: &[String], path: &str) {
    let loc = eventually(Duration::from_secs(15), || async {
        redirect_of(node, path).await
    })
    .await
    .unwrap_or_else(|| panic!("{} never turned into a proxy", node.addr));
    assert!(
        peers.iter().any(|p| loc == format!("http://{p}{path}")),
        "redirected to {loc}, not to a peer in {peers:?}"
    );
}

fn addrs(cl: &Cluster, which: &[usize]) -> Vec<String> {
    which.iter().map(|i| cl.nodes[*i].addr.clone()).collect()
}

fn urls(cl: &Cluster, which: &[usize]) -> Vec<String> {
    which.iter().map(|i| cl.nodes[*i].url("")).collect()
}

/// `call`, tried again (for up to 10 s) while the answer is 503: the cluster has no
/// leader that moment.
async fn call_unless_503(
    c: &reqwest::Client,
    method: &str,
    url: &str,
    body: Option<&str>,
) -> Reply {
    let start = std::time::Instant::now();
    loop {
        let r = call(c, method, url, body).await;
        if r.status != 503 || start.elapsed() > Duration::from_secs(10) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn proxy_redirects_api_calls_to_a_random_peer() {
    let cl = Cluster::start_nodes("10s", 3, 1);
    cl.leader_of(&PEERS).await;
    let px = &cl.nodes[3];
    let peers = addrs(&cl, &PEERS);
    let raw = raw_client();

    // Writes, reads and the Raft management reads are all redirected, path and query
    // kept, to a peer; a proxy adds no Discoverd-* headers.
    let cases = [
        ("PUT", "/services/px", Some("{}")),
        ("PUT", "/services/px/meta", Some(r#"{"data":1,"index":0}"#)),
        ("GET", "/services/px/meta?consistent=true", None),
        ("GET", "/services/px/instances", None),
        ("DELETE", "/services/px", None),
        ("GET", "/raft/leader", None),
        ("GET", "/raft/peers", None),
    ];
    let mut chosen = BTreeSet::new();
    for round in 0..6 {
        for (method, path, body) in cases {
            let r = call(&raw, method, &px.url(path), body).await;
            assert_eq!(r.status, 307, "{method} {path}: {}", r.body);
            let loc = r.header("location").expect("a Location header");
            let peer = peers
                .iter()
                .find(|p| loc == format!("http://{p}{path}"))
                .unwrap_or_else(|| panic!("{method} {path} redirected to {loc}"));
            chosen.insert(peer.clone());
            if round == 0 {
                assert!(r.header("discoverd-index").is_none());
                assert!(r.header("discoverd-peers").is_none());
            }
        }
    }
    // 42 redirects all to the same one of three peers would not be random.
    assert!(chosen.len() > 1, "always redirected to {chosen:?}");
    // Liveness stays local.
    assert_eq!(call(&raw, "GET", &px.url("/ping"), None).await.status, 200);

    // A client that follows redirects (body included) gets its writes and reads done.
    // (A busy machine can leave the cluster a moment without a leader: 503, tried again.)
    let c = client();
    let r = call_unless_503(&c, "PUT", &px.url("/services/px"), Some("{}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let m = call_unless_503(
        &c,
        "PUT",
        &px.url("/services/px/meta"),
        Some(r#"{"data":{"k":"v"},"index":0}"#),
    )
    .await;
    assert_eq!(m.status, 200, "{}", m.body);
    assert!(m.json()["index"].as_u64().unwrap() > 0);
    // A linearizable read through the proxy sees the write at once.
    let got = call(
        &c,
        "GET",
        &px.url("/services/px/meta?consistent=true"),
        None,
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(got.json(), m.json());
    let (id, body) = instance_json("127.0.0.1:7777");
    let r = call(
        &c,
        "PUT",
        &px.url(&format!("/services/px/instances/{id}")),
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Plain reads land on some peer and show the writes once it has applied them.
    let list = eventually(Duration::from_secs(10), || async {
        let r = send(&c, "GET", &px.url("/services/px/instances"), None)
            .await
            .ok()?;
        (r.status == 200).then(|| r.json())
    })
    .await
    .expect("the registration is readable through the proxy");
    assert_eq!(list[0]["id"], id.as_str());
    let r = call(&c, "GET", &px.url("/raft/peers"), None).await;
    assert_eq!(r.status, 200);
    let mut listed: Vec<String> = serde_json::from_str(&r.body).unwrap();
    listed.sort();
    assert_eq!(listed, peers, "the proxy is not a peer");
}

#[tokio::test]
async fn put_and_delete_raft_peers_add_and_remove_a_node() {
    let cl = Cluster::start_nodes("10s", 3, 1);
    let l = cl.leader_of(&PEERS).await;
    let f = (l + 1) % 3;
    let new = cl.nodes[3].addr.clone();
    let early = write_all(urls(&cl, &PEERS), "early", 10).await;
    // Before it is added the new node is a proxy.
    assert_eq!(peers_of(&cl.nodes[3]).await, None);

    // Membership changes are handled by the Raft leader: a follower redirects.
    let raw = raw_client();
    let path = format!("/raft/peers/{new}");
    let r = call(&raw, "PUT", &cl.nodes[f].url(&path), None).await;
    assert_eq!(r.status, 307, "{}", r.body);
    assert_eq!(
        r.header("location").unwrap(),
        format!("http://{}{path}", cl.nodes[l].addr)
    );
    let r = call(&client(), "PUT", &cl.nodes[f].url(&path), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let last = r.json()["last_index"].as_u64().expect("last_index");
    assert!(last > 10, "last_index {last} is before the earlier writes");

    // Every node lists it, and it catches up and serves reads from its own state.
    let mut four = addrs(&cl, &[0, 1, 2, 3]);
    four.sort();
    for n in &cl.nodes {
        wait_peers(n, &four).await;
    }
    assert_all_present(&cl.nodes[3], &early).await;
    let r = call(
        &raw,
        "GET",
        &cl.nodes[3].url("/services/early-0/meta"),
        None,
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let index: u64 = r.header("discoverd-index").unwrap().parse().unwrap();
    assert!(index >= last, "applied {index} < {last}");
    // New writes reach it too.
    let mid = write_all(urls(&cl, &[0, 1, 2, 3]), "mid", 8).await;
    assert_all_present(&cl.nodes[3], &mid).await;

    // Remove it again (through a follower, following the redirect).
    let r = call(&client(), "DELETE", &cl.nodes[f].url(&path), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let three = addrs(&cl, &PEERS);
    for i in PEERS {
        wait_peers(&cl.nodes[i], &three).await;
    }
    // The removed node is a proxy again, and the remaining cluster keeps writing.
    wait_proxy(&cl.nodes[3], &three, "/services/early-0/meta").await;
    let late = write_all(urls(&cl, &PEERS), "late", 10).await;
    let l = cl.leader_of(&PEERS).await;
    assert_all_present(&cl.nodes[l], &late).await;
}

#[tokio::test]
async fn promote_turns_a_proxy_into_a_peer_and_demote_turns_it_back() {
    let cl = Cluster::start_nodes("10s", 3, 1);
    cl.leader_of(&PEERS).await;
    let three = addrs(&cl, &PEERS);
    let before = write_all(urls(&cl, &PEERS), "before", 5).await;
    let px = &cl.nodes[3];
    let raw = raw_client();
    wait_proxy(px, &three, "/services/before-0/meta").await;

    let r = call(&raw, "POST", &px.url("/raft/promote"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["last_index"].as_u64().expect("last_index") > 0);
    let mut four = addrs(&cl, &[0, 1, 2, 3]);
    four.sort();
    for n in &cl.nodes {
        wait_peers(n, &four).await;
    }
    // It answers reads itself now, from state it replicated.
    assert_all_present(px, &before).await;
    let r = call(&raw, "GET", &px.url("/services/before-0/meta"), None).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.header("discoverd-index").is_some());
    // Promoting a peer is a no-op.
    let r = call(&raw, "POST", &px.url("/raft/promote"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Writes through it (a follower: redirected to the leader) are replicated back.
    let during = write_all(vec![px.url("")], "during", 5).await;
    assert_all_present(px, &during).await;
    // A watch on it while it is a peer (the client sees its own state).
    let mut watch = watch_empty_service(&raw, &px.url("/services/during-0")).await;

    let r = call(&raw, "POST", &px.url("/raft/demote"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Out of the peers it gets no more entries: the watch ends with an error (its client
    // reconnects, to a peer) instead of staying open on a state that no longer changes.
    let (rest, ended) = read_to_end(&mut watch, Duration::from_secs(10)).await;
    assert!(ended, "the watch on the demoted node stayed open: {rest:?}");
    assert!(rest.contains("event: error"), "{rest:?}");
    wait_proxy(px, &three, "/services/before-0/meta").await;
    for i in PEERS {
        wait_peers(&cl.nodes[i], &three).await;
    }
    // Demoting a proxy is a no-op.
    let r = call(&raw, "POST", &px.url("/raft/demote"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The three original peers keep a quorum and keep writing.
    let after = write_all(urls(&cl, &PEERS), "after", 10).await;
    let l = cl.leader_of(&PEERS).await;
    assert_all_present(&cl.nodes[l], &after).await;

    // It can be promoted again, and catches up with what it missed as a proxy.
    let r = call(&raw, "POST", &px.url("/raft/promote"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    for n in &cl.nodes {
        wait_peers(n, &four).await;
    }
    assert_all_present(px, &after).await;
    let again = write_all(urls(&cl, &[0, 1, 2, 3]), "again", 8).await;
    assert_all_present(px, &again).await;
}

/// The learners `node`'s status lists.
async fn learners(node: &Discoverd) -> serde_json::Value {
    let r = call(&client(), "GET", &node.url("/.well-known/status"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["data"]["detail"]["learners"].clone()
}

#[tokio::test]
async fn demoting_the_raft_leader_leaves_a_working_cluster() {
    let cl = Cluster::start_nodes("10s", 3, 0);
    let l = cl.leader_of(&PEERS).await;
    let first = write_all(urls(&cl, &PEERS), "first", 5).await;
    let r = call(
        &raw_client(),
        "POST",
        &cl.nodes[l].url("/raft/demote"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["last_index"].as_u64().expect("last_index") > 0);

    let rest: Vec<usize> = PEERS.into_iter().filter(|i| *i != l).collect();
    let two = addrs(&cl, &rest);
    let nl = cl.leader_of(&rest).await;
    assert_ne!(nl, l);
    for i in &rest {
        wait_peers(&cl.nodes[*i], &two).await;
    }
    // The old leader is a proxy to the two remaining peers, which keep writing (2 of 2).
    wait_proxy(&cl.nodes[l], &two, "/services/first-0/meta").await;
    let second = write_all(urls(&cl, &rest), "second", 10).await;
    for i in &rest {
        assert_all_present(&cl.nodes[*i], &first).await;
        assert_all_present(&cl.nodes[*i], &second).await;
    }
    // Writes through the proxy land as well.
    let third = write_all(vec![cl.nodes[l].url("")], "third", 3).await;
    assert_all_present(&cl.nodes[nl], &third).await;
    assert_eq!(has_service(&cl.nodes[nl], "third-2").await, Some(true));
}

#[tokio::test]
async fn a_peer_that_is_not_host_port_is_refused() {
    let cl = Cluster::start_nodes("10s", 3, 0);
    let l = cl.leader_of(&PEERS).await;
    let c = client();
    for bad in ["typo", "host:", ":1111", "host:0", "host:99999", "a%20b:1"] {
        let r = call(
            &c,
            "PUT",
            &cl.nodes[l].url(&format!("/raft/peers/{bad}")),
            None,
        )
        .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert_eq!(r.json()["code"], "validation_error", "{bad}: {}", r.body);
        let r = call(
            &c,
            "DELETE",
            &cl.nodes[l].url(&format!("/raft/peers/{bad}")),
            None,
        )
        .await;
        assert_eq!(r.status, 400, "DELETE {bad}: {}", r.body);
    }
    // Removing an address that is no peer: 404, and the membership is unchanged.
    let r = call(
        &c,
        "DELETE",
        &cl.nodes[l].url("/raft/peers/127.0.0.254:1"),
        None,
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.json()["code"], "object_not_found", "{}", r.body);
    // Well formed, but nobody answers there: refused after the 10 s it has to answer
    // (it used to be waited for forever), and not left in the membership.
    let no_timeout = reqwest::Client::new();
    let t0 = std::time::Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(40),
        call(
            &no_timeout,
            "PUT",
            &cl.nodes[l].url("/raft/peers/127.0.0.254:1"),
            None,
        ),
    )
    .await
    .expect("answered within 40 s");
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(
        r.json()["message"],
        "discoverd: peer 127.0.0.254:1 did not answer within 10 s; not added"
    );
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    let three = addrs(&cl, &PEERS);
    for i in PEERS {
        wait_peers(&cl.nodes[i], &three).await;
    }
    // Not left as a learner either (the leader would replicate to it for good).
    assert_eq!(learners(&cl.nodes[l]).await, serde_json::json!([]));
    // A client that gives up before the leader does: the learner still goes.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let url = cl.nodes[l].url("/raft/peers/127.0.0.253:1");
    assert!(
        impatient.put(&url).send().await.is_err(),
        "answered within 2 s"
    );
    assert_eq!(
        learners(&cl.nodes[l]).await,
        serde_json::json!(["127.0.0.253:1"])
    );
    let gone = eventually(Duration::from_secs(20), || async {
        (learners(&cl.nodes[l]).await == serde_json::json!([])).then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "a learner was left after its client went away"
    );
    // The cluster writes as before.
    let after = write_all(urls(&cl, &PEERS), "after", 3).await;
    assert_eq!(after.len(), 3);
}

/// A proxy has no state of its own: its DNS answers names of the zone from what a peer
/// says (it answered NXDOMAIN for everything from its empty state, so jobs on hosts that
/// run a proxy could resolve nothing), and it follows changes as the peers see them.
#[tokio::test]
async fn proxy_dns_answers_from_the_peers() {
    let cl = Cluster::start_nodes("10s", 3, 1);
    let l = create_on_leader(&cl, &PEERS, "pxdns").await;
    let px = &cl.nodes[3];
    let c = client();
    let (id, body) = instance_json("10.0.0.9:80");
    let path = format!("/services/pxdns/instances/{id}");
    let r = call(&c, "PUT", &cl.nodes[l].url(&path), Some(&body)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let found = eventually(Duration::from_secs(10), || async {
        has_service(px, "pxdns").await.filter(|p| *p)
    })
    .await;
    assert!(
        found.is_some(),
        "the proxy's DNS does not know a registered service"
    );
    assert_eq!(has_service(px, "nosuch").await, Some(false));
    // The empty non-terminals above its names answer NOERROR, not NXDOMAIN (which tells an
    // RFC 8020 or query-name-minimising resolver that nothing below exists): the service's
    // instance level (asked of a peer) and the levels above every service's names.
    for ent in ["pxdns._i", "_i", "_tcp"] {
        assert_eq!(has_service(px, ent).await, Some(true), "{ent}.discoverd.");
    }
    // Gone from the peers, gone from the proxy's answers.
    let r = call(&c, "DELETE", &cl.nodes[l].url(&path), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let gone = eventually(Duration::from_secs(10), || async {
        has_service(px, "pxdns").await.filter(|p| !*p)
    })
    .await;
    assert!(gone.is_some(), "the proxy's DNS kept a removed instance");
    // No instance left: nothing below the service's instance level.
    assert_eq!(has_service(px, "pxdns._i").await, Some(false));
}
