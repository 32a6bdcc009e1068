//! Test-only fault injection: a node started with `--enable-fault-injection` serves
//! `POST /debug/partition` (body `{"peers": ["host:port", ...]}`), after which it drops
//! every Raft RPC to and from those peers, as if the network between them were cut.
//! An empty list heals the partition. Client traffic (the HTTP API) is not affected.
//!
//! Without the flag the endpoint does not exist and nothing here is consulted beyond one
//! read of an empty set per RPC. Used by the cluster tests; never enable it in production.

use std::collections::HashSet;
use std::sync::RwLock;

/// The header a node puts on its outgoing Raft RPCs, naming its advertised address, so
/// the receiver can drop RPCs from partitioned peers.
pub const FROM_HEADER: &str = "discoverd-from";

#[derive(Debug, Default)]
pub struct Faults {
    enabled: bool,
    cut: RwLock<HashSet<String>>,
}

impl Faults {
    pub fn new(enabled: bool) -> Faults {
        Faults {
            enabled,
            cut: RwLock::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Replaces the set of peers this node cannot reach (empty heals).
    pub fn partition(&self, peers: impl IntoIterator<Item = String>) {
        let mut cut = self.cut.write().unwrap_or_else(|p| p.into_inner());
        *cut = peers.into_iter().collect();
    }

    /// True when RPCs to or from `peer` are dropped.
    pub fn is_cut(&self, peer: &str) -> bool {
        if !self.enabled {
            return false;
        }
        let cut = self.cut.read().unwrap_or_else(|p| p.into_inner());
        cut.contains(peer)
    }

    pub fn cut_peers(&self) -> Vec<String> {
        let cut = self.cut.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<String> = cut.iter().cloned().collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::Faults;

    #[test]
    fn partition_only_when_enabled() {
        let f = Faults::new(true);
        f.partition(["127.0.0.2:1".to_string()]);
        assert!(f.is_cut("127.0.0.2:1"));
        assert!(!f.is_cut("127.0.0.3:1"));
        f.partition([]);
        assert!(!f.is_cut("127.0.0.2:1"));
        let off = Faults::new(false);
        off.partition(["a:1".to_string()]);
        assert!(!off.is_cut("a:1"));
    }
}
