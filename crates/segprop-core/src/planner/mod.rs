//! The planner (DESIGN §3): per-GPU memory, host memory, FLOPs and an estimated step time of one
//! training configuration, and the largest micro-batch that fits. A pure function of numbers:
//! no burn, no I/O.
//!
//! # Model of memory (per GPU of a gang of `G` GPUs, micro-batch `b`, sequence `s`)
//!
//! Mixed precision as the engine runs it (FSDP's `MixedPrecision(param_dtype=a,
//! reduce_dtype=fp32)`): compute, gathered weights and frozen weights in `a` bytes (2 for bf16
//! and f16, 4 for f32), fp32 master weights, fp32 AdamW moments, fp32 gradient shards.
//! - **Sharded state** of the trainable parameters `P_t`: `(4 + 8 + 4) × P_t / G` (the fp32
//!   master shard, which is what a rank stores, both moments, the fp32 gradient shard). With CPU
//!   offload it lives in host memory instead, as PyTorch FSDP's `CPUOffload` keeps it: `16 × P_t`
//!   per host.
//! - **Frozen parameters** `P_f` run forward-only (a SegProp prefix recomputed without
//!   SnapCheck): sharded in the compute dtype, `a × P_f / G`, or host memory with offload.
//! - **Held parameters** `P_h` are kept but neither trained nor run (the prefix SnapCheck
//!   replaces, the parked blocks of later segments, stage 1's intermediate blocks): never
//!   gathered during the stage, their shards are parked in host memory, `a × P_h` per host.
//! - **Gathered units**: the unit in use and the prefetched next one, whole, gathered in the
//!   compute dtype, `2 × a × U_max`, plus one unit's full gradient before its reduce-scatter, in
//!   the compute dtype and as the fp32 copy the reduce-scatter sends, `(a + 4) × U_max`.
//! - **Activations** saved for backward, per trained block and token, `a × (6h + 2·kv + 4i)`:
//!   the block input, both norm outputs, q, k, v, the attention output, gate, up, SiLU(gate)
//!   and their product. Attention is assumed memory-efficient (flash/SDPA: no `s × s` scores
//!   kept). With activation checkpointing only the block input `a × h` is kept per block, and
//!   one block's full set is live during its recompute. The embedding output `a × h` per token.
//! - **Logits and loss**: `b × s × V × (a + 4 + 4)` (the logits, their fp32 upcast for the
//!   log-softmax, the fp32 gradient).
//! - **Workspace**: a fixed allowance (CUDA context, NCCL buffers, allocator) plus a fraction of
//!   the device for fragmentation.
//!
//! # Model of compute
//!
//! Forward FLOPs per token of one block: `2 × (matmul parameters) + 2 × s × h` (causal
//! attention: `QKᵀ` and `AV` over half the keys on average); the LM head `2 × h × V`. Training a
//! unit costs forward + backward (`3×` its forward), plus one more forward with activation
//! checkpointing; frozen blocks cost one forward. Step time is the larger of compute (at the
//! cluster's achieved fraction of peak) and communication (FSDP gathers on NVLink; with offload
//! also the PCIe traffic), plus the host AdamW with offload (not overlapped). The bound is
//! named.

use serde::{Deserialize, Serialize};

use crate::llama_config::LlamaConfig;

mod cpu;
pub mod preflight;
pub use cpu::{CpuGangStep, CpuProfile, CpuStep, cpu_gang_step, cpu_step, cpu_step_in_passes};

/// The hardware of one host (a gang is the GPUs of one host).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub gpus: u32,
    pub gpu_mem_bytes: u64,
    pub host_ram_bytes: u64,
    /// Dense bf16 peak of one GPU (FLOP/s).
    pub gpu_flops: f64,
    /// Fraction of the peak training reaches (model FLOPs utilisation).
    pub mfu: f64,
    /// Collective (all-gather / reduce-scatter) bandwidth per GPU over NVLink, bytes/s.
    pub nvlink_bytes_per_s: f64,
    /// Host↔GPU bandwidth per GPU, each direction, bytes/s.
    pub pcie_bytes_per_s: f64,
    /// Parameters per second the host's AdamW updates (all cores).
    pub cpu_adam_params_per_s: f64,
    /// Fixed device allowance: CUDA context, NCCL buffers, allocator slack.
    pub workspace_bytes: u64,
    /// Fraction of device memory kept free for fragmentation.
    pub fragmentation: f64,
}

impl Cluster {
    /// 8 × A100 40 GiB (SXM, NVLink 3) on a host with 1 TiB of RAM: the paper's setting.
    pub fn a100_40g_x8() -> Self {
        Self {
            gpus: 8,
            gpu_mem_bytes: 40 << 30,
            host_ram_bytes: 1 << 40,
            gpu_flops: 312e12,
            mfu: 0.4,
            nvlink_bytes_per_s: 200e9,
            pcie_bytes_per_s: 20e9,
            cpu_adam_params_per_s: 2e9,
            workspace_bytes: 1 << 30,
            fragmentation: 0.05,
        }
    }
}

/// What one configuration trains and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    pub name: String,
    /// Decoder blocks trained (activations, gradients, optimizer state).
    pub trained_blocks: usize,
    /// Whether the token embedding is trained (e2e, SegProp stage 1).
    pub trained_embedding: bool,
    /// Decoder blocks run forward-only every step (a SegProp prefix without SnapCheck).
    pub frozen_blocks: usize,
    /// Whether the frozen prefix starts at the embedding (it does when `frozen_blocks > 0`).
    pub frozen_embedding: bool,
    /// Decoder blocks held but neither trained nor run (SnapCheck's prefix, parked later
    /// segments, stage 1's intermediate blocks): sharded in the compute dtype.
    #[serde(default)]
    pub held_blocks: usize,
    /// Whether the embedding is held that way (a stage-2 segment with SnapCheck).
    #[serde(default)]
    pub held_embedding: bool,
    /// Sharded state in host memory (FSDP + CPU offload).
    pub offload: bool,
    pub activation_checkpointing: bool,
}

/// Bytes per GPU, by kind, and host bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    pub sharded_state: u64,
    pub frozen_weights: u64,
    pub gathered: u64,
    pub activations: u64,
    pub logits: u64,
    pub workspace: u64,
    /// Host memory the configuration needs (offloaded state).
    pub host: u64,
}

impl Memory {
    pub fn gpu_total(&self) -> u64 {
        self.sharded_state
            + self.frozen_weights
            + self.gathered
            + self.activations
            + self.logits
            + self.workspace
    }
}

/// What bounds a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    /// GPU compute at the cluster's achieved rate.
    Compute,
    /// FSDP gathers and reduce-scatters over NVLink.
    Communication,
    /// CPU offload: PCIe transfers and the host AdamW.
    HostTransfer,
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Bound::Compute => "compute",
            Bound::Communication => "NVLink",
            Bound::HostTransfer => "host (offload)",
        })
    }
}

/// One configuration's plan at a micro-batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub workload: Workload,
    pub micro_batch: usize,
    pub seq_len: usize,
    pub memory: Memory,
    pub fits: bool,
    /// Forward, backward and recompute FLOPs per token.
    pub forward_flops_per_token: f64,
    pub backward_flops_per_token: f64,
    pub recompute_flops_per_token: f64,
    /// Estimated step time of one micro-batch per GPU (the gang processes `gpus × micro_batch`
    /// sequences per step).
    pub step_s: f64,
    pub bound: Bound,
    pub tokens_per_s: f64,
}

/// Bytes of the compute copy of a parameter or activation.
fn compute_bytes(bf16: bool) -> u64 {
    if bf16 { 2 } else { 4 }
}

/// Matmul parameters of one block (everything but the norms).
fn block_matmul_params(c: &LlamaConfig) -> u64 {
    c.block_params() - 2 * c.hidden_size as u64
}

/// How attention's `QKᵀ` and `AV` are computed, which sets their FLOPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKernel {
    /// A fused causal kernel (flash attention, SDPA) skips the masked half: `2·s·h` FLOPs per
    /// token and block, no `s × s` scores kept. The GPU plan assumes it.
    Causal,
    /// The eager path of the CPU engine: full `s × s` scores, then the mask: `4·s·h`.
    DenseMasked,
}

/// Forward matmul FLOPs per token of one decoder block at sequence length `seq`.
pub fn block_forward_flops(c: &LlamaConfig, seq: usize, kernel: AttentionKernel) -> f64 {
    let attention = match kernel {
        AttentionKernel::Causal => 2.0,
        AttentionKernel::DenseMasked => 4.0,
    } * (seq * c.q_dim()) as f64;
    2.0 * block_matmul_params(c) as f64 + attention
}

/// Matmul FLOPs per token of one step of `w`: (forward, backward, recompute). Training a part
/// costs its forward and twice that in backward (the gradients of the activations and of the
/// weights); a frozen prefix runs forward only; activation checkpointing runs the trained blocks
/// forward once more.
pub fn step_flops_per_token(
    c: &LlamaConfig,
    w: &Workload,
    seq: usize,
    kernel: AttentionKernel,
) -> (f64, f64, f64) {
    let block = block_forward_flops(c, seq, kernel);
    let head = 2.0 * (c.hidden_size * c.vocab_size) as f64;
    let trained = w.trained_blocks as f64 * block + head;
    let forward = trained + w.frozen_blocks as f64 * block;
    let recompute = if w.activation_checkpointing {
        w.trained_blocks as f64 * block
    } else {
        0.0
    };
    (forward, 2.0 * trained, recompute)
}

/// Plans `w` on `cluster` for `config` at micro-batch `b` and sequence `s`.
pub fn plan(
    config: &LlamaConfig,
    cluster: &Cluster,
    w: &Workload,
    micro_batch: usize,
    seq_len: usize,
    bf16: bool,
) -> Plan {
    let a = compute_bytes(bf16);
    let g = u64::from(cluster.gpus.max(1));
    let (h, i, v) = (
        config.hidden_size as u64,
        config.intermediate_size as u64,
        config.vocab_size as u64,
    );
    let (q, kv) = (config.q_dim() as u64, config.kv_dim() as u64);
    let tokens = (micro_batch * seq_len) as u64;
    let embed = v * h;
    let head = v * h + h;
    let block = config.block_params();

    let trained =
        w.trained_blocks as u64 * block + head + if w.trained_embedding { embed } else { 0 };
    let frozen = w.frozen_blocks as u64 * block + if w.frozen_embedding { embed } else { 0 };
    let held = w.held_blocks as u64 * block + if w.held_embedding { embed } else { 0 };
    // fp32 master shard, both fp32 moments, fp32 gradient shard.
    let state_per_param = 4 + 8 + 4;
    // Held weights are never gathered during the stage: their shards are parked in host memory.
    let (sharded_state, frozen_weights, host) = if w.offload {
        (0, 0, trained * state_per_param + (frozen + held) * a)
    } else {
        (trained * state_per_param / g, frozen * a / g, held * a)
    };
    let unit_max = block
        .max(head)
        .max(if w.trained_embedding || w.frozen_embedding {
            embed
        } else {
            0
        });
    let gathered = 2 * a * unit_max + (a + 4) * unit_max;

    let per_block_token = a * (4 * h + 2 * q + 2 * kv + 4 * i);
    let blocks = w.trained_blocks as u64;
    let saved = if w.activation_checkpointing {
        blocks * a * h * tokens + per_block_token * tokens
    } else {
        blocks * per_block_token * tokens
    };
    // A frozen prefix keeps nothing: one block's temporaries at a time.
    let frozen_live = if w.frozen_blocks > 0 {
        per_block_token * tokens
    } else {
        0
    };
    let embed_out = if w.trained_embedding {
        a * h * tokens
    } else {
        0
    };
    let activations = saved.max(frozen_live) + embed_out;
    let logits = tokens * v * (a + 4 + 4);
    let used = sharded_state + frozen_weights + gathered + activations + logits;
    let workspace =
        cluster.workspace_bytes + (cluster.fragmentation * cluster.gpu_mem_bytes as f64) as u64;
    let memory = Memory {
        sharded_state,
        frozen_weights,
        gathered,
        activations,
        logits,
        workspace,
        host,
    };
    let fits = used + workspace <= cluster.gpu_mem_bytes && host <= cluster.host_ram_bytes;

    let (forward, backward, recompute) =
        step_flops_per_token(config, w, seq_len, AttentionKernel::Causal);

    // Step time of one micro-batch per GPU.
    let flops = (forward + backward + recompute) * tokens as f64;
    let compute_s = flops / (cluster.gpu_flops * cluster.mfu);
    let ring = (g - 1) as f64 / g as f64;
    let gathers = if w.activation_checkpointing { 2.0 } else { 1.0 };
    let nvlink_bytes = ring * a as f64 * ((gathers + 1.0) * trained as f64 + frozen as f64);
    let comm_s = nvlink_bytes / cluster.nvlink_bytes_per_s;
    let (pcie_s, adam_s) = if w.offload {
        // Each GPU uploads its weight shard (compute copy) and downloads its gradient shard.
        let bytes = 2.0 * a as f64 * (trained + frozen) as f64 / g as f64;
        (
            bytes / cluster.pcie_bytes_per_s,
            trained as f64 / cluster.cpu_adam_params_per_s,
        )
    } else {
        (0.0, 0.0)
    };
    let (overlapped, bound) = [
        (compute_s, Bound::Compute),
        (comm_s, Bound::Communication),
        (pcie_s, Bound::HostTransfer),
    ]
    .into_iter()
    .fold(
        (0.0, Bound::Compute),
        |best, x| {
            if x.0 > best.0 { x } else { best }
        },
    );
    let bound = if adam_s > overlapped && w.offload {
        Bound::HostTransfer
    } else {
        bound
    };
    let step_s = overlapped + adam_s;
    Plan {
        workload: w.clone(),
        micro_batch,
        seq_len,
        memory,
        fits,
        forward_flops_per_token: forward,
        backward_flops_per_token: backward,
        recompute_flops_per_token: recompute,
        step_s,
        bound,
        tokens_per_s: (tokens * g) as f64 / step_s.max(1e-12),
    }
}

/// The largest micro-batch (≤ `limit`) at which `w` fits, with its plan; `None` if not even one
/// sequence fits.
pub fn max_micro_batch(
    config: &LlamaConfig,
    cluster: &Cluster,
    w: &Workload,
    seq_len: usize,
    bf16: bool,
    limit: usize,
) -> Option<Plan> {
    let b = largest_fitting(|b| plan(config, cluster, w, b, seq_len, bf16).fits, limit);
    (b > 0).then(|| plan(config, cluster, w, b, seq_len, bf16))
}

/// The largest `b ≤ limit` with `fits(b)` (0 if not even 1 fits), by doubling then bisection;
/// `fits` must be monotone (true up to some batch, false beyond).
pub fn largest_fitting(fits: impl Fn(usize) -> bool, limit: usize) -> usize {
    if !fits(1) {
        return 0;
    }
    let (mut lo, mut hi) = (1usize, 2usize);
    while hi <= limit && fits(hi) {
        lo = hi;
        hi *= 2;
    }
    let mut hi = hi.min(limit + 1);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(mid) { lo = mid } else { hi = mid }
    }
    lo
}

/// Bytes in GiB, for messages and tables.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// The comparison the planner prints: e2e FSDP, FSDP + CPU offload without and with activation
/// checkpointing, SegProp stage 1, a stage-2 segment with and without SnapCheck (the last
/// segment: its prefix is the longest), and stage 1 and the SnapCheck segment with activation
/// checkpointing (AC against AC), for base depth `p`, head depth `r`, segment size `k`.
pub fn comparison(num_layers: usize, p: usize, r: usize, k: usize) -> Vec<Workload> {
    let e2e = |name: &str, offload, ac| Workload {
        name: name.into(),
        trained_blocks: num_layers,
        trained_embedding: true,
        frozen_blocks: 0,
        frozen_embedding: false,
        held_blocks: 0,
        held_embedding: false,
        offload,
        activation_checkpointing: ac,
    };
    let last_prefix = num_layers.saturating_sub(r + k);
    let stage1 = |name: &str, ac| Workload {
        name: name.into(),
        trained_blocks: p + r,
        trained_embedding: true,
        frozen_blocks: 0,
        frozen_embedding: false,
        // The intermediate blocks wait for stage 2.
        held_blocks: num_layers.saturating_sub(p + r),
        held_embedding: false,
        offload: false,
        activation_checkpointing: ac,
    };
    // The last segment: its prefix is the longest; no later segment is parked.
    let stage2 = |name: &str, snapcheck: bool, ac| Workload {
        name: name.into(),
        trained_blocks: k + r,
        trained_embedding: false,
        frozen_blocks: if snapcheck { 0 } else { last_prefix },
        frozen_embedding: !snapcheck,
        held_blocks: if snapcheck { last_prefix } else { 0 },
        held_embedding: snapcheck,
        offload: false,
        activation_checkpointing: ac,
    };
    // The activation-checkpointing rows come last so the rows above keep their places.
    vec![
        e2e("e2e FSDP", false, false),
        e2e("FSDP + CPU offload", true, false),
        e2e("FSDP + CPU offload + AC", true, true),
        stage1("SegProp stage 1", false),
        stage2("SegProp stage 2, SnapCheck", true, false),
        stage2("SegProp stage 2, no SnapCheck", false, false),
        stage1("SegProp stage 1 + AC", true),
        stage2("SegProp stage 2, SnapCheck + AC", true, true),
    ]
}

/// FLOPs of a whole SegProp schedule and of e2e, each stage trained on `tokens` tokens:
/// stage 1, every stage-2 segment (with SnapCheck: no prefix recompute, plus one advance of
/// the snapshots through the segment per segment), against e2e on the same `tokens`.
/// Returns (e2e, SegProp with SnapCheck, SegProp without).
pub fn schedule_flops(
    config: &LlamaConfig,
    p: usize,
    r: usize,
    k: usize,
    seq_len: usize,
    tokens: f64,
) -> (f64, f64, f64) {
    let n = config.num_layers;
    let h = config.hidden_size as f64;
    let block_fwd = block_forward_flops(config, seq_len, AttentionKernel::Causal);
    let head_fwd = 2.0 * h * config.vocab_size as f64;
    let train = |blocks: usize| 3.0 * (blocks as f64 * block_fwd + head_fwd);
    let e2e = tokens * train(n);
    let stage1 = tokens * train(p + r);
    let (mut with, mut without) = (stage1, stage1);
    let mut q = p;
    while q < n.saturating_sub(r) {
        let end = (q + k).min(n - r);
        let seg = train(end - q + r);
        with += tokens * (seg + (end - q) as f64 * block_fwd);
        without += tokens * (seg + q as f64 * block_fwd);
        q = end;
    }
    (e2e, with, without)
}

/// Parses a byte size: `40GiB`, `40GB`, `1.5TiB`, `512MiB`, or a plain number of bytes.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 40GiB, 80GB, 1TiB)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        other => {
            return Err(format!(
                "`{other}` in `{text}` is not a unit (B, GB, GiB, TB, TiB…)"
            ));
        }
    };
    Ok((value * scale).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama70b() -> LlamaConfig {
        LlamaConfig::preset("llama3-70b").expect("preset")
    }

    #[test]
    fn llama70b_on_8x40g_what_fits() {
        let c = llama70b();
        // Offload needs 16 bytes per parameter of host RAM: 1.13 TB for 70B, more than 1 TiB.
        let small_host = Cluster::a100_40g_x8();
        let w = comparison(c.num_layers, 4, 4, 4);
        let p = plan(&c, &small_host, &w[2], 1, 2048, true);
        assert!(!p.fits && p.memory.host > small_host.host_ram_bytes);
        let cluster = Cluster {
            host_ram_bytes: 2 << 40,
            ..Cluster::a100_40g_x8()
        };
        let max = |i: usize| {
            max_micro_batch(&c, &cluster, &w[i], 2048, true, 4096).map_or(0, |p| p.micro_batch)
        };
        let e2e = max(0);
        let offload = max(1);
        let offload_ac = max(2);
        let segment = max(4);
        // 70B of sharded state does not fit 8 x 40 GiB: 16 bytes x 70.6e9 / 8 = 141 GB.
        assert_eq!(e2e, 0);
        // Without checkpointing, 80 blocks of activations of one 2048-token sequence (54 GB)
        // do not fit either; with it, offload fits a few sequences.
        assert_eq!(offload, 0);
        assert!(offload_ac >= 1, "{offload_ac}");
        assert!(segment > offload, "segment {segment} vs offload {offload}");
    }

    #[test]
    fn memory_terms_follow_the_formulas() {
        let c = LlamaConfig::preset("tiny").expect("preset");
        let cluster = Cluster {
            gpus: 2,
            ..Cluster::a100_40g_x8()
        };
        let w = &comparison(c.num_layers, 2, 2, 1)[0];
        let p = plan(&c, &cluster, w, 4, 64, false);
        let params = c.num_params();
        assert_eq!(p.memory.sharded_state, params * 16 / 2);
        let tokens = 4 * 64u64;
        assert_eq!(p.memory.logits, tokens * c.vocab_size as u64 * 12);
        // Doubling the batch doubles what scales with tokens and nothing else.
        let p2 = plan(&c, &cluster, w, 8, 64, false);
        assert_eq!(p2.memory.activations, 2 * p.memory.activations);
        assert_eq!(p2.memory.sharded_state, p.memory.sharded_state);
        // Training costs three forwards of the trained part.
        assert!((p.backward_flops_per_token - 2.0 * p.forward_flops_per_token).abs() < 1.0);
    }

    #[test]
    fn mistral_nemo_counts_its_own_head_dim_and_vocabulary() {
        let c = LlamaConfig::preset("mistral-nemo-12b").expect("preset");
        assert_eq!((c.head_dim(), c.q_dim(), c.kv_dim()), (128, 4096, 1024));
        // q, o: 5120 x 4096 (not 5120 x 5120); k, v: 5120 x 1024; the MLP; two norms.
        let h = 5120u64;
        assert_eq!(
            c.block_params(),
            2 * h * 4096 + 2 * h * 1024 + 3 * h * 14_336 + 2 * h
        );
        // Attention's scores and mixing run over the 4096-wide queries.
        let f = block_forward_flops(&c, 1024, AttentionKernel::Causal);
        assert_eq!(
            f,
            2.0 * (c.block_params() - 2 * h) as f64 + 2.0 * 1024.0 * 4096.0
        );
        // The 131072-token vocabulary's logits: bf16 copy, fp32 widening and gradient.
        let w = &comparison(c.num_layers, 4, 4, 4)[0];
        let p = plan(&c, &Cluster::a100_40g_x8(), w, 1, 1024, true);
        assert_eq!(p.memory.logits, 1024 * 131_072 * (2 + 4 + 4));
    }

    #[test]
    fn checkpointing_trades_activations_for_a_recompute() {
        let c = llama70b();
        let cluster = Cluster::a100_40g_x8();
        let w = comparison(c.num_layers, 4, 4, 4);
        let off = plan(&c, &cluster, &w[1], 1, 2048, true);
        let on = plan(&c, &cluster, &w[2], 1, 2048, true);
        assert!(on.memory.activations * 5 < off.memory.activations);
        assert!(on.recompute_flops_per_token > 0.0 && off.recompute_flops_per_token == 0.0);
        assert!(on.memory.host > 0 && on.memory.sharded_state == 0);
    }

    #[test]
    fn segprop_rows_compare_ac_against_ac_and_park_held_weights_on_the_host() {
        let c = LlamaConfig::preset("llama2-70b").expect("preset");
        let cluster = Cluster {
            host_ram_bytes: 2 << 40,
            ..Cluster::a100_40g_x8()
        };
        let w = comparison(c.num_layers, 4, 4, 4);
        let names: Vec<&str> = w.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names[6], "SegProp stage 1 + AC");
        assert_eq!(names[7], "SegProp stage 2, SnapCheck + AC");
        let max = |i: usize| {
            max_micro_batch(&c, &cluster, &w[i], 2048, true, 4096).map_or(0, |p| p.micro_batch)
        };
        // AC against AC: the SnapCheck segment fits more sequences than FSDP + offload.
        assert!(max(7) > max(2), "{} vs {}", max(7), max(2));
        assert!(max(7) > max(4) && max(6) > max(3));
        // The last segment holds the 72-block prefix and the embedding, parked on the host in
        // bf16: 2 bytes per held parameter, nothing on the GPU.
        let p = plan(&c, &cluster, &w[7], 1, 2048, true);
        let held = 72 * c.block_params() + (c.vocab_size * c.hidden_size) as u64;
        assert_eq!(p.memory.host, 2 * held);
        assert_eq!(p.memory.frozen_weights, 0);
        // f32 holds the same parameters in 4 bytes; the trained state is 16 bytes either way.
        let f32_plan = plan(&c, &cluster, &w[7], 1, 2048, false);
        assert_eq!(f32_plan.memory.host, 2 * p.memory.host);
        assert_eq!(f32_plan.memory.sharded_state, p.memory.sharded_state);
        // Without SnapCheck the prefix runs: its bf16 shards are on the GPUs.
        let q = plan(&c, &cluster, &w[5], 1, 2048, true);
        assert_eq!(q.memory.frozen_weights, 2 * held / 8);
    }

    #[test]
    fn snapcheck_removes_the_prefix_recompute_from_the_schedule() {
        let c = llama70b();
        let (e2e, with, without) = schedule_flops(&c, 4, 4, 4, 2048, 1e9);
        assert!(with < without);
        assert!(e2e > 0.0);
    }
}

#[cfg(test)]
mod parse_tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_bytes("40GiB"), Ok(40 << 30));
        assert_eq!(parse_bytes("80GB"), Ok(80_000_000_000));
        assert_eq!(parse_bytes("1.5 TiB"), Ok(3 << 39));
        assert_eq!(parse_bytes("123"), Ok(123));
        assert!(
            parse_bytes("40 parsecs")
                .unwrap_err()
                .contains("not a unit")
        );
        assert!(parse_bytes("GiB").unwrap_err().contains("not a size"));
    }
}
