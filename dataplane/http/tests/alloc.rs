//! The codec allocates nothing per message in steady state (docs/HOT_PATH.md): parsing,
//! rewriting into an output `Vec` with room enough, and body framing, hostile inputs
//! included. Counts this thread's allocations through a counting global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr};

use flynn_http::{
    parse_request, parse_response, write_request_head, write_response_head, BodyReader, Forward,
    Method, ResponseOpts, MAX_HEAD,
};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; the count is a const-initialised thread-local
// `Cell` (no allocation, no lazy initialisation).
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Allocations made on this thread by `f`.
fn allocations(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

fn fwd() -> Forward<'static> {
    Forward {
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        proto: "http",
        listener_port: 8080,
        request_start_ms: 1_700_000_000_123,
        random_id: 7,
        upstream_close: false,
        extra: &[],
    }
}

/// Parses and rewrites a request (and frames its body) into `out`, which has room enough.
fn request_round(raw: &[u8], out: &mut Vec<u8>) {
    let info = parse_request(raw).unwrap().unwrap();
    out.clear();
    write_request_head(raw, &info, &fwd(), out);
    assert!(
        out.starts_with(b"GET") || out.starts_with(b"POST"),
        "{out:?}"
    );
    let mut body = BodyReader::new(info.framing);
    let done = body.advance(&raw[info.head_len..]).unwrap().done;
    assert!(done);
}

#[test]
fn requests_allocate_nothing() {
    let with_body = |line: &str, fields: &str| {
        let pad = format!("X-Pad: {}\r\n", "p".repeat(MAX_HEAD - 600));
        format!(
            "{line}\r\nHost: a.example\r\n{fields}{pad}\r\n\
             5\r\nhello\r\n0\r\nX-Sum: 1\r\nGrpc-Status: 0\r\n\r\n"
        )
        .into_bytes()
    };
    let flood = {
        let mut raw = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        for i in 0..125 {
            raw.push_str(&format!("X-Field-{i}: v\r\n"));
        }
        raw.push_str("Connection: ");
        while raw.len() + 8 < MAX_HEAD {
            raw.push_str("a,b,");
        }
        raw.push_str("\r\n\r\n");
        raw.into_bytes()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "HTTP/1.1",
            with_body("POST /p HTTP/1.1", "Transfer-Encoding: chunked\r\n"),
        ),
        (
            "HTTP/1.2, 64 KiB head",
            with_body("POST /p HTTP/1.2", "Transfer-Encoding: chunked\r\n"),
        ),
        (
            "HTTP/1.9",
            b"GET /x HTTP/1.9\r\nHost: a\r\nContent-Length: 0012\r\n\r\n0123456789ab".to_vec(),
        ),
        ("Connection flood", flood),
    ];
    let mut out = Vec::with_capacity(2 * MAX_HEAD);
    for (what, raw) in &cases {
        // The first round may grow nothing either: `out` has room.
        for round in 0..3 {
            let n = allocations(|| request_round(raw, &mut out));
            assert_eq!(n, 0, "{what}, round {round}");
        }
    }
}

#[test]
fn responses_allocate_nothing() {
    let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 007\r\nConnection: x-a, X-B\r\nX-A: 1\r\n\
                X-B: 2\r\n\r\nabcdefg";
    let opts = ResponseOpts {
        close: false,
        extra: &[(b"Set-Cookie", b"a=b")],
        http10: false,
    };
    let mut out = Vec::with_capacity(4096);
    let n = allocations(|| {
        let info = parse_response(raw, Method::Get).unwrap().unwrap();
        write_response_head(raw, &info, &opts, &mut out);
    });
    assert_eq!(n, 0);
    let head = String::from_utf8_lossy(&out);
    assert!(head.contains("\r\nContent-Length: 7\r\n"), "{head}");
    assert!(!head.contains("X-A") && !head.contains("X-B"), "{head}");
}
