//! Job start latency: flynn-container's shim vs Debian's `runc run` on the same OCI bundle.
//!
//!     cargo run --release -p flynn-container --example start_latency -- [ROUNDS]
//!
//! Root only. Each round runs `echo hello` in the busybox image once per variant, interleaved (the
//! order rotates every round): `shim` (Shim::spawn → events, new netns), `shim+netns` (the same
//! joining a pre-created netns), `runc` (`runc run` with the config.json the shim writes for the
//! same job, on a pre-mounted overlay root, so runc's numbers leave out the overlay mount the
//! shim does itself). Reported: time to the first output line (the process runs) and to the exit
//! being reported (container deleted: the shim deletes before it sends `Exited`, `runc run`
//! deletes before it exits), as median and p90 over the rounds; then the resident memory of the
//! per-job helper while a job runs (the shim vs the foreground `runc run` process).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use flynn_container::{ContainerSpec, ImageStore, Resources, Shim, ShimEvent};

/// This program is its own shim (as flynn-host is): `<exe> --flynn-shim <state> <id>`.
fn shim_program() -> PathBuf {
    std::env::current_exe().expect("current exe")
}

struct Sample {
    first_line: Duration,
    exited: Duration,
}

fn spec(id: &str, layer: &Path, args: &[&str]) -> ContainerSpec {
    ContainerSpec {
        id: id.into(),
        layers: vec![layer.to_path_buf()],
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        cwd: String::new(),
        hostname: None,
        netns: None,
        host_network: false,
        mounts: vec![],
        resources: Resources::default(),
        cgroup_parent: "flynn-perf".into(),
        uid: 0,
        gid: 0,
        capabilities: None,
        stdin: false,
        tty: false,
        tty_size: None,
    }
}

async fn run_shim(state: &Path, spec: &ContainerSpec) -> Result<Sample> {
    let t0 = Instant::now();
    let mut conn = Shim::spawn(&shim_program(), &[], state, spec).await?;
    let mut first_line = None;
    let exited = loop {
        match tokio::time::timeout(Duration::from_secs(20), conn.next_event()).await?? {
            Some(ShimEvent::Output { line, .. }) => {
                ensure!(line == b"hello", "unexpected output");
                first_line.get_or_insert(t0.elapsed());
            }
            Some(ShimEvent::Exited { code: Some(0), .. }) => break t0.elapsed(),
            Some(ShimEvent::Started { .. }) => {}
            other => bail!("unexpected event {other:?}"),
        }
    };
    drop(conn);
    Shim::cleanup(state, &spec.id)?;
    Ok(Sample {
        first_line: first_line.context("no output")?,
        exited,
    })
}

fn run_runc(root: &Path, bundle: &Path, id: &str) -> Result<Sample> {
    let t0 = Instant::now();
    let mut child = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("running runc")?;
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line)?;
    let first_line = t0.elapsed();
    ensure!(line.trim_end() == "hello", "runc printed {line:?}");
    let status = child.wait()?;
    let exited = t0.elapsed();
    ensure!(status.success(), "runc run: {status}");
    Ok(Sample { first_line, exited })
}

fn sh(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("{cmd:?}"))?;
    ensure!(st.success(), "{cmd:?}: {st}");
    Ok(())
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn main() -> Result<()> {
    // The shim must start single-threaded: dispatch before any runtime exists.
    if std::env::args().any(|a| a == flynn_container::SHIM_ARG) {
        flynn_container::shim_main();
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> Result<()> {
    let rounds: usize = std::env::args().nth(1).map_or(Ok(30), |a| a.parse())?;
    // SAFETY: geteuid has no preconditions.
    ensure!(unsafe { libc::geteuid() } == 0, "run as root");
    let pid = std::process::id();
    let base = PathBuf::from(format!("/tmp/flynn-start-latency-{pid}"));
    std::fs::create_dir_all(&base)?;
    let result = bench(&base, rounds, pid).await;
    let _ = Command::new("umount")
        .arg(base.join("runc-bundle/rootfs"))
        .status();
    let _ = Command::new("ip")
        .args(["netns", "del", &format!("fperf-{pid}")])
        .status();
    let _ = std::fs::remove_dir_all(&base);
    for ctrl in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
        let _ = std::fs::remove_dir(ctrl.path().join("flynn-perf"));
    }
    let _ = std::fs::remove_dir("/sys/fs/cgroup/flynn-perf");
    result
}

async fn bench(base: &Path, rounds: usize, pid: u32) -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/build-busybox.sh");
    sh(Command::new("sh").arg(script).arg(base.join("busybox.tar")))?;
    let store = ImageStore::open(&base.join("images"))?;
    let layer = store.import_tar(&base.join("busybox.tar"), None)?.path;
    let state = base.join("state");

    // runc's bundle: the same config the shim writes, on an overlay mounted once up front.
    let bundle = base.join("runc-bundle");
    for d in ["rootfs", "upper", "work"] {
        std::fs::create_dir_all(bundle.join(d))?;
    }
    sh(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            layer.display(),
            bundle.join("upper").display(),
            bundle.join("work").display()
        ))
        .arg(bundle.join("rootfs")))?;
    let runc_root = base.join("runc-root");
    let netns = format!("fperf-{pid}");
    sh(Command::new("ip").args(["netns", "add", &netns]))?;

    let names = ["shim", "shim+netns", "runc"];
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(), Vec::new(), Vec::new()];
    // One warm-up round, not counted.
    for round in 0..=rounds {
        for k in 0..names.len() {
            let v = (round + k) % names.len();
            let id = format!("perf-{pid}-{round}-{v}");
            let s = match v {
                0 => run_shim(&state, &spec(&id, &layer, &["echo", "hello"])).await?,
                1 => {
                    let mut sp = spec(&id, &layer, &["echo", "hello"]);
                    sp.netns = Some(PathBuf::from("/run/netns").join(&netns));
                    run_shim(&state, &sp).await?
                }
                _ => {
                    let config =
                        spec(&id, &layer, &["echo", "hello"]).oci_config(&bundle.join("rootfs"));
                    std::fs::write(bundle.join("config.json"), serde_json::to_vec(&config)?)?;
                    run_runc(&runc_root, &bundle, &id)?
                }
            };
            if round > 0 {
                samples[v].push(s);
            }
        }
    }

    println!("rounds: {rounds} (interleaved, order rotating), echo hello in busybox");
    println!(
        "{:<12} {:>14} {:>14} {:>14} {:>14}",
        "variant", "first line p50", "p90", "exited p50", "p90"
    );
    let mut p50s = Vec::new();
    for (name, s) in names.iter().zip(&samples) {
        let mut first: Vec<Duration> = s.iter().map(|x| x.first_line).collect();
        let mut exit: Vec<Duration> = s.iter().map(|x| x.exited).collect();
        let (f50, f90, e50, e90) = (
            pct(&mut first, 0.5),
            pct(&mut first, 0.9),
            pct(&mut exit, 0.5),
            pct(&mut exit, 0.9),
        );
        p50s.push((f50, e50));
        println!(
            "{name:<12} {:>11.1} ms {:>11.1} ms {:>11.1} ms {:>11.1} ms",
            f50.as_secs_f64() * 1e3,
            f90.as_secs_f64() * 1e3,
            e50.as_secs_f64() * 1e3,
            e90.as_secs_f64() * 1e3
        );
    }
    let runc = p50s[2];
    for (i, name) in names[..2].iter().enumerate() {
        println!(
            "{name} ÷ runc (median): first line {:.2}, exited {:.2}",
            p50s[i].0.as_secs_f64() / runc.0.as_secs_f64(),
            p50s[i].1.as_secs_f64() / runc.1.as_secs_f64()
        );
    }

    // Memory of the per-job helper while a job runs.
    let sp = spec(&format!("perf-{pid}-rss"), &layer, &["sleep", "30"]);
    let mut conn = Shim::spawn(&shim_program(), &[], &state, &sp).await?;
    let _ = conn.next_event().await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let shim_pid: u32 = std::fs::read_to_string(state.join(&sp.id).join("shim.pid"))?
        .trim()
        .parse()?;
    let shim_rss = rss_kib(shim_pid);
    drop(conn);
    Shim::cleanup(&state, &sp.id)?;
    let config = spec(&format!("perf-{pid}-rss"), &layer, &["sleep", "30"])
        .oci_config(&bundle.join("rootfs"));
    std::fs::write(bundle.join("config.json"), serde_json::to_vec(&config)?)?;
    let mut runc = Command::new("runc")
        .arg("--root")
        .arg(&runc_root)
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(format!("perf-{pid}-rss"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let runc_rss = rss_kib(runc.id());
    let _ = Command::new("runc")
        .arg("--root")
        .arg(&runc_root)
        .args(["kill", &format!("perf-{pid}-rss"), "KILL"])
        .status();
    let _ = runc.wait();
    println!(
        "per-job helper RSS while the job runs: shim {} KiB, runc run {} KiB",
        shim_rss.map_or("?".into(), |v| v.to_string()),
        runc_rss.map_or("?".into(), |v| v.to_string())
    );
    Ok(())
}
