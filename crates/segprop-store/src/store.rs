//! [`Store`]: atomic blob puts and verified gets over an object store or the coordinator's
//! `SnapshotService`, with access counters.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{GetResultPayload, ObjectStore, ObjectStoreExt, WriteMultipart};
#[cfg(any(test, feature = "testing"))]
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::{MULTIPART_PART_BYTES, StoreConfig, StoreLocation};
use crate::key::{parse_key, parse_prefix};
use crate::remote::{GrpcBackend, Namespace};
#[cfg(any(test, feature = "testing"))]
use crate::snapshot::{SnapshotEntry, SnapshotHeader, decode_snapshot, encode_snapshot};
use crate::{Error, Result, checked};

/// Multipart parts uploaded concurrently by one writer (bounds its memory to a few parts).
const PARTS_IN_FLIGHT: usize = 4;
/// Chunks buffered between a streaming read and its consumer ([`Store::get_chunks`]).
pub(crate) const CHUNKS_IN_FLIGHT: usize = 4;

/// A handle on the snapshot and artifact store. Cheap to clone; clones share the backend and
/// the access counters.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    /// The directory of a local store: `get` reads its files directly (object_store's local
    /// reads zero-fill their buffers first, which halves read throughput).
    local_dir: Option<Arc<std::path::Path>>,
    counters: Arc<Counters>,
    multipart_threshold: u64,
    describe: Arc<str>,
}

#[derive(Clone)]
enum Backend {
    Object(Arc<dyn ObjectStore>),
    Grpc(GrpcBackend),
}

/// Access counts of a [`Store`] (and of its clones) since it was opened.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    /// Completed puts (single or multipart).
    pub puts: u64,
    /// Puts that went through a multipart upload.
    pub multipart_puts: u64,
    /// Completed gets.
    pub gets: u64,
    pub bytes_put: u64,
    pub bytes_got: u64,
    /// Gets of a missing key.
    pub not_found: u64,
    /// Blobs that failed verification ([`Store::record_corrupt`]).
    pub corrupt: u64,
    /// Deleted blobs.
    pub deletes: u64,
}

#[derive(Default)]
struct Counters {
    puts: AtomicU64,
    multipart_puts: AtomicU64,
    gets: AtomicU64,
    bytes_put: AtomicU64,
    bytes_got: AtomicU64,
    not_found: AtomicU64,
    corrupt: AtomicU64,
    deletes: AtomicU64,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("location", &self.describe)
            .finish_non_exhaustive()
    }
}

/// object_store's HTTP client (reqwest with `rustls-no-provider`, see the workspace
/// Cargo.toml) takes the process's default rustls crypto provider and panics without one:
/// install ring, as tonic's TLS uses, unless the process already chose a provider.
fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: a provider is then set.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Maps an object store error; a missing object becomes [`Error::NotFound`].
fn backend_error(op: &'static str, key: &str, source: object_store::Error) -> Error {
    match source {
        object_store::Error::NotFound { .. } => Error::NotFound {
            key: key.to_string(),
        },
        source => Error::Backend {
            op,
            key: key.to_string(),
            source,
        },
    }
}

impl Store {
    /// Opens the object store that `config.url` names (a local directory is created if missing).
    pub fn open(config: &StoreConfig) -> Result<Self> {
        let store = match config.validate()? {
            StoreLocation::Memory => Self::memory(),
            StoreLocation::Local(dir) => Self::local(dir)?,
            StoreLocation::S3 { bucket, prefix } => {
                ensure_crypto_provider();
                let mut builder = AmazonS3Builder::from_env().with_bucket_name(&bucket);
                if let Some(endpoint) = &config.s3_endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                if let Some(region) = &config.s3_region {
                    builder = builder.with_region(region);
                }
                if config.allow_http {
                    builder = builder.with_allow_http(true);
                }
                let s3 = builder.build().map_err(|e| Error::Config {
                    field: "url",
                    message: format!("cannot build the S3 client for {:?}: {e}", config.url),
                })?;
                let object: Arc<dyn ObjectStore> = if prefix.is_empty() {
                    Arc::new(s3)
                } else {
                    Arc::new(PrefixStore::new(s3, prefix.as_str()))
                };
                let describe = if prefix.is_empty() {
                    format!("s3://{bucket}")
                } else {
                    format!("s3://{bucket}/{prefix}")
                };
                Self::from_backend(Backend::Object(object), &describe)
            }
        };
        Ok(store.with_multipart_threshold(config.multipart_threshold_bytes))
    }

    /// An in-process store (tests, single-process runs).
    pub fn memory() -> Self {
        Self::from_backend(Backend::Object(Arc::new(InMemory::new())), "memory://")
    }

    /// A store in a local directory, created if missing.
    pub fn local(dir: impl AsRef<std::path::Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let io_error = |message: String| Error::Config {
            field: "url",
            message,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| io_error(format!("cannot create {}: {e}", dir.display())))?;
        let fs = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| io_error(format!("cannot open {}: {e}", dir.display())))?
            .with_automatic_cleanup(true);
        let describe = format!("file://{}", dir.display());
        let mut store = Self::from_backend(Backend::Object(Arc::new(fs)), &describe);
        store.local_dir = Some(Arc::from(dir));
        Ok(store)
    }

    /// A client of the coordinator's snapshot store through its `SnapshotService` on
    /// `channel`, sending `authorization: Bearer <token>` with every call when a token is given.
    pub fn grpc(channel: tonic::transport::Channel, token: Option<String>) -> Result<Self> {
        Self::grpc_namespace(channel, token, Namespace::Snapshots)
    }

    /// Like [`Store::grpc`], for the coordinator's store of `namespace`.
    pub fn grpc_namespace(
        channel: tonic::transport::Channel,
        token: Option<String>,
        namespace: Namespace,
    ) -> Result<Self> {
        let backend = GrpcBackend::new(channel, token.as_deref(), namespace)?;
        let describe = match namespace {
            Namespace::Snapshots => "grpc",
            Namespace::Artifacts => "grpc (artifacts)",
        };
        Ok(Self::from_backend(Backend::Grpc(backend), describe))
    }

    fn from_backend(backend: Backend, describe: &str) -> Self {
        Self {
            backend,
            local_dir: None,
            counters: Arc::default(),
            multipart_threshold: StoreConfig::default().multipart_threshold_bytes,
            describe: describe.into(),
        }
    }

    /// Blobs larger than `bytes` are uploaded with multipart (object store backends only).
    pub fn with_multipart_threshold(mut self, bytes: u64) -> Self {
        self.multipart_threshold = bytes.max(1);
        self
    }

    /// Where this store lives (`memory://`, `file:///dir`, `s3://bucket/prefix`, `grpc`).
    pub fn location(&self) -> &str {
        &self.describe
    }

    /// Stores `bytes` under `key`, replacing any previous blob. Atomic: a reader sees the old
    /// blob or the whole new one, never a part (local: temporary file + rename; S3: one PUT, or
    /// a multipart upload that becomes visible only when completed).
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        let len = bytes.len() as u64;
        if matches!(self.backend, Backend::Object(_)) && len > self.multipart_threshold {
            let mut writer = self.put_writer(key, len).await?;
            if let Err(e) = writer.write(bytes).await {
                writer.abort().await;
                return Err(e);
            }
            return writer.finish().await;
        }
        self.put_whole(key, bytes).await
    }

    /// One request: a single PUT, or a gRPC Put stream.
    async fn put_whole(&self, key: &str, bytes: Bytes) -> Result<()> {
        let path = parse_key(key)?;
        let len = bytes.len() as u64;
        match &self.backend {
            Backend::Object(store) => {
                store
                    .put(&path, bytes.into())
                    .await
                    .map_err(|e| backend_error("put", key, e))?;
            }
            Backend::Grpc(grpc) => grpc.put(key, bytes).await?,
        }
        self.count_put(key, len, false);
        Ok(())
    }

    fn count_put(&self, key: &str, len: u64, multipart: bool) {
        bump(&self.counters.puts, 1);
        bump(&self.counters.bytes_put, len);
        if multipart {
            bump(&self.counters.multipart_puts, 1);
        }
        tracing::debug!(key, bytes = len, multipart, "blob put");
    }

    /// Starts an atomic streaming put of exactly `total_bytes` bytes: nothing is visible under
    /// `key` until [`BlobWriter::finish`] succeeds. Above the multipart threshold the parts are
    /// uploaded while the caller writes; below it the bytes are buffered.
    pub async fn put_writer(&self, key: &str, total_bytes: u64) -> Result<BlobWriter> {
        let path = parse_key(key)?;
        let sink = match &self.backend {
            Backend::Object(store) if total_bytes > self.multipart_threshold => {
                let upload = store
                    .put_multipart(&path)
                    .await
                    .map_err(|e| backend_error("put", key, e))?;
                Sink::Multipart(WriteMultipart::new_with_chunk_size(
                    upload,
                    MULTIPART_PART_BYTES,
                ))
            }
            _ => {
                let capacity = total_bytes.min(self.multipart_threshold);
                Sink::Buffer(BytesMut::with_capacity(
                    usize::try_from(capacity).unwrap_or(usize::MAX),
                ))
            }
        };
        Ok(BlobWriter {
            store: self.clone(),
            key: key.to_string(),
            expected: total_bytes,
            written: 0,
            sink,
        })
    }

    /// The blob under `key`; [`Error::NotFound`] if there is none.
    pub async fn get(&self, key: &str) -> Result<Bytes> {
        let path = parse_key(key)?;
        let result = match (&self.backend, &self.local_dir) {
            (Backend::Object(_), Some(dir)) => {
                let (file, owned) = (dir.join(key), key.to_string());
                tokio::task::spawn_blocking(move || match std::fs::read(&file) {
                    Ok(bytes) => Ok(Bytes::from(bytes)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Err(Error::NotFound { key: owned })
                    }
                    Err(e) => Err(Error::Backend {
                        op: "get",
                        key: owned,
                        source: object_store::Error::Generic {
                            store: "LocalFileSystem",
                            source: Box::new(e),
                        },
                    }),
                })
                .await
                .unwrap_or_else(|e| {
                    Err(Error::Backend {
                        op: "get",
                        key: key.to_string(),
                        source: object_store::Error::JoinError { source: e },
                    })
                })
            }
            (Backend::Object(store), None) => match store.get(&path).await {
                Ok(got) => got.bytes().await.map_err(|e| backend_error("get", key, e)),
                Err(e) => Err(backend_error("get", key, e)),
            },
            (Backend::Grpc(grpc), _) => grpc.get(key).await,
        };
        match result {
            Ok(bytes) => {
                bump(&self.counters.gets, 1);
                bump(&self.counters.bytes_got, bytes.len() as u64);
                tracing::debug!(key, bytes = bytes.len(), "blob get");
                Ok(bytes)
            }
            Err(e) => {
                if matches!(e, Error::NotFound { .. }) {
                    bump(&self.counters.not_found, 1);
                }
                Err(e)
            }
        }
    }

    /// Streams the blob under `key` in chunks of at most `chunk_bytes`, through a channel of
    /// [`CHUNKS_IN_FLIGHT`] chunks: a slow consumer stops the reader, so memory stays bounded.
    /// Returns the blob's size and the chunks. The reading task ends when the blob is read or
    /// the receiver is dropped.
    pub(crate) async fn get_chunks(
        &self,
        key: &str,
        chunk_bytes: usize,
    ) -> Result<(u64, mpsc::Receiver<Result<Bytes>>)> {
        let path = parse_key(key)?;
        let chunk_bytes = chunk_bytes.max(1);
        let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
        let size = match &self.backend {
            Backend::Object(store) => {
                let got = match store.get(&path).await {
                    Ok(got) => got,
                    Err(e) => {
                        let e = backend_error("get", key, e);
                        if matches!(e, Error::NotFound { .. }) {
                            bump(&self.counters.not_found, 1);
                        }
                        return Err(e);
                    }
                };
                let (size, range) = (got.meta.size, got.range.clone());
                let key = key.to_string();
                match got.payload {
                    GetResultPayload::File(file, _) => {
                        tokio::task::spawn_blocking(move || {
                            read_file_chunks(file, range, chunk_bytes, &key, &tx);
                        });
                    }
                    GetResultPayload::Stream(stream) => {
                        tokio::spawn(rechunk(stream, chunk_bytes, key, tx));
                    }
                }
                size
            }
            Backend::Grpc(grpc) => {
                let bytes = grpc.get(key).await?;
                let size = bytes.len() as u64;
                tokio::spawn(async move {
                    for start in (0..bytes.len()).step_by(chunk_bytes) {
                        let end = (start + chunk_bytes).min(bytes.len());
                        if tx.send(Ok(bytes.slice(start..end))).await.is_err() {
                            break;
                        }
                    }
                });
                size
            }
        };
        bump(&self.counters.gets, 1);
        bump(&self.counters.bytes_got, size);
        tracing::debug!(key, bytes = size, "blob get (streamed)");
        Ok((size, rx))
    }

    /// The size of the blob under `key`, or `None`.
    pub async fn stat(&self, key: &str) -> Result<Option<u64>> {
        let path = parse_key(key)?;
        match &self.backend {
            Backend::Object(store) => match store.head(&path).await {
                Ok(meta) => Ok(Some(meta.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(backend_error("stat", key, e)),
            },
            Backend::Grpc(grpc) => grpc.stat(key).await,
        }
    }

    /// The blob named `prefix` (if any) and every blob under `prefix/`, as `(key, size)` sorted
    /// by key. `""` lists everything.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let path = parse_prefix(prefix)?;
        let mut blobs = match &self.backend {
            Backend::Object(store) => {
                let listed: Vec<_> = store
                    .list(path.as_ref())
                    .try_collect()
                    .await
                    .map_err(|e| backend_error("list", prefix, e))?;
                let mut blobs: Vec<(String, u64)> = listed
                    .into_iter()
                    .filter(|meta| Some(&meta.location) != path.as_ref())
                    .map(|meta| (meta.location.to_string(), meta.size))
                    .collect();
                // Stores disagree on whether a listing of `a/b` holds the object `a/b`.
                if let Some(path) = &path {
                    match store.head(path).await {
                        Ok(meta) => blobs.push((path.to_string(), meta.size)),
                        Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(backend_error("list", prefix, e)),
                    }
                }
                blobs
            }
            Backend::Grpc(grpc) => grpc.list(prefix).await?,
        };
        blobs.sort();
        Ok(blobs)
    }

    /// Deletes the blob under `key`; deleting a missing blob succeeds.
    pub async fn delete(&self, key: &str) -> Result<()> {
        let path = parse_key(key)?;
        let deleted = match &self.backend {
            Backend::Object(store) => match store.delete(&path).await {
                Ok(()) => 1,
                Err(object_store::Error::NotFound { .. }) => 0,
                Err(e) => return Err(backend_error("delete", key, e)),
            },
            Backend::Grpc(grpc) => grpc.delete(key, true).await?.0,
        };
        bump(&self.counters.deletes, deleted as u64);
        tracing::debug!(key, "blob deleted");
        Ok(())
    }

    /// Deletes the blob named `prefix` and every blob under `prefix/` (`""`: everything).
    /// Returns how many blobs and bytes went.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<(usize, u64)> {
        parse_prefix(prefix)?;
        let (objects, bytes) = match &self.backend {
            Backend::Object(store) => {
                let blobs = self.list(prefix).await?;
                let bytes = blobs.iter().map(|(_, size)| size).sum();
                let objects = blobs.len();
                let paths: Vec<object_store::Result<Path>> = blobs
                    .into_iter()
                    .map(|(key, _)| Ok(Path::from(key)))
                    .collect();
                let mut results = store.delete_stream(futures::stream::iter(paths).boxed());
                while let Some(result) = results.next().await {
                    match result {
                        Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(backend_error("delete", prefix, e)),
                    }
                }
                (objects, bytes)
            }
            Backend::Grpc(grpc) => grpc.delete(prefix, false).await?,
        };
        bump(&self.counters.deletes, objects as u64);
        tracing::debug!(prefix, objects, bytes, "blobs deleted");
        Ok((objects, bytes))
    }

    /// Stores `payload` with a checksummed header (see [`Store::get_checked`]).
    pub async fn put_checked(&self, key: &str, payload: &[u8]) -> Result<()> {
        self.put(key, checked::wrap(payload)).await
    }

    /// Reads a blob written by [`Store::put_checked`] and verifies its length and checksum:
    /// [`Error::Corrupt`] (and a `corrupt` count) on any mismatch or truncation.
    pub async fn get_checked(&self, key: &str) -> Result<Bytes> {
        let blob = self.get(key).await?;
        checked::unwrap(key, blob).inspect_err(|e| self.note_corrupt(e))
    }

    /// Encodes and stores one snapshot blob; returns its size in bytes.
    #[cfg(any(test, feature = "testing"))]
    pub async fn put_snapshot(
        &self,
        key: &str,
        header: &SnapshotHeader,
        entries: &[SnapshotEntry],
    ) -> Result<u64> {
        let blob = encode_snapshot(header, entries)?;
        let len = blob.len() as u64;
        self.put(key, blob.into()).await?;
        Ok(len)
    }

    /// Reads and verifies one snapshot blob (see [`decode_snapshot`]); a corrupt blob is counted.
    #[cfg(any(test, feature = "testing"))]
    pub async fn get_snapshot(
        &self,
        key: &str,
        expect: &SnapshotHeader,
    ) -> Result<Vec<SnapshotEntry>> {
        let blob = self.get(key).await?;
        decode_snapshot(&blob, key, expect).inspect_err(|e| self.note_corrupt(e))
    }

    fn note_corrupt(&self, e: &Error) {
        if let Error::Corrupt { key, reason } = e {
            tracing::warn!(key, reason, "corrupt blob");
            self.record_corrupt();
        }
    }

    /// Counts a blob that failed verification (the snapshot codec's callers report here).
    pub fn record_corrupt(&self) {
        bump(&self.counters.corrupt, 1);
    }

    /// The access counts so far (shared by every clone of this store).
    #[cfg(any(test, feature = "testing"))]
    pub fn stats(&self) -> StoreStats {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StoreStats {
            puts: load(&c.puts),
            multipart_puts: load(&c.multipart_puts),
            gets: load(&c.gets),
            bytes_put: load(&c.bytes_put),
            bytes_got: load(&c.bytes_got),
            not_found: load(&c.not_found),
            corrupt: load(&c.corrupt),
            deletes: load(&c.deletes),
        }
    }
}

/// Reads `range` of a local file in chunks into `tx` (on a blocking thread).
fn read_file_chunks(
    mut file: std::fs::File,
    range: std::ops::Range<u64>,
    chunk_bytes: usize,
    key: &str,
    tx: &mpsc::Sender<Result<Bytes>>,
) {
    let io_error = |e: std::io::Error| Error::Backend {
        op: "get",
        key: key.to_string(),
        source: object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(e),
        },
    };
    if let Err(e) = file.seek(SeekFrom::Start(range.start)) {
        let _ = tx.blocking_send(Err(io_error(e)));
        return;
    }
    let mut remaining = range.end.saturating_sub(range.start);
    while remaining > 0 {
        let n = usize::try_from(remaining).map_or(chunk_bytes, |r| r.min(chunk_bytes));
        let mut chunk = vec![0u8; n];
        let item = file
            .read_exact(&mut chunk)
            .map(|()| Bytes::from(chunk))
            .map_err(io_error);
        let failed = item.is_err();
        if tx.blocking_send(item).is_err() || failed {
            return;
        }
        remaining -= n as u64;
    }
}

/// Regroups a byte stream into chunks of `chunk_bytes` (the last may be shorter). Pieces
/// already that large are sliced, not copied.
async fn rechunk(
    mut stream: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
    chunk_bytes: usize,
    key: String,
    tx: mpsc::Sender<Result<Bytes>>,
) {
    let mut chunk = BytesMut::new();
    while let Some(item) = stream.next().await {
        let mut bytes = match item {
            Ok(bytes) => bytes,
            Err(e) => {
                let _ = tx.send(Err(backend_error("get", &key, e))).await;
                return;
            }
        };
        while !bytes.is_empty() {
            if chunk.is_empty() && bytes.len() >= chunk_bytes {
                if tx.send(Ok(bytes.split_to(chunk_bytes))).await.is_err() {
                    return;
                }
                continue;
            }
            let take = bytes.len().min(chunk_bytes - chunk.len());
            chunk.extend_from_slice(&bytes.split_to(take));
            if chunk.len() == chunk_bytes && tx.send(Ok(chunk.split().freeze())).await.is_err() {
                return;
            }
        }
    }
    if !chunk.is_empty() {
        let _ = tx.send(Ok(chunk.freeze())).await;
    }
}

/// An atomic streaming put ([`Store::put_writer`]). Dropping it, or [`BlobWriter::abort`],
/// commits nothing (an S3 multipart upload dropped without abort leaves invisible parts that a
/// bucket lifecycle rule for incomplete uploads removes).
pub struct BlobWriter {
    store: Store,
    key: String,
    expected: u64,
    written: u64,
    sink: Sink,
}

enum Sink {
    Buffer(BytesMut),
    Multipart(WriteMultipart),
}

impl BlobWriter {
    /// Appends `data`; refuses to go past the announced size.
    pub async fn write(&mut self, data: Bytes) -> Result<()> {
        let written = self.written + data.len() as u64;
        if written > self.expected {
            return Err(Error::Transfer {
                key: self.key.clone(),
                reason: format!("{written} bytes sent, {} announced", self.expected),
            });
        }
        self.written = written;
        match &mut self.sink {
            Sink::Buffer(buf) => buf.extend_from_slice(&data),
            Sink::Multipart(upload) => {
                upload
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| backend_error("put", &self.key, e))?;
                upload.put(data);
            }
        }
        Ok(())
    }

    /// Commits the blob if exactly the announced number of bytes was written; otherwise
    /// aborts and returns [`Error::Transfer`].
    pub async fn finish(self) -> Result<()> {
        if self.written != self.expected {
            let err = Error::Transfer {
                key: self.key.clone(),
                reason: format!(
                    "stream ended after {} of {} bytes",
                    self.written, self.expected
                ),
            };
            self.abort().await;
            return Err(err);
        }
        match self.sink {
            Sink::Buffer(buf) => self.store.put_whole(&self.key, buf.freeze()).await,
            Sink::Multipart(upload) => {
                upload
                    .finish()
                    .await
                    .map_err(|e| backend_error("put", &self.key, e))?;
                self.store.count_put(&self.key, self.written, true);
                Ok(())
            }
        }
    }

    /// Abandons the upload: nothing becomes visible.
    pub async fn abort(self) {
        if let Sink::Multipart(upload) = self.sink
            && let Err(e) = upload.abort().await
        {
            tracing::warn!(key = self.key, error = %e, "multipart upload abort failed");
        }
        tracing::debug!(key = self.key, written = self.written, "blob put aborted");
    }
}
