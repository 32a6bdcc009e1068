//! [`ApiError`] as an HTTP response, and the state machine's rejections as API errors.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use flynn_api::{ApiError, ErrorCode};

use crate::store::types::Rejection;

/// An [`ApiError`] as a response: status from the code table, JSON envelope.
pub struct ApiErr(pub ApiError);

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

impl From<Rejection> for ApiErr {
    fn from(r: Rejection) -> Self {
        ApiErr(match r {
            Rejection::ServiceExists(s) => ApiError::new(
                ErrorCode::ObjectExists,
                format!("discoverd: service {s:?} already exists"),
            ),
            Rejection::ServiceNotFound(s) | Rejection::InstanceNotFound(s) => {
                ApiError::object_not_found(format!("discoverd: service {s:?} not found"))
            }
            Rejection::MetaExists => ApiError::new(
                ErrorCode::ObjectExists,
                "discoverd: service meta already exists",
            ),
            Rejection::MetaIndex => ApiError::new(
                ErrorCode::PreconditionFailed,
                "discoverd: service meta index does not match",
            ),
        })
    }
}
