//! Parser benchmarks: framing plus RFC 5424 parsing of a typical 200-byte Flynn line, and
//! a batch of octet-counted frames split out of one read buffer.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flynn_syslog::{Framer, Message};

fn line() -> Vec<u8> {
    let head = b"<190>1 2009-11-10T23:00:00.123456Z 8f1e0c2a-host 5f3b7a1e-8d2c-4a5b-9e1f-0a1b2c3d4e5f web.flynn-0123456789abcdef ID1 [flynn seq=\"123456\"] ";
    let mut v = head.to_vec();
    while v.len() < 200 {
        v.push(b'x');
    }
    v
}

fn parse(c: &mut Criterion) {
    let frame = Bytes::from(line());
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("rfc5424_200b", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(frame.clone()));
            black_box((
                m.app_name().len(),
                m.job_id().len(),
                m.stream(),
                m.flynn_seq(),
            ))
        })
    });
    g.finish();
}

fn frame_batch(c: &mut Criterion) {
    let l = line();
    let mut stream = Vec::new();
    for _ in 0..100 {
        stream.extend_from_slice(format!("{} ", l.len()).as_bytes());
        stream.extend_from_slice(&l);
    }
    let framer = Framer::default();
    let mut g = c.benchmark_group("frame_and_parse");
    g.throughput(Throughput::Elements(100));
    g.bench_function("octet_counted_x100", |b| {
        let mut buf = BytesMut::with_capacity(stream.len());
        b.iter(|| {
            buf.clear();
            buf.extend_from_slice(&stream);
            let mut n = 0usize;
            while let Ok(Some(f)) = framer.next_frame(&mut buf) {
                let m = Message::parse(f);
                n += m.msg().len();
            }
            black_box(n)
        })
    });
    g.finish();
}

criterion_group!(benches, parse, frame_batch);
criterion_main!(benches);
