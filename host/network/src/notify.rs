//! Telling the host daemon its block (flannel's notify, spec §6): once the overlay is up the
//! agent sends `POST /host/network {job_id, subnet: "<first address>/<len>", mtu, resolvers}`
//! to flynn-host, which makes its job bridge from it (`--network-from-agent`), and again when
//! the overlay MTU changes ([`follow_mtu`]).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

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

/// Sends `cfg` to the host daemon at `base` until it answers 2xx (as
/// `flynn_client::notify_until_accepted` paces it, for as long as it takes); a 4xx is final (the host refused the block) and is logged, unless
/// it says to retry (another block while the host's jobs hold addresses in the old one:
/// the host moves once they are gone).
pub async fn notify_host(base: String, cfg: NetworkConfig) -> bool {
    let client = flynn_client::host::Client::new(&base);
    let what = format!("telling the host at {base} its block {}", cfg.subnet);
    flynn_client::notify_until_accepted(&what, NOTIFY_ATTEMPTS, || {
        let (client, cfg) = (&client, &cfg);
        async move { attempt(client.configure_network(cfg).await) }
    })
    .await
}

/// [`notify_host`] with the overlay MTU `mtu` holds, and again each time it changes (the
/// underlay's MTU changed and the VXLAN device followed it): without that, after a decrease
/// the jobs' routes kept the old, larger MTU. A notification still being retried is dropped
/// for the new one. The resolvers are read from `resolv_conf` for each. Ends when the agent
/// (the sender of `mtu`) is gone.
pub async fn follow_mtu(
    base: String,
    job_id: String,
    subnet: Subnet,
    resolv_conf: PathBuf,
    mut mtu: tokio::sync::watch::Receiver<u32>,
) {
    loop {
        let m = *mtu.borrow_and_update();
        let cfg = network_config(&job_id, &subnet, m, nameservers(&resolv_conf));
        let changed = tokio::select! {
            _ = notify_host(base.clone(), cfg) => mtu.changed().await,
            r = mtu.changed() => r,
        };
        if changed.is_err() {
            return;
        }
        tracing::info!(
            before = m,
            after = *mtu.borrow(),
            "overlay MTU changed; telling the host daemon"
        );
    }
}

/// What one answer of the host means for [`notify_host`].
fn attempt(r: Result<(), flynn_client::host::Error>) -> flynn_client::Attempt {
    match r {
        Ok(()) => flynn_client::Attempt::Accepted,
        Err(e) => match e.api() {
            Some(api) if (400..500).contains(&api.status()) && !api.retry => {
                flynn_client::Attempt::Refused(e.to_string())
            }
            _ => flynn_client::Attempt::Failed(e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_final_unless_it_says_to_retry() {
        use flynn_api::ApiError;
        use flynn_client::host::Error;
        use flynn_client::Attempt;
        assert!(matches!(attempt(Ok(())), Attempt::Accepted));
        let busy = ApiError::conflict("jobs hold addresses").with_retry(true);
        assert!(matches!(attempt(Err(Error::Api(busy))), Attempt::Failed(_)));
        let final_ = ApiError::conflict("set by --block");
        assert!(matches!(
            attempt(Err(Error::Api(final_))),
            Attempt::Refused(_)
        ));
        let bad = ApiError::validation(Some("subnet"), "bad");
        assert!(matches!(attempt(Err(Error::Api(bad))), Attempt::Refused(_)));
        assert!(matches!(
            attempt(Err(Error::Api(ApiError::unknown()))),
            Attempt::Failed(_)
        ));
    }

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
