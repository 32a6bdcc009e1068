//! The pid namespace holder, `flynn-init`: pid 1 of a job's pid namespace, forked from the
//! shim before the container exists. It only reaps orphans and keeps the namespace alive.
//!
//! Being the namespace's pid 1, it is what the job sees as `/proc/1`: its root, working
//! directory, mount table, command line, environment, descriptors, capabilities and network
//! (`/proc/1/net`). Forked from the shim, all of those were the host's (the host's `/` as
//! `/proc/1/root`, writable by a root job granted `CAP_SYS_PTRACE`; the host's mount table in
//! `/proc/1/mountinfo` and its sockets, routes and neighbours in `/proc/1/net`, which any job
//! reads). So before it reports ready the holder gives every one of them up: the job's network
//! namespace (joined, or a new one the job then joins), UTS and IPC namespaces of its own (the
//! job joins the IPC one), a mount namespace of its own whose only mount is an empty
//! read-only tmpfs it pivots into (the old root detached), its argv and environment strings
//! blanked, every descriptor closed, every capability dropped (bounding, ambient, effective,
//! permitted, inheritable), no new privileges, not dumpable, and a seccomp filter that allows
//! only its wait loop's system calls: a job granted `CAP_SYS_PTRACE` may write its memory
//! (`/proc/1/mem`), and code put there could do nothing but wait and exit.
//!
//! Its namespaces reach the shim as descriptors the holder opened itself (`/proc/self/ns/*`,
//! sent over the report socket before it goes non-dumpable): opening `/proc/<holder>/ns/pid`
//! from the shim afterwards needed `CAP_SYS_PTRACE`, which a host's bounding set may lack.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use super::container::errno;

/// A pid namespace whose pid 1 is a minimal init forked from the shim: it reaps orphans and
/// does nothing else. The job joins the namespace as pid 2, so it is not the namespace's init:
/// a signal from the host (`SIGTERM` on stop) is delivered by its default action as to any
/// process, where an init gets only the signals it installed handlers for (pid_namespaces(7);
/// Flynn's containerinit forwarded them for the same reason). Killing the holder kills every
/// process left in the namespace, as the exit of a job that was pid 1 did; so does the death
/// of the shim (the holder's parent-death signal).
pub(super) struct PidNs {
    pid: libc::pid_t,
    /// The holder's namespaces, opened by the holder and sent to the shim: its pid and IPC
    /// namespaces, and its network namespace when the job gets a new one ([`Net::New`]).
    pid_ns: Option<OwnedFd>,
    ipc_ns: Option<OwnedFd>,
    net_ns: Option<OwnedFd>,
}

/// The network namespace the holder is to be in: the job's.
pub(super) enum Net<'a> {
    /// The host's (a `host_network` job): the holder stays there.
    Host,
    /// The job joins this pre-created namespace: so does the holder.
    Join(&'a Path),
    /// The job gets a new namespace: the holder makes it and the job joins it.
    New,
}

/// What the holder does before it reports ready, in order (a failure names its step).
const STEPS: [&str; 18] = [
    "joining the job's network namespace",
    "unshare",
    "opening its namespaces",
    "handing over its namespaces",
    "making its mounts private",
    "mounting its empty root",
    "entering its empty root",
    "pivot_root",
    "detaching the old root",
    "chdir /",
    "dropping the bounding set",
    "clearing the ambient set",
    "dropping its capabilities",
    "setting no_new_privs",
    "making itself non-dumpable",
    "closing its descriptors",
    "blocking signals",
    "installing its seccomp filter",
];
/// The message of a holder that is ready.
const READY: u8 = 0xff;
/// The message carrying the holder's namespace descriptors (`SCM_RIGHTS`).
const NAMESPACES: u8 = 0xfe;
/// The longest message.
const MSG: usize = 5;

/// What the holder needs, prepared by the shim before the fork (the child allocates nothing).
struct Prep {
    /// An existing directory the holder mounts its empty root on (in its own namespace).
    jail: std::ffi::CString,
    /// The shim's argv and environment strings, `[start, end)` each, in the holder's copy of
    /// the shim's memory (`/proc/<pid>/cmdline` and `environ` read them).
    strings: Option<[(usize, usize); 2]>,
    /// The kernel's highest capability number (`/proc/sys/kernel/cap_last_cap`).
    last_cap: libc::c_ulong,
    /// The job's network namespace to join (open), or whether to make a new one.
    join_net: Option<RawFd>,
    new_net: bool,
    /// The holder's seccomp filter (see [`filter`]), empty where it has none.
    filter: Vec<libc::sock_filter>,
}

/// Where the kernel has this process's argv and environment strings (`/proc/self/stat`
/// fields 48-51).
fn own_strings() -> Option<[(usize, usize); 2]> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    // `fields[0]` is field 3 (the state).
    let n = |field: usize| fields.get(field - 3)?.parse::<usize>().ok();
    let (args, env) = ((n(48)?, n(49)?), (n(50)?, n(51)?));
    let sane = |(s, e): (usize, usize)| s != 0 && s <= e && e - s < 1 << 24;
    (sane(args) && sane(env)).then_some([args, env])
}

/// The kernel's highest capability number; 63 (the most the interface has) when unknown:
/// the drop loop then stops at the first `EINVAL`.
fn last_cap() -> libc::c_ulong {
    fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&n| n < 64)
        .unwrap_or(63)
}

/// The `AUDIT_ARCH_*` value of this build's architecture, for architectures the holder has a
/// seccomp filter on (others get none: its numbers would be wrong there).
const AUDIT_ARCH: Option<u32> = if cfg!(target_arch = "x86_64") {
    Some(0xc000_003e) // AUDIT_ARCH_X86_64
} else if cfg!(target_arch = "aarch64") {
    Some(0xc000_00b7) // AUDIT_ARCH_AARCH64
} else {
    None
};

/// The system calls the holder makes once its filter is installed: its wait loop (`waitpid`
/// is `wait4`, `sigwaitinfo` is `rt_sigtimedwait`), the kernel's restart of an interrupted
/// one, and its exit. `write` and `close` are allowed on its report socket only (`report`),
/// for the one "ready" message and closing it.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const ALLOWED: [libc::c_long; 5] = [
    libc::SYS_wait4,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The holder's seccomp filter, a classic BPF program: another architecture's calling
/// convention (i386 through `int 0x80` on x86_64) kills it; the calls in [`ALLOWED`], and
/// `write`/`close` of descriptor `report`, are allowed; everything else fails with `EPERM`
/// (x32 calls too: their numbers carry a high bit no allowed number has).
fn filter(report: RawFd) -> Vec<libc::sock_filter> {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        use libc::{BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W};
        let Some(arch) = AUDIT_ARCH else {
            return Vec::new();
        };
        let stmt = |code: u32, k: u32| libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        };
        let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
            code: (BPF_JMP | BPF_JEQ | BPF_K) as u16,
            jt,
            jf,
            k,
        };
        // struct seccomp_data: nr (0), arch (4), instruction_pointer (8), args (16); the low
        // half of args[0] at 16 on these little-endian architectures (`write` and `close`
        // take an unsigned int).
        let (nr, arch_at, arg0) = (0, 4, 16);
        let deny = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        let n = ALLOWED.len();
        let mut p = vec![
            stmt(BPF_LD | BPF_W | BPF_ABS, arch_at),
            jeq(arch, 1, 0),
            stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_KILL_PROCESS),
            stmt(BPF_LD | BPF_W | BPF_ABS, nr),
        ];
        // From the i-th comparison (at 4 + i), `allow` (at 4 + n + 6) is n + 5 - i ahead; from
        // the `write` and `close` ones the descriptor check is 2 and 1 ahead.
        for (i, call) in ALLOWED.iter().enumerate() {
            p.push(jeq(*call as u32, (n + 5 - i) as u8, 0));
        }
        p.push(jeq(libc::SYS_write as u32, 2, 0));
        p.push(jeq(libc::SYS_close as u32, 1, 0));
        p.push(stmt(BPF_RET | BPF_K, deny));
        // The descriptor check.
        p.push(stmt(BPF_LD | BPF_W | BPF_ABS, arg0));
        p.push(jeq(report as u32, 1, 0));
        p.push(stmt(BPF_RET | BPF_K, deny));
        // allow:
        p.push(stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_ALLOW));
        debug_assert_eq!(p.len(), n + 11);
        p
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = (report, AUDIT_ARCH);
        Vec::new()
    }
}

/// Installs `filter` on the calling thread (`seccomp(2)`; no_new_privs must be set or the
/// caller hold `CAP_SYS_ADMIN`). Nothing to do for an empty one.
///
/// # Safety
/// Async-signal-safe: a single system call on a pointer to `filter`, which it does not keep.
unsafe fn install(filter: &[libc::sock_filter]) -> bool {
    if filter.is_empty() {
        return true;
    }
    let prog = libc::sock_fprog {
        len: filter.len() as libc::c_ushort,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points to `filter`, valid for its length during the call (the kernel
    // copies it).
    unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0 as libc::c_uint,
            &prog as *const libc::sock_fprog,
        ) == 0
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;
/// prctl(2) reads its arguments as `unsigned long`: passed as such through the varargs.
const ZERO: libc::c_ulong = 0;

/// Sends `msg` with descriptors `fds` (`SCM_RIGHTS`) on `sock`. No allocation: the control
/// buffer is on the stack, room for up to four descriptors.
///
/// # Safety
/// Async-signal-safe: only `sendmsg`, on buffers that live across the call.
unsafe fn send_fds(sock: RawFd, msg: &[u8], fds: &[RawFd]) -> bool {
    // Eight-byte aligned and large enough for CMSG_SPACE(4 * sizeof(int)).
    let mut buf = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr().cast_mut().cast(),
        iov_len: msg.len(),
    };
    // SAFETY: (the whole block) every pointer is to a live local; the CMSG macros stay within
    // `buf`, whose size bounds `msg_controllen` (CMSG_SPACE of at most four ints: 32 bytes).
    unsafe {
        let fds = &fds[..fds.len().min(4)];
        let data_len = std::mem::size_of_val(fds) as libc::c_uint;
        let mut mh: libc::msghdr = std::mem::zeroed();
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = buf.as_mut_ptr().cast();
        mh.msg_controllen = libc::CMSG_SPACE(data_len) as _;
        let c = libc::CMSG_FIRSTHDR(&mh);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(data_len) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), fds.len());
        libc::sendmsg(sock, &mh, libc::MSG_NOSIGNAL) == msg.len() as isize
    }
}

/// The holder's set-up (see the module doc), ending with its seccomp filter installed: after
/// it only the report's `write`, its `close` and the wait loop. Returns the failed step and
/// its errno.
///
/// # Safety
/// Only in the freshly forked holder: it changes the whole process (namespaces, root,
/// capabilities, descriptors) and overwrites the argv and environment strings, which nothing
/// in it reads afterwards. Async-signal-safe calls only.
unsafe fn confine(p: &Prep, report: RawFd) -> Result<(), (u8, i32)> {
    let check = |step: u8, ok: bool| {
        if ok {
            Ok(())
        } else {
            Err((step, errno().raw_os_error().unwrap_or(0)))
        }
    };
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: (the whole block) valid NUL-terminated strings, null pointers where the calls
    // allow them, pointers to live locals; the strings' memory is this process's own copy;
    // descriptors this process owns.
    unsafe {
        if let Some(net) = p.join_net {
            check(0, libc::setns(net, libc::CLONE_NEWNET) == 0)?;
        }
        let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
        if p.new_net {
            flags |= libc::CLONE_NEWNET;
        }
        check(1, libc::unshare(flags) == 0)?;
        // Opened here, by the holder itself, while the host's /proc is still its: the shim
        // would need CAP_SYS_PTRACE to open them once the holder is not dumpable.
        let open =
            |path: &std::ffi::CStr| libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        let mut fds = [-1; 3];
        fds[0] = open(c"/proc/self/ns/pid");
        fds[1] = open(c"/proc/self/ns/ipc");
        let n = if p.new_net {
            fds[2] = open(c"/proc/self/ns/net");
            3
        } else {
            2
        };
        check(2, fds[..n].iter().all(|&fd| fd >= 0))?;
        check(3, send_fds(report, &[NAMESPACES, 0, 0, 0, 0], &fds[..n]))?;
        check(
            4,
            libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0,
        )?;
        let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        check(
            5,
            libc::mount(
                c"flynn-init".as_ptr(),
                p.jail.as_ptr(),
                c"tmpfs".as_ptr(),
                flags,
                c"size=4k,nr_inodes=8,mode=0555".as_ptr().cast(),
            ) == 0,
        )?;
        check(6, libc::chdir(p.jail.as_ptr()) == 0)?;
        // The old root ends up on top of the new one, and is detached there (pivot_root(2)).
        check(
            7,
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0,
        )?;
        check(8, libc::umount2(c".".as_ptr(), libc::MNT_DETACH) == 0)?;
        check(9, libc::chdir(c"/".as_ptr()) == 0)?;
        // The shim's command line (its state dir, the job id) and environment: blanked, the
        // name left in front of the command line.
        if let Some([(args, args_end), (env, env_end)]) = p.strings {
            std::ptr::write_bytes(args as *mut u8, 0, args_end - args);
            let name = b"flynn-init";
            if args_end - args > name.len() {
                std::ptr::copy_nonoverlapping(name.as_ptr(), args as *mut u8, name.len());
            }
            std::ptr::write_bytes(env as *mut u8, 0, env_end - env);
        }
        // Up to the kernel's last capability, not all 64 the interface has room for.
        for cap in 0..=p.last_cap {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, ZERO) != 0 {
                // EINVAL: past the kernel's last capability (`cap_last_cap` could not be
                // read): the rest are past it too.
                if errno().raw_os_error() == Some(libc::EINVAL) && cap > 0 {
                    break;
                }
                check(10, false)?;
            }
        }
        check(
            11,
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                ZERO,
                ZERO,
                ZERO,
            ) == 0,
        )?;
        let mut header = CapHeader {
            version: CAP_VERSION_3,
            pid: 0,
        };
        let data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        check(
            12,
            libc::syscall(
                libc::SYS_capset,
                &mut header as *mut CapHeader,
                data.as_ptr(),
            ) == 0,
        )?;
        check(
            13,
            libc::prctl(
                libc::PR_SET_NO_NEW_PRIVS,
                1 as libc::c_ulong,
                ZERO,
                ZERO,
                ZERO,
            ) == 0,
        )?;
        check(
            14,
            libc::prctl(libc::PR_SET_DUMPABLE, ZERO, ZERO, ZERO, ZERO) == 0,
        )?;
        // Nothing of the shim's stays open here but the report socket (closed after the
        // report): its control socket above all (with the shim gone, connecting must fail),
        // its stdio (the job's shim.log), the namespaces just sent, the shim's pidfd.
        let below =
            report > 0 && libc::syscall(libc::SYS_close_range, 0u32, report as u32 - 1, 0u32) != 0;
        let above = libc::syscall(libc::SYS_close_range, report as u32 + 1, u32::MAX, 0u32) != 0;
        check(15, !below && !above)?;
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        check(
            16,
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) == 0,
        )?;
        check(17, install(&p.filter))?;
    }
    Ok(())
}

/// The holder's life after the fork: set-up, the report to the shim on `report`, then reaping.
///
/// # Safety
/// Only in the freshly forked holder (see [`confine`]).
unsafe fn holder(p: &Prep, report: RawFd, shim: RawFd) -> ! {
    // SAFETY: (the whole block) async-signal-safe calls on valid pointers and descriptors this
    // process owns; `confine` runs in the holder, as it requires.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"flynn-init".as_ptr());
        // Without its shim the job has no status and is cleaned up: a killed shim takes the
        // namespace, and the job, with it instead of leaking the holder.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        // A shim that died before the line above sent no signal: its pidfd says so. (Not
        // getppid(): pid 1 of a new namespace sees 0 as its parent, alive or not.)
        let mut pfd = libc::pollfd {
            fd: shim,
            events: libc::POLLIN,
            revents: 0,
        };
        if libc::poll(&mut pfd, 1, 0) != 0 {
            libc::_exit(0);
        }
        let msg = match confine(p, report) {
            Ok(()) => [READY, 0, 0, 0, 0],
            Err((step, e)) => {
                let e = e.to_le_bytes();
                [step, e[0], e[1], e[2], e[3]]
            }
        };
        libc::write(report, msg.as_ptr().cast(), msg.len());
        if msg[0] != READY {
            libc::_exit(1);
        }
        libc::close(report);
        // Under the seccomp filter from here: wait4, rt_sigtimedwait (every signal blocked),
        // exit.
        let mut chld: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut chld);
        libc::sigaddset(&mut chld, libc::SIGCHLD);
        loop {
            while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG | libc::__WALL) > 0 {}
            libc::sigwaitinfo(&chld, std::ptr::null_mut());
        }
    }
}

/// A unix socket pair for the holder's report (`SOCK_SEQPACKET`: one message a read).
fn socket_pair() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for socketpair to fill.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(format!("socketpair: {}", errno()));
    }
    // SAFETY: socketpair succeeded, both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// One message from the holder: its bytes (0 at end-of-file) and the descriptors it carried.
fn receive(sock: RawFd) -> Result<(usize, [u8; MSG], Vec<OwnedFd>), std::io::Error> {
    let mut msg = [0u8; MSG];
    let mut buf = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: msg.as_mut_ptr().cast(),
        iov_len: MSG,
    };
    // SAFETY: a zeroed msghdr is a valid empty one.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = buf.as_mut_ptr().cast();
    mh.msg_controllen = std::mem::size_of_val(&buf) as _;
    let n = loop {
        // SAFETY: `mh` points to live buffers of the sizes it gives.
        let n = unsafe { libc::recvmsg(sock, &mut mh, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 || errno().raw_os_error() != Some(libc::EINTR) {
            break n;
        }
    };
    if n < 0 {
        return Err(errno());
    }
    let mut fds = Vec::new();
    // SAFETY: the CMSG macros walk the control data recvmsg wrote within `buf`; every
    // SCM_RIGHTS descriptor received is new and owned by nobody else.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    Ok((n as usize, msg, fds))
}

impl PidNs {
    /// Forks the holder into a new pid namespace and waits until it has confined itself
    /// (see the module doc), its empty root mounted on `jail` (an existing directory; the
    /// mount is in the holder's own namespace only), in the network namespace `net`. The
    /// shim is single-threaded, and the child makes only async-signal-safe calls.
    pub(super) fn new(jail: &Path, net: Net<'_>) -> Result<PidNs, String> {
        let join =
            match net {
                Net::Join(path) => Some(fs::File::open(path).map(OwnedFd::from).map_err(|e| {
                    format!("opening the network namespace {}: {e}", path.display())
                })?),
                _ => None,
            };
        let (report_r, report_w) = socket_pair()?;
        let prep = Prep {
            jail: std::ffi::CString::new(jail.as_os_str().as_encoded_bytes())
                .map_err(|_| format!("{} has a NUL", jail.display()))?,
            strings: own_strings(),
            last_cap: last_cap(),
            join_net: join.as_ref().map(|fd| fd.as_raw_fd()),
            new_net: matches!(net, Net::New),
            filter: filter(report_w.as_raw_fd()),
        };
        // SAFETY: pidfd_open takes a pid and flags; our own pid.
        let me = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) } as RawFd;
        if me < 0 {
            return Err(format!("pidfd_open(self): {}", errno()));
        }
        // SAFETY: pidfd_open returned a new fd that nothing else owns.
        let me = unsafe { OwnedFd::from_raw_fd(me) };
        // SAFETY: clone with only CLONE_NEWPID and an exit signal behaves like fork(2).
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                libc::CLONE_NEWPID | libc::SIGCHLD,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        if pid < 0 {
            return Err(format!("clone(CLONE_NEWPID): {}", errno()));
        }
        if pid == 0 {
            // SAFETY: this is the freshly forked holder.
            unsafe { holder(&prep, report_w.as_raw_fd(), me.as_raw_fd()) }
        }
        drop(report_w);
        drop(me);
        drop(join);
        let mut ns = PidNs {
            pid: pid as libc::pid_t,
            pid_ns: None,
            ipc_ns: None,
            net_ns: None,
        };
        let failed = loop {
            match receive(report_r.as_raw_fd()) {
                Ok((MSG, [NAMESPACES, ..], fds)) if ns.pid_ns.is_none() => {
                    let mut fds = fds.into_iter();
                    ns.pid_ns = fds.next();
                    ns.ipc_ns = fds.next();
                    ns.net_ns = fds.next();
                }
                Ok((MSG, [READY, ..], _)) if ns.ipc_ns.is_some() => return Ok(ns),
                Ok((MSG, [step, e @ ..], _)) if step < READY - 1 => {
                    let step = STEPS.get(step as usize).copied().unwrap_or("?");
                    let e = std::io::Error::from_raw_os_error(i32::from_le_bytes(e));
                    break format!("pid namespace holder: {step}: {e}");
                }
                Ok(_) => break "the pid namespace holder died while setting up".into(),
                Err(e) => break format!("reading the pid namespace holder's report: {e}"),
            }
        };
        ns.end();
        Err(failed)
    }

    /// The namespaces the job joins, as `(OCI type, path)`: the holder's pid and IPC
    /// namespaces, and its network namespace when it made the job's. The paths are this
    /// process's descriptors (`/proc/self/fd/<n>`), opened by libcontainer's processes,
    /// clones of this one, before the job's `execve`.
    pub(super) fn joined(&self) -> Vec<(&'static str, String)> {
        let path = |fd: &OwnedFd| format!("/proc/self/fd/{}", fd.as_raw_fd());
        let mut v = Vec::new();
        if let Some(fd) = &self.pid_ns {
            v.push(("pid", path(fd)));
        }
        if let Some(fd) = &self.ipc_ns {
            v.push(("ipc", path(fd)));
        }
        if let Some(fd) = &self.net_ns {
            v.push(("network", path(fd)));
        }
        v
    }

    /// Kills the holder, and with it every process still in the namespace, and reaps it.
    /// Once only; later calls do nothing.
    pub(super) fn end(&mut self) {
        self.pid_ns = None;
        self.ipc_ns = None;
        self.net_ns = None;
        if self.pid <= 0 {
            return;
        }
        // SAFETY: `pid` is our unreaped child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        // The holder's exit waits until every process of its namespace has been reaped,
        // and some are ours, not its (youki's init when the container never started):
        // reap whatever of ours ends until the holder itself does. The shim has no other
        // children by then (the job, if it ran, was reaped first).
        loop {
            // SAFETY: waitpid with a null status pointer.
            let rc = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::__WALL) };
            if rc == self.pid || (rc < 0 && errno().raw_os_error() != Some(libc::EINTR)) {
                break;
            }
        }
        self.pid = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The holder's filter, installed in a forked child: its loop's calls and the report's
    /// write and close pass; another descriptor's write, and anything else (`getpid`,
    /// `openat`, `socket`, `ptrace`) fail with `EPERM`.
    #[test]
    fn the_holders_filter_allows_only_its_loop() {
        if AUDIT_ARCH.is_none() {
            return;
        }
        let (r, w) = super::super::container::pipe().unwrap();
        let (_r2, other) = super::super::container::pipe().unwrap();
        let prog = filter(w.as_raw_fd());
        // SAFETY: the child makes only raw system calls (async-signal-safe) and exits with
        // `_exit`; the parent reaps it.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: (the whole block) raw system calls on this child's own descriptors and
            // live locals.
            unsafe {
                let eperm = |rc: libc::c_long| rc == -1 && *libc::__errno_location() == libc::EPERM;
                libc::prctl(
                    libc::PR_SET_NO_NEW_PRIVS,
                    1 as libc::c_ulong,
                    ZERO,
                    ZERO,
                    ZERO,
                );
                if !install(&prog) {
                    libc::_exit(10);
                }
                let bit = |n: u8, ok: bool| if ok { 0u8 } else { 1 << n };
                let mut fails = bit(0, eperm(libc::syscall(libc::SYS_getpid)));
                fails |= bit(
                    1,
                    eperm(libc::syscall(
                        libc::SYS_openat,
                        libc::AT_FDCWD,
                        c"/".as_ptr(),
                        libc::O_RDONLY,
                    )),
                );
                fails |= bit(
                    2,
                    eperm(libc::syscall(
                        libc::SYS_socket,
                        libc::AF_UNIX,
                        libc::SOCK_STREAM,
                        0,
                    )),
                );
                fails |= bit(3, eperm(libc::syscall(libc::SYS_ptrace, 0, 0, 0, 0)));
                fails |= bit(
                    4,
                    eperm(libc::syscall(
                        libc::SYS_write,
                        other.as_raw_fd(),
                        b"x".as_ptr(),
                        1,
                    )),
                );
                fails |= bit(5, eperm(libc::syscall(libc::SYS_close, other.as_raw_fd())));
                // wait4 with no children: ECHILD, not EPERM.
                fails |= bit(
                    6,
                    !eperm(libc::syscall(libc::SYS_wait4, -1, 0, libc::WNOHANG, 0)),
                );
                let msg = [fails];
                fails |= bit(
                    7,
                    libc::syscall(libc::SYS_write, w.as_raw_fd(), msg.as_ptr(), 1) == 1,
                );
                fails |= bit(7, libc::syscall(libc::SYS_close, w.as_raw_fd()) == 0);
                libc::syscall(libc::SYS_exit_group, fails as libc::c_long);
                libc::_exit(11);
            }
        }
        drop(w);
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        let mut got = [0u8; 1];
        // SAFETY: reading into a valid one-byte buffer.
        let n = unsafe { libc::read(r.as_raw_fd(), got.as_mut_ptr().cast(), 1) };
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "failed checks (bits)");
        assert_eq!((n, got[0]), (1, 0));
    }
}
