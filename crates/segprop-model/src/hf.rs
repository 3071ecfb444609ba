//! Hugging Face layout checkpoints: `config.json` plus `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`, with HF parameter names (`model.layers.N.self_attn.q_proj.weight`).
//!
//! HF stores linear weights as `[out, in]`; burn's [`Linear`] stores `[in, out]`, so linear
//! weights are transposed on the way in and out. Values are copied, never rounded: an f32 export
//! followed by an import is bit-exact. bf16/f16 checkpoints are widened to f32 on import.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use segprop_core::{LlamaConfig, Precision};

use crate::error::ModelError;
pub use crate::hf_format::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE, read_config};
use crate::hf_format::{
    HostTensor, io_err, named_block, named_embed, named_head, remove_stale_weights,
    write_safetensors,
};
use crate::model::Llama;

/// Writes `model` as an HF checkpoint into `dir`: `model.safetensors`, or, when the tensors
/// exceed `max_shard_bytes`, `model-0000i-of-0000n.safetensors` files and an index. Weight files
/// of an earlier export in `dir` are removed first. Tensors are stored as `dtype` (f32 copies
/// values exactly; bf16/f16 round to nearest even, exact for weights that are already 16-bit),
/// and `config.json` states it as `torch_dtype`.
pub fn export<B: Backend>(
    model: &Llama<B>,
    config: &LlamaConfig,
    dir: &Path,
    max_shard_bytes: Option<u64>,
    dtype: Precision,
) -> Result<Vec<PathBuf>, ModelError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut config = config.clone();
    config.num_layers = model.num_layers();
    config.tie_embeddings = false;
    let config_path = dir.join(CONFIG_FILE);
    std::fs::write(&config_path, config.to_hf_json(dtype.torch_dtype()))
        .map_err(io_err(&config_path))?;
    let elem = dtype.bytes();

    let tensors = named_tensors(model);
    let mut shards: Vec<Vec<(String, HostTensor)>> = vec![Vec::new()];
    let mut shard_bytes = 0u64;
    for (name, tensor) in tensors {
        let bytes = tensor.values.len() as u64 * elem;
        if let Some(limit) = max_shard_bytes
            && shard_bytes > 0
            && shard_bytes + bytes > limit
        {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shard_bytes += bytes;
        shards
            .last_mut()
            .expect("shards starts non-empty")
            .push((name, tensor));
    }

    let mut written = vec![config_path];
    remove_stale_weights(dir)?;
    if shards.len() == 1 {
        let path = dir.join(SINGLE_FILE);
        write_safetensors(&path, &shards[0], dtype)?;
        written.push(path);
        return Ok(written);
    }
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, count);
        let path = dir.join(&file);
        write_safetensors(&path, shard, dtype)?;
        for (name, tensor) in shard {
            weight_map.insert(name.clone(), file.clone());
            total_size += tensor.values.len() as u64 * elem;
        }
        written.push(path);
    }
    let index =
        serde_json::json!({ "metadata": { "total_size": total_size }, "weight_map": weight_map });
    let index_path = dir.join(INDEX_FILE);
    let text = serde_json::to_string_pretty(&index).unwrap_or_default();
    std::fs::write(&index_path, text).map_err(io_err(&index_path))?;
    written.push(index_path);
    Ok(written)
}

/// The model's tensors under their HF names, in HF layout.
fn named_tensors<B: Backend>(model: &Llama<B>) -> Vec<(String, HostTensor)> {
    let mut out = named_embed(&model.embed_tokens);
    for (i, block) in model.blocks.iter().enumerate() {
        out.extend(named_block(i, block));
    }
    out.extend(named_head(&model.head));
    out
}

/// Loads an HF checkpoint directory, tensor by tensor ([`crate::hf_stream::HfReader`]). Tied
/// embeddings become an untied LM head (a copy).
pub fn import<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(Llama<B>, LlamaConfig), ModelError> {
    let mut reader = crate::hf_stream::HfReader::open(dir)?;
    let embed_tokens = reader.embed(device)?;
    let blocks = (0..reader.config().num_layers)
        .map(|layer| reader.block(layer, device))
        .collect::<Result<Vec<_>, _>>()?;
    let head = reader.head(device)?;
    let config = reader.finish()?;
    Ok((
        Llama {
            embed_tokens,
            blocks,
            head,
        },
        config,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hf_format::CheckpointFiles;
    use crate::model::LlamaInit;
    use burn::backend::NdArray;
    use safetensors::{Dtype, SafeTensors};

    type B = NdArray;

    fn all_values(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<u32>)> {
        let files = CheckpointFiles::open(dir).unwrap();
        files
            .read_all()
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, (t.shape, t.values.iter().map(|v| v.to_bits()).collect())))
            .collect()
    }

    #[test]
    fn export_import_export_is_bit_exact_single_and_sharded() {
        let config = LlamaConfig::preset("tiny").unwrap();
        let device = Default::default();
        let model = LlamaInit::random::<B>(&config, 5, &device);
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        export(&model, &config, &a, None, Precision::F32).unwrap();
        let (loaded, loaded_config) = import::<B>(&a, &device).unwrap();
        assert_eq!(loaded_config, config);
        // Sharded export of the imported model: several files plus an index.
        let written = export(&loaded, &loaded_config, &b, Some(100_000), Precision::F32).unwrap();
        assert!(
            written.len() > 3,
            "expected several shards, got {written:?}"
        );
        assert!(b.join(INDEX_FILE).is_file());
        assert_eq!(all_values(&a), all_values(&b));
        // And the sharded checkpoint imports to the same logits.
        let (again, _) = import::<B>(&b, &device).unwrap();
        let tokens = Tensor::<B, 2, Int>::from_data(
            TensorData::new(vec![3i64, 1, 4, 1, 5], [1, 5]),
            &device,
        );
        model
            .forward(tokens.clone(), &config)
            .into_data()
            .assert_eq(&again.forward(tokens, &config).into_data(), true);
    }

    #[test]
    fn corrupt_and_incomplete_checkpoints_name_the_problem() {
        let config = LlamaConfig::preset("tiny").unwrap();
        let device = Default::default();
        let model = LlamaInit::random::<B>(&config, 6, &device);
        let tmp = tempfile::tempdir().unwrap();
        export(&model, &config, tmp.path(), None, Precision::F32).unwrap();
        let file = tmp.path().join(SINGLE_FILE);
        let mut bytes = std::fs::read(&file).unwrap();
        bytes.truncate(bytes.len() / 2);
        std::fs::write(&file, &bytes).unwrap();
        let err = import::<B>(tmp.path(), &device).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");

        let mut wrong = config.clone();
        wrong.num_layers = 9;
        export(&model, &config, tmp.path(), None, Precision::F32).unwrap();
        std::fs::write(tmp.path().join(CONFIG_FILE), wrong.to_hf_json("float32")).unwrap();
        let err = import::<B>(tmp.path(), &device).unwrap_err().to_string();
        assert!(err.contains("model.layers.8"), "{err}");
    }

    #[test]
    fn half_exports_store_their_dtype_and_round_to_nearest_even() {
        let config = LlamaConfig::preset("tiny").unwrap();
        let device = Default::default();
        let model = LlamaInit::random::<B>(&config, 7, &device);
        let tmp = tempfile::tempdir().unwrap();
        let f32_dir = tmp.path().join("f32");
        export(&model, &config, &f32_dir, None, Precision::F32).unwrap();
        let exact = all_values(&f32_dir);
        for (precision, dtype, torch) in [
            (Precision::Bf16, Dtype::BF16, "bfloat16"),
            (Precision::F16, Dtype::F16, "float16"),
        ] {
            let dir = tmp.path().join(torch);
            export(&model, &config, &dir, Some(200_000), precision).unwrap();
            let json: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap())
                    .unwrap();
            assert_eq!(json["torch_dtype"], torch);
            let files = CheckpointFiles::open(&dir).unwrap();
            let all = files.read_all().unwrap();
            assert_eq!(all.len(), exact.len());
            for (name, t) in all {
                let (_, bits) = &exact[&name];
                let want: Vec<f32> = bits
                    .iter()
                    .map(|b| match precision {
                        Precision::Bf16 => half::bf16::from_f32(f32::from_bits(*b)).to_f32(),
                        _ => half::f16::from_f32(f32::from_bits(*b)).to_f32(),
                    })
                    .collect();
                assert_eq!(t.values, want, "{name}");
            }
            // Every file holds the 16-bit dtype.
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "safetensors") {
                    let bytes = std::fs::read(&path).unwrap();
                    let st = SafeTensors::deserialize(&bytes).unwrap();
                    assert!(st.tensors().iter().all(|(_, v)| v.dtype() == dtype));
                }
            }
        }
    }

    // The streaming reader and the unit-by-unit writer (hf_stream.rs).
    use crate::hf_stream::{HfReader, HfUnitWriter};

    #[test]
    fn unit_by_unit_export_imports_to_the_same_logits() {
        let config = LlamaConfig::preset("tiny").unwrap();
        let device = Default::default();
        let model = LlamaInit::random::<B>(&config, 11, &device);
        let tmp = tempfile::tempdir().unwrap();
        let mut writer = HfUnitWriter::create(tmp.path(), &config, Precision::F32).unwrap();
        writer.embed(&model.embed_tokens).unwrap();
        for (i, b) in model.blocks.iter().enumerate() {
            writer.block(i, b).unwrap();
        }
        writer.head(&model.head).unwrap();
        let written = writer.finish().unwrap();
        assert_eq!(written.len(), config.num_layers + 4, "config, units, index");
        assert!(tmp.path().join(INDEX_FILE).is_file());
        let (again, _) = import::<B>(tmp.path(), &device).unwrap();
        let tokens =
            Tensor::<B, 2, Int>::from_data(TensorData::new(vec![2i64, 7, 1], [1, 3]), &device);
        model
            .forward(tokens.clone(), &config)
            .into_data()
            .assert_eq(&again.forward(tokens, &config).into_data(), true);
    }

    #[test]
    fn the_reader_checks_headers_before_reading() {
        let config = LlamaConfig::preset("tiny").unwrap();
        let device = Default::default();
        let model = LlamaInit::random::<B>(&config, 12, &device);
        let tmp = tempfile::tempdir().unwrap();
        export(&model, &config, tmp.path(), None, Precision::Bf16).unwrap();
        // A bf16 checkpoint streams in, widened exactly.
        let mut reader = HfReader::open(tmp.path()).unwrap();
        let embed = reader.embed::<B>(&device).unwrap();
        let want: Vec<f32> = model
            .embed_tokens
            .weight
            .val()
            .into_data()
            .iter::<f32>()
            .map(|v| half::bf16::from_f32(v).to_f32())
            .collect();
        let got: Vec<f32> = embed.weight.val().into_data().iter::<f32>().collect();
        assert_eq!(got, want);
        // Unused tensors are named at the end.
        let err = reader.finish().unwrap_err().to_string();
        assert!(err.contains("unexpected tensor"), "{err}");
        // A padded file is refused at open.
        let file = tmp.path().join(SINGLE_FILE);
        let mut bytes = std::fs::read(&file).unwrap();
        bytes.extend_from_slice(&[0u8; 16]);
        std::fs::write(&file, &bytes).unwrap();
        let err = HfReader::open(tmp.path()).err().unwrap().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("truncated or padded"),
            "{err}"
        );
    }
}
