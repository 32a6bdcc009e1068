//! CPU time and resident memory of a process tree, read from /proc.
//!
//! A proxy is measured as its root process plus every descendant (nginx: master and workers;
//! HAProxy and the Flynn router: one process, many threads — /proc/<pid>/stat already sums the
//! threads of a process).

use std::collections::HashMap;

use nix::unistd::{sysconf, SysconfVar};

/// Clock ticks per second for /proc/<pid>/stat times.
pub fn clock_ticks() -> f64 {
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// (ppid, utime + stime in ticks) of one process.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); ppid is field 4, utime 14, stime 15.
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// `root` and all its descendants that are alive now.
pub fn tree(root: u32) -> Vec<u32> {
    let mut parent_of = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some((ppid, _)) = stat(pid) {
                parent_of.insert(pid, ppid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(
            parent_of
                .iter()
                .filter(|(_, pp)| **pp == p)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    out
}

/// User + system CPU seconds consumed so far by `root`'s tree.
pub fn cpu_seconds(root: u32) -> f64 {
    let ticks: u64 = tree(root)
        .into_iter()
        .filter_map(|p| stat(p).map(|(_, t)| t))
        .sum();
    ticks as f64 / clock_ticks()
}

fn vm_rss(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Sum of VmRSS over `root`'s tree, in bytes.
pub fn rss_bytes(root: u32) -> u64 {
    tree(root).into_iter().filter_map(vm_rss).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(rss_bytes(me) > 0);
        assert!(cpu_seconds(me) >= 0.0);
        assert_eq!(tree(me)[0], me);
    }
}
