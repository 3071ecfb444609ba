//! Fuzzing the checkpoint reader (issue 21): mutants of a real checkpoint's `state.yaml` and
//! `weights.bin` (and of a sharded checkpoint's `shards.json`) are loaded into a trainer of the
//! same job. Each is refused with an error naming the file, or loads into a model that runs;
//! none may panic. Seeded: the same cases every run (`SEGPROP_FUZZ_CASES` sets the count for a
//! longer local run).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../tests/fuzz/mutate.rs"]
mod mutate;

use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};
use segprop_core::JobSpec;
use segprop_train::segprop::run_next_stage;
use segprop_train::{CpuBackend as B, Trainer, checkpoint};

const SPEC: &str = "version: 1\nname: fuzz-ckpt\nmodel: { preset: tiny, overrides: { num_layers: 3 } }\n\
data: { corpus: builtin:synthetic, seq_len: 8, batch_size: 2, eval_fraction: 0.1, synthetic_tokens: 3000 }\n\
regime: segprop\nsegprop: { base_depth: 1, head_layers: 1, segment_size: 1, head_policy: reset, \
exit: { stage1: { max_steps: 2 }, segment: { max_steps: 2 } } }\noptimizer: { lr: 1.0e-3 }\nseed: 3\n";

fn trainer(dir: &Path, extra: &str) -> Trainer<B> {
    let spec = JobSpec::from_yaml_str(&format!("{SPEC}{extra}"), "fuzz-ckpt.yaml").unwrap();
    Trainer::new(spec, Default::default(), dir).unwrap()
}

/// The loaded model runs a forward pass with the job's shapes.
fn runs(t: &Trainer<B>) {
    let tokens = Tensor::<B, 2, Int>::from_data(
        TensorData::new(vec![1i64, 2, 3, 4, 5, 6, 7, 8], [1, 8]),
        &Default::default(),
    );
    let logits = t.model.forward(tokens, &t.config);
    assert_eq!(logits.dims()[2], t.config.vocab_size);
}

/// Mutants of `file` in a copy of checkpoint `saved`, each loaded into `t` (`whole`: a trainer
/// that holds the model whole, whose loaded model then runs).
fn fuzz_file(t: &mut Trainer<B>, saved: &Path, file: &str, (n, seed): (usize, u64), whole: bool) {
    let work = saved.with_extension("fuzz");
    let original = std::fs::read(saved.join(file)).unwrap();
    let seeds = vec![(file.to_string(), original)];
    let loaded = std::cell::Cell::new(0usize);
    mutate::fuzz(&seeds, n, seed, |bytes| {
        let _ = std::fs::remove_dir_all(&work);
        copy_dir(saved, &work);
        std::fs::write(work.join(file), bytes).unwrap();
        match checkpoint::load(t, &work, None) {
            Ok(()) => {
                loaded.set(loaded.get() + 1);
                // A sharded trainer's `model` holds placeholders; its units are checked on load.
                if whole {
                    runs(t);
                }
            }
            Err(e) => {
                let message = e.to_string();
                assert!(
                    message.contains("fuzz"),
                    "the error names no file: {message}"
                );
            }
        }
    });
    assert!(loaded.get() > 0, "{file}: the checkpoint as saved loads");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let target = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &target);
        } else {
            std::fs::copy(&p, &target).unwrap();
        }
    }
}

#[test]
fn no_checkpoint_makes_the_reader_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = trainer(&tmp.path().join("run"), "");
    run_next_stage(
        &mut t,
        &mut segprop_train::metrics::RecordingObserver::default(),
    )
    .unwrap();
    let saved = tmp.path().join("ckpt");
    checkpoint::save(&t, None, &saved).unwrap();
    let mut fresh = trainer(&tmp.path().join("fresh"), "");
    fuzz_file(
        &mut fresh,
        &saved,
        "state.yaml",
        (mutate::cases(400), 61),
        true,
    );
    fuzz_file(
        &mut fresh,
        &saved,
        "weights.bin",
        (mutate::cases(400), 62),
        true,
    );
}

#[test]
fn no_sharded_checkpoint_manifest_makes_the_reader_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = "sharding: { strategy: full_shard }\nresources: { devices_per_gang: 1 }\n";
    let spec = JobSpec::from_yaml_str(&format!("{SPEC}{extra}"), "fuzz-ckpt.yaml").unwrap();
    let saved = tmp.path().join("ckpt");
    // A gang of one rank: its trainer holds sharded units and reads sharded checkpoints.
    segprop_train::gang::train_gang::<B, _>(
        &spec,
        vec![Default::default()],
        &tmp.path().join("run"),
        |t| {
            checkpoint::save_sharded(t, None, &saved)?;
            fuzz_file(t, &saved, "shards.json", (mutate::cases(300), 63), false);
            Ok(())
        },
        |_| Ok(()),
    )
    .unwrap();
}
