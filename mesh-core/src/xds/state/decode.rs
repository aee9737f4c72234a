//! Decoding and translating the resources of a response, and the NACK that reports what
//! could not be.

use super::*;
use crate::config::{Cluster, EndpointAssignment, Listener, RouteConfig};
use crate::xds::translate::TranslateError;
use crate::xds::ResourceType;
use envoy_types::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment as PbCla;
use envoy_types::pb::envoy::config::listener::v3::Listener as PbListener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration as PbRouteConfig;
use envoy_types::pb::envoy::service::discovery::v3::Resource as PbResource;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status;
use prost::Message;
use std::sync::Arc;

/// The outcome of one resource in a response.
pub(super) type Decoded = (
    Option<String>,
    Result<Resource, TranslateError>,
    Option<Any>,
);

/// A resource that could not be decoded far enough to be named.
pub(super) fn undecodable(rt: ResourceType, message: String) -> TranslateError {
    TranslateError {
        resource_type: rt,
        name: String::new(),
        path: String::new(),
        message,
    }
}

/// A response-level problem with one named resource.
pub(super) fn refused(rt: ResourceType, name: &str, message: String) -> TranslateError {
    TranslateError {
        resource_type: rt,
        name: name.to_owned(),
        path: String::new(),
        message,
    }
}

/// The NACK message of a response: every problem in it.
pub(super) fn nack_message(errors: &[TranslateError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

pub(super) fn nack_status(message: String) -> Status {
    Status {
        code: INVALID_ARGUMENT,
        message,
        details: Vec::new(),
    }
}

/// Decodes and translates one resource. The name is `None` when the bytes could not be
/// decoded far enough to find it.
pub(super) fn decode(rt: ResourceType, any: Any) -> Decoded {
    let any = match unwrap(rt, any) {
        Ok(any) => any,
        Err(e) => return (None, Err(e), None),
    };
    fn run<P: Message + Default, T>(
        any: Any,
        rt: ResourceType,
        name: impl Fn(&P) -> String,
        translate: impl Fn(&P) -> Result<T, TranslateError>,
        wrap: impl Fn(Arc<T>) -> Resource,
    ) -> Decoded {
        match P::decode(any.value.as_slice()) {
            Err(e) => (
                None,
                Err(undecodable(rt, format!("cannot decode protobuf: {e}"))),
                None,
            ),
            Ok(p) => {
                let n = name(&p);
                let result = translate(&p).map(|t| wrap(Arc::new(t)));
                (Some(n), result, Some(any))
            }
        }
    }
    match rt {
        ResourceType::Listener => run::<PbListener, _>(
            any,
            rt,
            |p| p.name.clone(),
            |p| Listener::try_from(p),
            Resource::Listener,
        ),
        ResourceType::RouteConfiguration => run::<PbRouteConfig, _>(
            any,
            rt,
            |p| p.name.clone(),
            |p| RouteConfig::try_from(p),
            Resource::RouteConfig,
        ),
        ResourceType::Cluster => run::<PbCluster, _>(
            any,
            rt,
            |p| p.name.clone(),
            |p| Cluster::try_from(p),
            Resource::Cluster,
        ),
        ResourceType::ClusterLoadAssignment => run::<PbCla, _>(
            any,
            rt,
            |p| p.cluster_name.clone(),
            |p| EndpointAssignment::try_from(p),
            Resource::Endpoints,
        ),
    }
}

/// How the type URL of a wrapped resource ends (`/` and `PbResource::full_name()`, written
/// out so that no resource formats it).
const WRAPPED: &str = "/envoy.service.discovery.v3.Resource";

/// The resource itself: some servers wrap resources in `envoy.service.discovery.v3.Resource`;
/// either way it must be of the response's type.
fn unwrap(rt: ResourceType, any: Any) -> Result<Any, TranslateError> {
    let any = if any.type_url.ends_with(WRAPPED) {
        match PbResource::decode(any.value.as_slice()) {
            Ok(PbResource {
                resource: Some(inner),
                ..
            }) => inner,
            Ok(_) => return Err(undecodable(rt, "wrapped resource has no body".into())),
            Err(e) => {
                return Err(undecodable(
                    rt,
                    format!("undecodable Resource wrapper: {e}"),
                ))
            }
        }
    } else {
        any
    };
    if any.type_url != rt.type_url() {
        return Err(undecodable(
            rt,
            format!(
                "resource of type {:?} in a {} response",
                any.type_url,
                rt.type_url()
            ),
        ));
    }
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Name;

    #[test]
    fn the_wrapped_type_url_is_the_resource_wrappers() {
        assert_eq!(WRAPPED, format!("/{}", PbResource::full_name()));
    }
}
