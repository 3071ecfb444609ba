//! Errors of the training engine.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Spec(#[from] segprop_core::SpecError),
    #[error("corpus {path}: {message}")]
    Corpus { path: PathBuf, message: String },
    /// The tokenizer (a `tokenizer.json` or its config files) cannot be read (bad input).
    #[error("data.tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// A chat corpus line is malformed, or the chat template fails on it (bad input).
    #[error("corpus {}{}: {message}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Chat {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    /// A task file of `eval.tasks` cannot be read (bad input).
    #[error("eval.tasks: {0}")]
    Task(String),
    /// The checkpoint named by `model.from` cannot be loaded (bad input).
    #[error("model.from: {0}")]
    Checkpoint(segprop_model::ModelError),
    #[error("model: {0}")]
    Model(#[from] segprop_model::ModelError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "stage {stage}: loss became {value} at step {step}; lower optimizer.lr or enable optimizer.grad_clip"
    )]
    NonFiniteLoss {
        stage: String,
        step: u64,
        value: f64,
    },
    #[error("no {backend} device is available on this machine")]
    NoDevice { backend: String },
    /// The checkpoint a run was asked to resume from does not fit it (another job or model
    /// shape, damaged, or of the other layout): bad input, found before anything is written.
    #[error("--resume {path}: {message}")]
    Resume { path: PathBuf, message: String },
    /// A trainer checkpoint cannot be read or written.
    #[error("checkpoint {path}: {message}")]
    State { path: PathBuf, message: String },
    /// A collective of a sharded gang failed (a rank left, stalled past the deadline, or
    /// diverged): the attempt is lost, a retry resumes from the last checkpoint.
    #[error("sharded training: {0}")]
    Collective(#[from] segprop_shard::CollectiveError),
    /// A rank of a sharded gang panicked.
    #[error("rank {rank} of the gang failed: {message}")]
    RankFailed { rank: usize, message: String },
    #[error("training was cancelled")]
    Cancelled,
}

impl TrainError {
    /// Whether the job's own input is at fault (the spec, its data, tokenizer or checkpoint):
    /// reported as bad input (exit status 2), never retried.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            TrainError::Spec(_)
                | TrainError::Corpus { .. }
                | TrainError::Tokenizer { .. }
                | TrainError::Chat { .. }
                | TrainError::Task(_)
                | TrainError::Checkpoint(_)
        )
    }

    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
        let path = path.into();
        move |source| TrainError::Io { path, source }
    }
}
