//! Per-source ingest counters (one slot per core, plus UDP and peer loading), written
//! only by their owner with relaxed atomics and summed into Prometheus text by the API.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::Store;

macro_rules! counters {
    ($($name:ident: $help:literal),* $(,)?) => {
        /// One ingest source's counters.
        #[derive(Default)]
        #[repr(align(128))]
        pub struct Counters { $(pub $name: AtomicU64,)* }

        impl Counters {
            const FIELDS: &'static [(&'static str, &'static str)] = &[$((stringify!($name), $help),)*];
            fn values(&self) -> Vec<u64> {
                vec![$(self.$name.load(Ordering::Relaxed),)*]
            }
        }
    };
}

counters! {
    messages_total: "syslog messages received",
    bytes_total: "syslog frame bytes received",
    raw_total: "messages kept as raw lines (framed but not RFC 5424)",
    duplicates_total: "messages ignored as replays of a buffered line",
    connections_total: "syslog TCP connections accepted",
    connections_active: "syslog TCP connections open now",
    connections_rejected_total: "syslog TCP connections closed at once for being over --max-conns",
    frame_too_long_total: "connections closed for an oversized frame",
    frame_bad_length_total: "connections closed for a non-numeric or malformed octet count",
    frame_zero_length_total: "connections closed for a zero octet count",
    frame_garbage_total: "connections closed for bytes that start no frame",
}

impl Counters {
    #[inline]
    pub fn add(c: &AtomicU64, n: u64) {
        c.store(c.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    }
    #[inline]
    pub fn inc(c: &AtomicU64) {
        Self::add(c, 1);
    }
    #[inline]
    pub fn dec(c: &AtomicU64) {
        c.store(
            c.load(Ordering::Relaxed).saturating_sub(1),
            Ordering::Relaxed,
        );
    }
    pub fn frame_error(&self, e: flynn_syslog::FrameError) -> &AtomicU64 {
        use flynn_syslog::FrameError::*;
        match e {
            TooLong => &self.frame_too_long_total,
            BadLength => &self.frame_bad_length_total,
            ZeroLength => &self.frame_zero_length_total,
            Garbage => &self.frame_garbage_total,
        }
    }
}

fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text for the ingest sources (`source` label) and the store.
pub fn render(sources: &[(String, &Counters)], store: &Store) -> String {
    let mut out = String::new();
    let values: Vec<Vec<u64>> = sources.iter().map(|(_, c)| c.values()).collect();
    for (i, (name, help)) in Counters::FIELDS.iter().enumerate() {
        let kind = if name.ends_with("_active") {
            "gauge"
        } else {
            "counter"
        };
        let _ = writeln!(
            out,
            "# HELP flynn_logagg_{name} {help}\n# TYPE flynn_logagg_{name} {kind}"
        );
        for ((src, _), v) in sources.iter().zip(&values) {
            let _ = writeln!(out, "flynn_logagg_{name}{{source=\"{src}\"}} {}", v[i]);
        }
    }
    let _ = writeln!(
        out,
        "# HELP flynn_logagg_memory_bytes Bytes of buffered lines (counted against --max-memory)"
    );
    let _ = writeln!(
        out,
        "# TYPE flynn_logagg_memory_bytes gauge\nflynn_logagg_memory_bytes {}",
        store.memory()
    );
    let _ = writeln!(
        out,
        "# HELP flynn_logagg_memory_limit_bytes The configured --max-memory"
    );
    let _ = writeln!(
        out,
        "# TYPE flynn_logagg_memory_limit_bytes gauge\nflynn_logagg_memory_limit_bytes {}",
        store.limits().max_memory
    );
    let t = store.totals();
    let _ = writeln!(
        out,
        "# HELP flynn_logagg_evicted_total Lines dropped from app buffers, by reason, over every app since start (removed apps included)\n# TYPE flynn_logagg_evicted_total counter\nflynn_logagg_evicted_total{{reason=\"lines_per_app\"}} {}\nflynn_logagg_evicted_total{{reason=\"max_memory\"}} {}",
        t.evicted_capacity, t.evicted_memory
    );
    let _ = writeln!(
        out,
        "# HELP flynn_logagg_duplicates_total Replayed lines ignored, over every app since start\n# TYPE flynn_logagg_duplicates_total counter\nflynn_logagg_duplicates_total {}",
        t.duplicates
    );
    let _ = writeln!(
        out,
        "# HELP flynn_logagg_reclaim_passes_total Passes over the shards to bring memory back under --max-memory\n# TYPE flynn_logagg_reclaim_passes_total counter\nflynn_logagg_reclaim_passes_total {}",
        store.reclaim_passes()
    );
    let stats = store.stats();
    type Get = fn(&crate::store::AppStats) -> u64;
    let per_app: [(&str, &str, &str, Get); 5] = [
        ("app_lines", "gauge", "Lines buffered per app", |a| {
            a.lines as u64
        }),
        ("app_bytes", "gauge", "Bytes buffered per app", |a| {
            a.bytes as u64
        }),
        ("app_followers", "gauge", "Live readers per app", |a| {
            a.followers as u64
        }),
        (
            "app_duplicates_total",
            "counter",
            "Replayed lines ignored per app",
            |a| a.duplicates,
        ),
        (
            "app_evicted_total",
            "counter",
            "Lines dropped from an app's buffer, by reason",
            |_| 0,
        ),
    ];
    for (name, kind, help, get) in per_app {
        let _ = writeln!(
            out,
            "# HELP flynn_logagg_{name} {help}\n# TYPE flynn_logagg_{name} {kind}"
        );
        for a in &stats {
            let app = label(&a.app);
            if name == "app_evicted_total" {
                let _ = writeln!(
                    out,
                    "flynn_logagg_{name}{{app=\"{app}\",reason=\"lines_per_app\"}} {}",
                    a.evicted_capacity
                );
                let _ = writeln!(
                    out,
                    "flynn_logagg_{name}{{app=\"{app}\",reason=\"max_memory\"}} {}",
                    a.evicted_memory
                );
            } else {
                let _ = writeln!(out, "flynn_logagg_{name}{{app=\"{app}\"}} {}", get(a));
            }
        }
    }
    out
}
