//! discoverd's wire types (spec §2.2): services, instances, metadata and events, shared by
//! the discoverd server and its clients.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How a service's leader is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaderType {
    #[default]
    Oldest,
    Manual,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceConfig {
    #[serde(default)]
    pub leader_type: LeaderType,
}

/// A registered instance. `index` is the Raft index of its first registration and
/// doubles as the fencing token of a leader.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub addr: String,
    #[serde(default)]
    pub proto: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub index: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Instance {
    /// Same addr, proto and meta: a re-registration that only refreshes the heartbeat.
    pub fn same_as(&self, other: &Instance) -> bool {
        self.addr == other.addr && self.proto == other.proto && self.meta == other.meta
    }
}

/// Per-service metadata with its compare-and-swap index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceMeta {
    #[serde(default)]
    pub data: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_id: Option<String>,
    #[serde(default)]
    pub index: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Up,
    Update,
    Down,
    Leader,
    Current,
    ServiceMeta,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub service: String,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<Instance>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_meta: Option<ServiceMeta>,
}
