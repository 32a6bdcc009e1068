//! What a job's container looks like ([`ContainerSpec`]), its validation, and its translation into
//! the OCI runtime config that libcontainer reads.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::ContainerError;

/// Default `PATH` put into a job's environment when it has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// CPU limits the kernel takes: the quota is `millis × 100 µs` per 100 ms period, and a CFS
/// quota below 1 ms is refused (`EINVAL`), so 10 milli-CPUs is the least.
pub const CPU_MILLIS: std::ops::RangeInclusive<u64> = 10..=1_000_000;
/// CPU weights the kernel takes: cgroup v1 `cpu.shares` is 2 up to `MAX_SHARES` (2^18).
pub const CPU_SHARES: std::ops::RangeInclusive<u64> = 2..=262_144;
/// `pids.max` above `PID_MAX_LIMIT` (4194304 on 64-bit) is refused.
pub const PIDS: std::ops::RangeInclusive<u64> = 1..=4_194_304;

/// The largest `RLIMIT_NOFILE` a job may be given: `fs.nr_open` (a larger limit fails the
/// job's start with `EPERM`), and never above 2^30.
pub fn max_fds_allowed() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20)
        .min(1 << 30)
}

/// One job's container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// Job id, `[A-Za-z0-9_.-]{1,64}`; also the container and cgroup name.
    pub id: String,
    /// Unpacked read-only image layer directories, lowest first (overlayfs lower dirs).
    pub layers: Vec<PathBuf>,
    /// argv; `args[0]` is looked up in `PATH` from `env`.
    pub args: Vec<String>,
    /// `K=V` pairs.
    pub env: Vec<String>,
    /// Working directory; `/` if empty.
    pub cwd: String,
    pub hostname: Option<String>,
    /// Join this pre-created network namespace; `None` gives a new one with only `lo`
    /// (unless `host_network`).
    pub netns: Option<PathBuf>,
    /// Share the host's network namespace (no namespace of its own; `netns` must be `None`).
    #[serde(default)]
    pub host_network: bool,
    pub mounts: Vec<BindMount>,
    pub resources: Resources,
    /// Cgroup parent, e.g. `flynn`: the job's cgroup is `<parent>/<id>` under every controller.
    pub cgroup_parent: String,
    /// User and group the job runs as (root by default).
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    /// Capabilities instead of [`DEFAULT_CAPS`]; a job not running as root gets them in
    /// its bounding set only.
    #[serde(default)]
    pub capabilities: Option<Vec<String>>,
    /// The job's stdin is the FIFO [`Layout::stdin`](crate::Layout::stdin), which the daemon
    /// writes; it reaches end-of-file once the daemon closed it (`close_stdin`). Without it
    /// stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// The job runs on a terminal: a pseudo-terminal from the container's own `devpts` is its
    /// stdin, stdout and stderr and its controlling terminal, in a session of its own. The
    /// shim holds the terminal's master side: output comes as [`ShimEvent::Terminal`] (raw,
    /// stdout only), input is written through the stdin FIFO as for [`ContainerSpec::stdin`]
    /// (implied: a TTY job always takes input), and [`ShimConn::resize`] sets the window size.
    ///
    /// [`ShimEvent::Terminal`]: crate::ShimEvent::Terminal
    /// [`ShimConn::resize`]: crate::ShimConn::resize
    #[serde(default)]
    pub tty: bool,
    /// The terminal's window size (rows, columns) when the job starts (TTY jobs only; both
    /// non-zero). Without it the window is 0×0 until a resize.
    #[serde(default)]
    pub tty_size: Option<(u16, u16)>,
}

/// A host path bind-mounted into the container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: String,
    pub readonly: bool,
}

/// Resource limits; `None` leaves a resource unlimited (inherited for `max_fds`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    pub memory_bytes: Option<u64>,
    /// CPU quota in thousandths of a core (1000 = one core): a hard cap, enforced with a CFS
    /// quota (and shares in proportion).
    pub cpu_millis: Option<u64>,
    /// CPU weight only (`cpu.shares`, 1024 = one default process): a job may use every idle
    /// core and gets its share under contention. Ignored when `cpu_millis` is set.
    #[serde(default)]
    pub cpu_shares: Option<u64>,
    pub pids: Option<u64>,
    /// `RLIMIT_NOFILE` (soft and hard).
    pub max_fds: Option<u64>,
}

/// CFS period used for the CPU quota, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Names a job id may not have: beside the jobs' directories in a shim state directory, the
/// spare shim's log ([`Shim::spawn_spare`](crate::Shim::spawn_spare)), and the cgroup v1
/// interface files of the parent cgroup a job's cgroup is made in (with
/// `CGROUP_FILE_PREFIXES` for the rest). A job with one of them as its id could never
/// start (its directory or cgroup cannot be made there).
pub const RESERVED_IDS: [&str; 4] = [
    crate::shim::SPARE_LOG,
    // cgroup v1 interface files in the parent cgroup, where a job's cgroup is `<parent>/<id>`.
    "tasks",
    "notify_on_release",
    "release_agent",
];

/// Prefixes of cgroup interface files (`cgroup.procs`, `memory.max`, `pids.max`, ...): a
/// job's cgroup named like one would collide with the parent cgroup's file.
const CGROUP_FILE_PREFIXES: [&str; 16] = [
    "cgroup.",
    "cpu.",
    "cpuacct.",
    "cpuset.",
    "memory.",
    "pids.",
    "io.",
    "blkio.",
    "devices.",
    "freezer.",
    "hugetlb.",
    "net_cls.",
    "net_prio.",
    "perf_event.",
    "rdma.",
    "misc.",
];

/// Is `id` one of the [`RESERVED_IDS`] or named like a cgroup interface file (a job may
/// not be called that)?
pub fn reserved_id(id: &str) -> bool {
    RESERVED_IDS.contains(&id) || CGROUP_FILE_PREFIXES.iter().any(|p| id.starts_with(p))
}

/// Is `id` an acceptable job id (`[A-Za-z0-9_.-]{1,64}`, not `.` or `..`)?
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

fn valid_cgroup_parent(parent: &str) -> bool {
    !parent.is_empty()
        && parent.len() <= 200
        && parent
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != ".." && valid_id(seg))
}

impl ContainerSpec {
    /// Checks everything that can be checked before anything is created.
    pub fn validate(&self) -> Result<(), ContainerError> {
        if !valid_id(&self.id) {
            return Err(ContainerError::invalid(format!(
                "job id {:?} must match [A-Za-z0-9_.-]{{1,64}}",
                self.id
            )));
        }
        if reserved_id(&self.id) {
            return Err(ContainerError::invalid(format!(
                "job id {:?} is reserved (a shim state file or a cgroup interface file has that name)",
                self.id
            )));
        }
        if self.layers.is_empty() {
            return Err(ContainerError::invalid(
                "at least one image layer is required",
            ));
        }
        for layer in &self.layers {
            let s = layer.to_string_lossy();
            if !layer.is_absolute() || s.contains([':', ',']) || s.contains('\n') {
                return Err(ContainerError::invalid(format!(
                    "layer path {s:?} must be absolute without ':' or ','"
                )));
            }
        }
        if self.args.is_empty() || self.args[0].is_empty() {
            return Err(ContainerError::invalid("args must name a program"));
        }
        if self.args.iter().chain(&self.env).any(|s| s.contains('\0')) {
            return Err(ContainerError::invalid("args and env must not contain NUL"));
        }
        if let Some(bad) = self
            .env
            .iter()
            .find(|e| !e.contains('=') || e.starts_with('='))
        {
            return Err(ContainerError::invalid(format!(
                "env entry {bad:?} is not K=V"
            )));
        }
        if !self.cwd.is_empty() && !self.cwd.starts_with('/') {
            return Err(ContainerError::invalid("cwd must be absolute"));
        }
        if let Some((rows, cols)) = self.tty_size {
            if !self.tty {
                return Err(ContainerError::invalid("tty_size is for TTY jobs only"));
            }
            if rows == 0 || cols == 0 {
                return Err(ContainerError::invalid(format!(
                    "tty_size {rows}x{cols} must not be zero"
                )));
            }
        }
        if let Some(h) = &self.hostname {
            if h.is_empty() || h.len() > 64 || h.contains(['\0', '/']) {
                return Err(ContainerError::invalid(format!("bad hostname {h:?}")));
            }
        }
        if let Some(ns) = &self.netns {
            if !ns.is_absolute() {
                return Err(ContainerError::invalid("netns path must be absolute"));
            }
            if self.host_network {
                return Err(ContainerError::invalid(
                    "a job on the host network cannot also join a network namespace",
                ));
            }
        }
        for m in &self.mounts {
            if !m.source.is_absolute() || !m.target.starts_with('/') || m.target.contains("/..") {
                return Err(ContainerError::invalid(format!(
                    "bind mount {} -> {} must use absolute paths",
                    m.source.display(),
                    m.target
                )));
            }
        }
        let r = &self.resources;
        if r.memory_bytes.is_some_and(|m| m < 1 << 20) {
            return Err(ContainerError::invalid("memory limit below 1 MiB"));
        }
        if r.cpu_millis.is_some_and(|c| !CPU_MILLIS.contains(&c)) {
            return Err(ContainerError::invalid(format!(
                "cpu_millis must be {}..={} (the kernel's smallest CFS quota is 1 ms per 100 ms)",
                CPU_MILLIS.start(),
                CPU_MILLIS.end()
            )));
        }
        if r.cpu_shares.is_some_and(|c| !CPU_SHARES.contains(&c)) {
            return Err(ContainerError::invalid(format!(
                "cpu_shares must be {}..={}",
                CPU_SHARES.start(),
                CPU_SHARES.end()
            )));
        }
        if r.pids.is_some_and(|p| !PIDS.contains(&p)) {
            return Err(ContainerError::invalid(format!(
                "pids limit must be 1..={} (the kernel's largest pids.max)",
                PIDS.end()
            )));
        }
        let fds = max_fds_allowed();
        if r.max_fds.is_some_and(|f| !(3..=fds).contains(&f)) {
            return Err(ContainerError::invalid(format!(
                "max_fds must be 3..={fds} (fs.nr_open on this machine)"
            )));
        }
        if self.uid == u32::MAX || self.gid == u32::MAX {
            // -1 to setresuid/setresgid: "leave as is", i.e. root.
            return Err(ContainerError::invalid(
                "uid and gid must be below 4294967295",
            ));
        }
        if let Some(bad) = self
            .capabilities
            .iter()
            .flatten()
            .find(|c| !valid_capability(c))
        {
            return Err(ContainerError::invalid(format!(
                "unknown capability {bad:?}"
            )));
        }
        if let Some(why) = self
            .capabilities
            .iter()
            .flatten()
            .find_map(|c| capability_refusal(c, device_filter()))
        {
            return Err(ContainerError::invalid(why));
        }
        if !valid_cgroup_parent(&self.cgroup_parent) {
            return Err(ContainerError::invalid(format!(
                "cgroup parent {:?} must be '/'-separated [A-Za-z0-9_.-] names",
                self.cgroup_parent
            )));
        }
        Ok(())
    }

    /// The cgroup path (relative to each controller's mount) of this job.
    pub fn cgroup_path(&self) -> String {
        format!("/{}/{}", self.cgroup_parent, self.id)
    }

    /// The environment as the container sees it: `PATH` added when missing, and for a TTY
    /// job `TERM=xterm` (as Flynn and Docker set it) when missing.
    pub fn effective_env(&self) -> Vec<String> {
        let mut env = self.env.clone();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push(format!("PATH={DEFAULT_PATH}"));
        }
        if self.tty && !env.iter().any(|e| e.starts_with("TERM=")) {
            env.push("TERM=xterm".into());
        }
        env
    }

    /// Whether the job has a stdin FIFO (a job with [`ContainerSpec::stdin`], or a TTY job,
    /// whose input goes to its terminal).
    pub fn has_input(&self) -> bool {
        self.stdin || self.tty
    }

    /// The OCI runtime config (`config.json`) for this job with its root file system at `rootfs`.
    pub fn oci_config(&self, rootfs: &Path) -> Value {
        let cwd = if self.cwd.is_empty() { "/" } else { &self.cwd };
        let mut rlimits = Vec::new();
        if let Some(n) = self.resources.max_fds {
            rlimits.push(json!({"type": "RLIMIT_NOFILE", "hard": n, "soft": n}));
        }
        // Root holds its set. Another user holds the capabilities the job named (ambient, so
        // they survive the exec; with `noNewPrivileges` file capabilities cannot add any) and,
        // by default, none: as under Docker, the default set is then only the bound.
        let (caps, held, ambient) = match (&self.capabilities, self.uid) {
            (Some(c), 0) => (json!(c), json!(c), json!([])),
            (Some(c), _) => (json!(c), json!(c), json!(c)),
            (None, 0) => (json!(DEFAULT_CAPS), json!(DEFAULT_CAPS), json!([])),
            (None, _) => (json!(DEFAULT_CAPS), json!([]), json!([])),
        };
        let mut process = json!({
            // libcontainer makes the terminal in the container and sends its master to the
            // shim's console socket.
            "terminal": self.tty,
            // The group is also the only supplementary group: libcontainer leaves the shim's
            // groups in place when the list is empty.
            "user": {"uid": self.uid, "gid": self.gid, "additionalGids": [self.gid]},
            "args": self.args,
            "env": self.effective_env(),
            "cwd": cwd,
            "capabilities": {
                "bounding": caps, "effective": held, "permitted": held,
                "inheritable": ambient, "ambient": ambient,
            },
            "noNewPrivileges": true,
        });
        if !rlimits.is_empty() {
            process["rlimits"] = json!(rlimits);
        }

        let mut mounts = vec![
            json!({"destination": "/proc", "type": "proc", "source": "proc"}),
            json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
            json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                   "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
            json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                   "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
            json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
                   "options": ["nosuid", "noexec", "nodev"]}),
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                   "options": ["nosuid", "noexec", "nodev", "ro"]}),
        ];
        for m in &self.mounts {
            let mut options = vec!["rbind", "rprivate"];
            if m.readonly {
                // `ro` makes only the top mount read-only; `rro` (mount_setattr with
                // AT_RECURSIVE) every mount below the source as well, which an `rbind` brings
                // along (a tmpfs mounted inside the directory stayed writable).
                options.extend(["ro", "rro"]);
            }
            mounts.push(json!({
                "destination": m.target, "type": "bind",
                "source": m.source, "options": options,
            }));
        }

        let mut namespaces = vec![
            json!({"type": "pid"}),
            json!({"type": "ipc"}),
            json!({"type": "uts"}),
            json!({"type": "mount"}),
        ];
        match &self.netns {
            Some(path) => namespaces.push(json!({"type": "network", "path": path})),
            None if self.host_network => {}
            None => namespaces.push(json!({"type": "network"})),
        }

        let mut resources = json!({"devices": [{"allow": false, "access": "rwm"}]});
        if let Some(m) = self.resources.memory_bytes {
            resources["memory"] = json!({"limit": m});
        }
        if let Some(c) = self.resources.cpu_millis {
            resources["cpu"] = json!({
                "quota": c * CPU_PERIOD_US / 1000,
                "period": CPU_PERIOD_US,
                "shares": (c * 1024 / 1000).clamp(*CPU_SHARES.start(), *CPU_SHARES.end()),
            });
        } else if let Some(shares) = self.resources.cpu_shares {
            resources["cpu"] = json!({"shares": shares});
        }
        if let Some(p) = self.resources.pids {
            resources["pids"] = json!({"limit": p});
        }

        let mut config = json!({
            "ociVersion": "1.0.2",
            "process": process,
            "root": {"path": rootfs, "readonly": false},
            "mounts": mounts,
            "linux": {
                "cgroupsPath": self.cgroup_path(),
                "resources": resources,
                "namespaces": namespaces,
                "seccomp": crate::seccomp::default_profile(),
                "maskedPaths": [
                    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                    "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                    "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
                ],
                "readonlyPaths": [
                    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
                ],
            },
        });
        if let Some(h) = &self.hostname {
            config["hostname"] = json!(h);
        }
        config
    }
}

/// Whether `name` is a Linux capability this kernel generation knows (`CAP_` and upper case).
pub fn valid_capability(name: &str) -> bool {
    ALL_CAPS.contains(&name)
}

/// Does this host stop jobs from opening devices they were not given? On a cgroup v1 (or
/// hybrid) host the devices controller does, from the config's `devices` list (everything
/// denied but the standard `/dev` nodes). On a cgroup v2 host (the unified hierarchy at
/// `/sys/fs/cgroup`, as libcgroups tells them apart) that filter is an eBPF program, which
/// libcgroups installs only with its `cgroupsv2_devices` feature (libbpf; not built here):
/// there is none. Detected once.
pub fn device_filter() -> bool {
    static FILTER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FILTER.get_or_init(|| !unified_cgroups(Path::new("/sys/fs/cgroup")))
}

/// Is `root` a cgroup2 file system (a pure cgroup v2 host)?
fn unified_cgroups(root: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(root.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated path and a zeroed statfs for the kernel to fill.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == libc::CGROUP2_SUPER_MAGIC
    }
}

/// Why `capability` cannot be granted to a job on a host with (`device_filter`) or without
/// a device filter ([`device_filter`]); `None`: it can. Without one, `CAP_MKNOD` would let
/// a job make a node for the host's disk and open it.
pub fn capability_refusal(capability: &str, device_filter: bool) -> Option<&'static str> {
    (capability == "CAP_MKNOD" && !device_filter).then_some(
        "CAP_MKNOD cannot be granted on this host: with cgroup v2 it has no device filter, \
         so a job could make and open a node for any host device",
    )
}

/// Every capability up to `CAP_CHECKPOINT_RESTORE` (Linux 5.9).
pub const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Capabilities every job keeps: Docker's default set without `CAP_MKNOD`. On a cgroup v2 host
/// libcgroups (without its eBPF `cgroupsv2_devices` feature) installs no device filter, so a job
/// that could mknod could open host block devices (a job naming it is refused there:
/// [`capability_refusal`]); the runtime creates the standard `/dev` nodes itself.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> ContainerSpec {
        ContainerSpec {
            id: "job-1".into(),
            layers: vec!["/var/lib/flynn/layers/abc".into()],
            args: vec!["echo".into(), "hi".into()],
            env: vec!["A=1".into()],
            cwd: String::new(),
            hostname: Some("job-1".into()),
            netns: None,
            host_network: false,
            mounts: vec![],
            resources: Resources::default(),
            cgroup_parent: "flynn".into(),
            uid: 0,
            gid: 0,
            capabilities: None,
            stdin: false,
            tty: false,
            tty_size: None,
        }
    }

    #[test]
    fn ids() {
        for (id, ok) in [
            ("a", true),
            ("job_1.2-x", true),
            (&"x".repeat(64), true),
            (&"x".repeat(65), false),
            ("", false),
            (".", false),
            ("..", false),
            ("a/b", false),
            ("a b", false),
            ("ü", false),
        ] {
            assert_eq!(valid_id(id), ok, "{id:?}");
        }
    }

    #[test]
    fn validation_table() {
        type Edit = Box<dyn Fn(&mut ContainerSpec)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("bad id", Box::new(|s| s.id = "../x".into())),
            ("no layers", Box::new(|s| s.layers.clear())),
            ("relative layer", Box::new(|s| s.layers = vec!["x".into()])),
            ("colon layer", Box::new(|s| s.layers = vec!["/a:b".into()])),
            ("no args", Box::new(|s| s.args.clear())),
            ("bad env", Box::new(|s| s.env = vec!["NOEQUALS".into()])),
            ("relative cwd", Box::new(|s| s.cwd = "tmp".into())),
            (
                "tiny memory",
                Box::new(|s| s.resources.memory_bytes = Some(10)),
            ),
            ("zero cpu", Box::new(|s| s.resources.cpu_millis = Some(0))),
            (
                "cpu quota below 1 ms",
                Box::new(|s| s.resources.cpu_millis = Some(9)),
            ),
            ("one share", Box::new(|s| s.resources.cpu_shares = Some(1))),
            (
                "shares above MAX_SHARES",
                Box::new(|s| s.resources.cpu_shares = Some(262_145)),
            ),
            ("zero pids", Box::new(|s| s.resources.pids = Some(0))),
            (
                "pids above PID_MAX_LIMIT",
                Box::new(|s| s.resources.pids = Some(4_194_305)),
            ),
            (
                "max_fds above fs.nr_open",
                Box::new(|s| s.resources.max_fds = Some(max_fds_allowed() + 1)),
            ),
            ("bad parent", Box::new(|s| s.cgroup_parent = "../x".into())),
            (
                "host network and a netns",
                Box::new(|s| {
                    s.host_network = true;
                    s.netns = Some("/run/netns/x".into());
                }),
            ),
            (
                "empty parent",
                Box::new(|s| s.cgroup_parent = String::new()),
            ),
            (
                "size without a tty",
                Box::new(|s| s.tty_size = Some((20, 10))),
            ),
            (
                "zero rows",
                Box::new(|s| {
                    s.tty = true;
                    s.tty_size = Some((0, 10));
                }),
            ),
            (
                "relative mount",
                Box::new(|s| {
                    s.mounts.push(BindMount {
                        source: "rel".into(),
                        target: "/x".into(),
                        readonly: true,
                    })
                }),
            ),
        ];
        assert!(sample().validate().is_ok());
        for (name, f) in cases {
            let mut s = sample();
            f(&mut s);
            assert!(
                matches!(s.validate(), Err(ContainerError::InvalidSpec { .. })),
                "{name}"
            );
        }
    }

    #[test]
    fn oci_config_limits_and_namespaces() {
        let mut s = sample();
        s.resources = Resources {
            memory_bytes: Some(64 << 20),
            cpu_millis: Some(250),
            cpu_shares: None,
            pids: Some(20),
            max_fds: Some(100),
        };
        s.netns = Some("/run/netns/x".into());
        let c = s.oci_config(Path::new("/r"));
        assert_eq!(c["linux"]["cgroupsPath"], "/flynn/job-1");
        assert_eq!(c["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(c["linux"]["resources"]["cpu"]["quota"], 25_000);
        assert_eq!(c["linux"]["resources"]["cpu"]["period"], 100_000);
        assert_eq!(c["linux"]["resources"]["cpu"]["shares"], 256);
        assert_eq!(c["linux"]["resources"]["pids"]["limit"], 20);
        assert_eq!(c["process"]["rlimits"][0]["hard"], 100);
        assert_eq!(c["process"]["cwd"], "/");
        assert_eq!(c["process"]["noNewPrivileges"], true);
        let ns = c["linux"]["namespaces"].as_array().unwrap();
        assert!(ns
            .iter()
            .any(|n| n["type"] == "network" && n["path"] == "/run/netns/x"));
        assert!(c["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.as_str().unwrap().starts_with("PATH=")));
        // The config parses as an OCI spec.
        let _: libcontainer::oci_spec::runtime::Spec = serde_json::from_value(c).unwrap();
    }

    /// A weight alone sets `cpu.shares` and no CFS quota, so the job may use idle cores.
    #[test]
    fn oci_config_cpu_shares_only() {
        let mut s = sample();
        s.resources.cpu_shares = Some(512);
        let c = s.oci_config(Path::new("/r"));
        assert_eq!(c["linux"]["resources"]["cpu"], json!({"shares": 512}));
        let _: libcontainer::oci_spec::runtime::Spec = serde_json::from_value(c).unwrap();
        // A quota wins over a weight given with it.
        s.resources.cpu_millis = Some(2000);
        let c = s.oci_config(Path::new("/r"));
        assert_eq!(c["linux"]["resources"]["cpu"]["quota"], 200_000);
        assert_eq!(c["linux"]["resources"]["cpu"]["shares"], 2048);
    }

    /// A TTY job: `process.terminal` (libcontainer then wants a console socket), `TERM` unless
    /// the job set its own, and an input FIFO.
    #[test]
    fn oci_config_terminal() {
        let mut s = sample();
        let env = |s: &ContainerSpec| -> Vec<String> {
            s.oci_config(Path::new("/r"))["process"]["env"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e.as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(s.oci_config(Path::new("/r"))["process"]["terminal"], false);
        assert!(!env(&s).iter().any(|e| e.starts_with("TERM=")));
        assert!(!s.has_input());
        s.tty = true;
        s.tty_size = Some((20, 10));
        assert!(s.validate().is_ok());
        assert!(s.has_input());
        let c = s.oci_config(Path::new("/r"));
        assert_eq!(c["process"]["terminal"], true);
        assert!(env(&s).contains(&"TERM=xterm".to_string()));
        s.env.push("TERM=vt100".into());
        assert_eq!(env(&s).iter().filter(|e| e.starts_with("TERM=")).count(), 1);
        let _: libcontainer::oci_spec::runtime::Spec = serde_json::from_value(c).unwrap();
        // Old spec files without the fields still parse (as no terminal).
        let mut v = serde_json::to_value(sample()).unwrap();
        v.as_object_mut().unwrap().remove("tty");
        v.as_object_mut().unwrap().remove("tty_size");
        let old: ContainerSpec = serde_json::from_value(v).unwrap();
        assert!(!old.tty && old.tty_size.is_none());
    }

    /// `CAP_MKNOD` only where device access is filtered (cgroup v1); the rest either way.
    #[test]
    fn mknod_needs_a_device_filter() {
        assert!(capability_refusal("CAP_MKNOD", false).is_some());
        assert_eq!(capability_refusal("CAP_MKNOD", true), None);
        for cap in ALL_CAPS.iter().filter(|c| **c != "CAP_MKNOD") {
            assert_eq!(capability_refusal(cap, false), None, "{cap}");
        }
        // Validation follows this host: CAP_MKNOD passes where device access is filtered
        // (cgroup v1 or hybrid), and is refused on a unified (v2) hierarchy.
        let mut s = sample();
        s.capabilities = Some(vec!["CAP_MKNOD".into()]);
        assert_eq!(s.validate().is_ok(), device_filter());
        assert_eq!(
            device_filter(),
            !unified_cgroups(Path::new("/sys/fs/cgroup"))
        );
        assert!(!unified_cgroups(Path::new("/")));
    }

    /// A read-only bind is read-only recursively (`rro`), sub-mounts included.
    #[test]
    fn read_only_binds_are_recursive() {
        let mut s = sample();
        s.mounts = vec![
            BindMount {
                source: "/a".into(),
                target: "/a".into(),
                readonly: true,
            },
            BindMount {
                source: "/b".into(),
                target: "/b".into(),
                readonly: false,
            },
        ];
        let c = s.oci_config(Path::new("/r"));
        let opts = |target: &str| -> Vec<String> {
            let m = c["mounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["destination"] == target)
                .unwrap();
            serde_json::from_value(m["options"].clone()).unwrap()
        };
        assert!(opts("/a").contains(&"rro".to_string()));
        assert!(!opts("/b").iter().any(|o| o == "ro" || o == "rro"));
        let _: libcontainer::oci_spec::runtime::Spec = serde_json::from_value(c.clone()).unwrap();
    }

    #[test]
    fn network_namespace_choices() {
        let types = |s: &ContainerSpec| -> Vec<serde_json::Value> {
            s.oci_config(Path::new("/r"))["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["type"] == "network")
                .cloned()
                .collect()
        };
        // A new, empty one by default.
        let mut s = sample();
        assert_eq!(types(&s), vec![json!({"type": "network"})]);
        // The host's: no network namespace entry at all.
        s.host_network = true;
        assert!(s.validate().is_ok());
        assert!(types(&s).is_empty());
        // Old spec files without the field still parse (as not host network).
        let mut v = serde_json::to_value(sample()).unwrap();
        v.as_object_mut().unwrap().remove("host_network");
        assert!(
            !serde_json::from_value::<ContainerSpec>(v)
                .unwrap()
                .host_network
        );
    }
}
