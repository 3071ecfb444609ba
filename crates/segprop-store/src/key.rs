//! Store keys: `/`-separated relative paths such as
//! `jobs/<job>/snapshots/depth-003/train-000000-000007.safetensors`.

use object_store::path::Path;

use crate::{Error, Result};

/// Checks `key` and turns it into an object store path.
///
/// Refused: an empty key, a leading `/`, empty segments (`a//b`, a trailing `/`), `.` and `..`
/// segments, backslashes and control characters, and a last segment ending in `#<digits>` (the
/// local filesystem store's name for an upload in progress).
pub(crate) fn parse_key(key: &str) -> Result<Path> {
    let bad = |reason| Error::BadKey {
        key: key.to_string(),
        reason,
    };
    if key.is_empty() {
        return Err(bad("empty key"));
    }
    if key.starts_with('/') {
        return Err(bad("keys are relative: no leading '/'"));
    }
    if key.chars().any(|c| c == '\\' || c.is_control()) {
        return Err(bad("backslashes and control characters are not allowed"));
    }
    for segment in key.split('/') {
        match segment {
            "" => return Err(bad("empty path segment")),
            "." | ".." => return Err(bad("'.' and '..' segments are not allowed")),
            _ => {}
        }
    }
    if let Some((_, suffix)) = key
        .rsplit('/')
        .next()
        .and_then(|last| last.rsplit_once('#'))
        && !suffix.is_empty()
        && suffix.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad("a name ending in '#<digits>' is reserved for uploads"));
    }
    Path::parse(key).map_err(|_| bad("not a valid object path"))
}

/// Checks a prefix: `""` (everything) or a key, with one trailing `/` allowed. Returns the
/// prefix without its trailing `/`, as a path (`None` for everything).
pub(crate) fn parse_prefix(prefix: &str) -> Result<Option<Path>> {
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    if prefix.is_empty() {
        return Ok(None);
    }
    parse_key(trimmed).map(Some).map_err(|e| match e {
        Error::BadKey { reason, .. } => Error::BadKey {
            key: prefix.to_string(),
            reason,
        },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_relative_paths() {
        for key in [
            "a",
            "jobs/j1/snapshots/depth-003/train-000000-000007.safetensors",
            "a.b/c-d_e/f#g",
        ] {
            assert_eq!(parse_key(key).map(|p| p.to_string()).ok(), Some(key.into()));
        }
    }

    #[test]
    fn refuses_unsafe_keys() {
        for key in [
            "", "/abs", "a//b", "a/", "../x", "a/../b", "a/./b", ".", "a\\b", "a\nb", "a/b#12",
        ] {
            assert!(
                matches!(parse_key(key), Err(Error::BadKey { .. })),
                "{key:?} accepted"
            );
        }
    }

    #[test]
    fn prefixes() {
        assert!(matches!(parse_prefix(""), Ok(None)));
        let p = parse_prefix("jobs/j1/")
            .ok()
            .flatten()
            .map(|p| p.to_string());
        assert_eq!(p.as_deref(), Some("jobs/j1"));
        assert!(matches!(parse_prefix("/"), Err(Error::BadKey { .. })));
        assert!(matches!(parse_prefix("a//"), Err(Error::BadKey { .. })));
    }
}
