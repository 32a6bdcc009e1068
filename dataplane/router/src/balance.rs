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

/// The order in which a request dials backends one after another (WebSocket upgrades, gRPC,
/// TCP routes): the route's backends as the request found them, shuffled; after a failed
/// dial, only those the current table still has; once they are used up, the backends the
/// current table has that were not dialled yet (a deploy may have replaced them all while
/// the request dialled), once. At most 16 of each. As small as the plain shuffled list it
/// replaced (it lives in the connection's future for as long as the connection).
pub struct DialOrder {
    order: [SocketAddr; 16],
    n: u8,
    next: u8,
    /// Which of `order` were handed out to be dialled (bit per position); cleared by the
    /// refill, which keeps them out of the new list.
    dialled: u16,
    /// Whether a backend was handed out: the caller asks again only after its dial failed.
    handed: bool,
    refilled: bool,
}

impl DialOrder {
    /// `first`, if given, goes first (a sticky backend).
    pub fn new(backends: &[SocketAddr], first: Option<SocketAddr>) -> DialOrder {
        let mut order = [SocketAddr::from(([0, 0, 0, 0], 0)); 16];
        let mut n = shuffled(backends, &mut order);
        if let Some(a) = first {
            if let Some(i) = order[..n].iter().position(|x| *x == a) {
                order[..=i].rotate_right(1);
            } else {
                // Not among the (at most 16) taken: it replaces the last one if full.
                n = (n + 1).min(order.len());
                order[..n].rotate_right(1);
                order[0] = a;
            }
        }
        DialOrder {
            order,
            n: n as u8,
            next: 0,
            dialled: 0,
            handed: false,
            refilled: false,
        }
    }

    /// The next backend to dial. `now` gives the route's backends in the current table
    /// (`None`: the route is gone from it, and nothing more is dialled after a failure).
    pub fn next<F, B>(&mut self, now: F) -> Option<SocketAddr>
    where
        F: Fn() -> Option<B>,
        B: AsRef<[SocketAddr]>,
    {
        loop {
            if self.next == self.n {
                if self.refilled || !self.handed {
                    return None;
                }
                self.refill(now()?.as_ref());
                continue;
            }
            let i = usize::from(self.next);
            let addr = self.order[i];
            self.next += 1;
            if self.handed && !now().is_some_and(|b| b.as_ref().contains(&addr)) {
                continue;
            }
            self.dialled |= 1 << i;
            self.handed = true;
            return Some(addr);
        }
    }

    /// Replaces the list with `current` less the backends dialled so far, shuffled.
    fn refill(&mut self, current: &[SocketAddr]) {
        let mut done = [SocketAddr::from(([0, 0, 0, 0], 0)); 16];
        let mut k = 0;
        for i in 0..usize::from(self.n) {
            if self.dialled & (1 << i) != 0 {
                done[k] = self.order[i];
                k += 1;
            }
        }
        let mut n = 0;
        for a in current {
            if n < self.order.len() && !done[..k].contains(a) {
                self.order[n] = *a;
                n += 1;
            }
        }
        fastrand::shuffle(&mut self.order[..n]);
        (self.n, self.next, self.dialled, self.refilled) = (n as u8, 0, 0, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(ports: &[u16]) -> Vec<SocketAddr> {
        ports
            .iter()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
            .collect()
    }

    /// Drives `order` as a caller whose every dial fails, with `now` the current table's
    /// backends of the route; the backends it was given, in order.
    fn all_dials(order: &mut DialOrder, now: &[SocketAddr]) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        while let Some(a) = order.next(|| Some(now)) {
            out.push(a);
            assert!(out.len() <= 64, "no end: {out:?}");
        }
        out
    }

    #[test]
    fn the_first_goes_first_then_each_backend_once() {
        let b = addrs(&[1, 2, 3, 4]);
        for _ in 0..20 {
            let mut o = DialOrder::new(&b, Some(b[2]));
            let got = all_dials(&mut o, &b);
            assert_eq!(got[0], b[2]);
            let mut sorted = got.clone();
            sorted.sort();
            assert_eq!(sorted, b, "each once: {got:?}");
        }
    }

    #[test]
    fn after_a_failure_only_backends_still_routed_are_dialled_then_the_new_ones() {
        let old = addrs(&[1, 2, 3]);
        let now = addrs(&[3, 7, 8]);
        for _ in 0..20 {
            let mut o = DialOrder::new(&old, None);
            let got = all_dials(&mut o, &now);
            // The first dial comes from the request's own table; after it fails only 3 of
            // the old ones is still routed; then 7 and 8, once each.
            let after: Vec<_> = got[1..].to_vec();
            assert!(old.contains(&got[0]), "{got:?}");
            assert!(after.iter().all(|a| now.contains(a)), "{got:?}");
            let mut rest = after.clone();
            rest.sort();
            rest.dedup();
            assert_eq!(rest.len(), after.len(), "one dial each: {got:?}");
            for a in &now {
                assert!(got.contains(a), "{a} never dialled: {got:?}");
            }
        }
    }

    #[test]
    fn a_sticky_backend_beyond_the_first_sixteen_still_goes_first() {
        let b = addrs(&(1..=40).collect::<Vec<u16>>());
        let sticky = SocketAddr::from(([127, 0, 0, 1], 99));
        for _ in 0..20 {
            let mut o = DialOrder::new(&b, Some(sticky));
            let got = all_dials(&mut o, &b);
            assert_eq!(got[0], sticky, "{got:?}");
        }
    }

    #[test]
    fn a_route_gone_from_the_table_ends_the_dials_after_a_failure() {
        let old = addrs(&[1, 2]);
        let mut o = DialOrder::new(&old, None);
        let first = o.next(|| None::<&[SocketAddr]>);
        assert!(first.is_some());
        assert_eq!(o.next(|| None::<&[SocketAddr]>), None);
        let mut empty = DialOrder::new(&[], None);
        assert_eq!(
            empty.next(|| Some(&old[..])),
            None,
            "nothing to dial at first"
        );
    }
}
