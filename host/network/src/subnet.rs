//! IPv4 blocks, MAC addresses and the cluster network's subnet layout (flannel's `Config`).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Why a subnet, MAC or network layout could not be parsed or is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("invalid IPv4 block {input:?}: expected a.b.c.d/len or a.b.c.d-len")]
    Subnet { input: String },
    #[error("invalid MAC address {input:?}: expected six hex octets separated by ':'")]
    Mac { input: String },
    #[error("invalid network layout: {reason}")]
    Layout { reason: &'static str },
}

/// An IPv4 block, always stored with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subnet {
    addr: Ipv4Addr,
    len: u8,
}

impl Subnet {
    /// The block of `len` bits containing `addr` (host bits are cleared). `len` is clamped to 32.
    pub fn new(addr: Ipv4Addr, len: u8) -> Subnet {
        let len = len.min(32);
        Subnet {
            addr: Ipv4Addr::from(u32::from(addr) & mask(len)),
            len,
        }
    }

    /// The network address (host bits zero), e.g. `100.100.3.0`.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// The first usable address, e.g. `100.100.3.1`: the bridge (gateway) address of a host block.
    pub fn first_host(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr).wrapping_add(1))
    }

    /// Number of addresses in the block.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }

    /// Whether `ip` lies in this block.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.len) == u32::from(self.addr)
    }

    /// Whether `other` lies entirely inside this block.
    pub fn contains_subnet(&self, other: &Subnet) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }

    /// The `n`th address of the block (0 is the network address).
    pub fn nth(&self, n: u32) -> Option<Ipv4Addr> {
        (u64::from(n) < self.size()).then(|| Ipv4Addr::from(u32::from(self.addr) + n))
    }

    /// The key under which a lease for this block is stored: `a.b.c.d-len` (flannel's format).
    pub fn key(&self) -> String {
        format!("{}-{}", self.addr, self.len)
    }
}

fn mask(len: u8) -> u32 {
    match len {
        0 => 0,
        l => u32::MAX << (32 - u32::from(l.min(32))),
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Subnet {
    type Err = ParseError;

    /// Accepts `a.b.c.d/len` and the lease-key form `a.b.c.d-len`.
    fn from_str(s: &str) -> Result<Subnet, ParseError> {
        let err = || ParseError::Subnet { input: s.into() };
        let (addr, len) = s.split_once(['/', '-']).ok_or_else(err)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| err())?;
        // Plain decimal only: `u8::from_str` also takes `+8` and `008`, which would let two
        // different lease keys name one block.
        let canonical = !len.is_empty()
            && len.bytes().all(|b| b.is_ascii_digit())
            && (len == "0" || !len.starts_with('0'));
        if !canonical {
            return Err(err());
        }
        let len: u8 = len.parse().map_err(|_| err())?;
        if len > 32 {
            return Err(err());
        }
        Ok(Subnet::new(addr, len))
    }
}

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The VXLAN device MAC for the host holding `subnet`.
    ///
    /// Derived only from the lease, so a host that restarts with the same lease comes back with the
    /// same MAC and peers' FDB and neighbour entries stay valid (flannel picks a random MAC and leaves
    /// stale entries behind). Layout: `0e:66:<network address>`; `0e` is a locally administered
    /// unicast prefix, `66` is 'f'. Leases never overlap, so MACs are unique within a cluster.
    pub fn for_subnet(subnet: &Subnet) -> Mac {
        let [a, b, c, d] = subnet.addr().octets();
        Mac([0x0e, 0x66, a, b, c, d])
    }

    /// The MAC of the job bridge whose address is `gateway`: `0e:62:<gateway>` (`62` is 'b'). Fixed
    /// so it does not follow the bridge's ports.
    pub fn for_bridge(gateway: Ipv4Addr) -> Mac {
        let [a, b, c, d] = gateway.octets();
        Mac([0x0e, 0x62, a, b, c, d])
    }

    /// A unicast address other than all zeros: one a VXLAN FDB entry can name (the kernel
    /// refuses to replace an entry with a multicast one, and all zeros means "default
    /// destination" to it).
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for Mac {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Mac, ParseError> {
        let err = || ParseError::Mac { input: s.into() };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(err)?;
            // Two hex digits (`from_str_radix` alone would also take `+f`).
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Mac(out))
    }
}

impl TryFrom<&[u8]> for Mac {
    type Error = ParseError;

    fn try_from(b: &[u8]) -> Result<Mac, ParseError> {
        <[u8; 6]>::try_from(b)
            .map(Mac)
            .map_err(|_| ParseError::Mac {
                input: format!("{b:02x?}"),
            })
    }
}

/// How the cluster network is cut into host blocks (flannel's `Network`, `SubnetLen`, `SubnetMin`,
/// `SubnetMax`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub network: Subnet,
    pub subnet_len: u8,
    /// First block that may be leased (inclusive).
    pub subnet_min: Ipv4Addr,
    /// Last block that may be leased (inclusive).
    pub subnet_max: Ipv4Addr,
}

/// The default cluster network, `100.100.0.0/16`.
pub const DEFAULT_NETWORK: Subnet = Subnet {
    addr: Ipv4Addr::new(100, 100, 0, 0),
    len: 16,
};

impl Default for Layout {
    fn default() -> Layout {
        Layout::with_defaults(DEFAULT_NETWORK, None).expect("default layout is valid")
    }
}

impl Layout {
    /// flannel's defaults: /24 blocks when the network is shorter than /24 (else prefix + 1), the
    /// first block skipped, the last block the maximum.
    pub fn with_defaults(network: Subnet, subnet_len: Option<u8>) -> Result<Layout, ParseError> {
        let subnet_len = subnet_len.unwrap_or(if network.prefix_len() < 24 {
            24
        } else {
            network.prefix_len() + 1
        });
        if subnet_len <= network.prefix_len() || subnet_len > 30 {
            return Err(ParseError::Layout {
                reason: "subnet length must be longer than the network prefix and at most 30",
            });
        }
        let step = 1u32 << (32 - u32::from(subnet_len));
        let base = u32::from(network.addr());
        let last = base + (network.size() as u32).wrapping_sub(step);
        let layout = Layout {
            network,
            subnet_len,
            subnet_min: Ipv4Addr::from(base + step),
            subnet_max: Ipv4Addr::from(last),
        };
        layout.validate()?;
        Ok(layout)
    }

    /// Checks that min and max are block-aligned, inside the network and ordered.
    pub fn validate(&self) -> Result<(), ParseError> {
        let aligned = |ip: Ipv4Addr| Subnet::new(ip, self.subnet_len).addr() == ip;
        if !aligned(self.subnet_min) || !aligned(self.subnet_max) {
            return Err(ParseError::Layout {
                reason: "subnet_min and subnet_max must be aligned to the subnet length",
            });
        }
        if !self.network.contains(self.subnet_min) || !self.network.contains(self.subnet_max) {
            return Err(ParseError::Layout {
                reason: "subnet_min and subnet_max must lie inside the network",
            });
        }
        if self.subnet_min > self.subnet_max {
            return Err(ParseError::Layout {
                reason: "subnet_min must not be after subnet_max",
            });
        }
        Ok(())
    }

    /// Every leasable block, in address order.
    pub fn blocks(&self) -> impl Iterator<Item = Subnet> + '_ {
        let step = 1u32 << (32 - u32::from(self.subnet_len));
        let (min, max) = (u32::from(self.subnet_min), u32::from(self.subnet_max));
        (0..=((max - min) / step))
            .map(move |i| Subnet::new(Ipv4Addr::from(min + i * step), self.subnet_len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_parse_and_format() {
        for (input, want, key) in [
            ("100.100.3.0/24", "100.100.3.0/24", "100.100.3.0-24"),
            ("100.100.3.7-24", "100.100.3.0/24", "100.100.3.0-24"),
            ("10.0.0.0/8", "10.0.0.0/8", "10.0.0.0-8"),
        ] {
            let s: Subnet = input.parse().unwrap();
            assert_eq!(s.to_string(), want);
            assert_eq!(s.key(), key);
            assert_eq!(s.key().parse::<Subnet>().unwrap(), s);
        }
        for bad in [
            "",
            "100.100.3.0",
            "100.100.3.0/33",
            "1.2.3/24",
            "x/24",
            "100.100.3.0/024",
            "100.100.3.0/+24",
            "100.100.3.0/",
            "100.100.3.0/ 24",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn subnet_membership() {
        let s: Subnet = "100.100.3.0/24".parse().unwrap();
        assert_eq!(s.first_host(), Ipv4Addr::new(100, 100, 3, 1));
        assert!(s.contains(Ipv4Addr::new(100, 100, 3, 255)));
        assert!(!s.contains(Ipv4Addr::new(100, 100, 4, 0)));
        assert!(DEFAULT_NETWORK.contains_subnet(&s));
        assert!(!s.contains_subnet(&DEFAULT_NETWORK));
        assert_eq!(s.nth(255), Some(Ipv4Addr::new(100, 100, 3, 255)));
        assert_eq!(s.nth(256), None);
    }

    #[test]
    fn mac_round_trip_and_derivation_is_stable() {
        let s: Subnet = "100.100.3.0/24".parse().unwrap();
        let mac = Mac::for_subnet(&s);
        assert_eq!(mac.to_string(), "0e:66:64:64:03:00");
        // Same lease (even re-parsed from its key, as after a restart) gives the same MAC.
        assert_eq!(Mac::for_subnet(&s.key().parse().unwrap()), mac);
        assert_ne!(Mac::for_subnet(&"100.100.4.0/24".parse().unwrap()), mac);
        // Locally administered, unicast.
        assert_eq!(mac.0[0] & 0b11, 0b10);
        assert_eq!(mac.to_string().parse::<Mac>().unwrap(), mac);
        for bad in [
            "",
            "0e:66:64:64:03",
            "0e:66:64:64:03:00:00",
            "0e:66:64:64:3:000",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn default_layout_matches_flannel() {
        let l = Layout::default();
        assert_eq!(l.subnet_len, 24);
        assert_eq!(l.subnet_min, Ipv4Addr::new(100, 100, 1, 0));
        assert_eq!(l.subnet_max, Ipv4Addr::new(100, 100, 255, 0));
        assert_eq!(l.blocks().count(), 255);
        let small = Layout::with_defaults("10.1.0.0/24".parse().unwrap(), None).unwrap();
        assert_eq!(small.subnet_len, 25);
        assert_eq!(
            small.blocks().collect::<Vec<_>>(),
            vec!["10.1.0.128/25".parse().unwrap()]
        );
        assert!(Layout::with_defaults(DEFAULT_NETWORK, Some(16)).is_err());
    }
}
