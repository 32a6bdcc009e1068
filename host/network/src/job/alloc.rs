//! [`IpAllocator`]: addresses for jobs out of the host's block, persisted so a restarted host never
//! hands out an address a surviving job still uses.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::JobNetError;
use crate::subnet::Subnet;

/// How flynn-host names the allocation owners of its pooled network namespaces (a job id
/// cannot contain `/`): `pool/<uuid>`. See [`IpAllocator::job_block`].
pub const POOL_OWNER_PREFIX: &str = "pool/";

/// The name of flynn-host's allocation file in its state directory (the overlay agent's
/// `--job-ips` default names it too).
pub const JOB_IPS_FILE: &str = "job-ips.json";

/// flynn-host's record of the pooled network namespaces jobs took (job id → pool owner),
/// next to its allocation file ([`JOB_IPS_FILE`]): the `taken` file of
/// [`IpAllocator::job_block`].
pub const JOB_NETNS_FILE: &str = "job-netns.json";

fn is_pool_owner(owner: &str) -> bool {
    owner.starts_with(POOL_OWNER_PREFIX)
}

/// On-disk form: the block, who holds which address, and where the next search starts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct State {
    block: String,
    /// Owner (job id) → address.
    owners: BTreeMap<String, Ipv4Addr>,
    /// Offset in the block where the next search starts: addresses are handed out round-robin so a
    /// released address is not reused at once (peers may still have it in their ARP caches).
    next: u32,
}

/// Hands out addresses of one block to owners (job ids), one address per owner.
///
/// The network address, the broadcast address, the block's first host address (the bridge
/// gateway) and the `reserved` addresses are never handed out. Every change is written to the file
/// (temporary file, fsync, rename, directory fsync) before it is returned, so after a crash or
/// restart the file lists every address that may be in use.
#[derive(Debug)]
pub struct IpAllocator {
    path: PathBuf,
    block: Subnet,
    reserved: Vec<Ipv4Addr>,
    state: State,
    /// Whether each change is fsynced before it is returned (the default). Without it the
    /// file is still written and renamed before returning (a crash of the process loses
    /// nothing), and making it durable is the caller's job (see [`IpAllocator::deferred_sync`]).
    sync: bool,
}

impl IpAllocator {
    /// Opens (or creates) the allocation file at `path` for `block`. An existing file for another
    /// block in which some address is allocated, or one that cannot be parsed, is an error and is
    /// left untouched; one for another block with nothing allocated starts over for `block`.
    pub fn open(
        path: &Path,
        block: Subnet,
        reserved: &[Ipv4Addr],
    ) -> Result<IpAllocator, JobNetError> {
        let state = match fs::read(path) {
            // An empty file is what a power cut can leave of one renamed into place before
            // its data was synced (`deferred_sync`; XFS, ext4 with `noauto_da_alloc`). The
            // same power cut ended every job that held an address: start over.
            Ok(bytes) if bytes.is_empty() => {
                tracing::warn!(path = %path.display(), "allocation file is empty (power loss?); starting over");
                return Self::open_fresh(path, block, reserved);
            }
            Ok(bytes) => {
                let state: State =
                    serde_json::from_slice(&bytes).map_err(|source| JobNetError::Corrupt {
                        path: path.to_path_buf(),
                        source,
                    })?;
                if state.block != block.to_string() {
                    if !state.owners.is_empty() {
                        return Err(JobNetError::BlockChanged {
                            path: path.to_path_buf(),
                            stored: state.block,
                            block,
                        });
                    }
                    // Nothing allocated in the old block: start over in the new one.
                    return Self::open_fresh(path, block, reserved);
                }
                if let Some((owner, ip)) = state.owners.iter().find(|(_, ip)| !block.contains(**ip))
                {
                    return Err(JobNetError::Corrupt {
                        path: path.to_path_buf(),
                        source: serde::de::Error::custom(format!(
                            "{owner} holds {ip}, outside {block}"
                        )),
                    });
                }
                state
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Self::open_fresh(path, block, reserved)
            }
            Err(source) => {
                return Err(JobNetError::Io {
                    op: "read allocation file",
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let alloc = IpAllocator {
            path: path.to_path_buf(),
            block,
            reserved: reserved.to_vec(),
            state,
            sync: true,
        };
        alloc.persist()?;
        Ok(alloc)
    }

    /// The block of the allocation file at `path` when some address is allocated in it;
    /// `None` when there is no file, an empty one, or nothing allocated. A caller that keeps
    /// the block elsewhere too can tell from it which block the addresses in use belong to:
    /// [`IpAllocator::open`] refuses any other block ([`JobNetError::BlockChanged`]) while
    /// they are held.
    pub fn held_block(path: &Path) -> Result<Option<Subnet>, JobNetError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(JobNetError::Io {
                    op: "read allocation file",
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        if bytes.is_empty() {
            return Ok(None);
        }
        let corrupt = |source| JobNetError::Corrupt {
            path: path.to_path_buf(),
            source,
        };
        let state: State = serde_json::from_slice(&bytes).map_err(corrupt)?;
        if state.owners.is_empty() {
            return Ok(None);
        }
        let block = state.block.parse().map_err(|e| {
            corrupt(serde::de::Error::custom(format!(
                "block {:?}: {e}",
                state.block
            )))
        })?;
        Ok(Some(block))
    }

    /// [`IpAllocator::held_block`] counting jobs only: the block when a job holds an address
    /// in the allocation file at `path`. flynn-host gives its pooled network namespaces
    /// (`--netns-pool`, made ahead of jobs) addresses too, under owners starting with
    /// [`POOL_OWNER_PREFIX`]; such an address counts only once a job took the namespace,
    /// which `taken` records (flynn-host's `job-netns.json` next to the allocation file:
    /// job id → pool owner; a missing file: none taken). Pooled namespaces no job took are
    /// flynn-host's to remove, and counting them kept the block of nearly every host leased
    /// through a clean stop of the agent.
    ///
    /// Unlike [`IpAllocator::held_block`], a missing allocation file is an error, not "no
    /// job": it is what a host daemon with another state directory (or none) looks like,
    /// and nothing then says that no job holds an address. An empty one (what a power cut
    /// can leave; it ended every job) holds none.
    pub fn job_block(path: &Path, taken: &Path) -> Result<Option<Subnet>, JobNetError> {
        let bytes = fs::read(path).map_err(|source| JobNetError::Io {
            op: "read allocation file",
            path: path.to_path_buf(),
            source,
        })?;
        if bytes.is_empty() {
            return Ok(None);
        }
        let corrupt = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JobNetError::Corrupt { path, source }
        };
        let state: State = serde_json::from_slice(&bytes).map_err(corrupt(path))?;
        let pooled_taken: Vec<String> = if state.owners.keys().any(|o| is_pool_owner(o)) {
            match fs::read(taken) {
                Ok(b) => serde_json::from_slice::<BTreeMap<String, String>>(&b)
                    .map_err(corrupt(taken))?
                    .into_values()
                    .collect(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(source) => {
                    return Err(JobNetError::Io {
                        op: "read taken namespaces",
                        path: taken.to_path_buf(),
                        source,
                    })
                }
            }
        } else {
            Vec::new()
        };
        let jobs = state
            .owners
            .keys()
            .any(|o| !is_pool_owner(o) || pooled_taken.contains(o));
        if !jobs {
            return Ok(None);
        }
        let block = state.block.parse().map_err(|e| {
            corrupt(path)(serde::de::Error::custom(format!(
                "block {:?}: {e}",
                state.block
            )))
        })?;
        Ok(Some(block))
    }

    /// An allocator for `block` with nothing allocated, written to `path`.
    fn open_fresh(
        path: &Path,
        block: Subnet,
        reserved: &[Ipv4Addr],
    ) -> Result<IpAllocator, JobNetError> {
        let alloc = IpAllocator {
            path: path.to_path_buf(),
            block,
            reserved: reserved.to_vec(),
            state: State {
                block: block.to_string(),
                owners: BTreeMap::new(),
                next: 0,
            },
            sync: true,
        };
        alloc.persist()?;
        Ok(alloc)
    }

    /// The address of `owner`, allocating one if it has none. Fails with
    /// [`JobNetError::Exhausted`] when every usable address is taken.
    pub fn allocate(&mut self, owner: &str) -> Result<Ipv4Addr, JobNetError> {
        if let Some(ip) = self.get(owner) {
            return Ok(ip);
        }
        let size = u32::try_from(self.block.size()).unwrap_or(u32::MAX);
        let used: std::collections::BTreeSet<Ipv4Addr> =
            self.state.owners.values().copied().collect();
        let start = self.state.next % size.max(1);
        let found = (0..size)
            .map(|i| (start + i) % size)
            .find(|&off| {
                let ip = self.block.nth(off).expect("offset inside block");
                self.usable(off, size, ip) && !used.contains(&ip)
            })
            .ok_or(JobNetError::Exhausted { block: self.block })?;
        let ip = self.block.nth(found).expect("offset inside block");
        let mut next = self.state.clone();
        next.owners.insert(owner.to_string(), ip);
        next.next = (found + 1) % size;
        self.commit(next)?;
        Ok(ip)
    }

    /// Frees `owner`'s address; releasing an owner without one succeeds.
    pub fn release(&mut self, owner: &str) -> Result<(), JobNetError> {
        if !self.state.owners.contains_key(owner) {
            return Ok(());
        }
        let mut next = self.state.clone();
        next.owners.remove(owner);
        self.commit(next)
    }

    /// The address `owner` holds.
    pub fn get(&self, owner: &str) -> Option<Ipv4Addr> {
        self.state.owners.get(owner).copied()
    }

    /// Every (owner, address) pair, ordered by owner.
    pub fn allocations(&self) -> impl Iterator<Item = (&str, Ipv4Addr)> {
        self.state.owners.iter().map(|(o, ip)| (o.as_str(), *ip))
    }

    pub fn block(&self) -> Subnet {
        self.block
    }

    fn usable(&self, off: u32, size: u32, ip: Ipv4Addr) -> bool {
        // Blocks of one or two addresses (/31, /32) have no network/broadcast/gateway.
        let special = size > 2 && (off == 0 || off == 1 || off == size - 1);
        !special && !self.reserved.contains(&ip)
    }

    /// Writes `next` to disk, then adopts it (memory never runs ahead of the file).
    fn commit(&mut self, next: State) -> Result<(), JobNetError> {
        write_atomic(&self.path, &next, self.sync)?;
        self.state = next;
        Ok(())
    }

    /// From now on changes are written and renamed into place but not fsynced: the caller
    /// syncs [`IpAllocator::path`] and its directory itself (for example in a group commit
    /// with other state), off the path that hands out addresses. A crash of the process still
    /// loses nothing (the kernel has the file); only a power loss can, and it also ends every
    /// job that held an address.
    pub fn deferred_sync(mut self) -> Self {
        self.sync = false;
        self
    }

    /// The allocation file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn persist(&self) -> Result<(), JobNetError> {
        write_atomic(&self.path, &self.state, self.sync)
    }
}

fn write_atomic(path: &Path, state: &State, sync: bool) -> Result<(), JobNetError> {
    let io = |op: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| JobNetError::Io {
            op,
            path: p,
            source,
        }
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io("create directory", dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let bytes = serde_json::to_vec_pretty(state).expect("allocation state serializes");
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        if sync {
            f.sync_all()?;
        }
        Ok(())
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(io("write allocation file", &tmp)(e));
    }
    fs::rename(&tmp, path).map_err(io("rename allocation file", path))?;
    if !sync {
        return Ok(());
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync directory", dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block() -> Subnet {
        "100.100.5.0/29".parse().unwrap()
    }

    #[test]
    fn skips_network_gateway_broadcast_and_reserved_then_exhausts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ips.json");
        let reserved = [Ipv4Addr::new(100, 100, 5, 3)];
        let mut a = IpAllocator::open(&path, block(), &reserved).unwrap();
        let got: Vec<String> = (0..4)
            .map(|i| a.allocate(&format!("job{i}")).unwrap().to_string())
            .collect();
        assert_eq!(
            got,
            ["100.100.5.2", "100.100.5.4", "100.100.5.5", "100.100.5.6"]
        );
        let err = a.allocate("job4").unwrap_err();
        assert!(matches!(err, JobNetError::Exhausted { .. }), "{err:?}");
        // Idempotent per owner.
        assert_eq!(a.allocate("job1").unwrap().to_string(), "100.100.5.4");
        assert_eq!(a.get("job2").unwrap().to_string(), "100.100.5.5");
        assert_eq!(a.get("nobody"), None);
    }

    #[test]
    fn reopen_keeps_allocations_and_never_double_allocates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/ips.json");
        let mut a = IpAllocator::open(&path, block(), &[]).unwrap();
        let x = a.allocate("x").unwrap();
        let y = a.allocate("y").unwrap();
        a.release("x").unwrap();
        a.release("x").unwrap();
        drop(a);

        let mut b = IpAllocator::open(&path, block(), &[]).unwrap();
        assert_eq!(b.get("y"), Some(y));
        assert_eq!(b.get("x"), None);
        // Round-robin: the released address is not handed out again at once.
        let z = b.allocate("z").unwrap();
        assert_ne!(z, y);
        assert_ne!(z, x);
        let mut all = vec![y, z];
        for i in 0..2 {
            all.push(b.allocate(&format!("more{i}")).unwrap());
        }
        let unique: std::collections::BTreeSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len(), "{all:?}");
        // The file alone (a fresh open) sees the same owners.
        let c = IpAllocator::open(&path, block(), &[]).unwrap();
        let owners: Vec<&str> = c.allocations().map(|(o, _)| o).collect();
        assert_eq!(owners, ["more0", "more1", "y", "z"]);
    }

    /// What a power cut can leave of a file renamed into place before its data was synced:
    /// no job survived it, so the allocator starts over rather than refusing to open.
    #[test]
    fn an_empty_file_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ips.json");
        fs::write(&path, b"").unwrap();
        let mut a = IpAllocator::open(&path, block(), &[]).unwrap();
        assert_eq!(a.allocations().count(), 0);
        let ip = a.allocate("a").unwrap();
        drop(a);
        assert_eq!(
            IpAllocator::open(&path, block(), &[]).unwrap().get("a"),
            Some(ip)
        );
    }

    #[test]
    fn held_block_names_the_block_only_while_addresses_are_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ips.json");
        assert_eq!(IpAllocator::held_block(&path).unwrap(), None);
        fs::write(&path, b"").unwrap();
        assert_eq!(IpAllocator::held_block(&path).unwrap(), None);
        let mut a = IpAllocator::open(&path, block(), &[]).unwrap();
        assert_eq!(IpAllocator::held_block(&path).unwrap(), None);
        a.allocate("x").unwrap();
        assert_eq!(IpAllocator::held_block(&path).unwrap(), Some(block()));
        a.release("x").unwrap();
        assert_eq!(IpAllocator::held_block(&path).unwrap(), None);
        fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            IpAllocator::held_block(&path),
            Err(JobNetError::Corrupt { .. })
        ));
    }

    /// Only jobs count: flynn-host's pooled namespaces (`pool/…` owners) hold addresses
    /// before any job does, and counted, they kept nearly every host's block leased through
    /// a clean stop. A pooled namespace a job took (`job-netns.json`) counts. A missing
    /// allocation file is an error (nothing says no job holds an address).
    #[test]
    fn job_block_counts_jobs_not_pooled_namespaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job-ips.json");
        let taken = dir.path().join("job-netns.json");
        assert!(matches!(
            IpAllocator::job_block(&path, &taken),
            Err(JobNetError::Io { .. })
        ));
        fs::write(&path, b"").unwrap();
        assert_eq!(IpAllocator::job_block(&path, &taken).unwrap(), None);
        let mut a = IpAllocator::open(&path, block(), &[]).unwrap();
        assert_eq!(IpAllocator::job_block(&path, &taken).unwrap(), None);
        a.allocate("pool/0a1b").unwrap();
        a.allocate("pool/2c3d").unwrap();
        assert_eq!(IpAllocator::job_block(&path, &taken).unwrap(), None);
        // What held_block says, for flynn-host's own use.
        assert_eq!(IpAllocator::held_block(&path).unwrap(), Some(block()));
        // A job took one.
        fs::write(&taken, br#"{"job-1":"pool/2c3d"}"#).unwrap();
        assert_eq!(
            IpAllocator::job_block(&path, &taken).unwrap(),
            Some(block())
        );
        fs::write(&taken, b"{}").unwrap();
        assert_eq!(IpAllocator::job_block(&path, &taken).unwrap(), None);
        fs::write(&taken, b"{not json").unwrap();
        assert!(matches!(
            IpAllocator::job_block(&path, &taken),
            Err(JobNetError::Corrupt { .. })
        ));
        fs::write(&taken, b"{}").unwrap();
        // A job of its own.
        a.allocate("job-2").unwrap();
        assert_eq!(
            IpAllocator::job_block(&path, &taken).unwrap(),
            Some(block())
        );
        a.release("job-2").unwrap();
        assert_eq!(IpAllocator::job_block(&path, &taken).unwrap(), None);
    }

    #[test]
    fn corrupt_or_foreign_file_is_an_error_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ips.json");
        fs::write(&path, b"{not json").unwrap();
        let err = IpAllocator::open(&path, block(), &[]).unwrap_err();
        assert!(matches!(err, JobNetError::Corrupt { .. }), "{err:?}");
        assert_eq!(fs::read(&path).unwrap(), b"{not json");

        fs::remove_file(&path).unwrap();
        IpAllocator::open(&path, block(), &[])
            .unwrap()
            .allocate("a")
            .unwrap();
        let before = fs::read(&path).unwrap();
        let other: Subnet = "100.100.6.0/24".parse().unwrap();
        let err = IpAllocator::open(&path, other, &[]).unwrap_err();
        assert!(matches!(err, JobNetError::BlockChanged { .. }), "{err:?}");
        assert_eq!(fs::read(&path).unwrap(), before);

        // With nothing allocated any more, the file starts over for the other block.
        let mut a = IpAllocator::open(&path, block(), &[]).unwrap();
        a.release("a").unwrap();
        drop(a);
        let mut a = IpAllocator::open(&path, other, &[]).unwrap();
        assert_eq!(a.allocations().count(), 0);
        let ip = a.allocate("b").unwrap();
        assert!(other.contains(ip), "{ip} outside {other}");
        let a = IpAllocator::open(&path, other, &[]).unwrap();
        assert_eq!(a.get("b"), Some(ip));
    }
}
