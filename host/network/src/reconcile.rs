//! Making the kernel match the lease set: the [`Netlink`] boundary, the pure [`plan`] and
//! [`reconcile`] / [`setup`] that drive it (flannel's vxlan backend, with MACs compared too).
//!
//! Per remote lease the VXLAN device carries, added in this order and removed in reverse:
//! a permanent neighbour entry (block network address → peer VTEP MAC), a permanent FDB entry
//! (peer VTEP MAC → peer underlay IP) and a route (block via its network address, onlink).

use std::collections::BTreeSet;
use std::future::Future;
use std::net::Ipv4Addr;
use std::time::SystemTime;

use crate::lease::Lease;
use crate::subnet::{Mac, Subnet};

/// VXLAN header overhead subtracted from the underlay MTU (IPv4 outer header).
pub const VXLAN_OVERHEAD: u32 = 50;

/// A permanent IPv4 neighbour entry on the VXLAN device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Neigh {
    pub ip: Ipv4Addr,
    pub mac: Mac,
}

/// A permanent bridge FDB entry on the VXLAN device: frames to `mac` go to underlay IP `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fdb {
    pub mac: Mac,
    pub dst: Ipv4Addr,
}

/// A route to a remote block through the VXLAN device, `via gateway onlink src src` (a
/// direct route: through the underlay device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub subnet: Subnet,
    pub gateway: Ipv4Addr,
    /// The preferred source: this host's bridge address. Without it the host's own traffic
    /// to other hosts' jobs (the router's, flynn-host's) would leave with its underlay
    /// address, and the replies would not come back through the overlay: a job's reply to a
    /// non-overlay address is masqueraded, and with the fast path the request never passed
    /// that host's conntrack, so the reply is a new flow to it.
    pub src: Option<Ipv4Addr>,
}

/// The overlay entries currently on the VXLAN device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    pub neighs: Vec<Neigh>,
    pub fdbs: Vec<Fdb>,
    pub routes: Vec<Route>,
}

/// One change to the VXLAN device's entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    AddNeigh(Neigh),
    AddFdb(Fdb),
    AddRoute(Route),
    DelRoute(Route),
    DelFdb(Fdb),
    DelNeigh(Neigh),
}

/// The VXLAN device to create or adopt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    /// Underlay address packets are sent from.
    pub local: Ipv4Addr,
    /// Underlay interface index.
    pub underlay: u32,
    pub mac: Mac,
    pub mtu: u32,
}

/// The bridge local jobs attach to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeSpec {
    pub name: String,
    /// Gateway address of the host's block, with the block's prefix length.
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub mtu: u32,
}

/// The interface holding the underlay address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Underlay {
    pub ifindex: u32,
    pub mtu: u32,
}

/// Why a netlink operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("could not open a netlink socket")]
    Connect(#[source] std::io::Error),
    #[error("netlink request {op} failed")]
    Request {
        op: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no interface has the underlay address {addr}")]
    NoUnderlay { addr: Ipv4Addr },
    #[error("interface {name} exists but is not a {kind}")]
    WrongKind { name: String, kind: &'static str },
    #[error("interface {name} not found after creating it")]
    Missing { name: String },
}

/// The kernel operations the overlay needs; [`crate::KernelNetlink`] talks to the kernel,
/// [`crate::FakeNetlink`] records for tests.
pub trait Netlink: Send {
    /// The interface that holds `local` and its MTU.
    fn underlay(
        &mut self,
        local: Ipv4Addr,
    ) -> impl Future<Output = Result<Underlay, NetlinkError>> + Send;
    /// Creates the VXLAN device or adopts a matching one (recreating it when its VNI, port, local
    /// address or learning flag differ); sets MAC and MTU and brings it up. Returns its index.
    fn ensure_vxlan(
        &mut self,
        spec: &VxlanSpec,
    ) -> impl Future<Output = Result<u32, NetlinkError>> + Send;
    /// Creates or adopts the bridge, sets its MTU, address (removing other IPv4 addresses) and
    /// brings it up. Returns its index.
    fn ensure_bridge(
        &mut self,
        spec: &BridgeSpec,
    ) -> impl Future<Output = Result<u32, NetlinkError>> + Send;
    /// Permanent neighbours, FDB entries with a destination, and main-table routes of `vxlan`.
    fn dump(
        &mut self,
        vxlan: u32,
    ) -> impl Future<Output = Result<KernelState, NetlinkError>> + Send;
    /// Applies one change on device `vxlan`. Adds replace an existing entry; deleting an entry
    /// that is already gone succeeds.
    fn apply(
        &mut self,
        vxlan: u32,
        op: &Op,
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;
}

/// The entries a set of remote leases calls for; routes prefer source `src`.
pub fn desired(remote: &[&Lease], src: Ipv4Addr) -> KernelState {
    let mut state = KernelState::default();
    for l in remote {
        let gw = l.subnet.addr();
        state.neighs.push(Neigh {
            ip: gw,
            mac: l.vtep_mac,
        });
        state.fdbs.push(Fdb {
            mac: l.vtep_mac,
            dst: l.public_ip,
        });
        state.routes.push(Route {
            subnet: l.subnet,
            gateway: gw,
            src: Some(src),
        });
    }
    state
}

fn set<T: Ord + Copy>(v: &[T]) -> BTreeSet<T> {
    v.iter().copied().collect()
}

/// The changes that turn `actual` into the entries for `remote` leases.
///
/// Removals come first, routes then FDB then neighbours; then, lease by lease in address order,
/// missing neighbour, FDB and route entries are added. An entry that differs (a peer's MAC or
/// underlay IP changed) is removed and re-added.
pub fn plan(actual: &KernelState, remote: &[&Lease], src: Ipv4Addr) -> Vec<Op> {
    let want = desired(remote, src);
    let (want_n, want_f, want_r) = (set(&want.neighs), set(&want.fdbs), set(&want.routes));
    let (have_n, have_f, have_r) = (set(&actual.neighs), set(&actual.fdbs), set(&actual.routes));

    let mut ops = Vec::new();
    // A route to a block still wanted is replaced in place by its add (`NLM_F_REPLACE`:
    // the kernel keys it by prefix), not removed first: removing it would send the block's
    // traffic to the default route until the add.
    let wanted = |r: &Route| want_r.iter().any(|w| w.subnet == r.subnet);
    ops.extend(
        have_r
            .difference(&want_r)
            .filter(|r| !wanted(r))
            .map(|r| Op::DelRoute(*r)),
    );
    ops.extend(have_f.difference(&want_f).map(|f| Op::DelFdb(*f)));
    ops.extend(have_n.difference(&want_n).map(|n| Op::DelNeigh(*n)));

    let mut order: Vec<usize> = (0..remote.len()).collect();
    order.sort_by_key(|&i| remote[i].subnet);
    for i in order {
        let (n, f, r) = (want.neighs[i], want.fdbs[i], want.routes[i]);
        if !have_n.contains(&n) {
            ops.push(Op::AddNeigh(n));
        }
        if !have_f.contains(&f) {
            ops.push(Op::AddFdb(f));
        }
        if !have_r.contains(&r) {
            ops.push(Op::AddRoute(r));
        }
    }
    ops
}

/// Devices configured by [`setup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Devices {
    pub vxlan: u32,
    pub bridge: u32,
    /// MTU of the overlay (underlay − [`VXLAN_OVERHEAD`]): jobs' routes beyond their block carry
    /// it. The bridge and the jobs' veths run at [`crate::job::LOCAL_MTU`].
    pub mtu: u32,
}

/// Device names and VXLAN parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub vxlan_name: String,
    pub bridge_name: String,
    pub vni: u32,
    pub port: u16,
}

impl Default for DeviceConfig {
    fn default() -> DeviceConfig {
        DeviceConfig {
            vxlan_name: "flynn.1".into(),
            bridge_name: "flynnbr0".into(),
            vni: 1,
            port: 8472,
        }
    }
}

/// Creates or adopts the VXLAN device and the bridge for this host's `lease`.
pub async fn setup<N: Netlink>(
    nl: &mut N,
    config: &DeviceConfig,
    lease: &Lease,
) -> Result<Devices, NetlinkError> {
    let underlay = nl.underlay(lease.public_ip).await?;
    let mtu = underlay.mtu.saturating_sub(VXLAN_OVERHEAD);
    let vxlan = nl
        .ensure_vxlan(&VxlanSpec {
            name: config.vxlan_name.clone(),
            vni: config.vni,
            port: config.port,
            local: lease.public_ip,
            underlay: underlay.ifindex,
            mac: lease.vtep_mac,
            mtu,
        })
        .await?;
    let bridge = nl
        .ensure_bridge(&BridgeSpec {
            name: config.bridge_name.clone(),
            address: lease.subnet.first_host(),
            prefix_len: lease.subnet.prefix_len(),
            mtu: crate::job::LOCAL_MTU,
        })
        .await?;
    Ok(Devices { vxlan, bridge, mtu })
}

/// Makes the entries on `vxlan` match `leases`: every live lease except `own` (this host's block).
/// Returns the changes applied (empty when the kernel already matched).
pub async fn reconcile<N: Netlink>(
    nl: &mut N,
    vxlan: u32,
    own: &Subnet,
    leases: &[Lease],
    now: SystemTime,
) -> Result<Vec<Op>, NetlinkError> {
    reconcile_part(nl, vxlan, own, leases, now)
        .await
        .map_err(|e| e.error)
}

/// A failed part of a reconcile pass (the VXLAN device's entries, the direct routes, the
/// fast path's maps): `listing` when what is there could not even be listed, so the part
/// changed nothing, for no peer (a failure of the whole pass); else some entries' changes
/// failed (one peer's bad record, a full map) and the others were made.
#[derive(Debug)]
pub(crate) struct PartError<E> {
    pub error: E,
    pub listing: bool,
}

impl<E> PartError<E> {
    pub fn listing(error: E) -> PartError<E> {
        PartError {
            error,
            listing: true,
        }
    }

    pub fn entries(error: E) -> PartError<E> {
        PartError {
            error,
            listing: false,
        }
    }

    pub fn map<F>(self, f: impl FnOnce(E) -> F) -> PartError<F> {
        PartError {
            error: f(self.error),
            listing: self.listing,
        }
    }
}

/// [`reconcile`], telling a failed dump (the whole part) from failed changes.
pub(crate) async fn reconcile_part<N: Netlink>(
    nl: &mut N,
    vxlan: u32,
    own: &Subnet,
    leases: &[Lease],
    now: SystemTime,
) -> Result<Vec<Op>, PartError<NetlinkError>> {
    let remote: Vec<&Lease> = leases
        .iter()
        .filter(|l| l.subnet != *own && !l.is_expired(now))
        .collect();
    let actual = nl.dump(vxlan).await.map_err(PartError::listing)?;
    let ops = plan(&actual, &remote, own.first_host());
    // A change the kernel refuses (one peer's bad record) does not hold back the others';
    // the first failure is reported once all were tried, and the next pass tries it again.
    let mut failed = None;
    for op in &ops {
        tracing::debug!(?op, "overlay change");
        if let Err(e) = nl.apply(vxlan, op).await {
            tracing::warn!(?op, error = %e, "overlay change failed");
            failed.get_or_insert(e);
        }
    }
    if let Some(e) = failed {
        return Err(PartError::entries(e));
    }
    if !ops.is_empty() {
        tracing::info!(
            changes = ops.len(),
            peers = remote.len(),
            "overlay reconciled"
        );
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeNetlink, FAKE_VXLAN_INDEX};
    use std::time::Duration;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)
    }

    fn lease(third: u8, host: u8) -> Lease {
        let subnet = Subnet::new(Ipv4Addr::new(100, 100, third, 0), 24);
        Lease {
            subnet,
            public_ip: Ipv4Addr::new(10, 0, 0, host),
            vtep_mac: Mac::for_subnet(&subnet),
            expires_at: now() + Duration::from_secs(60),
            revision: 1,
        }
    }

    fn own() -> Subnet {
        lease(1, 1).subnet
    }

    async fn run(nl: &mut FakeNetlink, leases: &[Lease]) -> Vec<Op> {
        reconcile(nl, FAKE_VXLAN_INDEX, &own(), leases, now())
            .await
            .unwrap()
    }

    fn entries(l: &Lease) -> (Neigh, Fdb, Route) {
        let gw = l.subnet.addr();
        (
            Neigh {
                ip: gw,
                mac: l.vtep_mac,
            },
            Fdb {
                mac: l.vtep_mac,
                dst: l.public_ip,
            },
            Route {
                subnet: l.subnet,
                gateway: gw,
                src: Some(own().first_host()),
            },
        )
    }

    /// A route that differs only in its attributes (an agent from before routes had a
    /// `src`) is replaced by the add, never removed first (the block would be unreachable
    /// in between).
    #[test]
    fn a_changed_route_is_replaced_not_removed() {
        let l = lease(2, 2);
        let (n, f, r) = entries(&l);
        let old = Route { src: None, ..r };
        let actual = KernelState {
            neighs: vec![n],
            fdbs: vec![f],
            routes: vec![old],
        };
        assert_eq!(
            plan(&actual, &[&l], own().first_host()),
            vec![Op::AddRoute(r)]
        );
    }

    #[tokio::test]
    async fn a_refused_entry_does_not_hold_back_the_other_peers() {
        let mut nl = FakeNetlink::default();
        let (bad, good) = (lease(2, 2), lease(3, 3));
        nl.refuse_fdb = Some(bad.vtep_mac);
        let r = reconcile(
            &mut nl,
            FAKE_VXLAN_INDEX,
            &own(),
            &[bad.clone(), good.clone()],
            now(),
        )
        .await;
        assert!(r.is_err(), "the failure is still reported");
        let (n, f, route) = entries(&good);
        assert!(nl.state.neighs.contains(&n));
        assert!(nl.state.fdbs.contains(&f));
        assert!(nl.state.routes.contains(&route));
        // The refused peer's FDB entry is missing; the next pass tries it again.
        let (_, bad_fdb, _) = entries(&bad);
        assert!(!nl.state.fdbs.contains(&bad_fdb));
        nl.refuse_fdb = None;
        run(&mut nl, &[bad.clone(), good]).await;
        assert!(nl.state.fdbs.contains(&bad_fdb));
    }

    #[tokio::test]
    async fn adds_neigh_fdb_route_in_order_and_skips_own_lease() {
        let mut nl = FakeNetlink::default();
        let (b, c) = (lease(3, 3), lease(2, 2));
        let ops = run(&mut nl, &[lease(1, 1), b.clone(), c.clone()]).await;
        let (bn, bf, br) = entries(&b);
        let (cn, cf, cr) = entries(&c);
        assert_eq!(
            ops,
            vec![
                Op::AddNeigh(cn),
                Op::AddFdb(cf),
                Op::AddRoute(cr),
                Op::AddNeigh(bn),
                Op::AddFdb(bf),
                Op::AddRoute(br),
            ]
        );
    }

    #[tokio::test]
    async fn second_run_is_a_no_op() {
        let mut nl = FakeNetlink::default();
        let leases = [lease(1, 1), lease(2, 2), lease(3, 3)];
        assert_eq!(run(&mut nl, &leases).await.len(), 6);
        assert!(run(&mut nl, &leases).await.is_empty());
        assert_eq!(
            nl.state,
            desired(&[&leases[1], &leases[2]], own().first_host()).sorted()
        );
    }

    #[tokio::test]
    async fn removed_or_expired_lease_is_torn_down_in_reverse() {
        let mut nl = FakeNetlink::default();
        let (b, c) = (lease(2, 2), lease(3, 3));
        run(&mut nl, &[b.clone(), c.clone()]).await;
        let (cn, cf, cr) = entries(&c);
        assert_eq!(
            run(&mut nl, std::slice::from_ref(&b)).await,
            vec![Op::DelRoute(cr), Op::DelFdb(cf), Op::DelNeigh(cn)]
        );
        let expired = Lease {
            expires_at: now(),
            ..b.clone()
        };
        let (bn, bf, br) = entries(&b);
        assert_eq!(
            run(&mut nl, &[expired]).await,
            vec![Op::DelRoute(br), Op::DelFdb(bf), Op::DelNeigh(bn)]
        );
        assert_eq!(nl.state, KernelState::default());
    }

    #[tokio::test]
    async fn changed_mac_or_underlay_ip_is_replaced() {
        let mut nl = FakeNetlink::default();
        let b = lease(2, 2);
        run(&mut nl, std::slice::from_ref(&b)).await;
        // Peer moved to another underlay IP: only the FDB entry changes.
        let moved = Lease {
            public_ip: Ipv4Addr::new(10, 0, 0, 9),
            ..b.clone()
        };
        let (_, old_f, _) = entries(&b);
        let (_, new_f, _) = entries(&moved);
        assert_eq!(
            run(&mut nl, std::slice::from_ref(&moved)).await,
            vec![Op::DelFdb(old_f), Op::AddFdb(new_f)]
        );
        // Peer came back with another MAC (e.g. a flannel-style random one): neighbour and FDB.
        let remac = Lease {
            vtep_mac: Mac([0x0e, 0, 0, 0, 0, 1]),
            ..moved.clone()
        };
        let (old_n, _, _) = entries(&moved);
        let (new_n, new_f2, _) = entries(&remac);
        assert_eq!(
            run(&mut nl, std::slice::from_ref(&remac)).await,
            vec![
                Op::DelFdb(new_f),
                Op::DelNeigh(old_n),
                Op::AddNeigh(new_n),
                Op::AddFdb(new_f2)
            ]
        );
        assert!(run(&mut nl, &[remac]).await.is_empty());
    }

    #[tokio::test]
    async fn stray_entries_not_backed_by_a_lease_are_removed() {
        let mut nl = FakeNetlink::default();
        let stray = lease(7, 7);
        let (n, f, r) = entries(&stray);
        nl.state = KernelState {
            neighs: vec![n],
            fdbs: vec![f],
            routes: vec![r],
        };
        assert_eq!(
            run(&mut nl, &[]).await,
            vec![Op::DelRoute(r), Op::DelFdb(f), Op::DelNeigh(n)]
        );
    }

    #[tokio::test]
    async fn setup_derives_mtu_mac_and_gateway_from_the_lease() {
        let mut nl = FakeNetlink::default();
        nl.underlay.mtu = 9000;
        let l = lease(4, 4);
        let dev = setup(&mut nl, &DeviceConfig::default(), &l).await.unwrap();
        assert_eq!(dev.mtu, 8950);
        let vx = nl.vxlan.unwrap();
        assert_eq!((vx.vni, vx.port, vx.mtu), (1, 8472, 8950));
        assert_eq!((vx.local, vx.mac), (l.public_ip, l.vtep_mac));
        let br = nl.bridge.unwrap();
        assert_eq!(br.address, Ipv4Addr::new(100, 100, 4, 1));
        assert_eq!((br.prefix_len, br.mtu), (24, crate::job::LOCAL_MTU));
    }

    impl KernelState {
        fn sorted(mut self) -> KernelState {
            self.neighs.sort();
            self.fdbs.sort();
            self.routes.sort();
            self
        }
    }
}
