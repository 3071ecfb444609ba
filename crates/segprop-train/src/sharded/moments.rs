//! AdamW moments between burn's optimizer records (whole modules, the unsharded engine's) and
//! each rank's shards of them.

use burn::module::AutodiffModule;
use burn::optim::record::{AdaptorRecord, AdaptorRecordV1};
use burn::optim::{AdamWState, AdaptiveMomentumState};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use segprop_model::ParamIds;
use segprop_shard::unit::FsdpUnit;
use segprop_shard::{Collective, CollectiveError};

use super::OptimRecord;

/// Loads a unit's AdamW moments from burn's optimizer record, when it holds all of them.
pub(super) fn import_moments<B: AutodiffBackend, M: AutodiffModule<B>>(
    unit: &mut FsdpUnit<M>,
    record: &OptimRecord<B>,
) {
    let ids = ParamIds::of(unit.skeleton()).0;
    let mut m1 = Vec::new();
    let mut m2 = Vec::new();
    let mut time = None;
    for id in &ids {
        let Some(AdaptorRecord::V1(state)) = record.get(id) else {
            return;
        };
        let (t, a, b) = match state {
            AdaptorRecordV1::Rank1(s) => moments(&s.momentum),
            AdaptorRecordV1::Rank2(s) => moments(&s.momentum),
            AdaptorRecordV1::Rank3(s) => moments(&s.momentum),
            _ => panic!("parameters of LLaMA units have rank 1 to 3"),
        };
        time.get_or_insert(t);
        m1.extend(a);
        m2.extend(b);
    }
    if let Some(time) = time {
        unit.load_optimizer_state(&m1, &m2, time as i32);
    }
}

fn moments<I: Backend, const D: usize>(
    state: &AdaptiveMomentumState<I, D>,
) -> (usize, Vec<f32>, Vec<f32>) {
    (
        state.time,
        state.moment_1.to_data().iter::<f32>().collect(),
        state.moment_2.to_data().iter::<f32>().collect(),
    )
}

/// Writes a unit's gathered AdamW moments into burn's optimizer record.
pub(super) fn export_moments<B: AutodiffBackend, M: AutodiffModule<B>>(
    unit: &FsdpUnit<M>,
    c: &mut dyn Collective,
    record: &mut OptimRecord<B>,
    device: &B::Device,
) -> Result<(), CollectiveError> {
    let (m1, m2) = unit.gather_optimizer_state(c)?;
    let time = unit.optimizer_time();
    if time == 0 {
        return Ok(());
    }
    let ids = ParamIds::of(unit.skeleton()).0;
    let mut at = 0;
    for (id, shape) in ids.iter().zip(unit.shapes()) {
        let n: usize = shape.iter().product();
        let part = |v: &[f32]| TensorData::new(v[at..at + n].to_vec(), shape.clone());
        let state = match shape.len() {
            1 => AdaptorRecordV1::Rank1(adamw_state(time, part(&m1), part(&m2), device)),
            2 => AdaptorRecordV1::Rank2(adamw_state(time, part(&m1), part(&m2), device)),
            3 => AdaptorRecordV1::Rank3(adamw_state(time, part(&m1), part(&m2), device)),
            d => panic!("parameters of LLaMA units have rank 1 to 3, not {d}"),
        };
        record.insert(*id, AdaptorRecord::V1(state));
        at += n;
    }
    Ok(())
}

fn adamw_state<I: Backend, const D: usize>(
    time: i32,
    moment_1: TensorData,
    moment_2: TensorData,
    device: &I::Device,
) -> AdamWState<I, D> {
    AdamWState {
        momentum: AdaptiveMomentumState {
            time: time as usize,
            moment_1: Tensor::from_data(moment_1, device),
            moment_2: Tensor::from_data(moment_2, device),
            max_moment_2: None,
        },
    }
}
