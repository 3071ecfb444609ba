//! segprop-store: the shared snapshot and artifact store of DESIGN §3.
//!
//! Workers write SnapCheck snapshots `S[p, batch]` and artifacts (committed blocks, head
//! versions, stage checkpoints, the exported model) here, and the next stage or task reads them
//! back. A [`Store`] is one of two backends behind the same async API:
//!
//! - an object store (the `object_store` crate): a local directory, S3 (or any S3-compatible
//!   server), or memory, chosen by [`StoreConfig::url`];
//! - the coordinator's `SnapshotService` over gRPC ([`Store::grpc`]), for workers that cannot
//!   reach the object store themselves. [`grpc::service`] serves a store over that protocol.
//!
//! Every write is atomic (a reader sees the whole blob or nothing), every snapshot and checked
//! blob is verified on read, and a [`Store`] counts its accesses (read by the tests).
//!
//! This crate never links burn: the coordinator serves the store without building the training
//! engine, and the snapshot codec ([`snapshot`]) speaks plain `f32` slices.

pub mod artifact;
pub mod bench;
mod checked;
pub mod config;
pub mod grpc;
mod key;
pub mod layout;
mod remote;
pub mod snapshot;
pub mod store;

pub use artifact::{ArtifactKind, manifest_key};
pub use config::StoreConfig;
pub use grpc::Namespace;
pub use snapshot::{
    SnapshotEntry, SnapshotHeader, Split, StorageDtype, decode_snapshot, depth_prefix,
    encode_snapshot, snapshot_key,
};
pub use store::Store;
#[cfg(any(test, feature = "testing"))]
pub use store::StoreStats;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store configuration cannot be used.
    #[error("store config: {field}: {message}")]
    Config {
        field: &'static str,
        message: String,
    },
    /// A key (or prefix) that is not a `/`-separated relative path.
    #[error("bad key {key:?}: {reason}")]
    BadKey { key: String, reason: &'static str },
    /// No blob under this key.
    #[error("blob not found: {key}")]
    NotFound { key: String },
    /// The blob exists but fails verification (checksum, truncation, unparsable format).
    #[error("blob {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    /// A sound snapshot of another job, depth, committed-blocks fingerprint or dtype.
    #[error("snapshot {key}: {field} is {found:?}, expected {expected:?}")]
    Mismatch {
        key: String,
        field: &'static str,
        expected: String,
        found: String,
    },
    /// Snapshot entries that cannot be encoded (a shape that does not match the data, a
    /// duplicated batch id).
    #[error("cannot encode snapshot: {reason}")]
    Encode { reason: String },
    /// An upload stream that broke the protocol: ended before its announced size, overran it,
    /// or did not name its key. Nothing was committed.
    #[error("upload of {key:?} refused: {reason}")]
    Transfer { key: String, reason: String },
    /// A local file of an artifact being stored or fetched could not be read or written.
    #[error("{op} {}: {source}", path.display())]
    Local {
        op: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The object store failed (I/O, network, permissions).
    #[error("object store: {op} {key}: {source}")]
    Backend {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
    /// The snapshot service answered with an error status.
    #[error("snapshot service: {op} {key}: {code:?}: {message}")]
    Rpc {
        op: &'static str,
        key: String,
        code: tonic::Code,
        message: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
