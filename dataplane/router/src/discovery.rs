//! Backends from discoverd (spec §1.1, §2): with `--discoverd URL`, every service a
//! route names is watched, and its instances (with the service leader marked) become
//! that service's backends, applied like `PUT /services/:service/backends`. Watches
//! resume after disconnects without losing events (`flynn-client`), and services are
//! watched or dropped as routes come and go (woken by each published table, no polling).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use flynn_api::BackendAddr;
use flynn_client::discoverd::{Client, EventKind, Instance};

use crate::api::Api;

pub async fn run(api: Arc<Api>, url: String) {
    let client = Client::new(&url);
    let mut watches: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut published = api.published.subscribe();
    loop {
        let wanted = api.routed_services();
        watches.retain(|svc, task| {
            let keep = wanted.contains(svc);
            if !keep {
                task.abort();
            }
            keep
        });
        for svc in wanted {
            watches
                .entry(svc.clone())
                .or_insert_with(|| tokio::spawn(watch(api.clone(), client.clone(), svc)));
        }
        if published.changed().await.is_err() {
            return;
        }
    }
}

async fn watch(api: Arc<Api>, client: Client, service: String) {
    let mut w = client.watch(&service);
    let mut instances: BTreeMap<String, Instance> = BTreeMap::new();
    let mut leader: Option<String> = None;
    let mut synced = false;
    while let Some(ev) = w.next().await {
        match ev.kind {
            EventKind::Up | EventKind::Update => {
                if let Some(i) = ev.instance {
                    instances.insert(i.id.clone(), i);
                }
            }
            EventKind::Down => {
                if let Some(i) = ev.instance {
                    instances.remove(&i.id);
                }
            }
            EventKind::Leader => leader = ev.instance.map(|i| i.id),
            EventKind::Current => synced = true,
            EventKind::ServiceMeta => continue,
        }
        if !synced {
            continue;
        }
        let list: Vec<BackendAddr> = instances
            .values()
            .map(|i| BackendAddr {
                addr: i.addr.clone(),
                leader: leader.as_deref() == Some(i.id.as_str()),
                app: i.meta.get("FLYNN_APP_NAME").cloned().unwrap_or_default(),
                job_id: i.meta.get("FLYNN_JOB_ID").cloned().unwrap_or_default(),
            })
            .collect();
        if let Err(e) = api.set_backends(&service, list).await {
            tracing::warn!(service = %service, error = %e, "discoverd backends rejected");
        }
    }
}
