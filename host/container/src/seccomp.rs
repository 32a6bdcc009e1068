//! The default seccomp profile of every job.
//!
//! An allow-by-default filter that fails the system calls Docker's default profile blocks for
//! unprivileged containers (kernel modules, kexec, mount and namespace changes, keyrings, BPF,
//! perf, clock setting, swap, reboot, cross-process memory access) with `EPERM`. It is a deny
//! list rather than Docker's long allow list: the capability set (no `CAP_SYS_ADMIN`) already
//! refuses most of these, the filter is the second wall.

use serde_json::{json, Value};

/// System calls the default profile refuses with `EPERM`.
pub const BLOCKED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "move_mount",
    "move_pages",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "syslog",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
];

/// The OCI `linux.seccomp` object.
pub fn default_profile() -> Value {
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{
            "names": BLOCKED_SYSCALLS,
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": libc::EPERM,
        }],
    })
}
