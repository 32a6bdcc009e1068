//! TLS session-ticket keys (RFC 5077 / RFC 8446 tickets), ours rather than rustls's random
//! ones so they can outlive the process: `--tls-ticket-key FILE` shares keys between
//! routers (and restarts), as nginx's `ssl_session_ticket_key` and HAProxy's
//! `tls-ticket-keys`; without it the random keys are handed over in a takeover, so clients
//! resume across a zero-downtime upgrade too.
//!
//! A ticket is `name (16) ‖ nonce (12) ‖ AES-256-GCM(state) ‖ tag (16)`, the name as AAD.
//! The first key encrypts; every key decrypts (found by name). Random keys rotate every
//! [`ROTATE`], the previous one kept for decryption; keys from files never rotate.

use std::sync::RwLock;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// How long a random key encrypts before a new one takes over (the old one still decrypts
/// for as long again).
pub const ROTATE: Duration = Duration::from_secs(6 * 3600);
/// Ticket lifetime announced to clients (seconds): a ticket is issued under a key that
/// decrypts for at least this long.
const LIFETIME: u32 = 6 * 3600;
const NAME: usize = 16;
const TAG: usize = 16;

struct Key {
    name: [u8; NAME],
    raw: [u8; 32],
    aead: LessSafeKey,
}

impl Key {
    fn new(name: [u8; NAME], raw: [u8; 32]) -> Key {
        let aead = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &raw).expect("a 32-byte AES-256 key is valid"),
        );
        Key { name, raw, aead }
    }

    fn random(rng: &SystemRandom) -> Result<Key, String> {
        let mut b = [0u8; NAME + 32];
        rng.fill(&mut b)
            .map_err(|_| "no randomness for a TLS ticket key".to_string())?;
        Ok(Self::from_bytes(&b))
    }

    /// `name (16) ‖ AES key (32)`.
    fn from_bytes(b: &[u8; NAME + 32]) -> Key {
        let mut name = [0u8; NAME];
        let mut raw = [0u8; 32];
        name.copy_from_slice(&b[..NAME]);
        raw.copy_from_slice(&b[NAME..]);
        Key::new(name, raw)
    }
}

struct Keys {
    /// `[0]` encrypts; all decrypt.
    list: Vec<Key>,
    /// When `list[0]` started encrypting (random keys only rotate).
    since: Instant,
}

pub struct TicketKeys {
    keys: RwLock<Keys>,
    /// Keys from files: never rotated.
    fixed: bool,
    rng: SystemRandom,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketKeys")
            .field("fixed", &self.fixed)
            .finish_non_exhaustive()
    }
}

impl TicketKeys {
    /// A fresh random key, rotated every [`ROTATE`].
    pub fn random() -> Result<TicketKeys, String> {
        let rng = SystemRandom::new();
        let key = Key::random(&rng)?;
        Ok(Self::with(vec![key], false, rng))
    }

    /// Keys handed over by the process this one took over from (see [`TicketKeys::export`]);
    /// they go on rotating here. Malformed entries are an error.
    pub fn handed_over(exported: &[String]) -> Result<TicketKeys, String> {
        let mut list = Vec::new();
        for e in exported {
            let b = B64
                .decode(e)
                .map_err(|_| "a handed-over ticket key is not base64")?;
            let b: [u8; NAME + 32] = b
                .try_into()
                .map_err(|_| "a handed-over ticket key is not 48 bytes")?;
            list.push(Key::from_bytes(&b));
        }
        if list.is_empty() {
            return Self::random();
        }
        Ok(Self::with(list, false, SystemRandom::new()))
    }

    /// Keys from `--tls-ticket-key` files, the first one encrypting. Each file holds 48
    /// bytes (name 16, AES key 32) or 80 (name 16, HMAC key 32, AES key 32: nginx's and
    /// HAProxy's layout; the HMAC key is unused under AES-GCM), e.g. `openssl rand 80`.
    pub fn from_files(paths: &[std::path::PathBuf]) -> Result<TicketKeys, String> {
        let mut list = Vec::new();
        for p in paths {
            let b = std::fs::read(p)
                .map_err(|e| format!("reading TLS ticket key {}: {e}", p.display()))?;
            let key = match b.len() {
                48 => Key::from_bytes(b[..48].try_into().expect("48 bytes")),
                80 => {
                    let mut k = [0u8; NAME + 32];
                    k[..NAME].copy_from_slice(&b[..NAME]);
                    k[NAME..].copy_from_slice(&b[48..80]);
                    Key::from_bytes(&k)
                }
                n => {
                    return Err(format!(
                        "TLS ticket key {} has {n} bytes; it must have 48 or 80 (openssl rand 80)",
                        p.display()
                    ))
                }
            };
            if list.iter().any(|k: &Key| k.name == key.name) {
                return Err(format!(
                    "TLS ticket key {} has the same name (first 16 bytes) as an earlier one",
                    p.display()
                ));
            }
            list.push(key);
        }
        if list.is_empty() {
            return Err("no TLS ticket key files".into());
        }
        Ok(Self::with(list, true, SystemRandom::new()))
    }

    fn with(list: Vec<Key>, fixed: bool, rng: SystemRandom) -> TicketKeys {
        TicketKeys {
            keys: RwLock::new(Keys {
                list,
                since: Instant::now(),
            }),
            fixed,
            rng,
        }
    }

    /// The keys as base64 (`name ‖ key`), the encrypting one first, for a takeover.
    pub fn export(&self) -> Vec<String> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.list
            .iter()
            .map(|k| {
                let mut b = k.name.to_vec();
                b.extend_from_slice(&k.raw);
                B64.encode(b)
            })
            .collect()
    }

    /// A random key that has encrypted for [`ROTATE`] gives way to a new one; the old one
    /// is kept to decrypt (one generation back).
    fn rotate_if_due(&self) {
        if self.fixed {
            return;
        }
        let due = {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            keys.since.elapsed() >= ROTATE
        };
        if !due {
            return;
        }
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        if keys.since.elapsed() < ROTATE {
            return;
        }
        if let Ok(k) = Key::random(&self.rng) {
            keys.list.insert(0, k);
            keys.list.truncate(2);
            keys.since = Instant::now();
        }
    }

    #[cfg(test)]
    fn age_by(&self, d: Duration) {
        let mut keys = self.keys.write().unwrap();
        keys.since = keys.since.checked_sub(d).unwrap();
    }
}

impl rustls::server::ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        LIFETIME
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.rotate_if_due();
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let key = keys.list.first()?;
        let mut out = Vec::with_capacity(NAME + NONCE_LEN + plain.len() + TAG);
        out.extend_from_slice(&key.name);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let mut body = out.split_off(NAME + NONCE_LEN);
        key.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&key.name),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < NAME + NONCE_LEN + TAG {
            return None;
        }
        let (name, rest) = cipher.split_at(NAME);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let key = keys.list.iter().find(|k| k.name == name)?;
        let mut body = sealed.to_vec();
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let plain = key
            .aead
            .open_in_place(nonce, Aad::from(&key.name), &mut body)
            .ok()?;
        let n = plain.len();
        body.truncate(n);
        Some(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    #[test]
    fn tickets_round_trip_and_tampering_is_refused() {
        let k = TicketKeys::random().unwrap();
        let t = k.encrypt(b"session state").unwrap();
        assert_eq!(t.len(), NAME + NONCE_LEN + 13 + TAG);
        assert_eq!(k.decrypt(&t).as_deref(), Some(&b"session state"[..]));
        // Two tickets of one state differ (fresh nonce).
        assert_ne!(k.encrypt(b"session state").unwrap(), t);
        for i in [0, NAME, NAME + NONCE_LEN, t.len() - 1] {
            let mut bad = t.clone();
            bad[i] ^= 1;
            assert_eq!(k.decrypt(&bad), None, "flipped byte {i}");
        }
        assert_eq!(k.decrypt(&t[..NAME + NONCE_LEN + TAG - 1]), None);
        // Another process's random key cannot open it.
        assert_eq!(TicketKeys::random().unwrap().decrypt(&t), None);
    }

    #[test]
    fn exported_keys_open_earlier_tickets_and_rotation_keeps_one_generation() {
        let k = TicketKeys::random().unwrap();
        let t0 = k.encrypt(b"zero").unwrap();
        let next = TicketKeys::handed_over(&k.export()).unwrap();
        assert_eq!(next.decrypt(&t0).as_deref(), Some(&b"zero"[..]));

        next.age_by(ROTATE);
        let t1 = next.encrypt(b"one").unwrap();
        assert_ne!(t1[..NAME], t0[..NAME], "rotated to a new key");
        assert_eq!(next.decrypt(&t0).as_deref(), Some(&b"zero"[..]));
        assert_eq!(next.decrypt(&t1).as_deref(), Some(&b"one"[..]));
        next.age_by(ROTATE);
        let _ = next.encrypt(b"two").unwrap();
        assert_eq!(next.decrypt(&t0), None, "two generations back");
        assert_eq!(next.decrypt(&t1).as_deref(), Some(&b"one"[..]));

        assert!(TicketKeys::handed_over(&["not base64!".into()]).is_err());
        assert!(TicketKeys::handed_over(&["AAAA".into()]).is_err());
    }

    #[test]
    fn key_files_of_48_or_80_bytes_are_shared_and_never_rotate() {
        let dir = std::env::temp_dir().join(format!("flynn-tickets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b, bad, dup) = (
            dir.join("a.key"),
            dir.join("b.key"),
            dir.join("bad.key"),
            dir.join("dup.key"),
        );
        let ka: Vec<u8> = (0..80u8).collect();
        let kb: Vec<u8> = (100..148u8).collect();
        std::fs::write(&a, &ka).unwrap();
        std::fs::write(&b, &kb).unwrap();
        std::fs::write(&bad, [1u8; 32]).unwrap();
        std::fs::write(&dup, &ka[..48]).unwrap();
        let one = TicketKeys::from_files(&[a.clone(), b.clone()]).unwrap();
        let other = TicketKeys::from_files(&[b.clone(), a.clone()]).unwrap();
        let t = one.encrypt(b"shared").unwrap();
        assert_eq!(&t[..NAME], &ka[..NAME], "the first file encrypts");
        assert_eq!(other.decrypt(&t).as_deref(), Some(&b"shared"[..]));
        one.age_by(ROTATE * 2);
        let t2 = one.encrypt(b"later").unwrap();
        assert_eq!(&t2[..NAME], &ka[..NAME], "file keys do not rotate");

        let e = TicketKeys::from_files(std::slice::from_ref(&bad)).unwrap_err();
        assert!(e.contains("48 or 80"), "{e}");
        let e = TicketKeys::from_files(&[a.clone(), dup.clone()]).unwrap_err();
        assert!(e.contains("same name"), "{e}");
        assert!(TicketKeys::from_files(&[dir.join("missing")]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
