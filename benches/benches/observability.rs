//! Per-request cost of the metrics and trace layers over a `service_fn` baseline, and of
//! trace-context parsing and writing.
//!
//! `cargo bench -p mesh-benches --bench observability`

#![allow(missing_docs)] // criterion_group! generates an undocumented function
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use futures::FutureExt;
use http::{HeaderMap, Request};
use mesh_benches::{app, Body};
use mesh_tower::metrics::{AccessLog, Direction, Metrics, MetricsLayer};
use mesh_tower::trace::{extract, inject, Formats, TraceLayer};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tower::{Layer, Service};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer as _;

/// A request that costs next to nothing to build and drop (no allocation), so that the
/// timing is the layer's.
fn request() -> Request<Body> {
    Request::new(Body::new())
}

/// A request carrying a W3C parent (its header map allocates; compare with its own baseline).
fn request_with_parent() -> Request<Body> {
    Request::get("http://reviews.prod.svc.cluster.local/api/items")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(Body::new())
        .unwrap()
}

/// Calls `svc` once per iteration; the futures are ready at once, so this is the layer's
/// own cost plus the baseline's (the request and the response are built and dropped inside
/// the iteration).
fn run<S>(c: &mut Criterion, name: &str, make: fn() -> Request<Body>, mut svc: S)
where
    S: Service<Request<Body>>,
    S::Future: FutureExt,
{
    c.bench_function(name, |b| {
        b.iter(|| {
            let fut = svc.call(black_box(make()));
            black_box(fut.now_or_never());
        })
    });
}

/// Runs `f` with a tracing-opentelemetry pipeline as the thread's subscriber, its spans at
/// `level` and above exported.
fn traced(sampler: Sampler, level: LevelFilter, lean: bool, f: impl FnOnce()) {
    // No span processor: spans are built and recorded, and exporting costs nothing here.
    let provider = SdkTracerProvider::builder().with_sampler(sampler).build();
    let subscriber = tracing_subscriber::registry().with(
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("mesh"))
            // What `Otlp::layer` sets when `lean`: no timing, thread or location attributes.
            .with_tracked_inactivity(!lean)
            .with_threads(!lean)
            .with_location(!lean)
            .with_filter(level),
    );
    tracing::subscriber::with_default(subscriber, f);
}

fn layers(c: &mut Criterion) {
    run(c, "baseline/service_fn", request, app());
    run(
        c,
        "baseline/service_fn+traceparent",
        request_with_parent,
        app(),
    );
    let metrics = Metrics::default();
    run(
        c,
        "metrics/record",
        request,
        MetricsLayer::new(metrics.clone(), Direction::Inbound)
            .service("reviews")
            .layer(app()),
    );
    run(
        c,
        "metrics/record+istio",
        request,
        MetricsLayer::new(
            Metrics::default().istio(mesh_tower::metrics::Workload::from_node(&Default::default())),
            Direction::Inbound,
        )
        .service("reviews")
        .layer(app()),
    );
    run(
        c,
        "metrics/record+access_log_unsampled",
        request,
        MetricsLayer::new(metrics, Direction::Inbound)
            .service("reviews")
            .access_log(AccessLog {
                sample: 0.0,
                errors_only: false,
            })
            .layer(app()),
    );
    run(
        c,
        "trace/client/no_provider",
        request,
        TraceLayer::client().layer(app()),
    );
    traced(Sampler::AlwaysOn, LevelFilter::WARN, true, || {
        run(
            c,
            "trace/client/subscriber_filters_out",
            request,
            TraceLayer::client().layer(app()),
        )
    });
    traced(Sampler::AlwaysOff, LevelFilter::INFO, true, || {
        run(
            c,
            "trace/client/unsampled",
            request,
            TraceLayer::client().layer(app()),
        )
    });
    traced(Sampler::AlwaysOn, LevelFilter::INFO, false, || {
        run(
            c,
            "trace/client/sampled_default_layer",
            request,
            TraceLayer::client().layer(app()),
        )
    });
    traced(Sampler::AlwaysOn, LevelFilter::INFO, true, || {
        run(
            c,
            "trace/client/sampled",
            request,
            TraceLayer::client().layer(app()),
        );
        run(
            c,
            "trace/server/sampled",
            request,
            TraceLayer::server().layer(app()),
        );
        run(
            c,
            "trace/server/sampled+traceparent",
            request_with_parent,
            TraceLayer::server().layer(app()),
        );
    });
}

fn propagation(c: &mut Criterion) {
    let headers = request_with_parent().headers().clone();
    c.bench_function("traceparent/extract", |b| {
        b.iter(|| black_box(extract(black_box(&headers), Formats::ALL)))
    });
    let sc = extract(&headers, Formats::ALL).unwrap();
    c.bench_function("traceparent/inject", |b| {
        b.iter(|| {
            let mut h = HeaderMap::new();
            inject(black_box(&sc), &mut h, Formats::W3C);
            black_box(h)
        })
    });
}

criterion_group!(benches, layers, propagation);
criterion_main!(benches);
