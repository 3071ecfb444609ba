//! Validation of a parsed job spec: every rule names the field path it checks, and
//! [`crate::spec::locate_field`] finds that field's line in the YAML text for the error message.

use crate::error::SpecError;
use crate::llama_config::{LlamaConfig, PRESETS};
use crate::spec::{ExitSpec, JobSpec, Offload, Regime, ShardingStrategy};

impl ExitSpec {
    pub(crate) fn validate(&self, field: &str) -> Result<(), SpecError> {
        if self.max_steps.is_none() && self.max_epochs.is_none() {
            return Err(SpecError::invalid(
                field,
                "needs `max_steps` or `max_epochs` so the stage is bounded",
            ));
        }
        if self.max_steps == Some(0) {
            return Err(SpecError::invalid(
                format!("{field}.max_steps"),
                "must be at least 1",
            ));
        }
        if self.max_epochs == Some(0) {
            return Err(SpecError::invalid(
                format!("{field}.max_epochs"),
                "must be at least 1",
            ));
        }
        if self.patience == Some(0) {
            return Err(SpecError::invalid(
                format!("{field}.patience"),
                "must be at least 1",
            ));
        }
        if !(self.min_delta >= 0.0) {
            return Err(SpecError::invalid(
                format!("{field}.min_delta"),
                "must be >= 0",
            ));
        }
        Ok(())
    }
}

impl JobSpec {
    /// Checks every field; errors name the field path.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.version != 1 {
            return Err(SpecError::invalid("version", "only version 1 exists"));
        }
        if self.name.trim().is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(SpecError::invalid(
                "name",
                "must be non-empty and use only letters, digits, '-', '_' and '.'",
            ));
        }
        self.validate_model()?;
        self.validate_data()?;
        self.validate_optimizer()?;
        if self.eval.every_steps == 0 {
            return Err(SpecError::invalid("eval.every_steps", "must be at least 1"));
        }
        match self.regime {
            Regime::Segprop => {
                let s = &self.segprop;
                if s.segment_size == 0 {
                    return Err(SpecError::invalid(
                        "segprop.segment_size",
                        "must be at least 1",
                    ));
                }
                if s.base_depth == 0 {
                    return Err(SpecError::invalid(
                        "segprop.base_depth",
                        "must be at least 1 (stage 1 trains blocks 0..p)",
                    ));
                }
                if s.snapshot_shards > 256 {
                    return Err(SpecError::invalid(
                        "segprop.snapshot_shards",
                        "must be at most 256 (0 = one per live worker)",
                    ));
                }
                s.exit.stage1.validate("segprop.exit.stage1")?;
                s.exit.segment.validate("segprop.exit.segment")?;
                if let Some(global) = &s.exit.global {
                    if global.target_eval_loss.is_none() && global.patience.is_none() {
                        return Err(SpecError::invalid(
                            "segprop.exit.global",
                            "needs `target_eval_loss` or `patience` (or remove it)",
                        ));
                    }
                    if !(global.min_delta >= 0.0) {
                        return Err(SpecError::invalid(
                            "segprop.exit.global.min_delta",
                            "must be >= 0",
                        ));
                    }
                    if global.patience == Some(0) {
                        return Err(SpecError::invalid(
                            "segprop.exit.global.patience",
                            "must be at least 1",
                        ));
                    }
                }
            }
            Regime::Lw => {
                self.lw.exit.validate("lw.exit")?;
                if let Some(exit) = &self.lw.final_head {
                    exit.validate("lw.final_head")?;
                }
                let l = &self.lw;
                match l.variant {
                    crate::spec::LwVariant::BasePrefix => {
                        l.stage1_exit().validate("lw.stage1")?;
                        if l.base_depth() == 0 {
                            return Err(SpecError::invalid(
                                "lw.base_depth",
                                "must be at least 1: stage 1 trains the embedding with blocks \
                                 0..base_depth",
                            ));
                        }
                    }
                    crate::spec::LwVariant::LocalHeads => {
                        let set = [
                            ("lw.base_depth", l.base_depth.is_some()),
                            ("lw.head_layers", l.head_layers.is_some()),
                            ("lw.stage1", l.stage1.is_some()),
                        ];
                        if let Some((field, _)) = set.iter().find(|(_, s)| *s) {
                            return Err(SpecError::invalid(
                                *field,
                                "belongs to `lw.variant: base_prefix` (stage 1 with a base \
                                 prefix); `local_heads` trains every block from the embedding",
                            ));
                        }
                    }
                }
            }
            Regime::E2e => self.e2e.exit.validate("e2e.exit")?,
        }
        if self.resources.devices_per_gang == 0 {
            return Err(SpecError::invalid(
                "resources.devices_per_gang",
                "must be at least 1",
            ));
        }
        if self.resources.devices_per_gang > 1 && self.sharding.strategy == ShardingStrategy::None {
            return Err(SpecError::invalid(
                "resources.devices_per_gang",
                "more than one device per gang needs `sharding.strategy: full_shard`",
            ));
        }
        let sharded = self.sharding.strategy == ShardingStrategy::FullShard;
        if !self.eval.tasks.is_empty() && sharded {
            return Err(SpecError::invalid(
                "eval.tasks",
                "is not available with `sharding.strategy: full_shard` yet: tasks are scored on \
                 a whole model, and a sharded stage's units live on its ranks; remove `tasks` or \
                 the sharding",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, task) in self.eval.tasks.iter().enumerate() {
            if !names.insert(task.display_name()) {
                return Err(SpecError::invalid(
                    format!("eval.tasks[{i}].name"),
                    format!(
                        "`{}` names two tasks; give each task its own `name`",
                        task.display_name()
                    ),
                ));
            }
        }
        if self.eval.keep_best && sharded {
            return Err(SpecError::invalid(
                "eval.keep_best",
                "is not available with `sharding.strategy: full_shard` yet: a sharded stage's \
                 units live on its ranks, and keeping a second copy of them is not built; \
                 remove `keep_best` or the sharding",
            ));
        }
        if self.sharding.offload == Offload::Cpu && !sharded {
            return Err(SpecError::invalid(
                "sharding.offload",
                "`offload: cpu` offloads the shards of `strategy: full_shard`; set the strategy \
                 too (one rank is fine: `resources.devices_per_gang: 1`)",
            ));
        }
        if sharded
            && self.resources.backend == crate::spec::Backend::Cpu
            && self.sharding.offload == Offload::None
        {
            return Err(SpecError::invalid(
                "sharding.offload",
                "`offload: none` keeps shards in device memory, and CPU ranks have none: their \
                 shards are host memory; leave `offload` out or set `offload: cpu`",
            ));
        }
        if sharded
            && self.resources.backend == crate::spec::Backend::Cuda
            && self.sharding.offload == Offload::Auto
        {
            return Err(SpecError::invalid(
                "sharding.offload",
                "full_shard on CUDA needs to be told where each rank's shard of the weights and \
                 of the optimizer state lives: `offload: none` (device memory, stepped there) or \
                 `offload: cpu` (host memory, stepped there: FSDP + CPU offload)",
            ));
        }
        if sharded
            && !self
                .optimizer
                .grad_accum
                .is_multiple_of(self.resources.devices_per_gang)
        {
            return Err(SpecError::invalid(
                "optimizer.grad_accum",
                format!(
                    "is {}: a sharded step splits its micro-batches over the {} ranks of \
                     `resources.devices_per_gang`, so it must be a multiple of that",
                    self.optimizer.grad_accum, self.resources.devices_per_gang
                ),
            ));
        }
        if !(self.sharding.collective_timeout_s.is_finite()
            && self.sharding.collective_timeout_s > 0.0)
        {
            return Err(SpecError::invalid(
                "sharding.collective_timeout_s",
                "must be a positive number of seconds",
            ));
        }
        if let Some(config) = self.model_config() {
            self.validate_against_model(&config)?;
        }
        Ok(())
    }

    fn validate_model(&self) -> Result<(), SpecError> {
        if self.model.family != "llama" {
            return Err(SpecError::invalid(
                "model.family",
                format!("unknown family `{}`; supported: llama", self.model.family),
            ));
        }
        let sources = [
            self.model.preset.is_some(),
            self.model.config.is_some(),
            self.model.from.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return Err(SpecError::invalid(
                "model",
                "give exactly one of `preset`, `config` or `from`",
            ));
        }
        if self.model.overrides.is_some() && self.model.preset.is_none() {
            return Err(SpecError::invalid(
                "model.overrides",
                "only applies to a `preset`",
            ));
        }
        if let Some(preset) = &self.model.preset
            && LlamaConfig::preset(preset).is_none()
        {
            return Err(SpecError::invalid(
                "model.preset",
                format!("unknown preset `{preset}`; known: {}", PRESETS.join(", ")),
            ));
        }
        if let Some(config) = self.model_config() {
            let field = if self.model.config.is_some() {
                "model.config"
            } else {
                "model.overrides"
            };
            config.validate(field)?;
        }
        Ok(())
    }

    fn validate_data(&self) -> Result<(), SpecError> {
        let d = &self.data;
        if d.corpus.starts_with("builtin:") && d.corpus != "builtin:synthetic" {
            return Err(SpecError::invalid(
                "data.corpus",
                format!(
                    "unknown built-in corpus `{}`; known: builtin:synthetic",
                    d.corpus
                ),
            ));
        }
        if d.corpus.trim().is_empty() {
            return Err(SpecError::invalid("data.corpus", "must not be empty"));
        }
        if d.seq_len < 2 {
            return Err(SpecError::invalid("data.seq_len", "must be at least 2"));
        }
        if d.batch_size == crate::spec::BatchSize::Fixed(0) {
            return Err(SpecError::invalid("data.batch_size", "must be at least 1"));
        }
        for (field, n) in d.micro_batch.iter().flat_map(|m| m.entries()) {
            if n == 0 {
                return Err(SpecError::invalid(field, "must be at least 1"));
            }
            if let crate::spec::BatchSize::Fixed(batch) = d.batch_size
                && n > batch
            {
                return Err(SpecError::invalid(
                    field,
                    format!(
                        "{n} exceeds data.batch_size {batch}: a micro-batch splits a batch \
                         into passes"
                    ),
                ));
            }
        }
        if !(d.eval_fraction > 0.0 && d.eval_fraction < 0.5) {
            return Err(SpecError::invalid(
                "data.eval_fraction",
                "must be in (0, 0.5): a held-out split is needed for exit criteria",
            ));
        }
        Ok(())
    }

    fn validate_optimizer(&self) -> Result<(), SpecError> {
        let o = &self.optimizer;
        if o.name != "adamw" {
            return Err(SpecError::invalid(
                "optimizer.name",
                format!("unknown optimizer `{}`; supported: adamw", o.name),
            ));
        }
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            return Err(SpecError::invalid(
                "optimizer.lr",
                "must be a positive number",
            ));
        }
        if !(o.weight_decay >= 0.0) {
            return Err(SpecError::invalid("optimizer.weight_decay", "must be >= 0"));
        }
        if o.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return Err(SpecError::invalid(
                "optimizer.betas",
                "each beta must be in [0, 1)",
            ));
        }
        if !(o.eps > 0.0) {
            return Err(SpecError::invalid("optimizer.eps", "must be positive"));
        }
        if let Some(clip) = o.grad_clip
            && !(clip > 0.0)
        {
            return Err(SpecError::invalid(
                "optimizer.grad_clip",
                "must be positive (or null)",
            ));
        }
        if o.grad_accum == 0 {
            return Err(SpecError::invalid(
                "optimizer.grad_accum",
                "must be at least 1",
            ));
        }
        let s = &o.schedule;
        if !(0.0..1.0).contains(&s.warmup_ratio) {
            return Err(SpecError::invalid(
                "optimizer.schedule.warmup_ratio",
                "must be in [0, 1)",
            ));
        }
        if !(0.0..=1.0).contains(&s.min_lr_ratio) {
            return Err(SpecError::invalid(
                "optimizer.schedule.min_lr_ratio",
                "must be in [0, 1]",
            ));
        }
        Ok(())
    }

    /// Checks that the ids of `tokenizer` fit the model's vocabulary.
    fn check_vocab(
        &self,
        tokenizer: &crate::TokenizerKind,
        config: &LlamaConfig,
    ) -> Result<(), SpecError> {
        let ids = tokenizer
            .vocab_size()
            .map_err(|e| SpecError::invalid("data.tokenizer", e))?;
        if ids > config.vocab_size {
            return Err(SpecError::invalid(
                "data.tokenizer",
                format!(
                    "the tokenizer's ids go up to {} but the model's vocab_size is {}",
                    ids - 1,
                    config.vocab_size
                ),
            ));
        }
        Ok(())
    }

    /// Resolves the job's tokenizer (reading a `tokenizer.json`; relative paths must already
    /// be resolved) and checks its ids fit `config`'s vocabulary.
    pub fn check_tokenizer(&self, config: &LlamaConfig) -> Result<(), SpecError> {
        self.check_vocab(&self.tokenizer()?, config)
    }

    /// Checks the spec against the model's shape (depths, vocabulary, sequence length).
    pub fn validate_against_model(&self, config: &LlamaConfig) -> Result<(), SpecError> {
        let n = config.num_layers;
        // A tokenizer.json is compared with the model when the files are read
        // (`check_tokenizer`); the built-in ones here.
        let builtin = match &self.data.tokenizer {
            Some(crate::TokenizerSpec::Gpt2) => Some(crate::TokenizerKind::Gpt2),
            Some(crate::TokenizerSpec::Byte) => Some(crate::TokenizerKind::Byte),
            None if self.model.from.is_none() => Some(crate::TokenizerKind::Byte),
            _ => None,
        };
        if let Some(kind) = builtin {
            self.check_vocab(&kind, config)?;
        }
        if let Some(window) = config.sliding_window
            && window < self.data.seq_len
        {
            return Err(SpecError::invalid(
                "data.seq_len",
                format!(
                    "{} exceeds the model's sliding_window {window}: attention here spans the \
                     whole sequence, so a window shorter than it is not supported; use \
                     data.seq_len <= {window}",
                    self.data.seq_len
                ),
            ));
        }
        if self.data.seq_len > config.max_seq_len {
            return Err(SpecError::invalid(
                "data.seq_len",
                format!(
                    "{} exceeds the model's max_seq_len {}",
                    self.data.seq_len, config.max_seq_len
                ),
            ));
        }
        if self.regime == Regime::Segprop {
            let s = &self.segprop;
            if s.base_depth + s.head_layers > n {
                return Err(SpecError::invalid(
                    "segprop.base_depth",
                    format!(
                        "base_depth {} + head_layers {} exceeds the model's {} layers",
                        s.base_depth, s.head_layers, n
                    ),
                ));
            }
        }
        if self.regime == Regime::Lw && self.lw.variant == crate::spec::LwVariant::BasePrefix {
            let (p, r) = (self.lw.base_depth(), self.lw.head_layers());
            if p + r > n || p >= n {
                return Err(SpecError::invalid(
                    "lw.base_depth",
                    format!(
                        "base_depth {p} + head_layers {r} must fit the model's {n} layers with \
                         at least one block after the base"
                    ),
                ));
            }
        }
        if let Some(crate::spec::MicroBatch::PerStage(map)) = &self.data.micro_batch {
            let plan = crate::plan::StagePlan::new(self, n);
            let names: Vec<&str> = plan.stages.iter().map(|s| s.name.as_str()).collect();
            if let Some(unknown) = map.keys().find(|k| !names.contains(&k.as_str())) {
                return Err(SpecError::invalid(
                    format!("data.micro_batch.{unknown}"),
                    format!(
                        "the job has no stage `{unknown}`; its stages: {}",
                        names.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}
