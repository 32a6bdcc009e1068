//! Peer restore (spec §3.5): a new instance loads a peer's snapshot before serving and
//! follows it; a rolling restart of two instances loses no line any instance had.

#[path = "../support/mod.rs"]
mod support;

use std::time::Duration;

use support::{msg, oc, Logagg};

fn bodies(v: &[serde_json::Value]) -> Vec<String> {
    v.iter()
        .map(|j| j["msg"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn snapshot_then_follow_survives_rolling_restart() {
    let a = Logagg::start(&[]);
    let long = "x".repeat(5000);
    let first: String = [
        oc(&msg("app", "h", "web.1", "ID1", 1, 1, "line1")),
        oc(&msg("app", "h", "web.1", "ID1", 2, 2, "line2")),
        oc(&msg("app", "h", "web.1", "ID1", 3, 3, &long)),
        oc("<190>1 - h app web.1 ID1 - no timestamp"),
        "raw garbage line kept\n".to_string(),
    ]
    .concat();
    // The raw line is not a frame start: send it as its own LF frame on another connection.
    let (framed, raw) = first.split_at(first.find("raw garbage").unwrap());
    a.send(framed.as_bytes());
    a.send(format!("<{raw}").as_bytes());
    assert_eq!(a.wait_lines("app", 4).len(), 4);
    assert_eq!(a.wait_lines("_unrouted", 1).len(), 1);

    // B restores from A before serving.
    let b = Logagg::start(&["--peer", &a.url()]);
    assert_eq!(bodies(&b.log("app", "")), bodies(&a.log("app", "")));
    assert_eq!(b.log("_unrouted", ""), a.log("_unrouted", ""));
    // ... and follows A's new lines.
    a.send(oc(&msg("app", "h", "web.1", "ID1", 4, 4, "line3")).as_bytes());
    assert_eq!(b.wait_lines("app", 5).len(), 5);

    // Rolling restart: A goes away, comes back restoring from B.
    drop(a);
    b.send(oc(&msg("app", "h", "web.1", "ID1", 5, 5, "line4 while A down")).as_bytes());
    let a2 = Logagg::start(&["--peer", &b.url()]);
    let want = bodies(&b.wait_lines("app", 6));
    assert_eq!(want.len(), 6);
    assert_eq!(
        bodies(&a2.log("app", "")),
        want,
        "restored instance has every line, no duplicates"
    );
    assert!(want.contains(&long));
    // Timestamps (including receive times of NILVALUE lines) survive the round trip.
    assert_eq!(a2.log("app", ""), b.log("app", ""));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        a2.log("app", "").len(),
        6,
        "no duplicates from overlapping replays"
    );
}

#[test]
fn snapshot_endpoint_format() {
    let a = Logagg::start(&[]);
    a.send(oc(&msg("s", "h", "web.1", "ID1", 1, 1, "snap")).as_bytes());
    a.wait_lines("s", 1);
    let (s, body) = a.get("/snapshot");
    assert_eq!(s, 200);
    assert!(
        body.contains(" m s <190>1 2009-11-10T23:00:00.000001Z h s web.1 ID1"),
        "{body}"
    );
    assert!(body.ends_with("1 E"), "{body}");
}
