//! Named network namespaces without the `ip` command: `/run/netns/<name>` bind mounts, created the
//! way `ip netns add` does (a thread unshares its network namespace and bind-mounts it), so `ip
//! netns exec` and every other tool see them.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where named network namespaces live.
pub const NETNS_RUN_DIR: &str = "/run/netns";

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes `/run/netns` a shared mount point (as iproute2 does) so namespace mounts made later
/// propagate into mount namespaces created afterwards (containers' `/run/netns` stays live).
fn make_run_dir_shared(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let d = cstr(dir)?;
    let none = c"none";
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call; a null
    // data pointer is allowed.
    let shared = || unsafe {
        libc::mount(
            none.as_ptr(),
            d.as_ptr(),
            none.as_ptr(),
            libc::MS_SHARED | libc::MS_REC,
            std::ptr::null(),
        )
    };
    if shared() == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) {
        return Err(err);
    }
    // Not a mount point yet: bind it onto itself, then retry.
    // SAFETY: as above.
    check(unsafe {
        libc::mount(
            d.as_ptr(),
            d.as_ptr(),
            none.as_ptr(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    })?;
    check(shared())
}

/// Creates the named namespace at `path` (under a shared `/run/netns`-style directory). Fails with
/// `AlreadyExists` when the file is already there.
pub fn create(path: &Path) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new(NETNS_RUN_DIR));
    make_run_dir_shared(dir)?;
    OpenOptions::new().write(true).create_new(true).open(path)?;
    let target = path.to_path_buf();
    let made = std::thread::spawn(move || -> io::Result<()> {
        // SAFETY: unshare affects only this thread (which ends right after); CLONE_NEWNET is
        // allowed for one thread of a multi-threaded process.
        check(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
        let src = cstr(Path::new("/proc/thread-self/ns/net"))?;
        let dst = cstr(&target)?;
        // SAFETY: valid NUL-terminated strings, null fstype/data are allowed with MS_BIND.
        check(unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        })
    })
    .join()
    .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")));
    if let Err(e) = made {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(())
}

/// Unmounts and removes the namespace file at `path`; a missing one is fine. The namespace itself
/// goes away once no process and no interface keeps it alive.
pub fn remove(path: &Path) -> io::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let p = cstr(path)?;
    // SAFETY: valid NUL-terminated path.
    let rc = unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        // EINVAL: not a mount point (a leftover empty file).
        if !matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) {
            return Err(err);
        }
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Runs `f` on a new thread that has entered the network namespace at `path`. Sockets `f` opens
/// (netlink included) belong to that namespace and stay there after the thread ends.
pub fn run_in<R: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> R + Send + 'static,
) -> io::Result<R> {
    let path: PathBuf = path.to_path_buf();
    std::thread::spawn(move || -> io::Result<R> {
        let file = File::open(&path)?;
        // SAFETY: setns switches only this thread's network namespace; the fd is an open
        // namespace file for the duration of the call. The thread ends after `f`.
        check(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) })?;
        Ok(f())
    })
    .join()
    .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
}
