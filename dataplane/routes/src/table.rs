//! Hot path: host/path lookup (spec §1.5) over an immutable snapshot.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use flynn_api::{BackendAddr, Route, RouteType};

/// Longest host name we look up; longer hosts never match (DNS names are ≤ 253).
pub const MAX_DOMAIN: usize = 255;

/// The live backends of one service, with its leader.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backends {
    pub addrs: Vec<SocketAddr>,
    /// Index into `addrs` of the service leader, if any.
    pub leader: Option<usize>,
}

impl Backends {
    /// From the API shape: the first entry marked `leader` leads; with none marked there is
    /// no leader (a leader-only route then has no backend).
    pub fn from_api(list: &[BackendAddr]) -> Result<Self, String> {
        let mut addrs = Vec::with_capacity(list.len());
        let mut leader = None;
        for b in list {
            let addr: SocketAddr = b
                .addr
                .parse()
                .map_err(|_| format!("invalid backend address {:?}", b.addr))?;
            // One entry per address; a repeat still carries its leader mark (two discoverd
            // instances of one address, e.g. its tcp and udp registrations).
            let i = match addrs.iter().position(|a| *a == addr) {
                Some(i) => i,
                None => {
                    addrs.push(addr);
                    addrs.len() - 1
                }
            };
            if b.leader && leader.is_none() {
                leader = Some(i);
            }
        }
        // No backend marked leader: a `leader: true` route has none (spec §1.6: only the
        // discoverd leader), so it answers 503 rather than reach, say, a read-only standby
        // while a database fails over.
        Ok(Backends { addrs, leader })
    }

    /// The backends a route may use: all of them, or only the leader.
    pub fn for_route(&self, leader_only: bool) -> &[SocketAddr] {
        if leader_only {
            match self.leader {
                Some(i) => std::slice::from_ref(&self.addrs[i]),
                None => &[],
            }
        } else {
            &self.addrs
        }
    }
}

/// An HTTP route as the data path needs it.
#[derive(Debug, Clone)]
pub struct HttpRoute {
    pub id: Arc<str>,
    pub service: Arc<str>,
    /// Normalised path with a trailing slash, e.g. `/` or `/api/`.
    pub path: Box<[u8]>,
    pub leader: bool,
    pub sticky: bool,
    pub drain_backends: bool,
    pub disable_keep_alives: bool,
    /// HTTP/2 to the backends (gRPC).
    pub grpc: bool,
    /// Backends this route may use (already reduced to the leader for leader routes).
    pub backends: Arc<[SocketAddr]>,
}

#[derive(Debug, Clone)]
pub struct TcpRoute {
    pub id: Arc<str>,
    pub service: Arc<str>,
    pub port: u16,
    pub leader: bool,
    pub backends: Arc<[SocketAddr]>,
}

/// Routes of one `domain:port` key, deepest path first.
#[derive(Debug, Default)]
struct Domain {
    routes: Vec<HttpRoute>,
}

impl Domain {
    fn lookup(&self, path: &[u8]) -> Option<&HttpRoute> {
        self.routes.iter().find(|r| path_matches(&r.path, path))
    }
}

/// Whether the route's path segments are a prefix of the request path's, empty segments
/// skipped on both sides as Flynn's route tree does: `/x/` matches `/x`, `/x/`, `/x/...`
/// and `//x//...`, not `/xy`. The request path is matched percent-decoded, as Flynn matched
/// Go's `URL.Path` (and nginx its normalised URI): `/%61dmin/x` and `/api%2Fv2` are the
/// `/admin/` and `/api/` routes' requests, not the root route's. Decoded on the fly, without
/// a copy; a `%` not followed by two hex digits is itself.
fn path_matches(route: &[u8], path: &[u8]) -> bool {
    let mut have = Decoded { p: path, i: 0 }.peekable();
    for want in segments(route) {
        while have.next_if_eq(&b'/').is_some() {}
        if !want.iter().all(|&w| have.next() == Some(w)) {
            return false;
        }
        if !matches!(have.peek(), None | Some(b'/')) {
            return false;
        }
    }
    true
}

/// The bytes of a request path, percent-decoded.
struct Decoded<'a> {
    p: &'a [u8],
    i: usize,
}

impl Iterator for Decoded<'_> {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        let b = *self.p.get(self.i)?;
        if b == b'%' {
            let hex = |i: usize| self.p.get(i).and_then(|&c| (c as char).to_digit(16));
            if let (Some(h), Some(l)) = (hex(self.i + 1), hex(self.i + 2)) {
                self.i += 3;
                return Some((h * 16 + l) as u8);
            }
        }
        self.i += 1;
        Some(b)
    }
}

/// The non-empty `/`-separated segments of a path.
fn segments(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.split(|&b| b == b'/').filter(|s| !s.is_empty())
}

/// Deepest route first: most segments, then the longest path (routes whose segments are
/// both a prefix of one request path differ in depth).
fn depth_key(path: &[u8]) -> std::cmp::Reverse<(usize, usize)> {
    std::cmp::Reverse((segments(path).count(), path.len()))
}

/// An immutable snapshot of all routes with their backends.
#[derive(Debug, Default)]
pub struct Table {
    /// Key: lowercase domain, `:`, port (0 = the default HTTP/HTTPS ports).
    http: HashMap<Box<[u8]>, Domain>,
    tcp: HashMap<u16, TcpRoute>,
    /// HTTP route id → its backends (for a retry that looks up the route's backends as they
    /// are now, in a newer table than the request started with). HTTP only: a TCP route may
    /// have the same id as an HTTP one, and TCP routes are found by port.
    by_id: HashMap<Arc<str>, Arc<[SocketAddr]>>,
    version: u64,
}

fn key_into<'a>(buf: &'a mut [u8; MAX_DOMAIN + 8], domain: &[u8], port: u16) -> Option<&'a [u8]> {
    if domain.len() > MAX_DOMAIN {
        return None;
    }
    let mut n = 0;
    for &b in domain {
        buf[n] = b.to_ascii_lowercase();
        n += 1;
    }
    buf[n] = b':';
    n += 1;
    // Up to five digits.
    let mut digits = [0u8; 5];
    let mut p = port;
    let mut d = 0;
    loop {
        digits[d] = b'0' + (p % 10) as u8;
        d += 1;
        p /= 10;
        if p == 0 {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        buf[n] = digits[d];
        n += 1;
    }
    Some(&buf[..n])
}

/// Normalises a route path: default `/`, trailing slash appended.
pub fn normalize_path(path: &str) -> String {
    if path.is_empty() {
        "/".to_string()
    } else if path.ends_with('/') {
        path.to_string()
    } else {
        format!("{path}/")
    }
}

impl Table {
    /// Builds a snapshot. `backends` maps service name to its live backends; routes
    /// whose service is unknown get an empty backend set (→ 503).
    pub fn build<'a>(
        routes: impl IntoIterator<Item = &'a Route>,
        backends: &HashMap<String, Backends>,
        version: u64,
    ) -> Table {
        let empty = Backends::default();
        let mut t = Table {
            version,
            ..Table::default()
        };
        for r in routes {
            let svc = backends.get(&r.service).unwrap_or(&empty);
            let addrs: Arc<[SocketAddr]> = Arc::from(svc.for_route(r.leader));
            match r.kind {
                RouteType::Http => {
                    let path = normalize_path(&r.path);
                    let mut kb = [0u8; MAX_DOMAIN + 8];
                    let Some(key) = key_into(&mut kb, r.domain.as_bytes(), r.port) else {
                        continue;
                    };
                    t.by_id.insert(r.id.as_str().into(), addrs.clone());
                    t.http
                        .entry(key.into())
                        .or_default()
                        .routes
                        .push(HttpRoute {
                            id: r.id.as_str().into(),
                            service: r.service.as_str().into(),
                            path: path.into_bytes().into_boxed_slice(),
                            leader: r.leader,
                            sticky: r.sticky,
                            drain_backends: r.drain_backends == Some(true),
                            disable_keep_alives: r.disable_keep_alives,
                            grpc: r.grpc == Some(true),
                            backends: addrs,
                        });
                }
                RouteType::Tcp => {
                    t.tcp.insert(
                        r.port,
                        TcpRoute {
                            id: r.id.as_str().into(),
                            service: r.service.as_str().into(),
                            port: r.port,
                            leader: r.leader,
                            backends: addrs,
                        },
                    );
                }
            }
        }
        for d in t.http.values_mut() {
            d.routes.sort_by_key(|r| depth_key(&r.path));
        }
        t
    }

    /// The backends of the HTTP route with id `id` in this table, if it has that route.
    pub fn backends_of(&self, id: &str) -> Option<&Arc<[SocketAddr]>> {
        self.by_id.get(id)
    }

    /// Monotonic version of this snapshot (set by the builder).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Finds the route for a request. `host` is the Host header (any `:port` suffix and
    /// a fully qualified name's trailing dot are ignored, as nginx does), `port` the route
    /// port key (0 for the default listeners), `path` the request path. Exact domain, then
    /// wildcards from most to least specific, then `*`.
    pub fn lookup_http(&self, host: &[u8], port: u16, path: &[u8]) -> Option<&HttpRoute> {
        let domain = strip_port(host);
        let domain = domain.strip_suffix(b".").unwrap_or(domain);
        let path = if path.is_empty() { b"/" as &[u8] } else { path };
        let mut kb = [0u8; MAX_DOMAIN + 8];
        if let Some(d) = key_into(&mut kb, domain, port).and_then(|k| self.http.get(k)) {
            return d.lookup(path);
        }
        // Wildcards: "*.a.b.c.d", "*.b.c.d", "*.c.d", "*.d" for "a.b.c.d", at most five (as
        // Flynn splits the host into at most 5 labels: `*.example.com` also covers
        // `example.com`).
        let mut wb = [0u8; MAX_DOMAIN + 2];
        let mut rest = domain;
        for i in 0..5 {
            if i > 0 {
                let Some(dot) = rest.iter().position(|&b| b == b'.') else {
                    break;
                };
                rest = &rest[dot + 1..];
            }
            if rest.is_empty() || rest.len() + 2 > wb.len() {
                break;
            }
            wb[0] = b'*';
            wb[1] = b'.';
            wb[2..2 + rest.len()].copy_from_slice(rest);
            let wild = &wb[..2 + rest.len()];
            let mut kb = [0u8; MAX_DOMAIN + 8];
            if let Some(d) = key_into(&mut kb, wild, port).and_then(|k| self.http.get(k)) {
                return d.lookup(path);
            }
        }
        let mut kb = [0u8; MAX_DOMAIN + 8];
        let d = self.http.get(key_into(&mut kb, b"*", port)?)?;
        d.lookup(path)
    }

    pub fn tcp_route(&self, port: u16) -> Option<&TcpRoute> {
        self.tcp.get(&port)
    }

    pub fn tcp_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.tcp.keys().copied()
    }

    /// All HTTP routes (for diagnostics and tests).
    pub fn http_routes(&self) -> impl Iterator<Item = &HttpRoute> {
        self.http.values().flat_map(|d| d.routes.iter())
    }
}

/// The domain of a Host header: `example.com:80` → `example.com`; `[::1]:80` → `[::1]`
/// (a colon followed by digits only, possibly none, is a port; a bracketed literal keeps
/// its colons).
pub fn strip_port(host: &[u8]) -> &[u8] {
    if host.last() == Some(&b']') {
        return host;
    }
    match host.iter().rposition(|&b| b == b':') {
        Some(i) if host[i + 1..].iter().all(u8::is_ascii_digit) => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests;
