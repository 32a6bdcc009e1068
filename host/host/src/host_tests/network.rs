//! The job network against the kernel (root): the fast path's entries across daemons with
//! different settings, and the block a restarted daemon opens. Each test runs in a network
//! namespace of its own and removes the job namespaces it made.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use flynn_api::host::NetworkConfig;
use flynn_ebpf::{Endpoint, FastPath, Role};
use flynn_network::Subnet;

use super::*;
use crate::fastpath;
use crate::net::{Network, Setup};

/// Whether a test that needs root can run (a note is printed when it cannot).
fn root() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        eprintln!("skipped: needs root");
    }
    root
}

/// Runs `body` on a thread inside a network namespace made for it (deleted afterwards),
/// with a runtime of its own.
pub(super) fn in_netns<F, Fut>(tag: &str, body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let ns = format!("flynn-nettest-{tag}-{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap();
    assert!(ok.success(), "ip netns add {ns}");
    let ns2 = ns.clone();
    let res = std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{ns2}")).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(body())
    })
    .join();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    if let Err(p) = res {
        std::panic::resume_unwind(p);
    }
}

/// Deletes the named namespaces of `ids` and of every owner in `state`'s allocation file
/// on drop (what a failing test leaves: the veths go with the test's namespace).
struct JobNamespaces {
    state: PathBuf,
    ids: Vec<String>,
}

impl Drop for JobNamespaces {
    fn drop(&mut self) {
        let mut owners = self.ids.clone();
        if let Ok(b) = std::fs::read(self.state.join("job-ips.json")) {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) {
                if let Some(o) = v["owners"].as_object() {
                    owners.extend(o.keys().cloned());
                }
            }
        }
        for o in owners {
            delete_netns(&o);
        }
    }
}

/// Deletes the named network namespace of job (or pool key) `owner`, if it exists.
fn delete_netns(owner: &str) {
    let path = flynn_network::job::netns_path(owner);
    if let Some(n) = path.file_name().and_then(|n| n.to_str()) {
        if path.exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The job network a daemon opens on `state`, with its fast path setting.
async fn open(state: &Path, block: Subnet, fast: Option<fastpath::Config>) -> Network {
    Network::open(
        state,
        "flynnbr-fp",
        block,
        1450,
        crate::syncer::Syncer::start(),
        0,
        fast,
    )
    .await
    .unwrap()
}

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(ip) => panic!("not IPv4: {ip}"),
    }
}

fn probe_fast_path() {
    if let Err(e) = FastPath::probe() {
        panic!("this kernel cannot run the eBPF fast path: {e}");
    }
}

/// A daemon with the fast path on gives a job its endpoint entry and attachment; the job
/// ends under the next daemon, which runs with `--fast-path off`. Its entry and attachment
/// still go with its network (else the next job given the address would have its traffic
/// sent to the veth that is gone), and that daemon attaches nothing new.
#[test]
fn fast_path_off_still_removes_an_earlier_daemons_entry() {
    if !root() {
        return;
    }
    probe_fast_path();
    in_netns("fpoff", || async {
        let bpf = flynn_netlab::Bpffs::mount("flynn-hosttest-bpf").expect("mounting a bpffs");
        let pin = bpf.pin_dir("fp");
        // The agent has set the fast path up.
        let fp = FastPath::load(&pin).unwrap();
        let d = tempfile::tempdir().unwrap();
        let block: Subnet = "100.100.11.0/24".parse().unwrap();
        let pid = std::process::id();
        let (id, id2) = (format!("fpoff-a{pid}"), format!("fpoff-b{pid}"));
        let _left = JobNamespaces {
            state: d.path().to_path_buf(),
            ids: vec![id.clone(), id2.clone()],
        };
        let config = |attach| {
            Some(fastpath::Config {
                pin_dir: pin.clone(),
                attach,
            })
        };

        let n = open(d.path(), block, config(true)).await;
        let ip = v4(n.setup(&id).await.unwrap().0);
        let ep = fp.endpoint(ip).unwrap().expect("the job's endpoint entry");
        assert_eq!(fp.attached().unwrap(), vec![(ep.ifindex, Role::JobVeth)]);
        drop(n);

        let n = open(d.path(), block, config(false)).await;
        n.teardown(&id).await.unwrap();
        assert!(
            fp.endpoint(ip).unwrap().is_none(),
            "the ended job's entry was left: {:?}",
            fp.endpoint_ips()
        );
        assert!(fp.attached().unwrap().is_empty(), "{:?}", fp.attached());
        // Nothing new is attached under `off`.
        let ip2 = v4(n.setup(&id2).await.unwrap().0);
        assert!(fp.endpoint(ip2).unwrap().is_none());
        assert!(fp.attached().unwrap().is_empty(), "{:?}", fp.attached());
        n.teardown(&id2).await.unwrap();
        fp.unpin().unwrap();
    });
}

/// Endpoint entries an earlier daemon left behind (say, killed before a teardown it
/// never got to do) at addresses a daemon that does not attach jobs hands out: the job
/// given such an address has the entry removed before it runs. Entries at other
/// addresses are not this job's business and stay.
#[test]
fn a_stale_entry_at_a_new_jobs_address_is_removed() {
    if !root() {
        return;
    }
    probe_fast_path();
    in_netns("fpstale", || async {
        let bpf = flynn_netlab::Bpffs::mount("flynn-hosttest-bpf").expect("mounting a bpffs");
        let pin = bpf.pin_dir("fp");
        let mut fp = FastPath::load(&pin).unwrap();
        let d = tempfile::tempdir().unwrap();
        // A small block, so every address it can hand out gets a stale entry.
        let block: Subnet = "100.100.12.0/28".parse().unwrap();
        let stale = Endpoint {
            ifindex: 1,
            mac: [2, 0, 0, 0, 0, 9],
            gateway_mac: [2, 0, 0, 0, 0, 1],
        };
        let usable: Vec<Ipv4Addr> = (2..15).map(|i| block.nth(i).unwrap()).collect();
        for ip in &usable {
            fp.upsert_endpoint(*ip, stale).unwrap();
        }
        let id = format!("fpstale{}", std::process::id());
        let _left = JobNamespaces {
            state: d.path().to_path_buf(),
            ids: vec![id.clone()],
        };
        let off = Some(fastpath::Config {
            pin_dir: pin.clone(),
            attach: false,
        });
        let n = open(d.path(), block, off).await;
        let ip = v4(n.setup(&id).await.unwrap().0);
        assert!(
            fp.endpoint(ip).unwrap().is_none(),
            "the new job's address kept a stale entry"
        );
        assert_eq!(fp.endpoint_ips().unwrap().len(), usable.len() - 1);
        n.teardown(&id).await.unwrap();
        fp.unpin().unwrap();
    });
}

fn notify(subnet: &str) -> NetworkConfig {
    NetworkConfig {
        job_id: "flannel".into(),
        subnet: subnet.into(),
        mtu: 1450,
        resolvers: Vec::new(),
    }
}

/// A move to the agent's new block writes the allocator file for it before `network.json`;
/// a daemon that dies in between (here: `network.json` put back as it was) leaves the
/// allocator naming the new block, with a job and a pooled namespace holding addresses in
/// it, and `network.json` the old one. The next start opens the new block (the old one
/// would be refused) and re-adopts the job with its address.
#[test]
fn a_crash_between_a_moved_allocator_and_network_json_is_recovered() {
    if !root() {
        return;
    }
    in_netns("mvcrash", || async {
        let d = tempfile::tempdir().unwrap();
        let (rt, mut setup) = isolating(d.path(), "flynnbr-mc");
        setup.pool_size = 1;
        let id = format!("mvcrash{}", std::process::id());
        let _left = JobNamespaces {
            state: d.path().to_path_buf(),
            ids: vec![id.clone()],
        };
        let h = host_with(rt.clone(), d.path(), 0, Some(setup.clone()));
        h.configure_network(&notify("100.100.13.1/24"))
            .await
            .unwrap();
        let saved_before = std::fs::read(d.path().join("network.json")).unwrap();
        h.configure_network(&notify("100.100.14.1/24"))
            .await
            .unwrap();
        h.add_job(job(&id, "x")).await.unwrap();
        wait_status(&h, &id, JobStatus::Running).await;
        let ip = h.get(&id).unwrap().internal_ip;
        assert!(ip.starts_with("100.100.14."), "{ip}");
        // The pool refilled after the start: nothing is being made any more.
        let moved = h.network().unwrap();
        for _ in 0..500 {
            if moved.pooled() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(moved.pooled(), 1);
        std::fs::write(d.path().join("network.json"), saved_before).unwrap();

        // The next start.
        let (n, saved) = setup
            .open_saved()
            .await
            .expect("the next start opens its network")
            .expect("a saved network");
        assert_eq!(n.info().subnet, "100.100.14.0/24");
        assert!(!saved.rebooted);
        assert_eq!(n.address_of(&id).map(|a| a.to_string()), Some(ip.clone()));
        rt.survivors.lock().unwrap().push(id.clone());
        let mut o = options(
            rt.clone(),
            d.path(),
            0,
            Some(setup.clone()),
            Store::open(d.path(), crate::syncer::Syncer::start()).unwrap(),
        );
        o.network = Some(n.clone());
        let h2 = Host::new(o);
        h2.restore().await;
        let j = h2.get(&id).unwrap();
        assert_eq!((j.status, j.internal_ip), (JobStatus::Running, ip));
        // The agent, not answered before the crash, offers its block again.
        h2.configure_network(&notify("100.100.14.1/24"))
            .await
            .unwrap();
        let saved = std::fs::read_to_string(d.path().join("network.json")).unwrap();
        assert!(saved.contains("100.100.14.0/24"), "{saved}");

        exit_cleanly(&rt, &id).await;
        wait_status(&h2, &id, JobStatus::Done).await;
        for _ in 0..300 {
            if n.address_of(&id).is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(n.address_of(&id), None);
    });
}

/// A clean reboot: the overlay agent released its lease and, its state on tmpfs, may lease
/// another block; flynn-host's state (and `network.json`) persists. After the reboot the
/// saved block is not handed out: a job started before the agent reports its block waits
/// for it, and gets an address in the block the agent reports.
#[test]
fn after_a_reboot_jobs_wait_for_the_block_the_agent_reports() {
    if !root() {
        return;
    }
    in_netns("reboot", || async {
        let d = tempfile::tempdir().unwrap();
        let (rt, setup) = isolating(d.path(), "flynnbr-rb");
        let pid = std::process::id();
        let (a, b) = (format!("reboot-a{pid}"), format!("reboot-b{pid}"));
        let _left = JobNamespaces {
            state: d.path().to_path_buf(),
            ids: vec![a.clone(), b.clone()],
        };
        let h = host_with(rt.clone(), d.path(), 0, Some(setup.clone()));
        h.configure_network(&notify("100.100.15.1/24"))
            .await
            .unwrap();
        h.add_job(job(&a, "x")).await.unwrap();
        wait_status(&h, &a, JobStatus::Running).await;
        // A daemon restart within the same boot applies the saved block as it is.
        assert!(!setup.load().unwrap().unwrap().rebooted);

        // The reboot: the job and its namespace are gone.
        delete_netns(&a);
        let setup = Setup {
            boot_id: "boot-2".into(),
            ..setup
        };
        let (n, saved) = setup.open_saved().await.unwrap().unwrap();
        assert!(saved.rebooted);
        let rt2 = Arc::new(Fake::default());
        rt2.open();
        rt2.isolate.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut o = options(
            rt2.clone(),
            d.path(),
            0,
            Some(setup.clone()),
            Store::open(d.path(), crate::syncer::Syncer::start()).unwrap(),
        );
        o.network = Some(n.clone());
        o.net_before_reboot = saved.rebooted;
        let h2 = Host::new(o);
        h2.restore().await;
        assert_eq!(h2.get(&a).unwrap().status, JobStatus::Crashed);
        assert_eq!(n.address_of(&a), None);

        h2.add_job(job(&b, "x")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let j = h2.get(&b).unwrap();
        assert_eq!(
            j.status,
            JobStatus::Starting,
            "started on the saved block {:?}",
            j.internal_ip
        );
        // The agent leased another block: the host takes it, and the job starts there.
        h2.configure_network(&notify("100.100.16.1/24"))
            .await
            .unwrap();
        wait_status(&h2, &b, JobStatus::Running).await;
        let ip = h2.get(&b).unwrap().internal_ip;
        assert!(ip.starts_with("100.100.16."), "{ip}");
        let saved = std::fs::read_to_string(d.path().join("network.json")).unwrap();
        assert!(
            saved.contains("100.100.16.0/24") && saved.contains("boot-2"),
            "{saved}"
        );
        exit_cleanly(&rt2, &b).await;
        wait_status(&h2, &b, JobStatus::Done).await;
    });
}
