//! Downstream evaluation: multiple-choice tasks scored by log-likelihood, the way
//! lm-eval-harness scores its `multiple_choice` tasks (MMLU and Winogrande in the papers).
//!
//! For every example the model reads `prompt + choice` for each choice, where the prompt is
//! `shots` solved examples (context and right choice, separated by a blank line) and then the
//! example's context, cut from the left to `data.seq_len` tokens. A choice scores the summed
//! log-probability of its tokens. `acc` counts examples whose right choice scores highest;
//! `acc_norm` does the same with each score divided by the choice's length in bytes (lm-eval's
//! length normalisation).
//!
//! [`generate`] writes such tasks from the held-out text of a job's corpus.

pub mod generate;

use std::path::Path;

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use segprop_core::{TaskExample, TaskSpec};
use segprop_model::precision::to_dtype;

use crate::data::Tokenizer;
use crate::engine::Trainer;
use crate::error::TrainError;
pub use crate::metrics::TaskScore;
use crate::route::Route;

/// Rows scored together in one forward pass.
const ROWS_PER_PASS: usize = 8;

/// One `prompt + choice` sequence: tokens, and which positions of it predict the choice.
struct Row {
    tokens: Vec<u32>,
    /// Positions `i` (in `tokens[..len-1]`) whose next token `tokens[i+1]` is a choice token.
    scored: std::ops::Range<usize>,
}

/// The prompt of example `index`: `shots` other examples, solved, then its context.
fn prompt(examples: &[TaskExample], index: usize, shots: usize) -> String {
    let mut text = String::new();
    if shots > 0 && examples.len() > 1 {
        let mut others: Vec<usize> = (0..examples.len()).filter(|&i| i != index).collect();
        let mut rng = StdRng::seed_from_u64(0x5107 ^ (index as u64).wrapping_mul(0x9e37_79b9));
        others.shuffle(&mut rng);
        for &i in others.iter().take(shots) {
            let e = &examples[i];
            text.push_str(&e.context);
            text.push_str(&e.choices[e.gold]);
            text.push_str("\n\n");
        }
    }
    text.push_str(&examples[index].context);
    text
}

/// Tokenizes `prompt + choice` into a row of at most `seq_len + 1` tokens (the prompt is cut from
/// the left; a choice longer than the window keeps its first tokens).
fn row(tokenizer: &Tokenizer, prompt: &str, choice: &str, seq_len: usize) -> Row {
    let context = tokenizer.encode_plain(prompt);
    let mut cont = tokenizer.encode_plain(choice);
    cont.truncate(seq_len);
    let keep_context = (seq_len + 1 - cont.len()).min(context.len());
    let mut tokens = context[context.len() - keep_context..].to_vec();
    let first = tokens.len();
    tokens.extend(&cont);
    Row {
        tokens,
        // Position i predicts token i + 1: the choice's tokens are predicted from first - 1 on.
        scored: first.saturating_sub(1)..first.saturating_sub(1) + cont.len(),
    }
}

/// Summed log-probability of each row's scored tokens under `route`'s network.
fn score_rows<B: AutodiffBackend>(trainer: &Trainer<B>, route: Route, rows: &[Row]) -> Vec<f64> {
    let model = trainer.model.valid();
    let t = trainer.spec.data.seq_len;
    let device = &trainer.device;
    let mut scores = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(ROWS_PER_PASS) {
        let b = chunk.len();
        let mut inputs = vec![0i64; b * t];
        let mut targets = vec![0i64; b * t];
        for (r, row) in chunk.iter().enumerate() {
            let n = row.tokens.len() - 1;
            for i in 0..n {
                inputs[r * t + i] = i64::from(row.tokens[i]);
                targets[r * t + i] = i64::from(row.tokens[i + 1]);
            }
        }
        let inputs =
            Tensor::<B::InnerBackend, 2, Int>::from_data(TensorData::new(inputs, [b, t]), device);
        let targets = Tensor::<B::InnerBackend, 3, Int>::from_data(
            TensorData::new(targets, [b, t, 1]),
            device,
        );
        let x = to_dtype(model.embed(inputs), trainer.compute);
        let logits = route.forward_network(&model, x, &trainer.adapter, &trainer.rope_inner);
        let logp = log_softmax(to_dtype(logits, DType::F32), 2).gather(2, targets);
        let values: Vec<f32> = logp
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap_or_default();
        for (r, row) in chunk.iter().enumerate() {
            let sum: f64 = row
                .scored
                .clone()
                .map(|i| f64::from(values[r * t + i]))
                .sum();
            scores.push(sum);
        }
    }
    scores
}

/// Scores one task on `route`'s network.
fn score_task<B: AutodiffBackend>(
    trainer: &Trainer<B>,
    route: Route,
    spec: &TaskSpec,
) -> Result<TaskScore, TrainError> {
    let examples =
        segprop_core::spec::read_task_file(Path::new(&spec.path)).map_err(TrainError::Task)?;
    let n = match spec.max_examples {
        0 => examples.len(),
        m => m.min(examples.len()),
    };
    let tokenizer = &trainer.data.tokenizer;
    let seq_len = trainer.spec.data.seq_len;
    let mut rows = Vec::new();
    for index in 0..n {
        let prompt = prompt(&examples, index, spec.shots);
        for choice in &examples[index].choices {
            rows.push(row(tokenizer, &prompt, choice, seq_len));
        }
    }
    let scores = score_rows(trainer, route, &rows);
    let (mut right, mut right_norm, mut chance) = (0usize, 0usize, 0.0);
    let mut at = 0;
    for example in &examples[..n] {
        let k = example.choices.len();
        let s = &scores[at..at + k];
        let norm: Vec<f64> = s
            .iter()
            .zip(&example.choices)
            .map(|(v, c)| v / c.len().max(1) as f64)
            .collect();
        right += usize::from(argmax(s) == example.gold);
        right_norm += usize::from(argmax(&norm) == example.gold);
        chance += 1.0 / k as f64;
        at += k;
    }
    let acc = right as f64 / n as f64;
    Ok(TaskScore {
        task: spec.display_name(),
        examples: n,
        shots: spec.shots,
        acc,
        acc_norm: right_norm as f64 / n as f64,
        acc_stderr: (acc * (1.0 - acc) / (n.saturating_sub(1).max(1)) as f64).sqrt(),
        chance: chance / n as f64,
    })
}

/// The first index of the largest value (ties go to the earlier choice, as lm-eval's argmax).
fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// Scores every task of `eval.tasks` on the network `route` describes, run from the embedding
/// on the current weights (for a SegProp stage: the committed prefix, the segment, the adapter
/// and LL(r)). Empty when the job has no tasks.
pub fn score<B: AutodiffBackend>(
    trainer: &Trainer<B>,
    route: Route,
) -> Result<Vec<TaskScore>, TrainError> {
    if trainer.shards.is_some() {
        // Refused by the spec's validation; kept as a guard for callers that build specs.
        return Ok(Vec::new());
    }
    trainer
        .spec
        .eval
        .tasks
        .iter()
        .map(|task| score_task(trainer, route, task))
        .collect()
}

/// A seeded pick of `count` distinct indices of `0..len` other than `skip`.
pub(crate) fn pick_others(rng: &mut StdRng, len: usize, skip: usize, count: usize) -> Vec<usize> {
    let mut picked = Vec::with_capacity(count);
    let mut tries = 0;
    while picked.len() < count && tries < count * 50 {
        tries += 1;
        let i = rng.random_range(0..len);
        if i != skip && !picked.contains(&i) {
            picked.push(i);
        }
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(context: &str, choices: &[&str], gold: usize) -> TaskExample {
        TaskExample {
            context: context.into(),
            choices: choices.iter().map(|c| c.to_string()).collect(),
            gold,
        }
    }

    #[test]
    fn rows_score_exactly_the_choice_tokens() {
        let tok = Tokenizer::Byte;
        let r = row(&tok, "abc", " de", 16);
        assert_eq!(
            r.tokens,
            b"abc de".iter().map(|b| u32::from(*b)).collect::<Vec<_>>()
        );
        // Positions 2, 3, 4 predict ' ', 'd', 'e'.
        assert_eq!(r.scored, 2..5);
        // A long prompt is cut from the left; the window is seq_len + 1 tokens.
        let r = row(&tok, "0123456789", "ab", 5);
        assert_eq!(
            r.tokens,
            b"6789ab".iter().map(|b| u32::from(*b)).collect::<Vec<_>>()
        );
        assert_eq!(r.scored, 3..5);
    }

    #[test]
    fn prompts_put_solved_shots_first_and_never_the_example_itself() {
        let examples = vec![
            example("q0", &[" a", " b"], 0),
            example("q1", &[" c", " d"], 1),
            example("q2", &[" e", " f"], 0),
        ];
        assert_eq!(prompt(&examples, 1, 0), "q1");
        let p = prompt(&examples, 1, 2);
        assert!(p.ends_with("\n\nq1"), "{p}");
        assert!(p.contains("q0 a\n\n") && p.contains("q2 e\n\n"), "{p}");
        assert!(!p.starts_with("q1"));
        // Deterministic.
        assert_eq!(p, prompt(&examples, 1, 2));
    }

    #[test]
    fn argmax_prefers_the_first_of_equals() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[-1.0]), 0);
    }
}
