//! The `SnapshotService` (proto/segprop/v1/snapshot_service.proto): a [`Store`] served over
//! gRPC ([`service`]), and the client backend behind [`Store::grpc`].
//!
//! Blobs move in chunks of at most [`MAX_CHUNK_BYTES`]. Memory per call is bounded on both
//! paths: HTTP/2 flow control stops a sender whose peer does not read, a Put above the store's
//! multipart threshold streams into a multipart upload (at most a few parts in flight), and a
//! Get is fed through a channel of [`crate::store::CHUNKS_IN_FLIGHT`] chunks, so a slow reader
//! back-pressures the server's read of the blob.
//!
//! Authentication is not done here: the coordinator wraps every service with its bearer-token
//! check, and the client sends `authorization: Bearer <token>` with every call.

pub use segprop_proto::v1::Namespace;
use tonic::Status;

use crate::Error;

mod client;
mod server;

pub(crate) use client::GrpcBackend;
pub use server::{SnapshotServer, service};

/// Largest `data` of one Put or Get chunk.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;

/// HTTP/2 stream window for servers and clients of the service: several chunks in flight per
/// call, so a sender is not stalled waiting for a window update after every chunk.
pub const STREAM_WINDOW_BYTES: u32 = 8 << 20;
/// HTTP/2 connection window (a few concurrent calls at full speed).
pub const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;
/// Largest message either side accepts: chunks are far below it, a Stat of a prefix that holds
/// many blobs is not.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The one mapping of store errors to gRPC status codes.
impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::NotFound { .. } => Status::not_found(message),
            Error::BadKey { .. } | Error::Transfer { .. } => Status::invalid_argument(message),
            Error::Corrupt { .. } => Status::data_loss(message),
            Error::Mismatch { .. } => Status::failed_precondition(message),
            Error::Backend { .. } => Status::unavailable(message),
            Error::Rpc { code, .. } => Status::new(code, message),
            Error::Config { .. } | Error::Encode { .. } | Error::Local { .. } => {
                Status::internal(message)
            }
        }
    }
}
