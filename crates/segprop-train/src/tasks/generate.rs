//! Multiple-choice tasks built from the held-out text of a job's corpus (text no stage trains
//! on), in the shape [`super::score`] reads:
//!
//! - `ending` (HellaSwag-like): the previous line and the first half of a line; the right second
//!   half among the second halves of 3 other held-out lines (4 choices, chance 0.25).
//! - `cloze` (Winogrande-like, two options): a line cut before a content word; the options are
//!   that word and an earlier content word of the same line, each followed by the rest of the
//!   line (chance 0.5).

use std::path::Path;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use segprop_core::{DataFormat, DataSpec, JobSpec, TaskExample};

use crate::data::Tokenizer;
use crate::error::TrainError;

/// The held-out text of `spec`'s corpus: the tokens of the eval sequences, decoded (the split
/// [`crate::data::Dataset::from_tokens`] makes: the last `eval_fraction` of the sequences).
pub fn held_out_text(
    spec: &DataSpec,
    tokenizer: &Tokenizer,
    seed: u64,
) -> Result<String, TrainError> {
    let text = if spec.corpus == "builtin:synthetic" {
        crate::data::synthetic_corpus(spec.synthetic_tokens, seed)
    } else {
        std::fs::read_to_string(&spec.corpus).map_err(|e| TrainError::Corpus {
            path: spec.corpus.clone().into(),
            message: e.to_string(),
        })?
    };
    let mut tokens = tokenizer.encode(&text)?;
    if spec.max_tokens > 0 {
        tokens.truncate(spec.max_tokens);
    }
    let t = spec.seq_len;
    let sequences = tokens.windows(t + 1).step_by(t).count();
    let num_eval = ((sequences as f64) * spec.eval_fraction).ceil() as usize;
    let start = sequences.saturating_sub(num_eval) * t;
    Ok(tokenizer.decode(&tokens[start.min(tokens.len())..]))
}

/// Lines of the held-out text, trimmed; the first (cut by the split) is dropped.
fn lines(text: &str) -> Vec<&str> {
    text.lines().skip(1).map(str::trim).collect()
}

/// The previous non-empty line before `i` (the context a reader would have), if any.
fn previous<'a>(lines: &[&'a str], i: usize) -> Option<&'a str> {
    lines[..i].iter().rev().find(|l| !l.is_empty()).copied()
}

fn context(lines: &[&str], i: usize, head: &str) -> String {
    match previous(lines, i) {
        Some(prev) => format!("{prev}\n{head}"),
        None => head.to_string(),
    }
}

/// `ending` examples: up to `count` lines of at least 6 words.
pub fn ending_task(text: &str, count: usize, seed: u64) -> Vec<TaskExample> {
    let lines = lines(text);
    let usable: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].split_whitespace().count() >= 6)
        .collect();
    let halves: Vec<(String, String)> = usable
        .iter()
        .map(|&i| {
            let words: Vec<&str> = lines[i].split_whitespace().collect();
            let cut = words.len() / 2;
            (
                words[..cut].join(" "),
                format!(" {}", words[cut..].join(" ")),
            )
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(seed ^ 0xe7d1);
    let mut order: Vec<usize> = (0..usable.len()).collect();
    order.shuffle(&mut rng);
    let mut out = Vec::new();
    for &u in order.iter().take(count) {
        let right = &halves[u].1;
        let mut choices = vec![right.clone()];
        for other in super::pick_others(&mut rng, usable.len(), u, 12) {
            let candidate = &halves[other].1;
            if choices.len() < 4 && !choices.contains(candidate) {
                choices.push(candidate.clone());
            }
        }
        if choices.len() < 4 {
            continue;
        }
        choices.shuffle(&mut rng);
        let gold = choices.iter().position(|c| c == right).unwrap_or(0);
        out.push(TaskExample {
            context: context(&lines, usable[u], &halves[u].0),
            choices,
            gold,
        });
    }
    out
}

/// Words too common to make a cloze option.
const STOPWORDS: &[&str] = &[
    "that", "which", "with", "unto", "them", "they", "their", "there", "then", "this", "these",
    "those", "shall", "have", "hath", "were", "from", "what", "when", "will", "would", "thee",
    "thou", "thine", "your", "upon", "into", "also", "been", "every", "should", "could", "than",
    "here", "where", "whom", "more", "some", "such",
];

/// A word of a line split into its letters and what follows them (`earth.` → `earth`, `.`);
/// `None` unless it is letters then punctuation.
fn core(word: &str) -> Option<(&str, &str)> {
    let end = word
        .char_indices()
        .find(|(_, c)| !c.is_alphabetic())
        .map_or(word.len(), |(i, _)| i);
    let (letters, rest) = word.split_at(end);
    (letters.len() >= 4
        && rest.chars().all(|c| c.is_ascii_punctuation())
        && !STOPWORDS.contains(&letters.to_lowercase().as_str()))
    .then_some((letters, rest))
}

/// `cloze` examples: up to `count` lines with two different content words.
pub fn cloze_task(text: &str, count: usize, seed: u64) -> Vec<TaskExample> {
    let lines = lines(text);
    let mut candidates = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() < 6 {
            continue;
        }
        // The blank: the last content word at position >= 3 that differs from an earlier one.
        let found = (3..words.len()).rev().find_map(|b| {
            let (blank, _) = core(words[b])?;
            let other = (0..b).find_map(|o| {
                let (w, _) = core(words[o])?;
                (!w.eq_ignore_ascii_case(blank)).then_some(w)
            })?;
            Some((b, other))
        });
        if let Some((b, other)) = found {
            candidates.push((i, b, other.to_string()));
        }
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc102e);
    candidates.shuffle(&mut rng);
    candidates
        .into_iter()
        .take(count)
        .map(|(i, b, other)| {
            let words: Vec<&str> = lines[i].split_whitespace().collect();
            let (blank, punct) = core(words[b]).unwrap_or((words[b], ""));
            let rest: String = words[b + 1..].iter().map(|w| format!(" {w}")).collect();
            let right = format!(" {blank}{punct}{rest}");
            let wrong = format!(" {other}{punct}{rest}");
            let mut choices = vec![right.clone(), wrong];
            choices.shuffle(&mut rng);
            let gold = choices.iter().position(|c| *c == right).unwrap_or(0);
            TaskExample {
                context: context(&lines, i, &words[..b].join(" ")),
                choices,
                gold,
            }
        })
        .collect()
}

/// Writes `ending.jsonl` and `cloze.jsonl` for `spec`'s corpus into `out`; returns the files and
/// their example counts.
pub fn write_tasks(
    job: &JobSpec,
    out: &Path,
    count: usize,
    seed: u64,
) -> Result<Vec<(std::path::PathBuf, usize)>, TrainError> {
    let spec = &job.data;
    if spec.format == DataFormat::Chat {
        return Err(TrainError::Task(
            "tasks are built from a text corpus's held-out lines; data.format is `chat`".into(),
        ));
    }
    let tokenizer = Tokenizer::load(&job.tokenizer()?)?;
    let text = held_out_text(spec, &tokenizer, job.seed)?;
    std::fs::create_dir_all(out).map_err(TrainError::io(out))?;
    let mut written = Vec::new();
    for (name, examples) in [
        ("ending", ending_task(&text, count, seed)),
        ("cloze", cloze_task(&text, count, seed)),
    ] {
        if examples.is_empty() {
            return Err(TrainError::Task(format!(
                "the held-out text of {} ({} bytes) has no lines for the `{name}` task; use a \
                 larger data.eval_fraction",
                spec.corpus,
                text.len()
            )));
        }
        let path = out.join(format!("{name}.jsonl"));
        let mut body = String::new();
        for e in &examples {
            body.push_str(&serde_json::to_string(e).unwrap_or_default());
            body.push('\n');
        }
        std::fs::write(&path, body).map_err(TrainError::io(&path))?;
        written.push((path, examples.len()));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "cut line\n\
        In the beginning God created the heaven and the earth.\n\
        And the earth was without form, and void; and darkness was upon the deep.\n\
        And God said, Let there be light: and there was light.\n\
        And God saw the light, that it was good: and God divided the light.\n\
        And God called the light Day, and the darkness he called Night.\n\
        And the evening and the morning were the first day.\n";

    #[test]
    fn ending_examples_keep_the_true_ending_among_four() {
        let examples = ending_task(TEXT, 10, 1);
        assert!(!examples.is_empty());
        for e in &examples {
            assert_eq!(e.choices.len(), 4);
            // Context + the right ending is a line of the text (after the previous line).
            let line = format!("{}{}", e.context, e.choices[e.gold]);
            let last = line.lines().last().unwrap();
            assert!(TEXT.lines().any(|l| l == last), "{last}");
            assert!(!e.context.contains("cut line"));
        }
        assert_eq!(examples, ending_task(TEXT, 10, 1));
    }

    #[test]
    fn cloze_options_are_words_of_the_same_line() {
        let examples = cloze_task(TEXT, 10, 1);
        assert!(!examples.is_empty());
        for e in &examples {
            assert_eq!(e.choices.len(), 2);
            let line = format!("{}{}", e.context, e.choices[e.gold]);
            let last = line.lines().last().unwrap().to_string();
            assert!(TEXT.lines().any(|l| l == last), "{last}");
            let wrong = &e.choices[1 - e.gold];
            let word = wrong.split_whitespace().next().unwrap();
            let word = word.trim_end_matches(|c: char| c.is_ascii_punctuation());
            assert!(last.contains(word), "{word} not in {last}");
        }
    }
}
