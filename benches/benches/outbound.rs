//! The outbound decision path and the whole stacks: route match over 1 / 100 / 10 000 routes,
//! P2C over 1 000 endpoints, the breaker, EDS updates of 10 000 endpoints, translation of a
//! large RouteConfiguration, each layer over a `service_fn`, the inbound stack in process,
//! and the outbound stack against a hyper client over loopback.
//!
//! `cargo bench -p mesh-benches --bench outbound`

#![allow(missing_docs)] // criterion_group! generates an undocumented function
use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use futures::FutureExt;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use mesh_benches::{
    app, cla, request, resources, routes_yaml, service_yaml, snapshot, Body, CLUSTER, HOST,
    LISTENER,
};
use mesh_core::config::{EndpointAssignment, RouteConfig};
use mesh_core::ConfigStore;
use mesh_tower::cluster::balance::{ByConfig, PickEndpoint};
use mesh_tower::cluster::ClusterRegistry;
use mesh_tower::route::{decide, RouteLayer};
use prost::Message;
use tower::{Layer, Service, ServiceExt};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn route_match(c: &mut Criterion) {
    for n in [1usize, 100, 10_000] {
        let snap = snapshot(&(service_yaml(4, false) + &routes_yaml(n)));
        let rc = snap.routes_for_listener(LISTENER).expect("routes");
        // The last route: a full scan of the list, the worst case.
        let uri: Uri = format!("http://{HOST}/r{}", n - 1).parse().expect("uri");
        c.bench_function(
            &format!("route/decide/{n}_routes (last matches, 90/10 split)"),
            |b| {
                b.iter_batched(
                    || request(&uri),
                    |mut req| black_box(decide(rc.clone(), LISTENER, &mut req, fastrand::u64(..))),
                    BatchSize::SmallInput,
                )
            },
        );
    }
}

fn balance(c: &mut Criterion) {
    let rt = runtime();
    let _enter = rt.enter();
    let store = ConfigStore::new();
    store.publish(snapshot(&service_yaml(1000, false)));
    let registry = ClusterRegistry::new(store);
    let cluster = registry.get(CLUSTER).expect("cluster");
    let levels = cluster.levels();
    let level = &levels[0];
    assert_eq!(level.len(), 1000);
    let picker = ByConfig::default();
    c.bench_function("balance/p2c_pick/1000_endpoints", |b| {
        b.iter(|| black_box(picker.pick(&cluster, level)))
    });
    let ewma = ByConfig { peak_ewma: true };
    c.bench_function("balance/p2c_peak_ewma_pick/1000_endpoints", |b| {
        b.iter(|| black_box(ewma.pick(&cluster, level)))
    });
    c.bench_function("breaker/try_acquire+release", |b| {
        b.iter(|| black_box(cluster.try_acquire()))
    });
    c.bench_function("registry/get (cluster by name)", |b| {
        b.iter(|| black_box(registry.get(black_box(CLUSTER))))
    });
}

fn eds(c: &mut Criterion) {
    let rt = runtime();
    let _enter = rt.enter();
    // One cluster, 10 000 endpoints; updates alternate between two sets differing by one
    // endpoint (one leaves, one joins), decoded from the wire as the client receives them.
    let store = ConfigStore::new();
    store.publish(snapshot(&service_yaml(4, false)));
    let registry = ClusterRegistry::new(store.clone());
    let a = cla(CLUSTER, 10_000).encode_to_vec();
    let mut b_cla = cla(CLUSTER, 10_001);
    b_cla.endpoints[0].lb_endpoints.remove(0);
    let b = b_cla.encode_to_vec();
    let mut flip = false;
    let apply = |store: &ConfigStore, registry: &ClusterRegistry, bytes: &[u8]| {
        let proto =
            envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(bytes)
                .expect("decode");
        let assignment = EndpointAssignment::try_from(&proto).expect("translate");
        let mut next = (*store.load()).clone();
        next.set_endpoints(Arc::new(assignment));
        store.publish(next);
        // The first request after the update: the registry applies the snapshot, then picks.
        let cluster = registry.get(CLUSTER).expect("cluster");
        let levels = cluster.levels();
        black_box(ByConfig::default().pick(&cluster, &levels[0]).address);
    };
    c.bench_function(
        "eds/update_10k_endpoints (decode, translate, publish, first pick)",
        |bench| {
            bench.iter(|| {
                flip = !flip;
                apply(&store, &registry, if flip { &a } else { &b });
            })
        },
    );

    // 1 000 clusters × 10 endpoints; one cluster's endpoints change.
    let mut yaml = String::new();
    for s in 0..1000 {
        yaml.push_str(&service_yaml(10, false).replace("svc", &format!("svc{s}")));
    }
    let store = ConfigStore::new();
    store.publish(snapshot(&yaml));
    let registry = ClusterRegistry::new(store.clone());
    let name = CLUSTER.replace("svc", "svc500");
    let a = cla(&name, 10).encode_to_vec();
    let b = cla(&name, 11).encode_to_vec();
    let mut flip = false;
    c.bench_function(
        "eds/update_1_of_1000_clusters (10 endpoints each)",
        |bench| {
            bench.iter(|| {
                flip = !flip;
                let proto =
                    envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(
                        if flip { &a[..] } else { &b[..] },
                    )
                    .expect("decode");
                let mut next = (*store.load()).clone();
                next.set_endpoints(Arc::new(
                    EndpointAssignment::try_from(&proto).expect("translate"),
                ));
                store.publish(next);
                black_box(registry.get(&name).expect("cluster"));
            })
        },
    );
}

fn translation(c: &mut Criterion) {
    let any = resources(&(service_yaml(4, false) + &routes_yaml(10_000)))
        .into_iter()
        .find(|a| a.type_url.ends_with("RouteConfiguration"))
        .expect("a RouteConfiguration");
    c.bench_function(
        "translate/route_configuration/10k_routes (decode + validate)",
        |b| {
            b.iter(|| {
                let p = envoy_types::pb::envoy::config::route::v3::RouteConfiguration::decode(
                    any.value.as_slice(),
                )
                .expect("decode");
                black_box(RouteConfig::try_from(&p).expect("translate"))
            })
        },
    );
}

fn layers(c: &mut Criterion) {
    let rt = runtime();
    let _enter = rt.enter();
    let store = ConfigStore::new();
    store.publish(snapshot(&(service_yaml(4, false) + &routes_yaml(1))));
    let uri: Uri = format!("http://{HOST}/r0").parse().expect("uri");
    let run = |c: &mut Criterion, name: &str, mut svc: Box<dyn FnMut(Request<Body>) -> bool>| {
        c.bench_function(name, |b| {
            b.iter_batched(
                || request(&uri),
                |req| black_box(svc(req)),
                BatchSize::SmallInput,
            )
        });
    };
    let mut base = app();
    run(
        c,
        "layer/baseline/service_fn",
        Box::new(move |r| base.call(r).now_or_never().is_some()),
    );
    let mut route = RouteLayer::new(store.clone(), LISTENER).layer(app());
    run(
        c,
        "layer/route",
        Box::new(move |r| route.call(r).now_or_never().is_some()),
    );
    let mut fault = RouteLayer::new(store.clone(), LISTENER)
        .layer(mesh_tower::fault::FaultLayer::new().layer(app()));
    run(
        c,
        "layer/route+fault",
        Box::new(move |r| fault.call(r).now_or_never().is_some()),
    );
    let mut timeout = RouteLayer::new(store.clone(), LISTENER)
        .layer(mesh_tower::timeout::TimeoutLayer::new().layer(app()));
    run(
        c,
        "layer/route+timeout (5 s route timeout)",
        Box::new(move |r| timeout.call(r).now_or_never().is_some()),
    );
    // The retry layer takes the mesh's body type (the request is kept for a replay), so it
    // has its own baseline: the route layer over the same body.
    type MeshBody = mesh_tower::cluster::MeshBody;
    let mesh_app = || {
        tower::service_fn(|_req: Request<MeshBody>| {
            std::future::ready(Ok::<_, mesh_tower::BoxError>(Response::new(Body::new())))
        })
    };
    let mesh_request = |uri: &Uri| {
        let mut r = Request::new(Body::new().map_err(|e| match e {}).boxed_unsync());
        *r.uri_mut() = uri.clone();
        r
    };
    c.bench_function("layer/route (mesh body)", |b| {
        let mut svc = RouteLayer::new(store.clone(), LISTENER).layer(mesh_app());
        b.iter_batched(
            || mesh_request(&uri),
            |req| black_box(svc.call(req).now_or_never().is_some()),
            BatchSize::SmallInput,
        )
    });
    let registry = ClusterRegistry::new(store.clone());
    c.bench_function("layer/route+retry (2 retries on 5xx, none needed)", |b| {
        let mut svc = RouteLayer::new(store.clone(), LISTENER)
            .layer(mesh_tower::retry::RetryLayer::new(registry.clone()).layer(mesh_app()));
        b.iter_batched(
            || mesh_request(&uri),
            |req| black_box(svc.call(req).now_or_never().is_some()),
            BatchSize::SmallInput,
        )
    });
    let mut authz = mesh_tower::authz::AuthzLayer::new(Vec::new()).layer(app());
    run(
        c,
        "layer/authz (no rules)",
        Box::new(move |r| authz.call(r).now_or_never().is_some()),
    );
    // tower-http's marking of the credential headers, which both stacks run first.
    let mut sensitive =
        tower_http::sensitive_headers::SetSensitiveHeadersLayer::new(mesh_tower::SENSITIVE_HEADERS)
            .layer(app());
    run(
        c,
        "layer/sensitive_headers (tower-http, 4 names)",
        Box::new(move |r| sensitive.call(r).now_or_never().is_some()),
    );
    // The same with headers as real requests and responses carry (the empty maps above make
    // `HeaderMap::entry` allocate).
    let with_headers = |mut r: Request<mesh_benches::Body>| {
        let h = r.headers_mut();
        h.insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static("bench"),
        );
        h.insert(http::header::ACCEPT, http::HeaderValue::from_static("*/*"));
        r
    };
    let typed_app = || {
        tower::service_fn(|_req: Request<mesh_benches::Body>| {
            let mut resp = http::Response::new(mesh_benches::Body::new());
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain"),
            );
            std::future::ready(Ok::<_, std::convert::Infallible>(resp))
        })
    };
    let mut headed_base = tower::ServiceBuilder::new()
        .map_request(with_headers)
        .service(typed_app());
    run(
        c,
        "layer/baseline/service_fn (2 request, 1 response headers)",
        Box::new(move |r| headed_base.call(r).now_or_never().is_some()),
    );
    let mut headed = tower::ServiceBuilder::new()
        .map_request(with_headers)
        .layer(
            tower_http::sensitive_headers::SetSensitiveHeadersLayer::new(
                mesh_tower::SENSITIVE_HEADERS,
            ),
        )
        .service(typed_app());
    run(
        c,
        "layer/sensitive_headers (tower-http, 4 names; 2 request, 1 response headers)",
        Box::new(move |r| headed.call(r).now_or_never().is_some()),
    );
    let mut by_hand = tower::ServiceBuilder::new()
        .map_request(|mut r: Request<_>| {
            for name in &mesh_tower::SENSITIVE_HEADERS {
                if r.headers().contains_key(name) {
                    if let http::header::Entry::Occupied(mut e) = r.headers_mut().entry(name) {
                        for v in e.iter_mut() {
                            v.set_sensitive(true);
                        }
                    }
                }
            }
            r
        })
        .service(app());
    run(
        c,
        "layer/sensitive_headers (by hand, request side, lookup first)",
        Box::new(move |r| by_hand.call(r).now_or_never().is_some()),
    );
    let mut inbound = mesh_tower::server::InboundLayer::new("svc").layer(app());
    run(
        c,
        "stack/inbound (sensitive headers, trace, metrics, authz) in process",
        Box::new(move |r| inbound.call(r).now_or_never().is_some()),
    );
}

/// The outbound stack against a hyper client, both calling the same HTTP/2 server over
/// loopback on one thread: the difference is the stack's cost, cluster and pool included.
fn outbound_loopback(c: &mut Criterion) {
    let rt = runtime();
    let port = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(
                            hyper_util::rt::TokioIo::new(tcp),
                            hyper::service::service_fn(
                                |_req: Request<hyper::body::Incoming>| async {
                                    Ok::<_, Infallible>(Response::new(Full::new(
                                        Bytes::from_static(b"ok"),
                                    )))
                                },
                            ),
                        ),
                );
            }
        });
        port
    });
    let yaml = format!(
        "apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: svc, namespace: bench}}
spec:
  hosts: [{HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP2}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}}}]
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: svc, namespace: bench}}
spec: {{host: {HOST}, trafficPolicy: {{tls: {{mode: DISABLE}}}}}}
"
    );
    let _enter = rt.enter();
    let store = ConfigStore::new();
    store.publish(snapshot(&yaml));
    let mesh = mesh_tower::MeshClient::builder(store, &format!("xds:///{LISTENER}"))
        .expect("target")
        .build();
    let mut builder =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new());
    builder.http2_only(true);
    let plain = builder.build_http::<Full<Bytes>>();
    let mesh_uri: Uri = format!("http://{HOST}/").parse().expect("uri");
    let plain_uri: Uri = format!("http://127.0.0.1:{port}/").parse().expect("uri");
    c.bench_function("stack/outbound_loopback/hyper_client (baseline)", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut req = Request::new(Full::new(Bytes::new()));
                *req.uri_mut() = plain_uri.clone();
                let resp = plain.request(req).await.expect("plain call");
                black_box(resp.into_body().collect().await.expect("body"));
            })
        })
    });
    c.bench_function("stack/outbound_loopback/mesh_client", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut req = Request::new(Full::new(Bytes::new()));
                *req.uri_mut() = mesh_uri.clone();
                let mut m = mesh.clone();
                let resp = ServiceExt::<Request<Full<Bytes>>>::ready(&mut m)
                    .await
                    .expect("ready")
                    .call(req)
                    .await
                    .expect("mesh call");
                black_box(resp.into_body().collect().await.expect("body"));
            })
        })
    });
}

criterion_group!(
    benches,
    route_match,
    balance,
    eds,
    translation,
    layers,
    outbound_loopback
);
criterion_main!(benches);
