//! The snapshot codec: SnapCheck activations `S[p, batch]` (the input of block `p` for one
//! batch, paper Algorithm 1) stored as safetensors blobs, one blob per batch range.
//!
//! A blob holds one tensor per batch, named `train.<id>` or `eval.<id>`, in the storage dtype
//! (f32, or bf16/f16 rounded to nearest even). Its `__metadata__` records:
//!
//! | key              | value                                                        |
//! |------------------|--------------------------------------------------------------|
//! | `format`         | `segprop.snapshot`                                           |
//! | `format_version` | `1`                                                          |
//! | `job`, `depth`, `fingerprint`, `dtype` | the [`SnapshotHeader`]                 |
//! | `entries`        | JSON `[{"split":"train","id":0,"shape":[..]}, ..]`, in order  |
//! | `checksum`       | `xxh3:<hex>`: xxh3-64 over every tensor's bytes, in `entries` order |
//!
//! [`decode_snapshot`] refuses a blob that does not parse, is truncated, fails its checksum
//! ([`Error::Corrupt`]) or belongs to another job, depth, committed-blocks fingerprint or dtype
//! ([`Error::Mismatch`]): a stale snapshot must never feed a stage.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3Default;

use crate::checked::xxh3_label;
use crate::{Error, Result};

const FORMAT: &str = "segprop.snapshot";
const FORMAT_VERSION: &str = "1";

/// How activations are stored (they are always handed over as f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageDtype {
    F32,
    Bf16,
    F16,
}

impl StorageDtype {
    pub fn bytes_per_element(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::Bf16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }

    /// Appends `values` in this dtype, little-endian.
    fn encode_into(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.bytes_per_element());
        match self {
            Self::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Self::Bf16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
            Self::F16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        }
    }

    /// Widens little-endian `bytes` of this dtype back to f32.
    fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            Self::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Self::Bf16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Self::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }
}

impl fmt::Display for StorageDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for StorageDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            other => Err(format!(
                "unknown storage dtype {other:?} (f32, bf16 or f16)"
            )),
        }
    }
}

/// Which batches a snapshot entry belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Eval,
}

impl Split {
    fn name(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Eval => "eval",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `S[depth, batch]` of one batch: row-major `data` of `shape` (e.g. `[batch, seq, d_model]`).
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotEntry {
    pub split: Split,
    pub id: u64,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// What a snapshot blob must belong to; written into the blob and checked on read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub job: String,
    /// `p`: the snapshot is the input of block `depth` (the output of blocks `0..depth`).
    pub depth: u32,
    /// Fingerprint of the committed blocks `0..depth` that produced it (opaque).
    pub fingerprint: String,
    pub dtype: StorageDtype,
}

#[derive(Debug, Serialize, Deserialize)]
struct EntryMeta {
    split: Split,
    id: u64,
    shape: Vec<usize>,
}

fn tensor_name(split: Split, id: u64) -> String {
    format!("{split}.{id}")
}

/// The key of the blob holding batches `first_id..=last_id` of `split` at `depth`:
/// `<job_dir>/snapshots/depth-003/train-000000-000007.safetensors`.
pub fn snapshot_key(
    job_dir: &str,
    depth: u32,
    split: Split,
    first_id: u64,
    last_id: u64,
) -> String {
    format!(
        "{}{split}-{first_id:06}-{last_id:06}.safetensors",
        depth_prefix(job_dir, depth)
    )
}

/// The prefix of every snapshot blob of `depth`: `<job_dir>/snapshots/depth-003/`.
pub fn depth_prefix(job_dir: &str, depth: u32) -> String {
    format!(
        "{}/depth-{depth:03}/",
        crate::layout::snapshots_dir(job_dir)
    )
}

/// Encodes `entries` (in the header's dtype) as one safetensors blob.
pub fn encode_snapshot(header: &SnapshotHeader, entries: &[SnapshotEntry]) -> Result<Vec<u8>> {
    let mut seen = HashSet::new();
    let mut data = Vec::new();
    let mut ranges = Vec::with_capacity(entries.len());
    for entry in entries {
        let name = tensor_name(entry.split, entry.id);
        let elements: usize = entry.shape.iter().product();
        if elements != entry.data.len() {
            return Err(Error::Encode {
                reason: format!(
                    "{name}: shape {:?} has {elements} elements, data has {}",
                    entry.shape,
                    entry.data.len()
                ),
            });
        }
        if !seen.insert(name.clone()) {
            return Err(Error::Encode {
                reason: format!("{name} appears twice"),
            });
        }
        let start = data.len();
        header.dtype.encode_into(&entry.data, &mut data);
        ranges.push((name, start..data.len()));
    }
    let mut hasher = Xxh3Default::new();
    hasher.update(&data);
    let meta: Vec<EntryMeta> = entries
        .iter()
        .map(|e| EntryMeta {
            split: e.split,
            id: e.id,
            shape: e.shape.clone(),
        })
        .collect();
    let encode_error = |e: &dyn fmt::Display| Error::Encode {
        reason: e.to_string(),
    };
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("format_version".to_string(), FORMAT_VERSION.to_string()),
        ("job".to_string(), header.job.clone()),
        ("depth".to_string(), header.depth.to_string()),
        ("fingerprint".to_string(), header.fingerprint.clone()),
        ("dtype".to_string(), header.dtype.to_string()),
        (
            "entries".to_string(),
            serde_json::to_string(&meta).map_err(|e| encode_error(&e))?,
        ),
        ("checksum".to_string(), xxh3_label(hasher.digest())),
    ]);
    let mut views = Vec::with_capacity(entries.len());
    for ((name, range), entry) in ranges.into_iter().zip(entries) {
        let view = TensorView::new(
            header.dtype.safetensors(),
            entry.shape.clone(),
            &data[range],
        )
        .map_err(|e| encode_error(&e))?;
        views.push((name, view));
    }
    safetensors::serialize(views, Some(metadata)).map_err(|e| encode_error(&e))
}

/// Decodes and verifies a blob written by [`encode_snapshot`] under `key`; the entries come
/// back in the order they were encoded, widened to f32.
pub fn decode_snapshot(
    bytes: &[u8],
    key: &str,
    expect: &SnapshotHeader,
) -> Result<Vec<SnapshotEntry>> {
    let corrupt = |reason: String| Error::Corrupt {
        key: key.to_string(),
        reason,
    };
    let tensors = SafeTensors::deserialize(bytes)
        .map_err(|e| corrupt(format!("not a sound safetensors blob: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| corrupt(format!("not a sound safetensors blob: {e}")))?;
    let empty = HashMap::new();
    let metadata = header.metadata().as_ref().unwrap_or(&empty);
    let field = |name: &str| {
        metadata
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| corrupt(format!("metadata has no {name:?}")))
    };
    if field("format")? != FORMAT {
        return Err(corrupt(format!("not a {FORMAT} blob")));
    }
    let version = field("format_version")?;
    if version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "format version {version:?}, this build reads {FORMAT_VERSION:?}"
        )));
    }
    let expected = [
        ("job", expect.job.clone()),
        ("depth", expect.depth.to_string()),
        ("fingerprint", expect.fingerprint.clone()),
        ("dtype", expect.dtype.to_string()),
    ];
    for (name, expected) in expected {
        let found = field(name)?;
        if found != expected {
            return Err(Error::Mismatch {
                key: key.to_string(),
                field: name,
                expected,
                found: found.to_string(),
            });
        }
    }
    let meta: Vec<EntryMeta> = serde_json::from_str(field("entries")?)
        .map_err(|e| corrupt(format!("metadata entries do not parse: {e}")))?;
    if meta.len() != tensors.len() {
        return Err(corrupt(format!(
            "{} tensors for {} entries",
            tensors.len(),
            meta.len()
        )));
    }
    let dtype = expect.dtype;
    let mut hasher = Xxh3Default::new();
    let mut entries = Vec::with_capacity(meta.len());
    for m in meta {
        let name = tensor_name(m.split, m.id);
        let view = tensors
            .tensor(&name)
            .map_err(|e| corrupt(format!("{name}: {e}")))?;
        if view.dtype() != dtype.safetensors() || view.shape() != m.shape.as_slice() {
            return Err(corrupt(format!(
                "{name} is {:?} {:?}, metadata says {dtype} {:?}",
                view.dtype(),
                view.shape(),
                m.shape
            )));
        }
        hasher.update(view.data());
        entries.push(SnapshotEntry {
            split: m.split,
            id: m.id,
            shape: m.shape,
            data: dtype.decode(view.data()),
        });
    }
    let (stored, actual) = (field("checksum")?, xxh3_label(hasher.digest()));
    if stored != actual {
        return Err(corrupt(format!(
            "checksum {actual} does not match stored {stored}"
        )));
    }
    Ok(entries)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn header(dtype: StorageDtype) -> SnapshotHeader {
        SnapshotHeader {
            job: "job-7".into(),
            depth: 3,
            fingerprint: "blocks:abc123".into(),
            dtype,
        }
    }

    fn entries() -> Vec<SnapshotEntry> {
        let make = |split, id: u64, shape: Vec<usize>| {
            let n: usize = shape.iter().product();
            let data = (0..n)
                .map(|i| ((i as f32 + id as f32 * 7.0) * 0.377).sin() * 3.0 + 1e-3)
                .collect();
            SnapshotEntry {
                split,
                id,
                shape,
                data,
            }
        };
        vec![
            make(Split::Train, 10, vec![2, 3, 8]),
            make(Split::Train, 2, vec![2, 3, 8]),
            make(Split::Eval, 0, vec![1, 5, 8]),
        ]
    }

    #[test]
    fn round_trip_in_each_dtype() {
        let entries = entries();
        for (dtype, tolerance) in [
            (StorageDtype::F32, 0.0),
            (StorageDtype::Bf16, 1.0 / 256.0),
            (StorageDtype::F16, 1.0 / 2048.0),
        ] {
            let blob = encode_snapshot(&header(dtype), &entries).unwrap();
            let back = decode_snapshot(&blob, "k", &header(dtype)).unwrap();
            assert_eq!(back.len(), entries.len());
            for (a, b) in entries.iter().zip(&back) {
                assert_eq!((a.split, a.id, &a.shape), (b.split, b.id, &b.shape));
                for (x, y) in a.data.iter().zip(&b.data) {
                    // Round-to-nearest: half an ulp of the mantissa (plus f16's subnormal step).
                    let bound = x.abs() * tolerance + 1e-7;
                    assert!((x - y).abs() <= bound, "{dtype}: {x} vs {y}");
                }
            }
        }
        let f32_entries = decode_snapshot(
            &encode_snapshot(&header(StorageDtype::F32), &entries).unwrap(),
            "k",
            &header(StorageDtype::F32),
        )
        .unwrap();
        assert_eq!(f32_entries, entries);
    }

    #[test]
    fn half_precision_rounds_to_nearest_even() {
        // 1 + 2^-8 lies halfway between two bf16 values: ties go to the even mantissa (1.0).
        let halfway = 1.0 + 2f32.powi(-8);
        let above = 1.0 + 2f32.powi(-8) + 2f32.powi(-12);
        let entry = |v| SnapshotEntry {
            split: Split::Train,
            id: 0,
            shape: vec![1],
            data: vec![v],
        };
        let h = header(StorageDtype::Bf16);
        let decode = |v| {
            decode_snapshot(&encode_snapshot(&h, &[entry(v)]).unwrap(), "k", &h).unwrap()[0].data[0]
        };
        assert_eq!(decode(halfway), 1.0);
        assert_eq!(decode(above), 1.0 + 2f32.powi(-7));
    }

    #[test]
    fn bf16_blob_is_about_half_of_f32() {
        let big: Vec<SnapshotEntry> = (0..4)
            .map(|id| SnapshotEntry {
                split: Split::Train,
                id,
                shape: vec![4, 64, 64],
                data: vec![0.5; 4 * 64 * 64],
            })
            .collect();
        let f32_len = encode_snapshot(&header(StorageDtype::F32), &big)
            .unwrap()
            .len();
        let bf16_len = encode_snapshot(&header(StorageDtype::Bf16), &big)
            .unwrap()
            .len();
        let ratio = bf16_len as f64 / f32_len as f64;
        assert!((0.5..0.52).contains(&ratio), "{bf16_len} / {f32_len}");
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let h = header(StorageDtype::Bf16);
        let blob = encode_snapshot(&h, &entries()).unwrap();
        let header_end = 8 + u64::from_le_bytes(blob[..8].try_into().unwrap()) as usize;
        for i in 0..blob.len() {
            let mut bad = blob.clone();
            bad[i] ^= 0x01;
            let result = decode_snapshot(&bad, "k", &h);
            if i >= header_end {
                // Tensor data: only the checksum can tell.
                assert!(
                    matches!(&result, Err(Error::Corrupt { reason, .. }) if reason.contains("checksum")),
                    "flip at {i}: {result:?}"
                );
            } else {
                assert!(
                    matches!(result, Err(Error::Corrupt { .. } | Error::Mismatch { .. })),
                    "flip at {i} (header) accepted"
                );
            }
        }
    }

    #[test]
    fn truncated_blob_is_corrupt() {
        let h = header(StorageDtype::F32);
        let blob = encode_snapshot(&h, &entries()).unwrap();
        for len in [0, 7, 8, 100, blob.len() / 2, blob.len() - 1] {
            assert!(
                matches!(
                    decode_snapshot(&blob[..len], "k", &h),
                    Err(Error::Corrupt { .. })
                ),
                "truncated to {len}"
            );
        }
    }

    #[test]
    fn another_job_depth_fingerprint_or_dtype_is_a_mismatch() {
        let h = header(StorageDtype::F32);
        let blob = encode_snapshot(&h, &entries()).unwrap();
        let cases = [
            (
                "job",
                SnapshotHeader {
                    job: "other".into(),
                    ..h.clone()
                },
            ),
            (
                "depth",
                SnapshotHeader {
                    depth: 4,
                    ..h.clone()
                },
            ),
            (
                "fingerprint",
                SnapshotHeader {
                    fingerprint: "blocks:zzz".into(),
                    ..h.clone()
                },
            ),
            (
                "dtype",
                SnapshotHeader {
                    dtype: StorageDtype::Bf16,
                    ..h.clone()
                },
            ),
        ];
        for (field, expect) in cases {
            match decode_snapshot(&blob, "jobs/j/snap", &expect) {
                Err(Error::Mismatch { field: f, key, .. }) => {
                    assert_eq!((f, key.as_str()), (field, "jobs/j/snap"));
                }
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_entries_are_refused() {
        let h = header(StorageDtype::F32);
        let mut bad = entries();
        bad[0].data.pop();
        assert!(matches!(
            encode_snapshot(&h, &bad),
            Err(Error::Encode { .. })
        ));
        let mut dup = entries();
        dup[1].id = 10;
        assert!(matches!(
            encode_snapshot(&h, &dup),
            Err(Error::Encode { .. })
        ));
        let empty = encode_snapshot(&h, &[]).unwrap();
        assert_eq!(decode_snapshot(&empty, "k", &h).unwrap(), vec![]);
    }

    #[test]
    fn keys_and_dtype_names() {
        assert_eq!(
            snapshot_key("jobs/j1", 3, Split::Train, 0, 7),
            "jobs/j1/snapshots/depth-003/train-000000-000007.safetensors"
        );
        assert_eq!(depth_prefix("jobs/j1/", 12), "jobs/j1/snapshots/depth-012/");
        for d in [StorageDtype::F32, StorageDtype::Bf16, StorageDtype::F16] {
            assert_eq!(d.to_string().parse::<StorageDtype>(), Ok(d));
            assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{d}\""));
        }
        assert!("fp8".parse::<StorageDtype>().is_err());
        assert_eq!(serde_json::to_string(&Split::Eval).unwrap(), "\"eval\"");
    }
}
