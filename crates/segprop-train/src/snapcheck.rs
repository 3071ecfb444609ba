//! SnapCheck: the cache `S[depth, batch]` of detached outputs of the committed prefix.
//!
//! Because the prefix `0..q` is frozen during a stage, its output for a given batch never changes:
//! the engine computes it once (filled on first use) and reads it back on every later epoch. When
//! segment `[q, q+k)` commits, [`SnapshotCache::advance`] computes `S[q+k, b] = segment(S[q, b])`,
//! one segment's forward per batch, never the whole prefix again. Entries live in memory up to a
//! byte budget and spill to files beyond it; a spilled entry carries a checksum, and a missing or
//! corrupt entry reads as a miss so the caller recomputes it.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::DType;
use segprop_model::precision::to_dtype;
use serde::Serialize;

/// Train and eval batches have separate id spaces.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Eval,
}

/// `S[depth, batch]`: the output of blocks `0..depth` for batch `id` of `split`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotKey {
    pub depth: usize,
    pub split: Split,
    pub id: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct SnapshotStats {
    pub hits: u64,
    pub misses: u64,
    /// Spilled entries whose checksum or size did not match (recomputed by the caller).
    pub corrupt: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub entries: usize,
    /// Entries produced by [`SnapshotCache::advance`] rather than a prefix forward.
    pub advanced: u64,
    /// Entries loaded from the [`SnapshotSource`] (the shared store) on a miss.
    #[serde(default)]
    pub fetched: u64,
}

/// One stored snapshot entry as plain numbers: `S[key]` of shape `dims` (`[batch, seq, hidden]`).
#[derive(Debug, Clone, PartialEq)]
pub struct SourcedEntry {
    pub key: SnapshotKey,
    pub dims: [usize; 3],
    pub values: Vec<f32>,
}

/// Where the cache looks for an entry it does not hold before reporting a miss: the shared
/// snapshot store, which advance tasks on other workers fill. A source returns every entry of
/// the blob holding `key` (the cache keeps them all), or nothing (the caller recomputes).
pub trait SnapshotSource: Send {
    fn fetch(&mut self, key: SnapshotKey) -> Vec<SourcedEntry>;
}

const MAGIC: &[u8; 8] = b"SPSNAP01";

pub struct SnapshotCache<B: Backend> {
    memory_budget: u64,
    spill_dir: PathBuf,
    device: B::Device,
    memory: HashMap<SnapshotKey, Tensor<B, 3>>,
    disk: HashMap<SnapshotKey, (PathBuf, u64)>,
    stats: SnapshotStats,
    source: Option<Box<dyn SnapshotSource>>,
    /// The compute dtype: entries are kept and returned in it (spill files and the shared store
    /// hold f32, which represents every bf16/f16 value exactly).
    dtype: DType,
}

impl<B: Backend> Drop for SnapshotCache<B> {
    fn drop(&mut self) {
        crate::alloc::take_back(self.stats.memory_bytes as usize);
    }
}

impl<B: Backend> SnapshotCache<B> {
    /// A cache keeping up to `memory_budget` bytes in memory and spilling the rest to `spill_dir`.
    pub fn new(memory_budget: u64, spill_dir: &Path, device: &B::Device) -> Self {
        Self {
            memory_budget,
            spill_dir: spill_dir.to_path_buf(),
            device: device.clone(),
            memory: HashMap::new(),
            disk: HashMap::new(),
            stats: SnapshotStats::default(),
            source: None,
            dtype: DType::F32,
        }
    }

    /// Keeps and returns entries in `dtype` (a mixed-precision job's compute dtype).
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// Bytes an entry of `value`'s shape takes in memory.
    fn entry_bytes(&self, value: &Tensor<B, 3>) -> u64 {
        (value.shape().num_elements() * self.dtype.size()) as u64
    }

    /// Consults `source` on every miss from now on.
    pub fn set_source(&mut self, source: Box<dyn SnapshotSource>) {
        self.source = Some(source);
    }

    pub fn stats(&self) -> SnapshotStats {
        let mut stats = self.stats.clone();
        stats.entries = self.memory.len() + self.disk.len();
        stats
    }

    /// Depths that currently hold at least one entry.
    pub fn depths(&self) -> BTreeSet<usize> {
        self.memory
            .keys()
            .chain(self.disk.keys())
            .map(|k| k.depth)
            .collect()
    }

    /// Returns `S[key]`, or `None` (a miss) when absent or corrupt.
    pub fn get(&mut self, key: SnapshotKey) -> Option<Tensor<B, 3>> {
        if let Some(t) = self.memory.get(&key) {
            self.stats.hits += 1;
            return Some(t.clone());
        }
        let Some((path, bytes)) = self.disk.get(&key).cloned() else {
            return self.fetch(key);
        };
        match read_spilled::<B>(&path, &self.device) {
            Some(t) => {
                let t = to_dtype(t, self.dtype);
                self.stats.hits += 1;
                Some(t)
            }
            None => {
                self.stats.corrupt += 1;
                self.stats.misses += 1;
                self.disk.remove(&key);
                self.stats.disk_bytes -= bytes;
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// A miss in memory and on disk: asks the source, keeping every entry it returns.
    fn fetch(&mut self, key: SnapshotKey) -> Option<Tensor<B, 3>> {
        let entries = self
            .source
            .as_mut()
            .map(|source| source.fetch(key))
            .unwrap_or_default();
        let mut found = None;
        for entry in entries {
            let tensor = to_dtype(
                Tensor::<B, 3>::from_data(TensorData::new(entry.values, entry.dims), &self.device),
                self.dtype,
            );
            self.stats.fetched += 1;
            if entry.key == key {
                found = Some(tensor.clone());
            }
            if let Err(err) = self.put(entry.key, tensor) {
                tracing::warn!(error = %err, "cannot keep a fetched snapshot");
            }
        }
        match found {
            Some(t) => {
                self.stats.hits += 1;
                Some(t)
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Stores `S[key]` (a detached tensor `[batch, seq, hidden]`).
    pub fn put(&mut self, key: SnapshotKey, value: Tensor<B, 3>) -> std::io::Result<()> {
        self.remove(key);
        let value = to_dtype(value, self.dtype);
        let bytes = self.entry_bytes(&value);
        if self.stats.memory_bytes + bytes <= self.memory_budget {
            self.stats.memory_bytes += bytes;
            crate::alloc::set_aside(bytes as usize);
            self.memory.insert(key, value);
            return Ok(());
        }
        std::fs::create_dir_all(&self.spill_dir)?;
        let name = format!(
            "d{}-{}-{}.snap",
            key.depth,
            match key.split {
                Split::Train => "train",
                Split::Eval => "eval",
            },
            key.id
        );
        let path = self.spill_dir.join(name);
        let written = write_spilled(&path, value)?;
        self.stats.disk_bytes += written;
        self.disk.insert(key, (path, written));
        Ok(())
    }

    fn remove(&mut self, key: SnapshotKey) {
        if let Some(t) = self.memory.remove(&key) {
            let bytes = self.entry_bytes(&t);
            self.stats.memory_bytes -= bytes;
            crate::alloc::take_back(bytes as usize);
        }
        if let Some((path, bytes)) = self.disk.remove(&key) {
            self.stats.disk_bytes -= bytes;
            let _ = std::fs::remove_file(path);
        }
    }

    /// Drops every entry at `depth`.
    pub fn drop_depth(&mut self, depth: usize) {
        let keys: Vec<_> = self
            .memory
            .keys()
            .chain(self.disk.keys())
            .filter(|k| k.depth == depth)
            .copied()
            .collect();
        for key in keys {
            self.remove(key);
        }
    }

    /// `S[to, b] = segment(S[from, b])` for every batch cached at `from`, then drops depth `from`.
    /// Entries that are corrupt are skipped (they will be recomputed on first use).
    pub fn advance(
        &mut self,
        from: usize,
        to: usize,
        segment: impl FnMut(Tensor<B, 3>) -> Tensor<B, 3>,
    ) -> std::io::Result<()> {
        self.advance_counted(from, to, segment, true)
    }

    /// One step of an advance made block by block (a sharded trainer gathers one block at a
    /// time): like [`Self::advance`], but counted in the stats only when `last`.
    pub fn advance_step(
        &mut self,
        from: usize,
        segment: impl FnMut(Tensor<B, 3>) -> Tensor<B, 3>,
        last: bool,
    ) -> std::io::Result<()> {
        self.advance_counted(from, from + 1, segment, last)
    }

    fn advance_counted(
        &mut self,
        from: usize,
        to: usize,
        mut segment: impl FnMut(Tensor<B, 3>) -> Tensor<B, 3>,
        count: bool,
    ) -> std::io::Result<()> {
        for key in self.keys_at(from) {
            let hits = self.stats.hits;
            let Some(input) = self.get(key) else { continue };
            self.stats.hits = hits; // advancing is not a training-time hit
            // Free the source before storing the result so the budget holds one copy.
            self.remove(key);
            let output = segment(input);
            self.put(SnapshotKey { depth: to, ..key }, output)?;
            if count {
                self.stats.advanced += 1;
            }
        }
        self.drop_depth(from);
        Ok(())
    }
}

impl<B: Backend> SnapshotCache<B> {
    /// Keys of every entry at `depth` (memory and disk), sorted.
    fn keys_at(&self, depth: usize) -> Vec<SnapshotKey> {
        let mut keys: Vec<SnapshotKey> = self
            .memory
            .keys()
            .chain(self.disk.keys())
            .filter(|k| k.depth == depth)
            .copied()
            .collect();
        keys.sort();
        keys
    }
}

/// `S[key]` as plain numbers (for the shared store).
pub fn entry_values<B: Backend>(key: SnapshotKey, value: Tensor<B, 3>) -> SourcedEntry {
    let dims = value.dims();
    let values = value
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap_or_default();
    SourcedEntry { key, dims, values }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Layout: magic, 3 x u64 dims, u64 checksum of the payload, f32 LE payload. Written to a
/// temporary name and renamed so a reader never sees half an entry.
fn write_spilled<B: Backend>(path: &Path, value: Tensor<B, 3>) -> std::io::Result<u64> {
    let dims = value.dims();
    let data: Vec<f32> = value
        .into_data()
        .convert::<f32>()
        .into_vec()
        .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    let payload: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let tmp = path.with_extension("partial");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    file.write_all(MAGIC)?;
    for d in dims {
        file.write_all(&(d as u64).to_le_bytes())?;
    }
    file.write_all(&fnv1a(&payload).to_le_bytes())?;
    file.write_all(&payload)?;
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok((8 + 32 + payload.len()) as u64)
}

fn read_spilled<B: Backend>(path: &Path, device: &B::Device) -> Option<Tensor<B, 3>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.len() < 40 || &bytes[..8] != MAGIC {
        return None;
    }
    let word =
        |i: usize| u64::from_le_bytes(bytes[8 + 8 * i..16 + 8 * i].try_into().unwrap_or([0; 8]));
    let dims = [word(0) as usize, word(1) as usize, word(2) as usize];
    let checksum = word(3);
    let payload = &bytes[40..];
    if payload.len() != dims.iter().product::<usize>() * 4 || fnv1a(payload) != checksum {
        return None;
    }
    let values: Vec<f32> = payload
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Some(Tensor::from_data(TensorData::new(values, dims), device))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray;

    fn key(depth: usize, id: usize) -> SnapshotKey {
        SnapshotKey {
            depth,
            split: Split::Train,
            id,
        }
    }

    fn tensor(seed: f32) -> Tensor<B, 3> {
        let values: Vec<f32> = (0..24).map(|i| seed + i as f32 * 0.5).collect();
        Tensor::from_data(TensorData::new(values, [2, 3, 4]), &Default::default())
    }

    #[test]
    fn spills_beyond_budget_and_reads_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = SnapshotCache::<B>::new(100, dir.path(), &Default::default());
        cache.put(key(2, 0), tensor(1.0)).unwrap(); // 96 bytes: memory
        cache.put(key(2, 1), tensor(2.0)).unwrap(); // over budget: disk
        let stats = cache.stats();
        assert_eq!((stats.memory_bytes, stats.entries), (96, 2));
        assert!(stats.disk_bytes > 96);
        cache
            .get(key(2, 1))
            .unwrap()
            .into_data()
            .assert_eq(&tensor(2.0).into_data(), true);
        assert!(cache.get(key(3, 0)).is_none());
    }

    #[test]
    fn corrupt_spill_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = SnapshotCache::<B>::new(0, dir.path(), &Default::default());
        cache.put(key(1, 7), tensor(3.0)).unwrap();
        let path = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
        assert!(cache.get(key(1, 7)).is_none());
        assert_eq!(cache.stats().corrupt, 1);
        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn advance_moves_every_entry_one_segment_deeper() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = SnapshotCache::<B>::new(150, dir.path(), &Default::default());
        cache.put(key(2, 0), tensor(1.0)).unwrap();
        cache.put(key(2, 1), tensor(2.0)).unwrap();
        cache.advance(2, 3, |t| t.mul_scalar(2.0)).unwrap();
        assert_eq!(cache.depths(), BTreeSet::from([3]));
        cache
            .get(key(3, 1))
            .unwrap()
            .into_data()
            .assert_eq(&tensor(2.0).mul_scalar(2.0).into_data(), true);
        assert_eq!(cache.stats().advanced, 2);
    }

    /// Hands out the two entries of one "blob" once, then nothing.
    struct OneBlob(Option<Vec<SourcedEntry>>);

    impl SnapshotSource for OneBlob {
        fn fetch(&mut self, _key: SnapshotKey) -> Vec<SourcedEntry> {
            self.0.take().unwrap_or_default()
        }
    }

    #[test]
    fn a_miss_asks_the_source_and_keeps_its_whole_blob() {
        let dir = tempfile::tempdir().unwrap();
        let device = Default::default();
        let mut cache = SnapshotCache::<B>::new(1 << 20, dir.path(), &device);
        let entry = |id: usize, v: f32| SourcedEntry {
            key: key(3, id),
            dims: [1, 2, 2],
            values: vec![v; 4],
        };
        cache.set_source(Box::new(OneBlob(Some(vec![entry(0, 1.5), entry(1, 2.5)]))));
        let got = cache.get(key(3, 1)).unwrap();
        assert_eq!(got.into_data().to_vec::<f32>().unwrap(), vec![2.5; 4]);
        // The blob's other entry is now cached: no second fetch needed.
        let other = cache.get(key(3, 0)).unwrap();
        assert_eq!(other.into_data().to_vec::<f32>().unwrap(), vec![1.5; 4]);
        let stats = cache.stats();
        assert_eq!((stats.fetched, stats.hits, stats.misses), (2, 2, 0));
        // A key the source does not have is a miss (the caller recomputes it).
        assert!(cache.get(key(3, 7)).is_none());
        assert_eq!(cache.stats().misses, 1);
    }
}
