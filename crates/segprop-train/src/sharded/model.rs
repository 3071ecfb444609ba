//! The whole model as FSDP units on one rank, kept sharded between stages (issue 18, "a model
//! that is never whole"): the embedding, every decoder block and the LM head each live as this
//! rank's `1/N` chunk from the first byte read (seeded init or an HF checkpoint streamed unit by
//! unit) to the last byte written (the export, unit by unit). A stage takes the units its route
//! uses ([`ShardedStage::take`]: trained ones as fp32 masters with AdamW state, the rest frozen,
//! 16-bit in a mixed-precision job) and puts them back at its end; commits, SnapCheck advances,
//! head resets, pruning, evaluation and the export gather one unit at a time.

use burn::module::ParamId;
use burn::nn::Embedding;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, FloatDType};
use segprop_core::{LlamaConfig, Precision};
use segprop_model::hf_stream::{HfReader, HfUnitWriter};
use segprop_model::{Block, Llama, LmHead, ModelError, ParamIds, SeededUnits};
use segprop_shard::CommStream;
use segprop_shard::unit::FsdpUnit;

use super::{Group, Kind, ShardedStage, Unit};
use crate::params::Trainable;
use crate::route::{Route, RouteInput};

/// This rank's shards of every unit of the model. A slot is empty while a stage holds its unit.
pub struct ModelShards<B: AutodiffBackend> {
    pub(super) embed: Option<FsdpUnit<Embedding<B>>>,
    pub(super) blocks: Vec<Option<FsdpUnit<Block<B>>>>,
    pub(super) head: Option<FsdpUnit<LmHead<B>>>,
    /// LL(r)'s blocks as stage 2 found them (head policy `reset`): this rank's chunks.
    baseline: Option<Vec<(usize, Vec<f32>)>>,
    rank: usize,
    world: usize,
    compute: FloatDType,
    /// The device the chunks and AdamW state of the units a stage trains live on
    /// (`sharding.offload: none`); host memory when `None`. Frozen units stay in host memory.
    resident: Option<B::Device>,
}

const HELD: &str = "a unit is back in its slot between stages";

/// How a rank shards each unit as it is made: its place in the gang, the compute dtype, and
/// where the chunk lives.
#[derive(Clone)]
pub struct Placement<B: AutodiffBackend> {
    pub rank: usize,
    pub world: usize,
    pub compute: DType,
    /// `Some(device)`: the chunks and AdamW state of the units a stage trains live on `device`
    /// and are stepped there (`sharding.offload: none`); frozen units (a segment's prefix, the
    /// parked blocks) stay in host memory, as the planner parks held weights.
    pub resident: Option<B::Device>,
}

impl<B: AutodiffBackend> Placement<B> {
    /// Host-resident shards (`sharding.offload: cpu`, and every CPU rank).
    pub fn host((rank, world): (usize, usize), compute: DType) -> Self {
        Self {
            rank,
            world,
            compute,
            resident: None,
        }
    }

    /// Shards of `shard`'s rank, on `device` when its options keep shards there.
    pub fn of(shard: &crate::rank::ShardRank, compute: DType, device: &B::Device) -> Self {
        Self {
            resident: shard.options.device_shards.then(|| device.clone()),
            ..Self::host((shard.rank(), shard.world()), compute)
        }
    }

    /// `module` sharded for this rank (in host memory until a stage trains it).
    fn shard<M: burn::module::Module<B>>(&self, module: M) -> FsdpUnit<M> {
        let f = FloatDType::from(self.compute);
        FsdpUnit::stored_in::<B>(module, self.rank, self.world, f)
    }
}

impl<B: AutodiffBackend> ModelShards<B> {
    fn from_units(
        embed: FsdpUnit<Embedding<B>>,
        blocks: Vec<FsdpUnit<Block<B>>>,
        head: FsdpUnit<LmHead<B>>,
        place: Placement<B>,
    ) -> Self {
        Self {
            embed: Some(embed),
            blocks: blocks.into_iter().map(Some).collect(),
            head: Some(head),
            baseline: None,
            rank: place.rank,
            world: place.world,
            compute: FloatDType::from(place.compute),
            resident: place.resident,
        }
    }

    /// A seeded random model ([`SeededUnits`]: the values of `LlamaInit::random`), each unit
    /// sharded as soon as it is made.
    pub fn init(config: &LlamaConfig, seed: u64, place: Placement<B>, device: &B::Device) -> Self {
        let mut units = SeededUnits::new(config, seed);
        let embed = place.shard(units.embed::<B>(device));
        let blocks = (0..config.num_layers)
            .map(|_| place.shard(units.block::<B>(device)))
            .collect();
        let head = place.shard(units.head::<B>(device));
        Self::from_units(embed, blocks, head, place)
    }

    /// Every unit laid out for `(rank, world)` with values not worth keeping (burn's default
    /// initializers, one unit made and sharded at a time): the shape a rank loads a sharded
    /// checkpoint into ([`Self::load_rank_files`]), so the job's seeded init or HF import does
    /// not run again for a stage that continues from a stored state.
    pub fn blank(config: &LlamaConfig, place: Placement<B>, device: &B::Device) -> Self {
        let embed =
            burn::nn::EmbeddingConfig::new(config.vocab_size, config.hidden_size).init::<B>(device);
        let embed = place.shard(embed);
        let blocks = (0..config.num_layers)
            .map(|_| place.shard(segprop_model::BlockConfig::from_llama(config).init::<B>(device)))
            .collect();
        let head = place.shard(LmHead::init(config, device));
        Self::from_units(embed, blocks, head, place)
    }

    /// An HF checkpoint read unit by unit ([`HfReader`]), each unit sharded as soon as it is
    /// read. Returns the checkpoint's config (untied).
    pub fn import_hf(
        dir: &std::path::Path,
        place: Placement<B>,
        device: &B::Device,
    ) -> Result<(Self, LlamaConfig), ModelError> {
        let mut reader = HfReader::open(dir)?;
        let embed = place.shard(reader.embed::<B>(device)?);
        let mut blocks = Vec::with_capacity(reader.config().num_layers);
        for layer in 0..reader.config().num_layers {
            blocks.push(place.shard(reader.block::<B>(layer, device)?));
        }
        let head = place.shard(reader.head::<B>(device)?);
        let config = reader.finish()?;
        Ok((Self::from_units(embed, blocks, head, place), config))
    }

    /// Shards the whole `model` (a trainer that holds it whole between stages), leaving
    /// placeholders in its place.
    pub fn from_model(model: &mut Llama<B>, place: Placement<B>) -> Self {
        let embed = place.shard(model.embed_tokens.clone());
        model.embed_tokens = embed.skeleton().clone();
        let mut blocks = Vec::with_capacity(model.blocks.len());
        for slot in &mut model.blocks {
            let unit = place.shard(slot.clone());
            *slot = unit.skeleton().clone();
            blocks.push(unit);
        }
        let head = place.shard(model.head.clone());
        model.head = head.skeleton().clone();
        Self::from_units(embed, blocks, head, place)
    }

    /// The model's structure with one-element placeholder parameters (the units' ids): what
    /// the trainer keeps as its `model` when the units are sharded.
    pub fn skeleton(&self) -> Llama<B> {
        Llama {
            embed_tokens: self.embed.as_ref().expect(HELD).skeleton().clone(),
            blocks: self
                .blocks
                .iter()
                .map(|b| b.as_ref().expect(HELD).skeleton().clone())
                .collect(),
            head: self.head.as_ref().expect(HELD).skeleton().clone(),
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub(super) fn baseline(&self) -> Option<&Vec<(usize, Vec<f32>)>> {
        self.baseline.as_ref()
    }

    pub(super) fn set_baseline(&mut self, baseline: Option<Vec<(usize, Vec<f32>)>>) {
        self.baseline = baseline;
    }

    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Number of weights in the units that own any of `ids` (units are trained whole).
    pub fn count_params(&self, ids: &[ParamId]) -> u64 {
        let owns = |skeleton_ids: Vec<ParamId>| skeleton_ids.iter().any(|id| ids.contains(id));
        let mut total = 0;
        if let Some(u) = &self.embed
            && owns(ParamIds::of(u.skeleton()).0)
        {
            total += u.num_values() as u64;
        }
        for u in self.blocks.iter().flatten() {
            if owns(ParamIds::of(u.skeleton()).0) {
                total += u.num_values() as u64;
            }
        }
        if let Some(u) = &self.head
            && owns(ParamIds::of(u.skeleton()).0)
        {
            total += u.num_values() as u64;
        }
        total
    }

    /// Takes LL(r)'s blocks `range` as they are (head policy `reset`, when stage 2 begins).
    pub fn take_baseline(&mut self, range: std::ops::Range<usize>) {
        self.baseline = Some(
            range
                .map(|i| {
                    (
                        i,
                        self.blocks[i].as_ref().expect(HELD).master().into_owned(),
                    )
                })
                .collect(),
        );
    }

    /// Whether LL(r)'s baseline was taken.
    pub fn has_baseline(&self) -> bool {
        self.baseline.is_some()
    }

    /// Head policy `reset`: LL's blocks return to their baseline weights and lose their AdamW
    /// state (the LM head keeps both).
    pub fn reset_to_baseline(&mut self) {
        let Some(baseline) = &self.baseline else {
            return;
        };
        for (i, master) in baseline {
            let unit = self.blocks[*i].as_mut().expect(HELD);
            unit.set_master(master.clone());
            unit.clear_optimizer();
        }
    }

    /// Early exit: keeps blocks `keep` (in order), drops the others.
    pub fn retain_blocks(&mut self, keep: &[usize]) {
        let mut blocks = std::mem::take(&mut self.blocks);
        self.blocks = keep.iter().map(|&i| blocks[i].take()).collect();
        self.baseline = None;
    }

    /// Replaces the LM head (the layer-wise baseline's fresh local head), sharded at once.
    pub fn replace_head(&mut self, head: LmHead<B>) -> LmHead<B> {
        let place = Placement {
            rank: self.rank,
            world: self.world,
            compute: self.compute.into(),
            resident: self.resident.clone(),
        };
        let unit = place.shard(head);
        let skeleton = unit.skeleton().clone();
        self.head = Some(unit);
        skeleton
    }

    /// Every unit gathered into one model as stored (fp32 masters, 16-bit frozen units); every
    /// rank must call it. For tests only.
    #[cfg(any(test, feature = "testing"))]
    pub fn gather_whole(
        &self,
        s: &mut CommStream,
    ) -> Result<Llama<B>, segprop_shard::CollectiveError> {
        let embed_tokens = self.embed.as_ref().expect(HELD).gather::<B>(s)?;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for unit in &self.blocks {
            blocks.push(unit.as_ref().expect(HELD).gather::<B>(s)?);
        }
        let head = self.head.as_ref().expect(HELD).gather::<B>(s)?;
        Ok(Llama {
            embed_tokens,
            blocks,
            head,
        })
    }

    /// Writes the model in HF layout into `dir`, one unit gathered at a time, one file per unit
    /// (`model-0000i-of-0000n.safetensors` and the index): every rank gathers, the rank given a
    /// `dir` (rank 0) writes.
    pub fn export(
        &self,
        s: &mut CommStream,
        config: &LlamaConfig,
        dir: Option<&std::path::Path>,
        dtype: Precision,
    ) -> Result<(), crate::TrainError> {
        let mut config = config.clone();
        config.num_layers = self.blocks.len();
        let mut writer = match dir {
            Some(dir) => Some(HfUnitWriter::create(dir, &config, dtype)?),
            None => None,
        };
        let embed = self.embed.as_ref().expect(HELD).gather::<B>(s)?;
        if let Some(w) = &mut writer {
            w.embed(&embed)?;
        }
        drop(embed);
        for (i, unit) in self.blocks.iter().enumerate() {
            let block = unit.as_ref().expect(HELD).gather::<B>(s)?;
            if let Some(w) = &mut writer {
                w.block(i, &block)?;
            }
        }
        let head = self.head.as_ref().expect(HELD).gather::<B>(s)?;
        if let Some(mut w) = writer {
            w.head(&head)?;
            w.finish()?;
        }
        Ok(())
    }
}

impl<B: AutodiffBackend> ShardedStage<B> {
    /// Takes the units `route` uses out of `shards`: the ones it trains become trainable (fp32
    /// masters and AdamW state; a unit of the stage's own optimizer gets fresh moments when
    /// `fresh_local`), the frozen prefix it reads and the blocks it parks are frozen (16 bits in
    /// a mixed-precision job). No collective, no unit gathered.
    pub fn take(
        shards: &mut ModelShards<B>,
        route: Route,
        trainable: &Trainable,
        adamw: segprop_shard::AdamWConfig,
        fresh_local: bool,
    ) -> Self {
        let group_of = |ids: &[ParamId]| {
            if ids.first().is_some_and(|id| trainable.head.contains(id)) {
                Group::Head
            } else {
                Group::Local
            }
        };
        let resident = shards.resident.clone();
        let train = |kind: Kind<B>| -> Unit<B> {
            let mut kind = kind;
            let group = with_unit!(&kind, u => group_of(&ParamIds::of(u.skeleton()).0));
            with_unit!(&mut kind, u => {
                u.train(adamw);
                if fresh_local && group == Group::Local {
                    u.reset_optimizer();
                }
                if let Some(device) = &resident {
                    u.to_device::<B::InnerBackend>(device);
                }
            });
            Unit { kind, group }
        };
        let freeze = |mut kind: Kind<B>| -> Unit<B> {
            with_unit!(&mut kind, u => {
                u.to_host();
                u.freeze();
            });
            Unit {
                kind,
                group: Group::Local,
            }
        };
        let (trained, head_blocks) = route.blocks();
        let mut units = Vec::new();
        let mut prefix = Vec::new();
        match route.input() {
            RouteInput::Embed => units.push(train(Kind::Embed(shards.embed.take().expect(HELD)))),
            RouteInput::Prefix { depth } => {
                prefix.push(freeze(Kind::Embed(shards.embed.take().expect(HELD))));
                for index in 0..depth {
                    let unit = shards.blocks[index].take().expect(HELD);
                    prefix.push(freeze(Kind::Block(index, unit)));
                }
            }
        }
        for index in trained.chain(head_blocks) {
            let unit = shards.blocks[index].take().expect(HELD);
            units.push(train(Kind::Block(index, unit)));
        }
        units.push(train(Kind::Head(shards.head.take().expect(HELD))));
        let mut parked = Vec::new();
        for (index, slot) in shards.blocks.iter_mut().enumerate() {
            if let Some(unit) = slot.take() {
                parked.push(freeze(Kind::Block(index, unit)));
            }
        }
        Self::assemble_stage(units, prefix, parked, route, (shards.rank, shards.world))
    }

    /// Puts the stage's units back into `shards` (the stage's end; nothing gathered).
    pub fn put_back(self, shards: &mut ModelShards<B>) {
        for unit in self.units.into_iter().chain(self.prefix).chain(self.parked) {
            match unit.kind {
                Kind::Embed(u) => shards.embed = Some(u),
                Kind::Block(i, u) => shards.blocks[i] = Some(u),
                Kind::Head(u) => shards.head = Some(u),
            }
        }
    }
}
