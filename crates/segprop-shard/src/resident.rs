//! Where a rank keeps its chunk of a unit: host memory or the rank's device.
//!
//! - **Host** (`sharding.offload: cpu`, FSDP + CPU offload; the only choice of CPU ranks): the
//!   chunk of the fp32 master weights and both AdamW moments are `Vec<f32>`, stepped by the host
//!   [`ShardedAdamW`].
//! - **Device** (`sharding.offload: none`): the same three buffers are 1-d tensors on the rank's
//!   device ([`DeviceShard`]), stepped there by AdamW as tensor operations, the operations of
//!   burn's own `AdamW` in the same order: on the CPU backends the bits are those of the host
//!   step (tested), so the device path is proven on CPU before it runs on a GPU.
//!
//! Both keep the same state; a unit moves between them with [`DeviceShard::upload`] and
//! [`DeviceShard::download`]. A device chunk's all-gather and its gradient's reduce-scatter run
//! on device tensors (`crate::device`: NCCL on their device buffers, staged through the host
//! elsewhere) and [`OnDevice::step_tensor`] steps it with the gradient chunk where it arrived.
//! Checkpoint gathers and stage-boundary edits copy the chunk to the host (never per step).

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::optim::{AdamWConfig, ShardedAdamW};

/// A rank's chunk of a unit on its device: the stored weights (fp32 masters, or 16-bit words of
/// a frozen unit, as bit patterns), and the AdamW state of a trained unit.
pub trait DeviceShard: Send {
    /// Elements of the chunk.
    fn len(&self) -> usize;

    /// Whether the chunk is empty (a unit smaller than its padding: never in practice).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The chunk, copied to host memory.
    fn master(&self) -> Vec<f32>;

    /// The optimizer state, copied to host memory.
    fn optimizer(&self) -> ShardedAdamW;

    /// Elements of each moment (0 for a unit no optimizer steps), without copying them.
    fn optimizer_len(&self) -> usize;

    /// AdamW's configuration and step count, without copying the moments.
    fn optimizer_meta(&self) -> (AdamWConfig, i32);

    /// Sets AdamW's configuration (the moments and the step count stay).
    fn set_config(&mut self, config: AdamWConfig);

    /// Replaces the chunk and the optimizer state with host values, on the same device.
    fn load(&mut self, master: &[f32], optimizer: &ShardedAdamW);

    /// One AdamW step with this rank's gradient chunk (host memory, copied to the device).
    fn step(&mut self, lr: f64, grad: &[f32]);

    /// The shard as its concrete type ([`OnDevice`]), for the tensor paths of its backend.
    fn as_any(&self) -> &dyn std::any::Any;

    /// The shard as its concrete type, mutably.
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

impl dyn DeviceShard {
    /// `master` and `optimizer` on `device`.
    pub fn upload<B: Backend>(
        master: &[f32],
        optimizer: &ShardedAdamW,
        device: &B::Device,
    ) -> Box<dyn DeviceShard> {
        let mut shard = OnDevice::<B> {
            master: vector::<B>(master, device),
            moments: None,
            config: optimizer.config,
            time: optimizer.time,
            device: device.clone(),
        };
        shard.load_moments(optimizer);
        Box::new(shard)
    }

    /// The chunk and the optimizer state in host memory.
    pub fn download(&self) -> (Vec<f32>, ShardedAdamW) {
        (self.master(), self.optimizer())
    }
}

/// A 1-d tensor of `values` on `device`.
fn vector<B: Backend>(values: &[f32], device: &B::Device) -> Tensor<B, 1> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
}

fn host<B: Backend>(tensor: &Tensor<B, 1>) -> Vec<f32> {
    tensor
        .to_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("an f32 vector")
}

/// A chunk and its AdamW state as tensors of backend `B`.
pub struct OnDevice<B: Backend> {
    master: Tensor<B, 1>,
    /// Both moments of a trained unit.
    moments: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    config: AdamWConfig,
    time: i32,
    device: B::Device,
}

impl<B: Backend> OnDevice<B> {
    /// The chunk of the stored weights (fp32 masters for a trained unit).
    pub fn master_tensor(&self) -> &Tensor<B, 1> {
        &self.master
    }

    fn load_moments(&mut self, optimizer: &ShardedAdamW) {
        self.config = optimizer.config;
        self.time = optimizer.time;
        self.moments = (!optimizer.moment_1.is_empty()).then(|| {
            (
                vector::<B>(&optimizer.moment_1, &self.device),
                vector::<B>(&optimizer.moment_2, &self.device),
            )
        });
    }
}

impl<B: Backend> DeviceShard for OnDevice<B> {
    fn len(&self) -> usize {
        self.master.dims()[0]
    }

    fn master(&self) -> Vec<f32> {
        host(&self.master)
    }

    fn optimizer(&self) -> ShardedAdamW {
        let (moment_1, moment_2) = match &self.moments {
            Some((m1, m2)) => (host(m1), host(m2)),
            None => (Vec::new(), Vec::new()),
        };
        ShardedAdamW {
            config: self.config,
            moment_1,
            moment_2,
            time: self.time,
        }
    }

    fn optimizer_len(&self) -> usize {
        self.moments.as_ref().map_or(0, |(m1, _)| m1.dims()[0])
    }

    fn optimizer_meta(&self) -> (AdamWConfig, i32) {
        (self.config, self.time)
    }

    fn set_config(&mut self, config: AdamWConfig) {
        self.config = config;
    }

    fn load(&mut self, master: &[f32], optimizer: &ShardedAdamW) {
        self.master = vector::<B>(master, &self.device);
        self.load_moments(optimizer);
    }

    /// burn's `AdamW::step` (burn-optim 0.21, no amsgrad, no cautious decay), operation for
    /// operation: what [`ShardedAdamW::step`] does element by element.
    fn step(&mut self, lr: f64, grad: &[f32]) {
        assert_eq!(grad.len(), self.len(), "master and gradient shards differ");
        let grad = vector::<B>(grad, &self.device);
        self.step_tensor(lr, grad);
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl<B: Backend> OnDevice<B> {
    /// One AdamW step with this rank's fp32 gradient chunk, already on the device.
    pub fn step_tensor(&mut self, lr: f64, grad: Tensor<B, 1>) {
        assert_eq!(
            grad.dims()[0],
            self.len(),
            "master and gradient shards differ"
        );
        let c = self.config;
        let (factor_1, factor_2) = (1.0 - c.beta_1, 1.0 - c.beta_2);
        let (moment_1, moment_2) = match self.moments.take() {
            Some((m1, m2)) if self.time > 0 => (
                m1.mul_scalar(c.beta_1)
                    .add(grad.clone().mul_scalar(factor_1)),
                m2.mul_scalar(c.beta_2)
                    .add(grad.square().mul_scalar(factor_2)),
            ),
            Some(_) => (
                grad.clone().mul_scalar(factor_1),
                grad.square().mul_scalar(factor_2),
            ),
            None => panic!("a step of a unit without optimizer state (a frozen unit)"),
        };
        self.time += 1;
        let corrected_1 = moment_1.clone().div_scalar(1f32 - c.beta_1.powi(self.time));
        let corrected_2 = moment_2.clone().div_scalar(1f32 - c.beta_2.powi(self.time));
        let delta = corrected_1.div(corrected_2.sqrt().add_scalar(c.epsilon));
        let decay_rate = lr * f64::from(c.weight_decay);
        let master = self.master.clone();
        let decayed = if decay_rate == 0.0 {
            master
        } else {
            master.mul_scalar(1.0 - decay_rate)
        };
        self.master = decayed - delta.mul_scalar(lr);
        self.moments = Some((moment_1, moment_2));
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::backend::flex::Flex;

    use super::*;

    /// Deterministic values in about [-1, 1), with exact zeros as the padding of a chunk has.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                if i % 11 == 10 {
                    0.0
                } else {
                    (x as f32 / (1u32 << 24) as f32) * 2.0 - 1.0
                }
            })
            .collect()
    }

    /// Ten AdamW steps on the device and on the host from the same state: the same bits.
    fn same_bits_as_host<B: Backend>(device: &B::Device) {
        for weight_decay in [1e-2, 0.0] {
            let config = AdamWConfig {
                weight_decay,
                ..AdamWConfig::default()
            };
            let n = 1031;
            let mut master = values(n, 7);
            let mut optimizer = ShardedAdamW::new(config, n);
            let mut shard = <dyn DeviceShard>::upload::<B>(&master, &optimizer, device);
            for step in 0..10u32 {
                let grad: Vec<f32> = values(n, 100 + step).iter().map(|g| g * 0.1).collect();
                let lr = 1e-3 * f64::from(step + 1);
                optimizer.step(lr, &mut master, &grad);
                shard.step(lr, &grad);
            }
            let (device_master, device_optimizer) = shard.download();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&device_master), bits(&master), "masters");
            assert_eq!(bits(&device_optimizer.moment_1), bits(&optimizer.moment_1));
            assert_eq!(bits(&device_optimizer.moment_2), bits(&optimizer.moment_2));
            assert_eq!(device_optimizer.time, 10);
            assert_eq!(shard.optimizer_meta(), (config, 10));
        }
    }

    #[test]
    fn the_device_step_has_the_bits_of_the_host_step_on_ndarray() {
        same_bits_as_host::<NdArray>(&Default::default());
    }

    #[test]
    fn the_device_step_has_the_bits_of_the_host_step_on_flex() {
        same_bits_as_host::<Flex>(&Default::default());
    }

    #[test]
    fn upload_and_download_keep_every_bit_and_the_step_count() {
        // 16-bit words packed two to an f32 are NaN patterns too: they must survive the trip.
        let mut master = values(64, 3);
        master[5] = f32::from_bits(0x7fc0_1234);
        master[6] = f32::from_bits(0xffa0_0001);
        let mut optimizer = ShardedAdamW::new(AdamWConfig::default(), 64);
        optimizer.moment_1 = values(64, 4);
        optimizer.moment_2 = values(64, 5).iter().map(|v| v.abs()).collect();
        optimizer.time = 17;
        let shard = <dyn DeviceShard>::upload::<NdArray>(&master, &optimizer, &Default::default());
        assert_eq!(shard.len(), 64);
        assert_eq!(shard.optimizer_len(), 64);
        let (m, o) = shard.download();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&m), bits(&master));
        assert_eq!(o, optimizer);
        let frozen = ShardedAdamW::new(AdamWConfig::default(), 0);
        let shard = <dyn DeviceShard>::upload::<Flex>(&master, &frozen, &Default::default());
        assert_eq!(shard.optimizer_len(), 0);
        assert_eq!(shard.optimizer(), frozen);
    }
}
