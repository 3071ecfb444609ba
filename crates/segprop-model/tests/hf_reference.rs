//! Imports a tiny random HF checkpoint written by `scripts/make_tiny_llama.py` and compares the
//! logits with the script's independent numpy forward pass. Needs python3 with numpy (`.ci/run`
//! installs it).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::NdArray;
use burn::prelude::*;
use segprop_model::hf;

type B = NdArray;

fn make_checkpoint(dir: &Path, shards: usize) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make_tiny_llama.py");
    let status = Command::new("python3")
        .arg(&script)
        .arg(dir)
        .args(["--seed", "11", "--shards", &shards.to_string()])
        .status()
        .expect("python3 runs");
    assert!(status.success(), "{} failed", script.display());
}

fn check_against_reference(shards: usize) {
    let tmp = tempfile::tempdir().unwrap();
    make_checkpoint(tmp.path(), shards);
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("reference.json")).unwrap())
            .unwrap();
    let tokens: Vec<i64> = reference["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|t| t.as_i64().unwrap()))
        .collect();
    let expected: Vec<f64> = reference["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let seq = reference["shape"][1].as_u64().unwrap() as usize;

    let device = Default::default();
    let (model, config) = hf::import::<B>(tmp.path(), &device).unwrap();
    assert_eq!(config.num_kv_heads, 2);
    assert!(config.rope_scaling.is_some());
    let input = Tensor::<B, 2, Int>::from_data(
        TensorData::new(tokens.clone(), [tokens.len() / seq, seq]),
        &device,
    );
    let logits: Vec<f32> = model
        .forward(input, &config)
        .into_data()
        .into_vec()
        .unwrap();
    assert_eq!(logits.len(), expected.len());
    let max_err = logits
        .iter()
        .zip(&expected)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(max_err < 1e-4, "max |logit - reference| = {max_err}");
}

#[test]
fn single_file_checkpoint_matches_numpy_reference() {
    check_against_reference(1);
}

#[test]
fn sharded_checkpoint_matches_numpy_reference() {
    check_against_reference(3);
}
