//! Backends from discoverd (spec §1.1, §2): with `--discoverd URL`, every service a
//! route names is watched, and its instances (with the service leader marked) become
//! that service's backends, applied like `PUT /services/:service/backends`. Watches
//! resume after disconnects without losing events (`flynn-client`), and services are
//! watched or dropped as routes come and go (woken by each published table, no polling); a
//! dropped service's backends are cleared, each reported `backend-down`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flynn_api::BackendAddr;
use flynn_client::discoverd::{Client, Event, EventKind, Instance};

use crate::api::Api;

pub async fn run(api: Arc<Api>, url: String) {
    let client = Client::new(&url);
    let mut watches: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    // Services dropped whose backends are still to be cleared. Handed over by the process
    // before: the clears it owed, made before anything else, whether a route names the
    // service again or not.
    let mut unrouted: BTreeSet<String> = api.owed.lock().map(|o| o.clone()).unwrap_or_default();
    // Also handed over: the services whose backends it took from discoverd; those no route
    // names now are cleared as if this process had dropped them.
    let mut handed: BTreeSet<String> = api.discovered.lock().map(|d| d.clone()).unwrap_or_default();
    let mut published = api.published.subscribe();
    loop {
        let wanted = api.routed_services();
        for svc in std::mem::take(&mut handed) {
            if !wanted.contains(&svc) {
                unrouted.insert(svc);
            }
        }
        let dropped: Vec<String> = watches
            .keys()
            .filter(|svc| !wanted.contains(*svc))
            .cloned()
            .collect();
        for svc in dropped {
            if let Some(task) = watches.remove(&svc) {
                task.abort();
                // Ended before its backends are cleared: a watch mid-update must not
                // put them back afterwards.
                let _ = task.await;
            }
            unrouted.insert(svc);
        }
        // Their backends go (each reported `backend-down`, spec §1.4): kept, they would be
        // routed again as they were if a route named the service later, until its new watch
        // caught up (for good while discoverd is unreachable).
        unrouted = clear(&api, std::mem::take(&mut unrouted)).await;
        for svc in wanted {
            if unrouted.contains(&svc) {
                continue; // its watch starts once the old backends are gone
            }
            watches
                .entry(svc.clone())
                .or_insert_with(|| tokio::spawn(watch(api.clone(), client.clone(), svc)));
        }
        if let Ok(mut d) = api.discovered.lock() {
            *d = watches.keys().chain(&unrouted).cloned().collect();
        }
        if let Ok(mut o) = api.owed.lock() {
            o.clone_from(&unrouted);
        }
        tokio::select! {
            r = published.changed() => if r.is_err() {
                return;
            },
            _ = tokio::time::sleep(RETRY), if !unrouted.is_empty() => {}
        }
    }
}

/// Empties the backends of `services`; returns those the API refused for now (a handover
/// in progress), to be tried again.
async fn clear(api: &Arc<Api>, services: BTreeSet<String>) -> BTreeSet<String> {
    let mut left = BTreeSet::new();
    for svc in services {
        // Empty already, or an operator set its backends through the API since it was
        // dropped (which takes it out of the discovered set): theirs, not cleared.
        let operators = api.discovered.lock().is_ok_and(|d| !d.contains(&svc));
        if operators || api.store().backends(&svc).is_empty() {
            continue;
        }
        match api.set_backends(&svc, Vec::new()).await {
            Ok(_) => {}
            Err(e) if e.code == flynn_api::ErrorCode::ServiceUnavailable => {
                left.insert(svc);
            }
            Err(e) => {
                tracing::warn!(service = %svc, error = %e, "clearing an unrouted service's backends failed")
            }
        }
    }
    left
}

/// How soon backends the API refused (a handover in progress) are offered again.
const RETRY: Duration = Duration::from_secs(1);

/// One service's instances as the watch reported them.
#[derive(Default)]
struct Seen {
    instances: BTreeMap<String, Instance>,
    leader: Option<String>,
    synced: bool,
    /// Instances whose address the router cannot route, already warned about.
    warned: HashSet<String>,
}

impl Seen {
    /// Applies one event; true when the backends may have changed.
    fn apply(&mut self, ev: Event) -> bool {
        match ev.kind {
            EventKind::Up | EventKind::Update => {
                if let Some(i) = ev.instance {
                    self.instances.insert(i.id.clone(), i);
                }
            }
            EventKind::Down => {
                if let Some(i) = ev.instance {
                    self.instances.remove(&i.id);
                    self.warned.remove(&i.id);
                }
            }
            EventKind::Leader => self.leader = ev.instance.map(|i| i.id),
            EventKind::Current => self.synced = true,
            EventKind::ServiceMeta => return false,
        }
        true
    }

    /// The backends: every instance with an address the router can route (`ip:port`).
    /// discoverd takes any `host:port`; one the router cannot use is left out (and warned
    /// about once) rather than failing the whole list. A `udp` registration is left out
    /// too: a host registers a job's ports with their proto, `tcp` or `udp` (spec §2.6,
    /// §5.2), and the router only makes TCP connections. The leader is an address: every
    /// instance at the leader instance's address is marked (a job with a tcp and a udp
    /// registration on one port leads through either).
    fn backends(&mut self, service: &str) -> Vec<BackendAddr> {
        let leader_addr = self
            .leader
            .as_ref()
            .and_then(|id| self.instances.get(id))
            .map(|i| i.addr.clone());
        let mut out = Vec::with_capacity(self.instances.len());
        for i in self.instances.values() {
            if i.proto == "udp" {
                continue;
            }
            if i.addr.parse::<SocketAddr>().is_err() {
                if self.warned.insert(i.id.clone()) {
                    tracing::warn!(service = %service, addr = %i.addr, "instance address is not ip:port; not routed");
                }
                continue;
            }
            out.push(BackendAddr {
                addr: i.addr.clone(),
                leader: leader_addr.as_deref() == Some(i.addr.as_str()),
                app: i.meta.get("FLYNN_APP_NAME").cloned().unwrap_or_default(),
                job_id: i.meta.get("FLYNN_JOB_ID").cloned().unwrap_or_default(),
            });
        }
        out
    }
}

enum Wake {
    Event(Event),
    Retry,
    Closed,
}

/// Where a service's events come from: a discoverd watch (or a channel in tests).
trait Source: Send {
    fn next(&mut self) -> impl std::future::Future<Output = Option<Event>> + Send;
    fn try_next(&mut self) -> Option<Event>;
}

impl Source for flynn_client::discoverd::Watch {
    async fn next(&mut self) -> Option<Event> {
        flynn_client::discoverd::Watch::next(self).await
    }
    fn try_next(&mut self) -> Option<Event> {
        flynn_client::discoverd::Watch::try_next(self)
    }
}

async fn watch(api: Arc<Api>, client: Client, service: String) {
    follow(api, client.watch(&service), service).await
}

/// Applies `w`'s events to `service`'s backends until the source ends.
async fn follow(api: Arc<Api>, mut w: impl Source, service: String) {
    let mut seen = Seen::default();
    // Backends the API refused (it does while a handover is in progress): offered again
    // after `RETRY`, or with the next event.
    let mut refused = false;
    loop {
        let wake = if refused {
            tokio::select! {
                ev = w.next() => ev.map_or(Wake::Closed, Wake::Event),
                _ = tokio::time::sleep(RETRY) => Wake::Retry,
            }
        } else {
            w.next().await.map_or(Wake::Closed, Wake::Event)
        };
        let mut changed = refused;
        match wake {
            Wake::Event(ev) => changed |= seen.apply(ev),
            Wake::Retry => {}
            Wake::Closed => return,
        }
        // Events already waiting (a reconnect's replay) go in the same change.
        while let Some(ev) = w.try_next() {
            changed |= seen.apply(ev);
        }
        if !seen.synced || !changed {
            continue;
        }
        let list = seen.backends(&service);
        refused = match api.set_backends(&service, list).await {
            Ok(_) => false,
            // A handover in progress: offered again (lost, they would stay out of date
            // until the service's next event if the handover fails).
            Err(e) if e.code == flynn_api::ErrorCode::ServiceUnavailable => {
                if !refused {
                    tracing::info!(service = %service, error = %e, "discoverd backends refused for now; retrying");
                }
                true
            }
            Err(e) => {
                tracing::warn!(service = %service, error = %e, "discoverd backends rejected");
                false
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    impl Source for tokio::sync::mpsc::UnboundedReceiver<Event> {
        async fn next(&mut self) -> Option<Event> {
            self.recv().await
        }
        fn try_next(&mut self) -> Option<Event> {
            self.try_recv().ok()
        }
    }

    fn api() -> Arc<Api> {
        let ports = crate::store::Ports {
            default_http: vec![8080],
            additional_http: vec![],
            additional_tls: vec![],
            tcp_range: (3000, 3002),
            tcp_ip: None,
        };
        let settings = crate::shared::Settings {
            tcp_ip: "127.0.0.1".parse().unwrap(),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            response_header_timeout: Duration::from_secs(10),
            tunnel_timeout: Duration::from_secs(10),
            tunnel_fin_timeout: Duration::from_secs(10),
            lingering_time: Duration::ZERO,
            connect_timeout: Duration::from_secs(1),
            tickets: Arc::new(crate::tickets::TicketKeys::random().unwrap()),
            hot_idle: Duration::ZERO,
            pool_idle_per_backend: 1,
            max_conns_per_core: 10,
            proxy_protocol: false,
            proxy_protocol_from: Vec::new(),
            sticky: None,
            page_503: None,
            tls: None,
        };
        let certs = Arc::new(flynn_runtime::Published::new(crate::tls::CertStore::new(
            None,
        )));
        // No cores: every published table counts as applied.
        let shared = Arc::new(crate::shared::Shared::new(0, settings, certs, None));
        let store = crate::store::Store::new(ports, false);
        Arc::new(Api::new(store, shared, Default::default()))
    }

    fn ev(kind: EventKind, id: &str, addr: &str) -> Event {
        Event {
            service: "web".into(),
            kind,
            instance: Some(Instance {
                id: id.into(),
                addr: addr.into(),
                ..Instance::default()
            }),
            service_meta: None,
        }
    }

    fn current() -> Event {
        Event {
            service: "web".into(),
            kind: EventKind::Current,
            instance: None,
            service_meta: None,
        }
    }

    fn addrs(api: &Api) -> Vec<String> {
        let s = api.store.lock().unwrap();
        s.backends("web").into_iter().map(|b| b.addr).collect()
    }

    async fn until(api: &Api, want: &[&str]) {
        for _ in 0..300 {
            if addrs(api) == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("backends {:?}, wanted {want:?}", addrs(api));
    }

    #[tokio::test]
    async fn an_address_that_is_not_ip_port_is_left_out_not_the_whole_list() {
        let api = api();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(follow(api.clone(), rx, "web".into()));
        tx.send(ev(EventKind::Up, "a", "127.0.0.1:1")).unwrap();
        tx.send(current()).unwrap();
        until(&api, &["127.0.0.1:1"]).await;
        tx.send(ev(EventKind::Up, "n", "localhost:2")).unwrap();
        tx.send(ev(EventKind::Up, "b", "127.0.0.1:3")).unwrap();
        tx.send(ev(EventKind::Down, "a", "127.0.0.1:1")).unwrap();
        until(&api, &["127.0.0.1:3"]).await;
    }

    /// Backends refused while a handover holds the API are offered again: if the handover
    /// fails, this process goes on with them instead of waiting for the next event.
    #[tokio::test]
    async fn backends_refused_during_a_handover_are_offered_again() {
        let api = api();
        api.frozen.store(true, Ordering::SeqCst);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(follow(api.clone(), rx, "web".into()));
        tx.send(ev(EventKind::Up, "a", "127.0.0.1:1")).unwrap();
        tx.send(current()).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(addrs(&api).is_empty(), "changed while frozen");
        api.frozen.store(false, Ordering::SeqCst);
        // No further event: the retry alone brings them in.
        until(&api, &["127.0.0.1:1"]).await;
    }

    /// A job registered twice at one address (its port as tcp and as udp), the second
    /// registration the service leader: a `leader: true` route has that backend, not none
    /// (a 503). A udp registration at an address of its own is no backend.
    #[tokio::test]
    async fn a_leader_registered_twice_at_one_address_still_leads() {
        let api = api();
        api.store
            .lock()
            .unwrap()
            .add(flynn_api::Route {
                leader: true,
                ..flynn_api::Route::http("a.com", "web")
            })
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(follow(api.clone(), rx, "web".into()));
        let udp = |id: &str, addr: &str| {
            let mut e = ev(EventKind::Up, id, addr);
            if let Some(i) = e.instance.as_mut() {
                i.proto = "udp".into();
            }
            e
        };
        tx.send(ev(EventKind::Up, "a", "127.0.0.1:1")).unwrap();
        tx.send(udp("b", "127.0.0.1:1")).unwrap();
        tx.send(udp("c", "127.0.0.1:2")).unwrap();
        tx.send(ev(EventKind::Leader, "b", "127.0.0.1:1")).unwrap();
        tx.send(current()).unwrap();
        until(&api, &["127.0.0.1:1"]).await;
        let table = api.store.lock().unwrap().table();
        let route = table.lookup_http(b"a.com", 0, b"/").unwrap();
        assert_eq!(
            &route.backends[..],
            &["127.0.0.1:1".parse::<SocketAddr>().unwrap()],
            "the leader route has no backend"
        );
    }
}
