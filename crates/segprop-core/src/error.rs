//! Errors of the core crate: a job spec that cannot be read or does not make sense.

/// What is wrong with a job spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecErrorKind {
    /// The file could not be read.
    Io { message: String },
    /// YAML syntax, an unknown field, a wrong type or a missing field.
    Parse { message: String },
    /// The spec parses but one field's value is not acceptable.
    Invalid { field: String, message: String },
}

/// A job spec error that names the file, the field and, where known, the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    /// The spec's source: a file path, or `<embedded>`/`<string>`.
    pub source_name: String,
    /// 1-based line of the offending field, when it could be located.
    pub line: Option<usize>,
    pub kind: SpecErrorKind,
}

impl SpecError {
    pub fn io(path: &std::path::Path, err: &std::io::Error) -> Self {
        Self {
            source_name: path.display().to_string(),
            line: None,
            kind: SpecErrorKind::Io {
                message: err.to_string(),
            },
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            source_name: String::new(),
            line: None,
            kind: SpecErrorKind::Invalid {
                field: field.into(),
                message: message.into(),
            },
        }
    }

    /// The field path this error is about (`segprop.base_depth`), when it is a validation error.
    pub fn field(&self) -> Option<&str> {
        match &self.kind {
            SpecErrorKind::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }

    pub fn with_source(mut self, source_name: &str, line: Option<usize>) -> Self {
        self.source_name = source_name.to_string();
        if self.line.is_none() {
            self.line = line;
        }
        self
    }
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let location = match (self.source_name.as_str(), self.line) {
            ("", _) => "job spec".to_string(),
            (name, Some(line)) => format!("{name}:{line}"),
            (name, None) => name.to_string(),
        };
        match &self.kind {
            SpecErrorKind::Io { message } => {
                write!(f, "{location}: cannot read job spec: {message}")
            }
            SpecErrorKind::Parse { message } => {
                write!(f, "{location}: invalid job spec: {message}")
            }
            SpecErrorKind::Invalid { field, message } => {
                write!(
                    f,
                    "{location}: invalid job spec: field `{field}`: {message}"
                )
            }
        }
    }
}
