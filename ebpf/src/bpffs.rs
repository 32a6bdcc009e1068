//! Making sure the pin directory lives on a BPF filesystem.

use std::path::{Path, PathBuf};

use crate::EbpfError;

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where the BPF filesystem is conventionally mounted; mounted by [`prepare`] when missing.
const SYS_FS_BPF: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> Result<bool, EbpfError> {
    let c =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| EbpfError::Io {
            op: "pin path has a NUL byte:",
            path: path.into(),
            source: std::io::ErrorKind::InvalidInput.into(),
        })?;
    // SAFETY: `statfs` is plain data; an all-zero value is valid and is overwritten on success.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer for the call.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(EbpfError::Io {
            op: "statfs",
            path: path.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// The nearest existing ancestor of `path` (itself included).
fn existing_ancestor(path: &Path) -> PathBuf {
    let mut p = path;
    loop {
        if p.exists() {
            return p.to_path_buf();
        }
        match p.parent() {
            Some(parent) => p = parent,
            None => return PathBuf::from("/"),
        }
    }
}

fn mount_bpffs(at: &Path) -> Result<(), EbpfError> {
    let err = |source| EbpfError::Mount {
        path: at.into(),
        source,
    };
    let target = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())
        .map_err(|_| err(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: all arguments are valid NUL-terminated strings for the duration of the call; the
    // data argument is a string of mount options as `bpf` expects.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    tracing::info!(path = %at.display(), "mounted the BPF filesystem");
    Ok(())
}

/// Creates `pin_dir` on a BPF filesystem. When it would live under `/sys/fs/bpf` and nothing is
/// mounted there yet, mounts bpffs there first (as bpftool and other loaders do); anywhere else
/// the caller must have mounted one.
pub(crate) fn prepare(pin_dir: &Path) -> Result<(), EbpfError> {
    let base = existing_ancestor(pin_dir);
    if !is_bpffs(&base)? {
        let sys = Path::new(SYS_FS_BPF);
        if pin_dir.starts_with(sys) && sys.is_dir() && !is_bpffs(sys)? {
            mount_bpffs(sys)?;
        } else {
            return Err(EbpfError::NotBpffs {
                path: pin_dir.into(),
            });
        }
    }
    std::fs::create_dir_all(pin_dir).map_err(|source| EbpfError::Io {
        op: "create pin directory",
        path: pin_dir.into(),
        source,
    })?;
    if !is_bpffs(pin_dir)? {
        return Err(EbpfError::NotBpffs {
            path: pin_dir.into(),
        });
    }
    Ok(())
}
