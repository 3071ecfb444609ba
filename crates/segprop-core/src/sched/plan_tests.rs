//! Tests of the scheduler: task planning, snapshot budget and collection.

use super::test_util::*;
use super::*;
use crate::plan::{StageKind, StagePlan, StagePlanEntry};
use TaskStatus::{Ready, Succeeded, Waiting};

#[test]
fn segprop_plans_snapshot_shards_before_each_segment() {
    let fanout = SnapshotFanout {
        shards: 2,
        overlap: false,
    };
    let tasks = plan_tasks(&segprop_plan(), Some(fanout));
    let s = |n: &str, after: &[u32]| (n.to_string(), after.to_vec());
    assert_eq!(
        names_and_after(&tasks),
        [
            s("stage1", &[]),
            s("snapshots-2-1of2", &[0]),
            s("snapshots-2-2of2", &[0]),
            s("segment-2-3", &[0, 1, 2]),
            // S[3] = F_2(S[2]): after the segment that committed block 2 and all of S[2].
            s("snapshots-3-1of2", &[3, 1, 2]),
            s("snapshots-3-2of2", &[3, 1, 2]),
            s("segment-3-4", &[3, 4, 5]),
            s("export", &[0, 1, 2, 3, 4, 5, 6]),
        ]
    );
    assert!(matches!(
        tasks[1].kind,
        TaskKind::AdvanceSnapshots {
            stage_index: 0,
            from: 0,
            to: 2,
            shard: 0,
            shards: 2,
            ..
        }
    ));
    assert!(matches!(
        tasks[5].kind,
        TaskKind::AdvanceSnapshots {
            stage_index: 1,
            from: 2,
            to: 3,
            shard: 1,
            shards: 2,
            ..
        }
    ));
    // Overlap: a segment waits for the first shard of its input only.
    let overlap = plan_tasks(
        &segprop_plan(),
        Some(SnapshotFanout {
            shards: 2,
            overlap: true,
        }),
    );
    assert_eq!(overlap[3].after, [0, 1]);
    assert_eq!(overlap[6].after, [3, 4]);
    // One shard keeps the old names; no SnapCheck is a plain chain.
    let single = plan_tasks(
        &segprop_plan(),
        Some(SnapshotFanout {
            shards: 1,
            overlap: false,
        }),
    );
    assert_eq!(single[1].kind.name(), "snapshots-2");
    assert_eq!(
        names_and_after(&plan_tasks(&segprop_plan(), None)),
        [
            s("stage1", &[]),
            s("segment-2-3", &[0]),
            s("segment-3-4", &[1]),
            s("export", &[0, 1, 2]),
        ]
    );
}

#[test]
fn snapshot_shards_run_side_by_side_and_release_the_segment() {
    let fanout = SnapshotFanout {
        shards: 2,
        overlap: false,
    };
    let mut job = Job::new(
        NewJob {
            id: "j".into(),
            seq: 1,
            name: "j".into(),
            regime: "segprop".into(),
            spec_yaml: "version: 1".into(),
            backend: Backend::Cpu,
            devices_per_gang: 1,
            checkpoint_every_steps: 50,
            tasks: plan_tasks(&segprop_plan(), Some(fanout)),
        },
        0,
    );
    succeed(&mut job, "w0", 1);
    assert_eq!(
        statuses(&job)[..4],
        [Succeeded, Ready, Ready, Waiting],
        "both shards are ready at once"
    );
    let workers = [worker("w0", "cpu", 1, 1), worker("w1", "cpu", 1, 1)];
    let (leased, _) = assign(std::slice::from_mut(&mut job), &workers, 2, &cfg());
    assert_eq!(leased.len(), 2, "one shard per worker");
    let done = |job: &mut Job, a: &Assignment| {
        complete(
            job,
            a.task_index,
            a.epoch,
            &a.worker_id,
            success(false),
            3,
            &cfg(),
        )
        .unwrap()
    };
    done(&mut job, &leased[0]);
    assert_eq!(
        job.tasks[3].status, Waiting,
        "the segment needs every shard"
    );
    done(&mut job, &leased[1]);
    assert_eq!(job.tasks[3].status, Ready);
}

#[test]
fn snapshot_budget_holds_back_jobs_that_do_not_fit_and_fails_one_that_never_can() {
    let budget = Some(5_000);
    let cfg = SchedConfig {
        snapshot_budget_bytes: budget,
        ..cfg()
    };
    let workers = [worker("w1", "cpu", 1, 1), worker("w2", "cpu", 1, 1)];
    // a reserves 2 x 2000, b would need 2 x 2000 more: b waits.
    let mut jobs = vec![
        budget_job("a", 1, 2_000, budget),
        budget_job("b", 2, 2_000, budget),
    ];
    assert_eq!(jobs[0].snapshot_reservation(), 0, "not started yet");
    let (leased, _) = assign(&mut jobs, &workers, 2, &cfg);
    assert_eq!(leased.len(), 1, "{leased:?}");
    assert_eq!(leased[0].job_id, "a");
    assert_eq!(jobs[0].snapshot_reservation(), 4_000);
    assert_eq!(jobs[1].tasks[1].status, Ready, "b's shard is held back");
    // The measured depth replaces the estimate when larger.
    let outcome = Outcome::Succeeded {
        outputs: vec![Artifact {
            bytes: 2_400,
            ..artifact("depth")
        }],
        metrics: None,
        result_json: "{}".into(),
        result: TaskResult::default(),
        early_exit: false,
    };
    complete(
        &mut jobs[0],
        1,
        leased[0].epoch,
        &WorkerId::from("w1"),
        outcome,
        3,
        &cfg,
    )
    .unwrap();
    assert_eq!(jobs[0].snapshot_depth_bytes(), Some(2_400));
    assert_eq!(jobs[0].snapshot_reservation(), 4_800);
    // a ends: its reservation is released and b starts.
    cancel(&mut jobs[0], 4);
    assert_eq!(jobs[0].snapshot_reservation(), 0);
    let (leased, _) = assign(&mut jobs, &workers, 5, &cfg);
    assert_eq!(
        leased.iter().map(|a| a.job_id.as_str()).collect::<Vec<_>>(),
        ["b"]
    );
    // Without a budget nothing is held back.
    let mut free = vec![
        budget_job("c", 1, 2_000, None),
        budget_job("d", 2, 2_000, None),
    ];
    let (leased, _) = assign(&mut free, &workers, 2, &SchedConfig::default());
    assert_eq!(leased.len(), 2);

    // A job whose two depths exceed the whole budget fails with both numbers.
    let mut big = vec![budget_job("e", 1, 3_000, budget)];
    let (leased, transitions) = assign(&mut big, &workers, 2, &cfg);
    assert!(leased.is_empty());
    assert_eq!(big[0].status, JobStatus::Failed);
    let error = big[0].error.clone().unwrap();
    assert!(
        error.contains("6000 bytes") && error.contains("5000 bytes"),
        "{error}"
    );
    assert!(
        transitions
            .iter()
            .any(|t| matches!(t, Transition::JobFinished { .. }))
    );
}

#[test]
fn snapshot_gc_keeps_at_most_two_depths_and_collects_all() {
    let plan = StagePlan {
        num_layers: 8,
        head_layers: 2,
        stages: (0..4)
            .map(|i| StagePlanEntry {
                index: i,
                name: format!("s{i}"),
                kind: if i == 0 {
                    StageKind::Stage1 { base_depth: 2 }
                } else {
                    StageKind::Segment {
                        start: i + 1,
                        end: i + 2,
                    }
                },
            })
            .collect(),
    };
    for overlap in [false, true] {
        let fanout = SnapshotFanout { shards: 3, overlap };
        let mut job = Job::new(
            NewJob {
                id: "j".into(),
                seq: 1,
                name: "j".into(),
                regime: "segprop".into(),
                spec_yaml: "version: 1".into(),
                backend: Backend::Cpu,
                devices_per_gang: 1,
                checkpoint_every_steps: 50,
                tasks: plan_tasks(&plan, Some(fanout)),
            },
            0,
        );
        let workers: Vec<WorkerView> = (0..3)
            .map(|i| worker(&format!("w{i}"), "cpu", 1, 1))
            .collect();
        let mut max_live = 0;
        let mut now = 1;
        while !job.is_terminal() {
            let (leased, _) = assign(std::slice::from_mut(&mut job), &workers, now, &cfg());
            assert!(!leased.is_empty(), "stuck: {job:?}");
            // Finish one task at a time, the oldest lease first.
            let a = &leased[0];
            complete(
                &mut job,
                a.task_index,
                a.epoch,
                &a.worker_id,
                success(false),
                now,
                &cfg(),
            )
            .unwrap();
            for other in &leased[1..] {
                // Give the other leases back (they are re-assigned next round).
                job.tasks[other.task_index as usize].status = Ready;
                job.tasks[other.task_index as usize].lease = None;
            }
            let gc = job.snapshot_gc();
            max_live = max_live.max(gc.live.len());
            assert!(gc.live.len() <= 2, "live depths {:?} in {job:?}", gc.live);
            job.snapshots_collected.extend(gc.dead);
            now += 1;
        }
        assert_eq!(max_live, 2, "overlap {overlap}");
        assert_eq!(job.snapshot_gc(), SnapshotDepths::default());
        job.snapshots_collected.sort();
        assert_eq!(job.snapshots_collected, [2, 3, 4], "overlap {overlap}");
    }
}

#[test]
fn legacy_chains_get_their_after_lists() {
    let mut job = job("j", 1, 3);
    for t in &mut job.tasks {
        t.after.clear();
    }
    job.upgrade_legacy_chain();
    let after: Vec<Vec<u32>> = job.tasks.iter().map(|t| t.after.clone()).collect();
    assert_eq!(after, [vec![], vec![0], vec![1], vec![2]]);
}

#[test]
fn legacy_records_give_their_snapshot_estimate_to_the_typed_result() {
    let mut job = job("j", 1, 3);
    job.tasks[0].status = Succeeded;
    job.tasks[0].result_json = Some("{\"stage\":\"stage1\",\"snapshot_depth_bytes\":4096}".into());
    job.tasks[1].status = Succeeded;
    job.tasks[1].result_json = Some("not a record".into());
    assert_eq!(
        job.snapshot_depth_bytes(),
        None,
        "the record alone is not read"
    );
    job.upgrade_legacy_results();
    assert_eq!(job.snapshot_depth_bytes(), Some(4096));
    assert!(job.tasks[1].result.is_none());
    // A stored typed result is kept as it is.
    job.tasks[0]
        .result
        .as_mut()
        .expect("upgraded")
        .snapshot_depth_bytes = Some(1);
    job.upgrade_legacy_results();
    assert_eq!(job.snapshot_depth_bytes(), Some(1));
}

#[test]
fn new_job_chains_stages_then_export() {
    let job = job("j", 4, 3);
    assert_eq!(job.status, JobStatus::Pending);
    assert_eq!(job.created_at, 7);
    assert_eq!(job.finished_at, None);
    let names: Vec<_> = job.tasks.iter().map(|t| t.kind.name()).collect();
    assert_eq!(names, ["lw-block-0", "lw-block-1", "lw-block-2", "export"]);
    assert_eq!(statuses(&job), [Ready, Waiting, Waiting, Waiting]);
    assert_eq!(
        job.tasks[1].kind,
        TaskKind::TrainStage {
            stage_index: 1,
            name: "lw-block-1".into()
        }
    );
    for (i, task) in job.tasks.iter().enumerate() {
        assert_eq!(task.index as usize, i);
        assert_eq!((task.attempts, task.failures, task.epoch), (0, 0, 0));
        assert_eq!(task.lease, None);
    }
    assert_eq!(job.running_leases().count(), 0);

    let empty = job_on("e", 0, 0, "cpu", 1);
    assert_eq!(statuses(&empty), [Ready]);
    assert_eq!(empty.tasks[0].kind, TaskKind::Export);
}
