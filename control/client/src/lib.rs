//! Typed HTTP/SSE clients for Flynn services.
//!
//! Today: the discoverd client ([`discoverd::Client`]) with a [`discoverd::Heartbeater`]
//! that keeps an instance registered and [`discoverd::Watch`]es that reconnect and
//! resume without losing events. Used by the router, scheduler and anything that
//! registers with discoverd. Wire types are defined here (serde only) so clients do not
//! depend on the discoverd binary crate.

pub mod discoverd;
pub mod host;
mod json_http;

/// `scheme://authority` of an `http`/`https` URL (the path dropped), `None` for anything
/// else: what a service takes from a `--notify`-style URL to build its client.
pub fn http_base(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let authority = rest.split('/').next().filter(|a| !a.is_empty())?;
    Some(format!("{scheme}://{authority}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn http_base_keeps_scheme_and_authority() {
        use super::http_base;
        assert_eq!(
            http_base("http://10.0.0.1:1113/host/discoverd").as_deref(),
            Some("http://10.0.0.1:1113")
        );
        assert_eq!(http_base("https://h:1").as_deref(), Some("https://h:1"));
        assert_eq!(http_base("ftp://x/y"), None);
        assert_eq!(http_base("http:///y"), None);
        assert_eq!(http_base("nonsense"), None);
    }
}
