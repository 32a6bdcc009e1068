//! The fast path on a real kernel: hosts and jobs as network namespaces the tests create (with
//! `ip`, tests only), the loader running in the host namespace, pins on a private BPF filesystem.
//! Needs root; fails loudly when the kernel cannot run the fast path unless
//! `FLYNN_SKIP_NETNS_TESTS=1`.

mod decap;
mod lab;
mod sigkill;

use std::net::Ipv4Addr;

use anyhow::{ensure, Context, Result};
use aya::programs::{SchedClassifier, TcAttachType};
use flynn_ebpf::{AttachMode, Counters, Endpoint, FastPath, Hop, Role};
use lab::{
    ifindex, in_ns, mac, ping, ping_count, ping_df, ping_ttl, run, tcp_roundtrip, Bpffs, Job, Lab,
};

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

/// IDs of the BPF programs on tc ingress of `dev` in `ns`: TCX links, or cls_bpf filters as
/// `tc filter show` lists them.
fn programs_on(mode: AttachMode, ns: &str, dev: &str) -> Result<Vec<u32>> {
    if mode == AttachMode::Netlink {
        let out = lab::run(&["tc", "-n", ns, "filter", "show", "dev", dev, "ingress"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        return Ok(words
            .windows(2)
            .filter(|w| w[0] == "id")
            .filter_map(|w| w[1].parse().ok())
            .collect());
    }
    let dev = dev.to_string();
    in_ns(ns, move || {
        let (_, progs) = SchedClassifier::query_tcx(&dev, TcAttachType::Ingress)?;
        Ok(progs.iter().map(|p| p.id()).collect())
    })
}

#[test]
fn same_host_redirect_peer_and_fallback_tcx() -> Result<()> {
    same_host_redirect_peer_and_fallback(AttachMode::Tcx)
}

#[test]
fn same_host_redirect_peer_and_fallback_netlink() -> Result<()> {
    same_host_redirect_peer_and_fallback(AttachMode::Netlink)
}

fn same_host_redirect_peer_and_fallback(mode: AttachMode) -> Result<()> {
    if !lab::should_run(&format!("same_host_redirect_peer_and_fallback {mode:?}")) {
        return Ok(());
    }
    let bpffs = Bpffs::mount("flynn-bpffs")?;
    let mut lab = Lab::new();
    let host = lab.add_host("h", "100.100.1.1")?;
    let j1 = lab.add_job("j1", &host, "vj1", "100.100.1.10", "100.100.1.1", MTU)?;
    let j2 = lab.add_job("j2", &host, "vj2", "100.100.1.11", "100.100.1.1", MTU)?;
    ensure!(ping(&j1.ns, j2.ip, 3), "kernel path: j1 cannot reach j2");

    let pin_dir = bpffs.pin_dir("flynn");
    let (mut fp, vj1, vj2) = in_ns(&host, || {
        let mut fp = FastPath::load_with(&pin_dir, mode)?;
        let vj1 = ifindex(&host, "vj1")?;
        let vj2 = ifindex(&host, "vj2")?;
        fp.attach(vj1, Role::JobVeth)?;
        fp.attach(vj2, Role::JobVeth)?;
        Ok((fp, vj1, vj2))
    })?;
    ensure!(
        programs_on(mode, &host, "vj1")?.len() == 1,
        "no TCX program on vj1"
    );
    let mut want = vec![(vj1, Role::JobVeth), (vj2, Role::JobVeth)];
    want.sort_by_key(|(i, _)| *i);
    ensure!(fp.attached()? == want, "attached: {:?}", fp.attached()?);

    // Attaching again swaps in place; switching roles replaces; nothing piles up.
    in_ns(&host, || {
        fp.attach(vj1, Role::JobVeth)?;
        fp.attach(vj1, Role::Vxlan)?;
        ensure!(
            fp.attached()?.contains(&(vj1, Role::Vxlan)) && fp.attached()?.len() == 2,
            "role switch: {:?}",
            fp.attached()?
        );
        fp.attach(vj1, Role::JobVeth)?;
        Ok(())
    })?;
    ensure!(fp.attached()? == want, "attached: {:?}", fp.attached()?);
    let progs = programs_on(mode, &host, "vj1")?;
    ensure!(
        progs.len() == 1,
        "programs on vj1 after re-attach: {progs:?}"
    );

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
        programs_on(mode, &host, "vj1")?.is_empty(),
        "vj1 still has a program"
    );
    ensure!(
        fp.attached()? == vec![(vj2, Role::JobVeth)],
        "attached after detach"
    );
    in_ns(&host, || Ok(fp.unpin()?))?;
    ensure!(!pin_dir.exists(), "pin directory left behind");
    ensure!(
        programs_on(mode, &host, "vj2")?.is_empty(),
        "unpin left vj2 attached"
    );
    ensure!(ping(&j1.ns, j2.ip, 3), "traffic after uninstall");
    Ok(())
}

#[test]
fn later_tc_filters_still_run_tcx() -> Result<()> {
    later_tc_filters_still_run(AttachMode::Tcx)
}

#[test]
fn later_tc_filters_still_run_netlink() -> Result<()> {
    later_tc_filters_still_run(AttachMode::Netlink)
}

/// A packet the fast path does not handle goes on to what else is attached to the device: a
/// tc filter someone added after ours (here one that drops everything, built with clang as
/// the fast path is) still sees it. Returning `TC_ACT_OK` ended the chain at our program.
fn later_tc_filters_still_run(mode: AttachMode) -> Result<()> {
    if !lab::should_run(&format!("later_tc_filters_still_run {mode:?}")) {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("drop.bpf.c");
    let obj = dir.path().join("drop.o");
    std::fs::write(
        &src,
        "#include <linux/bpf.h>\n#include <linux/pkt_cls.h>\n#include <bpf/bpf_helpers.h>\n\
         SEC(\"classifier\") int drop_all(struct __sk_buff *skb) { return TC_ACT_SHOT; }\n\
         char _license[] SEC(\"license\") = \"GPL\";\n",
    )?;
    let multiarch = run(&["gcc", "-print-multiarch"])?;
    let include = format!(
        "-I/usr/include/{}",
        String::from_utf8_lossy(&multiarch.stdout).trim()
    );
    run(&[
        "clang",
        "-O2",
        "-target",
        "bpf",
        &include,
        "-c",
        src.to_str().unwrap(),
        "-o",
        obj.to_str().unwrap(),
    ])?;

    let bpffs = Bpffs::mount("flynn-bpffs")?;
    let mut lab = Lab::new();
    let host = lab.add_host("h", "100.100.1.1")?;
    let j1 = lab.add_job("j1", &host, "vj1", "100.100.1.10", "100.100.1.1", MTU)?;
    let j2 = lab.add_job("j2", &host, "vj2", "100.100.1.11", "100.100.1.1", MTU)?;
    let pin_dir = bpffs.pin_dir("flynn");
    let fp = in_ns(&host, || {
        let mut fp = FastPath::load_with(&pin_dir, mode)?;
        fp.attach(ifindex(&host, "vj1")?, Role::JobVeth)?;
        Ok(fp)
    })?;
    ensure!(ping(&j1.ns, j2.ip, 3), "empty maps broke traffic");
    // In netlink mode our filter made the clsact qdisc already.
    let _ = run(&[
        "ip", "netns", "exec", &host, "tc", "qdisc", "add", "dev", "vj1", "clsact",
    ]);
    run(&[
        "ip",
        "netns",
        "exec",
        &host,
        "tc",
        "filter",
        "add",
        "dev",
        "vj1",
        "ingress",
        "prio",
        "60000",
        "bpf",
        "obj",
        obj.to_str().unwrap(),
        "sec",
        "classifier",
        "da",
    ])?;
    let passed = counters(&fp)?.passed;
    ensure!(
        ping_count(&j1.ns, j2.ip, 3) == 0,
        "the later filter did not run: traffic still flows"
    );
    ensure!(
        counters(&fp)?.passed > passed,
        "our program did not run first"
    );
    run(&[
        "ip", "netns", "exec", &host, "tc", "filter", "del", "dev", "vj1", "ingress", "prio",
        "60000",
    ])?;
    ensure!(ping(&j1.ns, j2.ip, 3), "traffic after the filter went");
    in_ns(&host, || Ok(fp.unpin()?))?;
    Ok(())
}

/// Two hosts on an underlay, each with a VXLAN device, a bridge and one job; the kernel path
/// configured flannel-style (neighbour, FDB, route per remote block). Owns its namespaces and a
/// BPF filesystem with a pin directory per host; the namespaces go first on drop.
struct TwoHosts {
    lab: Lab,
    _bpffs: Bpffs,
    pin1: std::path::PathBuf,
    pin2: std::path::PathBuf,
    h1: String,
    h2: String,
    j1: Job,
    j2: Job,
    /// TTL of j2's reply to j1's ping on the kernel path (the BPF paths must match it).
    kernel_ttl: u8,
}

const VTEP1: &str = "0e:46:4c:01:00:00";
const VTEP2: &str = "0e:46:4c:02:00:00";

fn two_hosts() -> Result<TwoHosts> {
    let bpffs = Bpffs::mount("flynn-bpffs")?;
    let mut lab = Lab::new();
    let h1 = lab.add_host("h1", "100.100.1.1")?;
    let h2 = lab.add_host("h2", "100.100.2.1")?;
    lab.underlay(&h1, "10.231.0.1", &h2, "10.231.0.2")?;
    lab.vxlan(&h1, "10.231.0.1", "100.100.1.0", VTEP1)?;
    lab.vxlan(&h2, "10.231.0.2", "100.100.2.0", VTEP2)?;
    lab.peer(&h1, "100.100.2.0", VTEP2, "10.231.0.2")?;
    lab.peer(&h2, "100.100.1.0", VTEP1, "10.231.0.1")?;
    let j1 = lab.add_job("j1", &h1, "vj1", "100.100.1.10", "100.100.1.1", MTU)?;
    let j2 = lab.add_job("j2", &h2, "vj2", "100.100.2.10", "100.100.2.1", MTU)?;
    ensure!(ping(&j1.ns, j2.ip, 3), "kernel path: j1 cannot reach j2");
    let kernel_ttl = ping_ttl(&j1.ns, j2.ip).context("no reply on the kernel path")?;
    Ok(TwoHosts {
        lab,
        pin1: bpffs.pin_dir("h1"),
        pin2: bpffs.pin_dir("h2"),
        _bpffs: bpffs,
        h1,
        h2,
        j1,
        j2,
        kernel_ttl,
    })
}

/// Loads the fast path in `host`, attaches the job veth and the VXLAN device, and fills the maps:
/// the local job, and the remote block via the VXLAN device.
fn fast_path_on(
    mode: AttachMode,
    host: &str,
    pin_dir: &std::path::Path,
    job: &Job,
    remote_block: Ipv4Addr,
) -> Result<FastPath> {
    in_ns(host, || {
        let mut fp = FastPath::load_with(pin_dir, mode)?;
        let vx = ifindex(host, "flvx")?;
        fp.attach(ifindex(host, &job.port)?, Role::JobVeth)?;
        fp.attach(vx, Role::Vxlan)?;
        fp.upsert_endpoint(job.ip, endpoint(host, job)?)?;
        fp.upsert_prefix(
            remote_block,
            24,
            Hop {
                ifindex: vx,
                next_hop: remote_block,
            },
        )?;
        Ok(fp)
    })
}

/// Ten pings from `t.j1` to `t.j2`, all answered, with `moved(before, after)` holding for both
/// hosts' counters (`what` names the check), then a reply TTL equal to the kernel path's
/// (`t.kernel_ttl`: the BPF paths must decrement it like the routing hops they replace). Returns
/// the counters after the pings.
fn ping_across(
    t: &TwoHosts,
    (fp1, fp2): (&FastPath, &FastPath),
    what: &str,
    moved: impl Fn(&Counters, &Counters) -> bool,
) -> Result<(Counters, Counters)> {
    let (b1, b2) = (counters(fp1)?, counters(fp2)?);
    ensure!(ping_count(&t.j1.ns, t.j2.ip, 10) == 10, "{what}: ping lost");
    let (a1, a2) = (counters(fp1)?, counters(fp2)?);
    for (name, b, a) in [("h1", b1, a1), ("h2", b2, a2)] {
        ensure!(moved(&b, &a), "{what}: {name}: {b:?} -> {a:?}");
    }
    let ttl = ping_ttl(&t.j1.ns, t.j2.ip).with_context(|| format!("{what}: no reply"))?;
    ensure!(
        ttl == t.kernel_ttl,
        "{what}: reply TTL {ttl}, {} on the kernel path",
        t.kernel_ttl
    );
    Ok((a1, a2))
}

const BLOCK1: Ipv4Addr = Ipv4Addr::new(100, 100, 1, 0);
const BLOCK2: Ipv4Addr = Ipv4Addr::new(100, 100, 2, 0);

#[test]
fn cross_host_redirect_neigh_over_vxlan_tcx() -> Result<()> {
    cross_host_redirect_neigh_over_vxlan(AttachMode::Tcx)
}

#[test]
fn cross_host_redirect_neigh_over_vxlan_netlink() -> Result<()> {
    cross_host_redirect_neigh_over_vxlan(AttachMode::Netlink)
}

fn cross_host_redirect_neigh_over_vxlan(mode: AttachMode) -> Result<()> {
    if !lab::should_run(&format!("cross_host_redirect_neigh_over_vxlan {mode:?}")) {
        return Ok(());
    }
    let t = two_hosts()?;
    let mut fp1 = fast_path_on(mode, &t.h1, &t.pin1, &t.j1, BLOCK2)?;
    let mut fp2 = fast_path_on(mode, &t.h2, &t.pin2, &t.j2, BLOCK1)?;

    // Requests leave host 1 by redirect_neigh and arrive on host 2 by redirect_peer; replies the
    // other way round.
    let (a1, _) = ping_across(&t, (&fp1, &fp2), "fast path", |b, a| {
        a.redirected_remote >= b.redirected_remote + 10
            && a.redirected_local >= b.redirected_local + 10
    })?;
    tcp_roundtrip(&t.j1.ns, &t.j2.ns, t.j2.ip, 7101, 4 << 20).context("TCP j1 -> j2")?;
    tcp_roundtrip(&t.j2.ns, &t.j1.ns, t.j1.ip, 7102, 4 << 20).context("TCP j2 -> j1")?;
    let c1 = counters(&fp1)?;
    ensure!(
        c1.redirected_remote > a1.redirected_remote + 50,
        "TCP did not take the fast path: {a1:?} -> {c1:?}"
    );
    // Largest unfragmented packet still fits through redirect_neigh + VXLAN; one more byte does
    // not leave the job with DF set.
    ensure!(
        ping_df(&t.j1.ns, t.j2.ip, MTU - 28),
        "full-size DF ping lost"
    );
    ensure!(
        !ping_df(&t.j1.ns, t.j2.ip, MTU - 27),
        "oversized DF ping passed"
    );

    // Without the prefix host 1 falls back to the kernel route; the remote counter stands still.
    fp1.remove_prefix(BLOCK2, 24)?;
    fp1.remove_prefix(BLOCK2, 24)?; // idempotent
    let before = counters(&fp1)?;
    ensure!(
        ping_count(&t.j1.ns, t.j2.ip, 5) == 5,
        "kernel fallback: ping lost"
    );
    tcp_roundtrip(&t.j1.ns, &t.j2.ns, t.j2.ip, 7103, 1 << 20).context("TCP kernel route")?;
    let after = counters(&fp1)?;
    ensure!(
        after.redirected_remote == before.redirected_remote
            && after.redirected_local > before.redirected_local,
        "after prefix removal: {before:?} -> {after:?}"
    );
    ensure!(fp2.endpoint(t.j2.ip)?.is_some(), "host 2 lost its endpoint");
    fp2.remove_endpoint(t.j2.ip)?;
    in_ns(&t.h1, || Ok(fp1.unpin()?))?;
    in_ns(&t.h2, || Ok(fp2.unpin()?))?;
    ensure!(ping(&t.j1.ns, t.j2.ip, 3), "traffic after uninstall");
    Ok(())
}

#[test]
fn restart_swaps_programs_keeps_maps_and_traffic_tcx() -> Result<()> {
    restart_swaps_programs_keeps_maps_and_traffic(AttachMode::Tcx)
}

#[test]
fn restart_swaps_programs_keeps_maps_and_traffic_netlink() -> Result<()> {
    restart_swaps_programs_keeps_maps_and_traffic(AttachMode::Netlink)
}

fn restart_swaps_programs_keeps_maps_and_traffic(mode: AttachMode) -> Result<()> {
    if !lab::should_run(&format!(
        "restart_swaps_programs_keeps_maps_and_traffic {mode:?}"
    )) {
        return Ok(());
    }
    let mut t = two_hosts()?;
    let pin1 = t.pin1.clone();
    let fp1 = fast_path_on(mode, &t.h1, &pin1, &t.j1, BLOCK2)?;
    let fp2 = fast_path_on(mode, &t.h2, &t.pin2, &t.j2, BLOCK1)?;
    ensure!(ping_count(&t.j1.ns, t.j2.ip, 3) == 3, "before restart");
    let ids_before = (
        programs_on(mode, &t.h1, "vj1")?,
        programs_on(mode, &t.h1, "flvx")?,
    );
    let attached_before = fp1.attached()?;

    // A bounded ping stream runs across the restart: 60 pings, 50 ms apart (3 s).
    const PINGS: u32 = 60;
    let (j1, ip2) = (t.j1.ns.clone(), t.j2.ip);
    let pinger = std::thread::spawn(move || ping_count(&j1, ip2, PINGS));
    std::thread::sleep(std::time::Duration::from_millis(500));

    // The agent goes away (all its fds close, as on SIGKILL); pins keep the path running.
    let counted = counters(&fp1)?;
    drop(fp1);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let fp1 = in_ns(&t.h1, || Ok(FastPath::load_with(&pin1, mode)?))?;
    ensure!(
        !pinger.is_finished(),
        "the ping stream ended before the restart completed; the test proved nothing"
    );
    let reloaded = counters(&fp1)?;
    ensure!(
        reloaded.redirected_remote > counted.redirected_remote,
        "counters were reset or traffic stopped while no loader ran: {counted:?} -> {reloaded:?}"
    );
    ensure!(
        fp1.endpoint(t.j1.ip)?.is_some(),
        "pinned endpoint map not reused"
    );
    ensure!(
        fp1.attached()? == attached_before,
        "links changed across restart"
    );
    let ids_after = (
        programs_on(mode, &t.h1, "vj1")?,
        programs_on(mode, &t.h1, "flvx")?,
    );
    ensure!(
        ids_after.0.len() == 1 && ids_after.1.len() == 1,
        "programs piled up instead of being replaced: {ids_after:?}"
    );
    ensure!(
        ids_after.0 != ids_before.0 && ids_after.1 != ids_before.1,
        "programs not swapped: {ids_before:?} -> {ids_after:?}"
    );
    let answered = pinger
        .join()
        .map_err(|_| anyhow::anyhow!("pinger panicked"))?;
    ensure!(
        answered == PINGS,
        "{answered}/{PINGS} pings answered across the restart"
    );
    let end = counters(&fp1)?;
    ensure!(
        end.redirected_remote > reloaded.redirected_remote,
        "new program does not count into the pinned map: {reloaded:?} -> {end:?}"
    );

    // Job 1 goes away while no loader runs: the next loader drops the link pin of the vanished
    // veth; the agent removes the job's endpoint.
    let vj1 = ifindex(&t.h1, "vj1")?;
    let j1_ip = t.j1.ip;
    drop(fp1);
    t.lab.del_ns(&t.j1.ns)?;
    // Namespace teardown is asynchronous: wait (bounded) until the host-side veth is gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while ifindex(&t.h1, "vj1").is_ok() {
        ensure!(
            std::time::Instant::now() < deadline,
            "vj1 still exists 10 s after its job's namespace was deleted"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut fp1 = in_ns(&t.h1, || Ok(FastPath::load_with(&pin1, mode)?))?;
    ensure!(
        !fp1.attached()?.iter().any(|(i, _)| *i == vj1),
        "stale link pin kept: {:?}",
        fp1.attached()?
    );
    fp1.remove_endpoint(j1_ip)?;
    ensure!(
        fp1.endpoint_ips()?.is_empty(),
        "endpoint left: {:?}",
        fp1.endpoint_ips()?
    );
    in_ns(&t.h1, || Ok(fp1.unpin()?))?;
    in_ns(&t.h2, || Ok(fp2.unpin()?))?;
    Ok(())
}

#[test]
fn bad_input_gets_clear_errors() -> Result<()> {
    if !lab::should_run("bad_input_gets_clear_errors") {
        return Ok(());
    }
    // A pin directory outside any BPF filesystem is refused, not silently created.
    let plain = tempfile::tempdir()?;
    let err = FastPath::load(&plain.path().join("flynn")).unwrap_err();
    ensure!(
        matches!(err, flynn_ebpf::EbpfError::NotBpffs { .. }),
        "plain directory: {err}"
    );

    let bpffs = Bpffs::mount("flynn-bpffs")?;
    let mut lab = Lab::new();
    let host = lab.add_ns("h")?;
    let pin_dir = bpffs.pin_dir("flynn");
    in_ns(&host, || {
        let mut fp = FastPath::load(&pin_dir)?;
        let e = fp.attach(0, Role::JobVeth).unwrap_err();
        ensure!(matches!(e, flynn_ebpf::EbpfError::ZeroIfindex), "{e}");
        let e = fp.attach(999_999, Role::Vxlan).unwrap_err();
        ensure!(
            matches!(
                e,
                flynn_ebpf::EbpfError::NoSuchInterface { ifindex: 999_999 }
            ),
            "{e}"
        );
        let hop = Hop {
            ifindex: 1,
            next_hop: Ipv4Addr::new(100, 100, 2, 0),
        };
        let e = fp
            .upsert_prefix(Ipv4Addr::new(100, 100, 2, 1), 24, hop)
            .unwrap_err();
        ensure!(e.to_string().contains("host bits"), "{e}");
        let e = fp.upsert_prefix(BLOCK2, 40, hop).unwrap_err();
        ensure!(e.to_string().contains("over 32"), "{e}");
        let e = fp
            .upsert_endpoint(
                Ipv4Addr::new(100, 100, 1, 10),
                Endpoint {
                    ifindex: 0,
                    mac: [2, 0, 0, 0, 0, 1],
                    gateway_mac: [2, 0, 0, 0, 0, 2],
                },
            )
            .unwrap_err();
        ensure!(matches!(e, flynn_ebpf::EbpfError::ZeroIfindex), "{e}");
        // Nothing bad was stored.
        ensure!(fp.endpoint_ips()?.is_empty(), "endpoint stored");
        ensure!(fp.counters()? == Counters::default(), "counters moved");

        // `auto` turns the fast path on here (should_run already required the probe to pass).
        ensure!(FastPath::supported(), "supported() disagrees with probe()");
        ensure!(flynn_ebpf::Switch::Auto.enabled() && !flynn_ebpf::Switch::Off.enabled());

        // Underlay settings: port 0 and VNIs over 24 bits are refused; nothing is stored.
        let ul = flynn_ebpf::Underlay {
            local_ip: Ipv4Addr::new(10, 0, 0, 1),
            vni: 1,
            port: 0,
            vtep_mac: [2, 0, 0, 0, 0, 3],
            ifindex: 0,
        };
        let e = fp.set_underlay(ul).unwrap_err();
        ensure!(e.to_string().contains("port 0"), "{e}");
        let e = fp
            .set_underlay(flynn_ebpf::Underlay {
                vni: 1 << 24,
                port: 8472,
                ..ul
            })
            .unwrap_err();
        ensure!(e.to_string().contains("VNI"), "{e}");
        ensure!(fp.underlay()?.is_none(), "underlay settings stored");

        // A pinned map of the wrong shape (here: the endpoint map where the prefixes belong)
        // is refused instead of being reused.
        let other = bpffs.pin_dir("other");
        std::fs::create_dir(&other)?;
        std::fs::rename(
            pin_dir.join("flynn_endpoints"),
            other.join("flynn_prefixes"),
        )?;
        let e = FastPath::load(&other).unwrap_err();
        ensure!(
            matches!(e, flynn_ebpf::EbpfError::IncompatiblePin { .. }),
            "mismatched pin: {e}"
        );
        // Counters of another shape (an older build with fewer counters) are only statistics:
        // replaced by a fresh map.
        std::fs::rename(other.join("flynn_prefixes"), other.join("flynn_counters"))?;
        let fresh = FastPath::load(&other)?;
        ensure!(
            fresh.counters()? == Counters::default(),
            "replaced counters"
        );
        fresh.unpin()?;
        fp.unpin()?;
        Ok(())
    })
}

#[test]
fn clear_routes_empties_the_routing_maps_and_keeps_endpoints() -> Result<()> {
    if !lab::should_run("clear_routes_empties_the_routing_maps_and_keeps_endpoints") {
        return Ok(());
    }
    // Nothing pinned yet: nothing to do.
    let plain = tempfile::tempdir()?;
    ensure!(flynn_ebpf::clear_routes(&plain.path().join("flynn"))? == 0);

    let bpffs = Bpffs::mount("flynn-bpffs-clear")?;
    let mut lab = Lab::new();
    let host = lab.add_ns("h")?;
    let pin_dir = bpffs.pin_dir("flynn");
    in_ns(&host, || {
        let mut fp = FastPath::load(&pin_dir)?;
        let job = Ipv4Addr::new(100, 100, 1, 10);
        fp.upsert_endpoint(
            job,
            Endpoint {
                ifindex: 1,
                mac: [2, 0, 0, 0, 0, 1],
                gateway_mac: [2, 0, 0, 0, 0, 2],
            },
        )?;
        for block in [BLOCK2, Ipv4Addr::new(100, 100, 3, 0)] {
            fp.upsert_prefix(
                block,
                24,
                Hop {
                    ifindex: 1,
                    next_hop: block,
                },
            )?;
            fp.upsert_tunnel(
                block,
                flynn_ebpf::Tunnel {
                    remote_ip: Ipv4Addr::new(10, 0, 0, 2),
                    vtep_mac: [2, 0, 0, 0, 0, 3],
                },
            )?;
        }
        fp.set_underlay(flynn_ebpf::Underlay {
            local_ip: Ipv4Addr::new(10, 0, 0, 1),
            vni: 1,
            port: 8472,
            vtep_mac: [2, 0, 0, 0, 0, 4],
            ifindex: 1,
        })?;
        let listed = fp.prefixes()?;
        ensure!(
            listed.len() == 2
                && listed.contains(&(
                    BLOCK2,
                    24,
                    Hop {
                        ifindex: 1,
                        next_hop: BLOCK2
                    }
                )),
            "{listed:?}"
        );

        // Without loading anything (as an agent with the fast path off does).
        ensure!(flynn_ebpf::clear_routes(&pin_dir)? == 5);
        ensure!(fp.prefixes()?.is_empty(), "prefixes left");
        ensure!(fp.tunnels()?.is_empty(), "tunnels left");
        ensure!(fp.underlay()?.is_none(), "underlay left");
        ensure!(
            fp.endpoint_ips()? == [job],
            "the endpoint map is the host's"
        );
        ensure!(flynn_ebpf::clear_routes(&pin_dir)? == 0);
        fp.unpin()?;
        Ok(())
    })
}

#[test]
fn one_endpoint_is_removed_from_the_pins_without_loading() -> Result<()> {
    if !lab::should_run("one_endpoint_is_removed_from_the_pins_without_loading") {
        return Ok(());
    }
    let (a, b) = (
        Ipv4Addr::new(100, 100, 1, 10),
        Ipv4Addr::new(100, 100, 1, 11),
    );
    // Nothing pinned yet: nothing to do.
    let plain = tempfile::tempdir()?;
    ensure!(!flynn_ebpf::remove_pinned_endpoint(
        &plain.path().join("flynn"),
        a
    )?);
    ensure!(flynn_ebpf::detach_pinned(&plain.path().join("flynn"), 1)? == 0);

    let bpffs = Bpffs::mount("flynn-bpffs-forget")?;
    let mut lab = Lab::new();
    let host = lab.add_ns("h")?;
    let pin_dir = bpffs.pin_dir("flynn");
    in_ns(&host, || {
        let mut fp = FastPath::load(&pin_dir)?;
        for ip in [a, b] {
            fp.upsert_endpoint(
                ip,
                Endpoint {
                    ifindex: 1,
                    mac: [2, 0, 0, 0, 0, 1],
                    gateway_mac: [2, 0, 0, 0, 0, 2],
                },
            )?;
        }
        // As a host daemon that does not load the fast path does when a job goes.
        ensure!(flynn_ebpf::remove_pinned_endpoint(&pin_dir, a)?);
        ensure!(!flynn_ebpf::remove_pinned_endpoint(&pin_dir, a)?);
        ensure!(fp.endpoint_ips()? == [b], "{:?}", fp.endpoint_ips()?);
        ensure!(flynn_ebpf::detach_pinned(&pin_dir, 1)? == 0);
        fp.unpin()?;
        Ok(())
    })
}
