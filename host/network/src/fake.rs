//! [`FakeNetlink`]: an in-memory [`Netlink`] that records every call, for tests of the reconcile
//! logic and of callers (like youki's `syscall/test.rs`).

use std::net::Ipv4Addr;

use crate::subnet::Mac;

use crate::reconcile::{
    BridgeSpec, Fdb, KernelState, Neigh, Netlink, NetlinkError, Op, Route, Underlay, VxlanSpec,
};

/// Fake kernel: holds the entries of one VXLAN device and logs applied ops.
#[derive(Debug, Clone)]
pub struct FakeNetlink {
    pub state: KernelState,
    /// Every [`Op`] applied, in order.
    pub log: Vec<Op>,
    pub vxlan: Option<VxlanSpec>,
    pub bridge: Option<BridgeSpec>,
    pub underlay: Underlay,
    pub underlay_addr: Option<Ipv4Addr>,
    /// An FDB entry for this MAC is refused (as the kernel refuses some).
    pub refuse_fdb: Option<Mac>,
    /// Dumps fail (the device's entries cannot be listed).
    pub refuse_dump: bool,
}

/// Index the fake gives the VXLAN device.
pub const FAKE_VXLAN_INDEX: u32 = 10;
/// Index the fake gives the bridge.
pub const FAKE_BRIDGE_INDEX: u32 = 11;

impl Default for FakeNetlink {
    fn default() -> FakeNetlink {
        FakeNetlink {
            state: KernelState::default(),
            log: Vec::new(),
            vxlan: None,
            bridge: None,
            underlay: Underlay {
                ifindex: 2,
                mtu: 1500,
            },
            underlay_addr: None,
            refuse_fdb: None,
            refuse_dump: false,
        }
    }
}

impl FakeNetlink {
    /// Takes the ops logged since the last call.
    pub fn take_log(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.log)
    }
}

fn upsert<T: PartialEq>(v: &mut Vec<T>, same: impl Fn(&T) -> bool, item: T) {
    v.retain(|x| !same(x));
    v.push(item);
}

impl Netlink for FakeNetlink {
    async fn underlay(&mut self, local: Ipv4Addr) -> Result<Underlay, NetlinkError> {
        match self.underlay_addr {
            Some(a) if a != local => Err(NetlinkError::NoUnderlay { addr: local }),
            _ => Ok(self.underlay),
        }
    }

    async fn ensure_vxlan(&mut self, spec: &VxlanSpec) -> Result<u32, NetlinkError> {
        self.vxlan = Some(spec.clone());
        Ok(FAKE_VXLAN_INDEX)
    }

    async fn ensure_bridge(&mut self, spec: &BridgeSpec) -> Result<u32, NetlinkError> {
        self.bridge = Some(spec.clone());
        Ok(FAKE_BRIDGE_INDEX)
    }

    async fn dump(&mut self, _vxlan: u32) -> Result<KernelState, NetlinkError> {
        if self.refuse_dump {
            return Err(NetlinkError::Missing {
                name: "dump (refused by the fake)".into(),
            });
        }
        Ok(self.state.clone())
    }

    async fn apply(&mut self, _vxlan: u32, op: &Op) -> Result<(), NetlinkError> {
        if let Op::AddFdb(f) = op {
            if Some(f.mac) == self.refuse_fdb {
                return Err(NetlinkError::Missing {
                    name: format!("fdb {} (refused by the fake)", f.mac),
                });
            }
        }
        self.log.push(*op);
        let s = &mut self.state;
        match *op {
            // Adds replace, keyed like the kernel: neighbour by IP, FDB by MAC, route by prefix.
            Op::AddNeigh(n) => upsert(&mut s.neighs, |x: &Neigh| x.ip == n.ip, n),
            Op::AddFdb(f) => upsert(&mut s.fdbs, |x: &Fdb| x.mac == f.mac, f),
            Op::AddRoute(r) => upsert(&mut s.routes, |x: &Route| x.subnet == r.subnet, r),
            Op::DelRoute(r) => s.routes.retain(|x| x.subnet != r.subnet),
            Op::DelFdb(f) => s.fdbs.retain(|x| x.mac != f.mac),
            Op::DelNeigh(n) => s.neighs.retain(|x| x.ip != n.ip),
        }
        Ok(())
    }
}
