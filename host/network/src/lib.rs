//! `flynn-network`: the host overlay network, flannel's kernel VXLAN path re-done in Rust.
//!
//! Every host leases a block (default a /24) of the cluster network (default `100.100.0.0/16`)
//! from a [`LeaseStore`] with compare-and-swap ([`Leaser`]), brings up a VXLAN device and a bridge
//! for its jobs ([`setup`]) and keeps, per remote lease, a permanent neighbour entry, FDB entry and
//! route on the VXLAN device ([`reconcile`]). The VXLAN MAC is derived from the lease
//! ([`Mac::for_subnet`]) so it survives restarts.
//!
//! Left to others: the discoverd-backed `LeaseStore` (via `flynn-client`), per-job namespaces and
//! the address allocator (`flynn-host`), and the eBPF fast path (`flynn-ebpf`). Used by
//! `flynn-host`.
//!
//! Kernel access is behind the [`Netlink`] trait: [`KernelNetlink`] uses `rtnetlink`,
//! [`FakeNetlink`] records calls for tests.

mod agent;
mod direct;
mod discoverd;
mod fake;
pub mod job;
mod kernel;
mod lease;
mod reconcile;
mod store;
mod subnet;

pub use agent::{error_chain, Agent, AgentConfig, AgentError, Started};
pub use direct::{direct_routes, Segment, DIRECT_PROTO};
pub use discoverd::{
    config_json, layout_from_config, DiscoverdStore, SERVICE as DISCOVERD_SERVICE,
};
pub use fake::{FakeNetlink, FAKE_BRIDGE_INDEX, FAKE_VXLAN_INDEX};
pub use kernel::KernelNetlink;
pub use lease::{Config as LeaseConfig, Lease, LeaseError, Leaser};
pub use reconcile::{
    desired, plan, reconcile, setup, BridgeSpec, DeviceConfig, Devices, Fdb, KernelState, Neigh,
    Netlink, NetlinkError, Op, Route, Underlay, VxlanSpec, VXLAN_OVERHEAD,
};
#[doc(hidden)]
pub use store::conformance;
pub use store::{LeaseStore, LeaseWatch, MemoryStore, Snapshot, StoreError};
pub use subnet::{Layout, Mac, ParseError, Subnet, DEFAULT_NETWORK};
