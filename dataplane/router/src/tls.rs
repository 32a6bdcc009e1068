//! TLS termination (spec §1.7): rustls server configs shared by every core, one per TLS
//! route port, with the certificate chosen by SNI through the same domain lookup as
//! routing on that listener's port (exact, then wildcards most-specific first, then `*`):
//! the route's certificate if it has one, else the default keypair; no matching route →
//! the handshake fails. Certificates
//! live in a [`CertStore`] snapshot published by the control thread, so a swap applies
//! to the next handshake without touching open connections. Private keys are never
//! logged: [`Keypair`]'s `Debug` omits them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use flynn_routes::MAX_DOMAIN;
use flynn_runtime::Published;
use rustls::crypto::aws_lc_rs::sign::any_supported_type;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// A validated certificate chain and private key.
#[derive(Clone)]
pub struct Keypair {
    pub key: Arc<CertifiedKey>,
    /// SHA-256 of the certificate PEM (trimmed), hex: the dedup key.
    pub sha256: String,
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keypair(sha256={})", self.sha256)
    }
}

/// Parses and checks a PEM certificate chain and private key (they must match).
pub fn parse_keypair(cert_pem: &str, key_pem: &str) -> Result<Keypair, String> {
    let cert_pem = cert_pem.trim();
    let key_pem = key_pem.trim();
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate found in PEM".into());
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| format!("bad key PEM: {e}"))?
        .ok_or_else(|| "no private key found in PEM".to_string())?;
    let signer = any_supported_type(&key).map_err(|e| format!("unsupported private key: {e}"))?;
    let ck = CertifiedKey::new(certs, signer);
    ck.keys_match()
        .map_err(|e| format!("key does not match certificate: {e}"))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, cert_pem.as_bytes());
    let sha256 = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Ok(Keypair {
        key: Arc::new(ck),
        sha256,
    })
}

/// One port's routed domains: lowercase domain (as routed, e.g. `*.example.com` or `*`)
/// → its certificate, or `None` for a routed domain that uses the default keypair.
type Domains = HashMap<String, Option<Arc<CertifiedKey>>>;

/// Which certificate each routed domain uses, per route port (as the route table keys
/// ports: 0 for the default listeners, else the additional listener's port), so a
/// handshake on a listener presents the certificate of the route that serves its
/// requests there.
#[derive(Debug, Default)]
pub struct CertStore {
    ports: BTreeMap<u16, Domains>,
    default: Option<Arc<CertifiedKey>>,
}

impl CertStore {
    pub fn new(default: Option<Arc<CertifiedKey>>) -> Self {
        CertStore {
            ports: BTreeMap::new(),
            default,
        }
    }

    /// Records a domain routed on route port `port` and its certificate (`None`: default
    /// keypair). A domain added again on a port keeps its first entry, a `None` too: the
    /// first route given decides.
    pub fn add_on(&mut self, port: u16, domain: &str, cert: Option<Arc<CertifiedKey>>) {
        self.ports
            .entry(port)
            .or_default()
            .entry(domain.to_ascii_lowercase())
            .or_insert(cert);
    }

    /// [`CertStore::add_on`] the default port (0).
    #[cfg(test)]
    pub fn add(&mut self, domain: &str, cert: Option<Arc<CertifiedKey>>) {
        self.add_on(0, domain, cert)
    }

    /// The certificate a handshake on route port `port` presents for an SNI name (None:
    /// no route there, or no certificate at all).
    pub fn lookup_on(&self, port: u16, sni: &str) -> Option<Arc<CertifiedKey>> {
        let hit = find(self.ports.get(&port)?, sni)?;
        hit.clone().or_else(|| self.default.clone())
    }

    /// The certificate for an SNI name on the first port (the default one, then the others
    /// in order) that routes it.
    #[cfg(test)]
    pub fn lookup(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let hit = self.ports.values().find_map(|d| find(d, sni))?;
        hit.clone().or_else(|| self.default.clone())
    }
}

/// The entry deciding `sni`'s certificate, found as the route lookup finds a domain
/// (`flynn_routes::Table::lookup_http`): exact, then `*.<name>` for at most five
/// suffixes, most specific first, then `*`; lowercase, a trailing dot ignored. No
/// allocation: candidates are built in place in one stack buffer.
fn find<'a>(domains: &'a Domains, sni: &str) -> Option<&'a Option<Arc<CertifiedKey>>> {
    let name = sni.as_bytes();
    let name = name.strip_suffix(b".").unwrap_or(name);
    let n = name.len();
    // `*.` + the name; each wildcard candidate is written just before its suffix, over
    // bytes already looked at.
    let mut buf = [0u8; MAX_DOMAIN + 2];
    if n <= MAX_DOMAIN {
        let end = 2 + n;
        for (d, s) in buf[2..end].iter_mut().zip(name) {
            *d = s.to_ascii_lowercase();
        }
        let exact = std::str::from_utf8(&buf[2..end]).ok()?;
        if let Some(h) = domains.get(exact) {
            return Some(h);
        }
        let mut start = 2;
        for i in 0..5 {
            if i > 0 {
                let Some(dot) = buf[start..end].iter().position(|&b| b == b'.') else {
                    break;
                };
                start += dot + 1;
            }
            if start == end {
                break;
            }
            buf[start - 2] = b'*';
            buf[start - 1] = b'.';
            let wild = std::str::from_utf8(&buf[start - 2..end]).ok()?;
            if let Some(h) = domains.get(wild) {
                return Some(h);
            }
        }
    }
    domains.get("*")
}

/// SNI resolver of one route port, reading the current [`CertStore`] snapshot.
pub struct Resolver {
    pub store: Arc<Published<CertStore>>,
    pub port: u16,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Resolver(port {})", self.port)
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let store = self.store.load_full();
        // No SNI (e.g. an IP address): only a catch-all route can match.
        store.lookup_on(self.port, hello.server_name().unwrap_or("*"))
    }
}

/// The TLS acceptors of the HTTPS listeners, one per route port: each has its own
/// certificate resolver, and all share one session cache and the ticket keys, each port
/// keeping to its own sessions (see [`PortSessions`], [`PortTickets`]).
#[derive(Clone)]
pub struct Acceptors {
    by_port: Vec<(u16, monoio_rustls::TlsAcceptor)>,
}

impl Acceptors {
    /// The acceptor of the listeners with route port `route_port`.
    pub fn get(&self, route_port: u16) -> Option<&monoio_rustls::TlsAcceptor> {
        self.by_port
            .iter()
            .find(|(p, _)| *p == route_port)
            .map(|(_, a)| a)
    }
}

/// The server configs all cores share, one per TLS route port in `ports` (session cache
/// and ticket keys shared by all, so resumption works across cores and the listeners of a
/// route port; the keys also across processes, see `tickets.rs`). A session resumes only
/// on the route port that made it: resumption skips the certificate resolver, so a session
/// from another port would let a handshake succeed for a name this port does not route.
/// TLS 1.2 and 1.3 only.
pub fn acceptors(
    store: Arc<Published<CertStore>>,
    tickets: Arc<crate::tickets::TicketKeys>,
    ports: &[u16],
) -> Result<Acceptors, String> {
    // aws-lc-rs measured faster than ring here: RSA-2048 handshakes 1.50× nginx per CPU-second
    // (ring 0.81×), ECDSA 2.41× (ring ~2.0×), TLS keep-alive 1.96× (ring 1.70×); perf/RESULTS.md.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut base = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver {
            store: store.clone(),
            port: 0,
        }));
    base.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let cache = rustls::server::ServerSessionMemoryCache::new(64 * 1024);
    let mut by_port: Vec<(u16, monoio_rustls::TlsAcceptor)> = Vec::new();
    for &port in ports {
        if by_port.iter().any(|(p, _)| *p == port) {
            continue;
        }
        let mut cfg = base.clone();
        cfg.cert_resolver = Arc::new(Resolver {
            store: store.clone(),
            port,
        });
        cfg.session_storage = Arc::new(PortSessions {
            cache: cache.clone(),
            port,
        });
        cfg.ticketer = Arc::new(PortTickets {
            keys: tickets.clone(),
            port,
        });
        by_port.push((port, monoio_rustls::TlsAcceptor::from(Arc::new(cfg))));
    }
    Ok(Acceptors { by_port })
}

/// A route port's tag on its sessions: a version byte, then the port.
fn port_tag(port: u16) -> [u8; 3] {
    let [hi, lo] = port.to_be_bytes();
    [0xf1, hi, lo]
}

/// One route port's view of the shared session cache (TLS 1.2 session ids): its keys
/// carry the port, so another port's sessions are not found.
#[derive(Debug)]
struct PortSessions {
    cache: Arc<dyn rustls::server::StoresServerSessions>,
    port: u16,
}

impl PortSessions {
    /// Calls `f` with `key` behind the port's tag, built on the stack (session ids are at
    /// most 32 bytes; a longer key, which rustls does not make, goes to the heap).
    fn with_key<T>(&self, key: &[u8], f: impl FnOnce(&[u8]) -> T) -> T {
        let tag = port_tag(self.port);
        let mut buf = [0u8; 3 + 64];
        match buf.get_mut(3..3 + key.len()) {
            Some(rest) => {
                rest.copy_from_slice(key);
                buf[..3].copy_from_slice(&tag);
                f(&buf[..3 + key.len()])
            }
            None => f(&[&tag[..], key].concat()),
        }
    }
}

impl rustls::server::StoresServerSessions for PortSessions {
    fn put(&self, mut key: Vec<u8>, value: Vec<u8>) -> bool {
        // The cache keeps the key: the given one, the tag put in front.
        key.splice(0..0, port_tag(self.port));
        self.cache.put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.with_key(key, |k| self.cache.get(k))
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.with_key(key, |k| self.cache.take(k))
    }

    fn can_cache(&self) -> bool {
        self.cache.can_cache()
    }
}

/// One route port's tickets: the shared keys seal the session bound to the port's tag
/// (associated data: authenticated, not in the ticket), and a ticket opens only on the
/// port it was bound to (one sealed otherwise, by an older process, opens on none: a full
/// handshake, once).
#[derive(Debug)]
struct PortTickets {
    keys: Arc<crate::tickets::TicketKeys>,
    port: u16,
}

impl rustls::server::ProducesTickets for PortTickets {
    fn enabled(&self) -> bool {
        rustls::server::ProducesTickets::enabled(&*self.keys)
    }

    fn lifetime(&self) -> u32 {
        rustls::server::ProducesTickets::lifetime(&*self.keys)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.keys.issue_bound(plain, &port_tag(self.port))
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.keys.open_bound(cipher, &port_tag(self.port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keypair(names: &[&str]) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(
            names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        (c.cert.pem(), c.key_pair.serialize_pem())
    }

    /// A ticket is bound to the port that issued it (associated data: the ticket is no
    /// longer than an unbound one) and a session id's cache entry to the port that stored
    /// it.
    #[test]
    fn tickets_and_sessions_are_per_port() {
        use rustls::server::{ProducesTickets, StoresServerSessions};
        let keys = Arc::new(crate::tickets::TicketKeys::random().unwrap());
        let on = |port| PortTickets {
            keys: keys.clone(),
            port,
        };
        let t = on(443).encrypt(b"state").unwrap();
        assert_eq!(t.len(), keys.issue(b"state").unwrap().len());
        assert_eq!(on(443).decrypt(&t).as_deref(), Some(&b"state"[..]));
        assert_eq!(on(8443).decrypt(&t), None);
        assert_eq!(keys.open(&t), None, "an unbound open took a bound ticket");
        assert_eq!(on(443).decrypt(&keys.issue(b"state").unwrap()), None);

        let cache = rustls::server::ServerSessionMemoryCache::new(16);
        let sessions = |port| PortSessions {
            cache: cache.clone(),
            port,
        };
        assert!(sessions(443).put(b"id".to_vec(), b"v".to_vec()));
        assert_eq!(sessions(8443).get(b"id"), None);
        assert_eq!(sessions(443).get(b"id").as_deref(), Some(&b"v"[..]));
        let long = vec![7u8; 100];
        assert!(sessions(443).put(long.clone(), b"w".to_vec()));
        assert_eq!(sessions(443).take(&long).as_deref(), Some(&b"w"[..]));
        assert_eq!(sessions(443).take(&long), None);
    }

    #[test]
    fn keypairs_are_validated() {
        let (cert, key) = keypair(&["a.com"]);
        let kp = parse_keypair(&cert, &key).unwrap();
        assert_eq!(kp.sha256.len(), 64);
        assert_eq!(
            parse_keypair(&format!("\n{cert}\n"), &key).unwrap().sha256,
            kp.sha256
        );
        let (_, other_key) = keypair(&["b.com"]);
        assert!(parse_keypair(&cert, &other_key)
            .unwrap_err()
            .contains("does not match"));
        assert!(parse_keypair("junk", &key).is_err());
        assert!(parse_keypair(&cert, "junk").is_err());
        assert!(!format!("{kp:?}").contains("PRIVATE"));
    }

    #[test]
    fn sni_lookup_order() {
        let k = |n: &str| {
            let (c, key) = keypair(&[n]);
            parse_keypair(&c, &key).unwrap().key
        };
        let default = k("default");
        let exact = k("dev.foo.bar");
        let wild = k("*.foo.bar");
        let mut s = CertStore::new(Some(default.clone()));
        s.add("dev.foo.bar", Some(exact.clone()));
        s.add("*.foo.bar", Some(wild.clone()));
        s.add("plain.com", None);
        assert!(Arc::ptr_eq(&s.lookup("DEV.foo.bar").unwrap(), &exact));
        assert!(Arc::ptr_eq(&s.lookup("x.foo.bar").unwrap(), &wild));
        assert!(Arc::ptr_eq(&s.lookup("a.b.foo.bar").unwrap(), &wild));
        assert!(Arc::ptr_eq(&s.lookup("plain.com").unwrap(), &default));
        assert!(s.lookup("unknown.org").is_none());
        s.add("*", None);
        assert!(Arc::ptr_eq(&s.lookup("unknown.org").unwrap(), &default));
        let no_default = CertStore::new(None);
        assert!(no_default.lookup("plain.com").is_none());
    }

    /// Each route port has its own map: a name routed on one port decides nothing on
    /// another, and a port without routes has no certificates at all.
    #[test]
    fn sni_lookup_is_per_port() {
        let k = |n: &str| {
            let (c, key) = keypair(&[n]);
            parse_keypair(&c, &key).unwrap().key
        };
        let (default, wild, own) = (k("default"), k("*.example.com"), k("b.example.com"));
        let mut s = CertStore::new(Some(default.clone()));
        s.add_on(0, "*.example.com", Some(wild.clone()));
        s.add_on(8443, "a.example.com", None);
        s.add_on(8443, "b.example.com", Some(own.clone()));
        assert!(Arc::ptr_eq(
            &s.lookup_on(0, "a.example.com").unwrap(),
            &wild
        ));
        assert!(Arc::ptr_eq(
            &s.lookup_on(0, "b.example.com").unwrap(),
            &wild
        ));
        assert!(Arc::ptr_eq(
            &s.lookup_on(8443, "a.example.com").unwrap(),
            &default
        ));
        assert!(Arc::ptr_eq(
            &s.lookup_on(8443, "B.Example.com").unwrap(),
            &own
        ));
        assert!(s.lookup_on(8443, "c.example.com").is_none());
        assert!(s.lookup_on(9443, "a.example.com").is_none());
    }

    /// The domain deciding a name's certificate is the one the route lookup finds for
    /// it (path `/`): exact, at most five wildcard suffixes, then `*`; case and a
    /// trailing dot ignored; a name too long to route only matches `*`.
    #[test]
    fn sni_candidates_are_the_route_lookups() {
        let domains = [
            "a.b.c.d.e.f.g",
            "*.c.d.e.f.g",
            "*.e.f.g",
            "*.f.g",
            "*.g",
            "*.x.y",
            "x.y",
            "*",
        ];
        let routes: Vec<flynn_api::Route> = domains
            .iter()
            .map(|d| flynn_api::Route {
                id: d.to_string(),
                ..flynn_api::Route::http(d, "web")
            })
            .collect();
        let table = flynn_routes::Table::build(&routes, &HashMap::new(), 1);
        let mut map: Domains = HashMap::new();
        let mut names: HashMap<*const CertifiedKey, &str> = HashMap::new();
        for d in domains {
            let (c, key) = keypair(&["n.test"]);
            let ck = parse_keypair(&c, &key).unwrap().key;
            names.insert(Arc::as_ptr(&ck), d);
            map.insert(d.to_string(), Some(ck));
        }
        let long = format!("{}.g", "a".repeat(MAX_DOMAIN));
        let names_to_try = [
            "a.b.c.d.e.f.g",
            "A.B.C.D.E.F.G.",
            "z.a.b.c.d.e.f.g",
            "q.c.d.e.f.g",
            "b.c.d.e.f.g",
            "p.q.r.s.t.u.e.f.g",
            "e.f.g",
            "f.g",
            "g",
            "x.y",
            "w.x.y",
            "y",
            "other",
            "a..g",
            ".g",
            "g.",
            long.as_str(),
        ];
        for sni in names_to_try {
            let want = table
                .lookup_http(sni.as_bytes(), 0, b"/")
                .map(|r| r.id.to_string());
            let got = find(&map, sni).map(|h| names[&Arc::as_ptr(h.as_ref().unwrap())].to_string());
            assert_eq!(got, want, "{sni}");
        }
    }

    /// A domain added again keeps its first entry, also when that is the default keypair.
    #[test]
    fn a_domains_first_entry_wins() {
        let k = |n: &str| {
            let (c, key) = keypair(&[n]);
            parse_keypair(&c, &key).unwrap().key
        };
        let (default, first, second) = (k("default"), k("a.com"), k("a.com"));
        let mut s = CertStore::new(Some(default.clone()));
        s.add("a.com", Some(first.clone()));
        s.add("A.com", Some(second.clone()));
        s.add("a.com", None);
        assert!(Arc::ptr_eq(&s.lookup("a.com").unwrap(), &first));
        s.add("b.com", None);
        s.add("b.com", Some(second));
        assert!(Arc::ptr_eq(&s.lookup("b.com").unwrap(), &default));
    }
}
