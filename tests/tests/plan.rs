//! `segprop-coord plan` (issue "planner", first part): the comparison table for a preset on given
//! hardware and for a job spec, JSON for machines, and bad input named with exit code 2.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;

fn plan(args: &[&str]) -> std::process::Output {
    Command::new(bin("segprop-coord"))
        .arg("plan")
        .args(args)
        .env("SEGPROP_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn llama70b_on_8x40g_segprop_fits_where_fsdp_does_not() {
    let out = plan(&[
        "--model",
        "llama3-70b",
        "--gpus",
        "8",
        "--gpu-mem",
        "40GiB",
        "--seq",
        "2048",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = report["rows"].as_array().unwrap();
    let batch = |name: &str| {
        rows.iter()
            .find(|r| r["plan"]["workload"]["name"] == name)
            .unwrap_or_else(|| panic!("no row {name}"))["max_micro_batch"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(rows.len(), 8);
    assert_eq!(batch("e2e FSDP"), 0, "141 GB of sharded state per GPU");
    // 16 bytes per parameter on the host: 1.13 TB, more than the default 1 TiB.
    assert_eq!(batch("FSDP + CPU offload + AC"), 0);
    assert!(batch("SegProp stage 2, SnapCheck") >= 1);
    // Activation checkpointing against activation checkpointing.
    assert!(batch("SegProp stage 2, SnapCheck + AC") > batch("SegProp stage 2, SnapCheck"));
    assert!(report["schedule_flops_segprop_snapcheck"].as_f64().unwrap() > 0.0);

    // With 2 TiB of host RAM offload fits; the table says so in words.
    let out = plan(&[
        "--model",
        "llama3-70b",
        "--host-ram",
        "2TiB",
        "--seq",
        "512",
    ]);
    assert!(out.status.success());
    let table = text(&out.stdout);
    assert!(table.contains("FSDP + CPU offload + AC"), "{table}");
    assert!(table.contains("does not fit one sequence"), "{table}");
    assert!(table.contains("schedule FLOPs"), "{table}");
}

#[test]
fn a_job_spec_is_planned_with_its_own_model_and_gang() {
    let job = repo().join("configs/jobs/tiny-sharded.yaml");
    let out = plan(&[job.to_str().unwrap(), "--gpu-mem", "80GiB", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["cluster"]["gpus"], 2, "devices_per_gang of the spec");
    assert_eq!(report["seq_len"], 32);
    assert_eq!(report["precision"], "f32");
}

#[test]
fn bad_plan_input_exits_2_naming_the_flag() {
    for (args, needle) in [
        (vec!["--model", "llama-9000"], "--model llama-9000"),
        (
            vec!["--model", "tiny", "--gpu-mem", "40 parsecs"],
            "--gpu-mem",
        ),
        (vec!["--model", "tiny", "--p", "7", "--r", "2"], "--p 7"),
        (vec![], "plan what?"),
    ] {
        let out = plan(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            text(&out.stderr).contains(needle),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}
