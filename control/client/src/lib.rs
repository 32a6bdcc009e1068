//! Typed HTTP/SSE clients for Flynn services.
//!
//! Today: the discoverd client ([`discoverd::Client`]) with a [`discoverd::Heartbeater`]
//! that keeps an instance registered and [`discoverd::Watch`]es that reconnect and
//! resume without losing events. Used by the router, scheduler and anything that
//! registers with discoverd. Wire types are defined here (serde only) so clients do not
//! depend on the discoverd binary crate.

pub mod discoverd;
pub mod host;
mod json_http;
