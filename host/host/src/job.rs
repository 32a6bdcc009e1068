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
mod tests;
