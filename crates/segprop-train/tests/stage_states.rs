//! What a worker daemon's tasks of a sharded job do between stages, without the daemon (issue
//! 18, "a model that is never whole"): a gang saves its state after a stage as one file per rank
//! plus a manifest, a gang of another size continues from it with `Trainer::resume_sharded`
//! (units laid out blank and read from the rank files, no seeded init or HF import again) on
//! the uninterrupted curve; and SnapCheck's advance as a gang (`advance_batches_sharded`,
//! ranks with batches of their own or none) gives the same bits from `S[from]` as from the tokens.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};

use segprop_core::JobSpec;
use segprop_train::gang::{collective_deadline, gang_group, gang_size, run_gang};
use segprop_train::metrics::{TrainEvent, TrainObserver};
use segprop_train::segprop::{run_next_stage, run_plan};
use segprop_train::sharded::{ShardOptions, ShardRank};
use segprop_train::snapcheck::{SnapshotKey, Split};
use segprop_train::{CpuBackend, TrainError, Trainer, checkpoint};

const SPEC: &str = "
version: 1
name: stage-states
model: { preset: tiny, overrides: { num_layers: 4 } }
data: { corpus: builtin:synthetic, seq_len: 16, batch_size: 2, synthetic_tokens: 4000, eval_fraction: 0.1 }
regime: segprop
segprop:
  base_depth: 1
  head_layers: 1
  segment_size: 1
  snapcheck: true
  head_policy: persistent
  exit: { stage1: { max_steps: 3 }, segment: { max_steps: 3 } }
optimizer: { lr: 3.0e-3, grad_accum: 4, grad_clip: 0.5 }
eval: { every_steps: 2, max_batches: 3 }
activation_checkpointing: true
seed: 5
";

fn spec(world: usize) -> JobSpec {
    spec_of(SPEC, world)
}

fn spec_of(base: &str, world: usize) -> JobSpec {
    let extra = match world {
        1 => String::new(),
        n => {
            format!("sharding: {{ strategy: full_shard }}\nresources: {{ devices_per_gang: {n} }}")
        }
    };
    JobSpec::from_yaml_str(&format!("{base}{extra}\n"), "stage-states.yaml").unwrap()
}

/// Step losses rank 0 reported, in order.
#[derive(Default)]
struct Steps(Vec<f64>);

impl TrainObserver for Steps {
    fn on_event(&mut self, event: &TrainEvent) {
        if let TrainEvent::Step(s) = event {
            self.0.push(s.loss);
        }
    }
}

/// Runs `body` on every rank of `spec`'s gang, each rank's trainer made fresh (`from: None`) or
/// continued from the sharded state in `from`; returns rank 0's result.
fn gang<R: Send + 'static>(
    spec: &JobSpec,
    work: &Path,
    from: Option<&Path>,
    body: impl Fn(&mut Trainer<CpuBackend>) -> Result<R, TrainError> + Send + Sync + 'static,
) -> Result<R, TrainError> {
    let world = gang_size(spec).unwrap();
    let devices = vec![Default::default(); world];
    let make = {
        let (spec, work, from) = (
            spec.clone(),
            work.to_path_buf(),
            from.map(Path::to_path_buf),
        );
        move |shard: ShardRank| {
            let dir = work.join(format!("rank{}", shard.rank()));
            match &from {
                Some(state) => Trainer::<CpuBackend>::resume_sharded(
                    spec.clone(),
                    Default::default(),
                    &dir,
                    shard,
                    state,
                    false,
                ),
                None => Trainer::<CpuBackend>::new_sharded(
                    spec.clone(),
                    Default::default(),
                    &dir,
                    shard,
                ),
            }
        }
    };
    let (make, body) = (Arc::new(make), Arc::new(body));
    let (follower_make, follower_body) = (make.clone(), body.clone());
    run_gang(
        gang_group::<CpuBackend>(spec, &devices)?,
        collective_deadline(spec),
        ShardOptions::of(spec),
        move |shard| body(&mut make(shard)?),
        Arc::new(move |shard| follower_body(&mut follower_make(shard)?).map(|_| ())),
    )
}

#[test]
fn a_stage_state_of_2_ranks_continues_on_4_and_on_1_on_the_uninterrupted_curve() {
    let tmp = tempfile::tempdir().unwrap();
    // The whole plan on 2 ranks, never interrupted: its losses and its final held-out loss.
    let (reference, reference_eval) = gang(&spec(2), &tmp.path().join("ref"), None, |t| {
        let mut steps = Steps::default();
        run_plan(t, &mut steps)?;
        Ok((steps.0, t.final_eval()?))
    })
    .unwrap();

    // Stage 1 and the first segment on 2 ranks, then the state every rank saves.
    let state = tmp.path().join("state");
    let saved = state.clone();
    let before = gang(&spec(2), &tmp.path().join("a"), None, move |t| {
        let mut steps = Steps::default();
        run_next_stage(t, &mut steps)?;
        run_next_stage(t, &mut steps)?;
        checkpoint::save_sharded(t, None, &saved)?;
        Ok(steps.0)
    })
    .unwrap();
    let names: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for name in [
        "rank-00001-of-00002.bin",
        "rank-00002-of-00002.bin",
        "shards.json",
        "state.yaml",
    ] {
        assert!(names.contains(&name.to_string()), "{name} in {names:?}");
    }
    assert!(!names.iter().any(|n| n == "weights.bin"), "{names:?}");
    assert_eq!(before[..], reference[..before.len()]);

    for world in [4, 1] {
        let (after, eval) = gang(
            &spec(world),
            &tmp.path().join(format!("w{world}")),
            Some(&state),
            |t| {
                assert!(t.resume.is_none(), "a stage state resumes no stage");
                let mut steps = Steps::default();
                run_plan(t, &mut steps)?;
                Ok((steps.0, t.final_eval()?))
            },
        )
        .unwrap();
        assert_eq!(after.len(), reference.len() - before.len(), "{world} ranks");
        let want = &reference[before.len()..];
        let first = (after[0] - want[0]).abs() / want[0].abs();
        eprintln!(
            "{world} ranks: first loss {} vs {} (rel {first:e})",
            after[0], want[0]
        );
        assert!(first < 1e-6, "{world} ranks: {} vs {}", after[0], want[0]);
        for (g, w) in after.iter().zip(want) {
            assert!((g - w).abs() / w.abs() < 1e-4, "{world} ranks: {g} vs {w}");
        }
        let rel = (eval - reference_eval).abs() / reference_eval;
        assert!(
            rel < 1e-4,
            "{world} ranks: final eval {eval} vs {reference_eval}"
        );
    }

    // A state that fails its checksum is named; one of another model shape is refused.
    let file = state.join("rank-00001-of-00002.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[64] ^= 0x21;
    std::fs::write(&file, bytes).unwrap();
    let err = checkpoint::preflight(&state, &spec(2), true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rank-00001-of-00002.bin") && err.contains("checksum"),
        "{err}"
    );
}

#[test]
fn a_gangs_snapcheck_advance_gives_the_same_bits_from_snapshots_as_from_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let out: Arc<Mutex<Vec<String>>> = Arc::default();
    let report = out.clone();
    gang(&spec(2), tmp.path(), None, move |t| {
        let mut steps = Steps::default();
        run_next_stage(t, &mut steps)?;
        run_next_stage(t, &mut steps)?;
        assert!(t.committed_depth >= 2, "blocks 0 and 1 are committed");
        let rank = t.shard.as_ref().unwrap().rank();
        let batches: Vec<_> = t.data.train[..3].to_vec();
        // Rank 0 advances three batches, rank 1 none: the ranks still gather in step.
        let mine: Vec<(Split, &_)> = match rank {
            0 => batches.iter().map(|b| (Split::Train, b)).collect(),
            _ => Vec::new(),
        };
        let from_tokens = t.advance_batches_sharded(0, 2, &mine)?;
        assert!(from_tokens.iter().all(|(_, advanced)| !advanced));
        // S[1] of the first batch only: it is advanced, the others recomputed.
        let cache_s1 = t.advance_batches_sharded(0, 1, &mine[..mine.len().min(1)])?;
        if let Some(cache) = t.cache.as_mut() {
            cache.drop_depth(1);
            for ((_, b), (z, _)) in mine.iter().zip(cache_s1) {
                let key = SnapshotKey {
                    depth: 1,
                    split: Split::Train,
                    id: b.id,
                };
                cache.put(key, z).unwrap();
            }
        }
        let from_s1 = t.advance_batches_sharded(1, 2, &mine)?;
        let flags: Vec<bool> = from_s1.iter().map(|(_, a)| *a).collect();
        if rank == 0 {
            assert_eq!(flags, [true, false, false]);
            for ((a, _), (b, _)) in from_tokens.into_iter().zip(from_s1) {
                let (a, b) = (a.into_data(), b.into_data());
                assert_eq!(a.shape, b.shape);
                assert_eq!(
                    a.as_bytes(),
                    b.as_bytes(),
                    "S[2] from S[1] is S[2] from the tokens"
                );
            }
            report.lock().unwrap().push("compared".into());
        }
        // Sums over ranks are exact beyond f32's integers.
        let sums = t.sum_over_ranks(&[(1 << 40) + rank as u64, 3])?;
        assert_eq!(sums, [(2 << 40) + 1, 6]);
        Ok(())
    })
    .unwrap();
    assert_eq!(out.lock().unwrap().len(), 1);
}

#[test]
fn reset_baselines_and_an_early_exit_survive_stage_states_at_other_world_sizes() {
    // Head policy reset keeps LL(r)'s baseline in the state between segments; the global exit
    // after the first segment prunes the model, and the export task loads the pruned state.
    let base = SPEC
        .replace("head_policy: persistent", "head_policy: reset")
        .replace(
            "segment: { max_steps: 3 } }",
            "segment: { max_steps: 3 }, global: { target_eval_loss: 100.0 } }",
        );
    assert_ne!(base, SPEC);
    let tmp = tempfile::tempdir().unwrap();
    let weights = |t: &mut Trainer<CpuBackend>| -> Result<Vec<Vec<f32>>, TrainError> {
        let model = t.gather_model()?;
        Ok(segprop_train::segprop::parameter_values(&model)
            .into_iter()
            .map(|(_, v)| v.into_iter().map(f32::from_bits).collect())
            .collect())
    };
    let (reference, reference_eval, reference_weights) = gang(
        &spec_of(&base, 2),
        &tmp.path().join("ref"),
        None,
        move |t| {
            let mut steps = Steps::default();
            run_plan(t, &mut steps)?;
            assert!(t.progress.early_exit.is_some(), "the global exit fired");
            Ok((steps.0, t.final_eval()?, weights(t)?))
        },
    )
    .unwrap();
    // Stage 1 on 2 ranks; the segment (and the exit) on 4; the export on 1.
    let (one, two) = (tmp.path().join("s1"), tmp.path().join("s2"));
    let out = one.clone();
    let mut losses = gang(&spec_of(&base, 2), &tmp.path().join("a"), None, move |t| {
        let mut steps = Steps::default();
        run_next_stage(t, &mut steps)?;
        checkpoint::save_sharded(t, None, &out)?;
        Ok(steps.0)
    })
    .unwrap();
    let out = two.clone();
    losses.extend(
        gang(
            &spec_of(&base, 4),
            &tmp.path().join("b"),
            Some(&one),
            move |t| {
                let mut steps = Steps::default();
                run_next_stage(t, &mut steps)?;
                assert!(t.progress.early_exit.is_some(), "the global exit fired");
                checkpoint::save_sharded(t, None, &out)?;
                Ok(steps.0)
            },
        )
        .unwrap(),
    );
    assert_eq!(losses.len(), reference.len());
    for (g, w) in losses.iter().zip(&reference) {
        assert!((g - w).abs() / w.abs() < 1e-6, "{g} vs {w}");
    }
    let (eval, pruned) = gang(
        &spec_of(&base, 1),
        &tmp.path().join("c"),
        Some(&two),
        move |t| {
            assert!(segprop_train::segprop::plan_done(t));
            Ok((t.final_eval()?, weights(t)?))
        },
    )
    .unwrap();
    assert_eq!(
        pruned.len(),
        reference_weights.len(),
        "the pruned model's tensors"
    );
    assert!(
        (eval - reference_eval).abs() / reference_eval < 1e-5,
        "{eval} vs {reference_eval}"
    );
    for (a, b) in pruned.iter().zip(&reference_weights) {
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "weights differ by {worst}");
    }
}

#[test]
fn device_resident_shards_save_the_bytes_of_host_shards_and_resume_from_them() {
    // `offload: none` (set past validation: CPU jobs refuse it) keeps the chunks and moments on
    // the rank's device; what it saves and what it reads back must not depend on it. Without
    // clipping the device step has the host step's bits (with it, the device's norm and scaling
    // round differently: tests/sharded.rs).
    let tmp = tempfile::tempdir().unwrap();
    let mut host = spec(2);
    host.optimizer.grad_clip = None;
    let mut device = host.clone();
    device.sharding.offload = segprop_core::spec::Offload::None;
    let save = |spec: &JobSpec, name: &str| {
        let dir = tmp.path().join(name);
        let saved = dir.clone();
        let losses = gang(
            spec,
            &tmp.path().join(format!("{name}-work")),
            None,
            move |t| {
                let mut steps = Steps::default();
                run_next_stage(t, &mut steps)?;
                run_next_stage(t, &mut steps)?;
                checkpoint::save_sharded(t, None, &saved)?;
                Ok(steps.0)
            },
        )
        .unwrap();
        (dir, losses)
    };
    let (from_host, host_losses) = save(&host, "host");
    let (from_device, device_losses) = save(&device, "device");
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&device_losses), bits(&host_losses));
    for rank in ["rank-00001-of-00002.bin", "rank-00002-of-00002.bin"] {
        let (a, b) = (
            std::fs::read(from_host.join(rank)).unwrap(),
            std::fs::read(from_device.join(rank)).unwrap(),
        );
        assert!(a == b, "{rank}: device shards saved other bytes");
    }
    let resume = |spec: &JobSpec, name: &str| {
        gang(spec, &tmp.path().join(name), Some(&from_host), |t| {
            let mut steps = Steps::default();
            run_plan(t, &mut steps)?;
            Ok(steps.0)
        })
        .unwrap()
    };
    let on_host = resume(&host, "resume-host");
    let on_device = resume(&device, "resume-device");
    assert!(!on_host.is_empty());
    assert_eq!(bits(&on_device), bits(&on_host));
}
