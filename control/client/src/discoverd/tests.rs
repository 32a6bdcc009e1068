//! Tests of the discoverd client: requests, heartbeats and watches against a stand-in.

use tokio::sync::mpsc;

use super::heartbeat::{REGISTER_ATTEMPTS, REGISTER_FOR, REGISTER_TIMEOUT};
use super::replay::{reconcile, Known, Unreadable};
use super::watch::WATCH_ANSWER;
use super::*;

fn inst(id: &str, meta: &str) -> Instance {
    let mut m = BTreeMap::new();
    if !meta.is_empty() {
        m.insert("k".to_string(), meta.to_string());
    }
    Instance {
        id: id.into(),
        addr: "127.0.0.1:1".into(),
        proto: "tcp".into(),
        meta: m,
        index: 1,
    }
}

/// [`reconcile`] of a replay read whole.
fn resync(known: &mut Known, replay: Vec<Event>) -> Vec<Event> {
    reconcile("s", known, replay, &Unreadable::default())
}

/// An environment with nothing set.
fn no_env(_: &str) -> Option<String> {
    None
}

fn up(i: Instance) -> Event {
    Event {
        service: "s".into(),
        kind: EventKind::Up,
        instance: Some(i),
        service_meta: None,
    }
}

/// Service names and instance ids that a path would not carry as they are (`web?x`
/// named `web`, `..` the parent) are refused before anything is sent.
#[tokio::test]
async fn invalid_names_are_refused_before_sending() {
    use std::sync::atomic::Ordering;
    let (url, seen) =
        stand_in(|_, _| Some(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec())).await;
    let c = Client::new(&url);
    let invalid = |r: Result<(), Error>, what: &str| {
        assert!(matches!(r, Err(Error::Invalid { .. })), "{what}: {r:?}");
    };
    for bad in [
        "web?x",
        "web/instances",
        "",
        "..",
        "Web",
        "web#x",
        "we b",
        "web%2f",
    ] {
        invalid(c.remove_service(bad).await, bad);
        invalid(c.add_service(bad, "oldest").await, bad);
        invalid(c.instances(bad).await.map(drop), bad);
        invalid(c.get_meta(bad).await.map(drop), bad);
        invalid(c.get_meta_consistent(bad).await.map(drop), bad);
        let meta = ServiceMeta {
            data: serde_json::Value::Null,
            leader_id: None,
            index: 0,
        };
        invalid(c.set_meta(bad, &meta).await.map(drop), bad);
        invalid(c.set_leader(bad, "x").await, bad);
        invalid(c.leader(bad).await.map(drop), bad);
        invalid(c.unregister(bad, "abc").await, bad);
    }
    for bad in ["..", "a?b", "a/b", "", "a#b", "a%2f"] {
        invalid(c.unregister("web", bad).await, bad);
        let inst = Instance {
            id: bad.to_string(),
            addr: "127.0.0.1:80".into(),
            proto: "tcp".into(),
            ..Default::default()
        };
        if !bad.is_empty() {
            invalid(c.register("web", &inst).await, bad);
            invalid(c.heartbeat_with("web", inst, no_env).await.map(drop), bad);
        }
    }
    // A watch of an invalid name ends at once (it watched `web` for `web?x`, and
    // retried a name the server refuses for ever).
    for bad in ["web?x", "Web", ""] {
        let mut w = c.watch(bad);
        let end = tokio::time::timeout(Duration::from_secs(10), w.next()).await;
        assert!(matches!(end, Ok(None)), "{bad}: {end:?}");
    }
    assert_eq!(seen.load(Ordering::SeqCst), 0, "a request was sent");
    // Valid names go through.
    c.remove_service("web-1").await.unwrap();
    c.unregister("web-1", "0123abcdef").await.unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 2);
}

/// A discoverd stand-in: reads whole requests (head and body) and answers the n-th
/// (from 0) with `answer(n, request line)`, or never when that is `None`. Counts the
/// requests.
async fn stand_in(
    answer: impl Fn(usize, &str) -> Option<Vec<u8>> + Send + Sync + 'static,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    stand_in_with(move |n, line, _| answer(n, line)).await
}

/// [`stand_in`] whose `answer` also gets the request's body.
async fn stand_in_with(
    answer: impl Fn(usize, &str, &[u8]) -> Option<Vec<u8>> + Send + Sync + 'static,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    stand_in_after(Duration::ZERO, answer).await
}

/// [`stand_in_with`] that answers each request `delay` after it came (a slow node).
async fn stand_in_after(
    delay: Duration,
    answer: impl Fn(usize, &str, &[u8]) -> Option<Vec<u8>> + Send + Sync + 'static,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let seen = std::sync::Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    let answer = std::sync::Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (count, answer) = (count.clone(), answer.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // One request: its head, then its body.
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < end + 4 + len {
                        match s.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    }
                    let body: Vec<u8> = buf.drain(..end + 4 + len).skip(end + 4).collect();
                    let line = head.lines().next().unwrap_or("").to_string();
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    let Some(resp) = answer(n, &line, &body) else {
                        // A peer that stopped answering.
                        std::future::pending::<()>().await;
                        return;
                    };
                    tokio::time::sleep(delay).await;
                    if s.write_all(&resp).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

/// A discoverd stand-in that answers the first request and never any later one.
async fn answers_once() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    stand_in(|n, _| (n == 0).then(|| b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_vec()))
        .await
}

#[tokio::test]
async fn a_heartbeat_that_gets_no_answer_is_given_up_and_retried() {
    let (url, seen) = answers_once().await;
    let c = Client::new(&url);
    let hb = c
        .heartbeat_with("s", inst("", ""), no_env)
        .await
        .expect("the first registration is answered");
    // The next heartbeat (3–5 s later) hangs; it is given up after its timeout and
    // tried again at once, instead of waiting out the 30 s request timeout.
    let t0 = std::time::Instant::now();
    while seen.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(12),
            "heartbeats stuck behind a request that gets no answer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    hb.abandon().await;
}

/// A discoverd that accepts the registration's connections and never answers: the
/// registration fails within its minute (each try is cut at [`REGISTER_TIMEOUT`]; it
/// took five 30 s request timeouts, 150 s).
///
/// The clock is paused and advances by itself when nothing is ready, real sockets
/// included: a connection the kernel has not completed at that instant can see its 2 s
/// connect timeout pass early. Such a try fails as `Http` (and is not counted by the
/// stand-in), so the last try may have failed that way too; the bound holds either way.
#[tokio::test(start_paused = true)]
async fn a_registration_that_gets_no_answer_fails_within_its_bound() {
    use std::sync::atomic::Ordering;
    let (url, seen) = stand_in(|_, _| None).await;
    let t0 = tokio::time::Instant::now();
    let res = Client::new(&url)
        .heartbeat_with("s", inst("", ""), no_env)
        .await;
    let took = t0.elapsed();
    assert!(
        took <= REGISTER_FOR + Duration::from_millis(100),
        "gave up after {took:?}"
    );
    assert!(
        matches!(res, Err(Error::TimedOut { .. } | Error::Http(_))),
        "{:?}",
        res.err()
    );
    assert!(
        took >= REGISTER_FOR - REGISTER_TIMEOUT,
        "gave up after {took:?}"
    );
    let tries = seen.load(Ordering::SeqCst);
    assert!(tries >= REGISTER_ATTEMPTS as usize, "{tries} tries");
}

/// A discoverd slow to answer (5 s: an election, a busy disk) gets the registration
/// sent once, not again every 3 s while the first write is still queued there (which
/// also never succeeded: every try was cut before its answer).
#[tokio::test(start_paused = true)]
async fn a_slow_discoverd_gets_the_registration_once() {
    use std::sync::atomic::Ordering;
    let (url, seen) =
        stand_in_after(Duration::from_secs(5), |_, _, _| Some(json("200 OK", "{}"))).await;
    let hb = Client::new(&url)
        .heartbeat_with("s", inst("", ""), no_env)
        .await
        .expect("registered");
    assert_eq!(seen.load(Ordering::SeqCst), 1, "registration sent again");
    hb.abandon().await;
}

/// Closing a heartbeater whose discoverd stopped answering returns after the
/// unregister's heartbeat limit, not its 30 s request timeout.
#[tokio::test(start_paused = true)]
async fn closing_against_a_discoverd_that_stopped_answering_returns() {
    let (url, _) = answers_once().await;
    let hb = Client::new(&url)
        .heartbeat_with("s", inst("", ""), no_env)
        .await
        .expect("the first registration is answered");
    let t0 = tokio::time::Instant::now();
    hb.close().await;
    let took = t0.elapsed();
    assert!(took <= Duration::from_secs(5), "close took {took:?}");
}

/// The job's variables go into the registered instance's meta; the caller's keys stay
/// and variables set empty are left out.
#[tokio::test]
async fn a_jobs_environment_goes_into_the_instance_meta() {
    use std::sync::{Arc, Mutex};
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let log = bodies.clone();
    let (url, _) = stand_in_with(move |_, line, body| {
        if line.starts_with("put /services/s/instances/") {
            log.lock().unwrap().push(body.to_vec());
        }
        Some(json("200 OK", "{}"))
    })
    .await;
    let env = |name: &str| {
        let value = match name {
            "FLYNN_APP_ID" => "app-1",
            "FLYNN_APP_NAME" => "",
            "FLYNN_RELEASE_ID" => "release-1",
            "FLYNN_PROCESS_TYPE" => "web",
            "FLYNN_JOB_ID" => "host1-job-1",
            _ => return None,
        };
        Some(value.to_string())
    };
    let mut mine = inst("", "v");
    mine.meta
        .insert("FLYNN_PROCESS_TYPE".into(), "set-by-caller".into());
    let hb = Client::new(&url)
        .heartbeat_with("s", mine, env)
        .await
        .expect("registered");
    hb.abandon().await;
    let sent: Instance = serde_json::from_slice(&bodies.lock().unwrap()[0]).unwrap();
    let want: BTreeMap<String, String> = [
        ("FLYNN_APP_ID", "app-1"),
        ("FLYNN_JOB_ID", "host1-job-1"),
        ("FLYNN_PROCESS_TYPE", "set-by-caller"),
        ("FLYNN_RELEASE_ID", "release-1"),
        ("k", "v"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(sent.meta, want);
}

/// One rule for the job's meta, whoever registers the job: its FLYNN_* variables,
/// those set empty left out (the host daemon kept them, the heartbeater did not).
#[test]
fn a_jobs_meta_is_its_flynn_variables_set_and_not_empty() {
    let env = [
        "FLYNN_APP_ID=app-1",
        "FLYNN_APP_NAME=",
        "FLYNN_JOB_ID=host1-job-1",
        "FLYNN_OTHER=x",
        "PORT=80",
        "FLYNN_PROCESS_TYPE=web",
    ];
    let meta = job_meta(env.iter().filter_map(|kv| kv.split_once('=')));
    let want: BTreeMap<String, String> = [
        ("FLYNN_APP_ID", "app-1"),
        ("FLYNN_JOB_ID", "host1-job-1"),
        ("FLYNN_PROCESS_TYPE", "web"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(meta, want);
}

/// A discoverd that accepts the watch's connection and never answers: the watch tries
/// again after [`WATCH_ANSWER`] instead of waiting for ever. (Paused clock and real
/// sockets: a connect timeout passed early is a failed try the stand-in does not see,
/// and only makes the second try later; the bound leaves room for a few.)
#[tokio::test(start_paused = true)]
async fn a_watch_that_gets_no_answer_is_tried_again() {
    use std::sync::atomic::Ordering;
    let (url, seen) = stand_in(|_, _| None).await;
    let w = Client::new(&url).watch("s");
    let t0 = tokio::time::Instant::now();
    while seen.load(Ordering::SeqCst) < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(25),
            "no second try in 25 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(t0.elapsed() >= WATCH_ANSWER, "{:?}", t0.elapsed());
    drop(w);
}

/// The headers of a stream: no length, the body ends when the connection does.
const SSE_HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n";

/// One SSE item carrying `data`.
fn item(data: &str) -> String {
    format!("data: {data}\n\n")
}

const CURRENT: &str = r#"{"service":"s","kind":"current"}"#;

/// An `up` of a known kind the client cannot read (its index is a string), for `id`.
fn unreadable_up(id: &str) -> String {
    format!(
        r#"{{"service":"s","kind":"up","instance":{{"id":"{id}","addr":"127.0.0.1:1","proto":"tcp","index":"one"}}}}"#
    )
}

/// The JSON of an `up` for `i`.
fn up_json(i: Instance) -> String {
    serde_json::to_string(&up(i)).unwrap()
}

/// Takes the watch's next event, failing after 5 s.
async fn next_within(w: &mut Watch) -> Event {
    tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("no event in 5 s")
        .expect("the watch ended")
}

/// A live event of a known kind the client cannot read ends the stream: the next one's
/// replay says what it was (it was skipped, and a server silent after it held the
/// watch for the 70 s idle limit).
#[tokio::test]
async fn an_undecodable_live_event_ends_the_stream() {
    use std::sync::atomic::Ordering;
    let answer = format!("{SSE_HEAD}{}{}", item(CURRENT), item(&unreadable_up("x")));
    let (url, seen) = stand_in(move |_, _| Some(answer.clone().into_bytes())).await;
    let mut w = Client::new(&url).watch("s");
    assert_eq!(next_within(&mut w).await.kind, EventKind::Current);
    let t0 = std::time::Instant::now();
    while seen.load(Ordering::SeqCst) < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "no reconnect after an undecodable event"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An event of a kind this client does not know (a newer discoverd's) is skipped: the
/// stream goes on and the events after it arrive (it ended the stream, and the next
/// one ended on it again, for ever).
#[tokio::test]
async fn an_event_of_an_unknown_kind_is_skipped() {
    use std::sync::atomic::Ordering;
    let answer = format!(
        "{SSE_HEAD}{}{}{}{}",
        item(&up_json(inst("a", ""))),
        item(CURRENT),
        item(r#"{"service":"s","kind":"weather","instance":{"id":7}}"#),
        item(&up_json(inst("b", ""))),
    );
    let (url, seen) = stand_in(move |_, _| Some(answer.clone().into_bytes())).await;
    let mut w = Client::new(&url).watch("s");
    let mut got = Vec::new();
    for _ in 0..3 {
        let ev = next_within(&mut w).await;
        got.push((ev.kind, ev.instance.map(|i| i.id)));
    }
    assert_eq!(
        got,
        [
            (EventKind::Up, Some("a".into())),
            (EventKind::Current, None),
            (EventKind::Up, Some("b".into())),
        ]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(seen.load(Ordering::SeqCst), 1, "reconnected");
}

/// An instance whose `up` in the replay after a reconnect cannot be read is not reported
/// down: it is there (and a live `up` it sent could not be read either); the consumer
/// keeps the copy it has.
#[tokio::test]
async fn an_unreadable_up_in_a_replay_does_not_report_the_instance_down() {
    let first = format!(
        "{SSE_HEAD}{}{}{}event: error\ndata: lagging\n\n",
        item(&up_json(inst("a", ""))),
        item(&up_json(inst("b", ""))),
        item(CURRENT),
    );
    let second = format!(
        "{SSE_HEAD}{}{}{}{}",
        item(&unreadable_up("a")),
        item(&up_json(inst("b", ""))),
        item(CURRENT),
        item(&up_json(inst("c", ""))),
    );
    let (url, _) =
        stand_in(move |n, _| Some(if n == 0 { &first } else { &second }.clone().into_bytes()))
            .await;
    let mut w = Client::new(&url).watch("s");
    let mut got = Vec::new();
    for _ in 0..4 {
        let ev = next_within(&mut w).await;
        got.push((ev.kind, ev.instance.map(|i| i.id)));
    }
    assert_eq!(
        got,
        [
            (EventKind::Up, Some("a".into())),
            (EventKind::Up, Some("b".into())),
            (EventKind::Current, None),
            // After the reconnect: c is new, a is not gone.
            (EventKind::Up, Some("c".into())),
        ]
    );
}

/// What a replay held and could not be read stays as the consumer has it: the
/// instances whose `up` it was (all of them, when it could not be told whose), the
/// leader; what was read is applied.
#[test]
fn what_a_replay_could_not_read_stays_as_it_was() {
    let leader = |i: Instance| Event {
        service: "s".into(),
        kind: EventKind::Leader,
        instance: Some(i),
        service_meta: None,
    };
    let mut known = Known::default();
    resync(
        &mut known,
        vec![
            up(inst("a", "")),
            up(inst("b", "")),
            up(inst("c", "")),
            leader(inst("a", "")),
        ],
    );
    let mut unreadable = Unreadable::default();
    unreadable.note(Some(EventKind::Up), Some("a".into()));
    unreadable.note(Some(EventKind::Leader), None);
    let got = reconcile("s", &mut known, vec![up(inst("d", ""))], &unreadable);
    let got: Vec<(EventKind, String)> = got
        .iter()
        .map(|e| (e.kind, e.instance.as_ref().unwrap().id.clone()))
        .collect();
    assert_eq!(
        got,
        [
            (EventKind::Up, "d".into()),
            (EventKind::Down, "b".into()),
            (EventKind::Down, "c".into()),
        ]
    );
    assert_eq!(known.instances.keys().collect::<Vec<_>>(), ["a", "d"]);
    assert_eq!(known.leader, Some(("a".into(), 1)));
    // An `up` whose instance cannot be told: nobody is reported down.
    let mut unreadable = Unreadable::default();
    unreadable.note(None, None);
    let got = reconcile("s", &mut known, vec![up(inst("e", ""))], &unreadable);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.iter().all(|e| e.kind != EventKind::Down), "{got:?}");
    assert_eq!(known.instances.keys().collect::<Vec<_>>(), ["a", "d", "e"]);
    assert_eq!(got[1].kind, EventKind::Leader, "the leader gone: {got:?}");
    // Read again: what is gone is reported gone.
    let got = resync(&mut known, vec![up(inst("e", ""))]);
    let downs = got.iter().filter(|e| e.kind == EventKind::Down).count();
    assert_eq!(downs, 2, "{got:?}");
}

/// Streams given up for a live event the client cannot read back off, further each
/// time and past the usual 2 s, instead of starting again from 100 ms because they had
/// synced: each one is a full replay, and the next one breaks on the same event.
#[tokio::test(start_paused = true)]
async fn streams_given_up_for_unreadable_events_back_off() {
    use std::sync::atomic::Ordering;
    let answer = format!("{SSE_HEAD}{}{}", item(CURRENT), item(&unreadable_up("x")));
    let (url, seen) = stand_in(move |_, _| Some(answer.clone().into_bytes())).await;
    let w = Client::new(&url).watch("s");
    let t0 = tokio::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(w);
    // 0.1, 0.2, 0.4 … 25.6 s apart: 10 in a minute (2 s apart: about 35; from 100 ms
    // every time: 600).
    let n = seen.load(Ordering::SeqCst);
    assert!((3..=12).contains(&n), "{n} connections in a minute");
}

/// A replay that goes on without `current` is given up at the state limit, not held
/// until memory runs out (nor until the 70 s idle limit), and tried again after 30 s
/// or more: the next one is not likely to be shorter (it was tried every 2 s for ever).
#[tokio::test(start_paused = true)]
async fn a_replay_past_its_limit_is_given_up_and_tried_again_much_later() {
    use std::sync::atomic::Ordering;
    const LIMIT: usize = 64 << 10;
    let ev = item(&up_json(inst("a", &"x".repeat(1000))));
    // Twice the limit, then silence.
    let answer = format!("{SSE_HEAD}{}", ev.repeat(2 * LIMIT / ev.len()));
    let (url, seen) = stand_in(move |_, _| Some(answer.clone().into_bytes())).await;
    let w = Client::new(&url).with_state_limit(LIMIT).watch("s");
    let t0 = tokio::time::Instant::now();
    // Small steps: a clock that jumps while sockets are busy jumps little.
    let step = Duration::from_millis(100);
    while t0.elapsed() < Duration::from_secs(29) {
        tokio::time::sleep(step).await;
    }
    assert_eq!(seen.load(Ordering::SeqCst), 1, "tried again too soon");
    while seen.load(Ordering::SeqCst) < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(65),
            "the replay was held past its limit"
        );
        tokio::time::sleep(step).await;
    }
    drop(w);
}

/// A chunked answer of `body` that never ends: no last chunk, the connection kept
/// open. A client that reads it whole waits for ever.
fn endless(status: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for chunk in body.chunks(64 << 10) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// `f`'s outcome, which must come within 10 s.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no outcome in 10 s (reading the whole answer?)"))
}

/// An answer longer than its limit ([`MAX_BODY`], or the state limit for an instance
/// list) fails once it gets there, with a `content-length` at once, and an error body
/// past its own limit (64 KiB) is just its status: none is read whole. Every answer
/// here is longer than the limit and never ends.
#[tokio::test]
async fn answers_past_the_size_limit_are_not_read_whole() {
    let meta = format!(r#"{{"data":"{}","index":1}}"#, "x".repeat(MAX_BODY + 1));
    let streamed = endless("200 OK", meta.as_bytes());
    let (url, _) = stand_in(move |_, _| Some(streamed.clone())).await;
    let err = within("meta", Client::new(&url).get_meta("s")).await.err();
    assert!(
        matches!(err, Some(Error::TooLarge { limit: MAX_BODY })),
        "{}",
        short(&err)
    );

    const LIMIT: usize = 64 << 10;
    let list = serde_json::to_vec(&vec![inst("a", &"x".repeat(1000)); 100]).unwrap();
    assert!(list.len() > LIMIT);
    let streamed = endless("200 OK", &list);
    let (url, _) = stand_in(move |_, _| Some(streamed.clone())).await;
    let c = Client::new(&url).with_state_limit(LIMIT);
    let err = within("instances", c.instances("s")).await.err();
    assert!(
        matches!(err, Some(Error::TooLarge { limit: LIMIT })),
        "{}",
        short(&err)
    );

    // Announced, and nothing of it sent.
    let announced = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        MAX_BODY + 1
    );
    let (url, _) = stand_in(move |_, _| Some(announced.clone().into_bytes())).await;
    let err = within("announced", Client::new(&url).get_meta("s"))
        .await
        .err();
    assert!(
        matches!(err, Some(Error::TooLarge { .. })),
        "{}",
        short(&err)
    );

    let envelope = serde_json::json!({
        "code": "unknown_error",
        "message": "x".repeat(1 << 20),
        "retry": false,
    });
    let refused = endless("500 Internal Server Error", envelope.to_string().as_bytes());
    let (url, _) = stand_in(move |_, _| Some(refused.clone())).await;
    let err = within("error", Client::new(&url).get_meta("s")).await.err();
    assert!(
        matches!(err, Some(Error::Status { status: 500 })),
        "{}",
        short(&err)
    );
}

/// A body that is not the JSON expected says why in its message (callers log `%e`).
#[test]
fn a_decode_error_says_why() {
    let e = serde_json::from_str::<ServiceMeta>("{").unwrap_err();
    let detail = e.to_string();
    let msg = Error::Decode(e).to_string();
    assert!(msg.contains(&detail), "{msg}");
}

/// The start of a long value's debug form.
fn short(v: &impl std::fmt::Debug) -> String {
    format!("{v:?}").chars().take(300).collect()
}

/// Counts the warnings and infos logged on the thread it is the default subscriber of
/// (and records nothing else).
#[derive(Clone, Default)]
struct Logged {
    warn: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    info: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Logged {
    fn counts(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering;
        (
            self.warn.load(Ordering::SeqCst),
            self.info.load(Ordering::SeqCst),
        )
    }
}

impl tracing::Subscriber for Logged {
    fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
        matches!(*meta.level(), tracing::Level::WARN | tracing::Level::INFO)
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, ev: &tracing::Event<'_>) {
        let count = match *ev.metadata().level() {
            tracing::Level::WARN => &self.warn,
            tracing::Level::INFO => &self.info,
            _ => return,
        };
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A watch's failures are warnings: the first, then one a minute at most over the life
/// of the watch (a stream that gets to `current` in between does not start it again).
#[tokio::test(start_paused = true)]
async fn watch_failures_are_warned_first_and_then_once_a_minute() {
    use std::sync::atomic::Ordering;
    let logged = Logged::default();
    let _log = tracing::subscriber::set_default(logged.clone());
    let working = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{}",
        item(CURRENT).len(),
        item(CURRENT)
    );
    // Four refusals, a stream that gets to `current` and ends, refusals again.
    let (url, seen) = stand_in(move |n, _| {
        Some(match n {
            4 => working.clone().into_bytes(),
            _ => unavailable("discoverd: not ready"),
        })
    })
    .await;
    let mut w = Client::new(&url).watch("s");
    assert_eq!(w.next().await.unwrap().kind, EventKind::Current);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(logged.counts().0, 1, "the first failure only");
    // Five minutes of failures, one every 2 s: about one warning a minute.
    tokio::time::sleep(Duration::from_secs(300)).await;
    let (tries, (warned, _)) = (seen.load(Ordering::SeqCst), logged.counts());
    assert!(tries > 100, "{tries} tries");
    assert!(
        (5..=7).contains(&warned),
        "{warned} warnings in {tries} tries"
    );
    drop(w);
}

/// Five minutes of a watch whose every stream is `answer`: (tries, warnings, infos).
async fn five_minutes_of(answer: String) -> (usize, usize, usize) {
    use std::sync::atomic::Ordering;
    let logged = Logged::default();
    let _log = tracing::subscriber::set_default(logged.clone());
    let (url, seen) = stand_in(move |_, _| Some(answer.clone().into_bytes())).await;
    let w = Client::new(&url).watch("s");
    let t0 = tokio::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(w);
    let (warned, infos) = logged.counts();
    (seen.load(Ordering::SeqCst), warned, infos)
}

/// A stream that keeps breaking right after it synced (discoverd's `event: error` for a
/// lagging receiver): about one warning a minute and as many "working again", not one
/// of each every time (getting to `current` started the limit again); so too when
/// each replay also holds an event the client cannot read (warned about every time).
#[tokio::test(start_paused = true)]
async fn a_watch_that_flaps_is_warned_about_once_a_minute() {
    let lagging = "event: error\ndata: lagging\n\n";
    let flap = format!("{SSE_HEAD}{}{lagging}", item(CURRENT));
    let (tries, warned, infos) = five_minutes_of(flap).await;
    assert!(tries > 100, "{tries} tries");
    assert!(
        (4..=7).contains(&warned),
        "{warned} warnings in {tries} tries"
    );
    assert!(
        (1..=warned).contains(&infos),
        "{infos} infos, {warned} warnings in {tries} tries"
    );
    let unreadable = item(&unreadable_up("x"));
    let flap = format!("{SSE_HEAD}{unreadable}{}{lagging}", item(CURRENT));
    let (tries, warned, _) = five_minutes_of(flap).await;
    assert!(tries > 100, "{tries} tries");
    assert!(
        (4..=7).contains(&warned),
        "{warned} warnings in {tries} tries with unreadable replays"
    );
}

#[test]
fn reconnect_replay_becomes_the_missed_events() {
    let mut known = Known::default();
    let first = resync(&mut known, vec![up(inst("a", "")), up(inst("b", ""))]);
    let kinds: Vec<EventKind> = first.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![EventKind::Up, EventKind::Up, EventKind::Current]
    );
    // After a reconnect: a is gone, b changed, c is new.
    let second = resync(&mut known, vec![up(inst("b", "x")), up(inst("c", ""))]);
    let got: Vec<(EventKind, String)> = second
        .iter()
        .map(|e| (e.kind, e.instance.as_ref().unwrap().id.clone()))
        .collect();
    // New and changed first, vanished last: applied one by one, the set is never
    // emptier than both the old and the new one.
    assert_eq!(
        got,
        vec![
            (EventKind::Update, "b".into()),
            (EventKind::Up, "c".into()),
            (EventKind::Down, "a".into()),
        ]
    );
    // Nothing changed: nothing to send.
    assert!(resync(&mut known, vec![up(inst("b", "x")), up(inst("c", ""))]).is_empty());
    // Every instance replaced by new ones (a deploy during the disconnect): applied in
    // order, the set never goes empty.
    let third = resync(&mut known, vec![up(inst("d", "")), up(inst("e", ""))]);
    let mut live: BTreeMap<String, ()> = [("b".into(), ()), ("c".into(), ())].into();
    for e in &third {
        let id = e.instance.as_ref().unwrap().id.clone();
        match e.kind {
            EventKind::Up | EventKind::Update => live.insert(id.clone(), ()),
            EventKind::Down => live.remove(&id),
            _ => None,
        };
        assert!(!live.is_empty(), "emptied at {:?} {id}", e.kind);
    }
    assert_eq!(live.keys().collect::<Vec<_>>(), ["d", "e"]);
}

/// A reconnect's events arrive together: once the first is taken, the rest are
/// already waiting (a consumer applying what waits as one change never sees half).
#[tokio::test]
async fn a_reconnects_events_are_all_waiting_once_the_first_arrives() {
    let (tx, rx) = mpsc::channel(4);
    let mut w = Watch {
        rx,
        pending: std::collections::VecDeque::new(),
        task: tokio::spawn(async {}),
    };
    let ev = |id: &str, kind| Event {
        service: "s".into(),
        kind,
        instance: Some(inst(id, "")),
        service_meta: None,
    };
    assert!(w.try_next().is_none());
    tx.send(vec![ev("a", EventKind::Down), ev("a", EventKind::Up)])
        .await
        .unwrap();
    tx.send(vec![ev("b", EventKind::Up)]).await.unwrap();
    assert_eq!(w.next().await.unwrap().kind, EventKind::Down);
    assert_eq!(w.try_next().unwrap().kind, EventKind::Up);
    assert_eq!(w.try_next().unwrap().instance.unwrap().id, "b");
    assert!(w.try_next().is_none());
    drop(tx);
    assert!(w.next().await.is_none());
}

#[test]
fn a_leader_back_under_the_same_id_is_down_up_and_a_new_leader() {
    let leader = |i: Instance| Event {
        service: "s".into(),
        kind: EventKind::Leader,
        instance: Some(i),
        service_meta: None,
    };
    let mut known = Known::default();
    let a1 = inst("a", "");
    resync(&mut known, vec![up(a1.clone()), leader(a1.clone())]);
    // While the stream was down, a was deleted and registered again.
    let a9 = Instance {
        index: 9,
        ..a1.clone()
    };
    let got = resync(&mut known, vec![up(a9.clone()), leader(a9.clone())]);
    let got: Vec<(EventKind, Option<Instance>)> =
        got.into_iter().map(|e| (e.kind, e.instance)).collect();
    assert_eq!(
        got,
        vec![
            (EventKind::Down, Some(a1)),
            (EventKind::Up, Some(a9.clone())),
            (EventKind::Leader, Some(a9.clone())),
        ]
    );
    assert!(resync(&mut known, vec![up(a9.clone()), leader(a9)]).is_empty());
}

#[test]
fn a_bare_port_is_expanded_with_external_ip() {
    let ok = |addr, ip| expand_addr(addr, ip).unwrap();
    assert_eq!(ok(":5000", Some("10.0.0.9")), "10.0.0.9:5000");
    assert_eq!(ok(":5000", Some("fd00::9")), "[fd00::9]:5000");
    assert_eq!(ok("10.0.0.1:5000", None), "10.0.0.1:5000");
    for ip in [None, Some("")] {
        let err = expand_addr(":5000", ip).unwrap_err();
        assert!(matches!(err, Error::NoExternalIp { .. }), "{err:?}");
        assert!(err.to_string().contains("EXTERNAL_IP"));
    }
}

#[tokio::test]
async fn a_bare_port_without_external_ip_fails_at_once() {
    // Nothing listens there: without the check this would retry for 60 s.
    let c = Client::new("http://127.0.0.1:1");
    let inst = Instance {
        addr: ":5000".into(),
        ..Instance::default()
    };
    let res = tokio::time::timeout(Duration::from_secs(5), c.heartbeat_with("s", inst, no_env))
        .await
        .expect("fails without retrying");
    assert!(matches!(res, Err(Error::NoExternalIp { .. })));
}

/// A server that answers every watch 200 and ends the stream at once (before
/// `current`) is not a working stream: the watch backs off instead of reconnecting
/// ten times a second for ever.
#[tokio::test]
async fn a_watch_ended_before_current_backs_off() {
    use std::sync::atomic::Ordering;
    let resp = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    let (url, seen) = stand_in(move |_, _| Some(resp.as_bytes().to_vec())).await;
    let c = Client::new(&url);
    let w = c.watch("s");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    drop(w);
    // 100, 200, 400, 800 ms apart: about 5 in 2 s (a reset every time: about 20).
    let n = seen.load(Ordering::SeqCst);
    assert!((2..=7).contains(&n), "{n} connections in 2 s");
}

/// `keep_registered` retries an unreachable or failing discoverd for ever, but not a
/// registration refused as invalid: that one is given up after its first answer.
#[tokio::test]
async fn keep_registered_gives_up_on_a_validation_error() {
    use std::sync::atomic::Ordering;
    let body = r#"{"code":"validation_error","message":"bad name","retry":false}"#;
    let resp = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let (url, seen) = stand_in(move |_, _| Some(resp.clone().into_bytes())).await;
    let c = Client::new(&url);
    let inst = Instance {
        addr: "127.0.0.1:4300".into(),
        ..Instance::default()
    };
    let hb = c.keep_registered("bad-name", inst.clone(), Some("oldest"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "retried a refused registration"
    );
    drop(hb);
    // A name the client itself refuses is given up too, without a request.
    let mut hb = c.keep_registered("Bad_Name", inst, Some("oldest"));
    let task = hb.task.take().expect("a task");
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the heartbeater gave up")
        .unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 1, "sent an invalid name");
    drop(hb);
}

/// Only discoverd's `object_not_found` (a missing service or leader) reads as "none": a
/// plain 404 (a path discoverd does not serve, e.g. a wrong base URL) is an error.
#[tokio::test]
async fn only_object_not_found_reads_as_none() {
    for (code, none) in [("object_not_found", true), ("not_found", false)] {
        let body = format!(r#"{{"code":"{code}","message":"x","retry":false}}"#);
        let (url, _) = stand_in(move |_, _| Some(json("404 Not Found", &body))).await;
        let c = Client::new(&url);
        let list = c.instances("web").await;
        let leader = c.leader("web").await;
        if none {
            assert!(list.unwrap().is_empty());
            assert!(leader.unwrap().is_none());
        } else {
            assert!(list.is_err(), "{list:?}");
            assert!(leader.is_err(), "{leader:?}");
        }
    }
}

/// An HTTP answer with a JSON body.
fn json(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A 503 with `message`, `retry: true`.
fn unavailable(message: &str) -> Vec<u8> {
    let body =
        serde_json::json!({"code": "service_unavailable", "message": message, "retry": true});
    json("503 Service Unavailable", &body.to_string())
}

/// A request refused because the cluster has no leader (an election under way) is sent
/// again until a leader answers, a compare-and-swap included (nothing was proposed).
#[tokio::test]
async fn a_request_refused_for_want_of_a_leader_is_sent_again() {
    use std::sync::atomic::Ordering;
    let (url, seen) = stand_in(|n, _| {
        Some(match n {
            0 | 1 => unavailable(flynn_api::discoverd::NO_LEADER),
            _ => json("200 OK", r#"{"data":{"a":1},"index":7}"#),
        })
    })
    .await;
    let c = Client::new(&url);
    let meta = ServiceMeta {
        data: serde_json::json!({"a": 1}),
        leader_id: None,
        index: 0,
    };
    let stored = c
        .set_meta("s", &meta)
        .await
        .expect("answered once a leader is there");
    assert_eq!(stored.index, 7);
    assert_eq!(seen.load(Ordering::SeqCst), 3);
}

/// Only that refusal: a write whose outcome is unknown (it may still commit) is not sent
/// again, and the wait for a leader is bounded.
#[tokio::test]
async fn only_refusals_for_want_of_a_leader_are_sent_again_for_a_bounded_time() {
    use std::sync::atomic::Ordering;
    let (url, seen) =
        stand_in(|_, _| Some(unavailable("discoverd: write not applied in time"))).await;
    let err = Client::new(&url).get_meta("s").await;
    assert_eq!(err.unwrap_err().api().map(|e| e.status()), Some(503));
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "an unknown outcome was sent again"
    );

    let (url, seen) = stand_in(|_, _| Some(unavailable(flynn_api::discoverd::NO_LEADER))).await;
    let start = std::time::Instant::now();
    let c = Client::new(&url).with_leader_wait(Duration::from_millis(400));
    let err = c.instances("s").await.unwrap_err();
    assert_eq!(
        err.api().map(|e| e.message.as_str()),
        Some(flynn_api::discoverd::NO_LEADER)
    );
    // Sent at 0, 50, 150 and 350 ms (the last one not when the earlier round trips
    // and sleeps overran by 50 ms); the next pause would end past the 400 ms.
    let sent = seen.load(Ordering::SeqCst);
    assert!((3..=4).contains(&sent), "sent {sent} times");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );

    let (url, seen) = stand_in(|_, _| Some(unavailable(flynn_api::discoverd::NO_LEADER))).await;
    let c = Client::new(&url).with_leader_wait(Duration::ZERO);
    assert!(c.instances("s").await.is_err());
    assert_eq!(seen.load(Ordering::SeqCst), 1);

    // A node cut off for 5 s ("follows no leader"): said at once.
    let (url, seen) = stand_in(|_, _| Some(unavailable(flynn_api::discoverd::NOT_FOLLOWING))).await;
    assert!(Client::new(&url).instances("s").await.is_err());
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "a cut-off node was asked again"
    );
}

/// `keep_registered` with a leader type creates the service again when a retried
/// first registration finds it gone, even after a try that created it and then
/// failed (it used to stop creating it, and retried a 404 for ever).
#[tokio::test]
async fn keep_registered_creates_the_service_again_when_it_is_gone() {
    use std::sync::{Arc, Mutex};
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let (url, _) = stand_in(move |_, line| {
        let mut log = log.lock().unwrap();
        log.push(line.to_string());
        let registers = log.iter().filter(|l| l.contains("/instances/")).count();
        Some(if !line.contains("/instances/") {
            json("200 OK", "{}")
        } else if registers == 1 {
            json(
                "503 Service Unavailable",
                r#"{"code":"service_unavailable","message":"no leader","retry":true}"#,
            )
        } else if registers == 2 {
            json(
                "404 Not Found",
                r#"{"code":"object_not_found","message":"service not found","retry":false}"#,
            )
        } else {
            json("200 OK", "{}")
        })
    })
    .await;
    let c = Client::new(&url);
    let inst = Instance {
        addr: "127.0.0.1:4301".into(),
        ..Instance::default()
    };
    let hb = c.keep_registered("s", inst, Some("oldest"));
    let done = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = seen
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains("/instances/"))
                .count();
            if n >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let log = seen.lock().unwrap().clone();
    drop(hb);
    assert!(done.is_ok(), "no third registration: {log:?}");
    let creates: Vec<usize> = (0..log.len())
        .filter(|i| !log[*i].contains("/instances/"))
        .collect();
    // create, register (503), register (404), create, register.
    assert_eq!(creates.len(), 2, "{log:?}");
    assert!(log[creates[1] + 1].contains("/instances/"), "{log:?}");
    assert!(log[creates[0]].starts_with("put /services/s "), "{log:?}");
}

#[test]
fn instance_id_is_md5_of_proto_and_addr() {
    assert_eq!(
        instance_id("tcp", "127.0.0.1:5000"),
        "f89ac025042901d1bbc6a6872a7af35a"
    );
}
