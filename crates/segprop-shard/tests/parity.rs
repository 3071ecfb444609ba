//! Data-parallel FSDP parity on a tiny LLaMA: N CPU ranks (threads), each unit (embedding, every
//! block, the head) sharded 1/N, gathered for forward/backward and freed, gradients
//! reduce-scattered, clipped over the global norm, AdamW on the shards — against one rank that
//! holds everything and accumulates the same N micro-batches. The loss curves agree within 1e-5
//! relative and the final weights within 1e-5.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use burn::backend::{Autodiff, NdArray};
use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor, TensorData};
use segprop_model::model::cross_entropy;
use segprop_model::{Block, Llama, LlamaConfig, LlamaInit};
use segprop_shard::unit::{FsdpUnit, flatten, flatten_grads};
use segprop_shard::{AdamWConfig, Collective, clip_factor, global_grad_norm, thread_group};

type Ad = Autodiff<NdArray>;

const STEPS: usize = 4;
const BATCH: usize = 2;
const SEQ: usize = 16;
const LR: f64 = 3e-3;
const CLIP: Option<f64> = Some(0.5);

fn config() -> LlamaConfig {
    let mut c = LlamaConfig::preset("tiny").unwrap();
    c.num_layers = 2;
    c
}

/// Micro-batch `micro` of step `step`: inputs and next-token targets.
fn batch(step: usize, micro: usize) -> (Tensor<Ad, 2, Int>, Tensor<Ad, 2, Int>) {
    let device = Default::default();
    let tokens: Vec<i64> = (0..BATCH * (SEQ + 1))
        .map(|i| ((i * 37 + step * 101 + micro * 53) % 251) as i64)
        .collect();
    let mut inputs = Vec::new();
    let mut targets = Vec::new();
    for row in tokens.chunks(SEQ + 1) {
        inputs.extend_from_slice(&row[..SEQ]);
        targets.extend_from_slice(&row[1..]);
    }
    (
        Tensor::from_data(TensorData::new(inputs, [BATCH, SEQ]), &device),
        Tensor::from_data(TensorData::new(targets, [BATCH, SEQ]), &device),
    )
}

/// The units of one rank: embedding, each block, head.
struct Units {
    embed: FsdpUnit<burn::nn::Embedding<Ad>>,
    blocks: Vec<FsdpUnit<Block<Ad>>>,
    head: FsdpUnit<segprop_model::LmHead<Ad>>,
}

impl Units {
    fn new(rank: usize, world: usize) -> Self {
        let model = LlamaInit::random::<Ad>(&config(), 7, &Default::default());
        let adamw = AdamWConfig {
            weight_decay: 0.01,
            ..AdamWConfig::default()
        };
        Self {
            embed: FsdpUnit::new::<Ad>(model.embed_tokens, rank, world, adamw),
            blocks: model
                .blocks
                .into_iter()
                .map(|b| FsdpUnit::new::<Ad>(b, rank, world, adamw))
                .collect(),
            head: FsdpUnit::new::<Ad>(model.head, rank, world, adamw),
        }
    }

    fn gather(&self, c: &mut dyn Collective) -> Llama<Ad> {
        Llama {
            embed_tokens: self.embed.gather::<Ad>(c).unwrap(),
            blocks: self
                .blocks
                .iter()
                .map(|b| b.gather::<Ad>(c).unwrap())
                .collect(),
            head: self.head.gather::<Ad>(c).unwrap(),
        }
    }

    /// Gradient shards of every unit (same order as the units).
    fn reduce_scatter(
        &self,
        c: &mut dyn Collective,
        model: &Llama<Ad>,
        grads: &GradientsParams,
    ) -> Vec<Vec<f32>> {
        let mut out = vec![
            self.embed
                .reduce_scatter_grads::<Ad>(c, &model.embed_tokens, grads)
                .unwrap(),
        ];
        for (unit, block) in self.blocks.iter().zip(&model.blocks) {
            out.push(unit.reduce_scatter_grads::<Ad>(c, block, grads).unwrap());
        }
        out.push(
            self.head
                .reduce_scatter_grads::<Ad>(c, &model.head, grads)
                .unwrap(),
        );
        out
    }

    fn valid(&self) -> Vec<usize> {
        let mut v = vec![self.embed.valid()];
        v.extend(self.blocks.iter().map(FsdpUnit::valid));
        v.push(self.head.valid());
        v
    }

    fn step(&mut self, c: &mut dyn Collective, mut shards: Vec<Vec<f32>>) {
        let valid = self.valid();
        let local: f32 = shards
            .iter()
            .zip(valid)
            .map(|(s, valid)| s[..valid].iter().map(|x| x * x).sum::<f32>())
            .sum();
        let norm = global_grad_norm(c, local).unwrap();
        if let Some(f) = clip_factor(norm, CLIP) {
            for s in &mut shards {
                s.iter_mut().for_each(|x| *x = (f64::from(*x) * f) as f32);
            }
        }
        let mut shards = shards.into_iter();
        self.embed.step(LR, &shards.next().unwrap());
        for b in &mut self.blocks {
            b.step(LR, &shards.next().unwrap());
        }
        self.head.step(LR, &shards.next().unwrap());
    }
}

/// Sharded over `world` thread ranks; rank r trains on micro-batch r. Returns the per-step
/// global loss (mean over micro-batches) and the final weights.
fn sharded(world: usize) -> (Vec<f64>, Vec<f32>) {
    let threads: Vec<_> = thread_group(world, Duration::from_secs(60))
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let rank = c.rank();
                let mut units = Units::new(rank, world);
                let mut losses = Vec::new();
                for step in 0..STEPS {
                    let model = units.gather(&mut c);
                    let (inputs, targets) = batch(step, rank);
                    let loss = cross_entropy(model.forward(inputs, &config()), targets)
                        .mul_scalar(1.0 / world as f64);
                    let mut total = [loss.clone().into_scalar()];
                    c.all_reduce(&mut total).unwrap();
                    losses.push(f64::from(total[0]));
                    let grads = GradientsParams::from_grads::<Ad, _>(loss.backward(), &model);
                    let shards = units.reduce_scatter(&mut c, &model, &grads);
                    drop(model); // the gathered weights are freed after use
                    units.step(&mut c, shards);
                }
                let final_model = units.gather(&mut c);
                (losses, flatten::<Ad, _>(&final_model), c.stats())
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (losses, weights, _) in &results[1..] {
        assert_eq!(losses, &results[0].0, "every rank sees the same losses");
        assert_eq!(
            weights, &results[0].1,
            "every rank gathers the same weights"
        );
    }
    let (losses, weights, _) = results.into_iter().next().unwrap();
    (losses, weights)
}

/// One rank holding every unit whole, accumulating the `micro` micro-batches in order.
fn unsharded(micro: usize) -> (Vec<f64>, Vec<f32>) {
    let mut group = thread_group(1, Duration::from_secs(60));
    let c = &mut group[0];
    let mut units = Units::new(0, 1);
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let model = units.gather(c);
        let mut sum: Option<Vec<Vec<f32>>> = None;
        let mut loss_sum = 0.0f32;
        for m in 0..micro {
            let (inputs, targets) = batch(step, m);
            let loss = cross_entropy(model.forward(inputs, &config()), targets)
                .mul_scalar(1.0 / micro as f64);
            loss_sum += loss.clone().into_scalar();
            let grads = GradientsParams::from_grads::<Ad, _>(loss.backward(), &model);
            let mut parts = vec![flatten_grads::<Ad, _>(&model.embed_tokens, &grads)];
            parts.extend(
                model
                    .blocks
                    .iter()
                    .map(|b| flatten_grads::<Ad, _>(b, &grads)),
            );
            parts.push(flatten_grads::<Ad, _>(&model.head, &grads));
            sum = Some(match sum {
                None => parts,
                Some(mut acc) => {
                    for (a, p) in acc.iter_mut().zip(parts) {
                        a.iter_mut().zip(p).for_each(|(x, y)| *x += y);
                    }
                    acc
                }
            });
        }
        losses.push(f64::from(loss_sum));
        units.step(c, sum.unwrap());
    }
    let final_model = units.gather(c);
    (losses, flatten::<Ad, _>(&final_model))
}

fn assert_close(what: &str, a: &[f64], b: &[f64]) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let rel = (x - y).abs() / y.abs().max(1e-12);
        assert!(rel < 1e-5, "{what} step {i}: {x} vs {y} (rel {rel:e})");
    }
}

#[test]
fn sharded_training_matches_one_rank_for_2_4_and_8_ranks() {
    for world in [2usize, 4, 8] {
        let (ref_losses, ref_weights) = unsharded(world);
        let (losses, weights) = sharded(world);
        assert_close(&format!("{world} ranks: loss"), &losses, &ref_losses);
        let worst = weights
            .iter()
            .zip(&ref_weights)
            .map(|(a, b)| f64::from((a - b).abs()))
            .fold(0.0, f64::max);
        assert!(
            worst < 1e-5,
            "{world} ranks: weights differ by up to {worst:e}"
        );
        let worst_loss = losses
            .iter()
            .zip(&ref_losses)
            .map(|(a, b)| (a - b).abs() / b.abs())
            .fold(0.0, f64::max);
        eprintln!("{world} ranks: worst loss rel diff {worst_loss:e}, worst weight diff {worst:e}");
        // Training moved the weights.
        let mut group = thread_group(1, Duration::from_secs(10));
        let initial = flatten::<Ad, _>(&Units::new(0, 1).gather(&mut group[0]));
        let moved = initial
            .iter()
            .zip(&ref_weights)
            .map(|(a, b)| f64::from((a - b).abs()))
            .fold(0.0, f64::max);
        assert!(moved > 1e-3, "weights moved by at most {moved:e}");
    }
}

#[test]
fn a_rank_holds_one_nth_of_each_unit() {
    let world = 4;
    let units = Units::new(1, world);
    let full = Units::new(0, 1);
    let m = units.blocks[0].memory();
    let whole = full.blocks[0].memory();
    assert_eq!(m.params, whole.params.div_ceil(4 * world as u64) * 4);
    assert_eq!(m.optimizer, 2 * m.params);
    assert_eq!(m.gathered, whole.params);
}

/// A frozen unit sharded in 16 bits: every rank holds 2 bytes per weight of its chunk, the
/// all-gather moves 2 bytes per weight, and the gathered block is the bf16 (f16) rounding of the
/// original, bit for bit, in that dtype; odd lengths and odd rank counts included.
#[test]
fn frozen_16_bit_units_gather_the_rounded_weights_in_half_the_bytes() {
    use burn::backend::Flex;
    use burn::module::Module;
    use burn::tensor::{DType, FloatDType};

    let model = LlamaInit::random::<Flex>(&config(), 9, &Default::default());
    let block = model.blocks[0].clone();
    let want = flatten::<Flex, _>(&block);
    let n = want.len();
    for (dtype, world) in [(FloatDType::BF16, 3), (FloatDType::F16, 2)] {
        let rounded: Vec<u32> = want
            .iter()
            .map(|v| match dtype {
                FloatDType::BF16 => burn::tensor::bf16::from_f32(*v).to_f32().to_bits(),
                _ => burn::tensor::f16::from_f32(*v).to_f32().to_bits(),
            })
            .collect();
        let groups = thread_group(world, Duration::from_secs(10));
        let handles: Vec<_> = groups
            .into_iter()
            .enumerate()
            .map(|(rank, mut c)| {
                let block = block.clone();
                std::thread::spawn(move || {
                    let unit = FsdpUnit::frozen_in::<Flex>(block, rank, world, dtype);
                    let memory = unit.memory();
                    let before = c.stats().total_wire_bytes();
                    let gathered = unit.gather::<Flex>(&mut c).unwrap();
                    let moved = c.stats().total_wire_bytes() - before;
                    let w = gathered.mlp.up_proj.weight.val();
                    let bits: Vec<u32> = flatten::<Flex, _>(&gathered)
                        .iter()
                        .map(|v| v.to_bits())
                        .collect();
                    (memory, moved, w.dtype(), bits, gathered.num_params())
                })
            })
            .collect();
        for h in handles {
            let (memory, moved, got_dtype, bits, params) = h.join().unwrap();
            assert_eq!(params, n);
            assert_eq!(got_dtype, DType::from(dtype));
            assert_eq!(bits, rounded, "{dtype:?} on {world} ranks");
            // 2 bytes per weight held (1/world of them, words padded) and gathered.
            let words = n.div_ceil(2);
            assert_eq!(memory.params, (words.div_ceil(world) * 4) as u64);
            assert_eq!(memory.gathered, 2 * n as u64);
            let padded = words.div_ceil(world) * world;
            assert_eq!(moved, (padded * 4 * (world - 1) / world) as u64);
        }
    }
}
