//! The kernel the container runtime needs: Linux 5.12 or later. libcontainer 0.7 mounts every
//! mount of a container through `open_tree` (5.2) and `mount_setattr` (5.12), with no fallback
//! for `ENOSYS`, so on an older kernel (Ubuntu 20.04's 5.4) every job fails to start. The
//! process runtime needs none of that.

/// The oldest kernel the container runtime runs on, `(major, minor)`.
pub const MIN_KERNEL: (u32, u32) = (5, 12);

/// The `(major, minor)` of a kernel release string (`uname -r`, e.g. `5.4.0-42-generic`).
fn version(release: &str) -> Option<(u32, u32)> {
    // Leading digits of each part: `5.15rc1` is 5.15.
    fn number(part: &str) -> Option<u32> {
        let end = part
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(part.len());
        part[..end].parse().ok()
    }
    let mut parts = release.trim().split(['.', '-', '+']);
    let major = number(parts.next()?)?;
    let minor = number(parts.next()?)?;
    Some((major, minor))
}

/// Whether a kernel of this release runs containers; `None` when the release does not read
/// as `<major>.<minor>...`.
pub fn kernel_supported(release: &str) -> Option<bool> {
    version(release).map(|v| v >= MIN_KERNEL)
}

/// Refuses a running kernel older than [`MIN_KERNEL`], naming it and the alternative (a
/// release that does not parse is let through: the container start then says what fails).
pub fn check_kernel() -> Result<(), String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    match kernel_supported(&release) {
        Some(false) => Err(format!(
            "the container runtime needs Linux {}.{} or later (libcontainer mounts through \
             open_tree and mount_setattr); this kernel is {}: upgrade it, or run jobs as plain \
             processes (--runtime process)",
            MIN_KERNEL.0,
            MIN_KERNEL.1,
            release.trim()
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_older_than_5_12_are_refused() {
        assert_eq!(kernel_supported("5.4.0-42-generic"), Some(false));
        assert_eq!(kernel_supported("5.11.22"), Some(false));
        assert_eq!(kernel_supported("4.19.0-27-amd64\n"), Some(false));
        assert_eq!(kernel_supported("5.12.0"), Some(true));
        assert_eq!(kernel_supported("5.15.0-105-generic"), Some(true));
        assert_eq!(kernel_supported("6.1.0-18-amd64"), Some(true));
        assert_eq!(kernel_supported("6.18.44-fc-v595"), Some(true));
        assert_eq!(kernel_supported("6.9+"), Some(true));
        assert_eq!(kernel_supported("5.15rc1"), Some(true));
        assert_eq!(kernel_supported("5.10a"), Some(false));
        assert_eq!(kernel_supported("linux"), None);
        assert_eq!(kernel_supported(""), None);
        // The running kernel is judged by the same rule (whatever machine runs this).
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert_eq!(
            check_kernel().is_ok(),
            kernel_supported(&release) != Some(false)
        );
    }
}
