//! `throughput`: training tokens/s and achieved GFLOP/s on the CPU (or `cuda:0`), with the
//! machine's matmul rate measured in the same run; `--peers` runs PyTorch
//! (`scripts/cpu_step_torch.py`: transformers' `LlamaForCausalLM`, SDPA attention, AdamW) on the
//! reference shape in rounds between segprop's own, so both see the same machine.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::backend::{Flex, NdArray};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use segprop_train::Trainer;
use segprop_train::route::Route;

use crate::{flops_per_token, median, spec, time_steps, tokens_per_step};

/// The reference training step of the CPU-speed work: a LLaMA of hidden 256, 8 blocks, 8 heads /
/// 2 KV heads, SwiGLU 688, vocabulary 512, batch 16 x seq 128, AdamW, e2e.
pub const REFERENCE_MODEL: &str = "{ preset: tiny, overrides: { hidden_size: 256, intermediate_size: 688, num_layers: 8, num_heads: 8, num_kv_heads: 2, vocab_size: 512 } }";
pub const REFERENCE_DATA: &str =
    "{ corpus: builtin:synthetic, seq_len: 128, batch_size: 16, synthetic_tokens: 80000 }";

/// Square matmul GFLOP/s of both CPU backends (median of 5); returns the training backend's
/// (flex, `segprop_train::CpuBackend`).
pub fn matmul() -> Result<Vec<(usize, f64)>> {
    let flex = matmul_rate::<Flex>(&Default::default());
    let ndarray = matmul_rate::<NdArray>(&Default::default());
    println!("## Square matmul rate");
    println!("| n | flex GFLOP/s | ndarray GFLOP/s |");
    println!("|---:|---:|---:|");
    for ((n, f), (_, nd)) in flex.iter().zip(&ndarray) {
        println!("| {n} | {f:.1} | {nd:.1} |");
    }
    Ok(flex)
}

pub fn matmul_rate<Bk: Backend>(device: &Bk::Device) -> Vec<(usize, f64)> {
    let mut out = Vec::new();
    for n in [512usize, 1024] {
        let a = Tensor::<Bk, 2>::random([n, n], burn::tensor::Distribution::Default, device);
        let b = Tensor::<Bk, 2>::random([n, n], burn::tensor::Distribution::Default, device);
        let _ = a.clone().matmul(b.clone()).into_data();
        let times: Vec<f64> = (0..5)
            .map(|_| {
                let start = Instant::now();
                let _ = a.clone().matmul(b.clone()).into_data();
                start.elapsed().as_secs_f64()
            })
            .collect();
        out.push((n, 2.0 * (n as f64).powi(3) / median(&times) / 1e9));
    }
    out
}

pub fn throughput<B: AutodiffBackend>(
    steps: usize,
    device: &B::Device,
    label: &str,
    peers: bool,
    only: Option<&str>,
) -> Result<()> {
    if let Some(name) = only.filter(|n| !["reference", "tiny", "small"].contains(n)) {
        bail!("--only {name}: expected reference, tiny or small");
    }
    let peak = match label {
        "cpu" => matmul()?.iter().map(|r| r.1).fold(0.0, f64::max),
        _ => matmul_rate::<B::InnerBackend>(device)
            .iter()
            .map(|r| r.1)
            .fold(0.0, f64::max),
    };
    println!("## Training throughput (e2e steps, {label} backend; matmul rate {peak:.1} GFLOP/s)");
    println!("(reference: hidden 256, 8 blocks, 8 / 2 KV heads, SwiGLU 688, vocabulary 512)");
    println!("| model | batch x seq | tok/s | achieved GFLOP/s | of matmul rate |");
    println!("|---|---|---:|---:|---:|");
    for (name, model, data) in [
        ("reference", REFERENCE_MODEL, REFERENCE_DATA),
        (
            "tiny",
            "{ preset: tiny }",
            "{ corpus: builtin:synthetic, seq_len: 128, batch_size: 16, synthetic_tokens: 80000 }",
        ),
        (
            "small",
            "{ preset: small }",
            "{ corpus: builtin:synthetic, tokenizer: gpt2, seq_len: 128, batch_size: 4, synthetic_tokens: 80000 }",
        ),
    ] {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let dir = tempfile::tempdir()?;
        let mut t = Trainer::<B>::new(
            spec(model, data, "regime: e2e")?,
            device.clone(),
            dir.path(),
        )?;
        let route = Route::Full {
            num_layers: t.config.num_layers,
        };
        let n = if name == "small" { steps.min(4) } else { steps };
        let secs = time_steps(&mut t, route, 2, n);
        let tok_s = tokens_per_step(&t) / secs;
        let gflops = tok_s * flops_per_token(&t.config, t.spec.data.seq_len) / 1e9;
        println!(
            "| {name} ({:.1}M params) | {} x {} | {tok_s:.0} | {gflops:.1} | {:.0}% |",
            t.config.num_params() as f64 / 1e6,
            t.spec.data.batch_size.get(),
            t.spec.data.seq_len,
            100.0 * gflops / peak
        );
    }
    if only.is_none_or(|o| o == "reference") {
        segment_against_e2e::<B>(steps, device)?;
    }
    if peers {
        against_pytorch::<B>(steps, device)?;
    }
    Ok(())
}

/// A SegProp stage-2 step with SnapCheck against an e2e step of the reference shape, steps
/// interleaved: the segment `[4, 6)` of the 8 blocks with the head's last 2 (r = 2, k = 2), which
/// launches a fraction of e2e's matmul FLOPs (the planner's count, exact on CPU:
/// docs/planner.md). A stage-2 step should cost no more than that fraction of an e2e step.
fn segment_against_e2e<B: AutodiffBackend>(steps: usize, device: &B::Device) -> Result<()> {
    use segprop_core::StageKind;
    use segprop_core::planner::{self, AttentionKernel};

    let (p, r, k) = (4, 2, 2);
    let dir = tempfile::tempdir()?;
    let mut e2e = Trainer::<B>::new(
        spec(REFERENCE_MODEL, REFERENCE_DATA, "regime: e2e")?,
        device.clone(),
        dir.path(),
    )?;
    let regime = format!(
        "regime: segprop\nsegprop: {{ base_depth: {p}, head_layers: {r}, segment_size: {k}, snapcheck: true }}"
    );
    let mut segment = Trainer::<B>::new(
        spec(REFERENCE_MODEL, REFERENCE_DATA, &regime)?,
        device.clone(),
        dir.path(),
    )?;
    let n = e2e.config.num_layers;
    let full = Route::Full { num_layers: n };
    let route = segment.route(&crate::entry(StageKind::Segment {
        start: n - r - k,
        end: n - r,
    }));
    // Warmup covers the 4 batches once, so SnapCheck's cache is filled before timing.
    let times = crate::time_interleaved(&mut [(&mut e2e, full), (&mut segment, route)], 4, steps);
    let workloads = planner::comparison(n, p, r, k);
    let flops = |w: &planner::Workload| {
        let (f, b, re) = planner::step_flops_per_token(
            &segment.config,
            w,
            segment.spec.data.seq_len,
            AttentionKernel::DenseMasked,
        );
        f + b + re
    };
    let (time_ratio, flops_ratio) = (
        times[1] / times[0],
        flops(&workloads[4]) / flops(&workloads[0]),
    );
    println!(
        "## SegProp stage 2 (segment [{}, {}), r = {r}, SnapCheck) against e2e, reference shape, steps interleaved",
        n - r - k,
        n - r
    );
    println!("| e2e ms | stage-2 ms | time ratio | matmul FLOPs ratio | time / FLOPs ratio |");
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {:.1} | {:.1} | {time_ratio:.3} | {flops_ratio:.3} | {:.2} |",
        times[0] * 1e3,
        times[1] * 1e3,
        time_ratio / flops_ratio
    );
    Ok(())
}

/// The reference step on segprop and on PyTorch, three rounds of each in turn.
fn against_pytorch<B: AutodiffBackend>(steps: usize, device: &B::Device) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = spec(REFERENCE_MODEL, REFERENCE_DATA, "regime: e2e")?;
    let mut t = Trainer::<B>::new(s, device.clone(), dir.path())?;
    let route = Route::Full {
        num_layers: t.config.num_layers,
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_round = steps.div_ceil(3).max(2);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut version = String::new();
    for _ in 0..3 {
        ours.push(time_steps(&mut t, route, 1, per_round));
        let (secs, v) = pytorch_round(per_round, threads)?;
        theirs.push(secs);
        version = v;
    }
    let tok = tokens_per_step(&t);
    let (ours, theirs) = (median(&ours), median(&theirs));
    println!(
        "## The reference step against PyTorch {version} (eager, SDPA, {threads} threads), \
         3 rounds of {per_round} steps each in turn"
    );
    println!("| engine | tok/s | segprop / PyTorch |");
    println!("|---|---:|---:|");
    println!("| segprop | {:.0} | {:.2} |", tok / ours, theirs / ours);
    println!("| PyTorch | {:.0} | 1.00 |", tok / theirs);
    Ok(())
}

/// One round of `scripts/cpu_step_torch.py` (run from the repository root): the median seconds
/// of its timed steps and torch's version.
fn pytorch_round(steps: usize, threads: usize) -> Result<(f64, String)> {
    let script = std::path::Path::new("scripts/cpu_step_torch.py");
    if !script.exists() {
        bail!(
            "{} not found: run `throughput --peers` from the repository root",
            script.display()
        );
    }
    let out = Command::new("python3")
        .arg(script)
        .args(["--steps", &steps.to_string(), "--warmup", "1"])
        .args(["--threads", &threads.to_string()])
        .output()
        .context(
            "running python3 (the PyTorch reference needs python3 with torch and transformers)",
        )?;
    if !out.status.success() {
        bail!(
            "{} failed (it needs the PyPI packages torch and transformers): {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{} printed no JSON", script.display()))?;
    let times: Vec<f64> = report["step_s"]
        .as_array()
        .context("step_s")?
        .iter()
        .filter_map(|v| v.as_f64())
        .collect();
    Ok((
        median(&times),
        report["torch"].as_str().unwrap_or("?").to_string(),
    ))
}
