//! The submit-time pre-flight check (issue 6): does every stage of a job fit the memory of the
//! worker that would run it? The coordinator refuses a job that does not, with the breakdown of
//! the stage that fails, instead of letting it run out of memory hours in.
//!
//! - CUDA workers: the GPU plan of each stage (per-GPU memory against the device, host memory for
//!   CPU offload against the host).
//! - CPU workers: the CPU engine model ([`super::cpu_step`], validated against measurement) plus
//!   the in-memory SnapCheck budget, against the host. A CPU gang (`full_shard`, or activation
//!   checkpointing on one rank) runs its ranks as threads of one process whose units stay
//!   sharded between stages too, standalone or on a worker daemon: it counts every rank's
//!   [`super::cpu_gang_step`] (its shards, the gathered units the schedule allows, saved inputs
//!   and one unit's recompute graph), not a whole model per rank.

use serde::{Deserialize, Serialize};

use super::{Cluster, CpuProfile, Workload, cpu_step_in_passes, gib, largest_fitting, plan};
use crate::llama_config::LlamaConfig;
use crate::plan::{StageKind, StagePlan};
use crate::spec::{Backend, BatchSize, JobSpec, MicroBatch, Offload, Regime, TokenizerKind};

/// The memory of the worker a job would run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerMemory {
    /// Memory of each of its devices (GPU memory; for CPU ranks, their share of the host).
    pub device_bytes: u64,
    pub host_bytes: u64,
}

/// One stage's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageFit {
    pub stage: String,
    pub fits: bool,
    /// Bytes the stage needs of the bound resource (per GPU on CUDA, the host on CPU) and what
    /// the worker has.
    pub needed_bytes: u64,
    pub available_bytes: u64,
    /// Host bytes CPU offload needs (CUDA), and the host's.
    pub host_needed_bytes: u64,
    pub host_available_bytes: u64,
    /// The terms of `needed_bytes`, for the message.
    pub breakdown: String,
    /// Sequences per pass the stage was checked at (the batch when it runs whole).
    pub micro_batch: usize,
    /// The largest batch this stage fits whole on this worker (0: none).
    pub max_batch: usize,
    /// The largest pass of the spec's batch this stage fits on this worker (0: none).
    pub max_micro_batch: usize,
}

/// The workload of one stage of `spec` (model of `num_layers` blocks).
pub fn stage_workload(spec: &JobSpec, kind: &StageKind, num_layers: usize) -> Workload {
    let offload = spec.sharding.offload == Offload::Cpu;
    let ac = spec.activation_checkpointing;
    let r = match spec.regime {
        Regime::Lw => spec.lw.head_layers(),
        _ => spec.segprop.head_layers,
    };
    let base =
        |name: String, trained_blocks, trained_embedding, frozen_blocks, held_blocks| Workload {
            name,
            trained_blocks,
            trained_embedding,
            frozen_blocks,
            frozen_embedding: frozen_blocks > 0,
            held_blocks,
            held_embedding: false,
            offload,
            activation_checkpointing: ac,
        };
    match *kind {
        StageKind::E2e => base("e2e".into(), num_layers, true, 0, 0),
        StageKind::Stage1 { base_depth } => base(
            "stage1".into(),
            base_depth + r,
            true,
            0,
            num_layers.saturating_sub(base_depth + r),
        ),
        StageKind::Segment { start, end } => {
            let snapcheck = spec.regime == Regime::Segprop && spec.segprop.snapcheck;
            // Later segments are parked; with SnapCheck the prefix (embedding included) is held,
            // without it runs forward.
            let parked = num_layers.saturating_sub(end + r);
            let (frozen, held) = if snapcheck {
                (0, start + parked)
            } else {
                (start, parked)
            };
            let mut w = base(
                format!("segment-{start}-{end}"),
                end - start + r,
                false,
                frozen,
                held,
            );
            w.held_embedding = snapcheck;
            w
        }
        // A layer-wise block trains itself and a local head; its prefix runs forward-only and
        // the blocks after it wait.
        StageKind::LwBlock { block } => base(
            format!("lw-block-{block}"),
            1,
            block == 0,
            block,
            num_layers.saturating_sub(block + 1),
        ),
        // The same with the model's LM head on top; the prefix is never the embedding alone.
        StageKind::LwGlobal { block } => base(
            format!("lw-block-{block}"),
            1,
            false,
            block,
            num_layers.saturating_sub(block + 1),
        ),
        // The LM head alone on the whole frozen network.
        StageKind::LwHead => base("lw-head".into(), 0, false, num_layers, 0),
    }
}

/// Bytes of a file corpus the GPT-2 tokenizer reads to count its tokens; a larger file's count
/// is extrapolated from them by size.
const BPE_SAMPLE_BYTES: usize = 4 << 20;

/// Tokens of the job's corpus, capped by `data.max_tokens`: the synthetic corpus's size (its
/// bytes: exact with the byte tokenizer, an upper bound with GPT-2's), a text file's bytes with
/// the byte tokenizer, and with GPT-2's the tokens of the file as the engine will count them
/// (the first [`BPE_SAMPLE_BYTES`] tokenized, the rest extrapolated).
fn corpus_tokens(spec: &JobSpec) -> Option<u64> {
    let tokens = if spec.data.corpus == "builtin:synthetic" {
        spec.data.synthetic_tokens as u64
    } else {
        let path = std::path::Path::new(&spec.data.corpus);
        if spec.data.format == crate::DataFormat::Chat {
            // Rendered and masked by the engine: not counted here.
            return None;
        }
        match spec.tokenizer().ok()? {
            TokenizerKind::Byte => std::fs::metadata(path).ok()?.len(),
            TokenizerKind::Gpt2 => bpe_tokens(path, BPE_SAMPLE_BYTES)?,
            // A Hugging Face tokenizer is applied by the engine only.
            TokenizerKind::Hf(_) => return None,
        }
    };
    Some(match spec.data.max_tokens {
        0 => tokens,
        max => tokens.min(max as u64),
    })
}

/// GPT-2 BPE tokens of the text file at `path`: counted on its first `sample` bytes (cut at a
/// character boundary), scaled by the file's size when it is larger.
fn bpe_tokens(path: &std::path::Path, sample: usize) -> Option<u64> {
    use std::io::Read;
    let size = std::fs::metadata(path).ok()?.len();
    let mut bytes = Vec::with_capacity(sample.min(size as usize));
    std::fs::File::open(path)
        .ok()?
        .take(sample as u64)
        .read_to_end(&mut bytes)
        .ok()?;
    let text = match std::str::from_utf8(&bytes) {
        Ok(text) => text,
        // A cut inside a character at the end of the sample; anything else is not UTF-8 text,
        // which the engine refuses with its own message.
        Err(e) if e.error_len().is_none() => std::str::from_utf8(&bytes[..e.valid_up_to()]).ok()?,
        Err(_) => return None,
    };
    if text.is_empty() {
        return Some(0);
    }
    let counted = tiktoken_rs::r50k_base_singleton()
        .encode_ordinary(text)
        .len() as u64;
    Some(if (text.len() as u64) < size {
        (counted as f64 * size as f64 / text.len() as f64).round() as u64
    } else {
        counted
    })
}

/// The largest micro-batch the corpus allows: both the train and the eval split must hold one
/// batch of sequences (None: the corpus size is unknown). The engine packs the tokens the same
/// way (`segprop-train` `Dataset`); with GPT-2's tokenizer on a file larger than the tokenizer's
/// sample, and on the synthetic corpus, the count is an estimate.
pub fn data_batch_cap(spec: &JobSpec) -> Option<usize> {
    let tokens = corpus_tokens(spec)? as usize;
    let t = spec.data.seq_len;
    let sequences = if tokens > t {
        (tokens - t - 1) / t + 1
    } else {
        0
    };
    let eval = (sequences as f64 * spec.data.eval_fraction).ceil() as usize;
    Some(sequences.saturating_sub(eval).min(eval))
}

/// Host bytes the SnapCheck cache keeps in memory: two depths of f32 snapshots (the one a
/// segment reads and the one advanced from it) of every token, up to its memory budget; the
/// rest spills to disk.
fn snapshot_memory(spec: &JobSpec, config: &LlamaConfig) -> u64 {
    let budget = spec.segprop.snapcheck_memory_bytes;
    corpus_tokens(spec).map_or(budget, |tokens| {
        budget.min(2 * tokens * config.hidden_size as u64 * 4)
    })
}

/// What `w` needs for batches of `batch` sequences in passes of `micro` on `worker`, with
/// `snapshots` bytes of SnapCheck cache in memory (CPU): (fits, needed, available, host needed,
/// breakdown).
fn need(
    spec: &JobSpec,
    config: &LlamaConfig,
    worker: &WorkerMemory,
    w: &Workload,
    (batch, micro): (usize, usize),
    snapshots: u64,
) -> (bool, u64, u64, u64, String) {
    let s = spec.data.seq_len;
    let ranks = spec.resources.devices_per_gang.max(1) as u64;
    match spec.resources.backend {
        Backend::Cuda => {
            let cluster = Cluster {
                gpus: ranks as u32,
                gpu_mem_bytes: worker.device_bytes,
                host_ram_bytes: worker.host_bytes,
                ..Cluster::a100_40g_x8()
            };
            let p = plan(
                config,
                &cluster,
                w,
                micro,
                s,
                spec.resources.precision.is_half(),
            );
            let m = p.memory;
            let breakdown = format!(
                "sharded state {:.2} GiB, frozen weights {:.2} GiB, gathered units {:.2} GiB, \
                 activations {:.2} GiB, logits {:.2} GiB, workspace {:.2} GiB per GPU; \
                 host (offload) {:.2} GiB",
                gib(m.sharded_state),
                gib(m.frozen_weights),
                gib(m.gathered),
                gib(m.activations),
                gib(m.logits),
                gib(m.workspace),
                gib(m.host)
            );
            (
                p.fits,
                m.gpu_total(),
                cluster.gpu_mem_bytes,
                m.host,
                breakdown,
            )
        }
        Backend::Cpu if gang_job(spec) => {
            let world = ranks as usize;
            // A sharded step splits its micro-batches over the ranks; a batch run in passes of
            // `micro` sequences multiplies them.
            let passes = (spec.optimizer.grad_accum / world).max(1) * batch.div_ceil(micro.max(1));
            let step = super::cpu_gang_step(
                config,
                &CpuProfile::FLEX_F32,
                w,
                world,
                (passes, micro, s),
                spec.resources.precision.bytes(),
                0,
                spec.sharding.prefetch,
            );
            let needed = ranks * step.total() + snapshots;
            let breakdown = format!(
                "{ranks} ranks x (shards {:.2} GiB, gathered units {:.2} GiB, full gradients \
                 {:.2} GiB, largest gradient as tensors {:.2} GiB, saved inputs {:.2} GiB, one \
                 unit's recompute and logits {:.2} GiB); SnapCheck snapshots in memory {:.2} GiB",
                gib(step.shards),
                gib(step.gathered),
                gib(step.full_gradients),
                gib(step.transient),
                gib(step.saved_inputs),
                gib(step.graph),
                gib(snapshots)
            );
            (
                needed <= worker.host_bytes,
                needed,
                worker.host_bytes,
                0,
                breakdown,
            )
        }
        Backend::Cpu => {
            let step = cpu_step_in_passes(
                config,
                &CpuProfile::FLEX_F32,
                w,
                (spec.optimizer.grad_accum, batch, micro),
                s,
            );
            let snapcheck = snapshots;
            let needed = ranks * step.peak() + snapcheck;
            let accumulated = if step.accumulated > 0 {
                format!(", accumulated gradients {:.2} GiB", gib(step.accumulated))
            } else {
                String::new()
            };
            let breakdown = format!(
                "{}weights {:.2} GiB, optimizer {:.2} GiB, activations {:.2} GiB, logits {:.2} GiB, \
                 gradients at the peak {:.2} GiB{accumulated}; SnapCheck snapshots in memory {:.2} GiB",
                if ranks > 1 {
                    format!("{ranks} ranks x (")
                } else {
                    String::new()
                },
                gib(step.weights),
                gib(step.optimizer),
                gib(step.activations),
                gib(step.logits),
                gib(if step.peak() == step.backward_peak() {
                    step.live_gradients
                } else if step.peak() == step.update_peak() {
                    step.gradients + step.update_transient
                } else {
                    // The end of a later pass's backward: that pass's gradients.
                    step.gradients
                }),
                gib(snapcheck)
            ) + if ranks > 1 { ")" } else { "" };
            (
                needed <= worker.host_bytes,
                needed,
                worker.host_bytes,
                0,
                breakdown,
            )
        }
    }
}

/// Whether `spec` trains on a gang whose units stay sharded (`full_shard`, or activation
/// checkpointing), as the engine's `gang::gang_size` decides.
fn gang_job(spec: &JobSpec) -> bool {
    spec.sharding.strategy == crate::spec::ShardingStrategy::FullShard
        || spec.activation_checkpointing
}

/// The stage's limits on `worker`: the largest batch it fits whole, and the largest pass of a
/// `batch`-sequence batch it fits (0: none). Passes cost the accumulated gradients, so a pass
/// of `batch - 1` can fail where the whole batch fits: the whole batch is tried first.
fn limits(
    spec: &JobSpec,
    config: &LlamaConfig,
    worker: &WorkerMemory,
    w: &Workload,
    batch: usize,
    snapshots: u64,
) -> (usize, usize) {
    let fits = |b: usize, m: usize| need(spec, config, worker, w, (b, m), snapshots).0;
    let whole = largest_fitting(|b| fits(b, b), 4096);
    let micro = if batch == 0 {
        0
    } else if fits(batch, batch) {
        batch
    } else {
        largest_fitting(|m| fits(batch, m), batch - 1)
    };
    (whole, micro)
}

/// Bytes of SnapCheck cache a CPU worker keeps in memory for `spec` (0 elsewhere).
fn snapshots_in_memory(spec: &JobSpec, config: &LlamaConfig) -> u64 {
    match spec.resources.backend {
        Backend::Cpu if spec.regime == Regime::Segprop && spec.segprop.snapcheck => {
            snapshot_memory(spec, config)
        }
        _ => 0,
    }
}

/// Checks every training stage of `stages` at the spec's `data.batch_size` (resolved) and each
/// stage's `data.micro_batch`.
pub fn check(
    spec: &JobSpec,
    config: &LlamaConfig,
    stages: &StagePlan,
    worker: &WorkerMemory,
) -> Vec<StageFit> {
    let snapshots = snapshots_in_memory(spec, config);
    let batch = spec.data.batch_size.get();
    stages
        .stages
        .iter()
        .map(|entry| {
            let w = stage_workload(spec, &entry.kind, config.num_layers);
            let micro = spec.micro_batch(&entry.name);
            let (fits, needed, available, host, breakdown) =
                need(spec, config, worker, &w, (batch, micro), snapshots);
            let (max_batch, max_micro_batch) = limits(spec, config, worker, &w, batch, snapshots);
            StageFit {
                stage: entry.name.clone(),
                fits,
                needed_bytes: needed,
                available_bytes: available,
                host_needed_bytes: host,
                host_available_bytes: worker.host_bytes,
                breakdown,
                micro_batch: micro,
                max_batch,
                max_micro_batch,
            }
        })
        .collect()
}

/// Resolves `data.batch_size: auto` and `data.micro_batch: auto` in `spec` on `worker`, and
/// returns what was decided for the job's record (`None`: nothing was `auto`), or the refusal.
///
/// - `batch_size: auto`: the largest batch any training stage fits whole (the corpus caps it);
///   the stages that do not fit it whole run it in passes (below). If some stage cannot run that
///   batch even in passes of one sequence (the accumulated gradients do not fit), the batch is
///   the largest every stage fits whole.
/// - per stage, the pass: the largest number of sequences, up to the batch (and up to the
///   stage's given `data.micro_batch`, unless that is `auto`), that fits.
pub fn resolve_auto(
    spec: &mut JobSpec,
    config: &LlamaConfig,
    stages: &StagePlan,
    worker: &WorkerMemory,
    worker_name: &str,
) -> Result<Option<String>, String> {
    let batch_auto = spec.data.batch_size == BatchSize::Auto;
    let micro_auto = spec.data.micro_batch == Some(MicroBatch::Auto);
    if !batch_auto && !micro_auto {
        return Ok(None);
    }
    let snapshots = snapshots_in_memory(spec, config);
    let workloads: Vec<(String, Workload)> = stages
        .stages
        .iter()
        .map(|e| {
            (
                e.name.clone(),
                stage_workload(spec, &e.kind, config.num_layers),
            )
        })
        .collect();
    let given = |spec: &JobSpec, stage: &str| match &spec.data.micro_batch {
        Some(MicroBatch::Auto) | None => usize::MAX,
        Some(m) => m.for_stage(stage).unwrap_or(usize::MAX),
    };
    // Passes of at most `batch`, per stage; None when a stage fits not even one sequence.
    let passes = |spec: &JobSpec, batch: usize| -> Option<Vec<(String, usize)>> {
        workloads
            .iter()
            .map(|(name, w)| {
                let cap = given(spec, name).min(batch);
                let fits = |m: usize| need(spec, config, worker, w, (batch, m), snapshots).0;
                let m = if fits(cap) {
                    cap
                } else if cap > 1 {
                    largest_fitting(fits, cap - 1)
                } else {
                    0
                };
                (m > 0).then(|| (name.clone(), m))
            })
            .collect()
    };
    let refuse = |spec: &mut JobSpec| {
        if spec.data.batch_size == BatchSize::Auto {
            spec.data.batch_size = BatchSize::Fixed(1);
        }
        if spec.data.micro_batch == Some(MicroBatch::Auto) {
            spec.data.micro_batch = None;
        }
        let fits = check(spec, config, stages, worker);
        Err(refusal(spec, &fits, worker_name)
            .unwrap_or_else(|| format!("pre-flight: the job does not fit worker {worker_name}")))
    };
    let mut note = Vec::new();
    let (batch, chosen) = if batch_auto {
        let whole: Vec<usize> = workloads
            .iter()
            .map(|(_, w)| {
                largest_fitting(|b| need(spec, config, worker, w, (b, b), snapshots).0, 4096)
            })
            .collect();
        let (smallest, largest) = (
            whole.iter().copied().min().unwrap_or(0),
            whole.iter().copied().max().unwrap_or(0),
        );
        if smallest == 0 {
            return refuse(spec);
        }
        let cap = data_batch_cap(spec);
        let capped = |b: usize| cap.map_or(b, |c| b.min(c.max(1)));
        let mut batch = capped(largest);
        let mut chosen = passes(spec, batch);
        if chosen.is_none() {
            batch = capped(smallest);
            chosen = passes(spec, batch);
        }
        let per_stage: Vec<String> = workloads
            .iter()
            .zip(&whole)
            .map(|((name, _), b)| format!("{name} {b}"))
            .collect();
        note.push(format!(
            "data.batch_size: auto -> {batch} on worker {worker_name} (largest whole batch per \
             stage: {}{})",
            per_stage.join(", "),
            match cap {
                Some(c) if c < largest => format!("; the corpus allows {c}"),
                _ => String::new(),
            }
        ));
        (batch, chosen)
    } else {
        let batch = spec.data.batch_size.get();
        (batch, passes(spec, batch))
    };
    let Some(chosen) = chosen else {
        spec.data.batch_size = BatchSize::Fixed(batch);
        return refuse(spec);
    };
    spec.data.batch_size = BatchSize::Fixed(batch);
    let split: Vec<String> = chosen
        .iter()
        .filter(|(_, m)| *m < batch)
        .map(|(name, m)| format!("{name} {m}"))
        .collect();
    spec.data.micro_batch = if split.is_empty() {
        None
    } else {
        Some(MicroBatch::PerStage(chosen.into_iter().collect()))
    };
    note.push(if split.is_empty() {
        format!("every stage runs whole batches of {batch}")
    } else {
        format!(
            "data.micro_batch -> passes of {} (gradients accumulated over a batch of {batch})",
            split.join(", ")
        )
    });
    if !batch_auto {
        note.insert(0, format!("data.micro_batch: auto on worker {worker_name}"));
    }
    Ok(Some(note.join("; ")))
}

/// The refusal message for the first stage that does not fit, if any.
pub fn refusal(spec: &JobSpec, fits: &[StageFit], worker_name: &str) -> Option<String> {
    let bad = fits.iter().find(|f| !f.fits)?;
    let resource = match spec.resources.backend {
        Backend::Cuda if bad.needed_bytes > bad.available_bytes => "per GPU",
        Backend::Cuda => "of host RAM for CPU offload",
        Backend::Cpu => "of host memory",
    };
    let (needed, available) =
        if spec.resources.backend == Backend::Cuda && bad.needed_bytes <= bad.available_bytes {
            (bad.host_needed_bytes, bad.host_available_bytes)
        } else {
            (bad.needed_bytes, bad.available_bytes)
        };
    let available = format!("worker {worker_name} has {:.2} GiB", gib(available));
    let batch = spec.data.batch_size.get();
    let advice = match (bad.max_batch, bad.max_micro_batch) {
        (0, _) => "not even one sequence fits: use SegProp stages with SnapCheck, activation_checkpointing, sharding over more devices, or a larger worker".to_string(),
        (b, 0) => format!("the largest data.batch_size that fits this stage is {b} (or use batch_size: auto)"),
        (b, m) => format!(
            "the largest data.batch_size that fits this stage whole is {b}; in passes it runs \
             batches of {batch} with data.micro_batch: {{ {}: {m} }} (or use micro_batch: auto, \
             or batch_size: auto)",
            bad.stage
        ),
    };
    let passes = if bad.micro_batch < batch {
        format!(" in passes of {}", bad.micro_batch)
    } else {
        String::new()
    };
    Some(format!(
        "pre-flight: stage {} needs {:.2} GiB {resource} at data.batch_size {batch}{passes} and \
         {available} ({}); {advice}",
        bad.stage,
        gib(needed),
        bad.breakdown
    ))
}

#[cfg(test)]
#[path = "preflight_tests.rs"]
mod tests;
