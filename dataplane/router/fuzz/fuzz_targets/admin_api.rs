//! Sequences of admin API operations (add, update, remove; bodies from small alphabets so
//! that routes collide, or arbitrary bytes through `parse_route`) against the router's
//! route store. After every operation the store must hold its invariants (spec §1.2): no two
//! HTTP routes on one domain (case-insensitive), port and path; every HTTP path starts and
//! ends with `/`; a non-root HTTP route has a `/` route on its domain and port; TCP ports
//! are unique and never one of the HTTP ports; each route is listed once and found by its
//! id. A refused operation changes nothing, and every stored HTTP route is reachable in the
//! table built from the store.
#![no_main]

use std::collections::HashSet;

use flynn_api::RouteType;
use flynn_router::store::{Ports, Store};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const DOMAINS: [&str; 5] = ["a.test", "A.Test", "b.test", "*.test", ""];
const PATHS: [&str; 8] = ["", "/", "/x", "/x/", "/x/y/", "x/", "/x//", "//"];
const PORTS: [u16; 8] = [0, 8080, 80, 443, 3000, 3001, 3002, 9999];
const IDS: [&str; 4] = ["", "a", "b", "c"];
const SERVICES: [&str; 2] = ["s", ""];

fn ports() -> Ports {
    Ports {
        default_http: vec![80],
        additional_http: vec![8080],
        tcp_range: (3000, 3002),
    }
}

fn body(u: &mut Unstructured) -> Result<Vec<u8>> {
    if u.ratio(1, 8)? {
        return u.arbitrary();
    }
    let v = serde_json::json!({
        "type": *u.choose(&["http", "tcp", "udp"])?,
        "id": *u.choose(&IDS)?,
        "service": *u.choose(&SERVICES)?,
        "port": *u.choose(&PORTS)?,
        "domain": *u.choose(&DOMAINS)?,
        "path": *u.choose(&PATHS)?,
        "leader": u.arbitrary::<bool>()?,
        "sticky": u.ratio(1, 8)?,
    });
    Ok(serde_json::to_vec(&v).expect("json"))
}

fn snapshot(s: &Store) -> String {
    serde_json::to_string(&s.list(None)).expect("routes serialize")
}

fn check(s: &Store) {
    let all = s.list(None);
    let mut keys = HashSet::new();
    let mut http = HashSet::new();
    let mut tcp = HashSet::new();
    for r in &all {
        assert!(keys.insert((r.kind, r.id.clone())), "{r:?} listed twice");
        assert_eq!(
            s.get(r.kind, &r.id).map(|g| g.id.as_str()),
            Some(r.id.as_str())
        );
        assert!(!r.service.is_empty());
        match r.kind {
            RouteType::Http => {
                assert!(r.path.starts_with('/') && r.path.ends_with('/'), "{r:?}");
                assert!(!r.domain.is_empty());
                let key = (r.domain.to_ascii_lowercase(), r.port, r.path.clone());
                assert!(http.insert(key), "duplicate HTTP route {r:?} in {all:?}");
            }
            RouteType::Tcp => {
                assert!(tcp.insert(r.port), "TCP port {} twice", r.port);
                assert!(![80, 443, 8080].contains(&r.port), "{r:?}");
            }
        }
    }
    for r in all
        .iter()
        .filter(|r| r.kind == RouteType::Http && r.path != "/")
    {
        let root = (r.domain.to_ascii_lowercase(), r.port, "/".to_string());
        assert!(http.contains(&root), "{r:?} has no root route in {all:?}");
    }
    let table = s.table();
    for r in all.iter().filter(|r| r.kind == RouteType::Http) {
        let host = r.domain.replace('*', "w");
        assert!(
            table
                .lookup_http(host.as_bytes(), r.port, r.path.as_bytes())
                .is_some(),
            "{r:?} unreachable"
        );
    }
}

fn run(u: &mut Unstructured) -> Result<()> {
    let mut s = Store::new(ports(), u.arbitrary()?);
    for _ in 0..u.int_in_range(1..=24)? {
        let before = snapshot(&s);
        let ok = match u.int_in_range(0..=5)? {
            0..=2 => match Store::parse_route(&body(u)?) {
                Ok(r) => s.add(r).is_ok(),
                Err(_) => false,
            },
            3 | 4 => {
                let list = s.list(None);
                let (kind, id) = match list.get(u.int_in_range(0..=list.len())?) {
                    Some(r) => (r.kind, r.id.clone()),
                    None => (RouteType::Http, u.choose(&IDS)?.to_string()),
                };
                match Store::parse_route(&body(u)?) {
                    Ok(r) => s.update(kind, &id, r).is_ok(),
                    Err(_) => false,
                }
            }
            _ => {
                let list = s.list(None);
                match list.get(u.int_in_range(0..=list.len())?) {
                    Some(r) => s.remove(r.kind, &r.id.clone()).is_ok(),
                    None => s.remove(RouteType::Tcp, "nope").is_ok(),
                }
            }
        };
        if !ok {
            assert_eq!(
                snapshot(&s),
                before,
                "a refused operation changed the store"
            );
        }
        check(&s);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
