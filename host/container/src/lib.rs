//! Job containers for flynn-host: the only crate that uses youki's `libcontainer`.
//!
//! libcontainer forks with a raw `clone3`, marks its caller non-dumpable and makes the container
//! init the caller's child, so it must never run on an async worker thread. Each job therefore
//! gets a small single-threaded helper process, the *shim* ([`shim_main`]), that creates the
//! container, reaps its init, reads its stdout/stderr (cut into lines, a partial line sent as it comes) and serves a unix control
//! socket to the daemon ([`Shim`], [`ShimConn`]). The shim outlives daemon restarts; the daemon
//! reconnects with [`Shim::connect`] and gets every event it has not acknowledged.
//!
//! A TTY job ([`ContainerSpec::tty`]) runs on a pseudo-terminal that libcontainer opens in the
//! container (its stdin, stdout and stderr and controlling terminal, in a session of its own)
//! and whose master it sends to the shim over a console socket. The shim holds the master, so
//! the terminal survives the daemon as the pipes do: it sends the output raw
//! ([`ShimEvent::Terminal`]), copies the job's stdin FIFO to the master (^D when the daemon
//! closes stdin) and sets the window size ([`ShimConn::resize`]).
//!
//! A job's root file system is an overlay of read-only image layers ([`ImageStore`]) plus a
//! per-job writable dir. Namespaces: pid, mount, uts, ipc, and either a pre-created network
//! namespace (made by `flynn-network`), the host's (`host_network`) or a new one with only `lo`.
//! Cgroup `<parent>/<id>` with
//! memory, CPU quota and pids limits; Docker's default capability set; a default seccomp
//! profile; no new privileges.
//!
//! Needs Linux 5.12 or later ([`check_kernel`]: libcontainer mounts through `mount_setattr`).
//!
//! Left to others: the job API, log shipping and service registration (flynn-host), job
//! networking (flynn-network).

mod error;
mod image;
mod kernel;
mod outbox;
pub mod seccomp;
mod shim;
pub mod signals;
mod spec;
mod wire;

pub use error::ContainerError;
pub use image::{ImageStore, Layer};
pub use kernel::{check_kernel, kernel_supported, MIN_KERNEL};
pub use shim::{
    cgroup_dirs, shim_main, Layout, Shim, ShimConn, SpareShim, SHIM_ARG, SPARE_ARG, SPARE_LOG,
};
pub use spec::{
    capability_refusal, device_filter, max_fds_allowed, reserved_id, valid_capability, valid_id,
    BindMount, ContainerSpec, Resources, CPU_MILLIS, CPU_PERIOD_US, CPU_SHARES, DEFAULT_PATH, PIDS,
    RESERVED_IDS,
};
pub use wire::{split_output, ShimEvent, Stream, MAX_LINE};
