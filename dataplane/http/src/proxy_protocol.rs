//! Hot path: PROXY protocol v1 (text) and v2 (binary) connection prefixes, which a load
//! balancer in front of the router uses to pass the original client address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 line is at most 107 bytes including CRLF.
pub const V1_MAX: usize = 107;
/// We accept v2 headers up to this size (addresses plus TLVs).
pub const V2_MAX: usize = 16 + 536;

/// What a connection's prefix says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The connection does not start with a PROXY prefix: serve it as it is.
    Absent,
    /// A prefix without a usable address (v1 `UNKNOWN`, v2 `LOCAL` or an unspecified
    /// family): keep the socket's own peer address.
    Local,
    /// The original client (`src`) and the address it connected to (`dst`).
    Proxied { src: SocketAddr, dst: SocketAddr },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// Starts like a PROXY prefix but is not a valid one: close the connection.
    Malformed,
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("malformed PROXY protocol header")
    }
}

impl std::error::Error for ProxyError {}

/// Parses a PROXY prefix at the start of `buf`. `Ok(None)`: more bytes are needed;
/// `Ok(Some((header, len)))`: `len` bytes of prefix to skip (0 when `Absent`).
pub fn parse_proxy(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    const V1: &[u8] = b"PROXY ";
    if buf.is_empty() {
        return Ok(None);
    }
    let n = buf.len().min(V1.len());
    if buf[..n] == V1[..n] {
        return if n < V1.len() {
            Ok(None)
        } else {
            parse_v1(buf)
        };
    }
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() {
            Ok(None)
        } else {
            parse_v2(buf)
        };
    }
    Ok(Some((ProxyHeader::Absent, 0)))
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let limit = buf.len().min(V1_MAX);
    let Some(cr) = buf[..limit].iter().position(|&b| b == b'\r') else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::Malformed)
        } else {
            Ok(None)
        };
    };
    if cr + 1 >= buf.len() {
        return Ok(None);
    }
    if buf[cr + 1] != b'\n' {
        return Err(ProxyError::Malformed);
    }
    let line = std::str::from_utf8(&buf[6..cr]).map_err(|_| ProxyError::Malformed)?;
    let len = cr + 2;
    let mut parts = line.split(' ');
    let proto = parts.next().ok_or(ProxyError::Malformed)?;
    if proto == "UNKNOWN" {
        return Ok(Some((ProxyHeader::Local, len)));
    }
    let (src, dst, sport, dport) = (parts.next(), parts.next(), parts.next(), parts.next());
    let (Some(src), Some(dst), Some(sport), Some(dport), None) =
        (src, dst, sport, dport, parts.next())
    else {
        return Err(ProxyError::Malformed);
    };
    let ip = |s: &str| -> Result<IpAddr, ProxyError> {
        match proto {
            "TCP4" => s
                .parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| ProxyError::Malformed),
            "TCP6" => s
                .parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| ProxyError::Malformed),
            _ => Err(ProxyError::Malformed),
        }
    };
    let port = |s: &str| -> Result<u16, ProxyError> {
        if s.is_empty()
            || s.len() > 5
            || !s.bytes().all(|b| b.is_ascii_digit())
            || (s.len() > 1 && s.starts_with('0'))
        {
            return Err(ProxyError::Malformed);
        }
        s.parse().map_err(|_| ProxyError::Malformed)
    };
    let src = SocketAddr::new(ip(src)?, port(sport)?);
    let dst = SocketAddr::new(ip(dst)?, port(dport)?);
    Ok(Some((ProxyHeader::Proxied { src, dst }, len)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let ver_cmd = buf[12];
    let fam = buf[13];
    let addr_len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if ver_cmd >> 4 != 2 || 16 + addr_len > V2_MAX {
        return Err(ProxyError::Malformed);
    }
    let total = 16 + addr_len;
    if buf.len() < total {
        return Ok(None);
    }
    let a = &buf[16..total];
    match ver_cmd & 0x0f {
        0 => return Ok(Some((ProxyHeader::Local, total))),
        1 => {}
        _ => return Err(ProxyError::Malformed),
    }
    let header = match fam {
        // TCP or UDP over IPv4
        0x11 | 0x12 => {
            if a.len() < 12 {
                return Err(ProxyError::Malformed);
            }
            let src = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            let dst = Ipv4Addr::new(a[4], a[5], a[6], a[7]);
            ProxyHeader::Proxied {
                src: SocketAddr::new(IpAddr::V4(src), u16::from_be_bytes([a[8], a[9]])),
                dst: SocketAddr::new(IpAddr::V4(dst), u16::from_be_bytes([a[10], a[11]])),
            }
        }
        // TCP or UDP over IPv6
        0x21 | 0x22 => {
            if a.len() < 36 {
                return Err(ProxyError::Malformed);
            }
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&a[..16]);
            d.copy_from_slice(&a[16..32]);
            ProxyHeader::Proxied {
                src: SocketAddr::new(
                    IpAddr::V6(Ipv6Addr::from(s)),
                    u16::from_be_bytes([a[32], a[33]]),
                ),
                dst: SocketAddr::new(
                    IpAddr::V6(Ipv6Addr::from(d)),
                    u16::from_be_bytes([a[34], a[35]]),
                ),
            }
        }
        // Unspecified, or unix sockets: no IP address to use.
        0x00 | 0x31 | 0x32 => ProxyHeader::Local,
        _ => return Err(ProxyError::Malformed),
    };
    Ok(Some((header, total)))
}

/// The values of every header called `name` (case-insensitive) in a head that
/// [`crate::parse_request`] accepted, in order. Used for `Cookie`.
pub fn header_values<'a>(head: &'a [u8], name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    head.split(|&b| b == b'\n').skip(1).filter_map(move |line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = line.iter().position(|&b| b == b':')?;
        if !line[..colon].eq_ignore_ascii_case(name) {
            return None;
        }
        let v = &line[colon + 1..];
        let start = v
            .iter()
            .position(|&b| b != b' ' && b != b'\t')
            .unwrap_or(v.len());
        let end = v
            .iter()
            .rposition(|&b| b != b' ' && b != b'\t')
            .map_or(start, |e| e + 1);
        Some(&v[start..end.max(start)])
    })
}

/// The value of cookie `name` in a `Cookie` header value (`a=1; b=2`).
pub fn cookie_value<'a>(header: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    header.split(|&b| b == b';').find_map(|pair| {
        let pair = trim(pair);
        let eq = pair.iter().position(|&b| b == b'=')?;
        (trim(&pair[..eq]) == name).then(|| trim(&pair[eq + 1..]))
    })
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ').unwrap_or(s.len());
    let end = s.iter().rposition(|&b| b != b' ').map_or(start, |e| e + 1);
    &s[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    type Parsed = Result<Option<(ProxyHeader, usize)>, ProxyError>;

    #[test]
    fn v1_table() {
        let cases: &[(&[u8], Parsed)] = &[
            (b"", Ok(None)),
            (b"PRO", Ok(None)),
            (b"PROXY TCP4 1.1.1.123 2.2.2.2 1234 80", Ok(None)),
            (b"PROXY TCP4 1.1.1.123 2.2.2.2 1234 80\r", Ok(None)),
            (
                b"PROXY TCP4 1.1.1.123 2.2.2.2 1234 80\r\nGET /",
                Ok(Some((
                    ProxyHeader::Proxied {
                        src: sa("1.1.1.123:1234"),
                        dst: sa("2.2.2.2:80"),
                    },
                    38,
                ))),
            ),
            (
                b"PROXY TCP6 ::1 2001:db8::1 65535 443\r\n",
                Ok(Some((
                    ProxyHeader::Proxied {
                        src: sa("[::1]:65535"),
                        dst: sa("[2001:db8::1]:443"),
                    },
                    38,
                ))),
            ),
            (b"PROXY UNKNOWN\r\n", Ok(Some((ProxyHeader::Local, 15)))),
            (
                b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
                Ok(Some((ProxyHeader::Local, 35))),
            ),
            (b"GET / HTTP/1.1\r\n", Ok(Some((ProxyHeader::Absent, 0)))),
            (
                b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\rX",
                Err(ProxyError::Malformed),
            ),
            (
                b"PROXY TCP4 ::1 2.2.2.2 1 2\r\n",
                Err(ProxyError::Malformed),
            ),
            (
                b"PROXY TCP4 1.1.1.1 2.2.2.2 99999 2\r\n",
                Err(ProxyError::Malformed),
            ),
            (
                b"PROXY TCP4 1.1.1.1 2.2.2.2 01 2\r\n",
                Err(ProxyError::Malformed),
            ),
            (
                b"PROXY TCP4 1.1.1.1 2.2.2.2 1\r\n",
                Err(ProxyError::Malformed),
            ),
            (
                b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2 3\r\n",
                Err(ProxyError::Malformed),
            ),
            (
                b"PROXY UDP4 1.1.1.1 2.2.2.2 1 2\r\n",
                Err(ProxyError::Malformed),
            ),
            (
                b"PROXY  TCP4 1.1.1.1 2.2.2.2 1 2\r\n",
                Err(ProxyError::Malformed),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                &parse_proxy(input),
                want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        let long = [b"PROXY ".as_slice(), &[b'x'; 200]].concat();
        assert_eq!(parse_proxy(&long), Err(ProxyError::Malformed));
    }

    fn v2(cmd: u8, fam: u8, addr: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.push(0x20 | cmd);
        v.push(fam);
        v.extend_from_slice(&(addr.len() as u16).to_be_bytes());
        v.extend_from_slice(addr);
        v
    }

    #[test]
    fn v2_table() {
        let ipv4 = [1, 1, 1, 123, 2, 2, 2, 2, 0x04, 0xd2, 0, 80];
        let h = v2(1, 0x11, &ipv4);
        let want = ProxyHeader::Proxied {
            src: sa("1.1.1.123:1234"),
            dst: sa("2.2.2.2:80"),
        };
        assert_eq!(parse_proxy(&h), Ok(Some((want, 28))));
        for cut in 0..h.len() {
            assert_eq!(parse_proxy(&h[..cut]), Ok(None), "prefix of {cut} bytes");
        }
        let mut tlv = ipv4.to_vec();
        tlv.extend_from_slice(&[0x04, 0, 1, 0]);
        assert_eq!(parse_proxy(&v2(1, 0x11, &tlv)), Ok(Some((want, 32))));
        let mut ipv6 = vec![0u8; 36];
        ipv6[15] = 1;
        ipv6[31] = 2;
        ipv6[33] = 7;
        ipv6[35] = 8;
        let want6 = ProxyHeader::Proxied {
            src: sa("[::1]:7"),
            dst: sa("[::2]:8"),
        };
        assert_eq!(parse_proxy(&v2(1, 0x21, &ipv6)), Ok(Some((want6, 52))));
        assert_eq!(
            parse_proxy(&v2(0, 0x00, &[])),
            Ok(Some((ProxyHeader::Local, 16)))
        );
        assert_eq!(
            parse_proxy(&v2(1, 0x00, &[])),
            Ok(Some((ProxyHeader::Local, 16)))
        );
        assert_eq!(
            parse_proxy(&v2(1, 0x11, &[1, 2, 3])),
            Err(ProxyError::Malformed)
        );
        assert_eq!(parse_proxy(&v2(2, 0x11, &ipv4)), Err(ProxyError::Malformed));
        assert_eq!(parse_proxy(&v2(1, 0x55, &ipv4)), Err(ProxyError::Malformed));
        let mut bad_version = h.clone();
        bad_version[12] = 0x11;
        assert_eq!(parse_proxy(&bad_version), Err(ProxyError::Malformed));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse_proxy(&huge), Err(ProxyError::Malformed));
    }

    #[test]
    fn cookies() {
        let head =
            b"GET / HTTP/1.1\r\nHost: a\r\ncookie: x=1; _backend=abc==\r\nCookie:  y=2 \r\n\r\n";
        let vals: Vec<_> = header_values(head, b"Cookie").collect();
        assert_eq!(vals, vec![b"x=1; _backend=abc==".as_slice(), b"y=2"]);
        assert_eq!(
            cookie_value(vals[0], b"_backend"),
            Some(b"abc==".as_slice())
        );
        assert_eq!(cookie_value(vals[0], b"x"), Some(b"1".as_slice()));
        assert_eq!(cookie_value(vals[1], b"_backend"), None);
        assert_eq!(cookie_value(b"", b"a"), None);
        assert_eq!(cookie_value(b";;=;a", b"a"), None);
    }
}
