//! Store semantics over `memory://` and a local directory: put/get/stat/list/delete, bad keys,
//! missing keys, counters, checked blobs, snapshots, and atomicity of interrupted writes.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use segprop_store::{
    Error, SnapshotEntry, SnapshotHeader, Split, StorageDtype, Store, StoreConfig, StoreStats,
    snapshot_key,
};

fn blob(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

/// The same script on every backend.
async fn semantics(store: &Store) {
    store.put("jobs/j/a.bin", blob(5, 1)).await.unwrap();
    store.put("jobs/j/a.bin", blob(7, 2)).await.unwrap(); // overwrite
    assert_eq!(store.get("jobs/j/a.bin").await.unwrap(), blob(7, 2));
    assert_eq!(store.stat("jobs/j/a.bin").await.unwrap(), Some(7));
    assert_eq!(store.stat("jobs/j/missing").await.unwrap(), None);

    for (key, len) in [
        ("jobs/j/snapshots/depth-001/train-0-3.safetensors", 10),
        ("jobs/j/snapshots/depth-001/eval-0-1.safetensors", 20),
        ("jobs/j/snapshots/depth-002/train-0-3.safetensors", 30),
        ("jobs/j2/x", 1),
        ("jobs/jx", 2),
    ] {
        store.put(key, blob(len, 3)).await.unwrap();
    }
    // Prefixes match whole segments: jobs/j holds neither jobs/j2/x nor jobs/jx.
    let listed = store.list("jobs/j").await.unwrap();
    let keys: Vec<&str> = listed.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "jobs/j/a.bin",
            "jobs/j/snapshots/depth-001/eval-0-1.safetensors",
            "jobs/j/snapshots/depth-001/train-0-3.safetensors",
            "jobs/j/snapshots/depth-002/train-0-3.safetensors",
        ]
    );
    assert_eq!(listed[1].1, 20);
    assert_eq!(store.list("jobs/j/").await.unwrap(), listed);
    assert_eq!(store.list("").await.unwrap().len(), 6);
    // A prefix that names a blob lists that blob.
    assert_eq!(
        store.list("jobs/jx").await.unwrap(),
        vec![("jobs/jx".to_string(), 2)]
    );

    match store.get("jobs/j/missing").await {
        Err(Error::NotFound { key }) => assert_eq!(key, "jobs/j/missing"),
        other => panic!("{other:?}"),
    }

    for key in ["", "/abs", "a//b", "a/../b", "..", "a/"] {
        assert!(matches!(
            store.put(key, blob(1, 0)).await,
            Err(Error::BadKey { .. })
        ));
        assert!(matches!(store.get(key).await, Err(Error::BadKey { .. })));
        assert!(matches!(store.stat(key).await, Err(Error::BadKey { .. })));
        assert!(matches!(store.delete(key).await, Err(Error::BadKey { .. })));
    }
    assert!(matches!(store.list("a//").await, Err(Error::BadKey { .. })));
    assert!(matches!(
        store.delete_prefix("/").await,
        Err(Error::BadKey { .. })
    ));

    assert_eq!(
        store
            .delete_prefix("jobs/j/snapshots/depth-001")
            .await
            .unwrap(),
        (2, 30)
    );
    assert_eq!(store.delete_prefix("jobs/j/nothing").await.unwrap(), (0, 0));
    store.delete("jobs/jx").await.unwrap();
    store.delete("jobs/jx").await.unwrap(); // deleting a missing blob succeeds
    let left: Vec<String> = store
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        left,
        [
            "jobs/j/a.bin",
            "jobs/j/snapshots/depth-002/train-0-3.safetensors",
            "jobs/j2/x"
        ]
    );
    assert_eq!(store.delete_prefix("").await.unwrap(), (3, 38));
    assert!(store.list("").await.unwrap().is_empty());
}

fn expected_stats(deletes_of_missing: u64) -> StoreStats {
    StoreStats {
        puts: 7,
        multipart_puts: 0,
        gets: 1,
        bytes_put: 5 + 7 + 10 + 20 + 30 + 1 + 2,
        bytes_got: 7,
        not_found: 1,
        corrupt: 0,
        // 2 (depth-001) + 2 single deletes (one of a missing blob) + 3 (everything left).
        deletes: 2 + 1 + deletes_of_missing + 3,
    }
}

#[tokio::test]
async fn memory_semantics_and_counters() {
    let store = Store::open(&StoreConfig::default()).unwrap();
    assert_eq!(store.location(), "memory://");
    semantics(&store).await;
    // The object store cannot tell a delete of a missing blob from a delete.
    assert_eq!(store.clone().stats(), expected_stats(1));
}

#[tokio::test]
async fn local_semantics_and_counters() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let url = format!("file://{}", root.display());
    let store = Store::open(&StoreConfig {
        url,
        ..StoreConfig::default()
    })
    .unwrap();
    semantics(&store).await;
    // The local filesystem reports a missing blob, which is not counted.
    assert_eq!(store.stats(), expected_stats(0));
    // Emptied directories are removed with their last blob.
    assert!(files_under(&root).is_empty(), "{:?}", files_under(&root));
}

#[tokio::test]
async fn multipart_above_the_threshold() {
    let dir = tempfile::tempdir().unwrap();
    for store in [Store::memory(), Store::local(dir.path()).unwrap()] {
        let store = store.with_multipart_threshold(1 << 20);
        let big = blob(20 << 20, 9);
        store.put("big/blob", big.clone()).await.unwrap();
        store.put("small/blob", blob(1 << 20, 1)).await.unwrap();
        assert_eq!(store.get("big/blob").await.unwrap(), big);
        let stats = store.stats();
        assert_eq!(
            (stats.puts, stats.multipart_puts),
            (2, 1),
            "{}",
            store.location()
        );
        assert_eq!(stats.bytes_put, (21 << 20) as u64);
    }
}

#[tokio::test]
async fn checked_blobs_catch_corruption() {
    let store = Store::memory();
    store
        .put_checked("art/block-3.bin", b"weights")
        .await
        .unwrap();
    assert_eq!(
        store.get_checked("art/block-3.bin").await.unwrap().as_ref(),
        b"weights"
    );
    let mut raw = store.get("art/block-3.bin").await.unwrap().to_vec();
    *raw.last_mut().unwrap() ^= 1;
    store.put("art/block-3.bin", raw.into()).await.unwrap();
    assert!(matches!(
        store.get_checked("art/block-3.bin").await,
        Err(Error::Corrupt { .. })
    ));
    assert_eq!(store.stats().corrupt, 1);
}

#[tokio::test]
async fn snapshots_through_the_store() {
    let store = Store::memory();
    let header = SnapshotHeader {
        job: "j1".into(),
        depth: 2,
        fingerprint: "f".into(),
        dtype: StorageDtype::Bf16,
    };
    let entries = vec![SnapshotEntry {
        split: Split::Train,
        id: 0,
        shape: vec![2, 4],
        data: vec![0.5, -1.0, 2.0, 0.25, 8.0, -0.125, 1.5, 3.0],
    }];
    let key = snapshot_key("jobs/j1", 2, Split::Train, 0, 0);
    let len = store.put_snapshot(&key, &header, &entries).await.unwrap();
    assert_eq!(store.stat(&key).await.unwrap(), Some(len));
    // These values are exact in bf16.
    assert_eq!(store.get_snapshot(&key, &header).await.unwrap(), entries);

    let stale = SnapshotHeader {
        fingerprint: "other".into(),
        ..header.clone()
    };
    assert!(matches!(
        store.get_snapshot(&key, &stale).await,
        Err(Error::Mismatch {
            field: "fingerprint",
            ..
        })
    ));
    let mut raw = store.get(&key).await.unwrap().to_vec();
    let at = raw.len() - 3;
    raw[at] ^= 0x40;
    store.put(&key, raw.into()).await.unwrap();
    assert!(matches!(
        store.get_snapshot(&key, &header).await,
        Err(Error::Corrupt { .. })
    ));
    assert_eq!(store.stats().corrupt, 1);
}

fn files_under(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path.display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out
}

#[tokio::test]
async fn local_interrupted_write_is_never_visible() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::local(dir.path())
        .unwrap()
        .with_multipart_threshold(1 << 20);
    store.put("a/blob", blob(1000, 1)).await.unwrap();

    // A 30 MiB upload that stops after 10 MiB (one 8 MiB part is already on disk).
    let mut writer = store.put_writer("a/blob", 30 << 20).await.unwrap();
    writer.write(blob(10 << 20, 2)).await.unwrap();
    let staged: Vec<String> = files_under(dir.path())
        .into_iter()
        .filter(|f| f.contains('#'))
        .collect();
    assert_eq!(staged.len(), 1, "the upload writes to a staging file");
    // Meanwhile readers see the old blob only, and listings do not show the staging file.
    assert_eq!(store.get("a/blob").await.unwrap(), blob(1000, 1));
    assert_eq!(store.list("").await.unwrap(), vec![("a/blob".into(), 1000)]);
    writer.abort().await;
    assert_eq!(store.get("a/blob").await.unwrap(), blob(1000, 1));
    assert_eq!(files_under(dir.path()).len(), 1);

    // Finishing short of the announced size commits nothing either.
    let mut writer = store.put_writer("b/blob", 30 << 20).await.unwrap();
    writer.write(blob(20 << 20, 3)).await.unwrap();
    assert!(matches!(writer.finish().await, Err(Error::Transfer { .. })));
    assert!(matches!(
        store.get("b/blob").await,
        Err(Error::NotFound { .. })
    ));

    // Overrunning the announced size is refused.
    let mut writer = store.put_writer("c/blob", 10).await.unwrap();
    assert!(matches!(
        writer.write(blob(11, 0)).await,
        Err(Error::Transfer { .. })
    ));

    // A writer dropped mid-way (a crashed task) leaves its staging file to be removed.
    let mut writer = store.put_writer("d/blob", 30 << 20).await.unwrap();
    writer.write(blob(10 << 20, 4)).await.unwrap();
    drop(writer);
    let mut staged = usize::MAX;
    for _ in 0..200 {
        staged = files_under(dir.path())
            .iter()
            .filter(|f| f.contains('#'))
            .count();
        if staged == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(staged, 0);
    assert_eq!(store.list("").await.unwrap(), vec![("a/blob".into(), 1000)]);
    assert_eq!(store.stats().puts, 1);
}
