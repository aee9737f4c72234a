//! The field ledger: what the mesh does with every field of every xDS message it reads.
//!
//! Each field of each message the translator reads is classified as
//! - [`Treatment::Honoured`]: acted on (a value the mesh cannot act on is refused by the
//!   translator, naming the field);
//! - [`Treatment::Refused`]: a resource that sets it is NACKed, naming the field path;
//! - [`Treatment::Ignored`]: not acted on, for a stated reason; only fields that cannot change
//!   how a request is handled or who may make it (statistics names, access logs, socket tuning).
//!
//! The ledger is not documentation only: after a resource translates, `check` walks every
//! field that is set in it (through `Any` by its type URL, through lists and maps) and refuses
//! the resource if a set field is refused or, for a field added by a newer envoy-types release,
//! not classified at all. So a resource is accepted with every behaviour-changing field
//! honoured, or refused naming the field; never anything in between. The tests check the
//! ledger against the proto descriptors (every field of every reachable message classified) and
//! against a corpus of real control planes' output; `docs/xds-field-ledger.md` renders it.
//!
//! Messages met inside an `Any` whose type the ledger does not list are the translator's to
//! refuse: it dispatches on the type URL and refuses every type it does not implement (an HTTP
//! filter or per-route filter config marked optional is skipped whole, as in Envoy).

use std::collections::HashMap;
use std::sync::OnceLock;

use prost::{Message, Name};
use prost_reflect::{DynamicMessage, MapKey, ReflectMessage, Value};

use super::{err, At, FieldError};

mod table;

mod entry;

pub use entry::{Entry, Treatment};

/// Every entry of the ledger.
pub fn entries() -> &'static [Entry] {
    table::entries()
}

/// The entry for a key (a message's full name or an alias).
pub fn entry(key: &str) -> Option<&'static Entry> {
    static INDEX: OnceLock<HashMap<&'static str, &'static Entry>> = OnceLock::new();
    INDEX
        .get_or_init(|| entries().iter().map(|e| (e.key, e)).collect())
        .get(key)
        .copied()
}

/// The four resource kinds whose translation the ledger guards.
pub const ROOTS: [&str; 4] = [
    "envoy.config.listener.v3.Listener",
    "envoy.config.route.v3.RouteConfiguration",
    "envoy.config.cluster.v3.Cluster",
    "envoy.config.endpoint.v3.ClusterLoadAssignment",
];

/// Checks every set field of a resource against the ledger.
pub(crate) fn check_resource<M: Message + Name>(resource: &M) -> Result<(), FieldError> {
    let pool = crate::xds::file::descriptors();
    let Some(desc) = pool.get_message_by_name(&M::full_name()) else {
        return err(format!("no descriptor for {}", M::full_name()));
    };
    let dynamic = DynamicMessage::decode(desc, resource.encode_to_vec().as_slice())
        .map_err(|e| FieldError::new(format!("re-decoding for the field ledger failed: {e}")))?;
    check(&dynamic)
}

/// Checks every set field of a message (a resource or a part of one) against the ledger.
///
/// # Errors
/// The path of the first field that is refused, or that the ledger does not classify.
pub(crate) fn check(msg: &DynamicMessage) -> Result<(), FieldError> {
    let name = msg.descriptor().full_name().to_owned();
    walk(msg, &name)
}

fn walk(msg: &DynamicMessage, key: &str) -> Result<(), FieldError> {
    let Some(entry) = entry(key) else {
        // An `Any` of a type the ledger does not list: the translator refuses such types.
        return Ok(());
    };
    if skipped_optional(msg) {
        return Ok(());
    }
    for (field, value) in msg.fields() {
        let name = field.name();
        let Some((static_name, treatment)) = entry.fields.iter().find(|(n, _)| *n == name) else {
            return err(format!(
                "{name} (of {}) is not known to the mesh; refusing it rather than ignoring it",
                entry.message
            ))
            .at(name.to_owned());
        };
        match treatment {
            Treatment::Ignored(_) => {}
            Treatment::Refused => {
                return err(format!("{name} is not supported by the mesh")).at(*static_name)
            }
            Treatment::Honoured => value_ok(value, None).at(*static_name)?,
            Treatment::HonouredAs(alias) => value_ok(value, Some(alias)).at(*static_name)?,
        }
    }
    Ok(())
}

/// An HTTP filter or per-route filter config marked `is_optional` whose type the mesh does not
/// implement is skipped whole (Envoy and gRPC skip it too), as is a per-route `FilterConfig`
/// with `disabled: true` (its config is not used).
fn skipped_optional(msg: &DynamicMessage) -> bool {
    let flag = |name: &str| {
        msg.get_field_by_name(name)
            .is_some_and(|v| v.as_bool() == Some(true))
    };
    let desc = msg.descriptor();
    match desc.full_name() {
        "envoy.config.route.v3.FilterConfig" => {
            flag("disabled") || (flag("is_optional") && !known_any(msg, "config"))
        }
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter" => {
            flag("is_optional") && !known_any(msg, "typed_config")
        }
        _ => false,
    }
}

fn known_any(msg: &DynamicMessage, field: &str) -> bool {
    let Some(value) = msg.get_field_by_name(field) else {
        return false;
    };
    let Some(any) = value.as_message() else {
        return false;
    };
    let url = any
        .get_field_by_name("type_url")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    entry(url.rsplit('/').next().unwrap_or_default()).is_some()
}

fn value_ok(value: &Value, alias: Option<&str>) -> Result<(), FieldError> {
    match value {
        Value::Message(m) => message_ok(m, alias),
        Value::List(items) => {
            for (i, item) in items.iter().enumerate() {
                value_ok(item, alias).map_err(|e| e.index(i))?;
            }
            Ok(())
        }
        Value::Map(map) => {
            for (k, v) in map {
                let key = match k {
                    MapKey::String(s) => s.clone(),
                    other => format!("{other:?}"),
                };
                value_ok(v, alias).map_err(|e| e.key(&key))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn message_ok(m: &DynamicMessage, alias: Option<&str>) -> Result<(), FieldError> {
    let desc = m.descriptor();
    let full = desc.full_name();
    if full == "google.protobuf.Any" {
        let url = m
            .get_field_by_name("type_url")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let bytes = m
            .get_field_by_name("value")
            .and_then(|v| v.as_bytes().cloned())
            .unwrap_or_default();
        let type_name = url.rsplit('/').next().unwrap_or_default();
        if entry(type_name).is_none() {
            return Ok(());
        }
        let Some(inner) = crate::xds::file::descriptors().get_message_by_name(type_name) else {
            return Ok(());
        };
        let inner = DynamicMessage::decode(inner, bytes)
            .map_err(|e| FieldError::new(format!("invalid {type_name}: {e}")))?;
        return walk(&inner, type_name);
    }
    if full.starts_with("google.protobuf.") {
        return Ok(());
    }
    walk(m, alias.unwrap_or(full))
}

/// Renders the ledger as a Markdown table (what `docs/xds-field-ledger.md` holds).
pub fn render_markdown() -> String {
    let mut out = String::from(
        "# xDS field ledger\n\n\
         Generated from `mesh-core/src/xds/translate/ledger/table.rs` (the test \
         `ledger_doc_is_current` fails when this file is stale; `MESH_BLESS=1 cargo test -p mesh-xds ledger` rewrites it).\n\n\
         Every field of every xDS message the mesh reads, and what the mesh does with it:\n\
         **honoured** (acted on; a value the mesh cannot act on is refused by the translator, naming the field), \
         **refused** (a resource that sets it is NACKed, naming the field path), or **ignored** for the reason given \
         (only fields that cannot change how a request is handled or who may make it).\n\
         After translation every set field of a resource is checked against this table, so a field \
         the table does not list (a newer envoy-types release) is refused, not ignored.\n\
         Types reached through `Any` that are not listed here (HTTP filters, per-route configs, \
         load-balancing policies and so on) are refused by the translator, except optional filters, which are skipped.\n",
    );
    for e in entries() {
        out.push_str(&format!("\n## `{}`", e.message));
        if e.key != e.message {
            out.push_str(&format!(" (as `{}`)", e.key));
        }
        out.push_str("\n\n| field | treatment |\n|---|---|\n");
        for (name, t) in e.fields {
            let t = match t {
                Treatment::Honoured => "honoured".to_owned(),
                Treatment::HonouredAs(alias) => format!("honoured (see `{alias}`)"),
                Treatment::Refused => "**refused**".to_owned(),
                Treatment::Ignored(why) => format!("ignored: {why}"),
            };
            out.push_str(&format!("| `{name}` | {t} |\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests;
