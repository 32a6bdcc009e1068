//! Forwarding of names outside `discoverd.` to the configured recursors (spec §2.8):
//! tried in order, over TCP when the query came over TCP, UDP otherwise (falling back to
//! TCP when a UDP answer is truncated). Every recursor failing → `None` (SERVFAIL).
//!
//! Every exchange holds a socket for up to [`RECURSOR_TIMEOUT`]: with recursors that stop
//! answering, open sockets would grow with the query rate until the process runs out of
//! descriptors (and its API, Raft listener and log with it). At most [`Forwarder`]'s
//! bound of forwards run at once; a query past it fails at once (SERVFAIL), not queued.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_server::proto::op::{Message, Query};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

/// Per-recursor deadline for one exchange.
pub const RECURSOR_TIMEOUT: Duration = Duration::from_secs(2);

/// The recursors and the bound on forwards under way (each holds one socket at a time).
pub struct Forwarder {
    recursors: Vec<SocketAddr>,
    permits: Semaphore,
    timeout: Duration,
}

impl Forwarder {
    pub fn new(recursors: Vec<SocketAddr>, max: usize, timeout: Duration) -> Forwarder {
        Forwarder {
            recursors,
            permits: Semaphore::new(max),
            timeout,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.recursors.is_empty()
    }

    /// Asks each recursor in turn; the first answer wins. `None` at once when the bound
    /// of forwards under way is reached.
    pub async fn forward(&self, query: &Query, tcp: bool) -> Option<Message> {
        let Ok(_permit) = self.permits.try_acquire() else {
            tracing::debug!("too many forwarded queries under way");
            return None;
        };
        forward(&self.recursors, query, tcp, self.timeout).await
    }
}

/// Asks each recursor in turn; the first answer wins.
async fn forward(
    recursors: &[SocketAddr],
    query: &Query,
    tcp: bool,
    timeout: Duration,
) -> Option<Message> {
    let mut msg = Message::query();
    msg.metadata.id = fastrand::u16(..);
    msg.metadata.recursion_desired = true;
    msg.add_query(query.clone());
    let bytes = msg.to_vec().ok()?;
    for r in recursors {
        let got = tokio::time::timeout(timeout, async {
            if tcp {
                exchange_tcp(*r, &bytes).await
            } else {
                match exchange_udp(*r, &bytes).await {
                    Ok(m) if m.metadata.truncation => exchange_tcp(*r, &bytes).await,
                    other => other,
                }
            }
        })
        .await;
        match got {
            Ok(Ok(m)) if m.metadata.id == msg.metadata.id => return Some(m),
            Ok(Ok(_)) => tracing::debug!(recursor = %r, "recursor answered another id"),
            Ok(Err(e)) => tracing::debug!(recursor = %r, error = %e, "recursor failed"),
            Err(_) => tracing::debug!(recursor = %r, "recursor timed out"),
        }
    }
    None
}

async fn exchange_udp(to: SocketAddr, q: &[u8]) -> std::io::Result<Message> {
    let bind: SocketAddr = if to.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(bind).await?;
    sock.connect(to).await?;
    sock.send(q).await?;
    let mut buf = vec![0u8; 65535];
    let n = sock.recv(&mut buf).await?;
    parse(&buf[..n])
}

async fn exchange_tcp(to: SocketAddr, q: &[u8]) -> std::io::Result<Message> {
    let mut s = tokio::net::TcpStream::connect(to).await?;
    let mut framed = Vec::with_capacity(q.len() + 2);
    framed.extend_from_slice(&(q.len() as u16).to_be_bytes());
    framed.extend_from_slice(q);
    s.write_all(&framed).await?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await?;
    parse(&buf)
}

fn parse(b: &[u8]) -> std::io::Result<Message> {
    Message::from_vec(b).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
