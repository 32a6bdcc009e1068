//! The agent holding the fast path is killed with SIGKILL while traffic flows: nothing detaches,
//! no ping is lost, and the restarted agent takes over the pinned state. The agent is this test
//! binary re-run as a child process (`agent_child`), so the kill is a real one.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use flynn_ebpf::{AttachMode, FastPath};

use crate::lab::{self, in_ns, ping_count, Job};
use crate::{counters, fast_path_on, programs_on, two_hosts, BLOCK1, BLOCK2};

const AGENT_ENV: &str = "FLYNN_EBPF_TEST_AGENT";
const READY: &str = "FASTPATH-AGENT-READY";

/// The agent process of the SIGKILL tests; does nothing unless started by them.
#[test]
#[ignore = "run as a child process by the sigkill tests"]
fn agent_child() -> Result<()> {
    let Ok(spec) = std::env::var(AGENT_ENV) else {
        return Ok(());
    };
    // mode|host|pin dir|job ns|job port|job ip|remote block
    let f: Vec<&str> = spec.split('|').collect();
    ensure!(f.len() == 7, "bad {AGENT_ENV}: {spec}");
    let mode = if f[0] == "netlink" {
        AttachMode::Netlink
    } else {
        AttachMode::Tcx
    };
    let job = Job {
        ns: f[3].to_string(),
        port: f[4].to_string(),
        ip: f[5].parse()?,
    };
    let _fp = fast_path_on(mode, f[1], Path::new(f[2]), &job, f[6].parse()?)?;
    println!("{READY}");
    std::io::stdout().flush()?;
    // Killed long before this ends.
    std::thread::sleep(Duration::from_secs(30));
    Ok(())
}

/// Kills the child on every exit path.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(spec: &str) -> Result<Agent> {
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "sigkill::agent_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(AGENT_ENV, spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start the agent child")?;
    let stdout = child.stdout.take().context("agent stdout")?;
    let agent = Agent(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.trim() == READY {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .context("the agent child did not get ready within 30 s")?;
    Ok(agent)
}

#[test]
fn sigkill_agent_keeps_traffic_then_restart_takes_over_tcx() -> Result<()> {
    sigkill_agent(AttachMode::Tcx)
}

#[test]
fn sigkill_agent_keeps_traffic_then_restart_takes_over_netlink() -> Result<()> {
    sigkill_agent(AttachMode::Netlink)
}

fn sigkill_agent(mode: AttachMode) -> Result<()> {
    if !lab::should_run(&format!("sigkill_agent {mode:?}")) {
        return Ok(());
    }
    let t = two_hosts()?;
    let fp2 = fast_path_on(mode, &t.h2, &t.pin2, &t.j2, BLOCK1)?;
    let pin1 = t.pin1.clone();
    let spec = format!(
        "{}|{}|{}|{}|{}|{}|{}",
        if mode == AttachMode::Netlink {
            "netlink"
        } else {
            "tcx"
        },
        t.h1,
        pin1.display(),
        t.j1.ns,
        t.j1.port,
        t.j1.ip,
        BLOCK2
    );
    let mut agent = start_agent(&spec)?;
    ensure!(ping_count(&t.j1.ns, t.j2.ip, 3) == 3, "with the agent up");

    const PINGS: u32 = 60;
    let (j1, ip2) = (t.j1.ns.clone(), t.j2.ip);
    let pinger = std::thread::spawn(move || ping_count(&j1, ip2, PINGS));
    std::thread::sleep(Duration::from_millis(500));
    agent.0.kill().context("SIGKILL the agent")?;
    agent.0.wait()?;
    std::thread::sleep(Duration::from_millis(300));
    for dev in ["vj1", "flvx"] {
        let progs = programs_on(mode, &t.h1, dev)?;
        ensure!(progs.len() == 1, "{dev} after SIGKILL: {progs:?}");
    }

    // The restarted agent takes over the pinned maps and attachments.
    let fp1 = in_ns(&t.h1, || Ok(FastPath::load_with(&pin1, mode)?))?;
    ensure!(
        !pinger.is_finished(),
        "the ping stream ended before the restart completed; the test proved nothing"
    );
    ensure!(
        fp1.endpoint(t.j1.ip)?.is_some() && fp1.attached()?.len() == 2,
        "restarted agent does not see the pinned state: {:?}",
        fp1.attached()?
    );
    let answered = pinger
        .join()
        .map_err(|_| anyhow::anyhow!("pinger panicked"))?;
    ensure!(
        answered == PINGS,
        "{answered}/{PINGS} pings answered across SIGKILL and restart"
    );
    let c = counters(&fp1)?;
    ensure!(
        c.redirected_remote >= u64::from(PINGS),
        "requests did not take the fast path: {c:?}"
    );
    in_ns(&t.h1, || Ok(fp1.unpin()?))?;
    in_ns(&t.h2, || Ok(fp2.unpin()?))?;
    Ok(())
}
