//! The JSON error envelope every HTTP API returns (spec §0.1).

use serde::{Deserialize, Serialize};

/// Stable error codes; each maps to exactly one HTTP status in [`ErrorCode::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    ObjectNotFound,
    ObjectExists,
    Conflict,
    PreconditionFailed,
    SyntaxError,
    ValidationError,
    RequestBodyTooBig,
    Unauthorized,
    Ratelimited,
    ServiceUnavailable,
    UnknownError,
}

impl ErrorCode {
    /// The one table mapping codes to HTTP status codes.
    pub const fn status(self) -> u16 {
        match self {
            ErrorCode::NotFound | ErrorCode::ObjectNotFound => 404,
            ErrorCode::ObjectExists | ErrorCode::Conflict => 409,
            ErrorCode::PreconditionFailed => 412,
            ErrorCode::SyntaxError | ErrorCode::ValidationError | ErrorCode::RequestBodyTooBig => {
                400
            }
            ErrorCode::Unauthorized => 401,
            ErrorCode::Ratelimited => 429,
            ErrorCode::ServiceUnavailable => 503,
            ErrorCode::UnknownError => 500,
        }
    }
}

/// `{"code", "message", "detail"?, "retry"}`: `retry` is always serialised,
/// `detail` only when present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
    #[serde(default)]
    pub retry: bool,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            detail: None,
            retry: false,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn object_not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ObjectNotFound, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }

    /// A validation error; with a field the message becomes `"<field> <message>"` and
    /// `detail` is `{"field": "<field>"}` (spec §0.1).
    pub fn validation(field: Option<&str>, message: &str) -> Self {
        match field {
            Some(f) => ApiError {
                code: ErrorCode::ValidationError,
                message: format!("{f} {message}"),
                detail: Some(serde_json::json!({ "field": f })),
                retry: false,
            },
            None => Self::new(ErrorCode::ValidationError, message),
        }
    }

    /// JSON that does not parse or has the wrong types.
    pub fn syntax() -> Self {
        Self::new(ErrorCode::SyntaxError, "The provided JSON input is invalid")
    }

    /// Anything unclassified: the cause is logged by the caller, never sent.
    pub fn unknown() -> Self {
        Self::new(ErrorCode::UnknownError, "Something went wrong")
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }

    pub fn with_retry(mut self, retry: bool) -> Self {
        self.retry = retry;
        self
    }

    pub fn status(&self) -> u16 {
        self.code.status()
    }
}

impl std::fmt::Display for ApiError {
    /// Clients render errors as `"<code>: <message>"`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let code = serde_json::to_value(self.code).ok();
        let code = code
            .as_ref()
            .and_then(|v| v.as_str())
            .unwrap_or("unknown_error");
        write!(f, "{code}: {}", self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table_matches_spec() {
        let table = [
            ("not_found", 404),
            ("object_not_found", 404),
            ("object_exists", 409),
            ("conflict", 409),
            ("precondition_failed", 412),
            ("syntax_error", 400),
            ("validation_error", 400),
            ("request_body_too_big", 400),
            ("unauthorized", 401),
            ("ratelimited", 429),
            ("service_unavailable", 503),
            ("unknown_error", 500),
        ];
        for (code, status) in table {
            let parsed: ErrorCode = serde_json::from_value(serde_json::json!(code)).unwrap();
            assert_eq!(parsed.status(), status, "{code}");
            assert_eq!(
                serde_json::to_value(parsed).unwrap(),
                serde_json::json!(code)
            );
        }
    }

    #[test]
    fn envelope_shape() {
        let e = ApiError::conflict("Duplicate route");
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"code":"conflict","message":"Duplicate route","retry":false}"#
        );
        assert_eq!(e.to_string(), "conflict: Duplicate route");
        let v = ApiError::validation(Some("type"), "Invalid route type");
        assert_eq!(v.message, "type Invalid route type");
        assert_eq!(v.detail, Some(serde_json::json!({"field": "type"})));
    }
}
