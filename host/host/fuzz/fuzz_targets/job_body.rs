//! Arbitrary bytes as a `PUT /host/jobs/:id` body (the first byte picks the URL's id and
//! whether the runtime needs image layers). `parse_job` never panics; a job it accepts has
//! the URL's id, a command, valid environment names, absolute mount paths and volume targets
//! without `..`; and the accepted job, serialised, is accepted again unchanged.
#![no_main]

use flynn_host::job::parse_job;
use libfuzzer_sys::fuzz_target;

const IDS: [&str; 6] = ["web-1", "a.b_c", "", "..", ".", "../x"];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let id = IDS[usize::from(pick) % IDS.len()];
    let needs_image = pick & 0x80 != 0;
    let Ok(job) = parse_job(id, body, needs_image) else {
        return;
    };
    assert_eq!(job.id, id);
    assert!(!id.is_empty() && !id.contains('/') && id != "." && id != "..");
    assert!(!job.config.args.is_empty() && !job.config.args[0].is_empty());
    assert!(job
        .config
        .env
        .keys()
        .all(|k| !k.is_empty() && !k.contains('=') && !k.contains('\0')));
    for m in &job.config.mounts {
        assert!(m.location.starts_with('/') && m.target.starts_with('/'));
    }
    for v in &job.config.volumes {
        assert!(v.target.starts_with('/') && !v.target.split('/').any(|c| c == ".."));
    }
    if needs_image {
        assert!(!job.mountspecs.is_empty());
    }
    let again = serde_json::to_vec(&job).expect("a job serialises");
    let back = parse_job(id, &again, needs_image).expect("an accepted job is accepted again");
    assert_eq!(back, job);
});
