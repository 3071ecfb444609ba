//! The client of the `SnapshotService`: the backend behind [`crate::Store::grpc`], every call
//! naming its namespace. The server (the `grpc` module) uses the store; this module needs
//! nothing of either, so the store uses it and no two modules use each other.

use bytes::{Bytes, BytesMut};
use segprop_proto::v1::snapshot_service_client::SnapshotServiceClient;
use segprop_proto::v1::stat_blob_request::Target;
use segprop_proto::v1::{DeleteBlobRequest, GetBlobRequest, PutBlobChunk, StatBlobRequest};
use segprop_telemetry::outgoing::AttachToken;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

pub use segprop_proto::v1::Namespace;

use crate::{Error, Result};

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

/// The client side of [`Store::grpc`].
#[derive(Clone)]
pub(crate) struct GrpcBackend {
    client: SnapshotServiceClient<Channel>,
    /// The token and trace context every call carries.
    headers: AttachToken,
    /// The [`Namespace`] every call names.
    namespace: i32,
}

/// Maps a status from the service back to a store error.
fn status_error(op: &'static str, key: &str, status: &Status) -> Error {
    match status.code() {
        Code::NotFound => Error::NotFound {
            key: key.to_string(),
        },
        Code::DataLoss => Error::Corrupt {
            key: key.to_string(),
            reason: status.message().to_string(),
        },
        code => Error::Rpc {
            op,
            key: key.to_string(),
            code,
            message: status.message().to_string(),
        },
    }
}

impl GrpcBackend {
    pub(crate) fn new(channel: Channel, token: Option<&str>, namespace: Namespace) -> Result<Self> {
        let headers = AttachToken::optional(token).map_err(|_| Error::Config {
            field: "token",
            message: "must be printable ASCII".into(),
        })?;
        let client = SnapshotServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self {
            client,
            headers,
            namespace: namespace as i32,
        })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        self.headers.apply(Request::new(message))
    }

    pub(crate) async fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        let total = bytes.len() as u64;
        let first_key = key.to_string();
        let chunk_count = bytes.len().div_ceil(MAX_CHUNK_BYTES).max(1);
        let namespace = self.namespace;
        let chunks = futures::stream::iter((0..chunk_count).map(move |i| {
            let start = i * MAX_CHUNK_BYTES;
            let end = (start + MAX_CHUNK_BYTES).min(bytes.len());
            let first = i == 0;
            PutBlobChunk {
                key: if first {
                    first_key.clone()
                } else {
                    String::new()
                },
                total_bytes: if first { total } else { 0 },
                data: bytes.slice(start..end),
                namespace,
            }
        }));
        let reply = self
            .client
            .clone()
            .put(self.request(chunks))
            .await
            .map_err(|s| status_error("put", key, &s))?
            .into_inner();
        if reply.bytes != total {
            return Err(Error::Rpc {
                op: "put",
                key: key.to_string(),
                code: Code::Internal,
                message: format!("service committed {} of {total} bytes", reply.bytes),
            });
        }
        Ok(())
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Bytes> {
        let status = |s: Status| status_error("get", key, &s);
        let mut chunks = self
            .client
            .clone()
            .get(self.request(GetBlobRequest {
                key: key.to_string(),
                namespace: self.namespace,
            }))
            .await
            .map_err(status)?
            .into_inner();
        let mut total = None;
        let mut blob = BytesMut::new();
        while let Some(chunk) = chunks.message().await.map_err(status)? {
            let expected = *total.get_or_insert(chunk.total_bytes);
            if blob.is_empty() {
                // Reserve up front, but do not trust a huge announced size with memory.
                let reserve = expected.min(256 << 20);
                blob.reserve(usize::try_from(reserve).unwrap_or(0));
            }
            blob.extend_from_slice(&chunk.data);
            if blob.len() as u64 > expected {
                break;
            }
        }
        let received = blob.len() as u64;
        match total {
            Some(expected) if expected == received => Ok(blob.freeze()),
            expected => Err(Error::Corrupt {
                key: key.to_string(),
                reason: format!(
                    "Get stream carried {received} bytes, announced {}",
                    expected.map_or("nothing".to_string(), |e| e.to_string())
                ),
            }),
        }
    }

    pub(crate) async fn stat(&self, key: &str) -> Result<Option<u64>> {
        let reply = self
            .client
            .clone()
            .stat(self.request(StatBlobRequest {
                target: Some(Target::Key(key.to_string())),
                namespace: self.namespace,
            }))
            .await
            .map_err(|s| status_error("stat", key, &s))?
            .into_inner();
        Ok(reply.exists.then_some(reply.bytes))
    }

    pub(crate) async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let reply = self
            .client
            .clone()
            .stat(self.request(StatBlobRequest {
                target: Some(Target::Prefix(prefix.to_string())),
                namespace: self.namespace,
            }))
            .await
            .map_err(|s| status_error("list", prefix, &s))?
            .into_inner();
        Ok(reply
            .blobs
            .into_iter()
            .map(|info| (info.key, info.bytes))
            .collect())
    }

    /// Deletes `key_prefix` (only that blob when `exact`); returns objects and bytes deleted.
    pub(crate) async fn delete(&self, key_prefix: &str, exact: bool) -> Result<(usize, u64)> {
        let reply = self
            .client
            .clone()
            .delete(self.request(DeleteBlobRequest {
                key_prefix: key_prefix.to_string(),
                exact,
                namespace: self.namespace,
            }))
            .await
            .map_err(|s| status_error("delete", key_prefix, &s))?
            .into_inner();
        Ok((
            usize::try_from(reply.objects).unwrap_or(usize::MAX),
            reply.bytes,
        ))
    }
}
