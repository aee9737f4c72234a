//! `meshctl dump`: fetch what an xDS server sends a node, as a client would.

use std::collections::BTreeMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::google::protobuf::Any;
use futures::StreamExt;
use mesh_core::xds::{file, ResourceType};

/// Fetches every listener and cluster (wildcard), then the route configurations and endpoint
/// assignments they reference, over one SotW ADS stream, ACKing each response.
///
/// # Errors
/// The server cannot be reached or does not answer within `timeout`.
pub async fn fetch(server: &str, node_id: &str, timeout: Duration) -> Result<Vec<Any>, String> {
    let node = Node {
        id: node_id.to_owned(),
        user_agent_name: "meshctl".into(),
        ..Default::default()
    };
    fetch_as(server, node, timeout).await
}

/// [`fetch`] as a given node: what a client in that node's locality (or with that user
/// agent) is sent.
///
/// # Errors
/// As [`fetch`].
pub async fn fetch_as(server: &str, node: Node, timeout: Duration) -> Result<Vec<Any>, String> {
    let uri = if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    };
    let work = async {
        let mut client = AggregatedDiscoveryServiceClient::connect(uri.clone())
            .await
            .map_err(|e| format!("cannot reach xDS server {uri}: {e}"))?
            .max_decoding_message_size(64 << 20);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<DiscoveryRequest>();
        let _ = tx.send(req(
            ResourceType::Listener,
            vec![],
            String::new(),
            String::new(),
            Some(node),
        ));
        let _ = tx.send(req(
            ResourceType::Cluster,
            vec![],
            String::new(),
            String::new(),
            None,
        ));
        let mut stream = client
            .stream_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
            .map_err(|s| format!("ADS stream to {uri} failed: {s}"))?
            .into_inner();
        let mut got: BTreeMap<ResourceType, Vec<Any>> = BTreeMap::new();
        let mut pending: BTreeMap<ResourceType, Vec<String>> = BTreeMap::new();
        while let Some(resp) = stream.next().await {
            let resp = resp.map_err(|s| format!("ADS stream to {uri} ended: {s}"))?;
            let Some(rt) = ResourceType::from_type_url(&resp.type_url) else {
                continue;
            };
            let names = pending.get(&rt).cloned().unwrap_or_default();
            let _ = tx.send(req(
                rt,
                names,
                resp.version_info.clone(),
                resp.nonce.clone(),
                None,
            ));
            // Follow references with the translation mesh-core would apply.
            if let Some((next, names)) = references(rt, &resp.resources) {
                pending.insert(next, names.clone());
                let _ = tx.send(req(next, names, String::new(), String::new(), None));
            }
            got.insert(rt, resp.resources);
            let done = ResourceType::ALL
                .iter()
                .all(|t| got.contains_key(t) || pending.get(t).is_some_and(|n| n.is_empty()));
            if done {
                break;
            }
        }
        Ok::<_, String>(got.into_values().flatten().collect())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("no complete answer from {uri} within {timeout:?}"))?
}

/// A discovery request.
fn req(
    rt: ResourceType,
    names: Vec<String>,
    version: String,
    nonce: String,
    node: Option<Node>,
) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version,
        node,
        resource_names: names,
        type_url: rt.type_url().into(),
        response_nonce: nonce,
        ..Default::default()
    }
}

/// What a response refers to that must be asked for next: the route configurations of
/// listeners (RDS) and the endpoint assignments of clusters (EDS).
fn references(rt: ResourceType, resources: &[Any]) -> Option<(ResourceType, Vec<String>)> {
    let held = file::snapshot_from_resources(resources).unwrap_or_default();
    match rt {
        ResourceType::Listener => {
            let rds: Vec<String> = held
                .listeners()
                .values()
                .flat_map(|l| l.route_sources().into_iter().cloned().collect::<Vec<_>>())
                .filter_map(|s| match s {
                    mesh_core::config::RouteSource::Rds(n) => Some(n),
                    mesh_core::config::RouteSource::Inline(_) => None,
                })
                .collect();
            Some((ResourceType::RouteConfiguration, rds))
        }
        ResourceType::Cluster => {
            let eds: Vec<String> = held
                .clusters()
                .values()
                .filter_map(|c| c.eds_service_name().map(str::to_owned))
                .collect();
            Some((ResourceType::ClusterLoadAssignment, eds))
        }
        _ => None,
    }
}

/// Resources as JSON: `{"listeners": [...], "route_configs": [...], "clusters": [...],
/// "endpoints": [...]}`, each in the proto3 JSON mapping.
pub fn to_json(resources: &[Any]) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (rt, key) in [
        (ResourceType::Listener, "listeners"),
        (ResourceType::RouteConfiguration, "route_configs"),
        (ResourceType::Cluster, "clusters"),
        (ResourceType::ClusterLoadAssignment, "endpoints"),
    ] {
        let list: Vec<serde_json::Value> = resources
            .iter()
            .filter(|a| a.type_url == rt.type_url())
            .map(|a| {
                file::any_to_json(a).unwrap_or_else(|e| serde_json::json!({"error": e.to_string()}))
            })
            .collect();
        out.insert(key.into(), serde_json::Value::Array(list));
    }
    serde_json::Value::Object(out)
}
