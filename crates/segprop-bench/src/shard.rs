//! `shard`: the cost of sharding on CPU ranks. The same e2e job (same global batch, same loss
//! curve) runs unsharded, with activation checkpointing on one rank, and `full_shard` on 2 and 4
//! thread ranks (with and without activation checkpointing, with and without prefetch of the
//! next unit's all-gather); variants run round-robin for
//! `reps` rounds so machine drift hits them alike. Reported: the median step time and its ratio
//! to unsharded, and the wire bytes each rank moved per step against the FSDP schedule's
//! `3 x unit x (N-1)/N`.

use anyhow::{Context, Result};
use segprop_core::JobSpec;
use segprop_train::gang::{gang_size, train_gang};
use segprop_train::metrics::{TrainEvent, TrainObserver};
use segprop_train::segprop::run_plan;
use segprop_train::sharded::RankMemory;
use segprop_train::{CpuBackend, Trainer};

use crate::median;

struct Variant {
    name: &'static str,
    yaml: &'static str,
}

const VARIANTS: [Variant; 7] = [
    Variant {
        name: "unsharded",
        yaml: "",
    },
    Variant {
        name: "1 rank, AC",
        yaml: "activation_checkpointing: true",
    },
    Variant {
        name: "2 ranks, AC",
        yaml: "sharding: { strategy: full_shard, offload: cpu }\nactivation_checkpointing: true\nresources: { devices_per_gang: 2 }",
    },
    Variant {
        name: "2 ranks, no AC",
        yaml: "sharding: { strategy: full_shard, offload: cpu }\nresources: { devices_per_gang: 2 }",
    },
    Variant {
        name: "4 ranks, AC",
        yaml: "sharding: { strategy: full_shard, offload: cpu }\nactivation_checkpointing: true\nresources: { devices_per_gang: 4 }",
    },
    Variant {
        name: "2 ranks, AC, no prefetch",
        yaml: "sharding: { strategy: full_shard, offload: cpu, prefetch: false }\nactivation_checkpointing: true\nresources: { devices_per_gang: 2 }",
    },
    Variant {
        name: "4 ranks, AC, no prefetch",
        yaml: "sharding: { strategy: full_shard, offload: cpu, prefetch: false }\nactivation_checkpointing: true\nresources: { devices_per_gang: 4 }",
    },
];

fn spec(steps: usize, extra: &str) -> Result<JobSpec> {
    let text = format!(
        "version: 1\nname: shard-bench\n\
         model: {{ preset: tiny, overrides: {{ hidden_size: 256, intermediate_size: 688, num_layers: 4, num_heads: 4, num_kv_heads: 2 }} }}\n\
         data: {{ corpus: builtin:synthetic, seq_len: 128, batch_size: 2, synthetic_tokens: 200000, eval_fraction: 0.01 }}\n\
         regime: e2e\ne2e: {{ exit: {{ max_steps: {steps} }} }}\n\
         optimizer: {{ lr: 1.0e-3, grad_accum: 4, grad_clip: 1.0 }}\n\
         eval: {{ every_steps: 100000, max_batches: 1 }}\nseed: 3\n{extra}\n"
    );
    JobSpec::from_yaml_str(&text, "shard-bench").context("shard bench spec")
}

/// CPU seconds this process has used, every thread (user + system; `/proc/self/stat`).
fn process_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces): utime is the 12th, stime 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Step times from the step events, and the process CPU time at each.
#[derive(Default)]
struct Steps {
    wall: Vec<f64>,
    cpu_at: Vec<f64>,
    tokens: f64,
}

impl TrainObserver for Steps {
    fn on_event(&mut self, event: &TrainEvent) {
        if let TrainEvent::Step(s) = event {
            self.wall.push(self.tokens / s.tokens_per_s);
            self.cpu_at.push(process_cpu_s());
        }
    }
}

/// One run: per-step wall seconds (rank 0's), CPU seconds per step over every rank (after
/// `warmup` steps), and the stage's per-rank memory.
fn run_once(spec: &JobSpec, warmup: usize) -> Result<(Vec<f64>, f64, Option<RankMemory>)> {
    let dir = tempfile::tempdir()?;
    let tokens =
        (spec.optimizer.grad_accum * spec.data.batch_size.get() * spec.data.seq_len) as f64;
    let collect = |t: &mut Trainer<CpuBackend>| -> Result<_, segprop_train::TrainError> {
        let mut obs = Steps {
            tokens,
            ..Steps::default()
        };
        run_plan(t, &mut obs)?;
        let n = obs.cpu_at.len();
        let cpu = (obs.cpu_at[n - 1] - obs.cpu_at[warmup - 1]) / (n - warmup) as f64;
        Ok((obs.wall, cpu, t.progress.records[0].sharding))
    };
    let out = match gang_size(spec) {
        None => collect(&mut Trainer::<CpuBackend>::new(
            spec.clone(),
            Default::default(),
            dir.path(),
        )?)?,
        Some(world) => train_gang::<CpuBackend, _>(
            spec,
            vec![Default::default(); world],
            dir.path(),
            collect,
            |t| {
                run_plan(t, &mut segprop_train::metrics::NullObserver)?;
                Ok(())
            },
        )?,
    };
    Ok(out)
}

/// What each rank holds of the model in every stage of a SegProp job sharded over 2 ranks with
/// SnapCheck off (so every step recomputes `S[depth]` through the sharded prefix): the trained
/// units', the frozen prefix's and the parked blocks' shards, against the whole model; and the
/// wire bytes of the last step against the schedule.
fn segprop_memory() -> Result<()> {
    let text = "version: 1\nname: shard-bench-segprop\n\
         model: { preset: tiny, overrides: { hidden_size: 256, intermediate_size: 688, num_layers: 4, num_heads: 4, num_kv_heads: 2 } }\n\
         data: { corpus: builtin:synthetic, seq_len: 128, batch_size: 2, synthetic_tokens: 200000, eval_fraction: 0.01 }\n\
         regime: segprop\n\
         segprop: { base_depth: 1, head_layers: 1, segment_size: 1, snapcheck: false, exit: { stage1: { max_steps: 2 }, segment: { max_steps: 2 } } }\n\
         optimizer: { lr: 1.0e-3, grad_accum: 4 }\n\
         eval: { every_steps: 100000, max_batches: 1 }\nseed: 3\n\
         sharding: { strategy: full_shard, offload: cpu }\nactivation_checkpointing: true\n\
         resources: { devices_per_gang: 2 }\n";
    let spec = JobSpec::from_yaml_str(text, "shard-bench-segprop").context("segprop bench spec")?;
    let config = spec.model_config().context("model config")?;
    let whole = 4 * config.num_params();
    let dir = tempfile::tempdir()?;
    let records = train_gang::<CpuBackend, _>(
        &spec,
        vec![Default::default(); 2],
        dir.path(),
        |t| {
            run_plan(t, &mut segprop_train::metrics::NullObserver)?;
            Ok(t.progress.records.clone())
        },
        |t| {
            run_plan(t, &mut segprop_train::metrics::NullObserver)?;
            Ok(())
        },
    )?;
    let kib = |b: u64| b as f64 / 1024.0;
    println!();
    println!(
        "SegProp, 4 blocks, 2 ranks, SnapCheck off: what rank 0 holds of the model's {:.0} KiB of fp32 weights",
        kib(whole)
    );
    println!();
    println!(
        "| stage | trained units (whole, KiB) | their shards | prefix units | prefix shards | parked blocks | parked shards | weights held per rank | of the model | wire bytes per step | schedule |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &records {
        let Some(m) = r.sharding else { continue };
        let held = m.params_bytes + m.prefix_bytes + m.parked_bytes;
        println!(
            "| {} | {:.0} | {:.0} | {} | {:.0} | {} | {:.0} | {:.0} | {:.2} | {} | {} |",
            r.stage,
            kib(m.unit_bytes),
            kib(m.params_bytes),
            m.prefix_units,
            kib(m.prefix_bytes),
            m.parked_units,
            kib(m.parked_bytes),
            kib(held),
            held as f64 / whole as f64,
            m.comm_bytes_per_step,
            m.expected_comm_bytes_per_step
        );
    }
    Ok(())
}

pub fn shard(steps: usize, reps: usize) -> Result<()> {
    let warmup = 2;
    let specs: Vec<JobSpec> = VARIANTS
        .iter()
        .map(|v| spec(warmup + steps, v.yaml))
        .collect::<Result<_>>()?;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    let mut memory: Vec<Option<RankMemory>> = vec![None; VARIANTS.len()];
    for rep in 0..reps.max(1) {
        for (i, spec) in specs.iter().enumerate() {
            let (steps, cpu_s, mem) = run_once(spec, warmup)?;
            times[i].extend_from_slice(&steps[warmup..]);
            cpu[i].push(cpu_s);
            memory[i] = mem;
            eprintln!(
                "round {rep}: {:<25} median step {:.1} ms",
                VARIANTS[i].name,
                1e3 * median(&steps[warmup..])
            );
        }
    }
    let base = median(&times[0]);
    let base_cpu = median(&cpu[0]);
    println!(
        "| variant | step (ms) | vs unsharded | CPU s per step, all ranks | vs unsharded | params+optimizer per rank (KiB) | gathered peak (KiB) | saved activations (KiB) | wire bytes per step | 3 x unit x (N-1)/N | FSDP schedule | measured / schedule |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, v) in VARIANTS.iter().enumerate() {
        let t = median(&times[i]);
        let (mem, moved, three, sched) = match memory[i] {
            Some(m) => {
                let n = m.world as f64;
                (
                    format!(
                        "{:.0} | {:.0} | {:.0}",
                        (m.params_bytes + m.optimizer_bytes) as f64 / 1024.0,
                        m.gathered_peak_bytes as f64 / 1024.0,
                        m.activation_bytes as f64 / 1024.0
                    ),
                    m.comm_bytes_per_step as f64,
                    3.0 * m.unit_bytes as f64 * (n - 1.0) / n,
                    m.expected_comm_bytes_per_step as f64,
                )
            }
            None => ("(whole model) | - | -".into(), 0.0, 0.0, 0.0),
        };
        let ratio = if sched > 0.0 {
            format!("{:.4}", moved / sched)
        } else {
            "-".into()
        };
        let c = median(&cpu[i]);
        println!(
            "| {} | {:.1} | {:.2} | {:.2} | {:.2} | {mem} | {moved:.0} | {three:.0} | {sched:.0} | {ratio} |",
            v.name,
            1e3 * t,
            t / base,
            c,
            c / base_cpu
        );
    }
    segprop_memory()
}
