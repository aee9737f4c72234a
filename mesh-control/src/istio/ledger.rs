//! The Istio field ledger: what `meshctl` does with every field Istio defines for the kinds
//! it reads.
//!
//! Each field of each kind's `spec` (as Istio's CRD schemas define it) is honoured, refused,
//! or ignored for a stated reason (only fields that cannot change how a request is handled or
//! who may make it). `check` runs on every document before it is read: a field that is
//! refused, or that the schemas do not define at all, is an error at `file:line` naming the
//! field path (`VirtualService frontend: spec.http[0].corsPolicy: not supported`), so a policy
//! is never half applied. The tests check the table against the schemas;
//! `docs/istio-field-ledger.md` renders it.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_yaml_ng::Value;

use super::origin::{ConfigError, Origin, Seg};

#[path = "ledger_table.rs"]
mod table;

/// What `meshctl` does with one field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Treatment {
    /// Acted on.
    Honoured,
    /// A document that sets it is refused.
    Refused,
    /// Not acted on, for this reason.
    Ignored(&'static str),
}

/// Every `(kind, field path, treatment)`.
pub fn fields() -> &'static [(&'static str, &'static str, Treatment)] {
    table::FIELDS
}

fn index() -> &'static HashMap<(&'static str, &'static str), Treatment> {
    static INDEX: OnceLock<HashMap<(&'static str, &'static str), Treatment>> = OnceLock::new();
    INDEX.get_or_init(|| fields().iter().map(|(k, p, t)| ((*k, *p), *t)).collect())
}

/// Whether the ledger covers `kind`.
pub fn knows_kind(kind: &str) -> bool {
    fields().iter().any(|(k, _, _)| *k == kind)
}

/// Checks every field set in a document's `spec` against the ledger.
///
/// # Errors
/// One error per refused or unknown field, at its line.
pub(crate) fn check(kind: &str, name: &str, spec: &Value, origin: &Origin) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let mut segs = vec![Seg::Key("spec")];
    walk(kind, name, spec, "spec", &mut segs, origin, &mut errors);
    errors
}

fn walk<'a>(
    kind: &str,
    name: &str,
    value: &'a Value,
    schema_path: &str,
    segs: &mut Vec<Seg<'a>>,
    origin: &Origin,
    errors: &mut Vec<ConfigError>,
) {
    let Value::Mapping(map) = value else {
        return;
    };
    for (k, v) in map {
        let Some(key) = k.as_str() else {
            continue;
        };
        let path = format!("{schema_path}.{key}");
        segs.push(Seg::Key(key));
        let shown = || {
            let mut s = String::new();
            for seg in segs.iter() {
                match seg {
                    Seg::Key(k) if s.is_empty() => s.push_str(k),
                    Seg::Key(k) => {
                        s.push('.');
                        s.push_str(k);
                    }
                    Seg::Idx(i) => s.push_str(&format!("[{i}]")),
                }
            }
            s
        };
        match index().get(&(kind, path.as_str())) {
            None => errors.push(origin.at(
                segs,
                format!(
                    "{kind} {name}: {}: unknown field (not in Istio's schema for {kind})",
                    shown()
                ),
            )),
            Some(Treatment::Refused) => errors.push(origin.at(
                segs,
                format!("{kind} {name}: {}: not supported by meshctl", shown()),
            )),
            Some(Treatment::Ignored(_)) => {}
            Some(Treatment::Honoured) => match v {
                Value::Sequence(items) => {
                    for (i, item) in items.iter().enumerate() {
                        segs.push(Seg::Idx(i));
                        walk(kind, name, item, &format!("{path}[]"), segs, origin, errors);
                        segs.pop();
                    }
                }
                Value::Mapping(m) => {
                    // An object is checked field by field; a map of objects (`headers:
                    // {x-user: {exact: a}}`) through its values; a map of strings (labels)
                    // holds data, not fields.
                    let has = |prefix: String| {
                        fields()
                            .iter()
                            .any(|(k, p, _)| *k == kind && p.starts_with(&prefix))
                    };
                    let map_path = format!("{path}{{}}");
                    if has(format!("{path}.")) {
                        walk(kind, name, v, &path, segs, origin, errors);
                    } else if has(format!("{map_path}.")) {
                        for (mk, mv) in m {
                            if let Some(mk) = mk.as_str() {
                                segs.push(Seg::Key(mk));
                                walk(kind, name, mv, &map_path, segs, origin, errors);
                                segs.pop();
                            }
                        }
                    }
                }
                _ => {}
            },
        }
        segs.pop();
    }
}

/// Renders the ledger as Markdown (what `docs/istio-field-ledger.md` holds).
pub fn render_markdown() -> String {
    let mut out = String::from(
        "# Istio field ledger\n\n\
         Generated from `mesh-control/src/istio/ledger_table.rs` (the test `istio_ledger_doc_is_current` \
         fails when this file is stale; `MESH_BLESS=1 cargo test -p mesh-control ledger` rewrites it).\n\n\
         Every field Istio's CRD schemas define for the kinds `meshctl` reads, and what `meshctl validate` \
         and `meshctl serve` do with it: **honoured**, **refused** (an error at `file:line` naming the field), \
         or ignored for the reason given. A field the schemas do not define is an error too. \
         Other kinds (Sidecar, RequestAuthentication, Telemetry, Gateway...) are refused whole.\n",
    );
    let mut kind = "";
    for (k, path, t) in fields() {
        if *k != kind {
            kind = k;
            out.push_str(&format!(
                "\n## {kind}\n\n| field | treatment |\n|---|---|\n"
            ));
        }
        let t = match t {
            Treatment::Honoured => "honoured".to_owned(),
            Treatment::Refused => "**refused**".to_owned(),
            Treatment::Ignored(why) => format!("ignored: {why}"),
        };
        out.push_str(&format!("| `{path}` | {t} |\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema_paths() -> Vec<(String, String)> {
        fn walk(kind: &str, s: &Value, path: &str, out: &mut Vec<(String, String)>) {
            if let Some(Value::Mapping(props)) = s.get("properties") {
                for (k, v) in props {
                    let p = format!("{path}.{}", k.as_str().unwrap());
                    out.push((kind.to_owned(), p.clone()));
                    walk(kind, v, &p, out);
                }
            }
            if let Some(items) = s.get("items").filter(|i| i.is_mapping()) {
                walk(kind, items, &format!("{path}[]"), out);
            }
            if let Some(ap) = s
                .get("additionalProperties")
                .filter(|a| a.get("properties").is_some() || a.get("items").is_some())
            {
                walk(kind, ap, &format!("{path}{{}}"), out);
            }
        }
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fixtures/istio/crds.yaml"
        ))
        .unwrap();
        let mut out = Vec::new();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap();
            if v.is_null() {
                continue;
            }
            let kind = v["spec"]["names"]["kind"].as_str().unwrap().to_owned();
            if !knows_kind(&kind) {
                continue;
            }
            let spec = &v["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
            walk(&kind, spec, "spec", &mut out);
        }
        out
    }

    use serde::Deserialize;

    /// Every field of every kind meshctl reads is classified, and the table names no field the
    /// schemas do not have.
    #[test]
    fn istio_ledger_covers_the_schemas() {
        let schema: std::collections::BTreeSet<(String, String)> =
            schema_paths().into_iter().collect();
        let table: std::collections::BTreeSet<(String, String)> = fields()
            .iter()
            .map(|(k, p, _)| ((*k).to_owned(), (*p).to_owned()))
            .collect();
        let missing: Vec<_> = schema.difference(&table).collect();
        let extra: Vec<_> = table.difference(&schema).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "not classified: {missing:?}\nnot in the schemas: {extra:?}"
        );
        assert!(table.len() > 600, "{}", table.len());
    }

    #[test]
    fn istio_ledger_doc_is_current() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/istio-field-ledger.md");
        let rendered = render_markdown();
        if std::env::var_os("MESH_BLESS").is_some() {
            std::fs::write(&path, &rendered).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == rendered,
            "{} is stale: run MESH_BLESS=1 cargo test -p mesh-control ledger",
            path.display()
        );
    }
}
