//! Routes-file reloads (`SIGHUP`): the file is the desired state of the routes and
//! services it declares. A reload adds what is new, updates what changed in place (same
//! route id, so nothing is torn down), and removes what the previous version declared
//! and this one does not. Routes and services added through the API are left alone.
//! A reload is all or nothing: a file with any route or service the store refuses
//! changes nothing (like `nginx -s reload` with a bad configuration). Like every
//! change, the result reaches the cores as one snapshot between requests.

use std::collections::{BTreeMap, BTreeSet};

use flynn_api::{ApiError, BackendAddr, Route, RouteType};
use flynn_routes::normalize_path;

use crate::store::Store;
use crate::RoutesFile;

/// Identity of a route in the file: type, domain, port and path. For TCP the port as
/// written, so `port: 0` routes keep their allocated port across reloads, and for `port: 0`
/// routes also the service and whether it goes to the leader (a database's write and read
/// ports), so that several of them are several routes.
type Key = (RouteType, String, u16, String);

fn key(r: &Route) -> Key {
    match r.kind {
        RouteType::Http => (r.kind, domain(&r.domain), r.port, normalize_path(&r.path)),
        RouteType::Tcp if r.port == 0 => any_port_key(r),
        RouteType::Tcp => (r.kind, String::new(), r.port, String::new()),
    }
}

/// A domain as the store keeps it: lowercase, a fully qualified name's trailing dot
/// dropped (`A.com.` is `a.com`), so the file's `a.com.` and `a.com` are one domain.
fn domain(d: &str) -> String {
    let d = d.to_ascii_lowercase();
    match d.strip_suffix('.') {
        Some(bare) if !d.ends_with("*.") => bare.to_string(),
        _ => d,
    }
}

/// The key of a `port: 0` TCP route (`r.port` may be the port it was given).
fn any_port_key(r: &Route) -> Key {
    let who = format!("{}\n{}", r.service, if r.leader { "leader" } else { "any" });
    (RouteType::Tcp, who, 0, String::new())
}

/// How a route is named in errors.
fn what(r: &Route) -> String {
    match r.kind {
        RouteType::Tcp if r.port == 0 => format!("tcp route for service {}", r.service),
        RouteType::Tcp => format!("tcp port {}", r.port),
        RouteType::Http => format!("{}{}", r.domain, r.path),
    }
}

/// What the routes file put into the store.
#[derive(Default, Clone)]
pub struct FileRoutes {
    routes: BTreeMap<Key, String>,
    services: BTreeSet<String>,
}

/// [`FileRoutes`] as plain data, handed to a new process in a takeover so its reloads
/// know what the file put there (route key parts and the route id; service names).
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FileRecord {
    pub routes: Vec<(RouteType, String, u16, String, String)>,
    pub services: Vec<String>,
}

impl FileRoutes {
    pub fn record(&self) -> FileRecord {
        FileRecord {
            routes: self
                .routes
                .iter()
                .map(|((t, d, p, path), id)| (*t, d.clone(), *p, path.clone(), id.clone()))
                .collect(),
            services: self.services.iter().cloned().collect(),
        }
    }

    pub fn from_record(r: FileRecord) -> FileRoutes {
        FileRoutes {
            routes: r
                .routes
                .into_iter()
                // Recorded by a build that kept a trailing dot in the key: the same route.
                .map(|(t, d, p, path, id)| {
                    let d = if t == RouteType::Http { domain(&d) } else { d };
                    ((t, d, p, path), id)
                })
                .collect(),
            services: r.services.into_iter().collect(),
        }
    }
}

/// Changes to announce on `/events`.
#[derive(Debug)]
pub struct Applied {
    pub set: Vec<Route>,
    pub removed: Vec<Route>,
    /// Services whose backends changed, with what came and went (as
    /// [`Store::set_backends`] reports them): `backend-up`/`backend-down` and drains.
    pub backends: Vec<BackendsChanged>,
}

/// A service's backend change made by a reload.
#[derive(Debug)]
pub struct BackendsChanged {
    pub service: String,
    pub added: Vec<BackendAddr>,
    pub removed: Vec<BackendAddr>,
}

fn err(what: &str, e: ApiError) -> String {
    format!("{what}: {e}")
}

impl FileRoutes {
    /// Applies `file` to `store` in full, or on error leaves both `store` and `self`
    /// as they were. The work is done on copies (a reload is rare; the store is small
    /// next to the cost of a half-applied file).
    pub fn apply(&mut self, store: &mut Store, file: RoutesFile) -> Result<Applied, String> {
        let (mut s, mut f) = (store.clone(), self.clone());
        let out = f.apply_in_place(&mut s, file)?;
        (*store, *self) = (s, f);
        Ok(out)
    }

    fn apply_in_place(&mut self, store: &mut Store, file: RoutesFile) -> Result<Applied, String> {
        let mut out = Applied {
            set: Vec::new(),
            removed: Vec::new(),
            backends: Vec::new(),
        };
        // A record handed over by a build that keyed `port: 0` TCP routes otherwise (all
        // alike, or by service alone): such entries are keyed again from the route they point
        // at, so it keeps its id and port.
        let legacy: Vec<(Key, String)> = self
            .routes
            .iter()
            .filter(|(k, _)| k.0 == RouteType::Tcp && k.2 == 0 && !k.1.contains('\n'))
            .map(|(k, id)| (k.clone(), id.clone()))
            .collect();
        for (k, id) in legacy {
            self.routes.remove(&k);
            if let Some(r) = store.get(RouteType::Tcp, &id) {
                self.routes.insert(any_port_key(r), id);
            }
        }
        let new_services: BTreeSet<String> = file.services.keys().cloned().collect();
        let gone: Vec<(String, Vec<BackendAddr>)> = self
            .services
            .difference(&new_services)
            .map(|s| (s.clone(), Vec::new()))
            .collect();
        for (service, list) in file.services.into_iter().chain(gone) {
            let (added, removed) = store
                .set_backends(&service, list)
                .map_err(|e| err(&format!("service {service}"), e))?;
            if !added.is_empty() || !removed.is_empty() {
                out.backends.push(BackendsChanged {
                    service,
                    added,
                    removed,
                });
            }
        }
        self.services = new_services;

        // Root routes before sub-paths (spec §1.4).
        let mut routes = file.routes;
        routes.sort_by_key(|r| (domain(&r.domain), normalize_path(&r.path).len()));
        let mut wanted: BTreeSet<Key> = BTreeSet::new();
        for r in &routes {
            // Applied one after the other, the second would replace the first.
            if !wanted.insert(key(r)) {
                return Err(format!("route {}: declared twice", what(r)));
            }
        }

        // Removed first (sub-paths before their roots), so a replaced root can come back.
        let mut gone: Vec<(Key, String)> = self
            .routes
            .iter()
            .filter(|(k, _)| !wanted.contains(*k))
            .map(|(k, id)| (k.clone(), id.clone()))
            .collect();
        gone.sort_by_key(|(k, _)| std::cmp::Reverse(k.3.len()));
        for (k, id) in gone {
            self.routes.remove(&k);
            match store.remove(k.0, &id) {
                Ok(r) => out.removed.push(r),
                Err(e) if e.status() == 404 => {}
                Err(e) => return Err(err("removing a route", e)),
            }
        }
        for r in routes {
            let k = key(&r);
            let what = what(&r);
            let existing = self
                .routes
                .get(&k)
                .filter(|id| store.get(k.0, id).is_some())
                .cloned();
            // A route the file declares as it was is left as it is, and announced to no one.
            let stored = match existing {
                Some(id) => {
                    let changed = store
                        .update_if_changed(k.0, &id, r)
                        .map_err(|e| err(&format!("route {what}"), e))?;
                    self.routes.insert(k, id);
                    changed
                }
                None => {
                    let r = store.add(r).map_err(|e| err(&format!("route {what}"), e))?;
                    self.routes.insert(k, r.id.clone());
                    Some(r)
                }
            };
            out.set.extend(stored);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Ports;
    use flynn_api::BackendAddr;

    fn file(json: &str) -> RoutesFile {
        RoutesFile::parse(json, false).unwrap()
    }

    fn store() -> Store {
        let ports = Ports {
            default_http: vec![8080],
            additional_http: vec![],
            additional_tls: vec![],
            tcp_range: (3000, 3010),
            tcp_ip: None,
        };
        Store::new(ports, false)
    }

    #[test]
    fn reload_adds_updates_and_removes_only_file_routes() {
        let mut store = store();
        let mut f = FileRoutes::default();
        f.apply(
            &mut store,
            file(
                r#"{"routes":[{"type":"http","domain":"a.com","service":"a"},
                               {"type":"http","domain":"a.com","path":"/x","service":"x"},
                               {"type":"tcp","port":0,"service":"db"}],
                     "services":{"a":[{"addr":"127.0.0.1:1"}]}}"#,
            ),
        )
        .unwrap();
        let api_route = store.add(Route::http("api.com", "api")).unwrap();
        let before: BTreeMap<String, Route> = store
            .list(None)
            .into_iter()
            .map(|r| (r.domain.clone() + &r.path, r))
            .collect();
        let applied = f
            .apply(
                &mut store,
                file(
                    r#"{"routes":[{"type":"http","domain":"a.com","service":"a2"},
                                   {"type":"tcp","port":0,"service":"db"},
                                   {"type":"http","domain":"b.com","service":"b"}],
                         "services":{"b":[{"addr":"127.0.0.1:2"}]}}"#,
                ),
            )
            .unwrap();
        assert_eq!(applied.removed.len(), 1);
        assert_eq!(applied.removed[0].path, "/x/");
        // What came and went per service, for `backend-up`/`backend-down` and drains.
        fn addrs(l: &[BackendAddr]) -> Vec<&str> {
            l.iter().map(|b| b.addr.as_str()).collect()
        }
        let changed: Vec<(&str, Vec<&str>, Vec<&str>)> = applied
            .backends
            .iter()
            .map(|c| (c.service.as_str(), addrs(&c.added), addrs(&c.removed)))
            .collect();
        assert_eq!(
            changed,
            vec![
                ("b", vec!["127.0.0.1:2"], vec![]),
                ("a", vec![], vec!["127.0.0.1:1"])
            ]
        );
        let after = store.list(None);
        let a = after.iter().find(|r| r.domain == "a.com").unwrap();
        assert_eq!(a.service, "a2");
        assert_eq!(a.id, before["a.com/"].id, "updated in place");
        let tcp = after.iter().find(|r| r.kind == RouteType::Tcp).unwrap();
        assert_eq!(tcp.port, 3000, "allocated port kept");
        assert!(after.iter().any(|r| r.domain == "b.com"));
        assert!(
            after.iter().any(|r| r.id == api_route.id),
            "API routes untouched"
        );
        assert!(
            store.backends("a").is_empty(),
            "service gone from the file is emptied"
        );
        assert_eq!(
            store.backends("b"),
            vec![BackendAddr {
                addr: "127.0.0.1:2".into(),
                leader: false,
                app: String::new(),
                job_id: String::new()
            }]
        );
        // A bad file is an error and names the culprit.
        let e = f.apply(
            &mut store,
            file(r#"{"routes":[{"type":"http","domain":"c.com","path":"/sub/","service":"c"}]}"#),
        );
        assert!(e.unwrap_err().contains("c.com/sub/"));
    }

    #[test]
    fn a_refused_reload_changes_nothing() {
        let mut store = store();
        let mut f = FileRoutes::default();
        let v1 = r#"{"routes":[{"type":"http","domain":"a.com","service":"a"},
                               {"type":"http","domain":"a.com","path":"/x","service":"x"}],
                     "services":{"a":[{"addr":"127.0.0.1:1"}]}}"#;
        f.apply(&mut store, file(v1)).unwrap();
        let snapshot = |s: &Store| {
            (
                serde_json::to_string(&s.list(None)).unwrap(),
                s.services().clone(),
            )
        };
        let before = snapshot(&store);
        // Every step before the bad route would succeed on its own: /x/ removed, a.com
        // updated, b.com and its service added, a's backends emptied. The last route
        // has no root on its domain.
        let bad = r#"{"routes":[{"type":"http","domain":"a.com","service":"a2"},
                                {"type":"http","domain":"b.com","service":"b"},
                                {"type":"http","domain":"c.com","path":"/sub/","service":"c"}],
                      "services":{"b":[{"addr":"127.0.0.1:2"}]}}"#;
        let e = f.apply(&mut store, file(bad)).unwrap_err();
        assert!(e.contains("c.com/sub/"), "{e}");
        assert_eq!(snapshot(&store), before, "a refused reload left changes");
        // The file state is the old one too: a good reload after the bad one removes
        // /x/ (which only v1 declared) and updates a.com in place.
        let good = r#"{"routes":[{"type":"http","domain":"a.com","service":"a2"}]}"#;
        let applied = f.apply(&mut store, file(good)).unwrap();
        assert_eq!(applied.removed.len(), 1);
        assert_eq!(applied.removed[0].path, "/x/");
        let routes = store.list(None);
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].service, "a2");
        assert!(store.backends("a").is_empty());
    }

    /// A routes file's domains are checked as the API's are: one that can never match a
    /// request refuses the file.
    #[test]
    fn a_file_route_whose_domain_can_never_match_is_refused() {
        let mut store = store();
        let mut f = FileRoutes::default();
        let bad = r#"{"routes":[{"type":"http","domain":"a.com","service":"a"},
                                {"type":"http","domain":"b.com:8080","service":"b"}]}"#;
        let e = f.apply(&mut store, file(bad)).unwrap_err();
        assert!(e.contains("b.com:8080") && e.contains("port"), "{e}");
        assert!(store.list(None).is_empty());
        let good = r#"{"routes":[{"type":"http","domain":"b.com.","service":"b"}]}"#;
        f.apply(&mut store, file(good)).unwrap();
        assert_eq!(store.list(None)[0].domain, "b.com");
    }

    /// A routes file cannot put a certificate on a plain listener's port either (as the
    /// API cannot): the file is refused, naming the route and why, and changes nothing.
    #[test]
    fn a_file_route_with_a_certificate_on_a_plain_port_is_refused() {
        let ports = Ports {
            default_http: vec![8080],
            additional_http: vec![8081, 8443],
            additional_tls: vec![8443],
            tcp_range: (3000, 3010),
            tcp_ip: None,
        };
        let mut store = Store::new(ports, false);
        let c = rcgen::generate_simple_self_signed(vec!["a.com".into()]).unwrap();
        let (cert, key) = (c.cert.pem(), c.key_pair.serialize_pem());
        let doc = |port: u16| {
            serde_json::json!({"routes": [{"type": "http", "domain": "a.com", "service": "a",
                "port": port, "certificate": {"cert": cert, "key": key}}]})
            .to_string()
        };
        let mut f = FileRoutes::default();
        let e = f.apply(&mut store, file(&doc(8081))).unwrap_err();
        assert!(
            e.contains("a.com") && e.contains("Port not reserved for HTTPS traffic"),
            "{e}"
        );
        assert!(store.list(None).is_empty());
        assert!(store.certs.list().is_empty());
        f.apply(&mut store, file(&doc(8443))).unwrap();
        assert_eq!(store.list(None)[0].port, 8443);
    }

    /// Several `port: 0` TCP routes are several routes, each with its own port kept across
    /// reloads; a route declared twice is refused, not merged into one.
    #[test]
    fn port_zero_tcp_routes_are_distinct_and_duplicates_refused() {
        let mut store = store();
        let mut f = FileRoutes::default();
        let two = r#"{"routes":[{"type":"tcp","port":0,"service":"db"},
                                {"type":"tcp","port":0,"service":"cache"}]}"#;
        f.apply(&mut store, file(two)).unwrap();
        let ports = |s: &Store| -> BTreeMap<String, u16> {
            s.list(None)
                .into_iter()
                .map(|r| (r.service.clone(), r.port))
                .collect()
        };
        let first = ports(&store);
        assert_eq!(first.len(), 2, "{first:?}");
        assert_ne!(first["db"], first["cache"]);
        f.apply(&mut store, file(two)).unwrap();
        assert_eq!(ports(&store), first, "ports kept across a reload");

        for dup in [
            r#"{"routes":[{"type":"tcp","port":0,"service":"db"},{"type":"tcp","port":0,"service":"db"}]}"#,
            r#"{"routes":[{"type":"tcp","port":0,"service":"db","leader":true},{"type":"tcp","port":0,"service":"db","leader":true}]}"#,
            r#"{"routes":[{"type":"tcp","port":3005,"service":"db"},{"type":"tcp","port":3005,"service":"x"}]}"#,
            r#"{"routes":[{"type":"http","domain":"a.com","service":"a"},{"type":"http","domain":"A.com","service":"b"}]}"#,
        ] {
            let e = f.apply(&mut store, file(dup)).unwrap_err();
            assert!(e.contains("declared twice"), "{dup}: {e}");
            assert_eq!(ports(&store), first, "{dup}: a refused reload left changes");
        }
    }

    /// A database's write (leader) and read ports: two `port: 0` routes of one service.
    #[test]
    fn leader_and_any_port_zero_routes_of_one_service_are_two() {
        let mut store = store();
        let mut f = FileRoutes::default();
        let both = r#"{"routes":[{"type":"tcp","port":0,"service":"pg","leader":true},
                                 {"type":"tcp","port":0,"service":"pg"}]}"#;
        f.apply(&mut store, file(both)).unwrap();
        let routes = store.list(None);
        assert_eq!(routes.len(), 2);
        assert_ne!(routes[0].port, routes[1].port);
    }

    /// A record from a build that keyed all `port: 0` TCP routes as `(tcp, "", 0, "")`: the
    /// first reload after the takeover keeps the route, its id and its port.
    #[test]
    fn a_handed_over_record_with_the_old_key_keeps_the_route() {
        let mut store = store();
        let mut f = FileRoutes::default();
        // Another route takes the first port, so a re-added route would get a different one.
        let one = r#"{"routes":[{"type":"tcp","port":0,"service":"db"}]}"#;
        f.apply(&mut store, file(one)).unwrap();
        let before = store.list(None)[0].clone();
        let mut rec = f.record();
        for r in &mut rec.routes {
            r.1 = String::new();
        }
        let mut old = FileRoutes::from_record(rec);
        let applied = old.apply(&mut store, file(one)).unwrap();
        assert!(applied.removed.is_empty(), "{:?}", applied.removed);
        let after = store.list(None);
        assert_eq!(after.len(), 1);
        assert_eq!(
            (after[0].id.clone(), after[0].port),
            (before.id, before.port)
        );
    }

    /// A reload re-applies every route of the file, but one declared as it was is not
    /// touched: no `set` for it (each would be re-broadcast on `/events`), no new
    /// `updated_at`.
    #[test]
    fn a_reload_of_an_unchanged_file_sets_nothing() {
        let mut store = store();
        let mut f = FileRoutes::default();
        let v1 = r#"{"routes":[{"type":"http","domain":"a.com","service":"a"},
                               {"type":"http","domain":"a.com","path":"/x","service":"x"},
                               {"type":"tcp","port":0,"service":"db"}],
                     "services":{"a":[{"addr":"127.0.0.1:1"}]}}"#;
        let first = f.apply(&mut store, file(v1)).unwrap();
        assert_eq!(first.set.len(), 3);
        let before = store.list(None);
        let again = f.apply(&mut store, file(v1)).unwrap();
        assert!(again.set.is_empty(), "{:?}", again.set);
        assert!(again.removed.is_empty() && again.backends.is_empty());
        assert_eq!(store.list(None), before, "unchanged routes were rewritten");
        // One route changed: only it is set.
        let v2 = v1.replace(r#""service":"x""#, r#""service":"x2""#);
        let changed = f.apply(&mut store, file(&v2)).unwrap();
        assert_eq!(changed.set.len(), 1, "{:?}", changed.set);
        assert_eq!(changed.set[0].service, "x2");
        assert_eq!(
            changed.set[0].id,
            before.iter().find(|r| r.path == "/x/").unwrap().id
        );
    }

    /// The store drops a trailing dot from a domain; the file's keys and order do too:
    /// `a.com.`'s root comes before `a.com`'s sub-path, and writing `a.com.` as `a.com`
    /// later is the same route (same id), not a new one.
    #[test]
    fn a_trailing_dot_is_the_same_domain_in_a_routes_file() {
        let mut store = store();
        let mut f = FileRoutes::default();
        let dotted = r#"{"routes":[{"type":"http","domain":"a.com","path":"/x/","service":"x"},
                                   {"type":"http","domain":"a.com.","service":"a"}]}"#;
        f.apply(&mut store, file(dotted)).unwrap();
        let routes = store.list(None);
        assert_eq!(routes.len(), 2);
        assert!(routes.iter().all(|r| r.domain == "a.com"), "{routes:?}");
        let root = routes.iter().find(|r| r.path == "/").unwrap().clone();
        let plain = r#"{"routes":[{"type":"http","domain":"a.com","path":"/x/","service":"x"},
                                  {"type":"http","domain":"A.com","service":"a"}]}"#;
        let applied = f.apply(&mut store, file(plain)).unwrap();
        assert!(applied.removed.is_empty(), "{:?}", applied.removed);
        assert!(applied.set.is_empty(), "{:?}", applied.set);
        assert_eq!(
            store.get(RouteType::Http, &root.id),
            Some(&root),
            "the root route was re-created"
        );
        // Both spellings at once are one route declared twice.
        let twice = r#"{"routes":[{"type":"http","domain":"a.com","service":"a"},
                                  {"type":"http","domain":"a.com.","service":"b"}]}"#;
        let e = f.apply(&mut store, file(twice)).unwrap_err();
        assert!(e.contains("declared twice"), "{e}");
        // A record handed over by a build that kept the dot in its keys: the same route.
        let mut rec = f.record();
        for r in &mut rec.routes {
            r.1.push('.');
        }
        let mut old = FileRoutes::from_record(rec);
        let applied = old.apply(&mut store, file(plain)).unwrap();
        assert!(applied.removed.is_empty(), "{:?}", applied.removed);
        assert_eq!(store.get(RouteType::Http, &root.id), Some(&root));
    }
}
