//! Hot path: power-of-two random choices on this core's in-flight counts.

use std::net::SocketAddr;
use std::rc::Rc;

use crate::worker::Core;

/// Picks a backend not in `tried`: two distinct random candidates, the one with fewer
/// requests in flight on this core wins.
pub fn pick(
    core: &Rc<Core>,
    backends: &[SocketAddr],
    tried: &[Option<SocketAddr>],
) -> Option<SocketAddr> {
    let untried = |a: &SocketAddr| !tried.iter().any(|t| t.as_ref() == Some(a));
    let n = backends.len();
    match n {
        0 => None,
        1 => Some(backends[0]).filter(untried),
        _ => {
            let i = fastrand::usize(..n);
            let mut j = fastrand::usize(..n - 1);
            if j >= i {
                j += 1;
            }
            let (a, b) = (backends[i], backends[j]);
            let choice = match (untried(&a), untried(&b)) {
                (true, true) => {
                    if core.inflight(&b) < core.inflight(&a) {
                        b
                    } else {
                        a
                    }
                }
                (true, false) => a,
                (false, true) => b,
                (false, false) => {
                    // Both already failed: any backend not tried yet, starting at random.
                    let start = fastrand::usize(..n);
                    return (0..n).map(|k| backends[(start + k) % n]).find(untried);
                }
            };
            Some(choice)
        }
    }
}

/// Backends in random order (for upgrades and TCP routes, which dial each in turn).
pub fn shuffled(backends: &[SocketAddr], out: &mut [SocketAddr; 16]) -> usize {
    let n = backends.len().min(out.len());
    let start = if backends.is_empty() {
        0
    } else {
        fastrand::usize(..backends.len())
    };
    for (k, slot) in out.iter_mut().take(n).enumerate() {
        *slot = backends[(start + k) % backends.len()];
    }
    fastrand::shuffle(&mut out[..n]);
    n
}
