//! BodyReader: lengths, close-delimited bodies and chunked framing at every split point.

use flynn_http::{Advance, BodyError, BodyReader, Framing};

/// Feeds `input` in pieces cut at `cuts` (sorted offsets); returns total bytes used and
/// whether the body completed, or the first error.
fn feed(framing: Framing, input: &[u8], cuts: &[usize]) -> Result<(usize, bool), BodyError> {
    let mut r = BodyReader::new(framing);
    let mut pos = 0;
    let mut bounds: Vec<usize> = cuts.to_vec();
    bounds.push(input.len());
    for end in bounds {
        // The caller re-offers bytes not used yet together with the new ones.
        while pos < end {
            let Advance { used, done } = r.advance(&input[pos..end])?;
            assert!(used <= end - pos);
            pos += used;
            if done {
                assert!(r.is_done());
                return Ok((pos, true));
            }
            if used == 0 {
                break;
            }
        }
    }
    Ok((pos, r.is_done()))
}

const CHUNKED_OK: &[(&str, &str)] = &[
    ("0\r\n\r\n", ""),
    ("5\r\nhello\r\n0\r\n\r\n", ""),
    ("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", ""),
    ("A\r\n0123456789\r\n0\r\n\r\n", ""),
    ("a\r\n0123456789\r\n0000\r\n\r\n", ""),
    ("5;ext=1;q=\"x y\"\r\nhello\r\n0;last\r\n\r\n", ""),
    ("5 \r\nhello\r\n0\t;x\r\n\r\n", ""),
    (
        "3\r\nabc\r\n0\r\nExpires: never\r\nX-Trailer: 1\r\n\r\n",
        "",
    ),
    ("0\r\n\r\nGET / HTTP/1.1\r\n\r\n", "GET / HTTP/1.1\r\n\r\n"),
    ("2\r\n\r\n\r\n0\r\n\r\nNEXT", "NEXT"),
];

#[test]
fn chunked_every_split_point() {
    for &(raw, rest) in CHUNKED_OK {
        let input = raw.as_bytes();
        let body_len = input.len() - rest.len();
        // Whole, and cut once at every offset.
        for cut in 0..=input.len() {
            let got = feed(Framing::Chunked, input, &[cut]);
            assert_eq!(got, Ok((body_len, true)), "{raw:?} cut at {cut}");
        }
        // One byte at a time.
        let cuts: Vec<usize> = (1..input.len()).collect();
        assert_eq!(
            feed(Framing::Chunked, input, &cuts),
            Ok((body_len, true)),
            "{raw:?} bytewise"
        );
        // Prefixes never complete early.
        for end in 0..body_len {
            let got = feed(Framing::Chunked, &input[..end], &[]);
            assert_eq!(got, Ok((end, false)), "{raw:?} prefix {end}");
        }
    }
}

#[test]
fn chunked_random_splits() {
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    for &(raw, rest) in CHUNKED_OK {
        let input = raw.as_bytes();
        for _ in 0..200 {
            let mut cuts: Vec<usize> = (0..rng.usize(0..6))
                .map(|_| rng.usize(0..=input.len()))
                .collect();
            cuts.sort_unstable();
            let got = feed(Framing::Chunked, input, &cuts);
            assert_eq!(
                got,
                Ok((input.len() - rest.len(), true)),
                "{raw:?} {cuts:?}"
            );
        }
    }
}

#[test]
fn chunked_errors() {
    let long_ext = format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(5000));
    let long_trailer = format!("0\r\nX: {}\r\n\r\n", "t".repeat(5000));
    let many_zeros = format!("{}1\r\nx\r\n0\r\n\r\n", "0".repeat(5000));
    let table: Vec<(String, BodyError)> = vec![
        ("\r\n".into(), BodyError::BadChunk),
        (";x\r\n".into(), BodyError::BadChunk),
        ("g\r\n".into(), BodyError::BadChunk),
        ("-1\r\n".into(), BodyError::BadChunk),
        ("0x5\r\n".into(), BodyError::BadChunk),
        ("5\nhello\r\n".into(), BodyError::BadChunk),
        ("5\r\rhello".into(), BodyError::BadChunk),
        ("5\r\nhelloX\r\n".into(), BodyError::BadChunk),
        ("5\r\nhello\rX".into(), BodyError::BadChunk),
        ("5\r\nhello\n0\r\n\r\n".into(), BodyError::BadChunk),
        ("1 2\r\n".into(), BodyError::BadChunk),
        ("1;a\nb\r\n".into(), BodyError::BadChunk),
        ("0\r\nX: y\n\r\n".into(), BodyError::BadChunk),
        ("0\r\n\n".into(), BodyError::BadChunk),
        ("0\r\n\rX".into(), BodyError::BadChunk),
        ("1000000000001\r\n".into(), BodyError::ChunkTooLarge),
        ("ffffffffffffffffffff\r\n".into(), BodyError::ChunkTooLarge),
        (long_ext, BodyError::LineTooLong),
        (long_trailer, BodyError::LineTooLong),
        (many_zeros, BodyError::LineTooLong),
    ];
    for (raw, want) in &table {
        let input = raw.as_bytes();
        assert_eq!(feed(Framing::Chunked, input, &[]), Err(*want), "{raw:?}");
        let cuts: Vec<usize> = (1..input.len()).collect();
        assert_eq!(
            feed(Framing::Chunked, input, &cuts),
            Err(*want),
            "{raw:?} bytewise"
        );
    }
    // The largest accepted size is 2^48.
    let mut r = BodyReader::new(Framing::Chunked);
    assert_eq!(
        r.advance(b"1000000000000\r\nabc"),
        Ok(Advance {
            used: 18,
            done: false
        })
    );
    // Errors stick.
    let mut r = BodyReader::new(Framing::Chunked);
    assert_eq!(r.advance(b"z"), Err(BodyError::BadChunk));
    assert_eq!(r.advance(b"0\r\n\r\n"), Err(BodyError::BadChunk));
    assert!(!r.is_done());
}

#[test]
fn length_and_close() {
    let mut r = BodyReader::new(Framing::Length(5));
    assert_eq!(
        r.advance(b"he"),
        Ok(Advance {
            used: 2,
            done: false
        })
    );
    assert_eq!(
        r.advance(b""),
        Ok(Advance {
            used: 0,
            done: false
        })
    );
    assert_eq!(
        r.advance(b"lloNEXT"),
        Ok(Advance {
            used: 3,
            done: true
        })
    );
    assert!(r.is_done());
    assert_eq!(
        r.advance(b"more"),
        Ok(Advance {
            used: 0,
            done: true
        })
    );

    for framing in [Framing::Empty, Framing::Length(0)] {
        let mut r = BodyReader::new(framing);
        assert!(r.is_done());
        assert_eq!(
            r.advance(b"GET"),
            Ok(Advance {
                used: 0,
                done: true
            })
        );
    }

    let mut r = BodyReader::new(Framing::Close);
    assert_eq!(
        r.advance(b"abc"),
        Ok(Advance {
            used: 3,
            done: false
        })
    );
    assert_eq!(
        r.advance(b""),
        Ok(Advance {
            used: 0,
            done: false
        })
    );
    assert!(!r.is_done());

    let mut r = BodyReader::new(Framing::Length(u64::MAX));
    assert_eq!(
        r.advance(&[0; 100]),
        Ok(Advance {
            used: 100,
            done: false
        })
    );

    for cut in 0..=10 {
        let got = feed(Framing::Length(7), b"abcdefgXYZ", &[cut]);
        assert_eq!(got, Ok((7, true)), "cut {cut}");
    }
}
