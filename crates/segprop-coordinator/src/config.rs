//! Coordinator configuration: built-in defaults, then a YAML file, then `SEGPROP_…` environment
//! variables (`SEGPROP_TOKEN`, `SEGPROP_LISTEN`, `SEGPROP_TLS__CERT`, …), later sources winning.
//! Unknown keys in the file are errors, and a named file that does not exist is an error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Yaml};
use segprop_core::sched::SchedConfig;
use segprop_store::StoreConfig;
use serde::{Deserialize, Serialize};

/// The coordinator's settings. Every field has a default; `token` must come from the file or
/// `SEGPROP_TOKEN` (the coordinator refuses to serve without one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordConfig {
    /// Address the gRPC server binds (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// Directory of the coordinator's state database (`coordinator.redb`).
    pub state_dir: PathBuf,
    /// Directory of the artifact store when `artifact_store` is absent (announced to workers,
    /// which use it unless started with `--artifact-store`), and parent of the default snapshot
    /// store.
    pub artifact_root: PathBuf,
    /// Bearer token every RPC must carry.
    pub token: Option<String>,
    /// Serve TLS with this certificate and key (PEM); plaintext when absent.
    pub tls: Option<TlsConfig>,
    /// Address of the HTTP server for Prometheus `/metrics` and `/healthz` (plaintext, no
    /// token: it serves nothing but counts); absent: not served.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// How often busy workers heartbeat.
    pub heartbeat_interval_ms: u64,
    /// A task lease lasts this long without a heartbeat renewing it.
    pub lease_ms: u64,
    /// Attempts per task before the job fails.
    pub max_attempts: u32,
    /// Retry backoff: base doubling per failure, capped.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// The SnapCheck snapshot store: the coordinator serves it to workers over gRPC
    /// (SnapshotService) and deletes snapshots no stage needs any more. Absent: the directory
    /// `snapshot-store/` under `artifact_root` (where workers look by default). Workers that
    /// reach an object store directly must be given the same url.
    pub snapshot_store: Option<StoreConfig>,
    /// Byte budget of the snapshot store across all jobs (absent: unlimited). A SnapCheck job
    /// reserves two snapshot depths (estimated after stage 1, then measured) when its first
    /// `advance_snapshots` shard starts; jobs that do not fit next to the running ones wait, a
    /// job that does not fit alone fails with both numbers.
    pub snapshot_budget_bytes: Option<u64>,
    /// The artifact store (stage states, checkpoints, metrics, exported models): the coordinator
    /// serves it to workers over gRPC (SnapshotService, artifacts namespace). Absent: the
    /// directory `artifact_root`. Workers that reach an object store directly must be given the
    /// same url (`--artifact-store`).
    pub artifact_store: Option<StoreConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Default for CoordConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            state_dir: PathBuf::from("segprop-state"),
            artifact_root: PathBuf::from("segprop-artifacts"),
            token: None,
            tls: None,
            metrics_listen: None,
            heartbeat_interval_ms: 1000,
            lease_ms: 10_000,
            max_attempts: 3,
            backoff_base_ms: 1000,
            backoff_max_ms: 30_000,
            snapshot_store: None,
            snapshot_budget_bytes: None,
            artifact_store: None,
        }
    }
}

/// Environment keys the coordinator reads (after the `SEGPROP_` prefix, lower-cased); other
/// `SEGPROP_…` variables belong to other tools (`SEGPROP_LOG`, `SEGPROP_COORDINATOR`).
const ENV_KEYS: &[&str] = &[
    "listen",
    "state_dir",
    "artifact_root",
    "token",
    "tls.cert",
    "tls.key",
    "metrics_listen",
    "heartbeat_interval_ms",
    "lease_ms",
    "max_attempts",
    "backoff_base_ms",
    "backoff_max_ms",
    "snapshot_store.url",
    "snapshot_store.s3_endpoint",
    "snapshot_store.s3_region",
    "snapshot_store.allow_http",
    "snapshot_store.multipart_threshold_bytes",
    "snapshot_budget_bytes",
    "artifact_store.url",
    "artifact_store.s3_endpoint",
    "artifact_store.s3_region",
    "artifact_store.allow_http",
    "artifact_store.multipart_threshold_bytes",
];

/// A configuration error: names the file or the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl CoordConfig {
    /// Defaults, then `file` (which must exist when named), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(CoordConfig::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Yaml::file_exact(path));
        }
        figment = figment.merge(
            Env::prefixed("SEGPROP_")
                .split("__")
                .filter(|key| ENV_KEYS.contains(&key.as_str().to_ascii_lowercase().as_str())),
        );
        let config: CoordConfig = figment.extract().map_err(|e| {
            let mut message = e.to_string();
            if let Some(path) = file {
                message = format!("{}: {message}", path.display());
            }
            ConfigError(message)
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
            ("lease_ms", self.lease_ms),
            ("max_attempts", u64::from(self.max_attempts)),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError(format!("{key}: must be greater than 0")));
            }
        }
        if self.lease_ms < 2 * self.heartbeat_interval_ms {
            return Err(ConfigError(format!(
                "lease_ms: {} must be at least twice heartbeat_interval_ms ({}), or every \
                 late heartbeat loses the lease",
                self.lease_ms, self.heartbeat_interval_ms
            )));
        }
        if self.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(ConfigError("token: must not be empty".into()));
        }
        if let Some(store) = &self.snapshot_store {
            store
                .validate()
                .map_err(|e| ConfigError(format!("snapshot_store: {e}")))?;
        }
        if let Some(store) = &self.artifact_store {
            store
                .validate()
                .map_err(|e| ConfigError(format!("artifact_store: {e}")))?;
        }
        Ok(())
    }

    /// Opens the snapshot store (see [`Self::snapshot_store`]).
    pub fn open_snapshot_store(&self) -> Result<segprop_store::Store, ConfigError> {
        match &self.snapshot_store {
            Some(config) => segprop_store::Store::open(config),
            None => segprop_store::Store::local(self.artifact_root.join("snapshot-store")),
        }
        .map_err(|e| ConfigError(format!("snapshot_store: {e}")))
    }

    /// Opens the artifact store (see [`Self::artifact_store`]).
    pub fn open_artifact_store(&self) -> Result<segprop_store::Store, ConfigError> {
        match &self.artifact_store {
            Some(config) => segprop_store::Store::open(config),
            None => segprop_store::Store::local(&self.artifact_root),
        }
        .map_err(|e| ConfigError(format!("artifact_store: {e}")))
    }

    pub fn sched(&self) -> SchedConfig {
        SchedConfig {
            lease_ms: self.lease_ms,
            max_attempts: self.max_attempts,
            backoff_base_ms: self.backoff_base_ms,
            backoff_max_ms: self.backoff_max_ms,
            snapshot_budget_bytes: self.snapshot_budget_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coord.yaml");
        std::fs::write(&path, "token: abc\nlease_ms: 4000\n").unwrap();
        let config = CoordConfig::load(Some(&path)).unwrap();
        assert_eq!(config.token.as_deref(), Some("abc"));
        assert_eq!(config.lease_ms, 4000);
        assert_eq!(config.max_attempts, 3);

        std::fs::write(&path, "token: abc\nleese_ms: 4000\n").unwrap();
        let err = CoordConfig::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("leese_ms"), "{err}");
        assert!(err.contains("coord.yaml"), "{err}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = CoordConfig::load(Some(Path::new("/nonexistent/coord.yaml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/coord.yaml"), "{err}");
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn short_lease_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coord.yaml");
        std::fs::write(&path, "heartbeat_interval_ms: 1000\nlease_ms: 1500\n").unwrap();
        let err = CoordConfig::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("lease_ms"), "{err}");
    }
}
