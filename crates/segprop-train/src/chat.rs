//! Instruction data (`data.format: chat`) tokenized: each conversation rendered by
//! [`segprop_core::chat`] with the tokenizer's chat template, then encoded, each token marked
//! trained (it starts inside an assistant turn's span) or not.

use std::path::Path;

use segprop_core::chat::{Template, render_file};

use crate::error::TrainError;
use crate::tokenizer::HfTokenizer;

/// One conversation tokenized.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// Per id: whether the loss is taken on it (an assistant token).
    pub trained: Vec<bool>,
}

fn chat_error(path: &Path, line: Option<usize>, message: impl Into<String>) -> TrainError {
    TrainError::Chat {
        path: path.to_path_buf(),
        line,
        message: message.into(),
    }
}

/// Reads the JSONL file at `path` and tokenizes each conversation with `tokenizer`'s chat
/// template. Errors name the file and line.
pub fn load(path: &Path, tokenizer: &HfTokenizer) -> Result<Vec<Example>, TrainError> {
    let source = tokenizer.chat_template.as_deref().ok_or_else(|| {
        chat_error(
            path,
            None,
            format!(
                "the tokenizer at {} has no chat_template in its tokenizer_config.json",
                tokenizer.path.display()
            ),
        )
    })?;
    let template = Template::new(
        source,
        tokenizer.bos_token.as_deref(),
        tokenizer.eos_token.as_deref(),
    )
    .map_err(|m| chat_error(path, None, m))?;
    let rendered =
        render_file(path, &template).map_err(|e| chat_error(&e.path, e.line, e.message))?;
    rendered
        .into_iter()
        .map(|r| {
            let encoding = tokenizer.encode(&r.text, false)?;
            let trained = encoding
                .get_offsets()
                .iter()
                .map(|&(start, _)| r.spans.iter().any(|&(a, b)| (a..b).contains(&start)))
                .collect();
            Ok(Example {
                ids: encoding.get_ids().to_vec(),
                trained,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::write_test_tokenizer;

    fn setup(lines: &str) -> (tempfile::TempDir, HfTokenizer, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let tok = HfTokenizer::open(&write_test_tokenizer(dir.path())).unwrap();
        let data = dir.path().join("chat.jsonl");
        std::fs::write(&data, lines).unwrap();
        (dir, tok, data)
    }

    /// The trained tokens of an example, decoded.
    fn trained_text(tok: &HfTokenizer, e: &Example) -> String {
        let ids: Vec<u32> = e
            .ids
            .iter()
            .zip(&e.trained)
            .filter(|(_, t)| **t)
            .map(|(id, _)| *id)
            .collect();
        tok.decode(&ids)
    }

    #[test]
    fn only_assistant_turns_and_their_end_token_are_trained() {
        let (_dir, tok, data) = setup(concat!(
            r#"{"prompt": "hi", "completion": " yo "}"#,
            "\n\n",
            r#"{"messages": [{"role": "system", "content": "be"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}"#,
            "\n",
        ));
        let examples = load(&data, &tok).unwrap();
        assert_eq!(examples.len(), 2, "the blank line is skipped");
        // "<s><user>hi</s><assistant>yo</s>": `| trim` drops the spaces around "yo".
        assert_eq!(
            tok.decode(&examples[0].ids),
            "<s><user>hi</s><assistant>yo</s>"
        );
        assert_eq!(trained_text(&tok, &examples[0]), "yo</s>");
        assert_eq!(trained_text(&tok, &examples[1]), "b</s>d</s>");
        assert_eq!(examples[1].ids[0], 0, "the template's <s>");
        assert!(!examples[1].trained[0]);
    }

    #[test]
    fn bad_lines_and_templates_are_named_with_their_line() {
        let (_dir, tok, data) =
            setup("{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": 1}\n");
        let err = load(&data, &tok).unwrap_err().to_string();
        assert!(err.contains("chat.jsonl line 2"), "{err}");

        let (_dir, tok, data) =
            setup("{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n");
        let err = load(&data, &tok).unwrap_err().to_string();
        assert!(err.contains("no trainable token"), "{err}");

        let (_dir, mut tok, data) = setup("{\"prompt\": \"a\", \"completion\": \"b\"}\n");
        tok.chat_template = Some("{{ raise_exception('no system role') }}".into());
        let err = load(&data, &tok).unwrap_err().to_string();
        assert!(
            err.contains("line 1") && err.contains("no system role"),
            "{err}"
        );
        tok.chat_template = Some("{% for %}".into());
        let err = load(&data, &tok).unwrap_err().to_string();
        assert!(err.contains("does not compile"), "{err}");
    }
}
