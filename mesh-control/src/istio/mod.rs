//! Istio-style configuration: multi-document YAML with `apiVersion`/`kind`/`metadata`/`spec`.
//!
//! [`parse`] reads the supported kinds (ServiceEntry, WorkloadEntry, VirtualService,
//! DestinationRule, PeerAuthentication, AuthorizationPolicy) and remembers where each
//! document came from, so every problem found later is reported as `file:line: message`.
//! [`generate()`] turns the result into the xDS resources Istio would send proxyless clients;
//! [`validate`] is the `istioctl analyze` of the mesh.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Deserialize;

pub mod generate;
mod index;
pub mod ledger;
pub mod locality;
pub mod model;
pub mod validate;

pub use generate::{generate, Flavour, Generated, Options};
pub use model::*;

/// Where a document came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Origin {
    /// File path (or a label for inline text).
    pub file: Arc<str>,
    /// 1-based line of the document's first line.
    pub line: usize,
    /// The document's text, for locating fields.
    text: Arc<str>,
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

fn blank(line: &str) -> bool {
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

/// One parsed resource.
#[derive(Clone, Debug, PartialEq)]
pub struct Doc<T> {
    /// `metadata`.
    pub meta: Metadata,
    /// `spec`.
    pub spec: T,
    /// Where it came from.
    pub origin: Origin,
}

/// Every supported resource of a configuration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    /// ServiceEntries.
    pub service_entries: Vec<Doc<ServiceEntrySpec>>,
    /// WorkloadEntries.
    pub workload_entries: Vec<Doc<WorkloadEntrySpec>>,
    /// VirtualServices.
    pub virtual_services: Vec<Doc<VirtualServiceSpec>>,
    /// DestinationRules.
    pub destination_rules: Vec<Doc<DestinationRuleSpec>>,
    /// PeerAuthentications.
    pub peer_authentications: Vec<Doc<PeerAuthenticationSpec>>,
    /// AuthorizationPolicies.
    pub authorization_policies: Vec<Doc<AuthorizationPolicySpec>>,
}

impl Config {
    /// Adds another file's resources.
    pub fn extend(&mut self, other: Config) {
        self.service_entries.extend(other.service_entries);
        self.workload_entries.extend(other.workload_entries);
        self.virtual_services.extend(other.virtual_services);
        self.destination_rules.extend(other.destination_rules);
        self.peer_authentications.extend(other.peer_authentications);
        self.authorization_policies
            .extend(other.authorization_policies);
    }
}

#[derive(Deserialize)]
struct Head {
    #[serde(default, rename = "apiVersion")]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
}

#[derive(Deserialize)]
#[serde(bound = "T: DeserializeOwned")]
struct Raw<T> {
    #[serde(default)]
    metadata: Metadata,
    spec: T,
}

fn yaml_error(file: &str, doc_line: usize, e: &serde_yaml_ng::Error) -> ConfigError {
    let line = e
        .location()
        .map(|l| doc_line + l.line() - 1)
        .unwrap_or(doc_line);
    ConfigError {
        file: file.to_owned(),
        line,
        message: e.to_string(),
    }
}

/// Parses multi-document YAML. Returns every error found, not only the first.
///
/// # Errors
/// Invalid YAML, an unsupported kind, or a field of the wrong type, each as `file:line`.
pub fn parse(text: &str, file: &str) -> Result<Config, Vec<ConfigError>> {
    let mut config = Config::default();
    let mut errors = Vec::new();
    let file_arc: Arc<str> = file.into();
    let docs = documents(text);
    for (line, doc) in docs {
        if doc.lines().all(blank) {
            continue;
        }
        let head: Head = match serde_yaml_ng::from_str(&doc) {
            Ok(h) => h,
            Err(e) => {
                errors.push(yaml_error(file, line, &e));
                continue;
            }
        };
        let origin = Origin {
            file: file_arc.clone(),
            line,
            text: doc.as_str().into(),
        };
        let Some(kind) = head.kind else {
            errors.push(origin.at(&[], "document has no kind"));
            continue;
        };
        if let Some(api) = &head.api_version {
            if !(api.starts_with("networking.istio.io/") || api.starts_with("security.istio.io/")) {
                errors.push(origin.at(
                    &[Seg::Key("apiVersion")],
                    format!("{kind}: unsupported apiVersion {api:?}"),
                ));
                continue;
            }
        }
        // Every field is honoured or refused by the ledger before the document is read.
        if ledger::knows_kind(&kind) {
            let raw: serde_yaml_ng::Value = match serde_yaml_ng::from_str(&doc) {
                Ok(v) => v,
                Err(e) => {
                    errors.push(yaml_error(file, line, &e));
                    continue;
                }
            };
            let name = raw["metadata"]["name"].as_str().unwrap_or_default();
            let refused = ledger::check(&kind, name, &raw["spec"], &origin);
            if !refused.is_empty() {
                errors.extend(refused);
                continue;
            }
        }
        match kind.as_str() {
            "ServiceEntry" => config.service_entries.extend(load_doc(&doc, origin, line, &mut errors)),
            "WorkloadEntry" => config.workload_entries.extend(load_doc(&doc, origin, line, &mut errors)),
            "VirtualService" => config.virtual_services.extend(load_doc(&doc, origin, line, &mut errors)),
            "DestinationRule" => config.destination_rules.extend(load_doc(&doc, origin, line, &mut errors)),
            "PeerAuthentication" => config.peer_authentications.extend(load_doc(&doc, origin, line, &mut errors)),
            "AuthorizationPolicy" => config.authorization_policies.extend(load_doc(&doc, origin, line, &mut errors)),
            other => errors.push(origin.at(
                &[Seg::Key("kind")],
                format!(
                    "unsupported kind {other:?} (supported: ServiceEntry, WorkloadEntry, VirtualService, \
                     DestinationRule, PeerAuthentication, AuthorizationPolicy)"
                ),
            )),
        }
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

/// Splits multi-document YAML on its `---` markers: each document with the line it starts at.
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs: Vec<(usize, String)> = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 2;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    docs.push((start, current));
    docs
}

/// Reads one document as a resource of kind `T`.
fn load_doc<T: DeserializeOwned>(
    doc: &str,
    origin: Origin,
    line: usize,
    errors: &mut Vec<ConfigError>,
) -> Option<Doc<T>> {
    match serde_yaml_ng::from_str::<Raw<T>>(doc) {
        Ok(raw) => Some(Doc {
            meta: raw.metadata,
            spec: raw.spec,
            origin,
        }),
        Err(e) => {
            errors.push(yaml_error(&origin.file, line, &e));
            None
        }
    }
}

/// Reads a YAML file, or every `.yaml`/`.yml` file of a directory (sorted by name).
///
/// # Errors
/// Unreadable files and everything [`parse`] reports.
pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
    let io = |p: &Path, e: std::io::Error| {
        vec![ConfigError {
            file: p.display().to_string(),
            line: 0,
            message: e.to_string(),
        }]
    };
    let mut files = Vec::new();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).map_err(|e| io(path, e))? {
            let p = entry.map_err(|e| io(path, e))?.path();
            if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut config = Config::default();
    let mut errors = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| io(&f, e))?;
        match parse(&text, &f.display().to_string()) {
            Ok(c) => config.extend(c),
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests;
