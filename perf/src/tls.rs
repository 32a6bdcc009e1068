//! The benchmark certificate (generated with `openssl req` into the session's temp dir, one
//! keypair shared by every target) and the negotiated-parameters probe for the report.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::targets::HOST;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    /// ECDSA P-256 (prime256v1).
    Ec,
    /// RSA 2048.
    Rsa,
}

impl KeyType {
    pub fn parse(s: &str) -> Result<KeyType> {
        match s {
            "ec" | "ecdsa" | "p256" => Ok(KeyType::Ec),
            "rsa" | "rsa2048" => Ok(KeyType::Rsa),
            _ => bail!("unknown certificate key type {s:?} (expected ec or rsa)"),
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            KeyType::Ec => "ECDSA P-256",
            KeyType::Rsa => "RSA 2048",
        }
    }
}

/// One self-signed keypair as PEM files.
#[derive(Clone, Debug)]
pub struct Files {
    pub key_type: KeyType,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate then key, for HAProxy's `crt`.
    pub combined: PathBuf,
}

/// Generates a self-signed certificate for `bench.local`, `*.bench.local` and 127.0.0.1.
pub fn generate(dir: &Path, key_type: KeyType) -> Result<Files> {
    let cert = dir.join("bench-cert.pem");
    let key = dir.join("bench-key.pem");
    let mut cmd = Command::new("openssl");
    cmd.args(["req", "-x509", "-nodes", "-days", "7", "-newkey"]);
    match key_type {
        KeyType::Ec => cmd.args(["ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]),
        KeyType::Rsa => cmd.arg("rsa:2048"),
    };
    cmd.arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .arg("-subj")
        .arg(format!("/CN={HOST}"))
        .arg("-addext")
        .arg(format!(
            "subjectAltName=DNS:{HOST},DNS:*.{HOST},IP:127.0.0.1"
        ));
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("running `openssl req` (apt-get install -y openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let combined = dir.join("bench-cert-key.pem");
    let mut pem = std::fs::read_to_string(&cert).context("reading the certificate")?;
    pem.push_str(&std::fs::read_to_string(&key).context("reading the key")?);
    std::fs::write(&combined, pem).context("writing cert+key PEM")?;
    Ok(Files {
        key_type,
        cert,
        key,
        combined,
    })
}

/// Runs `openssl s_client` against 127.0.0.1:`port`, sends one `GET /` with
/// `Connection: close` and waits (`-ign_eof`, at most 5 s) until the server closes, so the
/// TLS 1.3 session tickets the server sends after the handshake have been read. Returns its
/// output (stdout and stderr).
fn s_client(port: u16, extra: &[&std::ffi::OsStr]) -> Option<String> {
    let mut child = Command::new("timeout")
        .args(["5", "openssl", "s_client", "-ign_eof", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        let _ = write!(
            stdin,
            "GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
        );
    }
    let out = child.wait_with_output().ok()?;
    Some(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// What `openssl s_client` (the library `wrk` uses) negotiates with the listener on `port`,
/// e.g. `TLSv1.3 TLS_AES_256_GCM_SHA384 X25519, resumption accepted` (plus the ALPN protocol
/// if `alpn` is given). Resumption is checked by reconnecting with the first connection's
/// session (`-sess_out`, `-sess_in`), as `wrk` does when it reconnects.
pub fn probe(dir: &Path, port: u16, alpn: Option<&str>) -> String {
    let sess = dir.join(format!("probe-session-{port}.pem"));
    let mut args: Vec<&std::ffi::OsStr> = vec!["-sess_out".as_ref(), sess.as_os_str()];
    if let Some(a) = alpn {
        args.push("-alpn".as_ref());
        args.push(a.as_ref());
    }
    let Some(text) = s_client(port, &args) else {
        return "openssl s_client failed".into();
    };
    let line = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(str::trim))
    };
    let mut parts = Vec::new();
    // "New, TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384"
    match line("New,") {
        Some(v) => parts.push(v.replace(", Cipher is", "")),
        None => return "no TLS handshake".into(),
    }
    // "Server Temp Key: X25519, 253 bits"
    if let Some(v) = line("Server Temp Key:") {
        parts.push(v.split(',').next().unwrap_or("").trim().to_string());
    }
    if alpn.is_some() {
        parts.push(format!("ALPN {}", line("ALPN protocol:").unwrap_or("none")));
    }
    let resumed = s_client(port, &["-sess_in".as_ref(), sess.as_os_str()])
        .map(|t| t.lines().any(|l| l.trim().starts_with("Reused,")));
    let _ = std::fs::remove_file(&sess);
    let mut out = parts.join(" ");
    out.push_str(match resumed {
        Some(true) => ", resumption accepted",
        Some(false) => ", resumption refused",
        None => "",
    });
    out
}

/// Whether the listener on `port` selects ALPN protocol `proto` (e.g. `h2`) for a client
/// offering only that protocol.
pub fn negotiates_alpn(port: u16, proto: &str) -> bool {
    s_client(port, &["-alpn".as_ref(), proto.as_ref()]).is_some_and(|t| {
        t.lines()
            .any(|l| l.trim().strip_prefix("ALPN protocol:").map(str::trim) == Some(proto))
    })
}
