use std::collections::HashMap;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use flynn_api::{BackendAddr, Route};
use flynn_routes::{Backends, Table};

fn bench(c: &mut Criterion) {
    let mut routes = Vec::new();
    for i in 0..10_000 {
        routes.push(Route::http(&format!("app{i}.example.com"), "svc"));
    }
    routes.push(Route::http("*.wild.example.com", "svc"));
    let mut b = HashMap::new();
    let one = BackendAddr {
        addr: "127.0.0.1:1".into(),
        leader: false,
        app: String::new(),
        job_id: String::new(),
    };
    b.insert("svc".to_string(), Backends::from_api(&[one]).unwrap());
    let t = Table::build(&routes, &b, 1);
    c.bench_function("lookup_exact_10k", |bn| {
        bn.iter(|| t.lookup_http(black_box(b"App5000.example.com:80"), 0, black_box(b"/x/y")))
    });
    c.bench_function("lookup_wildcard_10k", |bn| {
        bn.iter(|| t.lookup_http(black_box(b"a.b.wild.example.com"), 0, black_box(b"/")))
    });
    c.bench_function("lookup_miss_10k", |bn| {
        bn.iter(|| t.lookup_http(black_box(b"nothing.here.org"), 0, black_box(b"/")))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
