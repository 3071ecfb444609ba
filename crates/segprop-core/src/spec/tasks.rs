//! `eval.tasks`: multiple-choice tasks scored by log-likelihood (lm-eval-harness's
//! `multiple_choice` shape), and the example format their JSONL files hold.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// One task of `eval.tasks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Name in reports; the file's stem when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// JSONL file, one [`TaskExample`] per line (relative to the job file).
    pub path: String,
    /// Solved examples put before each question (drawn from the file's other examples); the
    /// prompt is cut from the left to `data.seq_len` tokens.
    #[serde(default)]
    pub shots: usize,
    /// Score at most this many examples, the file's first (0 = all).
    #[serde(default)]
    pub max_examples: usize,
}

impl TaskSpec {
    /// The name reports use.
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            Path::new(&self.path)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| self.path.clone())
        })
    }
}

/// One multiple-choice question: the model scores `context + choice` for every choice by the
/// summed log-probability of the choice's tokens; the highest is its answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskExample {
    pub context: String,
    /// Continuations, appended to the context as they are (a leading space is part of them).
    pub choices: Vec<String>,
    /// Index of the right choice.
    pub gold: usize,
}

impl TaskExample {
    fn check(&self) -> Result<(), String> {
        if self.choices.len() < 2 {
            return Err(format!(
                "needs at least 2 choices, has {}",
                self.choices.len()
            ));
        }
        if self.gold >= self.choices.len() {
            return Err(format!(
                "gold {} is not an index of its {} choices",
                self.gold,
                self.choices.len()
            ));
        }
        if self.context.is_empty() {
            return Err("the context is empty".into());
        }
        if self.choices.iter().any(|c| c.is_empty()) {
            return Err("a choice is empty".into());
        }
        Ok(())
    }
}

/// Reads a task file: every line one [`TaskExample`]. Errors name the file and the line.
pub fn read_task_file(path: &Path) -> Result<Vec<TaskExample>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut examples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let example: TaskExample = serde_json::from_str(line)
            .map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))?;
        example
            .check()
            .map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))?;
        examples.push(example);
    }
    if examples.is_empty() {
        return Err(format!("{}: no examples", path.display()));
    }
    Ok(examples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_examples_and_names_the_bad_line() {
        let dir = std::env::temp_dir().join(format!("segprop-tasks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.jsonl");
        std::fs::write(
            &good,
            "{\"context\":\"a\",\"choices\":[\" b\",\" c\"],\"gold\":1}\n\n",
        )
        .unwrap();
        let examples = read_task_file(&good).unwrap();
        assert_eq!(examples.len(), 1);
        assert_eq!(examples[0].gold, 1);

        let bad = dir.join("bad.jsonl");
        std::fs::write(
            &bad,
            "{\"context\":\"a\",\"choices\":[\" b\",\" c\"],\"gold\":0}\n\
             {\"context\":\"a\",\"choices\":[\" b\",\" c\"],\"gold\":2}\n",
        )
        .unwrap();
        let err = read_task_file(&bad).unwrap_err();
        assert!(err.contains("line 2") && err.contains("gold 2"), "{err}");

        std::fs::write(&bad, "{\"context\":\"a\"}\n").unwrap();
        let err = read_task_file(&bad).unwrap_err();
        assert!(err.contains("line 1") && err.contains("choices"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn name_defaults_to_the_file_stem() {
        let t = TaskSpec {
            name: None,
            path: "data/tasks/kjv/ending.jsonl".into(),
            shots: 0,
            max_examples: 0,
        };
        assert_eq!(t.display_name(), "ending");
    }
}
