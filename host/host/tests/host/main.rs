//! flynn-host end to end: the real daemon binary driven over its job API, with a real
//! log aggregator and discoverd where a test needs them.
//!
//! `process` tests use the plain-process runtime (no root needed): API validation, the
//! job lifecycle, environment, log shipping, discoverd registration, persistence.

mod process;
mod support;
