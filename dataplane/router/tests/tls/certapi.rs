//! The certificates API (spec §1.2) and keeping private keys out of the log.

use crate::client::{self_signed, Pair};
use crate::support::{http_route, Backend, Router};
use crate::{cert_route, https_builder, tls_connect};
use std::time::Duration;

fn post_cert(router: &Router, body: &serde_json::Value) -> (u16, serde_json::Value) {
    router.api("POST", "/certificates", Some(&body.to_string()))
}

fn assert_invalid(status: u16, body: &serde_json::Value, what: &str) {
    assert_eq!(status, 400, "{what}: {body}");
    assert_eq!(body["code"], "validation_error", "{what}: {body}");
    let msg = body["message"].as_str().unwrap_or("");
    assert!(msg.starts_with("Certificate invalid: "), "{what}: {body}");
}

#[test]
fn certificate_api_dedup_and_errors() {
    let router = https_builder().start();
    let c1 = self_signed(&["one.example.com"]);
    let c2 = self_signed(&["two.example.com"]);

    // Create, then the same certificate again → the same id.
    let (status, a) = post_cert(&router, &c1.json());
    assert_eq!(status, 200, "{a}");
    let id = a["id"].as_str().expect("id").to_string();
    assert!(crate::support::is_uuid(&id), "{a}");
    assert_eq!(a["cert"].as_str().map(str::trim), Some(c1.cert_pem.trim()));
    let (status, again) = post_cert(&router, &c1.json());
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["id"].as_str(), Some(id.as_str()), "dedup by SHA-256");
    // Surrounding whitespace does not defeat dedup.
    let padded = serde_json::json!({"cert": format!("\n\n{}\n", c1.cert_pem), "key": c1.key_pem});
    let (status, again) = post_cert(&router, &padded);
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        again["id"].as_str(),
        Some(id.as_str()),
        "dedup ignores whitespace"
    );
    let (status, b) = post_cert(&router, &c2.json());
    assert_eq!(status, 200, "{b}");
    let id2 = b["id"].as_str().unwrap().to_string();
    assert_ne!(id, id2);

    // List and get.
    let (status, list) = router.api("GET", "/certificates", None);
    assert_eq!(status, 200);
    let ids: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{list}");
    assert!(
        ids.contains(&id.as_str()) && ids.contains(&id2.as_str()),
        "{list}"
    );
    let (status, got) = router.api("GET", &format!("/certificates/{id}"), None);
    assert_eq!(status, 200);
    assert_eq!(got["id"].as_str(), Some(id.as_str()));
    let (status, routes) = router.api("GET", &format!("/certificates/{id}/routes"), None);
    assert_eq!(status, 200);
    assert_eq!(routes, serde_json::json!([]));

    // Unknown ids.
    let missing = "00000000-0000-4000-8000-000000000000";
    for path in [
        format!("/certificates/{missing}"),
        format!("/certificates/{missing}/routes"),
    ] {
        let (status, body) = router.api("GET", &path, None);
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["code"], "object_not_found", "{body}");
        assert_eq!(body["message"], "certificate not found", "{body}");
    }
    let (status, body) = router.api("DELETE", &format!("/certificates/{missing}"), None);
    assert_eq!(status, 404, "{body}");

    // Invalid input.
    for (what, body) in [
        (
            "mismatched pair",
            serde_json::json!({"cert": c1.cert_pem, "key": c2.key_pem}),
        ),
        (
            "garbage",
            serde_json::json!({"cert": "junk", "key": "junk"}),
        ),
        ("no key", serde_json::json!({"cert": c1.cert_pem})),
        ("no cert", serde_json::json!({"key": c1.key_pem})),
        (
            "key as cert",
            serde_json::json!({"cert": c1.key_pem, "key": c1.key_pem}),
        ),
    ] {
        let (status, resp) = post_cert(&router, &body);
        assert_invalid(status, &resp, what);
    }
    let (status, body) = router.api("POST", "/certificates", Some("{not json"));
    assert_eq!(status, 400, "{body}");
    let (_, list) = router.api("GET", "/certificates", None);
    assert_eq!(
        list.as_array().unwrap().len(),
        2,
        "failed posts stored nothing: {list}"
    );

    // A route with the same certificate reuses the stored one; it is then in use.
    let b = Backend::start("b");
    let route = router.add_route(cert_route("one.example.com", "web", &c1));
    router.set_backends("web", &[&b]);
    assert_eq!(
        route["certificate"]["id"].as_str(),
        Some(id.as_str()),
        "{route}"
    );
    let (_, got) = router.api("GET", &format!("/certificates/{id}"), None);
    assert_eq!(got["routes"], serde_json::json!([route["id"]]), "{got}");
    let (status, routes) = router.api("GET", &format!("/certificates/{id}/routes"), None);
    assert_eq!(status, 200);
    assert_eq!(routes.as_array().unwrap().len(), 1, "{routes}");
    assert_eq!(routes[0]["id"], route["id"]);
    // Referencing a stored certificate by id.
    let mut by_id = http_route("two.example.com", "web");
    by_id["certificate"] = serde_json::json!({"id": id2});
    let r2 = router.add_route(by_id);
    assert_eq!(r2["certificate"]["id"].as_str(), Some(id2.as_str()), "{r2}");
    let mut conn = tls_connect(&router, "two.example.com", &[&c1, &c2]);
    assert_eq!(conn.peer_cert(), c2.der);
    assert_eq!(conn.get("two.example.com", "/").status, 200);

    // In use → 409; free → deleted → 404.
    let (status, body) = router.api("DELETE", &format!("/certificates/{id}"), None);
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "conflict", "{body}");
    let (status, _) = router.api("GET", &format!("/certificates/{id}"), None);
    assert_eq!(status, 200, "a refused delete keeps the certificate");
    router.delete_route(&route);
    let (status, body) = router.api("DELETE", &format!("/certificates/{id}"), None);
    assert!((200..300).contains(&status), "{status} {body}");
    let (status, body) = router.api("GET", &format!("/certificates/{id}"), None);
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["code"], "object_not_found");
}

fn key_body(p: &Pair) -> String {
    // A distinctive piece of the base64 body of the key (not the armour lines).
    p.key_pem
        .lines()
        .find(|l| !l.starts_with("-----") && l.len() >= 40)
        .expect("key body line")
        .to_string()
}

#[test]
fn private_keys_never_appear_in_the_log() {
    let default = self_signed(&["a.example.com"]);
    let own = self_signed(&["b.example.com"]);
    // Also valid for b.example.com: it replaces `own` on that route below.
    let other = self_signed(&["b.example.com", "c.example.com"]);
    let router = https_builder()
        .env("FLYNN_LOG", "debug")
        .env("TLSCERT", default.cert_pem.clone())
        .env("TLSKEY", default.key_pem.clone())
        .start();
    let b = Backend::start("b");
    router.add_route(http_route("a.example.com", "web"));
    let route = router.add_route(cert_route("b.example.com", "web", &own));
    router.set_backends("web", &[&b]);
    // Certificates API, a bad pair (error paths), a route update, handshakes.
    let (status, _) = router.api("POST", "/certificates", Some(&other.json().to_string()));
    assert_eq!(status, 200);
    let bad = serde_json::json!({"cert": own.cert_pem, "key": other.key_pem});
    let (status, _) = router.api("POST", "/certificates", Some(&bad.to_string()));
    assert_eq!(status, 400);
    let mut r = http_route("bad.example.com", "web");
    r["certificate"] = bad;
    let (status, _) = router.api("POST", "/routes", Some(&r.to_string()));
    assert_eq!(status, 400);
    let mut upd = route.clone();
    upd["certificate"] = other.json();
    router.update_route(&upd);
    let roots = [&default, &own, &other];
    for host in ["a.example.com", "b.example.com"] {
        let mut conn = tls_connect(&router, host, &roots);
        assert_eq!(conn.get(host, "/").status, 200);
    }
    let _ = crate::client::TlsConn::connect(
        crate::https(&router),
        "unknown.example.org",
        crate::client::client_config(&roots, None),
    );
    let (status, _) = router.api("GET", "/certificates", None);
    assert_eq!(status, 200);
    std::thread::sleep(Duration::from_millis(200));

    let log = router.log();
    assert!(!log.is_empty(), "FLYNN_LOG=debug produced no log at all");
    assert!(
        !log.contains("PRIVATE KEY"),
        "a private key reached the log:\n{log}"
    );
    for p in [&default, &own, &other] {
        assert!(
            !log.contains(&key_body(p)),
            "private key material reached the log:\n{log}"
        );
    }
}

#[test]
fn bad_default_keypair_fails_start_without_printing_the_key() {
    let cert = self_signed(&["a.example.com"]);
    let other = self_signed(&["b.example.com"]);
    let (status, out) = https_builder()
        .env("FLYNN_LOG", "debug")
        .env("TLSCERT", cert.cert_pem.clone())
        .env("TLSKEY", other.key_pem.clone())
        .run_to_exit(Duration::from_secs(10));
    let status = status
        .unwrap_or_else(|| panic!("router with a mismatched default keypair kept running:\n{out}"));
    assert!(!status.success(), "{out}");
    assert!(out.contains("default TLS keypair"), "{out}");
    assert!(!out.contains("PRIVATE KEY"), "{out}");
    assert!(!out.contains(&key_body(&other)), "{out}");
}

/// A zero-downtime upgrade keeps every certificate with its id and creation time: one
/// that a route uses, and one that no route uses yet.
#[test]
fn certificates_keep_their_ids_across_a_takeover() {
    let dir = crate::support::TestDir::new("cert-handover");
    let sock = dir.join("upgrade.sock");
    let mut old = https_builder()
        .arg("--upgrade-socket")
        .arg(sock.display().to_string())
        .start();
    let used = self_signed(&["used.example.com"]);
    let spare = self_signed(&["spare.example.com"]);
    let b1 = Backend::start("b1");
    let route = old.add_route(cert_route("used.example.com", "web", &used));
    old.set_backends("web", &[&b1]);
    let (status, spare_cert) = post_cert(&old, &spare.json());
    assert_eq!(status, 200, "{spare_cert}");
    let (_, before) = old.api("GET", "/certificates", None);

    let new = https_builder()
        .arg("--takeover")
        .arg(sock.display().to_string())
        .start();
    old.wait_exit(Duration::from_secs(15))
        .expect("old router exits after the takeover");

    let (status, after) = new.api("GET", "/certificates", None);
    assert_eq!(status, 200);
    let summary = |list: &serde_json::Value| -> Vec<(String, String, Vec<String>)> {
        list.as_array()
            .expect("array")
            .iter()
            .map(|c| {
                (
                    c["id"].as_str().unwrap().to_string(),
                    c["created_at"].as_str().unwrap_or("").to_string(),
                    c["routes"]
                        .as_array()
                        .map(|r| r.iter().map(|x| x.to_string()).collect())
                        .unwrap_or_default(),
                )
            })
            .collect()
    };
    assert_eq!(summary(&after), summary(&before), "{before}\n{after}");
    assert_eq!(summary(&after).len(), 2);
    let (status, got) = new.api(
        "GET",
        &format!("/certificates/{}", spare_cert["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(status, 200, "{got}");
    // The route still presents its certificate.
    let (st, r) = new.api("GET", &crate::support::router::route_path(&route), None);
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["certificate"]["id"], route["certificate"]["id"], "{r}");
    let conn = tls_connect(&new, "used.example.com", &[&used]);
    assert_eq!(conn.peer_cert(), used.der);
}
