//! Arbitrary bytes as what other hosts leave in discoverd: a lease document (the `flannel`
//! service's metadata) when the input is JSON, and subnet and MAC strings otherwise.
//! Leases that do not parse are skipped, never a panic; the leases that do come out sorted
//! and unique by subnet; a subnet or MAC that parses prints in the canonical form and
//! parses back to the same value.
#![no_main]

use flynn_network::{leases_from_document, Mac, Subnet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(doc) = serde_json::from_slice::<serde_json::Value>(data) {
        let snap = leases_from_document(&doc, 7);
        assert_eq!(snap.revision, 7);
        for pair in snap.leases.windows(2) {
            assert!(
                pair[0].subnet < pair[1].subnet,
                "leases not sorted and unique"
            );
        }
        for l in &snap.leases {
            subnet_round_trip(&l.subnet);
        }
        return;
    }
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(subnet) = s.parse::<Subnet>() {
        subnet_round_trip(&subnet);
        // Only the separator may differ from the canonical text (and host bits, cleared).
        let (addr, len) = s
            .split_once(['/', '-'])
            .expect("parsed, so it has a separator");
        assert!(addr.parse::<std::net::Ipv4Addr>().is_ok());
        assert_eq!(
            len,
            subnet.prefix_len().to_string(),
            "{s:?}: length not in canonical form"
        );
    }
    if let Ok(mac) = s.parse::<Mac>() {
        assert_eq!(
            mac.to_string(),
            s.to_ascii_lowercase(),
            "{s:?}: not a canonical MAC"
        );
        assert_eq!(mac.to_string().parse::<Mac>().ok(), Some(mac));
    }
});

fn subnet_round_trip(subnet: &Subnet) {
    let text = subnet.to_string();
    assert_eq!(
        text.parse::<Subnet>().ok(),
        Some(*subnet),
        "{text} does not parse back"
    );
}
