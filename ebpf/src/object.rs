//! The compiled BPF object, embedded at build time.

/// `bpf/fastpath.bpf.c` compiled by `build.rs` (`clang -O2 -g -target bpf`).
pub(crate) static FASTPATH: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fastpath.bpf.o"));

pub(crate) const PROG_FROM_JOB: &str = "flynn_from_job";
pub(crate) const PROG_FROM_VXLAN: &str = "flynn_from_vxlan";
pub(crate) const PROG_FROM_UNDERLAY: &str = "flynn_from_underlay";
pub(crate) const MAP_ENDPOINTS: &str = "flynn_endpoints";
pub(crate) const MAP_PREFIXES: &str = "flynn_prefixes";
pub(crate) const MAP_COUNTERS: &str = "flynn_counters";
pub(crate) const MAP_UNDERLAY: &str = "flynn_underlay";
pub(crate) const MAP_TUNNELS: &str = "flynn_tunnels";
