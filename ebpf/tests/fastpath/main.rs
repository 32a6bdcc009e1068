//! The fast path on a real kernel: hosts and jobs as network namespaces the tests create (with
//! `ip`, tests only), the loader running in the host namespace, pins on a private BPF filesystem.
//! Needs root; fails loudly when the kernel cannot run the fast path unless
//! `FLYNN_SKIP_NETNS_TESTS=1`.

mod lab;

use anyhow::{ensure, Context, Result};
use aya::programs::{SchedClassifier, TcAttachType};
use flynn_ebpf::{Counters, Endpoint, FastPath, Role};
use lab::{ifindex, in_ns, mac, ping, ping_count, tcp_roundtrip, Bpffs, Job, Lab};

const MTU: u32 = 1450;

fn endpoint(host: &str, job: &Job) -> Result<Endpoint> {
    Ok(Endpoint {
        ifindex: ifindex(host, &job.port)?,
        mac: mac(&job.ns, "eth0")?,
        gateway_mac: mac(host, "flbr")?,
    })
}

fn counters(fp: &FastPath) -> Result<Counters> {
    Ok(fp.counters()?)
}

/// IDs of the TCX ingress programs on `dev` in `ns`.
fn tcx_programs(ns: &str, dev: &str) -> Result<Vec<u32>> {
    let dev = dev.to_string();
    in_ns(ns, move || {
        let (_, progs) = SchedClassifier::query_tcx(&dev, TcAttachType::Ingress)?;
        Ok(progs.iter().map(|p| p.id()).collect())
    })
}

#[test]
fn same_host_redirect_peer_and_fallback() -> Result<()> {
    if !lab::should_run("same_host_redirect_peer_and_fallback") {
        return Ok(());
    }
    let bpffs = Bpffs::mount()?;
    let mut lab = Lab::new();
    let host = lab.add_host("h", "100.100.1.1")?;
    let j1 = lab.add_job("j1", &host, "vj1", "100.100.1.10", "100.100.1.1", MTU)?;
    let j2 = lab.add_job("j2", &host, "vj2", "100.100.1.11", "100.100.1.1", MTU)?;
    ensure!(ping(&j1.ns, j2.ip, 3), "kernel path: j1 cannot reach j2");

    let pin_dir = bpffs.pin_dir("flynn");
    let (mut fp, vj1, vj2) = in_ns(&host, || {
        let mut fp = FastPath::load(&pin_dir)?;
        let vj1 = ifindex(&host, "vj1")?;
        let vj2 = ifindex(&host, "vj2")?;
        fp.attach(vj1, Role::JobVeth)?;
        fp.attach(vj2, Role::JobVeth)?;
        Ok((fp, vj1, vj2))
    })?;
    ensure!(
        tcx_programs(&host, "vj1")?.len() == 1,
        "no TCX program on vj1"
    );
    let mut want = vec![(vj1, Role::JobVeth), (vj2, Role::JobVeth)];
    want.sort_by_key(|(i, _)| *i);
    ensure!(fp.attached()? == want, "attached: {:?}", fp.attached()?);

    // Empty maps: everything falls through to the kernel path.
    ensure!(
        ping_count(&j1.ns, j2.ip, 5) == 5,
        "empty maps broke traffic"
    );
    let c = counters(&fp)?;
    ensure!(
        c.redirected_local == 0 && c.redirected_remote == 0 && c.passed >= 10,
        "empty maps: {c:?}"
    );

    // Endpoints: same-host traffic is redirected in both directions.
    fp.upsert_endpoint(j1.ip, endpoint(&host, &j1)?)?;
    fp.upsert_endpoint(j2.ip, endpoint(&host, &j2)?)?;
    ensure!(
        fp.endpoint(j2.ip)? == Some(endpoint(&host, &j2)?),
        "endpoint readback"
    );
    let before = counters(&fp)?;
    ensure!(ping_count(&j1.ns, j2.ip, 10) == 10, "fast path: ping lost");
    let after = counters(&fp)?;
    ensure!(
        after.redirected_local >= before.redirected_local + 20,
        "requests and replies not redirected: {before:?} -> {after:?}"
    );
    tcp_roundtrip(&j1.ns, &j2.ns, j2.ip, 7001, 4 << 20).context("TCP over the fast path")?;
    let tcp = counters(&fp)?;
    ensure!(
        tcp.redirected_local > after.redirected_local + 50,
        "TCP not redirected: {after:?} -> {tcp:?}"
    );

    // Entries removed: back to the kernel path, which still works; local counter stands still.
    fp.remove_endpoint(j1.ip)?;
    fp.remove_endpoint(j2.ip)?;
    fp.remove_endpoint(j2.ip)?; // idempotent
    ensure!(fp.endpoint(j2.ip)?.is_none(), "endpoint still present");
    let before = counters(&fp)?;
    ensure!(
        ping_count(&j1.ns, j2.ip, 5) == 5,
        "kernel fallback: ping lost"
    );
    tcp_roundtrip(&j1.ns, &j2.ns, j2.ip, 7002, 1 << 20).context("TCP on the kernel path")?;
    let after = counters(&fp)?;
    ensure!(
        after.redirected_local == before.redirected_local && after.passed > before.passed,
        "after removal: {before:?} -> {after:?}"
    );

    // Detach and clean uninstall.
    in_ns(&host, || {
        fp.detach(vj1)?;
        fp.detach(vj1)?; // idempotent
        Ok(())
    })?;
    ensure!(
        tcx_programs(&host, "vj1")?.is_empty(),
        "vj1 still has a program"
    );
    ensure!(
        fp.attached()? == vec![(vj2, Role::JobVeth)],
        "attached after detach"
    );
    fp.unpin()?;
    ensure!(!pin_dir.exists(), "pin directory left behind");
    ensure!(
        tcx_programs(&host, "vj2")?.is_empty(),
        "unpin left vj2 attached"
    );
    ensure!(ping(&j1.ns, j2.ip, 3), "traffic after uninstall");
    Ok(())
}
