//! The openraft state machine around [`Registry`]: applies committed commands, builds
//! and installs snapshots (JSON, persisted to `snapshot.json` with the registry embedded).

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::{Stream, StreamExt};
use openraft::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};

use super::log::{create_dir_durable, read_json, write_atomic};
use super::state::{Data, Registry};
use super::types::Response;
use super::TypeConfig;

type C = TypeConfig;

/// What the API reads: the registry, and the index it reflects.
pub struct Shared {
    state: Mutex<SmState>,
    applied: AtomicU64,
}

#[derive(Default)]
pub struct SmState {
    pub registry: Registry,
    pub last_applied: Option<LogIdOf<C>>,
    pub membership: StoredMembershipOf<C>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, SmState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last applied Raft index (the `Discoverd-Index` header).
    pub fn applied_index(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMetaOf<C>,
    #[serde(with = "super::json_bytes")]
    data: Vec<u8>,
}

/// The state machine handed to openraft; clones share state (it is its own builder).
#[derive(Clone)]
pub struct StateMachine {
    shared: Arc<Shared>,
    path: PathBuf,
    /// The last snapshot; locked only to read it or swap it, never across a file write
    /// (`get_current_snapshot` runs on the runtime's worker).
    current: Arc<Mutex<Option<StoredSnapshot>>>,
    /// Held across every write of the snapshot file and the swap of `current` after it.
    writing: Arc<Mutex<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` (a snapshot's serialization or decoding, file writes and fsyncs) on tokio's
/// blocking pool: the runtime has one worker by default (`--threads`), which would
/// otherwise stop serving the API, DNS and Raft for as long as a snapshot takes. The
/// state's lock is held only to clone the data (a shallow copy, see [`Data`]) or to swap
/// it, never while a snapshot is serialized, decoded or freed: applies, API and DNS reads
/// and the leadership tracker take the same lock on the runtime's worker.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("blocking task: {e}")))?
}

impl StateMachine {
    /// Opens the state machine in `dir`, restoring the last snapshot if there is one.
    pub fn open(dir: &std::path::Path) -> io::Result<StateMachine> {
        create_dir_durable(dir)?;
        let path = dir.join("snapshot.json");
        let snap: Option<StoredSnapshot> = read_json(&path)?;
        let mut st = SmState::default();
        if let Some(s) = &snap {
            let data: Data = serde_json::from_slice(&s.data)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let _empty = st.registry.restore(data);
            st.last_applied = s.meta.last_log_id;
            st.membership = s.meta.last_membership.clone();
        }
        let applied = st.last_applied.as_ref().map_or(0, |l| l.index);
        Ok(StateMachine {
            shared: Arc::new(Shared {
                state: Mutex::new(st),
                applied: AtomicU64::new(applied),
            }),
            path,
            current: Arc::new(Mutex::new(snap)),
            writing: Arc::new(Mutex::new(())),
        })
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// [`RaftSnapshotBuilder::build_snapshot`]: the state serialized and written (blocking).
    fn build(&self) -> io::Result<SnapshotOf<C, Vec<u8>>> {
        // A shallow copy under the lock (see [`Data`]); serialized after it is released.
        let (meta, copy) = {
            let st = self.shared.lock();
            let meta = SnapshotMetaOf::<C> {
                last_log_id: st.last_applied,
                last_membership: st.membership.clone(),
            };
            (meta, st.registry.data.clone())
        };
        let data = serde_json::to_vec(&copy).map_err(io::Error::other)?;
        drop(copy);
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        {
            // openraft builds in a task of its own, so an installed snapshot may have
            // replaced the state since it was read above: the file (under the same lock as
            // every write of it) only ever moves forward.
            let _writing = lock(&self.writing);
            let newer = lock(&self.current)
                .as_ref()
                .is_none_or(|c| c.meta.last_log_id <= meta.last_log_id);
            if newer {
                write_atomic(&self.path, &stored, true)?;
                *lock(&self.current) = Some(stored);
            }
        }
        Ok(SnapshotOf::<C, Vec<u8>> {
            meta,
            snapshot: data,
        })
    }

    /// [`RaftStateMachine::install_snapshot`]'s file write and state swap (blocking).
    fn install(&self, stored: StoredSnapshot) -> io::Result<()> {
        let data: Data = serde_json::from_slice(&stored.data)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let meta = &stored.meta;
        // Held until the state is swapped: a build running meanwhile cannot write an older
        // snapshot over this one (see `build`).
        let _writing = lock(&self.writing);
        write_atomic(&self.path, &stored, true)?;
        let old = {
            let mut st = self.shared.lock();
            // Also ends every open watch: its client resubscribes and gets the new state.
            let old = st.registry.restore(data);
            st.last_applied = meta.last_log_id;
            st.membership = meta.last_membership.clone();
            let idx = meta.last_log_id.as_ref().map_or(0, |l| l.index);
            self.shared.applied.store(idx, Ordering::Release);
            old
        };
        // Freed after the lock is released (a large state takes a while).
        drop(old);
        *lock(&self.current) = Some(stored);
        Ok(())
    }
}

impl RaftSnapshotBuilder<C> for StateMachine {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<C, Vec<u8>>, io::Error> {
        let this = self.clone();
        blocking(move || this.build()).await
    }
}

impl RaftStateMachine<C> for StateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<C>>, StoredMembershipOf<C>), io::Error> {
        let st = self.shared.lock();
        Ok((st.last_applied, st.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let index = entry.log_id.index;
            let resp = {
                let mut st = self.shared.lock();
                let resp = match entry.payload {
                    EntryPayload::Blank => Response::default(),
                    EntryPayload::Normal(cmd) => st.registry.apply(index, cmd),
                    EntryPayload::Membership(m) => {
                        st.membership = StoredMembershipOf::<C>::new(Some(entry.log_id), m);
                        Response::default()
                    }
                };
                st.last_applied = Some(entry.log_id);
                self.shared.applied.store(index, Ordering::Release);
                resp
            };
            if let Some(r) = responder {
                r.send(resp);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<C>,
        snapshot: Vec<u8>,
    ) -> Result<(), io::Error> {
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot,
        };
        let this = self.clone();
        blocking(move || this.install(stored)).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<C, Vec<u8>>>, io::Error> {
        Ok(lock(&self.current)
            .as_ref()
            .map(|s| SnapshotOf::<C, Vec<u8>> {
                meta: s.meta.clone(),
                snapshot: s.data.clone(),
            }))
    }
}
