//! flynn-perf: load generators and side-by-side harnesses for the Flynn dataplane.
//!
//! The `proxy` harness runs the same `wrk` scenarios against the origin alone, the Flynn
//! router, nginx and HAProxy on loopback, interleaved round by round, and reports medians,
//! proxy CPU per request and memory. It measures; it never passes or fails on timing. The
//! `origin` subcommand is the tiny monoio HTTP/1.1 server every target proxies to. The
//! `logagg` harness blasts pre-built syslog frames at flynn-logagg and rsyslog the same way
//! and reports messages/s, CPU per message, memory and follow latency. The `discoverd`
//! harness runs flynn-discoverd and etcd (one node and three) side by side: metadata CAS,
//! registrations and heartbeats, register → watch latency and leader failover.
//!
//! The `overlay` harness compares the kernel VXLAN path with the eBPF fast path (and the
//! underlay) in network namespaces: ping RTT and iperf3 TCP/UDP.
//!
//! The `host` harness (root) compares flynn-host's job start/stop latency with `runc` on the
//! same busybox image and reads the daemon's and the shims' memory with many jobs.
//!
//! Leaves to others: micro-benchmarks (criterion `benches/` in each crate) and correctness
//! (`flynn-e2e`). Used by people and CI jobs that record `perf/RESULTS.md`.

pub mod bench;
pub mod discoverd;
pub mod h2load;
pub mod handshake;
pub mod host;
pub mod idle;
pub mod logagg;
pub mod order;
pub mod origin;
pub mod overlay;
pub mod procfs;
pub mod procs;
pub mod report;
pub mod targets;
pub mod tls;
pub mod wrk;
