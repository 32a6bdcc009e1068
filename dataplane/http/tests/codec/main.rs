//! Codec behaviour tests, driven through the public API with plain byte slices.

mod body;
mod random;
mod request;
mod response;
mod rewrite;

use flynn_http::{
    parse_request, parse_response, write_request_head, write_response_head, Forward, Method,
    RequestInfo, ResponseInfo, ResponseOpts,
};
use std::net::{IpAddr, Ipv4Addr};

/// Parses a request that must be complete and valid.
pub fn req(raw: &[u8]) -> RequestInfo {
    match parse_request(raw) {
        Ok(Some(info)) => info,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(raw)),
    }
}

/// The router's usual facts: client 127.0.0.1 on an http listener at port 8080.
pub fn fwd() -> Forward<'static> {
    Forward {
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        proto: "http",
        listener_port: 8080,
        request_start_ms: 1_700_000_000_123,
        random_id: 0x0123_4567_89ab_cdef_0123_4567_89ab_cdef,
        upstream_close: false,
        extra: &[],
    }
}

/// Parses and rewrites a request; returns the backend head as a string.
pub fn rewrite_with(raw: &[u8], fwd: &Forward) -> String {
    let info = req(raw);
    let mut out = Vec::new();
    write_request_head(raw, &info, fwd, &mut out);
    String::from_utf8(out).expect("head is UTF-8 in these tests")
}

pub fn rewrite(raw: &[u8]) -> String {
    rewrite_with(raw, &fwd())
}

/// Parses a response (to GET) that must be complete and valid.
pub fn resp(raw: &[u8]) -> ResponseInfo {
    resp_to(raw, Method::Get)
}

pub fn resp_to(raw: &[u8], method: Method) -> ResponseInfo {
    match parse_response(raw, method) {
        Ok(Some(info)) => info,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(raw)),
    }
}

/// Parses and rewrites a response head for the client.
pub fn client_head(raw: &[u8], close: bool) -> String {
    let info = resp(raw);
    let mut out = Vec::new();
    write_response_head(
        raw,
        &info,
        &ResponseOpts {
            close,
            extra: &[],
            http10: false,
        },
        &mut out,
    );
    String::from_utf8(out).expect("head is UTF-8 in these tests")
}

/// All values of header `name` (case-insensitive) in a written head, in order.
pub fn values<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    assert!(head.ends_with("\r\n\r\n"), "head not terminated: {head:?}");
    head.split("\r\n")
        .skip(1)
        .filter_map(|line| line.split_once(": "))
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .collect()
}

/// The single value of header `name`, or None.
pub fn value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    let v = values(head, name);
    assert!(v.len() <= 1, "{name} repeated in {head:?}");
    v.first().copied()
}
