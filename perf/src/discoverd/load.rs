//! The workloads, each written once per server API: metadata compare-and-swap by N
//! clients, registrations then heartbeats, register → watch event latency, and the probe
//! write used to time a leader failover.
//!
//! | workload | flynn-discoverd | etcd (JSON gateway) |
//! |---|---|---|
//! | CAS | `PUT /services/:s/meta` `{"data":…,"index":i}` (i = the index the last success returned, 0 creates) | `POST /v3/kv/txn` compare `mod_revision == r` (0: key absent), success: put; r = the txn's revision |
//! | register | `PUT /services/:s/instances/:id` (new instance: one Raft write) | `POST /v3/lease/grant` (TTL 10 s) + `POST /v3/kv/put` with that lease (two Raft writes, as any etcd registration with a TTL) |
//! | heartbeat | the same PUT again, unchanged (leader memory only) | `POST /v3/lease/keepalive` of the instance's lease (leader memory only) |
//! | watch | SSE `GET /services/:s`, the `up` event | `POST /v3/watch` on the prefix, the put event |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tokio::sync::mpsc;

use super::cluster::{Cluster, Kind};
use super::http::{b64, instance_id, prefix_end, str_field, unb64, Http, TIMEOUT};

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
/// a failure the client re-reads the current index.
pub async fn cas(
    h: &Http,
    c: &Cluster,
    leader: usize,
    run: usize,
    clients: usize,
    lim: Limits,
) -> Result<Phase> {
    let base = c.nodes[leader].url("");
    let kind = c.id.kind;
    let mut keys = Vec::new();
    for k in 0..clients {
        match kind {
            Kind::Flynn => {
                let s = format!("cas-r{run}-c{k}");
                h.put(&format!("{base}/services/{s}"), "{}")
                    .await?
                    .ok()
                    .with_context(|| format!("creating service {s}"))?;
                keys.push(format!("{base}/services/{s}/meta"));
            }
            Kind::Etcd => keys.push(b64(&format!("cas/r{run}/c{k}"))),
        }
    }
    let cpu0 = c.cpu_seconds();
    let t0 = Instant::now();
    let tickets = Tickets::new(lim);
    let tasks = keys
        .into_iter()
        .map(|key| {
            let (h, base, tickets) = (h.clone(), base.clone(), tickets.clone());
            tokio::spawn(async move {
                let mut w = Worker::default();
                let mut index = 0u64;
                while let Some(n) = tickets.take() {
                    let s = Instant::now();
                    let r = match kind {
                        Kind::Flynn => cas_flynn(&h, &key, index, n).await,
                        Kind::Etcd => cas_etcd(&h, &base, &key, index, n).await,
                    };
                    match r {
                        Ok(i) => {
                            index = i;
                            w.ok += 1;
                            w.lat_us.push(us(s));
                        }
                        Err(e) => {
                            w.fail(e);
                            let re = match kind {
                                Kind::Flynn => read_meta_index(&h, &key).await,
                                Kind::Etcd => read_mod_revision(&h, &base, &key).await,
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
/// (registrations, heartbeats). Everything is removed afterwards (not timed).
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
    let kind = c.id.kind;
    let service = format!("reg-r{run}");
    if kind == Kind::Flynn {
        h.put(&format!("{base}/services/{service}"), "{}")
            .await?
            .ok()
            .context("creating the service")?;
    }
    let items: Arc<Vec<(String, String)>> = Arc::new(
        (0..instances)
            .map(|i| {
                let (id, body) = instance(run, i);
                match kind {
                    Kind::Flynn => (format!("{base}/services/{service}/instances/{id}"), body),
                    Kind::Etcd => (b64(&format!("reg/r{run}/{id}")), b64(&body)),
                }
            })
            .collect(),
    );
    // etcd: the lease of each registered instance, by instance number.
    let leases: Arc<Mutex<Vec<Option<String>>>> =
        Arc::new(Mutex::new(vec![None; instances as usize]));

    // Phase 1: registrations.
    let cpu0 = c.cpu_seconds();
    let t0 = Instant::now();
    let tickets = Tickets::new(Limits {
        ops: instances,
        max,
    });
    let tasks = (0..clients)
        .map(|_| {
            let (h, base, tickets, items, leases) = (
                h.clone(),
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
                    let r = match kind {
                        Kind::Flynn => h.put(a, b).await.and_then(|r| r.ok()),
                        Kind::Etcd => register_etcd(&h, &base, a, b).await.map(|lease| {
                            if let Ok(mut l) = leases.lock() {
                                l[i as usize] = Some(lease);
                            }
                        }),
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
    let mut regs = join(tasks).await?;
    regs.elapsed_s = t0.elapsed().as_secs_f64();
    regs.cpu_s = c.cpu_seconds() - cpu0;
    let registered = tickets.taken().max(1);

    // Phase 2: heartbeats of the registered instances, round robin.
    let lease_list: Arc<Vec<Option<String>>> =
        Arc::new(leases.lock().map(|l| l.clone()).unwrap_or_default());
    let cpu1 = c.cpu_seconds();
    let t1 = Instant::now();
    let tickets = Tickets::new(Limits {
        ops: heartbeats,
        max,
    });
    let tasks = (0..clients)
        .map(|_| {
            let (h, base, tickets, items, lease_list) = (
                h.clone(),
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
                    let r = match kind {
                        Kind::Flynn => {
                            let (a, b) = &items[i];
                            h.put(a, b).await.and_then(|r| r.ok())
                        }
                        Kind::Etcd => match &lease_list[i] {
                            Some(lease) => keepalive_etcd(&h, &base, lease).await,
                            None => Err(anyhow::anyhow!("instance {i} has no lease")),
                        },
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
    match kind {
        Kind::Flynn => {
            let _ = h.delete(&format!("{base}/services/{service}")).await;
        }
        Kind::Etcd => {
            let ids: Vec<String> = lease_list.iter().flatten().cloned().collect();
            let ids = Arc::new(ids);
            let next = Arc::new(AtomicU64::new(0));
            let tasks: Vec<_> = (0..clients)
                .map(|_| {
                    let (h, base, ids, next) = (h.clone(), base.clone(), ids.clone(), next.clone());
                    tokio::spawn(async move {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                            let Some(id) = ids.get(i) else { break };
                            let _ = h
                                .post(
                                    &format!("{base}/v3/lease/revoke"),
                                    &format!(r#"{{"ID":"{id}"}}"#),
                                )
                                .await;
                        }
                    })
                })
                .collect();
            for t in tasks {
                let _ = t.await;
            }
        }
    }
    Ok((regs, hbs))
}

/// Lease grant (TTL 10 s, discoverd's instance TTL) + put with the lease; the lease id.
async fn register_etcd(h: &Http, base: &str, key: &str, value: &str) -> Result<String> {
    let r = h
        .post(&format!("{base}/v3/lease/grant"), r#"{"TTL":"10"}"#)
        .await?;
    r.ok()?;
    let lease = str_field(&r.json()?["ID"]);
    if lease.is_empty() {
        bail!("lease grant without an ID: {}", r.text());
    }
    let r = h
        .post(
            &format!("{base}/v3/kv/put"),
            &format!(r#"{{"key":"{key}","value":"{value}","lease":"{lease}"}}"#),
        )
        .await?;
    r.ok()?;
    Ok(lease)
}

async fn keepalive_etcd(h: &Http, base: &str, lease: &str) -> Result<()> {
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
    let kind = c.id.kind;
    let service = format!("watch-r{run}");
    let prefix = format!("watch/r{run}/");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let reader = match kind {
        Kind::Flynn => {
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
        Kind::Etcd => {
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
        let (url, body, key) = match kind {
            Kind::Flynn => (
                format!("{base}/services/{service}/instances/{id}"),
                body,
                id.clone(),
            ),
            Kind::Etcd => {
                let key = format!("{prefix}{id}");
                (
                    format!("{base}/v3/kv/put"),
                    format!(r#"{{"key":"{}","value":"{}"}}"#, b64(&key), b64(&body)),
                    key,
                )
            }
        };
        let s = Instant::now();
        let r = match kind {
            Kind::Flynn => h.put(&url, &body).await,
            Kind::Etcd => h.post(&url, &body).await,
        };
        match r.and_then(|r| r.ok()) {
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
    match kind {
        Kind::Flynn => {
            let _ = h.delete(&format!("{base}/services/{service}")).await;
        }
        Kind::Etcd => {
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

/// One write (a new instance; an etcd put) sent to `base` (a node's URL), following
/// discoverd's redirect to the leader; Ok once it is acknowledged. Owns its arguments so it
/// can run as a task.
pub async fn probe_write(
    h: Http,
    kind: Kind,
    base: String,
    n: u64,
    timeout: Duration,
) -> Result<()> {
    let r = match kind {
        Kind::Flynn => {
            let (id, body) = instance(249, n);
            h.send(
                reqwest::Method::PUT,
                &format!("{base}/services/{FAILOVER_SERVICE}/instances/{id}"),
                Some(body),
                timeout,
            )
            .await?
        }
        Kind::Etcd => {
            h.send(
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
        }
    };
    r.ok()
}

/// A write that works on the leader, retried for a few seconds (used before a kill).
pub async fn writable(h: &Http, c: &Cluster, leader: usize, n: u64) -> Result<()> {
    let start = Instant::now();
    loop {
        match probe_write(h.clone(), c.id.kind, c.nodes[leader].url(""), n, TIMEOUT).await {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() > Duration::from_secs(10) => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
