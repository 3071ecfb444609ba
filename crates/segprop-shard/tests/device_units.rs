//! FSDP units whose chunks live on the device (`sharding.offload: none`): the device gather
//! assembles the module a host gather assembles, bit for bit, in f32 and in 16-bit compute, and
//! the device gradient path (flatten on the device, reduce-scatter, step there) leaves the chunk
//! and its moments with the host path's bits. The transport here is the staged one (CPU ranks);
//! on a GPU NCCL moves the same buffers directly (`segprop-bench gpu-check`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use burn::backend::Autodiff;
use burn::backend::flex::Flex;
use burn::module::AutodiffModule;
use burn::tensor::{FloatDType, Tensor, TensorData};
use segprop_model::{Block, LlamaConfig, LlamaInit, RopeTables};
use segprop_shard::unit::{FsdpUnit, flatten};
use segprop_shard::{AdamWConfig, CommStream, Flat, thread_group};

type Ad = Autodiff<Flex>;

fn block() -> Block<Ad> {
    let mut config = LlamaConfig::preset("tiny").unwrap();
    config.num_layers = 1;
    let model = LlamaInit::random::<Ad>(&config, 5, &Default::default());
    model.blocks.into_iter().next().unwrap()
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn one_rank() -> CommStream {
    let c = thread_group(1, Duration::from_secs(30)).pop().unwrap();
    CommStream::new(Box::new(c)).unwrap()
}

fn input(dtype: burn::tensor::DType) -> Tensor<Flex, 3> {
    let mut config = LlamaConfig::preset("tiny").unwrap();
    config.num_layers = 1;
    let n = 2 * 8 * config.hidden_size;
    let values: Vec<f32> = (0..n)
        .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.05)
        .collect();
    let x = Tensor::<Flex, 3>::from_data(
        TensorData::new(values, [2, 8, config.hidden_size]),
        &Default::default(),
    );
    segprop_model::precision::to_dtype(x, dtype)
}

fn rope(dtype: burn::tensor::DType) -> RopeTables<Flex> {
    let mut config = LlamaConfig::preset("tiny").unwrap();
    config.num_layers = 1;
    RopeTables::new(&config, 8, &Default::default()).cast(dtype)
}

#[test]
fn device_gathers_assemble_the_host_gather_s_module_bit_for_bit() {
    for compute in [FloatDType::F32, FloatDType::BF16, FloatDType::F16] {
        let s = one_rank();
        let host = FsdpUnit::new_in::<Ad>(block(), 0, 1, AdamWConfig::default(), compute);
        let mut device = FsdpUnit::new_in::<Ad>(block(), 0, 1, AdamWConfig::default(), compute);
        device.to_device::<Flex>(&Default::default());
        let from_host: Block<Ad> = host.assemble::<Ad>(&host.start_gather(&s).wait().unwrap());
        let full = device.start_gather_flat::<Flex>(&s).wait().unwrap();
        assert!(matches!(full, Flat::Device(_)), "{compute:?}");
        let from_device: Block<Ad> = device.assemble_flat::<Ad>(full);
        assert_eq!(
            bits(&flatten::<Ad, _>(&from_device)),
            bits(&flatten::<Ad, _>(&from_host)),
            "{compute:?}: the weights"
        );
        let dtype = burn::tensor::DType::from(compute);
        let y = |b: &Block<Ad>| {
            let out = b.valid().forward(input(dtype), &rope(dtype));
            bits(&out.into_data().convert::<f32>().into_vec::<f32>().unwrap())
        };
        assert_eq!(y(&from_device), y(&from_host), "{compute:?}: the forward");
    }
}

fn model() -> segprop_model::Llama<Ad> {
    let mut config = LlamaConfig::preset("tiny").unwrap();
    config.num_layers = 1;
    LlamaInit::random::<Ad>(&config, 5, &Default::default())
}

/// The host and the device gather of `module` as unit of `compute`: (host module, device module).
fn both<M: AutodiffModule<Ad> + Clone>(module: M, compute: FloatDType) -> (M, M) {
    let s = one_rank();
    let host = FsdpUnit::new_in::<Ad>(module.clone(), 0, 1, AdamWConfig::default(), compute);
    let mut device = FsdpUnit::new_in::<Ad>(module, 0, 1, AdamWConfig::default(), compute);
    device.to_device::<Flex>(&Default::default());
    let h = host.assemble::<Ad>(&host.start_gather(&s).wait().unwrap());
    let d = device.assemble_flat::<Ad>(device.start_gather_flat::<Flex>(&s).wait().unwrap());
    (h, d)
}

#[test]
fn device_gathered_embeddings_and_heads_compute_the_host_gather_s_bits() {
    for compute in [FloatDType::F32, FloatDType::BF16] {
        let dtype = burn::tensor::DType::from(compute);
        let m = model();
        let tokens = Tensor::<Flex, 2, burn::tensor::Int>::from_data(
            TensorData::new((0..16i64).map(|i| (i * 7) % 100).collect(), [2, 8]),
            &Default::default(),
        );
        let (h, d) = both(m.embed_tokens.clone(), compute);
        let out = |e: &burn::nn::Embedding<Ad>| {
            let y = e.valid().forward(tokens.clone());
            bits(&y.into_data().convert::<f32>().into_vec::<f32>().unwrap())
        };
        assert_eq!(out(&d), out(&h), "{compute:?}: the embedding");
        let (h, d) = both(m.head.clone(), compute);
        let out = |head: &segprop_model::LmHead<Ad>| {
            let y = head.valid().forward(input(dtype));
            bits(&y.into_data().convert::<f32>().into_vec::<f32>().unwrap())
        };
        assert_eq!(out(&d), out(&h), "{compute:?}: the head");
    }
}

#[test]
fn the_device_gradient_path_steps_the_chunk_to_the_host_path_s_bits() {
    use burn::optim::GradientsParams;
    use segprop_shard::device::reduce_scatter_flat;
    for compute in [FloatDType::F32, FloatDType::BF16] {
        let dtype = burn::tensor::DType::from(compute);
        let s = one_rank();
        let config = AdamWConfig::default();
        let mut host = FsdpUnit::new_in::<Ad>(block(), 0, 1, config, compute);
        let mut device = FsdpUnit::new_in::<Ad>(block(), 0, 1, config, compute);
        device.to_device::<Flex>(&Default::default());
        for _ in 0..2 {
            let mut grads = Vec::new();
            for unit in [&host, &device] {
                let b: Block<Ad> =
                    unit.assemble_flat::<Ad>(unit.start_gather_flat::<Flex>(&s).wait().unwrap());
                let x = Tensor::<Ad, 3>::from_inner(input(dtype));
                let rope = RopeTables::<Ad>::new(&tiny(), 8, &Default::default()).cast(dtype);
                let loss = b.forward(x, &rope).cast(FloatDType::F32).square().mean();
                let g = GradientsParams::from_grads(loss.backward(), &b);
                let full = unit.flatten_grads_flat::<Ad>(&b, &g);
                grads.push(reduce_scatter_flat(&s, unit.layout, full).wait().unwrap());
            }
            let d = grads.pop().unwrap();
            assert!(
                matches!(d, Flat::Device(_)),
                "a device unit's gradient stays there"
            );
            device.step_flat(1e-2, d);
            host.step_flat(1e-2, grads.pop().unwrap());
        }
        assert_eq!(bits(&device.master()), bits(&host.master()), "{compute:?}");
        assert_eq!(device.optimizer(), host.optimizer(), "{compute:?}");
    }
}

fn tiny() -> LlamaConfig {
    let mut config = LlamaConfig::preset("tiny").unwrap();
    config.num_layers = 1;
    config
}
