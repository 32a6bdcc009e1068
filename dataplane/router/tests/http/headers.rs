//! Headers the router adds, filters and preserves; Request-URI fidelity (spec §1.6).

use crate::setup;
use crate::support::backend::respond;
use crate::support::{http_route, is_uuid, Backend, Conn, Reply, Router};
use std::time::{SystemTime, UNIX_EPOCH};

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

#[test]
fn forwarded_headers_request_start_and_request_id_are_added() {
    let (router, _b1) = setup("example.com");
    let before = now_ms();
    let resp = Conn::connect(router.http_addr).get("example.com", "/");
    let after = now_ms();
    let seen = resp.seen();
    assert_eq!(seen.headers_all("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen.headers_all("x-forwarded-proto"), ["http"]);
    let port = router.http_addr.port().to_string();
    assert_eq!(seen.headers_all("x-forwarded-port"), [port.as_str()]);

    let start = seen.headers_all("x-request-start");
    assert_eq!(start.len(), 1, "{:?}", seen.headers);
    assert_eq!(start[0].len(), 13, "X-Request-Start {:?}", start[0]);
    let start: u128 = start[0].parse().expect("X-Request-Start is digits");
    assert!(
        start + 1000 >= before && start <= after + 1000,
        "X-Request-Start {start} not in [{before}, {after}]"
    );

    let ids = seen.headers_all("x-request-id");
    assert_eq!(ids.len(), 1, "{:?}", seen.headers);
    assert!(is_uuid(ids[0]), "X-Request-Id {:?} is not a UUID", ids[0]);

    // A second request gets a different id.
    let seen2 = Conn::connect(router.http_addr)
        .get("example.com", "/")
        .seen();
    assert_ne!(seen2.header("x-request-id"), Some(ids[0]));
}

#[test]
fn client_forwarded_values_are_appended() {
    let (router, _b1) = setup("example.com");
    let port = router.http_addr.port();
    let resp = Conn::connect(router.http_addr).request(
        "GET / HTTP/1.1\r\nHost: example.com\r\nX-Forwarded-For: 192.168.1.1\r\n\
         X-Forwarded-Proto: https\r\nX-Forwarded-Port: 443\r\n\r\n",
    );
    let seen = resp.seen();
    assert_eq!(
        seen.headers_all("x-forwarded-for"),
        ["192.168.1.1, 127.0.0.1"]
    );
    assert_eq!(seen.headers_all("x-forwarded-proto"), ["https, http"]);
    let want_port = format!("443, {port}");
    assert_eq!(seen.headers_all("x-forwarded-port"), [want_port.as_str()]);

    // Several X-Forwarded-For lines are joined, then the client IP appended.
    let resp = Conn::connect(router.http_addr).request(
        "GET / HTTP/1.1\r\nHost: example.com\r\nX-Forwarded-For: 10.0.0.1\r\n\
         X-Forwarded-For: 10.0.0.2, 10.0.0.3\r\n\r\n",
    );
    assert_eq!(
        resp.seen().headers_all("x-forwarded-for"),
        ["10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"]
    );
}

#[test]
fn request_id_kept_only_when_valid() {
    let (router, _b1) = setup("example.com");
    let charset = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-";
    let cases: Vec<(String, bool)> = vec![
        (String::new(), false),
        ("a".into(), false),
        ("a".repeat(19), false),
        ("a".repeat(20), true),
        ("a".repeat(200), true),
        ("a".repeat(201), false),
        (charset.into(), true),
        (format!("{}*", "a".repeat(25)), false),
        (format!("{} {}", "a".repeat(12), "b".repeat(12)), false),
    ];
    let mut conn = Conn::connect(router.http_addr);
    for (id, kept) in cases {
        let resp = conn.request(&format!(
            "GET / HTTP/1.1\r\nHost: example.com\r\nX-Request-Id: {id}\r\n\r\n"
        ));
        let seen = resp.seen();
        let got = seen.headers_all("x-request-id");
        assert_eq!(got.len(), 1, "id {id:?}: {:?}", seen.headers);
        if kept {
            assert_eq!(got[0], id, "valid id must be kept");
        } else {
            assert_ne!(got[0], id, "invalid id {id:?} must be replaced");
            assert!(
                is_uuid(got[0]),
                "id {id:?} replaced by {:?}, not a UUID",
                got[0]
            );
        }
    }
}

#[test]
fn hop_by_hop_request_headers_are_removed() {
    let (router, _b1) = setup("example.com");
    let resp = Conn::connect(router.http_addr).request(
        "GET / HTTP/1.1\r\nHost: example.com\r\nConnection: X-Foo, Keep-Alive\r\n\
         X-Foo: listed\r\nX-Bar: end-to-end\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
         Trailers: X-T\r\nUpgrade: websocket\r\n\r\n",
    );
    let seen = resp.seen();
    let names: Vec<String> = seen
        .headers
        .iter()
        .map(|(n, _)| n.to_ascii_lowercase())
        .collect();
    for gone in [
        "x-foo",
        "keep-alive",
        "te",
        "trailers",
        "upgrade",
        "transfer-encoding",
    ] {
        assert!(
            !names.contains(&gone.to_string()),
            "{gone} forwarded: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.header("x-bar"), Some("end-to-end"));
    for token in ["x-foo", "close", "upgrade"] {
        assert!(
            !seen.connection_has(token),
            "Connection lists {token}: {:?}",
            seen.headers
        );
    }
}

#[test]
fn keep_alive_header_is_removed_only_when_listed() {
    let (router, _b1) = setup("example.com");
    let seen = Conn::connect(router.http_addr)
        .request("GET / HTTP/1.1\r\nHost: example.com\r\nKeep-Alive: timeout=5\r\n\r\n")
        .seen();
    assert_eq!(
        seen.headers_all("keep-alive"),
        ["timeout=5"],
        "{:?}",
        seen.headers
    );
}

#[test]
fn upgrade_header_removed_from_http10_and_non_upgrade_requests() {
    let (router, b1) = setup("example.com");
    // HTTP/1.0 cannot upgrade: Upgrade and Connection (and what it lists) are hop-by-hop.
    let resp = Conn::connect(router.http_addr).request(
        "GET / HTTP/1.0\r\nHost: example.com\r\nConnection: Upgrade, X-Foo\r\nUpgrade: websocket\r\nX-Foo: 1\r\n\r\n",
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    let seen = resp.seen();
    assert!(!seen.has_header("upgrade"), "{:?}", seen.headers);
    assert!(!seen.has_header("x-foo"), "{:?}", seen.headers);
    assert!(!seen.connection_has("upgrade"), "{:?}", seen.headers);
    assert_eq!(
        seen.version, "HTTP/1.1",
        "backend requests are always HTTP/1.1"
    );
    assert_eq!(b1.request_count(), 1);
}

#[test]
fn hop_by_hop_response_headers_are_removed() {
    let router = Router::start();
    let b = Backend::with_handler("b1", |_req, conn| {
        respond(
            conn,
            "200 OK",
            &[
                ("Connection", "X-Foo"),
                ("X-Foo", "listed"),
                ("X-Bar", "end-to-end"),
                ("Trailers", "X-T"),
                ("Proxy-Authenticate", "Basic realm=\"x\""),
            ],
            b"ok",
        );
        Reply::KeepAlive
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let mut conn = Conn::connect(router.http_addr);
    let resp = conn.get("example.com", "/");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, b"ok");
    assert_eq!(resp.header("x-bar"), Some("end-to-end"));
    assert_eq!(resp.header("x-foo"), None, "{:?}", resp.headers);
    assert_eq!(resp.header("trailers"), None, "{:?}", resp.headers);
    assert!(!resp.connection_has("x-foo"), "{:?}", resp.headers);
    assert_eq!(resp.header("proxy-authenticate"), Some("Basic realm=\"x\""));
    // The client connection stays usable.
    assert_eq!(conn.get("example.com", "/").status, 200);
}

#[test]
fn end_to_end_headers_and_response_status_pass_through() {
    let router = Router::start();
    let b = Backend::with_handler("b1", |req, conn| {
        let body = req.to_json().to_string();
        respond(
            conn,
            "201 Created",
            &[
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
                ("X-Custom", "v"),
            ],
            body.as_bytes(),
        );
        Reply::KeepAlive
    });
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    let resp = Conn::connect(router.http_addr).request(
        "GET / HTTP/1.1\r\nHost: example.com\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n\
         X-Multi: a\r\nX-Multi: b\r\nCookie: c=1\r\n\r\n",
    );
    assert_eq!(resp.status, 201);
    assert_eq!(resp.reason, "Created");
    assert_eq!(resp.headers_all("set-cookie"), ["a=1", "b=2"]);
    assert_eq!(resp.header("x-custom"), Some("v"));
    let seen = crate::support::SeenRequest::from_json(&resp.json());
    assert_eq!(
        seen.headers_all("proxy-authorization"),
        ["Basic Zm9vOmJhcg=="]
    );
    let multi = seen.headers_all("x-multi").join(", ");
    assert_eq!(multi, "a, b", "{:?}", seen.headers);
    assert_eq!(seen.headers_all("cookie"), ["c=1"]);
}

#[test]
fn request_uri_and_query_pass_through_byte_for_byte() {
    let (router, _b1) = setup("example.com");
    let uris = [
        "//foo/bar",
        "/foo//bar/",
        "/a=b/(c)/d:e/%2F%2f/~!$&'*+,;@",
        "/q?a=1&b=%2F&c=a+b&d=&e&&f=%zz&g=%20x",
        "/path%20with%20spaces?x=y",
        "/%E2%9C%93?u=%E2%9C%93",
        "http://example.com/abs/path?x=1",
    ];
    let mut conn = Conn::connect(router.http_addr);
    for uri in uris {
        let resp = conn.request(&format!("GET {uri} HTTP/1.1\r\nHost: example.com\r\n\r\n"));
        assert_eq!(resp.status, 200, "{uri}: {resp:?}");
        assert_eq!(resp.seen().uri, uri);
    }
}

#[test]
fn client_connection_close_backend_still_gets_keep_alive() {
    let (router, b1) = setup("example.com");
    let mut conn = Conn::connect(router.http_addr);
    let resp = conn.request("GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n");
    assert_eq!(resp.status, 200);
    assert!(
        resp.connection_has("close"),
        "client must be told close: {:?}",
        resp.headers
    );
    let seen = resp.seen();
    assert!(
        !seen.connection_has("close"),
        "backend saw {:?}",
        seen.headers
    );
    assert_eq!(seen.version, "HTTP/1.1");
    conn.expect_closed();

    // The backend connection stayed open and is reused by the next client.
    let mut conn = Conn::connect(router.http_addr);
    for _ in 0..2 {
        let resp = conn.request("GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n");
        assert_eq!(resp.status, 200);
        conn.expect_closed();
        conn = Conn::connect(router.http_addr);
    }
    // Two cores may each hold one pooled connection; never one per request.
    assert!(
        b1.accepted() <= 2,
        "backend accepted {} connections for 3 requests",
        b1.accepted()
    );
}

#[test]
fn http10_client_gets_response_and_close() {
    let (router, _b1) = setup("example.com");
    let mut conn = Conn::connect(router.http_addr);
    let resp = conn.request("GET /old HTTP/1.0\r\nHost: example.com\r\n\r\n");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.seen().uri, "/old");
    conn.expect_closed();
}
