//! Tests of the submit-time pre-flight (`preflight.rs`).

use super::*;

fn spec(text: &str) -> JobSpec {
    JobSpec::from_yaml_str(text, "test").expect("spec")
}

const SEGPROP: &str = "version: 1\nname: t\nmodel: { preset: small }\n\
    data: { corpus: builtin:synthetic, seq_len: 512, batch_size: 4 }\nregime: segprop\n\
    segprop: { base_depth: 2, head_layers: 2, segment_size: 2 }\noptimizer: { lr: 1.0e-3 }\n";

#[test]
fn a_small_host_refuses_with_the_stage_and_the_breakdown() {
    let s = spec(SEGPROP);
    let config = s.resolve_model_config().expect("config");
    let stages = StagePlan::new(&s, config.num_layers);
    let worker = WorkerMemory {
        device_bytes: 1 << 30,
        host_bytes: 1 << 30,
    };
    let fits = check(&s, &config, &stages, &worker);
    // 110M parameters: 12 bytes each of weights and moments exceed 1 GiB in stage 1.
    assert!(!fits[0].fits);
    let message = refusal(&s, &fits, "w1").expect("refused");
    assert!(message.contains("stage stage1"), "{message}");
    assert!(message.contains("worker w1 has 1.00 GiB"), "{message}");
    assert!(message.contains("weights"), "{message}");
    let big = WorkerMemory {
        device_bytes: 64 << 30,
        host_bytes: 64 << 30,
    };
    let fits = check(&s, &config, &stages, &big);
    assert!(fits.iter().all(|f| f.fits));
    assert!(refusal(&s, &fits, "w1").is_none());
    // Segments hold less than stage 1: they fit larger batches.
    assert!(fits[1].max_batch >= fits[0].max_batch);
    assert!(
        fits.iter()
            .all(|f| f.micro_batch == 4 && f.max_micro_batch == 4)
    );
}

/// A host on which stage 1 fits 4 whole sequences of 128 and every segment more.
fn host_for_four(s: &JobSpec, config: &LlamaConfig, stages: &StagePlan) -> WorkerMemory {
    let w = stage_workload(s, &stages.stages[0].kind, config.num_layers);
    let none = WorkerMemory {
        device_bytes: 0,
        host_bytes: 0,
    };
    let snapshots = snapshots_in_memory(s, config);
    let at = |b: usize| need(s, config, &none, &w, (b, b), snapshots).1;
    let host = (at(4) + at(5)) / 2;
    WorkerMemory {
        device_bytes: host,
        host_bytes: host,
    }
}

#[test]
fn a_batch_too_large_whole_fits_in_passes_and_the_refusal_says_so() {
    let s = spec(&SEGPROP.replace("batch_size: 4", "batch_size: 16"));
    let config = s.resolve_model_config().expect("config");
    let stages = StagePlan::new(&s, config.num_layers);
    let worker = host_for_four(&s, &config, &stages);
    let fits = check(&s, &config, &stages, &worker);
    assert!(!fits[0].fits);
    assert_eq!(fits[0].max_batch, 4);
    let m = fits[0].max_micro_batch;
    assert!(
        (1..4).contains(&m),
        "passes cost the accumulated gradients: {m}"
    );
    let message = refusal(&s, &fits, "w1").expect("refused");
    assert!(
        message.contains(&format!("data.micro_batch: {{ stage1: {m} }}")),
        "{message}"
    );
    // With that pass, stage 1 fits the batch of 16.
    let passes = spec(&SEGPROP.replace(
        "batch_size: 4",
        &format!("batch_size: 16, micro_batch: {{ stage1: {m} }}"),
    ));
    let fits = check(&passes, &config, &stages, &worker);
    assert!(fits[0].fits && fits[0].micro_batch == m, "{fits:?}");
    assert!(fits[0].breakdown.contains("accumulated gradients"));
}

#[test]
fn auto_batch_is_the_largest_stage_maximum_with_passes_where_needed() {
    let mut s = spec(&SEGPROP.replace(
        "batch_size: 4",
        "batch_size: auto, synthetic_tokens: 1000000",
    ));
    assert_eq!(s.data.batch_size, BatchSize::Auto);
    let config = s.resolve_model_config().expect("config");
    let stages = StagePlan::new(&s, config.num_layers);
    let worker = host_for_four(&s, &config, &stages);
    let note = resolve_auto(&mut s, &config, &stages, &worker, "w1")
        .expect("fits")
        .expect("decided");
    let BatchSize::Fixed(b) = s.data.batch_size else {
        panic!("unresolved")
    };
    let fits = check(&s, &config, &stages, &worker);
    assert!(fits.iter().all(|f| f.fits), "{note}: {fits:?}");
    // The batch is what the most permissive stage fits whole; stage 1 runs it in passes.
    let largest = fits.iter().map(|f| f.max_batch).max().expect("stages");
    assert_eq!(b, largest, "{note}");
    assert!(b > 4, "{note}");
    let stage1 = s.micro_batch("stage1");
    assert!((1..4).contains(&stage1), "{note}");
    assert_eq!(
        fits[0].max_micro_batch, stage1,
        "the largest pass that fits"
    );
    assert!(
        note.starts_with(&format!(
            "data.batch_size: auto -> {b} on worker w1 (largest whole batch per stage: stage1 4, "
        )),
        "{note}"
    );
    assert!(
        note.contains(&format!("data.micro_batch -> passes of stage1 {stage1}")),
        "{note}"
    );

    // The corpus caps the batch.
    let mut s = spec(&SEGPROP.replace("batch_size: 4", "batch_size: auto"));
    resolve_auto(&mut s, &config, &stages, &worker, "w1").expect("fits");
    let cap = data_batch_cap(&s).expect("synthetic corpus");
    assert_eq!(s.data.batch_size, BatchSize::Fixed(cap.min(b)));

    let tiny = WorkerMemory {
        device_bytes: 1 << 28,
        host_bytes: 1 << 28,
    };
    let mut s = spec(&SEGPROP.replace("batch_size: 4", "batch_size: auto"));
    let err = resolve_auto(&mut s, &config, &stages, &tiny, "w1").unwrap_err();
    assert!(err.contains("not even one sequence fits"), "{err}");
}

#[test]
fn auto_micro_batch_keeps_the_batch_and_splits_only_what_does_not_fit() {
    let mut s = spec(&SEGPROP.replace("batch_size: 4", "batch_size: 8, micro_batch: auto"));
    let config = s.resolve_model_config().expect("config");
    let stages = StagePlan::new(&s, config.num_layers);
    let worker = host_for_four(&s, &config, &stages);
    let note = resolve_auto(&mut s, &config, &stages, &worker, "w1")
        .expect("fits")
        .expect("decided");
    assert_eq!(s.data.batch_size, BatchSize::Fixed(8));
    let Some(MicroBatch::PerStage(map)) = &s.data.micro_batch else {
        panic!("resolved per stage: {:?}", s.data.micro_batch)
    };
    assert!(map["stage1"] < 4, "{note}");
    let fits = check(&s, &config, &stages, &worker);
    assert!(fits.iter().all(|f| f.fits), "{note}");
    for f in &fits[1..] {
        assert_eq!(map[&f.stage], f.max_micro_batch.min(8), "{note}");
    }
    assert!(
        note.starts_with(
            "data.micro_batch: auto on worker w1; data.micro_batch -> passes of stage1 "
        ),
        "{note}"
    );
    // Nothing is auto: nothing to decide.
    let mut fixed = spec(SEGPROP);
    assert_eq!(
        resolve_auto(&mut fixed, &config, &stages, &worker, "w1"),
        Ok(None)
    );
}

#[test]
fn the_corpus_cap_counts_gpt2_tokens_as_the_engine_will() {
    let dir = std::env::temp_dir().join(format!("segprop-bpe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("corpus.txt");
    let text = "In the beginning God created the heaven and the earth. ".repeat(400);
    std::fs::write(&path, &text).expect("write");
    let job = |tokenizer: &str| {
        let mut s = spec(&SEGPROP.replace(
            "corpus: builtin:synthetic, seq_len: 512",
            &format!("corpus: corpus.txt, tokenizer: {tokenizer}, seq_len: 16"),
        ));
        s.data.corpus = path.display().to_string();
        s
    };
    let tokens = tiktoken_rs::r50k_base_singleton()
        .encode_ordinary(&text)
        .len();
    assert!(
        tokens < text.len() / 3,
        "{tokens} BPE tokens of {} bytes",
        text.len()
    );
    // The engine: sequences of 17 tokens overlapping by one, ceil(5%) of them held out.
    let sequences = (tokens - 17) / 16 + 1;
    let eval = (sequences as f64 * 0.05).ceil() as usize;
    assert_eq!(
        data_batch_cap(&job("gpt2")),
        Some(eval.min(sequences - eval))
    );
    assert!(data_batch_cap(&job("byte")) > data_batch_cap(&job("gpt2")));
    // A sample of the file, scaled by size: within a few tokens here (the text repeats).
    let estimate = bpe_tokens(&path, 1000).expect("count") as f64;
    assert!(
        (estimate / tokens as f64 - 1.0).abs() < 0.02,
        "{estimate} vs {tokens}"
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn a_sharded_cpu_gang_is_priced_by_its_shards_not_a_whole_model_per_rank() {
    let sharded = format!(
        "{SEGPROP}resources: {{ devices_per_gang: 2 }}\nsharding: {{ strategy: full_shard }}\n\
         activation_checkpointing: true\n"
    )
    .replace("lr: 1.0e-3 }", "lr: 1.0e-3, grad_accum: 2 }");
    let s = spec(&sharded);
    let config = s.resolve_model_config().expect("config");
    let stages = StagePlan::new(&s, config.num_layers);
    let none = WorkerMemory {
        device_bytes: 0,
        host_bytes: 0,
    };
    let snapshots = snapshots_in_memory(&s, &config);
    let plain = spec(SEGPROP);
    for entry in &stages.stages {
        let w = stage_workload(&s, &entry.kind, config.num_layers);
        let (_, gang, _, _, breakdown) = need(&s, &config, &none, &w, (4, 4), snapshots);
        let (_, whole, _, _, _) = need(&plain, &config, &none, &w, (4, 4), snapshots);
        assert!(breakdown.starts_with("2 ranks x (shards"), "{breakdown}");
        // Each rank's shards and one unit at a time take less than a whole model's step
        // (what every rank of a CPU gang was priced at before units stayed sharded).
        assert!(gang / 2 < whole, "{}: {gang} vs 2 x {whole}", w.name);
    }
}

#[test]
fn offload_on_cuda_is_refused_for_host_ram() {
    let s = spec(
        "version: 1\nname: t\nmodel: { preset: llama3-70b }\n\
         data: { corpus: builtin:synthetic, seq_len: 2048, batch_size: 1 }\nregime: e2e\n\
         optimizer: { lr: 1.0e-4, grad_accum: 8 }\nresources: { backend: cuda, devices_per_gang: 8 }\n\
         sharding: { strategy: full_shard, offload: cpu }\nactivation_checkpointing: true\n\
         e2e: { exit: { max_steps: 10 } }\n",
    );
    let config = s.resolve_model_config().expect("config");
    let stages = StagePlan::new(&s, config.num_layers);
    let worker = WorkerMemory {
        device_bytes: 80 << 30,
        host_bytes: 512 << 30,
    };
    let fits = check(&s, &config, &stages, &worker);
    let message = refusal(&s, &fits, "gpu-node-1").expect("refused");
    assert!(message.contains("host RAM for CPU offload"), "{message}");
}
