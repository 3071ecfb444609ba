//! HF checkpoints one unit at a time, for jobs that never hold the model whole.
//!
//! [`HfReader`] reads a checkpoint (one `model.safetensors` or the shards of an index) tensor by
//! tensor: at open it parses and checks every file's header (names, dtypes, shapes, offsets, the
//! file's length); each tensor is then read from its byte range alone, widened to f32, and
//! handed over as one unit (the embedding, a decoder block, the LM head). Nothing but the unit
//! being built is in memory.
//!
//! [`HfUnitWriter`] writes a model unit by unit: each unit goes to a file of its own
//! (`model-0000i-of-0000n.safetensors`, `n` the number of units) and the index lists every
//! tensor, so only the unit being written is in memory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::Embedding;
use burn::prelude::*;
use safetensors::Dtype;
use segprop_core::{LlamaConfig, Precision};

use crate::attention::Attention;
use crate::block::Block;
use crate::error::ModelError;
use crate::hf_format::{
    CONFIG_FILE, CheckpointFiles, HostTensor, INDEX_FILE, io_err, linear_from_hf, named_block,
    named_embed, named_head, norm, read_config, remove_stale_weights, tensor2, widen,
    write_safetensors,
};
use crate::mlp::Mlp;
use crate::model::LmHead;

/// Where one tensor's bytes are.
struct Entry {
    file: PathBuf,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// Reads an HF checkpoint directory one unit at a time.
pub struct HfReader {
    dir: PathBuf,
    config: LlamaConfig,
    entries: HashMap<String, Entry>,
    taken: HashSet<String>,
}

fn safetensors_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Safetensors {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn dtype_of(name: &str) -> Option<(Dtype, usize)> {
    Some(match name {
        "F32" => (Dtype::F32, 4),
        "BF16" => (Dtype::BF16, 2),
        "F16" => (Dtype::F16, 2),
        "F64" => (Dtype::F64, 8),
        "I64" => (Dtype::I64, 8),
        "I32" => (Dtype::I32, 4),
        "I16" => (Dtype::I16, 2),
        "I8" => (Dtype::I8, 1),
        "U8" => (Dtype::U8, 1),
        "BOOL" => (Dtype::BOOL, 1),
        _ => return None,
    })
}

/// Parses and checks one safetensors file's header: every tensor's dtype, shape and byte range,
/// the ranges inside the file and the file exactly as long as its tensors.
fn read_header(path: &Path) -> Result<Vec<(String, Entry)>, ModelError> {
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    let mut n = [0u8; 8];
    file.read_exact(&mut n)
        .map_err(|_| safetensors_err(path, "shorter than its 8-byte header length"))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || 8 + n > len {
        return Err(safetensors_err(
            path,
            format!("header of {n} bytes does not fit"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(io_err(path))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| safetensors_err(path, format!("header is not JSON: {e}")))?;
    let base = 8 + n;
    let mut out = Vec::new();
    let mut data_end = 0u64;
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| safetensors_err(path, format!("tensor `{name}`: {what}"));
        let dtype_name = info["dtype"].as_str().ok_or_else(|| bad("no dtype"))?;
        let (dtype, elem) = dtype_of(dtype_name).ok_or_else(|| bad("unknown dtype"))?;
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("shape is not a list of sizes"))?;
        let offsets = info["data_offsets"]
            .as_array()
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad("no data_offsets"))?;
        let bytes = shape.iter().product::<usize>() as u64 * elem as u64;
        if offsets.1 < offsets.0 || offsets.1 - offsets.0 != bytes {
            return Err(bad("data_offsets do not match its shape and dtype"));
        }
        data_end = data_end.max(offsets.1);
        out.push((
            name.clone(),
            Entry {
                file: path.to_path_buf(),
                dtype,
                shape,
                start: base + offsets.0,
                end: base + offsets.1,
            },
        ));
    }
    if base + data_end != len {
        return Err(safetensors_err(
            path,
            format!(
                "the header describes {} bytes of data, the file has {} (truncated or padded)",
                data_end,
                len.saturating_sub(base)
            ),
        ));
    }
    Ok(out)
}

impl HfReader {
    /// Opens `dir` (`config.json` plus `model.safetensors` or an index with its shards) and
    /// checks every file's header. Reads no tensor yet.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let config = read_config(dir)?;
        let files = CheckpointFiles::open(dir)?;
        let mut entries = HashMap::new();
        for (path, names) in &files.by_file {
            let header = read_header(path)?;
            let present: HashSet<&str> = header.iter().map(|(n, _)| n.as_str()).collect();
            if let Some(missing) = names.iter().find(|n| !present.contains(n.as_str())) {
                return Err(ModelError::MissingTensor {
                    path: path.clone(),
                    name: missing.clone(),
                });
            }
            entries.extend(header);
        }
        Ok(Self {
            dir: files.dir,
            config,
            entries,
            taken: HashSet::new(),
        })
    }

    /// The checkpoint's `config.json` (as written: `tie_embeddings` says whether `lm_head` is
    /// the embedding).
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Reads one tensor, checking its shape.
    fn take(&mut self, name: &str, expected: &[usize]) -> Result<HostTensor, ModelError> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.dir.clone(),
                name: name.to_string(),
            })?;
        if entry.shape != expected {
            return Err(ModelError::ShapeMismatch {
                path: self.dir.clone(),
                name: name.to_string(),
                found: entry.shape.clone(),
                expected: expected.to_vec(),
            });
        }
        let mut file = std::fs::File::open(&entry.file).map_err(io_err(&entry.file))?;
        file.seek(SeekFrom::Start(entry.start))
            .map_err(io_err(&entry.file))?;
        let mut bytes = vec![0u8; (entry.end - entry.start) as usize];
        file.read_exact(&mut bytes).map_err(io_err(&entry.file))?;
        let values = widen(entry.dtype, &bytes).ok_or_else(|| ModelError::UnsupportedDtype {
            path: entry.file.clone(),
            name: name.to_string(),
            dtype: format!("{:?}", entry.dtype),
        })?;
        self.taken.insert(name.to_string());
        Ok(HostTensor {
            shape: expected.to_vec(),
            values,
        })
    }

    /// The embedding (`model.embed_tokens.weight`).
    pub fn embed<B: Backend>(&mut self, device: &B::Device) -> Result<Embedding<B>, ModelError> {
        let (v, h) = (self.config.vocab_size, self.config.hidden_size);
        let t = self.take("model.embed_tokens.weight", &[v, h])?;
        Ok(Embedding {
            weight: Param::from_tensor(tensor2(t, device)),
        })
    }

    /// Decoder block `layer` (`model.layers.{layer}.*`).
    pub fn block<B: Backend>(
        &mut self,
        layer: usize,
        device: &B::Device,
    ) -> Result<Block<B>, ModelError> {
        let c = self.config.clone();
        let h = c.hidden_size;
        let (qd, kv) = (c.q_dim(), c.kv_dim());
        let i = c.intermediate_size;
        let p = format!("model.layers.{layer}");
        let norm1 = self.take(&format!("{p}.input_layernorm.weight"), &[h])?;
        let q = self.take(&format!("{p}.self_attn.q_proj.weight"), &[qd, h])?;
        let k = self.take(&format!("{p}.self_attn.k_proj.weight"), &[kv, h])?;
        let v = self.take(&format!("{p}.self_attn.v_proj.weight"), &[kv, h])?;
        let o = self.take(&format!("{p}.self_attn.o_proj.weight"), &[h, qd])?;
        let norm2 = self.take(&format!("{p}.post_attention_layernorm.weight"), &[h])?;
        let gate = self.take(&format!("{p}.mlp.gate_proj.weight"), &[i, h])?;
        let up = self.take(&format!("{p}.mlp.up_proj.weight"), &[i, h])?;
        let down = self.take(&format!("{p}.mlp.down_proj.weight"), &[h, i])?;
        Ok(Block {
            input_layernorm: norm(norm1, c.rms_norm_eps, device),
            self_attn: Attention {
                q_proj: linear_from_hf(q, device),
                k_proj: linear_from_hf(k, device),
                v_proj: linear_from_hf(v, device),
                o_proj: linear_from_hf(o, device),
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: c.head_dim(),
            },
            post_attention_layernorm: norm(norm2, c.rms_norm_eps, device),
            mlp: Mlp {
                gate_proj: linear_from_hf(gate, device),
                up_proj: linear_from_hf(up, device),
                down_proj: linear_from_hf(down, device),
            },
        })
    }

    /// The final norm and the LM head (the embedding's values when the checkpoint ties them).
    pub fn head<B: Backend>(&mut self, device: &B::Device) -> Result<LmHead<B>, ModelError> {
        let (v, h) = (self.config.vocab_size, self.config.hidden_size);
        let final_norm = self.take("model.norm.weight", &[h])?;
        let output = if self.config.tie_embeddings {
            self.take("model.embed_tokens.weight", &[v, h])?
        } else {
            self.take("lm_head.weight", &[v, h])?
        };
        Ok(LmHead {
            norm: norm(final_norm, self.config.rms_norm_eps, device),
            output: linear_from_hf(output, device),
        })
    }

    /// Checks that every tensor of the checkpoint was used (a tied checkpoint may still carry
    /// `lm_head.weight`; rotary tables are ignored) and returns the model's config (untied:
    /// the engine keeps the head as its own unit).
    pub fn finish(self) -> Result<LlamaConfig, ModelError> {
        let mut left: Vec<&String> = self
            .entries
            .keys()
            .filter(|n| !self.taken.contains(*n))
            .filter(|n| *n != "lm_head.weight" && !n.ends_with("rotary_emb.inv_freq"))
            .collect();
        left.sort();
        if let Some(name) = left.first() {
            return Err(ModelError::UnexpectedTensor {
                path: self.dir.clone(),
                name: (*name).clone(),
            });
        }
        let mut config = self.config;
        config.tie_embeddings = false;
        Ok(config)
    }
}

/// Writes a model in HF layout one unit at a time: the embedding, each block, the head, each in
/// a file of its own, then the index.
pub struct HfUnitWriter {
    dir: PathBuf,
    dtype: Precision,
    count: usize,
    next: usize,
    weight_map: BTreeMap<String, String>,
    total_size: u64,
    written: Vec<PathBuf>,
}

impl HfUnitWriter {
    /// Starts an export of a model of `config` (its `num_layers` blocks) into `dir`: writes
    /// `config.json` (with `torch_dtype`) and removes weight files of an earlier export.
    pub fn create(dir: &Path, config: &LlamaConfig, dtype: Precision) -> Result<Self, ModelError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut config = config.clone();
        config.tie_embeddings = false;
        let config_path = dir.join(CONFIG_FILE);
        std::fs::write(&config_path, config.to_hf_json(dtype.torch_dtype()))
            .map_err(io_err(&config_path))?;
        remove_stale_weights(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            dtype,
            count: config.num_layers + 2,
            next: 0,
            weight_map: BTreeMap::new(),
            total_size: 0,
            written: vec![config_path],
        })
    }

    fn write(&mut self, tensors: Vec<(String, HostTensor)>) -> Result<(), ModelError> {
        assert!(self.next < self.count, "more units than the config has");
        self.next += 1;
        let file = format!("model-{:05}-of-{:05}.safetensors", self.next, self.count);
        let path = self.dir.join(&file);
        write_safetensors(&path, &tensors, self.dtype)?;
        for (name, t) in &tensors {
            self.weight_map.insert(name.clone(), file.clone());
            self.total_size += t.values.len() as u64 * self.dtype.bytes();
        }
        self.written.push(path);
        Ok(())
    }

    /// Writes the embedding (first).
    pub fn embed<B: Backend>(&mut self, embed: &Embedding<B>) -> Result<(), ModelError> {
        self.write(named_embed(embed))
    }

    /// Writes decoder block `index` (in order).
    pub fn block<B: Backend>(&mut self, index: usize, block: &Block<B>) -> Result<(), ModelError> {
        self.write(named_block(index, block))
    }

    /// Writes the head (last).
    pub fn head<B: Backend>(&mut self, head: &LmHead<B>) -> Result<(), ModelError> {
        self.write(named_head(head))
    }

    /// Writes the index; returns every file written.
    pub fn finish(mut self) -> Result<Vec<PathBuf>, ModelError> {
        assert_eq!(self.next, self.count, "every unit is written");
        let index = serde_json::json!({
            "metadata": { "total_size": self.total_size },
            "weight_map": self.weight_map,
        });
        let index_path = self.dir.join(INDEX_FILE);
        let text = serde_json::to_string_pretty(&index).unwrap_or_default();
        std::fs::write(&index_path, text).map_err(io_err(&index_path))?;
        self.written.push(index_path);
        Ok(self.written)
    }
}
