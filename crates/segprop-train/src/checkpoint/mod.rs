//! Trainer checkpoints: everything needed to continue a job exactly where it stopped.
//!
//! A checkpoint is a directory with two files:
//! - `state.yaml`: the model shape, the committed depth, the global step, the plan progress
//!   (stages done, their records, the global exit tracker) and, for a mid-stage checkpoint, the
//!   stage's progress (step, epoch, position in the epoch, exit tracker, last losses);
//! - `weights.bin`: burn records at full precision of the model, the persistent head optimizer,
//!   the head baseline (head policy `reset`) and, mid-stage, the stage's local optimizer.
//!
//! Parameter ids travel with the records, so optimizer moments find their parameters again and a
//! resumed run is bit-identical to an undisturbed one. SnapCheck snapshots are not saved: they
//! are recomputed from the committed prefix, which gives the same bits.
//!
//! Writes are atomic: the files go to `<dir>.partial` and the directory is renamed into place,
//! so a reader never sees half a checkpoint. [`checksum_dir`] gives the checksum the coordinator
//! records; [`load`] verifies it.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::Optimizer;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use segprop_core::LlamaConfig;
use segprop_core::checksum::Fnv1a64;
use segprop_model::{Block, Llama, LlamaInit};
use serde::{Deserialize, Serialize};

use crate::engine::{
    AdamWOptimizer, HeadBaseline, PlanProgress, StageProgress, StageResume, Trainer,
};
use crate::error::TrainError;
use crate::sharded::{ShardLayoutFile, ShardedStage};

const STATE_FILE: &str = "state.yaml";
const WEIGHTS_FILE: &str = "weights.bin";
const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct StateFile {
    format_version: u32,
    job: String,
    seed: u64,
    config: LlamaConfig,
    committed_depth: usize,
    global_step: u64,
    progress: PlanProgress,
    stage: Option<StageProgress>,
    /// Checksum of `weights.bin`, checked before it is decoded (checkpoints written before it
    /// existed have none). burn's decoder trusts the lengths it reads: a corrupt length is an
    /// allocation of terabytes, so corruption must be caught before decoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weights_checksum: Option<String>,
}

type OptRecord<B> = <AdamWOptimizer<B> as Optimizer<Llama<B>, B>>::Record;
type WeightsRecord<B> = (
    <Llama<B> as Module<B>>::Record,
    Option<OptRecord<B>>,
    Option<Vec<<Block<B> as Module<B>>::Record>>,
    Option<OptRecord<B>>,
);

pub use segprop_core::checksum::Digest;

/// Saves the trainer (and, mid-stage, the stage's local optimizer and progress) to `dir`.
pub fn save<B: AutodiffBackend>(
    trainer: &Trainer<B>,
    stage: Option<(&AdamWOptimizer<B>, &StageProgress)>,
    dir: &Path,
) -> Result<Digest, TrainError> {
    if trainer.shards.is_some() {
        return Err(state_error(
            dir,
            "a trainer with sharded units saves sharded checkpoints (save_sharded)".into(),
        ));
    }
    let mut state = state_of(trainer, stage.map(|(_, p)| p));
    let record: WeightsRecord<B> = (
        trainer.model.clone().into_record(),
        trainer.head_optimizer.as_ref().map(|o| o.to_record()),
        trainer
            .head_baseline
            .as_ref()
            .map(|b| b.blocks.iter().map(|x| x.clone().into_record()).collect()),
        stage.map(|(o, _)| o.to_record()),
    );
    let weights = BinBytesRecorder::<FullPrecisionSettings>::default()
        .record(record, ())
        .map_err(|e| state_error(dir, format!("cannot encode weights: {e}")))?;
    let mut hasher = Fnv1a64::default();
    hasher.update(&weights);
    state.weights_checksum = Some(hasher.label());
    let yaml = serde_yaml::to_string(&state)
        .map_err(|e| state_error(dir, format!("cannot encode state: {e}")))?;

    let partial = partial_path(dir);
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(TrainError::io(&partial))?;
    write_synced(&partial.join(WEIGHTS_FILE), &weights)?;
    write_synced(&partial.join(STATE_FILE), yaml.as_bytes())?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(TrainError::io(dir))?;
    }
    std::fs::rename(&partial, dir).map_err(TrainError::io(dir))?;
    checksum_dir(dir)
}

fn state_of<B: AutodiffBackend>(trainer: &Trainer<B>, stage: Option<&StageProgress>) -> StateFile {
    StateFile {
        format_version: FORMAT_VERSION,
        job: trainer.spec.name.clone(),
        seed: trainer.spec.seed,
        config: trainer.config.clone(),
        committed_depth: trainer.committed_depth,
        global_step: trainer.global_step,
        progress: trainer.progress.clone(),
        stage: stage.cloned(),
        weights_checksum: None,
    }
}

/// Reads and checks `state.yaml`: its format, that it belongs to this job (name and seed) and
/// that its model has this job's shape.
fn read_state<B: AutodiffBackend>(
    trainer: &Trainer<B>,
    dir: &Path,
) -> Result<StateFile, TrainError> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(TrainError::io(&state_path))?;
    let state: StateFile = serde_yaml::from_str(&text)
        .map_err(|e| state_error(&state_path, format!("not a trainer state file: {e}")))?;
    if state.format_version != FORMAT_VERSION {
        return Err(state_error(
            &state_path,
            format!(
                "format version {} is not supported (this build reads {FORMAT_VERSION})",
                state.format_version
            ),
        ));
    }
    if state.job != trainer.spec.name || state.seed != trainer.spec.seed {
        return Err(state_error(
            &state_path,
            format!(
                "checkpoint of job {:?} (seed {}) cannot resume job {:?} (seed {})",
                state.job, state.seed, trainer.spec.name, trainer.spec.seed
            ),
        ));
    }
    check_shape(&state_path, &state.config, &trainer.config)?;
    Ok(state)
}

/// What the plan carries between stages, from a loaded state.
fn apply_state<B: AutodiffBackend>(trainer: &mut Trainer<B>, state: StateFile) {
    trainer.config = state.config;
    trainer.committed_depth = state.committed_depth;
    trainer.global_step = state.global_step;
    trainer.progress = state.progress;
}

/// Loads a checkpoint into `trainer` (built from the same spec). When `expected` is given, the
/// checkpoint's checksum must match it. A mid-stage checkpoint arms `trainer.resume`. A
/// sharded checkpoint ([`save_sharded`]) loads into a sharded trainer, at any world size.
pub fn load<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    dir: &Path,
    expected: Option<&str>,
) -> Result<(), TrainError> {
    if let Some(expected) = expected {
        let digest = checksum_dir(dir)?;
        if digest.checksum != expected {
            return Err(state_error(
                dir,
                format!(
                    "checksum mismatch: the store recorded {expected}, the files hash to {} \
                     (corrupt or overwritten checkpoint)",
                    digest.checksum
                ),
            ));
        }
    }
    if is_sharded(dir) || trainer.shards.is_some() {
        if !is_sharded(dir) {
            return Err(state_error(
                &dir.join(SHARDS_FILE),
                "a trainer with sharded units loads sharded checkpoints only; this one is whole"
                    .into(),
            ));
        }
        return load_sharded(trainer, dir, true);
    }
    let state = read_state(trainer, dir)?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&weights_path).map_err(TrainError::io(&weights_path))?;
    if let Some(expected) = &state.weights_checksum {
        let mut hasher = Fnv1a64::default();
        hasher.update(&bytes);
        if hasher.label() != *expected {
            return Err(state_error(
                &weights_path,
                format!(
                    "checksum {} does not match {expected} recorded in {STATE_FILE} (corrupt or \
                     overwritten)",
                    hasher.label()
                ),
            ));
        }
    }
    // burn's recorder unwraps some decode errors (a corrupt enum tag, for one): a panic there is
    // a file that does not decode, not a bug of the caller.
    let device = trainer.device.clone();
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        BinBytesRecorder::<FullPrecisionSettings>::default()
            .load::<WeightsRecord<B>>(bytes, &device)
            .map_err(|e| e.to_string())
    }))
    .unwrap_or_else(|panic| Err(panic_message(&*panic)));
    let (model, head_opt, baseline, local_opt) =
        decoded.map_err(|e| state_error(&weights_path, format!("cannot decode weights: {e}")))?;

    let template = if state.config.num_layers == trainer.model.num_layers() {
        trainer.model.clone()
    } else {
        // Pruned by an early exit: a model of the saved shape to load into.
        LlamaInit::random::<B>(&state.config, trainer.spec.seed, &trainer.device)
    };
    trainer.model = template.load_record(model);
    let stage = state.stage.clone();
    apply_state(trainer, state);
    trainer.head_optimizer = head_opt.map(|r| trainer.new_optimizer().load_record(r));
    trainer.head_baseline = match baseline {
        Some(records) => {
            let n = trainer.config.num_layers;
            let r = trainer.plan.head_layers;
            let blocks = trainer.model.blocks[n - r..n]
                .iter()
                .cloned()
                .zip(records)
                .map(|(block, rec)| block.load_record(rec))
                .collect();
            Some(HeadBaseline { blocks })
        }
        None => None,
    };
    trainer.resume = match (stage, local_opt) {
        (Some(progress), Some(opt)) => Some(StageResume {
            progress,
            local_optimizer: trainer.new_optimizer().load_record(opt),
        }),
        _ => None,
    };
    Ok(())
}

/// Size and checksum of a file, or of a directory's files (names and contents, in name order;
/// subdirectories included).
pub fn checksum_dir(path: &Path) -> Result<Digest, TrainError> {
    let mut hasher = Fnv1a64::default();
    let mut bytes = 0u64;
    let mut files = Vec::new();
    collect_files(path, path, &mut files)?;
    files.sort();
    for rel in files {
        let full = if rel.as_os_str().is_empty() {
            path.to_path_buf()
        } else {
            path.join(&rel)
        };
        hasher.update(rel.to_string_lossy().as_bytes());
        hasher.update(&[0]);
        // In pieces: a shard file or weights file is never read whole into memory.
        use std::io::Read;
        let mut file = std::fs::File::open(&full).map_err(TrainError::io(&full))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(TrainError::io(&full))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            bytes += n as u64;
        }
    }
    Ok(Digest {
        bytes,
        checksum: hasher.label(),
    })
}

fn collect_files(root: &Path, at: &Path, out: &mut Vec<PathBuf>) -> Result<(), TrainError> {
    let meta = std::fs::metadata(at).map_err(TrainError::io(at))?;
    if meta.is_file() {
        out.push(at.strip_prefix(root).unwrap_or(at).to_path_buf());
        return Ok(());
    }
    for entry in std::fs::read_dir(at).map_err(TrainError::io(at))? {
        let entry = entry.map_err(TrainError::io(at))?;
        collect_files(root, &entry.path(), out)?;
    }
    Ok(())
}

fn partial_path(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    dir.with_file_name(name)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    use std::io::Write;
    let mut file = std::fs::File::create(path).map_err(TrainError::io(path))?;
    file.write_all(bytes).map_err(TrainError::io(path))?;
    file.sync_all().map_err(TrainError::io(path))
}

/// The text of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "undecodable".into())
}

fn state_error(path: &Path, message: String) -> TrainError {
    TrainError::State {
        path: path.to_path_buf(),
        message,
    }
}

/// The manifest of a sharded checkpoint: how every unit was chunked, and each rank file's size
/// and checksum.
const SHARDS_FILE: &str = "shards.json";

#[derive(Serialize, Deserialize)]
struct ShardsManifest {
    layout: ShardLayoutFile,
    files: Vec<RankFile>,
}

#[derive(Serialize, Deserialize)]
struct RankFile {
    file: String,
    bytes: u64,
    checksum: String,
}

fn rank_file_name(rank: usize, world: usize) -> String {
    format!("rank-{:05}-of-{:05}.bin", rank + 1, world)
}

/// Size and checksum of one file, read in pieces (never whole in memory).
fn checksum_file(path: &Path) -> Result<(u64, String), TrainError> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(TrainError::io(path))?;
    let mut hasher = Fnv1a64::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(TrainError::io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((bytes, hasher.label()))
}

/// Whether a checkpoint directory holds a sharded checkpoint.
pub fn is_sharded(dir: &Path) -> bool {
    dir.join(SHARDS_FILE).is_file()
}

/// Every rank of a gang at once: fails all of them when any failed.
fn agree<B: AutodiffBackend>(trainer: &mut Trainer<B>, ok: bool) -> Result<bool, TrainError> {
    use segprop_shard::Collective as _;
    let shard = trainer
        .shard
        .as_mut()
        .expect("a sharded trainer has a shard rank");
    let mut failed = [if ok { 0.0 } else { 1.0 }];
    shard.collective.all_reduce(&mut failed)?;
    Ok(failed[0] == 0.0)
}

/// Saves a sharded trainer (every rank calls it at the same point): mid-stage (`stage` given:
/// the stage holding the units and its progress) or between stages (`None`: every unit in its
/// slot, the state a next stage starts from). Each rank writes its chunks of every unit, with the
/// AdamW moments of the units that have them, to a file of its own; rank 0 then writes
/// `state.yaml` and `shards.json` (the units' chunking, each file's checksum) and renames the
/// directory into place. Returns the directory's digest (rank 0; the others get an empty one).
pub fn save_sharded<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    stage: Option<(&ShardedStage<B>, &StageProgress)>,
    dir: &Path,
) -> Result<Digest, TrainError> {
    let (stage, progress) = match stage {
        Some((stage, progress)) => (Some(stage), Some(progress)),
        None => (None, None),
    };
    let (rank, world) = {
        let shard = trainer
            .shard
            .as_ref()
            .expect("a sharded trainer has a shard rank");
        (shard.rank(), shard.world())
    };
    let partial = partial_path(dir);
    let prepared = (rank != 0)
        || (std::fs::remove_dir_all(&partial)
            .or(Ok::<_, std::io::Error>(()))
            .is_ok()
            && std::fs::create_dir_all(&partial).is_ok());
    if !agree(trainer, prepared)? {
        return Err(state_error(
            &partial,
            "cannot create the checkpoint directory".into(),
        ));
    }
    let path = partial.join(rank_file_name(rank, world));
    let shards = trainer.shards.as_ref().expect("a sharded trainer");
    let written = shards.write_rank_file(stage, &path);
    if !agree(trainer, written.is_ok())? {
        return Err(match written {
            Err(e) => TrainError::Io { path, source: e },
            Ok(_) => state_error(
                &partial,
                "another rank could not write its shard file".into(),
            ),
        });
    }
    let layout = written.expect("agreed");
    let mut outcome = Ok(Digest {
        bytes: 0,
        checksum: String::new(),
    });
    if rank == 0 {
        outcome = (|| {
            let mut files = Vec::with_capacity(world);
            for r in 0..world {
                let file = rank_file_name(r, world);
                let (bytes, checksum) = checksum_file(&partial.join(&file))?;
                files.push(RankFile {
                    file,
                    bytes,
                    checksum,
                });
            }
            let manifest = serde_json::to_string_pretty(&ShardsManifest { layout, files })
                .map_err(|e| state_error(dir, format!("cannot encode the manifest: {e}")))?;
            write_synced(&partial.join(SHARDS_FILE), manifest.as_bytes())?;
            let state = state_of(trainer, progress);
            let yaml = serde_yaml::to_string(&state)
                .map_err(|e| state_error(dir, format!("cannot encode state: {e}")))?;
            write_synced(&partial.join(STATE_FILE), yaml.as_bytes())?;
            if dir.exists() {
                std::fs::remove_dir_all(dir).map_err(TrainError::io(dir))?;
            }
            std::fs::rename(&partial, dir).map_err(TrainError::io(dir))?;
            checksum_dir(dir)
        })();
    }
    if !agree(trainer, outcome.is_ok())? && outcome.is_ok() {
        return Err(state_error(
            dir,
            "rank 0 could not finish the checkpoint".into(),
        ));
    }
    outcome
}

/// Loads a sharded checkpoint into a sharded trainer of any world size (built from the same
/// spec by `Trainer::new_sharded` or `Trainer::resume_sharded`, between stages): each rank
/// reads its chunk of every unit from the byte ranges of the saved ranks' files that overlap
/// it. With `verify`, every rank file's checksum is checked first and a mismatch names the
/// file; without it, the caller has checked them once for the whole gang ([`preflight`]).
pub fn load_sharded<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    dir: &Path,
    verify: bool,
) -> Result<(), TrainError> {
    let state = read_state(trainer, dir)?;
    let manifest_path = dir.join(SHARDS_FILE);
    let text = std::fs::read_to_string(&manifest_path).map_err(TrainError::io(&manifest_path))?;
    let manifest: ShardsManifest = serde_json::from_str(&text)
        .map_err(|e| state_error(&manifest_path, format!("not a shard manifest: {e}")))?;
    let mut paths = Vec::with_capacity(manifest.files.len());
    for f in &manifest.files {
        if f.file.contains('/') || f.file.contains("..") {
            return Err(state_error(
                &manifest_path,
                format!("`{}` is not a file name", f.file),
            ));
        }
        let path = dir.join(&f.file);
        if !verify {
            paths.push(path);
            continue;
        }
        let (bytes, checksum) = checksum_file(&path)?;
        if bytes != f.bytes || checksum != f.checksum {
            return Err(state_error(
                &path,
                format!(
                    "checksum mismatch: the manifest recorded {} ({} bytes), the file hashes to \
                     {checksum} ({bytes} bytes) (corrupt or overwritten shard file)",
                    f.checksum, f.bytes
                ),
            ));
        }
        paths.push(path);
    }
    let adamw = trainer.sharded_adamw();
    let shards = trainer.shards.as_mut().ok_or_else(|| {
        state_error(
            dir,
            "a sharded checkpoint loads into a sharded trainer".into(),
        )
    })?;
    if state.config.num_layers < shards.num_layers() {
        // Pruned by an early exit.
        let keep: Vec<usize> = (0..state.config.num_layers).collect();
        shards.retain_blocks(&keep);
    }
    shards
        .load_rank_files(&manifest.layout, &paths, adamw)
        .map_err(|m| state_error(dir, m))?;
    trainer.model = shards.skeleton();
    let stage = state.stage.clone();
    apply_state(trainer, state);
    trainer.resume = stage.map(|progress| StageResume {
        progress,
        local_optimizer: trainer.new_optimizer(),
    });
    Ok(())
}

/// Checks, before a run writes anything, that the checkpoint in `dir` can resume `spec`: its
/// state is this job's (name, seed, model shape), its files are whole and match their
/// checksums, and its layout is the run's (`sharded`: one file per rank, which a gang of any
/// size loads; else the whole model). Errors are [`TrainError::Resume`], naming the file.
pub fn preflight(
    dir: &Path,
    spec: &segprop_core::JobSpec,
    sharded: bool,
) -> Result<(), TrainError> {
    let resume = |path: &Path, message: String| TrainError::Resume {
        path: path.to_path_buf(),
        message,
    };
    let config = spec.resolve_model_config()?;
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .map_err(|e| resume(&state_path, format!("cannot read it: {e}")))?;
    let state: StateFile = serde_yaml::from_str(&text)
        .map_err(|e| resume(&state_path, format!("not a trainer state file: {e}")))?;
    if state.job != spec.name || state.seed != spec.seed {
        return Err(resume(
            &state_path,
            format!(
                "checkpoint of job {:?} (seed {}), not of {:?} (seed {}): `name` and `seed` \
                 must be the job's that wrote it",
                state.job, state.seed, spec.name, spec.seed
            ),
        ));
    }
    check_shape(&state_path, &state.config, &config).map_err(|e| match e {
        TrainError::State { path, message } => TrainError::Resume { path, message },
        other => other,
    })?;
    match (sharded, is_sharded(dir)) {
        (true, false) => {
            return Err(resume(
                dir,
                "a whole checkpoint (an unsharded job's); this job runs on a gang, which \
                 resumes from sharded checkpoints"
                    .into(),
            ));
        }
        (false, true) => {
            return Err(resume(
                dir,
                "a sharded checkpoint (one file per rank); resume it with \
                 `sharding.strategy: full_shard` or `activation_checkpointing: true`"
                    .into(),
            ));
        }
        _ => {}
    }
    if !sharded {
        let weights = dir.join(WEIGHTS_FILE);
        return match weights.is_file() {
            true => Ok(()),
            false => Err(resume(&weights, "missing".into())),
        };
    }
    let manifest_path = dir.join(SHARDS_FILE);
    let text = std::fs::read_to_string(&manifest_path)
        .map_err(|e| resume(&manifest_path, format!("cannot read it: {e}")))?;
    let manifest: ShardsManifest = serde_json::from_str(&text)
        .map_err(|e| resume(&manifest_path, format!("not a shard manifest: {e}")))?;
    for f in &manifest.files {
        let path = dir.join(&f.file);
        let (bytes, checksum) = checksum_file(&path).map_err(|e| resume(&path, e.to_string()))?;
        if bytes != f.bytes || checksum != f.checksum {
            return Err(resume(
                &path,
                format!(
                    "checksum mismatch: the manifest recorded {}, the file hashes to {checksum} \
                     (corrupt shard file)",
                    f.checksum
                ),
            ));
        }
    }
    Ok(())
}

/// A checkpoint's model must be this job's: same widths, heads and vocabulary (its depth may be
/// smaller after an early exit).
fn check_shape(path: &Path, saved: &LlamaConfig, ours: &LlamaConfig) -> Result<(), TrainError> {
    let fields = [
        ("hidden_size", saved.hidden_size, ours.hidden_size),
        (
            "intermediate_size",
            saved.intermediate_size,
            ours.intermediate_size,
        ),
        ("num_heads", saved.num_heads, ours.num_heads),
        ("num_kv_heads", saved.num_kv_heads, ours.num_kv_heads),
        ("head_dim", saved.head_dim(), ours.head_dim()),
        ("vocab_size", saved.vocab_size, ours.vocab_size),
    ];
    for (name, s, o) in fields {
        if s != o {
            return Err(state_error(
                path,
                format!(
                    "checkpoint of a model with {name} {s} cannot resume this job's model \
                     ({name} {o}): `model` differs from the job that wrote it"
                ),
            ));
        }
    }
    if saved.num_layers > ours.num_layers {
        return Err(state_error(
            path,
            format!(
                "checkpoint of a model with {} layers cannot resume this job's model ({} \
                 layers): `model` differs from the job that wrote it",
                saved.num_layers, ours.num_layers
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
