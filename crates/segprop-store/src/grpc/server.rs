//! The server side: a [`Store`] (and optionally the artifact store) served as the
//! `SnapshotService`.

use std::pin::Pin;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use segprop_proto::v1::snapshot_service_server::{SnapshotService, SnapshotServiceServer};
use segprop_proto::v1::stat_blob_request::Target;
use segprop_proto::v1::{
    BlobChunk, BlobInfo, DeleteBlobReply, DeleteBlobRequest, GetBlobRequest, PutBlobChunk,
    PutBlobReply, StatBlobReply, StatBlobRequest,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::store::BlobWriter;
use crate::{Error, Result, Store};

use super::*;

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
