//! Text to token ids: one token per byte, GPT-2's BPE, or a Hugging Face `tokenizer.json`
//! (a checkpoint's own) with the special tokens and chat template of the
//! `tokenizer_config.json` beside it (the end-of-sequence token falls back to
//! `generation_config.json`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use segprop_core::TokenizerKind;

use crate::error::TrainError;

/// Turns text into token ids.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    Byte,
    Gpt2,
    Hf(Arc<HfTokenizer>),
}

/// A Hugging Face tokenizer and what its `tokenizer_config.json` says about it.
#[derive(Debug)]
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    /// The `tokenizer.json` it was read from (named in errors).
    pub path: PathBuf,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// The id unpacked chat rows are padded with: `pad_token`, else the end-of-sequence token.
    pub pad_id: Option<u32>,
    /// The Jinja chat template (`chat_template`; a list of named templates gives `default`).
    pub chat_template: Option<String>,
}

impl Tokenizer {
    /// The built-in byte or GPT-2 tokenizer (a Hugging Face one is read by [`Tokenizer::load`]).
    pub fn builtin(kind: &TokenizerKind) -> Option<Self> {
        match kind {
            TokenizerKind::Byte => Some(Tokenizer::Byte),
            TokenizerKind::Gpt2 => Some(Tokenizer::Gpt2),
            TokenizerKind::Hf(_) => None,
        }
    }

    /// The tokenizer `kind` names, reading a `tokenizer.json` and its config files.
    pub fn load(kind: &TokenizerKind) -> Result<Self, TrainError> {
        match kind {
            TokenizerKind::Hf(path) => Ok(Tokenizer::Hf(Arc::new(HfTokenizer::open(path)?))),
            builtin => Ok(Self::builtin(builtin).expect("byte and gpt2 are built in")),
        }
    }

    /// The ids of a corpus: for a Hugging Face tokenizer, with the special tokens its
    /// post-processor adds (LLaMA-3's begins the text with `<|begin_of_text|>`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TrainError> {
        match self {
            Tokenizer::Hf(hf) => hf.encode(text, true).map(|e| e.get_ids().to_vec()),
            _ => Ok(self.encode_plain(text)),
        }
    }

    /// The ids of `text` alone, no special tokens added (a piece of a prompt). A Hugging Face
    /// tokenizer that fails on it gives no ids.
    pub fn encode_plain(&self, text: &str) -> Vec<u32> {
        match self {
            Tokenizer::Byte => text.bytes().map(u32::from).collect(),
            Tokenizer::Gpt2 => tiktoken_rs::r50k_base_singleton().encode_ordinary(text),
            Tokenizer::Hf(hf) => hf
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default(),
        }
    }

    pub fn decode(&self, tokens: &[u32]) -> String {
        match self {
            Tokenizer::Byte => {
                let bytes: Vec<u8> = tokens.iter().map(|t| (*t).min(255) as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Tokenizer::Gpt2 => tiktoken_rs::r50k_base_singleton()
                .decode(tokens.to_vec())
                .unwrap_or_default(),
            Tokenizer::Hf(hf) => hf.decode(tokens),
        }
    }

    /// The Hugging Face tokenizer, if this is one.
    pub fn hf(&self) -> Option<&HfTokenizer> {
        match self {
            Tokenizer::Hf(hf) => Some(hf),
            _ => None,
        }
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>, TrainError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| TrainError::Tokenizer {
                path: path.to_path_buf(),
                message: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TrainError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

impl HfTokenizer {
    /// Reads `path` (a `tokenizer.json`) and the `tokenizer_config.json` and
    /// `generation_config.json` beside it, when present.
    pub fn open(path: &Path) -> Result<Self, TrainError> {
        let err = |message: String| TrainError::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| err(e.to_string()))?;
        let config = segprop_core::chat::TokenizerConfig::beside(path).map_err(err)?;
        let generation = read_json(&path.with_file_name("generation_config.json"))?;
        let eos_token = config.eos_token.clone().or_else(|| {
            // generation_config.json names the end of a turn by id (or a list of ids).
            let eos = generation.as_ref()?.get("eos_token_id")?;
            let id = eos.as_u64().or_else(|| eos.as_array()?.first()?.as_u64())?;
            inner.id_to_token(u32::try_from(id).ok()?)
        });
        let pad_token = config.pad_token.clone().or_else(|| eos_token.clone());
        let pad_id = pad_token.as_deref().and_then(|t| inner.token_to_id(t));
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            bos_token: config.bos_token,
            eos_token,
            pad_id,
            chat_template: config.chat_template,
        })
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    /// `text` encoded, with the post-processor's special tokens when `special`; offsets are in
    /// characters.
    pub fn encode(&self, text: &str, special: bool) -> Result<tokenizers::Encoding, TrainError> {
        self.inner
            .encode_char_offsets(text, special)
            .map_err(|e| TrainError::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })
    }
}

/// A character-level Hugging Face tokenizer for tests: `<s>` (0), `</s>` (1), `<pad>` (2),
/// then one id per printable ASCII character and newline, and a chat template
/// `<s><role>content</s>...` that ends with `<assistant>` for a generation prompt.
#[cfg(test)]
pub(crate) fn write_test_tokenizer(dir: &Path) -> PathBuf {
    let specials = ["<s>", "</s>", "<pad>"];
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(id, t)| {
            serde_json::json!({ "id": id, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true })
        })
        .collect();
    let mut vocab = serde_json::Map::new();
    for (i, t) in specials.iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    for c in (32u8..127).chain([b'\n']) {
        let id = vocab.len();
        vocab.insert((c as char).to_string(), id.into());
    }
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": { "type": "Split", "pattern": { "Regex": "[\\s\\S]" },
            "behavior": "Isolated", "invert": false },
        "post_processor": { "type": "TemplateProcessing",
            "single": [{ "SpecialToken": { "id": "<s>", "type_id": 0 } },
                       { "Sequence": { "id": "A", "type_id": 0 } }],
            "pair": [{ "Sequence": { "id": "A", "type_id": 0 } },
                     { "Sequence": { "id": "B", "type_id": 1 } }],
            "special_tokens": { "<s>": { "id": "<s>", "ids": [0], "tokens": ["<s>"] } } },
        "decoder": { "type": "Fuse" },
        "model": { "type": "WordLevel", "vocab": vocab, "unk_token": "?" }
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json.to_string()).expect("write tokenizer.json");
    let config = serde_json::json!({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "chat_template": "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string())
        .expect("write tokenizer_config.json");
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tokenizer_json_encodes_with_its_specials_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_test_tokenizer(dir.path());
        let tok = Tokenizer::load(&TokenizerKind::Hf(path)).unwrap();
        let hf = tok.hf().unwrap();
        assert_eq!(hf.bos_token.as_deref(), Some("<s>"));
        assert_eq!(hf.pad_id, Some(2));
        // The corpus encoding starts with the post-processor's <s>; a plain one does not.
        let ids = tok.encode("ab").unwrap();
        assert_eq!(ids[0], 0);
        assert_eq!(&ids[1..], tok.encode_plain("ab").as_slice());
        assert_eq!(tok.decode(&ids[1..]), "ab");
        // Special tokens in the text are single tokens.
        assert_eq!(tok.encode_plain("a</s>").len(), 2);
    }

    #[test]
    fn gpt2_round_trips() {
        let tok = Tokenizer::Gpt2;
        let ids = tok.encode_plain("In the beginning God created the heaven and the earth.");
        assert!(ids.len() < 15);
        assert_eq!(
            tok.decode(&ids),
            "In the beginning God created the heaven and the earth."
        );
    }

    #[test]
    fn the_end_token_falls_back_to_generation_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_test_tokenizer(dir.path());
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": "<s>", "chat_template": "x"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": [1, 2]}"#,
        )
        .unwrap();
        let hf = HfTokenizer::open(&path).unwrap();
        assert_eq!(hf.eos_token.as_deref(), Some("</s>"));
        // No pad_token: rows are padded with the end token.
        assert_eq!(hf.pad_id, Some(1));
    }

    #[test]
    fn a_broken_tokenizer_json_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, "{ not json").unwrap();
        let err = HfTokenizer::open(&path).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }
}
