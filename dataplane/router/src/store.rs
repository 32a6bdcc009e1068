//! Route and backend state behind the admin API: validation (spec §1.2, legacy
//! standalone API), conflicts, TCP port allocation, and building table snapshots.
//! Runs on the control thread only.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use std::sync::Arc;

use flynn_api::{ApiError, BackendAddr, Certificate, Route, RouteType};
use rustls::sign::CertifiedKey;

use crate::tls::CertStore;
use flynn_routes::{normalize_path, Backends, Table};

/// Listener facts the validation rules need.
#[derive(Debug, Clone)]
pub struct Ports {
    /// Ports of the default HTTP listener(s) (route port 0): the first HTTP, HTTPS and
    /// every h2c listener.
    pub default_http: Vec<u16>,
    /// Additional HTTP listener ports a route may name (plain and TLS alike).
    pub additional_http: Vec<u16>,
    /// Of those, the ports with a TLS listener (`--https-addr` after the first): the
    /// only additional ports where a route's certificate is ever presented, so the only
    /// ones a route carrying a certificate may name.
    pub additional_tls: Vec<u16>,
    pub tcp_range: (u16, u16),
    /// The address TCP route listeners bind. When set, a TCP route's port must be one no
    /// other program's socket listens on there now (see `Store::unbindable`); `None`
    /// skips the check (tests, fuzzing, parsing a routes file without a running router).
    pub tcp_ip: Option<std::net::IpAddr>,
}

impl Ports {
    /// Why a route carrying a certificate cannot be on `port`, if it cannot: on a plain
    /// listener no handshake ever presents it (spec §1.2's legacy rule).
    fn refuses_tls(&self, port: u16) -> Option<ApiError> {
        (!self.serves_tls(port))
            .then(|| ApiError::validation(None, "Port not reserved for HTTPS traffic"))
    }

    /// Whether a route on `port` can be reached over TLS (the default ports include the
    /// first HTTPS listener).
    fn serves_tls(&self, port: u16) -> bool {
        port == 0 || self.additional_tls.contains(&port)
    }

    fn reserved_for_http(&self, port: u16) -> bool {
        port == 80
            || port == 443
            || self.default_http.contains(&port)
            || self.additional_http.contains(&port)
    }
}

/// What a route update changes: the route's service, leader, sticky, path, keep-alive and
/// certificate (spec §1.2), and the `drain_backends` and `grpc` flags when they are `Some`
/// (`None`: the stored value stays). `PUT /routes/:type/:id` never changes
/// `drain_backends` (spec §1.2 leaves it as stored; Go clients send it always, `false` when
/// unset) and `grpc` (an extension) only when the body names it; a routes file sets both.
#[derive(Debug, Clone)]
pub struct Update {
    pub route: Route,
    pub drain_backends: Option<bool>,
    pub grpc: Option<bool>,
}

/// Every field as given, a flag not named being off (a routes file is the desired state
/// of its routes).
impl From<Route> for Update {
    fn from(route: Route) -> Self {
        Update {
            drain_backends: Some(route.drain_backends.unwrap_or(false)),
            grpc: Some(route.grpc.unwrap_or(false)),
            route,
        }
    }
}

#[derive(Clone)]
struct Stored {
    seq: u64,
    route: Route,
}

/// All routes and service backends; every mutation bumps `version`.
#[derive(Clone)]
pub struct Store {
    ports: Ports,
    /// Whether COOKIE_KEY is set (sticky routes need it).
    sticky_ok: bool,
    pub certs: crate::certs::Certs,
    routes: BTreeMap<(RouteType, String), Stored>,
    services: BTreeMap<String, Vec<BackendAddr>>,
    seq: u64,
    version: u64,
    /// This router's TCP route listeners by port (see [`Store::own_tcp_listeners`]).
    own_tcp: Option<crate::shared::TcpFds>,
}

fn now() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

fn invalid_route() -> ApiError {
    ApiError::validation(None, "Invalid route")
}

/// Whether `r` brings a certificate (as [`Store::resolve_certificate`] reads it).
fn carries_certificate(r: &Route) -> bool {
    r.certificate
        .as_ref()
        .is_some_and(|c| !c.cert.is_empty() || !c.key.is_empty() || !c.id.is_empty())
        || !r.tls_cert.is_empty()
        || !r.tls_key.is_empty()
}

fn valid_path(p: &str) -> bool {
    // ^/(.*/)?$
    p.starts_with('/') && p.ends_with('/')
}

/// Why `d` can never match a request's host, if it cannot: a route's domain is a host name
/// (dot-separated labels of 1 to 63 letters, digits, `-` or `_`), optionally after a `*.`
/// wildcard label, `*` alone (the catch-all) or a bracketed IPv6 address, as lookups see a
/// `Host` (its port and a trailing dot dropped). An IPv4 address is labels of digits.
fn bad_domain(d: &str) -> Option<&'static str> {
    if d == "*" {
        return None;
    }
    if let Some(ip) = d.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
        return match ip.parse::<std::net::Ipv6Addr>() {
            Ok(_) => None,
            Err(_) => Some("must be a host name or a bracketed IPv6 address"),
        };
    }
    if d.contains(':') {
        return Some("must not have a port (a route on another listener names it in port)");
    }
    let name = d.strip_prefix("*.").unwrap_or(d);
    let label = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.split('.').all(label) {
        None
    } else {
        Some(
            "must be a host name: dot-separated labels of 1 to 63 letters, digits, '-' or '_', \
             optionally after '*.'",
        )
    }
}

/// A path with an empty segment: matching skips them, so `//` would be a second root (ahead
/// of `/`) and `/a//b/` the same place as `/a/b/`. Refused for new and updated routes;
/// a handed-over route that has one is kept as it is.
fn empty_segment(p: &str) -> bool {
    p != "/" && p.contains("//")
}

impl Store {
    pub fn new(ports: Ports, sticky_ok: bool) -> Self {
        Store {
            ports,
            sticky_ok,
            certs: Default::default(),
            routes: BTreeMap::new(),
            services: BTreeMap::new(),
            seq: 0,
            version: 0,
            own_tcp: None,
        }
    }

    /// Where this router's own TCP route listeners are registered: a port they hold is
    /// not another program's (a route removed and one added on its port in the same
    /// change, say), so a route may take it and new listeners join them.
    pub(crate) fn own_tcp_listeners(&mut self, fds: crate::shared::TcpFds) {
        self.own_tcp = Some(fds);
    }

    /// Why a TCP route's listeners could not open on `port` now, if they could not: a
    /// socket that is not one of this router's listens there. One with SO_REUSEPORT counts
    /// too (an nginx with `reuseport`, another router): listeners of the same user bound
    /// beside it would join its group and silently share the port's connections with it.
    fn unbindable(&self, port: u16) -> Option<std::io::Error> {
        let ip = self.ports.tcp_ip?;
        // One of this router's own listeners holds it: no probe needed.
        let ours = self.own_tcp.as_ref().is_some_and(|fds| {
            fds.lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&port)
        });
        if ours {
            return None;
        }
        let e = flynn_runtime::check_exclusive_bind(std::net::SocketAddr::new(ip, port)).err()?;
        match e.kind() {
            std::io::ErrorKind::AddrInUse => Some(std::io::Error::new(
                e.kind(),
                "another program listens on it",
            )),
            _ => Some(e),
        }
    }

    /// Parses a route body to create (`POST /routes`), giving the spec's error for an
    /// unknown type. A body without `drain_backends` (or with `null`) asks for drain
    /// tracking (spec §1.2: "Default `drain_backends` in storage is true"; the controller's
    /// own route sends `false`).
    pub fn parse_route(body: &[u8]) -> Result<Route, ApiError> {
        let mut r = Self::parse_body(body)?;
        r.drain_backends.get_or_insert(true);
        Ok(r)
    }

    /// Parses a route body to update (`PUT /routes/:type/:id`): `drain_backends` keeps
    /// its stored value whatever the body says (spec §1.2; a Go client's `DrainBackends`
    /// has no `omitempty`, so its PUT always says `false`, which must not turn drain
    /// tracking off), and `grpc` does when the body leaves it out (or sends `null`).
    pub fn parse_update(body: &[u8]) -> Result<Update, ApiError> {
        let route = Self::parse_body(body)?;
        Ok(Update {
            drain_backends: None,
            grpc: route.grpc,
            route,
        })
    }

    /// A route body (the flags it does not name `None`).
    fn parse_body(body: &[u8]) -> Result<Route, ApiError> {
        let v: serde_json::Value = serde_json::from_slice(body).map_err(|_| ApiError::syntax())?;
        match v.get("type").and_then(|t| t.as_str()) {
            Some("http") | Some("tcp") => {}
            _ => return Err(ApiError::validation(Some("type"), "Invalid route type")),
        }
        serde_json::from_value(v).map_err(|_| ApiError::syntax())
    }

    fn http_conflict(&self, r: &Route, except: Option<&str>) -> bool {
        self.routes.values().any(|s| {
            s.route.kind == RouteType::Http
                && Some(s.route.id.as_str()) != except
                && s.route.domain.eq_ignore_ascii_case(&r.domain)
                && s.route.port == r.port
                && s.route.path == r.path
        })
    }

    /// Whether `r`'s domain and port have a `/` route other than the route `except` (the
    /// one being updated: moving the only root elsewhere must not count it as its own root).
    fn has_root(&self, r: &Route, except: Option<&str>) -> bool {
        self.routes.values().any(|s| {
            s.route.kind == RouteType::Http
                && Some(s.route.id.as_str()) != except
                && s.route.domain.eq_ignore_ascii_case(&r.domain)
                && s.route.port == r.port
                && s.route.path == "/"
        })
    }

    fn tcp_port_used(&self, port: u16, except: Option<&str>) -> bool {
        self.routes.values().any(|s| {
            s.route.kind == RouteType::Tcp
                && s.route.port == port
                && Some(s.route.id.as_str()) != except
        })
    }

    fn validate_common(&self, r: &Route) -> Result<(), ApiError> {
        if r.service.is_empty() {
            return Err(ApiError::validation(Some("service"), "must not be blank"));
        }
        if r.sticky && !self.sticky_ok {
            return Err(ApiError::validation(
                Some("sticky"),
                "routes need the router to be started with COOKIE_KEY",
            ));
        }
        Ok(())
    }

    /// Adds a route (`POST /routes`), returning it as stored.
    pub fn add(&mut self, r: Route) -> Result<Route, ApiError> {
        self.insert(r, true)
    }

    /// Adds `r`; `probe`: a TCP route's port must be bindable now (see [`Ports::tcp_ip`]).
    fn insert(&mut self, mut r: Route, probe: bool) -> Result<Route, ApiError> {
        self.validate_common(&r)?;
        let unbindable = |p: u16| {
            if probe {
                self.unbindable(p)
            } else {
                None
            }
        };
        // As stored: `drain_backends` always named (not named: off, as in a routes file; the
        // API's bodies name it, see `parse_route`), `grpc` only when on.
        r.drain_backends = Some(r.drain_backends.unwrap_or(false));
        r.grpc = r.grpc.filter(|on| *on);
        let submitted = serde_json::to_value(&r).unwrap_or_default();
        match r.kind {
            RouteType::Http => {
                // A fully qualified name's trailing dot is dropped, as lookups drop the
                // `Host`'s (nginx does the same).
                if r.domain.ends_with('.') && !r.domain.ends_with("*.") {
                    r.domain.pop();
                }
                if r.domain.is_empty() {
                    return Err(ApiError::validation(Some("domain"), "must not be blank"));
                }
                // The routing table has no room for longer names (and DNS none either).
                if r.domain.len() > flynn_routes::MAX_DOMAIN {
                    return Err(ApiError::validation(
                        Some("domain"),
                        &format!("must be at most {} characters", flynn_routes::MAX_DOMAIN),
                    ));
                }
                // Checked for new routes only: a takeover never fails on what an older
                // build stored.
                if let Some(e) = bad_domain(&r.domain).filter(|_| probe) {
                    return Err(ApiError::validation(Some("domain"), e));
                }
                if r.port != 0 && !self.ports.additional_http.contains(&r.port) {
                    return Err(ApiError::validation(
                        None,
                        "Port not reserved for HTTP traffic",
                    ));
                }
                // New routes only: a takeover keeps what an older build accepted.
                if probe && carries_certificate(&r) {
                    if let Some(e) = self.ports.refuses_tls(r.port) {
                        return Err(e);
                    }
                }
                r.path = normalize_path(&r.path);
                if !valid_path(&r.path) || (probe && empty_segment(&r.path)) {
                    return Err(invalid_route());
                }
                if self.http_conflict(&r, None) {
                    return Err(ApiError::conflict("Duplicate route").with_detail(submitted));
                }
                if r.path != "/" && !self.has_root(&r, None) {
                    return Err(invalid_route());
                }
            }
            RouteType::Tcp => {
                if r.port == 0 {
                    let (a, b) = self.ports.tcp_range;
                    // Ports another program holds are skipped.
                    r.port = (a..=b)
                        .find(|&p| {
                            !self.ports.reserved_for_http(p)
                                && !self.tcp_port_used(p, None)
                                && unbindable(p).is_none()
                        })
                        .ok_or_else(|| ApiError::conflict("No TCP ports available"))?;
                } else if self.ports.reserved_for_http(r.port) {
                    return Err(ApiError::conflict("Port reserved for HTTP/HTTPS traffic"));
                } else if self.tcp_port_used(r.port, None) {
                    return Err(ApiError::conflict("Duplicate route").with_detail(submitted));
                } else if let Some(e) = unbindable(r.port) {
                    return Err(ApiError::conflict(format!(
                        "Port {} cannot be listened on: {e}",
                        r.port
                    )));
                }
                r.domain.clear();
                r.path.clear();
            }
        }
        if r.kind == RouteType::Http {
            r.certificate = self.resolve_certificate(&mut r)?;
        } else if r.certificate.is_some() || !r.tls_cert.is_empty() {
            return Err(ApiError::validation(
                Some("certificate"),
                "is only for HTTP routes",
            ));
        }
        if r.id.is_empty() || self.routes.contains_key(&(r.kind, r.id.clone())) {
            r.id = uuid::Uuid::new_v4().to_string();
        }
        let t = now();
        r.created_at = Some(t.clone());
        r.updated_at = Some(t);
        self.seq += 1;
        self.version += 1;
        self.routes.insert(
            (r.kind, r.id.clone()),
            Stored {
                seq: self.seq,
                route: r.clone(),
            },
        );
        Ok(r)
    }

    /// Replaces the mutable fields of a route (`PUT /routes/:type/:id`).
    pub fn update(
        &mut self,
        kind: RouteType,
        id: &str,
        u: impl Into<Update>,
    ) -> Result<Route, ApiError> {
        let (_, next) = self.updated(kind, id, u.into())?;
        Ok(self.store_update(next))
    }

    /// As [`Store::update`], but a route the update would leave as it is stays untouched
    /// (no new `updated_at`, no new version): `None`. For reloads, which re-apply every
    /// route of the file.
    pub fn update_if_changed(
        &mut self,
        kind: RouteType,
        id: &str,
        u: impl Into<Update>,
    ) -> Result<Option<Route>, ApiError> {
        let (old, next) = self.updated(kind, id, u.into())?;
        if next == old {
            return Ok(None);
        }
        Ok(Some(self.store_update(next)))
    }

    /// Stores `next` (validated by [`Store::updated`]) over the route with its id.
    fn store_update(&mut self, mut next: Route) -> Route {
        next.updated_at = Some(now());
        self.version += 1;
        if let Some(s) = self.routes.get_mut(&(next.kind, next.id.clone())) {
            s.route = next.clone();
        }
        next
    }

    /// The stored route and what `u` makes of it (its `updated_at` still the old one);
    /// nothing is stored but a certificate the update brings.
    fn updated(
        &mut self,
        kind: RouteType,
        id: &str,
        u: Update,
    ) -> Result<(Route, Route), ApiError> {
        let Update {
            route: r,
            drain_backends,
            grpc,
        } = u;
        self.validate_common(&r)?;
        let key = (kind, id.to_string());
        let Some(old) = self.routes.get(&key).map(|s| s.route.clone()) else {
            return Err(ApiError::not_found("route not found"));
        };
        if r.kind != kind {
            return Err(ApiError::validation(Some("type"), "Invalid route type"));
        }
        if kind == RouteType::Http && carries_certificate(&r) {
            if let Some(e) = self.ports.refuses_tls(old.port) {
                return Err(e);
            }
        }
        let mut next = old.clone();
        next.service = r.service;
        next.leader = r.leader;
        next.sticky = r.sticky;
        next.disable_keep_alives = r.disable_keep_alives;
        next.grpc = grpc.or(old.grpc).filter(|on| *on);
        next.drain_backends = Some(drain_backends.or(old.drain_backends).unwrap_or(false));
        if kind == RouteType::Http && !r.path.is_empty() {
            next.path = normalize_path(&r.path);
            if !valid_path(&next.path) || (next.path != old.path && empty_segment(&next.path)) {
                return Err(invalid_route());
            }
            if next.path != old.path {
                if self.http_conflict(&next, Some(id)) {
                    return Err(ApiError::conflict("Duplicate route"));
                }
                if old.path == "/" && self.has_dependents(&old) {
                    return Err(ApiError::validation(None, "Route has dependent routes"));
                }
                if next.path != "/" && !self.has_root(&next, Some(id)) {
                    return Err(invalid_route());
                }
            }
        }
        // Last, once nothing else can refuse the update: resolving stores the certificate.
        next.certificate = if kind == RouteType::Http {
            let mut c = Route {
                certificate: r.certificate,
                tls_cert: r.tls_cert,
                tls_key: r.tls_key,
                ..old.clone()
            };
            self.resolve_certificate(&mut c)?
        } else {
            None
        };
        Ok((old, next))
    }

    fn has_dependents(&self, root: &Route) -> bool {
        self.routes.values().any(|s| {
            s.route.kind == RouteType::Http
                && s.route.domain.eq_ignore_ascii_case(&root.domain)
                && s.route.port == root.port
                && s.route.path != "/"
        })
    }

    /// Removes a route (`DELETE /routes/:type/:id`).
    pub fn remove(&mut self, kind: RouteType, id: &str) -> Result<Route, ApiError> {
        let key = (kind, id.to_string());
        let Some(r) = self.routes.get(&key).map(|s| s.route.clone()) else {
            return Err(ApiError::not_found("route not found"));
        };
        if kind == RouteType::Http && r.path == "/" && self.has_dependents(&r) {
            return Err(ApiError::validation(None, "Route has dependent routes"));
        }
        self.routes.remove(&key);
        self.version += 1;
        Ok(r)
    }

    pub fn get(&self, kind: RouteType, id: &str) -> Option<&Route> {
        self.routes.get(&(kind, id.to_string())).map(|s| &s.route)
    }

    /// All routes, newest first, optionally only those with `parent_ref`.
    pub fn list(&self, parent_ref: Option<&str>) -> Vec<Route> {
        let mut v: Vec<&Stored> = self
            .routes
            .values()
            .filter(|s| parent_ref.is_none_or(|p| s.route.parent_ref == p))
            .collect();
        // Newest first by creation time (a handover re-adds routes in another order), then
        // by arrival. The times are RFC 3339 in UTC with nine fractional digits, so they
        // sort as text.
        v.sort_by(|a, b| (&b.route.created_at, b.seq).cmp(&(&a.route.created_at, a.seq)));
        v.into_iter().map(|s| s.route.clone()).collect()
    }

    /// How many routes there are.
    pub fn route_count(&self) -> usize {
        self.routes.len()
    }

    /// The services routes name (each once), without copying the routes.
    pub fn routed_services(&self) -> std::collections::BTreeSet<String> {
        let mut names: Vec<&str> = self
            .routes
            .values()
            .map(|s| s.route.service.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        names.into_iter().map(str::to_string).collect()
    }

    /// The services of routes that track drains (spec §1.9).
    pub fn drain_tracked(&self) -> impl Iterator<Item = &str> {
        self.routes
            .values()
            .filter(|s| s.route.drain_backends == Some(true))
            .map(|s| s.route.service.as_str())
    }

    /// Whether a route of `service` tracks drains.
    pub fn tracks_drains(&self, service: &str) -> bool {
        self.drain_tracked().any(|s| s == service)
    }

    /// Replaces a service's backend set; returns (added, removed) addresses.
    pub fn set_backends(
        &mut self,
        service: &str,
        list: Vec<BackendAddr>,
    ) -> Result<(Vec<BackendAddr>, Vec<BackendAddr>), ApiError> {
        Backends::from_api(&list).map_err(|m| ApiError::validation(Some("addr"), &m))?;
        // One spelling per address (`[0::1]:80` is `[::1]:80`), as the table parses them:
        // re-spelling a live backend is no change (it was reported down and up, and a drain
        // of it could report a live backend drained), and a repeat is one backend.
        let mut list = list;
        for b in &mut list {
            if let Ok(a) = b.addr.parse::<std::net::SocketAddr>() {
                b.addr = a.to_string();
            }
        }
        // The first entry of an address stays; a repeat marked leader makes it the leader
        // (two discoverd instances of one job at one address, say its tcp and udp
        // registrations, the second of them the service leader), as `Backends::from_api`
        // reads a list with repeats.
        let mut first: HashMap<String, usize> = HashMap::with_capacity(list.len());
        let mut merged: Vec<BackendAddr> = Vec::with_capacity(list.len());
        for b in list {
            match first.get(&b.addr) {
                Some(&i) => merged[i].leader |= b.leader,
                None => {
                    first.insert(b.addr.clone(), merged.len());
                    merged.push(b);
                }
            }
        }
        let list = merged;
        let old = self.services.get(service).cloned().unwrap_or_default();
        let added = list
            .iter()
            .filter(|b| !old.iter().any(|o| o.addr == b.addr))
            .cloned()
            .collect();
        let removed = old
            .iter()
            .filter(|o| !list.iter().any(|b| b.addr == o.addr))
            .cloned()
            .collect();
        if list.is_empty() {
            self.services.remove(service);
        } else {
            self.services.insert(service.to_string(), list);
        }
        self.version += 1;
        Ok((added, removed))
    }

    pub fn services(&self) -> &BTreeMap<String, Vec<BackendAddr>> {
        &self.services
    }

    /// Re-adds a route handed over by another process, keeping its id and timestamps.
    pub fn restore(&mut self, r: Route) -> Result<(), ApiError> {
        let (created, updated) = (r.created_at.clone(), r.updated_at.clone());
        // An older build kept a trailing dot, so `a.com.` could sit beside `a.com` (or be
        // `.` alone). Dropped, such a route repeats another one, or is blank: it is left out
        // (the other serves its requests) rather than failing the takeover.
        let dotted = (r.kind == RouteType::Http && r.domain.ends_with('.'))
            .then(|| (r.id.clone(), r.domain.clone()));
        // A handed-over route keeps its port even if the port cannot be bound here now (its
        // listener comes from the old process, or a build before the check stored it).
        let added = match (self.insert(r, false), dotted) {
            (Ok(a), _) => a,
            (Err(e), Some((id, domain))) => {
                tracing::warn!(%id, %domain, error = %e.message, "handed-over route left out: its domain without the trailing dot is taken");
                return Ok(());
            }
            (Err(e), None) => return Err(e),
        };
        if let Some(s) = self.routes.get_mut(&(added.kind, added.id.clone())) {
            s.route.created_at = created;
            s.route.updated_at = updated;
        }
        Ok(())
    }

    pub fn backends(&self, service: &str) -> Vec<BackendAddr> {
        self.services.get(service).cloned().unwrap_or_default()
    }

    /// The certificate a route will carry: an inline keypair (or the legacy
    /// `tls_cert`/`tls_key`) is validated and deduplicated; an id must exist.
    fn resolve_certificate(&mut self, r: &mut Route) -> Result<Option<Certificate>, ApiError> {
        let legacy = (!r.tls_cert.is_empty() || !r.tls_key.is_empty()).then(|| {
            (
                std::mem::take(&mut r.tls_cert),
                std::mem::take(&mut r.tls_key),
            )
        });
        let c = match (r.certificate.take(), legacy) {
            (Some(c), _) if !c.cert.is_empty() || !c.key.is_empty() => {
                self.certs.add(&c.cert, &c.key)?
            }
            (Some(c), _) if !c.id.is_empty() => self
                .certs
                .get(&c.id)
                .cloned()
                .ok_or_else(|| ApiError::validation(None, "Certificate invalid: unknown id"))?,
            (_, Some((cert, key))) => self.certs.add(&cert, &key)?,
            _ => return Ok(None),
        };
        Ok(Some(c))
    }

    /// Routes that use certificate `id`.
    pub fn certificate_routes(&self, id: &str) -> Vec<Route> {
        self.list(None)
            .into_iter()
            .filter(|r| r.certificate.as_ref().is_some_and(|c| c.id == id))
            .collect()
    }

    /// A certificate with the ids of the routes using it.
    pub fn certificate(&self, id: &str) -> Option<Certificate> {
        let mut c = self.certs.get(id)?.clone();
        c.routes = self
            .certificate_routes(id)
            .into_iter()
            .map(|r| r.id)
            .collect();
        Some(c)
    }

    /// The SNI certificate map for the cores, per route port as the route table keys
    /// them (0: the default listeners): on a port, a domain's certificate is its `/`
    /// route's there (spec §1.7: the route lookup with path `/`, on the listener's port),
    /// else the default keypair. Sub-path routes' certificates are not used for the
    /// handshake, nor are other ports' routes: a handshake presents the certificate of the
    /// route that serves its requests. Only ports with a TLS listener count: a route on a
    /// plain additional port is never reached through a handshake.
    pub fn cert_store(&self, default: Option<Arc<CertifiedKey>>) -> CertStore {
        let mut store = CertStore::new(default);
        for s in self.routes.values().filter(|s| {
            s.route.kind == RouteType::Http
                && s.route.path == "/"
                && self.ports.serves_tls(s.route.port)
        }) {
            let key = s
                .route
                .certificate
                .as_ref()
                .and_then(|c| self.certs.key(&c.id));
            store.add_on(s.route.port, &s.route.domain, key);
        }
        store
    }

    /// A snapshot for the cores.
    pub fn table(&self) -> Table {
        let mut backends = HashMap::new();
        for (svc, list) in &self.services {
            if let Ok(b) = Backends::from_api(list) {
                backends.insert(svc.clone(), b);
            }
        }
        Table::build(
            self.routes.values().map(|s| &s.route),
            &backends,
            self.version,
        )
    }
}

#[cfg(test)]
mod tests;
