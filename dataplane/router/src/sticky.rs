//! Sticky sessions (spec §1.6): the `_backend` cookie holds the backend address sealed
//! with NaCl secretbox (XSalsa20-Poly1305) under `COOKIE_KEY`, as
//! base64(nonce ‖ box). Only touched for routes with `sticky: true`.

use std::net::SocketAddr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use crypto_secretbox::aead::{Aead, AeadInPlace, KeyInit};
use crypto_secretbox::{Key, Nonce, Tag, XSalsa20Poly1305};

pub const COOKIE: &[u8] = b"_backend";
const NONCE: usize = 24;

/// A nonce never used before under any key: XSalsa20 needs them unique (a repeat under the
/// shared `COOKIE_KEY` would let cookies be forged), not unpredictable. Each thread draws a
/// 128-bit prefix from the OS once (`getrandom(2)`, via ring) and counts up in the last 8
/// bytes, so sealing costs no system call: routers sharing the key collide only if two
/// threads draw the same 128 bits. A fast non-cryptographic generator (64-bit state, as
/// before) made a repeat likely after ~2^32 cookies.
fn next_nonce() -> [u8; NONCE] {
    use std::cell::Cell;
    thread_local! {
        static PREFIX: [u8; 16] = {
            let mut p = [0u8; 16];
            if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut p).is_err() {
                // getrandom(2) does not fail once the kernel's pool is ready; if it ever
                // did, the thread id and time still keep threads and runs apart.
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos() as u64;
                p[..8].copy_from_slice(&t.to_le_bytes());
                p[8..].copy_from_slice(&fastrand::u64(..).to_le_bytes());
            }
            p
        };
        static COUNT: Cell<u64> = const { Cell::new(0) };
    }
    let mut nonce = [0u8; NONCE];
    PREFIX.with(|p| nonce[..16].copy_from_slice(p));
    let n = COUNT.with(|c| {
        let n = c.get().wrapping_add(1);
        c.set(n);
        n
    });
    nonce[16..].copy_from_slice(&n.to_le_bytes());
    nonce
}

/// Parses `COOKIE_KEY`: base64 of exactly 32 bytes.
pub fn parse_key(b64: &str) -> Result<[u8; 32], String> {
    let raw = STANDARD
        .decode(b64.trim())
        .map_err(|_| "COOKIE_KEY is not valid base64".to_string())?;
    raw.try_into()
        .map_err(|v: Vec<u8>| format!("COOKIE_KEY must decode to 32 bytes, not {}", v.len()))
}

pub struct Sealer {
    cipher: XSalsa20Poly1305,
}

impl std::fmt::Debug for Sealer {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    pub fn new(key: &[u8; 32]) -> Self {
        Sealer {
            cipher: XSalsa20Poly1305::new(Key::from_slice(key)),
        }
    }

    /// The cookie value for `addr`.
    pub fn seal(&self, addr: SocketAddr) -> String {
        let nonce = next_nonce();
        let plain = addr.to_string();
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), plain.as_bytes())
            .unwrap_or_default();
        let mut all = nonce.to_vec();
        all.extend_from_slice(&sealed);
        STANDARD.encode(all)
    }

    /// The backend address in a cookie value, if it is genuine. Opened in a buffer on the
    /// stack: it runs for every request of a sticky route (no allocation on that path).
    pub fn open(&self, value: &[u8]) -> Option<SocketAddr> {
        // A genuine value: base64 of nonce ‖ tag ‖ the address as text (at most 47 bytes:
        // `[v6%scope]:port` with a short scope), well under these bounds.
        let mut raw = [0u8; OPEN_MAX];
        if value.len() > OPEN_MAX / 3 * 4 {
            return None;
        }
        let n = STANDARD.decode_slice(value, &mut raw).ok()?;
        if n <= NONCE + TAG {
            return None;
        }
        let (nonce, rest) = raw[..n].split_at_mut(NONCE);
        let (tag, plain) = rest.split_at_mut(TAG);
        self.cipher
            .decrypt_in_place_detached(Nonce::from_slice(nonce), b"", plain, Tag::from_slice(tag))
            .ok()?;
        std::str::from_utf8(plain).ok()?.parse().ok()
    }
}

/// Largest decoded cookie value [`Sealer::open`] looks at.
const OPEN_MAX: usize = 192;
/// Poly1305 tag, first in the box (NaCl's layout, as `crypto_secretbox` writes it).
const TAG: usize = 16;

/// The sticky backend named by the request's `_backend` cookie, if any.
pub fn from_request(sealer: &Sealer, head: &[u8]) -> Option<SocketAddr> {
    flynn_http::header_values(head, b"cookie")
        .find_map(|v| flynn_http::cookie_value(v, COOKIE))
        .and_then(|v| sealer.open(v))
}

/// `Set-Cookie` value for `addr`.
pub fn set_cookie(sealer: &Sealer, addr: SocketAddr) -> Vec<u8> {
    format!("_backend={}; Path=/", sealer.seal(addr)).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let s = Sealer::new(&[7; 32]);
        let addr: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let v = s.seal(addr);
        assert_eq!(s.open(v.as_bytes()), Some(addr));
        assert_ne!(s.seal(addr), v, "fresh nonce each time");
        let other = Sealer::new(&[8; 32]);
        assert_eq!(other.open(v.as_bytes()), None);
        let mut raw = STANDARD.decode(&v).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        assert_eq!(s.open(STANDARD.encode(raw).as_bytes()), None);
        assert_eq!(s.open(b"!!!"), None);
        let head = format!("GET / HTTP/1.1\r\nHost: a\r\nCookie: x=1; _backend={v}\r\n\r\n");
        assert_eq!(from_request(&s, head.as_bytes()), Some(addr));
    }

    #[test]
    fn nonces_are_unique_within_and_across_threads() {
        let here: Vec<_> = (0..1000).map(|_| next_nonce()).collect();
        let there = std::thread::spawn(|| (0..1000).map(|_| next_nonce()).collect::<Vec<_>>())
            .join()
            .unwrap();
        let all: std::collections::HashSet<_> = here.iter().chain(&there).collect();
        assert_eq!(all.len(), 2000);
        assert_ne!(
            here[0][..16],
            there[0][..16],
            "each thread draws its own prefix"
        );
    }

    /// Opening a cookie allocates nothing (it runs per request of a sticky route), and
    /// values too long to be genuine are refused before decoding.
    #[test]
    fn opening_allocates_nothing() {
        let s = Sealer::new(&[7; 32]);
        for addr in ["127.0.0.1:9001", "[fd00:1:2:3:4:5:6:7]:65535"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let v = s.seal(addr);
            let head = format!("GET / HTTP/1.1\r\nHost: a\r\nCookie: x=1; _backend={v}\r\n\r\n");
            let before = counting::allocations();
            let got = from_request(&s, head.as_bytes());
            let after = counting::allocations();
            assert_eq!(got, Some(addr));
            assert_eq!(after - before, 0, "allocations opening {addr}'s cookie");
        }
        let long = STANDARD.encode([0u8; OPEN_MAX + 3]);
        assert_eq!(s.open(long.as_bytes()), None);
    }

    #[test]
    fn key_parsing() {
        assert!(parse_key(&STANDARD.encode([1u8; 32])).is_ok());
        assert!(parse_key(&STANDARD.encode([1u8; 31]))
            .unwrap_err()
            .contains("32 bytes"));
        assert!(parse_key("%%%").is_err());
    }

    /// Counts this thread's allocations (the test binary's allocator).
    mod counting {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        thread_local! {
            static COUNT: Cell<usize> = const { Cell::new(0) };
        }

        pub fn allocations() -> usize {
            COUNT.with(Cell::get)
        }

        struct Counting;

        #[allow(unsafe_code)]
        // SAFETY: forwards to the system allocator unchanged; the count is a const-initialised
        // thread local without a destructor, which allocates nothing.
        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, l: Layout) -> *mut u8 {
                let _ = COUNT.try_with(|c| c.set(c.get() + 1));
                unsafe { System.alloc(l) }
            }
            unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
                unsafe { System.dealloc(p, l) }
            }
            unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
                let _ = COUNT.try_with(|c| c.set(c.get() + 1));
                unsafe { System.realloc(p, l, n) }
            }
        }

        #[global_allocator]
        static A: Counting = Counting;
    }
}
