//! Keeping the eBPF fast path's routing maps (remote prefixes, BPF tunnel peers) equal to the
//! leases the agent reconciles. Behind the [`RouteMaps`] trait (implemented by
//! [`flynn_ebpf::FastPath`]) so the bookkeeping is tested against a fake with a small capacity.
//!
//! The maps are an acceleration under the kernel path: an entry that cannot be added (the
//! maps hold 1024 entries each, a bigger cluster has more peers) only leaves that block on
//! the kernel path. Such a failure is recorded for that block and the other entries are
//! still written; it is not an error of the whole pass. A stale entry that cannot be removed
//! is an error (it would send the block's traffic to a peer that left), after the other
//! entries were written.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use flynn_ebpf::{EbpfError, FastPath, Hop, Tunnel};

use crate::agent::error_chain;
use crate::subnet::Subnet;

/// The fast path's prefix and tunnel maps.
pub(crate) trait RouteMaps {
    fn prefixes(&self) -> Result<Vec<(Ipv4Addr, u8, Hop)>, EbpfError>;
    fn upsert_prefix(&mut self, net: Ipv4Addr, len: u8, hop: Hop) -> Result<(), EbpfError>;
    fn remove_prefix(&mut self, net: Ipv4Addr, len: u8) -> Result<(), EbpfError>;
    fn tunnels(&self) -> Result<Vec<(Ipv4Addr, Tunnel)>, EbpfError>;
    fn upsert_tunnel(&mut self, next_hop: Ipv4Addr, t: Tunnel) -> Result<(), EbpfError>;
    fn remove_tunnel(&mut self, next_hop: Ipv4Addr) -> Result<(), EbpfError>;
}

impl RouteMaps for FastPath {
    fn prefixes(&self) -> Result<Vec<(Ipv4Addr, u8, Hop)>, EbpfError> {
        FastPath::prefixes(self)
    }
    fn upsert_prefix(&mut self, net: Ipv4Addr, len: u8, hop: Hop) -> Result<(), EbpfError> {
        FastPath::upsert_prefix(self, net, len, hop)
    }
    fn remove_prefix(&mut self, net: Ipv4Addr, len: u8) -> Result<(), EbpfError> {
        FastPath::remove_prefix(self, net, len)
    }
    fn tunnels(&self) -> Result<Vec<(Ipv4Addr, Tunnel)>, EbpfError> {
        FastPath::tunnels(self)
    }
    fn upsert_tunnel(&mut self, next_hop: Ipv4Addr, t: Tunnel) -> Result<(), EbpfError> {
        FastPath::upsert_tunnel(self, next_hop, t)
    }
    fn remove_tunnel(&mut self, next_hop: Ipv4Addr) -> Result<(), EbpfError> {
        FastPath::remove_tunnel(self, next_hop)
    }
}

/// What one pass changed, and which blocks did not get all their entries.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub changes: usize,
    /// Blocks whose prefix or tunnel entry could not be added: the kernel path carries them
    /// (entirely, or encapsulated by the VXLAN device instead of in BPF).
    pub unmapped: BTreeSet<Subnet>,
}

/// The agent's record of the routing maps between passes.
#[derive(Debug, Default)]
pub(crate) struct MapSync {
    /// Prefixes this agent put in the map.
    prefixes: BTreeMap<Subnet, Hop>,
    /// Whether prefixes a previous agent left in the pinned map have been swept.
    swept: bool,
    /// The blocks reported unmapped by the last pass (a change is logged at warn, a
    /// repeat at debug: a full map fails the same way on every resync).
    unmapped: BTreeSet<Subnet>,
}

impl MapSync {
    /// Forgets what was written: every prefix is written again and the map swept on the
    /// next pass (the hops named devices that changed).
    pub fn reset(&mut self) {
        self.prefixes.clear();
        self.swept = false;
    }

    /// Makes `maps` hold the prefixes `want` and the tunnel entries `tunnels` (by next hop;
    /// the map is listed and made equal, entries added before the prefixes that use them).
    /// The tunnel entry of a block is `tunnels[&block.addr()]`.
    pub fn sync(
        &mut self,
        maps: &mut impl RouteMaps,
        want: &BTreeMap<Subnet, Hop>,
        tunnels: &BTreeMap<Ipv4Addr, Tunnel>,
    ) -> Result<Outcome, EbpfError> {
        let mut out = Outcome::default();
        // The first failed removal, returned once everything else was written.
        let mut failed: Option<EbpfError> = None;
        let mut keep = |r: Result<(), EbpfError>| match r {
            Ok(()) => true,
            Err(e) => {
                failed.get_or_insert(e);
                false
            }
        };
        let have: BTreeMap<Ipv4Addr, Tunnel> = maps.tunnels()?.into_iter().collect();
        for hop in have.keys().filter(|h| !tunnels.contains_key(h)) {
            if keep(maps.remove_tunnel(*hop)) {
                out.changes += 1;
            }
        }
        if !self.swept {
            // The map is pinned and outlives agents: drop whatever a previous agent left for
            // blocks that are not live now.
            let mut all = true;
            for (net, len, _) in maps.prefixes()? {
                if !want.contains_key(&Subnet::new(net, len)) {
                    all &= keep(maps.remove_prefix(net, len));
                }
            }
            self.swept = all;
        }
        let stale: Vec<Subnet> = self
            .prefixes
            .keys()
            .filter(|s| !want.contains_key(s))
            .copied()
            .collect();
        for s in stale {
            if keep(maps.remove_prefix(s.addr(), s.prefix_len())) {
                self.prefixes.remove(&s);
                out.changes += 1;
            }
        }
        // Tunnel entries before the prefixes that use them (the first packets of a new peer
        // are then already encapsulated in BPF; either way they would be delivered). A block
        // without its tunnel entry still gets its prefix: BPF hands its packets to the VXLAN
        // device.
        let mut errors: BTreeMap<Subnet, EbpfError> = BTreeMap::new();
        for (hop, t) in tunnels {
            if have.get(hop) != Some(t) {
                match maps.upsert_tunnel(*hop, *t) {
                    Ok(()) => out.changes += 1,
                    Err(e) => {
                        let block = want
                            .iter()
                            .find(|(_, h)| h.next_hop == *hop)
                            .map_or_else(|| Subnet::new(*hop, 32), |(s, _)| *s);
                        errors.insert(block, e);
                    }
                }
            }
        }
        for (s, hop) in want {
            if self.prefixes.get(s) != Some(hop) {
                match maps.upsert_prefix(s.addr(), s.prefix_len(), *hop) {
                    Ok(()) => {
                        self.prefixes.insert(*s, *hop);
                        out.changes += 1;
                    }
                    Err(e) => {
                        errors.insert(*s, e);
                    }
                }
            }
        }
        out.unmapped = errors.keys().copied().collect();
        if out.unmapped != self.unmapped {
            if let Some((block, e)) = errors.iter().next() {
                tracing::warn!(
                    blocks = out.unmapped.len(),
                    first = %block,
                    error = %error_chain(e),
                    "fast path maps refused entries; the kernel path carries those blocks"
                );
            } else {
                tracing::info!("fast path maps hold every block again");
            }
        } else if let Some((block, e)) = errors.iter().next() {
            tracing::debug!(blocks = out.unmapped.len(), first = %block, error = %error_chain(e), "fast path maps still refuse entries");
        }
        self.unmapped.clone_from(&out.unmapped);
        match failed {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Maps holding at most `cap` entries each, refusing more as a full BPF map does (E2BIG).
    #[derive(Default)]
    struct Small {
        cap: usize,
        prefixes: BTreeMap<(Ipv4Addr, u8), Hop>,
        tunnels: BTreeMap<Ipv4Addr, Tunnel>,
        /// Removals fail too.
        stuck: bool,
    }

    fn refused(what: &'static str) -> EbpfError {
        EbpfError::Io {
            op: what,
            path: "fake".into(),
            source: std::io::Error::from_raw_os_error(libc::E2BIG),
        }
    }

    impl RouteMaps for Small {
        fn prefixes(&self) -> Result<Vec<(Ipv4Addr, u8, Hop)>, EbpfError> {
            Ok(self.prefixes.iter().map(|(k, h)| (k.0, k.1, *h)).collect())
        }
        fn upsert_prefix(&mut self, net: Ipv4Addr, len: u8, hop: Hop) -> Result<(), EbpfError> {
            if self.prefixes.len() >= self.cap && !self.prefixes.contains_key(&(net, len)) {
                return Err(refused("prefix map full"));
            }
            self.prefixes.insert((net, len), hop);
            Ok(())
        }
        fn remove_prefix(&mut self, net: Ipv4Addr, len: u8) -> Result<(), EbpfError> {
            if self.stuck {
                return Err(refused("remove prefix"));
            }
            self.prefixes.remove(&(net, len));
            Ok(())
        }
        fn tunnels(&self) -> Result<Vec<(Ipv4Addr, Tunnel)>, EbpfError> {
            Ok(self.tunnels.iter().map(|(k, t)| (*k, *t)).collect())
        }
        fn upsert_tunnel(&mut self, next_hop: Ipv4Addr, t: Tunnel) -> Result<(), EbpfError> {
            if self.tunnels.len() >= self.cap && !self.tunnels.contains_key(&next_hop) {
                return Err(refused("tunnel map full"));
            }
            self.tunnels.insert(next_hop, t);
            Ok(())
        }
        fn remove_tunnel(&mut self, next_hop: Ipv4Addr) -> Result<(), EbpfError> {
            if self.stuck {
                return Err(refused("remove tunnel"));
            }
            self.tunnels.remove(&next_hop);
            Ok(())
        }
    }

    fn block(i: u8) -> Subnet {
        Subnet::new(Ipv4Addr::new(100, 100, i, 0), 24)
    }

    fn tunnel(i: u8) -> Tunnel {
        Tunnel {
            remote_ip: Ipv4Addr::new(10, 0, 0, i),
            vtep_mac: [0x0e, 0x66, 100, 100, i, 0],
        }
    }

    /// Tunneled peers `ids`: blocks 100.100.i.0/24 through device 7, each with a tunnel entry.
    fn peers(
        ids: impl IntoIterator<Item = u8>,
    ) -> (BTreeMap<Subnet, Hop>, BTreeMap<Ipv4Addr, Tunnel>) {
        let mut want = BTreeMap::new();
        let mut tunnels = BTreeMap::new();
        for i in ids {
            let b = block(i);
            let hop = Hop {
                ifindex: 7,
                next_hop: b.addr(),
            };
            want.insert(b, hop);
            tunnels.insert(b.addr(), tunnel(i));
        }
        (want, tunnels)
    }

    #[test]
    fn a_full_map_leaves_only_the_blocks_that_do_not_fit_to_the_kernel() {
        let mut maps = Small {
            cap: 3,
            ..Small::default()
        };
        let mut sync = MapSync::default();
        // Room for 3 of 4 peers in each map: the 4th block's tunnel entry is refused before
        // any prefix is written, which used to end the pass with no prefix at all.
        let (want, tunnels) = peers(1..=4);
        let out = sync
            .sync(&mut maps, &want, &tunnels)
            .expect("a refused add fails only its block");
        assert_eq!(out.unmapped, BTreeSet::from([block(4)]));
        assert_eq!(out.changes, 6, "3 tunnels and 3 prefixes written");
        let mapped: Vec<Ipv4Addr> = maps.prefixes.keys().map(|k| k.0).collect();
        assert_eq!(mapped, [1, 2, 3].map(|i| block(i).addr()));

        // Only the refused block is tried again, and it is no change.
        let again = sync.sync(&mut maps, &want, &tunnels).unwrap();
        assert_eq!((again.changes, &again.unmapped), (0, &out.unmapped));

        // A peer leaves: its entries go and the 4th block gets its own.
        let (want, tunnels) = peers(2..=4);
        let out = sync.sync(&mut maps, &want, &tunnels).unwrap();
        assert!(out.unmapped.is_empty(), "{out:?}");
        assert_eq!(out.changes, 4, "1 tunnel and 1 prefix out, 1 of each in");
        assert!(maps.prefixes.contains_key(&(block(4).addr(), 24)));
        assert!(maps.tunnels.contains_key(&block(4).addr()));
    }

    #[test]
    fn a_block_without_room_for_its_tunnel_still_gets_its_prefix() {
        // Entries a previous agent left fill the tunnel map and cannot be removed.
        let mut maps = Small {
            cap: 2,
            stuck: true,
            ..Small::default()
        };
        maps.tunnels.insert(block(8).addr(), tunnel(8));
        maps.tunnels.insert(block(9).addr(), tunnel(9));
        let mut sync = MapSync::default();
        let (want, tunnels) = peers(1..=2);
        // Stale entries that stay are an error of the pass (they name peers that left), but
        // only once every prefix is written: BPF hands those blocks to the VXLAN device.
        assert!(sync.sync(&mut maps, &want, &tunnels).is_err());
        let mapped: Vec<Ipv4Addr> = maps.prefixes.keys().map(|k| k.0).collect();
        assert_eq!(mapped, [block(1).addr(), block(2).addr()]);
        // Removals work again: the stale entries go, the peers' come in.
        maps.stuck = false;
        let out = sync.sync(&mut maps, &want, &tunnels).unwrap();
        assert!(out.unmapped.is_empty(), "{out:?}");
        assert_eq!(
            maps.tunnels.keys().copied().collect::<Vec<_>>(),
            [block(1).addr(), block(2).addr()]
        );
    }
}
