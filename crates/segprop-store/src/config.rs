//! Where the store lives: [`StoreConfig`] and the parsing of its `url`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Parts of 8 MiB for multipart uploads (S3 wants at least 5 MiB for every part but the last).
pub const MULTIPART_PART_BYTES: usize = 8 * 1024 * 1024;

/// Process settings of an object store backend (the gRPC backend is built from a channel with
/// [`crate::Store::grpc`] instead).
///
/// S3 credentials come from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// optional `AWS_SESSION_TOKEN`), as do `AWS_ENDPOINT_URL`, `AWS_REGION` and `AWS_ALLOW_HTTP`
/// when the fields below leave them unset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `file:///abs/dir` or a plain path (local filesystem, created if missing),
    /// `s3://bucket[/prefix]` (S3), or `memory://` (in-process, for tests).
    pub url: String,
    /// Custom S3 endpoint, e.g. `http://127.0.0.1:9000` for a local S3-compatible server.
    pub s3_endpoint: Option<String>,
    /// S3 region; `us-east-1` when neither this nor `AWS_REGION` is set.
    pub s3_region: Option<String>,
    /// Allow a plain-`http://` S3 endpoint.
    pub allow_http: bool,
    /// Blobs larger than this are uploaded in parts of 8 MiB ([`MULTIPART_PART_BYTES`]).
    pub multipart_threshold_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: "memory://".to_string(),
            s3_endpoint: None,
            s3_region: None,
            allow_http: false,
            multipart_threshold_bytes: 16 * 1024 * 1024,
        }
    }
}

/// The backend a [`StoreConfig::url`] names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Memory,
    Local(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl StoreConfig {
    /// Checks every field; [`crate::Store::open`] calls it.
    pub fn validate(&self) -> Result<StoreLocation> {
        let location = self.location()?;
        if let Some(endpoint) = &self.s3_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(Error::Config {
                field: "s3_endpoint",
                message: format!("{endpoint:?} is not an http:// or https:// url"),
            });
        }
        if self.multipart_threshold_bytes == 0 {
            return Err(Error::Config {
                field: "multipart_threshold_bytes",
                message: "must be positive".into(),
            });
        }
        Ok(location)
    }

    /// Parses [`Self::url`].
    pub fn location(&self) -> Result<StoreLocation> {
        let url = self.url.trim();
        let bad = |message: String| Error::Config {
            field: "url",
            message,
        };
        if url.is_empty() {
            return Err(bad(
                "empty: use file:///dir, a path, s3://bucket[/prefix] or memory://".into(),
            ));
        }
        if url == "memory://" || url == "memory:" {
            return Ok(StoreLocation::Memory);
        }
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad(format!(
                    "{url:?}: a file url needs an absolute path (file:///dir)"
                )));
            }
            return Ok(StoreLocation::Local(PathBuf::from(path)));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad(format!("{url:?} names no bucket (s3://bucket/prefix)")));
            }
            let prefix = prefix.trim_matches('/').to_string();
            if !prefix.is_empty() {
                crate::key::parse_key(&prefix).map_err(|e| bad(format!("{url:?}: prefix: {e}")))?;
            }
            return Ok(StoreLocation::S3 {
                bucket: bucket.to_string(),
                prefix,
            });
        }
        if let Some((scheme, _)) = url.split_once("://") {
            return Err(bad(format!(
                "unsupported scheme {scheme:?} (file, s3 or memory; a grpc store is built from a channel)"
            )));
        }
        Ok(StoreLocation::Local(PathBuf::from(url)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(url: &str) -> Result<StoreLocation> {
        StoreConfig {
            url: url.into(),
            ..StoreConfig::default()
        }
        .validate()
    }

    #[test]
    fn urls() {
        assert_eq!(location("memory://").ok(), Some(StoreLocation::Memory));
        assert_eq!(
            location("file:///var/segprop").ok(),
            Some(StoreLocation::Local("/var/segprop".into()))
        );
        assert_eq!(
            location("runs/store").ok(),
            Some(StoreLocation::Local("runs/store".into()))
        );
        assert_eq!(
            location("s3://bkt/a/b/").ok(),
            Some(StoreLocation::S3 {
                bucket: "bkt".into(),
                prefix: "a/b".into()
            })
        );
        assert_eq!(
            location("s3://bkt").ok(),
            Some(StoreLocation::S3 {
                bucket: "bkt".into(),
                prefix: String::new()
            })
        );
    }

    #[test]
    fn bad_urls_name_the_field() {
        for url in [
            "",
            "s3://",
            "s3:///prefix",
            "file://relative",
            "grpc://h:1",
            "s3://b/../x",
        ] {
            match location(url) {
                Err(Error::Config { field: "url", .. }) => {}
                other => panic!("{url:?}: {other:?}"),
            }
        }
        let config = StoreConfig {
            s3_endpoint: Some("127.0.0.1:9000".into()),
            ..StoreConfig::default()
        };
        assert!(matches!(
            config.validate(),
            Err(Error::Config {
                field: "s3_endpoint",
                ..
            })
        ));
    }

    #[test]
    fn rejects_unknown_fields() {
        let parsed: Result<StoreConfig, _> =
            serde_json::from_str(r#"{"url": "memory://", "bukket": "x"}"#);
        assert!(parsed.is_err());
        let parsed: Result<StoreConfig, _> = serde_json::from_str(r#"{"url": "s3://b"}"#);
        assert_eq!(
            parsed.ok().map(|c| c.multipart_threshold_bytes),
            Some(16 << 20)
        );
    }
}
