//! Adapters: the map from a segment's output into the global head's input space (the TMLR
//! paper's `A_q`). Transformers keep the hidden size through depth, so their adapter is the
//! identity; geometry-changing models (CNNs) plug in their own.

use burn::prelude::*;

/// Maps the output of blocks ending at `depth` into LL(r)'s input space. An adapter is trained with
/// its segment and discarded when the segment commits.
pub trait Adapter: Send {
    /// # Shapes
    /// - x: `[batch, seq, hidden]` (the output of blocks `..depth`)
    /// - output: `[batch, seq, hidden]` (the input of LL(r))
    fn forward<B: Backend>(&self, x: Tensor<B, 3>, depth: usize) -> Tensor<B, 3>;
}

/// The transformer adapter: hidden states pass through unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdentityAdapter;

impl Adapter for IdentityAdapter {
    fn forward<B: Backend>(&self, x: Tensor<B, 3>, _depth: usize) -> Tensor<B, 3> {
        x
    }
}
