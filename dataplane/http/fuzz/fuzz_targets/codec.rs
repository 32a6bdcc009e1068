//! Fuzz target for the whole codec. The first byte picks the request method for response
//! parsing, the framing for the body reader and where the input is split; the rest is fed
//! as a request head, as a response head and as a body. Invariants checked: no panic, spans
//! inside the head, rewritten heads re-parse to the same facts, body progress in bounds.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use flynn_http::{
    parse_request, parse_response, write_request_head, write_response_head, BodyReader, Forward,
    Framing, Method, ParseError, ResponseOpts,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, data)) = data.split_first() else {
        return;
    };
    let mut out = Vec::new();

    if let Ok(Some(req)) = parse_request(data) {
        assert!(req.head_len <= data.len());
        for span in [req.uri, req.path].into_iter().chain(req.host) {
            assert!(span.start <= span.end && span.end as usize <= req.head_len);
        }
        let fwd = Forward {
            client_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            proto: "http",
            listener_port: 80,
            request_start_ms: 1_700_000_000_000,
            random_id: u128::from(ctl) * 0x0101_0101_0101_0101_0101_0101_0101_0101,
            upstream_close: ctl & 1 == 1,
            extra: &[],
        };
        write_request_head(data, &req, &fwd, &mut out);
        // The rewrite adds up to five headers and ~150 bytes, so a request at the limits may
        // exceed them once rewritten; anything else must re-parse (an HTTP/1.0 request
        // without any host too: it gets an empty Host).
        match parse_request(&out) {
            Err(ParseError::TooManyHeaders | ParseError::HeadTooLarge) => {}
            other => {
                let re = other
                    .expect("rewritten request parses")
                    .expect("rewritten request is complete");
                assert_eq!(re.framing, req.framing);
                assert_eq!(re.upgrade, req.upgrade);
                assert_eq!(re.uri.get(&out), req.uri.get(data));
                assert!(re.host.is_some());
            }
        }
    }

    let method = match ctl % 4 {
        0 => Method::Get,
        1 => Method::Head,
        2 => Method::Post,
        _ => Method::Other,
    };
    if let Ok(Some(resp)) = parse_response(data, method) {
        assert!(resp.head_len <= data.len());
        out.clear();
        let opts = ResponseOpts {
            close: ctl & 2 == 2,
            extra: &[(b"Set-Cookie", b"a=b")],
            http10: ctl & 4 == 4,
        };
        write_response_head(data, &resp, &opts, &mut out);
        // The rewrite may add two headers; at the limits that can exceed them.
        match parse_response(&out, method) {
            Err(ParseError::TooManyHeaders | ParseError::HeadTooLarge) => {}
            other => {
                let re = other
                    .expect("rewritten response parses")
                    .expect("rewritten response is complete");
                // An HTTP/1.0 client never gets Transfer-Encoding: a chunked body goes
                // out decoded, ended by the close.
                let want = if opts.http10 && resp.framing == Framing::Chunked {
                    Framing::Close
                } else {
                    resp.framing
                };
                assert_eq!((re.status, re.framing), (resp.status, want));
            }
        }
    }

    let framing = match (ctl >> 2) % 4 {
        0 => Framing::Chunked,
        1 => Framing::Length(u64::from(ctl)),
        2 => Framing::Close,
        _ => Framing::Empty,
    };
    let step = usize::from(ctl >> 4) + 1;
    let mut body = BodyReader::new(framing);
    let mut pos = 0;
    while pos < data.len() {
        let end = (pos + step).min(data.len());
        match body.advance(&data[pos..end]) {
            Ok(a) => {
                assert!(a.used <= end - pos);
                assert_eq!(a.done, body.is_done());
                pos += a.used;
                if a.done || a.used == 0 {
                    break;
                }
            }
            Err(_) => break,
        }
    }
});
