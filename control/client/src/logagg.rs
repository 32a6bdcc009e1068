//! The log aggregator's HTTP API client (spec §3.4), as far as hosts need it.

use flynn_api::ApiError;

use crate::json_http::JsonHttp;

pub use flynn_api::logagg::{Cursor, Cursors};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Api(ApiError),
    #[error("log aggregator request failed")]
    Http(#[source] reqwest::Error),
    #[error("log aggregator answered {status}")]
    Status { status: u16 },
    /// An answer longer than the client reads (`limit` bytes).
    #[error("log aggregator answer longer than {limit} bytes")]
    TooLarge { limit: usize },
    /// The detail is in the message (callers log errors with `%e`), not also a `source`.
    #[error("log aggregator answer is not the JSON expected: {0}")]
    Decode(serde_json::Error),
}

crate::json_http::from_failure!(Error);

/// A client for one aggregator's API, e.g. `http://127.0.0.1:5141`.
#[derive(Clone)]
pub struct Client {
    http: JsonHttp,
}

impl Client {
    pub fn new(url: &str) -> Client {
        Client {
            http: JsonHttp::new(url),
        }
    }

    /// `GET /cursors`: every host's latest stored (time, seq).
    pub async fn cursors(&self) -> Result<Cursors, Error> {
        let resp = self
            .http
            .send(reqwest::Method::GET, "/cursors", None)
            .await?;
        Ok(crate::json_http::json(resp, crate::json_http::MAX_BODY).await?)
    }
}
