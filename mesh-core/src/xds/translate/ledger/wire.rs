//! The ledger check over the protobuf wire format: what [`super::check`] does over a
//! `DynamicMessage`, without building one. Each field is read in place (its tag, and for
//! messages its bytes) and looked up in the descriptor; nothing is allocated on the way, so
//! checking an update costs a pass over its bytes, not a decode into a tree of values.
//!
//! What counts as set is what a `DynamicMessage` says is set: a field with presence (a
//! message, a oneof member, a proto3 `optional`) whenever it is on the wire, a repeated or
//! map field per element, and any other scalar only with a value that is not its default.
//! Fields the descriptors do not know are skipped, as a `DynamicMessage` keeps them apart.

use prost::encoding::{decode_varint, WireType};
use prost_reflect::{Kind, MessageDescriptor};

use super::{entry, Treatment};
use crate::xds::translate::{err, At, FieldError};

/// A field's value as it lies on the wire.
enum Wire<'a> {
    Varint(u64),
    Fixed(u64),
    Bytes(&'a [u8]),
}

fn malformed(what: &str) -> FieldError {
    FieldError::new(format!("malformed {what}"))
}

/// The next field of `buf`: its number and value; `buf` moves past it.
fn next<'a>(buf: &mut &'a [u8], what: &str) -> Result<(u32, Wire<'a>), FieldError> {
    let key = decode_varint(buf).map_err(|_| malformed(what))?;
    let number = u32::try_from(key >> 3).map_err(|_| malformed(what))?;
    let wire_type = WireType::try_from(key & 7).map_err(|_| malformed(what))?;
    let value = match wire_type {
        WireType::Varint => Wire::Varint(decode_varint(buf).map_err(|_| malformed(what))?),
        WireType::SixtyFourBit => Wire::Fixed(take_fixed::<8>(buf, what)?),
        WireType::ThirtyTwoBit => Wire::Fixed(take_fixed::<4>(buf, what)?),
        WireType::LengthDelimited => {
            let len = decode_varint(buf).map_err(|_| malformed(what))?;
            let len = usize::try_from(len).map_err(|_| malformed(what))?;
            if len > buf.len() {
                return Err(malformed(what));
            }
            let (bytes, rest) = buf.split_at(len);
            *buf = rest;
            Wire::Bytes(bytes)
        }
        WireType::StartGroup | WireType::EndGroup => return Err(malformed(what)),
    };
    if number == 0 {
        return Err(malformed(what));
    }
    Ok((number, value))
}

fn take_fixed<const N: usize>(buf: &mut &[u8], what: &str) -> Result<u64, FieldError> {
    if buf.len() < N {
        return Err(malformed(what));
    }
    let (bytes, rest) = buf.split_at(N);
    *buf = rest;
    Ok(bytes.iter().rev().fold(0, |v, b| (v << 8) | u64::from(*b)))
}

/// The last value of field `number` in a message's bytes.
fn last<'a>(mut buf: &'a [u8], number: u32, what: &str) -> Result<Option<Wire<'a>>, FieldError> {
    let mut found = None;
    while !buf.is_empty() {
        let (n, v) = next(&mut buf, what)?;
        if n == number {
            found = Some(v);
        }
    }
    Ok(found)
}

/// The last value of the field called `name` (of a message described by `desc`).
fn field<'a>(
    buf: &'a [u8],
    desc: &MessageDescriptor,
    name: &str,
) -> Result<Option<Wire<'a>>, FieldError> {
    match desc.get_field_by_name(name) {
        Some(f) => last(buf, f.number(), desc.full_name()),
        None => Ok(None),
    }
}

/// Checks a message's bytes against the ledger entry `key`.
pub(super) fn walk(bytes: &[u8], desc: &MessageDescriptor, key: &str) -> Result<(), FieldError> {
    let Some(entry) = entry(key) else {
        // An `Any` of a type the ledger does not list: the translator refuses such types.
        return Ok(());
    };
    if skipped_optional(bytes, desc)? {
        return Ok(());
    }
    let mut buf = bytes;
    // The field just read and how many of it came before (a repeated field's index).
    let mut previous: Option<(u32, usize)> = None;
    // The refusal of the lowest field number: the one a walk in field order meets first
    // (the wire holds fields in the order of the message's declaration).
    let mut refused: Option<(u32, FieldError)> = None;
    while !buf.is_empty() {
        let (number, value) = next(&mut buf, desc.full_name())?;
        let index = match previous {
            Some((n, i)) if n == number => i + 1,
            _ => 0,
        };
        previous = Some((number, index));
        if refused.as_ref().is_some_and(|(n, _)| *n <= number) {
            continue;
        }
        if let Err(e) = field_ok(entry, desc, number, index, &value) {
            refused = Some((number, e));
        }
    }
    match refused {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}

/// One field occurrence against the message's ledger entry.
fn field_ok(
    entry: &super::Entry,
    desc: &MessageDescriptor,
    number: u32,
    index: usize,
    value: &Wire<'_>,
) -> Result<(), FieldError> {
    let Some(field) = desc.get_field(number) else {
        return Ok(());
    };
    let repeated = field.is_list() || field.is_map();
    if !repeated && !field.supports_presence() && is_default(value) {
        return Ok(());
    }
    let name = field.name();
    let Some((static_name, treatment)) = entry.fields.iter().find(|(n, _)| *n == name) else {
        return err(format!(
            "{name} (of {}) is not known to the mesh; refusing it rather than ignoring it",
            entry.message
        ))
        .at(name.to_owned());
    };
    let alias = match treatment {
        Treatment::Ignored(_) => return Ok(()),
        Treatment::Refused => {
            return err(format!("{name} is not supported by the mesh")).at(*static_name)
        }
        Treatment::Honoured => None,
        Treatment::HonouredAs(alias) => Some(*alias),
    };
    let (Kind::Message(inner), Wire::Bytes(bytes)) = (field.kind(), value) else {
        // Scalars, and packed lists of them, have no fields of their own.
        return Ok(());
    };
    let checked = if field.is_map() {
        map_entry(bytes, &inner, alias)
    } else {
        let r = message(bytes, &inner, alias);
        if field.is_list() {
            r.map_err(|e| e.index(index))
        } else {
            r
        }
    };
    checked.at(*static_name)
}

fn is_default(value: &Wire<'_>) -> bool {
    match value {
        Wire::Varint(v) | Wire::Fixed(v) => *v == 0,
        Wire::Bytes(b) => b.is_empty(),
    }
}

/// A map field's entry: its value, checked under its key.
fn map_entry(
    bytes: &[u8],
    desc: &MessageDescriptor,
    alias: Option<&str>,
) -> Result<(), FieldError> {
    let key_field = desc.map_entry_key_field();
    let value_field = desc.map_entry_value_field();
    let Kind::Message(value_desc) = value_field.kind() else {
        return Ok(());
    };
    let key = match last(bytes, key_field.number(), desc.full_name())? {
        Some(Wire::Bytes(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(Wire::Varint(v) | Wire::Fixed(v)) => v.to_string(),
        None => String::new(),
    };
    let value = match last(bytes, value_field.number(), desc.full_name())? {
        Some(Wire::Bytes(b)) => b,
        Some(_) => return Err(malformed(desc.full_name())),
        None => &[],
    };
    message(value, &value_desc, alias).map_err(|e| e.key(&key))
}

/// A message value: an `Any` is opened (if the ledger lists its type), well-known types
/// are taken as they are, any other message is walked.
fn message(bytes: &[u8], desc: &MessageDescriptor, alias: Option<&str>) -> Result<(), FieldError> {
    let full = desc.full_name();
    if full == "google.protobuf.Any" {
        let (url, value) = any(bytes, desc)?;
        let type_name = url.rsplit('/').next().unwrap_or_default();
        if entry(type_name).is_none() {
            return Ok(());
        }
        let Some(inner) = crate::xds::file::descriptors().get_message_by_name(type_name) else {
            return Ok(());
        };
        return walk(value, &inner, type_name).map_err(|e| {
            match e.message.starts_with("malformed ") {
                true => FieldError::new(format!("invalid {type_name}: {}", e.message)),
                false => e,
            }
        });
    }
    if full.starts_with("google.protobuf.") {
        return Ok(());
    }
    walk(bytes, desc, alias.unwrap_or(full))
}

/// An `Any`'s type URL and value bytes.
fn any<'a>(bytes: &'a [u8], desc: &MessageDescriptor) -> Result<(&'a str, &'a [u8]), FieldError> {
    let url = match field(bytes, desc, "type_url")? {
        Some(Wire::Bytes(b)) => {
            std::str::from_utf8(b).map_err(|_| malformed("google.protobuf.Any type_url"))?
        }
        _ => "",
    };
    let value = match field(bytes, desc, "value")? {
        Some(Wire::Bytes(b)) => b,
        _ => &[],
    };
    Ok((url, value))
}

/// An HTTP filter or per-route filter config marked `is_optional` whose type the mesh does not
/// implement is skipped whole (Envoy and gRPC skip it too), as is a per-route `FilterConfig`
/// with `disabled: true` (its config is not used).
fn skipped_optional(bytes: &[u8], desc: &MessageDescriptor) -> Result<bool, FieldError> {
    let config = match desc.full_name() {
        "envoy.config.route.v3.FilterConfig" => "config",
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter" => "typed_config",
        _ => return Ok(false),
    };
    let flag = |name: &str| -> Result<bool, FieldError> {
        Ok(matches!(field(bytes, desc, name)?, Some(Wire::Varint(v)) if v != 0))
    };
    if config == "config" && flag("disabled")? {
        return Ok(true);
    }
    if !flag("is_optional")? {
        return Ok(false);
    }
    let known = match (field(bytes, desc, config)?, desc.get_field_by_name(config)) {
        (Some(Wire::Bytes(b)), Some(f)) => match f.kind() {
            Kind::Message(any_desc) => {
                let (url, _) = any(b, &any_desc)?;
                entry(url.rsplit('/').next().unwrap_or_default()).is_some()
            }
            _ => false,
        },
        _ => false,
    };
    Ok(!known)
}
