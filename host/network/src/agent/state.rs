//! `subnet.env` (flannel's format) in the state directory: written for the host daemon, put
//! back as it was when a start is undone, and read for the block the next start asks for.

use std::path::Path;

use super::{Agent, AgentError};
use crate::store::LeaseStore;
use crate::subnet::Subnet;

impl<S: LeaseStore> Agent<S> {
    /// Puts `subnet.env` back as it was before this process wrote it (see
    /// [`Agent::state_before`]); a failure is logged.
    pub(super) fn restore_state(&mut self) {
        let (Some(dir), Some(before)) = (&self.cfg.state_dir, self.state_before.take()) else {
            return;
        };
        let path = dir.join("subnet.env");
        let put_back = match &before {
            Some(body) => {
                let tmp = dir.join(".subnet.env.tmp");
                std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, &path))
            }
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                r => r,
            },
        };
        match put_back {
            Ok(()) => {
                tracing::info!(path = %path.display(), previous = before.is_some(), "state put back as it was before the start")
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot put the state back as it was before the start; the next start asks for the released block again")
            }
        }
    }

    /// Writes `subnet.env` (flannel's format: network, this host's first address and prefix, MTU).
    /// The first write notes what it replaces ([`Agent::state_before`]).
    pub(super) fn write_state(&mut self) -> Result<(), AgentError> {
        let (Some(dir), Some(lease), Some(dev)) = (&self.cfg.state_dir, &self.lease, self.devices)
        else {
            return Ok(());
        };
        let path = dir.join("subnet.env");
        if self.state_before.is_none() {
            // A file that cannot be read names no previous block either (`previous_subnet`).
            self.state_before = Some(std::fs::read(&path).ok());
        }
        let body = format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ=false\n",
            self.cfg.lease.layout.network,
            lease.subnet.first_host(),
            lease.subnet.prefix_len(),
            dev.mtu
        );
        let err = |source| AgentError::State {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let tmp = dir.join(".subnet.env.tmp");
        std::fs::write(&tmp, body).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)?;
        Ok(())
    }
}

/// The block named in `dir/subnet.env` (`FLANNEL_SUBNET=<first address>/<len>`), if any.
pub(super) fn previous_subnet(dir: &Path) -> Option<Subnet> {
    let body = std::fs::read_to_string(dir.join("subnet.env")).ok()?;
    let value = body
        .lines()
        .find_map(|l| l.trim().strip_prefix("FLANNEL_SUBNET="))?;
    let (ip, len) = value.trim().split_once('/')?;
    Some(Subnet::new(ip.parse().ok()?, len.parse().ok()?))
}
