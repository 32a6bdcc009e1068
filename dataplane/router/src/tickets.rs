//! TLS session-ticket keys (RFC 5077 / RFC 8446 tickets), ours rather than rustls's random
//! ones so they can outlive the process: `--tls-ticket-key FILE` shares keys between
//! routers (and restarts), as nginx's `ssl_session_ticket_key` does; without it the random
//! keys are handed over in a takeover, so clients resume across a zero-downtime upgrade.
//!
//! A ticket is `name (16) ‖ issued (8, Unix seconds) ‖ salt (16) ‖ AES-256-GCM(state) ‖
//! tag (16)`, name and issue time as AAD. Each ticket is sealed under its own key,
//! HKDF-expanded from the key's secret with the random salt, so no (key, nonce) pair ever
//! repeats however many tickets a long-lived shared file key seals, and a file's bytes are
//! never used as an AES key directly. A ticket older than [`LIFETIME`] is refused (rustls
//! itself does not check ticket age). The first key encrypts; every key decrypts (found by
//! name). Random keys rotate every [`ROTATE`], the previous one kept for decryption; keys
//! from files never rotate (rotate them by putting a new file first).

use std::sync::RwLock;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf::{Prk, Salt, HKDF_SHA256};
use ring::rand::{SecureRandom, SystemRandom};

/// How long a random key encrypts before a new one takes over (the old one still decrypts
/// for as long again).
pub const ROTATE: Duration = Duration::from_secs(6 * 3600);
/// Ticket lifetime (seconds), announced to clients and enforced; a little under
/// [`ROTATE`], so a ticket's key always outlives it.
const LIFETIME: u32 = 6 * 3600 - 300;
const NAME: usize = 16;
const ISSUED: usize = 8;
const SALT: usize = 16;
const HEAD: usize = NAME + ISSUED + SALT;
const TAG: usize = 16;
/// HKDF salt and info label: what the derived keys are for.
const LABEL: &[u8] = b"flynn-router tls ticket v1";

struct Key {
    name: [u8; NAME],
    raw: [u8; 32],
    /// Extracted from `raw`; each ticket's key is expanded from it with the ticket's salt.
    prk: Prk,
}

impl Key {
    fn new(name: [u8; NAME], raw: [u8; 32]) -> Key {
        let prk = Salt::new(HKDF_SHA256, LABEL).extract(&raw);
        Key { name, raw, prk }
    }

    fn random(rng: &SystemRandom) -> Result<Key, String> {
        let mut b = [0u8; NAME + 32];
        rng.fill(&mut b)
            .map_err(|_| "no randomness for a TLS ticket key".to_string())?;
        Ok(Self::from_bytes(&b))
    }

    /// `name (16) ‖ secret (32)`.
    fn from_bytes(b: &[u8; NAME + 32]) -> Key {
        let mut name = [0u8; NAME];
        let mut raw = [0u8; 32];
        name.copy_from_slice(&b[..NAME]);
        raw.copy_from_slice(&b[NAME..]);
        Key::new(name, raw)
    }

    /// The AES-256-GCM key of the ticket with `salt`.
    fn sealing(&self, salt: &[u8]) -> Option<LessSafeKey> {
        let info = [LABEL, salt];
        let okm = self.prk.expand(&info, &AES_256_GCM).ok()?;
        Some(LessSafeKey::new(UnboundKey::from(okm)))
    }
}

struct Keys {
    /// `[0]` encrypts; all decrypt.
    list: Vec<Key>,
    /// When `list[0]` started encrypting here (random keys only rotate), ...
    since: Instant,
    /// ... plus how long it had encrypted before (in the process it was handed over from).
    /// Kept apart from `since`: an `Instant` cannot go back further than the machine's boot.
    before: Duration,
}

impl Keys {
    /// How long `list[0]` has been encrypting.
    fn age(&self) -> Duration {
        self.since.elapsed() + self.before
    }
}

pub struct TicketKeys {
    keys: RwLock<Keys>,
    /// Keys from files: never rotated, never handed over.
    fixed: bool,
    /// Exported for a takeover: no rotation from then on, so every ticket this process
    /// issues while it drains opens in the new one (undone if the takeover fails).
    frozen: std::sync::atomic::AtomicBool,
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

    /// Keys handed over by the process this one took over from (see [`TicketKeys::export`]),
    /// the encrypting one `age` old; they go on rotating here. Malformed entries are an
    /// error; none at all (an older process, or one with key files) gives a random key.
    pub fn handed_over(exported: &[String], age: Duration) -> Result<TicketKeys, String> {
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
        let keys = Self::with(list, false, SystemRandom::new());
        {
            let mut k = keys.keys.write().unwrap_or_else(|p| p.into_inner());
            k.before = age.min(ROTATE);
        }
        Ok(keys)
    }

    /// Keys from `--tls-ticket-key` files, the first one encrypting. Each file holds 48 or
    /// 80 random bytes (nginx's sizes, e.g. `openssl rand 80`; the tickets themselves are
    /// ours, not interchangeable with nginx's): the first 16 name the key, the last 32 are
    /// its secret.
    pub fn from_files(paths: &[std::path::PathBuf]) -> Result<TicketKeys, String> {
        let mut list = Vec::new();
        for p in paths {
            let b = std::fs::read(p)
                .map_err(|e| format!("reading TLS ticket key {}: {e}", p.display()))?;
            if b.len() != 48 && b.len() != 80 {
                return Err(format!(
                    "TLS ticket key {} has {} bytes; it must have 48 or 80 raw bytes \
                     (openssl rand 80 > FILE; not base64)",
                    p.display(),
                    b.len()
                ));
            }
            let mut k = [0u8; NAME + 32];
            k[..NAME].copy_from_slice(&b[..NAME]);
            k[NAME..].copy_from_slice(&b[b.len() - 32..]);
            let key = Key::from_bytes(&k);
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
                before: Duration::ZERO,
            }),
            fixed,
            frozen: std::sync::atomic::AtomicBool::new(false),
            rng,
        }
    }

    /// Rotation goes on again (a takeover that failed).
    pub fn thaw(&self) {
        self.frozen
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// The random keys as base64 (`name ‖ secret`), the encrypting one first, and its age,
    /// for a takeover. Keys from files are not handed over: the new process has its own
    /// flags, and without the files it must not go on using them.
    pub fn export(&self) -> (Vec<String>, Duration) {
        if self.fixed {
            return (Vec::new(), Duration::ZERO);
        }
        self.frozen
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let list = keys
            .list
            .iter()
            .map(|k| {
                let mut b = k.name.to_vec();
                b.extend_from_slice(&k.raw);
                B64.encode(b)
            })
            .collect();
        (list, keys.age())
    }

    /// A random key that has encrypted for [`ROTATE`] gives way to a new one; the old one
    /// is kept to decrypt (one generation back).
    fn rotate_if_due(&self) {
        if self.fixed || self.frozen.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let due = {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            keys.age() >= ROTATE
        };
        if !due {
            return;
        }
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        // Checked again under the lock: an export (which reads under it) may have come in
        // between, and what it handed over must stay the encrypting key.
        if keys.age() < ROTATE || self.frozen.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Ok(k) = Key::random(&self.rng) {
            keys.list.insert(0, k);
            keys.list.truncate(2);
            keys.since = Instant::now();
            keys.before = Duration::ZERO;
        }
    }

    #[cfg(test)]
    fn age_by(&self, d: Duration) {
        let mut keys = self.keys.write().unwrap();
        keys.before += d;
    }

    /// Seals `plain` under the encrypting key as issued at `issued` (Unix seconds).
    #[cfg(test)]
    fn seal(&self, plain: &[u8], issued: u64) -> Option<Vec<u8>> {
        self.seal_bound(plain, issued, &[])
    }

    /// Seals `plain` with `bound` (at most [`BOUND_MAX`] bytes) as associated data: the
    /// ticket opens only with the same `bound` ([`TicketKeys::open_bound`]).
    fn seal_bound(&self, plain: &[u8], issued: u64, bound: &[u8]) -> Option<Vec<u8>> {
        let mut salt = [0u8; SALT];
        self.rng.fill(&mut salt).ok()?;
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let key = keys.list.first()?;
        let sealing = key.sealing(&salt)?;
        let mut out = Vec::with_capacity(HEAD + plain.len() + TAG);
        out.extend_from_slice(&key.name);
        out.extend_from_slice(&issued.to_be_bytes());
        out.extend_from_slice(&salt);
        drop(keys);
        let mut aad = [0u8; NAME + ISSUED + BOUND_MAX];
        let aad = associated(&mut aad, &out[..NAME + ISSUED], bound)?;
        out.extend_from_slice(plain);
        // A fresh key per ticket: its one nonce may be all zeros.
        let tag = sealing
            .seal_in_place_separate_tag(zero_nonce(), Aad::from(aad), &mut out[HEAD..])
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
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
        self.issue(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open(cipher)
    }
}

impl TicketKeys {
    /// A ticket for the session state `plain` (rustls's `encrypt`).
    pub fn issue(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.issue_bound(plain, &[])
    }

    /// A ticket for `plain` that opens only with the same `bound` (at most
    /// [`BOUND_MAX`] bytes; not in the ticket: authenticated as associated data).
    pub fn issue_bound(&self, plain: &[u8], bound: &[u8]) -> Option<Vec<u8>> {
        self.rotate_if_due();
        self.seal_bound(plain, unix_now(), bound)
    }

    /// The session state in ticket `cipher`, if one of our keys sealed it within its
    /// lifetime (rustls's `decrypt`); anything else (a client's bytes) is `None`.
    pub fn open(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open_bound(cipher, &[])
    }

    /// [`TicketKeys::open`] for a ticket issued with `bound` ([`TicketKeys::issue_bound`]):
    /// with any other it does not open.
    pub fn open_bound(&self, cipher: &[u8], bound: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < HEAD + TAG {
            return None;
        }
        let (head, sealed) = cipher.split_at(HEAD);
        let issued = u64::from_be_bytes(head[NAME..NAME + ISSUED].try_into().ok()?);
        let now = unix_now();
        // Older than its lifetime, or from the future (a minute of clock skew between
        // routers sharing a key file is allowed).
        if now.saturating_sub(issued) > LIFETIME as u64 || issued > now + 60 {
            return None;
        }
        let opening = {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            let key = keys.list.iter().find(|k| k.name == head[..NAME])?;
            key.sealing(&head[NAME + ISSUED..])?
        };
        let mut aad = [0u8; NAME + ISSUED + BOUND_MAX];
        let aad = associated(&mut aad, &head[..NAME + ISSUED], bound)?;
        let mut body = sealed.to_vec();
        let n = opening
            .open_in_place(zero_nonce(), Aad::from(aad), &mut body)
            .ok()?
            .len();
        body.truncate(n);
        Some(body)
    }
}

/// The most bytes a ticket can be bound to ([`TicketKeys::issue_bound`]).
pub const BOUND_MAX: usize = 8;

/// A ticket's associated data in `buf`: its name and issue time (`head`), then `bound`
/// (`None` if `bound` is too long).
fn associated<'a>(
    buf: &'a mut [u8; NAME + ISSUED + BOUND_MAX],
    head: &[u8],
    bound: &[u8],
) -> Option<&'a [u8]> {
    if bound.len() > BOUND_MAX || head.len() != NAME + ISSUED {
        return None;
    }
    buf[..head.len()].copy_from_slice(head);
    buf[head.len()..head.len() + bound.len()].copy_from_slice(bound);
    Some(&buf[..head.len() + bound.len()])
}

fn zero_nonce() -> Nonce {
    Nonce::assume_unique_for_key([0u8; NONCE_LEN])
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    #[test]
    fn tickets_round_trip_and_tampering_is_refused() {
        let k = TicketKeys::random().unwrap();
        let t = k.encrypt(b"session state").unwrap();
        assert_eq!(t.len(), HEAD + 13 + TAG);
        assert_eq!(k.decrypt(&t).as_deref(), Some(&b"session state"[..]));
        // Two tickets of one state differ (a fresh salt, so a fresh key).
        assert_ne!(k.encrypt(b"session state").unwrap()[HEAD..], t[HEAD..]);
        // Name (lookup), issue time (AAD), salt (key), body, tag.
        for i in [0, NAME + ISSUED - 1, NAME + ISSUED, HEAD, t.len() - 1] {
            let mut bad = t.clone();
            bad[i] ^= 1;
            assert_eq!(k.decrypt(&bad), None, "flipped byte {i}");
        }
        assert_eq!(k.decrypt(&t[..HEAD + TAG - 1]), None);
        // Another process's random key cannot open it.
        assert_eq!(TicketKeys::random().unwrap().decrypt(&t), None);
    }

    #[test]
    fn expired_and_future_tickets_are_refused() {
        let k = TicketKeys::random().unwrap();
        let now = unix_now();
        let at = |issued: u64| k.decrypt(&k.seal(b"state", issued).unwrap());
        assert!(at(now - 60).is_some());
        assert!(at(now - LIFETIME as u64 + 60).is_some());
        assert_eq!(at(now - LIFETIME as u64 - 60), None, "expired");
        assert_eq!(at(now + 3600), None, "from the future");
    }

    #[test]
    fn exported_keys_open_earlier_tickets_and_rotation_keeps_one_generation() {
        let k = TicketKeys::random().unwrap();
        let t0 = k.encrypt(b"zero").unwrap();
        k.age_by(Duration::from_secs(3600));
        let (list, age) = k.export();
        assert!(age >= Duration::from_secs(3600));
        let next = TicketKeys::handed_over(&list, age).unwrap();
        assert_eq!(next.decrypt(&t0).as_deref(), Some(&b"zero"[..]));
        // The key's age came along: it rotates 5 h from here, not 6.
        next.age_by(ROTATE - Duration::from_secs(3600));
        let t1 = next.encrypt(b"one").unwrap();
        assert_ne!(t1[..NAME], t0[..NAME], "rotated to a new key");
        assert_eq!(next.decrypt(&t0).as_deref(), Some(&b"zero"[..]));
        assert_eq!(next.decrypt(&t1).as_deref(), Some(&b"one"[..]));
        next.age_by(ROTATE);
        let _ = next.encrypt(b"two").unwrap();
        assert_eq!(next.decrypt(&t0), None, "two generations back");
        assert_eq!(next.decrypt(&t1).as_deref(), Some(&b"one"[..]));

        // Once exported (a takeover), the old process stops rotating until thawed.
        let old = TicketKeys::random().unwrap();
        let (exported, _) = old.export();
        old.age_by(ROTATE);
        let t = old.encrypt(b"draining").unwrap();
        let new = TicketKeys::handed_over(&exported, Duration::ZERO).unwrap();
        assert_eq!(new.decrypt(&t).as_deref(), Some(&b"draining"[..]));
        old.thaw();
        let t = old.encrypt(b"rotated").unwrap();
        assert_eq!(new.decrypt(&t), None, "rotated after the thaw");

        assert!(TicketKeys::handed_over(&["not base64!".into()], age).is_err());
        assert!(TicketKeys::handed_over(&["AAAA".into()], age).is_err());
    }

    #[test]
    fn key_files_of_48_or_80_bytes_are_shared_and_never_rotate_or_hand_over() {
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
        assert!(one.export().0.is_empty(), "file keys are not handed over");

        let e = TicketKeys::from_files(std::slice::from_ref(&bad)).unwrap_err();
        assert!(e.contains("48 or 80"), "{e}");
        let e = TicketKeys::from_files(&[a.clone(), dup.clone()]).unwrap_err();
        assert!(e.contains("same name"), "{e}");
        assert!(TicketKeys::from_files(&[dir.join("missing")]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
