//! Volumes in real containers (root only; skipped otherwise): data written by one job is
//! seen by the next, read-only bindings cannot be written, `delete_on_stop` removes the
//! volume, an unknown volume fails the job before anything is made, and a running job
//! holds its volume across a daemon restart.

use flynn_client::host::{VolumeBinding, VolumeCreate};

use super::*;

fn bind(volume: &str, target: &str, writeable: bool, delete_on_stop: bool) -> VolumeBinding {
    VolumeBinding {
        target: target.into(),
        volume: volume.into(),
        writeable,
        delete_on_stop,
    }
}

/// Runs `job` to its end and asserts it exited 0.
async fn run_ok(c: &flynn_client::host::Client, job: &Job) {
    c.add_job(job).await.unwrap();
    let j = wait_ended(c, &job.id, Duration::from_secs(30)).await;
    assert_eq!(
        (j.status, j.exit_status),
        (JobStatus::Done, Some(0)),
        "{j:?}"
    );
}

#[test]
fn volume_data_persists_read_only_binding_and_delete_on_stop() {
    require_root!();
    busybox();
    in_netns(|_| async {
        let ch = CHost::start(&[]);
        let h = &ch.host;
        let c = &h.client;
        let volumes = h.dir.path().join("volumes");
        let vol = c.create_volume(&VolumeCreate::default()).await.unwrap();
        let data = volumes.join(&vol.id).join("data");

        // A job writes into its writeable volume (the target is made in the container).
        let mut job = bb_job(
            &h.job_id("writer"),
            "echo persisted > /data/f && mkdir /data/sub && echo x > /data/sub/g",
        );
        job.config.volumes = vec![bind(&vol.id, "/data", true, false)];
        run_ok(c, &job).await;
        assert_eq!(
            std::fs::read_to_string(data.join("f")).unwrap(),
            "persisted\n"
        );

        // The next job sees it; bound read-only, it cannot write.
        let mut job = bb_job(
            &h.job_id("reader"),
            "grep -qx persisted /mnt/vol/f && test -f /mnt/vol/sub/g && ! touch /mnt/vol/new 2>/dev/null",
        );
        job.config.volumes = vec![bind(&vol.id, "/mnt/vol", false, false)];
        run_ok(c, &job).await;
        assert!(!data.join("new").exists());
        assert_eq!(c.get_volume(&vol.id).await.unwrap(), vol);

        // delete_on_stop: gone (record and data) once the job ended.
        let tmp = c.create_volume(&VolumeCreate::default()).await.unwrap();
        let mut job = bb_job(
            &h.job_id("scratch"),
            "echo s > /scratch/f && test -s /scratch/f",
        );
        job.config.volumes = vec![bind(&tmp.id, "/scratch", true, true)];
        run_ok(c, &job).await;
        let e = c.get_volume(&tmp.id).await.unwrap_err();
        assert_eq!(e.api().unwrap().status(), 404);
        eventually(
            Duration::from_secs(10),
            "the volume's directory removed",
            || {
                std::fs::read_dir(&volumes)
                    .unwrap()
                    .flatten()
                    .all(|e| !e.file_name().to_string_lossy().contains(&tmp.id))
            },
        )
        .await;
        let ids: Vec<String> = c
            .list_volumes()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.id)
            .collect();
        assert_eq!(ids, std::slice::from_ref(&vol.id));

        // A volume that does not exist fails the job with the reason; no container, no
        // namespace, no cgroup was made for it.
        let unknown = h.job_id("unknown");
        let mut job = bb_job(&unknown, "true");
        job.config.volumes = vec![
            bind(&vol.id, "/data", true, false),
            bind(&tmp.id, "/gone", true, false),
        ];
        c.add_job(&job).await.unwrap();
        let j = wait_ended(c, &unknown, Duration::from_secs(10)).await;
        assert_eq!(
            (j.status, j.error.clone()),
            (
                JobStatus::Failed,
                Some(format!("volume: unknown volume {}", tmp.id))
            )
        );
        let containers = h.dir.path().join("containers");
        assert!(!flynn_container::Shim::list(&containers).contains(&unknown));
        assert!(!containers.join(&unknown).exists());
        assert!(!netns_exists(&unknown));
        assert_eq!(ch.cgroups_left(&unknown), Vec::<PathBuf>::new());
        // The failed job released the volume it did have.
        assert!(c.get_volume(&vol.id).await.is_ok());
        c.delete_volume(&vol.id).await.unwrap();
        assert!(!volumes.join(&vol.id).exists());
    });
}

#[test]
fn a_running_job_holds_its_volume_across_a_daemon_restart() {
    require_root!();
    busybox();
    in_netns(|_| async {
        let mut ch = CHost::start(&[]);
        let c = ch.host.client.clone();
        let vol = c.create_volume(&VolumeCreate::default()).await.unwrap();
        let holder = ch.host.job_id("holder");
        let mut job = bb_job(&holder, "echo up > /data/up; exec sleep 60");
        job.config.stop_timeout = Some(1);
        job.config.volumes = vec![bind(&vol.id, "/data", true, false)];
        c.add_job(&job).await.unwrap();
        let before = wait_running(&c, &holder).await;

        let mut second = bb_job(&ch.host.job_id("second"), "grep -qx up /data/up");
        second.config.volumes = vec![bind(&vol.id, "/data", false, false)];
        let refused = |e: flynn_client::host::Error| {
            let e = e.api().cloned().unwrap();
            assert_eq!(
                (e.status(), e.message),
                (409, format!("volume {} is in use by job {holder}", vol.id))
            );
        };
        refused(c.add_job(&second).await.unwrap_err());
        refused(c.delete_volume(&vol.id).await.unwrap_err());
        let e = c
            .delete_volume("11111111-2222-4333-8444-555555555555")
            .await
            .unwrap_err();
        assert_eq!(e.api().unwrap().code, flynn_api::ErrorCode::ObjectNotFound);

        // Kill the daemon outright; a new one on the same state re-adopts the job, which
        // still holds the volume.
        ch.restart(&[]);
        let c = ch.host.client.clone();
        let after = c.get_job(&holder).await.unwrap();
        assert_eq!((after.status, after.pid), (JobStatus::Running, before.pid));
        assert_eq!(c.get_volume(&vol.id).await.unwrap(), vol);
        refused(c.add_job(&second).await.unwrap_err());
        refused(c.delete_volume(&vol.id).await.unwrap_err());

        // Stopped, it lets go: the next job sees what it wrote, then the volume is deleted.
        c.stop_job(&holder).await.unwrap();
        let j = wait_ended(&c, &holder, Duration::from_secs(15)).await;
        assert_eq!(j.status, JobStatus::Done);
        run_ok(&c, &second).await;
        c.delete_volume(&vol.id).await.unwrap();
        let e = c.get_volume(&vol.id).await.unwrap_err();
        assert_eq!(e.api().unwrap().status(), 404);
        assert!(!ch.host.dir.path().join("volumes").join(&vol.id).exists());
    });
}
