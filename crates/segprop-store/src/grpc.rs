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

use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
pub use segprop_proto::v1::Namespace;
use segprop_proto::v1::snapshot_service_client::SnapshotServiceClient;
use segprop_proto::v1::snapshot_service_server::{SnapshotService, SnapshotServiceServer};
use segprop_proto::v1::stat_blob_request::Target;
use segprop_proto::v1::{
    BlobChunk, BlobInfo, DeleteBlobReply, DeleteBlobRequest, GetBlobRequest, PutBlobChunk,
    PutBlobReply, StatBlobReply, StatBlobRequest,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::store::BlobWriter;
use crate::{Error, Result, Store};

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

/// Serves the snapshot store (and, when given, the artifact store) as the `SnapshotService`.
#[derive(Debug, Clone)]
pub struct SnapshotServer {
    snapshots: Store,
    artifacts: Option<Store>,
}

impl SnapshotServer {
    pub fn new(snapshots: Store, artifacts: Option<Store>) -> Self {
        Self {
            snapshots,
            artifacts,
        }
    }

    /// The store a call addresses (`namespace` as sent: unknown values are refused).
    fn store(&self, namespace: i32) -> Result<&Store, Status> {
        match Namespace::try_from(namespace) {
            Ok(Namespace::Snapshots) => Ok(&self.snapshots),
            Ok(Namespace::Artifacts) => self.artifacts.as_ref().ok_or_else(|| {
                Status::failed_precondition("this service does not serve the artifact store")
            }),
            Err(_) => Err(Status::invalid_argument(format!(
                "unknown namespace {namespace} (0 = snapshots, 1 = artifacts)"
            ))),
        }
    }
}

/// The tonic service for the snapshot store `snapshots` and, when given, the artifact store,
/// ready to be wrapped (bearer auth) and mounted.
pub fn service(
    snapshots: Store,
    artifacts: Option<Store>,
) -> SnapshotServiceServer<SnapshotServer> {
    SnapshotServiceServer::new(SnapshotServer::new(snapshots, artifacts))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

type BlobStream = Pin<Box<dyn Stream<Item = Result<BlobChunk, Status>> + Send>>;

#[tonic::async_trait]
impl SnapshotService for SnapshotServer {
    async fn put(
        &self,
        request: Request<Streaming<PutBlobChunk>>,
    ) -> Result<Response<PutBlobReply>, Status> {
        let span = tracing::debug_span!("snapshot_put", key = tracing::field::Empty);
        async move {
            let mut chunks = request.into_inner();
            let first = chunks.message().await?.ok_or_else(|| {
                Status::invalid_argument("empty Put stream: the first chunk names key and size")
            })?;
            tracing::Span::current().record("key", first.key.as_str());
            let store = self.store(first.namespace)?;
            let mut writer = store.put_writer(&first.key, first.total_bytes).await?;
            if let Err(status) = receive(&mut writer, &first.key, first.data, &mut chunks).await {
                writer.abort().await;
                return Err(status);
            }
            writer.finish().await?;
            Ok(Response::new(PutBlobReply {
                bytes: first.total_bytes,
            }))
        }
        .instrument(span)
        .await
    }

    type GetStream = BlobStream;

    async fn get(&self, request: Request<GetBlobRequest>) -> Result<Response<BlobStream>, Status> {
        let GetBlobRequest { key, namespace } = request.into_inner();
        let span = tracing::debug_span!("snapshot_get", key);
        let (size, chunks) = self
            .store(namespace)?
            .get_chunks(&key, MAX_CHUNK_BYTES)
            .instrument(span)
            .await?;
        let stream: BlobStream = if size == 0 {
            Box::pin(futures::stream::once(async {
                Ok(BlobChunk {
                    total_bytes: 0,
                    data: Bytes::new(),
                })
            }))
        } else {
            Box::pin(
                ReceiverStream::new(chunks)
                    .enumerate()
                    .map(move |(i, chunk)| {
                        let total_bytes = if i == 0 { size } else { 0 };
                        chunk
                            .map(|data| BlobChunk { total_bytes, data })
                            .map_err(Status::from)
                    }),
            )
        };
        Ok(Response::new(stream))
    }

    async fn stat(
        &self,
        request: Request<StatBlobRequest>,
    ) -> Result<Response<StatBlobReply>, Status> {
        let StatBlobRequest { target, namespace } = request.into_inner();
        let store = self.store(namespace)?;
        let reply = match target {
            Some(Target::Key(key)) => {
                let size = store.stat(&key).await?;
                StatBlobReply {
                    exists: size.is_some(),
                    bytes: size.unwrap_or(0),
                    blobs: Vec::new(),
                }
            }
            Some(Target::Prefix(prefix)) => {
                let blobs = store.list(&prefix).await?;
                StatBlobReply {
                    exists: !blobs.is_empty(),
                    bytes: blobs.iter().map(|(_, bytes)| bytes).sum(),
                    blobs: blobs
                        .into_iter()
                        .map(|(key, bytes)| BlobInfo { key, bytes })
                        .collect(),
                }
            }
            None => return Err(Status::invalid_argument("Stat needs a key or a prefix")),
        };
        Ok(Response::new(reply))
    }

    async fn delete(
        &self,
        request: Request<DeleteBlobRequest>,
    ) -> Result<Response<DeleteBlobReply>, Status> {
        let DeleteBlobRequest {
            key_prefix,
            exact,
            namespace,
        } = request.into_inner();
        let span = tracing::debug_span!("snapshot_delete", key_prefix, exact);
        let store = self.store(namespace)?;
        async move {
            let (objects, bytes) = if exact {
                let size = store.stat(&key_prefix).await?;
                store.delete(&key_prefix).await?;
                (usize::from(size.is_some()), size.unwrap_or(0))
            } else {
                store.delete_prefix(&key_prefix).await?
            };
            Ok(Response::new(DeleteBlobReply {
                objects: objects as u64,
                bytes,
            }))
        }
        .instrument(span)
        .await
    }
}

/// Feeds the Put stream into `writer`, starting with the first chunk's data.
async fn receive(
    writer: &mut BlobWriter,
    key: &str,
    mut data: Bytes,
    chunks: &mut Streaming<PutBlobChunk>,
) -> Result<(), Status> {
    loop {
        if data.len() > MAX_CHUNK_BYTES {
            return Err(Error::Transfer {
                key: key.to_string(),
                reason: format!(
                    "a chunk of {} bytes (at most {MAX_CHUNK_BYTES})",
                    data.len()
                ),
            }
            .into());
        }
        if !data.is_empty() {
            writer.write(std::mem::take(&mut data)).await?;
        }
        match chunks.message().await? {
            Some(chunk) if !chunk.key.is_empty() && chunk.key != key => {
                return Err(Error::Transfer {
                    key: key.to_string(),
                    reason: format!("a later chunk names another key {:?}", chunk.key),
                }
                .into());
            }
            Some(chunk) => data = chunk.data,
            None => return Ok(()),
        }
    }
}

/// The client side of [`Store::grpc`].
#[derive(Clone)]
pub(crate) struct GrpcBackend {
    client: SnapshotServiceClient<Channel>,
    authorization: Option<MetadataValue<Ascii>>,
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
        let authorization = token
            .map(|t| {
                format!("Bearer {t}").parse().map_err(|_| Error::Config {
                    field: "token",
                    message: "must be printable ASCII".into(),
                })
            })
            .transpose()?;
        let client = SnapshotServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self {
            client,
            authorization,
            namespace: namespace as i32,
        })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        segprop_telemetry::trace::inject(request.metadata_mut());
        request
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
