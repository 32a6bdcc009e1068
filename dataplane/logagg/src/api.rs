//! The HTTP API (spec §3.4): log history and follow (NDJSON, or SSE on
//! `Accept: text/event-stream`), host cursors, snapshots for peers, status and metrics.
//! Runs on its own thread with a small tokio runtime; it reads the store under the same
//! short shard locks ingest uses and never blocks a worker for long.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use flynn_api::{ApiError, Status};
use flynn_syslog::Stream;
use futures_util::stream;

use crate::ingest::Shared;
use crate::line::{stream_bit, write_json, write_skip_marker, Filter, Line};
use crate::peer;
use crate::store::{Follow, Positions, Store};

/// Largest `lines` a reader may ask for (spec §3.4).
pub const MAX_LINES: usize = 10_000;
/// Lines per chunk (a stalled follower holds the chunks hyper has queued, two at most).
const CHUNK_LINES: usize = 512;
/// A chunk ends with the line that takes it to this many bytes or past: 512 lines of
/// 11,000-byte frames, escaped (a control byte renders as six), would be tens of MB held
/// per follower that stops reading. One line (JSON-escaped frame) may go past it.
const CHUNK_BYTES: usize = 256 * 1024;
/// Records per `/snapshot` chunk at most (each chunk also ends once past [`CHUNK_BYTES`]).
const SNAPSHOT_LINES: usize = 1000;
const PEER_KEEPALIVE: Duration = Duration::from_secs(10);

pub struct ApiErr(pub ApiError);

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            // `%` and two hex digits; anything else stays as it is (`from_str_radix` alone
            // would also take `%+f`).
            b'%' if i + 2 < b.len()
                && b[i + 1].is_ascii_hexdigit()
                && b[i + 2].is_ascii_hexdigit() =>
            {
                let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
                out.push(hex(b[i + 1]) << 4 | hex(b[i + 2]));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Query pairs. A repeated key keeps its first value (Go's `FormValue`, as Flynn reads
/// `lines`, `follow`, `job_id` and `stream_types`), except `process_type`, whose last value
/// wins (spec §3.4).
fn query_map(q: Option<&str>) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = pct_decode(k);
        if k == "process_type" || !m.contains_key(&k) {
            m.insert(k, pct_decode(v));
        }
    }
    m
}

/// A parsed `/log` request.
#[derive(Debug, PartialEq)]
pub struct LogQuery {
    pub lines: usize,
    pub follow: bool,
    pub filter: Filter,
}

pub fn parse_log_query(q: Option<&str>) -> Result<LogQuery, ApiError> {
    let m = query_map(q);
    let lines = match m.get("lines").map(String::as_str) {
        None | Some("") => 0,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if n <= MAX_LINES => n,
            _ => {
                return Err(ApiError::validation(
                    Some("lines"),
                    "must be an integer between 0 and 10000",
                ))
            }
        },
    };
    let streams = match m.get("stream_types").map(String::as_str) {
        None | Some("") => None,
        Some(s) => Some(
            s.split(',')
                .filter_map(|t| Stream::parse(t.trim()))
                .fold(0u8, |a, s| a | stream_bit(s)),
        ),
    };
    let job_id = m.get("job_id").filter(|j| !j.is_empty()).cloned();
    Ok(LogQuery {
        lines,
        follow: m.get("follow").is_some_and(|f| f == "true"),
        filter: Filter {
            job_id,
            process_type: m.get("process_type").cloned(),
            streams,
        },
    })
}

fn render(out: &mut Vec<u8>, sse: bool, line: &Line) {
    if sse {
        out.extend_from_slice(b"data: ");
    }
    write_json(out, line);
    out.extend_from_slice(if sse { b"\n\n" } else { b"\n" });
}

fn render_skip(out: &mut Vec<u8>, sse: bool, n: u64) {
    if sse {
        out.extend_from_slice(b"event: skipped\ndata: ");
    }
    write_skip_marker(out, n);
    out.extend_from_slice(if sse { b"\n\n" } else { b"\n" });
}

struct Follower {
    store: Arc<Store>,
    app: Vec<u8>,
    filter: Filter,
    sse: bool,
    keepalive: Duration,
    /// History still to send, rendered a chunk at a time; `None` once the first chunk
    /// went out and nothing is left.
    hist: Option<std::vec::IntoIter<Line>>,
    next: u64,
    reg: Follow,
}

/// Renders the next lines of `hist` (up to [`CHUNK_LINES`] and [`CHUNK_BYTES`]), if any
/// are left. History goes out a chunk at a time like live lines: rendered whole it was a
/// second, larger copy of every line (JSON escaping can make a line several times longer)
/// held until a slow reader took it, and the API thread rendered it all before serving
/// anyone else.
fn history_chunk(hist: &mut std::vec::IntoIter<Line>, sse: bool) -> Option<Bytes> {
    let mut out = Vec::new();
    for l in hist.by_ref().take(CHUNK_LINES) {
        render(&mut out, sse, &l);
        if out.len() >= CHUNK_BYTES {
            break;
        }
    }
    (!out.is_empty()).then(|| Bytes::from(out))
}

/// Written when a follow stream has been quiet for a while, so that a proxy's read
/// timeout (nginx's 60 s, the router's idle timeout on HTTP/2) does not cut a quiet
/// follow: a comment in SSE, a blank line in NDJSON (readers skip blank lines; Go's
/// `json.Decoder` skips whitespace).
fn keepalive(sse: bool) -> Bytes {
    Bytes::from_static(if sse { b":\n" } else { b"\n" })
}

async fn next_chunk(mut f: Follower) -> Option<(Result<Bytes, Infallible>, Follower)> {
    if let Some(hist) = f.hist.as_mut() {
        match history_chunk(hist, f.sse) {
            Some(h) => return Some((Ok(h), f)),
            None => f.hist = None,
        }
    }
    // Let the API thread's other tasks run between chunks: while an app floods, a
    // follower that reads fast always has a chunk ready and a writable socket, and hyper
    // would otherwise keep rendering for it (up to tokio's whole coop budget, ~128
    // chunks) before any other follower on this thread is woken.
    tokio::task::yield_now().await;
    let notify = f.reg.notify.clone();
    // From the last chunk written: lines the filter rejects do not put it off.
    let quiet_until = tokio::time::Instant::now() + f.keepalive;
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let b = f
            .store
            .read_from_within(&f.app, f.next, &f.filter, CHUNK_LINES, CHUNK_BYTES);
        f.next = b.next;
        if !b.lines.is_empty() || b.skipped > 0 {
            let mut out = Vec::with_capacity((b.lines.len() * 256).min(CHUNK_BYTES));
            if b.skipped > 0 {
                render_skip(&mut out, f.sse, b.skipped);
            }
            for l in &b.lines {
                if out.len() >= CHUNK_BYTES {
                    // Full: the rest is read again for the next chunk (the ring's numbers
                    // are consecutive, so `skipped` counted only numbers before the first
                    // line, and a line evicted meanwhile is counted as skipped then).
                    f.next = l.seq;
                    break;
                }
                render(&mut out, f.sse, l);
            }
            return Some((Ok(Bytes::from(out)), f));
        }
        if b.behind {
            // Only lines the filter rejects so far, and more after them whose wake-up
            // has already fired: keep reading (letting other tasks run between scans)
            // until caught up, and only then wait.
            if tokio::time::Instant::now() >= quiet_until {
                return Some((Ok(keepalive(f.sse)), f));
            }
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(quiet_until) => return Some((Ok(keepalive(f.sse)), f)),
        }
    }
}

async fn get_log(
    State(sh): State<Arc<Shared>>,
    app: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiErr> {
    // A channel id that does not percent-decode to UTF-8 gets the JSON envelope, not
    // axum's plain-text rejection.
    let Path(app) = app.map_err(|e| {
        ApiErr(ApiError::validation(
            Some("channel_id"),
            &format!("is not a valid path segment: {}", e.body_text()),
        ))
    })?;
    let q = parse_log_query(q.as_deref()).map_err(ApiErr)?;
    let sse = headers
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.contains("text/event-stream")));
    let ctype = if sse {
        "text/event-stream; charset=utf-8"
    } else {
        "application/x-ndjson"
    };
    let (hist, next, reg) = sh
        .store
        .history(app.as_bytes(), &q.filter, q.lines, q.follow);
    // Follow with lines=0 means live lines only (spec §3.4): the store copies none.
    let body = match reg {
        Some(reg) => {
            let f = Follower {
                store: sh.store.clone(),
                app: app.into_bytes(),
                filter: q.filter,
                sse,
                keepalive: sh.stream_keepalive,
                hist: Some(hist.into_iter()),
                next,
                reg,
            };
            Body::from_stream(stream::unfold(f, next_chunk))
        }
        None => Body::from_stream(stream::unfold(hist.into_iter(), move |mut h| async move {
            // Other requests on the API thread get a turn between chunks.
            tokio::task::yield_now().await;
            history_chunk(&mut h, sse).map(|b| (Ok::<_, Infallible>(b), h))
        })),
    };
    Ok((
        [
            (header::CONTENT_TYPE, ctype),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response())
}

async fn cursors(State(sh): State<Arc<Shared>>) -> Response {
    let m: flynn_api::logagg::Cursors = sh
        .store
        .cursors()
        .into_iter()
        .map(|(host, c)| {
            let time = c.time.to_rfc3339();
            (host, flynn_api::logagg::Cursor { time, seq: c.seq })
        })
        .collect();
    Json(m).into_response()
}

struct SnapshotState {
    store: Arc<Store>,
    pos: Positions,
    /// Every app's next sequence number when the snapshot began: the end marker goes out
    /// once `pos` reaches it, however fast lines keep arriving after.
    horizon: HashMap<Box<[u8]>, u64>,
    live: bool,
    follow: Option<crate::store::FollowAll>,
    done: bool,
}

async fn next_snapshot(mut s: SnapshotState) -> Option<(Result<Bytes, Infallible>, SnapshotState)> {
    if s.done {
        return None;
    }
    let store = s.store.clone();
    loop {
        if !s.live && store.reached(&s.pos, &s.horizon) {
            s.live = true;
            s.done = s.follow.is_none();
            return Some((Ok(Bytes::from_static(peer::END)), s));
        }
        let notified = store.any_notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        store.any_read_begins();
        // A chunk ends at 1000 records or once its app names and frames pass `CHUNK_BYTES`
        // (plus one record, and the records' headers), as a follower's does: a peer that
        // stops reading pins one chunk, not 1000 frames. An empty batch means every app was
        // read to its end (`read_all_fair` gives every app a turn unless a bound stops it).
        let batch = store.read_all_fair(&mut s.pos, SNAPSHOT_LINES, CHUNK_BYTES);
        if !batch.is_empty() {
            let mut out = Vec::with_capacity(batch.len() * 256);
            for (app, l) in &batch {
                peer::encode_line(&mut out, app, l);
            }
            return Some((Ok(Bytes::from(out)), s));
        }
        if !s.live {
            s.live = true;
            s.done = s.follow.is_none();
            return Some((Ok(Bytes::from_static(peer::END)), s));
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(PEER_KEEPALIVE) => return Some((Ok(Bytes::from_static(peer::KEEPALIVE)), s)),
        }
    }
}

async fn snapshot(State(sh): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    let follow = query_map(q.as_deref())
        .get("follow")
        .is_some_and(|f| f == "true");
    // Followers first, so no line arrives between the horizon and the registration unseen
    // (lines are read by position anyway; the registration only wakes the stream).
    let follow = follow.then(|| sh.store.follow_all());
    let st = SnapshotState {
        store: sh.store.clone(),
        pos: Positions::default(),
        horizon: sh.store.heads(),
        live: false,
        follow,
        done: false,
    };
    (
        [(header::CONTENT_TYPE, peer::CONTENT_TYPE)],
        Body::from_stream(stream::unfold(st, next_snapshot)),
    )
        .into_response()
}

async fn status(State(sh): State<Arc<Shared>>) -> Response {
    let drivers: Vec<&str> = sh
        .drivers
        .iter()
        .map(|d| d.get().copied().unwrap_or("starting"))
        .collect();
    let stats = sh.store.stats();
    let body = Status::healthy(
        env!("CARGO_PKG_VERSION"),
        Some(serde_json::json!({
            "apps": stats.len(),
            "lines": stats.iter().map(|a| a.lines).sum::<usize>(),
            "memory_bytes": sh.store.memory(),
            "memory_limit_bytes": sh.store.limits().max_memory,
            "workers": drivers,
        })),
    );
    let mut text = serde_json::to_string_pretty(&body).unwrap_or_default();
    text.push('\n');
    ([(header::CONTENT_TYPE, "application/json")], text).into_response()
}

async fn metrics_text(State(sh): State<Arc<Shared>>) -> Response {
    let names = sh.source_names();
    let sources: Vec<_> = names.into_iter().zip(sh.counters.iter()).collect();
    let text = crate::metrics::render(&sources, &sh.store);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn not_found() -> ApiErr {
    ApiErr(ApiError::not_found("not found"))
}

/// A known path with a method it does not serve: 405 (axum still adds `Allow`) with the
/// JSON envelope. Spec §0.1 has no code for 405, so the body says `validation_error`,
/// the code for a request this server will not take as sent.
async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(ApiError::validation(None, "method not allowed")),
    )
        .into_response()
}

pub fn router(sh: Arc<Shared>) -> Router {
    Router::new()
        .route("/log/{app}", get(get_log))
        .route("/cursors", get(cursors))
        .route("/snapshot", get(snapshot))
        .route("/.well-known/status", get(status))
        .route("/metrics", get(metrics_text))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(sh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Limits;
    use flynn_syslog::{parse_fields, Timestamp};

    /// A store of `lines_per_app` lines per app and no memory cap.
    fn uncapped(lines_per_app: usize) -> Arc<Store> {
        Arc::new(Store::new(Limits {
            lines_per_app,
            max_memory: usize::MAX,
        }))
    }

    /// A snapshot's end marker comes once every line stored when it began was sent, even
    /// while one app takes more lines per read than a read returns (it used to come only
    /// when a read found nothing new, so a starting peer could wait for good).
    #[tokio::test]
    async fn snapshot_ends_under_ingest_faster_than_it_reads() {
        let store = uncapped(100_000);
        let seq = std::cell::Cell::new(0i64);
        let put = |app: &str| {
            let i = seq.get() + 1;
            seq.set(i);
            let ts = Timestamp(1_257_894_000_000_000_000 + i * 1000).to_rfc3339();
            let frame = format!("<190>1 {ts} h {app} web.j ID1 [flynn seq=\"{i}\"] l{i}");
            let f = parse_fields(frame.as_bytes()).unwrap();
            store.insert(app.as_bytes(), frame.as_bytes(), &f, f.ts.unwrap());
        };
        let quiet: Vec<String> = (0..20).map(|i| format!("quiet{i}")).collect();
        for q in &quiet {
            for _ in 0..50 {
                put(q);
            }
        }
        for _ in 0..2_000 {
            put("busy");
        }
        let mut st = SnapshotState {
            store: store.clone(),
            pos: Positions::default(),
            horizon: store.heads(),
            live: false,
            follow: Some(store.follow_all()),
            done: false,
        };
        let mut quiet_lines = 0;
        let mut ended = false;
        for _ in 0..200 {
            // More new lines for the busy app than one read returns.
            for _ in 0..1_500 {
                put("busy");
            }
            let (chunk, next) = tokio::time::timeout(Duration::from_secs(1), next_snapshot(st))
                .await
                .expect("snapshot stalled")
                .unwrap();
            st = next;
            let chunk = chunk.unwrap();
            if &chunk[..] == peer::END {
                ended = true;
                break;
            }
            quiet_lines += chunk
                .windows(b" quiet".len())
                .filter(|w| w == b" quiet")
                .count();
        }
        assert!(ended, "no end marker while the busy app kept growing");
        // Each quiet line's record names its app once (the record's app field) and once in
        // its frame's APP-NAME: every one of them was sent before the end marker.
        assert_eq!(quiet_lines, 2 * 20 * 50);
    }

    /// A snapshot chunk ends once past [`CHUNK_BYTES`] (plus one record), however large
    /// the frames; the chunks still carry every line once, and then the end marker.
    #[tokio::test]
    async fn snapshot_chunks_are_bounded_in_bytes() {
        let store = uncapped(10_000);
        let body = "x".repeat(60_000);
        let mut one_record = 0;
        for i in 0..200i64 {
            let app = format!("app{}", i % 5);
            let ts = Timestamp(1_257_894_000_000_000_000 + i * 1000).to_rfc3339();
            let frame = format!("<190>1 {ts} h {app} web.j ID1 - {i} {body}");
            let f = parse_fields(frame.as_bytes()).unwrap();
            store.insert(app.as_bytes(), frame.as_bytes(), &f, f.ts.unwrap());
            let mut rec = Vec::new();
            peer::encode_line(
                &mut rec,
                app.as_bytes(),
                &Line::new(1, f.ts.unwrap(), frame.as_bytes(), &f),
            );
            one_record = one_record.max(rec.len());
        }
        let mut st = SnapshotState {
            store: store.clone(),
            pos: Positions::default(),
            horizon: store.heads(),
            live: false,
            follow: None,
            done: false,
        };
        let framer = flynn_syslog::Framer::new(65_535 + 256);
        let mut got = Vec::new();
        loop {
            let (chunk, next) = tokio::time::timeout(Duration::from_secs(1), next_snapshot(st))
                .await
                .expect("snapshot stalled")
                .unwrap();
            st = next;
            let chunk = chunk.unwrap();
            if &chunk[..] == peer::END {
                break;
            }
            assert!(
                chunk.len() <= CHUNK_BYTES + one_record,
                "a chunk of {} bytes",
                chunk.len()
            );
            let mut buf = bytes::BytesMut::from(&chunk[..]);
            while let Some(rec) = framer.next_frame(&mut buf).unwrap() {
                let Some(peer::Record::Line { frame, .. }) = peer::decode(&rec) else {
                    panic!("not a line record");
                };
                let msg = String::from_utf8_lossy(frame);
                let i = msg.split(" - ").nth(1).unwrap().split(' ').next().unwrap();
                got.push(i.parse::<u32>().unwrap());
            }
            assert!(buf.is_empty(), "a record split over two chunks");
        }
        got.sort_unstable();
        assert_eq!(got, (0..200).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn filtered_follower_reads_past_a_long_run_of_other_lines() {
        // The matching line sits behind far more than one scan's worth of other lines, and
        // every insert's wake-up fired before the follower looked: it must keep reading
        // while behind instead of waiting for the next wake-up (or the 30 s keep-alive).
        let store = uncapped(10_000);
        let filter = Filter {
            job_id: Some("want".into()),
            ..Filter::default()
        };
        let (_, next, reg) = store.history(b"a", &filter, 0, true);
        let put = |job: &str, i: i64| {
            let ts = Timestamp(1_257_894_000_000_000_000 + i * 1000).to_rfc3339();
            let frame = format!("<190>1 {ts} h a web.{job} ID1 [flynn seq=\"{i}\"] l{i}");
            let f = parse_fields(frame.as_bytes()).unwrap();
            store.insert(b"a", frame.as_bytes(), &f, f.ts.unwrap());
        };
        for i in 0..3_000 {
            put("other", i);
        }
        put("want", 3_000);
        let f = Follower {
            store: store.clone(),
            app: b"a".to_vec(),
            filter,
            sse: false,
            keepalive: Duration::from_secs(30),
            hist: None,
            next,
            reg: reg.unwrap(),
        };
        let (chunk, f) = tokio::time::timeout(Duration::from_secs(1), next_chunk(f))
            .await
            .expect("the follower stalled")
            .unwrap();
        let chunk = chunk.unwrap();
        let text = String::from_utf8_lossy(&chunk);
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("\"msg\":\"l3000\""), "{text}");
        assert_eq!(f.next, 3_002);
    }

    /// A follower that stops reading holds one rendered chunk: at most [`CHUNK_BYTES`] plus
    /// one line, however long and escape-heavy the lines, for history and live lines alike;
    /// the chunks together still carry every line once, in order.
    #[tokio::test]
    async fn follow_chunks_are_bounded_in_bytes() {
        let store = uncapped(10_000);
        // 10,000 control bytes: each renders as six (`\u0001`).
        let body = "\u{1}".repeat(10_000);
        let put = |i: i64| {
            let ts = Timestamp(1_257_894_000_000_000_000 + i * 1000).to_rfc3339();
            let frame = format!("<190>1 {ts} h a web.j ID1 [flynn seq=\"{i}\"] {i} {body}");
            let f = parse_fields(frame.as_bytes()).unwrap();
            store.insert(b"a", frame.as_bytes(), &f, f.ts.unwrap());
        };
        let one_line = 6 * 10_000 + 256;
        for i in 0..100 {
            put(i);
        }
        let all = Filter::default();
        let (hist, next, reg) = store.history(b"a", &all, 100, true);
        let mut f = Follower {
            store: store.clone(),
            app: b"a".to_vec(),
            filter: all,
            sse: false,
            keepalive: Duration::from_secs(30),
            hist: Some(hist.into_iter()),
            next,
            reg: reg.unwrap(),
        };
        for i in 100..200 {
            put(i);
        }
        let mut got = Vec::new();
        while got.len() < 200 {
            let (chunk, next) = tokio::time::timeout(Duration::from_secs(1), next_chunk(f))
                .await
                .expect("the follower stalled")
                .unwrap();
            f = next;
            let chunk = chunk.unwrap();
            assert!(
                chunk.len() <= CHUNK_BYTES + one_line,
                "a chunk of {} bytes",
                chunk.len()
            );
            for l in String::from_utf8_lossy(&chunk).lines() {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let msg = v["msg"].as_str().unwrap();
                got.push(msg.split_once(' ').unwrap().0.parse::<u32>().unwrap());
            }
        }
        assert_eq!(got, (0..200).collect::<Vec<_>>());
    }

    #[test]
    fn percent_decoding() {
        for (raw, want) in [
            ("a%20b", "a b"),
            ("a+b", "a b"),
            ("%2fx%2F", "/x/"),
            ("%e2%9c%93", "\u{2713}"),
            ("%", "%"),
            ("%4", "%4"),
            ("x%4", "x%4"),
            ("%zz", "%zz"),
            ("%+f", "% f"),
            ("%-1", "%-1"),
            ("%ff", "\u{fffd}"),
        ] {
            assert_eq!(pct_decode(raw), want, "{raw}");
        }
    }

    #[test]
    fn log_query_table() {
        let ok = |q: &str| parse_log_query(Some(q)).unwrap();
        assert_eq!(
            ok(""),
            LogQuery {
                lines: 0,
                follow: false,
                filter: Filter::default()
            }
        );
        let q = ok("lines=10&follow=true&job_id=abc&process_type=&stream_types=stdout,stderr");
        assert_eq!((q.lines, q.follow), (10, true));
        assert_eq!(q.filter.job_id.as_deref(), Some("abc"));
        assert_eq!(q.filter.process_type.as_deref(), Some(""));
        assert_eq!(q.filter.streams, Some(3));
        assert_eq!(
            ok("process_type=web&process_type=worker")
                .filter
                .process_type
                .as_deref(),
            Some("worker")
        );
        // Other repeated keys keep their first value, as Go's `FormValue`.
        let q = ok("lines=2&lines=x&job_id=a&job_id=b&follow=true&follow=false");
        assert_eq!((q.lines, q.follow), (2, true));
        assert_eq!(q.filter.job_id.as_deref(), Some("a"));
        assert_eq!(ok("job_id=a%2Db+c").filter.job_id.as_deref(), Some("a-b c"));
        assert_eq!(ok("lines=10000").lines, 10_000);
        for bad in ["lines=10001", "lines=-1", "lines=x", "lines=1.5"] {
            let e = parse_log_query(Some(bad)).unwrap_err();
            assert_eq!(e.status(), 400);
            assert_eq!(
                e.detail,
                Some(serde_json::json!({"field": "lines"})),
                "{bad}"
            );
        }
    }
}
