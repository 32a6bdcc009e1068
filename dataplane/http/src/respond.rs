//! Hot path: the router's own small responses (404, 503, 400 ...) and reason phrases.

use crate::fields::put_u64;

/// Appends a complete response with a `text/plain` body.
pub fn simple_response(status: u16, body: &[u8], close: bool, out: &mut Vec<u8>) {
    typed_response(status, b"text/plain; charset=utf-8", body, close, out)
}

/// Appends a complete response with the given content type (e.g. a custom 503 page).
pub fn typed_response(
    status: u16,
    content_type: &[u8],
    body: &[u8],
    close: bool,
    out: &mut Vec<u8>,
) {
    put_status_line(out, status, reason(status).as_bytes());
    out.extend_from_slice(b"Content-Type: ");
    out.extend_from_slice(content_type);
    out.extend_from_slice(b"\r\nContent-Length: ");
    put_u64(out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// Appends `HTTP/1.1 <code> <reason>\r\n`; codes outside 100..=999 are clamped into it.
pub(crate) fn put_status_line(out: &mut Vec<u8>, status: u16, reason: &[u8]) {
    let s = status.clamp(100, 999);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (s / 100) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
}

/// The standard reason phrase, `Unknown` for codes without one.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        103 => "Early Hints",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        499 => "Client Closed Request",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found() {
        let mut out = Vec::new();
        simple_response(404, b"Not Found\n", false, &mut out);
        assert_eq!(
            out,
            b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n\
              Content-Length: 10\r\n\r\nNot Found\n"
        );
    }

    #[test]
    fn service_unavailable_with_close() {
        let mut out = Vec::new();
        simple_response(503, b"Service Unavailable\n", true, &mut out);
        assert_eq!(
            out,
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
              Content-Length: 20\r\nConnection: close\r\n\r\nService Unavailable\n"
        );
    }

    #[test]
    fn reasons() {
        let table = [
            (400, "Bad Request"),
            (408, "Request Timeout"),
            (413, "Payload Too Large"),
            (431, "Request Header Fields Too Large"),
            (499, "Client Closed Request"),
            (502, "Bad Gateway"),
            (504, "Gateway Timeout"),
            (505, "HTTP Version Not Supported"),
            (599, "Unknown"),
        ];
        for (code, want) in table {
            assert_eq!(reason(code), want);
        }
    }
}
