//! The xDS client over TLS (`channel_creds: [{"type": "tls"}]`) to a TLS xDS server, with a
//! real CA from rcgen and a real handshake on 127.0.0.1.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cpb;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as epb;
use envoy_types::pb::envoy::config::listener::v3 as lpb;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::google::protobuf::Any;
use mesh_control::ads::{AdsServer, ResourceCache};
use mesh_core::xds::{Bootstrap, XdsClient};
use mesh_core::XdsError;
use prost::{Message, Name};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::transport::{Identity, Server, ServerTlsConfig};

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn resources() -> Vec<Any> {
    let manager = hcm::HttpConnectionManager {
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(
            envoy_types::pb::envoy::config::route::v3::RouteConfiguration {
                name: "inline".into(),
                ..Default::default()
            },
        )),
        http_filters: vec![hcm::HttpFilter {
            name: "router".into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                &Router::default(),
            ))),
            ..Default::default()
        }],
        ..Default::default()
    };
    let endpoint = epb::LbEndpoint {
        host_identifier: Some(epb::lb_endpoint::HostIdentifier::Endpoint(epb::Endpoint {
            address: Some(core::Address {
                address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                    address: "127.0.0.1".into(),
                    port_specifier: Some(core::socket_address::PortSpecifier::PortValue(1)),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        ..Default::default()
    };
    vec![
        any(&lpb::Listener {
            name: "svc".into(),
            api_listener: Some(lpb::ApiListener {
                api_listener: Some(any(&manager)),
            }),
            ..Default::default()
        }),
        any(&cpb::Cluster {
            name: "static".into(),
            load_assignment: Some(epb::ClusterLoadAssignment {
                cluster_name: "static".into(),
                endpoints: vec![epb::LocalityLbEndpoints {
                    lb_endpoints: vec![endpoint],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }),
    ]
}

struct Pki {
    dir: std::path::PathBuf,
    server: Identity,
}

fn pki(tag: &str) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, &ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("mesh-xds-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    Pki {
        dir,
        server: Identity::from_pem(cert.pem(), key.serialize_pem()),
    }
}

async fn tls_server(identity: Identity) -> std::net::SocketAddr {
    let cache = ResourceCache::new();
    cache.set_resources(resources());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = AdsServer::new(cache).into_service();
    tokio::spawn(
        Server::builder()
            .tls_config(ServerTlsConfig::new().identity(identity))
            .unwrap()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

fn tls_bootstrap(addr: std::net::SocketAddr, ca: &std::path::Path) -> Bootstrap {
    let json = format!(
        r#"{{"xds_servers": [{{"server_uri": "localhost:{}",
             "channel_creds": [{{"type": "tls", "config": {{"ca_certificate_file": "{}"}}}}],
             "server_features": ["xds_v3"]}}],
            "node": {{"id": "tls-node"}}}}"#,
        addr.port(),
        ca.display()
    );
    Bootstrap::from_json(&json, "tls-bootstrap").unwrap()
}

#[tokio::test]
async fn tls_channel_creds_verify_the_server() {
    let pki = pki("ok");
    let addr = tls_server(pki.server).await;
    let client = XdsClient::builder(tls_bootstrap(addr, &pki.dir.join("ca.pem")))
        .build()
        .unwrap();
    let l = client
        .listener("xds:///svc", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(l.api().is_some());
    assert_eq!(
        client.store().dump().server,
        format!("https://localhost:{}", addr.port())
    );
}

#[tokio::test]
async fn tls_rejects_a_server_from_another_ca() {
    let trusted = pki("trusted");
    let other = pki("other");
    let addr = tls_server(other.server).await;
    let client = XdsClient::builder(tls_bootstrap(addr, &trusted.dir.join("ca.pem")))
        .backoff(Duration::from_millis(50), Duration::from_millis(200))
        .build()
        .unwrap();
    let err = client
        .listener("xds:///svc", Duration::from_millis(800))
        .await
        .unwrap_err();
    let XdsError::ListenerNotDelivered { detail, .. } = &err else {
        panic!("{err}")
    };
    assert!(detail.contains("not connected"), "{detail}");
    assert!(client.store().load().listeners().is_empty());
}

#[test]
fn missing_ca_file_is_named() {
    let bootstrap = tls_bootstrap(
        "127.0.0.1:1".parse().unwrap(),
        std::path::Path::new("/nonexistent/ca.pem"),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(async { XdsClient::builder(bootstrap).build().map(|_| ()) })
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("ca_certificate_file") && msg.contains("/nonexistent/ca.pem"),
        "{msg}"
    );
}
