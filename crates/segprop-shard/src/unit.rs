//! FSDP units over burn modules (applied from outside the model, as torchtitan's
//! `fully_shard` does per block).
//!
//! A unit (one decoder block; the embedding; the LM head with the final norm) is flattened into
//! one fp32 buffer in parameter-visit order and sharded with [`ShardLayout`]: each rank keeps its
//! chunk of the master weights and of the AdamW moments. The module itself stays as a skeleton
//! whose parameters are one-element placeholders (same parameter ids), so a rank holds `1/N` of
//! the unit, not all of it.
//!
//! A step per unit: [`FsdpUnit::gather`] all-gathers the full weights into a fresh module (used
//! for forward and backward, then dropped: "free after use"); [`FsdpUnit::reduce_scatter_grads`]
//! reduce-scatters the unit's gradients to this rank's chunk; [`FsdpUnit::step`] runs AdamW on
//! the chunk.

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{FloatDType, Tensor, TensorData};

use crate::collective::{Collective, CollectiveError};
use crate::device::{Flat, PendingFlat, all_gather_tensor};
use crate::flat::ShardLayout;
use crate::optim::{AdamWConfig, ShardedAdamW};
use crate::resident::{DeviceShard, OnDevice};
use crate::stream::{CommStream, Pending};
pub use crate::words::{pack16, unpack16};

/// A tensor's values as f32, in one bulk conversion (not element by element).
fn to_f32(data: TensorData) -> Vec<f32> {
    data.convert::<f32>()
        .into_vec::<f32>()
        .expect("converted to f32")
}

/// The float parameters of `module`, flattened in visit order.
pub fn flatten<B: Backend, M: Module<B>>(module: &M) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl<B: Backend> ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.extend_from_slice(&to_f32(param.val().into_data()));
        }
    }
    let mut collect = Collect(Vec::new());
    module.visit(&mut collect);
    collect.0
}

/// The shapes of `module`'s float parameters, in visit order.
pub fn param_shapes<B: Backend, M: Module<B>>(module: &M) -> Vec<Vec<usize>> {
    struct Shapes(Vec<Vec<usize>>);
    impl<B: Backend> ModuleVisitor<B> for Shapes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(param.val().dims().to_vec());
        }
    }
    let mut shapes = Shapes(Vec::new());
    module.visit(&mut shapes);
    shapes.0
}

/// Replaces `module`'s float parameters (same ids, same gradient requirement) with tensors of
/// `shapes` filled from `flat` in visit order, cast to `dtype` when given; `flat = None` makes
/// one-element placeholders.
fn refill<B: Backend, M: Module<B>>(
    module: M,
    shapes: &[Vec<usize>],
    flat: Option<&[f32]>,
    dtype: Option<FloatDType>,
) -> M {
    struct Refill<'a> {
        shapes: &'a [Vec<usize>],
        flat: Option<&'a [f32]>,
        dtype: Option<FloatDType>,
        index: usize,
        at: usize,
    }
    impl<B: Backend> ModuleMapper<B> for Refill<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let device = tensor.device();
            let fresh = match self.flat {
                Some(flat) => {
                    let shape = self.shapes[self.index].clone();
                    let n: usize = shape.iter().product();
                    let values = flat[self.at..self.at + n].to_vec();
                    self.at += n;
                    let t = Tensor::<B, D>::from_data(TensorData::new(values, shape), &device);
                    match self.dtype {
                        Some(dtype) => t.cast(dtype),
                        None => t,
                    }
                }
                None => Tensor::<B, D>::from_data(TensorData::new(vec![0.0f32], [1; D]), &device),
            };
            self.index += 1;
            let fresh = if tensor.is_require_grad() {
                fresh.require_grad()
            } else {
                fresh
            };
            Param::from_mapped_value(id, fresh, mapper)
        }
    }
    let mut refill = Refill {
        shapes,
        flat,
        dtype,
        index: 0,
        at: 0,
    };
    let module = module.map(&mut refill);
    if let Some(flat) = flat {
        assert_eq!(
            refill.at,
            flat.len(),
            "the flat buffer does not match the unit"
        );
    }
    module
}

/// The gradients of `module`'s parameters in visit order (zeros where a parameter has none).
pub fn flatten_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> Vec<f32> {
    struct Collect<'a>(&'a GradientsParams, Vec<f32>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            match self.0.get::<B::InnerBackend, D>(param.id) {
                Some(g) => self.1.extend_from_slice(&to_f32(g.into_data())),
                None => {
                    let n = param.val().shape().num_elements();
                    self.1.extend(std::iter::repeat_n(0.0, n));
                }
            }
        }
    }
    let mut collect = Collect(grads, Vec::new());
    module.visit(&mut collect);
    collect.1
}

/// Like [`refill`] from a device buffer: each parameter a view of `flat` (in visit order, in
/// `flat`'s dtype), on the autodiff backend, with the gradient requirement it had.
fn refill_tensor<B: AutodiffBackend, M: Module<B>>(
    module: M,
    shapes: &[Vec<usize>],
    flat: Tensor<B::InnerBackend, 1>,
) -> M {
    struct Refill<'a, I: Backend> {
        shapes: &'a [Vec<usize>],
        flat: Tensor<I, 1>,
        index: usize,
        at: usize,
    }
    impl<B: AutodiffBackend> ModuleMapper<B> for Refill<'_, B::InnerBackend> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let shape = self.shapes[self.index].clone();
            let n: usize = shape.iter().product();
            let values = self.flat.clone().slice(self.at..self.at + n);
            self.at += n;
            self.index += 1;
            let fresh =
                Tensor::<B, D>::from_inner(values.reshape(burn::tensor::Shape::from(shape)));
            let fresh = if tensor.is_require_grad() {
                fresh.require_grad()
            } else {
                fresh
            };
            Param::from_mapped_value(id, fresh, mapper)
        }
    }
    let len = flat.dims()[0];
    let mut refill = Refill::<B::InnerBackend> {
        shapes,
        flat,
        index: 0,
        at: 0,
    };
    let module = module.map(&mut refill);
    assert!(refill.at <= len, "the flat buffer does not match the unit");
    module
}

/// [`flatten_grads`] on the device: one fp32 tensor, zero-padded to `padded` elements.
fn flatten_grads_tensor<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
    padded: usize,
) -> Tensor<B::InnerBackend, 1> {
    struct Collect<'a, I: Backend>(&'a GradientsParams, Vec<Tensor<I, 1>>, Option<I::Device>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_, B::InnerBackend> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val().inner();
            let n = value.shape().num_elements();
            let device = value.device();
            let flat = match self.0.get::<B::InnerBackend, D>(param.id) {
                Some(g) => g.reshape([n]).cast(FloatDType::F32),
                None => Tensor::zeros([n], &device),
            };
            self.1.push(flat);
            self.2 = Some(device);
        }
    }
    let mut collect = Collect::<B::InnerBackend>(grads, Vec::new(), None);
    module.visit(&mut collect);
    let device = collect.2.expect("a unit has parameters");
    let len: usize = collect.1.iter().map(|t| t.dims()[0]).sum();
    if padded > len {
        collect.1.push(Tensor::zeros([padded - len], &device));
    }
    Tensor::cat(collect.1, 0)
}

/// Bytes one rank holds for a unit (fp32, or 16 bits for the weights of a frozen 16-bit unit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnitMemory {
    /// This rank's chunk of the master weights.
    pub params: u64,
    /// This rank's chunk of both AdamW moments.
    pub optimizer: u64,
    /// The full weights while gathered (forward, backward), freed after use.
    pub gathered: u64,
    /// The full gradient before the reduce-scatter.
    pub full_grad: u64,
}

/// One FSDP unit on one rank.
pub struct FsdpUnit<M> {
    /// The module's structure with placeholder parameters (ids kept).
    skeleton: M,
    shapes: Vec<Vec<usize>>,
    pub layout: ShardLayout,
    pub rank: usize,
    /// This rank's chunk of the stored weights and of the AdamW state, in host or device memory.
    shard: Shard,
    storage: Storage,
    /// Weights in the unit (the layout's length is in words when packed).
    values: usize,
}

/// Where this rank's chunk lives ([`crate::resident`]).
enum Shard {
    /// `master`: the chunk of the fp32 master weights (padding included, always zero), or for a
    /// frozen 16-bit unit its chunk of the [`pack16`] words; `optimizer`: its AdamW state (no
    /// moments for a unit no optimizer steps).
    Host {
        master: Vec<f32>,
        optimizer: ShardedAdamW,
    },
    /// The same on the rank's device.
    Device(Box<dyn DeviceShard>),
}

/// How a unit's weights are kept and gathered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Storage {
    /// fp32 values, gathered in fp32.
    F32,
    /// fp32 master values (the optimizer steps them), gathered for compute in 16 bits, as
    /// FSDP's `MixedPrecision(param_dtype=bf16)` does; the chunk is even so each rank packs its
    /// own chunk. Gradients are reduce-scattered in fp32.
    Master16(FloatDType),
    /// A frozen unit: 16-bit values packed two to a word ([`pack16`]); the layout counts words.
    Packed16(FloatDType),
}

impl Storage {
    fn half(self) -> Option<FloatDType> {
        match self {
            Storage::F32 => None,
            Storage::Master16(d) | Storage::Packed16(d) => Some(d),
        }
    }
}

/// Whether `dtype` is a 16-bit float type.
fn is_half(dtype: FloatDType) -> bool {
    matches!(dtype, FloatDType::BF16 | FloatDType::F16)
}

impl<M> FsdpUnit<M> {
    /// Shards `module` (whose weights every rank starts with, e.g. from one seed) for `rank` of
    /// `world`; the full weights are dropped.
    #[cfg(any(test, feature = "testing"))]
    pub fn new<B: Backend>(module: M, rank: usize, world: usize, config: AdamWConfig) -> Self
    where
        M: Module<B>,
    {
        Self::sharded::<B>(module, rank, world, config, Storage::F32)
    }

    /// Like [`Self::new`], computing in `compute`: with bf16/f16 the fp32 master shard is
    /// all-gathered in 16 bits for forward and backward (2 bytes per weight on the wire and while
    /// gathered); [`Self::gather`] still returns the fp32 masters.
    pub fn new_in<B: Backend>(
        module: M,
        rank: usize,
        world: usize,
        config: AdamWConfig,
        compute: FloatDType,
    ) -> Self
    where
        M: Module<B>,
    {
        let storage = if is_half(compute) {
            Storage::Master16(compute)
        } else {
            Storage::F32
        };
        Self::sharded::<B>(module, rank, world, config, storage)
    }

    /// Shards the fp32 values of `module` (an even chunk per rank when gathered in 16 bits, so
    /// each rank packs its own chunk).
    fn sharded<B: Backend>(
        module: M,
        rank: usize,
        world: usize,
        config: AdamWConfig,
        storage: Storage,
    ) -> Self
    where
        M: Module<B>,
    {
        let flat = flatten::<B, M>(&module);
        let shapes = param_shapes::<B, M>(&module);
        let mut layout = ShardLayout::new(flat.len(), world);
        if matches!(storage, Storage::Master16(_)) {
            layout.chunk += layout.chunk % 2;
        }
        let master = layout.shard(&flat, rank);
        Self {
            skeleton: refill::<B, M>(module, &shapes, None, None),
            shapes,
            layout,
            rank,
            shard: Shard::Host {
                optimizer: ShardedAdamW::new(config, layout.chunk),
                master,
            },
            storage,
            values: flat.len(),
        }
    }

    /// Shards a unit no optimizer steps (a block of a frozen prefix): weights only, no AdamW
    /// state.
    #[cfg(any(test, feature = "testing"))]
    pub fn frozen<B: Backend>(module: M, rank: usize, world: usize) -> Self
    where
        M: Module<B>,
    {
        let mut unit = Self::new::<B>(module, rank, world, AdamWConfig::default());
        unit.clear_optimizer();
        unit
    }

    /// Shards a frozen unit in 16 bits (`dtype` bf16 or f16; f32 gives [`Self::frozen`]): each
    /// rank keeps 2 bytes per weight of its chunk, the all-gather moves 2 bytes per weight, and
    /// gathered modules hold `dtype` tensors.
    #[cfg(any(test, feature = "testing"))]
    pub fn frozen_in<B: Backend>(module: M, rank: usize, world: usize, dtype: FloatDType) -> Self
    where
        M: Module<B>,
    {
        if !is_half(dtype) {
            return Self::frozen::<B>(module, rank, world);
        }
        let mut unit = Self::stored_in::<B>(module, rank, world, dtype);
        unit.freeze();
        unit
    }

    /// Shards `module`'s fp32 values as a unit that computes in `compute` (16-bit compute
    /// gathers with bf16/f16), with no optimizer state yet: what a unit is between stages before
    /// a stage decides whether it trains it ([`Self::train`]) or freezes it ([`Self::freeze`]).
    pub fn stored_in<B: Backend>(module: M, rank: usize, world: usize, compute: FloatDType) -> Self
    where
        M: Module<B>,
    {
        let mut unit = Self::new_in::<B>(module, rank, world, AdamWConfig::default(), compute);
        unit.clear_optimizer();
        unit
    }

    /// Freezes the unit: its optimizer state goes, and a 16-bit unit keeps its weights in 16
    /// bits (its fp32 values rounded to nearest even, packed two to a word). Local: each rank
    /// packs its own chunk, no collective.
    pub fn freeze(&mut self) {
        let storage = self.storage;
        let words = self.compute_words();
        self.edit(|master, optimizer| {
            *optimizer = ShardedAdamW::new(optimizer.config, 0);
            if let Storage::Master16(dtype) = storage {
                *master = pack16(master, dtype);
            }
        });
        if let Storage::Master16(dtype) = self.storage {
            self.layout = words;
            self.storage = Storage::Packed16(dtype);
        }
    }

    /// Makes the unit trainable: fp32 master weights (a frozen 16-bit unit's weights widened
    /// exactly) and AdamW state for `config`, kept when it already has some. Local, no
    /// collective.
    pub fn train(&mut self, config: AdamWConfig) {
        let storage = self.storage;
        if let Storage::Packed16(dtype) = storage {
            self.layout = ShardLayout {
                len: self.values,
                world: self.layout.world,
                chunk: self.layout.chunk * 2,
            };
            self.storage = Storage::Master16(dtype);
        }
        let chunk = self.layout.chunk;
        if !matches!(storage, Storage::Packed16(_)) && self.optimizer_len() == chunk {
            // Already trainable in place: only the configuration changes (no copy of the state).
            self.edit_optimizer_config(config);
            return;
        }
        self.edit(|master, optimizer| {
            if let Storage::Packed16(dtype) = storage {
                *master = unpack16(master, chunk, dtype);
            }
            if optimizer.moment_1.len() != chunk {
                *optimizer = ShardedAdamW::new(config, chunk);
            }
            optimizer.config = config;
        });
    }

    /// Sets the AdamW configuration of a unit that already has its state.
    fn edit_optimizer_config(&mut self, config: AdamWConfig) {
        match &mut self.shard {
            Shard::Host { optimizer, .. } => optimizer.config = config,
            Shard::Device(device) => device.set_config(config),
        }
    }

    /// Applies `f` to the chunk and the AdamW state in host memory: in place for a host shard;
    /// for a device shard, copied to the host and back (stage boundaries and checkpoint loads
    /// only, never per step).
    fn edit(&mut self, f: impl FnOnce(&mut Vec<f32>, &mut ShardedAdamW)) {
        match &mut self.shard {
            Shard::Host { master, optimizer } => f(master, optimizer),
            Shard::Device(device) => {
                let (mut master, mut optimizer) = device.download();
                f(&mut master, &mut optimizer);
                device.load(&master, &optimizer);
            }
        }
    }

    /// Fresh AdamW state (no step taken) for a trainable unit; none for a frozen one.
    pub fn reset_optimizer(&mut self) {
        let len = self.optimizer_len();
        self.edit(|_, optimizer| *optimizer = ShardedAdamW::new(optimizer.config, len));
    }

    /// Drops the AdamW state and keeps the weights as they are stored (head policy `reset`:
    /// LL's blocks lose their moments).
    pub fn clear_optimizer(&mut self) {
        self.edit(|_, optimizer| *optimizer = ShardedAdamW::new(optimizer.config, 0));
    }

    /// Whether the unit holds AdamW state (it is trained by the current stage).
    pub fn is_trainable(&self) -> bool {
        self.optimizer_len() > 0
    }

    /// Elements of each AdamW moment this rank holds (0 for a frozen unit).
    pub fn optimizer_len(&self) -> usize {
        match &self.shard {
            Shard::Host { optimizer, .. } => optimizer.moment_1.len(),
            Shard::Device(device) => device.optimizer_len(),
        }
    }

    /// AdamW's step count for this unit.
    pub fn optimizer_time(&self) -> i32 {
        match &self.shard {
            Shard::Host { optimizer, .. } => optimizer.time,
            Shard::Device(device) => device.optimizer_meta().1,
        }
    }

    /// This rank's chunk of the stored weights, in host memory (copied from the device when the
    /// unit is device-resident).
    pub fn master(&self) -> std::borrow::Cow<'_, [f32]> {
        match &self.shard {
            Shard::Host { master, .. } => std::borrow::Cow::Borrowed(master),
            Shard::Device(device) => std::borrow::Cow::Owned(device.master()),
        }
    }

    /// This rank's AdamW state, in host memory (copied from the device when the unit is
    /// device-resident).
    pub fn optimizer(&self) -> std::borrow::Cow<'_, ShardedAdamW> {
        match &self.shard {
            Shard::Host { optimizer, .. } => std::borrow::Cow::Borrowed(optimizer),
            Shard::Device(device) => std::borrow::Cow::Owned(device.optimizer()),
        }
    }

    /// Replaces this rank's chunk of the stored weights (a checkpoint's, a baseline's): `chunk`
    /// elements in the unit's current storage.
    pub fn set_master(&mut self, values: Vec<f32>) {
        assert_eq!(values.len(), self.layout.chunk, "one chunk of the unit");
        self.edit(|master, _| *master = values);
    }

    /// Replaces this rank's AdamW moments (`chunk` elements each) and step count, keeping the
    /// configuration.
    pub fn set_moments(&mut self, moment_1: Vec<f32>, moment_2: Vec<f32>, time: i32) {
        let chunk = self.layout.chunk;
        assert!(
            moment_1.len() == chunk && moment_2.len() == chunk,
            "one chunk of each moment"
        );
        self.edit(|_, optimizer| {
            optimizer.moment_1 = moment_1;
            optimizer.moment_2 = moment_2;
            optimizer.time = time;
        });
    }

    /// Moves this rank's chunk and AdamW state to `device` (`sharding.offload: none`): from now
    /// on the step runs there, as tensor operations. Local, no collective.
    pub fn to_device<B: Backend>(&mut self, device: &B::Device) {
        let (master, optimizer) = match &self.shard {
            Shard::Host { master, optimizer } => (master, optimizer),
            Shard::Device(_) => return,
        };
        self.shard = Shard::Device(<dyn DeviceShard>::upload::<B>(master, optimizer, device));
    }

    /// Moves this rank's chunk and AdamW state back to host memory (a unit a stage freezes or
    /// parks). Local, no collective.
    pub fn to_host(&mut self) {
        if let Shard::Device(device) = &self.shard {
            let (master, optimizer) = device.download();
            self.shard = Shard::Host { master, optimizer };
        }
    }

    /// Whether this rank's chunk and AdamW state live on its device ([`Self::to_device`]).
    pub fn is_device_resident(&self) -> bool {
        matches!(self.shard, Shard::Device(_))
    }

    /// Whether the weights are stored packed in 16 bits (a frozen unit of a 16-bit job).
    pub fn is_packed(&self) -> bool {
        matches!(self.storage, Storage::Packed16(_))
    }

    /// Number of weights in the unit (not words, not padding).
    pub fn num_values(&self) -> usize {
        self.values
    }

    /// All-gathers the unit as it is stored: a module with the full current weights (the fp32
    /// masters of a trained unit, the 16-bit weights of a frozen one). For checkpoints, stage
    /// ends and evaluation.
    pub fn gather<B: Backend>(&self, collective: &mut dyn Collective) -> Result<M, CollectiveError>
    where
        M: Module<B>,
    {
        let full = self.layout.all_gather(collective, &self.master())?;
        Ok(match self.storage {
            Storage::Packed16(_) => self.assemble::<B>(&full),
            Storage::F32 | Storage::Master16(_) => {
                refill::<B, M>(self.skeleton.clone(), &self.shapes, Some(&full), None)
            }
        })
    }

    /// The layout of the words a 16-bit compute gather of a trained unit moves.
    fn compute_words(&self) -> ShardLayout {
        ShardLayout {
            len: self.layout.padded() / 2,
            world: self.layout.world,
            chunk: self.layout.chunk / 2,
        }
    }

    /// Starts the all-gather of the unit for compute on `stream` (prefetch): the full flat
    /// weights (16-bit words when the unit computes in 16 bits), for [`Self::assemble`].
    pub fn start_gather(&self, stream: &CommStream) -> Pending<Vec<f32>> {
        match self.storage {
            Storage::Master16(dtype) => {
                stream.all_gather(self.compute_words(), pack16(&self.master(), dtype))
            }
            Storage::F32 | Storage::Packed16(_) => {
                stream.all_gather(self.layout, self.master().into_owned())
            }
        }
    }

    /// Bytes of the full buffer one compute gather of this unit assembles (padding included):
    /// the wire bytes are `(N - 1)/N` of it.
    pub fn gather_bytes(&self) -> u64 {
        match self.storage {
            Storage::Master16(_) => (self.compute_words().padded() * 4) as u64,
            Storage::F32 | Storage::Packed16(_) => (self.layout.padded() * 4) as u64,
        }
    }

    /// A module with the weights of a compute gather `full` ([`Self::start_gather`]), in the
    /// unit's compute dtype.
    pub fn assemble<B: Backend>(&self, full: &[f32]) -> M
    where
        M: Module<B>,
    {
        match self.storage.half() {
            Some(dtype) => {
                let values = unpack16(full, self.values, dtype);
                refill::<B, M>(
                    self.skeleton.clone(),
                    &self.shapes,
                    Some(&values),
                    Some(dtype),
                )
            }
            None => refill::<B, M>(self.skeleton.clone(), &self.shapes, Some(full), None),
        }
    }

    /// This rank's chunk as backend `I` holds it, when the unit lives on an `I` device.
    fn on_device<I: Backend>(&self) -> Option<&OnDevice<I>> {
        match &self.shard {
            Shard::Device(device) => device.as_any().downcast_ref::<OnDevice<I>>(),
            Shard::Host { .. } => None,
        }
    }

    /// Starts the all-gather of the unit for compute where its chunk lives: a device-resident
    /// chunk is gathered on the device (in the compute dtype, [`crate::device`]); otherwise as
    /// [`Self::start_gather`]. For [`Self::assemble_flat`].
    pub fn start_gather_flat<I: Backend>(&self, stream: &CommStream) -> PendingFlat<I> {
        match (self.storage, self.on_device::<I>()) {
            (Storage::F32, Some(d)) => {
                all_gather_tensor(stream, self.layout, d.master_tensor().clone(), None)
            }
            (Storage::Master16(dtype), Some(d)) => {
                all_gather_tensor(stream, self.layout, d.master_tensor().clone(), Some(dtype))
            }
            _ => PendingFlat::host(self.start_gather(stream)),
        }
    }

    /// [`Self::assemble`] from either kind of compute gather: from a device buffer, each
    /// parameter is a view of it (no host copy).
    pub fn assemble_flat<B: AutodiffBackend>(&self, full: Flat<B::InnerBackend>) -> M
    where
        M: Module<B>,
    {
        match full {
            Flat::Host(values) => self.assemble::<B>(&values),
            Flat::Device(t) => refill_tensor::<B, M>(self.skeleton.clone(), &self.shapes, t),
        }
    }

    /// The full fp32 gradient of `gathered` for its reduce-scatter: on the device when the unit
    /// is device-resident (padded), else in host memory ([`flatten_grads`]).
    pub fn flatten_grads_flat<B: AutodiffBackend>(
        &self,
        gathered: &M,
        grads: &GradientsParams,
    ) -> Flat<B::InnerBackend>
    where
        M: AutodiffModule<B>,
    {
        if self.on_device::<B::InnerBackend>().is_some() {
            Flat::Device(flatten_grads_tensor::<B, M>(
                gathered,
                grads,
                self.layout.padded(),
            ))
        } else {
            Flat::Host(flatten_grads::<B, M>(gathered, grads))
        }
    }

    /// AdamW on this rank's chunk with its gradient chunk `grad`, where the chunk lives; a
    /// device gradient steps a device chunk without leaving the device.
    pub fn step_flat<I: Backend>(&mut self, lr: f64, grad: Flat<I>) {
        match grad {
            Flat::Host(values) => self.step(lr, &values),
            Flat::Device(t) => match &mut self.shard {
                Shard::Device(device) => device
                    .as_any_mut()
                    .downcast_mut::<OnDevice<I>>()
                    .expect("a device gradient steps a chunk on the same backend")
                    .step_tensor(lr, t),
                Shard::Host { .. } => {
                    let values = to_f32(t.into_data());
                    self.step(lr, &values)
                }
            },
        }
    }

    /// Reduce-scatters the gradients of `gathered` (the module [`Self::gather`] returned, after
    /// backward): this rank's chunk of their sum over ranks.
    #[cfg(any(test, feature = "testing"))]
    pub fn reduce_scatter_grads<B: AutodiffBackend>(
        &self,
        collective: &mut dyn Collective,
        gathered: &M,
        grads: &GradientsParams,
    ) -> Result<Vec<f32>, CollectiveError>
    where
        M: AutodiffModule<B>,
    {
        let full = flatten_grads::<B, M>(gathered, grads);
        self.layout.reduce_scatter(collective, &full)
    }

    /// AdamW on this rank's chunk, where the chunk lives.
    pub fn step(&mut self, lr: f64, grad_shard: &[f32]) {
        match &mut self.shard {
            Shard::Host { master, optimizer } => optimizer.step(lr, master, grad_shard),
            Shard::Device(device) => device.step(lr, grad_shard),
        }
    }

    /// The module's structure with one-element placeholder parameters (the ids of the original).
    pub fn skeleton(&self) -> &M {
        &self.skeleton
    }

    /// Loads AdamW state of the whole unit (both moments in visit order, `len` elements each, and
    /// the step count): this rank keeps its chunk.
    pub fn load_optimizer_state(&mut self, moment_1: &[f32], moment_2: &[f32], time: i32) {
        let (layout, rank) = (self.layout, self.rank);
        self.edit(|_, optimizer| {
            optimizer.moment_1 = layout.shard(moment_1, rank);
            optimizer.moment_2 = layout.shard(moment_2, rank);
            optimizer.time = time;
        });
    }

    /// All-gathers the unit's AdamW moments (`len` elements each, visit order). Every rank must
    /// call it.
    pub fn gather_optimizer_state(
        &self,
        collective: &mut dyn Collective,
    ) -> Result<(Vec<f32>, Vec<f32>), CollectiveError> {
        let optimizer = self.optimizer();
        Ok((
            self.layout.all_gather(collective, &optimizer.moment_1)?,
            self.layout.all_gather(collective, &optimizer.moment_2)?,
        ))
    }

    /// The shapes of the unit's parameters, in visit order.
    pub fn shapes(&self) -> &[Vec<usize>] {
        &self.shapes
    }

    /// Real (non-padding) elements of this rank's chunk.
    pub fn valid(&self) -> usize {
        self.layout.valid(self.rank)
    }

    pub fn memory(&self) -> UnitMemory {
        let weight = if self.storage.half().is_some() { 2 } else { 4 };
        UnitMemory {
            params: (self.layout.chunk * 4) as u64,
            optimizer: (self.optimizer_len() * 8) as u64,
            gathered: (self.values * weight) as u64,
            full_grad: (self.values * 4) as u64,
        }
    }
}
