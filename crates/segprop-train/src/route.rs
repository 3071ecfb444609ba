//! Routes: which blocks a stage's forward pass runs, and which it trains.
//!
//! Notation of the papers: n blocks, base depth p, head depth r, LL(r) = `f_LM ∘ F_{n-r:n}`.
//! - `Full` (e2e): embed → `0..n` → head.
//! - `Stage1`: embed → `0..p` → adapter → `n-r..n` → head. Intermediate blocks `p..n-r` are
//!   skipped: they are not in the route at all.
//! - `Segment` (stage 2): `z = StopGrad(prefix 0..q)` → `q..q+k` → adapter → `n-r..n` → head.
//! - `LwBlock` (layer-wise baseline): `z = StopGrad(prefix 0..i)` → block `i` → local head (for
//!   `i = 0` the input is the trainable embedding).

use std::ops::Range;

use burn::prelude::*;
use segprop_core::StageKind;
use segprop_model::{Llama, RopeTables};

use crate::adapter::Adapter;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Full {
        num_layers: usize,
    },
    Stage1 {
        base_depth: usize,
        head_start: usize,
        num_layers: usize,
    },
    Segment {
        start: usize,
        end: usize,
        head_start: usize,
        num_layers: usize,
    },
    LwBlock {
        block: usize,
    },
}

/// Where a route's input comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteInput {
    /// The (trainable) token embedding.
    Embed,
    /// `S[depth, batch]`: the detached output of the frozen prefix `0..depth`.
    Prefix { depth: usize },
}

impl Route {
    pub fn new(kind: StageKind, num_layers: usize, head_layers: usize) -> Self {
        let head_start = num_layers - head_layers;
        match kind {
            StageKind::E2e => Route::Full { num_layers },
            StageKind::Stage1 { base_depth } => Route::Stage1 {
                base_depth,
                head_start,
                num_layers,
            },
            StageKind::Segment { start, end } => Route::Segment {
                start,
                end,
                head_start,
                num_layers,
            },
            StageKind::LwBlock { block } => Route::LwBlock { block },
            // Layer-wise with a base prefix is a one-block segment under the LM head alone.
            StageKind::LwGlobal { block } => Route::Segment {
                start: block,
                end: block + 1,
                head_start: num_layers,
                num_layers,
            },
            // The LM head alone on `S[n]`: an empty segment with no decoder blocks above it.
            StageKind::LwHead => Route::Segment {
                start: num_layers,
                end: num_layers,
                head_start: num_layers,
                num_layers,
            },
        }
    }

    pub fn input(&self) -> RouteInput {
        match *self {
            Route::Full { .. } | Route::Stage1 { .. } => RouteInput::Embed,
            Route::Segment { start, .. } => RouteInput::Prefix { depth: start },
            Route::LwBlock { block: 0 } => RouteInput::Embed,
            Route::LwBlock { block } => RouteInput::Prefix { depth: block },
        }
    }

    /// Blocks run before the adapter, and blocks of LL(r) run after it (empty for e2e and lw).
    pub fn blocks(&self) -> (Range<usize>, Range<usize>) {
        match *self {
            Route::Full { num_layers } => (0..num_layers, 0..0),
            Route::Stage1 {
                base_depth,
                head_start,
                num_layers,
            } => (0..base_depth, head_start..num_layers),
            Route::Segment {
                start,
                end,
                head_start,
                num_layers,
            } => (start..end, head_start..num_layers),
            Route::LwBlock { block } => (block..block + 1, 0..0),
        }
    }

    /// Runs the route from its input representation to logits.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` (the embedding, or `S[depth, batch]`)
    /// - output: logits `[batch, seq, vocab]`
    pub fn forward<B: Backend, A: Adapter>(
        &self,
        model: &Llama<B>,
        x: Tensor<B, 3>,
        adapter: &A,
        rope: &RopeTables<B>,
    ) -> Tensor<B, 3> {
        let (trained, _) = self.blocks();
        self.run(model, x, trained, adapter, rope)
    }

    /// Runs the network the route describes as one model, from the embedding: the prefix
    /// `0..depth` (committed blocks and the trained ones), the adapter, LL(r)'s blocks and the
    /// head. Task scoring reads a stage's network this way.
    ///
    /// # Shapes
    /// - x: the embedding `[batch, seq, hidden]`
    /// - output: logits `[batch, seq, vocab]`
    pub fn forward_network<B: Backend, A: Adapter>(
        &self,
        model: &Llama<B>,
        x: Tensor<B, 3>,
        adapter: &A,
        rope: &RopeTables<B>,
    ) -> Tensor<B, 3> {
        let (trained, _) = self.blocks();
        self.run(model, x, 0..trained.end, adapter, rope)
    }

    /// `before` blocks, the adapter (SegProp routes), LL(r)'s blocks and the head.
    fn run<B: Backend, A: Adapter>(
        &self,
        model: &Llama<B>,
        x: Tensor<B, 3>,
        before: Range<usize>,
        adapter: &A,
        rope: &RopeTables<B>,
    ) -> Tensor<B, 3> {
        let (_, head_blocks) = self.blocks();
        let depth = before.end;
        let x = model.forward_blocks(x, before, rope);
        let x = match self {
            Route::Stage1 { .. } | Route::Segment { .. } => adapter.forward(x, depth),
            Route::Full { .. } | Route::LwBlock { .. } => x,
        };
        let x = model.forward_blocks(x, head_blocks, rope);
        model.head.forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage1_skips_intermediate_blocks() {
        let route = Route::new(StageKind::Stage1 { base_depth: 2 }, 8, 2);
        let (prefix, head) = route.blocks();
        assert_eq!((prefix, head), (0..2, 6..8));
        assert_eq!(route.input(), RouteInput::Embed);
    }

    #[test]
    fn layer_wise_routes_have_no_decoder_head() {
        let route = Route::new(StageKind::LwGlobal { block: 3 }, 8, 2);
        assert_eq!(route.blocks(), (3..4, 8..8));
        assert_eq!(route.input(), RouteInput::Prefix { depth: 3 });
        let route = Route::new(StageKind::LwHead, 8, 2);
        assert_eq!(route.blocks(), (8..8, 8..8));
        assert_eq!(route.input(), RouteInput::Prefix { depth: 8 });
    }

    #[test]
    fn segment_reads_the_prefix_snapshot() {
        let route = Route::new(StageKind::Segment { start: 3, end: 5 }, 8, 0);
        assert_eq!(route.blocks(), (3..5, 8..8));
        assert_eq!(route.input(), RouteInput::Prefix { depth: 3 });
    }
}
