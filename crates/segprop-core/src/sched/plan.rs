//! The task DAG of a new job ([`plan_tasks`]): a chain of training stages, the SnapCheck
//! advance shards between SegProp segments (side by side), then the export.

use serde::{Deserialize, Serialize};

use super::TaskKind;
use crate::plan::{StageKind, StagePlan};

/// A task of a new job: what it does and which tasks (by index) it runs after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedTask {
    pub kind: TaskKind,
    pub after: Vec<u32>,
}

/// How SnapCheck snapshots are produced between SegProp segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFanout {
    /// `AdvanceSnapshots` shards per depth (each takes `1/shards` of the batches).
    pub shards: u32,
    /// Streaming overlap: a segment may start once the first shard of its input depth is
    /// stored (it waits for the others' batches as it reaches them) instead of all of them.
    pub overlap: bool,
}

/// The tasks of `plan`: one `TrainStage` per entry, each after the previous one, then `Export`
/// after everything.
///
/// With `snapshots` (SegProp with SnapCheck), the input `S[start]` of every stage-2 segment is
/// produced by `shards` `AdvanceSnapshots` tasks that run side by side once blocks `0..start`
/// are committed: after stage 1 a full prefix forward (`from = 0`), later
/// `S[start] = F_{prev}(S[prev])`, which also waits for every shard of `S[prev]`. A segment
/// waits for all shards of its input, or only the first with `overlap`.
pub fn plan_tasks(plan: &StagePlan, snapshots: Option<SnapshotFanout>) -> Vec<PlannedTask> {
    let mut tasks: Vec<PlannedTask> = Vec::new();
    let index = |tasks: &Vec<PlannedTask>| u32::try_from(tasks.len()).unwrap_or(u32::MAX);
    let as_u32 = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    let mut last_stage: Option<u32> = None;
    // Shards of the newest snapshot depth (and that depth).
    let mut shards_of: Option<(u32, Vec<u32>)> = None;
    for entry in &plan.stages {
        let stage_index = as_u32(entry.index);
        let mut after: Vec<u32> = last_stage.into_iter().collect();
        if let (StageKind::Segment { start, .. }, Some(fanout), Some(prev)) =
            (entry.kind, snapshots, last_stage)
        {
            let from = shards_of.as_ref().map_or(0, |(depth, _)| *depth);
            let mut shard_after = vec![prev];
            if let Some((_, ids)) = &shards_of {
                shard_after.extend(ids);
            }
            let shards = fanout.shards.max(1);
            let mut ids = Vec::new();
            for shard in 0..shards {
                ids.push(index(&tasks));
                tasks.push(PlannedTask {
                    kind: TaskKind::AdvanceSnapshots {
                        stage_index: stage_index.saturating_sub(1),
                        from,
                        to: as_u32(start),
                        shard,
                        shards,
                        name: if shards == 1 {
                            format!("snapshots-{start}")
                        } else {
                            format!("snapshots-{start}-{}of{shards}", shard + 1)
                        },
                    },
                    after: shard_after.clone(),
                });
            }
            if fanout.overlap {
                after.push(ids[0]);
            } else {
                after.extend(&ids);
            }
            shards_of = Some((as_u32(start), ids));
        }
        last_stage = Some(index(&tasks));
        tasks.push(PlannedTask {
            kind: TaskKind::TrainStage {
                stage_index,
                name: entry.name.clone(),
            },
            after,
        });
    }
    let all = (0..index(&tasks)).collect();
    tasks.push(PlannedTask {
        kind: TaskKind::Export,
        after: all,
    });
    tasks
}
