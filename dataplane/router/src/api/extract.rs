//! The API's extractors and error answer: every rejection (a bad path segment or query, a
//! body over [`BODY_LIMIT`]) and every [`ApiError`] is the JSON envelope (spec §0.1).

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use flynn_api::ApiError;

/// An [`ApiError`] as an HTTP response: status from the code table, JSON envelope.
pub struct ApiErr(pub ApiError);

impl From<ApiError> for ApiErr {
    fn from(e: ApiError) -> Self {
        ApiErr(e)
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

pub(super) type Res<T> = Result<T, ApiErr>;

/// The most a request body may be (a routes list or a certificate is far less).
pub const BODY_LIMIT: usize = 2 << 20;

/// [`Path`] whose rejection is the JSON envelope (spec §0.1) rather than axum's plain
/// text: a segment that does not decode to UTF-8 is a 400 `validation_error`.
pub(super) struct ApiPath<T>(pub(super) T);

/// [`Query`] whose rejection is the JSON envelope: a 400 `validation_error`.
pub(super) struct ApiQuery<T>(pub(super) T);

/// The raw body, at most [`BODY_LIMIT`]; over it, a 400 `request_body_too_big`.
pub(super) struct ApiBody(pub(super) Bytes);

impl From<PathRejection> for ApiErr {
    fn from(r: PathRejection) -> Self {
        if r.status().is_client_error() {
            ApiErr(ApiError::validation(None, &r.body_text()))
        } else {
            // A route and its extractor disagree: a bug here, not in the request.
            tracing::error!(error = %r.body_text(), "path extraction failed");
            ApiErr(ApiError::unknown())
        }
    }
}

impl From<QueryRejection> for ApiErr {
    fn from(r: QueryRejection) -> Self {
        ApiErr(ApiError::validation(None, &r.body_text()))
    }
}

impl From<BytesRejection> for ApiErr {
    fn from(r: BytesRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiErr(ApiError::new(
                flynn_api::ErrorCode::RequestBodyTooBig,
                format!("request body over {BODY_LIMIT} bytes"),
            ))
        } else {
            // The body could not be read (the client went away): unclassified.
            tracing::debug!(error = %r.body_text(), "reading a request body failed");
            ApiErr(ApiError::unknown())
        }
    }
}

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiErr;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiErr> {
        let Path(v) = Path::from_request_parts(parts, state).await?;
        Ok(ApiPath(v))
    }
}

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiErr;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiErr> {
        let Query(v) = Query::from_request_parts(parts, state).await?;
        Ok(ApiQuery(v))
    }
}

impl<S: Send + Sync> FromRequest<S> for ApiBody {
    type Rejection = ApiErr;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiErr> {
        Ok(ApiBody(Bytes::from_request(req, state).await?))
    }
}
