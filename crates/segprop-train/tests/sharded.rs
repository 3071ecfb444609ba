//! Sharded training through the engine (issue "sharding layer"): N CPU ranks (threads) training
//! with FSDP units give the loss curve of one unsharded rank within 1e-5 relative, for e2e and
//! for SegProp (stage 1 and stage-2 segments with SnapCheck), with activation checkpointing on
//! and off and with CPU offload; and the stage's optimizer state survives the round trip into
//! burn's optimizers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use segprop_core::JobSpec;
use segprop_train::gang::{gang_size, train_gang};
use segprop_train::metrics::{RecordingObserver, TrainEvent};
use segprop_train::segprop::{parameter_values, run_plan};
use segprop_train::{CpuBackend as B, Trainer};

const E2E: &str = "
version: 1
name: shard-e2e
model: { preset: tiny, overrides: { num_layers: 2 } }
data: { corpus: builtin:synthetic, seq_len: 16, batch_size: 2, synthetic_tokens: 4000, eval_fraction: 0.1 }
regime: e2e
e2e: { exit: { max_steps: 4 } }
optimizer: { lr: 3.0e-3, grad_accum: 8, grad_clip: 0.5, weight_decay: 0.01 }
eval: { every_steps: 2, max_batches: 2 }
seed: 11
";

const SEGPROP: &str = "
version: 1
name: shard-segprop
model: { preset: tiny, overrides: { num_layers: 4 } }
data: { corpus: builtin:synthetic, seq_len: 16, batch_size: 2, synthetic_tokens: 4000, eval_fraction: 0.1 }
regime: segprop
segprop:
  base_depth: 1
  head_layers: 1
  segment_size: 1
  snapcheck: true
  exit: { stage1: { max_steps: 3 }, segment: { max_steps: 3 } }
optimizer: { lr: 3.0e-3, grad_accum: 8, grad_clip: 0.5 }
eval: { every_steps: 2, max_batches: 2 }
seed: 13
";

/// The spec with a sharding section.
fn spec(base: &str, sharding: &str) -> JobSpec {
    JobSpec::from_yaml_str(&format!("{base}{sharding}\n"), "shard.yaml").unwrap()
}

struct Run {
    /// (stage, step, loss) of every optimizer step, in order.
    losses: Vec<(String, u64, f64)>,
    evals: Vec<f64>,
    weights: Vec<(burn::module::ParamId, Vec<u32>)>,
    sharding: Vec<Option<segprop_train::sharded::RankMemory>>,
    /// Sequences per pass of each stage.
    micro: Vec<usize>,
}

fn collect(t: &mut Trainer<B>, obs: &RecordingObserver) -> Run {
    let mut losses = Vec::new();
    let mut evals = Vec::new();
    for e in &obs.events {
        match e {
            TrainEvent::Step(s) => losses.push((s.stage.clone(), s.step, s.loss)),
            TrainEvent::Eval(e) => evals.push(e.eval_loss),
            _ => {}
        }
    }
    Run {
        losses,
        evals,
        weights: parameter_values(&t.gather_model().unwrap()),
        sharding: t.progress.records.iter().map(|r| r.sharding).collect(),
        micro: t.progress.records.iter().map(|r| r.micro_batch).collect(),
    }
}

fn run(spec: &JobSpec) -> Run {
    let dir = tempfile::tempdir().unwrap();
    match gang_size(spec) {
        None => {
            let mut t = Trainer::<B>::new(spec.clone(), Default::default(), dir.path()).unwrap();
            let mut obs = RecordingObserver::default();
            run_plan(&mut t, &mut obs).unwrap();
            collect(&mut t, &obs)
        }
        Some(world) => train_gang::<B, _>(
            spec,
            vec![Default::default(); world],
            dir.path(),
            |t| {
                let mut obs = RecordingObserver::default();
                run_plan(t, &mut obs)?;
                Ok(collect(t, &obs))
            },
            |t| {
                run_plan(t, &mut RecordingObserver::default())?;
                t.gather_model()?;
                Ok(())
            },
        )
        .unwrap(),
    }
}

fn assert_same_curve(what: &str, got: &Run, want: &Run) {
    assert_eq!(got.losses.len(), want.losses.len(), "{what}: step count");
    assert!(!want.losses.is_empty());
    let mut worst = 0.0f64;
    for ((gs, gi, g), (ws, wi, w)) in got.losses.iter().zip(&want.losses) {
        assert_eq!((gs, gi), (ws, wi), "{what}: same stages and steps");
        let rel = (g - w).abs() / w.abs();
        worst = worst.max(rel);
        assert!(
            rel < 1e-5,
            "{what}: {gs} step {gi}: loss {g} vs {w} (rel {rel:e})"
        );
    }
    assert_eq!(got.evals.len(), want.evals.len(), "{what}: eval count");
    for (g, w) in got.evals.iter().zip(&want.evals) {
        assert!((g - w).abs() / w.abs() < 1e-5, "{what}: eval {g} vs {w}");
    }
    let mut worst_w = 0.0f32;
    assert_eq!(got.weights.len(), want.weights.len());
    // Parameter ids are random per process; visit order is the model's structure.
    for ((_, g), (_, w)) in got.weights.iter().zip(&want.weights) {
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(w) {
            worst_w = worst_w.max((f32::from_bits(*a) - f32::from_bits(*b)).abs());
        }
    }
    // Adam divides by sqrt(v): last-bit differences of near-zero gradients (another summation
    // order over ranks) can move a weight by a few lr x 1e-3 over the run.
    assert!(
        worst_w < 5e-5,
        "{what}: weights differ by up to {worst_w:e}"
    );
    eprintln!("{what}: worst loss rel diff {worst:e}, worst weight diff {worst_w:e}");
}

#[test]
fn e2e_on_2_4_and_8_ranks_matches_one_unsharded_rank() {
    let reference = run(&spec(E2E, ""));
    for world in [2, 4, 8] {
        let sharded = run(&spec(
            E2E,
            &format!(
                "sharding: {{ strategy: full_shard }}\nactivation_checkpointing: true\n\
                 resources: {{ devices_per_gang: {world} }}"
            ),
        ));
        assert_same_curve(&format!("e2e, {world} ranks, AC"), &sharded, &reference);
        let memory = sharded.sharding[0].expect("a sharded stage reports its memory");
        assert_eq!((memory.world, memory.rank, memory.units), (world, 0, 4));
        // Each rank holds 1/N of the units (plus padding) and moves (N-1)/N of 3 x each unit
        // (2 x the head, whose backward follows its forward) per step: no hidden gathers.
        let n = world as u64;
        assert!(memory.params_bytes <= memory.unit_bytes / n + 4 * memory.units as u64);
        assert_eq!(memory.optimizer_bytes, 2 * memory.params_bytes);
        let theory = memory.expected_comm_bytes_per_step as f64;
        let three_x = 3.0 * memory.unit_bytes as f64 * (n - 1) as f64 / n as f64;
        assert!(theory < three_x && theory > 0.9 * three_x);
        let moved = memory.comm_bytes_per_step as f64;
        assert!(
            (moved - theory).abs() / theory < 0.001,
            "{world} ranks: {moved} bytes per step vs {theory}"
        );
        assert!(memory.activation_bytes > 0);
    }
}

#[test]
fn prefetch_changes_when_units_are_gathered_not_the_step() {
    // The next unit's all-gather and the last unit's reduce-scatter run on the rank's
    // communication thread while it computes: the same calls in the same order, so the same
    // losses and weights bit for bit and the same bytes; two units gathered at once instead of
    // one.
    let sharded = |prefetch: bool| {
        run(&spec(
            E2E,
            &format!(
                "sharding: {{ strategy: full_shard, prefetch: {prefetch} }}\n\
                 activation_checkpointing: true\nresources: {{ devices_per_gang: 2 }}"
            ),
        ))
    };
    let (ahead, blocking) = (sharded(true), sharded(false));
    assert_eq!(ahead.losses, blocking.losses);
    // Parameter ids are random per run; the values, in the model's visit order, are not.
    let values = |r: &Run| r.weights.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>();
    assert!(
        values(&ahead) == values(&blocking),
        "the same weights bit for bit"
    );
    let (a, b) = (ahead.sharding[0].unwrap(), blocking.sharding[0].unwrap());
    assert_eq!(a.comm_bytes_per_step, b.comm_bytes_per_step);
    assert!(a.comm_bytes_per_step > 0);
    // Blocking holds one unit at a time, at most the largest; prefetch holds two neighbours.
    assert!(
        b.gathered_peak_bytes < a.gathered_peak_bytes,
        "{a:?} vs {b:?}"
    );
    assert!(a.gathered_peak_bytes <= 2 * b.gathered_peak_bytes);
    assert!(
        a.gathered_peak_bytes < a.unit_bytes,
        "not every unit at once"
    );
    assert!(b.grad_bytes < a.grad_bytes, "one reduce-scatter in flight");
}

#[test]
fn e2e_without_checkpointing_and_with_offload_matches_too() {
    let reference = run(&spec(E2E, ""));
    let keep = run(&spec(
        E2E,
        "sharding: { strategy: full_shard, offload: cpu }\nresources: { devices_per_gang: 4 }",
    ));
    assert_same_curve("e2e, 4 ranks, no AC, offload", &keep, &reference);
    let memory = keep.sharding[0].unwrap();
    // Without re-gathering for backward: 2 x unit x (N-1)/N, every unit gathered at the peak.
    let theory = memory.expected_comm_bytes_per_step as f64;
    assert!((theory - 2.0 * memory.unit_bytes as f64 * 3.0 / 4.0).abs() / theory < 0.001);
    assert!((memory.comm_bytes_per_step as f64 - theory).abs() / theory < 0.001);
    assert_eq!(memory.gathered_peak_bytes, memory.unit_bytes);
    // Activation checkpointing on one unsharded rank: the same curve as well.
    let ac = run(&spec(E2E, "activation_checkpointing: true"));
    assert_same_curve("e2e, 1 rank, AC", &ac, &reference);
    assert_eq!(ac.sharding[0].unwrap().comm_bytes_per_step, 0);
}

#[test]
fn segprop_stage1_and_segments_on_2_and_4_ranks_match_one_unsharded_rank() {
    let reference = run(&spec(SEGPROP, ""));
    assert_eq!(reference.sharding.len(), 3, "stage 1 and two segments");
    for (world, extra) in [
        (2, "activation_checkpointing: true"),
        (
            4,
            "activation_checkpointing: true\nsharding: { strategy: full_shard, offload: cpu }",
        ),
        (4, ""),
    ] {
        let sharding = if extra.contains("sharding") {
            extra.to_string()
        } else {
            format!("{extra}\nsharding: {{ strategy: full_shard }}")
        };
        let sharded = run(&spec(
            SEGPROP,
            &format!("{sharding}\nresources: {{ devices_per_gang: {world} }}"),
        ));
        assert_same_curve(
            &format!("segprop, {world} ranks, {extra:?}"),
            &sharded,
            &reference,
        );
        // A stage-2 segment trains only the segment and LL(r): one block, one head block, the
        // head.
        let segment = sharded.sharding[1].unwrap();
        assert_eq!(segment.units, 3);
        // Its frozen prefix (embedding, block 0) is sharded as well, read only on SnapCheck
        // misses.
        assert_eq!(segment.prefix_units, 2);
        assert!(segment.prefix_bytes > 0);
        // Blocks no route of the stage runs (later segments') are sharded and left alone: stage
        // 1 parks blocks 1 and 2, segment-1-2 block 2, the last segment none.
        let parked: Vec<usize> = sharded
            .sharding
            .iter()
            .map(|m| m.unwrap().parked_units)
            .collect();
        assert_eq!(parked, [2, 1, 0]);
        let stage1 = sharded.sharding[0].unwrap();
        assert!(stage1.parked_bytes > 0 && stage1.parked_bytes < stage1.unit_bytes);
        let stage1 = sharded.sharding[0].unwrap();
        assert_eq!(stage1.units, 4, "embedding, base block, head block, head");
    }
}

#[test]
fn passes_of_fewer_sequences_give_the_same_curve_unsharded_and_sharded() {
    // Batches of 3 sequences in passes of 2 + 1 (weighted 2/3 and 1/3) or of 1: the step is the
    // step of the whole batch.
    let e2e = E2E.replace("batch_size: 2", "batch_size: 3");
    let reference = run(&spec(&e2e, ""));
    assert_eq!(reference.micro, [3]);
    let passes = e2e.replace("batch_size: 3", "batch_size: 3, micro_batch: 2");
    let split = run(&spec(&passes, ""));
    assert_eq!(split.micro, [2]);
    assert_same_curve("e2e in passes of 2", &split, &reference);
    assert_same_curve(
        "e2e in passes of 2, 2 ranks, AC",
        &run(&spec(
            &passes,
            "sharding: { strategy: full_shard }\nactivation_checkpointing: true\n\
             resources: { devices_per_gang: 2 }",
        )),
        &reference,
    );

    // SegProp: the segments read S[depth] of the whole batch from SnapCheck and take its rows.
    let segprop = SEGPROP.replace("batch_size: 2", "batch_size: 3");
    let reference = run(&spec(&segprop, ""));
    let passes = segprop.replace(
        "batch_size: 3",
        "batch_size: 3, micro_batch: { stage1: 1, segment-1-2: 2, segment-2-3: 1 }",
    );
    let split = run(&spec(&passes, ""));
    assert_eq!(split.micro, [1, 2, 1]);
    assert_same_curve("segprop in passes", &split, &reference);
    assert_same_curve(
        "segprop in passes, 2 ranks",
        &run(&spec(
            &passes,
            "sharding: { strategy: full_shard }\nresources: { devices_per_gang: 2 }",
        )),
        &reference,
    );
}

const LW: &str = "
version: 1
name: shard-lw
model: { preset: tiny, overrides: { num_layers: 3 } }
data: { corpus: builtin:synthetic, seq_len: 16, batch_size: 2, synthetic_tokens: 4000, eval_fraction: 0.1 }
regime: lw
lw: { snapcheck: false, exit: { max_steps: 3 } }
optimizer: { lr: 3.0e-3, grad_accum: 4 }
eval: { every_steps: 2, max_batches: 2 }
seed: 17
";

#[test]
fn layer_wise_blocks_on_2_ranks_match_one_unsharded_rank() {
    // Each block trains with a fresh local head; blocks after the first read the frozen prefix,
    // recomputed here (SnapCheck off) on every rank.
    let reference = run(&spec(LW, ""));
    let sharded = run(&spec(
        LW,
        "sharding: { strategy: full_shard }\nactivation_checkpointing: true\nresources: { devices_per_gang: 2 }",
    ));
    assert_same_curve("lw, 2 ranks, AC", &sharded, &reference);
    assert_eq!(sharded.sharding.len(), 3);
    assert_eq!(
        sharded.sharding[0].unwrap().units,
        3,
        "embedding, block 0, head"
    );
    assert_eq!(sharded.sharding[1].unwrap().units, 2, "block 1, head");
    // The frozen prefix of block 1's stage (the embedding and block 0) is sharded too: each rank
    // holds half of it and gathers it unit by unit, forward only, every step (no SnapCheck).
    let second = sharded.sharding[1].unwrap();
    assert_eq!(second.prefix_units, 2, "embedding, block 0");
    // embedding + block 0 is block 1 + head less the final norm: about the trained units.
    let half = second.unit_bytes as f64 / 2.0;
    let held = second.prefix_bytes as f64;
    assert!(held <= half && held > 0.95 * half, "{second:?}");
    // Per step: the prefix gathered once ((N-1)/N of it: what one rank holds, at N = 2) on top
    // of the trained units' schedule (between 2 and 3 x unit x (N-1)/N with AC).
    let trained = second.expected_comm_bytes_per_step - second.prefix_bytes;
    assert!(
        trained > second.unit_bytes && trained < 3 * second.unit_bytes / 2,
        "{second:?}"
    );
    let (moved, theory) = (
        second.comm_bytes_per_step as f64,
        second.expected_comm_bytes_per_step as f64,
    );
    assert!((moved - theory).abs() / theory < 0.001, "{second:?}");
    // Block 0's own stage reads the tokens: no prefix.
    assert_eq!(sharded.sharding[0].unwrap().prefix_units, 0);
}

#[test]
fn bad_sharding_specs_name_the_field() {
    let err = JobSpec::from_yaml_str(
        &format!(
            "{E2E}sharding: {{ strategy: full_shard }}\nresources: {{ devices_per_gang: 3 }}\n"
        ),
        "shard.yaml",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("optimizer.grad_accum"), "{err}");
    let err = JobSpec::from_yaml_str(
        &format!("{E2E}sharding: {{ offload: cpu }}\n"),
        "shard.yaml",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("sharding.offload"), "{err}");
    let err = JobSpec::from_yaml_str(
        &format!("{E2E}sharding: {{ strategy: full_shard, collective_timeout_s: 0 }}\n"),
        "shard.yaml",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("sharding.collective_timeout_s"), "{err}");
    // CPU ranks have no device memory to keep shards in.
    let err = JobSpec::from_yaml_str(
        &format!(
            "{E2E}sharding: {{ strategy: full_shard, offload: none }}\n\
             resources: {{ devices_per_gang: 2 }}\n"
        ),
        "shard.yaml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("sharding.offload") && err.contains("device memory"),
        "{err}"
    );
}

/// [`SEGPROP`] with head policy `reset` and a global exit after the first segment.
fn reset_and_exit() -> String {
    SEGPROP
        .replace(
            "  snapcheck: true\n",
            "  snapcheck: true\n  head_policy: reset\n",
        )
        .replace(
            "segment: { max_steps: 3 } }",
            "segment: { max_steps: 3 }, global: { target_eval_loss: 100.0 } }",
        )
}

#[test]
fn reset_head_and_early_exit_with_units_kept_sharded_match_one_unsharded_rank() {
    // Head policy reset keeps LL(r)'s baseline as each rank's chunks and restores them at each
    // segment; the global exit prunes the shards. The gang never holds the model whole, and
    // still gives one unsharded rank's curve and pruned model.
    let base = reset_and_exit();
    assert_ne!(base, SEGPROP);
    let reference = run(&spec(&base, ""));
    assert_eq!(
        reference.losses.len(),
        6,
        "stage 1 and one segment, then the exit"
    );
    let sharded = run(&spec(
        &base,
        "activation_checkpointing: true\nsharding: { strategy: full_shard }\n\
         resources: { devices_per_gang: 2 }",
    ));
    assert_same_curve("segprop reset + early exit, 2 ranks", &sharded, &reference);
    // Pruned to blocks 0..2 and LL(r)'s block: 3 blocks of 9 tensors, the embedding, the head.
    assert_eq!(sharded.weights.len(), 3 * 9 + 3);
}

#[test]
fn device_resident_shards_train_with_the_bits_of_host_resident_shards() {
    // `offload: none` keeps every rank's chunks and AdamW state on the rank's device, gathers
    // and reduce-scatters them as device tensors (staged through the host collective here, as
    // NCCL takes them directly on a GPU) and steps them there. CPU jobs refuse it (their device
    // is host memory), so the spec is set past validation: the code path is the one a CUDA rank
    // runs, on ndarray. Stage 1, a segment with SnapCheck, head policy reset (the baseline
    // restored into device shards) and the early exit.
    let base = reset_and_exit();
    let mut host = spec(
        &base,
        "activation_checkpointing: true\nsharding: { strategy: full_shard, offload: cpu }\n\
         resources: { devices_per_gang: 2 }",
    );
    // Without clipping every operation is the host path's: the same bits.
    host.optimizer.grad_clip = None;
    let mut device = host.clone();
    device.sharding.offload = segprop_core::spec::Offload::None;
    let on_host = run(&host);
    let on_device = run(&device);
    assert_eq!(on_device.losses.len(), 6);
    let bits = |r: &Run| {
        let losses: Vec<u64> = r.losses.iter().map(|l| l.2.to_bits()).collect();
        let evals: Vec<u64> = r.evals.iter().map(|e| e.to_bits()).collect();
        let weights: Vec<Vec<u32>> = r.weights.iter().map(|w| w.1.clone()).collect();
        (losses, evals, weights)
    };
    assert!(
        bits(&on_device) == bits(&on_host),
        "device shards changed the run's bits"
    );
    let where_ = |r: &Run| -> Vec<bool> {
        r.sharding
            .iter()
            .map(|m| m.expect("a sharded stage").shards_on_device)
            .collect()
    };
    assert_eq!(where_(&on_device), vec![true; on_device.sharding.len()]);
    assert_eq!(where_(&on_host), vec![false; on_host.sharding.len()]);

    // With clipping the device sums the squares with the backend's reduction and scales in
    // f32 (the host in order and in f64): the same run to rounding.
    host.optimizer.grad_clip = Some(0.5);
    device.optimizer.grad_clip = Some(0.5);
    let (on_host, on_device) = (run(&host), run(&device));
    for (h, d) in on_host.losses.iter().zip(&on_device.losses) {
        assert!((h.2 - d.2).abs() <= 1e-5 * h.2.abs(), "{h:?} vs {d:?}");
    }
    assert_eq!(on_host.losses.len(), on_device.losses.len());
}
