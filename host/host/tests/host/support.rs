//! Test support: binaries located (or built), processes killed on drop, a host daemon
//! per test with its own state directory and ports.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flynn_client::host::{ActiveJob, Client, Job, JobStatus};

/// Kills and reaps the process on drop (also when a test panics).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for `proc` to exit on its own; panics after `within`.
pub async fn wait_exit(proc: &mut Proc, within: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = proc.0.try_wait().unwrap() {
            return st;
        }
        assert!(
            t0.elapsed() < within,
            "process still running after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `target/<profile>/<name>`, built with `cargo build -p <package>` when missing.
pub fn bin(name: &str, package: &str) -> PathBuf {
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let path = dir.join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", package]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        assert!(cmd.status().unwrap().success(), "building {package} failed");
    }
    assert!(path.exists(), "{} not found", path.display());
    path
}

/// Starts a binary and returns it with the `key=value` words of its `listening` line.
pub fn start(path: &Path, args: &[&str]) -> (Proc, Vec<(String, String)>) {
    let mut child = Command::new(path)
        .args(args)
        .env("FLYNN_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let p = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.starts_with("listening") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{} printed no listening line", path.display()));
    let kv = line
        .split_whitespace()
        .skip(1)
        .filter_map(|w| {
            w.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    (p, kv)
}

pub fn get(kv: &[(String, String)], k: &str) -> String {
    kv.iter()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no {k} in {kv:?}"))
}

/// A unique name for this test process: `<prefix><pid><n>`.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
pub fn http(addr: &str, method: &str, path: &str, ctype: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A running flynn-host with its own state directory.
pub struct Host {
    pub proc: Option<Proc>,
    pub addr: String,
    pub client: Client,
    pub dir: tempfile::TempDir,
    pub id: String,
}

impl Host {
    pub fn start(extra: &[&str]) -> Host {
        let dir = tempfile::Builder::new()
            .prefix("flynn-host-test")
            .tempdir()
            .unwrap();
        let id = unique("t");
        Self::start_in(dir, &id, extra)
    }

    pub fn start_in(dir: tempfile::TempDir, id: &str, extra: &[&str]) -> Host {
        let state = dir.path().to_str().unwrap().to_string();
        let mut args = vec!["--addr", "127.0.0.1:0", "--state-dir", &state, "--id", id];
        args.extend_from_slice(extra);
        let (proc, kv) = start(Path::new(env!("CARGO_BIN_EXE_flynn-host")), &args);
        let addr = get(&kv, "api");
        Host {
            proc: Some(proc),
            client: Client::new(&format!("http://{addr}")),
            addr,
            dir,
            id: id.to_string(),
        }
    }

    /// Kills the daemon (if it still runs) and starts a new one with the same id on the
    /// same state directory.
    pub fn restart(&mut self, extra: &[&str]) {
        drop(self.proc.take());
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let id = self.id.clone();
        *self = Host::start_in(dir, &id, extra);
    }

    pub fn job_id(&self, name: &str) -> String {
        format!("{}-{name}", self.id)
    }
}

/// A job for the process runtime running `sh -c script`.
pub fn sh_job(id: &str, script: &str) -> Job {
    let mut j = Job {
        id: id.to_string(),
        ..Job::default()
    };
    j.config.args = vec!["/bin/sh".into(), "-c".into(), script.into()];
    j
}

/// Polls the job until `pred` holds (or panics after `timeout`).
pub async fn wait_job(
    c: &Client,
    id: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&ActiveJob) -> bool,
) -> ActiveJob {
    let start = Instant::now();
    loop {
        let last = c.get_job(id).await;
        if let Ok(j) = &last {
            if pred(j) {
                return j.clone();
            }
        }
        assert!(
            start.elapsed() < timeout,
            "job {id}: {what} not reached in {timeout:?}; last {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn wait_ended(c: &Client, id: &str, timeout: Duration) -> ActiveJob {
    wait_job(c, id, timeout, "ended", |j| j.status.is_terminal()).await
}

pub async fn wait_running(c: &Client, id: &str) -> ActiveJob {
    wait_job(c, id, Duration::from_secs(30), "running", |j| {
        j.status == JobStatus::Running
    })
    .await
}

/// Runs `f` until it returns true, for at most `timeout`.
pub async fn eventually(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A log aggregator on loopback ports: (process, syslog addr, API addr).
pub fn logagg() -> (Proc, String, String) {
    let (p, kv) = start(
        &bin("flynn-logagg", "flynn-logagg"),
        &[
            "--syslog-addr",
            "127.0.0.1:0",
            "--api-addr",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--no-udp",
        ],
    );
    (p, get(&kv, "syslog"), get(&kv, "api"))
}

/// A log aggregator on the given syslog and API addresses (to restart one in place).
pub fn logagg_on(syslog: &str, api: &str) -> Proc {
    let (p, _) = start(
        &bin("flynn-logagg", "flynn-logagg"),
        &[
            "--syslog-addr",
            syslog,
            "--api-addr",
            api,
            "--threads",
            "1",
            "--no-udp",
        ],
    );
    p
}

/// The aggregator's lines of `app` as JSON objects.
pub fn log_lines(api: &str, app: &str) -> Vec<serde_json::Value> {
    let (status, body) = http(api, "GET", &format!("/log/{app}"), "text/plain", "");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
