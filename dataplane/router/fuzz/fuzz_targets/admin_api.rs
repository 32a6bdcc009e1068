//! Sequences of admin API operations (add, update, remove; bodies from small alphabets so
//! that routes collide, or arbitrary bytes, through `parse_route` to add and
//! `parse_update` to update, as the API parses them) against the router's
//! route store. After every operation the store must hold its invariants (spec §1.2): no two
//! HTTP routes on one domain (case-insensitive), port and path; every HTTP path starts and
//! ends with `/`; a non-root HTTP route has a `/` route on its domain and port; TCP ports
//! are unique and never one of the HTTP ports; each route is listed once and found by its
//! id. A refused operation changes nothing, and every stored HTTP route is reachable in the
//! table built from the store.
#![no_main]

mod invariants;

use flynn_api::RouteType;
use flynn_router::store::Store;
use invariants::{body, check, ports, snapshot, IDS};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

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
                // As `PUT` parses it: `drain_backends` stays as stored (spec §1.2), `grpc`
                // when the body does not name it.
                match Store::parse_update(&body(u)?) {
                    Ok(up) => {
                        let was = s.get(kind, &id).map(|r| (r.drain_backends, r.grpc));
                        let named = (up.drain_backends, up.grpc);
                        assert_eq!(named.0, None, "PUT changes drain_backends");
                        let ok = s.update(kind, &id, up).is_ok();
                        if let (true, Some(was)) = (ok, was) {
                            let now = s.get(kind, &id).map(|r| (r.drain_backends, r.grpc));
                            let want = (
                                named.0.or(was.0),
                                named.1.or(was.1).filter(|on| *on),
                            );
                            assert_eq!(now, Some(want), "flags after {named:?} over {was:?}");
                        }
                        ok
                    }
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
