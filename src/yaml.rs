//! Reading YAML files into typed structs with errors that point at the place:
//! `file:line:col: message`, then the source line and a caret. Shared by `config` and
//! `pipeline`; knows nothing about either.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// One problem in one file, with the place it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError {
    pub path: PathBuf,
    /// 1-based; 0 when the problem has no place (an unreadable file).
    pub line: usize,
    pub column: usize,
    pub message: String,
    /// The offending line of the file, for display under the message.
    pub source_line: Option<String>,
}

impl SourceError {
    pub fn whole_file(path: &Path, message: impl Into<String>) -> SourceError {
        SourceError {
            path: path.to_path_buf(),
            line: 0,
            column: 0,
            message: message.into(),
            source_line: None,
        }
    }

    /// `file:line:col: message` (or `file: message`) on one line, without the source
    /// line and caret of the full form: for logs and API answers.
    pub fn one_line(&self) -> String {
        if self.line == 0 {
            format!("{}: {}", self.path.display(), self.message)
        } else {
            format!(
                "{}:{}:{}: {}",
                self.path.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }

    /// An error at a 1-based line and column of `text`.
    pub fn at(
        path: &Path,
        text: &str,
        line: usize,
        column: usize,
        message: impl Into<String>,
    ) -> SourceError {
        SourceError {
            path: path.to_path_buf(),
            line,
            column,
            message: message.into(),
            source_line: text.lines().nth(line.saturating_sub(1)).map(str::to_owned),
        }
    }
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.one_line())?;
        if self.line == 0 {
            return Ok(());
        }
        if let Some(src) = &self.source_line {
            let pad: String = src
                .chars()
                .take(self.column.saturating_sub(1))
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            write!(f, "\n  | {src}\n  | {pad}^")?;
        }
        Ok(())
    }
}

impl std::error::Error for SourceError {}

/// Marks the value a custom deserializer rejected, so the error can point at the value
/// itself rather than at the key above it (serde_yaml only knows the latter).
pub const VALUE_MARK: &str = "\u{1}";

/// An error message that names the offending `value`; see [`VALUE_MARK`].
pub fn value_error(value: &str, message: impl fmt::Display) -> String {
    format!("{message}{VALUE_MARK}{value}")
}

/// Parses `text` (the contents of `path`) into `T`.
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, SourceError> {
    serde_yaml::from_str(text).map_err(|e| to_source_error(path, text, &e))
}

fn to_source_error(path: &Path, text: &str, err: &serde_yaml::Error) -> SourceError {
    let full = err.to_string();
    let Some(loc) = err.location() else {
        return SourceError::whole_file(path, full);
    };
    // serde_yaml appends " at line L column C" to the message; the place is printed in front.
    let suffix = format!(" at line {} column {}", loc.line(), loc.column());
    let message = full.strip_suffix(&suffix).unwrap_or(&full).to_owned();
    let (mut line, mut column) = (loc.line(), loc.column());
    let message = match message.split_once(VALUE_MARK) {
        Some((msg, value)) => {
            if let Some((l, c)) = find_value(text, line, value) {
                (line, column) = (l, c);
            }
            msg.to_owned()
        }
        None => message,
    };
    SourceError::at(path, text, line, column, message)
}

/// The first place at or after `from_line` where `value` stands as written.
pub fn find_value(text: &str, from_line: usize, value: &str) -> Option<(usize, usize)> {
    if value.is_empty() {
        return None;
    }
    text.lines()
        .enumerate()
        .skip(from_line.saturating_sub(1))
        .find_map(|(i, l)| {
            l.find(value)
                .map(|byte| (i + 1, l[..byte].chars().count() + 1))
        })
}

/// The 1-based line and column of a mapping key: `key` at the top level, or
/// `parent.key` one level down (in the block below `parent:`, or in a flow mapping on
/// its line). A plain scan, for values checked once the file is parsed; `None` when
/// the file does not set it.
pub fn find_key(text: &str, key: &str) -> Option<(usize, usize)> {
    let (parent, key) = match key.split_once('.') {
        Some((parent, key)) => (Some(parent), key),
        None => (None, key),
    };
    let at_top = |l: &str, k: &str| {
        l.strip_prefix(k)
            .is_some_and(|rest| rest.trim_start().starts_with(':'))
    };
    let mut lines = text.lines().enumerate();
    let Some(parent) = parent else {
        return lines.find_map(|(i, l)| at_top(l, key).then_some((i + 1, 1)));
    };
    let (i, line) = lines.by_ref().find(|(_, l)| at_top(l, parent))?;
    if let Some(flow) = line.find('{') {
        let byte = flow + line[flow..].find(&format!("{key}:"))?;
        return Some((i + 1, line[..byte].chars().count() + 1));
    }
    for (i, l) in lines {
        let body = l.trim_start();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        if body.len() == l.len() {
            // The parent's block ended without it.
            return None;
        }
        if at_top(body, key) {
            return Some((i + 1, l.len() - body.len() + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_at_the_top_and_one_level_down() {
        let text = "listen: x\n# retention: a comment\nretention:\n  days: 3\n\n  runs: 0\ngithub: { api_url: http://x }\nruns: 1\n";
        for (key, wanted) in [
            ("listen", Some((1, 1))),
            ("runs", Some((8, 1))),
            ("retention.runs", Some((6, 3))),
            ("retention.interval", None),
            ("github.api_url", Some((7, 11))),
            ("state_dir", None),
        ] {
            assert_eq!(find_key(text, key), wanted, "{key}");
        }
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        name: String,
        #[serde(default, deserialize_with = "even")]
        items: Vec<u32>,
    }

    fn even<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        let v: Vec<u32> = serde::Deserialize::deserialize(d)?;
        match v.iter().find(|n| *n % 2 == 1) {
            Some(odd) => Err(serde::de::Error::custom(value_error(
                &odd.to_string(),
                format!("{odd} is odd"),
            ))),
            None => Ok(v),
        }
    }

    #[test]
    fn unknown_key_points_at_the_key() {
        let text = "name: x\nnmae: y\n";
        let err = parse::<Doc>(Path::new("p.yml"), text).unwrap_err();
        assert_eq!((err.line, err.column), (2, 1));
        assert!(
            err.message.contains("unknown field `nmae`"),
            "{}",
            err.message
        );
        assert_eq!(
            err.to_string().lines().next(),
            Some(format!("p.yml:2:1: {}", err.message).as_str())
        );
        assert!(err.to_string().contains("  | nmae: y\n  | ^"));
    }

    #[test]
    fn custom_error_points_at_the_value() {
        let text = "name: x\nitems:\n  - 2\n  - 7\n";
        let err = parse::<Doc>(Path::new("p.yml"), text).unwrap_err();
        assert_eq!(err.message, "7 is odd");
        assert_eq!((err.line, err.column), (4, 5));
    }
}
