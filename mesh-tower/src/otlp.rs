//! OTLP export (feature `otlp`) of the mesh's spans and golden-signal metrics, over gRPC or
//! HTTP/protobuf, configured from the standard OpenTelemetry environment variables or in
//! code.
//!
//! Spans: a tracer provider with a batching exporter, behind a
//! [`tracing-opentelemetry`](tracing_opentelemetry) layer, so the mesh's request spans and the
//! application's own `tracing` spans go out through one provider in one trace
//! ([`Otlp::install`] sets up the whole subscriber; [`Otlp::layer`] gives the layer to add to
//! a subscriber the application builds itself). Metrics: the same
//! [`Metrics`] the admin endpoint serves, read every export interval into OpenTelemetry
//! observable instruments ([`Otlp::export_metrics`]), so recording stays one atomic add:
//! `mesh.requests` (counter; `direction`, `route`, `cluster`, `peer`, `outcome`),
//! `mesh.requests.in_flight` (gauge), `mesh.request.duration` (`.sum` and `.count` counters
//! in seconds, and `.p50` / `.p95` / `.p99` gauges from the histogram), and the event
//! counters (`mesh.retries`, `mesh.breaker.overflows`, `mesh.outlier.ejections`,
//! `mesh.faults.injected`, `mesh.tls.handshake_failures`, `mesh.xds.updates`,
//! `mesh.xds.nacks`).
//!
//! | Variable | Meaning | Default |
//! |---|---|---|
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` | collector address | `http://localhost:4317` (gRPC), `http://localhost:4318` (HTTP) |
//! | `OTEL_EXPORTER_OTLP_PROTOCOL` | `grpc` or `http/protobuf` | `http/protobuf` |
//! | `OTEL_SERVICE_NAME` | the `service.name` resource attribute | `unknown_service` |
//! | `OTEL_TRACES_SAMPLER_ARG` | sampling ratio for new traces (parents' decisions are kept) | `1.0` |
//!
//! Export runs on a background batch processor: a request never waits for it, and when the
//! queue is full, spans are dropped rather than requests slowed.
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use mesh_tower::otlp::Otlp;
//! let otlp = Otlp::from_env();
//! // The mesh's spans and the application's `tracing` spans go to the collector (and
//! // events are logged to stderr, filtered by RUST_LOG).
//! let _tracing = otlp.install()?;
//! // And the golden signals, every 10 s.
//! let metrics = mesh_tower::metrics::Metrics::default();
//! let _metrics = otlp.export_metrics(&metrics, std::time::Duration::from_secs(10))?;
//! # Ok(()) }
//! ```

use std::fmt;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::metrics::PeriodicReader;
use opentelemetry_sdk::trace::Sampler;

use crate::metrics::{Direction, Metrics};

pub use opentelemetry_sdk::metrics::SdkMeterProvider;
pub use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;

/// The wire protocol to the collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318).
    HttpProtobuf,
}

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// An environment variable has a value this exporter does not support.
    #[error("{var}={value:?}: {reason}")]
    Env {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is accepted.
        reason: &'static str,
    },
    /// Built outside a tokio runtime (the exporter's connections run on it).
    #[error("the OTLP exporter must be built within a tokio runtime")]
    NoRuntime,
    /// The exporter could not be built (e.g. an invalid endpoint).
    #[error("OTLP exporter to {endpoint}: {source}")]
    Build {
        /// The endpoint, as configured.
        endpoint: String,
        /// The exporter's error.
        source: opentelemetry_otlp::ExporterBuildError,
    },
    /// A global `tracing` subscriber is already set: add [`Otlp::layer`] to it instead.
    #[error("installing the tracing subscriber: {0} (add Otlp::layer() to the existing one)")]
    Subscriber(String),
}

/// OTLP exporter settings (see the [module](self)).
#[derive(Clone, Debug, PartialEq)]
pub struct Otlp {
    endpoint: Option<String>,
    protocol: Protocol,
    service_name: Option<String>,
    sampling_ratio: f64,
}

impl Default for Otlp {
    fn default() -> Self {
        Self {
            endpoint: None,
            protocol: Protocol::HttpProtobuf,
            service_name: None,
            sampling_ratio: 1.0,
        }
    }
}

impl Otlp {
    /// Settings from the environment (unset or invalid variables fall back to the defaults;
    /// [`Otlp::try_from_env`] reports invalid ones).
    pub fn from_env() -> Self {
        Self::try_from_env().unwrap_or_else(|e| {
            tracing::warn!("{e}; using the default");
            Self::default()
        })
    }

    /// Settings from the environment, failing on a value that is set but invalid.
    ///
    /// # Errors
    /// An unsupported protocol or a sampling ratio outside 0..=1.
    pub fn try_from_env() -> Result<Self, OtlpError> {
        let mut o = Self::default();
        if let Ok(v) = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
            if !v.is_empty() {
                o.endpoint = Some(v);
            }
        }
        if let Ok(v) = std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL") {
            o.protocol = match v.as_str() {
                "grpc" => Protocol::Grpc,
                "http/protobuf" | "" => Protocol::HttpProtobuf,
                _ => {
                    return Err(OtlpError::Env {
                        var: "OTEL_EXPORTER_OTLP_PROTOCOL",
                        value: v,
                        reason: "supported: grpc, http/protobuf",
                    })
                }
            };
        }
        if let Ok(v) = std::env::var("OTEL_SERVICE_NAME") {
            if !v.is_empty() {
                o.service_name = Some(v);
            }
        }
        if let Ok(v) = std::env::var("OTEL_TRACES_SAMPLER_ARG") {
            match v.parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => o.sampling_ratio = r,
                _ => {
                    return Err(OtlpError::Env {
                        var: "OTEL_TRACES_SAMPLER_ARG",
                        value: v,
                        reason: "a ratio from 0.0 to 1.0",
                    })
                }
            }
        }
        Ok(o)
    }

    /// The collector's address (e.g. `http://127.0.0.1:4317`; for HTTP, the base address:
    /// `/v1/traces` is appended).
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// The wire protocol.
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// The `service.name` of the spans.
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service_name = Some(name.into());
        self
    }

    /// The fraction of new traces sampled (clamped to 0..=1); a request with a remote
    /// parent follows the parent's decision.
    pub fn sampling_ratio(mut self, ratio: f64) -> Self {
        self.sampling_ratio = ratio.clamp(0.0, 1.0);
        self
    }

    /// A tracer provider exporting to the collector, not installed anywhere (see
    /// [`Otlp::layer`] and [`Otlp::install`]). Call within a tokio runtime.
    ///
    /// # Errors
    /// The exporter cannot be built.
    pub fn build(&self) -> Result<SdkTracerProvider, OtlpError> {
        let endpoint = self.endpoint_or_default();
        let exporter = match self.protocol {
            Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build(),
            Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(OnRuntime::new()?)
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                .build(),
        }
        .map_err(|source| OtlpError::Build {
            endpoint: endpoint.clone(),
            source,
        })?;
        Ok(SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                self.sampling_ratio,
            ))))
            .with_resource(self.resource())
            .build())
    }

    /// A `tracing-opentelemetry` layer exporting to the collector, for a subscriber the
    /// application builds itself; its provider is also installed as OpenTelemetry's global
    /// one, so code using the OpenTelemetry API directly shares it (one provider, one
    /// exporter). Keep the guard: dropping it flushes the spans still queued.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tracing_subscriber::layer::SubscriberExt;
    /// use tracing_subscriber::util::SubscriberInitExt;
    ///
    /// use tracing_subscriber::Layer as _;
    ///
    /// let (otel, _guard) = mesh_tower::otlp::Otlp::from_env().layer()?;
    /// tracing_subscriber::registry()
    ///     .with(tracing_subscriber::fmt::layer())
    ///     // The mesh's request spans are at INFO; keep libraries' TRACE spans out.
    ///     .with(otel.with_filter(tracing_subscriber::filter::LevelFilter::INFO))
    ///     .init();
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// The exporter cannot be built.
    pub fn layer<S>(&self) -> Result<(OtelLayer<S>, TracingGuard), OtlpError>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let provider = self.build()?;
        opentelemetry::global::set_tracer_provider(provider.clone());
        // Lean spans: no busy/idle timings, thread or source-location attributes.
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(crate::trace::SCOPE))
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false);
        Ok((layer, TracingGuard { provider }))
    }

    /// Installs the whole pipeline as the global `tracing` subscriber: the OTLP layer of
    /// [`Otlp::layer`] (spans at `INFO` and above) and events logged to stderr, filtered by
    /// `RUST_LOG` (default `info`). Keep the guard: dropping it flushes the spans still
    /// queued.
    ///
    /// # Errors
    /// The exporter cannot be built, or a global subscriber is already set (then add
    /// [`Otlp::layer`] to it instead).
    pub fn install(&self) -> Result<TracingGuard, OtlpError> {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer as _;

        let (otel, guard) = self.layer()?;
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        tracing_subscriber::registry()
            .with(otel.with_filter(tracing_subscriber::filter::LevelFilter::INFO))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init()
            .map_err(|e| OtlpError::Subscriber(e.to_string()))?;
        Ok(guard)
    }
}

/// The `tracing-opentelemetry` layer [`Otlp::layer`] returns.
pub type OtelLayer<S> =
    tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>;

impl Otlp {
    fn resource(&self) -> Resource {
        let mut resource = Resource::builder();
        if let Some(name) = &self.service_name {
            resource = resource.with_service_name(name.clone());
        }
        resource.build()
    }

    fn endpoint_or_default(&self) -> String {
        self.endpoint.clone().unwrap_or_else(|| {
            match self.protocol {
                Protocol::Grpc => "http://localhost:4317",
                Protocol::HttpProtobuf => "http://localhost:4318",
            }
            .to_owned()
        })
    }

    /// Exports `metrics` every `interval` until the guard is dropped (which exports once
    /// more). Call within a tokio runtime.
    ///
    /// # Errors
    /// The exporter cannot be built.
    pub fn export_metrics(
        &self,
        metrics: &Metrics,
        interval: std::time::Duration,
    ) -> Result<MetricsGuard, OtlpError> {
        let endpoint = self.endpoint_or_default();
        let exporter = match self.protocol {
            Protocol::Grpc => opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build(),
            Protocol::HttpProtobuf => opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_http_client(OnRuntime::new()?)
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(format!("{}/v1/metrics", endpoint.trim_end_matches('/')))
                .build(),
        }
        .map_err(|source| OtlpError::Build {
            endpoint: endpoint.clone(),
            source,
        })?;
        let reader = PeriodicReader::builder(exporter)
            .with_interval(interval)
            .build();
        let provider = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(self.resource())
            .build();
        register(&provider, metrics);
        Ok(MetricsGuard { provider })
    }
}

fn series_attributes(d: Direction, l: &crate::metrics::Labelled) -> Vec<KeyValue> {
    vec![
        KeyValue::new("direction", d.as_str()),
        KeyValue::new("route", l.route.clone()),
        KeyValue::new("cluster", l.cluster.clone()),
        KeyValue::new("peer", l.peer.clone()),
    ]
}

/// Observable instruments reading `metrics` at each collection.
fn register(provider: &SdkMeterProvider, metrics: &Metrics) {
    use opentelemetry::metrics::MeterProvider as _;
    let meter = provider.meter(crate::trace::SCOPE);
    register_requests(&meter, metrics);
    register_latency(&meter, metrics);
    register_events(&meter, metrics);
}

/// Requests by outcome and in flight, per series.
fn register_requests(meter: &opentelemetry::metrics::Meter, metrics: &Metrics) {
    let m = metrics.clone();
    meter
        .u64_observable_counter("mesh.requests")
        .with_description("Requests by outcome (HTTP status class or gRPC status).")
        .with_callback(move |o| {
            for d in [Direction::Outbound, Direction::Inbound] {
                for l in m.all(d) {
                    let mut attrs = series_attributes(d, &l);
                    for (outcome, v) in l.series.outcomes() {
                        if v > 0 {
                            attrs.push(KeyValue::new("outcome", outcome));
                            o.observe(v, &attrs);
                            attrs.pop();
                        }
                    }
                }
            }
        })
        .build();
    let m = metrics.clone();
    meter
        .i64_observable_gauge("mesh.requests.in_flight")
        .with_description("Requests in flight.")
        .with_callback(move |o| {
            for d in [Direction::Outbound, Direction::Inbound] {
                for l in m.all(d) {
                    o.observe(l.series.in_flight(), &series_attributes(d, &l));
                }
            }
        })
        .build();
}

/// Request latency per series: sum, count and quantiles.
fn register_latency(meter: &opentelemetry::metrics::Meter, metrics: &Metrics) {
    let m = metrics.clone();
    meter
        .f64_observable_counter("mesh.request.duration.sum")
        .with_unit("s")
        .with_description("Total request latency.")
        .with_callback(move |o| {
            for d in [Direction::Outbound, Direction::Inbound] {
                for l in m.all(d) {
                    o.observe(
                        l.series.latency_sum().as_secs_f64(),
                        &series_attributes(d, &l),
                    );
                }
            }
        })
        .build();
    let m = metrics.clone();
    meter
        .u64_observable_counter("mesh.request.duration.count")
        .with_description("Requests timed.")
        .with_callback(move |o| {
            for d in [Direction::Outbound, Direction::Inbound] {
                for l in m.all(d) {
                    o.observe(l.series.total(), &series_attributes(d, &l));
                }
            }
        })
        .build();
    for (name, q) in [
        ("mesh.request.duration.p50", 0.5),
        ("mesh.request.duration.p95", 0.95),
        ("mesh.request.duration.p99", 0.99),
    ] {
        let m = metrics.clone();
        meter
            .f64_observable_gauge(name)
            .with_unit("s")
            .with_description(
                "Request latency quantile (from the bucketed histogram, since start).",
            )
            .with_callback(move |o| {
                for d in [Direction::Outbound, Direction::Inbound] {
                    for l in m.all(d) {
                        if let Some(v) = l.series.quantile(q) {
                            o.observe(v.as_secs_f64(), &series_attributes(d, &l));
                        }
                    }
                }
            })
            .build();
    }
}

/// The event counters (retries, overflows, ejections, faults, waits, handshake failures,
/// xDS updates), as observable counters.
fn register_events(meter: &opentelemetry::metrics::Meter, metrics: &Metrics) {
    type Read = fn(&Metrics) -> u64;
    let events: [(&'static str, &'static str, Read); 10] = [
        ("mesh.retries", "Retries sent.", |m| {
            relaxed(&m.counters().retries)
        }),
        (
            "mesh.breaker.overflows",
            "Requests refused by circuit breakers.",
            |m| relaxed(&m.counters().overflows),
        ),
        (
            "mesh.outlier.ejections",
            "Endpoints ejected by outlier detection.",
            |m| relaxed(&m.counters().ejections),
        ),
        ("mesh.faults.injected", "Faults injected.", |m| {
            relaxed(&m.counters().faults)
        }),
        (
            "mesh.config.waits",
            "Requests that waited for their configuration to arrive.",
            |m| relaxed(&m.counters().config_waits),
        ),
        (
            "mesh.config.waits_expired",
            "Requests sent after waiting the whole bound for configuration that did not arrive.",
            |m| relaxed(&m.counters().config_waits_expired),
        ),
        (
            "mesh.tls.handshake_failures",
            "TLS handshakes that failed.",
            |m| relaxed(&m.counters().tls_failures),
        ),
        ("mesh.xds.updates", "xDS responses accepted.", |m| {
            m.xds_counts().acked
        }),
        ("mesh.xds.nacks", "xDS responses rejected.", |m| {
            m.xds_counts().nacked
        }),
        (
            "mesh.xds.route_holds_expired",
            "Route updates applied after waiting the whole bound for clusters that did not arrive.",
            |m| m.xds_counts().route_holds_expired,
        ),
    ];
    for (name, help, read) in events {
        let m = metrics.clone();
        meter
            .u64_observable_counter(name)
            .with_description(help)
            .with_callback(move |o| o.observe(read(&m), &[]))
            .build();
    }
}

fn relaxed(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(std::sync::atomic::Ordering::Relaxed)
}

/// Exports the metrics once more and stops when dropped.
pub struct MetricsGuard {
    provider: SdkMeterProvider,
}

impl MetricsGuard {
    /// The meter provider (e.g. to `force_flush` it).
    pub fn provider(&self) -> &SdkMeterProvider {
        &self.provider
    }
}

impl fmt::Debug for MetricsGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsGuard").finish_non_exhaustive()
    }
}

impl Drop for MetricsGuard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!("exporting metrics at shutdown: {e}");
        }
    }
}

/// Flushes and stops the exporter when dropped.
pub struct TracingGuard {
    provider: SdkTracerProvider,
}

impl TracingGuard {
    /// The provider.
    pub fn provider(&self) -> &SdkTracerProvider {
        &self.provider
    }
}

impl fmt::Debug for TracingGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TracingGuard").finish_non_exhaustive()
    }
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!("flushing spans at shutdown: {e}");
        }
    }
}

/// The HTTP exporter's client, run on the runtime it was built in: the batch processor
/// exports from its own thread, where hyper's connections would find no reactor.
#[derive(Debug)]
struct OnRuntime {
    client: std::sync::Arc<
        opentelemetry_http::hyper::HyperClient<hyper_util::client::legacy::connect::HttpConnector>,
    >,
    runtime: tokio::runtime::Handle,
}

impl OnRuntime {
    fn new() -> Result<Self, OtlpError> {
        Ok(Self {
            client: std::sync::Arc::new(
                opentelemetry_http::hyper::HyperClient::with_default_connector(
                    std::time::Duration::from_secs(10),
                    None,
                ),
            ),
            runtime: tokio::runtime::Handle::try_current().map_err(|_| OtlpError::NoRuntime)?,
        })
    }
}

type HttpResult = Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError>;

impl opentelemetry_http::HttpClient for OnRuntime {
    fn send_bytes<'a, 'f>(
        &'a self,
        request: http::Request<bytes::Bytes>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = HttpResult> + Send + 'f>>
    where
        'a: 'f,
        Self: 'f,
    {
        let client = self.client.clone();
        let task = self
            .runtime
            .spawn(async move { client.send_bytes(request).await });
        Box::pin(async move {
            task.await
                .map_err(|e| Box::new(e) as opentelemetry_http::HttpError)?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The only test in this crate that touches these variables.
    #[test]
    fn settings_from_the_standard_environment() {
        let vars = [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "OTEL_SERVICE_NAME",
            "OTEL_TRACES_SAMPLER_ARG",
        ];
        std::env::set_var(vars[0], "http://collector:4317");
        std::env::set_var(vars[1], "grpc");
        std::env::set_var(vars[2], "reviews");
        std::env::set_var(vars[3], "0.25");
        let o = Otlp::try_from_env().unwrap();
        assert_eq!(
            o,
            Otlp::default()
                .endpoint("http://collector:4317")
                .protocol(Protocol::Grpc)
                .service_name("reviews")
                .sampling_ratio(0.25)
        );
        std::env::set_var(vars[1], "http/json");
        let e = Otlp::try_from_env().unwrap_err().to_string();
        assert_eq!(
            e,
            "OTEL_EXPORTER_OTLP_PROTOCOL=\"http/json\": supported: grpc, http/protobuf"
        );
        std::env::set_var(vars[1], "grpc");
        std::env::set_var(vars[3], "2");
        assert!(Otlp::try_from_env()
            .unwrap_err()
            .to_string()
            .starts_with("OTEL_TRACES_SAMPLER_ARG=\"2\""));
        assert_eq!(Otlp::from_env(), Otlp::default(), "invalid: the defaults");
        for v in vars {
            std::env::remove_var(v);
        }
        assert!(matches!(Otlp::default().build(), Err(OtlpError::NoRuntime)));
    }
}
