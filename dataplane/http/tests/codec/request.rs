//! Request head parsing: methods, versions, connection management, targets, limits and the
//! anti-smuggling rules.

use crate::req;
use flynn_http::{parse_request, Framing, Method, ParseError, MAX_HEAD, MAX_HEADERS};

#[test]
fn methods() {
    let table: &[(&str, Method)] = &[
        ("GET", Method::Get),
        ("HEAD", Method::Head),
        ("POST", Method::Post),
        ("PUT", Method::Put),
        ("DELETE", Method::Delete),
        ("OPTIONS", Method::Options),
        ("PATCH", Method::Patch),
        ("CONNECT", Method::Connect),
        ("TRACE", Method::Trace),
        ("PROPFIND", Method::Other),
        ("get", Method::Other),
    ];
    for &(m, want) in table {
        let raw = format!("{m} / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(req(raw.as_bytes()).method, want, "{m}");
    }
}

#[test]
fn versions_and_keep_alive() {
    // (version, Connection headers, keep_alive, version_minor)
    let table: &[(&str, &[&str], bool, u8)] = &[
        ("HTTP/1.1", &[], true, 1),
        ("HTTP/1.1", &["close"], false, 1),
        ("HTTP/1.1", &["Close"], false, 1),
        ("HTTP/1.1", &["keep-alive"], true, 1),
        ("HTTP/1.1", &["foo, close"], false, 1),
        ("HTTP/1.1", &["foo", "CLOSE"], false, 1),
        ("HTTP/1.0", &[], false, 0),
        ("HTTP/1.0", &["keep-alive"], true, 0),
        ("HTTP/1.0", &["Keep-Alive"], true, 0),
        ("HTTP/1.0", &["keep-alive, close"], false, 0),
    ];
    for &(version, conns, keep_alive, minor) in table {
        let mut raw = format!("GET / {version}\r\nHost: a\r\n");
        for c in conns {
            raw.push_str(&format!("Connection: {c}\r\n"));
        }
        raw.push_str("\r\n");
        let info = req(raw.as_bytes());
        assert_eq!(info.keep_alive, keep_alive, "{raw:?}");
        assert_eq!(info.version_minor, minor, "{raw:?}");
        assert!(!info.upgrade);
    }
}

/// A request in HTTP/1.2 to 1.9 parses and rewrites exactly as its HTTP/1.1 twin (the same
/// bytes with the minor digit lowered), cut short or not, valid or not.
#[test]
fn newer_minor_versions_parse_and_rewrite_as_their_1_1_twin() {
    let many_fields: String = (0..MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
    let big = format!("X-Big: {}\r\n", "b".repeat(MAX_HEAD - 100));
    let heads: Vec<String> = vec![
        "GET / HTTP/1.2\r\nHost: a\r\n\r\n".into(),
        "POST /p?q=1 HTTP/1.9\r\nHost: a.example\r\nContent-Length: 3\r\n\r\nabc".into(),
        "PUT /x HTTP/1.5\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: x\r\nX: 1\r\n\r\n0\r\n\r\n"
            .into(),
        "GET http://h.example/p HTTP/1.3\r\nHost: other\r\n\r\n".into(),
        "\r\n\nGET / HTTP/1.4\nHost: a\n\n".into(),
        "GET / HTTP/1.2\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n".into(),
        format!("GET / HTTP/1.2\r\nHost: a\r\n{many_fields}\r\n"),
        format!("GET / HTTP/1.2\r\nHost: a\r\n{big}\r\n"),
        "GET / HTTP/1.2\r\nHost: a\r\nBad Name: x\r\n\r\n".into(),
        "GET / HTTP/1.2\r\nHost: a\r\n Folded: x\r\n\r\n".into(),
        "GET / HTTP/1.2\rX\r\nHost: a\r\n\r\n".into(),
        "GET / HTTP/1.2\r\n\r\n".into(),
        "GET /a b HTTP/1.2\r\nHost: a\r\n\r\n".into(),
        "G(T / HTTP/1.2\r\nHost: a\r\n\r\n".into(),
        "GET /\x7f HTTP/1.2\r\nHost: a\r\n\r\n".into(),
    ];
    let fwd = crate::fwd();
    for head in &heads {
        let newer = head.as_bytes();
        let at = head.find("HTTP/1.").unwrap() + 7;
        let mut twin = newer.to_vec();
        twin[at] = b'1';
        let ends = (0..=newer.len().min(300)).chain(newer.len().saturating_sub(3)..=newer.len());
        for end in ends {
            let (n, t) = (&newer[..end], &twin[..end]);
            let (got, want) = (parse_request(n), parse_request(t));
            assert_eq!(
                format!("{got:?}"),
                format!("{want:?}"),
                "{head:?} cut at {end}"
            );
            if let (Ok(Some(g)), Ok(Some(w))) = (got, want) {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                flynn_http::write_request_head(n, &g, &fwd, &mut a);
                flynn_http::write_request_head(t, &w, &fwd, &mut b);
                assert_eq!(
                    String::from_utf8_lossy(&a),
                    String::from_utf8_lossy(&b),
                    "{head:?} cut at {end}"
                );
                assert!(!a.is_empty());
            }
        }
    }
}

#[test]
fn bad_versions() {
    // (HTTP/1.2 to 1.9 are read as HTTP/1.1: `request::version_tests`.)
    for v in ["HTTP/2.0", "HTTP/0.9", "http/1.1", "HTTP/1.10"] {
        let raw = format!("GET / {v}\r\nHost: a\r\n\r\n");
        let got = parse_request(raw.as_bytes());
        assert!(
            matches!(got, Err(ParseError::BadVersion | ParseError::Malformed)),
            "{v}: {got:?}"
        );
    }
    let got = parse_request(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n");
    assert_eq!(got.unwrap_err(), ParseError::BadVersion);
    assert_eq!(ParseError::BadVersion.status(), 505);
}

#[test]
fn upgrade_detection() {
    // (Connection headers, version, upgrade)
    let table: &[(&[&str], &str, bool)] = &[
        (&["upgrade"], "HTTP/1.1", true),
        (&["Upgrade"], "HTTP/1.1", true),
        (&["upGradE"], "HTTP/1.1", true),
        (&["keep-alive, Upgrade"], "HTTP/1.1", true),
        (
            &["upGrade, custom-Conn-header,   ,Another-option   "],
            "HTTP/1.1",
            true,
        ),
        (&["keep-alive", "upgrade"], "HTTP/1.1", true),
        (&["upgrades"], "HTTP/1.1", false),
        (&["keep-alive"], "HTTP/1.1", false),
        (&[], "HTTP/1.1", false),
        (&["upgrade"], "HTTP/1.0", false),
    ];
    for &(conns, version, want) in table {
        let mut raw = format!("GET /ws {version}\r\nHost: a\r\nUpgrade: websocket\r\n");
        for c in conns {
            raw.push_str(&format!("Connection: {c}\r\n"));
        }
        raw.push_str("\r\n");
        assert_eq!(req(raw.as_bytes()).upgrade, want, "{raw:?}");
    }
}

#[test]
fn targets_path_and_host() {
    // (request line target, Host header, uri, path, host)
    type Row<'a> = (&'a str, Option<&'a str>, &'a str, &'a str, Option<&'a str>);
    let table: &[Row] = &[
        ("/", Some("example.com"), "/", "/", Some("example.com")),
        (
            "/a/b?c=d",
            Some("Example.COM:8080"),
            "/a/b?c=d",
            "/a/b",
            Some("Example.COM:8080"),
        ),
        ("//foo/bar", Some("a"), "//foo/bar", "//foo/bar", Some("a")),
        // RFC 9112 §3.2.2: the target's authority, not the Host header.
        (
            "http://h.example/p?q",
            Some("other"),
            "http://h.example/p?q",
            "/p",
            Some("h.example"),
        ),
        (
            "http://u@h.example:8080/p",
            Some("other"),
            "http://u@h.example:8080/p",
            "/p",
            Some("h.example:8080"),
        ),
        (
            "http://h.example/p?q",
            None,
            "http://h.example/p?q",
            "/p",
            Some("h.example"),
        ),
        (
            "http://h.example",
            None,
            "http://h.example",
            "",
            Some("h.example"),
        ),
        ("*", Some("a"), "*", "", Some("a")),
        ("/x", Some(""), "/x", "/x", Some("")),
    ];
    for &(target, host, uri, path, want_host) in table {
        // Without a Host header only HTTP/1.0 is acceptable.
        let version = if host.is_some() { "1.1" } else { "1.0" };
        let mut raw = format!("OPTIONS {target} HTTP/{version}\r\n");
        if let Some(h) = host {
            raw.push_str(&format!("Host: {h}\r\n"));
        }
        raw.push_str("\r\n");
        let buf = raw.as_bytes();
        let info = req(buf);
        assert_eq!(info.uri.get(buf), uri.as_bytes(), "{raw:?}");
        assert_eq!(info.path.get(buf), path.as_bytes(), "{raw:?}");
        assert_eq!(
            info.host.map(|h| h.get(buf)),
            want_host.map(str::as_bytes),
            "{raw:?}"
        );
        assert_eq!(info.head_len, buf.len());
    }
}

#[test]
fn host_rules() {
    let table: &[(&[u8], Result<(), ParseError>)] = &[
        (b"GET / HTTP/1.1\r\n\r\n", Err(ParseError::Malformed)),
        (
            b"GET http://a/ HTTP/1.1\r\n\r\n",
            Err(ParseError::Malformed),
        ),
        (b"GET / HTTP/1.0\r\n\r\n", Ok(())),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            Err(ParseError::Malformed),
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            Err(ParseError::Malformed),
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n",
            Err(ParseError::Malformed),
        ),
        (b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", Ok(())),
        (b"GET / HTTP/1.1\r\nhOsT: a\r\n\r\n", Ok(())),
    ];
    for &(raw, want) in table {
        let got = parse_request(raw).map(|r| assert!(r.is_some()));
        assert_eq!(got, want, "{:?}", String::from_utf8_lossy(raw));
    }
    assert_eq!(ParseError::Malformed.status(), 400);
}

#[test]
fn framing_and_expect() {
    let table: &[(&str, Framing, bool)] = &[
        ("", Framing::Empty, false),
        ("Content-Length: 0\r\n", Framing::Length(0), false),
        ("Content-Length: 12\r\n", Framing::Length(12), false),
        (
            "Content-Length: 5\r\nContent-Length: 5\r\n",
            Framing::Length(5),
            false,
        ),
        ("Content-Length: 5, 5\r\n", Framing::Length(5), false),
        ("Transfer-Encoding: chunked\r\n", Framing::Chunked, false),
        ("Transfer-Encoding: Chunked\r\n", Framing::Chunked, false),
        (
            "Expect: 100-continue\r\nContent-Length: 3\r\n",
            Framing::Length(3),
            true,
        ),
        ("Expect: 100-Continue\r\n", Framing::Empty, true),
        ("Expect: something\r\n", Framing::Empty, false),
    ];
    for &(headers, framing, expect) in table {
        let raw = format!("POST / HTTP/1.1\r\nHost: a\r\n{headers}\r\n");
        let info = req(raw.as_bytes());
        assert_eq!(info.framing, framing, "{raw:?}");
        assert_eq!(info.expect_continue, expect, "{raw:?}");
    }
    // An HTTP/1.0 client's expectation is ignored (RFC 9110 §10.1.1).
    let info = req(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
    assert!(!info.expect_continue);
}

#[test]
fn smuggling_table() {
    let table: &[(&str, &str, ParseError)] = &[
        (
            "1.1",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            ParseError::Smuggling,
        ),
        (
            "1.1",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            ParseError::Smuggling,
        ),
        (
            "1.1",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            ParseError::Smuggling,
        ),
        ("1.1", "Content-Length: 5, 6\r\n", ParseError::Smuggling),
        (
            "1.1",
            "Transfer-Encoding: chunked, gzip\r\n",
            ParseError::Smuggling,
        ),
        ("1.1", "Transfer-Encoding: gzip\r\n", ParseError::Smuggling),
        (
            "1.1",
            "Transfer-Encoding: identity\r\n",
            ParseError::Smuggling,
        ),
        (
            "1.1",
            "Transfer-Encoding: gzip, chunked\r\n",
            ParseError::Smuggling,
        ),
        (
            "1.1",
            "Transfer-Encoding: chunked, chunked\r\n",
            ParseError::Smuggling,
        ),
        (
            "1.1",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            ParseError::Smuggling,
        ),
        (
            "1.1",
            "Transfer-Encoding: chunked,\r\n",
            ParseError::Smuggling,
        ),
        ("1.1", "Transfer-Encoding: \r\n", ParseError::Smuggling),
        (
            "1.1",
            "Transfer-Encoding: xchunked\r\n",
            ParseError::Smuggling,
        ),
        (
            "1.0",
            "Transfer-Encoding: chunked\r\n",
            ParseError::Malformed,
        ),
        ("1.1", "Content-Length: abc\r\n", ParseError::Malformed),
        ("1.1", "Content-Length: -1\r\n", ParseError::Malformed),
        ("1.1", "Content-Length: +5\r\n", ParseError::Malformed),
        ("1.1", "Content-Length: 0x5\r\n", ParseError::Malformed),
        ("1.1", "Content-Length: 5 5\r\n", ParseError::Malformed),
        ("1.1", "Content-Length: \r\n", ParseError::Malformed),
        (
            "1.1",
            "Content-Length: 99999999999999999999999\r\n",
            ParseError::Malformed,
        ),
        ("1.1", "Content-Length : 5\r\n", ParseError::Malformed),
        (
            "1.1",
            "Content-Length: 5\r\n folded\r\n",
            ParseError::Malformed,
        ),
        ("1.1", "X-A: a\0b\r\n", ParseError::Malformed),
        ("1.1", "X-A: a\rb\r\n", ParseError::Malformed),
        ("1.1", " X-A: a\r\n", ParseError::Malformed),
        ("1.1", "X A: a\r\n", ParseError::Malformed),
    ];
    for &(version, headers, want) in table {
        let raw = format!("POST / HTTP/{version}\r\nHost: a\r\n{headers}\r\n");
        let got = parse_request(raw.as_bytes());
        assert_eq!(got.unwrap_err(), want, "{raw:?}");
    }
    assert_eq!(ParseError::Smuggling.status(), 400);
}

#[test]
fn malformed_request_lines() {
    let table: &[&[u8]] = &[
        b"GET\r\nHost: a\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\nHost: a\r\n\r\n",
        b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ];
    for raw in table {
        let got = parse_request(raw);
        assert!(got.is_err(), "{:?}: {got:?}", String::from_utf8_lossy(raw));
    }
}

#[test]
fn incomplete_heads() {
    let full = b"GET /p HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\nNEXT";
    let head_len = full.len() - 4;
    for cut in 0..head_len {
        let got = parse_request(&full[..cut]);
        assert!(matches!(got, Ok(None)), "cut {cut}: {got:?}");
    }
    for cut in head_len..=full.len() {
        assert_eq!(req(&full[..cut]).head_len, head_len);
    }
}

#[test]
fn leading_blank_lines_are_skipped() {
    let raw = b"\r\nGET /p HTTP/1.1\r\nHost: a\r\n\r\n";
    let info = req(raw);
    assert_eq!(info.uri.get(raw), b"/p");
    assert_eq!(info.head_len, raw.len());
}

#[test]
fn head_size_limit() {
    // A head that never ends: incomplete below the limit, too large at it.
    let mut raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ".to_vec();
    raw.resize(MAX_HEAD - 1, b'x');
    assert!(matches!(parse_request(&raw), Ok(None)));
    raw.push(b'x');
    assert_eq!(parse_request(&raw).unwrap_err(), ParseError::HeadTooLarge);
    raw.extend_from_slice(b"\r\n\r\n");
    assert_eq!(parse_request(&raw).unwrap_err(), ParseError::HeadTooLarge);
    assert_eq!(ParseError::HeadTooLarge.status(), 431);

    // A head that ends exactly at the limit is accepted.
    let mut raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ".to_vec();
    raw.resize(MAX_HEAD - 4, b'x');
    raw.extend_from_slice(b"\r\n\r\n");
    assert_eq!(req(&raw).head_len, MAX_HEAD);
}

#[test]
fn header_count_limit() {
    let mut raw = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
    for i in 1..MAX_HEADERS {
        raw.push_str(&format!("X-{i}: v\r\n"));
    }
    let ok = format!("{raw}\r\n");
    assert!(parse_request(ok.as_bytes()).unwrap().is_some());
    let too_many = format!("{raw}X-Last: v\r\n\r\n");
    assert_eq!(
        parse_request(too_many.as_bytes()).unwrap_err(),
        ParseError::TooManyHeaders
    );
    assert_eq!(ParseError::TooManyHeaders.status(), 431);
}
