//! The `discoverd.` zone as a pure function of the registry (spec §2.8): a query name
//! and type in, a response code and records out. No I/O; the server is in `dns`.

use std::net::IpAddr;

use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};

use crate::store::state::Registry;
use crate::store::types::Instance;

/// UDP answers carry at most this many instances (spec §2.8); TCP is unlimited.
pub const UDP_INSTANCE_LIMIT: usize = 3;

#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The name is in our zone: answer authoritatively.
    Answer {
        code: ResponseCode,
        answers: Vec<Record>,
        additionals: Vec<Record>,
    },
    /// The name is outside `discoverd.`: forward it, or refuse when recursion is off.
    NotOurs,
}

/// What a name under `discoverd.` refers to.
#[derive(Debug, PartialEq, Eq)]
enum Target<'a> {
    Service(&'a str),
    ServiceProto(&'a str, &'a str),
    Instance(&'a str, &'a str),
    Leader(&'a str),
}

/// Parses a lower-cased name's labels (the root excluded); `Err(true)` = in the zone
/// but not a known form, `Err(false)` = not in the zone. Labels, not the name's text: a
/// label may itself hold a dot (`a\.discoverd.` is one label, a top-level name).
fn parse<'a>(labels: &[&'a str]) -> Result<Target<'a>, bool> {
    let target = parse_labels(labels)?;
    let (Target::Service(svc)
    | Target::ServiceProto(svc, _)
    | Target::Instance(svc, _)
    | Target::Leader(svc)) = target;
    if !service_name(svc) {
        return Err(true);
    }
    Ok(target)
}

/// A service name as the API accepts it (`[a-z0-9-]+`, the name already lower-cased):
/// anything else names no service here, and a proxy never puts it into a peer's URL.
fn service_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn parse_labels<'a>(labels: &[&'a str]) -> Result<Target<'a>, bool> {
    match labels {
        ["discoverd"] => Err(true),
        ["leader", svc, "discoverd"] => Ok(Target::Leader(svc)),
        [id, svc, "_i", "discoverd"] => Ok(Target::Instance(svc, id)),
        [svc, proto, "discoverd"] => match (svc.strip_prefix('_'), proto.strip_prefix('_')) {
            (Some(s), Some(p)) => Ok(Target::ServiceProto(s, p)),
            _ => Err(true),
        },
        [svc, "discoverd"] => Ok(Target::Service(svc)),
        [.., "discoverd"] => Err(true),
        _ => Err(false),
    }
}

/// True for a name that only exists because names below it do, answered NOERROR without
/// records: `<svc>._i.discoverd.` while the service has instances, and the two that may
/// have names below them from any service, `_i.discoverd.` and `_<proto>.discoverd.`
/// (above every `_<svc>._<proto>.discoverd.`), always: a proxy cannot tell without asking
/// about every service, and a NOERROR for a name with nothing below misleads no resolver,
/// where an NXDOMAIN hides everything below it (RFC 8020).
fn empty_non_terminal(reg: &Registry, labels: &[&str]) -> bool {
    match labels {
        ["_i", "discoverd"] => true,
        [svc, "_i", "discoverd"] => reg.data.instances.get(*svc).is_some_and(|m| !m.is_empty()),
        [proto, "discoverd"] => proto.len() > 1 && proto.starts_with('_'),
        _ => false,
    }
}

/// An answer in the zone with SERVFAIL (nothing to say from here).
pub fn servfail() -> Lookup {
    Lookup::Answer {
        code: ResponseCode::ServFail,
        answers: Vec::new(),
        additionals: Vec::new(),
    }
}

fn nxdomain() -> Lookup {
    Lookup::Answer {
        code: ResponseCode::NXDomain,
        answers: Vec::new(),
        additionals: Vec::new(),
    }
}

fn host_port(addr: &str) -> Option<(IpAddr, u16)> {
    let (h, p) = addr.rsplit_once(':')?;
    let h = h.trim_start_matches('[').trim_end_matches(']');
    Some((h.parse().ok()?, p.parse().ok()?))
}

fn zone_name(s: &str) -> Name {
    Name::from_ascii(s).unwrap_or_else(|_| Name::root())
}

fn addr_record(name: &Name, ip: IpAddr) -> Record {
    let data = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name.clone(), 0, data)
}

/// The zone's SOA record, sent in the authority section of answers without records.
pub fn soa(serial: u32) -> Record {
    let data = SOA::new(
        zone_name("ns.discoverd."),
        zone_name("postmaster.discoverd."),
        serial,
        3600,
        600,
        86400,
        0,
    );
    Record::from_rdata(zone_name("discoverd."), 0, RData::SOA(data))
}

/// Answers `qname` (as asked, any case) of type `qtype` from `reg`.
/// The service a name of the zone is about (`None` for names outside it or malformed).
pub fn service_of(qname: &Name) -> Option<String> {
    let lower = qname.to_lowercase();
    let raw: Vec<&[u8]> = lower.iter().collect();
    if raw.last() != Some(&&b"discoverd"[..]) {
        return None;
    }
    let labels = raw
        .iter()
        .map(|l| std::str::from_utf8(l))
        .collect::<Result<Vec<&str>, _>>()
        .ok()?;
    // `<svc>._i.discoverd.`: an empty non-terminal while the service has instances.
    if let [svc, "_i", "discoverd"] = labels[..] {
        if service_name(svc) {
            return Some(svc.to_string());
        }
    }
    match parse(&labels).ok()? {
        Target::Service(s)
        | Target::ServiceProto(s, _)
        | Target::Instance(s, _)
        | Target::Leader(s) => Some(s.to_string()),
    }
}

pub fn lookup(reg: &Registry, qname: &Name, qtype: RecordType, tcp: bool) -> Lookup {
    let lower = qname.to_lowercase();
    let raw: Vec<&[u8]> = lower.iter().collect();
    if raw.last() != Some(&&b"discoverd"[..]) {
        return Lookup::NotOurs;
    }
    // Service names and instance ids are ASCII; a label that is not UTF-8 names nothing.
    let Ok(labels) = raw
        .iter()
        .map(|l| std::str::from_utf8(l))
        .collect::<Result<Vec<&str>, _>>()
    else {
        return nxdomain();
    };
    // The zone's apex exists (it holds the SOA): NOERROR without records, the SOA then
    // going in the authority section (or the answer, for an SOA query: see `dns::mod`).
    // NXDOMAIN here would tell a resolver that minimises query names, or one that follows
    // RFC 8020, that nothing below `discoverd.` exists.
    if labels == ["discoverd"] {
        return Lookup::Answer {
            code: ResponseCode::NoError,
            answers: Vec::new(),
            additionals: Vec::new(),
        };
    }
    let target = match parse(&labels) {
        Ok(t) => t,
        // The same for an empty non-terminal: no records of its own, names below it.
        Err(true) if empty_non_terminal(reg, &labels) => {
            return Lookup::Answer {
                code: ResponseCode::NoError,
                answers: Vec::new(),
                additionals: Vec::new(),
            }
        }
        Err(true) => return nxdomain(),
        Err(false) => return Lookup::NotOurs,
    };
    let service = match target {
        Target::Service(s)
        | Target::ServiceProto(s, _)
        | Target::Instance(s, _)
        | Target::Leader(s) => s,
    };
    if !reg.data.services.contains_key(service) {
        return nxdomain();
    }
    // (instance, SRV target) pairs.
    let found: Vec<(Instance, Name)> = match target {
        Target::Service(_) | Target::ServiceProto(..) => {
            let proto = match target {
                Target::ServiceProto(_, p) => Some(p),
                _ => None,
            };
            reg.instances(service)
                .into_iter()
                .filter(|i| proto.is_none_or(|p| i.proto == p))
                .map(|i| {
                    let t = zone_name(&format!("{}.{service}._i.discoverd.", i.id));
                    (i, t)
                })
                .collect()
        }
        Target::Instance(_, id) => match reg.instance(service, id) {
            Some(i) => vec![(i.clone(), qname.clone())],
            None => return nxdomain(),
        },
        Target::Leader(_) => match reg.leader(service) {
            Some(i) => vec![(i, qname.clone())],
            None => return nxdomain(),
        },
    };
    let want_v4 = matches!(qtype, RecordType::A | RecordType::ANY);
    let want_v6 = matches!(qtype, RecordType::AAAA | RecordType::ANY);
    let want_srv = matches!(qtype, RecordType::SRV | RecordType::ANY);
    // Filter by address family and, except for SRV, deduplicate by IP before the
    // shuffle and the UDP cut (as dns.go does): the limit counts answers, not instances
    // that would give none.
    let mut ips: Vec<IpAddr> = Vec::new();
    let mut found: Vec<(IpAddr, u16, Name)> = found
        .into_iter()
        .filter_map(|(inst, srv_target)| {
            let (ip, port) = host_port(&inst.addr)?;
            let family = if ip.is_ipv4() { want_v4 } else { want_v6 };
            if !family && !want_srv {
                return None;
            }
            if qtype != RecordType::SRV {
                if ips.contains(&ip) {
                    return None;
                }
                ips.push(ip);
            }
            Some((ip, port, srv_target))
        })
        .collect();
    fastrand::shuffle(&mut found);
    if !tcp {
        found.truncate(UDP_INSTANCE_LIMIT);
    }
    let mut answers = Vec::new();
    let mut additionals = Vec::new();
    for (ip, port, srv_target) in found {
        if ip.is_ipv4() && want_v4 || ip.is_ipv6() && want_v6 {
            answers.push(addr_record(qname, ip));
        }
        if want_srv {
            if tcp {
                additionals.push(addr_record(&srv_target, ip));
            }
            let srv = SRV::new(1, 1, port, srv_target);
            answers.push(Record::from_rdata(qname.clone(), 0, RData::SRV(srv)));
        }
    }
    Lookup::Answer {
        code: ResponseCode::NoError,
        answers,
        additionals,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::types::{LeaderType, ServiceConfig};

    /// Adds service `svc` with instances at `addrs` (index order).
    fn add(reg: &mut Registry, svc: &str, addrs: &[(String, &str)]) {
        let cfg = ServiceConfig {
            leader_type: LeaderType::Oldest,
        };
        reg.data.services.insert(svc.into(), cfg);
        let mut insts = std::collections::BTreeMap::new();
        for (n, (addr, proto)) in addrs.iter().enumerate() {
            let id = crate::api::instance_id(proto, addr);
            let i = Instance {
                id: id.clone(),
                addr: addr.to_string(),
                proto: proto.to_string(),
                meta: Default::default(),
                index: n as u64 + 1,
            };
            insts.insert(id, i);
        }
        reg.data.instances.insert(svc.into(), insts.into());
    }

    fn registry() -> Registry {
        let mut reg = Registry::default();
        add(&mut reg, "empty", &[]);
        let web = [
            ("10.0.0.1:80", "tcp"),
            ("10.0.0.1:81", "tcp"),
            ("10.0.0.2:53", "udp"),
            ("[fd00::1]:80", "tcp"),
        ];
        add(&mut reg, "web", &web.map(|(a, p)| (a.to_string(), p)));
        reg
    }

    fn answer(
        reg: &Registry,
        name: &str,
        t: RecordType,
        tcp: bool,
    ) -> (ResponseCode, Vec<RData>, usize) {
        match lookup(reg, &Name::from_ascii(name).unwrap(), t, tcp) {
            Lookup::Answer {
                code,
                answers,
                additionals,
            } => (
                code,
                answers.into_iter().map(|r| r.data).collect(),
                additionals.len(),
            ),
            Lookup::NotOurs => panic!("{name} not ours"),
        }
    }

    fn parse(name: &str) -> Result<Target<'_>, bool> {
        super::parse(&name.split('.').collect::<Vec<_>>())
    }

    #[test]
    fn names_parse_into_targets() {
        assert_eq!(parse("web.discoverd"), Ok(Target::Service("web")));
        assert_eq!(
            parse("_web._tcp.discoverd"),
            Ok(Target::ServiceProto("web", "tcp"))
        );
        assert_eq!(parse("leader.web.discoverd"), Ok(Target::Leader("web")));
        assert_eq!(
            parse("abc.web._i.discoverd"),
            Ok(Target::Instance("web", "abc"))
        );
        assert_eq!(parse("a.b.c.d.discoverd"), Err(true));
        assert_eq!(parse("web.tcp.discoverd"), Err(true));
        assert_eq!(parse("discoverd"), Err(true));
        assert_eq!(parse("example.com"), Err(false));
        // Names no service could have: in the zone, answered NXDOMAIN, never proxied.
        for bad in [
            "x#.discoverd",
            "a?b.discoverd",
            "leader.a/b.discoverd",
            "_x%2f._tcp.discoverd",
            "abc.w_b._i.discoverd",
        ] {
            assert_eq!(parse(bad), Err(true), "{bad}");
            let name = Name::from_labels(bad.split('.').map(str::as_bytes)).unwrap();
            assert_eq!(service_of(&name), None, "{bad}");
        }
        assert_eq!(
            service_of(&Name::from_ascii("leader.web-1.discoverd.").unwrap()),
            Some("web-1".into())
        );
    }

    #[test]
    fn the_zone_is_decided_by_labels_not_text() {
        let reg = registry();
        let ask = |n: &str| lookup(&reg, &Name::from_ascii(n).unwrap(), RecordType::A, false);
        // One label that holds a dot: a top-level name, not ours.
        assert_eq!(ask("a\\.discoverd."), Lookup::NotOurs);
        assert_eq!(ask("discoverd.com."), Lookup::NotOurs);
        // The apex: in the zone, NOERROR without records (it holds the SOA).
        assert!(matches!(
            ask("DISCOVERD."),
            Lookup::Answer { code: ResponseCode::NoError, ref answers, .. } if answers.is_empty()
        ));
        // A dotted label inside the zone names no service.
        assert_eq!(ask("web\\.x.discoverd."), nxdomain());
        assert!(matches!(
            ask("Web.Discoverd."),
            Lookup::Answer {
                code: ResponseCode::NoError,
                ..
            }
        ));
    }

    #[test]
    fn answers_follow_the_table() {
        let reg = registry();
        let nx = ResponseCode::NXDomain;
        // A answers are deduplicated by IP; TCP is unlimited.
        let (code, a, _) = answer(&reg, "web.discoverd.", RecordType::A, true);
        assert_eq!(code, ResponseCode::NoError);
        assert_eq!(a.len(), 2);
        let (_, a, _) = answer(&reg, "WEB.Discoverd.", RecordType::AAAA, true);
        assert_eq!(a, vec![RData::AAAA(AAAA("fd00::1".parse().unwrap()))]);
        // UDP carries at most 3 instances.
        let (_, srv, glue) = answer(&reg, "web.discoverd.", RecordType::SRV, false);
        assert_eq!((srv.len(), glue), (3, 0));
        let (_, srv, glue) = answer(&reg, "_web._tcp.discoverd.", RecordType::SRV, true);
        assert_eq!((srv.len(), glue), (3, 3));
        let (_, srv, _) = answer(&reg, "_web._udp.discoverd.", RecordType::SRV, true);
        match &srv[..] {
            [RData::SRV(s)] => {
                assert_eq!((s.priority, s.weight, s.port), (1, 1, 53));
                let id = crate::api::instance_id("udp", "10.0.0.2:53");
                assert_eq!(s.target.to_ascii(), format!("{id}.web._i.discoverd."));
            }
            other => panic!("{other:?}"),
        }
        // Leader = oldest instance; its SRV targets the queried name.
        let (_, l, _) = answer(&reg, "leader.web.discoverd.", RecordType::A, false);
        assert_eq!(l, vec![RData::A(A("10.0.0.1".parse().unwrap()))]);
        let id = crate::api::instance_id("tcp", "10.0.0.1:81");
        let name = format!("{id}.web._i.discoverd.");
        let (_, i, _) = answer(&reg, &name, RecordType::SRV, false);
        match &i[..] {
            [RData::SRV(s)] => assert_eq!(s.target.to_ascii(), name),
            other => panic!("{other:?}"),
        }
        // ANY is deduplicated by IP too (dns.go): one A/AAAA and one SRV per IP.
        let (_, any, _) = answer(&reg, "web.discoverd.", RecordType::ANY, true);
        assert_eq!(any.len(), 3 + 3);
        // Unknown service, instance, leader and forms: NXDOMAIN.
        assert_eq!(answer(&reg, "nope.discoverd.", RecordType::A, false).0, nx);
        assert_eq!(
            answer(&reg, "leader.empty.discoverd.", RecordType::A, false).0,
            nx
        );
        assert_eq!(
            answer(&reg, "x.web._i.discoverd.", RecordType::A, false).0,
            nx
        );
        assert_eq!(
            answer(&reg, "a.b.c.d.discoverd.", RecordType::A, false).0,
            nx
        );
        // A known service without instances: an empty answer.
        let (code, a, _) = answer(&reg, "empty.discoverd.", RecordType::A, false);
        assert_eq!((code, a.len()), (ResponseCode::NoError, 0));
        // Empty non-terminals (names below them exist): NOERROR without records, not
        // NXDOMAIN, which tells an RFC 8020 or query-name-minimising resolver that
        // `_web._tcp.discoverd.` and the instance names do not exist.
        for ent in [
            "_tcp.discoverd.",
            "_i.discoverd.",
            "web._i.discoverd.",
            "_I.Discoverd.",
        ] {
            let (code, a, _) = answer(&reg, ent, RecordType::A, false);
            assert_eq!((code, a.len()), (ResponseCode::NoError, 0), "{ent}");
        }
        // A service's instance level only while it has instances; the levels above any
        // service's names whatever the registry holds (a proxy's is empty).
        assert_eq!(
            answer(&reg, "empty._i.discoverd.", RecordType::A, false).0,
            nx
        );
        assert_eq!(
            answer(&reg, "nope._i.discoverd.", RecordType::A, false).0,
            nx
        );
        assert_eq!(answer(&reg, "_.discoverd.", RecordType::A, false).0, nx);
        let none = Registry::default();
        for ent in ["_tcp.discoverd.", "_i.discoverd."] {
            let (code, a, _) = answer(&none, ent, RecordType::A, false);
            assert_eq!((code, a.len()), (ResponseCode::NoError, 0), "{ent}");
        }
        // A proxy asks a peer about the service of an instance level.
        let web_i = Name::from_ascii("web._i.discoverd.").unwrap();
        assert_eq!(service_of(&web_i), Some("web".into()));
        // (`_web._i` is service `web`'s SRV name for proto `i`, as before.)
        let web_proto_i = Name::from_ascii("_web._i.discoverd.").unwrap();
        assert_eq!(service_of(&web_proto_i), Some("web".into()));
        let other = lookup(
            &reg,
            &Name::from_ascii("example.com.").unwrap(),
            RecordType::A,
            false,
        );
        assert_eq!(other, Lookup::NotOurs);
    }

    #[test]
    fn the_udp_limit_counts_answers_after_family_filter_and_dedup() {
        // Many instances on one IPv4 address, one on another, and five IPv6 ones.
        let mut addrs: Vec<(String, &str)> =
            (1..=6).map(|p| (format!("10.0.0.1:{p}"), "tcp")).collect();
        addrs.push(("10.0.0.2:1".into(), "tcp"));
        addrs.extend((1..=5).map(|n| (format!("[fd00::{n}]:80"), "tcp")));
        let mut reg = Registry::default();
        add(&mut reg, "many", &addrs);
        let v4 = |s: &str| RData::A(A(s.parse().unwrap()));
        // The cut is random: ask often enough that a cut before filtering would show.
        for _ in 0..30 {
            let (_, mut a, _) = answer(&reg, "many.discoverd.", RecordType::A, false);
            a.sort_by_key(|r| r.to_string());
            assert_eq!(a, vec![v4("10.0.0.1"), v4("10.0.0.2")]);
            let (_, aaaa, _) = answer(&reg, "many.discoverd.", RecordType::AAAA, false);
            assert_eq!(aaaa.len(), UDP_INSTANCE_LIMIT);
            assert!(aaaa.iter().all(|r| matches!(r, RData::AAAA(_))));
            let mut seen: Vec<String> = aaaa.iter().map(|r| r.to_string()).collect();
            seen.sort();
            seen.dedup();
            assert_eq!(seen.len(), UDP_INSTANCE_LIMIT);
            // SRV is neither filtered by family nor deduplicated, only cut.
            let (_, srv, _) = answer(&reg, "many.discoverd.", RecordType::SRV, false);
            assert_eq!(srv.len(), UDP_INSTANCE_LIMIT);
        }
        // TCP is unlimited: every distinct IPv6 address.
        let (_, aaaa, _) = answer(&reg, "many.discoverd.", RecordType::AAAA, true);
        assert_eq!(aaaa.len(), 5);
    }
}
