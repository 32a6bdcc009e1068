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
pub mod logagg;
#[doc(hidden)]
pub mod sse;

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

/// What one attempt at a notification got.
#[derive(Debug)]
pub enum Attempt {
    Accepted,
    /// A 4xx: the receiver understood and said no; trying again would not change that.
    Refused(String),
    /// Unreachable, a 5xx or a timeout: worth another try.
    Failed(String),
}

impl Attempt {
    /// The outcome of a plain HTTP exchange.
    pub fn of_response(r: Result<reqwest::Response, reqwest::Error>) -> Attempt {
        match r {
            Ok(r) if r.status().is_success() => Attempt::Accepted,
            Ok(r) if r.status().is_client_error() => Attempt::Refused(r.status().to_string()),
            Ok(r) => Attempt::Failed(r.status().to_string()),
            Err(e) => Attempt::Failed(e.to_string()),
        }
    }
}

/// A service telling its host daemon about itself (discoverd's and the overlay agent's
/// `--notify`): `attempt` once a second for the first minute, then every
/// [`NOTIFY_SLOW_PAUSE`], until it is accepted or refused, at most `attempts` times (callers
/// pass [`NOTIFY_FOREVER`]: a host daemon down for more than a minute used to miss the
/// notice for good). True when accepted; refusals and giving up are logged as warnings
/// naming `what`.
/// [`notify_until_accepted`]'s pause between attempts after the first minute.
pub const NOTIFY_SLOW_PAUSE: std::time::Duration = std::time::Duration::from_secs(10);
/// Attempts for [`notify_until_accepted`] that in practice never run out.
pub const NOTIFY_FOREVER: u32 = u32::MAX;

pub async fn notify_until_accepted<F, Fut>(what: &str, attempts: u32, mut attempt: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Attempt>,
{
    for n in 1..=attempts {
        match attempt().await {
            Attempt::Accepted => {
                tracing::info!("{what}: done");
                return true;
            }
            Attempt::Refused(why) => {
                tracing::warn!(%why, "{what}: refused");
                return false;
            }
            Attempt::Failed(why) => tracing::debug!(%why, attempt = n, "{what}: failed"),
        }
        if n < attempts {
            let pause = if n < 60 {
                std::time::Duration::from_secs(1)
            } else {
                if n == 60 {
                    tracing::warn!("{what}: no answer for a minute; still trying");
                }
                NOTIFY_SLOW_PAUSE
            };
            tokio::time::sleep(pause).await;
        }
    }
    tracing::warn!("{what}: gave up after {attempts} attempts");
    false
}

#[cfg(test)]
mod tests {
    use super::{notify_until_accepted, Attempt};

    /// Runs the loop with `outcome(n)` as the n-th attempt's result: (accepted, attempts made).
    async fn notify(attempts: u32, outcome: impl Fn(u32) -> Attempt) -> (bool, u32) {
        let calls = std::cell::Cell::new(0);
        let ok = notify_until_accepted("test", attempts, || {
            calls.set(calls.get() + 1);
            let a = outcome(calls.get());
            async move { a }
        })
        .await;
        (ok, calls.get())
    }

    #[tokio::test(start_paused = true)]
    async fn notify_retries_failures_and_stops_at_a_refusal() {
        let flaky = |n| match n {
            1 | 2 => Attempt::Failed("down".into()),
            _ => Attempt::Accepted,
        };
        assert_eq!(notify(5, flaky).await, (true, 3));
        let refused = |_| Attempt::Refused("400 Bad Request".into());
        assert_eq!(notify(5, refused).await, (false, 1), "a refusal is final");
        let down = |_| Attempt::Failed("down".into());
        assert_eq!(
            notify(4, down).await,
            (false, 4),
            "gives up after the attempts"
        );
        // A minute of one a second (59 pauses), then one every 10 s.
        let t0 = tokio::time::Instant::now();
        let down = |_| Attempt::Failed("down".into());
        assert_eq!(notify(70, down).await, (false, 70));
        assert_eq!(
            t0.elapsed(),
            std::time::Duration::from_secs(59 + 10 * 10),
            "pauses"
        );
    }

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
