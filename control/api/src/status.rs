//! The health endpoint body (spec §0.2).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub data: StatusBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusBody {
    /// `healthy` or `unhealthy`.
    pub status: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

impl Status {
    pub fn healthy(version: &str, detail: Option<serde_json::Value>) -> Self {
        Status {
            data: StatusBody {
                status: "healthy".into(),
                version: version.into(),
                detail,
            },
        }
    }
}
