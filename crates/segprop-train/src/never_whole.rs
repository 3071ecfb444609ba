//! What a trainer whose units stay sharded between stages ([`Trainer::new_sharded`]) does
//! around its stages, one unit gathered at a time: evaluation, SnapCheck advances, LL(r)'s
//! baseline and reset, early-exit pruning, the layer-wise baseline's fresh head, the final
//! evaluation and the export. Every rank of the gang calls each of these at the same point.

use std::path::Path;

use segprop_core::JobSpec;

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::data::Batch;
use crate::engine::Trainer;
use crate::error::TrainError;
use crate::rank::ShardRank;
use crate::route::{Route, RouteInput};
use crate::sharded::{Flow, ModelShards, ShardedStage};
use crate::snapcheck::Split;

/// One batch's `S[to]` from an advance, and whether it was advanced from `S[from]` (`true`)
/// or recomputed through the prefix.
pub type AdvancedSnapshot<B> = (Tensor<<B as AutodiffBackend>::InnerBackend, 3>, bool);

const SHARDED: &str = "a trainer with sharded units has a shard rank";

impl<B: AutodiffBackend> Trainer<B> {
    /// A trainer for rank `shard` that continues from the sharded checkpoint or stage state in
    /// `dir` ([`crate::checkpoint::save_sharded`], written at any world size): its units are
    /// laid out blank one at a time and filled from the rank files, so neither the seeded init
    /// nor the HF import runs again (an HF job reads only its `config.json`). `verified`: the
    /// rank files were already checked against the manifest ([`crate::checkpoint::preflight`]),
    /// so this rank does not read every file again to hash it.
    pub fn resume_sharded(
        spec: JobSpec,
        device: B::Device,
        work_dir: &Path,
        shard: ShardRank,
        dir: &Path,
        verified: bool,
    ) -> Result<Self, TrainError> {
        crate::precision::check_backend::<B>(spec.resources.precision, &device)?;
        let compute = crate::precision::compute_dtype(spec.resources.precision);
        let config = match &spec.model.from {
            Some(from) => {
                let mut config = segprop_model::hf_format::read_config(&from.hf_dir)
                    .map_err(TrainError::Checkpoint)?;
                config.tie_embeddings = false;
                spec.validate_against_model(&config)?;
                spec.check_tokenizer(&config)?;
                config
            }
            None => Self::resolve_config(&spec)?,
        };
        let place = crate::sharded::Placement::of(&shard, compute, &device);
        let shards = ModelShards::blank(&config, place, &device);
        let model = shards.skeleton();
        let mut trainer = Self::with_model(spec, device, work_dir, model, config, Some(shards))?;
        trainer.shard = Some(shard);
        crate::checkpoint::load_sharded(&mut trainer, dir, !verified)?;
        Ok(trainer)
    }

    /// The eval batches this rank evaluates: `rank, rank + N, …` of the first
    /// `eval.max_batches`.
    fn my_eval_batches(&self) -> Vec<Batch> {
        let shard = self.shard.as_ref().expect(SHARDED);
        let limit = match self.spec.eval.max_batches {
            0 => self.data.eval.len(),
            n => n.min(self.data.eval.len()),
        };
        self.data.eval[..limit]
            .iter()
            .skip(shard.rank())
            .step_by(shard.world())
            .cloned()
            .collect()
    }

    fn targets(&self, batches: &[Batch]) -> Vec<Tensor<B::InnerBackend, 2, Int>> {
        batches
            .iter()
            .map(|b| Self::tokens::<B::InnerBackend>(&b.targets, b, &self.device))
            .collect()
    }

    fn inputs(&self, batches: &[Batch]) -> Vec<Tensor<B::InnerBackend, 2, Int>> {
        batches
            .iter()
            .map(|b| Self::tokens::<B::InnerBackend>(&b.inputs, b, &self.device))
            .collect()
    }

    /// The mean loss over the eval batches, from each rank's `losses` of its batches
    /// ([`Self::my_eval_batches`]): every rank all-gathers every batch's f64 loss (its bits,
    /// two words each) and sums them in batch order, as an unsharded trainer does, so the
    /// result is the same bits.
    fn mean_over_ranks(&mut self, losses: Vec<f64>) -> Result<f64, TrainError> {
        let limit = match self.spec.eval.max_batches {
            0 => self.data.eval.len(),
            n => n.min(self.data.eval.len()),
        };
        let world = self.shard.as_ref().expect(SHARDED).world();
        let mut bits = vec![0u64; limit.div_ceil(world)];
        for (slot, loss) in bits.iter_mut().zip(&losses) {
            *slot = loss.to_bits();
        }
        let all = self.all_gather_u64(&bits)?;
        let losses: Vec<f64> = (0..limit)
            .map(|i| f64::from_bits(all[i % world][i / world]))
            .collect();
        Ok(crate::data::held_out_mean(
            &losses,
            &self.data.eval[..limit],
        ))
    }

    /// Held-out loss of a sharded stage's route: each rank evaluates its share of the eval
    /// batches, the route's input read from SnapCheck or run through the sharded frozen prefix,
    /// then the trained units one at a time.
    pub(crate) fn evaluate_sharded(
        &mut self,
        stage: &mut ShardedStage<B>,
        route: Route,
    ) -> Result<f64, TrainError> {
        let batches = self.my_eval_batches();
        let targets = self.targets(&batches);
        let flow = match route.input() {
            RouteInput::Embed => Flow::Tokens(self.inputs(&batches)),
            RouteInput::Prefix { depth } => {
                let mut shard = self.shard.take().expect(SHARDED);
                let refs: Vec<&Batch> = batches.iter().collect();
                let z = self.sharded_prefix(stage, &mut shard, (depth, Split::Eval), &refs);
                self.shard = Some(shard);
                Flow::Hidden(z?)
            }
        };
        let shard = self.shard.as_ref().expect(SHARDED);
        let losses = stage.route_losses(
            &shard.collective,
            flow,
            &targets,
            &self.adapter,
            &self.rope_inner,
        )?;
        self.mean_over_ranks(losses)
    }

    /// Held-out loss of the whole model (full forward, no snapshots), one unit at a time.
    pub(crate) fn evaluate_full_sharded(&mut self) -> Result<f64, TrainError> {
        let batches = self.my_eval_batches();
        let (tokens, targets) = (self.inputs(&batches), self.targets(&batches));
        let shard = self.shard.as_ref().expect(SHARDED);
        let shards = self.shards.as_ref().expect("a sharded trainer");
        let losses = shards.full_losses(&shard.collective, tokens, &targets, &self.rope_inner)?;
        self.mean_over_ranks(losses)
    }

    /// `S[to] = F_{from:to}(S[from])` for every cached batch, block by block: each block of
    /// the segment is gathered, run over every snapshot, and freed before the next.
    pub(crate) fn advance_sharded(&mut self, from: usize, to: usize) -> Result<(), TrainError> {
        let (Some(cache), Some(shards), Some(shard)) = (
            self.cache.as_mut(),
            self.shards.as_ref(),
            self.shard.as_ref(),
        ) else {
            return Ok(());
        };
        let rope = &self.rope_inner;
        let spill = self.work_dir.join("snapshots");
        shards.for_each_block(&shard.collective, from..to, &spill, |b, block| {
            cache.advance_step(b, |z| block.forward(z, rope), b + 1 == to)
        })
    }

    /// SnapCheck's advance step for a few batches of this rank, as a gang: `S[to]` for each of
    /// `batches`, from `S[from]` where the cache (or its store source) has it, else from the
    /// tokens through the committed prefix (the same bits). Every rank calls it at the same
    /// point, with batches of its own or none: the ranks agree whether any of them needs the
    /// prefix, then gather the embedding (if so) and each block one at a time. Returns each
    /// batch's `S[to]` and whether it was advanced (`true`) or recomputed.
    pub fn advance_batches_sharded(
        &mut self,
        from: usize,
        to: usize,
        batches: &[(Split, &Batch)],
    ) -> Result<Vec<AdvancedSnapshot<B>>, TrainError> {
        use crate::sharded::Entry;
        use crate::snapcheck::SnapshotKey;
        let mut inputs = Vec::with_capacity(batches.len());
        let mut advanced = Vec::with_capacity(batches.len());
        for (split, batch) in batches {
            let cached = match (&mut self.cache, from) {
                (Some(cache), 1..) => cache.get(SnapshotKey {
                    depth: from,
                    split: *split,
                    id: batch.id,
                }),
                _ => None,
            };
            advanced.push(cached.is_some());
            inputs.push(match cached {
                Some(z) => Entry::Hidden(from, z),
                None => Entry::Tokens(Self::tokens::<B::InnerBackend>(
                    &batch.inputs,
                    batch,
                    &self.device,
                )),
            });
        }
        let shard = self.shard.as_mut().expect(SHARDED);
        let mut recompute = [advanced.iter().filter(|a| !**a).count() as f32];
        segprop_shard::Collective::all_reduce(&mut shard.collective, &mut recompute)?;
        let from_embed = recompute[0] > 0.0;
        let first = if from_embed { 0 } else { from };
        let shards = self.shards.as_ref().expect("a sharded trainer");
        let out = shards.forward_to(
            &shard.collective,
            inputs,
            (from_embed, first, to),
            &self.rope_inner,
        )?;
        Ok(out.into_iter().zip(advanced).collect())
    }

    /// Sums `values` over the ranks of the gang (every rank calls it with as many), exactly.
    pub fn sum_over_ranks(&mut self, values: &[u64]) -> Result<Vec<u64>, TrainError> {
        let all = self.all_gather_u64(values)?;
        Ok((0..values.len())
            .map(|i| all.iter().map(|rank| rank[i]).sum())
            .collect())
    }

    /// Every rank's `values` (every rank calls it with as many), bit for bit: each 64-bit value
    /// travels as two f32 words of its bits, which a gather copies without arithmetic.
    fn all_gather_u64(&mut self, values: &[u64]) -> Result<Vec<Vec<u64>>, TrainError> {
        let shard = self.shard.as_mut().expect(SHARDED);
        let (world, n) = (shard.world(), values.len());
        let words: Vec<f32> = values
            .iter()
            .flat_map(|v| [f32::from_bits(*v as u32), f32::from_bits((*v >> 32) as u32)])
            .collect();
        let layout = segprop_shard::ShardLayout {
            len: 2 * n * world,
            world,
            chunk: 2 * n,
        };
        let all = layout.all_gather(&mut shard.collective, &words)?;
        Ok(all
            .chunks(2 * n.max(1))
            .take(world)
            .map(|rank| {
                rank.chunks_exact(2)
                    .map(|w| u64::from(w[0].to_bits()) | (u64::from(w[1].to_bits()) << 32))
                    .collect()
            })
            .collect())
    }

    /// The final evaluation of a finished plan (full forward): one unit at a time when the
    /// units are sharded (every rank calls it), else on the whole model.
    pub fn final_eval(&mut self) -> Result<f64, TrainError> {
        if self.shards.is_some() {
            return self.evaluate_full_sharded();
        }
        Ok(self.evaluate_full_model())
    }

    /// Exports the model in HF layout into `dir`. Sharded units: every rank gathers one unit at
    /// a time and rank 0 writes it to a file of its own, with an index. Whole: one file, or
    /// files of at most `max_shard_bytes`.
    pub fn export_model(
        &mut self,
        dir: &Path,
        max_shard_bytes: Option<u64>,
    ) -> Result<(), TrainError> {
        let precision = self.spec.resources.precision;
        match self.shards.as_ref() {
            Some(shards) => {
                let shard = self.shard.as_mut().expect(SHARDED);
                shards.export(&mut shard.collective, &self.config, Some(dir), precision)?;
            }
            None => {
                segprop_model::hf::export(
                    &self.model,
                    &self.config,
                    dir,
                    max_shard_bytes,
                    precision,
                )?;
            }
        }
        if self.shard.as_ref().is_none_or(|s| s.rank() == 0) {
            self.copy_tokenizer(dir)?;
        }
        Ok(())
    }

    /// Copies the job's Hugging Face tokenizer files (`tokenizer.json` and the config files
    /// beside it) into the export, so the exported directory loads with its tokenizer as the
    /// checkpoint it was fine-tuned from did.
    fn copy_tokenizer(&self, dir: &Path) -> Result<(), TrainError> {
        let Some(hf) = self.data.tokenizer.hf() else {
            return Ok(());
        };
        for name in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
            "chat_template.jinja",
        ] {
            let from = hf.path.with_file_name(name);
            if from.is_file() {
                let to = dir.join(name);
                std::fs::copy(&from, &to).map_err(TrainError::io(&to))?;
            }
        }
        Ok(())
    }

    /// A mid-stage checkpoint of a trainer with sharded units: every rank writes its own shard
    /// file ([`crate::checkpoint::save_sharded`]) into the checkpointer's directory.
    pub(crate) fn save_sharded_checkpoint(
        &mut self,
        stage: &ShardedStage<B>,
        progress: &crate::engine::StageProgress,
    ) -> Result<(), TrainError> {
        let Some(mut checkpointer) = self.checkpointer.take() else {
            return Ok(());
        };
        let saved = match checkpointer.sharded_dir(progress) {
            Some(dir) => crate::checkpoint::save_sharded(self, Some((stage, progress)), &dir)
                .and_then(
                    |digest| match self.shard.as_ref().is_some_and(|s| s.rank() == 0) {
                        true => checkpointer.sharded_saved(&dir, &digest, progress),
                        false => Ok(()),
                    },
                ),
            None => Err(TrainError::State {
                path: self.work_dir.clone(),
                message: "this job keeps its units sharded, and its checkpointer writes whole \
                          checkpoints only"
                    .into(),
            }),
        };
        self.checkpointer = Some(checkpointer);
        saved
    }

    /// A follower rank's part in the end of a run whose units are sharded: the final
    /// evaluation and the export, which gather every unit on every rank (rank 0 writes).
    pub fn follow_finish(&mut self) -> Result<(), TrainError> {
        if self.shards.is_none() {
            return Ok(());
        }
        self.evaluate_full_sharded()?;
        let precision = self.spec.resources.precision;
        let shards = self.shards.as_ref().expect("a sharded trainer");
        let shard = self.shard.as_mut().expect(SHARDED);
        shards.export(&mut shard.collective, &self.config, None, precision)
    }

    /// The model whole (every rank calls it; each gathers every unit). Only for comparing
    /// weights in tests: a sharded job never does this itself.
    #[cfg(any(test, feature = "testing"))]
    pub fn gather_model(&mut self) -> Result<segprop_model::Llama<B>, TrainError> {
        let Some(shards) = self.shards.as_ref() else {
            return Ok(self.model.clone());
        };
        let shard = self.shard.as_mut().expect(SHARDED);
        Ok(shards.gather_whole(&mut shard.collective)?)
    }
}
