//! Telling the host daemon its block (flannel's notify, spec §6): once the overlay is up the
//! agent sends `POST /host/network {job_id, subnet: "<first address>/<len>", mtu, resolvers}`
//! to flynn-host, which makes its job bridge from it (`--network-from-agent`).

use std::net::IpAddr;
use std::path::Path;

use flynn_api::host::NetworkConfig;

use crate::Subnet;

/// Attempts before giving up: none (once a second, then every 10 s): the host daemon may
/// start after the agent, or be down for a while.
pub const NOTIFY_ATTEMPTS: u32 = flynn_client::NOTIFY_FOREVER;

/// The notification for a host holding `subnet` with job MTU `mtu`.
pub fn network_config(
    job_id: &str,
    subnet: &Subnet,
    mtu: u32,
    resolvers: Vec<String>,
) -> NetworkConfig {
    NetworkConfig {
        job_id: job_id.to_string(),
        subnet: format!("{}/{}", subnet.first_host(), subnet.prefix_len()),
        mtu,
        resolvers,
    }
}

/// The `nameserver` addresses of a resolv.conf (the host's upstream DNS, which discoverd
/// takes as its recursors); none when the file is missing or unreadable.
pub fn nameservers(path: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        .filter(|a| a.parse::<IpAddr>().is_ok())
        .map(str::to_string)
        .collect()
}

/// Sends `cfg` to the host daemon at `base` until it answers 2xx (once a second, at most
/// [`NOTIFY_ATTEMPTS`]); a 4xx is final (the host refused the block) and is logged.
pub async fn notify_host(base: String, cfg: NetworkConfig) -> bool {
    let client = flynn_client::host::Client::new(&base);
    let what = format!("telling the host at {base} its block {}", cfg.subnet);
    flynn_client::notify_until_accepted(&what, NOTIFY_ATTEMPTS, || {
        let (client, cfg) = (&client, &cfg);
        async move {
            match client.configure_network(cfg).await {
                Ok(()) => flynn_client::Attempt::Accepted,
                Err(e) => match e.api() {
                    Some(api) if (400..500).contains(&api.status()) => {
                        flynn_client::Attempt::Refused(e.to_string())
                    }
                    _ => flynn_client::Attempt::Failed(e.to_string()),
                },
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_the_first_address() {
        let s: Subnet = "100.100.3.0/24".parse().unwrap();
        let c = network_config("flannel-1", &s, 1450, vec!["10.0.0.2".into()]);
        assert_eq!(c.subnet, "100.100.3.1/24");
        assert_eq!((c.mtu, c.job_id.as_str()), (1450, "flannel-1"));
    }

    #[test]
    fn nameservers_from_resolv_conf() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("resolv.conf");
        std::fs::write(
            &p,
            "# comment\nsearch example\nnameserver 10.0.0.2\nnameserver  fd00::53 \nnameserver bogus\noptions ndots:2\n",
        )
        .unwrap();
        assert_eq!(nameservers(&p), ["10.0.0.2", "fd00::53"]);
        assert!(nameservers(&dir.path().join("missing")).is_empty());
    }
}
