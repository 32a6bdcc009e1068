//! flynn-host end to end: the real daemon binary driven over its job API, with a real
//! log aggregator and discoverd where a test needs them.
//!
//! `containers` tests run busybox jobs in real containers (root only), each test inside
//! a network namespace it creates. `process` tests use the plain-process runtime (no root needed): API validation, the
//! job lifecycle, environment, log shipping, discoverd registration, persistence.

mod attach;
mod containers;
mod process;
mod support;
mod volumes;
