use super::*;
use flynn_api::ErrorCode;

fn store() -> Store {
    let ports = Ports {
        default_http: vec![8080],
        // 8081 has a TLS listener, 8082 a plain one.
        additional_http: vec![8081, 8082],
        additional_tls: vec![8081],
        tcp_range: (3000, 3002),
        tcp_ip: None,
    };
    Store::new(ports, true)
}

/// A new self-signed certificate for `name`, as a route carries it.
fn cert(name: &str) -> Certificate {
    let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    Certificate {
        id: String::new(),
        routes: Vec::new(),
        cert: c.cert.pem(),
        key: c.key_pair.serialize_pem(),
        created_at: None,
        updated_at: None,
    }
}

fn http(domain: &str, path: &str) -> Route {
    Route {
        path: path.into(),
        ..Route::http(domain, "web")
    }
}

#[test]
fn http_route_defaults_and_conflicts() {
    let mut s = store();
    let r = s.add(http("example.com", "")).unwrap();
    assert_eq!(r.path, "/");
    assert!(!r.id.is_empty() && r.created_at.is_some());
    let e = s.add(http("EXAMPLE.com", "/")).unwrap_err();
    assert_eq!(
        (e.code, e.message.as_str()),
        (ErrorCode::Conflict, "Duplicate route")
    );
    assert!(e.detail.is_some());
    let sub = s.add(http("example.com", "/baz")).unwrap();
    assert_eq!(sub.path, "/baz/");
}

#[test]
fn invalid_paths_and_missing_root() {
    let mut s = store();
    let e = s.add(http("a.com", "noleadingslash/")).unwrap_err();
    assert_eq!((e.status(), e.message.as_str()), (400, "Invalid route"));
    let e = s.add(http("a.com", "/sub/")).unwrap_err();
    assert_eq!(e.message, "Invalid route");
    let e = s.add(http("", "/")).unwrap_err();
    assert_eq!(e.code, ErrorCode::ValidationError);
}

#[test]
fn the_only_root_cannot_move_off_slash() {
    // Found by the admin_api fuzz target: moving the only `/` route to `/x/` passed the
    // root check because the route still counted as its own root.
    let mut s = store();
    let root = s.add(http("a.com", "/")).unwrap();
    let e = s
        .update(RouteType::Http, &root.id, http("a.com", "/x/"))
        .unwrap_err();
    assert_eq!((e.status(), e.message.as_str()), (400, "Invalid route"));
    assert_eq!(s.get(RouteType::Http, &root.id).unwrap().path, "/");
    // A non-root route still moves freely while the root stays.
    let other = s.add(http("a.com", "/y/")).unwrap();
    let moved = s
        .update(RouteType::Http, &other.id, http("a.com", "/z/"))
        .unwrap();
    assert_eq!(moved.path, "/z/");
}

#[test]
fn a_refused_update_stores_no_certificate() {
    // Found in review: PUT with an inline certificate stored the certificate before the
    // path checks refused the update, leaving it listed in GET /certificates.
    let mut s = store();
    s.add(http("a.com", "/")).unwrap();
    let sub = s.add(http("a.com", "/x/")).unwrap();
    let with_cert = Route {
        certificate: Some(cert("a.com")),
        ..http("a.com", "/")
    };
    let e = s
        .update(RouteType::Http, &sub.id, with_cert.clone())
        .unwrap_err();
    assert_eq!(e.status(), 409, "{e:?}");
    assert!(s.certs.list().is_empty(), "{:?}", s.certs.list());
    assert_eq!(s.get(RouteType::Http, &sub.id).unwrap().certificate, None);
    // Accepted, the same certificate is stored once and used by the route.
    let ok = s
        .update(
            RouteType::Http,
            &sub.id,
            Route {
                path: "/x/".into(),
                ..with_cert
            },
        )
        .unwrap();
    let id = ok.certificate.unwrap().id;
    assert_eq!(s.certs.list().len(), 1);
    assert_eq!(s.certs.list()[0].id, id);
}

#[test]
fn delete_root_with_dependents() {
    let mut s = store();
    let root = s.add(http("a.com", "/")).unwrap();
    let sub = s.add(http("a.com", "/x/")).unwrap();
    let e = s.remove(RouteType::Http, &root.id).unwrap_err();
    assert_eq!(e.message, "Route has dependent routes");
    s.remove(RouteType::Http, &sub.id).unwrap();
    s.remove(RouteType::Http, &root.id).unwrap();
    assert_eq!(
        s.remove(RouteType::Http, &root.id).unwrap_err().status(),
        404
    );
}

#[test]
fn tcp_ports() {
    let mut s = store();
    let a = s.add(Route::tcp(0, "db")).unwrap();
    assert_eq!(a.port, 3000);
    let b = s.add(Route::tcp(0, "db")).unwrap();
    assert_eq!(b.port, 3001);
    assert_eq!(
        s.add(Route::tcp(3001, "db")).unwrap_err().message,
        "Duplicate route"
    );
    for p in [80, 443, 8080, 8081] {
        let e = s.add(Route::tcp(p, "db")).unwrap_err();
        assert_eq!(
            (e.status(), e.message.as_str()),
            (409, "Port reserved for HTTP/HTTPS traffic")
        );
    }
    s.add(Route::tcp(0, "db")).unwrap();
    assert_eq!(s.add(Route::tcp(0, "db")).unwrap_err().status(), 409);
}

#[test]
fn http_ports_must_be_listeners() {
    let mut s = store();
    let mut r = http("a.com", "/");
    r.port = 9999;
    assert_eq!(
        s.add(r.clone()).unwrap_err().message,
        "Port not reserved for HTTP traffic"
    );
    r.port = 8081;
    s.add(r).unwrap();
}

/// A route carrying a certificate names a port with a TLS listener (or the default
/// ports): on a plain listener no handshake would ever present it. Added, updated or
/// brought by the legacy fields alike; refused before the certificate is stored.
#[test]
fn certificates_only_on_ports_with_a_tls_listener() {
    let mut s = store();
    let on = |port: u16, r: Route| Route { port, ..r };
    let with_cert = |r: Route| Route {
        certificate: Some(cert("a.com")),
        ..r
    };
    let legacy = |r: Route| {
        let c = cert("a.com");
        Route {
            tls_cert: c.cert,
            tls_key: c.key,
            ..r
        }
    };
    let by_id = |r: Route, id: &str| Route {
        certificate: Some(Certificate {
            id: id.into(),
            ..cert("a.com")
        }),
        ..r
    };
    let pem = cert("x.com");
    let id = s.certs.add(&pem.cert, &pem.key).unwrap().id;
    for r in [
        with_cert(on(8082, http("a.com", "/"))),
        legacy(on(8082, http("a.com", "/"))),
        by_id(on(8082, http("a.com", "/")), &id),
    ] {
        let e = s.add(r).unwrap_err();
        assert_eq!(
            (e.code, e.status(), e.message.as_str()),
            (
                ErrorCode::ValidationError,
                400,
                "Port not reserved for HTTPS traffic"
            )
        );
    }
    assert!(s.list(None).is_empty());
    assert_eq!(
        s.certs.list().len(),
        1,
        "a refused route stores no certificate"
    );
    // Without a certificate the plain port is fine; with one, the TLS port and the
    // default ports.
    let plain = s.add(on(8082, http("a.com", "/"))).unwrap();
    s.add(with_cert(on(8081, http("a.com", "/")))).unwrap();
    s.add(with_cert(http("a.com", "/"))).unwrap();
    // An update cannot bring one to the plain port either.
    let e = s
        .update(RouteType::Http, &plain.id, by_id(http("a.com", "/"), &id))
        .unwrap_err();
    assert_eq!(e.message, "Port not reserved for HTTPS traffic");
    assert!(s
        .get(RouteType::Http, &plain.id)
        .unwrap()
        .certificate
        .is_none());
    // A handed-over route keeps what an older build accepted.
    s.restore(with_cert(on(8082, http("b.com", "/")))).unwrap();
}

/// Only routes on ports with a TLS listener decide a domain's certificate: a plain
/// additional port's root (lower than the TLS port's) does not take the TLS port's
/// certificate away, and a domain routed only on a plain port has no handshake.
#[test]
fn plain_port_routes_do_not_decide_certificates() {
    let d = cert("default");
    let default = crate::tls::parse_keypair(&d.cert, &d.key).unwrap().key;
    let mut s = store();
    s.add(Route {
        port: 8082,
        ..http("a.com", "/")
    })
    .unwrap();
    let tls = s
        .add(Route {
            port: 8081,
            certificate: Some(cert("a.com")),
            ..http("a.com", "/")
        })
        .unwrap();
    let key = s.certs.key(&tls.certificate.unwrap().id).unwrap();
    let got = s.cert_store(Some(default.clone())).lookup("a.com").unwrap();
    assert!(Arc::ptr_eq(&got, &key), "the TLS port's certificate");

    s.add(Route {
        port: 8082,
        ..http("plain.com", "/")
    })
    .unwrap();
    assert!(s.cert_store(Some(default)).lookup("plain.com").is_none());
}

#[test]
fn list_newest_first_and_filter() {
    let mut s = store();
    let mut a = http("a.com", "/");
    a.parent_ref = "p1".into();
    let a = s.add(a).unwrap();
    let b = s.add(http("b.com", "/")).unwrap();
    let ids: Vec<_> = s.list(None).into_iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![b.id.clone(), a.id.clone()]);
    let ids: Vec<_> = s.list(Some("p1")).into_iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![a.id]);
}

/// A handover re-adds routes sorted by domain and path: the list stays newest first.
#[test]
fn handed_over_routes_list_newest_first() {
    let mut s = store();
    let made: Vec<Route> = ["z.com", "a.com", "m.com"]
        .into_iter()
        .map(|d| s.add(http(d, "/")).unwrap())
        .collect();
    let before: Vec<_> = s.list(None).into_iter().map(|r| r.id).collect();
    assert_eq!(
        before,
        vec![made[2].id.clone(), made[1].id.clone(), made[0].id.clone()]
    );
    let mut next = store();
    let mut handed = s.list(None);
    handed.sort_by_key(|r| r.domain.clone());
    for r in handed {
        next.restore(r).unwrap();
    }
    let after: Vec<_> = next.list(None).into_iter().map(|r| r.id).collect();
    assert_eq!(after, before);
}

/// New and moved routes may not have empty path segments; a handed-over one is kept.
#[test]
fn empty_path_segments_are_refused_but_restored() {
    let mut s = store();
    s.add(http("a.com", "/")).unwrap();
    for p in ["//", "/a//b/"] {
        let e = s.add(http("a.com", p)).unwrap_err();
        assert_eq!(e.message, "Invalid route", "{p}");
    }
    let sub = s.add(http("a.com", "/a/")).unwrap();
    let mut moved = sub.clone();
    moved.path = "/a//".into();
    assert!(s.update(RouteType::Http, &sub.id, moved).is_err());
    let mut old = http("a.com", "/b//");
    old.id = "handed".into();
    s.restore(old).unwrap();
    assert_eq!(s.get(RouteType::Http, "handed").unwrap().path, "/b//");
}

#[test]
fn update_replaces_mutable_fields() {
    let mut s = store();
    let r = s.add(http("a.com", "/")).unwrap();
    let mut u = r.clone();
    u.service = "other".into();
    u.sticky = true;
    u.leader = true;
    u.domain = "ignored.com".into();
    let out = s.update(RouteType::Http, &r.id, u).unwrap();
    assert_eq!(
        (out.service.as_str(), out.sticky, out.leader),
        ("other", true, true)
    );
    assert_eq!(out.domain, "a.com");
    assert_eq!(
        s.update(RouteType::Http, "nope", r).unwrap_err().status(),
        404
    );
}

#[test]
fn parse_route_errors() {
    assert_eq!(
        Store::parse_route(b"{").unwrap_err().code,
        ErrorCode::SyntaxError
    );
    let e = Store::parse_route(br#"{"type":"udp"}"#).unwrap_err();
    assert_eq!(e.message, "type Invalid route type");
    assert_eq!(
        Store::parse_route(br#"{"type":"http","port":"x"}"#)
            .unwrap_err()
            .code,
        ErrorCode::SyntaxError
    );
}

#[test]
fn backends_validated_and_diffed() {
    let mut s = store();
    let b = |a: &str| BackendAddr {
        addr: a.into(),
        leader: false,
        app: String::new(),
        job_id: String::new(),
    };
    assert_eq!(
        s.set_backends("web", vec![b("nope")]).unwrap_err().status(),
        400
    );
    let (add, rm) = s
        .set_backends("web", vec![b("127.0.0.1:1"), b("127.0.0.1:2")])
        .unwrap();
    assert_eq!((add.len(), rm.len()), (2, 0));
    let (add, rm) = s
        .set_backends("web", vec![b("127.0.0.1:2"), b("127.0.0.1:3")])
        .unwrap();
    assert_eq!(
        (add[0].addr.as_str(), rm[0].addr.as_str()),
        ("127.0.0.1:3", "127.0.0.1:1")
    );
    assert_eq!(s.backends("web").len(), 2);
    // One spelling per address: a repeat is one backend, another spelling no change.
    let (add, rm) = s
        .set_backends("web", vec![b("[0:0::1]:9"), b("[::1]:9")])
        .unwrap();
    assert_eq!((add.len(), rm.len()), (1, 2), "{add:?} {rm:?}");
    assert_eq!(s.backends("web").len(), 1);
    assert_eq!(s.backends("web")[0].addr, "[::1]:9");
    let (add, rm) = s.set_backends("web", vec![b("[0::1]:9")]).unwrap();
    assert!(add.is_empty() && rm.is_empty(), "{add:?} {rm:?}");
    assert_eq!(s.backends("web").len(), 1);
}

#[test]
fn sticky_needs_a_cookie_key() {
    let ports = Ports {
        default_http: vec![8080],
        additional_http: vec![],
        additional_tls: vec![],
        tcp_range: (3000, 3002),
        tcp_ip: None,
    };
    let mut s = Store::new(ports, false);
    let mut r = http("a.com", "/");
    r.sticky = true;
    let e = s.add(r).unwrap_err();
    assert_eq!(e.status(), 400);
    assert_eq!(
        e.message,
        "sticky routes need the router to be started with COOKIE_KEY"
    );
}

/// With a TCP address set, a port another socket listens on is refused when added (409; the
/// router's tests check that automatic allocation skips it), and kept when a handed-over
/// route is restored (its listener comes from the old process).
#[test]
fn tcp_ports_are_checked_by_a_bind_except_on_restore() {
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held = squatter.local_addr().unwrap().port();
    let mut s = Store::new(
        Ports {
            default_http: vec![8080],
            additional_http: vec![],
            additional_tls: vec![],
            tcp_range: (held, held.saturating_add(1)),
            tcp_ip: Some([127, 0, 0, 1].into()),
        },
        false,
    );
    let e = s.add(Route::tcp(held, "db")).unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict, "{e:?}");
    assert!(e.message.contains("cannot be listened on"), "{}", e.message);
    assert!(s.list(None).is_empty());
    s.restore(Route::tcp(held, "db")).unwrap();
    assert_eq!(s.list(None)[0].port, held);
}

/// A port held by another program's SO_REUSEPORT listeners (an nginx with `reuseport`,
/// another router: same user) is refused and skipped too: the router's listeners would
/// join their group and share the port's connections with it. A port this router's own
/// listeners hold is not another program's.
#[test]
fn tcp_ports_of_another_reuseport_group_are_refused_but_not_our_own() {
    use std::os::fd::AsRawFd;
    let foreign = flynn_runtime::reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
    let held = foreign.local_addr().unwrap().port();
    let mut s = Store::new(
        Ports {
            default_http: vec![8080],
            additional_http: vec![],
            additional_tls: vec![],
            tcp_range: (held, held),
            tcp_ip: Some([127, 0, 0, 1].into()),
        },
        false,
    );
    let e = s.add(Route::tcp(held, "db")).unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict, "{e:?}");
    assert!(
        e.message
            .contains(&format!("Port {held} cannot be listened on")),
        "{}",
        e.message
    );
    let e = s.add(Route::tcp(0, "db")).unwrap_err();
    assert_eq!(e.message, "No TCP ports available");
    assert!(s.list(None).is_empty());
    // The same socket registered as one of this router's TCP route listeners.
    let own: crate::shared::TcpFds = Default::default();
    own.lock().unwrap().insert(held, vec![foreign.as_raw_fd()]);
    s.own_tcp_listeners(own);
    assert_eq!(s.add(Route::tcp(held, "db")).unwrap().port, held);
}

#[test]
fn a_domains_certificate_is_its_root_routes() {
    let (a, b) = (cert("a.com"), cert("a.com"));
    // Many sub-path routes with certificate A (their ids sort anywhere), the root with B.
    let mut s = store();
    let root = s
        .add(Route {
            certificate: Some(b.clone()),
            ..http("a.com", "/")
        })
        .unwrap();
    for i in 0..8 {
        s.add(Route {
            certificate: Some(a.clone()),
            ..http("a.com", &format!("/p{i}/"))
        })
        .unwrap();
    }
    let root_key = s.certs.key(&root.certificate.unwrap().id).unwrap();
    let got = s.cert_store(None).lookup("a.com").unwrap();
    assert!(Arc::ptr_eq(&got, &root_key), "the root route's certificate");

    // A root without a certificate: the default keypair, not a sub-path route's.
    let mut s = store();
    s.add(http("c.com", "/")).unwrap();
    s.add(Route {
        certificate: Some(cert("c.com")),
        ..http("c.com", "/x/")
    })
    .unwrap();
    assert!(s.cert_store(None).lookup("c.com").is_none());
}

/// A domain with `/` routes on several ports has the default port's route's certificate
/// for every handshake: the default keypair when that route has none, not another port's.
#[test]
fn a_domains_certificate_is_its_default_port_roots() {
    let d = cert("default");
    let default = crate::tls::parse_keypair(&d.cert, &d.key).unwrap().key;
    let other_port = || Route {
        port: 8081,
        certificate: Some(cert("a.com")),
        ..http("a.com", "/")
    };
    // The other port's root is added first (and its id may sort first): it does not count.
    let mut s = store();
    s.add(other_port()).unwrap();
    s.add(http("a.com", "/")).unwrap();
    let got = s.cert_store(Some(default.clone())).lookup("a.com").unwrap();
    assert!(
        Arc::ptr_eq(&got, &default),
        "the default port's root has none"
    );

    // Without a root on the default port, the other port's.
    let mut s = store();
    let other = s.add(other_port()).unwrap();
    let key = s.certs.key(&other.certificate.unwrap().id).unwrap();
    let got = s.cert_store(Some(default)).lookup("a.com").unwrap();
    assert!(Arc::ptr_eq(&got, &key));
}

#[test]
fn a_domain_too_long_to_route_is_refused() {
    let mut s = store();
    let long = format!("{}.com", "a".repeat(flynn_routes::MAX_DOMAIN));
    let e = s.add(http(&long, "/")).unwrap_err();
    assert_eq!(e.code, ErrorCode::ValidationError);
    assert!(e.message.contains("at most"), "{}", e.message);
}

/// A domain is a host name a request can have: no port, scheme, spaces or empty labels.
/// Everything a lookup can match is kept: wildcards, the catch-all, IP addresses,
/// underscores; a fully qualified name's trailing dot is dropped (lookups drop the
/// `Host`'s).
#[test]
fn domains_that_can_never_match_are_refused() {
    let mut s = store();
    for (given, stored) in [
        ("example.com", "example.com"),
        ("EXAMPLE.org", "EXAMPLE.org"),
        ("example.net.", "example.net"),
        ("*.example.com", "*.example.com"),
        ("*.example.org.", "*.example.org"),
        ("*", "*"),
        ("localhost", "localhost"),
        ("my_app-1.example.com", "my_app-1.example.com"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]", "[::1]"),
        ("[2001:db8::1]", "[2001:db8::1]"),
    ] {
        let r = s
            .add(http(given, "/"))
            .unwrap_or_else(|e| panic!("{given:?}: {}", e.message));
        assert_eq!(r.domain, stored);
    }
    let long_label = format!("{}.com", "a".repeat(64));
    for bad in [
        "example.com:8080",
        " example.com",
        "example.com ",
        "http://x",
        "x/y",
        "example..com",
        ".example.com",
        "example.com..",
        "a.*.com",
        "*.*.com",
        "*example.com",
        "*.",
        "[::1",
        "[nope]",
        "::1",
        "ex ample.com",
        "é.com",
        &long_label,
    ] {
        let e = s.add(http(bad, "/")).unwrap_err();
        assert_eq!(e.code, ErrorCode::ValidationError, "{bad:?}: {}", e.message);
        assert!(e.message.starts_with("domain "), "{bad:?}: {}", e.message);
        assert_eq!(e.detail, Some(serde_json::json!({"field": "domain"})));
    }
    // 63 characters is a label's most.
    s.add(http(&format!("{}.com", "a".repeat(63)), "/"))
        .unwrap();
}

/// A handed-over route is kept as it is, whatever its domain (a takeover never fails on
/// what an older build stored).
#[test]
fn a_handed_over_route_with_an_unmatchable_domain_is_kept() {
    let mut s = store();
    s.restore(http("example.com:8080", "/")).unwrap();
    assert_eq!(s.list(None)[0].domain, "example.com:8080");
}

/// An older build stored `a.com.` beside `a.com`, and `.` alone: without the dot they repeat
/// a route or are blank, and are left out of a takeover instead of failing it.
#[test]
fn handed_over_dotted_duplicates_are_left_out() {
    let mut s = store();
    s.restore(http("a.com", "/")).unwrap();
    s.restore(http("a.com.", "/")).unwrap();
    s.restore(http(".", "/")).unwrap();
    s.restore(http("b.com.", "/")).unwrap();
    let mut domains: Vec<String> = s.list(None).into_iter().map(|r| r.domain).collect();
    domains.sort();
    assert_eq!(domains, ["a.com", "b.com"]);
    // Other refusals still fail it.
    assert!(s.restore(http("a.com", "/")).is_err());
}

/// Spec §1.2: a new route tracks drains unless it says otherwise, and a PUT replaces
/// service, leader, sticky, path, keep-alives and certificate: `drain_backends` stays as
/// stored whatever the body says (a Go client always sends it), `grpc` when the body
/// leaves it out.
#[test]
fn drain_backends_defaults_true_and_put_keeps_unnamed_flags() {
    let mut s = store();
    let r = Store::parse_route(br#"{"type":"http","domain":"a.com","service":"web"}"#).unwrap();
    assert_eq!(
        r.drain_backends,
        Some(true),
        "created without the field: tracked"
    );
    let off = Store::parse_route(
        br#"{"type":"http","domain":"b.com","service":"web","drain_backends":false}"#,
    )
    .unwrap();
    assert_eq!(off.drain_backends, Some(false), "an explicit false is kept");
    let t = Store::parse_route(br#"{"type":"tcp","service":"db"}"#).unwrap();
    assert_eq!(t.drain_backends, Some(true));

    let mut r = r;
    r.grpc = Some(true);
    let r = s.add(r).unwrap();
    assert_eq!((r.drain_backends, r.grpc), (Some(true), Some(true)));
    let u = Store::parse_update(br#"{"type":"http","service":"web2"}"#).unwrap();
    let out = s.update(RouteType::Http, &r.id, u).unwrap();
    assert_eq!(out.service, "web2");
    assert_eq!(
        out.drain_backends,
        Some(true),
        "PUT without drain_backends cleared it"
    );
    assert_eq!(out.grpc, Some(true), "PUT without grpc cleared it");
    let u = Store::parse_update(
        br#"{"type":"http","service":"web2","drain_backends":false,"grpc":false}"#,
    )
    .unwrap();
    let out = s.update(RouteType::Http, &r.id, u).unwrap();
    // Stored as served: `grpc` only when on.
    assert_eq!(
        (out.drain_backends, out.grpc),
        (Some(true), None),
        "grpc named is replaced, drain_backends never is"
    );
    // Nor is an untracked route's turned on.
    let off = s.add(off).unwrap();
    let u =
        Store::parse_update(br#"{"type":"http","service":"web","drain_backends":true}"#).unwrap();
    let kept = s.update(RouteType::Http, &off.id, u).unwrap();
    assert_eq!(kept.drain_backends, Some(false));
    // A route the store did not get through the API's body parsing (a routes file, a
    // takeover) names neither: not tracked, no gRPC.
    let plain = s.add(http("c.com", "/")).unwrap();
    assert_eq!((plain.drain_backends, plain.grpc), (Some(false), None));
    assert_eq!(s.get(RouteType::Http, &r.id).unwrap(), &out);
}

/// An update that changes nothing leaves the route (and the version) alone when asked to.
#[test]
fn update_if_changed_leaves_an_unchanged_route_alone() {
    let mut s = store();
    let r = s.add(http("a.com", "/")).unwrap();
    let v = s.table().version();
    assert_eq!(
        s.update_if_changed(RouteType::Http, &r.id, r.clone())
            .unwrap(),
        None
    );
    assert_eq!(s.get(RouteType::Http, &r.id).unwrap(), &r);
    assert_eq!(s.table().version(), v);
    let mut u = r.clone();
    u.sticky = true;
    let out = s
        .update_if_changed(RouteType::Http, &r.id, u)
        .unwrap()
        .expect("a change");
    assert!(out.sticky);
    assert!(s.table().version() > v);
}

/// Two entries of one address are one backend; a repeat marked leader makes it the
/// leader (two discoverd instances of one job, the second the service leader), as
/// `Backends::from_api` reads such a list.
#[test]
fn a_repeated_backend_keeps_the_repeats_leader_mark() {
    let mut s = store();
    let b = |a: &str, leader: bool| BackendAddr {
        addr: a.into(),
        leader,
        app: String::new(),
        job_id: String::new(),
    };
    s.set_backends(
        "web",
        vec![
            b("127.0.0.1:1", false),
            b("127.0.0.1:2", false),
            b("127.0.0.1:1", true),
        ],
    )
    .unwrap();
    let stored = s.backends("web");
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(
        (stored[0].addr.as_str(), stored[0].leader),
        ("127.0.0.1:1", true)
    );
    assert!(!stored[1].leader);
    let mut leader = http("a.com", "/");
    leader.leader = true;
    s.add(leader).unwrap();
    let t = s.table();
    let route = t.lookup_http(b"a.com", 0, b"/").unwrap();
    assert_eq!(
        &route.backends[..],
        &["127.0.0.1:1".parse::<std::net::SocketAddr>().unwrap()]
    );
}
