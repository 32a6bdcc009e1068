//! Bounded randomized no-panic test (the in-suite cousin of `fuzz/`): mutated and random
//! inputs through the framer and the parser, with invariants on what comes out.

use bytes::{Bytes, BytesMut};
use flynn_syslog::{Framer, Message, Scan};

const SEEDS: &[&[u8]] = &[
    b"<190>1 2009-11-10T23:00:00.123456Z host app web.job ID1 [flynn seq=\"1\"] hello",
    b"<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - 'su root' failed",
    b"<165>1 2003-10-11T22:14:15.003Z h evntslog - ID47 [a x=\"q\\\"\\\\\\]\" y=\"\"][b] \xEF\xBB\xBFmsg",
    b"<0>1 - - - - - -",
];

fn mutate(rng: &mut fastrand::Rng, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..rng.usize(1..8) {
        match rng.u8(0..4) {
            0 if !v.is_empty() => {
                let i = rng.usize(0..v.len());
                v[i] = rng.u8(..);
            }
            1 if !v.is_empty() => {
                let i = rng.usize(0..v.len());
                v.remove(i);
            }
            2 => {
                let i = rng.usize(0..=v.len());
                v.insert(
                    i,
                    *rng.choice(b"<>[]\"\\ -=0123456789\n".iter())
                        .unwrap_or(&b' '),
                );
            }
            _ => {
                let i = rng.usize(0..=v.len());
                let j = rng.usize(i..=v.len());
                v.truncate(j);
                let _ = i;
            }
        }
    }
    v
}

#[test]
fn parser_never_panics_and_spans_stay_in_bounds() {
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    for round in 0..20_000 {
        let input = if round % 5 == 0 {
            (0..rng.usize(0..300)).map(|_| rng.u8(..)).collect()
        } else {
            mutate(&mut rng, SEEDS[round % SEEDS.len()])
        };
        let m = Message::parse(Bytes::from(input.clone()));
        if m.is_raw() {
            assert_eq!(m.msg(), &input[..]);
        } else {
            for f in [
                m.hostname(),
                m.app_name(),
                m.procid(),
                m.msgid(),
                m.structured_data(),
                m.msg(),
            ] {
                assert!(f.len() <= input.len());
            }
            for e in m.sd_elements() {
                for (n, _v) in e.params() {
                    assert!(!n.is_empty());
                }
            }
            let _ = (
                m.job_id(),
                m.process_type(),
                m.flynn_seq(),
                m.timestamp().map(|t| t.to_rfc3339()),
            );
        }
    }
}

#[test]
fn framer_never_panics_and_reassembles_split_streams() {
    let mut rng = fastrand::Rng::with_seed(0xf4a3);
    let framer = Framer::new(512);
    for _ in 0..2_000 {
        // A valid stream of mixed frames, then fed in random pieces: same frames out.
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for _ in 0..rng.usize(1..10) {
            let seed = SEEDS[rng.usize(0..SEEDS.len())];
            let body = mutate(&mut rng, seed);
            let body: Vec<u8> = body.into_iter().filter(|&b| b != b'\n').collect();
            if body.is_empty() || body.len() > 512 {
                continue;
            }
            if rng.bool() && body[0] == b'<' {
                stream.extend_from_slice(&body);
                stream.push(b'\n');
                let mut b = body.clone();
                if b.last() == Some(&b'\r') {
                    b.pop();
                }
                want.push(b);
            } else {
                stream.extend_from_slice(format!("{} ", body.len()).as_bytes());
                stream.extend_from_slice(&body);
                want.push(body);
            }
        }
        // As a connection reads it: the LF search resumes between reads.
        let (mut buf, mut scan) = (BytesMut::new(), Scan::default());
        let mut got = Vec::new();
        let mut i = 0;
        while i < stream.len() {
            let n = rng.usize(1..=(stream.len() - i).min(64));
            buf.extend_from_slice(&stream[i..i + n]);
            i += n;
            while let Some(f) = framer
                .next_frame_scan(&mut buf, &mut scan)
                .expect("valid stream")
            {
                got.push(f.to_vec());
            }
        }
        assert_eq!(got, want);
        // Random garbage: must end in Ok(None) or an error, never a panic or a loop.
        let junk: Vec<u8> = (0..rng.usize(0..200)).map(|_| rng.u8(..)).collect();
        let mut jb = BytesMut::from(&junk[..]);
        for _ in 0..=junk.len() {
            match framer.next_frame(&mut jb) {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }
}
