//! Arbitrary bytes as a Raft log segment (the first byte picks the segment's first index).
//! The parser never panics; it stops at the first bad record and says why, or reaches the
//! end (or preallocated zeros); and the entries it accepts re-encode to records that parse
//! back to the same entries.
#![no_main]

use flynn_discoverd::store::log::{encode, parse_segment};
use libfuzzer_sys::fuzz_target;
use openraft::entry::RaftEntry;

fuzz_target!(|data: &[u8]| {
    let Some((&f, bytes)) = data.split_first() else {
        return;
    };
    let first = u64::from(f);
    let p = parse_segment(bytes, first);
    assert!(p.end <= bytes.len());
    assert_eq!(p.entries.len(), p.offsets.len());
    assert!(p.bad.is_some() || !p.torn, "torn without a bad record");
    match p.bad {
        None => assert!(bytes[p.end..].iter().all(|b| *b == 0)),
        Some(_) => assert!(p.end < bytes.len()),
    }
    let mut again = Vec::new();
    for (i, (e, off)) in p.entries.iter().zip(&p.offsets).enumerate() {
        assert_eq!(e.index(), first + i as u64);
        assert!((*off as usize) < p.end);
        again.extend(encode(e).expect("a parsed entry encodes"));
    }
    let q = parse_segment(&again, first);
    assert!(q.bad.is_none(), "re-encoded records rejected: {:?}", q.bad);
    assert_eq!(q.end, again.len());
    let json = |v: &Vec<_>| serde_json::to_string(v).expect("entries serialize");
    assert_eq!(json(&q.entries), json(&p.entries));
});
