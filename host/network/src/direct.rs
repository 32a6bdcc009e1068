//! DirectRouting (flannel's `DirectRouting` option): a peer whose underlay address is on this
//! host's own L2 segment is reached with a plain route, `block via <peer public IP> dev <underlay>`,
//! without encapsulation. Such routes carry the protocol [`DIRECT_PROTO`] so the agent finds (and
//! removes) exactly its own routes and never touches others on the underlay interface.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use futures_util::stream::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;

use crate::kernel::KernelNetlink;
use crate::lease::Lease;
use crate::reconcile::{NetlinkError, PartError, Route};
use crate::subnet::Subnet;

/// Route protocol number marking direct routes (`ip route` shows `proto 102`).
pub const DIRECT_PROTO: u8 = 102;

fn req(op: &'static str) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    move |source| NetlinkError::Request { op, source }
}

/// The underlay interface: index and the connected network of the address `local`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub ifindex: u32,
    pub net: Subnet,
}

/// Direct routes `remote` leases call for: those whose public IP lies in `segment`, with
/// preferred source `src` (this host's bridge address, as for tunnelled routes).
pub fn direct_routes(segment: &Segment, remote: &[&Lease], src: Ipv4Addr) -> BTreeSet<Route> {
    remote
        .iter()
        .filter(|l| segment.net.contains(l.public_ip))
        .map(|l| Route {
            subnet: l.subnet,
            gateway: l.public_ip,
            src: Some(src),
        })
        .collect()
}

fn message(ifindex: u32, r: &Route) -> RouteMessage {
    let b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.subnet.addr(), r.subnet.prefix_len())
        .gateway(r.gateway)
        .output_interface(ifindex)
        .protocol(RouteProtocol::Other(DIRECT_PROTO));
    crate::kernel::with_src(b, r.src).build()
}

impl KernelNetlink {
    /// The interface holding `local` and the network of that address.
    pub async fn segment(&self, local: Ipv4Addr) -> Result<Segment, NetlinkError> {
        let mut addrs = self.handle().address().get().execute();
        while let Some(a) = addrs.try_next().await.map_err(req("get addresses"))? {
            if a.header.family != AddressFamily::Inet {
                continue;
            }
            let holds = a.attributes.iter().any(|attr| {
                matches!(attr, AddressAttribute::Address(IpAddr::V4(ip))
                    | AddressAttribute::Local(IpAddr::V4(ip)) if *ip == local)
            });
            if holds {
                return Ok(Segment {
                    ifindex: a.header.index,
                    net: Subnet::new(local, a.header.prefix_len),
                });
            }
        }
        Err(NetlinkError::NoUnderlay { addr: local })
    }

    /// Direct routes of this agent on `ifindex` (main table, protocol [`DIRECT_PROTO`]).
    pub async fn direct_routes(&self, ifindex: u32) -> Result<BTreeSet<Route>, NetlinkError> {
        let mut out = BTreeSet::new();
        let mut routes = self
            .handle()
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(r) = routes.try_next().await.map_err(req("get routes"))? {
            if r.header.protocol != RouteProtocol::Other(DIRECT_PROTO)
                || r.header.table != RouteHeader::RT_TABLE_MAIN
            {
                continue;
            }
            let (mut oif, mut dst, mut gw) = (None, None, None);
            for a in &r.attributes {
                match a {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gw = Some(*ip),
                    _ => {}
                }
            }
            if let (Some(i), Some(dst), Some(gw)) = (oif, dst, gw) {
                if i == ifindex {
                    out.insert(Route {
                        subnet: Subnet::new(dst, r.header.destination_prefix_length),
                        gateway: gw,
                        src: crate::kernel::pref_source(&r),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Makes the direct routes on `ifindex` equal `want`; returns how many changes were made.
    /// A route the kernel refuses (one peer's bad record) does not hold back the others: it
    /// is logged, the rest are still changed, and the first failure is returned at the end
    /// (the next pass tries it again).
    pub async fn sync_direct_routes(
        &self,
        ifindex: u32,
        want: &BTreeSet<Route>,
    ) -> Result<usize, NetlinkError> {
        self.sync_direct_routes_part(ifindex, want)
            .await
            .map_err(|e| e.error)
    }

    /// [`KernelNetlink::sync_direct_routes`], telling a failed listing (the whole part) from
    /// failed changes.
    pub(crate) async fn sync_direct_routes_part(
        &self,
        ifindex: u32,
        want: &BTreeSet<Route>,
    ) -> Result<usize, PartError<NetlinkError>> {
        let have = self
            .direct_routes(ifindex)
            .await
            .map_err(PartError::listing)?;
        let mut changes = 0;
        let mut failed = None;
        // One to a block still wanted is replaced in place by its add below, not removed
        // first (as for tunnelled routes).
        let wanted = |r: &Route| want.iter().any(|w| w.subnet == r.subnet);
        for r in have.difference(want).filter(|r| !wanted(r)) {
            match self
                .handle()
                .route()
                .del(message(ifindex, r))
                .execute()
                .await
            {
                Err(rtnetlink::Error::NetlinkError(m))
                    if matches!(-m.raw_code(), libc::ESRCH | libc::ENOENT) =>
                {
                    changes += 1
                }
                Err(e) => {
                    tracing::warn!(route = ?r, error = %e, "deleting a direct route failed");
                    failed.get_or_insert(req("delete direct route")(e));
                }
                Ok(()) => changes += 1,
            }
        }
        for r in want.difference(&have) {
            let added = self
                .handle()
                .route()
                .add(message(ifindex, r))
                .replace()
                .execute()
                .await;
            match added {
                Ok(()) => changes += 1,
                Err(e) => {
                    tracing::warn!(route = ?r, error = %e, "adding a direct route failed");
                    failed.get_or_insert(req("add direct route")(e));
                }
            }
        }
        match failed {
            Some(e) => Err(PartError::entries(e)),
            None => Ok(changes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subnet::Mac;
    use std::time::SystemTime;

    fn lease(block: &str, ip: &str) -> Lease {
        let subnet: Subnet = block.parse().unwrap();
        Lease {
            subnet,
            public_ip: ip.parse().unwrap(),
            vtep_mac: Mac::for_subnet(&subnet),
            expires_at: SystemTime::UNIX_EPOCH,
            revision: 1,
        }
    }

    #[test]
    fn only_peers_on_our_segment_go_direct() {
        let seg = Segment {
            ifindex: 2,
            net: "10.0.0.0/24".parse().unwrap(),
        };
        let near = lease("100.100.2.0/24", "10.0.0.2");
        let far = lease("100.100.3.0/24", "10.0.1.3");
        let src = "100.100.1.1".parse().unwrap();
        let got = direct_routes(&seg, &[&near, &far], src);
        let want: BTreeSet<Route> = [Route {
            subnet: near.subnet,
            gateway: near.public_ip,
            src: Some(src),
        }]
        .into();
        assert_eq!(got, want);
    }
}
