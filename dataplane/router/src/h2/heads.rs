//! Heads translated between an HTTP/2 stream and its HTTP/1.1 backend exchange.

/// The HTTP/1.1 head equivalent to an HTTP/2 request (pseudo-headers to request line
/// and Host; connection-specific headers dropped; chunked when the length is unknown).
pub(super) fn h1_head(parts: &http::request::Parts, end_stream: bool) -> (Vec<u8>, bool) {
    let mut h = Vec::with_capacity(512);
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    h.extend_from_slice(parts.method.as_str().as_bytes());
    h.push(b' ');
    h.extend_from_slice(pq.as_bytes());
    h.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    let authority = parts.uri.authority().map(|a| a.as_str().as_bytes());
    let host = authority
        .or_else(|| parts.headers.get("host").map(|v| v.as_bytes()))
        .unwrap_or(b"");
    h.extend_from_slice(host);
    h.extend_from_slice(b"\r\n");
    let mut has_length = false;
    // HTTP/2 clients may split Cookie into one field per cookie; HTTP/1.1 allows only one
    // field, so they are joined with "; " (RFC 9113 §8.2.3).
    let mut cookies = parts.headers.get_all("cookie").iter();
    if let Some(first) = cookies.next() {
        h.extend_from_slice(b"cookie: ");
        h.extend_from_slice(first.as_bytes());
        for v in cookies {
            h.extend_from_slice(b"; ");
            h.extend_from_slice(v.as_bytes());
        }
        h.extend_from_slice(b"\r\n");
    }
    for (name, value) in &parts.headers {
        match name.as_str() {
            "host" | "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding"
            | "upgrade" | "cookie" => continue,
            "te" => continue,
            "content-length" => has_length = true,
            _ => {}
        }
        h.extend_from_slice(name.as_str().as_bytes());
        h.extend_from_slice(b": ");
        h.extend_from_slice(value.as_bytes());
        h.extend_from_slice(b"\r\n");
    }
    let chunked = !end_stream && !has_length;
    if chunked {
        h.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    h.extend_from_slice(b"\r\n");
    (h, chunked)
}

/// The response headers to pass to an HTTP/2 client (hop-by-hop ones removed, the fields a
/// Connection field names matched case-insensitively). Content-Length goes out once, as a
/// single value: a list of equal values or a repeated field (the parser refused unequal
/// ones) is valid HTTP/1 but not a valid HTTP/2 `content-length`, and clients reset the
/// stream over it.
pub(super) fn h2_response(head: &[u8], status: u16) -> http::Response<()> {
    let mut b = http::Response::builder().status(status);
    let fields = || {
        head.split(|&c| c == b'\n').skip(1).filter_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let colon = line.iter().position(|&c| c == b':')?;
            Some((&line[..colon], line[colon + 1..].trim_ascii()))
        })
    };
    let mut listed: Vec<Vec<u8>> = Vec::new();
    for (name, value) in fields() {
        if name.eq_ignore_ascii_case(b"connection") {
            listed.extend(
                value
                    .split(|&c| c == b',')
                    .map(|t| t.trim_ascii().to_ascii_lowercase()),
            );
        }
    }
    let mut length_done = false;
    for (name, value) in fields() {
        let name = name.to_ascii_lowercase();
        if name == b"content-length" {
            if !length_done {
                length_done = true;
                let first = value.split(|&c| c == b',').next().unwrap_or(b"");
                b = b.header(name.as_slice(), first.trim_ascii());
            }
            continue;
        }
        let hop = matches!(
            name.as_slice(),
            b"connection"
                | b"keep-alive"
                | b"proxy-connection"
                | b"transfer-encoding"
                | b"upgrade"
                | b"te"
                | b"trailer"
        );
        if hop || listed.contains(&name) {
            continue;
        }
        b = b.header(name.as_slice(), value);
    }
    b.body(()).unwrap_or_default()
}
