//! The crate's one error type.

use std::path::PathBuf;

/// Errors from container specs, shims and the image store.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The container spec is not acceptable (bad id, bad path, bad limit).
    #[error("invalid container spec: {reason}")]
    InvalidSpec { reason: String },
    /// A file-system or socket operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A job with this id already has shim state.
    #[error("job {id} already has shim state")]
    Exists { id: String },
    /// No shim state (and no running shim) for this job.
    #[error("no shim for job {id}")]
    NotFound { id: String },
    /// The shim process failed to start; `log` is the tail of its log file.
    #[error("shim for job {id} failed to start: {log}")]
    ShimStart { id: String, log: String },
    /// The shim sent something that is not the protocol, or went away mid-stream.
    #[error("shim protocol: {reason}")]
    Protocol { reason: String },
    /// An image layer could not be imported.
    #[error("image layer {}: {reason}", path.display())]
    Image { path: PathBuf, reason: String },
    /// The layer's sha256 is not the expected one.
    #[error("layer checksum mismatch: expected {expected}, got {actual}")]
    Checksum { expected: String, actual: String },
    /// The import was given up because its caller asked (a job stopped while starting).
    #[error("layer import cancelled")]
    Cancelled,
}

impl ContainerError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ContainerError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        ContainerError::InvalidSpec {
            reason: reason.into(),
        }
    }
}
