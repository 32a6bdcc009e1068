//! `flynn-ebpf`: the overlay's eBPF fast path.
//!
//! Two tc classifiers written in C (`bpf/fastpath.bpf.c`), compiled by `build.rs` with clang and
//! embedded in the binary, loaded with `aya`:
//! - on every job's host-side veth (ingress, [`Role::JobVeth`]): a packet for a job on this host
//!   ([`FastPath::upsert_endpoint`]) gets its Ethernet header rewritten and is handed straight to
//!   the job's namespace with `bpf_redirect_peer`; a packet for a remote block
//!   ([`FastPath::upsert_prefix`]) goes to the VXLAN device with `bpf_redirect_neigh`;
//! - on the VXLAN device (ingress, [`Role::Vxlan`]): decapsulated packets for local jobs are
//!   delivered with `bpf_redirect_peer`.
//!
//! Anything the maps do not know falls through to the kernel path (`TC_ACT_OK`), so empty maps are
//! safe and the kernel VXLAN path of `flynn-network` stays the source of truth. Maps and
//! attachments (TCX links on kernels ≥ 6.6, cls_bpf netlink filters before, see [`AttachMode`])
//! are pinned or recorded under a pin directory (default [`DEFAULT_PIN_DIR`]) so traffic keeps
//! flowing while the agent restarts; a restarted loader reuses the pinned maps and swaps its
//! programs into the existing attachments atomically.
//!
//! All calls resolve interface indexes in the calling thread's network namespace.
//!
//! Left to others: deciding what goes in the maps (the agent in `flynn-network`/`flynn-host`
//! mirrors its leases and jobs into them) and serving metrics. The `--fast-path auto|off` flag
//! parses into [`Switch`]; `auto` means [`FastPath::supported`]. [`Counters::prometheus`]
//! renders the counters for a `/metrics` page.

mod attach;
mod bpffs;
mod error;
mod fastpath;
mod maps;
mod object;
mod switch;

pub use attach::AttachMode;
pub use error::EbpfError;
pub use fastpath::{FastPath, Role, DEFAULT_PIN_DIR};
pub use maps::{Counters, Endpoint, Hop};
pub use switch::Switch;
