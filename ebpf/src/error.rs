//! Errors of the fast path loader.

use std::net::Ipv4Addr;
use std::path::PathBuf;

/// What went wrong loading, attaching or updating the fast path.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("pin directory {path} is not on a BPF filesystem (mount one: mount -t bpf bpf <dir>)")]
    NotBpffs { path: PathBuf },
    #[error("mounting the BPF filesystem at {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the BPF object")]
    Load(#[source] aya::EbpfError),
    #[error("BPF object has no program or map named {name}")]
    Missing { name: &'static str },
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "pinned map {path} does not match this build ({what}); unpin the fast path and load again"
    )]
    IncompatiblePin { path: PathBuf, what: String },
    #[error("pinned link {path}")]
    Link {
        path: PathBuf,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning link at {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("no interface with index {ifindex} in this network namespace")]
    NoSuchInterface { ifindex: u32 },
    #[error("invalid underlay settings: {why}")]
    InvalidUnderlay { why: &'static str },
    #[error("invalid prefix {net}/{len}: {why}")]
    InvalidPrefix {
        net: Ipv4Addr,
        len: u8,
        why: &'static str,
    },
    #[error("interface index 0 is not valid")]
    ZeroIfindex,
    #[error("the eBPF fast path is not supported here: {why}")]
    Unsupported { why: String },
}
