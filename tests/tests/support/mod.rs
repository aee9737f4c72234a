//! Shared pieces of the integration tests: real hyper backends and a small HTTP client.

#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// A hyper HTTP/1.1 server on 127.0.0.1:0 that answers every request with `body`.
pub struct Backend {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
}

pub async fn backend(body: &'static str) -> Backend {
    backend_at([127, 0, 0, 1].into(), 0, body).await
}

/// [`backend`] on a given address (any of 127.0.0.0/8) and port (0: any).
pub async fn backend_at(ip: std::net::IpAddr, port: u16, body: &'static str) -> Backend {
    let listener = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<hyper::body::Incoming>| {
                    counter.fetch_add(1, Ordering::Relaxed);
                    async move {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            body.as_bytes(),
                        ))))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Backend { addr, hits }
}

/// Waits until `f` holds, polling every 20 ms for at most 20 s.
pub async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Steady load through a mesh client: 4 callers, each sending `GET http://svc/` every 5 ms
/// until [`Load::finish`]; a request fails unless it gets a 200 with its whole body.
pub struct Load {
    pub sent: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub fn load(client: &mesh_tower::MeshClient) -> Load {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let tasks = (0..4)
        .map(|_| {
            let (client, stop, sent, failed) =
                (client.clone(), stop.clone(), sent.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let req = Request::get("http://svc/")
                        .body(http_body_util::Empty::<Bytes>::new())
                        .unwrap();
                    let ok = match tower::ServiceExt::oneshot(client.clone(), req).await {
                        Ok(r) if r.status() == 200 => r.into_body().collect().await.is_ok(),
                        Ok(r) => {
                            eprintln!("status {}", r.status());
                            false
                        }
                        Err(e) => {
                            eprintln!("error: {e}");
                            false
                        }
                    };
                    sent.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    Load {
        sent,
        failed,
        stop,
        tasks,
    }
}

impl Load {
    /// Stops the callers; returns (sent, failed).
    pub async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// A keep-alive HTTP/1.1 client.
pub fn client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// GET `http://{addr}{path}` with a Host header; returns status and body.
pub async fn get(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> Result<(u16, String), String> {
    let req = Request::get(format!("http://{addr}{path}"))
        .header(hyper::header::HOST, host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Builders of xDS resources for tests.
pub mod xds {
    use envoy_types::pb::envoy::config::cluster::v3 as cpb;
    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::envoy::config::endpoint::v3 as epb;
    use envoy_types::pb::envoy::config::listener::v3 as lpb;
    use envoy_types::pb::envoy::config::route::v3 as rpb;
    use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
    use envoy_types::pb::google::protobuf::{Any, UInt32Value};
    use prost::{Message, Name};

    pub fn any<M: Message + Name>(m: &M) -> Any {
        Any {
            type_url: M::type_url(),
            value: m.encode_to_vec(),
        }
    }

    /// An API listener taking its routes from RDS `rds`.
    pub fn listener(name: &str, rds: &str) -> Any {
        let manager = hcm::HttpConnectionManager {
            route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
                hcm::Rds {
                    route_config_name: rds.into(),
                    config_source: None,
                },
            )),
            http_filters: vec![hcm::HttpFilter {
                name: "envoy.filters.http.router".into(),
                config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                    &Router::default(),
                ))),
                ..Default::default()
            }],
            ..Default::default()
        };
        any(&lpb::Listener {
            name: name.into(),
            api_listener: Some(lpb::ApiListener {
                api_listener: Some(any(&manager)),
            }),
            ..Default::default()
        })
    }

    /// A route configuration for domain `svc` (and `*` for one target) splitting across clusters.
    pub fn routes(name: &str, split: &[(&str, u32)]) -> Any {
        any(&rpb::RouteConfiguration {
            name: name.into(),
            virtual_hosts: vec![rpb::VirtualHost {
                name: "svc".into(),
                domains: vec!["svc".into(), "*".into()],
                routes: vec![rpb::Route {
                    r#match: Some(rpb::RouteMatch {
                        path_specifier: Some(rpb::route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(rpb::route::Action::Route(rpb::RouteAction {
                        cluster_specifier: Some(
                            rpb::route_action::ClusterSpecifier::WeightedClusters(
                                rpb::WeightedCluster {
                                    clusters: split
                                        .iter()
                                        .map(|(n, w)| rpb::weighted_cluster::ClusterWeight {
                                            name: (*n).into(),
                                            weight: Some(UInt32Value { value: *w }),
                                            ..Default::default()
                                        })
                                        .collect(),
                                    ..Default::default()
                                },
                            ),
                        ),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    /// An EDS cluster.
    pub fn cluster(name: &str, eds: &str) -> Any {
        any(&cpb::Cluster {
            name: name.into(),
            cluster_discovery_type: Some(cpb::cluster::ClusterDiscoveryType::Type(3)),
            eds_cluster_config: Some(cpb::cluster::EdsClusterConfig {
                eds_config: None,
                service_name: eds.into(),
            }),
            ..Default::default()
        })
    }

    /// One endpoint on 127.0.0.1.
    pub fn endpoints(name: &str, port: u16) -> Any {
        any(&epb::ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![epb::LocalityLbEndpoints {
                lb_endpoints: vec![epb::LbEndpoint {
                    host_identifier: Some(epb::lb_endpoint::HostIdentifier::Endpoint(
                        epb::Endpoint {
                            address: Some(core::Address {
                                address: Some(core::address::Address::SocketAddress(
                                    core::SocketAddress {
                                        address: "127.0.0.1".into(),
                                        port_specifier: Some(
                                            core::socket_address::PortSpecifier::PortValue(
                                                port.into(),
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
                }],
                ..Default::default()
            }],
            ..Default::default()
        })
    }
}

/// The xDS resources meshctl generates from Istio YAML (`file` names it in errors, which
/// fail the test).
pub fn istio(yaml: &str, file: &str) -> mesh_control::istio::Generated {
    let config = mesh_control::istio::parse(yaml, file).unwrap_or_else(|e| panic!("{e:?}"));
    mesh_control::istio::generate(&config, &mesh_control::istio::Options::default())
        .unwrap_or_else(|e| panic!("{e:?}"))
}

/// A real ADS server on 127.0.0.1:0 serving `cache`: its address.
pub async fn ads_server(cache: &mesh_control::ads::ResourceCache) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = mesh_control::ads::AdsServer::new(cache.clone());
    tokio::spawn(server.serve(listener, std::future::pending()));
    addr
}

/// A control plane serving what meshctl generates from Istio YAML: its cache (to change the
/// configuration) and address.
pub async fn control_plane(
    yaml: &str,
    file: &str,
) -> (mesh_control::ads::ResourceCache, SocketAddr) {
    let cache = mesh_control::ads::ResourceCache::new();
    cache.set_resources(istio(yaml, file).resources);
    let addr = ads_server(&cache).await;
    (cache, addr)
}
