//! Server-Sent Events (spec §0.3, §2.5): replay, live events, 30 s keep-alive comments,
//! `event: error` when the subscriber is dropped or a snapshot replaces the state.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use flynn_api::ApiError;

use crate::node::Node;
use crate::store::types::Kinds;

const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// `data: <json line>\n` per line, then a blank line.
pub fn frame(json: &str) -> String {
    let mut s = String::with_capacity(json.len() + 8);
    for line in json.split('\n') {
        s.push_str("data: ");
        s.push_str(line);
        s.push('\n');
    }
    s.push('\n');
    s
}

/// A watch of `service`, or 503 when `--max-watches` are open already.
pub fn stream(node: &Node, service: &str, kinds: Kinds) -> Result<Response, Response> {
    // Held by the body: released when the stream ends or its client goes away.
    let Ok(permit) = node.watches.clone().try_acquire_owned() else {
        return Err(super::ApiErr(
            ApiError::new(
                flynn_api::ErrorCode::ServiceUnavailable,
                "discoverd: too many watches",
            )
            .with_retry(true),
        )
        .into_response());
    };
    let rx = node.shared.lock().registry.subscribe(service, kinds, true);
    let body = futures_util::stream::unfold(Some((rx, permit)), |rx| async move {
        let (mut rx, permit) = rx?;
        let chunk = match tokio::time::timeout(KEEP_ALIVE, rx.recv()).await {
            Err(_) => ":\n".to_string(),
            Ok(None) => return None,
            Ok(Some(Ok(ev))) => frame(&serde_json::to_string(&ev).unwrap_or_default()),
            Ok(Some(Err(msg))) => {
                let chunk = format!("event: error\ndata: {msg}\n\n");
                return Some((Ok::<_, Infallible>(Bytes::from(chunk)), None));
            }
        };
        Some((Ok(Bytes::from(chunk)), Some((rx, permit))))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response())
}
