//! The worker's wire conversions: a task's outcome out. An assignment comes in as the domain's
//! `Dispatch`, decoded and checked by `segprop_proto::domain` (a kind this worker does not know,
//! or a field that contradicts it, is refused with the field's name).

use segprop_proto::v1 as pb;

use crate::error::TaskError;
use crate::task::Succeeded;

impl From<Succeeded> for pb::TaskSucceeded {
    fn from(s: Succeeded) -> Self {
        pb::TaskSucceeded {
            artifacts: s.outputs.iter().map(Into::into).collect(),
            result_json: s.record_json,
            early_exit: s.early_exit,
            metrics: s.metrics.as_ref().map(Into::into),
            result: Some((&s.result).into()),
        }
    }
}

impl From<TaskError> for pb::TaskFailed {
    fn from(e: TaskError) -> Self {
        pb::TaskFailed {
            reason: e.to_string(),
            retryable: e.retryable(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_success_keeps_its_typed_result_on_the_wire() {
        let s = Succeeded {
            outputs: vec![segprop_core::sched::Artifact {
                uri: "jobs/j1/model".into(),
                checksum: "c".into(),
                bytes: 3,
            }],
            metrics: None,
            record_json: "{}".into(),
            result: segprop_core::sched::TaskResult {
                steps: 4,
                ..Default::default()
            },
            early_exit: true,
        };
        let w = pb::TaskSucceeded::from(s);
        assert_eq!(w.artifacts[0].uri, "jobs/j1/model");
        assert_eq!(w.result.map(|r| r.steps), Some(4));
        assert!(w.early_exit);
    }
}
