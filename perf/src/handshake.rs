//! A TLS load generator that never resumes a session: every request is a new TCP connection
//! with a full TLS handshake, one `GET` with `Connection: close`, and the response.
//!
//! `wrk` cannot do that: it keeps one OpenSSL `SSL` object per connection slot and reconnects
//! with `SSL_shutdown` + `SSL_clear`, which keeps the session, so every reconnect offers the
//! previous session's TLS 1.3 ticket and every server accepts it (measured: 455 of 457
//! handshakes resumed against nginx). This client uses rustls with
//! `Resumption::disabled()`, so it never offers a PSK or a session id; it counts the handshake
//! kind rustls reports, so a resumed handshake would show up in the report. It offers no ALPN
//! (as `wrk`), TLS 1.3 and 1.2, and rustls' default key-exchange order (X25519 first).
//!
//! Blocking sockets, one thread per connection slot: the client's cost is charged to the
//! harness, never to the target.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, HandshakeKind, SignatureScheme,
};

use crate::wrk;

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What one run is asked to do.
#[derive(Clone, Debug)]
pub struct Load {
    pub port: u16,
    /// SNI name sent in the ClientHello.
    pub sni: String,
    /// `Host` header.
    pub host: String,
    pub path: String,
    pub connections: usize,
    pub duration: Duration,
}

/// One run's figures: a wrk-shaped report (one request = one full handshake) and the
/// handshake kinds rustls reported.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub report: wrk::Report,
    pub full: u64,
    pub resumed: u64,
}

/// Accepts the self-signed benchmark certificate without a chain check, but still verifies
/// the handshake signature as a real client would (that costs the client, not the server).
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The client config: no resumption, no ALPN, TLS 1.3 and 1.2.
pub fn client_config() -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("rustls protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    cfg.resumption = Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// How one request went.
pub enum Exchange {
    /// Status 200; whether the handshake was resumed; the body.
    Ok { resumed: bool, body: Vec<u8> },
    /// A complete response with another status.
    Status(u16),
}

/// One connection: connect, handshake, `GET path` with `Connection: close`, read the whole
/// response, send close_notify.
pub fn exchange(
    cfg: &Arc<ClientConfig>,
    port: u16,
    sni: &str,
    host: &str,
    path: &str,
) -> Result<Exchange> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let sock = TcpStream::connect_timeout(&addr, IO_TIMEOUT).context("connect")?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(IO_TIMEOUT))?;
    sock.set_write_timeout(Some(IO_TIMEOUT))?;
    let name = ServerName::try_from(sni.to_string()).context("SNI name")?;
    let conn = ClientConnection::new(cfg.clone(), name).context("TLS client")?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .context("handshake/write")?;
    tls.flush().context("flush")?;

    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    let (status, head_len, content_length) = loop {
        let n = tls.read(&mut chunk).context("reading response head")?;
        if n == 0 {
            bail!("connection closed before a complete response head");
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(len) = resp.parse(&buf).context("response head")? {
            let cl = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| {
                    std::str::from_utf8(h.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                });
            break (resp.code.unwrap_or(0), len, cl);
        }
    };
    match content_length {
        Some(cl) => {
            while buf.len() < head_len + cl {
                let n = tls.read(&mut chunk).context("reading body")?;
                if n == 0 {
                    bail!("connection closed inside the body");
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
        None => loop {
            // No length: the body ends with the connection (close_notify or a bare close).
            match tls.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        },
    }
    let resumed = tls.conn.handshake_kind() == Some(HandshakeKind::Resumed);
    tls.conn.send_close_notify();
    let _ = tls.conn.complete_io(&mut tls.sock);
    if status != 200 {
        return Ok(Exchange::Status(status));
    }
    Ok(Exchange::Ok {
        resumed,
        body: buf[head_len..].to_vec(),
    })
}

#[derive(Default)]
struct ThreadTally {
    latencies_us: Vec<u64>,
    full: u64,
    resumed: u64,
    non_2xx: u64,
    errors: u64,
}

/// Runs `load.connections` client threads for `load.duration`.
pub fn run(load: &Load) -> Result<Outcome> {
    let cfg = client_config()?;
    let start = Instant::now();
    let deadline = start + load.duration;
    let handles: Vec<_> = (0..load.connections.max(1))
        .map(|i| {
            let cfg = cfg.clone();
            let load = load.clone();
            std::thread::Builder::new()
                .name(format!("hs-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || {
                    let mut t = ThreadTally::default();
                    while Instant::now() < deadline {
                        let t0 = Instant::now();
                        match exchange(&cfg, load.port, &load.sni, &load.host, &load.path) {
                            Ok(Exchange::Ok { resumed, .. }) => {
                                t.latencies_us.push(t0.elapsed().as_micros() as u64);
                                if resumed {
                                    t.resumed += 1;
                                } else {
                                    t.full += 1;
                                }
                            }
                            Ok(Exchange::Status(_)) => t.non_2xx += 1,
                            Err(_) => {
                                t.errors += 1;
                                // Do not spin on a refusing target.
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                    }
                    t
                })
        })
        .collect::<std::io::Result<_>>()
        .context("spawning client threads")?;
    let mut all = ThreadTally::default();
    for h in handles {
        let t = h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        all.latencies_us.extend(t.latencies_us);
        all.full += t.full;
        all.resumed += t.resumed;
        all.non_2xx += t.non_2xx;
        all.errors += t.errors;
    }
    let seconds = start.elapsed().as_secs_f64();
    let done = all.latencies_us.len() as u64;
    let latencies: Vec<f64> = all.latencies_us.iter().map(|&us| us as f64).collect();
    let pct = |p: f64| crate::report::percentile(&latencies, p).unwrap_or(f64::NAN);
    Ok(Outcome {
        report: wrk::Report {
            requests: done,
            seconds,
            rps: done as f64 / seconds,
            p50_us: pct(50.0),
            p99_us: pct(99.0),
            non_2xx: all.non_2xx,
            socket_errors: all.errors,
        },
        full: all.full,
        resumed: all.resumed,
    })
}
