//! The storage API with `--runtime process` (no root needed): volume create, list, get,
//! delete and their errors, a volume held by a running job, and volumes reloaded by a
//! restarted daemon. What a job sees in a volume is checked with real containers in
//! `containers/volumes.rs`.

use std::time::Duration;

use flynn_client::host::{JobStatus, VolumeBinding, VolumeCreate};

use crate::support::*;

const PROC: &[&str] = &["--runtime", "process"];

fn envelope(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_api_and_exclusive_use() {
    let mut h = Host::start(PROC);
    let a = h.addr.clone();
    let a = a.as_str();

    // Created with an empty body, or with meta; the Volume JSON comes back.
    let (st, body) = http(a, "POST", "/storage/providers/default/volumes", "", "");
    assert_eq!(st, 200, "{body}");
    let v1: serde_json::Value = envelope(&body);
    let id1 = v1["id"].as_str().unwrap().to_string();
    assert_eq!(id1.len(), 36, "{body}");
    assert_eq!(v1["type"], "data");
    assert_eq!(v1["host_id"], h.id.as_str());
    assert_eq!(v1["meta"], serde_json::json!({}));
    assert!(v1["created_at"].as_str().unwrap().ends_with('Z'), "{body}");
    let v2 = h
        .client
        .create_volume(&VolumeCreate {
            meta: [("app".to_string(), "pg".to_string())].into(),
            ..VolumeCreate::default()
        })
        .await
        .unwrap();
    assert_eq!(v2.meta["app"], "pg");
    assert!(h
        .dir
        .path()
        .join("volumes")
        .join(&v2.id)
        .join("data")
        .is_dir());
    let listed = h.client.list_volumes().await.unwrap();
    assert_eq!(
        listed.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
        [id1.as_str(), v2.id.as_str()]
    );
    assert_eq!(h.client.get_volume(&v2.id).await.unwrap(), v2);

    // Bad input: JSON error envelopes, nothing created.
    let cases: &[(&str, &str, &str, &str, u16, &str)] = &[
        (
            "POST",
            "/storage/providers/default/volumes",
            "application/json",
            "{",
            400,
            "syntax_error",
        ),
        (
            "POST",
            "/storage/providers/default/volumes",
            "text/plain",
            r#"{"meta":{}}"#,
            400,
            "validation_error",
        ),
        (
            "POST",
            "/storage/providers/default/volumes",
            "application/json",
            r#"{"type":"squashfs"}"#,
            400,
            "validation_error",
        ),
        (
            "POST",
            "/storage/providers/default/volumes",
            "application/json",
            r#"{"id":"../escape"}"#,
            400,
            "validation_error",
        ),
        (
            "POST",
            "/storage/providers/default/volumes",
            "application/json",
            r#"{"size":10}"#,
            400,
            "syntax_error",
        ),
        (
            "POST",
            "/storage/providers/zfs/volumes",
            "",
            "",
            404,
            "object_not_found",
        ),
        (
            "POST",
            "/storage/providers",
            "application/json",
            r#"{"id":"zfs","kind":"zfs"}"#,
            400,
            "validation_error",
        ),
        (
            "GET",
            "/storage/volumes/nope",
            "",
            "",
            404,
            "object_not_found",
        ),
        (
            "DELETE",
            "/storage/volumes/11111111-2222-4333-8444-555555555555",
            "",
            "",
            404,
            "object_not_found",
        ),
    ];
    for (method, path, ctype, body, status, code) in cases {
        let (st, got) = http(a, method, path, ctype, body);
        assert_eq!(st, *status, "{method} {path} {body}: {got}");
        assert_eq!(
            envelope(&got)["code"],
            *code,
            "{method} {path} {body}: {got}"
        );
    }
    let (_, got) = http(a, "POST", "/storage/providers", "application/json", "{}");
    assert_eq!(
        envelope(&got)["message"],
        "only the default provider is supported"
    );
    // A client-chosen id is kept, and taken only once.
    let named = "0b7e7d3c-6b55-4d6f-9d77-0a1c2b3d4e5f";
    let req = VolumeCreate {
        id: named.into(),
        ..VolumeCreate::default()
    };
    assert_eq!(h.client.create_volume(&req).await.unwrap().id, named);
    let e = h.client.create_volume(&req).await.unwrap_err();
    assert_eq!(e.api().unwrap().code, flynn_api::ErrorCode::ObjectExists);
    assert_eq!(h.client.list_volumes().await.unwrap().len(), 3);
    let (_, metrics) = http(a, "GET", "/metrics", "", "");
    assert!(metrics.contains("\nflynn_host_volumes 3\n"), "{metrics}");

    // A job binding a volume with a bad id or target is a 400.
    let mut bad = sh_job(&h.job_id("badvol"), "true");
    bad.config.volumes = vec![VolumeBinding {
        target: "relative".into(),
        volume: v2.id.clone(),
        ..VolumeBinding::default()
    }];
    let e = h.client.add_job(&bad).await.unwrap_err();
    assert_eq!(
        e.api().unwrap().detail.as_ref().unwrap()["field"],
        "config.volumes[0].target"
    );

    // A running job holds its volume: a second job with it is refused (409), and so is
    // deleting it.
    let holder = h.job_id("holder");
    let mut job = sh_job(&holder, "exec sleep 30");
    job.config.stop_timeout = Some(1);
    job.config.volumes = vec![VolumeBinding {
        target: "/data".into(),
        volume: v2.id.clone(),
        writeable: true,
        ..VolumeBinding::default()
    }];
    h.client.add_job(&job).await.unwrap();
    let pid = wait_running(&h.client, &holder).await.pid.unwrap();
    let mut second = job.clone();
    second.id = h.job_id("second");
    let e = h.client.add_job(&second).await.unwrap_err();
    let e = e.api().unwrap();
    assert_eq!(
        (e.status(), e.message.as_str()),
        (
            409,
            format!("volume {} is in use by job {holder}", v2.id).as_str()
        )
    );
    assert!(h.client.get_job(&second.id).await.is_err());
    let (st, got) = http(a, "DELETE", &format!("/storage/volumes/{}", v2.id), "", "");
    assert_eq!(
        (st, envelope(&got)["code"].as_str()),
        (409, Some("conflict"))
    );

    // Volumes (and a volume's holder) are there after a restart.
    drop(h.proc.take());
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    h.restart(PROC);
    let after = h.client.list_volumes().await.unwrap();
    assert_eq!(
        after.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
        [id1.as_str(), v2.id.as_str(), named]
    );
    assert_eq!(after[1], v2);
    // (The process runtime does not re-adopt jobs: the holder, which was running, is
    // crashed, and the volume free again.)
    let j = wait_ended(&h.client, &holder, Duration::from_secs(10)).await;
    assert_eq!(j.status, JobStatus::Crashed);
    h.client.delete_volume(&v2.id).await.unwrap();
    let e = h.client.get_volume(&v2.id).await.unwrap_err();
    assert_eq!(e.api().unwrap().code, flynn_api::ErrorCode::ObjectNotFound);
    assert!(!h.dir.path().join("volumes").join(&v2.id).exists());
    let e = h.client.delete_volume(&v2.id).await.unwrap_err();
    assert_eq!(e.api().unwrap().status(), 404);
    assert_eq!(h.client.list_volumes().await.unwrap().len(), 2);
}

/// A Go client's create body (a whole `volume.Info`, `created_at` always in it) is
/// accepted; and a leftover `.deleting-<id>` of an earlier deletion of the same id (its
/// removal failed or is still running) does not make the volume undeletable: it used to be
/// the fixed name every deletion of the id renamed to, and the rename failed (500).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_create_bodies_and_leftovers_of_earlier_deletions() {
    let h = Host::start(PROC);
    let a = h.addr.as_str();
    let id = "0b7e7d3c-6b55-4d6f-9d77-0a1c2b3d4e5f";
    let stale = h.dir.path().join("volumes").join(format!(".deleting-{id}"));
    std::fs::create_dir_all(stale.join("data")).unwrap();
    std::fs::write(stale.join("data").join("f"), b"old").unwrap();
    let body = format!(
        r#"{{"id":"{id}","type":"data","meta":{{"k":"v"}},"created_at":"0001-01-01T00:00:00Z"}}"#
    );
    let (st, got) = http(
        a,
        "POST",
        "/storage/providers/default/volumes",
        "application/json",
        &body,
    );
    assert_eq!(st, 200, "{got}");
    let v = envelope(&got);
    assert_eq!(
        (v["id"].as_str(), v["meta"]["k"].as_str()),
        (Some(id), Some("v"))
    );
    assert_ne!(v["created_at"], "0001-01-01T00:00:00Z", "{got}");
    let path = format!("/storage/volumes/{id}");
    let (st, got) = http(a, "DELETE", &path, "", "");
    assert_eq!(st, 200, "{got}");
    let (st, _) = http(a, "GET", &path, "", "");
    assert_eq!(st, 404);
    assert!(!h.dir.path().join("volumes").join(id).exists());
    // The same id again, created and deleted once more.
    let (st, got) = http(
        a,
        "POST",
        "/storage/providers/default/volumes",
        "application/json",
        &body,
    );
    assert_eq!(st, 200, "{got}");
    let (st, got) = http(a, "DELETE", &path, "", "");
    assert_eq!(st, 200, "{got}");
    assert!(h.client.list_volumes().await.unwrap().is_empty());
}
