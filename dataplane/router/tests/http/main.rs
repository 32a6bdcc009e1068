//! HTTP proxy integration tests (spec §1.5, §1.6, §1.10): a real `flynn-router` process,
//! raw-socket clients and std::net backends, so every assertion is on exact bytes.

#[path = "../support/mod.rs"]
mod support;

mod accept;
mod balance;
mod churn;
mod drivers;
mod framing;
mod headers;
mod keepalive;
mod parking;
mod response_head;
mod routing;
mod streaming;
mod unavailable;
mod unread_body;
mod upgrade;

use support::{http_route, Backend, Router};

/// A router with route `domain` → service `web` served by one JSON echo backend `b1`.
pub fn setup(domain: &str) -> (Router, Backend) {
    let router = Router::start();
    let b1 = Backend::start("b1");
    router.add_route(http_route(domain, "web"));
    router.set_backends("web", &[&b1]);
    (router, b1)
}
