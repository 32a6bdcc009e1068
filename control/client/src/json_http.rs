//! What the typed clients share: a base URL, one `reqwest` client, and requests whose
//! non-2xx answers are decoded into the JSON error envelope when they carry one.

use std::time::Duration;

use flynn_api::ApiError;

/// Why a request failed; each client maps it into its own `Error`.
pub(crate) enum Failure {
    Api(ApiError),
    Http(reqwest::Error),
    Status(u16),
}

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
    let bytes = resp.bytes().await.map_err(Failure::Http)?;
    match serde_json::from_slice::<ApiError>(&bytes) {
        Ok(e) => Err(Failure::Api(e)),
        Err(_) => Err(Failure::Status(status)),
    }
}

/// Implements `From<Failure>` for a client's `Error` with `Api`, `Http` and `Status`.
macro_rules! from_failure {
    ($err:ty) => {
        impl From<$crate::json_http::Failure> for $err {
            fn from(f: $crate::json_http::Failure) -> Self {
                match f {
                    $crate::json_http::Failure::Api(e) => Self::Api(e),
                    $crate::json_http::Failure::Http(e) => Self::Http(e),
                    $crate::json_http::Failure::Status(status) => Self::Status { status },
                }
            }
        }
    };
}
pub(crate) use from_failure;
