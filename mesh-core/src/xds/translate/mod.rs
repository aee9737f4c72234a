//! Translation of xDS protos into the plain [`crate::config`] model.
//!
//! Every resource kind has a `TryFrom<proto>` impl. Translation validates as it goes, with the
//! rules of Envoy and gRPC where they agree, and a rejected resource yields a
//! [`TranslateError`] naming the resource and the field path, for example
//! `route_config "r1": virtual_hosts[2].routes[0].route.weighted_clusters: total weight is 0`.
//! That message is what the xDS client sends back in a NACK's `error_detail`.

use std::borrow::Cow;
use std::time::Duration;

use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};
use prost::{Message, Name};

use super::ResourceType;

mod cluster;
mod discovery;
mod endpoint;
mod fault;
mod lb;
pub mod ledger;
mod listener;
mod matcher;
mod rbac;
mod route;
mod tls;

pub use crate::error::TranslateError;

/// An error inside a resource, with the path collected as it bubbles up.
#[derive(Clone, Debug)]
pub(crate) struct FieldError {
    /// Innermost segment first.
    segments: Vec<Cow<'static, str>>,
    message: String,
}

impl FieldError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self {
            segments: Vec::new(),
            message: message.into(),
        }
    }

    fn path(&self) -> String {
        let mut out = String::new();
        for seg in self.segments.iter().rev().filter(|s| !s.is_empty()) {
            if !out.is_empty() && !seg.starts_with('[') {
                out.push('.');
            }
            out.push_str(seg);
        }
        out
    }

    /// Adds a list index to the path (the field's name is added after it).
    pub(crate) fn index(mut self, i: usize) -> Self {
        self.segments.push(Cow::Owned(format!("[{i}]")));
        self
    }

    /// Adds a map key to the path (the field's name is added after it).
    pub(crate) fn key(mut self, key: &str) -> Self {
        self.segments.push(Cow::Owned(format!("[{key:?}]")));
        self
    }

    pub(crate) fn into_error(self, resource_type: ResourceType, name: &str) -> TranslateError {
        TranslateError {
            resource_type,
            name: name.to_owned(),
            path: self.path(),
            message: self.message,
        }
    }
}

/// Adds path segments to errors on their way out.
pub(crate) trait At<T> {
    fn at(self, field: impl Into<Cow<'static, str>>) -> Result<T, FieldError>;
    fn at_index(self, field: &'static str, index: usize) -> Result<T, FieldError>;
    fn at_key(self, field: &'static str, key: &str) -> Result<T, FieldError>;
}

impl<T> At<T> for Result<T, FieldError> {
    fn at(self, field: impl Into<Cow<'static, str>>) -> Result<T, FieldError> {
        self.map_err(|mut e| {
            e.segments.push(field.into());
            e
        })
    }

    fn at_index(self, field: &'static str, index: usize) -> Result<T, FieldError> {
        self.map_err(|mut e| {
            e.segments.push(Cow::Owned(format!("[{index}]")));
            e.segments.push(Cow::Borrowed(field));
            e
        })
    }

    fn at_key(self, field: &'static str, key: &str) -> Result<T, FieldError> {
        self.map_err(|mut e| {
            e.segments.push(Cow::Owned(format!("[{key:?}]")));
            e.segments.push(Cow::Borrowed(field));
            e
        })
    }
}

pub(crate) fn err<T>(message: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError::new(message))
}

/// The message type named by an `Any`'s type URL (the part after the last `/`).
pub(crate) fn type_name(any: &Any) -> &str {
    any.type_url.rsplit('/').next().unwrap_or_default()
}

/// Decodes an `Any` holding `M`, checking the type URL.
pub(crate) fn decode_any<M: Message + Name + Default>(any: &Any) -> Result<M, FieldError> {
    let want = M::full_name();
    if type_name(any) != want {
        return err(format!("expected {want}, got {:?}", any.type_url));
    }
    M::decode(any.value.as_slice()).map_err(|e| FieldError::new(format!("invalid {want}: {e}")))
}

pub(crate) fn duration(d: &PbDuration) -> Result<Duration, FieldError> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return err(format!(
            "invalid duration {}s {}ns: must be non-negative",
            d.seconds, d.nanos
        ));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// An optional duration where zero means "disabled".
pub(crate) fn opt_nonzero_duration(d: Option<&PbDuration>) -> Result<Option<Duration>, FieldError> {
    match d {
        None => Ok(None),
        Some(d) => duration(d).map(|d| (!d.is_zero()).then_some(d)),
    }
}

pub(crate) fn fraction(
    p: Option<&envoy_types::pb::envoy::r#type::v3::FractionalPercent>,
    default: crate::config::Fraction,
) -> Result<crate::config::Fraction, FieldError> {
    let Some(p) = p else {
        return Ok(default);
    };
    let scale: u64 = match p.denominator {
        0 => 10_000,
        1 => 100,
        2 => 1,
        other => return err(format!("unknown denominator {other}")).at("denominator"),
    };
    Ok(crate::config::Fraction::per_million(
        u64::from(p.numerator) * scale,
    ))
}

#[cfg(test)]
mod tests;
