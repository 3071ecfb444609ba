//! Training data: corpora (text, or chat JSONL rendered by [`crate::chat`]), packing into
//! fixed-length sequences, the train/eval split and deterministic batches.
//!
//! Batches have stable ids and fixed contents for the whole job (only their order changes between
//! epochs): SnapCheck keys cached activations by `(depth, batch id)`. A target the loss skips
//! (a prompt token of a chat example, padding) is [`IGNORE_TARGET`].

use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use segprop_core::{DataFormat, DataSpec, JobSpec};
pub use segprop_model::model::IGNORE_TARGET;

use crate::error::TrainError;
pub use crate::tokenizer::Tokenizer;

/// A deterministic synthetic English-like corpus: sentences drawn from a sparse random Markov
/// chain over a seeded vocabulary of invented words. Learnable at several levels (spelling,
/// word transitions, sentence structure), so depth helps, and it needs no files.
pub fn synthetic_corpus(approx_bytes: usize, seed: u64) -> String {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5e9_0000_0000_0001);
    let letters = b"etaoinshrdlucmfwypvbgk";
    let num_words = 96;
    let words: Vec<String> = (0..num_words)
        .map(|_| {
            let len = rng.random_range(2..=7);
            (0..len)
                .map(|_| letters[rng.random_range(0..letters.len())] as char)
                .collect()
        })
        .collect();
    // Each word has four successors with skewed probabilities (0.55, 0.25, 0.15, 0.05).
    let successors: Vec<[usize; 4]> = (0..num_words)
        .map(|_| std::array::from_fn(|_| rng.random_range(0..num_words)))
        .collect();
    let weights = [0.55, 0.25, 0.15, 0.05];
    let mut text = String::with_capacity(approx_bytes + 64);
    let mut word = 0usize;
    let mut sentence_len = 0;
    let mut capital = true;
    while text.len() < approx_bytes {
        let w = &words[word];
        if capital {
            let mut chars = w.chars();
            if let Some(first) = chars.next() {
                text.push(first.to_ascii_uppercase());
                text.push_str(chars.as_str());
            }
            capital = false;
        } else {
            text.push_str(w);
        }
        sentence_len += 1;
        if sentence_len >= 4 && rng.random_bool(0.2) {
            text.push_str(if rng.random_bool(0.8) { ". " } else { "? " });
            sentence_len = 0;
            capital = true;
            word = rng.random_range(0..num_words);
            continue;
        }
        text.push(' ');
        let u: f64 = rng.random();
        let mut acc = 0.0;
        let mut pick = 3;
        for (i, w) in weights.iter().enumerate() {
            acc += w;
            if u < acc {
                pick = i;
                break;
            }
        }
        word = successors[word][pick];
    }
    text
}

/// One micro-batch: `batch` sequences of `seq` inputs and their next-token targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Stable id within its split.
    pub id: usize,
    pub batch: usize,
    pub seq: usize,
    /// Row-major `[batch, seq]`.
    pub inputs: Vec<i64>,
    /// Row-major `[batch, seq]`; [`IGNORE_TARGET`] where no loss is taken.
    pub targets: Vec<i64>,
}

impl Batch {
    /// Sequences `rows` of this batch, as a batch of its own (same id: a micro-batch of the
    /// batch the snapshot cache knows).
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Batch {
        let span = rows.start * self.seq..rows.end * self.seq;
        Batch {
            id: self.id,
            batch: rows.len(),
            seq: self.seq,
            inputs: self.inputs[span.clone()].to_vec(),
            targets: self.targets[span].to_vec(),
        }
    }

    /// Targets the loss is taken on.
    pub fn trained_targets(&self) -> usize {
        self.targets.iter().filter(|t| **t != IGNORE_TARGET).count()
    }

    /// The row ranges of passes of at most `micro` sequences (one pass when `micro` is 0 or
    /// covers the batch).
    pub fn passes(&self, micro: usize) -> Vec<std::ops::Range<usize>> {
        let micro = if micro == 0 { self.batch } else { micro };
        (0..self.batch)
            .step_by(micro.max(1))
            .map(|start| start..(start + micro).min(self.batch))
            .collect()
    }
}

/// The weight of the pass over `rows` of `batch` in a step over `batches` (gradient
/// accumulation): its share of the step's trained targets, so the step's loss is the mean over
/// every trained target. When every target is trained this is the pass's share of the
/// sequences, computed as it was before targets could be skipped (the same bits).
pub fn pass_weight(batches: &[&Batch], batch: &Batch, rows: std::ops::Range<usize>) -> f64 {
    let trained: usize = batches.iter().map(|b| b.trained_targets()).sum();
    let all: usize = batches.iter().map(|b| b.targets.len()).sum();
    if trained == all {
        return 1.0 / batches.len() as f64 * rows.len() as f64 / batch.batch as f64;
    }
    if trained == 0 {
        return 0.0;
    }
    let span = rows.start * batch.seq..rows.end * batch.seq;
    let mine = batch.targets[span]
        .iter()
        .filter(|t| **t != IGNORE_TARGET)
        .count();
    mine as f64 / trained as f64
}

/// The held-out loss from each batch's mean `losses`: the mean over every trained target
/// (batches weighted by their trained targets; the plain mean of the batches when every target
/// is trained).
pub fn held_out_mean(losses: &[f64], batches: &[Batch]) -> f64 {
    let trained: Vec<usize> = batches.iter().map(Batch::trained_targets).collect();
    if batches
        .iter()
        .zip(&trained)
        .all(|(b, t)| *t == b.targets.len())
    {
        return losses.iter().sum::<f64>() / losses.len().max(1) as f64;
    }
    let total: usize = trained.iter().sum();
    let sum: f64 = losses
        .iter()
        .zip(&trained)
        .map(|(l, t)| l * *t as f64)
        .sum();
    sum / total.max(1) as f64
}

/// The packed, split and batched data of a job.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub train: Vec<Batch>,
    pub eval: Vec<Batch>,
    pub tokenizer: Tokenizer,
    pub total_tokens: usize,
}

impl Dataset {
    /// Loads the corpus `spec` names, tokenizes and packs it.
    pub fn load(spec: &JobSpec) -> Result<Self, TrainError> {
        let tokenizer = Tokenizer::load(&spec.tokenizer()?)?;
        Self::load_with(&spec.data, tokenizer, spec.seed)
    }

    /// [`Dataset::load`] with the tokenizer given.
    pub fn load_with(spec: &DataSpec, tokenizer: Tokenizer, seed: u64) -> Result<Self, TrainError> {
        let corpus_err = |message: String| TrainError::Corpus {
            path: spec.corpus.clone().into(),
            message,
        };
        if spec.format == DataFormat::Chat {
            let hf = tokenizer.hf().ok_or_else(|| {
                corpus_err("data.format `chat` needs a Hugging Face tokenizer".into())
            })?;
            let examples = crate::chat::load(Path::new(&spec.corpus), hf)?;
            let total_tokens = examples.iter().map(|e| e.ids.len()).sum();
            let sequences = if spec.packing {
                let ids: Vec<u32> = examples.iter().flat_map(|e| e.ids.clone()).collect();
                let trained: Vec<bool> = examples.iter().flat_map(|e| e.trained.clone()).collect();
                windows(&ids, Some(&trained), spec.seq_len)
            } else {
                let pad = hf.pad_id.ok_or_else(|| {
                    corpus_err(format!(
                        "data.packing false pads each example, and the tokenizer at {} names \
                         no pad_token or eos_token",
                        hf.path.display()
                    ))
                })?;
                examples
                    .iter()
                    .map(|e| padded(e, spec.seq_len + 1, pad))
                    .collect()
            };
            let data = Self::from_sequences(sequences, spec, tokenizer, seed, total_tokens)
                .map_err(corpus_err)?;
            if data
                .train
                .iter()
                .chain(&data.eval)
                .all(|b| b.trained_targets() == 0)
            {
                return Err(corpus_err(
                    "no trainable token lands in a batch: every assistant token is cut by \
                     data.seq_len or left in a partial batch"
                        .into(),
                ));
            }
            return Ok(data);
        }
        let text = if spec.corpus == "builtin:synthetic" {
            // Byte-ish size: the synthetic text has ~1 token per byte with the byte tokenizer.
            synthetic_corpus(spec.synthetic_tokens, seed)
        } else {
            let path = Path::new(&spec.corpus);
            std::fs::read_to_string(path).map_err(|e| corpus_err(e.to_string()))?
        };
        let mut tokens = tokenizer.encode(&text)?;
        if spec.max_tokens > 0 {
            tokens.truncate(spec.max_tokens);
        }
        Self::from_tokens(&tokens, spec, tokenizer, seed).map_err(corpus_err)
    }

    /// Packs `tokens` into sequences of `seq_len + 1`, holds out the last `eval_fraction` of them
    /// (text the model never trains on), shuffles the rest once with `seed` and groups them into
    /// batches of `batch_size`.
    pub fn from_tokens(
        tokens: &[u32],
        spec: &DataSpec,
        tokenizer: Tokenizer,
        seed: u64,
    ) -> Result<Self, String> {
        let sequences = windows(tokens, None, spec.seq_len);
        Self::from_sequences(sequences, spec, tokenizer, seed, tokens.len())
    }

    /// Splits `sequences` (each `seq_len + 1` tokens) as [`Dataset::from_tokens`] does.
    fn from_sequences(
        sequences: Vec<Sequence>,
        spec: &DataSpec,
        tokenizer: Tokenizer,
        seed: u64,
        total_tokens: usize,
    ) -> Result<Self, String> {
        let t = spec.seq_len;
        let b = spec.batch_size.get();
        if spec.batch_size == segprop_core::BatchSize::Auto {
            return Err(
                "data.batch_size: `auto` is resolved by the coordinator against a worker's \
                 memory when the job is submitted (segprop-coord submit); give a number of \
                 sequences to train here"
                    .into(),
            );
        }
        if spec.micro_batch == Some(segprop_core::MicroBatch::Auto) {
            return Err(
                "data.micro_batch: `auto` is resolved by the coordinator against a worker's \
                 memory when the job is submitted (segprop-coord submit); give a number of \
                 sequences (or a map from stage name to a number) to train here"
                    .into(),
            );
        }
        let num_eval = ((sequences.len() as f64) * spec.eval_fraction).ceil() as usize;
        let num_train = sequences.len().saturating_sub(num_eval);
        if num_train < b || num_eval < b {
            return Err(format!(
                "corpus has {} tokens: {} train and {} eval sequences of length {}, but a batch \
                 needs {b}; use a larger corpus, a shorter data.seq_len or a smaller data.batch_size",
                total_tokens, num_train, num_eval, t
            ));
        }
        let (train_seqs, eval_seqs) = sequences.split_at(num_train);
        let mut order: Vec<usize> = (0..train_seqs.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(seed ^ 0xda7a));
        let train_ordered: Vec<&Sequence> = order.iter().map(|&i| &train_seqs[i]).collect();
        let eval_ordered: Vec<&Sequence> = eval_seqs.iter().collect();
        Ok(Self {
            train: make_batches(&train_ordered, b, t),
            eval: make_batches(&eval_ordered, b, t),
            tokenizer,
            total_tokens,
        })
    }

    /// Order in which epoch `epoch` visits the train batches (a seeded permutation).
    pub fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.train.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(
            seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ epoch,
        ));
        order
    }
}

/// `seq_len + 1` tokens: a row's inputs and (shifted by one) its targets, with whether each
/// token is trained on (None: all are).
#[derive(Debug, Clone)]
struct Sequence {
    tokens: Vec<u32>,
    trained: Option<Vec<bool>>,
}

/// Windows of `seq_len + 1` tokens stepping by `seq_len` (consecutive windows share one token:
/// the last input of one is the first of the next); a partial last window is dropped.
fn windows(tokens: &[u32], trained: Option<&[bool]>, seq_len: usize) -> Vec<Sequence> {
    (0..)
        .map(|k| k * seq_len)
        .take_while(|start| start + seq_len < tokens.len())
        .map(|start| {
            let span = start..start + seq_len + 1;
            Sequence {
                tokens: tokens[span.clone()].to_vec(),
                trained: trained.map(|f| f[span].to_vec()),
            }
        })
        .collect()
}

/// One example as one row of `len` tokens: cut, or padded with `pad` (not trained on).
fn padded(example: &crate::chat::Example, len: usize, pad: u32) -> Sequence {
    let mut tokens: Vec<u32> = example.ids.iter().copied().take(len).collect();
    let mut trained: Vec<bool> = example.trained.iter().copied().take(len).collect();
    tokens.resize(len, pad);
    trained.resize(len, false);
    Sequence {
        tokens,
        trained: Some(trained),
    }
}

fn make_batches(sequences: &[&Sequence], b: usize, t: usize) -> Vec<Batch> {
    sequences
        .chunks_exact(b)
        .enumerate()
        .map(|(id, rows)| {
            let mut inputs = Vec::with_capacity(b * t);
            let mut targets = Vec::with_capacity(b * t);
            for row in rows {
                inputs.extend(row.tokens[..t].iter().map(|&x| i64::from(x)));
                targets.extend(row.tokens[1..].iter().enumerate().map(
                    |(j, &x)| match &row.trained {
                        Some(trained) if !trained[j + 1] => IGNORE_TARGET,
                        _ => i64::from(x),
                    },
                ));
            }
            Batch {
                id,
                batch: b,
                seq: t,
                inputs,
                targets,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(seq_len: usize, batch_size: usize) -> DataSpec {
        DataSpec {
            corpus: "builtin:synthetic".into(),
            tokenizer: None,
            format: segprop_core::DataFormat::Text,
            packing: true,
            seq_len,
            batch_size: segprop_core::BatchSize::Fixed(batch_size),
            eval_fraction: 0.1,
            synthetic_tokens: 20_000,
            max_tokens: 0,
            micro_batch: None,
        }
    }

    #[test]
    fn synthetic_corpus_is_deterministic_and_seeded() {
        assert_eq!(synthetic_corpus(5000, 1), synthetic_corpus(5000, 1));
        assert_ne!(synthetic_corpus(5000, 1), synthetic_corpus(5000, 2));
        assert!(synthetic_corpus(5000, 1).is_ascii());
    }

    #[test]
    fn packing_shifts_targets_and_holds_out_the_tail() {
        let data = Dataset::load_with(&spec(16, 4), Tokenizer::Byte, 3).unwrap();
        let b = &data.train[0];
        assert_eq!(b.inputs.len(), 64);
        // Within a row the targets are the inputs shifted by one.
        assert_eq!(&b.inputs[1..16], &b.targets[..15]);
        assert!(!data.eval.is_empty());
        let total_seqs = (data.total_tokens - 1) / 16;
        assert!(data.eval.len() * 4 <= total_seqs / 10 + 4);
    }

    #[test]
    fn too_small_corpus_is_explained() {
        let err = Dataset::from_tokens(&[1, 2, 3], &spec(16, 4), Tokenizer::Byte, 0).unwrap_err();
        assert!(err.contains("data.seq_len"), "{err}");
    }

    #[test]
    fn an_unresolved_auto_batch_is_explained() {
        let spec = DataSpec {
            batch_size: segprop_core::BatchSize::Auto,
            ..spec(16, 4)
        };
        let tokens: Vec<u32> = (0..2000).map(|i| i % 200).collect();
        let err = Dataset::from_tokens(&tokens, &spec, Tokenizer::Byte, 0).unwrap_err();
        assert!(
            err.contains("`auto` is resolved by the coordinator"),
            "{err}"
        );
    }

    #[test]
    fn an_unresolved_auto_micro_batch_is_explained() {
        let spec = DataSpec {
            micro_batch: Some(segprop_core::MicroBatch::Auto),
            ..spec(16, 4)
        };
        let tokens: Vec<u32> = (0..2000).map(|i| i % 200).collect();
        let err = Dataset::from_tokens(&tokens, &spec, Tokenizer::Byte, 0).unwrap_err();
        assert!(err.starts_with("data.micro_batch: `auto`"), "{err}");
    }

    #[test]
    fn a_batch_splits_into_passes_of_rows() {
        let batch = Batch {
            id: 7,
            batch: 5,
            seq: 2,
            inputs: (0..10).collect(),
            targets: (10..20).collect(),
        };
        assert_eq!(batch.passes(0), vec![(0..5)]);
        assert_eq!(batch.passes(5), vec![(0..5)]);
        assert_eq!(batch.passes(2), [0..2, 2..4, 4..5]);
        let last = batch.rows(4..5);
        assert_eq!((last.id, last.batch, last.seq), (7, 1, 2));
        assert_eq!((last.inputs, last.targets), (vec![8, 9], vec![18, 19]));
    }

    fn chat_spec(dir: &Path, packing: bool) -> DataSpec {
        let lines: String = (0..40)
            .map(|i| {
                format!(
                    "{{\"prompt\": \"q{i}\", \"completion\": \"{}\"}}\n",
                    "a".repeat(i % 7 + 1)
                )
            })
            .collect();
        let corpus = dir.join("chat.jsonl");
        std::fs::write(&corpus, lines).unwrap();
        DataSpec {
            corpus: corpus.display().to_string(),
            format: DataFormat::Chat,
            packing,
            ..spec(32, 2)
        }
    }

    #[test]
    fn chat_targets_are_the_assistant_tokens_packed_or_padded() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::tokenizer::write_test_tokenizer(dir.path());
        let tok = Tokenizer::load(&segprop_core::TokenizerKind::Hf(path)).unwrap();
        for packing in [true, false] {
            let data = Dataset::load_with(&chat_spec(dir.path(), packing), tok.clone(), 1).unwrap();
            let a = i64::from(tok.encode_plain("a")[0]);
            let eos = 1;
            for b in data.train.iter().chain(&data.eval) {
                // Every trained target is a reply's `a` or its closing </s>.
                assert!(
                    b.targets
                        .iter()
                        .all(|t| [IGNORE_TARGET, a, eos].contains(t))
                );
                // With packing a window may hold prompt tokens only; unpacked, every row holds
                // its whole example.
                assert!(packing || b.trained_targets() > 0);
                for (i, t) in b.targets.iter().enumerate() {
                    if *t != IGNORE_TARGET && (i + 1) % b.seq != 0 {
                        assert_eq!(b.inputs[i + 1], *t, "targets are the next inputs");
                    }
                }
            }
            if !packing {
                // One example per row: the row starts with the template's <s>; rows end in
                // padding (id 2), which is never a target.
                for b in &data.train {
                    for row in b.inputs.chunks(b.seq) {
                        assert_eq!(row[0], 0);
                        assert_eq!(*row.last().unwrap(), 2);
                    }
                }
            }
            // The same file gives the same batches (SnapCheck's batch ids stay stable).
            let again =
                Dataset::load_with(&chat_spec(dir.path(), packing), tok.clone(), 1).unwrap();
            assert_eq!(data.train, again.train);
            assert_eq!(data.eval, again.eval);
        }
    }

    #[test]
    fn masked_steps_and_evaluations_weigh_trained_targets() {
        let batch = |id, targets: Vec<i64>| Batch {
            id,
            batch: 2,
            seq: 2,
            inputs: vec![0; 4],
            targets,
        };
        let full = [batch(0, vec![1; 4]), batch(1, vec![1; 4])];
        let refs: Vec<&Batch> = full.iter().collect();
        assert_eq!(pass_weight(&refs, &full[0], 0..1), 0.25);
        assert_eq!(held_out_mean(&[1.0, 2.0], &full), 1.5);
        let masked = [
            batch(0, vec![1, IGNORE_TARGET, IGNORE_TARGET, IGNORE_TARGET]),
            batch(1, vec![1, 1, 1, IGNORE_TARGET]),
        ];
        let refs: Vec<&Batch> = masked.iter().collect();
        assert_eq!(pass_weight(&refs, &masked[0], 0..2), 0.25);
        assert_eq!(pass_weight(&refs, &masked[1], 0..1), 0.5);
        assert_eq!(pass_weight(&refs, &masked[1], 1..2), 0.25);
        // One target at loss 1.0 and three at 2.0: 7 / 4.
        assert_eq!(held_out_mean(&[1.0, 2.0], &masked), 1.75);
    }
}
