//! Server-sent-event streams (discoverd watches, host events) cut into arbitrary chunks:
//! the items `SseBuf` yields are exactly the stream's blank-line-terminated items, in
//! order, whatever the chunking; an unfinished tail is never yielded.

#![no_main]

use flynn_client::sse::SseBuf;
use libfuzzer_sys::fuzz_target;

/// The stream's complete items, by the definition: each ends at the first `\n\n` after
/// the previous one.
fn items_of(stream: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < stream.len() {
        if stream[i] == b'\n' && stream[i + 1] == b'\n' {
            out.push(stream[start..i + 2].to_vec());
            start = i + 2;
            i = start;
        } else {
            i += 1;
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    // First bytes: chunk sizes (1..=16, cycled); the rest: the stream.
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = (n as usize % 8).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    let mut b = SseBuf::default();
    let mut got = Vec::new();
    let mut at = 0;
    let mut k = 0;
    while at < stream.len() {
        let size = sizes
            .get(k % sizes.len().max(1))
            .map_or(7, |s| *s as usize % 16 + 1);
        let end = (at + size).min(stream.len());
        b.push(&stream[at..end]).expect("far below the item limit");
        while let Some(item) = b.next_item() {
            got.push(item.to_vec());
        }
        at = end;
        k += 1;
    }
    assert_eq!(got, items_of(stream));
});
