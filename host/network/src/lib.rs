//! `flynn-network`: the host overlay network, flannel's kernel VXLAN path re-done in Rust, plus
//! per-job networking.
//!
//! - Leases: every host leases a block (default a /24) of the cluster network (default
//!   `100.100.0.0/16`) from a [`LeaseStore`] with compare-and-swap ([`Leaser`]).
//!   [`DiscoverdStore`] keeps leases in discoverd's `flannel` service metadata (spec §6);
//!   [`MemoryStore`] is for tests and single hosts.
//! - Kernel: [`setup`] brings up a VXLAN device and a bridge for the host's jobs; [`reconcile`]
//!   keeps, per remote lease, a permanent neighbour entry, FDB entry and route on the VXLAN
//!   device. The VXLAN MAC is derived from the lease ([`Mac::for_subnet`]) so it survives
//!   restarts. Kernel access is behind the [`Netlink`] trait: [`KernelNetlink`] uses `rtnetlink`,
//!   [`FakeNetlink`] records calls for tests.
//! - [`Agent`]: the per-host loop (the `flynn-network` binary): lease, set up, reconcile on every
//!   store event and on a timer, renew, release on shutdown; optional DirectRouting and the eBPF
//!   fast path's prefix map (`flynn-ebpf`).
//! - [`job`]: per-job network namespaces with a veth into the bridge, and the persisted
//!   [`job::IpAllocator`]. Used by `flynn-host`.
//!
//! Left to others: the eBPF programs and maps (`flynn-ebpf`); attaching job veths to the fast path
//! and filling its endpoint map (`flynn-host`, which knows when jobs start and stop).

mod agent;
mod direct;
mod discoverd;
mod fake;
mod fastmaps;
pub mod job;
mod kernel;
mod lease;
pub mod masq;
pub mod notify;
mod reconcile;
mod stats;
mod store;
mod subnet;

pub use agent::{
    error_chain, fast_path_off, Agent, AgentConfig, AgentError, Started, ABANDON_TIMEOUT,
};
pub use direct::{direct_routes, Segment, DIRECT_PROTO};
/// Leases from a `flannel` metadata document as discoverd stores it (for the fuzz target).
#[doc(hidden)]
pub use discoverd::snapshot as leases_from_document;
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
pub use stats::Stats;
#[doc(hidden)]
pub use store::conformance;
pub use store::{LeaseStore, LeaseWatch, MemoryStore, Snapshot, StoreError};
pub use subnet::{Layout, Mac, ParseError, Subnet, DEFAULT_NETWORK};
