use std::convert::Infallible;

use http::{Request, Response};
use mesh_core::config::*;
use tower::{Service, ServiceBuilder, ServiceExt};

use super::*;

fn authenticated(id: &str) -> Principal {
    Principal::Authenticated(Some(StringMatcher::exact(id)))
}

fn policy(name: &str, permissions: Vec<Permission>, principals: Vec<Principal>) -> RbacPolicy {
    RbacPolicy {
        name: name.into(),
        permissions,
        principals,
    }
}

fn rules(action: RbacAction, policies: Vec<RbacPolicy>) -> RbacConfig {
    RbacConfig {
        rules: Some(RbacRules { action, policies }),
        shadow_rules: None,
    }
}

fn method(m: &str) -> Permission {
    Permission::Header(HeaderMatcher {
        name: ":method".into(),
        kind: HeaderMatch::String(StringMatcher::exact(m)),
        invert: false,
        treat_missing_as_empty: false,
    })
}

async fn status(
    layer: &AuthzLayer,
    m: &str,
    path: &str,
    peer: Option<&str>,
    grpc: bool,
) -> (u16, Option<String>) {
    let mut svc =
        ServiceBuilder::new()
            .layer(layer.clone())
            .service_fn(|_req: Request<()>| async {
                Ok::<_, Infallible>(Response::new(String::from("ok")))
            });
    let mut req = Request::builder()
        .method(m)
        .uri(format!("http://svc{path}"))
        .body(())
        .unwrap();
    if grpc {
        req.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
    }
    req.extensions_mut()
        .insert(PeerIdentity(peer.map(|p| p.parse().unwrap())));
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    (
        resp.status().as_u16(),
        resp.headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned()),
    )
}

const LEGACY: &str = "spiffe://cluster.local/ns/legacy/sa/old";
const FRONTEND: &str = "spiffe://cluster.local/ns/prod/sa/frontend";

#[tokio::test]
async fn deny_wins_over_allow_and_allow_by_path_and_method() {
    let layer = AuthzLayer::new(vec![
        // ALLOW listed first: DENY must still be evaluated first.
        rules(
            RbacAction::Allow,
            vec![policy(
                "api-get",
                vec![Permission::And(vec![
                    method("GET"),
                    Permission::Path(StringMatcher::prefix("/api/")),
                ])],
                vec![Principal::Any],
            )],
        ),
        rules(
            RbacAction::Deny,
            vec![policy(
                "legacy",
                vec![Permission::Any],
                vec![authenticated(LEGACY)],
            )],
        ),
    ]);
    assert_eq!(
        status(&layer, "GET", "/api/x", Some(FRONTEND), false)
            .await
            .0,
        200
    );
    assert_eq!(
        status(&layer, "GET", "/api/x", None, false).await.0,
        200,
        "ALLOW with any principal"
    );
    assert_eq!(
        status(&layer, "GET", "/api/x", Some(LEGACY), false).await.0,
        403,
        "DENY by principal wins"
    );
    assert_eq!(
        status(&layer, "POST", "/api/x", Some(FRONTEND), false)
            .await
            .0,
        403,
        "method not allowed"
    );
    assert_eq!(
        status(&layer, "GET", "/admin", Some(FRONTEND), false)
            .await
            .0,
        403,
        "path not allowed"
    );
    assert_eq!(
        status(&layer, "POST", "/api/x", Some(FRONTEND), true).await,
        (200, Some("7".into())),
        "gRPC PERMISSION_DENIED"
    );
    assert_eq!(layer.denied(), 4);
}

#[tokio::test]
async fn shadow_rules_do_not_block() {
    let layer = AuthzLayer::new(vec![RbacConfig {
        rules: None,
        shadow_rules: Some(RbacRules {
            action: RbacAction::Deny,
            policies: vec![policy(
                "everything",
                vec![Permission::Any],
                vec![Principal::Any],
            )],
        }),
    }]);
    assert_eq!(status(&layer, "GET", "/", None, false).await.0, 200);
    assert_eq!(layer.denied(), 0);
}

#[tokio::test]
async fn authenticated_requires_a_peer_identity() {
    let layer = AuthzLayer::new(vec![rules(
        RbacAction::Allow,
        vec![policy(
            "mtls",
            vec![Permission::Any],
            vec![Principal::Authenticated(None)],
        )],
    )]);
    assert_eq!(
        status(&layer, "GET", "/", Some(FRONTEND), false).await.0,
        200
    );
    assert_eq!(status(&layer, "GET", "/", None, false).await.0, 403);
}
