//! The route layer against tower-test mocks.

use std::sync::Arc;

use futures::FutureExt;
use http::{Request, Response};
use mesh_core::config::*;
use mesh_core::ConfigStore;
use tower::{Layer, Service, ServiceExt};

use super::*;
use crate::error::MeshError;

fn fwd(cluster: ClusterSpecifier) -> ForwardAction {
    let mut f = ForwardAction::to_cluster("unused");
    f.cluster = cluster;
    f
}

fn route(name: &str, matcher: RouteMatch, action: RouteAction) -> mesh_core::config::Route {
    mesh_core::config::Route {
        name: name.into(),
        matcher,
        action,
        request_headers: HeaderMutation::default(),
        response_headers: HeaderMutation::default(),
        fault: None,
        rbac: Vec::new(),
    }
}

fn store() -> ConfigStore {
    store_with(RequestPolicy::default())
}

fn store_with(request: RequestPolicy) -> ConfigStore {
    let mut canary = RouteMatch::prefix("/");
    canary.headers.push(HeaderMatcher {
        name: "x-canary".into(),
        kind: HeaderMatch::Present(true),
        invert: false,
        treat_missing_as_empty: false,
    });
    let mut rewritten = fwd(ClusterSpecifier::Cluster("api".into()));
    rewritten.prefix_rewrite = Some("/v2/".into());
    let mut api_route = route(
        "api",
        RouteMatch::prefix("/api/"),
        RouteAction::Forward(rewritten),
    );
    api_route.request_headers.add.push(HeaderAdd {
        name: http::HeaderName::from_static("x-mesh-route"),
        value: http::HeaderValue::from_static("api"),
        action: AppendAction::Overwrite,
    });
    let rc = RouteConfig {
        name: "rc".into(),
        virtual_hosts: vec![VirtualHost {
            name: "svc".into(),
            domains: vec![DomainMatcher::parse("svc").unwrap()],
            routes: vec![
                api_route,
                route(
                    "canary",
                    canary,
                    RouteAction::Forward(fwd(ClusterSpecifier::Cluster("v2".into()))),
                ),
                route(
                    "moved",
                    RouteMatch::prefix("/old/"),
                    RouteAction::Redirect(Redirect {
                        status: 308,
                        scheme: Some("https".into()),
                        host: None,
                        port: None,
                        path: RedirectPath::Prefix("/new/".into()),
                        strip_query: false,
                    }),
                ),
                route(
                    "gone",
                    RouteMatch::prefix("/gone"),
                    RouteAction::DirectResponse {
                        status: 410,
                        body: bytes::Bytes::from_static(b"gone\xff"),
                        content_type: None,
                    },
                ),
                route(
                    "split",
                    RouteMatch::prefix("/"),
                    RouteAction::Forward(fwd(ClusterSpecifier::Weighted(WeightedClusters {
                        clusters: ["v1", "v2"]
                            .iter()
                            .zip([90, 10])
                            .map(|(n, w)| ClusterWeight {
                                name: (*n).into(),
                                weight: w,
                                request_headers: HeaderMutation::default(),
                                response_headers: HeaderMutation::default(),
                                fault: None,
                            })
                            .collect(),
                        total: 100,
                    }))),
                ),
            ],
            retry_policy: None,
            request_headers: HeaderMutation::default(),
            response_headers: HeaderMutation::default(),
            fault: None,
            rbac: Vec::new(),
        }],
        ignore_port_in_host_matching: false,
        request_headers: HeaderMutation::default(),
        response_headers: HeaderMutation::default(),
    };
    let listener = Listener {
        name: "svc:80".into(),
        kind: ListenerKind::Api(HttpConnectionManager {
            routes: RouteSource::Inline(Arc::new(rc)),
            http_filters: vec![],
            max_stream_duration: None,
            request,
        }),
    };
    let store = ConfigStore::new();
    store.publish(Snapshot::default().with_listener(listener));
    store
}

type Mock = tower_test::mock::Mock<Request<()>, Response<()>>;
type Handle = tower_test::mock::Handle<Request<()>, Response<()>>;

fn svc(store: ConfigStore) -> (super::Route<Mock>, Handle) {
    let (mock, handle) = tower_test::mock::pair();
    (RouteLayer::new(store, "svc:80").layer(mock), handle)
}

async fn routed(
    svc: &mut super::Route<Mock>,
    handle: &mut Handle,
    req: Request<()>,
) -> Request<()> {
    let fut = svc.ready().await.unwrap().call(req);
    let (req, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(()));
    fut.await.unwrap();
    req
}

fn get(path: &str) -> Request<()> {
    Request::get(format!("http://svc{path}")).body(()).unwrap()
}

#[tokio::test]
async fn routes_by_path_and_header_with_rewrites() {
    let (mut svc, mut handle) = svc(store());
    handle.allow(100);
    let req = routed(&mut svc, &mut handle, get("/api/users?id=1")).await;
    let d = req.extensions().get::<RouteDecision>().unwrap();
    assert_eq!((d.route_name(), d.cluster()), ("api", "api"));
    assert_eq!(
        req.uri().path_and_query().unwrap().as_str(),
        "/v2/users?id=1",
        "prefix rewrite keeps the query"
    );
    assert_eq!(req.headers()["x-mesh-route"], "api");
    let mut canary = get("/");
    canary
        .headers_mut()
        .insert("x-canary", "1".parse().unwrap());
    let req = routed(&mut svc, &mut handle, canary).await;
    assert_eq!(
        req.extensions().get::<RouteDecision>().unwrap().cluster(),
        "v2"
    );
}

#[tokio::test]
async fn weighted_split_follows_weights() {
    let (mut svc, mut handle) = svc(store());
    handle.allow(20_000);
    let mut v2 = 0;
    for _ in 0..10_000 {
        let req = routed(&mut svc, &mut handle, get("/")).await;
        if req.extensions().get::<RouteDecision>().unwrap().cluster() == "v2" {
            v2 += 1;
        }
    }
    // 10% of 10 000 with a standard deviation of 30: well inside ±200.
    assert!((800..=1200).contains(&v2), "{v2}");
}

#[tokio::test]
async fn errors_without_calling_inner() {
    let (mut svc, mut handle) = svc(store());
    // The inner service is never called for these: the mock would record it.
    handle.allow(1);
    let e = svc
        .ready()
        .await
        .unwrap()
        .call(get("/gone"))
        .await
        .unwrap_err();
    let e = e.downcast::<MeshError>().unwrap();
    // The body is kept as bytes: a non-UTF-8 byte survives.
    assert!(
        matches!(&*e, MeshError::DirectResponse { status: 410, body, .. } if body.as_ref() == b"gone\xff"),
        "{e}"
    );
    // A redirect answers with its status and a location built as Envoy builds it.
    let e = svc
        .ready()
        .await
        .unwrap()
        .call(get("/old/page?x=1"))
        .await
        .unwrap_err();
    let e = e.downcast::<MeshError>().unwrap();
    let MeshError::DirectResponse {
        status, headers, ..
    } = &*e
    else {
        panic!("{e}")
    };
    assert_eq!(*status, 308);
    assert_eq!(headers[http::header::LOCATION], "https://svc/new/page?x=1");
    let e = svc
        .ready()
        .await
        .unwrap()
        .call(Request::get("http://other/").body(()).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "no route for other/ in listener \"svc:80\"");
    assert!(
        handle.next_request().now_or_never().is_none(),
        "nothing reached the inner service"
    );
    let (mut empty, mut h) = super::tests::svc(ConfigStore::new());
    h.allow(1);
    let e = empty
        .ready()
        .await
        .unwrap()
        .call(get("/"))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "listener \"svc:80\" has no route configuration yet"
    );
}

#[tokio::test]
async fn a_new_snapshot_applies_to_the_next_request() {
    let store = store();
    let (mut svc, mut handle) = svc(store.clone());
    handle.allow(10);
    let mut canary = get("/");
    canary
        .headers_mut()
        .insert("x-canary", "1".parse().unwrap());
    let req = routed(&mut svc, &mut handle, canary).await;
    assert_eq!(
        req.extensions().get::<RouteDecision>().unwrap().cluster(),
        "v2"
    );
    // Replace the listener: everything to "v3".
    let mut snap = (*store.load()).clone();
    let mut l = (**snap.listener("svc:80").unwrap()).clone();
    if let ListenerKind::Api(hcm) = &mut l.kind {
        let RouteSource::Inline(rc) = &hcm.routes else {
            unreachable!()
        };
        let mut rc = (**rc).clone();
        rc.virtual_hosts[0].routes = vec![route(
            "all",
            RouteMatch::prefix("/"),
            RouteAction::Forward(fwd(ClusterSpecifier::Cluster("v3".into()))),
        )];
        hcm.routes = RouteSource::Inline(Arc::new(rc));
    }
    snap.set_listener(Arc::new(l));
    store.publish(snap);
    let req = routed(&mut svc, &mut handle, get("/")).await;
    assert_eq!(
        req.extensions().get::<RouteDecision>().unwrap().cluster(),
        "v3"
    );
}

/// `cluster_header` routes only to clusters that exist: the header is the caller's input.
#[tokio::test]
async fn a_cluster_named_by_a_header_must_exist() {
    let store = store();
    let mut snap = (*store.load()).clone();
    let mut l = (**snap.listener("svc:80").unwrap()).clone();
    if let ListenerKind::Api(hcm) = &mut l.kind {
        let RouteSource::Inline(rc) = &hcm.routes else {
            unreachable!()
        };
        let mut rc = (**rc).clone();
        rc.virtual_hosts[0].routes = vec![route(
            "by-header",
            RouteMatch::prefix("/"),
            RouteAction::Forward(fwd(ClusterSpecifier::Header(
                http::HeaderName::from_static("x-cluster"),
            ))),
        )];
        hcm.routes = RouteSource::Inline(Arc::new(rc));
    }
    snap.set_listener(Arc::new(l));
    snap.set_cluster(Arc::new(Cluster {
        name: "known".into(),
        discovery: Discovery::Eds {
            service_name: "known".into(),
        },
        lb_policy: LbPolicy::RoundRobin,
        locality_weighted: false,
        slow_start: None,
        circuit_breakers: CircuitBreakers::default(),
        outlier_detection: None,
        connect_timeout: std::time::Duration::from_secs(1),
        protocol: UpstreamProtocol::Http1,
        http2: None,
        max_requests_per_connection: None,
        tls: None,
    }));
    store.publish(snap);
    let (mut svc, mut handle) = svc(store);
    handle.allow(10);
    let mut known = get("/");
    known
        .headers_mut()
        .insert("x-cluster", "known".parse().unwrap());
    let req = routed(&mut svc, &mut handle, known).await;
    assert_eq!(
        req.extensions().get::<RouteDecision>().unwrap().cluster(),
        "known"
    );
    let mut unknown = get("/");
    unknown
        .headers_mut()
        .insert("x-cluster", "attacker-chosen-1".parse().unwrap());
    let err = svc.ready().await.unwrap().call(unknown).await.unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<MeshError>(),
            Some(MeshError::UnknownCluster { cluster }) if cluster == "attacker-chosen-1"
        ),
        "{err}"
    );
}

/// The client listener's request policy runs before routing: a dotted path routes as the
/// path it stands for, and the upstream gets the normalized path.
#[tokio::test]
async fn the_listener_request_policy_runs_before_routing() {
    let policy = RequestPolicy {
        normalize_path: true,
        merge_slashes: true,
        ..Default::default()
    };
    let (mut svc, mut handle) = svc(store_with(policy));
    let e = svc
        .ready()
        .await
        .unwrap()
        .call(get("/api/..//gone"))
        .await
        .unwrap_err();
    let e = e.downcast::<MeshError>().unwrap();
    assert!(
        matches!(&*e, MeshError::DirectResponse { status: 410, .. }),
        "{e}"
    );
    let req = routed(&mut svc, &mut handle, get("/x/../api//items")).await;
    assert_eq!(
        req.uri().path(),
        "/v2/items",
        "normalized, then the route's prefix rewrite"
    );

    let reject = RequestPolicy {
        escaped_slashes: EscapedSlashes::Reject,
        ..Default::default()
    };
    let (mut svc, _handle) = self::svc(store_with(reject));
    let e = svc
        .ready()
        .await
        .unwrap()
        .call(get("/api%2Fitems"))
        .await
        .unwrap_err();
    let e = e.downcast::<MeshError>().unwrap();
    assert!(
        matches!(&*e, MeshError::DirectResponse { status: 400, .. }),
        "{e}"
    );
}
