//! Vector math for the flex kernels: an `exp` whose loops compile to SIMD instructions (the C
//! library's `expf` is one call per element), sums and dot products in a fixed lane order, and
//! [`vectorized`], which compiles a loop for the widest instruction set the CPU has.
//!
//! Every function gives the same bits on every instruction set: element-wise work is the same
//! IEEE operations in any lane width (Rust never fuses a multiply and an add on its own), and
//! the sums add sixteen fixed lanes in a fixed order.

/// Runs `f` compiled for the widest SIMD instruction set this CPU has (AVX2 + FMA, or AVX-512
/// where the build enables it; SSE2 otherwise). The loops `f` inlines vectorize at that width.
#[inline(always)]
pub(super) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two: the high part is exact in a few bits, so `n · LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 · 2²³: adding it rounds an f32 of magnitude below 2²² to an integer, held in the low
/// mantissa bits.
const ROUNDER: f32 = 12_582_912.0;
/// The smallest and largest arguments computed: e^x there is about 2⁻¹²⁶ and 2¹²⁷.
const EXP_MIN: f32 = -87.336_54;
const EXP_MAX: f32 = 88.0;

/// e^x, branch-free so that loops over it vectorize: Cephes' `expf` (reduction by ln 2 to
/// `|r| ≤ ln 2 / 2`, a degree-5 polynomial, the power of two written into the exponent bits).
/// Within 2 ulp of e^x on [-87.3, 88]; below, about 1e-38 (the smallest normal) instead of a
/// denormal or 0; above, e^88. NaN stays NaN.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    let x = if x < EXP_MIN { EXP_MIN } else { x };
    let x = if x > EXP_MAX { EXP_MAX } else { x };
    let shifted = x * LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e_r = p * r * r + r + 1.0;
    // `shifted`'s low bits hold n (in [-126, 127] after the clamps) plus 2²²: rebias it and
    // move it into the exponent field.
    let n_bits = shifted.to_bits().wrapping_sub(ROUNDER.to_bits());
    let two_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    e_r * two_n
}

/// `1 / (1 + e^-a)`.
#[inline(always)]
pub(super) fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + exp(-a))
}

/// `Σ a ⊙ b` in sixteen lanes (vectorizes; the lane order is fixed).
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (a16, a_rest) = a.split_at(a.len() / 16 * 16);
    let (b16, b_rest) = b.split_at(a16.len());
    for (a, b) in a16.chunks_exact(16).zip(b16.chunks_exact(16)) {
        for i in 0..16 {
            lanes[i] += a[i] * b[i];
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(a, b)| a * b).sum();
    lanes.iter().sum::<f32>() + tail
}

/// `Σ e^(x − shift)` in sixteen lanes (vectorizes; the lane order is fixed).
#[inline(always)]
pub(super) fn sum_exp(x: &[f32], shift: f32) -> f32 {
    let mut lanes = [0f32; 16];
    let (x16, rest) = x.split_at(x.len() / 16 * 16);
    for x in x16.chunks_exact(16) {
        for i in 0..16 {
            lanes[i] += exp(x[i] - shift);
        }
    }
    let tail: f32 = rest.iter().map(|x| exp(x - shift)).sum();
    lanes.iter().sum::<f32>() + tail
}

/// `Σ x` in sixteen lanes (vectorizes; the lane order is fixed).
#[inline(always)]
pub(super) fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (x16, rest) = x.split_at(x.len() / 16 * 16);
    for x in x16.chunks_exact(16) {
        for i in 0..16 {
            lanes[i] += x[i];
        }
    }
    lanes.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// The largest element (`-inf` for an empty slice), in sixteen lanes.
#[inline(always)]
pub(super) fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let (x16, rest) = x.split_at(x.len() / 16 * 16);
    for x in x16.chunks_exact(16) {
        for i in 0..16 {
            lanes[i] = if x[i] > lanes[i] { x[i] } else { lanes[i] };
        }
    }
    let rest = rest.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    lanes.iter().copied().fold(rest, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_exact_value_over_its_range() {
        let mut worst = 0;
        let mut x = -87.0f32;
        while x < 88.0 {
            let exact = (x as f64).exp() as f32;
            worst = worst.max(ulps(exp(x), exact));
            x += 0.0137;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn exp_saturates_at_the_ends_and_keeps_nan() {
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1.2e-38);
        assert_eq!(exp(f32::NEG_INFINITY), exp(-1000.0));
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(sigmoid(200.0), 1.0);
        assert!(sigmoid(-200.0) < 1e-37);
    }

    #[test]
    fn sums_match_a_plain_loop_and_do_not_depend_on_the_instruction_set() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let plain_sum: f64 = x.iter().map(|&v| v as f64).sum();
        assert!((sum(&x) as f64 - plain_sum).abs() < 1e-3);
        let plain_exp: f64 = x.iter().map(|&v| (v as f64 - 3.0).exp()).sum();
        assert!(((sum_exp(&x, 3.0) as f64) - plain_exp).abs() / plain_exp < 1e-5);
        assert_eq!(max(&x), x.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        assert_eq!(
            max(&x[..7]),
            x[..7].iter().copied().fold(f32::NEG_INFINITY, f32::max)
        );
        let wide = vectorized(|| (sum(&x), sum_exp(&x, 3.0), dot(&x, &x)));
        assert_eq!(wide, (sum(&x), sum_exp(&x, 3.0), dot(&x, &x)));
    }
}
