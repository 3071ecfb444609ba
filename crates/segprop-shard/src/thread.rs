//! N ranks as threads of one process: the collective of CPU hosts, tests and CI.
//!
//! The ranks share one "round" at a time: each call deposits its input, the last rank to arrive
//! computes the result for everyone, and the round resets once every rank has taken its part.
//! Every wait is bounded by the group's deadline; a rank whose handle is dropped (its thread
//! ended or panicked) or that calls [`ThreadCollective::abort`] is seen as gone at once.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::collective::{Collective, CollectiveError, CollectiveStats, Op, check_sizes};

/// Creates the handles of a group of `world` thread ranks (one per rank, in rank order) whose
/// calls fail after `deadline`.
pub fn thread_group(world: usize, deadline: Duration) -> Vec<ThreadCollective> {
    assert!(world > 0, "a group needs at least one rank");
    let shared = Arc::new(Shared {
        world,
        deadline,
        round: Mutex::new(Round::new(world)),
        changed: Condvar::new(),
    });
    (0..world)
        .map(|rank| ThreadCollective {
            rank,
            shared: shared.clone(),
            seq: 0,
            stats: CollectiveStats::default(),
            left: false,
        })
        .collect()
}

struct Shared {
    world: usize,
    deadline: Duration,
    round: Mutex<Round>,
    changed: Condvar,
}

/// What one rank passed into the current round.
struct Input {
    op: Op,
    root: usize,
    data: Vec<f32>,
}

struct Round {
    /// Sequence number of the round in progress (every rank numbers its calls 0, 1, 2, …).
    seq: u64,
    inputs: Vec<Option<Input>>,
    arrived: usize,
    /// The combined result, once every rank has arrived.
    result: Option<Arc<Vec<f32>>>,
    taken: Vec<bool>,
    /// Ranks that left the group, with why.
    left: Vec<Option<String>>,
    /// The first failure: every later call fails with it.
    poisoned: Option<CollectiveError>,
}

impl Round {
    fn new(world: usize) -> Self {
        Self {
            seq: 0,
            inputs: (0..world).map(|_| None).collect(),
            arrived: 0,
            result: None,
            taken: vec![false; world],
            left: vec![None; world],
            poisoned: None,
        }
    }

    /// Every rank still in the group has taken the result: start the next round.
    fn maybe_reset(&mut self) {
        let done = self
            .taken
            .iter()
            .zip(&self.left)
            .all(|(taken, left)| *taken || left.is_some());
        if self.result.is_some() && done {
            self.seq += 1;
            self.inputs.iter_mut().for_each(|i| *i = None);
            self.arrived = 0;
            self.result = None;
            self.taken.iter_mut().for_each(|t| *t = false);
        }
    }
}

/// One rank's handle on a [`thread_group`].
pub struct ThreadCollective {
    rank: usize,
    shared: Arc<Shared>,
    seq: u64,
    stats: CollectiveStats,
    left: bool,
}

impl ThreadCollective {
    /// Leaves the group: every other rank's pending and later calls fail, naming this rank and
    /// `reason`. (Dropping the handle does the same with reason "its handle was dropped".)
    pub fn abort(&mut self, reason: &str) {
        if self.left {
            return;
        }
        self.left = true;
        let mut round = self.lock();
        round.left[self.rank] = Some(reason.to_string());
        round.maybe_reset();
        drop(round);
        self.shared.changed.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, Round> {
        self.shared.round.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one round: deposit `data`, wait for the combined result (or a failure).
    fn round(
        &mut self,
        op: Op,
        root: usize,
        data: Vec<f32>,
    ) -> Result<Arc<Vec<f32>>, CollectiveError> {
        let (world, deadline) = (self.shared.world, self.shared.deadline);
        let seq = self.seq;
        self.seq += 1;
        if self.left {
            return Err(CollectiveError::RankLeft {
                op,
                seq,
                rank: self.rank,
                world,
                reason: "this handle already left the group".into(),
            });
        }
        let started = Instant::now();
        let mut round = self.lock();
        let timeout = |round: &Round| CollectiveError::Timeout {
            op,
            seq,
            waited_ms: started.elapsed().as_millis() as u64,
            missing: if round.seq == seq {
                (0..world).filter(|r| round.inputs[*r].is_none()).collect()
            } else {
                // Still waiting for the previous round to be taken.
                (0..world).filter(|r| !round.taken[*r]).collect()
            },
            world,
        };
        // Wait for the previous round to be taken by every rank.
        loop {
            if let Some(e) = &round.poisoned {
                return Err(e.clone());
            }
            if round.seq == seq {
                break;
            }
            let Some(remaining) = deadline.checked_sub(started.elapsed()) else {
                let e = timeout(&round);
                return Err(self.poison(round, e));
            };
            round = self.wait(round, remaining);
        }
        // All ranks of a round must run the same operation.
        if let Some(other) = round.inputs.iter().flatten().next() {
            if other.op != op || other.root != root {
                let e = CollectiveError::Mismatch {
                    op,
                    seq,
                    message: format!(
                        "rank {} called {op} (root {root}), another rank called {} (root {})",
                        self.rank, other.op, other.root
                    ),
                };
                return Err(self.poison(round, e));
            }
            if op != Op::Broadcast && other.data.len() != data.len() {
                let e = CollectiveError::Mismatch {
                    op,
                    seq,
                    message: format!(
                        "rank {} passed {} elements, another rank passed {}",
                        self.rank,
                        data.len(),
                        other.data.len()
                    ),
                };
                return Err(self.poison(round, e));
            }
        }
        round.inputs[self.rank] = Some(Input { op, root, data });
        round.arrived += 1;
        if round.arrived == world {
            let result = combine(op, root, &round.inputs);
            round.result = Some(Arc::new(result));
            self.shared.changed.notify_all();
        }
        loop {
            if let Some(e) = &round.poisoned {
                return Err(e.clone());
            }
            if let Some(result) = round.result.clone() {
                round.taken[self.rank] = true;
                round.maybe_reset();
                drop(round);
                self.shared.changed.notify_all();
                // Every result is the full (unsharded) buffer of the call.
                self.stats.record(op, result.len(), world);
                return Ok(result);
            }
            if let Some((rank, reason)) = round.left.iter().enumerate().find_map(|(r, why)| {
                why.as_ref()
                    .filter(|_| round.inputs[r].is_none())
                    .map(|w| (r, w.clone()))
            }) {
                let e = CollectiveError::RankLeft {
                    op,
                    seq,
                    rank,
                    world,
                    reason,
                };
                return Err(self.poison(round, e));
            }
            let Some(remaining) = deadline.checked_sub(started.elapsed()) else {
                let e = timeout(&round);
                return Err(self.poison(round, e));
            };
            round = self.wait(round, remaining);
        }
    }

    fn wait<'a>(
        &'a self,
        round: MutexGuard<'a, Round>,
        remaining: Duration,
    ) -> MutexGuard<'a, Round> {
        // Wake at least every 50 ms to notice a rank that left without a notification.
        let slice = remaining.min(Duration::from_millis(50));
        self.shared
            .changed
            .wait_timeout(round, slice)
            .map(|(guard, _)| guard)
            .unwrap_or_else(|e| e.into_inner().0)
    }

    fn poison(&self, mut round: MutexGuard<'_, Round>, e: CollectiveError) -> CollectiveError {
        tracing::warn!(rank = self.rank, error = %e, "collective failed: group aborted");
        if round.poisoned.is_none() {
            round.poisoned = Some(e.clone());
        }
        let first = round.poisoned.clone().unwrap_or(e);
        drop(round);
        self.shared.changed.notify_all();
        first
    }
}

impl Drop for ThreadCollective {
    fn drop(&mut self) {
        let reason = if std::thread::panicking() {
            "its thread panicked"
        } else {
            "its handle was dropped"
        };
        self.abort(reason);
    }
}

/// The combined result of a round whose inputs are all present.
fn combine(op: Op, root: usize, inputs: &[Option<Input>]) -> Vec<f32> {
    let data = inputs
        .iter()
        .map(|i| i.as_ref().map_or(&[][..], |i| &i.data[..]));
    match op {
        Op::AllGather => data.flat_map(|d| d.iter().copied()).collect(),
        Op::ReduceScatter | Op::AllReduce => {
            let mut sum: Vec<f32> = Vec::new();
            for d in data {
                if sum.is_empty() {
                    sum = d.to_vec();
                } else {
                    sum.iter_mut().zip(d).for_each(|(s, x)| *s += x);
                }
            }
            sum
        }
        Op::Broadcast => inputs[root]
            .as_ref()
            .map_or_else(Vec::new, |i| i.data.clone()),
        Op::Barrier => Vec::new(),
    }
}

impl Collective for ThreadCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_gather(&mut self, send: &[f32], recv: &mut [f32]) -> Result<(), CollectiveError> {
        check_sizes(Op::AllGather, self.shared.world, send.len(), recv.len())?;
        let result = self.round(Op::AllGather, 0, send.to_vec())?;
        recv.copy_from_slice(&result);
        Ok(())
    }

    fn reduce_scatter(&mut self, send: &[f32], recv: &mut [f32]) -> Result<(), CollectiveError> {
        check_sizes(Op::ReduceScatter, self.shared.world, send.len(), recv.len())?;
        let result = self.round(Op::ReduceScatter, 0, send.to_vec())?;
        let chunk = recv.len();
        recv.copy_from_slice(&result[self.rank * chunk..(self.rank + 1) * chunk]);
        Ok(())
    }

    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let result = self.round(Op::AllReduce, 0, buf.to_vec())?;
        buf.copy_from_slice(&result);
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let world = self.shared.world;
        if root >= world {
            return Err(CollectiveError::Usage {
                op: Op::Broadcast,
                message: format!("root {root} is not a rank of a group of {world}"),
            });
        }
        let result = self.round(Op::Broadcast, root, buf.to_vec())?;
        if result.len() != buf.len() {
            return Err(CollectiveError::Mismatch {
                op: Op::Broadcast,
                seq: self.seq - 1,
                message: format!(
                    "root {root} sent {} elements, rank {} expects {}",
                    result.len(),
                    self.rank,
                    buf.len()
                ),
            });
        }
        buf.copy_from_slice(&result);
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.round(Op::Barrier, 0, Vec::new()).map(|_| ())
    }

    fn stats(&self) -> CollectiveStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` on every rank of a fresh group, one thread each; returns the ranks' results.
    fn run<T: Send + 'static>(
        world: usize,
        deadline: Duration,
        body: impl Fn(&mut ThreadCollective) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let body = Arc::new(body);
        let handles: Vec<_> = thread_group(world, deadline)
            .into_iter()
            .map(|mut c| {
                let body = body.clone();
                std::thread::spawn(move || body(&mut c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// Deterministic data of rank `rank`: `len` values.
    fn data(rank: usize, len: usize, salt: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((rank * 1_000 + i * 7 + salt * 13) % 997) as f32 * 0.25 - 60.0)
            .collect()
    }

    const SIZES: [usize; 6] = [0, 1, 3, 7, 64, 1001];

    #[test]
    fn all_gather_reduce_scatter_all_reduce_and_broadcast_for_1_2_3_4_8_ranks() {
        for world in [1usize, 2, 3, 4, 8] {
            for len in SIZES {
                let got = run(world, Duration::from_secs(10), move |c| {
                    let rank = c.rank();
                    let mut gathered = vec![0.0; len * world];
                    c.all_gather(&data(rank, len, 0), &mut gathered).unwrap();
                    let mut scattered = vec![0.0; len];
                    c.reduce_scatter(&data(rank, len * world, 1), &mut scattered)
                        .unwrap();
                    let mut reduced = data(rank, len, 2);
                    c.all_reduce(&mut reduced).unwrap();
                    let mut cast = data(rank, len, 3);
                    c.broadcast(&mut cast, world - 1).unwrap();
                    c.barrier().unwrap();
                    (gathered, scattered, reduced, cast, c.stats())
                });
                let want_gathered: Vec<f32> = (0..world).flat_map(|r| data(r, len, 0)).collect();
                let sum = |len: usize, salt: usize| -> Vec<f32> {
                    (0..len)
                        .map(|i| (0..world).map(|r| data(r, len, salt)[i]).sum())
                        .collect()
                };
                let full_sum = sum(len * world, 1);
                for (rank, (gathered, scattered, reduced, cast, stats)) in
                    got.into_iter().enumerate()
                {
                    let ctx = format!("world {world}, len {len}, rank {rank}");
                    assert_eq!(gathered, want_gathered, "{ctx}");
                    assert_eq!(scattered, full_sum[rank * len..(rank + 1) * len], "{ctx}");
                    assert_eq!(reduced, sum(len, 2), "{ctx}");
                    assert_eq!(cast, data(world - 1, len, 3), "{ctx}");
                    assert_eq!(stats.calls(Op::Barrier), 1);
                    let n = world as u64;
                    assert_eq!(
                        stats.wire_bytes(Op::AllGather),
                        (len * world * 4) as u64 * (n - 1) / n,
                        "{ctx}"
                    );
                }
            }
        }
    }

    #[test]
    fn many_rounds_in_a_row_stay_in_step() {
        let got = run(4, Duration::from_secs(10), |c| {
            let mut acc = vec![c.rank() as f32; 5];
            for _ in 0..200 {
                c.all_reduce(&mut acc).unwrap();
                acc.iter_mut().for_each(|x| *x /= 4.0);
            }
            acc
        });
        for acc in &got {
            assert_eq!(acc, &got[0]);
        }
    }

    #[test]
    fn a_rank_that_never_joins_times_out_naming_it() {
        let deadline = Duration::from_millis(300);
        let mut handles = thread_group(4, deadline);
        let silent = handles.remove(2); // rank 2 stays alive but never calls
        let started = Instant::now();
        let errors: Vec<CollectiveError> = handles
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    let mut buf = vec![0.0; 4 * 3];
                    c.all_gather(&[1.0, 2.0, 3.0], &mut buf).unwrap_err()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        let elapsed = started.elapsed();
        assert!(elapsed < deadline * 5, "took {elapsed:?}");
        for e in &errors {
            match e {
                CollectiveError::Timeout {
                    op, missing, world, ..
                } => {
                    assert_eq!(*op, Op::AllGather);
                    assert_eq!(missing, &[2]);
                    assert_eq!(*world, 4);
                }
                other => panic!("{other}"),
            }
            assert!(e.to_string().contains("rank 2 of 4 did not join"), "{e}");
        }
        drop(silent);
    }

    #[test]
    fn a_rank_that_leaves_mid_step_fails_the_others_at_once() {
        let deadline = Duration::from_secs(30);
        let started = Instant::now();
        let results = run(3, deadline, |c| {
            let mut buf = vec![1.0f32; 8];
            c.all_reduce(&mut buf)?;
            if c.rank() == 1 {
                // Dies between two collectives of a step (a crashed rank).
                c.abort("rank 1 crashed");
                return Ok(buf);
            }
            let mut gathered = vec![0.0; 24];
            c.all_gather(&buf, &mut gathered)?;
            Ok::<_, CollectiveError>(gathered)
        });
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the others noticed long before the deadline"
        );
        assert!(results[1].is_ok());
        for rank in [0, 2] {
            let e = results[rank].as_ref().unwrap_err();
            assert!(
                matches!(
                    e,
                    CollectiveError::RankLeft {
                        rank: 1,
                        op: Op::AllGather,
                        ..
                    }
                ),
                "{e}"
            );
            assert!(e.to_string().contains("rank 1 crashed"), "{e}");
        }
    }

    #[test]
    fn a_panicking_rank_is_reported_and_the_group_stays_poisoned() {
        let mut handles = thread_group(2, Duration::from_secs(30));
        let mut survivor = handles.pop().unwrap();
        let doomed = handles.pop().unwrap();
        let crashed = std::thread::spawn(move || {
            let _c = doomed;
            panic!("boom");
        });
        assert!(crashed.join().is_err());
        let e = survivor.barrier().unwrap_err();
        assert!(e.to_string().contains("its thread panicked"), "{e}");
        // Poisoned: the next call fails the same way, immediately.
        let again = survivor.barrier().unwrap_err();
        assert!(
            matches!(again, CollectiveError::RankLeft { rank: 0, .. }),
            "{again}"
        );
        // A fresh group (the retried stage) works.
        let sums = run(2, Duration::from_secs(10), |c| {
            let mut b = [1.0f32];
            c.all_reduce(&mut b).unwrap();
            b[0]
        });
        assert_eq!(sums, [2.0, 2.0]);
    }

    #[test]
    fn diverging_ranks_are_a_mismatch_not_a_hang() {
        let results = run(2, Duration::from_secs(10), |c| {
            if c.rank() == 0 {
                c.barrier()
            } else {
                let mut b = [0.0f32; 2];
                c.all_reduce(&mut b)
            }
        });
        let errors: Vec<_> = results.into_iter().filter_map(Result::err).collect();
        assert_eq!(errors.len(), 2);
        assert!(
            errors
                .iter()
                .all(|e| matches!(e, CollectiveError::Mismatch { .. })),
            "{errors:?}"
        );
        let sizes = run(2, Duration::from_secs(10), |c| {
            let mut b = vec![0.0f32; 2 + c.rank()];
            c.all_reduce(&mut b)
        });
        assert!(sizes.iter().all(Result::is_err));
    }

    #[test]
    fn wrong_buffer_sizes_are_refused_before_the_group_sees_them() {
        let mut group = thread_group(2, Duration::from_secs(1));
        let c = &mut group[0];
        let mut small = [0.0f32; 3];
        assert!(matches!(
            c.all_gather(&[1.0, 2.0], &mut small),
            Err(CollectiveError::Usage { .. })
        ));
        assert!(matches!(
            c.broadcast(&mut small, 5),
            Err(CollectiveError::Usage { .. })
        ));
    }
}
