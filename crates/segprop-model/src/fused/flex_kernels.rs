//! Row kernels for the fused ops on flex f32 tensors, spread over flex's rayon pool.
//!
//! Work is split into chunks of a fixed size that does not depend on the number of threads, and
//! partial sums across rows (RMSNorm's `dγ`) are added in chunk order: results are the same bits
//! on any thread count.

use burn::tensor::TensorData;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::simd::{self, dot, sigmoid, vectorized};

/// Elements per parallel chunk: big enough that a chunk outweighs its dispatch.
const CHUNK: usize = 16 * 1024;

/// A contiguous copy (or view) of `t` and its data.
fn data(t: &FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("flex kernels take contiguous f32 tensors")
}

fn tensor(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn shape(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().iter().copied().collect()
}

/// Rows per chunk for rows of `width` elements (at least one).
fn rows_per_chunk(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1)
}

/// RMSNorm forward over the last dimension: `y = x · r ⊙ γ` with `r = 1 / √(mean(x²) + ε)`.
/// Returns `y` (shape of `x`) and `r` (shape of `x` with the last dimension 1).
pub(super) fn rms_norm_forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    eps: f32,
) -> (FlexTensor, FlexTensor) {
    let dims = shape(x);
    let (x, gamma) = (data(x), data(gamma));
    let (xs, gs) = (slice(&x), slice(&gamma));
    let width = gs.len();
    let rows = xs.len() / width;
    let mut y = vec![0f32; xs.len()];
    let mut r = vec![0f32; rows];
    let per = rows_per_chunk(width);
    y.par_chunks_mut(per * width)
        .zip(r.par_chunks_mut(per))
        .zip(xs.par_chunks(per * width))
        .for_each(|((y, r), x)| {
            vectorized(|| {
                for ((y, r), x) in y.chunks_mut(width).zip(r).zip(x.chunks(width)) {
                    *r = 1.0 / (dot(x, x) / width as f32 + eps).sqrt();
                    for ((y, x), g) in y.iter_mut().zip(x).zip(gs) {
                        *y = x * *r * g;
                    }
                }
            })
        });
    let mut r_dims = dims.clone();
    *r_dims.last_mut().expect("rank >= 1") = 1;
    (tensor(y, dims), tensor(r, r_dims))
}

/// RMSNorm backward: `dx = r · (g ⊙ γ) − x · r³ · Σ(g ⊙ γ ⊙ x) / d` and `dγ = Σ_rows g ⊙ x · r`.
pub(super) fn rms_norm_backward(
    grad: &FlexTensor,
    x: &FlexTensor,
    r: &FlexTensor,
    gamma: &FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let dims = shape(x);
    let (grad, x, r, gamma) = (data(grad), data(x), data(r), data(gamma));
    let (gr, xs, rs, gs) = (slice(&grad), slice(&x), slice(&r), slice(&gamma));
    let width = gs.len();
    let mut dx = vec![0f32; xs.len()];
    let per = rows_per_chunk(width);
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(per * width)
        .zip(xs.par_chunks(per * width))
        .zip(gr.par_chunks(per * width))
        .zip(rs.par_chunks(per))
        .map(|(((dx, x), g), r)| {
            let mut dgamma = vec![0f32; width];
            let mut gw = vec![0f32; width];
            vectorized(|| {
                for (((dx, x), g), r) in dx
                    .chunks_mut(width)
                    .zip(x.chunks(width))
                    .zip(g.chunks(width))
                    .zip(r)
                {
                    for ((gw, g), w) in gw.iter_mut().zip(g).zip(gs) {
                        *gw = g * w;
                    }
                    let c = dot(&gw, x) * r * r * r / width as f32;
                    for (((dx, gw), x), (dg, g)) in
                        dx.iter_mut().zip(&gw).zip(x).zip(dgamma.iter_mut().zip(g))
                    {
                        *dx = r * gw - x * c;
                        *dg += g * x * r;
                    }
                }
            });
            dgamma
        })
        .collect();
    let mut dgamma = vec![0f32; width];
    for partial in &partials {
        for (d, p) in dgamma.iter_mut().zip(partial) {
            *d += p;
        }
    }
    (tensor(dx, dims), tensor(dgamma, vec![width]))
}

/// SwiGLU forward: `silu(a) ⊙ b`, `silu(a) = a · σ(a)`.
pub(super) fn swiglu_forward(a: &FlexTensor, b: &FlexTensor) -> FlexTensor {
    let dims = shape(a);
    let (a, b) = (data(a), data(b));
    let (av, bv) = (slice(&a), slice(&b));
    let mut y = vec![0f32; av.len()];
    y.par_chunks_mut(CHUNK)
        .zip(av.par_chunks(CHUNK).zip(bv.par_chunks(CHUNK)))
        .for_each(|(y, (a, b))| {
            vectorized(|| {
                for ((y, a), b) in y.iter_mut().zip(a).zip(b) {
                    *y = a * sigmoid(*a) * b;
                }
            })
        });
    tensor(y, dims)
}

/// SwiGLU backward: `da = g ⊙ b ⊙ σ(a)(1 + a(1 − σ(a)))`, `db = g ⊙ silu(a)`.
pub(super) fn swiglu_backward(
    grad: &FlexTensor,
    a: &FlexTensor,
    b: &FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let dims = shape(a);
    let (grad, a, b) = (data(grad), data(a), data(b));
    let (gv, av, bv) = (slice(&grad), slice(&a), slice(&b));
    let mut da = vec![0f32; av.len()];
    let mut db = vec![0f32; av.len()];
    da.par_chunks_mut(CHUNK)
        .zip(db.par_chunks_mut(CHUNK))
        .zip(
            gv.par_chunks(CHUNK)
                .zip(av.par_chunks(CHUNK).zip(bv.par_chunks(CHUNK))),
        )
        .for_each(|((da, db), (g, (a, b)))| {
            vectorized(|| {
                for ((da, db), (g, (a, b))) in
                    da.iter_mut().zip(db).zip(g.iter().zip(a.iter().zip(b)))
                {
                    let s = sigmoid(*a);
                    *da = g * b * s * (1.0 + a * (1.0 - s));
                    *db = g * a * s;
                }
            })
        });
    (tensor(da, dims.clone()), tensor(db, dims))
}

/// Causal softmax forward over the last dimension of `x: [.., rows, seq]`: row `i` (counted
/// over all leading dimensions; `rows` is a multiple of `seq`) is query position `i mod seq` and
/// sees the first `i mod seq + 1` columns; `y = exp(s − max s) / Σ exp(s − max s)` with
/// `s = x / divisor` there, 0 beyond.
pub(super) fn causal_softmax_forward(x: &FlexTensor, divisor: f32) -> FlexTensor {
    let dims = shape(x);
    let seq = *dims.last().expect("rank >= 1");
    let x = data(x);
    let xs = slice(&x);
    let mut y = vec![0f32; xs.len()];
    y.par_chunks_mut(seq)
        .with_min_len(rows_per_chunk(seq))
        .zip(xs.par_chunks(seq))
        .enumerate()
        .for_each(|(row, (y, x))| {
            let visible = row % seq + 1;
            let (y, x) = (&mut y[..visible], &x[..visible]);
            vectorized(|| {
                for (y, x) in y.iter_mut().zip(x) {
                    *y = x / divisor;
                }
                let max = simd::max(y);
                for y in y.iter_mut() {
                    *y = simd::exp(*y - max);
                }
                let total = simd::sum(y);
                for y in y.iter_mut() {
                    *y /= total;
                }
            })
        });
    tensor(y, dims)
}

/// Softmax backward over the last dimension: `dx = y ⊙ (g − Σ_row g ⊙ y) / divisor`.
pub(super) fn softmax_backward(grad: &FlexTensor, y: &FlexTensor, divisor: f32) -> FlexTensor {
    let dims = shape(y);
    let width = *dims.last().expect("rank >= 1");
    let (grad, y) = (data(grad), data(y));
    let (gs, ys) = (slice(&grad), slice(&y));
    let mut dx = vec![0f32; ys.len()];
    dx.par_chunks_mut(width)
        .with_min_len(rows_per_chunk(width))
        .zip(gs.par_chunks(width).zip(ys.par_chunks(width)))
        .for_each(|(dx, (g, y))| {
            vectorized(|| {
                let gy = dot(g, y);
                for ((dx, g), y) in dx.iter_mut().zip(g).zip(y) {
                    *dx = y * (g - gy) / divisor;
                }
            })
        });
    tensor(dx, dims)
}

/// Rotary tables for [`swap_middle`]: `[positions, d]` cos and sin (positions at least the
/// sequence), which input axis holds the position, and whether to rotate back (the transpose
/// of the rotation: the backward pass).
pub(super) struct Rotation<'a> {
    pub cos: &'a FlexTensor,
    pub sin: &'a FlexTensor,
    pub position_axis: usize,
    pub inverse: bool,
}

/// `[n0, n1, n2, d] → [n0, n2, n1, d]` into contiguous memory, each `d`-row rotated by its
/// position (Hugging Face's `rotate_half` convention) when `rotation` is given.
pub(super) fn swap_middle(x: &FlexTensor, rotation: Option<Rotation<'_>>) -> FlexTensor {
    let dims = shape(x);
    let [n0, n1, n2, d] = [dims[0], dims[1], dims[2], dims[3]];
    let x = data(x);
    let xs = slice(&x);
    let tables = rotation.as_ref().map(|r| (data(r.cos), data(r.sin)));
    let tables = tables.as_ref().map(|(c, s)| (slice(c), slice(s)));
    let half = d / 2;
    let mut out = vec![0f32; xs.len()];
    // One output block `(i0, i2)` holds the n1 rows `x[i0, :, i2]`.
    out.par_chunks_mut(n1 * d)
        .with_min_len((CHUNK / (n1 * d).max(1)).max(1))
        .enumerate()
        .for_each(|(block, out)| {
            let (i0, i2) = (block / n2, block % n2);
            for (i1, out) in out.chunks_mut(d).enumerate() {
                let src = &xs[((i0 * n1 + i1) * n2 + i2) * d..][..d];
                let (Some((cos, sin)), Some(rot)) = (tables, rotation.as_ref()) else {
                    out.copy_from_slice(src);
                    continue;
                };
                let pos = if rot.position_axis == 1 { i1 } else { i2 };
                let (cos, sin) = (&cos[pos * d..][..d], &sin[pos * d..][..d]);
                for j in 0..half {
                    let (a, b) = (src[j], src[j + half]);
                    if rot.inverse {
                        out[j] = a * cos[j] + b * sin[j + half];
                        out[j + half] = b * cos[j + half] - a * sin[j];
                    } else {
                        out[j] = a * cos[j] - b * sin[j];
                        out[j + half] = b * cos[j + half] + a * sin[j + half];
                    }
                }
            }
        });
    tensor(out, vec![n0, n2, n1, d])
}

/// Rows per parallel chunk of the loss kernels, fixed so that the loss's partial sums are added
/// in the same order on any thread count.
const LOSS_ROWS: usize = 64;

/// A target row the loss skips ([`super::IGNORE_TARGET`] on the host side).
pub(super) const SKIP: usize = usize::MAX;

/// Mean cross-entropy of `logits: [rows, vocab]` against `targets` (one class per row; rows
/// whose target is [`SKIP`] are left out of the sum and the count), and each row's log-sum-exp
/// (kept for the backward pass).
pub(super) fn cross_entropy_forward(logits: &FlexTensor, targets: &[usize]) -> (f32, Vec<f32>) {
    let logits = data(logits);
    let xs = slice(&logits);
    let rows = targets.len();
    let vocab = xs.len() / rows.max(1);
    let mut lse = vec![0f32; rows];
    let partials: Vec<f32> = lse
        .par_chunks_mut(LOSS_ROWS)
        .zip(xs.par_chunks(LOSS_ROWS * vocab))
        .zip(targets.par_chunks(LOSS_ROWS))
        .map(|((lse, x), targets)| {
            let mut sum = 0f32;
            for ((lse, x), &t) in lse.iter_mut().zip(x.chunks(vocab)).zip(targets) {
                let (max, total) = vectorized(|| {
                    let max = simd::max(x);
                    (max, simd::sum_exp(x, max))
                });
                *lse = max + total.ln();
                if t != SKIP {
                    sum += *lse - x[t];
                }
            }
            sum
        })
        .collect();
    let counted = targets.iter().filter(|t| **t != SKIP).count();
    (partials.iter().sum::<f32>() / counted.max(1) as f32, lse)
}

/// The cross-entropy's gradient: `scale · (softmax(x) − onehot(target))` row by row (zero on
/// [`SKIP`] rows).
pub(super) fn cross_entropy_backward(
    logits: &FlexTensor,
    lse: &[f32],
    targets: &[usize],
    scale: f32,
) -> FlexTensor {
    let dims = shape(logits);
    let logits = data(logits);
    let xs = slice(&logits);
    let vocab = xs.len() / targets.len().max(1);
    let mut dx = vec![0f32; xs.len()];
    dx.par_chunks_mut(vocab)
        .with_min_len((CHUNK / vocab.max(1)).max(1))
        .zip(xs.par_chunks(vocab))
        .zip(lse.par_iter().zip(targets))
        .for_each(|((dx, x), (lse, &t))| {
            if t == SKIP {
                return;
            }
            vectorized(|| {
                for (dx, x) in dx.iter_mut().zip(x) {
                    *dx = scale * simd::exp(x - lse);
                }
            });
            dx[t] -= scale;
        });
    tensor(dx, dims)
}
