//! Sharded gangs that never hold the model whole (issue 18): mid-stage checkpoints are one file
//! per rank plus a manifest, and resume at another world size (2 ranks to 4 and to 1) with the
//! same next-step loss as the run that was never interrupted; a corrupt shard file is named by
//! its checksum and the checkpoint before it still loads; a checkpoint of another model shape is
//! refused naming the field.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use burn::tensor::backend::AutodiffBackend;
use segprop_core::JobSpec;
use segprop_train::checkpoint::{self, Digest};
use segprop_train::engine::{AdamWOptimizer, Checkpointer, StageProgress};
use segprop_train::gang::{gang_size, train_gang};
use segprop_train::metrics::{RecordingObserver, TrainEvent, TrainObserver};
use segprop_train::segprop::run_plan;
use segprop_train::{CpuBackend, CpuHalfBackend, TrainError, Trainer};

const SEGPROP: &str = "
version: 1
name: never-whole
model: { preset: tiny, overrides: { num_layers: 4 } }
data: { corpus: builtin:synthetic, seq_len: 16, batch_size: 2, synthetic_tokens: 4000, eval_fraction: 0.1 }
regime: segprop
segprop:
  base_depth: 1
  head_layers: 1
  segment_size: 1
  snapcheck: true
  head_policy: reset
  exit: { stage1: { max_steps: 3 }, segment: { max_steps: 4 } }
optimizer: { lr: 3.0e-3, grad_accum: 8, grad_clip: 0.5 }
eval: { every_steps: 2, max_batches: 2 }
seed: 21
";

/// (stage index, step, loss) of each step rank 0 reported.
type Losses = Vec<(usize, u64, f64)>;

fn spec(extra: &str) -> JobSpec {
    JobSpec::from_yaml_str(&format!("{SEGPROP}{extra}\n"), "never-whole.yaml").unwrap()
}

fn ranks(world: usize) -> String {
    match world {
        1 => "activation_checkpointing: true".into(),
        n => format!(
            "activation_checkpointing: true\nsharding: {{ strategy: full_shard }}\n\
             resources: {{ devices_per_gang: {n} }}"
        ),
    }
}

/// Writes a sharded checkpoint every `every` steps under `root`; rank 0 lists them.
#[derive(Clone)]
struct Every {
    every: u64,
    root: PathBuf,
    saved: Arc<Mutex<Vec<PathBuf>>>,
}

impl<B: AutodiffBackend> Checkpointer<B> for Every {
    fn every_steps(&self) -> u64 {
        self.every
    }
    fn save(
        &mut self,
        _: &Trainer<B>,
        _: &AdamWOptimizer<B>,
        _: &StageProgress,
    ) -> Result<(), TrainError> {
        unreachable!("a sharded trainer writes sharded checkpoints")
    }
    fn sharded_dir(&self, p: &StageProgress) -> Option<PathBuf> {
        Some(
            self.root
                .join(format!("stage{}-step{:04}", p.stage_index, p.step)),
        )
    }
    fn sharded_saved(
        &mut self,
        dir: &Path,
        _: &Digest,
        _: &StageProgress,
    ) -> Result<(), TrainError> {
        self.saved.lock().unwrap().push(dir.to_path_buf());
        Ok(())
    }
}

/// Records steps, and asks to stop once `stop_after` (stage index, step) is done.
struct Steps {
    losses: Vec<(usize, u64, f64)>,
    stop_after: Option<(usize, u64)>,
}

impl TrainObserver for Steps {
    fn on_event(&mut self, event: &TrainEvent) {
        if let TrainEvent::Step(s) = event {
            self.losses.push((s.stage_index, s.step, s.loss));
        }
    }
    fn cancelled(&self) -> bool {
        let last = self.losses.last().map(|(i, s, _)| (*i, *s));
        self.stop_after.is_some() && last == self.stop_after
    }
}

/// Runs `spec` on its gang, resuming from `resume` when given, checkpointing with `ckpt`; returns
/// rank 0's step losses and how the run ended.
fn run<B: AutodiffBackend>(
    spec: &JobSpec,
    resume: Option<PathBuf>,
    ckpt: Option<Every>,
    stop_after: Option<(usize, u64)>,
) -> (Losses, Result<(), String>) {
    let dir = tempfile::tempdir().unwrap();
    let world = gang_size(spec).unwrap();
    let prepare = {
        let (resume, ckpt) = (resume.clone(), ckpt.clone());
        move |t: &mut Trainer<B>| -> Result<(), TrainError> {
            if let Some(r) = &resume {
                checkpoint::load(t, r, None)?;
            }
            if let Some(c) = &ckpt {
                t.checkpointer = Some(Box::new(c.clone()));
            }
            Ok(())
        }
    };
    let follower_prepare = prepare.clone();
    let losses = Arc::new(Mutex::new(Vec::new()));
    let out = losses.clone();
    let ended = train_gang::<B, _>(
        spec,
        vec![Default::default(); world],
        dir.path(),
        move |t| {
            prepare(t)?;
            let mut obs = Steps {
                losses: Vec::new(),
                stop_after,
            };
            let ran = run_plan(t, &mut obs);
            *out.lock().unwrap() = obs.losses;
            ran.map(|_| ())
        },
        move |t| {
            follower_prepare(t)?;
            run_plan(t, &mut RecordingObserver::default()).map(|_| ())
        },
    );
    let losses = losses.lock().unwrap().clone();
    (losses, ended.map_err(|e| e.to_string()))
}

#[test]
fn a_checkpoint_of_2_ranks_resumes_on_4_and_on_1_with_the_same_next_step_loss() {
    let two = spec(&ranks(2));
    let (reference, ended) = run::<CpuBackend>(&two, None, None, None);
    ended.unwrap();
    // Stage 1 (3 steps), then three segments of 4: stop after step 2 of the first segment
    // (stage index 1), checkpointed at steps 1 and 2.
    let root = tempfile::tempdir().unwrap();
    let ckpt = Every {
        every: 1,
        root: root.path().to_path_buf(),
        saved: Arc::default(),
    };
    let (before, ended) = run::<CpuBackend>(&two, None, Some(ckpt.clone()), Some((1, 2)));
    assert!(ended.unwrap_err().contains("cancel"), "stopped on request");
    assert_eq!(before.len(), 5);
    let saved = ckpt.saved.lock().unwrap().clone();
    let latest = saved.last().unwrap().clone();
    assert!(latest.ends_with("stage1-step0002"), "{saved:?}");
    // One file per rank and the manifest; nothing holds a whole unit.
    let names: Vec<String> = std::fs::read_dir(&latest)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for name in [
        "rank-00001-of-00002.bin",
        "rank-00002-of-00002.bin",
        "shards.json",
        "state.yaml",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
    }
    // The next step after the checkpoint, uninterrupted.
    let next = |losses: &[(usize, u64, f64)]| {
        losses
            .iter()
            .find(|(i, s, _)| (*i, *s) == (1, 3))
            .unwrap()
            .2
    };
    let want = next(&reference);
    for world in [4, 1, 2] {
        let (resumed, ended) =
            run::<CpuBackend>(&spec(&ranks(world)), Some(latest.clone()), None, None);
        ended.unwrap();
        assert_eq!(
            resumed.first().map(|(i, s, _)| (*i, *s)),
            Some((1, 3)),
            "{world} ranks resume at step 3"
        );
        let got = next(&resumed);
        let rel = (got - want).abs() / want.abs();
        eprintln!("resumed on {world} ranks: next-step loss {got} vs {want} (rel {rel:e})");
        assert!(
            rel < 1e-6,
            "{world} ranks: next-step loss {got} vs {want} (rel {rel:e})"
        );
        // The rest of the plan runs to the end, on the uninterrupted curve up to float order.
        assert_eq!(resumed.len(), reference.len() - before.len());
        for ((_, _, g), (_, _, w)) in resumed.iter().zip(&reference[before.len()..]) {
            assert!((g - w).abs() / w.abs() < 1e-4, "{world} ranks: {g} vs {w}");
        }
    }

    // A corrupt shard file is named by its checksum; the checkpoint before it still loads.
    let file = latest.join("rank-00002-of-00002.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[100] ^= 0x55;
    std::fs::write(&file, bytes).unwrap();
    let (_, ended) = run::<CpuBackend>(&spec(&ranks(2)), Some(latest.clone()), None, None);
    let err = ended.unwrap_err();
    assert!(
        err.contains("rank-00002-of-00002.bin") && err.contains("checksum mismatch"),
        "{err}"
    );
    let earlier = saved[saved.len() - 2].clone();
    assert!(earlier.ends_with("stage1-step0001"));
    let (resumed, ended) = run::<CpuBackend>(&spec(&ranks(2)), Some(earlier), None, None);
    ended.unwrap();
    assert_eq!(resumed.first().map(|(i, s, _)| (*i, *s)), Some((1, 2)));
    let want = reference
        .iter()
        .find(|(i, s, _)| (*i, *s) == (1, 2))
        .unwrap()
        .2;
    assert!((resumed[0].2 - want).abs() / want.abs() < 1e-6);

    // A checkpoint of another model shape: refused, naming the field.
    let wider = JobSpec::from_yaml_str(
        &format!(
            "{}{}\n",
            SEGPROP.replace("num_layers: 4 }", "num_layers: 4, hidden_size: 96 }"),
            ranks(2)
        ),
        "wider.yaml",
    )
    .unwrap();
    let (_, ended) = run::<CpuBackend>(&wider, Some(saved[saved.len() - 2].clone()), None, None);
    let err = ended.unwrap_err();
    assert!(
        err.contains("hidden_size") && err.contains("state.yaml"),
        "{err}"
    );
}

#[test]
fn a_bf16_checkpoint_reshards_its_16_bit_frozen_units() {
    // Mid-segment, the frozen prefix and the parked blocks are kept in 16 bits, two to a word:
    // their words reshard as well as the fp32 masters and moments.
    let bf16 = |world: usize| {
        spec(&format!(
            "activation_checkpointing: true\nsharding: {{ strategy: full_shard }}\n\
             resources: {{ devices_per_gang: {world}, precision: bf16 }}"
        ))
    };
    let (reference, ended) = run::<CpuHalfBackend>(&bf16(2), None, None, None);
    ended.unwrap();
    let root = tempfile::tempdir().unwrap();
    let ckpt = Every {
        every: 2,
        root: root.path().to_path_buf(),
        saved: Arc::default(),
    };
    let (_, ended) = run::<CpuHalfBackend>(&bf16(2), None, Some(ckpt.clone()), Some((1, 2)));
    assert!(ended.is_err());
    let latest = ckpt.saved.lock().unwrap().last().unwrap().clone();
    let manifest = std::fs::read_to_string(latest.join("shards.json")).unwrap();
    assert!(
        manifest.contains("\"packed\": true"),
        "frozen units are packed: {manifest}"
    );
    let (resumed, ended) = run::<CpuHalfBackend>(&bf16(4), Some(latest), None, None);
    ended.unwrap();
    let want = reference
        .iter()
        .find(|(i, s, _)| (*i, *s) == (1, 3))
        .unwrap()
        .2;
    assert_eq!(resumed.first().map(|(i, s, _)| (*i, *s)), Some((1, 3)));
    let rel = (resumed[0].2 - want).abs() / want.abs();
    assert!(
        rel < 1e-6,
        "bf16, 4 ranks: next-step loss {} vs {want} (rel {rel:e})",
        resumed[0].2
    );
}
