//! The planner's model of the CPU engine: peak heap of one unsharded training step on burn's
//! flex backend (f32, eager autodiff). It is how the planner's structure is validated in CI
//! against a counting allocator (docs/planner.md, "Validation"); the GPU plan shares its
//! state terms and replaces the eager activation allowance with the kernel-level one.
//!
//! # Terms (bytes; `P_all` every parameter, `P_t` the trained ones, `T = b·s` tokens)
//! - weights: `4·P_all` (the CPU engine keeps the whole model, frozen blocks included);
//! - optimizer: `8·P_t` (AdamW's two f32 moments);
//! - gradients: during backward, what the LM head's matmul backward holds: its weight gradient
//!   and a transposed copy of the weight, `c_head·V·h`; all of `4·P_t` during the update;
//! - activations: per trained block and token, `c_h·h + c_i·i + c_s·heads·s + c_0`: everything
//!   eager autodiff saves (norm inputs and outputs, q, k, v before and after rotary, the `s × s`
//!   probabilities of the fused causal softmax, gate, up, their product…);
//! - logits: per token, `c_v·V + c_hv·h` (logits, log-softmax, its gradient, the final norm);
//! - input: a snapshot `[b, s, h]` when the step starts from SnapCheck;
//! - the update's transient: AdamW writes the new weight and moments of one tensor before the
//!   old ones are freed, `8 ×` the largest trained tensor (the embedding or LM head);
//! - a fixed allowance (rotary tables, the optimizer's records).
//!
//! The peak is the largest of the backward phase (weights, optimizer, live gradients,
//! activations, logits, input), the update phase (weights, optimizer, all gradients, the
//! update's transient) and, for a step in several passes, the end of a later pass's backward
//! (its gradients next to the accumulated ones): small models with long sequences peak in
//! backward, models with large vocabularies in the update or, in passes, in the accumulation.//!
//! The coefficients were fitted once, on burn's ndarray backend, on a grid of tiny shapes that
//! vary one dimension at a time (`segprop-bench planner --explore`), and are checked on the
//! `tiny` and `small` presets, which were not in the grid (`segprop-bench planner`, and
//! `tests/planner_memory.rs` in segprop-train). When the engine moved to flex and its attention
//! and linears changed (2026-12-05: a fused causal softmax that keeps only the probabilities,
//! grouped-query attention without repeated keys and values, linears as one 2-d matmul whose
//! weight gradient is no longer a batch of partial products), three terms were re-derived from
//! what those ops keep rather than refitted (flex's thread-local buffers make the grid's
//! 64-token steps too noisy to fit): `c_s` 9.67 → 3.2 (one fp32 probability per score instead of
//! three tensors), `c_h` 41 → 37 (k and v at KV width), the LM head's backward 9 → 1 byte per
//! element (no `[b, h, V]` partial weight gradients). When RMSNorm and SwiGLU became single ops
//! (2026-12-06, `segprop_model::fused`), two more were re-derived the same way: `c_h` 37 → 29
//! (each of a block's two norms no longer keeps `x / rms`, 4 bytes per hidden unit), `c_i`
//! 20.8 → 12.8 (gate, up and their product remain; the sigmoid and `silu(gate)` are not kept).
//! The loss became one op too (`fused::cross_entropy`): the logits term `c_v` 17.9 → 8 (the
//! logits and their gradient; the log-softmax's intermediates are gone) and `c_hv` 17.6 → 13.6
//! (the final norm, as the blocks' norms). That exposed a phase the model lacked: in passes, the
//! end of a later pass's backward holds that pass's gradients next to the accumulated ones
//! (`small` 4 × 128 in passes of 2 measured 2.2 GiB with the loss composed or fused; the
//! smaller logits term had hidden it). On `tiny` and `small` the predictions stay within 10%
//! of measurement.

use serde::{Deserialize, Serialize};

use super::Workload;
use crate::llama_config::LlamaConfig;

/// Coefficients of the eager-autodiff allowance, bytes per token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CpuProfile {
    pub block_per_hidden: f64,
    pub block_per_intermediate: f64,
    pub block_per_score: f64,
    pub block_fixed: f64,
    pub head_per_vocab: f64,
    pub head_per_hidden: f64,
    /// Bytes per LM-head element live during the head's backward (its gradient, the
    /// transposed weight).
    pub head_backward_per_element: f64,
    /// Bytes per element of the largest trained tensor allocated during its AdamW update.
    pub update_per_largest: f64,
    pub fixed_bytes: f64,
}

impl CpuProfile {
    /// burn 0.21 flex, f32, calibrated as the module documentation says.
    pub const FLEX_F32: CpuProfile = CpuProfile {
        block_per_hidden: 29.0,
        block_per_intermediate: 12.8,
        block_per_score: 3.2,
        block_fixed: 227.0,
        head_per_vocab: 8.0,
        head_per_hidden: 13.6,
        head_backward_per_element: 1.0,
        update_per_largest: 8.0,
        fixed_bytes: 150e3,
    };
}

/// Predicted peak heap of one step, by term.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuStep {
    pub weights: u64,
    pub optimizer: u64,
    /// Gradients live at the backward peak.
    pub live_gradients: u64,
    pub activations: u64,
    pub logits: u64,
    pub input: u64,
    /// Every trained parameter's gradient (the update phase).
    pub gradients: u64,
    /// Gradients accumulated over the step's earlier passes, live during a later pass's
    /// backward (several batches per step, or batches in passes of `data.micro_batch`).
    #[serde(default)]
    pub accumulated: u64,
    /// The route's input `S[depth]` of the whole batch, held while its passes take rows of it.
    #[serde(default)]
    pub batch_input: u64,
    pub update_transient: u64,
    pub fixed: u64,
}

impl CpuStep {
    pub fn backward_peak(&self) -> u64 {
        self.weights
            + self.optimizer
            + self.live_gradients
            + self.activations
            + self.logits
            + self.input
            + self.accumulated
            + self.batch_input
            + self.fixed
    }

    pub fn update_peak(&self) -> u64 {
        self.weights + self.optimizer + self.gradients + self.update_transient + self.fixed
    }

    /// The end of a later pass's backward: the pass's gradients, all of them, next to those
    /// accumulated so far, before they are added (zero for a step of one pass).
    pub fn accumulate_peak(&self) -> u64 {
        if self.accumulated == 0 {
            return 0;
        }
        self.weights + self.optimizer + self.accumulated + self.gradients + self.fixed
    }

    pub fn peak(&self) -> u64 {
        self.backward_peak()
            .max(self.update_peak())
            .max(self.accumulate_peak())
    }
}

/// The peak heap of one step of `w` on the CPU engine at micro-batch `b` and sequence `s`.
/// Sharding and activation checkpointing are GPU-plan terms; `w` is taken unsharded, without
/// them.
pub fn cpu_step(
    config: &LlamaConfig,
    profile: &CpuProfile,
    w: &Workload,
    micro_batch: usize,
    seq_len: usize,
) -> CpuStep {
    let (h, i, v) = (
        config.hidden_size as f64,
        config.intermediate_size as f64,
        config.vocab_size as f64,
    );
    let tokens = (micro_batch * seq_len) as f64;
    let embed = config.vocab_size as u64 * config.hidden_size as u64;
    let head = embed + config.hidden_size as u64;
    let trained = w.trained_blocks as u64 * config.block_params()
        + head
        + if w.trained_embedding { embed } else { 0 };
    let per_block = profile.block_per_hidden * h
        + profile.block_per_intermediate * i
        + profile.block_per_score * (config.num_heads * seq_len) as f64
        + profile.block_fixed;
    let from_snapshot = !w.trained_embedding && w.frozen_blocks == 0;
    // The LM head is trained by every workload; it or the embedding is the largest tensor of a
    // LLaMA, else an MLP projection.
    let largest = embed
        .max((config.hidden_size * config.intermediate_size) as u64)
        .max((config.hidden_size * config.q_dim()) as u64);
    CpuStep {
        weights: 4 * config.num_params(),
        optimizer: 8 * trained,
        live_gradients: (profile.head_backward_per_element * embed as f64) as u64,
        gradients: 4 * trained,
        accumulated: 0,
        batch_input: 0,
        update_transient: (profile.update_per_largest * largest as f64) as u64,
        activations: (tokens * w.trained_blocks as f64 * per_block) as u64,
        logits: (tokens * (profile.head_per_vocab * v + profile.head_per_hidden * h)) as u64,
        input: if from_snapshot {
            (4.0 * tokens * h) as u64
        } else {
            0
        },
        fixed: profile.fixed_bytes as u64,
    }
}

/// [`cpu_step`] of a step of `batches` batches of `batch` sequences, each run in passes of at
/// most `micro_batch` sequences: a pass holds the activations of `micro_batch` sequences, and
/// from the second pass on the gradients accumulated so far; a route that starts from the frozen
/// prefix holds the prefix's output for the whole batch.
pub fn cpu_step_in_passes(
    config: &LlamaConfig,
    profile: &CpuProfile,
    w: &Workload,
    (batches, batch, micro_batch): (usize, usize, usize),
    seq_len: usize,
) -> CpuStep {
    let micro = micro_batch.clamp(1, batch.max(1));
    let mut step = cpu_step(config, profile, w, micro, seq_len);
    if batches.max(1) * batch.div_ceil(micro) > 1 {
        step.accumulated = step.gradients;
    }
    if micro < batch && !w.trained_embedding {
        step.batch_input = (4 * batch * seq_len * config.hidden_size) as u64;
    }
    step
}

/// Predicted heap of one rank of a sharded CPU gang at the peak of a step (FSDP units with
/// activation checkpointing, [`cpu_gang_step`]), by term.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuGangStep {
    /// This rank's chunks: fp32 masters, both AdamW moments and the gradient of the trained
    /// units; the frozen units' weights (prefix, parked blocks).
    pub shards: u64,
    /// Full weights gathered at once (the unit in use and, with prefetch, the next).
    pub gathered: u64,
    /// Full gradients being reduce-scattered (one in flight with prefetch).
    pub full_gradients: u64,
    /// The largest unit's full gradient as tensors, before it is flattened.
    pub transient: u64,
    /// Unit inputs saved for backward (activation checkpointing).
    pub saved_inputs: u64,
    /// What eager autodiff holds for one unit's recompute with a graph, and the logits.
    pub graph: u64,
    /// SnapCheck entries this rank keeps.
    pub snapshots: u64,
}

impl CpuGangStep {
    pub fn total(&self) -> u64 {
        self.shards
            + self.gathered
            + self.full_gradients
            + self.transient
            + self.saved_inputs
            + self.graph
            + self.snapshots
    }
}

/// One rank of `world` training `w` sharded with activation checkpointing: `passes` passes of
/// `micro_batch` sequences of `seq_len` per step on this rank, frozen weights stored in
/// `frozen_bytes` per weight (4 in f32, 2 in a 16-bit job), `cached` snapshot entries
/// `[micro_batch, seq_len, hidden]` kept, prefetch of the next unit on or off.
#[allow(clippy::too_many_arguments)]
pub fn cpu_gang_step(
    config: &LlamaConfig,
    profile: &CpuProfile,
    w: &Workload,
    world: usize,
    (passes, micro_batch, seq_len): (usize, usize, usize),
    frozen_bytes: u64,
    cached: usize,
    prefetch: bool,
) -> CpuGangStep {
    let n = world.max(1) as u64;
    let embed = config.vocab_size as u64 * config.hidden_size as u64;
    let head = embed + config.hidden_size as u64;
    let block = config.block_params();
    let trained =
        w.trained_blocks as u64 * block + head + if w.trained_embedding { embed } else { 0 };
    let frozen = (w.frozen_blocks + w.held_blocks) as u64 * block
        + if w.frozen_embedding || w.held_embedding {
            embed
        } else {
            0
        };
    let mut units: Vec<u64> = std::iter::repeat_n(block, w.trained_blocks).collect();
    units.push(head);
    if w.trained_embedding {
        units.push(embed);
    }
    units.sort_unstable_by(|a, b| b.cmp(a));
    let largest = units[0];
    let pair = largest
        + if prefetch {
            units.get(1).copied().unwrap_or(0)
        } else {
            0
        };
    let tokens = (micro_batch * seq_len) as f64;
    let h = config.hidden_size as f64;
    let saved_inputs = (units.len() - 1) as f64 * passes as f64 * tokens * h * 4.0;
    let per_block = profile.block_per_hidden * h
        + profile.block_per_intermediate * config.intermediate_size as f64
        + profile.block_per_score * (config.num_heads * seq_len) as f64
        + profile.block_fixed;
    let logits =
        tokens * (profile.head_per_vocab * config.vocab_size as f64 + profile.head_per_hidden * h);
    CpuGangStep {
        shards: 16 * trained / n + frozen_bytes * frozen / n,
        gathered: 4 * pair,
        full_gradients: 4 * pair,
        transient: 4 * largest,
        saved_inputs: saved_inputs as u64,
        graph: (tokens * per_block + logits) as u64,
        snapshots: (cached as f64 * tokens * h * 4.0) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::comparison;

    #[test]
    fn a_segment_holds_less_than_e2e_and_snapcheck_adds_only_its_input() {
        let c = LlamaConfig::preset("small").expect("preset");
        let w = comparison(c.num_layers, 2, 2, 2);
        let p = CpuProfile::FLEX_F32;
        let e2e = cpu_step(&c, &p, &w[0], 2, 128);
        let snap = cpu_step(&c, &p, &w[4], 2, 128);
        let prefix = cpu_step(&c, &p, &w[5], 2, 128);
        assert!(snap.peak() < e2e.peak());
        // The whole model stays resident either way; only what is trained differs.
        assert_eq!(snap.weights, e2e.weights);
        assert_eq!(snap.backward_peak() - prefix.backward_peak(), snap.input);
        assert_eq!(e2e.optimizer, 8 * c.num_params());
    }
}
