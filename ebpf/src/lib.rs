//! `flynn-ebpf`: the overlay's eBPF fast path.
//!
//! Three tc classifiers written in C (`bpf/fastpath.bpf.c`), compiled by `build.rs` with clang and
//! embedded in the binary, loaded with `aya`:
//! - on every job's host-side veth (ingress, [`Role::JobVeth`]): a packet for a job on this host
//!   ([`FastPath::upsert_endpoint`]) gets its Ethernet header rewritten and is handed straight to
//!   the job's namespace with `bpf_redirect_peer`; a packet for a remote block
//!   ([`FastPath::upsert_prefix`]) is encapsulated in BPF and sent out of the underlay device
//!   when the block's peer is known ([`FastPath::upsert_tunnel`], [`FastPath::set_underlay`]),
//!   otherwise handed to the VXLAN device, both with `bpf_redirect_neigh`;
//! - on the VXLAN device (ingress, [`Role::Vxlan`]): decapsulated packets for local jobs are
//!   delivered with `bpf_redirect_peer`;
//! - on the host's underlay device (ingress, [`Role::Underlay`]): VXLAN packets for local jobs
//!   ([`FastPath::set_underlay`] says which: address, port, VNI, VTEP MAC) are decapsulated in
//!   BPF and delivered with `bpf_redirect_peer`, skipping the kernel's UDP and VXLAN receive.
//!   TCP GSO packets (TSO bursts, GRO packets) too when their checksum state allows (see
//!   `docs/ARCHITECTURE.md`); other GSO packets and anything unexpected are left to the kernel.
//!
//! Anything the maps do not know falls through to the kernel path (`TC_ACT_UNSPEC`, so tc
//! programs and filters attached after ours still run), so empty maps are
//! safe and the kernel VXLAN path of `flynn-network` stays the source of truth. Maps and
//! attachments (TCX links on kernels ≥ 6.6, cls_bpf netlink filters before, see [`AttachMode`])
//! are pinned or recorded under a pin directory (default [`DEFAULT_PIN_DIR`]) so traffic keeps
//! flowing while the agent restarts; a restarted loader reuses the pinned maps and swaps its
//! programs into the existing attachments atomically.
//!
//! An agent started with the fast path off undoes its predecessor's work without loading anything:
//! [`detach_roles`] takes the device programs off and [`clear_routes`] empties the prefix and
//! tunnel maps and the underlay settings. A host daemon that does not load the fast path still
//! removes the entries and attachments an earlier run of it made for a job when the job goes:
//! [`remove_pinned_endpoint`] and [`detach_pinned`].
//!
//! All calls resolve interface indexes in the calling thread's network namespace.
//!
//! Left to others: deciding what goes in the maps (the agent in `flynn-network`/`flynn-host`
//! mirrors its leases and jobs into them) and serving metrics. The `--fast-path auto|off` flag
//! parses into [`Switch`]; `auto` means [`FastPath::supported`]. [`Counters::prometheus`]
//! renders the counters for a `/metrics` page.

//! # Example
//!
//! What the agent does, in the host's network namespace:
//!
//! ```no_run
//! use std::net::Ipv4Addr;
//! use std::path::Path;
//! use flynn_ebpf::{Endpoint, FastPath, Hop, Role, Switch, Tunnel, Underlay, DEFAULT_PIN_DIR};
//!
//! # fn main() -> Result<(), flynn_ebpf::EbpfError> {
//! let switch: Switch = "auto".parse().expect("auto or off");
//! if switch.enabled() {
//!     let mut fp = FastPath::load(Path::new(DEFAULT_PIN_DIR))?; // reuses pins after a restart
//!     let (vxlan, job_veth) = (4, 7); // interface indexes
//!     fp.attach(vxlan, Role::Vxlan)?;
//!     // VXLAN packets for local jobs are decapsulated on the underlay device (eth0 here).
//!     let eth0 = 2;
//!     fp.set_underlay(Underlay {
//!         local_ip: Ipv4Addr::new(10, 0, 0, 1),
//!         vni: 1,
//!         port: 8472,
//!         vtep_mac: [0x0e, 0x66, 100, 100, 1, 0],
//!         ifindex: eth0, // and encapsulated in BPF towards known peers, leaving by eth0
//!     })?;
//!     fp.attach(eth0, Role::Underlay)?;
//!     // A job started: its veth and its entry.
//!     fp.attach(job_veth, Role::JobVeth)?;
//!     let job = Endpoint { ifindex: job_veth, mac: [2, 0, 0, 0, 0, 10], gateway_mac: [2, 0, 0, 0, 0, 1] };
//!     fp.upsert_endpoint(Ipv4Addr::new(100, 100, 1, 10), job)?;
//!     // A peer's lease: its block goes to the VXLAN device, next hop its network address.
//!     let block = Ipv4Addr::new(100, 100, 2, 0);
//!     fp.upsert_prefix(block, 24, Hop { ifindex: vxlan, next_hop: block })?;
//!     // Its underlay address and VTEP MAC: encapsulation in BPF instead of the VXLAN device.
//!     let peer = Tunnel { remote_ip: Ipv4Addr::new(10, 0, 0, 2), vtep_mac: [0x0e, 0x66, 100, 100, 2, 0] };
//!     fp.upsert_tunnel(block, peer)?;
//!     // The job stopped: entry first, then the veth.
//!     fp.remove_endpoint(Ipv4Addr::new(100, 100, 1, 10))?;
//!     fp.detach(job_veth)?;
//!     println!("{}", fp.counters()?.prometheus());
//! }
//! # Ok(())
//! # }
//! ```

mod attach;
mod bpffs;
mod error;
mod fastpath;
mod maps;
mod object;
mod switch;

pub use attach::AttachMode;
pub use error::EbpfError;
pub use fastpath::{
    clear_routes, detach_pinned, detach_roles, remove_pinned_endpoint, FastPath, Role,
    DEFAULT_PIN_DIR,
};
pub use maps::{Counters, Endpoint, Hop, Tunnel, Underlay};
pub use switch::Switch;
