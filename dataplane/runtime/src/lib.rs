//! Thread-per-core glue shared by the data-plane binaries (router, log aggregator).
//!
//! - [`spawn_workers`]: one pinned OS thread per core, each running its own monoio
//!   runtime; io_uring when the kernel allows it, epoll otherwise (old kernels,
//!   seccomp profiles that block `io_uring_setup`). No work stealing: a connection
//!   lives and dies on the core that accepted it. A panic on a worker aborts the process
//!   (from a panic hook, before unwinding); [`abort_on_panic`] does the same for another
//!   thread the process cannot go on without, and [`recoverable`] lifts that for a step
//!   of such a thread that can fail as a whole.
//! - [`reuseport_listener`]: a listening socket per core on the same address;
//!   [`check_exclusive_bind`]: whether no other socket listens there (a group bound beside
//!   another process's SO_REUSEPORT listeners would share their connections).
//! - [`Published`] / [`Local`]: whole immutable snapshots published by a control
//!   thread and picked up by cores between requests (an atomic pointer swap).
//! - [`park`]: an epoll set where idle connections wait without a task.
//! - [`fair`]: a byte budget and a yield that goes behind the core's other ready tasks, for
//!   relay loops that the epoll driver never makes wait.
//! - [`sock`]: the few raw socket calls the proxies need (liveness peeks, shutdown).
//!
//! This is the only data-plane crate with `unsafe` code; each block says why it is sound.

pub mod fair;
pub mod handoff;
pub mod park;
mod recycle;
mod snapshot;
pub mod sock;
mod workers;

pub use recycle::Recycled;
pub use snapshot::{Local, Published};
pub use workers::{
    abort_on_panic, check_exclusive_bind, core_count, panic_message, recoverable,
    reuseport_listener, spawn_workers, Driver, WorkerCtx,
};
