//! The collectives FSDP needs, over flat `f32` buffers, each with a deadline.
//!
//! Hung collectives are the most reported pain of NCCL training: one rank dies or stalls and
//! every other rank waits forever inside the next all-gather. Here every call has a deadline;
//! a call that cannot complete in time fails with [`CollectiveError::Timeout`] naming the
//! operation, its sequence number and (where the implementation can know) the ranks that did not
//! join. After any failure the group is poisoned: every later call on every rank fails at once
//! with the same error, as an aborted NCCL communicator does, so the task ends and the
//! coordinator retries the stage from its checkpoint with a new group.

use std::fmt;

/// A collective operation, for errors and statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    AllGather,
    ReduceScatter,
    AllReduce,
    Broadcast,
    Barrier,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::AllGather => "all_gather",
            Op::ReduceScatter => "reduce_scatter",
            Op::AllReduce => "all_reduce",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        }
    }

    fn index(self) -> usize {
        match self {
            Op::AllGather => 0,
            Op::ReduceScatter => 1,
            Op::AllReduce => 2,
            Op::Broadcast => 3,
            Op::Barrier => 4,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a collective call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CollectiveError {
    /// Not every rank joined within the deadline.
    #[error(
        "{op} #{seq} timed out after {waited_ms} ms: {} did not join (dead, stuck or partitioned)",
        describe_ranks(missing, *world)
    )]
    Timeout {
        op: Op,
        seq: u64,
        waited_ms: u64,
        /// The ranks that never joined (empty: the implementation cannot tell, e.g. NCCL).
        missing: Vec<usize>,
        world: usize,
    },
    /// A rank left the group (its process or thread ended, or it aborted) before joining.
    #[error("{op} #{seq}: rank {rank} of {world} left the group: {reason}")]
    RankLeft {
        op: Op,
        seq: u64,
        rank: usize,
        world: usize,
        reason: String,
    },
    /// Ranks called different operations or passed buffers of different sizes at the same step
    /// (a bug in the caller: the ranks' programs diverged).
    #[error("{op} #{seq}: ranks disagree: {message}")]
    Mismatch { op: Op, seq: u64, message: String },
    /// Buffers whose sizes do not fit the operation.
    #[error("{op}: {message}")]
    Usage { op: Op, message: String },
    /// The backend (NCCL, CUDA) failed.
    #[error("{op} #{seq}: {message}")]
    Backend { op: Op, seq: u64, message: String },
}

fn describe_ranks(missing: &[usize], world: usize) -> String {
    match missing {
        [] => format!("some rank of {world} (the backend does not say which)"),
        [one] => format!("rank {one} of {world}"),
        many => format!("ranks {many:?} of {world}"),
    }
}

/// Per-rank counts of one collective handle: calls per operation and the bytes a ring
/// implementation moves for them (what NCCL sends over the wire per rank:
/// all-gather and reduce-scatter `(N-1)/N` of the full buffer, all-reduce twice that, broadcast
/// the buffer once per non-root rank).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CollectiveStats {
    pub calls: [u64; 5],
    pub wire_bytes: [u64; 5],
}

impl CollectiveStats {
    pub fn calls(&self, op: Op) -> u64 {
        self.calls[op.index()]
    }

    #[cfg(test)]
    pub fn wire_bytes(&self, op: Op) -> u64 {
        self.wire_bytes[op.index()]
    }

    pub fn total_wire_bytes(&self) -> u64 {
        self.wire_bytes.iter().sum()
    }

    /// Records one call of `op` over a full buffer of `full_elems` f32 in a group of `world`.
    pub fn record(&mut self, op: Op, full_elems: usize, world: usize) {
        let full = (full_elems * 4) as u64;
        let n = world as u64;
        let bytes = match op {
            _ if world <= 1 => 0,
            Op::AllGather | Op::ReduceScatter => full * (n - 1) / n,
            Op::AllReduce => 2 * full * (n - 1) / n,
            Op::Broadcast => full * (n - 1) / n,
            Op::Barrier => 0,
        };
        self.calls[op.index()] += 1;
        self.wire_bytes[op.index()] += bytes;
    }
}

/// One rank's handle on a group of `world_size` ranks. Every rank must make the same sequence of
/// calls with buffers of the same sizes; results are identical on every rank (sums are taken in
/// rank order, so they are deterministic). Not `Send`: an NCCL communicator belongs to the
/// thread that created it, so each rank's thread builds its own handle (thread handles are
/// `Send` and may be moved to their rank's thread).
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// `recv` (`world_size × send.len()` elements) receives every rank's `send`, in rank order.
    fn all_gather(&mut self, send: &[f32], recv: &mut [f32]) -> Result<(), CollectiveError>;

    /// `send` holds `world_size` chunks of `recv.len()` elements; `recv` receives the sum over
    /// ranks of chunk `rank`.
    fn reduce_scatter(&mut self, send: &[f32], recv: &mut [f32]) -> Result<(), CollectiveError>;

    /// `buf` becomes the sum over ranks of `buf`.
    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;

    /// `buf` becomes rank `root`'s `buf` on every rank.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError>;

    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CollectiveError>;

    /// Calls made and bytes moved by this rank so far.
    fn stats(&self) -> CollectiveStats;

    /// The same group's collectives on device memory, where this implementation has them
    /// (NCCL); `None` (the default) when buffers must be staged through host memory.
    fn device_buffers(&mut self) -> Option<&mut dyn DeviceBuffers> {
        None
    }
}

/// A buffer in device memory: its address and its length in 4-byte words (f32 values, or
/// 16-bit values two to a word: gathers only copy words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceWords {
    pub ptr: u64,
    pub words: usize,
}

/// FSDP's two collectives on device buffers, with the deadline and poisoning of the
/// [`Collective`] they belong to. Each call returns once the result is in `recv`.
pub trait DeviceBuffers {
    /// `recv` (`world_size × send.words`) receives every rank's `send`, in rank order.
    fn all_gather(&mut self, send: DeviceWords, recv: DeviceWords) -> Result<(), CollectiveError>;

    /// `send` holds `world_size` chunks of `recv.words` f32 values; `recv` receives the sum over
    /// ranks of chunk `rank`.
    fn reduce_scatter(
        &mut self,
        send: DeviceWords,
        recv: DeviceWords,
    ) -> Result<(), CollectiveError>;
}

/// Checks the buffer sizes of a call before it reaches the group.
pub(crate) fn check_sizes(
    op: Op,
    world: usize,
    send: usize,
    recv: usize,
) -> Result<(), CollectiveError> {
    let usage = |message: String| Err(CollectiveError::Usage { op, message });
    match op {
        Op::AllGather if recv != send * world => usage(format!(
            "recv has {recv} elements, needs world_size ({world}) x send ({send})"
        )),
        Op::ReduceScatter if send != recv * world => usage(format!(
            "send has {send} elements, needs world_size ({world}) x recv ({recv})"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_bytes_follow_the_ring_model() {
        let mut stats = CollectiveStats::default();
        stats.record(Op::AllGather, 1000, 4);
        stats.record(Op::ReduceScatter, 1000, 4);
        stats.record(Op::AllReduce, 1000, 4);
        stats.record(Op::Barrier, 0, 4);
        assert_eq!(stats.wire_bytes(Op::AllGather), 3000);
        assert_eq!(stats.wire_bytes(Op::ReduceScatter), 3000);
        assert_eq!(stats.wire_bytes(Op::AllReduce), 6000);
        assert_eq!(stats.calls(Op::Barrier), 1);
        assert_eq!(stats.total_wire_bytes(), 12000);
        let mut alone = CollectiveStats::default();
        alone.record(Op::AllGather, 1000, 1);
        assert_eq!(alone.total_wire_bytes(), 0);
    }

    #[test]
    fn errors_name_the_operation_and_the_ranks() {
        let e = CollectiveError::Timeout {
            op: Op::AllGather,
            seq: 17,
            waited_ms: 2000,
            missing: vec![2],
            world: 4,
        };
        assert_eq!(
            e.to_string(),
            "all_gather #17 timed out after 2000 ms: rank 2 of 4 did not join (dead, stuck or partitioned)"
        );
        let e = CollectiveError::Timeout {
            op: Op::Barrier,
            seq: 1,
            waited_ms: 5,
            missing: vec![],
            world: 8,
        };
        assert!(e.to_string().contains("some rank of 8"));
        assert!(check_sizes(Op::AllGather, 3, 2, 6).is_ok());
        assert!(check_sizes(Op::AllGather, 3, 2, 5).is_err());
        assert!(check_sizes(Op::ReduceScatter, 3, 6, 2).is_ok());
        assert!(check_sizes(Op::ReduceScatter, 3, 7, 2).is_err());
    }
}
