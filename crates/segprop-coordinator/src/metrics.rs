//! The coordinator's Prometheus metrics, rendered from its state at scrape time
//! (docs/operations.md, "What to watch").

use std::collections::HashMap;

use segprop_core::sched::{Job, JobId, JobStatus, TaskStatus};
use segprop_proto::v1 as pb;
use segprop_telemetry::metrics::{Exposition, Kind};

/// A registered worker, as metrics show it.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub name: String,
    pub backend: String,
    pub devices: u32,
    /// Unix milliseconds of its last heartbeat.
    pub last_seen: u64,
}

/// Counters for logs, tests and the load test.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub assignments: u64,
    pub rejected_reports: u64,
    pub rejected_renewals: u64,
    pub commits: u64,
}

/// Everything a scrape reads, borrowed under the coordinator's lock.
pub struct State<'a> {
    pub jobs: &'a [Job],
    pub done: &'a [Job],
    pub workers: Vec<WorkerInfo>,
    pub progress: &'a HashMap<(JobId, u32), pb::Progress>,
    pub counters: Counters,
    pub now_ms: u64,
    pub snapshot_budget_bytes: Option<u64>,
}

const JOB_STATES: [(JobStatus, &str); 5] = [
    (JobStatus::Pending, "pending"),
    (JobStatus::Running, "running"),
    (JobStatus::Succeeded, "succeeded"),
    (JobStatus::Failed, "failed"),
    (JobStatus::Cancelled, "cancelled"),
];

const TASK_STATES: [(TaskStatus, &str); 7] = [
    (TaskStatus::Waiting, "waiting"),
    (TaskStatus::Ready, "ready"),
    (TaskStatus::Running, "running"),
    (TaskStatus::Succeeded, "succeeded"),
    (TaskStatus::Failed, "failed"),
    (TaskStatus::Cancelled, "cancelled"),
    (TaskStatus::Skipped, "skipped"),
];

pub fn render(s: &State<'_>) -> String {
    let all: Vec<&Job> = s.jobs.iter().chain(s.done).collect();
    let mut e = Exposition::new();

    e.family(
        "segprop_jobs",
        Kind::Gauge,
        "Jobs known to the coordinator, by state.",
    );
    for (status, name) in JOB_STATES {
        let n = all.iter().filter(|j| j.status == status).count();
        e.sample(&[("state", name)], n as f64);
    }
    e.family("segprop_tasks", Kind::Gauge, "Tasks of all jobs, by state.");
    for (status, name) in TASK_STATES {
        let n: usize = all
            .iter()
            .map(|j| j.tasks.iter().filter(|t| t.status == status).count())
            .sum();
        e.sample(&[("state", name)], n as f64);
    }
    e.family(
        "segprop_task_retries_total",
        Kind::Counter,
        "Task attempts that failed or lost their lease (each is retried until max_attempts).",
    );
    let failures: u64 = all
        .iter()
        .flat_map(|j| &j.tasks)
        .map(|t| u64::from(t.failures))
        .sum();
    e.sample(&[], failures as f64);
    e.family(
        "segprop_task_assignments_total",
        Kind::Counter,
        "Leases issued since the coordinator started.",
    )
    .sample(&[], s.counters.assignments as f64);
    e.family(
        "segprop_task_commits_total",
        Kind::Counter,
        "Tasks committed as succeeded since the coordinator started.",
    )
    .sample(&[], s.counters.commits as f64);
    e.family(
        "segprop_rejected_reports_total",
        Kind::Counter,
        "Reports refused since the coordinator started (stale lease epoch: a zombie worker).",
    )
    .sample(&[], s.counters.rejected_reports as f64);

    e.family(
        "segprop_workers",
        Kind::Gauge,
        "Registered workers, by backend.",
    );
    let mut backends: Vec<&str> = s.workers.iter().map(|w| w.backend.as_str()).collect();
    backends.sort_unstable();
    backends.dedup();
    for backend in &backends {
        let n = s.workers.iter().filter(|w| w.backend == *backend).count();
        e.sample(&[("backend", backend)], n as f64);
    }
    e.family(
        "segprop_worker_devices",
        Kind::Gauge,
        "Devices each registered worker offers a gang.",
    );
    for w in &s.workers {
        e.sample(&[("worker", &w.name)], f64::from(w.devices));
    }
    e.family(
        "segprop_worker_heartbeat_lag_seconds",
        Kind::Gauge,
        "Seconds since each registered worker's last heartbeat.",
    );
    for w in &s.workers {
        let lag = s.now_ms.saturating_sub(w.last_seen) as f64 / 1e3;
        e.sample(&[("worker", &w.name)], lag);
    }

    // Progress of running stage tasks, labelled by job and stage.
    let mut running: Vec<(&JobId, &pb::Progress, &str)> = Vec::new();
    for job in s.jobs {
        for ((id, _), p) in s.progress.iter().filter(|((id, _), _)| *id == job.id) {
            running.push((id, p, job.name.as_str()));
        }
    }
    running.sort_by(|a, b| (a.0, a.1.task_index).cmp(&(b.0, b.1.task_index)));
    let stage_family =
        |e: &mut Exposition, name: &str, help: &str, value: &dyn Fn(&pb::Progress) -> f64| {
            e.family(name, Kind::Gauge, help);
            for (id, p, job_name) in &running {
                e.sample(
                    &[
                        ("job", id.as_str()),
                        ("job_name", job_name),
                        ("stage", &p.stage),
                    ],
                    value(p),
                );
            }
        };
    stage_family(
        &mut e,
        "segprop_stage_step",
        "Optimizer steps done in each running stage.",
        &|p| p.step as f64,
    );
    stage_family(
        &mut e,
        "segprop_stage_budget_steps",
        "Step budget of each running stage (0: none).",
        &|p| p.budget_steps as f64,
    );
    stage_family(
        &mut e,
        "segprop_stage_loss",
        "Train loss of the latest step of each running stage.",
        &|p| p.loss,
    );
    stage_family(
        &mut e,
        "segprop_stage_tokens_per_second",
        "Training throughput of each running stage.",
        &|p| p.tokens_per_s,
    );

    e.family(
        "segprop_snapshot_reserved_bytes",
        Kind::Gauge,
        "Snapshot-store bytes reserved by running SnapCheck jobs.",
    );
    let reserved: u64 = s.jobs.iter().map(Job::snapshot_reservation).sum();
    e.sample(&[], reserved as f64);
    if let Some(budget) = s.snapshot_budget_bytes {
        e.family(
            "segprop_snapshot_budget_bytes",
            Kind::Gauge,
            "Byte budget of the snapshot store (snapshot_budget_bytes).",
        )
        .sample(&[], budget as f64);
    }
    e.finish()
}
