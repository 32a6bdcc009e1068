//! Records a history of concurrent metadata compare-and-swap writes and linearizable
//! reads (`?consistent=true`) from several clients against a 3-node cluster while the
//! leader is SIGKILLed and restarted and then partitioned away, and checks it with the
//! Wing–Gong checker in `lincheck`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::lincheck::{check, Op, Outcome, Verdict};
use crate::support::*;
use crate::{create_on_leader, Cluster};

const CLIENTS: u64 = 4;
/// Per-client operation cap: bounds the history (and so the search) size.
const MAX_OPS: usize = 90;

#[derive(Default)]
struct Recorded {
    ops: Vec<Op>,
    /// Every (value, index) pair a client observed, to check that a value has one index.
    indexes: Vec<(u64, u64)>,
}

fn decode_meta(r: &Reply) -> Option<(u64, u64)> {
    let v: Value = serde_json::from_str(&r.body).ok()?;
    Some((v["data"].as_u64()?, v["index"].as_u64()?))
}

async fn client_loop(
    id: u64,
    urls: Vec<String>,
    start: Instant,
    stop: Arc<AtomicBool>,
    rec: Arc<Mutex<Recorded>>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let now = || start.elapsed().as_micros() as u64;
    let mut rng = fastrand::Rng::with_seed(id);
    // What this client last saw: (value, index), or None for "no meta".
    let mut known: Option<(u64, u64)> = None;
    let mut seq = 0u64;
    for _ in 0..MAX_OPS {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let url = &urls[rng.usize(..urls.len())];
        if rng.bool() {
            let call = now();
            let r = send(
                &http,
                "GET",
                &format!("{url}/services/lin/meta?consistent=true"),
                None,
            )
            .await;
            let ret = now();
            let value = match r {
                Ok(r) if r.status == 200 => decode_meta(&r),
                Ok(r) if r.status == 404 && r.body.contains("service meta not found") => None,
                _ => continue, // no answer: a read without a result has no effect
            };
            let mut g = rec.lock().unwrap();
            if let Some(p) = value {
                g.indexes.push(p);
            }
            g.ops.push(Op::read(call, ret, value.map(|p| p.0)));
            known = value;
        } else {
            seq += 1;
            let new = id * 1_000_000 + seq;
            let body = format!(r#"{{"data":{new},"index":{}}}"#, known.map_or(0, |p| p.1));
            let call = now();
            let r = send(
                &http,
                "PUT",
                &format!("{url}/services/lin/meta"),
                Some(&body),
            )
            .await;
            let ret = now();
            let outcome = match &r {
                Ok(r) if r.status == 200 => Outcome::Ok,
                Ok(r) if r.status == 409 || r.status == 412 => Outcome::Fail,
                // Refused connections never reached a node: no effect.
                Err(e) if e.is_connect() => continue,
                _ => Outcome::Unknown,
            };
            let mut g = rec.lock().unwrap();
            g.ops
                .push(Op::cas(call, Some(ret), known.map(|p| p.0), new, outcome));
            if outcome == Outcome::Ok {
                let idx = r.as_ref().ok().and_then(decode_meta).map(|p| p.1);
                let idx = idx.expect("a successful CAS returns the stored meta");
                g.indexes.push((new, idx));
                known = Some((new, idx));
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(0..15))).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_cas_history_under_faults_is_linearizable() {
    let mut cl = Cluster::start_with("10s");
    let l = create_on_leader(&cl, &[0, 1, 2], "lin").await;

    let urls: Vec<String> = cl.nodes.iter().map(|n| n.url("")).collect();
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let rec = Arc::new(Mutex::new(Recorded::default()));
    let clients: Vec<_> = (1..=CLIENTS)
        .map(|id| {
            tokio::spawn(client_loop(
                id,
                urls.clone(),
                start,
                stop.clone(),
                rec.clone(),
            ))
        })
        .collect();

    // Faults: SIGKILL the leader and restart it; then cut the (new) leader off and heal.
    tokio::time::sleep(Duration::from_millis(800)).await;
    cl.nodes[l].kill();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    cl.nodes[l].start();
    let l2 = cl.leader().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cl.isolate(l2).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    cl.heal().await;
    cl.leader().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        tokio::time::timeout(Duration::from_secs(30), c)
            .await
            .expect("clients finish")
            .unwrap();
    }

    let rec = std::mem::take(&mut *rec.lock().unwrap());
    let ok = |o: Outcome| {
        rec.ops
            .iter()
            .filter(|op| matches!(op.kind, crate::lincheck::OpKind::Cas { outcome, .. } if outcome == o))
            .count()
    };
    let reads = rec
        .ops
        .iter()
        .filter(|op| matches!(op.kind, crate::lincheck::OpKind::Read { .. }))
        .count();
    eprintln!(
        "history: {} ops ({} reads, {} cas ok, {} cas failed, {} unknown)",
        rec.ops.len(),
        reads,
        ok(Outcome::Ok),
        ok(Outcome::Fail),
        ok(Outcome::Unknown)
    );
    assert!(ok(Outcome::Ok) >= 10 && reads >= 10, "too little happened");

    // A value is stored at one index, and distinct values at distinct indexes.
    let mut by_value: HashMap<u64, u64> = HashMap::new();
    let mut by_index: HashMap<u64, u64> = HashMap::new();
    for (v, i) in &rec.indexes {
        assert_eq!(
            *by_value.entry(*v).or_insert(*i),
            *i,
            "value {v} at two indexes"
        );
        assert_eq!(
            *by_index.entry(*i).or_insert(*v),
            *v,
            "index {i} holds two values"
        );
    }

    let started = Instant::now();
    let verdict = tokio::task::spawn_blocking(move || check(&rec.ops, 5_000_000))
        .await
        .unwrap();
    eprintln!("checked in {:?}", started.elapsed());
    assert_eq!(verdict, Verdict::Linearizable);
}
