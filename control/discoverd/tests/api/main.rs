//! Single-node API scenarios (spec §2.3–§2.6, §2.10 handler/store tests) against a real
//! `flynn-discoverd` process.

#[path = "../support/mod.rs"]
mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

async fn node() -> (tempfile::TempDir, Discoverd, reqwest::Client) {
    let dir = tempfile::tempdir().unwrap();
    let d = Discoverd::single(dir.path(), "1s");
    elected(dir, d).await
}

/// `d` (in `dir`) and a client, once the single node has elected itself.
async fn elected(
    dir: tempfile::TempDir,
    d: Discoverd,
) -> (tempfile::TempDir, Discoverd, reqwest::Client) {
    let c = raw_client();
    eventually(Duration::from_secs(10), || async {
        let r = send(&c, "GET", &d.url("/raft/leader"), None).await.ok()?;
        (r.status == 200).then_some(())
    })
    .await
    .expect("single node elects itself");
    (dir, d, c)
}

/// `PUT` (register) or `DELETE` one instance of `svc`.
async fn instance(
    c: &reqwest::Client,
    d: &Discoverd,
    method: &str,
    svc: &str,
    id: &str,
    body: Option<&str>,
) -> Reply {
    let url = d.url(&format!("/services/{svc}/instances/{id}"));
    call(c, method, &url, body).await
}

#[tokio::test]
async fn service_create_conflict_and_name_validation() {
    let (_dir, d, c) = node().await;
    let r = call(&c, "PUT", &d.url("/services/abc"), Some("{}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "");
    assert!(r.header("discoverd-index").is_some());
    assert_eq!(
        r.header("discoverd-peers").as_deref(),
        Some(d.addr.as_str())
    );
    let r = call(&c, "PUT", &d.url("/services/abc"), Some("{}")).await;
    assert_eq!(r.status, 409);
    assert_eq!(
        r.body,
        r#"{"code":"object_exists","message":"discoverd: service \"abc\" already exists","retry":false}"#
    );
    for bad in ["XXX", "a_b", "a.b"] {
        let r = call(&c, "PUT", &d.url(&format!("/services/{bad}")), Some("{}")).await;
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.json()["code"], "validation_error");
        assert_eq!(
            r.json()["message"],
            "discoverd: service must be lowercase alphanumeric plus dash"
        );
    }
    // Truncated JSON is an unclassified error (500), bad JSON a syntax error.
    let r = call(&c, "PUT", &d.url("/services/t1"), Some(r#"{"leader_type""#)).await;
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["code"], "unknown_error");
    let r = call(&c, "PUT", &d.url("/services/t1"), Some("{]")).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "syntax_error");
    // `null` is the default config (an oldest-leader service), as Go decodes it.
    let r = call(&c, "PUT", &d.url("/services/tnull"), Some(" null\n")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = call(&c, "PUT", &d.url("/services/tnull"), Some("{}")).await;
    assert_eq!(r.status, 409, "{}", r.body);
    let r = c
        .put(d.url("/services/t2"))
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Delete: 200 then 404.
    let r = call(&c, "DELETE", &d.url("/services/abc"), None).await;
    assert_eq!(r.status, 200);
    let r = call(&c, "DELETE", &d.url("/services/abc"), None).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["message"], r#"discoverd: service "abc" not found"#);
}

/// `method path` declaring a 3 MB JSON body but sending only its first `limit` + 1 bytes
/// (just past the route's limit), over a raw connection; reads the answer until the
/// server closes. Sending no more than the server reads before it refuses keeps its
/// close clean: bytes left unread would turn it into a reset that can lose the answer.
async fn oversized(addr: &str, method: &str, path: &str, limit: usize) -> Reply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        3 << 20
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b' '; limit + 1]).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("answer within 10 s")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut headers = reqwest::header::HeaderMap::new();
    for l in lines {
        let (k, v) = l.split_once(':').unwrap();
        let k = reqwest::header::HeaderName::from_bytes(k.trim().as_bytes()).unwrap();
        headers.append(k, v.trim().parse().unwrap());
    }
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Input that axum's extractors refuse gets the JSON envelope too (spec §0.1): a path
/// segment that is not UTF-8, on every route with a path; a body over the limit (512 KiB
/// for API writes, each of which becomes a Raft entry; 2 MB for a vote) as
/// `request_body_too_big`, 400, and a raft RPC body that is not JSON, on routes with a
/// body.
#[tokio::test]
async fn refused_paths_and_bodies_get_the_json_envelope() {
    let (_dir, d, c) = node().await;
    call(&c, "PUT", &d.url("/services/web"), Some("{}")).await;
    let envelope = |r: &Reply, status: u16, code: &str, what: &str| {
        assert_eq!(r.status, status, "{what}: {}", r.body);
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("application/json")),
            "{what}: {:?}",
            r.header("content-type")
        );
        let v = r.json();
        assert_eq!(v["code"], code, "{what}");
        assert!(v["message"].is_string(), "{what}");
        assert_eq!(v["retry"], false, "{what}");
    };
    for (method, path) in [
        ("PUT", "/services/%FF"),
        ("DELETE", "/services/%FF"),
        ("GET", "/services/%FF"),
        ("PUT", "/services/%FF/meta"),
        ("GET", "/services/%FF/meta"),
        ("GET", "/services/%FF/instances"),
        ("PUT", "/services/web/instances/%FF"),
        ("DELETE", "/services/web/instances/%FF"),
        ("PUT", "/services/%FF/leader"),
        ("GET", "/services/%FF/leader"),
        ("PUT", "/raft/peers/%FF"),
        ("DELETE", "/raft/peers/%FF"),
    ] {
        let r = call(&c, method, &d.url(path), Some("{}")).await;
        envelope(&r, 400, "validation_error", &format!("{method} {path}"));
    }
    let (id, _) = instance_json("127.0.0.1:5000");
    let write_limit = flynn_discoverd::api::WRITE_BODY_LIMIT;
    assert_eq!(write_limit, 512 << 10);
    for (method, path, limit) in [
        ("PUT", "/services/big".to_string(), write_limit),
        ("PUT", "/services/web/meta".to_string(), write_limit),
        ("PUT", format!("/services/web/instances/{id}"), write_limit),
        ("PUT", "/services/web/leader".to_string(), write_limit),
        ("POST", "/raft/rpc/vote".to_string(), 2 << 20),
    ] {
        let r = oversized(&d.addr, method, &path, limit).await;
        envelope(&r, 400, "request_body_too_big", &format!("{method} {path}"));
    }
    let r = call(&c, "POST", &d.url("/raft/rpc/vote"), Some("{]")).await;
    envelope(&r, 400, "syntax_error", "vote with bad JSON");
    // Metadata within the body limit that writes longer than it (`1e15` is written as
    // `1000000000000000.0`) would be an entry over it: refused too.
    let nums = vec!["1e15"; write_limit / 6].join(",");
    let body = format!(r#"{{"data":[{nums}]}}"#);
    assert!(body.len() < write_limit);
    let r = call(&c, "PUT", &d.url("/services/web/meta"), Some(&body)).await;
    envelope(
        &r,
        400,
        "request_body_too_big",
        "meta that grows as an entry",
    );
    // Just under the limit is taken.
    let big = format!(r#"{{"data":"{}"}}"#, "x".repeat(write_limit - 100));
    let r = call(&c, "PUT", &d.url("/services/web/meta"), Some(&big)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Nothing refused above was written.
    let r = call(&c, "GET", &d.url("/services/web/meta"), None).await;
    assert_eq!(
        r.json()["data"].as_str().map(str::len),
        Some(write_limit - 100)
    );
}

#[tokio::test]
async fn instance_validation_and_listing() {
    let (_dir, d, c) = node().await;
    call(&c, "PUT", &d.url("/services/web"), Some("{}")).await;
    let (id, body) = instance_json("127.0.0.1:5000");
    // Unknown service.
    let r = instance(&c, &d, "PUT", "nope", &id, Some(&body)).await;
    assert_eq!(r.status, 404);
    // Zero instances: 404 with the quirky message.
    let r = call(&c, "GET", &d.url("/services/web/instances"), None).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["message"], r#"service not found: "web""#);
    // Missing proto.
    let r = instance(
        &c,
        &d,
        "PUT",
        "web",
        &id,
        Some(r#"{"id":"x","addr":"127.0.0.1:5000"}"#),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["message"], "discoverd: proto must be set");
    // Wrong id.
    let r = call(
        &c,
        "PUT",
        &d.url("/services/web/instances/abc"),
        Some(r#"{"id":"abc","addr":"127.0.0.1:5000","proto":"tcp"}"#),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["message"],
        format!("discoverd: instance id is incorrect, expected {id}")
    );
    // Register twice (heartbeat), then a second instance: sorted by index, index kept.
    for _ in 0..2 {
        let r = instance(&c, &d, "PUT", "web", &id, Some(&body)).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "");
    }
    let (id2, body2) = instance_json("127.0.0.1:5001");
    instance(&c, &d, "PUT", "web", &id2, Some(&body2)).await;
    let list = call(&c, "GET", &d.url("/services/web/instances"), None)
        .await
        .json();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![id.as_str(), id2.as_str()]);
    assert!(list[0]["index"].as_u64().unwrap() < list[1]["index"].as_u64().unwrap());
    // Deleting an unknown id of a service with instances is a silent 200; a service that
    // never had instances is 404.
    let r = call(
        &c,
        "DELETE",
        &d.url("/services/web/instances/unknown"),
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    call(&c, "PUT", &d.url("/services/empty"), Some("{}")).await;
    let r = call(
        &c,
        "DELETE",
        &d.url("/services/empty/instances/unknown"),
        None,
    )
    .await;
    assert_eq!(r.status, 404);
    assert!(r.json()["message"].as_str().unwrap().contains("empty"));
}

#[tokio::test]
async fn meta_compare_and_swap_table() {
    let (_dir, d, c) = node().await;
    let url = d.url("/services/db/meta");
    // Unknown service: 404 to a write; a read finds no meta.
    let r = call(&c, "PUT", &url, Some(r#"{"data":{"a":1},"index":0}"#)).await;
    assert_eq!(r.status, 404);
    let r = call(&c, "GET", &d.url("/services/nosuch/meta"), None).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], "object_not_found");
    assert_eq!(r.json()["message"], "service meta not found");
    call(&c, "PUT", &d.url("/services/db"), Some("{}")).await;
    let r = call(&c, "GET", &url, None).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["message"], "service meta not found");
    // index > 0 with no meta: 412.
    let r = call(&c, "PUT", &url, Some(r#"{"data":{"a":1},"index":7}"#)).await;
    assert_eq!(r.status, 412);
    // Create.
    let r = call(&c, "PUT", &url, Some(r#"{"data":{"foo":"bar"},"index":0}"#)).await;
    assert_eq!(r.status, 200);
    let m1 = r.json();
    let i1 = m1["index"].as_u64().unwrap();
    assert!(i1 > 0);
    assert_eq!(m1["data"], json!({"foo":"bar"}));
    // Create again: 409.
    let r = call(&c, "PUT", &url, Some(r#"{"data":{"x":1},"index":0}"#)).await;
    assert_eq!(r.status, 409);
    // Wrong index: 412.
    let r = call(
        &c,
        "PUT",
        &url,
        Some(&format!(r#"{{"data":{{"x":1}},"index":{}}}"#, i1 + 100)),
    )
    .await;
    assert_eq!(r.status, 412);
    assert_eq!(r.json()["code"], "precondition_failed");
    // Right index: advances.
    let r = call(
        &c,
        "PUT",
        &url,
        Some(&format!(r#"{{"data":{{"x":2}},"index":{i1}}}"#)),
    )
    .await;
    assert_eq!(r.status, 200);
    let i2 = r.json()["index"].as_u64().unwrap();
    assert!(i2 > i1);
    // The old index is stale now.
    let r = call(
        &c,
        "PUT",
        &url,
        Some(&format!(r#"{{"data":{{"x":3}},"index":{i1}}}"#)),
    )
    .await;
    assert_eq!(r.status, 412);
    let got = call(&c, "GET", &url, None).await.json();
    assert_eq!(got, json!({"data":{"x":2},"index":i2}));
}

#[tokio::test]
async fn oldest_and_manual_leaders() {
    let (_dir, d, c) = node().await;
    call(&c, "PUT", &d.url("/services/old"), Some("{}")).await;
    let r = call(&c, "GET", &d.url("/services/old/leader"), None).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["message"], "no leader found");
    let (a, ba) = instance_json("127.0.0.1:6000");
    let (b, bb) = instance_json("127.0.0.1:6001");
    instance(&c, &d, "PUT", "old", &a, Some(&ba)).await;
    instance(&c, &d, "PUT", "old", &b, Some(&bb)).await;
    let l = call(&c, "GET", &d.url("/services/old/leader"), None)
        .await
        .json();
    assert_eq!(l["id"], a.as_str());
    assert!(
        l["index"].as_u64().unwrap() > 0,
        "leader carries its fencing index"
    );
    // Setting a leader on an oldest service is refused.
    let r = call(
        &c,
        "PUT",
        &d.url("/services/old/leader"),
        Some(&format!(r#"{{"id":"{b}"}}"#)),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["message"],
        "service leader election type is not manual"
    );
    // Removing the oldest makes the next one leader.
    instance(&c, &d, "DELETE", "old", &a, None).await;
    let l = call(&c, "GET", &d.url("/services/old/leader"), None)
        .await
        .json();
    assert_eq!(l["id"], b.as_str());

    // Manual.
    call(
        &c,
        "PUT",
        &d.url("/services/man"),
        Some(r#"{"leader_type":"manual"}"#),
    )
    .await;
    instance(&c, &d, "PUT", "man", &a, Some(&ba)).await;
    instance(&c, &d, "PUT", "man", &b, Some(&bb)).await;
    let r = call(&c, "GET", &d.url("/services/man/leader"), None).await;
    assert_eq!(
        r.status, 404,
        "manual services have no leader until one is set"
    );
    let r = call(
        &c,
        "PUT",
        &d.url("/services/man/leader"),
        Some(&format!(r#"{{"id":"{b}"}}"#)),
    )
    .await;
    assert_eq!(r.status, 200);
    let l = call(&c, "GET", &d.url("/services/man/leader"), None)
        .await
        .json();
    assert_eq!(l["id"], b.as_str());
    // A leader naming no instance is no error (spec §2.6).
    let r = call(
        &c,
        "PUT",
        &d.url("/services/man/leader"),
        Some(r#"{"id":"x"}"#),
    )
    .await;
    assert_eq!(r.status, 200);
    // A null id is the empty id, as a missing one (null fields decode as their defaults).
    for body in [r#"{"id":null}"#, "{}"] {
        let r = call(&c, "PUT", &d.url("/services/man/leader"), Some(body)).await;
        assert_eq!(r.status, 200, "{body}: {}", r.body);
    }
    // A missing service has no manual election: 400 as for an oldest service, as Flynn's
    // handler answers for a nil config, and nothing is written.
    let before = call(&c, "GET", &d.url("/ping"), None).await;
    let r = call(
        &c,
        "PUT",
        &d.url("/services/ghost/leader"),
        Some(r#"{"id":"x"}"#),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "validation_error");
    assert_eq!(
        r.json()["message"],
        "service leader election type is not manual"
    );
    assert_eq!(
        r.header("discoverd-index"),
        before.header("discoverd-index"),
        "no raft entry for a refused leader"
    );
    // Meta with leader_id sets the leader.
    let r = call(
        &c,
        "PUT",
        &d.url("/services/man/meta"),
        Some(&format!(r#"{{"data":{{}},"index":0,"leader_id":"{a}"}}"#)),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.json().get("leader_id").is_none());
    let l = call(&c, "GET", &d.url("/services/man/leader"), None)
        .await
        .json();
    assert_eq!(l["id"], a.as_str());
}

#[tokio::test]
async fn stream_replays_up_leader_meta_then_current_and_goes_live() {
    let (_dir, d, c) = node().await;
    call(&c, "PUT", &d.url("/services/s"), Some("{}")).await;
    let (a, ba) = instance_json("127.0.0.1:7000");
    let (b, bb) = instance_json("127.0.0.1:7001");
    instance(&c, &d, "PUT", "s", &a, Some(&ba)).await;
    instance(&c, &d, "PUT", "s", &b, Some(&bb)).await;
    call(
        &c,
        "PUT",
        &d.url("/services/s/meta"),
        Some(r#"{"data":{"k":"v"},"index":0}"#),
    )
    .await;
    let mut resp = c.get(d.url("/services/s")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream; charset=utf-8"
    );
    let evs = read_events(&mut resp, 5, Duration::from_secs(5)).await;
    let kinds: Vec<&str> = evs.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["up", "up", "leader", "service_meta", "current"]);
    assert_eq!(evs[0]["instance"]["id"], a.as_str());
    assert_eq!(evs[1]["instance"]["id"], b.as_str());
    assert_eq!(evs[2]["instance"]["id"], a.as_str());
    // Live: removing the leader gives down then leader(b).
    instance(&c, &d, "DELETE", "s", &a, None).await;
    let evs = read_events(&mut resp, 2, Duration::from_secs(5)).await;
    let kinds: Vec<&str> = evs.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["down", "leader"]);
    assert_eq!(evs[1]["instance"]["id"], b.as_str());
    // Changed meta of an instance: update, same index.
    let upd = format!(r#"{{"id":"{b}","addr":"127.0.0.1:7001","proto":"tcp","meta":{{"x":"1"}}}}"#);
    instance(&c, &d, "PUT", "s", &b, Some(&upd)).await;
    let evs = read_events(&mut resp, 1, Duration::from_secs(5)).await;
    assert_eq!(evs[0]["kind"], "update");
    assert_eq!(evs[0]["instance"]["meta"]["x"], "1");

    // The instances stream has no `current` and no leader events.
    let mut inst = c
        .get(d.url("/services/s/instances"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let evs = read_events(&mut inst, 1, Duration::from_secs(5)).await;
    assert_eq!(evs[0]["kind"], "up");
    let more = read_events(&mut inst, 1, Duration::from_millis(300)).await;
    assert!(more.is_empty(), "{more:?}");
    // The leader stream sends only leader events.
    let mut lead = c
        .get(d.url("/services/s/leader"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let evs = read_events(&mut lead, 1, Duration::from_secs(5)).await;
    assert_eq!(evs[0]["kind"], "leader");
    // Deleting the service emits down for every instance and a leaderless leader event.
    call(&c, "DELETE", &d.url("/services/s"), None).await;
    let evs = read_events(&mut resp, 2, Duration::from_secs(5)).await;
    let kinds: Vec<&str> = evs.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["down", "leader"]);
    assert!(evs[1].get("instance").is_none());
}

#[tokio::test]
async fn instances_expire_only_after_heartbeats_stop() {
    // TTL 1 s: expiry is suppressed for 2 s after election, then 1 s without heartbeats.
    let (_dir, d, c) = node().await;
    call(&c, "PUT", &d.url("/services/hb"), Some("{}")).await;
    let (a, ba) = instance_json("127.0.0.1:8000");
    let (b, bb) = instance_json("127.0.0.1:8001");
    let mut resp = c.get(d.url("/services/hb")).send().await.unwrap();
    let _ = read_events(&mut resp, 1, Duration::from_secs(2)).await; // current
                                                                     // Keep `a` alive for 4 s with 300 ms heartbeats; register `b` once.
    instance(&c, &d, "PUT", "hb", &b, Some(&bb)).await;
    for _ in 0..14 {
        let r = instance(&c, &d, "PUT", "hb", &a, Some(&ba)).await;
        assert_eq!(r.status, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let list = call(&c, "GET", &d.url("/services/hb/instances"), None)
        .await
        .json();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![a.as_str()], "b expired, a kept alive");
    let evs = read_events(&mut resp, 8, Duration::from_secs(1)).await;
    assert!(
        evs.iter()
            .any(|e| e["kind"] == "down" && e["instance"]["id"] == b.as_str()),
        "{evs:?}"
    );
    // Stop heartbeating `a`: it goes within a few TTLs.
    let gone = eventually(Duration::from_secs(5), || async {
        let r = send(&c, "GET", &d.url("/services/hb/instances"), None)
            .await
            .ok()?;
        (r.status == 404).then_some(())
    })
    .await;
    assert!(gone.is_some(), "a expired after its heartbeats stopped");
}

#[tokio::test]
async fn state_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Discoverd::single_fixed(dir.path(), "10s");
    let c = client();
    let up = |d: &Discoverd| {
        let url = d.url("/raft/leader");
        let c = c.clone();
        async move {
            eventually(Duration::from_secs(10), || async {
                let r = send(&c, "GET", &url, None).await.ok()?;
                (r.status == 200).then_some(())
            })
            .await
            .expect("leader")
        }
    };
    up(&d).await;
    call(&c, "PUT", &d.url("/services/keep"), Some("{}")).await;
    let m = call(
        &c,
        "PUT",
        &d.url("/services/keep/meta"),
        Some(r#"{"data":[1,2],"index":0}"#),
    )
    .await
    .json();
    let (a, ba) = instance_json("127.0.0.1:9000");
    instance(&c, &d, "PUT", "keep", &a, Some(&ba)).await;
    d.kill();
    d.start();
    up(&d).await;
    let got = eventually(Duration::from_secs(10), || async {
        let r = send(&c, "GET", &d.url("/services/keep/meta"), None)
            .await
            .ok()?;
        (r.status == 200).then(|| r.json())
    })
    .await
    .expect("meta after restart");
    assert_eq!(got, m);
    let list = call(&c, "GET", &d.url("/services/keep/instances"), None)
        .await
        .json();
    assert_eq!(list[0]["id"], a.as_str());
}

/// `POST /raft/rpc/stream`: only as an upgrade; then length-prefixed JSON frames, a
/// result per request; a bad frame ends the stream without hurting the node.
#[tokio::test]
async fn raft_stream_needs_the_upgrade_and_answers_in_frames() {
    use flynn_discoverd::store::TypeConfig;
    use openraft::raft::{AppendEntriesRequest, StreamAppendError, StreamAppendResult};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (_dir, d, c) = node().await;
    let r = call(&c, "POST", &d.url("/raft/rpc/stream"), None).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "validation_error");

    let open = || async {
        let resp = c
            .post(d.url("/raft/rpc/stream"))
            .header("connection", "upgrade")
            .header("upgrade", "flynn-raft-append")
            .header("discoverd-from", "127.0.0.9:1")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 101);
        resp.upgrade().await.unwrap()
    };

    /// Writes one request frame (`len: u32 LE | JSON`).
    async fn send(io: &mut reqwest::Upgraded, req: &AppendEntriesRequest<TypeConfig>) {
        let body = serde_json::to_vec(req).unwrap();
        io.write_all(&(body.len() as u32).to_le_bytes())
            .await
            .unwrap();
        io.write_all(&body).await.unwrap();
        io.flush().await.unwrap();
    }
    /// Reads one result frame; `None` for the empty frame that ends a session.
    async fn read_result(io: &mut reqwest::Upgraded) -> Option<StreamAppendResult<TypeConfig>> {
        let mut len = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut len))
            .await
            .expect("a frame")
            .unwrap();
        let n = u32::from_le_bytes(len) as usize;
        if n == 0 {
            return None;
        }
        let mut buf = vec![0; n];
        io.read_exact(&mut buf).await.unwrap();
        Some(serde_json::from_slice(&buf).unwrap())
    }
    let request = |term: u64, committed: bool| AppendEntriesRequest::<TypeConfig> {
        vote: if committed {
            openraft::alias::VoteOf::<TypeConfig>::new_committed(term, 9)
        } else {
            openraft::alias::VoteOf::<TypeConfig>::new(term, 9)
        },
        prev_log_id: None,
        leader_commit: None,
        entries: vec![],
    };

    // A request from a stale leader (term 0) is answered with the node's higher vote.
    let mut io = open().await;
    let stale = request(0, false);
    send(&mut io, &stale).await;
    let res = read_result(&mut io).await.expect("a result frame");
    assert!(
        matches!(res, Err(StreamAppendError::HigherVote(_))),
        "{res:?}"
    );

    // Sessions one after another on one connection: each ends with an empty frame
    // from the leader, answered by the follower's results and then an empty frame. A
    // request with no entries that starts where the session's previous one ended (here:
    // the same entry-less request again) only repeats the previous result and is not
    // answered, except that the last request's result comes before the end frame: one
    // copy gets one result, two or three copies get two.
    let mut io = open().await;
    for session in 0..3u64 {
        // A higher term each session, in case the node called an election in between.
        let leader = request(1000 * (session + 1), true);
        for _ in 0..=session {
            send(&mut io, &leader).await;
        }
        io.write_all(&0u32.to_le_bytes()).await.unwrap();
        io.flush().await.unwrap();
        let results = if session == 0 { 1 } else { 2 };
        for _ in 0..results {
            let res = read_result(&mut io).await.expect("a result before the end");
            assert!(res.is_ok(), "session {session}: {res:?}");
        }
        assert!(
            read_result(&mut io).await.is_none(),
            "session {session}: {results} result(s), then the end"
        );
    }
    // A rejected request is always answered, even one that would not be when accepted
    // (the stale leader's request repeats the session's previous one): its result, and
    // the rejection ends the session and the connection, with no end frame.
    send(&mut io, &request(5000, true)).await;
    send(&mut io, &stale).await;
    let res = read_result(&mut io)
        .await
        .expect("the first request's result");
    assert!(res.is_ok(), "{res:?}");
    let res = read_result(&mut io).await.expect("the rejection");
    assert!(
        matches!(res, Err(StreamAppendError::HigherVote(_))),
        "{res:?}"
    );
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut rest))
        .await
        .expect("stream closed after the rejection")
        .unwrap();
    assert!(rest.is_empty(), "after the rejection: {rest:?}");

    // Garbage closes the stream; the node carries on.
    let mut io = open().await;
    io.write_all(&5u32.to_le_bytes()).await.unwrap();
    io.write_all(b"{]xx!").await.unwrap();
    io.flush().await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut rest))
        .await
        .expect("stream closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(call(&c, "GET", &d.url("/ping"), None).await.status, 200);
}

/// A full snapshot from a peer is the whole state as JSON: a state of a few MB is far
/// past axum's default 2 MB body limit, which answered 413 and left a lagging follower
/// unable ever to catch up. A 3 MB snapshot RPC is taken (here from a stale term: the
/// answer is the node's vote, not an error).
#[tokio::test]
async fn a_snapshot_rpc_over_two_megabytes_is_accepted() {
    use flynn_discoverd::network::SnapshotRequest;
    use flynn_discoverd::store::TypeConfig;
    let (_dir, d, c) = node().await;
    let req = SnapshotRequest {
        vote: openraft::alias::VoteOf::<TypeConfig>::new(0, 9),
        meta: openraft::alias::SnapshotMetaOf::<TypeConfig> {
            last_log_id: None,
            last_membership: Default::default(),
        },
        data: serde_json::to_vec(&serde_json::json!({
            "services": {"big": {}},
            "metas": {"big": {"data": "x".repeat(3 << 20), "index": 1}},
            "leaders": {},
            "instances": {},
        }))
        .unwrap(),
    };
    let body = serde_json::to_string(&req).unwrap();
    assert!(body.len() > 2 << 20, "{}", body.len());
    let r = call(&c, "POST", &d.url("/raft/rpc/snapshot"), Some(&body)).await;
    assert_ne!(r.status, 413, "snapshot refused as too large");
    assert_eq!(r.status, 200, "{:?}", r.json());
}

/// A snapshot RPC whose data does not decode as the registry is refused (400) before
/// openraft sees it: a state machine failing to install it is a storage error to openraft,
/// which stopped this node's Raft for good. The node goes on taking writes.
#[tokio::test]
async fn a_snapshot_rpc_that_does_not_decode_is_refused_and_the_node_goes_on() {
    use flynn_discoverd::network::SnapshotRequest;
    use flynn_discoverd::store::TypeConfig;
    use openraft::alias::{CommittedLeaderIdOf, LogIdOf, SnapshotMetaOf, VoteOf};
    let (_dir, d, c) = node().await;
    for data in [&b"{}"[..], b"[1,2,3]", b"\"null\"", br#"{"services":7}"#] {
        // From a higher term, past this node's log: openraft would install it.
        let req = SnapshotRequest {
            vote: VoteOf::<TypeConfig>::new_committed(100, 9),
            meta: SnapshotMetaOf::<TypeConfig> {
                last_log_id: Some(LogIdOf::<TypeConfig>::new(
                    CommittedLeaderIdOf::<TypeConfig> {
                        term: 100,
                        node_id: 9,
                    },
                    1000,
                )),
                last_membership: Default::default(),
            },
            data: data.to_vec(),
        };
        let body = serde_json::to_string(&req).unwrap();
        let r = call(&c, "POST", &d.url("/raft/rpc/snapshot"), Some(&body)).await;
        let what = String::from_utf8_lossy(data);
        assert_eq!(r.status, 400, "{what}: {}", r.body);
        assert_eq!(r.json()["code"], "validation_error", "{what}");
    }
    let r = call(&c, "PUT", &d.url("/services/after"), Some("{}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = call(&c, "GET", &d.url("/raft/leader"), None).await;
    assert_eq!(r.json()["host"], d.addr.as_str());
}

/// A snapshot RPC whose last log id names a later leader than the request's vote would
/// trip an assertion in openraft, which stopped this node's Raft for good: it is refused
/// (400, the JSON envelope) before openraft sees it, and the node goes on.
#[tokio::test]
async fn a_snapshot_rpc_from_an_earlier_leader_than_its_last_entry_is_refused() {
    use flynn_discoverd::network::SnapshotRequest;
    use flynn_discoverd::store::TypeConfig;
    use openraft::alias::{CommittedLeaderIdOf, LogIdOf, SnapshotMetaOf, VoteOf};
    let (_dir, d, c) = node().await;
    let leader = |term, node_id| CommittedLeaderIdOf::<TypeConfig> { term, node_id };
    let data = serde_json::to_vec(&flynn_discoverd::store::state::Data::default()).unwrap();
    // A higher term than the node's (it takes the vote), the last entry of a later one.
    for (vote, last) in [((50, 9), (100, 9)), ((100, 8), (100, 9))] {
        let req = SnapshotRequest {
            vote: VoteOf::<TypeConfig>::new_committed(vote.0, vote.1),
            meta: SnapshotMetaOf::<TypeConfig> {
                last_log_id: Some(LogIdOf::<TypeConfig>::new(leader(last.0, last.1), 1000)),
                last_membership: Default::default(),
            },
            data: data.clone(),
        };
        let body = serde_json::to_string(&req).unwrap();
        let r = call(&c, "POST", &d.url("/raft/rpc/snapshot"), Some(&body)).await;
        assert_eq!(r.status, 400, "{vote:?} {last:?}: {}", r.body);
        assert_eq!(r.json()["code"], "validation_error", "{}", r.body);
    }
    let r = call(&c, "PUT", &d.url("/services/after"), Some("{}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = call(&c, "GET", &d.url("/raft/leader"), None).await;
    assert_eq!(r.json()["host"], d.addr.as_str());
}

/// openraft's other assertion on a snapshot: one newer than the node's commit point must
/// end at a higher index (an equal or lower one contradicts entries committed here). A
/// snapshot whose last entry is of a much later term (and of the request's own leader, so
/// the first check passes) at an index the node has already committed is refused (400, the
/// JSON envelope) before openraft sees it, and the node goes on taking writes.
#[tokio::test]
async fn a_snapshot_rpc_newer_than_the_commit_point_at_no_higher_index_is_refused() {
    use flynn_discoverd::network::SnapshotRequest;
    use flynn_discoverd::store::TypeConfig;
    use openraft::alias::{CommittedLeaderIdOf, LogIdOf, SnapshotMetaOf, VoteOf};
    let (_dir, d, c) = node().await;
    for i in 0..5 {
        let r = call(&c, "PUT", &d.url(&format!("/services/s{i}")), Some("{}")).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let data = serde_json::to_vec(&flynn_discoverd::store::state::Data::default()).unwrap();
    // The commit point is past index 5 now (the writes, after the node's first entries).
    for index in [1, 3, 5] {
        let req = SnapshotRequest {
            vote: VoteOf::<TypeConfig>::new_committed(100, 9),
            meta: SnapshotMetaOf::<TypeConfig> {
                last_log_id: Some(LogIdOf::<TypeConfig>::new(
                    CommittedLeaderIdOf::<TypeConfig> {
                        term: 100,
                        node_id: 9,
                    },
                    index,
                )),
                last_membership: Default::default(),
            },
            data: data.clone(),
        };
        let body = serde_json::to_string(&req).unwrap();
        let r = call(&c, "POST", &d.url("/raft/rpc/snapshot"), Some(&body)).await;
        assert_eq!(r.status, 400, "index {index}: {}", r.body);
        assert_eq!(r.json()["code"], "validation_error", "{}", r.body);
    }
    let r = call(&c, "PUT", &d.url("/services/after"), Some("{}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = call(&c, "GET", &d.url("/raft/leader"), None).await;
    assert_eq!(r.json()["host"], d.addr.as_str());
}

/// After `POST /shutdown` the state stops changing: open watches end with an error event
/// (their clients reconnect elsewhere) instead of staying open on a frozen state.
#[tokio::test]
async fn shutdown_ends_open_watches() {
    let (_dir, d, c) = node().await;
    call(&c, "PUT", &d.url("/services/w"), Some("{}")).await;
    let mut watch = watch_empty_service(&c, &d.url("/services/w")).await;
    let r = call(&c, "POST", &d.url("/shutdown"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (rest, ended) = read_to_end(&mut watch, Duration::from_secs(5)).await;
    assert!(ended, "the watch stayed open after shutdown: {rest:?}");
    assert!(rest.contains("event: error"), "{rest:?}");
    assert!(rest.contains("no longer follows the cluster"), "{rest:?}");
}

/// The process raises its soft open-files limit to the hard one at startup (as Go
/// programs do): started with a low soft limit, it runs with the hard one.
#[test]
fn the_open_files_limit_is_raised_to_the_hard_limit() {
    use std::io::{BufRead, BufReader};
    let hard = std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(String::from))
        .expect("Max open files in /proc/self/limits");
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_flynn-discoverd");
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 256 && exec {bin} --data-dir {} --addr 127.0.0.1:0",
            dir.path().display()
        ))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.starts_with("listening"), "{line:?}");
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3).map(String::from))
        .unwrap();
    assert_eq!(soft, hard, "{limits}");
}

/// A node started with `extra` flags, once it leads itself.
async fn node_with(extra: &[&str]) -> (tempfile::TempDir, Discoverd, reqwest::Client) {
    let dir = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = vec!["--addr".into(), "127.0.0.1:0".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let d = Discoverd::spawn(dir.path(), args);
    elected(dir, d).await
}

/// A client that starts a request and never finishes its head is disconnected once
/// `--header-read-timeout` has passed (it was kept for good); a watch, whose head was
/// complete, goes on streaming past it.
#[tokio::test]
async fn a_request_head_not_finished_in_time_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_dir, d, _) = node_with(&["--header-read-timeout", "300ms"]).await;
    // No pooled connections: the server closes one idle for 300 ms, and a request written
    // to it as it closes would fail (a stall that long is possible on a busy machine).
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut watch = c.get(d.url("/services/slow")).send().await.unwrap();
    assert_eq!(watch.status(), 200);
    let mut s = tokio::net::TcpStream::connect(&d.addr).await.unwrap();
    s.write_all(b"GET /ping HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest))
        .await
        .expect("the connection is closed by the server");
    // Closed (EOF) or reset, with no answer to the half-sent request.
    if read.is_ok() {
        assert!(
            !String::from_utf8_lossy(&rest).contains(" 200 "),
            "{rest:?}"
        );
    }
    // The watch outlived the timeout: it still gets events.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = call(&c, "PUT", &d.url("/services/slow"), Some("{}")).await;
    assert_eq!(r.status, 200);
    let (a, ba) = instance_json("127.0.0.1:9100");
    instance(&c, &d, "PUT", "slow", &a, Some(&ba)).await;
    let evs = read_events(&mut watch, 2, Duration::from_secs(5)).await;
    assert!(
        evs.iter().any(|e| e["kind"] == "up"),
        "the watch still streams: {evs:?}"
    );
}

/// Past `--max-watches` open watches a new one (of any kind) is refused with a 503 JSON
/// error and `retry`; plain reads still work.
#[tokio::test]
async fn watches_past_the_limit_get_503() {
    let (_dir, d, c) = node_with(&["--max-watches", "2"]).await;
    call(&c, "PUT", &d.url("/services/w"), Some("{}")).await;
    let w1 = c.get(d.url("/services/w")).send().await.unwrap();
    let w2 = c
        .get(d.url("/services/w/leader"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!((w1.status().as_u16(), w2.status().as_u16()), (200, 200));
    for (path, sse) in [
        ("/services/w", false),
        ("/services/w/instances", true),
        ("/services/w/leader", true),
    ] {
        let mut req = c.get(d.url(path));
        if sse {
            req = req.header("accept", "text/event-stream");
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 503, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["code"], "service_unavailable", "{path}");
        assert_eq!(v["message"], "discoverd: too many watches", "{path}");
        assert_eq!(v["retry"], true, "{path}");
    }
    let r = call(&c, "GET", &d.url("/services/w/leader"), None).await;
    assert_eq!(r.status, 404, "{}", r.body);
    // A watch whose client went away gives its place back.
    drop(w1);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let w3 = loop {
        let r = c.get(d.url("/services/w")).send().await.unwrap();
        if r.status() == 200 {
            break r;
        }
        assert_eq!(r.status(), 503);
        assert!(
            std::time::Instant::now() < deadline,
            "the closed watch's place never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop((w2, w3));
}

/// Unknown paths and known paths with a method they do not serve get the JSON envelope
/// (they were bare 404 and 405 with empty bodies); a watch of an invalid service name is
/// refused like every other route (it was a 200 stream that never got an event).
#[tokio::test]
async fn unknown_paths_methods_and_watch_names_get_the_json_envelope() {
    let (_dir, d, c) = node().await;
    for (method, path) in [
        ("GET", "/nope"),
        ("PUT", "/services"),
        ("GET", "/services/a/b/c/d"),
    ] {
        let r = call(&c, method, &d.url(path), None).await;
        assert_eq!(r.status, 404, "{method} {path}: {}", r.body);
        assert_eq!(r.json()["code"], "not_found", "{method} {path}");
        assert!(r.json()["message"].is_string());
    }
    for (method, path) in [
        ("POST", "/services/web"),
        ("DELETE", "/services/web/meta"),
        ("PUT", "/ping"),
        ("GET", "/raft/rpc/vote"),
    ] {
        let r = call(&c, method, &d.url(path), None).await;
        assert_eq!(r.status, 405, "{method} {path}: {}", r.body);
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("application/json")),
            "{method} {path}"
        );
        assert_eq!(r.json()["code"], "validation_error", "{method} {path}");
        assert_eq!(r.json()["message"], "discoverd: method not allowed");
        assert!(r.header("allow").is_some(), "{method} {path}: no Allow");
    }
    for bad in ["WEB", "a_b", "a.b"] {
        let r = call(&c, "GET", &d.url(&format!("/services/{bad}")), None).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert_eq!(r.json()["code"], "validation_error", "{bad}");
    }
}
