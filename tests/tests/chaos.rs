//! Chaos under load: the faults a mesh exists for, injected while a client sends a few
//! hundred requests per second through a `MeshClient` configured over a real ADS stream from
//! the control plane (Istio YAML: retries with a per-try timeout, outlier detection). The
//! backends are real hyper servers on 127.0.0.1 (mTLS ones for certificate rotation).
//!
//! Every test prints its figures (sent, failed, retried, ejections, p99) and asserts that no
//! request failed. The tests run one at a time (they share the machine's two cores).

mod harness;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::*;
use mesh_control::ca::DevCa;
use mesh_core::config::Snapshot;
use mesh_core::identity::IdentityStore;
use mesh_core::xds::ResourceType;

/// One test at a time: they measure behaviour under load on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_and_restarting_an_endpoint_loses_no_request() {
    let _serial = SERIAL.lock().await;
    let epoch = Instant::now();
    let mut b = backends(3, None, epoch).await;
    let cp = ControlPlane::start(&yaml(&ports(&b), false)).await;
    let (_xds, client) = client(&cp, None).await;
    let run = tokio::spawn(load(client.clone(), 300, Duration::from_secs(4)));

    tokio::time::sleep(Duration::from_secs(1)).await;
    b[0].kill();
    // Back before its first ejection (1 s) runs out: a second ejection would last 2 s.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let restarted_at = epoch.elapsed();
    let port = b[0].port;
    b[0] = Backend::start(port, None, epoch).await;
    let f = run.await.unwrap();
    f.report("kill+restart", &client);

    assert_eq!(f.failed, 0, "no request may fail: {:?}", f.errors);
    assert!(f.sent >= 1000, "the load ran: {}", f.sent);
    let c = client.metrics().counters();
    assert!(
        c.ejections.load(Ordering::Relaxed) >= 1,
        "the dead endpoint is ejected"
    );
    let ep = client
        .registry()
        .get(CLUSTER)
        .unwrap()
        .endpoints()
        .iter()
        .find(|e| e.address.port() == port)
        .map(|e| e.ejections())
        .unwrap();
    assert!(ep >= 1, "ejections are counted on the killed endpoint");
    // Recovery: after its ejection ran out, the restarted endpoint serves again.
    assert!(
        b[0].arrivals_after(restarted_at) > 0,
        "the restarted endpoint gets traffic again"
    );
    let text = client.metrics().render();
    assert!(
        text.lines()
            .any(|l| l.starts_with("mesh_outlier_ejections_total") && !l.ends_with(" 0")),
        "ejections are visible in the metrics:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_endpoint_is_timed_out_retried_around_and_ejected() {
    let _serial = SERIAL.lock().await;
    let epoch = Instant::now();
    let b = backends(3, None, epoch).await;
    let cp = ControlPlane::start(&yaml(&ports(&b), false)).await;
    let (_xds, client) = client(&cp, None).await;
    let run = tokio::spawn(load(client.clone(), 200, Duration::from_secs(3)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    b[1].mode.store(HANG, Ordering::Relaxed);
    let f = run.await.unwrap();
    f.report("hung endpoint", &client);

    assert_eq!(f.failed, 0, "no request may fail: {:?}", f.errors);
    let hung = client
        .registry()
        .get(CLUSTER)
        .unwrap()
        .endpoints()
        .iter()
        .find(|e| e.address.port() == b[1].port)
        .map(|e| e.ejections())
        .unwrap();
    assert!(
        hung >= 1,
        "the hung endpoint is ejected (per-try timeouts count)"
    );
    assert!(
        client.metrics().counters().retries.load(Ordering::Relaxed) >= 1,
        "requests to the hung endpoint were retried"
    );
}

/// Polls the client's config dump until `ready` holds.
async fn wait_dump(
    store: &mesh_core::ConfigStore,
    timeout: Duration,
    ready: impl Fn(&mesh_core::ConfigDump) -> bool,
) -> Result<(), String> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if ready(&store.dump()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("timed out after {timeout:?}"))
}

/// Waits until the client holds `n` endpoints for the service.
async fn wait_endpoints(
    store: &mesh_core::ConfigStore,
    n: usize,
    timeout: Duration,
) -> Result<(), String> {
    store
        .wait_for(timeout, |s| {
            s.endpoints_for_cluster(CLUSTER).is_some_and(|c| {
                c.localities
                    .iter()
                    .map(|l| l.endpoints.len())
                    .sum::<usize>()
                    == n
            })
        })
        .await
        .map(drop)
        .map_err(|_| format!("{n} endpoints did not arrive within {timeout:?}"))
}

fn resource_names(s: &Snapshot) -> Vec<String> {
    let mut v: Vec<String> = s
        .listeners()
        .keys()
        .chain(s.route_configs().keys())
        .chain(s.clusters().keys())
        .chain(s.endpoint_assignments().keys())
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_restart_loses_no_request_and_no_resource() {
    let _serial = SERIAL.lock().await;
    let epoch = Instant::now();
    let b = backends(3, None, epoch).await;
    let mut cp = ControlPlane::start(&yaml(&ports(&b), false)).await;
    let (xds, client) = client(&cp, None).await;
    let before = resource_names(&xds.store().load());
    let run = tokio::spawn(load(client.clone(), 300, Duration::from_secs(6)));

    tokio::time::sleep(Duration::from_millis(500)).await;
    cp.stop().await;
    wait_dump(xds.store(), Duration::from_secs(5), |d| !d.connected)
        .await
        .expect("the client sees the control plane go");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        resource_names(&xds.store().load()),
        before,
        "nothing is dropped while the control plane is away"
    );
    cp.run().await;
    wait_dump(xds.store(), Duration::from_secs(10), |d| d.connected)
        .await
        .expect("the client reconnects with backoff");
    assert_eq!(
        resource_names(&xds.store().load()),
        before,
        "nothing is dropped because of the reconnect"
    );
    // Updates resume: the third endpoint leaves.
    cp.cache
        .set_resources(generate(&yaml(&ports(&b[..2]), false)));
    wait_endpoints(xds.store(), 2, Duration::from_secs(10))
        .await
        .expect("an update after the reconnect applies");
    let f = run.await.unwrap();
    f.report("control plane restart", &client);
    assert_eq!(f.failed, 0, "no request may fail: {:?}", f.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_resource_is_nacked_and_the_last_good_config_keeps_serving() {
    use envoy_types::pb::envoy::config::route::v3 as rpb;
    use prost::Message;
    let _serial = SERIAL.lock().await;
    let epoch = Instant::now();
    let b = backends(3, None, epoch).await;
    let cp = ControlPlane::start(&yaml(&ports(&b), false)).await;
    let (xds, client) = client(&cp, None).await;
    let run = tokio::spawn(load(client.clone(), 300, Duration::from_secs(3)));

    tokio::time::sleep(Duration::from_millis(700)).await;
    // A route whose regex does not compile, as a buggy control plane could send.
    let mut resources = generate(&yaml(&ports(&b), false));
    let mut bad_name = String::new();
    for any in &mut resources {
        if any.type_url.ends_with("RouteConfiguration") {
            let mut rc = rpb::RouteConfiguration::decode(any.value.as_slice()).unwrap();
            let m = rc.virtual_hosts[0].routes[0].r#match.as_mut().unwrap();
            m.path_specifier = Some(rpb::route_match::PathSpecifier::SafeRegex(
                envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher {
                    regex: "([".into(),
                    ..Default::default()
                },
            ));
            bad_name = rc.name.clone();
            any.value = rc.encode_to_vec();
        }
    }
    cp.cache.set_resources(resources);
    wait_dump(xds.store(), Duration::from_secs(5), |d| {
        d.get(ResourceType::RouteConfiguration, &bad_name)
            .is_some_and(|r| r.error.is_some())
    })
    .await
    .expect("the bad route configuration is NACKed");
    let dump = xds.store().dump();
    let entry = dump
        .get(ResourceType::RouteConfiguration, &bad_name)
        .unwrap();
    println!("NACK detail: {:?}", entry.error);
    assert!(
        entry
            .error
            .as_ref()
            .unwrap()
            .error
            .to_string()
            .contains("regex"),
        "the NACK names what was wrong: {:?}",
        entry.error
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    // The next good push applies (one endpoint fewer).
    cp.cache
        .set_resources(generate(&yaml(&ports(&b[..2]), false)));
    wait_endpoints(xds.store(), 2, Duration::from_secs(5))
        .await
        .expect("the next good push applies");
    wait_dump(xds.store(), Duration::from_secs(5), |d| {
        d.get(ResourceType::RouteConfiguration, &bad_name)
            .is_some_and(|r| r.error.is_none())
    })
    .await
    .expect("the route configuration is ACKed again");
    let f = run.await.unwrap();
    f.report("bad resource", &client);
    assert_eq!(f.failed, 0, "no request may fail: {:?}", f.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    let _serial = SERIAL.lock().await;
    let epoch = Instant::now();
    let ca = DevCa::new("cluster.local").unwrap();
    let server_id = IdentityStore::new(svid(&ca, "backend"));
    let client_id = IdentityStore::new(svid(&ca, "client"));
    let b = backends(3, Some(&server_id), epoch).await;
    let cp = ControlPlane::start(&yaml(&ports(&b), true)).await;
    let (_xds, mesh) = client(&cp, Some(client_id.clone())).await;
    let run = tokio::spawn(load(mesh.clone(), 300, Duration::from_secs(3)));
    let first = server_id.load();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        server_id.store(svid(&ca, "backend"));
        client_id.store(svid(&ca, "client"));
    }
    assert!(
        !Arc::ptr_eq(&first, &server_id.load()),
        "the server rotated"
    );
    let f = run.await.unwrap();
    f.report("certificate rotation", &mesh);
    assert_eq!(f.failed, 0, "no request may fail: {:?}", f.errors);
    // New connections after the rotation handshake with the new certificates: a fresh
    // client with the rotated identity is served.
    let (_xds2, fresh) = client(&cp, Some(client_id)).await;
    let f = load(fresh.clone(), 50, Duration::from_millis(500)).await;
    assert_eq!(
        f.failed, 0,
        "rotated certificates are accepted: {:?}",
        f.errors
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_endpoint_from_eds_drains_it_under_load() {
    let _serial = SERIAL.lock().await;
    let epoch = Instant::now();
    let b = backends(3, None, epoch).await;
    for x in &b {
        x.mode.store(SLOW, Ordering::Relaxed);
    }
    let cp = ControlPlane::start(&yaml(&ports(&b), false)).await;
    let (xds, client) = client(&cp, None).await;
    let run = tokio::spawn(load(client.clone(), 200, Duration::from_secs(3)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = b[2].hits();
    cp.cache
        .set_resources(generate(&yaml(&ports(&b[..2]), false)));
    wait_endpoints(xds.store(), 2, Duration::from_secs(5))
        .await
        .expect("the removal applies");
    let applied = epoch.elapsed();
    let f = run.await.unwrap();
    f.report("EDS removal", &client);
    assert_eq!(f.failed, 0, "in-flight requests complete: {:?}", f.errors);
    assert!(before > 0, "the endpoint served before its removal");
    // Requests that arrive later were sent before the removal applied (at most the client's
    // in-flight window), never after.
    let late = b[2].arrivals_after(applied + Duration::from_millis(100));
    assert_eq!(late, 0, "no new request goes to the removed endpoint");
}

/// A flapping control plane: every 100 ms the server drops every open ADS stream (the
/// connection stays, the stream ends with UNAVAILABLE). Requests never notice (the last good
/// configuration serves), the client reconnects with its backoff (gRFC A57: it starts over
/// at the first delay after a stream that answered, so about one attempt a second, not ten),
/// and memory stays put. `MESH_FLAP_SECS=30` is the documented long run; CI runs 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_control_plane_loses_no_request_and_is_reconnected_with_backoff() {
    let _serial = SERIAL.lock().await;
    let secs: u64 = std::env::var("MESH_FLAP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let epoch = Instant::now();
    let b = backends(3, None, epoch).await;
    let cp = ControlPlane::start(&yaml(&ports(&b), false)).await;
    let (_xds, client) = client(&cp, None).await;
    let server = cp.server.clone().expect("running");
    let connects_before = server.connects();
    let rss_before = rss_kib();
    let run = tokio::spawn(load(client.clone(), 300, Duration::from_secs(secs)));
    let end = Instant::now() + Duration::from_secs(secs);
    let mut flaps = 0u64;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.drop_streams();
        flaps += 1;
    }
    let f = run.await.unwrap();
    let rss_after = rss_kib();
    let connects = server.connects() - connects_before;
    f.report("flapping control plane", &client);
    println!(
        "flapping: {flaps} drops in {secs} s, {connects} reconnections, RSS {rss_before} -> {rss_after} KiB"
    );
    assert_eq!(f.failed, 0, "no request may fail: {:?}", f.errors);
    // The client's backoff: first delay 1 s with ±20 % jitter after a stream that answered.
    let most = (secs as f64 / 0.8).ceil() as u64 + 1;
    assert!(
        (1..=most).contains(&connects),
        "{connects} reconnections in {secs} s: the backoff allows at most {most}"
    );
    assert!(
        rss_after.saturating_sub(rss_before) < 16 * 1024,
        "memory grew from {rss_before} to {rss_after} KiB"
    );
}
