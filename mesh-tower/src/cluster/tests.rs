//! Cluster runtime: outlier detection on paused time, and state carried across updates.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::config::*;
use mesh_core::ConfigStore;
use tokio::time::Instant;

use super::{ClusterRegistry, Outcome};

fn cluster(ports: &[u16], od: Option<OutlierDetection>) -> Snapshot {
    cluster_with(ports, od, LbPolicy::RoundRobin, None)
}

fn cluster_with(
    ports: &[u16],
    od: Option<OutlierDetection>,
    lb_policy: LbPolicy,
    slow_start: Option<SlowStart>,
) -> Snapshot {
    let cla = EndpointAssignment {
        cluster_name: "c".into(),
        localities: vec![LocalityEndpoints {
            locality: Locality::default(),
            weight: 1,
            priority: 0,
            endpoints: ports
                .iter()
                .map(|p| Endpoint {
                    address: ([127, 0, 0, 1], *p).into(),
                    weight: 1,
                    health: HealthStatus::Healthy,
                    hostname: String::new(),
                })
                .collect(),
        }],
        drop_overloads: vec![],
    };
    Snapshot::default().with_cluster(Cluster {
        name: "c".into(),
        discovery: Discovery::Static(Arc::new(cla)),
        lb_policy,
        locality_weighted: false,
        slow_start,
        circuit_breakers: CircuitBreakers::default(),
        outlier_detection: od,
        connect_timeout: Duration::from_secs(1),
        protocol: UpstreamProtocol::Http1,
        http2: None,
        max_requests_per_connection: None,
        tls: None,
    })
}

fn od(consecutive: u32, max_pct: u32) -> OutlierDetection {
    OutlierDetection {
        base_ejection_time: Duration::from_secs(30),
        max_ejection_time: Duration::from_secs(300),
        max_ejection_percent: max_pct,
        consecutive_5xx: Some((consecutive, 100)),
        consecutive_gateway_failure: None,
        success_rate: None,
        ..OutlierDetection::default()
    }
}

#[tokio::test(start_paused = true)]
async fn ejects_after_consecutive_5xx_restores_and_grows_the_ejection_time() {
    let store = ConfigStore::new();
    store.publish(cluster(&[1, 2, 3], Some(od(3, 30))));
    let registry = ClusterRegistry::new(store);
    let c = registry.get("c").unwrap();
    let eps = c.endpoints();
    let (a, b) = (&eps[0], &eps[1]);
    let now = Instant::now();
    // Two failures and a success: the count starts over.
    assert!(!c.record(a, Outcome::Status(503), now));
    assert!(!c.record(a, Outcome::Status(500), now));
    assert!(!c.record(a, Outcome::Status(200), now));
    assert!(!c.record(a, Outcome::Status(503), now));
    assert!(!c.record(a, Outcome::LocalFailure, now));
    assert!(
        c.record(a, Outcome::Status(502), now),
        "third consecutive failure ejects"
    );
    assert!(c.is_ejected(a, now));
    // max_ejection_percent 30: one of three (33%) is ejected already; b stays.
    for _ in 0..5 {
        assert!(!c.record(b, Outcome::Status(503), now));
    }
    assert_eq!(c.ejected(now), 1);
    // Restored after the base ejection time.
    tokio::time::advance(Duration::from_secs(29)).await;
    assert!(c.is_ejected(a, Instant::now()));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(!c.is_ejected(a, Instant::now()));
    // The second ejection lasts twice as long.
    let now = Instant::now();
    for _ in 0..3 {
        c.record(a, Outcome::Status(503), now);
    }
    assert_eq!(a.ejections(), 2);
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(c.is_ejected(a, Instant::now()));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(!c.is_ejected(a, Instant::now()));
}

#[tokio::test(start_paused = true)]
async fn no_outlier_detection_no_ejection() {
    let store = ConfigStore::new();
    store.publish(cluster(&[1], None));
    let registry = ClusterRegistry::new(store);
    let c = registry.get("c").unwrap();
    let ep = c.endpoints()[0].clone();
    for _ in 0..100 {
        assert!(!c.record(&ep, Outcome::Status(503), Instant::now()));
    }
}

#[tokio::test(start_paused = true)]
async fn state_survives_configuration_updates() {
    let store = ConfigStore::new();
    store.publish(cluster(&[1, 2], Some(od(1, 100))));
    let registry = ClusterRegistry::new(store.clone());
    let c = registry.get("c").unwrap();
    let a = c.endpoints()[0].clone();
    let _held = c.try_acquire().unwrap();
    assert!(c.record(&a, Outcome::Status(503), Instant::now()));
    // A new snapshot that keeps endpoint 1 and adds 3.
    store.publish(cluster(&[1, 3], Some(od(1, 100))));
    let same = registry.get("c").unwrap();
    assert!(Arc::ptr_eq(&c, &same), "the cluster runtime is kept");
    assert_eq!(same.active_requests(), 1, "breaker counters carry over");
    let a2 = same
        .endpoints()
        .iter()
        .find(|e| e.address.port() == 1)
        .cloned()
        .unwrap();
    assert!(same.is_ejected(&a2, Instant::now()), "ejections carry over");
    let ports: Vec<u16> = same.endpoints().iter().map(|e| e.address.port()).collect();
    assert_eq!(ports, vec![1, 3], "endpoint 2 removed, 3 added");
    // Removing the cluster drops it from the registry; holders keep their Arc.
    store.publish(Snapshot::default());
    assert!(registry.get("c").is_none());
}

#[tokio::test(start_paused = true)]
async fn success_rate_and_failure_percentage_detectors() {
    let mut detector = od(1000, 100);
    detector.consecutive_5xx = None;
    detector.interval = Duration::from_secs(10);
    detector.success_rate = Some(SuccessRateEjection {
        minimum_hosts: 5,
        request_volume: 20,
        stdev_factor: 1000,
        enforcing: 100,
    });
    let store = ConfigStore::new();
    store.publish(cluster(&[1, 2, 3, 4, 5, 6], Some(detector.clone())));
    let registry = ClusterRegistry::new(store.clone());
    let c = registry.get("c").unwrap();
    let eps = c.endpoints();
    let now = Instant::now();
    // One interval: five hosts succeed, the sixth fails half of its requests (never five in a
    // row, so only the interval detectors can see it).
    c.record(&eps[0], Outcome::Status(200), now);
    for i in 0..40 {
        for e in &eps[..5] {
            c.record(e, Outcome::Status(200), now);
        }
        let status = if i % 2 == 0 { 503 } else { 200 };
        c.record(&eps[5], Outcome::Status(status), now);
    }
    assert_eq!(
        c.ejected(now),
        0,
        "nothing happens before the interval ends"
    );
    tokio::time::advance(Duration::from_secs(10)).await;
    c.record(&eps[0], Outcome::Status(200), Instant::now());
    assert!(
        c.is_ejected(&eps[5], Instant::now()),
        "below mean - stdev: ejected by success rate"
    );
    assert_eq!(c.ejected(Instant::now()), 1);

    // Failure percentage: 85% failures or more among hosts with 50 requests.
    let mut detector = od(1000, 100);
    detector.consecutive_5xx = None;
    detector.success_rate = None;
    detector.failure_percentage = Some(FailurePercentageEjection {
        threshold: 85,
        minimum_hosts: 2,
        request_volume: 50,
        enforcing: 100,
    });
    store.publish(cluster(&[7, 8], Some(detector)));
    let c = registry.get("c").unwrap();
    let eps = c.endpoints();
    let now = Instant::now();
    c.record(&eps[0], Outcome::Status(200), now);
    for i in 0..60 {
        c.record(&eps[0], Outcome::Status(200), now);
        c.record(
            &eps[1],
            Outcome::Status(if i % 10 == 0 { 200 } else { 500 }),
            now,
        );
    }
    tokio::time::advance(Duration::from_secs(10)).await;
    c.record(&eps[0], Outcome::Status(200), Instant::now());
    assert!(
        c.is_ejected(&eps[1], Instant::now()),
        "90% failures: ejected"
    );
    assert!(!c.is_ejected(&eps[0], Instant::now()));
}

/// Share of `n` picks that went to the endpoint on `port`.
fn share_of(registry: &ClusterRegistry, port: u16, n: usize) -> f64 {
    use super::balance::{ByConfig, PickEndpoint};
    let c = registry.get("c").unwrap();
    let endpoints = c.endpoints();
    let hits = (0..n)
        .filter(|_| ByConfig::default().pick(&c, &endpoints).address.port() == port)
        .count();
    hits as f64 / n as f64
}

#[tokio::test(start_paused = true)]
async fn slow_start_ramps_a_new_endpoint_up_over_its_window() {
    for policy in [
        LbPolicy::RoundRobin,
        LbPolicy::Random,
        LbPolicy::LeastRequest { choice_count: 2 },
    ] {
        let ss = SlowStart {
            window: Duration::from_secs(10),
            aggression: 1.0,
            min_weight: 0.1,
        };
        let store = ConfigStore::new();
        // The first assignment's endpoints serve at full weight at once.
        store.publish(cluster_with(
            &[1, 2],
            None,
            policy.clone(),
            Some(ss.clone()),
        ));
        let registry = ClusterRegistry::new(store.clone());
        let first = share_of(&registry, 2, 20_000);
        assert!(
            (0.45..0.55).contains(&first),
            "{policy:?}: initial endpoint share {first}"
        );
        // Endpoint 3 arrives later: it starts at the minimum weight (0.1 of 1 + 0.1 + ... ).
        store.publish(cluster_with(
            &[1, 2, 3],
            None,
            policy.clone(),
            Some(ss.clone()),
        ));
        let start = share_of(&registry, 3, 20_000);
        // Weights 1, 1, 0.1: 0.1 / 2.1 ≈ 4.8 %.
        assert!(
            (0.03..0.07).contains(&start),
            "{policy:?}: share at t=0 {start}"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        // Weights 1, 1, 0.5: 20 %.
        let mid = share_of(&registry, 3, 20_000);
        assert!(
            (0.17..0.23).contains(&mid),
            "{policy:?}: share at t=5s {mid}"
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        let done = share_of(&registry, 3, 20_000);
        assert!(
            (0.30..0.37).contains(&done),
            "{policy:?}: share after the window {done}"
        );
        // Without slow start a new endpoint takes its full share at once.
        store.publish(cluster_with(&[1, 2, 3, 4], None, policy.clone(), None));
        let plain = share_of(&registry, 4, 20_000);
        assert!(
            (0.22..0.28).contains(&plain),
            "{policy:?}: no slow start {plain}"
        );
    }
}

fn eds_cluster(name: &str, eds: &str) -> Cluster {
    let mut c = cluster(&[], None).cluster("c").unwrap().as_ref().clone();
    c.name = name.into();
    c.discovery = Discovery::Eds {
        service_name: eds.into(),
    };
    c
}

fn assignment(eds: &str, ports: &[u16]) -> EndpointAssignment {
    let mut cla = match &cluster(ports, None).cluster("c").unwrap().discovery {
        Discovery::Static(cla) => cla.as_ref().clone(),
        _ => unreachable!(),
    };
    cla.cluster_name = eds.into();
    cla
}

fn ports(registry: &ClusterRegistry, name: &str) -> Vec<u16> {
    let c = registry.get(name).unwrap();
    c.endpoints().iter().map(|e| e.address.port()).collect()
}

/// The registry visits only what changed between two snapshots: an EDS update reaches the
/// clusters that use that assignment (and only those are touched), a cluster that moves to
/// another EDS name follows the new one, and a removed cluster retires.
#[tokio::test(start_paused = true)]
async fn the_registry_applies_what_changed() {
    let store = ConfigStore::new();
    let mut snap = Snapshot::default();
    for i in 0..50 {
        snap.set_cluster(Arc::new(eds_cluster(&format!("c{i}"), &format!("e{i}"))));
        snap.set_endpoints(Arc::new(assignment(&format!("e{i}"), &[i])));
    }
    // Two clusters share one assignment.
    snap.set_cluster(Arc::new(eds_cluster("twin", "e7")));
    store.publish(snap.clone());
    let registry = ClusterRegistry::new(store.clone());
    assert_eq!(ports(&registry, "c7"), [7]);
    assert_eq!(ports(&registry, "twin"), [7]);
    let untouched = registry.get("c3").unwrap().endpoints();

    snap.set_endpoints(Arc::new(assignment("e7", &[70, 71])));
    store.publish(snap.clone());
    assert_eq!(ports(&registry, "c7"), [70, 71]);
    assert_eq!(
        ports(&registry, "twin"),
        [70, 71],
        "both users of e7 follow it"
    );
    assert!(
        Arc::ptr_eq(&untouched, &registry.get("c3").unwrap().endpoints()),
        "a cluster whose config and assignment did not change is not rebuilt"
    );

    // `twin` moves to e9; an update of e7 no longer reaches it, one of e9 does.
    snap.set_cluster(Arc::new(eds_cluster("twin", "e9")));
    store.publish(snap.clone());
    assert_eq!(ports(&registry, "twin"), [9]);
    snap.set_endpoints(Arc::new(assignment("e7", &[72])));
    snap.set_endpoints(Arc::new(assignment("e9", &[90])));
    store.publish(snap.clone());
    assert_eq!(ports(&registry, "c7"), [72]);
    assert_eq!(ports(&registry, "twin"), [90]);
    assert_eq!(ports(&registry, "c9"), [90]);

    // An assignment that goes away leaves its clusters with no endpoints; one that comes
    // back is applied.
    assert!(snap.remove_endpoints("e9"));
    store.publish(snap.clone());
    assert!(ports(&registry, "twin").is_empty());
    snap.set_endpoints(Arc::new(assignment("e9", &[91])));
    store.publish(snap.clone());
    assert_eq!(ports(&registry, "twin"), [91]);

    // A removed cluster retires: gone for new routing, still there for a request routed
    // before; the others stay.
    assert!(snap.remove_cluster("c5"));
    store.publish(snap.clone());
    assert!(registry.get("c5").is_none());
    assert!(registry.get_routed("c5").is_some());
    assert_eq!(ports(&registry, "c6"), [6]);
}

/// Each snapshot is applied by its publisher before readers can load it: a publish from a
/// plain thread (as from the xDS client's own thread) leaves the registry on the new
/// generation the moment it returns, so no request applies it; what a cluster spawns (a DNS
/// cluster's resolver) runs on the registry's runtime; a dropped registry stops following.
#[tokio::test]
async fn the_publisher_applies_each_snapshot() {
    let store = ConfigStore::new();
    let registry = ClusterRegistry::new(store.clone());
    let publisher = store.clone();
    let generation = std::thread::spawn(move || {
        let mut snap = Snapshot::default();
        snap.set_cluster(Arc::new(eds_cluster("c1", "e1")));
        snap.set_endpoints(Arc::new(assignment("e1", &[1])));
        let mut dns = eds_cluster("dns", "unused");
        dns.discovery = Discovery::Dns(Arc::new(DnsDiscovery {
            logical: false,
            localities: vec![DnsLocality {
                locality: Locality::default(),
                weight: 1,
                priority: 0,
                targets: vec![DnsTarget {
                    host: "127.0.0.1".into(),
                    port: 4242,
                    weight: 1,
                    health: HealthStatus::Unknown,
                }],
            }],
            refresh_rate: Duration::from_secs(5),
            respect_ttl: false,
            family: DnsLookupFamily::Auto,
            nameservers: Vec::new(),
        }));
        snap.set_cluster(Arc::new(dns));
        let generation = publisher.publish(snap);
        // Nothing has loaded the snapshot yet: the publisher applied it.
        (generation, registry.applied_generation(), registry)
    })
    .join()
    .expect("a publish from a thread without a runtime");
    let (generation, applied, registry) = generation;
    assert_eq!(applied, generation);
    assert_eq!(ports(&registry, "c1"), [1]);
    let resolved = async {
        while ports(&registry, "dns") != [4242] {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), resolved)
        .await
        .expect("the DNS cluster resolved on the registry's runtime");
    drop(registry);
    store.publish(Snapshot::default());
}
