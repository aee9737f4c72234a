//! Reading Istio YAML: multi-document files and directories into a [`Config`], every field
//! checked by the ledger first, every error at its `file:line`.

use super::ledger;
use super::model::*;
use super::origin::{blank, ConfigError, Origin, Seg};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;

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
