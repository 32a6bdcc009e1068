//! Routes, backends and router events (spec §1.2).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteType {
    Http,
    Tcp,
}

impl RouteType {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteType::Http => "http",
            RouteType::Tcp => "tcp",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "http" => Some(RouteType::Http),
            "tcp" => Some(RouteType::Tcp),
            _ => None,
        }
    }
}

/// A route as stored and served by the route APIs. HTTP-only fields are empty on TCP
/// routes. Timestamps are RFC 3339 strings set by the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    #[serde(rename = "type")]
    pub kind: RouteType,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parent_ref: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub leader: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<Certificate>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tls_cert: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tls_key: String,
    #[serde(default)]
    pub sticky: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// Report `backend-drained` for this route's service (spec §1.9). `None`: not named,
    /// and so not sent: a router creating the route takes it as `true` (spec §1.2: the
    /// storage default). An update never changes it, named or not (spec §1.2's PUT leaves
    /// it as stored). Routes a router returns always have it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_backends: Option<bool>,
    #[serde(default)]
    pub disable_keep_alives: bool,
    /// Speak HTTP/2 to the backends (for gRPC: trailers and bidirectional streams pass
    /// through end to end). Only for requests that reach the router over HTTP/2. `None`:
    /// not named, and so not sent (off when the route is created, unchanged when it is
    /// updated); a router returns it only when on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<bool>,
}

impl Route {
    /// A blank HTTP route for `domain` served by `service`.
    pub fn http(domain: &str, service: &str) -> Self {
        Route {
            domain: domain.into(),
            ..Self::blank(RouteType::Http, service)
        }
    }

    /// A blank TCP route on `port` (0 = allocate) served by `service`.
    pub fn tcp(port: u16, service: &str) -> Self {
        Route {
            port,
            ..Self::blank(RouteType::Tcp, service)
        }
    }

    fn blank(kind: RouteType, service: &str) -> Self {
        Route {
            kind,
            id: String::new(),
            parent_ref: String::new(),
            service: service.into(),
            port: 0,
            leader: false,
            created_at: None,
            updated_at: None,
            domain: String::new(),
            certificate: None,
            tls_cert: String::new(),
            tls_key: String::new(),
            sticky: false,
            path: String::new(),
            drain_backends: None,
            disable_keep_alives: false,
            grpc: None,
        }
    }

    /// The formatted id used in URLs: `<type>/<id>`.
    pub fn formatted_id(&self) -> String {
        format!("{}/{}", self.kind.as_str(), self.id)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Certificate {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
    #[serde(default)]
    pub cert: String,
    #[serde(default)]
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

/// A live backend of a service (from discoverd, or set through the router API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
    pub addr: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub app: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub job_id: String,
}

/// The body of `PUT /services/:service/backends`: one entry per backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendAddr {
    pub addr: String,
    /// Marks the service leader for `leader: true` routes; when no entry is marked the
    /// first one leads (discoverd's default `oldest` leader type).
    #[serde(default)]
    pub leader: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub app: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub job_id: String,
}

/// One item of the router's `/events` stream: `set`, `remove`, `backend-up`,
/// `backend-down` or `backend-drained`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamEvent {
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<Route>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_json_round_trip() {
        let json = r#"{"type":"http","domain":"example.com","service":"web","leader":false}"#;
        let r: Route = serde_json::from_str(json).unwrap();
        assert_eq!(r.kind, RouteType::Http);
        assert_eq!(r.domain, "example.com");
        assert_eq!(r.path, "");
        let back = serde_json::to_value(&r).unwrap();
        assert_eq!(back["type"], "http");
        assert_eq!(back["leader"], false);
        assert!(back.get("certificate").is_none());
    }

    /// A flag a client does not set is not sent (a router then applies its default on
    /// create, keeps the stored value on update); one it sets is sent, `false` included, so
    /// a typed client can turn gRPC off or create a route without drain tracking.
    #[test]
    fn unset_flags_are_not_sent_and_set_ones_are() {
        let r = Route::http("example.com", "web");
        let v = serde_json::to_value(&r).unwrap();
        assert!(v.get("drain_backends").is_none(), "{v}");
        assert!(v.get("grpc").is_none(), "{v}");
        let r = Route {
            drain_backends: Some(false),
            grpc: Some(false),
            ..Route::http("example.com", "web")
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["drain_backends"], false, "{v}");
        assert_eq!(v["grpc"], false, "{v}");
        let back: Route = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        let absent: Route = serde_json::from_str(r#"{"type":"http"}"#).unwrap();
        assert_eq!((absent.drain_backends, absent.grpc), (None, None));
        let null: Route = serde_json::from_str(r#"{"type":"http","drain_backends":null}"#).unwrap();
        assert_eq!(null.drain_backends, None);
    }

    #[test]
    fn unknown_route_type_is_rejected() {
        assert!(serde_json::from_str::<Route>(r#"{"type":"udp"}"#).is_err());
    }
}
