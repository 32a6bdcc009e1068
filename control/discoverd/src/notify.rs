//! The host handshake (`--notify`, `--wait-net-dns`): tell the host daemon where this
//! node listens (`POST /host/discoverd`) and, optionally, hold DNS back until the host's
//! network is up, taking its resolvers as recursors.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Body of the notification: the host's `discoverd` status entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Notification {
    pub job_id: String,
    pub url: String,
    pub dns: String,
}

/// Attempts before giving up on `--notify`: none (once a second, then every 10 s).
pub const NOTIFY_ATTEMPTS: u32 = flynn_client::NOTIFY_FOREVER;

/// POSTs `body` to `url` once a second until the host accepts it (2xx) or refuses it (4xx,
/// final) (see [`NOTIFY_ATTEMPTS`]).
pub async fn notify(url: String, body: Notification) -> bool {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client");
    let what = format!("notifying the host at {url}");
    flynn_client::notify_until_accepted(&what, NOTIFY_ATTEMPTS, || {
        let send = client.post(&url).json(&body).send();
        async move { flynn_client::Attempt::of_response(send.await) }
    })
    .await
}

/// Polls `GET /host/status` on the notify URL's host until it reports a configured
/// network; returns its resolvers (port 53 unless given). Waits as long as it takes,
/// logging every 10 s.
pub async fn wait_for_host_network(notify_url: &str) -> Vec<SocketAddr> {
    let base = flynn_client::http_base(notify_url).expect("validated");
    let url = format!("{base}/host/status");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client");
    let mut polls = 0u32;
    loop {
        if let Ok(r) = client.get(&url).send().await {
            if let Ok(v) = r.json::<serde_json::Value>().await {
                let net = &v["network"];
                if net.is_object() && net["subnet"].is_string() {
                    return resolvers(&net["resolvers"]);
                }
            }
        }
        polls += 1;
        if polls.is_multiple_of(20) {
            tracing::info!(%url, "waiting for the host network before serving DNS");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn resolvers(v: &serde_json::Value) -> Vec<SocketAddr> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str())
        .filter_map(|s| {
            s.parse::<SocketAddr>()
                .ok()
                .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolvers_default_to_port_53_and_skip_junk() {
        let v = serde_json::json!(["10.0.0.2", "10.0.0.3:5353", "bogus", 7]);
        let got: Vec<String> = resolvers(&v).iter().map(|a| a.to_string()).collect();
        assert_eq!(got, ["10.0.0.2:53", "10.0.0.3:5353"]);
        assert!(resolvers(&serde_json::Value::Null).is_empty());
    }
}
