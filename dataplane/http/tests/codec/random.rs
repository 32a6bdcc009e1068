//! Randomized robustness: mutated and random inputs through every entry point. Nothing may
//! panic, spans stay inside the head, and rewritten heads re-parse to the same facts.

use crate::fwd;
use flynn_http::{
    parse_request, parse_response, write_request_head, write_response_head, BodyReader, Framing,
    Method, ResponseOpts, Span,
};

const REQUEST_SEEDS: &[&[u8]] = &[
    b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"POST /a?b=c HTTP/1.1\r\nHost: a:80\r\nContent-Length: 3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET http://h/p?q HTTP/1.0\r\nConnection: keep-alive\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
    b"GET //x HTTP/1.1\r\nHost: a\r\nConnection: x-request-id, te\r\nX-Request-Id: aaaaaaaaaaaaaaaaaaaaaaaa\r\nTE: trailers\r\n\r\n",
    b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5, 5\r\n\r\n",
];

const RESPONSE_SEEDS: &[&[u8]] = &[
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\nbody",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nConnection: keep-alive, x\r\nX: y\r\n\r\n",
    b"HTTP/1.1 204\r\nKeep-Alive: timeout=5\r\n\r\n",
];

const INTERESTING: &[u8] = b"\r\n\0 \t:,;-/?#@*0123456789aAfFzZ\x7f\x80\xff";

fn mutate(rng: &mut fastrand::Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..rng.usize(1..5) {
        let len = v.len();
        match rng.u8(0..6) {
            0 if len > 0 => {
                let i = rng.usize(0..len);
                v[i] = INTERESTING[rng.usize(0..INTERESTING.len())];
            }
            1 => {
                let i = rng.usize(0..=len);
                v.insert(i, INTERESTING[rng.usize(0..INTERESTING.len())]);
            }
            2 if len > 0 => {
                let a = rng.usize(0..len);
                let b = rng.usize(a..=len.min(a + 8));
                v.drain(a..b);
            }
            3 if len > 0 => {
                let a = rng.usize(0..len);
                let b = rng.usize(a..=len.min(a + 16));
                let piece = v[a..b].to_vec();
                let at = rng.usize(0..=v.len());
                v.splice(at..at, piece);
            }
            4 => v.truncate(rng.usize(0..=len)),
            _ => {
                let i = rng.usize(0..=len);
                v.insert(i, rng.u8(..));
            }
        }
    }
    v
}

fn in_head(span: Span, head_len: usize) {
    assert!(
        span.start <= span.end && span.end as usize <= head_len,
        "{span:?} / {head_len}"
    );
}

/// Returns whether `buf` held a valid head whose rewrite was checked.
fn check_request(buf: &[u8]) -> bool {
    let Ok(Some(info)) = parse_request(buf) else {
        return false;
    };
    assert!(info.head_len <= buf.len());
    in_head(info.uri, info.head_len);
    in_head(info.path, info.head_len);
    if let Some(h) = info.host {
        in_head(h, info.head_len);
    }
    assert_ne!(info.framing, Framing::Close);
    let mut out = Vec::new();
    write_request_head(buf, &info, &fwd(), &mut out);
    assert!(out.ends_with(b"\r\n\r\n"));
    let re = match parse_request(&out) {
        Ok(Some(re)) => re,
        other => panic!(
            "rewritten head does not parse: {other:?}\n{:?}\n{:?}",
            String::from_utf8_lossy(buf),
            String::from_utf8_lossy(&out)
        ),
    };
    assert_eq!(re.head_len, out.len());
    assert_eq!(re.framing, info.framing);
    assert_eq!(re.upgrade, info.upgrade);
    assert_eq!(re.method, info.method);
    assert_eq!(re.uri.get(&out), info.uri.get(buf));
    // An HTTP/1.0 request without any host gets an empty one.
    let host = info.host.map_or(&b""[..], |h| h.get(buf));
    assert_eq!(re.host.map(|h| h.get(&out)), Some(host));
    true
}

/// Returns whether `buf` held a valid head whose rewrite was checked.
fn check_response(buf: &[u8], method: Method) -> bool {
    let Ok(Some(info)) = parse_response(buf, method) else {
        return false;
    };
    assert!(info.head_len <= buf.len());
    let mut out = Vec::new();
    let opts = ResponseOpts {
        close: info.status % 2 == 0,
        extra: &[(b"Set-Cookie", b"a=b")],
        http10: false,
    };
    write_response_head(buf, &info, &opts, &mut out);
    let re = match parse_response(&out, method) {
        Ok(Some(re)) => re,
        other => panic!(
            "rewritten head does not parse: {other:?}\n{:?}\n{:?}",
            String::from_utf8_lossy(buf),
            String::from_utf8_lossy(&out)
        ),
    };
    assert_eq!(re.head_len, out.len());
    assert_eq!(
        (re.status, re.framing, re.upgrade),
        (info.status, info.framing, info.upgrade)
    );
    true
}

fn check_body(rng: &mut fastrand::Rng, framing: Framing, input: &[u8]) {
    let mut r = BodyReader::new(framing);
    let mut pos = 0;
    while pos < input.len() {
        let end = rng.usize(pos..=input.len());
        match r.advance(&input[pos..end]) {
            Ok(a) => {
                assert!(a.used <= end - pos);
                assert_eq!(a.done, r.is_done());
                pos += a.used;
                if a.done || (a.used == 0 && end > pos) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
}

#[test]
fn mutated_requests() {
    let mut rng = fastrand::Rng::with_seed(1);
    let mut valid = 0;
    for _ in 0..4000 {
        let seed = REQUEST_SEEDS[rng.usize(0..REQUEST_SEEDS.len())];
        valid += usize::from(check_request(&mutate(&mut rng, seed)));
    }
    // The mutations must leave enough valid heads for the round-trip checks to mean something.
    assert!(valid > 400, "only {valid} valid mutated requests");
}

#[test]
fn mutated_responses() {
    let methods = [Method::Get, Method::Head, Method::Post, Method::Other];
    let mut rng = fastrand::Rng::with_seed(2);
    let mut valid = 0;
    for _ in 0..4000 {
        let seed = RESPONSE_SEEDS[rng.usize(0..RESPONSE_SEEDS.len())];
        let method = methods[rng.usize(0..methods.len())];
        valid += usize::from(check_response(&mutate(&mut rng, seed), method));
    }
    assert!(valid > 400, "only {valid} valid mutated responses");
}

#[test]
fn mutated_bodies() {
    let mut rng = fastrand::Rng::with_seed(3);
    let seeds: &[&[u8]] = &[
        b"5\r\nhello\r\n0\r\n\r\n",
        b"3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\n",
        b"ffff\r\n",
    ];
    for _ in 0..4000 {
        let seed = seeds[rng.usize(0..seeds.len())];
        let input = mutate(&mut rng, seed);
        let framing = match rng.u8(0..4) {
            0 => Framing::Length(rng.u64(0..32)),
            1 => Framing::Close,
            2 => Framing::Empty,
            _ => Framing::Chunked,
        };
        check_body(&mut rng, framing, &input);
    }
}

#[test]
fn random_bytes() {
    let mut rng = fastrand::Rng::with_seed(4);
    for _ in 0..3000 {
        let len = rng.usize(0..200);
        let buf: Vec<u8> = (0..len)
            .map(|_| INTERESTING[rng.usize(0..INTERESTING.len())])
            .collect();
        check_request(&buf);
        check_response(&buf, Method::Get);
        check_body(&mut rng, Framing::Chunked, &buf);
    }
}
