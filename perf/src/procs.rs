//! Child processes the harness starts, and the guarantee that they die with it.
//!
//! Every child runs in its own process group (so nginx's workers die with their master) and is
//! registered globally. A [`Proc`] kills its group on drop, which covers normal exit and panics
//! (the release profile unwinds); a signal thread covers Ctrl-C/SIGTERM/SIGHUP.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Extra cleanup run on a signal, after the process groups are killed and before the temp
/// dirs are removed (network namespaces, mounts, cgroups a harness made).
pub type Hook = Box<dyn FnOnce() + Send>;

struct Registry {
    pgids: Vec<i32>,
    dirs: Vec<PathBuf>,
    hooks: Vec<(u64, Hook)>,
    next_hook: u64,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pgids: Vec::new(),
    dirs: Vec::new(),
    hooks: Vec::new(),
    next_hook: 0,
});

static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// If a signal is being handled, waits (up to a minute) for the signal thread to clean up and
/// exit the process, so the main thread does not exit under it when its work fails.
pub fn wait_if_stopping() {
    if stopping() {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Registers `hook` for [`kill_all`]; returns a handle for [`remove_hook`].
pub fn add_hook(hook: Hook) -> u64 {
    let mut reg = registry();
    let id = reg.next_hook;
    reg.next_hook += 1;
    reg.hooks.push((id, hook));
    id
}

/// Unregisters a hook (its owner cleaned up by itself).
pub fn remove_hook(id: u64) {
    registry().hooks.retain(|(h, _)| *h != id);
}

/// Unregisters hook `id` and returns it (tests run a hook without [`kill_all`]).
#[cfg(test)]
pub(crate) fn take_hook(id: u64) -> Option<Hook> {
    let mut reg = registry();
    let at = reg.hooks.iter().position(|(h, _)| *h == id)?;
    Some(reg.hooks.remove(at).1)
}

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether a signal is being handled (the harness is cleaning up and about to exit).
pub fn stopping() -> bool {
    STOPPING.load(std::sync::atomic::Ordering::SeqCst)
}

/// Starts a thread that waits for SIGINT/SIGTERM/SIGHUP: the first one kills every
/// registered process group, runs the hooks and exits; a second one (cleanup stuck or too
/// slow for the user) exits at once. Signals are not blocked, so children start with a clean
/// signal mask.
pub fn install_signal_handler() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if STOPPING.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    eprintln!("\nflynn-perf: caught signal {sig} again, exiting without cleanup");
                    std::process::exit(128 + sig);
                }
                eprintln!("\nflynn-perf: caught signal {sig}, stopping every process it started");
                // The cleanup runs on its own thread so that this one hears a second signal.
                let cleanup = std::thread::Builder::new()
                    .name("cleanup".into())
                    .spawn(move || {
                        kill_all();
                        std::process::exit(128 + sig);
                    });
                if cleanup.is_err() {
                    kill_all();
                    std::process::exit(128 + sig);
                }
            }
        })
        .context("spawning the signal thread")?;
    Ok(())
}

/// Kills every registered process group, runs the hooks and removes every registered temp dir.
pub fn kill_all() {
    let hooks: Vec<(u64, Hook)> = {
        let mut reg = registry();
        for pgid in reg.pgids.drain(..) {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        reg.hooks.drain(..).collect()
    };
    for (_, hook) in hooks {
        hook();
    }
    let mut reg = registry();
    for dir in reg.dirs.drain(..) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A child process in its own process group, with stdout and stderr going to a log file.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` in its own process group, registered for [`kill_all`]; refused once a
    /// signal is being handled (the group would outlive the cleanup).
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        anyhow::ensure!(!stopping(), "not starting {name}: stopping on a signal");
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        {
            // Checked under the registry lock: `kill_all` drains the groups under it after
            // the flag is set, so a group is either drained by it or never registered.
            let mut reg = registry();
            if stopping() {
                drop(reg);
                let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                let _ = child.wait();
                anyhow::bail!("not starting {name}: stopping on a signal");
            }
            reg.pgids.push(child.id() as i32);
        }
        Ok(Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            exited: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits up to `timeout` for the process to exit on its own; kills it after that.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                anyhow::bail!("{} did not finish within {:?}; killed", self.name, timeout);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for a line of its log that starts with `prefix` and returns it;
    /// an error (with the log's tail) when the process exits or the time runs out first.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(l) = text.lines().find(|l| l.starts_with(prefix)) {
                return Ok(l.to_string());
            }
            if let Some(status) = self.exited() {
                anyhow::bail!("{} exited ({status}): {}", self.name, self.log_tail(20));
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} printed no {prefix:?} line in {timeout:?}: {}",
                self.name,
                self.log_tail(20)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log's last `lines` lines, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn kill(&mut self) {
        let pgid = self.child.id() as i32;
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        if self.exited.is_none() {
            self.exited = self.child.wait().ok();
        }
        registry().pgids.retain(|p| *p != pgid);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A directory under /tmp removed on drop (and on Ctrl-C).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> Result<TempDir> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let path = PathBuf::from(format!("/tmp/{prefix}.{}.{stamp:x}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        registry().dirs.push(path.clone());
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let mut reg = registry();
        if reg.dirs.contains(&self.path) {
            let _ = std::fs::remove_dir_all(&self.path);
            reg.dirs.retain(|d| d != &self.path);
        }
    }
}

/// A binary of ours: `arg` as given when it exists (relative to the current dir) or is
/// absolute, else `name` next to this executable (`target/release/`), else `arg` as is.
pub fn resolve_bin(arg: &Path, name: &str) -> PathBuf {
    if arg.exists() || arg.is_absolute() {
        return arg.to_path_buf();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| arg.to_path_buf())
}
