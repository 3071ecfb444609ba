//! A job's own transitions: creation from planned tasks, snapshot budget and collection,
//! releasing tasks whose predecessors finished, and failing attempts.

use super::*;

/// What a new job is made of ([`Job::new`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    pub id: JobId,
    /// Submission order (FIFO among jobs).
    pub seq: u64,
    pub name: String,
    pub regime: String,
    pub spec_yaml: String,
    /// The workers that may run its tasks.
    pub backend: Backend,
    pub devices_per_gang: u32,
    pub checkpoint_every_steps: u64,
    pub tasks: Vec<PlannedTask>,
}

impl Job {
    /// A new `Pending` job (`job.tasks` from [`plan_tasks`]), created at `now`: the tasks that
    /// run after nothing are `Ready`, the others `Waiting`.
    pub fn new(job: NewJob, now: u64) -> Job {
        let NewJob {
            id,
            seq,
            name,
            regime,
            spec_yaml,
            backend,
            devices_per_gang,
            checkpoint_every_steps,
            tasks,
        } = job;
        let tasks = tasks
            .into_iter()
            .enumerate()
            .map(|(i, planned)| {
                let status = if planned.after.is_empty() {
                    TaskStatus::Ready
                } else {
                    TaskStatus::Waiting
                };
                Task::new(
                    u32::try_from(i).unwrap_or(u32::MAX),
                    planned.kind,
                    planned.after,
                    status,
                )
            })
            .collect();
        Job {
            id,
            seq,
            name,
            regime,
            spec_yaml,
            backend,
            devices_per_gang,
            checkpoint_every_steps,
            status: JobStatus::Pending,
            tasks,
            error: None,
            created_at: now,
            finished_at: None,
            snapshots_collected: Vec::new(),
            snapshots_swept: false,
            preflight: None,
            traceparent: String::new(),
        }
    }

    /// Which stored snapshot depths are live and which may be deleted. `S[d]` is read by the
    /// training stage planned right after its shards and by the shards that advance it to the
    /// next depth; once those are all finished (or the job is), nothing reads it again. With
    /// [`plan_tasks`]' ordering at most two depths are live at any time: the one a segment
    /// trains on and the one being advanced from it.
    pub fn snapshot_gc(&self) -> SnapshotDepths {
        let mut depths: Vec<u32> = Vec::new();
        for task in &self.tasks {
            if let TaskKind::AdvanceSnapshots { to, .. } = task.kind
                && task.epoch > 0
                && !depths.contains(&to)
                && !self.snapshots_collected.contains(&to)
            {
                depths.push(to);
            }
        }
        let finished = |t: &Task| t.status.is_terminal();
        let dead = depths
            .iter()
            .copied()
            .filter(|&d| {
                if self.is_terminal() {
                    return true;
                }
                let last_shard = self
                    .tasks
                    .iter()
                    .rev()
                    .find(|t| matches!(t.kind, TaskKind::AdvanceSnapshots { to, .. } if to == d))
                    .map_or(0, |t| t.index);
                let reader_done = self
                    .tasks
                    .iter()
                    .find(|t| t.index > last_shard && matches!(t.kind, TaskKind::TrainStage { .. }))
                    .is_none_or(finished);
                let advanced = self
                    .tasks
                    .iter()
                    .filter(
                        |t| matches!(t.kind, TaskKind::AdvanceSnapshots { from, .. } if from == d),
                    )
                    .all(finished);
                reader_done && advanced
            })
            .collect();
        SnapshotDepths { live: depths, dead }
    }

    /// Bytes of one stored snapshot depth of this job: the largest depth stored so far (the
    /// sum of its shards' outputs), else the estimate its first training stage reported
    /// ([`TaskResult::snapshot_depth_bytes`]), else `None`. Every depth holds the same
    /// batches at the same width and dtype, so one depth predicts the next.
    pub fn snapshot_depth_bytes(&self) -> Option<u64> {
        let mut by_depth: Vec<(u32, u64)> = Vec::new();
        for task in &self.tasks {
            if let TaskKind::AdvanceSnapshots { to, .. } = task.kind
                && task.status == TaskStatus::Succeeded
            {
                let bytes: u64 = task.outputs.iter().map(|a| a.bytes).sum();
                match by_depth.iter_mut().find(|(d, _)| *d == to) {
                    Some((_, total)) => *total += bytes,
                    None => by_depth.push((to, bytes)),
                }
            }
        }
        let measured = by_depth.iter().map(|(_, b)| *b).max();
        let estimated = self
            .tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Succeeded)
            .find_map(|t| t.result.as_ref()?.snapshot_depth_bytes);
        match (measured, estimated) {
            (Some(m), Some(e)) => Some(m.max(e)),
            (m, e) => m.or(e),
        }
    }

    /// Bytes this job holds in the snapshot store budget: two depths (the most that are live
    /// at once: the one a segment trains on and the one advanced from it) from the lease of its
    /// first `advance_snapshots` shard until the job ends; 0 before and after.
    pub fn snapshot_reservation(&self) -> u64 {
        let started = self
            .tasks
            .iter()
            .any(|t| matches!(t.kind, TaskKind::AdvanceSnapshots { .. }) && t.epoch > 0);
        if self.is_terminal() || !started {
            return 0;
        }
        2 * self.snapshot_depth_bytes().unwrap_or(0)
    }

    /// Succeeded, Failed or Cancelled.
    pub fn is_terminal(&self) -> bool {
        self.status.is_terminal()
    }

    /// The live leases as (task index, lease).
    pub fn running_leases(&self) -> impl Iterator<Item = (u32, &Lease)> {
        self.tasks
            .iter()
            .filter_map(|t| t.lease.as_ref().map(|lease| (t.index, lease)))
    }

    /// Makes `Ready` every `Waiting` task whose `after` tasks all succeeded or were skipped.
    pub(super) fn release_ready(&mut self) {
        let done: Vec<bool> = self
            .tasks
            .iter()
            .map(|t| matches!(t.status, TaskStatus::Succeeded | TaskStatus::Skipped))
            .collect();
        for task in &mut self.tasks {
            let ready = task
                .after
                .iter()
                .all(|&i| done.get(i as usize).copied().unwrap_or(false));
            if task.status == TaskStatus::Waiting && ready {
                task.status = TaskStatus::Ready;
            }
        }
    }

    /// Jobs stored before tasks had `after` lists were chains: task `i` ran after task `i - 1`.
    pub fn upgrade_legacy_chain(&mut self) {
        if self.tasks.len() > 1 && self.tasks.iter().all(|t| t.after.is_empty()) {
            for task in self.tasks.iter_mut().skip(1) {
                task.after = vec![task.index - 1];
            }
        }
    }

    /// Jobs stored before tasks had a typed [`TaskResult`] kept only the record: the snapshot
    /// depth estimate is read back from it once, on load.
    pub fn upgrade_legacy_results(&mut self) {
        for task in &mut self.tasks {
            if task.result.is_some() {
                continue;
            }
            let Some(record) = task
                .result_json
                .as_deref()
                .and_then(|r| serde_json::from_str::<serde_json::Value>(r).ok())
            else {
                continue;
            };
            task.result = Some(TaskResult {
                snapshot_depth_bytes: record
                    .get("snapshot_depth_bytes")
                    .and_then(serde_json::Value::as_u64),
                ..TaskResult::default()
            });
        }
    }

    pub(super) fn task_mut(&mut self, task_index: u32) -> Option<&mut Task> {
        self.tasks.get_mut(usize::try_from(task_index).ok()?)
    }

    /// Fails task `task_index` and the job with it; cancels every other unfinished task.
    pub(super) fn fail(&mut self, task_index: u32, reason: String, now: u64) -> Vec<Transition> {
        let mut name = String::new();
        for task in &mut self.tasks {
            if task.index == task_index {
                task.status = TaskStatus::Failed;
                task.lease = None;
                task.error = Some(reason.clone());
                name = task.kind.name().to_string();
            } else if !task.status.is_terminal() {
                task.status = TaskStatus::Cancelled;
                task.lease = None;
            }
        }
        self.status = JobStatus::Failed;
        self.error = Some(format!("task {name} failed: {reason}"));
        self.finished_at = Some(now);
        vec![
            Transition::TaskFailed {
                job_id: self.id.clone(),
                task_index,
                reason,
            },
            Transition::JobFinished {
                job_id: self.id.clone(),
                status: JobStatus::Failed,
            },
        ]
    }

    /// One attempt of task `task_index` failed: retry it after a backoff, or fail the job.
    pub(super) fn attempt_failed(
        &mut self,
        task_index: u32,
        reason: String,
        retryable: bool,
        now: u64,
        cfg: &SchedConfig,
    ) -> Vec<Transition> {
        let Some(task) = self.task_mut(task_index) else {
            return Vec::new();
        };
        task.lease = None;
        task.failures = task.failures.saturating_add(1);
        let failures = task.failures;
        if retryable && failures < cfg.max_attempts {
            let not_before = now.saturating_add(cfg.backoff(failures));
            task.status = TaskStatus::Ready;
            task.not_before = not_before;
            task.error = Some(reason.clone());
            vec![Transition::TaskRetry {
                job_id: self.id.clone(),
                task_index,
                failures,
                not_before,
                reason,
            }]
        } else {
            self.fail(task_index, reason, now)
        }
    }
}
