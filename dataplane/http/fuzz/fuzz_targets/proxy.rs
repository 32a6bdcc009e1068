//! Fuzz target for the PROXY protocol prefix parser and the cookie helpers: no panic,
//! consumed length within the input, and every prefix of a valid header is "incomplete".
#![no_main]

use flynn_http::{cookie_value, header_values, parse_proxy, ProxyHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((h, len))) = parse_proxy(data) {
        assert!(len <= data.len());
        if h != ProxyHeader::Absent {
            assert!(len > 0);
            for cut in 0..len.min(64) {
                let r = parse_proxy(&data[..cut]);
                assert!(matches!(r, Ok(None)), "prefix {cut} of a valid header: {r:?}");
            }
        }
    }
    for v in header_values(data, b"cookie") {
        let _ = cookie_value(v, b"_backend");
    }
});
