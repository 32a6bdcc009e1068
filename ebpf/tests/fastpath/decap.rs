//! VXLAN in BPF: decapsulation on the underlay device ([`Role::Underlay`]), so cross-host
//! traffic arrives without the kernel's UDP socket and VXLAN receive, intact, and whatever is not
//! one of our VXLAN packets for a local job is left to the kernel untouched; encapsulation on the
//! job veth ([`FastPath::upsert_tunnel`]), so it leaves without the VXLAN device, in packets the
//! kernel's VXLAN receive accepts.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use flynn_ebpf::{AttachMode, FastPath, Role, Tunnel, Underlay};

use super::lab::{self, ifindex, in_ns, ping, ping_count, ping_df, tcp_roundtrip};
use super::{
    counters, endpoint, fast_path_on, ping_across, programs_on, two_hosts, BLOCK1, BLOCK2, MTU,
    VTEP1, VTEP2,
};

const UL1: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
const UL2: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);

fn parse_mac(s: &str) -> [u8; 6] {
    let mut out = [0u8; 6];
    for (o, p) in out.iter_mut().zip(s.split(':')) {
        *o = u8::from_str_radix(p, 16).expect("hex MAC");
    }
    out
}

/// [`fast_path_on`] plus decapsulation on the underlay device `ul0` and the tunnel entry of the
/// other host of [`two_hosts`] (decapsulation takes only what that peer sends); encapsulation
/// in BPF too when `encap` (out of `ul0`).
#[allow(clippy::too_many_arguments)]
fn decap_on(
    mode: AttachMode,
    host: &str,
    pin_dir: &std::path::Path,
    job: &super::Job,
    remote_block: Ipv4Addr,
    local_ip: Ipv4Addr,
    vtep: &str,
    encap: bool,
) -> Result<FastPath> {
    let mut fp = fast_path_on(mode, host, pin_dir, job, remote_block)?;
    let (peer_ip, peer_vtep) = if local_ip == UL1 {
        (UL2, VTEP2)
    } else {
        (UL1, VTEP1)
    };
    fp.upsert_tunnel(
        remote_block,
        Tunnel {
            remote_ip: peer_ip,
            vtep_mac: parse_mac(peer_vtep),
        },
    )?;
    in_ns(host, || {
        let ul0 = ifindex(host, "ul0")?;
        fp.set_underlay(Underlay {
            local_ip,
            vni: 1,
            port: 8472,
            vtep_mac: parse_mac(vtep),
            ifindex: if encap { ul0 } else { 0 },
        })?;
        fp.attach(ul0, Role::Underlay)?;
        Ok(fp)
    })
}

fn ip_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A VXLAN payload (VXLAN header, inner Ethernet, IPv4 with TOS `tos`, UDP without checksum)
/// carrying `payload` from `src` to `dst:dport`, as a UDP datagram to port 8472 would hold it.
#[allow(clippy::too_many_arguments)]
fn vxlan_frame(
    vni: u32,
    tos: u8,
    inner_dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&0x0800_0000u32.to_be_bytes());
    f.extend_from_slice(&(vni << 8).to_be_bytes());
    f.extend_from_slice(&inner_dst_mac);
    f.extend_from_slice(&[0x0e, 0x46, 0x4c, 0x09, 0x09, 0x09]);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, tos];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let csum = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&5555u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// Sends `data` from `ns` (bound to `from`) to `to`, with or without a UDP checksum.
fn send_udp(ns: &str, from: Ipv4Addr, to: SocketAddr, data: &[u8], checksum: bool) -> Result<()> {
    send_udp_tos(ns, from, to, data, checksum, 0)
}

/// [`send_udp`] with the IPv4 TOS byte `tos`.
fn send_udp_tos(
    ns: &str,
    from: Ipv4Addr,
    to: SocketAddr,
    data: &[u8],
    checksum: bool,
    tos: u8,
) -> Result<()> {
    in_ns(ns, || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
        s.bind(&SocketAddr::from((from, 0)).into())?;
        s.set_tos_v4(u32::from(tos))?;
        if !checksum {
            let one: libc::c_int = 1;
            // SAFETY: a valid socket fd and a c_int option value of the size passed.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_NO_CHECK,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            ensure!(rc == 0, "SO_NO_CHECK: {}", std::io::Error::last_os_error());
        }
        s.send_to(data, &to.into())?;
        Ok(())
    })
}

/// A UDP socket in `ns` at `addr`; `expect` says whether one datagram must arrive (and what it
/// must hold) within a second, or none may.
fn receives(
    ns: &str,
    addr: SocketAddr,
    send: impl FnOnce() -> Result<()>,
) -> Result<Option<Vec<u8>>> {
    let sock = in_ns(ns, || Ok(UdpSocket::bind(addr)?))?;
    sock.set_read_timeout(Some(Duration::from_millis(1000)))?;
    send()?;
    let mut buf = [0u8; 2048];
    match sock.recv_from(&mut buf) {
        Ok((n, _)) => Ok(Some(buf[..n].to_vec())),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

#[test]
fn cross_host_decap_on_the_underlay_tcx() -> Result<()> {
    cross_host_decap_on_the_underlay(AttachMode::Tcx)
}

#[test]
fn cross_host_decap_on_the_underlay_netlink() -> Result<()> {
    cross_host_decap_on_the_underlay(AttachMode::Netlink)
}

fn cross_host_decap_on_the_underlay(mode: AttachMode) -> Result<()> {
    if !lab::should_run(&format!("cross_host_decap_on_the_underlay {mode:?}")) {
        return Ok(());
    }
    let t = two_hosts()?;
    let (pin1, pin2) = (t.pin1.clone(), t.pin2.clone());
    // Decapsulation only: packets leave through the VXLAN device as before.
    let mut fp1 = decap_on(mode, &t.h1, &pin1, &t.j1, BLOCK2, UL1, VTEP1, false)?;
    let mut fp2 = decap_on(mode, &t.h2, &pin2, &t.j2, BLOCK1, UL2, VTEP2, false)?;
    ensure!(
        programs_on(mode, &t.h2, "ul0")?.len() == 1,
        "no program on the underlay device"
    );
    ensure!(
        fp2.underlay()?.map(|u| u.local_ip) == Some(UL2),
        "underlay settings readback"
    );

    // Pings: requests decapsulated on host 2, replies on host 1, none through the VXLAN device.
    let what = "decapsulated on the underlay";
    let (a1, a2) = ping_across(&t, (&fp1, &fp2), what, |b, a| {
        a.decapsulated >= b.decapsulated + 10 && a.redirected_remote >= b.redirected_remote + 10
    })?;

    // Bulk TCP both ways, content checked. The peer's VXLAN device sends TSO bursts as GSO
    // packets (the underlay veth takes UDP tunnel GSO unsegmented): those are decapsulated in
    // BPF too (CHECKSUM_PARTIAL, inner TCP), like ACKs and single segments; only a few packets
    // (ARP from the job) go the kernel way.
    tcp_roundtrip(&t.j1.ns, &t.j2.ns, t.j2.ip, 7201, 8 << 20).context("TCP j1 -> j2")?;
    tcp_roundtrip(&t.j2.ns, &t.j1.ns, t.j1.ip, 7202, 8 << 20).context("TCP j2 -> j1")?;
    let (c1, c2) = (counters(&fp1)?, counters(&fp2)?);
    println!("after TCP: h1 {c1:?}, h2 {c2:?}");
    for (name, a, c) in [("h1", a1, c1), ("h2", a2, c2)] {
        ensure!(
            c.decapsulated > a.decapsulated + 10 && c.decapsulated_gso > a.decapsulated_gso,
            "{name}: TCP (TSO bursts) not decapsulated: {a:?} -> {c:?}"
        );
        ensure!(
            c.passed < a.passed + 20,
            "{name}: TCP went the kernel way: {a:?} -> {c:?}"
        );
    }
    ensure!(
        ping_df(&t.j1.ns, t.j2.ip, MTU - 28),
        "full-size DF ping lost"
    );
    ensure!(
        !ping_df(&t.j1.ns, t.j2.ip, MTU - 27),
        "oversized DF ping passed"
    );

    // Hand-made VXLAN datagrams from host 1's underlay address to host 2.
    let vxlan = SocketAddr::from((UL2, 8472));
    let to_job = SocketAddr::from((t.j2.ip, 7210));
    let payload = b"decapsulated in BPF";
    let frame = |vni| vxlan_frame(vni, 0, parse_mac(VTEP2), t.j1.ip, t.j2.ip, 7210, payload);
    // Ours (VNI 1, no outer checksum): decapsulated, delivered intact.
    let before = counters(&fp2)?;
    let got = receives(&t.j2.ns, to_job, || {
        send_udp(&t.h1, UL1, vxlan, &frame(1), false)
    })?;
    ensure!(
        got.as_deref() == Some(&payload[..]),
        "VNI 1 datagram: got {got:?}"
    );
    let after = counters(&fp2)?;
    ensure!(
        after.decapsulated == before.decapsulated + 1,
        "VNI 1 datagram not decapsulated: {before:?} -> {after:?}"
    );
    // Another VNI: not ours; the kernel has no such VXLAN device and drops it.
    let before = after;
    let got = receives(&t.j2.ns, to_job, || {
        send_udp(&t.h1, UL1, vxlan, &frame(2), false)
    })?;
    ensure!(got.is_none(), "VNI 2 datagram delivered: {got:?}");
    let after = counters(&fp2)?;
    ensure!(
        after.decapsulated == before.decapsulated && after.passed > before.passed,
        "VNI 2 datagram: {before:?} -> {after:?}"
    );
    // With an outer UDP checksum: left to the kernel (which verifies it), still delivered.
    let before = after;
    let got = receives(&t.j2.ns, to_job, || {
        send_udp(&t.h1, UL1, vxlan, &frame(1), true)
    })?;
    ensure!(
        got.as_deref() == Some(&payload[..]),
        "checksummed datagram: got {got:?}"
    );
    let after = counters(&fp2)?;
    ensure!(
        after.decapsulated == before.decapsulated,
        "a checksummed datagram was decapsulated in BPF: {before:?} -> {after:?}"
    );
    // Other UDP on the underlay: untouched.
    let before = after;
    let other = SocketAddr::from((UL2, 9999));
    let data: Vec<u8> = (0..1200u32).map(|i| (i % 251) as u8).collect();
    let got = receives(&t.h2, other, || send_udp(&t.h1, UL1, other, &data, false))?;
    ensure!(
        got.as_deref() == Some(&data[..]),
        "plain UDP on the underlay altered or lost"
    );
    let after = counters(&fp2)?;
    ensure!(
        after.decapsulated == before.decapsulated,
        "plain UDP decapsulated: {before:?} -> {after:?}"
    );
    ensure!(ping(&t.h1, UL2, 3), "underlay ping");

    // Settings cleared: VXLAN goes through the kernel again (the VXLAN device's program).
    fp2.clear_underlay()?;
    ensure!(fp2.underlay()?.is_none(), "underlay settings not cleared");
    let before = counters(&fp2)?;
    ensure!(
        ping_count(&t.j1.ns, t.j2.ip, 5) == 5,
        "without decap: ping lost"
    );
    let after = counters(&fp2)?;
    ensure!(
        after.decapsulated == before.decapsulated
            && after.redirected_local >= before.redirected_local + 5,
        "without decap settings: {before:?} -> {after:?}"
    );

    // What an agent with the fast path off does: its device programs go, job programs and maps
    // stay; traffic keeps flowing.
    let n = in_ns(&t.h1, || {
        Ok(flynn_ebpf::detach_roles(
            &pin1,
            &[Role::Vxlan, Role::Underlay],
        )?)
    })?;
    ensure!(n == 2, "detached {n} attachments, want 2");
    ensure!(
        programs_on(mode, &t.h1, "ul0")?.is_empty(),
        "ul0 still has a program"
    );
    ensure!(
        programs_on(mode, &t.h1, "flvx")?.is_empty(),
        "flvx still has a program"
    );
    ensure!(
        programs_on(mode, &t.h1, "vj1")?.len() == 1,
        "job program detached"
    );
    ensure!(
        ping_count(&t.j1.ns, t.j2.ip, 3) == 3,
        "after detach: ping lost"
    );
    fp1.remove_prefix(BLOCK2, 24)?;
    in_ns(&t.h1, || Ok(fp1.unpin()?))?;
    in_ns(&t.h2, || Ok(fp2.unpin()?))?;
    ensure!(ping(&t.j1.ns, t.j2.ip, 3), "traffic after uninstall");
    Ok(())
}

/// In `ns`, a firewall that lets VXLAN (UDP 8472) in only from `peer`, as an operator
/// would allow the overlay from the cluster's hosts alone: nftables table `ip flynn-test-fw`,
/// an input chain dropping the rest.
fn vxlan_only_from(ns: &str, peer: Ipv4Addr) -> Result<()> {
    use rustables::expr::{
        Cmp, CmpOp, HighLevelPayload, IPv4HeaderField, Immediate, NetworkHeaderField, VerdictKind,
    };
    use rustables::{Batch, Chain, ChainPolicy, ChainType, Hook, HookClass, MsgType, Rule};
    in_ns(ns, || {
        let table =
            rustables::Table::new(rustables::ProtocolFamily::Ipv4).with_name("flynn-test-fw");
        let chain = Chain::new(&table)
            .with_name("input")
            .with_hook(Hook::new(HookClass::In, 0))
            .with_type(ChainType::Filter)
            .with_policy(ChainPolicy::Accept);
        let rule = Rule::new(&chain)?
            .with_expr(
                HighLevelPayload::Network(NetworkHeaderField::IPv4(IPv4HeaderField::Saddr)).build(),
            )
            .with_expr(Cmp::new(CmpOp::Neq, peer.octets()))
            .dport(8472, rustables::Protocol::UDP)
            .with_expr(Immediate::new_verdict(VerdictKind::Drop));
        let mut batch = Batch::new();
        batch.add(&table, MsgType::Add);
        batch.add(&chain, MsgType::Add);
        batch.add(&rule, MsgType::Add);
        batch.send()?;
        Ok(())
    })
}

/// Decapsulation in BPF takes only VXLAN packets whose outer source is the peer that holds the
/// inner source's block. tc ingress and `bpf_redirect_peer` skip netfilter, so a frame with a
/// cluster job's inner source sent from any other address on the underlay (here a second
/// address of host 1's underlay port) used to reach the job past a firewall that lets VXLAN in
/// only from the cluster's hosts; now it goes to the kernel, and the firewall drops it.
#[test]
fn decap_takes_vxlan_only_from_the_peer_of_the_inner_source() -> Result<()> {
    if !lab::should_run("decap_takes_vxlan_only_from_the_peer_of_the_inner_source") {
        return Ok(());
    }
    let t = two_hosts()?;
    let mode = AttachMode::Tcx;
    let (pin1, pin2) = (t.pin1.clone(), t.pin2.clone());
    let _fp1 = decap_on(mode, &t.h1, &pin1, &t.j1, BLOCK2, UL1, VTEP1, false)?;
    let fp2 = decap_on(mode, &t.h2, &pin2, &t.j2, BLOCK1, UL2, VTEP2, false)?;
    let foreign = Ipv4Addr::new(10, 231, 0, 66);
    lab::run(&[
        "ip",
        "-n",
        &t.h1,
        "addr",
        "add",
        &format!("{foreign}/24"),
        "dev",
        "ul0",
    ])?;
    vxlan_only_from(&t.h2, UL1)?;

    let vxlan = SocketAddr::from((UL2, 8472));
    let to_job = SocketAddr::from((t.j2.ip, 7220));
    let payload = b"from a cluster job";
    let frame = vxlan_frame(1, 0, parse_mac(VTEP2), t.j1.ip, t.j2.ip, 7220, payload);
    // From the peer: decapsulated in BPF and delivered.
    let before = counters(&fp2)?;
    let got = receives(&t.j2.ns, to_job, || {
        send_udp(&t.h1, UL1, vxlan, &frame, false)
    })?;
    ensure!(
        got.as_deref() == Some(&payload[..]),
        "from the peer: got {got:?}"
    );
    let after = counters(&fp2)?;
    ensure!(
        after.decapsulated == before.decapsulated + 1,
        "from the peer: not decapsulated in BPF: {before:?} -> {after:?}"
    );
    // The same frame from another address: left to the kernel, where the firewall drops it.
    let before = after;
    let got = receives(&t.j2.ns, to_job, || {
        send_udp(&t.h1, foreign, vxlan, &frame, false)
    })?;
    let after = counters(&fp2)?;
    ensure!(
        got.is_none(),
        "a frame from {foreign} reached the job past the firewall: {got:?} ({before:?} -> {after:?})"
    );
    ensure!(
        after.decapsulated == before.decapsulated && after.passed > before.passed,
        "a frame from {foreign} was decapsulated in BPF: {before:?} -> {after:?}"
    );
    // An inner source of no peer's block, from the peer: the kernel's too.
    let before = after;
    let stray = vxlan_frame(1, 0, parse_mac(VTEP2), foreign, t.j2.ip, 7220, payload);
    receives(&t.j2.ns, to_job, || {
        send_udp(&t.h1, UL1, vxlan, &stray, false)
    })?;
    let after = counters(&fp2)?;
    ensure!(
        after.decapsulated == before.decapsulated,
        "a frame with an inner source outside the peer's block was decapsulated in BPF: {before:?} -> {after:?}"
    );
    Ok(())
}

#[test]
fn cross_host_encap_in_bpf_tcx() -> Result<()> {
    cross_host_encap_in_bpf(AttachMode::Tcx)
}

#[test]
fn cross_host_encap_in_bpf_netlink() -> Result<()> {
    cross_host_encap_in_bpf(AttachMode::Netlink)
}

fn cross_host_encap_in_bpf(mode: AttachMode) -> Result<()> {
    if !lab::should_run(&format!("cross_host_encap_in_bpf {mode:?}")) {
        return Ok(());
    }
    let t = two_hosts()?;
    let (pin1, pin2) = (t.pin1.clone(), t.pin2.clone());
    let mut fp1 = decap_on(mode, &t.h1, &pin1, &t.j1, BLOCK2, UL1, VTEP1, true)?;
    let peer2 = flynn_ebpf::Tunnel {
        remote_ip: UL2,
        vtep_mac: parse_mac(VTEP2),
    };
    fp1.upsert_tunnel(BLOCK2, peer2)?;
    ensure!(fp1.tunnels()? == vec![(BLOCK2, peer2)], "tunnels readback");

    // Host 2 runs the kernel path only: its VXLAN device must accept what host 1's BPF built,
    // single packets and TSO bursts (segmented by the kernel's UDP tunnel GSO) alike.
    let before = counters(&fp1)?;
    ensure!(ping_count(&t.j1.ns, t.j2.ip, 10) == 10, "encap: ping lost");
    let after = counters(&fp1)?;
    ensure!(
        after.encapsulated >= before.encapsulated + 10,
        "not encapsulated in BPF: {before:?} -> {after:?}"
    );
    tcp_roundtrip(&t.j1.ns, &t.j2.ns, t.j2.ip, 7301, 8 << 20).context("TCP j1 -> kernel h2")?;
    tcp_roundtrip(&t.j2.ns, &t.j1.ns, t.j1.ip, 7302, 4 << 20).context("TCP kernel h2 -> j1")?;
    let tcp = counters(&fp1)?;
    ensure!(
        tcp.encapsulated > after.encapsulated + 50,
        "TCP not encapsulated in BPF: {after:?} -> {tcp:?}"
    );

    // Both hosts in BPF both ways.
    let mut fp2 = decap_on(mode, &t.h2, &pin2, &t.j2, BLOCK1, UL2, VTEP2, true)?;
    fp2.upsert_tunnel(
        BLOCK1,
        flynn_ebpf::Tunnel {
            remote_ip: UL1,
            vtep_mac: parse_mac(VTEP1),
        },
    )?;
    ping_across(&t, (&fp1, &fp2), "encap + decap", |b, a| {
        a.encapsulated >= b.encapsulated + 10 && a.decapsulated >= b.decapsulated + 10
    })?;
    // Bulk TCP, content checked: TSO bursts are encapsulated as GSO packets (UDP tunnel GSO,
    // unsegmented over the underlay veth) and decapsulated as such on the other side.
    let (b1, b2) = (counters(&fp1)?, counters(&fp2)?);
    tcp_roundtrip(&t.j1.ns, &t.j2.ns, t.j2.ip, 7303, 8 << 20).context("TCP j1 -> j2")?;
    tcp_roundtrip(&t.j2.ns, &t.j1.ns, t.j1.ip, 7304, 8 << 20).context("TCP j2 -> j1")?;
    let (a1, a2) = (counters(&fp1)?, counters(&fp2)?);
    println!("TCP in BPF both ways: h1 {b1:?} -> {a1:?}, h2 {b2:?} -> {a2:?}");
    for (name, b, a) in [("h1", b1, a1), ("h2", b2, a2)] {
        ensure!(
            a.decapsulated_gso > b.decapsulated_gso && a.passed < b.passed + 20,
            "{name}: TSO bursts not decapsulated in BPF: {b:?} -> {a:?}"
        );
    }
    ensure!(
        ping_df(&t.j1.ns, t.j2.ip, MTU - 28),
        "full-size DF ping lost"
    );
    ensure!(
        !ping_df(&t.j1.ns, t.j2.ip, MTU - 27),
        "oversized DF ping passed"
    );
    // A full-size UDP datagram (no DF) arrives whole: the outer packet fits the underlay.
    let big: Vec<u8> = (0..(MTU as usize - 28)).map(|i| (i % 253) as u8).collect();
    let to_job = SocketAddr::from((t.j2.ip, 7310));
    let got = receives(&t.j2.ns, to_job, || {
        send_udp(&t.j1.ns, t.j1.ip, to_job, &big, true)
    })?;
    ensure!(
        got.as_deref() == Some(&big[..]),
        "full-size UDP datagram lost or altered"
    );

    // A miss (job 2's endpoint gone on host 2): TSO bursts to it go the kernel way (UDP socket,
    // VXLAN device, bridge) and arrive intact; none is decapsulated in BPF. Back in: BPF again.
    fp2.remove_endpoint(t.j2.ip)?;
    let before = counters(&fp2)?;
    tcp_roundtrip(&t.j1.ns, &t.j2.ns, t.j2.ip, 7305, 4 << 20).context("TCP, endpoint missing")?;
    let after = counters(&fp2)?;
    ensure!(
        after.decapsulated_gso == before.decapsulated_gso && after.passed > before.passed + 10,
        "endpoint missing: TSO bursts not left to the kernel: {before:?} -> {after:?}"
    );
    let ep2 = in_ns(&t.h2, || endpoint(&t.h2, &t.j2))?;
    fp2.upsert_endpoint(t.j2.ip, ep2)?;
    tcp_roundtrip(&t.j1.ns, &t.j2.ns, t.j2.ip, 7306, 4 << 20).context("TCP, endpoint back")?;
    let back = counters(&fp2)?;
    ensure!(
        back.decapsulated_gso > after.decapsulated_gso,
        "endpoint back: TSO bursts not decapsulated in BPF: {after:?} -> {back:?}"
    );

    // A restarted loader swaps its programs into the underlay attachment (and the others) while
    // a ping stream runs through encapsulation and decapsulation in BPF: nothing is lost.
    const PINGS: u32 = 40;
    let ids_before = programs_on(mode, &t.h1, "ul0")?;
    let (j1, ip2) = (t.j1.ns.clone(), t.j2.ip);
    let pinger = std::thread::spawn(move || ping_count(&j1, ip2, PINGS));
    std::thread::sleep(Duration::from_millis(400));
    let counted = counters(&fp1)?;
    drop(fp1);
    let mut fp1 = in_ns(&t.h1, || Ok(FastPath::load_with(&pin1, mode)?))?;
    ensure!(
        !pinger.is_finished(),
        "the ping stream ended before the restart; the check proved nothing"
    );
    let ids_after = programs_on(mode, &t.h1, "ul0")?;
    ensure!(
        ids_after.len() == 1 && ids_after != ids_before,
        "underlay program not swapped: {ids_before:?} -> {ids_after:?}"
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
        end.encapsulated > counted.encapsulated && end.decapsulated > counted.decapsulated,
        "restarted programs not in BPF VXLAN: {counted:?} -> {end:?}"
    );

    // Without the tunnel entry, host 1 goes through its VXLAN device again.
    fp1.remove_tunnel(BLOCK2)?;
    fp1.remove_tunnel(BLOCK2)?; // idempotent
    let before = counters(&fp1)?;
    ensure!(
        ping_count(&t.j1.ns, t.j2.ip, 5) == 5,
        "tunnel removed: ping lost"
    );
    let after = counters(&fp1)?;
    ensure!(
        after.encapsulated == before.encapsulated
            && after.redirected_remote >= before.redirected_remote + 5,
        "tunnel removed: {before:?} -> {after:?}"
    );
    in_ns(&t.h1, || Ok(fp1.unpin()?))?;
    in_ns(&t.h2, || Ok(fp2.unpin()?))?;
    ensure!(ping(&t.j1.ns, t.j2.ip, 3), "traffic after uninstall");
    Ok(())
}

/// ECN across the tunnel as the kernel's VXLAN device does it (RFC 6040, normal mode). BPF
/// encapsulation copies the inner ECN field to the outer header (a CE mark as ECT(0)), so
/// routers on the underlay can signal congestion; BPF decapsulation carries a CE mark of the
/// outer header into the inner one (and ECT(1) over ECT(0)), and leaves a CE mark on a packet
/// whose sender does not do ECN to the kernel, which drops it.
#[test]
fn ecn_crosses_the_tunnel_as_rfc_6040_says() -> Result<()> {
    if !lab::should_run("ecn_crosses_the_tunnel_as_rfc_6040_says") {
        return Ok(());
    }
    let t = two_hosts()?;
    let mode = AttachMode::Tcx;
    let (pin1, pin2) = (t.pin1.clone(), t.pin2.clone());
    let mut fp1 = decap_on(mode, &t.h1, &pin1, &t.j1, BLOCK2, UL1, VTEP1, true)?;
    fp1.upsert_tunnel(
        BLOCK2,
        flynn_ebpf::Tunnel {
            remote_ip: UL2,
            vtep_mac: parse_mac(VTEP2),
        },
    )?;
    let fp2 = decap_on(mode, &t.h2, &pin2, &t.j2, BLOCK1, UL2, VTEP2, false)?;

    // Encapsulation on host 1: the outer TOS as host 2's underlay device receives it.
    let capture = in_ns(&t.h2, || {
        let proto = socket2::Protocol::from(i32::from((libc::ETH_P_ALL as u16).to_be()));
        let s = socket2::Socket::new(socket2::Domain::PACKET, socket2::Type::RAW, Some(proto))?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(s)
    })?;
    for (port, inner, outer) in [
        (7401u16, 0u8, 0u8),
        (7402, 0x02, 0x02),
        (7403, 0x01, 0x01),
        (7404, 0x03, 0x02),
        (7405, 0xb8 | 0x02, 0x02),
    ] {
        let before = counters(&fp1)?;
        let to = SocketAddr::from((t.j2.ip, port));
        in_ns(&t.j1.ns, || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
            s.set_tos_v4(u32::from(inner))?;
            s.send_to(b"ecn", &to.into())?;
            Ok(())
        })?;
        let seen = outer_tos_of(&capture, t.j2.ip, port)
            .with_context(|| format!("no VXLAN packet to port {port} seen on host 2"))?;
        ensure!(
            counters(&fp1)?.encapsulated > before.encapsulated,
            "inner TOS {inner:#x}: not encapsulated in BPF"
        );
        ensure!(
            seen == outer,
            "inner TOS {inner:#x}: outer TOS {seen:#x}, want {outer:#x}"
        );
    }

    // Decapsulation on host 2: hand-made VXLAN datagrams with an outer TOS.
    let vxlan = SocketAddr::from((UL2, 8472));
    for (k, (outer, inner, want)) in [
        (0x03u8, 0x02u8, Some(0x03u8)),
        (0x03, 0x01, Some(0x03)),
        (0x01, 0x02, Some(0x01)),
        (0x02, 0x01, Some(0x01)),
        (0x00, 0xb8 | 0x02, Some(0xb8 | 0x02)),
        (0x02, 0x00, Some(0x00)),
        (0x03, 0x00, None),
    ]
    .into_iter()
    .enumerate()
    {
        let port = 7410 + k as u16;
        let to_job = SocketAddr::from((t.j2.ip, port));
        let frame = vxlan_frame(1, inner, parse_mac(VTEP2), t.j1.ip, t.j2.ip, port, b"ecn");
        let before = counters(&fp2)?;
        let got = receives_tos(&t.j2.ns, to_job, || {
            send_udp_tos(&t.h1, UL1, vxlan, &frame, false, outer)
        })?;
        let after = counters(&fp2)?;
        let case = format!("outer {outer:#x}, inner {inner:#x}");
        ensure!(
            got == want,
            "{case}: the job saw TOS {got:?}, want {want:?}"
        );
        match want {
            Some(_) => ensure!(
                after.decapsulated == before.decapsulated + 1,
                "{case}: not decapsulated in BPF: {before:?} -> {after:?}"
            ),
            None => ensure!(
                after.decapsulated == before.decapsulated && after.passed > before.passed,
                "{case}: not left to the kernel: {before:?} -> {after:?}"
            ),
        }
    }
    Ok(())
}

/// The outer TOS of the first VXLAN packet `capture` (a packet socket) sees carrying a datagram
/// to `dst:dport`, within 2 s.
fn outer_tos_of(capture: &socket2::Socket, dst: Ipv4Addr, dport: u16) -> Option<u8> {
    use std::io::Read;
    // Outer Ethernet (14), IPv4 (20), UDP (8), VXLAN (8), inner Ethernet (14), inner IPv4.
    const INNER_IP: usize = 14 + 20 + 8 + 8 + 14;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; 2048];
    let mut sock = capture;
    while std::time::Instant::now() < deadline {
        let Ok(n) = sock.read(&mut buf) else { continue };
        let f = &buf[..n];
        if n < INNER_IP + 24
            || f[12..14] != [0x08, 0x00]
            || f[23] != 17
            || f[36..38] != 8472u16.to_be_bytes()
        {
            continue;
        }
        let inner = &f[INNER_IP..];
        if inner[16..20] == dst.octets() && inner[22..24] == dport.to_be_bytes() {
            return Some(f[15]);
        }
    }
    None
}

/// A UDP socket in `ns` at `addr` that reports the TOS of what it receives: the TOS of the one
/// datagram that arrives within a second after `send`, or None.
fn receives_tos(
    ns: &str,
    addr: SocketAddr,
    send: impl FnOnce() -> Result<()>,
) -> Result<Option<u8>> {
    use nix::sys::socket::{
        recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrIn,
    };
    let sock = in_ns(ns, || Ok(UdpSocket::bind(addr)?))?;
    sock.set_read_timeout(Some(Duration::from_millis(1000)))?;
    setsockopt(&sock, sockopt::IpRecvTos, &true)?;
    send()?;
    let mut buf = [0u8; 2048];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!(u8);
    let msg = match recvmsg::<SockaddrIn>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    ) {
        Ok(m) => m,
        Err(nix::errno::Errno::EAGAIN) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::Ipv4Tos(tos) = c {
            return Ok(Some(tos));
        }
    }
    anyhow::bail!("a datagram without its TOS")
}
