//! The inbound side on real sockets: STRICT, PERMISSIVE and DISABLE ports, the peer identity
//! in requests, authorization, and OpenSSL (a TLS peer this project did not write) as client.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mesh_control::ca::DevCa;
use mesh_core::config::{
    Permission, Principal, RbacAction, RbacConfig, RbacPolicy, RbacRules, StringMatcher,
};
use mesh_core::identity::{client_config, Identity, IdentityStore};
use mesh_tower::authz::AuthzLayer;
use mesh_tower::tls::{MeshAcceptor, MeshConnector, PeerIdentity, TlsMode};
use tower::Layer;

fn identity(ca: &DevCa, ns: &str, sa: &str) -> IdentityStore {
    IdentityStore::new(
        ca.workload_identity(ns, sa, Duration::from_secs(3600))
            .unwrap(),
    )
}

/// Serves an app that answers with the peer identity it saw.
async fn start(
    mode: TlsMode,
    id: Option<&IdentityStore>,
    authz: Option<AuthzLayer>,
) -> std::net::SocketAddr {
    start_measured(mode, id, authz, mesh_tower::metrics::Metrics::default()).await
}

async fn start_measured(
    mode: TlsMode,
    id: Option<&IdentityStore>,
    authz: Option<AuthzLayer>,
    metrics: mesh_tower::metrics::Metrics,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = MeshAcceptor::new(mode, id)
        .unwrap()
        .handshake_timeout(Duration::from_secs(2))
        .with_metrics(metrics.clone());
    let app = tower::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
        let peer = req
            .extensions()
            .get::<PeerIdentity>()
            .and_then(|p| p.0.clone());
        let text = peer.map_or_else(|| "anonymous".to_string(), |p| p.to_string());
        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(text))))
    });
    let svc = mesh_tower::server::InboundLayer::new("backend")
        .metrics(metrics)
        .authz(authz.unwrap_or_else(|| AuthzLayer::new(Vec::new())))
        .layer(app);
    tokio::spawn(mesh_tower::server::serve(
        listener,
        acceptor,
        svc,
        std::future::pending(),
    ));
    addr
}

async fn get(
    addr: std::net::SocketAddr,
    tls: Option<&IdentityStore>,
    path: &str,
) -> Result<(u16, String), String> {
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
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

const FRONTEND: &str = "spiffe://cluster.local/ns/prod/sa/frontend";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_serves_plaintext_and_mtls_on_one_port() {
    let ca = DevCa::new("cluster.local").unwrap();
    let server = identity(&ca, "prod", "backend");
    let addr = start(TlsMode::Permissive, Some(&server), None).await;
    assert_eq!(
        get(addr, None, "/").await.unwrap(),
        (200, "anonymous".into()),
        "plaintext: no identity"
    );
    let client = identity(&ca, "prod", "frontend");
    assert_eq!(
        get(addr, Some(&client), "/").await.unwrap(),
        (200, FRONTEND.into()),
        "mTLS: the client's SPIFFE ID"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_refuses_plaintext_and_foreign_clients() {
    let ca = DevCa::new("cluster.local").unwrap();
    let server = identity(&ca, "prod", "backend");
    let metrics = mesh_tower::metrics::Metrics::default();
    let addr = start_measured(TlsMode::Strict, Some(&server), None, metrics.clone()).await;
    assert!(
        get(addr, None, "/").await.is_err(),
        "plaintext client refused"
    );
    let other_ca = DevCa::new("cluster.local").unwrap();
    // Trusts the server's CA, but its certificate comes from another one.
    let svid = other_ca
        .issue("prod", "frontend", Duration::from_secs(60))
        .unwrap();
    let foreign = IdentityStore::new(
        Identity::from_pem(
            svid.cert_pem.as_bytes(),
            svid.key_pem.as_bytes(),
            ca.root_pem().as_bytes(),
        )
        .unwrap(),
    );
    assert!(
        get(addr, Some(&foreign), "/").await.is_err(),
        "client from another CA refused"
    );
    let client = identity(&ca, "prod", "frontend");
    assert_eq!(
        get(addr, Some(&client), "/").await.unwrap(),
        (200, FRONTEND.into())
    );
    assert_eq!(
        metrics
            .counters()
            .tls_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        2,
        "the plaintext client and the foreign one, not the good one"
    );
    assert!(metrics
        .render()
        .contains("mesh_tls_handshake_failures_total 2"));
    // The inbound stack labels the served request with the authenticated peer.
    let served = metrics.all(mesh_tower::metrics::Direction::Inbound);
    assert_eq!(served.len(), 1, "{served:?}");
    assert_eq!(served[0].cluster, "backend");
    assert_eq!(served[0].peer, FRONTEND);
    assert_eq!(served[0].series.total(), 1);
    // DISABLE: plaintext only.
    let plain = start(TlsMode::Disable, None, None).await;
    assert_eq!(
        get(plain, None, "/").await.unwrap(),
        (200, "anonymous".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_over_mtls() {
    let ca = DevCa::new("cluster.local").unwrap();
    let server = identity(&ca, "prod", "backend");
    let deny_legacy = RbacConfig {
        rules: Some(RbacRules {
            action: RbacAction::Deny,
            policies: vec![RbacPolicy {
                name: "legacy".into(),
                permissions: vec![Permission::Any],
                principals: vec![Principal::Authenticated(Some(StringMatcher::prefix(
                    "spiffe://cluster.local/ns/legacy/",
                )))],
            }],
        }),
        shadow_rules: None,
    };
    let allow_api = RbacConfig {
        rules: Some(RbacRules {
            action: RbacAction::Allow,
            policies: vec![RbacPolicy {
                name: "api".into(),
                permissions: vec![Permission::Path(StringMatcher::prefix("/api/"))],
                principals: vec![Principal::Authenticated(None)],
            }],
        }),
        shadow_rules: None,
    };
    let layer = AuthzLayer::new(vec![allow_api, deny_legacy]);
    let addr = start(TlsMode::Strict, Some(&server), Some(layer.clone())).await;
    let frontend = identity(&ca, "prod", "frontend");
    let legacy = identity(&ca, "legacy", "old");
    assert_eq!(get(addr, Some(&frontend), "/api/x").await.unwrap().0, 200);
    assert_eq!(get(addr, Some(&frontend), "/admin").await.unwrap().0, 403);
    assert_eq!(
        get(addr, Some(&legacy), "/api/x").await.unwrap().0,
        403,
        "DENY by principal wins"
    );
    assert_eq!(layer.denied(), 2);
}

/// OpenSSL's `s_client` with a client certificate against a STRICT port: it verifies our chain
/// and we verify its certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_interop() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        panic!("openssl is required for this interop test (apt-get install openssl)");
    }
    let ca = DevCa::new("cluster.local").unwrap();
    let server = identity(&ca, "prod", "backend");
    let metrics = mesh_tower::metrics::Metrics::default();
    let addr = start_measured(TlsMode::Strict, Some(&server), None, metrics.clone()).await;
    let dir = std::env::temp_dir().join(format!("mesh-openssl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svid = ca
        .issue("prod", "openssl", Duration::from_secs(600))
        .unwrap();
    std::fs::write(dir.join("root.pem"), ca.root_pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), &svid.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &svid.key_pem).unwrap();
    let run = |with_cert: bool| {
        let dir = dir.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                use std::io::Write;
                let mut cmd = std::process::Command::new("openssl");
                cmd.args([
                    "s_client",
                    "-connect",
                    &addr.to_string(),
                    "-quiet",
                    "-verify_return_error",
                    "-CAfile",
                ])
                .arg(dir.join("root.pem"));
                if with_cert {
                    cmd.arg("-cert")
                        .arg(dir.join("cert.pem"))
                        .arg("-key")
                        .arg(dir.join("key.pem"));
                }
                let mut child = cmd
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(b"GET / HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let out = child.wait_with_output().unwrap();
                (
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                )
            })
            .await
            .unwrap()
        }
    };
    let (stdout, stderr) = run(true).await;
    assert!(
        stdout.contains("HTTP/1.1 200"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stdout.contains("spiffe://cluster.local/ns/prod/sa/openssl"),
        "{stdout}"
    );
    let (stdout, _) = run(false).await;
    assert!(
        !stdout.contains("HTTP/1.1 200"),
        "STRICT refuses OpenSSL without a certificate: {stdout}"
    );
}

#[test]
fn tls_mode_from_generated_server_listeners() {
    use mesh_control::istio::{self, Options};
    use mesh_core::config::ListenerKind;
    let seed = include_str!("../../examples/mesh.yaml");
    let strict = format!(
        "{seed}---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: istio-system}}\nspec: {{mtls: {{mode: STRICT}}}}\n"
    );
    let disable = seed.replace("    tls:\n      mode: DISABLE\n", "")
        + "---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: DISABLE}}\n";
    for (yaml, want) in [
        (seed.to_string(), TlsMode::Permissive),
        (strict, TlsMode::Strict),
        (disable, TlsMode::Disable),
    ] {
        let out =
            istio::generate(&istio::parse(&yaml, "m.yaml").unwrap(), &Options::default()).unwrap();
        let snap = mesh_core::xds::file::snapshot_from_resources(&out.resources).unwrap();
        let l = snap
            .listener("xds.istio.io/grpc/lds/inbound/0.0.0.0:9081")
            .unwrap();
        let ListenerKind::Server(s) = &l.kind else {
            panic!()
        };
        assert_eq!(TlsMode::from_listener(s), want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_load_loses_nothing() {
    use mesh_core::identity::{FileWatcher, FileWatcherConfig};
    use tower::Service;
    let ca = DevCa::new("cluster.local").unwrap();
    let dir = std::env::temp_dir().join(format!("mesh-rotation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |svid: mesh_control::ca::Svid| {
        // Key first, then certificate: the watcher retries until the pair matches.
        std::fs::write(dir.join("key.pem"), svid.key_pem).unwrap();
        std::fs::write(dir.join("cert.pem"), svid.cert_pem).unwrap();
    };
    write(
        ca.issue("prod", "backend", Duration::from_secs(600))
            .unwrap(),
    );
    std::fs::write(dir.join("root.pem"), ca.root_pem()).unwrap();
    let server = FileWatcher::start(
        FileWatcherConfig::from_json(&serde_json::json!({
            "certificate_file": dir.join("cert.pem"),
            "private_key_file": dir.join("key.pem"),
            "ca_certificate_file": dir.join("root.pem"),
            "refresh_interval": "0.05s",
        }))
        .unwrap(),
    )
    .unwrap();
    let before = server.load().chain[0].clone();
    let addr = start(TlsMode::Strict, Some(&server), None).await;
    let client = identity(&ca, "prod", "frontend");
    let config = Arc::new(client_config(&client, vec![], vec![b"h2".to_vec()]).unwrap());
    let http: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(
        MeshConnector::new(Some(config.clone()), Duration::from_secs(2), None),
    );
    let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (http, failures, sent) = (http.clone(), failures.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..250 {
                let r = http
                    .request(
                        http::Request::get(format!("http://{addr}/"))
                            .body(Empty::new())
                            .unwrap(),
                    )
                    .await;
                sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match r {
                    Ok(resp) if resp.status() == 200 => {
                        let _ = resp.into_body().collect().await;
                    }
                    _ => {
                        failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // Rotate while the load runs.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sent.load(std::sync::atomic::Ordering::Relaxed) < 200 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    let mut rotated = server.subscribe();
    write(
        ca.issue("prod", "backend", Duration::from_secs(600))
            .unwrap(),
    );
    tokio::time::timeout(Duration::from_secs(10), rotated.changed())
        .await
        .expect("rotation noticed")
        .unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let after = server.load().chain[0].clone();
    assert_ne!(after, before);
    println!(
        "rotation under load: {} requests, {} failed",
        sent.load(std::sync::atomic::Ordering::Relaxed),
        failures.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert_eq!(failures.load(std::sync::atomic::Ordering::Relaxed), 0);
    // A new connection presents the new certificate (a fresh client config: a resumed TLS
    // session would report the certificate of the session it resumes).
    let fresh = Arc::new(client_config(&client, vec![], vec![b"h2".to_vec()]).unwrap());
    let mut connector = MeshConnector::new(Some(fresh), Duration::from_secs(2), None);
    let stream = connector
        .call(format!("http://{addr}").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(stream.peer_certificates().unwrap()[0], after);
}

/// Certificates over SDS from the development CA, renewed by a push while requests flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sds_rotation_under_load_loses_nothing() {
    use mesh_control::ads::sds::SdsIssuer;
    use mesh_control::ads::{AdsServer, ResourceCache};
    use mesh_core::identity::SdsProvider;
    use mesh_core::xds::Bootstrap;
    let ca = DevCa::new("cluster.local").unwrap();
    let trust = ca.root_pem().to_owned();
    let issuer = SdsIssuer::new(ca, Duration::from_secs(2));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let xds = listener.local_addr().unwrap();
    tokio::spawn(
        AdsServer::new(ResourceCache::new())
            .with_sds(issuer)
            .serve(listener, std::future::pending()),
    );
    let bootstrap = Bootstrap::from_json(
        &format!(
            r#"{{"xds_servers": [{{"server_uri": "{xds}", "channel_creds": [{{"type": "insecure"}}]}}],
                "node": {{"id": "sidecar~127.0.0.1~backend-1.prod~prod.svc.cluster.local",
                          "metadata": {{"SERVICE_ACCOUNT": "backend"}}}}}}"#
        ),
        "test",
    )
    .unwrap();
    // The secret names as a TLS context carries them (Istio's `default` and `ROOTCA`).
    use mesh_core::config::CertSource;
    let server = SdsProvider::start_for(
        &bootstrap,
        Some(&CertSource::Sds {
            name: "default".into(),
        }),
        Some(&CertSource::Sds {
            name: "ROOTCA".into(),
        }),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(
        server.load().spiffe_id.as_str(),
        "spiffe://cluster.local/ns/prod/sa/backend"
    );
    let first = server.load().chain[0].clone();
    let addr = start(TlsMode::Strict, Some(&server), None).await;
    // The client trusts the same CA (its own certificate from a file, as a peer would have).
    let svid = {
        // A client identity signed by the SDS CA: ask the same server for it.
        let b = Bootstrap::from_json(
            &format!(
                r#"{{"xds_servers": [{{"server_uri": "{xds}", "channel_creds": [{{"type": "insecure"}}]}}],
                    "node": {{"id": "sidecar~127.0.0.1~frontend-1.prod~prod.svc.cluster.local",
                              "metadata": {{"SERVICE_ACCOUNT": "frontend"}}}}}}"#
            ),
            "test",
        )
        .unwrap();
        SdsProvider::start(&b, "default", "ROOTCA", Duration::from_secs(10))
            .await
            .unwrap()
    };
    assert_eq!(
        rustls_pki_types_der(&trust),
        svid.load().roots[0].as_ref().to_vec(),
        "the bundle over SDS is the CA's root"
    );
    let config = Arc::new(client_config(&svid, vec![], vec![b"h2".to_vec()]).unwrap());
    let http: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(
        MeshConnector::new(Some(config), Duration::from_secs(2), None),
    );
    let rotated = server.subscribe();
    let mut failures = 0;
    let mut sent = 0;
    // Keep requests flowing until the server's certificate has been renewed over SDS.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = http
            .request(
                http::Request::get(format!("http://{addr}/"))
                    .body(Empty::new())
                    .unwrap(),
            )
            .await;
        sent += 1;
        match r {
            Ok(resp) if resp.status() == 200 => {
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body, "spiffe://cluster.local/ns/prod/sa/frontend");
            }
            _ => failures += 1,
        }
        if rotated.has_changed().unwrap() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no renewal pushed");
    }
    for _ in 0..200 {
        let r = http
            .request(
                http::Request::get(format!("http://{addr}/"))
                    .body(Empty::new())
                    .unwrap(),
            )
            .await;
        sent += 1;
        if !matches!(r, Ok(ref resp) if resp.status() == 200) {
            failures += 1;
        }
    }
    println!("SDS rotation under load: {sent} requests, {failures} failed");
    assert_eq!(failures, 0);
    assert_ne!(
        server.load().chain[0],
        first,
        "the renewed certificate is in use"
    );
}

fn rustls_pki_types_der(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drains_in_flight_requests() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let app = tower::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
        let started = started_tx.clone();
        let mut release = release_rx.clone();
        async move {
            let _ = started.send(());
            let _ = release.wait_for(|r| *r).await;
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                b"finished",
            ))))
        }
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(mesh_tower::server::serve(
        listener,
        MeshAcceptor::new(TlsMode::Disable, None).unwrap(),
        app,
        async {
            let _ = stop_rx.await;
        },
    ));
    let in_flight = tokio::spawn(get(addr, None, "/slow"));
    started_rx.recv().await.unwrap();
    // Shut down while the request is in flight: the server stops accepting...
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the listener closes");
    assert!(!server.is_finished(), "it waits for the open request");
    // ...and the request still completes.
    release_tx.send(true).unwrap();
    assert_eq!(in_flight.await.unwrap().unwrap(), (200, "finished".into()));
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("drained")
        .unwrap();
}

/// A server listener (as xDS YAML) whose RBAC denies `/admin` and whose connection manager
/// normalizes paths: encoded, doubled, dotted and escaped-slash variants of `/admin` cannot
/// slip past the DENY rule, and the application sees the normalized path. The same listener
/// without normalization lets `/public/../admin` through, which is what the options are for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normalized_paths_cannot_slip_past_a_deny_rule() {
    use envoy_types::pb::envoy::config::listener::v3::Listener as PbListener;
    let yaml = |options: &str| {
        format!(
            r#"
name: inbound|8080
address: {{socket_address: {{address: 0.0.0.0, port_value: 8080}}}}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: inbound
{options}
      route_config:
        name: inbound
        virtual_hosts:
        - {{name: inbound, domains: ["*"], routes: [{{match: {{prefix: /}}, non_forwarding_action: {{}}}}]}}
      http_filters:
      - name: envoy.filters.http.rbac
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
          rules:
            action: DENY
            policies:
              admin:
                permissions: [{{url_path: {{path: {{prefix: /admin}}}}}}]
                principals: [{{any: true}}]
      - name: envoy.filters.http.router
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
        )
    };
    let start_from = |text: String| async move {
        let pb: PbListener = mesh_core::xds::file::from_yaml(&text, "inbound.yaml").unwrap();
        let listener = mesh_core::config::Listener::try_from(&pb).unwrap();
        let policy = mesh_tower::server::listener_policy(&listener).unwrap();
        assert_eq!(policy.tls_mode, TlsMode::Disable);
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let app = tower::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
            let seen = req.uri().path_and_query().unwrap().as_str().to_owned();
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(seen))))
        });
        let svc = mesh_tower::server::InboundLayer::new("backend")
            .authz({
                let authz = AuthzLayer::named(policy.rbac).with_request_policy(policy.request);
                match policy.routes {
                    Some(rc) => authz.with_routes(rc),
                    None => authz,
                }
            })
            .layer(app);
        let acceptor = MeshAcceptor::new(TlsMode::Disable, None).unwrap();
        tokio::spawn(mesh_tower::server::serve(
            tcp,
            acceptor,
            svc,
            std::future::pending(),
        ));
        addr
    };
    let normalized = start_from(yaml(
        "      normalize_path: true\n      merge_slashes: true\n      path_with_escaped_slashes_action: UNESCAPE_AND_FORWARD\n",
    ))
    .await;
    for path in [
        "/admin",
        "//admin",
        "/public/../admin",
        "/./admin/x",
        "/%61dmin",
        "/public/..%2Fadmin",
        "/public/%2e%2e/admin",
        "/public\\..\\admin",
    ] {
        assert_eq!(
            get(normalized, None, path).await.unwrap().0,
            403,
            "{path} must be denied"
        );
    }
    assert_eq!(
        get(normalized, None, "/api//v1/./items?q=%2F..")
            .await
            .unwrap(),
        (200, "/api/v1/items?q=%2F..".into()),
        "the application sees the normalized path, and the query untouched"
    );

    let plain = start_from(yaml("")).await;
    assert_eq!(get(plain, None, "/admin").await.unwrap().0, 403);
    assert_eq!(
        get(plain, None, "/public/../admin").await.unwrap(),
        (200, "/public/../admin".into()),
        "without normalize_path the dotted path is not /admin to RBAC"
    );

    let rejecting = start_from(yaml(
        "      path_with_escaped_slashes_action: REJECT_REQUEST\n      common_http_protocol_options: {headers_with_underscores_action: REJECT_REQUEST}\n",
    ))
    .await;
    assert_eq!(get(rejecting, None, "/a%2Fb").await.unwrap().0, 400);
    assert_eq!(get(rejecting, None, "/a/b").await.unwrap().0, 200);
    let redirecting = start_from(yaml(
        "      path_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT\n",
    ))
    .await;
    assert_eq!(get(redirecting, None, "/a%2Fb?x=1").await.unwrap().0, 307);
}

/// Per-route RBAC on a server listener, as Envoy applies it: a route's `RBACPerRoute`
/// replaces the listener filter's rules on that route, an `RBACPerRoute` without rules or the
/// filter disabled in a `FilterConfig` switches it off there, and other routes keep the
/// listener's rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_route_rbac_overrides_the_listener_rules() {
    use envoy_types::pb::envoy::config::listener::v3::Listener as PbListener;
    let yaml = r#"
name: inbound|8080
address: {socket_address: {address: 0.0.0.0, port_value: 8080}}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: inbound
      route_config:
        name: inbound
        virtual_hosts:
        - name: inbound
          domains: ["*"]
          routes:
          - match: {prefix: /public/secret}
            non_forwarding_action: {}
            typed_per_filter_config:
              rbac:
                "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute
                rbac:
                  rules:
                    action: DENY
                    policies: {all: {permissions: [{any: true}], principals: [{any: true}]}}
          - match: {prefix: /open/}
            non_forwarding_action: {}
            typed_per_filter_config:
              rbac: {"@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute}
          - match: {prefix: /off/}
            non_forwarding_action: {}
            typed_per_filter_config:
              rbac: {"@type": type.googleapis.com/envoy.config.route.v3.FilterConfig, disabled: true}
          - match: {prefix: /}
            non_forwarding_action: {}
      http_filters:
      - name: rbac
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
          rules:
            action: ALLOW
            policies:
              public: {permissions: [{url_path: {path: {prefix: /public/}}}], principals: [{any: true}]}
      - name: envoy.filters.http.router
        typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
"#;
    let pb: PbListener = mesh_core::xds::file::from_yaml(yaml, "inbound.yaml").unwrap();
    let listener = mesh_core::config::Listener::try_from(&pb).unwrap();
    let policy = mesh_tower::server::server_policy(&listener, &Default::default())
        .unwrap()
        .unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let app = tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async move {
        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("app"))))
    });
    let authz = AuthzLayer::named(policy.rbac)
        .with_request_policy(policy.request)
        .with_routes(policy.routes.unwrap());
    let svc = mesh_tower::server::InboundLayer::new("backend")
        .authz(authz.clone())
        .layer(app);
    tokio::spawn(mesh_tower::server::serve(
        tcp,
        MeshAcceptor::new(TlsMode::Disable, None).unwrap(),
        svc,
        std::future::pending(),
    ));
    for (path, want) in [
        ("/public/page", 200),
        ("/public/secret/x", 403),
        ("/open/anything", 200),
        ("/off/anything", 200),
        ("/elsewhere", 403),
    ] {
        assert_eq!(get(addr, None, path).await.unwrap().0, want, "{path}");
    }
    assert_eq!(authz.denied(), 2);
}
