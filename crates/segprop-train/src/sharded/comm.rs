//! The collectives of one sharded step in the order the step uses the units: all-gathers with
//! prefetch of the next unit, reduce-scatters with one in flight.

use burn::tensor::backend::{AutodiffBackend, Backend};
use segprop_shard::ShardLayout;
use segprop_shard::device::reduce_scatter_flat;
use segprop_shard::{CollectiveError, CommStream, Flat, PendingFlat};

use super::{Kind, Unit};

/// The all-gathers of one step, in the order the step uses the units. With prefetch, handing
/// out a unit starts the next one's gather, which then runs while the rank computes with this
/// one: at most two units are gathered at once, as with FSDP's prefetch of one unit. Units whose
/// chunks live on the device are gathered there (`segprop_shard::device`).
pub(super) struct Gathers<I: Backend> {
    order: std::iter::Peekable<Box<dyn Iterator<Item = usize>>>,
    ahead: Option<(usize, PendingFlat<I>)>,
    prefetch: bool,
    /// The most gathered bytes held at once (the unit handed out and the one arriving).
    pub(super) peak: u64,
}

impl<I: Backend> Gathers<I> {
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
    pub(super) fn next<B: AutodiffBackend<InnerBackend = I>>(
        &mut self,
        units: &[Unit<B>],
        s: &CommStream,
    ) -> Result<Flat<I>, CollectiveError> {
        let start = |i: usize| with_unit!(&units[i].kind, u => u.start_gather_flat::<I>(s));
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
/// the next unit's gradient; without, each is waited for at once. A gradient on the device is
/// reduce-scattered there.
pub(super) struct Scatters<I: Backend> {
    shards: Vec<Option<Flat<I>>>,
    in_flight: Option<(usize, u64, PendingFlat<I>)>,
    prefetch: bool,
    /// The most full-gradient bytes held at once.
    pub(super) peak: u64,
}

impl<I: Backend> Scatters<I> {
    pub(super) fn new(units: usize, prefetch: bool) -> Self {
        Self {
            shards: (0..units).map(|_| None).collect(),
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
        grad: Flat<I>,
    ) -> Result<(), CollectiveError> {
        let bytes = (layout.padded() * 4) as u64;
        let pending = reduce_scatter_flat(s, layout, grad);
        let before = self.in_flight.replace((i, bytes, pending));
        self.peak = self
            .peak
            .max(bytes + before.as_ref().map_or(0, |(_, b, _)| *b));
        if let Some((j, _, pending)) = before {
            self.shards[j] = Some(pending.wait()?);
        }
        if !self.prefetch {
            let (j, _, pending) = self.in_flight.take().expect("just started");
            self.shards[j] = Some(pending.wait()?);
        }
        Ok(())
    }

    /// Every unit's gradient chunk, in unit order.
    pub(super) fn finish(mut self) -> Result<Vec<Flat<I>>, CollectiveError> {
        if let Some((j, _, pending)) = self.in_flight.take() {
            self.shards[j] = Some(pending.wait()?);
        }
        Ok(self
            .shards
            .into_iter()
            .map(|s| s.expect("every unit's gradient was reduce-scattered"))
            .collect())
    }
}
