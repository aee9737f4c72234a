//! Where a thing was written: the file, the line of a document and the field path inside
//! it, and the errors that name them (`file:line: message`).

use std::fmt;
use std::sync::Arc;

/// Where a document came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Origin {
    /// File path (or a label for inline text).
    pub file: Arc<str>,
    /// 1-based line of the document's first line.
    pub line: usize,
    /// The document's text, for locating fields.
    pub(crate) text: Arc<str>,
}

/// One path segment for [`Origin::line_of`].
#[derive(Clone, Copy, Debug)]
pub enum Seg<'a> {
    /// A mapping key.
    Key(&'a str),
    /// A sequence index.
    Idx(usize),
}

/// A field path as users write it: `spec.subsets[0].trafficPolicy.tls`.
pub(crate) fn path_text(path: &[Seg<'_>]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Idx(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

impl Origin {
    /// An origin for text that is not from a file.
    pub fn inline(label: &str) -> Self {
        Self {
            file: label.into(),
            line: 1,
            text: "".into(),
        }
    }

    /// The 1-based file line of a field, found by following the YAML indentation; the line
    /// of the deepest segment found when the path cannot be followed to the end (for
    /// example through flow-style `{...}` values).
    pub fn line_of(&self, path: &[Seg<'_>]) -> usize {
        self.line + line_in_doc(&self.text, path)
    }

    /// A diagnostic at a field.
    pub fn at(&self, path: &[Seg<'_>], message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            line: self.line_of(path),
            message: message.into(),
        }
    }
}

/// Column where a line's key starts: after the indentation and any `- ` item markers.
fn key_col(line: &str) -> (usize, &str) {
    let mut rest = line;
    let mut col = 0;
    loop {
        let trimmed = rest.trim_start_matches(' ');
        col += rest.len() - trimmed.len();
        match trimmed
            .strip_prefix("- ")
            .or_else(|| (trimmed == "-").then_some(""))
        {
            Some(after) => {
                col += trimmed.len() - after.len();
                rest = after;
            }
            None => return (col, trimmed),
        }
    }
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

pub(super) fn blank(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

fn line_in_doc(doc: &str, path: &[Seg<'_>]) -> usize {
    let lines: Vec<&str> = doc.lines().collect();
    let (mut lo, mut hi) = (0, lines.len());
    let mut best = 0;
    for seg in path {
        let Some(first) = (lo..hi).find(|&i| !blank(lines[i])) else {
            break;
        };
        match seg {
            Seg::Key(k) => {
                let base = key_col(lines[first]).0;
                let found = (first..hi).find(|&i| {
                    let (col, text) = key_col(lines[i]);
                    !blank(lines[i])
                        && col == base
                        && (text.strip_prefix(k).is_some_and(|r| r.starts_with(':'))
                            || text
                                .strip_prefix(&format!("\"{k}\""))
                                .is_some_and(|r| r.starts_with(':')))
                });
                let Some(i) = found else {
                    break;
                };
                best = i;
                let kc = key_col(lines[i]).0;
                lo = i + 1;
                hi = (lo..hi)
                    .find(|&j| {
                        !blank(lines[j]) && {
                            let ind = indent(lines[j]);
                            ind < kc || (ind == kc && !lines[j].trim_start().starts_with('-'))
                        }
                    })
                    .unwrap_or(hi);
            }
            Seg::Idx(n) => {
                let Some(item_col) = (first..hi)
                    .find(|&i| lines[i].trim_start().starts_with('-'))
                    .map(|i| indent(lines[i]))
                else {
                    break;
                };
                let items: Vec<usize> = (first..hi)
                    .filter(|&i| {
                        indent(lines[i]) == item_col && lines[i].trim_start().starts_with('-')
                    })
                    .collect();
                let Some(&i) = items.get(*n) else {
                    break;
                };
                best = i;
                lo = i;
                hi = items.get(n + 1).copied().unwrap_or(hi);
                // The item's first key is on the dash line: search from there.
            }
        }
    }
    best
}

/// A problem at a place in the input: `file:line: message`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub struct ConfigError {
    /// File.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// What is wrong, naming the resource and field.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}
