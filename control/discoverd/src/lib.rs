//! discoverd: the cluster's service registry (spec §2).
pub mod network;
pub mod store;
