//! Training data: corpora, tokenizers, packing into fixed-length sequences, the train/eval split
//! and deterministic batches.
//!
//! Batches have stable ids and fixed contents for the whole job (only their order changes between
//! epochs): SnapCheck keys cached activations by `(depth, batch id)`.

use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use segprop_core::{DataSpec, TokenizerKind};

use crate::error::TrainError;

/// Turns text into token ids.
#[derive(Debug, Clone, Copy)]
pub struct Tokenizer {
    kind: TokenizerKind,
}

impl Tokenizer {
    pub fn new(kind: TokenizerKind) -> Self {
        Self { kind }
    }

    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self.kind {
            TokenizerKind::Byte => text.bytes().map(u32::from).collect(),
            TokenizerKind::Gpt2 => tiktoken_rs::r50k_base_singleton().encode_ordinary(text),
        }
    }

    pub fn decode(&self, tokens: &[u32]) -> String {
        match self.kind {
            TokenizerKind::Byte => {
                let bytes: Vec<u8> = tokens.iter().map(|t| (*t).min(255) as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            TokenizerKind::Gpt2 => tiktoken_rs::r50k_base_singleton()
                .decode(tokens.to_vec())
                .unwrap_or_default(),
        }
    }
}

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
    /// Row-major `[batch, seq]`.
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

/// The packed, split and batched data of a job.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub train: Vec<Batch>,
    pub eval: Vec<Batch>,
    pub tokenizer: Tokenizer,
    pub total_tokens: usize,
}

impl Dataset {
    /// Loads the corpus named by `spec`, tokenizes and packs it.
    pub fn load(spec: &DataSpec, seed: u64) -> Result<Self, TrainError> {
        let text = if spec.corpus == "builtin:synthetic" {
            // Byte-ish size: the synthetic text has ~1 token per byte with the byte tokenizer.
            synthetic_corpus(spec.synthetic_tokens, seed)
        } else {
            let path = Path::new(&spec.corpus);
            std::fs::read_to_string(path).map_err(|source| TrainError::Corpus {
                path: path.to_path_buf(),
                message: source.to_string(),
            })?
        };
        let tokenizer = Tokenizer::new(spec.tokenizer);
        let mut tokens = tokenizer.encode(&text);
        if spec.max_tokens > 0 {
            tokens.truncate(spec.max_tokens);
        }
        Self::from_tokens(&tokens, spec, tokenizer, seed).map_err(|message| TrainError::Corpus {
            path: spec.corpus.clone().into(),
            message,
        })
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
        let sequences: Vec<&[u32]> = tokens.windows(t + 1).step_by(t).collect();
        let num_eval = ((sequences.len() as f64) * spec.eval_fraction).ceil() as usize;
        let num_train = sequences.len().saturating_sub(num_eval);
        if num_train < b || num_eval < b {
            return Err(format!(
                "corpus has {} tokens: {} train and {} eval sequences of length {}, but a batch \
                 needs {b}; use a larger corpus, a shorter data.seq_len or a smaller data.batch_size",
                tokens.len(),
                num_train,
                num_eval,
                t
            ));
        }
        let (train_seqs, eval_seqs) = sequences.split_at(num_train);
        let mut order: Vec<usize> = (0..train_seqs.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(seed ^ 0xda7a));
        let train_ordered: Vec<&[u32]> = order.iter().map(|&i| train_seqs[i]).collect();
        Ok(Self {
            train: make_batches(&train_ordered, b, t),
            eval: make_batches(eval_seqs, b, t),
            tokenizer,
            total_tokens: tokens.len(),
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

fn make_batches(sequences: &[&[u32]], b: usize, t: usize) -> Vec<Batch> {
    sequences
        .chunks_exact(b)
        .enumerate()
        .map(|(id, rows)| {
            let mut inputs = Vec::with_capacity(b * t);
            let mut targets = Vec::with_capacity(b * t);
            for row in rows {
                inputs.extend(row[..t].iter().map(|&x| i64::from(x)));
                targets.extend(row[1..].iter().map(|&x| i64::from(x)));
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
            tokenizer: TokenizerKind::Byte,
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
        let data = Dataset::load(&spec(16, 4), 3).unwrap();
        let b = &data.train[0];
        assert_eq!(b.inputs.len(), 64);
        // Within a row the targets are the inputs shifted by one.
        assert_eq!(&b.inputs[1..16], &b.targets[..15]);
        assert!(!data.eval.is_empty());
        let total_seqs = (data.total_tokens - 1) / 16;
        assert!(data.eval.len() * 4 <= total_seqs / 10 + 4);
    }

    #[test]
    fn gpt2_tokenizer_round_trips() {
        let tok = Tokenizer::new(TokenizerKind::Gpt2);
        let ids = tok.encode("In the beginning God created the heaven and the earth.");
        assert!(ids.len() < 15);
        assert_eq!(
            tok.decode(&ids),
            "In the beginning God created the heaven and the earth."
        );
    }

    #[test]
    fn too_small_corpus_is_explained() {
        let err = Dataset::from_tokens(
            &[1, 2, 3],
            &spec(16, 4),
            Tokenizer::new(TokenizerKind::Byte),
            0,
        )
        .unwrap_err();
        assert!(err.contains("data.seq_len"), "{err}");
    }

    #[test]
    fn an_unresolved_auto_batch_is_explained() {
        let spec = DataSpec {
            batch_size: segprop_core::BatchSize::Auto,
            ..spec(16, 4)
        };
        let tokens: Vec<u32> = (0..2000).map(|i| i % 200).collect();
        let err = Dataset::from_tokens(&tokens, &spec, Tokenizer::new(TokenizerKind::Byte), 0)
            .unwrap_err();
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
        let err = Dataset::from_tokens(&tokens, &spec, Tokenizer::new(TokenizerKind::Byte), 0)
            .unwrap_err();
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
}
