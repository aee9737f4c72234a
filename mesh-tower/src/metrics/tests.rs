use std::time::Duration;

use super::*;

#[test]
fn records_and_renders_parseable_prometheus_text() {
    let m = Metrics::default();
    let s = m.series(Direction::Outbound, "default", "outbound|80|v1|svc");
    for _ in 0..7 {
        s.record(Outcome::Http(200), Duration::from_millis(3));
    }
    s.record(Outcome::Http(503), Duration::from_millis(40));
    s.record(Outcome::Grpc(14), Duration::from_micros(50));
    s.record(Outcome::Error, Duration::from_secs(20));
    m.counters().retries.fetch_add(2, Ordering::Relaxed);
    assert!(std::sync::Arc::ptr_eq(
        &s,
        &m.series(Direction::Outbound, "default", "outbound|80|v1|svc")
    ));
    assert_eq!(s.total(), 10);
    assert_eq!(s.successes(), 7);
    assert_eq!(s.quantile(0.5), Some(Duration::from_secs_f64(0.005)));
    assert_eq!(
        s.quantile(0.99),
        Some(Duration::from_secs(10)),
        "beyond the last bucket: capped"
    );
    let text = m.render();
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let parsed = prometheus_parse::Scrape::parse(lines.into_iter().map(Ok)).unwrap();
    let value = |name: &str, outcome: &str| {
        parsed
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get("outcome") == Some(outcome))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => -1.0,
            })
    };
    assert_eq!(value("mesh_requests_total", "2xx"), Some(7.0), "{text}");
    assert_eq!(value("mesh_requests_total", "5xx"), Some(1.0));
    assert_eq!(value("mesh_requests_total", "UNAVAILABLE"), Some(1.0));
    assert_eq!(value("mesh_requests_total", "error"), Some(1.0));
    assert!(text.contains("mesh_retries_total 2"), "{text}");
    // Bounded labels: only direction, route, cluster, outcome (and le for buckets).
    for s in &parsed.samples {
        for (k, _) in s.labels.iter() {
            assert!(
                ["direction", "route", "cluster", "outcome", "le"].contains(&k.as_str()),
                "unexpected label {k}"
            );
        }
    }
}

#[test]
fn labels_can_be_turned_off() {
    let m = Metrics::new(LabelConfig {
        route: false,
        cluster: true,
    });
    let a = m.series(Direction::Inbound, "r1", "c");
    let b = m.series(Direction::Inbound, "r2", "c");
    assert!(
        std::sync::Arc::ptr_eq(&a, &b),
        "route label off: one series"
    );
}
