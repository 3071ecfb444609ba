//! Tests of the job spec: parsing, defaults, and validation messages with field and line.

use super::*;

const TINY: &str = "\
version: 1
name: tiny
model: { family: llama, preset: tiny }
data: { corpus: builtin:synthetic, tokenizer: byte, seq_len: 32, batch_size: 4 }
regime: segprop
segprop:
  base_depth: 2
  head_layers: 2
  exit: { stage1: { max_steps: 10 }, segment: { max_steps: 5 } }
seed: 3
";

#[test]
fn parses_a_valid_spec_with_defaults() {
    let spec = JobSpec::from_yaml_str(TINY, "job.yaml").unwrap();
    assert_eq!(spec.regime, Regime::Segprop);
    assert_eq!(spec.segprop.segment_size, 1);
    assert_eq!(spec.optimizer.name, "adamw");
    assert_eq!(spec.model_config().unwrap().num_layers, 8);
}

#[test]
fn where_shards_live_is_checked_per_backend() {
    let with = |backend: &str, offload: &str| {
        let text = format!(
            "{TINY}sharding: {{ strategy: full_shard{offload} }}\n\
             resources: {{ backend: {backend} }}\n"
        );
        JobSpec::from_yaml_str(&text, "job.yaml").map_err(|e| e.to_string())
    };
    // CUDA: device memory or host memory, but it must be said.
    assert!(with("cuda", ", offload: none").is_ok());
    assert!(with("cuda", ", offload: cpu").is_ok());
    let err = with("cuda", "").unwrap_err();
    assert!(
        err.contains("sharding.offload") && err.contains("offload: none"),
        "{err}"
    );
    // CPU ranks have no device memory.
    assert!(with("cpu", "").is_ok());
    let err = with("cpu", ", offload: none").unwrap_err();
    assert!(
        err.contains("sharding.offload") && err.contains("device memory"),
        "{err}"
    );
}

#[test]
fn unknown_field_is_named_with_its_line() {
    let text = TINY.replace("  head_layers: 2\n", "  head_layers: 2\n  head_layrs: 3\n");
    let err = JobSpec::from_yaml_str(&text, "job.yaml").unwrap_err();
    let message = err.to_string();
    assert!(message.contains("head_layrs"), "{message}");
    assert!(message.starts_with("job.yaml:9:"), "{message}");
}

#[test]
fn wrong_type_is_named() {
    let text = TINY.replace("seed: 3", "seed: three");
    let message = JobSpec::from_yaml_str(&text, "job.yaml")
        .unwrap_err()
        .to_string();
    assert!(message.contains("seed"), "{message}");
    assert!(message.starts_with("job.yaml:10:"), "{message}");
}

#[test]
fn depth_beyond_the_model_is_rejected_with_field_and_line() {
    let text = TINY.replace("base_depth: 2", "base_depth: 7");
    let err = JobSpec::from_yaml_str(&text, "job.yaml").unwrap_err();
    assert_eq!(err.field(), Some("segprop.base_depth"));
    assert_eq!(err.line, Some(7));
    assert!(err.to_string().contains("exceeds the model's 8 layers"));
}

#[test]
fn missing_corpus_file_is_rejected() {
    let dir = std::env::temp_dir().join(format!("segprop-spec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("job.yaml");
    std::fs::write(&path, TINY.replace("builtin:synthetic", "no-such-file.txt")).unwrap();
    let err = JobSpec::from_file(&path).unwrap_err();
    assert_eq!(err.field(), Some("data.corpus"));
    assert_eq!(err.line, Some(4));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_spec_file_is_an_io_error() {
    let err = JobSpec::from_file(Path::new("/nonexistent/job.yaml")).unwrap_err();
    assert!(matches!(err.kind, SpecErrorKind::Io { .. }));
}

#[test]
fn unbounded_stage_is_rejected() {
    let text = TINY.replace("stage1: { max_steps: 10 }", "stage1: { patience: 3 }");
    let err = JobSpec::from_yaml_str(&text, "job.yaml").unwrap_err();
    assert_eq!(err.field(), Some("segprop.exit.stage1"));
}

#[test]
fn micro_batch_is_a_number_or_a_map_by_stage_and_is_checked() {
    let spec = JobSpec::from_yaml_str(TINY, "job.yaml").unwrap();
    assert_eq!(spec.data.micro_batch, None);
    assert_eq!(spec.micro_batch("stage1"), 4);

    let every = TINY.replace("batch_size: 4 }", "batch_size: 4, micro_batch: 3 }");
    let spec = JobSpec::from_yaml_str(&every, "job.yaml").unwrap();
    assert_eq!(spec.micro_batch("stage1"), 3);
    assert_eq!(spec.micro_batch("segment-2-3"), 3);

    let per_stage = format!("{TINY}  \n").replace(
        "batch_size: 4 }",
        "batch_size: 4, micro_batch: { stage1: 2 } }",
    );
    let spec = JobSpec::from_yaml_str(&per_stage, "job.yaml").unwrap();
    assert_eq!(spec.micro_batch("stage1"), 2);
    assert_eq!(spec.micro_batch("segment-2-3"), 4);
    // It survives the coordinator's re-encoding of a resolved spec.
    let again = JobSpec::from_yaml_str(&serde_yaml::to_string(&spec).unwrap(), "again").unwrap();
    assert_eq!(again.data.micro_batch, spec.data.micro_batch);

    let too_big = TINY.replace("batch_size: 4 }", "batch_size: 4, micro_batch: 5 }");
    let err = JobSpec::from_yaml_str(&too_big, "job.yaml").unwrap_err();
    assert_eq!(err.field(), Some("data.micro_batch"));
    assert!(
        err.to_string().contains("exceeds data.batch_size 4"),
        "{err}"
    );

    let zero = TINY.replace(
        "batch_size: 4 }",
        "batch_size: 4, micro_batch: { stage1: 0 } }",
    );
    let err = JobSpec::from_yaml_str(&zero, "job.yaml").unwrap_err();
    assert_eq!(err.field(), Some("data.micro_batch.stage1"));

    let unknown = TINY.replace(
        "batch_size: 4 }",
        "batch_size: 4, micro_batch: { segment-9-10: 2 } }",
    );
    let message = JobSpec::from_yaml_str(&unknown, "job.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("data.micro_batch.segment-9-10"),
        "{message}"
    );
    assert!(
        message.contains("its stages: stage1, segment-2-3"),
        "{message}"
    );

    let wrong = TINY.replace("batch_size: 4 }", "batch_size: 4, micro_batch: lots }");
    let message = JobSpec::from_yaml_str(&wrong, "job.yaml")
        .unwrap_err()
        .to_string();
    assert!(message.contains("`lots` is not a micro-batch"), "{message}");
    let auto = TINY.replace("batch_size: 4 }", "batch_size: 4, micro_batch: auto }");
    let spec = JobSpec::from_yaml_str(&auto, "job.yaml").unwrap();
    assert_eq!(spec.data.micro_batch, Some(MicroBatch::Auto));
    assert_eq!(
        spec.micro_batch("stage1"),
        4,
        "whole batches until resolved"
    );
}

#[test]
fn locate_field_follows_the_path() {
    assert_eq!(locate_field(TINY, "segprop.head_layers"), Some(8));
    assert_eq!(locate_field(TINY, "data.seq_len"), Some(4));
    assert_eq!(locate_field(TINY, "segprop.exit.segment"), Some(9));
}

#[test]
fn keep_best_is_refused_for_sharded_stages_and_accepted_otherwise() {
    let with = |extra: &str| {
        let text = format!("{TINY}eval: {{ every_steps: 5, keep_best: true }}\n{extra}");
        JobSpec::from_yaml_str(&text, "job.yaml").map_err(|e| e.to_string())
    };
    let spec = with("").unwrap();
    assert!(spec.eval.keep_best);
    let err = with("sharding: { strategy: full_shard }\n").unwrap_err();
    assert!(
        err.contains("eval.keep_best") && err.contains("full_shard"),
        "{err}"
    );
}

#[test]
fn tasks_are_checked_by_name_sharding_and_file() {
    let with = |tasks: &str, extra: &str| {
        let text = format!("{TINY}eval: {{ tasks: [{tasks}] }}\n{extra}");
        JobSpec::from_yaml_str(&text, "job.yaml").map_err(|e| e.to_string())
    };
    let spec = with(
        "{ path: a/ending.jsonl }, { path: b/ending.jsonl, name: b }",
        "",
    )
    .unwrap();
    assert_eq!(spec.eval.tasks[0].display_name(), "ending");
    let err = with("{ path: a/ending.jsonl }, { path: b/ending.jsonl }", "").unwrap_err();
    assert!(
        err.contains("eval.tasks[1].name") && err.contains("`ending`"),
        "{err}"
    );
    let err = with("{ path: a.jsonl }", "sharding: { strategy: full_shard }\n").unwrap_err();
    assert!(
        err.contains("eval.tasks") && err.contains("full_shard"),
        "{err}"
    );
    let err = with("{ path: a.jsonl, shots: -1 }", "").unwrap_err();
    assert!(err.contains("shots"), "{err}");

    // Read from a file: the task file is read, relative to the job, and a bad line is named.
    let dir = std::env::temp_dir().join(format!("segprop-spec-tasks-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("tasks")).unwrap();
    let job = dir.join("job.yaml");
    std::fs::write(
        &job,
        format!("{TINY}eval: {{ tasks: [{{ path: tasks/t.jsonl }}] }}\n"),
    )
    .unwrap();
    let err = JobSpec::from_file(&job).unwrap_err().to_string();
    assert!(
        err.contains("eval.tasks[0].path") && err.contains("t.jsonl"),
        "{err}"
    );
    // The command that writes the tasks reads the spec without them.
    assert!(JobSpec::from_file_before_tasks(&job).is_ok());
    std::fs::write(
        dir.join("tasks/t.jsonl"),
        "{\"context\":\"a\",\"choices\":[\" b\",\" c\"],\"gold\":0}\n{\"context\":\"\",\"choices\":[\" b\",\" c\"],\"gold\":0}\n",
    )
    .unwrap();
    let err = JobSpec::from_file(&job).unwrap_err().to_string();
    assert!(
        err.contains("line 2") && err.contains("context is empty"),
        "{err}"
    );
    std::fs::write(
        dir.join("tasks/t.jsonl"),
        "{\"context\":\"a\",\"choices\":[\" b\",\" c\"],\"gold\":0}\n",
    )
    .unwrap();
    let spec = JobSpec::from_file(&job).unwrap();
    assert!(spec.eval.tasks[0].path.ends_with("tasks/t.jsonl"));
    assert!(std::path::Path::new(&spec.eval.tasks[0].path).is_absolute());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn layer_wise_variants_are_validated() {
    let with = |lw: &str| {
        let text = TINY.replace("regime: segprop", "regime: lw") + &format!("lw: {lw}\n");
        JobSpec::from_yaml_str(&text, "job.yaml").map_err(|e| e.to_string())
    };
    assert!(with("{ variant: base_prefix, base_depth: 1, final_head: { max_steps: 3 } }").is_ok());
    let err = with("{ variant: base_prefix, base_depth: 0 }").unwrap_err();
    assert!(err.contains("lw.base_depth"), "{err}");
    let err = with("{ stage1: { max_steps: 3 } }").unwrap_err();
    assert!(
        err.contains("lw.stage1") && err.contains("base_prefix"),
        "{err}"
    );
    let err = with("{ final_head: { max_steps: 0 } }").unwrap_err();
    assert!(err.contains("lw.final_head"), "{err}");
    // p + r beyond the model's 8 blocks: refused against its shape.
    let err = with("{ variant: base_prefix, base_depth: 7, head_layers: 2 }").unwrap_err();
    assert!(
        err.contains("lw.base_depth") && err.contains("8 layers"),
        "{err}"
    );
}

/// A checkpoint directory with a `config.json` of `vocab` ids and, when `tokenizer_ids` is
/// given, a `tokenizer.json` of that many ids (a WordLevel vocabulary) with a chat template.
fn checkpoint(dir: &Path, vocab: usize, tokenizer_ids: Option<usize>) {
    let mut config = crate::LlamaConfig::preset("tiny").unwrap();
    config.vocab_size = vocab;
    std::fs::write(dir.join("config.json"), config.to_hf_json("float32")).unwrap();
    if let Some(n) = tokenizer_ids {
        let vocab: serde_json::Map<String, serde_json::Value> =
            (0..n).map(|i| (format!("t{i}"), i.into())).collect();
        let json = serde_json::json!({ "model": { "type": "WordLevel", "vocab": vocab } });
        std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"}"#,
        )
        .unwrap();
    }
}

fn job_from(dir: &Path, model: &str, data: &str) -> Result<JobSpec, String> {
    let text = TINY
        .replace(
            "model: { family: llama, preset: tiny }",
            &format!("model: {model}"),
        )
        .replace(
            "data: { corpus: builtin:synthetic, tokenizer: byte, seq_len: 32, batch_size: 4 }",
            &format!("data: {data}"),
        );
    let path = dir.join("job.yaml");
    std::fs::write(&path, text).unwrap();
    JobSpec::from_file(&path)
        .and_then(|spec| spec.resolve_model_config().map(|_| spec))
        .map_err(|e| e.to_string())
}

#[test]
fn the_checkpoints_tokenizer_is_the_default_and_others_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("ckpt")).unwrap();
    std::fs::write(
        dir.join("chat.jsonl"),
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n",
    )
    .unwrap();
    checkpoint(&dir.join("ckpt"), 300, Some(300));
    let from = "{ from: { hf_dir: ckpt } }";
    let spec = job_from(
        dir,
        from,
        "{ corpus: chat.jsonl, format: chat, seq_len: 32, batch_size: 4 }",
    )
    .unwrap();
    assert_eq!(
        spec.tokenizer().unwrap(),
        TokenizerKind::Hf(dir.join("ckpt/tokenizer.json"))
    );
    // A broken chat line is named with its file and line when the job is checked.
    std::fs::write(
        dir.join("bad.jsonl"),
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n\n{\"prompt\": \"a\"}\n",
    )
    .unwrap();
    let err = job_from(
        dir,
        from,
        "{ corpus: bad.jsonl, format: chat, seq_len: 32, batch_size: 4 }",
    )
    .unwrap_err();
    assert!(
        err.contains("data.corpus")
            && err.contains("bad.jsonl line 3")
            && err.contains("expected `messages`"),
        "{err}"
    );
    // byte or gpt2 ids are not the checkpoint's.
    for name in ["byte", "gpt2"] {
        let err = job_from(
            dir,
            from,
            &format!("{{ corpus: chat.jsonl, tokenizer: {name}, seq_len: 32, batch_size: 4 }}"),
        )
        .unwrap_err();
        assert!(
            err.contains("data.tokenizer") && err.contains("ships"),
            "{err}"
        );
    }
    // A tokenizer whose ids exceed the model's vocabulary.
    checkpoint(&dir.join("ckpt"), 300, Some(400));
    let err = job_from(
        dir,
        from,
        "{ corpus: chat.jsonl, seq_len: 32, batch_size: 4 }",
    )
    .unwrap_err();
    assert!(
        err.contains("data.tokenizer") && err.contains("ids go up to 399"),
        "{err}"
    );
    // A named file that does not exist; `checkpoint` when there is none; chat without a
    // Hugging Face tokenizer.
    let err = job_from(
        dir,
        "{ preset: tiny }",
        "{ corpus: chat.jsonl, tokenizer: tok/tokenizer.json, seq_len: 32, batch_size: 4 }",
    )
    .unwrap_err();
    assert!(
        err.contains("data.tokenizer") && err.contains("tok/tokenizer.json"),
        "{err}"
    );
    // A tokenizer.json named relative to the spec file, for a preset (vocabulary 256).
    std::fs::create_dir(dir.join("tok")).unwrap();
    checkpoint(&dir.join("tok"), 256, Some(200));
    let named = "{ corpus: chat.jsonl, tokenizer: tok/tokenizer.json, seq_len: 32, batch_size: 4 }";
    let spec = job_from(dir, "{ preset: tiny }", named).unwrap();
    assert_eq!(
        spec.tokenizer().unwrap(),
        TokenizerKind::Hf(dir.join("tok/tokenizer.json"))
    );
    checkpoint(&dir.join("tok"), 256, Some(300));
    let err = job_from(dir, "{ preset: tiny }", named).unwrap_err();
    assert!(err.contains("ids go up to 299"), "{err}");
    let err = job_from(
        dir,
        "{ preset: tiny }",
        "{ corpus: chat.jsonl, tokenizer: checkpoint, seq_len: 32, batch_size: 4 }",
    )
    .unwrap_err();
    assert!(
        err.contains("data.tokenizer") && err.contains("`checkpoint`"),
        "{err}"
    );
    let err = job_from(
        dir,
        "{ preset: tiny }",
        "{ corpus: chat.jsonl, format: chat, seq_len: 32, batch_size: 4 }",
    )
    .unwrap_err();
    assert!(err.contains("data.format"), "{err}");
}

#[test]
fn a_sliding_window_shorter_than_the_sequence_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("ckpt")).unwrap();
    let mut config = crate::LlamaConfig::preset("tiny").unwrap();
    config.model_type = crate::ModelType::Mistral;
    config.sliding_window = Some(16);
    std::fs::write(dir.join("ckpt/config.json"), config.to_hf_json("float32")).unwrap();
    let data = "{ corpus: builtin:synthetic, seq_len: 32, batch_size: 4 }";
    let err = job_from(dir, "{ from: { hf_dir: ckpt } }", data).unwrap_err();
    assert!(
        err.contains("data.seq_len") && err.contains("sliding_window 16"),
        "{err}"
    );
    config.sliding_window = Some(32);
    std::fs::write(dir.join("ckpt/config.json"), config.to_hf_json("float32")).unwrap();
    assert!(job_from(dir, "{ from: { hf_dir: ckpt } }", data).is_ok());
}
