//! The outbound path end to end: real hyper backends on 127.0.0.1, configuration pushed by a
//! real xDS server over a real gRPC stream into mesh-core's client, requests through
//! `MeshClient`.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use envoy_types::pb::envoy::config::cluster::v3 as cpb;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as uhttp;
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_control::ads::ResourceCache;
use mesh_core::config::{ClusterSpecifier, RouteAction, Snapshot};
use mesh_core::xds::{Bootstrap, XdsClient};
use mesh_core::ConfigStore;
use mesh_tower::{MeshClient, MeshError};
use tower::{Service, ServiceExt};

const PATIENCE: Duration = Duration::from_secs(15);

/// An EDS cluster with optional `max_requests` and HTTP/2.
fn cluster(name: &str, max_requests: Option<u32>, http2: bool) -> Any {
    let mut c = cpb::Cluster::decode_from(support::xds::cluster(name, name));
    if let Some(max) = max_requests {
        c.circuit_breakers = Some(cpb::CircuitBreakers {
            thresholds: vec![cpb::circuit_breakers::Thresholds {
                max_requests: Some(UInt32Value { value: max }),
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    if http2 {
        let opts = uhttp::HttpProtocolOptions {
            upstream_protocol_options: Some(uhttp::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                uhttp::http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(uhttp::http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                        core::Http2ProtocolOptions::default(),
                    )),
                },
            )),
            ..Default::default()
        };
        c.typed_extension_protocol_options.insert(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
            support::xds::any(&opts),
        );
    }
    support::xds::any(&c)
}

trait DecodeFrom: Sized {
    fn decode_from(any: Any) -> Self;
}

impl DecodeFrom for cpb::Cluster {
    fn decode_from(any: Any) -> Self {
        use prost::Message;
        cpb::Cluster::decode(any.value.as_slice()).unwrap()
    }
}

struct Mesh {
    cache: ResourceCache,
    store: ConfigStore,
    client: MeshClient,
    _xds: XdsClient,
}

async fn mesh(resources: Vec<Any>, ready: impl FnMut(&Snapshot) -> bool) -> Mesh {
    let cache = ResourceCache::new();
    cache.set_resources(resources);
    let addr = support::ads_server(&cache).await;
    let xds = XdsClient::builder(Bootstrap::new(addr.to_string(), "outbound"))
        .build()
        .unwrap();
    xds.listener("xds:///svc", PATIENCE).await.unwrap();
    let store = xds.store().clone();
    store
        .wait_for(PATIENCE, ready)
        .await
        .expect("configuration arrives");
    let client = MeshClient::builder(store.clone(), "xds:///svc")
        .unwrap()
        .build();
    Mesh {
        cache,
        store,
        client,
        _xds: xds,
    }
}

fn world(split: &[(&str, u32)], clusters: Vec<Any>, endpoints: &[(&str, u16)]) -> Vec<Any> {
    let mut v = vec![
        support::xds::listener("svc", "svc-routes"),
        support::xds::routes("svc-routes", split),
    ];
    v.extend(clusters);
    v.extend(
        endpoints
            .iter()
            .map(|(n, p)| support::xds::endpoints(n, *p)),
    );
    v
}

async fn send(client: &MeshClient) -> Result<(u16, String), mesh_tower::BoxError> {
    let req = http::Request::get("http://svc/hello")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = client.clone().oneshot(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Sends `n` requests, `concurrency` at a time; returns the v2 count and the failures.
async fn load(client: &MeshClient, n: usize, concurrency: usize) -> (usize, Vec<String>) {
    use futures::StreamExt;
    let results: Vec<_> = futures::stream::iter(0..n)
        .map(|_| send(client))
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut v2 = 0;
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok((200, b)) if b == "v2" => v2 += 1,
            Ok((200, _)) => {}
            Ok((s, b)) => failures.push(format!("{s} {b}")),
            Err(e) => failures.push(e.to_string()),
        }
    }
    (v2, failures)
}

fn weights(s: &Snapshot) -> Vec<u32> {
    let Some(rc) = s.route_config("svc-routes") else {
        return vec![];
    };
    match &rc.virtual_hosts[0].routes[0].action {
        RouteAction::Forward(f) => match &f.cluster {
            ClusterSpecifier::Weighted(w) => w.clusters.iter().map(|c| c.weight).collect(),
            _ => vec![],
        },
        _ => vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_split_then_shift_under_load() {
    let v1 = support::backend("v1").await;
    let v2 = support::backend("v2").await;
    let eps = [("v1", v1.addr.port()), ("v2", v2.addr.port())];
    let clusters = || vec![cluster("v1", None, false), cluster("v2", None, false)];
    let m = mesh(world(&[("v1", 90), ("v2", 10)], clusters(), &eps), |s| {
        s.endpoints_for_cluster("v1").is_some() && s.endpoints_for_cluster("v2").is_some()
    })
    .await;

    // 90/10 over 5000 requests: v2 within 10% ± 2 points (4.7 standard deviations).
    let (n2, failures) = load(&m.client, 5000, 16).await;
    assert!(failures.is_empty(), "{failures:?}");
    let share = n2 as f64 / 5000.0;
    println!("v2 share at 90/10: {share:.4} over 5000 requests");
    assert!((share - 0.10).abs() <= 0.02, "{share}");

    // Shift to 50/50 while requests flow: not one may fail.
    let flowing = {
        let client = m.client.clone();
        tokio::spawn(async move { load(&client, 3000, 8).await })
    };
    // Push the update only once the load is flowing.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while v1.hits.load(Ordering::Relaxed) + v2.hits.load(Ordering::Relaxed) < 5100 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the load did not start"
        );
        tokio::task::yield_now().await;
    }
    m.cache
        .set_resources(world(&[("v1", 50), ("v2", 50)], clusters(), &eps));
    m.store
        .wait_for(PATIENCE, |s| weights(s) == vec![50, 50])
        .await
        .expect("50/50 arrives");
    let (_, failures) = flowing.await.unwrap();
    assert!(
        failures.is_empty(),
        "requests failed during the update: {failures:?}"
    );
    let (n2, failures) = load(&m.client, 2000, 16).await;
    assert!(failures.is_empty());
    let share = n2 as f64 / 2000.0;
    println!("v2 share at 50/50: {share:.4} over 2000 requests");
    assert!((share - 0.5).abs() <= 0.045, "{share}");
    assert_eq!(
        v1.hits.load(Ordering::Relaxed) + v2.hits.load(Ordering::Relaxed),
        10_000
    );
}

/// A backend that takes 100 ms per request and records the most requests it had at once.
async fn slow_backend() -> (std::net::SocketAddr, Arc<AtomicU32>, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let current = Arc::new(AtomicU32::new(0));
    let max = Arc::new(AtomicU32::new(0));
    let served = Arc::new(AtomicU64::new(0));
    let (m, s) = (max.clone(), served.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (current, max, served) = (current.clone(), m.clone(), s.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                    let (current, max, served) = (current.clone(), max.clone(), served.clone());
                    async move {
                        let now = current.fetch_add(1, Ordering::SeqCst) + 1;
                        max.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        current.fetch_sub(1, Ordering::SeqCst);
                        served.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                            b"v1",
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, max, served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_fails_fast_and_caps_concurrency() {
    let (addr, max_seen, served) = slow_backend().await;
    let m = mesh(
        world(
            &[("v1", 1)],
            vec![cluster("v1", Some(10), false)],
            &[("v1", addr.port())],
        ),
        |s| s.endpoints_for_cluster("v1").is_some(),
    )
    .await;
    let results = futures::future::join_all((0..50).map(|_| send(&m.client))).await;
    let ok = results.iter().filter(|r| matches!(r, Ok((200, _)))).count();
    let overloaded = results
        .iter()
        .filter(|r| match r {
            Err(e) => matches!(
                e.downcast_ref::<MeshError>(),
                Some(MeshError::Overloaded {
                    limit: "max_requests",
                    max: 10,
                    ..
                })
            ),
            _ => false,
        })
        .count();
    println!(
        "max_requests=10 at concurrency 50: {ok} served, {overloaded} failed fast, backend peak {}",
        max_seen.load(Ordering::SeqCst)
    );
    assert_eq!(
        ok + overloaded,
        50,
        "every request either served or refused with the typed error: {results:?}"
    );
    assert!(ok >= 10, "the first ten are served");
    assert!(
        max_seen.load(Ordering::SeqCst) <= 10,
        "the backend never sees more than 10 at once"
    );
    assert_eq!(served.load(Ordering::SeqCst), ok as u64);
    let rt = m.client.registry().get("v1").unwrap();
    assert_eq!(rt.overflows(), overloaded as u64);
    assert_eq!(rt.active_requests(), 0, "every permit released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_http1_upstreams() {
    // An h2c (prior knowledge) backend that says which protocol it saw.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h2_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(format!(
                        "{:?}",
                        req.version()
                    )))))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let h1 = support::backend("h1").await;
    let m = mesh(
        world(
            &[("h2", 50), ("h1", 50)],
            vec![cluster("h2", None, true), cluster("h1", None, false)],
            &[("h2", h2_addr.port()), ("h1", h1.addr.port())],
        ),
        |s| s.endpoints_for_cluster("h2").is_some() && s.endpoints_for_cluster("h1").is_some(),
    )
    .await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let (status, body) = send(&m.client).await.unwrap();
        assert_eq!(status, 200);
        seen.insert(body);
    }
    assert_eq!(
        seen,
        ["HTTP/2.0".to_string(), "h1".to_string()]
            .into_iter()
            .collect()
    );
}

#[tokio::test]
async fn unknown_cluster_and_missing_config_are_typed_errors() {
    let m = mesh(world(&[("nope", 1)], vec![], &[]), |s| {
        s.route_config("svc-routes").is_some()
    })
    .await;
    let err = send(&m.client).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "cluster \"nope\" is not in the configuration"
    );
    let mut other = MeshClient::builder(m.store.clone(), "xds:///elsewhere")
        .unwrap()
        .build();
    let req = http::Request::get("http://elsewhere/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let err = ServiceExt::<http::Request<Empty<Bytes>>>::ready(&mut other)
        .await
        .unwrap()
        .call(req)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "listener \"elsewhere\" has no route configuration yet"
    );
}

/// A route to one cluster with a retry policy.
fn retry_routes(retry_on: &str, num_retries: u32) -> Any {
    use envoy_types::pb::envoy::config::route::v3 as rpb;
    support::xds::any(&rpb::RouteConfiguration {
        name: "svc-routes".into(),
        virtual_hosts: vec![rpb::VirtualHost {
            name: "svc".into(),
            domains: vec!["*".into()],
            routes: vec![rpb::Route {
                r#match: Some(rpb::RouteMatch {
                    path_specifier: Some(rpb::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(rpb::route::Action::Route(rpb::RouteAction {
                    cluster_specifier: Some(rpb::route_action::ClusterSpecifier::Cluster(
                        "pool".into(),
                    )),
                    retry_policy: Some(rpb::RetryPolicy {
                        retry_on: retry_on.into(),
                        num_retries: Some(UInt32Value { value: num_retries }),
                        retry_host_predicate: vec![rpb::retry_policy::RetryHostPredicate {
                            name: "envoy.retry_host_predicates.previous_hosts".into(),
                            config_type: None,
                        }],
                        host_selection_retry_max_attempts: 5,
                        ..Default::default()
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    })
}

fn pool_endpoints(ports: &[u16]) -> Any {
    use envoy_types::pb::envoy::config::endpoint::v3 as epb;
    support::xds::any(&epb::ClusterLoadAssignment {
        cluster_name: "pool".into(),
        endpoints: vec![epb::LocalityLbEndpoints {
            lb_endpoints: ports
                .iter()
                .map(|p| epb::LbEndpoint {
                    host_identifier: Some(epb::lb_endpoint::HostIdentifier::Endpoint(
                        epb::Endpoint {
                            address: Some(core::Address {
                                address: Some(core::address::Address::SocketAddress(
                                    core::SocketAddress {
                                        address: "127.0.0.1".into(),
                                        port_specifier: Some(
                                            core::socket_address::PortSpecifier::PortValue(
                                                (*p).into(),
                                            ),
                                        ),
                                        ..Default::default()
                                    },
                                )),
                            }),
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    })
}

/// A backend that answers every request with `status`.
async fn failing_backend(status: u16) -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                    h.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let mut r = http::Response::new(Full::new(Bytes::from_static(b"down")));
                        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_go_to_another_endpoint() {
    let good = support::backend("ok").await;
    let (bad, bad_hits) = failing_backend(503).await;
    // A port nobody listens on: connect failures.
    let closed = support::free_port();
    let resources = vec![
        support::xds::listener("svc", "svc-routes"),
        retry_routes("5xx,connect-failure", 3),
        {
            let mut c = cpb::Cluster::decode_from(support::xds::cluster("pool", "pool"));
            c.lb_policy = cpb::cluster::LbPolicy::RoundRobin as i32;
            support::xds::any(&c)
        },
        pool_endpoints(&[bad.port(), closed, good.addr.port()]),
    ];
    let m = mesh(resources, |s| s.endpoints_for_cluster("pool").is_some()).await;
    for _ in 0..100 {
        let (status, body) = send(&m.client).await.expect("retried to success");
        assert_eq!((status, body.as_str()), (200, "ok"));
    }
    let bad = bad_hits.load(Ordering::Relaxed);
    println!("retries: 100 requests succeeded; the failing endpoint took {bad} first attempts");
    assert!(
        bad > 0,
        "round robin sends first attempts to the failing endpoint too"
    );
    assert_eq!(good.hits.load(Ordering::Relaxed), 100);
    // Not retriable under this policy: a 404 comes straight back.
    let (nf, _) = failing_backend(404).await;
    m.cache.set_resources(vec![
        support::xds::listener("svc", "svc-routes"),
        retry_routes("5xx,connect-failure", 3),
        support::xds::cluster("pool", "pool"),
        pool_endpoints(&[nf.port()]),
    ]);
    m.store
        .wait_for(PATIENCE, |s| {
            s.endpoints_for_cluster("pool")
                .is_some_and(|e| e.localities[0].endpoints.len() == 1)
        })
        .await
        .unwrap();
    let (status, _) = send(&m.client).await.unwrap();
    assert_eq!(status, 404);
}

fn pool_cluster(lb: cpb::cluster::LbPolicy, outlier: Option<cpb::OutlierDetection>) -> Any {
    let mut c = cpb::Cluster::decode_from(support::xds::cluster("pool", "pool"));
    c.lb_policy = lb as i32;
    c.outlier_detection = outlier;
    support::xds::any(&c)
}

fn plain_routes() -> Any {
    support::xds::routes("svc-routes", &[("pool", 1)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_failing_endpoint() {
    let good = support::backend("ok").await;
    let (bad, bad_hits) = failing_backend(503).await;
    let outlier = cpb::OutlierDetection {
        consecutive_5xx: Some(UInt32Value { value: 3 }),
        base_ejection_time: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 30,
            nanos: 0,
        }),
        max_ejection_percent: Some(UInt32Value { value: 50 }),
        ..Default::default()
    };
    let resources = vec![
        support::xds::listener("svc", "svc-routes"),
        plain_routes(),
        pool_cluster(cpb::cluster::LbPolicy::RoundRobin, Some(outlier)),
        pool_endpoints(&[bad.port(), good.addr.port()]),
    ];
    let m = mesh(resources, |s| s.endpoints_for_cluster("pool").is_some()).await;
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(send(&m.client).await.unwrap().0);
    }
    let failed = statuses.iter().filter(|s| **s == 503).count();
    println!("outlier detection: {failed} of 40 requests reached the failing endpoint before its ejection");
    assert_eq!(failed, 3, "ejected after 3 consecutive 5xx: {statuses:?}");
    assert_eq!(bad_hits.load(Ordering::Relaxed), 3);
    assert!(statuses[statuses.len() - 30..].iter().all(|s| *s == 200));
    let rt = m.client.registry().get("pool").unwrap();
    assert_eq!(rt.ejected(tokio::time::Instant::now()), 1);
}

/// An HTTP/2 backend answering like a gRPC server: HTTP 200, a message, then
/// `grpc-status: code` in the trailers (the status is not in the head).
async fn grpc_trailers_backend(code: u32) -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                    h.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", code.into());
                        let frames: Vec<Result<hyper::body::Frame<Bytes>, Infallible>> = vec![
                            Ok(hyper::body::Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
                            Ok(hyper::body::Frame::trailers(trailers)),
                        ];
                        let mut r = http::Response::new(http_body_util::StreamBody::new(
                            futures::stream::iter(frames),
                        ));
                        r.headers_mut()
                            .insert("content-type", "application/grpc".parse().unwrap());
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

/// Outlier detection judges a gRPC endpoint by the status in its trailers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_reads_grpc_trailers() {
    let (good, _) = grpc_trailers_backend(0).await;
    let (bad, bad_hits) = grpc_trailers_backend(14).await;
    let outlier = cpb::OutlierDetection {
        consecutive_5xx: Some(UInt32Value { value: 3 }),
        base_ejection_time: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 30,
            nanos: 0,
        }),
        max_ejection_percent: Some(UInt32Value { value: 50 }),
        ..Default::default()
    };
    let mut c = cpb::Cluster::decode_from(cluster("pool", None, true));
    c.lb_policy = cpb::cluster::LbPolicy::RoundRobin as i32;
    c.outlier_detection = Some(outlier);
    let resources = vec![
        support::xds::listener("svc", "svc-routes"),
        plain_routes(),
        support::xds::any(&c),
        pool_endpoints(&[bad.port(), good.port()]),
    ];
    let m = mesh(resources, |s| s.endpoints_for_cluster("pool").is_some()).await;
    let mut codes = Vec::new();
    for _ in 0..40 {
        let req = http::Request::post("http://svc/helloworld.Greeter/SayHello")
            .header("content-type", "application/grpc")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = m.client.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 200, "gRPC failures are 200 with a status");
        let body = resp.into_body().collect().await.unwrap();
        let code = body
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .map(|v| v.to_str().unwrap().to_owned());
        codes.push(code.unwrap());
    }
    let failed = codes.iter().filter(|c| *c == "14").count();
    println!("gRPC outlier detection: {failed} of 40 calls reached the UNAVAILABLE endpoint before its ejection");
    assert_eq!(
        failed, 3,
        "ejected after 3 consecutive UNAVAILABLE: {codes:?}"
    );
    assert_eq!(bad_hits.load(Ordering::Relaxed), 3);
    let rt = m.client.registry().get("pool").unwrap();
    assert_eq!(rt.ejected(tokio::time::Instant::now()), 1);
    // The client's metrics count the calls by their gRPC status, from the trailers.
    let text = m.client.metrics().render();
    assert!(text.contains(r#"outcome="UNAVAILABLE"} 3"#), "{text}");
    assert!(text.contains(r#"outcome="OK"} 37"#), "{text}");
}

/// Share of requests that went to a slow endpoint (50 ms) next to a fast one.
async fn slow_share(lb: cpb::cluster::LbPolicy) -> f64 {
    let (slow, _, slow_served) = slow_backend().await;
    let fast = support::backend("v1").await;
    let resources = vec![
        support::xds::listener("svc", "svc-routes"),
        plain_routes(),
        pool_cluster(lb, None),
        pool_endpoints(&[slow.port(), fast.addr.port()]),
    ];
    let m = mesh(resources, |s| s.endpoints_for_cluster("pool").is_some()).await;
    let (_, failures) = load(&m.client, 400, 8).await;
    assert!(failures.is_empty(), "{failures:?}");
    slow_served.load(Ordering::SeqCst) as f64 / 400.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_sends_less_to_a_slow_endpoint_than_round_robin() {
    let rr = slow_share(cpb::cluster::LbPolicy::RoundRobin).await;
    let p2c = slow_share(cpb::cluster::LbPolicy::LeastRequest).await;
    println!(
        "share of requests to the slow endpoint: round robin {rr:.3}, least request (P2C) {p2c:.3}"
    );
    assert!((rr - 0.5).abs() < 0.05, "round robin alternates: {rr}");
    assert!(
        p2c < rr - 0.15,
        "P2C least-request avoids the slow endpoint: {p2c} vs {rr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_keeps_a_key_on_one_endpoint() {
    use envoy_types::pb::envoy::config::route::v3 as rpb;
    let backends = [
        support::backend("b0").await,
        support::backend("b1").await,
        support::backend("b2").await,
        support::backend("b3").await,
    ];
    let ports: Vec<u16> = backends.iter().map(|b| b.addr.port()).collect();
    let mut routes = support::xds::routes("svc-routes", &[("pool", 1)]);
    {
        use prost::Message;
        let mut rc = rpb::RouteConfiguration::decode(routes.value.as_slice()).unwrap();
        if let Some(rpb::route::Action::Route(ra)) = &mut rc.virtual_hosts[0].routes[0].action {
            ra.hash_policy = vec![rpb::route_action::HashPolicy {
                terminal: false,
                policy_specifier: Some(rpb::route_action::hash_policy::PolicySpecifier::Header(
                    rpb::route_action::hash_policy::Header {
                        header_name: "x-user".into(),
                        regex_rewrite: None,
                    },
                )),
            }];
        }
        routes = support::xds::any(&rc);
    }
    let resources = vec![
        support::xds::listener("svc", "svc-routes"),
        routes,
        pool_cluster(cpb::cluster::LbPolicy::RingHash, None),
        pool_endpoints(&ports),
    ];
    let m = mesh(resources, |s| s.endpoints_for_cluster("pool").is_some()).await;
    let as_user = |user: String| {
        let client = m.client.clone();
        async move {
            let req = http::Request::get("http://svc/")
                .header("x-user", user)
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = client.oneshot(req).await.unwrap();
            String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes())
                .into_owned()
        }
    };
    assert_eq!(m.client.registry().get("pool").unwrap().rings().len(), 1);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..1000 {
        seen.insert(as_user("alice".into()).await);
    }
    assert_eq!(seen.len(), 1, "one key, one endpoint: {seen:?}");
    let mut spread = std::collections::BTreeMap::new();
    for u in 0..400 {
        *spread
            .entry(as_user(format!("user-{u}")).await)
            .or_insert(0) += 1;
    }
    println!("ring hash: 1000 requests of one user on {seen:?}; 400 users spread {spread:?}");
    assert_eq!(spread.len(), 4, "{spread:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_weights_are_honoured() {
    use envoy_types::pb::envoy::config::endpoint::v3 as epb;
    let names = ["l0", "l1", "l2", "l3"];
    let mut backends = Vec::new();
    for n in names {
        backends.push(support::backend(n).await);
    }
    let weights = [20u32, 40, 20, 20];
    let cla = epb::ClusterLoadAssignment {
        cluster_name: "pool".into(),
        endpoints: backends
            .iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (b, w))| {
                let mut one = {
                    use prost::Message;
                    epb::ClusterLoadAssignment::decode(
                        pool_endpoints(&[b.addr.port()]).value.as_slice(),
                    )
                    .unwrap()
                };
                let mut l = one.endpoints.remove(0);
                l.locality = Some(core::Locality {
                    region: format!("region-{i}"),
                    ..Default::default()
                });
                l.load_balancing_weight = Some(UInt32Value { value: w });
                l
            })
            .collect(),
        ..Default::default()
    };
    let mut c = cpb::Cluster::decode_from(support::xds::cluster("pool", "pool"));
    c.common_lb_config = Some(cpb::cluster::CommonLbConfig {
        locality_config_specifier: Some(
            cpb::cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(
                cpb::cluster::common_lb_config::LocalityWeightedLbConfig {},
            ),
        ),
        ..Default::default()
    });
    let resources = vec![
        support::xds::listener("svc", "svc-routes"),
        plain_routes(),
        support::xds::any(&c),
        support::xds::any(&cla),
    ];
    let m = mesh(resources, |s| s.endpoints_for_cluster("pool").is_some()).await;
    let n = 4000;
    let (_, failures) = load(&m.client, n, 16).await;
    assert!(failures.is_empty());
    let shares: Vec<f64> = backends
        .iter()
        .map(|b| b.hits.load(Ordering::Relaxed) as f64 / n as f64)
        .collect();
    println!("locality weights 20/40/20/20 -> shares {shares:.3?} over {n} requests");
    for (share, w) in shares.iter().zip(weights) {
        assert!((share - f64::from(w) / 100.0).abs() <= 0.03, "{shares:?}");
    }
}

/// A route to `primary` that mirrors every request to `mirror`.
fn mirrored_routes() -> Any {
    use envoy_types::pb::envoy::config::route::v3 as rpb;
    use prost::Message;
    let mut rc = rpb::RouteConfiguration::decode(
        support::xds::routes("svc-routes", &[("primary", 1)])
            .value
            .as_slice(),
    )
    .unwrap();
    if let Some(rpb::route::Action::Route(ra)) = &mut rc.virtual_hosts[0].routes[0].action {
        ra.request_mirror_policies = vec![rpb::route_action::RequestMirrorPolicy {
            cluster: "mirror".into(),
            ..Default::default()
        }];
    }
    support::xds::any(&rc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirroring_copies_requests_without_affecting_the_primary() {
    let primary = support::backend("primary").await;
    let mirror = support::backend("mirror").await;
    let world = |mirror_port: u16| {
        vec![
            support::xds::listener("svc", "svc-routes"),
            mirrored_routes(),
            support::xds::cluster("primary", "primary"),
            support::xds::cluster("mirror", "mirror"),
            support::xds::endpoints("primary", primary.addr.port()),
            support::xds::endpoints("mirror", mirror_port),
        ]
    };
    let m = mesh(world(mirror.addr.port()), |s| {
        s.endpoints_for_cluster("primary").is_some() && s.endpoints_for_cluster("mirror").is_some()
    })
    .await;
    for _ in 0..50 {
        let (status, body) = send(&m.client).await.unwrap();
        assert_eq!((status, body.as_str()), (200, "primary"));
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while mirror.hits.load(Ordering::Relaxed) < 50 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the mirror got {} copies",
            mirror.hits.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        mirror.hits.load(Ordering::Relaxed),
        50,
        "one copy per request"
    );

    // A failing mirror (503) and a slow one change nothing for the primary.
    let (failing, failing_hits) = failing_backend(503).await;
    m.cache.set_resources(world(failing.port()));
    m.store
        .wait_for(PATIENCE, |s| {
            s.endpoints_for_cluster("mirror")
                .is_some_and(|e| e.localities[0].endpoints[0].address.port() == failing.port())
        })
        .await
        .unwrap();
    for _ in 0..20 {
        assert_eq!(send(&m.client).await.unwrap(), (200, "primary".to_string()));
    }
    // A mirror that accepts connections and never answers: the primary still answers.
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging_port = hanging.local_addr().unwrap().port();
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = hanging.accept().await {
            keep.lock().unwrap().push(stream);
        }
    });
    m.cache.set_resources(world(hanging_port));
    m.store
        .wait_for(PATIENCE, |s| {
            s.endpoints_for_cluster("mirror")
                .is_some_and(|e| e.localities[0].endpoints[0].address.port() == hanging_port)
        })
        .await
        .unwrap();
    for _ in 0..5 {
        assert_eq!(send(&m.client).await.unwrap(), (200, "primary".to_string()));
    }
    assert!(failing_hits.load(Ordering::Relaxed) >= 1);
    println!(
        "mirroring: 50/50 copies delivered; failing and hanging mirrors left the primary untouched"
    );
}

/// Endpoints with a priority and health each.
fn prioritized(list: &[(u16, u32, i32)]) -> Any {
    use envoy_types::pb::envoy::config::endpoint::v3 as epb;
    use prost::Message;
    let mut cla = epb::ClusterLoadAssignment {
        cluster_name: "pool".into(),
        ..Default::default()
    };
    for (port, priority, health) in list {
        let mut one =
            epb::ClusterLoadAssignment::decode(pool_endpoints(&[*port]).value.as_slice()).unwrap();
        let mut l = one.endpoints.remove(0);
        l.priority = *priority;
        l.lb_endpoints[0].health_status = *health;
        cla.endpoints.push(l);
    }
    support::xds::any(&cla)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_failover_and_recovery() {
    const HEALTHY: i32 = 1;
    const UNHEALTHY: i32 = 2;
    let a = support::backend("p0").await;
    let b = support::backend("p1").await;
    let world = |health_a: i32| {
        vec![
            support::xds::listener("svc", "svc-routes"),
            plain_routes(),
            support::xds::cluster("pool", "pool"),
            prioritized(&[(a.addr.port(), 0, health_a), (b.addr.port(), 1, HEALTHY)]),
        ]
    };
    let m = mesh(world(HEALTHY), |s| {
        s.endpoints_for_cluster("pool").is_some()
    })
    .await;
    let answers = |n| {
        let client = m.client.clone();
        async move {
            let mut seen = std::collections::BTreeMap::new();
            for _ in 0..n {
                *seen.entry(send(&client).await.unwrap().1).or_insert(0) += 1;
            }
            seen
        }
    };
    assert_eq!(
        answers(50).await.into_iter().collect::<Vec<_>>(),
        vec![("p0".to_string(), 50)]
    );
    // Priority 0 loses its only healthy endpoint: traffic moves to priority 1...
    m.cache.set_resources(world(UNHEALTHY));
    m.store
        .wait_for(PATIENCE, |s| {
            s.endpoints_for_cluster("pool").is_some_and(|e| {
                e.localities[0].endpoints[0].health == mesh_core::config::HealthStatus::Unhealthy
            })
        })
        .await
        .unwrap();
    assert_eq!(
        answers(50).await.into_iter().collect::<Vec<_>>(),
        vec![("p1".to_string(), 50)]
    );
    // ...and comes back when it recovers.
    m.cache.set_resources(world(HEALTHY));
    m.store
        .wait_for(PATIENCE, |s| {
            s.endpoints_for_cluster("pool").is_some_and(|e| {
                e.localities[0].endpoints[0].health == mesh_core::config::HealthStatus::Healthy
            })
        })
        .await
        .unwrap();
    assert_eq!(
        answers(50).await.into_iter().collect::<Vec<_>>(),
        vec![("p0".to_string(), 50)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_endpoints_drain_in_flight_requests() {
    let (slow, _, slow_served) = slow_backend().await;
    let fast = support::backend("fast").await;
    let world = |ports: &[u16]| {
        vec![
            support::xds::listener("svc", "svc-routes"),
            plain_routes(),
            support::xds::cluster("pool", "pool"),
            pool_endpoints(ports),
        ]
    };
    let m = mesh(world(&[slow.port()]), |s| {
        s.endpoints_for_cluster("pool").is_some()
    })
    .await;
    // Requests in flight to the slow endpoint (100 ms each)...
    let in_flight: Vec<_> = (0..5)
        .map(|_| {
            let c = m.client.clone();
            tokio::spawn(async move { send(&c).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // ...while EDS removes it and adds another.
    m.cache.set_resources(world(&[fast.addr.port()]));
    m.store
        .wait_for(PATIENCE, |s| {
            s.endpoints_for_cluster("pool")
                .is_some_and(|e| e.localities[0].endpoints[0].address.port() == fast.addr.port())
        })
        .await
        .unwrap();
    for r in in_flight {
        let (status, body) = r.await.unwrap().expect("in-flight requests complete");
        assert_eq!((status, body.as_str()), (200, "v1"));
    }
    assert_eq!(slow_served.load(Ordering::SeqCst), 5);
    for _ in 0..10 {
        assert_eq!(send(&m.client).await.unwrap(), (200, "fast".to_string()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_avoids_a_slow_endpoint_even_without_overlap() {
    let (slow, _, slow_served) = slow_backend().await;
    let fast = support::backend("fast").await;
    let resources = vec![
        support::xds::listener("svc", "svc-routes"),
        plain_routes(),
        pool_cluster(cpb::cluster::LbPolicy::LeastRequest, None),
        pool_endpoints(&[slow.port(), fast.addr.port()]),
    ];
    let m = mesh(resources, |s| s.endpoints_for_cluster("pool").is_some()).await;
    let ewma = MeshClient::builder(m.store.clone(), "xds:///svc")
        .unwrap()
        .peak_ewma(true)
        .build();
    // One request at a time: outstanding counts cannot tell the endpoints apart; latency can.
    for _ in 0..60 {
        assert_eq!(send(&ewma).await.unwrap().0, 200);
    }
    let slow_share = slow_served.load(Ordering::SeqCst) as f64 / 60.0;
    println!("peak EWMA at concurrency 1: {slow_share:.3} of requests to the slow endpoint");
    assert!(slow_share < 0.2, "{slow_share}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_fails_fast_and_caps_connections() {
    let (addr, max_seen, served) = slow_backend().await;
    let mut c = cpb::Cluster::decode_from(support::xds::cluster("v1", "v1"));
    c.circuit_breakers = Some(cpb::CircuitBreakers {
        thresholds: vec![cpb::circuit_breakers::Thresholds {
            max_connections: Some(UInt32Value { value: 2 }),
            ..Default::default()
        }],
        ..Default::default()
    });
    let m = mesh(
        world(
            &[("v1", 1)],
            vec![support::xds::any(&c)],
            &[("v1", addr.port())],
        ),
        |s| s.endpoints_for_cluster("v1").is_some(),
    )
    .await;
    let results = futures::future::join_all((0..10).map(|_| send(&m.client))).await;
    let ok = results.iter().filter(|r| matches!(r, Ok((200, _)))).count();
    let refused = results
        .iter()
        .filter(|r| match r {
            Err(e) => matches!(
                e.downcast_ref::<MeshError>(),
                Some(MeshError::Overloaded {
                    limit: "max_connections",
                    max: 2,
                    ..
                })
            ),
            _ => false,
        })
        .count();
    println!(
        "max_connections=2 at concurrency 10 (HTTP/1.1): {ok} served, {refused} failed fast, backend peak {}",
        max_seen.load(Ordering::SeqCst)
    );
    assert_eq!(ok + refused, 10, "{results:?}");
    assert!(
        max_seen.load(Ordering::SeqCst) <= 2,
        "never more than 2 connections"
    );
    assert!(refused > 0, "the rest fail fast instead of queueing");
    assert_eq!(served.load(Ordering::SeqCst), ok as u64);
    let rt = m.client.registry().get("v1").unwrap();
    assert_eq!(rt.overflows(), refused as u64);
    assert!(rt.open_connections() <= 2);
}

/// A backend answering with its name, the path it saw and an optional header.
async fn echo_backend(name: &'static str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(
                    move |req: http::Request<hyper::body::Incoming>| async move {
                        let tag = req
                            .headers()
                            .get("x-mesh")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned();
                        let host = req
                            .headers()
                            .get("host")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned();
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(format!(
                            "{name} {} {tag} {host}",
                            req.uri().path_and_query().map_or("/", |p| p.as_str())
                        )))))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_and_path_routing_with_rewrites() {
    let (a, b, c) = (
        echo_backend("stable").await.port(),
        echo_backend("canary").await.port(),
        echo_backend("api").await.port(),
    );
    // Istio YAML: /api/ goes to the api service with a prefix rewrite and a header; requests
    // with x-canary go to the canary subset; the rest to stable.
    let yaml = format!(
        r#"apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: web, namespace: prod}}
spec:
  hosts: [web.prod.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {a}}}, labels: {{version: stable}}}}
  - {{address: 127.0.0.1, ports: {{http: {b}}}, labels: {{version: canary}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: api, namespace: prod}}
spec:
  hosts: [api.prod.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {c}}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: web, namespace: prod}}
spec:
  host: web.prod.svc.cluster.local
  trafficPolicy: {{tls: {{mode: DISABLE}}}}
  subsets:
  - {{name: stable, labels: {{version: stable}}}}
  - {{name: canary, labels: {{version: canary}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: api, namespace: prod}}
spec:
  host: api.prod.svc.cluster.local
  trafficPolicy: {{tls: {{mode: DISABLE}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: web, namespace: prod}}
spec:
  hosts: [web.prod.svc.cluster.local]
  http:
  - match: [{{uri: {{prefix: /api/}}}}]
    rewrite: {{uri: /v2/, authority: api.internal}}
    headers: {{request: {{set: {{x-mesh: rewritten}}}}}}
    route: [{{destination: {{host: api.prod.svc.cluster.local}}}}]
  - match: [{{headers: {{x-canary: {{exact: "yes"}}}}}}]
    route: [{{destination: {{host: web.prod.svc.cluster.local, subset: canary}}}}]
  - route: [{{destination: {{host: web.prod.svc.cluster.local, subset: stable}}}}]
"#
    );
    let (_, xds_addr) = support::control_plane(&yaml, "web.yaml").await;
    let xds = XdsClient::builder(Bootstrap::new(xds_addr.to_string(), "web-client"))
        .build()
        .unwrap();
    let target = "xds:///web.prod.svc.cluster.local:80";
    xds.listener(target, PATIENCE).await.unwrap();
    xds.store()
        .wait_for(PATIENCE, |s| {
            [
                "outbound|80|stable|web.prod.svc.cluster.local",
                "outbound|80|canary|web.prod.svc.cluster.local",
                "outbound|80||api.prod.svc.cluster.local",
            ]
            .iter()
            .all(|c| s.endpoints_for_cluster(c).is_some())
        })
        .await
        .unwrap();
    let client = MeshClient::builder(xds.store().clone(), target)
        .unwrap()
        .build();
    let call = |path: &'static str, canary: bool| {
        let client = client.clone();
        async move {
            let mut req = http::Request::get(format!("http://web.prod.svc.cluster.local{path}"));
            if canary {
                req = req.header("x-canary", "yes");
            }
            let resp = client
                .oneshot(req.body(Empty::<Bytes>::new()).unwrap())
                .await
                .unwrap();
            String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes())
                .into_owned()
        }
    };
    assert_eq!(
        call("/index.html?x=1", false).await,
        "stable /index.html?x=1 - web.prod.svc.cluster.local"
    );
    assert_eq!(
        call("/index.html", true).await,
        "canary /index.html - web.prod.svc.cluster.local"
    );
    assert_eq!(
        call("/api/users?id=7", true).await,
        "api /v2/users?id=7 rewritten api.internal",
        "path first, then rewrites"
    );
}
