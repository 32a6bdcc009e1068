//! Arbitrary bytes as an attach connection (`flynn_api::attach`, spec §5.5), from either
//! side. `Frame::decode` never panics and never claims more bytes than it was given; every
//! frame it returns encodes back to exactly the bytes it took (an error message that is not
//! UTF-8, decoded lossily, to its lossy text) and decodes back from that; a prefix of a frame asks for
//! more bytes rather than decoding as something else; and decoding a stream frame by frame
//! gives the same frames however the bytes are split.
#![no_main]

use flynn_api::attach::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, wire)) = data.split_first() else {
        return;
    };
    let mut whole = Vec::new();
    let mut rest = wire;
    while let Ok(Some((frame, used))) = Frame::decode(rest) {
        assert!(used >= 1 && used <= rest.len());
        let mut again = Vec::new();
        frame.encode(&mut again);
        // An error message that is not UTF-8 is decoded lossily; any other frame encodes
        // back to exactly its bytes, and every frame decodes back from its encoding.
        let lossy =
            matches!(frame, Frame::Error(_)) && std::str::from_utf8(&rest[5..used]).is_err();
        if !lossy {
            assert_eq!(again, rest[..used], "{frame:?}");
        }
        assert_eq!(
            Frame::decode(&again),
            Ok(Some((frame.clone(), again.len())))
        );
        for cut in 0..used {
            assert_eq!(
                Frame::decode(&rest[..cut]),
                Ok(None),
                "{frame:?} cut at {cut}"
            );
        }
        whole.push(frame);
        rest = &rest[used..];
    }
    // The same bytes fed in two pieces, as a reader sees them arrive.
    let at = usize::from(split).min(wire.len());
    let mut buf = wire[..at].to_vec();
    let mut pieces = Vec::new();
    let mut fed = false;
    loop {
        match Frame::decode(&buf) {
            Ok(Some((frame, used))) => {
                buf.drain(..used);
                pieces.push(frame);
            }
            Ok(None) if !fed => {
                buf.extend_from_slice(&wire[at..]);
                fed = true;
            }
            _ => break,
        }
    }
    // Whether it stopped at an error, at the end, or (before the second piece was fed) at
    // an error in the first: the frames are the whole-buffer pass's.
    assert_eq!(pieces, whole);
});
