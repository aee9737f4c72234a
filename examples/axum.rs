//! # axum: an axum app on the mesh
//!
//! `cargo run -p mesh-examples --bin axum`
//!
//! One process, all on 127.0.0.1:
//! - a control plane (`mesh-control`, in-process) serving Istio YAML for `greeter`
//!   (mTLS by a DestinationRule, `ISTIO_MUTUAL`);
//! - `greeter`: an axum `Router` with the mesh's inbound stack as an ordinary layer
//!   (`Router::layer(InboundLayer::new(..))`: server span, metrics, RBAC), served over STRICT
//!   mTLS by `mesh_tower::server::serve`; its handlers take the caller's SPIFFE identity
//!   (`mesh_tower::axum::Peer`) and axum's `ConnectInfo<SocketAddr>`;
//! - a `MeshClient` with its own identity calls it, configured over xDS.
//!
//! It prints what each call returned and exits non-zero if one failed.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use mesh_control::ads::{AdsServer, ResourceCache};
use mesh_control::ca::DevCa;
use mesh_control::istio::{self, Options};
use mesh_core::identity::IdentityStore;
use mesh_core::xds::{Bootstrap, XdsClient};
use mesh_tower::axum::Peer;
use mesh_tower::server::InboundLayer;
use mesh_tower::tls::{MeshAcceptor, TlsMode};
use mesh_tower::MeshClient;
use tower::Service;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const TARGET: &str = "xds:///greeter.prod.svc.cluster.local:80";

fn config(port: u16) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: greeter, namespace: prod}}
spec:
  hosts: [greeter.prod.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}, serviceAccount: greeter}}]
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: greeter, namespace: prod}}
spec:
  host: greeter.prod.svc.cluster.local
  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}
"#
    )
}

/// `GET /hello/{name}`: who called, from where.
async fn hello(
    Path(name): Path<String>,
    Peer(caller): Peer,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
) -> String {
    format!(
        "hello {name}, you are {caller} calling from {}\n",
        addr.ip()
    )
}

fn identity(ca: &DevCa, sa: &str) -> Result<IdentityStore> {
    Ok(IdentityStore::new(ca.workload_identity(
        "prod",
        sa,
        Duration::from_secs(3600),
    )?))
}

#[tokio::main]
async fn main() -> Result<()> {
    let ca = DevCa::new("cluster.local")?;

    // greeter: an axum Router, the mesh's inbound stack as a layer, STRICT mTLS.
    let app: Router = Router::new()
        .route("/hello/{name}", get(hello))
        .layer(InboundLayer::new("greeter"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let acceptor = MeshAcceptor::new(TlsMode::Strict, Some(&identity(&ca, "greeter")?))?;
    tokio::spawn(mesh_tower::server::serve(
        listener,
        acceptor,
        app,
        std::future::pending(),
    ));

    // The control plane, loaded with Istio YAML.
    let show = |errors: Vec<istio::ConfigError>| {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let parsed = istio::parse(&config(port), "axum-example.yaml").map_err(show)?;
    let generated = istio::generate(&parsed, &Options::default()).map_err(show)?;
    let cache = ResourceCache::new();
    cache.set_resources(generated.resources);
    let xds_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let xds_addr = xds_listener.local_addr()?;
    tokio::spawn(AdsServer::new(cache).serve(xds_listener, std::future::pending()));

    // The caller: a mesh client with its own identity, waiting for its configuration.
    let xds = XdsClient::builder(Bootstrap::new(xds_addr.to_string(), "axum-client")).build()?;
    let mut client = MeshClient::builder(xds.store().clone(), TARGET)?
        .identity(identity(&ca, "client")?)
        .wait_for_config(Duration::from_secs(10))
        .build();
    xds.listener(TARGET, Duration::from_secs(10)).await?;

    let mut failed = 0;
    for name in ["ada", "grace", "barbara"] {
        let req = http::Request::get(format!(
            "http://greeter.prod.svc.cluster.local/hello/{name}"
        ))
        .body(Empty::<Bytes>::new())?;
        let resp = client.ready().await?.call(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        print!("{status} {}", String::from_utf8_lossy(&body));
        if !status.is_success() {
            failed += 1;
        }
    }
    if failed > 0 {
        return Err(format!("{failed} calls failed").into());
    }
    Ok(())
}
