//! Checksums of stored blobs: 64-bit FNV-1a, written as `fnv1a64:<16 hex digits>`.
//!
//! Not cryptographic: it detects torn writes, bit rot and mixed-up files, which is what the
//! artifact store needs (every blob is checked on read).

/// Size and checksum of a saved checkpoint (or any artifact directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub bytes: u64,
    pub checksum: String,
}

/// Streaming FNV-1a (64 bit).
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a64(u64);

impl Default for Fnv1a64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a64 {
    pub fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    #[cfg(test)]
    pub fn finish(&self) -> u64 {
        self.0
    }

    /// The checksum as stored in artifact references: `fnv1a64:0123456789abcdef`.
    pub fn label(&self) -> String {
        format!("fnv1a64:{:016x}", self.0)
    }
}

/// FNV-1a of `bytes`.
#[cfg(test)]
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = Fnv1a64::default();
    h.update(bytes);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // Reference values of the FNV-1a 64-bit specification.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        let mut h = Fnv1a64::default();
        h.update(b"foo");
        h.update(b"bar");
        assert_eq!(h.label(), "fnv1a64:85944171f73967e8");
    }
}
