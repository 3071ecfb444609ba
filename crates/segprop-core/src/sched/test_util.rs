//! Helpers of the scheduler's tests: plans, jobs, workers, leases and outcomes.

use super::*;
use crate::plan::{StageKind, StagePlan, StagePlanEntry};

pub(super) fn plan(stages: usize) -> StagePlan {
    StagePlan {
        num_layers: 8,
        head_layers: 0,
        stages: (0..stages)
            .map(|index| StagePlanEntry {
                index,
                name: format!("lw-block-{index}"),
                kind: StageKind::LwBlock { block: index },
            })
            .collect(),
    }
}

pub(super) fn job_on(id: &str, seq: u64, stages: usize, backend: &str, devices: u32) -> Job {
    Job::new(
        NewJob {
            id: id.into(),
            seq,
            name: format!("job {id}"),
            regime: "lw".into(),
            spec_yaml: "version: 1".into(),
            backend: Backend::parse(backend).expect("cpu or cuda"),
            devices_per_gang: devices,
            checkpoint_every_steps: 50,
            tasks: plan_tasks(&plan(stages), None),
        },
        7,
    )
}

pub(super) fn segprop_plan() -> StagePlan {
    let entry = |index: usize, name: &str, kind| StagePlanEntry {
        index,
        name: name.into(),
        kind,
    };
    StagePlan {
        num_layers: 6,
        head_layers: 2,
        stages: vec![
            entry(0, "stage1", StageKind::Stage1 { base_depth: 2 }),
            entry(1, "segment-2-3", StageKind::Segment { start: 2, end: 3 }),
            entry(2, "segment-3-4", StageKind::Segment { start: 3, end: 4 }),
        ],
    }
}

pub(super) fn names_and_after(tasks: &[PlannedTask]) -> Vec<(String, Vec<u32>)> {
    tasks
        .iter()
        .map(|t| (t.kind.name().to_string(), t.after.clone()))
        .collect()
}

/// A SnapCheck job (1 shard per depth) whose stage 1 is done and reported `depth` bytes
/// per snapshot depth.
pub(super) fn budget_job(id: &str, seq: u64, depth: u64, budget: Option<u64>) -> Job {
    let fanout = SnapshotFanout {
        shards: 1,
        overlap: false,
    };
    let mut job = Job::new(
        NewJob {
            id: id.into(),
            seq,
            name: id.into(),
            regime: "segprop".into(),
            spec_yaml: "version: 1".into(),
            backend: Backend::Cpu,
            devices_per_gang: 1,
            checkpoint_every_steps: 50,
            tasks: plan_tasks(&segprop_plan(), Some(fanout)),
        },
        0,
    );
    let cfg = SchedConfig {
        snapshot_budget_bytes: budget,
        ..cfg()
    };
    let (a, _) = assign(
        std::slice::from_mut(&mut job),
        &[worker("w0", "cpu", 1, 1)],
        1,
        &cfg,
    );
    let outcome = Outcome::Succeeded {
        outputs: vec![artifact("state")],
        metrics: None,
        result_json: format!("{{\"snapshot_depth_bytes\":{depth}}}"),
        result: TaskResult {
            steps: 2,
            snapshot_depth_bytes: Some(depth),
            ..TaskResult::default()
        },
        early_exit: false,
    };
    complete(
        &mut job,
        a[0].task_index,
        a[0].epoch,
        &WorkerId::from("w0"),
        outcome,
        1,
        &cfg,
    )
    .unwrap();
    job
}

pub(super) fn job(id: &str, seq: u64, stages: usize) -> Job {
    job_on(id, seq, stages, "cpu", 1)
}

pub(super) fn worker(id: &str, backend: &str, devices: u32, free_slots: u32) -> WorkerView {
    WorkerView {
        id: id.into(),
        backend: Backend::parse(backend).expect("cpu or cuda"),
        devices,
        free_slots,
    }
}

pub(super) fn cfg() -> SchedConfig {
    SchedConfig::default()
}

/// Leases the job's ready task to `worker_id` (a one-slot cpu worker) at `now`.
pub(super) fn lease_to(job: &mut Job, worker_id: &str, now: u64) -> Assignment {
    let (mut assignments, _) = assign(
        std::slice::from_mut(job),
        &[worker(worker_id, "cpu", 1, 1)],
        now,
        &cfg(),
    );
    assert_eq!(assignments.len(), 1, "nothing to lease in {job:?}");
    assignments.remove(0)
}

pub(super) fn artifact(uri: &str) -> Artifact {
    Artifact {
        uri: uri.into(),
        checksum: format!("sha256:{uri}"),
        bytes: 10,
    }
}

pub(super) fn success(early_exit: bool) -> Outcome {
    Outcome::Succeeded {
        outputs: vec![artifact("out")],
        metrics: Some(artifact("metrics")),
        result_json: "{\"loss\":1.5}".into(),
        result: TaskResult {
            steps: 2,
            eval_loss: Some(1.5),
            ..TaskResult::default()
        },
        early_exit,
    }
}

pub(super) fn failure(reason: &str, retryable: bool) -> Outcome {
    Outcome::Failed {
        reason: reason.into(),
        retryable,
    }
}

pub(super) fn statuses(job: &Job) -> Vec<TaskStatus> {
    job.tasks.iter().map(|t| t.status).collect()
}

/// Runs the job's task `index` (leased to `w`) to success at `now`.
pub(super) fn succeed(job: &mut Job, w: &str, now: u64) -> Vec<Transition> {
    let a = lease_to(job, w, now);
    complete(
        job,
        a.task_index,
        a.epoch,
        &WorkerId::from(w),
        success(false),
        now,
        &cfg(),
    )
    .unwrap()
}
