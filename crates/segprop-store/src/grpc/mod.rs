//! The `SnapshotService` (proto/segprop/v1/snapshot_service.proto): a [`Store`] served over
//! gRPC ([`service`]); the client backend behind [`Store::grpc`] is the private `remote` module.
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
pub use crate::remote::{
    CONNECTION_WINDOW_BYTES, MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES, STREAM_WINDOW_BYTES,
};

mod server;

pub use server::{SnapshotServer, service};

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
