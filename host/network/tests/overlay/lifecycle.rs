//! The agent's life around the overlay: a shutdown while it is still starting, and the host
//! daemon told again when the overlay MTU changes.

use std::net::TcpListener;
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use super::{eventually, lab, live_leases, AgentProc, Cluster, Host};

/// The key of the live lease record naming `public_ip` in the `flannel` service meta, if
/// any (a released lease keeps its record, expired).
fn lease_of(c: &Cluster, public_ip: &str) -> Option<String> {
    live_leases(c)
        .ok()?
        .into_iter()
        .find(|(_, v)| v["PublicIP"] == public_ip)
        .map(|(k, _)| k)
}

/// A SIGTERM while start-up is still being retried (here: the public IP is on no interface
/// yet, so the agent has leased a block but finds no underlay device, for up to 30 s) makes a
/// clean exit that releases the lease. The handlers used to be installed only once started:
/// the signal killed the agent and the lease stayed live for its TTL (24 h by default).
#[test]
fn a_sigterm_during_start_up_releases_the_lease() -> Result<()> {
    if !lab::should_run("a_sigterm_during_start_up_releases_the_lease") {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    let h1 = c.add_host(1)?;
    let ip = "10.240.0.77";
    let host = Host {
        ns: c.hosts[h1].ns.clone(),
        ip: ip.into(),
        dir: c.hosts[h1].dir.clone(),
    };
    let (mut agent, _ready) = AgentProc::spawn(&host, &c.url(), &["--fast-path", "off"])?;
    eventually(20, "the starting agent's lease", || {
        Ok(lease_of(&c, ip).is_some())
    })?;
    eventually(10, "a failed start being retried", || {
        Ok(agent.log_text().contains("start failed; retrying"))
    })?;
    let key = lease_of(&c, ip).context("lease gone before the SIGTERM")?;
    agent.stop()?;
    ensure!(
        lease_of(&c, ip).is_none(),
        "lease {key} still held after a clean shutdown:\n{}",
        agent.log_text()
    );
    Ok(())
}

/// A stand-in for flynn-host at 10.240.0.254 in the underlay namespace: answers every
/// request 200 and hands over the bodies, for `secs`. Returns its port.
fn stand_in_host(c: &Cluster, secs: u64) -> Result<(u16, Receiver<serde_json::Value>)> {
    let listener =
        flynn_netlab::in_ns(&c.lab.ns("ul"), || Ok(TcpListener::bind("10.240.0.254:0")?))?;
    let port = listener.local_addr()?.port();
    listener.set_nonblocking(true)?;
    let (tx, rx) = channel();
    std::thread::spawn(move || -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            let s = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let (_, body) = crate::answer_notification(s)?;
            if tx.send(serde_json::from_slice(&body)?).is_err() {
                break;
            }
        }
        Ok(())
    });
    Ok((port, rx))
}

/// The underlay's MTU goes down: the VXLAN device follows it at the next resync, and the host
/// daemon is told the new overlay MTU (it used to hear only the first, so jobs' routes kept
/// the old, larger MTU).
#[test]
fn an_underlay_mtu_change_is_passed_on_to_the_host_daemon() -> Result<()> {
    if !lab::should_run("an_underlay_mtu_change_is_passed_on_to_the_host_daemon") {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    let h1 = c.add_host(1)?;
    let (port, notes) = stand_in_host(&c, 60)?;
    let notify = format!("http://10.240.0.254:{port}/host/network");
    let a1 = c.agent(h1, &["--fast-path", "off", "--notify", &notify])?;
    let subnet = format!("{}/24", a1.subnet.first_host());
    let first = notes.recv_timeout(Duration::from_secs(20))?;
    ensure!(
        first["mtu"] == 1450 && first["subnet"] == subnet.as_str(),
        "{first}"
    );

    let ns = &c.hosts[h1].ns;
    lab::run(&["ip", "-n", ns, "link", "set", "eth0", "mtu", "1400"])?;
    let second = notes
        .recv_timeout(Duration::from_secs(15))
        .with_context(|| format!("no second notification:\n{}", a1.log_text()))?;
    ensure!(
        second["mtu"] == 1350 && second["subnet"] == subnet.as_str(),
        "{second}"
    );
    let link = lab::run(&["ip", "-n", ns, "link", "show", "flynn.1"])?;
    let link = String::from_utf8_lossy(&link.stdout);
    ensure!(link.contains("mtu 1350 "), "{link}");
    let env = std::fs::read_to_string(c.hosts[h1].dir.join("state/subnet.env"))?;
    ensure!(env.contains("FLANNEL_MTU=1350"), "{env}");
    // Nothing more while the MTU stays.
    ensure!(
        notes.recv_timeout(Duration::from_secs(3)).is_err(),
        "notified again without a change"
    );
    Ok(())
}
