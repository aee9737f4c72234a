use std::time::Duration;

use super::*;
use std::sync::atomic::Ordering;

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
                ["direction", "route", "cluster", "peer", "outcome", "le"].contains(&k.as_str()),
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
        peer: false,
    });
    let a = m.series(Direction::Inbound, "r1", "c");
    let b = m.series(Direction::Inbound, "r2", "c");
    assert!(
        std::sync::Arc::ptr_eq(&a, &b),
        "route label off: one series"
    );
    let c = m.series_with_peer(Direction::Inbound, "r1", "c", "spiffe://td/ns/a/sa/b");
    assert!(std::sync::Arc::ptr_eq(&a, &c), "peer label off: one series");
    let on = Metrics::default();
    let p1 = on.series_with_peer(Direction::Inbound, "", "c", "spiffe://td/ns/a/sa/b");
    let p2 = on.series_with_peer(Direction::Inbound, "", "c", "spiffe://td/ns/a/sa/c");
    assert!(!std::sync::Arc::ptr_eq(&p1, &p2));
    p1.record(Outcome::Http(200), Duration::from_millis(1));
    assert!(on
        .render()
        .contains(r#"peer="spiffe://td/ns/a/sa/b",outcome="2xx"} 1"#));
}

/// A gRPC response is judged by the status in its trailers, once its body ends; a
/// trailers-only response by its headers; an abandoned stream counts as CANCELLED.
#[tokio::test]
async fn grpc_outcomes_come_from_trailers() {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tower::{Layer, ServiceExt};

    type GrpcBody = http_body_util::StreamBody<
        futures::stream::Iter<
            std::vec::IntoIter<Result<http_body::Frame<Bytes>, std::convert::Infallible>>,
        >,
    >;

    fn grpc_response(
        head_status: Option<&'static str>,
        trailer_status: &'static str,
    ) -> http::Response<GrpcBody> {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", trailer_status.parse().unwrap());
        let frames = vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let mut resp = http::Response::new(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )));
        resp.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        if let Some(s) = head_status {
            resp.headers_mut().insert("grpc-status", s.parse().unwrap());
        }
        resp
    }

    let m = Metrics::default();
    let layer = MetricsLayer::new(m.clone(), Direction::Inbound).service("greeter");
    let series = m.series(Direction::Inbound, "", "greeter");
    let call = |head, trailer| {
        layer
            .layer(tower::service_fn(
                move |_req: http::Request<String>| async move {
                    Ok::<_, std::convert::Infallible>(grpc_response(head, trailer))
                },
            ))
            .oneshot(http::Request::new(String::new()))
    };
    let resp = call(None, "14").await.unwrap();
    assert_eq!(series.total(), 0, "not judged before the trailers");
    assert_eq!(series.in_flight(), 1);
    resp.into_body().collect().await.unwrap();
    assert_eq!(series.in_flight(), 0);
    let resp = call(None, "0").await.unwrap();
    resp.into_body().collect().await.unwrap();
    // Trailers-only: judged at once by its headers.
    let resp = call(Some("8"), "0").await.unwrap();
    assert_eq!(series.total(), 3);
    drop(resp);
    // The caller stops reading.
    drop(call(None, "0").await.unwrap());
    let outcomes: std::collections::HashMap<_, _> = series.outcomes().into_iter().collect();
    assert_eq!(outcomes["UNAVAILABLE"], 1);
    assert_eq!(outcomes["OK"], 1);
    assert_eq!(outcomes["RESOURCE_EXHAUSTED"], 1);
    assert_eq!(outcomes["CANCELLED"], 1);
    assert_eq!(series.total(), 4);
    assert_eq!(
        series.successes(),
        2,
        "UNAVAILABLE and RESOURCE_EXHAUSTED count as failures"
    );
}

/// The layer's series cache must never record into another label set's series: alternating
/// peers, and two services made from one layer, each keep their own counts.
#[test]
fn cached_series_follow_their_labels() {
    use futures::FutureExt;
    use tower::{Layer, Service};
    let m = Metrics::default();
    let base = MetricsLayer::new(m.clone(), Direction::Inbound);
    let app = || {
        tower::service_fn(|_req: http::Request<String>| {
            std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(
                String::new(),
            )))
        })
    };
    let mut a = base.clone().service("a").layer(app());
    let mut b = base.service("b").layer(app());
    let peer = |id: Option<&str>| {
        let mut r = http::Request::new(String::new());
        if let Some(id) = id {
            r.extensions_mut().insert(crate::ext::PeerIdentity(Some(
                id.parse::<mesh_core::identity::SpiffeId>().unwrap(),
            )));
        }
        r
    };
    let x = "spiffe://cluster.local/ns/default/sa/x";
    let y = "spiffe://cluster.local/ns/default/sa/y";
    for i in 0..30 {
        let id = match i % 3 {
            0 => Some(x),
            1 => Some(y),
            _ => None,
        };
        drop(a.call(peer(id)).now_or_never());
        if i % 2 == 0 {
            drop(b.call(peer(id)).now_or_never());
        }
    }
    let count = |cluster: &str, p: &str| {
        m.all(Direction::Inbound)
            .into_iter()
            .find(|l| l.cluster == cluster && l.peer == p)
            .map_or(0, |l| l.series.total())
    };
    assert_eq!((count("a", x), count("a", y), count("a", "")), (10, 10, 10));
    assert_eq!((count("b", x), count("b", y), count("b", "")), (5, 5, 5));
}

/// Histogram buckets are cumulative once, as Prometheus reads them: 1 ms, 3 ms and 2 s give
/// le=0.001 → 1, le=0.005 → 2, le=2.5 → 3, +Inf → 3 (the encoder accumulates; the
/// counts handed to it are per bucket). Istio's histograms likewise.
#[test]
fn histogram_buckets_are_cumulative_once() {
    let metrics = Metrics::default().istio(super::Workload::from_node(&Default::default()));
    let s = metrics.series(Direction::Outbound, "r", "c");
    for ms in [1, 3, 2000] {
        s.record(Outcome::Http(200), Duration::from_millis(ms));
    }
    let text = metrics.render();
    let bucket = |le: &str| -> u64 {
        text.lines()
            .find(|l| {
                l.starts_with("mesh_request_duration_seconds_bucket{")
                    && l.contains(&format!("le=\"{le}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("le={le}: {text}"))
    };
    assert_eq!(
        [
            bucket("0.001"),
            bucket("0.005"),
            bucket("1.0"),
            bucket("2.5"),
            bucket("+Inf")
        ],
        [1, 2, 2, 3, 3]
    );
}
