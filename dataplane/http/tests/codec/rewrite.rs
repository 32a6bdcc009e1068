//! Head rewriting in both directions (spec §1.6 and the router tests of §1.10).

use crate::{client_head, fwd, req, rewrite, rewrite_with, value, values};
use flynn_http::{valid_request_id, write_request_head, Forward};
use std::net::{IpAddr, Ipv6Addr};

#[test]
fn request_line_is_verbatim_and_http11() {
    let table = [
        ("GET", "/", "HTTP/1.1"),
        ("GET", "//foo/bar", "HTTP/1.1"),
        ("GET", "/foo?a=b&c=%2F(x):y", "HTTP/1.1"),
        (
            "GET",
            "/O08YqxVCf6KRJM6I8p594tzJizQ=/200x300/filters:no_upscale()/http://i.imgur.com/Wru0cNM.jpg?foo=bar",
            "HTTP/1.1",
        ),
        (
            "GET",
            "http://example.com/O08YqxVCf6KRJM6I8p594tzJizQ=/200x300/filters:no_upscale()/x.jpg?foo=bar",
            "HTTP/1.1",
        ),
        ("GET", "/query?first=this+is+a+field&second=was+it+clear+%28already%29%3F", "HTTP/1.1"),
        ("PROPFIND", "/dav/", "HTTP/1.1"),
        ("GET", "/old", "HTTP/1.0"),
    ];
    for (method, uri, version) in table {
        let raw = format!("{method} {uri} {version}\r\nHost: example.com\r\n\r\n");
        let head = rewrite(raw.as_bytes());
        let want = format!("{method} {uri} HTTP/1.1\r\n");
        assert!(head.starts_with(&want), "{head:?}");
        assert_eq!(value(&head, "Host"), Some("example.com"));
    }
}

#[test]
fn forwarded_headers_append() {
    // (client headers, X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Port)
    let table: &[(&str, &str, &str, &str)] = &[
        ("", "127.0.0.1", "http", "8080"),
        (
            "X-Forwarded-For: 192.168.1.1\r\n",
            "192.168.1.1, 127.0.0.1",
            "http",
            "8080",
        ),
        (
            "X-Forwarded-For: 10.0.0.1, 10.0.0.2\r\nx-forwarded-for: 10.0.0.3\r\n",
            "10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1",
            "http",
            "8080",
        ),
        (
            "X-Forwarded-Proto: https\r\n",
            "127.0.0.1",
            "https, http",
            "8080",
        ),
        (
            "X-Forwarded-Port: 443\r\n",
            "127.0.0.1",
            "http",
            "443, 8080",
        ),
        (
            "X-Forwarded-Port: 1\r\nX-Forwarded-Port: 2\r\n",
            "127.0.0.1",
            "http",
            "1, 2, 8080",
        ),
    ];
    for &(headers, xff, proto, port) in table {
        let raw = format!("GET / HTTP/1.1\r\nHost: a\r\n{headers}\r\n");
        let head = rewrite(raw.as_bytes());
        assert_eq!(value(&head, "X-Forwarded-For"), Some(xff), "{raw:?}");
        assert_eq!(value(&head, "X-Forwarded-Proto"), Some(proto), "{raw:?}");
        assert_eq!(value(&head, "X-Forwarded-Port"), Some(port), "{raw:?}");
    }
}

/// The router's X- fields spelt with underscores (one variable with the real ones for
/// CGI-style backends) are taken as those fields: rewritten, never passed on as sent.
#[test]
fn forwarded_fields_spelt_with_underscores_are_not_passed_by() {
    let head = rewrite(
        b"GET / HTTP/1.1\r\nHost: a\r\nX_Forwarded_For: 6.6.6.6\r\nx_forwarded-proto: gopher\r\n\
          X_Request_Start: 1\r\nX_FORWARDED_PORT: 1\r\n\r\n",
    );
    assert!(!head.contains('_'), "{head:?}");
    assert_eq!(value(&head, "X-Forwarded-For"), Some("6.6.6.6, 127.0.0.1"));
    assert_eq!(value(&head, "X-Forwarded-Proto"), Some("gopher, http"));
    assert_eq!(value(&head, "X-Forwarded-Port"), Some("1, 8080"));
    assert_eq!(value(&head, "X-Request-Start"), Some("1700000000123"));
}

#[test]
fn forwarded_for_ipv6_and_https() {
    let f = Forward {
        client_ip: IpAddr::V6(Ipv6Addr::LOCALHOST),
        proto: "https",
        listener_port: 443,
        ..fwd()
    };
    let head = rewrite_with(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", &f);
    assert_eq!(value(&head, "X-Forwarded-For"), Some("::1"));
    assert_eq!(value(&head, "X-Forwarded-Proto"), Some("https"));
    assert_eq!(value(&head, "X-Forwarded-Port"), Some("443"));
}

#[test]
fn request_start_is_replaced() {
    let head = rewrite(b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Start: 1\r\n\r\n");
    let start = value(&head, "X-Request-Start").unwrap();
    assert_eq!(start, "1700000000123");
    assert_eq!(start.len(), 13);
}

#[test]
fn request_id_table() {
    let fresh = "01234567-89ab-4def-8123-456789abcdef";
    let charset = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/=-";
    let a = |n: usize| "a".repeat(n);
    // (client value or none, kept)
    let table: Vec<(Option<String>, bool)> = vec![
        (None, false),
        (Some(String::new()), false),
        (Some(a(1)), false),
        (Some(a(19)), false),
        (Some(a(20)), true),
        (Some(a(200)), true),
        (Some(a(201)), false),
        (Some(charset.to_string()), true),
        (Some(format!("{}*", a(30))), false),
        (Some(format!("{} b", a(30))), false),
    ];
    for (client, kept) in table {
        let mut raw = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        if let Some(v) = &client {
            raw.push_str(&format!("X-Request-Id: {v}\r\n"));
            assert_eq!(valid_request_id(v.as_bytes()), kept, "{v:?}");
        }
        raw.push_str("\r\n");
        let head = rewrite(raw.as_bytes());
        let got = value(&head, "X-Request-Id").unwrap();
        if kept {
            assert_eq!(Some(got), client.as_deref());
        } else {
            assert_eq!(got, fresh, "{client:?}");
        }
    }
    // Several: the first decides.
    let raw = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: {}\r\nX-Request-Id: short\r\n\r\n",
        a(25)
    );
    assert_eq!(
        value(&rewrite(raw.as_bytes()), "X-Request-Id"),
        Some(a(25).as_str())
    );
    let raw = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: short\r\nX-Request-Id: {}\r\n\r\n",
        a(25)
    );
    assert_eq!(value(&rewrite(raw.as_bytes()), "X-Request-Id"), Some(fresh));
}

/// The six Connection cases of Flynn's `TestConnectionHeaders`:
/// (Connection value, upgrade request, absent, present).
type ConnCase = (
    &'static str,
    bool,
    &'static [&'static str],
    &'static [&'static str],
);
const CONNECTION_CASES: &[ConnCase] = &[
    (
        "",
        false,
        &["Transfer-Encoding", "Upgrade"],
        &["Another-Option", "Custom-Conn-Header", "Keep-Alive"],
    ),
    (
        "keep-alive",
        false,
        &["Keep-Alive", "Transfer-Encoding", "Upgrade"],
        &["Another-Option", "Custom-Conn-Header"],
    ),
    (
        "custom-conn-header",
        false,
        &["Custom-Conn-Header", "Transfer-Encoding", "Upgrade"],
        &["Another-Option", "Keep-Alive"],
    ),
    (
        "custom-conn-header,   ,another-option   ",
        false,
        &[
            "Another-Option",
            "Custom-Conn-Header",
            "Transfer-Encoding",
            "Upgrade",
        ],
        &["Keep-Alive"],
    ),
    (
        "upgrade",
        true,
        &["Transfer-Encoding"],
        &["Custom-Conn-Header", "Keep-Alive", "Upgrade"],
    ),
    (
        "upGrade, custom-Conn-header,   ,Another-option   ",
        true,
        &["Transfer-Encoding"],
        &[
            "Another-Option",
            "Custom-Conn-Header",
            "Keep-Alive",
            "Upgrade",
        ],
    ),
];

#[test]
fn connection_table_request_direction() {
    for &(conn, upgrade, absent, present) in CONNECTION_CASES {
        let mut raw = String::from("GET / HTTP/1.1\r\nHost: example.com\r\n");
        if !conn.is_empty() {
            raw.push_str(&format!("Connection: {conn}\r\n"));
        }
        raw.push_str(
            "Another-Option: test-another-option\r\nCustom-Conn-Header: test-custom-conn-header\r\n\
             Keep-Alive: test-keep-alive\r\nTE: trailers\r\nTrailers: x\r\nUpgrade: test-upgrade\r\n\r\n",
        );
        assert_eq!(req(raw.as_bytes()).upgrade, upgrade, "{conn:?}");
        let head = rewrite(raw.as_bytes());
        for h in absent.iter().chain(&["TE", "Trailers"]) {
            assert_eq!(
                value(&head, h),
                None,
                "{h} with Connection {conn:?}: {head}"
            );
        }
        for h in present {
            assert!(
                value(&head, h).is_some(),
                "{h} with Connection {conn:?}: {head}"
            );
        }
        // Connection itself survives only on the upgrade path, verbatim.
        let want_conn = if upgrade { Some(conn) } else { None };
        assert_eq!(value(&head, "Connection"), want_conn.map(str::trim_end));
    }
}

#[test]
fn connection_table_response_direction() {
    for &(conn, _, absent, present) in CONNECTION_CASES {
        let mut raw = String::from("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n");
        if !conn.is_empty() {
            raw.push_str(&format!("Connection: {conn}\r\n"));
        }
        raw.push_str(
            "Keep-Alive: test-keep-alive\r\nAnother-Option: test-another-option\r\n\
             Custom-Conn-Header: test-custom-conn-header\r\nUpgrade: test-upgrade\r\n\
             Trailers: x\r\n\r\n",
        );
        let head = client_head(raw.as_bytes(), false);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        for h in absent.iter().chain(&["Trailers"]) {
            assert_eq!(
                value(&head, h),
                None,
                "{h} with Connection {conn:?}: {head}"
            );
        }
        for h in present {
            assert!(
                value(&head, h).is_some(),
                "{h} with Connection {conn:?}: {head}"
            );
        }
        assert_eq!(value(&head, "Content-Length"), Some("0"));
    }
}

#[test]
fn upgrade_request_keeps_upgrade_value() {
    for token in ["upgrade", "Upgrade", "upGradE"] {
        let raw = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: {token}\r\nUpgrade: Some-proto-2\r\n\r\n"
        );
        let f = Forward {
            upstream_close: true,
            ..fwd()
        };
        let head = rewrite_with(raw.as_bytes(), &f);
        assert_eq!(value(&head, "Connection"), Some(token));
        assert_eq!(value(&head, "Upgrade"), Some("Some-proto-2"));
    }
}

#[test]
fn client_close_becomes_backend_keep_alive() {
    let raw = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    assert!(!req(raw).keep_alive);
    let head = rewrite(raw);
    assert_eq!(value(&head, "Connection"), None);
    // disable_keep_alives on the route: the backend is told to close.
    let f = Forward {
        upstream_close: true,
        ..fwd()
    };
    assert_eq!(value(&rewrite_with(raw, &f), "Connection"), Some("close"));
}

#[test]
fn proxy_auth_passes_through() {
    for conn in ["", "Connection: upgrade\r\nUpgrade: websocket\r\n"] {
        let raw = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{conn}Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
             Proxy-Authenticate: Basic realm=x\r\n\r\n"
        );
        let head = rewrite(raw.as_bytes());
        assert_eq!(
            value(&head, "Proxy-Authorization"),
            Some("Basic Zm9vOmJhcg==")
        );
        assert_eq!(value(&head, "Proxy-Authenticate"), Some("Basic realm=x"));
    }
    let head = client_head(
        b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\nContent-Length: 0\r\n\r\n",
        false,
    );
    assert_eq!(value(&head, "Proxy-Authenticate"), Some("Basic"));
}

#[test]
fn framing_headers_on_the_backend_side() {
    let head = rewrite(b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\n\r\n");
    assert_eq!(values(&head, "Transfer-Encoding"), ["chunked"]);
    // In plain decimal: a backend that detects the base would read `0012` as octal 10.
    let head = rewrite(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0012\r\n\r\n");
    assert_eq!(value(&head, "Content-Length"), Some("12"));
    assert_eq!(value(&head, "Transfer-Encoding"), None);
    // Connection cannot strip the framing or routing headers.
    let head =
        rewrite(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: content-length, host\r\n\r\n");
    assert_eq!(value(&head, "Content-Length"), Some("3"));
    assert_eq!(value(&head, "Host"), Some("a"));
}

#[test]
fn headers_keep_order_and_case() {
    let raw =
        b"GET / HTTP/1.1\r\nhost: a\r\nACCEPT: */*\r\nx-custom: Mixed Case\r\nCookie: a=b\r\n\r\n";
    let head = rewrite(raw);
    assert!(
        head.starts_with(
            "GET / HTTP/1.1\r\nhost: a\r\nACCEPT: */*\r\nx-custom: Mixed Case\r\nCookie: a=b\r\n"
        ),
        "{head}"
    );
}

#[test]
fn http10_absolute_form_gets_a_host() {
    let head = rewrite(b"GET http://example.com/x HTTP/1.0\r\n\r\n");
    assert!(head.starts_with("GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\n"));
}

/// An HTTP/1.0 request without any host (routed by a catch-all route) goes out as HTTP/1.1
/// with an empty Host (RFC 9112 §3.2: no authority), which HTTP/1.1 parsers take; without
/// one, backends (Go: 400) and `parse_request` refused it.
#[test]
fn http10_without_host_gets_an_empty_host() {
    let raw = b"GET / HTTP/1.0\r\n\r\n";
    let head = rewrite(raw);
    assert!(head.starts_with("GET / HTTP/1.1\r\nHost: \r\n"), "{head:?}");
    let re = req(head.as_bytes());
    assert_eq!(re.version_minor, 1);
    assert_eq!(re.host.map(|h| h.get(head.as_bytes())), Some(&b""[..]));
}

#[test]
fn absolute_form_host_replaces_the_clients_host() {
    // Routed by the target's host, so that is the Host the backend sees (RFC 9112 §3.2.2).
    let head = rewrite(b"GET http://victim.app/x HTTP/1.1\r\nHost: evil.com\r\nA: b\r\n\r\n");
    assert!(
        head.starts_with("GET http://victim.app/x HTTP/1.1\r\nHost: victim.app\r\nA: b\r\n"),
        "{head}"
    );
    assert!(!head.contains("evil.com"), "{head}");
    // The same host in both: the client's field is kept as it is.
    let head = rewrite(b"GET http://a.app/x HTTP/1.1\r\nhost: A.app\r\n\r\n");
    assert!(
        head.starts_with("GET http://a.app/x HTTP/1.1\r\nhost: A.app\r\n"),
        "{head}"
    );
}

/// Naming Host in Connection does not make the client's Host survive the absolute-form
/// rewrite: the backend sees the host the request was routed by.
#[test]
fn connection_naming_host_does_not_keep_the_clients_host() {
    let head =
        rewrite(b"GET http://victim.app/x HTTP/1.1\r\nHost: evil.com\r\nConnection: host\r\n\r\n");
    assert!(
        head.starts_with("GET http://victim.app/x HTTP/1.1\r\nHost: victim.app\r\n"),
        "{head}"
    );
    assert!(!head.contains("evil.com"), "{head}");
}

/// Content-Length and Transfer-Encoding spelt with underscores are dropped: CGI-style
/// backends would read them as the real fields and frame the body differently.
#[test]
fn framing_fields_spelt_with_underscores_are_dropped() {
    let head = rewrite(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer_Encoding: chunked\r\n\
          content_length: 99\r\nA_b: c\r\n\r\n",
    );
    assert!(!head.to_ascii_lowercase().contains("transfer"), "{head:?}");
    assert!(!head.contains("99"), "{head:?}");
    assert_eq!(value(&head, "Content-Length"), Some("5"));
    // Other fields with underscores pass as they are.
    assert_eq!(value(&head, "A_b"), Some("c"));
}

#[test]
fn extra_headers_come_last_and_output_is_appended() {
    let raw = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    let info = req(raw);
    let extra: &[(&[u8], &[u8])] = &[(b"X-Extra", b"1"), (b"X-More", b"2")];
    let f = Forward { extra, ..fwd() };
    let mut out = b"PREFIX".to_vec();
    write_request_head(raw, &info, &f, &mut out);
    let head = std::str::from_utf8(&out[6..]).unwrap();
    assert!(out.starts_with(b"PREFIX"));
    assert!(head.ends_with("X-Extra: 1\r\nX-More: 2\r\n\r\n"), "{head}");
}

#[test]
fn full_rewrite_exact_bytes() {
    let raw = b"POST /api?x=1 HTTP/1.1\r\nHost: example.com\r\nConnection: keep-alive\r\n\
                Keep-Alive: timeout=5\r\nX-Forwarded-For: 192.168.1.1\r\nContent-Length: 2\r\n\r\nhi";
    let head = rewrite(raw);
    assert_eq!(
        head,
        "POST /api?x=1 HTTP/1.1\r\nHost: example.com\r\nContent-Length: 2\r\n\
         X-Forwarded-For: 192.168.1.1, 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\
         X-Forwarded-Port: 8080\r\nX-Request-Start: 1700000000123\r\n\
         X-Request-Id: 01234567-89ab-4def-8123-456789abcdef\r\n\r\n"
    );
}

/// A Content-Length list of equal values, or the field repeated, goes on as one field with
/// one value, both ways.
#[test]
fn content_length_lists_go_out_as_one_value() {
    for fields in [
        "Content-Length: 5, 5\r\n",
        "Content-Length: 5\r\nContent-Length: 5\r\n",
        "Content-Length:  5 ,5\r\nContent-Length: 5\r\n",
        "Content-Length: 5\r\n",
        "Content-Length: 5, 05\r\n",
        "Content-Length: 05, 5\r\n",
        "Content-Length: 005\r\nContent-Length: 5\r\n",
    ] {
        let raw = format!("POST / HTTP/1.1\r\nHost: a\r\n{fields}\r\nhello");
        let head = rewrite(raw.as_bytes());
        assert_eq!(
            values(&head, "Content-Length"),
            ["5"],
            "{fields:?}: {head:?}"
        );
        let raw = format!("HTTP/1.1 200 OK\r\n{fields}\r\nhello");
        let head = client_head(raw.as_bytes(), false);
        assert_eq!(
            values(&head, "Content-Length"),
            ["5"],
            "{fields:?}: {head:?}"
        );
    }
}

/// Which fields a Connection list removes does not depend on its tokens' case, repetition,
/// padding or empty elements, nor on how many of them there are.
#[test]
fn connection_tokens_mixed_case_repeated_padded_and_empty() {
    let fields = "A: 1\r\nb: 2\r\nc: 3\r\na: 4\r\nD: 5\r\nX-Kept: 6\r\n";
    for conn in [
        "Connection: , a ,, B\r\nConnection: c,C, c\t,d\r\n",
        "Connection: ,,\r\nConnection: \tA\t,b,a,B,,c,d,D\r\n",
        "Connection: d\r\nConnection: c\r\nConnection: b\r\nConnection: a\r\n",
    ] {
        for many in [1, 3000] {
            // After thousands of tokens naming nothing, marking takes its sorted lookup.
            let conn = format!("Connection: {}\r\n{conn}", "x, Y,".repeat(many));
            let raw = format!("GET / HTTP/1.1\r\nHost: h\r\n{conn}{fields}\r\n");
            let head = rewrite(raw.as_bytes());
            for gone in ["A", "b", "c", "D", "Connection"] {
                assert_eq!(values(&head, gone), Vec::<&str>::new(), "{gone}: {head}");
            }
            assert_eq!(value(&head, "X-Kept"), Some("6"), "{head}");
            let raw = format!("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n{conn}{fields}\r\n");
            let head = client_head(raw.as_bytes(), false);
            for gone in ["A", "b", "c", "D", "Connection"] {
                assert_eq!(values(&head, gone), Vec::<&str>::new(), "{gone}: {head}");
            }
            assert_eq!(value(&head, "X-Kept"), Some("6"), "{head}");
        }
    }
    // An empty list, or one naming nothing present, removes nothing else.
    for conn in ["Connection: ,\r\n", "Connection: x, y\r\n"] {
        let raw = format!("GET / HTTP/1.1\r\nHost: h\r\n{conn}{fields}\r\n");
        let head = rewrite(raw.as_bytes());
        for kept in ["A", "b", "c", "D", "X-Kept"] {
            assert_eq!(
                values(&head, kept).len(),
                1 + usize::from(kept == "A"),
                "{kept}: {head}"
            );
        }
    }
}

/// Content-Length goes out in plain decimal whichever way the sender spelt the number.
#[test]
fn content_length_goes_out_in_decimal() {
    for (sent, want) in [
        ("0", "0"),
        ("00", "0"),
        ("0012", "12"),
        ("010", "10"),
        ("7", "7"),
        ("18446744073709551615", "18446744073709551615"),
        ("00018446744073709551615", "18446744073709551615"),
    ] {
        let raw = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {sent}\r\n\r\n");
        let head = rewrite(raw.as_bytes());
        assert_eq!(values(&head, "Content-Length"), [want], "{sent}: {head}");
        let raw = format!("HTTP/1.1 200 OK\r\nContent-Length: {sent}\r\n\r\n");
        let head = client_head(raw.as_bytes(), false);
        assert_eq!(values(&head, "Content-Length"), [want], "{sent}: {head}");
    }
}
