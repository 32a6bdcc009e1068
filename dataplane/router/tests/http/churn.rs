//! Route and backend updates under load: no request may fail (spec §1.4 hot swap).

use crate::support::{http_route, Backend, Conn, Router};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn updates_under_load_fail_no_requests() {
    let router = Arc::new(Router::start());
    let backends: Arc<Vec<Backend>> =
        Arc::new((1..=3).map(|i| Backend::start(&format!("b{i}"))).collect());
    router.add_route(http_route("example.com", "web"));
    router.set_backends("web", &[&backends[0], &backends[1]]);

    let deadline = Instant::now() + Duration::from_secs(10);
    let done = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for t in 0..4 {
        let (router, ok) = (router.clone(), ok.clone());
        clients.push(std::thread::spawn(move || -> Vec<String> {
            let mut failures = Vec::new();
            let mut conn = Conn::connect(router.http_addr);
            for i in 0..500 {
                if Instant::now() > deadline {
                    break;
                }
                conn.send(
                    format!("GET /t{t}/{i} HTTP/1.1\r\nHost: example.com\r\n\r\n").as_bytes(),
                );
                match conn.try_response() {
                    Ok(resp) if resp.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if resp.connection_has("close") {
                            conn = Conn::connect(router.http_addr);
                        }
                    }
                    Ok(resp) => {
                        failures.push(format!("t{t} req {i}: {} {}", resp.status, resp.text()));
                        conn = Conn::connect(router.http_addr);
                    }
                    Err(e) => {
                        failures.push(format!("t{t} req {i}: {e}"));
                        conn = Conn::connect(router.http_addr);
                    }
                }
            }
            failures
        }));
    }

    let mutator = {
        let (router, backends, done) = (router.clone(), backends.clone(), done.clone());
        std::thread::spawn(move || {
            let sets: [&[usize]; 4] = [&[0, 1], &[1, 2], &[2], &[0, 1, 2]];
            let mut n = 0;
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                let set: Vec<&Backend> =
                    sets[n % sets.len()].iter().map(|&i| &backends[i]).collect();
                router.set_backends("web", &set);
                let r = router.add_route(http_route(&format!("churn{n}.example.com"), "other"));
                let sub = router.add_route(crate::support::http_path_route(
                    &format!("churn{n}.example.com"),
                    "/sub/",
                    "other",
                ));
                router.delete_route(&sub);
                router.delete_route(&r);
                n += 1;
            }
            n
        })
    };

    let failures: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    done.store(true, Ordering::Relaxed);
    let rounds = mutator.join().unwrap();
    assert!(rounds > 0, "the mutator made no updates");
    assert!(
        failures.is_empty(),
        "{} failed requests (of {} ok), first: {:?}",
        failures.len(),
        ok.load(Ordering::Relaxed),
        &failures[..failures.len().min(5)]
    );
    assert!(
        ok.load(Ordering::Relaxed) >= 100,
        "only {} requests completed",
        ok.load(Ordering::Relaxed)
    );
    let served: usize = backends.iter().map(Backend::request_count).sum();
    assert_eq!(served, ok.load(Ordering::Relaxed));
}
