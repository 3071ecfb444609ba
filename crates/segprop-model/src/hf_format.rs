//! The HF checkpoint format as its readers and writers share it: file names, one tensor in HF
//! layout ([`HostTensor`]), where a checkpoint's tensors live ([`CheckpointFiles`]), dtype
//! widening, the HF names of each unit's tensors, and writing one safetensors file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::prelude::*;
use safetensors::Dtype;
use segprop_core::{LlamaConfig, Precision};

use crate::block::Block;
use crate::error::ModelError;
use crate::model::LmHead;

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor in HF layout, as f32.
pub(crate) struct HostTensor {
    pub(crate) shape: Vec<usize>,
    pub(crate) values: Vec<f32>,
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Removes weight files of an earlier export so the directory holds exactly one checkpoint.
pub(crate) fn remove_stale_weights(dir: &Path) -> Result<(), ModelError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.ends_with(".safetensors") || name == INDEX_FILE {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &[(String, HostTensor)],
    dtype: Precision,
) -> Result<(), ModelError> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(name, t)| {
            let raw = match dtype {
                Precision::F32 => t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                Precision::Bf16 => t
                    .values
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
                Precision::F16 => t
                    .values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
            };
            (name.clone(), raw, t.shape.clone())
        })
        .collect();
    let st_dtype = match dtype {
        Precision::F32 => Dtype::F32,
        Precision::Bf16 => Dtype::BF16,
        Precision::F16 => Dtype::F16,
    };
    let views = bytes
        .iter()
        .map(|(name, raw, shape)| {
            safetensors::tensor::TensorView::new(st_dtype, shape.clone(), raw)
                .map(|view| (name.clone(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ModelError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    // Write to a temporary name and rename, so a reader never sees half a file.
    let tmp = path.with_extension("safetensors.partial");
    safetensors::serialize_to_file(views, Some(metadata), &tmp).map_err(|e| {
        ModelError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    })?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// The embedding's tensor under its HF name.
pub(crate) fn named_embed<B: Backend>(embed: &Embedding<B>) -> Vec<(String, HostTensor)> {
    vec![(
        "model.embed_tokens.weight".to_string(),
        host(embed.weight.val(), false),
    )]
}

/// Decoder block `i`'s tensors under their HF names, in HF layout.
pub(crate) fn named_block<B: Backend>(i: usize, block: &Block<B>) -> Vec<(String, HostTensor)> {
    let p = format!("model.layers.{i}");
    let a = &block.self_attn;
    let m = &block.mlp;
    vec![
        (
            format!("{p}.input_layernorm.weight"),
            host1(block.input_layernorm.gamma.val()),
        ),
        (
            format!("{p}.self_attn.q_proj.weight"),
            host(a.q_proj.weight.val(), true),
        ),
        (
            format!("{p}.self_attn.k_proj.weight"),
            host(a.k_proj.weight.val(), true),
        ),
        (
            format!("{p}.self_attn.v_proj.weight"),
            host(a.v_proj.weight.val(), true),
        ),
        (
            format!("{p}.self_attn.o_proj.weight"),
            host(a.o_proj.weight.val(), true),
        ),
        (
            format!("{p}.post_attention_layernorm.weight"),
            host1(block.post_attention_layernorm.gamma.val()),
        ),
        (
            format!("{p}.mlp.gate_proj.weight"),
            host(m.gate_proj.weight.val(), true),
        ),
        (
            format!("{p}.mlp.up_proj.weight"),
            host(m.up_proj.weight.val(), true),
        ),
        (
            format!("{p}.mlp.down_proj.weight"),
            host(m.down_proj.weight.val(), true),
        ),
    ]
}

/// The final norm and the LM head under their HF names, in HF layout.
pub(crate) fn named_head<B: Backend>(head: &LmHead<B>) -> Vec<(String, HostTensor)> {
    vec![
        (
            "model.norm.weight".to_string(),
            host1(head.norm.gamma.val()),
        ),
        (
            "lm_head.weight".to_string(),
            host(head.output.weight.val(), true),
        ),
    ]
}

pub(crate) fn to_f32_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("converted data holds f32")
}

pub(crate) fn host1<B: Backend>(t: Tensor<B, 1>) -> HostTensor {
    HostTensor {
        shape: t.dims().to_vec(),
        values: to_f32_vec(t),
    }
}

pub(crate) fn host<B: Backend>(t: Tensor<B, 2>, transpose: bool) -> HostTensor {
    let [rows, cols] = t.dims();
    let values = to_f32_vec(t);
    if !transpose {
        return HostTensor {
            shape: vec![rows, cols],
            values,
        };
    }
    HostTensor {
        shape: vec![cols, rows],
        values: transpose_values(&values, rows, cols),
    }
}

/// Transposes a row-major `[rows, cols]` buffer into `[cols, rows]`.
pub(crate) fn transpose_values(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// Where each tensor of a checkpoint lives.
pub(crate) struct CheckpointFiles {
    pub(crate) dir: PathBuf,
    pub(crate) by_file: BTreeMap<PathBuf, Vec<String>>,
}

impl CheckpointFiles {
    pub(crate) fn open(dir: &Path) -> Result<Self, ModelError> {
        let index_path = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let mut by_file: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
        if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).map_err(io_err(&index_path))?;
            let index: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Config {
                    path: index_path.clone(),
                    message: e.to_string(),
                })?;
            let map = index["weight_map"]
                .as_object()
                .ok_or_else(|| ModelError::Config {
                    path: index_path.clone(),
                    message: "`weight_map` is missing or not an object".into(),
                })?;
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| ModelError::Config {
                    path: index_path.clone(),
                    message: format!("weight_map entry for `{name}` is not a string"),
                })?;
                if file.contains('/') || file.contains("..") {
                    return Err(ModelError::Config {
                        path: index_path.clone(),
                        message: format!("shard name `{file}` must be a plain file name"),
                    });
                }
                by_file
                    .entry(dir.join(file))
                    .or_default()
                    .push(name.clone());
            }
        } else if single.is_file() {
            by_file.insert(single, Vec::new());
        } else {
            return Err(ModelError::Io {
                path: single,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("neither {SINGLE_FILE} nor {INDEX_FILE} exists"),
                ),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            by_file,
        })
    }

    /// Reads every tensor of every file into memory as f32 (tests compare checkpoints).
    #[cfg(test)]
    pub(crate) fn read_all(&self) -> Result<HashMap<String, HostTensor>, ModelError> {
        let mut out = HashMap::new();
        for path in self.by_file.keys() {
            let bytes = std::fs::read(path).map_err(io_err(path))?;
            let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
                ModelError::Safetensors {
                    path: path.clone(),
                    message: e.to_string(),
                }
            })?;
            for (name, view) in st.tensors() {
                let values = widen(view.dtype(), view.data()).ok_or_else(|| {
                    ModelError::UnsupportedDtype {
                        path: path.clone(),
                        name: name.clone(),
                        dtype: format!("{:?}", view.dtype()),
                    }
                })?;
                out.insert(
                    name,
                    HostTensor {
                        shape: view.shape().to_vec(),
                        values,
                    },
                );
            }
        }
        Ok(out)
    }
}

pub(crate) fn widen(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// Reads `config.json` of an HF checkpoint directory.
pub fn read_config(dir: &Path) -> Result<LlamaConfig, ModelError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let config = LlamaConfig::from_hf_json(&text).map_err(|message| ModelError::Config {
        path: path.clone(),
        message,
    })?;
    config.validate("config").map_err(|e| ModelError::Config {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(config)
}

pub(crate) fn tensor2<B: Backend>(t: HostTensor, device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(t.values, [t.shape[0], t.shape[1]]), device)
}

pub(crate) fn linear_from_hf<B: Backend>(t: HostTensor, device: &B::Device) -> Linear<B> {
    let (out_dim, in_dim) = (t.shape[0], t.shape[1]);
    let values = transpose_values(&t.values, out_dim, in_dim);
    Linear {
        weight: Param::from_tensor(Tensor::from_data(
            TensorData::new(values, [in_dim, out_dim]),
            device,
        )),
        bias: None,
    }
}

pub(crate) fn norm<B: Backend>(t: HostTensor, epsilon: f64, device: &B::Device) -> RmsNorm<B> {
    let len = t.shape[0];
    RmsNorm {
        gamma: Param::from_tensor(Tensor::from_data(TensorData::new(t.values, [len]), device)),
        epsilon,
    }
}
