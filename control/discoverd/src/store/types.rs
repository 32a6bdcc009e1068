//! The registry's data model (spec §2.2) as it goes over the wire and into the Raft log.

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

impl EventKind {
    const fn bit(self) -> u8 {
        match self {
            EventKind::Up => 1,
            EventKind::Update => 2,
            EventKind::Down => 4,
            EventKind::Leader => 8,
            EventKind::Current => 16,
            EventKind::ServiceMeta => 32,
        }
    }
}

/// A set of event kinds a subscription wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kinds(u8);

impl Kinds {
    pub const ALL: Kinds = Kinds(63);
    pub const INSTANCES: Kinds = Kinds(1 | 2 | 4);
    pub const LEADER: Kinds = Kinds(8);

    pub fn has(self, k: EventKind) -> bool {
        self.0 & k.bit() != 0
    }
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

/// One replicated state-machine command (spec §2.7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    AddService {
        service: String,
        config: ServiceConfig,
    },
    RemoveService {
        service: String,
    },
    SetMeta {
        service: String,
        meta: ServiceMeta,
    },
    SetLeader {
        service: String,
        id: String,
    },
    AddInstance {
        service: String,
        instance: Instance,
    },
    RemoveInstance {
        service: String,
        id: String,
    },
    /// Removes instances whose heartbeats stopped; each names the index it was seen with
    /// so a concurrent re-registration is not removed.
    ExpireInstances {
        instances: Vec<(String, String, u64)>,
    },
}

/// Deterministic outcomes of applying a command that the API maps to errors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    #[error("service {0:?} already exists")]
    ServiceExists(String),
    #[error("service {0:?} not found")]
    ServiceNotFound(String),
    #[error("service meta already exists")]
    MetaExists,
    #[error("service meta index mismatch")]
    MetaIndex,
    #[error("instance not found")]
    InstanceNotFound(String),
}

/// The state machine's answer to a command: the index the write took (for meta, the new
/// meta index; for instances, the registration index) or a rejection.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Response {
    #[serde(default)]
    pub index: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<Rejection>,
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::AddService { service, .. } => write!(f, "add_service({service})"),
            Command::RemoveService { service } => write!(f, "remove_service({service})"),
            Command::SetMeta { service, meta } => {
                write!(f, "set_meta({service}, index={})", meta.index)
            }
            Command::SetLeader { service, id } => write!(f, "set_leader({service}, {id})"),
            Command::AddInstance { service, instance } => {
                write!(f, "add_instance({service}, {})", instance.id)
            }
            Command::RemoveInstance { service, id } => {
                write!(f, "remove_instance({service}, {id})")
            }
            Command::ExpireInstances { instances } => {
                write!(f, "expire_instances({})", instances.len())
            }
        }
    }
}

impl std::fmt::Display for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.rejected {
            None => write!(f, "ok({})", self.index),
            Some(r) => write!(f, "rejected({r})"),
        }
    }
}
