//! Per-core counters, written only by their core (relaxed atomics on a core-private
//! cache line) and summed by the admin API into Prometheus text.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident: $help:literal),* $(,)?) => {
        /// One core's counters.
        #[derive(Default)]
        #[repr(align(128))]
        pub struct CoreMetrics { $(pub $name: AtomicU64,)* }

        impl CoreMetrics {
            fn fields(&self) -> &'static [(&'static str, &'static str)] {
                &[$((stringify!($name), $help),)*]
            }
            fn value(&self, i: usize) -> u64 {
                let all = [$(&self.$name,)*];
                all[i].load(Ordering::Relaxed)
            }
        }
    };
}

counters! {
    requests_total: "HTTP requests received",
    responses_1xx: "responses with a 1xx status (the 101 of an upgrade; interim 100 and 103 are not counted)",
    responses_2xx: "responses with a 2xx status",
    responses_3xx: "responses with a 3xx status",
    responses_4xx: "responses with a 4xx status",
    responses_5xx: "responses with a 5xx status",
    not_found_total: "requests for unknown hosts (404)",
    unavailable_total: "requests answered 503 by the router",
    client_aborts_total: "requests the client abandoned before the response ended (499)",
    bad_requests_total: "malformed or oversized request heads",
    upstream_connects_total: "new upstream connections",
    upstream_reuses_total: "requests sent on a pooled upstream connection",
    upstream_connect_errors_total: "failed upstream dials",
    upstream_errors_total: "upstream failures after connecting",
    upstream_retries_total: "requests sent again on a fresh connection after a reused one failed (its head write, or before any response byte to a safe bodiless request)",
    upgrades_total: "upgraded (101) connections tunnelled",
    connections_total: "client connections accepted",
    accept_errors_total: "failed accepts (HTTP and TCP route listeners): of one connection, aborted before it was accepted (skipped), or of the listener or process, out of descriptors or memory or refused (a pause, 5 ms doubling to 1 s until an accept succeeds)",
    connections_rejected_total: "client connections closed at the per-core cap",
    connections_active: "client connections open now",
    connections_parked_active: "idle client connections parked without a task (part of connections_active)",
    tcp_connections_total: "TCP route connections accepted",
    tcp_connections_active: "TCP route connections open now",
    tls_handshake_errors_total: "TLS handshakes that failed or timed out",
    h2_connections_total: "HTTP/2 client connections",
    h2_streams_total: "HTTP/2 streams accepted",
    h2_connection_errors_total: "HTTP/2 connections ended by a protocol error or abuse limit (GOAWAY)",
    h2_streams_refused_total: "HTTP/2 streams refused (REFUSED_STREAM) while the connection still ran 256 stream tasks (streams the client reset still winding down)",
    tcp_connect_errors_total: "TCP route connections with no reachable backend",
    client_send_timeouts_total: "HTTP/1 client connections closed for taking no response bytes for the idle timeout",
    tunnel_timeouts_total: "TCP route and upgraded connections closed by the tunnel or half-close timeout",
}

impl CoreMetrics {
    #[inline]
    pub fn inc(c: &AtomicU64) {
        c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    #[inline]
    pub fn dec(c: &AtomicU64) {
        c.store(
            c.load(Ordering::Relaxed).saturating_sub(1),
            Ordering::Relaxed,
        );
    }

    #[inline]
    pub fn status(&self, status: u16) {
        let c = match status {
            100..=199 => &self.responses_1xx,
            200..=299 => &self.responses_2xx,
            300..=399 => &self.responses_3xx,
            400..=499 => &self.responses_4xx,
            _ => &self.responses_5xx,
        };
        Self::inc(c);
    }
}

/// Renders every core's counters as Prometheus text, one series per core.
pub fn render(cores: &[&CoreMetrics], routes: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP flynn_router_routes Routes currently configured"
    );
    let _ = writeln!(out, "# TYPE flynn_router_routes gauge");
    let _ = writeln!(out, "flynn_router_routes {routes}");
    let Some(first) = cores.first() else {
        return out;
    };
    for (i, (name, help)) in first.fields().iter().enumerate() {
        let kind = if name.ends_with("_active") {
            "gauge"
        } else {
            "counter"
        };
        let _ = writeln!(out, "# HELP flynn_router_{name} {help}");
        let _ = writeln!(out, "# TYPE flynn_router_{name} {kind}");
        for (core, m) in cores.iter().enumerate() {
            let _ = writeln!(out, "flynn_router_{name}{{core=\"{core}\"}} {}", m.value(i));
        }
    }
    out
}
