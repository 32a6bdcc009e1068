//! Arbitrary query names and types against a small registry. `lookup` never panics;
//! names outside `discoverd.` are never answered and names inside always are; every
//! answer is for the name asked; UDP answers carry at most the instance limit of SRV and
//! of address records, and no additional records.
#![no_main]

use std::collections::BTreeMap;

use flynn_discoverd::dns::zone::{lookup, Lookup, UDP_INSTANCE_LIMIT};
use flynn_discoverd::store::types::{Instance, LeaderType, ServiceConfig};
use flynn_discoverd::store::Registry;
use hickory_server::proto::rr::{Name, RecordType};
use libfuzzer_sys::fuzz_target;

const TYPES: [RecordType; 6] = [
    RecordType::A,
    RecordType::AAAA,
    RecordType::SRV,
    RecordType::ANY,
    RecordType::TXT,
    RecordType::MX,
];

fn registry() -> Registry {
    let mut reg = Registry::default();
    let cfg = ServiceConfig {
        leader_type: LeaderType::Oldest,
    };
    reg.data.services.insert("web".into(), cfg.clone());
    reg.data.services.insert("empty".into(), cfg);
    let mut insts = BTreeMap::new();
    for (n, (addr, proto)) in [
        ("10.0.0.1:80", "tcp"),
        ("10.0.0.1:81", "tcp"),
        ("10.0.0.2:53", "udp"),
        ("10.0.0.3:80", "tcp"),
        ("10.0.0.4:80", "tcp"),
        ("[fd00::1]:80", "tcp"),
        ("not an address", "tcp"),
    ]
    .into_iter()
    .enumerate()
    {
        let id = flynn_discoverd::api::instance_id(proto, addr);
        let i = Instance {
            id: id.clone(),
            addr: addr.to_string(),
            proto: proto.to_string(),
            meta: Default::default(),
            index: n as u64 + 1,
        };
        insts.insert(id, i);
    }
    reg.data.instances.insert("web".into(), insts);
    reg
}

fuzz_target!(|data: &[u8]| {
    let Some((&t, rest)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    let Ok(name) = Name::from_utf8(s) else {
        return;
    };
    let qtype = TYPES[usize::from(t) % TYPES.len()];
    let tcp = t & 0x80 != 0;
    let lower = name.to_lowercase().to_ascii();
    // By labels: a label may hold an escaped dot (`a\.discoverd.` is one top-level label).
    let in_zone = name
        .iter()
        .last()
        .is_some_and(|l| l.eq_ignore_ascii_case(b"discoverd"));
    match lookup(&registry(), &name, qtype, tcp) {
        Lookup::NotOurs => assert!(!in_zone, "{lower} is in the zone but not answered"),
        Lookup::Answer {
            answers,
            additionals,
            ..
        } => {
            assert!(in_zone, "{lower} is outside the zone but answered");
            for r in &answers {
                assert_eq!(&r.name, &name);
            }
            if !tcp {
                // At most the instance limit of each kind of record, and no glue.
                let srv = answers
                    .iter()
                    .filter(|r| r.record_type() == RecordType::SRV)
                    .count();
                assert!(srv <= UDP_INSTANCE_LIMIT, "{srv} SRV records over UDP");
                assert!(answers.len() - srv <= UDP_INSTANCE_LIMIT);
                assert!(additionals.is_empty());
            }
        }
    }
});
