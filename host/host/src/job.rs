//! The pure core of job handling: validation of submitted jobs, the job environment
//! (spec §0.4) and the job table with its state machine and per-app retention (§5.4).

use std::collections::BTreeMap;
use std::net::IpAddr;

use flynn_api::host::{ActiveJob, Job, JobStatus};
use flynn_api::ApiError;

/// Stopped jobs kept per app (spec §5.4).
pub const MAX_DOWN_JOBS_PER_APP: usize = 25;

/// Default SIGTERM → SIGKILL grace.
pub const DEFAULT_STOP_TIMEOUT_SECS: u64 = 10;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A job id is used in file names, cgroup names and URLs: 1–64 of `[A-Za-z0-9_.-]` (the
/// container runtime's rule).
pub use flynn_container::valid_id;

// The limits the container runtime accepts (flynn-container's `ContainerSpec::validate`),
// checked here so that a job the runtime would refuse is a 400, not a failed start.

/// `resources.memory.limit`: bytes, at least 1 MiB.
pub const MEMORY_LIMIT: std::ops::RangeInclusive<i64> = 1 << 20..=i64::MAX;
/// `resources.cpu.limit`: milli-CPUs, a weight as in Flynn (`cpu.shares` = limit × 1.024, no
/// quota: a job may use idle cores), so within the kernel's shares, 2 up to 2^18: 2 up to 256
/// cores.
pub const CPU_LIMIT: std::ops::RangeInclusive<i64> = 2..=256_000;
/// `resources.max_procs.limit`: `pids.max`, at most the kernel's `PID_MAX_LIMIT`.
pub const MAX_PROCS_LIMIT: std::ops::RangeInclusive<i64> = 1..=4_194_304;

/// `resources.max_fd.limit`: `RLIMIT_NOFILE`, room for stdin, stdout and stderr at least,
/// and at most `fs.nr_open` (a larger limit fails the start).
pub fn max_fd_limit() -> std::ops::RangeInclusive<i64> {
    3..=i64::try_from(flynn_container::max_fds_allowed()).unwrap_or(1 << 30)
}

/// The partitions a job may name (Flynn's); none or an empty one is `user`. They carry no
/// resource weights here (Flynn gave each its own cgroup with CPU shares, see
/// docs/ARCHITECTURE.md).
pub const PARTITIONS: [&str; 3] = ["system", "background", "user"];

/// A job in an unknown partition fails to start, with Flynn's message (spec §5.3: created,
/// then an `error` event).
pub fn check_partition(job: &Job) -> Result<(), String> {
    match job.partition.as_deref() {
        None | Some("") => Ok(()),
        Some(p) if PARTITIONS.contains(&p) => Ok(()),
        Some(p) => Err(format!("host: invalid job partition {p:?}")),
    }
}

/// A bind mount target the container runtime accepts: absolute, without `/..` anywhere
/// (the runtime's check, which also refuses names starting with `..`).
pub fn valid_mount_target(target: &str) -> bool {
    target.starts_with('/') && !target.contains("/..")
}

/// The longest `config.stop_timeout` (seconds) a job may ask for.
pub const MAX_STOP_TIMEOUT: u64 = 86_400;

/// `config.linux_capabilities`: known names, and none this host cannot grant safely
/// (`CAP_MKNOD` without a device filter: see [`flynn_container::device_filter`]).
fn check_capabilities(caps: &[String], device_filter: bool) -> Result<(), ApiError> {
    if let Some(bad) = caps.iter().find(|c| !flynn_container::valid_capability(c)) {
        return Err(ApiError::validation(
            Some("config.linux_capabilities"),
            &format!("has an unknown capability {bad:?} (names are like CAP_NET_ADMIN)"),
        ));
    }
    if let Some(why) = caps
        .iter()
        .find_map(|c| flynn_container::capability_refusal(c, device_filter))
    {
        return Err(ApiError::validation(
            Some("config.linux_capabilities"),
            &format!("is refused: {why}"),
        ));
    }
    Ok(())
}

/// Parses and validates a `PUT /host/jobs/:id` body. `needs_image`: the runtime starts
/// jobs from image layers, so `mountspecs` must be set.
pub fn parse_job(path_id: &str, body: &[u8], needs_image: bool) -> Result<Job, ApiError> {
    let mut job: Job = serde_json::from_slice(body).map_err(|_| ApiError::syntax())?;
    if !valid_id(path_id) {
        return Err(ApiError::validation(
            Some("id"),
            "must be 1-64 characters of [A-Za-z0-9_.-]",
        ));
    }
    if flynn_container::reserved_id(path_id) {
        return Err(ApiError::validation(
            Some("id"),
            &format!(
                "{path_id:?} is reserved (a shim state file or a cgroup interface file has that name); choose another id"
            ),
        ));
    }
    if job.id.is_empty() {
        job.id = path_id.to_string();
    } else if job.id != path_id {
        return Err(ApiError::validation(Some("id"), "must match the URL"));
    }
    validate(&job, needs_image)?;
    Ok(job)
}

fn validate(job: &Job, needs_image: bool) -> Result<(), ApiError> {
    if needs_image && job.mountspecs.is_empty() {
        return Err(ApiError::validation(Some("mountspecs"), "must be set"));
    }
    for (i, m) in job.mountspecs.iter().enumerate() {
        if m.kind != "tar" {
            return Err(ApiError::validation(
                Some(&format!("mountspecs[{i}].type")),
                "must be \"tar\"",
            ));
        }
        let sha = m.hashes.get("sha256").map(String::as_str).unwrap_or("");
        if sha.len() != 64 || !sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ApiError::validation(
                Some(&format!("mountspecs[{i}].hashes.sha256")),
                "must be 64 lowercase hex digits",
            ));
        }
        if !m.url.is_empty() && !m.url.starts_with("file:///") {
            return Err(ApiError::validation(
                Some(&format!("mountspecs[{i}].url")),
                "must be a file:/// URL",
            ));
        }
    }
    if job.config.args.is_empty() || job.config.args[0].is_empty() {
        return Err(ApiError::validation(Some("config.args"), "must be set"));
    }
    for k in job.config.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(ApiError::validation(
                Some("config.env"),
                &format!("has an invalid name {k:?}"),
            ));
        }
    }
    if job.config.env.values().any(|v| v.contains('\0')) {
        return Err(ApiError::validation(
            Some("config.env"),
            "values must not contain NUL",
        ));
    }
    if job.config.args.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::validation(
            Some("config.args"),
            "must not contain NUL",
        ));
    }
    if !job.config.working_dir.is_empty() && !job.config.working_dir.starts_with('/') {
        return Err(ApiError::validation(
            Some("config.working_dir"),
            "must be an absolute path",
        ));
    }
    for (i, m) in job.config.mounts.iter().enumerate() {
        if !m.location.starts_with('/') || !m.target.starts_with('/') {
            return Err(ApiError::validation(
                Some(&format!("config.mounts[{i}]")),
                "location and target must be absolute paths",
            ));
        }
        if !valid_mount_target(&m.target) {
            return Err(ApiError::validation(
                Some(&format!("config.mounts[{i}].target")),
                "must not contain `/..`",
            ));
        }
    }
    for (field, id) in [
        ("config.uid", job.config.uid),
        ("config.gid", job.config.gid),
    ] {
        if id == Some(u32::MAX) {
            return Err(ApiError::validation(
                Some(field),
                "must be below 4294967295 (-1 would leave the job as root)",
            ));
        }
    }
    // Only the container runtime (the one that needs images) grants capabilities; whether
    // this host can grant CAP_MKNOD safely is detected once.
    check_capabilities(
        job.config.linux_capabilities.as_deref().unwrap_or_default(),
        !needs_image || flynn_container::device_filter(),
    )?;
    crate::volumes::validate_bindings(job)?;
    for (i, p) in job.config.ports.iter().enumerate() {
        if let Some(s) = &p.service {
            // discoverd's rule: a name it refuses would be accepted here and never
            // registered (the heartbeater gives up on a refusal).
            if !flynn_api::discoverd::valid_service_name(&s.name) {
                return Err(ApiError::validation(
                    Some(&format!("config.ports[{i}].service.name")),
                    "must be lowercase letters, digits and dashes",
                ));
            }
        }
    }
    let r = &job.resources;
    for (name, spec, range) in [
        ("memory", r.memory, MEMORY_LIMIT),
        ("cpu", r.cpu, CPU_LIMIT),
        ("max_fd", r.max_fd, max_fd_limit()),
        ("max_procs", r.max_procs, MAX_PROCS_LIMIT),
        ("temp_disk", r.temp_disk, 1..=i64::MAX),
    ] {
        if let Some(l) = spec.and_then(|s| s.limit) {
            if !range.contains(&l) {
                let message = match (*range.start(), *range.end()) {
                    (1, i64::MAX) => "must be positive".to_string(),
                    (min, i64::MAX) => format!("must be at least {min}"),
                    (min, max) => format!("must be between {min} and {max}"),
                };
                return Err(ApiError::validation(
                    Some(&format!("resources.{name}.limit")),
                    &message,
                ));
            }
        }
    }
    if job.config.stop_timeout == Some(0) {
        return Err(ApiError::validation(
            Some("config.stop_timeout"),
            "must be at least 1 second",
        ));
    }
    if job.config.stop_timeout > Some(MAX_STOP_TIMEOUT) {
        return Err(ApiError::validation(
            Some("config.stop_timeout"),
            &format!("must be at most {MAX_STOP_TIMEOUT} seconds (a day)"),
        ));
    }
    Ok(())
}

/// A job port with its number assigned.
#[derive(Debug, Clone, PartialEq)]
pub struct BoundPort {
    pub port: u16,
    pub proto: String,
    pub service: Option<flynn_api::host::Service>,
}

/// Assigns port numbers (0 → 5000 + index) and checks protocols. The error is the
/// job's failure reason (spec §5.2: an unknown proto fails the job, it is not a 400).
pub fn bind_ports(job: &Job) -> Result<Vec<BoundPort>, String> {
    job.config
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if p.proto != "tcp" && p.proto != "udp" {
                return Err(format!("unknown port proto {:?}", p.proto));
            }
            let port = if p.port == 0 {
                u16::try_from(5000 + i).map_err(|_| "too many ports".to_string())?
            } else {
                p.port
            };
            Ok(BoundPort {
                port,
                proto: p.proto.clone(),
                service: p.service.clone(),
            })
        })
        .collect()
}

/// The job's environment as `K=V` strings, sorted by name: the job's own env plus
/// `PORT`, `PORT_n`, `EXTERNAL_IP`, the `FLYNN_*` identity variables (from metadata when
/// not in env), `DISCOVERD` and a default `PATH`.
pub fn job_env(
    job: &Job,
    ports: &[BoundPort],
    ip: Option<IpAddr>,
    discoverd: Option<&str>,
) -> Vec<String> {
    let mut env: BTreeMap<String, String> = job.config.env.clone();
    {
        let mut set_default = |k: &str, v: &str| {
            if !v.is_empty() {
                env.entry(k.to_string()).or_insert_with(|| v.to_string());
            }
        };
        set_default("PATH", DEFAULT_PATH);
        set_default("FLYNN_JOB_ID", &job.id);
        for (var, meta) in [
            ("FLYNN_APP_ID", "flynn-controller.app"),
            ("FLYNN_APP_NAME", "flynn-controller.app_name"),
            ("FLYNN_RELEASE_ID", "flynn-controller.release"),
            ("FLYNN_PROCESS_TYPE", "flynn-controller.type"),
        ] {
            if let Some(v) = job.metadata.get(meta) {
                set_default(var, v);
            }
        }
        if let Some(d) = discoverd {
            set_default("DISCOVERD", d);
        }
    }
    for (i, p) in ports.iter().enumerate() {
        env.insert(format!("PORT_{i}"), p.port.to_string());
    }
    if let Some(p) = ports.first() {
        env.insert("PORT".into(), p.port.to_string());
    }
    if let Some(ip) = ip {
        env.insert("EXTERNAL_IP".into(), ip.to_string());
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// The discoverd instance meta of a job: its `FLYNN_*` identity variables (spec §0.4), those
/// set empty left out (the client's one rule for job meta).
pub fn instance_meta(env: &[String]) -> BTreeMap<String, String> {
    flynn_client::discoverd::job_meta(env.iter().filter_map(|kv| kv.split_once('=')))
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    pub signal: Option<i32>,
    pub oom_killed: bool,
}

/// What a stop request must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopAction {
    /// The process is running: SIGTERM it, SIGKILL after the timeout.
    Signal,
    /// Still starting: the starter sees `force_stop` and stops it once it exists.
    Flagged,
    /// Asked to stop before: that stop goes on, nothing more to do.
    None,
}

/// Jobs a restarted daemon found running whose stored record could not be read (a newer
/// version's fields, a bad edit): left running and not in the [`Table`], so a fixed record
/// brings them back with the next daemon. Their ids stay taken for this daemon's life (a
/// `PUT` of one would overwrite the record and take the job's address and state), and
/// while they run, the volumes and host ports their containers were started with count as
/// in use.
#[derive(Debug, Default)]
pub struct Kept {
    jobs: BTreeMap<String, KeptJob>,
}

#[derive(Debug)]
struct KeptJob {
    volumes: Vec<String>,
    /// Ports in the host's network namespace (any protocol: the container's spec does not
    /// keep it).
    host_ports: Vec<u16>,
    running: bool,
}

impl Kept {
    pub fn insert(&mut self, id: &str, volumes: Vec<String>, host_ports: Vec<u16>) {
        let job = KeptJob {
            volumes,
            host_ports,
            running: true,
        };
        self.jobs.insert(id.to_string(), job);
    }

    pub fn contains(&self, id: &str) -> bool {
        self.jobs.contains_key(id)
    }

    /// The kept job's process ended: what it held is free (its id stays taken).
    pub fn ended(&mut self, id: &str) {
        if let Some(j) = self.jobs.get_mut(id) {
            j.running = false;
        }
    }

    /// The running kept job that binds `volume`.
    pub fn holder(&self, volume: &str) -> Option<&str> {
        self.jobs
            .iter()
            .find(|(_, j)| j.running && j.volumes.iter().any(|v| v == volume))
            .map(|(id, _)| id.as_str())
    }

    /// Host ports of running kept jobs.
    pub fn host_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.jobs
            .values()
            .filter(|j| j.running)
            .flat_map(|j| j.host_ports.iter().copied())
    }
}

/// 409 for a `PUT` of a kept job's id.
pub fn kept_conflict(id: &str) -> ApiError {
    ApiError::conflict(format!(
        "host: a job with id {id} is still running from before the daemon restarted (or ended since), and its stored record (jobs/{id}.json) cannot be read; fix or remove the record and restart the daemon"
    ))
}

/// All jobs the host knows, keyed by id, with the state machine:
/// starting → running → done | crashed; starting → failed | done (stopped before it ran).
#[derive(Debug, Default)]
pub struct Table {
    jobs: BTreeMap<String, ActiveJob>,
}

impl Table {
    pub fn get(&self, id: &str) -> Option<&ActiveJob> {
        self.jobs.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &ActiveJob> {
        self.jobs.values()
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Inserts a restored job as is.
    pub fn restore(&mut self, job: ActiveJob) {
        self.jobs.insert(job.job.id.clone(), job);
    }

    /// Takes back a job [`Table::add`] just made (its state could not be recorded).
    pub fn unadd(&mut self, id: &str) {
        if self
            .jobs
            .get(id)
            .is_some_and(|j| j.status == JobStatus::Starting && j.pid.is_none())
        {
            self.jobs.remove(id);
        }
    }

    /// A new job in `starting`; 409 when the id is taken.
    pub fn add(&mut self, job: Job, host_id: &str, now: String) -> Result<&ActiveJob, ApiError> {
        if self.jobs.contains_key(&job.id) {
            return Err(ApiError::conflict("job already exists"));
        }
        let id = job.id.clone();
        let aj = ActiveJob {
            job,
            host_id: host_id.to_string(),
            status: JobStatus::Starting,
            created_at: now,
            ..ActiveJob::default()
        };
        Ok(self.jobs.entry(id).or_insert(aj))
    }

    /// starting → running. `None` when the job is unknown or not starting.
    pub fn started(
        &mut self,
        id: &str,
        pid: u32,
        ip: Option<IpAddr>,
        now: String,
    ) -> Option<&ActiveJob> {
        let j = self.jobs.get_mut(id)?;
        if j.status != JobStatus::Starting {
            return None;
        }
        j.status = JobStatus::Running;
        j.pid = Some(pid);
        if let Some(ip) = ip {
            j.internal_ip = ip.to_string();
        }
        j.started_at = now;
        Some(j)
    }

    /// starting|running → done (exit 0, or asked to stop and not OOM-killed) | crashed.
    /// A job that exits 0 is done even when some process of its cgroup was OOM-killed
    /// (spec §5.2); `oom_killed` still says so.
    pub fn exited(&mut self, id: &str, exit: Exit, now: String) -> Option<&ActiveJob> {
        let j = self.jobs.get_mut(id)?;
        if j.status.is_terminal() {
            return None;
        }
        let clean = exit.code == 0 && exit.signal.is_none();
        j.status = if clean || (j.force_stop && !exit.oom_killed) {
            JobStatus::Done
        } else {
            JobStatus::Crashed
        };
        j.exit_status = Some(exit.code);
        j.signal = exit.signal;
        j.oom_killed = exit.oom_killed;
        j.pid = None;
        j.ended_at = now;
        Some(j)
    }

    /// The job ended without an exit status, for `reason`: starting → failed (spec §5.2:
    /// it could not start); running → crashed (it ran, and its end is not known: the
    /// runtime lost it); a job asked to stop is done instead. `error` says why.
    pub fn failed(&mut self, id: &str, reason: String, now: String) -> Option<&ActiveJob> {
        let j = self.jobs.get_mut(id)?;
        if j.status.is_terminal() {
            return None;
        }
        j.status = if j.force_stop {
            JobStatus::Done
        } else if j.status == JobStatus::Running {
            JobStatus::Crashed
        } else {
            JobStatus::Failed
        };
        j.error = Some(reason);
        j.pid = None;
        j.ended_at = now;
        Some(j)
    }

    /// Marks a stop request. A job already asked to stop is left to that stop
    /// ([`StopAction::None`]): no second SIGTERM (which a job handling it would see twice)
    /// and no second SIGKILL timer.
    pub fn request_stop(&mut self, id: &str) -> Result<StopAction, ApiError> {
        let j = self
            .jobs
            .get_mut(id)
            .ok_or_else(|| ApiError::object_not_found("host: unknown job"))?;
        match j.status {
            s if s.is_terminal() => Err(ApiError::conflict("host: job is already stopped")),
            _ if j.force_stop => Ok(StopAction::None),
            JobStatus::Starting => {
                j.force_stop = true;
                Ok(StopAction::Flagged)
            }
            _ => {
                j.force_stop = true;
                Ok(StopAction::Signal)
            }
        }
    }

    /// Drops the oldest stopped jobs of `app` beyond [`MAX_DOWN_JOBS_PER_APP`]; returns
    /// the removed ids. Jobs without an app are grouped together.
    pub fn gc(&mut self, app: Option<&str>) -> Vec<String> {
        let mut down: Vec<(String, String)> = self
            .jobs
            .values()
            .filter(|j| j.status.is_terminal() && j.job.app_id() == app)
            .map(|j| (j.ended_at.clone(), j.job.id.clone()))
            .collect();
        if down.len() <= MAX_DOWN_JOBS_PER_APP {
            return Vec::new();
        }
        down.sort();
        let excess = down.len() - MAX_DOWN_JOBS_PER_APP;
        down.into_iter()
            .take(excess)
            .map(|(_, id)| {
                self.jobs.remove(&id);
                id
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flynn_api::ErrorCode;

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn body(extra: &str) -> String {
        format!(
            r#"{{"mountspecs":[{{"type":"tar","url":"file:///x.tar","hashes":{{"sha256":"{SHA}"}}}}],
               "config":{{"args":["/bin/sh"]{extra}}}}}"#
        )
    }

    /// `CAP_MKNOD` is refused with a validation error (400) on a host without a device
    /// filter (cgroup v2), accepted with one (v1); other capabilities either way.
    #[test]
    fn mknod_is_refused_without_a_device_filter() {
        let caps = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let e = check_capabilities(&caps(&["CAP_NET_ADMIN", "CAP_MKNOD"]), false).unwrap_err();
        assert_eq!(e.code, ErrorCode::ValidationError);
        assert_eq!(e.code.status(), 400);
        assert_eq!(e.detail.unwrap()["field"], "config.linux_capabilities");
        assert!(e.message.contains("CAP_MKNOD"), "{}", e.message);
        check_capabilities(&caps(&["CAP_NET_ADMIN", "CAP_MKNOD"]), true).unwrap();
        check_capabilities(&caps(&["CAP_NET_ADMIN", "CAP_SYS_PTRACE"]), false).unwrap();
        let e = check_capabilities(&caps(&["NET_ADMIN"]), true).unwrap_err();
        assert!(e.message.contains("unknown"), "{}", e.message);
        // On this host, through parse_job: as its cgroups say.
        let b = body(r#","linux_capabilities":["CAP_MKNOD"]"#);
        assert_eq!(
            parse_job("j", b.as_bytes(), true).is_ok(),
            flynn_container::device_filter()
        );
        // The process runtime grants no capabilities: nothing to refuse.
        parse_job("j", b.as_bytes(), false).unwrap();
    }

    #[test]
    fn parse_fills_id_and_checks_it() {
        let j = parse_job("h-1", body("").as_bytes(), true).unwrap();
        assert_eq!(j.id, "h-1");
        let e = parse_job("h-2", br#"{"id":"h-1","config":{"args":["x"]}}"#, false).unwrap_err();
        assert_eq!(e.code, ErrorCode::ValidationError);
        let e = parse_job("a b", body("").as_bytes(), true).unwrap_err();
        assert_eq!(e.detail.unwrap()["field"], "id");
    }

    /// An id that names a file beside the jobs' container state (the spare shim's log) is
    /// refused: such a job was accepted and then could never start.
    #[test]
    fn reserved_ids_are_refused() {
        // Named like a cgroup interface file of the parent cgroup the job's cgroup goes in.
        let cgroup_files = ["cgroup.procs", "memory.max", "pids.max", "cpu.weight"];
        for id in flynn_container::RESERVED_IDS
            .into_iter()
            .chain(cgroup_files)
        {
            let e = parse_job(id, body("").as_bytes(), true).unwrap_err();
            assert_eq!(e.status(), 400, "{id}");
            assert!(e.message.contains("is reserved"), "{id}: {}", e.message);
            assert_eq!(e.detail.unwrap()["field"], "id");
        }
        assert!(flynn_container::RESERVED_IDS.contains(&"spare.log"));
        parse_job("spare.log2", body("").as_bytes(), true).unwrap();
        parse_job("web.memory", body("").as_bytes(), true).unwrap();
        parse_job("tasks-1", body("").as_bytes(), true).unwrap();
    }

    #[test]
    fn bad_input_table() {
        let cases: &[(&str, ErrorCode, Option<&str>)] = &[
            ("{", ErrorCode::SyntaxError, None),
            ("[1]", ErrorCode::SyntaxError, None),
            (r#"{"config":{"args":"sh"}}"#, ErrorCode::SyntaxError, None),
            (r#"{"bogus":1}"#, ErrorCode::SyntaxError, None),
            (
                r#"{"config":{"args":["sh"]}}"#,
                ErrorCode::ValidationError,
                Some("mountspecs"),
            ),
            (
                r#"{"mountspecs":[{"type":"squashfs","hashes":{}}],"config":{"args":["sh"]}}"#,
                ErrorCode::ValidationError,
                Some("mountspecs[0].type"),
            ),
            (
                r#"{"mountspecs":[{"type":"tar","hashes":{"sha256":"zz"}}],"config":{"args":["sh"]}}"#,
                ErrorCode::ValidationError,
                Some("mountspecs[0].hashes.sha256"),
            ),
        ];
        for (b, code, field) in cases {
            let e = parse_job("j", b.as_bytes(), true).unwrap_err();
            assert_eq!(e.code, *code, "{b}");
            if let Some(f) = field {
                assert_eq!(e.detail.as_ref().unwrap()["field"], *f, "{b}");
            }
        }
        let more: &[(&str, &str)] = &[
            (r#","args":[]"#, "config.args"),
            (r#","env":{"A=B":"c"}"#, "config.env"),
            (
                r#","mounts":[{"location":"rel","target":"/x"}]"#,
                "config.mounts[0]",
            ),
            (
                r#","ports":[{"port":1,"service":{"name":"a b"}}]"#,
                "config.ports[0].service.name",
            ),
            // discoverd refuses uppercase: the job would run and never be registered.
            (
                r#","ports":[{"port":1,"service":{"name":"Web"}}]"#,
                "config.ports[0].service.name",
            ),
            (r#","stop_timeout":0"#, "config.stop_timeout"),
            (
                r#","stop_timeout":18446744073709551615"#,
                "config.stop_timeout",
            ),
            (
                r#","linux_capabilities":["NET_ADMIN"]"#,
                "config.linux_capabilities",
            ),
            (r#","uid":4294967295"#, "config.uid"),
            (r#","gid":4294967295"#, "config.gid"),
            (
                r#","volumes":[{"target":"/d","volume":"v"}]"#,
                "config.volumes[0].volume",
            ),
        ];
        for (extra, field) in more {
            // `args` given twice is a duplicate-field syntax error; replace it instead.
            let b = if extra.starts_with(r#","args""#) {
                body("").replace(r#""args":["/bin/sh"]"#, &extra[1..])
            } else {
                body(extra)
            };
            let e = parse_job("j", b.as_bytes(), true).unwrap_err();
            assert_eq!(e.code, ErrorCode::ValidationError, "{b}");
            assert_eq!(e.detail.as_ref().unwrap()["field"], *field, "{b}");
        }
        let b = body("").replace(
            r#""config""#,
            r#""resources":{"memory":{"limit":-1}},"config""#,
        );
        let e = parse_job("j", b.as_bytes(), true).unwrap_err();
        assert_eq!(e.detail.unwrap()["field"], "resources.memory.limit");
    }

    /// The bounds the container runtime would refuse at start are 400s naming the field;
    /// the values at the bounds pass.
    #[test]
    fn runtime_bounds_are_validation_errors() {
        let res =
            |r: &str| body("").replace(r#""config""#, &format!(r#""resources":{r},"config""#));
        let bad: &[(String, &str)] = &[
            (
                res(r#"{"memory":{"limit":1048575}}"#),
                "resources.memory.limit",
            ),
            (res(r#"{"cpu":{"limit":256001}}"#), "resources.cpu.limit"),
            // One share is below the kernel's least (2): refused by the container spec.
            (res(r#"{"cpu":{"limit":1}}"#), "resources.cpu.limit"),
            (res(r#"{"max_fd":{"limit":2}}"#), "resources.max_fd.limit"),
            (
                res(r#"{"max_fd":{"limit":1073741825}}"#),
                "resources.max_fd.limit",
            ),
            (
                res(&format!(
                    r#"{{"max_fd":{{"limit":{}}}}}"#,
                    flynn_container::max_fds_allowed() + 1
                )),
                "resources.max_fd.limit",
            ),
            (
                res(r#"{"max_procs":{"limit":0}}"#),
                "resources.max_procs.limit",
            ),
            (
                res(r#"{"max_procs":{"limit":4194305}}"#),
                "resources.max_procs.limit",
            ),
            (
                res(r#"{"temp_disk":{"limit":-5}}"#),
                "resources.temp_disk.limit",
            ),
            (body(r#","working_dir":"app""#), "config.working_dir"),
            (
                body(r#","mounts":[{"location":"/h","target":"/a/../etc"}]"#),
                "config.mounts[0].target",
            ),
            (
                body(
                    r#","volumes":[{"target":"/a/..b","volume":"11111111-2222-4333-8444-555555555555"}]"#,
                ),
                "config.volumes[0].target",
            ),
            (
                body("").replace(r#"["/bin/sh"]"#, r#"["/bin/sh","a\u0000b"]"#),
                "config.args",
            ),
        ];
        for (b, field) in bad {
            let e = parse_job("j", b.as_bytes(), true).unwrap_err();
            assert_eq!(e.code, ErrorCode::ValidationError, "{b}");
            assert_eq!(e.status(), 400, "{b}");
            assert_eq!(e.detail.as_ref().unwrap()["field"], *field, "{b}");
            assert!(e.message.starts_with(field), "{b}: {}", e.message);
        }
        assert_eq!(
            parse_job("j", bad[0].0.as_bytes(), true)
                .unwrap_err()
                .message,
            "resources.memory.limit must be at least 1048576"
        );
        let ok = [
            res(
                r#"{"memory":{"limit":1048576},"cpu":{"limit":256000},"max_fd":{"limit":3},"max_procs":{"limit":1},"temp_disk":{"limit":1}}"#,
            ),
            res(&format!(
                r#"{{"cpu":{{"limit":2}},"max_fd":{{"limit":{}}},"max_procs":{{"limit":4194304}}}}"#,
                flynn_container::max_fds_allowed()
            )),
            body(r#","working_dir":"/app","mounts":[{"location":"/h","target":"/a/b..c"}]"#),
        ];
        for b in &ok {
            parse_job("j", b.as_bytes(), true).unwrap_or_else(|e| panic!("{b}: {e:?}"));
        }
    }

    #[test]
    fn spec_fields_are_accepted() {
        let b = body(
            r#","ports":[{"port":80,"service":{"name":"web","check":{"type":"tcp","interval":1000000000}}}]"#,
        )
        .replace(
            r#""config""#,
            r#""profiles":["kvm"],"resources":{"temp_disk":{"limit":1073741824}},"config""#,
        );
        let j = parse_job("j", b.as_bytes(), true).unwrap();
        assert_eq!(j.profiles, ["kvm"]);
        assert_eq!(j.resources.temp_disk.unwrap().limit, Some(1 << 30));
        let check = j.config.ports[0].service.as_ref().unwrap().check.as_ref();
        assert_eq!(check.unwrap().kind, "tcp");
        let j = parse_job(
            "j",
            body(r#","uid":1000,"gid":50,"linux_capabilities":["CAP_NET_ADMIN"]"#).as_bytes(),
            true,
        )
        .unwrap();
        assert_eq!((j.config.uid, j.config.gid), (Some(1000), Some(50)));
        assert_eq!(j.config.linux_capabilities.unwrap(), ["CAP_NET_ADMIN"]);
    }

    #[test]
    fn ports_and_env() {
        let b = body(
            r#","ports":[{"port":0},{"port":8080,"proto":"udp"},{"port":0}],"env":{"A":"1","PORT":"9"}"#,
        )
        .replace(
            r#""config""#,
            r#""metadata":{"flynn-controller.app":"app1","flynn-controller.type":"web"},"config""#,
        );
        let j = parse_job("h-j1", b.as_bytes(), true).unwrap();
        let ports = bind_ports(&j).unwrap();
        assert_eq!(
            ports.iter().map(|p| p.port).collect::<Vec<_>>(),
            [5000, 8080, 5002]
        );
        let env = job_env(
            &j,
            &ports,
            Some("100.100.0.5".parse().unwrap()),
            Some("http://d:1111"),
        );
        for want in [
            "A=1",
            "PORT=5000",
            "PORT_0=5000",
            "PORT_1=8080",
            "PORT_2=5002",
            "EXTERNAL_IP=100.100.0.5",
            "FLYNN_JOB_ID=h-j1",
            "FLYNN_APP_ID=app1",
            "FLYNN_PROCESS_TYPE=web",
            "DISCOVERD=http://d:1111",
        ] {
            assert!(env.iter().any(|e| e == want), "{want} not in {env:?}");
        }
        assert!(env.iter().any(|e| e.starts_with("PATH=/")));
        let meta = instance_meta(&env);
        assert_eq!(meta.len(), 3);
        assert_eq!(meta["FLYNN_APP_ID"], "app1");

        let mut bad = j.clone();
        bad.config.ports[0].proto = "sctp".into();
        assert_eq!(bind_ports(&bad).unwrap_err(), "unknown port proto \"sctp\"");
    }

    fn job(id: &str, app: &str) -> Job {
        let mut j = Job {
            id: id.into(),
            ..Job::default()
        };
        j.config.env.insert("FLYNN_APP_ID".into(), app.into());
        j
    }

    #[test]
    fn state_machine() {
        let mut t = Table::default();
        t.add(job("a", "x"), "h", "t0".into()).unwrap();
        assert_eq!(
            t.add(job("a", "x"), "h", "t0".into()).unwrap_err().code,
            flynn_api::ErrorCode::Conflict
        );
        let ip = Some("10.0.0.2".parse().unwrap());
        assert_eq!(
            t.started("a", 7, ip, "t1".into()).unwrap().status,
            JobStatus::Running
        );
        assert!(t.started("a", 8, ip, "t1".into()).is_none());
        let crash = Exit {
            code: 1,
            signal: None,
            oom_killed: false,
        };
        let j = t.exited("a", crash, "t2".into()).unwrap();
        assert_eq!((j.status, j.exit_status), (JobStatus::Crashed, Some(1)));
        assert!(t.exited("a", crash, "t3".into()).is_none());
        assert_eq!(
            t.request_stop("a").unwrap_err().message,
            "host: job is already stopped"
        );
        assert_eq!(
            t.request_stop("zz").unwrap_err().code,
            ErrorCode::ObjectNotFound
        );

        // Stopped on request: SIGTERM exit is done, not crashed.
        t.add(job("b", "x"), "h", "t0".into()).unwrap();
        t.started("b", 9, None, "t1".into()).unwrap();
        assert_eq!(t.request_stop("b").unwrap(), StopAction::Signal);
        // Asked again: the first stop goes on, nothing more is sent.
        assert_eq!(t.request_stop("b").unwrap(), StopAction::None);
        let term = Exit {
            code: 143,
            signal: Some(15),
            oom_killed: false,
        };
        assert_eq!(
            t.exited("b", term, "t2".into()).unwrap().status,
            JobStatus::Done
        );

        // OOM is a crash even when stopping.
        t.add(job("c", "x"), "h", "t0".into()).unwrap();
        let oom = Exit {
            code: 137,
            signal: Some(9),
            oom_killed: true,
        };
        let j = t.exited("c", oom, "t2".into()).unwrap();
        assert_eq!((j.status, j.oom_killed), (JobStatus::Crashed, true));

        // Lost by the runtime while running (no exit status): crashed, not failed
        // ("could not start"); while being stopped: done.
        for (id, stop, want) in [
            ("r", false, JobStatus::Crashed),
            ("s", true, JobStatus::Done),
        ] {
            t.add(job(id, "x"), "h", "t0".into()).unwrap();
            t.started(id, 11, None, "t1".into()).unwrap();
            if stop {
                t.request_stop(id).unwrap();
            }
            let j = t
                .failed(id, "lost the job's shim".into(), "t2".into())
                .unwrap();
            assert_eq!(
                (j.status, j.exit_status, j.error.as_deref(), j.pid),
                (want, None, Some("lost the job's shim"), None)
            );
        }

        // Failing to start.
        t.add(job("d", "x"), "h", "t0".into()).unwrap();
        let j = t.failed("d", "no image".into(), "t1".into()).unwrap();
        assert_eq!(
            (j.status, j.error.as_deref()),
            (JobStatus::Failed, Some("no image"))
        );
        // Stopped while starting, then the start fails: done.
        t.add(job("e", "x"), "h", "t0".into()).unwrap();
        assert_eq!(t.request_stop("e").unwrap(), StopAction::Flagged);
        assert_eq!(t.request_stop("e").unwrap(), StopAction::None);
        assert_eq!(
            t.failed("e", "stopped".into(), "t1".into()).unwrap().status,
            JobStatus::Done
        );
    }

    /// Spec §5.2: done = exit 0, even when a process of the job was OOM-killed; the kill
    /// is still reported.
    #[test]
    fn exit_zero_is_done_even_after_an_oom_kill() {
        let mut t = Table::default();
        t.add(job("z", "x"), "h", "t0".into()).unwrap();
        t.started("z", 10, None, "t1".into()).unwrap();
        let oom_child = Exit {
            code: 0,
            signal: None,
            oom_killed: true,
        };
        let j = t.exited("z", oom_child, "t2".into()).unwrap();
        assert_eq!(
            (j.status, j.exit_status, j.oom_killed),
            (JobStatus::Done, Some(0), true)
        );
    }

    #[test]
    fn gc_keeps_25_per_app() {
        let mut t = Table::default();
        for i in 0..30 {
            let id = format!("j{i:02}");
            t.add(job(&id, "app"), "h", "t".into()).unwrap();
            t.exited(
                &id,
                Exit {
                    code: 0,
                    signal: None,
                    oom_killed: false,
                },
                format!("t{i:02}"),
            );
        }
        t.add(job("other", "app2"), "h", "t".into()).unwrap();
        t.add(job("live", "app"), "h", "t".into()).unwrap();
        let removed = t.gc(Some("app"));
        assert_eq!(removed, ["j00", "j01", "j02", "j03", "j04"]);
        assert_eq!(t.len(), 27);
        assert!(t.get("live").is_some());
        assert!(t.gc(Some("app")).is_empty());
    }
}
