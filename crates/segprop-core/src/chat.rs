//! Instruction data (`data.format: chat`): JSONL conversations and their chat template.
//!
//! A line is `{"messages": [{"role": ..., "content": ...}, ...]}` or `{"prompt": ...,
//! "completion": ...}` (a user turn and an assistant turn); blank lines are skipped. The template
//! (`chat_template` of the tokenizer's `tokenizer_config.json`) is rendered as Hugging Face's
//! `apply_chat_template` renders it: Jinja with `trim_blocks` and `lstrip_blocks`, the variables
//! `messages`, `bos_token`, `eos_token`, `add_generation_prompt`, the function
//! `raise_exception` and Python's string methods. Assistant turn `i` spans the characters
//! between the rendering of the turns before it with the generation prompt and the rendering up
//! to and including it; the engine trains on the tokens that start inside such a span (each
//! reply and what the template closes it with), never on the prompt, roles or system text.
//!
//! It lives here, without a tokenizer, so a job's chat file is checked line by line when the
//! job is submitted; the engine (segprop-train `chat`) tokenizes what it renders.

use std::path::{Path, PathBuf};

use minijinja::{Environment, Error, ErrorKind, Value, context};
use serde::Serialize;

/// What a `tokenizer_config.json` says about chat: the template and the special tokens it uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    /// The Jinja chat template (`chat_template`; a list of named templates gives `default`).
    pub chat_template: Option<String>,
}

/// A special token of `tokenizer_config.json`: a string, or an added-token object with
/// `content`.
fn special(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl TokenizerConfig {
    /// The `tokenizer_config.json` beside the `tokenizer.json` at `tokenizer` (empty when there
    /// is none). Errors name the file.
    pub fn beside(tokenizer: &Path) -> Result<Self, String> {
        let path = tokenizer.with_file_name("tokenizer_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        // transformers (since 4.43) saves the template as chat_template.jinja beside the
        // config, and reads that file first.
        let jinja = tokenizer.with_file_name("chat_template.jinja");
        let from_file = match std::fs::read_to_string(&jinja) {
            Ok(template) => Some(template),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("{}: {e}", jinja.display())),
        };
        let chat_template = match json.get("chat_template") {
            _ if from_file.is_some() => from_file,
            Some(serde_json::Value::String(t)) => Some(t.clone()),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        Ok(Self {
            bos_token: special(&json, "bos_token"),
            eos_token: special(&json, "eos_token"),
            pad_token: special(&json, "pad_token"),
            chat_template,
        })
    }
}

/// A chat file's problem: the file, the line (1-based) when one line is at fault, and what.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{}: {message}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
pub struct ChatError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

/// One conversation rendered: the text and its assistant spans (in characters).
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub spans: Vec<(usize, usize)>,
}

/// One message: its role, and the whole object the template sees (`role`, `content` and any
/// other key the line gives, such as `name`, as transformers passes them).
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
struct Message {
    #[serde(skip)]
    role: String,
    value: serde_json::Value,
}

/// The messages of one JSONL line.
fn parse_line(text: &str) -> Result<Vec<Message>, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let object = value.as_object().ok_or("not a JSON object")?;
    let string = |v: &serde_json::Value, what: &str| {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("`{what}` must be a string"))
    };
    if let Some(messages) = object.get("messages") {
        if let Some(extra) = object.keys().find(|k| *k != "messages") {
            return Err(format!("unknown key `{extra}` next to `messages`"));
        }
        let list = messages.as_array().ok_or("`messages` must be a list")?;
        if list.is_empty() {
            return Err("`messages` is empty".into());
        }
        return list
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let m = m
                    .as_object()
                    .ok_or_else(|| format!("messages[{i}] must be an object"))?;
                let role = m
                    .get("role")
                    .ok_or_else(|| format!("messages[{i}] has no `role`"))?;
                let content = m
                    .get("content")
                    .ok_or_else(|| format!("messages[{i}] has no `content`"))?;
                string(content, &format!("messages[{i}].content"))?;
                Ok(Message {
                    role: string(role, &format!("messages[{i}].role"))?,
                    value: serde_json::Value::Object(m.clone()),
                })
            })
            .collect();
    }
    match (object.get("prompt"), object.get("completion")) {
        (Some(prompt), Some(completion)) => {
            if let Some(extra) = object.keys().find(|k| *k != "prompt" && *k != "completion") {
                return Err(format!(
                    "unknown key `{extra}` next to `prompt`/`completion`"
                ));
            }
            let message = |role: &str, content: String| Message {
                role: role.into(),
                value: serde_json::json!({ "role": role, "content": content }),
            };
            Ok(vec![
                message("user", string(prompt, "prompt")?),
                message("assistant", string(completion, "completion")?),
            ])
        }
        _ => Err("expected `messages`, or `prompt` and `completion`".into()),
    }
}

/// The chat template, compiled as transformers compiles it.
pub struct Template {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl Template {
    /// Compiles `source` as transformers compiles a chat template.
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", without_generation_tags(source))
            .map_err(|e| format!("the chat template does not compile: {e:#}"))?;
        Ok(Self {
            env,
            bos: bos_token.unwrap_or_default().to_string(),
            eos: eos_token.unwrap_or_default().to_string(),
        })
    }

    fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(context! {
                messages => messages,
                bos_token => &self.bos,
                eos_token => &self.eos,
                add_generation_prompt => add_generation_prompt,
            })
            .map_err(|e| format!("the chat template failed to render: {e:#}"))
    }

    /// The rendered conversation and its assistant spans.
    fn spans(&self, messages: &[Message]) -> Result<Rendered, String> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !full.starts_with(&through) {
                return Err(format!(
                    "the chat template does not render messages[..{i}] as a prefix of the \
                     whole conversation, so assistant turn {i} cannot be located"
                ));
            }
            spans.push((before.chars().count(), through.chars().count()));
        }
        Ok(Rendered { text: full, spans })
    }
}

/// `source` without transformers' `{% generation %}` / `{% endgeneration %}` tags, which mark
/// assistant text for its own masks and render nothing (segprop finds the assistant turns by
/// rendering prefixes instead).
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        let Some(close) = rest[open..].find("%}") else {
            break;
        };
        let inner = rest[open + 2..open + close]
            .trim_matches(|c: char| c == '-' || c == '+')
            .trim();
        out.push_str(&rest[..open]);
        if inner != "generation" && inner != "endgeneration" {
            out.push_str(&rest[open..open + close + 2]);
        }
        rest = &rest[open + close + 2..];
    }
    out.push_str(rest);
    out
}

/// Renders every conversation of the JSONL file at `path` with `template`. A file with no
/// assistant turn is an error (nothing to train on).
pub fn render_file(path: &Path, template: &Template) -> Result<Vec<Rendered>, ChatError> {
    let error = |line: Option<usize>, message: String| ChatError {
        path: path.to_path_buf(),
        line,
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(None, e.to_string()))?;
    let mut rendered = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |m: String| error(Some(n + 1), m);
        let messages = parse_line(line).map_err(at)?;
        rendered.push(template.spans(&messages).map_err(at)?);
    }
    if rendered.iter().all(|r| r.spans.is_empty()) {
        return Err(error(
            None,
            "no trainable token: no example has an assistant turn".into(),
        ));
    }
    Ok(rendered)
}

/// Checks the chat file at `path` against the template of the `tokenizer.json` at
/// `tokenizer`: every line parses and renders.
pub fn check_file(path: &Path, tokenizer: &Path) -> Result<usize, String> {
    let config = TokenizerConfig::beside(tokenizer)?;
    let source = config.chat_template.as_deref().ok_or_else(|| {
        format!(
            "`{}` has no chat_template",
            tokenizer.with_file_name("tokenizer_config.json").display()
        )
    })?;
    let template = Template::new(
        source,
        config.bos_token.as_deref(),
        config.eos_token.as_deref(),
    )?;
    render_file(path, &template)
        .map(|r| r.len())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_or_say_what_is_wrong() {
        let m = parse_line(r#"{"prompt": "hi", "completion": "hello"}"#).unwrap();
        assert_eq!(
            (m[0].role.as_str(), m[1].role.as_str()),
            ("user", "assistant")
        );
        for (line, says) in [
            ("{", "not JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"messages": []}"#, "empty"),
            (
                r#"{"messages": [{"role": "user"}]}"#,
                "messages[0] has no `content`",
            ),
            (r#"{"prompt": "a"}"#, "expected `messages`"),
            (
                r#"{"prompt": "a", "completion": 3}"#,
                "`completion` must be a string",
            ),
            (
                r#"{"messages": [{"role":"user","content":"x"}], "id": 1}"#,
                "unknown key `id`",
            ),
        ] {
            let err = parse_line(line).unwrap_err();
            assert!(err.contains(says), "{line}: {err}");
        }
    }

    #[test]
    fn generation_tags_render_nothing() {
        let source = "{% for m in messages %}{% if m.role == 'assistant' %}{%- generation -%}\
                      {{ m.content }}{% endgeneration %}{% else %}<{{ m.role }}>{% endif %}\
                      {% endfor %}";
        let template = Template::new(source, None, None).unwrap();
        let messages = parse_line(r#"{"prompt": "q", "completion": "a"}"#).unwrap();
        let rendered = template.spans(&messages).unwrap();
        assert_eq!(rendered.text, "<user>a");
        assert_eq!(rendered.spans, [(6, 7)]);
    }

    #[test]
    fn the_template_sees_every_key_of_a_message() {
        let template = Template::new(
            "{% for m in messages %}{{ m.name | default('-') }}:{{ m.content }};{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let line = r#"{"messages": [{"role": "user", "content": "a", "name": "ann"}, {"role": "assistant", "content": "b"}]}"#;
        let rendered = template.spans(&parse_line(line).unwrap()).unwrap();
        assert_eq!(rendered.text, "ann:a;-:b;");
        assert_eq!(rendered.spans, [(6, 10)]);
    }

    #[test]
    fn a_chat_template_jinja_file_comes_first() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = dir.path().join("tokenizer.json");
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"chat_template": "old", "eos_token": {"content": "</s>"}}"#,
        )
        .unwrap();
        let config = TokenizerConfig::beside(&tokenizer).unwrap();
        assert_eq!(config.chat_template.as_deref(), Some("old"));
        assert_eq!(config.eos_token.as_deref(), Some("</s>"));
        std::fs::write(dir.path().join("chat_template.jinja"), "new").unwrap();
        let config = TokenizerConfig::beside(&tokenizer).unwrap();
        assert_eq!(config.chat_template.as_deref(), Some("new"));
    }
}
