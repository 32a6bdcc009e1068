//! `flynn-client` under process-wide environment settings, which the crate's unit tests
//! (threads of one process) must not change: this binary is a process of its own, and
//! sets them before it starts any thread of its own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Accepts connections, counts them and answers each one's first request with `answer`.
async fn answering(answer: &'static str) -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    (addr, seen)
}

/// A proxy configured for the job's outbound traffic (`HTTP_PROXY`) is not used to reach
/// discoverd, the host or the log aggregator: it would not reach a loopback address, nor
/// know the cluster's.
#[test]
fn service_traffic_does_not_go_through_the_http_proxy() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (proxy, proxied) =
            answering("HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        let (service, served) = answering(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n[]",
        )
        .await;
        // The clients read the proxy settings when they are built. Only this thread runs.
        for var in ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
            std::env::set_var(var, format!("http://{proxy}"));
        }
        for var in ["NO_PROXY", "no_proxy"] {
            std::env::remove_var(var);
        }
        let c = flynn_client::discoverd::Client::new(&format!("http://{service}"));
        let list = c.instances("s").await;
        assert_eq!(proxied.load(Ordering::SeqCst), 0, "went through the proxy");
        assert!(list.expect("answered by the service").is_empty());
        assert_eq!(served.load(Ordering::SeqCst), 1);
    });
}
