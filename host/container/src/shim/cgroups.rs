//! The job's cgroup directories, found the way libcgroups makes them: `<parent>/<id>` under every
//! v1 controller mount, or under the unified hierarchy on a pure v2 host.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use crate::spec::ContainerSpec;

const ROOT: &str = "/sys/fs/cgroup";

/// Every existing cgroup directory of the job.
pub fn dirs(spec: &ContainerSpec) -> Vec<PathBuf> {
    let rel = spec.cgroup_path();
    let rel = rel.trim_start_matches('/');
    let mut out = Vec::new();
    let unified = PathBuf::from(ROOT).join(rel);
    if unified.is_dir() {
        out.push(unified);
    }
    if let Ok(rd) = fs::read_dir(ROOT) {
        for e in rd.flatten() {
            // Skip the combined-name symlinks (cpu,cpuacct): they point at dirs listed anyway.
            if e.file_type().map(|t| t.is_symlink()).unwrap_or(true) {
                continue;
            }
            let p = e.path().join(rel);
            if p.is_dir() && !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// Pids in any of the job's cgroups.
pub fn pids(spec: &ContainerSpec) -> Vec<i32> {
    let mut pids = Vec::new();
    for d in dirs(spec) {
        if let Ok(s) = fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// SIGKILLs every process of the job's cgroups.
pub fn kill(spec: &ContainerSpec) {
    for pid in pids(spec) {
        // SAFETY: kill takes no pointers; the pid was just read from the job's cgroup.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// SIGKILLs every process of the job's cgroups and removes the directories (bounded retries).
/// `reap` (only in the shim, whose children are the job's processes): collect zombie children
/// too, since a killed but unreaped init keeps its cgroup busy.
pub fn remove(spec: &ContainerSpec, reap: bool) -> bool {
    for _ in 0..40 {
        kill(spec);
        if reap {
            reap_zombies();
        }
        let mut left = false;
        for d in dirs(spec) {
            if fs::remove_dir(&d).is_err() && d.exists() {
                left = true;
            }
        }
        if !left {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Collects every exited child of this process (including those cloned without an exit signal).
pub fn reap_zombies() {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid int pointer.
        let rc = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG | libc::__WALL) };
        if rc <= 0 {
            return;
        }
    }
}

fn counter(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key).map(str::trim))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Did the kernel OOM-kill anything in the job's memory cgroup?
pub fn oom_killed(spec: &ContainerSpec) -> bool {
    let rel = spec.cgroup_path();
    let rel = rel.trim_start_matches('/');
    let v1 = PathBuf::from(ROOT)
        .join("memory")
        .join(rel)
        .join("memory.oom_control");
    let v2 = PathBuf::from(ROOT).join(rel).join("memory.events");
    [v1, v2].iter().any(|p| {
        fs::read_to_string(p)
            .map(|s| counter(&s, "oom_kill ") > 0)
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters() {
        let s = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(super::counter(s, "oom_kill "), 3);
        assert_eq!(super::counter("low 0\n", "oom_kill "), 0);
    }
}
