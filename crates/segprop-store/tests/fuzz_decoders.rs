//! Fuzzing what the store reads back (issue 21): snapshot blobs (`decode_snapshot`) and artifact
//! manifests (`artifact_manifest`, `get_artifact`). Mutants of valid blobs and manifests, and
//! the seeds in tests/fuzz/corpus/manifest, are refused with an error or read; none may panic,
//! and no manifest makes a fetch write outside its destination. Seeded: the same cases every run
//! (`SEGPROP_FUZZ_CASES` sets the count for a longer local run).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../tests/fuzz/mutate.rs"]
mod mutate;

use std::path::Path;

use segprop_store::{
    SnapshotEntry, SnapshotHeader, Split, StorageDtype, Store, decode_snapshot, encode_snapshot,
    manifest_key,
};

fn header(dtype: StorageDtype) -> SnapshotHeader {
    SnapshotHeader {
        job: "fuzz".into(),
        depth: 3,
        fingerprint: "blocks-0-3".into(),
        dtype,
    }
}

#[test]
fn no_snapshot_blob_makes_the_decoder_panic() {
    let entries: Vec<SnapshotEntry> = (0..3)
        .map(|id| SnapshotEntry {
            split: if id == 2 { Split::Eval } else { Split::Train },
            id,
            shape: vec![2, 3, 4],
            data: (0..24).map(|i| i as f32 * 0.25 - 3.0).collect(),
        })
        .collect();
    let seeds: Vec<(String, Vec<u8>)> = [StorageDtype::F32, StorageDtype::Bf16, StorageDtype::F16]
        .into_iter()
        .map(|d| {
            (
                d.to_string(),
                encode_snapshot(&header(d), &entries).unwrap(),
            )
        })
        .collect();
    let decoded = std::cell::Cell::new(0usize);
    mutate::fuzz(&seeds, mutate::cases(20000), 31, |bytes| {
        for dtype in [StorageDtype::F32, StorageDtype::Bf16] {
            if let Ok(entries) = decode_snapshot(bytes, "fuzz/blob", &header(dtype)) {
                decoded.set(decoded.get() + 1);
                for e in entries {
                    assert_eq!(e.data.len(), e.shape.iter().product::<usize>(), "{e:?}");
                }
            }
        }
    });
    assert!(decoded.get() >= seeds.len(), "the valid blobs decode");
}

/// Every path under `root`, sorted.
fn tree(root: &Path) -> Vec<String> {
    fn walk(at: &Path, root: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(at).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() {
                walk(&p, root, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

#[test]
fn no_artifact_manifest_makes_a_fetch_panic_or_write_outside_its_destination() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::local(tmp.path().join("store")).unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("a.bin"), b"alpha").unwrap();
    std::fs::write(src.join("sub/b.bin"), b"bravo!").unwrap();
    let mut seeds = runtime.block_on(async {
        store.put_artifact("jobs/f/dir", &src, "").await.unwrap();
        store
            .put_artifact("jobs/f/file", &src.join("a.bin"), "sum")
            .await
            .unwrap();
        let mut seeds = Vec::new();
        for key in ["jobs/f/dir", "jobs/f/file"] {
            let json = store.get_checked(&manifest_key(key)).await.unwrap();
            seeds.push((key.to_string(), json.to_vec()));
        }
        seeds
    });
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    seeds.extend(mutate::corpus(&root.join("tests/fuzz/corpus/manifest")));
    let out = tmp.path().join("out");
    let fetched = std::cell::Cell::new(0usize);
    // The mutants stand in for the directory artifact's manifest: its files are in the store.
    mutate::fuzz(&seeds, mutate::cases(1500), 41, |bytes| {
        let ok = runtime.block_on(async {
            let key = manifest_key("jobs/f/dir");
            store.put_checked(&key, bytes).await.unwrap();
            store.get_artifact("jobs/f/dir", &out).await.is_ok()
        });
        fetched.set(fetched.get() + usize::from(ok));
        let stray: Vec<String> = tree(tmp.path())
            .into_iter()
            .filter(|p| !["store", "src", "out"].iter().any(|k| p.starts_with(k)))
            .collect();
        assert!(
            stray.is_empty(),
            "a fetch wrote outside its destination: {stray:?}"
        );
    });
    assert!(fetched.get() > 0, "the valid manifest fetches");
    // A manifest naming paths outside the artifact is refused before any file is fetched.
    let traversal = std::fs::read(root.join("tests/fuzz/corpus/manifest/traversal.json")).unwrap();
    let err = runtime.block_on(async {
        store
            .put_checked(&manifest_key("jobs/f/dir"), &traversal)
            .await
            .unwrap();
        store.get_artifact("jobs/f/dir", &out).await.unwrap_err()
    });
    assert!(
        err.to_string()
            .contains("\"../escaped.bin\" is not a plain relative path"),
        "{err}"
    );
}
