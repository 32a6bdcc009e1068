//! A real `flynn-discoverd` for tests: located next to the test binary (built with `cargo build -p
//! flynn-discoverd` when missing, since a test outside its package cannot use `CARGO_BIN_EXE`),
//! started on a port it picks itself, SIGKILLed and reaped on drop.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// `target/<profile>/<name>`, building the package if the binary is not there.
pub fn workspace_bin(name: &str, package: &str) -> Result<PathBuf> {
    // target/<profile>/deps/<this test> → target/<profile>/<name>
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .context("test binary has no target dir")?
        .to_path_buf();
    let path = dir.join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", package, "--bin", name]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().context("running cargo build")?;
        if !status.success() {
            bail!("building {package} failed");
        }
    }
    if !path.exists() {
        bail!("{} not found after building", path.display());
    }
    Ok(path)
}

pub struct Discoverd {
    child: Child,
    /// `host:port` of the HTTP API.
    pub addr: String,
    /// Network namespace it runs in, if not the test's own.
    pub netns: Option<String>,
    _dir: tempfile::TempDir,
}

/// Spawns flynn-discoverd on `listen` with data in `dir`; returns it and its HTTP address.
fn spawn(dir: &std::path::Path, listen: &str, netns: Option<&str>) -> Result<(Child, String)> {
    let bin = workspace_bin("flynn-discoverd", "flynn-discoverd")?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FLYNN_") && k != "FLYNN_LOG" {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .arg("--data-dir")
        .arg(dir)
        .args(["--addr", listen, "--instance-ttl", "5s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn flynn-discoverd")?;
    let out = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(out).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for _ in lines {}
    });
    let line = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(l) => l,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("discoverd printed no listening line");
        }
    };
    match line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
    {
        Some(addr) => Ok((child, addr.to_string())),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("no http= in {line:?}")
        }
    }
}

impl Discoverd {
    /// A single-node discoverd listening on `listen` (e.g. `127.0.0.1:0`), inside network
    /// namespace `netns` when given.
    pub fn start(listen: &str, netns: Option<&str>) -> Result<Discoverd> {
        let dir = tempfile::tempdir()?;
        let (child, addr) = spawn(dir.path(), listen, netns)?;
        let d = Discoverd {
            child,
            addr,
            netns: netns.map(String::from),
            _dir: dir,
        };
        d.wait_for_leader()?;
        Ok(d)
    }

    /// Starts it again on the same address and data directory (after [`Discoverd::kill`]).
    #[allow(dead_code)] // not every test binary that includes this module uses it
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let (child, addr) = spawn(self._dir.path(), &self.addr, self.netns.as_deref())?;
        self.child = child;
        self.addr = addr;
        self.wait_for_leader()
    }

    /// Waits (up to 20 s) until writes are accepted: a fresh node has no Raft leader for a moment.
    fn wait_for_leader(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let url = format!("{}/services/ready-probe", self.url());
        loop {
            let out = self
                .command("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "-m",
                    "2",
                    "-X",
                    "PUT",
                ])
                .args([
                    "-H",
                    "content-type: application/json",
                    "-d",
                    r#"{"leader_type":"oldest"}"#,
                ])
                .arg(&url)
                .output();
            let code = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            if matches!(code.as_deref(), Ok("200") | Ok("409")) {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "discoverd at {} never accepted writes (last: {code:?})",
                    self.addr
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A command that runs in discoverd's network namespace.
    pub fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Discoverd {
    /// Stops it (SIGKILL), as in an outage.
    #[allow(dead_code)] // not every test binary that includes this module uses it
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Discoverd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
