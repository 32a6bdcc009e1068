//! Creating and removing one job's container inside the shim: the private mount namespace and
//! overlay root, the OCI bundle, libcontainer's build and start, reaping, and teardown.

use std::ffi::CString;
use std::fs::{self, File};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::oci_spec::runtime::Spec;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};

use super::cgroups;
use super::holder::{Net, PidNs};
use super::layout::Layout;
use super::terminal::{own_terminal, set_window, Console};
use crate::spec::ContainerSpec;

pub(super) fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

pub(super) fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", errno()));
    }
    // SAFETY: pipe2 succeeded, both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A started container.
pub(super) struct Running {
    pub container: Container,
    /// The job's own pid namespace, held by a minimal init ([`PidNs`]).
    pub pid_ns: PidNs,
    pub pid: libc::pid_t,
    pub pidfd: OwnedFd,
    pub io: JobIo,
    /// The shim's write end of the job's stdin FIFO (jobs with stdin, TTY jobs): held so the
    /// job (or the shim, for a terminal) does not read end-of-file before the daemon closes
    /// stdin.
    pub stdin_hold: Option<OwnedFd>,
}

/// How the shim talks to a started job (its ends non-blocking).
pub(super) enum JobIo {
    /// Read ends of the job's stdout and stderr pipes.
    Pipes { stdout: OwnedFd, stderr: OwnedFd },
    /// A TTY job: the master side of its terminal (output is read from it, input written to
    /// it) and the read end of its stdin FIFO, which the shim copies to the master.
    Terminal { master: OwnedFd, input: OwnedFd },
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let cs = c.to_string();
        if !s.contains(&cs) {
            s.push_str(": ");
            s.push_str(&cs);
        }
        cur = c.source();
    }
    s
}

/// libcontainer's default executor (`execvp` of the job's args), after giving the job the
/// signal state a freshly started program expects: no signal ignored, none blocked
/// ([`crate::signals`]). The container's init is cloned from the shim, whose ignored signals
/// (`SIGPIPE` above all) would otherwise survive the exec; the shim itself keeps them.
#[derive(Clone)]
struct JobExecutor;

impl Executor for JobExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        crate::signals::reset_to_default();
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

fn c_path(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).expect("paths have no NUL")
}

/// Gives the shim a private mount namespace whose mounts do not propagate back to the host
/// (they go away with the shim). Job-independent: a spare shim does it before it has a job.
pub(super) fn private_mount_ns() -> Result<(), String> {
    // SAFETY: unshare takes no pointers.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(format!("unshare(CLONE_NEWNS): {}", errno()));
    }
    let root = CString::new("/").unwrap();
    // SAFETY: valid NUL-terminated strings / null pointers as mount(2) allows.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!("making / a slave mount: {}", errno()));
    }
    Ok(())
}

fn mount_overlay(spec: &ContainerSpec, layout: &Layout, ns_ready: bool) -> Result<(), String> {
    if !ns_ready {
        private_mount_ns()?;
    }
    for layer in &spec.layers {
        if !layer.is_dir() {
            return Err(format!("image layer {} does not exist", layer.display()));
        }
    }
    for d in [layout.rootfs(), layout.upper(), layout.work()] {
        fs::create_dir_all(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    let lower: Vec<String> = spec
        .layers
        .iter()
        .rev()
        .map(|l| l.to_string_lossy().into_owned())
        .collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        layout.upper().display(),
        layout.work().display()
    );
    let (src, fstype) = (
        CString::new("overlay").unwrap(),
        CString::new("overlay").unwrap(),
    );
    let target = c_path(&layout.rootfs());
    let data = CString::new(opts).map_err(|e| e.to_string())?;
    // SAFETY: all pointers are valid NUL-terminated strings living across the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(format!("mounting the overlay root: {}", errno()));
    }
    Ok(())
}

/// `ns_ready`: [`private_mount_ns`] was already done (a spare shim).
pub(super) fn create(
    spec: &ContainerSpec,
    layout: &Layout,
    ns_ready: bool,
) -> Result<Running, String> {
    let t0 = std::time::Instant::now();
    mount_overlay(spec, layout, ns_ready)?;
    let t_mount = t0.elapsed();
    let bundle = layout.bundle();
    fs::create_dir_all(&bundle).map_err(|e| format!("creating {}: {e}", bundle.display()))?;
    // The holder's empty root is mounted over the bundle dir in its own namespace only. It
    // is in the job's network namespace: the one the job joins, or a new one the job joins.
    let net = match &spec.netns {
        Some(path) => Net::Join(path),
        None if spec.host_network => Net::Host,
        None => Net::New,
    };
    let mut pid_ns = PidNs::new(&bundle, net)?;
    match start(spec, layout, &pid_ns.joined(), t0, t_mount) {
        Ok(s) => Ok(Running {
            container: s.container,
            pid_ns,
            pid: s.pid,
            pidfd: s.pidfd,
            io: s.io,
            stdin_hold: s.stdin_hold,
        }),
        Err(e) => {
            pid_ns.end();
            Err(e)
        }
    }
}

/// What [`start`] hands back to [`create`].
struct Started {
    container: Container,
    pid: libc::pid_t,
    pidfd: OwnedFd,
    io: JobIo,
    stdin_hold: Option<OwnedFd>,
}

/// The job's stdin FIFO at `path`, made anew: its read end (blocking for the job, or
/// non-blocking for the shim with `nonblocking`) and a write end for the shim to hold.
fn stdin_fifo(path: &Path, nonblocking: bool) -> Result<(OwnedFd, OwnedFd), String> {
    use std::os::unix::ffi::OsStrExt;
    let _ = fs::remove_file(path);
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{} has a NUL", path.display()))?;
    let open = |flags: libc::c_int| -> Result<OwnedFd, String> {
        // SAFETY: `c` is a valid NUL-terminated path.
        let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(format!("opening {}: {}", path.display(), errno()));
        }
        // SAFETY: open returned a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(format!("mkfifo {}: {}", path.display(), errno()));
    }
    // Non-blocking so the open does not wait for a writer; the job gets it blocking.
    let read = open(libc::O_RDONLY | libc::O_NONBLOCK)?;
    let hold = open(libc::O_WRONLY)?;
    if !nonblocking {
        // SAFETY: fcntl on an fd we own.
        unsafe {
            let fl = libc::fcntl(read.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(read.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
    Ok((read, hold))
}

/// The job's output as [`start`] sets it up: pipes, or a terminal still to come.
enum Plan {
    Pipes(OwnedFd, OwnedFd),
    Terminal(Console, OwnedFd),
}

/// Builds and starts the container, joining the namespaces in `joined` (`(OCI type, path)`:
/// the holder's).
fn start(
    spec: &ContainerSpec,
    layout: &Layout,
    joined: &[(&str, String)],
    t0: std::time::Instant,
    t_mount: std::time::Duration,
) -> Result<Started, String> {
    let bundle = layout.bundle();
    let mut config = spec.oci_config(&layout.rootfs());
    if let Some(nss) = config["linux"]["namespaces"].as_array_mut() {
        for ns in nss.iter_mut() {
            // A namespace the config gives a path (a pre-created network namespace) stays.
            let path = joined
                .iter()
                .find(|(t, _)| ns["type"] == *t && ns.get("path").is_none());
            if let Some((_, path)) = path {
                ns["path"] = path.as_str().into();
            }
        }
    }
    if let Some(limit) = spec.resources.memory_bytes {
        if swap_limit_settable() {
            // Memory + swap = the limit: a job at its limit is OOM-killed instead of swapping.
            config["linux"]["resources"]["memory"]["swap"] = limit.into();
        }
    }
    let config = serde_json::to_vec_pretty(&config).unwrap();
    fs::write(bundle.join("config.json"), config).map_err(|e| format!("writing config: {e}"))?;

    // A TTY job: its terminal comes over the console socket, its input through the FIFO
    // (read by the shim). Otherwise pipes, and the FIFO (or /dev/null) as the job's stdin.
    let mut builder = ContainerBuilder::new(spec.id.clone(), SyscallType::default())
        .with_executor(JobExecutor)
        .with_root_path(layout.runtime_root())
        .map_err(|e| error_chain(&e))?;
    let (plan, stdin_hold) = if spec.tty {
        let console = Console::bind(layout)?;
        builder = builder.with_console_socket(Some(&console.path));
        let (input, hold) = stdin_fifo(&layout.stdin(), true)?;
        (Plan::Terminal(console, input), Some(hold))
    } else {
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let (stdin, stdin_hold): (OwnedFd, _) = if spec.stdin {
            let (read, hold) = stdin_fifo(&layout.stdin(), false)?;
            (read, Some(hold))
        } else {
            let devnull = File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
            (devnull.into(), None)
        };
        builder = builder
            .with_stdin(stdin)
            .with_stdout(out_w)
            .with_stderr(err_w);
        (Plan::Pipes(out_r, err_r), stdin_hold)
    };
    let mut container = builder
        .validate_id()
        .map_err(|e| error_chain(&e))?
        .as_init(&bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(|e| error_chain(&e))?;
    let t_build = t0.elapsed();
    let pid = match container.pid() {
        Some(p) => p.as_raw(),
        None => {
            let _ = container.delete(true);
            return Err("container has no init pid".into());
        }
    };
    // SAFETY: pidfd_open takes a pid and flags; the pid is our unreaped child.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    if pidfd < 0 {
        let e = errno();
        let _ = container.delete(true);
        reap(pid);
        return Err(format!("pidfd_open: {e}"));
    }
    // SAFETY: pidfd_open returned a new fd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let io = match plan {
        Plan::Terminal(console, input) => {
            let master = console.master().and_then(|m| {
                // The job's user owns its terminal (libcontainer opened it as root).
                own_terminal(m.as_raw_fd(), spec.uid)
                    .map_err(|e| format!("giving the terminal to uid {}: {e}", spec.uid))?;
                // The first size, before the job runs (so it never sees 0x0).
                if let Some((rows, cols)) = spec.tty_size {
                    set_window(m.as_raw_fd(), rows, cols)
                        .map_err(|e| format!("setting the terminal size: {e}"))?;
                }
                Ok(m)
            });
            match master {
                Ok(master) => JobIo::Terminal { master, input },
                Err(reason) => {
                    let _ = container.delete(true);
                    reap(pid);
                    return Err(reason);
                }
            }
        }
        Plan::Pipes(stdout, stderr) => JobIo::Pipes { stdout, stderr },
    };
    if let Err(e) = container.start() {
        let reason = error_chain(&e);
        let _ = container.delete(true);
        reap(pid);
        return Err(reason);
    }
    match &io {
        JobIo::Pipes { stdout, stderr } => {
            set_nonblocking(stdout.as_raw_fd());
            set_nonblocking(stderr.as_raw_fd());
        }
        JobIo::Terminal { master, .. } => set_nonblocking(master.as_raw_fd()),
    }
    tracing::debug!(job = %spec.id, mount = ?t_mount, build = ?(t_build - t_mount), start = ?(t0.elapsed() - t_build), "container created");
    Ok(Started {
        container,
        pid,
        pidfd,
        io,
        stdin_hold,
    })
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

/// Waits for `pid` (the init: cloned with no exit signal, hence `__WALL`). Returns the raw status.
pub(super) fn reap(pid: libc::pid_t) -> Option<i32> {
    let mut status = 0;
    for _ in 0..3 {
        // SAFETY: `status` is a valid int pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if rc == pid {
            return Some(status);
        }
        if rc < 0 && errno().raw_os_error() != Some(libc::EINTR) {
            return None;
        }
    }
    None
}

/// Removes what a job's container left: the container, its cgroups, the overlay mount and the
/// per-job writable dirs. The spec, status and log files stay until [`Shim::cleanup`].
///
/// [`Shim::cleanup`]: crate::Shim::cleanup
pub(super) fn teardown(spec: &ContainerSpec, layout: &Layout, container: Option<&mut Container>) {
    if let Some(c) = container {
        if let Err(e) = c.delete(true) {
            eprintln!("deleting container {}: {}", spec.id, error_chain(&e));
        }
    }
    cgroups::remove(spec, true);
    let target = c_path(&layout.rootfs());
    // SAFETY: valid NUL-terminated path.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    for d in [
        layout.bundle(),
        layout.runtime_root(),
        layout.upper(),
        layout.work(),
        layout.rootfs(),
    ] {
        let _ = fs::remove_dir_all(d);
    }
}

/// Can the job's swap be limited? cgroup v1 with swap accounting (`memory.memsw.*`), or cgroup
/// v2 on a host that has swap at all (`memory.swap.max` is then there; without swap there is
/// nothing to limit).
fn swap_limit_settable() -> bool {
    if Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists() {
        return true;
    }
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let has_swap = fs::read_to_string("/proc/swaps").is_ok_and(|s| s.lines().count() > 1);
    v2 && has_swap
}
