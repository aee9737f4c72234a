//! mTLS end to end: Istio YAML (DestinationRule ISTIO_MUTUAL) → meshctl's generator → xDS →
//! mesh-core → `MeshClient` with a SPIFFE identity → a real TLS backend that requires client
//! certificates. Certificates come from the development CA.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_control::ads::ResourceCache;
use mesh_control::ca::DevCa;
use mesh_control::istio::{self, Options};
use mesh_core::identity::{peer_spiffe_id, server_config, IdentityStore};
use mesh_core::xds::{Bootstrap, XdsClient};
use mesh_tower::{MeshClient, MeshError};
use tower::ServiceExt;

const HOST: &str = "backend.prod.svc.cluster.local";

fn identity(ca: &DevCa, sa: &str) -> IdentityStore {
    IdentityStore::new(
        ca.workload_identity("prod", sa, Duration::from_secs(3600))
            .unwrap(),
    )
}

/// A TLS backend (HTTP/1.1 and HTTP/2 by ALPN) that requires a client certificate and
/// answers with the client's SPIFFE ID and the HTTP version.
async fn tls_backend(id: IdentityStore) -> u16 {
    tls_backend_slow_handshake(id, Duration::ZERO).await
}

/// As [`tls_backend`], waiting `delay` after accepting TCP before the TLS handshake.
async fn tls_backend_slow_handshake(id: IdentityStore, delay: Duration) -> u16 {
    let config = server_config(&id, true, vec![b"h2".to_vec(), b"http/1.1".to_vec()]).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let peer = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| peer_spiffe_id(&c[0]))
                    .map(|i| i.to_string())
                    .unwrap_or_default();
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let body = format!("{peer} {:?}", req.version());
                    async move { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    port
}

fn yaml(port: u16, sa: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: backend, namespace: prod}}
spec:
  hosts: [{HOST}]
  ports: [{{number: 80, name: http2, protocol: HTTP2}}]
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    ports: {{http2: {port}}}
    serviceAccount: {sa}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: backend, namespace: prod}}
spec:
  host: {HOST}
  trafficPolicy:
    tls: {{mode: ISTIO_MUTUAL}}
"#
    )
}

async fn serve(yaml: &str) -> std::net::SocketAddr {
    let config = istio::parse(yaml, "mtls.yaml").unwrap();
    let cache = ResourceCache::new();
    cache.set_resources(
        istio::generate(&config, &Options::default())
            .unwrap()
            .resources,
    );
    let addr = support::ads_server(&cache).await;
    addr
}

async fn get(client: &MeshClient) -> Result<String, mesh_tower::BoxError> {
    let req = http::Request::get(format!("http://{HOST}/"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = client.clone().oneshot(req).await?;
    Ok(String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned())
}

async fn client(addr: std::net::SocketAddr, id: Option<IdentityStore>) -> (MeshClient, XdsClient) {
    let xds = XdsClient::builder(Bootstrap::new(addr.to_string(), "frontend"))
        .build()
        .unwrap();
    let target = format!("xds:///{HOST}:80");
    xds.listener(&target, Duration::from_secs(15))
        .await
        .unwrap();
    xds.store()
        .wait_for(Duration::from_secs(15), |s| {
            s.endpoints_for_cluster(&format!("outbound|80||{HOST}"))
                .is_some()
        })
        .await
        .unwrap();
    let mut b = MeshClient::builder(xds.store().clone(), &target).unwrap();
    if let Some(id) = id {
        b = b.identity(id);
    }
    (b.build(), xds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_with_spiffe_identities_from_istio_config() {
    let ca = DevCa::new("cluster.local").unwrap();
    let port = tls_backend(identity(&ca, "backend")).await;
    let addr = serve(&yaml(port, "backend")).await;
    let (mesh, _xds) = client(addr, Some(identity(&ca, "frontend"))).await;
    for _ in 0..20 {
        let body = get(&mesh).await.unwrap();
        assert_eq!(
            body, "spiffe://cluster.local/ns/prod/sa/frontend HTTP/2.0",
            "the backend saw our identity, over h2 by ALPN"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_server_identity_is_refused_with_both_ids() {
    let ca = DevCa::new("cluster.local").unwrap();
    // The backend runs as "impostor" while the registry says the endpoint is "backend".
    let port = tls_backend(identity(&ca, "impostor")).await;
    let addr = serve(&yaml(port, "backend")).await;
    let (mesh, _xds) = client(addr, Some(identity(&ca, "frontend"))).await;
    let err = get(&mesh).await.unwrap_err();
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&*err);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    assert!(
        text.contains("server presented spiffe://cluster.local/ns/prod/sa/impostor, expected Exact(\"spiffe://cluster.local/ns/prod/sa/backend\")"),
        "{text}"
    );
    let failures = mesh
        .metrics()
        .counters()
        .tls_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(failures >= 1, "handshake failures are counted: {failures}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_identity_no_plaintext_fallback() {
    let ca = DevCa::new("cluster.local").unwrap();
    let port = tls_backend(identity(&ca, "backend")).await;
    let addr = serve(&yaml(port, "backend")).await;
    let (mesh, _xds) = client(addr, None).await;
    let err = get(&mesh).await.unwrap_err();
    let err = err.downcast::<MeshError>().unwrap();
    assert!(matches!(*err, MeshError::Tls { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("requires mTLS but the client has no workload identity"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_pending_requests_bounds_requests_waiting_for_a_connection() {
    let ca = DevCa::new("cluster.local").unwrap();
    // Handshakes take 300 ms: requests wait for their connections that long.
    let port =
        tls_backend_slow_handshake(identity(&ca, "backend"), Duration::from_millis(300)).await;
    // HTTP/1.1: each waiting request sets up its own connection (HTTP/2 requests share one).
    let yaml = yaml(port, "backend").replace("protocol: HTTP2", "protocol: HTTP").replace(
        "    tls: {mode: ISTIO_MUTUAL}\n",
        "    tls: {mode: ISTIO_MUTUAL}\n    connectionPool: {http: {http1MaxPendingRequests: 1}}\n",
    );
    let addr = serve(&yaml).await;
    let (mesh, _xds) = client(addr, Some(identity(&ca, "frontend"))).await;
    let results = futures::future::join_all((0..5).map(|_| get(&mesh))).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let pending_refused = results
        .iter()
        .filter(|r| match r {
            Err(e) => matches!(
                e.downcast_ref::<MeshError>(),
                Some(MeshError::Overloaded {
                    limit: "max_pending_requests",
                    max: 1,
                    ..
                })
            ),
            _ => false,
        })
        .count();
    println!("max_pending_requests=1, 5 requests during a slow handshake: {ok} served, {pending_refused} failed fast");
    assert_eq!((ok, pending_refused), (1, 4), "{results:?}");
}
