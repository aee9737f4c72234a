//! The ledger check over the protobuf wire format: what the reference check does over a
//! `DynamicMessage`, without building one. Each field is read in place (its tag, and for
//! messages its bytes) and looked up in the ledger compiled once against the descriptors
//! ([`Plans`]); nothing is allocated on the way, so checking an update costs a pass over its
//! bytes, not a decode into a tree of values.
//!
//! What counts as set is what a `DynamicMessage` says is set: a field with presence (a
//! message, a oneof member, a proto3 `optional`) whenever it is on the wire, a repeated or
//! map field per element, and any other scalar only with a value that is not its default.
//! Fields the descriptors do not know are skipped, as a `DynamicMessage` keeps them apart.

use std::collections::HashMap;
use std::sync::OnceLock;

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

/// The ledger compiled against the descriptors, once: for every entry, every field by number
/// with its treatment and how its value is checked. The walk then reads each field with one
/// binary search, instead of asking the descriptor pool for the field, its kind and its
/// name and searching the entry by name.
struct Plans {
    plans: Vec<Plan>,
    by_key: HashMap<&'static str, usize>,
}

/// One ledger entry compiled against its message's descriptor.
struct Plan {
    /// The entry's message (the descriptor's full name), as errors name it.
    message: &'static str,
    desc: MessageDescriptor,
    /// Every field the descriptor has, sorted by number.
    fields: Vec<(u32, FieldPlan)>,
    /// For an HTTP filter or a per-route filter config: the field holding its config (see
    /// [`skipped_optional`]).
    optional: Option<&'static str>,
}

/// What the walk needs to know of one field.
struct FieldPlan {
    /// The field's name, as the descriptor gives it.
    name: String,
    /// What the ledger says (with the field's name as the ledger spells it); `None` when
    /// the ledger does not list the field.
    treatment: Option<(&'static str, Treatment)>,
    /// A list: each element is set, whatever its value, and errors name its index.
    list: bool,
    /// A map: each entry is set, whatever its value.
    map: bool,
    /// Set whenever it is on the wire (a message, a oneof member, a proto3 `optional`).
    presence: bool,
    value: Value,
}

/// How a field's value is checked.
enum Value {
    /// A scalar, or packed scalars: nothing inside.
    Scalar,
    /// A message walked against the plan at this index; `None` when the ledger has no entry
    /// for it (a type the translator refuses).
    Message(Option<usize>),
    /// A well-known type, taken as it is.
    WellKnown,
    /// An `Any`, opened by its type URL.
    Any,
    /// A map entry: its value checked under its key.
    Map {
        entry: String,
        key: u32,
        value: u32,
        inner: Box<Value>,
    },
}

impl Plans {
    fn get() -> &'static Plans {
        static PLANS: OnceLock<Plans> = OnceLock::new();
        PLANS.get_or_init(Plans::build)
    }

    fn build() -> Plans {
        let pool = crate::xds::file::descriptors();
        let entries: Vec<(&'static super::Entry, MessageDescriptor)> = super::entries()
            .iter()
            .filter_map(|e| Some((e, pool.get_message_by_name(e.message)?)))
            .collect();
        let by_key: HashMap<&'static str, usize> = entries
            .iter()
            .enumerate()
            .map(|(i, (e, _))| (e.key, i))
            .collect();
        let plans = entries
            .iter()
            .map(|(entry, desc)| {
                let mut fields: Vec<(u32, FieldPlan)> = desc
                    .fields()
                    .map(|f| (f.number(), FieldPlan::new(entry, &f, &by_key)))
                    .collect();
                fields.sort_by_key(|(n, _)| *n);
                let optional = match entry.message {
                    "envoy.config.route.v3.FilterConfig" => Some("config"),
                    "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter" => {
                        Some("typed_config")
                    }
                    _ => None,
                };
                Plan {
                    message: entry.message,
                    desc: desc.clone(),
                    fields,
                    optional,
                }
            })
            .collect();
        Plans { plans, by_key }
    }
}

impl FieldPlan {
    /// Field `f` of `entry`'s message; `by_key`: the plans' indices by ledger key.
    fn new(
        entry: &super::Entry,
        f: &prost_reflect::FieldDescriptor,
        by_key: &HashMap<&'static str, usize>,
    ) -> FieldPlan {
        let name = f.name().to_owned();
        let treatment = entry
            .fields
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(n, t)| (*n, *t));
        let alias = match treatment {
            Some((_, Treatment::HonouredAs(alias))) => Some(alias),
            _ => None,
        };
        let value = match f.kind() {
            Kind::Message(inner) if f.is_map() => {
                let value_field = inner.map_entry_value_field();
                match value_field.kind() {
                    Kind::Message(v) => Value::Map {
                        entry: inner.full_name().to_owned(),
                        key: inner.map_entry_key_field().number(),
                        value: value_field.number(),
                        inner: Box::new(Value::of(&v, alias, by_key)),
                    },
                    _ => Value::Scalar,
                }
            }
            Kind::Message(inner) => Value::of(&inner, alias, by_key),
            _ => Value::Scalar,
        };
        FieldPlan {
            name,
            treatment,
            list: f.is_list(),
            map: f.is_map(),
            presence: f.supports_presence(),
            value,
        }
    }
}

impl Value {
    /// How a message value of type `desc` is checked, under the ledger entry `alias` if the
    /// field names one.
    fn of(
        desc: &MessageDescriptor,
        alias: Option<&str>,
        by_key: &HashMap<&'static str, usize>,
    ) -> Value {
        let full = desc.full_name();
        if full == "google.protobuf.Any" {
            Value::Any
        } else if full.starts_with("google.protobuf.") {
            Value::WellKnown
        } else {
            Value::Message(by_key.get(alias.unwrap_or(full)).copied())
        }
    }
}

impl Plan {
    fn field(&self, number: u32) -> Option<&FieldPlan> {
        self.fields
            .binary_search_by_key(&number, |(n, _)| *n)
            .ok()
            .map(|i| &self.fields[i].1)
    }
}

/// Checks a resource's bytes against the ledger entry `key` (one of [`super::ROOTS`]).
pub(super) fn check(bytes: &[u8], key: &str) -> Result<(), FieldError> {
    let plans = Plans::get();
    match plans.by_key.get(key) {
        Some(&i) => walk(plans, bytes, &plans.plans[i]),
        None => err(format!("no descriptor for {key}")),
    }
}

/// Checks a message's bytes against its compiled ledger entry.
fn walk(plans: &Plans, bytes: &[u8], plan: &Plan) -> Result<(), FieldError> {
    if let Some(config) = plan.optional {
        if skipped_optional(bytes, &plan.desc, config)? {
            return Ok(());
        }
    }
    let mut buf = bytes;
    // The field just read and how many of it came before (a repeated field's index).
    let mut previous: Option<(u32, usize)> = None;
    // The refusal of the lowest field number: the one a walk in field order meets first
    // (the wire holds fields in the order of the message's declaration).
    let mut refused: Option<(u32, FieldError)> = None;
    while !buf.is_empty() {
        let (number, value) = next(&mut buf, plan.message)?;
        let index = match previous {
            Some((n, i)) if n == number => i + 1,
            _ => 0,
        };
        previous = Some((number, index));
        if refused.as_ref().is_some_and(|(n, _)| *n <= number) {
            continue;
        }
        if let Err(e) = field_ok(plans, plan, number, index, &value) {
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
    plans: &Plans,
    plan: &Plan,
    number: u32,
    index: usize,
    value: &Wire<'_>,
) -> Result<(), FieldError> {
    let Some(field) = plan.field(number) else {
        return Ok(());
    };
    if !field.list && !field.map && !field.presence && is_default(value) {
        return Ok(());
    }
    let Some((static_name, treatment)) = field.treatment else {
        let name = &field.name;
        return err(format!(
            "{name} (of {}) is not known to the mesh; refusing it rather than ignoring it",
            plan.message
        ))
        .at(name.clone());
    };
    match treatment {
        Treatment::Ignored(_) => return Ok(()),
        Treatment::Refused => {
            return err(format!("{static_name} is not supported by the mesh")).at(static_name)
        }
        Treatment::Honoured | Treatment::HonouredAs(_) => {}
    }
    let Wire::Bytes(bytes) = value else {
        // Scalars, and packed lists of them, have no fields of their own.
        return Ok(());
    };
    let checked = match &field.value {
        Value::Scalar => return Ok(()),
        Value::Map {
            entry,
            key,
            value,
            inner,
        } => map_entry(plans, bytes, entry, *key, *value, inner),
        inner => {
            let r = message(plans, bytes, inner);
            if field.list {
                r.map_err(|e| e.index(index))
            } else {
                r
            }
        }
    };
    checked.at(static_name)
}

fn is_default(value: &Wire<'_>) -> bool {
    match value {
        Wire::Varint(v) | Wire::Fixed(v) => *v == 0,
        Wire::Bytes(b) => b.is_empty(),
    }
}

/// A map field's entry: its value, checked under its key.
fn map_entry(
    plans: &Plans,
    bytes: &[u8],
    entry: &str,
    key: u32,
    value: u32,
    inner: &Value,
) -> Result<(), FieldError> {
    let key = match last(bytes, key, entry)? {
        Some(Wire::Bytes(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(Wire::Varint(v) | Wire::Fixed(v)) => v.to_string(),
        None => String::new(),
    };
    let value = match last(bytes, value, entry)? {
        Some(Wire::Bytes(b)) => b,
        Some(_) => return Err(malformed(entry)),
        None => &[],
    };
    message(plans, value, inner).map_err(|e| e.key(&key))
}

/// A message value: an `Any` is opened (if the ledger lists its type), well-known types
/// are taken as they are, any other message is walked.
fn message(plans: &Plans, bytes: &[u8], value: &Value) -> Result<(), FieldError> {
    match value {
        Value::Message(Some(i)) => walk(plans, bytes, &plans.plans[*i]),
        Value::Message(None) | Value::WellKnown | Value::Scalar | Value::Map { .. } => Ok(()),
        Value::Any => {
            let (url, value) = any(bytes)?;
            let type_name = url.rsplit('/').next().unwrap_or_default();
            // Opened by the entry of the type's own name (not an alias of it).
            let Some(plan) = plans
                .by_key
                .get(type_name)
                .map(|&i| &plans.plans[i])
                .filter(|p| p.message == type_name)
            else {
                return Ok(());
            };
            walk(plans, value, plan).map_err(|e| match e.message.starts_with("malformed ") {
                true => FieldError::new(format!("invalid {type_name}: {}", e.message)),
                false => e,
            })
        }
    }
}

/// An `Any`'s type URL (field 1) and value bytes (field 2).
fn any(bytes: &[u8]) -> Result<(&str, &[u8]), FieldError> {
    const ANY: &str = "google.protobuf.Any";
    let url = match last(bytes, 1, ANY)? {
        Some(Wire::Bytes(b)) => {
            std::str::from_utf8(b).map_err(|_| malformed("google.protobuf.Any type_url"))?
        }
        _ => "",
    };
    let value = match last(bytes, 2, ANY)? {
        Some(Wire::Bytes(b)) => b,
        _ => &[],
    };
    Ok((url, value))
}

/// An HTTP filter or per-route filter config marked `is_optional` whose type the mesh does not
/// implement is skipped whole (Envoy and gRPC skip it too), as is a per-route `FilterConfig`
/// with `disabled: true` (its config is not used). `config`: the field holding the config.
fn skipped_optional(
    bytes: &[u8],
    desc: &MessageDescriptor,
    config: &str,
) -> Result<bool, FieldError> {
    let flag = |name: &str| -> Result<bool, FieldError> {
        Ok(matches!(field(bytes, desc, name)?, Some(Wire::Varint(v)) if v != 0))
    };
    if config == "config" && flag("disabled")? {
        return Ok(true);
    }
    if !flag("is_optional")? {
        return Ok(false);
    }
    let known = match field(bytes, desc, config)? {
        Some(Wire::Bytes(b)) => {
            let (url, _) = any(b)?;
            entry(url.rsplit('/').next().unwrap_or_default()).is_some()
        }
        _ => false,
    };
    Ok(!known)
}
