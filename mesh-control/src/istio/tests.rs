//! Istio input: parsing, generation (checked by translating back with mesh-core) and
//! validation.

use mesh_core::config::{ClusterSpecifier, Discovery, LbPolicy, ListenerKind, RouteAction};
use mesh_core::xds::file;

use super::validate::{validate, Severity};
use super::*;

/// The seed VirtualService, exactly as written, with the registry and subsets it needs.
pub(crate) const SEED: &str = include_str!("../../../examples/mesh.yaml");

#[test]
fn seed_virtual_service_generates_a_90_10_split() {
    let config = parse(SEED, "seed.yaml").unwrap();
    assert_eq!(config.virtual_services.len(), 1);
    assert_eq!(config.virtual_services[0].origin.line, 58);
    let out = generate(&config, &Options::default()).unwrap();
    assert_eq!(out.listeners, vec!["frontend.prod.svc.cluster.local:80"]);
    // What mesh-core makes of it.
    let snap = file::snapshot_from_resources(&out.resources).unwrap();
    let rc = snap
        .routes_for_listener("frontend.prod.svc.cluster.local:80")
        .unwrap();
    let vh = rc
        .find_virtual_host("frontend.prod.svc.cluster.local")
        .unwrap();
    assert!(
        rc.find_virtual_host("frontend:80").is_some(),
        "short names are domains too"
    );
    let RouteAction::Forward(fwd) = &vh.routes[0].action else {
        panic!()
    };
    let ClusterSpecifier::Weighted(w) = &fwd.cluster else {
        panic!("{:?}", fwd.cluster)
    };
    let split: Vec<(&str, u32)> = w
        .clusters
        .iter()
        .map(|c| (c.name.as_str(), c.weight))
        .collect();
    assert_eq!(
        split,
        vec![
            ("outbound|80|v1|frontend.prod.svc.cluster.local", 90),
            ("outbound|80|v2|frontend.prod.svc.cluster.local", 10)
        ]
    );
    assert_eq!(fwd.timeout, None, "Istio's default: no route timeout");
    assert_eq!(
        fwd.retry_policy.as_ref().unwrap().num_retries,
        2,
        "Istio's default retries"
    );
    // Subset clusters carry the DestinationRule's policy and only their endpoints.
    let v1 = snap
        .cluster("outbound|80|v1|frontend.prod.svc.cluster.local")
        .unwrap();
    assert_eq!(v1.lb_policy, LbPolicy::RoundRobin);
    assert_eq!(v1.circuit_breakers.default.max_requests, 10);
    assert_eq!(v1.circuit_breakers.default.max_retries, 3);
    let od = v1.outlier_detection.as_ref().unwrap();
    assert_eq!(od.consecutive_5xx, Some((5, 100)));
    assert_eq!(od.max_ejection_percent, 50);
    assert!(od.success_rate.is_none());
    assert!(v1.tls.is_none(), "tls DISABLE");
    assert!(matches!(v1.discovery, Discovery::Eds { .. }));
    let eps = snap
        .endpoints_for_cluster("outbound|80|v2|frontend.prod.svc.cluster.local")
        .unwrap();
    let addrs: Vec<String> = eps
        .endpoints()
        .map(|(_, e)| e.address.to_string())
        .collect();
    assert_eq!(addrs, vec!["127.0.0.2:9082"]);
    assert_eq!(eps.localities[0].locality.zone, "zone-b");
    assert_eq!(
        snap.endpoints_for_cluster("outbound|80||frontend.prod.svc.cluster.local")
            .unwrap()
            .endpoints()
            .count(),
        2
    );
    // The server listener for the workload port (PERMISSIVE by default: TLS and plaintext chains).
    let server = &out.server_listeners;
    assert!(
        server.contains(&"xds.istio.io/grpc/lds/inbound/0.0.0.0:9081".to_string()),
        "{server:?}"
    );
    let l = snap
        .listener("xds.istio.io/grpc/lds/inbound/0.0.0.0:9081")
        .unwrap();
    let ListenerKind::Server(s) = &l.kind else {
        panic!()
    };
    assert_eq!(s.filter_chains.len(), 2);
    assert!(
        s.filter_chains[0]
            .tls
            .as_ref()
            .unwrap()
            .require_client_certificate
    );
    assert!(s.filter_chains[1].tls.is_none());
}

#[test]
fn mtls_rbac_and_route_features() {
    let extra = r#"
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: deny-legacy
  namespace: prod
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/legacy/sa/old"]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: allow-get
  namespace: prod
spec:
  selector:
    matchLabels:
      version: v1
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: ["GET"]
        paths: ["/api/*"]
"#;
    let seed = SEED.replace("    tls:\n      mode: DISABLE\n", "    tls:\n      mode: ISTIO_MUTUAL\n").replace(
        "  - route:\n    - destination:\n        host: frontend.prod.svc.cluster.local\n        subset: v1\n      weight: 90",
        "  - match:\n    - uri:\n        prefix: /api\n      headers:\n        x-canary:\n          exact: \"1\"\n    route:\n    - destination:\n        host: frontend.prod.svc.cluster.local\n        subset: v2\n    timeout: 3s\n    retries:\n      attempts: 4\n      perTryTimeout: 500ms\n      retryOn: 5xx,reset\n    fault:\n      abort:\n        httpStatus: 503\n        percentage:\n          value: 25\n    mirror:\n      host: frontend.prod.svc.cluster.local\n      subset: v1\n    mirrorPercentage:\n      value: 10\n    rewrite:\n      uri: /v2/api\n    headers:\n      request:\n        set:\n          x-mesh: \"yes\"\n  - route:\n    - destination:\n        host: frontend.prod.svc.cluster.local\n        subset: v1\n      weight: 90",
    );
    let config = parse(&format!("{seed}{extra}"), "all.yaml").unwrap();
    let out = generate(&config, &Options::default()).unwrap();
    let snap = file::snapshot_from_resources(&out.resources).unwrap();
    // mTLS on (ISTIO_MUTUAL): SPIFFE SAN of the endpoints' service account.
    let v1 = snap
        .cluster("outbound|80|v1|frontend.prod.svc.cluster.local")
        .unwrap();
    let tls = v1.tls.as_ref().unwrap();
    assert_eq!(
        tls.san_matchers[0].matcher.kind,
        mesh_core::config::StringMatch::Exact("spiffe://cluster.local/ns/prod/sa/default".into())
    );
    assert!(
        matches!(&tls.identity, Some(mesh_core::config::CertSource::Provider { instance, .. }) if instance == "default")
    );
    // Route features.
    let rc = snap
        .routes_for_listener("frontend.prod.svc.cluster.local:80")
        .unwrap();
    let r = &rc.virtual_hosts[0].routes[0];
    assert_eq!(r.matcher.headers[0].name, "x-canary");
    let RouteAction::Forward(fwd) = &r.action else {
        panic!()
    };
    assert_eq!(fwd.timeout, Some(std::time::Duration::from_secs(3)));
    let rp = fwd.retry_policy.as_ref().unwrap();
    assert_eq!(
        (rp.num_retries, rp.per_try_timeout),
        (4, Some(std::time::Duration::from_millis(500)))
    );
    assert_eq!(rp.retry_on.names(), "5xx,reset");
    assert_eq!(
        fwd.mirrors[0].cluster,
        "outbound|80|v1|frontend.prod.svc.cluster.local"
    );
    assert_eq!(fwd.mirrors[0].fraction.as_per_million(), 100_000);
    assert_eq!(fwd.prefix_rewrite.as_deref(), Some("/v2/api"));
    let fault = r.fault.as_ref().unwrap();
    assert_eq!(
        fault.abort.unwrap().kind,
        mesh_core::config::AbortKind::Http(503)
    );
    assert_eq!(fault.abort.unwrap().fraction.as_per_million(), 250_000);
    assert_eq!(r.request_headers.add[0].name.as_str(), "x-mesh");
    // STRICT server listener with DENY then ALLOW RBAC.
    let l = snap
        .listener("xds.istio.io/grpc/lds/inbound/0.0.0.0:9081")
        .unwrap();
    let ListenerKind::Server(s) = &l.kind else {
        panic!()
    };
    assert_eq!(s.filter_chains.len(), 1);
    let hcm = s.filter_chains[0].http.as_ref().unwrap();
    let kinds: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        kinds,
        vec![
            "envoy.filters.http.rbac.deny",
            "envoy.filters.http.rbac.allow",
            "envoy.filters.http.router"
        ]
    );
    // v2's workload is not selected by the ALLOW policy: only DENY applies there.
    let l2 = snap
        .listener("xds.istio.io/grpc/lds/inbound/0.0.0.0:9082")
        .unwrap();
    let ListenerKind::Server(s2) = &l2.kind else {
        panic!()
    };
    assert_eq!(
        s2.filter_chains[0]
            .http
            .as_ref()
            .unwrap()
            .http_filters
            .len(),
        2
    );
}

#[test]
fn errors_name_file_line_and_field() {
    let bad = SEED.replace(
        "subset: v2\n      weight: 10",
        "subset: v3\n      weight: 10",
    );
    let errs = generate(&parse(&bad, "seed.yaml").unwrap(), &Options::default()).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(
        errs[0].to_string(),
        "seed.yaml:71: VirtualService frontend-vs: subset \"v3\" of frontend.prod.svc.cluster.local is not defined by any DestinationRule"
    );
    let bad = SEED.replace("interval: 10s", "interval: ten");
    let errs = generate(&parse(&bad, "seed.yaml").unwrap(), &Options::default()).unwrap_err();
    assert_eq!(
        errs[0].to_string(),
        "seed.yaml:45: invalid duration \"ten\" (use e.g. 500ms, 2s, 1m)"
    );
    let errs = parse("kind: Gateway\nmetadata: {name: x}\nspec: {}\n", "gw.yaml").unwrap_err();
    assert!(
        errs[0]
            .to_string()
            .starts_with("gw.yaml:1: unsupported kind \"Gateway\""),
        "{}",
        errs[0]
    );
    let errs = parse("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\nspec:\n  hosts: 5\n", "vs.yaml")
        .unwrap_err();
    assert!(errs[0].to_string().starts_with("vs.yaml:5:"), "{}", errs[0]);
    let errs = parse("a: [\n", "broken.yaml").unwrap_err();
    assert!(
        errs[0].to_string().starts_with("broken.yaml:"),
        "{}",
        errs[0]
    );
}

#[test]
fn validate_reports_like_istioctl_analyze() {
    assert!(validate(&parse(SEED, "seed.yaml").unwrap(), &Options::default()).is_empty());
    let bad = SEED
        .replace("weight: 10", "weight: 20")
        .replace("  - name: v2\n    labels:\n      version: v2\n", "  - name: v2\n    labels:\n      version: v2\n  - name: canary\n    labels:\n      version: v9\n")
        + "  - route:\n    - destination:\n        host: frontend.prod.svc.cluster.local\n";
    let findings = validate(&parse(&bad, "seed.yaml").unwrap(), &Options::default());
    let lines: Vec<String> = findings.iter().map(|f| f.to_string()).collect();
    assert_eq!(findings[0].severity, Severity::Error);
    assert!(lines.contains(&"seed.yaml:69: error: VirtualService frontend-vs: http[0] route weights add up to 110, not 100".to_string()), "{lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains(
            "warning: DestinationRule frontend-dr: subset \"canary\" selects no endpoints"
        )),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("warning: VirtualService frontend-vs: http[1] is never used")),
        "{lines:#?}"
    );
}

#[test]
fn line_lookup_follows_indentation() {
    let o = Origin {
        file: "f".into(),
        line: 10,
        text: "spec:\n  http:\n  - route:\n    - destination:\n        host: a\n      weight: 1\n  - route: []\n".into(),
    };
    assert_eq!(o.line_of(&[Seg::Key("spec")]), 10);
    assert_eq!(
        o.line_of(&[
            Seg::Key("spec"),
            Seg::Key("http"),
            Seg::Idx(0),
            Seg::Key("route"),
            Seg::Idx(0),
            Seg::Key("weight")
        ]),
        15
    );
    assert_eq!(
        o.line_of(&[Seg::Key("spec"), Seg::Key("http"), Seg::Idx(1)]),
        16
    );
    assert_eq!(
        o.line_of(&[
            Seg::Key("spec"),
            Seg::Key("http"),
            Seg::Idx(0),
            Seg::Key("route"),
            Seg::Idx(0),
            Seg::Key("destination"),
            Seg::Key("host")
        ]),
        14
    );
}

#[test]
fn durations() {
    use std::time::Duration;
    assert_eq!(
        generate::parse_duration("500ms"),
        Some(Duration::from_millis(500))
    );
    assert_eq!(
        generate::parse_duration("1.5s"),
        Some(Duration::from_millis(1500))
    );
    assert_eq!(
        generate::parse_duration("2m"),
        Some(Duration::from_secs(120))
    );
    assert_eq!(generate::parse_duration("10"), None);
    assert_eq!(generate::parse_duration("-1s"), None);
}

#[test]
fn server_listener_modes_map_to_tls_modes() {
    // STRICT mesh-wide, PERMISSIVE by default, DISABLE by the seed's own policy.
    let strict = format!("{SEED}---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: istio-system}}\nspec: {{mtls: {{mode: STRICT}}}}\n");
    for (yaml, want) in [(SEED.to_string(), "Permissive"), (strict, "Strict")] {
        let out = generate(&parse(&yaml, "m.yaml").unwrap(), &Options::default()).unwrap();
        let snap = file::snapshot_from_resources(&out.resources).unwrap();
        let l = snap
            .listener("xds.istio.io/grpc/lds/inbound/0.0.0.0:9081")
            .unwrap();
        let ListenerKind::Server(s) = &l.kind else {
            panic!()
        };
        let chains: Vec<_> = s
            .filter_chains
            .iter()
            .map(|c| c.tls.as_ref().map(|t| t.require_client_certificate))
            .collect();
        match want {
            "Strict" => assert_eq!(chains, vec![Some(true)]),
            _ => assert_eq!(chains, vec![Some(true), None]),
        }
    }
}

/// As Istio's generator for proxyless gRPC: TLS only when a DestinationRule asks for it
/// (no auto mTLS, even towards STRICT workloads, which `validate` warns about); for Envoy
/// nodes the same TLS comes over SDS instead of certificate-provider instances.
#[test]
fn mtls_only_when_asked_and_envoy_gets_sds() {
    let strict = r#"
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"#;
    let seed = SEED.replace("    tls:\n      mode: DISABLE\n", "");
    let config = parse(&format!("{seed}{strict}"), "all.yaml").unwrap();
    let out = generate(&config, &Options::default()).unwrap();
    let snap = file::snapshot_from_resources(&out.resources).unwrap();
    let v1 = snap
        .cluster("outbound|80|v1|frontend.prod.svc.cluster.local")
        .unwrap();
    assert!(v1.tls.is_none(), "no DestinationRule tls: plaintext");
    let findings = crate::istio::validate::validate(&config, &Options::default());
    assert!(
        findings
            .iter()
            .any(|f| f.severity == crate::istio::validate::Severity::Warning
                && f.error.message.contains("STRICT")
                && f.error.message.contains("ISTIO_MUTUAL")),
        "{findings:#?}"
    );

    let mutual = SEED.replace(
        "    tls:\n      mode: DISABLE\n",
        "    tls:\n      mode: ISTIO_MUTUAL\n",
    );
    let config = parse(&format!("{mutual}{strict}"), "all.yaml").unwrap();
    assert!(
        crate::istio::validate::validate(&config, &Options::default())
            .iter()
            .all(|f| !f.error.message.contains("STRICT"))
    );
    let envoy = Options {
        flavour: crate::istio::Flavour::Envoy,
        ..Options::default()
    };
    let out = generate(&config, &envoy).unwrap();
    let snap = file::snapshot_from_resources(&out.resources).unwrap();
    let tls = snap
        .cluster("outbound|80|v1|frontend.prod.svc.cluster.local")
        .unwrap()
        .tls
        .clone()
        .unwrap();
    assert_eq!(
        tls.identity,
        Some(mesh_core::config::CertSource::Sds {
            name: "default".into()
        })
    );
    assert_eq!(
        tls.validation,
        Some(mesh_core::config::CertSource::Sds {
            name: "ROOTCA".into()
        })
    );
    assert!(!tls.san_matchers.is_empty(), "SANs stay with the SDS roots");
}

/// Every field is honoured or refused at file:line with its path; nothing is dropped.
#[test]
fn fields_meshctl_does_not_honour_are_refused_at_their_line() {
    let text = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
    corsPolicy:
      allowOrigins:
      - exact: https://example.com
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-admins}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/a/sa/b]}
    when:
    - key: request.headers[x-admin]
      values: ["1"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext}
spec:
  hosts: [api.example.com]
  location: MESH_EXTERNAL
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, labels: {version: v1}}]
  colour: blue
"#;
    let errors = parse(text, "policy.yaml").unwrap_err();
    let shown: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        shown,
        vec![
            "policy.yaml:9: VirtualService reviews: spec.http[0].corsPolicy: not supported by meshctl",
            // An ALLOW rule whose condition were dropped would allow more than it says.
            "policy.yaml:21: AuthorizationPolicy allow-admins: spec.rules[0].when: not supported by meshctl",
            "policy.yaml:34: ServiceEntry ext: spec.colour: unknown field (not in Istio's schema for ServiceEntry)",
        ],
        "{shown:#?}"
    );
    // `location` is ignored for a stated reason: the ServiceEntry alone parses.
    let se = text
        .split("---\n")
        .nth(2)
        .unwrap()
        .replace("  colour: blue\n", "");
    parse(&se, "se.yaml").unwrap();
}

/// ServiceEntry `resolution: DNS` / `DNS_ROUND_ROBIN` become STRICT_DNS / LOGICAL_DNS clusters
/// with the names inline (no EDS), as Istio generates them; the mesh's client resolves them.
#[test]
fn dns_service_entries_become_dns_clusters() {
    let text = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: prod}
spec:
  hosts: [httpbin.example.com]
  location: MESH_EXTERNAL
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: prod}
spec:
  hosts: [api.internal]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  resolution: DNS_ROUND_ROBIN
  endpoints: [{address: api-0.internal}]
"#;
    let config = parse(text, "dns.yaml").unwrap();
    let out = generate(&config, &Options::default()).unwrap();
    let snap = file::snapshot_from_resources(&out.resources).unwrap();
    let strict = snap.cluster("outbound|80||httpbin.example.com").unwrap();
    let mesh_core::config::Discovery::Dns(d) = &strict.discovery else {
        panic!("{:?}", strict.discovery)
    };
    assert!(!d.logical);
    assert_eq!(d.hosts(), vec!["httpbin.example.com"]);
    assert_eq!(d.localities[0].targets[0].port, 80);
    let logical = snap.cluster("outbound|8080||api.internal").unwrap();
    let mesh_core::config::Discovery::Dns(d) = &logical.discovery else {
        panic!()
    };
    assert!(d.logical);
    assert_eq!(d.hosts(), vec!["api-0.internal"]);
    assert!(
        snap.endpoint_assignments().is_empty(),
        "no EDS for DNS clusters"
    );
    assert!(
        out.server_listeners.is_empty(),
        "external names get no server listener"
    );
    let findings = crate::istio::validate::validate(&config, &Options::default());
    assert!(
        findings
            .iter()
            .any(|f| f.error.line == 8 && f.error.message.contains("STRICT_DNS")),
        "{findings:#?}"
    );

    let two = text.replace(
        "endpoints: [{address: api-0.internal}]",
        "endpoints: [{address: api-0.internal}, {address: api-1.internal}]",
    );
    let errors = generate(&parse(&two, "dns.yaml").unwrap(), &Options::default()).unwrap_err();
    assert!(
        errors.iter().any(|e| e
            .to_string()
            .contains("DNS_ROUND_ROBIN needs exactly one endpoint")),
        "{errors:?}"
    );
}

#[test]
fn port_level_settings_override_their_port_only() {
    let text = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: prod}
spec:
  hosts: [api.prod.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP}, {number: 9090, name: grpc, protocol: GRPC}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: prod}
spec:
  host: api
  trafficPolicy:
    connectionPool: {http: {http2MaxRequests: 100}}
    loadBalancer: {simple: ROUND_ROBIN}
    portLevelSettings:
    - port: {number: 9090}
      loadBalancer: {simple: RANDOM}
      outlierDetection: {consecutive5xxErrors: 7}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      portLevelSettings:
      - port: {number: 8080}
        connectionPool: {http: {http2MaxRequests: 5}}
"#;
    let config = parse(text, "ports.yaml").unwrap();
    let out = generate(&config, &Options::default()).unwrap();
    let snap = file::snapshot_from_resources(&out.resources).unwrap();
    let c = |name: &str| snap.cluster(name).unwrap_or_else(|| panic!("{name}"));
    // Port 8080: the host policy; its subset overrides only the connection pool.
    let http = c("outbound|8080||api.prod.svc.cluster.local");
    assert_eq!(http.lb_policy, LbPolicy::RoundRobin);
    assert_eq!(http.circuit_breakers.default.max_requests, 100);
    assert!(http.outlier_detection.is_none());
    let http_v1 = c("outbound|8080|v1|api.prod.svc.cluster.local");
    assert_eq!(http_v1.lb_policy, LbPolicy::RoundRobin);
    assert_eq!(http_v1.circuit_breakers.default.max_requests, 5);
    // Port 9090: the port's sections replace the host's; the rest stays.
    for name in [
        "outbound|9090||api.prod.svc.cluster.local",
        "outbound|9090|v1|api.prod.svc.cluster.local",
    ] {
        let grpc = c(name);
        assert_eq!(grpc.lb_policy, LbPolicy::Random, "{name}");
        assert_eq!(grpc.circuit_breakers.default.max_requests, 100, "{name}");
        assert_eq!(
            grpc.outlier_detection.as_ref().unwrap().consecutive_5xx,
            Some((7, 100)),
            "{name}"
        );
    }

    // A port-level entry without a port is an error at its line.
    let no_port = text.replace(
        "    - port: {number: 9090}\n      loadBalancer",
        "    - loadBalancer",
    );
    let errors =
        generate(&parse(&no_port, "ports.yaml").unwrap(), &Options::default()).unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.line == 19 && e.to_string().contains("portLevelSettings[0].port")),
        "{errors:?}"
    );
}

#[test]
fn warmup_becomes_slow_start_and_bad_warmups_are_errors_at_their_line() {
    let text = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: prod}
spec:
  hosts: [api.prod.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP}, {number: 9090, name: grpc, protocol: GRPC}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: prod}
spec:
  host: api
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
      warmup: {duration: 30s, minimumPercent: 20, aggression: 2}
    portLevelSettings:
    - port: {number: 9090}
      loadBalancer: {simple: LEAST_REQUEST, warmupDurationSecs: 45s}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer: {simple: RANDOM}
"#;
    let config = parse(text, "warmup.yaml").unwrap();
    let out = generate(&config, &Options::default()).unwrap();
    let snap = file::snapshot_from_resources(&out.resources).unwrap();
    let c = |name: &str| snap.cluster(name).unwrap_or_else(|| panic!("{name}"));
    let http = c("outbound|8080||api.prod.svc.cluster.local");
    assert_eq!(http.lb_policy, LbPolicy::RoundRobin);
    let ss = http.slow_start.clone().expect("warmup on the host policy");
    assert_eq!(ss.window, std::time::Duration::from_secs(30));
    assert_eq!(ss.aggression, 2.0);
    assert!((ss.min_weight - 0.2).abs() < 1e-9);
    // Halfway through with aggression 2: sqrt(0.5) of the weight.
    assert!((ss.factor(std::time::Duration::from_secs(15)) - 0.5f64.sqrt()).abs() < 1e-9);
    let grpc = c("outbound|9090||api.prod.svc.cluster.local");
    assert!(matches!(grpc.lb_policy, LbPolicy::LeastRequest { .. }));
    let ss = grpc
        .slow_start
        .clone()
        .expect("warmupDurationSecs on the port");
    assert_eq!(ss.window, std::time::Duration::from_secs(45));
    assert_eq!(
        (ss.aggression, ss.min_weight),
        (1.0, 0.1),
        "Envoy's defaults"
    );
    // The subset's loadBalancer replaces the host's: RANDOM, no warmup.
    let v1 = c("outbound|8080|v1|api.prod.svc.cluster.local");
    assert_eq!(v1.lb_policy, LbPolicy::Random);
    assert!(v1.slow_start.is_none());
    // validate says that proxyless gRPC clients will not warm endpoints up.
    let findings = validate(&config, &Options::default());
    assert!(
        findings
            .iter()
            .any(|f| f.to_string().contains("no slow start")),
        "{findings:?}"
    );

    // Each bad warmup is an error naming the field, at its line.
    let cases = [
        (
            "simple: ROUND_ROBIN\n      warmup",
            "simple: RANDOM\n      warmup",
            18,
            "loadBalancer.warmup: slow start applies to ROUND_ROBIN and LEAST_REQUEST only",
        ),
        ("duration: 30s, ", "", 18, "warmup.duration: is required"),
        ("duration: 30s", "duration: soon", 18, "invalid duration"),
        (
            "minimumPercent: 20",
            "minimumPercent: 150",
            18,
            "minimumPercent: must be 0-100",
        ),
        (
            "aggression: 2",
            "aggression: 0",
            18,
            "aggression: must be greater than 0",
        ),
        (
            "warmupDurationSecs: 45s",
            "warmupDurationSecs: 0s",
            21,
            "warmupDurationSecs: \"0s\" is shorter than 1ms",
        ),
    ];
    expect_errors_at(text, &cases);
}

#[test]
fn locality_settings_are_checked_at_their_line() {
    let text = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: prod}
spec:
  hosts: [api.prod.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, locality: us-east/a/1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: prod}
spec:
  host: api
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3}
    loadBalancer:
      localityLbSetting:
        failover: [{from: us-east, to: eu-west}]
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer:
        localityLbSetting:
          distribute:
          - from: us-east/*
            to: {"us-east/*": 60, "eu-west/*": 40}
"#;
    let config = parse(text, "locality.yaml").unwrap();
    let out = generate(&config, &Options::default()).unwrap();
    // The host cluster and the subset's each get a per-client assignment; the subset's
    // cluster weights localities.
    let names: Vec<&str> = out.per_node.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "outbound|8080||api.prod.svc.cluster.local",
            "outbound|8080|v1|api.prod.svc.cluster.local"
        ]
    );
    let snap = file::snapshot_from_resources(&out.resources).unwrap();
    assert!(
        !snap
            .cluster("outbound|8080||api.prod.svc.cluster.local")
            .unwrap()
            .locality_weighted
    );
    assert!(
        snap.cluster("outbound|8080|v1|api.prod.svc.cluster.local")
            .unwrap()
            .locality_weighted
    );

    let cases = [
        (
            "    outlierDetection: {consecutive5xxErrors: 3}\n",
            "",
            18,
            "spec.trafficPolicy.loadBalancer.localityLbSetting.failover: needs outlierDetection",
        ),
        (
            "to: eu-west}",
            "to: us-east}",
            19,
            "localityLbSetting.failover[0].to: fails \"us-east\" over to itself",
        ),
        (
            "\"eu-west/*\": 40",
            "\"eu-west/*\": 30",
            28,
            "spec.subsets[0].trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to: weights sum to 90, not 100",
        ),
        (
            "resolution: STATIC",
            "resolution: DNS",
            13,
            "localityLbSetting applies to services with endpoints",
        ),
    ];
    expect_errors_at(text, &cases);
}

/// For each `(from, to, line, message)`: `text` with `from` replaced by `to` fails to generate
/// with an error at `line` that contains `message`.
fn expect_errors_at(text: &str, cases: &[(&str, &str, usize, &str)]) {
    for &(from, to, line, message) in cases {
        let bad = text.replace(from, to);
        assert_ne!(bad, text, "{from}");
        let errors =
            generate(&parse(&bad, "case.yaml").unwrap(), &Options::default()).expect_err(message);
        assert!(
            errors
                .iter()
                .any(|e| e.line == line && e.to_string().contains(message)),
            "{message}: {errors:?}"
        );
    }
}
