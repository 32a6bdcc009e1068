//! Handshakes: the default keypair, unknown SNI, protocol versions, ALPN.

use crate::client::{client_config, self_signed, TlsConn};
use crate::support::{http_route, Backend};
use crate::{https, https_builder, setup, tls_connect, PemFiles};
use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn https_get_with_default_keypair_from_files() {
    let default = self_signed(&["a.example.com"]);
    let files = PemFiles::write(&default);
    let router = https_builder()
        .arg("--tls-cert")
        .arg(files.cert.display().to_string())
        .arg("--tls-key")
        .arg(files.key.display().to_string())
        .start();
    let b1 = Backend::start("b1");
    router.add_route(http_route("a.example.com", "web"));
    router.set_backends("web", &[&b1]);

    let mut conn = tls_connect(&router, "a.example.com", &[&default]);
    assert_eq!(conn.peer_cert(), default.der, "default keypair presented");
    assert_eq!(
        conn.tls.conn.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "ALPN http/1.1"
    );
    let resp = conn.get("a.example.com", "/hello?x=1");
    let seen = resp.seen();
    assert_eq!(seen.backend, "b1");
    assert_eq!(seen.uri, "/hello?x=1");
    assert_eq!(seen.header("host"), Some("a.example.com"));
    // Plain HTTP on the HTTP listener still serves the same route.
    let plain = crate::support::get(router.http_addr, "a.example.com", "/plain");
    assert_eq!(plain.status, 200);
}

#[test]
fn https_get_with_default_keypair_from_env() {
    let (router, b1, default) = setup();
    let mut conn = tls_connect(&router, "a.example.com", &[&default]);
    assert_eq!(conn.peer_cert(), default.der);
    assert_eq!(conn.get("a.example.com", "/").seen().backend, "b1");
    assert_eq!(b1.request_count(), 1);
}

#[test]
fn unknown_sni_fails_the_handshake() {
    let (router, _b1, default) = setup();
    let other = self_signed(&["nope.other.org"]);
    for sni in ["nope.other.org", "b.example.com", "example.com"] {
        let res = TlsConn::connect(
            https(&router),
            sni,
            client_config(&[&default, &other], None),
        );
        assert!(
            res.is_err(),
            "handshake with unrouted SNI {sni:?} should fail"
        );
    }
    // No SNI at all (an IP address): only a catch-all route could match; there is none.
    let res = TlsConn::connect(
        https(&router),
        "127.0.0.1",
        client_config(&[&default], None),
    );
    assert!(res.is_err(), "handshake without SNI should fail");
    // The listener is unharmed.
    let mut conn = tls_connect(&router, "a.example.com", &[&default]);
    assert_eq!(conn.get("a.example.com", "/").status, 200);
}

#[test]
fn sni_matching_is_case_insensitive() {
    let (router, _b1, default) = setup();
    let mut conn = tls_connect(&router, "A.Example.COM", &[&default]);
    assert_eq!(conn.peer_cert(), default.der);
    assert_eq!(conn.get("a.example.com", "/").status, 200);
}

#[test]
fn tls12_only_and_tls13_only_clients_succeed() {
    let (router, _b1, default) = setup();
    for (v, want) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let cfg = client_config(&[&default], Some(&[v]));
        let mut conn = TlsConn::connect(https(&router), "a.example.com", cfg)
            .unwrap_or_else(|e| panic!("{want:?} handshake: {e}"));
        assert_eq!(conn.tls.conn.protocol_version(), Some(want));
        assert_eq!(conn.peer_cert(), default.der);
        assert_eq!(conn.get("a.example.com", "/v").status, 200);
    }
}

/// Runs `openssl s_client` against `addr` with `args`; None when openssl is missing.
fn s_client(addr: SocketAddr, sni: &str, args: &[&str]) -> Option<(bool, String)> {
    let mut child = match Command::new("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .arg("-servername")
        .arg(sni)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            println!("note: openssl not runnable ({e}); skipping the TLS 1.0/1.1 check");
            return None;
        }
    };
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t2 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = format!("{}\n{}", t1.join().unwrap(), t2.join().unwrap());
    let status = status.unwrap_or_else(|| panic!("openssl s_client {args:?} hung:\n{text}"));
    Some((status.success(), text))
}

/// The negotiated protocol s_client reports (`Protocol  : TLSv1.2` or
/// `New, TLSv1.3, Cipher is ...`); None when no session was established.
fn negotiated(text: &str) -> Option<String> {
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("New, ") {
            let proto = rest.split(',').next().unwrap_or("").trim();
            if proto != "(NONE)" && !l.contains("Cipher is (NONE)") {
                return Some(proto.to_string());
            }
        }
    }
    None
}

#[test]
fn tls10_and_tls11_are_refused() {
    let (router, _b1, _default) = setup();
    let addr = https(&router);
    // Control: the same openssl binary does establish TLS 1.2 (so a refusal below is the
    // router's, not a broken client).
    let Some((_, ok12)) = s_client(addr, "a.example.com", &["-tls1_2"]) else {
        return;
    };
    if ok12.contains("unknown option") || ok12.contains("Unknown option") {
        println!("note: openssl lacks -tls1_2; skipping the TLS 1.0/1.1 check");
        return;
    }
    assert_eq!(
        negotiated(&ok12).as_deref(),
        Some("TLSv1.2"),
        "openssl -tls1_2 should succeed:\n{ok12}"
    );
    for flag in ["-tls1", "-tls1_1"] {
        // SECLEVEL=0 so OpenSSL 3 is willing to offer the old version at all.
        let (_, text) = s_client(
            addr,
            "a.example.com",
            &[flag, "-cipher", "DEFAULT@SECLEVEL=0"],
        )
        .unwrap();
        if text.contains("unknown option") || text.contains("Unknown option") {
            println!("note: openssl lacks {flag}; skipping it");
            continue;
        }
        println!("openssl s_client {flag}:\n{text}");
        assert_eq!(
            negotiated(&text),
            None,
            "openssl {flag} must not establish a session:\n{text}"
        );
        if text.contains("no protocols available") {
            println!("note: openssl refuses {flag} locally; only the failure was checked");
        } else {
            // The ClientHello went out and the router answered with an alert.
            assert!(
                text.contains("alert"),
                "expected a TLS alert for {flag}:\n{text}"
            );
        }
    }
    // Still serving afterwards.
    let mut conn = tls_connect(&router, "a.example.com", &[&_default]);
    assert_eq!(conn.get("a.example.com", "/").status, 200);
}

#[test]
fn sessions_resume_across_connections_and_cores() {
    let (router, _b1, default) = setup();
    for v in [&rustls::version::TLS13, &rustls::version::TLS12] {
        // One config = one client session cache.
        let cfg = client_config(&[&default], Some(&[v]));
        let mut first = TlsConn::connect(https(&router), "a.example.com", cfg.clone()).unwrap();
        assert_eq!(
            first.tls.conn.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
        // Reading a response also processes the session tickets sent after the handshake.
        assert_eq!(first.get("a.example.com", "/").status, 200);
        drop(first);
        // Several connections, so both router cores (SO_REUSEPORT) are very likely hit.
        for i in 0..6 {
            let mut c = TlsConn::connect(https(&router), "a.example.com", cfg.clone()).unwrap();
            assert_eq!(
                c.tls.conn.handshake_kind(),
                Some(rustls::HandshakeKind::Resumed),
                "{:?} connection {i} should resume",
                v.version
            );
            assert_eq!(c.get("a.example.com", "/r").status, 200);
        }
    }
}

#[test]
fn parallel_tls_clients() {
    let (router, b1, default) = setup();
    let addr = https(&router);
    let cfg = client_config(&[&default], None);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let mut conn = TlsConn::connect(addr, "a.example.com", cfg).expect("handshake");
                for i in 0..5 {
                    let seen = conn.get("a.example.com", &format!("/t{t}/{i}")).seen();
                    assert_eq!(seen.uri, format!("/t{t}/{i}"));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    assert_eq!(b1.request_count(), 40);
}

#[test]
fn connections_still_in_their_handshake_count_against_the_connection_limit() {
    let (router, _b1, default) = crate::setup_with(
        https_builder()
            .threads(1)
            .arg("--max-conns-per-core")
            .arg("3"),
    );
    // Three connections that never send a ClientHello fill the core.
    let silent: Vec<std::net::TcpStream> = (0..3)
        .map(|_| std::net::TcpStream::connect(https(&router)).unwrap())
        .collect();
    // Accepted (and counted) by the router: a second is plenty on a busy machine.
    std::thread::sleep(Duration::from_secs(1));
    let refused = TlsConn::connect(
        https(&router),
        "a.example.com",
        client_config(&[&default], None),
    );
    assert!(refused.is_err(), "a fourth connection was served");
    // Once they go (the router notices their close), handshakes are served again.
    drop(silent);
    let t0 = Instant::now();
    let mut conn = loop {
        match TlsConn::connect(
            https(&router),
            "a.example.com",
            client_config(&[&default], None),
        ) {
            Ok(c) => break c,
            Err(e) => {
                assert!(t0.elapsed() < Duration::from_secs(5), "still refused: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert_eq!(conn.get("a.example.com", "/").seen().backend, "b1");
}

/// A router with `default` as its keypair, `extra` flags, and `a.example.com` → `backend`.
fn ticket_router(
    default: &crate::client::Pair,
    extra: &[String],
    backend: &Backend,
) -> crate::support::Router {
    let mut b = https_builder()
        .env("TLSCERT", default.cert_pem.clone())
        .env("TLSKEY", default.key_pem.clone());
    for a in extra {
        b = b.arg(a.clone());
    }
    let router = b.start();
    router.add_route(http_route("a.example.com", "web"));
    router.set_backends("web", &[backend]);
    router
}

/// Whether a second connection to `to`, with the session `from` gave the client, resumes.
fn resumes(
    from: SocketAddr,
    to: SocketAddr,
    v: &'static rustls::SupportedProtocolVersion,
    roots: &crate::client::Pair,
) -> bool {
    // One config = one client session cache.
    let cfg = client_config(&[roots], Some(&[v]));
    let mut first = TlsConn::connect(from, "a.example.com", cfg.clone()).unwrap();
    // Reading a response also processes the session tickets sent after the handshake.
    assert_eq!(first.get("a.example.com", "/").status, 200);
    drop(first);
    let mut c = TlsConn::connect(to, "a.example.com", cfg).unwrap();
    assert_eq!(c.get("a.example.com", "/again").status, 200);
    c.tls.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
}

/// `--tls-ticket-key FILE`: routers given the same key file resume each other's sessions
/// (TLS 1.3 and 1.2 tickets); a router with its own random keys does not.
#[test]
fn routers_sharing_a_ticket_key_file_resume_each_others_sessions() {
    let dir = crate::support::TestDir::new("tickets");
    let key = dir.join("ticket.key");
    let bytes: Vec<u8> = (0..80u32)
        .map(|i| (i.wrapping_mul(73) ^ std::process::id()) as u8)
        .collect();
    std::fs::write(&key, bytes).unwrap();
    let default = self_signed(&["a.example.com"]);
    let backend = Backend::start("b1");
    let flag = vec!["--tls-ticket-key".to_string(), key.display().to_string()];
    let a = ticket_router(&default, &flag, &backend);
    let b = ticket_router(&default, &flag, &backend);
    let own = ticket_router(&default, &[], &backend);
    for v in [&rustls::version::TLS13, &rustls::version::TLS12] {
        assert!(
            resumes(https(&a), https(&b), v, &default),
            "{:?} a → b",
            v.version
        );
        assert!(
            resumes(https(&b), https(&a), v, &default),
            "{:?} b → a",
            v.version
        );
        assert!(
            !resumes(https(&a), https(&own), v, &default),
            "{:?} a → own keys",
            v.version
        );
    }
    // A key file of the wrong size stops the router at start, saying why.
    std::fs::write(&key, [0u8; 20]).unwrap();
    let (status, out) = https_builder()
        .env("TLSCERT", default.cert_pem.clone())
        .env("TLSKEY", default.key_pem.clone())
        .arg("--tls-ticket-key")
        .arg(key.display().to_string())
        .run_to_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| !s.success()), "{status:?} {out}");
    assert!(out.contains("48 or 80"), "{out}");
}

/// Without key files the random ticket keys go to the new process in a takeover: a client
/// resumes with the session the old process gave it.
#[test]
fn sessions_resume_across_a_takeover() {
    let dir = crate::support::TestDir::new("tickets-takeover");
    let sock = dir.join("upgrade.sock");
    let default = self_signed(&["a.example.com"]);
    let backend = Backend::start("b1");
    let mut old = ticket_router(
        &default,
        &["--upgrade-socket".into(), sock.display().to_string()],
        &backend,
    );
    let addr = https(&old);
    // One client session cache per protocol version.
    let cfgs: Vec<_> = [&rustls::version::TLS13, &rustls::version::TLS12]
        .into_iter()
        .map(|v| client_config(&[&default], Some(&[v])))
        .collect();
    for cfg in &cfgs {
        let mut first = TlsConn::connect(addr, "a.example.com", cfg.clone()).unwrap();
        assert_eq!(first.get("a.example.com", "/").status, 200);
    }
    let new = https_builder()
        .env("TLSCERT", default.cert_pem.clone())
        .env("TLSKEY", default.key_pem.clone())
        .arg("--takeover")
        .arg(sock.display().to_string())
        .start();
    assert_eq!(https(&new), addr);
    let status = old
        .wait_exit(Duration::from_secs(15))
        .expect("old router exits after draining");
    assert!(status.success(), "old router: {status}");
    // Only the new process serves now.
    for cfg in cfgs {
        let mut c = TlsConn::connect(addr, "a.example.com", cfg).unwrap();
        assert_eq!(c.get("a.example.com", "/after").status, 200);
        assert_eq!(
            c.tls.conn.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "{:?}",
            c.tls.conn.protocol_version()
        );
    }
}
