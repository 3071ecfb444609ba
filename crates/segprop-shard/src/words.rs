//! 16-bit words: bf16 or f16 values packed two to an f32 word, as bit patterns, so host
//! buffers and collectives over `f32` carry 2 bytes per weight.

use burn::tensor::{FloatDType, bf16, f16};

/// Packs 16-bit values (`values` rounded to `dtype`, bf16 or f16) two to an f32 word, as bit
/// patterns: a frozen unit's shard and its all-gather then carry 2 bytes per weight. Gathers
/// only copy words, so the bits survive them.
pub fn pack16(values: &[f32], dtype: FloatDType) -> Vec<f32> {
    let bits = |v: f32| -> u32 {
        match dtype {
            FloatDType::F16 => u32::from(f16::from_f32(v).to_bits()),
            _ => u32::from(bf16::from_f32(v).to_bits()),
        }
    };
    values
        .chunks(2)
        .map(|pair| {
            let high = pair.get(1).map_or(0, |v| bits(*v));
            f32::from_bits(bits(pair[0]) | (high << 16))
        })
        .collect()
}

/// The first `len` values of words packed by [`pack16`], widened to f32 (exactly).
pub fn unpack16(words: &[f32], len: usize, dtype: FloatDType) -> Vec<f32> {
    let widen = |b: u16| match dtype {
        FloatDType::F16 => f16::from_bits(b).to_f32(),
        _ => bf16::from_bits(b).to_f32(),
    };
    let mut out = Vec::with_capacity(len + 1);
    for word in words {
        if out.len() >= len {
            break;
        }
        let b = word.to_bits();
        out.push(widen(b as u16));
        out.push(widen((b >> 16) as u16));
    }
    out.truncate(len);
    out
}
