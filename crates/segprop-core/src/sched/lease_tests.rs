//! Tests of the scheduler: configuration, assignment, leases and refused messages.

use super::test_util::*;
use super::*;
use TaskStatus::{Cancelled, Failed, Ready, Running, Skipped, Succeeded, Waiting};

#[test]
fn config_defaults() {
    assert_eq!(
        SchedConfig::default(),
        SchedConfig {
            lease_ms: 10_000,
            max_attempts: 3,
            backoff_base_ms: 1_000,
            backoff_max_ms: 30_000,
            snapshot_budget_bytes: None,
        }
    );
}

#[test]
fn backoff_doubles_and_is_capped() {
    let cfg = cfg();
    let table = [
        (0, 0),
        (1, 1_000),
        (2, 2_000),
        (3, 4_000),
        (4, 8_000),
        (5, 16_000),
        (6, 30_000),
        (7, 30_000),
        (64, 30_000),
        (65, 30_000),
        (u32::MAX, 30_000),
    ];
    for (failures, want) in table {
        assert_eq!(cfg.backoff(failures), want, "failures = {failures}");
    }
    let huge = SchedConfig {
        backoff_base_ms: u64::MAX / 2,
        backoff_max_ms: u64::MAX,
        ..cfg
    };
    assert_eq!(huge.backoff(3), u64::MAX);
}

#[test]
fn status_terminality() {
    let table = [
        (Waiting, false),
        (Ready, false),
        (Running, false),
        (Succeeded, true),
        (Failed, true),
        (Cancelled, true),
        (Skipped, true),
    ];
    for (status, terminal) in table {
        assert_eq!(status.is_terminal(), terminal, "{status:?}");
    }
    let table = [
        (JobStatus::Pending, false),
        (JobStatus::Running, false),
        (JobStatus::Succeeded, true),
        (JobStatus::Failed, true),
        (JobStatus::Cancelled, true),
    ];
    for (status, terminal) in table {
        assert_eq!(status.is_terminal(), terminal, "{status:?}");
    }
}

#[test]
fn assign_leases_the_ready_task() {
    let mut jobs = vec![job("j", 0, 2)];
    let (assignments, transitions) = assign(&mut jobs, &[worker("w1", "cpu", 1, 1)], 100, &cfg());
    assert_eq!(
        assignments,
        [Assignment {
            job_id: "j".into(),
            task_index: 0,
            epoch: 1,
            worker_id: "w1".into()
        }]
    );
    assert_eq!(
        transitions,
        [Transition::TaskLeased {
            job_id: "j".into(),
            task_index: 0,
            epoch: 1,
            worker_id: "w1".into()
        }]
    );
    let job = &jobs[0];
    assert_eq!(job.status, JobStatus::Running);
    assert_eq!(statuses(job), [Running, Waiting, Waiting]);
    let task = &job.tasks[0];
    assert_eq!((task.attempts, task.epoch), (1, 1));
    let lease = Lease {
        worker_id: "w1".into(),
        epoch: 1,
        expires_at: 10_100,
    };
    assert_eq!(task.lease.as_ref(), Some(&lease));
    assert_eq!(job.running_leases().collect::<Vec<_>>(), [(0, &lease)]);

    // A running task is not assigned again.
    let (assignments, _) = assign(&mut jobs, &[worker("w2", "cpu", 1, 1)], 200, &cfg());
    assert!(assignments.is_empty());
}

#[test]
fn assign_is_fifo_by_seq() {
    let mut jobs = vec![job("late", 2, 1), job("early", 1, 1)];
    let (assignments, _) = assign(&mut jobs, &[worker("w", "cpu", 1, 1)], 0, &cfg());
    assert_eq!(assignments.len(), 1);
    assert_eq!(assignments[0].job_id, "early");
    assert_eq!(jobs[0].status, JobStatus::Pending);
    assert_eq!(jobs[1].status, JobStatus::Running);

    let mut jobs = vec![job("c", 30, 1), job("a", 10, 1), job("b", 20, 1)];
    let (assignments, _) = assign(&mut jobs, &[worker("w", "cpu", 1, 5)], 0, &cfg());
    let order: Vec<_> = assignments.iter().map(|a| a.job_id.as_str()).collect();
    assert_eq!(order, ["a", "b", "c"]);
}

#[test]
fn assign_matches_backend_and_devices() {
    // (job backend, devices_per_gang, worker backend, worker devices, assigned)
    let table = [
        ("cpu", 1, "cpu", 1, true),
        ("cpu", 1, "cuda", 8, false),
        ("cuda", 1, "cpu", 8, false),
        ("cuda", 2, "cuda", 1, false),
        ("cuda", 2, "cuda", 2, true),
        ("cuda", 2, "cuda", 4, true),
    ];
    for (backend, gang, w_backend, w_devices, assigned) in table {
        let mut jobs = vec![job_on("j", 0, 1, backend, gang)];
        let workers = [worker("w", w_backend, w_devices, 1)];
        let (assignments, _) = assign(&mut jobs, &workers, 0, &cfg());
        assert_eq!(
            !assignments.is_empty(),
            assigned,
            "job {backend}x{gang} on worker {w_backend}x{w_devices}"
        );
    }

    // A later job that fits takes the slot an earlier one cannot use.
    let mut jobs = vec![job_on("gpu", 0, 1, "cuda", 1), job("cpu", 1, 1)];
    let (assignments, _) = assign(&mut jobs, &[worker("w", "cpu", 1, 1)], 0, &cfg());
    assert_eq!(assignments.len(), 1);
    assert_eq!(assignments[0].job_id, "cpu");
    assert_eq!(jobs[0].status, JobStatus::Pending);
}

#[test]
fn assign_respects_free_slots() {
    let mut jobs = vec![job("a", 0, 1), job("b", 1, 1), job("c", 2, 1)];
    let workers = [worker("full", "cpu", 1, 0), worker("w", "cpu", 1, 2)];
    let (assignments, _) = assign(&mut jobs, &workers, 0, &cfg());
    let got: Vec<_> = assignments
        .iter()
        .map(|a| (a.job_id.as_str(), a.worker_id.as_str()))
        .collect();
    assert_eq!(got, [("a", "w"), ("b", "w")]);
    assert_eq!(jobs[2].tasks[0].status, Ready);

    // The worker with the most free slots goes first; ties go to the first listed.
    let mut jobs = vec![job("a", 0, 1), job("b", 1, 1), job("c", 2, 1)];
    let workers = [worker("one", "cpu", 1, 1), worker("two", "cpu", 1, 2)];
    let (assignments, _) = assign(&mut jobs, &workers, 0, &cfg());
    let got: Vec<_> = assignments.iter().map(|a| a.worker_id.as_str()).collect();
    assert_eq!(got, ["two", "one", "two"]);

    let mut jobs = vec![job("a", 0, 1)];
    let (assignments, _) = assign(&mut jobs, &[], 0, &cfg());
    assert!(assignments.is_empty());
    assert_eq!(jobs[0].status, JobStatus::Pending);
}

#[test]
fn assign_skips_terminal_jobs_and_waits_for_backoff() {
    let mut cancelled = job("x", 0, 1);
    cancel(&mut cancelled, 1);
    let mut jobs = vec![cancelled.clone()];
    let (assignments, _) = assign(&mut jobs, &[worker("w", "cpu", 1, 1)], 5, &cfg());
    assert!(assignments.is_empty());
    assert_eq!(jobs[0], cancelled);

    let mut jobs = vec![job("j", 0, 1)];
    jobs[0].tasks[0].not_before = 500;
    let workers = [worker("w", "cpu", 1, 1)];
    assert!(assign(&mut jobs, &workers, 499, &cfg()).0.is_empty());
    assert_eq!(assign(&mut jobs, &workers, 500, &cfg()).0.len(), 1);
}

#[test]
fn renew_extends_the_lease_and_keeps_the_newest_checkpoint() {
    let cfg = cfg();
    let mut job = job("j", 0, 1);
    let a = lease_to(&mut job, "w", 0);
    let ckpt = |step| Checkpoint {
        step,
        artifact: artifact(&format!("ckpt-{step}")),
    };
    renew(
        &mut job,
        0,
        a.epoch,
        &WorkerId::from("w"),
        None,
        10_000,
        &cfg,
    )
    .unwrap();
    assert_eq!(job.tasks[0].lease.as_ref().unwrap().expires_at, 20_000);
    assert_eq!(job.tasks[0].checkpoint, None);
    // (reported step, stored step afterwards)
    for (step, stored) in [(100, 100), (50, 100), (100, 100), (200, 200)] {
        renew(
            &mut job,
            0,
            a.epoch,
            &WorkerId::from("w"),
            Some(ckpt(step)),
            11_000,
            &cfg,
        )
        .unwrap();
        assert_eq!(job.tasks[0].checkpoint, Some(ckpt(stored)), "step {step}");
    }
    assert_eq!(job.tasks[0].status, Running);
    assert_eq!(job.tasks[0].lease.as_ref().unwrap().expires_at, 21_000);
}

#[test]
fn lease_is_valid_up_to_and_including_expires_at() {
    let mut job = job("j", 0, 1);
    let a = lease_to(&mut job, "w", 0);
    let mut jobs = vec![job];
    assert!(expire_leases(&mut jobs, 10_000, &cfg()).is_empty());
    renew(
        &mut jobs[0],
        0,
        a.epoch,
        &WorkerId::from("w"),
        None,
        10_000,
        &cfg(),
    )
    .unwrap();
    assert_eq!(jobs[0].tasks[0].lease.as_ref().unwrap().expires_at, 20_000);
    assert_eq!(
        renew(
            &mut jobs[0],
            0,
            a.epoch,
            &WorkerId::from("w"),
            None,
            20_001,
            &cfg()
        ),
        Err(Reject::Expired)
    );
}

/// Every way a worker's message can be refused, each checked on `renew`, `complete` (both
/// outcomes) and `adopt` (which must also leave the job alone).
#[test]
fn rejects_leave_the_job_unchanged() {
    struct Case {
        name: &'static str,
        job: Job,
        task: u32,
        epoch: u64,
        worker: &'static str,
        now: u64,
        want: Reject,
        adoptable: bool,
    }
    let leased = || {
        let mut j = job("j", 0, 2);
        lease_to(&mut j, "w1", 0);
        j
    };
    // w1's lease (epoch 1) expired; the retry went to `to` as epoch 2.
    let re_leased = |to: &str| {
        let mut jobs = vec![leased()];
        expire_leases(&mut jobs, 10_001, &cfg());
        lease_to(&mut jobs[0], to, 20_000);
        jobs.remove(0)
    };
    let first_done = || {
        let mut j = job("j", 0, 2);
        succeed(&mut j, "w1", 0);
        j
    };
    let cancelled = || {
        let mut j = leased();
        cancel(&mut j, 5);
        j
    };
    let failed = || {
        let mut j = leased();
        complete(
            &mut j,
            0,
            1,
            &WorkerId::from("w1"),
            failure("oom", false),
            5,
            &cfg(),
        )
        .unwrap();
        j
    };
    let cases = [
        Case {
            name: "unknown task",
            job: leased(),
            task: 9,
            epoch: 1,
            worker: "w1",
            now: 1,
            want: Reject::UnknownTask,
            adoptable: false,
        },
        Case {
            name: "waiting task",
            job: leased(),
            task: 1,
            epoch: 0,
            worker: "w1",
            now: 1,
            want: Reject::NotRunning,
            adoptable: false,
        },
        Case {
            name: "ready task never leased",
            job: job("j", 0, 2),
            task: 0,
            epoch: 0,
            worker: "w1",
            now: 1,
            want: Reject::NotRunning,
            adoptable: false,
        },
        Case {
            name: "ready again after expiry",
            job: {
                let mut jobs = vec![leased()];
                expire_leases(&mut jobs, 10_001, &cfg());
                jobs.remove(0)
            },
            task: 0,
            epoch: 1,
            worker: "w1",
            now: 10_002,
            want: Reject::NotRunning,
            adoptable: false,
        },
        Case {
            name: "report on a succeeded task",
            job: first_done(),
            task: 0,
            epoch: 1,
            worker: "w1",
            now: 1,
            want: Reject::NotRunning,
            adoptable: false,
        },
        Case {
            name: "report on a cancelled job",
            job: cancelled(),
            task: 0,
            epoch: 1,
            worker: "w1",
            now: 6,
            want: Reject::NotRunning,
            adoptable: false,
        },
        Case {
            name: "report on a failed task",
            job: failed(),
            task: 0,
            epoch: 1,
            worker: "w1",
            now: 6,
            want: Reject::NotRunning,
            adoptable: false,
        },
        Case {
            name: "wrong worker",
            job: leased(),
            task: 0,
            epoch: 1,
            worker: "w2",
            now: 1,
            want: Reject::WrongWorker {
                holder: "w1".into(),
            },
            // adopt goes by the epoch alone
            adoptable: true,
        },
        Case {
            name: "stale epoch after a re-lease to another worker",
            job: re_leased("w2"),
            task: 0,
            epoch: 1,
            worker: "w1",
            now: 20_001,
            want: Reject::StaleEpoch { current: 2, got: 1 },
            adoptable: false,
        },
        Case {
            name: "stale epoch after a re-lease to the same worker",
            job: re_leased("w1"),
            task: 0,
            epoch: 1,
            worker: "w1",
            now: 20_001,
            want: Reject::StaleEpoch { current: 2, got: 1 },
            adoptable: false,
        },
        Case {
            name: "epoch from the future",
            job: leased(),
            task: 0,
            epoch: 7,
            worker: "w1",
            now: 1,
            want: Reject::StaleEpoch { current: 1, got: 7 },
            adoptable: false,
        },
        Case {
            name: "expired but not yet reaped",
            job: leased(),
            task: 0,
            epoch: 1,
            worker: "w1",
            now: 10_001,
            want: Reject::Expired,
            adoptable: false,
        },
    ];
    let cfg = cfg();
    for case in cases {
        let name = case.name;
        let ckpt = Checkpoint {
            step: 1,
            artifact: artifact("c"),
        };
        let mut job = case.job.clone();
        let got = renew(
            &mut job,
            case.task,
            case.epoch,
            &WorkerId::from(case.worker),
            Some(ckpt),
            case.now,
            &cfg,
        );
        assert_eq!(got, Err(case.want.clone()), "renew: {name}");
        assert_eq!(job, case.job, "renew changed the job: {name}");
        for outcome in [success(false), success(true), failure("x", true)] {
            let got = complete(
                &mut job,
                case.task,
                case.epoch,
                &WorkerId::from(case.worker),
                outcome,
                case.now,
                &cfg,
            );
            assert_eq!(got, Err(case.want.clone()), "complete: {name}");
            assert_eq!(job, case.job, "complete changed the job: {name}");
        }
        let adopted = adopt(
            &mut job,
            case.task,
            case.epoch,
            &WorkerId::from(case.worker),
            case.now,
            &cfg,
        );
        assert_eq!(adopted, case.adoptable, "adopt: {name}");
        if !adopted {
            assert_eq!(job, case.job, "a refused adopt changed the job: {name}");
        }
    }
}

#[test]
fn reject_messages() {
    let table = [
        (Reject::UnknownTask, "the job has no such task"),
        (
            Reject::NotRunning,
            "the task is not running (it holds no lease)",
        ),
        (
            Reject::WrongWorker {
                holder: "w-7".into(),
            },
            "the task's lease is held by worker w-7",
        ),
        (
            Reject::StaleEpoch { current: 4, got: 3 },
            "lease epoch 3 is superseded by epoch 4",
        ),
        (
            Reject::StaleEpoch { current: 4, got: 9 },
            "lease epoch 9 was never issued (the current epoch is 4)",
        ),
        (Reject::Expired, "the lease has expired"),
    ];
    for (reject, message) in table {
        assert_eq!(reject.to_string(), message);
        let err: Box<dyn std::error::Error> = Box::new(reject);
        assert_eq!(err.to_string(), message);
    }
}
