//! The ledger check over a decoded `DynamicMessage`: the reference the wire walk
//! ([`super::check_resource`]) is tested against.

use prost_reflect::{DynamicMessage, MapKey, ReflectMessage, Value};

use super::{entry, Treatment};
use crate::xds::translate::{err, At, FieldError};

/// Checks every set field of a message (a resource or a part of one) against the ledger,
/// over a decoded `DynamicMessage`: the reference [`check_resource`]'s wire walk is tested
/// against.
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
