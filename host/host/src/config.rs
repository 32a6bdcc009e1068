//! flynn-host's one typed configuration: flags > environment > defaults, validated
//! before any socket is bound.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuntimeKind {
    /// Each job in its own container (namespaces, cgroups, image layers).
    Container,
    /// Jobs as plain host processes: no isolation, no image, no network of their own.
    Process,
}

#[derive(Debug, Clone, Parser)]
#[command(name = "flynn-host", version, about = "Flynn's per-machine job daemon")]
pub struct Config {
    /// Job API listen address.
    #[arg(long, env = "FLYNN_HOST_ADDR", default_value = "0.0.0.0:1113")]
    pub addr: SocketAddr,

    /// Host id (letters and digits; job ids are `<host id>-<uuid>`). Default: the one
    /// stored in the state directory, created at first start.
    #[arg(long, env = "FLYNN_HOST_ID")]
    pub id: Option<String>,

    /// Job state, allocations and container state live here.
    #[arg(long, env = "FLYNN_STATE_DIR", default_value = "/var/lib/flynn-host")]
    pub state_dir: PathBuf,

    /// Unpacked image layers (default: `<state-dir>/images`).
    #[arg(long, env = "FLYNN_IMAGE_DIR")]
    pub image_dir: Option<PathBuf>,

    /// Host volumes, one directory each (default: `<state-dir>/volumes`).
    #[arg(long, env = "FLYNN_VOLUME_DIR")]
    pub volume_dir: Option<PathBuf>,

    #[arg(long, env = "FLYNN_RUNTIME", value_enum, default_value = "container")]
    pub runtime: RuntimeKind,

    /// Log aggregator syslog address (`host:port`); repeatable: every line goes to every
    /// aggregator. Job output is not shipped without one.
    #[arg(long, env = "FLYNN_LOGAGG", value_delimiter = ',')]
    pub logagg: Vec<String>,

    /// Log aggregator HTTP API address (`host:port` or URL), one per `--logagg` in the same
    /// order. On each new connection the host asks it for its cursor and sends again what
    /// its disk log holds after it (spec §3.5). Without it (no default: the API's port is
    /// the aggregator's own setting) that resume is off, which is logged at start-up: only
    /// the last lines sent before a connection broke, and lines the buffer dropped, are sent
    /// again; an aggregator restarted empty does not get the host's older lines back.
    #[arg(long, env = "FLYNN_LOGAGG_API", value_delimiter = ',')]
    pub logagg_api: Vec<String>,

    /// Bytes of job output kept on disk (`<state-dir>/logs`) for resending to aggregators
    /// after their cursor; 0 keeps none.
    #[arg(long, env = "FLYNN_LOG_DISK_BYTES", default_value_t = 64 << 20)]
    pub log_disk_bytes: u64,

    /// Lines buffered (per aggregator) while the log aggregator is unreachable; beyond it
    /// the oldest lines of the app holding the most are dropped and counted.
    #[arg(long, env = "FLYNN_LOG_BUFFER", default_value_t = 10_000)]
    pub log_buffer: usize,

    /// Bytes of lines buffered (per aggregator) while the log aggregator is unreachable;
    /// beyond it the oldest lines of the app holding the most bytes are dropped and counted.
    /// At least 65536.
    #[arg(long, env = "FLYNN_LOG_BUFFER_BYTES", default_value_t = crate::logship::DEFAULT_BUFFER_BYTES)]
    pub log_buffer_bytes: usize,

    /// discoverd URL (`http://host:1111`) for job service registration.
    #[arg(long, env = "DISCOVERD")]
    pub discoverd: Option<String>,

    /// The address of jobs without their own network (host network or process runtime).
    #[arg(long, env = "FLYNN_EXTERNAL_IP", default_value = "127.0.0.1")]
    pub external_ip: IpAddr,

    /// Nameserver for the `/etc/resolv.conf` of jobs with their own network (repeatable;
    /// e.g. discoverd's DNS on the bridge address). Without it the image's file is kept.
    #[arg(long = "resolver", env = "FLYNN_RESOLVERS", value_delimiter = ',')]
    pub resolvers: Vec<IpAddr>,

    /// Bridge the jobs' veths join.
    #[arg(long, env = "FLYNN_BRIDGE_NAME", default_value = "flynnbr0")]
    pub bridge_name: String,

    /// This host's job address block; the bridge takes its first address. Not used with
    /// `--network-from-agent`.
    #[arg(long, env = "FLYNN_BLOCK", default_value = "100.100.0.0/24")]
    pub block: String,

    /// Take the job block from the overlay agent (`POST /host/network`, flannel's notify)
    /// instead of `--block`: jobs with a network of their own wait for it (up to 60 s).
    /// The last one received is kept in `network.json` and applied again at start-up.
    #[arg(long, env = "FLYNN_NETWORK_FROM_AGENT")]
    pub network_from_agent: bool,

    /// Job cgroups are `<cgroup-parent>/<job id>` under every controller.
    #[arg(long, env = "FLYNN_CGROUP_PARENT", default_value = "flynn")]
    pub cgroup_parent: String,

    #[arg(long, env = "FLYNN_MTU", default_value_t = 1500)]
    pub mtu: u32,

    /// Jobs allowed to be starting at once; further `PUT /host/jobs/:id` get 429 with
    /// `retry: true` (0 = no limit).
    #[arg(long, env = "FLYNN_MAX_JOB_CONCURRENCY", default_value_t = 0)]
    pub max_job_concurrency: usize,

    /// Jobs share the host's network namespace (no bridge, no per-job address).
    #[arg(long, env = "FLYNN_NO_NETWORK")]
    pub no_network: bool,

    /// The overlay's eBPF fast path for jobs (`auto`: each job's veth gets the job program
    /// and an endpoint entry whenever the overlay agent has the fast path set up in
    /// `--bpf-pin-dir`; `off`: never).
    #[arg(long, env = "FLYNN_FAST_PATH", default_value = "auto", value_parser = ["auto", "off"])]
    pub fast_path: String,

    /// Where the overlay agent pins the fast path's maps and programs.
    #[arg(long, env = "FLYNN_BPF_PIN_DIR", default_value = flynn_ebpf::DEFAULT_PIN_DIR)]
    pub bpf_pin_dir: PathBuf,

    /// Network namespaces (with veth and address) kept ready for starting jobs (0 = made
    /// on each job's start path).
    #[arg(long, env = "FLYNN_NETNS_POOL", default_value_t = 2)]
    pub netns_pool: usize,

    /// Do not keep a spare shim ready for the next job (each job then waits for its shim's
    /// exec and start-up).
    #[arg(long, env = "FLYNN_NO_SPARE_SHIM")]
    pub no_spare_shim: bool,

    /// TEST ONLY: exit right after a job's end is recorded and announced, before its
    /// network is torn down, as a crash in that window would.
    #[arg(long, hide = true)]
    pub fault_exit_before_teardown: bool,

    /// TEST ONLY: milliseconds taken over each job output line, so lines queue up inside
    /// the daemon (what a restart must not lose).
    #[arg(long, hide = true, default_value_t = 0)]
    pub fault_slow_output_ms: u64,

    /// TEST ONLY: milliseconds an attach client waits for its job to be created (at least
    /// [`MIN_ATTACH_WAIT_MS`]).
    #[arg(long, hide = true, default_value_t = crate::attach::PENDING_WAIT.as_millis() as u64)]
    pub attach_wait_ms: u64,

    /// TEST ONLY: milliseconds one frame to an attach client may take (at least
    /// [`MIN_ATTACH_WRITE_TIMEOUT_MS`]).
    #[arg(long, hide = true, default_value_t = crate::attach::WRITE_TIMEOUT.as_millis() as u64)]
    pub attach_write_timeout_ms: u64,

    /// Host tags, `key=value`; repeatable or comma separated.
    #[arg(long = "tag", env = "FLYNN_TAGS", value_delimiter = ',')]
    pub tags: Vec<String>,
}

/// The least `--attach-wait-ms`.
pub const MIN_ATTACH_WAIT_MS: u64 = 100;
/// The least `--attach-write-timeout-ms` (less, and a client on a busy host is dropped for
/// the scheduling delay of one write).
pub const MIN_ATTACH_WRITE_TIMEOUT_MS: u64 = 500;

impl Config {
    /// The time limits of attach connections.
    pub fn attach_limits(&self) -> crate::attach::Limits {
        crate::attach::Limits {
            wait: std::time::Duration::from_millis(self.attach_wait_ms),
            write: std::time::Duration::from_millis(self.attach_write_timeout_ms),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if let Some(id) = &self.id {
            if !valid_host_id(id) {
                return Err(format!("--id {id:?}: must be 1-27 letters or digits (job ids `<host id>-<uuid>` stay within 64)"));
            }
        }
        if !self.logagg_api.is_empty() && self.logagg_api.len() != self.logagg.len() {
            return Err(format!(
                "--logagg-api: {} given for {} --logagg address(es); give one per --logagg, in the same order",
                self.logagg_api.len(),
                self.logagg.len()
            ));
        }
        if self.log_buffer == 0 {
            return Err("--log-buffer must be at least 1".into());
        }
        if self.log_buffer_bytes < crate::logship::MIN_BUFFER_BYTES {
            return Err(format!(
                "--log-buffer-bytes must be at least {}",
                crate::logship::MIN_BUFFER_BYTES
            ));
        }
        if self.attach_wait_ms < MIN_ATTACH_WAIT_MS {
            return Err(format!(
                "--attach-wait-ms must be at least {MIN_ATTACH_WAIT_MS}"
            ));
        }
        if self.attach_write_timeout_ms < MIN_ATTACH_WRITE_TIMEOUT_MS {
            return Err(format!(
                "--attach-write-timeout-ms must be at least {MIN_ATTACH_WRITE_TIMEOUT_MS}"
            ));
        }
        if !(576..=65_535).contains(&self.mtu) {
            return Err("--mtu must be between 576 and 65535".into());
        }
        if self.bridge_name.is_empty() || self.bridge_name.len() > 15 {
            return Err("--bridge-name must be 1-15 characters".into());
        }
        self.tag_map()?;
        Ok(())
    }

    pub fn tag_map(&self) -> Result<BTreeMap<String, String>, String> {
        parse_tags(&self.tags)
    }
}

pub fn valid_host_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 27 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `k=v` pairs; a key without `=` gets an empty value.
pub fn parse_tags(tags: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for t in tags.iter().filter(|t| !t.is_empty()) {
        let (k, v) = t.split_once('=').unwrap_or((t.as_str(), ""));
        if k.is_empty() {
            return Err(format!("--tag {t:?}: empty key"));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("flynn-host").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_and_validation() {
        let c = parse(&[]);
        assert_eq!(c.addr.port(), 1113);
        assert_eq!(c.runtime, RuntimeKind::Container);
        assert!(c.validate().is_ok());
        assert!(parse(&["--id", "a-b"]).validate().is_err());
        assert!(parse(&["--id", &"a".repeat(27)]).validate().is_ok());
        assert!(parse(&["--id", &"a".repeat(28)]).validate().is_err());
        assert!(parse(&["--log-buffer", "0"]).validate().is_err());
        assert_eq!(c.log_buffer_bytes, 16 << 20);
        assert!(parse(&["--log-buffer-bytes", "65535"]).validate().is_err());
        assert!(parse(&["--log-buffer-bytes", "65536"]).validate().is_ok());
        assert!(parse(&["--bridge-name", "a-very-long-bridge-name"])
            .validate()
            .is_err());
        assert!(Config::try_parse_from(["flynn-host", "--runtime", "vm"]).is_err());
        // The attach time limits: 30 s by default, never 0 (every write would time out).
        assert_eq!(c.attach_limits(), crate::attach::Limits::default());
        assert!(parse(&["--attach-wait-ms", "0"]).validate().is_err());
        assert!(parse(&["--attach-write-timeout-ms", "0"])
            .validate()
            .is_err());
        assert!(parse(&["--attach-write-timeout-ms", "499"])
            .validate()
            .is_err());
        let c = parse(&[
            "--attach-wait-ms",
            "100",
            "--attach-write-timeout-ms",
            "500",
        ]);
        assert!(c.validate().is_ok());
        assert_eq!(
            c.attach_limits(),
            crate::attach::Limits {
                wait: std::time::Duration::from_millis(100),
                write: std::time::Duration::from_millis(500),
            }
        );
    }

    #[test]
    fn tags() {
        let c = parse(&["--tag", "a=1,b", "--tag", "c=x=y"]);
        let m = c.tag_map().unwrap();
        assert_eq!(m["a"], "1");
        assert_eq!(m["b"], "");
        assert_eq!(m["c"], "x=y");
        assert!(parse_tags(&["=v".into()]).is_err());
    }
}
