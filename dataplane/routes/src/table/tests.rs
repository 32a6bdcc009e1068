use super::*;

fn route(domain: &str, path: &str, service: &str) -> Route {
    Route {
        path: path.into(),
        id: format!("{domain}{path}"),
        ..Route::http(domain, service)
    }
}

fn table(routes: &[Route]) -> Table {
    let mut backends = HashMap::new();
    for (i, svc) in ["s1", "s2", "s3"].iter().enumerate() {
        let addr = format!("127.0.0.1:{}", 9001 + i);
        backends.insert(
            svc.to_string(),
            Backends::from_api(&[BackendAddr { addr, ..blank() }]).unwrap(),
        );
    }
    Table::build(routes, &backends, 1)
}

fn blank() -> BackendAddr {
    BackendAddr {
        addr: String::new(),
        leader: false,
        app: String::new(),
        job_id: String::new(),
    }
}

fn svc<'a>(t: &'a Table, host: &str, path: &str) -> Option<&'a str> {
    t.lookup_http(host.as_bytes(), 0, path.as_bytes())
        .map(|r| &*r.service)
}

#[test]
fn wildcards_exact_wins() {
    let t = table(&[
        route("foo.bar", "/", "s1"),
        route("*.foo.bar", "/", "s2"),
        route("dev.foo.bar", "/", "s3"),
    ]);
    let cases = [
        ("foo.bar", Some("s1")),
        ("flynn.foo.bar", Some("s2")),
        ("a.b.foo.bar", Some("s2")),
        ("dev.foo.bar", Some("s3")),
        ("DEV.Foo.BAR", Some("s3")),
        ("dev.foo.bar:80", Some("s3")),
        ("dev.foo.bar:443", Some("s3")),
        ("bar", None),
        ("other.com", None),
    ];
    for (host, want) in cases {
        assert_eq!(svc(&t, host, "/"), want, "{host}");
    }
}

#[test]
fn catch_all_is_last() {
    let t = table(&[route("*", "/", "s1"), route("*.bar", "/", "s2")]);
    assert_eq!(svc(&t, "foo", "/"), Some("s1"));
    assert_eq!(svc(&t, "example.com", "/"), Some("s1"));
    assert_eq!(svc(&t, "foo.bar", "/"), Some("s2"));
}

#[test]
fn most_specific_wildcard_first() {
    let t = table(&[route("*.com", "/", "s1"), route("*.example.com", "/", "s2")]);
    assert_eq!(svc(&t, "a.example.com", "/"), Some("s2"));
    assert_eq!(svc(&t, "a.other.com", "/"), Some("s1"));
}

#[test]
fn path_prefix_by_segment() {
    let t = table(&[
        route("d", "/", "s1"),
        route("d", "/2/", "s2"),
        route("d", "/3", "s3"),
    ]);
    let cases = [
        ("/", "s1"),
        ("/2", "s2"),
        ("/2/", "s2"),
        ("/2/x/y", "s2"),
        ("/20", "s1"),
        ("/3", "s3"),
        ("/3/", "s3"),
        ("/x", "s1"),
        ("", "s1"),
    ];
    for (path, want) in cases {
        assert_eq!(svc(&t, "d", path), Some(want), "{path}");
    }
}

#[test]
fn ports_are_part_of_the_key() {
    let mut r = route("d", "/", "s2");
    r.port = 8081;
    let t = table(&[route("d", "/", "s1"), r]);
    assert_eq!(
        t.lookup_http(b"d", 0, b"/").map(|r| &*r.service),
        Some("s1")
    );
    assert_eq!(
        t.lookup_http(b"d", 8081, b"/").map(|r| &*r.service),
        Some("s2")
    );
    assert!(t.lookup_http(b"d", 8082, b"/").is_none());
}

#[test]
fn unknown_service_has_no_backends() {
    let t = table(&[route("d", "/", "nope")]);
    assert!(t.lookup_http(b"d", 0, b"/").unwrap().backends.is_empty());
}

#[test]
fn leader_routes_only_get_the_leader() {
    let list = [
        BackendAddr {
            addr: "127.0.0.1:1".into(),
            ..blank()
        },
        BackendAddr {
            addr: "127.0.0.1:2".into(),
            leader: true,
            ..blank()
        },
    ];
    let mut b = HashMap::new();
    b.insert("s".to_string(), Backends::from_api(&list).unwrap());
    let mut r = route("d", "/", "s");
    r.leader = true;
    let t = Table::build(&[r, route("e", "/", "s")], &b, 1);
    let lead = t.lookup_http(b"d", 0, b"/").unwrap();
    assert_eq!(&*lead.backends, &["127.0.0.1:2".parse().unwrap()]);
    assert_eq!(t.lookup_http(b"e", 0, b"/").unwrap().backends.len(), 2);
}

/// Two entries of one address (a job's tcp and udp instances) are one backend, and it
/// leads when either entry is the leader, whichever comes first.
#[test]
fn a_repeated_address_keeps_its_leader_mark() {
    let entry = |leader| BackendAddr {
        addr: "127.0.0.1:1".into(),
        leader,
        ..blank()
    };
    for list in [[entry(false), entry(true)], [entry(true), entry(false)]] {
        let b = Backends::from_api(&list).unwrap();
        assert_eq!(b.addrs.len(), 1);
        assert_eq!(b.for_route(true), &["127.0.0.1:1".parse().unwrap()]);
    }
}

#[test]
fn overlong_and_odd_hosts_do_not_match_or_panic() {
    let t = table(&[route("*", "/", "s1")]);
    let long = "a".repeat(300);
    // Too long to be a domain: only the catch-all can take it.
    assert_eq!(svc(&t, &long, "/"), Some("s1"));
    let exact = table(&[route(&long, "/", "s2")]);
    assert!(svc(&exact, &long, "/").is_none());
    assert_eq!(svc(&t, "[::1]:80", "/"), Some("s1"));
    assert_eq!(svc(&t, ":", "/"), Some("s1"));
    assert_eq!(svc(&t, "...", "/"), Some("s1"));
}

#[test]
fn tcp_routes_by_port() {
    let t = table(&[Route {
        id: "t".into(),
        ..Route::tcp(3001, "s1")
    }]);
    assert_eq!(t.tcp_route(3001).map(|r| &*r.service), Some("s1"));
    assert!(t.tcp_route(3002).is_none());
    assert_eq!(t.tcp_ports().collect::<Vec<_>>(), vec![3001]);
}

#[test]
fn host_header_ports_are_stripped() {
    for (host, domain) in [
        ("example.com:8080", "example.com"),
        ("example.com", "example.com"),
        ("example.com:", "example.com"),
        ("a:b", "a:b"),
        ("[::1]", "[::1]"),
        ("[::1]:80", "[::1]"),
        ("::1", ":"),
        ("", ""),
    ] {
        assert_eq!(strip_port(host.as_bytes()), domain.as_bytes(), "{host}");
    }
}

/// A fully qualified `Host` (trailing dot) is the same host, for exact and wildcard
/// domains (as nginx takes it).
#[test]
fn a_hosts_trailing_dot_is_ignored() {
    let t = table(&[
        route("example.com", "/", "s1"),
        route("*.foo.bar", "/", "s2"),
    ]);
    assert_eq!(svc(&t, "example.com.", "/"), Some("s1"));
    assert_eq!(svc(&t, "EXAMPLE.com.:8080", "/"), Some("s1"));
    assert_eq!(svc(&t, "a.foo.bar.", "/"), Some("s2"));
    assert_eq!(svc(&t, "example.com..", "/"), None);
}

#[test]
fn path_segments_match_with_empty_segments_skipped() {
    // As Flynn's route tree: paths are compared segment by segment, empty ones skipped.
    let t = table(&[
        route("a.com", "/", "s1"),
        route("a.com", "/api/", "s2"),
        route("a.com", "/api/v2/", "s3"),
    ]);
    let cases = [
        ("/", "s1"),
        ("/api", "s2"),
        ("/api/", "s2"),
        ("/api/x", "s2"),
        ("//api/x", "s2"),
        ("/api//x", "s2"),
        ("/api//v2", "s3"),
        ("//api//v2//x", "s3"),
        ("/apix", "s1"),
        ("/ap", "s1"),
        ("/api/v23", "s2"),
        ("", "s1"),
    ];
    for (path, want) in cases {
        assert_eq!(svc(&t, "a.com", path), Some(want), "{path:?}");
    }
}

#[test]
fn the_deepest_route_wins_whatever_its_length_in_bytes() {
    // "/x////" has one segment and is longer in bytes than "/x/y/", which has two.
    let t = table(&[
        route("a.com", "/x////", "s1"),
        route("a.com", "/x/y/", "s2"),
    ]);
    assert_eq!(svc(&t, "a.com", "/x/y/z"), Some("s2"));
    assert_eq!(svc(&t, "a.com", "/x/z"), Some("s1"));
}

/// A retry looks an HTTP route's backends up by id; a TCP route with the same id (ids are
/// unique per kind only) is not what it finds.
#[test]
fn backends_by_id_are_the_http_routes_even_when_a_tcp_route_shares_the_id() {
    let http = Route {
        id: "same".into(),
        ..Route::http("a.example.com", "s1")
    };
    let tcp = Route {
        id: "same".into(),
        ..Route::tcp(3001, "s2")
    };
    for routes in [[http.clone(), tcp.clone()], [tcp, http]] {
        let t = table(&routes);
        let addrs: Vec<String> = t
            .backends_of("same")
            .map(|b| b.iter().map(|a| a.to_string()).collect())
            .unwrap_or_default();
        assert_eq!(addrs, ["127.0.0.1:9001"]);
        assert!(t.backends_of("other").is_none());
    }
}

#[test]
fn paths_match_percent_decoded() {
    // As Flynn (Go's decoded `URL.Path`) and nginx: an encoded letter or slash does not
    // move a request off its route.
    let t = table(&[
        route("a.com", "/", "s1"),
        route("a.com", "/admin/", "s2"),
        route("a.com", "/api/v2/", "s3"),
    ]);
    let cases = [
        ("/%61dmin/users", "s2"),
        ("/%61%64%6D%69%6e", "s2"),
        ("/api%2Fv2/x", "s3"),
        ("/api%2fv2", "s3"),
        ("%2Fadmin", "s2"),
        ("/admin%2F", "s2"),
        ("/admin%20", "s1"),
        ("/adm%", "s1"),
        ("/admin%2", "s1"),
        ("/admin%zz", "s1"),
        ("/%", "s1"),
    ];
    for (path, want) in cases {
        assert_eq!(svc(&t, "a.com", path), Some(want), "{path:?}");
    }
}
