//! TLS termination (spec §1.7): rustls server config shared by every core, with the
//! certificate chosen by SNI through the same domain lookup as routing (exact, then
//! wildcards most-specific first, then `*`): the route's certificate if it has one,
//! else the default keypair; no matching route → the handshake fails. Certificates
//! live in a [`CertStore`] snapshot published by the control thread, so a swap applies
//! to the next handshake without touching open connections. Private keys are never
//! logged: [`Keypair`]'s `Debug` omits them.

use std::collections::HashMap;
use std::sync::Arc;

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

/// Which certificate each routed domain uses.
#[derive(Debug, Default)]
pub struct CertStore {
    /// Lowercase domain (as routed, e.g. `*.example.com` or `*`) → its certificate,
    /// or `None` for a routed domain that uses the default keypair.
    domains: HashMap<String, Option<Arc<CertifiedKey>>>,
    default: Option<Arc<CertifiedKey>>,
}

impl CertStore {
    pub fn new(default: Option<Arc<CertifiedKey>>) -> Self {
        CertStore {
            domains: HashMap::new(),
            default,
        }
    }

    /// Records a routed domain and its certificate (`None`: default keypair). A domain
    /// added again keeps its first entry, a `None` too: the first route given decides.
    pub fn add(&mut self, domain: &str, cert: Option<Arc<CertifiedKey>>) {
        self.domains
            .entry(domain.to_ascii_lowercase())
            .or_insert(cert);
    }

    /// The certificate for an SNI name (None: no route, or no certificate at all).
    pub fn lookup(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let name = sni.to_ascii_lowercase();
        let hit = self.domains.get(&name).or_else(|| {
            // As route lookup: `*.<name>` first, at most five candidates.
            let mut rest = name.as_str();
            for i in 0..5 {
                if i > 0 {
                    let dot = rest.find('.')?;
                    rest = &rest[dot + 1..];
                }
                if let Some(h) = self.domains.get(&format!("*.{rest}")) {
                    return Some(h);
                }
            }
            None
        });
        let hit = match hit {
            Some(h) => h,
            None => self.domains.get("*")?,
        };
        hit.clone().or_else(|| self.default.clone())
    }
}

/// SNI resolver reading the current [`CertStore`] snapshot.
pub struct Resolver {
    pub store: Arc<Published<CertStore>>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let store = self.store.load_full();
        match hello.server_name() {
            Some(name) => store.lookup(name),
            // No SNI (e.g. an IP address): only a catch-all route can match.
            None => store.lookup("*"),
        }
    }
}

/// The one server config all cores share (session cache and ticket keys included, so
/// resumption works across cores; the keys also across processes, see `tickets.rs`).
/// TLS 1.2 and 1.3 only.
pub fn server_config(
    store: Arc<Published<CertStore>>,
    tickets: Arc<crate::tickets::TicketKeys>,
) -> Result<Arc<ServerConfig>, String> {
    // aws-lc-rs measured faster than ring here: RSA-2048 handshakes 1.50× nginx per CPU-second
    // (ring 0.81×), ECDSA 2.41× (ring ~2.0×), TLS keep-alive 1.96× (ring 1.70×); perf/RESULTS.md.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver { store }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ticketer = tickets;
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(64 * 1024);
    Ok(Arc::new(cfg))
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
