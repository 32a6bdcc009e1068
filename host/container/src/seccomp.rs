//! The default seccomp profile of every job.
//!
//! An allow-by-default filter that fails the system calls Docker's default profile blocks for
//! unprivileged containers (kernel modules, kexec, mount and namespace changes, keyrings, BPF,
//! perf, clock setting, swap, reboot, cross-process memory access) with `EPERM`. It is a deny
//! list rather than Docker's long allow list: the capability set (no `CAP_SYS_ADMIN`) already
//! refuses most of these, the filter is the second wall.
//!
//! Namespaces can also be made by `clone` itself, and a new user namespace brings every
//! capability inside it (a network namespace with `CAP_NET_ADMIN`, for one). As in Docker's
//! profile, `clone` with any of [`CLONE_NAMESPACE_FLAGS`] fails with `EPERM` (plain fork and
//! threads still work), and `clone3`, whose flags sit in a struct a filter cannot read, fails with
//! `ENOSYS` so libc falls back to `clone`.

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

/// `clone` flags that make a new namespace; `clone` with any of them is refused.
pub const CLONE_NAMESPACE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWUTS,
];

/// The OCI `linux.seccomp` object.
pub fn default_profile() -> Value {
    let mut syscalls = vec![
        json!({
            "names": BLOCKED_SYSCALLS,
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": libc::EPERM,
        }),
        json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS}),
    ];
    // One rule per flag, as rules for one system call are alternatives (a rule's conditions all
    // have to hold). The flags are the first argument on x86_64 and arm64 (not on s390x). Mask
    // and value are equal: runc reads `value` as the mask, libcontainer `valueTwo`.
    for &flag in CLONE_NAMESPACE_FLAGS {
        syscalls.push(json!({
            "names": ["clone"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": libc::EPERM,
            "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
        }));
    }
    json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": syscalls})
}
