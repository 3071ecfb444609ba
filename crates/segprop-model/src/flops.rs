//! A count of the matmul FLOPs the model launches, so the planner's FLOPs formulas can be
//! checked against the work the engine actually does (docs/planner.md, "Validation").
//!
//! Every matmul of the model (the seven projections of a block, `QKᵀ` and `AV`, the LM head)
//! goes through [`linear`] or [`matmul`], which add `2·m·k·n` to the forward count. On an
//! autodiff backend the backward pass runs one matmul of the same size per operand that needs
//! a gradient: the weight when it is a trainable parameter, and the activation, which on the
//! engine's autodiff routes always does (every route trains the parameters it runs through, so
//! its activations are tracked). Frozen prefixes and graph-free passes run on the inner
//! backend and add forward work only. Counters are per thread (a gang rank counts its own
//! work): read them around a step with [`snapshot`] and [`Counts::since`].

use std::cell::Cell;

use burn::nn::Linear;
use burn::prelude::*;

use crate::precision::to_dtype;

thread_local! {
    static COUNTS: Cell<Counts> = const { Cell::new(Counts { forward: 0, backward: 0 }) };
}

/// Matmul FLOPs launched so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub forward: u64,
    pub backward: u64,
}

impl Counts {
    /// What was launched between `earlier` and `self`.
    pub fn since(self, earlier: Counts) -> Counts {
        Counts {
            forward: self.forward - earlier.forward,
            backward: self.backward - earlier.backward,
        }
    }
}

/// This thread's counters now.
pub fn snapshot() -> Counts {
    COUNTS.with(Cell::get)
}

fn record(flops: u64, grads: u64) {
    COUNTS.with(|c| {
        let now = c.get();
        c.set(Counts {
            forward: now.forward + flops,
            backward: now.backward + flops * grads,
        });
    });
}

/// `layer.forward(x)` in `x`'s dtype (the weight is cast to it: an fp32 master computes in
/// bf16 when `x` is bf16), counted: `x` is `[.., k]`, the weight `[k, n]`.
pub fn linear<B: Backend, const D: usize>(layer: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let [k, n] = layer.weight.dims();
    let rows = x.shape().num_elements() / k;
    let autodiff = B::ad_enabled(&x.device());
    let weight_grad = layer.weight.val().is_require_grad();
    record(
        2 * (rows * k * n) as u64,
        u64::from(autodiff) + u64::from(autodiff && weight_grad),
    );
    let dtype = x.dtype();
    // As one `[rows, k] x [k, n]` matmul: burn's linear on a `[b, s, k]` input is a batched
    // matmul that packs the weight once per batch item, and its weight gradient is `b` partial
    // products `[k, n]` summed afterwards (docs/benchmarks.md, "Training throughput").
    let mut out_dims = x.dims();
    out_dims[D - 1] = n;
    let (x, weight) = (x.reshape([rows, k]), to_dtype(layer.weight.val(), dtype));
    let y = match &layer.bias {
        None => crate::fused::linear(x, weight),
        Some(b) => burn::tensor::module::linear(x, weight, Some(to_dtype(b.val(), dtype))),
    };
    y.reshape(out_dims)
}

/// `a.matmul(b)` of two activations, counted (both operands need gradients on autodiff).
pub fn matmul<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    let (da, db) = (a.dims(), b.dims());
    let (m, k, n) = (da[D - 2], da[D - 1], db[D - 1]);
    let batch: usize = da[..D - 2].iter().product();
    let autodiff = B::ad_enabled(&a.device());
    record(2 * (batch * m * k * n) as u64, 2 * u64::from(autodiff));
    crate::fused::matmul(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::module::AutodiffModule;
    use burn::nn::LinearConfig;

    #[test]
    fn counts_forward_and_the_backward_matmuls_autodiff_runs() {
        type A = Autodiff<NdArray>;
        let device = Default::default();
        let layer = LinearConfig::new(8, 4).with_bias(false).init::<A>(&device);
        let x = Tensor::<A, 3>::ones([2, 3, 8], &device);
        let flops = 2 * 6 * 8 * 4;
        let before = snapshot();
        let _ = linear(&layer, x.clone());
        // 6 rows x 8 -> 4; backward: the weight's and the input's gradient.
        assert_eq!(
            snapshot().since(before),
            Counts {
                forward: flops,
                backward: 2 * flops
            }
        );
        let before = snapshot();
        let _ = linear(&layer.valid(), x.clone().inner());
        assert_eq!(
            snapshot().since(before),
            Counts {
                forward: flops,
                backward: 0
            }
        );
        let (a, b) = (
            Tensor::<A, 4>::ones([2, 3, 5, 8], &device),
            Tensor::ones([2, 3, 8, 7], &device),
        );
        let before = snapshot();
        let _ = matmul(a, b);
        let per = 2 * 6 * 5 * 8 * 7;
        assert_eq!(
            snapshot().since(before),
            Counts {
                forward: per,
                backward: 2 * per
            }
        );
    }
}
