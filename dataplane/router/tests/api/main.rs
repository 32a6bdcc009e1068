//! Admin API integration tests (spec §1.2 legacy router API, §1.3, §0.1 error envelope).

#[path = "../support/mod.rs"]
mod support;

use serde_json::{json, Value};
use std::time::Duration;
use support::router::route_path;
use support::{get, http_path_route, http_route, tcp_route, Backend, Conn, Router};

fn assert_error(resp: &(u16, Value), status: u16, code: &str, message: &str) {
    let (s, body) = resp;
    assert_eq!(*s, status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    if !message.is_empty() {
        assert_eq!(body["message"], message, "{body}");
    }
    assert_eq!(body["retry"], false, "retry must be serialised: {body}");
}

fn post(router: &Router, route: Value) -> (u16, Value) {
    router.api("POST", "/routes", Some(&route.to_string()))
}

#[test]
fn create_http_route_returns_stored_route() {
    let router = Router::start();
    let r = router.add_route(json!({
        "type": "http", "domain": "example.com", "service": "web", "parent_ref": "controller/apps/a1"
    }));
    assert_eq!(r["type"], "http");
    assert_eq!(r["domain"], "example.com");
    assert_eq!(r["service"], "web");
    assert_eq!(r["path"], "/");
    assert_eq!(r["sticky"], false);
    assert_eq!(r["leader"], false);
    assert_eq!(r["parent_ref"], "controller/apps/a1");
    assert!(
        support::is_uuid(r["id"].as_str().unwrap()),
        "id {}",
        r["id"]
    );
    assert!(
        r["created_at"].as_str().is_some_and(|s| !s.is_empty()),
        "{r}"
    );
    assert!(
        r["updated_at"].as_str().is_some_and(|s| !s.is_empty()),
        "{r}"
    );

    let (status, got) = router.api("GET", &route_path(&r), None);
    assert_eq!(status, 200);
    assert_eq!(got, r);

    let sub = router.add_route(http_path_route("example.com", "/baz", "web"));
    assert_eq!(sub["path"], "/baz/");
}

#[test]
fn create_tcp_route_allocates_port_from_range() {
    let router = Router::builder().tcp().start();
    let (lo, hi) = router.tcp_ports.unwrap();
    let r = router.add_route(tcp_route(0, "svc"));
    assert_eq!(r["type"], "tcp");
    assert_eq!(r["service"], "svc");
    assert_eq!(r["leader"], false);
    let port = r["port"].as_u64().unwrap() as u16;
    assert!(
        port != 0 && (lo..=hi).contains(&port),
        "port {port} not in {lo}-{hi}"
    );
    assert!(r["id"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(
        r["created_at"].is_string() && r["updated_at"].is_string(),
        "{r}"
    );
    let r2 = router.add_route(tcp_route(0, "svc"));
    assert_ne!(r2["port"], r["port"], "ports are allocated once");
}

#[test]
fn tcp_port_range_exhaustion_is_an_error() {
    let range = support::tcp_range(1);
    let router = Router::builder().tcp_ports(range).start();
    router.add_route(tcp_route(0, "a"));
    router.add_route(tcp_route(0, "b"));
    let (status, body) = post(&router, tcp_route(0, "c"));
    assert!(
        status >= 400,
        "third route in a 2-port range: {status} {body}"
    );
    assert!(body["code"].is_string(), "{body}");
}

#[test]
fn duplicate_route_is_conflict() {
    let router = Router::start();
    router.add_route(http_route("example.com", "web"));
    assert_error(
        &post(&router, http_route("example.com", "other")),
        409,
        "conflict",
        "Duplicate route",
    );
    router.add_route(http_path_route("example.com", "/x/", "web"));
    assert_error(
        &post(&router, http_path_route("example.com", "/x", "web")),
        409,
        "conflict",
        "Duplicate route",
    );
    // Domains differ only by case: still the same domain.
    let resp = post(&router, http_route("EXAMPLE.com", "web"));
    assert_eq!(resp.0, 409, "{}", resp.1);
}

#[test]
fn invalid_paths_and_missing_root_are_rejected() {
    let router = Router::start();
    assert_error(
        &post(&router, http_path_route("example.com", "/sub/", "web")),
        400,
        "validation_error",
        "Invalid route",
    );
    router.add_route(http_route("example.com", "web"));
    assert_error(
        &post(
            &router,
            http_path_route("example.com", "noleadingslash/", "web"),
        ),
        400,
        "validation_error",
        "Invalid route",
    );
    router.add_route(http_path_route("example.com", "/sub/", "web"));
    // Empty segments: matching skips them, so these would shadow `/` and `/a/b/`.
    for p in ["//", "/a//b/", "//x"] {
        assert_error(
            &post(&router, http_path_route("example.com", p, "web")),
            400,
            "validation_error",
            "Invalid route",
        );
    }
}

/// A domain no request's host can ever match is a 400 naming the field; a fully qualified
/// one is stored without its trailing dot and routes hosts written either way.
#[test]
fn domains_that_can_never_match_are_rejected() {
    let router = Router::start();
    for bad in [
        "example.com:8080",
        " example.com",
        "http://example.com",
        "example..com",
        "a.*.com",
    ] {
        let resp = post(&router, http_route(bad, "web"));
        assert_error(&resp, 400, "validation_error", "");
        assert_eq!(resp.1["detail"], json!({"field": "domain"}), "{bad:?}");
        assert!(
            resp.1["message"].as_str().unwrap().starts_with("domain "),
            "{bad:?}: {}",
            resp.1
        );
    }
    let (status, routes) = router.api("GET", "/routes", None);
    assert_eq!((status, routes), (200, json!([])));
    let b = Backend::start("b1");
    let stored = router.add_route(http_route("Example.com.", "web"));
    assert_eq!(stored["domain"], "Example.com");
    router.set_backends("web", &[&b]);
    for host in ["example.com", "example.com.", "example.com.:80"] {
        assert_eq!(get(router.http_addr, host, "/").backend(), "b1", "{host}");
    }
}

#[test]
fn unknown_type_and_bad_json_are_rejected() {
    let router = Router::start();
    assert_error(
        &post(
            &router,
            json!({"type": "udp", "domain": "x", "service": "web"}),
        ),
        400,
        "validation_error",
        "type Invalid route type",
    );
    let resp = router.api("POST", "/routes", Some(r#"{"type": http}"#));
    assert_error(&resp, 400, "syntax_error", "");
    let resp = router.api("PUT", "/services/web/backends", Some("[{addr}]"));
    assert_error(&resp, 400, "syntax_error", "");
}

#[test]
fn tcp_route_on_http_ports_is_reserved() {
    let router = Router::builder()
        .tcp()
        .arg("--h2c-addr")
        .arg("127.0.0.1:0")
        .start();
    let http_port = router.http_addr.port();
    let h2c_port = router.h2c_addrs[0].port();
    for port in [80, 443, http_port, h2c_port] {
        assert_error(
            &post(&router, tcp_route(port, "svc")),
            409,
            "conflict",
            "Port reserved for HTTP/HTTPS traffic",
        );
    }
}

#[test]
fn deleting_root_with_dependents_fails_until_sub_paths_are_gone() {
    let router = Router::start();
    let root = router.add_route(http_route("example.com", "web"));
    let sub = router.add_route(http_path_route("example.com", "/sub/", "web"));
    assert_error(
        &router.api("DELETE", &route_path(&root), None),
        400,
        "validation_error",
        "Route has dependent routes",
    );
    router.delete_route(&sub);
    router.delete_route(&root);
    let (status, list) = router.api("GET", "/routes", None);
    assert_eq!(status, 200);
    assert_eq!(list, json!([]), "an empty list is [] not null");
}

#[test]
fn unknown_route_id_is_404() {
    let router = Router::start();
    let path = "/routes/http/00000000-0000-4000-8000-000000000000";
    assert_error(&router.api("GET", path, None), 404, "not_found", "");
    assert_error(&router.api("DELETE", path, None), 404, "not_found", "");
    let body = http_route("example.com", "web").to_string();
    assert_error(&router.api("PUT", path, Some(&body)), 404, "not_found", "");
}

#[test]
fn list_is_newest_first_and_filters_by_parent_ref() {
    let router = Router::start();
    let mut ids = Vec::new();
    for (i, parent) in [
        "controller/apps/a",
        "controller/apps/b",
        "controller/apps/a",
    ]
    .iter()
    .enumerate()
    {
        let r = router.add_route(json!({
            "type": "http", "domain": format!("d{i}.example.com"), "service": "web", "parent_ref": parent
        }));
        ids.push(r["id"].as_str().unwrap().to_string());
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, list) = router.api("GET", "/routes", None);
    assert_eq!(status, 200);
    let got: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[2].as_str(), ids[1].as_str(), ids[0].as_str()]);

    let (status, list) = router.api("GET", "/routes?parent_ref=controller/apps/a", None);
    assert_eq!(status, 200);
    let got: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[2].as_str(), ids[0].as_str()]);

    let (status, list) = router.api("GET", "/routes?parent_ref=controller%2Fapps%2Fb", None);
    assert_eq!(status, 200);
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(1),
        "percent-encoded filter: {list}"
    );
}

#[test]
fn put_updates_service_sticky_and_leader() {
    // Sticky routes need a cookie key (base64 of 32 bytes).
    let key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let router = Router::builder().env("COOKIE_KEY", key).start();
    let r = router.add_route(http_route("example.com", "web"));
    let mut changed = r.clone();
    changed["service"] = json!("web2");
    changed["sticky"] = json!(true);
    changed["leader"] = json!(true);
    std::thread::sleep(Duration::from_millis(20));
    let updated = router.update_route(&changed);
    assert_eq!(updated["id"], r["id"]);
    assert_eq!(updated["service"], "web2");
    assert_eq!(updated["sticky"], true);
    assert_eq!(updated["leader"], true);
    assert_eq!(updated["created_at"], r["created_at"]);
    assert_ne!(
        updated["updated_at"], r["updated_at"],
        "updated_at must move"
    );
    let (_, got) = router.api("GET", &route_path(&r), None);
    assert_eq!(got, updated);
}

#[test]
fn service_backends_put_and_get() {
    let router = Router::start();
    let body = r#"[{"addr":"127.0.0.1:9001"},{"addr":"127.0.0.1:9002","leader":true}]"#;
    let (status, resp) = router.api("PUT", "/services/web/backends", Some(body));
    assert!((200..300).contains(&status), "{status} {resp}");
    let (status, list) = router.api("GET", "/services/web/backends", None);
    assert_eq!(status, 200);
    let list = list
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .clone();
    let addrs: Vec<&str> = list.iter().map(|b| b["addr"].as_str().unwrap()).collect();
    assert_eq!(addrs, ["127.0.0.1:9001", "127.0.0.1:9002"]);
    assert_eq!(list[1]["leader"], true, "{list:?}");
    assert_ne!(list[0]["leader"], true, "{list:?}");

    router.api("PUT", "/services/web/backends", Some("[]"));
    let (status, list) = router.api("GET", "/services/web/backends", None);
    assert_eq!((status, list), (200, json!([])));
}

#[test]
fn status_and_metrics() {
    let router = Router::start();
    let (status, body) = router.api("GET", "/.well-known/status", None);
    assert_eq!(status, 200);
    assert_eq!(body["data"]["status"], "healthy", "{body}");

    let b = Backend::start("b1");
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&b]);
    assert_eq!(get(router.http_addr, "example.com", "/").status, 200);
    let mut conn = Conn::connect(router.api_addr);
    let resp = conn.request("GET /metrics HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n");
    assert_eq!(resp.status, 200);
    let text = resp.text();
    let total: f64 = text
        .lines()
        .filter(|l| l.starts_with("flynn_router_requests_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        total >= 1.0,
        "flynn_router_requests_total must count the proxied request:\n{text}"
    );
    assert!(
        resp.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{:?}",
        resp.headers
    );
}

/// Reads SSE `data:` events from an open `/events` stream.
struct Events {
    conn: Conn,
    chunked: bool,
    text: String,
}

impl Events {
    fn open(router: &Router, types: &str) -> Events {
        let mut conn = Conn::connect(router.api_addr);
        conn.send(format!("GET /events?types={types} HTTP/1.1\r\nHost: api\r\nAccept: text/event-stream\r\n\r\n").as_bytes());
        let head = conn.read_head().expect("events head");
        assert_eq!(head.status, 200);
        assert!(
            head.header("content-type")
                .is_some_and(|c| c.starts_with("text/event-stream")),
            "{head:?}"
        );
        let chunked = head.header("transfer-encoding").is_some();
        Events {
            conn,
            chunked,
            text: String::new(),
        }
    }

    /// The next event's JSON (skipping comments), within 5 s.
    fn next(&mut self) -> Value {
        loop {
            if let Some(i) = self.text.find("\n\n") {
                let block: String = self.text.drain(..i + 2).collect();
                let data: Vec<&str> = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue;
                }
                return serde_json::from_str(&data.join("\n"))
                    .unwrap_or_else(|e| panic!("bad event {block:?}: {e}"));
            }
            let bytes = if self.chunked {
                let mut t = Vec::new();
                self.conn
                    .read_chunk(&mut t)
                    .expect("event chunk")
                    .expect("stream ended")
            } else {
                self.conn.read_some().expect("event bytes")
            };
            self.text
                .push_str(&String::from_utf8_lossy(&bytes).replace("\r\n", "\n"));
        }
    }
}

#[test]
fn events_stream_set_and_remove() {
    let router = Router::builder().tcp().start();
    let mut events = Events::open(&router, "set,remove");
    let r = router.add_route(http_route("example.com", "web"));
    let ev = events.next();
    assert_eq!(ev["event"], "set", "{ev}");
    assert_eq!(ev["route"]["id"], r["id"]);
    assert_eq!(ev["route"]["type"], "http");

    let t = router.add_route(tcp_route(0, "svc"));
    let ev = events.next();
    assert_eq!(
        (ev["event"].as_str(), &ev["route"]["id"]),
        (Some("set"), &t["id"]),
        "{ev}"
    );
    assert_eq!(ev["route"]["type"], "tcp");

    router.delete_route(&r);
    let ev = events.next();
    assert_eq!(ev["event"], "remove", "{ev}");
    assert_eq!(ev["route"]["id"], r["id"]);
    router.delete_route(&t);
    let ev = events.next();
    assert_eq!(
        (ev["event"].as_str(), &ev["route"]["type"]),
        (Some("remove"), &json!("tcp")),
        "{ev}"
    );
}

#[test]
fn events_stream_sends_only_requested_types() {
    let router = Router::start();
    let mut events = Events::open(&router, "remove");
    let r = router.add_route(http_route("only.example.com", "web"));
    router.delete_route(&r);
    let ev = events.next();
    assert_eq!(
        ev["event"], "remove",
        "set events must be filtered out: {ev}"
    );
    assert_eq!(ev["route"]["id"], r["id"]);
}

#[test]
fn events_stream_backend_up_and_down() {
    let router = Router::start();
    let mut events = Events::open(&router, "backend-up,backend-down");
    router.set_backend_addrs("web", &[("127.0.0.1:9001".into(), false)]);
    let ev = events.next();
    assert_eq!(ev["event"], "backend-up", "{ev}");
    assert_eq!(ev["backend"]["addr"], "127.0.0.1:9001");
    assert_eq!(ev["backend"]["service"], "web");
    router.set_backend_addrs("web", &[("127.0.0.1:9002".into(), false)]);
    let mut got: Vec<(String, String)> = (0..2)
        .map(|_| {
            let ev = events.next();
            (
                ev["event"].as_str().unwrap().to_string(),
                ev["backend"]["addr"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("backend-down".to_string(), "127.0.0.1:9001".to_string()),
            ("backend-up".to_string(), "127.0.0.1:9002".to_string())
        ]
    );
}

/// Two changes of one service's backends at once (an operator's PUT and discovery, say)
/// have their events sent in the order the changes were made: the last event about a
/// backend always agrees with whether it is in the service's final set.
#[test]
fn concurrent_backend_changes_send_their_events_in_order() {
    let router = Router::start();
    let mut events = Events::open(&router, "backend-up,backend-down");
    let addr = router.api_addr;
    let put = move |body: &'static str| {
        std::thread::spawn(move || {
            let r = crate::support::api_call(addr, "PUT", "/services/web/backends", Some(body));
            assert_eq!(r.map(|r| r.0), Some(200));
        })
    };
    let mut up = false;
    for round in 0..200 {
        let a = put(r#"[{"addr":"127.0.0.1:9001"}]"#);
        let b = put("[]");
        a.join().unwrap();
        b.join().unwrap();
        let (status, now) = crate::support::api_call(addr, "GET", "/services/web/backends", None)
            .expect("backends");
        assert_eq!(status, 200);
        let present = now.as_array().is_some_and(|a| !a.is_empty());
        // Put in then taken out, or out then in: two events, the last saying where it
        // ended; otherwise one of the changes changed nothing: one event.
        let n = if present == up { 2 } else { 1 };
        let mut last = up;
        for _ in 0..n {
            last = events.next()["event"] == "backend-up";
        }
        assert_eq!(
            last, present,
            "round {round}: the last event says up={last}, the set has it: {present}"
        );
        up = present;
    }
}

/// Spec §1.2: routes track drains unless they say otherwise, and a PUT keeps
/// `drain_backends` as stored: without the field, and with it (a Go client's
/// `DrainBackends` has no `omitempty`: its PUT always says `false`).
#[test]
fn drain_backends_defaults_true_and_put_keeps_it() {
    let router = Router::start();
    let r = router.add_route(http_route("example.com", "web"));
    assert_eq!(r["drain_backends"], true, "{r}");
    let off = router.add_route(json!({"type": "http", "domain": "off.example.com",
        "service": "web", "drain_backends": false}));
    assert_eq!(off["drain_backends"], false, "{off}");
    let (status, updated) = router.api(
        "PUT",
        &route_path(&r),
        Some(&json!({"type": "http", "service": "web2"}).to_string()),
    );
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["service"], "web2");
    assert_eq!(
        updated["drain_backends"], true,
        "a PUT without the field cleared it"
    );
    let (status, updated) = router.api(
        "PUT",
        &route_path(&r),
        Some(
            &json!({"type": "http", "domain": "example.com", "service": "web3",
                "drain_backends": false})
            .to_string(),
        ),
    );
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["service"], "web3");
    assert_eq!(
        updated["drain_backends"], true,
        "a Go-style PUT (drain_backends: false) turned drain tracking off"
    );
    let (_, got) = router.api("GET", &route_path(&r), None);
    assert_eq!(got["drain_backends"], true, "{got}");
}

/// A typed client (`flynn_api::Route`) sends the flags it sets and only those: a route it
/// creates with nothing set tracks drains (spec §1.2's default; `Route::http` leaves the
/// flag unset), one that says otherwise does not; a `PUT` with `grpc: false` turns gRPC off
/// (it was left out of the body as the default, and the stored `true` stayed), and one that
/// leaves it unset keeps it; a `PUT` never changes `drain_backends` (spec §1.2).
#[test]
fn a_typed_clients_flags_reach_the_router_as_set() {
    use flynn_api::Route;
    let router = Router::start();
    let send = |method: &str, path: &str, r: &Route| {
        let (status, body) = router.api(method, path, Some(&serde_json::to_string(r).unwrap()));
        assert_eq!(status, 200, "{method} {path}: {body}");
        body
    };
    let tracked = send("POST", "/routes", &Route::http("typed.example.com", "web"));
    assert_eq!(tracked["drain_backends"], true, "{tracked}");
    let untracked = Route {
        drain_backends: Some(false),
        ..Route::http("untracked.example.com", "web")
    };
    let untracked = send("POST", "/routes", &untracked);
    assert_eq!(untracked["drain_backends"], false, "{untracked}");

    let grpc = Route {
        grpc: Some(true),
        ..Route::http("grpc.example.com", "web")
    };
    let created = send("POST", "/routes", &grpc);
    assert_eq!(created["grpc"], true, "{created}");
    let path = route_path(&created);
    let mut r: Route = serde_json::from_value(created).unwrap();
    // Unset: kept.
    r.grpc = None;
    r.drain_backends = None;
    let kept = send("PUT", &path, &r);
    assert_eq!(kept["grpc"], true, "{kept}");
    assert_eq!(kept["drain_backends"], true, "{kept}");
    // Set to false: gRPC off (served without the field, as a route created without
    // gRPC); drain tracking stays.
    r.grpc = Some(false);
    r.drain_backends = Some(false);
    let off = send("PUT", &path, &r);
    assert!(off.get("grpc").is_none(), "{off}");
    assert_eq!(off["drain_backends"], true, "{off}");
    let (_, got) = router.api("GET", &path, None);
    let got: Route = serde_json::from_value(got).unwrap();
    assert_eq!(got.grpc, None, "{got:?}");
    assert_eq!(got.drain_backends, Some(true), "{got:?}");
}

/// Errors axum itself would answer (a body over the limit, a method a path does not serve,
/// a path or query that does not decode) are the JSON envelope too (spec §0.1).
#[test]
fn refused_bodies_methods_paths_and_queries_get_the_json_envelope() {
    let router = Router::start();
    let envelope = |what: &str, resp: &support::Response, status: u16, code: &str| {
        assert_eq!(resp.status, status, "{what}: {}", resp.text());
        assert!(
            resp.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "{what}: {:?}",
            resp.headers
        );
        let v = resp.json();
        assert_eq!(v["code"], code, "{what}: {v}");
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
        assert_eq!(v["retry"], false, "{what}: {v}");
    };
    // Just over 2 MiB of body, on every route that takes one.
    let limit = 2 << 20;
    for path in ["/routes", "/services/web/backends", "/certificates"] {
        let method = if path.contains("backends") {
            "PUT"
        } else {
            "POST"
        };
        let mut conn = Conn::connect(router.api_addr);
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            limit + 1
        );
        conn.send(head.as_bytes());
        let _ = conn.try_send(&vec![b' '; limit + 1]);
        let resp = conn.try_response().expect("an answer to an oversized body");
        envelope(
            &format!("{method} {path}"),
            &resp,
            400,
            "request_body_too_big",
        );
    }
    let call = |raw: &str| {
        let mut conn = Conn::connect(router.api_addr);
        conn.request(raw)
    };
    for (method, path) in [
        ("PATCH", "/routes"),
        ("DELETE", "/routes"),
        ("POST", "/routes/http/x"),
        ("POST", "/events"),
        ("DELETE", "/certificates"),
    ] {
        let resp = call(&format!(
            "{method} {path} HTTP/1.1\r\nHost: api\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ));
        envelope(&format!("{method} {path}"), &resp, 405, "validation_error");
        assert!(
            resp.header("allow").is_some(),
            "{method} {path}: {:?}",
            resp.headers
        );
    }
    for (method, path) in [
        ("GET", "/routes/http/%FF"),
        ("DELETE", "/routes/http/%FF"),
        ("GET", "/services/%FF/backends"),
        ("GET", "/certificates/%FF"),
        ("GET", "/certificates/%FF/routes"),
        ("GET", "/routes?parent_ref=a&parent_ref=b"),
        ("GET", "/events?types=set&types=remove"),
    ] {
        let resp = call(&format!(
            "{method} {path} HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
        ));
        envelope(&format!("{method} {path}"), &resp, 400, "validation_error");
    }
    // Nothing above was stored.
    let (_, routes) = router.api("GET", "/routes", None);
    assert_eq!(routes, json!([]));
}

/// Reads an `/events` stream (chunked) until it ends; its items.
fn read_stream_to_end(conn: &mut Conn) -> Vec<String> {
    let mut text = String::new();
    loop {
        let mut trailers = Vec::new();
        match conn.read_chunk(&mut trailers) {
            Ok(Some(d)) => text.push_str(&String::from_utf8_lossy(&d)),
            Ok(None) => break,
            Err(e) => panic!(
                "the stream neither ended nor erred ({e}); {} items read",
                text.matches("\n\n").count()
            ),
        }
    }
    text.split("\n\n")
        .filter(|i| !i.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// `/events` (all types when `types` is empty), its head read.
fn subscribe(router: &Router, types: &str) -> Conn {
    let mut conn = Conn::connect(router.api_addr);
    let query = if types.is_empty() {
        String::new()
    } else {
        format!("?types={types}")
    };
    conn.send(
        format!("GET /events{query} HTTP/1.1\r\nHost: api\r\nAccept: text/event-stream\r\n\r\n")
            .as_bytes(),
    );
    let head = conn.read_head().expect("events head");
    assert_eq!(head.status, 200);
    assert!(head.header("transfer-encoding").is_some(), "{head:?}");
    conn
}

fn backends_body(first_port: u32, n: u32) -> String {
    let body: Vec<serde_json::Value> = (0..n)
        .map(|i| json!({"addr": format!("127.0.0.1:{}", first_port + i)}))
        .collect();
    serde_json::Value::Array(body).to_string()
}

/// One change that emits more events than the event channel holds changes (4096) reaches
/// a subscriber whole: the channel holds a change's events as one item (it held one per
/// event, and such a change cut off every subscriber, whatever it did).
#[test]
fn a_change_with_thousands_of_events_reaches_a_subscriber_whole() {
    let router = Router::start();
    let mut conn = subscribe(&router, "backend-up");
    let n = 5000;
    let (status, _) = router.api(
        "PUT",
        "/services/web/backends",
        Some(&backends_body(10000, n)),
    );
    assert_eq!(status, 200);
    let mut text = String::new();
    while text.matches("backend-up").count() < n as usize {
        let mut trailers = Vec::new();
        match conn.read_chunk(&mut trailers) {
            Ok(Some(d)) => text.push_str(&String::from_utf8_lossy(&d)),
            other => panic!(
                "the stream ended after {} events: {other:?}; {}",
                text.matches("backend-up").count(),
                &text[text.len().saturating_sub(300)..]
            ),
        }
    }
    assert!(!text.contains("event: error"), "{}", &text[..300]);
    assert_eq!(text.matches("backend-up").count(), n as usize);
}

/// `/events` (all types) on a connection with a small receive buffer, its head read.
fn subscribe_small_buffer(router: &Router) -> Conn {
    let mut conn = Conn::connect_small_buffer(router.api_addr, 4096);
    conn.send(b"GET /events HTTP/1.1\r\nHost: api\r\nAccept: text/event-stream\r\n\r\n");
    let head = conn.read_head().expect("events head");
    assert_eq!(head.status, 200);
    conn
}

/// Changes `small`'s backends `n` times (one event each), one request after another.
fn small_changes(router: &Router, n: usize) {
    for i in 0..n {
        let body = if i % 2 == 0 {
            r#"[{"addr":"127.0.0.1:9"}]"#
        } else {
            "[]"
        };
        let (status, _) = router.api("PUT", "/services/small/backends", Some(body));
        assert_eq!(status, 200);
    }
}

/// A subscriber that falls more changes behind than the event channel holds has missed
/// events: its stream says so (`event: error`, spec §0.3) and ends, so it reconnects and
/// starts over, instead of going on with a gap (a scheduler would wait out its timeout for
/// a `backend-drained` it never gets). The channel holds 4 changes here
/// (`--events-capacity`), the subscriber's receive buffer is small, and changes big enough
/// to fill the connection's buffers come first.
#[test]
fn an_events_subscriber_that_falls_behind_gets_an_error_and_the_end() {
    let router = Router::builder().arg("--events-capacity").arg("4").start();
    let mut conn = subscribe_small_buffer(&router);
    // The subscriber reads nothing. Big changes fill its connection's buffers (thousands
    // of events each; the last leaves the store small again)...
    for i in 0..5 {
        let body = if i < 4 {
            backends_body(10000 + (i % 2) * 5000, 5000)
        } else {
            "[]".into()
        };
        let (status, _) = router.api("PUT", "/services/web/backends", Some(&body));
        assert_eq!(status, 200);
    }
    // ... then more changes than the channel holds.
    small_changes(&router, 16);
    let items = read_stream_to_end(&mut conn);
    let last = items.last().cloned().unwrap_or_default();
    assert!(
        last.lines().any(|l| l == "event: error"),
        "the stream ended without an error: {last:?}"
    );
    assert!(last.contains("changes missed"), "{last:?}");
}

/// A stalled subscriber pins at most `--events-backlog` events (beyond the newest change):
/// past that, the older changes' events are dropped, and the subscriber, which missed
/// them, gets an error and the end, though the channel holds far fewer changes than its
/// capacity.
#[test]
fn an_events_subscriber_too_many_events_behind_gets_an_error_and_the_end() {
    let router = Router::builder()
        .arg("--events-backlog")
        .arg("1000")
        .start();
    let mut conn = subscribe_small_buffer(&router);
    for i in 0..5 {
        let body = if i < 4 {
            backends_body(10000 + (i % 2) * 5000, 5000)
        } else {
            "[]".into()
        };
        let (status, _) = router.api("PUT", "/services/web/backends", Some(&body));
        assert_eq!(status, 200);
    }
    small_changes(&router, 4);
    let items = read_stream_to_end(&mut conn);
    let last = items.last().cloned().unwrap_or_default();
    assert!(
        last.lines().any(|l| l == "event: error"),
        "the stream ended without an error: {last:?}"
    );
    assert!(last.contains("events behind"), "{last:?}");
}
