//! Conversions between the wire and the domain types both ends of the protocol share: stored
//! artifacts, mid-stage checkpoints, a task's typed result, and the task a worker is sent
//! ([`Dispatch`], checked on arrival). The coordinator and the worker each convert the rest in
//! their own `convert.rs`.

use segprop_core::sched::{
    Advance, Artifact, Attempt, Checkpoint, Dispatch, JobId, Snapshots, TaskResult, Work,
};

use crate::v1 as pb;

impl From<&Artifact> for pb::ArtifactRef {
    fn from(a: &Artifact) -> Self {
        pb::ArtifactRef {
            uri: a.uri.clone(),
            checksum: a.checksum.clone(),
            bytes: a.bytes,
        }
    }
}

impl From<&pb::ArtifactRef> for Artifact {
    fn from(a: &pb::ArtifactRef) -> Self {
        Artifact {
            uri: a.uri.clone(),
            checksum: a.checksum.clone(),
            bytes: a.bytes,
        }
    }
}

impl From<&Checkpoint> for pb::CheckpointRef {
    fn from(c: &Checkpoint) -> Self {
        pb::CheckpointRef {
            step: c.step,
            artifact: Some((&c.artifact).into()),
        }
    }
}

/// A checkpoint reference without its artifact refers to nothing.
pub fn checkpoint(c: &pb::CheckpointRef) -> Option<Checkpoint> {
    Some(Checkpoint {
        step: c.step,
        artifact: c.artifact.as_ref()?.into(),
    })
}

impl From<&TaskResult> for pb::TaskResult {
    fn from(r: &TaskResult) -> Self {
        pb::TaskResult {
            steps: r.steps,
            eval_loss: r.eval_loss,
            snapshot_depth_bytes: r.snapshot_depth_bytes,
            snapshot_depth: r.snapshot_depth,
            snapshot_batches: r.snapshot_batches,
            final_eval_loss: r.final_eval_loss,
            final_num_layers: r.final_num_layers,
        }
    }
}

impl From<pb::TaskResult> for TaskResult {
    fn from(r: pb::TaskResult) -> Self {
        TaskResult {
            steps: r.steps,
            eval_loss: r.eval_loss,
            snapshot_depth_bytes: r.snapshot_depth_bytes,
            snapshot_depth: r.snapshot_depth,
            snapshot_batches: r.snapshot_batches,
            final_eval_loss: r.final_eval_loss,
            final_num_layers: r.final_num_layers,
        }
    }
}

/// A message that does not say what it must: the field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "field `{}`: {}", self.field, self.message)
    }
}

impl std::error::Error for DecodeError {}

impl From<&Attempt> for pb::TaskRef {
    fn from(a: &Attempt) -> Self {
        pb::TaskRef {
            job_id: a.job_id.to_string(),
            task_index: a.task_index,
            epoch: a.epoch,
        }
    }
}

/// The attempt an assignment is for (whatever else it says).
pub fn attempt(a: &pb::Assignment) -> Attempt {
    Attempt {
        job_id: JobId::from(a.job_id.as_str()),
        task_index: a.task_index,
        epoch: a.epoch,
    }
}

/// Consumes the dispatch: its strings (the job's spec among them) move to the wire, uncopied.
impl From<Dispatch> for pb::Assignment {
    fn from(d: Dispatch) -> Self {
        let (kind, from, to, shard, out_fingerprint, stage_metrics) = match d.work {
            Work::TrainStage => (pb::TaskKind::TrainStage, 0, 0, 0, String::new(), Vec::new()),
            Work::Advance(a) => (
                pb::TaskKind::AdvanceSnapshots,
                a.from,
                a.to,
                a.shard,
                a.fingerprint,
                Vec::new(),
            ),
            Work::Export { stage_metrics } => (
                pb::TaskKind::Export,
                0,
                0,
                0,
                String::new(),
                stage_metrics.iter().map(Into::into).collect(),
            ),
        };
        pb::Assignment {
            job_id: d.attempt.job_id.into(),
            task_index: d.attempt.task_index,
            epoch: d.attempt.epoch,
            kind: kind as i32,
            stage_index: d.stage_index,
            spec_yaml: d.spec_yaml,
            job_dir: d.job_dir,
            input_state: d.input_state.as_ref().map(Into::into),
            resume_from: d.resume_from.as_ref().map(Into::into),
            stage_metrics,
            checkpoint_every_steps: d.checkpoint_every_steps,
            snapshot_depth: d.snapshots.depth,
            snapshot_from: from,
            snapshot_to: to,
            snapshot_shard: shard,
            snapshot_shards: d.snapshots.shards,
            snapshot_in_fingerprint: d.snapshots.fingerprint,
            snapshot_out_fingerprint: out_fingerprint,
            snapshots_complete: d.snapshots.complete,
            traceparent: d.traceparent,
        }
    }
}

impl TryFrom<&pb::Assignment> for Dispatch {
    type Error = DecodeError;

    /// Refuses an unknown kind, an empty job id or directory, and an advance whose `to` is not
    /// past its `from` or whose shard is not one of its shards.
    fn try_from(a: &pb::Assignment) -> Result<Self, DecodeError> {
        let refuse = |field: &'static str, message: String| DecodeError { field, message };
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
        Ok(Dispatch {
            attempt: attempt(a),
            work,
            stage_index: a.stage_index,
            spec_yaml: a.spec_yaml.clone(),
            job_dir: a.job_dir.clone(),
            input_state: a.input_state.as_ref().map(Into::into),
            resume_from: a.resume_from.as_ref().and_then(checkpoint),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_types_survive_the_wire() {
        let artifact = Artifact {
            uri: "jobs/j1/stages/0/attempt-1/state".into(),
            checksum: "blake3:ab".into(),
            bytes: 42,
        };
        let checkpoint = Checkpoint {
            step: 50,
            artifact: artifact.clone(),
        };
        assert_eq!(super::checkpoint(&(&checkpoint).into()), Some(checkpoint));
        assert_eq!(
            super::checkpoint(&pb::CheckpointRef {
                step: 3,
                artifact: None
            }),
            None
        );
        let result = TaskResult {
            steps: 7,
            eval_loss: Some(2.5),
            snapshot_depth_bytes: Some(1 << 20),
            snapshot_depth: Some(3),
            snapshot_batches: 12,
            final_eval_loss: Some(2.25),
            final_num_layers: 8,
        };
        assert_eq!(TaskResult::from(pb::TaskResult::from(&result)), result);
    }

    fn advance() -> Dispatch {
        Dispatch {
            attempt: Attempt {
                job_id: JobId::from("j1"),
                task_index: 2,
                epoch: 7,
            },
            work: Work::Advance(Advance {
                from: 1,
                to: 2,
                shard: 1,
                fingerprint: "out".into(),
            }),
            stage_index: 1,
            spec_yaml: "name: x".into(),
            job_dir: "jobs/j1".into(),
            input_state: None,
            resume_from: Some(Checkpoint {
                step: 50,
                artifact: Artifact {
                    uri: "jobs/j1/ckpt-50".into(),
                    checksum: "c".into(),
                    bytes: 9,
                },
            }),
            checkpoint_every_steps: 50,
            snapshots: Snapshots {
                depth: 1,
                shards: 2,
                fingerprint: "in".into(),
                complete: true,
            },
            traceparent: String::new(),
        }
    }

    #[test]
    fn a_dispatch_survives_the_wire() {
        let sent = advance();
        let wire = pb::Assignment::from(sent.clone());
        assert_eq!(wire.kind, pb::TaskKind::AdvanceSnapshots as i32);
        assert_eq!(Dispatch::try_from(&wire), Ok(sent));
        let mut export = advance();
        export.work = Work::Export {
            stage_metrics: vec![Artifact {
                uri: "m".into(),
                checksum: "c".into(),
                bytes: 1,
            }],
        };
        export.snapshots = Snapshots::default();
        assert_eq!(
            Dispatch::try_from(&pb::Assignment::from(export.clone())),
            Ok(export.clone())
        );
        assert!(export.reads_snapshots().is_none());
        assert_eq!(advance().reads_snapshots().map(|s| s.depth), Some(1));
    }

    #[test]
    fn contradictory_or_unknown_assignments_are_refused_by_field() {
        let field = |a: pb::Assignment| Dispatch::try_from(&a).unwrap_err().field;
        let wire = || pb::Assignment::from(advance());
        let mut unknown = wire();
        unknown.kind = 99;
        assert_eq!(field(unknown), "kind");
        let mut backwards = wire();
        backwards.snapshot_to = 1;
        assert_eq!(field(backwards), "snapshot_to");
        let mut shard = wire();
        shard.snapshot_shard = 2;
        assert_eq!(field(shard), "snapshot_shard");
        let mut nameless = wire();
        nameless.job_id.clear();
        assert_eq!(field(nameless), "job_id");
    }
}
