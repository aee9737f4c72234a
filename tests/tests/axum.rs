//! axum with the mesh: `Router::layer(InboundLayer)` over real sockets and real mTLS, axum's
//! `ConnectInfo<SocketAddr>` filled in, the peer identity as an extractor, RBAC refusals and
//! handler failures answered as responses, and an axum `Router` handed to the mesh's server
//! unchanged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mesh_control::ca::DevCa;
use mesh_core::config::{
    Permission, Principal, RbacAction, RbacConfig, RbacPolicy, RbacRules, StringMatcher,
};
use mesh_core::identity::{client_config, IdentityStore};
use mesh_tower::authz::AuthzLayer;
use mesh_tower::axum::{Peer, PeerIdentity};
use mesh_tower::metrics::Metrics;
use mesh_tower::server::InboundLayer;
use mesh_tower::tls::{MeshAcceptor, MeshConnector, TlsMode};

fn identity(ca: &DevCa, sa: &str) -> IdentityStore {
    IdentityStore::new(
        ca.workload_identity("prod", sa, Duration::from_secs(3600))
            .unwrap(),
    )
}

async fn hello(Peer(id): Peer, ConnectInfo(addr): ConnectInfo<SocketAddr>) -> String {
    format!("hello {id} from {}", addr.ip())
}

async fn whoami(PeerIdentity(id): PeerIdentity) -> String {
    id.map_or_else(|| "anonymous".into(), |id| id.to_string())
}

async fn fails() -> Result<String, axum::http::StatusCode> {
    Err(axum::http::StatusCode::SERVICE_UNAVAILABLE)
}

/// Only `frontend` may call `/admin`.
fn rbac() -> AuthzLayer {
    AuthzLayer::new(vec![RbacConfig {
        rules: Some(RbacRules {
            action: RbacAction::Deny,
            policies: vec![RbacPolicy {
                name: "admin-only-frontend".into(),
                permissions: vec![Permission::Path(StringMatcher::prefix("/admin"))],
                principals: vec![Principal::Not(Box::new(Principal::Authenticated(Some(
                    StringMatcher::exact("spiffe://cluster.local/ns/prod/sa/frontend"),
                ))))],
            }],
        }),
        shadow_rules: None,
    }])
}

async fn serve(mode: TlsMode, server: &IdentityStore, metrics: Metrics) -> SocketAddr {
    // The mesh's inbound stack as an ordinary axum layer.
    let app: Router = Router::new()
        .route("/hello", get(hello))
        .route("/whoami", get(whoami))
        .route("/admin", get(|| async { "admin" }))
        .route("/fails", get(fails))
        .layer(InboundLayer::new("greeter").metrics(metrics).authz(rbac()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = MeshAcceptor::new(mode, Some(server)).unwrap();
    tokio::spawn(mesh_tower::server::serve(
        listener,
        acceptor,
        app,
        std::future::pending(),
    ));
    addr
}

async fn call(addr: SocketAddr, tls: Option<&IdentityStore>, path: &str) -> (u16, String) {
    let config = tls.map(|id| {
        Arc::new(client_config(id, vec![], vec![b"h2".to_vec(), b"http/1.1".to_vec()]).unwrap())
    });
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .build(MeshConnector::new(config, Duration::from_secs(2), None));
    let resp = client
        .request(
            http::Request::get(format!("http://{addr}{path}"))
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn router_layer_inbound_over_mtls_with_extractors() {
    let ca = DevCa::new("cluster.local").unwrap();
    let server = identity(&ca, "greeter");
    let frontend = identity(&ca, "frontend");
    let other = identity(&ca, "other");
    let metrics = Metrics::default();
    let addr = serve(TlsMode::Permissive, &server, metrics.clone()).await;

    // The identity and axum's ConnectInfo, from the mesh's server.
    assert_eq!(
        call(addr, Some(&frontend), "/hello").await,
        (
            200,
            "hello spiffe://cluster.local/ns/prod/sa/frontend from 127.0.0.1".into()
        )
    );
    assert_eq!(
        call(addr, Some(&other), "/whoami").await,
        (200, "spiffe://cluster.local/ns/prod/sa/other".into())
    );
    // Plaintext (PERMISSIVE): `PeerIdentity` is None; `Peer` refuses with 401.
    assert_eq!(call(addr, None, "/whoami").await, (200, "anonymous".into()));
    assert_eq!(call(addr, None, "/hello").await.0, 401);
    // RBAC refusals are answered as responses through axum.
    assert_eq!(
        call(addr, Some(&frontend), "/admin").await,
        (200, "admin".into())
    );
    assert_eq!(call(addr, Some(&other), "/admin").await.0, 403);
    assert_eq!(call(addr, Some(&frontend), "/fails").await.0, 503);
    assert_eq!(call(addr, Some(&frontend), "/nothing").await.0, 404);

    // The inbound metrics saw every request, by peer.
    let text = metrics.render();
    let line = |peer: &str, outcome: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("mesh_requests_total{")
                    && l.contains(&format!("peer=\"{peer}\""))
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let frontend_id = "spiffe://cluster.local/ns/prod/sa/frontend";
    assert_eq!(line(frontend_id, "2xx"), 2.0, "{text}");
    assert_eq!(line(frontend_id, "5xx"), 1.0, "{text}");
    assert_eq!(
        line("spiffe://cluster.local/ns/prod/sa/other", "4xx"),
        1.0,
        "{text}"
    );
}

/// An axum `Router` goes to the mesh's server unchanged, as its application: the mesh wraps
/// it in the inbound stack (STRICT mTLS here).
#[tokio::test]
async fn a_router_served_by_the_mesh_server_as_is() {
    let ca = DevCa::new("cluster.local").unwrap();
    let server = identity(&ca, "greeter");
    let frontend = identity(&ca, "frontend");
    let router: Router = Router::new().route("/hello", get(hello));
    let app = tower::Layer::layer(&InboundLayer::new("greeter"), router);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(mesh_tower::server::serve(
        listener,
        MeshAcceptor::new(TlsMode::Strict, Some(&server)).unwrap(),
        app,
        std::future::pending(),
    ));
    assert_eq!(
        call(addr, Some(&frontend), "/hello").await,
        (
            200,
            "hello spiffe://cluster.local/ns/prod/sa/frontend from 127.0.0.1".into()
        )
    );
}
