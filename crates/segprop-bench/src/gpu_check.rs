//! `gpu-check`: every check the GPU machine is for, in one command (build with `--features
//! nccl`, which implies `cuda`; the machine needs no Rust toolchain: carry the release binary).
//! It prints the device, then runs, in order:
//!
//! 1. NCCL on device buffers (with `nccl`): a world-size-1 communicator on `cuda:0` gathers and
//!    reduce-scatters burn-cuda tensors in place, f32 and bf16, checked against their values
//!    ([`device_buffers_check`]);
//! 2. the sharding check (issue 5, below);
//! 3. a bf16 SegProp job on a slice of LLaMA-2-70B's width, each stage's device memory against
//!    the planner ([`crate::gpu_slice::slice_stage`]);
//! 4. one 70B-width decoder block's bf16 forward + backward against PyTorch on the same GPU
//!    ([`crate::gpu_slice::block_vs_torch`]; needs `python3` with torch and
//!    `scripts/gpu_block_torch.py`, or its path in `SEGPROP_TORCH_BLOCK`).
//!
//! The sharding check: a tiny e2e job trains on `cuda:0` three times: as one plain rank, and as
//! a `full_shard` gang of one rank with activation checkpointing, once with CPU offload
//! (`offload: cpu`) and once with device-resident shards (`offload: none`: masters and moments
//! on `cuda:0`, stepped there), whose collective is a world-size-1 NCCL communicator (`ncclCommInitAll` over
//! `cuda:0`; threads over host memory when built with `cuda` alone). It prints the loss curves,
//! their worst relative difference, the rank's memory accounting and the device memory in use,
//! and fails if a gang's curve differs from the plain one by more than 1e-4 relative.

use anyhow::{Context, Result};
use segprop_core::JobSpec;
use segprop_train::Trainer;
use segprop_train::cuda::{CudaBackend, DeviceMemoryProbe, cuda_available};
use segprop_train::gang::train_gang;
use segprop_train::metrics::{RecordingObserver, TrainEvent};
use segprop_train::segprop::run_plan;
use segprop_train::sharded::RankMemory;

fn job(steps: usize, extra: &str) -> Result<JobSpec> {
    let text = format!(
        "version: 1\nname: gpu-check\n\
         model: {{ preset: tiny, overrides: {{ num_layers: 2 }} }}\n\
         data: {{ corpus: builtin:synthetic, seq_len: 64, batch_size: 2, synthetic_tokens: 40000, eval_fraction: 0.05 }}\n\
         regime: e2e\ne2e: {{ exit: {{ max_steps: {steps} }} }}\n\
         optimizer: {{ lr: 3.0e-3, grad_accum: 2, grad_clip: 0.5 }}\n\
         eval: {{ every_steps: 100000, max_batches: 1 }}\nseed: 11\n\
         resources: {{ backend: cuda, devices_per_gang: 1 }}\n{extra}\n"
    );
    JobSpec::from_yaml_str(&text, "gpu-check").context("gpu-check spec")
}

fn losses(observer: &RecordingObserver) -> Vec<f64> {
    observer
        .events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step(s) => Some(s.loss),
            _ => None,
        })
        .collect()
}

pub fn gpu_check(steps: usize) -> Result<()> {
    anyhow::ensure!(cuda_available(), "no CUDA driver on this machine");
    for d in segprop_train::cuda::devices().map_err(anyhow::Error::msg)? {
        println!(
            "device cuda:{}: {}, {:.1} GiB",
            d.ordinal,
            d.name,
            segprop_core::planner::gib(d.total_bytes)
        );
    }
    #[cfg(feature = "nccl")]
    device_buffers_check()?;
    sharding_check(steps)?;
    println!(
        "
## bf16 SegProp on a 70B-width slice (cuda:0)"
    );
    crate::gpu_slice::slice_stage(steps.min(3))?;
    println!(
        "
## one 70B-width block against PyTorch"
    );
    crate::gpu_slice::block_vs_torch(10)
}

/// A `full_shard` gang of one rank against a plain rank (issue 5).
fn sharding_check(steps: usize) -> Result<()> {
    let device = burn::backend::cuda::CudaDevice::new(0);
    let probe = DeviceMemoryProbe::new(1).map_err(anyhow::Error::msg)?;
    let in_use = || {
        probe
            .used_bytes()
            .first()
            .map_or(0.0, |(_, b)| *b as f64 / (1u64 << 20) as f64)
    };
    let dir = tempfile::tempdir()?;

    let plain = job(steps, "")?;
    let mut trainer =
        Trainer::<CudaBackend>::new(plain, device.clone(), &dir.path().join("plain"))?;
    let mut observer = RecordingObserver::default();
    run_plan(&mut trainer, &mut observer)?;
    let reference = losses(&observer);
    drop(trainer);
    println!(
        "plain rank on cuda:0: {} steps, device memory in use {:.0} MiB",
        reference.len(),
        in_use()
    );

    let collective = if cfg!(feature = "nccl") {
        "NCCL, world size 1"
    } else {
        "threads over host memory (built without `nccl`)"
    };
    for (offload, what) in [("cpu", "CPU offload"), ("none", "device-resident shards")] {
        let sharded = job(
            steps,
            &format!(
                "sharding: {{ strategy: full_shard, offload: {offload} }}\nactivation_checkpointing: true"
            ),
        )?;
        let (curve, memory): (Vec<f64>, Option<RankMemory>) = train_gang::<CudaBackend, _>(
            &sharded,
            vec![device.clone()],
            &dir.path().join(format!("sharded-{offload}")),
            |t| {
                let mut observer = RecordingObserver::default();
                run_plan(t, &mut observer)?;
                Ok((losses(&observer), t.progress.records[0].sharding))
            },
            |_| Ok(()),
        )?;
        println!(
            "\nfull_shard gang of 1 rank on cuda:0 ({collective}), {what} (offload: {offload}), AC: \
             device memory in use {:.0} MiB",
            in_use()
        );
        println!();
        println!("| step | plain loss | sharded loss | relative difference |");
        println!("|---:|---:|---:|---:|");
        let mut worst = 0.0f64;
        for (i, (a, b)) in reference.iter().zip(&curve).enumerate() {
            let rel = (a - b).abs() / a.abs();
            worst = worst.max(rel);
            println!("| {} | {a:.6} | {b:.6} | {rel:.2e} |", i + 1);
        }
        if let Some(m) = memory {
            println!();
            println!("rank memory: {m:?}");
            anyhow::ensure!(
                m.shards_on_device == (offload == "none"),
                "offload: {offload}: shards_on_device is {}",
                m.shards_on_device
            );
        }
        anyhow::ensure!(
            reference.len() == curve.len() && !curve.is_empty(),
            "the runs made {} and {} steps",
            reference.len(),
            curve.len()
        );
        anyhow::ensure!(
            worst < 1e-4,
            "offload: {offload}: the sharded curve differs from the plain one by {worst:.2e} \
             relative (limit 1e-4)"
        );
        println!("\nworst relative difference {worst:.2e}: {what} on the GPU match the plain rank");
    }
    Ok(())
}

/// NCCL at world size 1 on burn-cuda tensors' own device buffers (no host staging): the unit
/// all-gather (f32, and bf16 rounded on the device) and the gradient reduce-scatter through a
/// rank's communication thread, exactly as `offload: none` gangs call them.
#[cfg(feature = "nccl")]
fn device_buffers_check() -> Result<()> {
    use burn::tensor::{FloatDType, Tensor, TensorData};
    use segprop_shard::device::{all_gather_tensor, reduce_scatter_tensor};
    use segprop_shard::{Collective, CommStream, Flat, Op, ShardLayout};
    type Cuda = burn::backend::Cuda;

    println!("\n## NCCL on device buffers (cuda:0, world size 1)");
    let device = burn::backend::cuda::CudaDevice::new(0);
    let deadline = std::time::Duration::from_secs(60);
    let rank = segprop_shard::nccl::NcclCollective::group(&[0], deadline)?
        .pop()
        .context("one rank")?;
    let stream = CommStream::new(Box::new(rank))?;
    anyhow::ensure!(
        stream.is_direct(),
        "the NCCL rank does not take device buffers"
    );
    // A unit of 5 million weights (a 20 MB chunk), values with low bits set.
    let n = 5_000_000;
    let values: Vec<f32> = (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
        .collect();
    let layout = ShardLayout::new(n, 1);
    let host = |t: Tensor<Cuda, 1>| -> Result<Vec<f32>> {
        t.into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))
    };
    let tensor = || Tensor::<Cuda, 1>::from_data(TensorData::new(values.clone(), [n]), &device);
    for compute in [None, Some(FloatDType::BF16)] {
        let started = std::time::Instant::now();
        let Flat::Device(full) = all_gather_tensor(&stream, layout, tensor(), compute).wait()?
        else {
            anyhow::bail!("a device gather came back in host memory");
        };
        let elapsed = started.elapsed();
        let got = host(full.clone())?;
        let want: Vec<f32> = match compute {
            Some(half) => host(tensor().cast(half))?,
            None => values.clone(),
        };
        anyhow::ensure!(
            got[..n] == want[..],
            "all-gather ({compute:?}) changed the values"
        );
        println!(
            "all_gather {} of {n} weights on device buffers: {:.2} ms, values exact",
            compute.map_or("f32".to_string(), |c| format!("{c:?}")),
            elapsed.as_secs_f64() * 1e3
        );
    }
    let started = std::time::Instant::now();
    let Flat::Device(chunk) = reduce_scatter_tensor(&stream, layout, tensor()).wait()? else {
        anyhow::bail!("a device reduce-scatter came back in host memory");
    };
    let elapsed = started.elapsed();
    anyhow::ensure!(
        host(chunk)? == values,
        "reduce-scatter at world size 1 changed the values"
    );
    println!(
        "reduce_scatter f32 of {n} weights on device buffers: {:.2} ms, values exact",
        elapsed.as_secs_f64() * 1e3
    );
    let stats = stream.stats();
    anyhow::ensure!(
        stats.calls(Op::AllGather) == 2 && stats.calls(Op::ReduceScatter) == 1,
        "the calls did not reach NCCL: {stats:?}"
    );
    Ok(())
}
