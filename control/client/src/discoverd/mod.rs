//! The discoverd client (spec §2.3–§2.6).
//!
//! The requests are here; keeping an instance registered is in `heartbeat`, watching a
//! service in `watch` (one connection's stream in `stream`, a replay turned into the
//! events missed in `replay`).

use std::collections::BTreeMap;
use std::time::Duration;

use flynn_api::{ApiError, ErrorCode};
use serde::Serialize;

use crate::json_http::{Failure, JsonHttp, MAX_BODY};

mod heartbeat;
mod replay;
mod stream;
#[cfg(test)]
mod tests;
mod watch;

pub use heartbeat::{Heartbeater, KEEP_RETRY_MAX};
pub use watch::Watch;

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
}
