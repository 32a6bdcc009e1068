//! The registry's data model (spec §2.2) as it goes over the wire and into the Raft log.

use serde::{Deserialize, Serialize};

pub use flynn_api::discoverd::{
    Event, EventKind, Instance, LeaderType, ServiceConfig, ServiceMeta,
};

const fn bit(k: EventKind) -> u8 {
    match k {
        EventKind::Up => 1,
        EventKind::Update => 2,
        EventKind::Down => 4,
        EventKind::Leader => 8,
        EventKind::Current => 16,
        EventKind::ServiceMeta => 32,
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
        self.0 & bit(k) != 0
    }
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
