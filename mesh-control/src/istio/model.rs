//! Istio's resource shapes (the subset the mesh supports), with Istio's field names.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `metadata`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Metadata {
    /// The resource's name (with its namespace, what Istio and errors call it by).
    #[serde(default)]
    pub name: String,
    /// Namespace (default `default`).
    #[serde(default)]
    pub namespace: Option<String>,
}

impl Metadata {
    /// The namespace, `default` when absent.
    pub fn ns(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

/// A port of a `ServiceEntry`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Port number.
    pub number: u32,
    /// Name, referenced by endpoint port maps.
    #[serde(default)]
    pub name: String,
    /// `HTTP`, `HTTP2`, `GRPC`, `TCP`...
    #[serde(default)]
    pub protocol: String,
    /// Port on the endpoints, when it differs.
    #[serde(default)]
    pub target_port: Option<u32>,
}

/// A workload address (ServiceEntry endpoint or WorkloadEntry spec).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntrySpec {
    /// IP address.
    pub address: String,
    /// Port name to port number on this workload.
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    /// Labels (subsets select on them).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `region/zone/subzone`.
    #[serde(default)]
    pub locality: String,
    /// Load-balancing weight.
    #[serde(default)]
    pub weight: Option<u32>,
    /// Service account (the SPIFFE identity's `sa`).
    #[serde(default)]
    pub service_account: Option<String>,
}

/// `workloadSelector` / `selector`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    /// ServiceEntry's `workloadSelector.labels`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Policies' `selector.matchLabels`.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl Selector {
    /// The labels, whichever key held them.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        if self.labels.is_empty() {
            &self.match_labels
        } else {
            &self.labels
        }
    }
}

/// `ServiceEntry.spec`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    /// Hosts.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Only `STATIC` is supported.
    #[serde(default)]
    pub resolution: Option<String>,
    /// Endpoints listed inline.
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntrySpec>,
    /// Selects WorkloadEntries.
    #[serde(default)]
    pub workload_selector: Option<Selector>,
}

/// A string match: exact, prefix or regex.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct StringMatch {
    /// Exact.
    #[serde(default)]
    pub exact: Option<String>,
    /// Prefix.
    #[serde(default)]
    pub prefix: Option<String>,
    /// RE2 regex (whole value).
    #[serde(default)]
    pub regex: Option<String>,
}

/// `HTTPMatchRequest`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    /// Path.
    #[serde(default)]
    pub uri: Option<StringMatch>,
    /// Headers (lower-case names).
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    /// Query parameters.
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    /// Method.
    #[serde(default)]
    pub method: Option<StringMatch>,
    /// Case-insensitive URI match.
    #[serde(default)]
    pub ignore_uri_case: bool,
}

/// `PortSelector`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct PortSelector {
    /// Number.
    pub number: u32,
}

/// `Destination`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Destination {
    /// Service host.
    pub host: String,
    /// Subset of a DestinationRule.
    #[serde(default)]
    pub subset: Option<String>,
    /// Port, required when the service has several.
    #[serde(default)]
    pub port: Option<PortSelector>,
}

/// `HTTPRouteDestination`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct RouteDestination {
    /// Where.
    pub destination: Destination,
    /// Weight (percent); absent means 100 for a single destination.
    #[serde(default)]
    pub weight: Option<u32>,
}

/// `HTTPRetry`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Attempts (retries after the first try, as Istio counts them).
    #[serde(default)]
    pub attempts: u32,
    /// Per-try timeout (`2s`, `500ms`).
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    /// Envoy retry_on list.
    #[serde(default)]
    pub retry_on: Option<String>,
}

/// `Percent`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Percent {
    /// 0..=100.
    pub value: f64,
}

/// `HTTPFaultInjection.Delay`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// Duration.
    pub fixed_delay: String,
    /// Fraction of requests.
    #[serde(default)]
    pub percentage: Option<Percent>,
}

/// `HTTPFaultInjection.Abort`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// HTTP status.
    #[serde(default)]
    pub http_status: Option<u32>,
    /// gRPC status name (`UNAVAILABLE`) or number.
    #[serde(default)]
    pub grpc_status: Option<serde_yaml_ng::Value>,
    /// Fraction of requests.
    #[serde(default)]
    pub percentage: Option<Percent>,
}

/// `HTTPFaultInjection`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Fault {
    /// Delay.
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    /// Abort.
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

/// `HTTPRewrite`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Rewrite {
    /// Replaces the matched URI prefix (or the whole path for an exact match).
    #[serde(default)]
    pub uri: Option<String>,
    /// New authority.
    #[serde(default)]
    pub authority: Option<String>,
}

/// Header operations of one direction.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct HeaderOps {
    /// Overwrite.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Append.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `Headers`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Headers {
    /// Request headers.
    #[serde(default)]
    pub request: Option<HeaderOps>,
    /// Response headers.
    #[serde(default)]
    pub response: Option<HeaderOps>,
}

/// `HTTPRoute`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    /// The route's name, as metrics, traces and errors report it.
    #[serde(default)]
    pub name: Option<String>,
    /// Matches (any); none matches everything.
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatch>,
    /// Destinations.
    #[serde(default)]
    pub route: Vec<RouteDestination>,
    /// Overall timeout.
    #[serde(default)]
    pub timeout: Option<String>,
    /// Retries.
    #[serde(default)]
    pub retries: Option<Retries>,
    /// Fault injection.
    #[serde(default)]
    pub fault: Option<Fault>,
    /// Mirror target.
    #[serde(default)]
    pub mirror: Option<Destination>,
    /// Mirrored fraction (default 100).
    #[serde(default)]
    pub mirror_percentage: Option<Percent>,
    /// Rewrite.
    #[serde(default)]
    pub rewrite: Option<Rewrite>,
    /// Header operations.
    #[serde(default)]
    pub headers: Option<Headers>,
}

/// `VirtualService.spec`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct VirtualServiceSpec {
    /// Hosts the rules apply to.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// HTTP rules, first match wins.
    #[serde(default)]
    pub http: Vec<HttpRoute>,
}

/// `LoadBalancerSettings.ConsistentHashLB.HTTPCookie`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct HttpCookie {
    /// Cookie name.
    pub name: String,
}

/// `ConsistentHashLB`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHash {
    /// Hash on a header.
    #[serde(default)]
    pub http_header_name: Option<String>,
    /// Hash on a cookie.
    #[serde(default)]
    pub http_cookie: Option<HttpCookie>,
    /// Hash on the source IP.
    #[serde(default)]
    pub use_source_ip: bool,
    /// Hash on a query parameter.
    #[serde(default)]
    pub http_query_parameter_name: Option<String>,
}

/// `LoadBalancerSettings`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    /// `ROUND_ROBIN`, `LEAST_REQUEST`, `RANDOM`.
    #[serde(default)]
    pub simple: Option<String>,
    /// Consistent hashing.
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHash>,
    /// Slow start for new endpoints (`warmup` wins when both are set).
    #[serde(default)]
    pub warmup_duration_secs: Option<String>,
    /// Slow start for new endpoints: duration, minimum weight percent, aggression.
    #[serde(default)]
    pub warmup: Option<Warmup>,
    /// Locality-aware balancing: weights by locality, or failover order.
    #[serde(default)]
    pub locality_lb_setting: Option<LocalityLbSetting>,
}

/// `LocalityLoadBalancerSetting`: how a client spreads requests over the localities of a
/// service's endpoints, relative to its own locality.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalityLbSetting {
    /// Per client locality (`from`), the share of traffic each endpoint locality (`to`) gets.
    #[serde(default)]
    pub distribute: Vec<LocalityDistribute>,
    /// Per client region, the region to fail over to before any other.
    #[serde(default)]
    pub failover: Vec<LocalityFailover>,
    /// Labels whose match with the client's orders endpoints into priorities.
    #[serde(default)]
    pub failover_priority: Vec<String>,
    /// `false` turns locality balancing off for the rule (also the mesh's default failover).
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// `LocalityLoadBalancerSetting.Distribute`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct LocalityDistribute {
    /// The client locality, `region/zone/subzone`, `*` allowed as the last segment.
    #[serde(default)]
    pub from: String,
    /// Endpoint locality pattern to weight (1-100, summing to 100).
    #[serde(default)]
    pub to: BTreeMap<String, u32>,
}

/// `LocalityLoadBalancerSetting.Failover`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct LocalityFailover {
    /// The client's region.
    #[serde(default)]
    pub from: String,
    /// The region its traffic fails over to first.
    #[serde(default)]
    pub to: String,
}

/// `LoadBalancerSettings.WarmupConfiguration`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Warmup {
    /// The window over which a new endpoint's weight grows to its full value (required).
    #[serde(default)]
    pub duration: Option<String>,
    /// The weight a new endpoint starts at, in percent of its full weight (default 10).
    #[serde(default)]
    pub minimum_percent: Option<f64>,
    /// How fast the weight grows: 1.0 linear (the default), higher starts slower.
    #[serde(default)]
    pub aggression: Option<f64>,
}

/// `ConnectionPoolSettings.TCPSettings`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TcpPool {
    /// Max connections.
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Connect timeout.
    #[serde(default)]
    pub connect_timeout: Option<String>,
}

/// `ConnectionPoolSettings.HTTPSettings`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpPool {
    /// Max pending requests.
    #[serde(default)]
    pub http1_max_pending_requests: Option<u32>,
    /// Max requests.
    #[serde(default)]
    pub http2_max_requests: Option<u32>,
    /// Max concurrent retries.
    #[serde(default)]
    pub max_retries: Option<u32>,
}

/// `ConnectionPoolSettings`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct ConnectionPool {
    /// TCP.
    #[serde(default)]
    pub tcp: Option<TcpPool>,
    /// HTTP.
    #[serde(default)]
    pub http: Option<HttpPool>,
}

/// `OutlierDetection`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx.
    #[serde(default, rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    /// Consecutive 502/503/504.
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    /// Sweep interval.
    #[serde(default)]
    pub interval: Option<String>,
    /// Base ejection time.
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    /// Max ejected percent.
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
}

/// `ClientTLSSettings`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Tls {
    /// `DISABLE`, `SIMPLE`, `MUTUAL` or `ISTIO_MUTUAL`.
    #[serde(default)]
    pub mode: Option<String>,
    /// SIMPLE/MUTUAL: PEM file of the roots to verify the server with (none: the system's).
    #[serde(default)]
    pub ca_certificates: Option<String>,
    /// MUTUAL: PEM file of the client certificate chain.
    #[serde(default)]
    pub client_certificate: Option<String>,
    /// MUTUAL: PEM file of the client private key.
    #[serde(default)]
    pub private_key: Option<String>,
    /// SIMPLE/MUTUAL: the server name sent (default: the service host).
    #[serde(default)]
    pub sni: Option<String>,
    /// SIMPLE/MUTUAL: the server certificate must carry one of these SANs (default: be valid
    /// for the SNI).
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

/// `TrafficPolicy`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// Balancing.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
    /// Limits.
    #[serde(default)]
    pub connection_pool: Option<ConnectionPool>,
    /// Ejection.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// Client TLS.
    #[serde(default)]
    pub tls: Option<Tls>,
    /// Overrides for one port of the service, section by section.
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

/// `TrafficPolicy.PortTrafficPolicy`: a port's own sections.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    /// The port these settings apply to (required).
    #[serde(default)]
    pub port: Option<PortSelector>,
    /// Balancing.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
    /// Limits.
    #[serde(default)]
    pub connection_pool: Option<ConnectionPool>,
    /// Ejection.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// Client TLS.
    #[serde(default)]
    pub tls: Option<Tls>,
}

/// `Subset`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    /// Name (`v1`).
    pub name: String,
    /// Endpoint labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Overrides the rule's policy.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// `DestinationRule.spec`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    /// Service host.
    pub host: String,
    /// Policy for the whole host.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    /// Subsets.
    #[serde(default)]
    pub subsets: Vec<Subset>,
}

/// `PeerAuthentication.MutualTLS`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct MutualTls {
    /// `STRICT`, `PERMISSIVE`, `DISABLE`.
    #[serde(default)]
    pub mode: Option<String>,
}

/// `PeerAuthentication.spec`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct PeerAuthenticationSpec {
    /// Workloads (none: the whole namespace, or the mesh in the root namespace).
    #[serde(default)]
    pub selector: Option<Selector>,
    /// Mode.
    #[serde(default)]
    pub mtls: Option<MutualTls>,
}

/// `Source`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Source {
    /// SPIFFE principals without the scheme: `cluster.local/ns/a/sa/b`.
    #[serde(default)]
    pub principals: Vec<String>,
    /// Namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
}

/// `Rule.From`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct From {
    /// Source.
    pub source: Source,
}

/// `Operation`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Operation {
    /// Paths (`/x`, `/x/*`, `*/y`).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Methods.
    #[serde(default)]
    pub methods: Vec<String>,
}

/// `Rule.To`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct To {
    /// Operation.
    pub operation: Operation,
}

/// `Rule`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Rule {
    /// Sources (any).
    #[serde(default)]
    pub from: Vec<From>,
    /// Operations (any).
    #[serde(default)]
    pub to: Vec<To>,
}

/// `AuthorizationPolicy.spec`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct AuthorizationPolicySpec {
    /// Workloads.
    #[serde(default)]
    pub selector: Option<Selector>,
    /// `ALLOW` (default) or `DENY`.
    #[serde(default)]
    pub action: Option<String>,
    /// Rules (any). `ALLOW` with no rules allows nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}
