//! The workloads, each written once per server API: metadata compare-and-swap by N
//! clients, registrations then heartbeats, register → watch event latency, and the probe
//! write used to time a leader failover.
//!
//! | workload | flynn-discoverd | etcd, native gRPC (default) | etcd, JSON gateway (`--etcd-api gateway`) |
//! |---|---|---|---|
//! | CAS | `PUT /services/:s/meta` `{"data":…,"index":i}` (i = the index the last success returned, 0 creates) | `KV.Txn` compare `mod_revision == r` (0: key absent), success: put; r = the txn's revision | the same txn as `POST /v3/kv/txn` |
//! | register | `PUT /services/:s/instances/:id` (new instance: one Raft write) | `Lease.LeaseGrant` (TTL 10 s) + `KV.Put` with that lease (two Raft writes, as any etcd registration with a TTL) | `POST /v3/lease/grant` + `POST /v3/kv/put` |
//! | heartbeat | the same PUT again, unchanged (leader memory only) | one request/response on the client's long-lived `Lease.LeaseKeepAlive` stream (leader memory only) | `POST /v3/lease/keepalive` (a new gRPC stream inside etcd per request) |
//! | watch | SSE `GET /services/:s`, the `up` event | a `Watch.Watch` stream on the prefix, the put event | `POST /v3/watch`, the put event |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tokio::sync::mpsc;

use super::cluster::{Cluster, EtcdApi, Kind};
use super::grpc::Etcd;
use super::http::{b64, instance_id, prefix_end, str_field, unb64, Http, TIMEOUT};

/// How the workloads talk to a cluster's node: discoverd's HTTP API, etcd's JSON gateway
/// (both with the pooled HTTP/1.1 client) or etcd's gRPC API (one HTTP/2 connection).
#[derive(Clone)]
pub enum Conn {
    Flynn(Http),
    Gateway(Http),
    Grpc(Etcd),
}

impl Conn {
    /// A connection to node `i` (gRPC: connected here, before anything is timed).
    pub async fn to(h: &Http, c: &Cluster, i: usize) -> Result<Conn> {
        Ok(match (c.id.kind, c.etcd_api) {
            (Kind::Flynn, _) => Conn::Flynn(h.clone()),
            (Kind::Etcd, EtcdApi::Gateway) => Conn::Gateway(h.clone()),
            (Kind::Etcd, EtcdApi::Grpc) => Conn::Grpc(Etcd::connect(&c.nodes[i].client).await?),
        })
    }
}

/// Counts, time, CPU and per-op latencies of one timed phase.
#[derive(Clone, Debug, Default)]
pub struct Phase {
    pub ok: u64,
    pub errors: u64,
    pub elapsed_s: f64,
    /// CPU seconds of every node of the cluster over `elapsed_s`.
    pub cpu_s: f64,
    /// Per-operation latency, µs (CAS: request → response; watch: write sent → event).
    pub lat_us: Vec<f64>,
    pub first_error: Option<String>,
}

impl Phase {
    pub fn rate(&self) -> Option<f64> {
        (self.elapsed_s > 0.0 && self.ok > 0).then(|| self.ok as f64 / self.elapsed_s)
    }
    pub fn cpu_us_per_op(&self) -> Option<f64> {
        (self.ok > 0 && self.cpu_s > 0.0).then(|| self.cpu_s * 1e6 / self.ok as f64)
    }
    fn merge(&mut self, w: Worker) {
        self.ok += w.ok;
        self.errors += w.errors;
        self.lat_us.extend(w.lat_us);
        if self.first_error.is_none() {
            self.first_error = w.first_error;
        }
    }
}

#[derive(Default)]
struct Worker {
    ok: u64,
    errors: u64,
    lat_us: Vec<f64>,
    first_error: Option<String>,
}

impl Worker {
    fn fail(&mut self, e: anyhow::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{e:#}"));
        }
    }
}

/// How long and how much a phase may run.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub ops: u64,
    pub max: Duration,
}

/// Hands out up to `ops` tickets until `deadline`.
struct Tickets {
    next: AtomicU64,
    ops: u64,
    deadline: Instant,
}

impl Tickets {
    fn new(l: Limits) -> Arc<Tickets> {
        Arc::new(Tickets {
            next: AtomicU64::new(0),
            ops: l.ops,
            deadline: Instant::now() + l.max,
        })
    }
    fn take(&self) -> Option<u64> {
        if Instant::now() >= self.deadline {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (n < self.ops).then_some(n)
    }
    fn taken(&self) -> u64 {
        self.next.load(Ordering::Relaxed).min(self.ops)
    }
}

fn us(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e6
}

async fn join(tasks: Vec<tokio::task::JoinHandle<Worker>>) -> Result<Phase> {
    let mut p = Phase::default();
    for t in tasks {
        p.merge(t.await.context("a client task panicked")?);
    }
    Ok(p)
}

// ---------------------------------------------------------------------------------------
// Metadata compare-and-swap
// ---------------------------------------------------------------------------------------

/// Each of `clients` clients owns one key (a service's meta; an etcd key) and swaps it in a
/// loop, always with the index its last success returned: every CAS should succeed. After
/// a failure the client re-reads the current index. etcd over gRPC: every client shares one
/// HTTP/2 connection to the leader, as the goroutines of one etcd client do.
pub async fn cas(
    h: &Http,
    c: &Cluster,
    leader: usize,
    run: usize,
    clients: usize,
    lim: Limits,
) -> Result<Phase> {
    let base = c.nodes[leader].url("");
    let conn = Conn::to(h, c, leader).await?;
    let mut keys = Vec::new();
    for k in 0..clients {
        match &conn {
            Conn::Flynn(h) => {
                let s = format!("cas-r{run}-c{k}");
                h.put(&format!("{base}/services/{s}"), "{}")
                    .await?
                    .ok()
                    .with_context(|| format!("creating service {s}"))?;
                keys.push(format!("{base}/services/{s}/meta"));
            }
            Conn::Gateway(_) => keys.push(b64(&format!("cas/r{run}/c{k}"))),
            Conn::Grpc(_) => keys.push(format!("cas/r{run}/c{k}")),
        }
    }
    let cpu0 = c.cpu_seconds();
    let t0 = Instant::now();
    let tickets = Tickets::new(lim);
    let tasks = keys
        .into_iter()
        .map(|key| {
            let (conn, base, tickets) = (conn.clone(), base.clone(), tickets.clone());
            tokio::spawn(async move {
                let mut w = Worker::default();
                let mut index = 0u64;
                while let Some(n) = tickets.take() {
                    let s = Instant::now();
                    let r = match &conn {
                        Conn::Flynn(h) => cas_flynn(h, &key, index, n).await,
                        Conn::Gateway(h) => cas_etcd(h, &base, &key, index, n).await,
                        Conn::Grpc(g) => cas_grpc(g, &key, index, n).await,
                    };
                    match r {
                        Ok(i) => {
                            index = i;
                            w.ok += 1;
                            w.lat_us.push(us(s));
                        }
                        Err(e) => {
                            w.fail(e);
                            let re = match &conn {
                                Conn::Flynn(h) => read_meta_index(h, &key).await,
                                Conn::Gateway(h) => read_mod_revision(h, &base, &key).await,
                                Conn::Grpc(g) => g
                                    .mod_revision(key.as_bytes(), TIMEOUT)
                                    .await
                                    .map(|r| r.max(0) as u64),
                            };
                            if let Ok(i) = re {
                                index = i;
                            }
                        }
                    }
                }
                w
            })
        })
        .collect();
    let mut p = join(tasks).await?;
    p.elapsed_s = t0.elapsed().as_secs_f64();
    p.cpu_s = c.cpu_seconds() - cpu0;
    Ok(p)
}

async fn cas_grpc(g: &Etcd, key: &str, rev: u64, n: u64) -> Result<u64> {
    let value = format!(r#"{{"n":{n}}}"#).into_bytes();
    match g.cas(key.as_bytes(), rev as i64, value, TIMEOUT).await? {
        Some(r) => Ok(r.max(0) as u64),
        None => bail!("compare failed (mod_revision != {rev})"),
    }
}

async fn cas_flynn(h: &Http, url: &str, index: u64, n: u64) -> Result<u64> {
    let r = h
        .put(url, &format!(r#"{{"data":{{"n":{n}}},"index":{index}}}"#))
        .await?;
    r.ok()?;
    r.json()?["index"]
        .as_u64()
        .context("no index in the stored meta")
}

async fn cas_etcd(h: &Http, base: &str, key: &str, rev: u64, n: u64) -> Result<u64> {
    let value = b64(&format!(r#"{{"n":{n}}}"#));
    let body = format!(
        r#"{{"compare":[{{"key":"{key}","target":"MOD","mod_revision":"{rev}","result":"EQUAL"}}],"success":[{{"request_put":{{"key":"{key}","value":"{value}"}}}}]}}"#
    );
    let r = h.post(&format!("{base}/v3/kv/txn"), &body).await?;
    r.ok()?;
    let v = r.json()?;
    if v["succeeded"] != Value::Bool(true) {
        bail!("compare failed (mod_revision != {rev})");
    }
    str_field(&v["header"]["revision"])
        .parse()
        .context("no revision in the txn response")
}

async fn read_meta_index(h: &Http, url: &str) -> Result<u64> {
    let r = h.get(url).await?;
    if r.status == 404 {
        return Ok(0);
    }
    r.ok()?;
    r.json()?["index"].as_u64().context("no index")
}

async fn read_mod_revision(h: &Http, base: &str, key: &str) -> Result<u64> {
    let r = h
        .post(
            &format!("{base}/v3/kv/range"),
            &format!(r#"{{"key":"{key}"}}"#),
        )
        .await?;
    r.ok()?;
    let v = r.json()?;
    Ok(str_field(&v["kvs"][0]["mod_revision"]).parse().unwrap_or(0))
}

// ---------------------------------------------------------------------------------------
// Registrations and heartbeats
// ---------------------------------------------------------------------------------------

fn instance(run: usize, i: u64) -> (String, String) {
    let addr = format!(
        "10.{}.{}.{}:{}",
        run % 250,
        (i / 250) % 250,
        i % 250,
        1000 + i / 62_500
    );
    let id = instance_id("tcp", &addr);
    let body = format!(r#"{{"id":"{id}","addr":"{addr}","proto":"tcp","meta":{{"perf":"1"}}}}"#);
    (id, body)
}

/// Registers `instances` new instances with `clients` clients, then heartbeats them round
/// robin until `heartbeats` heartbeats; each phase also stops after `max`. Returns
/// (registrations, heartbeats). Everything is removed afterwards (not timed). etcd over
/// gRPC: every heartbeat client opens its `LeaseKeepAlive` stream before the heartbeat
/// phase starts (as a client keeps it open) and sends all its keepalives on it.
#[allow(clippy::too_many_arguments)]
pub async fn reg(
    h: &Http,
    c: &Cluster,
    leader: usize,
    run: usize,
    clients: usize,
    instances: u64,
    heartbeats: u64,
    max: Duration,
) -> Result<(Phase, Phase)> {
    let base = c.nodes[leader].url("");
    let conn = Conn::to(h, c, leader).await?;
    let service = format!("reg-r{run}");
    if let Conn::Flynn(h) = &conn {
        h.put(&format!("{base}/services/{service}"), "{}")
            .await?
            .ok()
            .context("creating the service")?;
    }
    let items: Arc<Vec<(String, String)>> = Arc::new(
        (0..instances)
            .map(|i| {
                let (id, body) = instance(run, i);
                match &conn {
                    Conn::Flynn(_) => (format!("{base}/services/{service}/instances/{id}"), body),
                    Conn::Gateway(_) => (b64(&format!("reg/r{run}/{id}")), b64(&body)),
                    Conn::Grpc(_) => (format!("reg/r{run}/{id}"), body),
                }
            })
            .collect(),
    );
    // etcd: the lease of each registered instance, by instance number.
    let leases: Arc<Mutex<Vec<Option<i64>>>> = Arc::new(Mutex::new(vec![None; instances as usize]));

    // Phase 1: registrations.
    let cpu0 = c.cpu_seconds();
    let t0 = Instant::now();
    let tickets = Tickets::new(Limits {
        ops: instances,
        max,
    });
    let tasks = (0..clients)
        .map(|_| {
            let (conn, base, tickets, items, leases) = (
                conn.clone(),
                base.clone(),
                tickets.clone(),
                items.clone(),
                leases.clone(),
            );
            tokio::spawn(async move {
                let mut w = Worker::default();
                while let Some(i) = tickets.take() {
                    let (a, b) = &items[i as usize];
                    let s = Instant::now();
                    let lease = match &conn {
                        Conn::Flynn(h) => h.put(a, b).await.and_then(|r| r.ok()).map(|()| None),
                        Conn::Gateway(h) => register_etcd(h, &base, a, b).await.map(Some),
                        Conn::Grpc(g) => register_grpc(g, a, b).await.map(Some),
                    };
                    match lease {
                        Ok(lease) => {
                            w.ok += 1;
                            w.lat_us.push(us(s));
                            if let (Some(lease), Ok(mut l)) = (lease, leases.lock()) {
                                l[i as usize] = Some(lease);
                            }
                        }
                        Err(e) => w.fail(e),
                    }
                }
                w
            })
        })
        .collect();
    let mut regs = join(tasks).await?;
    regs.elapsed_s = t0.elapsed().as_secs_f64();
    regs.cpu_s = c.cpu_seconds() - cpu0;
    let registered = tickets.taken().max(1);

    // Phase 2: heartbeats of the registered instances, round robin.
    let lease_list: Arc<Vec<Option<i64>>> =
        Arc::new(leases.lock().map(|l| l.clone()).unwrap_or_default());
    // gRPC: each client's keepalive stream, opened (untimed) with a keepalive of the first
    // registered lease.
    let mut streams = Vec::new();
    for _ in 0..clients {
        streams.push(match &conn {
            Conn::Grpc(g) => {
                let first = lease_list
                    .iter()
                    .flatten()
                    .next()
                    .copied()
                    .context("no instance was registered")?;
                let (ka, _) = g
                    .keepalive_stream(first, TIMEOUT)
                    .await
                    .context("opening a LeaseKeepAlive stream")?;
                Some(ka)
            }
            _ => None,
        });
    }
    let cpu1 = c.cpu_seconds();
    let t1 = Instant::now();
    let tickets = Tickets::new(Limits {
        ops: heartbeats,
        max,
    });
    let tasks = streams
        .into_iter()
        .map(|mut stream| {
            let (conn, base, tickets, items, lease_list) = (
                conn.clone(),
                base.clone(),
                tickets.clone(),
                items.clone(),
                lease_list.clone(),
            );
            tokio::spawn(async move {
                let mut w = Worker::default();
                while let Some(j) = tickets.take() {
                    let i = (j % registered) as usize;
                    let s = Instant::now();
                    let r = match (&conn, lease_list[i], stream.as_mut()) {
                        (Conn::Flynn(h), _, _) => {
                            let (a, b) = &items[i];
                            h.put(a, b).await.and_then(|r| r.ok())
                        }
                        (_, None, _) => Err(anyhow::anyhow!("instance {i} has no lease")),
                        (Conn::Gateway(h), Some(lease), _) => keepalive_etcd(h, &base, lease).await,
                        (Conn::Grpc(_), Some(lease), Some(ka)) => {
                            ka.keepalive(lease, TIMEOUT).await.map(|_| ())
                        }
                        (Conn::Grpc(_), Some(_), None) => {
                            Err(anyhow::anyhow!("no keepalive stream"))
                        }
                    };
                    match r {
                        Ok(()) => {
                            w.ok += 1;
                            w.lat_us.push(us(s));
                        }
                        Err(e) => w.fail(e),
                    }
                }
                w
            })
        })
        .collect();
    let mut hbs = join(tasks).await?;
    hbs.elapsed_s = t1.elapsed().as_secs_f64();
    hbs.cpu_s = c.cpu_seconds() - cpu1;

    // Cleanup, so nothing expires during later runs.
    if let Conn::Flynn(h) = &conn {
        let _ = h.delete(&format!("{base}/services/{service}")).await;
    } else {
        let ids: Vec<i64> = lease_list.iter().flatten().copied().collect();
        let ids = Arc::new(ids);
        let next = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let (conn, base, ids, next) =
                    (conn.clone(), base.clone(), ids.clone(), next.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some(id) = ids.get(i) else { break };
                        match &conn {
                            Conn::Grpc(g) => {
                                let _ = g.lease_revoke(*id, TIMEOUT).await;
                            }
                            Conn::Gateway(h) | Conn::Flynn(h) => {
                                let _ = h
                                    .post(
                                        &format!("{base}/v3/lease/revoke"),
                                        &format!(r#"{{"ID":"{id}"}}"#),
                                    )
                                    .await;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }
    Ok((regs, hbs))
}

/// Lease grant (TTL 10 s, discoverd's instance TTL) + put with the lease; the lease id.
async fn register_etcd(h: &Http, base: &str, key: &str, value: &str) -> Result<i64> {
    let r = h
        .post(&format!("{base}/v3/lease/grant"), r#"{"TTL":"10"}"#)
        .await?;
    r.ok()?;
    let lease: i64 = str_field(&r.json()?["ID"])
        .parse()
        .with_context(|| format!("lease grant without an ID: {}", r.text()))?;
    let r = h
        .post(
            &format!("{base}/v3/kv/put"),
            &format!(r#"{{"key":"{key}","value":"{value}","lease":"{lease}"}}"#),
        )
        .await?;
    r.ok()?;
    Ok(lease)
}

/// The same over gRPC: `Lease.LeaseGrant` then `KV.Put`.
async fn register_grpc(g: &Etcd, key: &str, value: &str) -> Result<i64> {
    let lease = g.lease_grant(10, TIMEOUT).await?;
    g.put(key.as_bytes(), value.as_bytes(), lease, TIMEOUT)
        .await?;
    Ok(lease)
}

async fn keepalive_etcd(h: &Http, base: &str, lease: i64) -> Result<()> {
    let r = h
        .post(
            &format!("{base}/v3/lease/keepalive"),
            &format!(r#"{{"ID":"{lease}"}}"#),
        )
        .await?;
    r.ok()?;
    let v = r.json()?;
    let ttl: i64 = str_field(&v["result"]["TTL"]).parse().unwrap_or(0);
    if ttl <= 0 {
        bail!("keepalive of an expired lease: {}", r.text());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Register → watch event
// ---------------------------------------------------------------------------------------

/// A marker the stream readers send once the watch is established.
const READY: &str = "\u{0}ready";

/// Reads discoverd's SSE stream: `current` → READY, `up` → the instance id.
async fn read_sse(mut resp: reqwest::Response, tx: mpsc::UnboundedSender<(String, Instant)>) {
    let mut buf = String::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let at = Instant::now();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = buf.find("\n\n") {
            let item: String = buf.drain(..i + 2).collect();
            for line in item.lines() {
                let Some(d) = line.strip_prefix("data: ") else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<Value>(d) else {
                    continue;
                };
                let key = match v["kind"].as_str() {
                    Some("current") => READY.to_string(),
                    Some("up") => v["instance"]["id"].as_str().unwrap_or("").to_string(),
                    _ => continue,
                };
                if tx.send((key, at)).is_err() {
                    return;
                }
            }
        }
    }
}

/// Reads etcd's gateway watch stream (one JSON object per line): `created` → READY, each
/// event → its key.
async fn read_etcd_watch(
    mut resp: reqwest::Response,
    tx: mpsc::UnboundedSender<(String, Instant)>,
) {
    let mut buf = String::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let at = Instant::now();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = buf.find('\n') {
            let line: String = buf.drain(..i + 1).collect();
            let Ok(v) = serde_json::from_str::<Value>(line.trim()) else {
                continue;
            };
            let r = &v["result"];
            if r["created"] == Value::Bool(true) && tx.send((READY.into(), at)).is_err() {
                return;
            }
            for e in r["events"].as_array().into_iter().flatten() {
                let key = unb64(e["kv"]["key"].as_str().unwrap_or(""));
                if tx.send((key, at)).is_err() {
                    return;
                }
            }
        }
    }
}

/// Reads etcd's gRPC watch stream (already created): each event → its key.
async fn read_grpc_watch(
    mut w: super::grpc::WatchStream,
    tx: mpsc::UnboundedSender<(String, Instant)>,
) {
    while let Ok(Some(m)) = w.rx.message().await {
        let at = Instant::now();
        for e in &m.events {
            let key =
                e.kv.as_ref()
                    .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
                    .unwrap_or_default();
            if tx.send((key, at)).is_err() {
                return;
            }
        }
    }
}

/// A watcher on node `watcher`; then `events` registrations, one at a time, on the leader.
/// Returns (write → event latencies, write → acknowledgement latencies).
pub async fn watch(
    h: &Http,
    c: &Cluster,
    leader: usize,
    watcher: usize,
    run: usize,
    events: u64,
    max: Duration,
) -> Result<(Phase, Phase)> {
    let base = c.nodes[leader].url("");
    let wbase = c.nodes[watcher].url("");
    let conn = Conn::to(h, c, leader).await?;
    let service = format!("watch-r{run}");
    let prefix = format!("watch/r{run}/");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let reader = match &conn {
        Conn::Flynn(h) => {
            h.put(&format!("{base}/services/{service}"), "{}")
                .await?
                .ok()
                .context("creating the service")?;
            let resp = h
                .client
                .get(format!("{wbase}/services/{service}"))
                .header("accept", "text/event-stream")
                .send()
                .await?;
            if resp.status() != 200 {
                bail!("watch: HTTP {}", resp.status());
            }
            tokio::spawn(read_sse(resp, tx))
        }
        Conn::Gateway(h) => {
            let body = format!(
                r#"{{"create_request":{{"key":"{}","range_end":"{}"}}}}"#,
                b64(&prefix),
                b64(&prefix_end(&prefix))
            );
            let resp = h
                .client
                .post(format!("{wbase}/v3/watch"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            if resp.status() != 200 {
                bail!("watch: HTTP {}", resp.status());
            }
            tokio::spawn(read_etcd_watch(resp, tx))
        }
        Conn::Grpc(_) => {
            // The watcher's own connection, to its member (a follower in a 3-node cluster).
            let w = Etcd::connect(&c.nodes[watcher].client)
                .await?
                .watch(
                    prefix.as_bytes(),
                    prefix_end(&prefix).as_bytes(),
                    Duration::from_secs(5),
                )
                .await?;
            let _ = tx.send((READY.into(), Instant::now()));
            tokio::spawn(read_grpc_watch(w, tx))
        }
    };
    let ready = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some((k, _)) = rx.recv().await {
            if k == READY {
                return true;
            }
        }
        false
    })
    .await;
    if ready != Ok(true) {
        reader.abort();
        bail!("the watch did not start within 5 s");
    }

    let mut ev = Phase::default();
    let mut acks = Phase::default();
    let cpu0 = c.cpu_seconds();
    let t0 = Instant::now();
    for i in 0..events {
        if t0.elapsed() >= max {
            break;
        }
        let (id, body) = instance(run, i);
        let key = match &conn {
            Conn::Flynn(_) => id.clone(),
            _ => format!("{prefix}{id}"),
        };
        let s = Instant::now();
        let r = match &conn {
            Conn::Flynn(h) => h
                .put(&format!("{base}/services/{service}/instances/{id}"), &body)
                .await
                .and_then(|r| r.ok()),
            Conn::Gateway(h) => h
                .post(
                    &format!("{base}/v3/kv/put"),
                    &format!(r#"{{"key":"{}","value":"{}"}}"#, b64(&key), b64(&body)),
                )
                .await
                .and_then(|r| r.ok()),
            Conn::Grpc(g) => g
                .put(key.as_bytes(), body.as_bytes(), 0, TIMEOUT)
                .await
                .map(|_| ()),
        };
        match r {
            Ok(()) => {
                acks.ok += 1;
                acks.lat_us.push(us(s));
            }
            Err(e) => {
                acks.errors += 1;
                acks.first_error.get_or_insert(format!("{e:#}"));
                continue;
            }
        }
        let got = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some((k, at)) = rx.recv().await {
                if k == key {
                    return Some(at);
                }
            }
            None
        })
        .await;
        match got {
            Ok(Some(at)) => {
                ev.ok += 1;
                ev.lat_us
                    .push(at.saturating_duration_since(s).as_secs_f64() * 1e6);
            }
            _ => {
                ev.errors += 1;
                ev.first_error
                    .get_or_insert(format!("no event for {key} within 2 s"));
            }
        }
    }
    ev.elapsed_s = t0.elapsed().as_secs_f64();
    ev.cpu_s = c.cpu_seconds() - cpu0;
    acks.elapsed_s = ev.elapsed_s;
    reader.abort();
    match &conn {
        Conn::Flynn(h) => {
            let _ = h.delete(&format!("{base}/services/{service}")).await;
        }
        Conn::Gateway(h) => {
            let _ = h
                .post(
                    &format!("{base}/v3/kv/deleterange"),
                    &format!(
                        r#"{{"key":"{}","range_end":"{}"}}"#,
                        b64(&prefix),
                        b64(&prefix_end(&prefix))
                    ),
                )
                .await;
        }
        Conn::Grpc(g) => {
            let _ = g
                .delete_range(prefix.as_bytes(), prefix_end(&prefix).as_bytes(), TIMEOUT)
                .await;
        }
    }
    Ok((ev, acks))
}

// ---------------------------------------------------------------------------------------
// Failover probe
// ---------------------------------------------------------------------------------------

/// discoverd: the service the failover probes register instances in.
pub const FAILOVER_SERVICE: &str = "perf-failover";

pub async fn prepare_failover(h: &Http, c: &Cluster, leader: usize) -> Result<()> {
    if c.id.kind == Kind::Flynn {
        let r = h
            .put(
                &c.nodes[leader].url(&format!("/services/{FAILOVER_SERVICE}")),
                "{}",
            )
            .await?;
        if r.status != 200 && r.status != 409 {
            r.ok()?;
        }
    }
    Ok(())
}

/// One write (a new instance; an etcd put) sent over `conn` to node `base` (its URL),
/// following discoverd's redirect to the leader; Ok once it is acknowledged. Owns its
/// arguments so it can run as a task.
pub async fn probe_write(conn: Conn, base: String, n: u64, timeout: Duration) -> Result<()> {
    match conn {
        Conn::Flynn(h) => {
            let (id, body) = instance(249, n);
            h.send(
                reqwest::Method::PUT,
                &format!("{base}/services/{FAILOVER_SERVICE}/instances/{id}"),
                Some(body),
                timeout,
            )
            .await?
            .ok()
        }
        Conn::Gateway(h) => h
            .send(
                reqwest::Method::POST,
                &format!("{base}/v3/kv/put"),
                Some(format!(
                    r#"{{"key":"{}","value":"{}"}}"#,
                    b64("failover/probe"),
                    b64(&n.to_string())
                )),
                timeout,
            )
            .await?
            .ok(),
        Conn::Grpc(g) => g
            .put(b"failover/probe", n.to_string().as_bytes(), 0, timeout)
            .await
            .map(|_| ()),
    }
}

/// A write that works on the leader, retried every 50 ms for up to 10 s (used before a
/// kill). One connection serves every retry (gRPC: connected once, tonic's channel
/// reconnects by itself); only a failed connect is retried with a new one.
pub async fn writable(h: &Http, c: &Cluster, leader: usize, n: u64) -> Result<()> {
    let start = Instant::now();
    let mut conn: Option<Conn> = None;
    loop {
        let connected = match conn.clone() {
            Some(x) => Ok(x),
            None => Conn::to(h, c, leader).await,
        };
        let r = match connected {
            Ok(x) => {
                conn = Some(x.clone());
                probe_write(x, c.nodes[leader].url(""), n, TIMEOUT).await
            }
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() > Duration::from_secs(10) => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
