//! Feeds arbitrary bytes through the framer (split at a point chosen by the first byte)
//! and every frame through the RFC 5424 parser and the Flynn accessors.
#![no_main]

use bytes::{Bytes, BytesMut};
use flynn_syslog::{Framer, Message, Scan};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The whole input as one frame.
    let m = Message::parse(Bytes::copy_from_slice(data));
    if m.is_raw() {
        assert_eq!(m.msg(), data);
    } else {
        let _ = (m.job_id(), m.process_type(), m.stream(), m.flynn_seq(), m.timestamp());
        for e in m.sd_elements() {
            for (_n, v) in e.params() {
                let mut out = Vec::new();
                flynn_syslog::sd::unescape(v, &mut out);
            }
        }
    }
    // The input as a stream, fed in two pieces.
    let Some((&first, rest)) = data.split_first() else { return };
    let framer = Framer::new(usize::from(first) * 8 + 1);
    let cut = usize::from(first) % (rest.len() + 1);
    // As a connection reads it (the LF search resuming between reads), and without that:
    // the same frames and the same end.
    let (mut buf, mut scan) = (BytesMut::new(), Scan::default());
    let mut fresh = BytesMut::new();
    for piece in [&rest[..cut], &rest[cut..]] {
        buf.extend_from_slice(piece);
        fresh.extend_from_slice(piece);
        loop {
            let got = framer.next_frame_scan(&mut buf, &mut scan);
            assert_eq!(got, framer.next_frame(&mut fresh));
            assert_eq!(buf, fresh);
            match got {
                Ok(Some(f)) => {
                    assert!(f.len() <= framer.max_frame());
                    let _ = Message::parse(f);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    // The sender closes: what is left may be a last frame without its LF.
    if let Some(f) = framer.finish(&mut buf) {
        assert!(f.len() <= framer.max_frame() && f.first() == Some(&b'<'));
        assert!(!f.contains(&b'\n'));
        let _ = Message::parse(f);
    }
    assert!(buf.is_empty());
});
