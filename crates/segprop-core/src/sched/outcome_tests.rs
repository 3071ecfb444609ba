//! Tests of the scheduler: outcomes of attempts: success, retries, failures, expiry, early exit, cancel, adoption.

use super::test_util::*;
use super::*;
use TaskStatus::{Cancelled, Failed, Ready, Running, Skipped, Succeeded, Waiting};

#[test]
fn success_readies_the_next_task_and_export_finishes_the_job() {
    let cfg = cfg();
    let mut job = job("j", 0, 2);
    let a = lease_to(&mut job, "w", 100);
    let t = complete(
        &mut job,
        0,
        a.epoch,
        &WorkerId::from("w"),
        success(false),
        200,
        &cfg,
    )
    .unwrap();
    assert_eq!(
        t,
        [Transition::TaskSucceeded {
            job_id: "j".into(),
            task_index: 0
        }]
    );
    assert_eq!(statuses(&job), [Succeeded, Ready, Waiting]);
    let task = &job.tasks[0];
    assert_eq!(task.commits, 1);
    assert_eq!(task.lease, None);
    assert_eq!(task.outputs, [artifact("out")]);
    assert_eq!(task.metrics, Some(artifact("metrics")));
    assert_eq!(task.result_json.as_deref(), Some("{\"loss\":1.5}"));
    assert_eq!(task.result.as_ref().map(|r| r.eval_loss), Some(Some(1.5)));
    assert_eq!(job.status, JobStatus::Running);

    succeed(&mut job, "w", 300);
    assert_eq!(statuses(&job), [Succeeded, Succeeded, Ready]);
    let t = succeed(&mut job, "w", 400);
    assert_eq!(
        t,
        [
            Transition::TaskSucceeded {
                job_id: "j".into(),
                task_index: 2
            },
            Transition::JobFinished {
                job_id: "j".into(),
                status: JobStatus::Succeeded
            }
        ]
    );
    assert_eq!(job.status, JobStatus::Succeeded);
    assert_eq!(job.finished_at, Some(400));
    assert!(job.tasks.iter().all(|t| t.commits == 1));
    assert_eq!(job.error, None);
}

#[test]
fn a_second_success_is_rejected_and_commits_once() {
    let cfg = cfg();
    let mut job = job("j", 0, 1);
    let a = lease_to(&mut job, "w", 0);
    complete(
        &mut job,
        0,
        a.epoch,
        &WorkerId::from("w"),
        success(false),
        1,
        &cfg,
    )
    .unwrap();
    let before = job.clone();
    for outcome in [success(false), failure("late", true)] {
        let got = complete(&mut job, 0, a.epoch, &WorkerId::from("w"), outcome, 2, &cfg);
        assert_eq!(got, Err(Reject::NotRunning));
    }
    assert_eq!(job, before);
    assert_eq!(job.tasks[0].commits, 1);
}

#[test]
fn retryable_failure_backs_off_and_resumes_from_the_checkpoint() {
    let cfg = cfg();
    let mut jobs = vec![job("j", 0, 1)];
    let a = lease_to(&mut jobs[0], "w1", 0);
    let ckpt = Checkpoint {
        step: 40,
        artifact: artifact("ckpt-40"),
    };
    renew(
        &mut jobs[0],
        0,
        a.epoch,
        &WorkerId::from("w1"),
        Some(ckpt.clone()),
        50,
        &cfg,
    )
    .unwrap();
    let t = complete(
        &mut jobs[0],
        0,
        a.epoch,
        &WorkerId::from("w1"),
        failure("nan loss", true),
        100,
        &cfg,
    )
    .unwrap();
    assert_eq!(
        t,
        [Transition::TaskRetry {
            job_id: "j".into(),
            task_index: 0,
            failures: 1,
            not_before: 1_100,
            reason: "nan loss".into()
        }]
    );
    let task = &jobs[0].tasks[0];
    assert_eq!(task.status, Ready);
    assert_eq!(
        (task.attempts, task.failures, task.not_before),
        (1, 1, 1_100)
    );
    assert_eq!(task.error.as_deref(), Some("nan loss"));
    assert_eq!(task.lease, None);
    assert_eq!(task.checkpoint, Some(ckpt.clone()));
    assert_eq!(jobs[0].status, JobStatus::Running);

    let workers = [worker("w2", "cpu", 1, 1)];
    assert!(assign(&mut jobs, &workers, 1_099, &cfg).0.is_empty());
    let (assignments, _) = assign(&mut jobs, &workers, 1_100, &cfg);
    assert_eq!(assignments[0].epoch, 2);
    let task = &jobs[0].tasks[0];
    assert_eq!((task.attempts, task.failures, task.epoch), (2, 1, 2));
    assert_eq!(task.checkpoint, Some(ckpt));
    complete(
        &mut jobs[0],
        0,
        2,
        &WorkerId::from("w2"),
        success(false),
        1_200,
        &cfg,
    )
    .unwrap();
    assert_eq!(jobs[0].tasks[0].error, None);
    assert_eq!(statuses(&jobs[0]), [Succeeded, Ready]);
}

#[test]
fn non_retryable_failure_fails_the_job() {
    let cfg = cfg();
    let mut job = job("j", 0, 3);
    succeed(&mut job, "w", 0);
    let a = lease_to(&mut job, "w", 10);
    let t = complete(
        &mut job,
        1,
        a.epoch,
        &WorkerId::from("w"),
        failure("bad shape", false),
        20,
        &cfg,
    )
    .unwrap();
    assert_eq!(
        t,
        [
            Transition::TaskFailed {
                job_id: "j".into(),
                task_index: 1,
                reason: "bad shape".into()
            },
            Transition::JobFinished {
                job_id: "j".into(),
                status: JobStatus::Failed
            }
        ]
    );
    assert_eq!(statuses(&job), [Succeeded, Failed, Cancelled, Cancelled]);
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(
        job.error.as_deref(),
        Some("task lw-block-1 failed: bad shape")
    );
    assert_eq!(job.tasks[1].error.as_deref(), Some("bad shape"));
    assert_eq!(job.tasks[1].failures, 1);
    assert_eq!(job.finished_at, Some(20));
    assert_eq!(job.running_leases().count(), 0);
}

#[test]
fn max_attempts_fails_the_task() {
    let cfg = cfg();
    let mut jobs = vec![job("j", 0, 1)];
    let mut now = 0;
    for attempt in 1..=3u32 {
        let (assignments, _) = assign(&mut jobs, &[worker("w", "cpu", 1, 1)], now, &cfg);
        let a = &assignments[0];
        assert_eq!(a.epoch, u64::from(attempt));
        let t = complete(
            &mut jobs[0],
            0,
            a.epoch,
            &WorkerId::from("w"),
            failure("flaky", true),
            now,
            &cfg,
        )
        .unwrap();
        if attempt < 3 {
            assert!(matches!(t[0], Transition::TaskRetry { failures, .. } if failures == attempt));
            assert_eq!(jobs[0].tasks[0].not_before, now + cfg.backoff(attempt));
            now = jobs[0].tasks[0].not_before;
        } else {
            assert!(matches!(t[0], Transition::TaskFailed { .. }));
        }
    }
    let task = &jobs[0].tasks[0];
    assert_eq!((task.attempts, task.failures), (3, 3));
    assert_eq!(statuses(&jobs[0]), [Failed, Cancelled]);
    assert_eq!(jobs[0].status, JobStatus::Failed);
    assert_eq!(
        jobs[0].error.as_deref(),
        Some("task lw-block-0 failed: flaky")
    );
}

#[test]
fn expired_leases_are_retried_then_fail_the_job() {
    let cfg = SchedConfig {
        max_attempts: 2,
        ..cfg()
    };
    let mut jobs = vec![job("a", 0, 1), job("b", 1, 1)];
    let workers = [worker("w1", "cpu", 1, 2)];
    assign(&mut jobs, &workers, 0, &cfg);
    // b's worker keeps heartbeating; a's does not.
    renew(&mut jobs[1], 0, 1, &WorkerId::from("w1"), None, 9_000, &cfg).unwrap();
    let t = expire_leases(&mut jobs, 10_001, &cfg);
    let reason = "lease expired (worker w1 stopped heartbeating)".to_string();
    assert_eq!(
        t,
        [Transition::TaskRetry {
            job_id: "a".into(),
            task_index: 0,
            failures: 1,
            not_before: 11_001,
            reason: reason.clone()
        }]
    );
    assert_eq!(statuses(&jobs[0]), [Ready, Waiting]);
    assert_eq!(jobs[0].tasks[0].error.as_deref(), Some(reason.as_str()));
    assert_eq!(statuses(&jobs[1]), [Running, Waiting]);

    let (assignments, _) = assign(&mut jobs, &[worker("w2", "cpu", 1, 1)], 11_001, &cfg);
    assert_eq!(assignments[0].epoch, 2);
    renew(
        &mut jobs[1],
        0,
        1,
        &WorkerId::from("w1"),
        None,
        11_001,
        &cfg,
    )
    .unwrap();
    assert!(expire_leases(&mut jobs, 21_001, &cfg).is_empty());
    let t = expire_leases(&mut jobs, 21_002, &cfg);
    let reason = "lease expired (worker w2 stopped heartbeating)".to_string();
    assert_eq!(
        t,
        [
            Transition::TaskFailed {
                job_id: "a".into(),
                task_index: 0,
                reason: reason.clone()
            },
            Transition::JobFinished {
                job_id: "a".into(),
                status: JobStatus::Failed
            },
            Transition::TaskRetry {
                job_id: "b".into(),
                task_index: 0,
                failures: 1,
                not_before: 22_002,
                reason: "lease expired (worker w1 stopped heartbeating)".into()
            },
        ]
    );
    assert_eq!(statuses(&jobs[0]), [Failed, Cancelled]);
    assert_eq!(
        jobs[0].error,
        Some(format!("task lw-block-0 failed: {reason}"))
    );
    assert_eq!(jobs[0].finished_at, Some(21_002));
    // Terminal jobs are left alone.
    let before = jobs[0].clone();
    expire_leases(&mut jobs, 100_000, &cfg);
    assert_eq!(jobs[0], before);
}

#[test]
fn early_exit_skips_the_remaining_stages() {
    let cfg = cfg();
    let mut job = job("j", 0, 4);
    succeed(&mut job, "w", 0);
    let a = lease_to(&mut job, "w", 10);
    let t = complete(
        &mut job,
        1,
        a.epoch,
        &WorkerId::from("w"),
        success(true),
        20,
        &cfg,
    )
    .unwrap();
    assert_eq!(
        t,
        [
            Transition::TaskSucceeded {
                job_id: "j".into(),
                task_index: 1
            },
            Transition::TaskSkipped {
                job_id: "j".into(),
                task_index: 2
            },
            Transition::TaskSkipped {
                job_id: "j".into(),
                task_index: 3
            },
        ]
    );
    assert_eq!(
        statuses(&job),
        [Succeeded, Succeeded, Skipped, Skipped, Ready]
    );
    let a = lease_to(&mut job, "w", 30);
    assert_eq!(a.task_index, 4);
    complete(
        &mut job,
        4,
        a.epoch,
        &WorkerId::from("w"),
        success(true),
        40,
        &cfg,
    )
    .unwrap();
    assert_eq!(job.status, JobStatus::Succeeded);
    assert_eq!(job.tasks[2].commits, 0);

    // Early exit from the last stage skips nothing.
    let mut job = self::job("k", 0, 1);
    let a = lease_to(&mut job, "w", 0);
    let t = complete(
        &mut job,
        0,
        a.epoch,
        &WorkerId::from("w"),
        success(true),
        1,
        &cfg,
    )
    .unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(statuses(&job), [Succeeded, Ready]);
}

#[test]
fn cancel_revokes_leases_and_is_idempotent() {
    let mut job = job("j", 0, 2);
    succeed(&mut job, "w", 0);
    let a = lease_to(&mut job, "w", 10);
    let revoked = cancel(&mut job, 50);
    assert_eq!(
        revoked,
        [(
            1,
            Lease {
                worker_id: "w".into(),
                epoch: a.epoch,
                expires_at: 10_010
            }
        )]
    );
    assert_eq!(statuses(&job), [Succeeded, Cancelled, Cancelled]);
    assert_eq!(job.status, JobStatus::Cancelled);
    assert_eq!(job.finished_at, Some(50));
    assert_eq!(job.running_leases().count(), 0);
    let before = job.clone();
    assert!(cancel(&mut job, 60).is_empty());
    assert_eq!(job, before);

    // A pending job has nothing to revoke.
    let mut pending = self::job("p", 0, 1);
    assert!(cancel(&mut pending, 5).is_empty());
    assert_eq!(statuses(&pending), [Cancelled, Cancelled]);
    assert_eq!(pending.status, JobStatus::Cancelled);

    // Finished jobs stay as they were.
    let mut done = self::job("d", 0, 0);
    succeed(&mut done, "w", 0);
    let before = done.clone();
    assert!(cancel(&mut done, 5).is_empty());
    assert_eq!(done, before);
}

#[test]
fn adopt_rebinds_a_current_lease_to_the_new_worker_id() {
    let cfg = cfg();
    let mut job = job("j", 0, 1);
    let a = lease_to(&mut job, "old", 0);
    // The coordinator restarts: it reloads the job and the worker comes back as "new".
    let json = serde_json::to_string(&job).unwrap();
    let mut job: Job = serde_json::from_str(&json).unwrap();
    assert!(adopt(
        &mut job,
        0,
        a.epoch,
        &WorkerId::from("new"),
        4_000,
        &cfg
    ));
    let lease = job.tasks[0].lease.clone().unwrap();
    assert_eq!(lease.worker_id, "new");
    assert_eq!(lease.epoch, a.epoch);
    assert_eq!(lease.expires_at, 14_000);
    assert_eq!(
        renew(
            &mut job,
            0,
            a.epoch,
            &WorkerId::from("old"),
            None,
            4_001,
            &cfg
        ),
        Err(Reject::WrongWorker {
            holder: "new".into()
        })
    );
    renew(
        &mut job,
        0,
        a.epoch,
        &WorkerId::from("new"),
        None,
        4_001,
        &cfg,
    )
    .unwrap();
    // Adopting again under the same id is harmless.
    assert!(adopt(
        &mut job,
        0,
        a.epoch,
        &WorkerId::from("new"),
        5_000,
        &cfg
    ));
    complete(
        &mut job,
        0,
        a.epoch,
        &WorkerId::from("new"),
        success(false),
        5_001,
        &cfg,
    )
    .unwrap();
    assert_eq!(job.tasks[0].commits, 1);

    // (epoch, now, adoptable)
    for (epoch, now, adoptable) in [
        (1, 10_000, true),
        (1, 10_001, false),
        (0, 1, false),
        (2, 1, false),
    ] {
        let mut job = self::job("k", 0, 1);
        lease_to(&mut job, "old", 0);
        let before = job.clone();
        assert_eq!(
            adopt(&mut job, 0, epoch, &WorkerId::from("new"), now, &cfg),
            adoptable,
            "{epoch} at {now}"
        );
        if !adoptable {
            assert_eq!(job, before);
        }
    }
}

#[test]
fn extend_leases_gives_workers_time_after_a_restart() {
    let cfg = cfg();
    let mut jobs = vec![job("a", 0, 1), job("b", 1, 1)];
    assign(&mut jobs, &[worker("w", "cpu", 1, 2)], 0, &cfg);
    jobs[1].tasks[0].lease.as_mut().unwrap().expires_at = 90_000;
    extend_leases(&mut jobs, 60_000, &cfg);
    assert_eq!(jobs[0].tasks[0].lease.as_ref().unwrap().expires_at, 70_000);
    assert_eq!(jobs[1].tasks[0].lease.as_ref().unwrap().expires_at, 90_000);
    assert!(expire_leases(&mut jobs, 70_000, &cfg).is_empty());
    assert!(adopt(
        &mut jobs[0],
        0,
        1,
        &WorkerId::from("w-new"),
        65_000,
        &cfg
    ));
}

#[test]
fn job_round_trips_through_json() {
    let cfg = cfg();
    let mut job = job("j", 3, 2);
    succeed(&mut job, "w", 0);
    let a = lease_to(&mut job, "w", 10);
    let ckpt = Checkpoint {
        step: 5,
        artifact: artifact("c"),
    };
    renew(
        &mut job,
        1,
        a.epoch,
        &WorkerId::from("w"),
        Some(ckpt),
        20,
        &cfg,
    )
    .unwrap();
    let json = serde_json::to_string_pretty(&job).unwrap();
    let back: Job = serde_json::from_str(&json).unwrap();
    assert_eq!(back, job);
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["status"], "running");
    assert_eq!(value["tasks"][0]["kind"]["kind"], "train_stage");
    assert_eq!(value["tasks"][2]["kind"]["kind"], "export");
    assert_eq!(value["tasks"][1]["status"], "running");

    for t in [
        Transition::JobFinished {
            job_id: "j".into(),
            status: JobStatus::Failed,
        },
        Transition::TaskSkipped {
            job_id: "j".into(),
            task_index: 2,
        },
    ] {
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<Transition>(&json).unwrap(), t);
    }
    for outcome in [success(true), failure("x", false)] {
        let json = serde_json::to_string(&outcome).unwrap();
        assert_eq!(serde_json::from_str::<Outcome>(&json).unwrap(), outcome);
    }
    let r = Reject::StaleEpoch { current: 2, got: 1 };
    let json = serde_json::to_string(&r).unwrap();
    assert_eq!(serde_json::from_str::<Reject>(&json).unwrap(), r);
}
