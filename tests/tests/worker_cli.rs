//! End-to-end: the `segprop-worker` binary as a user runs it.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use segprop_core::JobSpec;
use segprop_train::{CpuBackend, Trainer};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The worker binary of this build (target/<profile>/segprop-worker), built on first use with
/// the same cargo and profile as this test.
fn worker() -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let bin = dir.join(format!("segprop-worker{}", std::env::consts::EXE_SUFFIX));
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "segprop-worker"])
            .current_dir(repo());
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().unwrap();
        assert!(status.success(), "building segprop-worker failed");
    });
    assert!(bin.is_file(), "{} is missing", bin.display());
    bin
}

fn run(args: &[&str]) -> Output {
    Command::new(worker())
        .args(args)
        .env("SEGPROP_LOG", "warn")
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn train(job: &str, out: &Path) -> serde_json::Value {
    let job = repo().join("configs/jobs").join(job);
    let result = run(&[
        "train",
        job.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(result.status.success(), "train failed: {}", stderr(&result));
    for file in [
        "job.yaml",
        "metrics.jsonl",
        "summary.json",
        "summary.txt",
        "loss.svg",
        "model/config.json",
    ] {
        assert!(
            out.join(file).is_file(),
            "{file} is missing from the run directory"
        );
    }
    // One file, or (a sharded job: one file per unit) an index of them.
    assert!(
        out.join("model/model.safetensors").is_file()
            || out.join("model/model.safetensors.index.json").is_file(),
        "no weights in {}",
        out.join("model").display()
    );
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn train_writes_a_loadable_model_whose_eval_loss_matches_the_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let summary = train("tiny-segprop.yaml", &out);
    assert_eq!(summary["regime"], "segprop");
    assert_eq!(summary["stages"].as_array().unwrap().len(), 3);
    assert_eq!(summary["total_steps"], 60);

    // Every step, eval and stage end is in metrics.jsonl.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps = metrics
        .lines()
        .filter(|l| l.contains("\"event\":\"step\""))
        .count();
    assert_eq!(steps, 60);
    assert!(
        metrics
            .lines()
            .last()
            .unwrap()
            .contains("\"event\":\"run_finished\"")
    );

    // The exported model is an ordinary HF checkpoint: import it into a trainer for the same
    // spec and evaluate it with a full forward; the loss is the one the run reported.
    let spec = JobSpec::from_file(&repo().join("configs/jobs/tiny-segprop.yaml")).unwrap();
    let mut trainer =
        Trainer::<CpuBackend>::new(spec, Default::default(), &tmp.path().join("w")).unwrap();
    let (model, config) =
        segprop_model::hf::import::<CpuBackend>(&out.join("model"), &Default::default()).unwrap();
    assert_eq!(config.num_layers, 6);
    trainer.model = model;
    let reloaded = trainer.evaluate_full_model();
    let reported = summary["final_eval_loss"].as_f64().unwrap();
    assert!(
        (reloaded - reported).abs() < 1e-5,
        "reloaded {reloaded} vs reported {reported}"
    );
}

#[test]
fn every_regime_runs_from_its_config() {
    let tmp = tempfile::tempdir().unwrap();
    for (job, stages) in [("tiny-lw.yaml", 6), ("tiny-e2e.yaml", 1)] {
        let summary = train(job, &tmp.path().join(job));
        assert_eq!(summary["stages"].as_array().unwrap().len(), stages, "{job}");
        assert_eq!(summary["total_steps"], 60, "{job}");
    }
}

#[test]
fn global_early_exit_exports_a_pruned_model() {
    let tmp = tempfile::tempdir().unwrap();
    let summary = train("tiny-segprop-early-exit.yaml", tmp.path());
    assert_eq!(summary["early_exit"], "target_reached");
    // 8 blocks, p = 2, r = 2: stage 1 + one segment committed -> blocks 0..3 + 6..8.
    assert_eq!(summary["final_num_layers"], 5);
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("model/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["num_hidden_layers"], 5);
}

/// The exported model as an outside reader sees it (scripts/read_hf_checkpoint.py: numpy only).
fn read_with_python(model: &Path) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(repo().join("scripts/read_hf_checkpoint.py"))
        .arg(model)
        .output()
        .unwrap();
    assert!(out.status.success(), "reader failed: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_bf16_job_trains_sharded_and_exports_a_bf16_model_an_outside_reader_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let summary = train("tiny-bf16.yaml", &out);
    assert_eq!(summary["total_steps"], 60);
    let last = summary["final_eval_loss"].as_f64().unwrap();
    assert!(last.is_finite() && last < 5.0, "eval loss {last}");
    let read = read_with_python(&out.join("model"));
    assert_eq!(read["torch_dtype"], "bfloat16");
    let tensors = read["tensors"].as_object().unwrap();
    // 6 blocks of 9 tensors, the embedding, the final norm and the LM head, all BF16.
    assert_eq!(tensors.len(), 6 * 9 + 3);
    assert!(tensors.values().all(|t| t[0] == "BF16"), "{tensors:?}");
    assert_eq!(
        tensors["model.layers.5.mlp.down_proj.weight"][1],
        serde_json::json!([64, 192])
    );
    assert_eq!(read["logits_shape"], serde_json::json!([1, 8, 256]));
    assert_eq!(read["logits_finite"], true);

    // The f32 job's export reads back as F32 through the same reader.
    let f32_out = tmp.path().join("f32");
    train("tiny-segprop.yaml", &f32_out);
    let read = read_with_python(&f32_out.join("model"));
    assert_eq!(read["torch_dtype"], "float32");
    assert!(
        read["tensors"]
            .as_object()
            .unwrap()
            .values()
            .all(|t| t[0] == "F32")
    );
}

/// A tiny random HF checkpoint from scripts/make_tiny_llama.py.
fn make_checkpoint(dir: &Path, args: &[&str]) {
    let status = Command::new("python3")
        .arg(repo().join("scripts/make_tiny_llama.py"))
        .arg(dir)
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "make_tiny_llama.py failed");
}

fn write_spec(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("job.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn assert_rejected(text: &str, expected: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let path = write_spec(tmp.path(), text);
    let out_dir = tmp.path().join("out");
    let result = run(&[
        "train",
        path.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(
        result.status.code(),
        Some(2),
        "expected exit 2: {}",
        stderr(&result)
    );
    let message = stderr(&result);
    for needle in expected {
        assert!(message.contains(needle), "`{needle}` not in: {message}");
    }
    assert!(
        !out_dir.exists(),
        "a rejected job must not create its run directory"
    );
}

#[test]
fn invalid_specs_exit_2_naming_the_field_and_line() {
    let base = std::fs::read_to_string(repo().join("configs/jobs/tiny-segprop.yaml")).unwrap();
    // Unknown field.
    assert_rejected(
        &base.replace("  head_layers: 2\n", "  head_layers: 2\n  head_layrs: 2\n"),
        &["head_layrs", "job.yaml:10"],
    );
    // Wrong type.
    assert_rejected(
        &base.replace("seed: 17", "seed: seventeen"),
        &["seed", "job.yaml:19"],
    );
    // p + r beyond the model's layers.
    assert_rejected(
        &base.replace("base_depth: 2", "base_depth: 5"),
        &[
            "segprop.base_depth",
            "job.yaml:8",
            "exceeds the model's 6 layers",
        ],
    );
    // Missing data file.
    assert_rejected(
        &base.replace("builtin:synthetic", "no-such-corpus.txt"),
        &["data.corpus", "no-such-corpus.txt", "does not exist"],
    );
    // Malformed YAML.
    assert_rejected("version: 1\nname: [unclosed\n", &["job.yaml"]);
    // Device-resident shards asked of CPU ranks.
    let sharded = std::fs::read_to_string(repo().join("configs/jobs/tiny-sharded.yaml")).unwrap();
    assert_rejected(
        &sharded.replace("offload: cpu", "offload: none"),
        &["sharding.offload", "device memory"],
    );
}

#[test]
fn missing_spec_file_is_bad_input() {
    let result = run(&["train", "/nonexistent/job.yaml"]);
    assert_eq!(result.status.code(), Some(2));
    assert!(stderr(&result).contains("/nonexistent/job.yaml"));
}

#[test]
fn validate_prints_the_stage_plan() {
    let job = repo().join("configs/jobs/tiny-segprop.yaml");
    let result = run(&["validate", job.to_str().unwrap()]);
    assert!(result.status.success(), "{}", stderr(&result));
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        stdout.contains("stage1")
            && stdout.contains("segment-2-3")
            && stdout.contains("segment-3-4"),
        "{stdout}"
    );
}

#[test]
fn fine_tunes_an_imported_hf_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    make_checkpoint(&ckpt, &["--seed", "4", "--shards", "2", "--vocab", "256"]);
    let job = format!(
        "version: 1\nname: from-hf\nmodel: {{ from: {{ hf_dir: {} }} }}\n\
         data: {{ corpus: builtin:synthetic, seq_len: 16, batch_size: 4, synthetic_tokens: 8000 }}\n\
         regime: segprop\n\
         segprop: {{ base_depth: 1, head_layers: 1, exit: {{ stage1: {{ max_steps: 4 }}, segment: {{ max_steps: 3 }} }} }}\n\
         eval: {{ every_steps: 2, max_batches: 2 }}\nseed: 1\n",
        ckpt.display()
    );
    let path = write_spec(tmp.path(), &job);
    let out = tmp.path().join("out");
    let result = run(&[
        "train",
        path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["total_steps"], 7);
    // The checkpoint's shape (GQA, LLaMA-3 rotary scaling) survives the round trip.
    let exported = segprop_model::hf::read_config(&out.join("model")).unwrap();
    let imported = segprop_model::hf::read_config(&ckpt).unwrap();
    assert_eq!(exported, imported);
    assert_eq!(exported.num_kv_heads, 2);
    assert!(exported.rope_scaling.is_some());
}

#[test]
fn a_corrupt_checkpoint_is_bad_input_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    make_checkpoint(&ckpt, &["--vocab", "256"]);
    let weights = ckpt.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 3]).unwrap();
    let job = format!(
        "version: 1\nname: corrupt\nmodel: {{ from: {{ hf_dir: {} }} }}\n\
         data: {{ corpus: builtin:synthetic, seq_len: 16, batch_size: 4, synthetic_tokens: 8000 }}\n\
         regime: e2e\n",
        ckpt.display()
    );
    let path = write_spec(tmp.path(), &job);
    let result = run(&[
        "train",
        path.to_str().unwrap(),
        "--out",
        tmp.path().join("out").to_str().unwrap(),
    ]);
    assert_eq!(result.status.code(), Some(2), "{}", stderr(&result));
    assert!(
        stderr(&result).contains("model.safetensors"),
        "{}",
        stderr(&result)
    );
}

/// `train` runs a `full_shard` job as a gang of CPU ranks: the summary reports what a rank held,
/// and the result is the unsharded run's (same global batch; float sums in another order).
#[test]
fn a_sharded_job_trains_like_the_unsharded_one() {
    let tmp = tempfile::tempdir().unwrap();
    let sharded = train("tiny-sharded.yaml", &tmp.path().join("sharded"));
    let text = std::fs::read_to_string(repo().join("configs/jobs/tiny-sharded.yaml")).unwrap();
    let plain = text
        .replace("devices_per_gang: 2", "devices_per_gang: 1")
        .replace(
            "sharding: { strategy: full_shard, offload: cpu, collective_timeout_s: 60 }",
            "sharding: { strategy: none }",
        )
        .replace(
            "activation_checkpointing: true",
            "activation_checkpointing: false",
        );
    assert_ne!(plain, text);
    let plain_job = tmp.path().join("plain.yaml");
    std::fs::write(&plain_job, plain).unwrap();
    let out = tmp.path().join("plain");
    let result = run(&[
        "train",
        plain_job.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    let plain: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();

    let stages = sharded["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 3);
    for (s, p) in stages.iter().zip(plain["stages"].as_array().unwrap()) {
        assert_eq!(s["sharding"]["world"], 2, "{s}");
        assert!(p["sharding"].is_null());
        let (a, b) = (
            s["final_train_loss"].as_f64().unwrap(),
            p["final_train_loss"].as_f64().unwrap(),
        );
        assert!((a - b).abs() / b < 1e-5, "{}: {a} vs {b}", s["stage"]);
    }
    let (a, b) = (
        sharded["final_eval_loss"].as_f64().unwrap(),
        plain["final_eval_loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() / b < 1e-5, "final eval loss {a} vs {b}");
    let summary = std::fs::read_to_string(tmp.path().join("sharded/summary.txt")).unwrap();
    assert!(summary.contains("sharded over 2 ranks"), "{summary}");
}

/// `train --checkpoint-every` on a gang writes sharded checkpoints (one file per rank and a
/// manifest); `--resume` continues one on another number of ranks to the same end, and refuses,
/// with exit 2 and before writing anything, a checkpoint of another model shape or with a
/// corrupt shard file.
#[test]
fn a_sharded_run_checkpoints_and_resumes_on_another_number_of_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let first = tmp.path().join("first");
    let job = repo().join("configs/jobs/tiny-sharded.yaml");
    let result = run(&[
        "train",
        job.to_str().unwrap(),
        "--out",
        first.to_str().unwrap(),
        "--quiet",
        "--checkpoint-every",
        "10",
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    let ckpt = first.join("checkpoints/stage1-step000010");
    for name in [
        "rank-00001-of-00002.bin",
        "rank-00002-of-00002.bin",
        "shards.json",
        "state.yaml",
    ] {
        assert!(ckpt.join(name).is_file(), "{name} in {}", ckpt.display());
    }
    let done: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(first.join("summary.json")).unwrap())
            .unwrap();

    // One rank picks up where the two left off.
    let text = std::fs::read_to_string(&job).unwrap();
    let one = tmp.path().join("one.yaml");
    std::fs::write(
        &one,
        text.replace("devices_per_gang: 2", "devices_per_gang: 1"),
    )
    .unwrap();
    let resumed = tmp.path().join("resumed");
    let result = run(&[
        "train",
        one.to_str().unwrap(),
        "--out",
        resumed.to_str().unwrap(),
        "--quiet",
        "--resume",
        ckpt.to_str().unwrap(),
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(resumed.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["total_steps"], done["total_steps"]);
    let (a, b) = (
        summary["final_eval_loss"].as_f64().unwrap(),
        done["final_eval_loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() / b < 1e-4, "final eval loss {a} vs {b}");
    // The export of a gang is one file per unit, with an index.
    assert!(resumed.join("model/model.safetensors.index.json").is_file());
    assert!(
        resumed
            .join("model/model-00001-of-00008.safetensors")
            .is_file()
    );

    // Another model shape: refused naming the field and the file, nothing written.
    let wider = tmp.path().join("wider.yaml");
    std::fs::write(
        &wider,
        text.replace(
            "overrides: { num_layers: 6 }",
            "overrides: { num_layers: 6, hidden_size: 96 }",
        ),
    )
    .unwrap();
    let refused = tmp.path().join("refused");
    let result = run(&[
        "train",
        wider.to_str().unwrap(),
        "--out",
        refused.to_str().unwrap(),
        "--resume",
        ckpt.to_str().unwrap(),
    ]);
    assert_eq!(result.status.code(), Some(2), "{}", stderr(&result));
    let message = stderr(&result);
    assert!(
        message.contains("hidden_size") && message.contains("state.yaml"),
        "{message}"
    );
    assert!(!refused.exists(), "nothing written");

    // A corrupt shard file: refused naming it.
    let file = ckpt.join("rank-00002-of-00002.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[64] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let result = run(&[
        "train",
        job.to_str().unwrap(),
        "--out",
        refused.to_str().unwrap(),
        "--resume",
        ckpt.to_str().unwrap(),
    ]);
    assert_eq!(result.status.code(), Some(2), "{}", stderr(&result));
    assert!(
        stderr(&result).contains("rank-00002-of-00002.bin"),
        "{}",
        stderr(&result)
    );
    assert!(!refused.exists(), "nothing written");
}
