//! Where a field of a spec is in its YAML text, for error messages that name the line.

/// serde_yaml appends " at line L column C"; the line is reported separately.
pub(crate) fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// Finds the 1-based line of a dotted field path in YAML text (block or flow style), following
/// the path's components in order. Best effort: `None` when it cannot be found.
pub fn locate_field(text: &str, path: &str) -> Option<usize> {
    if path.is_empty() {
        return None;
    }
    let mut from_line = 0;
    let mut found = None;
    for component in path.split('.') {
        let needle_block = format!("{component}:");
        let mut hit = None;
        for (i, line) in text.lines().enumerate().skip(from_line) {
            let code = line.split('#').next().unwrap_or_default();
            let trimmed = code.trim_start();
            if trimmed.starts_with(&needle_block)
                || code.contains(&format!("{{ {needle_block}"))
                || code.contains(&format!(", {needle_block}"))
                || code.contains(&format!("{{{needle_block}"))
            {
                hit = Some(i);
                break;
            }
        }
        match hit {
            Some(i) => {
                from_line = i;
                found = Some(i + 1);
            }
            None => return found,
        }
    }
    found
}
