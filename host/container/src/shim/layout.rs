//! Where a job's shim keeps its state: `<state_dir>/<id>/`.

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Longest unix socket path (`sun_path` minus the NUL).
const MAX_SOCKET_PATH: usize = 107;

const CONTROL_SOCKET: &str = "control.sock";
/// The spare shim's log, beside the jobs' directories in the state directory.
pub const SPARE_LOG: &str = "spare.log";
const CONSOLE_SOCKET: &str = "console.sock";

/// A control socket path usable with bind/connect (see [`Layout::socket_addr`]).
pub struct SocketAddr {
    pub path: PathBuf,
    _dir: Option<std::fs::File>,
}

/// Paths inside one job's state directory.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(state_dir: &Path, id: &str) -> Self {
        Layout {
            dir: state_dir.join(id),
        }
    }
    /// The [`ContainerSpec`](crate::ContainerSpec) as JSON, written by the daemon.
    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }
    /// The control socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join(CONTROL_SOCKET)
    }
    /// A path to bind or connect the control socket with. A unix socket path holds at most
    /// 107 bytes, so a longer one (a long state dir, a 64-byte job id) goes through
    /// `/proc/self/fd/<fd>/control.sock` with the job's directory held open (`O_PATH`)
    /// for as long as the returned value lives.
    pub fn socket_addr(&self) -> std::io::Result<SocketAddr> {
        self.addr_of(CONTROL_SOCKET)
    }
    /// The socket a TTY job's terminal master comes over (libcontainer's console socket):
    /// the shim listens on it while the container is created.
    pub fn console(&self) -> PathBuf {
        self.dir.join(CONSOLE_SOCKET)
    }
    /// [`Layout::console`] usable with bind (see [`Layout::socket_addr`]).
    pub fn console_addr(&self) -> std::io::Result<SocketAddr> {
        self.addr_of(CONSOLE_SOCKET)
    }
    fn addr_of(&self, name: &str) -> std::io::Result<SocketAddr> {
        let path = self.dir.join(name);
        if path.as_os_str().len() <= MAX_SOCKET_PATH {
            return Ok(SocketAddr { path, _dir: None });
        }
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(&self.dir)?;
        let path = PathBuf::from(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()));
        Ok(SocketAddr {
            path,
            _dir: Some(dir),
        })
    }
    /// The job's stdin, a FIFO (jobs with [`ContainerSpec::stdin`](crate::ContainerSpec)
    /// or a terminal): the daemon opens it to write, the job reads it (a TTY job's shim reads
    /// it and writes what it reads to the terminal).
    pub fn stdin(&self) -> PathBuf {
        self.dir.join("stdin")
    }
    /// The shim's pid.
    pub fn shim_pid(&self) -> PathBuf {
        self.dir.join("shim.pid")
    }
    /// The shim's own stderr.
    pub fn log(&self) -> PathBuf {
        self.dir.join("shim.log")
    }
    /// The final event (`Exited` or `Failed`) as JSON, once there is one.
    pub fn status(&self) -> PathBuf {
        self.dir.join("status")
    }
    /// The overlay mount point (the container's root).
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
    /// The OCI bundle (`config.json`).
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle")
    }
    /// libcontainer's state root.
    pub fn runtime_root(&self) -> PathBuf {
        self.dir.join("runtime")
    }
}

/// The marker argument before `<state_dir> <id>` on the shim's command line.
pub const SHIM_ARG: &str = "--flynn-shim";

/// The marker argument before `<state_dir>` on a spare shim's command line: a shim started
/// ahead of any job, waiting for the daemon to name one ([`Shim::spawn_spare`]).
///
/// [`Shim::spawn_spare`]: crate::Shim::spawn_spare
pub const SPARE_ARG: &str = "--flynn-shim-spare";
