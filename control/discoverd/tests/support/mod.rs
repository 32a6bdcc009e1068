//! A `flynn-discoverd` process under test: spawned with its flags, its address read from
//! the `listening` line, SIGKILLed and reaped on drop (also when a test panics), plus a
//! small HTTP helper.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Discoverd {
    child: Option<Child>,
    pub addr: String,
    /// The DNS address from the `listening` line, when started with `--dns-addr`.
    pub dns: Option<String>,
    pub data_dir: PathBuf,
    args: Vec<String>,
}

impl Discoverd {
    /// One node that is its own only peer, on an ephemeral port.
    pub fn single(dir: &Path, ttl: &str) -> Discoverd {
        Discoverd::spawn(
            dir,
            vec![
                "--addr".into(),
                "127.0.0.1:0".into(),
                "--instance-ttl".into(),
                ttl.into(),
            ],
        )
    }

    /// One node on a fixed (probed) port, so it keeps its identity across restarts.
    pub fn single_fixed(dir: &Path, ttl: &str) -> Discoverd {
        let addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
        Discoverd::spawn(
            dir,
            vec![
                "--addr".into(),
                addr.clone(),
                "--host".into(),
                addr,
                "--instance-ttl".into(),
                ttl.into(),
            ],
        )
    }

    pub fn spawn(dir: &Path, mut extra: Vec<String>) -> Discoverd {
        let mut args = vec!["--data-dir".to_string(), dir.display().to_string()];
        args.append(&mut extra);
        let mut d = Discoverd {
            child: None,
            addr: String::new(),
            dns: None,
            data_dir: dir.to_path_buf(),
            args,
        };
        d.start();
        d
    }

    /// (Re)starts the process with the same flags and data directory.
    pub fn start(&mut self) {
        let bin = env!("CARGO_BIN_EXE_flynn-discoverd");
        let mut cmd = Command::new(bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FLYNN_") && k != "FLYNN_LOG" {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("FLYNN_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::piped()
            })
            .spawn()
            .expect("spawn flynn-discoverd");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        // Keep the last lines of stderr so a failed start says why.
        let tail = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let stderr_done = child.stderr.take().map(|err| {
            let tail = tail.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(err).lines().map_while(Result::ok) {
                    let mut t = tail.lock().unwrap();
                    if t.len() == 20 {
                        t.remove(0);
                    }
                    t.push(l);
                }
            })
        });
        self.child = Some(child);
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(e) => {
                self.kill();
                if let Some(h) = stderr_done {
                    let _ = h.join();
                }
                panic!(
                    "discoverd did not print its listening line ({e}); its stderr ended with:\n{}",
                    tail.lock().unwrap().join("\n")
                );
            }
        };
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http="))
            .expect("listening line has http=")
            .to_string();
        self.addr = addr;
        self.dns = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("dns="))
            .map(String::from);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends the process signal `name` (`STOP`, `CONT`, ...).
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{name} {pid} failed");
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Discoverd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An HTTP client that does not follow redirects (tests look at them).
pub fn raw_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        // Under discoverd's 30 s idle close, as flynn-client's.
        .pool_idle_timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// An HTTP client that follows redirects to the leader.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    }
}

pub async fn send(
    c: &reqwest::Client,
    method: &str,
    url: &str,
    body: Option<&str>,
) -> reqwest::Result<Reply> {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = c.request(m, url);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let r = req.send().await?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.text().await?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

pub async fn call(c: &reqwest::Client, method: &str, url: &str, body: Option<&str>) -> Reply {
    send(c, method, url, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

pub fn instance_json(addr: &str) -> (String, String) {
    let id = flynn_discoverd::api::instance_id("tcp", addr);
    let body = format!(r#"{{"id":"{id}","addr":"{addr}","proto":"tcp"}}"#);
    (id, body)
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(v) = f().await {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Reads SSE `data:` items from a streaming response until `n` items or `limit`.
pub async fn read_events(resp: &mut reqwest::Response, n: usize, limit: Duration) -> Vec<Value> {
    let mut buf = String::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + limit;
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, resp.chunk()).await {
            Ok(Ok(Some(chunk))) => buf.push_str(&String::from_utf8_lossy(&chunk)),
            _ => break,
        }
        while let Some(i) = buf.find("\n\n") {
            let item: String = buf.drain(..i + 2).collect();
            for line in item.lines() {
                if let Some(d) = line.strip_prefix("data: ") {
                    out.push(serde_json::from_str(d).unwrap_or(Value::String(d.into())));
                }
            }
        }
    }
    out
}

/// Opens a watch (SSE) of a service that has no instances and reads its replay, which is
/// just `current`.
pub async fn watch_empty_service(c: &reqwest::Client, url: &str) -> reqwest::Response {
    let mut watch = c
        .get(url)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    let current = read_events(&mut watch, 1, Duration::from_secs(5)).await;
    assert_eq!(current.first().map(|e| &e["kind"]), Some(&"current".into()));
    watch
}

/// Reads a streaming response to its end (or `limit`): its text, and whether it ended.
pub async fn read_to_end(resp: &mut reqwest::Response, limit: Duration) -> (String, bool) {
    let mut text = String::new();
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, resp.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(_) => return (text, true),
            Err(_) => return (text, false),
        }
    }
}

/// A port that is free on `ip` right now (probed by binding port 0).
pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("probe a free port")
}
