//! The pid namespace holder, `flynn-init`: pid 1 of a job's pid namespace, forked from the
//! shim before the container exists. It only reaps orphans and keeps the namespace alive.
//!
//! Being the namespace's pid 1, it is what the job sees as `/proc/1`: its root, working
//! directory, mount table, command line, environment, descriptors and capabilities. Forked
//! from the shim, all of those were the host's (the host's `/` as `/proc/1/root`, writable by
//! a root job granted `CAP_SYS_PTRACE`; the host's mount table in `/proc/1/mountinfo`, which
//! any job reads). So before it reports ready the holder gives every one of them up: a mount
//! namespace of its own whose only mount is an empty read-only tmpfs it pivots into (the old
//! root detached), its argv and environment strings blanked, every descriptor closed, every
//! capability dropped (bounding, ambient, effective, permitted, inheritable), no new
//! privileges and not dumpable.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use super::container::{errno, pipe};

/// A pid namespace whose pid 1 is a minimal init forked from the shim: it reaps orphans and
/// does nothing else. The job joins the namespace as pid 2, so it is not the namespace's init:
/// a signal from the host (`SIGTERM` on stop) is delivered by its default action as to any
/// process, where an init gets only the signals it installed handlers for (pid_namespaces(7);
/// Flynn's containerinit forwarded them for the same reason). Killing the holder kills every
/// process left in the namespace, as the exit of a job that was pid 1 did; so does the death
/// of the shim (the holder's parent-death signal).
pub(super) struct PidNs {
    pid: libc::pid_t,
}

/// What the holder does before it reports ready, in order (a failure names its step).
const STEPS: [&str; 12] = [
    "unshare(CLONE_NEWNS)",
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
];
/// The step byte of a holder that is ready.
const READY: u8 = 0xff;

/// What the holder needs, prepared by the shim before the fork (the child allocates nothing).
struct Prep {
    /// An existing directory the holder mounts its empty root on (in its own namespace).
    jail: std::ffi::CString,
    /// The shim's argv and environment strings, `[start, end)` each, in the holder's copy of
    /// the shim's memory (`/proc/<pid>/cmdline` and `environ` read them).
    strings: Option<[(usize, usize); 2]>,
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

/// The holder's set-up (see the module doc). Returns the failed step and its errno.
///
/// # Safety
/// Only in the freshly forked holder: it changes the whole process (namespace, root,
/// capabilities) and overwrites the argv and environment strings, which nothing in it reads
/// afterwards. Async-signal-safe calls only.
unsafe fn confine(p: &Prep) -> Result<(), (u8, i32)> {
    let check = |step: u8, ok: bool| {
        if ok {
            Ok(())
        } else {
            Err((step, errno().raw_os_error().unwrap_or(0)))
        }
    };
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: (the whole block) valid NUL-terminated strings, null pointers where the calls
    // allow them, pointers to live locals; the strings' memory is this process's own copy.
    unsafe {
        check(0, libc::unshare(libc::CLONE_NEWNS) == 0)?;
        check(
            1,
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
            2,
            libc::mount(
                c"flynn-init".as_ptr(),
                p.jail.as_ptr(),
                c"tmpfs".as_ptr(),
                flags,
                c"size=4k,nr_inodes=8,mode=0555".as_ptr().cast(),
            ) == 0,
        )?;
        check(3, libc::chdir(p.jail.as_ptr()) == 0)?;
        // The old root ends up on top of the new one, and is detached there (pivot_root(2)).
        check(
            4,
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0,
        )?;
        check(5, libc::umount2(c".".as_ptr(), libc::MNT_DETACH) == 0)?;
        check(6, libc::chdir(c"/".as_ptr()) == 0)?;
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
        for cap in 0..64 {
            let rc = libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, ZERO);
            // EINVAL: past the kernel's last capability.
            check(7, rc == 0 || errno().raw_os_error() == Some(libc::EINVAL))?;
        }
        check(
            8,
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
            9,
            libc::syscall(
                libc::SYS_capset,
                &mut header as *mut CapHeader,
                data.as_ptr(),
            ) == 0,
        )?;
        check(
            10,
            libc::prctl(
                libc::PR_SET_NO_NEW_PRIVS,
                1 as libc::c_ulong,
                ZERO,
                ZERO,
                ZERO,
            ) == 0,
        )?;
        check(
            11,
            libc::prctl(libc::PR_SET_DUMPABLE, ZERO, ZERO, ZERO, ZERO) == 0,
        )?;
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
        let msg = match confine(p) {
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
        // Nothing of the shim's stays open here: its control socket above all (with the shim
        // gone, connecting must fail), and its stdio (the job's shim.log).
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut chld: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut chld);
        libc::sigaddset(&mut chld, libc::SIGCHLD);
        loop {
            while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG | libc::__WALL) > 0 {}
            libc::sigwaitinfo(&chld, std::ptr::null_mut());
        }
    }
}

impl PidNs {
    /// Forks the holder into a new pid namespace and waits until it has confined itself
    /// (see the module doc), its empty root mounted on `jail` (an existing directory; the
    /// mount is in the holder's own namespace only). The shim is single-threaded, and the
    /// child makes only async-signal-safe calls.
    pub(super) fn new(jail: &Path) -> Result<PidNs, String> {
        let prep = Prep {
            jail: std::ffi::CString::new(jail.as_os_str().as_encoded_bytes())
                .map_err(|_| format!("{} has a NUL", jail.display()))?,
            strings: own_strings(),
        };
        let (report_r, report_w) = pipe()?;
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
        let mut ns = PidNs {
            pid: pid as libc::pid_t,
        };
        let mut msg = [0u8; 5];
        let n = loop {
            // SAFETY: `msg` is a valid writable buffer of its length.
            let n = unsafe { libc::read(report_r.as_raw_fd(), msg.as_mut_ptr().cast(), 5) };
            if n >= 0 || errno().raw_os_error() != Some(libc::EINTR) {
                break n;
            }
        };
        if n == 5 && msg[0] == READY {
            return Ok(ns);
        }
        ns.end();
        if n != 5 {
            return Err("the pid namespace holder died while setting up".into());
        }
        let step = STEPS.get(msg[0] as usize).copied().unwrap_or("?");
        let e =
            std::io::Error::from_raw_os_error(i32::from_le_bytes([msg[1], msg[2], msg[3], msg[4]]));
        Err(format!("pid namespace holder: {step}: {e}"))
    }

    /// The namespace, for the container's OCI config.
    pub(super) fn path(&self) -> String {
        format!("/proc/{}/ns/pid", self.pid)
    }

    /// Kills the holder, and with it every process still in the namespace, and reaps it.
    /// Once only; later calls do nothing.
    pub(super) fn end(&mut self) {
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
