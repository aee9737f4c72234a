//! The retry layer against tower-test mocks, on paused time.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use mesh_core::config::*;
use mesh_core::ConfigStore;
use tower::{Layer, Service, ServiceExt};

use super::*;
use crate::cluster::{ClusterRegistry, MeshBody};
use crate::route::{decide, RouteDecision};

fn policy(retry_on: &str, num_retries: u32, per_try: Option<Duration>) -> RetryPolicy {
    RetryPolicy {
        retry_on: RetryOn::parse(retry_on).0,
        num_retries,
        per_try_timeout: per_try,
        backoff: RetryBackoff {
            base: Duration::from_millis(10),
            max: Duration::from_millis(50),
        },
        retriable_status_codes: vec![418],
        previous_hosts: true,
        host_selection_max_attempts: 3,
    }
}

fn snapshot(p: RetryPolicy, max_retries: u32) -> (Arc<RouteConfig>, Snapshot) {
    snapshot_with(Some(p), max_retries, Vec::new())
}

fn snapshot_with(
    p: Option<RetryPolicy>,
    max_retries: u32,
    mirrors: Vec<MirrorPolicy>,
) -> (Arc<RouteConfig>, Snapshot) {
    let mut fwd = ForwardAction::to_cluster("c");
    fwd.retry_policy = p;
    fwd.mirrors = mirrors;
    let rc = Arc::new(RouteConfig {
        name: "rc".into(),
        virtual_hosts: vec![VirtualHost {
            name: "vh".into(),
            domains: vec![DomainMatcher::Any],
            routes: vec![Route {
                name: "r".into(),
                matcher: RouteMatch::prefix("/"),
                action: RouteAction::Forward(fwd),
                request_headers: HeaderMutation::default(),
                response_headers: HeaderMutation::default(),
                fault: None,
                rbac: Vec::new(),
            }],
            retry_policy: None,
            request_headers: HeaderMutation::default(),
            response_headers: HeaderMutation::default(),
            fault: None,
            rbac: Vec::new(),
        }],
        ignore_port_in_host_matching: false,
        request_headers: HeaderMutation::default(),
        response_headers: HeaderMutation::default(),
    });
    let cluster = Cluster {
        name: "c".into(),
        discovery: Discovery::Static(Arc::new(EndpointAssignment {
            cluster_name: "c".into(),
            localities: vec![],
            drop_overloads: vec![],
        })),
        lb_policy: LbPolicy::RoundRobin,
        locality_weighted: false,
        slow_start: None,
        circuit_breakers: CircuitBreakers {
            default: Thresholds {
                max_retries,
                ..Thresholds::default()
            },
            ..CircuitBreakers::default()
        },
        outlier_detection: None,
        connect_timeout: Duration::from_secs(1),
        protocol: UpstreamProtocol::Http1,
        http2: None,
        max_requests_per_connection: None,
        tls: None,
    };
    (rc, Snapshot::default().with_cluster(cluster))
}

type Mock = tower_test::mock::Mock<Request<MeshBody>, Response<()>>;
type Handle = tower_test::mock::Handle<Request<MeshBody>, Response<()>>;

fn setup(
    p: RetryPolicy,
    max_retries: u32,
) -> (Retry<Mock>, Handle, Arc<RouteConfig>, Arc<ClusterRegistry>) {
    let (rc, snap) = snapshot(p, max_retries);
    let store = ConfigStore::new();
    store.publish(snap);
    let registry = ClusterRegistry::new(store);
    let (mock, handle) = tower_test::mock::pair();
    (
        RetryLayer::new(registry.clone()).max_buffer(16).layer(mock),
        handle,
        rc,
        registry,
    )
}

fn request(rc: &Arc<RouteConfig>, body: &'static str) -> Request<MeshBody> {
    let mut req = Request::post("http://svc/x")
        .body(
            Full::new(Bytes::from_static(body.as_bytes()))
                .map_err(|n| match n {})
                .boxed_unsync(),
        )
        .unwrap();
    let d = decide(rc.clone(), "l", &mut req, 0).unwrap();
    req.extensions_mut().insert(d);
    req
}

fn response(status: u16, port: u16) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
    r.extensions_mut()
        .insert(ServedBy(([127, 0, 0, 1], port).into()));
    r
}

#[tokio::test(start_paused = true)]
async fn retries_a_retriable_status_on_another_host_with_the_same_body() {
    let (mut svc, mut handle, rc, _) = setup(policy("5xx", 2, None), 3);
    handle.allow(10);
    let fut = tokio::spawn(svc.ready().await.unwrap().call(request(&rc, "hello")));
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.extensions().get::<Attempt>().unwrap().number, 0);
    assert_eq!(req.into_body().collect().await.unwrap().to_bytes(), "hello");
    send.send_response(response(503, 1));
    let (req, send) = handle.next_request().await.unwrap();
    let attempt = req.extensions().get::<Attempt>().unwrap().clone();
    assert_eq!(attempt.number, 1);
    assert_eq!(
        attempt.tried,
        vec![([127, 0, 0, 1], 1).into()],
        "the retry avoids the host that failed"
    );
    assert!(attempt.avoid_tried);
    assert_eq!(
        req.into_body().collect().await.unwrap().to_bytes(),
        "hello",
        "the body is replayed"
    );
    send.send_response(response(200, 2));
    assert_eq!(fut.await.unwrap().unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn non_retriable_conditions_are_not_retried() {
    let (mut svc, mut handle, rc, _) =
        setup(policy("connect-failure,retriable-status-codes", 3, None), 3);
    handle.allow(10);
    let fut = tokio::spawn(svc.ready().await.unwrap().call(request(&rc, "")));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(response(500, 1));
    assert_eq!(fut.await.unwrap().unwrap().status(), 500);
    // 418 is in retriable_status_codes: retried.
    let fut = tokio::spawn(svc.ready().await.unwrap().call(request(&rc, "")));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(response(418, 1));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(response(200, 2));
    assert_eq!(fut.await.unwrap().unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn per_try_timeout_triggers_a_retry() {
    let (mut svc, mut handle, rc, _) = setup(policy("5xx", 1, Some(Duration::from_millis(100))), 3);
    handle.allow(10);
    let started = tokio::time::Instant::now();
    let fut = tokio::spawn(svc.ready().await.unwrap().call(request(&rc, "")));
    let (_, _never_answered) = handle.next_request().await.unwrap();
    let (_, send) = handle.next_request().await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "the retry follows the per-try timeout"
    );
    send.send_response(response(200, 2));
    assert_eq!(fut.await.unwrap().unwrap().status(), 200);
    // Out of retries: the timeout is the answer.
    let fut = tokio::spawn(svc.ready().await.unwrap().call(request(&rc, "")));
    let (_, _a) = handle.next_request().await.unwrap();
    let (_, _b) = handle.next_request().await.unwrap();
    let err = fut.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<crate::MeshError>(),
            Some(crate::MeshError::PerTryTimeout { .. })
        ),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_cap_is_sent_once() {
    let (mut svc, mut handle, rc, _) = setup(policy("5xx", 3, None), 3);
    handle.allow(10);
    let fut = tokio::spawn(
        svc.ready()
            .await
            .unwrap()
            .call(request(&rc, "a body of more than sixteen bytes")),
    );
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(
        req.into_body().collect().await.unwrap().to_bytes(),
        "a body of more than sixteen bytes"
    );
    send.send_response(response(503, 1));
    assert_eq!(fut.await.unwrap().unwrap().status(), 503, "not retried");
}

#[tokio::test(start_paused = true)]
async fn max_retries_caps_retries() {
    let (mut svc, mut handle, rc, registry) = setup(policy("5xx", 3, None), 0);
    handle.allow(10);
    let fut = tokio::spawn(svc.ready().await.unwrap().call(request(&rc, "")));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(response(503, 1));
    assert_eq!(fut.await.unwrap().unwrap().status(), 503);
    assert_eq!(registry.get("c").unwrap().retry_overflows(), 1);
}

#[test]
fn grpc_status_in_trailers_only_responses() {
    let p = policy("unavailable", 1, None);
    let mut r: Response<()> = Response::new(());
    r.headers_mut().insert("grpc-status", "14".parse().unwrap());
    assert_eq!(classify(&p, &Ok(r)), Some(RetryReason::Grpc(14)));
    let mut r: Response<()> = Response::new(());
    r.headers_mut().insert("grpc-status", "5".parse().unwrap());
    assert_eq!(classify(&p, &Ok(r)), None);
}

#[tokio::test(start_paused = true)]
async fn retry_budget_caps_concurrent_retries() {
    // Budget: 20% of active requests, at least 1 retry at a time.
    let (rc, mut snap) = snapshot(policy("5xx", 1, None), 100);
    let mut c = (**snap.cluster("c").unwrap()).clone();
    c.circuit_breakers.default.retry_budget = Some(RetryBudget {
        budget_percent: 20.0,
        min_retry_concurrency: 1,
    });
    snap.set_cluster(Arc::new(c));
    let store = ConfigStore::new();
    store.publish(snap);
    let registry = ClusterRegistry::new(store);
    let cluster = registry.get("c").unwrap();
    let (mock, mut handle) = tower_test::mock::pair();
    let mut svc = RetryLayer::new(registry.clone()).layer(mock);
    handle.allow(100);
    // Ten requests in flight (as the cluster layer counts them), all failing at once.
    let guards: Vec<_> = (0..10).map(|_| cluster.try_acquire().unwrap()).collect();
    let mut futs = Vec::new();
    for _ in 0..10 {
        futs.push(tokio::spawn(
            svc.ready().await.unwrap().call(request(&rc, "")),
        ));
    }
    let mut sends = Vec::new();
    for _ in 0..10 {
        sends.push(handle.next_request().await.unwrap().1);
    }
    for s in sends {
        s.send_response(response(503, 1));
    }
    // 20% of 10 active requests: two retries may run; the other eight give up.
    let mut retried = Vec::new();
    while let Ok(Some((_, send))) =
        tokio::time::timeout(Duration::from_secs(1), handle.next_request()).await
    {
        retried.push(send);
    }
    assert_eq!(retried.len(), 2, "the budget allows 2 concurrent retries");
    assert_eq!(cluster.retry_overflows(), 8);
    for s in retried {
        s.send_response(response(200, 2));
    }
    let statuses: Vec<u16> = futures::future::join_all(futs)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap().status().as_u16())
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 2);
    drop(guards);
}

/// A request whose body arrives frame by frame from the returned sender.
fn streamed_request(
    rc: &Arc<RouteConfig>,
) -> (tokio::sync::mpsc::Sender<Bytes>, Request<MeshBody>) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let b = rx.recv().await?;
        Some((
            Ok::<_, crate::error::BoxError>(http_body::Frame::data(b)),
            rx,
        ))
    });
    let mut req = Request::post("http://svc/x")
        .body(http_body_util::StreamBody::new(stream).boxed_unsync())
        .unwrap();
    let d = decide(rc.clone(), "l", &mut req, 0).unwrap();
    req.extensions_mut().insert(d);
    (tx, req)
}

#[tokio::test(start_paused = true)]
async fn the_first_attempt_streams_before_the_body_ends_and_a_retry_replays_it() {
    let (mut svc, mut handle, rc, _) = setup(policy("5xx", 2, None), 3);
    handle.allow(10);
    let (tx, req) = streamed_request(&rc);
    let fut = tokio::spawn(svc.ready().await.unwrap().call(req));
    // The attempt is sent with nothing of the body yet: a ping-pong stream can start.
    let (req, send) = handle.next_request().await.unwrap();
    let mut body = req.into_body();
    tx.send(Bytes::from_static(b"ping")).await.unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "ping");
    // The server fails the attempt before the body is over; the retry replays what was read
    // and reads on.
    send.send_response(response(503, 1));
    let (retry, send) = handle.next_request().await.unwrap();
    assert_eq!(retry.extensions().get::<Attempt>().unwrap().number, 1);
    tx.send(Bytes::from_static(b"pong")).await.unwrap();
    drop(tx);
    assert_eq!(
        retry.into_body().collect().await.unwrap().to_bytes(),
        "pingpong"
    );
    send.send_response(response(200, 2));
    assert_eq!(fut.await.unwrap().unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn a_streamed_body_past_the_cap_is_sent_in_full_and_not_retried() {
    let (mut svc, mut handle, rc, _) = setup(policy("5xx", 3, None), 3);
    handle.allow(10);
    let (tx, req) = streamed_request(&rc);
    let fut = tokio::spawn(svc.ready().await.unwrap().call(req));
    let (req, send) = handle.next_request().await.unwrap();
    for part in ["0123456789", "abcdefghij", "klmnop"] {
        tx.send(Bytes::from(part)).await.unwrap();
    }
    drop(tx);
    assert_eq!(
        req.into_body().collect().await.unwrap().to_bytes(),
        "0123456789abcdefghijklmnop",
        "the attempt gets all of it, past the 16-byte cap"
    );
    send.send_response(response(503, 1));
    assert_eq!(fut.await.unwrap().unwrap().status(), 503, "not retried");
}

#[tokio::test(start_paused = true)]
async fn a_route_without_retries_passes_straight_through() {
    let (rc, snap) = snapshot_with(None, 3, Vec::new());
    let store = ConfigStore::new();
    store.publish(snap);
    let (mock, mut handle) = tower_test::mock::pair::<Request<MeshBody>, Response<()>>();
    let mut svc = RetryLayer::new(ClusterRegistry::new(store)).layer(mock);
    handle.allow(10);
    let fut = tokio::spawn(svc.ready().await.unwrap().call(request(&rc, "once")));
    let (req, send) = handle.next_request().await.unwrap();
    assert!(
        req.extensions().get::<Attempt>().is_none(),
        "no attempt bookkeeping without a policy"
    );
    send.send_response(response(503, 1));
    let resp = fut.await.unwrap().unwrap();
    assert_eq!(resp.status(), 503, "not retried");
    assert_eq!(resp.extensions().get::<Retries>().map(|r| r.0), Some(0));
    assert!(
        handle.next_request().now_or_never().is_none(),
        "one request went down"
    );
}

#[tokio::test(start_paused = true)]
async fn mirror_and_retry_read_one_copy_of_the_body() {
    let mirror = MirrorPolicy {
        cluster: "c".into(),
        fraction: Fraction::ALWAYS,
        shadow_suffix: true,
    };
    let (rc, snap) = snapshot_with(Some(policy("5xx", 1, None)), 3, vec![mirror]);
    let store = ConfigStore::new();
    store.publish(snap);
    let (mock, mut handle) = tower_test::mock::pair::<Request<MeshBody>, Response<()>>();
    let retry = RetryLayer::new(ClusterRegistry::new(store)).max_buffer(16);
    let mut svc = crate::mirror::MirrorLayer::new()
        .max_buffer(16)
        .layer(retry.layer(mock));
    handle.allow(10);
    let mut req = request(&rc, "hello");
    req.headers_mut()
        .insert(http::header::HOST, http::HeaderValue::from_static("svc"));
    let fut = tokio::spawn(svc.ready().await.unwrap().call(req));
    let mut primary = Vec::new();
    let mut copies = Vec::new();
    for _ in 0..2 {
        let (req, send) = handle.next_request().await.unwrap();
        let is_mirror = req.extensions().get::<RouteDecision>().unwrap().is_mirror();
        assert!(
            req.extensions().get::<crate::replay::Replaying>().is_none(),
            "the copy's handle stays between the layers"
        );
        let attempt = req.extensions().get::<Attempt>().map(|a| a.number);
        let host = req.headers()[http::header::HOST].clone();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        if is_mirror {
            assert_eq!(attempt, None, "a mirror copy is sent once");
            assert_eq!(host, "svc-shadow");
            copies.push(body);
            send.send_response(response(200, 9));
        } else {
            assert_eq!(attempt, Some(0));
            primary.push(body);
            send.send_response(response(503, 1));
        }
    }
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.extensions().get::<Attempt>().map(|a| a.number), Some(1));
    primary.push(req.into_body().collect().await.unwrap().to_bytes());
    send.send_response(response(200, 2));
    assert_eq!(fut.await.unwrap().unwrap().status(), 200);
    assert_eq!(copies, vec!["hello"], "one mirror copy, the whole body");
    assert_eq!(
        primary,
        vec!["hello", "hello"],
        "the retry replays the same copy"
    );
}
