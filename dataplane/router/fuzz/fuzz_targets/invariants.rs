//! What both targets share: small alphabets of route fields (so that routes collide),
//! the listener ports, and the route store's invariants (spec §1.2).

use std::collections::HashSet;

use flynn_api::RouteType;
use flynn_router::store::{Ports, Store};
use libfuzzer_sys::arbitrary::{Result, Unstructured};

pub const DOMAINS: [&str; 5] = ["a.test", "A.Test", "b.test", "*.test", ""];
pub const PATHS: [&str; 8] = ["", "/", "/x", "/x/", "/x/y/", "x/", "/x//", "//"];
pub const PORTS: [u16; 8] = [0, 8080, 80, 443, 3000, 3001, 3002, 9999];
pub const IDS: [&str; 4] = ["", "a", "b", "c"];
pub const SERVICES: [&str; 2] = ["s", ""];

pub fn ports() -> Ports {
    Ports {
        default_http: vec![80],
        additional_http: vec![8080],
        additional_tls: vec![],
        tcp_range: (3000, 3002),
        tcp_ip: None,
    }
}

/// A route as JSON, from the alphabets above; the optional flags (`drain_backends`,
/// `grpc`) named or not, `null` included.
pub fn route(u: &mut Unstructured) -> Result<serde_json::Value> {
    let mut r = serde_json::json!({
        "type": *u.choose(&["http", "tcp", "udp"])?,
        "id": *u.choose(&IDS)?,
        "service": *u.choose(&SERVICES)?,
        "port": *u.choose(&PORTS)?,
        "domain": *u.choose(&DOMAINS)?,
        "path": *u.choose(&PATHS)?,
        "leader": u.arbitrary::<bool>()?,
        "sticky": u.ratio(1, 8)?,
    });
    for flag in ["drain_backends", "grpc"] {
        match u.int_in_range(0..=3)? {
            0 => {}
            1 => r[flag] = serde_json::Value::Null,
            n => r[flag] = (n == 3).into(),
        }
    }
    Ok(r)
}

/// An admin API body: a route from the alphabets, or now and then arbitrary bytes.
pub fn body(u: &mut Unstructured) -> Result<Vec<u8>> {
    if u.ratio(1, 8)? {
        return u.arbitrary();
    }
    Ok(serde_json::to_vec(&route(u)?).expect("json"))
}

/// Everything the store lists, as text, to compare before and after an operation.
pub fn snapshot(s: &Store) -> String {
    serde_json::to_string(&s.list(None)).expect("routes serialize")
}

/// The store's invariants; panics on the first one broken.
pub fn check(s: &Store) {
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
        // Stored as served: `drain_backends` always named, `grpc` only when on.
        assert!(r.drain_backends.is_some() && r.grpc != Some(false), "{r:?}");
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
