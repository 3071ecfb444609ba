//! The collectives of one sharded step in the order the step uses the units: all-gathers with
//! prefetch of the next unit, reduce-scatters with one in flight.

use burn::tensor::backend::AutodiffBackend;
use segprop_shard::ShardLayout;
use segprop_shard::{CollectiveError, CommStream, Pending};

use super::{Kind, Unit};

/// The all-gathers of one step, in the order the step uses the units. With prefetch, handing
/// out a unit starts the next one's gather, which then runs while the rank computes with this
/// one: at most two units are gathered at once, as with FSDP's prefetch of one unit.
pub(super) struct Gathers {
    order: std::iter::Peekable<Box<dyn Iterator<Item = usize>>>,
    ahead: Option<(usize, Pending<Vec<f32>>)>,
    prefetch: bool,
    /// The most gathered bytes held at once (the unit handed out and the one arriving).
    pub(super) peak: u64,
}

impl Gathers {
    pub(super) fn new(order: impl Iterator<Item = usize> + 'static, prefetch: bool) -> Self {
        let order: Box<dyn Iterator<Item = usize>> = Box::new(order);
        Self {
            order: order.peekable(),
            ahead: None,
            prefetch,
            peak: 0,
        }
    }

    /// The next unit's full weights. The caller drops the previous unit's module first.
    pub(super) fn next<B: AutodiffBackend>(
        &mut self,
        units: &[Unit<B>],
        s: &CommStream,
    ) -> Result<Vec<f32>, CollectiveError> {
        let start = |i: usize| with_unit!(&units[i].kind, u => u.start_gather(s));
        let bytes = |i: usize| with_unit!(&units[i].kind, u => u.memory().gathered);
        let i = self.order.next().expect("a unit left to gather");
        let pending = match self.ahead.take() {
            Some((j, pending)) => {
                debug_assert_eq!(i, j, "the prefetched unit is the next one");
                pending
            }
            None => start(i),
        };
        let mut held = bytes(i);
        if self.prefetch
            && let Some(&j) = self.order.peek()
        {
            self.ahead = Some((j, start(j)));
            held += bytes(j);
        }
        self.peak = self.peak.max(held);
        pending.wait()
    }
}

/// The reduce-scatters of one step. With prefetch one stays in flight while the rank computes
/// the next unit's gradient; without, each is waited for at once.
pub(super) struct Scatters {
    shards: Vec<Vec<f32>>,
    in_flight: Option<(usize, u64, Pending<Vec<f32>>)>,
    prefetch: bool,
    /// The most full-gradient bytes held at once.
    pub(super) peak: u64,
}

impl Scatters {
    pub(super) fn new(units: usize, prefetch: bool) -> Self {
        Self {
            shards: vec![Vec::new(); units],
            in_flight: None,
            prefetch,
            peak: 0,
        }
    }

    /// Starts unit `i`'s reduce-scatter of its full gradient `grad`; with prefetch, then waits
    /// for the one before it, without for this one.
    pub(super) fn start(
        &mut self,
        s: &CommStream,
        i: usize,
        layout: ShardLayout,
        grad: Vec<f32>,
    ) -> Result<(), CollectiveError> {
        let bytes = (layout.padded() * 4) as u64;
        let pending = s.reduce_scatter(layout, grad);
        let before = self.in_flight.replace((i, bytes, pending));
        self.peak = self
            .peak
            .max(bytes + before.as_ref().map_or(0, |(_, b, _)| *b));
        if let Some((j, _, pending)) = before {
            self.shards[j] = pending.wait()?;
        }
        if !self.prefetch {
            let (j, _, pending) = self.in_flight.take().expect("just started");
            self.shards[j] = pending.wait()?;
        }
        Ok(())
    }

    pub(super) fn finish(mut self) -> Result<Vec<Vec<f32>>, CollectiveError> {
        if let Some((j, _, pending)) = self.in_flight.take() {
            self.shards[j] = pending.wait()?;
        }
        Ok(self.shards)
    }
}
