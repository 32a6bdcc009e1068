//! The router process under test: spawn, learn its ports from the `listening` line, talk to
//! its admin API, and kill it on drop (also when the test panics).

use super::client::Conn;
use super::{Backend, IO_TIMEOUT};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// A running `flynn-router`; killed and reaped on drop.
pub struct Router {
    child: Child,
    pub http_addr: SocketAddr,
    pub http_addrs: Vec<SocketAddr>,
    /// The `https=` listeners (empty without `--https-addr`).
    pub https_addrs: Vec<SocketAddr>,
    /// The `h2c=` listeners (empty without `--h2c-addr`).
    pub h2c_addrs: Vec<SocketAddr>,
    pub api_addr: SocketAddr,
    pub tcp_ports: Option<(u16, u16)>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// Set by [`Router::wait_exit`]: the process was meant to exit (e.g. after a handover).
    exit_expected: bool,
}

/// Command-line builder; every flag appears at most once except `--http-addr`.
pub struct RouterBuilder {
    http_addrs: usize,
    threads: u32,
    tcp_ports: Option<(u16, u16)>,
    routes: Option<PathBuf>,
    io_driver: Option<String>,
    /// Extra command-line arguments, appended after the builder's own flags.
    extra_args: Vec<String>,
    /// Extra environment variables for the router process.
    envs: Vec<(String, String)>,
}

impl RouterBuilder {
    pub fn threads(mut self, n: u32) -> Self {
        self.threads = n;
        self
    }
    /// Listen on `n` HTTP addresses (each `127.0.0.1:0`).
    pub fn http_addrs(mut self, n: usize) -> Self {
        self.http_addrs = n;
        self
    }
    /// `--tcp-ip 127.0.0.1 --tcp-ports A-B` with a fresh range from [`tcp_range`].
    pub fn tcp(mut self) -> Self {
        self.tcp_ports = Some(tcp_range(20));
        self
    }
    pub fn tcp_ports(mut self, range: (u16, u16)) -> Self {
        self.tcp_ports = Some(range);
        self
    }
    pub fn routes_file(mut self, path: PathBuf) -> Self {
        self.routes = Some(path);
        self
    }
    pub fn io_driver(mut self, driver: &str) -> Self {
        self.io_driver = Some(driver.into());
        self
    }

    /// Appends one raw command-line argument (e.g. `--proxy-protocol`).
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.extra_args.push(a.into());
        self
    }
    /// Sets an environment variable for the router process (e.g. `COOKIE_KEY`).
    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.envs.push((k.into(), v.into()));
        self
    }

    pub fn start(self) -> Router {
        let args = self.args();
        Router::spawn(&args, &self.envs, self.tcp_ports)
    }

    /// Runs a router that is expected to fail at start: waits up to `timeout` for it to
    /// exit and returns its exit status (None: still running, then killed) and its
    /// stdout+stderr.
    pub fn run_to_exit(self, timeout: Duration) -> (Option<std::process::ExitStatus>, String) {
        let args = self.args();
        let mut cmd = Router::command(&self.envs);
        let mut child = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn flynn-router");
        let mut pipes = Vec::new();
        let out = Arc::new(Mutex::new(Vec::new()));
        let so: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let se: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        for mut p in [so, se] {
            let sink = out.clone();
            pipes.push(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = p.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            }));
        }
        let deadline = std::time::Instant::now() + timeout;
        let status = loop {
            if let Ok(Some(st)) = child.try_wait() {
                break Some(st);
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for p in pipes {
            let _ = p.join();
        }
        let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
        (status, text)
    }

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = Vec::new();
        for _ in 0..self.http_addrs {
            args.extend(["--http-addr".into(), "127.0.0.1:0".into()]);
        }
        args.extend(["--api-addr".into(), "127.0.0.1:0".into()]);
        args.extend(["--threads".into(), self.threads.to_string()]);
        if let Some((a, b)) = self.tcp_ports {
            args.extend(["--tcp-ip".into(), "127.0.0.1".into()]);
            args.extend(["--tcp-ports".into(), format!("{a}-{b}")]);
        }
        if let Some(p) = &self.routes {
            args.extend(["--routes".into(), p.display().to_string()]);
        }
        if let Some(d) = &self.io_driver {
            args.extend(["--io-driver".into(), d.clone()]);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

impl Router {
    pub fn builder() -> RouterBuilder {
        RouterBuilder {
            http_addrs: 1,
            threads: 2,
            tcp_ports: None,
            routes: None,
            io_driver: None,
            extra_args: Vec::new(),
            envs: Vec::new(),
        }
    }

    /// A router with one HTTP listener, the API and two threads.
    pub fn start() -> Router {
        Self::builder().start()
    }

    /// The router command with a clean configuration environment plus `envs`.
    fn command(envs: &[(String, String)]) -> Command {
        let bin = env!("CARGO_BIN_EXE_flynn-router");
        let mut cmd = Command::new(bin);
        // Only our flags configure the router (FLYNN_LOG is kept for debugging).
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FLYNN_") && k != "FLYNN_LOG" {
                cmd.env_remove(k);
            }
        }
        for k in ["COOKIE_KEY", "PROXY_PROTOCOL", "ERROR_503_PAGE_URL"] {
            cmd.env_remove(k);
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd
    }

    fn spawn(args: &[String], envs: &[(String, String)], tcp_ports: Option<(u16, u16)>) -> Router {
        let bin = env!("CARGO_BIN_EXE_flynn-router");
        let mut cmd = Self::command(envs);
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));

        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut err_pipe = child.stderr.take().expect("stderr piped");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });

        let out = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            let mut sent = false;
            while let Some(Ok(line)) = lines.next() {
                if !sent && line.starts_with("listening") {
                    let _ = tx.send(line);
                    sent = true;
                }
            }
        });

        let line = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                std::thread::sleep(Duration::from_millis(50));
                let log = String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
                panic!(
                    "router {args:?} printed no `listening` line within 10 s (exit: {status:?})\nstderr:\n{log}"
                );
            }
        };

        let mut http_addrs = Vec::new();
        let mut https_addrs = Vec::new();
        let mut h2c_addrs = Vec::new();
        let mut api_addr = None;
        for token in line.split_whitespace().skip(1) {
            if let Some(v) = token.strip_prefix("http=") {
                http_addrs = v
                    .split(',')
                    .map(|a| a.parse().expect("http addr"))
                    .collect();
            } else if let Some(v) = token.strip_prefix("https=") {
                https_addrs = v
                    .split(',')
                    .map(|a| a.parse().expect("https addr"))
                    .collect();
            } else if let Some(v) = token.strip_prefix("h2c=") {
                h2c_addrs = v.split(',').map(|a| a.parse().expect("h2c addr")).collect();
            } else if let Some(v) = token.strip_prefix("api=") {
                api_addr = Some(v.parse().expect("api addr"));
            }
        }
        let api_addr = api_addr.unwrap_or_else(|| panic!("no api= in {line:?}"));
        assert!(!http_addrs.is_empty(), "no http= in {line:?}");
        Router {
            child,
            http_addr: http_addrs[0],
            http_addrs,
            https_addrs,
            h2c_addrs,
            api_addr,
            tcp_ports,
            stderr,
            exit_expected: false,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends the router `SIGHUP` (re-read the routes file).
    pub fn hup(&self) {
        self.signal("HUP");
    }

    /// Sends the router signal `sig` (a name for `kill -<sig>`: `STOP`, `CONT`...).
    pub fn signal(&self, sig: &str) {
        let st = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -{sig} {}", self.pid());
    }

    /// Waits up to `timeout` for the process to exit on its own; dropping it afterwards
    /// is then not an error.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.exit_expected = true;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The router's stderr so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Panics if the router process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "router exited unexpectedly: {status}\nstderr:\n{}",
                self.log()
            );
        }
    }

    /// The sum over cores of the router's counter `flynn_router_{name}` (`/metrics`).
    pub fn metric(&self, name: &str) -> u64 {
        let (_, m) = self.api("GET", "/metrics", None);
        let prefix = format!("flynn_router_{name}{{");
        m.as_str()
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// One admin API call. The body (if any) is sent as `application/json`. The response
    /// body is parsed as JSON when possible, else returned as a JSON string.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        api_call(self.api_addr, method, path, body)
            .unwrap_or_else(|| panic!("{method} {path}: no answer from the admin API"))
    }

    /// [`Router::api`] with `timeout` for the answer instead of [`IO_TIMEOUT`] (a change is
    /// answered once every core applied it, which the API waits up to 5 s for).
    pub fn api_within(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        timeout: Duration,
    ) -> (u16, Value) {
        api_call_within(self.api_addr, method, path, body, timeout)
            .unwrap_or_else(|| panic!("{method} {path}: no answer from the admin API"))
    }

    /// Adds `n` HTTP routes (`d<i>.example.com` to service `web`) one by one, each answered
    /// within 30 s with 200, while a stream counts its bytes in `moved`: how long each
    /// change took to be answered, and the stream's rate meanwhile (bytes/s).
    pub fn time_route_changes(
        &self,
        n: usize,
        moved: &std::sync::atomic::AtomicU64,
    ) -> (Vec<Duration>, f64) {
        let (before, t0) = (moved.load(Ordering::Relaxed), std::time::Instant::now());
        let mut took = Vec::new();
        for i in 0..n {
            let route = serde_json::json!({
                "type": "http", "domain": format!("d{i}.example.com"), "service": "web"
            });
            let start = std::time::Instant::now();
            let (status, body) = self.api_within(
                "POST",
                "/routes",
                Some(&route.to_string()),
                Duration::from_secs(30),
            );
            took.push(start.elapsed());
            assert_eq!(status, 200, "{body}");
        }
        let rate = (moved.load(Ordering::Relaxed) - before) as f64 / t0.elapsed().as_secs_f64();
        (took, rate)
    }

    /// The I/O driver its cores run (`io_uring` or `epoll`), from their `worker started`
    /// log lines (waited for up to 5 s).
    pub fn driver(&self) -> String {
        let found = || {
            let log = self.log();
            let line = log.lines().find(|l| l.contains("worker started"))?;
            ["io_uring", "epoll"]
                .into_iter()
                .find(|d| line.contains(d))
                .map(String::from)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(d) = found() {
                return d;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no `worker started` line:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `POST /routes`, asserting 200; returns the stored route.
    pub fn add_route(&self, route: Value) -> Value {
        let (status, body) = self.api("POST", "/routes", Some(&route.to_string()));
        assert_eq!(status, 200, "POST /routes {route} -> {body}");
        body
    }

    /// `DELETE /routes/:type/:id`, asserting success.
    pub fn delete_route(&self, route: &Value) {
        let path = route_path(route);
        let (status, body) = self.api("DELETE", &path, None);
        assert!(
            (200..300).contains(&status),
            "DELETE {path} -> {status} {body}"
        );
    }

    /// `PUT /routes/:type/:id` with `route` as the body, asserting 200.
    pub fn update_route(&self, route: &Value) -> Value {
        let path = route_path(route);
        let (status, body) = self.api("PUT", &path, Some(&route.to_string()));
        assert_eq!(status, 200, "PUT {path} {route} -> {body}");
        body
    }

    /// `PUT /services/:service/backends` with the given backends (the first leads).
    pub fn set_backends(&self, service: &str, backends: &[&Backend]) {
        let addrs: Vec<(String, bool)> = backends
            .iter()
            .map(|b| (b.addr.to_string(), false))
            .collect();
        self.set_backend_addrs(service, &addrs);
    }

    /// `PUT /services/:service/backends` with explicit `(addr, leader)` pairs.
    pub fn set_backend_addrs(&self, service: &str, addrs: &[(String, bool)]) {
        let body: Vec<Value> = addrs
            .iter()
            .map(|(a, l)| {
                if *l {
                    serde_json::json!({"addr": a, "leader": true})
                } else {
                    serde_json::json!({"addr": a})
                }
            })
            .collect();
        let body = Value::Array(body).to_string();
        let path = format!("/services/{service}/backends");
        let (status, resp) = self.api("PUT", &path, Some(&body));
        assert!(
            (200..300).contains(&status),
            "PUT {path} {body} -> {status} {resp}"
        );
    }
}

/// `/routes/<type>/<id>` of a stored route.
pub fn route_path(route: &Value) -> String {
    let kind = route["type"]
        .as_str()
        .unwrap_or_else(|| panic!("route without type: {route}"));
    let id = route["id"]
        .as_str()
        .unwrap_or_else(|| panic!("route without id: {route}"));
    format!("/routes/{kind}/{id}")
}

impl Drop for Router {
    fn drop(&mut self) {
        let exited = self
            .child
            .try_wait()
            .ok()
            .flatten()
            .filter(|_| !self.exit_expected);
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- router stderr ----\n{}\n---- end router stderr ----",
                self.log()
            );
        } else if let Some(status) = exited {
            panic!(
                "router exited during the test: {status}\nstderr:\n{}",
                self.log()
            );
        }
    }
}

/// A TCP port range of `len + 1` ports (inclusive) in 10000..32000 that is free right now.
/// Ranges come from a per-process counter starting at a pid-derived offset so that parallel
/// tests and test binaries rarely collide; each candidate is probed by binding every port.
pub fn tcp_range(len: u16) -> (u16, u16) {
    // Offsets handed out so far in this process: ranges of different lengths never overlap.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Below the kernel's default ephemeral range (32768+), so outgoing connections do not
    // hold them.
    let base = (std::process::id() % 200) * 100;
    let mut last_err = None;
    for _ in 0..200 {
        let off = NEXT.fetch_add(len as u32 + 5, Ordering::Relaxed);
        let start = (10000 + (base + off) % (22000 - len as u32)) as u16;
        let end = start + len;
        let probes: Vec<_> = (start..=end)
            .map(|p| TcpListener::bind(("127.0.0.1", p)))
            .collect();
        match probes.into_iter().find_map(Result::err) {
            None => return (start, end),
            Some(e) => last_err = Some((start, e)),
        }
    }
    panic!("no free TCP port range found (last: {last_err:?})");
}

/// How long tests wait for things that should happen "immediately".
pub const SOON: Duration = IO_TIMEOUT;

/// One admin API call to `addr` (see [`Router::api`]); `None` when the connection failed
/// or closed without an answer.
pub fn api_call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Option<(u16, Value)> {
    api_call_within(addr, method, path, body, IO_TIMEOUT)
}

/// [`api_call`], waiting up to `timeout` for the answer.
pub fn api_call_within(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Option<(u16, Value)> {
    let mut conn = Conn::try_connect(addr).ok()?;
    conn.set_read_timeout(timeout);
    let body = body.unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: router-api\r\nConnection: close\r\n");
    if !body.is_empty() || matches!(method, "POST" | "PUT") {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    conn.try_send(req.as_bytes()).ok()?;
    let resp = conn.try_response().ok()?;
    let value = serde_json::from_slice(&resp.body).unwrap_or_else(|_| Value::String(resp.text()));
    Some((resp.status, value))
}
