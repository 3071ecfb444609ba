//! FSDP's collectives on device tensors (`sharding.offload: none`): a rank's chunk of a unit
//! lives on its device, so its all-gather and its gradient's reduce-scatter start from a device
//! tensor and end in one.
//!
//! Two transports, one result:
//! - **direct** (NCCL on burn-cuda, [`CommStream::is_direct`]): the tensors' device buffers go
//!   to the collective as they are, no host copy. The compute stream is synchronized before the
//!   call (the buffers are written), the output tensor is allocated by the backend and filled by
//!   the collective on its own stream, and the caller reads it only after [`PendingFlat::wait`].
//! - **staged** (every other backend and collective, CPU ranks included): the tensor is copied
//!   to host memory, the host collective runs, and the result is uploaded. The values are the
//!   same; on CPU backends this is the path the tests run, so the tensor side of the device path
//!   (casting, slicing, flattening gradients, padding) is proven there.
//!
//! 16-bit compute gathers move the 16-bit words either way (two to an f32 word on a host
//! collective, [`pack16`]), so the wire bytes do not depend on the transport.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion as _, FloatDType, Tensor, TensorData};

use crate::collective::{CollectiveError, DeviceWords, Op};
use crate::flat::ShardLayout;
use crate::stream::{CommStream, Pending};
use crate::words::{pack16, unpack16};

/// A unit's flat buffer (its full weights, or this rank's gradient chunk): in host memory, or a
/// 1-d tensor on the rank's device.
pub enum Flat<B: Backend> {
    Host(Vec<f32>),
    Device(Tensor<B, 1>),
}

impl<B: Backend> Flat<B> {
    /// The sum of the squares of the first `valid` elements, accumulated in f32 (in order on
    /// the host; the backend's reduction on a device).
    pub fn sum_squares(&self, valid: usize) -> f32 {
        match self {
            Flat::Host(values) => values[..valid].iter().map(|x| x * x).sum(),
            Flat::Device(_) if valid == 0 => 0.0,
            Flat::Device(t) => t
                .clone()
                .slice(0..valid)
                .square()
                .sum()
                .into_scalar()
                .elem::<f32>(),
        }
    }

    /// Every element times `factor` (gradient clipping): in f64 then rounded on the host, in
    /// f32 on a device.
    pub fn scale(self, factor: f64) -> Self {
        match self {
            Flat::Host(mut values) => {
                values
                    .iter_mut()
                    .for_each(|x| *x = (f64::from(*x) * factor) as f32);
                Flat::Host(values)
            }
            Flat::Device(t) => Flat::Device(t.mul_scalar(factor)),
        }
    }
}

/// A gather or scatter in flight whose result is a [`Flat`].
#[must_use = "a collective in flight must be waited for"]
pub struct PendingFlat<B: Backend>(Waiting<B>);

/// Turns a staged call's host result into the device tensor.
type Upload<B> = Box<dyn FnOnce(Vec<f32>) -> Tensor<B, 1>>;

enum Waiting<B: Backend> {
    Host(Pending<Vec<f32>>),
    Staged(Pending<Vec<f32>>, Upload<B>),
    /// `out` holds the result once `call` has completed; `input` is kept alive (and unwritten)
    /// until then, as the collective reads it.
    Direct {
        call: Pending<()>,
        out: Tensor<B, 1>,
        input: Tensor<B, 1>,
    },
}

impl<B: Backend> PendingFlat<B> {
    /// A call on host buffers.
    pub fn host(pending: Pending<Vec<f32>>) -> Self {
        Self(Waiting::Host(pending))
    }

    /// Blocks until the call has run (each call is bounded by the collective's deadline).
    pub fn wait(self) -> Result<Flat<B>, CollectiveError> {
        match self.0 {
            Waiting::Host(pending) => pending.wait().map(Flat::Host),
            Waiting::Staged(pending, upload) => pending.wait().map(|v| Flat::Device(upload(v))),
            Waiting::Direct { call, out, input } => {
                call.wait()?;
                drop(input);
                Ok(Flat::Device(out))
            }
        }
    }
}

/// The 16-bit type of `dtype`, if it is one.
fn half_of(dtype: DType) -> Option<FloatDType> {
    match dtype {
        DType::BF16 => Some(FloatDType::BF16),
        DType::F16 => Some(FloatDType::F16),
        _ => None,
    }
}

fn host_values<B: Backend>(tensor: &Tensor<B, 1>) -> Vec<f32> {
    tensor
        .to_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("an f32 vector")
}

fn upload<B: Backend>(values: Vec<f32>, device: &B::Device, dtype: DType) -> Tensor<B, 1> {
    let n = values.len();
    let t = Tensor::<B, 1>::from_data(TensorData::new(values, [n]), device);
    match half_of(dtype) {
        Some(half) => t.cast(half),
        None => t,
    }
}

/// The device buffers of `tensors`, once the backend has finished writing them, where the
/// backend exposes them (burn-cuda with the `nccl` feature); `None` otherwise.
fn device_words<B: Backend>(tensors: [&Tensor<B, 1>; 2]) -> Option<[DeviceWords; 2]> {
    #[cfg(feature = "nccl")]
    {
        let [a, b] = tensors;
        let words = [crate::nccl::device_words(a)?, crate::nccl::device_words(b)?];
        B::sync(&a.device()).ok()?;
        Some(words)
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = tensors;
        None
    }
}

/// Starts the all-gather of this rank's fp32 chunk `chunk` (a unit laid out as `layout`) on
/// `stream`, in `compute` (16-bit, with an even chunk) or f32: the full buffer in that dtype,
/// `layout.padded()` elements directly, or `layout.len` staged. The 16-bit values are rounded to
/// nearest even either way: by the device's cast, or on the host ([`pack16`]) when staged (CPU
/// backends need not round ties to even).
pub fn all_gather_tensor<B: Backend>(
    stream: &CommStream,
    layout: ShardLayout,
    chunk: Tensor<B, 1>,
    compute: Option<FloatDType>,
) -> PendingFlat<B> {
    assert_eq!(chunk.dims()[0], layout.chunk, "one chunk of the unit");
    let device = chunk.device();
    let dtype = compute.map_or(DType::F32, DType::from);
    if stream.is_direct() {
        let words = match compute {
            Some(half) => chunk.clone().cast(half),
            None => chunk.clone(),
        };
        let out = Tensor::<B, 1>::empty([layout.padded()], (&device, dtype));
        if let Some([send, recv]) = device_words([&words, &out]) {
            let call = stream.start_direct(Op::AllGather, move |d| d.all_gather(send, recv));
            return PendingFlat(Waiting::Direct {
                call,
                out,
                input: words,
            });
        }
    }
    let values = host_values(&chunk);
    let pending = match compute {
        Some(half) => {
            let words = ShardLayout {
                len: layout.padded() / 2,
                world: layout.world,
                chunk: layout.chunk / 2,
            };
            let gathered = stream.all_gather(words, pack16(&values, half));
            return PendingFlat(Waiting::Staged(
                gathered,
                Box::new(move |full| {
                    upload::<B>(unpack16(&full, layout.len, half), &device, dtype)
                }),
            ));
        }
        None => stream.all_gather(layout, values),
    };
    PendingFlat(Waiting::Staged(
        pending,
        Box::new(move |full| upload::<B>(full, &device, dtype)),
    ))
}

/// Starts the reduce-scatter of a unit's full f32 gradient `full` (`layout.len` or
/// `layout.padded()` elements) on `stream`: this rank's chunk of the sum over ranks, a device
/// tensor of `layout.chunk` elements.
pub fn reduce_scatter_tensor<B: Backend>(
    stream: &CommStream,
    layout: ShardLayout,
    full: Tensor<B, 1>,
) -> PendingFlat<B> {
    let device = full.device();
    let len = full.dims()[0];
    assert!(
        len == layout.len || len == layout.padded(),
        "a full gradient has len or padded elements"
    );
    if stream.is_direct() {
        let full = if len < layout.padded() {
            let pad = Tensor::<B, 1>::zeros([layout.padded() - len], &device);
            Tensor::cat(vec![full, pad], 0)
        } else {
            full
        };
        let out = Tensor::<B, 1>::empty([layout.chunk], &device);
        if let Some([send, recv]) = device_words([&full, &out]) {
            let call =
                stream.start_direct(Op::ReduceScatter, move |d| d.reduce_scatter(send, recv));
            return PendingFlat(Waiting::Direct {
                call,
                out,
                input: full,
            });
        }
        let mut values = host_values(&full);
        values.truncate(layout.len);
        return staged_scatter(stream, layout, values, device);
    }
    let mut values = host_values(&full);
    values.truncate(layout.len);
    staged_scatter(stream, layout, values, device)
}

/// Starts the reduce-scatter of a unit's full gradient where it is: [`reduce_scatter_tensor`]
/// for a device tensor, the host collective for host values.
pub fn reduce_scatter_flat<B: Backend>(
    stream: &CommStream,
    layout: ShardLayout,
    grad: Flat<B>,
) -> PendingFlat<B> {
    match grad {
        Flat::Host(values) => PendingFlat::host(stream.reduce_scatter(layout, values)),
        Flat::Device(t) => reduce_scatter_tensor(stream, layout, t),
    }
}

fn staged_scatter<B: Backend>(
    stream: &CommStream,
    layout: ShardLayout,
    values: Vec<f32>,
    device: B::Device,
) -> PendingFlat<B> {
    PendingFlat(Waiting::Staged(
        stream.reduce_scatter(layout, values),
        Box::new(move |chunk| upload::<B>(chunk, &device, DType::F32)),
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use burn::backend::NdArray;
    use burn::backend::flex::Flex;

    use super::*;
    use crate::collective::Collective;
    use crate::thread::thread_group;

    fn streams(world: usize) -> Vec<CommStream> {
        thread_group(world, Duration::from_secs(20))
            .into_iter()
            .map(|c| CommStream::new(Box::new(c)).expect("a thread"))
            .collect()
    }

    /// Every rank's call on its own thread, results in rank order.
    fn on_ranks<T: Send>(world: usize, f: impl Fn(usize, &CommStream) -> T + Sync) -> Vec<T> {
        let streams = streams(world);
        std::thread::scope(|s| {
            let handles: Vec<_> = streams
                .iter()
                .enumerate()
                .map(|(r, stream)| {
                    let f = &f;
                    s.spawn(move || f(r, stream))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7 + seed * 13) % 29) as f32 * 0.37 - 5.0)
            .collect()
    }

    fn gathers_match_the_host_gather<B: Backend>(dtype: DType) {
        for world in [1, 2, 3] {
            let len = 23;
            let mut layout = ShardLayout::new(len, world);
            layout.chunk += layout.chunk % 2;
            let full = values(len, 1);
            let device = B::Device::default();
            let out = on_ranks(world, |r, stream| {
                let chunk = upload::<B>(layout.shard(&full, r), &device, DType::F32);
                let gathered = all_gather_tensor(stream, layout, chunk, half_of(dtype))
                    .wait()
                    .unwrap();
                let Flat::Device(t) = gathered else {
                    panic!("a device gather ends on the device")
                };
                assert_eq!(t.dtype(), dtype, "the gather keeps the dtype");
                host_values(&t)[..len].to_vec()
            });
            let expected: Vec<f32> = match half_of(dtype) {
                Some(h) => unpack16(&pack16(&full, h), len, h),
                None => full.clone(),
            };
            for rank_out in out {
                assert_eq!(rank_out, expected, "world {world}, {dtype:?}");
            }
        }
    }

    #[test]
    fn staged_tensor_gathers_give_every_rank_the_full_unit_in_its_dtype() {
        gathers_match_the_host_gather::<NdArray>(DType::F32);
        gathers_match_the_host_gather::<Flex>(DType::F32);
        gathers_match_the_host_gather::<Flex>(DType::BF16);
        gathers_match_the_host_gather::<Flex>(DType::F16);
    }

    #[test]
    fn staged_16_bit_gathers_move_two_bytes_per_weight() {
        let layout = ShardLayout {
            len: 40,
            world: 2,
            chunk: 20,
        };
        let wire = on_ranks(2, |r, stream| {
            let device = Default::default();
            let chunk = upload::<Flex>(values(20, r), &device, DType::F32);
            let _ = all_gather_tensor(stream, layout, chunk, Some(FloatDType::BF16))
                .wait()
                .unwrap();
            stream.stats().wire_bytes(Op::AllGather)
        });
        // 40 bf16 values are 80 bytes; a 2-rank ring moves half of them per rank.
        assert_eq!(wire, vec![40, 40]);
    }

    #[test]
    fn staged_tensor_scatters_sum_each_rank_s_chunk() {
        for world in [1, 2, 4] {
            let layout = ShardLayout::new(18, world);
            let out = on_ranks(world, |r, stream| {
                let device = Default::default();
                let grad = upload::<NdArray>(values(18, r), &device, DType::F32);
                match reduce_scatter_tensor(stream, layout, grad).wait().unwrap() {
                    Flat::Device(t) => host_values(&t),
                    Flat::Host(_) => panic!("a device scatter ends on the device"),
                }
            });
            let mut sum = vec![0.0f32; layout.padded()];
            for r in 0..world {
                for (s, v) in sum.iter_mut().zip(values(18, r)) {
                    *s += v;
                }
            }
            for (r, chunk) in out.iter().enumerate() {
                assert_eq!(chunk.len(), layout.chunk);
                for (i, x) in chunk.iter().enumerate() {
                    let at = r * layout.chunk + i;
                    assert!(
                        (x - sum[at]).abs() < 1e-4,
                        "rank {r} [{i}]: {x} vs {}",
                        sum[at]
                    );
                }
            }
        }
    }

    #[test]
    fn flats_measure_and_scale_alike_on_host_and_device() {
        let v = values(10, 3);
        let host = Flat::<NdArray>::Host(v.clone());
        let device = Flat::<NdArray>::Device(upload(v.clone(), &Default::default(), DType::F32));
        let expected: f32 = v[..7].iter().map(|x| x * x).sum();
        assert!((host.sum_squares(7) - expected).abs() < 1e-3);
        assert!((device.sum_squares(7) - expected).abs() < 1e-3);
        assert_eq!(device.sum_squares(0), 0.0);
        let Flat::Device(t) = device.scale(0.5) else {
            unreachable!()
        };
        let halves: Vec<f32> = v.iter().map(|x| x * 0.5).collect();
        assert_eq!(host_values(&t), halves);
    }
}
