//! Random operation sequences against the invariants of the state machines.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};

use super::test_util::*;
use super::*;
use TaskStatus::{Failed, Ready, Running, Skipped, Succeeded, Waiting};

const WORKERS: [&str; 4] = ["w0", "w1", "w2", "w3"];

fn prop_cfg() -> SchedConfig {
    SchedConfig {
        lease_ms: 1_000,
        max_attempts: 3,
        backoff_base_ms: 100,
        backoff_max_ms: 400,
        snapshot_budget_bytes: None,
    }
}

#[derive(Debug, Clone)]
enum Pick<T> {
    /// The natural choice: the job's active task, the lease's epoch or holder.
    Current,
    Other(T),
}

#[derive(Debug, Clone)]
struct Target {
    job: usize,
    task: Pick<u32>,
    epoch: Pick<u64>,
    worker: Pick<usize>,
}

#[derive(Debug, Clone)]
enum Op {
    Advance(u64),
    /// (worker name, cuda, devices, free slots)
    Assign(Vec<(usize, bool, u32, u32)>),
    Renew(Target, Option<u64>),
    Complete(Target, Outcome),
    Adopt(Target, usize),
    Expire,
    Cancel(usize),
}

/// (seq, stages, cuda, devices_per_gang) of each job; 4 stages is a SegProp DAG.
type JobShape = (u64, usize, bool, u32);

fn pick<T: std::fmt::Debug + Clone + 'static>(
    other: impl Strategy<Value = T> + 'static,
) -> impl Strategy<Value = Pick<T>> {
    prop_oneof![4 => Just(Pick::Current), 1 => other.prop_map(Pick::Other)]
}

fn target() -> impl Strategy<Value = Target> {
    (0..3usize, pick(0..5u32), pick(0..5u64), pick(0..4usize)).prop_map(
        |(job, task, epoch, worker)| Target {
            job,
            task,
            epoch,
            worker,
        },
    )
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        3 => prop::bool::weighted(0.2).prop_map(success),
        1 => prop::bool::weighted(0.75).prop_map(|retryable| failure("boom", retryable)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let worker = (0..4usize, prop::bool::weighted(0.3), 1..=2u32, 0..=2u32);
    prop_oneof![
        20 => (0..1_500u64).prop_map(Op::Advance),
        20 => prop::collection::vec(worker, 1..=3).prop_map(Op::Assign),
        24 => (target(), prop::option::of(0..100u64)).prop_map(|(t, c)| Op::Renew(t, c)),
        30 => (target(), outcome()).prop_map(|(t, o)| Op::Complete(t, o)),
        6 => (target(), 0..4usize).prop_map(|(t, w)| Op::Adopt(t, w)),
        12 => Just(Op::Expire),
        1 => (0..3usize).prop_map(Op::Cancel),
    ]
}

fn scenario() -> impl Strategy<Value = (Vec<JobShape>, Vec<Op>)> {
    let shape = (0..10u64, 1..=4usize, prop::bool::weighted(0.3), 1..=2u32);
    (
        prop::collection::vec(shape, 1..=3),
        prop::collection::vec(op(), 200),
    )
}

fn backend(cuda: bool) -> &'static str {
    if cuda { "cuda" } else { "cpu" }
}

/// What a run went through, to check that the generator reaches the interesting states.
#[derive(Debug, Default)]
struct Stats {
    assignments: usize,
    commits: usize,
    retries: usize,
    skips: usize,
    adopted: usize,
    finished: BTreeMap<String, usize>,
    rejects: BTreeMap<String, usize>,
}

fn reject_name(r: &Reject) -> String {
    format!("{r:?}")
        .split([' ', '{'])
        .next()
        .unwrap_or_default()
        .to_string()
}

fn check_job(job: &Job) {
    let active: Vec<usize> = (0..job.tasks.len())
        .filter(|&i| matches!(job.tasks[i].status, Ready | Running))
        .collect();
    let done = |i: &u32| matches!(job.tasks[*i as usize].status, Succeeded | Skipped);
    if job.is_terminal() {
        assert!(
            active.is_empty(),
            "terminal job with an active task: {job:?}"
        );
        assert!(job.finished_at.is_some());
        assert!(job.tasks.iter().all(|t| t.status.is_terminal()));
    } else {
        assert!(!active.is_empty(), "stuck job: {job:?}");
        assert_eq!(job.finished_at, None);
    }
    for t in &job.tasks {
        if matches!(t.status, Ready | Running | Succeeded) {
            assert!(t.after.iter().all(done), "ran before its inputs: {job:?}");
        }
        if t.status == Waiting {
            assert!(!t.after.iter().all(done), "waiting for nothing: {job:?}");
        }
    }
    let running = job.tasks.iter().filter(|t| t.status == Running).count();
    if running > 0 {
        assert_eq!(job.status, JobStatus::Running);
    }
    if job.status == JobStatus::Pending {
        assert!(job.tasks.iter().all(|t| t.epoch == 0));
    }
    for t in &job.tasks {
        assert_eq!(
            t.lease.is_some(),
            t.status == Running,
            "lease iff running: {t:?}"
        );
        if let Some(lease) = &t.lease {
            assert_eq!(lease.epoch, t.epoch);
        }
        assert!(t.commits <= 1, "committed twice: {t:?}");
        assert_eq!(t.commits == 1, t.status == Succeeded);
        assert!(u64::from(t.attempts) == t.epoch);
        assert!(t.failures <= t.attempts);
    }
    match job.status {
        JobStatus::Succeeded => {
            assert!(
                job.tasks
                    .iter()
                    .all(|t| matches!(t.status, Succeeded | Skipped))
            );
            assert_eq!(job.tasks.last().map(|t| t.status), Some(Succeeded));
        }
        JobStatus::Failed => {
            assert_eq!(job.tasks.iter().filter(|t| t.status == Failed).count(), 1);
            assert!(job.error.is_some());
        }
        _ => {}
    }
}

/// Checks what must hold between the jobs before and after any operation.
fn check_step(before: &[Job], after: &[Job]) {
    for (b, a) in before.iter().zip(after) {
        if b.is_terminal() {
            assert_eq!(a, b, "a terminal job changed");
        }
        for (tb, ta) in b.tasks.iter().zip(&a.tasks) {
            if tb.status == Succeeded {
                assert_eq!(ta, tb, "a succeeded task changed");
            }
            if tb.status.is_terminal() {
                assert_eq!(ta.status, tb.status, "a terminal task changed status");
            }
            assert!(ta.epoch >= tb.epoch);
            assert!(ta.failures >= tb.failures);
            let step = |t: &Task| t.checkpoint.as_ref().map(|c| c.step);
            assert!(step(ta) >= step(tb), "checkpoint went back");
        }
    }
}

fn resolve(job: &Job, t: &Target) -> (u32, u64, WorkerId) {
    let active = job
        .tasks
        .iter()
        .find(|t| matches!(t.status, Ready | Running))
        .unwrap_or(&job.tasks[0]);
    let task_index = match t.task {
        Pick::Current => active.index,
        Pick::Other(i) => i,
    };
    let task = job.tasks.get(task_index as usize);
    let epoch = match t.epoch {
        Pick::Current => task.map_or(0, |t| t.epoch),
        Pick::Other(e) => e,
    };
    let worker = match t.worker {
        Pick::Current => task
            .and_then(|t| t.lease.as_ref())
            .map_or_else(|| WorkerId::from(WORKERS[0]), |l| l.worker_id.clone()),
        Pick::Other(w) => WorkerId::from(WORKERS[w]),
    };
    (task_index, epoch, worker)
}

fn run(shapes: &[JobShape], ops: &[Op]) -> Stats {
    let cfg = prop_cfg();
    let mut stats = Stats::default();
    let mut jobs: Vec<Job> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(seq, stages, cuda, gang))| {
            let mut job = job_on(&format!("job{i}"), seq, stages, backend(cuda), gang);
            if stages == 4 {
                // SegProp with SnapCheck: shards side by side, with or without overlap.
                let fanout = SnapshotFanout {
                    shards: 2,
                    overlap: seq % 2 == 1,
                };
                let tasks = plan_tasks(&segprop_plan(), Some(fanout));
                job = Job::new(
                    NewJob {
                        id: job.id,
                        seq,
                        name: job.name,
                        regime: "segprop".into(),
                        spec_yaml: job.spec_yaml,
                        backend: job.backend,
                        devices_per_gang: gang,
                        checkpoint_every_steps: 50,
                        tasks,
                    },
                    7,
                );
            }
            job
        })
        .collect();
    // Highest epoch leased so far, per (job, task).
    let mut leased: BTreeMap<(usize, u32), u64> = BTreeMap::new();
    let mut now = 1_000u64;
    for j in &jobs {
        check_job(j);
    }
    for op in ops {
        let before = jobs.clone();
        match op {
            Op::Advance(ms) => now += ms,
            Op::Expire => {
                for t in expire_leases(&mut jobs, now, &cfg) {
                    if matches!(t, Transition::TaskRetry { .. }) {
                        stats.retries += 1;
                    }
                }
            }
            Op::Cancel(j) => {
                let j = j % jobs.len();
                let live: Vec<(u32, Lease)> = jobs[j]
                    .running_leases()
                    .map(|(i, l)| (i, l.clone()))
                    .collect();
                let was_terminal = jobs[j].is_terminal();
                let revoked = cancel(&mut jobs[j], now);
                if was_terminal {
                    assert!(revoked.is_empty());
                } else {
                    assert_eq!(revoked, live);
                    assert_eq!(jobs[j].status, JobStatus::Cancelled);
                }
            }
            Op::Assign(spec) => {
                let mut workers: Vec<WorkerView> = Vec::new();
                for &(name, cuda, devices, slots) in spec {
                    if workers.iter().all(|w| w.id != WORKERS[name]) {
                        workers.push(worker(WORKERS[name], backend(cuda), devices, slots));
                    }
                }
                let (assignments, transitions) = assign(&mut jobs, &workers, now, &cfg);
                assert_eq!(assignments.len(), transitions.len());
                stats.assignments += assignments.len();
                let mut used: BTreeMap<&str, u32> = BTreeMap::new();
                let mut assigned_jobs = Vec::new();
                for a in &assignments {
                    let j = jobs.iter().position(|j| j.id == a.job_id).unwrap();
                    assigned_jobs.push(j);
                    let w = workers.iter().find(|w| w.id == a.worker_id).unwrap();
                    let n = used.entry(w.id.as_str()).or_default();
                    *n += 1;
                    assert!(*n <= w.free_slots, "worker {} over its slots", w.id);
                    assert_eq!(w.backend, jobs[j].backend);
                    assert!(w.devices >= jobs[j].devices_per_gang);
                    let tb = &before[j].tasks[a.task_index as usize];
                    assert_eq!(tb.status, Ready);
                    assert!(tb.not_before <= now);
                    assert!(!before[j].is_terminal());
                    let last = leased.insert((j, a.task_index), a.epoch);
                    assert!(last.is_none_or(|e| e < a.epoch), "epoch did not increase");
                    let ta = &jobs[j].tasks[a.task_index as usize];
                    assert_eq!(
                        ta.lease.as_ref().map(|l| l.expires_at),
                        Some(now + cfg.lease_ms)
                    );
                }
                // Nothing that could run was left idle, and no later job took a worker
                // an earlier one could use.
                for (j, job) in jobs.iter().enumerate() {
                    let due = job
                        .tasks
                        .iter()
                        .any(|t| t.status == Ready && t.not_before <= now);
                    if job.is_terminal() || !due {
                        continue;
                    }
                    let fits = |w: &WorkerView| {
                        w.backend == job.backend && w.devices >= job.devices_per_gang
                    };
                    for w in workers.iter().filter(|w| fits(w)) {
                        let n = used.get(w.id.as_str()).copied().unwrap_or(0);
                        assert_eq!(n, w.free_slots, "{} left idle for {}", w.id, job.id);
                    }
                    for (a, &k) in assignments.iter().zip(&assigned_jobs) {
                        if jobs[k].seq > job.seq {
                            let w = workers.iter().find(|w| w.id == a.worker_id).unwrap();
                            assert!(!fits(w), "{} overtook {} (FIFO)", jobs[k].id, jobs[j].id);
                        }
                    }
                }
            }
            Op::Renew(t, checkpoint) => {
                let j = t.job % jobs.len();
                let (task, epoch, w) = resolve(&jobs[j], t);
                let checkpoint = checkpoint.map(|step| Checkpoint {
                    step,
                    artifact: artifact(&format!("ckpt-{step}")),
                });
                match renew(
                    &mut jobs[j],
                    task,
                    epoch,
                    &WorkerId::from(w.as_str()),
                    checkpoint,
                    now,
                    &cfg,
                ) {
                    Ok(()) => {
                        let lease = jobs[j].tasks[task as usize].lease.as_ref().unwrap();
                        assert_eq!(lease.expires_at, now + cfg.lease_ms);
                        assert_eq!((lease.epoch, lease.worker_id.as_str()), (epoch, w.as_str()));
                    }
                    Err(r) => {
                        assert_eq!(jobs[j], before[j], "rejected renew changed the job");
                        *stats.rejects.entry(reject_name(&r)).or_default() += 1;
                    }
                }
            }
            Op::Complete(t, outcome) => {
                let j = t.job % jobs.len();
                let (task, epoch, w) = resolve(&jobs[j], t);
                let early = matches!(
                    outcome,
                    Outcome::Succeeded {
                        early_exit: true,
                        ..
                    }
                );
                match complete(
                    &mut jobs[j],
                    task,
                    epoch,
                    &WorkerId::from(w.as_str()),
                    outcome.clone(),
                    now,
                    &cfg,
                ) {
                    Ok(transitions) => {
                        let ta = &jobs[j].tasks[task as usize];
                        assert_ne!(ta.status, Running);
                        for t in &transitions {
                            match t {
                                Transition::TaskSucceeded { .. } => stats.commits += 1,
                                Transition::TaskRetry { .. } => stats.retries += 1,
                                Transition::TaskSkipped { .. } => {
                                    assert!(early);
                                    stats.skips += 1;
                                }
                                _ => {}
                            }
                        }
                    }
                    Err(r) => {
                        assert_eq!(jobs[j], before[j], "rejected complete changed the job");
                        *stats.rejects.entry(reject_name(&r)).or_default() += 1;
                    }
                }
            }
            Op::Adopt(t, new_worker) => {
                let j = t.job % jobs.len();
                let (task, epoch, _) = resolve(&jobs[j], t);
                if adopt(
                    &mut jobs[j],
                    task,
                    epoch,
                    &WorkerId::from(WORKERS[*new_worker]),
                    now,
                    &cfg,
                ) {
                    stats.adopted += 1;
                    let lease = jobs[j].tasks[task as usize].lease.as_ref().unwrap();
                    assert_eq!(lease.worker_id, WORKERS[*new_worker]);
                    assert_eq!(lease.epoch, epoch);
                } else {
                    assert_eq!(jobs[j], before[j], "refused adopt changed the job");
                }
            }
        }
        for j in &jobs {
            check_job(j);
        }
        check_step(&before, &jobs);
    }
    for j in &jobs {
        let back: Job = serde_json::from_str(&serde_json::to_string(j).unwrap()).unwrap();
        assert_eq!(&back, j);
        if j.is_terminal() {
            *stats.finished.entry(format!("{:?}", j.status)).or_default() += 1;
        }
    }
    stats
}

proptest! {
    #![proptest_config(Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    })]

    #[test]
    fn random_operations_keep_the_invariants((shapes, ops) in scenario()) {
        run(&shapes, &ops);
    }
}

/// The generator must reach every outcome, or the property above proves little.
#[test]
fn random_operations_cover_every_path() {
    let mut runner = TestRunner::deterministic();
    let strategy = scenario();
    let mut total = Stats::default();
    for _ in 0..64 {
        let (shapes, ops) = strategy.new_tree(&mut runner).unwrap().current();
        let stats = run(&shapes, &ops);
        total.assignments += stats.assignments;
        total.commits += stats.commits;
        total.retries += stats.retries;
        total.skips += stats.skips;
        total.adopted += stats.adopted;
        for (k, v) in stats.finished {
            *total.finished.entry(k).or_default() += v;
        }
        for (k, v) in stats.rejects {
            *total.rejects.entry(k).or_default() += v;
        }
    }
    assert!(total.assignments > 0 && total.commits > 0, "{total:?}");
    assert!(
        total.retries > 0 && total.skips > 0 && total.adopted > 0,
        "{total:?}"
    );
    for status in ["Succeeded", "Failed", "Cancelled"] {
        assert!(
            total.finished.contains_key(status),
            "no job {status}: {total:?}"
        );
    }
    for reject in [
        "UnknownTask",
        "NotRunning",
        "WrongWorker",
        "StaleEpoch",
        "Expired",
    ] {
        assert!(total.rejects.contains_key(reject), "no {reject}: {total:?}");
    }
}
