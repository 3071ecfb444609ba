//! Checksummed blobs for artifacts ([`crate::Store::put_checked`]).
//!
//! Layout (24-byte header, then the payload):
//!
//! | bytes  | content                                             |
//! |--------|-----------------------------------------------------|
//! | 0..8   | magic `SPBLOB01` (the `01` fixes the checksum: xxh3-64) |
//! | 8..16  | payload length, u64 little-endian                   |
//! | 16..24 | xxh3-64 of the payload, u64 little-endian           |
//! | 24..   | payload                                             |

use bytes::{Bytes, BytesMut};
use xxhash_rust::xxh3::xxh3_64;

use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"SPBLOB01";
const HEADER_BYTES: usize = 24;

/// The checksum label written in references and error messages: `xxh3:<16 hex digits>`.
pub(crate) fn xxh3_label(hash: u64) -> String {
    format!("xxh3:{hash:016x}")
}

pub(crate) fn wrap(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&xxh3_64(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out.freeze()
}

pub(crate) fn unwrap(key: &str, blob: Bytes) -> Result<Bytes> {
    let corrupt = |reason: String| Error::Corrupt {
        key: key.to_string(),
        reason,
    };
    if blob.len() < HEADER_BYTES {
        return Err(corrupt(format!(
            "{} bytes: shorter than the {HEADER_BYTES}-byte header",
            blob.len()
        )));
    }
    if &blob[..8] != MAGIC {
        return Err(corrupt("not a checked blob (no SPBLOB01 magic)".into()));
    }
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&blob[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let (length, stored) = (word(8), word(16));
    let actual_length = (blob.len() - HEADER_BYTES) as u64;
    if length != actual_length {
        return Err(corrupt(format!(
            "header says {length} payload bytes, blob holds {actual_length} (truncated or torn)"
        )));
    }
    let payload = blob.slice(HEADER_BYTES..);
    let actual = xxh3_64(&payload);
    if actual != stored {
        return Err(corrupt(format!(
            "checksum {} does not match stored {}",
            xxh3_label(actual),
            xxh3_label(stored)
        )));
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_flipped_byte_is_caught() {
        let payload: Vec<u8> = (0..100u8).collect();
        let blob = wrap(&payload);
        assert_eq!(blob.len(), HEADER_BYTES + 100);
        assert_eq!(
            unwrap("k", blob.clone()).ok().as_deref(),
            Some(&payload[..])
        );
        for i in 0..blob.len() {
            let mut bad = blob.to_vec();
            bad[i] ^= 0x10;
            assert!(
                matches!(unwrap("k", bad.into()), Err(Error::Corrupt { .. })),
                "flip at {i} not caught"
            );
        }
        for len in [0, 10, HEADER_BYTES, blob.len() - 1] {
            assert!(matches!(
                unwrap("k", blob.slice(..len)),
                Err(Error::Corrupt { .. })
            ));
        }
        assert_eq!(unwrap("k", wrap(b"")).ok().map(|b| b.len()), Some(0));
    }
}
