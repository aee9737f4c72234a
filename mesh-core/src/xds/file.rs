//! xDS resources in YAML or JSON files (proto3 JSON mapping, snake_case or camelCase, `Any`
//! with `@type`), and back to JSON for config dumps.
//!
//! This is the static-file configuration source (the shape of Envoy's filesystem xDS: a
//! `DiscoveryResponse` with a `resources` list) and the JSON rendering used by dumps. It
//! works from the descriptor set of the generated protos, so every xDS message is covered.
//!
//! ```
//! use mesh_core::xds::file;
//! let snap = file::snapshot_from_yaml(r#"
//! resources:
//! - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
//!   name: backend
//!   type: STATIC
//!   load_assignment:
//!     cluster_name: backend
//!     endpoints:
//!     - lb_endpoints:
//!       - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 8080}}}
//! "#, "inline.yaml").unwrap();
//! assert_eq!(snap.endpoints_for_cluster("backend").unwrap().localities[0].endpoints[0].address.port(), 8080);
//! ```

use std::path::Path;
use std::sync::{Arc, OnceLock};

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

use super::ResourceType;
use crate::config::{Cluster, EndpointAssignment, Listener, RouteConfig, Snapshot};

/// The descriptor set of every generated xDS message (from envoy-types).
static DESCRIPTOR_SET: &[u8] = include_bytes!("envoy-descriptors.bin");

/// A file or text that is not valid xDS.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {message}")]
#[non_exhaustive]
pub struct FileError {
    /// File path or a label for inline text.
    pub origin: String,
    /// What is wrong, with line and column where the parser knows them.
    pub message: String,
}

/// The pool of xDS message descriptors.
///
/// # Panics
/// Never in practice: the embedded descriptor set is checked by the tests.
pub fn descriptors() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let mut pool =
            DescriptorPool::decode(DESCRIPTOR_SET).expect("embedded descriptor set decodes");
        for package in ["udpa.type.v1", "xds.type.v3"] {
            if pool
                .get_message_by_name(&format!("{package}.TypedStruct"))
                .is_none()
            {
                pool.add_file_descriptor_proto(typed_struct(package))
                    .expect("TypedStruct's descriptor only refers to google.protobuf.Struct");
            }
        }
        pool
    })
}

/// `TypedStruct` (`udpa.type.v1` and `xds.type.v3`): an extension's config as a JSON-like
/// `Struct` with the extension's type URL. Control planes (Istio, Envoy Gateway) write it in
/// YAML and JSON; the generated protos do not carry it, so its two fields are declared here.
fn typed_struct(package: &str) -> prost_reflect::prost_types::FileDescriptorProto {
    use prost_reflect::prost_types::{
        field_descriptor_proto::{Label, Type},
        DescriptorProto, FieldDescriptorProto, FileDescriptorProto,
    };
    let field = |name: &str, number, kind: Type, type_name: Option<&str>| FieldDescriptorProto {
        name: Some(name.to_owned()),
        number: Some(number),
        label: Some(Label::Optional as i32),
        r#type: Some(kind as i32),
        type_name: type_name.map(str::to_owned),
        json_name: Some(if name == "type_url" {
            "typeUrl".to_owned()
        } else {
            name.to_owned()
        }),
        ..Default::default()
    };
    FileDescriptorProto {
        name: Some(format!("{}/typed_struct.proto", package.replace('.', "/"))),
        package: Some(package.to_owned()),
        dependency: vec!["google/protobuf/struct.proto".to_owned()],
        syntax: Some("proto3".to_owned()),
        message_type: vec![DescriptorProto {
            name: Some("TypedStruct".to_owned()),
            field: vec![
                field("type_url", 1, Type::String, None),
                field("value", 2, Type::Message, Some(".google.protobuf.Struct")),
            ],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn descriptor<M: Name>(origin: &str) -> Result<prost_reflect::MessageDescriptor, FileError> {
    descriptors()
        .get_message_by_name(&M::full_name())
        .ok_or_else(|| FileError {
            origin: origin.to_owned(),
            message: format!("no descriptor for {}", M::full_name()),
        })
}

fn convert<M: Message + Default>(dynamic: DynamicMessage, origin: &str) -> Result<M, FileError> {
    M::decode(dynamic.encode_to_vec().as_slice()).map_err(|e| FileError {
        origin: origin.to_owned(),
        message: format!("re-encoding failed: {e}"),
    })
}

/// Parses one message of type `M` from YAML (JSON is YAML too).
///
/// # Errors
/// Invalid YAML, unknown fields, wrong types; the message carries the position.
pub fn from_yaml<M: Message + Name + Default>(text: &str, origin: &str) -> Result<M, FileError> {
    let desc = descriptor::<M>(origin)?;
    let mut value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| FileError {
        origin: origin.to_owned(),
        message: e.to_string(),
    })?;
    normalize(&mut value, &desc);
    let dynamic = deserialize(desc, value, origin, "")?;
    convert(dynamic, origin)
}

/// Builds the message, naming the field path of an error (`virtualHosts[0].routes[1].route:
/// …`), which the proto3 JSON mapping alone does not say.
fn deserialize(
    desc: prost_reflect::MessageDescriptor,
    value: serde_yaml_ng::Value,
    origin: &str,
    prefix: &str,
) -> Result<DynamicMessage, FileError> {
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(value, &mut track);
    DynamicMessage::deserialize(desc, de).map_err(|e| {
        let path = track.path().to_string();
        let at = match (prefix.is_empty(), path.as_str()) {
            (_, "" | ".") => prefix.to_owned(),
            (true, p) => p.to_owned(),
            (false, p) => format!("{prefix}.{p}"),
        };
        FileError {
            origin: origin.to_owned(),
            message: if at.is_empty() {
                e.to_string()
            } else {
                format!("{at}: {e}")
            },
        }
    })
}

/// Envoy's YAML loader accepts a single mapping where a repeated field is expected (as in
/// Envoy's own `dynamic-config-fs` example); strict proto3 JSON does not. This wraps such
/// mappings in a one-element list, guided by the descriptors (through `Any` by `@type`).
fn normalize(value: &mut serde_yaml_ng::Value, desc: &prost_reflect::MessageDescriptor) {
    use prost_reflect::Kind;
    use serde_yaml_ng::Value as Y;
    let Y::Mapping(map) = value else {
        return;
    };
    let desc = if desc.full_name() == "google.protobuf.Any" {
        let Some(inner) = map.get("@type").and_then(Y::as_str).and_then(|t| {
            descriptors().get_message_by_name(t.rsplit('/').next().unwrap_or_default())
        }) else {
            return;
        };
        inner
    } else if desc.full_name().starts_with("google.protobuf.") {
        return;
    } else {
        desc.clone()
    };
    for (k, v) in map.iter_mut() {
        let Some(key) = k.as_str() else {
            continue;
        };
        let Some(field) = desc
            .get_field_by_name(key)
            .or_else(|| desc.get_field_by_json_name(key))
        else {
            continue;
        };
        if field.is_list() && matches!(v, Y::Mapping(_)) {
            *v = Y::Sequence(vec![std::mem::take(v)]);
        }
        let Kind::Message(child) = field.kind() else {
            continue;
        };
        if field.is_map() {
            if let (Y::Mapping(m), Kind::Message(entry_value)) =
                (v, child.map_entry_value_field().kind())
            {
                for (_, mv) in m.iter_mut() {
                    normalize(mv, &entry_value);
                }
            }
        } else if let Y::Sequence(items) = v {
            for item in items {
                normalize(item, &child);
            }
        } else {
            normalize(v, &child);
        }
    }
}

/// Parses a YAML list of messages of type `M` (the shape of Envoy Gateway's golden files).
///
/// # Errors
/// As [`from_yaml`], naming the list index.
pub fn list_from_yaml<M: Message + Name + Default>(
    text: &str,
    origin: &str,
) -> Result<Vec<M>, FileError> {
    let desc = descriptor::<M>(origin)?;
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| FileError {
        origin: origin.to_owned(),
        message: e.to_string(),
    })?;
    let seq = value.as_sequence().ok_or_else(|| FileError {
        origin: origin.to_owned(),
        message: "expected a list of resources".into(),
    })?;
    seq.iter()
        .enumerate()
        .map(|(i, item)| {
            let mut item = item.clone();
            normalize(&mut item, &desc);
            let dynamic = deserialize(desc.clone(), item, origin, &format!("[{i}]"))?;
            convert(dynamic, origin)
        })
        .collect()
}

/// Renders a message as proto3 JSON (snake_case field names, `Any` expanded with `@type`).
///
/// # Errors
/// An `Any` whose type is not in the descriptor set.
pub fn to_json<M: Message + Name>(msg: &M) -> Result<serde_json::Value, FileError> {
    let desc = descriptor::<M>("to_json")?;
    let dynamic =
        DynamicMessage::decode(desc, msg.encode_to_vec().as_slice()).map_err(|e| FileError {
            origin: "to_json".into(),
            message: e.to_string(),
        })?;
    let options = SerializeOptions::new().use_proto_field_name(true);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| FileError {
            origin: "to_json".into(),
            message: e.to_string(),
        })
}

/// Renders an `Any` as proto3 JSON with its `@type`.
///
/// # Errors
/// The type is not in the descriptor set or the bytes do not decode.
pub fn any_to_json(any: &Any) -> Result<serde_json::Value, FileError> {
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    let err = |message: String| FileError {
        origin: "any_to_json".into(),
        message,
    };
    let desc = descriptors()
        .get_message_by_name(name)
        .ok_or_else(|| err(format!("unknown type {:?}", any.type_url)))?;
    let dynamic =
        DynamicMessage::decode(desc, any.value.as_slice()).map_err(|e| err(e.to_string()))?;
    let options = SerializeOptions::new().use_proto_field_name(true);
    let mut json = dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| err(e.to_string()))?;
    if let serde_json::Value::Object(map) = &mut json {
        map.insert(
            "@type".into(),
            serde_json::Value::String(any.type_url.clone()),
        );
    }
    Ok(json)
}

/// Translates the resources of a `DiscoveryResponse`-shaped YAML or JSON text into a
/// snapshot. Every resource must be valid: a file is all or nothing.
///
/// # Errors
/// A parse error (with position) or the first resource that fails translation.
pub fn snapshot_from_yaml(text: &str, origin: &str) -> Result<Snapshot, FileError> {
    let resp: DiscoveryResponse = from_yaml(text, origin)?;
    snapshot_from_resources(&resp.resources).map_err(|message| FileError {
        origin: origin.to_owned(),
        message,
    })
}

/// Reads [`snapshot_from_yaml`] from a file.
///
/// # Errors
/// The file cannot be read, or as [`snapshot_from_yaml`].
pub fn load_snapshot(path: &Path) -> Result<Snapshot, FileError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| FileError {
        origin: origin.clone(),
        message: e.to_string(),
    })?;
    snapshot_from_yaml(&text, &origin)
}

/// Translates a list of `Any` resources of the four kinds into a snapshot.
///
/// # Errors
/// The first resource that fails to decode or translate, as text.
pub fn snapshot_from_resources(resources: &[Any]) -> Result<Snapshot, String> {
    use envoy_types::pb::envoy::config as pb;
    let mut snap = Snapshot::default();
    for (i, any) in resources.iter().enumerate() {
        let rt = ResourceType::from_type_url(&any.type_url)
            .ok_or_else(|| format!("resources[{i}]: unsupported type {:?}", any.type_url))?;
        let bad = |e: prost::DecodeError| format!("resources[{i}]: {e}");
        match rt {
            ResourceType::Listener => {
                let p = pb::listener::v3::Listener::decode(any.value.as_slice()).map_err(bad)?;
                snap.set_listener(Arc::new(Listener::try_from(&p).map_err(|e| e.to_string())?));
            }
            ResourceType::RouteConfiguration => {
                let p =
                    pb::route::v3::RouteConfiguration::decode(any.value.as_slice()).map_err(bad)?;
                snap.set_route_config(Arc::new(
                    RouteConfig::try_from(&p).map_err(|e| e.to_string())?,
                ));
            }
            ResourceType::Cluster => {
                let p = pb::cluster::v3::Cluster::decode(any.value.as_slice()).map_err(bad)?;
                snap.set_cluster(Arc::new(Cluster::try_from(&p).map_err(|e| e.to_string())?));
            }
            ResourceType::ClusterLoadAssignment => {
                let p = pb::endpoint::v3::ClusterLoadAssignment::decode(any.value.as_slice())
                    .map_err(bad)?;
                snap.set_endpoints(Arc::new(
                    EndpointAssignment::try_from(&p).map_err(|e| e.to_string())?,
                ));
            }
        }
    }
    Ok(snap)
}
