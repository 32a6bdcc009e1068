//! Differential: the route table's lookups (hashed `domain:port` keys, lower-casing, the
//! wildcard walk, longest path first) against a naive scan of the same routes that
//! follows the documented rules. Routes and requests come from small alphabets so that
//! domains, wildcards and paths collide often; request bytes are otherwise arbitrary.
#![no_main]

use std::collections::HashMap;

use flynn_api::{Route, RouteType};
use flynn_routes::{normalize_path, strip_port, Table, MAX_DOMAIN};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const LABELS: [&str; 6] = ["a", "B", "c", "xn--d", "a-b", ""];
const PATHS: [&str; 12] = [
    "", "/", "/a", "/a/", "/a/b", "/ab", "/A", "//a//", "/a///", "/%61", "/a%2Fb", "/a%2",
];
const PORTS: [u16; 3] = [0, 80, 8080];

fn domain(u: &mut Unstructured) -> Result<String> {
    let n = u.int_in_range(1..=7)?;
    let mut labels = Vec::new();
    for _ in 0..n {
        labels.push(*u.choose(&LABELS)?);
    }
    let mut d = labels.join(".");
    match u.int_in_range(0..=9)? {
        0 => d = "*".into(),
        1..=3 => d = format!("*.{d}"),
        4 => d = d.repeat(40), // past MAX_DOMAIN sometimes
        _ => {}
    }
    Ok(d)
}

fn route(u: &mut Unstructured, i: usize) -> Result<Route> {
    let http = u.ratio(4, 5)?;
    let v = serde_json::json!({
        "type": if http { "http" } else { "tcp" },
        "id": format!("r{i}"),
        "service": "s",
        "port": *u.choose(&PORTS)?,
        "domain": if http { domain(u)? } else { String::new() },
        "path": *u.choose(&PATHS)?,
    });
    Ok(serde_json::from_value(v).expect("a well-formed route"))
}

/// The documented rules, the slow way. Port stripping is the crate's own `strip_port`
/// (unit-tested in `table/tests.rs`): this target checks the table around it.
fn model<'a>(routes: &'a [Route], host: &[u8], port: u16, path: &[u8]) -> Option<&'a str> {
    let domain = strip_port(host);
    // A fully qualified name's trailing dot is ignored (one dot, as nginx).
    let domain = domain.strip_suffix(b".").unwrap_or(domain);
    let path = if path.is_empty() { b"/" as &[u8] } else { path };
    let mut candidates: Vec<Vec<u8>> = vec![domain.to_vec()];
    // Wildcards as Flynn's router: the host split into at most 5 parts on `.`, then `*.` and
    // the last i parts, from all of them down to one.
    let parts: Vec<&[u8]> = domain.splitn(5, |&b| b == b'.').collect();
    for i in (1..=parts.len()).rev() {
        let suffix = parts[parts.len() - i..].join(&b'.');
        if suffix.is_empty() || suffix.len() > MAX_DOMAIN {
            break;
        }
        candidates.push([b"*.", &suffix[..]].concat());
    }
    candidates.push(b"*".to_vec());
    for cand in candidates {
        if cand.len() > MAX_DOMAIN {
            continue;
        }
        let here: Vec<&Route> = routes
            .iter()
            .filter(|r| r.kind == RouteType::Http && r.port == port)
            .filter(|r| {
                r.domain.len() <= MAX_DOMAIN && r.domain.as_bytes().eq_ignore_ascii_case(&cand)
            })
            .collect();
        if here.is_empty() {
            continue;
        }
        // Segments as Flynn's route tree: split on `/`, empty ones dropped; a route
        // matches when its segments start the path's; the deepest wins, then the longest.
        let split = |p: &[u8]| -> Vec<Vec<u8>> {
            p.split(|&b| b == b'/')
                .filter(|s| !s.is_empty())
                .map(<[u8]>::to_vec)
                .collect()
        };
        // The request path percent-decoded first (a `%` without two hex digits is itself).
        let mut decoded = Vec::new();
        let mut i = 0;
        while i < path.len() {
            let hex = |j: usize| path.get(j).and_then(|&c| (c as char).to_digit(16));
            match (path[i], hex(i + 1), hex(i + 2)) {
                (b'%', Some(h), Some(l)) => {
                    decoded.push((h * 16 + l) as u8);
                    i += 3;
                }
                (b, _, _) => {
                    decoded.push(b);
                    i += 1;
                }
            }
        }
        let have = split(&decoded);
        let mut best: Option<((usize, usize), &str)> = None;
        for r in here {
            let p = normalize_path(&r.path);
            let want = split(p.as_bytes());
            let depth = (want.len(), p.len());
            if have.starts_with(&want) && best.is_none_or(|(d, _)| depth > d) {
                best = Some((depth, r.id.as_str()));
            }
        }
        return best.map(|(_, id)| id);
    }
    None
}

fn run(u: &mut Unstructured) -> Result<()> {
    let n = u.int_in_range(0..=8)?;
    let mut routes = Vec::new();
    for i in 0..n {
        routes.push(route(u, i)?);
    }
    let table = Table::build(&routes, &HashMap::new(), 1);
    for _ in 0..u.int_in_range(1..=8)? {
        let mut host = if u.ratio(1, 4)? {
            u.arbitrary::<Vec<u8>>()?
        } else {
            domain(u)?.into_bytes()
        };
        if u.ratio(1, 3)? {
            host.extend_from_slice(b":8080");
        }
        let port = *u.choose(&PORTS)?;
        let path: Vec<u8> = if u.ratio(1, 4)? {
            u.arbitrary()?
        } else {
            u.choose(&PATHS)?.as_bytes().to_vec()
        };
        let got = table.lookup_http(&host, port, &path).map(|r| &*r.id);
        let want = model(&routes, &host, port, &path);
        assert_eq!(
            got, want,
            "host {host:?} port {port} path {path:?} routes {routes:?}"
        );
        let tcp = table.tcp_route(port).map(|r| &*r.id);
        let want_tcp = routes
            .iter()
            .rev()
            .find(|r| r.kind == RouteType::Tcp && r.port == port)
            .map(|r| r.id.as_str());
        assert_eq!(tcp, want_tcp);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
