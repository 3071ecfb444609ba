//! Mixed precision (`resources.precision: bf16 | f16`), the way FSDP's `MixedPrecision` and
//! torch autocast run it:
//!
//! - the units a stage trains keep **fp32 master weights** (and burn's AdamW keeps fp32 moments
//!   for them, or the sharded AdamW does on each rank's shard); everything else the stage holds
//!   (the committed prefix, parked blocks of later segments, LL(r) blocks under `reset`) is
//!   stored in the 16-bit type;
//! - the compute runs in the 16-bit type: every layer casts its weights to its input's dtype
//!   (`segprop_model::precision`), and the cast of a master is part of the autodiff graph, so
//!   its gradient comes back in fp32; the optimizer steps the master, and the next forward casts
//!   it down again;
//! - the loss (log-softmax and mean), the RMS statistics of the norms and the attention softmax
//!   are taken in fp32, as are the gradient norm and clipping (on the fp32 gradients).
//!
//! The layout is set at the start of each stage ([`set_layout`]): what the stage trains goes up to
//! fp32, the rest down to 16 bits. A block that was parked in 16 bits therefore starts its
//! master from its 16-bit value. Checkpoints store every tensor as f32, which holds each
//! 16-bit value exactly, so a resumed stage is bit-identical.
//!
//! burn fixes a device's *default* float dtype once per process; segprop never changes it. Every
//! 16-bit tensor is an explicit cast of an f32 one, so one worker process runs f32 and bf16/f16
//! jobs side by side. A backend without the 16-bit type is refused ([`check_backend`]), never
//! silently run in f32.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};
use segprop_core::{Precision, SpecError};

use crate::error::TrainError;

/// The dtype the compute and the frozen weights use.
pub fn compute_dtype(precision: Precision) -> DType {
    match precision {
        Precision::F32 => DType::F32,
        Precision::Bf16 => DType::BF16,
        Precision::F16 => DType::F16,
    }
}

/// Refuses a precision the backend `B` cannot run (ndarray has no bf16/f16), naming the field.
pub fn check_backend<B: Backend>(
    precision: Precision,
    device: &B::Device,
) -> Result<(), TrainError> {
    let dtype = compute_dtype(precision);
    if B::supports_dtype(device, dtype) {
        return Ok(());
    }
    Err(SpecError::invalid(
        "resources.precision",
        format!(
            "{precision} is not supported by the {} backend this job was given; CPU jobs in \
             bf16/f16 run on burn's flex backend (segprop-worker picks it for them)",
            B::name(device)
        ),
    )
    .into())
}

/// Casts every parameter of `model` (a [`segprop_model::Llama`] or any part of one) in `trained` to fp32 (a
/// master) and every other one to `half`. Keeps parameter ids and whether each parameter
/// requires a gradient; a no-op for f32.
pub fn set_layout<B: Backend, M: Module<B>>(model: M, trained: &[ParamId], half: DType) -> M {
    if half == DType::F32 {
        return model;
    }
    model.map(&mut Layout { trained, half })
}

struct Layout<'a> {
    trained: &'a [ParamId],
    half: DType,
}

impl<B: Backend> ModuleMapper<B> for Layout<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let target = if self.trained.contains(&param.id) {
            DType::F32
        } else {
            self.half
        };
        let (id, tensor, mapper) = param.consume();
        if tensor.dtype() == target {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let grad = tensor.is_require_grad();
        // burn's `detach` keeps the requirement; a cast of a tracked tensor is not a leaf.
        let cast = tensor
            .detach()
            .set_require_grad(false)
            .cast(FloatDType::from(target));
        let cast = if grad { cast.require_grad() } else { cast };
        Param::from_mapped_value(id, cast, mapper)
    }
}

/// Bytes of a module's parameters by dtype: (fp32 bytes, 16-bit bytes).
pub fn param_bytes<B: Backend, M: Module<B>>(module: &M) -> (u64, u64) {
    struct Bytes(u64, u64);
    impl<B: Backend> ModuleVisitor<B> for Bytes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let t = param.val();
            let n = t.shape().num_elements() as u64;
            match t.dtype() {
                DType::F16 | DType::BF16 => self.1 += 2 * n,
                other => self.0 += other.size() as u64 * n,
            }
        }
    }
    let mut bytes = Bytes(0, 0);
    module.visit(&mut bytes);
    (bytes.0, bytes.1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex, NdArray};
    use segprop_model::{LlamaInit, ParamIds};

    type B = Autodiff<Flex>;

    #[test]
    fn masters_are_fp32_the_rest_half_and_ids_survive() {
        let config = segprop_core::LlamaConfig::preset("tiny").expect("tiny preset");
        let device = Default::default();
        let model = LlamaInit::random::<B>(&config, 3, &device);
        let ids = ParamIds::of(&model).0;
        let trained = ParamIds::of(&model.head).0;
        let model = set_layout(model, &trained, DType::BF16);
        assert_eq!(ParamIds::of(&model).0, ids);
        assert_eq!(model.head.output.weight.val().dtype(), DType::F32);
        assert_eq!(
            model.blocks[0].mlp.up_proj.weight.val().dtype(),
            DType::BF16
        );
        let (full, half) = param_bytes::<B, _>(&model);
        let (head, _) = param_bytes::<B, _>(&model.head);
        assert_eq!(full, head);
        assert!(half > 0);
        // Back to all-trained: every value a bf16 held comes back exactly.
        let before: Vec<f32> = model.blocks[0]
            .mlp
            .up_proj
            .weight
            .val()
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32");
        let model = set_layout(model, &ids, DType::BF16);
        let after: Vec<f32> = model.blocks[0]
            .mlp
            .up_proj
            .weight
            .val()
            .into_data()
            .into_vec()
            .expect("f32");
        assert_eq!(before, after);
    }

    #[test]
    fn a_backend_without_half_types_is_refused_naming_the_field() {
        let err = check_backend::<NdArray>(Precision::Bf16, &Default::default())
            .expect_err("ndarray has no bf16");
        assert!(err.to_string().contains("resources.precision"), "{err}");
        check_backend::<NdArray>(Precision::F32, &Default::default()).expect("f32 runs");
        check_backend::<Flex>(Precision::F16, &Default::default()).expect("flex has f16");
    }
}
