//! Storage: the registry state machine, its openraft wrapper, and the file-backed log.

pub mod json_bytes;
pub mod log;
pub mod sm;
pub mod state;

pub mod types;

pub use log::LogStore;
pub use sm::{Shared, StateMachine};
pub use state::Registry;
pub use types::{Command, Response};

openraft::declare_raft_types!(
    /// Raft types for discoverd: node ids are derived from advertised addresses.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
);

/// The Raft handle.
pub type Raft = openraft::Raft<TypeConfig, StateMachine>;
