//! One pooled HTTP/1.1 client (reqwest) for discoverd's API and etcd's JSON gateway, with
//! a per-request timeout (streams have none) and small JSON helpers.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use serde_json::Value;

/// Timeout of one ordinary request.
pub const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Http {
    pub client: reqwest::Client,
}

pub struct Resp {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Resp {
    /// Errors unless the status is 200.
    pub fn ok(&self) -> Result<()> {
        if self.status != 200 {
            bail!("HTTP {}: {}", self.status, self.text());
        }
        Ok(())
    }

    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body).with_context(|| format!("decoding {:?}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body)
            .chars()
            .take(300)
            .collect()
    }
}

impl Http {
    pub fn new() -> Result<Http> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(256)
            // Under discoverd's 30 s idle close.
            .pool_idle_timeout(Duration::from_secs(20))
            .build()
            .context("building the HTTP client")?;
        Ok(Http { client })
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<String>,
        timeout: Duration,
    ) -> Result<Resp> {
        let mut req = self.client.request(method, url).timeout(timeout);
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        let body = r.bytes().await?.to_vec();
        Ok(Resp { status, body })
    }

    pub async fn get(&self, url: &str) -> Result<Resp> {
        self.send(reqwest::Method::GET, url, None, TIMEOUT).await
    }

    pub async fn post(&self, url: &str, body: &str) -> Result<Resp> {
        self.send(reqwest::Method::POST, url, Some(body.to_string()), TIMEOUT)
            .await
    }

    pub async fn put(&self, url: &str, body: &str) -> Result<Resp> {
        self.send(reqwest::Method::PUT, url, Some(body.to_string()), TIMEOUT)
            .await
    }

    pub async fn delete(&self, url: &str) -> Result<Resp> {
        self.send(reqwest::Method::DELETE, url, None, TIMEOUT).await
    }
}

/// An etcd gateway int64 (a JSON string) or a plain number, as a string.
pub fn str_field(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

/// etcd's gateway wants keys and values base64-encoded.
pub fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

pub fn unb64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .decode(s.as_bytes())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The end of etcd's range for every key starting with `prefix` (last byte + 1).
pub fn prefix_end(prefix: &str) -> String {
    let mut b = prefix.as_bytes().to_vec();
    if let Some(last) = b.last_mut() {
        *last += 1;
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// `md5hex(proto + "-" + addr)`, discoverd's instance id (spec §0.5).
pub fn instance_id(proto: &str, addr: &str) -> String {
    use md5::{Digest, Md5};
    let d = Md5::digest(format!("{proto}-{addr}").as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(b64("cas/0"), "Y2FzLzA=");
        assert_eq!(unb64("Y2FzLzA="), "cas/0");
        assert_eq!(prefix_end("watch/"), "watch0");
        assert_eq!(
            instance_id("tcp", "127.0.0.1:5555"),
            "a86a9d757768968aac54982f4ced968d"
        );
        assert_eq!(str_field(&serde_json::json!("12")), "12");
        assert_eq!(str_field(&serde_json::json!(12)), "12");
    }
}
