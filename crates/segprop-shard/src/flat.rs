//! The flat shard layout of an FSDP unit: the unit's parameters flattened into one buffer of
//! `len` elements, padded to a multiple of the world size, and cut into equal chunks, chunk `r`
//! owned by rank `r`. Padding keeps every collective call equal-sized on every rank (what NCCL
//! requires) whatever the unit's length; it is zero and never read back.

use std::ops::Range;

use crate::collective::{Collective, CollectiveError};

/// How a flat unit of `len` elements is split over `world` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLayout {
    pub len: usize,
    pub world: usize,
    /// Elements per rank (padding included).
    pub chunk: usize,
}

impl ShardLayout {
    pub fn new(len: usize, world: usize) -> Self {
        assert!(world > 0, "a layout needs at least one rank");
        Self {
            len,
            world,
            chunk: len.div_ceil(world),
        }
    }

    /// Length of the padded buffer: `chunk × world`.
    pub fn padded(&self) -> usize {
        self.chunk * self.world
    }

    /// The elements of the (padded) flat buffer rank `rank` owns.
    pub fn range(&self, rank: usize) -> Range<usize> {
        rank * self.chunk..(rank + 1) * self.chunk
    }

    /// How many of rank `rank`'s elements are real (not padding).
    pub fn valid(&self, rank: usize) -> usize {
        let r = self.range(rank);
        self.len.saturating_sub(r.start).min(self.chunk)
    }

    /// Rank `rank`'s shard of the full buffer `full` (`len` elements), zero-padded to `chunk`.
    pub fn shard(&self, full: &[f32], rank: usize) -> Vec<f32> {
        assert_eq!(full.len(), self.len, "a full buffer has len elements");
        let mut out = vec![0.0; self.chunk];
        let r = self.range(rank);
        let valid = self.valid(rank);
        if valid > 0 {
            out[..valid].copy_from_slice(&full[r.start..r.start + valid]);
        }
        out
    }

    /// `full` padded with zeros to [`Self::padded`] elements.
    pub fn pad(&self, full: &[f32]) -> Vec<f32> {
        assert_eq!(full.len(), self.len, "a full buffer has len elements");
        let mut out = Vec::with_capacity(self.padded());
        out.extend_from_slice(full);
        out.resize(self.padded(), 0.0);
        out
    }

    /// All-gathers the unit from every rank's `shard`: the full `len` elements.
    pub fn all_gather(
        &self,
        collective: &mut dyn Collective,
        shard: &[f32],
    ) -> Result<Vec<f32>, CollectiveError> {
        let mut full = vec![0.0; self.padded()];
        collective.all_gather(shard, &mut full)?;
        full.truncate(self.len);
        Ok(full)
    }

    /// Reduce-scatters a full-length gradient `grad` (`len` elements): this rank's chunk of the
    /// sum over ranks.
    pub fn reduce_scatter(
        &self,
        collective: &mut dyn Collective,
        grad: &[f32],
    ) -> Result<Vec<f32>, CollectiveError> {
        let padded = self.pad(grad);
        let mut shard = vec![0.0; self.chunk];
        collective.reduce_scatter(&padded, &mut shard)?;
        Ok(shard)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::thread::thread_group;

    #[test]
    fn uneven_lengths_pad_the_last_ranks() {
        let l = ShardLayout::new(10, 4);
        assert_eq!((l.chunk, l.padded()), (3, 12));
        assert_eq!((0..4).map(|r| l.valid(r)).collect::<Vec<_>>(), [3, 3, 3, 1]);
        let l = ShardLayout::new(2, 8);
        assert_eq!(
            (0..8).map(|r| l.valid(r)).collect::<Vec<_>>(),
            [1, 1, 0, 0, 0, 0, 0, 0]
        );
        let full: Vec<f32> = (0..10).map(|x| x as f32).collect();
        let l = ShardLayout::new(10, 4);
        assert_eq!(l.shard(&full, 3), [9.0, 0.0, 0.0]);
        let back: Vec<f32> = (0..4).flat_map(|r| l.shard(&full, r)).take(10).collect();
        assert_eq!(back, full);
        assert_eq!(ShardLayout::new(0, 3).padded(), 0);
    }

    #[test]
    fn gather_and_reduce_scatter_of_uneven_units_on_thread_ranks() {
        for world in [1usize, 2, 3, 4, 8] {
            for len in [1usize, 5, 13, 100] {
                let layout = ShardLayout::new(len, world);
                let full: Vec<f32> = (0..len).map(|i| i as f32 * 0.5).collect();
                let threads: Vec<_> = thread_group(world, Duration::from_secs(10))
                    .into_iter()
                    .map(|mut c| {
                        let full = full.clone();
                        std::thread::spawn(move || {
                            let rank = c.rank();
                            let gathered = layout
                                .all_gather(&mut c, &layout.shard(&full, rank))
                                .unwrap();
                            // Every rank contributes the same gradient: the shard sums to world × it.
                            let grad_shard = layout.reduce_scatter(&mut c, &full).unwrap();
                            (rank, gathered, grad_shard)
                        })
                    })
                    .collect();
                for t in threads {
                    let (rank, gathered, grad_shard) = t.join().unwrap();
                    assert_eq!(gathered, full, "world {world} len {len}");
                    let want: Vec<f32> = layout
                        .shard(&full, rank)
                        .iter()
                        .map(|x| x * world as f32)
                        .collect();
                    assert_eq!(grad_shard, want, "world {world} len {len} rank {rank}");
                }
            }
        }
    }
}
