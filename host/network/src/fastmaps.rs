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
//!
//! A pass comes in two halves around the kernel's changes, as the kernel's own entries are
//! added (neighbour, FDB, route) and removed in reverse: stale map entries go before the
//! kernel entries they lead to ([`MapSync::remove_stale`]), new ones come after them
//! ([`MapSync::add`]).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::Ipv4Addr;
use std::time::SystemTime;

use flynn_ebpf::{EbpfError, FastPath, Hop, Tunnel};

use crate::agent::{error_chain, AgentError};
use crate::lease::Lease;
use crate::reconcile::{reconcile_part, Netlink, NetlinkError, Op, PartError};
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

/// What the agent keeps between passes over the routing maps: only which blocks were last
/// reported unmapped. The maps themselves are listed on every pass (both are pinned and
/// outlive agents, and anything else with the pins may change them): an entry removed or
/// changed behind the agent's back is put back by the next pass. (Prefixes used to be
/// compared with what the agent remembered writing, so one removed behind its back stayed
/// away and its block on the kernel path.)
#[derive(Debug, Default)]
pub(crate) struct MapSync {
    /// The blocks reported unmapped by the last pass (a change is logged at warn, a
    /// repeat at debug: a full map fails the same way on every resync).
    unmapped: BTreeSet<Subnet>,
}

impl MapSync {
    /// Makes `maps` hold the prefixes `want` and the tunnel entries `tunnels` (by next hop),
    /// [`MapSync::remove_stale`] then [`MapSync::add`]: what a pass does where no kernel
    /// entry changes in between. The first failed removal is returned once everything else
    /// was written.
    #[cfg(test)]
    pub fn sync(
        &mut self,
        maps: &mut impl RouteMaps,
        want: &BTreeMap<Subnet, Hop>,
        tunnels: &BTreeMap<Ipv4Addr, Tunnel>,
    ) -> Result<Outcome, PartError<EbpfError>> {
        let removed = self.remove_stale(maps, want, tunnels);
        let mut out = self.add(maps, want, tunnels)?;
        out.changes += removed?;
        Ok(out)
    }

    /// The first half of a pass, before the kernel's entries change: removes the prefixes
    /// not in `want` or with another hop there, then the tunnel entries not in `tunnels`.
    /// Packets of a block leaving (or changing hops) go the kernel way from here on, never
    /// to a next hop whose neighbour entry the kernel half is about to delete (the
    /// neighbour lookup of `bpf_redirect_neigh` would leave an INCOMPLETE entry behind).
    /// Returns the number of removals; a failed one is logged and the first is returned once
    /// the others were tried. A map that cannot be listed fails the whole part.
    pub fn remove_stale(
        &mut self,
        maps: &mut impl RouteMaps,
        want: &BTreeMap<Subnet, Hop>,
        tunnels: &BTreeMap<Ipv4Addr, Tunnel>,
    ) -> Result<usize, PartError<EbpfError>> {
        let mut changes = 0;
        let mut failed: Option<EbpfError> = None;
        let mut done = |r: Result<(), EbpfError>, what: &str| match r {
            Ok(()) => changes += 1,
            Err(e) => {
                tracing::warn!(entry = what, error = %error_chain(&e), "cannot remove a stale fast path entry");
                failed.get_or_insert(e);
            }
        };
        for (net, len, hop) in maps.prefixes().map_err(PartError::listing)? {
            let block = Subnet::new(net, len);
            if want.get(&block) != Some(&hop) {
                done(maps.remove_prefix(net, len), &block.to_string());
            }
        }
        for (next_hop, _) in maps.tunnels().map_err(PartError::listing)? {
            if !tunnels.contains_key(&next_hop) {
                done(maps.remove_tunnel(next_hop), &next_hop.to_string());
            }
        }
        match failed {
            Some(e) => Err(PartError::entries(e)),
            None => Ok(changes),
        }
    }

    /// The second half of a pass, once the kernel's entries are in: writes the tunnel
    /// entries, then the prefixes that use them (the first packets of a new peer are then
    /// already encapsulated in BPF; either way they would be delivered), where the maps
    /// (listed again) differ. A block without its tunnel entry still gets its prefix: BPF
    /// hands its packets to the VXLAN device. An entry the maps refuse (full) leaves only its
    /// block on the kernel path: reported in [`Outcome::unmapped`], not an error. A map that
    /// cannot be listed fails the whole part.
    pub fn add(
        &mut self,
        maps: &mut impl RouteMaps,
        want: &BTreeMap<Subnet, Hop>,
        tunnels: &BTreeMap<Ipv4Addr, Tunnel>,
    ) -> Result<Outcome, PartError<EbpfError>> {
        let mut out = Outcome::default();
        let have_tunnels: BTreeMap<Ipv4Addr, Tunnel> = maps
            .tunnels()
            .map_err(PartError::listing)?
            .into_iter()
            .collect();
        let have: BTreeMap<Subnet, Hop> = maps
            .prefixes()
            .map_err(PartError::listing)?
            .into_iter()
            .map(|(net, len, hop)| (Subnet::new(net, len), hop))
            .collect();
        let mut errors: BTreeMap<Subnet, EbpfError> = BTreeMap::new();
        for (hop, t) in tunnels {
            if have_tunnels.get(hop) != Some(t) {
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
            if have.get(s) != Some(hop) {
                match maps.upsert_prefix(s.addr(), s.prefix_len(), *hop) {
                    Ok(()) => out.changes += 1,
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
        Ok(out)
    }
}

/// The fast path's side of a pass: the maps and what they should hold.
pub(crate) struct FastPass<'a, M> {
    pub sync: &'a mut MapSync,
    pub maps: &'a mut M,
    pub want: BTreeMap<Subnet, Hop>,
    pub tunnels: BTreeMap<Ipv4Addr, Tunnel>,
}

/// What each part of [`ordered_pass`] did.
pub(crate) struct PassOutcome {
    /// The VXLAN device's entries ([`crate::reconcile::reconcile`]).
    pub kernel: Result<Vec<Op>, PartError<NetlinkError>>,
    /// The direct routes.
    pub direct: Result<usize, PartError<NetlinkError>>,
    /// Stale map entries removed ([`MapSync::remove_stale`]; 0 without a fast path).
    pub removed: Result<usize, PartError<EbpfError>>,
    /// Map entries written ([`MapSync::add`]; nothing without a fast path).
    pub added: Result<Outcome, PartError<EbpfError>>,
}

/// How many changes each part of a pass made.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct PassChanges {
    pub kernel: usize,
    pub direct: usize,
    pub fast: usize,
}

/// Why a pass failed: the first failure of its parts, and whether the pass failed as a
/// whole (`whole`: some part could not even list what is there, so it did nothing for any
/// peer; say the fast path's maps could not be read) rather than for some entries (one
/// peer's record the kernel refuses, a stale map entry that stays).
#[derive(Debug)]
pub(crate) struct PassError {
    pub error: AgentError,
    pub whole: bool,
}

impl PassOutcome {
    /// The changes of every part, or the pass's failure ([`PassError`]): the first part
    /// that failed as a whole, else the first that failed.
    pub fn changes(self) -> Result<PassChanges, PassError> {
        let mut first: Option<PassError> = None;
        let mut note = |e: PartError<AgentError>| {
            if first.as_ref().is_none_or(|f| !f.whole && e.listing) {
                first = Some(PassError {
                    error: e.error,
                    whole: e.listing,
                });
            }
        };
        let mut changes = PassChanges::default();
        match self.kernel {
            Ok(ops) => changes.kernel = ops.len(),
            Err(e) => note(e.map(AgentError::from)),
        }
        match self.direct {
            Ok(n) => changes.direct = n,
            Err(e) => note(e.map(AgentError::from)),
        }
        match self.added {
            Ok(out) => changes.fast += out.changes,
            Err(e) => note(e.map(AgentError::from)),
        }
        match self.removed {
            Ok(n) => changes.fast += n,
            Err(e) => note(e.map(AgentError::from)),
        }
        match first {
            Some(e) => Err(e),
            None => Ok(changes),
        }
    }
}

/// One pass over the kernel and the fast path's maps: stale map entries out, the VXLAN
/// device's entries reconciled with `tunneled`, the direct routes (`direct`, awaited only
/// then), new map entries in. Map entries are added after the kernel entries they lead to
/// and removed before them, as the kernel's own are (neighbour, FDB, route, and back):
/// removed after, a leaving peer's prefix kept sending packets to the VXLAN device with a
/// next hop whose neighbour entry was gone, and each left an INCOMPLETE neighbour entry
/// nothing removed. Every part runs whatever the others did.
pub(crate) async fn ordered_pass<N: Netlink, M: RouteMaps>(
    nl: &mut N,
    vxlan: u32,
    own: &Subnet,
    tunneled: &[Lease],
    now: SystemTime,
    direct: impl Future<Output = Result<usize, PartError<NetlinkError>>>,
    mut fast: Option<FastPass<'_, M>>,
) -> PassOutcome {
    let removed = match &mut fast {
        Some(f) => f.sync.remove_stale(f.maps, &f.want, &f.tunnels),
        None => Ok(0),
    };
    let kernel = reconcile_part(nl, vxlan, own, tunneled, now).await;
    let direct = direct.await;
    let added = match &mut fast {
        Some(f) => f.sync.add(f.maps, &f.want, &f.tunnels),
        None => Ok(Outcome::default()),
    };
    PassOutcome {
        kernel,
        direct,
        removed,
        added,
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
        /// Listing either map fails.
        unlistable: bool,
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
            if self.unlistable {
                return Err(refused("list prefixes"));
            }
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
            if self.unlistable {
                return Err(refused("list tunnels"));
            }
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

    /// The prefix map is listed on every pass, like the tunnel map: a prefix removed behind
    /// the agent's back (another tool with the pins, an operator) is put back by the next
    /// pass. It used to be compared with what the agent remembered writing only, and stayed
    /// away, its block on the kernel path until the agent restarted.
    #[test]
    fn a_prefix_removed_behind_the_agents_back_is_put_back() {
        let mut maps = Small {
            cap: 8,
            ..Small::default()
        };
        let mut sync = MapSync::default();
        let (want, tunnels) = peers(1..=2);
        assert_eq!(sync.sync(&mut maps, &want, &tunnels).unwrap().changes, 4);
        maps.prefixes.remove(&(block(1).addr(), 24));
        let hop = Hop {
            ifindex: 99,
            next_hop: block(9).addr(),
        };
        maps.prefixes.insert((block(2).addr(), 24), hop);
        let out = sync.sync(&mut maps, &want, &tunnels).unwrap();
        assert_eq!(
            out.changes, 3,
            "1 prefix back, 1 changed hop out and back in"
        );
        let have: BTreeMap<Subnet, Hop> = maps
            .prefixes
            .iter()
            .map(|(k, h)| (Subnet::new(k.0, k.1), *h))
            .collect();
        assert_eq!(have, want);
    }

    /// Kernel entries and map entries, logged in the order they change.
    type Log = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

    struct Logged<T> {
        inner: T,
        log: Log,
    }

    impl<T> Logged<T> {
        fn note(&self, what: String) {
            self.log.lock().unwrap().push(what);
        }
    }

    impl Netlink for Logged<crate::fake::FakeNetlink> {
        async fn underlay(
            &mut self,
            local: Ipv4Addr,
        ) -> Result<crate::reconcile::Underlay, NetlinkError> {
            self.inner.underlay(local).await
        }
        async fn ensure_vxlan(
            &mut self,
            spec: &crate::reconcile::VxlanSpec,
        ) -> Result<u32, NetlinkError> {
            self.inner.ensure_vxlan(spec).await
        }
        async fn ensure_bridge(
            &mut self,
            spec: &crate::reconcile::BridgeSpec,
        ) -> Result<u32, NetlinkError> {
            self.inner.ensure_bridge(spec).await
        }
        async fn dump(
            &mut self,
            vxlan: u32,
        ) -> Result<crate::reconcile::KernelState, NetlinkError> {
            self.inner.dump(vxlan).await
        }
        async fn apply(&mut self, vxlan: u32, op: &Op) -> Result<(), NetlinkError> {
            let block = match op {
                Op::AddNeigh(n) | Op::DelNeigh(n) => n.ip,
                Op::AddFdb(f) | Op::DelFdb(f) => Ipv4Addr::from(u32::from_be_bytes([
                    f.mac.0[2], f.mac.0[3], f.mac.0[4], f.mac.0[5],
                ])),
                Op::AddRoute(r) | Op::DelRoute(r) => r.subnet.addr(),
            };
            let kind = if matches!(op, Op::AddNeigh(_) | Op::AddFdb(_) | Op::AddRoute(_)) {
                "add"
            } else {
                "del"
            };
            self.note(format!("kernel {kind} {block}"));
            self.inner.apply(vxlan, op).await
        }
    }

    impl RouteMaps for Logged<Small> {
        fn prefixes(&self) -> Result<Vec<(Ipv4Addr, u8, Hop)>, EbpfError> {
            self.inner.prefixes()
        }
        fn upsert_prefix(&mut self, net: Ipv4Addr, len: u8, hop: Hop) -> Result<(), EbpfError> {
            self.note(format!("map add {net}"));
            self.inner.upsert_prefix(net, len, hop)
        }
        fn remove_prefix(&mut self, net: Ipv4Addr, len: u8) -> Result<(), EbpfError> {
            self.note(format!("map del {net}"));
            self.inner.remove_prefix(net, len)
        }
        fn tunnels(&self) -> Result<Vec<(Ipv4Addr, Tunnel)>, EbpfError> {
            self.inner.tunnels()
        }
        fn upsert_tunnel(&mut self, next_hop: Ipv4Addr, t: Tunnel) -> Result<(), EbpfError> {
            self.note(format!("map add {next_hop}"));
            self.inner.upsert_tunnel(next_hop, t)
        }
        fn remove_tunnel(&mut self, next_hop: Ipv4Addr) -> Result<(), EbpfError> {
            self.note(format!("map del {next_hop}"));
            self.inner.remove_tunnel(next_hop)
        }
    }

    /// A peer leaving loses its map entries before its kernel entries (neighbour, FDB,
    /// route), a peer joining gets them after: no packet is ever sent by the fast path to a
    /// next hop whose neighbour entry is gone (that left INCOMPLETE neighbour entries
    /// behind), as the kernel's own entries are added and removed in reverse.
    #[tokio::test]
    async fn map_entries_go_before_the_kernel_entries_and_come_after_them() {
        let log = Log::default();
        let mut nl = Logged {
            inner: crate::fake::FakeNetlink::default(),
            log: log.clone(),
        };
        let mut maps = Logged {
            inner: Small {
                cap: 8,
                ..Small::default()
            },
            log: log.clone(),
        };
        let mut sync = MapSync::default();
        let now = SystemTime::now();
        let lease = |i: u8| Lease {
            subnet: block(i),
            public_ip: tunnel(i).remote_ip,
            vtep_mac: crate::subnet::Mac(tunnel(i).vtep_mac),
            expires_at: now + std::time::Duration::from_secs(3600),
            revision: 1,
        };
        let mut pass = async |i: u8| {
            let (want, tunnels) = peers([i]);
            let fast = FastPass {
                sync: &mut sync,
                maps: &mut maps,
                want,
                tunnels,
            };
            let out = ordered_pass(
                &mut nl,
                7,
                &block(1),
                &[lease(i)],
                now,
                async { Ok(0) },
                Some(fast),
            )
            .await;
            assert!(out.kernel.is_ok() && out.removed.is_ok() && out.added.is_ok());
            std::mem::take(&mut *log.lock().unwrap())
        };
        let joined = pass(2).await;
        // Peer 2 leaves as peer 3 joins.
        let moved = pass(3).await;
        let at = |log: &[String], what: &str| {
            let is = |l: &&String| l.as_str() == what;
            (
                log.iter().position(|l| is(&l)),
                log.iter().rposition(|l| is(&l)),
            )
        };
        let (b2, b3) = (block(2).addr(), block(3).addr());
        for (log, b) in [(&joined, b2), (&moved, b3)] {
            let (Some(_), Some(kernel_last)) = at(log, &format!("kernel add {b}")) else {
                panic!("no kernel entries for {b}: {log:?}");
            };
            let (Some(map_first), Some(_)) = at(log, &format!("map add {b}")) else {
                panic!("no map entries for {b}: {log:?}");
            };
            assert!(kernel_last < map_first, "added: {log:?}");
        }
        let (Some(kernel_first), Some(_)) = at(&moved, &format!("kernel del {b2}")) else {
            panic!("no kernel removals for {b2}: {moved:?}");
        };
        let (Some(_), Some(map_last)) = at(&moved, &format!("map del {b2}")) else {
            panic!("no map removals for {b2}: {moved:?}");
        };
        assert!(map_last < kernel_first, "removed: {moved:?}");
    }

    /// A pass whose maps (or kernel entries) cannot even be listed failed as a whole: it
    /// did nothing for any peer, and `Agent::start` fails on it (it used to log it and report
    /// ready with no peer routed). One whose failures are some entries' (a refused FDB entry,
    /// a stale map entry that stays) did the rest and fails for those only: the start goes on.
    #[tokio::test]
    async fn a_pass_that_cannot_list_fails_as_a_whole_not_one_with_refused_entries() {
        let now = SystemTime::now();
        let lease = |i: u8| Lease {
            subnet: block(i),
            public_ip: tunnel(i).remote_ip,
            vtep_mac: crate::subnet::Mac(tunnel(i).vtep_mac),
            expires_at: now + std::time::Duration::from_secs(3600),
            revision: 1,
        };
        async fn pass(
            nl: &mut crate::fake::FakeNetlink,
            maps: &mut Small,
            leases: &[Lease],
            now: SystemTime,
        ) -> PassOutcome {
            let mut sync = MapSync::default();
            let (want, tunnels) = peers(leases.iter().map(|l| l.subnet.addr().octets()[2]));
            let fast = FastPass {
                sync: &mut sync,
                maps,
                want,
                tunnels,
            };
            ordered_pass(nl, 7, &block(1), leases, now, async { Ok(0) }, Some(fast)).await
        }
        let peers_ = [lease(2), lease(3)];
        // The maps cannot be listed: the kernel's entries are still made, but the pass
        // failed as a whole.
        let mut nl = crate::fake::FakeNetlink::default();
        let mut maps = Small {
            cap: 8,
            unlistable: true,
            ..Small::default()
        };
        let out = pass(&mut nl, &mut maps, &peers_, now).await;
        assert_eq!(nl.state.routes.len(), 2);
        let err = out.changes().unwrap_err();
        assert!(err.whole, "{err:?}");
        assert!(matches!(err.error, AgentError::FastPath(_)), "{err:?}");
        // The kernel's entries cannot be listed (the maps can): a whole failure too.
        let mut nl = crate::fake::FakeNetlink {
            refuse_dump: true,
            ..Default::default()
        };
        let mut maps = Small {
            cap: 8,
            ..Small::default()
        };
        let err = pass(&mut nl, &mut maps, &peers_, now)
            .await
            .changes()
            .unwrap_err();
        assert!(err.whole, "{err:?}");
        assert!(matches!(err.error, AgentError::Netlink(_)), "{err:?}");
        // One peer's FDB entry refused, and a stale map entry that stays: failures of
        // those entries, not of the pass; the other peer is routed and mapped.
        let mut nl = crate::fake::FakeNetlink {
            refuse_fdb: Some(lease(3).vtep_mac),
            ..Default::default()
        };
        let mut maps = Small {
            cap: 8,
            stuck: true,
            ..Small::default()
        };
        maps.tunnels.insert(block(9).addr(), tunnel(9));
        let err = pass(&mut nl, &mut maps, &peers_, now)
            .await
            .changes()
            .unwrap_err();
        assert!(!err.whole, "{err:?}");
        assert!(maps.prefixes.contains_key(&(block(2).addr(), 24)));
        assert!(nl.state.routes.iter().any(|r| r.subnet == block(2)));
        // Both kinds: the whole failure is the one reported.
        let mut nl = crate::fake::FakeNetlink {
            refuse_fdb: Some(lease(3).vtep_mac),
            ..Default::default()
        };
        let mut maps = Small {
            cap: 8,
            unlistable: true,
            ..Small::default()
        };
        let err = pass(&mut nl, &mut maps, &peers_, now)
            .await
            .changes()
            .unwrap_err();
        assert!(
            err.whole && matches!(err.error, AgentError::FastPath(_)),
            "{err:?}"
        );
        // All well: the changes of each part.
        let mut nl = crate::fake::FakeNetlink::default();
        let mut maps = Small {
            cap: 8,
            ..Small::default()
        };
        let done = pass(&mut nl, &mut maps, &peers_, now)
            .await
            .changes()
            .unwrap();
        assert_eq!(
            done,
            PassChanges {
                kernel: 6,
                direct: 0,
                fast: 4
            }
        );
    }
}
