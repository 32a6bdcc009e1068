//! The per-job shim: the daemon side ([`Shim`], [`ShimConn`]) and the shim process
//! ([`shim_main`]).

mod cgroups;
mod client;
mod container;
mod holder;
mod layout;
mod run;
mod terminal;

pub use client::{Shim, ShimConn, SpareShim};
pub use layout::{Layout, SHIM_ARG, SPARE_ARG, SPARE_LOG};
pub use run::shim_main;

/// Every existing cgroup directory of a job (for checks and accounting).
pub fn cgroup_dirs(spec: &crate::ContainerSpec) -> Vec<std::path::PathBuf> {
    cgroups::dirs(spec)
}
