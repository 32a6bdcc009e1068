//! Typed map entries, laid out like `bpf/fastpath.h` (checked by the layout test below).

use std::net::Ipv4Addr;

/// A job on this host: value of `flynn_endpoints`, keyed by the job's IPv4 address.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// Index of the job's host-side veth (its peer is the job's interface).
    pub ifindex: u32,
    /// The job's MAC: destination after the rewrite.
    pub mac: [u8; 6],
    /// The bridge (gateway) MAC: source after the rewrite.
    pub gateway_mac: [u8; 6],
}

// SAFETY: `Endpoint` is `repr(C)`, made only of integers and byte arrays (any bit pattern is
// valid) and has no padding (4 + 6 + 6 = 16, align 4; checked against the C header below).
unsafe impl aya::Pod for Endpoint {}

/// Where a remote block goes: the VXLAN device and the next hop the kernel's neighbour table
/// resolves (in flannel's layout, the remote block's network address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    pub ifindex: u32,
    pub next_hop: Ipv4Addr,
}

/// `struct flynn_hop`: next hop in network byte order.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawHop {
    pub ifindex: u32,
    pub next_hop: u32,
}

// SAFETY: two `u32`s, `repr(C)`, no padding; every bit pattern is valid.
unsafe impl aya::Pod for RawHop {}

impl From<Hop> for RawHop {
    fn from(h: Hop) -> RawHop {
        RawHop {
            ifindex: h.ifindex,
            next_hop: be_word(h.next_hop),
        }
    }
}

impl From<RawHop> for Hop {
    fn from(h: RawHop) -> Hop {
        Hop {
            ifindex: h.ifindex,
            next_hop: Ipv4Addr::from(h.next_hop.to_ne_bytes()),
        }
    }
}

/// This host's VXLAN settings: for decapsulation on the underlay device
/// ([`crate::Role::Underlay`]) the outer destination address and UDP port, the VNI and the VXLAN
/// device's MAC (the inner Ethernet destination the kernel's VXLAN device would accept); for
/// encapsulation in BPF towards [`crate::FastPath::upsert_tunnel`] peers also the device the
/// packets leave by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Underlay {
    /// This host's underlay address (the VXLAN device's `local`).
    pub local_ip: Ipv4Addr,
    /// VXLAN network identifier (24 bits).
    pub vni: u32,
    /// VXLAN UDP destination port; never 0 (0 in the map means "decapsulate nothing").
    pub port: u16,
    /// MAC of this host's VXLAN device.
    pub vtep_mac: [u8; 6],
    /// The underlay device encapsulated packets leave by (the VXLAN device's lower device);
    /// 0: no encapsulation in BPF (remote traffic takes the VXLAN device).
    pub ifindex: u32,
}

/// `struct flynn_underlay`: address in network byte order, the rest in host order.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RawUnderlay {
    pub local_ip: u32,
    pub vni: u32,
    pub port: u16,
    pub vtep_mac: [u8; 6],
    pub ifindex: u32,
}

// SAFETY: `repr(C)`, integers and a byte array, 4 + 4 + 2 + 6 + 4 = 20 bytes with align 4: no
// padding (checked against the C header below); every bit pattern is valid.
unsafe impl aya::Pod for RawUnderlay {}

/// Where a remote block's VXLAN packets go when encapsulated in BPF: the peer's underlay
/// address and its VXLAN device's MAC (the inner Ethernet destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tunnel {
    pub remote_ip: Ipv4Addr,
    pub vtep_mac: [u8; 6],
}

/// `struct flynn_tunnel`: address in network byte order, explicit padding.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawTunnel {
    pub remote_ip: u32,
    pub vtep_mac: [u8; 6],
    pub pad: u16,
}

// SAFETY: `repr(C)`, 4 + 6 + 2 = 12 bytes, align 4, the padding is an explicit field; every bit
// pattern is valid.
unsafe impl aya::Pod for RawTunnel {}

impl From<Tunnel> for RawTunnel {
    fn from(t: Tunnel) -> RawTunnel {
        RawTunnel {
            remote_ip: be_word(t.remote_ip),
            vtep_mac: t.vtep_mac,
            pad: 0,
        }
    }
}

impl From<RawTunnel> for Tunnel {
    fn from(t: RawTunnel) -> Tunnel {
        Tunnel {
            remote_ip: Ipv4Addr::from(t.remote_ip.to_ne_bytes()),
            vtep_mac: t.vtep_mac,
        }
    }
}

impl From<Underlay> for RawUnderlay {
    fn from(u: Underlay) -> RawUnderlay {
        RawUnderlay {
            local_ip: be_word(u.local_ip),
            vni: u.vni,
            port: u.port,
            vtep_mac: u.vtep_mac,
            ifindex: u.ifindex,
        }
    }
}

impl RawUnderlay {
    pub(crate) fn get(&self) -> Option<Underlay> {
        (self.port != 0).then(|| Underlay {
            local_ip: Ipv4Addr::from(self.local_ip.to_ne_bytes()),
            vni: self.vni,
            port: self.port,
            vtep_mac: self.vtep_mac,
            ifindex: self.ifindex,
        })
    }
}

/// An IPv4 address as the `__u32` the kernel sees (network byte order in memory).
pub(crate) fn be_word(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// Packet counters summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Delivered to a job on this host with `bpf_redirect_peer`.
    pub redirected_local: u64,
    /// Sent to a remote block with `bpf_redirect_neigh`.
    pub redirected_remote: u64,
    /// VXLAN packets for a job on this host decapsulated on the underlay device and delivered
    /// with `bpf_redirect_peer`.
    pub decapsulated: u64,
    /// Of `decapsulated`: GSO packets (a TSO burst of a sender on the peer, a GRO packet of the
    /// underlay device), each carrying several segments.
    pub decapsulated_gso: u64,
    /// Of `redirected_remote`: encapsulated in BPF and sent out of the underlay device (the
    /// rest went through the VXLAN device).
    pub encapsulated: u64,
    /// Left to the kernel path (not IPv4, no map entry, TTL expiring, hairpin; on the underlay
    /// only VXLAN packets for this host are counted, e.g. ones with an outer checksum).
    pub passed: u64,
}

impl Counters {
    /// Prometheus text lines: `flynn_fastpath_packets_total{result="..."} N`, with HELP/TYPE.
    pub fn prometheus(&self) -> String {
        format!(
            "# HELP flynn_fastpath_packets_total Packets seen by the overlay eBPF fast path, by outcome.\n\
             # TYPE flynn_fastpath_packets_total counter\n\
             flynn_fastpath_packets_total{{result=\"redirected_local\"}} {}\n\
             flynn_fastpath_packets_total{{result=\"redirected_remote\"}} {}\n\
             flynn_fastpath_packets_total{{result=\"encapsulated\"}} {}\n\
             flynn_fastpath_packets_total{{result=\"decapsulated\"}} {}\n\
             flynn_fastpath_packets_total{{result=\"decapsulated_gso\"}} {}\n\
             flynn_fastpath_packets_total{{result=\"passed\"}} {}\n",
            self.redirected_local,
            self.redirected_remote,
            self.encapsulated,
            self.decapsulated,
            self.decapsulated_gso,
            self.passed
        )
    }
}

/// Counter indexes, from `enum flynn_counter`.
pub(crate) const CTR_LOCAL: u32 = 0;
pub(crate) const CTR_REMOTE: u32 = 1;
pub(crate) const CTR_PASSED: u32 = 2;
pub(crate) const CTR_DECAP: u32 = 3;
pub(crate) const CTR_ENCAP: u32 = 4;
pub(crate) const CTR_DECAP_GSO: u32 = 5;
pub(crate) const CTR_MAX: u32 = 6;

#[cfg(test)]
mod layout {
    #![allow(non_upper_case_globals, dead_code)]
    include!(concat!(env!("OUT_DIR"), "/layout.rs"));
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;
    use aya::maps::lpm_trie::Key;

    #[test]
    fn rust_layout_matches_c_header() {
        assert_eq!(size_of::<Endpoint>(), layout::flynn_endpoint_SIZE);
        assert_eq!(
            offset_of!(Endpoint, ifindex),
            layout::flynn_endpoint_ifindex
        );
        assert_eq!(offset_of!(Endpoint, mac), layout::flynn_endpoint_mac);
        assert_eq!(
            offset_of!(Endpoint, gateway_mac),
            layout::flynn_endpoint_gateway_mac
        );
        assert_eq!(size_of::<RawHop>(), layout::flynn_hop_SIZE);
        assert_eq!(offset_of!(RawHop, ifindex), layout::flynn_hop_ifindex);
        assert_eq!(offset_of!(RawHop, next_hop), layout::flynn_hop_next_hop);
        // aya's LPM key is `{ prefix_len: u32, data: K }`, packed; with K = u32 it matches.
        assert_eq!(size_of::<Key<u32>>(), layout::flynn_prefix_key_SIZE);
        assert_eq!(layout::flynn_prefix_key_prefixlen, 0);
        assert_eq!(layout::flynn_prefix_key_addr, 4);
        assert_eq!(size_of::<RawUnderlay>(), layout::flynn_underlay_SIZE);
        assert_eq!(
            offset_of!(RawUnderlay, local_ip),
            layout::flynn_underlay_local_ip
        );
        assert_eq!(offset_of!(RawUnderlay, vni), layout::flynn_underlay_vni);
        assert_eq!(offset_of!(RawUnderlay, port), layout::flynn_underlay_port);
        assert_eq!(
            offset_of!(RawUnderlay, vtep_mac),
            layout::flynn_underlay_vtep_mac
        );
        assert_eq!(
            offset_of!(RawUnderlay, ifindex),
            layout::flynn_underlay_ifindex
        );
        assert_eq!(size_of::<RawTunnel>(), layout::flynn_tunnel_SIZE);
        assert_eq!(
            offset_of!(RawTunnel, remote_ip),
            layout::flynn_tunnel_remote_ip
        );
        assert_eq!(
            offset_of!(RawTunnel, vtep_mac),
            layout::flynn_tunnel_vtep_mac
        );
        assert_eq!(
            (
                CTR_LOCAL,
                CTR_REMOTE,
                CTR_PASSED,
                CTR_DECAP,
                CTR_ENCAP,
                CTR_DECAP_GSO,
                CTR_MAX
            ),
            (
                layout::FLYNN_CTR_LOCAL,
                layout::FLYNN_CTR_REMOTE,
                layout::FLYNN_CTR_PASSED,
                layout::FLYNN_CTR_DECAP,
                layout::FLYNN_CTR_ENCAP,
                layout::FLYNN_CTR_DECAP_GSO,
                layout::FLYNN_CTR_MAX
            )
        );
    }

    #[test]
    fn counters_render_as_prometheus_text() {
        let text = Counters {
            redirected_local: 3,
            redirected_remote: 2,
            decapsulated: 4,
            decapsulated_gso: 6,
            encapsulated: 5,
            passed: 1,
        }
        .prometheus();
        assert!(text.starts_with("# HELP flynn_fastpath_packets_total "));
        assert!(text.contains("\n# TYPE flynn_fastpath_packets_total counter\n"));
        assert!(text.contains("flynn_fastpath_packets_total{result=\"redirected_local\"} 3\n"));
        assert!(text.contains("flynn_fastpath_packets_total{result=\"redirected_remote\"} 2\n"));
        assert!(text.contains("flynn_fastpath_packets_total{result=\"decapsulated\"} 4\n"));
        assert!(text.ends_with("flynn_fastpath_packets_total{result=\"passed\"} 1\n"));
        assert!(text.contains("flynn_fastpath_packets_total{result=\"encapsulated\"} 5\n"));
        assert!(text.contains("flynn_fastpath_packets_total{result=\"decapsulated_gso\"} 6\n"));
        assert_eq!(text.lines().count(), 8);
    }

    #[test]
    fn addresses_are_network_order_in_memory() {
        let w = be_word(Ipv4Addr::new(100, 100, 1, 10));
        assert_eq!(w.to_ne_bytes(), [100, 100, 1, 10]);
        let h = RawHop::from(Hop {
            ifindex: 7,
            next_hop: Ipv4Addr::new(100, 100, 2, 0),
        });
        assert_eq!(h.next_hop.to_ne_bytes(), [100, 100, 2, 0]);
        assert_eq!(h.ifindex, 7);
        let u = Underlay {
            local_ip: Ipv4Addr::new(10, 0, 0, 2),
            vni: 1,
            port: 8472,
            vtep_mac: [0x0e, 0x66, 1, 2, 3, 4],
            ifindex: 3,
        };
        let raw = RawUnderlay::from(u);
        assert_eq!(raw.local_ip.to_ne_bytes(), [10, 0, 0, 2]);
        assert_eq!(raw.get(), Some(u));
        assert_eq!(RawUnderlay::default().get(), None);
        let t = Tunnel {
            remote_ip: Ipv4Addr::new(10, 0, 0, 3),
            vtep_mac: [0x0e, 0x66, 5, 6, 7, 8],
        };
        let raw = RawTunnel::from(t);
        assert_eq!(raw.remote_ip.to_ne_bytes(), [10, 0, 0, 3]);
        assert_eq!(Tunnel::from(raw), t);
    }
}
