//! Real checkpoints (issue 22): Hugging Face transformers writes small random LLaMA and Mistral
//! checkpoints (one with `head_dim` != hidden / heads, one with tied embeddings) with a BPE
//! tokenizer trained on the King James Bible; segprop imports them to the same logits,
//! fine-tunes them with SegProp (text, and chat JSONL with the loss on assistant turns only,
//! through `segprop-coord submit`), exports, and transformers reloads the export and computes
//! the held-out loss segprop reported, by its own code (scripts/hf_interop.py).
//!
//! Needs python3 with torch, transformers and tokenizers, and Debian bible-kjv (.ci/run
//! installs them).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::prelude::*;
use common::*;
use segprop_proto::v1 as pb;
use segprop_train::CpuBackend;

/// Runs `scripts/hf_interop.py ARGS` and parses the JSON it prints.
fn python(args: &[&str]) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(repo().join("scripts/hf_interop.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hf_interop.py {args:?} failed: {}",
        text(&out.stderr)
    );
    serde_json::from_str(text(&out.stdout).trim()).unwrap()
}

/// The KJV corpus (scripts/prepare_corpora.py) under `dir`, a text corpus of its first verses,
/// and a byte-level BPE tokenizer trained on it (vocabulary 384).
struct Fixture {
    text: PathBuf,
    verses: Vec<String>,
    tokenizer: PathBuf,
}

fn fixture(dir: &Path) -> Fixture {
    let status = Command::new("python3")
        .arg(repo().join("scripts/prepare_corpora.py"))
        .args(["--only", "kjv", "--out"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success(), "scripts/prepare_corpora.py failed");
    let kjv = dir.join("kjv.txt");
    let verses: Vec<String> = std::fs::read_to_string(&kjv)
        .unwrap()
        .lines()
        .take(4000)
        .map(str::to_string)
        .collect();
    let text = dir.join("genesis.txt");
    std::fs::write(&text, verses[..300].join("\n")).unwrap();
    let tokenizer = dir.join("tokenizer");
    let made = python(&[
        "tokenizer",
        tokenizer.to_str().unwrap(),
        "--corpus",
        kjv.to_str().unwrap(),
        "--vocab",
        "384",
    ]);
    assert_eq!(made["vocab_size"], 384);
    Fixture {
        text,
        verses,
        tokenizer,
    }
}

/// A transformers checkpoint in `dir` with the fixture's tokenizer.
fn checkpoint(f: &Fixture, dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["make", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    all.extend(["--tokenizer", f.tokenizer.to_str().unwrap()]);
    python(&all)
}

/// segprop's import of `dir` reproduces the logits transformers wrote in reference.json.
fn assert_import_matches_transformers(dir: &Path) {
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let rows = reference["tokens"].as_array().unwrap();
    let tokens: Vec<i64> = rows
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|t| t.as_i64().unwrap()))
        .collect();
    let seq = tokens.len() / rows.len();
    let want: Vec<f32> = reference["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter())
        .flat_map(|p| {
            p.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
        })
        .collect();
    let device = Default::default();
    let (model, config) = segprop_model::hf::import::<CpuBackend>(dir, &device).unwrap();
    let input = Tensor::<CpuBackend, 2, Int>::from_data(
        TensorData::new(tokens, [rows.len(), seq]),
        &device,
    );
    let got: Vec<f32> = model
        .forward(input, &config)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!(
        "{}: import vs transformers logits, max |diff| {worst:e}",
        dir.display()
    );
    assert!(worst < 1e-4, "{}: logits differ by {worst}", dir.display());
}

fn write_job(dir: &Path, name: &str, ckpt: &Path, data: &str) -> PathBuf {
    let text = format!(
        "version: 1\nname: {name}\nmodel: {{ from: {{ hf_dir: {} }} }}\n\
         data: {data}\n\
         regime: segprop\n\
         segprop: {{ base_depth: 1, head_layers: 1, exit: {{ stage1: {{ max_steps: 4 }}, segment: {{ max_steps: 2 }} }} }}\n\
         optimizer: {{ lr: 0.003 }}\n\
         eval: {{ every_steps: 2, max_batches: 0 }}\nseed: 1\n",
        ckpt.display()
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// `segprop-worker train JOB --out OUT`: the run's summary.
fn train(job: &Path, out: &Path) -> serde_json::Value {
    let result = Command::new(bin("segprop-worker"))
        .args(["train", job.to_str().unwrap(), "--quiet", "--out"])
        .arg(out)
        .env("SEGPROP_LOG", "warn")
        .output()
        .unwrap();
    assert!(result.status.success(), "{}", text(&result.stderr));
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

/// transformers' held-out loss of the model in `dir` on the job's data (scripts/hf_interop.py).
fn transformers_loss(dir: &Path, data: &Path, format: &str, packing: bool, seq: &str) -> f64 {
    let reference = python(&[
        "eval-loss",
        dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--format",
        format,
        "--seq-len",
        seq,
        "--batch-size",
        "4",
        "--eval-fraction",
        "0.1",
        "--packing",
        if packing { "true" } else { "false" },
    ]);
    assert!(reference["tokens"].as_u64().unwrap() > 0, "{reference}");
    reference["loss"].as_f64().unwrap()
}

#[test]
fn transformers_checkpoints_import_train_export_and_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let f = fixture(dir);
    for (name, args, head_dim) in [
        ("llama", &["--arch", "llama"][..], 8),
        (
            "mistral-head-dim",
            &["--arch", "mistral", "--head-dim", "16"][..],
            16,
        ),
        ("llama-tied", &["--arch", "llama", "--tied"][..], 8),
    ] {
        let ckpt = dir.join(name);
        let made = checkpoint(&f, &ckpt, args);
        assert_eq!(made["head_dim"], head_dim);
        assert_import_matches_transformers(&ckpt);

        // A few SegProp steps on KJV text, tokenized by the checkpoint's own tokenizer (the
        // default when the checkpoint ships one).
        let data = format!(
            "{{ corpus: {}, seq_len: 32, batch_size: 4, eval_fraction: 0.1 }}",
            f.text.display()
        );
        let job = write_job(dir, name, &ckpt, &data);
        let out = dir.join(format!("{name}-run"));
        let summary = train(&job, &out);
        let model = out.join("model");
        let exported = segprop_model::hf::read_config(&model).unwrap();
        let imported = segprop_model::hf::read_config(&ckpt).unwrap();
        assert_eq!(exported.model_type, imported.model_type, "{name}");
        assert_eq!(exported.head_dim(), head_dim, "{name}");
        assert!(
            model.join("tokenizer.json").is_file(),
            "{name}: tokenizer not exported"
        );

        // transformers reloads the export and computes the held-out loss segprop reported.
        let reported = summary["final_eval_loss"].as_f64().unwrap();
        let reference = transformers_loss(&model, &f.text, "text", true, "32");
        eprintln!("{name}: held-out loss segprop {reported:.7} transformers {reference:.7}");
        assert!(
            (reported - reference).abs() < 1e-4,
            "{name}: segprop {reported} vs transformers {reference}"
        );
    }
}

/// Chat examples from KJV verses: prompt/completion pairs, and multi-turn conversations with a
/// system message.
fn write_chat(f: &Fixture, path: &Path) {
    let mut lines = Vec::new();
    for (i, pair) in f.verses[300..].chunks(2).take(160).enumerate() {
        let (a, b) = (&pair[0], &pair[1]);
        let line = if i % 3 == 0 {
            serde_json::json!({ "messages": [
                { "role": "system", "content": "Answer with the next verse." },
                { "role": "user", "content": a },
                { "role": "assistant", "content": b },
                { "role": "user", "content": "And then?" },
                { "role": "assistant", "content": a },
            ]})
        } else {
            serde_json::json!({ "prompt": a, "completion": b })
        };
        lines.push(line.to_string());
    }
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn a_chat_fine_tune_through_the_coordinator_takes_the_loss_on_assistant_turns_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let f = fixture(dir);
    let ckpt = dir.join("ckpt");
    checkpoint(&f, &ckpt, &["--arch", "llama"]);
    let chat = dir.join("chat.jsonl");
    write_chat(&f, &chat);

    // Packed, through the coordinator and a worker daemon.
    let data = format!(
        "{{ corpus: {}, format: chat, packing: true, seq_len: 48, batch_size: 4, eval_fraction: 0.1 }}",
        chat.display()
    );
    let job = write_job(dir, "chat-packed", &ckpt, &data);
    let coord = coordinator(dir, "127.0.0.1:0");
    let _w = worker(dir, &coord, "w1");
    let out = coord_cli(&coord, &["submit", job.to_str().unwrap(), "--watch"], TOKEN);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let job_id = text(&out.stdout).trim().to_string();
    let state = get_job(&coord, &job_id);
    assert_eq!(common::state(&state), pb::JobState::Succeeded);
    let run_dir = PathBuf::from(&state.run_dir);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    let reported = summary["final_eval_loss"].as_f64().unwrap();
    // transformers' rendering (apply_chat_template), masks and loss over the assistant
    // positions, on the exported model.
    let reference = transformers_loss(&run_dir.join("model"), &chat, "chat", true, "48");
    eprintln!("chat packed: held-out loss segprop {reported:.7} transformers {reference:.7}");
    assert!(
        (reported - reference).abs() < 1e-4,
        "packed: segprop {reported} vs transformers {reference}"
    );

    // One example per row, padded, standalone.
    let data = format!(
        "{{ corpus: {}, format: chat, packing: false, seq_len: 96, batch_size: 4, eval_fraction: 0.1 }}",
        chat.display()
    );
    let job = write_job(dir, "chat-padded", &ckpt, &data);
    let out = dir.join("padded-run");
    let summary = train(&job, &out);
    let reported = summary["final_eval_loss"].as_f64().unwrap();
    let reference = transformers_loss(&out.join("model"), &chat, "chat", false, "96");
    eprintln!("chat padded: held-out loss segprop {reported:.7} transformers {reference:.7}");
    assert!(
        (reported - reference).abs() < 1e-4,
        "padded: segprop {reported} vs transformers {reference}"
    );
}

#[test]
fn bad_checkpoints_tokenizers_and_chat_files_exit_2_naming_them_and_create_no_job() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let f = fixture(dir);
    let ckpt = dir.join("ckpt");
    checkpoint(&f, &ckpt, &["--arch", "mistral", "--head-dim", "16"]);
    let coord = coordinator(dir, "127.0.0.1:0");
    let chat = dir.join("chat.jsonl");
    write_chat(&f, &chat);
    let text_data = format!(
        "{{ corpus: {}, seq_len: 32, batch_size: 4 }}",
        f.text.display()
    );
    let chat_data = |file: &Path| {
        format!(
            "{{ corpus: {}, format: chat, seq_len: 48, batch_size: 4 }}",
            file.display()
        )
    };

    let mut cases: Vec<(PathBuf, Vec<String>)> = Vec::new();
    // An unknown model_type, and a config key that changes the math.
    for (key, value, named) in [
        ("model_type", "\"qwen2\"", "`model_type`"),
        ("attention_bias", "true", "`attention_bias`"),
    ] {
        let bad = dir.join(format!("ckpt-{key}"));
        std::fs::create_dir_all(&bad).unwrap();
        for entry in std::fs::read_dir(&ckpt).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), bad.join(entry.file_name())).unwrap();
        }
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(bad.join("config.json")).unwrap())
                .unwrap();
        config[key] = serde_json::from_str(value).unwrap();
        std::fs::write(bad.join("config.json"), config.to_string()).unwrap();
        cases.push((
            write_job(dir, &format!("bad-{key}"), &bad, &text_data),
            vec![named.into(), "config.json".into()],
        ));
    }
    // A tokenizer that is not the checkpoint's.
    let gpt2 = text_data.replace("seq_len", "tokenizer: gpt2, seq_len");
    cases.push((
        write_job(dir, "bad-tokenizer", &ckpt, &gpt2),
        vec!["data.tokenizer".into(), "tokenizer.json".into()],
    ));
    // A broken chat line (line 3), and a template that fails to render.
    let broken = dir.join("broken.jsonl");
    let good = std::fs::read_to_string(&chat).unwrap();
    let mut lines: Vec<&str> = good.lines().take(5).collect();
    lines[2] = "{\"messages\": [{\"role\": \"user\"}]}";
    std::fs::write(&broken, lines.join("\n")).unwrap();
    cases.push((
        write_job(dir, "bad-chat", &ckpt, &chat_data(&broken)),
        vec![
            "data.corpus".into(),
            "broken.jsonl line 3".into(),
            "has no `content`".into(),
        ],
    ));
    let raising = dir.join("raising");
    std::fs::create_dir_all(&raising).unwrap();
    for entry in std::fs::read_dir(&ckpt).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), raising.join(entry.file_name())).unwrap();
    }
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(raising.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    config["chat_template"] = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}".into();
    std::fs::write(raising.join("tokenizer_config.json"), config.to_string()).unwrap();
    cases.push((
        write_job(dir, "bad-template", &raising, &chat_data(&chat)),
        vec![
            "chat.jsonl line 1".into(),
            "System role not supported".into(),
        ],
    ));

    for (job, expected) in cases {
        let out = coord_cli(&coord, &["submit", job.to_str().unwrap()], TOKEN);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}: {}",
            job.display(),
            text(&out.stderr)
        );
        let stderr = text(&out.stderr);
        for e in &expected {
            assert!(
                stderr.contains(e.as_str()),
                "{}: expected {e:?} in {stderr}",
                job.display()
            );
        }
    }
    let list = coord_cli(&coord, &["list"], TOKEN);
    assert!(list.status.success());
    assert!(
        !text(&list.stdout).contains("bad-"),
        "a refused job was created: {}",
        text(&list.stdout)
    );
}
