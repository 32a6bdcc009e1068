//! Response head parsing, framing decisions and the client-side head.

use crate::{client_head, resp, resp_to, value, values};
use flynn_http::{
    parse_response, write_response_head, Framing, Method, ParseError, ResponseOpts, MAX_HEAD,
};

#[test]
fn framing_table() {
    // (request method, response head, framing, keep_alive, upgrade)
    type Row<'a> = (Method, &'a str, Framing, bool, bool);
    let table: &[Row] = &[
        (
            Method::Get,
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            Framing::Length(5),
            true,
            false,
        ),
        (
            Method::Get,
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            Framing::Length(0),
            true,
            false,
        ),
        (
            Method::Get,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            Framing::Chunked,
            true,
            false,
        ),
        (
            Method::Get,
            "HTTP/1.1 200 OK\r\n\r\n",
            Framing::Close,
            false,
            false,
        ),
        (
            Method::Get,
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            Framing::Length(1),
            false,
            false,
        ),
        (
            Method::Head,
            "HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n",
            Framing::Empty,
            true,
            false,
        ),
        (
            Method::Head,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            Framing::Empty,
            true,
            false,
        ),
        (
            Method::Head,
            "HTTP/1.1 200 OK\r\n\r\n",
            Framing::Empty,
            true,
            false,
        ),
        (
            Method::Get,
            "HTTP/1.1 204 No Content\r\n\r\n",
            Framing::Empty,
            true,
            false,
        ),
        (
            Method::Get,
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
            Framing::Empty,
            true,
            false,
        ),
        (
            Method::Get,
            "HTTP/1.1 100 Continue\r\n\r\n",
            Framing::Empty,
            true,
            false,
        ),
        (
            Method::Get,
            "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
            Framing::Empty,
            true,
            false,
        ),
        (
            Method::Get,
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            Framing::Empty,
            false,
            true,
        ),
        (
            Method::Get,
            "HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n",
            Framing::Length(3),
            false,
            false,
        ),
        (
            Method::Get,
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\n",
            Framing::Length(3),
            true,
            false,
        ),
        (
            Method::Get,
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n",
            Framing::Close,
            false,
            false,
        ),
        (
            Method::Get,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 10, 10\r\n\r\n",
            Framing::Length(10),
            true,
            false,
        ),
    ];
    for &(method, raw, framing, keep_alive, upgrade) in table {
        let info = resp_to(raw.as_bytes(), method);
        assert_eq!(info.framing, framing, "{method:?} {raw:?}");
        assert_eq!(info.keep_alive, keep_alive, "{method:?} {raw:?}");
        assert_eq!(info.upgrade, upgrade, "{raw:?}");
        assert_eq!(info.head_len, raw.len());
    }
}

#[test]
fn status_and_version() {
    let info = resp(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
    assert_eq!((info.status, info.version_minor), (503, 0));
    let info = resp(b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(info.status, 200);
}

#[test]
fn rejected_responses() {
    let table: &[(&str, ParseError)] = &[
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            ParseError::Smuggling,
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n",
            ParseError::Smuggling,
        ),
        (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            ParseError::Smuggling,
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            ParseError::Malformed,
        ),
        ("HTTP/1.1 099 Low\r\n\r\n", ParseError::Malformed),
        ("HTTP/1.1 2000 OK\r\n\r\n", ParseError::Malformed),
        ("HTTP/2.0 200 OK\r\n\r\n", ParseError::BadVersion),
        (
            "HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
            ParseError::Malformed,
        ),
        (
            "HTTP/1.1 200 OK\r\nBad Name: a\r\n\r\n",
            ParseError::Malformed,
        ),
        ("hello\r\n\r\n", ParseError::BadVersion),
    ];
    for &(raw, want) in table {
        let got = parse_response(raw.as_bytes(), Method::Get);
        assert_eq!(got.unwrap_err(), want, "{raw:?}");
    }
}

#[test]
fn incomplete_and_too_large() {
    let full = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi";
    for cut in 0..full.len() - 2 {
        let got = parse_response(&full[..cut], Method::Get);
        assert!(matches!(got, Ok(None)), "cut {cut}: {got:?}");
    }
    let mut big = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
    big.resize(MAX_HEAD, b'x');
    assert_eq!(
        parse_response(&big, Method::Get).unwrap_err(),
        ParseError::HeadTooLarge
    );
}

#[test]
fn status_line_is_normalised() {
    let table: &[(&str, &str)] = &[
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\n",
        ),
        (
            "HTTP/1.0 200 Fine Thanks\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 Fine Thanks\r\n",
        ),
        (
            "HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 404 Not Found\r\n",
        ),
        (
            "HTTP/1.1 299 \r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 299 Unknown\r\n",
        ),
    ];
    for &(raw, line) in table {
        let head = client_head(raw.as_bytes(), false);
        assert!(head.starts_with(line), "{head:?}");
    }
}

#[test]
fn client_head_framing_and_close() {
    // Chunked stays chunked (body forwarded verbatim); TE is re-emitted once.
    let head = client_head(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX: y\r\n\r\n",
        false,
    );
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\nX: y\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    // Close-delimited bodies force Connection: close towards the client.
    let head = client_head(b"HTTP/1.1 200 OK\r\n\r\n", false);
    assert_eq!(values(&head, "Connection"), ["close"]);
    // opts.close adds it; the backend's own keep-alive Connection header is dropped.
    let head = client_head(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
        true,
    );
    assert_eq!(values(&head, "Connection"), ["close"]);
    let head = client_head(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false);
    assert_eq!(value(&head, "Connection"), None);
}

#[test]
fn head_and_304_keep_their_transfer_encoding() {
    let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    let info = resp_to(raw, Method::Head);
    let mut out = Vec::new();
    write_response_head(
        raw,
        &info,
        &ResponseOpts {
            close: false,
            extra: &[],
            http10: false,
        },
        &mut out,
    );
    assert_eq!(
        out,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let raw = b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n";
    let head = client_head(raw, false);
    assert_eq!(value(&head, "Transfer-Encoding"), None);
}

#[test]
fn switching_protocols_keeps_connection_and_upgrade() {
    let raw = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                Sec-WebSocket-Accept: abc\r\n\r\n";
    let info = resp(raw);
    let extra: &[(&[u8], &[u8])] = &[(b"Set-Cookie", b"_backend=x; Path=/")];
    let mut out = Vec::new();
    // Even if the router asks for close, a 101 never gets Connection: close.
    write_response_head(
        raw,
        &info,
        &ResponseOpts {
            close: true,
            extra,
            http10: false,
        },
        &mut out,
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Accept: abc\r\nSet-Cookie: _backend=x; Path=/\r\n\r\n"
    );
}

#[test]
fn failed_upgrade_is_relayed_with_close() {
    let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n";
    let head = client_head(raw, true);
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
    );
}

/// Regression (fuzz `codec`): a chunked response rewritten for an HTTP/1.0 client has no
/// Transfer-Encoding and reads back as close-delimited (the body goes out decoded).
#[test]
fn chunked_response_for_an_http10_client_is_close_delimited() {
    let raw = b"HTTP/1.1 200 ...............O\r\nTransfer-Encoding: chunked\r\n\r\n2";
    let info = resp_to(raw, Method::Post);
    assert_eq!(info.framing, Framing::Chunked);
    let mut out = Vec::new();
    write_response_head(
        raw,
        &info,
        &ResponseOpts {
            close: true,
            extra: &[],
            http10: true,
        },
        &mut out,
    );
    let re = parse_response(&out, Method::Post).unwrap().unwrap();
    assert_eq!((re.status, re.framing), (200, Framing::Close));
    assert_eq!(
        value(std::str::from_utf8(&out).unwrap(), "Transfer-Encoding"),
        None
    );
}
