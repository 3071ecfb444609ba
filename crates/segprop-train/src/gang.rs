//! Gangs: the ranks of one sharded stage, run together in one worker process (DESIGN §3). The
//! leader (rank 0) runs on the calling thread and reports and checkpoints; every follower runs on
//! a thread of its own with a trainer of its own; all of them are joined by a collective with a
//! deadline on every call, so a rank that fails, panics or stalls fails the whole gang within the
//! deadline instead of hanging it. What one rank does in a step is `sharded/`.

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use segprop_shard::{Collective, CommStream};

use crate::rank::{ShardOptions, ShardRank};

/// The number of ranks `spec` trains on: `resources.devices_per_gang` with `full_shard`, else 1.
/// `None` when the spec trains unsharded without activation checkpointing (the plain engine).
pub fn gang_size(spec: &segprop_core::JobSpec) -> Option<usize> {
    if spec.sharding.strategy == segprop_core::spec::ShardingStrategy::FullShard {
        Some(spec.resources.devices_per_gang)
    } else if spec.activation_checkpointing {
        Some(1)
    } else {
        None
    }
}

/// A follower rank's body: builds and runs its own trainer around the [`ShardRank`] it is given.
pub type Follower =
    std::sync::Arc<dyn Fn(ShardRank) -> Result<(), crate::TrainError> + Send + Sync>;

/// The collectives of a gang, one per rank in rank order, each free to move to its rank's thread.
pub type Group = Vec<Box<dyn Collective + Send>>;

/// How the ranks of `spec`'s gang on `devices` talk, with the spec's deadline on every call:
/// NCCL across the GPUs when the job trains on CUDA and the worker is built with `nccl`;
/// otherwise ranks joined by threads of this process over host buffers (CPU ranks; GPU ranks
/// without NCCL, their buffers staged through the host).
pub fn gang_group<B: Backend>(
    spec: &segprop_core::JobSpec,
    devices: &[B::Device],
) -> Result<Group, crate::TrainError> {
    let deadline = collective_deadline(spec);
    #[cfg(feature = "nccl")]
    if spec.resources.backend == segprop_core::spec::Backend::Cuda {
        use burn::tensor::backend::Device as _;
        let ordinals: Vec<usize> = devices
            .iter()
            .map(|d| usize::from(d.to_id().index_id))
            .collect();
        tracing::info!(devices = ?ordinals, "gang collective: NCCL");
        let group = segprop_shard::nccl::NcclCollective::group(&ordinals, deadline)?;
        return Ok(group
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Collective + Send>)
            .collect());
    }
    Ok(segprop_shard::thread_group(devices.len(), deadline)
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Collective + Send>)
        .collect())
}

/// Runs a gang of ranks joined by `group` (one collective per rank, a deadline on every call):
/// the leader (rank 0) on the calling thread, each follower on a thread of its own. Each side
/// builds and runs its own trainer around the [`ShardRank`] it is given, whose collective runs on
/// a communication thread of its own ([`CommStream`]). `deadline` is the collectives' deadline,
/// the time followers get to finish after the leader.
///
/// A rank that fails or panics leaves the group, so the others fail within the deadline instead
/// of waiting. Once the leader is done, followers get one more deadline to finish; one that is
/// still stuck (in compute, not in a collective) is named and abandoned, so a task never hangs on
/// it. The error returned is the leader's, unless the leader only saw a follower leave, then the
/// follower's own error.
pub fn run_gang<R>(
    group: Group,
    deadline: std::time::Duration,
    options: ShardOptions,
    leader: impl FnOnce(ShardRank) -> Result<R, crate::TrainError>,
    follower: Follower,
) -> Result<R, crate::TrainError> {
    use crate::TrainError;
    let world = group.len();
    assert!(world > 0, "a gang has at least one rank");
    let mut group = group.into_iter();
    let leader_collective = group.next().expect("rank 0");
    let rank_of = move |collective: Box<dyn Collective + Send>| {
        let rank = collective.rank();
        CommStream::new(collective)
            .map(|collective| ShardRank {
                collective,
                options,
            })
            .map_err(|e| TrainError::RankFailed {
                rank,
                message: format!("cannot start its communication thread: {e}"),
            })
    };
    let (done, results) = std::sync::mpsc::channel::<(usize, Result<(), TrainError>)>();
    for collective in group {
        let rank = collective.rank();
        let follower = follower.clone();
        let thread_done = done.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("rank-{rank}"))
            .stack_size(64 << 20)
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    follower(rank_of(collective)?)
                }))
                .unwrap_or_else(|panic| {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panicked".into());
                    Err(TrainError::RankFailed { rank, message })
                });
                let _ = thread_done.send((rank, outcome));
            });
        if let Err(e) = spawned {
            // Dropping the collective makes the other ranks fail at once.
            let _ = done.send((
                rank,
                Err(TrainError::RankFailed {
                    rank,
                    message: format!("cannot start its thread: {e}"),
                }),
            ));
        }
    }
    drop(done);
    let led = rank_of(leader_collective).and_then(leader);
    let mut pending: std::collections::BTreeSet<usize> = (1..world).collect();
    let mut first_follower_error = None;
    let until = std::time::Instant::now() + deadline + std::time::Duration::from_secs(5);
    while !pending.is_empty() {
        let left = until.saturating_duration_since(std::time::Instant::now());
        match results.recv_timeout(left) {
            Ok((rank, outcome)) => {
                pending.remove(&rank);
                if let Err(err) = outcome
                    && first_follower_error.is_none()
                    && !matches!(err, TrainError::Collective(_))
                {
                    first_follower_error = Some(err);
                }
            }
            Err(_) => break,
        }
    }
    if let Some(&rank) = pending.first() {
        tracing::error!(
            rank,
            "a rank did not finish within the collective deadline; abandoned"
        );
        if led.is_ok() && first_follower_error.is_none() {
            first_follower_error = Some(TrainError::RankFailed {
                rank,
                message: format!(
                    "did not finish within {:.0} s of rank 0 (stuck outside a collective); \
                     abandoned",
                    deadline.as_secs_f64()
                ),
            });
        }
    }
    match (led, first_follower_error) {
        (Err(TrainError::Collective(_)), Some(err)) | (Ok(_), Some(err)) => Err(err),
        (led, _) => led,
    }
}

/// [`run_gang`] for `spec`'s gang ([`gang_size`] ranks, the spec's collective deadline and
/// activation checkpointing), each rank a fresh trainer with its own `work_dir/rank<r>` and
/// `devices[r]` whose units stay sharded from its first byte to its last
/// ([`crate::Trainer::new_sharded`]).
pub fn train_gang<B, R>(
    spec: &segprop_core::JobSpec,
    devices: Vec<B::Device>,
    work_dir: &std::path::Path,
    leader: impl FnOnce(&mut crate::Trainer<B>) -> Result<R, crate::TrainError>,
    follower: impl Fn(&mut crate::Trainer<B>) -> Result<(), crate::TrainError> + Send + Sync + 'static,
) -> Result<R, crate::TrainError>
where
    B: AutodiffBackend,
{
    train_gang_from(spec, devices, work_dir, None, leader, follower)
}

/// [`train_gang`], each rank continuing from the sharded checkpoint in `from` when given
/// ([`crate::Trainer::resume_sharded`]: its units laid out blank and read from the rank files,
/// at whatever world size they were written). `from` must have passed
/// [`crate::checkpoint::preflight`]: the ranks do not hash its files again.
pub fn train_gang_from<B, R>(
    spec: &segprop_core::JobSpec,
    devices: Vec<B::Device>,
    work_dir: &std::path::Path,
    from: Option<&std::path::Path>,
    leader: impl FnOnce(&mut crate::Trainer<B>) -> Result<R, crate::TrainError>,
    follower: impl Fn(&mut crate::Trainer<B>) -> Result<(), crate::TrainError> + Send + Sync + 'static,
) -> Result<R, crate::TrainError>
where
    B: AutodiffBackend,
{
    let make = {
        let spec = spec.clone();
        let work_dir = work_dir.to_path_buf();
        let devices = devices.clone();
        let from = from.map(std::path::Path::to_path_buf);
        move |shard: ShardRank| {
            let rank = shard.rank();
            let (device, dir) = (devices[rank].clone(), work_dir.join(format!("rank{rank}")));
            match &from {
                Some(state) => crate::Trainer::<B>::resume_sharded(
                    spec.clone(),
                    device,
                    &dir,
                    shard,
                    state,
                    true,
                ),
                None => crate::Trainer::<B>::new_sharded(spec.clone(), device, &dir, shard),
            }
        }
    };
    let make = std::sync::Arc::new(make);
    let follower_make = make.clone();
    run_gang(
        gang_group::<B>(spec, &devices)?,
        collective_deadline(spec),
        ShardOptions::of(spec),
        |shard| leader(&mut make(shard)?),
        std::sync::Arc::new(move |shard| follower(&mut follower_make(shard)?)),
    )
}

/// The spec's deadline for every collective.
pub fn collective_deadline(spec: &segprop_core::JobSpec) -> std::time::Duration {
    std::time::Duration::from_secs_f64(spec.sharding.collective_timeout_s)
}

/// The devices of a gang of `world` ranks starting at `first`: `cuda:i, cuda:i+1, …` on a GPU
/// backend; on the CPU every rank is the host.
pub fn gang_devices<B: Backend>(first: &B::Device, world: usize) -> Vec<B::Device> {
    use burn::tensor::backend::Device as _;
    let id = first.to_id();
    (0..world)
        .map(|rank| {
            let mut id = id;
            id.index_id += rank as u16;
            B::Device::from_id(id)
        })
        .collect()
}
