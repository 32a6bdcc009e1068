//! [`KernelNetlink`]: the [`Netlink`] implementation that talks to the kernel with `rtnetlink`.
//!
//! The socket belongs to the network namespace of the thread that called
//! [`KernelNetlink::connect`], which lets tests drive several namespaces from one process.

use std::net::{IpAddr, Ipv4Addr};

use futures_util::stream::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVxlan, RouteMessageBuilder};

use crate::reconcile::{
    BridgeSpec, Fdb, KernelState, Neigh, Netlink, NetlinkError, Op, Route, Underlay, VxlanSpec,
};
use crate::subnet::{Mac, Subnet};

const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const ENODEV: i32 = 19;

/// [`Netlink`] over a real rtnetlink socket.
#[derive(Debug, Clone)]
pub struct KernelNetlink {
    handle: Handle,
}

fn req(op: &'static str) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    move |source| NetlinkError::Request { op, source }
}

/// The errno of a netlink error reply, if that is what `e` is.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// Turns "no such entry" into success, for idempotent deletes.
fn gone_ok(r: Result<(), rtnetlink::Error>, op: &'static str) -> Result<(), NetlinkError> {
    match r {
        Err(e) if matches!(errno(&e), Some(ENOENT | ESRCH | ENODEV)) => Ok(()),
        r => r.map_err(req(op)),
    }
}

fn link_kind(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

fn vxlan_info(link: &LinkMessage) -> &[InfoVxlan] {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::Data(InfoData::Vxlan(v)) => Some(v.as_slice()),
                _ => None,
            }),
            _ => None,
        })
        .unwrap_or(&[])
}

fn link_mac(link: &LinkMessage) -> Option<Mac> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) => Mac::try_from(b.as_slice()).ok(),
        _ => None,
    })
}

pub(crate) fn link_mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

pub(crate) fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// Whether an existing VXLAN device already has the parameters of `spec` that need a recreate to
/// change.
fn vxlan_matches(link: &LinkMessage, spec: &VxlanSpec) -> bool {
    let info = vxlan_info(link);
    let has = |want: &InfoVxlan| info.iter().any(|i| i == want);
    link_kind(link) == Some(&InfoKind::Vxlan)
        && has(&InfoVxlan::Id(spec.vni))
        && has(&InfoVxlan::Port(spec.port))
        && has(&InfoVxlan::Local(spec.local))
        && has(&InfoVxlan::Learning(false))
        && link_mac(link) == Some(spec.mac)
}

fn neigh_message(vxlan: u32, family: AddressFamily) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = family;
    m.header.ifindex = vxlan;
    m.header.state = NeighbourState::Permanent;
    m
}

fn route_message(vxlan: u32, r: &Route) -> RouteMessage {
    let b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.subnet.addr(), r.subnet.prefix_len())
        .gateway(r.gateway)
        .output_interface(vxlan)
        .onlink();
    with_src(b, r.src).build()
}

/// `b` with the preferred source `src`, if any.
pub(crate) fn with_src(
    b: RouteMessageBuilder<Ipv4Addr>,
    src: Option<Ipv4Addr>,
) -> RouteMessageBuilder<Ipv4Addr> {
    match src {
        Some(src) => b.pref_source(src),
        None => b,
    }
}

/// A route message's preferred source (`src`), if any.
pub(crate) fn pref_source(r: &RouteMessage) -> Option<Ipv4Addr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

impl KernelNetlink {
    /// Opens an rtnetlink socket in the calling thread's network namespace and spawns its
    /// connection task on the current tokio runtime.
    pub fn connect() -> Result<KernelNetlink, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        tokio::spawn(conn);
        Ok(KernelNetlink { handle })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The device the kernel sends packets for `dst` out of (`ip route get`), if it has a
    /// route to it.
    pub async fn egress_of(&self, dst: Ipv4Addr) -> Result<Option<u32>, NetlinkError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .build();
        let mut answer = self.handle.route().get(msg).execute();
        match answer.try_next().await {
            Ok(Some(r)) => Ok(r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })),
            Ok(None) => Ok(None),
            // No route: ENETUNREACH / EHOSTUNREACH.
            Err(e) if matches!(errno(&e), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)) => Ok(None),
            Err(e) => Err(req("get route")(e)),
        }
    }

    /// The device of the main table's IPv4 default route (of its first path), if there is one.
    async fn default_route_link(&self) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut oif = None;
        while let Some(r) = routes.try_next().await.map_err(req("get routes"))? {
            if r.header.destination_prefix_length != 0
                || r.header.table != RouteHeader::RT_TABLE_MAIN
            {
                continue;
            }
            // One path, or the first of several (ECMP uplinks share an MTU as a rule).
            oif = oif.or(r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                RouteAttribute::MultiPath(hops) => hops.first().map(|h| h.interface_index),
                _ => None,
            }));
        }
        let Some(oif) = oif else { return Ok(None) };
        let mut links = self.handle.link().get().match_index(oif).execute();
        links.try_next().await.map_err(req("get link"))
    }

    /// The link called `name`, if any.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(req("get link")(e)),
        }
    }

    async fn must_link(&self, name: &str) -> Result<LinkMessage, NetlinkError> {
        self.link_by_name(name)
            .await?
            .ok_or_else(|| NetlinkError::Missing { name: name.into() })
    }

    /// Deletes every main-table route on `vxlan` that reads as `r`, each with the message the
    /// kernel dumped for it. The kernel matches a delete on the protocol, scope, type, TOS and
    /// metric it names too: one built here (protocol static) misses a route another tool or
    /// an older agent added (`ip route` adds protocol boot), gets ESRCH, which reads as
    /// "already gone", and the route stayed for ever, planned for removal on every pass.
    async fn del_route(&self, vxlan: u32, r: &Route) -> Result<(), NetlinkError> {
        let mut found = Vec::new();
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(m) = routes.try_next().await.map_err(req("get routes"))? {
            if vxlan_route(&m, vxlan).as_ref() == Some(r) {
                found.push(m);
            }
        }
        for m in found {
            gone_ok(self.handle.route().del(m).execute().await, "delete route")?;
        }
        Ok(())
    }

    async fn set_mtu_up(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(req("set link"))
    }
}

impl Netlink for KernelNetlink {
    async fn underlay(&mut self, local: Ipv4Addr) -> Result<Underlay, NetlinkError> {
        let mut addrs = self.handle.address().get().execute();
        let mut index = None;
        while let Some(a) = addrs.try_next().await.map_err(req("get addresses"))? {
            let holds = a.attributes.iter().any(|attr| {
                matches!(attr, AddressAttribute::Address(IpAddr::V4(ip))
                    | AddressAttribute::Local(IpAddr::V4(ip)) if *ip == local)
            });
            if holds {
                index = Some(a.header.index);
            }
        }
        let ifindex = index.ok_or(NetlinkError::NoUnderlay { addr: local })?;
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        let link = links
            .try_next()
            .await
            .map_err(req("get link"))?
            .ok_or(NetlinkError::NoUnderlay { addr: local })?;
        // A routed host keeps its address on `lo`, whose MTU (64 KiB) says nothing about the
        // network: as flannel does, the device of the default route is the underlay then.
        if link.header.flags.contains(LinkFlags::Loopback) {
            if let Some(l) = self.default_route_link().await? {
                return Ok(Underlay {
                    ifindex: l.header.index,
                    mtu: link_mtu(&l).unwrap_or(1500),
                });
            }
        }
        Ok(Underlay {
            ifindex,
            mtu: link_mtu(&link).unwrap_or(1500),
        })
    }

    async fn ensure_vxlan(&mut self, spec: &VxlanSpec) -> Result<u32, NetlinkError> {
        if let Some(link) = self.link_by_name(&spec.name).await? {
            if vxlan_matches(&link, spec) {
                self.set_mtu_up(link.header.index, spec.mtu).await?;
                return Ok(link.header.index);
            }
            tracing::info!(name = %spec.name, "replacing VXLAN device with different settings");
            gone_ok(
                self.handle.link().del(link.header.index).execute().await,
                "delete link",
            )?;
        }
        let msg = LinkVxlan::new(&spec.name, spec.vni)
            .port(spec.port)
            .local(spec.local)
            .dev(spec.underlay)
            .learning(false)
            .mtu(spec.mtu)
            .address(spec.mac.octets().to_vec())
            .up()
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(req("add vxlan"))?;
        Ok(self.must_link(&spec.name).await?.header.index)
    }

    async fn ensure_bridge(&mut self, spec: &BridgeSpec) -> Result<u32, NetlinkError> {
        let link = match self.link_by_name(&spec.name).await? {
            Some(link) if link_kind(&link) == Some(&InfoKind::Bridge) => link,
            Some(_) => {
                return Err(NetlinkError::WrongKind {
                    name: spec.name.clone(),
                    kind: "bridge",
                })
            }
            None => {
                self.handle
                    .link()
                    .add(LinkBridge::new(&spec.name).build())
                    .execute()
                    .await
                    .map_err(req("add bridge"))?;
                self.must_link(&spec.name).await?
            }
        };
        let index = link.header.index;
        // A fixed MAC: a bridge without one takes the lowest MAC of its ports and changes it as
        // jobs come and go, which would leave the fast path's gateway MAC (and jobs' ARP caches)
        // stale. Only what differs is set: setting even the same MAC again flushes the bridge's
        // neighbour table (this runs on every resync).
        let mac = Mac::for_bridge(spec.address);
        let mut set = LinkUnspec::new_with_index(index);
        let mut change = false;
        if link_mtu(&link) != Some(spec.mtu) {
            set = set.mtu(spec.mtu);
            change = true;
        }
        if link_mac(&link) != Some(mac) {
            set = set.address(mac.octets().to_vec());
            change = true;
        }
        if !link.header.flags.contains(LinkFlags::Up) {
            set = set.up();
            change = true;
        }
        if change {
            self.handle
                .link()
                .set(set.build())
                .execute()
                .await
                .map_err(req("set bridge"))?;
        }

        let want = IpAddr::V4(spec.address);
        let mut present = false;
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut stale = Vec::new();
        while let Some(a) = addrs.try_next().await.map_err(req("get addresses"))? {
            if a.header.family != AddressFamily::Inet {
                continue;
            }
            let ip = a.attributes.iter().find_map(|attr| match attr {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if ip == Some(want) && a.header.prefix_len == spec.prefix_len {
                present = true;
            } else {
                stale.push(a);
            }
        }
        for a in stale {
            gone_ok(
                self.handle.address().del(a).execute().await,
                "delete address",
            )?;
        }
        if !present {
            self.handle
                .address()
                .add(index, want, spec.prefix_len)
                .execute()
                .await
                .map_err(req("add address"))?;
        }
        Ok(index)
    }

    async fn dump(&mut self, vxlan: u32) -> Result<KernelState, NetlinkError> {
        let mut state = KernelState::default();

        let mut neighs = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute();
        while let Some(n) = neighs.try_next().await.map_err(req("get neighbours"))? {
            if n.header.ifindex != vxlan || n.header.state != NeighbourState::Permanent {
                continue;
            }
            if let (Some(ip), Some(mac)) = neigh_dst_mac(&n) {
                state.neighs.push(Neigh { ip, mac });
            }
        }

        let mut fdbs = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute();
        while let Some(n) = fdbs.try_next().await.map_err(req("get fdb"))? {
            if n.header.ifindex != vxlan {
                continue;
            }
            if let (Some(dst), Some(mac)) = neigh_dst_mac(&n) {
                state.fdbs.push(Fdb { mac, dst });
            }
        }

        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(r) = routes.try_next().await.map_err(req("get routes"))? {
            if let Some(route) = vxlan_route(&r, vxlan) {
                state.routes.push(route);
            }
        }
        Ok(state)
    }

    async fn apply(&mut self, vxlan: u32, op: &Op) -> Result<(), NetlinkError> {
        let nb = self.handle.neighbours();
        match *op {
            Op::AddNeigh(n) => nb
                .add(vxlan, IpAddr::V4(n.ip))
                .link_layer_address(&n.mac.octets())
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(req("add neighbour")),
            Op::AddFdb(f) => nb
                .add_bridge(vxlan, &f.mac.octets())
                .destination(IpAddr::V4(f.dst))
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(req("add fdb")),
            Op::AddRoute(r) => self
                .handle
                .route()
                .add(route_message(vxlan, &r))
                .replace()
                .execute()
                .await
                .map_err(req("add route")),
            Op::DelRoute(r) => self.del_route(vxlan, &r).await,
            Op::DelFdb(f) => {
                let mut m = neigh_message(vxlan, AddressFamily::Bridge);
                m.header.flags = NeighbourFlags::Own;
                m.attributes = vec![
                    NeighbourAttribute::LinkLayerAddress(f.mac.octets().to_vec()),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(f.dst)),
                ];
                gone_ok(nb.del(m).execute().await, "delete fdb")
            }
            Op::DelNeigh(n) => {
                let mut m = neigh_message(vxlan, AddressFamily::Inet);
                m.attributes = vec![NeighbourAttribute::Destination(NeighbourAddress::Inet(
                    n.ip,
                ))];
                gone_ok(nb.del(m).execute().await, "delete neighbour")
            }
        }
    }
}

fn neigh_dst_mac(n: &NeighbourMessage) -> (Option<Ipv4Addr>, Option<Mac>) {
    let mut dst = None;
    let mut mac = None;
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => dst = Some(*ip),
            // Bridge-family (FDB) entries carry NDA_DST undecoded.
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                dst = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from);
            }
            NeighbourAttribute::LinkLayerAddress(b) => mac = Mac::try_from(b.as_slice()).ok(),
            _ => {}
        }
    }
    (dst, mac)
}

/// A main-table IPv4 route out of `vxlan` with a gateway, as [`Route`].
fn vxlan_route(r: &RouteMessage, vxlan: u32) -> Option<Route> {
    let mut table = u32::from(r.header.table);
    let (mut oif, mut dst, mut gw) = (None, None, None);
    for a in &r.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gw = Some(*ip),
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || oif != Some(vxlan) {
        return None;
    }
    Some(Route {
        subnet: Subnet::new(dst?, r.header.destination_prefix_length),
        gateway: gw?,
        src: pref_source(r),
    })
}
