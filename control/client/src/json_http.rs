//! What the typed clients share: a base URL, one `reqwest` client, and requests whose
//! non-2xx answers are decoded into the JSON error envelope when they carry one.

use std::time::Duration;

use flynn_api::ApiError;
use serde::de::DeserializeOwned;

/// Why a request failed; each client maps it into its own `Error`.
pub(crate) enum Failure {
    Api(ApiError),
    Http(reqwest::Error),
    Status(u16),
    /// The body grew past the limit (bytes) before it ended.
    TooLarge(usize),
    /// The body is not the JSON expected.
    Decode(serde_json::Error),
}

/// Largest response body read into memory by default, for answers that are one object:
/// discoverd's metadata, leader and instances (its writes are limited to 512 KiB), the log
/// aggregator's cursors. Lists that grow with the cluster have their own limits
/// (discoverd's instance lists `discoverd::MAX_STATE`, a host's jobs 64 MiB). A longer
/// answer (a wrong base URL, a misbehaving server) fails once it gets there, not when
/// memory runs out.
pub(crate) const MAX_BODY: usize = 8 << 20;

/// Largest error body decoded as the JSON envelope; a longer one is just its status.
const MAX_ERROR_BODY: usize = 64 << 10;

/// How long a pooled connection may sit idle before the client closes it.
pub(crate) const IDLE_CLOSE: Duration = Duration::from_secs(20);

#[derive(Clone)]
pub(crate) struct JsonHttp {
    base: String,
    http: reqwest::Client,
}

impl JsonHttp {
    /// `url` like `http://127.0.0.1:1111` (a trailing `/` is ignored).
    pub(crate) fn new(url: &str) -> JsonHttp {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            // Under discoverd's 30 s idle close (its header read timeout; the other
            // services keep idle connections): the client lets an idle connection go
            // first, so a request never races the server's close of it.
            .pool_idle_timeout(IDLE_CLOSE)
            // These services are the cluster's own, reached directly at loopback and
            // cluster addresses: a proxy set (`HTTP_PROXY`) for a job's outbound traffic is
            // not for them, and could not reach a loopback one (Go's clients, Flynn's
            // among them, never proxy loopback addresses).
            .no_proxy()
            .build()
            .unwrap_or_default();
        JsonHttp {
            base: url.trim_end_matches('/').to_string(),
            http,
        }
    }

    /// A request to `path` with no timeout of its own (streams).
    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base))
    }

    /// Sends `body` as JSON (if any) with a 30 s timeout; a non-2xx answer is an error.
    pub(crate) async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::Response, Failure> {
        let mut req = self.request(method, path).timeout(Duration::from_secs(30));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.map_err(Failure::Http)?;
        check(resp).await
    }
}

/// `resp` if it is a success, else its JSON error envelope (or just its status).
pub(crate) async fn check(resp: reqwest::Response) -> Result<reqwest::Response, Failure> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status().as_u16();
    let bytes = match body(resp, MAX_ERROR_BODY).await {
        Ok(b) => b,
        Err(Failure::TooLarge(_)) => return Err(Failure::Status(status)),
        Err(e) => return Err(e),
    };
    match serde_json::from_slice::<ApiError>(&bytes) {
        Ok(e) => Err(Failure::Api(e)),
        Err(_) => Err(Failure::Status(status)),
    }
}

/// The body of `resp`, read chunk by chunk up to `limit` bytes; a longer one fails as soon
/// as it is known to be (its `content-length` or the chunk that passes the limit).
async fn body(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, Failure> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(Failure::TooLarge(limit));
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(Failure::Http)? {
        if out.len() + chunk.len() > limit {
            return Err(Failure::TooLarge(limit));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The body of a successful answer as `T`, at most `limit` bytes long ([`MAX_BODY`] unless
/// a client knows its answers run longer).
pub(crate) async fn json<T: DeserializeOwned>(
    resp: reqwest::Response,
    limit: usize,
) -> Result<T, Failure> {
    let bytes = body(resp, limit).await?;
    serde_json::from_slice(&bytes).map_err(Failure::Decode)
}

/// Implements `From<Failure>` for a client's `Error` with `Api`, `Http`, `Status`,
/// `TooLarge` and `Decode`.
macro_rules! from_failure {
    ($err:ty) => {
        impl From<$crate::json_http::Failure> for $err {
            fn from(f: $crate::json_http::Failure) -> Self {
                match f {
                    $crate::json_http::Failure::Api(e) => Self::Api(e),
                    $crate::json_http::Failure::Http(e) => Self::Http(e),
                    $crate::json_http::Failure::Status(status) => Self::Status { status },
                    $crate::json_http::Failure::TooLarge(limit) => Self::TooLarge { limit },
                    $crate::json_http::Failure::Decode(e) => Self::Decode(e),
                }
            }
        }
    };
}
pub(crate) use from_failure;
