//! Checkpoint round trips: stage by stage and mid-stage resume bit-identical to one run, in f32
//! and bf16; filled snapshots; corrupt checkpoints refused naming the file.

use super::*;
use crate::CpuBackend;
use crate::metrics::RecordingObserver;
use crate::segprop::{parameter_values, run_next_stage, run_plan};

const SPEC: &str = r#"
version: 1
name: ckpt-test
model: { preset: tiny, overrides: { num_layers: 5 } }
data: { corpus: builtin:synthetic, seq_len: 16, batch_size: 4, eval_fraction: 0.1, synthetic_tokens: 6000 }
regime: segprop
segprop:
  base_depth: 1
  head_layers: 1
  segment_size: 1
  head_policy: reset
  exit: { stage1: { max_steps: 6 }, segment: { max_steps: 7 } }
optimizer: { lr: 3.0e-3, grad_clip: 1.0 }
eval: { every_steps: 3, max_batches: 2 }
seed: 5
"#;

fn trainer(dir: &Path) -> Trainer<CpuBackend> {
    trainer_in::<CpuBackend>(dir, "f32")
}

fn trainer_in<B: AutodiffBackend>(dir: &Path, precision: &str) -> Trainer<B> {
    let text = format!("{SPEC}resources: {{ precision: {precision} }}\n");
    let spec = segprop_core::JobSpec::from_yaml_str(&text, "ckpt-test.yaml").unwrap();
    Trainer::new(spec, Default::default(), dir).unwrap()
}

/// Saves every checkpoint it is asked for, by step.
struct EveryStep {
    dir: PathBuf,
    every: u64,
    saved: Vec<(usize, u64, PathBuf)>,
}

impl<B: AutodiffBackend> Checkpointer<B> for std::sync::Arc<std::sync::Mutex<EveryStep>> {
    fn every_steps(&self) -> u64 {
        self.lock().unwrap().every
    }
    fn save(
        &mut self,
        trainer: &Trainer<B>,
        local: &AdamWOptimizer<B>,
        progress: &StageProgress,
    ) -> Result<(), TrainError> {
        let mut me = self.lock().unwrap();
        let dir = me
            .dir
            .join(format!("s{}-{}", progress.stage_index, progress.step));
        save(trainer, Some((local, progress)), &dir)?;
        me.saved.push((progress.stage_index, progress.step, dir));
        Ok(())
    }
}

use crate::engine::Checkpointer;

/// Bit patterns of every parameter, in module order (ids differ between trainers).
fn bits<B: AutodiffBackend>(t: &Trainer<B>) -> Vec<Vec<u32>> {
    parameter_values(&t.model)
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

fn assert_same_weights<B: AutodiffBackend>(a: &Trainer<B>, b: &Trainer<B>) {
    let (a, b) = (bits(a), bits(b));
    assert_eq!(a.len(), b.len(), "parameter count");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(x == y, "parameter {i} differs");
    }
}

#[test]
fn stage_by_stage_with_reload_is_bit_identical_to_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let mut whole = trainer(&tmp.path().join("a"));
    run_plan(&mut whole, &mut RecordingObserver::default()).unwrap();

    // One trainer per stage, each loading the previous stage's saved state.
    let mut state: Option<(PathBuf, String)> = None;
    loop {
        let mut t = trainer(&tmp.path().join("b"));
        if let Some((dir, sum)) = &state {
            load(&mut t, dir, Some(sum)).unwrap();
        }
        if run_next_stage(&mut t, &mut RecordingObserver::default())
            .unwrap()
            .is_none()
        {
            assert_same_weights(&t, &whole);
            assert_eq!(t.global_step, whole.global_step);
            assert_eq!(t.progress.records.len(), whole.progress.records.len());
            break;
        }
        let dir = tmp.path().join(format!("state-{}", t.progress.next_stage));
        let digest = save(&t, None, &dir).unwrap();
        state = Some((dir, digest.checksum));
    }
}

#[test]
fn mid_stage_resume_is_bit_identical() {
    mid_stage_resume::<CpuBackend>("f32");
}

/// bf16: the checkpoint holds the fp32 masters, the 16-bit frozen weights (exactly, as f32)
/// and the moments, so the resumed run is bit-identical too.
#[test]
fn mid_stage_resume_in_bf16_is_bit_identical() {
    mid_stage_resume::<crate::CpuHalfBackend>("bf16");
}

fn mid_stage_resume<B: AutodiffBackend>(precision: &str) {
    let trainer = |dir: &Path| trainer_in::<B>(dir, precision);
    let tmp = tempfile::tempdir().unwrap();
    let mut whole = trainer(&tmp.path().join("a"));
    run_plan(&mut whole, &mut RecordingObserver::default()).unwrap();

    let saver = std::sync::Arc::new(std::sync::Mutex::new(EveryStep {
        dir: tmp.path().join("ckpt"),
        every: 4,
        saved: Vec::new(),
    }));
    let mut first = trainer(&tmp.path().join("b"));
    first.checkpointer = Some(Box::new(saver.clone()));
    run_plan(&mut first, &mut RecordingObserver::default()).unwrap();
    // Resume from a checkpoint in the middle of a stage-2 segment (stage 2, step 4 of 7).
    let (stage, step, dir) = saver
        .lock()
        .unwrap()
        .saved
        .iter()
        .find(|(s, _, _)| *s == 2)
        .cloned()
        .unwrap();
    assert_eq!((stage, step), (2, 4));
    let mut resumed = trainer(&tmp.path().join("c"));
    load(&mut resumed, &dir, None).unwrap();
    assert!(resumed.resume.is_some());
    run_plan(&mut resumed, &mut RecordingObserver::default()).unwrap();
    assert_same_weights(&resumed, &whole);
    let eval = |r: &Vec<crate::metrics::StageRecord>| -> Vec<f64> {
        r.iter().map(|s| s.eval_loss).collect()
    };
    assert_eq!(
        eval(&resumed.progress.records),
        eval(&whole.progress.records)
    );
}

#[test]
fn filled_snapshots_are_the_prefix_outputs_bit_for_bit() {
    use crate::snapcheck::{SnapshotKey, Split};
    let tmp = tempfile::tempdir().unwrap();
    // From nothing: every S[3] is a full prefix forward.
    let mut a = trainer(&tmp.path().join("a"));
    let (advanced, recomputed) = a.fill_snapshots(2, 3);
    assert_eq!(advanced, 0);
    let batches = a.data.train.len() + 2; // eval.max_batches: 2
    assert_eq!(recomputed, batches);
    // From S[2]: one block's forward per batch.
    let mut b = trainer(&tmp.path().join("b"));
    b.model = a.model.clone();
    let _ = b.fill_snapshots(0, 2);
    let (advanced, recomputed) = b.fill_snapshots(2, 3);
    assert_eq!((advanced, recomputed), (batches, 0));
    for split in [Split::Train, Split::Eval] {
        for id in 0..2 {
            let key = SnapshotKey {
                depth: 3,
                split,
                id,
            };
            let x: Vec<f32> = a
                .cache
                .as_mut()
                .unwrap()
                .get(key)
                .unwrap()
                .into_data()
                .into_vec()
                .unwrap();
            let y: Vec<f32> = b
                .cache
                .as_mut()
                .unwrap()
                .get(key)
                .unwrap()
                .into_data()
                .into_vec()
                .unwrap();
            assert!(
                x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{split:?} {id}"
            );
        }
    }
}

#[test]
fn corrupt_checkpoint_is_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let t = trainer(&tmp.path().join("a"));
    let dir = tmp.path().join("state");
    let digest = save(&t, None, &dir).unwrap();
    assert!(!partial_path(&dir).exists());
    let weights = dir.join(WEIGHTS_FILE);
    let mut bytes = std::fs::read(&weights).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&weights, bytes).unwrap();
    let mut other = trainer(&tmp.path().join("b"));
    let err = load(&mut other, &dir, Some(&digest.checksum))
        .unwrap_err()
        .to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(err.contains("state"), "{err}");
}
