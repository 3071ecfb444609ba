//! The submit-time pre-flight check (issue 6): does every stage of a job fit the memory of the
//! worker that would run it? The coordinator refuses a job that does not, with the breakdown of
//! the stage that fails, instead of letting it run out of memory hours in.
//!
//! - CUDA workers: the GPU plan of each stage (per-GPU memory against the device, host memory for
//!   CPU offload against the host).
//! - CPU workers: the CPU engine model ([`super::cpu_step`], validated against measurement) plus
//!   the in-memory SnapCheck budget, against the host. A CPU gang runs its ranks as threads of
//!   one process and every rank holds the whole model today, so a sharded CPU stage counts one
//!   step per rank (an upper bound).

use serde::{Deserialize, Serialize};

use super::{Cluster, CpuProfile, Workload, cpu_step, gib, largest_fitting, plan};
use crate::llama_config::LlamaConfig;
use crate::plan::{StageKind, StagePlan};
use crate::spec::{Backend, BatchSize, JobSpec, Offload, Precision, Regime};

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
    /// The largest micro-batch that fits this stage on this worker (0: none).
    pub max_micro_batch: usize,
}

/// The workload of one stage of `spec` (model of `num_layers` blocks).
pub fn stage_workload(spec: &JobSpec, kind: &StageKind, num_layers: usize) -> Workload {
    let offload = spec.sharding.offload == Offload::Cpu;
    let ac = spec.activation_checkpointing;
    let r = spec.segprop.head_layers;
    let base = |name: String, trained_blocks, trained_embedding, frozen_blocks| Workload {
        name,
        trained_blocks,
        trained_embedding,
        frozen_blocks,
        frozen_embedding: frozen_blocks > 0,
        offload,
        activation_checkpointing: ac,
    };
    match *kind {
        StageKind::E2e => base("e2e".into(), num_layers, true, 0),
        StageKind::Stage1 { base_depth } => base("stage1".into(), base_depth + r, true, 0),
        StageKind::Segment { start, end } => {
            let snapcheck = spec.regime == Regime::Segprop && spec.segprop.snapcheck;
            let frozen = if snapcheck { 0 } else { start };
            base(
                format!("segment-{start}-{end}"),
                end - start + r,
                false,
                frozen,
            )
        }
        // A layer-wise block trains itself and a local head; its prefix runs forward-only.
        StageKind::LwBlock { block } => base(format!("lw-block-{block}"), 1, block == 0, block),
    }
}

/// Tokens of the job's corpus: the synthetic corpus's size, or the text file's bytes (the
/// byte tokenizer's count; an upper bound for BPE), capped by `data.max_tokens`.
fn corpus_tokens(spec: &JobSpec) -> Option<u64> {
    let tokens = if spec.data.corpus == "builtin:synthetic" {
        spec.data.synthetic_tokens as u64
    } else {
        std::fs::metadata(&spec.data.corpus).ok()?.len()
    };
    Some(match spec.data.max_tokens {
        0 => tokens,
        max => tokens.min(max as u64),
    })
}

/// The largest micro-batch the corpus allows: both the train and the eval split must hold one
/// batch of sequences (None: the corpus size is unknown). Counts tokens as the byte tokenizer
/// does; with BPE the corpus has fewer tokens than bytes and the engine reports a batch too
/// large for it.
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

/// What `w` needs at micro-batch `b` on `worker`, with `snapshots` bytes of SnapCheck cache in
/// memory (CPU): (fits, needed, available, host needed, breakdown).
fn need(
    spec: &JobSpec,
    config: &LlamaConfig,
    worker: &WorkerMemory,
    w: &Workload,
    b: usize,
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
                b,
                s,
                spec.resources.precision == Precision::Bf16,
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
        Backend::Cpu => {
            let step = cpu_step(config, &CpuProfile::NDARRAY_F32, w, b, s);
            let snapcheck = snapshots;
            let needed = ranks * step.peak() + snapcheck;
            let breakdown = format!(
                "{}weights {:.2} GiB, optimizer {:.2} GiB, activations {:.2} GiB, logits {:.2} GiB, \
                 gradients at the peak {:.2} GiB; SnapCheck snapshots in memory {:.2} GiB",
                if ranks > 1 {
                    format!("{ranks} ranks x (")
                } else {
                    String::new()
                },
                gib(step.weights),
                gib(step.optimizer),
                gib(step.activations),
                gib(step.logits),
                gib(if step.update_peak() > step.backward_peak() {
                    step.gradients + step.update_transient
                } else {
                    step.live_gradients
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

/// Checks every training stage of `plan` at `micro_batch` (the spec's `data.batch_size`, or a
/// candidate for `auto`).
pub fn check(
    spec: &JobSpec,
    config: &LlamaConfig,
    stages: &StagePlan,
    worker: &WorkerMemory,
    micro_batch: usize,
) -> Vec<StageFit> {
    let snapshots = match spec.resources.backend {
        Backend::Cpu if spec.regime == Regime::Segprop && spec.segprop.snapcheck => {
            snapshot_memory(spec, config)
        }
        _ => 0,
    };
    stages
        .stages
        .iter()
        .map(|entry| {
            let w = stage_workload(spec, &entry.kind, config.num_layers);
            let (fits, needed, available, host, breakdown) =
                need(spec, config, worker, &w, micro_batch, snapshots);
            let max_micro_batch =
                largest_fitting(|b| need(spec, config, worker, &w, b, snapshots).0, 4096);
            StageFit {
                stage: entry.name.clone(),
                fits,
                needed_bytes: needed,
                available_bytes: available,
                host_needed_bytes: host,
                host_available_bytes: worker.host_bytes,
                breakdown,
                max_micro_batch,
            }
        })
        .collect()
}

/// Resolves `data.batch_size: auto` in `spec` to the largest micro-batch every training stage
/// fits on `worker` (and the corpus allows). Returns what was decided, for the job's record;
/// `Err` with the refusal when not even one sequence fits.
pub fn resolve_auto(
    spec: &mut JobSpec,
    config: &LlamaConfig,
    stages: &StagePlan,
    worker: &WorkerMemory,
    worker_name: &str,
) -> Result<String, String> {
    let fits = check(spec, config, stages, worker, 1);
    let per_stage: Vec<String> = fits
        .iter()
        .map(|f| format!("{} {}", f.stage, f.max_micro_batch))
        .collect();
    let memory_max = fits.iter().map(|f| f.max_micro_batch).min().unwrap_or(0);
    if memory_max == 0 {
        spec.data.batch_size = BatchSize::Fixed(1);
        return Err(refusal(spec, &fits, worker_name).unwrap_or_default());
    }
    let cap = data_batch_cap(spec);
    let batch = cap.map_or(memory_max, |c| memory_max.min(c.max(1)));
    spec.data.batch_size = BatchSize::Fixed(batch);
    Ok(format!(
        "data.batch_size: auto -> {batch} on worker {worker_name} (largest per stage: {}{})",
        per_stage.join(", "),
        match cap {
            Some(c) if c < memory_max => format!("; the corpus allows {c}"),
            _ => String::new(),
        }
    ))
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
    let advice = match bad.max_micro_batch {
        0 => "not even one sequence fits: use SegProp stages with SnapCheck, activation_checkpointing, sharding over more devices, or a larger worker".to_string(),
        n => format!("the largest data.batch_size that fits this stage is {n} (or use batch_size: auto)"),
    };
    Some(format!(
        "pre-flight: stage {} needs {:.2} GiB {resource} at data.batch_size {} and {available} ({}); {advice}",
        bad.stage,
        gib(needed),
        spec.data.batch_size.get(),
        bad.breakdown
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> JobSpec {
        JobSpec::from_yaml_str(text, "test").expect("spec")
    }

    const SEGPROP: &str = "version: 1\nname: t\nmodel: { preset: small }\n\
        data: { corpus: builtin:synthetic, seq_len: 128, batch_size: 4 }\nregime: segprop\n\
        segprop: { base_depth: 2, head_layers: 2, segment_size: 2 }\noptimizer: { lr: 1.0e-3 }\n";

    #[test]
    fn a_small_host_refuses_with_the_stage_and_the_breakdown() {
        let s = spec(SEGPROP);
        let config = s.resolve_model_config().expect("config");
        let stages = StagePlan::new(&s, config.num_layers);
        let worker = WorkerMemory {
            device_bytes: 1 << 30,
            host_bytes: 1 << 30,
        };
        let fits = check(&s, &config, &stages, &worker, 4);
        // 110M parameters: 12 bytes each of weights and moments exceed 1 GiB in stage 1.
        assert!(!fits[0].fits);
        let message = refusal(&s, &fits, "w1").expect("refused");
        assert!(message.contains("stage stage1"), "{message}");
        assert!(message.contains("worker w1 has 1.00 GiB"), "{message}");
        assert!(message.contains("weights"), "{message}");
        let big = WorkerMemory {
            device_bytes: 64 << 30,
            host_bytes: 64 << 30,
        };
        let fits = check(&s, &config, &stages, &big, 4);
        assert!(fits.iter().all(|f| f.fits));
        assert!(refusal(&s, &fits, "w1").is_none());
        // Segments hold less than stage 1: they fit larger batches.
        assert!(fits[1].max_micro_batch >= fits[0].max_micro_batch);
    }

    #[test]
    fn auto_takes_the_smallest_stage_maximum_and_the_corpus_cap() {
        let mut s = spec(&SEGPROP.replace("batch_size: 4", "batch_size: auto"));
        assert_eq!(s.data.batch_size, BatchSize::Auto);
        let config = s.resolve_model_config().expect("config");
        let stages = StagePlan::new(&s, config.num_layers);
        let worker = WorkerMemory {
            device_bytes: 8 << 30,
            host_bytes: 8 << 30,
        };
        let note = resolve_auto(&mut s, &config, &stages, &worker, "w1").expect("fits");
        let BatchSize::Fixed(b) = s.data.batch_size else {
            panic!("unresolved")
        };
        let fits = check(&s, &config, &stages, &worker, b);
        assert!(fits.iter().all(|f| f.fits), "{note}");
        let smallest = fits
            .iter()
            .map(|f| f.max_micro_batch)
            .min()
            .expect("stages");
        let cap = data_batch_cap(&s).expect("synthetic corpus");
        assert_eq!(b, smallest.min(cap), "{note}");
        assert!(
            note.contains("auto -> ") && note.contains("stage1"),
            "{note}"
        );
        let tiny = WorkerMemory {
            device_bytes: 1 << 28,
            host_bytes: 1 << 28,
        };
        let mut s = spec(&SEGPROP.replace("batch_size: 4", "batch_size: auto"));
        let err = resolve_auto(&mut s, &config, &stages, &tiny, "w1").unwrap_err();
        assert!(err.contains("not even one sequence fits"), "{err}");
    }

    #[test]
    fn offload_on_cuda_is_refused_for_host_ram() {
        let s = spec(
            "version: 1\nname: t\nmodel: { preset: llama3-70b }\n\
             data: { corpus: builtin:synthetic, seq_len: 2048, batch_size: 1 }\nregime: e2e\n\
             optimizer: { lr: 1.0e-4, grad_accum: 8 }\nresources: { backend: cuda, devices_per_gang: 8 }\n\
             sharding: { strategy: full_shard, offload: cpu }\nactivation_checkpointing: true\n\
             e2e: { exit: { max_steps: 10 } }\n",
        );
        let config = s.resolve_model_config().expect("config");
        let stages = StagePlan::new(&s, config.num_layers);
        let worker = WorkerMemory {
            device_bytes: 80 << 30,
            host_bytes: 512 << 30,
        };
        let fits = check(&s, &config, &stages, &worker, 1);
        let message = refusal(&s, &fits, "gpu-node-1").expect("refused");
        assert!(message.contains("host RAM for CPU offload"), "{message}");
    }
}
