//! Allocations per request on the outbound decision path (route, balance, breaker), per
//! layer, and per whole request; and the memory held by 1 000 clusters × 10 endpoints.
//! A counting global allocator (`stats_alloc`) measures; nothing is timed.
//!
//! `cargo bench -p mesh-benches --bench alloc`

#![allow(missing_docs)]
use std::alloc::System;
use std::hint::black_box;

use futures::FutureExt;
use http::Uri;
use mesh_benches::{
    app, routes_yaml, service_yaml, service_yaml_with, snapshot, CLUSTER, HOST, LISTENER,
};
use mesh_core::ConfigStore;
use mesh_tower::cluster::balance::{ByConfig, PickEndpoint};
use mesh_tower::cluster::ClusterRegistry;
use mesh_tower::route::{decide, RouteLayer};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tower::{Layer, Service};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const N: usize = 10_000;

/// Allocations per call of `f`, averaged over `N` calls after a warm-up call.
fn per_call(name: &str, mut f: impl FnMut()) -> f64 {
    f();
    let region = Region::new(GLOBAL);
    for _ in 0..N {
        f();
    }
    let stats = region.change();
    let per = stats.allocations as f64 / N as f64;
    println!(
        "{name:<58} {per:>6.2} allocations/request  {:>8.1} bytes/request",
        stats.bytes_allocated as f64 / N as f64
    );
    per
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _enter = rt.enter();
    let store = ConfigStore::new();
    store.publish(snapshot(&(service_yaml(1000, false) + &routes_yaml(100))));
    let registry = ClusterRegistry::new(store.clone());
    let rc = store.load().routes_for_listener(LISTENER).expect("routes");
    let uri: Uri = format!("http://{HOST}/r99").parse().expect("uri");
    let request = || mesh_benches::request(&uri);
    println!("(requests built outside the counted region where possible; the request's own");
    println!(" allocations are counted where a layer needs one built per call)\n");

    // The decision path, as the cluster layer takes it.
    let mut req = request();
    per_call("decision: route (100 routes, 90/10 split)", || {
        black_box(decide(rc.clone(), LISTENER, &mut req, fastrand::u64(..)).expect("route"));
    });
    let picker = ByConfig::default();
    let subset = CLUSTER.replace("||", "|v1|");
    per_call("decision: registry lookup + P2C over 500 endpoints", || {
        let cluster = registry.get(&subset).expect("cluster");
        let levels = cluster.levels();
        black_box(picker.pick(&cluster, &levels[0]).address);
    });
    let cluster = registry.get(&subset).expect("cluster");
    per_call("decision: breaker (acquire + release)", || {
        black_box(cluster.try_acquire().expect("capacity"));
    });
    per_call("decision: all three", || {
        let d = decide(rc.clone(), LISTENER, &mut req, fastrand::u64(..)).expect("route");
        let cluster = registry.get(d.cluster()).expect("cluster");
        let guard = cluster.try_acquire().expect("capacity");
        let levels = cluster.levels();
        black_box(picker.pick(&cluster, &levels[0]).address);
        drop(guard);
    });

    // Layers over a service_fn (the request, an `Empty` body and no headers, allocates
    // nothing itself; its extensions map is allocated by the first insert).
    let base = per_call("layer: baseline service_fn", || {
        let mut s = app();
        black_box(s.call(request()).now_or_never());
    });
    let mut route = RouteLayer::new(store.clone(), LISTENER).layer(app());
    per_call("layer: route (decision into request and response)", || {
        black_box(route.call(request()).now_or_never());
    });
    let mut timeout = RouteLayer::new(store.clone(), LISTENER)
        .layer(mesh_tower::timeout::TimeoutLayer::new().layer(app()));
    per_call("layer: route + timeout (5 s)", || {
        black_box(timeout.call(request()).now_or_never());
    });
    let metrics = mesh_tower::metrics::Metrics::default();
    let mut measured =
        mesh_tower::metrics::MetricsLayer::new(metrics, mesh_tower::metrics::Direction::Inbound)
            .service("svc")
            .layer(app());
    per_call("layer: metrics (series exists)", || {
        black_box(measured.call(request()).now_or_never());
    });
    let mut traced = mesh_tower::trace::TraceLayer::client().layer(app());
    per_call("layer: trace client (no provider)", || {
        black_box(traced.call(request()).now_or_never());
    });
    let mut inbound = mesh_tower::server::InboundLayer::new("svc").layer(app());
    per_call("stack: inbound in process", || {
        black_box(inbound.call(request()).now_or_never());
    });
    let _ = base;

    // Memory held: 1 000 clusters × 10 endpoints (one service each: listener, routes,
    // cluster, assignment), translated and applied to a registry.
    let mut yaml = String::new();
    for s in 0..1000 {
        yaml.push_str(&service_yaml_with(10, false, false).replace("svc", &format!("svc{s}")));
    }
    let region = Region::new(GLOBAL);
    let store = ConfigStore::new();
    store.publish(snapshot(&yaml));
    let snap_bytes = {
        let s = region.change();
        s.bytes_allocated as i64 - s.bytes_deallocated as i64
    };
    let registry = ClusterRegistry::new(store.clone());
    let total = {
        let s = region.change();
        s.bytes_allocated as i64 - s.bytes_deallocated as i64
    };
    println!(
        "\nheld for 1000 services = 1000 clusters x 10 endpoints: snapshot {:.2} MiB, \
         snapshot + cluster runtimes {:.2} MiB",
        snap_bytes as f64 / 1048576.0,
        total as f64 / 1048576.0
    );
    drop(registry);
}
