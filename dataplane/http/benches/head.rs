//! Head codec benchmarks: a browser-like request parsed and rewritten for the backend, and a
//! typical backend response parsed and rewritten for the client.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flynn_http::{
    parse_request, parse_response, write_request_head, write_response_head, Forward, Method,
    ResponseOpts,
};

const REQUEST: &[u8] = b"GET /assets/app.js?v=1712345678 HTTP/1.1\r\n\
Host: www.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0\r\n\
Accept: */*\r\n\
Accept-Language: en-US,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Referer: https://www.example.com/\r\n\
Cookie: _backend=c2VjcmV0Ym94ZWQtYmFja2VuZC1hZGRy; session=abcdef0123456789\r\n\
Connection: keep-alive\r\n\
Sec-Fetch-Dest: script\r\n\
Sec-Fetch-Mode: no-cors\r\n\
If-None-Match: \"5f2b-18e3c0a1\"\r\n\
\r\n";

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\n\
Content-Type: application/javascript; charset=utf-8\r\n\
Content-Length: 24363\r\n\
Cache-Control: public, max-age=31536000\r\n\
ETag: \"5f2b-18e3c0a2\"\r\n\
Last-Modified: Mon, 01 Apr 2024 12:00:00 GMT\r\n\
Date: Mon, 01 Apr 2024 12:00:01 GMT\r\n\
Vary: Accept-Encoding\r\n\
\r\n";

fn request(c: &mut Criterion) {
    let fwd = Forward {
        client_ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
        proto: "https",
        listener_port: 443,
        request_start_ms: 1_712_345_678_901,
        random_id: 0x0123_4567_89ab_cdef_0123_4567_89ab_cdef,
        upstream_close: false,
        extra: &[],
    };
    let mut out = Vec::with_capacity(4096);
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Bytes(REQUEST.len() as u64));
    g.bench_function("parse", |b| {
        b.iter(|| parse_request(black_box(REQUEST)).unwrap().unwrap())
    });
    g.bench_function("parse+rewrite", |b| {
        b.iter(|| {
            let info = parse_request(black_box(REQUEST)).unwrap().unwrap();
            out.clear();
            write_request_head(REQUEST, &info, &fwd, &mut out);
            black_box(out.len())
        })
    });
    g.finish();
}

fn response(c: &mut Criterion) {
    let mut out = Vec::with_capacity(4096);
    let opts = ResponseOpts {
        close: false,
        extra: &[],
        http10: false,
    };
    let mut g = c.benchmark_group("response");
    g.throughput(Throughput::Bytes(RESPONSE.len() as u64));
    g.bench_function("parse", |b| {
        b.iter(|| {
            parse_response(black_box(RESPONSE), Method::Get)
                .unwrap()
                .unwrap()
        })
    });
    g.bench_function("parse+rewrite", |b| {
        b.iter(|| {
            let info = parse_response(black_box(RESPONSE), Method::Get)
                .unwrap()
                .unwrap();
            out.clear();
            write_response_head(RESPONSE, &info, &opts, &mut out);
            black_box(out.len())
        })
    });
    g.finish();
}

/// A request at the limits: 125 other fields plus a Connection field whose tokens fill the
/// rest of the 64 KiB head (`tokens` repeated), i.e. the worst case for hop-by-hop marking.
fn connection_flood(tokens: &str) -> Vec<u8> {
    let mut raw = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
    for i in 0..125 {
        raw.push_str(&format!("X-Field-{i}: v\r\n"));
    }
    raw.push_str("Connection: ");
    while raw.len() + tokens.len() + 4 < flynn_http::MAX_HEAD {
        raw.push_str(tokens);
    }
    raw.push_str("\r\n\r\n");
    raw.into_bytes()
}

fn hostile(c: &mut Criterion) {
    let fwd = Forward {
        client_ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
        proto: "https",
        listener_port: 443,
        request_start_ms: 1_712_345_678_901,
        random_id: 0x0123_4567_89ab_cdef_0123_4567_89ab_cdef,
        upstream_close: false,
        extra: &[],
    };
    let mut out = Vec::with_capacity(128 * 1024);
    let mut g = c.benchmark_group("hostile");
    let newer = [
        &b"GET /assets/app.js?v=1712345678 HTTP/1.2\r\n"[..],
        &REQUEST[42..],
    ]
    .concat();
    let cases = [
        ("connection-flood-same", connection_flood("a,")),
        ("connection-flood-alternating", connection_flood("a,b,")),
        ("http-1.2", newer),
    ];
    for (name, raw) in &cases {
        g.throughput(Throughput::Bytes(raw.len() as u64));
        g.bench_function(*name, |b| {
            b.iter(|| {
                let info = parse_request(black_box(raw)).unwrap().unwrap();
                out.clear();
                write_request_head(raw, &info, &fwd, &mut out);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, request, response, hostile);
criterion_main!(benches);
