//! The aggregator process under test plus small raw clients: spawn the real binary on
//! 127.0.0.1 port 0, learn its ports from the `listening` line, kill it on drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Logagg {
    child: Child,
    pub syslog: SocketAddr,
    pub api: SocketAddr,
}

impl Drop for Logagg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Logagg {
    pub fn start(extra: &[&str]) -> Logagg {
        let bin = env!("CARGO_BIN_EXE_flynn-logagg");
        let mut cmd = Command::new(bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FLYNN_") && k != "FLYNN_LOG" {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .args([
                "--syslog-addr",
                "127.0.0.1:0",
                "--api-addr",
                "127.0.0.1:0",
                "--threads",
                "2",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn flynn-logagg");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(40))
            .expect("no `listening` line within 40 s");
        let mut syslog = None;
        let mut api = None;
        for part in line.split_whitespace() {
            if let Some(a) = part.strip_prefix("syslog=") {
                syslog = a.parse().ok();
            }
            if let Some(a) = part.strip_prefix("api=") {
                api = a.parse().ok();
            }
        }
        Logagg {
            child,
            syslog: syslog.expect("syslog addr"),
            api: api.expect("api addr"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size of the aggregator process in bytes (`VmRSS` in /proc).
    pub fn rss(&self) -> u64 {
        let st = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc");
        st.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }

    /// `/.well-known/status` as JSON.
    pub fn status(&self) -> serde_json::Value {
        let (s, body) = self.get("/.well-known/status");
        assert_eq!(s, 200, "{body}");
        serde_json::from_str(&body).expect("status JSON")
    }

    /// Polls `metric` until `ok` holds (bounded by `within`); returns the last value.
    pub fn wait_metric(&self, name: &str, within: Duration, ok: impl Fn(u64) -> bool) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let v = self.metric(name);
            if ok(v) || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Polls until the newest line of `app` has body `body` (bounded: 10 s).
    pub fn wait_last(&self, app: &str, body: &str) -> bool {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            let v = self.log(app, "lines=1");
            if v.first().is_some_and(|j| j["msg"] == body) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.api)
    }

    /// A syslog TCP connection.
    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.syslog).expect("connect syslog");
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s
    }

    pub fn send(&self, bytes: &[u8]) {
        let mut s = self.connect();
        s.write_all(bytes).unwrap();
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        get(self.api, path, &[])
    }

    /// Log lines of `app` (NDJSON) as JSON values.
    pub fn log(&self, app: &str, query: &str) -> Vec<serde_json::Value> {
        let (status, body) = self.get(&format!("/log/{app}?{query}"));
        assert_eq!(status, 200, "{body}");
        body.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// Polls `/log/app` until `n` lines are there (bounded: 10 s).
    pub fn wait_lines(&self, app: &str, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            let v = self.log(app, "");
            if v.len() >= n || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn metric(&self, name_and_labels: &str) -> u64 {
        let (_, text) = self.get("/metrics");
        metric_sum(&text, name_and_labels)
    }
}

/// Sum of the samples whose series starts with `prefix` (e.g. `flynn_logagg_frame_garbage_total{`).
pub fn metric_sum(text: &str, prefix: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// An RFC 5424 message the way Flynn's log muxer writes it.
pub fn msg(
    app: &str,
    host: &str,
    procid: &str,
    msgid: &str,
    seq: u64,
    ts_us: u64,
    body: &str,
) -> String {
    let secs = 1_257_894_000 + ts_us / 1_000_000;
    let us = ts_us % 1_000_000;
    let (d, rem) = (secs / 86_400, secs % 86_400);
    assert_eq!(d, 14558, "keep test timestamps within 2009-11-10");
    format!(
        "<190>1 2009-11-10T{:02}:{:02}:{:02}.{us:06}Z {host} {app} {procid} {msgid} [flynn seq=\"{seq}\"] {body}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Octet-counting framing.
pub fn oc(m: &str) -> String {
    format!("{} {m}", m.len())
}

/// One-shot HTTP/1.0 GET; returns status and body.
pub fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect api");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: test\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read response");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("response head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, body.to_string())
}

/// A streaming reader (`follow=true`): lines arrive on a channel from a reader thread.
pub struct Follower {
    pub head: String,
    lines: mpsc::Receiver<String>,
    stream: TcpStream,
}

impl Follower {
    pub fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Follower {
        let mut s = TcpStream::connect(addr).expect("connect api");
        let mut req = format!("GET {path} HTTP/1.0\r\nHost: test\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let reader = s.try_clone().unwrap();
        let mut r = BufReader::new(reader);
        let mut head = String::new();
        loop {
            let mut l = String::new();
            if r.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
                break;
            }
            head.push_str(&l);
        }
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in r.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Follower {
            head,
            lines: rx,
            stream: s,
        }
    }

    pub fn next(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Next non-empty line parsed as JSON (`data: ` prefix stripped for SSE).
    pub fn next_json(&self, timeout: Duration) -> Option<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let l = self.next(left)?;
            let l = l.strip_prefix("data: ").unwrap_or(&l);
            if l.is_empty() || l.starts_with(':') || l.starts_with("event:") {
                continue;
            }
            return Some(serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")));
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}
