//! Log aggregator wire types (spec §3.4).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A host's latest position in an aggregator: the greatest (time, seq) of the lines it
/// stored from that host (`GET /cursors`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// RFC 3339.
    pub time: String,
    pub seq: u64,
}

/// `GET /cursors`: host id → cursor.
pub type Cursors = BTreeMap<String, Cursor>;
