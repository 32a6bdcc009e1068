//! Which certificate is presented: route certificates, wildcards, updates, bad input.

use crate::client::{client_config, self_signed, TlsConn};
use crate::support::{http_route, Backend};
use crate::{cert_route, https, https_builder, setup, tls_connect};

#[test]
fn route_with_its_own_certificate_is_served_with_it() {
    let (router, _b1, default) = setup();
    let own = self_signed(&["b.example.com"]);
    let b2 = Backend::start("b2");
    let route = router.add_route(cert_route("b.example.com", "web2", &own));
    router.set_backends("web2", &[&b2]);
    let cert_id = route["certificate"]["id"].as_str().expect("certificate id");
    assert!(crate::support::is_uuid(cert_id), "{route}");

    let mut conn = tls_connect(&router, "b.example.com", &[&default, &own]);
    assert_eq!(conn.peer_cert(), own.der, "the route's own certificate");
    assert_eq!(conn.get("b.example.com", "/").seen().backend, "b2");
    // The route without a certificate keeps the default keypair.
    let mut conn = tls_connect(&router, "a.example.com", &[&default, &own]);
    assert_eq!(conn.peer_cert(), default.der, "default keypair");
    assert_eq!(conn.get("a.example.com", "/").seen().backend, "b1");
}

#[test]
fn route_certificate_works_without_a_default_keypair() {
    let router = https_builder().start();
    let own = self_signed(&["b.example.com"]);
    let b = Backend::start("b");
    router.add_route(cert_route("b.example.com", "web", &own));
    router.add_route(http_route("nocert.example.com", "web"));
    router.set_backends("web", &[&b]);
    let mut conn = tls_connect(&router, "b.example.com", &[&own]);
    assert_eq!(conn.peer_cert(), own.der);
    assert_eq!(conn.get("b.example.com", "/").status, 200);
    // A routed domain with neither its own certificate nor a default: no handshake.
    let res = TlsConn::connect(
        https(&router),
        "nocert.example.com",
        client_config(&[&own], None),
    );
    assert!(
        res.is_err(),
        "no certificate available must fail the handshake"
    );
}

#[test]
fn legacy_tls_cert_and_key_fields_are_accepted() {
    let (router, _b1, default) = setup();
    let own = self_signed(&["legacy.example.com"]);
    let mut r = http_route("legacy.example.com", "web");
    r["tls_cert"] = own.cert_pem.clone().into();
    r["tls_key"] = own.key_pem.clone().into();
    let stored = router.add_route(r);
    assert!(stored["certificate"]["id"].is_string(), "{stored}");
    let mut conn = tls_connect(&router, "legacy.example.com", &[&default, &own]);
    assert_eq!(conn.peer_cert(), own.der);
    assert_eq!(conn.get("legacy.example.com", "/").status, 200);
}

#[test]
fn two_routes_share_a_wildcard_certificate() {
    let (router, _b1, default) = setup();
    let wild = self_signed(&["*.example.com"]);
    let b2 = Backend::start("b2");
    let b3 = Backend::start("b3");
    let r1 = router.add_route(cert_route("one.example.com", "one", &wild));
    let r2 = router.add_route(cert_route("two.example.com", "two", &wild));
    router.set_backends("one", &[&b2]);
    router.set_backends("two", &[&b3]);
    // Deduplicated: one certificate, used by both routes.
    let id = r1["certificate"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        r2["certificate"]["id"].as_str(),
        Some(id.as_str()),
        "{r1}\n{r2}"
    );
    let (status, routes) = router.api("GET", &format!("/certificates/{id}/routes"), None);
    assert_eq!(status, 200, "{routes}");
    let mut ids: Vec<&str> = routes
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut want = vec![r1["id"].as_str().unwrap(), r2["id"].as_str().unwrap()];
    want.sort();
    assert_eq!(ids, want);

    for (host, backend) in [("one.example.com", "b2"), ("two.example.com", "b3")] {
        let mut conn = tls_connect(&router, host, &[&wild]);
        assert_eq!(conn.peer_cert(), wild.der, "{host}");
        assert_eq!(conn.get(host, "/").seen().backend, backend, "{host}");
    }
    // a.example.com still gets the default keypair, not the wildcard.
    let conn = tls_connect(&router, "a.example.com", &[&default]);
    assert_eq!(conn.peer_cert(), default.der);
}

#[test]
fn wildcard_route_domain_selects_its_certificate_by_sni() {
    let (router, _b1, default) = setup();
    let wild = self_signed(&["*.apps.test", "apps.test"]);
    let exact = self_signed(&["special.apps.test"]);
    let bw = Backend::start("bw");
    let bx = Backend::start("bx");
    router.add_route(cert_route("*.apps.test", "wild", &wild));
    router.add_route(cert_route("special.apps.test", "exact", &exact));
    router.set_backends("wild", &[&bw]);
    router.set_backends("exact", &[&bx]);
    let roots = [&default, &wild, &exact];
    let mut conn = tls_connect(&router, "foo.apps.test", &roots);
    assert_eq!(conn.peer_cert(), wild.der);
    assert_eq!(conn.get("foo.apps.test", "/").seen().backend, "bw");
    let mut conn = tls_connect(&router, "special.apps.test", &roots);
    assert_eq!(conn.peer_cert(), exact.der, "exact beats wildcard");
    assert_eq!(conn.get("special.apps.test", "/").seen().backend, "bx");
    // As in Flynn, `*.apps.test` also covers `apps.test`.
    let mut conn = tls_connect(&router, "apps.test", &roots);
    assert_eq!(conn.peer_cert(), wild.der, "the bare domain");
    assert_eq!(conn.get("apps.test", "/").seen().backend, "bw");
}

#[test]
fn certificate_update_applies_to_new_handshakes_and_keeps_open_connections() {
    let (router, _b1, default) = setup();
    let old = self_signed(&["c.example.com"]);
    let new = self_signed(&["c.example.com"]);
    let bc = Backend::start("bc");
    let route = router.add_route(cert_route("c.example.com", "c", &old));
    router.set_backends("c", &[&bc]);
    let roots = [&default, &old, &new];

    let mut kept = tls_connect(&router, "c.example.com", &roots);
    assert_eq!(kept.peer_cert(), old.der);
    assert_eq!(kept.get("c.example.com", "/before").status, 200);

    let mut update = route.clone();
    update["certificate"] = new.json();
    let updated = router.update_route(&update);
    assert_ne!(
        updated["certificate"]["id"], route["certificate"]["id"],
        "a new certificate gets a new id"
    );

    let mut fresh = tls_connect(&router, "c.example.com", &roots);
    assert_eq!(
        fresh.peer_cert(),
        new.der,
        "new handshakes get the new certificate"
    );
    assert_eq!(fresh.get("c.example.com", "/fresh").seen().backend, "bc");

    // The keep-alive connection opened before the update still works.
    for i in 0..3 {
        let resp = kept.get("c.example.com", &format!("/after{i}"));
        assert_eq!(resp.seen().uri, format!("/after{i}"));
    }
    assert_eq!(kept.peer_cert(), old.der);
}

#[test]
fn bad_certificate_never_breaks_the_listener_or_other_routes() {
    let (router, b1, default) = setup();
    let own = self_signed(&["b.example.com"]);
    let route_b = router.add_route(cert_route("b.example.com", "web", &own));
    let stranger = self_signed(&["x.example.com"]);
    let (_, routes_before) = router.api("GET", "/routes", None);

    let bad_bodies = [
        // Mismatched pair.
        serde_json::json!({"cert": own.cert_pem, "key": stranger.key_pem}),
        // Garbage.
        serde_json::json!({"cert": "not a pem", "key": "neither"}),
        // Truncated certificate.
        serde_json::json!({"cert": &own.cert_pem[..own.cert_pem.len() / 2], "key": own.key_pem}),
        // Key missing.
        serde_json::json!({"cert": own.cert_pem, "key": ""}),
    ];
    for bad in &bad_bodies {
        let mut r = http_route("bad.example.com", "web");
        r["certificate"] = bad.clone();
        let (status, body) = router.api("POST", "/routes", Some(&r.to_string()));
        assert_eq!(status, 400, "POST bad certificate {bad} -> {body}");
        assert_eq!(body["code"], "validation_error", "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("Certificate invalid"),
            "{body}"
        );
        // Replacing an existing route's certificate with a bad one fails too and changes
        // nothing.
        let mut upd = route_b.clone();
        upd["certificate"] = bad.clone();
        let path = crate::support::router::route_path(&route_b);
        let (status, body) = router.api("PUT", &path, Some(&upd.to_string()));
        assert_eq!(status, 400, "PUT bad certificate {bad} -> {body}");
        assert_eq!(body["code"], "validation_error", "{body}");
    }
    // Legacy fields are validated the same way.
    let mut r = http_route("bad.example.com", "web");
    r["tls_cert"] = own.cert_pem.clone().into();
    r["tls_key"] = stranger.key_pem.clone().into();
    let (status, body) = router.api("POST", "/routes", Some(&r.to_string()));
    assert_eq!(status, 400, "{body}");

    let (_, routes_after) = router.api("GET", "/routes", None);
    assert_eq!(routes_before, routes_after, "no route was added or changed");
    let (status, got) = router.api("GET", &crate::support::router::route_path(&route_b), None);
    assert_eq!(status, 200);
    assert_eq!(got["certificate"]["id"], route_b["certificate"]["id"]);

    // Both HTTPS routes still work with their certificates; bad.example.com has no route.
    let roots = [&default, &own, &stranger];
    let mut a = tls_connect(&router, "a.example.com", &roots);
    assert_eq!(a.peer_cert(), default.der);
    assert_eq!(a.get("a.example.com", "/").status, 200);
    let mut b = tls_connect(&router, "b.example.com", &roots);
    assert_eq!(b.peer_cert(), own.der);
    assert_eq!(b.get("b.example.com", "/").status, 200);
    assert!(TlsConn::connect(
        https(&router),
        "bad.example.com",
        client_config(&roots, None)
    )
    .is_err());
    assert!(b1.request_count() >= 2);
}

#[test]
fn deleting_a_route_removes_its_sni_name() {
    let (router, _b1, default) = setup();
    let own = self_signed(&["b.example.com"]);
    let route = router.add_route(cert_route("b.example.com", "web", &own));
    let roots = [&default, &own];
    let conn = tls_connect(&router, "b.example.com", &roots);
    assert_eq!(conn.peer_cert(), own.der);
    router.delete_route(&route);
    let res = TlsConn::connect(https(&router), "b.example.com", client_config(&roots, None));
    assert!(res.is_err(), "SNI of a deleted route must not handshake");
    // Adding it back (same certificate, same stored id) brings it back.
    let again = router.add_route(cert_route("b.example.com", "web", &own));
    assert_eq!(again["certificate"]["id"], route["certificate"]["id"]);
    let conn = tls_connect(&router, "b.example.com", &roots);
    assert_eq!(conn.peer_cert(), own.der);
}

/// An RSA keypair made by the openssl CLI (rcgen here only makes ECDSA keys).
fn rsa_pair(name: &str) -> crate::client::Pair {
    let dir = crate::support::TestDir::new("rsa");
    let (key, cert) = (dir.join("k.pem"), dir.join("c.pem"));
    let st = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
        ])
        .arg(format!("/CN={name}"))
        .arg("-addext")
        .arg(format!("subjectAltName=DNS:{name}"))
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "keyUsage=digitalSignature,keyEncipherment"])
        .args(["-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is needed for the RSA test (apt-get install openssl)");
    assert!(st.success());
    let cert_pem = std::fs::read_to_string(&cert).unwrap();
    let key_pem = std::fs::read_to_string(&key).unwrap();
    let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec();
    crate::client::Pair {
        cert_pem,
        key_pem,
        der,
    }
}

#[test]
fn rsa_and_ecdsa_certificates_side_by_side() {
    let (router, _b1, default) = setup();
    let rsa = rsa_pair("rsa.example.com");
    let b2 = Backend::start("b2");
    router.add_route(cert_route("rsa.example.com", "web2", &rsa));
    router.set_backends("web2", &[&b2]);
    let mut conn = tls_connect(&router, "rsa.example.com", &[&default, &rsa]);
    assert_eq!(conn.peer_cert(), rsa.der, "the RSA certificate");
    assert_eq!(conn.get("rsa.example.com", "/").seen().backend, "b2");
    // The ECDSA default still serves the other route.
    let conn = tls_connect(&router, "a.example.com", &[&default, &rsa]);
    assert_eq!(conn.peer_cert(), default.der);
}

/// A router with a plain and a TLS listener beyond the default ones (a default keypair
/// for `default`'s names): `(router, plain extra port, TLS extra address, default)`.
fn extra_listeners(
    b: crate::support::RouterBuilder,
) -> (
    crate::support::Router,
    u16,
    std::net::SocketAddr,
    crate::client::Pair,
) {
    let default = self_signed(&["a.example.com"]);
    let router = b
        .http_addrs(2)
        .arg("--https-addr")
        .arg("127.0.0.1:0")
        .env("TLSCERT", default.cert_pem.clone())
        .env("TLSKEY", default.key_pem.clone())
        .start();
    assert_eq!((router.http_addrs.len(), router.https_addrs.len()), (2, 2));
    let (plain, tls) = (router.http_addrs[1].port(), router.https_addrs[1]);
    (router, plain, tls, default)
}

/// A route carrying a certificate on an additional plain-HTTP port would never have its
/// certificate presented (no handshake happens there): a 400 `validation_error`, as the
/// legacy API's "Port not reserved for HTTPS traffic", whether added or updated. On the
/// additional HTTPS port it is accepted and served.
#[test]
fn a_certificate_on_a_plain_listeners_port_is_refused() {
    let (router, plain, tls, default) = extra_listeners(https_builder());
    let own = self_signed(&["p.example.com"]);
    let b = Backend::start("b");
    router.set_backends("extra", &[&b]);
    let on = |port: u16| {
        let mut r = cert_route("p.example.com", "extra", &own);
        r["port"] = port.into();
        r
    };

    let (status, body) = router.api("POST", "/routes", Some(&on(plain).to_string()));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "validation_error", "{body}");
    assert_eq!(
        body["message"], "Port not reserved for HTTPS traffic",
        "{body}"
    );
    let (_, routes) = router.api("GET", "/routes", None);
    assert_eq!(routes, serde_json::json!([]), "refused route stored");
    let (_, certs) = router.api("GET", "/certificates", None);
    assert_eq!(
        certs,
        serde_json::json!([]),
        "refused route's certificate stored"
    );

    // Without a certificate the plain port is fine, but an update cannot add one.
    let mut r = http_route("p.example.com", "extra");
    r["port"] = plain.into();
    let stored = router.add_route(r);
    let mut with_cert = stored.clone();
    with_cert["certificate"] = own.json();
    let path = crate::support::router::route_path(&stored);
    let (status, body) = router.api("PUT", &path, Some(&with_cert.to_string()));
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["message"], "Port not reserved for HTTPS traffic",
        "{body}"
    );
    let (_, now) = router.api("GET", &path, None);
    assert!(now["certificate"].is_null(), "{now}");

    // On the additional HTTPS port the route's certificate is presented.
    router.add_route(on(tls.port()));
    let roots = [&default, &own];
    let mut conn = TlsConn::connect(tls, "p.example.com", client_config(&roots, None))
        .unwrap_or_else(|e| panic!("handshake on the extra HTTPS port: {e}"));
    assert_eq!(conn.peer_cert(), own.der);
    assert_eq!(conn.get("p.example.com", "/").seen().backend, "b");
}

/// The routes file gets the same check: a reload naming a certificate on a plain
/// listener's port is refused as a whole (logged), and changes nothing.
#[test]
fn a_routes_file_with_a_certificate_on_a_plain_port_is_refused() {
    let dir = crate::support::TestDir::new("tls-plain-port");
    let file = dir.join("routes.json");
    std::fs::write(&file, r#"{"routes": []}"#).unwrap();
    let (router, plain, _tls, _default) =
        extra_listeners(https_builder().routes_file(file.clone()));
    let own = self_signed(&["p.example.com"]);
    let doc = serde_json::json!({"routes": [
        {"type": "http", "domain": "ok.example.com", "service": "web"},
        {"type": "http", "domain": "p.example.com", "service": "web", "port": plain,
         "certificate": own.json()},
    ]});
    std::fs::write(&file, doc.to_string()).unwrap();
    router.hup();
    assert!(
        crate::support::wait_until(std::time::Duration::from_secs(5), || router
            .log()
            .contains("reload failed")),
        "{}",
        router.log()
    );
    let log = router.log();
    assert!(
        log.contains("p.example.com") && log.contains("Port not reserved for HTTPS traffic"),
        "{log}"
    );
    let (_, routes) = router.api("GET", "/routes", None);
    assert_eq!(
        routes,
        serde_json::json!([]),
        "a refused reload changed routes"
    );
}

/// The certificate presented is the one of the route that serves the request on that
/// listener: each TLS port has its own SNI map, keyed like the route table's ports. Here
/// `*.example.com` (wildcard certificate) is routed on the default port only and
/// `a.example.com` (no certificate) on the additional HTTPS port only: on the default
/// port SNI `a.example.com` is routed by the wildcard, so it gets the wildcard's
/// certificate, not the default keypair an exact entry for another port would give; on
/// the additional port it gets the default keypair of its own route there.
#[test]
fn each_https_port_presents_the_certificate_of_its_own_routes() {
    let (router, _plain, extra, default) = extra_listeners(https_builder());
    let wild = self_signed(&["*.example.com"]);
    let (bw, ba) = (Backend::start("bw"), Backend::start("ba"));
    router.add_route(cert_route("*.example.com", "wild", &wild));
    let mut a = http_route("a.example.com", "a");
    a["port"] = extra.port().into();
    router.add_route(a);
    router.set_backends("wild", &[&bw]);
    router.set_backends("a", &[&ba]);
    let roots = [&default, &wild];

    let mut conn = tls_connect(&router, "a.example.com", &roots);
    assert_eq!(
        conn.peer_cert(),
        wild.der,
        "default port: the wildcard route serves a.example.com, so its certificate"
    );
    assert_eq!(conn.get("a.example.com", "/").seen().backend, "bw");

    let mut conn = TlsConn::connect(extra, "a.example.com", client_config(&roots, None))
        .unwrap_or_else(|e| panic!("handshake on the extra HTTPS port: {e}"));
    assert_eq!(
        conn.peer_cert(),
        default.der,
        "additional port: a.example.com's own route there, without a certificate"
    );
    assert_eq!(conn.get("a.example.com", "/").seen().backend, "ba");
    // Neither port's routes make a handshake on the other succeed.
    let res = TlsConn::connect(extra, "b.example.com", client_config(&roots, None));
    assert!(
        res.is_err(),
        "b.example.com is not routed on the extra port"
    );
}

/// A session resumes only on the route port whose handshake made it: resuming presents
/// no certificate, so a session from the default port would carry the default port's
/// certificate for the name to the additional port, whose own route for it has another
/// one. (A name the other port does not route fails the handshake either way: the
/// certificate is looked up for every ClientHello, resumption or not.) Sessions still
/// resume on the port that made them (TLS 1.3 and 1.2).
#[test]
fn a_session_resumes_only_on_the_https_port_that_made_it() {
    let (router, _plain, extra, default) = extra_listeners(https_builder());
    let own = self_signed(&["a.example.com"]);
    let (b0, bp) = (Backend::start("b0"), Backend::start("bp"));
    router.add_route(cert_route("a.example.com", "zero", &own));
    let mut on_extra = http_route("a.example.com", "extra");
    on_extra["port"] = extra.port().into();
    router.add_route(on_extra);
    let bcert = self_signed(&["b.example.com"]);
    let mut b_only = cert_route("b.example.com", "extra", &bcert);
    b_only["port"] = extra.port().into();
    router.add_route(b_only);
    router.set_backends("zero", &[&b0]);
    router.set_backends("extra", &[&bp]);
    let default_port = crate::https(&router);
    let roots = [&default, &own, &bcert];
    for v in [&rustls::version::TLS13, &rustls::version::TLS12] {
        // One config = one client session cache.
        let cfg = client_config(&roots, Some(&[v]));
        let mut first = TlsConn::connect(default_port, "a.example.com", cfg.clone()).unwrap();
        assert_eq!(first.peer_cert(), own.der);
        // Reading a response also processes the session tickets sent after the handshake.
        assert_eq!(first.get("a.example.com", "/").seen().backend, "b0");
        drop(first);
        let mut again = TlsConn::connect(default_port, "a.example.com", cfg.clone()).unwrap();
        assert_eq!(
            again.tls.conn.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "{:?}: no resumption on the port that made the session",
            v.version
        );
        assert_eq!(again.get("a.example.com", "/").seen().backend, "b0");
        drop(again);
        let mut other = TlsConn::connect(extra, "a.example.com", cfg.clone()).unwrap();
        assert_eq!(
            other.tls.conn.handshake_kind(),
            Some(rustls::HandshakeKind::Full),
            "{:?}: the default port's session resumed on the additional port",
            v.version
        );
        assert_eq!(
            other.peer_cert(),
            default.der,
            "{:?}: the additional port's route for a.example.com has the default keypair",
            v.version
        );
        assert_eq!(other.get("a.example.com", "/").seen().backend, "bp");
        drop(other);
        // A session for a name the other port does not route opens nothing there.
        let cfg = client_config(&roots, Some(&[v]));
        let mut b = TlsConn::connect(extra, "b.example.com", cfg.clone()).unwrap();
        assert_eq!(b.get("b.example.com", "/").seen().backend, "bp");
        drop(b);
        assert!(TlsConn::connect(default_port, "b.example.com", cfg).is_err());
    }
}

/// A client that sends no SNI (it connects by address) gets the catch-all route of the
/// listener's own port: served on the additional port that routes `*`, refused on the
/// default port that does not.
#[test]
fn a_client_without_sni_is_served_by_its_ports_catch_all() {
    let (router, _plain, extra, _default) = extra_listeners(https_builder());
    let by_ip = self_signed(&["127.0.0.1"]);
    let b = Backend::start("b");
    let mut any = cert_route("*", "any", &by_ip);
    any["port"] = extra.port().into();
    router.add_route(any);
    router.set_backends("any", &[&b]);
    let mut conn = TlsConn::connect(extra, "127.0.0.1", client_config(&[&by_ip], None))
        .unwrap_or_else(|e| panic!("no SNI on the port routing `*`: {e}"));
    assert_eq!(conn.peer_cert(), by_ip.der);
    assert_eq!(conn.get("127.0.0.1", "/").seen().backend, "b");
    let refused = TlsConn::connect(
        crate::https(&router),
        "127.0.0.1",
        client_config(&[&by_ip], None),
    );
    assert!(refused.is_err(), "no SNI on a port without `*`");
}
