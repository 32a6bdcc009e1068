//! Wire types shared by every Flynn service and client.
//!
//! This crate is pure data: serde types and the error envelope with its code→status
//! table (spec §0.1). It performs no I/O and depends on no other `flynn-*` crate, so
//! both the data plane (router, log aggregator) and the control plane may use it.

pub mod attach;
pub mod discoverd;
mod error;
pub mod host;
pub mod logagg;
mod route;
mod status;

pub use error::{ApiError, ErrorCode};
pub use route::{Backend, BackendAddr, Certificate, Route, RouteType, StreamEvent};
pub use status::{Status, StatusBody};
