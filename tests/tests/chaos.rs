//! The chaos soak, short (issue 21): `segprop-bench chaos` with 2 jobs on 2 real worker processes,
//! a worker SIGKILLed about every 2 s and the coordinator twice; it fails unless every job
//! succeeds with one committed state per stage, every step once, and the model and loss of its
//! undisturbed standalone run. The long soak and its figures: docs/benchmarks.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{bin, text};

#[test]
fn jobs_survive_killed_workers_and_coordinator_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(bin("segprop-bench"))
        .args([
            "chaos",
            "--jobs",
            "2",
            "--workers",
            "2",
            "--kill-every-ms",
            "2000",
        ])
        .args([
            "--segment-steps",
            "16",
            "--seed",
            "3",
            "--limit-s",
            "600",
            "--dir",
        ])
        .arg(tmp.path())
        .env("SEGPROP_LOG", "warn")
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("2 coordinator kills"), "{stdout}");
    assert!(stdout.contains("every check passed"), "{stdout}");
    assert_eq!(stdout.matches("| succeeded |").count(), 2, "{stdout}");
}
