//! Arbitrary bytes as the query string of `GET /log/:app` (percent-decoding included).
//! `parse_log_query` never panics; what it accepts has at most `MAX_LINES` lines, known
//! stream bits only, and no empty job filter.
#![no_main]

use flynn_logagg::api::{parse_log_query, MAX_LINES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(q) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = parse_log_query(Some(q)) else {
        return;
    };
    assert!(parsed.lines <= MAX_LINES);
    if let Some(bits) = parsed.filter.streams {
        assert_eq!(bits & !0b1111, 0, "unknown stream bits {bits:#b}");
    }
    if let Some(j) = &parsed.filter.job_id {
        assert!(!j.is_empty());
    }
});
