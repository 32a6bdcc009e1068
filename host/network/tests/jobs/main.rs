//! Per-job networking in real namespaces: a "host" namespace with a local bridge, jobs created with
//! [`create_job_net`] (their own named namespaces and veths), traffic between them, MTU, and
//! cleanup. Needs root; fails loudly without it unless `FLYNN_SKIP_NETNS_TESTS=1`.

#[path = "../vxlan/lab.rs"]
#[allow(dead_code)]
mod lab;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use flynn_netlab::{in_ns_path, ping_df, Bpffs};
use flynn_network::job::{
    attach_fast_path, create_job_net, destroy_job_net, detach_fast_path, host_veth_name, link_mac,
    links_with_prefix, netns_path, raise_to_local_mtu, setup_local_bridge, IpAllocator, JobNet,
    JobNetConfig, JobNetError, LOCAL_MTU,
};
use flynn_network::{KernelNetlink, Subnet};
use lab::{in_netns, ping, run, Lab};

/// Removes job namespaces left by a failing test (their veths go with the host namespace).
struct Jobs(Vec<String>);

impl Drop for Jobs {
    fn drop(&mut self) {
        for id in &self.0 {
            let path = netns_path(id);
            if path.exists() {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                let _ = run(&["ip", "netns", "del", &name]);
            }
        }
    }
}

fn job_ids(n: usize) -> Jobs {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Jobs(
        (0..n)
            .map(|i| format!("test-{}-{k}-job{i}", std::process::id()))
            .collect(),
    )
}

fn ns_name(job: &JobNet) -> String {
    job.netns_path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// One request/response over TCP from job `from` to `to_ip:port`, served by a listener in `to`.
fn tcp_roundtrip(from: &JobNet, to: &JobNet) -> Result<()> {
    let ip = to.ip;
    let listener = in_ns_path(&to.netns_path, move || {
        Ok(TcpListener::bind(SocketAddr::from((ip, 0)))?)
    })?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> Result<()> {
        let (mut s, peer) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf)?;
        ensure!(&buf == b"hello", "server got {buf:?}");
        s.write_all(format!("from {}", peer.ip()).as_bytes())?;
        Ok(())
    });
    let want = format!("from {}", from.ip);
    let got = in_ns_path(&from.netns_path, move || {
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(b"hello")?;
        let mut out = String::new();
        c.read_to_string(&mut out)?;
        Ok(out)
    })?;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    ensure!(got == want, "client got {got:?}, want {want:?}");
    Ok(())
}

#[test]
fn jobs_on_one_bridge_talk_and_leave_nothing_behind() -> Result<()> {
    if !lab::should_run("jobs_on_one_bridge_talk_and_leave_nothing_behind") {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    let host = lab.add_host("h", "u1", "10.232.0.1")?;
    let ids = job_ids(2);
    let dir = tempfile::tempdir()?;
    let block: Subnet = "100.100.7.0/24".parse()?;
    let cfg = JobNetConfig {
        bridge: "flynnbr0".into(),
        block,
        gateway: block.first_host(),
        mtu: 1400,
        local_mtu: LOCAL_MTU,
    };
    let alloc_path = dir.path().join("ips.json");

    let (ids2, cfg2, path2) = (ids.0.clone(), cfg.clone(), alloc_path.clone());
    let jobs = in_netns(&host, async move || {
        let nl = KernelNetlink::connect()?;
        let br = setup_local_bridge(&nl, &cfg2.bridge, cfg2.block, LOCAL_MTU).await?;
        ensure!(
            setup_local_bridge(&nl, &cfg2.bridge, cfg2.block, LOCAL_MTU).await? == br,
            "bridge setup is not idempotent"
        );
        let mut alloc = IpAllocator::open(&path2, cfg2.block, &[cfg2.gateway])?;
        let mut jobs = Vec::new();
        for id in &ids2 {
            let ip = alloc.allocate(id)?;
            jobs.push(create_job_net(&nl, id, ip, &cfg2).await?);
        }
        Ok(jobs)
    })?;
    let (a, b) = (&jobs[0], &jobs[1]);
    ensure!(a.ip.to_string() == "100.100.7.2", "first job got {}", a.ip);
    ensure!(b.ip.to_string() == "100.100.7.3", "second job got {}", b.ip);
    ensure!(a.host_veth.len() <= 15 && a.host_veth == host_veth_name(&ids.0[0]));
    ensure!(
        a.mac != [0; 6] && a.mac != b.mac,
        "job MACs {:?} {:?}",
        a.mac,
        b.mac
    );

    // Job side: eth0 with the address, the local MTU, lo up, default route via the bridge with
    // the MTU for everything beyond the block.
    let (na, nb) = (ns_name(a), ns_name(b));
    let addr =
        String::from_utf8(run(&["ip", "-n", &na, "-o", "addr", "show", "dev", "eth0"])?.stdout)?;
    ensure!(
        addr.contains("inet 100.100.7.2/24"),
        "eth0 addresses: {addr}"
    );
    let link = String::from_utf8(run(&["ip", "-n", &na, "link", "show", "eth0"])?.stdout)?;
    ensure!(
        link.contains("mtu 65520") && link.contains("UP"),
        "eth0: {link}"
    );
    let lo = String::from_utf8(run(&["ip", "-n", &na, "link", "show", "lo"])?.stdout)?;
    ensure!(lo.contains("UP"), "lo: {lo}");
    let routes = String::from_utf8(run(&["ip", "-n", &na, "route", "show", "default"])?.stdout)?;
    ensure!(
        routes.contains("via 100.100.7.1 dev eth0") && routes.contains("mtu 1400"),
        "routes: {routes}"
    );
    // Host side: the veth is a bridge port with the local MTU.
    let hv = String::from_utf8(run(&["ip", "-n", &host, "link", "show", &a.host_veth])?.stdout)?;
    ensure!(
        hv.contains("master flynnbr0") && hv.contains("mtu 65520") && hv.contains("UP"),
        "host veth: {hv}"
    );

    // Job to job, host to job, job to gateway.
    ensure!(ping(&na, b.ip, 3), "job a cannot ping job b");
    ensure!(ping(&nb, a.ip, 3), "job b cannot ping job a");
    ensure!(ping(&host, a.ip, 3), "host cannot ping job a");
    ensure!(ping(&na, "100.100.7.1", 3), "job a cannot ping its gateway");
    tcp_roundtrip(a, b).context("tcp a->b")?;
    tcp_roundtrip(b, a).context("tcp b->a")?;

    // MTU within the block: 65520 - 28 bytes of IP+ICMP headers fits with DF, one more byte
    // does not; the host end and the bridge carry it too.
    ensure!(
        ping_df(&na, b.ip, 65492),
        "65520-byte packet with DF failed"
    );
    ensure!(
        !ping_df(&na, b.ip, 65493),
        "65521-byte packet with DF went through"
    );
    ensure!(
        ping_df(&host, a.ip, 65492),
        "host to job at 65520 bytes failed"
    );
    // Beyond the block (the host's underlay address, via the default route): 1400.
    ensure!(
        ping_df(&na, "10.232.0.1", 1372),
        "1400-byte packet with DF failed"
    );
    ensure!(
        !ping_df(&na, "10.232.0.1", 1373),
        "1401-byte packet beyond the block went through with DF"
    );

    // Destroy both (twice: idempotent); nothing is left.
    let ids2 = ids.0.clone();
    let (path2, block2) = (alloc_path.clone(), cfg.block);
    let leftovers = in_netns(&host, async move || {
        let nl = KernelNetlink::connect()?;
        let mut alloc = IpAllocator::open(&path2, block2, &[block2.first_host()])?;
        for id in &ids2 {
            destroy_job_net(&nl, id).await?;
            destroy_job_net(&nl, id).await?;
            alloc.release(id)?;
        }
        Ok(links_with_prefix(&nl, "flv").await?)
    })?;
    ensure!(leftovers.is_empty(), "veths left: {leftovers:?}");
    for j in &jobs {
        ensure!(
            !j.netns_path.exists(),
            "{} left behind",
            j.netns_path.display()
        );
    }
    let named = String::from_utf8(run(&["ip", "netns", "list"])?.stdout)?;
    ensure!(
        !named.contains(&na) && !named.contains(&nb),
        "namespaces left: {named}"
    );
    ensure!(!ping(&host, a.ip, 1), "destroyed job still answers");
    Ok(())
}

/// Jobs made at the overlay MTU (as before the local MTU) are raised when the host opens its
/// network again: both veth ends to 65520, the default route keeps the overlay MTU as a metric,
/// and 64 KiB packets pass between them; a second pass finds nothing to do.
#[test]
fn jobs_from_before_the_local_mtu_are_raised() -> Result<()> {
    if !lab::should_run("jobs_from_before_the_local_mtu_are_raised") {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    let host = lab.add_host("h", "u1", "10.232.3.1")?;
    let ids = job_ids(2);
    let block: Subnet = "100.100.10.0/24".parse()?;
    let old = JobNetConfig {
        bridge: "flynnbr0".into(),
        block,
        gateway: block.first_host(),
        mtu: 1450,
        local_mtu: 1450,
    };
    let new = JobNetConfig {
        local_mtu: LOCAL_MTU,
        ..old.clone()
    };
    let ids2 = ids.0.clone();
    let (jobs, raised, again) = in_netns(&host, async move || {
        let nl = KernelNetlink::connect()?;
        setup_local_bridge(&nl, &old.bridge, old.block, 1450).await?;
        let mut jobs = Vec::new();
        for (i, id) in ids2.iter().enumerate() {
            let ip = old.block.nth(10 + i as u32).context("address")?;
            jobs.push(create_job_net(&nl, id, ip, &old).await?);
        }
        setup_local_bridge(&nl, &new.bridge, new.block, LOCAL_MTU).await?;
        let raised = raise_to_local_mtu(&nl, &new).await?;
        let again = raise_to_local_mtu(&nl, &new).await?;
        Ok((jobs, raised, again))
    })?;
    ensure!((raised, again) == (2, 0), "raised {raised}, then {again}");
    let (a, b) = (&jobs[0], &jobs[1]);
    let na = ns_name(a);
    let link = String::from_utf8(run(&["ip", "-n", &na, "link", "show", "eth0"])?.stdout)?;
    ensure!(link.contains("mtu 65520"), "eth0: {link}");
    let hv = String::from_utf8(run(&["ip", "-n", &host, "link", "show", &b.host_veth])?.stdout)?;
    ensure!(hv.contains("mtu 65520"), "host veth: {hv}");
    let routes = String::from_utf8(run(&["ip", "-n", &na, "route", "show", "default"])?.stdout)?;
    ensure!(
        routes.contains("via 100.100.10.1") && routes.contains("mtu 1450"),
        "default route: {routes}"
    );
    ensure!(
        ping_df(&na, b.ip, 65492),
        "65520-byte packet between raised jobs"
    );
    tcp_roundtrip(a, b)?;
    drop(ids);
    Ok(())
}

#[test]
fn failed_creation_undoes_and_bad_input_is_refused() -> Result<()> {
    if !lab::should_run("failed_creation_undoes_and_bad_input_is_refused") {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    let host = lab.add_host("h", "u1", "10.232.1.1")?;
    let ids = job_ids(2);
    let block: Subnet = "100.100.8.0/24".parse()?;
    let cfg = JobNetConfig {
        bridge: "flynnbr0".into(),
        block,
        gateway: block.first_host(),
        mtu: 1450,
        local_mtu: LOCAL_MTU,
    };
    let ids2 = ids.0.clone();
    in_netns(&host, async move || {
        let nl = KernelNetlink::connect()?;
        let ip = Ipv4Addr::new(100, 100, 8, 9);
        // No bridge yet.
        let err = create_job_net(&nl, &ids2[0], ip, &cfg).await.unwrap_err();
        ensure!(matches!(err, JobNetError::NoBridge { .. }), "{err:?}");
        setup_local_bridge(&nl, &cfg.bridge, cfg.block, LOCAL_MTU).await?;
        // Addresses outside the block, the gateway and broadcast are refused.
        for bad in ["100.100.9.5", "100.100.8.1", "100.100.8.255", "100.100.8.0"] {
            let err = create_job_net(&nl, &ids2[0], bad.parse()?, &cfg)
                .await
                .unwrap_err();
            ensure!(
                matches!(err, JobNetError::BadAddress { .. }),
                "{bad}: {err:?}"
            );
        }
        // A failure after the namespace was made (the address already taken on this host's
        // bridge would not fail, so use an MTU the kernel rejects) removes it again.
        let huge = JobNetConfig {
            local_mtu: 1_000_000,
            ..cfg.clone()
        };
        ensure!(create_job_net(&nl, &ids2[1], ip, &huge).await.is_err());
        ensure!(
            !netns_path(&ids2[1]).exists(),
            "namespace left after failure"
        );
        ensure!(
            links_with_prefix(&nl, "flv").await?.is_empty(),
            "veth left after failure"
        );
        // Creating the same job twice fails and leaves the first intact.
        let job = create_job_net(&nl, &ids2[0], ip, &cfg).await?;
        let err = create_job_net(&nl, &ids2[0], ip, &cfg).await.unwrap_err();
        ensure!(matches!(err, JobNetError::NetnsExists { .. }), "{err:?}");
        ensure!(job.netns_path.exists());
        ensure!(links_with_prefix(&nl, "flv").await?.len() == 1);
        destroy_job_net(&nl, &ids2[0]).await?;
        ensure!(!job.netns_path.exists());
        Ok(())
    })?;
    drop(ids);
    Ok(())
}

#[test]
fn fast_path_endpoints_follow_jobs() -> Result<()> {
    if !lab::should_run("fast_path_endpoints_follow_jobs") {
        return Ok(());
    }
    if let Err(e) = flynn_ebpf::FastPath::probe() {
        panic!("this kernel cannot run the eBPF fast path: {e}");
    }
    let bpf = Bpffs::mount("flynn-jobs-bpf")?;
    let pin = bpf.pin_dir("fp");
    let mut lab = Lab::new()?;
    let host = lab.add_host("h", "u1", "10.232.2.1")?;
    let ids = job_ids(2);
    let block: Subnet = "100.100.9.0/24".parse()?;
    let cfg = JobNetConfig {
        bridge: "flynnbr0".into(),
        block,
        gateway: block.first_host(),
        mtu: 1450,
        local_mtu: LOCAL_MTU,
    };
    let (ids2, cfg2, pin2) = (ids.0.clone(), cfg.clone(), pin.clone());
    let (jobs, before) = in_netns(&host, async move || {
        let nl = KernelNetlink::connect()?;
        setup_local_bridge(&nl, &cfg2.bridge, cfg2.block, LOCAL_MTU).await?;
        let mut fp = flynn_ebpf::FastPath::load(&pin2)?;
        let mut jobs = Vec::new();
        for (i, id) in ids2.iter().enumerate() {
            let ip = cfg2.block.nth(10 + i as u32).unwrap();
            let job = create_job_net(&nl, id, ip, &cfg2).await?;
            attach_fast_path(&nl, &mut fp, &job, &cfg2.bridge).await?;
            jobs.push(job);
        }
        let ep = fp.endpoint(jobs[0].ip)?.context("no endpoint")?;
        ensure!(ep.ifindex == jobs[0].host_ifindex && ep.mac == jobs[0].mac);
        // The bridge MAC is fixed (not the lowest of its ports), so it stays valid as jobs come.
        let br_mac = link_mac(&nl, &cfg2.bridge).await?;
        ensure!(br_mac == flynn_network::Mac::for_bridge(cfg2.gateway).octets());
        ensure!(ep.gateway_mac == br_mac);
        Ok((jobs, fp.counters()?))
    })?;
    let (a, b) = (jobs[0].clone(), jobs[1].clone());
    ensure!(ping(&ns_name(&a), b.ip, 3), "a cannot ping b");
    tcp_roundtrip(&a, &b)?;

    let pin2 = pin.clone();
    let (ids2, b2) = (ids.0.clone(), b.clone());
    in_netns(&host, async move || {
        let nl = KernelNetlink::connect()?;
        let mut fp = flynn_ebpf::FastPath::load(&pin2)?;
        let after = fp.counters()?;
        ensure!(
            after.redirected_local > before.redirected_local,
            "nothing went the fast way: {before:?} -> {after:?}"
        );
        // Job b goes away: its endpoint and link go with it; doing it twice is harmless.
        detach_fast_path(&mut fp, &b2)?;
        destroy_job_net(&nl, &ids2[1]).await?;
        detach_fast_path(&mut fp, &b2)?;
        ensure!(
            fp.endpoint(b2.ip)?.is_none(),
            "endpoint of a removed job left"
        );
        ensure!(fp.endpoint_ips()? == vec![a.ip], "{:?}", fp.endpoint_ips()?);
        let attached: Vec<u32> = fp.attached()?.into_iter().map(|(i, _)| i).collect();
        ensure!(attached == vec![a.host_ifindex], "links: {attached:?}");
        destroy_job_net(&nl, &ids2[0]).await?;
        Ok(())
    })?;
    Ok(())
}
