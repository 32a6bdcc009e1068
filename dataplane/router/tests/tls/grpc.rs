//! gRPC-style streams through a `grpc: true` route: HTTP/2 end to end, DATA in both
//! directions interleaved, trailers passed through. Client and backend are the `h2`
//! crate on tokio, over the router's h2c listener.

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

use crate::support::Router;

async fn backend() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((sock, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(sock).await.unwrap();
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    tokio::spawn(async move {
                        let xff = req.headers().get("x-forwarded-for").cloned();
                        let path = req.uri().path().to_string();
                        let mut body = req.into_body();
                        let resp = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .header("x-path", path)
                            .body(())
                            .unwrap();
                        let mut send = respond.send_response(resp, false).unwrap();
                        // Echo every frame as soon as it arrives (bidirectional).
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            send.send_data(chunk, false).unwrap();
                        }
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        if let Some(x) = xff {
                            trailers.insert("x-seen-xff", x);
                        }
                        send.send_trailers(trailers).unwrap();
                    });
                }
            });
        }
    });
    addr
}

#[test]
fn grpc_bidirectional_stream_with_trailers() {
    let router = Router::builder()
        .arg("--h2c-addr")
        .arg("127.0.0.1:0")
        .start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let b = backend().await;
        let (st, _) = router.api(
            "POST",
            "/routes",
            Some(
                &json!({"type":"http","domain":"grpc.example.com","service":"g","grpc":true})
                    .to_string(),
            ),
        );
        assert_eq!(st, 200);
        router.set_backend_addrs("g", &[(b.to_string(), false)]);

        let sock = tokio::net::TcpStream::connect(router.h2c_addrs[0])
            .await
            .unwrap();
        let (client, conn) = h2::client::handshake(sock).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut client = client.ready().await.unwrap();
        let req = http::Request::builder()
            .method("POST")
            .uri("http://grpc.example.com/echo.Echo/Chat")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let (resp, mut send) = client.send_request(req, false).unwrap();
        send.send_data(Bytes::from_static(b"ping-1"), false)
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("response headers")
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-path"], "/echo.Echo/Chat");
        let mut body = resp.into_body();
        for i in 1..=3 {
            let got = tokio::time::timeout(Duration::from_secs(5), body.data())
                .await
                .expect("echo")
                .unwrap()
                .unwrap();
            let _ = body.flow_control().release_capacity(got.len());
            assert_eq!(
                got,
                format!("ping-{i}").as_bytes(),
                "frame {i} echoed before the request ends"
            );
            if i < 3 {
                send.send_data(Bytes::from(format!("ping-{}", i + 1)), false)
                    .unwrap();
            }
        }
        send.send_data(Bytes::new(), true).unwrap();
        assert!(tokio::time::timeout(Duration::from_secs(5), body.data())
            .await
            .unwrap()
            .is_none());
        let trailers = tokio::time::timeout(Duration::from_secs(5), body.trailers())
            .await
            .unwrap()
            .unwrap()
            .expect("trailers");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-seen-xff"], "127.0.0.1");
    });
}
