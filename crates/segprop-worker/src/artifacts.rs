//! The worker's side of the artifact store: stage states, checkpoints, metrics files and the
//! exported model go through a [`Store`] (a local directory, S3, or the coordinator's
//! SnapshotService in its artifacts namespace), never through a shared path.
//!
//! Producers write locally under the task's work directory, then store the result as an
//! artifact (files first, manifest last). Consumers fetch into the work directory, where every
//! file is checked against the manifest and the whole against the checksum the coordinator
//! recorded, before the engine loads it.

use std::path::Path;

use segprop_core::sched::Artifact;
use segprop_store::Store;
use segprop_train::checkpoint::{self, Digest};

/// Why an artifact could not be fetched.
#[derive(Debug)]
pub enum FetchError {
    /// The artifact is damaged or is not the version the coordinator recorded: a later fetch
    /// will not fix it.
    Corrupt(String),
    /// The store could not be reached or failed: a retry may succeed.
    Unavailable(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Corrupt(m) | Self::Unavailable(m) => f.write_str(m),
        }
    }
}

/// The artifact store and the runtime that drives it from the training thread.
#[derive(Clone)]
pub struct Artifacts {
    pub store: Store,
    pub runtime: tokio::runtime::Handle,
}

/// A reference to an artifact stored under `key` with `digest`.
pub fn reference(key: &str, digest: &Digest) -> Artifact {
    Artifact {
        uri: key.to_string(),
        checksum: digest.checksum.clone(),
        bytes: digest.bytes,
    }
}

use segprop_store::layout::checkpoint_step;

impl Artifacts {
    /// Stores the local file or directory `local` (whose checksum is `digest`) as `key`.
    pub fn put(&self, key: &str, local: &Path, digest: &Digest) -> Result<Artifact, String> {
        self.runtime
            .block_on(self.store.put_artifact(key, local, &digest.checksum))
            .map_err(|e| format!("cannot store artifact {key}: {e}"))?;
        Ok(reference(key, digest))
    }

    /// Fetches the artifact `key` into `local` and checks it against `expected` (the checksum
    /// the coordinator recorded; `None`: the manifest's own).
    pub fn fetch(&self, key: &str, expected: Option<&str>, local: &Path) -> Result<(), FetchError> {
        let manifest = self
            .runtime
            .block_on(self.store.get_artifact(key, local))
            .map_err(|e| match e {
                segprop_store::Error::Corrupt { .. } | segprop_store::Error::NotFound { .. } => {
                    FetchError::Corrupt(format!("artifact {key}: {e}"))
                }
                other => FetchError::Unavailable(format!("artifact {key}: {other}")),
            })?;
        let expected = expected.unwrap_or(&manifest.checksum);
        if expected.is_empty() {
            return Ok(());
        }
        let digest = checkpoint::checksum_dir(local)
            .map_err(|e| FetchError::Unavailable(format!("artifact {key}: {e}")))?;
        if digest.checksum != expected {
            return Err(FetchError::Corrupt(format!(
                "artifact {key}: its files hash to {}, the coordinator recorded {expected} \
                 (overwritten or a different version)",
                digest.checksum
            )));
        }
        Ok(())
    }

    /// The checkpoints stored under `prefix` (an attempt's key), newest first.
    pub fn checkpoints(&self, prefix: &str) -> Result<Vec<(u64, String)>, String> {
        let keys = self
            .runtime
            .block_on(self.store.list_artifacts(prefix))
            .map_err(|e| format!("cannot list checkpoints under {prefix}: {e}"))?;
        let mut found: Vec<_> = keys
            .into_iter()
            .filter_map(|k| checkpoint_step(&k).map(|s| (s, k)))
            .collect();
        found.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
        Ok(found)
    }
}

/// Deletes the checkpoints (and their events files) under `prefix` older than `keep_from`.
pub async fn prune_checkpoints(store: &Store, prefix: &str, keep_from: u64) {
    let keys = match store.list_artifacts(prefix).await {
        Ok(keys) => keys,
        Err(e) => {
            tracing::warn!(prefix, error = %e, "cannot list checkpoints to prune");
            return;
        }
    };
    for key in keys {
        let base = key
            .strip_suffix(segprop_store::layout::EVENTS_SUFFIX)
            .unwrap_or(&key);
        if checkpoint_step(base).is_some_and(|s| s < keep_from)
            && let Err(e) = store.delete_artifact(&key).await
        {
            tracing::warn!(key, error = %e, "cannot delete an old checkpoint");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pruning_keeps_newer_checkpoints_and_their_events() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::memory();
        let file = tmp.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        for step in [10u64, 20, 30] {
            let key = format!("a/ckpt-{step:08}");
            store.put_artifact(&key, &file, "").await.unwrap();
            store
                .put_artifact(&format!("{key}.events.jsonl"), &file, "")
                .await
                .unwrap();
        }
        prune_checkpoints(&store, "a", 20).await;
        assert_eq!(
            store.list_artifacts("a").await.unwrap(),
            [
                "a/ckpt-00000020",
                "a/ckpt-00000020.events.jsonl",
                "a/ckpt-00000030",
                "a/ckpt-00000030.events.jsonl"
            ]
        );
    }

    #[test]
    fn fetch_checks_the_recorded_checksum() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let artifacts = Artifacts {
            store: Store::memory(),
            runtime: runtime.handle().clone(),
        };
        let dir = tmp.path().join("state");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a"), b"abc").unwrap();
        let digest = checkpoint::checksum_dir(&dir).unwrap();
        let r = artifacts.put("jobs/j/state", &dir, &digest).unwrap();
        assert_eq!(r.checksum, digest.checksum);
        artifacts
            .fetch(
                "jobs/j/state",
                Some(&digest.checksum),
                &tmp.path().join("in"),
            )
            .unwrap();
        let err = artifacts
            .fetch("jobs/j/state", Some("fnv1a64:0"), &tmp.path().join("in2"))
            .unwrap_err();
        assert!(matches!(err, FetchError::Corrupt(_)), "{err}");
        let err = artifacts
            .fetch("jobs/j/none", None, &tmp.path().join("in3"))
            .unwrap_err();
        assert!(matches!(err, FetchError::Corrupt(_)), "{err}");
    }
}
