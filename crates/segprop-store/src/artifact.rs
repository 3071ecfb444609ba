//! Artifacts (DESIGN §3): stage states, mid-stage checkpoints, metrics files and the exported
//! model, kept in the artifact store next to (not inside) the snapshot store.
//!
//! An artifact is a local file or directory stored under a key:
//! - a file goes to `<key>` itself, a directory's files to `<key>/<relative path>`;
//! - a manifest goes to `<key>.manifest` **last**, as a checked blob. It lists every file with its
//!   size and xxh3 and carries the producer's checksum of the whole artifact (the one the
//!   coordinator records in its references).
//!
//! An artifact without a manifest does not exist yet: a writer that dies half-way leaves files
//! no reader will look at. Every fetched file is verified against the manifest, so a flipped
//! byte, a truncated file or a file that vanished is reported as [`Error::Corrupt`] naming the
//! file. On a local store the files keep their plain layout (`model/model.safetensors` is a
//! usable safetensors file), so users and tools read them directly.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use crate::checked::xxh3_label;
use crate::{Error, Result, Store};

/// Suffix of an artifact's manifest key.
pub const MANIFEST_SUFFIX: &str = ".manifest";
/// The manifest format this build writes and reads.
const MANIFEST_FORMAT: u32 = 1;
/// Bytes read from a local file per upload write.
const UPLOAD_CHUNK_BYTES: usize = 8 << 20;

/// What an artifact holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    File,
    Dir,
}

/// One file of an artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactFile {
    /// Path relative to the artifact (`""` for a file artifact), `/`-separated.
    pub path: String,
    pub bytes: u64,
    /// `xxh3:<16 hex digits>` of the file's bytes.
    pub xxh3: String,
}

/// The manifest of a stored artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactManifest {
    pub format: u32,
    pub kind: ArtifactKind,
    /// Sorted by path.
    pub files: Vec<ArtifactFile>,
    /// Total bytes of the files.
    pub bytes: u64,
    /// The producer's checksum of the whole artifact (empty when it gave none).
    pub checksum: String,
}

/// Why a manifest's file paths cannot be fetched as they are, if they cannot: a file artifact
/// has one file at `""`; a directory's files are relative `/`-separated paths of plain names, so
/// a fetch never writes outside its destination whatever a manifest says.
fn unsafe_path(manifest: &ArtifactManifest) -> Option<String> {
    for file in &manifest.files {
        let path = &file.path;
        let bad = match manifest.kind {
            ArtifactKind::File => !path.is_empty() || manifest.files.len() != 1,
            ArtifactKind::Dir => {
                path.is_empty()
                    || path.contains('\\')
                    || path.contains('\0')
                    || path
                        .split('/')
                        .any(|part| part.is_empty() || part == "." || part == "..")
            }
        };
        if bad {
            return Some(format!(
                "file path {path:?} is not a plain relative path of a {:?} artifact",
                manifest.kind
            ));
        }
    }
    None
}

/// The manifest key of the artifact under `key`.
pub fn manifest_key(key: &str) -> String {
    format!("{key}{MANIFEST_SUFFIX}")
}

fn file_key(key: &str, kind: ArtifactKind, path: &str) -> String {
    match kind {
        ArtifactKind::File => key.to_string(),
        ArtifactKind::Dir => format!("{key}/{path}"),
    }
}

fn io_error(op: &'static str, path: &Path, e: std::io::Error) -> Error {
    Error::Local {
        op,
        path: path.to_path_buf(),
        source: e,
    }
}

/// The files of a local directory, relative and `/`-separated, sorted.
fn local_files(root: &Path) -> Result<Vec<String>> {
    fn walk(root: &Path, at: &Path, out: &mut Vec<String>) -> Result<()> {
        let entries = std::fs::read_dir(at).map_err(|e| io_error("list", at, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_error("list", at, e))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(|e| io_error("stat", &path, e))?;
            if kind.is_dir() {
                walk(root, &path, out)?;
            } else if kind.is_file() {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                let parts: Vec<_> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(root, root, &mut files)?;
    files.sort();
    Ok(files)
}

impl Store {
    /// Stores the local file or directory `local` as the artifact `key`, files first and the
    /// manifest last; `checksum` is the producer's checksum of the whole (recorded in the
    /// manifest). Files stream from disk in 8 MiB pieces, so a large model is never held in
    /// memory whole on an object store backend.
    pub async fn put_artifact(
        &self,
        key: &str,
        local: &Path,
        checksum: &str,
    ) -> Result<ArtifactManifest> {
        let meta = tokio::fs::metadata(local)
            .await
            .map_err(|e| io_error("stat", local, e))?;
        let (kind, paths) = if meta.is_dir() {
            (ArtifactKind::Dir, local_files(local)?)
        } else {
            (ArtifactKind::File, vec![String::new()])
        };
        let mut files = Vec::with_capacity(paths.len());
        for path in paths {
            let source = if path.is_empty() {
                local.to_path_buf()
            } else {
                local.join(&path)
            };
            let (bytes, xxh3) = self
                .upload_file(&file_key(key, kind, &path), &source)
                .await?;
            files.push(ArtifactFile { path, bytes, xxh3 });
        }
        let manifest = ArtifactManifest {
            format: MANIFEST_FORMAT,
            kind,
            bytes: files.iter().map(|f| f.bytes).sum(),
            files,
            checksum: checksum.to_string(),
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Encode {
            reason: format!("manifest of {key}: {e}"),
        })?;
        self.put_checked(&manifest_key(key), &json).await?;
        tracing::debug!(
            key,
            files = manifest.files.len(),
            bytes = manifest.bytes,
            "artifact stored"
        );
        Ok(manifest)
    }

    async fn upload_file(&self, key: &str, source: &Path) -> Result<(u64, String)> {
        let mut file = tokio::fs::File::open(source)
            .await
            .map_err(|e| io_error("open", source, e))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| io_error("stat", source, e))?
            .len();
        let mut writer = self.put_writer(key, size).await?;
        let mut hasher = Xxh3::new();
        let mut remaining = size;
        while remaining > 0 {
            let want = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(UPLOAD_CHUNK_BYTES);
            let mut buf = vec![0u8; want];
            if let Err(e) = file.read_exact(&mut buf).await {
                writer.abort().await;
                return Err(io_error("read", source, e));
            }
            hasher.update(&buf);
            if let Err(e) = writer.write(Bytes::from(buf)).await {
                writer.abort().await;
                return Err(e);
            }
            remaining -= want as u64;
        }
        writer.finish().await?;
        Ok((size, xxh3_label(hasher.digest())))
    }

    /// The manifest of the artifact `key`: [`Error::NotFound`] if it was never completed,
    /// [`Error::Corrupt`] if the manifest itself fails its checksum or does not parse.
    pub async fn artifact_manifest(&self, key: &str) -> Result<ArtifactManifest> {
        let mkey = manifest_key(key);
        let json = self.get_checked(&mkey).await?;
        let manifest: ArtifactManifest =
            serde_json::from_slice(&json).map_err(|e| Error::Corrupt {
                key: mkey.clone(),
                reason: format!("not an artifact manifest: {e}"),
            })?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(Error::Corrupt {
                key: mkey,
                reason: format!(
                    "manifest format {} (this build reads {MANIFEST_FORMAT})",
                    manifest.format
                ),
            });
        }
        if let Some(reason) = unsafe_path(&manifest) {
            return Err(Error::Corrupt { key: mkey, reason });
        }
        Ok(manifest)
    }

    /// Fetches the artifact `key` into `local` (replaced if it exists), verifying every file's
    /// size and xxh3 against the manifest. The files land in a staging path renamed into place
    /// at the end, so `local` never holds a half-fetched artifact.
    pub async fn get_artifact(&self, key: &str, local: &Path) -> Result<ArtifactManifest> {
        let manifest = self.artifact_manifest(key).await?;
        let mut staging = local.as_os_str().to_os_string();
        staging.push(".fetching");
        let staging = PathBuf::from(staging);
        remove_path(&staging).await?;
        let result = self.fetch_files(key, &manifest, &staging).await;
        if let Err(e) = result {
            let _ = remove_path(&staging).await;
            return Err(e);
        }
        remove_path(local).await?;
        tokio::fs::rename(&staging, local)
            .await
            .map_err(|e| io_error("rename", local, e))?;
        Ok(manifest)
    }

    async fn fetch_files(
        &self,
        key: &str,
        manifest: &ArtifactManifest,
        staging: &Path,
    ) -> Result<()> {
        if let Some(parent) = staging.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| io_error("create", parent, e))?;
        }
        if manifest.kind == ArtifactKind::Dir {
            tokio::fs::create_dir_all(staging)
                .await
                .map_err(|e| io_error("create", staging, e))?;
        }
        for file in &manifest.files {
            let fkey = file_key(key, manifest.kind, &file.path);
            let corrupt = |reason: String| Error::Corrupt {
                key: fkey.clone(),
                reason,
            };
            let data = match self.get(&fkey).await {
                Ok(data) => data,
                Err(Error::NotFound { .. }) => {
                    return Err(corrupt(format!(
                        "listed in the manifest of {key}, missing from the store"
                    )));
                }
                Err(e) => return Err(e),
            };
            if data.len() as u64 != file.bytes {
                return Err(corrupt(format!(
                    "{} bytes, the manifest says {} (truncated or overwritten)",
                    data.len(),
                    file.bytes
                )));
            }
            let actual = xxh3_label(xxh3_64(&data));
            if actual != file.xxh3 {
                return Err(corrupt(format!(
                    "checksum {actual} does not match the manifest's {}",
                    file.xxh3
                )));
            }
            let target = match manifest.kind {
                ArtifactKind::File => staging.to_path_buf(),
                ArtifactKind::Dir => staging.join(&file.path),
            };
            if let Some(parent) = target.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| io_error("create", parent, e))?;
            }
            tokio::fs::write(&target, &data)
                .await
                .map_err(|e| io_error("write", &target, e))?;
        }
        Ok(())
    }

    /// Deletes the artifact `key`: the manifest first (from then on it does not exist), then its
    /// files. Returns objects and bytes deleted.
    pub async fn delete_artifact(&self, key: &str) -> Result<(usize, u64)> {
        let mkey = manifest_key(key);
        let manifest_bytes = self.stat(&mkey).await?;
        self.delete(&mkey).await?;
        let (objects, bytes) = self.delete_prefix(key).await?;
        Ok((
            objects + usize::from(manifest_bytes.is_some()),
            bytes + manifest_bytes.unwrap_or(0),
        ))
    }

    /// The keys of the completed artifacts under `prefix` (those with a manifest), sorted.
    pub async fn list_artifacts(&self, prefix: &str) -> Result<Vec<String>> {
        let mut keys: Vec<String> = self
            .list(prefix)
            .await?
            .into_iter()
            .filter_map(|(key, _)| key.strip_suffix(MANIFEST_SUFFIX).map(str::to_string))
            .collect();
        keys.sort();
        Ok(keys)
    }
}

async fn remove_path(path: &Path) -> Result<()> {
    match tokio::fs::symlink_metadata(path).await {
        Ok(meta) if meta.is_dir() => tokio::fs::remove_dir_all(path)
            .await
            .map_err(|e| io_error("remove", path, e)),
        Ok(_) => tokio::fs::remove_file(path)
            .await
            .map_err(|e| io_error("remove", path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("stat", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_dir(root: &Path) -> PathBuf {
        let dir = root.join("model");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("config.json"), b"{\"hidden\": 64}").unwrap();
        std::fs::write(dir.join("sub/weights.bin"), vec![7u8; 100_000]).unwrap();
        std::fs::write(dir.join("empty"), b"").unwrap();
        dir
    }

    #[tokio::test]
    async fn directory_round_trip_keeps_the_plain_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::local(tmp.path().join("store")).unwrap();
        let dir = sample_dir(tmp.path());
        let put = store
            .put_artifact("jobs/a/model", &dir, "fnv1a64:1")
            .await
            .unwrap();
        assert_eq!(put.kind, ArtifactKind::Dir);
        assert_eq!(put.bytes, 100_000 + 14);
        let paths: Vec<_> = put.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["config.json", "empty", "sub/weights.bin"]);
        // Plain files on a local store.
        assert_eq!(
            std::fs::read(tmp.path().join("store/jobs/a/model/sub/weights.bin")).unwrap(),
            vec![7u8; 100_000]
        );
        let out = tmp.path().join("fetched/model");
        let got = store.get_artifact("jobs/a/model", &out).await.unwrap();
        assert_eq!(got, put);
        assert_eq!(got.checksum, "fnv1a64:1");
        assert_eq!(
            std::fs::read(out.join("config.json")).unwrap(),
            b"{\"hidden\": 64}"
        );
        assert_eq!(std::fs::read(out.join("empty")).unwrap(), b"");
        assert_eq!(
            store.list_artifacts("jobs/a").await.unwrap(),
            ["jobs/a/model"]
        );
    }

    #[tokio::test]
    async fn file_artifact_round_trip_and_delete() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::memory();
        let file = tmp.path().join("metrics.jsonl");
        std::fs::write(&file, b"{\"step\":1}\n").unwrap();
        let put = store
            .put_artifact("jobs/a/metrics.jsonl", &file, "")
            .await
            .unwrap();
        assert_eq!(put.kind, ArtifactKind::File);
        let out = tmp.path().join("out.jsonl");
        store
            .get_artifact("jobs/a/metrics.jsonl", &out)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"{\"step\":1}\n");
        let (objects, _) = store.delete_artifact("jobs/a/metrics.jsonl").await.unwrap();
        assert_eq!(objects, 2);
        assert!(matches!(
            store.artifact_manifest("jobs/a/metrics.jsonl").await,
            Err(Error::NotFound { .. })
        ));
        assert!(store.list("").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn flipped_truncated_or_missing_files_are_named_and_nothing_lands() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::local(tmp.path().join("store")).unwrap();
        let dir = sample_dir(tmp.path());
        store.put_artifact("jobs/a/model", &dir, "").await.unwrap();
        let weights = tmp.path().join("store/jobs/a/model/sub/weights.bin");
        let out = tmp.path().join("fetched");

        let mut bytes = std::fs::read(&weights).unwrap();
        bytes[4242] ^= 1;
        std::fs::write(&weights, &bytes).unwrap();
        let err = store.get_artifact("jobs/a/model", &out).await.unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { key, reason } if key == "jobs/a/model/sub/weights.bin" && reason.contains("checksum")),
            "{err}"
        );
        assert!(!out.exists(), "a failed fetch leaves nothing behind");

        std::fs::write(&weights, &bytes[..10]).unwrap();
        let err = store.get_artifact("jobs/a/model", &out).await.unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");

        std::fs::remove_file(&weights).unwrap();
        let err = store.get_artifact("jobs/a/model", &out).await.unwrap_err();
        assert!(err.to_string().contains("missing from the store"), "{err}");
        assert!(!out.exists());
        assert!(!tmp.path().join("fetched.fetching").exists());
    }

    #[tokio::test]
    async fn files_without_a_manifest_are_not_an_artifact() {
        let store = Store::memory();
        store
            .put("jobs/a/state/weights.bin", Bytes::from_static(b"half"))
            .await
            .unwrap();
        assert!(matches!(
            store.artifact_manifest("jobs/a/state").await,
            Err(Error::NotFound { .. })
        ));
        assert!(store.list_artifacts("jobs/a").await.unwrap().is_empty());
        // A corrupt manifest is reported as such.
        store
            .put("jobs/b/state.manifest", Bytes::from_static(b"not checked"))
            .await
            .unwrap();
        assert!(matches!(
            store.artifact_manifest("jobs/b/state").await,
            Err(Error::Corrupt { .. })
        ));
    }

    #[tokio::test]
    async fn large_files_stream_through_multipart() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::memory().with_multipart_threshold(1 << 20);
        let file = tmp.path().join("big.bin");
        let data: Vec<u8> = (0..(20u32 << 20)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&file, &data).unwrap();
        store.put_artifact("big", &file, "").await.unwrap();
        assert_eq!(store.stats().multipart_puts, 1);
        let out = tmp.path().join("big.out");
        store.get_artifact("big", &out).await.unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);
    }
}
