//! A job's signal state at its start: every signal at its default action, none blocked.
//!
//! What a program inherits across `execve` is its parent's ignored signals and signal mask
//! (handlers are reset). Every Rust program ignores `SIGPIPE` from before `main` (the shim and
//! flynn-host among them), and glibc's `posix_spawn`, which std uses where it can, hands its
//! child the two real-time signals glibc keeps for itself (32 and 33) ignored. Left so, a job
//! writing into a closed pipe got `EPIPE` instead of dying (`yes | head -1` printed "Broken
//! pipe" errors; a shell loop echoing into one never ended). Both runtimes reset the state in
//! the job's process right before the exec: the container runtime in its libcontainer
//! executor, the process runtime through [`default_on_exec`].

/// Every signal but `SIGKILL` and `SIGSTOP` to its default action and an empty signal mask.
/// Raw system calls only (async-signal-safe, no allocation), and not glibc's `sigaction`,
/// which refuses signals 32 and 33. Meant for a process about to exec: handlers it installed
/// are gone.
pub(crate) fn reset_to_default() {
    // The kernel's `struct sigaction` all zero, on every architecture: handler SIG_DFL, no
    // flags, an empty mask. (Larger than any architecture's.)
    let dfl = [0u64; 8];
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction reads the kernel's sigaction from `dfl` (valid, zeroed, large
        // enough) and writes no old action (null).
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                dfl.as_ptr(),
                std::ptr::null_mut::<u64>(),
                std::mem::size_of::<u64>(),
            )
        };
    }
    let none = [0u64; 1];
    // SAFETY: rt_sigprocmask reads an empty kernel signal set from `none` (valid for its
    // size) and writes no old set (null).
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            none.as_ptr(),
            std::ptr::null_mut::<u64>(),
            std::mem::size_of::<u64>(),
        )
    };
}

/// Makes `cmd`'s child start with every signal at its default action and none blocked
/// ([`reset_to_default`] between its fork and its exec). For jobs flynn-host runs as plain
/// processes.
pub fn default_on_exec(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the forked child before the exec and makes only raw system
    // calls on its own stack memory: nothing that could deadlock or allocate after a fork.
    unsafe {
        cmd.pre_exec(|| {
            reset_to_default();
            Ok(())
        })
    };
}
