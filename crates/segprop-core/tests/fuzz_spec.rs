//! Fuzzing the job-spec parser and validator (issue 21): mutants of every job in configs/jobs
//! and of the seeds in tests/fuzz/corpus/spec go through `JobSpec::from_yaml_str` (parse, then
//! validate) and, when accepted, through the stage plan and the planner's pre-flight memory
//! check. Each is accepted or refused with an error naming its source; none may panic. Seeded:
//! the same cases every run (`SEGPROP_FUZZ_CASES` sets the count for a longer local run).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../tests/fuzz/mutate.rs"]
mod mutate;

use std::path::Path;

use segprop_core::JobSpec;
use segprop_core::plan::StagePlan;
use segprop_core::planner::preflight::{WorkerMemory, check, refusal};

#[test]
fn no_job_spec_makes_the_parser_validator_or_planner_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut seeds = mutate::corpus(&root.join("configs/jobs"));
    seeds.extend(mutate::corpus(&root.join("tests/fuzz/corpus/spec")));
    let accepted = std::cell::Cell::new(0usize);
    let worker = WorkerMemory {
        device_bytes: 40 << 30,
        host_bytes: 64 << 30,
    };
    mutate::fuzz(&seeds, mutate::cases(20000), 21, |bytes| {
        let text = String::from_utf8_lossy(bytes);
        match JobSpec::from_yaml_str(&text, "fuzz.yaml") {
            Ok(spec) => {
                accepted.set(accepted.get() + 1);
                // An HF import's shape comes from its config.json, which a mutant names freely.
                if let Ok(config) = spec.resolve_model_config() {
                    let stages = StagePlan::new(&spec, config.num_layers);
                    let fits = check(&spec, &config, &stages, &worker);
                    let _ = refusal(&spec, &fits, "fuzz-worker");
                }
            }
            Err(e) => assert!(e.to_string().contains("fuzz.yaml"), "{e}"),
        }
    });
    // The mutants reach the validator and beyond, not only the YAML parser.
    assert!(
        accepted.get() > 50,
        "only {} mutants parsed",
        accepted.get()
    );
}
