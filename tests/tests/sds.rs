//! SDS over the ADS stream from the development CA: a workload asks for `default` and
//! `ROOTCA`, gets a SPIFFE SVID for the identity its node claims, and a renewed one before
//! the first expires.

use std::time::Duration;

use base64::Engine;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use mesh_control::ads::sds::{SdsIssuer, SECRET_TYPE};
use mesh_control::ads::{AdsServer, ResourceCache};
use mesh_control::ca::DevCa;
use prost::Message;
use tokio_stream::StreamExt;

fn der_of(pem: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(pem);
    let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn identity_cert(resp: &DiscoveryResponse) -> Vec<u8> {
    for any in &resp.resources {
        let s = Secret::decode(any.value.as_slice()).unwrap();
        if let Some(secret::Type::TlsCertificate(t)) = s.r#type {
            let Some(
                envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(b),
            ) = t.certificate_chain.unwrap().specifier
            else {
                panic!("inline chain expected")
            };
            return b;
        }
    }
    panic!("no TlsCertificate in {resp:?}");
}

#[tokio::test]
async fn sds_issues_and_rotates_spiffe_svids() {
    let issuer = SdsIssuer::new(DevCa::new("cluster.local").unwrap(), Duration::from_secs(2));
    let server = AdsServer::new(ResourceCache::new()).with_sds(issuer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server.serve(listener, std::future::pending()));

    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let node = Node {
        id: "sidecar~10.0.0.1~frontend-1.prod~prod.svc.cluster.local".into(),
        metadata: Some(Struct {
            fields: [(
                "SERVICE_ACCOUNT".to_string(),
                Value {
                    kind: Some(Kind::StringValue("frontend".into())),
                },
            )]
            .into_iter()
            .collect(),
        }),
        ..Default::default()
    };
    tx.send(DiscoveryRequest {
        node: Some(node),
        resource_names: vec!["default".into(), "ROOTCA".into()],
        type_url: SECRET_TYPE.into(),
        ..Default::default()
    })
    .unwrap();
    let mut responses = client
        .stream_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), responses.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.resources.len(), 2);
    let cert = identity_cert(&first);
    assert!(contains(
        &der_of(&cert),
        b"spiffe://cluster.local/ns/prod/sa/frontend"
    ));
    tx.send(DiscoveryRequest {
        version_info: first.version_info.clone(),
        resource_names: vec!["default".into(), "ROOTCA".into()],
        type_url: SECRET_TYPE.into(),
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .unwrap();
    // Renewed at half the TTL, pushed without being asked.
    let second = tokio::time::timeout(Duration::from_secs(5), responses.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_ne!(second.version_info, first.version_info);
    let renewed = identity_cert(&second);
    assert_ne!(renewed, cert, "a new certificate");
    assert!(contains(
        &der_of(&renewed),
        b"spiffe://cluster.local/ns/prod/sa/frontend"
    ));
}

#[test]
fn identity_from_node() {
    let node = |id: &str| Node {
        id: id.into(),
        ..Default::default()
    };
    assert_eq!(
        SdsIssuer::identity(&node("sidecar~10.0.0.1~web-7.shop~shop.svc.cluster.local")).unwrap(),
        ("shop".to_string(), "default".to_string())
    );
    let err = SdsIssuer::identity(&node("plain-node")).unwrap_err();
    assert!(err.contains("no namespace"), "{err}");
}
