//! Extractors whose rejections are the JSON error envelope (spec §0.1) rather than
//! axum's plain-text bodies. Every handler takes its path parameters and its body
//! through these: a path segment that does not decode to UTF-8 is a 400
//! `validation_error`, a body over the route's limit (`WRITE_BODY_LIMIT` for API writes, axum's default
//! 2 MB elsewhere, raised for the Raft RPCs) is a 400 `request_body_too_big`, and JSON is decoded by [`decode`].

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use flynn_api::{ApiError, ErrorCode};
use serde::de::DeserializeOwned;

use super::ApiErr;

/// [`axum::extract::Path`] with an [`ApiErr`] rejection.
pub struct ApiPath<T>(pub T);

/// The raw body ([`Bytes`]) with an [`ApiErr`] rejection; the route's body limit holds.
pub struct ApiBody(pub Bytes);

/// A JSON body decoded by [`decode`] (`application/json` required).
pub struct ApiJson<T>(pub T);

impl From<PathRejection> for ApiErr {
    fn from(r: PathRejection) -> Self {
        if r.status().is_client_error() {
            ApiErr(ApiError::validation(
                None,
                &format!("discoverd: {}", r.body_text()),
            ))
        } else {
            // A route and its extractor disagree: a bug here, not in the request.
            tracing::error!(error = %r.body_text(), "path extraction failed");
            ApiErr(ApiError::unknown())
        }
    }
}

impl From<BytesRejection> for ApiErr {
    fn from(r: BytesRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_big()
        } else {
            // The body could not be read (the client went away): unclassified, as a
            // failed read while decoding is in Flynn.
            tracing::debug!(error = %r.body_text(), "reading request body failed");
            ApiErr(ApiError::unknown())
        }
    }
}

/// `request_body_too_big` (400).
pub fn too_big() -> ApiErr {
    ApiErr(ApiError::new(
        ErrorCode::RequestBodyTooBig,
        "discoverd: request body too big",
    ))
}

/// The length of `v` as JSON, counted without building it.
pub fn json_len(v: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    match serde_json::to_writer(&mut n, v) {
        Ok(()) => n.0,
        Err(_) => usize::MAX,
    }
}

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiErr;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiErr> {
        let axum::extract::Path(v) = axum::extract::Path::from_request_parts(parts, state).await?;
        Ok(ApiPath(v))
    }
}

impl<S: Send + Sync> FromRequest<S> for ApiBody {
    type Rejection = ApiErr;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiErr> {
        Ok(ApiBody(Bytes::from_request(req, state).await?))
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiErr;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiErr> {
        require_json(req.headers())?;
        let ApiBody(body) = ApiBody::from_request(req, state).await?;
        parse(&body).map(ApiJson)
    }
}

/// Decodes a JSON body; `check_type` requires an `application/json` content type.
pub fn decode<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
    check_type: bool,
) -> Result<T, ApiErr> {
    if check_type {
        require_json(headers)?;
    }
    parse(body)
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiErr> {
    let ok = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"));
    if ok {
        Ok(())
    } else {
        Err(ApiErr(ApiError::validation(
            None,
            "Content-Type must be application/json",
        )))
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiErr> {
    // Go decodes `null` into a struct as a no-op, leaving every field at its zero value: the
    // same as `{}`.
    let body = match body.trim_ascii() {
        b"null" => b"{}",
        _ => body,
    };
    serde_json::from_slice(body).map_err(|e| {
        if e.is_eof() {
            // Go reports a truncated body as an unclassified error (spec §0.1).
            ApiErr(ApiError::unknown())
        } else {
            ApiErr(ApiError::syntax())
        }
    })
}
