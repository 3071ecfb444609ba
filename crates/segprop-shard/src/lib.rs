//! segprop-shard: the sharding layer of DESIGN §3.
//!
//! - [`collective`]: the [`Collective`] trait (all-gather, reduce-scatter, all-reduce, broadcast,
//!   barrier over flat `f32` buffers, with rank and world size), a deadline on every call and
//!   per-rank wire-byte accounting.
//! - [`stream`]: a rank's collectives on a communication thread ([`CommStream`]), so a unit's
//!   all-gather or reduce-scatter runs while the rank computes (prefetch).
//! - [`device`]: FSDP's all-gather and reduce-scatter on device tensors ([`Flat`]): direct on
//!   NCCL's device buffers, staged through host memory elsewhere.
//! - [`thread`]: N ranks as threads of one process ([`thread_group`]): CPU hosts, tests, CI.
//! - [`flat`]: the flat, padded shard layout of an FSDP unit ([`ShardLayout`]).
//! - [`optim`]: AdamW on a rank's fp32 shard, bit-identical to burn's ([`ShardedAdamW`]), and
//!   clipping over the global norm of sharded gradients.
//! - [`unit`]: FSDP units over burn modules ([`unit::FsdpUnit`]): flatten, shard, gather into a
//!   fresh module, reduce-scatter its gradients, step the shard.
//! - `nccl` (feature `nccl`): the GPUs of one host over NCCL (cudarc), with the communicator's
//!   unique id shipped by the coordinator.

pub mod collective;
pub mod device;
pub mod flat;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod optim;
pub mod resident;
pub mod stream;
pub mod thread;
pub mod unit;
pub mod words;

pub use collective::{Collective, CollectiveError, Op};
pub use device::{Flat, PendingFlat};
pub use flat::ShardLayout;
pub use optim::{AdamWConfig, clip_factor, global_grad_norm};
pub use stream::CommStream;
pub use thread::thread_group;
