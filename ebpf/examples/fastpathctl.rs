//! Manual control of the fast path, for experiments and the perf harness. Runs in the caller's
//! network namespace (use `ip netns exec`).
//!
//! `FLYNN_FASTPATH_ATTACH=netlink|tcx` forces the attach mechanism (default: auto).
//!
//! ```text
//! fastpathctl PIN_DIR attach IFNAME job|vxlan|underlay
//! fastpathctl PIN_DIR underlay LOCAL_IP VNI PORT VTEP_MAC [ENCAP_IFNAME]
//! fastpathctl PIN_DIR tunnel NEXT_HOP REMOTE_IP VTEP_MAC
//! fastpathctl PIN_DIR rm-tunnel NEXT_HOP
//! fastpathctl PIN_DIR rm-underlay
//! fastpathctl PIN_DIR detach IFNAME
//! fastpathctl PIN_DIR endpoint IP IFNAME JOB_MAC GATEWAY_MAC
//! fastpathctl PIN_DIR rm-endpoint IP
//! fastpathctl PIN_DIR prefix NET/LEN IFNAME NEXT_HOP
//! fastpathctl PIN_DIR rm-prefix NET/LEN
//! fastpathctl PIN_DIR counters
//! fastpathctl PIN_DIR unpin
//! ```

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{bail, Context, Result};
use flynn_ebpf::{AttachMode, Endpoint, FastPath, Hop, Role, Tunnel, Underlay};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let Some((pin, rest)) = a.split_first() else {
        bail!("usage: fastpathctl PIN_DIR COMMAND ... (see the source header)");
    };
    // FLYNN_FASTPATH_ATTACH=netlink|tcx forces the attach mechanism (default: auto).
    let mode = match std::env::var("FLYNN_FASTPATH_ATTACH").as_deref() {
        Ok("netlink") => AttachMode::Netlink,
        Ok("tcx") => AttachMode::Tcx,
        _ => AttachMode::Auto,
    };
    let mut fp = FastPath::load_with(Path::new(pin), mode).context("load")?;
    match rest {
        ["attach", dev, role] => {
            let role = match *role {
                "job" => Role::JobVeth,
                "vxlan" => Role::Vxlan,
                "underlay" => Role::Underlay,
                r => bail!("role {r:?}: want job, vxlan or underlay"),
            };
            fp.attach(ifindex(dev)?, role)?;
        }
        ["detach", dev] => fp.detach(ifindex(dev)?)?,
        ["endpoint", ip, dev, mac, gw] => fp.upsert_endpoint(
            ip.parse()?,
            Endpoint {
                ifindex: ifindex(dev)?,
                mac: parse_mac(mac)?,
                gateway_mac: parse_mac(gw)?,
            },
        )?,
        ["underlay", ip, vni, port, mac, dev @ ..] if dev.len() <= 1 => {
            fp.set_underlay(Underlay {
                local_ip: ip.parse()?,
                vni: vni.parse()?,
                port: port.parse()?,
                vtep_mac: parse_mac(mac)?,
                ifindex: match dev.first() {
                    Some(d) => ifindex(d)?,
                    None => 0,
                },
            })?
        }
        ["tunnel", hop, ip, mac] => fp.upsert_tunnel(
            hop.parse()?,
            Tunnel {
                remote_ip: ip.parse()?,
                vtep_mac: parse_mac(mac)?,
            },
        )?,
        ["rm-tunnel", hop] => fp.remove_tunnel(hop.parse()?)?,
        ["rm-underlay"] => fp.clear_underlay()?,
        ["rm-endpoint", ip] => fp.remove_endpoint(ip.parse()?)?,
        ["prefix", net, dev, hop] => {
            let (net, len) = parse_net(net)?;
            fp.upsert_prefix(
                net,
                len,
                Hop {
                    ifindex: ifindex(dev)?,
                    next_hop: hop.parse()?,
                },
            )?;
        }
        ["rm-prefix", net] => {
            let (net, len) = parse_net(net)?;
            fp.remove_prefix(net, len)?;
        }
        ["counters"] => {
            let c = fp.counters()?;
            println!(
                "redirected_local {}\nredirected_remote {}\nencapsulated {}\ndecapsulated {}\ndecapsulated_gso {}\npassed {}",
                c.redirected_local,
                c.redirected_remote,
                c.encapsulated,
                c.decapsulated,
                c.decapsulated_gso,
                c.passed
            );
        }
        ["unpin"] => fp.unpin()?,
        _ => bail!("unknown command {rest:?} (see the source header)"),
    }
    Ok(())
}

fn ifindex(name: &str) -> Result<u32> {
    let path = format!("/sys/class/net/{name}/ifindex");
    let s = std::fs::read_to_string(&path).with_context(|| format!("no interface {name}"))?;
    Ok(s.trim().parse()?)
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let mut out = [0u8; 6];
    let parts: Vec<_> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("bad MAC {s:?}");
    }
    for (o, p) in out.iter_mut().zip(parts) {
        *o = u8::from_str_radix(p, 16).with_context(|| format!("bad MAC {s:?}"))?;
    }
    Ok(out)
}

fn parse_net(s: &str) -> Result<(Ipv4Addr, u8)> {
    let (net, len) = s.split_once('/').context("want NET/LEN")?;
    Ok((net.parse()?, len.parse()?))
}
