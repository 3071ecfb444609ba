//! The 70B-width part of `gpu-check` (issue 18), for the first session with a GPU:
//!
//! - a bf16 SegProp job on `cuda:0` over a slice of LLaMA-2-70B's width (hidden 8192, MLP 28672,
//!   64 heads / 8 KV heads, vocabulary 32000; 3 blocks: p = 1, r = 1, one segment), each stage's
//!   device memory in use (sampled at every step; burn's pool keeps its high-water mark) against
//!   the planner's prediction for that stage on one GPU;
//! - one decoder block of that width, forward + backward in bf16, timed against the same block in
//!   PyTorch on the same GPU (`scripts/gpu_block_torch.py`, run with the machine's `python3`), as
//!   a ratio.
//!
//! Nothing here is asserted against the planner: the numbers are printed for docs/benchmarks.md,
//! with the planner's terms beside them (the planner assumes flash attention; the engine's
//! attention is eager).

use std::time::Instant;

use anyhow::{Context, Result};
use burn::prelude::*;
use burn::tensor::DType;
use segprop_core::JobSpec;
use segprop_core::planner::{Cluster, gib, plan, preflight::stage_workload};
use segprop_model::{BlockConfig, RopeTables};
use segprop_train::Trainer;
use segprop_train::cuda::{CudaBackend, DeviceMemoryProbe, devices};
use segprop_train::metrics::{TrainEvent, TrainObserver};
use segprop_train::precision::set_layout;
use segprop_train::segprop::run_plan;

const SEQ: usize = 512;

fn slice_job(steps: usize) -> Result<JobSpec> {
    let text = format!(
        "version: 1\nname: gpu-check-70b-slice\n\
         model: {{ preset: llama2-70b, overrides: {{ num_layers: 3 }} }}\n\
         data: {{ corpus: builtin:synthetic, seq_len: {SEQ}, batch_size: 1, synthetic_tokens: 40000, eval_fraction: 0.05 }}\n\
         regime: segprop\n\
         segprop: {{ base_depth: 1, head_layers: 1, segment_size: 1, snapcheck: true, \
         exit: {{ stage1: {{ max_steps: {steps} }}, segment: {{ max_steps: {steps} }} }} }}\n\
         optimizer: {{ lr: 1.0e-4, grad_clip: 1.0 }}\n\
         eval: {{ every_steps: 100000, max_batches: 1 }}\nseed: 5\n\
         resources: {{ backend: cuda, precision: bf16 }}\n"
    );
    JobSpec::from_yaml_str(&text, "gpu-check-70b-slice").context("70B slice spec")
}

/// The most device memory seen in use at any step of each stage.
struct PeakPerStage<'a> {
    probe: &'a DeviceMemoryProbe,
    peaks: Vec<(String, u64)>,
}

impl TrainObserver for PeakPerStage<'_> {
    fn on_event(&mut self, event: &TrainEvent) {
        let used = self.probe.used_bytes().first().map_or(0, |(_, b)| *b);
        match event {
            TrainEvent::StageStarted { stage, .. } => self.peaks.push((stage.clone(), used)),
            TrainEvent::Step(_) | TrainEvent::StageFinished(_) => {
                if let Some((_, peak)) = self.peaks.last_mut() {
                    *peak = (*peak).max(used);
                }
            }
            _ => {}
        }
    }
}

pub fn slice_stage(steps: usize) -> Result<()> {
    let device = burn::backend::cuda::CudaDevice::new(0);
    let info = devices().map_err(anyhow::Error::msg)?;
    let gpu = info.first().context("no CUDA device")?;
    let probe = DeviceMemoryProbe::new(1).map_err(anyhow::Error::msg)?;
    let spec = slice_job(steps)?;
    let config = spec.resolve_model_config()?;
    let dir = tempfile::tempdir()?;
    let before = probe.used_bytes().first().map_or(0, |(_, b)| *b);
    let started = Instant::now();
    let mut trainer = Trainer::<CudaBackend>::new(spec.clone(), device, dir.path())?;
    println!(
        "70B-width slice ({} parameters) built on {} in {:.1} s",
        config.num_params(),
        gpu.name,
        started.elapsed().as_secs_f64()
    );
    let mut observer = PeakPerStage {
        probe: &probe,
        peaks: Vec::new(),
    };
    run_plan(&mut trainer, &mut observer)?;
    let cluster = Cluster {
        gpus: 1,
        gpu_mem_bytes: gpu.total_bytes,
        ..Cluster::a100_40g_x8()
    };
    println!();
    println!(
        "| stage | device memory in use (GiB, peak over steps) | planner GPU total + held (GiB) | measured / planner | planner terms (GiB) |"
    );
    println!("|---|---:|---:|---:|---|");
    for ((name, peak), entry) in observer.peaks.iter().zip(&trainer.plan.stages) {
        let w = stage_workload(&spec, &entry.kind, config.num_layers);
        let p = plan(&config, &cluster, &w, 1, SEQ, true);
        let m = p.memory;
        // Unsharded, the engine keeps held weights on the device (the planner parks them on the
        // host of a sharded gang): they count here.
        let predicted = m.gpu_total() + m.host;
        let measured = peak.saturating_sub(before);
        println!(
            "| {name} | {:.2} | {:.2} | {:.3} | state {:.2}, frozen {:.2}, held {:.2}, gathered {:.2}, activations {:.2}, logits {:.2}, workspace {:.2} |",
            gib(measured),
            gib(predicted),
            measured as f64 / predicted as f64,
            gib(m.sharded_state),
            gib(m.frozen_weights),
            gib(m.host),
            gib(m.gathered),
            gib(m.activations),
            gib(m.logits),
            gib(m.workspace),
        );
    }
    Ok(())
}

/// One block of the slice's width, forward + backward in bf16: median milliseconds over `iters`.
fn burn_block_ms(iters: usize) -> Result<f64> {
    let device = burn::backend::cuda::CudaDevice::new(0);
    let config = segprop_core::LlamaConfig::preset("llama2-70b").context("preset")?;
    let block = BlockConfig::from_llama(&config).init::<CudaBackend>(&device);
    // Every weight in bf16, trained in bf16 directly, as the PyTorch block is.
    let block = set_layout(block, &[], DType::BF16);
    let rope = RopeTables::<CudaBackend>::new(&config, SEQ * 4, &device).cast(DType::BF16);
    let x = Tensor::<CudaBackend, 3>::random(
        [1, SEQ * 4, config.hidden_size],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    )
    .cast(burn::tensor::FloatDType::BF16)
    .require_grad();
    let mut times = Vec::new();
    for i in 0..iters + 3 {
        <CudaBackend as Backend>::sync(&device)?;
        let start = Instant::now();
        let y = block.forward(x.clone(), &rope);
        let _grads = y.sum().backward();
        <CudaBackend as Backend>::sync(&device)?;
        if i >= 3 {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(crate::median(&times))
}

pub fn block_vs_torch(iters: usize) -> Result<()> {
    let ours = burn_block_ms(iters)?;
    println!();
    println!(
        "one llama2-70b block, batch 1 x {}, bf16, forward + backward: segprop (burn-cuda) {ours:.2} ms",
        SEQ * 4
    );
    let script = std::env::var("SEGPROP_TORCH_BLOCK")
        .unwrap_or_else(|_| "scripts/gpu_block_torch.py".into());
    let out = std::process::Command::new("python3")
        .arg(&script)
        .args([
            "--seq",
            &(SEQ * 4).to_string(),
            "--iters",
            &iters.to_string(),
        ])
        .output()
        .with_context(|| format!("cannot run python3 {script}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("the torch script prints one JSON object")?;
    let torch = report["median_ms"].as_f64().context("median_ms")?;
    println!(
        "PyTorch {} on {}: {torch:.2} ms; segprop / PyTorch = {:.2}",
        report["torch"],
        report["device"],
        ours / torch
    );
    Ok(())
}
