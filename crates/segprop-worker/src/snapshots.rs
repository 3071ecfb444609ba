//! SnapCheck across workers: the snapshots `S[depth, batch]` of a job live in the shared
//! snapshot store (object store or the coordinator's SnapshotService), written by
//! `advance_snapshots` shards and read by the next segment on whichever worker trains it.
//!
//! Both sides derive the same blob layout from the job spec alone ([`blob_plan`]): the batches
//! SnapCheck covers (train, then evaluated eval batches, in id order) are cut into `shards`
//! contiguous ranges, one per shard task, and each range into blobs of up to
//! [`batches_per_blob`] batches of one split. A reader therefore knows which blob holds a batch
//! without listing the store, and can wait for a blob that a running shard has not written yet
//! (streaming overlap).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use segprop_core::{JobSpec, SnapshotDtype};
use segprop_store::{SnapshotEntry, SnapshotHeader, StorageDtype, Store};
use segprop_train::snapcheck::{SnapshotKey, SnapshotSource, SourcedEntry, Split};
use serde::Serialize;

/// Blob size the layout aims at (f32 bytes, whatever the storage dtype).
const BLOB_TARGET_BYTES: usize = 16 << 20;

/// Batches per blob: as many as fit [`BLOB_TARGET_BYTES`] at f32, between 1 and 64.
pub fn batches_per_blob(spec: &JobSpec, hidden_size: usize) -> usize {
    let batch_bytes = spec.data.batch_size.get() * spec.data.seq_len * hidden_size * 4;
    (BLOB_TARGET_BYTES / batch_bytes.max(1)).clamp(1, 64)
}

/// One blob of a snapshot depth: consecutive batches of one split, written by shard `shard`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobPlan {
    pub shard: u32,
    pub split: Split,
    pub ids: Vec<usize>,
}

/// The blobs of a depth: `batches` (in SnapCheck order) cut into `shards` contiguous ranges of
/// near-equal size, each cut into runs of one split of at most `per_blob` batches.
pub fn blob_plan(batches: &[(Split, usize)], shards: u32, per_blob: usize) -> Vec<BlobPlan> {
    let shards = shards.max(1) as usize;
    let per_blob = per_blob.max(1);
    let mut blobs: Vec<BlobPlan> = Vec::new();
    for shard in 0..shards {
        let range = shard * batches.len() / shards..(shard + 1) * batches.len() / shards;
        let mut current: Option<BlobPlan> = None;
        for &(split, id) in &batches[range] {
            match &mut current {
                Some(blob) if blob.split == split && blob.ids.len() < per_blob => {
                    blob.ids.push(id);
                }
                _ => {
                    blobs.extend(current.take());
                    current = Some(BlobPlan {
                        shard: u32::try_from(shard).unwrap_or(u32::MAX),
                        split,
                        ids: vec![id],
                    });
                }
            }
        }
        blobs.extend(current);
    }
    blobs
}

/// SnapCheck's batches (as the trainer lists them) by split and id, to find a blob's batches.
pub fn batch_index(
    batches: &[(Split, segprop_train::data::Batch)],
) -> HashMap<(Split, usize), &segprop_train::data::Batch> {
    batches
        .iter()
        .map(|(split, b)| ((*split, b.id), b))
        .collect()
}

/// The batches of `blob`, from [`batch_index`]. A blob naming a batch the data lacks is an
/// error naming it.
pub fn blob_batches<'a>(
    index: &HashMap<(Split, usize), &'a segprop_train::data::Batch>,
    blob: &BlobPlan,
) -> Result<Vec<&'a segprop_train::data::Batch>, segprop_train::TrainError> {
    blob.ids
        .iter()
        .map(|id| {
            index
                .get(&(blob.split, *id))
                .copied()
                .ok_or_else(|| segprop_train::TrainError::State {
                    path: std::path::PathBuf::from(format!("{:?} batch {id}", blob.split)),
                    message: "the snapshot layout names a batch the job's data lacks".into(),
                })
        })
        .collect()
}

pub fn store_split(split: Split) -> segprop_store::Split {
    match split {
        Split::Train => segprop_store::Split::Train,
        Split::Eval => segprop_store::Split::Eval,
    }
}

pub fn storage_dtype(dtype: SnapshotDtype) -> StorageDtype {
    match dtype {
        SnapshotDtype::F32 => StorageDtype::F32,
        SnapshotDtype::Bf16 => StorageDtype::Bf16,
        SnapshotDtype::F16 => StorageDtype::F16,
    }
}

/// Header allowance per blob in [`depth_bytes_estimate`] (metadata JSON and safetensors
/// header; measured headers of the tiny and small presets stay under 2 KiB).
const BLOB_OVERHEAD_BYTES: u64 = 4096;

/// Estimated bytes of one stored depth: every batch's activations `[batch, seq, hidden]` at the
/// storage dtype, plus a header allowance per blob (blobs cut for `shards` shards, and a few
/// spare in case a depth is cut into more). The coordinator's snapshot budget starts from this
/// and switches to measured sizes once a depth is stored.
pub fn depth_bytes_estimate(
    batches: &[(Split, usize, usize)],
    hidden_size: usize,
    dtype: StorageDtype,
    shards: u32,
    per_blob: usize,
) -> u64 {
    let payload: u64 = batches
        .iter()
        .map(|(_, _, tokens)| (*tokens * hidden_size * dtype.bytes_per_element()) as u64)
        .sum();
    let ids: Vec<_> = batches.iter().map(|(split, id, _)| (*split, *id)).collect();
    let blobs = blob_plan(&ids, shards, per_blob).len() as u64 + 8;
    payload + blobs * BLOB_OVERHEAD_BYTES
}

/// The store key of `blob` at `depth`.
pub fn blob_key(job_dir: &str, depth: u32, blob: &BlobPlan) -> String {
    let first = blob.ids.first().copied().unwrap_or(0) as u64;
    let last = blob.ids.last().copied().unwrap_or(0) as u64;
    segprop_store::snapshot_key(job_dir, depth, store_split(blob.split), first, last)
}

/// What a task did with the snapshot store (reported in its result and logs).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SnapshotIo {
    /// Blobs read and decoded (checksum verified).
    pub blobs_read: u64,
    pub bytes_read: u64,
    /// Blobs written (advance tasks).
    pub blobs_written: u64,
    pub bytes_written: u64,
    /// Blobs whose checksum or metadata did not verify: their batches were recomputed.
    pub corrupt_blobs: u64,
    /// Blobs absent once every shard had finished: their batches were recomputed.
    pub missing_blobs: u64,
    /// Time spent waiting for shards still running (streaming overlap).
    pub waited_ms: u64,
}

/// Reads `S[depth]` from the store for a [`segprop_train::snapcheck::SnapshotCache`] miss.
pub struct StoreSource {
    pub store: Store,
    pub runtime: tokio::runtime::Handle,
    pub job_dir: String,
    pub header: SnapshotHeader,
    /// Blob of each batch at `header.depth`.
    blobs: HashMap<(Split, usize), BlobPlan>,
    /// Every shard of the depth had finished when the task started: a missing blob will not
    /// appear, so it is recomputed at once instead of waited for.
    pub complete: bool,
    /// How long to wait for a blob of a running shard before recomputing its batches.
    pub wait_limit: Duration,
    /// Blobs that failed to verify or never appeared (not asked for again).
    given_up: HashSet<String>,
    pub io: Arc<Mutex<SnapshotIo>>,
    pub cancel: Arc<std::sync::atomic::AtomicBool>,
}

impl StoreSource {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        runtime: tokio::runtime::Handle,
        job_dir: String,
        header: SnapshotHeader,
        plan: Vec<BlobPlan>,
        complete: bool,
        io: Arc<Mutex<SnapshotIo>>,
        cancel: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        let mut blobs = HashMap::new();
        for blob in plan {
            for &id in &blob.ids {
                blobs.insert((blob.split, id), blob.clone());
            }
        }
        Self {
            store,
            runtime,
            job_dir,
            header,
            blobs,
            complete,
            wait_limit: Duration::from_secs(600),
            given_up: HashSet::new(),
            io,
            cancel,
        }
    }

    fn io(&self) -> std::sync::MutexGuard<'_, SnapshotIo> {
        self.io.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The decoded blob, or `None` (missing after waiting, or corrupt).
    fn read(&mut self, key: &str) -> Option<Vec<SnapshotEntry>> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(20);
        loop {
            match self.runtime.block_on(self.store.get(key)) {
                Ok(bytes) => {
                    let waited = started.elapsed().as_millis() as u64;
                    return match segprop_store::decode_snapshot(&bytes, key, &self.header) {
                        Ok(entries) => {
                            let mut io = self.io();
                            io.blobs_read += 1;
                            io.bytes_read += bytes.len() as u64;
                            io.waited_ms += waited;
                            Some(entries)
                        }
                        Err(err) => {
                            self.store.record_corrupt();
                            tracing::warn!(key, error = %err, "corrupt snapshot blob: recomputing its batches");
                            let mut io = self.io();
                            io.corrupt_blobs += 1;
                            io.waited_ms += waited;
                            None
                        }
                    };
                }
                Err(segprop_store::Error::NotFound { .. })
                    if !self.complete
                        && started.elapsed() < self.wait_limit
                        && !self.cancel.load(std::sync::atomic::Ordering::SeqCst) =>
                {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(200));
                }
                Err(err) => {
                    tracing::warn!(key, error = %err, "snapshot blob unavailable: recomputing its batches");
                    let mut io = self.io();
                    io.missing_blobs += 1;
                    io.waited_ms += started.elapsed().as_millis() as u64;
                    return None;
                }
            }
        }
    }
}

impl SnapshotSource for StoreSource {
    fn fetch(&mut self, key: SnapshotKey) -> Vec<SourcedEntry> {
        if key.depth != self.header.depth as usize {
            return Vec::new();
        }
        let Some(blob) = self.blobs.get(&(key.split, key.id)).cloned() else {
            return Vec::new();
        };
        let store_key = blob_key(&self.job_dir, self.header.depth, &blob);
        if self.given_up.contains(&store_key) {
            return Vec::new();
        }
        let Some(entries) = self.read(&store_key) else {
            self.given_up.insert(store_key);
            return Vec::new();
        };
        entries
            .into_iter()
            .filter_map(|e| {
                let dims: [usize; 3] = e.shape.clone().try_into().ok()?;
                let split = match e.split {
                    segprop_store::Split::Train => Split::Train,
                    segprop_store::Split::Eval => Split::Eval,
                };
                Some(SourcedEntry {
                    key: SnapshotKey {
                        depth: key.depth,
                        split,
                        id: usize::try_from(e.id).ok()?,
                    },
                    dims,
                    values: e.data,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batches(train: usize, eval: usize) -> Vec<(Split, usize)> {
        (0..train)
            .map(|i| (Split::Train, i))
            .chain((0..eval).map(|i| (Split::Eval, i)))
            .collect()
    }

    #[test]
    fn blob_plan_covers_every_batch_once_in_contiguous_shards() {
        for shards in 1..=5u32 {
            for per_blob in 1..=4 {
                let all = batches(7, 3);
                let plan = blob_plan(&all, shards, per_blob);
                let covered: Vec<(Split, usize)> = plan
                    .iter()
                    .flat_map(|b| b.ids.iter().map(move |&id| (b.split, id)))
                    .collect();
                assert_eq!(covered, all, "shards {shards} per_blob {per_blob}");
                assert!(plan.iter().all(|b| b.ids.len() <= per_blob));
                assert!(plan.windows(2).all(|w| w[0].shard <= w[1].shard));
                let used: HashSet<u32> = plan.iter().map(|b| b.shard).collect();
                assert_eq!(used.len(), shards.min(10) as usize);
            }
        }
    }

    #[test]
    fn blobs_never_mix_splits() {
        let plan = blob_plan(&batches(3, 3), 1, 8);
        assert_eq!(plan.len(), 2);
        assert_eq!(plan[0].ids, [0, 1, 2]);
        assert_eq!(plan[0].split, Split::Train);
        assert_eq!(plan[1].split, Split::Eval);
    }

    fn header() -> SnapshotHeader {
        SnapshotHeader {
            job: "j1".into(),
            depth: 2,
            fingerprint: "fnv1a64:00".into(),
            dtype: StorageDtype::F32,
        }
    }

    /// A store holding blob `plan[0]` (train batches 0 and 1) at depth 2.
    fn stored(runtime: &tokio::runtime::Runtime) -> (Store, Vec<BlobPlan>, String) {
        let store = Store::memory();
        let plan = blob_plan(&batches(4, 0), 2, 8);
        let entries: Vec<SnapshotEntry> = plan[0]
            .ids
            .iter()
            .map(|&id| SnapshotEntry {
                split: segprop_store::Split::Train,
                id: id as u64,
                shape: vec![1, 2, 2],
                data: vec![id as f32; 4],
            })
            .collect();
        let bytes = segprop_store::encode_snapshot(&header(), &entries).unwrap();
        let key = blob_key("jobs/j1", 2, &plan[0]);
        runtime.block_on(store.put(&key, bytes.into())).unwrap();
        (store, plan, key)
    }

    fn source(
        runtime: &tokio::runtime::Runtime,
        store: &Store,
        plan: &[BlobPlan],
        complete: bool,
    ) -> (StoreSource, Arc<Mutex<SnapshotIo>>) {
        let io = Arc::new(Mutex::new(SnapshotIo::default()));
        let source = StoreSource::new(
            store.clone(),
            runtime.handle().clone(),
            "jobs/j1".into(),
            header(),
            plan.to_vec(),
            complete,
            io.clone(),
            Arc::default(),
        );
        (source, io)
    }

    fn key(id: usize) -> SnapshotKey {
        SnapshotKey {
            depth: 2,
            split: Split::Train,
            id,
        }
    }

    #[test]
    fn a_stored_blob_serves_all_its_batches() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (store, plan, _) = stored(&runtime);
        let (mut source, io) = source(&runtime, &store, &plan, true);
        let entries = source.fetch(key(1));
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].key, key(1));
        assert_eq!(entries[1].values, vec![1.0; 4]);
        assert_eq!(io.lock().unwrap().blobs_read, 1);
        // Batches of the second shard's blob were never written: a miss, not a wait.
        assert!(source.fetch(key(3)).is_empty());
        assert_eq!(io.lock().unwrap().missing_blobs, 1);
        // Another depth is not this source's business.
        assert!(source.fetch(SnapshotKey { depth: 5, ..key(0) }).is_empty());
    }

    #[test]
    fn a_flipped_byte_is_detected_and_reads_as_a_miss() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (store, plan, blob) = stored(&runtime);
        let mut bytes = runtime.block_on(store.get(&blob)).unwrap().to_vec();
        let at = bytes.len() - 3;
        bytes[at] ^= 1;
        runtime.block_on(store.put(&blob, bytes.into())).unwrap();
        let (mut source, io) = source(&runtime, &store, &plan, true);
        assert!(source.fetch(key(0)).is_empty());
        assert_eq!(io.lock().unwrap().corrupt_blobs, 1);
        // Given up on: not read again for the blob's other batch.
        assert!(source.fetch(key(1)).is_empty());
        assert_eq!(io.lock().unwrap().corrupt_blobs, 1);
        assert_eq!(store.stats().corrupt, 1);
    }

    #[test]
    fn an_incomplete_depth_waits_for_the_blob_of_a_running_shard() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (store, plan, blob) = stored(&runtime);
        let bytes = runtime.block_on(store.get(&blob)).unwrap();
        runtime.block_on(store.delete(&blob)).unwrap();
        let writer = {
            let (store, handle) = (store.clone(), runtime.handle().clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(150));
                handle.block_on(store.put(&blob, bytes)).unwrap();
            })
        };
        let (mut source, io) = source(&runtime, &store, &plan, false);
        let entries = source.fetch(key(0));
        writer.join().unwrap();
        assert_eq!(entries.len(), 2);
        assert!(
            io.lock().unwrap().waited_ms >= 100,
            "{:?}",
            io.lock().unwrap()
        );
    }
}
