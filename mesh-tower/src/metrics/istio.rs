//! Istio's standard metrics, opt-in (`Metrics::istio`), so that
//! Istio's Grafana dashboards and Kiali work for proxyless services:
//! `istio_requests_total`, `istio_request_duration_milliseconds` (Istio's buckets),
//! `istio_request_bytes` and `istio_response_bytes`, with Istio's labels (`reporter`,
//! `source_*`, `destination_*`, `request_protocol`, `response_code`,
//! `grpc_response_status`, `response_flags`, `connection_security_policy`).
//!
//! The labels come from the workload's own description ([`Workload`], read from the node
//! metadata Istio writes into the bootstrap: `WORKLOAD_NAME`, `NAMESPACE`, `LABELS`,
//! `CLUSTER_ID`), from the verified peer identity (mTLS), from the route's cluster
//! (`outbound|PORT|SUBSET|HOST`), and from the peer's own description, exchanged as Istio's
//! sidecars do: each request and response carries `x-envoy-peer-metadata-id` and
//! `x-envoy-peer-metadata` (a base64 `google.protobuf.Struct`), so a mesh service and an
//! Envoy sidecar name each other. What is not known is `unknown`, as in Istio.
//!
//! Sizes are the bodies' sizes when known at the head (`Content-Length` or a body of known
//! length); a streamed body of unknown length counts what its head says (0).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use http::{HeaderMap, HeaderName, HeaderValue};
use prost::Message as _;

/// Istio's duration buckets, in milliseconds.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's size buckets, in bytes.
pub const SIZE_BUCKETS: [f64; 9] = [
    1.0,
    10.0,
    100.0,
    1000.0,
    10000.0,
    100000.0,
    1000000.0,
    10000000.0,
    100000000.0,
];

/// The peer-metadata id header of Istio's metadata exchange.
pub const PEER_METADATA_ID: HeaderName = HeaderName::from_static("x-envoy-peer-metadata-id");
/// The peer-metadata header of Istio's metadata exchange.
pub const PEER_METADATA: HeaderName = HeaderName::from_static("x-envoy-peer-metadata");

const UNKNOWN: &str = "unknown";

/// A workload as Istio's telemetry names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// The workload (deployment) name: `source_workload` / `destination_workload`.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its `app` label (and canonical service).
    pub app: String,
    /// Its `version` label (and canonical revision).
    pub version: String,
    /// The cluster it runs in (`CLUSTER_ID`).
    pub cluster: String,
    /// Its SPIFFE identity, if it has one.
    pub principal: Option<String>,
    /// The service it serves (`destination_service` of its inbound requests), a host name
    /// such as `reviews.prod.svc.cluster.local`.
    pub service: String,
    /// The node id (sent as `x-envoy-peer-metadata-id`).
    pub node_id: String,
}

fn string_field<'a>(s: &'a Struct, key: &str) -> Option<&'a str> {
    match s.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(v) if !v.is_empty() => Some(v),
        _ => None,
    }
}

fn struct_field<'a>(s: &'a Struct, key: &str) -> Option<&'a Struct> {
    match s.fields.get(key)?.kind.as_ref()? {
        Kind::StructValue(v) => Some(v),
        _ => None,
    }
}

fn string_value(v: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(v.to_owned())),
    }
}

impl Workload {
    /// From the node metadata Istio writes into a proxyless bootstrap (`WORKLOAD_NAME`,
    /// `NAMESPACE`, `LABELS` with `app`/`version` or Istio's canonical-name labels,
    /// `CLUSTER_ID`); what is missing is `unknown`. Its `service` defaults to
    /// `APP.NAMESPACE.svc.cluster.local`.
    pub fn from_node(node: &envoy_types::pb::envoy::config::core::v3::Node) -> Self {
        let empty = Struct::default();
        let md = node.metadata.as_ref().unwrap_or(&empty);
        let mut w = Self::from_struct(md);
        w.node_id = node.id.clone();
        w
    }

    fn from_struct(md: &Struct) -> Self {
        let labels = struct_field(md, "LABELS");
        let label = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| labels.and_then(|l| string_field(l, k)))
                .map(str::to_owned)
        };
        let name = string_field(md, "WORKLOAD_NAME")
            .unwrap_or(UNKNOWN)
            .to_owned();
        let namespace = string_field(md, "NAMESPACE").unwrap_or(UNKNOWN).to_owned();
        let app =
            label(&["service.istio.io/canonical-name", "app"]).unwrap_or_else(|| name.clone());
        let version = label(&["service.istio.io/canonical-revision", "version"])
            .unwrap_or_else(|| "latest".to_owned());
        let service = format!("{app}.{namespace}.svc.cluster.local");
        Self {
            cluster: string_field(md, "CLUSTER_ID")
                .unwrap_or("Kubernetes")
                .to_owned(),
            principal: None,
            service,
            node_id: String::new(),
            name,
            namespace,
            app,
            version,
        }
    }

    /// With this SPIFFE identity.
    pub fn principal(mut self, id: impl Into<String>) -> Self {
        self.principal = Some(id.into());
        self
    }

    /// Serving this service (host name).
    pub fn service(mut self, host: impl Into<String>) -> Self {
        self.service = host.into();
        self
    }

    /// The peer metadata Istio's sidecars exchange: a `google.protobuf.Struct`.
    fn to_struct(&self) -> Struct {
        let labels = strings([
            ("app", &self.app),
            ("version", &self.version),
            ("service.istio.io/canonical-name", &self.app),
            ("service.istio.io/canonical-revision", &self.version),
        ]);
        let mut md = strings([
            ("WORKLOAD_NAME", &self.name),
            ("NAMESPACE", &self.namespace),
            ("CLUSTER_ID", &self.cluster),
            ("NAME", &self.name),
        ]);
        md.fields.insert(
            "LABELS".to_owned(),
            Value {
                kind: Some(Kind::StructValue(labels)),
            },
        );
        md
    }
}

/// A `Struct` of string fields.
fn strings<const N: usize>(fields: [(&str, &String); N]) -> Struct {
    Struct {
        fields: fields
            .into_iter()
            .map(|(k, v)| (k.to_owned(), string_value(v)))
            .collect(),
    }
}

/// A peer's description, from its metadata-exchange headers.
fn peer_from(headers: &HeaderMap) -> Option<Workload> {
    let raw = headers.get(&PEER_METADATA)?.as_bytes();
    let bytes = base64::engine::general_purpose::STANDARD.decode(raw).ok()?;
    let md = Struct::decode(bytes.as_slice()).ok()?;
    Some(Workload::from_struct(&md))
}

/// The labels of one series, in [`LABELS`] order.
pub(crate) type Key = [Arc<str>; LABELS.len()];

/// Istio's label names, in the order of a series key.
pub const LABELS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// One series: a count and three histograms.
#[derive(Debug, Default)]
pub(crate) struct IstioSeries {
    pub(crate) requests: AtomicU64,
    pub(crate) duration: Histogram<{ DURATION_BUCKETS_MS.len() + 1 }>,
    pub(crate) request_bytes: Histogram<{ SIZE_BUCKETS.len() + 1 }>,
    pub(crate) response_bytes: Histogram<{ SIZE_BUCKETS.len() + 1 }>,
}

/// A histogram over fixed buckets (the last is +Inf).
#[derive(Debug)]
pub(crate) struct Histogram<const N: usize> {
    pub(crate) buckets: [AtomicU64; N],
    /// The sum, in thousandths of the unit (milliseconds: microseconds; bytes: milli-bytes).
    pub(crate) sum_milli: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_milli: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Histogram<N> {
    fn record(&self, bounds: &[f64], v: f64) {
        let i = bounds.iter().position(|b| v <= *b).unwrap_or(bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_milli
            .fetch_add((v * 1000.0) as u64, Ordering::Relaxed);
    }

    /// Per-bucket `(upper bound, count)` pairs (prometheus-client's encoder makes them
    /// cumulative), the sum and the count.
    pub(crate) fn snapshot(&self, bounds: &[f64]) -> (Vec<(f64, u64)>, f64, u64) {
        let mut total = 0;
        let mut out = Vec::with_capacity(N);
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            total += n;
            out.push((bounds.get(i).copied().unwrap_or(f64::INFINITY), n));
        }
        let sum = self.sum_milli.load(Ordering::Relaxed) as f64 / 1000.0;
        (out, sum, total)
    }
}

/// Istio's telemetry of one workload.
#[derive(Debug)]
pub(crate) struct Istio {
    pub(crate) workload: Workload,
    mx_id: Option<HeaderValue>,
    mx: HeaderValue,
    pub(crate) series: Mutex<HashMap<Key, Arc<IstioSeries>>>,
}

impl Istio {
    pub(crate) fn new(workload: Workload) -> Self {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(workload.to_struct().encode_to_vec());
        Self {
            mx_id: HeaderValue::from_str(&workload.node_id).ok(),
            // Correctness: base64 is always a valid header value.
            mx: HeaderValue::from_str(&encoded).expect("base64 header"),
            workload,
            series: Mutex::new(HashMap::new()),
        }
    }

    /// Announces this workload on a request or a response (Istio's metadata exchange).
    pub(crate) fn announce(&self, headers: &mut HeaderMap) {
        headers.insert(PEER_METADATA, self.mx.clone());
        if let Some(id) = &self.mx_id {
            headers.insert(PEER_METADATA_ID, id.clone());
        }
    }
}

/// Namespace of a SPIFFE identity `spiffe://TD/ns/NS/sa/SA`.
fn spiffe_namespace(id: &str) -> Option<&str> {
    let path = id.strip_prefix("spiffe://")?.split_once('/')?.1;
    let mut parts = path.split('/');
    match (parts.next(), parts.next()) {
        (Some("ns"), Some(ns)) => Some(ns),
        _ => None,
    }
}

/// What a request's labels need, taken at its head.
#[derive(Debug)]
pub(crate) struct Call {
    istio: Arc<Istio>,
    outbound: bool,
    /// The other side, from its metadata-exchange headers (the request's inbound, the
    /// response's outbound).
    peer: Option<Workload>,
    peer_principal: Option<String>,
    cluster: String,
    grpc: bool,
    request_bytes: u64,
    response_bytes: u64,
    /// The status and response flags of a reply the mesh made itself.
    local: Option<(u16, &'static str)>,
}

impl Call {
    /// The request failed in the mesh: the status the caller got and Envoy's flag for it.
    pub(crate) fn local_reply(&mut self, e: &crate::error::BoxError) {
        let status = e
            .downcast_ref::<crate::MeshError>()
            .map_or(503, |m| m.status().as_u16());
        self.local = Some((status, response_flags(e)));
    }

    /// The caller went away before the response ended.
    pub(crate) fn cancelled(&mut self) {
        self.local.get_or_insert((0, "DC"));
    }

    /// At the request head: an inbound request's peer and size; an outbound request gets
    /// this workload's metadata-exchange headers.
    pub(crate) fn start<B: http_body::Body>(
        istio: &Arc<Istio>,
        outbound: bool,
        req: &mut http::Request<B>,
        cluster: &str,
    ) -> Self {
        let grpc = crate::body::grpc::is_grpc(req.headers());
        let request_bytes = body_size(req.headers(), req.body());
        let (peer, peer_principal) = if outbound {
            istio.announce(req.headers_mut());
            (None, None)
        } else {
            let principal = req
                .extensions()
                .get::<crate::ext::PeerIdentity>()
                .and_then(|p| p.0.as_ref())
                .map(|id| id.as_str().to_owned());
            (peer_from(req.headers()), principal)
        };
        Self {
            istio: istio.clone(),
            outbound,
            peer,
            peer_principal,
            cluster: cluster.to_owned(),
            grpc,
            request_bytes,
            response_bytes: 0,
            local: None,
        }
    }

    /// At the response head: an outbound response's peer and size; an inbound response
    /// gets this workload's metadata-exchange headers.
    pub(crate) fn respond<B: http_body::Body>(&mut self, resp: &mut http::Response<B>) {
        self.response_bytes = body_size(resp.headers(), resp.body());
        if self.outbound {
            self.peer = peer_from(resp.headers());
        } else {
            self.istio.announce(resp.headers_mut());
        }
    }

    /// Records the request: `code` is the HTTP status of the response (for a reply the
    /// mesh made, the one it made), `grpc` the gRPC status.
    pub(crate) fn finish(self, code: Option<u16>, grpc: Option<u32>, millis: f64) {
        let (code, flags) = match (self.local, code) {
            (Some((0, flags)), Some(c)) => (c, flags),
            (Some((local, flags)), _) => (local, flags),
            (None, c) => (c.unwrap_or(0), "-"),
        };
        let s = |v: &str| Arc::<str>::from(v);
        let unknown = || Arc::<str>::from(UNKNOWN);
        let (host, service_name, service_namespace, subset) = self.destination_service();
        let (source, destination) = self.parties(&service_namespace, &subset);
        let [sw, sns, sp, sa, sv, scs, scr, sc] = source;
        let [dw, dns, dp, da, dv, dcs, dc] = destination;
        let dcr = dv.clone();
        let security = if self.outbound {
            unknown()
        } else if self.peer_principal.is_some() {
            s("mutual_tls")
        } else {
            s("none")
        };
        let key: Key = [
            s(if self.outbound {
                "source"
            } else {
                "destination"
            }),
            sw,
            sns,
            sp,
            sa,
            sv,
            scs,
            scr,
            sc,
            dw,
            dns,
            dp,
            da,
            dv,
            s(&host),
            s(&service_name),
            s(&service_namespace),
            dcs,
            dcr,
            dc,
            s(if self.grpc { "grpc" } else { "http" }),
            s(&code.to_string()),
            grpc.map_or_else(|| s("-"), |c| s(&c.to_string())),
            s(flags),
            security,
        ];
        let series = {
            let mut map = self.istio.series.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key).or_default().clone()
        };
        series.requests.fetch_add(1, Ordering::Relaxed);
        series.duration.record(&DURATION_BUCKETS_MS, millis);
        series
            .request_bytes
            .record(&SIZE_BUCKETS, self.request_bytes as f64);
        series
            .response_bytes
            .record(&SIZE_BUCKETS, self.response_bytes as f64);
    }

    /// The destination service of the request: host, name, namespace (`unknown` outside
    /// Kubernetes names) and the subset of the cluster it went to (outbound).
    fn destination_service(&self) -> (String, String, String, String) {
        let me = &self.istio.workload;
        // Istio's cluster names: `outbound|PORT|SUBSET|HOST`.
        let mut parts = self.cluster.splitn(4, '|');
        let (host, subset) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(_), Some(_), Some(subset), Some(host)) => (host.to_owned(), subset.to_owned()),
            _ => (self.cluster.clone(), String::new()),
        };
        let (host, subset) = if self.outbound {
            (host, subset)
        } else {
            (me.service.clone(), String::new())
        };
        let service_name = host.split('.').next().unwrap_or(UNKNOWN).to_owned();
        let service_namespace = host
            .split('.')
            .nth(1)
            .filter(|_| host.contains(".svc"))
            .unwrap_or(UNKNOWN)
            .to_owned();
        (host, service_name, service_namespace, subset)
    }

    /// The source and destination workload labels (workload, namespace, principal, app,
    /// version, canonical service and revision, cluster), one side from this workload and
    /// the other from the peer's exchanged metadata.
    fn parties(&self, service_namespace: &str, subset: &str) -> ([Arc<str>; 8], [Arc<str>; 7]) {
        let me = &self.istio.workload;
        let unknown = || Arc::<str>::from(UNKNOWN);
        let s = |v: &str| Arc::<str>::from(v);
        let peer = self.peer.as_ref();
        let peer_field = |f: fn(&Workload) -> &str| peer.map_or_else(unknown, |p| s(f(p)));
        let mine = |f: fn(&Workload) -> &str| s(f(me));
        let my_principal = me.principal.as_deref().map_or_else(unknown, s);
        if self.outbound {
            (
                [
                    mine(|w| &w.name),
                    mine(|w| &w.namespace),
                    my_principal,
                    mine(|w| &w.app),
                    mine(|w| &w.version),
                    mine(|w| &w.app),
                    mine(|w| &w.version),
                    mine(|w| &w.cluster),
                ],
                [
                    peer_field(|w| &w.name),
                    peer.map_or_else(|| s(service_namespace), |p| s(&p.namespace)),
                    // The server's identity is checked by the connector, not reported here.
                    unknown(),
                    peer_field(|w| &w.app),
                    peer.map_or_else(
                        || {
                            if subset.is_empty() {
                                unknown()
                            } else {
                                s(subset)
                            }
                        },
                        |p| s(&p.version),
                    ),
                    peer_field(|w| &w.app),
                    peer_field(|w| &w.cluster),
                ],
            )
        } else {
            let principal = self.peer_principal.as_deref();
            (
                [
                    peer_field(|w| &w.name),
                    peer.map(|p| s(&p.namespace))
                        .or_else(|| principal.and_then(spiffe_namespace).map(s))
                        .unwrap_or_else(unknown),
                    principal.map_or_else(unknown, s),
                    peer_field(|w| &w.app),
                    peer_field(|w| &w.version),
                    peer_field(|w| &w.app),
                    peer_field(|w| &w.version),
                    peer_field(|w| &w.cluster),
                ],
                [
                    mine(|w| &w.name),
                    mine(|w| &w.namespace),
                    my_principal,
                    mine(|w| &w.app),
                    mine(|w| &w.version),
                    mine(|w| &w.app),
                    mine(|w| &w.cluster),
                ],
            )
        }
    }
}

/// A body's size from its `Content-Length` or its exact size hint; 0 when unknown.
fn body_size<B: http_body::Body>(headers: &HeaderMap, body: &B) -> u64 {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .or_else(|| body.size_hint().exact())
        .unwrap_or(0)
}

/// Envoy's response flag for a request the mesh answered itself.
pub(crate) fn response_flags(e: &crate::error::BoxError) -> &'static str {
    use crate::MeshError;
    match e.downcast_ref::<MeshError>() {
        Some(MeshError::NoRoute { .. }) | Some(MeshError::NoRouteConfig { .. }) => "NR",
        Some(MeshError::UnknownCluster { .. }) => "NC",
        Some(MeshError::NoHealthyEndpoint { .. }) => "UH",
        Some(MeshError::Overloaded { .. }) => "UO",
        Some(MeshError::Timeout { .. }) | Some(MeshError::PerTryTimeout { .. }) => "UT",
        Some(MeshError::Upstream { connect: true, .. }) | Some(MeshError::Tls { .. }) => "UF",
        Some(MeshError::Upstream { .. }) => "UC",
        Some(MeshError::FaultAbort { .. }) => "FI",
        Some(MeshError::DirectResponse { .. }) => "DR",
        _ => "-",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_exchange_round_trips_and_reads_istio_node_metadata() {
        let node = envoy_types::pb::envoy::config::core::v3::Node::default();
        assert_eq!(Workload::from_node(&node).name, "unknown");
        let mut md = Struct::default();
        md.fields
            .insert("WORKLOAD_NAME".into(), string_value("reviews-v2"));
        md.fields.insert("NAMESPACE".into(), string_value("prod"));
        let mut labels = Struct::default();
        labels.fields.insert("app".into(), string_value("reviews"));
        labels.fields.insert("version".into(), string_value("v2"));
        md.fields.insert(
            "LABELS".into(),
            Value {
                kind: Some(Kind::StructValue(labels)),
            },
        );
        let node = envoy_types::pb::envoy::config::core::v3::Node {
            id: "sidecar~10.0.0.1~reviews-v2-abc.prod~prod.svc.cluster.local".into(),
            metadata: Some(md),
            ..Default::default()
        };
        let w = Workload::from_node(&node);
        assert_eq!(
            (&*w.name, &*w.namespace, &*w.app, &*w.version, &*w.service),
            (
                "reviews-v2",
                "prod",
                "reviews",
                "v2",
                "reviews.prod.svc.cluster.local"
            )
        );
        let istio = Istio::new(w.clone());
        let mut h = HeaderMap::new();
        istio.announce(&mut h);
        assert_eq!(h[&PEER_METADATA_ID], node.id.as_str());
        let back = peer_from(&h).unwrap();
        assert_eq!(
            (back.name, back.namespace, back.app, back.version),
            (w.name, w.namespace, w.app, w.version)
        );
        assert_eq!(
            spiffe_namespace("spiffe://cluster.local/ns/prod/sa/x"),
            Some("prod")
        );
    }
}
