//! Immutable route table snapshots for the router's hot path.
//!
//! A [`Table`] is built off the hot path (by the router's control thread) from the
//! route list and the backends of each service, then published to every core as a
//! whole. Lookups borrow from it and never allocate. Who uses it: `flynn-router`.
//! What it leaves to others: storing and validating routes (the router's admin API),
//! balancing and in-flight accounting (per core, in the router).

mod table;

pub use table::{normalize_path, strip_port, Backends, HttpRoute, Table, TcpRoute, MAX_DOMAIN};
