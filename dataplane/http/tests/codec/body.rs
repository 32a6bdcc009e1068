//! BodyReader: lengths, close-delimited bodies and chunked framing at every split point.

use flynn_http::{Advance, BodyError, BodyReader, Framing, MAX_TRAILERS};

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
    (
        "0\r\nX-Empty:\r\n!#$%&'*+-.^_`|~09azAZ:\t v\"al\x7e \t\r\n\r\nNEXT",
        "NEXT",
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

/// Valid trailer sections: field lines of every allowed byte class.
const TRAILERS_OK: &[&[u8]] = &[
    b"X-Sum: 42\r\n",
    b"X-Empty:\r\nx:y\r\n",
    b"Grpc-Message: caf\xc3\xa9 \t(obs-text)\t\r\nGrpc-Status: 0\r\n",
    b"!#$%&'*+-.^_`|~09azAZ: ~!\x80\xff \r\n",
];

/// A chunked body with `trailers` and bytes of the next message after it.
fn with_trailers(trailers: &[u8]) -> Vec<u8> {
    [
        &b"5\r\nhello\r\n0\r\n"[..],
        trailers,
        b"\r\nGET / HTTP/1.1\r\n\r\n",
    ]
    .concat()
}

/// A trailer line that is not a field line reaches a backend that does not parse trailers
/// as whatever it reads it as: a smuggled request, a folded continuation of the previous
/// line, a field with a different name.
#[test]
fn trailer_lines_must_be_field_lines() {
    let bad: &[&[u8]] = &[
        // A request smuggled as "trailers".
        b"GET /admin HTTP/1.1\r\nHost: x\r\n",
        b"X: 1\r\nGET /admin HTTP/1.1\r\n",
        // obs-fold.
        b"X: 1\r\n continued\r\n",
        b"X: 1\r\n\tcontinued\r\n",
        b" X: 1\r\n",
        // Whitespace before the colon, an empty name, no colon.
        b"X : 1\r\n",
        b"X\t: 1\r\n",
        b": 1\r\n",
        b"X\r\n",
        b"X-No-Colon 1\r\n",
        // Not a token.
        b"X(y): 1\r\n",
        b"X\x80: 1\r\n",
        b"X/Y: 1\r\n",
        // Control bytes in the value.
        b"X: a\x00b\r\n",
        b"X: a\x7fb\r\n",
        b"X: a\x0bb\r\n",
        b"X: a\rb\r\n",
        b"X: a\nb\r\n",
    ];
    for trailers in bad {
        let input = with_trailers(trailers);
        let what = String::from_utf8_lossy(trailers);
        assert_eq!(
            feed(Framing::Chunked, &input, &[]),
            Err(BodyError::BadChunk),
            "{what:?}"
        );
        let cuts: Vec<usize> = (1..input.len()).collect();
        assert_eq!(
            feed(Framing::Chunked, &input, &cuts),
            Err(BodyError::BadChunk),
            "{what:?} bytewise"
        );
    }
    // The audit's example, exactly.
    let mut r = BodyReader::new(Framing::Chunked);
    assert_eq!(
        r.advance(b"0\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n"),
        Err(BodyError::BadChunk)
    );
}

/// Valid trailers, cut once at every offset: the body ends at the same byte and the bytes
/// forwarded (each call's `used` prefix) are the body's bytes, verbatim.
#[test]
fn valid_trailers_at_every_split() {
    for trailers in TRAILERS_OK {
        let input = with_trailers(trailers);
        let body_len = input.len() - b"GET / HTTP/1.1\r\n\r\n".len();
        for cut in 0..=input.len() {
            let mut r = BodyReader::new(Framing::Chunked);
            let mut forwarded = Vec::new();
            let first = r.advance(&input[..cut]).unwrap();
            forwarded.extend_from_slice(&input[..first.used]);
            let mut done = first.done;
            if !done {
                // The caller re-offers what was not used with the bytes that came after.
                let second = r.advance(&input[first.used..]).unwrap();
                forwarded.extend_from_slice(&input[first.used..first.used + second.used]);
                done = second.done;
            }
            assert!(done, "{trailers:?} cut at {cut}");
            assert_eq!(forwarded, &input[..body_len], "{trailers:?} cut at {cut}");
        }
    }
}

#[test]
fn trailer_section_is_capped() {
    // Lines of 100 bytes with their CRLF; the section ends with one more CRLF.
    let line = format!("X-Pad: {}\r\n", "p".repeat(91));
    assert_eq!(line.len(), 100);
    let section = |n: usize, last: usize| -> Vec<u8> {
        let mut t = line.repeat(n);
        t.push_str(&format!("X-Last: {}\r\n", "l".repeat(last)));
        t.push_str("\r\n");
        t.into_bytes()
    };
    let n = MAX_TRAILERS / 100 - 1;
    // Exactly the cap: `n` lines, a last line and the final CRLF.
    let last = MAX_TRAILERS - n * 100 - "X-Last: \r\n\r\n".len();
    let at_cap = section(n, last);
    assert_eq!(at_cap.len(), MAX_TRAILERS);
    let over = section(n, last + 1);
    for (trailers, want) in [(at_cap, Ok(true)), (over, Err(BodyError::TrailersTooLarge))] {
        let input = [&b"0\r\n"[..], &trailers].concat();
        for step in [1, 7, 4096, input.len()] {
            let cuts: Vec<usize> = (1..input.len() / step + 1).map(|i| i * step).collect();
            let got = feed(Framing::Chunked, &input, &cuts).map(|(used, done)| {
                assert_eq!(used, input.len());
                done
            });
            assert_eq!(got, want, "step {step}");
        }
    }
}
