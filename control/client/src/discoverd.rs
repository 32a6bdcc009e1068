//! The discoverd client (spec §2.3–§2.6).

use std::collections::BTreeMap;
use std::time::Duration;

use flynn_api::{ApiError, ErrorCode};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::json_http::{Failure, JsonHttp, MAX_BODY};

/// The most of a service's state the client reads in one piece: an instance list
/// ([`Client::instances`]) or a watch's replay (the events before `current`, counted in
/// bytes of event JSON). discoverd takes instance registrations of up to 512 KiB each (its
/// write body limit) and no limit on how many instances a service has, so no cap fits every
/// state it can hold. This one is 128 instances of that largest size, or tens of
/// thousands of usual ones (an id, an address and the job's `FLYNN_*` meta: well under
/// 1 KiB), far more than a service runs, while what one list or watch holds in memory stays
/// bounded. A state past it fails with [`Error::TooLarge`]; a watch gives it up and tries
/// again after 30–60 s (see [`Watch`]).
pub const MAX_STATE: usize = 64 << 20;

pub use flynn_api::discoverd::{Event, EventKind, Instance, ServiceMeta};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Api(ApiError),
    #[error("discoverd request failed")]
    Http(#[source] reqwest::Error),
    #[error("discoverd answered {status}")]
    Status { status: u16 },
    /// An answer longer than the client reads (`limit` bytes).
    #[error("discoverd answer longer than {limit} bytes")]
    TooLarge { limit: usize },
    /// The detail is in the message (callers log errors with `%e`), so it is not also a
    /// `source`: a report that walks the chain would print it twice.
    #[error("discoverd answer is not the JSON expected: {0}")]
    Decode(serde_json::Error),
    /// A request given up without an answer (see [`Client::heartbeat`]).
    #[error("discoverd did not answer in {after:?}")]
    TimedOut { after: Duration },
    #[error("instance address {addr:?} has no host and EXTERNAL_IP is not set")]
    NoExternalIp { addr: String },
    /// A service name or instance id that cannot be put in a request path as it is:
    /// refused before anything is sent (`web?x` would have named `web`).
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: &'static str,
    },
}

/// A service name as discoverd takes it: lowercase ASCII letters, digits and `-`.
fn check_service(service: &str) -> Result<(), Error> {
    if flynn_api::discoverd::valid_service_name(service) {
        Ok(())
    } else {
        Err(Error::Invalid {
            what: "service",
            value: service.to_string(),
            why: "must be lowercase alphanumeric plus dash",
        })
    }
}

/// An instance id (discoverd's are MD5 hex): ASCII letters, digits, `-` and `_`.
fn check_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid {
            what: "instance id",
            value: id.to_string(),
            why: "must be alphanumeric plus dash and underscore",
        })
    }
}

impl Error {
    /// The API error code, when the server sent an envelope.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            Error::Api(e) => Some(e),
            _ => None,
        }
    }
}

/// A refusal made before anything was proposed: the cluster has no leader (an election
/// under way). Not [`flynn_api::discoverd::NOT_FOLLOWING`]: a node says that only after
/// 5 s without a leader (cut off from the others), which a few seconds more rarely mend;
/// the caller hears it at once.
fn refused_for_want_of_leader(e: &ApiError) -> bool {
    e.status() == 503 && e.retry && e.message == flynn_api::discoverd::NO_LEADER
}

/// `md5hex(proto + "-" + addr)` (spec §0.5).
pub fn instance_id(proto: &str, addr: &str) -> String {
    use md5::{Digest, Md5};
    Md5::digest(format!("{proto}-{addr}").as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Expands an instance address of the form `:port` with `external_ip` (the value of
/// `EXTERNAL_IP`, spec §2.6); other addresses are returned as they are.
pub fn expand_addr(addr: &str, external_ip: Option<&str>) -> Result<String, Error> {
    if !addr.starts_with(':') {
        return Ok(addr.to_string());
    }
    match external_ip.filter(|ip| !ip.is_empty()) {
        // A bare IPv6 address needs brackets before the port.
        Some(ip) if ip.contains(':') && !ip.starts_with('[') => Ok(format!("[{ip}]{addr}")),
        Some(ip) => Ok(format!("{ip}{addr}")),
        None => Err(Error::NoExternalIp {
            addr: addr.to_string(),
        }),
    }
}

/// [`Client::heartbeat`]'s first registration (spec §2.6): tried for this long, at least
/// [`REGISTER_ATTEMPTS`] times, [`REGISTER_PAUSE`] apart, each attempt given up after
/// [`REGISTER_TIMEOUT`].
const REGISTER_FOR: Duration = Duration::from_secs(60);
const REGISTER_ATTEMPTS: u32 = 5;
const REGISTER_PAUSE: Duration = Duration::from_millis(200);

/// How long one attempt of [`Client::heartbeat`]'s first registration may take. Longer than
/// a heartbeat's [`HEARTBEAT_TIMEOUT`]: a discoverd slow to commit (an election, a busy
/// disk) gets to answer instead of being sent the write again while the one given up is
/// still queued there; short enough that [`REGISTER_ATTEMPTS`] attempts that get no answer
/// (a hung discoverd) and their pauses fit in [`REGISTER_FOR`] (it took five 30 s request
/// timeouts, 150 s).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

const _: () = assert!(
    REGISTER_TIMEOUT.as_millis() * REGISTER_ATTEMPTS as u128
        + REGISTER_PAUSE.as_millis() * (REGISTER_ATTEMPTS as u128 - 1)
        <= REGISTER_FOR.as_millis()
);

/// The job environment variables that go into an instance's meta (spec §0.4): who
/// registered it, for the router's backends and `flynn ps`. See [`job_meta`].
pub const JOB_META_ENV: [&str; 5] = [
    "FLYNN_APP_ID",
    "FLYNN_APP_NAME",
    "FLYNN_RELEASE_ID",
    "FLYNN_PROCESS_TYPE",
    "FLYNN_JOB_ID",
];

/// The instance meta of a job with environment `vars` (name, value): its
/// [`JOB_META_ENV`] variables, those set empty left out (an empty `FLYNN_APP_NAME` says
/// nothing a missing one does not). [`Client::heartbeat`] takes them from its process's
/// environment; a daemon registering its jobs with [`Client::keep_registered`] builds the
/// meta with this from each job's environment. A name given twice keeps its last value.
pub fn job_meta<K, V>(vars: impl IntoIterator<Item = (K, V)>) -> BTreeMap<String, String>
where
    K: AsRef<str>,
    V: AsRef<str>,
{
    vars.into_iter()
        .filter(|(k, v)| JOB_META_ENV.contains(&k.as_ref()) && !v.as_ref().is_empty())
        .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_string()))
        .collect()
}

/// How long a request refused because the cluster has no leader is sent again by default
/// (an election takes a few hundred milliseconds; see [`Client::with_leader_wait`]).
pub const LEADER_WAIT: Duration = Duration::from_secs(5);

/// A discoverd client; follows 307 redirects to the leader (method, body and headers
/// such as `Accept` are preserved).
///
/// A request refused with the 503 a node answers while the cluster elects a leader
/// ([`flynn_api::discoverd::NO_LEADER`]) is sent again, 50 ms to 500 ms apart, for up to
/// [`LEADER_WAIT`] (heartbeaters: 2.5 s): such a refusal is made before anything is
/// proposed, so this is safe for every request, a compare-and-swap included. Other errors,
/// also a 503 whose write's outcome is unknown ("write not applied in time") and a node's
/// "follows no leader" (5 s without one), are returned as they come.
#[derive(Clone)]
pub struct Client {
    http: JsonHttp,
    leader_wait: Duration,
    /// [`MAX_STATE`], smaller in tests.
    state_limit: usize,
}

crate::json_http::from_failure!(Error);

impl Client {
    /// `url` like `http://127.0.0.1:1111`; see [`Client::from_env`].
    pub fn new(url: &str) -> Client {
        Client {
            http: JsonHttp::new(url),
            leader_wait: LEADER_WAIT,
            state_limit: MAX_STATE,
        }
    }

    /// This client with a smaller [`MAX_STATE`], so the limit is reached in a test without
    /// sending 64 MiB.
    #[cfg(test)]
    fn with_state_limit(mut self, limit: usize) -> Client {
        self.state_limit = limit;
        self
    }

    /// This client for a heartbeater, whose every request is cut at [`HEARTBEAT_TIMEOUT`]:
    /// it waits for a leader a little less than that, so a spell without one is logged as
    /// such (and retried by the heartbeater), not as a timeout.
    fn for_heartbeats(&self) -> Client {
        self.clone()
            .with_leader_wait(HEARTBEAT_TIMEOUT.saturating_sub(Duration::from_millis(500)))
    }

    /// How long a request refused for want of a leader is sent again (zero: never).
    pub fn with_leader_wait(mut self, wait: Duration) -> Client {
        self.leader_wait = wait;
        self
    }

    /// `$DISCOVERD` or `http://127.0.0.1:1111`.
    pub fn from_env() -> Client {
        Client::new(&std::env::var("DISCOVERD").unwrap_or_else(|_| "http://127.0.0.1:1111".into()))
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::Response, Error> {
        let deadline = tokio::time::Instant::now() + self.leader_wait;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.http.send(method.clone(), path, body.clone()).await {
                Err(Failure::Api(e))
                    if refused_for_want_of_leader(&e)
                        && tokio::time::Instant::now() + pause <= deadline =>
                {
                    tracing::debug!(path, error = %e.message, "discoverd has no leader; sending again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                r => return Ok(r?),
            }
        }
    }

    fn json<T: Serialize>(v: &T) -> Option<Vec<u8>> {
        serde_json::to_vec(v).ok()
    }

    pub async fn add_service(&self, service: &str, leader_type: &str) -> Result<(), Error> {
        check_service(service)?;
        let body = serde_json::json!({ "leader_type": leader_type });
        self.send(
            reqwest::Method::PUT,
            &format!("/services/{service}"),
            Self::json(&body),
        )
        .await
        .map(drop)
    }

    pub async fn remove_service(&self, service: &str) -> Result<(), Error> {
        check_service(service)?;
        self.send(
            reqwest::Method::DELETE,
            &format!("/services/{service}"),
            None,
        )
        .await
        .map(drop)
    }

    /// Registers (or heartbeats) an instance; fills in `id` when empty.
    pub async fn register(&self, service: &str, inst: &Instance) -> Result<(), Error> {
        let mut inst = inst.clone();
        if inst.proto.is_empty() {
            inst.proto = "tcp".into();
        }
        if inst.id.is_empty() {
            inst.id = instance_id(&inst.proto, &inst.addr);
        }
        check_service(service)?;
        check_id(&inst.id)?;
        let path = format!("/services/{service}/instances/{}", inst.id);
        self.send(reqwest::Method::PUT, &path, Self::json(&inst))
            .await
            .map(drop)
    }

    pub async fn unregister(&self, service: &str, id: &str) -> Result<(), Error> {
        check_service(service)?;
        check_id(id)?;
        let path = format!("/services/{service}/instances/{id}");
        self.send(reqwest::Method::DELETE, &path, None)
            .await
            .map(drop)
    }

    /// Current instances; an empty list when discoverd says there are none (its 404).
    pub async fn instances(&self, service: &str) -> Result<Vec<Instance>, Error> {
        check_service(service)?;
        match self
            .send(
                reqwest::Method::GET,
                &format!("/services/{service}/instances"),
                None,
            )
            .await
        {
            Ok(r) => Ok(crate::json_http::json(r, self.state_limit).await?),
            // A missing service; another 404 (a wrong base URL: the path is unknown) is an error.
            Err(Error::Api(e)) if e.code == ErrorCode::ObjectNotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Compare-and-swap: `meta.index` 0 creates, otherwise must match. Returns the
    /// stored meta with its new index.
    pub async fn set_meta(&self, service: &str, meta: &ServiceMeta) -> Result<ServiceMeta, Error> {
        check_service(service)?;
        let r = self
            .send(
                reqwest::Method::PUT,
                &format!("/services/{service}/meta"),
                Self::json(meta),
            )
            .await?;
        Ok(crate::json_http::json(r, MAX_BODY).await?)
    }

    /// The service's metadata as the node asked has it (possibly a lagging follower's copy).
    pub async fn get_meta(&self, service: &str) -> Result<ServiceMeta, Error> {
        check_service(service)?;
        let r = self
            .send(
                reqwest::Method::GET,
                &format!("/services/{service}/meta"),
                None,
            )
            .await?;
        Ok(crate::json_http::json(r, MAX_BODY).await?)
    }

    /// [`Client::get_meta`] as a linearizable read (`?consistent=true`): served by the Raft
    /// leader (a follower redirects), it reflects every write acknowledged before it started,
    /// so a 404 means the metadata really is not there.
    pub async fn get_meta_consistent(&self, service: &str) -> Result<ServiceMeta, Error> {
        check_service(service)?;
        let r = self
            .send(
                reqwest::Method::GET,
                &format!("/services/{service}/meta?consistent=true"),
                None,
            )
            .await?;
        Ok(crate::json_http::json(r, MAX_BODY).await?)
    }

    pub async fn set_leader(&self, service: &str, id: &str) -> Result<(), Error> {
        check_service(service)?;
        let body = serde_json::json!({ "id": id });
        self.send(
            reqwest::Method::PUT,
            &format!("/services/{service}/leader"),
            Self::json(&body),
        )
        .await
        .map(drop)
    }

    pub async fn leader(&self, service: &str) -> Result<Option<Instance>, Error> {
        check_service(service)?;
        match self
            .send(
                reqwest::Method::GET,
                &format!("/services/{service}/leader"),
                None,
            )
            .await
        {
            Ok(r) => Ok(Some(crate::json_http::json(r, MAX_BODY).await?)),
            Err(Error::Api(e)) if e.code == ErrorCode::ObjectNotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Registers `inst` (retrying for up to 60 s, at least 5 attempts, 200 ms apart, each
    /// given up after 10 s) and keeps it registered until the [`Heartbeater`] is closed or
    /// dropped. An address `:port` is expanded with `$EXTERNAL_IP` (its id is then
    /// recomputed); without `EXTERNAL_IP` that fails at once with [`Error::NoExternalIp`].
    /// The job's [`job_meta`] (its [`JOB_META_ENV`] variables set and not empty) goes into
    /// `inst.meta`, except where it already has the key (spec §0.4).
    pub async fn heartbeat(&self, service: &str, inst: Instance) -> Result<Heartbeater, Error> {
        self.heartbeat_with(service, inst, |name| std::env::var(name).ok())
            .await
    }

    /// [`Client::heartbeat`] with the environment (`EXTERNAL_IP` and the job's variables)
    /// read through `env`.
    async fn heartbeat_with(
        &self,
        service: &str,
        mut inst: Instance,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Heartbeater, Error> {
        let addr = expand_addr(&inst.addr, env("EXTERNAL_IP").as_deref())?;
        if addr != inst.addr {
            // An id given for the bare `:port` names no registrable address.
            inst.addr = addr;
            inst.id.clear();
        }
        if inst.proto.is_empty() {
            inst.proto = "tcp".into();
        }
        if inst.id.is_empty() {
            inst.id = instance_id(&inst.proto, &inst.addr);
        }
        let vars = JOB_META_ENV
            .iter()
            .filter_map(|name| env(name).map(|value| (*name, value)));
        for (name, value) in job_meta(vars) {
            inst.meta.entry(name).or_insert(value);
        }
        // A name that can never be registered fails at once, not after a minute of retries.
        check_service(service)?;
        check_id(&inst.id)?;
        // Each try is cut at REGISTER_TIMEOUT (a discoverd that accepts and never answers
        // would otherwise hold each one for the 30 s request timeout, five of them for
        // 150 s); the tries past the fewest are cut at the deadline too.
        let c = self.for_heartbeats();
        let deadline = tokio::time::Instant::now() + REGISTER_FOR;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let limit = if attempt <= REGISTER_ATTEMPTS {
                REGISTER_TIMEOUT
            } else {
                REGISTER_TIMEOUT
                    .min(deadline.saturating_duration_since(tokio::time::Instant::now()))
            };
            let res = match tokio::time::timeout(limit, c.register(service, &inst)).await {
                Ok(r) => r,
                Err(_) => Err(Error::TimedOut { after: limit }),
            };
            match res {
                Ok(()) => break,
                Err(e)
                    if attempt < REGISTER_ATTEMPTS
                        || tokio::time::Instant::now() + REGISTER_PAUSE < deadline =>
                {
                    tracing::debug!(error = %e, attempt, "register failed; retrying");
                    tokio::time::sleep(REGISTER_PAUSE).await;
                }
                Err(e) => return Err(e),
            }
        }
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(heartbeat_loop(
            self.for_heartbeats(),
            service.to_string(),
            inst.clone(),
            None,
            stop_rx,
        ));
        Ok(Heartbeater {
            stop: Some(stop_tx),
            task: Some(task),
            id: inst.id,
        })
    }

    /// Watches a service's events (`GET /services/:s`, all kinds). See [`Watch`].
    pub fn watch(&self, service: &str) -> Watch {
        let (tx, rx) = mpsc::channel(256);
        // A name a path would not carry as it is (`web?x` would watch `web`), or one the
        // server refuses, which would be retried for ever: the watch ends at once.
        let task = match check_service(service) {
            Ok(()) => tokio::spawn(watch_loop(self.clone(), service.to_string(), tx)),
            Err(e) => {
                tracing::warn!(service, error = %e, "not watching an invalid service name");
                drop(tx);
                tokio::spawn(async {})
            }
        };
        Watch {
            rx,
            pending: std::collections::VecDeque::new(),
            task,
        }
    }
}

/// Keeps an instance registered: PUT every 5 s − U(0, 2 s); every 200–400 ms after a
/// failure. Closing it unregisters the instance.
pub struct Heartbeater {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub id: String,
}

impl Heartbeater {
    /// Stops heartbeating and deletes the instance. The delete is given up after 3 s (a
    /// discoverd that does not answer): the instance then expires after its TTL.
    pub async fn close(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// Stops heartbeating *without* deleting the instance: for handing the instance over to
    /// another heartbeater of the same id (a new registration of it, possibly through another
    /// discoverd node of the same cluster), whose entry a delete would remove. An instance
    /// nobody heartbeats any more expires after the TTL.
    pub async fn abandon(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        // The loop is gone: dropping its stop signal now deletes nothing.
        self.stop.take();
    }
}

impl Drop for Heartbeater {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Client {
    /// Keeps `inst` registered in `service` for as long as the returned [`Heartbeater`]
    /// lives, however long discoverd is unreachable. Unlike [`Client::heartbeat`] (which
    /// gives up after 60 s) it returns at once and keeps trying, 200 ms apart at first and
    /// then up to [`KEEP_RETRY_MAX`], until the first registration succeeds; then it
    /// heartbeats as usual. With `create` (a leader type) the service is created first (one
    /// that exists is fine). `inst` is used as given: its `addr` (no `EXTERNAL_IP`
    /// expansion) and its `meta` (nothing is read from this process's environment, which is
    /// not the registered job's: a daemon registering a job gives it the job's
    /// [`job_meta`]). For daemons whose instances must come back by themselves after an
    /// outage.
    pub fn keep_registered(
        &self,
        service: &str,
        mut inst: Instance,
        create: Option<&str>,
    ) -> Heartbeater {
        if inst.proto.is_empty() {
            inst.proto = "tcp".into();
        }
        if inst.id.is_empty() {
            inst.id = instance_id(&inst.proto, &inst.addr);
        }
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(keep_loop(
            self.for_heartbeats(),
            service.to_string(),
            inst.clone(),
            create.map(str::to_string),
            stop_rx,
        ));
        Heartbeater {
            stop: Some(stop_tx),
            task: Some(task),
            id: inst.id,
        }
    }
}

/// The longest pause between attempts of [`Client::keep_registered`]'s first registration.
pub const KEEP_RETRY_MAX: Duration = Duration::from_secs(5);

/// [`Client::keep_registered`]'s task: the first registration (and service creation),
/// retried until it succeeds or the heartbeater stops, then [`heartbeat_loop`].
async fn keep_loop(
    c: Client,
    service: String,
    inst: Instance,
    mut create: Option<String>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut pause = Duration::from_millis(200);
    let mut failures: u32 = 0;
    // Created again if it goes away later (deleted, or the cluster's state lost).
    let kind = create.clone();
    // Best effort, when stopped before the first registration returned.
    let unregister = || async {
        let _ = tokio::time::timeout(HEARTBEAT_TIMEOUT, c.unregister(&service, &inst.id)).await;
    };
    loop {
        let attempt = async {
            if let Some(kind) = &create {
                match c.add_service(&service, kind).await {
                    Ok(()) => {}
                    Err(e) if e.api().map(|a| a.code) == Some(ErrorCode::ObjectExists) => {}
                    Err(e) => return Err((e, true)),
                }
            }
            c.register(&service, &inst).await.map_err(|e| (e, false))
        };
        let res = tokio::select! {
            // Stopped before the first registration: anything an attempt cut short may
            // have registered is deleted (best effort).
            _ = &mut stop => {
                unregister().await;
                return;
            }
            r = tokio::time::timeout(HEARTBEAT_TIMEOUT, attempt) => r,
        };
        let err = match res {
            Ok(Ok(())) => break,
            // Refused as invalid (a bad service name or instance): no retry makes it valid.
            Ok(Err((e, _)))
                if matches!(e, Error::Invalid { .. })
                    || e.api().map(|a| a.code) == Some(ErrorCode::ValidationError) =>
            {
                tracing::warn!(service = %service, error = %e, "discoverd registration refused; giving up");
                return;
            }
            Ok(Err((e, creating))) => {
                // Created: not again on the next try, unless the registration found the
                // service gone (deleted, or the cluster's state lost, meanwhile).
                if !creating {
                    let gone = e.api().map(|a| a.code) == Some(ErrorCode::ObjectNotFound);
                    create = if gone { kind.clone() } else { None };
                }
                e.to_string()
            }
            Err(_) => "timed out".to_string(),
        };
        failures += 1;
        // The first failure and then about once a minute: an outage is not a log flood.
        if failures == 1 || failures.is_multiple_of(12) {
            tracing::warn!(service = %service, error = %err, failures, "discoverd registration failed; retrying");
        }
        tokio::select! {
            // As above: an attempt that timed out here may have registered the instance.
            _ = &mut stop => {
                unregister().await;
                return;
            }
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(KEEP_RETRY_MAX);
    }
    heartbeat_loop(c, service, inst, kind, stop).await
}

/// How long one heartbeat may take (the instance TTL is 10 s).
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);

/// Heartbeats `inst` until stopped. `create`: the service's leader type, to create the
/// service again when a heartbeat finds it gone (404), as [`Client::keep_registered`]
/// promises its instance comes back by itself.
async fn heartbeat_loop(
    c: Client,
    service: String,
    inst: Instance,
    create: Option<String>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut delay = next_heartbeat(true);
    let mut failures: u32 = 0;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(delay) => {}
        }
        let beat = async {
            match c.register(&service, &inst).await {
                Err(e) if e.api().map(|a| a.code) == Some(ErrorCode::ObjectNotFound) => {
                    let Some(kind) = &create else { return Err(e) };
                    match c.add_service(&service, kind).await {
                        Ok(()) => {}
                        Err(e) if e.api().map(|a| a.code) == Some(ErrorCode::ObjectExists) => {}
                        Err(e) => return Err(e),
                    }
                    c.register(&service, &inst).await
                }
                r => r,
            }
        };
        // A request stuck on a dead peer (a kept-alive connection to a leader that lost
        // power) must not hold the heartbeats past the instance TTL: it is given up and
        // the fast retry takes over.
        let err = match tokio::time::timeout(HEARTBEAT_TIMEOUT, beat).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("timed out".to_string()),
        };
        let ok = err.is_none();
        match err {
            None => {
                if failures > 0 {
                    tracing::info!(service = %service, failures, "heartbeats succeed again");
                }
                failures = 0;
            }
            Some(error) => {
                failures += 1;
                // The first failure and then every 20th (about every 5 s at the fast
                // retry): an outage is not a log flood.
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(service = %service, error = %error, failures, "heartbeat failed");
                }
            }
        }
        delay = next_heartbeat(ok);
    }
    // Bounded like the heartbeats: closing a heartbeater against a hung discoverd returns
    // (the instance then expires after its TTL).
    match tokio::time::timeout(HEARTBEAT_TIMEOUT, c.unregister(&service, &inst.id)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, service = %service, "unregister failed"),
        Err(_) => tracing::warn!(service = %service, "unregister timed out"),
    }
}

fn next_heartbeat(ok: bool) -> Duration {
    if ok {
        Duration::from_millis(5000 - fastrand::u64(0..2000))
    } else {
        Duration::from_millis(200 + fastrand::u64(0..200))
    }
}

/// A watch on one service. Delivers the server's replay (up…, leader, service_meta,
/// current) and then live events; when the stream breaks it reconnects and turns the
/// new replay into the events missed meanwhile (down for instances that vanished, up for
/// new ones, update for changed ones, down and up for ones that came back with a new
/// index, leader/meta when they changed), so a consumer
/// that applies events in order always ends up with the server's state.
///
/// Events of a kind this client does not know (a newer discoverd's) are skipped. A live
/// event of a known kind it cannot read ends the stream (the next replay says what it
/// was), with pauses that grow to 30 s while that goes on; an event in a replay that
/// cannot be read is left out, and what the consumer has of it (an instance, the leader)
/// stays as it is rather than being reported gone. A replay longer than [`MAX_STATE`] is
/// given up and tried again after 30–60 s.
pub struct Watch {
    /// Events come in batches: one live event, or all the events of one reconnect, so a
    /// reconnect's events are all there as soon as the first is (see [`Watch::try_next`]).
    rx: mpsc::Receiver<Vec<Event>>,
    pending: std::collections::VecDeque<Event>,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    pub async fn next(&mut self) -> Option<Event> {
        while self.pending.is_empty() {
            self.pending.extend(self.rx.recv().await?);
        }
        self.pending.pop_front()
    }

    /// The next event if one is already waiting. The events of one reconnect are
    /// delivered together, so a consumer that takes what is waiting after each event and
    /// then applies it all sees the reconnect as one change (a re-registered instance's
    /// `down` and `up` included).
    pub fn try_next(&mut self) -> Option<Event> {
        while self.pending.is_empty() {
            self.pending.extend(self.rx.try_recv().ok()?);
        }
        self.pending.pop_front()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Default)]
struct Known {
    instances: BTreeMap<String, Instance>,
    /// The leader's id and index: an instance that went and came back under the same
    /// id is a new leader.
    leader: Option<(String, u64)>,
    meta_index: Option<u64>,
    synced: bool,
}

/// How long a watch waits for the head of its answer: discoverd sends it at once, before
/// any event, so a node that accepted the connection and says nothing is hung (a stopped
/// process, a blocked runtime) and is tried again like one that refused the connection.
const WATCH_ANSWER: Duration = Duration::from_secs(10);

/// How often a watch logs a warning: its first, then at most one in this time (the others
/// at debug level), for the whole life of the watch, so neither an outage nor a stream that
/// keeps breaking right after it synced (a lagging receiver's `event: error`, a silent
/// peer) is a log flood.
const WATCH_WARN_EVERY: Duration = Duration::from_secs(60);

/// A watch's pauses before it connects again: from the shortest, doubled after each try
/// up to the longest; a stream that got as far as `current` starts again from the
/// shortest.
const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(100);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The longest pause after streams given up for an event this client could not read: such
/// a stream synced, but so will the next one and then break on the same event, each time
/// with a full replay, so the pauses keep growing past [`WATCH_BACKOFF_MAX`] instead of
/// starting again from the shortest.
const BAD_EVENT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The pause after a replay longer than [`MAX_STATE`]: the next one is not likely to be
/// shorter soon, and each one costs the server (and this client) all of it.
fn state_too_large_pause() -> Duration {
    Duration::from_secs(30 + fastrand::u64(0..=30))
}

async fn watch_loop(c: Client, service: String, tx: mpsc::Sender<Vec<Event>>) {
    let mut known = Known::default();
    let mut backoff = WATCH_BACKOFF_MIN;
    let mut log = WatchLog::default();
    loop {
        let request = c
            .http
            .request(reqwest::Method::GET, &format!("/services/{service}"))
            .header("accept", "text/event-stream")
            .send();
        let ended = match tokio::time::timeout(WATCH_ANSWER, request).await {
            Ok(Ok(r)) if r.status().is_success() => {
                let stream = read_stream(r, &service, c.state_limit, &mut known, &tx, &mut log);
                match stream.await {
                    Err(()) => return, // receiver gone
                    Ok(ended) => ended,
                }
            }
            Ok(Ok(r)) => Ended::failed(false, format!("refused: {}", r.status())),
            Ok(Err(e)) => Ended::failed(false, format!("request failed: {e}")),
            Err(_) => Ended::failed(false, format!("no answer in {WATCH_ANSWER:?}")),
        };
        if ended.failed {
            log.failed(&service, &ended.why);
        } else {
            tracing::debug!(service, why = %ended.why, "watch stream ended; reconnecting");
        }
        if tx.is_closed() {
            return;
        }
        let pause = match ended.cause {
            Cause::StateTooLarge => state_too_large_pause(),
            Cause::BadEvent => {
                let pause = backoff;
                backoff = (backoff * 2).min(BAD_EVENT_BACKOFF_MAX);
                pause
            }
            Cause::Other => {
                // Only a stream that got as far as `current` was a working one: a server
                // that answers 200 and ends at once is retried with backoff.
                if ended.synced {
                    backoff = WATCH_BACKOFF_MIN;
                }
                let pause = backoff.min(WATCH_BACKOFF_MAX);
                backoff = (pause * 2).min(WATCH_BACKOFF_MAX);
                pause
            }
        };
        tokio::time::sleep(pause).await;
    }
}

/// At most one warning each [`WATCH_WARN_EVERY`]: the first one, then one when that long
/// has passed since the last.
#[derive(Default)]
struct RateLimit {
    last: Option<tokio::time::Instant>,
}

impl RateLimit {
    /// Whether a warning may be logged now (it is then counted as logged).
    fn allow(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let ok = self
            .last
            .is_none_or(|t| now.duration_since(t) >= WATCH_WARN_EVERY);
        if ok {
            self.last = Some(now);
        }
        ok
    }
}

/// What a watch logs: its failures (connections that ended before `current`, working
/// streams given up) and the events in a replay it could not read, as warnings at most
/// one each [`WATCH_WARN_EVERY`] over the life of the watch; and events of kinds this
/// client does not know (a newer discoverd's), skipped, with their own such limit.
#[derive(Default)]
struct WatchLog {
    /// Failures since a stream last got to `current`.
    count: u32,
    /// One of them was logged as a warning (so its end is worth an info).
    warned_run: bool,
    warnings: RateLimit,
    unknown: RateLimit,
    /// Events of unknown kinds skipped since the last one logged.
    unknown_skipped: u64,
}

impl WatchLog {
    fn failed(&mut self, service: &str, why: &str) {
        self.count += 1;
        if self.warnings.allow() {
            self.warned_run = true;
            tracing::warn!(service, error = %why, failures = self.count, "watch failed; reconnecting");
        } else {
            tracing::debug!(service, error = %why, failures = self.count, "watch failed; reconnecting");
        }
    }

    /// A stream got as far as `current`: the run of failures is over (the warnings' limit
    /// goes on).
    fn working(&mut self, service: &str) {
        if self.count > 0 && self.warned_run {
            tracing::info!(service, failures = self.count, "watch working again");
        }
        self.count = 0;
        self.warned_run = false;
    }

    /// An event of a replay that could not be read, left out of it.
    fn skipped(&mut self, service: &str, error: &serde_json::Error, event: &str) {
        if self.warnings.allow() {
            tracing::warn!(service, error = %error, event, "undecodable event in a watch's replay; skipped");
        } else {
            tracing::debug!(service, error = %error, event, "undecodable event in a watch's replay; skipped");
        }
    }

    /// An event of a kind this client does not know, skipped.
    fn unknown_kind(&mut self, service: &str, kind: &str) {
        self.unknown_skipped += 1;
        if self.unknown.allow() {
            let skipped = std::mem::take(&mut self.unknown_skipped);
            tracing::warn!(
                service,
                kind,
                skipped,
                "watch event of a kind this client does not know; skipped"
            );
        } else {
            tracing::debug!(
                service,
                kind,
                "watch event of a kind this client does not know; skipped"
            );
        }
    }
}

/// Why a watch connection ended, for the pause before the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// A live event of a known kind could not be read.
    BadEvent,
    /// The replay was longer than the client holds.
    StateTooLarge,
    Other,
}

/// How one watch connection ended, the consumer still being there.
struct Ended {
    /// It got as far as `current`.
    synced: bool,
    why: String,
    /// Counts as a failure: anything before `current`, and a working stream the client
    /// gave up (not one the server closed, as it does when it stops).
    failed: bool,
    cause: Cause,
}

impl Ended {
    fn failed(synced: bool, why: impl Into<String>) -> Ended {
        Ended {
            synced,
            why: why.into(),
            failed: true,
            cause: Cause::Other,
        }
    }

    /// Closed or broken by the server: a failure only before `current`.
    fn closed(synced: bool, why: &str) -> Ended {
        Ended {
            synced,
            why: if synced {
                why.to_string()
            } else {
                format!("{why} before current")
            },
            failed: !synced,
            cause: Cause::Other,
        }
    }
}

/// How long a watch stream may be silent (no event, no keep-alive) before it is dropped
/// and reconnected: two of the server's 30 s keep-alive intervals and some.
const WATCH_IDLE: Duration = Duration::from_secs(70);

/// One item of a watch stream's data.
enum Decoded {
    Event(Event),
    /// An event of a kind this client does not know (a newer discoverd's): skipped.
    UnknownKind(String),
    /// An event that could not be read, with what could be told of it: its kind (if it
    /// names a known one) and its instance's id.
    Bad {
        kind: Option<EventKind>,
        id: Option<String>,
        error: serde_json::Error,
    },
}

/// Reads one event, telling one of an unknown kind (a newer discoverd's, to be skipped)
/// from one of a known kind this client cannot read.
fn decode(data: &str) -> Decoded {
    let error = match serde_json::from_str::<Event>(data) {
        Ok(ev) => return Decoded::Event(ev),
        Err(e) => e,
    };
    let value = serde_json::from_str::<serde_json::Value>(data).ok();
    let field = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(str::to_string);
    let name = field(value.as_ref().and_then(|v| v.get("kind")));
    let id = field(
        value
            .as_ref()
            .and_then(|v| v.get("instance"))
            .and_then(|i| i.get("id")),
    );
    let kind = match name {
        Some(name) => match serde_json::from_value(serde_json::Value::String(name.clone())) {
            Ok(kind) => Some(kind),
            Err(_) => return Decoded::UnknownKind(name),
        },
        None => None,
    };
    Decoded::Bad { kind, id, error }
}

/// What a replay held that could not be read: what the consumer has of it stays as it is
/// (an instance whose `up` was unreadable is there; a `down` for it would drop a live
/// instance because this client could not read it).
#[derive(Debug, Default)]
struct Unreadable {
    /// Instances whose `up` could not be read.
    ids: std::collections::BTreeSet<String>,
    /// An event that could not be told apart (no kind, or an `up` without a readable id):
    /// every instance the consumer has stays.
    any: bool,
    /// The leader could not be read.
    leader: bool,
}

impl Unreadable {
    fn note(&mut self, kind: Option<EventKind>, id: Option<String>) {
        match (kind, id) {
            (Some(EventKind::Up), Some(id)) => {
                self.ids.insert(id);
            }
            (Some(EventKind::Up) | None, _) => self.any = true,
            (Some(EventKind::Leader), _) => self.leader = true,
            // Metadata that cannot be read changes nothing (only metadata read is sent);
            // a replay holds no others.
            (Some(_), _) => {}
        }
    }
}

/// Reads one connection. Before `current` the replay is buffered (up to `limit` bytes);
/// at `current` it is diffed against what the consumer already knows, and the run of
/// failures is over. `Err` when the consumer is gone.
async fn read_stream(
    mut r: reqwest::Response,
    service: &str,
    limit: usize,
    known: &mut Known,
    tx: &mpsc::Sender<Vec<Event>>,
    log: &mut WatchLog,
) -> Result<Ended, ()> {
    let mut buf = crate::sse::SseBuf::default();
    let mut replay: Vec<Event> = Vec::new();
    let mut unreadable = Unreadable::default();
    let mut replay_bytes = 0;
    let mut in_replay = true;
    loop {
        // The server writes a keep-alive after 30 s without an event: a stream silent for
        // much longer has a hung server or a peer gone without a FIN behind it.
        let chunk = match tokio::time::timeout(WATCH_IDLE, r.chunk()).await {
            Ok(Ok(Some(c))) => c,
            Ok(Ok(None)) => return Ok(Ended::closed(!in_replay, "stream closed")),
            Ok(Err(e)) => return Ok(Ended::closed(!in_replay, &format!("stream broke: {e}"))),
            Err(_) => {
                let why = format!("stream silent for {WATCH_IDLE:?}");
                return Ok(Ended::failed(!in_replay, why));
            }
        };
        if buf.push(&chunk).is_err() {
            return Ok(Ended::failed(!in_replay, "stream item too long"));
        }
        while let Some(raw) = buf.next_item() {
            let item = String::from_utf8_lossy(raw).into_owned();
            let data: String = item
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect::<Vec<_>>()
                .join("\n");
            if item.lines().any(|l| l.starts_with("event: error")) {
                let why = format!("server error: {}", truncated(&data, 200));
                return Ok(Ended::failed(!in_replay, why));
            }
            if data.is_empty() {
                continue;
            }
            if in_replay {
                replay_bytes += data.len();
                if replay_bytes > limit {
                    return Ok(Ended {
                        cause: Cause::StateTooLarge,
                        ..Ended::failed(false, format!("replay longer than {limit} bytes"))
                    });
                }
            }
            let ev = match decode(&data) {
                Decoded::Event(ev) => ev,
                // Says nothing this client could act on; the rest of the stream is good.
                Decoded::UnknownKind(kind) => {
                    log.unknown_kind(service, &kind);
                    continue;
                }
                // A live event of a known kind (or none that can be read) this client
                // cannot read, skipped, would be missing from what the consumer knows until
                // something else changed it: the stream is given up, and the next one's
                // replay brings what it said (or, if that cannot be read either, keeps what
                // the consumer has).
                Decoded::Bad { kind, error, .. } if !in_replay => {
                    let what = kind.map_or("unknown".to_string(), |k| format!("{k:?}"));
                    let event = truncated(&data, 200);
                    return Ok(Ended {
                        cause: Cause::BadEvent,
                        ..Ended::failed(
                            true,
                            format!("undecodable {what} event ({error}): {event}"),
                        )
                    });
                }
                // In the replay, giving up would not help (the next replay has it too):
                // the rest of the state is delivered without it, and what the consumer has
                // of what it was stays.
                Decoded::Bad { kind, id, error } => {
                    unreadable.note(kind, id);
                    log.skipped(service, &error, truncated(&data, 200));
                    continue;
                }
            };
            if in_replay {
                if ev.kind == EventKind::Current {
                    in_replay = false;
                    log.working(service);
                    let replay = std::mem::take(&mut replay);
                    let missed = reconcile(service, known, replay, &unreadable);
                    if !missed.is_empty() {
                        tx.send(missed).await.map_err(drop)?;
                    }
                } else {
                    replay.push(ev);
                }
                continue;
            }
            track(known, &ev);
            tx.send(vec![ev]).await.map_err(drop)?;
        }
    }
}

/// At most `max` bytes of `s` (cut at a character boundary), for a log line.
fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn track(known: &mut Known, ev: &Event) {
    match (ev.kind, &ev.instance) {
        (EventKind::Up | EventKind::Update, Some(i)) => {
            known.instances.insert(i.id.clone(), i.clone());
        }
        (EventKind::Down, Some(i)) => {
            known.instances.remove(&i.id);
        }
        (EventKind::Leader, l) => known.leader = l.as_ref().map(|i| (i.id.clone(), i.index)),
        (EventKind::ServiceMeta, _) => {
            known.meta_index = ev.service_meta.as_ref().map(|m| m.index);
        }
        _ => {}
    }
}

/// The events that take a consumer from `known` to the state in `replay`, ending with
/// `current` (only on the first sync, as the server would send it). What `unreadable`
/// says the replay held but could not be read stays as the consumer has it.
fn reconcile(
    service: &str,
    known: &mut Known,
    replay: Vec<Event>,
    unreadable: &Unreadable,
) -> Vec<Event> {
    let mut out = Vec::new();
    let ev = |kind, instance, service_meta| Event {
        service: service.to_string(),
        kind,
        instance,
        service_meta,
    };
    let mut now: BTreeMap<String, Instance> = replay
        .iter()
        .filter(|e| e.kind == EventKind::Up)
        .filter_map(|e| e.instance.clone())
        .map(|i| (i.id.clone(), i))
        .collect();
    for (id, old) in &known.instances {
        if !now.contains_key(id) && (unreadable.any || unreadable.ids.contains(id)) {
            now.insert(id.clone(), old.clone());
        }
    }
    // New and changed instances first, vanished ones after: a consumer that applies each
    // event at once passes through an empty set only for a re-registered instance (its
    // `down` then `up`). The router applies a reconnect's events as one change.
    for e in replay.iter().filter(|e| e.kind == EventKind::Up) {
        let Some(i) = &e.instance else { continue };
        match known.instances.get(&i.id) {
            None => out.push(ev(EventKind::Up, Some(i.clone()), None)),
            // Re-registered meanwhile: `update` would keep the old index (spec §2.3).
            Some(old) if old.index != i.index => {
                out.push(ev(EventKind::Down, Some(old.clone()), None));
                out.push(ev(EventKind::Up, Some(i.clone()), None));
            }
            Some(old) if old != i => out.push(ev(EventKind::Update, Some(i.clone()), None)),
            Some(_) => {}
        }
    }
    for (id, old) in &known.instances {
        if !now.contains_key(id) {
            out.push(ev(EventKind::Down, Some(old.clone()), None));
        }
    }
    let leader = replay
        .iter()
        .find(|e| e.kind == EventKind::Leader)
        .and_then(|e| e.instance.clone());
    let now_leader = leader.as_ref().map(|i| (i.id.clone(), i.index));
    // A leader that could not be read is not a leader gone.
    let keep_leader = unreadable.leader && leader.is_none();
    if !keep_leader
        && (now_leader != known.leader || !known.synced)
        && (leader.is_some() || known.leader.is_some())
    {
        out.push(ev(EventKind::Leader, leader, None));
    }
    let meta = replay
        .iter()
        .find(|e| e.kind == EventKind::ServiceMeta)
        .and_then(|e| e.service_meta.clone());
    // Any other version, older ones too: a peer that lags behind sends the newer one live
    // once it has it, while a cluster rebuilt from scratch starts its indexes again (ignoring
    // lower ones would drop its metadata until they caught up).
    if let Some(m) = meta.filter(|m| Some(m.index) != known.meta_index) {
        out.push(ev(EventKind::ServiceMeta, None, Some(m)));
    }
    let first = !known.synced;
    for e in &out {
        track(known, e);
    }
    known.instances = now;
    known.synced = true;
    if first {
        out.push(ev(EventKind::Current, None, None));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, meta: &str) -> Instance {
        let mut m = BTreeMap::new();
        if !meta.is_empty() {
            m.insert("k".to_string(), meta.to_string());
        }
        Instance {
            id: id.into(),
            addr: "127.0.0.1:1".into(),
            proto: "tcp".into(),
            meta: m,
            index: 1,
        }
    }

    /// [`reconcile`] of a replay read whole.
    fn resync(known: &mut Known, replay: Vec<Event>) -> Vec<Event> {
        reconcile("s", known, replay, &Unreadable::default())
    }

    /// An environment with nothing set.
    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn up(i: Instance) -> Event {
        Event {
            service: "s".into(),
            kind: EventKind::Up,
            instance: Some(i),
            service_meta: None,
        }
    }

    /// Service names and instance ids that a path would not carry as they are (`web?x`
    /// named `web`, `..` the parent) are refused before anything is sent.
    #[tokio::test]
    async fn invalid_names_are_refused_before_sending() {
        use std::sync::atomic::Ordering;
        let (url, seen) =
            stand_in(|_, _| Some(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec())).await;
        let c = Client::new(&url);
        let invalid = |r: Result<(), Error>, what: &str| {
            assert!(matches!(r, Err(Error::Invalid { .. })), "{what}: {r:?}");
        };
        for bad in [
            "web?x",
            "web/instances",
            "",
            "..",
            "Web",
            "web#x",
            "we b",
            "web%2f",
        ] {
            invalid(c.remove_service(bad).await, bad);
            invalid(c.add_service(bad, "oldest").await, bad);
            invalid(c.instances(bad).await.map(drop), bad);
            invalid(c.get_meta(bad).await.map(drop), bad);
            invalid(c.get_meta_consistent(bad).await.map(drop), bad);
            let meta = ServiceMeta {
                data: serde_json::Value::Null,
                leader_id: None,
                index: 0,
            };
            invalid(c.set_meta(bad, &meta).await.map(drop), bad);
            invalid(c.set_leader(bad, "x").await, bad);
            invalid(c.leader(bad).await.map(drop), bad);
            invalid(c.unregister(bad, "abc").await, bad);
        }
        for bad in ["..", "a?b", "a/b", "", "a#b", "a%2f"] {
            invalid(c.unregister("web", bad).await, bad);
            let inst = Instance {
                id: bad.to_string(),
                addr: "127.0.0.1:80".into(),
                proto: "tcp".into(),
                ..Default::default()
            };
            if !bad.is_empty() {
                invalid(c.register("web", &inst).await, bad);
                invalid(c.heartbeat_with("web", inst, no_env).await.map(drop), bad);
            }
        }
        // A watch of an invalid name ends at once (it watched `web` for `web?x`, and
        // retried a name the server refuses for ever).
        for bad in ["web?x", "Web", ""] {
            let mut w = c.watch(bad);
            let end = tokio::time::timeout(Duration::from_secs(10), w.next()).await;
            assert!(matches!(end, Ok(None)), "{bad}: {end:?}");
        }
        assert_eq!(seen.load(Ordering::SeqCst), 0, "a request was sent");
        // Valid names go through.
        c.remove_service("web-1").await.unwrap();
        c.unregister("web-1", "0123abcdef").await.unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 2);
    }

    /// A discoverd stand-in: reads whole requests (head and body) and answers the n-th
    /// (from 0) with `answer(n, request line)`, or never when that is `None`. Counts the
    /// requests.
    async fn stand_in(
        answer: impl Fn(usize, &str) -> Option<Vec<u8>> + Send + Sync + 'static,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        stand_in_with(move |n, line, _| answer(n, line)).await
    }

    /// [`stand_in`] whose `answer` also gets the request's body.
    async fn stand_in_with(
        answer: impl Fn(usize, &str, &[u8]) -> Option<Vec<u8>> + Send + Sync + 'static,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        stand_in_after(Duration::ZERO, answer).await
    }

    /// [`stand_in_with`] that answers each request `delay` after it came (a slow node).
    async fn stand_in_after(
        delay: Duration,
        answer: impl Fn(usize, &str, &[u8]) -> Option<Vec<u8>> + Send + Sync + 'static,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let seen = std::sync::Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        let answer = std::sync::Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let (count, answer) = (count.clone(), answer.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // One request: its head, then its body.
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match s.read(&mut chunk).await {
                                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                                _ => return,
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        while buf.len() < end + 4 + len {
                            match s.read(&mut chunk).await {
                                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                                _ => return,
                            }
                        }
                        let body: Vec<u8> = buf.drain(..end + 4 + len).skip(end + 4).collect();
                        let line = head.lines().next().unwrap_or("").to_string();
                        let n = count.fetch_add(1, Ordering::SeqCst);
                        let Some(resp) = answer(n, &line, &body) else {
                            // A peer that stopped answering.
                            std::future::pending::<()>().await;
                            return;
                        };
                        tokio::time::sleep(delay).await;
                        if s.write_all(&resp).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, seen)
    }

    /// A discoverd stand-in that answers the first request and never any later one.
    async fn answers_once() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        stand_in(|n, _| {
            (n == 0).then(|| b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_vec())
        })
        .await
    }

    #[tokio::test]
    async fn a_heartbeat_that_gets_no_answer_is_given_up_and_retried() {
        let (url, seen) = answers_once().await;
        let c = Client::new(&url);
        let hb = c
            .heartbeat_with("s", inst("", ""), no_env)
            .await
            .expect("the first registration is answered");
        // The next heartbeat (3–5 s later) hangs; it is given up after its timeout and
        // tried again at once, instead of waiting out the 30 s request timeout.
        let t0 = std::time::Instant::now();
        while seen.load(std::sync::atomic::Ordering::SeqCst) < 3 {
            assert!(
                t0.elapsed() < Duration::from_secs(12),
                "heartbeats stuck behind a request that gets no answer"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        hb.abandon().await;
    }

    /// A discoverd that accepts the registration's connections and never answers: the
    /// registration fails within its minute (each try is cut at [`REGISTER_TIMEOUT`]; it
    /// took five 30 s request timeouts, 150 s).
    ///
    /// The clock is paused and advances by itself when nothing is ready, real sockets
    /// included: a connection the kernel has not completed at that instant can see its 2 s
    /// connect timeout pass early. Such a try fails as `Http` (and is not counted by the
    /// stand-in), so the last try may have failed that way too; the bound holds either way.
    #[tokio::test(start_paused = true)]
    async fn a_registration_that_gets_no_answer_fails_within_its_bound() {
        use std::sync::atomic::Ordering;
        let (url, seen) = stand_in(|_, _| None).await;
        let t0 = tokio::time::Instant::now();
        let res = Client::new(&url)
            .heartbeat_with("s", inst("", ""), no_env)
            .await;
        let took = t0.elapsed();
        assert!(
            took <= REGISTER_FOR + Duration::from_millis(100),
            "gave up after {took:?}"
        );
        assert!(
            matches!(res, Err(Error::TimedOut { .. } | Error::Http(_))),
            "{:?}",
            res.err()
        );
        assert!(
            took >= REGISTER_FOR - REGISTER_TIMEOUT,
            "gave up after {took:?}"
        );
        let tries = seen.load(Ordering::SeqCst);
        assert!(tries >= REGISTER_ATTEMPTS as usize, "{tries} tries");
    }

    /// A discoverd slow to answer (5 s: an election, a busy disk) gets the registration
    /// sent once, not again every 3 s while the first write is still queued there (which
    /// also never succeeded: every try was cut before its answer).
    #[tokio::test(start_paused = true)]
    async fn a_slow_discoverd_gets_the_registration_once() {
        use std::sync::atomic::Ordering;
        let (url, seen) =
            stand_in_after(Duration::from_secs(5), |_, _, _| Some(json("200 OK", "{}"))).await;
        let hb = Client::new(&url)
            .heartbeat_with("s", inst("", ""), no_env)
            .await
            .expect("registered");
        assert_eq!(seen.load(Ordering::SeqCst), 1, "registration sent again");
        hb.abandon().await;
    }

    /// Closing a heartbeater whose discoverd stopped answering returns after the
    /// unregister's heartbeat limit, not its 30 s request timeout.
    #[tokio::test(start_paused = true)]
    async fn closing_against_a_discoverd_that_stopped_answering_returns() {
        let (url, _) = answers_once().await;
        let hb = Client::new(&url)
            .heartbeat_with("s", inst("", ""), no_env)
            .await
            .expect("the first registration is answered");
        let t0 = tokio::time::Instant::now();
        hb.close().await;
        let took = t0.elapsed();
        assert!(took <= Duration::from_secs(5), "close took {took:?}");
    }

    /// The job's variables go into the registered instance's meta; the caller's keys stay
    /// and variables set empty are left out.
    #[tokio::test]
    async fn a_jobs_environment_goes_into_the_instance_meta() {
        use std::sync::{Arc, Mutex};
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let log = bodies.clone();
        let (url, _) = stand_in_with(move |_, line, body| {
            if line.starts_with("put /services/s/instances/") {
                log.lock().unwrap().push(body.to_vec());
            }
            Some(json("200 OK", "{}"))
        })
        .await;
        let env = |name: &str| {
            let value = match name {
                "FLYNN_APP_ID" => "app-1",
                "FLYNN_APP_NAME" => "",
                "FLYNN_RELEASE_ID" => "release-1",
                "FLYNN_PROCESS_TYPE" => "web",
                "FLYNN_JOB_ID" => "host1-job-1",
                _ => return None,
            };
            Some(value.to_string())
        };
        let mut mine = inst("", "v");
        mine.meta
            .insert("FLYNN_PROCESS_TYPE".into(), "set-by-caller".into());
        let hb = Client::new(&url)
            .heartbeat_with("s", mine, env)
            .await
            .expect("registered");
        hb.abandon().await;
        let sent: Instance = serde_json::from_slice(&bodies.lock().unwrap()[0]).unwrap();
        let want: BTreeMap<String, String> = [
            ("FLYNN_APP_ID", "app-1"),
            ("FLYNN_JOB_ID", "host1-job-1"),
            ("FLYNN_PROCESS_TYPE", "set-by-caller"),
            ("FLYNN_RELEASE_ID", "release-1"),
            ("k", "v"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(sent.meta, want);
    }

    /// One rule for the job's meta, whoever registers the job: its FLYNN_* variables,
    /// those set empty left out (the host daemon kept them, the heartbeater did not).
    #[test]
    fn a_jobs_meta_is_its_flynn_variables_set_and_not_empty() {
        let env = [
            "FLYNN_APP_ID=app-1",
            "FLYNN_APP_NAME=",
            "FLYNN_JOB_ID=host1-job-1",
            "FLYNN_OTHER=x",
            "PORT=80",
            "FLYNN_PROCESS_TYPE=web",
        ];
        let meta = job_meta(env.iter().filter_map(|kv| kv.split_once('=')));
        let want: BTreeMap<String, String> = [
            ("FLYNN_APP_ID", "app-1"),
            ("FLYNN_JOB_ID", "host1-job-1"),
            ("FLYNN_PROCESS_TYPE", "web"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(meta, want);
    }

    /// A discoverd that accepts the watch's connection and never answers: the watch tries
    /// again after [`WATCH_ANSWER`] instead of waiting for ever. (Paused clock and real
    /// sockets: a connect timeout passed early is a failed try the stand-in does not see,
    /// and only makes the second try later; the bound leaves room for a few.)
    #[tokio::test(start_paused = true)]
    async fn a_watch_that_gets_no_answer_is_tried_again() {
        use std::sync::atomic::Ordering;
        let (url, seen) = stand_in(|_, _| None).await;
        let w = Client::new(&url).watch("s");
        let t0 = tokio::time::Instant::now();
        while seen.load(Ordering::SeqCst) < 2 {
            assert!(
                t0.elapsed() < Duration::from_secs(25),
                "no second try in 25 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(t0.elapsed() >= WATCH_ANSWER, "{:?}", t0.elapsed());
        drop(w);
    }

    /// The headers of a stream: no length, the body ends when the connection does.
    const SSE_HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n";

    /// One SSE item carrying `data`.
    fn item(data: &str) -> String {
        format!("data: {data}\n\n")
    }

    const CURRENT: &str = r#"{"service":"s","kind":"current"}"#;

    /// An `up` of a known kind the client cannot read (its index is a string), for `id`.
    fn unreadable_up(id: &str) -> String {
        format!(
            r#"{{"service":"s","kind":"up","instance":{{"id":"{id}","addr":"127.0.0.1:1","proto":"tcp","index":"one"}}}}"#
        )
    }

    /// The JSON of an `up` for `i`.
    fn up_json(i: Instance) -> String {
        serde_json::to_string(&up(i)).unwrap()
    }

    /// Takes the watch's next event, failing after 5 s.
    async fn next_within(w: &mut Watch) -> Event {
        tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("no event in 5 s")
            .expect("the watch ended")
    }

    /// A live event of a known kind the client cannot read ends the stream: the next one's
    /// replay says what it was (it was skipped, and a server silent after it held the
    /// watch for the 70 s idle limit).
    #[tokio::test]
    async fn an_undecodable_live_event_ends_the_stream() {
        use std::sync::atomic::Ordering;
        let answer = format!("{SSE_HEAD}{}{}", item(CURRENT), item(&unreadable_up("x")));
        let (url, seen) = stand_in(move |_, _| Some(answer.clone().into_bytes())).await;
        let mut w = Client::new(&url).watch("s");
        assert_eq!(next_within(&mut w).await.kind, EventKind::Current);
        let t0 = std::time::Instant::now();
        while seen.load(Ordering::SeqCst) < 2 {
            assert!(
                t0.elapsed() < Duration::from_secs(2),
                "no reconnect after an undecodable event"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// An event of a kind this client does not know (a newer discoverd's) is skipped: the
    /// stream goes on and the events after it arrive (it ended the stream, and the next
    /// one ended on it again, for ever).
    #[tokio::test]
    async fn an_event_of_an_unknown_kind_is_skipped() {
        use std::sync::atomic::Ordering;
        let answer = format!(
            "{SSE_HEAD}{}{}{}{}",
            item(&up_json(inst("a", ""))),
            item(CURRENT),
            item(r#"{"service":"s","kind":"weather","instance":{"id":7}}"#),
            item(&up_json(inst("b", ""))),
        );
        let (url, seen) = stand_in(move |_, _| Some(answer.clone().into_bytes())).await;
        let mut w = Client::new(&url).watch("s");
        let mut got = Vec::new();
        for _ in 0..3 {
            let ev = next_within(&mut w).await;
            got.push((ev.kind, ev.instance.map(|i| i.id)));
        }
        assert_eq!(
            got,
            [
                (EventKind::Up, Some("a".into())),
                (EventKind::Current, None),
                (EventKind::Up, Some("b".into())),
            ]
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(seen.load(Ordering::SeqCst), 1, "reconnected");
    }

    /// An instance whose `up` in the replay after a reconnect cannot be read is not reported
    /// down: it is there (and a live `up` it sent could not be read either); the consumer
    /// keeps the copy it has.
    #[tokio::test]
    async fn an_unreadable_up_in_a_replay_does_not_report_the_instance_down() {
        let first = format!(
            "{SSE_HEAD}{}{}{}event: error\ndata: lagging\n\n",
            item(&up_json(inst("a", ""))),
            item(&up_json(inst("b", ""))),
            item(CURRENT),
        );
        let second = format!(
            "{SSE_HEAD}{}{}{}{}",
            item(&unreadable_up("a")),
            item(&up_json(inst("b", ""))),
            item(CURRENT),
            item(&up_json(inst("c", ""))),
        );
        let (url, _) =
            stand_in(move |n, _| Some(if n == 0 { &first } else { &second }.clone().into_bytes()))
                .await;
        let mut w = Client::new(&url).watch("s");
        let mut got = Vec::new();
        for _ in 0..4 {
            let ev = next_within(&mut w).await;
            got.push((ev.kind, ev.instance.map(|i| i.id)));
        }
        assert_eq!(
            got,
            [
                (EventKind::Up, Some("a".into())),
                (EventKind::Up, Some("b".into())),
                (EventKind::Current, None),
                // After the reconnect: c is new, a is not gone.
                (EventKind::Up, Some("c".into())),
            ]
        );
    }

    /// What a replay held and could not be read stays as the consumer has it: the
    /// instances whose `up` it was (all of them, when it could not be told whose), the
    /// leader; what was read is applied.
    #[test]
    fn what_a_replay_could_not_read_stays_as_it_was() {
        let leader = |i: Instance| Event {
            service: "s".into(),
            kind: EventKind::Leader,
            instance: Some(i),
            service_meta: None,
        };
        let mut known = Known::default();
        resync(
            &mut known,
            vec![
                up(inst("a", "")),
                up(inst("b", "")),
                up(inst("c", "")),
                leader(inst("a", "")),
            ],
        );
        let mut unreadable = Unreadable::default();
        unreadable.note(Some(EventKind::Up), Some("a".into()));
        unreadable.note(Some(EventKind::Leader), None);
        let got = reconcile("s", &mut known, vec![up(inst("d", ""))], &unreadable);
        let got: Vec<(EventKind, String)> = got
            .iter()
            .map(|e| (e.kind, e.instance.as_ref().unwrap().id.clone()))
            .collect();
        assert_eq!(
            got,
            [
                (EventKind::Up, "d".into()),
                (EventKind::Down, "b".into()),
                (EventKind::Down, "c".into()),
            ]
        );
        assert_eq!(known.instances.keys().collect::<Vec<_>>(), ["a", "d"]);
        assert_eq!(known.leader, Some(("a".into(), 1)));
        // An `up` whose instance cannot be told: nobody is reported down.
        let mut unreadable = Unreadable::default();
        unreadable.note(None, None);
        let got = reconcile("s", &mut known, vec![up(inst("e", ""))], &unreadable);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got.iter().all(|e| e.kind != EventKind::Down), "{got:?}");
        assert_eq!(known.instances.keys().collect::<Vec<_>>(), ["a", "d", "e"]);
        assert_eq!(got[1].kind, EventKind::Leader, "the leader gone: {got:?}");
        // Read again: what is gone is reported gone.
        let got = resync(&mut known, vec![up(inst("e", ""))]);
        let downs = got.iter().filter(|e| e.kind == EventKind::Down).count();
        assert_eq!(downs, 2, "{got:?}");
    }

    /// Streams given up for a live event the client cannot read back off, further each
    /// time and past the usual 2 s, instead of starting again from 100 ms because they had
    /// synced: each one is a full replay, and the next one breaks on the same event.
    #[tokio::test(start_paused = true)]
    async fn streams_given_up_for_unreadable_events_back_off() {
        use std::sync::atomic::Ordering;
        let answer = format!("{SSE_HEAD}{}{}", item(CURRENT), item(&unreadable_up("x")));
        let (url, seen) = stand_in(move |_, _| Some(answer.clone().into_bytes())).await;
        let w = Client::new(&url).watch("s");
        let t0 = tokio::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(w);
        // 0.1, 0.2, 0.4 … 25.6 s apart: 10 in a minute (2 s apart: about 35; from 100 ms
        // every time: 600).
        let n = seen.load(Ordering::SeqCst);
        assert!((3..=12).contains(&n), "{n} connections in a minute");
    }

    /// A replay that goes on without `current` is given up at the state limit, not held
    /// until memory runs out (nor until the 70 s idle limit), and tried again after 30 s
    /// or more: the next one is not likely to be shorter (it was tried every 2 s for ever).
    #[tokio::test(start_paused = true)]
    async fn a_replay_past_its_limit_is_given_up_and_tried_again_much_later() {
        use std::sync::atomic::Ordering;
        const LIMIT: usize = 64 << 10;
        let ev = item(&up_json(inst("a", &"x".repeat(1000))));
        // Twice the limit, then silence.
        let answer = format!("{SSE_HEAD}{}", ev.repeat(2 * LIMIT / ev.len()));
        let (url, seen) = stand_in(move |_, _| Some(answer.clone().into_bytes())).await;
        let w = Client::new(&url).with_state_limit(LIMIT).watch("s");
        let t0 = tokio::time::Instant::now();
        // Small steps: a clock that jumps while sockets are busy jumps little.
        let step = Duration::from_millis(100);
        while t0.elapsed() < Duration::from_secs(29) {
            tokio::time::sleep(step).await;
        }
        assert_eq!(seen.load(Ordering::SeqCst), 1, "tried again too soon");
        while seen.load(Ordering::SeqCst) < 2 {
            assert!(
                t0.elapsed() < Duration::from_secs(65),
                "the replay was held past its limit"
            );
            tokio::time::sleep(step).await;
        }
        drop(w);
    }

    /// A chunked answer of `body` that never ends: no last chunk, the connection kept
    /// open. A client that reads it whole waits for ever.
    fn endless(status: &str, body: &[u8]) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
             transfer-encoding: chunked\r\n\r\n"
        )
        .into_bytes();
        for chunk in body.chunks(64 << 10) {
            out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    /// `f`'s outcome, which must come within 10 s.
    async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .unwrap_or_else(|_| panic!("{what}: no outcome in 10 s (reading the whole answer?)"))
    }

    /// An answer longer than its limit ([`MAX_BODY`], or the state limit for an instance
    /// list) fails once it gets there, with a `content-length` at once, and an error body
    /// past its own limit (64 KiB) is just its status: none is read whole. Every answer
    /// here is longer than the limit and never ends.
    #[tokio::test]
    async fn answers_past_the_size_limit_are_not_read_whole() {
        let meta = format!(r#"{{"data":"{}","index":1}}"#, "x".repeat(MAX_BODY + 1));
        let streamed = endless("200 OK", meta.as_bytes());
        let (url, _) = stand_in(move |_, _| Some(streamed.clone())).await;
        let err = within("meta", Client::new(&url).get_meta("s")).await.err();
        assert!(
            matches!(err, Some(Error::TooLarge { limit: MAX_BODY })),
            "{}",
            short(&err)
        );

        const LIMIT: usize = 64 << 10;
        let list = serde_json::to_vec(&vec![inst("a", &"x".repeat(1000)); 100]).unwrap();
        assert!(list.len() > LIMIT);
        let streamed = endless("200 OK", &list);
        let (url, _) = stand_in(move |_, _| Some(streamed.clone())).await;
        let c = Client::new(&url).with_state_limit(LIMIT);
        let err = within("instances", c.instances("s")).await.err();
        assert!(
            matches!(err, Some(Error::TooLarge { limit: LIMIT })),
            "{}",
            short(&err)
        );

        // Announced, and nothing of it sent.
        let announced = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        let (url, _) = stand_in(move |_, _| Some(announced.clone().into_bytes())).await;
        let err = within("announced", Client::new(&url).get_meta("s"))
            .await
            .err();
        assert!(
            matches!(err, Some(Error::TooLarge { .. })),
            "{}",
            short(&err)
        );

        let envelope = serde_json::json!({
            "code": "unknown_error",
            "message": "x".repeat(1 << 20),
            "retry": false,
        });
        let refused = endless("500 Internal Server Error", envelope.to_string().as_bytes());
        let (url, _) = stand_in(move |_, _| Some(refused.clone())).await;
        let err = within("error", Client::new(&url).get_meta("s")).await.err();
        assert!(
            matches!(err, Some(Error::Status { status: 500 })),
            "{}",
            short(&err)
        );
    }

    /// A body that is not the JSON expected says why in its message (callers log `%e`).
    #[test]
    fn a_decode_error_says_why() {
        let e = serde_json::from_str::<ServiceMeta>("{").unwrap_err();
        let detail = e.to_string();
        let msg = Error::Decode(e).to_string();
        assert!(msg.contains(&detail), "{msg}");
    }

    /// The start of a long value's debug form.
    fn short(v: &impl std::fmt::Debug) -> String {
        format!("{v:?}").chars().take(300).collect()
    }

    /// Counts the warnings and infos logged on the thread it is the default subscriber of
    /// (and records nothing else).
    #[derive(Clone, Default)]
    struct Logged {
        warn: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        info: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Logged {
        fn counts(&self) -> (usize, usize) {
            use std::sync::atomic::Ordering;
            (
                self.warn.load(Ordering::SeqCst),
                self.info.load(Ordering::SeqCst),
            )
        }
    }

    impl tracing::Subscriber for Logged {
        fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
            matches!(*meta.level(), tracing::Level::WARN | tracing::Level::INFO)
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, ev: &tracing::Event<'_>) {
            let count = match *ev.metadata().level() {
                tracing::Level::WARN => &self.warn,
                tracing::Level::INFO => &self.info,
                _ => return,
            };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// A watch's failures are warnings: the first, then one a minute at most over the life
    /// of the watch (a stream that gets to `current` in between does not start it again).
    #[tokio::test(start_paused = true)]
    async fn watch_failures_are_warned_first_and_then_once_a_minute() {
        use std::sync::atomic::Ordering;
        let logged = Logged::default();
        let _log = tracing::subscriber::set_default(logged.clone());
        let working = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{}",
            item(CURRENT).len(),
            item(CURRENT)
        );
        // Four refusals, a stream that gets to `current` and ends, refusals again.
        let (url, seen) = stand_in(move |n, _| {
            Some(match n {
                4 => working.clone().into_bytes(),
                _ => unavailable("discoverd: not ready"),
            })
        })
        .await;
        let mut w = Client::new(&url).watch("s");
        assert_eq!(w.next().await.unwrap().kind, EventKind::Current);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(logged.counts().0, 1, "the first failure only");
        // Five minutes of failures, one every 2 s: about one warning a minute.
        tokio::time::sleep(Duration::from_secs(300)).await;
        let (tries, (warned, _)) = (seen.load(Ordering::SeqCst), logged.counts());
        assert!(tries > 100, "{tries} tries");
        assert!(
            (5..=7).contains(&warned),
            "{warned} warnings in {tries} tries"
        );
        drop(w);
    }

    /// Five minutes of a watch whose every stream is `answer`: (tries, warnings, infos).
    async fn five_minutes_of(answer: String) -> (usize, usize, usize) {
        use std::sync::atomic::Ordering;
        let logged = Logged::default();
        let _log = tracing::subscriber::set_default(logged.clone());
        let (url, seen) = stand_in(move |_, _| Some(answer.clone().into_bytes())).await;
        let w = Client::new(&url).watch("s");
        let t0 = tokio::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(300) {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        drop(w);
        let (warned, infos) = logged.counts();
        (seen.load(Ordering::SeqCst), warned, infos)
    }

    /// A stream that keeps breaking right after it synced (discoverd's `event: error` for a
    /// lagging receiver): about one warning a minute and as many "working again", not one
    /// of each every time (getting to `current` started the limit again); so too when
    /// each replay also holds an event the client cannot read (warned about every time).
    #[tokio::test(start_paused = true)]
    async fn a_watch_that_flaps_is_warned_about_once_a_minute() {
        let lagging = "event: error\ndata: lagging\n\n";
        let flap = format!("{SSE_HEAD}{}{lagging}", item(CURRENT));
        let (tries, warned, infos) = five_minutes_of(flap).await;
        assert!(tries > 100, "{tries} tries");
        assert!(
            (4..=7).contains(&warned),
            "{warned} warnings in {tries} tries"
        );
        assert!(
            (1..=warned).contains(&infos),
            "{infos} infos, {warned} warnings in {tries} tries"
        );
        let unreadable = item(&unreadable_up("x"));
        let flap = format!("{SSE_HEAD}{unreadable}{}{lagging}", item(CURRENT));
        let (tries, warned, _) = five_minutes_of(flap).await;
        assert!(tries > 100, "{tries} tries");
        assert!(
            (4..=7).contains(&warned),
            "{warned} warnings in {tries} tries with unreadable replays"
        );
    }

    #[test]
    fn reconnect_replay_becomes_the_missed_events() {
        let mut known = Known::default();
        let first = resync(&mut known, vec![up(inst("a", "")), up(inst("b", ""))]);
        let kinds: Vec<EventKind> = first.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            vec![EventKind::Up, EventKind::Up, EventKind::Current]
        );
        // After a reconnect: a is gone, b changed, c is new.
        let second = resync(&mut known, vec![up(inst("b", "x")), up(inst("c", ""))]);
        let got: Vec<(EventKind, String)> = second
            .iter()
            .map(|e| (e.kind, e.instance.as_ref().unwrap().id.clone()))
            .collect();
        // New and changed first, vanished last: applied one by one, the set is never
        // emptier than both the old and the new one.
        assert_eq!(
            got,
            vec![
                (EventKind::Update, "b".into()),
                (EventKind::Up, "c".into()),
                (EventKind::Down, "a".into()),
            ]
        );
        // Nothing changed: nothing to send.
        assert!(resync(&mut known, vec![up(inst("b", "x")), up(inst("c", ""))]).is_empty());
        // Every instance replaced by new ones (a deploy during the disconnect): applied in
        // order, the set never goes empty.
        let third = resync(&mut known, vec![up(inst("d", "")), up(inst("e", ""))]);
        let mut live: BTreeMap<String, ()> = [("b".into(), ()), ("c".into(), ())].into();
        for e in &third {
            let id = e.instance.as_ref().unwrap().id.clone();
            match e.kind {
                EventKind::Up | EventKind::Update => live.insert(id.clone(), ()),
                EventKind::Down => live.remove(&id),
                _ => None,
            };
            assert!(!live.is_empty(), "emptied at {:?} {id}", e.kind);
        }
        assert_eq!(live.keys().collect::<Vec<_>>(), ["d", "e"]);
    }

    /// A reconnect's events arrive together: once the first is taken, the rest are
    /// already waiting (a consumer applying what waits as one change never sees half).
    #[tokio::test]
    async fn a_reconnects_events_are_all_waiting_once_the_first_arrives() {
        let (tx, rx) = mpsc::channel(4);
        let mut w = Watch {
            rx,
            pending: std::collections::VecDeque::new(),
            task: tokio::spawn(async {}),
        };
        let ev = |id: &str, kind| Event {
            service: "s".into(),
            kind,
            instance: Some(inst(id, "")),
            service_meta: None,
        };
        assert!(w.try_next().is_none());
        tx.send(vec![ev("a", EventKind::Down), ev("a", EventKind::Up)])
            .await
            .unwrap();
        tx.send(vec![ev("b", EventKind::Up)]).await.unwrap();
        assert_eq!(w.next().await.unwrap().kind, EventKind::Down);
        assert_eq!(w.try_next().unwrap().kind, EventKind::Up);
        assert_eq!(w.try_next().unwrap().instance.unwrap().id, "b");
        assert!(w.try_next().is_none());
        drop(tx);
        assert!(w.next().await.is_none());
    }

    #[test]
    fn a_leader_back_under_the_same_id_is_down_up_and_a_new_leader() {
        let leader = |i: Instance| Event {
            service: "s".into(),
            kind: EventKind::Leader,
            instance: Some(i),
            service_meta: None,
        };
        let mut known = Known::default();
        let a1 = inst("a", "");
        resync(&mut known, vec![up(a1.clone()), leader(a1.clone())]);
        // While the stream was down, a was deleted and registered again.
        let a9 = Instance {
            index: 9,
            ..a1.clone()
        };
        let got = resync(&mut known, vec![up(a9.clone()), leader(a9.clone())]);
        let got: Vec<(EventKind, Option<Instance>)> =
            got.into_iter().map(|e| (e.kind, e.instance)).collect();
        assert_eq!(
            got,
            vec![
                (EventKind::Down, Some(a1)),
                (EventKind::Up, Some(a9.clone())),
                (EventKind::Leader, Some(a9.clone())),
            ]
        );
        assert!(resync(&mut known, vec![up(a9.clone()), leader(a9)]).is_empty());
    }

    #[test]
    fn a_bare_port_is_expanded_with_external_ip() {
        let ok = |addr, ip| expand_addr(addr, ip).unwrap();
        assert_eq!(ok(":5000", Some("10.0.0.9")), "10.0.0.9:5000");
        assert_eq!(ok(":5000", Some("fd00::9")), "[fd00::9]:5000");
        assert_eq!(ok("10.0.0.1:5000", None), "10.0.0.1:5000");
        for ip in [None, Some("")] {
            let err = expand_addr(":5000", ip).unwrap_err();
            assert!(matches!(err, Error::NoExternalIp { .. }), "{err:?}");
            assert!(err.to_string().contains("EXTERNAL_IP"));
        }
    }

    #[tokio::test]
    async fn a_bare_port_without_external_ip_fails_at_once() {
        // Nothing listens there: without the check this would retry for 60 s.
        let c = Client::new("http://127.0.0.1:1");
        let inst = Instance {
            addr: ":5000".into(),
            ..Instance::default()
        };
        let res = tokio::time::timeout(Duration::from_secs(5), c.heartbeat_with("s", inst, no_env))
            .await
            .expect("fails without retrying");
        assert!(matches!(res, Err(Error::NoExternalIp { .. })));
    }

    /// A server that answers every watch 200 and ends the stream at once (before
    /// `current`) is not a working stream: the watch backs off instead of reconnecting
    /// ten times a second for ever.
    #[tokio::test]
    async fn a_watch_ended_before_current_backs_off() {
        use std::sync::atomic::Ordering;
        let resp = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        let (url, seen) = stand_in(move |_, _| Some(resp.as_bytes().to_vec())).await;
        let c = Client::new(&url);
        let w = c.watch("s");
        tokio::time::sleep(Duration::from_millis(2000)).await;
        drop(w);
        // 100, 200, 400, 800 ms apart: about 5 in 2 s (a reset every time: about 20).
        let n = seen.load(Ordering::SeqCst);
        assert!((2..=7).contains(&n), "{n} connections in 2 s");
    }

    /// `keep_registered` retries an unreachable or failing discoverd for ever, but not a
    /// registration refused as invalid: that one is given up after its first answer.
    #[tokio::test]
    async fn keep_registered_gives_up_on_a_validation_error() {
        use std::sync::atomic::Ordering;
        let body = r#"{"code":"validation_error","message":"bad name","retry":false}"#;
        let resp = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let (url, seen) = stand_in(move |_, _| Some(resp.clone().into_bytes())).await;
        let c = Client::new(&url);
        let inst = Instance {
            addr: "127.0.0.1:4300".into(),
            ..Instance::default()
        };
        let hb = c.keep_registered("bad-name", inst.clone(), Some("oldest"));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            seen.load(Ordering::SeqCst),
            1,
            "retried a refused registration"
        );
        drop(hb);
        // A name the client itself refuses is given up too, without a request.
        let mut hb = c.keep_registered("Bad_Name", inst, Some("oldest"));
        let task = hb.task.take().expect("a task");
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the heartbeater gave up")
            .unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 1, "sent an invalid name");
        drop(hb);
    }

    /// Only discoverd's `object_not_found` (a missing service or leader) reads as "none": a
    /// plain 404 (a path discoverd does not serve, e.g. a wrong base URL) is an error.
    #[tokio::test]
    async fn only_object_not_found_reads_as_none() {
        for (code, none) in [("object_not_found", true), ("not_found", false)] {
            let body = format!(r#"{{"code":"{code}","message":"x","retry":false}}"#);
            let (url, _) = stand_in(move |_, _| Some(json("404 Not Found", &body))).await;
            let c = Client::new(&url);
            let list = c.instances("web").await;
            let leader = c.leader("web").await;
            if none {
                assert!(list.unwrap().is_empty());
                assert!(leader.unwrap().is_none());
            } else {
                assert!(list.is_err(), "{list:?}");
                assert!(leader.is_err(), "{leader:?}");
            }
        }
    }

    /// An HTTP answer with a JSON body.
    fn json(status: &str, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    /// A 503 with `message`, `retry: true`.
    fn unavailable(message: &str) -> Vec<u8> {
        let body =
            serde_json::json!({"code": "service_unavailable", "message": message, "retry": true});
        json("503 Service Unavailable", &body.to_string())
    }

    /// A request refused because the cluster has no leader (an election under way) is sent
    /// again until a leader answers, a compare-and-swap included (nothing was proposed).
    #[tokio::test]
    async fn a_request_refused_for_want_of_a_leader_is_sent_again() {
        use std::sync::atomic::Ordering;
        let (url, seen) = stand_in(|n, _| {
            Some(match n {
                0 | 1 => unavailable(flynn_api::discoverd::NO_LEADER),
                _ => json("200 OK", r#"{"data":{"a":1},"index":7}"#),
            })
        })
        .await;
        let c = Client::new(&url);
        let meta = ServiceMeta {
            data: serde_json::json!({"a": 1}),
            leader_id: None,
            index: 0,
        };
        let stored = c
            .set_meta("s", &meta)
            .await
            .expect("answered once a leader is there");
        assert_eq!(stored.index, 7);
        assert_eq!(seen.load(Ordering::SeqCst), 3);
    }

    /// Only that refusal: a write whose outcome is unknown (it may still commit) is not sent
    /// again, and the wait for a leader is bounded.
    #[tokio::test]
    async fn only_refusals_for_want_of_a_leader_are_sent_again_for_a_bounded_time() {
        use std::sync::atomic::Ordering;
        let (url, seen) =
            stand_in(|_, _| Some(unavailable("discoverd: write not applied in time"))).await;
        let err = Client::new(&url).get_meta("s").await;
        assert_eq!(err.unwrap_err().api().map(|e| e.status()), Some(503));
        assert_eq!(
            seen.load(Ordering::SeqCst),
            1,
            "an unknown outcome was sent again"
        );

        let (url, seen) = stand_in(|_, _| Some(unavailable(flynn_api::discoverd::NO_LEADER))).await;
        let start = std::time::Instant::now();
        let c = Client::new(&url).with_leader_wait(Duration::from_millis(400));
        let err = c.instances("s").await.unwrap_err();
        assert_eq!(
            err.api().map(|e| e.message.as_str()),
            Some(flynn_api::discoverd::NO_LEADER)
        );
        // Sent at 0, 50, 150 and 350 ms (the last one not when the earlier round trips
        // and sleeps overran by 50 ms); the next pause would end past the 400 ms.
        let sent = seen.load(Ordering::SeqCst);
        assert!((3..=4).contains(&sent), "sent {sent} times");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );

        let (url, seen) = stand_in(|_, _| Some(unavailable(flynn_api::discoverd::NO_LEADER))).await;
        let c = Client::new(&url).with_leader_wait(Duration::ZERO);
        assert!(c.instances("s").await.is_err());
        assert_eq!(seen.load(Ordering::SeqCst), 1);

        // A node cut off for 5 s ("follows no leader"): said at once.
        let (url, seen) =
            stand_in(|_, _| Some(unavailable(flynn_api::discoverd::NOT_FOLLOWING))).await;
        assert!(Client::new(&url).instances("s").await.is_err());
        assert_eq!(
            seen.load(Ordering::SeqCst),
            1,
            "a cut-off node was asked again"
        );
    }

    /// `keep_registered` with a leader type creates the service again when a retried
    /// first registration finds it gone, even after a try that created it and then
    /// failed (it used to stop creating it, and retried a 404 for ever).
    #[tokio::test]
    async fn keep_registered_creates_the_service_again_when_it_is_gone() {
        use std::sync::{Arc, Mutex};
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let (url, _) = stand_in(move |_, line| {
            let mut log = log.lock().unwrap();
            log.push(line.to_string());
            let registers = log.iter().filter(|l| l.contains("/instances/")).count();
            Some(if !line.contains("/instances/") {
                json("200 OK", "{}")
            } else if registers == 1 {
                json(
                    "503 Service Unavailable",
                    r#"{"code":"service_unavailable","message":"no leader","retry":true}"#,
                )
            } else if registers == 2 {
                json(
                    "404 Not Found",
                    r#"{"code":"object_not_found","message":"service not found","retry":false}"#,
                )
            } else {
                json("200 OK", "{}")
            })
        })
        .await;
        let c = Client::new(&url);
        let inst = Instance {
            addr: "127.0.0.1:4301".into(),
            ..Instance::default()
        };
        let hb = c.keep_registered("s", inst, Some("oldest"));
        let done = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let n = seen
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|l| l.contains("/instances/"))
                    .count();
                if n >= 3 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let log = seen.lock().unwrap().clone();
        drop(hb);
        assert!(done.is_ok(), "no third registration: {log:?}");
        let creates: Vec<usize> = (0..log.len())
            .filter(|i| !log[*i].contains("/instances/"))
            .collect();
        // create, register (503), register (404), create, register.
        assert_eq!(creates.len(), 2, "{log:?}");
        assert!(log[creates[1] + 1].contains("/instances/"), "{log:?}");
        assert!(log[creates[0]].starts_with("put /services/s "), "{log:?}");
    }

    #[test]
    fn instance_id_is_md5_of_proto_and_addr() {
        assert_eq!(
            instance_id("tcp", "127.0.0.1:5000"),
            "f89ac025042901d1bbc6a6872a7af35a"
        );
    }
}
