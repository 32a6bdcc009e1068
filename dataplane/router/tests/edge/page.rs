//! The custom 503 page (spec §1.1, §1.6): `--error-503-page FILE` or
//! `ERROR_503_PAGE_URL` (fetched once at start, must answer 200) replaces the body of the
//! router's own 503 responses, served as `text/html; charset=utf-8`.

use crate::support::backend::respond;
use crate::support::{dead_addr, http_route, Backend, Conn, Reply, Response, Router};
use crate::EXIT_TIMEOUT;
use std::path::PathBuf;

const DOMAIN: &str = "page.example.com";
const PAGE: &str =
    "<!doctype html>\n<html><body><h1>Down for maintenance</h1>\u{2014} ünïcode</body></html>\n";

/// A temporary file removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, content: &[u8]) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("flynn-router-edge-{}-{name}", std::process::id()));
        std::fs::write(&path, content).unwrap();
        TempFile(path)
    }
    fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn assert_page(resp: &Response, page: &[u8]) {
    assert_eq!(resp.status, 503, "{resp:?}");
    assert_eq!(
        resp.header("content-type"),
        Some("text/html; charset=utf-8"),
        "{resp:?}"
    );
    assert_eq!(resp.body, page, "body: {:?}", resp.text());
    if let Some(cl) = resp.header("content-length") {
        assert_eq!(cl.parse::<usize>().unwrap(), page.len());
    }
}

const WS: &str = "GET /ws HTTP/1.1\r\nHost: page.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";

/// Every kind of router-made 503 carries the page: no backends (plain and upgrade,
/// keep-alive kept for the plain one) and only dead backends (plain and upgrade).
fn assert_all_503s_use_page(router: &Router, page: &[u8]) {
    router.add_route(http_route(DOMAIN, "empty"));
    let mut conn = Conn::connect(router.http_addr);
    for _ in 0..2 {
        let resp = conn.get(DOMAIN, "/");
        assert_page(&resp, page);
    }
    let resp = Conn::connect(router.http_addr).request(WS);
    assert_page(&resp, page);

    router.add_route(http_route("dead.example.com", "dead"));
    router.set_backend_addrs("dead", &[(dead_addr().to_string(), false)]);
    let resp = crate::support::get(router.http_addr, "dead.example.com", "/");
    assert_page(&resp, page);
    let resp = Conn::connect(router.http_addr)
        .request(&WS.replace("page.example.com", "dead.example.com"));
    assert_page(&resp, page);

    // 404s and backend responses are untouched.
    let resp = crate::support::get(router.http_addr, "nowhere.example.com", "/");
    assert_eq!(resp.status, 404);
    assert_eq!(resp.body, b"Not Found\n");
}

#[test]
fn page_from_file() {
    let file = TempFile::new("page.html", PAGE.as_bytes());
    let router = Router::builder()
        .arg("--error-503-page")
        .arg(file.arg())
        .start();
    assert_all_503s_use_page(&router, PAGE.as_bytes());
    // A backend's own 503 passes through unchanged.
    let b = Backend::with_handler("b", |_req, conn| {
        respond(
            conn,
            "503 Service Unavailable",
            &[("Content-Type", "text/plain")],
            b"backend says no",
        );
        Reply::KeepAlive
    });
    router.add_route(http_route("own.example.com", "own"));
    router.set_backends("own", &[&b]);
    let resp = crate::support::get(router.http_addr, "own.example.com", "/");
    assert_eq!(resp.status, 503);
    assert_eq!(resp.header("content-type"), Some("text/plain"));
    assert_eq!(resp.body, b"backend says no");
}

#[test]
fn default_503_without_page() {
    let router = Router::start();
    router.add_route(http_route(DOMAIN, "empty"));
    let resp = crate::support::get(router.http_addr, DOMAIN, "/");
    assert_eq!(resp.status, 503);
    assert_eq!(resp.body, b"Service Unavailable\n");
    assert_ne!(
        resp.header("content-type"),
        Some("text/html; charset=utf-8")
    );
}

fn page_server(chunked: bool) -> Backend {
    Backend::with_handler("pages", move |req, conn| {
        if req.uri == "/page" {
            if chunked {
                let mut out = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                for part in PAGE.as_bytes().chunks(17) {
                    out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                    out.extend_from_slice(part);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
                let _ = conn.write(&out);
            } else {
                respond(
                    conn,
                    "200 OK",
                    &[("Content-Type", "text/html")],
                    PAGE.as_bytes(),
                );
            }
        } else {
            respond(conn, "404 Not Found", &[], b"no such page\n");
        }
        Reply::Close
    })
}

#[test]
fn page_from_url() {
    let server = page_server(false);
    let router = Router::builder()
        .env("ERROR_503_PAGE_URL", format!("http://{}/page", server.addr))
        .start();
    assert_eq!(server.request_count(), 1, "fetched once at start");
    let seen = &server.requests()[0];
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.uri, "/page");
    assert_all_503s_use_page(&router, PAGE.as_bytes());
    assert_eq!(server.request_count(), 1, "never fetched again");
}

#[test]
fn page_from_url_with_chunked_body() {
    let server = page_server(true);
    let router = Router::builder()
        .env("ERROR_503_PAGE_URL", format!("http://{}/page", server.addr))
        .start();
    router.add_route(http_route(DOMAIN, "empty"));
    let resp = crate::support::get(router.http_addr, DOMAIN, "/");
    assert_page(&resp, PAGE.as_bytes());
}

#[test]
fn page_url_answering_404_stops_the_router() {
    let server = page_server(false);
    let (status, out) = Router::builder()
        .env(
            "ERROR_503_PAGE_URL",
            format!("http://{}/missing", server.addr),
        )
        .run_to_exit(EXIT_TIMEOUT);
    let status = status.unwrap_or_else(|| panic!("router kept running:\n{out}"));
    assert!(!status.success(), "exit {status}\n{out}");
    assert!(out.contains("ERROR_503_PAGE_URL"), "{out}");
    assert!(!out.contains("listening"), "{out}");
    assert_eq!(server.request_count(), 1);
}

#[test]
fn unreachable_page_url_or_missing_file_stops_the_router() {
    let dead = dead_addr();
    let (status, out) = Router::builder()
        .env("ERROR_503_PAGE_URL", format!("http://{dead}/page"))
        .run_to_exit(EXIT_TIMEOUT);
    let status = status.unwrap_or_else(|| panic!("router kept running:\n{out}"));
    assert!(!status.success(), "unreachable URL: exit {status}\n{out}");

    let missing = std::env::temp_dir().join(format!(
        "flynn-router-edge-{}-does-not-exist.html",
        std::process::id()
    ));
    refused_page_file(&missing.display().to_string());
}

/// Starts the router with `--error-503-page <path>`, which must stop it before it listens;
/// returns what it printed.
fn refused_page_file(path: &str) -> String {
    let (status, out) = Router::builder()
        .arg("--error-503-page")
        .arg(path)
        .run_to_exit(EXIT_TIMEOUT);
    let status = status.unwrap_or_else(|| panic!("router kept running:\n{out}"));
    assert!(!status.success(), "{path}: exit {status}\n{out}");
    assert!(!out.contains("listening"), "{out}");
    out
}

/// A router with the 503 page `file`, an h2c listener, and a route to a service without
/// backends (so every request to [`DOMAIN`] gets the router's own 503).
fn h2c_page_router(file: &TempFile) -> Router {
    let router = Router::builder()
        .arg("--error-503-page")
        .arg(file.arg())
        .arg("--h2c-addr")
        .arg("127.0.0.1:0")
        .start();
    router.add_route(http_route(DOMAIN, "empty"));
    router
}

/// HTTP/2 clients get the same page for the router's own 503 (no backends).
#[test]
fn page_over_http2() {
    let file = TempFile::new("page-h2.html", PAGE.as_bytes());
    let router = h2c_page_router(&file);
    let (head, body) = crate::support::h2c_curl(router.h2c_addrs[0], DOMAIN, "/", &[]);
    let head = head.join("\r\n");
    let text = format!("{head}\r\n\r\n{body}");
    assert!(head.starts_with("HTTP/2 503"), "{text}");
    assert!(
        head.contains("content-type: text/html; charset=utf-8"),
        "{text}"
    );
    assert_eq!(body, PAGE);
}

/// The page file is capped at 1,000,000 bytes, as the URL form is: a file of exactly that
/// is served whole (over HTTP/1.1 and HTTP/2), one byte more stops the router at start
/// with a message naming the limit.
#[test]
fn page_file_over_a_million_bytes_stops_the_router() {
    let mut page = vec![b'a'; 1_000_000];
    page[..6].copy_from_slice(b"<html>");
    let file = TempFile::new("page-max.html", &page);
    let router = h2c_page_router(&file);
    let resp = crate::support::get(router.http_addr, DOMAIN, "/");
    assert_page(&resp, &page);
    let (head, body) = crate::support::h2c_curl(router.h2c_addrs[0], DOMAIN, "/", &[]);
    assert!(head[0].starts_with("HTTP/2 503"), "{head:?}");
    assert!(body.as_bytes() == page.as_slice(), "{} bytes", body.len());

    page.push(b'a');
    let big = TempFile::new("page-big.html", &page);
    let out = refused_page_file(&big.arg());
    assert!(out.contains("larger than 1000000 bytes"), "{out}");
}
