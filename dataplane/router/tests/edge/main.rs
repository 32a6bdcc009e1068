//! Edge features of the router (spec §1.6, §1.7, §1.9, §1.10): sticky sessions, the
//! PROXY protocol, drain events and the custom 503 page. Each test runs a real
//! `flynn-router` process with raw-socket clients and std::net backends.

#[path = "../support/mod.rs"]
mod support;

mod drain;
mod page;
mod proxy_protocol;
mod sticky;

use std::time::Duration;

/// How long a failing router start may take before the test gives up on it.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
