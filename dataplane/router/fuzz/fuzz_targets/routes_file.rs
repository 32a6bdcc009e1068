//! Sequences of routes-file reloads (`SIGHUP`), with admin API routes added in between,
//! against the router's route store. Files are JSON built from the same small alphabets
//! as the `admin_api` target (so that routes collide with each other and with API
//! routes), or now and then arbitrary text read as JSON or TOML. Properties:
//! - a refused file changes nothing in the store;
//! - an accepted file leaves the store's invariants intact, keeps every API route as it
//!   was, and holds every service's backends as the file gives them;
//! - the same file again is accepted, removes nothing and keeps every route's id.
#![no_main]

mod invariants;

use std::collections::BTreeMap;

use flynn_router::reload::FileRoutes;
use flynn_router::store::Store;
use flynn_router::RoutesFile;
use invariants::{body, check, ports, route, snapshot};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const BACKENDS: [&str; 5] = ["127.0.0.1:1", "127.0.0.1:2", "[::1]:3", "[0::1]:3", "nope"];
const FILE_SERVICES: [&str; 3] = ["s", "t", ""];

/// A routes file's text and whether it is TOML.
fn file(u: &mut Unstructured) -> Result<(String, bool)> {
    if u.ratio(1, 8)? {
        return Ok((u.arbitrary()?, u.arbitrary()?));
    }
    let mut routes = Vec::new();
    for _ in 0..u.int_in_range(0..=5)? {
        routes.push(route(u)?);
    }
    let mut services = serde_json::Map::new();
    for _ in 0..u.int_in_range(0..=2)? {
        let mut list = Vec::new();
        for _ in 0..u.int_in_range(0..=2)? {
            list.push(serde_json::json!({ "addr": *u.choose(&BACKENDS)? }));
        }
        services.insert(u.choose(&FILE_SERVICES)?.to_string(), list.into());
    }
    let v = serde_json::json!({ "routes": routes, "services": services });
    Ok((v.to_string(), false))
}

fn parse((text, toml): &(String, bool)) -> Option<RoutesFile> {
    RoutesFile::parse(text, *toml).ok()
}

fn state(s: &Store) -> (String, String) {
    let services = serde_json::to_string(s.services()).expect("services serialize");
    (snapshot(s), services)
}

fn run(u: &mut Unstructured) -> Result<()> {
    let mut s = Store::new(ports(), u.arbitrary()?);
    let mut f = FileRoutes::default();
    // Routes added through the admin API, by id: a reload must leave them alone.
    let mut api = BTreeMap::new();
    for _ in 0..u.int_in_range(1..=8)? {
        if u.ratio(1, 3)? {
            if let Ok(r) = Store::parse_route(&body(u)?) {
                if let Ok(r) = s.add(r) {
                    api.insert((r.kind, r.id.clone()), r);
                }
            }
            continue;
        }
        let text = file(u)?;
        let Some(parsed) = parse(&text) else {
            continue;
        };
        let declared = parsed.services.clone();
        let before = state(&s);
        if f.apply(&mut s, parsed).is_err() {
            assert_eq!(state(&s), before, "a refused file changed the store");
            continue;
        }
        check(&s);
        for ((kind, id), r) in &api {
            assert_eq!(s.get(*kind, id), Some(r), "a reload touched an API route");
        }
        for (svc, list) in &declared {
            let got: Vec<String> = s.backends(svc).into_iter().map(|b| b.addr).collect();
            // One spelling per address, a repeat kept once (as the store keeps them).
            let mut want: Vec<String> = Vec::new();
            for b in list {
                let a = b
                    .addr
                    .parse::<std::net::SocketAddr>()
                    .map_or_else(|_| b.addr.clone(), |a| a.to_string());
                if !want.contains(&a) {
                    want.push(a);
                }
            }
            assert_eq!(got, want, "service {svc:?}");
        }
        let ids: Vec<_> = s.list(None).into_iter().map(|r| (r.kind, r.id)).collect();
        let again = f
            .apply(&mut s, parse(&text).expect("parsed once"))
            .expect("the same file again is refused");
        assert!(again.removed.is_empty(), "{:?}", again.removed);
        let ids2: Vec<_> = s.list(None).into_iter().map(|r| (r.kind, r.id)).collect();
        assert_eq!(ids, ids2, "the same file again changed route ids");
        check(&s);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
