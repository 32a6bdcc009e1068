//! [`Stats`]: what the agent has done, for `/metrics` (Prometheus text) and
//! `/.well-known/status`.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::subnet::Subnet;

/// Counters and gauges updated by the [`crate::Agent`]; shared with the HTTP endpoint.
#[derive(Debug, Default)]
pub struct Stats {
    pub syncs: AtomicU64,
    pub sync_errors: AtomicU64,
    /// Kernel and fast-path entries added or removed.
    pub changes: AtomicU64,
    /// Live remote leases at the last reconcile.
    pub peers: AtomicU64,
    pub renewals: AtomicU64,
    pub renew_errors: AtomicU64,
    /// Whether the last reconcile succeeded.
    pub synced: AtomicBool,
    pub fast_path: AtomicBool,
    pub fast_local: AtomicU64,
    pub fast_remote: AtomicU64,
    pub fast_decap: AtomicU64,
    pub fast_decap_gso: AtomicU64,
    pub fast_encap: AtomicU64,
    pub fast_passed: AtomicU64,
    /// Remote blocks the fast path's maps refused (full) at the last reconcile: the kernel
    /// path carries them. Not a failed reconcile.
    pub fast_unmapped: Mutex<BTreeSet<Subnet>>,
}

impl Stats {
    /// Records the blocks the fast path's maps refused at the last reconcile.
    pub fn set_unmapped(&self, blocks: BTreeSet<Subnet>) {
        *self.fast_unmapped.lock().unwrap_or_else(|e| e.into_inner()) = blocks;
    }

    /// [`Stats::fast_unmapped`]: how many, and the first `limit` of them.
    pub fn unmapped(&self, limit: usize) -> (usize, Vec<Subnet>) {
        let set = self.fast_unmapped.lock().unwrap_or_else(|e| e.into_inner());
        (set.len(), set.iter().take(limit).copied().collect())
    }

    /// Prometheus text exposition of every value.
    pub fn prometheus(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        metric(
            "flynn_network_syncs_total",
            "counter",
            "Reconciles of the kernel against the leases.",
            &[("", get(&self.syncs))],
        );
        metric(
            "flynn_network_sync_errors_total",
            "counter",
            "Reconciles that failed.",
            &[("", get(&self.sync_errors))],
        );
        metric(
            "flynn_network_changes_total",
            "counter",
            "Overlay entries added or removed.",
            &[("", get(&self.changes))],
        );
        metric(
            "flynn_network_peers",
            "gauge",
            "Live remote leases.",
            &[("", get(&self.peers))],
        );
        metric(
            "flynn_network_lease_renewals_total",
            "counter",
            "Lease renewals.",
            &[
                ("{result=\"ok\"}", get(&self.renewals)),
                ("{result=\"error\"}", get(&self.renew_errors)),
            ],
        );
        metric(
            "flynn_network_fast_path_enabled",
            "gauge",
            "Whether the eBPF fast path is on.",
            &[("", u64::from(self.fast_path.load(Ordering::Relaxed)))],
        );
        if self.fast_path.load(Ordering::Relaxed) {
            metric(
                "flynn_network_fast_path_unmapped_blocks",
                "gauge",
                "Remote blocks the fast path's maps refused (full); the kernel path carries them.",
                &[("", self.unmapped(0).0 as u64)],
            );
            metric(
                "flynn_network_fast_path_packets_total",
                "counter",
                "Packets seen by the eBPF fast path, by outcome.",
                &[
                    ("{outcome=\"redirected_local\"}", get(&self.fast_local)),
                    ("{outcome=\"redirected_remote\"}", get(&self.fast_remote)),
                    ("{outcome=\"encapsulated\"}", get(&self.fast_encap)),
                    ("{outcome=\"decapsulated\"}", get(&self.fast_decap)),
                    ("{outcome=\"decapsulated_gso\"}", get(&self.fast_decap_gso)),
                    ("{outcome=\"passed\"}", get(&self.fast_passed)),
                ],
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let s = Stats::default();
        s.syncs.store(3, Ordering::Relaxed);
        s.peers.store(2, Ordering::Relaxed);
        let text = s.prometheus();
        assert!(text
            .contains("# TYPE flynn_network_syncs_total counter\nflynn_network_syncs_total 3\n"));
        assert!(text.contains("flynn_network_peers 2\n"));
        assert!(text.contains("flynn_network_lease_renewals_total{result=\"ok\"} 0\n"));
        assert!(!text.contains("fast_path_packets"));
        s.fast_path.store(true, Ordering::Relaxed);
        s.fast_remote.store(9, Ordering::Relaxed);
        s.fast_decap.store(4, Ordering::Relaxed);
        s.fast_decap_gso.store(2, Ordering::Relaxed);
        let text = s.prometheus();
        assert!(text
            .contains("flynn_network_fast_path_packets_total{outcome=\"redirected_remote\"} 9\n"));
        assert!(
            text.contains("flynn_network_fast_path_packets_total{outcome=\"decapsulated\"} 4\n")
        );
        assert!(text
            .contains("flynn_network_fast_path_packets_total{outcome=\"decapsulated_gso\"} 2\n"));
    }
}
