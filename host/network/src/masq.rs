//! Outbound NAT for jobs and IP forwarding, as flannel's `--ip-masq` and Flynn's host set them up.
//!
//! Job addresses come from the cluster network (`100.100.0.0/16`) and mean nothing outside the
//! cluster: a job's packet to the internet leaves with that source and its answer has no way
//! back. Packets from the cluster network to anywhere outside it (multicast aside) are therefore
//! masqueraded to the address of the interface they leave by; packets between jobs, on one host
//! or across the overlay, keep their addresses. The rules live in an nftables table of their own,
//! `ip flynn-masq`, written over netlink in one transaction that replaces whatever the table held
//! (so a restarted agent, or one on a different cluster network, never stacks rules), and stay
//! when the agent exits: connections keep their NAT while the agent restarts, as the overlay's
//! routes and pinned maps do. `--ip-masq false` takes the table out. The agent checks on every
//! periodic resync that the table is still there and puts it back if not.
//!
//! A NAT chain registers netfilter hooks and turns connection tracking on for the namespace:
//! the overlay's kernel path then pays ~20% on its cross-host round trip (the eBPF fast path
//! passes no hook and does not move; `perf/RESULTS.md`). Packets that NAT never touches are kept
//! out of conntrack: job to job (the inner packets) and the VXLAN packets themselves are marked
//! `notrack` before conntrack sees them, so overlay flows never fill the conntrack table.
//!
//! ```text
//! table ip flynn-masq {
//!   chain prerouting { type filter hook prerouting priority raw;
//!     ip saddr 100.100.0.0/16 ip daddr 100.100.0.0/16 notrack
//!     udp dport 8472 notrack }
//!   chain output { type filter hook output priority raw;
//!     (the same two rules) }
//!   chain postrouting {
//!     type nat hook postrouting priority srcnat; policy accept;
//!     ip saddr 100.100.0.0/16 ip daddr 100.100.0.0/16 accept
//!     ip saddr 100.100.0.0/16 ip daddr != 224.0.0.0/4 masquerade
//!   }
//! }
//! ```

use std::net::Ipv4Addr;

use rustables::expr::{
    Bitwise, Cmp, CmpOp, HighLevelPayload, IPv4HeaderField, Immediate, Masquerade,
    NetworkHeaderField, RawExpression, VerdictKind,
};
use rustables::{Batch, Chain, ChainPolicy, ChainType, Hook, HookClass, MsgType, ProtocolFamily};
use rustables::{Rule, Table};

use crate::Subnet;

/// The nftables table that holds the rules.
pub const TABLE: &str = "flynn-masq";
const CHAIN: &str = "postrouting";
/// `srcnat`, the priority of source NAT in the postrouting hook.
const SRCNAT: i32 = 100;
/// `raw` (-300): ahead of connection tracking, which hooks in at -200.
const RAW: i32 = -300;

#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    #[error("building the nftables rules: {0}")]
    Build(String),
    #[error("nftables transaction (is nf_tables with NAT in this kernel?): {0}")]
    Send(String),
    #[error("enabling IP forwarding ({path}): {source}")]
    Forwarding {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn table() -> Table {
    Table::new(ProtocolFamily::Ipv4).with_name(TABLE)
}

/// Matches packets whose `field` address lies in `net` (`negate`: outside it).
fn in_net(
    rule: Rule,
    field: IPv4HeaderField,
    net: (Ipv4Addr, u8),
    negate: bool,
) -> Result<Rule, MasqError> {
    let mask = u32::MAX.checked_shl(32 - u32::from(net.1)).unwrap_or(0);
    let base = u32::from(net.0) & mask;
    let op = if negate { CmpOp::Neq } else { CmpOp::Eq };
    Ok(rule
        .with_expr(HighLevelPayload::Network(NetworkHeaderField::IPv4(field)).build())
        .with_expr(
            Bitwise::new(mask.to_be_bytes(), [0u8; 4])
                .map_err(|e| MasqError::Build(e.to_string()))?,
        )
        .with_expr(Cmp::new(op, base.to_be_bytes())))
}

/// The transaction that makes the table exactly the rules for `network` (VXLAN on UDP
/// `vxlan_port`): adding the table first makes the delete that follows valid whether or not it
/// existed.
fn install_batch(network: &Subnet, vxlan_port: u16) -> Result<Batch, MasqError> {
    let net = (network.addr(), network.prefix_len());
    let table = table();
    let mut batch = Batch::new();
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch.add(&table, MsgType::Add);
    let build = |e: rustables::error::BuilderError| MasqError::Build(e.to_string());
    // Untracked: job to job, and the tunnel's own packets (`notrack` has no attributes).
    for (name, hook) in [
        ("prerouting", HookClass::PreRouting),
        ("output", HookClass::Out),
    ] {
        let chain = Chain::new(&table)
            .with_name(name)
            .with_hook(Hook::new(hook, RAW))
            .with_type(ChainType::Filter)
            .with_policy(ChainPolicy::Accept);
        batch.add(&chain, MsgType::Add);
        let notrack = || RawExpression::default().with_name("notrack");
        let inner = Rule::new(&chain).map_err(build)?;
        let inner = in_net(inner, IPv4HeaderField::Saddr, net, false)?;
        let inner = in_net(inner, IPv4HeaderField::Daddr, net, false)?.with_expr(notrack());
        batch.add(&inner, MsgType::Add);
        let tunnel = Rule::new(&chain)
            .map_err(build)?
            .dport(vxlan_port, rustables::Protocol::UDP)
            .with_expr(notrack());
        batch.add(&tunnel, MsgType::Add);
    }
    let chain = Chain::new(&table)
        .with_name(CHAIN)
        .with_hook(Hook::new(HookClass::PostRouting, SRCNAT))
        .with_type(ChainType::Nat)
        .with_policy(ChainPolicy::Accept);
    batch.add(&chain, MsgType::Add);
    let inside = Rule::new(&chain).map_err(build)?;
    let inside = in_net(inside, IPv4HeaderField::Saddr, net, false)?;
    let inside = in_net(inside, IPv4HeaderField::Daddr, net, false)?
        .with_expr(Immediate::new_verdict(VerdictKind::Accept));
    batch.add(&inside, MsgType::Add);
    let out = Rule::new(&chain).map_err(build)?;
    let out = in_net(out, IPv4HeaderField::Saddr, net, false)?;
    let out = in_net(
        out,
        IPv4HeaderField::Daddr,
        (Ipv4Addr::new(224, 0, 0, 0), 4),
        true,
    )?
    .with_expr(Masquerade::default());
    batch.add(&out, MsgType::Add);
    Ok(batch)
}

/// Masquerades traffic from `network` to the world outside it, and keeps job-to-job and VXLAN
/// (UDP `vxlan_port`) packets out of connection tracking (replacing earlier rules).
pub fn install(network: &Subnet, vxlan_port: u16) -> Result<(), MasqError> {
    install_batch(network, vxlan_port)?
        .send()
        .map_err(|e| MasqError::Send(e.to_string()))
}

/// Whether the table is there (an operator's `nft flush ruleset`, or a firewall manager
/// reloading, takes it out behind the agent's back).
pub fn present() -> Result<bool, MasqError> {
    let tables = rustables::list_tables().map_err(|e| MasqError::Send(e.to_string()))?;
    Ok(tables
        .iter()
        .any(|t| t.get_name().is_some_and(|n| n == TABLE)))
}

/// Takes the rules out (nothing to do when there are none).
pub fn remove() -> Result<(), MasqError> {
    let table = table();
    let mut batch = Batch::new();
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch.send().map_err(|e| MasqError::Send(e.to_string()))
}

/// Turns on IPv4 forwarding in this network namespace: the host routes between its jobs'
/// bridge, the overlay and the underlay (Debian and Ubuntu ship with it off).
pub fn enable_forwarding() -> Result<(), MasqError> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    match std::fs::read_to_string(PATH) {
        Ok(v) if v.trim() == "1" => Ok(()),
        _ => {
            std::fs::write(PATH, "1").map_err(|source| MasqError::Forwarding { path: PATH, source })
        }
    }
}
