//! Job and task state machines and the task scheduler of the coordinator.
//!
//! A job is a small DAG of tasks: one [`TaskKind::TrainStage`] task per stage of its
//! [`StagePlan`], in plan order, the SnapCheck [`TaskKind::AdvanceSnapshots`] shards between
//! SegProp segments, then one [`TaskKind::Export`] task. A task runs once every task in its
//! `after` list succeeded or was skipped ([`plan_tasks`] builds the lists): training stages form a
//! chain, while the shards of one snapshot depth run side by side on every free worker.
//!
//! Everything here is pure: no I/O and no clocks. Time comes in as `now`, in unix milliseconds,
//! and the coordinator persists [`Job`] (it serializes to JSON) after every change.
//!
//! # Leases and fencing
//!
//! A worker runs a task under a [`Lease`]. Each lease issued for a task gets the next *epoch* of
//! that task (1, 2, ...), and every message a worker sends about a task carries the epoch it was
//! given. **Epochs, not worker ids, are the fencing token**: a message with any epoch but the
//! current lease's is refused ([`Reject::StaleEpoch`]), so a worker that lost its lease (it stopped
//! heartbeating, the task was re-leased elsewhere) can never commit a result. The worker id is a
//! second check for messages on a live connection; after a coordinator restart workers re-register
//! under new ids and [`adopt`] rebinds a still-current lease to the new id on the epoch alone.
//!
//! A lease is valid while `now <= expires_at`; [`renew`] (the heartbeat) pushes `expires_at` to
//! `now + lease_ms`, and [`expire_leases`] turns a lease with `expires_at < now` into a failed
//! attempt. A refused message ([`Reject`]) changes nothing.
//!
//! # Attempts and retries
//!
//! `attempts` counts leases issued; `failures` counts attempts that failed or expired. A retryable
//! failure makes the task `Ready` again after a backoff ([`SchedConfig::backoff`]) until `failures`
//! reaches `max_attempts`; then the task fails and so does its job (its other unfinished tasks are
//! cancelled). A retry resumes from the newest [`Checkpoint`] any attempt reported.

use serde::{Deserialize, Serialize};

pub use crate::spec::Backend;

mod dispatch;
mod id;
mod job;
mod lease;
mod plan;
mod task;

#[cfg(test)]
mod lease_tests;
#[cfg(test)]
mod outcome_tests;
#[cfg(test)]
mod plan_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod test_util;

pub use dispatch::{Advance, Attempt, Dispatch, Snapshots, Work};
pub use id::{JobId, WorkerId};
pub use job::NewJob;
pub use lease::*;
pub use plan::*;
pub use task::*;

/// Scheduler tuning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedConfig {
    /// How long a lease lives without a heartbeat.
    pub lease_ms: u64,
    /// Failed or expired attempts after which a task (and its job) fails.
    pub max_attempts: u32,
    /// Retry delay after the first failure; it doubles with each further failure.
    pub backoff_base_ms: u64,
    /// Upper bound of the retry delay.
    pub backoff_max_ms: u64,
    /// Byte budget of the snapshot store (`None`: unlimited). See [`Job::snapshot_reservation`].
    pub snapshot_budget_bytes: Option<u64>,
}

impl Default for SchedConfig {
    fn default() -> Self {
        Self {
            lease_ms: 10_000,
            max_attempts: 3,
            backoff_base_ms: 1_000,
            backoff_max_ms: 30_000,
            snapshot_budget_bytes: None,
        }
    }
}

impl SchedConfig {
    /// The retry delay after `failures` failures: `backoff_base_ms * 2^(failures - 1)`, capped at
    /// `backoff_max_ms`; 0 when nothing has failed.
    pub fn backoff(&self, failures: u32) -> u64 {
        if failures == 0 {
            return 0;
        }
        let factor = 1u64.checked_shl(failures - 1).unwrap_or(u64::MAX);
        self.backoff_base_ms
            .saturating_mul(factor)
            .min(self.backoff_max_ms)
    }
}
