//! Arbitrary bytes as what a peer writes on a Raft stream connection. Frames are read (as
//! AppendEntries requests, or as the results that come back, picked by the first byte)
//! until the end, an empty frame or an error, without panicking; every frame read
//! re-encodes to a frame that reads back the same.
#![no_main]

use flynn_discoverd::network::stream::{read_frame, write_frame, Frame, MAX_FRAME};
use flynn_discoverd::store::TypeConfig;
use futures_util::FutureExt;
use libfuzzer_sys::fuzz_target;
use openraft::raft::{AppendEntriesRequest, StreamAppendResult};
use serde::de::DeserializeOwned;
use serde::Serialize;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    if pick & 1 == 0 {
        frames::<AppendEntriesRequest<TypeConfig>>(bytes);
    } else {
        frames::<StreamAppendResult<TypeConfig>>(bytes);
    }
});

fn frames<T: Serialize + DeserializeOwned>(mut bytes: &[u8]) {
    let mut buf = Vec::new();
    loop {
        let before = bytes.len();
        let read = read_frame::<_, T>(&mut bytes, &mut buf)
            .now_or_never()
            .expect("reading a slice never waits");
        let Ok(Frame::Item(v)) = read else {
            return;
        };
        assert!(before - bytes.len() <= 4 + MAX_FRAME);
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        write_frame(&mut out, &mut scratch, &v)
            .now_or_never()
            .expect("writing a Vec never waits")
            .expect("a decoded frame encodes");
        let mut rd = &out[..];
        let back = read_frame::<_, T>(&mut rd, &mut buf)
            .now_or_never()
            .expect("reading a slice never waits");
        match back {
            Ok(Frame::Item(b)) => {
                let json = |x: &T| serde_json::to_string(x).expect("serializes");
                assert_eq!(json(&b), json(&v));
            }
            other => panic!("re-encoded frame read back as {:?}", other.map(|_| ())),
        }
        assert!(rd.is_empty());
    }
}
