//! The worker's wire conversions: an assignment in (checked: a kind this worker does not know,
//! or a field that contradicts it, is refused with the field's name) and a task's outcome out.
//! The types both ends share convert in `segprop_proto::domain`.

use segprop_proto::v1 as pb;

use crate::assignment::{Advance, Assignment, Snapshots, Succeeded, TaskRef, Work};
use crate::error::TaskError;

impl From<&pb::Assignment> for TaskRef {
    fn from(a: &pb::Assignment) -> Self {
        TaskRef {
            job_id: a.job_id.clone(),
            task_index: a.task_index,
            epoch: a.epoch,
        }
    }
}

impl TryFrom<&pb::Assignment> for Assignment {
    type Error = TaskError;

    fn try_from(a: &pb::Assignment) -> Result<Self, TaskError> {
        let refuse = |field: &str, message: String| {
            TaskError::Unsupported(format!("assignment field `{field}`: {message}"))
        };
        if a.job_id.is_empty() {
            return Err(refuse("job_id", "empty".into()));
        }
        if a.job_dir.is_empty() {
            return Err(refuse("job_dir", "empty".into()));
        }
        let work = match pb::TaskKind::try_from(a.kind) {
            Ok(pb::TaskKind::TrainStage) => Work::TrainStage,
            Ok(pb::TaskKind::AdvanceSnapshots) => {
                if a.snapshot_to <= a.snapshot_from {
                    return Err(refuse(
                        "snapshot_to",
                        format!(
                            "{} is not past snapshot_from {}",
                            a.snapshot_to, a.snapshot_from
                        ),
                    ));
                }
                if a.snapshot_shard >= a.snapshot_shards.max(1) {
                    return Err(refuse(
                        "snapshot_shard",
                        format!("{} of {} shards", a.snapshot_shard, a.snapshot_shards),
                    ));
                }
                Work::Advance(Advance {
                    from: a.snapshot_from,
                    to: a.snapshot_to,
                    shard: a.snapshot_shard,
                    fingerprint: a.snapshot_out_fingerprint.clone(),
                })
            }
            Ok(pb::TaskKind::Export) => Work::Export {
                stage_metrics: a.stage_metrics.iter().map(Into::into).collect(),
            },
            _ => return Err(refuse("kind", format!("unknown task kind {}", a.kind))),
        };
        Ok(Assignment {
            task: a.into(),
            work,
            stage_index: a.stage_index,
            spec_yaml: a.spec_yaml.clone(),
            job_dir: a.job_dir.clone(),
            input_state: a.input_state.as_ref().map(Into::into),
            resume_from: a
                .resume_from
                .as_ref()
                .and_then(segprop_proto::domain::checkpoint),
            checkpoint_every_steps: a.checkpoint_every_steps,
            snapshots: Snapshots {
                depth: a.snapshot_depth,
                shards: a.snapshot_shards,
                fingerprint: a.snapshot_in_fingerprint.clone(),
                complete: a.snapshots_complete,
            },
            traceparent: a.traceparent.clone(),
        })
    }
}

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

    fn wire(kind: pb::TaskKind) -> pb::Assignment {
        pb::Assignment {
            job_id: "j1".into(),
            task_index: 2,
            epoch: 7,
            kind: kind as i32,
            stage_index: 1,
            spec_yaml: "name: x".into(),
            job_dir: "jobs/j1".into(),
            resume_from: Some(pb::CheckpointRef {
                step: 50,
                artifact: Some(pb::ArtifactRef {
                    uri: "jobs/j1/ckpt-50".into(),
                    checksum: "c".into(),
                    bytes: 9,
                }),
            }),
            checkpoint_every_steps: 50,
            snapshot_depth: 1,
            snapshot_from: 1,
            snapshot_to: 2,
            snapshot_shard: 1,
            snapshot_shards: 2,
            snapshot_in_fingerprint: "in".into(),
            snapshot_out_fingerprint: "out".into(),
            snapshots_complete: true,
            ..Default::default()
        }
    }

    #[test]
    fn an_advance_decodes_its_shard_and_both_fingerprints() {
        let a = Assignment::try_from(&wire(pb::TaskKind::AdvanceSnapshots)).unwrap();
        assert_eq!(
            a.work,
            Work::Advance(Advance {
                from: 1,
                to: 2,
                shard: 1,
                fingerprint: "out".into()
            })
        );
        assert_eq!(
            a.reads_snapshots().map(|s| s.fingerprint.as_str()),
            Some("in")
        );
        assert_eq!(a.resume_from.as_ref().map(|c| c.step), Some(50));
        assert_eq!(a.kind_name(), "advance_snapshots");
        assert_eq!(a.task.epoch, 7);
    }

    #[test]
    fn an_export_reads_no_snapshots() {
        let a = Assignment::try_from(&wire(pb::TaskKind::Export)).unwrap();
        assert!(a.reads_snapshots().is_none());
    }

    #[test]
    fn contradictory_or_unknown_assignments_are_refused_by_field() {
        let refused = |a: pb::Assignment| {
            let e = Assignment::try_from(&a).unwrap_err();
            assert!(!e.retryable(), "{e}");
            e.to_string()
        };
        let mut unknown = wire(pb::TaskKind::TrainStage);
        unknown.kind = 99;
        assert!(refused(unknown).contains("`kind`: unknown task kind 99"));
        let mut backwards = wire(pb::TaskKind::AdvanceSnapshots);
        backwards.snapshot_to = 1;
        assert!(refused(backwards).contains("`snapshot_to`"));
        let mut shard = wire(pb::TaskKind::AdvanceSnapshots);
        shard.snapshot_shard = 2;
        assert!(refused(shard).contains("`snapshot_shard`: 2 of 2 shards"));
        let mut nameless = wire(pb::TaskKind::TrainStage);
        nameless.job_id.clear();
        assert!(refused(nameless).contains("`job_id`"));
    }

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
