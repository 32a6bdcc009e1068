//! discoverd's wire types (spec §2.2): services, instances, metadata and events, shared by
//! the discoverd server and its clients.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// The message of the 503 (`retry: true`) a node answers while it knows no Raft leader: the
/// request was refused before anything was proposed, so sending it again is safe for every
/// request, a compare-and-swap included.
pub const NO_LEADER: &str = "discoverd: no known leader";

/// The message of the 503 (`retry: true`) a node answers to a read while it follows no
/// leader (its state is not current); nothing was changed.
pub const NOT_FOLLOWING: &str = "discoverd: this node follows no leader; its state is not current";

/// A service name as discoverd takes it: lowercase ASCII letters, digits and `-`, not empty
/// (the server's check, the typed client's and flynn-host's for a job's service ports).
pub fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// How a service's leader is chosen (`""` is the default, `oldest`, as in Flynn).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaderType {
    #[default]
    #[serde(alias = "")]
    Oldest,
    Manual,
}

/// `null` read as the field's default, as Go's `encoding/json` leaves a field as it is for
/// `null` (Flynn's clients send `"meta": null`).
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceConfig {
    #[serde(default, deserialize_with = "null_as_default")]
    pub leader_type: LeaderType,
}

/// A registered instance. `index` is the Raft index of its first registration and
/// doubles as the fencing token of a leader.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    #[serde(default, deserialize_with = "null_as_default")]
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub addr: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub proto: String,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub meta: BTreeMap<String, String>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "is_zero"
    )]
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
    #[serde(default, deserialize_with = "null_as_default")]
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What Go clients send is read as Flynn reads it: an empty leader type is `oldest`, and
    /// `null` fields are their defaults (they used to be 400 `syntax_error`s); a leader type
    /// that is neither is still refused.
    #[test]
    fn empty_and_null_fields_read_as_their_defaults() {
        for body in [r#"{"leader_type":""}"#, r#"{"leader_type":null}"#, "{}"] {
            let c: ServiceConfig = serde_json::from_str(body).unwrap();
            assert_eq!(c.leader_type, LeaderType::Oldest, "{body}");
        }
        let c: ServiceConfig = serde_json::from_str(r#"{"leader_type":"manual"}"#).unwrap();
        assert_eq!(c.leader_type, LeaderType::Manual);
        assert!(serde_json::from_str::<ServiceConfig>(r#"{"leader_type":"newest"}"#).is_err());
        let i: Instance = serde_json::from_str(
            r#"{"id":null,"addr":"10.0.0.1:80","proto":"tcp","meta":null,"index":null}"#,
        )
        .unwrap();
        assert_eq!((i.id.as_str(), i.index), ("", 0));
        assert!(i.meta.is_empty());
        let m: ServiceMeta = serde_json::from_str(r#"{"data":{"a":1},"index":null}"#).unwrap();
        assert_eq!(m.index, 0);
        assert!(serde_json::from_str::<Instance>(r#"{"meta":{"a":1}}"#).is_err());
    }
}
