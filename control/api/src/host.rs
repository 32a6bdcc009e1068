//! flynn-host's job API wire types (spec §5.2).
//!
//! A job names its image as `mountspecs`: content-addressed layer tarballs (`type: "tar"`,
//! `url` a `file://` path, `hashes.sha256`), stacked bottom first. `ActiveJob.status` is a
//! number on the wire as in Flynn (0 starting, 1 running, 2 done, 3 crashed, 4 failed).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A job as submitted with `PUT /host/jobs/:id`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    #[serde(default)]
    pub id: String,
    /// Image layers, bottom first.
    #[serde(default)]
    pub mountspecs: Vec<MountSpec>,
    /// Free-form metadata; `flynn-controller.app`, `flynn-controller.app_name`,
    /// `flynn-controller.release` and `flynn-controller.type` name the app, release and
    /// process type when the `FLYNN_*` env variables are not given.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    #[serde(default)]
    pub config: ContainerConfig,
    #[serde(default)]
    pub resurrect: bool,
    /// Flynn's job profiles (e.g. `kvm`, `zfs`: devices and mounts the job needs). Accepted
    /// and kept (shown by `GET /host/jobs/:id`); no profile changes how a job is run here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<String>,
}

impl Job {
    /// The app id: `FLYNN_APP_ID` env, else `flynn-controller.app` metadata.
    pub fn app_id(&self) -> Option<&str> {
        self.config
            .env
            .get("FLYNN_APP_ID")
            .or_else(|| self.metadata.get("flynn-controller.app"))
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    /// The process type: `FLYNN_PROCESS_TYPE` env, else `flynn-controller.type`.
    pub fn process_type(&self) -> Option<&str> {
        self.config
            .env
            .get("FLYNN_PROCESS_TYPE")
            .or_else(|| self.metadata.get("flynn-controller.type"))
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }
}

/// One image layer.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountSpec {
    /// `tar` (an uncompressed or gzipped layer tarball).
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// `file:///path/to/layer.tar`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// `{"sha256": "<hex>"}`: the layer's content address, checked on import.
    #[serde(default)]
    pub hashes: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
}

/// A resource limit (`limit`) and the amount asked for scheduling (`request`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<i64>,
}

/// Resource limits enforced with cgroups and rlimits (spec §5.4), except `temp_disk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Spec>,
    /// Milli-CPUs (1000 = one core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Spec>,
    /// Open file descriptors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_fd: Option<Spec>,
    /// Processes (pids cgroup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_procs: Option<Spec>,
    /// Bytes of scratch disk (the container's writable layer). Accepted and kept, not
    /// enforced: the writable layer is a directory on the host's file system, without a quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temp_disk: Option<Spec>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerConfig {
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default)]
    pub ports: Vec<Port>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    /// Run in the host's network namespace (no IP, no veth).
    #[serde(default)]
    pub host_network: bool,
    /// Do not ship the job's output to the log aggregator.
    #[serde(default)]
    pub disable_log: bool,
    /// The job's stdin is a pipe that attached clients write to (`POST /attach` with the
    /// stdin flag); it stays open until a client closes it, so a job reading it waits for
    /// one. Without it the job's stdin is `/dev/null`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
    /// Run the job on a terminal: a pseudo-terminal is its stdin, stdout and stderr (its
    /// controlling terminal, in a session of its own). Implies `stdin` (attach with the stdin
    /// flag writes to the terminal; an empty stdin frame sends ^D); attached clients get its
    /// output raw as stdout and set its size (`height`/`width`, resize frames). Container
    /// runtime only (the process runtime refuses it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tty: bool,
    /// Seconds between SIGTERM and SIGKILL when the job is stopped (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<u64>,
    /// Host volumes (`POST /storage/providers/default/volumes`) bind-mounted into the job.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeBinding>,
    /// User id the job runs as (root when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Group id the job runs as (0 when unset, as in Flynn and Docker); no supplementary
    /// groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Capabilities (`CAP_*` names) instead of the default set, held by the job whatever its
    /// user. Without it, a job running as a user other than root holds none (the default set
    /// is only its bound), as under Docker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linux_capabilities: Option<Vec<String>>,
}

/// A volume of this host mounted into a job. A volume is used by one starting or
/// running job at a time.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeBinding {
    /// Path in the container.
    pub target: String,
    /// The volume's id.
    pub volume: String,
    /// Mounted read-write (read-only otherwise).
    #[serde(default)]
    pub writeable: bool,
    /// Delete the volume (its data too) when the job ends.
    #[serde(default)]
    pub delete_on_stop: bool,
}

/// A host volume: a directory on the host kept across jobs (spec §5.3 storage API;
/// Flynn's `volume.Info`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Volume {
    pub id: String,
    /// Always `data` (a directory volume).
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host_id: String,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub created_at: String,
}

/// `POST /storage/providers/:provider/volumes` body (may be empty).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreate {
    /// A client-chosen id (a UUID); a new random UUID when empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// Empty or `data`.
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// Accepted and ignored (never sent): Go clients post a whole `volume.Info`, whose
    /// `created_at` is always there (`"0001-01-01T00:00:00Z"` when unset). The host sets
    /// the volume's own.
    #[serde(default, skip_serializing)]
    pub created_at: String,
}

/// A bind mount from the host into the container.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// Path on the host.
    pub location: String,
    /// Path in the container.
    pub target: String,
    #[serde(default)]
    pub writeable: bool,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Port {
    /// 0 means "assign 5000 + index" (spec §0.4).
    #[serde(default)]
    pub port: u16,
    /// `tcp` or `udp`.
    #[serde(default = "tcp")]
    pub proto: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Service>,
}

fn tcp() -> String {
    "tcp".into()
}

/// Register the job's `IP:PORT` in discoverd under `name` while it runs.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    /// Create the service in discoverd first.
    #[serde(default)]
    pub create: bool,
    /// A health check for the instance. Accepted and kept (shown by `GET /host/jobs/:id`),
    /// not run: the instance is registered while the job runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<HealthCheck>,
}

/// A service instance's health check (Flynn's `host.HealthCheck`); durations are
/// nanoseconds, as Go encodes a `time.Duration`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// `tcp` or `http`.
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<i64>,
    /// Consecutive results needed to change state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<i64>,
    /// Stop the job when the check goes down.
    #[serde(default)]
    pub kill_down: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timeout: Option<i64>,
    /// HTTP checks: the request path, `Host` header, a body pattern and the wanted status.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    #[serde(rename = "match", default, skip_serializing_if = "String::is_empty")]
    pub pattern: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<i64>,
}

/// Job status; a number on the wire (spec §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum JobStatus {
    #[default]
    Starting,
    Running,
    /// Exited 0, or stopped on request.
    Done,
    /// Exited non-zero (or by a signal) without being asked to stop.
    Crashed,
    /// Could not be started; `error` says why.
    Failed,
}

impl JobStatus {
    pub const fn code(self) -> u8 {
        match self {
            JobStatus::Starting => 0,
            JobStatus::Running => 1,
            JobStatus::Done => 2,
            JobStatus::Crashed => 3,
            JobStatus::Failed => 4,
        }
    }

    pub const fn from_code(c: u8) -> Option<JobStatus> {
        Some(match c {
            0 => JobStatus::Starting,
            1 => JobStatus::Running,
            2 => JobStatus::Done,
            3 => JobStatus::Crashed,
            4 => JobStatus::Failed,
            _ => return None,
        })
    }

    /// Done, crashed or failed: the job will not run again.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Done | JobStatus::Crashed | JobStatus::Failed
        )
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            JobStatus::Starting => "starting",
            JobStatus::Running => "running",
            JobStatus::Done => "done",
            JobStatus::Crashed => "crashed",
            JobStatus::Failed => "failed",
        }
    }
}

impl Serialize for JobStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.code())
    }
}

impl<'de> Deserialize<'de> for JobStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let c = u8::deserialize(d)?;
        JobStatus::from_code(c)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown job status {c}")))
    }
}

/// A job as the host tracks it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ActiveJob {
    pub job: Job,
    pub host_id: String,
    /// The container's IP (empty with `host_network`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub internal_ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default)]
    pub force_stop: bool,
    pub status: JobStatus,
    /// RFC 3339 times.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub created_at: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub started_at: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ended_at: String,
    /// Exit code; 128 + signal when killed by a signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// The terminating signal, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// A process of the job was OOM-killed (the job may still have exited 0 and be done).
    #[serde(default)]
    pub oom_killed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Create,
    Start,
    Stop,
    Error,
    Cleanup,
}

/// One job event (SSE on `GET /host/jobs` and `GET /host/jobs/:id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event: EventKind,
    pub job_id: String,
    pub job: ActiveJob,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DiscoverdInfo {
    /// The job that runs this discoverd (from its `POST /host/discoverd`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub job_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// discoverd's DNS address (`ip:port`), when it announced one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dns: String,
}

/// `POST /host/discoverd`: a discoverd node tells its host where it listens.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DiscoverdNotify {
    #[serde(default)]
    pub job_id: String,
    pub url: String,
    #[serde(default)]
    pub dns: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NetworkInfo {
    /// The job that configured the network (the overlay agent's, from its
    /// `POST /host/network`); empty for a block given by flag.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub job_id: String,
    /// The host's job block, e.g. `100.100.0.0/24`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subnet: String,
    #[serde(default)]
    pub mtu: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bridge: String,
    /// Upstream nameservers the overlay agent reported (discoverd's `--wait-net-dns`
    /// takes them as its recursors).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resolvers: Vec<String>,
}

/// `POST /host/network`: the overlay agent (flannel's role) tells the host its block.
/// `subnet` is the block's first host address with the prefix length
/// (`100.100.3.1/24`): the bridge takes that address.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NetworkConfig {
    #[serde(default)]
    pub job_id: String,
    pub subnet: String,
    /// 0 = the host's `--mtu`.
    #[serde(default)]
    pub mtu: u32,
    #[serde(default)]
    pub resolvers: Vec<String>,
}

/// Log shipping counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LogStats {
    /// Lines accepted from jobs.
    pub lines: u64,
    /// Lines written to the aggregator.
    pub shipped: u64,
    /// Lines lost: dropped from the full buffer while the aggregator was unreachable and
    /// not in the host's disk log any more (or it is off), or lost in the job's pipe.
    pub dropped: u64,
    /// Lines waiting in the buffer now.
    pub buffered: u64,
    pub connected: bool,
    /// Lines the full buffer dropped that were (or will be) sent again from the host's
    /// disk log.
    #[serde(default)]
    pub requeued: u64,
}

/// `GET /host/status`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HostStatus {
    pub id: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub pid: u32,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discoverd: Option<DiscoverdInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkInfo>,
    pub version: String,
    #[serde(default)]
    pub log: LogStats,
    /// Jobs by status name.
    #[serde(default)]
    pub jobs: BTreeMap<String, u64>,
}

/// A port asked for by `POST /host/resource-check`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CheckPort {
    pub port: u16,
    #[serde(default = "tcp")]
    pub proto: String,
}

/// `POST /host/resource-check` body; 409 conflict with `detail.ports` when any is in use.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceCheck {
    #[serde(default)]
    pub ports: Vec<CheckPort>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_a_number() {
        for c in 0..=4u8 {
            let s = JobStatus::from_code(c).unwrap();
            assert_eq!(serde_json::to_string(&s).unwrap(), c.to_string());
            let back: JobStatus = serde_json::from_str(&c.to_string()).unwrap();
            assert_eq!(back, s);
        }
        assert!(serde_json::from_str::<JobStatus>("5").is_err());
    }

    #[test]
    fn job_round_trip_and_defaults() {
        let j: Job = serde_json::from_str(
            r#"{"id":"h-1","mountspecs":[{"type":"tar","url":"file:///l.tar","hashes":{"sha256":"ab"}}],
                "config":{"args":["sh"],"ports":[{"port":0,"service":{"name":"web"}}]}}"#,
        )
        .unwrap();
        assert_eq!(j.config.ports[0].proto, "tcp");
        assert_eq!(j.config.ports[0].service.as_ref().unwrap().name, "web");
        let back: Job = serde_json::from_value(serde_json::to_value(&j).unwrap()).unwrap();
        assert_eq!(back, j);
    }

    #[test]
    fn volumes_default_and_round_trip() {
        // Jobs written before volumes existed still parse.
        let j: Job = serde_json::from_str(r#"{"config":{"args":["sh"]}}"#).unwrap();
        assert!(j.config.volumes.is_empty());
        assert!(!serde_json::to_string(&j).unwrap().contains("volumes"));
        let j: Job = serde_json::from_str(
            r#"{"config":{"args":["sh"],"volumes":[{"target":"/data","volume":"v1","writeable":true}]}}"#,
        )
        .unwrap();
        assert_eq!(
            j.config.volumes,
            [VolumeBinding {
                target: "/data".into(),
                volume: "v1".into(),
                writeable: true,
                delete_on_stop: false
            }]
        );
        let back: Job = serde_json::from_value(serde_json::to_value(&j).unwrap()).unwrap();
        assert_eq!(back, j);
        let v: Volume = serde_json::from_str(
            r#"{"id":"a","type":"data","meta":{"k":"v"},"created_at":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!((v.kind.as_str(), v.meta["k"].as_str()), ("data", "v"));
        let c: VolumeCreate = serde_json::from_str("{}").unwrap();
        assert_eq!(c, VolumeCreate::default());
        assert!(serde_json::from_str::<VolumeCreate>(r#"{"size":1}"#).is_err());
    }

    /// What Go's `volume.Info` sends as a create body: its `created_at` (the zero time when
    /// unset) is accepted, and not sent on.
    #[test]
    fn a_go_volume_info_is_a_valid_create_body() {
        let c: VolumeCreate = serde_json::from_str(
            r#"{"id":"0b7e7d3c-6b55-4d6f-9d77-0a1c2b3d4e5f","type":"data","meta":{"k":"v"},"created_at":"0001-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(
            (c.id.as_str(), c.kind.as_str(), c.meta["k"].as_str()),
            ("0b7e7d3c-6b55-4d6f-9d77-0a1c2b3d4e5f", "data", "v")
        );
        assert!(!serde_json::to_string(&c).unwrap().contains("created_at"));
    }

    #[test]
    fn spec_fields_are_accepted_and_kept() {
        let text = r#"{"id":"h-1","mountspecs":[],"metadata":{},
            "resources":{"memory":{"limit":1048576},"temp_disk":{"limit":104857600,"request":1}},
            "config":{"args":["sh"],"env":{},"mounts":[],"ports":[{"port":80,"proto":"tcp",
              "service":{"name":"web","create":true,"check":{"type":"http","interval":1000000000,
                "threshold":2,"kill_down":true,"start_timeout":30000000000,"path":"/ping",
                "host":"example.com","match":"ok","status":200}}}],
              "host_network":false,"disable_log":false},
            "resurrect":false,"profiles":["zfs"]}"#;
        let j: Job = serde_json::from_str(text).unwrap();
        assert_eq!(j.resources.temp_disk.unwrap().limit, Some(104_857_600));
        assert_eq!(j.profiles, ["zfs"]);
        let check = j.config.ports[0].service.as_ref().unwrap().check.clone();
        assert_eq!(
            check,
            Some(HealthCheck {
                kind: "http".into(),
                interval: Some(1_000_000_000),
                threshold: Some(2),
                kill_down: true,
                start_timeout: Some(30_000_000_000),
                path: "/ping".into(),
                host: "example.com".into(),
                pattern: "ok".into(),
                status: Some(200),
            })
        );
        // Written back as received.
        let want: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_value(&j).unwrap(), want);
        assert!(serde_json::from_str::<Job>(
            r#"{"config":{"ports":[{"service":{"name":"w","check":{"nope":1}}}]}}"#
        )
        .is_err());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(serde_json::from_str::<Job>(r#"{"id":"x","nope":1}"#).is_err());
        assert!(serde_json::from_str::<Job>(r#"{"config":{"argz":[]}}"#).is_err());
    }

    #[test]
    fn app_and_type_from_env_or_metadata() {
        let mut j = Job::default();
        j.metadata
            .insert("flynn-controller.app".into(), "meta-app".into());
        assert_eq!(j.app_id(), Some("meta-app"));
        j.config.env.insert("FLYNN_APP_ID".into(), "env-app".into());
        assert_eq!(j.app_id(), Some("env-app"));
        assert_eq!(j.process_type(), None);
    }
}
