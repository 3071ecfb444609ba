//! Conversions between the wire and the domain types both ends of the protocol share: stored
//! artifacts, mid-stage checkpoints and a task's typed result. The coordinator and the worker
//! each convert the rest in their own `convert.rs`.

use segprop_core::sched::{Artifact, Checkpoint, TaskResult};

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
}
