//! Host and path matching, route and backend changes (spec §1.5, §1.10).

use crate::setup;
use crate::support::{get, http_path_route, http_route, Backend, Conn, Router};
use serde_json::json;

#[test]
fn route_serves_backend_then_swapped_backend_then_404_after_delete() {
    let router = Router::start();
    let b1 = Backend::start("b1");
    let b2 = Backend::start("b2");
    let route = router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b1]);

    let resp = get(router.http_addr, "example.com", "/");
    assert_eq!(resp.status, 200, "{resp:?}");
    let seen = resp.seen();
    assert_eq!(seen.backend, "b1");
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.uri, "/");
    assert_eq!(seen.version, "HTTP/1.1");
    assert_eq!(seen.header("host"), Some("example.com"));
    assert_eq!(resp.header("content-type"), Some("application/json"));

    router.set_backends("web", &[&b2]);
    for _ in 0..5 {
        assert_eq!(get(router.http_addr, "example.com", "/").backend(), "b2");
    }

    router.delete_route(&route);
    let resp = get(router.http_addr, "example.com", "/");
    assert_eq!(resp.status, 404);
    assert_eq!(resp.text(), "Not Found\n");
}

#[test]
fn unknown_host_is_404_not_found() {
    let (router, b1) = setup("example.com");
    let resp = get(router.http_addr, "other.example.com", "/");
    assert_eq!(resp.status, 404);
    assert_eq!(resp.body, b"Not Found\n");
    let resp = get(router.http_addr, "example.org", "/foo");
    assert_eq!(resp.status, 404);
    assert_eq!(resp.body, b"Not Found\n");
    assert_eq!(b1.request_count(), 0);
}

#[test]
fn wildcard_domains_exact_beats_wildcard() {
    let router = Router::start();
    let (b1, b2, b3) = (
        Backend::start("b1"),
        Backend::start("b2"),
        Backend::start("b3"),
    );
    router.add_route(http_route("foo.bar", "s1"));
    router.add_route(http_route("*.foo.bar", "s2"));
    router.add_route(http_route("dev.foo.bar", "s3"));
    router.set_backends("s1", &[&b1]);
    router.set_backends("s2", &[&b2]);
    router.set_backends("s3", &[&b3]);

    let cases = [
        ("foo.bar", "b1"),
        ("flynn.foo.bar", "b2"),
        ("dev.foo.bar", "b3"),
        ("a.b.foo.bar", "b2"),
        ("FLYNN.Foo.Bar", "b2"),
    ];
    for (host, want) in cases {
        let resp = get(router.http_addr, host, "/");
        assert_eq!(resp.status, 200, "{host}: {resp:?}");
        assert_eq!(resp.backend(), want, "Host: {host}");
    }
    assert_eq!(get(router.http_addr, "bar", "/").status, 404);
    assert_eq!(get(router.http_addr, "xfoo.bar", "/").status, 404);
    // As in Flynn (`*.` + the whole host is the first wildcard tried), a wildcard also
    // covers its bare domain when no exact route has it.
    router.add_route(http_route("*.only.bar", "s2"));
    assert_eq!(get(router.http_addr, "only.bar", "/").backend(), "b2");
    assert_eq!(get(router.http_addr, "x.only.bar", "/").backend(), "b2");
}

#[test]
fn catch_all_domain_and_more_specific_wildcard() {
    let router = Router::start();
    let (b1, b2) = (Backend::start("b1"), Backend::start("b2"));
    router.add_route(http_route("*", "s1"));
    router.set_backends("s1", &[&b1]);
    router.set_backends("s2", &[&b2]);
    assert_eq!(get(router.http_addr, "foo", "/").backend(), "b1");
    assert_eq!(get(router.http_addr, "example.com", "/").backend(), "b1");
    assert_eq!(get(router.http_addr, "foo.bar", "/").backend(), "b1");

    router.add_route(http_route("*.bar", "s2"));
    assert_eq!(get(router.http_addr, "foo.bar", "/").backend(), "b2");
    assert_eq!(get(router.http_addr, "foo", "/").backend(), "b1");
    assert_eq!(get(router.http_addr, "example.com", "/").backend(), "b1");
}

#[test]
fn path_routes_match_by_segment_prefix() {
    let router = Router::start();
    let (b1, b2, b3) = (
        Backend::start("b1"),
        Backend::start("b2"),
        Backend::start("b3"),
    );
    router.add_route(http_route("example.com", "s1"));
    let r2 = router.add_route(http_path_route("example.com", "/2/", "s2"));
    let r3 = router.add_route(http_path_route("example.com", "/3", "s3"));
    assert_eq!(r2["path"], "/2/");
    assert_eq!(r3["path"], "/3/", "path /3 is stored as /3/");
    router.set_backends("s1", &[&b1]);
    router.set_backends("s2", &[&b2]);
    router.set_backends("s3", &[&b3]);

    let cases = [
        ("/", "b1"),
        ("/x", "b1"),
        ("/2", "b2"),
        ("/2/", "b2"),
        ("/2/deeper/path", "b2"),
        ("/2?q=1", "b2"),
        ("/3", "b3"),
        ("/3/", "b3"),
        ("/20", "b1"),
        ("/23/", "b1"),
        ("/x/2/", "b1"),
    ];
    let mut conn = Conn::connect(router.http_addr);
    for (path, want) in cases {
        let resp = conn.get("example.com", path);
        assert_eq!(resp.status, 200, "{path}: {resp:?}");
        let seen = resp.seen();
        assert_eq!(seen.backend, want, "path {path}");
        assert_eq!(seen.uri, path, "URI forwarded unchanged");
    }
}

#[test]
fn domain_match_is_case_insensitive_and_host_is_forwarded_unchanged() {
    let (router, _b1) = setup("example.com");
    for host in ["EXAMPLE.com", "Example.Com", "example.COM:80"] {
        let resp = get(router.http_addr, host, "/");
        assert_eq!(resp.status, 200, "{host}: {resp:?}");
        assert_eq!(resp.seen().header("host"), Some(host));
    }
}

#[test]
fn host_header_with_port_matches_route() {
    let (router, _b1) = setup("example.com");
    let listener_port = router.http_addr.port();
    for host in [
        "example.com:80".to_string(),
        "example.com:443".into(),
        format!("example.com:{listener_port}"),
    ] {
        let resp = get(router.http_addr, &host, "/");
        assert_eq!(resp.status, 200, "{host}: {resp:?}");
        assert_eq!(resp.seen().header("host"), Some(host.as_str()));
    }
}

#[test]
fn keep_alive_connection_routes_each_request_by_its_host() {
    let router = Router::start();
    let (b1, b2) = (Backend::start("b1"), Backend::start("b2"));
    router.add_route(http_route("a.example.com", "s1"));
    router.add_route(http_route("b.example.com", "s2"));
    router.set_backends("s1", &[&b1]);
    router.set_backends("s2", &[&b2]);
    let mut conn = Conn::connect(router.http_addr);
    for (i, (host, want)) in [
        ("a.example.com", "b1"),
        ("b.example.com", "b2"),
        ("a.example.com", "b1"),
        ("nope.example.com", ""),
        ("b.example.com", "b2"),
    ]
    .into_iter()
    .enumerate()
    {
        let resp = conn.get(host, "/");
        if want.is_empty() {
            assert_eq!(resp.status, 404);
        } else {
            assert_eq!(resp.status, 200, "request #{i} Host {host}: {resp:?}");
            assert_eq!(resp.backend(), want, "Host {host}");
        }
    }
}

#[test]
fn leader_route_goes_only_to_the_leader() {
    let router = Router::start();
    let (b1, b2) = (Backend::start("b1"), Backend::start("b2"));
    router.add_route(
        json!({"type": "http", "domain": "leader.example.com", "service": "db", "leader": true}),
    );
    router.set_backend_addrs(
        "db",
        &[(b1.addr.to_string(), false), (b2.addr.to_string(), true)],
    );
    for _ in 0..10 {
        assert_eq!(
            get(router.http_addr, "leader.example.com", "/").backend(),
            "b2"
        );
    }
    router.set_backend_addrs(
        "db",
        &[(b1.addr.to_string(), true), (b2.addr.to_string(), false)],
    );
    for _ in 0..10 {
        assert_eq!(
            get(router.http_addr, "leader.example.com", "/").backend(),
            "b1"
        );
    }
    // No entry marked: no leader, so no backend (spec §1.6), not the first one.
    router.set_backend_addrs(
        "db",
        &[(b2.addr.to_string(), false), (b1.addr.to_string(), false)],
    );
    for _ in 0..3 {
        assert_eq!(get(router.http_addr, "leader.example.com", "/").status, 503);
    }
}

#[test]
fn non_leader_route_uses_every_backend() {
    let router = Router::start();
    let (b1, b2) = (Backend::start("b1"), Backend::start("b2"));
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b1, &b2]);
    for _ in 0..40 {
        let resp = get(router.http_addr, "example.com", "/");
        assert_eq!(resp.status, 200);
    }
    assert!(
        b1.request_count() > 0 && b2.request_count() > 0,
        "b1 {} b2 {}",
        b1.request_count(),
        b2.request_count()
    );
    assert_eq!(b1.request_count() + b2.request_count(), 40);
}

#[test]
fn updating_route_service_switches_traffic() {
    let router = Router::start();
    let (b1, b2) = (Backend::start("b1"), Backend::start("b2"));
    let mut route = router.add_route(http_route("example.com", "s1"));
    router.set_backends("s1", &[&b1]);
    router.set_backends("s2", &[&b2]);
    assert_eq!(get(router.http_addr, "example.com", "/").backend(), "b1");
    route["service"] = json!("s2");
    let updated = router.update_route(&route);
    assert_eq!(updated["service"], "s2");
    assert_eq!(updated["id"], route["id"]);
    assert_eq!(get(router.http_addr, "example.com", "/").backend(), "b2");
}

#[test]
fn routes_file_is_served_at_start_even_with_sub_path_listed_first() {
    let (b1, b2) = (Backend::start("b1"), Backend::start("b2"));
    let file = std::env::temp_dir().join(format!(
        "flynn-router-test-routes-{}-{}.json",
        std::process::id(),
        line!()
    ));
    let doc = json!({
        "routes": [
            {"type": "http", "domain": "example.com", "service": "sub", "path": "/sub/"},
            {"type": "http", "domain": "example.com", "service": "web"},
        ],
        "services": {
            "web": [{"addr": b1.addr.to_string()}],
            "sub": [{"addr": b2.addr.to_string()}],
        }
    });
    std::fs::write(&file, doc.to_string()).unwrap();
    let router = Router::builder().routes_file(file.clone()).start();
    let _ = std::fs::remove_file(&file);
    assert_eq!(get(router.http_addr, "example.com", "/").backend(), "b1");
    assert_eq!(get(router.http_addr, "example.com", "/sub").backend(), "b2");
    assert_eq!(
        get(router.http_addr, "example.com", "/sub/x").backend(),
        "b2"
    );
    let (status, routes) = router.api("GET", "/routes", None);
    assert_eq!(status, 200);
    assert_eq!(routes.as_array().map(Vec::len), Some(2), "{routes}");
}
