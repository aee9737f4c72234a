//! Benchmarks of the mesh. The criterion benches are in `benches/benches/`, the load
//! comparison is the `compare` binary; results and the commands that produced them are in
//! `benches/RESULTS.md`. This library holds the configurations the benches share, made the
//! way a user makes them: Istio YAML through the control plane's generator, then the xDS
//! client's translation.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};

use bytes::Bytes;
use http::{Request, Response};

use envoy_types::pb::envoy::config::core::v3 as core_pb;
use envoy_types::pb::envoy::config::endpoint::v3 as eds;
use mesh_core::config::Snapshot;

/// Resident set size of process `pid` in KiB (0 if it cannot be read).
pub fn rss_kib(pid: impl std::fmt::Display) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// The body of every bench request and response: empty, allocation-free to build and drop.
pub type Body = http_body_util::Empty<Bytes>;

/// The baseline every layer is measured over: a `service_fn` that answers at once.
pub fn app() -> impl tower::Service<
    Request<Body>,
    Response = Response<Body>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<Body>, Infallible>>,
> + Clone {
    tower::service_fn(|_req: Request<Body>| std::future::ready(Ok(Response::new(Body::new()))))
}

/// A request for `uri` that allocates nothing (no headers; extensions not yet allocated).
pub fn request(uri: &http::Uri) -> Request<Body> {
    let mut r = Request::new(Body::new());
    *r.uri_mut() = uri.clone();
    r
}

/// The service every bench calls.
pub const HOST: &str = "svc.bench.svc.cluster.local";
/// Its client listener (`xds:///` target name).
pub const LISTENER: &str = "svc.bench.svc.cluster.local:80";
/// Its cluster (no subset).
pub const CLUSTER: &str = "outbound|80||svc.bench.svc.cluster.local";

/// The snapshot the generator makes of `yaml`, as the client would hold it.
///
/// # Panics
/// On YAML the generator rejects (bench setup).
pub fn snapshot(yaml: &str) -> Snapshot {
    let show = |e: Vec<mesh_control::istio::ConfigError>| {
        e.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let config = mesh_control::istio::parse(yaml, "bench.yaml")
        .map_err(show)
        .expect("bench YAML parses");
    let generated =
        mesh_control::istio::generate(&config, &mesh_control::istio::Options::default())
            .map_err(show)
            .expect("bench YAML generates");
    mesh_core::xds::file::snapshot_from_resources(&generated.resources)
        .expect("generated resources translate")
}

/// The generated xDS resources of `yaml` (for translation benches).
///
/// # Panics
/// On YAML the generator rejects.
pub fn resources(yaml: &str) -> Vec<envoy_types::pb::google::protobuf::Any> {
    let config = mesh_control::istio::parse(yaml, "bench.yaml").expect("bench YAML parses");
    mesh_control::istio::generate(&config, &mesh_control::istio::Options::default())
        .expect("bench YAML generates")
        .resources
}

/// A service with `endpoints` endpoints (127.0.0.x:8000+) and subsets v1/v2 by alternation.
pub fn service_yaml(endpoints: usize, tls: bool) -> String {
    service_yaml_with(endpoints, tls, true)
}

/// [`service_yaml`], with or without the v1/v2 subsets (each subset is a cluster of its own).
pub fn service_yaml_with(endpoints: usize, tls: bool, subsets: bool) -> String {
    let subsets = if subsets {
        "  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n"
    } else {
        ""
    };
    let mut eps = String::new();
    for i in 0..endpoints {
        let SocketAddr::V4(a) = endpoint_addr(i) else {
            unreachable!()
        };
        let version = if i % 2 == 0 { "v1" } else { "v2" };
        eps.push_str(&format!(
            "  - {{address: {}, ports: {{http: {}}}, labels: {{version: {version}}}, serviceAccount: svc}}\n",
            a.ip(),
            a.port()
        ));
    }
    let tls = if tls { "ISTIO_MUTUAL" } else { "DISABLE" };
    format!(
        "apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: svc, namespace: bench}}
spec:
  hosts: [{HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{eps}---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: svc, namespace: bench}}
spec:
  host: {HOST}
  trafficPolicy:
    loadBalancer: {{simple: LEAST_REQUEST}}
    tls: {{mode: {tls}}}
    outlierDetection: {{consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}}
{subsets}---
"
    )
}

/// A VirtualService for the service with `routes` exact-path routes (`/r0` .. `/rN-1`), each
/// with retries, a timeout and a 90/10 split across subsets.
pub fn routes_yaml(routes: usize) -> String {
    let mut http = String::new();
    for i in 0..routes {
        http.push_str(&format!(
            "  - name: r{i}
    match: [{{uri: {{exact: /r{i}}}}}]
    timeout: 5s
    retries: {{attempts: 2, retryOn: 5xx}}
    route:
    - {{destination: {{host: {HOST}, subset: v1}}, weight: 90}}
    - {{destination: {{host: {HOST}, subset: v2}}, weight: 10}}
"
        ));
    }
    format!(
        "apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: svc, namespace: bench}}
spec:
  hosts: [{HOST}]
  http:
{http}"
    )
}

/// The address of endpoint `i` of [`service_yaml`].
pub fn endpoint_addr(i: usize) -> SocketAddr {
    let i = u32::try_from(i).unwrap_or(u32::MAX);
    SocketAddr::from((
        Ipv4Addr::from(0x7f00_0000 | ((i / 50_000) + 1)),
        u16::try_from(8000 + i % 50_000).unwrap_or(u16::MAX),
    ))
}

/// An EDS update for `cluster` with `n` endpoints (in 10 localities), as a control plane
/// sends it.
pub fn cla(cluster: &str, n: usize) -> eds::ClusterLoadAssignment {
    let per = n.div_ceil(10).max(1);
    let localities = (0..n)
        .collect::<Vec<_>>()
        .chunks(per)
        .enumerate()
        .map(|(z, chunk)| eds::LocalityLbEndpoints {
            locality: Some(core_pb::Locality {
                region: "bench".into(),
                zone: format!("z{z}"),
                ..Default::default()
            }),
            lb_endpoints: chunk
                .iter()
                .map(|&i| {
                    let a = endpoint_addr(i);
                    eds::LbEndpoint {
                        host_identifier: Some(eds::lb_endpoint::HostIdentifier::Endpoint(
                            eds::Endpoint {
                                address: Some(core_pb::Address {
                                    address: Some(core_pb::address::Address::SocketAddress(
                                        core_pb::SocketAddress {
                                            address: a.ip().to_string(),
                                            port_specifier: Some(
                                                core_pb::socket_address::PortSpecifier::PortValue(
                                                    u32::from(a.port()),
                                                ),
                                            ),
                                            ..Default::default()
                                        },
                                    )),
                                }),
                                ..Default::default()
                            },
                        )),
                        load_balancing_weight: Some(
                            envoy_types::pb::google::protobuf::UInt32Value { value: 1 },
                        ),
                        ..Default::default()
                    }
                })
                .collect(),
            load_balancing_weight: Some(envoy_types::pb::google::protobuf::UInt32Value {
                value: 1,
            }),
            ..Default::default()
        })
        .collect();
    eds::ClusterLoadAssignment {
        cluster_name: cluster.to_owned(),
        endpoints: localities,
        ..Default::default()
    }
}
