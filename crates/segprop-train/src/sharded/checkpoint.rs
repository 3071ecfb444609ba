//! Sharded checkpoints: each rank writes its chunks of every unit (stored weights and, for the
//! units a stage trains, both AdamW moments) to a file of its own, and the manifest lists the
//! units' sizes and how they were chunked. A rank of any world size loads its chunk of each
//! unit by reading just the byte ranges of the old ranks' files that overlap it (resharding on
//! load, as PyTorch DCP does): no rank ever reads a unit whole.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;
use segprop_shard::unit::FsdpUnit;
use serde::{Deserialize, Serialize};

use super::model::ModelShards;
use super::{Kind, Part, ShardedStage};

/// One unit as the checkpoint holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitEntry {
    /// `embed`, `block.{i}` or `head`.
    pub name: String,
    /// Weights in the unit.
    pub values: usize,
    /// Elements per rank file (16-bit words for a packed unit), padding included.
    pub chunk: usize,
    /// Stored in 16 bits, two to a word (a frozen unit of a 16-bit job).
    pub packed: bool,
    /// Has AdamW moments (`chunk` each, after the weights).
    pub trainable: bool,
    /// AdamW steps taken.
    pub time: i32,
}

/// The units of a sharded checkpoint, in model order, and LL(r)'s baseline chunks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardLayoutFile {
    pub world: usize,
    pub units: Vec<UnitEntry>,
    /// `(block, chunk)` of each baseline block of head policy `reset`, after the units.
    pub baseline: Vec<(usize, usize)>,
}

type UnitRef<'a, B> = Part<
    &'a FsdpUnit<burn::nn::Embedding<B>>,
    &'a FsdpUnit<segprop_model::Block<B>>,
    &'a FsdpUnit<segprop_model::LmHead<B>>,
>;

macro_rules! with_ref {
    ($r:expr, $u:ident => $body:expr) => {
        match $r {
            Part::Embed($u) => $body,
            Part::Block(_, $u) => $body,
            Part::Head($u) => $body,
        }
    };
}

fn entry_of<M>(name: String, u: &FsdpUnit<M>) -> UnitEntry {
    UnitEntry {
        name,
        values: u.num_values(),
        chunk: u.layout.chunk,
        packed: u.is_packed(),
        trainable: u.is_trainable(),
        time: u.optimizer_time(),
    }
}

fn name_of<E, K, H>(part: &Part<E, K, H>) -> String {
    match part {
        Part::Embed(_) => "embed".into(),
        Part::Block(i, _) => format!("block.{i}"),
        Part::Head(_) => "head".into(),
    }
}

fn put(out: &mut Vec<u8>, values: &[f32]) {
    out.reserve(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

impl<B: AutodiffBackend> ModelShards<B> {
    /// Every unit in model order, whether in its slot or lent to `stage`.
    fn units<'a>(&'a self, stage: Option<&'a ShardedStage<B>>) -> Vec<UnitRef<'a, B>> {
        let lent = |want: &dyn Fn(&Kind<B>) -> bool| {
            stage.and_then(|s| {
                s.units
                    .iter()
                    .chain(&s.prefix)
                    .chain(&s.parked)
                    .map(|u| &u.kind)
                    .find(|k| want(k))
            })
        };
        let mut out = Vec::with_capacity(self.blocks.len() + 2);
        out.push(match &self.embed {
            Some(u) => Part::Embed(u),
            None => match lent(&|k| matches!(k, Kind::Embed(_))) {
                Some(Kind::Embed(u)) => Part::Embed(u),
                _ => unreachable!("the embedding is in its slot or lent to the stage"),
            },
        });
        for (i, slot) in self.blocks.iter().enumerate() {
            out.push(match slot {
                Some(u) => Part::Block(i, u),
                None => match lent(&|k| matches!(k, Kind::Block(j, _) if *j == i)) {
                    Some(Kind::Block(_, u)) => Part::Block(i, u),
                    _ => unreachable!("block {i} is in its slot or lent to the stage"),
                },
            });
        }
        out.push(match &self.head {
            Some(u) => Part::Head(u),
            None => match lent(&|k| matches!(k, Kind::Head(_))) {
                Some(Kind::Head(u)) => Part::Head(u),
                _ => unreachable!("the head is in its slot or lent to the stage"),
            },
        });
        out
    }

    /// Writes this rank's file (`path`) of a sharded checkpoint; returns the layout every
    /// rank's file shares.
    pub fn write_rank_file(
        &self,
        stage: Option<&ShardedStage<B>>,
        path: &Path,
    ) -> std::io::Result<ShardLayoutFile> {
        let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
        let mut entries = Vec::new();
        for part in self.units(stage) {
            let name = name_of(&part);
            let mut bytes = Vec::new();
            let entry = with_ref!(part, u => {
                put(&mut bytes, &u.master());
                if u.is_trainable() {
                    let optimizer = u.optimizer();
                    put(&mut bytes, &optimizer.moment_1);
                    put(&mut bytes, &optimizer.moment_2);
                }
                entry_of(name, u)
            });
            file.write_all(&bytes)?;
            entries.push(entry);
        }
        let mut baseline = Vec::new();
        for (block, master) in self.baseline().into_iter().flatten() {
            let mut bytes = Vec::new();
            put(&mut bytes, master);
            file.write_all(&bytes)?;
            baseline.push((*block, master.len()));
        }
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(ShardLayoutFile {
            world: self.world(),
            units: entries,
            baseline,
        })
    }

    /// Loads this rank's chunk of every unit (between stages: every unit in its slot) from the
    /// rank files of a checkpoint saved with `layout`, at whatever world size it was saved.
    /// `adamw` configures the moments of trainable units. Errors name the unit that does not
    /// fit this model.
    pub fn load_rank_files(
        &mut self,
        layout: &ShardLayoutFile,
        files: &[PathBuf],
        adamw: segprop_shard::AdamWConfig,
    ) -> Result<(), String> {
        if files.len() != layout.world {
            return Err(format!(
                "{} rank files for a world of {}",
                files.len(),
                layout.world
            ));
        }
        let units = self.units(None).len();
        if layout.units.len() != units {
            return Err(format!(
                "the checkpoint has {} units, this model {units}",
                layout.units.len()
            ));
        }
        let mut reader = Spans::open(files)?;
        let rank = self.rank();
        let mut offset = 0u64;
        for (index, entry) in layout.units.iter().enumerate() {
            let load = |u: &mut dyn LoadUnit, reader: &mut Spans| -> Result<u64, String> {
                u.load(entry, rank, offset, reader, adamw)
            };
            let size = match index {
                0 => load(self.embed.as_mut().expect("in its slot"), &mut reader),
                i if i == units - 1 => load(self.head.as_mut().expect("in its slot"), &mut reader),
                i => load(
                    self.blocks[i - 1].as_mut().expect("in its slot"),
                    &mut reader,
                ),
            }
            .map_err(|e| format!("unit {}: {e}", entry.name))?;
            offset += size;
        }
        let mut baseline = Vec::new();
        for &(block, chunk) in &layout.baseline {
            let u = self.blocks[block].as_ref().expect("in its slot");
            let mine = u.layout.chunk;
            let master = reader.read(offset, chunk, rank * mine, mine)?;
            baseline.push((block, master));
            offset += (chunk * 4) as u64;
        }
        self.set_baseline((!layout.baseline.is_empty()).then_some(baseline));
        Ok(())
    }
}

/// A unit a checkpoint loads into, whatever its module type.
trait LoadUnit {
    /// Loads this rank's chunk of the unit saved as `entry` at `offset` of every rank file;
    /// returns the bytes the unit takes in each file.
    fn load(
        &mut self,
        entry: &UnitEntry,
        rank: usize,
        offset: u64,
        files: &mut Spans,
        adamw: segprop_shard::AdamWConfig,
    ) -> Result<u64, String>;
}

impl<M> LoadUnit for FsdpUnit<M> {
    fn load(
        &mut self,
        entry: &UnitEntry,
        rank: usize,
        offset: u64,
        files: &mut Spans,
        adamw: segprop_shard::AdamWConfig,
    ) -> Result<u64, String> {
        if entry.values != self.num_values() {
            return Err(format!(
                "{} weights saved, this model's unit has {}",
                entry.values,
                self.num_values()
            ));
        }
        if entry.packed {
            self.freeze();
            if !self.is_packed() {
                return Err("saved in 16 bits, this job computes in f32".into());
            }
        } else if entry.trainable {
            self.train(adamw);
        }
        let mine = self.layout.chunk;
        let master = files.read(offset, entry.chunk, rank * mine, mine)?;
        self.set_master(master);
        let mut size = entry.chunk as u64 * 4;
        if entry.trainable {
            let m1 = files.read(offset + size, entry.chunk, rank * mine, mine)?;
            let m2 = files.read(offset + 2 * size, entry.chunk, rank * mine, mine)?;
            self.set_moments(m1, m2, entry.time);
            size *= 3;
        }
        Ok(size)
    }
}

/// The rank files of a checkpoint, read by spans of the flat buffer their chunks make.
struct Spans {
    files: Vec<(PathBuf, std::fs::File)>,
}

impl Spans {
    fn open(paths: &[PathBuf]) -> Result<Self, String> {
        let files = paths
            .iter()
            .map(|p| {
                std::fs::File::open(p)
                    .map(|f| (p.clone(), f))
                    .map_err(|e| format!("{}: {e}", p.display()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { files })
    }

    /// Elements `start..start + len` of the flat buffer whose chunk `r` (`chunk` elements) is at
    /// `offset` of file `r`; zeros beyond the buffer (padding of a larger world).
    fn read(
        &mut self,
        offset: u64,
        chunk: usize,
        start: usize,
        len: usize,
    ) -> Result<Vec<f32>, String> {
        let mut out = vec![0.0f32; len];
        let mut at = start;
        while at < start + len && chunk > 0 {
            let (r, within) = (at / chunk, at % chunk);
            if r >= self.files.len() {
                break;
            }
            let run = (chunk - within).min(start + len - at);
            let (path, file) = &mut self.files[r];
            let mut bytes = vec![0u8; run * 4];
            file.seek(SeekFrom::Start(offset + (within * 4) as u64))
                .and_then(|_| file.read_exact(&mut bytes))
                .map_err(|e| format!("{}: {e} (truncated?)", path.display()))?;
            for (o, b) in out[at - start..at - start + run]
                .iter_mut()
                .zip(bytes.chunks_exact(4))
            {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            at += run;
        }
        Ok(out)
    }
}
