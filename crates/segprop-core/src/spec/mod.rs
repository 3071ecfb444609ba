//! The job spec: what a user writes in `job.yaml` (DESIGN.md §5, docs/job-spec.md).
//!
//! Every struct rejects unknown fields. [`JobSpec::from_yaml_str`] parses and validates; every
//! error names the field and, when it can be found in the text, the line.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{SpecError, SpecErrorKind};
use crate::llama_config::LlamaConfig;

mod data;
mod locate;
mod model;
mod optim;
mod regime;
mod resources;
mod tasks;
#[cfg(test)]
mod tests;

pub use data::*;
pub use locate::locate_field;
pub(crate) use locate::strip_location;
pub use model::*;
pub use optim::*;
pub use regime::*;
pub use resources::*;
pub use tasks::*;

/// A complete training job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Spec format version; only `1` exists.
    pub version: u32,
    pub name: String,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub regime: Regime,
    #[serde(default)]
    pub segprop: SegPropSpec,
    #[serde(default)]
    pub lw: LwSpec,
    #[serde(default)]
    pub e2e: E2eSpec,
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    #[serde(default)]
    pub eval: EvalSpec,
    #[serde(default)]
    pub resources: ResourcesSpec,
    #[serde(default)]
    pub sharding: ShardingSpec,
    /// Recompute each trained unit's forward during backward instead of keeping its activations
    /// (per decoder block; the embedding and the head are units too). Applies sharded or not.
    #[serde(default)]
    pub activation_checkpointing: bool,
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

/// Mid-stage checkpoints written by worker daemons (a retried stage resumes from the newest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Optimizer steps between checkpoints; 0 writes none (a retried stage starts over).
    #[serde(default = "default_checkpoint_every")]
    pub every_steps: u64,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            every_steps: default_checkpoint_every(),
        }
    }
}

fn default_checkpoint_every() -> u64 {
    50
}

fn default_seed() -> u64 {
    17
}

pub use self::Backend as BackendKind;

impl JobSpec {
    /// Parses and validates a spec read from `path`. Relative data and checkpoint paths are
    /// resolved against the spec's directory.
    pub fn from_file(path: &Path) -> Result<Self, SpecError> {
        Self::read_file(path, true)
    }

    /// [`JobSpec::from_file`] without reading `eval.tasks`' files (the command that writes
    /// them reads the spec before they exist).
    pub fn from_file_before_tasks(path: &Path) -> Result<Self, SpecError> {
        Self::read_file(path, false)
    }

    fn read_file(path: &Path, check_tasks: bool) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|e| SpecError::io(path, &e))?;
        let source = path.display().to_string();
        let mut spec = Self::from_yaml_str(&text, &source)?;
        let base = path.parent().unwrap_or(Path::new("."));
        spec.resolve_paths(base);
        let checked = match check_tasks {
            true => spec.check_files(),
            false => spec.check_files_before_tasks(),
        };
        checked.map_err(|e| {
            let line = locate_field(&text, e.field().unwrap_or_default());
            e.with_source(&source, line)
        })?;
        Ok(spec)
    }

    /// Parses and validates YAML text. `source_name` appears in error messages.
    pub fn from_yaml_str(text: &str, source_name: &str) -> Result<Self, SpecError> {
        let spec: JobSpec = serde_yaml::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line());
            SpecError {
                source_name: source_name.to_string(),
                line,
                kind: SpecErrorKind::Parse {
                    message: strip_location(&e.to_string()),
                },
            }
        })?;
        spec.validate().map_err(|e| {
            let line = locate_field(text, e.field().unwrap_or_default());
            e.with_source(source_name, line)
        })?;
        Ok(spec)
    }

    fn resolve_paths(&mut self, base: &Path) {
        if !self.data.corpus.starts_with("builtin:") {
            let corpus = Path::new(&self.data.corpus);
            if corpus.is_relative() {
                self.data.corpus = base.join(corpus).display().to_string();
            }
        }
        if let Some(TokenizerSpec::File(path)) = &mut self.data.tokenizer
            && Path::new(path).is_relative()
        {
            *path = base.join(&*path).display().to_string();
        }
        if let Some(from) = &mut self.model.from
            && from.hf_dir.is_relative()
        {
            from.hf_dir = base.join(&from.hf_dir);
        }
        for task in &mut self.eval.tasks {
            if Path::new(&task.path).is_relative() {
                task.path = base.join(&task.path).display().to_string();
            }
        }
    }

    /// Sequences per forward/backward pass of `stage`: `data.micro_batch` for it, at most
    /// `data.batch_size` (0 while `batch_size` is an unresolved `auto`).
    pub fn micro_batch(&self, stage: &str) -> usize {
        let batch = self.data.batch_size.get();
        self.data
            .micro_batch
            .as_ref()
            .and_then(|m| m.for_stage(stage))
            .map_or(batch, |m| m.min(batch))
    }

    /// Checks that every file the spec names exists, and that `eval.tasks`' files hold examples.
    pub fn check_files(&self) -> Result<(), SpecError> {
        self.check_files_before_tasks()?;
        for (i, task) in self.eval.tasks.iter().enumerate() {
            read_task_file(Path::new(&task.path))
                .map_err(|e| SpecError::invalid(format!("eval.tasks[{i}].path"), e))?;
        }
        Ok(())
    }

    fn check_files_before_tasks(&self) -> Result<(), SpecError> {
        if !self.data.corpus.starts_with("builtin:") && !Path::new(&self.data.corpus).is_file() {
            return Err(SpecError::invalid(
                "data.corpus",
                format!("file `{}` does not exist", self.data.corpus),
            ));
        }
        if let Some(from) = &self.model.from {
            let config = from.hf_dir.join("config.json");
            if !config.is_file() {
                return Err(SpecError::invalid(
                    "model.from.hf_dir",
                    format!("`{}` does not exist", config.display()),
                ));
            }
        }
        let tokenizer = self.tokenizer()?;
        if let Some(config) = self.model_config() {
            self.check_tokenizer(&config)?;
        }
        if let TokenizerKind::Hf(path) = &tokenizer {
            tokenizer
                .vocab_size()
                .map_err(|e| SpecError::invalid("data.tokenizer", e))?;
            if self.data.format == DataFormat::Chat {
                crate::chat::check_file(Path::new(&self.data.corpus), path)
                    .map_err(|e| SpecError::invalid("data.corpus", e))?;
            }
        } else if self.data.format == DataFormat::Chat {
            return Err(SpecError::invalid(
                "data.format",
                "`chat` renders examples with a Hugging Face tokenizer's chat template: give \
                 data.tokenizer as a tokenizer.json, or a model.from checkpoint that ships one",
            ));
        }
        Ok(())
    }

    /// The tokenizer this job uses: `data.tokenizer`, or by default the `tokenizer.json` of
    /// `model.from.hf_dir` when it ships one (else bytes). A byte or GPT-2 tokenizer named for a
    /// checkpoint that ships its own is refused: its ids would not be the checkpoint's.
    pub fn tokenizer(&self) -> Result<TokenizerKind, SpecError> {
        let shipped = self
            .model
            .from
            .as_ref()
            .map(|from| from.hf_dir.join("tokenizer.json"))
            .filter(|path| path.is_file());
        match (&self.data.tokenizer, shipped) {
            (None, None) => Ok(TokenizerKind::Byte),
            (None | Some(TokenizerSpec::Checkpoint), Some(path)) => Ok(TokenizerKind::Hf(path)),
            (Some(TokenizerSpec::Checkpoint), None) => Err(SpecError::invalid(
                "data.tokenizer",
                match &self.model.from {
                    Some(from) => format!(
                        "`checkpoint`: `{}` does not exist",
                        from.hf_dir.join("tokenizer.json").display()
                    ),
                    None => "`checkpoint` names the tokenizer of model.from, and the model is \
                             not from a checkpoint"
                        .into(),
                },
            )),
            (Some(kind @ (TokenizerSpec::Byte | TokenizerSpec::Gpt2)), Some(path)) => {
                Err(SpecError::invalid(
                    "data.tokenizer",
                    format!(
                        "`{}` ids are not the checkpoint's: it ships `{}`; remove \
                         data.tokenizer (or set it to `checkpoint`)",
                        kind.name(),
                        path.display()
                    ),
                ))
            }
            (Some(TokenizerSpec::Byte), None) => Ok(TokenizerKind::Byte),
            (Some(TokenizerSpec::Gpt2), None) => Ok(TokenizerKind::Gpt2),
            (Some(TokenizerSpec::File(path)), _) => {
                let path = Path::new(path);
                let file = if path.is_dir() {
                    path.join("tokenizer.json")
                } else {
                    path.to_path_buf()
                };
                if !file.is_file() {
                    return Err(SpecError::invalid(
                        "data.tokenizer",
                        format!(
                            "`{}` is neither byte, gpt2, checkpoint nor an existing \
                             tokenizer.json",
                            path.display()
                        ),
                    ));
                }
                Ok(TokenizerKind::Hf(file))
            }
        }
    }

    /// The model shape this spec trains. For `model.from` the shape is read from the checkpoint's
    /// `config.json` by [`JobSpec::resolve_model_config`]; this returns `None` then.
    pub fn model_config(&self) -> Option<LlamaConfig> {
        if let Some(config) = &self.model.config {
            return Some(config.clone());
        }
        let mut config = LlamaConfig::preset(self.model.preset.as_deref()?)?;
        if let Some(o) = &self.model.overrides {
            macro_rules! apply {
                ($($field:ident),*) => { $( if let Some(v) = o.$field { config.$field = v; } )* };
            }
            apply!(
                vocab_size,
                hidden_size,
                intermediate_size,
                num_layers,
                num_heads,
                num_kv_heads,
                tie_embeddings,
                max_seq_len
            );
        }
        Some(config)
    }

    /// The model shape, reading `config.json` of an HF checkpoint when the spec names one.
    pub fn resolve_model_config(&self) -> Result<LlamaConfig, SpecError> {
        if let Some(config) = self.model_config() {
            return Ok(config);
        }
        let Some(from) = &self.model.from else {
            return Err(SpecError::invalid(
                "model",
                "names no preset, config or checkpoint",
            ));
        };
        let path = from.hf_dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| SpecError::io(&path, &e))?;
        let config = LlamaConfig::from_hf_json(&text).map_err(|message| SpecError {
            source_name: path.display().to_string(),
            line: None,
            kind: SpecErrorKind::Parse { message },
        })?;
        config.validate("model.from")?;
        self.validate_against_model(&config)?;
        self.check_tokenizer(&config)?;
        Ok(config)
    }
}
