//! AdamW on a rank's flat fp32 shard, and gradient clipping over the global norm of sharded
//! gradients.
//!
//! [`ShardedAdamW`] performs exactly the operations of burn's `AdamW` (burn-optim 0.21:
//! bias-corrected moments, `m̂ / (√v̂ + ε)`, decoupled weight decay `p·(1 − lr·wd)`, no amsgrad),
//! element by element, so a unit sharded over N ranks is updated with the same bits as the
//! unsharded parameter (tested against burn). Each rank keeps only its chunk of the master
//! weights and of both moments: the optimizer state per rank is `1/N` of the unit's.
//!
//! Clipping follows the engine (`segprop-train`): when the global L2 norm of all gradients
//! exceeds `clip`, every gradient is scaled by `clip / (norm + 1e-6)`. With sharded gradients
//! each rank sums the squares of its real (non-padding) elements and one all-reduce gives the
//! global sum.

use crate::collective::{Collective, CollectiveError};

/// AdamW hyper-parameters (the learning rate is given per step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// burn's `AdamWConfig` defaults.
    fn default() -> Self {
        Self {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-5,
            weight_decay: 1e-4,
        }
    }
}

/// AdamW state of one rank's shard: first and second moments and the step count.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardedAdamW {
    pub config: AdamWConfig,
    pub moment_1: Vec<f32>,
    pub moment_2: Vec<f32>,
    pub time: i32,
}

impl ShardedAdamW {
    /// State for a shard of `len` elements (no step taken yet).
    pub fn new(config: AdamWConfig, len: usize) -> Self {
        Self {
            config,
            moment_1: vec![0.0; len],
            moment_2: vec![0.0; len],
            time: 0,
        }
    }

    /// Bytes of optimizer state held (both moments, fp32).
    #[cfg(test)]
    pub fn state_bytes(&self) -> u64 {
        ((self.moment_1.len() + self.moment_2.len()) * 4) as u64
    }

    /// One step: `master -= lr · AdamW(grad)`, in place.
    pub fn step(&mut self, lr: f64, master: &mut [f32], grad: &[f32]) {
        assert_eq!(
            master.len(),
            grad.len(),
            "master and gradient shards differ"
        );
        assert_eq!(master.len(), self.moment_1.len(), "state of another shard");
        let c = self.config;
        let (factor_1, factor_2) = (1.0 - c.beta_1, 1.0 - c.beta_2);
        let first = self.time == 0;
        self.time += 1;
        let correction_1 = 1f32 - c.beta_1.powi(self.time);
        let correction_2 = 1f32 - c.beta_2.powi(self.time);
        let decay_rate = lr * f64::from(c.weight_decay);
        let keep = (1.0 - decay_rate) as f32;
        let lr = lr as f32;
        for i in 0..master.len() {
            let g = grad[i];
            let (m, v) = if first {
                (g * factor_1, g * g * factor_2)
            } else {
                (
                    self.moment_1[i] * c.beta_1 + g * factor_1,
                    self.moment_2[i] * c.beta_2 + g * g * factor_2,
                )
            };
            self.moment_1[i] = m;
            self.moment_2[i] = v;
            let delta = (m / correction_1) / ((v / correction_2).sqrt() + c.epsilon);
            let p = if decay_rate == 0.0 {
                master[i]
            } else {
                master[i] * keep
            };
            master[i] = p - delta * lr;
        }
    }
}

/// Global L2 norm of gradients sharded over the group: `local` is the sum of the squares of this
/// rank's gradient shards (their real, non-padding elements: `Flat::sum_squares`).
pub fn global_grad_norm(
    collective: &mut dyn Collective,
    local: f32,
) -> Result<f64, CollectiveError> {
    let mut total = [local];
    collective.all_reduce(&mut total)?;
    Ok(f64::from(total[0]).sqrt())
}

/// The engine's clipping rule: the factor to scale every gradient by, if any.
pub fn clip_factor(norm: f64, clip: Option<f64>) -> Option<f64> {
    clip.filter(|c| norm > *c).map(|c| c / (norm + 1e-6))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use burn::backend::{Autodiff, NdArray};
    use burn::module::{Module, Param};
    use burn::optim::{GradientsParams, Optimizer};
    use burn::tensor::{Tensor, TensorData};

    use super::*;
    use crate::flat::ShardLayout;
    use crate::thread::thread_group;

    type Ad = Autodiff<NdArray>;

    #[derive(Module, Debug)]
    struct Flat<B: burn::tensor::backend::Backend> {
        w: Param<Tensor<B, 1>>,
    }

    fn grads(step: usize, len: usize, rank: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 31 + step * 17 + rank * 7) % 101) as f32 - 50.0) * 0.013)
            .collect()
    }

    #[test]
    fn flat_adamw_matches_burns_adamw_bit_for_bit() {
        let len = 37;
        let config = AdamWConfig {
            beta_1: 0.9,
            beta_2: 0.95,
            epsilon: 1e-8,
            weight_decay: 0.1,
        };
        let device = Default::default();
        let init: Vec<f32> = (0..len).map(|i| (i as f32 - 18.0) * 0.05).collect();
        let mut module = Flat::<Ad> {
            w: Param::from_tensor(
                Tensor::from_data(TensorData::new(init.clone(), [len]), &device).require_grad(),
            ),
        };
        let mut burn_opt = burn::optim::AdamWConfig::new()
            .with_beta_1(config.beta_1)
            .with_beta_2(config.beta_2)
            .with_epsilon(config.epsilon)
            .with_weight_decay(config.weight_decay)
            .init::<Ad, Flat<Ad>>();
        let mut master = init;
        let mut flat = ShardedAdamW::new(config, len);
        for step in 0..12 {
            let lr = 3e-3 * (1.0 + step as f64 * 0.1);
            let g = grads(step, len, 0);
            // loss = Σ w·g has gradient g.
            let constant = Tensor::<Ad, 1>::from_data(TensorData::new(g.clone(), [len]), &device);
            let loss = (module.w.val() * constant).sum();
            let gradients = GradientsParams::from_grads::<Ad, _>(loss.backward(), &module);
            module = burn_opt.step(lr, module, gradients);
            flat.step(lr, &mut master, &g);
            let burn_w: Vec<f32> = module.w.val().into_data().to_vec().unwrap();
            assert_eq!(burn_w, master, "step {step}");
        }
    }

    #[test]
    fn sharded_steps_with_clipping_match_one_rank_for_uneven_units() {
        let config = AdamWConfig::default();
        let clip = Some(0.5);
        for world in [2usize, 3, 4, 8] {
            let len = 45; // not a multiple of any world above
            let layout = ShardLayout::new(len, world);
            let init: Vec<f32> = (0..len).map(|i| i as f32 * 0.01).collect();
            // The reference: one rank, the summed gradient of every rank's micro-batch.
            let mut reference = init.clone();
            let mut ref_opt = ShardedAdamW::new(config, len);
            for step in 0..10 {
                let summed: Vec<f32> = (0..len)
                    .map(|i| (0..world).map(|r| grads(step, len, r)[i]).sum())
                    .collect();
                let norm = f64::from(summed.iter().map(|x| x * x).sum::<f32>()).sqrt();
                let g: Vec<f32> = match clip_factor(norm, clip) {
                    Some(f) => summed.iter().map(|x| (f64::from(*x) * f) as f32).collect(),
                    None => summed,
                };
                ref_opt.step(1e-2, &mut reference, &g);
            }
            let threads: Vec<_> = thread_group(world, Duration::from_secs(10))
                .into_iter()
                .map(|mut c| {
                    let init = init.clone();
                    std::thread::spawn(move || {
                        let rank = c.rank();
                        let mut master = layout.shard(&init, rank);
                        let mut opt = ShardedAdamW::new(config, layout.chunk);
                        for step in 0..10 {
                            let mut shard = layout
                                .reduce_scatter(&mut c, &grads(step, len, rank))
                                .unwrap();
                            let local = shard[..layout.valid(rank)].iter().map(|x| x * x).sum();
                            let norm = global_grad_norm(&mut c, local).unwrap();
                            if let Some(f) = clip_factor(norm, clip) {
                                shard
                                    .iter_mut()
                                    .for_each(|x| *x = (f64::from(*x) * f) as f32);
                            }
                            opt.step(1e-2, &mut master, &shard);
                        }
                        (
                            opt.state_bytes(),
                            layout.all_gather(&mut c, &master).unwrap(),
                        )
                    })
                })
                .collect();
            for t in threads {
                let (state_bytes, gathered) = t.join().unwrap();
                assert_eq!(
                    state_bytes,
                    (2 * layout.chunk * 4) as u64,
                    "1/N of the state"
                );
                for (i, (a, b)) in gathered.iter().zip(&reference).enumerate() {
                    let rel = (a - b).abs() / b.abs().max(1e-3);
                    assert!(rel < 1e-5, "world {world} element {i}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn clipping_rule_matches_the_engine() {
        assert_eq!(clip_factor(0.4, Some(0.5)), None);
        assert_eq!(clip_factor(2.0, None), None);
        let f = clip_factor(2.0, Some(0.5)).unwrap();
        assert!((f - 0.5 / (2.0 + 1e-6)).abs() < 1e-15);
    }
}
