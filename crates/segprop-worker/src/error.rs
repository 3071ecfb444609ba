//! Why a task failed ([`TaskError`]) and whether the coordinator should retry it. The wire's
//! `TaskFailed` is made from it (`convert.rs`) only where the daemon reports the task
//! (`daemon.rs`); everything below that works with this type.

use segprop_train::TrainError;

#[derive(Debug)]
pub(crate) enum TaskError {
    /// The engine failed: retried unless the job itself is at fault (its spec, corpus or model
    /// checkpoint, a non-finite loss, a state that cannot continue).
    Train(TrainError),
    /// The artifact or snapshot store could not be reached, or refused a write: retried.
    Unavailable(String),
    /// An artifact the task needs is damaged and has no earlier version: not retried.
    Damaged(String),
    /// This worker cannot run the assignment (a task kind or backend it does not know): not
    /// retried.
    Unsupported(String),
    /// The task was cancelled between two blobs of a SnapCheck advance: retried.
    Cancelled,
}

impl TaskError {
    /// Whether another attempt can succeed.
    pub(crate) fn retryable(&self) -> bool {
        match self {
            TaskError::Train(e) => {
                !(e.is_bad_input()
                    || matches!(
                        e,
                        TrainError::NonFiniteLoss { .. } | TrainError::State { .. }
                    ))
            }
            TaskError::Unavailable(_) | TaskError::Cancelled => true,
            TaskError::Damaged(_) | TaskError::Unsupported(_) => false,
        }
    }
}

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskError::Train(e) => e.fmt(f),
            TaskError::Unavailable(m) | TaskError::Damaged(m) | TaskError::Unsupported(m) => {
                f.write_str(m)
            }
            TaskError::Cancelled => f.write_str("cancelled"),
        }
    }
}

impl std::error::Error for TaskError {}

impl From<TrainError> for TaskError {
    fn from(e: TrainError) -> Self {
        TaskError::Train(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use segprop_proto::v1 as pb;

    #[test]
    fn the_wire_failure_says_why_and_whether_to_retry() {
        let spec = TrainError::State {
            path: "jobs/j/state".into(),
            message: "the plan was already complete".into(),
        };
        let cases = [
            (
                TaskError::from(spec),
                false,
                "the plan was already complete",
            ),
            (TaskError::Train(TrainError::Cancelled), true, "cancelled"),
            (
                TaskError::Unavailable("store down".into()),
                true,
                "store down",
            ),
            (
                TaskError::Damaged("blob x is corrupt".into()),
                false,
                "blob x",
            ),
            (
                TaskError::Unsupported("unknown task kind 9".into()),
                false,
                "kind 9",
            ),
            (TaskError::Cancelled, true, "cancelled"),
        ];
        for (e, retryable, says) in cases {
            let wire = pb::TaskFailed::from(e);
            assert_eq!(wire.retryable, retryable, "{}", wire.reason);
            assert!(wire.reason.contains(says), "{}", wire.reason);
        }
    }
}
