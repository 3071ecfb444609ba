//! A rank's collectives on a communication thread of their own, run in the order they were
//! started, as NCCL runs them on a stream of their own: the rank can start the all-gather of the
//! next FSDP unit (prefetch) or the reduce-scatter of the unit it just finished, go on computing,
//! and wait for the result only when it needs it.
//!
//! Every rank must start the same calls in the same order (as for any collective); the thread
//! runs them in that order, so the group sees the same sequence, with the same deadlines, as
//! without a stream. Blocking calls through the [`Collective`] trait queue behind what is in
//! flight.
//!
//! Dropping the stream ends its thread once the call in flight returns, which drops the
//! collective: the rank leaves the group and the other ranks fail at once, as when a rank's own
//! handle is dropped. Dropping never waits.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use crate::collective::{Collective, CollectiveError, CollectiveStats, DeviceBuffers, Op};
use crate::flat::ShardLayout;

type Job = Box<dyn FnOnce(&mut dyn Collective) + Send>;

/// One rank's collective, driven by a communication thread.
pub struct CommStream {
    jobs: mpsc::Sender<Job>,
    rank: usize,
    world: usize,
    /// The collective's counts after the last call that finished.
    stats: Arc<Mutex<CollectiveStats>>,
    /// Whether the collective runs on device buffers ([`Collective::device_buffers`]).
    direct: bool,
}

/// A call in flight on a [`CommStream`].
#[must_use = "a collective in flight must be waited for"]
pub struct Pending<T> {
    reply: mpsc::Receiver<Result<T, CollectiveError>>,
    op: Op,
    rank: usize,
    world: usize,
}

impl<T> Pending<T> {
    /// Blocks until the call has run (each call is bounded by the collective's deadline).
    pub fn wait(self) -> Result<T, CollectiveError> {
        self.reply.recv().unwrap_or_else(|_| {
            Err(CollectiveError::RankLeft {
                op: self.op,
                seq: 0,
                rank: self.rank,
                world: self.world,
                reason: "its communication thread ended before the call ran".into(),
            })
        })
    }
}

impl CommStream {
    /// Moves `collective` onto a new thread named `comm-<rank>`.
    pub fn new(mut collective: Box<dyn Collective + Send>) -> std::io::Result<Self> {
        let (rank, world) = (collective.rank(), collective.world_size());
        let direct = collective.device_buffers().is_some();
        let stats = Arc::new(Mutex::new(collective.stats()));
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(format!("comm-{rank}"))
            .spawn(move || {
                let mut collective = collective;
                while let Ok(job) = queue.recv() {
                    job(collective.as_mut());
                }
            })?;
        Ok(Self {
            jobs,
            rank,
            world,
            stats,
            direct,
        })
    }

    /// Whether this rank's collective runs on device buffers (NCCL): device tensors then go
    /// to it as they are, with [`Self::start_direct`]; otherwise they are staged through host
    /// memory.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Starts `call` on the collective's device buffers, after every call started before it.
    /// The caller keeps the buffers alive, and nothing may write them, until the call is waited
    /// for. Fails at once on a stream whose collective has no device buffers.
    pub fn start_direct(
        &self,
        op: Op,
        call: impl FnOnce(&mut dyn DeviceBuffers) -> Result<(), CollectiveError> + Send + 'static,
    ) -> Pending<()> {
        self.start(op, move |c| match c.device_buffers() {
            Some(device) => call(device),
            None => Err(CollectiveError::Usage {
                op,
                message: "this collective has no device buffers: stage them through the host"
                    .into(),
            }),
        })
    }

    /// Starts `call` after every call started before it.
    pub fn start<T: Send + 'static>(
        &self,
        op: Op,
        call: impl FnOnce(&mut dyn Collective) -> Result<T, CollectiveError> + Send + 'static,
    ) -> Pending<T> {
        let (reply, receive) = mpsc::sync_channel(1);
        let stats = self.stats.clone();
        let job: Job = Box::new(move |c| {
            let out = call(c);
            *stats.lock().unwrap_or_else(|p| p.into_inner()) = c.stats();
            let _ = reply.send(out);
        });
        // If the thread is gone the job (and `reply`) is dropped here: `wait` reports it.
        let _ = self.jobs.send(job);
        Pending {
            reply: receive,
            op,
            rank: self.rank,
            world: self.world,
        }
    }

    /// Starts the all-gather of a unit laid out as `layout` from this rank's `shard`: the full
    /// `layout.len` elements.
    pub fn all_gather(&self, layout: ShardLayout, shard: Vec<f32>) -> Pending<Vec<f32>> {
        self.start(Op::AllGather, move |c| layout.all_gather(c, &shard))
    }

    /// Starts the reduce-scatter of a unit's full-length gradient `grad`: this rank's chunk of
    /// the sum over ranks.
    pub fn reduce_scatter(&self, layout: ShardLayout, mut grad: Vec<f32>) -> Pending<Vec<f32>> {
        self.start(Op::ReduceScatter, move |c| {
            assert_eq!(grad.len(), layout.len, "a full gradient has len elements");
            grad.resize(layout.padded(), 0.0);
            let mut shard = vec![0.0; layout.chunk];
            c.reduce_scatter(&grad, &mut shard)?;
            Ok(shard)
        })
    }
}

impl Collective for CommStream {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_gather(&mut self, send: &[f32], recv: &mut [f32]) -> Result<(), CollectiveError> {
        let (send, n) = (send.to_vec(), recv.len());
        let out = self
            .start(Op::AllGather, move |c| {
                let mut recv = vec![0.0; n];
                c.all_gather(&send, &mut recv).map(|()| recv)
            })
            .wait()?;
        recv.copy_from_slice(&out);
        Ok(())
    }

    fn reduce_scatter(&mut self, send: &[f32], recv: &mut [f32]) -> Result<(), CollectiveError> {
        let (send, n) = (send.to_vec(), recv.len());
        let out = self
            .start(Op::ReduceScatter, move |c| {
                let mut recv = vec![0.0; n];
                c.reduce_scatter(&send, &mut recv).map(|()| recv)
            })
            .wait()?;
        recv.copy_from_slice(&out);
        Ok(())
    }

    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let mut owned = buf.to_vec();
        let out = self
            .start(Op::AllReduce, move |c| {
                c.all_reduce(&mut owned).map(|()| owned)
            })
            .wait()?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let mut owned = buf.to_vec();
        let out = self
            .start(Op::Broadcast, move |c| {
                c.broadcast(&mut owned, root).map(|()| owned)
            })
            .wait()?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.start(Op::Barrier, |c| c.barrier()).wait()
    }

    /// The counts of every call that has finished (calls still in flight are not in them).
    fn stats(&self) -> CollectiveStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::thread::thread_group;

    fn streams(world: usize, deadline: Duration) -> Vec<CommStream> {
        thread_group(world, deadline)
            .into_iter()
            .map(|c| CommStream::new(Box::new(c)).expect("a thread"))
            .collect()
    }

    #[test]
    fn calls_started_ahead_complete_in_order_with_the_same_results_for_1_2_3_4_8_ranks() {
        for world in [1, 2, 3, 4, 8] {
            let layouts = [ShardLayout::new(10, world), ShardLayout::new(7, world)];
            let threads: Vec<_> = streams(world, Duration::from_secs(10))
                .into_iter()
                .map(|mut s| {
                    std::thread::spawn(move || {
                        let r = s.rank();
                        let full = |salt: f32, len: usize| -> Vec<f32> {
                            (0..len).map(|i| salt * 100.0 + i as f32).collect()
                        };
                        // Two gathers in flight, then a reduce-scatter behind them, then a
                        // blocking all-reduce through the trait.
                        let a = s.all_gather(layouts[0], layouts[0].shard(&full(1.0, 10), r));
                        let b = s.all_gather(layouts[1], layouts[1].shard(&full(2.0, 7), r));
                        let g = s.reduce_scatter(layouts[1], vec![r as f32 + 1.0; 7]);
                        let mut sum = [r as f32];
                        s.all_reduce(&mut sum).expect("all-reduce");
                        let (b, a, g) = (b.wait(), a.wait(), g.wait());
                        (a, b, g, sum[0], s.stats())
                    })
                })
                .collect();
            let ranks_sum = (world * (world + 1) / 2) as f32;
            for (r, t) in threads.into_iter().enumerate() {
                let (a, b, g, sum, stats) = t.join().expect("no panic");
                assert_eq!(
                    a.expect("gather"),
                    (0..10).map(|i| 100.0 + i as f32).collect::<Vec<_>>()
                );
                assert_eq!(
                    b.expect("gather"),
                    (0..7).map(|i| 200.0 + i as f32).collect::<Vec<_>>()
                );
                let g = g.expect("reduce-scatter");
                let layout = layouts[1];
                assert_eq!(g.len(), layout.chunk);
                for (k, x) in g.iter().enumerate() {
                    let real = layout.range(r).start + k < layout.len;
                    assert_eq!(
                        *x,
                        if real { ranks_sum } else { 0.0 },
                        "world {world} rank {r}"
                    );
                }
                assert_eq!(sum, (world * (world - 1) / 2) as f32);
                assert_eq!(stats.calls(Op::AllGather), 2);
                assert_eq!(stats.calls(Op::ReduceScatter), 1);
                assert_eq!(stats.calls(Op::AllReduce), 1);
            }
        }
    }

    #[test]
    fn starting_a_gather_returns_before_the_other_ranks_join() {
        // Rank 1 joins only once rank 0's `all_gather` has returned: a start that blocked until
        // the call completed would never let it join, and the call would fail at the deadline.
        let mut s = streams(2, Duration::from_secs(20));
        let s1 = s.pop().expect("rank 1");
        let s0 = s.pop().expect("rank 0");
        let layout = ShardLayout::new(4, 2);
        let (go, started) = mpsc::channel();
        let late = std::thread::spawn(move || {
            started.recv().expect("rank 0 started");
            s1.all_gather(layout, vec![3.0, 4.0]).wait()
        });
        let pending = s0.all_gather(layout, vec![1.0, 2.0]);
        go.send(()).expect("rank 1 waits");
        let full = pending.wait().expect("gather");
        assert_eq!(full, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(late.join().expect("no panic").expect("gather"), full);
    }

    #[test]
    fn a_dropped_stream_leaves_the_group_and_the_others_fail_at_once() {
        let mut s = streams(2, Duration::from_secs(30));
        drop(s.pop());
        let s0 = s.pop().expect("rank 0");
        let started = Instant::now();
        let err = s0
            .all_gather(ShardLayout::new(4, 2), vec![1.0, 2.0])
            .wait()
            .expect_err("rank 1 is gone");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no wait for the deadline"
        );
        assert!(
            matches!(err, CollectiveError::RankLeft { rank: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_rank_that_never_joins_times_out_through_the_stream_naming_it() {
        let mut s = streams(2, Duration::from_millis(200));
        let _silent = s.pop();
        let s0 = s.pop().expect("rank 0");
        let err = s0
            .all_gather(ShardLayout::new(4, 2), vec![1.0, 2.0])
            .wait()
            .expect_err("rank 1 never joins");
        assert!(err.to_string().contains("rank 1 of 2"), "{err}");
        // The group is poisoned: the next call fails too, at once.
        let mut s0 = s0;
        assert!(s0.barrier().is_err());
    }
}
